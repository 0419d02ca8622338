//! The end of raft-engine's newest log files, checked before the engine opens them:
//! a torn last write is cut off here, damage to acknowledged writes refuses the open.
//!
//! raft-engine opens lockd's log with `RecoveryMode::AbsoluteConsistency`, so it never
//! truncates anything itself. Its `TolerateTailCorruption` cuts the newest file at the
//! first batch it cannot read, whatever follows: a byte flipped in the header of the
//! 3rd of ten acknowledged batches dropped the other eight, and with them the term and
//! vote they recorded (a second vote in one term; `attack_tests.rs`). Here the rule is
//! the one that makes a cut safe: only what was never acknowledged may go. A write is
//! acknowledged after its fdatasync, and one persist is one batch, so a crash can leave
//! at most the last batch partly written, followed by nothing readable. The bytes after
//! the last whole batch are therefore cut only if no whole batch starts anywhere among
//! them; if one does, acknowledged writes follow the damage and the open is refused
//! ([`StorageError::DamagedLog`]), with every file left as it was.
//!
//! Also cut by the same rule: the zeros raft-engine preallocates past the end of its
//! active file (left there by a crash or `kill -9`), and, in a recycled file (logs of
//! builds before recycling was turned off, see `schema::engine_config`), the stale
//! batches of the file it used to be, which carry the old file's signature and so
//! never read as whole batches of this one.
//!
//! Limits, both refusing rather than losing: payload bytes are written verbatim (lock
//! names and values are arbitrary), so a torn write whose payload holds a well-formed
//! batch signed for this file is refused like damage (`tail_attack_tests.rs`, the
//! ignored test); and the search checksums at most [`SCAN_BUDGET_BYTES`], past which
//! batch-shaped headers make it refuse ([`Tail::Undecided`]). Damage inside the very
//! last batch cannot be told from a torn write and is cut like one.
//!
//! raft-engine 0.4's file format (its `file_pipe_log/format.rs` and `log_batch.rs`):
//! a file header (magic, a big-endian u64 version, and for version 2 a big-endian u64
//! alignment), then batches. A batch is a 16-byte header (big-endian u64
//! `length << 8 | compression`, big-endian u64 offset of its items from the batch
//! start), the entries block and its little-endian CRC-32 (absent when the batch has no
//! entries), then the items and their little-endian CRC-32, XORed for version 2 with
//! the file's sequence number (the "signature" that makes a recycled file's stale
//! batches unreadable).

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::error::StorageError;

const MAGIC: &[u8] = b"RAFT-LOG-FILE-HEADER-9986AB3E47F320B394C8E84916EB0ED5";
const BATCH_HEADER_LEN: usize = 16;
const CHECKSUM_LEN: usize = 4;

/// What the newest file of a queue holds after its last whole batch.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Tail {
    /// Nothing: the file ends with its header or a whole batch.
    Clean,
    /// Bytes in which no whole batch starts: a write that never returned, zeros
    /// preallocated by the engine, or stale batches of a recycled file. The file is
    /// cut at `valid_len` (0: its header is unreadable too, the file holds nothing).
    Torn { valid_len: u64, zeros: bool },
    /// A whole batch starts after the unreadable bytes at `offset`: acknowledged writes
    /// follow damage.
    Damaged { offset: u64 },
    /// Too many batch-shaped headers after the unreadable bytes at `offset` to check
    /// them all within [`SCAN_BUDGET_BYTES`]: refused like damage.
    Undecided { offset: u64 },
}

/// A file's header: its length and the signature its batches' item checksums carry.
struct FileHeader {
    len: usize,
    signature: Option<u32>,
}

fn be_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn le_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().ok()?))
}

/// The header of a file with sequence number `seq`, if it is one raft-engine wrote
/// without alignment padding (lockd does not use direct I/O).
fn file_header(buf: &[u8], seq: u64) -> Option<FileHeader> {
    if !buf.starts_with(MAGIC) {
        return None;
    }
    match be_u64(buf, MAGIC.len())? {
        1 => Some(FileHeader {
            len: MAGIC.len() + 8,
            signature: None,
        }),
        2 if be_u64(buf, MAGIC.len() + 8)? == 0 => Some(FileHeader {
            len: MAGIC.len() + 16,
            signature: Some(seq as u32),
        }),
        _ => None,
    }
}

/// Whether `block` ends with the little-endian CRC-32 of the rest, XORed with
/// `signature`. The rest must not be empty: raft-engine refuses a block of only a
/// checksum ("content too short"), and the CRC-32 of nothing is 0, so any four bytes
/// equal to the signature would pass.
fn checksum_ok(block: &[u8], signature: Option<u32>) -> bool {
    let body_len = match block.len().checked_sub(CHECKSUM_LEN) {
        Some(n) if n > 0 => n,
        _ => return false,
    };
    let Some(stored) = le_u32(block, body_len) else {
        return false;
    };
    crc32fast::hash(&block[..body_len]) == stored ^ signature.unwrap_or(0)
}

/// The length of the batch whose header is at `at`, if that header is consistent and
/// the batch inside the file; its checksums are not read.
fn batch_len_at(buf: &[u8], at: usize) -> Option<(usize, usize)> {
    let len_and_type = be_u64(buf, at)?;
    let items_offset = usize::try_from(be_u64(buf, at + 8)?).ok()?;
    let len = usize::try_from(len_and_type >> 8).ok()?;
    let compression = len_and_type & 0xff;
    if compression > 1 || items_offset < BATCH_HEADER_LEN || items_offset > len {
        return None;
    }
    at.checked_add(len).filter(|&end| end <= buf.len())?;
    Some((len, items_offset))
}

/// Whether the batch at `at` of `len` bytes, items at `items_offset`, has its entries
/// and items checksums right.
fn checksums_ok(
    buf: &[u8],
    at: usize,
    (len, items_offset): (usize, usize),
    signature: Option<u32>,
) -> bool {
    let batch = &buf[at..at + len];
    let entries = &batch[BATCH_HEADER_LEN..items_offset];
    let entries_ok = entries.is_empty() || checksum_ok(entries, None);
    entries_ok && checksum_ok(&batch[items_offset..], signature)
}

/// The length of the whole batch at `at`, if one starts there: its header consistent
/// and inside the file, its entries and items checksums right.
fn batch_at(buf: &[u8], at: usize, signature: Option<u32>) -> Option<usize> {
    let shape = batch_len_at(buf, at)?;
    checksums_ok(buf, at, shape, signature).then_some(shape.0)
}

/// Bytes the search for a whole batch after the cut may checksum: 1 GiB, a fraction of
/// a second of CRC-32. Each consistent header costs a checksum over the batch it
/// claims, so bytes shaped like headers claiming to run to the end of the file (lock
/// names and values are arbitrary bytes) inside a torn write would make the search
/// quadratic; past this budget the open is refused instead ([`Tail::Undecided`]).
const SCAN_BUDGET_BYTES: usize = 1 << 30;

/// Reads the whole batches of `buf` (the file with sequence number `seq`) from its
/// header on, and says what follows the last one.
pub(super) fn inspect(buf: &[u8], seq: u64) -> Tail {
    inspect_within(buf, seq, SCAN_BUDGET_BYTES)
}

/// [`inspect`], checksumming at most `budget` bytes in the search after the cut.
pub(super) fn inspect_within(buf: &[u8], seq: u64, mut budget: usize) -> Tail {
    let header = file_header(buf, seq);
    let mut at = 0;
    if let Some(h) = &header {
        at = h.len;
        while let Some(len) = batch_at(buf, at, h.signature) {
            at += len;
        }
        if at == buf.len() {
            return Tail::Clean;
        }
    }
    // Which signatures a whole batch after the cut may carry: the header's, or, with
    // the header unreadable, either version's.
    let signatures: &[Option<u32>] = match &header {
        Some(h) => &[h.signature][..],
        None => &[None, Some(seq as u32)][..],
    };
    for start in at + 1..buf.len() {
        let Some(shape) = batch_len_at(buf, start) else {
            continue;
        };
        for &signature in signatures {
            let Some(left) = budget.checked_sub(shape.0) else {
                return Tail::Undecided { offset: at as u64 };
            };
            budget = left;
            if checksums_ok(buf, start, shape, signature) {
                return Tail::Damaged { offset: at as u64 };
            }
        }
    }
    Tail::Torn {
        valid_len: at as u64,
        zeros: buf[at..].iter().all(|&b| b == 0),
    }
}

/// Checks the newest file of each queue of the log in `dir` (`newest`: paths with
/// their sequence numbers) and cuts each torn tail: to the last whole batch, or, when
/// even the file's header is unreadable, by removing the file. Nothing is changed
/// unless every file passes; a damaged one is [`StorageError::DamagedLog`]. Holds
/// raft-engine's own lock on the directory (`LOCK`, flock) meanwhile, so the files of
/// an engine that another process has open (a second lockd started on the same
/// directory) are never read half-written nor cut: that is refused.
pub(super) fn cut_torn_tails(dir: &Path, newest: &[(PathBuf, u64)]) -> Result<(), StorageError> {
    let lock_path = dir.join("LOCK");
    let lock = File::create(&lock_path).map_err(|e| open_error(&lock_path, e))?;
    lock.try_lock().map_err(|e| {
        let e = match e {
            TryLockError::WouldBlock => std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "another process holds this lock: is another lockd running on this directory?",
            ),
            TryLockError::Error(e) => e,
        };
        open_error(&lock_path, e)
    })?;
    let mut cuts = Vec::new();
    for (file, seq) in newest {
        let buf = std::fs::read(file).map_err(|e| open_error(file, e))?;
        match inspect(&buf, *seq) {
            Tail::Clean => {}
            Tail::Damaged { offset } => return Err(damaged(file, offset, &buf, FOLLOWED)),
            Tail::Undecided { offset } => return Err(damaged(file, offset, &buf, UNDECIDED)),
            Tail::Torn { valid_len, zeros } => {
                cuts.push((file, buf.len() as u64, valid_len, zeros))
            }
        }
    }
    for (file, len, valid_len, zeros) in cuts {
        cut(file, valid_len).map_err(|e| open_error(file, e))?;
        let dropped = len - valid_len;
        if zeros {
            info!(file = %file.display(), valid_len, dropped, "dropped preallocated zeros after the last write");
        } else {
            warn!(
                file = %file.display(),
                valid_len,
                dropped,
                "dropped a torn last write (a crash during a write that was never acknowledged)"
            );
        }
    }
    Ok(())
}

/// Truncates `file` to `len` (removes it at 0) and makes that durable.
fn cut(file: &Path, len: u64) -> std::io::Result<()> {
    if len == 0 {
        std::fs::remove_file(file)?;
    } else {
        let f = OpenOptions::new().write(true).open(file)?;
        f.set_len(len)?;
        f.sync_all()?;
    }
    match file.parent() {
        Some(dir) => File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

const FOLLOWED: &str = "whole batches written and acknowledged after it follow";
const UNDECIDED: &str =
    "what follows holds too many batch-shaped headers to tell a torn write from damage";

fn damaged(file: &Path, offset: u64, buf: &[u8], after: &'static str) -> StorageError {
    StorageError::DamagedLog {
        file: file.to_owned(),
        offset,
        len: buf.len() as u64,
        after,
    }
}

fn open_error(file: &Path, e: std::io::Error) -> StorageError {
    StorageError::Open {
        path: file.to_owned(),
        source: Box::new(raft_engine::Error::Io(e)),
    }
}

#[cfg(test)]
#[path = "tail_tests.rs"]
mod tests;
