//! The lock requests of the lock table: Lock, Convert, Unlock, Cancel, and the Tick
//! that times out waiting requests. Each validates completely, then changes the
//! table; the queue discipline they rely on is in `queue`.

use super::command::{Event, Flags, LockError, LockId, Reply, RequestId, SessionId};
use super::digest::Digest;
use super::limits::*;
use super::mode::Mode;
use super::model::{Pending, ResId};
use super::requests::Admission;
use super::table::{check_name, invalid, limit, show, State};
use std::collections::BTreeSet;

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

pub(super) struct LockArgs {
    pub(super) session: SessionId,
    pub(super) request_id: RequestId,
    pub(super) digest: Digest,
    pub(super) ack_below: RequestId,
    pub(super) lockspace: String,
    pub(super) resource: Vec<u8>,
    pub(super) mode: Mode,
    pub(super) flags: Flags,
    pub(super) timeout_ms: u64,
}

pub(super) struct ConvertArgs {
    pub(super) session: SessionId,
    pub(super) request_id: RequestId,
    pub(super) digest: Digest,
    pub(super) ack_below: RequestId,
    pub(super) lock_id: LockId,
    pub(super) mode: Mode,
    pub(super) flags: Flags,
    pub(super) timeout_ms: u64,
    pub(super) lvb: Option<Vec<u8>>,
}

fn deadline(now_ms: u64, timeout_ms: u64) -> Option<u64> {
    (timeout_ms > 0).then(|| now_ms.saturating_add(timeout_ms))
}

impl State {
    pub(super) fn lock(
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

    pub(super) fn convert(
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

    pub(super) fn unlock(
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

    pub(super) fn cancel(
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

    pub(super) fn tick(
        &mut self,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
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
}
