//! The layout of a server's Raft store (`<dir>/raft-log/`, one raft-engine `Engine`):
//! the one Raft group it holds, its records (raft-engine key-values), the format version
//! checked at open, the engine's settings, and how a new store is created. Knows nothing
//! of the in-memory log or of snapshot contents.

use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use raft_engine::{Config, Engine, LogBatch, MessageExt, ReadableSize, RecoveryMode};
use tracing::info;

use super::error::{OnEngine, StorageError, StoreKey};
use super::NewLog;

/// The directory of the log inside a server's directory.
pub(super) const LOG_DIR: &str = "raft-log";

/// The database file of format 1 (redb), refused at open: never migrated.
pub(super) const REDB_FILE: &str = "raft.redb";

/// raft-engine is a multi-Raft store; lockd has one Raft group, this one.
pub(super) const GROUP: u64 = 1;

/// The records: raft-engine key-values of [`GROUP`], written in the same `LogBatch`
/// (hence atomically, with one fdatasync) as the entries they go with.
/// Protobuf `HardState`.
pub(super) const HARD_STATE: &str = "hard_state";
/// Protobuf `ConfState`.
pub(super) const CONF_STATE: &str = "conf_state";
/// Protobuf `SnapshotMetadata` of the current snapshot; index 0 = none.
pub(super) const SNAPSHOT_META: &str = "snapshot_meta";
/// UTF-8 name of the current snapshot's file in the server's directory.
pub(super) const SNAPSHOT_FILE: &str = "snapshot_file";
/// The compaction point: index and term of the last entry dropped from the log, two
/// little-endian u64s.
pub(super) const COMPACTED: &str = "compacted";
/// The identity record: opaque bytes whose meaning is the driver's (who the log
/// belongs to), written with the log.
pub(super) const IDENTITY: &str = "identity";
/// The on-disk format's version, a little-endian u32: [`FORMAT_VERSION`]. Written with
/// the log and checked at every open, so a store of another format is refused with a
/// clear error instead of being misread.
pub(super) const VERSION: &str = "format_version";

/// The version of the layout this module writes: the records above in a raft-engine
/// directory, entries as raft-engine stores them, snapshot files as
/// [`super::snapshot`] does. Version 1 was a redb database (`raft.redb`). Bump it with
/// any change a previous build would misread (and teach `open` the old one, or refuse
/// it).
pub const FORMAT_VERSION: u32 = 2;

/// raft-engine's log files rotate at this size. Small, because lockd's live log is
/// small (the entries after the compaction point and a few records) and a file can be
/// purged only once all of it is obsolete.
const TARGET_FILE_BYTES: u64 = 16 * 1024 * 1024;
/// Old files are purged (their live records rewritten elsewhere, the files recycled)
/// once the log files take more than this. Bounds the log's disk use to about this
/// plus one file.
const PURGE_THRESHOLD_BYTES: u64 = 64 * 1024 * 1024;

/// The engine's settings for the log in `path`.
pub(super) fn engine_config(path: &Path) -> Config {
    Config {
        dir: path.to_string_lossy().into_owned(),
        // raft-engine never cuts anything: its tail tolerance cuts the newest file at
        // the first unreadable batch even when acknowledged ones follow. A torn last
        // write is cut before the open, by `tail::cut_torn_tails`; any other damage
        // refuses the open.
        recovery_mode: RecoveryMode::AbsoluteConsistency,
        // Entries are small and the disk is not the bottleneck; lz4 on the Raft thread
        // would only add latency to every persist above 8 KiB.
        batch_compression_threshold: ReadableSize(0),
        target_file_size: ReadableSize(TARGET_FILE_BYTES),
        purge_threshold: ReadableSize(PURGE_THRESHOLD_BYTES),
        // No recycling: a purged file is deleted, oldest first. Recycling keeps purged
        // files under their names until reused (renamed only at a clean shutdown) and
        // deletes the ones past its capacity, so a crash after a big purge left a gap
        // in the sequence numbers that `check_log_files` refuses; and a recycled file
        // active at a crash keeps the stale bytes of the file it was after its last
        // batch, where a batch-shaped payload signed for its new number refused the
        // open (`tail_attack_tests.rs`). Without it, only zeros follow the last batch.
        enable_log_recycle: false,
        ..Config::default()
    }
}

/// Checks the log files in `path` before raft-engine opens them, and returns the newest
/// file of each queue (path and sequence number), for [`super::tail`] to check its end.
///
/// Refuses a log directory whose log files do not have contiguous sequence numbers
/// (one deleted, or a stray or copied file with another number or a duplicate one).
/// raft-engine takes the files after the last gap as the whole log and ignores the
/// ones before it without a word: what they held (records, entries) would be lost,
/// and with only the newer files left the store may even look new. raft-engine itself
/// only ever deletes the oldest files, so a gap is never its own doing.
pub(super) fn check_log_files(path: &Path) -> Result<Vec<(PathBuf, u64)>, StorageError> {
    let io = |e: std::io::Error| StorageError::Open {
        path: path.to_owned(),
        source: Box::new(raft_engine::Error::Io(e)),
    };
    let mut queues: [(&str, Vec<(u64, String)>); 2] =
        [(".raftlog", Vec::new()), (".rewrite", Vec::new())];
    for dir_entry in std::fs::read_dir(path).map_err(io)? {
        let name = dir_entry.map_err(io)?.file_name();
        let Some(name) = name.to_str() else { continue };
        // raft-engine's own reading of a name: 16 digits, then the queue's suffix.
        let Some(seq) = name
            .get(..LOG_SEQ_WIDTH)
            .filter(|_| name.len() > LOG_SEQ_WIDTH)
            .and_then(|digits| digits.parse::<u64>().ok())
        else {
            continue;
        };
        for (suffix, files) in &mut queues {
            if name.ends_with(*suffix) {
                files.push((seq, name.to_owned()));
            }
        }
    }
    let mut newest = Vec::new();
    for (_, files) in &mut queues {
        files.sort();
        for pair in files.windows(2) {
            let ((a, a_name), (b, b_name)) = (&pair[0], &pair[1]);
            if *b != a + 1 {
                let problem = if a == b {
                    format!("log files {a_name} and {b_name} have the same sequence number")
                } else {
                    format!(
                        "log files {} to {} are missing between {a_name} and {b_name}",
                        a + 1,
                        b - 1
                    )
                };
                return Err(StorageError::LogFileGap {
                    path: path.to_owned(),
                    problem,
                });
            }
        }
        if let Some((seq, name)) = files.last() {
            newest.push((path.join(name), *seq));
        }
    }
    Ok(newest)
}

/// The width of the sequence number that starts a raft-engine log file's name.
const LOG_SEQ_WIDTH: usize = 16;

/// How raft-engine finds an entry's index: raft-rs's `Entry`, protobuf-encoded.
pub(super) struct Entries;

impl MessageExt for Entries {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

/// A log position: an entry's index and term.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Point {
    pub(super) index: u64,
    pub(super) term: u64,
}

impl Point {
    pub(super) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.index.to_le_bytes());
        b[8..].copy_from_slice(&self.term.to_le_bytes());
        b
    }

    pub(super) fn from_bytes(bytes: &[u8]) -> Result<Point, StorageError> {
        let (Some(index), Some(term)) = (
            bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()),
            bytes.get(8..).and_then(|b| <[u8; 8]>::try_from(b).ok()),
        ) else {
            return Err(StorageError::Corrupt(format!(
                "{} holds {} bytes, not 16",
                StoreKey::Meta(COMPACTED),
                bytes.len()
            )));
        };
        Ok(Point {
            index: u64::from_le_bytes(index),
            term: u64::from_le_bytes(term),
        })
    }
}

pub(super) fn encode(key: StoreKey, msg: &impl protobuf::Message) -> Result<Vec<u8>, StorageError> {
    msg.write_to_bytes()
        .map_err(|source| StorageError::Encode { key, source })
}

pub(super) fn decode<M: protobuf::Message>(key: StoreKey, bytes: &[u8]) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|source| StorageError::Decode { key, source })
}

/// Adds the record `name` to `batch`.
pub(super) fn put(
    batch: &mut LogBatch,
    name: &'static str,
    value: Vec<u8>,
) -> Result<(), StorageError> {
    batch
        .put(GROUP, name.as_bytes().to_vec(), value)
        .on_engine("add a record to a write")
}

/// Adds the protobuf record `name` to `batch`.
pub(super) fn put_message(
    batch: &mut LogBatch,
    name: &'static str,
    msg: &impl protobuf::Message,
) -> Result<(), StorageError> {
    put(batch, name, encode(StoreKey::Meta(name), msg)?)
}

/// Names a snapshot (metadata and file) and the compaction point, replacing the previous.
pub(super) fn put_snapshot(
    batch: &mut LogBatch,
    meta: &SnapshotMetadata,
    file: &str,
    compacted: Point,
) -> Result<(), StorageError> {
    put_message(batch, SNAPSHOT_META, meta)?;
    put(batch, SNAPSHOT_FILE, file.as_bytes().to_vec())?;
    put(batch, COMPACTED, compacted.to_bytes().to_vec())
}

/// Writes `batch` and returns after its fdatasync.
pub(super) fn write_synced(
    engine: &Engine,
    batch: &mut LogBatch,
    op: &'static str,
) -> Result<(), StorageError> {
    engine.write(batch, true).on_engine(op).map(drop)
}

/// The record `name`, if written.
pub(super) fn get(engine: &Engine, name: &'static str) -> Option<Vec<u8>> {
    engine.get(GROUP, name.as_bytes())
}

/// Writes the initial records if the store has none (refusing, with `new` absent), or
/// checks an existing store's format version ([`StorageError::Format`] when it is
/// missing or not [`FORMAT_VERSION`]); returns whether it created the log. Freshness is
/// judged by the hard state's presence, and the initial records are one atomic write, so
/// a crash while creating the store just leaves a store without a log, as before.
pub(super) fn bootstrap_if_fresh(
    engine: &Engine,
    path: &Path,
    new: Option<NewLog<'_>>,
) -> Result<bool, StorageError> {
    if get(engine, HARD_STATE).is_some() {
        check_version(path, get(engine, VERSION).as_deref())?;
        return Ok(false);
    }
    // The initial records are one write, so a log holding any record or entry but no
    // hard state lost it (damage, a truncated file): never new, and never written over.
    let other_records = [
        CONF_STATE,
        SNAPSHOT_META,
        SNAPSHOT_FILE,
        COMPACTED,
        VERSION,
        IDENTITY,
    ];
    if engine.first_index(GROUP).is_some()
        || other_records.iter().any(|name| get(engine, name).is_some())
    {
        return Err(StorageError::Missing {
            key: StoreKey::Meta(HARD_STATE),
        });
    }
    let Some(new) = new else {
        return Err(StorageError::NoLog {
            path: path.to_owned(),
        });
    };
    let conf_state = ConfState {
        voters: new.voters.to_vec(),
        ..Default::default()
    };
    let mut batch = LogBatch::default();
    put_message(&mut batch, HARD_STATE, &HardState::default())?;
    put_message(&mut batch, CONF_STATE, &conf_state)?;
    put_message(&mut batch, SNAPSHOT_META, &SnapshotMetadata::default())?;
    put(&mut batch, COMPACTED, Point::default().to_bytes().to_vec())?;
    put(&mut batch, VERSION, FORMAT_VERSION.to_le_bytes().to_vec())?;
    if let Some(identity) = new.identity {
        put(&mut batch, IDENTITY, identity.to_vec())?;
    }
    write_synced(engine, &mut batch, "write the initial state")?;
    info!(voters = ?new.voters, "new raft log created");
    Ok(true)
}

/// The version record must say [`FORMAT_VERSION`]: a store without one was written by
/// a build before versions (never released), one with another by a different build.
fn check_version(path: &Path, record: Option<&[u8]>) -> Result<(), StorageError> {
    let found = match record {
        Some(bytes) => match <[u8; 4]>::try_from(bytes) {
            Ok(v) => Some(u32::from_le_bytes(v)),
            Err(_) => {
                return Err(StorageError::Corrupt(format!(
                    "{} holds {} bytes, not 4",
                    StoreKey::Meta(VERSION),
                    bytes.len()
                )))
            }
        },
        None => None,
    };
    if found == Some(FORMAT_VERSION) {
        return Ok(());
    }
    Err(StorageError::Format {
        path: path.to_owned(),
        found,
    })
}
