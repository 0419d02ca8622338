//! The lock table's snapshot: postcard bytes of the stored records, and the decode
//! that rebuilds the derived indexes while checking every cross-reference, so a
//! corrupt snapshot is refused here instead of breaking the table later.

use super::command::{LockId, NodeState, SessionId};
use super::limits::*;
use super::mode::{Mode, ModeCounts};
use super::model::{Core, Departure, LsId, ResId};
use super::table::{check_name, lvb_len_for, show, Index, State};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;

impl State {
    // ---- snapshots ----

    /// The snapshot: postcard bytes of the stored records. Deterministic: replicas that
    /// applied the same entries produce identical bytes.
    ///
    /// Layout: the `Core` records, then the departures (`Core::departed`). The one
    /// allowance of the format: a snapshot that ends right after the core was written
    /// before departures were recorded, and decodes with none.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(&(&self.core, &self.core.departed))
            .expect("postcard encodes every lock table")
    }

    /// Reads a snapshot, checking that its records are consistent with each other, so a
    /// corrupt snapshot is refused here instead of breaking the table later.
    pub fn decode(bytes: &[u8]) -> Result<State, String> {
        let (mut core, mut rest): (Core, &[u8]) = postcard::take_from_bytes(bytes)
            .map_err(|e| format!("undecodable lock table snapshot: {e}"))?;
        if !rest.is_empty() {
            (core.departed, rest) = postcard::take_from_bytes(rest)
                .map_err(|e| format!("undecodable departures in lock table snapshot: {e}"))?;
        }
        if !rest.is_empty() {
            return Err(format!(
                "lock table snapshot has {} trailing bytes",
                rest.len()
            ));
        }
        State::from_core(core)
    }

    /// Rebuilds the derived indexes from `core`, checking every cross-reference.
    pub(super) fn from_core(mut core: Core) -> Result<State, String> {
        let mut idx = Index::default();
        let bad = |what: String| Err(format!("inconsistent lock table snapshot: {what}"));

        if core.lockspaces.len() > MAX_LOCKSPACES {
            return bad(format!("{} lockspaces", core.lockspaces.len()));
        }
        for (ls, lockspace) in core.lockspaces.iter().enumerate() {
            idx.resource_ids.push(BTreeSet::new());
            if lockspace.name.is_empty() {
                continue; // a closed slot
            }
            if check_name("", lockspace.name.as_bytes()).is_err()
                || lvb_len_for(lockspace.lvb_len_bytes) != Ok(lockspace.lvb_len_bytes)
                || idx
                    .lockspace_ids
                    .insert(lockspace.name.clone(), ls as LsId)
                    .is_some()
            {
                return bad(format!("lockspace {ls} ('{}')", lockspace.name));
            }
        }
        let is_open = |ls: LsId| {
            core.lockspaces
                .get(ls as usize)
                .is_some_and(|l| !l.name.is_empty())
        };

        for (&sid, s) in &core.sessions {
            let unfencing = s.state == NodeState::Unfencing;
            if sid == 0
                || sid > core.last_index
                || check_name("", s.node.as_bytes()).is_err()
                // It may not act, so it has done nothing yet.
                || (unfencing
                    && !(s.opened.is_empty() && s.pending.is_empty() && s.done.is_empty()))
                || (s.state != NodeState::Fenced
                    && idx.node_sessions.insert(s.node.clone(), sid).is_some())
                || s.opened.iter().any(|&ls| !is_open(ls))
                || s.pending.keys().any(|id| s.done.contains_key(id))
                || s.done.len() > MAX_REQUEST_RECORDS_PER_SESSION
            {
                return bad(format!("session {sid} (node '{}')", s.node));
            }
        }
        if core.sessions.len() > MAX_SESSIONS {
            return bad(format!("{} sessions", core.sessions.len()));
        }
        if core.departed.len() > MAX_DEPARTURES {
            return bad(format!("{} departures", core.departed.len()));
        }
        for node in core.departed.keys() {
            // A node with a session has not departed.
            if check_name("", node.as_bytes()).is_err() || idx.node_sessions.contains_key(node) {
                return bad(format!("departure of node '{node}'"));
            }
        }

        // Where each lock appears: its resource and the lists it is in.
        const HOLDER: u8 = 1;
        const CONVERTING: u8 = 2;
        const WAITING: u8 = 4;
        let mut places: HashMap<LockId, (ResId, u8)> = HashMap::with_capacity(core.locks.len());
        let mut place = |lock_id: LockId, res: ResId, list: u8| -> bool {
            let entry = places.entry(lock_id).or_insert((res, 0));
            let fresh = entry.0 == res && entry.1 & list == 0;
            entry.1 |= list;
            fresh
        };
        for (&res, lvb) in &core.lvbs {
            let lvb_len = core
                .resources
                .get(&res)
                .and_then(|r| core.lockspaces.get(r.ls as usize))
                .map(|ls| ls.lvb_len_bytes as usize);
            if lvb_len != Some(lvb.len()) {
                return bad(format!("LVB of resource {res}"));
            }
        }
        for (&res, resource) in core.resources.iter() {
            let names = match idx.resource_ids.get_mut(resource.ls as usize) {
                Some(names) if is_open(resource.ls) => names,
                _ => return bad(format!("resource {res} in lockspace {}", resource.ls)),
            };
            let hash = idx.name_hasher.hash_one(&*resource.name);
            let twin = names
                .range((hash, 0)..=(hash, ResId::MAX))
                .any(|(_, other)| {
                    core.resources
                        .get(other)
                        .is_some_and(|r| r.name == resource.name)
                });
            if twin || !names.insert((hash, res)) {
                return bad(format!("resource {res} ('{}')", show(&resource.name)));
            }
        }
        let mut resources = core.resources;
        for (&res, resource) in resources.iter_mut() {
            if res == 0
                || res > core.last_index
                || check_name("", &resource.name).is_err()
                || resource.is_unused()
                || resource
                    .queues
                    .as_ref()
                    .is_some_and(|q| q.converting.is_empty() && q.waiting.is_empty())
            {
                return bad(format!("resource {res} ('{}')", show(&resource.name)));
            }
            for holder in resource.holders.iter() {
                if !place(holder, res, HOLDER) {
                    return bad(format!("holder {holder} of resource {res}"));
                }
            }
            if let Some(q) = resource.queues.as_mut() {
                let mut convert_modes = ModeCounts::default();
                let mut wait_modes = ModeCounts::default();
                for (list, queue, counts) in [
                    (CONVERTING, &q.converting, &mut convert_modes),
                    (WAITING, &q.waiting, &mut wait_modes),
                ] {
                    for &lock_id in queue {
                        let mode = core
                            .locks
                            .get(&lock_id)
                            .and_then(|lock| lock.pending.as_ref())
                            .map(|pending| pending.mode);
                        match mode {
                            Some(mode) if place(lock_id, res, list) => counts.add(mode),
                            _ => return bad(format!("queued lock {lock_id} of resource {res}")),
                        }
                    }
                }
                q.convert_modes = convert_modes;
                q.wait_modes = wait_modes;
            }
        }

        let mut owned: BTreeMap<SessionId, usize> = BTreeMap::new();
        for (&lock_id, lock) in core.locks.iter() {
            let expected = match (lock.granted, &lock.pending) {
                (Some(_), None) => HOLDER,
                (Some(_), Some(_)) => HOLDER | CONVERTING,
                (None, Some(_)) => WAITING,
                (None, None) => 0,
            };
            let owner = core.sessions.get(&lock.owner);
            let lvb_len = resources
                .get(&lock.res)
                .map(|r| core.lockspaces[r.ls as usize].lvb_len_bytes as usize);
            let pending_ok = lock.pending.iter().all(|p| {
                owner.and_then(|s| s.pending.get(&p.request_id)) == Some(&lock_id)
                    && p.lvb.iter().all(|lvb| Some(lvb.len()) == lvb_len)
            });
            if lock_id == 0
                || lock_id > core.last_index
                || places.get(&lock_id) != Some(&(lock.res, expected))
                || owner.is_none_or(|s| s.state == NodeState::Unfencing)
                || lock.token > core.last_token
                || (lock.granted.is_some() != (lock.token > 0))
                || lock.notified >= 1 << Mode::ALL.len()
                || (lock.expired
                    && (lock.pending.is_some()
                        || !matches!(lock.granted, Some(Mode::Pw | Mode::Ex))))
                || !pending_ok
            {
                return bad(format!("lock {lock_id}"));
            }
            *owned.entry(lock.owner).or_default() += 1;
            if lock.granted.is_some() {
                idx.held_locks += 1;
            }
            if let Some(pending) = &lock.pending {
                idx.waiting_requests += 1;
                if let Some(deadline_ms) = pending.deadline_ms {
                    idx.deadlines.insert((deadline_ms, lock_id));
                }
            }
        }
        let pending: usize = core.sessions.values().map(|s| s.pending.len()).sum();
        if places.len() != core.locks.len() || pending != idx.waiting_requests {
            return bad("a lock is listed but does not exist".to_string());
        }
        for (sid, count) in owned {
            if count > MAX_LOCKS_PER_SESSION {
                return bad(format!("session {sid} owns {count} locks"));
            }
            if let Some(s) = core.sessions.get_mut(&sid) {
                s.lock_count = count;
            }
        }

        Ok(State {
            core: Core { resources, ..core },
            idx,
        })
    }
}

/// As `encode` lays it out: the core, then the departures.
impl Serialize for State {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.core, &self.core.departed).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for State {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (mut core, departed) =
            <(Core, BTreeMap<String, Departure>)>::deserialize(deserializer)?;
        core.departed = departed;
        State::from_core(core).map_err(serde::de::Error::custom)
    }
}
