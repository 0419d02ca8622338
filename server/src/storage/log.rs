//! The in-memory log and its durable mirror: [`Log`] holds the hard and conf state, the
//! snapshot's metadata and the entries after the compaction point, and changes them
//! only after the raft-engine write that records the change has returned (fdatasynced).

use std::path::PathBuf;
use std::sync::Arc;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft_engine::{Command, Engine, LogBatch};

use super::error::{OnEngine, StorageError, StoreKey};
use super::schema::*;
use super::snapshot::{read_file, remove_file};
use super::{Recorded, WrittenSnapshot};

/// The in-memory mirror of the store, and the store itself. Between calls, memory
/// equals what is on disk, except the hard state's commit index, which may be ahead
/// (see [`Log::persist`]).
pub(super) struct Log {
    pub(super) engine: Arc<Engine>,
    pub(super) dir: Arc<PathBuf>,
    pub(super) hard_state: HardState,
    /// The commit index in the stored hard state; at or below `hard_state.commit`.
    pub(super) stored_commit: u64,
    pub(super) conf_state: ConfState,
    /// The latest snapshot's metadata (ours or the leader's). Index 0 means none.
    pub(super) snapshot_meta: SnapshotMetadata,
    /// Its file in `dir`; `None` exactly when there is no snapshot. The data is read from
    /// it when asked for, not kept in memory (tens of megabytes at a million locks).
    pub(super) snapshot_file: Option<String>,
    /// The last entry dropped from the log; at or below the snapshot point.
    pub(super) compacted: Point,
    /// Every entry after the compaction point, contiguous: `entries[0].index` is
    /// `compacted.index + 1`. The engine holds exactly these: the compaction point and
    /// the engine's `Compact` command are always one write.
    pub(super) entries: Vec<Entry>,
}

impl Log {
    /// Reads the store's records and the entries after the compaction point, and checks
    /// that they agree with each other.
    pub(super) fn load(engine: Arc<Engine>, dir: Arc<PathBuf>) -> Result<Log, StorageError> {
        let records = Records::read(&engine)?;
        let entries = read_entries(&engine, records.compacted)?;

        // The commit index is written lazily (see `Log::persist`), so the stored one may
        // lag a snapshot taken since; the snapshot's index is committed by definition,
        // and raft-rs requires the commit index at or above it.
        let Records {
            mut hard_state,
            conf_state,
            snapshot_meta,
            snapshot_file,
            compacted,
        } = records;
        let stored_commit = hard_state.commit;
        hard_state.commit = hard_state.commit.max(snapshot_meta.index);
        let log = Log {
            engine,
            dir,
            hard_state,
            stored_commit,
            conf_state,
            snapshot_meta,
            snapshot_file,
            compacted,
            entries,
        };
        log.check_loaded()?;
        log.check_invariants();
        Ok(log)
    }

    /// What raft-rs assumes of a store at start-up (it would panic otherwise).
    fn check_loaded(&self) -> Result<(), StorageError> {
        if self.hard_state.commit > self.last_index() {
            return Err(StorageError::Corrupt(format!(
                "hard state commits index {} but the log ends at {}",
                self.hard_state.commit,
                self.last_index()
            )));
        }
        if self.snapshot_index() > self.last_index() {
            return Err(StorageError::Corrupt(format!(
                "the snapshot at index {} is beyond the log's end at {}",
                self.snapshot_index(),
                self.last_index()
            )));
        }
        if self.snapshot_index() > 0 {
            let term = self.term(self.snapshot_index()).map_err(|e| {
                StorageError::Corrupt(format!("no term for the snapshot point: {e}"))
            })?;
            if term != self.snapshot_meta.term {
                return Err(StorageError::Corrupt(format!(
                    "the snapshot at index {} has term {}, the log says {term}",
                    self.snapshot_index(),
                    self.snapshot_meta.term
                )));
            }
        }
        Ok(())
    }

    pub(super) fn snapshot_index(&self) -> u64 {
        self.snapshot_meta.index
    }

    pub(super) fn first_index(&self) -> u64 {
        self.compacted.index + 1
    }

    pub(super) fn last_index(&self) -> u64 {
        self.compacted.index + self.entries.len() as u64
    }

    /// The in-memory entry at `index`, which must be in `[first_index, last_index]`.
    pub(super) fn entry(&self, index: u64) -> &Entry {
        &self.entries[(index - self.first_index()) as usize]
    }

    pub(super) fn term(&self, index: u64) -> raft::Result<u64> {
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

    pub(super) fn check_newer(&self, index: u64) -> Result<(), StorageError> {
        if index <= self.snapshot_index() {
            return Err(StorageError::SnapshotOutOfDate {
                index,
                snapshot_index: self.snapshot_index(),
            });
        }
        Ok(())
    }

    pub(super) fn read_snapshot(&self) -> Result<Option<Snapshot>, StorageError> {
        let Some(file) = &self.snapshot_file else {
            return Ok(None);
        };
        let data = read_file(&self.dir, file, &self.snapshot_meta)?;
        let mut snap = Snapshot::default();
        snap.set_metadata(self.snapshot_meta.clone());
        snap.set_data(data);
        Ok(Some(snap))
    }

    /// O(1) checks that the entries sit right after the compaction point, which is not
    /// above the snapshot point; together with `persist` refusing non-contiguous entries
    /// they make the whole tail contiguous.
    pub(super) fn check_invariants(&self) {
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

    /// Writes `entries` and `hard_state` in one raft-engine write (one fdatasync) —
    /// unless all that changed is the commit index. That is volatile state in Raft (a
    /// restarted server learns it again from the leader, and what it applies at start-up
    /// stops short of it); etcd likewise syncs only when entries, term or vote change. So
    /// a commit-only change is kept in memory and written with the next write, which
    /// halves the fsyncs per entry: every entry's commit would otherwise cost one more on
    /// each server.
    pub(super) fn persist(
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
        let mut batch = LogBatch::default();
        if let Some(first) = entries.first() {
            self.check_append(entries, first.index)?;
            // Entries from an index the engine holds replace it and everything after
            // (a new leader overwriting our uncommitted tail).
            batch
                .add_entries::<Entries>(GROUP, entries)
                .on_engine("add entries to a write")?;
        }
        let write_hard_state =
            hard_state != self.hard_state || self.stored_commit != hard_state.commit;
        if write_hard_state {
            put_message(&mut batch, HARD_STATE, &hard_state)?;
        }
        write_synced(&self.engine, &mut batch, "write entries and hard state")?;
        if write_hard_state {
            self.stored_commit = hard_state.commit;
        }

        if let Some(first) = entries.first() {
            let keep = (first.index - self.first_index()) as usize;
            self.entries.truncate(keep);
            // Clones share the payload bytes.
            self.entries.extend_from_slice(entries);
        }
        self.hard_state = hard_state;
        self.check_invariants();
        Ok(true)
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

    pub(super) fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StorageError> {
        let mut batch = LogBatch::default();
        put_message(&mut batch, CONF_STATE, cs)?;
        write_synced(&self.engine, &mut batch, "write the conf state")?;
        self.conf_state = cs.clone();
        Ok(())
    }

    /// Makes the received snapshot, already written to `file`, the store's.
    pub(super) fn apply_snapshot(
        &mut self,
        meta: &SnapshotMetadata,
        file: String,
    ) -> Result<(), StorageError> {
        if let Err(e) = self.check_newer(meta.index) {
            remove_file(&self.dir, &file);
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

        // One write: the whole log dropped (compacted past its last entry, so the
        // engine holds none and the next append may start right after the snapshot),
        // the snapshot named, the hard and conf state raised to it.
        let mut batch = LogBatch::default();
        batch.add_command(
            GROUP,
            Command::Compact {
                index: meta.index.max(self.last_index()) + 1,
            },
        );
        put_snapshot(&mut batch, meta, &file, point)?;
        put_message(&mut batch, HARD_STATE, &hard_state)?;
        put_message(&mut batch, CONF_STATE, &conf_state)?;
        write_synced(&self.engine, &mut batch, "write the received snapshot")?;
        self.stored_commit = hard_state.commit;

        let old = self.snapshot_file.replace(file);
        self.entries.clear();
        self.snapshot_meta = meta.clone();
        self.compacted = point;
        self.hard_state = hard_state;
        self.conf_state = conf_state;
        self.check_invariants();
        if let Some(old) = old.filter(|old| Some(old) != self.snapshot_file.as_ref()) {
            remove_file(&self.dir, &old);
        }
        Ok(())
    }

    pub(super) fn record_snapshot(
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

        // The compaction point and the engine's compaction are one write: the engine
        // never holds an entry at or below the point (raft-engine drops them from its
        // index at once; their files are purged later, see `DiskStorage::purge`).
        let mut batch = LogBatch::default();
        put_snapshot(&mut batch, &meta, &file, compacted)?;
        if compacted.index > self.compacted.index {
            batch.add_command(
                GROUP,
                Command::Compact {
                    index: compacted.index + 1,
                },
            );
        }
        write_synced(
            &self.engine,
            &mut batch,
            "write the snapshot and compaction point",
        )?;

        let dropped = (compacted.index - self.compacted.index) as usize;
        self.entries.drain(..dropped);
        self.compacted = compacted;
        self.snapshot_meta = meta;
        let old = self.snapshot_file.replace(file);
        self.check_invariants();
        if let Some(old) = old.filter(|old| Some(old) != self.snapshot_file.as_ref()) {
            remove_file(&self.dir, &old);
        }
        Ok(Recorded::Current {
            compacted_index: compacted.index,
        })
    }
}

/// The small records of the meta table, decoded and checked against each other.
struct Records {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot_meta: SnapshotMetadata,
    snapshot_file: Option<String>,
    compacted: Point,
}

impl Records {
    fn read(engine: &Engine) -> Result<Records, StorageError> {
        let required = |name: &'static str| -> Result<Vec<u8>, StorageError> {
            get(engine, name).ok_or(StorageError::Missing {
                key: StoreKey::Meta(name),
            })
        };
        let hard_state: HardState = decode(StoreKey::Meta(HARD_STATE), &required(HARD_STATE)?)?;
        let conf_state: ConfState = decode(StoreKey::Meta(CONF_STATE), &required(CONF_STATE)?)?;
        let snapshot_meta: SnapshotMetadata =
            decode(StoreKey::Meta(SNAPSHOT_META), &required(SNAPSHOT_META)?)?;
        let snapshot_file = match get(engine, SNAPSHOT_FILE) {
            Some(bytes) => Some(String::from_utf8(bytes).map_err(|_| {
                StorageError::Corrupt(format!("{} is not UTF-8", StoreKey::Meta(SNAPSHOT_FILE)))
            })?),
            None => None,
        };
        if snapshot_file.is_some() != (snapshot_meta.index > 0) {
            let has = if snapshot_file.is_some() {
                "has"
            } else {
                "lacks"
            };
            return Err(StorageError::Corrupt(format!(
                "the snapshot at index {} {has} a file",
                snapshot_meta.index
            )));
        }
        let compacted = Point::from_bytes(&required(COMPACTED)?)?;
        if compacted.index > snapshot_meta.index {
            return Err(StorageError::Corrupt(format!(
                "the log is compacted through {} but the snapshot is at {}",
                compacted.index, snapshot_meta.index
            )));
        }
        Ok(Records {
            hard_state,
            conf_state,
            snapshot_meta,
            snapshot_file,
            compacted,
        })
    }
}

/// The entries after `compacted`, checked to start right after it and to run on
/// contiguously. The engine's compaction is written with the compaction point, so it
/// holds no entry at or below it; one that does, or a log starting later, is corrupt.
fn read_entries(engine: &Engine, compacted: Point) -> Result<Vec<Entry>, StorageError> {
    let first_index = compacted.index + 1;
    let (Some(first), Some(last)) = (engine.first_index(GROUP), engine.last_index(GROUP)) else {
        return Ok(Vec::new());
    };
    if first != first_index {
        return Err(StorageError::Corrupt(format!(
            "the log is compacted through {} but its entries start at {first}",
            compacted.index
        )));
    }
    let mut entries = Vec::with_capacity((last + 1 - first) as usize);
    if let Err(e) = engine.fetch_entries_to::<Entries>(GROUP, first, last + 1, None, &mut entries) {
        return Err(entry_error(engine, first..=last, e));
    }
    for (expected, entry) in (first_index..).zip(&entries) {
        if entry.index != expected {
            return Err(StorageError::Corrupt(format!(
                "expected entry {expected}, found entry {}",
                entry.index
            )));
        }
    }
    if entries.len() as u64 != last + 1 - first {
        return Err(StorageError::Corrupt(format!(
            "the log holds entries {first}..={last} but {} were read",
            entries.len()
        )));
    }
    Ok(entries)
}

/// Which entry of `range` could not be read, and why: a reading of the whole range
/// failed with `e`; read one at a time, the first that fails is named.
fn entry_error(
    engine: &Engine,
    range: std::ops::RangeInclusive<u64>,
    e: raft_engine::Error,
) -> StorageError {
    for index in range {
        match engine.get_entry::<Entries>(GROUP, index) {
            Ok(Some(_)) => {}
            Ok(None) => {
                return StorageError::Missing {
                    key: StoreKey::Entry(index),
                }
            }
            Err(raft_engine::Error::Protobuf(source)) => {
                return StorageError::Decode {
                    key: StoreKey::Entry(index),
                    source,
                }
            }
            Err(other) => {
                return StorageError::Engine {
                    op: "read a log entry",
                    source: Box::new(other),
                }
            }
        }
    }
    StorageError::Engine {
        op: "read the log entries",
        source: Box::new(e),
    }
}
