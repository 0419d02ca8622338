//! Assembles one lock server: storage and Raft driver, peer transport, gRPC services on
//! one port. Owns start-up order, the listener and the server's resource limits
//! (descriptors, connections, streams per connection, request sizes).

use crate::config::{Config, ServerConfig};
use crate::raft_node::{self, Handle, RaftNode, Start};
use crate::service::Services;
use crate::tls::{Access, TlsFiles};
use crate::transport::{self, PeerEndpoint, MAX_PEER_MESSAGE_BYTES};
use anyhow::Context;
use lockd_proto::v1::admin_service_server::AdminServiceServer;
use lockd_proto::v1::lock_service_server::LockServiceServer;
use lockd_proto::v1::peer_service_server::PeerServiceServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;
use tonic::transport::server::{Router, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tracing::info;

/// How long a stopping server waits for open calls (parked locks, event streams) to
/// finish before it exits anyway.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Connections (nodes, `lockctl`, peers) served at once: two channels for each of
/// `MAX_SESSIONS` (4,096) nodes, plus room for peers and operators. Fewer when the
/// descriptor limit is low (see [`connection_limit`]). A connection beyond the limit
/// is accepted and closed at once, so its client fails fast instead of waiting.
pub const MAX_CONNECTIONS: usize = 8_448;
/// Descriptors kept out of [`connection_limit`]'s reach for everything else a server
/// opens: its database and snapshot files, outgoing peer connections, fence agents'
/// pipes, the metrics listener.
const RESERVED_DESCRIPTORS: u64 = 256;
/// HTTP/2 streams (calls) open at once on one connection, advertised as
/// SETTINGS_MAX_CONCURRENT_STREAMS; a client queues calls beyond it.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// Largest node or admin request (a lock request is a few hundred bytes; this leaves
/// room for hostile oversized names to be refused with their precise error).
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Back-off of the accept loop when the process or system is out of descriptors or
/// memory: starts here, doubles to `ACCEPT_BACKOFF_MAX`.
const ACCEPT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// The resource limits this server runs with, as `lockctl status` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// RLIMIT_NOFILE (soft) after start-up raised it to the hard limit.
    pub max_open_files: u64,
    /// Connections served at once ([`connection_limit`]).
    pub max_connections: usize,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit (allowed to any process) and
/// returns the limit in force. A server holds a descriptor per connection, and the
/// usual soft limit of 1,024 is far below what a cluster of nodes needs.
pub fn raise_descriptor_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        tracing::warn!(
            "cannot read the descriptor limit: {}",
            std::io::Error::last_os_error()
        );
        return 1_024;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we pass and nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            info!(
                from = limit.rlim_cur,
                to = raised.rlim_cur,
                "descriptor limit raised"
            );
            limit = raised;
        } else {
            tracing::warn!(
                soft = limit.rlim_cur,
                hard = limit.rlim_max,
                "cannot raise the descriptor limit: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    limit.rlim_cur
}

/// Connections a server with `max_open_files` descriptors serves at once: all but
/// `RESERVED_DESCRIPTORS` of them, or half under a very low limit, and never more
/// than [`MAX_CONNECTIONS`]; so connections alone never exhaust the descriptors.
pub fn connection_limit(max_open_files: u64) -> usize {
    let usable = max_open_files
        .saturating_sub(RESERVED_DESCRIPTORS)
        .max(max_open_files / 2)
        .max(1);
    usize::try_from(usable)
        .unwrap_or(usize::MAX)
        .min(MAX_CONNECTIONS)
}

/// Runs server `id` of `config` until `shutdown` resolves (SIGTERM, Ctrl-C) or an
/// operator's `lockctl shutdown`. Either way a leader first hands leadership over.
/// `start` says what a server without a log does (see [`Start`]).
pub async fn run(
    config: Config,
    id: u64,
    start: Start,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let me = config
        .server(id)
        .with_context(|| format!("server id {id} is not in the config's [[servers]]"))?;
    // Before binding: a bad certificate must stop the server with the key named.
    let tls = config.load_tls(id)?;
    let (addr, listener) = listen(me).await?;
    let limits = raise_limits();
    let inputs = raft_node::input_channel();
    let uid = raft_node::ClusterUid::default();
    let outbox = transport::outbox(
        id,
        (config.cluster.id, uid.clone()),
        tls.clone(),
        inputs.0.clone(),
    );
    let (node, handle) = RaftNode::open(&config, id, start, uid, outbox, inputs)?;
    let _driver = node.spawn();
    info!(
        id,
        %addr,
        tls = tls.is_some(),
        max_open_files = limits.max_open_files,
        max_connections = limits.max_connections,
        cluster = %config.cluster.name,
        data_dir = %config.server_dir(id).display(),
        "lock server started"
    );
    // systemd (Type=notify): ready once the port is bound and the driver runs, not
    // once a leader exists; waiting for peers would deadlock a cold start in which
    // every server waits for the others to be "started". A no-op outside systemd.
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving on {addr}")),
    ]);
    let monitor = tokio::spawn(crate::monitor::run(config.clone()));
    let served = serve(config, id, handle, tls, listener, limits, shutdown).await;
    monitor.abort();
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    served
}

/// Binds the server's gRPC port and, when it has a metrics address, serves
/// Prometheus metrics there.
async fn listen(me: &ServerConfig) -> anyhow::Result<(SocketAddr, tokio::net::TcpListener)> {
    let addr: SocketAddr = me
        .addr
        .parse()
        .with_context(|| format!("bad address {}", me.addr))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    if let Some(metrics) = &me.metrics_addr {
        let metrics: SocketAddr = metrics
            .parse()
            .with_context(|| format!("bad metrics address {metrics}"))?;
        crate::telemetry::install(metrics)?;
    }
    Ok((addr, listener))
}

/// Raises the descriptor limit and derives the connection limit from it.
fn raise_limits() -> Limits {
    let max_open_files = raise_descriptor_limit();
    Limits {
        max_open_files,
        max_connections: connection_limit(max_open_files),
    }
}

fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!("cannot notify systemd: {e}");
    }
}

/// The standard gRPC health service: "" is SERVING while the server runs and
/// NOT_SERVING once it stops; "lockd.v1.LockService" is SERVING only on the leader (the
/// only server that answers node calls; followers redirect), so a health-checking
/// proxy finds the leader.
async fn report_health(
    mut health: tonic_health::server::HealthReporter,
    mut status: watch::Receiver<crate::raft_node::NodeStatus>,
    mut stop: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    health.set_service_status("", ServingStatus::Serving).await;
    let mut was_leader = None;
    loop {
        let leader = status.borrow_and_update().role == crate::raft_node::Role::Leader;
        if was_leader != Some(leader) {
            was_leader = Some(leader);
            let s = if leader {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status("lockd.v1.LockService", s).await;
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            stopping = stop.changed() => {
                if stopping.is_ok() && !*stop.borrow() {
                    continue;
                }
                health.set_service_status("", ServingStatus::NotServing).await;
                health
                    .set_service_status("lockd.v1.LockService", ServingStatus::NotServing)
                    .await;
                return;
            }
        }
    }
}

/// Serves every service on `listener` until a stop begins, then lets open calls finish
/// for at most [`DRAIN_WAIT`].
async fn serve(
    config: Config,
    id: u64,
    handle: Handle,
    tls: Option<TlsFiles>,
    listener: tokio::net::TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster_id = config.cluster.id;
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopping = Arc::new(AtomicBool::new(false));
    // A signal does what `lockctl shutdown --force` does: hand over, then stop.
    tokio::spawn(stop_on(
        shutdown,
        handle.clone(),
        stop_tx.clone(),
        stopping.clone(),
    ));
    let status_rx = handle.watch_status();
    let access = Access::of(tls.as_ref());
    let server_tls = tls.as_ref().map(TlsFiles::server_config);
    let services = Services::new(
        handle.clone(),
        Arc::new(config),
        id,
        tls,
        stop_tx,
        limits,
        stopping,
    );
    let peer = peer_service(cluster_id, access, handle);
    let (router, health) = routes(services, peer, server_tls)?;
    tokio::spawn(report_health(health, status_rx, stop_rx.clone()));
    let serving = router.serve_with_incoming_shutdown(
        // The listener closes as soon as a stop begins, so clients get "connection
        // refused" and move on at once instead of waiting on a server that drains.
        futures::StreamExt::take_until(
            incoming(listener, limits.max_connections),
            stop_begun(stop_rx.clone()),
        ),
        stop_begun(stop_rx.clone()),
    );
    // Graceful stop waits for open calls; a parked lock or an event stream must not
    // keep a stopping server alive for long.
    let drained = async {
        stop_begun(stop_rx).await;
        tokio::time::sleep(DRAIN_WAIT).await;
    };
    tokio::select! {
        served = serving => served.context("gRPC server failed")?,
        _ = drained => info!("open calls did not finish in time; stopping anyway"),
    }
    info!(id, "lock server stopped cleanly");
    Ok(())
}

/// The receiving side of the other servers' Raft streams.
fn peer_service(cluster_id: u64, access: Access, node: Handle) -> PeerServiceServer<PeerEndpoint> {
    PeerServiceServer::new(PeerEndpoint {
        cluster_id,
        uid: node.cluster_uid(),
        access,
        node,
    })
    .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
}

/// Once `shutdown` resolves: marks the server stopping, hands leadership over (for at
/// most 3 s), then begins the stop.
async fn stop_on(
    shutdown: impl Future<Output = ()>,
    handle: Handle,
    stop: watch::Sender<bool>,
    stopping: Arc<AtomicBool>,
) {
    shutdown.await;
    stopping.store(true, Ordering::SeqCst);
    handle.step_down(std::time::Duration::from_secs(3)).await;
    stop.send_replace(true);
}

/// Resolves once a stop has begun (a signal, or `lockctl shutdown`).
async fn stop_begun(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Every service on the server's one port, over TLS when `server_tls` is set: nodes'
/// LockService, AdminService, the peers' Raft streams, gRPC health (its reporter is
/// returned) and reflection.
fn routes(
    services: Arc<Services>,
    peer: PeerServiceServer<PeerEndpoint>,
    server_tls: Option<ServerTlsConfig>,
) -> anyhow::Result<(Router, HealthReporter)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // Both reflection versions: grpcurl before 1.9, grpcui and Postman speak only
    // v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(lockd_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .context("building the v1alpha reflection service")?;
    let mut builder = tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let Some(server_tls) = server_tls {
        builder = builder
            .tls_config(server_tls)
            .context("invalid config: `tls`: cannot use the certificate and key")?;
    }
    let router = builder
        .add_service(
            LockServiceServer::from_arc(services.clone())
                .max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(
            AdminServiceServer::from_arc(services).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        .add_service(peer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    Ok((router, health))
}

/// The listener's connections for tonic, at most `max_connections` at once. A
/// connection beyond that is accepted and closed at once. Running out of descriptors
/// or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) never ends the loop, as it ended
/// tonic's: it is logged at warn (at most once a second) and accepting resumes after
/// a back-off, while the connections already open go on being served.
fn incoming(
    listener: tokio::net::TcpListener,
    max_connections: usize,
) -> impl futures::Stream<Item = Result<Connection, std::io::Error>> {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let state = (listener, slots, Complaints::default());
    futures::stream::unfold(state, move |(listener, slots, mut complaints)| async move {
        let mut backoff = ACCEPT_BACKOFF_MIN;
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => match slots.clone().try_acquire_owned() {
                    Ok(slot) => {
                        let _ = stream.set_nodelay(true);
                        let connection = Connection::new(stream, slot);
                        return Some((Ok(connection), (listener, slots, complaints)));
                    }
                    Err(_) => {
                        drop(stream);
                        complaints.note(|refused| {
                            tracing::warn!(
                                %peer,
                                refused,
                                max_connections,
                                "connection limit reached: new connections are closed at once"
                            )
                        });
                    }
                },
                Err(e) if is_connection_error(&e) => {
                    tracing::debug!("accept: {e}");
                }
                Err(e) => {
                    complaints.note(|times| {
                        tracing::warn!(
                            times,
                            backoff_ms = backoff.as_millis() as u64,
                            "cannot accept connections: {e}; retrying"
                        )
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
            }
        }
    })
}

/// Errors of one incoming connection, not of the listener: the next accept may succeed
/// at once. Everything else (EMFILE, ENFILE, ENOBUFS, ENOMEM, anything unforeseen)
/// backs off.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::ECONNRESET | libc::EPROTO | libc::EPERM | libc::EINTR)
    ) || e.kind() == std::io::ErrorKind::WouldBlock
}

/// Rate limit of the accept loop's warnings: at most one a second, with the count.
#[derive(Default)]
struct Complaints {
    last: Option<std::time::Instant>,
    since: u64,
}

impl Complaints {
    fn note(&mut self, warn: impl FnOnce(u64)) {
        self.since += 1;
        let now = std::time::Instant::now();
        if self
            .last
            .is_none_or(|last| now.duration_since(last) >= std::time::Duration::from_secs(1))
        {
            warn(self.since);
            self.last = Some(now);
            self.since = 0;
        }
    }
}

/// An accepted connection holding one of the server's connection slots until closed.
/// Its first [`OPENING_BYTES`] must arrive within [`OPENING_TIMEOUT`]: a connection
/// that never starts HTTP/2 (or TLS) gives its slot back instead of holding it forever.
pub struct Connection {
    stream: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
    /// Until the opening bytes have arrived: how many are still due, and by when.
    opening: Option<(usize, std::pin::Pin<Box<tokio::time::Sleep>>)>,
}

/// Bytes a client sends first on every connection (the HTTP/2 preface is 24 bytes, a
/// TLS ClientHello more).
const OPENING_BYTES: usize = 24;
/// How long a new connection may take to send them.
pub const OPENING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Connection {
    fn new(stream: tokio::net::TcpStream, slot: tokio::sync::OwnedSemaphorePermit) -> Self {
        let deadline = Box::pin(tokio::time::sleep(OPENING_TIMEOUT));
        Connection {
            stream,
            _slot: slot,
            opening: Some((OPENING_BYTES, deadline)),
        }
    }
}

impl tonic::transport::server::Connected for Connection {
    // TcpConnectInfo, as tonic's own listener gives: `Request::peer_certs` (mutual
    // TLS) looks for exactly that type.
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl tokio::io::AsyncRead for Connection {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        let before = buf.filled().len();
        let read = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        let got = buf.filled().len() - before;
        let Some((due, deadline)) = self.opening.as_mut() else {
            return read;
        };
        *due = due.saturating_sub(got);
        if *due == 0 {
            self.opening = None;
            return read;
        }
        if read.is_pending() && deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the connection did not start within the opening timeout",
            )));
        }
        read
    }
}

impl tokio::io::AsyncWrite for Connection {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_never_take_every_descriptor() {
        assert_eq!(connection_limit(64), 32);
        assert_eq!(connection_limit(1_024), 768);
        assert_eq!(connection_limit(1 << 20), MAX_CONNECTIONS);
        assert_eq!(connection_limit(0), 1);
        for fds in [16u64, 64, 300, 1_024, 9_000, 1 << 20] {
            assert!((connection_limit(fds) as u64) < fds, "{fds}");
        }
    }

    #[test]
    fn only_errors_of_one_connection_skip_the_back_off() {
        let os = std::io::Error::from_raw_os_error;
        assert!(is_connection_error(&os(libc::ECONNABORTED)));
        for exhausted in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_connection_error(&os(exhausted)));
        }
    }
}
