//! The session keeper: the background task that heartbeats, tells the application
//! when its locks are in jeopardy or lost, and keeps the event stream open.
//!
//! # The timing rule that makes "lost" safe
//!
//! Let `W` be the expiry window the server announced at login (`heartbeat_interval_ms
//! × allowed_misses`) and `t` the moment this client *sent* the newest heartbeat that
//! the leader answered. The leader answers a heartbeat only after confirming with a
//! quorum that it still leads (Raft ReadIndex), i.e. after it received the heartbeat at
//! some `r ≥ t` and while no other leader existed. So:
//!
//! - that leader expires the session no earlier than `r + W ≥ t + W`;
//! - any later leader took over after `r`, and gives every session a grace of at least
//!   `W` from its takeover (the server refuses a shorter `grace_ms`), so it expires the
//!   session no earlier than `t + W` either.
//!
//! The keeper declares the locks [`SessionHealth::Lost`] at `t + W − margin`, with
//! `margin = W/8 + 50 ms` to cover the keeper's own scheduling delay and clock-rate
//! differences. Hence the application hears "lost" strictly before any server could
//! hand its locks to someone else. [`SessionHealth::Jeopardy`] comes at `t + W/2`.
//!
//! "Lost" is not final: if a later heartbeat finds the session alive (the cluster was
//! unreachable but did not expire it, e.g. a full restart within the grace period), the
//! health returns to `Healthy`. `Expired` is final.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_proto::v1;
use tokio::sync::{broadcast, oneshot, watch};

use crate::error::Error;
use crate::mode::Mode;
use crate::resource::Resource;
use crate::transport::{CallKind, Transport};

/// What the application must know about its session's locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionHealth {
    /// A quorum confirmed the session recently.
    Healthy,
    /// No confirmation for half the expiry window: the locks are in jeopardy. Finish
    /// or pause work under them; do not start new writes.
    Jeopardy,
    /// No confirmation for the expiry window minus a margin: from now on the servers
    /// may expire the session and, once it is fenced, grant its locks to others. Stop
    /// using every lock. Returns to `Healthy` if a heartbeat later finds the session alive.
    Lost,
    /// The servers expired the session (or it is gone). Final: its locks will be
    /// released after the node is fenced; log in again once fenced.
    Expired,
}

/// An event from the session's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Another request waits for `requested` on a resource where this session holds
    /// `lock_id`: demote or release it if possible (GFS's NEED_E/NEED_S/NEED_D).
    Blocking {
        /// The lock that blocks.
        lock_id: u64,
        /// Its lockspace.
        lockspace: String,
        /// Its resource.
        resource: Resource,
        /// The mode another request waits for.
        requested: Mode,
    },
    /// A queued request of this session finished; `granted` is false if it failed.
    Finished {
        /// The request id of the Lock or Convert.
        request_id: u64,
        /// Whether it was granted.
        granted: bool,
    },
    /// `node` was fenced and left expired holders in `lockspace`: replay its journal
    /// under `noexp` locks, then call [`crate::Client::recovery_done`].
    NeedRecovery {
        /// The lockspace (file system) to recover.
        lockspace: String,
        /// The fenced node whose journal needs replaying.
        node: String,
        /// This node is the only live one in the lockspace (GFS's first mounter).
        first_mounter: bool,
    },
    /// A notice about the session itself, e.g. that it was expired.
    Notice {
        /// The session's new state, as the server names it.
        state: String,
        /// The server's explanation.
        message: String,
    },
}

/// Bound on events buffered for slow subscribers (older ones are dropped for them).
const EVENT_BUFFER: usize = 1_024;
/// How often health is re-evaluated between heartbeats.
const HEALTH_CHECK_EVERY: Duration = Duration::from_millis(20);

/// The keeper's handles, owned by the session; dropping `stop` ends the task.
pub(crate) struct Keeper {
    pub(crate) health: watch::Receiver<SessionHealth>,
    pub(crate) events: broadcast::Sender<Event>,
    _stop: oneshot::Sender<()>,
}

/// The margin by which the client declares loss before the servers can expire it.
pub(crate) fn loss_margin(window: Duration) -> Duration {
    window / 8 + Duration::from_millis(50)
}

impl Keeper {
    /// Starts the keeper for a session logged in at `login_sent` (the send time of the
    /// Login that created it, the first moment the servers could have heard from it).
    pub(crate) fn start(
        transport: Arc<Transport>,
        session: u64,
        heartbeat_interval: Duration,
        expiry_window: Duration,
        login_sent: Instant,
    ) -> Keeper {
        let (health_tx, health) = watch::channel(SessionHealth::Healthy);
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        let (stop, stop_rx) = oneshot::channel();
        if !heartbeat_interval.is_zero() && !expiry_window.is_zero() {
            tokio::spawn(run(
                transport,
                session,
                heartbeat_interval,
                expiry_window,
                login_sent,
                health_tx,
                events.clone(),
                stop_rx,
            ));
        }
        Keeper {
            health,
            events,
            _stop: stop,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    transport: Arc<Transport>,
    session: u64,
    interval: Duration,
    window: Duration,
    login_sent: Instant,
    health: watch::Sender<SessionHealth>,
    events: broadcast::Sender<Event>,
    mut stop: oneshot::Receiver<()>,
) {
    let period = interval * 2 / 3;
    let margin = loss_margin(window);
    // Send times of answered heartbeats come back here; the newest one counts.
    let (confirmed_tx, mut confirmed) = tokio::sync::mpsc::channel::<(Instant, bool)>(64);
    let stream = tokio::spawn(pump_events(
        Arc::clone(&transport),
        session,
        events,
        health.clone(),
    ));
    let mut last_confirmed = login_sent;
    let mut next_beat = Instant::now();
    loop {
        if Instant::now() >= next_beat {
            next_beat += period;
            let (transport, tx) = (Arc::clone(&transport), confirmed_tx.clone());
            tokio::spawn(async move {
                let sent = Instant::now();
                // Not cut at the next beat's turn: the transport needs its own
                // per-attempt timeout to move past a server that hangs (beats overlap
                // instead). An answer after the window is useless, so that bounds it.
                if let Ok(Some(alive)) =
                    tokio::time::timeout(window, beat(&transport, session)).await
                {
                    let _ = tx.send((sent, alive)).await;
                }
            });
        }
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(HEALTH_CHECK_EVERY) => {}
            Some((sent, alive)) = confirmed.recv() => {
                if !alive {
                    health.send_replace(SessionHealth::Expired);
                    break;
                }
                last_confirmed = last_confirmed.max(sent);
            }
        }
        let silent = last_confirmed.elapsed();
        let now = if silent >= window.saturating_sub(margin) {
            SessionHealth::Lost
        } else if silent >= window / 2 {
            SessionHealth::Jeopardy
        } else {
            SessionHealth::Healthy
        };
        if *health.borrow() != now && *health.borrow() != SessionHealth::Expired {
            tracing::info!(session, health = ?now, silent_ms = silent.as_millis() as u64, "session health changed");
            health.send_replace(now);
        }
    }
    stream.abort();
}

/// One heartbeat: `Some(true)` if the session is alive, `Some(false)` if the servers
/// say it is expired or unknown, `None` if no leader answered.
async fn beat(transport: &Transport, session: u64) -> Option<bool> {
    let request = v1::HeartbeatRequest { session };
    match transport
        .call("heartbeat", CallKind::Short, |mut c| async move {
            c.heartbeat(request).await
        })
        .await
    {
        Ok(reply) => Some(matches!(
            v1::NodeState::try_from(reply.state),
            Ok(v1::NodeState::LoggedIn) | Ok(v1::NodeState::WasLoggedIn)
        )),
        Err(failed) => match failed.error {
            Error::NotFound(_) | Error::FailedPrecondition(_) => Some(false),
            _ => None,
        },
    }
}

/// Keeps the session's event stream open on the leader, reopening it after every
/// failover, and fans its events out to subscribers.
async fn pump_events(
    transport: Arc<Transport>,
    session: u64,
    events: broadcast::Sender<Event>,
    health: watch::Sender<SessionHealth>,
) {
    let request = v1::EventsRequest { session };
    loop {
        let opened = transport
            .call(
                "events",
                CallKind::Blocking { deadline: None },
                |mut c| async move { c.events(request).await },
            )
            .await;
        match opened {
            Ok(mut stream) => {
                while let Ok(Some(event)) = stream.message().await {
                    let Some(event) = from_proto(event) else {
                        continue;
                    };
                    if let Event::Notice { state, .. } = &event {
                        if state == "EXPIRED" {
                            health.send_replace(SessionHealth::Expired);
                        }
                    }
                    // No subscriber is fine: events are advisory.
                    let _ = events.send(event);
                }
            }
            Err(failed) => {
                if matches!(
                    failed.error,
                    Error::NotFound(_) | Error::FailedPrecondition(_)
                ) {
                    return;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn from_proto(event: v1::Event) -> Option<Event> {
    use v1::event::Kind;
    Some(match event.kind? {
        Kind::Blocking(b) => Event::Blocking {
            lock_id: b.lock_id,
            lockspace: b.lockspace,
            resource: Resource::from(b.resource),
            requested: Mode::from_proto(b.requested)?,
        },
        Kind::Finished(f) => Event::Finished {
            request_id: f.request_id,
            granted: f.grant.is_some(),
        },
        Kind::NeedRecovery(r) => Event::NeedRecovery {
            lockspace: r.lockspace,
            node: r.node,
            first_mounter: r.first_mounter,
        },
        Kind::Notice(n) => Event::Notice {
            state: v1::NodeState::try_from(n.state)
                .map(|s| s.as_str_name().to_string())
                .unwrap_or_else(|_| n.state.to_string()),
            message: n.message,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loss_is_declared_before_the_window_with_a_margin() {
        let w = Duration::from_millis(2_000);
        assert_eq!(loss_margin(w), Duration::from_millis(300));
        assert!(w - loss_margin(w) > w / 2, "jeopardy comes before loss");
    }

    #[test]
    fn blocking_events_convert_from_the_wire() {
        let e = v1::Event {
            kind: Some(v1::event::Kind::Blocking(v1::BlockingCallback {
                lock_id: 9,
                lockspace: "fs1".into(),
                resource: b"inode-1".to_vec(),
                requested: v1::Mode::Pr as i32,
            })),
        };
        assert_eq!(
            from_proto(e),
            Some(Event::Blocking {
                lock_id: 9,
                lockspace: "fs1".into(),
                resource: Resource::from("inode-1"),
                requested: Mode::Pr,
            })
        );
    }

    #[test]
    fn an_event_with_an_unknown_mode_is_dropped() {
        let e = v1::Event {
            kind: Some(v1::event::Kind::Blocking(v1::BlockingCallback {
                requested: 42,
                ..Default::default()
            })),
        };
        assert_eq!(from_proto(e), None);
    }
}
