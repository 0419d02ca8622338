use super::*;

impl<O: Outbox> RaftNode<O> {
    pub(super) fn dispatch(&mut self, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Finished {
                    session,
                    request_id,
                    ref result,
                } => {
                    if let Some(txs) = self.parked.remove(&(session, request_id)) {
                        let reply = match result {
                            Ok(grant) => Reply::Granted(grant.clone()),
                            Err(e) => Reply::Failed(e.clone()),
                        };
                        for tx in txs {
                            let _ = tx.send(Ok(reply.clone()));
                        }
                    }
                    self.stream_event(session, event);
                }
                Event::Blocking { session, .. } | Event::NeedRecovery { session, .. } => {
                    self.stream_event(session, event)
                }
                Event::SessionExpired { session } => {
                    self.liveness.expired(session);
                    self.stream_event(session, event);
                    // The notice is the stream's last word.
                    self.streams.remove(&session);
                }
            }
        }
    }

    /// Puts an event on the session's stream. A stream whose reader has fallen too far
    /// behind is closed rather than buffered without bound; the client reopens it.
    pub(super) fn stream_event(&mut self, session: SessionId, event: Event) {
        if let Some(tx) = self.streams.get(&session) {
            if tx.try_send(event).is_err() {
                warn!(session, "event stream full or closed; dropping it");
                self.streams.remove(&session);
            }
        }
    }
}
