//! Unfencing on the leader (issue 15): runs a node's unfence devices with
//! `action=on` before its login is answered, and holds that login meanwhile.
//!
//! Storage fencing (`fence_scsi`, `fence_mpath`) fences a node by removing its
//! reservation key from the shared disks; the node gets back onto them only when it is
//! *unfenced* (`action=on`), which Pacemaker does before it starts anything on a node,
//! with every device that has `provides=unfencing`. lockd's equivalent is a fence
//! device with `unfence = true`: a login of such a node is proposed as
//! `Command::LoginUnfencing`, the lock table creates the session `Unfencing` (it may
//! do nothing), and this module, on the leader only:
//!
//! - runs all of the node's unfence devices, in level then config order, one after
//!   another, stopping at the first failure (every one must succeed: a node with one
//!   path still fenced would see I/O errors), through `fence::run_level`, so each
//!   agent gets the fence-agents stdin protocol, its own process group and its
//!   timeout;
//! - reports each run as `Command::UnfenceAttempt`; after a failure it waits
//!   [`UNFENCE_RETRY_DELAY`], and the attempt that uses up `[fencing] unfence_attempts`
//!   says `last_attempt`, which makes the table end the session and refuse the login;
//! - holds the login calls of Unfencing sessions and answers them when the table's
//!   `Event::Unfenced` says how it ended. A held call is answered `Reply::Unfencing`
//!   after [`LOGIN_HOLD`] instead, which the service turns into UNAVAILABLE with the
//!   `lockd-unfencing` metadata, so the client asks again (same nonce, same session)
//!   rather than taking a slow unfencing for a lost quorum.
//!
//! Progress (failed attempts) is replicated in the table, so a new leader resumes an
//! unfencing where the old one stopped; what is only here (runs in progress, back-off,
//! held calls) is dropped with the leadership, and held calls fail with NotLeader so
//! their clients retry on the new leader. A node whose config no longer has unfence
//! devices while one of its sessions is Unfencing (the config changed since the login)
//! cannot be unfenced: that login is refused, and the node's next login follows the
//! new config.

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::{info, warn};

use crate::config::{Config, FenceDeviceConfig};
use crate::fence;
use crate::raft_node::ProposeError;
use crate::state::{Command, LockError, NodeState, Reply, SessionId, State};

/// Pause after a failed unfence attempt before the next one.
pub const UNFENCE_RETRY_DELAY: Duration = Duration::from_secs(1);
/// How long the leader holds a login call while its node is being unfenced before it
/// answers "still unfencing" (the client then asks again). Below the client library's
/// default per-attempt timeout (1 s), so the answer arrives before the client gives up
/// on the attempt.
pub const LOGIN_HOLD: Duration = Duration::from_millis(500);

/// Whether a login of `node` must wait for its unfencing (it has a device with
/// `unfence = true`).
pub fn needs_unfencing(config: &Config, node: &str) -> bool {
    config
        .node(node)
        .is_some_and(|n| n.fence.iter().any(|d| d.unfence))
}

/// The command a login becomes: `LoginUnfencing` for a node that needs unfencing,
/// else the Login itself. Any other command is returned unchanged.
pub fn login_command(config: &Config, command: Command) -> Command {
    match command {
        Command::Login { node, nonce } if needs_unfencing(config, &node) => {
            Command::LoginUnfencing { node, nonce }
        }
        other => other,
    }
}

/// One run of a node's unfence devices, reported by its job to the driver.
#[derive(Debug)]
pub struct UnfenceRun {
    pub session: SessionId,
    pub ok: bool,
    /// "<agent>: <outcome>" per device run, `; `-separated (never a parameter value).
    pub detail: String,
    pub took: Duration,
}

type HeldLogin = oneshot::Sender<Result<Reply, ProposeError>>;

/// The leader's unfencing work: which runs are in progress, their back-off, and the
/// login calls waiting for them. Everything here is volatile (see the module doc).
pub struct Unfencer {
    /// Each node's unfence devices, `action = on`, in the order they run.
    devices: HashMap<String, Vec<FenceDeviceConfig>>,
    attempts: u32,
    /// Sessions with a run in progress or its attempt not yet applied, since when.
    busy: HashMap<SessionId, Instant>,
    /// Not before this instant: the pause after a failed attempt.
    retry_at: HashMap<SessionId, Instant>,
    /// Login calls waiting for their session's unfencing, with when each was held.
    held: HashMap<SessionId, Vec<(HeldLogin, Instant)>>,
    /// A run whose attempt was not applied this long after its devices' timeouts is
    /// taken as lost (its proposal dropped) and started again.
    stale_after: Duration,
}

impl Unfencer {
    pub fn new(config: &Config, stale_after: Duration) -> Unfencer {
        Unfencer {
            devices: config
                .nodes
                .iter()
                .map(|n| (n.name.clone(), n.unfence_devices()))
                .filter(|(_, devices)| !devices.is_empty())
                .collect(),
            attempts: config.fencing.unfence_attempts.max(1),
            busy: HashMap::new(),
            retry_at: HashMap::new(),
            held: HashMap::new(),
            stale_after,
        }
    }

    /// Leader only, every tick: starts a run for each Unfencing session that has none
    /// and is not backing off; `report` carries each run's outcome back to the driver
    /// (which then calls [`Unfencer::ran`]). Returns commands to propose at once (the
    /// refusal of a session whose node has no unfence devices any more).
    pub fn start_due<F, Fut>(&mut self, state: &State, now: Instant, report: F) -> Vec<Command>
    where
        F: FnOnce(UnfenceRun) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = ()> + Send,
    {
        let mut commands = Vec::new();
        for (session, node, progress) in state.unfences_due() {
            let devices = self.devices.get(&node).cloned().unwrap_or_default();
            let run_timeout: Duration = devices
                .iter()
                .map(|d| Duration::from_millis(d.timeout_ms))
                .sum();
            if self
                .busy
                .get(&session)
                .is_some_and(|since| now.duration_since(*since) < run_timeout + self.stale_after)
            {
                continue;
            }
            if self.retry_at.get(&session).is_some_and(|at| now < *at) {
                continue;
            }
            self.busy.insert(session, now);
            if devices.is_empty() {
                warn!(session, %node, "node is being unfenced but has no unfence devices any more (config changed); refusing its login");
                commands.push(Command::UnfenceAttempt {
                    session,
                    ok: false,
                    last_attempt: true,
                    detail: "no device with unfence = true is configured for the node \
                             any more (the config changed since the login)"
                        .to_string(),
                });
                continue;
            }
            info!(
                session,
                %node,
                attempt = progress.failed_rounds + 1,
                of = self.attempts,
                "unfencing node (action=on) before answering its login"
            );
            let report = report.clone();
            tokio::spawn(async move {
                let run = fence::run_level_summary(&devices, &node).await;
                report(UnfenceRun {
                    session,
                    ok: run.ok,
                    detail: run.detail,
                    took: run.took,
                })
                .await;
            });
        }
        commands
    }

    /// A run finished (leader only): the attempt to propose, or `None` if the session
    /// is no longer being unfenced (a stale run).
    pub fn ran(&mut self, run: UnfenceRun, state: &State, now: Instant) -> Option<Command> {
        if state.session_state(run.session) != Some(NodeState::Unfencing) {
            self.busy.remove(&run.session);
            return None;
        }
        let failed_before = state
            .fence_progress(run.session)
            .map_or(0, |p| p.failed_rounds);
        let last_attempt = !run.ok && failed_before.saturating_add(1) >= self.attempts;
        if run.ok {
            info!(session = run.session, detail = %run.detail, took_ms = run.took.as_millis() as u64, "unfenced");
        } else {
            warn!(session = run.session, detail = %run.detail, attempt = failed_before + 1, of = self.attempts, "unfencing failed");
            self.retry_at.insert(run.session, now + UNFENCE_RETRY_DELAY);
        }
        Some(Command::UnfenceAttempt {
            session: run.session,
            ok: run.ok,
            last_attempt,
            detail: run.detail,
        })
    }

    /// The table's `Event::UnfenceDue`: a failed attempt was applied, so its run is
    /// over and the next may start once the back-off has passed.
    pub fn attempt_recorded(&mut self, session: SessionId) {
        self.busy.remove(&session);
    }

    /// Holds a login call whose session is being unfenced.
    pub fn hold(&mut self, session: SessionId, call: HeldLogin, now: Instant) {
        let held = self.held.entry(session).or_default();
        held.retain(|(call, _)| !call.is_closed());
        held.push((call, now));
    }

    /// The table's `Event::Unfenced`: answers the held logins of `session`, with the
    /// session or with the refusal.
    pub fn unfenced(&mut self, session: SessionId, result: &Result<(), LockError>) {
        self.busy.remove(&session);
        self.retry_at.remove(&session);
        let reply = match result {
            Ok(()) => Reply::LoggedIn { session },
            Err(e) => Reply::Failed(e.clone()),
        };
        for (call, _) in self.held.remove(&session).unwrap_or_default() {
            let _ = call.send(Ok(reply.clone()));
        }
    }

    /// Answers "still unfencing" to every login held for [`LOGIN_HOLD`] or longer.
    pub fn answer_overdue(&mut self, now: Instant) {
        for (&session, held) in self.held.iter_mut() {
            let (overdue, kept): (Vec<_>, Vec<_>) = held
                .drain(..)
                .partition(|(_, since)| now.duration_since(*since) >= LOGIN_HOLD);
            *held = kept;
            for (call, _) in overdue {
                let _ = call.send(Ok(Reply::Unfencing { session }));
            }
        }
        self.held.retain(|_, held| !held.is_empty());
    }

    /// This server no longer leads: held logins fail with `error` (their clients
    /// retry on the new leader, which resumes the unfencing), runs are forgotten.
    pub fn lost_leadership(&mut self, error: &ProposeError) {
        for (_, held) in self.held.drain() {
            for (call, _) in held {
                let _ = call.send(Err(error.clone()));
            }
        }
        self.busy.clear();
        self.retry_at.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn config_with(unfence: bool) -> Config {
        let mut c = Config::dev(1, 7100, PathBuf::from("/tmp/x"));
        c.nodes[0].fence = vec![
            FenceDeviceConfig {
                level: 2,
                agent: PathBuf::from("/usr/sbin/fence_mpath"),
                action: crate::config::FenceAction::Off,
                unfence,
                timeout_ms: 1_000,
                params: Default::default(),
            },
            FenceDeviceConfig {
                level: 1,
                agent: PathBuf::from("/usr/sbin/fence_ipmilan"),
                action: Default::default(),
                unfence: false,
                timeout_ms: 1_000,
                params: Default::default(),
            },
        ];
        c
    }

    #[test]
    fn only_nodes_with_an_unfence_device_log_in_unfencing() {
        let login = |node: &str| Command::Login {
            node: node.into(),
            nonce: 7,
        };
        let c = config_with(true);
        assert_eq!(
            login_command(&c, login("node1")),
            Command::LoginUnfencing {
                node: "node1".into(),
                nonce: 7
            }
        );
        assert_eq!(login_command(&c, login("node2")), login("node2"));
        let c = config_with(false);
        assert_eq!(login_command(&c, login("node1")), login("node1"));
        let devices = config_with(true).nodes[0].unfence_devices();
        assert_eq!(devices.len(), 1, "only the unfence device runs");
        assert_eq!(devices[0].action, crate::config::FenceAction::On);
        assert!(fence::agent_input(&devices[0], "node1").starts_with("action=on\n"));
    }

    #[tokio::test]
    async fn held_logins_are_answered_by_the_outcome_or_told_to_ask_again() {
        let mut u = Unfencer::new(&config_with(true), Duration::from_secs(1));
        let now = Instant::now();
        let (tx, mut rx) = oneshot::channel();
        u.hold(5, tx, now);
        u.answer_overdue(now);
        assert!(rx.try_recv().is_err(), "answered before LOGIN_HOLD");
        u.answer_overdue(now + LOGIN_HOLD);
        assert_eq!(rx.await.unwrap(), Ok(Reply::Unfencing { session: 5 }));

        let (tx, rx) = oneshot::channel();
        u.hold(5, tx, now);
        u.unfenced(5, &Ok(()));
        assert_eq!(rx.await.unwrap(), Ok(Reply::LoggedIn { session: 5 }));

        let (tx, rx) = oneshot::channel();
        u.hold(6, tx, now);
        let refusal = LockError::UnfenceFailed {
            node: "node1".into(),
            attempts: 3,
            detail: "x".into(),
        };
        u.unfenced(6, &Err(refusal.clone()));
        assert_eq!(rx.await.unwrap(), Ok(Reply::Failed(refusal)));

        let (tx, rx) = oneshot::channel();
        u.hold(7, tx, now);
        u.lost_leadership(&ProposeError::NotLeader { leader: None });
        assert!(matches!(
            rx.await.unwrap(),
            Err(ProposeError::NotLeader { .. })
        ));
    }
}
