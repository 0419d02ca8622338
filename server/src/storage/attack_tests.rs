//! Damage to the raft-engine directory as an outsider would do it: torn tails, flipped
//! bytes, missing and foreign files. What an acknowledged write must survive, and what
//! must be refused rather than silently dropped or "repaired".

use std::fs;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use raft::Storage;
use tempfile::TempDir;

use super::schema::*;
use super::*;

pub(super) fn entry(index: u64, term: u64, size: usize) -> Entry {
    Entry {
        index,
        term,
        data: Bytes::from(vec![(index % 251) as u8; size]),
        ..Default::default()
    }
}

pub(super) fn hs(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term,
        vote,
        commit,
        ..Default::default()
    }
}

/// The append-queue log files, oldest first.
fn log_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.join(LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raftlog"))
        .collect();
    files.sort();
    files
}

pub(super) fn all_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join(LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// What `kill -9` leaves: the server directory as the running engine has it (the
/// page cache), the engine's LOCK file aside.
pub(super) fn crash_copy(dir: &Path) -> TempDir {
    let copy = TempDir::new().unwrap();
    fs::create_dir(copy.path().join(LOG_DIR)).unwrap();
    for name in all_names(dir) {
        if name != "LOCK" {
            let from = dir.join(LOG_DIR).join(&name);
            fs::copy(from, copy.path().join(LOG_DIR).join(&name)).unwrap();
        }
    }
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
        }
    }
    copy
}

fn flip(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).unwrap();
    bytes[offset] ^= 0x40;
    fs::write(path, bytes).unwrap();
}

/// Ten persists, each with one entry and a new term and vote (as ten elections won by
/// server 2 would write): each an acknowledged, fdatasynced batch.
fn ten_acknowledged_batches(dir: &Path) {
    drop(open_with_ten_batches(dir));
}

/// The store of [`ten_acknowledged_batches`], still open.
pub(super) fn open_with_ten_batches(dir: &Path) -> DiskStorage {
    let store = DiskStorage::open(dir, &[1, 2, 3]).unwrap();
    for i in 1..=10 {
        store
            .persist(&[entry(i, i, 200)], Some(&hs(i, 2, 0)))
            .unwrap();
    }
    store
}

#[test]
fn a_torn_last_batch_is_dropped_and_everything_before_it_survives() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    let files = log_files(dir.path());
    assert_eq!(files.len(), 1, "{files:?}");
    let len = fs::metadata(&files[0]).unwrap().len();
    // A crash mid-append: the last batch only partly on disk.
    fs::OpenOptions::new()
        .write(true)
        .open(&files[0])
        .unwrap()
        .set_len(len - 50)
        .unwrap();
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!(store.last_index(), 9);
    assert_eq!(store.hard_state().term, 9);
}

/// What `kill -9` leaves: the directory as the live engine has it, copied while it
/// runs (the page cache is what a killed process leaves behind). raft-engine
/// preallocates its active file, so zeros follow the last write; they are cut, and
/// every acknowledged write is there. Opened in strict mode without the cut, this copy
/// is refused (the engine reads the zeros as a broken batch).
#[test]
fn a_copy_taken_while_the_engine_runs_opens_with_every_acknowledged_write() {
    let dir = TempDir::new().unwrap();
    let _store = open_with_ten_batches(dir.path());
    let copy = crash_copy(dir.path());
    let live = log_files(copy.path()).pop().unwrap();
    let bytes = fs::read(&live).unwrap();
    assert!(
        bytes.ends_with(&[0; 64]),
        "no preallocated zeros after the last write ({} bytes)",
        bytes.len()
    );
    let reopened = DiskStorage::open_with(copy.path(), None).unwrap().0;
    assert_eq!(reopened.last_index(), 10);
    assert_eq!(reopened.hard_state().term, 10);
    assert!(fs::metadata(&live).unwrap().len() < bytes.len() as u64);
}

/// A second lockd started on a directory whose engine another process has open (the
/// flock on raft-engine's `LOCK`): the live engine's preallocated zeros look like a
/// torn tail, and cutting them while it writes could cut a new acknowledged batch. The
/// start is refused before anything is read or cut.
#[test]
fn a_log_another_process_has_open_is_neither_cut_nor_opened() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    let file = log_files(dir.path()).pop().unwrap();
    let mut bytes = fs::read(&file).unwrap();
    bytes.extend([0; 4096]);
    fs::write(&file, &bytes).unwrap();
    let holder = fs::File::create(dir.path().join(LOG_DIR).join("LOCK")).unwrap();
    holder.lock().unwrap();
    let err = DiskStorage::open_with(dir.path(), None).unwrap_err();
    assert!(err.to_string().contains("another lockd"), "{err}");
    assert_eq!(fs::read(&file).unwrap(), bytes, "cut while locked");
    drop(holder);
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!(store.last_index(), 10);
}

/// A byte flipped in the payload of the 3rd of ten acknowledged batches of the newest
/// file: the seven batches after it were acknowledged (terms, votes, entries) and must
/// not be silently dropped. Damage in an entry's payload is caught by its checksum and
/// refused, and the failed open leaves the file as it was.
#[test]
fn a_flipped_byte_in_an_acknowledged_batch_of_the_newest_file_is_refused() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    let file = log_files(dir.path()).pop().unwrap();
    let before = fs::read(&file).unwrap();
    // Find the 3rd entry's payload (200 bytes of 3) and flip a byte in it.
    let needle = [3u8; 200];
    let at = before.windows(200).position(|w| w == needle).unwrap();
    flip(&file, at + 100);
    let damaged = fs::read(&file).unwrap();
    let result = DiskStorage::open_with(dir.path(), None);
    let after = fs::read(&file).unwrap();
    match result {
        Ok((store, _)) => panic!(
            "opened a damaged log: last index {}, term {} (written: 10, 10); file {} -> {} bytes",
            store.last_index(),
            store.hard_state().term,
            damaged.len(),
            after.len()
        ),
        Err(e) => {
            assert_eq!(
                after, damaged,
                "the damaged file was modified by the failed open"
            );
            eprintln!("refused: {e}");
        }
    }
}

/// The same, anywhere in the middle of the file (batch headers and records included):
/// raft-engine's tail tolerance took such damage for a torn tail and cut the file
/// there, dropping the acknowledged batches after it (term and vote went back: a
/// second vote in a term became possible). Now `tail` sees whole batches after the
/// damage and refuses, leaving the file as it was.
#[test]
fn a_flipped_byte_in_the_middle_of_the_newest_file_is_refused() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    let file = log_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&file).unwrap().len() as usize;
    let mut outcomes = Vec::new();
    // Try a range of offsets in the middle third; every one must be refused.
    for offset in (len / 3..len * 2 / 3).step_by(37) {
        let copy = crash_copy(dir.path());
        flip(&log_files(copy.path()).pop().unwrap(), offset);
        let file = log_files(copy.path()).pop().unwrap();
        let damaged = fs::read(&file).unwrap();
        match DiskStorage::open_with(copy.path(), None) {
            Ok((store, _)) => outcomes.push((offset, store.last_index(), store.hard_state().term)),
            Err(e) => assert_eq!(
                fs::read(&file).unwrap(),
                damaged,
                "refused ({e}) but changed the file"
            ),
        }
    }
    assert!(
        outcomes.is_empty(),
        "opened with acknowledged writes lost (offset, last index, term): {outcomes:?}"
    );
}

/// Enough 1 MiB batches to fill more than one 16 MiB log file.
fn several_files(dir: &Path) -> DiskStorage {
    let store = DiskStorage::open(dir, &[1, 2, 3]).unwrap();
    for i in 1..=40 {
        store
            .persist(&[entry(i, 1, 1 << 20)], Some(&hs(1, 2, 0)))
            .unwrap();
    }
    assert!(log_files(dir).len() >= 2, "{:?}", log_files(dir));
    store
}

#[test]
fn a_deleted_middle_log_file_is_refused_and_nothing_is_deleted() {
    let dir = TempDir::new().unwrap();
    drop(several_files(dir.path()));
    let files = log_files(dir.path());
    eprintln!("files: {files:?}");
    assert!(files.len() >= 3, "need three files: {files:?}");
    fs::remove_file(&files[1]).unwrap();
    let before = all_names(dir.path());
    let result = DiskStorage::open_with(dir.path(), None);
    let after = all_names(dir.path());
    let err = result.expect_err("opened with a log file missing");
    eprintln!("refused: {err}");
    assert!(
        matches!(err, StorageError::LogFileGap { .. }),
        "got {err:?}"
    );
    assert!(err.to_string().contains("missing"), "{err}");
    assert_eq!(before, after, "open deleted files");
    // Nor may a start that would create a log (--bootstrap, --join) take the files
    // after the gap for a store to add to.
    let new = NewLog {
        voters: &[1, 2, 3],
        identity: None,
    };
    let err = DiskStorage::open_with(dir.path(), Some(new)).unwrap_err();
    assert!(
        matches!(err, StorageError::LogFileGap { .. }),
        "got {err:?}"
    );
}

/// A stray log-file-named file with a higher sequence number than the real ones
/// (left by a copy from another server, say): raft-engine treats the gap in sequence
/// numbers as "stale files", drops every file before it, and truncates the stray one.
#[test]
fn a_foreign_log_file_after_a_gap_is_refused_and_the_real_log_is_untouched() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    let real = all_names(dir.path());
    fs::write(
        dir.path().join(LOG_DIR).join("0000000000000099.raftlog"),
        b"not a log file",
    )
    .unwrap();
    let result = DiskStorage::open_with(dir.path(), None);
    let after = all_names(dir.path());
    for name in &real {
        assert!(after.contains(name), "open deleted {name}: now {after:?}");
    }
    match result {
        Ok((store, _)) => panic!(
            "opened: last index {}, term {}",
            store.last_index(),
            store.hard_state().term
        ),
        Err(e) => {
            eprintln!("refused: {e}");
            assert!(matches!(e, StorageError::LogFileGap { .. }), "got {e:?}");
        }
    }
    // Before the check, raft-engine took the stray file for the whole log, found no
    // records, and a start with --bootstrap or --join wrote a brand-new store over the
    // real one: a server forgetting its votes (amnesia).
    let new = NewLog {
        voters: &[1, 2, 3],
        identity: None,
    };
    match DiskStorage::open_with(dir.path(), Some(new)) {
        Ok((store, created)) => panic!(
            "created {created}: a store with last index {} and term {} over one at 10, 10",
            store.last_index(),
            store.hard_state().term
        ),
        Err(e) => assert!(matches!(e, StorageError::LogFileGap { .. }), "got {e:?}"),
    }
    fs::remove_file(dir.path().join(LOG_DIR).join("0000000000000099.raftlog")).unwrap();
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!((store.last_index(), store.hard_state().term), (10, 10));
}

/// A copy of a log file under another name that raft-engine reads as the same
/// sequence number (it parses only the first 16 characters).
#[test]
fn a_duplicate_log_file_sequence_number_is_refused() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    let file = log_files(dir.path()).pop().unwrap();
    fs::copy(
        &file,
        dir.path()
            .join(LOG_DIR)
            .join("0000000000000001-old.raftlog"),
    )
    .unwrap();
    let err = DiskStorage::open_with(dir.path(), None).unwrap_err();
    assert!(
        matches!(err, StorageError::LogFileGap { .. }),
        "got {err:?}"
    );
    assert!(err.to_string().contains("same sequence number"), "{err}");
}

#[test]
fn a_foreign_file_of_another_name_is_ignored() {
    let dir = TempDir::new().unwrap();
    ten_acknowledged_batches(dir.path());
    fs::write(dir.path().join(LOG_DIR).join("notes.txt"), b"hello").unwrap();
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!(store.last_index(), 10);
    assert_eq!(store.hard_state().term, 10);
}

/// A byte flipped in an older (not the newest) log file, inside a batch's entries.
#[test]
fn a_flipped_byte_in_an_older_log_file_is_refused() {
    let dir = TempDir::new().unwrap();
    drop(several_files(dir.path()));
    let files = log_files(dir.path());
    let len = fs::metadata(&files[0]).unwrap().len() as usize;
    flip(&files[0], len / 2);
    let result = DiskStorage::open_with(dir.path(), None);
    match result {
        Ok((store, _)) => {
            let read = store.entries(
                store.first_index(),
                store.last_index() + 1,
                None,
                GetEntriesContext::empty(false),
            );
            panic!(
                "opened: last index {} (written 40); reading the log: {:?}",
                store.last_index(),
                read.map(|e| e.len())
            )
        }
        Err(e) => eprintln!("refused: {e}"),
    }
}

/// A byte flipped in the last batch's entries of an older file: raft-engine checks
/// only each file's last batch's entries block at recovery and, unless in
/// AbsoluteConsistency mode, truncates the file there, whatever file it is.
#[test]
fn a_flipped_byte_in_the_last_batch_of_an_older_log_file_is_refused() {
    let dir = TempDir::new().unwrap();
    drop(several_files(dir.path()));
    let files = log_files(dir.path());
    let before = fs::read(&files[0]).unwrap();
    let len = before.len();
    flip(&files[0], len - 4096);
    let result = DiskStorage::open_with(dir.path(), None);
    let after_len = fs::metadata(&files[0]).unwrap().len() as usize;
    match result {
        Ok((store, _)) => panic!(
            "opened: last index {} (written 40); older file {len} -> {after_len} bytes",
            store.last_index()
        ),
        Err(e) => {
            eprintln!("refused: {e}");
            assert_eq!(after_len, len, "the failed open truncated an older file");
        }
    }
}

/// A follower whose log runs past the leader's snapshot installs it, appends right
/// after it and restarts: the log is the snapshot and the new entries, nothing of the
/// old tail.
#[test]
fn a_snapshot_below_our_last_index_then_appends_survive_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        let old: Vec<Entry> = (1..=20).map(|i| entry(i, 1, 10)).collect();
        store.persist(&old, Some(&hs(1, 2, 5))).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 2;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.set_data(Bytes::from_static(b"state at 10"));
        store.apply_snapshot(&snap).unwrap();
        store
            .persist(&[entry(11, 2, 10), entry(12, 2, 10)], Some(&hs(2, 0, 10)))
            .unwrap();
        assert_eq!(store.last_index(), 12);
    }
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!(store.first_index(), 11);
    assert_eq!(store.last_index(), 12);
    let got = store
        .entries(11, 13, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(got.iter().map(|e| e.term).collect::<Vec<_>>(), vec![2, 2]);
    assert_eq!(
        store.snapshot_data().unwrap().unwrap().get_data(),
        b"state at 10"
    );
}

/// A crash after apply_snapshot wrote its file but before the engine write: the old
/// state must come back and the file be deleted.
#[test]
fn a_crash_between_the_received_snapshot_file_and_its_record_keeps_the_old_log() {
    let dir = TempDir::new().unwrap();
    {
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        let old: Vec<Entry> = (1..=20).map(|i| entry(i, 1, 10)).collect();
        store.persist(&old, Some(&hs(1, 2, 5))).unwrap();
        let mut meta = SnapshotMetadata {
            index: 30,
            term: 2,
            ..Default::default()
        };
        meta.mut_conf_state().voters = vec![1, 2, 3];
        // The file half only.
        snapshot::write_file(dir.path(), &meta, b"state at 30").unwrap();
    }
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!(store.last_index(), 20);
    assert_eq!(store.snapshot_index(), 0);
    assert!(store.snapshot_data().unwrap().is_none());
    let snaps: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with(snapshot::FILE_PREFIX))
        .collect();
    assert!(snaps.is_empty(), "{snaps:?}");
}

/// A new leader's entries overwrite our tail, with a restart after: the overwritten
/// entries must not come back, also when the overwrite is in a later log file than
/// the entries it replaces.
#[test]
fn overwritten_entries_stay_overwritten_across_files_and_reopen() {
    let dir = TempDir::new().unwrap();
    {
        let store = several_files(dir.path());
        // Overwrite from entry 5 (in the first file) with term 2.
        store
            .persist(&[entry(5, 2, 100), entry(6, 2, 100)], Some(&hs(2, 0, 0)))
            .unwrap();
        assert_eq!(store.last_index(), 6);
    }
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    assert_eq!(store.last_index(), 6);
    let got = store
        .entries(1, 7, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(
        got.iter().map(|e| (e.index, e.term)).collect::<Vec<_>>(),
        vec![(1, 1), (2, 1), (3, 1), (4, 1), (5, 2), (6, 2)]
    );
}

/// A term/vote-only change is written (and synced) before persist returns: it is on
/// disk for a raw engine opened right after, without the store being dropped.
#[test]
fn a_term_or_vote_change_alone_is_written_before_persist_returns() {
    let dir = TempDir::new().unwrap();
    let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
    assert!(store.persist(&[], Some(&hs(5, 3, 0))).unwrap());
    let stored: HardState = decode(
        StoreKey::Meta(HARD_STATE),
        &get(&store.engine, HARD_STATE).unwrap(),
    )
    .unwrap();
    assert_eq!((stored.term, stored.vote), (5, 3));
    assert!(!store.persist(&[], Some(&hs(5, 3, 0))).unwrap());
    // A vote change alone within a term (0 -> 3) also writes.
    assert!(store.persist(&[], Some(&hs(6, 0, 0))).unwrap());
    assert!(store.persist(&[], Some(&hs(6, 3, 0))).unwrap());
}

/// After a purge has moved live records (the version, the conf state, the identity:
/// written once, at creation) into the rewrite queue, damage in the newest rewrite
/// file: raft-engine tolerates a damaged tail in the last file of each queue.
#[test]
fn damage_in_the_rewrite_file_after_a_purge_is_refused() {
    let dir = TempDir::new().unwrap();
    {
        let new = NewLog {
            voters: &[1],
            identity: Some(b"server 1 of cluster x"),
        };
        let store = DiskStorage::open_with(dir.path(), Some(new)).unwrap().0;
        for i in 1..=80 {
            store
                .persist(&[entry(i, 1, 1 << 20)], Some(&hs(1, 1, 0)))
                .unwrap();
        }
        store.persist(&[], Some(&hs(2, 1, 80))).unwrap();
        store
            .create_snapshot(80, ConfState::default(), b"at 80", 0)
            .unwrap();
    }
    let rewrite: Vec<PathBuf> = all_names(dir.path())
        .into_iter()
        .filter(|n| n.ends_with(".rewrite"))
        .map(|n| dir.path().join(LOG_DIR).join(n))
        .collect();
    let sizes: Vec<u64> = rewrite
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .collect();
    eprintln!(
        "rewrite files {rewrite:?} sizes {sizes:?}; all {:?}",
        all_names(dir.path())
    );
    let file = rewrite.last().unwrap();
    let len = fs::metadata(file).unwrap().len() as usize;
    let mut accepted = Vec::new();
    let mut truncated = Vec::new();
    for offset in (len / 4..len).step_by(7) {
        let copy = crash_copy(dir.path());
        let damaged = copy.path().join(LOG_DIR).join(file.file_name().unwrap());
        flip(&damaged, offset);
        let result = DiskStorage::open_with(copy.path(), None);
        let after = fs::metadata(&damaged).unwrap().len() as usize;
        if after != len {
            truncated.push((offset, after));
        }
        match result {
            Ok((store, _)) => {
                let got = (
                    store.hard_state().term,
                    store.identity().unwrap(),
                    store.conf_state().voters.clone(),
                );
                // Damage in a byte raft-engine does not read is harmless.
                if got != (2, Some(b"server 1 of cluster x".to_vec()), vec![1]) {
                    accepted.push((offset, got));
                }
            }
            Err(e) => {
                if offset == len / 4 {
                    eprintln!("refused: {e}");
                }
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "accepted (offset, (term, identity, voters)): {accepted:?}"
    );
    // Refused, but raft-engine truncated (and synced) the damaged rewrite file first.
    eprintln!("truncated by a refused open (offset, new length of {len}): {truncated:?}");
}

/// A log whose hard state record is gone (damage, a truncated rewrite file) but whose
/// other records remain is not a new store: a start with --bootstrap or --join must
/// not write fresh records over it (forgetting the term and vote, and deleting the
/// snapshot file as unnamed).
#[test]
fn a_log_with_records_but_no_hard_state_is_not_taken_for_a_new_one() {
    let dir = TempDir::new().unwrap();
    {
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        store.persist(&[], Some(&hs(7, 2, 0))).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 7;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.set_data(Bytes::from_static(b"state at 10"));
        store.apply_snapshot(&snap).unwrap();
        assert_eq!(store.last_index(), 10);
    }
    {
        let engine = Engine::open(engine_config(&dir.path().join(LOG_DIR))).unwrap();
        let mut batch = LogBatch::default();
        batch.delete(GROUP, HARD_STATE.as_bytes().to_vec());
        engine.write(&mut batch, true).unwrap();
    }
    let new = NewLog {
        voters: &[1, 2, 3],
        identity: None,
    };
    match DiskStorage::open_with(dir.path(), Some(new)) {
        Ok((store, created)) => panic!(
            "opened (created {created}): term {}, vote {}, snapshot index {}",
            store.hard_state().term,
            store.hard_state().vote,
            store.snapshot_index()
        ),
        Err(e) => {
            eprintln!("refused: {e}");
            assert!(
                matches!(
                    e,
                    StorageError::Missing {
                        key: StoreKey::Meta(HARD_STATE)
                    }
                ),
                "got {e:?}"
            );
        }
    }
    let err = DiskStorage::open_with(dir.path(), None).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::Missing {
                key: StoreKey::Meta(HARD_STATE)
            }
        ),
        "got {err:?}"
    );
}

/// The snapshot file the log names deleted: open may succeed (it does not read the
/// file), but reading the snapshot, as the server does at start-up, is an error naming
/// the file; and raft-log/ wiped with the snapshot files left is no log at all.
#[test]
fn a_named_snapshot_file_deleted_or_a_wiped_log_is_refused() {
    let dir = TempDir::new().unwrap();
    let file = {
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 7;
        snap.mut_metadata().mut_conf_state().voters = vec![1, 2, 3];
        snap.set_data(Bytes::from_static(b"state at 10"));
        store.apply_snapshot(&snap).unwrap();
        let file = store.read().snapshot_file.clone().unwrap();
        file
    };
    fs::remove_file(dir.path().join(&file)).unwrap();
    let store = DiskStorage::open_with(dir.path(), None).unwrap().0;
    let err = store.snapshot_data().unwrap_err();
    assert!(err.to_string().contains(&file), "{err}");
    drop(store);

    let dir = TempDir::new().unwrap();
    {
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        store
            .create_snapshot(0, ConfState::default(), b"", 0)
            .unwrap_err();
        store
            .persist(&[entry(1, 1, 10)], Some(&hs(1, 1, 1)))
            .unwrap();
        store
            .create_snapshot(1, ConfState::default(), b"state at 1", 0)
            .unwrap();
    }
    fs::remove_dir_all(dir.path().join(LOG_DIR)).unwrap();
    let err = DiskStorage::open_with(dir.path(), None).unwrap_err();
    assert!(matches!(err, StorageError::NoLog { .. }), "got {err:?}");
}

/// A flipped byte in the file header of the newest log file: raft-engine's tail
/// tolerance truncated the whole file to zero bytes and opened with what the older
/// files said (an older hard state came back: the term and vote written since were
/// forgotten). The batches after the header are whole, so it is refused.
#[test]
fn a_flipped_byte_in_the_header_of_the_newest_log_file_is_refused() {
    let dir = TempDir::new().unwrap();
    {
        let store = several_files(dir.path());
        for term in 2..=5 {
            store
                .persist(&[entry(39 + term, term, 100)], Some(&hs(term, 3, 0)))
                .unwrap();
        }
    }
    let newest = log_files(dir.path()).pop().unwrap();
    let len = fs::metadata(&newest).unwrap().len();
    flip(&newest, 5);
    let result = DiskStorage::open_with(dir.path(), None);
    let after = fs::metadata(&newest).unwrap().len();
    match result {
        Ok((store, _)) => panic!(
            "opened: last index {}, term {}, vote {} (written 44, 5, 3); newest file {len} -> {after} bytes",
            store.last_index(),
            store.hard_state().term,
            store.hard_state().vote
        ),
        Err(e) => assert_eq!(after, len, "refused ({e}) but truncated the file"),
    }
}
