//! The records the lock table stores, exactly as a snapshot holds them: sessions,
//! lockspaces, resources with their three queues, locks and their pending requests.
//! Every collection whose order can matter is ordered (BTreeMap, VecDeque in FIFO
//! order), so a snapshot's bytes depend only on the entries applied. Indexes that can
//! be derived from these records are not stored here; `table` rebuilds them.
//!
//! Kept small on purpose (BRIEF §4.1 W4: under 200 bytes per held lock): a lock refers
//! to its resource by id and a resource to its lockspace by a small integer.

use super::command::{Flags, LockId, NodeState, RecoveryMode, Reply, RequestId, SessionId};
use super::mode::{Mode, ModeCounts};
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// A lockspace's position in `Core::lockspaces`.
pub(super) type LsId = u32;
/// A resource; the Raft index of the Lock entry that created it.
pub(super) type ResId = u64;

/// Everything a snapshot holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Core {
    /// The last entry that changed the table; ids are entry indexes, so a later entry
    /// must have a larger one.
    pub(super) last_index: u64,
    /// The fencing token of the latest grant.
    pub(super) last_token: u64,
    pub(super) sessions: BTreeMap<SessionId, Session>,
    pub(super) lockspaces: Vec<Lockspace>,
    pub(super) resources: IdMap<Resource>,
    pub(super) locks: IdMap<Lock>,
    /// Fences under way or done, by session.
    pub(super) fences: BTreeMap<SessionId, FenceProgress>,
    /// What happened, oldest first, bounded by MAX_FENCE_HISTORY.
    pub(super) fence_history: VecDeque<FenceRecord>,
}

/// Where a node's fence stands; replicated so a new leader resumes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceProgress {
    /// Index of the level to run next.
    pub next_level_index: u32,
    /// Rounds in which every level failed.
    pub failed_rounds: u32,
}

/// One line of `lockctl fence history`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    pub at_ms: u64,
    pub node: String,
    pub session: SessionId,
    pub what: FenceStep,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FenceStep {
    Started,
    Attempt {
        level: u32,
        ok: bool,
        detail: String,
    },
    /// Fenced, by an agent level or an operator's acknowledgement.
    Done {
        by: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Session {
    pub(super) node: String,
    /// The Login nonce: a Login retry with it gets this session back.
    pub(super) nonce: u64,
    pub(super) opened: BTreeSet<LsId>,
    /// How many locks this session owns, granted or waiting (derived, rebuilt on
    /// decode). The locks themselves are found by their `owner`: a per-session set
    /// would cost ~20 bytes per lock for the rare logout and fence.
    #[serde(skip)]
    pub(super) lock_count: usize,
    /// The client has its answer for every request below this id (or the record was
    /// evicted): a new request below it is stale.
    pub(super) acked_below: RequestId,
    /// Requests still waiting, and the lock each waits with.
    pub(super) pending: BTreeMap<RequestId, LockId>,
    /// Finished requests and the reply a retry gets.
    pub(super) done: BTreeMap<RequestId, Reply>,
    pub(super) state: NodeState,
    /// When the session was expired (the entry's `now_ms`), 0 while it is not.
    pub(super) expired_at_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lockspace {
    pub(super) name: String,
    pub(super) lvb_len_bytes: u32,
    pub(super) recovery: RecoveryMode,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Resource {
    pub(super) ls: LsId,
    /// Shared with the name index, so a name is stored once.
    #[serde(with = "shared_bytes")]
    pub(super) name: Arc<[u8]>,
    /// `None` while the LVB is all zeros (as it is created), saving the allocation.
    pub(super) lvb: Option<Box<[u8]>>,
    pub(super) lvb_invalid: bool,
    /// Granted locks, in grant order.
    pub(super) holders: Vec<LockId>,
    /// `None` while nobody waits, which is most resources most of the time.
    pub(super) queues: Option<Box<Queues>>,
}

impl Resource {
    pub(super) fn waiter_count(&self) -> usize {
        self.queues
            .as_ref()
            .map_or(0, |q| q.converting.len() + q.waiting.len())
    }

    pub(super) fn lock_count(&self) -> usize {
        self.holders.len() + self.queues.as_ref().map_or(0, |q| q.waiting.len())
    }

    pub(super) fn is_unused(&self) -> bool {
        self.holders.is_empty() && self.waiter_count() == 0
    }
}

/// The two FIFO queues of a resource, with the number of requests of each mode in
/// them (derived, rebuilt on decode).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Queues {
    /// Granted locks waiting to change mode.
    pub(super) converting: VecDeque<LockId>,
    /// New locks waiting for their first grant.
    pub(super) waiting: VecDeque<LockId>,
    #[serde(skip)]
    pub(super) convert_modes: ModeCounts,
    #[serde(skip)]
    pub(super) wait_modes: ModeCounts,
}

impl Queues {
    pub(super) fn push(&mut self, lock_id: LockId, mode: Mode, conversion: bool, front: bool) {
        let (queue, counts) = if conversion {
            (&mut self.converting, &mut self.convert_modes)
        } else {
            (&mut self.waiting, &mut self.wait_modes)
        };
        if front {
            queue.push_front(lock_id);
        } else {
            queue.push_back(lock_id);
        }
        counts.add(mode);
    }

    pub(super) fn remove(&mut self, lock_id: LockId, mode: Mode, conversion: bool) {
        let (queue, counts) = if conversion {
            (&mut self.converting, &mut self.convert_modes)
        } else {
            (&mut self.waiting, &mut self.wait_modes)
        };
        let position = queue.iter().position(|&id| id == lock_id);
        debug_assert!(position.is_some(), "lock {lock_id} is not queued");
        if let Some(position) = position {
            queue.remove(position);
            counts.remove(mode);
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Lock {
    pub(super) owner: SessionId,
    pub(super) res: ResId,
    /// `None` until first granted.
    pub(super) granted: Option<Mode>,
    /// The token of the latest grant (0 before the first).
    pub(super) token: u64,
    /// Requested modes this holder has had a blocking callback about since its mode
    /// was last granted (a 6-bit set, see `Mode::bit`).
    pub(super) notified: u8,
    /// A PW/EX lock of a failed session: still blocks everything except `noexp`.
    pub(super) expired: bool,
    /// The waiting Lock (when `granted` is `None`) or Convert request.
    pub(super) pending: Option<Box<Pending>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Pending {
    pub(super) request_id: RequestId,
    pub(super) mode: Mode,
    pub(super) flags: Flags,
    pub(super) deadline_ms: Option<u64>,
    /// A down-conversion's LVB, written when the conversion is granted.
    pub(super) lvb: Option<Box<[u8]>>,
}

/// Serde for `Arc<[u8]>` (serde's `rc` feature is not enabled): a plain byte sequence.
mod shared_bytes {
    use super::*;

    pub(super) fn serialize<S: Serializer>(bytes: &Arc<[u8]>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(bytes.iter())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Arc<[u8]>, D::Error> {
        Ok(Vec::<u8>::deserialize(d)?.into())
    }
}

/// The records of locks or resources by id. Ids are Raft indexes of the entries that
/// created them, so a new id is always above every id in the table: records sit in a
/// vector sorted by id, an insert is a push, a lookup a binary search, and iteration
/// is in id order (which keeps snapshots and event order deterministic). A removed
/// record leaves a tombstone until the tombstones outnumber the records; trailing
/// ones go at once (a lock taken and released at the top costs nothing). About the
/// record's own size per entry, where a BTreeMap costs nearly twice that.
#[derive(Clone, Debug)]
pub(super) struct IdMap<T> {
    /// Sorted by id, ids unique; `None` is a tombstone.
    entries: Vec<(u64, Option<T>)>,
    /// Entries that are not tombstones.
    live: usize,
}

impl<T> Default for IdMap<T> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            live: 0,
        }
    }
}

impl<T> IdMap<T> {
    /// Tombstones tolerated before a compaction, whatever the number of records.
    const MIN_TOMBSTONES: usize = 64;

    fn position(&self, id: u64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&id, |&(id, _)| id)
    }

    pub(super) fn len(&self) -> usize {
        self.live
    }

    pub(super) fn get(&self, id: &u64) -> Option<&T> {
        let i = self.position(*id).ok()?;
        self.entries[i].1.as_ref()
    }

    pub(super) fn get_mut(&mut self, id: &u64) -> Option<&mut T> {
        let i = self.position(*id).ok()?;
        self.entries[i].1.as_mut()
    }

    pub(super) fn contains_key(&self, id: &u64) -> bool {
        self.get(id).is_some()
    }

    /// Inserts or replaces; returns the record it replaced. An id below the largest
    /// one is placed correctly too, at the cost of a shift (the table never does that).
    pub(super) fn insert(&mut self, id: u64, value: T) -> Option<T> {
        if self.entries.last().is_none_or(|&(last, _)| last < id) {
            self.entries.push((id, Some(value)));
            self.live += 1;
            return None;
        }
        match self.position(id) {
            Ok(i) => {
                let previous = self.entries[i].1.replace(value);
                if previous.is_none() {
                    self.live += 1;
                }
                previous
            }
            Err(i) => {
                self.entries.insert(i, (id, Some(value)));
                self.live += 1;
                None
            }
        }
    }

    pub(super) fn remove(&mut self, id: &u64) -> Option<T> {
        let i = self.position(*id).ok()?;
        let removed = self.entries[i].1.take()?;
        self.live -= 1;
        while self.entries.last().is_some_and(|(_, v)| v.is_none()) {
            self.entries.pop();
        }
        let tombstones = self.entries.len() - self.live;
        if tombstones > Self::MIN_TOMBSTONES && tombstones > self.live {
            self.entries.retain(|(_, v)| v.is_some());
            if self.entries.capacity() > 4 * self.entries.len().max(Self::MIN_TOMBSTONES) {
                self.entries.shrink_to(2 * self.entries.len());
            }
        }
        Some(removed)
    }

    /// Records in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&u64, &T)> {
        self.entries
            .iter()
            .filter_map(|(id, v)| v.as_ref().map(|v| (id, v)))
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&u64, &mut T)> {
        self.entries
            .iter_mut()
            .filter_map(|(id, v)| v.as_mut().map(|v| (&*id, v)))
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &T> {
        self.iter().map(|(_, v)| v)
    }
}

/// As a map in id order: the bytes a BTreeMap of the same records would give.
impl<T: Serialize> Serialize for IdMap<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.live))?;
        for (id, value) in self.iter() {
            map.serialize_entry(id, value)?;
        }
        map.end()
    }
}

/// Refuses ids that are not strictly increasing (a BTreeMap would have sorted or
/// merged them; a snapshot this table wrote never has them).
impl<'de, T: Deserialize<'de>> Deserialize<'de> for IdMap<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct IdMapVisitor<T>(std::marker::PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for IdMapVisitor<T> {
            type Value = IdMap<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("records by strictly increasing id")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<IdMap<T>, A::Error> {
                // The length comes from the snapshot: trust it only up to a bound.
                let hint = map.size_hint().unwrap_or(0).min(1 << 16);
                let mut entries: Vec<(u64, Option<T>)> = Vec::with_capacity(hint);
                while let Some((id, value)) = map.next_entry::<u64, T>()? {
                    if entries.last().is_some_and(|&(last, _)| last >= id) {
                        return Err(serde::de::Error::custom(format!(
                            "record id {id} is not above the one before it"
                        )));
                    }
                    entries.push((id, Some(value)));
                }
                let live = entries.len();
                Ok(IdMap { entries, live })
            }
        }

        d.deserialize_map(IdMapVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod id_map_tests {
    use super::IdMap;

    fn ids(map: &IdMap<u32>) -> Vec<u64> {
        map.iter().map(|(&id, _)| id).collect()
    }

    #[test]
    fn finds_replaces_and_removes_by_id_in_id_order() {
        let mut map = IdMap::default();
        for id in [3, 5, 9] {
            assert_eq!(map.insert(id, id as u32), None);
        }
        assert_eq!(
            map.insert(4, 40),
            None,
            "an id below the largest still goes in"
        );
        assert_eq!(map.insert(5, 50), Some(5));
        assert_eq!(ids(&map), [3, 4, 5, 9]);
        assert_eq!(map.get(&5), Some(&50));
        assert_eq!(map.remove(&4), Some(40));
        assert_eq!(map.remove(&4), None);
        assert_eq!(map.get(&4), None);
        assert!(!map.contains_key(&4));
        assert_eq!(map.insert(4, 41), None, "a tombstone comes back to life");
        assert_eq!((map.len(), ids(&map)), (4, vec![3, 4, 5, 9]));
    }

    #[test]
    fn tombstones_are_compacted_and_trailing_ones_dropped() {
        let mut map = IdMap::default();
        for id in 1..=1_000 {
            map.insert(id, 0);
        }
        for id in 1..=900 {
            map.remove(&id);
        }
        assert_eq!(map.len(), 100);
        assert!(map.entries.len() < 2 * 100 + IdMap::<u32>::MIN_TOMBSTONES);
        for id in (901..=1_000).rev() {
            map.remove(&id);
        }
        assert_eq!((map.len(), map.entries.len()), (0, 0));
        map.insert(7, 1);
        assert_eq!(ids(&map), [7]);
    }

    #[test]
    fn round_trips_as_a_map_and_refuses_unordered_ids() {
        let mut map = IdMap::default();
        map.insert(2, 20u32);
        map.insert(8, 80);
        map.insert(9, 90);
        map.remove(&8);
        let bytes = postcard::to_allocvec(&map).unwrap();
        let same: std::collections::BTreeMap<u64, u32> = [(2, 20), (9, 90)].into();
        assert_eq!(bytes, postcard::to_allocvec(&same).unwrap());
        let back: IdMap<u32> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(ids(&back), [2, 9]);

        for unordered in [vec![(9u64, 1u32), (2, 1)], vec![(2, 1), (2, 1)]] {
            let mut bytes = vec![unordered.len() as u8];
            for (id, v) in unordered {
                bytes.extend(postcard::to_allocvec(&(id, v)).unwrap());
            }
            assert!(postcard::from_bytes::<IdMap<u32>>(&bytes).is_err());
        }
    }
}
