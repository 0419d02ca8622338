//! The effects step: what one applied entry's reply and events cause outside the lock
//! table. The caller of the entry gets the reply (or is parked); parked callers get
//! their request's outcome; nodes get their events on their streams; the leader's
//! fence jobs and liveness record follow the table's word.
//!
//! Decides nothing itself: every effect here is named by a `Reply` or an `Event`.

use super::proposals::{InFlight, Waiting};
use super::{Outbox, RaftNode};
use crate::state::{Event, Reply, SessionId};
use crate::telemetry;
use std::collections::HashMap;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::warn;

/// Open event streams of sessions (only on the leader).
#[derive(Default)]
pub(super) struct EventStreams(HashMap<SessionId, mpsc::Sender<Event>>);

impl EventStreams {
    /// Opens (or replaces) the session's stream.
    pub(super) fn open(&mut self, session: SessionId, events: mpsc::Sender<Event>) {
        self.0.insert(session, events);
    }

    /// Puts an event on the session's stream. A stream whose reader has fallen too far
    /// behind is closed rather than buffered without bound; the client reopens it.
    fn send(&mut self, session: SessionId, event: Event) {
        if let Some(tx) = self.0.get(&session) {
            if tx.try_send(event).is_err() {
                warn!(session, "event stream full or closed; dropping it");
                self.0.remove(&session);
            }
        }
    }

    fn close(&mut self, session: SessionId) {
        self.0.remove(&session);
    }

    /// Closes every stream, which sends every node to the new leader.
    pub(super) fn clear(&mut self) {
        self.0.clear();
    }
}

impl<O: Outbox> RaftNode<O> {
    /// Everything an applied command's outcome causes: the caller's answer, then the
    /// events in the order the table emitted them.
    pub(super) fn effects(&mut self, caller: Option<InFlight>, reply: Reply, events: Vec<Event>) {
        count_outcomes(&reply, &events);
        // A new session's expiry window starts at its login.
        if let Reply::LoggedIn { session } = reply {
            self.liveness.heard(session, Instant::now());
        }
        match (caller, reply) {
            // A login waits for its node's unfencing (held, answered by `Unfenced`).
            (
                Some(InFlight {
                    waiting: Waiting::Command(tx),
                    ..
                }),
                Reply::Unfencing { session },
            ) => self.unfencer.hold(session, tx, Instant::now()),
            (Some(p), reply) => self.proposals.answer(p, reply),
            (None, _) => {}
        }
        for event in events {
            self.dispatch(event);
        }
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Finished {
                session,
                request_id,
                ref result,
            } => {
                let reply = match result {
                    Ok(grant) => Reply::Granted(grant.clone()),
                    Err(e) => Reply::Failed(e.clone()),
                };
                self.proposals.finish((session, request_id), reply);
                self.streams.send(session, event);
            }
            Event::Blocking { session, .. } | Event::NeedRecovery { session, .. } => {
                self.streams.send(session, event)
            }
            Event::SessionExpired { session } => {
                self.liveness.expired(session);
                self.streams.send(session, event);
                // The notice is the stream's last word.
                self.streams.close(session);
            }
            Event::FenceDue {
                session,
                node,
                next,
            } => {
                // Only the leader fences; a new one finds what is due in the table.
                if self.is_leader() {
                    self.fencing.due(session, node, next);
                }
            }
            Event::Fenced { session } => self.fencing.ended(session),
            Event::Unfenced {
                session,
                ref result,
            } => {
                // A new session's expiry window starts once it is LoggedIn.
                if result.is_ok() {
                    self.liveness.heard(session, Instant::now());
                }
                self.unfencer.unfenced(session, result);
            }
            Event::UnfenceDue { session } => self.unfencer.attempt_recorded(session),
            Event::LoggedOut { session } => self.liveness.forget(session),
        }
    }
}

/// Grants, waits and expiries for the metrics.
fn count_outcomes(reply: &Reply, events: &[Event]) {
    match reply {
        Reply::Granted(_) => telemetry::granted(1),
        Reply::Queued { .. } => telemetry::queued(),
        _ => {}
    }
    for e in events {
        match e {
            Event::Finished { result: Ok(_), .. } => telemetry::granted(1),
            Event::SessionExpired { .. } => telemetry::expired(),
            _ => {}
        }
    }
}
