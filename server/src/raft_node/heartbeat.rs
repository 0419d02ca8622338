//! Heartbeats, answered only once this leader confirmed with a quorum that it still
//! leads: the heartbeats of one loop turn share one ReadIndex round, so a thousand
//! nodes cost one round, not a thousand. The answer then proves the leader led after
//! it heard the node, which the client's `Lost` rule relies on (see `keeper.rs`).

use super::proposals::Own;
use super::{Outbox, ProposeError, RaftNode};
use crate::state::{Command, NodeState, SessionId, State};
use crate::storage::DiskStorage;
use raft::RawNode;
use std::collections::HashMap;
use std::time::Instant;
use tokio::sync::oneshot;

pub(super) type BeatReply = oneshot::Sender<Result<Option<NodeState>, ProposeError>>;

/// Heartbeats of this turn, and the batches waiting for their ReadIndex.
#[derive(Default)]
pub(super) struct Beats {
    /// Received this turn, confirmed together by one ReadIndex at its end.
    pending: Vec<(SessionId, BeatReply)>,
    /// Waiting for their ReadIndex, by request context.
    batches: HashMap<u64, BeatBatch>,
    next_ctx: u64,
}

struct BeatBatch {
    beats: Vec<(SessionId, BeatReply)>,
    deadline: Instant,
}

impl Beats {
    /// Asks Raft for one ReadIndex covering this turn's heartbeats; they are answered
    /// when it returns, or fail at `deadline`.
    pub(super) fn flush(&mut self, raw: &mut RawNode<DiskStorage>, deadline: Instant) {
        if self.pending.is_empty() {
            return;
        }
        let ctx = self.next_ctx;
        self.next_ctx += 1;
        raw.read_index(ctx.to_le_bytes().to_vec());
        self.batches.insert(
            ctx,
            BeatBatch {
                beats: std::mem::take(&mut self.pending),
                deadline,
            },
        );
    }

    /// Answers the batches whose ReadIndex came back, with each session's state.
    pub(super) fn confirmed(&mut self, read_states: Vec<raft::ReadState>, state: &State) {
        for rs in read_states {
            let Some(ctx) = rs.request_ctx.get(0..8).and_then(|b| b.try_into().ok()) else {
                continue;
            };
            if let Some(batch) = self.batches.remove(&u64::from_le_bytes(ctx)) {
                for (session, tx) in batch.beats {
                    let _ = tx.send(Ok(state.session_state(session)));
                }
            }
        }
    }

    /// Fails the batches whose leadership was not confirmed in time.
    pub(super) fn expire(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .batches
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in late {
            if let Some(batch) = self.batches.remove(&ctx) {
                for (_, tx) in batch.beats {
                    let _ = tx.send(Err(ProposeError::NoQuorum(
                        "leadership not confirmed by a quorum in time".into(),
                    )));
                }
            }
        }
    }

    /// Fails every heartbeat not yet answered (on loss of leadership).
    pub(super) fn fail_all(&mut self, err: &ProposeError) {
        let batches = self.batches.drain().flat_map(|(_, b)| b.beats);
        for (_, tx) in batches.chain(self.pending.drain(..)) {
            let _ = tx.send(Err(err.clone()));
        }
    }
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
                if state == NodeState::WasLoggedIn {
                    self.propose_once(Own::Reconnect(session), Command::Reconnect { session });
                }
                self.beats.pending.push((session, reply));
            }
            // Unknown, or failed and not yet fenced: not heard, only told its state.
            state => {
                let _ = reply.send(Ok(state));
            }
        }
    }
}
