//! Locks and resources in the lock table: creating them, queueing a pending request,
//! failing one, granting (with a new fencing token), releasing, the LVB, and settling
//! a resource after any change (granting what can be, freeing it when unused).

use super::command::{Event, GrantInfo, LockError, LockId, Reply, SessionId};
use super::limits::*;
use super::mode::Mode;
use super::model::{Holders, Lock, LsId, Name, Pending, ResId, Resource};
use super::table::{invalid, limit, show, State};
use std::hash::BuildHasher;

impl State {
    // ---- locks, resources, LVB ----

    pub(super) fn create_resource(&mut self, id: ResId, ls: LsId, name: Vec<u8>) -> ResId {
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

    pub(super) fn create_lock(
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
    pub(super) fn enqueue(&mut self, lock_id: LockId, front: bool) {
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

    pub(super) fn lvb_len(&self, resource: &Resource) -> usize {
        self.core.lockspaces[resource.ls as usize].lvb_len_bytes as usize
    }

    pub(super) fn lvb_bytes(&self, res: ResId) -> Vec<u8> {
        match self.core.lvbs.get(&res) {
            Some(bytes) => bytes.to_vec(),
            None => vec![0; self.lvb_len(self.resource(res))],
        }
    }

    pub(super) fn checked_lvb(&self, res: ResId, bytes: &[u8]) -> Result<Box<[u8]>, LockError> {
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

    pub(super) fn check_waiter_room(&self, res: ResId) -> Result<(), LockError> {
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
}
