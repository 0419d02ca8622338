use super::*;

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

    pub(super) async fn run(mut self) {
        let mut ticker = tokio::time::interval(self.tick);
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
                }
            }
            self.flush_beats();
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

    pub(super) fn on_tick(&mut self) {
        self.tick_raft();
        let now = Instant::now();
        // Fail proposals that could not be committed in time: without a quorum the
        // caller must hear so quickly rather than hang (BRIEF §3.1).
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, p)| now.duration_since(p.proposed) >= self.proposal_timeout)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(p) = self.in_flight.remove(&seq) {
                let msg = format!(
                    "entry not committed within {} ms",
                    self.proposal_timeout.as_millis()
                );
                fail(p.waiting, ProposeError::NoQuorum(msg));
            }
        }
        let late: Vec<u64> = self
            .beat_batches
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(ctx, _)| *ctx)
            .collect();
        for ctx in late {
            if let Some(batch) = self.beat_batches.remove(&ctx) {
                for (_, tx) in batch.beats {
                    let _ = tx.send(Err(ProposeError::NoQuorum(
                        "leadership not confirmed by a quorum in time".into(),
                    )));
                }
            }
        }
        if self.is_leader() {
            for session in self.liveness.overdue(self.state.live_sessions(), now) {
                warn!(session, "node missed its heartbeats; proposing expiry");
                self.propose_quietly(Command::Expire { session });
            }
            self.run_fences(now);
        }
        // Queue timeouts: the lock table only learns the time from entries, so the
        // leader proposes a Tick when a deadline has passed.
        if self.is_leader() {
            let due = self
                .state
                .next_deadline_ms()
                .is_some_and(|d| d <= Self::now_ms());
            let idle = self
                .tick_proposed_at
                .is_none_or(|at| now.duration_since(at) > self.proposal_timeout);
            if due && idle {
                self.tick_proposed_at = Some(now);
                self.propose_quietly(Command::Tick);
            }
        }
        self.publish_status();
    }

    pub(super) fn on_input(&mut self, input: Input) {
        match input {
            Input::Propose { command, reply } => {
                let park_as = match &command {
                    Command::Lock {
                        session,
                        request_id,
                        ..
                    }
                    | Command::Convert {
                        session,
                        request_id,
                        ..
                    } => Some((*session, *request_id)),
                    _ => None,
                };
                let envelope = Envelope {
                    now_ms: Self::now_ms(),
                    op: Op::Apply(command),
                };
                self.propose_with(&envelope, Waiting::Command(reply), park_as);
            }
            Input::Read { query, reply } => {
                let envelope = Envelope {
                    now_ms: Self::now_ms(),
                    op: Op::Read,
                };
                self.propose_with(&envelope, Waiting::Read(query, reply), None);
            }
            Input::Heartbeat { session, reply } => self.on_heartbeat(session, reply),
            Input::Subscribe {
                session,
                events,
                reply,
            } => {
                let state = self.state.session_state(session);
                if self.is_leader() && state.is_some_and(NodeState::may_act) {
                    // A reopened stream is owed what a lost one may have missed.
                    for event in self.state.pending_recoveries(session) {
                        let _ = events.try_send(event);
                    }
                    self.streams.insert(session, events);
                }
                let _ = reply.send(state);
            }
            Input::Nodes(reply) => {
                let _ = reply.send(self.node_rows());
            }
            Input::FenceHistory(reply) => {
                let _ = reply.send(self.state.fence_history().cloned().collect());
            }
            Input::FenceLevelDone(result) => self.on_fence_level_done(result),
            Input::SnapshotWritten { written, write } => {
                if let Err(e) = self.on_snapshot_written(written, write) {
                    stop_on_storage_failure(e);
                }
            }
            Input::Locks(lockspace, resource, limit, reply) => {
                let _ = reply.send(self.resource_rows(lockspace, resource, limit));
            }
            Input::TransferLeadership(reply) => {
                let _ = reply.send(self.transfer_leadership());
            }
            Input::ChangeMembership { change, reply } => {
                let seq = match self.propose_membership(change) {
                    Ok(seq) => seq,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return;
                    }
                };
                self.track(seq, Waiting::Membership(reply), None);
            }
            Input::Raft(m) => {
                self.heard.insert(m.from, Instant::now());
                if let Err(e) = self.raw.step(*m) {
                    debug!("dropped a Raft message: {e}");
                }
            }
            Input::Unreachable(to) => self.raw.report_unreachable(to),
            Input::PeerConfirmed(peer) => {
                if self.unconfirmed.remove(&peer) && self.unconfirmed.is_empty() {
                    info!("every configured server confirmed this cluster's identity");
                }
            }
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

    /// Publishes the status when anything changed, and fails everything in flight on
    /// loss of leadership: this server can no longer answer it.
    pub(super) fn after_turn(&mut self) {
        if self.applied != self.status_tx.borrow().applied {
            self.publish_status();
        }
        let leader = self.is_leader();
        if self.was_leader && !leader {
            warn!(
                term = self.raw.raft.term,
                "lost leadership; failing in-flight calls so clients retry"
            );
            let err = self.not_leader();
            for (_, p) in self.in_flight.drain() {
                fail(p.waiting, err.clone());
            }
            for (_, txs) in self.parked.drain() {
                for tx in txs {
                    let _ = tx.send(Err(err.clone()));
                }
            }
            for (_, batch) in self.beat_batches.drain() {
                for (_, tx) in batch.beats {
                    let _ = tx.send(Err(err.clone()));
                }
            }
            for (_, tx) in self.beats.drain(..) {
                let _ = tx.send(Err(err.clone()));
            }
            self.tick_proposed_at = None;
            self.reconnecting.clear();
            // Closing the streams sends every node to the new leader.
            self.streams.clear();
            self.liveness.lost_leadership();
            self.fence_busy.clear();
            self.fence_retry_at.clear();
        }
        if leader != self.was_leader {
            self.was_leader = leader;
            if leader {
                info!(term = self.raw.raft.term, "became leader");
                // Failover grace (BRIEF §3.4): nobody has been heard from yet under
                // this leader; each session gets the grace period from now.
                self.liveness.became_leader(Instant::now());
                self.propose_quietly(Command::Failover);
            }
            self.publish_status();
        }
    }
}
