//! Raft traffic between servers: one long-lived gRPC client stream per peer, carrying
//! batches of protobuf-encoded raft-rs messages as `bytes`.
//!
//! Sending never blocks the Raft driver: each peer has a bounded queue, and a message
//! that does not fit is dropped (Raft retransmits) and the peer reported unreachable.
//! Receiving checks the sender's cluster id (and, with TLS on, that its certificate has
//! the server role) before any message reaches Raft.

use crate::raft_node::ClusterUid;
use crate::raft_node::{decode_message, encode_message, Handle, Input, Outbox, LOG_FORMAT};
use crate::tls::{Access, TlsFiles};
use lockd_proto::v1::peer_service_client::PeerServiceClient;
use lockd_proto::v1::peer_service_server::PeerService;
use lockd_proto::v1::{RaftAck, RaftBatch};
use lockd_proto::{
    CLUSTER_ID_METADATA_KEY, CLUSTER_UID_METADATA_KEY, FROM_METADATA_KEY, LOG_FORMAT_METADATA_KEY,
};
use raft::prelude::{Message, MessageType};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE_LEN: usize = 4_096;
/// Messages packed into one stream item.
const MAX_BATCH_MESSAGES: usize = 256;
/// Largest gRPC message on peer streams (snapshots of a big lock table).
pub const MAX_PEER_MESSAGE_BYTES: usize = 1 << 30;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The pause after a peer's first failure; it doubles up to `RECONNECT_BACKOFF_MAX`.
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(20);
const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The driver's side: routes each message to its peer's queue.
pub struct PeerOutbox {
    my_id: u64,
    cluster_id: u64,
    /// This cluster's identity, sent with every stream (see [`ClusterUid`]).
    uid: ClusterUid,
    /// Each peer's queue and the address its sender task dials.
    peers: HashMap<u64, (mpsc::Sender<Message>, String)>,
    /// The driver's own input queue, for delivery reports.
    reports: mpsc::Sender<Input>,
    /// This server's certificate and CA, when the cluster runs mutual TLS.
    tls: Option<TlsFiles>,
    /// The server's runtime, where sender tasks run (not the driver's own thread).
    runtime: tokio::runtime::Handle,
}

impl Outbox for PeerOutbox {
    fn send(&mut self, messages: Vec<Message>) {
        for m in messages {
            let to = m.to;
            let Some((queue, _)) = self.peers.get(&to) else {
                debug!(to, "message for an unknown peer dropped");
                continue;
            };
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            if queue.try_send(m).is_err() {
                self.report(Input::Unreachable(to));
                if is_snapshot {
                    self.report(Input::SnapshotSent { to, ok: false });
                }
            }
        }
    }

    fn add_peer(&mut self, id: u64, addr: &str) {
        if id == self.my_id || self.peers.get(&id).is_some_and(|(_, a)| a == addr) {
            return;
        }
        // Replacing the queue drops the old one, which ends its sender task.
        let (tx, rx) = mpsc::channel(PEER_QUEUE_LEN);
        self.peers.insert(id, (tx, addr.to_string()));
        let sender = PeerSender {
            my_id: self.my_id,
            cluster_id: self.cluster_id,
            uid: self.uid.clone(),
            peer: id,
            addr: addr.to_string(),
            tls: self.tls.clone(),
            queue: rx,
            reports: self.reports.clone(),
            backoff: RECONNECT_BACKOFF_MIN,
        };
        self.runtime.spawn(sender.run());
    }

    fn remove_peer(&mut self, id: u64) {
        self.peers.remove(&id);
    }
}

impl PeerOutbox {
    fn report(&self, input: Input) {
        // Never block the driver on its own input queue: a lost report only delays
        // Raft's own retry.
        let _ = self.reports.try_send(input);
    }
}

/// The outbox of server `my_id`; the driver adds its peers ([`Outbox::add_peer`]), each
/// served by a sender task on the current tokio runtime (so this must be called inside
/// one), over TLS when `tls` is set. Delivery failures are reported on `reports`, the
/// driver's input queue.
pub fn outbox(
    my_id: u64,
    (cluster_id, uid): (u64, ClusterUid),
    tls: Option<TlsFiles>,
    reports: mpsc::Sender<Input>,
) -> PeerOutbox {
    PeerOutbox {
        my_id,
        cluster_id,
        uid,
        peers: HashMap::new(),
        reports,
        tls,
        runtime: tokio::runtime::Handle::current(),
    }
}

/// The task that carries one peer's queue to it: connects (with a doubling back-off
/// while it cannot), streams batches until the stream breaks, and starts again; ends
/// when the driver drops the queue (the peer left or was re-pointed).
struct PeerSender {
    my_id: u64,
    cluster_id: u64,
    uid: ClusterUid,
    peer: u64,
    addr: String,
    tls: Option<TlsFiles>,
    queue: mpsc::Receiver<Message>,
    /// The driver's input queue, for delivery reports.
    reports: mpsc::Sender<Input>,
    /// The pause before the next connection attempt after a failure.
    backoff: Duration,
}

/// What a peer stream's call task came to.
type StreamEnd = Result<Result<Response<RaftAck>, Status>, tokio::task::JoinError>;

impl PeerSender {
    async fn run(mut self) {
        loop {
            // With TLS the server's own certificate (OU=lockd-server) is its client identity.
            let endpoint = match crate::tls::endpoint(&self.addr, self.tls.as_ref()) {
                Ok(e) => e.connect_timeout(CONNECT_TIMEOUT).tcp_nodelay(true),
                Err(e) => {
                    warn!(peer = self.peer, addr = %self.addr, "bad peer address: {e}");
                    return;
                }
            };
            let channel = match endpoint.connect().await {
                Ok(c) => c,
                Err(e) => {
                    debug!(peer = self.peer, addr = %self.addr, "cannot connect: {e}");
                    if !self.drop_queued().await {
                        return;
                    }
                    self.report(Input::Unreachable(self.peer)).await;
                    self.pause().await;
                    continue;
                }
            };
            let Some(ended) = self.stream(channel).await else {
                return;
            };
            self.stream_ended(ended).await;
        }
    }

    /// Drops what queued while the peer was unreachable (Raft will resend what still
    /// matters), reporting each snapshot as not sent. False when the queue is closed.
    async fn drop_queued(&mut self) -> bool {
        loop {
            let m = match self.queue.try_recv() {
                Ok(m) => m,
                // The peer left the cluster (or was re-pointed): stop.
                Err(mpsc::error::TryRecvError::Disconnected) => return false,
                Err(mpsc::error::TryRecvError::Empty) => return true,
            };
            if m.get_msg_type() == MessageType::MsgSnapshot {
                self.report(Input::SnapshotSent {
                    to: self.peer,
                    ok: false,
                })
                .await;
            }
        }
    }

    /// Opens the peer stream on `channel` and pumps the queue into it until the stream
    /// breaks, or the peer ends it (a refusal comes at once, before any message: it must
    /// not wait for one). `None` when the queue is closed.
    async fn stream(&mut self, channel: tonic::transport::Channel) -> Option<StreamEnd> {
        let mut client = PeerServiceClient::new(channel)
            .max_decoding_message_size(MAX_PEER_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_PEER_MESSAGE_BYTES);
        let (batch_tx, batch_rx) = mpsc::channel::<RaftBatch>(16);
        let request = self.request(batch_rx);
        let mut call = tokio::spawn(async move { client.raft(request).await });
        loop {
            let first = tokio::select! {
                m = self.queue.recv() => match m {
                    Some(m) => m,
                    None => {
                        call.abort();
                        return None;
                    }
                },
                ended = &mut call => return Some(ended),
            };
            if !self.send_batch(first, &batch_tx).await {
                self.report(Input::Unreachable(self.peer)).await;
                return Some((&mut call).await);
            }
            // The stream works: the next failure starts from a short pause again.
            self.backoff = RECONNECT_BACKOFF_MIN;
        }
    }

    /// The stream's request, with the metadata the receiver checks: cluster id, sender,
    /// the cluster identity once known, and the log format this build reads.
    fn request(
        &self,
        batches: mpsc::Receiver<RaftBatch>,
    ) -> Request<tokio_stream::wrappers::ReceiverStream<RaftBatch>> {
        let mut request = Request::new(tokio_stream::wrappers::ReceiverStream::new(batches));
        let md = request.metadata_mut();
        md.insert(CLUSTER_ID_METADATA_KEY, self.cluster_id.into());
        md.insert(FROM_METADATA_KEY, self.my_id.into());
        md.insert(LOG_FORMAT_METADATA_KEY, LOG_FORMAT.into());
        if let Some(ours) = self.uid.get() {
            if let Ok(v) = format!("{ours:016x}").parse() {
                md.insert(CLUSTER_UID_METADATA_KEY, v);
            }
        }
        request
    }

    /// Sends `first` and whatever else is queued (up to [`MAX_BATCH_MESSAGES`]) as one
    /// batch, reporting every snapshot in it as sent or not. False when the stream is
    /// broken.
    async fn send_batch(&mut self, first: Message, batch_tx: &mpsc::Sender<RaftBatch>) -> bool {
        let mut messages = vec![first];
        while messages.len() < MAX_BATCH_MESSAGES {
            match self.queue.try_recv() {
                Ok(m) => messages.push(m),
                Err(_) => break,
            }
        }
        let snapshots: Vec<u64> = messages
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
            .map(|m| m.to)
            .collect();
        let batch = RaftBatch {
            messages: messages
                .iter()
                .filter_map(|m| encode_message(m).ok())
                .collect(),
        };
        let sent = batch_tx.send(batch).await.is_ok();
        for to in snapshots {
            self.report(Input::SnapshotSent { to, ok: sent }).await;
        }
        sent
    }

    async fn stream_ended(&mut self, ended: StreamEnd) {
        match ended {
            Ok(Err(status)) if status.code() == tonic::Code::PermissionDenied => {
                // Another cluster (or a wrong certificate): say so loudly, on both
                // sides, and do not hammer the peer.
                warn!(peer = self.peer, addr = %self.addr, "peer refused this server: {}", status.message());
                self.pause().await;
            }
            Ok(Err(status)) => debug!(peer = self.peer, "peer stream ended: {status}"),
            Ok(Ok(_)) | Err(_) => debug!(peer = self.peer, "peer stream ended"),
        }
    }

    async fn pause(&mut self) {
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(RECONNECT_BACKOFF_MAX);
    }

    async fn report(&self, input: Input) {
        let _ = self.reports.send(input).await;
    }
}

/// The receiving side, served on every server's gRPC port.
pub struct PeerEndpoint {
    pub cluster_id: u64,
    /// This server's cluster identity; unknown (a joiner) until its first snapshot.
    pub uid: ClusterUid,
    /// With TLS on, only a certificate with the server role may send Raft messages.
    pub access: Access,
    pub node: Handle,
}

#[tonic::async_trait]
impl PeerService for PeerEndpoint {
    async fn raft(
        &self,
        request: Request<Streaming<RaftBatch>>,
    ) -> Result<Response<RaftAck>, Status> {
        self.access.require_server(&request)?;
        let their_cluster = request
            .metadata()
            .get(CLUSTER_ID_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let md = request.metadata();
        let from = md.get(FROM_METADATA_KEY).and_then(|v| v.to_str().ok());
        let from = from.unwrap_or("?").to_string();
        if their_cluster != Some(self.cluster_id) {
            let msg = format!(
                "peer {from} belongs to cluster id {their_cluster:?}, this server to cluster id {}",
                self.cluster_id
            );
            warn!("refused a peer: {msg}");
            return Err(Status::permission_denied(msg));
        }
        let their_uid = md
            .get(CLUSTER_UID_METADATA_KEY)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| u64::from_str_radix(v, 16).ok());
        // A sender without one is a joiner that has not installed its first snapshot:
        // it has no log and no vote until this cluster adds it.
        if let (Some(ours), Some(theirs)) = (self.uid.get(), their_uid) {
            if theirs != ours {
                let msg = format!(
                    "peer {from} belongs to another incarnation of cluster id {}: its cluster \
                     identity is {theirs:016x}, this server's {ours:016x} (servers \
                     bootstrapped with different server lists, or a data directory of \
                     another cluster)",
                    self.cluster_id,
                );
                warn!("refused a peer: {msg}");
                return Err(Status::permission_denied(msg));
            }
        }
        let format = peer_log_format(md).map_err(|msg| {
            warn!("refused a peer: {from} sent {msg}");
            Status::invalid_argument(msg)
        })?;
        if let Ok(peer) = from.parse::<u64>() {
            let _ = self.node.send(Input::PeerLogFormat { peer, format }).await;
            if let (Some(ours), Some(theirs)) = (self.uid.get(), their_uid) {
                if ours == theirs {
                    let _ = self.node.send(Input::PeerConfirmed(peer)).await;
                }
            }
        }
        let mut stream = request.into_inner();
        while let Some(batch) = stream.next().await {
            let batch = batch?;
            for bytes in batch.messages {
                match decode_message(&bytes) {
                    Ok(m) => {
                        if self.node.send(Input::Raft(Box::new(m))).await.is_err() {
                            return Err(Status::unavailable("server is stopping"));
                        }
                    }
                    Err(e) => {
                        return Err(Status::invalid_argument(format!("bad Raft message: {e}")))
                    }
                }
            }
        }
        Ok(Response::new(RaftAck {}))
    }
}

/// The log format a peer stream announces: 1 when it names none (builds from before
/// format 2 did not send the key), an error naming the key for anything but a
/// decimal number.
fn peer_log_format(md: &tonic::metadata::MetadataMap) -> Result<u32, String> {
    let Some(value) = md.get(LOG_FORMAT_METADATA_KEY) else {
        return Ok(1);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .ok_or_else(|| format!("{LOG_FORMAT_METADATA_KEY} {value:?}: not a log format number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_naming_no_log_format_is_an_older_build_and_a_malformed_one_is_refused() {
        let mut md = tonic::metadata::MetadataMap::new();
        assert_eq!(peer_log_format(&md), Ok(1));
        md.insert(LOG_FORMAT_METADATA_KEY, LOG_FORMAT.into());
        assert_eq!(peer_log_format(&md), Ok(LOG_FORMAT));
        for bad in ["", "two", "-1", "99999999999"] {
            md.insert(LOG_FORMAT_METADATA_KEY, bad.parse().unwrap());
            let err = peer_log_format(&md).unwrap_err();
            assert!(err.contains("lockd-log-format"), "{bad}: {err}");
        }
    }
}
