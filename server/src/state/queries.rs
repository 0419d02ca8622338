//! Read-only queries of the lock table, for the services, `lockctl` and tests: views
//! of sessions, locks and resources, counts, token checks, the next deadline.

use super::command::{LockId, NodeState, SessionId};
use super::mode::Mode;
use super::model::{LsId, ResId};
use super::table::State;
use std::collections::BTreeMap;
use std::hash::BuildHasher;

/// A session as `lockctl status` sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo<'a> {
    pub session: SessionId,
    pub node: &'a str,
    pub state: NodeState,
    pub held_locks: usize,
    pub expired_at_ms: u64,
}

/// A lock as `lockctl locks` or a test sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockView {
    pub lock_id: LockId,
    pub session: SessionId,
    pub lockspace: String,
    pub resource: Vec<u8>,
    /// `None` while the lock waits for its first grant.
    pub granted: Option<Mode>,
    /// The mode a waiting Lock or Convert asks for.
    pub requested: Option<Mode>,
    pub token: u64,
    pub expired: bool,
}

/// A resource's queues and LVB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceView {
    /// Granted locks, in grant order.
    pub holders: Vec<LockId>,
    /// Conversions, in the order they will be considered.
    pub converting: Vec<LockId>,
    /// New requests, in the order they will be considered.
    pub waiting: Vec<LockId>,
    pub lvb: Vec<u8>,
    pub lvb_invalid: bool,
}

impl State {
    // ---- queries ----

    /// The earliest deadline of a waiting request: when the leader should propose Tick.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.idx
            .deadlines
            .first()
            .map(|&(deadline_ms, _)| deadline_ms)
    }

    /// For CheckToken: whether a current holder of the resource has `token`, and the
    /// largest token among current holders (0 if none). Expired holders are holders.
    pub fn check_token(&self, lockspace: &str, resource: &[u8], token: u64) -> (bool, u64) {
        let Some(res) = self.find_resource(lockspace, resource) else {
            return (false, 0);
        };
        let mut current = false;
        let mut latest = 0;
        for holder in self.resource(res).holders.iter() {
            let held = self.lock_ref(holder).token;
            current |= held == token;
            latest = latest.max(held);
        }
        (current, latest)
    }

    fn find_resource(&self, lockspace: &str, resource: &[u8]) -> Option<ResId> {
        let ls = *self.idx.lockspace_ids.get(lockspace)?;
        self.resource_named(ls, resource)
    }

    /// The resource called `name` in lockspace `ls`, if it exists.
    pub(super) fn resource_named(&self, ls: LsId, name: &[u8]) -> Option<ResId> {
        let hash = self.idx.name_hasher.hash_one(name);
        self.idx.resource_ids[ls as usize]
            .range((hash, 0)..=(hash, ResId::MAX))
            .map(|&(_, res)| res)
            .find(|res| {
                self.core
                    .resources
                    .get(res)
                    .is_some_and(|r| *r.name == *name)
            })
    }

    /// Every session's state, by id: O(sessions), for what runs every driver turn (the
    /// per-state gauges).
    pub fn session_states(&self) -> impl Iterator<Item = NodeState> + '_ {
        self.core.sessions.values().map(|s| s.state)
    }

    /// Every session with its node, state, granted-lock count and expiry time, by id.
    /// O(locks): it counts every session's granted locks, so it is for admin views and
    /// tools, never for a path taken per entry or per driver turn (at a million held
    /// locks one call costs milliseconds).
    pub fn sessions(&self) -> impl Iterator<Item = SessionInfo<'_>> {
        let mut held: BTreeMap<SessionId, usize> = BTreeMap::new();
        for lock in self.core.locks.values() {
            if lock.granted.is_some() {
                *held.entry(lock.owner).or_default() += 1;
            }
        }
        self.core
            .sessions
            .iter()
            .map(move |(&session, s)| SessionInfo {
                session,
                node: &s.node,
                state: s.state,
                held_locks: held.get(&session).copied().unwrap_or(0),
                expired_at_ms: s.expired_at_ms,
            })
    }

    /// Sessions the leader must keep hearing from (LoggedIn or WasLoggedIn).
    pub fn live_sessions(&self) -> impl Iterator<Item = SessionId> + '_ {
        self.core
            .sessions
            .iter()
            .filter(|(_, s)| s.state.is_live())
            .map(|(&id, _)| id)
    }

    pub fn session_state(&self, session: SessionId) -> Option<NodeState> {
        self.core.sessions.get(&session).map(|s| s.state)
    }

    pub fn session_count(&self) -> usize {
        self.core.sessions.len()
    }

    /// Granted locks (including those with a pending conversion and expired holders).
    pub fn held_lock_count(&self) -> usize {
        self.idx.held_locks
    }

    /// Waiting requests: new locks plus pending conversions.
    pub fn waiting_count(&self) -> usize {
        self.idx.waiting_requests
    }

    /// Open lockspaces (closed slots are not counted).
    pub fn lockspace_count(&self) -> usize {
        self.idx.lockspace_ids.len()
    }

    /// The fencing token of the latest grant (0 before any).
    pub fn last_token(&self) -> u64 {
        self.core.last_token
    }

    pub fn session_node(&self, s: SessionId) -> Option<&str> {
        self.core.sessions.get(&s).map(|s| s.node.as_str())
    }

    pub fn session_of_node(&self, node: &str) -> Option<SessionId> {
        self.idx.node_sessions.get(node).copied()
    }

    /// The ids of every lock `session` owns, granted or waiting, ascending.
    pub fn locks_of_session(&self, session: SessionId) -> Vec<LockId> {
        self.owned_lock_ids(session)
    }

    /// The locks `session` owns, granted or waiting, ascending: a scan of the table
    /// (logout, fencing and queries only), skipped when the session owns none.
    pub(super) fn owned_lock_ids(&self, session: SessionId) -> Vec<LockId> {
        if self
            .core
            .sessions
            .get(&session)
            .is_none_or(|s| s.lock_count == 0)
        {
            return Vec::new();
        }
        self.core
            .locks
            .iter()
            .filter(|(_, lock)| lock.owner == session)
            .map(|(&id, _)| id)
            .collect()
    }

    pub fn lock_view(&self, lock_id: LockId) -> Option<LockView> {
        let lock = self.core.locks.get(&lock_id)?;
        let resource = self.resource(lock.res);
        Some(LockView {
            lock_id,
            session: lock.owner,
            lockspace: self.core.lockspaces[resource.ls as usize].name.clone(),
            resource: resource.name.to_vec(),
            granted: lock.granted,
            requested: lock.pending.as_ref().map(|p| p.mode),
            token: lock.token,
            expired: lock.expired,
        })
    }

    /// Up to `limit` resources (lockspace name, resource name), in id order, of one
    /// lockspace or of all; and whether more matched.
    pub fn resource_names(
        &self,
        lockspace: Option<&str>,
        limit: usize,
    ) -> (Vec<(String, Vec<u8>)>, bool) {
        let ls = match lockspace {
            Some(name) => match self.idx.lockspace_ids.get(name) {
                Some(ls) => Some(*ls),
                None => return (Vec::new(), false),
            },
            None => None,
        };
        let mut matching = self
            .core
            .resources
            .values()
            .filter(|r| ls.is_none_or(|ls| r.ls == ls))
            .map(|r| {
                (
                    self.core.lockspaces[r.ls as usize].name.clone(),
                    r.name.to_vec(),
                )
            });
        let names: Vec<_> = matching.by_ref().take(limit).collect();
        let more = matching.next().is_some();
        (names, more)
    }

    pub fn resource_view(&self, lockspace: &str, resource: &[u8]) -> Option<ResourceView> {
        let res = self.find_resource(lockspace, resource)?;
        let resource = self.resource(res);
        let (converting, waiting) = match &resource.queues {
            Some(q) => (
                q.converting.iter().copied().collect(),
                q.waiting.iter().copied().collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        Some(ResourceView {
            holders: resource.holders.iter().collect(),
            converting,
            waiting,
            lvb: self.lvb_bytes(res),
            lvb_invalid: resource.lvb_invalid,
        })
    }
}
