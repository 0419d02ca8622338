//! Sessions in the lock table (BRIEF §3.3): login (with or without storage unfencing
//! first), expiry, reconnection after a failover, logout, and marking a failed
//! node's PW/EX locks as expired holders. Fencing itself is in `fencing`.

use super::command::{Event, FenceNext, LockError, LockId, NodeState, Reply, SessionId};
use super::limits::*;
use super::mode::Mode;
use super::model::{DepartureKind, IdMap, Session};
#[cfg(feature = "unsafe-test-switches")]
use super::table::unsafe_release_on_expire;
use super::table::{check_name, limit, State};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

impl State {
    /// A node logs in (BRIEF §3.3). `unfence`: the node's storage must be unfenced
    /// first, so the session starts Unfencing and the reply is `Reply::Unfencing`
    /// (issue 15). A retry with the login's nonce gets the same session back, in
    /// whatever state it is, or the refusal its unfencing ended in.
    pub(super) fn login(
        &mut self,
        index: u64,
        now_ms: u64,
        node: String,
        nonce: u64,
        unfence: bool,
    ) -> Result<Reply, LockError> {
        check_name("node name", node.as_bytes())?;
        if let Some(&session) = self.idx.node_sessions.get(&node) {
            let s = self.session(session)?;
            if s.state == NodeState::Unfencing {
                if s.nonce == nonce {
                    return Ok(Reply::Unfencing { session });
                }
                return Err(LockError::NodeUnfencing { node, session });
            }
            // A node whose session may not act is failed and not yet fenced: it may
            // be running still, so it must not come back before its fence completed.
            if !s.state.may_act() {
                return Err(LockError::NodeExpired { node, session });
            }
            if s.nonce == nonce {
                return Ok(Reply::LoggedIn { session });
            }
            return Err(LockError::AlreadyLoggedIn { node, session });
        }
        self.unfence_refused_before(&node, nonce)?;
        if self.core.sessions.len() >= MAX_SESSIONS {
            return Err(limit(format!("{MAX_SESSIONS} sessions are logged in")));
        }
        self.idx.node_sessions.insert(node.clone(), index);
        self.core.departed.remove(&node);
        self.core.sessions.insert(
            index,
            Arc::new(Session {
                node,
                nonce,
                opened: BTreeSet::new(),
                lock_count: 0,
                acked_below: 0,
                pending: IdMap::default(),
                done: BTreeMap::new(),
                state: if unfence {
                    NodeState::Unfencing
                } else {
                    NodeState::LoggedIn
                },
                expired_at_ms: 0,
            }),
        );
        if unfence {
            self.start_unfencing(index, now_ms);
            return Ok(Reply::Unfencing { session: index });
        }
        Ok(Reply::LoggedIn { session: index })
    }

    /// The node stopped heartbeating. Its waiting requests fail, pending conversions
    /// included (the locks keep their granted modes); every granted lock stays held:
    /// no lock of a failed node is released before it is fenced (BRIEF §3.4).
    pub(super) fn expire(
        &mut self,
        session: SessionId,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if !self.session(session)?.state.is_live() {
            // Already expired (or being fenced): nothing more to do.
            return Ok(Reply::Ok);
        }
        let waiting: Vec<LockId> = self.session(session)?.pending.values().copied().collect();
        let mut touched = BTreeSet::new();
        for lock_id in waiting {
            touched.insert(self.lock_ref(lock_id).res);
            self.fail_pending(lock_id, LockError::SessionExpired(session), events);
        }
        let s = self.session_mut(session);
        s.state = NodeState::Expired;
        s.expired_at_ms = now_ms;
        let opened = s.opened.clone();
        events.push(Event::SessionExpired { session });
        self.fence_due(session, FenceNext::Start, events);
        for res in touched {
            self.settle(res, events);
        }
        self.hand_over_recoveries(&opened, events);
        #[cfg(feature = "unsafe-test-switches")]
        if unsafe_release_on_expire() {
            // BROKEN ON PURPOSE, for the nemesis test only: release at expiry as if
            // the node had been fenced, which breaks BRIEF §3.4's central rule.
            self.complete_fence(session, "UNSAFE release on expire".into(), now_ms, events);
        }
        Ok(Reply::Ok)
    }

    pub(super) fn reconnect(&mut self, session: SessionId) -> Result<Reply, LockError> {
        self.session(session)?;
        let s = self.session_mut(session);
        if s.state == NodeState::WasLoggedIn {
            s.state = NodeState::LoggedIn;
        }
        Ok(Reply::Ok)
    }

    /// Releases every lock of the session (without writing LVBs: a clean logout leaves
    /// them valid), fails its waiting requests with Cancelled, and forgets it.
    pub(super) fn logout(
        &mut self,
        session: SessionId,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        self.session(session)?;
        let lock_ids = self.owned_lock_ids(session);
        let mut touched = BTreeSet::new();
        for lock_id in lock_ids {
            touched.insert(self.lock_ref(lock_id).res);
            if self.lock_ref(lock_id).pending.is_some() {
                self.fail_pending(lock_id, LockError::Cancelled, events);
            }
            if self.core.locks.contains_key(&lock_id) {
                self.release(lock_id);
            }
        }
        let mut opened = BTreeSet::new();
        if let Some(s) = self
            .core
            .sessions
            .remove(&session)
            .map(Arc::unwrap_or_clone)
        {
            debug_assert!(s.lock_count == 0 && s.pending.is_empty());
            self.idx.node_sessions.remove(&s.node);
            self.depart(s.node, now_ms, DepartureKind::LoggedOut);
            opened = s.opened;
        }
        for res in touched {
            self.settle(res, events);
        }
        self.hand_over_recoveries(&opened, events);
        self.idx.maybe_unused.extend(opened);
        events.push(Event::LoggedOut { session });
        Ok(Reply::Ok)
    }

    /// Marks every PW/EX lock held by `session` as an expired holder: it keeps blocking
    /// every request except `noexp` ones, and its resource's LVB becomes invalid. A
    /// pending conversion of such a lock finishes Cancelled (a failed node converts
    /// nothing), and `noexp` waiters that the change unblocks are granted; the events
    /// of both are returned. Changes nothing if the session is unknown.
    ///
    /// Like `apply`, this changes the replicated state: call it only while applying an
    /// entry, identically on every replica.
    pub fn mark_expired_holders(&mut self, session: SessionId) -> Vec<Event> {
        let mut events = Vec::new();
        let Some(s) = self.core.sessions.get(&session) else {
            return events;
        };
        if s.lock_count == 0 {
            return events;
        }
        let targets: Vec<LockId> = self
            .core
            .locks
            .iter()
            .filter(|(_, lock)| {
                lock.owner == session
                    && !lock.expired
                    && matches!(lock.granted, Some(Mode::Pw | Mode::Ex))
            })
            .map(|(&id, _)| id)
            .collect();
        let mut touched = BTreeSet::new();
        for lock_id in targets {
            if self.lock_ref(lock_id).pending.is_some() {
                self.fail_pending(lock_id, LockError::Cancelled, &mut events);
            }
            let lock = self.lock_mut(lock_id);
            lock.expired = true;
            let res = lock.res;
            self.resource_mut(res).lvb_invalid = true;
            touched.insert(res);
        }
        for res in touched {
            self.settle(res, &mut events);
        }
        events
    }

    /// A new leader: every LoggedIn session becomes WasLoggedIn until it reconnects.
    pub(super) fn failover(&mut self) -> Result<Reply, LockError> {
        self.demote_logged_in();
        Ok(Reply::Ok)
    }

    /// Every LoggedIn session becomes WasLoggedIn (a new leader, a new incarnation);
    /// only those sessions are copied if a frozen copy shares them.
    pub(super) fn demote_logged_in(&mut self) {
        for s in self.core.sessions.values_mut() {
            if s.state == NodeState::LoggedIn {
                Arc::make_mut(s).state = NodeState::WasLoggedIn;
            }
        }
    }

    /// An operator expires a live node's session at once.
    pub(super) fn force_expire(
        &mut self,
        node: String,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        match self.idx.node_sessions.get(&node).copied() {
            Some(session) if self.session_state(session).is_some_and(NodeState::is_live) => {
                self.expire(session, now_ms, events)
            }
            _ => Err(LockError::NotLoggedIn(node)),
        }
    }
}
