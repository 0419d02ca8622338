//! Assembles one lock server: storage and Raft driver, peer transport, gRPC services on
//! one port. Owns start-up order and nothing else.

use crate::config::Config;
use crate::raft_node::{self, Handle, RaftNode};
use crate::service::Services;
use crate::tls::{Access, TlsFiles};
use crate::transport::{self, PeerEndpoint, MAX_PEER_MESSAGE_BYTES};
use anyhow::Context;
use lockd_proto::v1::admin_service_server::AdminServiceServer;
use lockd_proto::v1::lock_service_server::LockServiceServer;
use lockd_proto::v1::peer_service_server::PeerServiceServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

/// How long a stopping server waits for open calls (parked locks, event streams) to
/// finish before it exits anyway.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs server `id` of `config` until `shutdown` resolves (SIGTERM, Ctrl-C) or an
/// operator's `lockctl shutdown`. Either way a leader first hands leadership over.
/// `join`: a server with an empty log waits to be added (`lockctl server add`) instead
/// of starting a new cluster with the config's servers.
pub async fn run(
    config: Config,
    id: u64,
    join: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let me = config
        .server(id)
        .with_context(|| format!("server id {id} is not in the config's [[servers]]"))?;
    // Before binding: a bad certificate must stop the server with the key named.
    let tls = config.load_tls(id)?;
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
    let inputs = raft_node::input_channel();
    let outbox = transport::outbox(id, config.cluster.id, tls.clone(), inputs.0.clone());
    let (node, handle) = RaftNode::open(&config, id, join, outbox, inputs)?;
    let _driver = node.spawn();
    info!(
        id,
        %addr,
        tls = tls.is_some(),
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
    let served = serve(config, id, handle, tls, listener, shutdown).await;
    monitor.abort();
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    served
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
    mut status: tokio::sync::watch::Receiver<crate::raft_node::NodeStatus>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    health.set_service_status("", ServingStatus::Serving).await;
    let mut was_leader = None;
    loop {
        let leader = status.borrow_and_update().role == "leader";
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

async fn serve(
    config: Config,
    id: u64,
    handle: Handle,
    tls: Option<TlsFiles>,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster_id = config.cluster.id;
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A signal does what `lockctl shutdown --force` does: hand over, then stop.
    let on_signal = {
        let (handle, stop_tx, stopping) = (handle.clone(), stop_tx.clone(), stopping.clone());
        async move {
            shutdown.await;
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            handle.step_down(std::time::Duration::from_secs(3)).await;
            stop_tx.send_replace(true);
        }
    };
    tokio::spawn(on_signal);
    let stopped = {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let status_rx = handle.watch_status();
    let access = Access::of(tls.as_ref());
    let server_tls = tls.as_ref().map(TlsFiles::server_config);
    let services = Services::new(handle.clone(), Arc::new(config), id, tls, stop_tx, stopping);
    let peer = PeerServiceServer::new(PeerEndpoint {
        cluster_id,
        access,
        node: handle,
    })
    .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES);
    let (health, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(health, status_rx, stop_rx.clone()));
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
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(server_tls) = server_tls {
        builder = builder
            .tls_config(server_tls)
            .context("invalid config: `tls`: cannot use the certificate and key")?;
    }
    let serving = builder
        .add_service(LockServiceServer::from_arc(services.clone()))
        .add_service(AdminServiceServer::from_arc(services))
        .add_service(peer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(
            // The listener closes as soon as a stop begins, so clients get "connection
            // refused" and move on at once instead of waiting on a server that drains.
            futures::StreamExt::take_until(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                {
                    let mut rx = stop_rx.clone();
                    async move {
                        let _ = rx.wait_for(|stop| *stop).await;
                    }
                },
            ),
            stopped,
        );
    // Graceful stop waits for open calls; a parked lock or an event stream must not
    // keep a stopping server alive for long.
    let drained = async {
        let _ = stop_rx.wait_for(|stop| *stop).await;
        tokio::time::sleep(DRAIN_WAIT).await;
    };
    tokio::select! {
        served = serving => served.context("gRPC server failed")?,
        _ = drained => info!("open calls did not finish in time; stopping anyway"),
    }
    info!(id, "lock server stopped cleanly");
    Ok(())
}
