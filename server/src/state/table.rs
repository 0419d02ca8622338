//! `State`, the replicated lock table: applies one committed command at a time and
//! says what came of it. This file holds the table's records and indexes, `apply`
//! (which refuses what no handler may see and sends each command to its handler),
//! the shared argument checks and the internal accessors. The handlers live beside
//! it: `sessions`, `lockspaces`, `locking`, `fencing`, `unfencing`; their building
//! blocks in `requests`, `resources` and `queue`; `queries` and `snapshot` read it.
//!
//! Every handler validates completely before it changes anything: an `Err` from a
//! handler means the table is untouched, byte for byte.

use super::command::{Command, Event, LockError, LockId, NodeState, Reply, SessionId};
use super::digest;
use super::limits::*;
use super::locking::{ConvertArgs, LockArgs};
use super::model::{Core, Lock, LsId, ResId, Resource, Session};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasherDefault;
use std::sync::Arc;

/// The lock table. Serializes as its snapshot (see `encode`).
#[derive(Clone, Debug, Default)]
pub struct State {
    pub(super) core: Core,
    pub(super) idx: Index,
}

/// Lookups derived from `Core`; rebuilt (and thereby cross-checked) on decode.
#[derive(Clone, Debug, Default)]
pub(super) struct Index {
    pub(super) node_sessions: BTreeMap<String, SessionId>,
    pub(super) lockspace_ids: BTreeMap<String, LsId>,
    /// Per lockspace (by `LsId`): (hash of a resource's name, resource). The name
    /// itself is only in the resource record; a lookup compares it there, so a hash
    /// collision costs a comparison, never a wrong answer. Only ever searched, never
    /// listed: the hash function cannot change what the table does.
    pub(super) resource_ids: Vec<BTreeSet<(u64, ResId)>>,
    /// SipHash with fixed keys: no randomness in the table.
    pub(super) name_hasher: BuildHasherDefault<DefaultHasher>,
    /// Every waiting request with a deadline, earliest first.
    pub(super) deadlines: BTreeSet<(u64, LockId)>,
    pub(super) held_locks: usize,
    pub(super) waiting_requests: usize,
    /// Lockspaces an opener left during the entry being applied: closed at its end if
    /// nobody has them open and nothing is left in them. Empty between entries.
    pub(super) maybe_unused: BTreeSet<LsId>,
}

pub(super) fn invalid(message: String) -> LockError {
    LockError::InvalidArgument(message)
}

pub(super) fn limit(message: String) -> LockError {
    LockError::Limit(message)
}

pub(super) fn check_name(what: &str, name: &[u8]) -> Result<(), LockError> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(invalid(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes, got {}",
            name.len()
        )));
    }
    Ok(())
}

/// A resource name for messages: printable ASCII as is, other bytes escaped.
pub(super) fn show(name: &[u8]) -> String {
    name.escape_ascii().to_string()
}

/// The LVB length a lockspace gets for a requested `lvb_len_bytes`.
pub(super) fn lvb_len_for(requested: u32) -> Result<u32, LockError> {
    if requested == 0 {
        return Ok(DEFAULT_LVB_LEN_BYTES);
    }
    let mut valid = (LVB_LEN_STEP_BYTES..=MAX_LVB_LEN_BYTES).step_by(LVB_LEN_STEP_BYTES as usize);
    if !valid.any(|len| len == requested) {
        return Err(invalid(format!(
            "LVB length {requested} bytes must be a multiple of {LVB_LEN_STEP_BYTES} \
             from {LVB_LEN_STEP_BYTES} to {MAX_LVB_LEN_BYTES} (or 0 for \
             {DEFAULT_LVB_LEN_BYTES})"
        )));
    }
    Ok(requested)
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one command of the committed entry at Raft index `entry_index` (an
    /// entry carries one command or, batched by the leader, several; each is applied
    /// on its own, in order). What the command creates (a session, a lock, a
    /// resource) gets the id [`State::id_base`]: the entry's index, or, when an
    /// earlier entry's commands reached it, the next id above the last one issued.
    /// Ids are therefore unique and increasing in log order, however the log was cut
    /// into entries, and every replica issues the same ones.
    pub fn apply(&mut self, entry_index: u64, now_ms: u64, cmd: Command) -> (Reply, Vec<Event>) {
        let id = match self.admissible(entry_index, &cmd) {
            Ok(id) => id,
            Err(error) => return (Reply::Failed(error), Vec::new()),
        };
        let mut events = Vec::new();
        let outcome = self.dispatch(id, now_ms, cmd, &mut events);
        match outcome {
            Ok(reply) => {
                self.core.last_id = id;
                self.close_unused_lockspaces();
                (reply, events)
            }
            Err(error) => {
                debug_assert!(events.is_empty(), "a refused command emitted events");
                (Reply::Failed(error), Vec::new())
            }
        }
    }

    /// The id under which a command of the entry at `entry_index` creates what it
    /// creates: the entry's index when that is above every id issued so far (always,
    /// for a log of one command per entry), else one above the last. A refused
    /// command issues nothing, so the next command may get the same id. `None` once
    /// every u64 is spent (only a foreign snapshot gets there).
    pub(super) fn id_base(&self, entry_index: u64) -> Option<u64> {
        Some(entry_index.max(self.core.last_id.checked_add(1)?))
    }

    /// What no handler may see: a command when no id is left, or a request of a
    /// session that may not act. Answers the command's id.
    fn admissible(&self, entry_index: u64, cmd: &Command) -> Result<u64, LockError> {
        let Some(id) = self.id_base(entry_index) else {
            return Err(limit(format!(
                "no id left above {}: this table can take no more commands",
                self.core.last_id
            )));
        };
        if let Some(session) = cmd.session() {
            // The allow-list: a request of a session that may not act changes nothing.
            // (An unknown session is refused by the command's own handler.)
            if let Some(state) = self
                .session_state(session)
                .filter(|s| !s.may_act() && !unsafe_accepted(*s))
            {
                let error = LockError::SessionNotLive { session, state };
                return Err(error);
            }
        }
        Ok(id)
    }

    /// Each command to its handler; a handler that refuses leaves the table untouched.
    fn dispatch(
        &mut self,
        index: u64,
        now_ms: u64,
        cmd: Command,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        let digest = digest::of(&cmd);
        match cmd {
            Command::Login { node, nonce } => self.login(index, now_ms, node, nonce, false),
            Command::LoginUnfencing { node, nonce } => self.login(index, now_ms, node, nonce, true),
            Command::UnfenceAttempt {
                session,
                ok,
                last_attempt,
                detail,
            } => self.unfence_attempt(session, ok, last_attempt, detail, now_ms, events),
            Command::Logout { session, .. } => self.logout(session, now_ms, events),
            Command::OpenLockspace {
                session,
                request_id,
                name,
                lvb_len_bytes,
                recovery,
            } => self.open_lockspace(
                session,
                (request_id, digest),
                name,
                lvb_len_bytes,
                recovery,
                events,
            ),
            Command::Lock {
                session,
                request_id,
                ack_below,
                lockspace,
                resource,
                mode,
                flags,
                timeout_ms,
            } => {
                let args = LockArgs {
                    session,
                    request_id,
                    digest,
                    ack_below,
                    lockspace,
                    resource,
                    mode,
                    flags,
                    timeout_ms,
                };
                self.lock(index, now_ms, args, events)
            }
            Command::Convert {
                session,
                request_id,
                ack_below,
                lock_id,
                mode,
                flags,
                timeout_ms,
                lvb,
            } => {
                let args = ConvertArgs {
                    session,
                    request_id,
                    digest,
                    ack_below,
                    lock_id,
                    mode,
                    flags,
                    timeout_ms,
                    lvb,
                };
                self.convert(now_ms, args, events)
            }
            Command::Unlock {
                session,
                request_id,
                ack_below,
                lock_id,
                lvb,
            } => self.unlock(
                session,
                (request_id, digest),
                ack_below,
                lock_id,
                lvb,
                events,
            ),
            Command::Cancel {
                session,
                request_id,
                ack_below,
                target,
            } => self.cancel(session, (request_id, digest), ack_below, target, events),
            Command::Tick => self.tick(now_ms, events),
            Command::Expire { session } => self.expire(session, now_ms, events),
            Command::Failover => self.failover(),
            Command::Reconnect { session } => self.reconnect(session),
            Command::FenceStart { session } => self.fence_start(session, now_ms, events),
            Command::FenceAttempt {
                session,
                level,
                level_index,
                last_level,
                ok,
                detail,
            } => self.fence_attempt(
                session,
                level,
                level_index,
                last_level,
                ok,
                detail,
                now_ms,
                events,
            ),
            Command::FenceAck { node, by } => self.fence_ack(&node, by, now_ms, events),
            Command::ForceExpire { node } => self.force_expire(node, now_ms, events),
            Command::RecoveryDone {
                session,
                lockspace,
                node,
                ..
            } => self.recovery_done(session, &lockspace, &node, events),
        }
    }

    // ---- commands ----

    // ---- internal accessors (a miss is a broken invariant, not bad input) ----

    pub(super) fn session(&self, session: SessionId) -> Result<&Session, LockError> {
        self.core
            .sessions
            .get(&session)
            .map(|s| &**s)
            .ok_or(LockError::UnknownSession(session))
    }

    pub(super) fn session_mut(&mut self, session: SessionId) -> &mut Session {
        self.core
            .sessions
            .get_mut(&session)
            .map(Arc::make_mut)
            .expect("lock table invariant: the session exists")
    }

    pub(super) fn owned_lock(
        &self,
        session: SessionId,
        lock_id: LockId,
    ) -> Result<&Lock, LockError> {
        self.core
            .locks
            .get(&lock_id)
            .filter(|lock| lock.owner == session)
            .ok_or(LockError::UnknownLock(lock_id))
    }

    pub(super) fn lock_ref(&self, lock_id: LockId) -> &Lock {
        self.core
            .locks
            .get(&lock_id)
            .expect("lock table invariant: the lock exists")
    }

    pub(super) fn lock_mut(&mut self, lock_id: LockId) -> &mut Lock {
        self.core
            .locks
            .get_mut(&lock_id)
            .expect("lock table invariant: the lock exists")
    }

    pub(super) fn resource(&self, res: ResId) -> &Resource {
        self.core
            .resources
            .get(&res)
            .expect("lock table invariant: the resource exists")
    }

    pub(super) fn resource_mut(&mut self, res: ResId) -> &mut Resource {
        self.core
            .resources
            .get_mut(&res)
            .expect("lock table invariant: the resource exists")
    }
}

#[cfg(feature = "unsafe-test-switches")]
static UNSAFE_RELEASE_ON_EXPIRE: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// BREAKS SAFETY, for the nemesis test only: from now on this process releases an
/// expired node's locks at expiry, as if it had been fenced. Compiled only with the
/// `unsafe-test-switches` feature, and called only by the test server binary
/// (`lockd-under-test`, when `LOCKD_UNSAFE_RELEASE_ON_EXPIRE=1`): the `lockd` binary
/// never calls it, whatever features it was built with. Every server of a test
/// cluster gets the same environment, so replicas still apply entries identically.
#[cfg(feature = "unsafe-test-switches")]
pub fn enable_unsafe_release_on_expire() {
    UNSAFE_RELEASE_ON_EXPIRE.store(true, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(feature = "unsafe-test-switches")]
pub(super) fn unsafe_release_on_expire() -> bool {
    UNSAFE_RELEASE_ON_EXPIRE.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(feature = "unsafe-test-switches")]
static UNSAFE_ACCEPT_FROM_FAILED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// BREAKS SAFETY, for the nemesis test only: from now on this process applies the
/// requests of Fencing sessions as if they were live (the bug of issue 11: a node that
/// lives on while its fence agent runs could unlock, log out and lock). Same rules as
/// [`enable_unsafe_release_on_expire`]: only `lockd-under-test` calls it, when
/// `LOCKD_UNSAFE_ACCEPT_FROM_FENCING=1`.
#[cfg(feature = "unsafe-test-switches")]
pub fn enable_unsafe_accept_from_fencing() {
    UNSAFE_ACCEPT_FROM_FAILED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the broken test switch lets a session in `state` act anyway.
#[cfg(feature = "unsafe-test-switches")]
pub(super) fn unsafe_accepted(state: NodeState) -> bool {
    state == NodeState::Fencing
        && UNSAFE_ACCEPT_FROM_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(feature = "unsafe-test-switches"))]
pub(super) fn unsafe_accepted(_: NodeState) -> bool {
    false
}
