//! The queue discipline of one resource (BRIEF §3.2 "Order"): who may be granted now,
//! the grant pass after every change, blocking callbacks, and conversion-deadlock
//! detection. Decisions compare a mode against per-mode counts of holders and queues,
//! so a grant pass costs about one step per holder and per queued request, not one per
//! pair (more only while granted conversions keep enabling earlier ones).
//!
//! The rules:
//! - a conversion is grantable iff its mode is compatible with the granted modes of all
//!   *other* holders (queued conversions do not hold it back: that makes
//!   down-conversions immediate);
//! - a new request is grantable iff its mode is compatible with every holder, with the
//!   requested mode of every queued conversion, and with the requested modes of the new
//!   requests ahead of it;
//! - expired holders count as holders except for `noexp` requests; `any` lets PR and
//!   CW stand in for each other.
//!
//! After every apply each resource is *settled*: nothing still waiting is grantable,
//! and every live holder has been told about each requested mode it blocks.

use super::command::{Event, Flags, LockId, Reply};
use super::mode::{Mode, ModeCounts};
use super::model::ResId;
use super::table::State;
use std::collections::BTreeSet;

/// The mode a request gets, given which modes `fits` accepts: its own, or with `any`
/// the stand-in.
fn pick_mode(mode: Mode, flags: Flags, fits: impl Fn(Mode) -> bool) -> Option<Mode> {
    if fits(mode) {
        Some(mode)
    } else if flags.any {
        mode.alternative().filter(|&alt| fits(alt))
    } else {
        None
    }
}

/// Granted modes on a resource, live and expired holders apart.
#[derive(Clone, Copy, Default)]
struct Held {
    live: ModeCounts,
    expired: ModeCounts,
}

impl Held {
    /// Whether `mode` fits next to these holders for a request with `flags`.
    fn admits(&self, mode: Mode, flags: Flags) -> bool {
        !self.live.conflicts_with(mode) && (flags.noexp || !self.expired.conflicts_with(mode))
    }
}

impl State {
    fn held(&self, res: ResId) -> Held {
        let mut held = Held::default();
        for holder in self.resource(res).holders.iter() {
            let lock = self.lock_ref(holder);
            let mode = lock.granted.expect("a holder is granted");
            if lock.expired {
                held.expired.add(mode);
            } else {
                held.live.add(mode);
            }
        }
        held
    }

    /// The mode a new request would be granted at once, if any, queued at the head
    /// (`priority`) or the tail. The resource is settled, so nothing else would move.
    pub(super) fn new_request_grant_mode(
        &self,
        res: ResId,
        mode: Mode,
        flags: Flags,
    ) -> Option<Mode> {
        let held = self.held(res);
        let (converting, ahead) = match &self.resource(res).queues {
            Some(q) if flags.priority => (q.convert_modes, ModeCounts::default()),
            Some(q) => (q.convert_modes, q.wait_modes),
            None => Default::default(),
        };
        pick_mode(mode, flags, |m| {
            held.admits(m, flags) && !converting.conflicts_with(m) && !ahead.conflicts_with(m)
        })
    }

    /// The mode a granted lock would be converted to at once, if any.
    pub(super) fn conversion_grant_mode(
        &self,
        res: ResId,
        lock_id: LockId,
        mode: Mode,
        flags: Flags,
    ) -> Option<Mode> {
        let lock = self.lock_ref(lock_id);
        debug_assert!(!lock.expired, "an expired holder does not convert");
        let mut others = self.held(res);
        others
            .live
            .remove(lock.granted.expect("a converting lock is granted"));
        pick_mode(mode, flags, |m| others.admits(m, flags))
    }

    /// Whether a conversion of `lock_id` to `mode`, about to be queued, would close a
    /// cycle of conversions each waiting for another's granted mode (two PR holders
    /// both converting to EX, say). Only conversions can form one on a resource: a
    /// holder that is not converting may still let go.
    pub(super) fn conversion_deadlocks(
        &self,
        res: ResId,
        lock_id: LockId,
        mode: Mode,
        flags: Flags,
    ) -> bool {
        let holders: Vec<LockId> = self.resource(res).holders.iter().collect();
        let mut seen = BTreeSet::new();
        let mut stack = vec![(lock_id, mode, flags)];
        while let Some((waiter, wanted, wanted_flags)) = stack.pop() {
            for &holder in &holders {
                if holder == waiter {
                    continue;
                }
                let lock = self.lock_ref(holder);
                let held = lock.granted.expect("a holder is granted");
                let blocks = (!lock.expired || !wanted_flags.noexp)
                    && pick_mode(wanted, wanted_flags, |m| m.compatible(held)).is_none();
                if !blocks {
                    continue;
                }
                if holder == lock_id {
                    return true;
                }
                if let Some(pending) = &lock.pending {
                    if seen.insert(holder) {
                        stack.push((holder, pending.mode, pending.flags));
                    }
                }
            }
        }
        false
    }

    /// What the grant pass would grant now, in grant order: conversions first (in
    /// queue order, repeated while one grant enables another), then new requests in
    /// queue order. Pure; an empty plan means the resource is settled.
    pub(super) fn plan_grants(&self, res: ResId) -> Vec<(LockId, Mode)> {
        let mut plan = Vec::new();
        let Some(queues) = &self.resource(res).queues else {
            return plan;
        };
        let mut held = self.held(res);

        let conversions: Vec<(LockId, Mode, Mode, Flags)> = queues
            .converting
            .iter()
            .map(|&id| {
                let lock = self.lock_ref(id);
                let pending = lock.pending.as_ref().expect("a queued lock has a request");
                let from = lock.granted.expect("a converting lock is granted");
                (id, from, pending.mode, pending.flags)
            })
            .collect();
        let mut granted = vec![false; conversions.len()];
        loop {
            let mut progressed = false;
            for (i, &(id, from, mode, flags)) in conversions.iter().enumerate() {
                if granted[i] {
                    continue;
                }
                let mut others = held;
                others.live.remove(from);
                if let Some(to) = pick_mode(mode, flags, |m| others.admits(m, flags)) {
                    held.live.remove(from);
                    held.live.add(to);
                    granted[i] = true;
                    progressed = true;
                    plan.push((id, to));
                }
            }
            if !progressed {
                break;
            }
        }
        let mut still_converting = ModeCounts::default();
        for (i, &(_, _, mode, _)) in conversions.iter().enumerate() {
            if !granted[i] {
                still_converting.add(mode);
            }
        }

        let mut ahead = ModeCounts::default();
        for &id in &queues.waiting {
            let pending = self
                .lock_ref(id)
                .pending
                .as_ref()
                .expect("a queued lock has a request");
            let (mode, flags) = (pending.mode, pending.flags);
            let fits = |m| {
                held.admits(m, flags)
                    && !still_converting.conflicts_with(m)
                    && !ahead.conflicts_with(m)
            };
            match pick_mode(mode, flags, fits) {
                Some(to) => {
                    held.live.add(to);
                    plan.push((id, to));
                }
                None => ahead.add(mode),
            }
        }
        plan
    }

    /// Grants everything grantable on the resource, telling each requester.
    pub(super) fn grant_pass(&mut self, res: ResId, events: &mut Vec<Event>) {
        let plan = self.plan_grants(res);
        if plan.is_empty() {
            return;
        }
        for &(lock_id, mode) in &plan {
            let conversion = self.lock_ref(lock_id).granted;
            let pending = self.take_pending(lock_id);
            if let Some(queues) = self.resource_mut(res).queues.as_mut() {
                if conversion.is_some() {
                    queues.convert_modes.remove(pending.mode);
                } else {
                    queues.wait_modes.remove(pending.mode);
                }
            }
            match conversion {
                Some(from) => {
                    if let Some(lvb) = pending.lvb {
                        debug_assert!(from.writes_lvb(Some(mode)));
                        self.write_lvb(res, lvb);
                    }
                }
                None => {
                    self.resource_mut(res).holders.push(lock_id);
                    self.idx.held_locks += 1;
                }
            }
            let info = self.grant(lock_id, mode, pending.flags.valblk);
            let owner = self.lock_ref(lock_id).owner;
            events.push(Event::Finished {
                session: owner,
                request_id: pending.request_id,
                result: Ok(info.clone()),
            });
            self.record_done(
                owner,
                pending.request_id,
                pending.digest,
                Reply::Granted(info),
            );
        }
        // One sweep takes every granted request out of the queues.
        let locks = &self.core.locks;
        let resource = self
            .core
            .resources
            .get_mut(&res)
            .expect("lock table invariant: the resource exists");
        if let Some(queues) = resource.queues.as_mut() {
            let still_waiting = |id: &LockId| locks.get(id).is_some_and(|l| l.pending.is_some());
            queues.converting.retain(still_waiting);
            queues.waiting.retain(still_waiting);
        }
    }

    /// Tells every live holder about each requested mode on the resource that it
    /// blocks, once per mode per grant of the holder.
    pub(super) fn notify_blockers(&mut self, res: ResId, events: &mut Vec<Event>) {
        let core = &mut self.core;
        let Some(resource) = core.resources.get(&res) else {
            return;
        };
        let Some(queues) = &resource.queues else {
            return;
        };
        let wanted = queues.convert_modes.plus(&queues.wait_modes);
        if wanted.is_empty() {
            return;
        }
        let lockspace = &core.lockspaces[resource.ls as usize].name;
        for holder in resource.holders.iter() {
            let Some(lock) = core.locks.get_mut(&holder) else {
                debug_assert!(false, "holder {holder} does not exist");
                continue;
            };
            let Some(held) = lock.granted else {
                continue;
            };
            if lock.expired {
                // A failed node has nobody to tell.
                continue;
            }
            let own = lock.pending.as_ref().map(|p| p.mode);
            for mode in Mode::ALL {
                let by_others = wanted
                    .get(mode)
                    .saturating_sub(u32::from(own == Some(mode)));
                if by_others > 0 && !held.compatible(mode) && lock.notified & mode.bit() == 0 {
                    lock.notified |= mode.bit();
                    events.push(Event::Blocking {
                        session: lock.owner,
                        lock_id: holder,
                        lockspace: lockspace.clone(),
                        resource: resource.name.to_vec(),
                        requested: mode,
                    });
                }
            }
        }
    }

    /// Tells the live holders (other than `own`) that block one request for `mode`,
    /// under the same once-per-mode rule: a request that just queued, or a `try_1cb`.
    pub(super) fn notify_holders_blocking(
        &mut self,
        res: ResId,
        own: Option<LockId>,
        mode: Mode,
        events: &mut Vec<Event>,
    ) {
        let core = &mut self.core;
        let Some(resource) = core.resources.get(&res) else {
            return;
        };
        let lockspace = &core.lockspaces[resource.ls as usize].name;
        for holder in resource.holders.iter() {
            if Some(holder) == own {
                continue;
            }
            let Some(lock) = core.locks.get_mut(&holder) else {
                debug_assert!(false, "holder {holder} does not exist");
                continue;
            };
            let Some(held) = lock.granted else {
                continue;
            };
            if !lock.expired && !held.compatible(mode) && lock.notified & mode.bit() == 0 {
                lock.notified |= mode.bit();
                events.push(Event::Blocking {
                    session: lock.owner,
                    lock_id: holder,
                    lockspace: lockspace.clone(),
                    resource: resource.name.to_vec(),
                    requested: mode,
                });
            }
        }
    }

    /// Checks the rules a settled table must satisfy (used by the tests after every
    /// step): holders compatible (an expired holder may overlap a `noexp` grant),
    /// nothing waiting is grantable, every blocking holder told.
    #[cfg(test)]
    pub(super) fn check_queue_rules(&self) -> Result<(), String> {
        for (&res, resource) in self.core.resources.iter() {
            let holders: Vec<_> = resource
                .holders
                .iter()
                .map(|id| (id, self.lock_ref(id)))
                .collect();
            for (i, &(a, la)) in holders.iter().enumerate() {
                for &(b, lb) in &holders[i + 1..] {
                    let (ma, mb) = (la.granted.unwrap(), lb.granted.unwrap());
                    if !ma.compatible(mb) && !la.expired && !lb.expired {
                        return Err(format!(
                            "resource {res}: holders {a} ({ma}) and {b} ({mb}) conflict"
                        ));
                    }
                }
            }
            let plan = self.plan_grants(res);
            if !plan.is_empty() {
                return Err(format!("resource {res} is not settled: {plan:?} grantable"));
            }
            let Some(queues) = &resource.queues else {
                continue;
            };
            for &(h, lock) in &holders {
                if lock.expired {
                    continue;
                }
                let held = lock.granted.unwrap();
                let own = lock.pending.as_ref().map(|p| p.mode);
                for mode in Mode::ALL {
                    let wanted = queues.convert_modes.get(mode) + queues.wait_modes.get(mode)
                        - u32::from(own == Some(mode));
                    if wanted > 0 && !held.compatible(mode) && lock.notified & mode.bit() == 0 {
                        return Err(format!("holder {h} ({held}) not told about {mode}"));
                    }
                }
            }
        }
        Ok(())
    }
}
