//! Start-up: what a server without a log does ([`Start`]), its data directory's
//! identity and the cluster's ([`ClusterUid`]), the lock table restored from the last
//! snapshot, and the bootstrap gate that keeps a new cluster from electing a leader
//! before every configured server showed the same identity.

use super::effects::EventStreams;
use super::fencing::Fencing;
use super::heartbeat::Beats;
use super::proposals::Proposals;
use super::snapshot::{decode_snapshot, Snapshots};
use super::{Handle, Input, NodeStatus, Outbox, RaftNode, Role, Timing};
use crate::config::Config;
use crate::liveness::Liveness;
use crate::state::State;
use crate::storage::snapshot::encode_snapshot;
use crate::storage::{DiskStorage, NewLog, StorageError};
use raft::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// What a server whose data directory holds no Raft log does at start (issue 12: a
/// server never forgets what it acknowledged and votes anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// Refuse to start: a configured member without its log must be removed and
    /// rejoin, never vote again as if new.
    Existing,
    /// Form a new cluster of the config's servers (`--bootstrap`, on the first start
    /// of every server of a new cluster, like etcd's initial-cluster-state=new).
    Bootstrap,
    /// Wait with no configuration to be added by a leader (`--join`).
    Join,
}

/// The identity of a cluster incarnation: a 64-bit digest (SHA-256) of the cluster's
/// name, id and the servers it was bootstrapped with, fixed at bootstrap and stored in
/// every server's data directory; a joiner learns it from its first snapshot. Peer
/// streams carry it and a receiver refuses another (`transport`). Shared by the
/// driver and the transport; 0 = not known yet.
#[derive(Clone, Debug, Default)]
pub struct ClusterUid(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl ClusterUid {
    pub fn get(&self) -> Option<u64> {
        Some(self.0.load(std::sync::atomic::Ordering::SeqCst)).filter(|&v| v != 0)
    }

    pub(super) fn set(&self, uid: u64) {
        self.0.store(uid, std::sync::atomic::Ordering::SeqCst);
    }

    /// The identity a cluster bootstrapped from `config` gets: the same on every server
    /// given the same name, id and server list, another for any other list.
    pub fn of_bootstrap(config: &Config) -> u64 {
        let mut servers: Vec<(u64, &str)> = config
            .servers
            .iter()
            .map(|s| (s.id, s.addr.as_str()))
            .collect();
        servers.sort_unstable();
        let mut text = format!("lockd\0{}\0{}\0", config.cluster.name, config.cluster.id);
        for (id, addr) in servers {
            text.push_str(&format!("{id}={addr}\n"));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        u64::from_be_bytes(first).max(1)
    }
}

/// Who a data directory belongs to; written when its log is created and checked at
/// every start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub(crate) cluster_name: String,
    pub(crate) cluster_id: u64,
    /// See [`ClusterUid`]; 0 until a joiner installed its first snapshot.
    pub(crate) cluster_uid: u64,
    pub(crate) server_id: u64,
}

/// Reads the data directory's identity and checks it is this server's, of this
/// cluster: a directory copied from another server or another cluster is refused.
pub(crate) fn check_identity(
    storage: &DiskStorage,
    config: &Config,
    id: u64,
    dir: &std::path::Path,
) -> anyhow::Result<Identity> {
    let bytes = storage.identity()?.ok_or_else(|| {
        anyhow::anyhow!(
            "the Raft log in {} has no identity record (written by an older lockd?): \
             refusing to start",
            dir.display()
        )
    })?;
    let identity: Identity = serde_json::from_slice(&bytes).map_err(|e| {
        anyhow::anyhow!(
            "the identity record in {} is unreadable: {e}",
            dir.display()
        )
    })?;
    if identity.server_id != id {
        anyhow::bail!(
            "{} belongs to server {}, not to server {id}: a data directory must never be \
             copied between servers",
            dir.display(),
            identity.server_id
        );
    }
    if identity.cluster_id != config.cluster.id || identity.cluster_name != config.cluster.name {
        anyhow::bail!(
            "{} belongs to cluster `{}` (id {}), the config names `{}` (id {})",
            dir.display(),
            identity.cluster_name,
            identity.cluster_id,
            config.cluster.name,
            config.cluster.id
        );
    }
    Ok(identity)
}

/// After bootstrap the replicated membership, not the config file, decides who votes;
/// a config whose server list disagrees is the operator's mistake, said loudly.
fn warn_if_membership_differs(storage: &DiskStorage, config: &Config) {
    let cs = storage.conf_state();
    let mut members: Vec<u64> = cs.voters.iter().chain(&cs.learners).copied().collect();
    members.sort_unstable();
    let mut configured: Vec<u64> = config.servers.iter().map(|s| s.id).collect();
    configured.sort_unstable();
    if !members.is_empty() && members != configured {
        warn!(
            ?members,
            ?configured,
            "the config's [[servers]] differ from the replicated membership, which is what \
             counts: change membership with `lockctl server add/remove` and update the config"
        );
    }
}

/// The bootstrap gate (see [`RaftNode::tick_raft`]): configured servers not yet heard
/// with this cluster's identity. Empty unless this start created the log.
pub(super) struct BootstrapGate {
    unconfirmed: HashSet<u64>,
    /// When the gate last said what it waits for.
    warned_at: Instant,
}

impl BootstrapGate {
    /// A peer opened a Raft stream with this cluster's identity.
    pub(super) fn confirmed(&mut self, peer: u64) {
        if self.unconfirmed.remove(&peer) && self.unconfirmed.is_empty() {
            info!("every configured server confirmed this cluster's identity");
        }
    }

    /// Whether the gate holds elections back at `term` (saying so now and then).
    fn closed(&mut self, term: u64) -> bool {
        if self.unconfirmed.is_empty() || term > 1 {
            return false;
        }
        if self.warned_at.elapsed() >= Duration::from_secs(10) {
            self.warned_at = Instant::now();
            warn!(
                waiting_for = ?self.unconfirmed,
                "new cluster: no election until every configured server runs with the \
                 same cluster identity (same config)"
            );
        }
        true
    }
}

/// Opens the log in `dir`, creating it (with this server's identity, in one
/// write) only when `start` asks for a new one, and checks the identity.
fn open_storage(
    config: &Config,
    id: u64,
    start: Start,
    voters: &[u64],
) -> anyhow::Result<(DiskStorage, Identity)> {
    let dir = config.server_dir(id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    let identity = Identity {
        cluster_name: config.cluster.name.clone(),
        cluster_id: config.cluster.id,
        cluster_uid: match start {
            Start::Join => 0,
            _ => ClusterUid::of_bootstrap(config),
        },
        server_id: id,
    };
    let identity_bytes = serde_json::to_vec(&identity)?;
    let new = (start != Start::Existing).then_some(NewLog {
        voters,
        identity: Some(&identity_bytes),
    });
    let storage = match DiskStorage::open_with(&dir, new) {
        Ok((storage, created)) => {
            if created {
                info!(?identity, "new data directory: identity recorded");
            }
            storage
        }
        Err(StorageError::NoLog { .. }) => anyhow::bail!(
            "no Raft log in {}: refusing to start. If server {id} was a member of the \
             cluster and lost its data, it must not vote again as if new (it would \
             forget what it acknowledged): run `lockctl server remove {id}`, start it \
             with --join and add it back with `lockctl server add {id} <addr>`. To form \
             a new cluster, start every server the first time with --bootstrap.",
            dir.display()
        ),
        Err(e) => return Err(e.into()),
    };
    let identity = check_identity(&storage, config, id, &dir)?;
    Ok((storage, identity))
}

/// The lock table and address book as of the log's snapshot, which a new cluster's
/// log is first given: a snapshot of the empty table at index 1, so its log begins at
/// 2 and a server added later is sent a snapshot (which carries the initial
/// configuration) instead of a log whose start it could not apply.
fn restore(
    storage: &DiskStorage,
    identity: &Identity,
    voters: &[u64],
    start: Start,
    config: &Config,
    id: u64,
) -> anyhow::Result<(BTreeMap<u64, String>, State, u64)> {
    let fresh = storage.snapshot_index() == 0
        && storage.last_index() == 0
        && storage.hard_state().term == 0;
    if fresh && start != Start::Join {
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters.to_vec();
        snap.data = encode_snapshot(
            identity.cluster_uid,
            &BTreeMap::new(),
            &State::new().freeze(),
            1,
        )
        .into();
        storage.apply_snapshot(&snap)?;
    }
    let (mut addrs, state, snapshot_index) = match storage.snapshot_data()? {
        Some(snap) => {
            let started = Instant::now();
            let (_, addrs, state) = decode_snapshot(snap.get_data()).map_err(|e| {
                anyhow::anyhow!(
                    "snapshot in {} is unreadable: {e}",
                    config.server_dir(id).display()
                )
            })?;
            info!(
                index = snap.get_metadata().index,
                bytes = snap.get_data().len(),
                held_locks = state.held_lock_count(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "lock table restored from the snapshot"
            );
            (addrs, state, snap.get_metadata().index)
        }
        None => (BTreeMap::new(), State::new(), 0),
    };
    // The config file wins for the servers it names: it is the operator's latest word.
    for s in &config.servers {
        addrs.insert(s.id, s.addr.clone());
    }
    Ok((addrs, state, snapshot_index))
}

impl<O: Outbox> RaftNode<O> {
    /// Opens this server's log and restores the lock table from its snapshot; the
    /// driver then replays committed entries past it.
    /// `inputs` comes from [`super::input_channel`]; its sender half is what the
    /// transport and the returned [`Handle`] use.
    /// A server whose log is empty starts with the config's servers as voters, unless
    /// `join`: then it starts with no configuration and waits for a leader to add it
    /// (`lockctl server add`).
    pub fn open(
        config: &Config,
        id: u64,
        start: Start,
        uid: ClusterUid,
        mut outbox: O,
        (tx, rx): (mpsc::Sender<Input>, mpsc::Receiver<Input>),
    ) -> anyhow::Result<(RaftNode<O>, Handle)> {
        let join = start == Start::Join;
        let voters: Vec<u64> = if join {
            Vec::new()
        } else {
            config.servers.iter().map(|s| s.id).collect()
        };
        let (storage, identity) = open_storage(config, id, start, &voters)?;
        uid.set(identity.cluster_uid);
        warn_if_membership_differs(&storage, config);
        let (addrs, state, snapshot_index) =
            restore(&storage, &identity, &voters, start, config, id)?;
        for (peer, addr) in &addrs {
            if *peer != id {
                outbox.add_peer(*peer, addr);
            }
        }
        let t = &config.timing;
        let raft_config = raft::Config {
            id,
            election_tick: t.election_ticks as usize,
            heartbeat_tick: t.heartbeat_ticks as usize,
            applied: snapshot_index,
            check_quorum: true,
            pre_vote: true,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            ..Default::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let raw = RawNode::new(&raft_config, storage, &logger)?;
        // The bootstrap gate (see `tick_raft`): a member that never saw an election.
        let unconfirmed: HashSet<u64> = if !join && raw.raft.term <= 1 {
            config
                .servers
                .iter()
                .map(|s| s.id)
                .filter(|&s| s != id)
                .collect()
        } else {
            HashSet::new()
        };
        let (status_tx, status_rx) = watch::channel(NodeStatus {
            id,
            role: Role::Follower,
            ..Default::default()
        });
        let timing = Timing {
            tick: Duration::from_millis(t.tick_ms),
            proposal_timeout: Duration::from_millis(t.proposal_timeout_ms),
            peer_timeout: Duration::from_millis(t.tick_ms * t.election_ticks),
        };
        let node = RaftNode {
            id,
            raw,
            state,
            outbox,
            inputs: rx,
            inputs_tx: tx.clone(),
            status_tx,
            addrs,
            heard: HashMap::new(),
            applied: snapshot_index,
            was_leader: false,
            liveness: Liveness::new(
                Duration::from_millis(config.liveness.expiry_window_ms()),
                Duration::from_millis(config.liveness.grace_ms()),
            ),
            proposals: Proposals::new(),
            beats: Beats::default(),
            streams: EventStreams::default(),
            fencing: Fencing::new(config, timing.proposal_timeout),
            unfencer: crate::unfence::Unfencer::new(config, timing.proposal_timeout * 2),
            snapshots: Snapshots::new(
                snapshot_index,
                t.snapshot_every_entries,
                t.snapshot_keep_entries,
            ),
            heap: Default::default(),
            timing,
            identity,
            uid: uid.clone(),
            gate: BootstrapGate {
                unconfirmed,
                warned_at: Instant::now(),
            },
            peer_log_formats: HashMap::new(),
            batching: false,
        };
        Ok((node, Handle::new(tx, status_rx, uid)))
    }

    /// Ticks Raft, except while a new cluster's bootstrap gate is closed: before its
    /// first election a bootstrapped server waits until every server of its config
    /// opened a Raft stream with the same cluster identity. Servers given different
    /// server lists (issue 12) then never elect a leader at all — each side waits for a
    /// server that answers with another identity, and both log it — instead of two
    /// halves each forming a quorum of their own list. Votes asked by others are still
    /// answered. Once any election has happened (term above the bootstrap's 1) the
    /// gate is gone for good.
    pub(super) fn tick_raft(&mut self) {
        if !self.gate.closed(self.raw.raft.term) {
            self.raw.tick();
        }
    }

    /// A joiner learns its cluster's identity from its first snapshot and keeps it; a
    /// snapshot of another incarnation stops the server before it writes anything.
    pub(super) fn adopt_cluster_uid(&mut self, uid: u64) -> anyhow::Result<()> {
        if self.identity.cluster_uid == uid {
            return Ok(());
        }
        if self.identity.cluster_uid != 0 {
            anyhow::bail!(
                "a snapshot of cluster identity {uid:016x} arrived, this server belongs to \
                 {:016x}: refusing it",
                self.identity.cluster_uid
            );
        }
        self.identity.cluster_uid = uid;
        self.raw
            .mut_store()
            .set_identity(&serde_json::to_vec(&self.identity)?)?;
        self.uid.set(uid);
        info!(cluster_uid = %format!("{uid:016x}"), "joined: cluster identity recorded");
        Ok(())
    }
}
