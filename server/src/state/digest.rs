//! What binds a request id to its request: a digest of everything a request asks for,
//! stored with the request's record (`Session::done`, a waiting lock's `Pending`). A
//! retry must repeat the request exactly; the same id with another request is refused
//! instead of being answered with the first request's outcome (issue #14).
//!
//! The digest is FNV-1a (64 bits) over a fixed encoding written here field by field,
//! so it depends on nothing that may change between builds or platforms (not on
//! `std`'s hasher, not on serde): every replica computes the same value. It is no
//! defence against a client forging collisions, and needs none: a session's records
//! only answer that session's own requests. `ack_below` is left out on purpose: the
//! client library raises it between retries of one request.

use super::command::{Command, Flags, RecoveryMode};
use super::mode::Mode;

/// A request's digest; see the module documentation.
pub(super) type Digest = u64;

struct Fnv(u64);

impl Fnv {
    fn new(kind: u8) -> Fnv {
        let mut h = Fnv(0xcbf2_9ce4_8422_2325);
        h.byte(kind);
        h
    }

    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
    }

    fn u64(&mut self, v: u64) {
        for b in v.to_le_bytes() {
            self.byte(b);
        }
    }

    /// Length first, so ("ab", "c") and ("a", "bc") differ.
    fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        for &x in b {
            self.byte(x);
        }
    }

    fn lvb(&mut self, lvb: &Option<Vec<u8>>) {
        match lvb {
            None => self.byte(0),
            Some(bytes) => {
                self.byte(1);
                self.bytes(bytes);
            }
        }
    }

    fn mode(&mut self, mode: Mode) {
        self.byte(mode.bit());
    }

    fn flags(&mut self, f: Flags) {
        let bits = [f.try_, f.try_1cb, f.noexp, f.any, f.priority, f.valblk]
            .iter()
            .enumerate()
            .fold(0u8, |acc, (i, &on)| acc | (u8::from(on) << i));
        self.byte(bits);
    }
}

/// The digest of a command that carries a request id; 0 for the others.
pub(super) fn of(cmd: &Command) -> Digest {
    match cmd {
        Command::Lock {
            lockspace,
            resource,
            mode,
            flags,
            timeout_ms,
            ..
        } => {
            let mut h = Fnv::new(1);
            h.bytes(lockspace.as_bytes());
            h.bytes(resource);
            h.mode(*mode);
            h.flags(*flags);
            h.u64(*timeout_ms);
            h.0
        }
        Command::Convert {
            lock_id,
            mode,
            flags,
            timeout_ms,
            lvb,
            ..
        } => {
            let mut h = Fnv::new(2);
            h.u64(*lock_id);
            h.mode(*mode);
            h.flags(*flags);
            h.u64(*timeout_ms);
            h.lvb(lvb);
            h.0
        }
        Command::Unlock { lock_id, lvb, .. } => {
            let mut h = Fnv::new(3);
            h.u64(*lock_id);
            h.lvb(lvb);
            h.0
        }
        Command::Cancel { target, .. } => {
            let mut h = Fnv::new(4);
            h.u64(*target);
            h.0
        }
        Command::OpenLockspace {
            name,
            lvb_len_bytes,
            recovery,
            ..
        } => {
            let mut h = Fnv::new(5);
            h.bytes(name.as_bytes());
            h.u64(u64::from(*lvb_len_bytes));
            h.byte(match recovery {
                RecoveryMode::Auto => 1,
                RecoveryMode::Explicit => 2,
            });
            h.0
        }
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock(resource: &[u8], ack_below: u64) -> Command {
        Command::Lock {
            session: 1,
            request_id: 7,
            ack_below,
            lockspace: "fs1".into(),
            resource: resource.to_vec(),
            mode: Mode::Ex,
            flags: Flags::default(),
            timeout_ms: 0,
        }
    }

    #[test]
    fn a_digest_covers_the_request_but_not_its_acknowledgement() {
        assert_eq!(of(&lock(b"A", 0)), of(&lock(b"A", 5)));
        assert_ne!(of(&lock(b"A", 0)), of(&lock(b"B", 0)));
        // A fixed value: a change here changes what replicas store, so it must be
        // deliberate (and come with a snapshot format change).
        assert_eq!(
            of(&lock(b"A", 0)),
            0x0fce_4b91_f025_c809_u64,
            "{:#x}",
            of(&lock(b"A", 0))
        );
    }
}
