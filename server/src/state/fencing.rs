//! Fencing and recovery in the lock table (BRIEF §3.4): the replicated progress of a
//! fence, what fencing releases, and GFS-style recovery in `explicit` lockspaces.
//!
//! The central rule lives here: a failed node's granted locks are released only by
//! [`State::complete_fence`], which runs only when an agent level succeeded or an
//! operator acknowledged the fence. Running agents is the Raft driver's business;
//! this module only records what they did.

use super::command::{
    Event, FenceNext, LockError, LockId, NodeState, RecoveryMode, Reply, SessionId,
};
use super::limits::MAX_FENCE_HISTORY;
use super::mode::Mode;
use super::model::{DepartureKind, FenceProgress, FenceRecord, FenceStep};
use super::table::State;
use std::collections::BTreeSet;
use std::sync::Arc;

impl State {
    pub(super) fn record_fence(&mut self, at_ms: u64, session: SessionId, what: FenceStep) {
        let node = self
            .core
            .sessions
            .get(&session)
            .map(|s| s.node.clone())
            .unwrap_or_default();
        let history = &mut self.core.fence_history;
        if history.len() >= MAX_FENCE_HISTORY {
            history.pop_front();
        }
        history.push_back(FenceRecord {
            at_ms,
            node,
            session,
            what,
        });
    }

    fn awaiting_fence(&self, session: SessionId) -> Result<NodeState, LockError> {
        let s = self
            .core
            .sessions
            .get(&session)
            .ok_or(LockError::UnknownSession(session))?;
        match s.state {
            NodeState::Expired | NodeState::Fencing => Ok(s.state),
            _ => Err(LockError::NotFencing(s.node.clone())),
        }
    }

    pub(super) fn fence_start(
        &mut self,
        session: SessionId,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if self.awaiting_fence(session)? == NodeState::Expired {
            self.session_mut(session).state = NodeState::Fencing;
            self.core.fences.insert(session, FenceProgress::default());
            self.record_fence(now_ms, session, FenceStep::Started);
            self.fence_due(session, FenceNext::Level(0), events);
        }
        Ok(Reply::Ok)
    }

    /// Tells the leader what the session's fence job does next.
    pub(super) fn fence_due(&self, session: SessionId, next: FenceNext, events: &mut Vec<Event>) {
        if let Some(s) = self.core.sessions.get(&session) {
            events.push(Event::FenceDue {
                session,
                node: s.node.clone(),
                next,
            });
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fence_attempt(
        &mut self,
        session: SessionId,
        level: u32,
        level_index: u32,
        last_level: bool,
        ok: bool,
        detail: String,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if self.awaiting_fence(session)? != NodeState::Fencing {
            return Err(LockError::InvalidArgument(format!(
                "fence attempt for session {session}, whose fence has not started"
            )));
        }
        self.record_fence(now_ms, session, FenceStep::Attempt { level, ok, detail });
        if ok {
            self.complete_fence(session, format!("agent (level {level})"), now_ms, events);
            return Ok(Reply::Ok);
        }
        let progress = self.core.fences.entry(session).or_default();
        if last_level {
            progress.next_level_index = 0;
            progress.failed_rounds += 1;
        } else {
            progress.next_level_index = level_index + 1;
        }
        let next = FenceNext::Level(progress.next_level_index);
        self.fence_due(session, next, events);
        Ok(Reply::Ok)
    }

    pub(super) fn fence_ack(
        &mut self,
        node: &str,
        by: String,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        let session = self
            .idx
            .node_sessions
            .get(node)
            .copied()
            .ok_or_else(|| LockError::NotFencing(node.to_string()))?;
        self.awaiting_fence(session)?;
        self.complete_fence(session, format!("acknowledged by {by}"), now_ms, events);
        Ok(Reply::Ok)
    }

    /// The node is fenced: it can no longer touch the disks, so its locks may go.
    /// In `auto` lockspaces all of them are released (PW/EX LVBs marked invalid). In
    /// `explicit` lockspaces PR/CR/CW/NL are released and PW/EX stay as expired
    /// holders until a survivor's RecoveryDone; every live node of such a lockspace is
    /// told to recover. The node may log in again at once, with a new session.
    pub(super) fn complete_fence(
        &mut self,
        session: SessionId,
        by: String,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) {
        self.record_fence(now_ms, session, FenceStep::Done { by });
        self.core.fences.remove(&session);
        events.push(Event::Fenced { session });
        let lock_ids = self.owned_lock_ids(session);
        let mut touched = BTreeSet::new();
        let mut to_recover = BTreeSet::new();
        for lock_id in lock_ids {
            // Expiry failed every waiting request and a session that may not act
            // queues none; should one be left all the same, it ends here instead of
            // breaking the table (a waiting lock goes with it).
            let lock = self.lock_ref(lock_id);
            touched.insert(lock.res);
            if lock.pending.is_some() {
                self.fail_pending(lock_id, LockError::SessionExpired(session), events);
            }
            let Some(lock) = self.core.locks.get(&lock_id) else {
                continue;
            };
            let (res, granted) = (lock.res, lock.granted);
            let writer = matches!(granted, Some(Mode::Pw | Mode::Ex));
            let ls = self.resource(res).ls;
            touched.insert(res);
            if writer {
                self.resource_mut(res).lvb_invalid = true;
            }
            if writer && self.core.lockspaces[ls as usize].recovery == RecoveryMode::Explicit {
                self.lock_mut(lock_id).expired = true;
                to_recover.insert(ls);
            } else {
                self.release(lock_id);
            }
        }
        let node = self.session_mut(session).node.clone();
        self.session_mut(session).state = NodeState::Fenced;
        self.idx.node_sessions.remove(&node);
        self.depart(node.clone(), now_ms, DepartureKind::Fenced);
        self.forget_if_empty(session);
        for ls in to_recover {
            self.tell_survivors(ls, &node, events);
        }
        for res in touched {
            self.settle(res, events);
        }
    }

    /// Tells every live node of lockspace `ls` to recover `node` (all of them: any
    /// one may do it, as in GFS, where the journal's lock decides who replays it).
    fn tell_survivors(&self, ls: u32, node: &str, events: &mut Vec<Event>) {
        let survivors: Vec<SessionId> = self
            .core
            .sessions
            .iter()
            .filter(|(_, s)| s.state.may_act() && s.opened.contains(&ls))
            .map(|(&id, _)| id)
            .collect();
        let first_mounter = survivors.len() == 1;
        for session in survivors {
            events.push(Event::NeedRecovery {
                session,
                lockspace: self.core.lockspaces[ls as usize].name.clone(),
                node: node.to_string(),
                first_mounter,
            });
        }
    }

    /// Recovery duty outlives whoever was told: a session that leaves the live nodes
    /// of a lockspace (expired or logged out) before RecoveryDone hands every recovery
    /// still pending there to the live nodes that remain. Call it after the session
    /// stopped being live, with the lockspaces it had opened.
    pub(super) fn hand_over_recoveries(&self, opened: &BTreeSet<u32>, events: &mut Vec<Event>) {
        for &ls in opened {
            for node in self.nodes_to_recover(ls) {
                self.tell_survivors(ls, &node, events);
            }
        }
    }

    /// Every recovery still pending in the lockspaces `session` opened, as the
    /// NeedRecovery events it is owed: sent when its event stream is (re)opened, so a
    /// notice lost with a leader or a stream is sent again.
    pub fn pending_recoveries(&self, session: SessionId) -> Vec<Event> {
        let mut events = Vec::new();
        if let Some(s) = self.core.sessions.get(&session) {
            for &ls in &s.opened {
                self.owed_recoveries(session, ls, &mut events);
            }
        }
        events
    }

    /// Tells a live `session` of every recovery pending in lockspace `ls` (when it
    /// opens it, and see `pending_recoveries`). `first_mounter`: it is the only live
    /// node of the lockspace (GFS's first-mounter rule).
    pub(super) fn owed_recoveries(&self, session: SessionId, ls: u32, events: &mut Vec<Event>) {
        if !self.session_state(session).is_some_and(NodeState::may_act) {
            return;
        }
        let nodes = self.nodes_to_recover(ls);
        if nodes.is_empty() {
            return;
        }
        let others_live = self
            .core
            .sessions
            .iter()
            .any(|(&id, s)| id != session && s.state.may_act() && s.opened.contains(&ls));
        for node in nodes {
            events.push(Event::NeedRecovery {
                session,
                lockspace: self.core.lockspaces[ls as usize].name.clone(),
                node,
                first_mounter: !others_live,
            });
        }
    }

    /// Nodes with expired holders in lockspace `ls`.
    fn nodes_to_recover(&self, ls: u32) -> BTreeSet<String> {
        let fenced = |sid: &SessionId| {
            self.core
                .sessions
                .get(sid)
                .filter(|s| s.state == NodeState::Fenced)
        };
        if !self.core.sessions.keys().any(|sid| fenced(sid).is_some()) {
            return BTreeSet::new();
        }
        self.core
            .locks
            .values()
            .filter(|lock| lock.expired && self.resource(lock.res).ls == ls)
            .filter_map(|lock| fenced(&lock.owner).map(|s| s.node.clone()))
            .collect()
    }

    /// RecoveryDone from a live node of the lockspace: `node`'s expired holders there
    /// are released and their waiters granted.
    pub(super) fn recovery_done(
        &mut self,
        session: SessionId,
        lockspace: &str,
        node: &str,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        let ls = *self
            .idx
            .lockspace_ids
            .get(lockspace)
            .ok_or_else(|| LockError::UnknownLockspace(lockspace.to_string()))?;
        if !self.session(session)?.opened.contains(&ls) {
            return Err(LockError::LockspaceNotOpened(lockspace.to_string()));
        }
        let fenced: BTreeSet<SessionId> = self
            .core
            .sessions
            .iter()
            .filter(|(_, s)| s.state == NodeState::Fenced && s.node == node)
            .map(|(&sid, _)| sid)
            .collect();
        let targets: Vec<(SessionId, LockId)> = if fenced.is_empty() {
            Vec::new()
        } else {
            self.core
                .locks
                .iter()
                .filter(|(_, lock)| {
                    fenced.contains(&lock.owner) && lock.expired && self.resource(lock.res).ls == ls
                })
                .map(|(&id, lock)| (lock.owner, id))
                .collect()
        };
        if targets.is_empty() {
            return Err(LockError::NothingToRecover {
                node: node.to_string(),
                lockspace: lockspace.to_string(),
            });
        }
        let mut touched = BTreeSet::new();
        let mut owners = BTreeSet::new();
        for (owner, lock_id) in targets {
            touched.insert(self.lock_ref(lock_id).res);
            owners.insert(owner);
            self.release(lock_id);
        }
        for owner in owners {
            self.forget_if_empty(owner);
        }
        for res in touched {
            self.settle(res, events);
        }
        Ok(Reply::Ok)
    }

    /// A fenced session that owns nothing more is gone for good.
    fn forget_if_empty(&mut self, session: SessionId) {
        if self
            .core
            .sessions
            .get(&session)
            .is_some_and(|s| s.state == NodeState::Fenced && s.lock_count == 0)
        {
            if let Some(s) = self
                .core
                .sessions
                .remove(&session)
                .map(Arc::unwrap_or_clone)
            {
                self.idx.maybe_unused.extend(s.opened);
            }
        }
    }

    /// Fences the leader must run: (session, node, progress) of every expired or
    /// fencing session.
    pub fn fences_due(&self) -> Vec<(SessionId, String, NodeState, FenceProgress)> {
        self.core
            .sessions
            .iter()
            .filter(|(_, s)| matches!(s.state, NodeState::Expired | NodeState::Fencing))
            .map(|(&id, s)| {
                let progress = self.core.fences.get(&id).cloned().unwrap_or_default();
                (id, s.node.clone(), s.state, progress)
            })
            .collect()
    }

    pub fn fence_progress(&self, session: SessionId) -> Option<FenceProgress> {
        self.core.fences.get(&session).cloned()
    }

    pub fn fence_history(&self) -> impl Iterator<Item = &FenceRecord> {
        self.core.fence_history.iter()
    }
}
