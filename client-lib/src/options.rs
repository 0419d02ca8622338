//! Per-request and per-lockspace options, and their wire form.

use std::time::Duration;

use lockd_proto::v1;

/// Request flags (BRIEF §3.2). All off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockFlags {
    /// Fail at once with [`crate::Error::WouldBlock`] instead of queueing.
    pub try_lock: bool,
    /// Like `try_lock`, but the holders that block the request get one blocking callback.
    pub try_1cb: bool,
    /// May be granted although the resource has expired holders (used by recovery).
    pub noexp: bool,
    /// A PR request may be granted as CW and a CW request as PR.
    pub any: bool,
    /// Queue at the head of the resource's queue.
    pub priority: bool,
    /// Read the LVB on grant; write it on unlock or down-conversion.
    pub valblk: bool,
}

impl LockFlags {
    pub(crate) fn to_proto(self) -> v1::LockFlags {
        v1::LockFlags {
            r#try: self.try_lock,
            try_1cb: self.try_1cb,
            noexp: self.noexp,
            any: self.any,
            priority: self.priority,
            valblk: self.valblk,
        }
    }
}

/// Options of a lock or conversion request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockOptions {
    /// Request flags.
    pub flags: LockFlags,
    /// How long the request may wait in the server's queue before it fails with
    /// [`crate::Error::Timeout`]. `None` waits without limit; the call then returns only
    /// when the request is granted, fails, or is cancelled, however long the cluster is
    /// without quorum.
    pub timeout: Option<Duration>,
}

impl LockOptions {
    /// Default options: no flags, no queue timeout.
    pub fn new() -> LockOptions {
        LockOptions::default()
    }

    /// Sets the `try` flag: fail at once instead of queueing.
    pub fn try_lock(mut self) -> LockOptions {
        self.flags.try_lock = true;
        self
    }

    /// Sets the `try_1cb` flag.
    pub fn try_1cb(mut self) -> LockOptions {
        self.flags.try_1cb = true;
        self
    }

    /// Sets the `noexp` flag.
    pub fn noexp(mut self) -> LockOptions {
        self.flags.noexp = true;
        self
    }

    /// Sets the `any` flag.
    pub fn any(mut self) -> LockOptions {
        self.flags.any = true;
        self
    }

    /// Sets the `priority` flag.
    pub fn priority(mut self) -> LockOptions {
        self.flags.priority = true;
        self
    }

    /// Sets the `valblk` flag: read the lock value block on grant.
    pub fn valblk(mut self) -> LockOptions {
        self.flags.valblk = true;
        self
    }

    /// Sets the queue timeout.
    pub fn timeout(mut self, timeout: Duration) -> LockOptions {
        self.timeout = Some(timeout);
        self
    }

    /// The wire form of the queue timeout: 0 means no limit, so a non-zero timeout below
    /// one millisecond is rounded up to 1 ms rather than down to "forever".
    pub(crate) fn timeout_ms(&self) -> u64 {
        match self.timeout {
            None => 0,
            Some(t) => u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1),
        }
    }
}

/// What happens to a failed node's locks once it is fenced (BRIEF §3.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RecoveryMode {
    /// All its locks are released at once.
    #[default]
    Auto,
    /// GFS-style: its PW/EX locks stay as expired holders until a survivor calls
    /// recovery done.
    Explicit,
}

impl RecoveryMode {
    pub(crate) fn to_proto(self) -> v1::RecoveryMode {
        match self {
            RecoveryMode::Auto => v1::RecoveryMode::Auto,
            RecoveryMode::Explicit => v1::RecoveryMode::Explicit,
        }
    }

    /// Reads a wire value; UNSPECIFIED means `Auto`, unknown numbers are `None`.
    pub(crate) fn from_proto(value: i32) -> Option<RecoveryMode> {
        match v1::RecoveryMode::try_from(value).ok()? {
            v1::RecoveryMode::Unspecified | v1::RecoveryMode::Auto => Some(RecoveryMode::Auto),
            v1::RecoveryMode::Explicit => Some(RecoveryMode::Explicit),
        }
    }
}

/// Options for opening (and, the first time, creating) a lockspace.
///
/// If the lockspace exists already, the server keeps its options; the returned
/// [`crate::Lockspace`] reports the ones in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockspaceOptions {
    /// LVB length: `None` for the server default (32); otherwise a multiple of 8, at most 64.
    pub lvb_len_bytes: Option<u32>,
    /// Recovery mode.
    pub recovery: RecoveryMode,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_zero_on_the_wire_means_unlimited() {
        assert_eq!(LockOptions::new().timeout_ms(), 0);
        assert_eq!(
            LockOptions::new()
                .timeout(Duration::from_millis(250))
                .timeout_ms(),
            250
        );
        // Must not round down to 0 = unlimited.
        assert_eq!(
            LockOptions::new()
                .timeout(Duration::from_micros(10))
                .timeout_ms(),
            1
        );
        assert_eq!(LockOptions::new().timeout(Duration::ZERO).timeout_ms(), 1);
    }

    #[test]
    fn builder_sets_wire_flags() {
        let f = LockOptions::new().try_lock().valblk().flags.to_proto();
        assert!(f.r#try && f.valblk);
        assert!(!f.try_1cb && !f.noexp && !f.any && !f.priority);
    }

    #[test]
    fn unspecified_recovery_mode_is_auto() {
        assert_eq!(RecoveryMode::from_proto(0), Some(RecoveryMode::Auto));
        assert_eq!(RecoveryMode::from_proto(2), Some(RecoveryMode::Explicit));
        assert_eq!(RecoveryMode::from_proto(42), None);
    }
}
