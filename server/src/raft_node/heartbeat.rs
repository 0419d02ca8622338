use super::*;

pub(super) type BeatReply = oneshot::Sender<Result<Option<NodeState>, ProposeError>>;

pub(super) struct BeatBatch {
    pub(super) beats: Vec<(SessionId, BeatReply)>,
    pub(super) deadline: Instant,
}

impl<O: Outbox> RaftNode<O> {
    pub(super) fn on_heartbeat(&mut self, session: SessionId, reply: BeatReply) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        match self.state.session_state(session) {
            Some(state) if state.may_act() => {
                self.liveness.heard(session, Instant::now());
                if state == NodeState::WasLoggedIn && self.reconnecting.insert(session) {
                    self.propose_quietly(Command::Reconnect { session });
                }
                self.beats.push((session, reply));
            }
            // Unknown, or failed and not yet fenced: not heard, only told its state.
            state => {
                let _ = reply.send(Ok(state));
            }
        }
    }

    /// Confirms this turn's heartbeats with one ReadIndex round: the answer then
    /// proves this server still led after it received them (see the client's rule).
    pub(super) fn flush_beats(&mut self) {
        if self.beats.is_empty() {
            return;
        }
        let ctx = self.next_read_ctx;
        self.next_read_ctx += 1;
        self.raw.read_index(ctx.to_le_bytes().to_vec());
        self.beat_batches.insert(
            ctx,
            BeatBatch {
                beats: std::mem::take(&mut self.beats),
                deadline: Instant::now() + self.proposal_timeout,
            },
        );
    }

    pub(super) fn answer_beats(&mut self, read_states: Vec<raft::ReadState>) {
        for rs in read_states {
            let Some(ctx) = rs.request_ctx.get(0..8).and_then(|b| b.try_into().ok()) else {
                continue;
            };
            if let Some(batch) = self.beat_batches.remove(&u64::from_le_bytes(ctx)) {
                for (session, tx) in batch.beats {
                    let _ = tx.send(Ok(self.state.session_state(session)));
                }
            }
        }
    }
}
