//! The lock table's snapshot: postcard bytes of the stored records, and the decode
//! that rebuilds the derived indexes while checking every cross-reference, so a
//! corrupt snapshot is refused here instead of breaking the table later.

use super::command::{LockId, NodeState, SessionId};
use super::limits::*;
use super::mode::{Mode, ModeCounts};
use super::model::{Core, Departure, IdMap, Lock, LsId, ResId, Resource};
use super::table::{check_name, lvb_len_for, show, Index, State};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::Arc;

impl State {
    // ---- snapshots ----

    /// The snapshot: postcard bytes of the stored records. Deterministic: replicas that
    /// applied the same entries produce identical bytes.
    ///
    /// Layout: the `Core` records, then the departures (`Core::departed`), then, in a
    /// snapshot taken with ids ahead of its entry index, [`IDS_AHEAD_OF_LOG`] (see
    /// [`Frozen::encode_at`]; this function never writes it). The one allowance of the
    /// format: a snapshot that ends right after the core was written before departures
    /// were recorded, and decodes with none.
    pub fn encode(&self) -> Vec<u8> {
        encode_core(&self.core)
    }

    /// A copy of the stored records as of now, for a snapshot encoded on another
    /// thread. It shares the large maps (locks, resources, LVBs, sessions) with the
    /// table instead of copying them, so it costs the Raft thread O(sessions +
    /// records / 256) pointer copies; the table then copies a shared chunk or session
    /// the first time it changes it (see `IdMap`).
    pub fn freeze(&self) -> Frozen {
        Frozen(self.core.clone())
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
        if !matches!(rest, [] | [IDS_AHEAD_OF_LOG]) {
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
        index_lockspaces(&core, &mut idx)?;
        index_sessions(&core, &mut idx)?;
        check_departures(&core, &idx)?;
        check_lvbs(&core)?;
        index_resource_names(&core, &mut idx)?;
        let mut places = Places::default();
        let mut resources = core.resources;
        place_resource_lists(&mut resources, &core.locks, core.last_id, &mut places)?;
        core.resources = resources;
        let owned = index_locks(&core, &places, &mut idx)?;
        let pending: usize = core.sessions.values().map(|s| s.pending.len()).sum();
        if places.0.len() != core.locks.len() || pending != idx.waiting_requests {
            return bad("a lock is listed but does not exist".to_string());
        }
        for (sid, count) in owned {
            if count > MAX_LOCKS_PER_SESSION {
                return bad(format!("session {sid} owns {count} locks"));
            }
            if let Some(s) = core.sessions.get_mut(&sid) {
                Arc::make_mut(s).lock_count = count;
            }
        }
        Ok(State { core, idx })
    }
}

/// The lock table's stored records as of one applied entry (`State::freeze`),
/// `Send`, encoded into the same bytes `State::encode` gave at that entry.
#[derive(Clone, Debug)]
pub struct Frozen(pub(super) Core);

impl Frozen {
    pub fn encode(&self) -> Vec<u8> {
        encode_core(&self.0)
    }

    /// The bytes of a snapshot taken at entry `index`: [`Self::encode`], and
    /// [`IDS_AHEAD_OF_LOG`] after them when the last id issued is above `index`.
    pub fn encode_at(&self, index: u64) -> Vec<u8> {
        let mut bytes = self.encode();
        if self.0.last_id > index {
            bytes.push(IDS_AHEAD_OF_LOG);
        }
        bytes
    }
}

/// Ends a snapshot whose last id is above the entry index it was taken at, which
/// only entries of several commands (log format 2) bring about. Builds from before
/// those entries read the last id as the last applied entry index, and would refuse
/// every command of the entries up to it after installing such a snapshot — a replica
/// silently apart from the others. They refuse bytes after the departures ("trailing
/// bytes"), so this byte makes them refuse the snapshot and stop instead. This build
/// reads it and nothing else there.
pub(super) const IDS_AHEAD_OF_LOG: u8 = 2;

fn encode_core(core: &Core) -> Vec<u8> {
    postcard::to_allocvec(&(core, &core.departed)).expect("postcard encodes every lock table")
}

fn bad<T>(what: String) -> Result<T, String> {
    Err(format!("inconsistent lock table snapshot: {what}"))
}

fn is_open(core: &Core, ls: LsId) -> bool {
    core.lockspaces
        .get(ls as usize)
        .is_some_and(|l| !l.name.is_empty())
}

/// Lockspace names are valid and unique, their LVB lengths allowed; one (possibly
/// empty) resource-name index per slot, closed slots included.
fn index_lockspaces(core: &Core, idx: &mut Index) -> Result<(), String> {
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
    Ok(())
}

/// One session a node (Fenced ones aside), ids the log could have made, open
/// lockspaces only, request records within bounds.
fn index_sessions(core: &Core, idx: &mut Index) -> Result<(), String> {
    for (&sid, s) in &core.sessions {
        let unfencing = s.state == NodeState::Unfencing;
        if sid == 0
            || sid > core.last_id
            || check_name("", s.node.as_bytes()).is_err()
            // It may not act, so it has done nothing yet.
            || (unfencing
                && !(s.opened.is_empty() && s.pending.is_empty() && s.done.is_empty()))
            || (s.state != NodeState::Fenced
                && idx.node_sessions.insert(s.node.clone(), sid).is_some())
            || s.opened.iter().any(|&ls| !is_open(core, ls))
            || s.pending.keys().any(|id| s.done.contains_key(id))
            || s.done.len() > MAX_REQUEST_RECORDS_PER_SESSION
        {
            return bad(format!("session {sid} (node '{}')", s.node));
        }
    }
    if core.sessions.len() > MAX_SESSIONS {
        return bad(format!("{} sessions", core.sessions.len()));
    }
    Ok(())
}

/// Bounded, and a node with a session has not departed.
fn check_departures(core: &Core, idx: &Index) -> Result<(), String> {
    if core.departed.len() > MAX_DEPARTURES {
        return bad(format!("{} departures", core.departed.len()));
    }
    for node in core.departed.keys() {
        if check_name("", node.as_bytes()).is_err() || idx.node_sessions.contains_key(node) {
            return bad(format!("departure of node '{node}'"));
        }
    }
    Ok(())
}

/// Every stored LVB belongs to a resource and has its lockspace's length.
fn check_lvbs(core: &Core) -> Result<(), String> {
    for (&res, lvb) in core.lvbs.iter() {
        let lvb_len = core
            .resources
            .get(&res)
            .and_then(|r| core.lockspaces.get(r.ls as usize))
            .map(|ls| ls.lvb_len_bytes as usize);
        if lvb_len != Some(lvb.len()) {
            return bad(format!("LVB of resource {res}"));
        }
    }
    Ok(())
}

/// Every resource is in an open lockspace, under a name no other resource there has.
fn index_resource_names(core: &Core, idx: &mut Index) -> Result<(), String> {
    for (&res, resource) in core.resources.iter() {
        let names = match idx.resource_ids.get_mut(resource.ls as usize) {
            Some(names) if is_open(core, resource.ls) => names,
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
    Ok(())
}

const HOLDER: u8 = 1;
const CONVERTING: u8 = 2;
const WAITING: u8 = 4;

/// Where each lock appears: its resource and the lists it is in.
#[derive(Default)]
struct Places(HashMap<LockId, (ResId, u8)>);

impl Places {
    /// Records that `lock_id` is in `list` of `res`; false if it is already there or
    /// in a list of another resource.
    fn place(&mut self, lock_id: LockId, res: ResId, list: u8) -> bool {
        let entry = self.0.entry(lock_id).or_insert((res, 0));
        let fresh = entry.0 == res && entry.1 & list == 0;
        entry.1 |= list;
        fresh
    }
}

/// Each resource is valid and in use; its holders and queued locks are placed, and
/// its queues' mode counts rebuilt from the queued requests.
fn place_resource_lists(
    resources: &mut IdMap<Resource>,
    locks: &IdMap<Lock>,
    last_id: u64,
    places: &mut Places,
) -> Result<(), String> {
    for (&res, resource) in resources.iter_mut() {
        if res == 0
            || res > last_id
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
            if !places.place(holder, res, HOLDER) {
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
                    let mode = locks
                        .get(&lock_id)
                        .and_then(|lock| lock.pending.as_ref())
                        .map(|pending| pending.mode);
                    match mode {
                        Some(mode) if places.place(lock_id, res, list) => counts.add(mode),
                        _ => return bad(format!("queued lock {lock_id} of resource {res}")),
                    }
                }
            }
            q.convert_modes = convert_modes;
            q.wait_modes = wait_modes;
        }
    }
    Ok(())
}

/// Each lock is exactly where its state puts it, owned by a session that may own
/// locks, with a consistent token and request; counts and deadlines indexed. Returns
/// how many locks each session owns.
fn index_locks(
    core: &Core,
    places: &Places,
    idx: &mut Index,
) -> Result<BTreeMap<SessionId, usize>, String> {
    let mut owned: BTreeMap<SessionId, usize> = BTreeMap::new();
    for (&lock_id, lock) in core.locks.iter() {
        let expected = match (lock.granted, &lock.pending) {
            (Some(_), None) => HOLDER,
            (Some(_), Some(_)) => HOLDER | CONVERTING,
            (None, Some(_)) => WAITING,
            (None, None) => 0,
        };
        let owner = core.sessions.get(&lock.owner);
        let lvb_len = core
            .resources
            .get(&lock.res)
            .map(|r| core.lockspaces[r.ls as usize].lvb_len_bytes as usize);
        let pending_ok = lock.pending.iter().all(|p| {
            owner.and_then(|s| s.pending.get(&p.request_id)) == Some(&lock_id)
                && p.lvb.iter().all(|lvb| Some(lvb.len()) == lvb_len)
        });
        if lock_id == 0
            || lock_id > core.last_id
            || places.0.get(&lock_id) != Some(&(lock.res, expected))
            || owner.is_none_or(|s| s.state == NodeState::Unfencing)
            || lock.token > core.last_token
            || (lock.granted.is_some() != (lock.token > 0))
            || lock.notified >= 1 << Mode::ALL.len()
            || (lock.expired
                && (lock.pending.is_some() || !matches!(lock.granted, Some(Mode::Pw | Mode::Ex))))
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
    Ok(owned)
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
