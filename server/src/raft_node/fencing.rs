use super::*;

/// What one fence level came to, reported by its job.
#[derive(Debug)]
pub struct FenceLevelResult {
    pub(super) session: SessionId,
    pub(super) took: Duration,
    pub(super) level: u32,
    pub(super) level_index: u32,
    pub(super) last_level: bool,
    pub(super) ok: bool,
    pub(super) detail: String,
}

impl<O: Outbox> RaftNode<O> {
    /// Starts the next fence level of every expired or fencing node that has none
    /// running. Only the leader fences; progress is replicated, so a new leader
    /// resumes at the level after the last one that failed.
    pub(super) fn run_fences(&mut self, now: Instant) {
        let stale_after = self.proposal_timeout * 2;
        for (session, node, state, progress) in self.state.fences_due() {
            let devices = self.fence_devices.get(&node).cloned().unwrap_or_default();
            let levels = fence::levels(&devices);
            let level_timeout: Duration = levels
                .iter()
                .map(|(_, ds)| ds.iter().map(|d| Duration::from_millis(d.timeout_ms)).sum())
                .max()
                .unwrap_or_default();
            if self
                .fence_busy
                .get(&session)
                .is_some_and(|since| now.duration_since(*since) < level_timeout + stale_after)
            {
                continue;
            }
            if self
                .fence_retry_at
                .get(&session)
                .is_some_and(|at| now < *at)
            {
                continue;
            }
            if state == NodeState::Expired {
                info!(session, %node, "fencing node");
                self.propose_quietly(Command::FenceStart { session });
            }
            if levels.is_empty() {
                if self.fence_warned.insert(session) {
                    warn!(session, %node, "no fence devices configured; the node's locks stay held until `lockctl fence ack {node}`");
                }
                continue;
            }
            let level_index = progress.next_level_index as usize % levels.len();
            let (level, level_devices) = &levels[level_index];
            let level_devices: Vec<FenceDeviceConfig> =
                level_devices.iter().map(|d| (*d).clone()).collect();
            let (level, last_level) = (*level, level_index + 1 == levels.len());
            info!(session, %node, level, "running fence level");
            self.fence_busy.insert(session, now);
            let inputs = self.inputs_tx.clone();
            tokio::spawn(async move {
                let refs: Vec<&FenceDeviceConfig> = level_devices.iter().collect();
                let started = Instant::now();
                let outcomes = fence::run_level(&refs, &node).await;
                let took = started.elapsed();
                let ok = outcomes.len() == refs.len() && outcomes.iter().all(|(_, o)| o.ok);
                let detail = outcomes
                    .iter()
                    .map(|(i, o)| {
                        let agent = refs[*i]
                            .agent
                            .file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        format!("{agent}: {}", o.detail)
                    })
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = inputs
                    .send(Input::FenceLevelDone(FenceLevelResult {
                        session,
                        took,
                        level,
                        level_index: level_index as u32,
                        last_level,
                        ok,
                        detail,
                    }))
                    .await;
            });
        }
    }

    pub(super) fn on_fence_level_done(&mut self, r: FenceLevelResult) {
        telemetry::fence_attempt(r.ok, r.took);
        if !self.is_leader() {
            // The new leader resumes from the replicated progress.
            return;
        }
        if r.ok {
            info!(session = r.session, level = r.level, detail = %r.detail, "fence succeeded");
        } else {
            warn!(session = r.session, level = r.level, detail = %r.detail, "fence level failed");
            if r.last_level {
                self.fence_retry_at
                    .insert(r.session, Instant::now() + self.fence_backoff);
            }
        }
        self.propose_quietly(Command::FenceAttempt {
            session: r.session,
            level: r.level,
            level_index: r.level_index,
            last_level: r.last_level,
            ok: r.ok,
            detail: r.detail,
        });
    }
}
