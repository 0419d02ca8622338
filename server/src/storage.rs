//! Durable Raft storage: this server's log, hard state, conf state and latest snapshot,
//! served to raft-rs through its [`raft::Storage`] trait. The small records and the log
//! live in one redb database (`<dir>/raft.redb`); the snapshot's state-machine bytes
//! live in their own file (`<dir>/snapshot-<index>.bin`), which the database names.
//!
//! Every mutation is written through first — one redb write transaction, hence one
//! fsync — and only after the commit succeeds is it applied to the in-memory copy that
//! answers Raft's reads (the log tail after the compaction point, the hard and conf
//! state, the snapshot's metadata). Memory therefore never shows Raft anything the disk
//! could lose.
//!
//! Taking a snapshot has two halves so that the expensive one need not block the Raft
//! driver: [`SnapshotJob::write`] writes the bytes to a new file (temporary name, fsync,
//! rename, fsync of the directory) on any thread, without touching the database; then
//! [`DiskStorage::record_snapshot`] names that file and moves the compaction point in one
//! short write transaction. A crash anywhere leaves a consistent store: until the
//! transaction commits the database names the previous file, which is only deleted
//! afterwards, and [`DiskStorage::open`] deletes every snapshot file the database does
//! not name.
//!
//! The log is stored as batches: each `persist` writes its entries as one record, keyed
//! by the first entry's index. One key per Raft Ready instead of one per entry: redb's
//! cost per key (B-tree leaf and branch pages rebuilt on every commit) was most of the
//! Raft thread's time under load, and batching the keys doubled W1's throughput.
//!
//! Compaction is incremental: moving the compaction point drops the entries from memory
//! at once, but their on-disk batches are deleted, at most [`COMPACTION_BATCH`] batches
//! at a time, by the following `persist` transactions, which commit (and fsync) anyway,
//! rather than in one long transaction that would stall the driver. A batch is deleted
//! once all its entries are at or below the compaction point; until then, and in a
//! batch that straddles the point, such leftovers are never read: [`DiskStorage::open`]
//! loads only the entries after it.
//!
//! The log is compacted to `keep_entries` before the snapshot point, not to the point
//! itself, so a follower a little behind is sent entries rather than a whole snapshot.
//! Hence two points: the snapshot's (index, term) and the compaction point's; the log
//! holds the entries after the compaction point, and the snapshot point is never below
//! it (restoring the snapshot and replaying the log reaches every entry).
//!
//! Why redb: its commits fsync (we ask for `Durability::Immediate` explicitly), it is
//! crash-safe and stable. sled flushes with `sync_file_range` rather than `fsync` and is
//! beta; a Raft server that loses an acknowledged `HardState` can vote twice in a term,
//! electing two leaders — for a lock manager, two holders of one exclusive lock.
//!
//! This module must not interpret entry payloads or snapshot data (opaque bytes of the
//! lock table), decide when to snapshot (the driver's call), or touch the network.
//! The in-memory tail is bounded by how often the driver snapshots plus `keep_entries`.

use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use redb::{Database, Durability, ReadableTable, TableDefinition, TableHandle, WriteTransaction};
use tracing::{debug, error, info, warn};

/// At most this many batches of compacted entries are deleted from disk by one `persist`.
pub const COMPACTION_BATCH: u64 = 1_000;

/// File name of the database inside a server's directory.
const DB_FILE: &str = "raft.redb";

/// redb's page cache (9/10 read cache, 1/10 write buffer; a transaction larger than the
/// buffer writes pages out early). redb's default, 1 GiB, keeps every page it ever
/// wrote in memory: with a million locks that was hundreds of bytes of RSS per lock
/// (BRIEF §4.1 W4). The log tail is served from memory (`Log`) and snapshots live in
/// their own files, so redb reads only the pages its own writes walk through, which a
/// small cache holds.
const CACHE_SIZE_BYTES: usize = 16 * 1024 * 1024;

/// The log, in batches: the key is the index of a batch's first entry, the value its
/// entries (see [`encode_batch`]); a batch runs up to the next key, the last one to the
/// end of the log. Holds the entries after the compaction point, the same ones as
/// [`Log::entries`], and possibly leftovers at or below it that later persists delete
/// ([`Log::batches`]); those are never read.
const ENTRY_BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("entry_batches");
/// Where stores written before batches kept the log, one protobuf-encoded `Entry` per
/// index; moved into one batch at open.
const LEGACY_ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// Small records: the keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// Where stores written before snapshot files existed kept the snapshot's bytes; read
/// once at open, moved to a file, then emptied.
const LEGACY_SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");
const LEGACY_SNAPSHOT_DATA: &str = "data";

/// Protobuf `HardState`.
const HARD_STATE: &str = "hard_state";
/// Protobuf `ConfState`.
const CONF_STATE: &str = "conf_state";
/// Protobuf `SnapshotMetadata` of the current snapshot; index 0 = none.
const SNAPSHOT_META: &str = "snapshot_meta";
/// UTF-8 name of the current snapshot's file in the server's directory.
const SNAPSHOT_FILE: &str = "snapshot_file";
/// The compaction point: index and term of the last entry dropped from the log, two
/// little-endian u64s. Absent in stores older than it: then it is the snapshot point.
const COMPACTED: &str = "compacted";
const IDENTITY: &str = "identity";

/// Snapshot files: `snapshot-<index>.bin`, first written as `snapshot-<index>.bin.tmp`.
const SNAPSHOT_FILE_PREFIX: &str = "snapshot-";
const SNAPSHOT_FILE_SUFFIX: &str = ".bin";
const TEMP_SUFFIX: &str = ".tmp";
/// A snapshot file starts with this magic, then the index, term and data length (u64
/// little-endian each), then the data; the header lets a read check that the file is the
/// one the database names, whole.
const SNAPSHOT_MAGIC: &[u8; 8] = b"LOCKDSN2";
/// Magic, index, term, data length (u64 LE each), then the CRC-32 (u32 LE) of the
/// first 32 header bytes followed by the data.
const SNAPSHOT_HEADER_BYTES: usize = 36;

/// Where a value lives in the store; named in errors about that value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKey {
    Meta(&'static str),
    /// The batch whose first entry has this index.
    Batch(u64),
    /// An entry of the log as stores written before batches kept it.
    LegacyEntry(u64),
    LegacySnapshotData,
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Meta(name) => write!(f, "meta/{name}"),
            StoreKey::Batch(first) => write!(f, "entry_batches/{first}"),
            StoreKey::LegacyEntry(index) => write!(f, "entries/{index}"),
            StoreKey::LegacySnapshotData => write!(f, "snapshot/{LEGACY_SNAPSHOT_DATA}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open raft log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("raft log: redb failed to {op}: {source}")]
    Redb {
        op: &'static str,
        #[source]
        source: Box<redb::Error>,
    },
    #[error("raft log: {key} is corrupt: {source}")]
    Decode {
        key: StoreKey,
        #[source]
        source: protobuf::ProtobufError,
    },
    #[error("raft log: cannot encode {key}: {source}")]
    Encode {
        key: StoreKey,
        #[source]
        source: protobuf::ProtobufError,
    },
    #[error("raft log: {key} is missing")]
    Missing { key: StoreKey },
    #[error("raft log is corrupt: {0}")]
    Corrupt(String),
    #[error("snapshot file {}: cannot {op}: {source}", path.display())]
    SnapshotIo {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {} is corrupt: {problem}", path.display())]
    SnapshotFileCorrupt { path: PathBuf, problem: String },
    #[error("no Raft log in {}", path.display())]
    NoLog { path: PathBuf },

    // The caller asked for something the log cannot do; a bug in the driver or in Raft.
    #[error("entries to persist are not contiguous: index {next} follows {prev}")]
    NotContiguous { prev: u64, next: u64 },
    #[error("entries from index {first} would leave a gap after the last index {last_index}")]
    WouldLeaveGap { first: u64, last_index: u64 },
    #[error(
        "entries from index {first} would overwrite the compacted log through {compacted_index}"
    )]
    OverwritesCompacted { first: u64, compacted_index: u64 },
    #[error("snapshot at index {index} is not newer than the stored one at {snapshot_index}")]
    SnapshotOutOfDate { index: u64, snapshot_index: u64 },
    #[error("snapshot at index {index} is beyond the committed log (commit {commit}, last index {last_index})")]
    SnapshotBeyondCommit {
        index: u64,
        commit: u64,
        last_index: u64,
    },
    #[error("entries [{low}, {high}) requested: low is above high")]
    InvertedRange { low: u64, high: u64 },
}

/// Turns any redb error into a [`StorageError`] saying which step failed.
trait During<T> {
    fn during(self, op: &'static str) -> Result<T, StorageError>;
}

impl<T, E: Into<redb::Error>> During<T> for Result<T, E> {
    fn during(self, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|e| StorageError::Redb {
            op,
            source: Box::new(e.into()),
        })
    }
}

/// Turns an I/O error on a snapshot file into a [`StorageError`] naming file and step.
trait OnFile<T> {
    fn on_file(self, path: &Path, op: &'static str) -> Result<T, StorageError>;
}

impl<T> OnFile<T> for std::io::Result<T> {
    fn on_file(self, path: &Path, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::SnapshotIo {
            path: path.to_owned(),
            op,
            source,
        })
    }
}

fn encode(key: StoreKey, msg: &impl protobuf::Message) -> Result<Vec<u8>, StorageError> {
    msg.write_to_bytes()
        .map_err(|source| StorageError::Encode { key, source })
}

fn decode<M: protobuf::Message>(key: StoreKey, bytes: &[u8]) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|source| StorageError::Decode { key, source })
}

/// A batch's stored value: each entry protobuf-encoded, after its length (u32, little
/// endian).
fn encode_batch(entries: &[Entry]) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    for entry in entries {
        let bytes = encode(StoreKey::Batch(entries[0].index), entry)?;
        let len = u32::try_from(bytes.len())
            .map_err(|_| StorageError::Corrupt(format!("entry {} is over 4 GiB", entry.index)))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// The entries of the batch stored under `first`, checked to run on from it.
fn decode_batch(first: u64, mut bytes: &[u8]) -> Result<Vec<Entry>, StorageError> {
    let key = StoreKey::Batch(first);
    let mut entries: Vec<Entry> = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| StorageError::Corrupt(format!("{key}: truncated length")))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(StorageError::Corrupt(format!("{key}: truncated entry")));
        }
        let entry: Entry = decode(key, &rest[..len])?;
        let expected = first + entries.len() as u64;
        if entry.index != expected {
            return Err(StorageError::Corrupt(format!(
                "{key}: expected entry {expected}, found entry {}",
                entry.index
            )));
        }
        entries.push(entry);
        bytes = &rest[len..];
    }
    if entries.is_empty() {
        return Err(StorageError::Corrupt(format!("{key}: an empty batch")));
    }
    Ok(entries)
}

/// A log position: an entry's index and term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Point {
    index: u64,
    term: u64,
}

impl Point {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.index.to_le_bytes());
        b[8..].copy_from_slice(&self.term.to_le_bytes());
        b
    }

    fn from_bytes(bytes: &[u8]) -> Result<Point, StorageError> {
        if bytes.len() != 16 {
            return Err(StorageError::Corrupt(format!(
                "meta/{COMPACTED} holds {} bytes, not 16",
                bytes.len()
            )));
        }
        let half = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        Ok(Point {
            index: half(0),
            term: half(8),
        })
    }
}

/// Raft's log storage on disk; cheap to clone, every clone is the same log.
#[derive(Clone)]
pub struct DiskStorage {
    log: Arc<RwLock<Log>>,
    dir: Arc<PathBuf>,
}

/// The in-memory mirror of the database, and the database itself. Between calls, memory
/// equals what is on disk, except the hard state's commit index, which may be ahead
/// (see [`Log::persist`]).
struct Log {
    db: Database,
    dir: Arc<PathBuf>,
    hard_state: HardState,
    /// The commit index in the stored hard state; at or below `hard_state.commit`.
    stored_commit: u64,
    conf_state: ConfState,
    /// The latest snapshot's metadata (ours or the leader's). Index 0 means none.
    snapshot_meta: SnapshotMetadata,
    /// Its file in `dir`; `None` exactly when there is no snapshot. The data is read from
    /// it when asked for, not kept in memory (tens of megabytes at a million locks).
    snapshot_file: Option<String>,
    /// The last entry dropped from the log; at or below the snapshot point.
    compacted: Point,
    /// Every entry after the compaction point, contiguous: `entries[0].index` is
    /// `compacted.index + 1`.
    entries: Vec<Entry>,
    /// The keys of the batches on disk, in order. Leading batches whose entries are all
    /// at or below the compaction point are leftovers, which each `persist` deletes,
    /// `compaction_batch` at a time.
    batches: std::collections::VecDeque<u64>,
    compaction_batch: u64,
}

/// A snapshot whose metadata has been fixed by [`DiskStorage::begin_snapshot`] and whose
/// bytes are still to be written; `Send`, so the writing can happen on any thread.
#[derive(Debug)]
pub struct SnapshotJob {
    dir: Arc<PathBuf>,
    meta: SnapshotMetadata,
}

/// A snapshot file written and fsynced but not yet named by the database: until
/// [`DiskStorage::record_snapshot`] it is garbage that the next open would delete.
#[derive(Debug)]
pub struct WrittenSnapshot {
    meta: SnapshotMetadata,
    file: String,
    bytes: u64,
}

/// What [`DiskStorage::record_snapshot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The snapshot is now the store's; the log starts after `compacted_index`.
    Current { compacted_index: u64 },
    /// A newer snapshot (the leader's) was installed meanwhile; the file was deleted.
    Superseded,
}

impl SnapshotJob {
    pub fn index(&self) -> u64 {
        self.meta.index
    }

    /// Writes `data` to this snapshot's file, durably, under its final name. Touches
    /// neither the database nor the log; the slow half of taking a snapshot.
    pub fn write(self, data: &[u8]) -> Result<WrittenSnapshot, StorageError> {
        let file = write_snapshot_file(&self.dir, &self.meta, data)?;
        Ok(WrittenSnapshot {
            meta: self.meta,
            file,
            bytes: data.len() as u64,
        })
    }
}

impl WrittenSnapshot {
    pub fn index(&self) -> u64 {
        self.meta.index
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl DiskStorage {
    /// Opens (creating if missing) `<dir>/raft.redb`. A fresh store has an empty log; if
    /// `initial_voters` is non-empty and the store is fresh, its ConfState gets those
    /// voters (how the cluster bootstraps: every initial server starts with the same
    /// voter set at index 0). An existing store ignores `initial_voters`. Snapshot files
    /// the database does not name (left by a crash) are deleted.
    pub fn open(dir: &Path, initial_voters: &[u64]) -> Result<Self, StorageError> {
        let new = NewLog {
            voters: initial_voters,
            identity: None,
        };
        Self::open_with(dir, Some(new)).map(|(store, _)| store)
    }

    /// Opens the log in `dir`; a store without one gets `new` (its voters and identity
    /// record, in the same transaction), or, with `None`, is refused with
    /// [`StorageError::NoLog`] and nothing written: a server must not start as a fresh
    /// voter by accident (issue 12: amnesia). Also says whether the log was created.
    pub fn open_with(dir: &Path, new: Option<NewLog<'_>>) -> Result<(Self, bool), StorageError> {
        let path = dir.join(DB_FILE);
        let started = std::time::Instant::now();
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE_BYTES)
            .create(&path)
            .map_err(|e| StorageError::Open {
                path: path.clone(),
                source: Box::new(e.into()),
            })?;
        let dir = Arc::new(dir.to_owned());
        let created = bootstrap_if_fresh(&db, &path, new)?;
        move_legacy_snapshot_to_file(&db, &dir)?;
        move_legacy_entries_to_batch(&db)?;
        let log = Log::load(db, dir.clone())?;
        remove_unnamed_snapshot_files(&dir, log.snapshot_file.as_deref())?;
        info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            path = %path.display(),
            first_index = log.first_index(),
            last_index = log.last_index(),
            snapshot_index = log.snapshot_index(),
            term = log.hard_state.term,
            commit = log.hard_state.commit,
            "raft log opened"
        );
        let store = DiskStorage {
            log: Arc::new(RwLock::new(log)),
            dir,
        };
        Ok((store, created))
    }

    /// Persists, in one write transaction (one fsync), `entries` — replacing every stored
    /// entry at or after `entries[0].index` — and `hard_state` if given; a change of the
    /// commit index alone is not synced on its own (see [`Log::persist`]). Called once
    /// per Raft Ready. Returns whether it wrote a transaction.
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<bool, StorageError> {
        self.write().persist(entries, hard_state)
    }

    /// Records that entries up to `commit` are committed: in memory, written to disk
    /// with the next entries (see [`Log::persist`]).
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut log = self.write();
        if log.hard_state.commit == commit {
            return Ok(());
        }
        let mut hard_state = log.hard_state.clone();
        hard_state.commit = commit;
        log.persist(&[], Some(&hard_state)).map(drop)
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        self.write().set_conf_state(cs)
    }

    /// The identity record of this log (who it belongs to; its meaning is the
    /// driver's), if one was written.
    pub fn identity(&self) -> Result<Option<Vec<u8>>, StorageError> {
        let log = self.read();
        let txn = log.db.begin_read().during("begin a read transaction")?;
        let meta = txn.open_table(META).during("open the meta table")?;
        let value = meta.get(IDENTITY).during("read the identity")?;
        Ok(value.map(|v| v.value().to_vec()))
    }

    /// Writes the identity record (durably, before returning).
    pub fn set_identity(&self, bytes: &[u8]) -> Result<(), StorageError> {
        let log = self.write();
        let txn = begin_write(&log.db)?;
        {
            let mut meta = txn.open_table(META).during("open the meta table")?;
            meta.insert(IDENTITY, bytes).during("write the identity")?;
        }
        txn.commit().during("commit the identity")
    }

    /// Installs a snapshot received from the leader: its data is written to a file, the
    /// whole log is replaced by it, the hard state's commit and term are raised to at
    /// least the snapshot's, and the conf state comes from its metadata. Synchronous: the
    /// state machine cannot go on before it is installed anyway.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StorageError> {
        let meta = snap.get_metadata();
        self.read().check_newer(meta.index)?;
        let file = write_snapshot_file(&self.dir, meta, snap.get_data())?;
        self.write().apply_snapshot(meta, file)
    }

    /// The quick first half of taking our own snapshot of the state machine as applied
    /// through `index` (with `conf_state` as of that index): fixes its metadata. `index`
    /// must be committed and newer than the stored snapshot. The returned job writes the
    /// data; [`DiskStorage::record_snapshot`] then makes it the store's.
    pub fn begin_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
    ) -> Result<SnapshotJob, StorageError> {
        let log = self.read();
        log.check_newer(index)?;
        // Only committed state may be snapshotted: a snapshot is never rolled back.
        if index > log.hard_state.commit || index > log.last_index() {
            return Err(StorageError::SnapshotBeyondCommit {
                index,
                commit: log.hard_state.commit,
                last_index: log.last_index(),
            });
        }
        let term = log
            .term(index)
            .map_err(|e| StorageError::Corrupt(format!("no term for entry {index}: {e}")))?;
        let mut meta = SnapshotMetadata {
            index,
            term,
            ..Default::default()
        };
        meta.set_conf_state(conf_state);
        Ok(SnapshotJob {
            dir: self.dir.clone(),
            meta,
        })
    }

    /// The quick second half: names the written file as the current snapshot and moves the
    /// compaction point to `index - keep_entries`, in one short transaction, then deletes
    /// the previous snapshot's file. The compacted entries leave memory at once and the
    /// disk over the next persists ([`COMPACTION_BATCH`] each). A snapshot overtaken by a newer one (installed from the
    /// leader while this one was written) is dropped instead.
    pub fn record_snapshot(
        &self,
        written: WrittenSnapshot,
        keep_entries: u64,
    ) -> Result<Recorded, StorageError> {
        let mut log = self.write();
        if written.meta.index <= log.snapshot_index() {
            remove_snapshot_file(&self.dir, &written.file);
            return Ok(Recorded::Superseded);
        }
        log.record_snapshot(written, keep_entries)
    }

    /// Takes a snapshot in one go on the calling thread: begin, write, record.
    pub fn create_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: &[u8],
        keep_entries: u64,
    ) -> Result<Recorded, StorageError> {
        let written = self.begin_snapshot(index, conf_state)?.write(data)?;
        self.record_snapshot(written, keep_entries)
    }

    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    /// The stored snapshot (metadata and data, read from its file), if any; the state
    /// machine restores from it at start-up.
    pub fn snapshot_data(&self) -> Result<Option<Snapshot>, StorageError> {
        self.read().read_snapshot()
    }

    pub fn first_index(&self) -> u64 {
        self.read().first_index()
    }

    pub fn last_index(&self) -> u64 {
        self.read().last_index()
    }

    pub fn snapshot_index(&self) -> u64 {
        self.read().snapshot_index()
    }

    /// Test hook: deletes at most `batch` batches of compacted entries per persist.
    #[cfg(test)]
    fn set_compaction_batch(&self, batch: u64) {
        self.write().compaction_batch = batch;
    }

    /// Test hook: the indices of every entry on disk, compacted leftovers included.
    #[cfg(test)]
    fn stored_indices(&self) -> Vec<u64> {
        self.stored_batches().into_iter().flatten().collect()
    }

    /// Test hook: the indices of the entries on disk, batch by batch.
    #[cfg(test)]
    fn stored_batches(&self) -> Vec<Vec<u64>> {
        let log = self.read();
        let txn = log.db.begin_read().unwrap();
        let table = txn.open_table(ENTRY_BATCHES).unwrap();
        let batches = table
            .iter()
            .unwrap()
            .map(|item| {
                let (key, value) = item.unwrap();
                let entries = decode_batch(key.value(), value.value()).unwrap();
                entries.iter().map(|e| e.index).collect()
            })
            .collect();
        batches
    }

    fn read(&self) -> RwLockReadGuard<'_, Log> {
        // Poisoned only if a thread panicked while holding the lock; memory may then
        // disagree with disk, so carrying on would be worse than stopping.
        self.log.read().expect("raft log lock poisoned")
    }

    fn write(&self) -> RwLockWriteGuard<'_, Log> {
        self.log.write().expect("raft log lock poisoned")
    }
}

impl fmt::Debug for DiskStorage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let log = self.read();
        f.debug_struct("DiskStorage")
            .field("first_index", &log.first_index())
            .field("last_index", &log.last_index())
            .field("snapshot_index", &log.snapshot_index())
            .field("hard_state", &log.hard_state)
            .finish_non_exhaustive()
    }
}

/// What a store without a log is created with (see [`DiskStorage::open_with`]).
pub struct NewLog<'a> {
    /// Its configuration: the cluster's servers, or none for a joining server.
    pub voters: &'a [u64],
    /// The identity record (see [`DiskStorage::identity`]), if any.
    pub identity: Option<&'a [u8]>,
}

/// Writes the initial records if the store has none (refusing, with `new` absent);
/// returns whether it did. Freshness is judged by the hard state's presence rather than
/// by the file's, so a crash between creating the file and this commit just leaves a
/// store without a log, as before.
fn bootstrap_if_fresh(
    db: &Database,
    path: &Path,
    new: Option<NewLog<'_>>,
) -> Result<bool, StorageError> {
    let txn = begin_write(db)?;
    let fresh;
    {
        // Opening creates the tables, so later reads never meet a missing table.
        txn.open_table(ENTRY_BATCHES)
            .during("create the entry batches table")?;
        let mut meta = txn.open_table(META).during("create the meta table")?;
        fresh = meta
            .get(HARD_STATE)
            .during("read the hard state")?
            .is_none();
        if fresh {
            let Some(new) = new else {
                return Err(StorageError::NoLog {
                    path: path.to_owned(),
                });
            };
            let conf_state = ConfState {
                voters: new.voters.to_vec(),
                ..Default::default()
            };
            let records = [
                (
                    HARD_STATE,
                    encode(StoreKey::Meta(HARD_STATE), &HardState::default())?,
                ),
                (CONF_STATE, encode(StoreKey::Meta(CONF_STATE), &conf_state)?),
                (
                    SNAPSHOT_META,
                    encode(StoreKey::Meta(SNAPSHOT_META), &SnapshotMetadata::default())?,
                ),
                (COMPACTED, Point::default().to_bytes().to_vec()),
            ];
            for (key, value) in &records {
                meta.insert(*key, value.as_slice())
                    .during("write the initial state")?;
            }
            if let Some(identity) = new.identity {
                meta.insert(IDENTITY, identity)
                    .during("write the identity")?;
            }
            info!(voters = ?new.voters, "new raft log created");
        }
    }
    txn.commit().during("commit the initial state")?;
    Ok(fresh)
}

/// A store written before batches keeps one record per entry in the `entries` table.
/// Moves them all into one batch, keyed by the first, and drops the old table, in one
/// transaction; a crash before it commits leaves the old layout, moved at the next open.
fn move_legacy_entries_to_batch(db: &Database) -> Result<(), StorageError> {
    let txn = begin_write(db)?;
    let legacy = txn
        .list_tables()
        .during("list the tables")?
        .any(|t| t.name() == LEGACY_ENTRIES.name());
    if !legacy {
        return Ok(());
    }
    let mut entries: Vec<Entry> = Vec::new();
    {
        let old = txn
            .open_table(LEGACY_ENTRIES)
            .during("open the old entries table")?;
        for item in old.iter().during("read the old entries")? {
            let (key, value) = item.during("read an old entry")?;
            let key = StoreKey::LegacyEntry(key.value());
            let entry: Entry = decode(key, value.value())?;
            if entries.last().is_some_and(|e| e.index + 1 != entry.index) {
                return Err(StorageError::Corrupt(format!("{key}: the log has a hole")));
            }
            entries.push(entry);
        }
    }
    if let Some(first) = entries.first() {
        let mut batches = txn
            .open_table(ENTRY_BATCHES)
            .during("open the entry batches table")?;
        batches
            .insert(first.index, encode_batch(&entries)?.as_slice())
            .during("write a log batch")?;
    }
    txn.delete_table(LEGACY_ENTRIES)
        .during("drop the old entries table")?;
    txn.commit().during("commit the moved entries")?;
    info!(
        entries = entries.len(),
        "log entries moved into the batch layout"
    );
    Ok(())
}

/// A store written before snapshot files existed keeps its snapshot's bytes in the
/// database and has no compaction point (it was the snapshot point). Moves the bytes to
/// a file and records both in one transaction; a crash before it commits leaves the old
/// layout, tried again at the next open.
fn move_legacy_snapshot_to_file(db: &Database, dir: &Path) -> Result<(), StorageError> {
    let txn = begin_write(db)?;
    {
        let mut meta = txn.open_table(META).during("open the meta table")?;
        if meta
            .get(SNAPSHOT_FILE)
            .during("read the snapshot file name")?
            .is_some()
        {
            return Ok(());
        }
        let snapshot_meta: SnapshotMetadata = match meta
            .get(SNAPSHOT_META)
            .during("read the snapshot metadata")?
        {
            Some(bytes) => decode(StoreKey::Meta(SNAPSHOT_META), bytes.value())?,
            None => {
                return Err(StorageError::Missing {
                    key: StoreKey::Meta(SNAPSHOT_META),
                })
            }
        };
        if snapshot_meta.index == 0 {
            return Ok(());
        }
        let mut legacy = txn
            .open_table(LEGACY_SNAPSHOT)
            .during("open the old snapshot table")?;
        let data = legacy
            .remove(LEGACY_SNAPSHOT_DATA)
            .during("read the old snapshot data")?
            .ok_or(StorageError::Missing {
                key: StoreKey::LegacySnapshotData,
            })?
            .value()
            .to_vec();
        let file = write_snapshot_file(dir, &snapshot_meta, &data)?;
        meta.insert(SNAPSHOT_FILE, file.as_bytes())
            .during("write the snapshot file name")?;
        if meta
            .get(COMPACTED)
            .during("read the compaction point")?
            .is_none()
        {
            let point = Point {
                index: snapshot_meta.index,
                term: snapshot_meta.term,
            };
            meta.insert(COMPACTED, point.to_bytes().as_slice())
                .during("write the compaction point")?;
        }
        info!(
            index = snapshot_meta.index,
            file, "snapshot moved out of the database into its own file"
        );
    }
    txn.commit().during("commit the moved snapshot")
}

fn snapshot_file_name(index: u64) -> String {
    format!("{SNAPSHOT_FILE_PREFIX}{index}{SNAPSHOT_FILE_SUFFIX}")
}

/// Writes `data` with its header to `<dir>/snapshot-<index>.bin` so that the name only
/// ever holds a whole, durable file: write a temporary file, fsync it, rename it, fsync
/// the directory (which makes the rename durable). Returns the file name.
fn write_snapshot_file(
    dir: &Path,
    meta: &SnapshotMetadata,
    data: &[u8],
) -> Result<String, StorageError> {
    let name = snapshot_file_name(meta.index);
    let path = dir.join(&name);
    let temp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    let mut header = [0u8; SNAPSHOT_HEADER_BYTES];
    header[..8].copy_from_slice(SNAPSHOT_MAGIC);
    header[8..16].copy_from_slice(&meta.index.to_le_bytes());
    header[16..24].copy_from_slice(&meta.term.to_le_bytes());
    header[24..32].copy_from_slice(&(data.len() as u64).to_le_bytes());
    let crc = snapshot_crc(&header[..32], data);
    header[32..].copy_from_slice(&crc.to_le_bytes());
    {
        let mut f = File::create(&temp).on_file(&temp, "create")?;
        f.write_all(&header).on_file(&temp, "write")?;
        f.write_all(data).on_file(&temp, "write")?;
        f.sync_all().on_file(&temp, "fsync")?;
    }
    std::fs::rename(&temp, &path).on_file(&path, "rename the temporary file to")?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .on_file(dir, "fsync the directory of")?;
    Ok(name)
}

/// Reads the snapshot file `name` and checks it is the snapshot `meta` describes, whole.
fn read_snapshot_file(
    dir: &Path,
    name: &str,
    meta: &SnapshotMetadata,
) -> Result<Bytes, StorageError> {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .on_file(&path, "read")?;
    let corrupt = |problem: String| StorageError::SnapshotFileCorrupt {
        path: path.clone(),
        problem,
    };
    if bytes.len() < SNAPSHOT_HEADER_BYTES || &bytes[..8] != SNAPSHOT_MAGIC {
        return Err(corrupt("no snapshot header".into()));
    }
    let field = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let (index, term, len) = (field(8), field(16), field(24));
    if (index, term) != (meta.index, meta.term) {
        return Err(corrupt(format!(
            "holds index {index} term {term}, the log names index {} term {}",
            meta.index, meta.term
        )));
    }
    if len != (bytes.len() - SNAPSHOT_HEADER_BYTES) as u64 {
        return Err(corrupt(format!(
            "header says {len} data bytes, the file has {}",
            bytes.len() - SNAPSHOT_HEADER_BYTES
        )));
    }
    let stored = u32::from_le_bytes(bytes[32..36].try_into().expect("4 bytes"));
    let computed = snapshot_crc(&bytes[..32], &bytes[SNAPSHOT_HEADER_BYTES..]);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x}): the file is damaged"
        )));
    }
    // One copy from the file; every `Snapshot` handed out shares it.
    Ok(Bytes::from(bytes).slice(SNAPSHOT_HEADER_BYTES..))
}

/// The CRC-32 that protects a snapshot file: over its header's fields and its data.
fn snapshot_crc(header_fields: &[u8], data: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(header_fields);
    crc.update(data);
    crc.finalize()
}

/// Deletes a snapshot file no longer named by the database. A failure only leaves a
/// stale file behind, which the next open deletes, so it is logged, not returned.
fn remove_snapshot_file(dir: &Path, name: &str) {
    let path = dir.join(name);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), "cannot delete an old snapshot file: {e}");
        }
    }
}

/// Deletes every snapshot file, whole or temporary, other than `current`: left by a
/// crash while one was written or before the previous one was deleted.
fn remove_unnamed_snapshot_files(dir: &Path, current: Option<&str>) -> Result<(), StorageError> {
    for item in std::fs::read_dir(dir).on_file(dir, "list the directory of")? {
        let item = item.on_file(dir, "list the directory of")?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with(SNAPSHOT_FILE_PREFIX)
            && (name.ends_with(SNAPSHOT_FILE_SUFFIX) || name.ends_with(TEMP_SUFFIX));
        if ours && Some(name) != current {
            info!(
                file = name,
                "deleting a snapshot file the log does not name"
            );
            remove_snapshot_file(dir, name);
        }
    }
    Ok(())
}

fn begin_write(db: &Database) -> Result<WriteTransaction, StorageError> {
    let mut txn = db.begin_write().during("begin a write transaction")?;
    // The default, but the whole point of this module: commit returns only after fsync.
    txn.set_durability(Durability::Immediate);
    Ok(txn)
}

/// Deletes the stored batches whose key is in `range`.
fn delete_batches(
    txn: &WriteTransaction,
    range: impl RangeBounds<u64> + 'static,
) -> Result<(), StorageError> {
    let mut table = txn
        .open_table(ENTRY_BATCHES)
        .during("open the entry batches table")?;
    table
        .retain_in(range, |_, _| false)
        .during("delete log entries")
}

/// Names a snapshot (metadata and file) and the compaction point, replacing the previous.
fn put_snapshot(
    txn: &WriteTransaction,
    meta: &SnapshotMetadata,
    file: &str,
    compacted: Point,
) -> Result<(), StorageError> {
    let meta_bytes = encode(StoreKey::Meta(SNAPSHOT_META), meta)?;
    let mut table = txn.open_table(META).during("open the meta table")?;
    table
        .insert(SNAPSHOT_META, meta_bytes.as_slice())
        .during("write the snapshot metadata")?;
    table
        .insert(SNAPSHOT_FILE, file.as_bytes())
        .during("write the snapshot file name")?;
    table
        .insert(COMPACTED, compacted.to_bytes().as_slice())
        .during("write the compaction point")?;
    Ok(())
}

fn put_meta(
    txn: &WriteTransaction,
    name: &'static str,
    msg: &impl protobuf::Message,
) -> Result<(), StorageError> {
    let bytes = encode(StoreKey::Meta(name), msg)?;
    txn.open_table(META)
        .during("open the meta table")?
        .insert(name, bytes.as_slice())
        .during("write a meta record")?;
    Ok(())
}

impl Log {
    fn load(db: Database, dir: Arc<PathBuf>) -> Result<Log, StorageError> {
        let txn = db.begin_read().during("begin a read transaction")?;
        let meta = txn.open_table(META).during("open the meta table")?;
        let read_meta = |name: &'static str| -> Result<Option<Vec<u8>>, StorageError> {
            let guard = meta.get(name).during("read a meta record")?;
            Ok(guard.map(|g| g.value().to_vec()))
        };
        let required = |name: &'static str| -> Result<Vec<u8>, StorageError> {
            read_meta(name)?.ok_or(StorageError::Missing {
                key: StoreKey::Meta(name),
            })
        };
        let hard_state: HardState = decode(StoreKey::Meta(HARD_STATE), &required(HARD_STATE)?)?;
        let conf_state: ConfState = decode(StoreKey::Meta(CONF_STATE), &required(CONF_STATE)?)?;
        let snapshot_meta: SnapshotMetadata =
            decode(StoreKey::Meta(SNAPSHOT_META), &required(SNAPSHOT_META)?)?;
        let snapshot_file = match read_meta(SNAPSHOT_FILE)? {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| {
                StorageError::Corrupt(format!("meta/{SNAPSHOT_FILE} is not UTF-8"))
            })?),
            None => None,
        };
        if snapshot_file.is_some() != (snapshot_meta.index > 0) {
            return Err(StorageError::Corrupt(format!(
                "the snapshot at index {} {} a file",
                snapshot_meta.index,
                if snapshot_file.is_some() {
                    "has"
                } else {
                    "lacks"
                }
            )));
        }
        let compacted = match read_meta(COMPACTED)? {
            Some(bytes) => Point::from_bytes(&bytes)?,
            None => Point::default(),
        };
        if compacted.index > snapshot_meta.index {
            return Err(StorageError::Corrupt(format!(
                "the log is compacted through {} but the snapshot is at {}",
                compacted.index, snapshot_meta.index
            )));
        }

        let first_index = compacted.index + 1;
        let table = txn
            .open_table(ENTRY_BATCHES)
            .during("open the entry batches table")?;
        // Entries at or below the compaction point are leftovers of an incremental
        // compaction, not yet deleted: skipped here, deleted by the next persists. The
        // batch holding the first entry after the point, and every later one, is read;
        // of the batches before it only the keys are needed.
        let start = match table
            .range(..=first_index)
            .during("find the first live batch")?
            .next_back()
        {
            Some(item) => item.during("read a batch key")?.0.value(),
            None => 0,
        };
        let mut batches = std::collections::VecDeque::new();
        for item in table.range(..start).during("read the batch keys")? {
            batches.push_back(item.during("read a batch key")?.0.value());
        }
        let mut entries = Vec::new();
        for item in table.range(start..).during("read the log batches")? {
            let (key, value) = item.during("read a log batch")?;
            batches.push_back(key.value());
            let batch = decode_batch(key.value(), value.value())?;
            entries.extend(batch.into_iter().filter(|e| e.index >= first_index));
        }
        for (expected, entry) in (first_index..).zip(&entries) {
            if entry.index != expected {
                return Err(StorageError::Corrupt(format!(
                    "expected entry {expected}, found entry {}",
                    entry.index
                )));
            }
        }
        drop(table);
        drop(meta);
        drop(txn);

        // The commit index is written lazily (see `Log::persist`), so the stored one may
        // lag a snapshot taken since; the snapshot's index is committed by definition,
        // and raft-rs requires the commit index at or above it.
        let stored_commit = hard_state.commit;
        let mut hard_state = hard_state;
        hard_state.commit = hard_state.commit.max(snapshot_meta.index);
        let log = Log {
            db,
            dir,
            hard_state,
            stored_commit,
            conf_state,
            snapshot_meta,
            snapshot_file,
            compacted,
            entries,
            batches,
            compaction_batch: COMPACTION_BATCH,
        };
        let leftovers = log.garbage_batches(usize::MAX);
        if leftovers > 0 {
            info!(
                batches = leftovers,
                through = compacted.index,
                "compacted log entries left on disk; later writes delete them"
            );
        }
        if log.hard_state.commit > log.last_index() {
            // raft-rs would panic on this at start-up; say what is wrong instead.
            return Err(StorageError::Corrupt(format!(
                "hard state commits index {} but the log ends at {}",
                log.hard_state.commit,
                log.last_index()
            )));
        }
        if log.snapshot_index() > log.last_index() {
            return Err(StorageError::Corrupt(format!(
                "the snapshot at index {} is beyond the log's end at {}",
                log.snapshot_index(),
                log.last_index()
            )));
        }
        if log.snapshot_index() > 0 {
            let term = log.term(log.snapshot_index()).map_err(|e| {
                StorageError::Corrupt(format!("no term for the snapshot point: {e}"))
            })?;
            if term != log.snapshot_meta.term {
                return Err(StorageError::Corrupt(format!(
                    "the snapshot at index {} has term {}, the log says {term}",
                    log.snapshot_index(),
                    log.snapshot_meta.term
                )));
            }
        }
        log.check_invariants();
        Ok(log)
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot_meta.index
    }

    fn first_index(&self) -> u64 {
        self.compacted.index + 1
    }

    fn last_index(&self) -> u64 {
        self.compacted.index + self.entries.len() as u64
    }

    /// The in-memory entry at `index`, which must be in `[first_index, last_index]`.
    fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index - self.first_index()) as usize]
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.compacted.index {
            return Ok(self.compacted.term);
        }
        if index < self.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if index > self.last_index() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.entry(index).term)
    }

    fn check_newer(&self, index: u64) -> Result<(), StorageError> {
        if index <= self.snapshot_index() {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                snapshot_index: self.snapshot_index(),
            });
        }
        Ok(())
    }

    fn read_snapshot(&self) -> Result<Option<Snapshot>, StorageError> {
        let Some(file) = &self.snapshot_file else {
            return Ok(None);
        };
        let data = read_snapshot_file(&self.dir, file, &self.snapshot_meta)?;
        let mut snap = Snapshot::default();
        snap.set_metadata(self.snapshot_meta.clone());
        snap.set_data(data);
        Ok(Some(snap))
    }

    /// O(1) checks that the entries sit right after the compaction point, which is not
    /// above the snapshot point; together with `persist` refusing non-contiguous batches
    /// they make the whole tail contiguous.
    fn check_invariants(&self) {
        assert!(
            self.compacted.index <= self.snapshot_index(),
            "log compacted beyond the snapshot"
        );
        if let (Some(first), Some(last)) = (self.entries.first(), self.entries.last()) {
            assert_eq!(
                first.index,
                self.first_index(),
                "log does not start after the compaction point"
            );
            assert_eq!(last.index, self.last_index(), "log has a hole");
        }
    }

    /// Writes `entries` and `hard_state` in one transaction (one fsync) — unless all
    /// that changed is the commit index. That is volatile state in Raft (a restarted
    /// server learns it again from the leader, and what it applies at start-up stops
    /// short of it); etcd likewise syncs only when entries, term or vote change. So a
    /// commit-only change is kept in memory and written with the next transaction,
    /// which halves the fsyncs per entry: every entry's commit would otherwise cost
    /// one more on each server.
    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<bool, StorageError> {
        let term_or_vote_changed = hard_state
            .is_some_and(|hs| hs.term != self.hard_state.term || hs.vote != self.hard_state.vote);
        if entries.is_empty() && !term_or_vote_changed {
            if let Some(hs) = hard_state {
                self.hard_state.commit = hs.commit;
            }
            return Ok(false);
        }
        let hard_state = hard_state.unwrap_or(&self.hard_state).clone();
        if let Some(first) = entries.first() {
            self.check_append(entries, first.index)?;
        }
        let txn = begin_write(&self.db)?;
        // Piggy-backs a bounded share of the compaction on this commit.
        let garbage = self.garbage_batches(self.compaction_batch as usize);
        if garbage > 0 {
            match self.batches.get(garbage) {
                Some(&end) => delete_batches(&txn, ..end)?,
                None => delete_batches(&txn, ..)?,
            }
        }
        if let Some(first) = entries.first() {
            let first = first.index;
            let mut table = txn
                .open_table(ENTRY_BATCHES)
                .during("open the entry batches table")?;
            if first <= self.last_index() {
                // A new leader overwrites our uncommitted tail: drop the batches from
                // `first` on, and cut the one it starts inside.
                table
                    .retain_in(first.., |_, _| false)
                    .during("delete log entries")?;
                let before = self.batches.partition_point(|&k| k < first);
                let cut = before
                    .checked_sub(1)
                    .map(|i| self.batches[i])
                    // Unless a batch starts right at `first`, the one before runs on
                    // past it.
                    .filter(|_| self.batches.get(before) != Some(&first));
                if let Some(key) = cut {
                    let stored = table.get(key).during("read a log batch")?.ok_or(
                        StorageError::Missing {
                            key: StoreKey::Batch(key),
                        },
                    )?;
                    let mut kept = decode_batch(key, stored.value())?;
                    drop(stored);
                    let before = kept.len();
                    kept.retain(|e| e.index < first);
                    if kept.len() < before {
                        table
                            .insert(key, encode_batch(&kept)?.as_slice())
                            .during("write a log batch")?;
                    }
                }
            }
            table
                .insert(first, encode_batch(entries)?.as_slice())
                .during("write a log batch")?;
        }
        let write_hard_state =
            hard_state != self.hard_state || self.stored_commit != hard_state.commit;
        if write_hard_state {
            put_meta(&txn, HARD_STATE, &hard_state)?;
        }
        txn.commit().during("commit entries and hard state")?;
        if write_hard_state {
            self.stored_commit = hard_state.commit;
        }

        self.batches.drain(..garbage);
        if let Some(first) = entries.first() {
            self.batches.retain(|&k| k < first.index);
            self.batches.push_back(first.index);
            let keep = (first.index - self.first_index()) as usize;
            self.entries.truncate(keep);
            // Clones share the payload bytes.
            self.entries.extend_from_slice(entries);
        }
        self.hard_state = hard_state;
        self.check_invariants();
        Ok(true)
    }

    /// How many of the leading batches on disk (at most `limit`) hold only entries at
    /// or below the compaction point: leftovers to delete.
    fn garbage_batches(&self, limit: usize) -> usize {
        let last = self.last_index();
        let mut ends = self
            .batches
            .iter()
            .skip(1)
            .map(|next| next - 1)
            .chain(std::iter::once(last));
        let mut n = 0;
        while n < limit && ends.next().is_some_and(|end| end <= self.compacted.index) {
            n += 1;
        }
        n.min(self.batches.len())
    }

    /// Refuses a batch that would corrupt the log; Raft never sends one.
    fn check_append(&self, entries: &[Entry], first: u64) -> Result<(), StorageError> {
        if first < self.first_index() {
            return Err(StorageError::OverwritesCompacted {
                first,
                compacted_index: self.compacted.index,
            });
        }
        if first > self.last_index() + 1 {
            return Err(StorageError::WouldLeaveGap {
                first,
                last_index: self.last_index(),
            });
        }
        for pair in entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(StorageError::NotContiguous {
                    prev: pair[0].index,
                    next: pair[1].index,
                });
            }
        }
        Ok(())
    }

    fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StorageError> {
        let txn = begin_write(&self.db)?;
        put_meta(&txn, CONF_STATE, cs)?;
        txn.commit().during("commit the conf state")?;
        self.conf_state = cs.clone();
        Ok(())
    }

    /// Makes the received snapshot, already written to `file`, the store's.
    fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        file: String,
    ) -> Result<(), StorageError> {
        if let Err(e) = self.check_newer(meta.index) {
            remove_snapshot_file(&self.dir, &file);
            return Err(e);
        }
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        let conf_state = meta.get_conf_state().clone();
        let point = Point {
            index: meta.index,
            term: meta.term,
        };

        let txn = begin_write(&self.db)?;
        delete_batches(&txn, ..)?;
        put_snapshot(&txn, meta, &file, point)?;
        put_meta(&txn, HARD_STATE, &hard_state)?;
        put_meta(&txn, CONF_STATE, &conf_state)?;
        txn.commit().during("commit the received snapshot")?;
        self.stored_commit = hard_state.commit;

        let old = self.snapshot_file.replace(file);
        self.entries.clear();
        self.batches.clear();
        self.snapshot_meta = meta.clone();
        self.compacted = point;
        self.hard_state = hard_state;
        self.conf_state = conf_state;
        self.check_invariants();
        if let Some(old) = old.filter(|old| Some(old) != self.snapshot_file.as_ref()) {
            remove_snapshot_file(&self.dir, &old);
        }
        Ok(())
    }

    fn record_snapshot(
        &mut self,
        written: WrittenSnapshot,
        keep_entries: u64,
    ) -> Result<Recorded, StorageError> {
        let WrittenSnapshot { meta, file, .. } = written;
        // begin_snapshot checked the index against a log that can since only have grown
        // (committed entries are never truncated) or been replaced by a newer snapshot,
        // which the caller checked for.
        let target = meta.index.saturating_sub(keep_entries);
        let compacted = if target > self.compacted.index {
            let term = self.entry(target).term;
            Point {
                index: target,
                term,
            }
        } else {
            self.compacted
        };

        // Only the compaction point moves here; the entries it drops stay on disk until
        // the next persists delete them, a bounded batch each (see `garbage_until`).
        let txn = begin_write(&self.db)?;
        put_snapshot(&txn, &meta, &file, compacted)?;
        txn.commit()
            .during("commit the snapshot and compaction point")?;

        let dropped = (compacted.index - self.compacted.index) as usize;
        self.entries.drain(..dropped);
        self.compacted = compacted;
        self.snapshot_meta = meta;
        let old = self.snapshot_file.replace(file);
        self.check_invariants();
        if let Some(old) = old.filter(|old| Some(old) != self.snapshot_file.as_ref()) {
            remove_snapshot_file(&self.dir, &old);
        }
        Ok(Recorded::Current {
            compacted_index: compacted.index,
        })
    }
}

/// Whether server `id` is in `cs` in any role.
fn names(cs: &ConfState, id: u64) -> bool {
    [
        &cs.voters,
        &cs.learners,
        &cs.voters_outgoing,
        &cs.learners_next,
    ]
    .iter()
    .any(|ids| ids.contains(&id))
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let log = self.read();
        Ok(RaftState::new(
            log.hard_state.clone(),
            log.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let log = self.read();
        if low < log.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        // MemStorage panics here; an error lets the caller decide.
        if high > log.last_index() + 1 {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        if low > high {
            let err = StorageError::InvertedRange { low, high };
            return Err(raft::Error::Store(raft::StorageError::Other(Box::new(err))));
        }
        let first = log.first_index();
        // Cloning an entry only bumps the reference counts of its payload.
        let mut entries = log.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.read().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    /// The current snapshot, read from its file. "Temporarily unavailable" (raft-rs
    /// retries later) when there is none new enough, when it does not name the receiver
    /// `to` (raft-rs would refuse to install it: a learner just added waits for the
    /// snapshot taken after its addition, being written), or when its file cannot be
    /// read (logged; raft-rs would panic on any other error).
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let unavailable = || {
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ))
        };
        let log = self.read();
        let index = log.snapshot_index();
        if index == 0 || index < request_index {
            return unavailable();
        }
        if !names(log.snapshot_meta.get_conf_state(), to) {
            debug!(
                to,
                index, "the snapshot's configuration does not name the receiver yet"
            );
            return unavailable();
        }
        match log.read_snapshot() {
            Ok(Some(snap)) => Ok(snap),
            Ok(None) => unavailable(),
            Err(e) => {
                error!(to, "cannot send a snapshot: {e}");
                unavailable()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message as _;
    use raft::prelude::EntryType;
    use raft::{RawNode, Storage};
    use tempfile::TempDir;

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: Bytes::from(format!("cmd-{index}-{term}")),
            ..Default::default()
        }
    }

    fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        range.map(|i| entry(i, term)).collect()
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    fn voters(ids: &[u64]) -> ConfState {
        ConfState {
            voters: ids.to_vec(),
            ..Default::default()
        }
    }

    fn all_entries(store: &DiskStorage) -> Vec<Entry> {
        store
            .entries(
                store.first_index(),
                store.last_index() + 1,
                None,
                GetEntriesContext::empty(false),
            )
            .expect("whole log readable")
    }

    fn store_error(result: raft::Result<impl fmt::Debug>) -> raft::StorageError {
        match result {
            Err(raft::Error::Store(e)) => e,
            other => panic!("expected a storage error, got {other:?}"),
        }
    }

    #[test]
    fn entries_hard_state_and_conf_state_survive_reopen() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
            store
                .persist(&entries(1..=5, 1), Some(&hard_state(1, 2, 0)))
                .unwrap();
            store.set_commit(4).unwrap();
            // The commit index is written with the next entries.
            store.persist(&entries(6..=6, 1), None).unwrap();
            store.set_conf_state(&voters(&[1, 2, 3, 4])).unwrap();
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(all_entries(&store), entries(1..=6, 1));
        assert_eq!(store.hard_state(), hard_state(1, 2, 4));
        assert_eq!(store.conf_state(), voters(&[1, 2, 3, 4]));
        let state = store.initial_state().unwrap();
        assert_eq!(state.hard_state, hard_state(1, 2, 4));
        assert_eq!(state.conf_state, voters(&[1, 2, 3, 4]));
    }

    #[test]
    fn a_commit_only_change_is_not_synced_until_the_next_write_and_a_snapshot_bounds_it() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
            store
                .persist(&entries(1..=5, 1), Some(&hard_state(1, 2, 0)))
                .unwrap();
            store.set_commit(3).unwrap();
            store.persist(&[], Some(&hard_state(1, 2, 4))).unwrap();
            assert_eq!(store.hard_state(), hard_state(1, 2, 4), "memory has it");
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.hard_state(), hard_state(1, 2, 0), "the disk does not");

        // A vote is written at once, with the commit index memory had.
        store.set_commit(4).unwrap();
        store.persist(&[], Some(&hard_state(2, 3, 4))).unwrap();
        let store = {
            drop(store);
            DiskStorage::open(dir.path(), &[]).unwrap()
        };
        assert_eq!(store.hard_state(), hard_state(2, 3, 4));

        // A snapshot beyond the stored commit index raises it at start-up, as raft-rs
        // requires (the snapshot's entries are committed).
        store.set_commit(5).unwrap();
        store
            .create_snapshot(5, voters(&[1, 2, 3]), b"at 5", 0)
            .unwrap();
        let store = {
            drop(store);
            DiskStorage::open(dir.path(), &[]).unwrap()
        };
        assert_eq!(store.hard_state(), hard_state(2, 3, 5));
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let config = raft::Config {
            id: 1,
            ..Default::default()
        };
        let node = RawNode::new(&config, store, &logger).unwrap();
        assert_eq!(node.raft.raft_log.committed, 5);
    }

    #[test]
    fn persist_overlapping_the_tail_truncates_the_conflicting_suffix_on_disk() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            store.persist(&entries(1..=6, 1), None).unwrap();
            // A new leader in term 2 overwrites from index 4 with a shorter tail: the
            // batch holding 1..=6 is cut at 4.
            store.persist(&entries(4..=4, 2), None).unwrap();
            assert_eq!(store.last_index(), 4);
            assert_eq!(store.term(4).unwrap(), 2);
            assert_eq!(store_error(store.term(5)), raft::StorageError::Unavailable);
            assert_eq!(store.stored_batches(), vec![vec![1, 2, 3], vec![4]]);
            // Overwriting from a batch's first entry drops the whole batch, and the
            // batch before it stays as it is.
            store.persist(&entries(4..=5, 3), None).unwrap();
            assert_eq!(store.stored_batches(), vec![vec![1, 2, 3], vec![4, 5]]);
        }
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        let mut expected = entries(1..=3, 1);
        expected.extend(entries(4..=5, 3));
        assert_eq!(all_entries(&store), expected);
        assert_eq!(store.last_index(), 5);
    }

    #[test]
    fn a_batch_is_deleted_only_when_all_its_entries_are_compacted() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            store.persist(&entries(1..=10, 1), None).unwrap();
            store
                .persist(&entries(11..=20, 1), Some(&hard_state(1, 1, 20)))
                .unwrap();
            store
                .create_snapshot(15, voters(&[1]), b"at 15", 0)
                .unwrap();
            assert_eq!(store.first_index(), 16);
            next_term(&store);
            // 1..=10 are all compacted; 11..=20 straddles the point and stays whole.
            assert_eq!(store.stored_batches(), vec![(11..=20).collect::<Vec<_>>()]);
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.first_index(), 16);
        assert_eq!(all_entries(&store), entries(16..=20, 1));
        store
            .create_snapshot(20, voters(&[1]), b"at 20", 0)
            .unwrap();
        next_term(&store);
        assert_eq!(store.stored_batches(), Vec::<Vec<u64>>::new());
        assert_eq!(store.first_index(), 21);
    }

    #[test]
    fn create_snapshot_compacts_the_log_and_survives_reopen() {
        let dir = TempDir::new().unwrap();
        let data = b"lock table at 6".to_vec();
        {
            let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
            let mut log = entries(1..=4, 1);
            log.extend(entries(5..=10, 2));
            store.persist(&log, Some(&hard_state(2, 1, 8))).unwrap();
            store
                .create_snapshot(6, voters(&[1, 2, 3]), &data, 0)
                .unwrap();
            assert_eq!(store.first_index(), 7);
        }
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(store.first_index(), 7);
        assert_eq!(store.last_index(), 10);
        assert_eq!(all_entries(&store), entries(7..=10, 2));
        assert_eq!(
            store_error(store.entries(6, 8, None, GetEntriesContext::empty(false))),
            raft::StorageError::Compacted
        );
        assert_eq!(store_error(store.term(5)), raft::StorageError::Compacted);
        assert_eq!(
            store.term(6).unwrap(),
            2,
            "the snapshot point keeps its term"
        );

        let snap = store.snapshot(6, 2).unwrap();
        assert_eq!(snap.get_metadata().index, 6);
        assert_eq!(snap.get_metadata().term, 2);
        assert_eq!(snap.get_metadata().get_conf_state(), &voters(&[1, 2, 3]));
        assert_eq!(snap.get_data(), data.as_slice());
        assert_eq!(store.snapshot_data().unwrap(), Some(snap));
        assert_eq!(
            store.hard_state(),
            hard_state(2, 1, 8),
            "compaction leaves the hard state alone"
        );
    }

    #[test]
    fn apply_snapshot_replaces_the_log_and_survives_reopen() {
        let dir = TempDir::new().unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 20;
        snap.mut_metadata().term = 3;
        snap.mut_metadata().set_conf_state(voters(&[1, 2, 3, 4]));
        snap.set_data(Bytes::from_static(b"leader's lock table"));
        {
            let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
            store
                .persist(&entries(1..=5, 1), Some(&hard_state(2, 3, 3)))
                .unwrap();
            store.apply_snapshot(&snap).unwrap();
            assert_eq!(store.first_index(), 21);
            assert_eq!(store.last_index(), 20);
        }
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(store.first_index(), 21);
        assert_eq!(store.last_index(), 20);
        assert!(all_entries(&store).is_empty());
        assert_eq!(store.term(20).unwrap(), 3);
        assert_eq!(
            store.hard_state(),
            hard_state(3, 3, 20),
            "term and commit rise to the snapshot's; the vote is kept"
        );
        assert_eq!(store.conf_state(), voters(&[1, 2, 3, 4]));
        assert_eq!(store.snapshot_data().unwrap(), Some(snap.clone()));
        assert_eq!(store.snapshot(20, 1).unwrap(), snap);

        // The log continues right after the snapshot.
        store.persist(&entries(21..=22, 3), None).unwrap();
        assert_eq!(all_entries(&store), entries(21..=22, 3));
    }

    #[test]
    fn entries_respect_max_size_but_return_at_least_one() {
        let dir = TempDir::new().unwrap();
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        store.persist(&entries(1..=10, 1), None).unwrap();
        let one = u64::from(entry(1, 1).compute_size());
        let read = |max: u64| {
            store
                .entries(1, 11, max, GetEntriesContext::empty(false))
                .unwrap()
        };
        assert_eq!(read(0), entries(1..=1, 1));
        assert_eq!(read(one), entries(1..=1, 1));
        assert_eq!(read(3 * one), entries(1..=3, 1));
        assert_eq!(read(u64::MAX), entries(1..=10, 1));
        assert_eq!(
            store
                .entries(4, 4, None, GetEntriesContext::empty(false))
                .unwrap(),
            vec![]
        );
    }

    #[test]
    fn out_of_range_requests_return_errors_instead_of_panicking() {
        let dir = TempDir::new().unwrap();
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        store
            .persist(&entries(1..=10, 1), Some(&hard_state(1, 1, 8)))
            .unwrap();
        store.create_snapshot(4, voters(&[1]), &[4], 0).unwrap();
        let ctx = || GetEntriesContext::empty(false);

        assert_eq!(
            store_error(store.entries(5, 12, None, ctx())),
            raft::StorageError::Unavailable
        );
        assert_eq!(
            store_error(store.entries(3, 6, None, ctx())),
            raft::StorageError::Compacted
        );
        assert!(matches!(
            store_error(store.entries(8, 6, None, ctx())),
            raft::StorageError::Other(_)
        ));
        assert_eq!(store_error(store.term(11)), raft::StorageError::Unavailable);
        assert_eq!(store_error(store.term(3)), raft::StorageError::Compacted);
        assert_eq!(
            store_error(store.snapshot(5, 2)),
            raft::StorageError::SnapshotTemporarilyUnavailable
        );

        assert!(matches!(
            store.persist(&entries(12..=13, 1), None),
            Err(StorageError::WouldLeaveGap {
                first: 12,
                last_index: 10
            })
        ));
        assert!(matches!(
            store.persist(&entries(3..=5, 2), None),
            Err(StorageError::OverwritesCompacted {
                first: 3,
                compacted_index: 4
            })
        ));
        assert!(matches!(
            store.persist(&[entry(11, 1), entry(13, 1)], None),
            Err(StorageError::NotContiguous { prev: 11, next: 13 })
        ));
        assert!(matches!(
            store.create_snapshot(9, voters(&[1]), &[], 0),
            Err(StorageError::SnapshotBeyondCommit {
                index: 9,
                commit: 8,
                ..
            })
        ));
        assert!(matches!(
            store.create_snapshot(4, voters(&[1]), &[], 0),
            Err(StorageError::SnapshotOutOfDate {
                index: 4,
                snapshot_index: 4
            })
        ));
        // Nothing above changed the log.
        assert_eq!(all_entries(&store), entries(5..=10, 1));
    }

    #[test]
    fn fresh_store_without_a_snapshot_reports_none() {
        let dir = TempDir::new().unwrap();
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        assert_eq!(store.first_index(), 1);
        assert_eq!(store.last_index(), 0);
        assert_eq!(store.term(0).unwrap(), 0);
        assert_eq!(store.snapshot_data().unwrap(), None);
        assert_eq!(
            store_error(store.snapshot(0, 2)),
            raft::StorageError::SnapshotTemporarilyUnavailable
        );
    }

    #[test]
    fn fresh_store_bootstraps_with_the_initial_voters() {
        let dir = TempDir::new().unwrap();
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        assert_eq!(store.conf_state(), voters(&[1, 2, 3]));
        assert_eq!(store.hard_state(), HardState::default());
        assert!(store.initial_state().unwrap().initialized());
    }

    #[test]
    fn reopening_an_existing_store_ignores_initial_voters() {
        let dir = TempDir::new().unwrap();
        drop(DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap());
        let store = DiskStorage::open(dir.path(), &[7, 8]).unwrap();
        assert_eq!(store.conf_state(), voters(&[1, 2, 3]));

        // A store first opened with no voters (a joining server) stays uninitialized.
        let joiner = TempDir::new().unwrap();
        drop(DiskStorage::open(joiner.path(), &[]).unwrap());
        let store = DiskStorage::open(joiner.path(), &[1, 2, 3]).unwrap();
        assert_eq!(store.conf_state(), ConfState::default());
    }

    #[test]
    fn a_corrupt_record_is_an_error_naming_its_key() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            store.persist(&entries(1..=3, 1), None).unwrap();
            store.persist(&entries(4..=6, 1), None).unwrap();
        }
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ENTRY_BATCHES)
                .unwrap()
                .insert(4, [3_u8, 0, 0, 0, 0xff, 0xff, 0xff].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Decode {
                    key: StoreKey::Batch(4),
                    ..
                }
            ),
            "got {err:?}"
        );
        assert!(err.to_string().contains("entry_batches/4"), "{err}");
    }

    #[test]
    fn a_missing_entry_is_reported_as_corruption() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            for first in [1, 4, 7] {
                store.persist(&entries(first..=first + 2, 1), None).unwrap();
            }
        }
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ENTRY_BATCHES).unwrap().remove(4).unwrap();
            txn.commit().unwrap();
        }
        let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "got {err:?}");
    }

    #[test]
    fn a_store_with_one_record_per_entry_is_moved_into_a_batch() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            store.persist(&[], Some(&hard_state(1, 1, 0))).unwrap();
        }
        {
            // The layout before batches: one record per entry.
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut old = txn.open_table(LEGACY_ENTRIES).unwrap();
                for entry in entries(1..=5, 1) {
                    let bytes = entry.write_to_bytes().unwrap();
                    old.insert(entry.index, bytes.as_slice()).unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(all_entries(&store), entries(1..=5, 1));
        assert_eq!(store.stored_batches(), vec![vec![1, 2, 3, 4, 5]]);
        store.persist(&entries(6..=6, 1), None).unwrap();
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(all_entries(&store), entries(1..=6, 1));
        let txn = store.read().db.begin_read().unwrap();
        assert!(
            !txn.list_tables()
                .unwrap()
                .any(|t| t.name() == LEGACY_ENTRIES.name()),
            "the old table is gone"
        );
    }

    fn snapshot_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(SNAPSHOT_FILE_PREFIX))
            .collect();
        names.sort();
        names
    }

    /// A store with entries 1..=20 (term 1 up to 10, term 2 after), 18 committed.
    /// A durable write without entries (the next term, as after an election), on which
    /// a batch of compacted leftovers is deleted.
    fn next_term(store: &DiskStorage) {
        let mut hs = store.hard_state();
        hs.term += 1;
        store.persist(&[], Some(&hs)).unwrap();
    }

    /// Written one entry per persist, so one batch per entry on disk.
    fn store_with_twenty_entries(dir: &Path) -> DiskStorage {
        let store = DiskStorage::open(dir, &[1, 2, 3]).unwrap();
        let mut log = entries(1..=10, 1);
        log.extend(entries(11..=20, 2));
        for entry in &log {
            store.persist(std::slice::from_ref(entry), None).unwrap();
        }
        store.persist(&[], Some(&hard_state(2, 1, 18))).unwrap();
        store
    }

    #[test]
    fn compaction_keeps_a_tail_of_entries_before_the_snapshot() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            let recorded = store
                .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
                .unwrap();
            assert_eq!(
                recorded,
                Recorded::Current {
                    compacted_index: 10
                }
            );
            assert_eq!(store.first_index(), 11);
            assert_eq!(store.snapshot_index(), 15);
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.first_index(), 11);
        assert_eq!(all_entries(&store), entries(11..=20, 2));
        assert_eq!(
            store.term(10).unwrap(),
            1,
            "the compaction point keeps its term"
        );
        assert_eq!(store_error(store.term(9)), raft::StorageError::Compacted);
        assert_eq!(store.term(15).unwrap(), 2);
        let snap = store.snapshot(0, 1).unwrap();
        assert_eq!(snap.get_metadata().index, 15);
        assert_eq!(snap.get_metadata().term, 2);
        assert_eq!(snap.get_data(), b"at 15");

        // The next snapshot moves the compaction point on and replaces the file.
        store
            .create_snapshot(18, voters(&[1, 2, 3]), b"at 18", 5)
            .unwrap();
        assert_eq!(store.first_index(), 14);
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-18.bin"]);
        // A tail longer than the log compacts nothing.
        let small = TempDir::new().unwrap();
        let store = store_with_twenty_entries(small.path());
        assert_eq!(
            store.create_snapshot(3, voters(&[1]), b"", 5).unwrap(),
            Recorded::Current { compacted_index: 0 }
        );
        assert_eq!(store.first_index(), 1);
        assert_eq!(store.term(0).unwrap(), 0);
    }

    #[test]
    fn a_snapshot_written_on_another_thread_is_recorded_after_the_log_grew() {
        let dir = TempDir::new().unwrap();
        let store = store_with_twenty_entries(dir.path());
        let job = store.begin_snapshot(12, voters(&[1, 2, 3])).unwrap();
        let writer = std::thread::spawn(move || job.write(b"at 12"));
        // The driver goes on while the file is written.
        store
            .persist(&entries(21..=25, 2), Some(&hard_state(2, 1, 24)))
            .unwrap();
        let written = writer.join().unwrap().unwrap();
        assert_eq!(written.index(), 12);
        assert_eq!(
            store.record_snapshot(written, 2).unwrap(),
            Recorded::Current {
                compacted_index: 10
            }
        );
        assert_eq!(store.last_index(), 25);
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.first_index(), 11);
        assert_eq!(store.last_index(), 25);
        let snap = store.snapshot_data().unwrap().unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_data()),
            (12, &b"at 12"[..])
        );
    }

    #[test]
    fn a_snapshot_overtaken_by_the_leaders_is_dropped_with_its_file() {
        let dir = TempDir::new().unwrap();
        let store = store_with_twenty_entries(dir.path());
        let written = store
            .begin_snapshot(12, voters(&[1, 2, 3]))
            .unwrap()
            .write(b"ours at 12")
            .unwrap();
        let mut leaders = Snapshot::default();
        leaders.mut_metadata().index = 30;
        leaders.mut_metadata().term = 3;
        leaders.mut_metadata().set_conf_state(voters(&[1, 2, 3]));
        leaders.set_data(Bytes::from_static(b"leader's at 30"));
        store.apply_snapshot(&leaders).unwrap();
        assert_eq!(
            store.record_snapshot(written, 0).unwrap(),
            Recorded::Superseded
        );
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-30.bin"]);
        assert_eq!(store.snapshot_data().unwrap(), Some(leaders));
        assert_eq!(store.first_index(), 31);
    }

    #[test]
    fn crash_after_writing_a_snapshot_file_before_recording_it_keeps_the_old_snapshot() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(5, voters(&[1, 2, 3]), b"at 5", 0)
                .unwrap();
            // The writer finished; the process died before the driver recorded it.
            store
                .begin_snapshot(15, voters(&[1, 2, 3]))
                .unwrap()
                .write(b"at 15")
                .unwrap();
            assert_eq!(
                snapshot_files(dir.path()),
                vec!["snapshot-15.bin", "snapshot-5.bin"]
            );
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-5.bin"]);
        let snap = store.snapshot_data().unwrap().unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_data()),
            (5, &b"at 5"[..])
        );
        assert_eq!(
            all_entries(&store).len(),
            15,
            "entries 6..=20 are still there"
        );
        // Taking that snapshot again works.
        store
            .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 0)
            .unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-15.bin"]);
    }

    #[test]
    fn crash_while_writing_a_snapshot_file_leaves_a_temporary_file_that_open_deletes() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(5, voters(&[1, 2, 3]), b"at 5", 0)
                .unwrap();
        }
        std::fs::write(dir.path().join("snapshot-15.bin.tmp"), b"LOCKDSN2 half").unwrap();
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-5.bin"]);
        assert_eq!(store.snapshot_index(), 5);
        assert!(store.snapshot_data().unwrap().is_some());
    }

    #[test]
    fn crash_after_recording_a_snapshot_before_deleting_the_old_file_is_cleaned_up() {
        let dir = TempDir::new().unwrap();
        let old_bytes;
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(5, voters(&[1, 2, 3]), b"at 5", 0)
                .unwrap();
            old_bytes = std::fs::read(dir.path().join("snapshot-5.bin")).unwrap();
            store
                .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 0)
                .unwrap();
        }
        // As if the process died between the commit and the deletion.
        std::fs::write(dir.path().join("snapshot-5.bin"), old_bytes).unwrap();
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-15.bin"]);
        let snap = store.snapshot_data().unwrap().unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_data()),
            (15, &b"at 15"[..])
        );
    }

    #[test]
    fn a_damaged_snapshot_file_is_an_error_naming_the_file() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(5, voters(&[1, 2, 3]), b"at 5", 0)
                .unwrap();
        }
        let path = dir.path().join("snapshot-5.bin");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        let err = store.snapshot_data().unwrap_err();
        assert!(
            matches!(err, StorageError::SnapshotFileCorrupt { .. }),
            "got {err:?}"
        );
        assert!(err.to_string().contains("snapshot-5.bin"), "{err}");
        // Raft is told "try later" rather than handed a wrong snapshot (or panicking).
        assert_eq!(
            store_error(store.snapshot(0, 1)),
            raft::StorageError::SnapshotTemporarilyUnavailable
        );

        std::fs::remove_file(&path).unwrap();
        let err = store.snapshot_data().unwrap_err();
        assert!(
            matches!(err, StorageError::SnapshotIo { .. }),
            "got {err:?}"
        );
    }

    /// Issue 12: one flipped bit anywhere in a snapshot file, header or data, is
    /// refused with the file named, never handed out as a snapshot.
    #[test]
    fn every_single_bit_flip_in_a_snapshot_file_is_caught() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(5, voters(&[1, 2, 3]), b"the lock table at 5", 0)
                .unwrap();
        }
        let path = dir.path().join("snapshot-5.bin");
        let good = std::fs::read(&path).unwrap();
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        for byte in 0..good.len() {
            for bit in 0..8 {
                let mut bad = good.clone();
                bad[byte] ^= 1 << bit;
                std::fs::write(&path, &bad).unwrap();
                let err = store.snapshot_data().unwrap_err();
                assert!(
                    matches!(err, StorageError::SnapshotFileCorrupt { .. })
                        && err.to_string().contains("snapshot-5.bin"),
                    "byte {byte} bit {bit}: {err:?}"
                );
            }
        }
        std::fs::write(&path, &good).unwrap();
        assert!(store.snapshot_data().is_ok());
    }

    #[test]
    fn a_snapshot_is_not_handed_to_a_server_its_configuration_does_not_name() {
        let dir = TempDir::new().unwrap();
        let store = store_with_twenty_entries(dir.path());
        store
            .create_snapshot(5, voters(&[1, 2, 3]), b"at 5", 0)
            .unwrap();
        // Server 4 was just added as a learner: it would refuse this snapshot.
        assert_eq!(
            store_error(store.snapshot(0, 4)),
            raft::StorageError::SnapshotTemporarilyUnavailable
        );
        let mut with_learner = voters(&[1, 2, 3]);
        with_learner.learners = vec![4];
        store.create_snapshot(6, with_learner, b"at 6", 0).unwrap();
        assert_eq!(store.snapshot(0, 4).unwrap().get_data(), b"at 6");
    }

    #[test]
    fn a_store_keeping_its_snapshot_in_the_database_moves_it_to_a_file() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(6, voters(&[1, 2, 3]), b"at 6", 0)
                .unwrap();
        }
        // Rewrite it into the layout of earlier versions: data in the database, no file
        // name, no compaction point (it was the snapshot point).
        std::fs::remove_file(dir.path().join("snapshot-6.bin")).unwrap();
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut meta = txn.open_table(META).unwrap();
                meta.remove(SNAPSHOT_FILE).unwrap();
                meta.remove(COMPACTED).unwrap();
                txn.open_table(LEGACY_SNAPSHOT)
                    .unwrap()
                    .insert(LEGACY_SNAPSHOT_DATA, b"at 6".as_slice())
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(snapshot_files(dir.path()), vec!["snapshot-6.bin"]);
        assert_eq!(store.first_index(), 7);
        assert_eq!(store.term(6).unwrap(), 1);
        let snap = store.snapshot_data().unwrap().unwrap();
        assert_eq!(
            (snap.get_metadata().index, snap.get_data()),
            (6, &b"at 6"[..])
        );
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.snapshot_index(), 6);
    }

    #[test]
    fn storage_and_its_errors_can_cross_threads() {
        // The driver moves the RawNode (and so the storage) onto its own thread, and
        // storage errors travel inside anyhow::Error.
        fn assert_send_sync<T: Send + Sync + 'static>() {}
        assert_send_sync::<DiskStorage>();
        assert_send_sync::<StorageError>();
    }

    /// Drives a single-voter RawNode through an election and a proposal, the way the
    /// Raft driver does, then restarts it from disk.
    #[test]
    fn raw_node_elects_commits_and_restarts_from_disk() {
        let dir = TempDir::new().unwrap();
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let config = raft::Config {
            id: 1,
            ..Default::default()
        };
        let handle_ready = |node: &mut RawNode<DiskStorage>| {
            let store = node.store().clone();
            let mut ready = node.ready();
            let mut committed = ready.take_committed_entries();
            store
                .persist(ready.entries(), ready.hs())
                .expect("persist ready");
            let mut light = node.advance(ready);
            if let Some(commit) = light.commit_index() {
                store.set_commit(commit).unwrap();
            }
            committed.extend(light.take_committed_entries());
            node.advance_apply();
            committed
        };
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            let mut node = RawNode::new(&config, store, &logger).unwrap();
            node.campaign().unwrap();
            while node.has_ready() {
                handle_ready(&mut node);
            }
            node.propose(vec![], b"acquire".to_vec()).unwrap();
            let mut applied = Vec::new();
            while node.has_ready() {
                applied.extend(handle_ready(&mut node));
            }
            assert!(applied.iter().any(
                |e| e.get_entry_type() == EntryType::EntryNormal && e.get_data() == b"acquire"
            ));
        }
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        let hs = store.hard_state();
        assert_eq!(hs.vote, 1);
        // The last commit index alone was not synced; the restarted node learns it
        // again when it commits in its new term.
        assert!(hs.commit <= store.last_index());
        let last_before = store.last_index();
        let mut node = RawNode::new(&config, store, &logger).unwrap();
        assert_eq!(node.raft.term, hs.term);
        assert_eq!(node.raft.raft_log.committed, hs.commit);
        node.campaign().unwrap();
        let mut applied = Vec::new();
        while node.has_ready() {
            applied.extend(handle_ready(&mut node));
        }
        assert_eq!(node.raft.raft_log.committed, last_before + 1);
        assert!(applied.iter().any(|e| e.get_data() == b"acquire"));
    }

    #[test]
    fn record_snapshot_leaves_compacted_entries_for_later_persists_to_delete_in_batches() {
        let dir = TempDir::new().unwrap();
        let store = store_with_twenty_entries(dir.path());
        store.set_compaction_batch(4);
        store
            .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
            .unwrap();
        // Memory drops entries 1..=10 at once; the disk still holds them.
        assert_eq!(store.first_index(), 11);
        assert_eq!(all_entries(&store), entries(11..=20, 2));
        assert_eq!(store.stored_indices(), (1..=20).collect::<Vec<_>>());

        // Each write deletes one batch, whatever it writes; a commit-only change
        // writes nothing.
        store.set_commit(19).unwrap();
        assert_eq!(store.stored_indices(), (1..=20).collect::<Vec<_>>());
        next_term(&store);
        assert_eq!(store.stored_indices(), (5..=20).collect::<Vec<_>>());
        store.persist(&entries(21..=21, 2), None).unwrap();
        assert_eq!(store.stored_indices(), (9..=21).collect::<Vec<_>>());
        // A batch never reaches past the compaction point.
        store.persist(&[], Some(&hard_state(4, 2, 19))).unwrap();
        assert_eq!(store.stored_indices(), (11..=21).collect::<Vec<_>>());
        store.persist(&entries(22..=22, 3), None).unwrap();
        assert_eq!(store.stored_indices(), (11..=22).collect::<Vec<_>>());
        assert_eq!(store.first_index(), 11);
        assert_eq!(store.last_index(), 22);
        assert_eq!(store.term(10).unwrap(), 1);

        let store = {
            drop(store);
            DiskStorage::open(dir.path(), &[]).unwrap()
        };
        let mut expected = entries(11..=21, 2);
        expected.push(entry(22, 3));
        assert_eq!(all_entries(&store), expected);
    }

    #[test]
    fn the_default_batch_bounds_the_batches_one_persist_deletes() {
        let dir = TempDir::new().unwrap();
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        let n = 2 * COMPACTION_BATCH + 500;
        for entry in entries(1..=n, 1) {
            store.persist(&[entry], None).unwrap();
        }
        store.persist(&[], Some(&hard_state(1, 1, n))).unwrap();
        store.create_snapshot(n, voters(&[1]), b"", 0).unwrap();
        assert_eq!(store.stored_indices().len() as u64, n);
        next_term(&store);
        assert_eq!(
            store.stored_indices().first(),
            Some(&(COMPACTION_BATCH + 1))
        );
        next_term(&store);
        next_term(&store);
        assert_eq!(store.stored_indices(), Vec::<u64>::new());
        assert_eq!(store.first_index(), n + 1);
        assert_eq!(store.last_index(), n);
    }

    #[test]
    fn reopening_with_compacted_leftovers_ignores_them_and_later_persists_delete_them() {
        let dir = TempDir::new().unwrap();
        {
            let store = store_with_twenty_entries(dir.path());
            store
                .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
                .unwrap();
            // A crash right after the compaction point moved: every leftover is on disk.
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.stored_indices(), (1..=20).collect::<Vec<_>>());
        assert_eq!(store.first_index(), 11);
        assert_eq!(store.last_index(), 20);
        assert_eq!(all_entries(&store), entries(11..=20, 2));
        assert_eq!(store.term(10).unwrap(), 1, "the compaction point's term");
        assert_eq!(store_error(store.term(9)), raft::StorageError::Compacted);
        assert_eq!(
            store_error(store.entries(10, 12, None, GetEntriesContext::empty(false))),
            raft::StorageError::Compacted
        );
        assert_eq!(store.snapshot_data().unwrap().unwrap().get_data(), b"at 15");

        // A crash part-way through the deletion: reopen in the middle.
        store.set_compaction_batch(3);
        next_term(&store);
        assert_eq!(store.stored_indices(), (4..=20).collect::<Vec<_>>());
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.first_index(), 11);
        assert_eq!(all_entries(&store), entries(11..=20, 2));
        store.set_compaction_batch(3);
        for _ in 0..4 {
            next_term(&store);
        }
        assert_eq!(store.stored_indices(), (11..=20).collect::<Vec<_>>());
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(all_entries(&store), entries(11..=20, 2));
        assert_eq!(store.hard_state(), hard_state(7, 1, 18));
    }

    #[test]
    fn leftovers_and_a_truncation_are_handled_in_one_persist() {
        let dir = TempDir::new().unwrap();
        let store = store_with_twenty_entries(dir.path());
        store.set_compaction_batch(100);
        store
            .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
            .unwrap();
        // A new leader overwrites the uncommitted tail from 19 on.
        store.persist(&entries(19..=19, 3), None).unwrap();
        assert_eq!(store.stored_indices(), (11..=19).collect::<Vec<_>>());
        let mut expected = entries(11..=18, 2);
        expected.push(entry(19, 3));
        assert_eq!(all_entries(&store), expected);
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(all_entries(&store), expected);
    }

    #[test]
    fn a_snapshot_from_the_leader_removes_compacted_leftovers_too() {
        let dir = TempDir::new().unwrap();
        let store = store_with_twenty_entries(dir.path());
        store
            .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
            .unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 30;
        snap.mut_metadata().term = 4;
        snap.mut_metadata().set_conf_state(voters(&[1, 2, 3]));
        snap.set_data(Bytes::from_static(b"at 30"));
        store.apply_snapshot(&snap).unwrap();
        assert_eq!(store.stored_indices(), Vec::<u64>::new());
        store.persist(&entries(31..=32, 4), None).unwrap();
        assert_eq!(store.stored_indices(), vec![31, 32]);
        drop(store);
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(store.first_index(), 31);
        assert_eq!(all_entries(&store), entries(31..=32, 4));
    }
}
