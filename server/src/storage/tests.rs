//! The store's unit tests: durability across reopen, compaction, snapshots and their
//! crash windows, corrupt records and files, the format version.

use std::path::Path;

use bytes::Bytes;
use raft_engine::MessageExt;

use super::schema::*;
use super::*;
use protobuf::Message as _;
use raft::prelude::EntryType;
use raft::{RawNode, Storage};
use tempfile::TempDir;

impl DiskStorage {
    /// Test hook: the indices of every entry the engine holds.
    fn stored_indices(&self) -> Vec<u64> {
        match (
            self.engine.first_index(GROUP),
            self.engine.last_index(GROUP),
        ) {
            (Some(first), Some(last)) => (first..=last).collect(),
            _ => Vec::new(),
        }
    }

    /// Test hook: every entry the engine holds, read back from its files.
    fn stored_entries(&self) -> Vec<Entry> {
        let mut entries = Vec::new();
        if let (Some(first), Some(last)) = (
            self.engine.first_index(GROUP),
            self.engine.last_index(GROUP),
        ) {
            self.engine
                .fetch_entries_to::<Entries>(GROUP, first, last + 1, None, &mut entries)
                .unwrap();
        }
        entries
    }
}

/// The engine of a closed store, opened directly, as damage or another build would
/// write to it.
fn raw_engine(dir: &Path) -> Engine {
    Engine::open(engine_config(&dir.join(LOG_DIR))).unwrap()
}

/// Writes to a closed store's engine directly.
fn raw_write(dir: &Path, edit: impl FnOnce(&mut LogBatch)) {
    let engine = raw_engine(dir);
    let mut batch = LogBatch::default();
    edit(&mut batch);
    engine.write(&mut batch, true).unwrap();
}

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
        let mut on_disk = entries(1..=3, 1);
        on_disk.push(entry(4, 2));
        assert_eq!(
            store.stored_entries(),
            on_disk,
            "the engine cut its tail at 4"
        );
        // Overwriting again from the same index replaces that entry; those before it
        // stay as they are.
        store.persist(&entries(4..=5, 3), None).unwrap();
        on_disk.truncate(3);
        on_disk.extend(entries(4..=5, 3));
        assert_eq!(store.stored_entries(), on_disk);
    }
    let store = DiskStorage::open(dir.path(), &[1]).unwrap();
    let mut expected = entries(1..=3, 1);
    expected.extend(entries(4..=5, 3));
    assert_eq!(all_entries(&store), expected);
    assert_eq!(store.last_index(), 5);
}

#[test]
fn compacted_entries_leave_the_engine_in_the_write_that_moves_the_compaction_point() {
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
        // No later write is needed: the engine already holds only 16..=20.
        assert_eq!(store.stored_indices(), (16..=20).collect::<Vec<_>>());
    }
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(store.first_index(), 16);
    assert_eq!(all_entries(&store), entries(16..=20, 1));
    store
        .create_snapshot(20, voters(&[1]), b"at 20", 0)
        .unwrap();
    assert_eq!(store.stored_indices(), Vec::<u64>::new());
    assert_eq!(store.first_index(), 21);
    // The next entry follows the compaction point in an engine without entries.
    store.persist(&entries(21..=21, 1), None).unwrap();
    assert_eq!(store.stored_indices(), vec![21]);
    drop(store);
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(all_entries(&store), entries(21..=21, 1));
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

/// Writes `SnapshotMetadata` where entries belong: bytes that do not decode as an
/// `Entry` (its field 1 is a message, an entry's an enum).
struct NotEntries;

impl MessageExt for NotEntries {
    type Entry = SnapshotMetadata;

    fn index(e: &SnapshotMetadata) -> u64 {
        e.index
    }
}

#[test]
fn a_corrupt_record_is_an_error_naming_its_key() {
    let dir = TempDir::new().unwrap();
    {
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        store.persist(&entries(1..=3, 1), None).unwrap();
        store.persist(&entries(4..=6, 1), None).unwrap();
    }
    let mut not_an_entry = SnapshotMetadata {
        index: 4,
        ..Default::default()
    };
    not_an_entry.set_conf_state(voters(&[1]));
    raw_write(dir.path(), |batch| {
        batch
            .add_entries::<NotEntries>(GROUP, &[not_an_entry])
            .unwrap();
    });
    let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Decode {
                key: StoreKey::Entry(4),
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(err.to_string().contains("entry 4"), "{err}");

    raw_write(dir.path(), |batch| {
        batch
            .put(
                GROUP,
                HARD_STATE.as_bytes().to_vec(),
                vec![0xff, 0xff, 0xff],
            )
            .unwrap();
    });
    let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Decode {
                key: StoreKey::Meta(HARD_STATE),
                ..
            }
        ),
        "got {err:?}"
    );
    assert!(err.to_string().contains("record hard_state"), "{err}");
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
    // Entries 1..=3 gone without the compaction point moving.
    raw_write(dir.path(), |batch| {
        batch.add_command(GROUP, raft_engine::Command::Compact { index: 4 });
    });
    let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
    assert!(matches!(err, StorageError::Corrupt(_)), "got {err:?}");
    assert!(err.to_string().contains("start at 4"), "{err}");
}

fn snapshot_files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(snapshot::FILE_PREFIX))
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
        assert!(applied
            .iter()
            .any(|e| e.get_entry_type() == EntryType::EntryNormal && e.get_data() == b"acquire"));
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
fn record_snapshot_drops_compacted_entries_from_memory_and_the_engine_at_once() {
    let dir = TempDir::new().unwrap();
    let store = store_with_twenty_entries(dir.path());
    store
        .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
        .unwrap();
    assert_eq!(store.first_index(), 11);
    assert_eq!(all_entries(&store), entries(11..=20, 2));
    assert_eq!(store.stored_indices(), (11..=20).collect::<Vec<_>>());
    assert_eq!(store.stored_entries(), entries(11..=20, 2));

    // Writes go on after the point; a commit-only change writes nothing.
    store.set_commit(19).unwrap();
    next_term(&store);
    store.persist(&entries(21..=21, 2), None).unwrap();
    store.persist(&[], Some(&hard_state(4, 2, 19))).unwrap();
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
    assert_eq!(store.hard_state(), hard_state(4, 2, 19));
}

/// The size of the engine's live log files (not counting files kept for reuse).
fn used_bytes(store: &DiskStorage) -> usize {
    store.engine.get_used_size()
}

#[test]
fn the_purge_after_a_snapshot_frees_the_files_of_compacted_entries() {
    let dir = TempDir::new().unwrap();
    let store = DiskStorage::open(dir.path(), &[1]).unwrap();
    // Past the purge threshold in entries of 1 MiB.
    let payload = Bytes::from(vec![7_u8; 1024 * 1024]);
    let n = 80;
    for index in 1..=n {
        let big = Entry {
            index,
            term: 1,
            data: payload.clone(),
            ..Default::default()
        };
        store.persist(&[big], None).unwrap();
    }
    store.persist(&[], Some(&hard_state(1, 1, n))).unwrap();
    let before = used_bytes(&store);
    assert!(before > 64 * 1024 * 1024, "{before} bytes");
    store.create_snapshot(n, voters(&[1]), b"", 0).unwrap();
    // What is left: the newest files, up to raft-engine's purge watermark.
    let after = used_bytes(&store);
    assert!(after <= 2 * 16 * 1024 * 1024 + 1024 * 1024, "{after} bytes");
    assert!(
        before - after >= 32 * 1024 * 1024,
        "{before} -> {after} bytes"
    );
    assert_eq!(store.stored_indices(), Vec::<u64>::new());
    assert_eq!(store.first_index(), n + 1);
    assert_eq!(store.last_index(), n);

    // The records the purge moved out of the old files are all still there.
    store.persist(&entries(n + 1..=n + 1, 1), None).unwrap();
    drop(store);
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(store.hard_state(), hard_state(1, 1, n));
    assert_eq!(store.conf_state(), voters(&[1]));
    assert_eq!(store.snapshot_index(), n);
    assert_eq!(all_entries(&store), entries(n + 1..=n + 1, 1));
}

#[test]
fn reopening_after_compaction_serves_the_log_from_the_compaction_point() {
    let dir = TempDir::new().unwrap();
    {
        let store = store_with_twenty_entries(dir.path());
        store
            .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
            .unwrap();
        // A crash right after the compaction point moved.
    }
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(store.stored_indices(), (11..=20).collect::<Vec<_>>());
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

    // Reopened again after more writes.
    for _ in 0..5 {
        next_term(&store);
    }
    drop(store);
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(all_entries(&store), entries(11..=20, 2));
    assert_eq!(store.hard_state(), hard_state(7, 1, 18));
}

#[test]
fn a_truncation_after_a_compaction_keeps_the_entries_before_it() {
    let dir = TempDir::new().unwrap();
    let store = store_with_twenty_entries(dir.path());
    store
        .create_snapshot(15, voters(&[1, 2, 3]), b"at 15", 5)
        .unwrap();
    // A new leader overwrites the uncommitted tail from 19 on.
    store.persist(&entries(19..=19, 3), None).unwrap();
    assert_eq!(store.stored_indices(), (11..=19).collect::<Vec<_>>());
    let mut expected = entries(11..=18, 2);
    expected.push(entry(19, 3));
    assert_eq!(all_entries(&store), expected);
    assert_eq!(store.stored_entries(), expected);
    drop(store);
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(all_entries(&store), expected);
}

#[test]
fn a_snapshot_from_the_leader_drops_every_entry_in_the_same_write() {
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

    // A leader's snapshot below our last entry drops the entries after it too: they
    // may not be the leader's.
    let dir = TempDir::new().unwrap();
    let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
    store
        .persist(&entries(1..=20, 2), Some(&hard_state(2, 1, 10)))
        .unwrap();
    snap.mut_metadata().index = 12;
    snap.mut_metadata().term = 3;
    snap.set_data(Bytes::from_static(b"at 12"));
    store.apply_snapshot(&snap).unwrap();
    assert_eq!(store.stored_indices(), Vec::<u64>::new());
    assert_eq!((store.first_index(), store.last_index()), (13, 12));
    store.persist(&entries(13..=14, 3), None).unwrap();
    drop(store);
    let store = DiskStorage::open(dir.path(), &[]).unwrap();
    assert_eq!(all_entries(&store), entries(13..=14, 3));
    assert_eq!(store.hard_state(), hard_state(3, 1, 12));
}

// ---- the format version ----

fn version_record(dir: &Path, version: Option<u32>) {
    raw_write(dir, |batch| match version {
        Some(v) => batch
            .put(GROUP, VERSION.as_bytes().to_vec(), v.to_le_bytes().to_vec())
            .unwrap(),
        None => batch.delete(GROUP, VERSION.as_bytes().to_vec()),
    });
}

#[test]
fn a_new_store_records_format_version_2() {
    let dir = TempDir::new().unwrap();
    drop(DiskStorage::open(dir.path(), &[1]).unwrap());
    let version = raw_engine(dir.path())
        .get(GROUP, VERSION.as_bytes())
        .unwrap();
    assert_eq!(version, 2u32.to_le_bytes());
}

#[test]
fn a_store_without_a_version_record_is_refused_naming_the_reason() {
    let dir = TempDir::new().unwrap();
    drop(DiskStorage::open(dir.path(), &[1]).unwrap());
    version_record(dir.path(), None);
    let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
    assert!(
        matches!(err, StorageError::Format { found: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("no version record"), "{err}");
}

#[test]
fn a_store_of_another_format_version_is_refused_and_left_as_it_was() {
    let dir = TempDir::new().unwrap();
    {
        let store = DiskStorage::open(dir.path(), &[1]).unwrap();
        store.persist(&entries(1..=3, 1), None).unwrap();
    }
    version_record(dir.path(), Some(3));
    let err = DiskStorage::open(dir.path(), &[1]).unwrap_err();
    assert!(
        matches!(err, StorageError::Format { found: Some(3), .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("version 3"), "{err}");
    // Put back, the store opens with its log intact: the refusal wrote nothing.
    version_record(dir.path(), Some(2));
    let store = DiskStorage::open(dir.path(), &[1]).unwrap();
    assert_eq!(all_entries(&store), entries(1..=3, 1));
}

#[test]
fn a_format_1_store_is_refused_and_not_migrated() {
    let dir = TempDir::new().unwrap();
    std::fs::write(dir.path().join("raft.redb"), b"a redb database").unwrap();
    for new in [None, Some(&[1_u64][..])] {
        let new = new.map(|voters| NewLog {
            voters,
            identity: None,
        });
        let err = DiskStorage::open_with(dir.path(), new).unwrap_err();
        assert!(matches!(err, StorageError::RedbLayout { .. }), "{err:?}");
        assert!(err.to_string().contains("format 1"), "{err}");
    }
    assert!(!dir.path().join(LOG_DIR).exists(), "nothing was created");
}

#[test]
fn a_directory_without_a_log_is_refused_without_creating_one() {
    let dir = TempDir::new().unwrap();
    let err = DiskStorage::open_with(dir.path(), None).unwrap_err();
    assert!(matches!(err, StorageError::NoLog { .. }), "{err:?}");
    assert!(!dir.path().join(LOG_DIR).exists());
}

// ---- the snapshot format's rules ----

mod snapshot_rules {
    use std::collections::BTreeMap;

    use super::super::snapshot::*;
    use crate::state::State;

    fn head() -> SnapshotHead {
        SnapshotHead {
            index: 40,
            term: 3,
            voters: vec![1, 2, 3],
            learners: vec![],
            cluster: Some(ClusterName {
                name: "alpha".into(),
                id: 7,
            }),
        }
    }

    fn body(uid: u64) -> Vec<u8> {
        let addrs = BTreeMap::from([(1, "127.0.0.1:7001".to_string())]);
        encode_snapshot(uid, &addrs, &State::new().freeze(), 1)
    }

    /// A file around `head` and `body` with a correct header and CRC: only the rule
    /// under test is broken.
    fn file(head: &SnapshotHead, body: &[u8]) -> Vec<u8> {
        encode_file(head, body)
    }

    fn rule(bytes: &[u8]) -> Rule {
        let err = decode_backup(bytes).expect_err("a broken snapshot");
        assert!(
            err.to_string()
                .starts_with(&format!("the {} check failed", err.rule)),
            "{err}"
        );
        err.rule
    }

    #[test]
    fn a_good_backup_decodes_with_everything_it_holds() {
        let backup = decode_backup(&file(&head(), &body(9))).unwrap();
        assert_eq!(backup.head, head());
        assert_eq!(backup.uid, 9);
        assert_eq!(backup.cluster.name, "alpha");
        assert_eq!(backup.state.last_token(), 0);
    }

    #[test]
    fn a_file_without_the_magic_breaks_the_magic_rule() {
        let mut bytes = file(&head(), &body(9));
        bytes[0] ^= 1;
        assert_eq!(rule(&bytes), Rule::Magic);
        assert_eq!(rule(b"{\"json\": true}"), Rule::Magic);
        assert_eq!(rule(b""), Rule::Magic);
    }

    #[test]
    fn another_format_version_breaks_the_version_rule() {
        let mut bytes = file(&head(), &body(9));
        bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(rule(&bytes), Rule::Version);
    }

    #[test]
    fn a_truncated_or_padded_file_breaks_the_length_rule() {
        let bytes = file(&head(), &body(9));
        for cut in [10, HEADER_BYTES - 1, HEADER_BYTES + 3, bytes.len() - 1] {
            assert_eq!(rule(&bytes[..cut]), Rule::Length, "cut at {cut}");
        }
        let mut padded = bytes.clone();
        padded.push(0);
        assert_eq!(rule(&padded), Rule::Length);
    }

    #[test]
    fn a_damaged_byte_breaks_the_crc_rule() {
        let mut bytes = file(&head(), &body(9));
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        assert_eq!(rule(&bytes), Rule::Crc);
    }

    #[test]
    fn an_undecodable_head_breaks_the_head_rule() {
        let head = [0xff_u8; 3];
        let body = body(9);
        let mut bytes = header(&head, &body).to_vec();
        bytes.extend_from_slice(&head);
        bytes.extend_from_slice(&body);
        assert_eq!(rule(&bytes), Rule::Head);
    }

    #[test]
    fn a_missing_index_cluster_or_uid_breaks_the_identity_rule() {
        let mut no_index = head();
        no_index.index = 0;
        assert_eq!(rule(&file(&no_index, &body(9))), Rule::Identity);
        let mut own_file = head();
        own_file.cluster = None;
        assert_eq!(rule(&file(&own_file, &body(9))), Rule::Identity);
        assert_eq!(rule(&file(&head(), &body(0))), Rule::Identity);
    }

    #[test]
    fn an_impossible_configuration_breaks_the_membership_rule() {
        for (voters, learners) in [
            (vec![], vec![4]),
            (vec![1, 2], vec![2]),
            (vec![0, 1], vec![]),
        ] {
            let mut bad = head();
            bad.voters = voters;
            bad.learners = learners;
            assert_eq!(rule(&file(&bad, &body(9))), Rule::Membership);
        }
        let addrs = BTreeMap::from([(0, "127.0.0.1:7001".to_string())]);
        let body = encode_snapshot(9, &addrs, &State::new().freeze(), 1);
        assert_eq!(rule(&file(&head(), &body)), Rule::Membership);
    }

    #[test]
    fn a_lock_table_that_does_not_decode_breaks_the_table_rule() {
        let mut body = body(9);
        body.extend_from_slice(&[0xff; 5]);
        assert_eq!(rule(&file(&head(), &body)), Rule::Table);
    }
}
