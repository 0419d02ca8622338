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
    pub(super) resources: BTreeMap<ResId, Resource>,
    pub(super) locks: BTreeMap<LockId, Lock>,
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
    /// Every lock this session owns, granted or waiting.
    pub(super) locks: BTreeSet<LockId>,
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
