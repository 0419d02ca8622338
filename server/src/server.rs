//! Assembles one lock server: storage and Raft driver, peer transport, gRPC services on
//! one port. Owns start-up order and nothing else.

use crate::config::Config;
use crate::raft_node::{self, Handle, RaftNode};
use crate::service::Services;
use crate::transport::{self, PeerEndpoint, MAX_PEER_MESSAGE_BYTES};
use anyhow::Context;
use lockd_proto::v1::admin_service_server::AdminServiceServer;
use lockd_proto::v1::lock_service_server::LockServiceServer;
use lockd_proto::v1::peer_service_server::PeerServiceServer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::info;

/// Runs server `id` of `config` until `shutdown` resolves.
pub async fn run(
    config: Config,
    id: u64,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let me = config
        .server(id)
        .with_context(|| format!("server id {id} is not in the config's [[servers]]"))?;
    let addr: SocketAddr = me
        .addr
        .parse()
        .with_context(|| format!("bad address {}", me.addr))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let peers: Vec<(u64, String)> = config
        .servers
        .iter()
        .map(|s| (s.id, s.addr.clone()))
        .collect();
    let inputs = raft_node::input_channel();
    let outbox = transport::start_peers(id, config.cluster.id, &peers, inputs.0.clone());
    let (node, handle) = RaftNode::open(&config, id, outbox, inputs)?;
    let _driver = node.spawn();
    info!(
        id,
        %addr,
        cluster = %config.cluster.name,
        data_dir = %config.server_dir(id).display(),
        "lock server started"
    );
    serve(config, id, handle, listener, shutdown).await
}

async fn serve(
    config: Config,
    id: u64,
    handle: Handle,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let cluster_id = config.cluster.id;
    let services = Arc::new(Services::new(handle.clone(), Arc::new(config), id));
    let peer = PeerServiceServer::new(PeerEndpoint {
        cluster_id,
        node: handle,
    })
    .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES);
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(LockServiceServer::from_arc(services.clone()))
        .add_service(AdminServiceServer::from_arc(services))
        .add_service(peer)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("gRPC server failed")
}
