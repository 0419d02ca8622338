//! Fence jobs, on the leader only. The lock table says what is due
//! (`Event::FenceDue`: start the fence, or run level n) and when it is over
//! (`Event::Fenced`); this module runs one step per due fence — propose `FenceStart`,
//! or run one level's agents on a task and propose the outcome as `FenceAttempt` — and
//! waits the back-off after a round in which every level failed. Progress is
//! replicated, so a new leader resumes from the table (`State::fences_due`) at the
//! level after the last one that failed.
//!
//! Must not decide what fencing releases (the table's `complete_fence`) nor how an
//! agent runs (`fence.rs`).

use super::{Input, Outbox, RaftNode};
use crate::config::{Config, FenceDeviceConfig};
use crate::fence;
use crate::state::{Command, FenceNext, NodeState, SessionId, State};
use crate::telemetry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// What one fence level came to, reported by its job.
#[derive(Debug)]
pub struct FenceLevelResult {
    session: SessionId,
    took: Duration,
    level: u32,
    level_index: u32,
    last_level: bool,
    ok: bool,
    detail: String,
}

/// One step of a node's fence.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FenceJob {
    node: String,
    next: FenceNext,
}

pub(super) struct Fencing {
    /// Each configured node's fence devices.
    devices: HashMap<String, Vec<FenceDeviceConfig>>,
    backoff: Duration,
    /// A step whose outcome has not applied this long after its agents' timeouts is
    /// run again (its entry was lost).
    stale_after: Duration,
    /// Steps the table said are due, not yet started.
    due: BTreeMap<SessionId, FenceJob>,
    /// Steps started whose outcome has not applied yet, since when.
    running: HashMap<SessionId, (FenceJob, Instant)>,
    /// Not before this instant: the back-off after a round in which every level failed.
    retry_at: HashMap<SessionId, Instant>,
    /// Nodes already warned about having no fence devices.
    warned: HashSet<SessionId>,
}

impl Fencing {
    pub(super) fn new(config: &Config, proposal_timeout: Duration) -> Fencing {
        Fencing {
            devices: config
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.fence.clone()))
                .collect(),
            backoff: Duration::from_millis(config.fencing.retry_backoff_ms),
            stale_after: proposal_timeout * 2,
            due: BTreeMap::new(),
            running: HashMap::new(),
            retry_at: HashMap::new(),
            warned: HashSet::new(),
        }
    }

    /// The table says this step of the session's fence is due.
    pub(super) fn due(&mut self, session: SessionId, node: String, next: FenceNext) {
        self.running.remove(&session);
        self.due.insert(session, FenceJob { node, next });
    }

    /// The table says the session's fence is over.
    pub(super) fn ended(&mut self, session: SessionId) {
        self.due.remove(&session);
        self.running.remove(&session);
        self.retry_at.remove(&session);
        self.warned.remove(&session);
    }

    /// A new leader picks up every unfinished fence from the table.
    pub(super) fn resume(&mut self, state: &State) {
        for (session, node, node_state, progress) in state.fences_due() {
            let next = match node_state {
                NodeState::Expired => FenceNext::Start,
                _ => FenceNext::Level(progress.next_level_index),
            };
            if !self.running.contains_key(&session) {
                self.due.insert(session, FenceJob { node, next });
            }
        }
    }

    /// Forgets every job (on loss of leadership: the next leader resumes them).
    pub(super) fn clear(&mut self) {
        self.due.clear();
        self.running.clear();
        self.retry_at.clear();
    }

    /// The node's fence levels, in order.
    fn levels(&self, node: &str) -> Vec<(u32, Vec<FenceDeviceConfig>)> {
        let devices = self
            .devices
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or_default();
        fence::levels(devices)
            .into_iter()
            .map(|(level, ds)| (level, ds.into_iter().cloned().collect()))
            .collect()
    }

    /// The longest one of the node's levels may run.
    fn level_timeout(&self, node: &str) -> Duration {
        self.levels(node)
            .iter()
            .map(|(_, ds)| ds.iter().map(|d| Duration::from_millis(d.timeout_ms)).sum())
            .max()
            .unwrap_or_default()
    }

    /// The steps to start now: due ones past their back-off, and stale ones again.
    fn take_ready(&mut self, now: Instant) -> Vec<(SessionId, FenceJob)> {
        let stale: Vec<SessionId> = self
            .running
            .iter()
            .filter(|(_, (job, since))| {
                now.duration_since(*since) >= self.level_timeout(&job.node) + self.stale_after
            })
            .map(|(session, _)| *session)
            .collect();
        for session in stale {
            if let Some((job, _)) = self.running.remove(&session) {
                self.due.entry(session).or_insert(job);
            }
        }
        let ready: Vec<SessionId> = self
            .due
            .keys()
            .copied()
            .filter(|s| self.retry_at.get(s).is_none_or(|at| now >= *at))
            .collect();
        let mut jobs = Vec::with_capacity(ready.len());
        for session in ready {
            if let Some(job) = self.due.remove(&session) {
                self.running.insert(session, (job.clone(), now));
                jobs.push((session, job));
            }
        }
        jobs
    }
}

impl<O: Outbox> RaftNode<O> {
    /// Starts every fence step that is due. Only the leader fences.
    pub(super) fn run_fences(&mut self, now: Instant) {
        for (session, job) in self.fencing.take_ready(now) {
            match job.next {
                FenceNext::Start => {
                    info!(session, node = %job.node, "fencing node");
                    self.propose_quietly(Command::FenceStart { session });
                }
                FenceNext::Level(index) => self.start_level(session, &job.node, index),
            }
        }
    }

    /// Runs level `index` of the node's levels on a task of its own; its outcome comes
    /// back as [`Input::FenceLevelDone`].
    fn start_level(&mut self, session: SessionId, node: &str, index: u32) {
        let levels = self.fencing.levels(node);
        if levels.is_empty() {
            self.fencing.running.remove(&session);
            if self.fencing.warned.insert(session) {
                warn!(session, %node, "no fence devices configured; the node's locks stay held until `lockctl fence ack {node}`");
            }
            return;
        }
        let level_index = index as usize % levels.len();
        let last_level = level_index + 1 == levels.len();
        let (level, devices) = levels.into_iter().nth(level_index).unwrap_or_default();
        info!(session, %node, level, "running fence level");
        let inputs = self.inputs_tx.clone();
        let node = node.to_string();
        tokio::spawn(async move {
            let fence::LevelRun { ok, detail, took } =
                fence::run_level_summary(&devices, &node).await;
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
                let at = Instant::now() + self.fencing.backoff;
                self.fencing.retry_at.insert(r.session, at);
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
