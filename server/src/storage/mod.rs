//! Durable Raft storage: this server's log, hard state, conf state and latest snapshot,
//! served to raft-rs through its [`raft::Storage`] trait. The entries and the small
//! records live in one raft-engine log (`<dir>/raft-log/`, TiKV's append-only store
//! built for raft-rs); the snapshot's state-machine bytes live in their own file
//! (`<dir>/snapshot-<index>.bin`), which a record names.
//!
//! Every mutation is written through first — one raft-engine `LogBatch`, written with
//! `sync`, hence one append and one fdatasync — and only after the write returned is it
//! applied to the in-memory copy that answers Raft's reads (the log tail after the
//! compaction point, the hard and conf state, the snapshot's metadata). Memory therefore
//! never shows Raft anything the disk could lose. A `LogBatch` is atomic: its records
//! carry one checksum. raft-engine opens the log in its strict mode and never cuts
//! anything; before it opens, `tail` reads the end of the newest file of each queue
//! and cuts a torn last write (one whose write never returned, so nothing was
//! acknowledged on it: no whole batch follows it), and refuses the open with every file
//! as it was when whole batches follow unreadable bytes (damage to acknowledged
//! writes). Damage in older files, and a damaged entry payload, are refused too. Open
//! also refuses log files with a gap or a duplicate in their sequence numbers, which
//! raft-engine would otherwise take as "the older files are stale" and ignore (see
//! `schema::check_log_files`).
//!
//! Why raft-engine (issue 17): the log was a redb database, and each Ready's persist a
//! write transaction that rebuilt B-tree pages — about seven writes and an fsync,
//! 520–680 µs on the benchmark disk against ≈200 µs for one fdatasync of an append. An
//! append-only log makes each persist one `pwrite` and one `fdatasync` (300–390 µs; W1
//! +24%, W2 +40%, W3 p50 −27%: the README's A/B). Everything lives in the one engine
//! rather than the small records staying in redb: one store means every step below is
//! one atomic write, with no crash ordering between two stores to get right (a leader's
//! snapshot, for one, replaces the log, the hard state and the snapshot's records at
//! once, and the compaction point moves with raft-engine's own compaction).
//!
//! raft-engine panics when an fdatasync fails (it cannot know what reached the disk);
//! lockd's panic hook then stops the server with status 70, as a [`StorageError`] on
//! the driver does: a server that cannot promise durability must not go on.
//!
//! Taking a snapshot has two halves so that the expensive one need not block the Raft
//! driver: [`SnapshotJob::write`] writes the bytes to a new file (temporary name, fsync,
//! rename, fsync of the directory) on any thread, without touching the log; then
//! [`DiskStorage::record_snapshot`] names that file and moves the compaction point in one
//! short write. A crash anywhere leaves a consistent store: until that write returns the
//! log names the previous file, which is only deleted afterwards, and
//! [`DiskStorage::open`] deletes every snapshot file the log does not name.
//!
//! The log is compacted to `keep_entries` before the snapshot point, not to the point
//! itself, so a follower a little behind is sent entries rather than a whole snapshot.
//! Hence two points: the snapshot's (index, term) and the compaction point's; the log
//! holds the entries after the compaction point, and the snapshot point is never below
//! it (restoring the snapshot and replaying the log reaches every entry). The compaction
//! point's record and raft-engine's `Compact` command are one write, so the engine never
//! holds an entry at or below the point (open checks this). raft-engine drops compacted
//! entries from its index at once; their log files are deleted (or recycled) by
//! [`DiskStorage::record_snapshot`]'s purge, once the files exceed the purge threshold
//! (see `schema`).
//!
//! Crash ordering, write by write (a crash before a `LogBatch` returns leaves the state
//! before it, after it the state after it; no message depending on it was sent yet):
//! - a new store: every initial record in one batch; before it, no hard state, so the
//!   directory has no log (refused without `--bootstrap`/`--join`, created again with);
//! - `persist`: entries and hard state in one batch;
//! - `record_snapshot`: the file is durable (and renamed) first, then one batch names it,
//!   moves the compaction point and compacts the engine; a crash between leaves an
//!   unnamed file that open deletes, one after it the old file, which open deletes too;
//! - `apply_snapshot`: the file first, then one batch drops every entry, names the
//!   snapshot and raises the hard and conf state (never a log from before the snapshot
//!   with records from after it);
//! - `set_conf_state`, `set_identity`: one record each.
//!
//! `open` checks that what it reads agrees: records present and decodable, the snapshot
//! named exactly when there is one, the compaction point not beyond it, the entries
//! starting right after the compaction point and contiguous, the commit index and the
//! snapshot not beyond the last entry, the snapshot's term the log's.
//!
//! raft-engine fdatasyncs on a synced write (and fsyncs the directory when it creates a
//! file). A Raft server that loses an acknowledged `HardState` can vote twice in a term,
//! electing two leaders — for a lock manager, two holders of one exclusive lock; that is
//! also why sled (which flushes with `sync_file_range`) was never an option.
//!
//! The on-disk format is version 2 ([`FORMAT_VERSION`], a record checked at every open);
//! a store without it or with another is refused, never migrated silently, and so is a
//! directory holding a version-1 store (`raft.redb`).
//!
//! Layout: `schema` (the records, the version, the engine's settings, creating a store),
//! `log` (the in-memory log and its writes), `snapshot` (the snapshot file and body
//! format, with its named checks), `error`.
//!
//! This module must not interpret entry payloads (opaque bytes to it), decide when to
//! snapshot (the driver's call), or touch the network. Only `snapshot` knows what a
//! snapshot body holds, so that the format lives in one place.
//! The in-memory tail is bounded by how often the driver snapshots plus `keep_entries`.

#[cfg(test)]
mod attack_tests;
mod error;
mod log;
mod schema;
pub mod snapshot;
mod tail;
#[cfg(test)]
mod tail_attack_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use raft_engine::{Engine, LogBatch};
use tracing::{debug, error, info};

pub use error::{StorageError, StoreKey};
pub use schema::FORMAT_VERSION;

use error::OnEngine;
use log::Log;
use schema::{
    bootstrap_if_fresh, check_log_files, engine_config, get, put, write_synced, IDENTITY, LOG_DIR,
    REDB_FILE,
};
use snapshot::{remove_file, remove_unnamed_files, write_file};

/// Raft's log storage on disk; cheap to clone, every clone is the same log.
#[derive(Clone)]
pub struct DiskStorage {
    log: Arc<RwLock<Log>>,
    /// The same engine as the log's, for what needs no lock: the identity, purging.
    engine: Arc<Engine>,
    dir: Arc<PathBuf>,
}

/// A snapshot whose metadata has been fixed by [`DiskStorage::begin_snapshot`] and whose
/// bytes are still to be written; `Send`, so the writing can happen on any thread.
#[derive(Debug)]
pub struct SnapshotJob {
    dir: Arc<PathBuf>,
    meta: SnapshotMetadata,
}

/// A snapshot file written and fsynced but not yet named by the log: until
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
    /// neither the log nor its records; the slow half of taking a snapshot.
    pub fn write(self, data: &[u8]) -> Result<WrittenSnapshot, StorageError> {
        let file = write_file(&self.dir, &self.meta, data)?;
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
    /// Opens (creating if missing) the log in `<dir>/raft-log/`. A fresh store has an
    /// empty log; if `initial_voters` is non-empty and the store is fresh, its ConfState
    /// gets those voters (how the cluster bootstraps: every initial server starts with
    /// the same voter set at index 0). An existing store ignores `initial_voters`.
    /// Snapshot files the log does not name (left by a crash) are deleted.
    pub fn open(dir: &Path, initial_voters: &[u64]) -> Result<Self, StorageError> {
        let new = NewLog {
            voters: initial_voters,
            identity: None,
        };
        Self::open_with(dir, Some(new)).map(|(store, _)| store)
    }

    /// Opens the log in `dir`; a store without one gets `new` (its voters and identity
    /// record, in the same write), or, with `None`, is refused with
    /// [`StorageError::NoLog`] (nothing created if there was no log directory): a server
    /// must not start as a fresh voter by accident (issue 12: amnesia). A directory with
    /// a format-1 store (`raft.redb`) is refused with [`StorageError::RedbLayout`],
    /// untouched. Also says whether the log was created.
    pub fn open_with(dir: &Path, new: Option<NewLog<'_>>) -> Result<(Self, bool), StorageError> {
        let redb = dir.join(REDB_FILE);
        if redb.exists() {
            return Err(StorageError::RedbLayout { path: redb });
        }
        let path = dir.join(LOG_DIR);
        if new.is_none() && !path.exists() {
            return Err(StorageError::NoLog { path });
        }
        if path.exists() {
            tail::cut_torn_tails(&path, &check_log_files(&path)?)?;
        }
        let started = std::time::Instant::now();
        let engine = Engine::open(engine_config(&path)).map_err(|e| StorageError::Open {
            path: path.clone(),
            source: Box::new(e),
        })?;
        let engine = Arc::new(engine);
        let dir = Arc::new(dir.to_owned());
        let created = bootstrap_if_fresh(&engine, &path, new)?;
        let log = Log::load(engine.clone(), dir.clone())?;
        remove_unnamed_files(&dir, log.snapshot_file.as_deref())?;
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
            engine,
            dir,
        };
        Ok((store, created))
    }

    /// Persists, in one raft-engine write (one fdatasync), `entries` — replacing every
    /// stored entry at or after `entries[0].index` — and `hard_state` if given; a change
    /// of the commit index alone is not synced on its own (see [`Log::persist`]). Called
    /// once per Raft Ready. Returns whether it wrote.
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
        Ok(get(&self.engine, IDENTITY))
    }

    /// Writes the identity record (durably, before returning).
    pub fn set_identity(&self, bytes: &[u8]) -> Result<(), StorageError> {
        // Held so that writes stay in the order the driver made them.
        let _log = self.write();
        let mut batch = LogBatch::default();
        put(&mut batch, IDENTITY, bytes.to_vec())?;
        write_synced(&self.engine, &mut batch, "write the identity")
    }

    /// Installs a snapshot received from the leader: its data is written to a file, the
    /// whole log is replaced by it, the hard state's commit and term are raised to at
    /// least the snapshot's, and the conf state comes from its metadata. Synchronous: the
    /// state machine cannot go on before it is installed anyway.
    pub fn apply_snapshot(&self, snap: &Snapshot) -> Result<(), StorageError> {
        let meta = snap.get_metadata();
        self.read().check_newer(meta.index)?;
        let file = write_file(&self.dir, meta, snap.get_data())?;
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
    /// compaction point to `index - keep_entries`, in one short write, then deletes
    /// the previous snapshot's file and purges obsolete log files (see [`Self::purge`]).
    /// The compacted entries leave memory and the engine's index at once. A snapshot
    /// overtaken by a newer one (installed from the leader while this one was written)
    /// is dropped instead.
    pub fn record_snapshot(
        &self,
        written: WrittenSnapshot,
        keep_entries: u64,
    ) -> Result<Recorded, StorageError> {
        let recorded = {
            let mut log = self.write();
            if written.meta.index <= log.snapshot_index() {
                remove_file(&self.dir, &written.file);
                return Ok(Recorded::Superseded);
            }
            log.record_snapshot(written, keep_entries)?
        };
        self.purge()?;
        Ok(recorded)
    }

    /// Deletes (or keeps for reuse) the log files that hold only compacted entries and
    /// overwritten records, once the files take more than the purge threshold; live
    /// records in the oldest files are rewritten first. Called after each snapshot (the
    /// only time entries become obsolete in bulk), not per persist: it scans the
    /// engine's index. Needs no lock of ours; raft-engine orders it with writes.
    pub fn purge(&self) -> Result<(), StorageError> {
        let started = std::time::Instant::now();
        let behind = self
            .engine
            .purge_expired_files()
            .on_engine("purge obsolete log files")?;
        debug!(
            elapsed_us = started.elapsed().as_micros() as u64,
            // Groups raft-engine would like compacted further: ours waits for the next
            // snapshot.
            behind = behind.len(),
            "raft log purged"
        );
        Ok(())
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
