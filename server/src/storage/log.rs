//! The in-memory log and its durable mirror: [`Log`] holds the hard and conf state, the
//! snapshot's metadata and the entries after the compaction point, and changes them
//! only after the redb transaction that records the change has committed (fsynced).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use redb::{Database, ReadTransaction, ReadableTable};
use tracing::info;

use super::batch::{decode_batch, encode_batch};
use super::error::{During, StorageError, StoreKey};
use super::schema::*;
use super::snapshot::{read_file, remove_file};
use super::{Recorded, WrittenSnapshot};

/// The in-memory mirror of the database, and the database itself. Between calls, memory
/// equals what is on disk, except the hard state's commit index, which may be ahead
/// (see [`Log::persist`]).
pub(super) struct Log {
    pub(super) db: Database,
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
    /// `compacted.index + 1`.
    pub(super) entries: Vec<Entry>,
    /// The keys of the batches on disk, in order. Leading batches whose entries are all
    /// at or below the compaction point are leftovers, which each `persist` deletes,
    /// `compaction_batch` at a time.
    pub(super) batches: VecDeque<u64>,
    pub(super) compaction_batch: u64,
}

impl Log {
    /// Reads the store's records and the entries after the compaction point, and checks
    /// that they agree with each other.
    pub(super) fn load(db: Database, dir: Arc<PathBuf>) -> Result<Log, StorageError> {
        let txn = db.begin_read().during("begin a read transaction")?;
        let records = Records::read(&txn)?;
        let (entries, batches) = read_entries(&txn, records.compacted)?;
        drop(txn);

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
    /// above the snapshot point; together with `persist` refusing non-contiguous batches
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

    /// Writes `entries` and `hard_state` in one transaction (one fsync) — unless all
    /// that changed is the commit index. That is volatile state in Raft (a restarted
    /// server learns it again from the leader, and what it applies at start-up stops
    /// short of it); etcd likewise syncs only when entries, term or vote change. So a
    /// commit-only change is kept in memory and written with the next transaction,
    /// which halves the fsyncs per entry: every entry's commit would otherwise cost
    /// one more on each server.
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
    pub(super) fn garbage_batches(&self, limit: usize) -> usize {
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

    pub(super) fn set_conf_state(&mut self, cs: &ConfState) -> Result<(), StorageError> {
        let txn = begin_write(&self.db)?;
        put_meta(&txn, CONF_STATE, cs)?;
        txn.commit().during("commit the conf state")?;
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
    fn read(txn: &ReadTransaction) -> Result<Records, StorageError> {
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

/// The entries after `compacted`, checked contiguous, and the keys of every batch on
/// disk. Entries at or below the compaction point are leftovers of an incremental
/// compaction, not yet deleted: skipped here, deleted by the next persists. The batch
/// holding the first entry after the point, and every later one, is read; of the
/// batches before it only the keys are needed.
fn read_entries(
    txn: &ReadTransaction,
    compacted: Point,
) -> Result<(Vec<Entry>, VecDeque<u64>), StorageError> {
    let first_index = compacted.index + 1;
    let table = txn
        .open_table(ENTRY_BATCHES)
        .during("open the entry batches table")?;
    let start = match table
        .range(..=first_index)
        .during("find the first live batch")?
        .next_back()
    {
        Some(item) => item.during("read a batch key")?.0.value(),
        None => 0,
    };
    let mut batches = VecDeque::new();
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
    Ok((entries, batches))
}
