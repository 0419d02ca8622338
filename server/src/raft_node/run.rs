//! The run loop: one turn is a tick or a batch of queued inputs, then one Raft Ready
//! (`ready`), then the end of the turn (leadership changes, fence jobs, status).
//! Inputs are routed here to the module that owns them.

use super::proposals::{Own, Waiting};
use super::{Input, Op, Outbox, ProposeError, RaftNode};
use crate::state::{Command, Event, NodeState, SessionId};
use raft::StateRole;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// Most inputs taken per loop turn before a Ready is handled, so one turn stays short.
const MAX_INPUTS_PER_TURN: usize = 4_096;

/// A storage failure means this server can no longer promise durability: it stops
/// rather than acknowledge anything more.
pub(super) fn stop_on_storage_failure(e: impl std::fmt::Display) -> ! {
    error!("fatal storage error, stopping this server: {e}");
    std::process::exit(70);
}

impl<O: Outbox> RaftNode<O> {
    /// Runs the driver on its own thread (fsync blocks it, so it must not share a
    /// runtime worker with the gRPC services) until every [`Handle`] is dropped.
    pub fn spawn(self) -> std::thread::JoinHandle<()> {
        std::thread::Builder::new()
            .name(format!("raft-{}", self.id))
            .spawn(move || {
                // Time for ticks, I/O for the fence agents it runs.
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        // No driver, no server: exit rather than serve without one.
                        error!("cannot start the Raft driver's runtime, stopping: {e}");
                        std::process::exit(70);
                    }
                };
                rt.block_on(self.run());
            })
            .expect("spawning the Raft driver thread")
    }

    /// The loop: a tick or a batch of inputs, then one Ready, then the end of the turn.
    /// Returns when every sender of the input queue is gone.
    pub(super) async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.timing.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut watchdog = crate::watchdog::Watchdog::from_env();
        loop {
            tokio::select! {
                _ = ticker.tick() => self.on_tick(),
                input = self.inputs.recv() => {
                    let Some(input) = input else { return };
                    self.on_input(input);
                    for _ in 0..MAX_INPUTS_PER_TURN {
                        match self.inputs.try_recv() {
                            Ok(input) => self.on_input(input),
                            Err(_) => break,
                        }
                    }
                    self.flush_commands();
                }
            }
            let deadline = Instant::now() + self.timing.proposal_timeout;
            self.beats.flush(&mut self.raw, deadline);
            if let Err(e) = self.on_ready() {
                stop_on_storage_failure(e);
            }
            self.after_turn();
            watchdog.alive();
        }
    }

    pub(super) fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    pub(super) fn is_leader(&self) -> bool {
        self.raw.raft.state == StateRole::Leader
    }

    pub(super) fn not_leader(&self) -> ProposeError {
        let leader = self.raw.raft.leader_id;
        ProposeError::NotLeader {
            leader: (leader != 0)
                .then(|| self.addrs.get(&leader).cloned())
                .flatten(),
        }
    }

    fn on_tick(&mut self) {
        self.tick_raft();
        let now = Instant::now();
        self.proposals.expire(now, self.timing.proposal_timeout);
        self.beats.expire(now);
        if self.is_leader() {
            for session in self.liveness.overdue(self.state.live_sessions(), now) {
                warn!(session, "node missed its heartbeats; proposing expiry");
                self.propose_quietly(Command::Expire { session });
            }
            // Queue timeouts: the lock table only learns the time from entries, so the
            // leader proposes a Tick when a deadline has passed.
            if self
                .state
                .next_deadline_ms()
                .is_some_and(|d| d <= Self::now_ms())
            {
                self.propose_once(Own::Tick, Command::Tick);
            }
            self.run_unfences(now);
        }
        self.unfencer.answer_overdue(now);
        self.publish_status();
    }

    fn on_input(&mut self, input: Input) {
        match input {
            Input::Propose { command, reply } => self.propose_command(command, reply),
            Input::Read { query, reply } => {
                self.propose_with(Op::Read, Waiting::Read(query, reply), None)
            }
            Input::Heartbeat { session, reply } => self.on_heartbeat(session, reply),
            Input::Subscribe {
                session,
                events,
                reply,
            } => self.on_subscribe(session, events, reply),
            Input::Nodes(reply) => {
                let _ = reply.send(self.node_rows());
            }
            Input::FenceHistory(reply) => {
                let _ = reply.send(self.state.fence_history().cloned().collect());
            }
            Input::FenceLevelDone(result) => self.on_fence_level_done(result),
            Input::UnfenceDone(run) => self.on_unfence_done(run),
            Input::Departures(reply) => {
                let _ = reply.send(self.departures());
            }
            Input::SnapshotWritten(written) => {
                if let Err(e) = self.on_snapshot_written(written) {
                    stop_on_storage_failure(e);
                }
            }
            Input::Locks { query, reply } => {
                let _ = reply.send(self.resource_rows(query));
            }
            Input::TransferLeadership(reply) => {
                let _ = reply.send(self.transfer_leadership());
            }
            Input::ChangeMembership { change, reply } => match self.propose_membership(change) {
                Ok(seq) => self.proposals.track(seq, Waiting::Membership(reply), None),
                Err(e) => {
                    let _ = reply.send(Err(e));
                }
            },
            Input::Raft(m) => {
                self.heard.insert(m.from, Instant::now());
                if let Err(e) = self.raw.step(*m) {
                    debug!("dropped a Raft message: {e}");
                }
            }
            Input::Unreachable(to) => self.raw.report_unreachable(to),
            Input::PeerConfirmed(peer) => self.gate.confirmed(peer),
            Input::PeerLogFormat { peer, format } => self.log_format_announced(peer, format),
            Input::SnapshotSent { to, ok } => {
                let status = if ok {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                };
                self.raw.report_snapshot(to, status);
            }
        }
    }

    /// Opens a live session's event stream on the leader; answers its state.
    fn on_subscribe(
        &mut self,
        session: SessionId,
        events: mpsc::Sender<Event>,
        reply: oneshot::Sender<Option<NodeState>>,
    ) {
        let state = self.state.session_state(session);
        if self.is_leader() && state.is_some_and(NodeState::may_act) {
            // A reopened stream is owed what a lost one may have missed.
            for event in self.state.pending_recoveries(session) {
                let _ = events.try_send(event);
            }
            self.streams.open(session, events);
        }
        let _ = reply.send(state);
    }

    /// Publishes the status when anything changed, follows a change of leadership, and
    /// starts the fence steps that are due.
    fn after_turn(&mut self) {
        if self.applied != self.status_tx.borrow().applied {
            self.publish_status();
        }
        let leader = self.is_leader();
        if self.was_leader && !leader {
            self.lost_leadership();
        }
        if leader != self.was_leader {
            self.was_leader = leader;
            if leader {
                self.became_leader();
            }
            self.publish_status();
        }
        if leader {
            self.run_fences(Instant::now());
        }
    }

    /// Fails everything in flight: this server can no longer answer it; clients retry
    /// on the new leader with the same request ids.
    fn lost_leadership(&mut self) {
        warn!(
            term = self.raw.raft.term,
            "lost leadership; failing in-flight calls so clients retry"
        );
        let err = self.not_leader();
        self.proposals.fail_all(&err);
        self.beats.fail_all(&err);
        // Closing the streams sends every node to the new leader.
        self.streams.clear();
        self.liveness.lost_leadership();
        self.fencing.clear();
        self.unfencer.lost_leadership(&err);
    }

    fn became_leader(&mut self) {
        info!(term = self.raw.raft.term, "became leader");
        // Failover grace (BRIEF §3.4): nobody has been heard from yet under this
        // leader; each session gets the grace period from now.
        self.liveness.became_leader(Instant::now());
        self.propose_quietly(Command::Failover);
        // Fences a former leader left unfinished are in the table.
        self.fencing.resume(&self.state);
    }
}
