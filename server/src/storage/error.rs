//! What can go wrong in the store, typed; each error names the record, file or step.

use std::fmt;
use std::path::{Path, PathBuf};

use super::snapshot::SnapshotError;

/// Where a value lives in the store; named in errors about that value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKey {
    Meta(&'static str),
    /// The log entry with this index.
    Entry(u64),
}

impl fmt::Display for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreKey::Meta(name) => write!(f, "record {name}"),
            StoreKey::Entry(index) => write!(f, "entry {index}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("cannot open raft log {}: {source}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: Box<raft_engine::Error>,
    },
    #[error("raft log: raft-engine failed to {op}: {source}")]
    Engine {
        op: &'static str,
        #[source]
        source: Box<raft_engine::Error>,
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
    #[error("snapshot file {}: cannot {op}: {source}", path.display())]
    SnapshotIo {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {} is corrupt: {problem}", path.display())]
    SnapshotFileCorrupt {
        path: PathBuf,
        problem: SnapshotError,
    },
    #[error(
        "{} has on-disk format {}, this lockd reads only version {}: refusing to start",
        path.display(),
        found.map_or("unknown (no version record)".to_string(), |v| format!("version {v}")),
        super::FORMAT_VERSION
    )]
    Format { path: PathBuf, found: Option<u32> },
    #[error(
        "{} is a store of on-disk format 1 (redb), this lockd reads only version {} (a \
         raft-engine log in {}/): refusing to start; nothing was migrated",
        path.display(),
        super::FORMAT_VERSION,
        super::schema::LOG_DIR
    )]
    RedbLayout { path: PathBuf },
    #[error("no Raft log in {}", path.display())]
    NoLog { path: PathBuf },
    #[error(
        "raft log {}: {problem}: refusing to start (raft-engine would silently ignore \
         every log file before the gap, losing what they hold)",
        path.display()
    )]
    LogFileGap { path: PathBuf, problem: String },
    #[error(
        "raft log file {} is damaged at byte {offset} of {len}, and {after}: refusing to \
         start (cutting the file there could lose acknowledged writes; nothing was changed)",
        file.display()
    )]
    DamagedLog {
        file: PathBuf,
        offset: u64,
        len: u64,
        after: &'static str,
    },

    // The caller asked for something the log cannot do; a bug in the driver or in Raft.
    #[error("entries to persist are not contiguous: index {next} follows {prev}")]
    NotContiguous { prev: u64, next: u64 },
    #[error("entries from index {first} would leave a gap after the last index {last_index}")]
    WouldLeaveGap { first: u64, last_index: u64 },
    #[error(
        "entries from index {first} would overwrite the compacted log through {compacted_index}"
    )]
    OverwritesCompacted { first: u64, compacted_index: u64 },
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

/// Turns a raft-engine error into a [`StorageError`] saying which step failed.
pub(super) trait OnEngine<T> {
    fn on_engine(self, op: &'static str) -> Result<T, StorageError>;
}

impl<T> OnEngine<T> for raft_engine::Result<T> {
    fn on_engine(self, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|e| StorageError::Engine {
            op,
            source: Box::new(e),
        })
    }
}

/// Turns an I/O error on a snapshot file into a [`StorageError`] naming file and step.
pub(super) trait OnFile<T> {
    fn on_file(self, path: &Path, op: &'static str) -> Result<T, StorageError>;
}

impl<T> OnFile<T> for std::io::Result<T> {
    fn on_file(self, path: &Path, op: &'static str) -> Result<T, StorageError> {
        self.map_err(|source| StorageError::SnapshotIo {
            path: path.to_owned(),
            op,
            source,
        })
    }
}
