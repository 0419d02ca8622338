//! The redb schema of a server's Raft store (`<dir>/raft.redb`): its tables and
//! records, the format version checked at open, how a new store is created, and the
//! small write steps (`put_*`, `delete_batches`) the log's transactions are made of.
//! Knows nothing of the in-memory log or of snapshot contents.

use std::ops::RangeBounds;
use std::path::Path;

use raft::prelude::{ConfState, HardState, SnapshotMetadata};
use redb::{Database, Durability, ReadableTable, TableDefinition, WriteTransaction};
use tracing::info;

use super::error::{During, StorageError, StoreKey};
use super::NewLog;

/// At most this many batches of compacted entries are deleted from disk by one `persist`.
pub const COMPACTION_BATCH: u64 = 1_000;

/// File name of the database inside a server's directory.
pub(super) const DB_FILE: &str = "raft.redb";

/// redb's page cache (9/10 read cache, 1/10 write buffer; a transaction larger than the
/// buffer writes pages out early). redb's default, 1 GiB, keeps every page it ever
/// wrote in memory: with a million locks that was hundreds of bytes of RSS per lock
/// (BRIEF §4.1 W4). The log tail is served from memory (`Log`) and snapshots live in
/// their own files, so redb reads only the pages its own writes walk through, which a
/// small cache holds.
pub(super) const CACHE_SIZE_BYTES: usize = 16 * 1024 * 1024;

/// The log, in batches: the key is the index of a batch's first entry, the value its
/// entries (see [`encode_batch`]); a batch runs up to the next key, the last one to the
/// end of the log. Holds the entries after the compaction point, the same ones as
/// [`Log::entries`], and possibly leftovers at or below it that later persists delete
/// ([`Log::batches`]); those are never read.
pub(super) const ENTRY_BATCHES: TableDefinition<u64, &[u8]> = TableDefinition::new("entry_batches");
/// Small records: the keys below.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
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

/// The version of the layout this module writes: the tables and records above, batches
/// as [`super::batch`] encodes them, snapshot files as [`super::snapshot`] does. Bump it
/// with any change a previous build would misread (and teach `open` the old one, or
/// refuse it).
pub const FORMAT_VERSION: u32 = 1;

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

pub(super) fn encode(key: StoreKey, msg: &impl protobuf::Message) -> Result<Vec<u8>, StorageError> {
    msg.write_to_bytes()
        .map_err(|source| StorageError::Encode { key, source })
}

pub(super) fn decode<M: protobuf::Message>(key: StoreKey, bytes: &[u8]) -> Result<M, StorageError> {
    M::parse_from_bytes(bytes).map_err(|source| StorageError::Decode { key, source })
}

/// Writes the initial records if the store has none (refusing, with `new` absent), or
/// checks an existing store's format version ([`StorageError::Format`] when it is
/// missing or not [`FORMAT_VERSION`]); returns whether it created the log. Freshness is judged by the hard state's presence rather than
/// by the file's, so a crash between creating the file and this commit just leaves a
/// store without a log, as before.
pub(super) fn bootstrap_if_fresh(
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
                (VERSION, FORMAT_VERSION.to_le_bytes().to_vec()),
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
        } else {
            let found = meta.get(VERSION).during("read the format version")?;
            check_version(path, found.as_ref().map(|v| v.value()))?;
        }
    }
    txn.commit().during("commit the initial state")?;
    Ok(fresh)
}

/// The version record must say [`FORMAT_VERSION`]: a store without one was written by
/// a build before versions (never released), one with another by a different build.
fn check_version(path: &Path, record: Option<&[u8]>) -> Result<(), StorageError> {
    let found = match record {
        Some(bytes) => match <[u8; 4]>::try_from(bytes) {
            Ok(v) => Some(u32::from_le_bytes(v)),
            Err(_) => {
                return Err(StorageError::Corrupt(format!(
                    "meta/{VERSION} holds {} bytes, not 4",
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

pub(super) fn begin_write(db: &Database) -> Result<WriteTransaction, StorageError> {
    let mut txn = db.begin_write().during("begin a write transaction")?;
    // The default, but the whole point of this module: commit returns only after fsync.
    txn.set_durability(Durability::Immediate);
    Ok(txn)
}

/// Deletes the stored batches whose key is in `range`.
pub(super) fn delete_batches(
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
pub(super) fn put_snapshot(
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

pub(super) fn put_meta(
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
