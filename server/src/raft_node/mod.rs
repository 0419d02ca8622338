//! The Raft driver: the one task that owns the `RawNode`, the durable log and the lock
//! table.
//!
//! Everything that changes state comes in through one bounded channel ([`Input`]) and is
//! handled by one loop on a dedicated thread, so the lock table needs no locking and
//! every replica applies the same entries in the same order. Per loop turn the driver
//! takes every queued input (many client proposals), then handles one Raft `Ready`:
//! one raft-engine write (one fdatasync) for all new entries, messages sent, committed
//! entries applied, replies and events dispatched. That is how proposals are batched.
//!
//! Clients are answered only after their entry is committed and applied. A Lock or
//! Convert that has to wait stays parked here, keyed by (session, request id), until the
//! lock table reports it finished. Parked and in-flight calls are failed with
//! `NotLeader` when this server loses leadership; clients retry them elsewhere with the
//! same request id, which the lock table applies once.
//!
//! The modules follow one loop turn, in the shape of raft-rs's `five_mem_node`:
//! - `handle`: what the services see ([`Handle`], [`Input`] and its named requests);
//! - `open`: start-up (log, identity, bootstrap gate);
//! - `run`: the loop, ticks, inputs, the end of a turn;
//! - `proposals`: entries proposed and the callers waiting or parked on them;
//! - `ready`: one Raft Ready, applying committed entries;
//! - `effects`: what an applied entry's events cause (callers, streams, fence jobs);
//! - `heartbeat`: heartbeats confirmed by one ReadIndex per turn;
//! - `fencing`: fence jobs, their levels and back-off;
//! - `snapshot`: when to snapshot, the writer thread, the snapshot's bytes;
//! - `conf`: membership changes and leadership transfer;
//! - `views`: the status and admin views (with a typed [`Role`]).
//!
//! This module must not know about gRPC: it speaks [`Command`]/[`Reply`] and raft-rs
//! messages; the transport and the services translate. It decides nothing the lock
//! table decides: it learns outcomes from [`Reply`] and [`Event`]s, never by looking at
//! a command.

use crate::liveness::Liveness;
use crate::state::{Command, State};
use crate::storage::DiskStorage;
use protobuf::Message as _;
use raft::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;
use std::time::Instant;
use tokio::sync::{mpsc, watch};

#[cfg(test)]
mod batch_attack_tests;
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
#[cfg(test)]
mod tests;
mod trim;
mod unfencing;
mod views;

pub use fencing::FenceLevelResult;
pub use handle::{input_channel, Handle, Input, LocksQuery, Query, QueryAnswer};
pub(crate) use open::{check_identity, Identity};
pub use open::{ClusterUid, Start};
pub use views::{LockRow, Member, NodeRow, NodeStatus, PeerProgress, ResourceRow, Role};

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
pub(crate) struct Envelope {
    pub(crate) now_ms: u64,
    pub(crate) op: Op,
}

/// The newest log format this build reads and writes, announced on its peer streams
/// (`LOG_FORMAT_METADATA_KEY`). Format 1: `Op::Apply` and `Op::Read`, one command per
/// entry. Format 2 adds `Op::Batch`.
pub const LOG_FORMAT: u32 = 2;

/// The format a leader needs every peer to have announced before it writes
/// `Op::Batch` entries: a build of format 1 cannot decode them and stops (exit 70) at
/// the first one, so a rolling upgrade keeps entries of one command each until the
/// last server runs a build that reads batches.
pub(crate) use lockd_proto::LOG_FORMAT_BATCH;

#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Op {
    Apply(Command),
    /// A no-op whose application marks the point at which a [`Query`] is answered.
    Read,
    /// Several callers' commands, applied in order, each as `Apply` would
    /// (`State::apply` with the entry's index gives each its own ids). Added after
    /// the others so their encodings stay (log format 2, [`LOG_FORMAT_BATCH`]); a
    /// build from before it stops at the first such entry (an undecodable committed
    /// entry) until it is upgraded, so a leader writes none until every peer has
    /// announced format 2.
    Batch(Vec<Command>),
}

impl Op {
    /// The lock-table commands the entry carries, in order.
    pub(crate) fn into_commands(self) -> Vec<Command> {
        match self {
            Op::Apply(command) => vec![command],
            Op::Batch(commands) => commands,
            Op::Read => Vec::new(),
        }
    }
}

/// Where the driver hands outgoing Raft messages; implemented by the transport (and
/// by an in-memory network in the driver's tests).
pub trait Outbox: Send + 'static {
    fn send(&mut self, messages: Vec<Message>);
    /// Starts (or re-points) the connection to a server that joined the cluster.
    fn add_peer(&mut self, id: u64, addr: &str);
    /// Stops sending to a server that left the cluster.
    fn remove_peer(&mut self, id: u64);
}

/// The driver's clocks, from `[timing]`.
struct Timing {
    tick: Duration,
    /// How long a proposal (or a heartbeat's ReadIndex) may take before its caller
    /// hears "no quorum".
    proposal_timeout: Duration,
    /// A peer silent for longer (an election timeout) counts as not running.
    peer_timeout: Duration,
}

pub struct RaftNode<O: Outbox> {
    id: u64,
    raw: RawNode<DiskStorage>,
    state: State,
    outbox: O,
    inputs: mpsc::Receiver<Input>,
    /// The sender half of `inputs`, for the jobs the driver starts (fence levels, the
    /// snapshot writer) to report back.
    inputs_tx: mpsc::Sender<Input>,
    status_tx: watch::Sender<NodeStatus>,
    /// Client and peer addresses of all servers: the config's, and those membership
    /// changes brought (kept in snapshots). Redirects name them.
    addrs: BTreeMap<u64, String>,
    timing: Timing,
    /// When each peer's last message arrived (see [`Timing::peer_timeout`]).
    heard: HashMap<u64, Instant>,
    applied: u64,
    was_leader: bool,
    liveness: Liveness,
    proposals: proposals::Proposals,
    beats: heartbeat::Beats,
    streams: effects::EventStreams,
    fencing: fencing::Fencing,
    unfencer: crate::unfence::Unfencer,
    snapshots: snapshot::Snapshots,
    heap: trim::HeapTrim,
    /// Who this data directory belongs to; a joiner's cluster identity is filled in
    /// by its first snapshot.
    identity: open::Identity,
    /// The cluster identity as the transport sees it.
    uid: ClusterUid,
    gate: open::BootstrapGate,
    /// The log format each peer's latest Raft stream announced (1 when it named none).
    peer_log_formats: HashMap<u64, u32>,
    /// Whether this leader last wrote batch entries (logged when it changes).
    batching: bool,
}

/// Encodes a Raft message for the wire (the transport carries them as `bytes`).
pub fn encode_message(m: &Message) -> Result<Vec<u8>, protobuf::ProtobufError> {
    m.write_to_bytes()
}

pub fn decode_message(bytes: &[u8]) -> Result<Message, protobuf::ProtobufError> {
    Message::parse_from_bytes(bytes)
}
