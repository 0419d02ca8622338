//! `State`, the replicated lock table: applies one committed command at a time and
//! says what came of it. Owns sessions and their request records (applied-once
//! retries), lockspaces, the creation and removal of resources and locks, the LVB,
//! fencing tokens, timeouts, queries and snapshots. The queue discipline (who may be
//! granted, blocking callbacks, conversion deadlock) is in `queue`.
//!
//! Every handler validates completely before it changes anything: an `Err` from a
//! handler means the table is untouched, byte for byte.

use super::command::{
    Command, Event, FenceNext, Flags, GrantInfo, LockError, LockId, NodeState, RecoveryMode, Reply,
    RequestId, SessionId,
};
use super::digest::{self, Digest};
use super::limits::*;
use super::mode::{Mode, ModeCounts};
use super::model::{
    Core, Departure, DepartureKind, Done, Holders, Lock, Lockspace, LsId, Name, Pending, ResId,
    Resource, Session,
};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, BuildHasherDefault};

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

/// Whether a request-carrying command is new or a retry.
enum Admission {
    /// Already applied: answer with the first outcome and change nothing.
    Retry(Reply),
    New,
}

/// What a validated Lock will do.
enum NewLock {
    /// Create the resource (nobody locks it) with this lock granted.
    Create,
    Grant(ResId, Mode),
    WouldBlock(ResId),
    Queue(ResId),
}

/// What a validated Convert will do.
enum Conversion {
    Grant(Mode),
    WouldBlock,
    Deadlock,
    Queue,
}

struct LockArgs {
    session: SessionId,
    request_id: RequestId,
    digest: Digest,
    ack_below: RequestId,
    lockspace: String,
    resource: Vec<u8>,
    mode: Mode,
    flags: Flags,
    timeout_ms: u64,
}

struct ConvertArgs {
    session: SessionId,
    request_id: RequestId,
    digest: Digest,
    ack_below: RequestId,
    lock_id: LockId,
    mode: Mode,
    flags: Flags,
    timeout_ms: u64,
    lvb: Option<Vec<u8>>,
}

fn invalid(message: String) -> LockError {
    LockError::InvalidArgument(message)
}

fn limit(message: String) -> LockError {
    LockError::Limit(message)
}

fn check_name(what: &str, name: &[u8]) -> Result<(), LockError> {
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
fn lvb_len_for(requested: u32) -> Result<u32, LockError> {
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

fn deadline(now_ms: u64, timeout_ms: u64) -> Option<u64> {
    (timeout_ms > 0).then(|| now_ms.saturating_add(timeout_ms))
}

impl State {
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies one committed entry. `index` is its Raft index (unique, strictly
    /// increasing); ids of what the entry creates are this index. An entry whose
    /// index is not above the last one that changed the table is refused (it would
    /// reuse ids).
    pub fn apply(&mut self, index: u64, now_ms: u64, cmd: Command) -> (Reply, Vec<Event>) {
        if index <= self.core.last_index {
            let error = invalid(format!(
                "entry index {index} is not above the last applied index {}",
                self.core.last_index
            ));
            return (Reply::Failed(error), Vec::new());
        }
        if let Some(session) = cmd.session() {
            // The allow-list: a request of a session that may not act changes nothing.
            // (An unknown session is refused by the command's own handler.)
            if let Some(state) = self
                .session_state(session)
                .filter(|s| !s.may_act() && !unsafe_accepted(*s))
            {
                let error = LockError::SessionNotLive { session, state };
                return (Reply::Failed(error), Vec::new());
            }
        }
        let mut events = Vec::new();
        let digest = digest::of(&cmd);
        let outcome = match cmd {
            Command::Login { node, nonce } => self.login(index, now_ms, node, nonce, false),
            Command::LoginUnfencing { node, nonce } => self.login(index, now_ms, node, nonce, true),
            Command::UnfenceAttempt {
                session,
                ok,
                last_attempt,
                detail,
            } => self.unfence_attempt(session, ok, last_attempt, detail, now_ms, &mut events),
            Command::Logout { session, .. } => self.logout(session, now_ms, &mut events),
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
                &mut events,
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
                self.lock(index, now_ms, args, &mut events)
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
                self.convert(now_ms, args, &mut events)
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
                &mut events,
            ),
            Command::Cancel {
                session,
                request_id,
                ack_below,
                target,
            } => self.cancel(
                session,
                (request_id, digest),
                ack_below,
                target,
                &mut events,
            ),
            Command::Tick => self.tick(now_ms, &mut events),
            Command::Expire { session } => self.expire(session, now_ms, &mut events),
            Command::Failover => {
                for s in self.core.sessions.values_mut() {
                    if s.state == NodeState::LoggedIn {
                        s.state = NodeState::WasLoggedIn;
                    }
                }
                Ok(Reply::Ok)
            }
            Command::Reconnect { session } => self.reconnect(session),
            Command::FenceStart { session } => self.fence_start(session, now_ms, &mut events),
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
                &mut events,
            ),
            Command::FenceAck { node, by } => self.fence_ack(&node, by, now_ms, &mut events),
            Command::ForceExpire { node } => match self.idx.node_sessions.get(&node).copied() {
                Some(session) if self.session_state(session).is_some_and(NodeState::is_live) => {
                    self.expire(session, now_ms, &mut events)
                }
                _ => Err(LockError::NotLoggedIn(node)),
            },
            Command::RecoveryDone {
                session,
                lockspace,
                node,
                ..
            } => self.recovery_done(session, &lockspace, &node, &mut events),
        };
        match outcome {
            Ok(reply) => {
                self.core.last_index = index;
                self.close_unused_lockspaces();
                (reply, events)
            }
            Err(error) => {
                debug_assert!(events.is_empty(), "a refused command emitted events");
                (Reply::Failed(error), Vec::new())
            }
        }
    }

    // ---- commands ----

    /// A node logs in (BRIEF §3.3). `unfence`: the node's storage must be unfenced
    /// first, so the session starts Unfencing and the reply is `Reply::Unfencing`
    /// (issue 15). A retry with the login's nonce gets the same session back, in
    /// whatever state it is, or the refusal its unfencing ended in.
    fn login(
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
            Session {
                node,
                nonce,
                opened: BTreeSet::new(),
                lock_count: 0,
                acked_below: 0,
                pending: BTreeMap::new(),
                done: BTreeMap::new(),
                state: if unfence {
                    NodeState::Unfencing
                } else {
                    NodeState::LoggedIn
                },
                expired_at_ms: 0,
            },
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
    fn expire(
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

    fn reconnect(&mut self, session: SessionId) -> Result<Reply, LockError> {
        self.session(session)?;
        let s = self.session_mut(session);
        if s.state == NodeState::WasLoggedIn {
            s.state = NodeState::LoggedIn;
        }
        Ok(Reply::Ok)
    }

    /// Releases every lock of the session (without writing LVBs: a clean logout leaves
    /// them valid), fails its waiting requests with Cancelled, and forgets it.
    fn logout(
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
        if let Some(s) = self.core.sessions.remove(&session) {
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

    fn open_lockspace(
        &mut self,
        session: SessionId,
        (request_id, digest): (RequestId, Digest),
        name: String,
        lvb_len_bytes: u32,
        recovery: RecoveryMode,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if let Admission::Retry(reply) = self.admit(session, request_id, digest, 0)? {
            return Ok(reply);
        }
        check_name("lockspace name", name.as_bytes())?;
        let lvb_len_bytes = lvb_len_for(lvb_len_bytes)?;
        let existing = self.idx.lockspace_ids.get(&name).copied();
        match existing {
            Some(ls) => {
                let have = &self.core.lockspaces[ls as usize];
                if have.lvb_len_bytes != lvb_len_bytes || have.recovery != recovery {
                    return Err(LockError::LockspaceMismatch {
                        name,
                        lvb_len_bytes: have.lvb_len_bytes,
                        recovery: have.recovery,
                    });
                }
            }
            None if self.idx.lockspace_ids.len() >= MAX_LOCKSPACES => {
                return Err(limit(format!("{MAX_LOCKSPACES} lockspaces are open")));
            }
            None => {}
        }
        self.accept(session, 0);
        let ls = match existing {
            Some(ls) => ls,
            None => {
                let lockspace = Lockspace {
                    name: name.clone(),
                    lvb_len_bytes,
                    recovery,
                };
                // The lowest closed slot, else a new one (below MAX_LOCKSPACES: the
                // open ones are fewer, and every slot is open or closed).
                let free = self.core.lockspaces.iter().position(|l| l.name.is_empty());
                let slot = match free {
                    Some(slot) => {
                        self.core.lockspaces[slot] = lockspace;
                        slot
                    }
                    None => {
                        self.core.lockspaces.push(lockspace);
                        self.idx.resource_ids.push(BTreeSet::new());
                        self.core.lockspaces.len() - 1
                    }
                };
                let ls = slot as LsId;
                self.idx.lockspace_ids.insert(name, ls);
                ls
            }
        };
        self.session_mut(session).opened.insert(ls);
        self.owed_recoveries(session, ls, events);
        let reply = Reply::LockspaceOpened {
            lvb_len_bytes,
            recovery,
        };
        self.record_done(session, request_id, digest, reply.clone());
        Ok(reply)
    }

    fn lock(
        &mut self,
        index: u64,
        now_ms: u64,
        a: LockArgs,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if let Admission::Retry(reply) =
            self.admit(a.session, a.request_id, a.digest, a.ack_below)?
        {
            return Ok(reply);
        }
        check_name("lockspace name", a.lockspace.as_bytes())?;
        check_name("resource name", &a.resource)?;
        let Some(&ls) = self.idx.lockspace_ids.get(&a.lockspace) else {
            return Err(LockError::UnknownLockspace(a.lockspace));
        };
        let owner = self.session(a.session)?;
        if !owner.opened.contains(&ls) {
            return Err(LockError::LockspaceNotOpened(a.lockspace));
        }
        if owner.lock_count >= MAX_LOCKS_PER_SESSION {
            return Err(limit(format!(
                "session {} owns {MAX_LOCKS_PER_SESSION} locks",
                a.session
            )));
        }
        if self.core.locks.len() >= MAX_LOCKS {
            return Err(limit(format!("the lock table holds {MAX_LOCKS} locks")));
        }
        let res = self.resource_named(ls, &a.resource);
        let decision = match res {
            None => NewLock::Create,
            Some(res) => {
                let resource = self.resource(res);
                if resource.lock_count() >= MAX_LOCKS_PER_RESOURCE {
                    return Err(limit(format!(
                        "resource '{}' in lockspace '{}' has {MAX_LOCKS_PER_RESOURCE} locks",
                        show(&a.resource),
                        a.lockspace
                    )));
                }
                match self.new_request_grant_mode(res, a.mode, a.flags) {
                    Some(mode) => NewLock::Grant(res, mode),
                    None if a.flags.is_try() => NewLock::WouldBlock(res),
                    None => {
                        self.check_waiter_room(res)?;
                        NewLock::Queue(res)
                    }
                }
            }
        };

        // Validated; nothing below fails.
        self.accept(a.session, a.ack_below);
        let lock_id = index;
        let reply = match decision {
            NewLock::Create => {
                let res = self.create_resource(index, ls, a.resource);
                self.grant_new_lock(lock_id, a.session, res, a.mode, a.flags, events)
            }
            NewLock::Grant(res, mode) => {
                self.grant_new_lock(lock_id, a.session, res, mode, a.flags, events)
            }
            NewLock::WouldBlock(res) => {
                if a.flags.try_1cb {
                    self.notify_holders_blocking(res, None, a.mode, events);
                }
                Reply::Failed(LockError::WouldBlock)
            }
            NewLock::Queue(res) => {
                let pending = Pending {
                    request_id: a.request_id,
                    digest: a.digest,
                    mode: a.mode,
                    flags: a.flags,
                    deadline_ms: deadline(now_ms, a.timeout_ms),
                    lvb: None,
                };
                self.create_lock(lock_id, a.session, res, Some(pending));
                self.enqueue(lock_id, a.flags.priority);
                self.session_mut(a.session)
                    .pending
                    .insert(a.request_id, lock_id);
                self.notify_holders_blocking(res, None, a.mode, events);
                return Ok(Reply::Queued { lock_id });
            }
        };
        self.record_done(a.session, a.request_id, a.digest, reply.clone());
        Ok(reply)
    }

    /// Creates a lock granted at once.
    fn grant_new_lock(
        &mut self,
        lock_id: LockId,
        owner: SessionId,
        res: ResId,
        mode: Mode,
        flags: Flags,
        events: &mut Vec<Event>,
    ) -> Reply {
        self.create_lock(lock_id, owner, res, None);
        self.resource_mut(res).holders.push(lock_id);
        self.idx.held_locks += 1;
        let info = self.grant(lock_id, mode, flags.valblk);
        // A priority request may have passed waiters that it now blocks.
        self.notify_blockers(res, events);
        Reply::Granted(info)
    }

    fn convert(
        &mut self,
        now_ms: u64,
        a: ConvertArgs,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if let Admission::Retry(reply) =
            self.admit(a.session, a.request_id, a.digest, a.ack_below)?
        {
            return Ok(reply);
        }
        let lock = self.owned_lock(a.session, a.lock_id)?;
        let from = match lock.granted {
            Some(mode) if lock.pending.is_none() && !lock.expired => mode,
            _ => return Err(LockError::NotGranted(a.lock_id)),
        };
        let res = lock.res;
        let lvb = match &a.lvb {
            Some(bytes) if a.flags.valblk && from.writes_lvb(Some(a.mode)) => {
                Some(self.checked_lvb(res, bytes)?)
            }
            Some(_) => {
                return Err(invalid(format!(
                    "lock {} converting from {from} to {} does not write the LVB: only a \
                     PW or EX holder writes it, with valblk, going down or staying",
                    a.lock_id, a.mode
                )))
            }
            None => None,
        };
        let grant_mode = if a.mode == from {
            // Re-granting the held mode (e.g. to write the LVB, or for a new token).
            Some(from)
        } else {
            self.conversion_grant_mode(res, a.lock_id, a.mode, a.flags)
        };
        let decision = match grant_mode {
            Some(mode) => Conversion::Grant(mode),
            None if a.flags.is_try() => Conversion::WouldBlock,
            None if self.conversion_deadlocks(res, a.lock_id, a.mode, a.flags) => {
                Conversion::Deadlock
            }
            None => {
                self.check_waiter_room(res)?;
                Conversion::Queue
            }
        };

        // Validated; nothing below fails.
        self.accept(a.session, a.ack_below);
        let reply = match decision {
            Conversion::Grant(mode) => {
                if let Some(bytes) = lvb {
                    self.write_lvb(res, bytes);
                }
                let info = self.grant(a.lock_id, mode, a.flags.valblk);
                // A down-conversion (or a sideways one, PR <-> CW) may free waiters.
                self.settle(res, events);
                Reply::Granted(info)
            }
            Conversion::WouldBlock => {
                if a.flags.try_1cb {
                    self.notify_holders_blocking(res, Some(a.lock_id), a.mode, events);
                }
                Reply::Failed(LockError::WouldBlock)
            }
            Conversion::Deadlock => Reply::Failed(LockError::Deadlock),
            Conversion::Queue => {
                self.lock_mut(a.lock_id).pending = Some(Box::new(Pending {
                    request_id: a.request_id,
                    digest: a.digest,
                    mode: a.mode,
                    flags: a.flags,
                    deadline_ms: deadline(now_ms, a.timeout_ms),
                    lvb,
                }));
                self.enqueue(a.lock_id, a.flags.priority);
                self.session_mut(a.session)
                    .pending
                    .insert(a.request_id, a.lock_id);
                self.notify_holders_blocking(res, Some(a.lock_id), a.mode, events);
                return Ok(Reply::Queued { lock_id: a.lock_id });
            }
        };
        self.record_done(a.session, a.request_id, a.digest, reply.clone());
        Ok(reply)
    }

    fn unlock(
        &mut self,
        session: SessionId,
        (request_id, digest): (RequestId, Digest),
        ack_below: RequestId,
        lock_id: LockId,
        lvb: Option<Vec<u8>>,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if let Admission::Retry(reply) = self.admit(session, request_id, digest, ack_below)? {
            return Ok(reply);
        }
        let lock = self.owned_lock(session, lock_id)?;
        let res = lock.res;
        let lvb = match (&lvb, lock.granted) {
            (Some(bytes), Some(held)) if held.writes_lvb(None) => {
                Some(self.checked_lvb(res, bytes)?)
            }
            (Some(_), held) => {
                return Err(invalid(format!(
                    "lock {lock_id} {} does not write the LVB: only a PW or EX holder does",
                    held.map_or("is still waiting".to_string(), |m| format!(
                        "is held in {m}"
                    ))
                )))
            }
            (None, _) => None,
        };

        self.accept(session, ack_below);
        if self.lock_ref(lock_id).pending.is_some() {
            // A waiting lock goes entirely; a pending conversion ends before the release.
            self.fail_pending(lock_id, LockError::Cancelled, events);
        }
        if self.core.locks.contains_key(&lock_id) {
            if let Some(bytes) = lvb {
                self.write_lvb(res, bytes);
            }
            self.release(lock_id);
        }
        self.settle(res, events);
        self.record_done(session, request_id, digest, Reply::Ok);
        Ok(Reply::Ok)
    }

    fn cancel(
        &mut self,
        session: SessionId,
        (request_id, digest): (RequestId, Digest),
        ack_below: RequestId,
        target: RequestId,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        if let Admission::Retry(reply) = self.admit(session, request_id, digest, ack_below)? {
            return Ok(reply);
        }
        self.accept(session, ack_below);
        let target_lock = self.session(session)?.pending.get(&target).copied();
        let cancelled = match target_lock {
            Some(lock_id) => {
                let res = self.lock_ref(lock_id).res;
                self.fail_pending(lock_id, LockError::Cancelled, events);
                self.settle(res, events);
                true
            }
            None => false,
        };
        let reply = Reply::Cancelled { cancelled };
        self.record_done(session, request_id, digest, reply.clone());
        Ok(reply)
    }

    fn tick(&mut self, now_ms: u64, events: &mut Vec<Event>) -> Result<Reply, LockError> {
        let due: Vec<LockId> = self
            .idx
            .deadlines
            .range(..=(now_ms, LockId::MAX))
            .map(|&(_, lock_id)| lock_id)
            .collect();
        let mut touched = BTreeSet::new();
        for lock_id in due {
            touched.insert(self.lock_ref(lock_id).res);
            self.fail_pending(lock_id, LockError::Timeout, events);
        }
        for res in touched {
            self.settle(res, events);
        }
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

    // ---- request records ----

    /// Looks the request up: a retry (the same id and the same request, by `digest`)
    /// gets the first outcome back; the same id with another request is refused; a new
    /// request must not be stale.
    fn admit(
        &self,
        session: SessionId,
        request_id: RequestId,
        digest: Digest,
        ack_below: RequestId,
    ) -> Result<Admission, LockError> {
        let s = self.session(session)?;
        let reused = || {
            invalid(format!(
                "request id {request_id} of session {session} was already used for another \
                 request: a retry must repeat its request exactly, a new request needs a \
                 new id"
            ))
        };
        if let Some(&lock_id) = s.pending.get(&request_id) {
            let first = self
                .core
                .locks
                .get(&lock_id)
                .and_then(|lock| lock.pending.as_ref())
                .map(|pending| pending.digest);
            if first != Some(digest) {
                return Err(reused());
            }
            return Ok(Admission::Retry(Reply::Queued { lock_id }));
        }
        if let Some(done) = s.done.get(&request_id) {
            if done.digest != digest {
                return Err(reused());
            }
            return Ok(Admission::Retry(done.reply.clone()));
        }
        if request_id < s.acked_below {
            return Err(invalid(format!(
                "stale request id {request_id}: session {session} acknowledged every \
                 request below {}",
                s.acked_below
            )));
        }
        if ack_below > request_id {
            return Err(invalid(format!(
                "ack_below {ack_below} is above the request's own id {request_id}"
            )));
        }
        Ok(Admission::New)
    }

    /// Takes a validated new request's acknowledgement: the client has its answers
    /// below `ack_below`, so those records go. Waiting requests keep theirs until they
    /// finish.
    fn accept(&mut self, session: SessionId, ack_below: RequestId) {
        let s = self.session_mut(session);
        s.acked_below = s.acked_below.max(ack_below);
        if s.done
            .first_key_value()
            .is_some_and(|(&id, _)| id < s.acked_below)
        {
            s.done = s.done.split_off(&s.acked_below);
        }
    }

    /// Records a finished request's reply for retries of the same request (`digest`;
    /// the request may have waited).
    pub(super) fn record_done(
        &mut self,
        session: SessionId,
        request_id: RequestId,
        digest: Digest,
        reply: Reply,
    ) {
        let Some(s) = self.core.sessions.get_mut(&session) else {
            return;
        };
        s.pending.remove(&request_id);
        if request_id < s.acked_below {
            // Already acknowledged (a client that acks a request still waiting).
            return;
        }
        s.done.insert(request_id, Done { digest, reply });
        while s.done.len() > MAX_REQUEST_RECORDS_PER_SESSION {
            if let Some((evicted, _)) = s.done.pop_first() {
                // A retry of it would otherwise be applied again; now it is stale.
                s.acked_below = s.acked_below.max(evicted.saturating_add(1));
            }
        }
    }

    // ---- locks, resources, LVB ----

    fn create_resource(&mut self, id: ResId, ls: LsId, name: Vec<u8>) -> ResId {
        let hash = self.idx.name_hasher.hash_one(name.as_slice());
        self.idx.resource_ids[ls as usize].insert((hash, id));
        let previous = self.core.resources.insert(
            id,
            Resource {
                name: Name::from(name.as_slice()),
                holders: Holders::default(),
                queues: None,
                ls,
                lvb_invalid: false,
            },
        );
        debug_assert!(previous.is_none(), "resource id {id} reused");
        id
    }

    fn create_lock(
        &mut self,
        lock_id: LockId,
        owner: SessionId,
        res: ResId,
        pending: Option<Pending>,
    ) {
        let previous = self.core.locks.insert(
            lock_id,
            Lock {
                owner,
                res,
                granted: None,
                token: 0,
                notified: 0,
                expired: false,
                pending: pending.map(Box::new),
            },
        );
        debug_assert!(previous.is_none(), "lock id {lock_id} reused");
        self.session_mut(owner).lock_count += 1;
    }

    /// Puts a lock's pending request in its queue (conversion or new request).
    fn enqueue(&mut self, lock_id: LockId, front: bool) {
        let lock = self.lock_ref(lock_id);
        let (res, conversion) = (lock.res, lock.granted.is_some());
        let pending = lock
            .pending
            .as_ref()
            .expect("an enqueued lock has a request");
        let (mode, deadline_ms) = (pending.mode, pending.deadline_ms);
        self.resource_mut(res)
            .queues
            .get_or_insert_with(Box::default)
            .push(lock_id, mode, conversion, front);
        if let Some(deadline_ms) = deadline_ms {
            self.idx.deadlines.insert((deadline_ms, lock_id));
        }
        self.idx.waiting_requests += 1;
    }

    /// Ends a lock's waiting request without granting it: out of its queue, the
    /// requester told with `error`, the record updated. A lock that never was granted
    /// goes with it; a conversion leaves the lock at its granted mode. The caller
    /// settles the resource.
    pub(super) fn fail_pending(
        &mut self,
        lock_id: LockId,
        error: LockError,
        events: &mut Vec<Event>,
    ) {
        let pending = self.take_pending(lock_id);
        let lock = self.lock_ref(lock_id);
        let (owner, res, conversion) = (lock.owner, lock.res, lock.granted.is_some());
        if let Some(queues) = self.resource_mut(res).queues.as_mut() {
            queues.remove(lock_id, pending.mode, conversion);
        }
        if !conversion {
            self.core.locks.remove(&lock_id);
            self.session_mut(owner).lock_count -= 1;
        }
        events.push(Event::Finished {
            session: owner,
            request_id: pending.request_id,
            result: Err(error.clone()),
        });
        self.record_done(
            owner,
            pending.request_id,
            pending.digest,
            Reply::Failed(error),
        );
    }

    /// Detaches a lock's pending request from the deadline index and the counts; the
    /// caller takes it out of its queue.
    pub(super) fn take_pending(&mut self, lock_id: LockId) -> Pending {
        let pending = *self
            .lock_mut(lock_id)
            .pending
            .take()
            .expect("the lock has a pending request");
        if let Some(deadline_ms) = pending.deadline_ms {
            let removed = self.idx.deadlines.remove(&(deadline_ms, lock_id));
            debug_assert!(removed, "deadline of lock {lock_id} was not indexed");
        }
        self.idx.waiting_requests -= 1;
        pending
    }

    /// Removes a granted lock without a pending request. The caller settles the resource.
    pub(super) fn release(&mut self, lock_id: LockId) {
        let lock = self
            .core
            .locks
            .remove(&lock_id)
            .expect("released lock exists");
        debug_assert!(lock.granted.is_some() && lock.pending.is_none());
        let removed = self.resource_mut(lock.res).holders.remove(lock_id);
        debug_assert!(removed, "released lock {lock_id} is not a holder");
        self.idx.held_locks -= 1;
        self.session_mut(lock.owner).lock_count -= 1;
    }

    /// Grants `mode` to a lock (new or converting): a new fencing token, a fresh
    /// blocking-callback set. Queue bookkeeping is the caller's.
    pub(super) fn grant(&mut self, lock_id: LockId, mode: Mode, valblk: bool) -> GrantInfo {
        self.core.last_token += 1;
        let token = self.core.last_token;
        let lock = self.lock_mut(lock_id);
        lock.granted = Some(mode);
        lock.token = token;
        lock.notified = 0;
        let res = lock.res;
        let (lvb, lvb_invalid) = if valblk {
            (Some(self.lvb_bytes(res)), self.resource(res).lvb_invalid)
        } else {
            (None, false)
        };
        GrantInfo {
            lock_id,
            mode,
            token,
            lvb,
            lvb_invalid,
        }
    }

    fn lvb_len(&self, resource: &Resource) -> usize {
        self.core.lockspaces[resource.ls as usize].lvb_len_bytes as usize
    }

    fn lvb_bytes(&self, res: ResId) -> Vec<u8> {
        match self.core.lvbs.get(&res) {
            Some(bytes) => bytes.to_vec(),
            None => vec![0; self.lvb_len(self.resource(res))],
        }
    }

    fn checked_lvb(&self, res: ResId, bytes: &[u8]) -> Result<Box<[u8]>, LockError> {
        let resource = self.resource(res);
        let wanted = self.lvb_len(resource);
        if bytes.len() != wanted {
            let ls = &self.core.lockspaces[resource.ls as usize].name;
            return Err(invalid(format!(
                "LVB of {} bytes does not match the {wanted}-byte LVBs of lockspace '{ls}'",
                bytes.len()
            )));
        }
        Ok(bytes.into())
    }

    pub(super) fn write_lvb(&mut self, res: ResId, bytes: Box<[u8]>) {
        self.resource_mut(res).lvb_invalid = false;
        if bytes.iter().any(|&b| b != 0) {
            self.core.lvbs.insert(res, bytes);
        } else {
            self.core.lvbs.remove(&res);
        }
    }

    fn check_waiter_room(&self, res: ResId) -> Result<(), LockError> {
        let resource = self.resource(res);
        if resource.waiter_count() >= MAX_WAITERS_PER_RESOURCE {
            return Err(limit(format!(
                "resource '{}' in lockspace '{}' has {MAX_WAITERS_PER_RESOURCE} waiting requests",
                show(&resource.name),
                self.core.lockspaces[resource.ls as usize].name
            )));
        }
        Ok(())
    }

    /// After any change to a resource: grant what can be granted, tell holders about
    /// the requests they block, and free the resource if nothing is left on it.
    pub(super) fn settle(&mut self, res: ResId, events: &mut Vec<Event>) {
        if !self.core.resources.contains_key(&res) {
            return;
        }
        self.grant_pass(res, events);
        self.notify_blockers(res, events);
        let resource = self.resource_mut(res);
        if resource.waiter_count() == 0 {
            resource.queues = None;
        }
        if resource.is_unused() {
            let resource = self
                .core
                .resources
                .remove(&res)
                .expect("the resource exists");
            // Its LVB goes with it, as in DLM.
            self.core.lvbs.remove(&res);
            let hash = self.idx.name_hasher.hash_one(&*resource.name);
            self.idx.resource_ids[resource.ls as usize].remove(&(hash, res));
        }
    }

    // ---- internal accessors (a miss is a broken invariant, not bad input) ----

    pub(super) fn session(&self, session: SessionId) -> Result<&Session, LockError> {
        self.core
            .sessions
            .get(&session)
            .ok_or(LockError::UnknownSession(session))
    }

    pub(super) fn session_mut(&mut self, session: SessionId) -> &mut Session {
        self.core
            .sessions
            .get_mut(&session)
            .expect("lock table invariant: the session exists")
    }

    fn owned_lock(&self, session: SessionId, lock_id: LockId) -> Result<&Lock, LockError> {
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
    fn resource_named(&self, ls: LsId, name: &[u8]) -> Option<ResId> {
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

    /// Every session with its node, state, granted-lock count and expiry time, by id.
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

    /// Closes the lockspaces an opener left during this entry if nobody has them open
    /// and nothing is left in them (no lock, so no expired holder awaiting recovery):
    /// their names and slots are free again (issue 12: lockspaces have a lifecycle).
    fn close_unused_lockspaces(&mut self) {
        for ls in std::mem::take(&mut self.idx.maybe_unused) {
            let open = self.core.sessions.values().any(|s| s.opened.contains(&ls));
            let used = self
                .idx
                .resource_ids
                .get(ls as usize)
                .is_none_or(|r| !r.is_empty());
            if open || used {
                continue;
            }
            if let Some(lockspace) = self.core.lockspaces.get_mut(ls as usize) {
                let name = std::mem::take(&mut lockspace.name);
                self.idx.lockspace_ids.remove(&name);
            }
        }
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
fn unsafe_release_on_expire() -> bool {
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
fn unsafe_accepted(state: NodeState) -> bool {
    state == NodeState::Fencing
        && UNSAFE_ACCEPT_FROM_FAILED.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(feature = "unsafe-test-switches"))]
fn unsafe_accepted(_: NodeState) -> bool {
    false
}
