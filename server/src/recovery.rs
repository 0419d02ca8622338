//! Disaster recovery (issue 18): the backup file `lockctl snapshot save` writes, what
//! `lockd snapshot inspect` shows of a snapshot, `lockd restore` (a data directory for a
//! new cluster incarnation, from a backup) and `lockd recover --force-new-cluster` (a
//! surviving server becomes a cluster of its own, keeping its state).
//!
//! Both restore and recover start a *new incarnation*: a new cluster identity
//! (`ClusterUid`), so the peer handshake refuses every server of the old one; every
//! LoggedIn session WasLoggedIn, so a node that does not come back is expired and fenced
//! before its locks move (BRIEF §3.4's cold-start rule); and fencing tokens in the next
//! epoch, above every token the old incarnation issued, before or after the snapshot
//! (see `state/incarnation.rs`). Both run offline, on a stopped server, and write the
//! new directory beside the old one before a rename puts it in place: a refusal or a
//! crash leaves the data directory as it was.
//!
//! This module must not run while the server does: raft-engine's lock file makes `recover`
//! fail on a running server's directory, and `restore` refuses a non-empty one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use raft::prelude::{EntryType, Snapshot};
use raft::GetEntriesContext;

use crate::config::Config;
use crate::raft_node::{Envelope, Identity};
use crate::state::{token_epoch, NodeState, State, TOKEN_COUNTER_BITS};
use crate::storage::snapshot::{
    decode_backup, decode_file, decode_snapshot, encode_file, encode_snapshot, ClusterName,
    SnapshotError, SnapshotHead,
};
use crate::storage::{DiskStorage, NewLog};

/// How long `recover` waits for each other server to answer before it counts it gone.
const PEER_PROBE: Duration = Duration::from_secs(2);

/// The backup file for the leader's applied state: `head` (index, term, membership)
/// with the cluster's name and id from `config`, and the snapshot `body`; checked
/// against the file rules before it is handed out.
pub fn backup_file(
    config: &Config,
    mut head: SnapshotHead,
    body: &[u8],
) -> Result<Vec<u8>, SnapshotError> {
    head.cluster = Some(ClusterName {
        name: config.cluster.name.clone(),
        id: config.cluster.id,
    });
    let file = encode_file(&head, body);
    decode_file(&file)?;
    Ok(file)
}

/// What a snapshot file holds, as text, after every check passed: a backup or a
/// server's own `snapshot-<index>.bin`. Errors name the file and the broken rule.
pub fn inspect(path: &Path) -> anyhow::Result<String> {
    let bytes = read(path)?;
    let (head, body) = decode_file(&bytes).map_err(|e| refused(path, e))?;
    let (uid, addrs, state) = decode_snapshot(&bytes[body]).map_err(|e| refused(path, e))?;
    let cluster = match &head.cluster {
        Some(c) => format!("`{}` (id {})", c.name, c.id),
        None => "not recorded (a server's own snapshot file, not a backup)".into(),
    };
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    for s in state.session_states() {
        *by_state.entry(s.to_string()).or_default() += 1;
    }
    let last = state.last_token();
    let mut out = format!(
        "file:          {}\nbytes:         {}\nchecks:        magic, version, length, crc, head, \
         identity, membership, table: all passed\ncluster:       {cluster}\ncluster uid:   \
         {uid:016x}\nraft index:    {}\nraft term:     {}\nvoters:        {:?}\nlearners:      \
         {:?}\n",
        path.display(),
        bytes.len(),
        head.index,
        head.term,
        head.voters,
        head.learners,
    );
    for (id, addr) in &addrs {
        out.push_str(&format!("address:       server {id} at {addr}\n"));
    }
    out.push_str(&format!(
        "sessions:      {} {by_state:?}\nheld locks:    {}\nlast token:    {last} (epoch {}, \
         grant {} of the epoch)\n",
        state.session_count(),
        state.held_lock_count(),
        token_epoch(last),
        last & ((1 << TOKEN_COUNTER_BITS) - 1),
    ));
    Ok(out)
}

/// What restore or recover prepared.
#[derive(Debug)]
pub struct Incarnation {
    pub dir: PathBuf,
    pub index: u64,
    pub term: u64,
    pub cluster_uid: u64,
    pub members: Vec<u64>,
    /// Every grant of the new incarnation has a larger token.
    pub last_token: u64,
    /// Sessions that must come back within the expiry window or be fenced.
    pub was_logged_in: usize,
}

impl std::fmt::Display for Incarnation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "prepared {} for a new cluster incarnation: cluster uid {:016x}, servers {:?}, \
             state at Raft index {} term {}, {} session(s) must log in again within the \
             expiry window or be fenced, fencing tokens continue above {}",
            self.dir.display(),
            self.cluster_uid,
            self.members,
            self.index,
            self.term,
            self.was_logged_in,
            self.last_token
        )
    }
}

/// `lockd restore`: checks the backup `file` against every snapshot rule and against
/// `config` (same cluster name and id), then writes server `id`'s data directory for a
/// new incarnation whose voters are the config's servers. Refuses, writing nothing, a
/// data directory that is not empty. Every server of the new cluster is restored from
/// the same file with the same config and `token_floor`, which gives them the same
/// cluster identity.
pub fn restore(
    config: &Config,
    id: u64,
    file: &Path,
    token_floor: u64,
) -> anyhow::Result<Incarnation> {
    if config.server(id).is_none() {
        bail!("server {id} is not in the config's [[servers]]");
    }
    let bytes = read(file)?;
    let backup = decode_backup(&bytes).map_err(|e| refused(file, e))?;
    if backup.cluster.name != config.cluster.name || backup.cluster.id != config.cluster.id {
        bail!(
            "{} is a backup of cluster `{}` (id {}), the config names `{}` (id {}): refusing",
            file.display(),
            backup.cluster.name,
            backup.cluster.id,
            config.cluster.name,
            config.cluster.id
        );
    }
    let dir = config.server_dir(id);
    if is_non_empty_dir(&dir)? {
        bail!(
            "{} is not empty: restore writes a new data directory and never overwrites one \
             (move it away first; it belongs to the old incarnation)",
            dir.display()
        );
    }
    let members: Vec<u64> = config.servers.iter().map(|s| s.id).collect();
    let addrs: BTreeMap<u64, String> = config
        .servers
        .iter()
        .map(|s| (s.id, s.addr.clone()))
        .collect();
    let start = Start {
        index: backup.head.index,
        term: backup.head.term,
        old_uid: backup.uid,
        token_floor,
    };
    let (incarnation, new) = prepare(config, id, &dir, start, members, addrs, backup.state)?;
    if dir.exists() {
        std::fs::remove_dir(&dir).with_context(|| format!("remove the empty {}", dir.display()))?;
    }
    put_in_place(&new, &dir)?;
    Ok(incarnation)
}

/// `lockd recover --force-new-cluster`: server `id`, stopped, whose peers are gone for
/// good, becomes the only voter of a new incarnation with its own state: its snapshot
/// plus every entry of its log, up to the last. Entries past its commit index are kept
/// too (etcd's --force-new-cluster drops them): a follower learns the commit index one
/// message late, so its last entries may be grants the lost majority committed and
/// acknowledged; and committing them is what Raft itself would do had this server won
/// an election. Dropping them could hand an acknowledged lock to someone else.
/// Refuses if any other member answers at its address. The old directory is kept
/// beside the new one as `<dir>.before-recover`.
pub async fn recover(config: &Config, id: u64, token_floor: u64) -> anyhow::Result<Incarnation> {
    let me = config
        .server(id)
        .ok_or_else(|| anyhow!("server {id} is not in the config's [[servers]]"))?
        .addr
        .clone();
    let dir = config.server_dir(id);
    let kept = PathBuf::from(format!("{}.before-recover", dir.display()));
    if kept.exists() {
        bail!(
            "{} exists (an earlier recover): move it away first",
            kept.display()
        );
    }
    let survivor = Survivor::read(config, id, &dir)?;
    probe_peers(&survivor).await?;
    let start = Start {
        index: survivor.index,
        term: survivor.term,
        old_uid: survivor.uid,
        token_floor,
    };
    let addrs = BTreeMap::from([(id, me)]);
    let (incarnation, new) = prepare(config, id, &dir, start, vec![id], addrs, survivor.state)?;
    std::fs::rename(&dir, &kept)
        .with_context(|| format!("rename {} to {}", dir.display(), kept.display()))?;
    put_in_place(&new, &dir)?;
    Ok(incarnation)
}

/// What a stopped server holds: its state through the last entry of its log, and its
/// membership.
struct Survivor {
    index: u64,
    term: u64,
    uid: u64,
    /// Every other member and its address, if one is known.
    peers: Vec<(u64, Option<String>)>,
    state: State,
}

impl Survivor {
    fn read(config: &Config, id: u64, dir: &Path) -> anyhow::Result<Survivor> {
        let (storage, _) = DiskStorage::open_with(dir, None).with_context(|| {
            format!(
                "cannot open the Raft log in {} (is the server still running?)",
                dir.display()
            )
        })?;
        let identity = crate::raft_node::check_identity(&storage, config, id, dir)?;
        let (mut addrs, mut state, first) = match storage.snapshot_data()? {
            Some(snap) => {
                let (_, addrs, state) = decode_snapshot(snap.get_data())
                    .map_err(|e| anyhow!("the snapshot in {} is refused: {e}", dir.display()))?;
                (addrs, state, snap.get_metadata().index + 1)
            }
            None => (BTreeMap::new(), State::new(), storage.first_index()),
        };
        let last = storage.last_index();
        replay(&storage, &mut state, first, last)?;
        let term = raft::Storage::term(&storage, last)
            .map_err(|e| anyhow!("no term for the last index {last}: {e}"))?;
        for s in &config.servers {
            addrs.entry(s.id).or_insert_with(|| s.addr.clone());
        }
        let cs = storage.conf_state();
        let peers = cs
            .voters
            .iter()
            .chain(&cs.learners)
            .filter(|&&p| p != id)
            .map(|p| (*p, addrs.get(p).cloned()))
            .collect();
        Ok(Survivor {
            index: last,
            term,
            uid: identity.cluster_uid,
            peers,
            state,
        })
    }
}

/// Applies the entries `first..=last` to `state`, as the driver would (configuration
/// changes do not touch the lock table; the membership is rewritten).
fn replay(storage: &DiskStorage, state: &mut State, first: u64, last: u64) -> anyhow::Result<()> {
    if first > last {
        return Ok(());
    }
    let entries = raft::Storage::entries(
        storage,
        first,
        last + 1,
        None,
        GetEntriesContext::empty(false),
    )
    .map_err(|e| anyhow!("cannot read the log entries {first}..={last}: {e}"))?;
    for entry in entries {
        if entry.get_entry_type() != EntryType::EntryNormal || entry.get_data().is_empty() {
            continue;
        }
        let envelope: Envelope = postcard::from_bytes(entry.get_data()).map_err(|e| {
            anyhow!(
                "committed entry {} (term {}) is undecodable: {e}",
                entry.index,
                entry.term
            )
        })?;
        for command in envelope.op.into_commands() {
            state.apply(entry.index, envelope.now_ms, command);
        }
    }
    Ok(())
}

/// Refuses unless every other member is gone: one that accepts a connection may still
/// hold a newer state or a quorum, and two clusters must never grant the same locks.
async fn probe_peers(survivor: &Survivor) -> anyhow::Result<()> {
    for (peer, addr) in &survivor.peers {
        let Some(addr) = addr else {
            tracing::warn!(
                peer,
                "no address known for this member: cannot check it is gone"
            );
            continue;
        };
        let connect = tokio::net::TcpStream::connect(addr.as_str());
        if let Ok(Ok(_)) = tokio::time::timeout(PEER_PROBE, connect).await {
            bail!(
                "server {peer} answers at {addr}: recover --force-new-cluster is only for a \
                 server whose peers are gone for good. Stop every other server first (or, if \
                 a quorum is still up, remove and re-add servers with `lockctl server`)"
            );
        }
    }
    Ok(())
}

/// Where the new incarnation starts.
struct Start {
    index: u64,
    term: u64,
    old_uid: u64,
    token_floor: u64,
}

/// Turns `state` into the new incarnation's and writes a complete data directory for
/// it beside `dir` (`.<name>.new`); returns it for [`put_in_place`].
fn prepare(
    config: &Config,
    id: u64,
    dir: &Path,
    start: Start,
    members: Vec<u64>,
    addrs: BTreeMap<u64, String>,
    mut state: State,
) -> anyhow::Result<(Incarnation, PathBuf)> {
    let last_token = state
        .begin_incarnation(start.token_floor)
        .map_err(|e| anyhow!("cannot start a new incarnation: {e}"))?;
    let cluster_uid = new_cluster_uid(config, &start, last_token, &addrs);
    let was_logged_in = state
        .sessions()
        .filter(|s| s.state == NodeState::WasLoggedIn)
        .count();
    let new = sibling(dir, "new")?;
    if new.exists() {
        // Left by an interrupted restore or recover; the name is ours.
        std::fs::remove_dir_all(&new).with_context(|| format!("remove {}", new.display()))?;
    }
    std::fs::create_dir_all(&new).with_context(|| format!("create {}", new.display()))?;
    let identity = serde_json::to_vec(&Identity {
        cluster_name: config.cluster.name.clone(),
        cluster_id: config.cluster.id,
        cluster_uid,
        server_id: id,
    })?;
    let (storage, _) = DiskStorage::open_with(
        &new,
        Some(NewLog {
            voters: &members,
            identity: Some(&identity),
        }),
    )?;
    let mut snap = Snapshot::default();
    let meta = snap.mut_metadata();
    meta.index = start.index;
    meta.term = start.term;
    meta.mut_conf_state().voters = members.clone();
    snap.data = encode_snapshot(cluster_uid, &addrs, &state.freeze(), start.index).into();
    storage.apply_snapshot(&snap)?;
    drop(storage);
    let incarnation = Incarnation {
        dir: dir.to_owned(),
        index: start.index,
        term: start.term,
        cluster_uid,
        members,
        last_token,
        was_logged_in,
    };
    Ok((incarnation, new))
}

/// The new incarnation's identity: a digest of the old one, where it starts, its
/// first token and its servers. The same on every server restored from one backup
/// with one config; another for a different backup, floor or server list.
fn new_cluster_uid(
    config: &Config,
    start: &Start,
    last_token: u64,
    addrs: &BTreeMap<u64, String>,
) -> u64 {
    let mut text = format!(
        "lockd-incarnation\0{}\0{}\0{:016x}\0{}\0{}\0{last_token}\0",
        config.cluster.name, config.cluster.id, start.old_uid, start.index, start.term
    );
    for (id, addr) in addrs {
        text.push_str(&format!("{id}={addr}\n"));
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_be_bytes(first).max(1)
}

/// Renames the prepared directory `new` to `dir` and makes the rename durable.
fn put_in_place(new: &Path, dir: &Path) -> anyhow::Result<()> {
    std::fs::rename(new, dir)
        .with_context(|| format!("rename {} to {}", new.display(), dir.display()))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync {}", parent.display()))
}

/// `<parent>/.<name>.<what>`: beside `dir`, on the same file system (renames are
/// atomic), hidden from a listing of data directories.
fn sibling(dir: &Path, what: &str) -> anyhow::Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| anyhow!("{} has no file name", dir.display()))?;
    let parent = dir.parent().unwrap_or(Path::new("."));
    Ok(parent.join(format!(".{}.{what}", name.to_string_lossy())))
}

fn is_non_empty_dir(dir: &Path) -> anyhow::Result<bool> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_some()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(anyhow!("cannot read {}: {e}", dir.display())),
    }
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))
}

fn refused(path: &Path, e: SnapshotError) -> anyhow::Error {
    anyhow!("{} is refused as a snapshot: {e}", path.display())
}
