//! The records the lock table stores, exactly as a snapshot holds them: sessions,
//! lockspaces, resources with their three queues, locks and their pending requests.
//! Every collection whose order can matter is ordered (BTreeMap, `IdMap` in id order,
//! VecDeque in FIFO order), so a snapshot's bytes depend only on the entries applied.
//! Indexes that can be derived from these records are not stored here; `table`
//! rebuilds them.
//!
//! Kept small on purpose (BRIEF §4.1 W4: under 200 bytes per held lock): locks,
//! resources and LVBs sit in id-sorted chunked vectors (`IdMap`) rather than B-trees;
//! a lock refers to its resource by id and a resource to its lockspace by a small
//! integer; a resource
//! keeps its name inline and its first holder inline, allocates queues only while
//! somebody waits, and has an LVB entry only once a non-zero LVB is written. A held
//! lock on a resource of its own costs about 150 bytes, indexes included (see the
//! ignored test `memory_per_held_lock`).

use super::command::{Flags, LockId, NodeState, RecoveryMode, Reply, RequestId, SessionId};
use super::digest::Digest;
use super::mode::{Mode, ModeCounts};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

pub(super) use super::id_map::IdMap;

/// A lockspace's position in `Core::lockspaces`.
pub(super) type LsId = u32;
/// A resource; the id of the Lock command that created it (`State::id_base`).
pub(super) type ResId = u64;

/// Everything a snapshot holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub(super) struct Core {
    /// The last id issued: that of the last command that changed the table. Ids are
    /// issued in log order (`State::id_base`), so every later one is larger.
    pub(super) last_id: u64,
    /// The fencing token of the latest grant.
    pub(super) last_token: u64,
    /// Behind `Arc`s so that a frozen copy (`State::freeze`) shares them; a session is
    /// copied when it first changes after a freeze.
    pub(super) sessions: BTreeMap<SessionId, Arc<Session>>,
    pub(super) lockspaces: Vec<Lockspace>,
    pub(super) resources: IdMap<Resource>,
    pub(super) locks: IdMap<Lock>,
    /// The LVB of each resource whose LVB is not all zeros (as a resource's LVB starts
    /// out): most resources never have one written, so they pay nothing for it.
    pub(super) lvbs: IdMap<Box<[u8]>>,
    /// Fences under way or done, by session.
    pub(super) fences: BTreeMap<SessionId, FenceProgress>,
    /// What happened, oldest first, bounded by MAX_FENCE_HISTORY.
    pub(super) fence_history: VecDeque<FenceRecord>,
    /// How each node without a session left its last one (bounded by
    /// MAX_DEPARTURES), so `lockctl nodes` tells "logged out" from "never seen".
    /// Not part of `Core`'s own encoding: the snapshot appends it after the core
    /// (see `State::encode`), so snapshots written before it existed still decode.
    #[serde(skip)]
    pub(super) departed: BTreeMap<String, Departure>,
}

/// How a node's last session ended, kept while the node has no session (a new
/// session of the node drops it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    /// The entry's time (leader's clock, ms since the Unix epoch).
    pub at_ms: u64,
    pub how: DepartureKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DepartureKind {
    /// A clean logout.
    LoggedOut,
    /// Fenced (by an agent or an operator's ack), and its session is gone.
    Fenced,
    /// Its login's unfencing failed; the login with this nonce was refused (a retry
    /// of it gets the same refusal instead of a second unfencing).
    UnfenceFailed {
        nonce: u64,
        attempts: u32,
        detail: String,
    },
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
    /// A login of the node needs unfencing (`action=on`) before it is answered.
    UnfenceStarted,
    /// One run of the node's unfence devices (`action=on`).
    UnfenceAttempt {
        ok: bool,
        detail: String,
    },
    /// Unfencing failed `attempts` times: the session ended, the login was refused.
    UnfenceFailed {
        attempts: u32,
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
    /// Requests still waiting, and the lock each waits with. An `IdMap` (request ids
    /// rise) so that a session copied after a freeze shares its waiting requests,
    /// which can be millions, instead of copying them.
    pub(super) pending: IdMap<LockId>,
    /// Finished requests and the reply a retry gets.
    pub(super) done: BTreeMap<RequestId, Done>,
    pub(super) state: NodeState,
    /// When the session was expired (the entry's `now_ms`), 0 while it is not.
    pub(super) expired_at_ms: u64,
}

/// A finished request: what it asked for (its digest) and what it got.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Done {
    pub(super) digest: Digest,
    pub(super) reply: Reply,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Lockspace {
    /// Empty for a closed slot: a lockspace nobody had open and nothing was left in
    /// was closed, and its slot is reused by the next new lockspace.
    pub(super) name: String,
    pub(super) lvb_len_bytes: u32,
    pub(super) recovery: RecoveryMode,
}

/// 64 bytes when its name fits inline (see `Name`), with one holder and nobody waiting:
/// the common case allocates nothing besides this record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Resource {
    /// The only copy of the name: the name index holds hashes and ids.
    pub(super) name: Name,
    /// Granted locks, in grant order.
    pub(super) holders: Holders,
    /// `None` while nobody waits, which is most resources most of the time.
    pub(super) queues: Option<Box<Queues>>,
    pub(super) ls: LsId,
    pub(super) lvb_invalid: bool,
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
    /// What the request asked for: a retry of `request_id` must match it.
    pub(super) digest: Digest,
    pub(super) mode: Mode,
    pub(super) flags: Flags,
    pub(super) deadline_ms: Option<u64>,
    /// A down-conversion's LVB, written when the conversion is granted.
    pub(super) lvb: Option<Box<[u8]>>,
}

/// A resource name: inline up to `Name::INLINE_BYTES` (GFS's 24-byte names and lockd's
/// 12-byte ones fit), on the heap beyond. Encoded as a plain byte sequence.
#[derive(Clone, PartialEq, Eq)]
pub(super) enum Name {
    Inline {
        len: u8,
        bytes: [u8; Name::INLINE_BYTES],
    },
    Heap(Box<[u8]>),
}

impl Name {
    pub(super) const INLINE_BYTES: usize = 30;
}

impl From<&[u8]> for Name {
    fn from(name: &[u8]) -> Name {
        match u8::try_from(name.len()) {
            Ok(len) if name.len() <= Name::INLINE_BYTES => {
                let mut bytes = [0; Name::INLINE_BYTES];
                bytes[..name.len()].copy_from_slice(name);
                Name::Inline { len, bytes }
            }
            _ => Name::Heap(name.into()),
        }
    }
}

impl std::ops::Deref for Name {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Name::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Name::Heap(bytes) => bytes,
        }
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{}\"", self.escape_ascii())
    }
}

impl Serialize for Name {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Name {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Name, D::Error> {
        Ok(Name::from(Vec::<u8>::deserialize(d)?.as_slice()))
    }
}

/// A resource's granted locks in grant order: the first inline, the others in a
/// vector allocated only while there are two or more holders. Lock ids are Raft
/// indexes, never 0, so 0 marks "no holder". Encoded as a sequence of lock ids.
#[derive(Clone, Debug, Default)]
pub(super) struct Holders {
    first: LockId,
    /// Boxed on purpose: 8 bytes in every resource instead of a `Vec`'s 24, for the
    /// few resources with several holders.
    #[allow(clippy::box_collection)]
    rest: Option<Box<Vec<LockId>>>,
}

impl Holders {
    pub(super) fn len(&self) -> usize {
        usize::from(self.first != 0) + self.rest.as_ref().map_or(0, |rest| rest.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.first == 0
    }

    /// In grant order.
    pub(super) fn iter(&self) -> impl Iterator<Item = LockId> + '_ {
        std::iter::once(self.first)
            .filter(|&id| id != 0)
            .chain(self.rest.iter().flat_map(|rest| rest.iter().copied()))
    }

    pub(super) fn push(&mut self, lock_id: LockId) {
        debug_assert!(lock_id != 0, "lock ids are never 0");
        if self.first == 0 {
            self.first = lock_id;
        } else {
            self.rest.get_or_insert_with(Box::default).push(lock_id);
        }
    }

    /// Takes `lock_id` out, keeping the others' order; whether it was there.
    pub(super) fn remove(&mut self, lock_id: LockId) -> bool {
        if lock_id == 0 {
            return false;
        }
        if self.first == lock_id {
            self.first = match self.rest.as_mut() {
                Some(rest) if !rest.is_empty() => rest.remove(0),
                _ => 0,
            };
        } else {
            let Some(rest) = self.rest.as_mut() else {
                return false;
            };
            let Some(position) = rest.iter().position(|&id| id == lock_id) else {
                return false;
            };
            rest.remove(position);
        }
        if self.rest.as_ref().is_some_and(|rest| rest.is_empty()) {
            self.rest = None;
        }
        true
    }
}

impl Serialize for Holders {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.len()))?;
        for id in self.iter() {
            seq.serialize_element(&id)?;
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for Holders {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Holders, D::Error> {
        let ids = Vec::<LockId>::deserialize(d)?;
        if ids.contains(&0) {
            return Err(serde::de::Error::custom("holder lock id 0"));
        }
        let mut holders = Holders::default();
        for id in ids {
            holders.push(id);
        }
        Ok(holders)
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn common_records_stay_small() {
        // BRIEF §4.1 W4: under 200 bytes per held lock, every index included.
        assert!(std::mem::size_of::<Option<Resource>>() <= 64);
        assert!(std::mem::size_of::<Option<Lock>>() <= 40);
        assert!(std::mem::size_of::<Name>() <= 32);
    }

    #[test]
    fn names_keep_their_bytes_inline_or_not() {
        for len in [1, Name::INLINE_BYTES, Name::INLINE_BYTES + 1, 64] {
            let bytes: Vec<u8> = (0..len as u8).collect();
            let name = Name::from(bytes.as_slice());
            assert_eq!(&*name, bytes.as_slice());
            assert_eq!(
                matches!(name, Name::Inline { .. }),
                len <= Name::INLINE_BYTES
            );
            let encoded = postcard::to_allocvec(&name).unwrap();
            assert_eq!(encoded, postcard::to_allocvec(&bytes).unwrap());
            assert_eq!(postcard::from_bytes::<Name>(&encoded).unwrap(), name);
        }
    }

    #[test]
    fn holders_keep_grant_order_through_removals() {
        let mut holders = Holders::default();
        assert!(holders.is_empty() && holders.iter().next().is_none());
        for id in [5, 3, 9, 7] {
            holders.push(id);
        }
        assert!(!holders.remove(4));
        assert!(holders.remove(5), "the first one goes; the next moves up");
        assert_eq!(holders.iter().collect::<Vec<_>>(), [3, 9, 7]);
        assert!(holders.remove(9));
        assert_eq!(holders.iter().collect::<Vec<_>>(), [3, 7]);
        let encoded = postcard::to_allocvec(&holders).unwrap();
        assert_eq!(encoded, postcard::to_allocvec(&vec![3u64, 7]).unwrap());
        let back: Holders = postcard::from_bytes(&encoded).unwrap();
        assert_eq!(back.iter().collect::<Vec<_>>(), [3, 7]);
        assert!(holders.remove(3) && holders.remove(7));
        assert!(holders.is_empty() && holders.rest.is_none());
        let zero = postcard::to_allocvec(&vec![0u64]).unwrap();
        assert!(postcard::from_bytes::<Holders>(&zero).is_err());
    }
}
