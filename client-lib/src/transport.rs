//! Reaching the Raft leader: one lazily connected gRPC channel pair per server, the
//! remembered leader, and the retry loop every `LockService` call goes through.
//!
//! The loop sends an attempt to the server believed to be the leader. A follower's
//! UNAVAILABLE with a `lockd-leader` address moves the call there (adding a channel if
//! the address is new); UNAVAILABLE without one (no leader known, "no quorum") and
//! transport failures move it to the next server after a short, doubling back-off. The
//! loop ends with the first answer that is not one of those, or with
//! [`Error::NoQuorum`] once the call's deadline has passed. It never changes the request
//! itself: request ids are chosen by the caller, once per logical operation, which is
//! what makes the retries safe.
//!
//! Each server gets two channels (two HTTP/2 connections): `short` for calls that answer
//! at once and `blocking` for `Lock` / `Convert`, which may wait in a lock queue for a long
//! time. A server caps the concurrent streams of a connection (and the calls in progress
//! on one pipeline stream); if waiting requests could use up that cap, the `Unlock` that
//! would let them through could not be sent. Each channel has its [`Pipeline`], which
//! `Lock`, `Convert` and `Unlock` go through ([`Transport::call_pipelined`]).
//!
//! This module knows nothing about sessions or locks.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lockd_proto::v1::lock_service_client::LockServiceClient;
use lockd_proto::{LEADER_METADATA_KEY, UNFENCING_METADATA_KEY};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::config::{normalize_addr, ClientConfig, MAX_SERVERS};
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::tls::TlsOptions;

/// How long a call may take overall.
#[derive(Debug, Clone, Copy)]
pub(crate) enum CallKind {
    /// A call the server answers as soon as its entry is committed (or at once). Gets
    /// `no_quorum_timeout` overall and `attempt_timeout` per attempt.
    Short,
    /// A short call (same channel, same per-attempt timeout) with its own overall
    /// deadline; `None` = retry until a leader with quorum answers (a login that must
    /// wait through an outage).
    Patient { deadline: Option<Instant> },
    /// `Lock` / `Convert`: an attempt may legitimately wait in a lock queue, so it has no
    /// per-attempt timeout. `None` = retry until a final answer, however long the
    /// cluster is without quorum. With a deadline (the queue timeout), the call fails
    /// at the deadline if no attempt is in flight then; an attempt in flight (possibly
    /// queued on a working leader, whose own timeout answer is on its way) gets
    /// [`ANSWER_GRACE`] more.
    Blocking { deadline: Option<Instant> },
}

/// How long past its deadline a blocking call waits for an attempt in flight: the
/// leader fails a queued request at its timeout on its next tick (50 ms) and answers
/// after a commit, so its "timed out" normally arrives well within this.
pub(crate) const ANSWER_GRACE: Duration = Duration::from_millis(500);

/// A call that ended without a usable answer.
#[derive(Debug)]
pub(crate) struct Failed {
    pub(crate) error: Error,
    /// How many attempts were sent; more than 1 means an earlier attempt may have been
    /// applied by the server although its answer was lost.
    pub(crate) attempts: u32,
    /// The server's final answer, when the call ended with one (`None`: no leader
    /// answered before the deadline).
    pub(crate) answer: Option<Box<Status>>,
}

impl From<Failed> for Error {
    fn from(failed: Failed) -> Error {
        failed.error
    }
}

/// What the retry loop does with a failed attempt.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// A real answer: return it to the caller.
    Final,
    /// Not the leader; the leader is at this address.
    Redirect(String),
    /// No leader known, no quorum, or the server could not be reached: try again later,
    /// elsewhere.
    Retry,
    /// The leader holds a login while it unfences the node (UNAVAILABLE with
    /// `lockd-unfencing`): ask the same server again. It has a quorum, so the wait does
    /// not count towards the call's no-quorum limit.
    Unfencing,
}

fn classify(status: &Status) -> Verdict {
    match status.code() {
        Code::Unavailable if status.metadata().contains_key(UNFENCING_METADATA_KEY) => {
            Verdict::Unfencing
        }
        Code::Unavailable => match leader_hint(status.metadata()) {
            Some(addr) => Verdict::Redirect(addr),
            None => Verdict::Retry,
        },
        // A status the client built from a local error (it has a source; statuses read
        // off the wire have none): a connection reset or an HTTP/2 error mid-call. The
        // server did not answer, so the outcome is unknown and the call is retried.
        Code::Unknown | Code::Internal | Code::Cancelled
            if std::error::Error::source(status).is_some() =>
        {
            Verdict::Retry
        }
        _ => Verdict::Final,
    }
}

/// The leader address a follower put in its redirect, if it is a usable `host:port`.
pub(crate) fn leader_hint(metadata: &MetadataMap) -> Option<String> {
    let value = metadata.get(LEADER_METADATA_KEY)?.to_str().ok()?;
    normalize_addr(value)
}

/// A status message plus its error chain: tonic's "transport error" alone does not say
/// that the connection was refused.
fn describe(status: &Status) -> String {
    let mut text = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = err.source();
    }
    text
}

#[derive(Clone)]
struct ServerConn {
    addr: Arc<str>,
    short: Channel,
    blocking: Channel,
    short_pipeline: Arc<Pipeline>,
    blocking_pipeline: Arc<Pipeline>,
}

impl ServerConn {
    fn new(addr: &str, settings: &EndpointSettings) -> Result<ServerConn> {
        let short = settings.channel(addr)?;
        let blocking = settings.channel(addr)?;
        Ok(ServerConn {
            addr: Arc::from(addr),
            short_pipeline: Arc::new(Pipeline::new(short.clone())),
            blocking_pipeline: Arc::new(Pipeline::new(blocking.clone())),
            short,
            blocking,
        })
    }

    /// Where an attempt of a call of `kind` goes on this server.
    fn route(&self, kind: CallKind) -> Route {
        match kind {
            CallKind::Short | CallKind::Patient { .. } => Route {
                channel: self.short.clone(),
                pipeline: self.short_pipeline.clone(),
            },
            CallKind::Blocking { .. } => Route {
                channel: self.blocking.clone(),
                pipeline: self.blocking_pipeline.clone(),
            },
        }
    }
}

/// The channel one attempt is sent on, and its pipeline.
pub(crate) struct Route {
    pub(crate) channel: Channel,
    pipeline: Arc<Pipeline>,
}

/// Channels to every known server and the index of the one believed to be the leader.
pub(crate) struct Transport {
    /// Append-only (so indexes stay valid), at most [`MAX_SERVERS`] entries.
    servers: RwLock<Vec<ServerConn>>,
    leader: AtomicUsize,
    endpoint_template: EndpointSettings,
    no_quorum_timeout: Duration,
    attempt_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    follow_unlisted_redirects: bool,
}

#[derive(Clone)]
struct EndpointSettings {
    connect_timeout: Duration,
    keepalive_interval: Duration,
    tls: Option<TlsOptions>,
}

impl EndpointSettings {
    /// A channel that connects on first use (and reconnects after a failure).
    /// Must run inside a tokio runtime: tonic spawns the channel's worker task.
    fn channel(&self, addr: &str) -> Result<Channel> {
        let endpoint = crate::tls::endpoint(addr, self.tls.as_ref())?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_interval * 2)
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_lazy())
    }
}

impl Transport {
    /// Channels for `servers` (already normalized). Needs a tokio runtime.
    pub(crate) fn new(servers: &[String], cfg: &ClientConfig) -> Result<Transport> {
        let settings = EndpointSettings {
            connect_timeout: cfg.connect_timeout,
            keepalive_interval: cfg.keepalive_interval,
            tls: cfg.tls.clone(),
        };
        let conns = servers
            .iter()
            .map(|addr| ServerConn::new(addr, &settings))
            .collect::<Result<Vec<_>>>()?;
        assert!(!conns.is_empty() && conns.len() <= MAX_SERVERS);
        Ok(Transport {
            servers: RwLock::new(conns),
            leader: AtomicUsize::new(0),
            endpoint_template: settings,
            no_quorum_timeout: cfg.no_quorum_timeout,
            attempt_timeout: cfg.attempt_timeout,
            backoff_min: cfg.backoff_min,
            backoff_max: cfg.backoff_max.max(cfg.backoff_min),
            follow_unlisted_redirects: cfg.follow_unlisted_redirects,
        })
    }

    /// The overall limit of a [`CallKind::Short`] call.
    pub(crate) fn no_quorum_timeout(&self) -> Duration {
        self.no_quorum_timeout
    }

    fn conn(&self, index: usize) -> ServerConn {
        let servers = self.servers.read().unwrap_or_else(|p| p.into_inner());
        servers[index % servers.len()].clone()
    }

    fn len(&self) -> usize {
        self.servers.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The index of `addr`, adding channels for it if it is new. `None` when the table
    /// is full (a misbehaving server handing out ever new addresses), or when `addr` is
    /// not listed and `follow_unlisted_redirects` is off.
    fn index_of_or_add(&self, addr: &str) -> Option<usize> {
        {
            let servers = self.servers.read().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = servers.iter().position(|s| &*s.addr == addr) {
                return Some(i);
            }
        }
        if !self.follow_unlisted_redirects {
            tracing::debug!(%addr, "not following a redirect to an unlisted address");
            return None;
        }
        let mut servers = self.servers.write().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = servers.iter().position(|s| &*s.addr == addr) {
            return Some(i);
        }
        if servers.len() >= MAX_SERVERS {
            tracing::warn!(%addr, "not following redirect: already {MAX_SERVERS} servers known");
            return None;
        }
        let conn = ServerConn::new(addr, &self.endpoint_template).ok()?;
        tracing::debug!(%addr, "learned a new server address from a redirect");
        servers.push(conn);
        Some(servers.len() - 1)
    }

    /// Runs one logical call: `attempt` builds and sends one attempt on the given client
    /// (it is called again for every retry, with the same request id inside).
    pub(crate) async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        kind: CallKind,
        mut attempt: F,
    ) -> std::result::Result<T, Failed>
    where
        F: FnMut(LockServiceClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.call_routed(what, kind, move |route| {
            attempt(LockServiceClient::new(route.channel))
        })
        .await
    }

    /// [`Transport::call`] for `Lock`, `Convert` and `Unlock`, sent on the pipeline of
    /// the call kind's channel.
    pub(crate) async fn call_pipelined<T, F, Fut>(
        &self,
        what: &'static str,
        kind: CallKind,
        mut attempt: F,
    ) -> std::result::Result<T, Failed>
    where
        F: FnMut(Arc<Pipeline>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.call_routed(what, kind, move |route| attempt(route.pipeline))
            .await
    }

    /// The retry loop itself, for an attempt sent on any service of the route's
    /// channel (also [`crate::leader`]'s).
    pub(crate) async fn call_routed<T, F, Fut>(
        &self,
        what: &'static str,
        kind: CallKind,
        mut attempt: F,
    ) -> std::result::Result<T, Failed>
    where
        F: FnMut(Route) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let mut call = Retries::new(self, what, kind);
        loop {
            let conn = self.conn(call.index);
            let bound = call.attempt_bound();
            call.attempts += 1;
            let sent = attempt(conn.route(kind));
            let outcome = match bound {
                Some(bound) => tokio::time::timeout(bound, sent).await.ok(),
                None => Some(sent.await),
            };
            let next = match outcome {
                Some(Ok(reply)) => {
                    self.leader.store(call.index, Ordering::Relaxed);
                    return Ok(reply.into_inner());
                }
                Some(Err(status)) => call.refused(&conn, status)?,
                None => call.unanswered(&conn, bound.unwrap_or_default()),
            };
            if next == Next::AfterPause {
                call.pause().await?;
            }
        }
    }
}

/// When the retry loop sends its next attempt.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// At once: a fresh leader hint.
    Now,
    /// After the back-off, if the call's deadline has not passed by then.
    AfterPause,
}

/// One logical call's way through [`Transport::call_routed`]'s retries.
struct Retries<'a> {
    transport: &'a Transport,
    what: &'static str,
    kind: CallKind,
    start: Instant,
    /// When the call gives up with [`Error::NoQuorum`]; a short call's moves on
    /// whenever a leader answers "still unfencing".
    deadline: Option<Instant>,
    /// The server the next attempt goes to.
    index: usize,
    backoff: Duration,
    attempts: u32,
    redirects_in_a_row: u32,
    /// Why the latest attempt failed, for the logs and the `NoQuorum` error.
    last: String,
}

impl<'a> Retries<'a> {
    fn new(transport: &'a Transport, what: &'static str, kind: CallKind) -> Retries<'a> {
        let start = Instant::now();
        let deadline = match kind {
            CallKind::Short => Some(start + transport.no_quorum_timeout),
            CallKind::Patient { deadline } | CallKind::Blocking { deadline } => deadline,
        };
        Retries {
            transport,
            what,
            kind,
            start,
            deadline,
            index: transport.leader.load(Ordering::Relaxed),
            backoff: transport.backoff_min,
            attempts: 0,
            redirects_in_a_row: 0,
            last: String::new(),
        }
    }

    /// How long the next attempt may take; `None`: as long as it takes.
    fn attempt_bound(&self) -> Option<Duration> {
        let attempt_timeout = self.transport.attempt_timeout;
        match self.kind {
            CallKind::Short | CallKind::Patient { .. } => Some(match self.deadline {
                Some(d) => attempt_timeout.min(d.saturating_duration_since(Instant::now())),
                None => attempt_timeout,
            }),
            CallKind::Blocking { .. } => self
                .deadline
                .map(|d| (d + ANSWER_GRACE).saturating_duration_since(Instant::now())),
        }
    }

    /// The server at `conn` answered the attempt with `status`: the call's final
    /// answer (as `Err`), or where and when to try again.
    fn refused(&mut self, conn: &ServerConn, status: Status) -> std::result::Result<Next, Failed> {
        let transport = self.transport;
        match classify(&status) {
            Verdict::Final => {
                // The server that answered is the leader (followers only ever
                // redirect), so remember it.
                transport.leader.store(self.index, Ordering::Relaxed);
                return Err(Failed {
                    error: Error::from_status(&status),
                    attempts: self.attempts,
                    answer: Some(Box::new(status)),
                });
            }
            Verdict::Redirect(leader) => return Ok(self.redirected(conn, &leader)),
            Verdict::Unfencing => {
                // A leader answered: a short call's no-quorum limit starts again.
                transport.leader.store(self.index, Ordering::Relaxed);
                self.redirects_in_a_row = 0;
                self.last = format!("{}: {}", conn.addr, describe(&status));
                if let CallKind::Short = self.kind {
                    self.deadline = Some(Instant::now() + transport.no_quorum_timeout);
                }
                self.backoff = transport.backoff_min;
            }
            Verdict::Retry => {
                self.redirects_in_a_row = 0;
                self.index = self.index.wrapping_add(1) % transport.len();
                self.last = format!("{}: {}", conn.addr, describe(&status));
            }
        }
        Ok(Next::AfterPause)
    }

    /// A follower at `conn` named `leader`.
    fn redirected(&mut self, conn: &ServerConn, leader: &str) -> Next {
        let transport = self.transport;
        self.last = format!("{}: not the leader (leader is {leader})", conn.addr);
        match transport.index_of_or_add(leader) {
            Some(i) if *conn.addr != *leader => {
                tracing::debug!(call = self.what, from = %conn.addr, to = %leader, "following leader redirect");
                transport.leader.store(i, Ordering::Relaxed);
                self.index = i;
                self.redirects_in_a_row += 1;
                // A fresh hint is worth following at once; a ping-pong of stale hints
                // during an election is not.
                if self.redirects_in_a_row <= 2 {
                    return Next::Now;
                }
            }
            _ => self.index = self.index.wrapping_add(1) % transport.len(),
        }
        Next::AfterPause
    }

    /// The attempt on `conn` got no answer within `bound`.
    fn unanswered(&mut self, conn: &ServerConn, bound: Duration) -> Next {
        self.redirects_in_a_row = 0;
        self.index = self.index.wrapping_add(1) % self.transport.len();
        // An attempt cut short by the call's own deadline says less than the failure
        // before it.
        if bound >= self.transport.attempt_timeout || self.last.is_empty() {
            self.last = format!("{}: no answer within {bound:?}", conn.addr);
        }
        Next::AfterPause
    }

    /// Sleeps the back-off (doubling it for next time), or fails the call with
    /// [`Error::NoQuorum`] once its deadline has passed.
    async fn pause(&mut self) -> std::result::Result<(), Failed> {
        let (what, attempts) = (self.what, self.attempts);
        tracing::debug!(call = what, attempts, last = %self.last, "attempt failed; retrying");
        let now = Instant::now();
        let pause = match self.deadline {
            Some(d) => self.backoff.min(d.saturating_duration_since(now)),
            None => {
                if attempts % 50 == 0 {
                    tracing::warn!(call = what, attempts, last = %self.last, "still no leader with quorum; retrying");
                }
                self.backoff
            }
        };
        tokio::time::sleep(pause).await;
        self.backoff = (self.backoff * 2).min(self.transport.backoff_max);
        if let Some(deadline) = self.deadline {
            if Instant::now() >= deadline {
                let waited = deadline.duration_since(self.start);
                tracing::warn!(call = what, attempts, ?waited, last = %self.last, "giving up: no quorum");
                return Err(Failed {
                    error: Error::NoQuorum {
                        waited,
                        last: std::mem::take(&mut self.last),
                    },
                    attempts,
                    answer: None,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::metadata::MetadataValue;

    fn unavailable_with_leader(value: &'static str) -> Status {
        let mut md = MetadataMap::new();
        md.insert(LEADER_METADATA_KEY, MetadataValue::from_static(value));
        Status::with_metadata(Code::Unavailable, "not the leader", md)
    }

    #[test]
    fn redirect_address_is_read_from_metadata() {
        let status = unavailable_with_leader("127.0.0.1:7102");
        assert_eq!(
            leader_hint(status.metadata()).as_deref(),
            Some("127.0.0.1:7102")
        );
        assert_eq!(
            classify(&status),
            Verdict::Redirect("127.0.0.1:7102".into())
        );
    }

    #[test]
    fn redirect_address_with_scheme_is_normalized() {
        let status = unavailable_with_leader("http://lock2:7101");
        assert_eq!(classify(&status), Verdict::Redirect("lock2:7101".into()));
    }

    #[test]
    fn unavailable_without_usable_leader_is_retried() {
        assert_eq!(
            classify(&Status::unavailable("no leader known")),
            Verdict::Retry
        );
        assert_eq!(
            classify(&Status::unavailable(
                "no quorum: proposal not committed in 2s"
            )),
            Verdict::Retry
        );
        // Empty or garbage hints are treated as "no leader known".
        assert_eq!(classify(&unavailable_with_leader("")), Verdict::Retry);
        assert_eq!(classify(&unavailable_with_leader("lock2")), Verdict::Retry);
    }

    #[test]
    fn a_login_held_for_unfencing_is_asked_again_not_redirected() {
        let mut status = Status::unavailable("node `n1` is being unfenced");
        status
            .metadata_mut()
            .insert(UNFENCING_METADATA_KEY, MetadataValue::from(7u64));
        assert_eq!(classify(&status), Verdict::Unfencing);
    }

    #[test]
    fn server_answers_are_final() {
        for status in [
            Status::aborted("would block"),
            Status::deadline_exceeded("queue timeout"),
            Status::not_found("unknown session 4"),
            Status::invalid_argument("bad mode"),
            // Sent by the server: no source, so not a transport failure.
            Status::internal("server bug"),
            Status::unknown("?"),
        ] {
            assert_eq!(classify(&status), Verdict::Final, "{status:?}");
        }
    }

    #[test]
    fn local_transport_errors_are_retried() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let status = Status::from_error(Box::new(io));
        assert!(std::error::Error::source(&status).is_some());
        assert_eq!(classify(&status), Verdict::Retry);
    }

    #[test]
    fn describe_includes_the_error_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused");
        let status = Status::from_error(Box::new(io));
        assert!(
            describe(&status).contains("connection refused"),
            "{}",
            describe(&status)
        );
    }

    #[tokio::test]
    async fn redirect_to_an_unknown_address_adds_a_server_once() {
        let cfg = ClientConfig::new(["127.0.0.1:1"], "n");
        let transport = Transport::new(&cfg.validated_servers().unwrap(), &cfg).unwrap();
        assert_eq!(transport.index_of_or_add("127.0.0.1:1"), Some(0));
        assert_eq!(transport.index_of_or_add("127.0.0.1:2"), Some(1));
        assert_eq!(transport.index_of_or_add("127.0.0.1:2"), Some(1));
        for port in 3..=(MAX_SERVERS as u16) {
            assert!(transport
                .index_of_or_add(&format!("127.0.0.1:{port}"))
                .is_some());
        }
        assert_eq!(
            transport.index_of_or_add("127.0.0.1:9999"),
            None,
            "table is bounded"
        );
    }

    fn unreachable(no_quorum_timeout: Duration) -> Transport {
        // Port 1 on loopback: connection refused at once.
        let cfg = ClientConfig {
            no_quorum_timeout,
            ..ClientConfig::new(["127.0.0.1:1"], "n")
        };
        Transport::new(&cfg.validated_servers().unwrap(), &cfg).unwrap()
    }

    async fn check_token_with(
        transport: &Transport,
        kind: CallKind,
    ) -> std::result::Result<lockd_proto::v1::CheckTokenReply, Failed> {
        transport
            .call("check_token", kind, |mut c| async move {
                c.check_token(lockd_proto::v1::CheckTokenRequest::default())
                    .await
            })
            .await
    }

    #[tokio::test]
    async fn a_blocking_call_without_a_deadline_outlasts_no_quorum_timeout() {
        let transport = unreachable(Duration::from_millis(100));
        for kind in [
            CallKind::Blocking { deadline: None },
            CallKind::Patient { deadline: None },
        ] {
            // Ten times the no-quorum limit, and still retrying.
            let outcome = tokio::time::timeout(
                Duration::from_millis(1_000),
                check_token_with(&transport, kind),
            )
            .await;
            assert!(outcome.is_err(), "{kind:?} gave up: {outcome:?}");
        }
    }

    #[tokio::test]
    async fn a_blocking_call_with_a_deadline_fails_at_the_deadline_not_at_no_quorum_timeout() {
        let transport = unreachable(Duration::from_secs(3));
        let wait = Duration::from_millis(400);
        let start = Instant::now();
        let failed = check_token_with(
            &transport,
            CallKind::Blocking {
                deadline: Some(start + wait),
            },
        )
        .await
        .unwrap_err();
        let elapsed = start.elapsed();
        assert!(
            elapsed >= wait && elapsed < wait + Duration::from_millis(400),
            "gave up after {elapsed:?}"
        );
        assert!(failed.error.is_no_quorum(), "{:?}", failed.error);
    }

    #[tokio::test]
    async fn unreachable_cluster_gives_no_quorum_after_the_deadline() {
        // Port 1 on loopback: connection refused at once.
        let cfg = ClientConfig {
            no_quorum_timeout: Duration::from_millis(300),
            ..ClientConfig::new(["127.0.0.1:1"], "n")
        };
        let transport = Transport::new(&cfg.validated_servers().unwrap(), &cfg).unwrap();
        let start = Instant::now();
        let failed = transport
            .call("check_token", CallKind::Short, |mut c| async move {
                c.check_token(lockd_proto::v1::CheckTokenRequest::default())
                    .await
            })
            .await
            .unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(300));
        assert!(failed.attempts > 1);
        match failed.error {
            Error::NoQuorum { last, .. } => {
                assert!(last.starts_with("127.0.0.1:1: "), "{last}");
                assert!(last.contains("refused"), "{last}");
            }
            other => panic!("expected NoQuorum, got {other:?}"),
        }
    }
}
