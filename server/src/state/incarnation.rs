//! What a new cluster incarnation (`lockd restore`, `lockd recover --force-new-cluster`)
//! does to the lock table it starts from: every live session must show itself again
//! (the cold-start rule, BRIEF §3.4), and the fencing token counter moves past every
//! token the old incarnation can have issued.
//!
//! Tokens: the top [`TOKEN_EPOCH_BITS`] bits of a token are its epoch, the rest a
//! counter. Grants only add 1, so a cluster stays in its epoch (2^48 grants is 89 years
//! at 100,000 grants per second). A new incarnation starts at the first token of the
//! epoch after the one its snapshot was in (or above an operator's floor, if higher):
//! every token the old incarnation issued before or after the snapshot is in the
//! snapshot's epoch or an older one, hence below. Not an apply step: it runs offline,
//! on a table decoded from a snapshot, before the new incarnation's first entry.

use super::table::State;

/// High bits of a fencing token that count incarnations.
pub const TOKEN_EPOCH_BITS: u32 = 16;
/// Bits of the per-incarnation grant counter.
pub const TOKEN_COUNTER_BITS: u32 = 64 - TOKEN_EPOCH_BITS;

/// The epoch a token belongs to.
pub fn token_epoch(token: u64) -> u64 {
    token >> TOKEN_COUNTER_BITS
}

impl State {
    /// Makes this table the start of a new incarnation: every LoggedIn session becomes
    /// WasLoggedIn (Expired, Fencing, Fenced, LoggedOut ones keep their state, and their
    /// fences resume), and the token counter moves to the start of the next epoch, or
    /// to `floor` if that is higher. Returns the new last token: every grant from here
    /// on has a larger one. Errors (and changes nothing) when the epochs are used up.
    pub fn begin_incarnation(&mut self, floor: u64) -> Result<u64, String> {
        let next_epoch = token_epoch(self.last_token()) + 1;
        if next_epoch >> TOKEN_EPOCH_BITS != 0 {
            return Err(format!(
                "the token counter is in its last epoch ({}): no new incarnation can start \
                 above it",
                next_epoch - 1
            ));
        }
        let start = (next_epoch << TOKEN_COUNTER_BITS).max(floor);
        if start == u64::MAX {
            return Err(format!("token floor {floor} leaves no token to grant"));
        }
        self.demote_logged_in();
        self.core.last_token = start;
        Ok(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{
        Command, Flags, GrantInfo, Mode, NodeState, RecoveryMode, Reply, SessionId,
    };

    struct Table {
        state: State,
        index: u64,
    }

    impl Table {
        fn apply(&mut self, command: Command) -> Reply {
            self.index += 1;
            self.state.apply(self.index, 1_000, command).0
        }

        fn login(&mut self, node: &str) -> SessionId {
            let session = match self.apply(Command::Login {
                node: node.into(),
                nonce: 1,
            }) {
                Reply::LoggedIn { session } => session,
                other => panic!("login: {other:?}"),
            };
            self.apply(Command::OpenLockspace {
                session,
                request_id: 1,
                name: "fs1".into(),
                lvb_len_bytes: 0,
                recovery: RecoveryMode::Auto,
            });
            session
        }

        fn lock(&mut self, session: SessionId, request_id: u64, resource: &str) -> GrantInfo {
            match self.apply(Command::Lock {
                session,
                request_id,
                ack_below: request_id,
                lockspace: "fs1".into(),
                resource: resource.as_bytes().to_vec(),
                mode: Mode::Ex,
                flags: Flags::default(),
                timeout_ms: 0,
            }) {
                Reply::Granted(grant) => grant,
                other => panic!("lock: {other:?}"),
            }
        }
    }

    fn table_with_a_grant() -> (Table, SessionId, GrantInfo) {
        let mut t = Table {
            state: State::new(),
            index: 0,
        };
        let session = t.login("node1");
        let grant = t.lock(session, 2, "journal-1");
        (t, session, grant)
    }

    #[test]
    fn a_new_incarnation_makes_every_logged_in_session_was_logged_in() {
        let (mut t, session, _) = table_with_a_grant();
        t.state.begin_incarnation(0).unwrap();
        let info = t.state.sessions().find(|s| s.session == session).unwrap();
        assert_eq!(info.state, NodeState::WasLoggedIn);
        assert_eq!(t.state.held_lock_count(), 1, "its locks stay");
    }

    #[test]
    fn the_first_grant_of_a_new_incarnation_is_above_every_token_of_the_old_epoch() {
        let (mut t, session, grant) = table_with_a_grant();
        assert_eq!(token_epoch(grant.token), 0);
        let start = t.state.begin_incarnation(0).unwrap();
        assert_eq!(start, 1 << TOKEN_COUNTER_BITS);
        // The old incarnation could have gone on to the end of epoch 0.
        assert!(start > (1 << TOKEN_COUNTER_BITS) - 1);
        t.apply(Command::Reconnect { session });
        let next = t.lock(session, 3, "journal-2");
        assert_eq!(next.token, start + 1);
        // A second incarnation moves to the epoch after.
        assert_eq!(
            t.state.begin_incarnation(0).unwrap(),
            2 << TOKEN_COUNTER_BITS
        );
    }

    #[test]
    fn an_operator_floor_above_the_next_epoch_wins() {
        let (mut t, _, _) = table_with_a_grant();
        let floor = (1 << TOKEN_COUNTER_BITS) + 12_345;
        assert_eq!(t.state.begin_incarnation(floor).unwrap(), floor);
        let (mut t, _, _) = table_with_a_grant();
        assert_eq!(
            t.state.begin_incarnation(7).unwrap(),
            1 << TOKEN_COUNTER_BITS
        );
    }

    #[test]
    fn the_last_epoch_refuses_a_new_incarnation_and_changes_nothing() {
        let (mut t, _, _) = table_with_a_grant();
        t.state.core.last_token = u64::MAX - 5;
        let before = t.state.encode();
        assert!(t.state.begin_incarnation(0).is_err());
        assert_eq!(t.state.encode(), before);
        let (mut t, _, _) = table_with_a_grant();
        assert!(t.state.begin_incarnation(u64::MAX).is_err());
    }

    #[test]
    fn a_table_of_a_new_incarnation_survives_a_snapshot() {
        let (mut t, _, _) = table_with_a_grant();
        let start = t.state.begin_incarnation(0).unwrap();
        let decoded = State::decode(&t.state.encode()).unwrap();
        assert_eq!(decoded.last_token(), start);
    }
}
