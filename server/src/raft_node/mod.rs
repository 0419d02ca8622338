//! The Raft driver: the one task that owns the `RawNode`, the durable log and the lock
//! table.
//!
//! Everything that changes state comes in through one bounded channel ([`Input`]) and is
//! handled by one loop on a dedicated thread, so the lock table needs no locking and
//! every replica applies the same entries in the same order. Per loop turn the driver
//! takes every queued input (many client proposals), then handles one Raft `Ready`:
//! one redb write (one fsync) for all new entries, messages sent, committed entries
//! applied, replies and events dispatched. That is how proposals are batched.
//!
//! Clients are answered only after their entry is committed and applied. A Lock or
//! Convert that has to wait stays parked here, keyed by (session, request id), until the
//! lock table reports it finished. Parked and in-flight calls are failed with
//! `NotLeader` when this server loses leadership; clients retry them elsewhere with the
//! same request id, which the lock table applies once.
//!
//! This module must not know about gRPC: it speaks [`Command`]/[`Reply`] and raft-rs
//! messages; the transport and the services translate.

use crate::config::{Config, FenceDeviceConfig};
use crate::fence;
use crate::liveness::Liveness;
use crate::membership::{self, Change};
use crate::state::{
    Command, Event, FenceProgress, FenceRecord, LockView, NodeState, Reply, RequestId,
    ResourceView, SessionId, State,
};
use crate::storage::{DiskStorage, NewLog, Recorded, StorageError, WrittenSnapshot};
use crate::telemetry;
use protobuf::Message as _;
use raft::prelude::*;
use raft::StateRole;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, error, info, warn};

mod conf;
mod effects;
mod fencing;
mod handle;
mod heartbeat;
mod open;
mod proposals;
mod ready;
mod run;
mod snapshot;
mod views;

pub use fencing::FenceLevelResult;
pub use handle::{input_channel, Handle, Input, Query, QueryAnswer};
pub use open::{ClusterUid, Start};
pub use views::{Member, NodeRow, NodeStatus, PeerProgress, ResourceRow};

use heartbeat::{BeatBatch, BeatReply};
use open::Identity;
use proposals::{driver_stopped, fail, CommandReply};
use run::stop_on_storage_failure;
use snapshot::{decode_snapshot, encode_snapshot, SnapshotInFlight};

/// Bound on queued inputs to the driver; callers wait (back-pressure) beyond it.
pub const INPUT_QUEUE_LEN: usize = 16_384;

/// Why a proposal got no reply from the lock table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This server is not the leader; `leader` is the leader's client address if known.
    #[error("not the leader")]
    NotLeader { leader: Option<String> },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    /// A request the current state does not allow (a membership change against the
    /// rules, say); nothing was changed.
    #[error("refused: {0}")]
    Refused(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What a log entry carries: the leader's clock at proposal (the lock table's only
/// notion of time) and the operation.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    now_ms: u64,
    op: Op,
}

#[derive(Debug, Serialize, Deserialize)]
enum Op {
    Apply(Command),
    /// A no-op whose application marks the point at which a [`Query`] is answered.
    Read,
}

/// Where the driver hands outgoing Raft messages; implemented by the transport.
pub trait Outbox: Send + 'static {
    fn send(&mut self, messages: Vec<Message>);
    /// Starts (or re-points) the connection to a server that joined the cluster.
    fn add_peer(&mut self, id: u64, addr: &str);
    /// Stops sending to a server that left the cluster.
    fn remove_peer(&mut self, id: u64);
}

enum Waiting {
    Command(oneshot::Sender<Result<Reply, ProposeError>>),
    Read(Query, oneshot::Sender<Result<QueryAnswer, ProposeError>>),
    Membership(oneshot::Sender<Result<Vec<Member>, ProposeError>>),
}

struct InFlight {
    waiting: Waiting,
    /// For Lock and Convert: where to park the caller if the request queues.
    park_as: Option<(SessionId, RequestId)>,
    /// When it was appended to the leader's log.
    proposed: Instant,
}

pub struct RaftNode<O: Outbox> {
    id: u64,
    raw: RawNode<DiskStorage>,
    state: State,
    outbox: O,
    inputs: mpsc::Receiver<Input>,
    status_tx: watch::Sender<NodeStatus>,
    /// Client and peer addresses of all servers: the config's, and those membership
    /// changes brought (kept in snapshots). Redirects name them.
    addrs: BTreeMap<u64, String>,
    /// Proposal context = this process's random nonce + a sequence number, so a reply
    /// goes only to the proposal that made the entry, never to one of a former run.
    nonce: u64,
    next_seq: u64,
    in_flight: HashMap<u64, InFlight>,
    parked: HashMap<(SessionId, RequestId), Vec<CommandReply>>,
    applied: u64,
    /// Index of the last snapshot taken or started.
    last_snapshot: u64,
    /// Size of the last snapshot this server encoded (0 before the first).
    last_snapshot_bytes: usize,
    snapshot_every: u64,
    /// Entries kept in the log before a snapshot's index when compacting.
    snapshot_keep: u64,
    /// Take a snapshot as soon as none is being written, whatever its distance to the
    /// last one.
    snapshot_now: bool,
    /// The snapshot being written off this thread, if any: one at a time.
    snapshot_job: Option<SnapshotInFlight>,
    /// When each peer's last message arrived; a peer silent for longer than
    /// `peer_timeout` (an election timeout) counts as not running.
    heard: HashMap<u64, Instant>,
    peer_timeout: Duration,
    proposal_timeout: Duration,
    tick: Duration,
    /// When a Tick command (queue timeouts) was last proposed, so one is in flight at a time.
    tick_proposed_at: Option<Instant>,
    was_leader: bool,
    liveness: Liveness,
    /// Heartbeats received this turn, confirmed together by one ReadIndex.
    beats: Vec<(SessionId, BeatReply)>,
    /// Heartbeat batches waiting for their ReadIndex, by request context.
    beat_batches: HashMap<u64, BeatBatch>,
    next_read_ctx: u64,
    /// Reconnect entries proposed and not yet applied.
    reconnecting: HashSet<SessionId>,
    /// Open event streams of sessions (only on the leader).
    streams: HashMap<SessionId, mpsc::Sender<Event>>,
    /// Each configured node's fence devices.
    fence_devices: HashMap<String, Vec<FenceDeviceConfig>>,
    fence_backoff: Duration,
    /// Fences with a level running or its result not yet applied, since when.
    fence_busy: HashMap<SessionId, Instant>,
    /// Not before this instant: the back-off after a round in which every level failed.
    fence_retry_at: HashMap<SessionId, Instant>,
    /// Nodes already warned about having no fence devices.
    fence_warned: HashSet<SessionId>,
    /// To hand fence jobs the driver's input queue.
    inputs_tx: mpsc::Sender<Input>,
    /// Who this data directory belongs to; a joiner's cluster identity is filled in
    /// by its first snapshot.
    identity: Identity,
    /// The cluster identity as the transport sees it.
    uid: ClusterUid,
    /// The bootstrap gate: configured servers not yet heard with this cluster's
    /// identity (see `tick_raft`). Empty unless this start created the log.
    unconfirmed: HashSet<u64>,
    /// When the gate last said what it waits for.
    gate_warned: Instant,
}

/// Encodes a Raft message for the wire (the transport carries them as `bytes`).
pub fn encode_message(m: &Message) -> Result<Vec<u8>, protobuf::ProtobufError> {
    m.write_to_bytes()
}

pub fn decode_message(bytes: &[u8]) -> Result<Message, protobuf::ProtobufError> {
    Message::parse_from_bytes(bytes)
}
