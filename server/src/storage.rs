//! Durable Raft storage: this server's log, hard state, conf state and latest snapshot,
//! kept in one redb database (`<dir>/raft.redb`) and served to raft-rs through its
//! [`raft::Storage`] trait.
//!
//! Every mutation is written through first — one redb write transaction, hence one
//! fsync — and only after the commit succeeds is it applied to the in-memory copy that
//! answers Raft's reads (the log tail after the snapshot point, the hard and conf state,
//! the snapshot's metadata; its bytes are read back from redb when asked for). Memory
//! therefore never shows Raft anything the disk could lose.
//!
//! Why redb: its commits fsync (we ask for `Durability::Immediate` explicitly), it is
//! crash-safe and stable. sled flushes with `sync_file_range` rather than `fsync` and is
//! beta; a Raft server that loses an acknowledged `HardState` can vote twice in a term,
//! electing two leaders — for a lock manager, two holders of one exclusive lock.
//!
//! This module must not interpret entry payloads or snapshot data (opaque bytes of the
//! lock table), decide when to snapshot (the driver's call), or touch the network.
//! The in-memory tail is bounded only by how often the driver snapshots.

use std::fmt;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use tracing::info;

/// File name of the database inside a server's directory.
const DB_FILE: &str = "raft.redb";

/// redb's page cache (9/10 read cache, 1/10 write buffer; a transaction larger than the
/// buffer writes pages out early). redb's default, 1 GiB, keeps every page it ever
/// wrote in memory, and each snapshot rewrites tens of megabytes: with a million locks
/// that was hundreds of bytes of RSS per lock (BRIEF §4.1 W4). After start-up the log
/// tail and the snapshot are served from memory (`Log`), so redb reads only the pages
/// its own writes walk through, which a small cache holds.
const CACHE_SIZE_BYTES: usize = 16 * 1024 * 1024;

/// Log entries by index, each a protobuf-encoded `Entry`. Holds exactly the entries after
/// the snapshot point, the same ones as [`Log::entries`].
const ENTRIES: TableDefinition<u64, &[u8]> = TableDefinition::new("entries");
/// Small protobuf-encoded records: the keys below.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// The snapshot's state-machine bytes, one value, apart from the small records so that
/// rewriting the hard state never copies tens of megabytes.
const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

const HARD_STATE: &str = "hard_state";
const CONF_STATE: &str = "conf_state";
const SNAPSHOT_META: &str = "snapshot_meta";
const SNAPSHOT_DATA: &str = "data";

/// Where a value lives in the database; named in errors about that value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKey {
    Meta(&'static str),
    Entry(u64),
    SnapshotData,
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Meta(name) => write!(f, "meta/{name}"),
            StoreKey::Entry(index) => write!(f, "entries/{index}"),
            StoreKey::SnapshotData => write!(f, "snapshot/{SNAPSHOT_DATA}"),
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

    // The caller asked for something the log cannot do; a bug in the driver or in Raft.
    #[error("entries to persist are not contiguous: index {next} follows {prev}")]
    NotContiguous { prev: u64, next: u64 },
    #[error("entries from index {first} would leave a gap after the last index {last_index}")]
    WouldLeaveGap { first: u64, last_index: u64 },
    #[error("entries from index {first} would overwrite the snapshot through {snapshot_index}")]
    OverwritesSnapshot { first: u64, snapshot_index: u64 },
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

fn encode(key: StoreKey, msg: &impl protobuf::Message) -> Result<Vec<u8>, StorageError> {
    msg.write_to_bytes()
        .map_err(|source| StorageError::Encode { key, source })
}

fn decode<M: protobuf::Message>(key: StoreKey, bytes: &[u8]) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|source| StorageError::Decode { key, source })
}

/// Raft's log storage on disk; cheap to clone, every clone is the same log.
#[derive(Clone)]
pub struct DiskStorage {
    log: Arc<RwLock<Log>>,
}

/// The in-memory mirror of the database, and the database itself. Between calls, memory
/// equals what is on disk.
struct Log {
    db: Database,
    hard_state: HardState,
    conf_state: ConfState,
    /// The latest snapshot's metadata (ours or the leader's); its data is empty here and
    /// read from redb when asked for (start-up, a follower that needs it): with a million
    /// locks a resident copy was ~46 bytes per lock (BRIEF §4.1 W4). Index 0 means
    /// none: the log starts at 1.
    snapshot: Snapshot,
    /// Every entry after the snapshot point, contiguous: `entries[0].index` is
    /// `snapshot index + 1`.
    entries: Vec<Entry>,
}

impl DiskStorage {
    /// Opens (creating if missing) `<dir>/raft.redb`. A fresh store has an empty log; if
    /// `initial_voters` is non-empty and the store is fresh, its ConfState gets those
    /// voters (how the cluster bootstraps: every initial server starts with the same
    /// voter set at index 0). An existing store ignores `initial_voters`.
    pub fn open(dir: &Path, initial_voters: &[u64]) -> Result<Self, StorageError> {
        let path = dir.join(DB_FILE);
        let started = std::time::Instant::now();
        let db = Database::builder()
            .set_cache_size(CACHE_SIZE_BYTES)
            .create(&path)
            .map_err(|e| StorageError::Open {
                path: path.clone(),
                source: Box::new(e.into()),
            })?;
        bootstrap_if_fresh(&db, initial_voters)?;
        let log = Log::load(db)?;
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
        Ok(DiskStorage {
            log: Arc::new(RwLock::new(log)),
        })
    }

    /// Persists, in one write transaction (one fsync), `entries` — replacing every stored
    /// entry at or after `entries[0].index` — and `hard_state` if given. Called once per
    /// Raft Ready.
    pub fn persist(
        &self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        self.write().persist(entries, hard_state)
    }

    /// Records that entries up to `commit` are committed.
    pub fn set_commit(&self, commit: u64) -> Result<(), StorageError> {
        let mut log = self.write();
        if log.hard_state.commit == commit {
            return Ok(());
        }
        let mut hard_state = log.hard_state.clone();
        hard_state.commit = commit;
        log.persist(&[], Some(&hard_state))
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StorageError> {
        self.write().set_conf_state(cs)
    }

    /// Installs a snapshot received from the leader: the whole log is replaced by it, the
    /// hard state's commit and term are raised to at least the snapshot's, and the conf
    /// state comes from its metadata.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StorageError> {
        self.write().apply_snapshot(snap)
    }

    /// Stores our own snapshot of the state machine as applied through `index` and
    /// compacts the log: entries up to `index` are dropped, `first_index` becomes
    /// `index + 1`. `index` must be committed and newer than the stored snapshot.
    pub fn create_snapshot(
        &self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        self.write().create_snapshot(index, conf_state, data)
    }

    pub fn hard_state(&self) -> HardState {
        self.read().hard_state.clone()
    }

    pub fn conf_state(&self) -> ConfState {
        self.read().conf_state.clone()
    }

    /// The stored snapshot (metadata and data, read from disk), if any; the state
    /// machine restores from it at start-up.
    pub fn snapshot_data(&self) -> Result<Option<Snapshot>, StorageError> {
        let log = self.read();
        if log.snapshot_index() == 0 {
            return Ok(None);
        }
        log.full_snapshot().map(Some)
    }

    /// The latest snapshot's index, 0 if there is none.
    pub fn snapshot_index(&self) -> u64 {
        self.read().snapshot_index()
    }

    pub fn first_index(&self) -> u64 {
        self.read().first_index()
    }

    pub fn last_index(&self) -> u64 {
        self.read().last_index()
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

/// Writes the initial records if the store has none. Freshness is judged by the hard
/// state's presence rather than by the file's, so a crash between creating the file and
/// this commit just bootstraps again on the next start.
fn bootstrap_if_fresh(db: &Database, initial_voters: &[u64]) -> Result<(), StorageError> {
    let txn = begin_write(db)?;
    {
        // Opening creates the tables, so later reads never meet a missing table.
        txn.open_table(ENTRIES).during("create the entries table")?;
        txn.open_table(SNAPSHOT)
            .during("create the snapshot table")?;
        let mut meta = txn.open_table(META).during("create the meta table")?;
        let fresh = meta
            .get(HARD_STATE)
            .during("read the hard state")?
            .is_none();
        if fresh {
            let conf_state = ConfState {
                voters: initial_voters.to_vec(),
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
            ];
            for (key, value) in &records {
                meta.insert(*key, value.as_slice())
                    .during("write the initial state")?;
            }
            info!(voters = ?initial_voters, "new raft log created");
        }
    }
    txn.commit().during("commit the initial state")
}

fn begin_write(db: &Database) -> Result<WriteTransaction, StorageError> {
    let mut txn = db.begin_write().during("begin a write transaction")?;
    // The default, but the whole point of this module: commit returns only after fsync.
    txn.set_durability(Durability::Immediate);
    Ok(txn)
}

/// Deletes the stored entries whose index is in `range`.
fn delete_entries(
    txn: &WriteTransaction,
    range: impl RangeBounds<u64> + 'static,
) -> Result<(), StorageError> {
    let mut table = txn.open_table(ENTRIES).during("open the entries table")?;
    table
        .retain_in(range, |_, _| false)
        .during("delete log entries")
}

/// Stores a snapshot's metadata and data, replacing the previous snapshot.
fn put_snapshot(txn: &WriteTransaction, snap: &Snapshot) -> Result<(), StorageError> {
    let meta_bytes = encode(StoreKey::Meta(SNAPSHOT_META), snap.get_metadata())?;
    txn.open_table(META)
        .during("open the meta table")?
        .insert(SNAPSHOT_META, meta_bytes.as_slice())
        .during("write the snapshot metadata")?;
    txn.open_table(SNAPSHOT)
        .during("open the snapshot table")?
        .insert(SNAPSHOT_DATA, snap.get_data())
        .during("write the snapshot data")?;
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
    /// The latest snapshot with its data, read from redb (one copy out of its pages).
    fn full_snapshot(&self) -> Result<Snapshot, StorageError> {
        let txn = self.db.begin_read().during("begin a read transaction")?;
        let table = txn.open_table(SNAPSHOT).during("open the snapshot table")?;
        let guard = table
            .get(SNAPSHOT_DATA)
            .during("read the snapshot data")?
            .ok_or(StorageError::Missing {
                key: StoreKey::SnapshotData,
            })?;
        let mut snap = self.snapshot.clone();
        snap.set_data(Bytes::from(guard.value().to_vec()));
        Ok(snap)
    }

    fn load(db: Database) -> Result<Log, StorageError> {
        let txn = db.begin_read().during("begin a read transaction")?;
        let meta = txn.open_table(META).during("open the meta table")?;
        let read_meta = |name: &'static str| -> Result<Vec<u8>, StorageError> {
            let guard = meta.get(name).during("read a meta record")?;
            let guard = guard.ok_or(StorageError::Missing {
                key: StoreKey::Meta(name),
            })?;
            Ok(guard.value().to_vec())
        };
        let hard_state: HardState = decode(StoreKey::Meta(HARD_STATE), &read_meta(HARD_STATE)?)?;
        let conf_state: ConfState = decode(StoreKey::Meta(CONF_STATE), &read_meta(CONF_STATE)?)?;
        let snapshot_meta: SnapshotMetadata =
            decode(StoreKey::Meta(SNAPSHOT_META), &read_meta(SNAPSHOT_META)?)?;

        let mut snapshot = Snapshot::default();
        if snapshot_meta.index > 0 {
            // Only checked here; read when asked for.
            let table = txn.open_table(SNAPSHOT).during("open the snapshot table")?;
            table
                .get(SNAPSHOT_DATA)
                .during("read the snapshot data")?
                .ok_or(StorageError::Missing {
                    key: StoreKey::SnapshotData,
                })?;
        }
        snapshot.set_metadata(snapshot_meta);

        let mut entries = Vec::new();
        let first_index = snapshot.get_metadata().index + 1;
        let table = txn.open_table(ENTRIES).during("open the entries table")?;
        let stored = table.iter().during("read the log entries")?;
        for (expected, item) in (first_index..).zip(stored) {
            let (key, value) = item.during("read a log entry")?;
            let index = key.value();
            let entry: Entry = decode(StoreKey::Entry(index), value.value())?;
            if index != expected || entry.index != index {
                return Err(StorageError::Corrupt(format!(
                    "expected entry {expected}, found key {index} holding entry {}",
                    entry.index
                )));
            }
            entries.push(entry);
        }
        drop(table);
        drop(meta);
        drop(txn);

        let log = Log {
            db,
            hard_state,
            conf_state,
            snapshot,
            entries,
        };
        if log.hard_state.commit > log.last_index() {
            // raft-rs would panic on this at start-up; say what is wrong instead.
            return Err(StorageError::Corrupt(format!(
                "hard state commits index {} but the log ends at {}",
                log.hard_state.commit,
                log.last_index()
            )));
        }
        log.check_invariants();
        Ok(log)
    }

    fn snapshot_index(&self) -> u64 {
        self.snapshot.get_metadata().index
    }

    fn first_index(&self) -> u64 {
        self.snapshot_index() + 1
    }

    fn last_index(&self) -> u64 {
        self.snapshot_index() + self.entries.len() as u64
    }

    /// The in-memory entry at `index`, which must be in `[first_index, last_index]`.
    fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index - self.first_index()) as usize]
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot_index() {
            return Ok(self.snapshot.get_metadata().term);
        }
        if index < self.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if index > self.last_index() {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.entry(index).term)
    }

    /// O(1) checks that the entries sit right after the snapshot point; together with
    /// `persist` refusing non-contiguous batches they make the whole tail contiguous.
    fn check_invariants(&self) {
        if let (Some(first), Some(last)) = (self.entries.first(), self.entries.last()) {
            assert_eq!(
                first.index,
                self.first_index(),
                "log does not start after the snapshot"
            );
            assert_eq!(last.index, self.last_index(), "log has a hole");
        }
    }

    fn persist(
        &mut self,
        entries: &[Entry],
        hard_state: Option<&HardState>,
    ) -> Result<(), StorageError> {
        if entries.is_empty() && hard_state.is_none() {
            return Ok(());
        }
        if let Some(first) = entries.first() {
            self.check_append(entries, first.index)?;
        }
        let txn = begin_write(&self.db)?;
        if let Some(first) = entries.first() {
            if first.index <= self.last_index() {
                delete_entries(&txn, first.index..)?;
            }
            let mut table = txn.open_table(ENTRIES).during("open the entries table")?;
            for entry in entries {
                let bytes = encode(StoreKey::Entry(entry.index), entry)?;
                table
                    .insert(entry.index, bytes.as_slice())
                    .during("write a log entry")?;
            }
        }
        if let Some(hs) = hard_state {
            put_meta(&txn, HARD_STATE, hs)?;
        }
        txn.commit().during("commit entries and hard state")?;

        if let Some(first) = entries.first() {
            let keep = (first.index - self.first_index()) as usize;
            self.entries.truncate(keep);
            // Clones share the payload bytes.
            self.entries.extend_from_slice(entries);
        }
        if let Some(hs) = hard_state {
            self.hard_state = hs.clone();
        }
        self.check_invariants();
        Ok(())
    }

    /// Refuses a batch that would corrupt the log; Raft never sends one.
    fn check_append(&self, entries: &[Entry], first: u64) -> Result<(), StorageError> {
        if first < self.first_index() {
            return Err(StorageError::OverwritesSnapshot {
                first,
                snapshot_index: self.snapshot_index(),
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

    fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), StorageError> {
        let meta = snap.get_metadata();
        if meta.index <= self.snapshot_index() {
            return Err(StorageError::SnapshotOutOfDate {
                index: meta.index,
                snapshot_index: self.snapshot_index(),
            });
        }
        let mut hard_state = self.hard_state.clone();
        hard_state.term = hard_state.term.max(meta.term);
        hard_state.commit = hard_state.commit.max(meta.index);
        let conf_state = meta.get_conf_state().clone();

        let txn = begin_write(&self.db)?;
        delete_entries(&txn, ..)?;
        put_snapshot(&txn, snap)?;
        put_meta(&txn, HARD_STATE, &hard_state)?;
        put_meta(&txn, CONF_STATE, &conf_state)?;
        txn.commit().during("commit the received snapshot")?;

        self.entries.clear();
        self.snapshot = Snapshot::default();
        self.snapshot.set_metadata(meta.clone());
        self.hard_state = hard_state;
        self.conf_state = conf_state;
        self.check_invariants();
        Ok(())
    }

    fn create_snapshot(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        if index <= self.snapshot_index() {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                snapshot_index: self.snapshot_index(),
            });
        }
        // Only committed state may be snapshotted: a snapshot is never rolled back.
        if index > self.hard_state.commit || index > self.last_index() {
            return Err(StorageError::SnapshotBeyondCommit {
                index,
                commit: self.hard_state.commit,
                last_index: self.last_index(),
            });
        }
        let mut snap = Snapshot::default();
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = self.entry(index).term;
        meta.set_conf_state(conf_state);
        snap.set_data(Bytes::from(data));

        let txn = begin_write(&self.db)?;
        put_snapshot(&txn, &snap)?;
        delete_entries(&txn, ..=index)?;
        txn.commit().during("commit the snapshot and compaction")?;

        let dropped = (index + 1 - self.first_index()) as usize;
        self.entries.drain(..dropped);
        snap.clear_data();
        self.snapshot = snap;
        self.check_invariants();
        Ok(())
    }
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

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let log = self.read();
        let index = log.snapshot_index();
        if index == 0 || index < request_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        log.full_snapshot()
            .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))
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
            store.set_conf_state(&voters(&[1, 2, 3, 4])).unwrap();
        }
        let store = DiskStorage::open(dir.path(), &[]).unwrap();
        assert_eq!(all_entries(&store), entries(1..=5, 1));
        assert_eq!(store.hard_state(), hard_state(1, 2, 4));
        assert_eq!(store.conf_state(), voters(&[1, 2, 3, 4]));
        let state = store.initial_state().unwrap();
        assert_eq!(state.hard_state, hard_state(1, 2, 4));
        assert_eq!(state.conf_state, voters(&[1, 2, 3, 4]));
    }

    #[test]
    fn persist_overlapping_the_tail_truncates_the_conflicting_suffix_on_disk() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            store.persist(&entries(1..=6, 1), None).unwrap();
            // A new leader in term 2 overwrites from index 4 with a shorter tail.
            store.persist(&entries(4..=4, 2), None).unwrap();
            assert_eq!(store.last_index(), 4);
            assert_eq!(store.term(4).unwrap(), 2);
            assert_eq!(store_error(store.term(5)), raft::StorageError::Unavailable);
        }
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        let mut expected = entries(1..=3, 1);
        expected.push(entry(4, 2));
        assert_eq!(all_entries(&store), expected);
        assert_eq!(store.last_index(), 4);
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
                .create_snapshot(6, voters(&[1, 2, 3]), data.clone())
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
        assert!(
            store.read().snapshot.get_data().is_empty(),
            "the snapshot's data stays on disk, not in memory"
        );
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
        store.create_snapshot(4, voters(&[1]), vec![4]).unwrap();
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
            Err(StorageError::OverwritesSnapshot {
                first: 3,
                snapshot_index: 4
            })
        ));
        assert!(matches!(
            store.persist(&[entry(11, 1), entry(13, 1)], None),
            Err(StorageError::NotContiguous { prev: 11, next: 13 })
        ));
        assert!(matches!(
            store.create_snapshot(9, voters(&[1]), vec![]),
            Err(StorageError::SnapshotBeyondCommit {
                index: 9,
                commit: 8,
                ..
            })
        ));
        assert!(matches!(
            store.create_snapshot(4, voters(&[1]), vec![]),
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
        }
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ENTRIES)
                .unwrap()
                .insert(2, [0xff_u8, 0xff, 0xff].as_slice())
                .unwrap();
            txn.commit().unwrap();
        }
        let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
        assert!(
            matches!(
                err,
                StorageError::Decode {
                    key: StoreKey::Entry(2),
                    ..
                }
            ),
            "got {err:?}"
        );
        assert!(err.to_string().contains("entries/2"), "{err}");
    }

    #[test]
    fn a_missing_entry_is_reported_as_corruption() {
        let dir = TempDir::new().unwrap();
        {
            let store = DiskStorage::open(dir.path(), &[1]).unwrap();
            store.persist(&entries(1..=3, 1), None).unwrap();
        }
        {
            let db = Database::create(dir.path().join(DB_FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(ENTRIES).unwrap().remove(2).unwrap();
            txn.commit().unwrap();
        }
        let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt(_)), "got {err:?}");
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
        assert_eq!(hs.commit, store.last_index());
        let node = RawNode::new(&config, store, &logger).unwrap();
        assert_eq!(node.raft.term, hs.term);
        assert_eq!(node.raft.raft_log.committed, hs.commit);
    }
}
