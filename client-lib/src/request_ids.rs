//! Request ids and the `ack_below` watermark of one session.
//!
//! Every state-changing operation takes a [`Ticket`]: a fresh id, strictly greater than
//! every id handed out before, which stays "in flight" until the ticket is dropped. The
//! operation reuses the ticket's id on every retry, so the server can apply it once.
//! `ack_below` is the smallest id still in flight (or the next id to hand out when none
//! is): the server may forget the outcome of every id below it, because the client will
//! never retry those again.
//!
//! The lock is a plain mutex held for a few instructions, never across an await, so many
//! tasks can run requests on one session concurrently.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};

/// The id allocator and in-flight set of one session.
#[derive(Debug)]
pub(crate) struct RequestIds {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The next id to hand out. Ids start at 1.
    next: u64,
    /// Ids whose final reply has not been received yet (or whose operation is still
    /// being retried).
    in_flight: BTreeSet<u64>,
}

impl RequestIds {
    pub(crate) fn new() -> Arc<RequestIds> {
        Arc::new(RequestIds {
            state: Mutex::new(State {
                next: 1,
                in_flight: BTreeSet::new(),
            }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves the state consistent (every mutation is
        // a single insert/remove), so a poisoned lock is safe to keep using.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Allocates the id of a new logical operation and marks it in flight.
    pub(crate) fn begin(self: &Arc<Self>) -> Ticket {
        let mut state = self.state();
        let id = state.next;
        state.next = id
            .checked_add(1)
            .expect("request ids exhausted (2^64 requests)");
        let fresh = state.in_flight.insert(id);
        debug_assert!(fresh, "request id {id} handed out twice");
        Ticket {
            ids: Arc::clone(self),
            id,
        }
    }

    /// The smallest id whose reply has not been received; every id below it is answered.
    pub(crate) fn ack_below(&self) -> u64 {
        let state = self.state();
        let ack = state.in_flight.first().copied().unwrap_or(state.next);
        debug_assert!(ack <= state.next);
        ack
    }

    fn finish(&self, id: u64) {
        let removed = self.state().in_flight.remove(&id);
        debug_assert!(removed, "request id {id} finished twice");
    }

    #[cfg(test)]
    fn in_flight(&self) -> usize {
        self.state().in_flight.len()
    }
}

/// One logical operation's request id. Dropping the ticket declares the operation
/// finished: its reply was received or it will never be retried again.
#[derive(Debug)]
pub(crate) struct Ticket {
    ids: Arc<RequestIds>,
    id: u64,
}

impl Ticket {
    /// The request id, the same on every retry.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The session's current `ack_below`, to send along with this request. It is never
    /// above this ticket's own id, since the ticket is still in flight.
    pub(crate) fn ack_below(&self) -> u64 {
        let ack = self.ids.ack_below();
        debug_assert!(ack <= self.id);
        ack
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.ids.finish(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_grow() {
        let ids = RequestIds::new();
        let a = ids.begin();
        let b = ids.begin();
        drop(a);
        let c = ids.begin();
        assert_eq!((b.id(), c.id()), (2, 3));
    }

    #[test]
    fn ack_below_is_next_id_when_nothing_is_in_flight() {
        let ids = RequestIds::new();
        assert_eq!(ids.ack_below(), 1);
        drop(ids.begin());
        drop(ids.begin());
        assert_eq!(ids.ack_below(), 3);
    }

    #[test]
    fn ack_below_waits_for_the_oldest_unanswered_request() {
        let ids = RequestIds::new();
        let r1 = ids.begin();
        let r2 = ids.begin();
        let r3 = ids.begin();
        assert_eq!(r3.ack_below(), 1);
        drop(r2); // answered out of order: 1 still outstanding
        assert_eq!(ids.ack_below(), 1);
        drop(r1);
        assert_eq!(ids.ack_below(), 3);
        drop(r3);
        assert_eq!(ids.ack_below(), 4);
        assert_eq!(ids.in_flight(), 0);
    }

    #[test]
    fn ticket_ack_below_never_exceeds_its_own_id() {
        let ids = RequestIds::new();
        let tickets: Vec<Ticket> = (0..10).map(|_| ids.begin()).collect();
        for t in &tickets {
            assert!(t.ack_below() <= t.id());
        }
    }

    #[test]
    fn concurrent_tickets_are_unique_and_all_finish() {
        let ids = RequestIds::new();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let ids = Arc::clone(&ids);
                std::thread::spawn(move || {
                    (0..1000)
                        .map(|_| {
                            let t = ids.begin();
                            assert!(t.ack_below() <= t.id());
                            t.id()
                        })
                        .collect::<Vec<u64>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().expect("thread panicked"))
            .collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 8000);
        assert_eq!(ids.in_flight(), 0);
        assert_eq!(ids.ack_below(), 8001);
    }
}
