//! Request records: how a request-carrying command is admitted (new, a retry that
//! gets its first outcome back, or refused), the client's acknowledgements, and the
//! bounded record of finished requests that makes retries applied-once.

use super::command::{LockError, Reply, RequestId, SessionId};
use super::digest::Digest;
use super::limits::*;
use super::model::Done;
use super::table::{invalid, State};
use std::sync::Arc;

/// Whether a request-carrying command is new or a retry.
pub(super) enum Admission {
    /// Already applied: answer with the first outcome and change nothing.
    Retry(Reply),
    New,
}

impl State {
    // ---- request records ----

    /// Looks the request up: a retry (the same id and the same request, by `digest`)
    /// gets the first outcome back; the same id with another request is refused; a new
    /// request must not be stale.
    pub(super) fn admit(
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
    pub(super) fn accept(&mut self, session: SessionId, ack_below: RequestId) {
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
        let Some(s) = self.core.sessions.get_mut(&session).map(Arc::make_mut) else {
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
}
