//! The tail rule on real raft-engine files: at every offset, damage before the last
//! batch is refused and damage inside it is a torn write; batches signed for another
//! file are stale; zeros are preallocation.

use std::fs;
use std::path::PathBuf;

use raft::prelude::{Entry, HardState};
use tempfile::TempDir;

use super::super::schema::LOG_DIR;
use super::super::DiskStorage;
use super::*;

/// A newest log file holding ten acknowledged batches (one persist each), its sequence
/// number, and where each batch ends, learnt from the file's length after each persist
/// with the engine closed (which cuts its preallocated space), not from the parser
/// under test.
struct TenBatches {
    _dir: TempDir,
    bytes: Vec<u8>,
    seq: u64,
    ends: Vec<usize>,
}

fn ten_batches() -> TenBatches {
    let dir = TempDir::new().unwrap();
    let mut ends = Vec::new();
    for i in 1..=10u64 {
        let store = DiskStorage::open(dir.path(), &[1, 2, 3]).unwrap();
        let entry = Entry {
            index: i,
            term: i,
            data: vec![i as u8; 100].into(),
            ..Default::default()
        };
        let hs = HardState {
            term: i,
            vote: 2,
            ..Default::default()
        };
        store.persist(&[entry], Some(&hs)).unwrap();
        drop(store);
        ends.push(fs::metadata(newest(&dir)).unwrap().len() as usize);
    }
    let file = newest(&dir);
    let name = file.file_name().unwrap().to_str().unwrap();
    let seq = name[..16].parse().unwrap();
    TenBatches {
        bytes: fs::read(&file).unwrap(),
        _dir: dir,
        seq,
        ends,
    }
}

fn newest(dir: &TempDir) -> PathBuf {
    let mut files: Vec<PathBuf> = fs::read_dir(dir.path().join(LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "raftlog"))
        .collect();
    files.sort();
    files.pop().unwrap()
}

#[test]
fn an_intact_file_is_clean() {
    let t = ten_batches();
    assert_eq!(inspect(&t.bytes, t.seq), Tail::Clean);
    for &end in &t.ends {
        assert_eq!(inspect(&t.bytes[..end], t.seq), Tail::Clean, "cut at {end}");
    }
}

/// Every byte of the file flipped in turn: before the last batch (file header
/// included) it is damage with acknowledged batches after it; inside the last batch it
/// cannot be told from a write torn by a crash, and only that batch is cut.
#[test]
fn every_flipped_byte_before_the_last_batch_is_damage_and_inside_it_a_torn_write() {
    let t = ten_batches();
    let last_start = t.ends[8];
    for offset in 0..t.bytes.len() {
        let mut bytes = t.bytes.clone();
        bytes[offset] ^= 0x40;
        let tail = inspect(&bytes, t.seq);
        if offset < last_start {
            assert!(
                matches!(tail, Tail::Damaged { offset: at } if at as usize <= offset),
                "flip at {offset} (last batch at {last_start}): {tail:?}"
            );
        } else {
            assert_eq!(
                tail,
                Tail::Torn {
                    valid_len: last_start as u64,
                    zeros: false
                },
                "flip at {offset}"
            );
        }
    }
}

#[test]
fn every_cut_inside_the_last_batch_is_a_torn_write() {
    let t = ten_batches();
    let last_start = t.ends[8];
    for len in last_start + 1..t.bytes.len() {
        let tail = inspect(&t.bytes[..len], t.seq);
        assert!(
            matches!(tail, Tail::Torn { valid_len, .. } if valid_len == last_start as u64),
            "cut at {len}: {tail:?}"
        );
    }
}

#[test]
fn zeros_after_the_last_batch_are_preallocated_space() {
    let t = ten_batches();
    let mut bytes = t.bytes.clone();
    bytes.extend(std::iter::repeat_n(0, 4096));
    assert_eq!(
        inspect(&bytes, t.seq),
        Tail::Torn {
            valid_len: t.bytes.len() as u64,
            zeros: true
        }
    );
}

/// A recycled file keeps the batches of the file it was; they carry that file's
/// signature, so read as this file's they are no whole batches.
#[test]
fn batches_signed_for_another_file_are_stale_not_whole() {
    let t = ten_batches();
    let header_len = MAGIC.len() + 16;
    assert_eq!(
        inspect(&t.bytes, t.seq + 1),
        Tail::Torn {
            valid_len: header_len as u64,
            zeros: false
        }
    );
}

/// A file whose header never got to the disk whole holds nothing acknowledged.
#[test]
fn a_file_with_a_torn_header_and_no_batch_holds_nothing() {
    let t = ten_batches();
    for len in [0, 1, MAGIC.len(), MAGIC.len() + 12] {
        assert!(
            matches!(
                inspect(&t.bytes[..len], t.seq),
                Tail::Torn { valid_len: 0, .. }
            ),
            "header cut at {len}"
        );
    }
}
