//! The lock table's vocabulary: the commands Raft replicates into it, the reply each
//! command gets, the events it emits for other parties, and its errors. Plain data
//! only; every rule about them lives in `table` and `queue`.

use super::mode::Mode;
use serde::{Deserialize, Serialize};
use std::fmt;

/// A node's session; the id of the Login command that created it: its entry's Raft
/// index, or the next unused id when an entry carries several commands
/// (`State::apply`). Never reused.
pub type SessionId = u64;
/// A lock; the id of the Lock command that created it, issued as a session's.
pub type LockId = u64;
/// A client-chosen, per-session request id, used to apply a retried request once.
pub type RequestId = u64;

/// What happens to a failed node's locks (BRIEF §3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryMode {
    /// Released as soon as the node is fenced.
    Auto,
    /// GFS-style: PW/EX locks stay as expired holders until a survivor's RecoveryDone.
    Explicit,
}

impl fmt::Display for RecoveryMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecoveryMode::Auto => "auto",
            RecoveryMode::Explicit => "explicit",
        })
    }
}

/// Request flags (BRIEF §3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flags {
    /// Fail with WouldBlock instead of queueing.
    pub try_: bool,
    /// Like `try_`, but first send the blocking holders one callback.
    pub try_1cb: bool,
    /// May be granted although expired holders would block it (recovery).
    pub noexp: bool,
    /// A PR request may be granted as CW and a CW request as PR.
    pub any: bool,
    /// Queue at the head instead of the tail.
    pub priority: bool,
    /// Return the LVB with the grant (and let a down-conversion write it).
    pub valblk: bool,
}

impl Flags {
    pub(super) fn is_try(&self) -> bool {
        self.try_ || self.try_1cb
    }
}

impl Command {
    /// The session a node's own request acts for (not Login, Tick or the leader's
    /// liveness commands).
    pub fn session(&self) -> Option<SessionId> {
        match self {
            Command::Logout { session, .. }
            | Command::OpenLockspace { session, .. }
            | Command::Lock { session, .. }
            | Command::Convert { session, .. }
            | Command::Unlock { session, .. }
            | Command::Cancel { session, .. }
            | Command::RecoveryDone { session, .. } => Some(*session),
            Command::Login { .. }
            | Command::Tick
            | Command::Expire { .. }
            | Command::Failover
            | Command::Reconnect { .. }
            | Command::FenceStart { .. }
            | Command::FenceAttempt { .. }
            | Command::FenceAck { .. }
            | Command::ForceExpire { .. }
            | Command::LoginUnfencing { .. }
            | Command::UnfenceAttempt { .. } => None,
        }
    }
}

/// A node session's state (BRIEF §3.3), in the order a failed node goes through them:
/// (Unfencing →) LoggedIn ⇄ WasLoggedIn (failover) → Expired → Fencing → Fenced. Only
/// the two live states may act ([`NodeState::may_act`]); everything else is refused by
/// default.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    LoggedIn,
    /// Logged in when the current leader took over; not heard from since.
    WasLoggedIn,
    /// Missed its heartbeats. Its locks stay held until it is fenced.
    Expired,
    /// A fence agent is being run against the node.
    Fencing,
    /// Fenced. Only kept while it owns expired holders awaiting recovery; the node
    /// may log in again with a new session.
    Fenced,
    /// Logged in, but its node's storage unfencing (`action=on` of its devices with
    /// `unfence = true`, Pacemaker's `provides=unfencing`) has not succeeded yet: its
    /// login is not answered, and it owns nothing and may do nothing until it has
    /// (issue 15). It then becomes LoggedIn, or, when the attempts run out, the
    /// session ends and the login is refused.
    Unfencing,
}

impl NodeState {
    /// Still logged in: heartbeats expected, requests accepted.
    pub fn is_live(self) -> bool {
        matches!(self, NodeState::LoggedIn | NodeState::WasLoggedIn)
    }

    /// The allow-list of BRIEF §3.4: whether a session in this state may change
    /// anything (lock, convert, unlock, cancel, logout, open a lockspace, report a
    /// recovery, heartbeat, hold an event stream). Only a live session may: an
    /// Expired, Fencing or Fenced node may still be running (its fence agent has not
    /// finished), and nothing it sends may touch the table until it is fenced. A state
    /// added later is refused until it is listed here.
    pub fn may_act(self) -> bool {
        match self {
            NodeState::LoggedIn | NodeState::WasLoggedIn => true,
            NodeState::Expired | NodeState::Fencing | NodeState::Fenced => false,
            // Not yet allowed to touch the shared storage, so not to lock it either.
            NodeState::Unfencing => false,
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::LoggedIn => "logged in",
            NodeState::WasLoggedIn => "was logged in",
            NodeState::Expired => "expired",
            NodeState::Fencing => "being fenced",
            NodeState::Fenced => "fenced",
            NodeState::Unfencing => "being unfenced",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Login {
        node: String,
        nonce: u64,
    },
    Logout {
        session: SessionId,
        request_id: RequestId,
    },
    OpenLockspace {
        session: SessionId,
        request_id: RequestId,
        name: String,
        /// 0 means the default, 32.
        lvb_len_bytes: u32,
        recovery: RecoveryMode,
    },
    Lock {
        session: SessionId,
        request_id: RequestId,
        ack_below: RequestId,
        lockspace: String,
        resource: Vec<u8>,
        mode: Mode,
        flags: Flags,
        /// 0 means wait forever.
        timeout_ms: u64,
    },
    Convert {
        session: SessionId,
        request_id: RequestId,
        ack_below: RequestId,
        lock_id: LockId,
        mode: Mode,
        flags: Flags,
        timeout_ms: u64,
        lvb: Option<Vec<u8>>,
    },
    Unlock {
        session: SessionId,
        request_id: RequestId,
        ack_below: RequestId,
        lock_id: LockId,
        lvb: Option<Vec<u8>>,
    },
    Cancel {
        session: SessionId,
        request_id: RequestId,
        ack_below: RequestId,
        target: RequestId,
    },
    /// Fails every waiting request whose deadline <= now_ms with LockError::Timeout.
    Tick,
    /// The leader has not heard from the session for its expiry window: the node is
    /// Expired. Its waiting requests fail; its granted locks stay held (until fencing
    /// releases them) and further requests of the session are refused.
    Expire {
        session: SessionId,
    },
    /// A new leader took over: every LoggedIn session becomes WasLoggedIn until it is
    /// heard from again (or expired after the grace period).
    Failover,
    /// A WasLoggedIn session was heard from again: it is LoggedIn.
    Reconnect {
        session: SessionId,
    },
    /// The leader starts fencing an expired session's node.
    FenceStart {
        session: SessionId,
    },
    /// One fence level was run. `level_index` counts the node's levels from 0;
    /// `last_level` says it was the last one (a failure then ends a round). Success
    /// completes the fence: the node's locks are released (BRIEF §3.4).
    FenceAttempt {
        session: SessionId,
        level: u32,
        level_index: u32,
        last_level: bool,
        ok: bool,
        detail: String,
    },
    /// An operator expires a live node by hand (`lockctl forceexpire`).
    ForceExpire {
        node: String,
    },
    /// An operator confirmed that `node` is fenced (`lockctl fence ack`).
    FenceAck {
        node: String,
        by: String,
    },
    /// A survivor replayed `node`'s journal in `lockspace`: release the node's
    /// expired holders there.
    RecoveryDone {
        session: SessionId,
        request_id: RequestId,
        lockspace: String,
        node: String,
    },
    /// A Login of a node whose config has unfence devices (the service decides which
    /// of the two a login is): the session starts Unfencing and the reply is
    /// `Reply::Unfencing`; the login is answered when `Event::Unfenced` says how the
    /// leader's unfencing ended. Otherwise exactly Login's rules. (A variant of its
    /// own rather than a field of Login, so that Login entries already in logs decode.)
    LoginUnfencing {
        node: String,
        nonce: u64,
    },
    /// The leader ran an Unfencing session's unfence devices once (`action=on`, all of
    /// them; `ok` = every one succeeded). Success makes it LoggedIn; a failure with
    /// `last_attempt` (the attempts of `[fencing] unfence_attempts` are used up) ends
    /// the session, refuses its login and records why for `lockctl nodes`.
    UnfenceAttempt {
        session: SessionId,
        ok: bool,
        last_attempt: bool,
        detail: String,
    },
}

/// What a granted request learns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub lock_id: LockId,
    /// The mode actually granted (differs from the requested one only with `any`).
    pub mode: Mode,
    /// The fencing token of this grant; larger than every earlier grant's.
    pub token: u64,
    /// The resource's LVB; `Some` only when the request had `valblk`.
    pub lvb: Option<Vec<u8>>,
    /// The LVB was lost with a failed PW/EX holder; reported only with `valblk`.
    pub lvb_invalid: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    LoggedIn {
        session: SessionId,
    },
    /// Logout, unlock, tick.
    Ok,
    LockspaceOpened {
        lvb_len_bytes: u32,
        recovery: RecoveryMode,
    },
    /// A lock or conversion granted at once.
    Granted(GrantInfo),
    /// A lock or conversion waits; its outcome comes later as `Event::Finished`.
    Queued {
        lock_id: LockId,
    },
    Cancelled {
        cancelled: bool,
    },
    Failed(LockError),
    /// A login (or its retry) whose session is being unfenced: not an answer for the
    /// node yet; the driver holds it until `Event::Unfenced`.
    Unfencing {
        session: SessionId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    /// A queued Lock/Convert request (named by session + request_id) finished.
    Finished {
        session: SessionId,
        request_id: RequestId,
        result: Result<GrantInfo, LockError>,
    },
    /// Blocking callback: `lock_id` (owned by `session`) blocks a request for `requested`.
    Blocking {
        session: SessionId,
        lock_id: LockId,
        lockspace: String,
        resource: Vec<u8>,
        requested: Mode,
    },
    /// The session was expired; its stream gets this notice and is closed.
    SessionExpired { session: SessionId },
    /// `node` was fenced and left expired holders in `lockspace`: replay its journal
    /// under `noexp` locks, then send RecoveryDone. `first_mounter`: the receiver is
    /// the only live node in the lockspace (GFS's first-mounter rule).
    NeedRecovery {
        session: SessionId,
        lockspace: String,
        node: String,
        first_mounter: bool,
    },
    /// The unfencing of `session` ended: `Ok` = it is LoggedIn, the held login is
    /// answered with it; `Err` = the session is gone and the login gets the error.
    Unfenced {
        session: SessionId,
        result: Result<(), LockError>,
    },
    /// An unfence attempt of `session` failed and was not its last: the attempt is
    /// recorded, so the leader's run of it is over and another may start (after the
    /// back-off). Not the node's business.
    UnfenceDue { session: SessionId },
    /// The leader's fence job: the session's node must be fenced, `next` says from
    /// where. Emitted when the session expires (`Start`), when its fence started
    /// (`Level(0)`) and after each failed level (the next one). Not the node's business.
    FenceDue {
        session: SessionId,
        node: String,
        next: FenceNext,
    },
    /// The session's fence is over (an agent level succeeded or an operator
    /// acknowledged it): no fence job is left to run for it.
    Fenced { session: SessionId },
    /// The session logged out and is gone from the table.
    LoggedOut { session: SessionId },
}

/// What a fence job does next (see [`Event::FenceDue`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceNext {
    /// Propose `FenceStart`: the session is expired and its fence not yet recorded.
    Start,
    /// Run the fence level at this index of the node's levels.
    Level(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LockError {
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    #[error("unknown lockspace '{0}'")]
    UnknownLockspace(String),
    #[error("unknown lock id {0}")]
    UnknownLock(LockId),
    #[error("node '{node}' is already logged in as session {session}")]
    AlreadyLoggedIn { node: String, session: SessionId },
    #[error("lockspace '{0}' was not opened by this session")]
    LockspaceNotOpened(String),
    #[error(
        "lockspace '{name}' already exists with LVB length {lvb_len_bytes} bytes and \
         recovery {recovery}"
    )]
    LockspaceMismatch {
        name: String,
        lvb_len_bytes: u32,
        recovery: RecoveryMode,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("lock {0} is not granted, is an expired holder, or already has a conversion pending")]
    NotGranted(LockId),
    #[error("the request would block and was not queued (try)")]
    WouldBlock,
    #[error("the request was cancelled")]
    Cancelled,
    #[error("conversion deadlock: the conversion was refused and the lock keeps its mode")]
    Deadlock,
    #[error("the request timed out while waiting")]
    Timeout,
    #[error("limit reached: {0}")]
    Limit(String),
    #[error(
        "session {0} was expired (missed heartbeats); its locks stay held until the node is fenced"
    )]
    SessionExpired(SessionId),
    /// A request acting for a session that may not act (see [`NodeState::may_act`]).
    #[error(
        "session {session} is {state}: only a logged-in session may act; its granted locks \
         stay held until its node is fenced (then only recovery releases what is left)"
    )]
    SessionNotLive {
        session: SessionId,
        state: NodeState,
    },
    #[error(
        "node '{node}' was expired (session {session}): it must be fenced before it can log in again"
    )]
    NodeExpired { node: String, session: SessionId },
    #[error("node '{0}' is not logged in")]
    NotLoggedIn(String),
    #[error("node '{0}' is not awaiting fencing (it is not expired)")]
    NotFencing(String),
    #[error("node '{node}' has no expired holders in lockspace '{lockspace}' awaiting recovery")]
    NothingToRecover { node: String, lockspace: String },
    /// Another login of the node (another nonce) waits for its unfencing.
    #[error(
        "node '{node}' is being unfenced for an earlier login (session {session}); log in \
         again when that ends"
    )]
    NodeUnfencing { node: String, session: SessionId },
    /// The login's unfencing failed `attempts` times; its session is gone.
    #[error(
        "unfencing node '{node}' failed ({attempts} attempts, last: {detail}); the login \
         is refused: the node must not use the shared storage"
    )]
    UnfenceFailed {
        node: String,
        attempts: u32,
        detail: String,
    },
}
