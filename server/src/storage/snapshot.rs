//! The snapshot format, whole: the file a snapshot lives in (a server's own
//! `snapshot-<index>.bin` and a `lockctl snapshot save` backup are the same format) and
//! the body Raft ships between servers. Decoding checks one named rule at a time
//! ([`Rule`]), so a damaged or foreign snapshot is refused with the rule it broke.
//!
//! File layout, version 1 (integers little-endian):
//!
//! ```text
//! [0, 8)         magic b"LOCKDSNP"
//! [8, 12)        format version, u32 = 1
//! [12, 16)       head length H, u32 (at most MAX_HEAD_BYTES)
//! [16, 24)       body length B, u64
//! [24, 28)       CRC-32 (IEEE) of bytes [0, 24), then the head, then the body
//! [28, 28+H)     head: postcard SnapshotHead (Raft index, term, voters, learners,
//!                and, in a backup, the cluster's name and id)
//! [28+H, 28+H+B) body: postcard (cluster uid, address book), then the lock table
//!                (`Frozen::encode_at`: `State::encode`, and one more byte when
//!                its ids run ahead of the index)
//! ```
//!
//! The body alone is what Raft carries as a snapshot's data (its metadata travels in
//! Raft's own message); the file wraps it with what a reader needs to check it without
//! the Raft log: where it sits in the log, the membership, and a checksum.
//!
//! This module must not decide when to snapshot or touch the Raft log.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use bytes::Bytes;
use raft::prelude::SnapshotMetadata;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::{OnFile, StorageError};
use crate::state::{Frozen, State};

/// The first bytes of every snapshot file.
pub const MAGIC: &[u8; 8] = b"LOCKDSNP";
/// The layout above. A reader refuses any other.
pub const FORMAT_VERSION: u32 = 1;
/// Magic, version, head length, body length, CRC.
pub const HEADER_BYTES: usize = 28;
/// A head is a few ids and a name; anything larger is damage.
const MAX_HEAD_BYTES: u32 = 64 * 1024;

/// Snapshot files in a data directory: `snapshot-<index>.bin`, first written as
/// `snapshot-<index>.bin.tmp`.
pub(super) const FILE_PREFIX: &str = "snapshot-";
const FILE_SUFFIX: &str = ".bin";
const TEMP_SUFFIX: &str = ".tmp";

/// What a snapshot is of: its place in the log and the membership at that place.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotHead {
    /// Raft index of the last entry the snapshot's state includes (> 0).
    pub index: u64,
    /// Raft term of that entry (> 0).
    pub term: u64,
    /// Voting servers' ids at `index`; never empty.
    pub voters: Vec<u64>,
    /// Learners' ids at `index`.
    pub learners: Vec<u64>,
    /// The cluster's configured name and id: set in backups (which travel between
    /// machines and must be checked against a config), `None` in a server's own files.
    pub cluster: Option<ClusterName>,
}

/// A cluster's `[cluster] name` and `id` from its config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterName {
    pub name: String,
    pub id: u64,
}

impl SnapshotHead {
    /// The head of a server's own snapshot described by Raft's metadata.
    pub fn of(meta: &SnapshotMetadata) -> SnapshotHead {
        let cs = meta.get_conf_state();
        SnapshotHead {
            index: meta.index,
            term: meta.term,
            voters: cs.voters.clone(),
            learners: cs.learners.clone(),
            cluster: None,
        }
    }
}

/// The rules a snapshot must satisfy, in the order they are checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The file starts with [`MAGIC`].
    Magic,
    /// Its format version is [`FORMAT_VERSION`].
    Version,
    /// Its length is the header's plus the lengths the header gives.
    Length,
    /// The CRC-32 matches header, head and body.
    Crc,
    /// The head decodes.
    Head,
    /// Index, term and cluster identity are set and are the ones expected.
    Identity,
    /// The membership is a valid configuration and the address book well formed.
    Membership,
    /// The lock table decodes and its records are consistent.
    Table,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Magic => "magic",
            Rule::Version => "version",
            Rule::Length => "length",
            Rule::Crc => "crc",
            Rule::Head => "head",
            Rule::Identity => "identity",
            Rule::Membership => "membership",
            Rule::Table => "table",
        })
    }
}

/// A snapshot that broke `rule`; `detail` says how.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the {rule} check failed: {detail}")]
pub struct SnapshotError {
    pub rule: Rule,
    pub detail: String,
}

fn broke<T>(rule: Rule, detail: impl Into<String>) -> Result<T, SnapshotError> {
    Err(SnapshotError {
        rule,
        detail: detail.into(),
    })
}

// ---- the body ----

/// A snapshot body's cluster identity ([`crate::raft_node::ClusterUid`]), address book
/// and lock table.
pub type SnapshotParts = (u64, BTreeMap<u64, String>, State);

/// A snapshot's body at entry `index`: the cluster identity and the servers' address
/// book (membership changes bring addresses the config file may not have), then the
/// lock table (`Frozen::encode_at`).
pub fn encode_snapshot(
    uid: u64,
    addrs: &BTreeMap<u64, String>,
    table: &Frozen,
    index: u64,
) -> Vec<u8> {
    let mut bytes = postcard::to_allocvec(&(uid, addrs)).expect("postcard encodes an address map");
    bytes.extend_from_slice(&table.encode_at(index));
    bytes
}

/// A body's parts as of one applied entry, taken on the Raft thread (cheaply, see
/// `State::freeze`) and encoded elsewhere.
#[derive(Clone, Debug)]
pub struct SnapshotBody {
    /// The entry the table was frozen at.
    pub index: u64,
    pub cluster_uid: u64,
    pub addrs: BTreeMap<u64, String>,
    pub table: Frozen,
}

impl SnapshotBody {
    pub fn encode(&self) -> Vec<u8> {
        encode_snapshot(self.cluster_uid, &self.addrs, &self.table, self.index)
    }
}

/// Decodes a body, checking the identity, membership and table rules.
pub fn decode_snapshot(bytes: &[u8]) -> Result<SnapshotParts, SnapshotError> {
    let ((uid, addrs), table): ((u64, BTreeMap<u64, String>), &[u8]) =
        match postcard::take_from_bytes(bytes) {
            Ok(parts) => parts,
            Err(e) => return broke(Rule::Identity, format!("undecodable cluster identity: {e}")),
        };
    if uid == 0 {
        return broke(Rule::Identity, "the cluster identity is 0 (unknown)");
    }
    if let Some((id, addr)) = addrs.iter().find(|(id, addr)| **id == 0 || addr.is_empty()) {
        return broke(
            Rule::Membership,
            format!("address book entry {id} = {addr:?}"),
        );
    }
    match State::decode(table) {
        Ok(state) => Ok((uid, addrs, state)),
        Err(e) => broke(Rule::Table, e),
    }
}

// ---- the file ----

/// The whole file for `head` and `body`, in one buffer (backups; a server's own files
/// are written in pieces by [`write_file`]).
pub fn encode_file(head: &SnapshotHead, body: &[u8]) -> Vec<u8> {
    let head_bytes = postcard::to_allocvec(head).expect("postcard encodes a snapshot head");
    let header = header(&head_bytes, body);
    let mut out = Vec::with_capacity(HEADER_BYTES + head_bytes.len() + body.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&head_bytes);
    out.extend_from_slice(body);
    out
}

pub(super) fn header(head: &[u8], body: &[u8]) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(head.len() as u32).to_le_bytes());
    h[16..24].copy_from_slice(&(body.len() as u64).to_le_bytes());
    let crc = crc(&h[..24], head, body);
    h[24..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn crc(fields: &[u8], head: &[u8], body: &[u8]) -> u32 {
    let mut crc = crc32fast::Hasher::new();
    crc.update(fields);
    crc.update(head);
    crc.update(body);
    crc.finalize()
}

/// Checks a file's magic, version, length, CRC, head, identity and membership rules
/// (not the body's: see [`decode_snapshot`]); returns its head and the body's range.
pub fn decode_file(bytes: &[u8]) -> Result<(SnapshotHead, std::ops::Range<usize>), SnapshotError> {
    if bytes.len() < MAGIC.len() || &bytes[..8] != MAGIC {
        return broke(Rule::Magic, "not a lockd snapshot file (no LOCKDSNP magic)");
    }
    let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    if bytes.len() < 12 {
        return broke(
            Rule::Length,
            format!("{} bytes, shorter than a header", bytes.len()),
        );
    }
    let version = u32_at(8);
    if version != FORMAT_VERSION {
        return broke(
            Rule::Version,
            format!("format version {version}, this lockd reads version {FORMAT_VERSION}"),
        );
    }
    if bytes.len() < HEADER_BYTES {
        return broke(
            Rule::Length,
            format!("{} bytes, shorter than a header", bytes.len()),
        );
    }
    let head_len = u32_at(12);
    let body_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let rest = (bytes.len() - HEADER_BYTES) as u64;
    if head_len > MAX_HEAD_BYTES || u64::from(head_len).checked_add(body_len) != Some(rest) {
        return broke(
            Rule::Length,
            format!(
                "the header announces {head_len} + {body_len} bytes, the file has {rest} \
                 after its header (truncated or padded)"
            ),
        );
    }
    let head_end = HEADER_BYTES + head_len as usize;
    let stored = u32_at(24);
    let computed = crc(
        &bytes[..24],
        &bytes[HEADER_BYTES..head_end],
        &bytes[head_end..],
    );
    if stored != computed {
        return broke(
            Rule::Crc,
            format!("stored {stored:08x}, computed {computed:08x}: the file is damaged"),
        );
    }
    let head: SnapshotHead = match postcard::from_bytes(&bytes[HEADER_BYTES..head_end]) {
        Ok(head) => head,
        Err(e) => return broke(Rule::Head, format!("undecodable: {e}")),
    };
    check_identity(&head)?;
    check_membership(&head)?;
    Ok((head, head_end..bytes.len()))
}

fn check_identity(head: &SnapshotHead) -> Result<(), SnapshotError> {
    if head.index == 0 || head.term == 0 {
        return broke(
            Rule::Identity,
            format!(
                "index {} term {}: both must be above 0",
                head.index, head.term
            ),
        );
    }
    if let Some(c) = &head.cluster {
        if c.name.is_empty() || c.id == 0 {
            return broke(Rule::Identity, format!("cluster `{}` id {}", c.name, c.id));
        }
    }
    Ok(())
}

fn check_membership(head: &SnapshotHead) -> Result<(), SnapshotError> {
    let mut all: Vec<u64> = head.voters.iter().chain(&head.learners).copied().collect();
    all.sort_unstable();
    let repeated = all.windows(2).any(|w| w[0] == w[1]);
    if head.voters.is_empty() || all.contains(&0) || repeated {
        return broke(
            Rule::Membership,
            format!(
                "voters {:?} learners {:?}: voters must be non-empty, ids above 0, \
                 each server once",
                head.voters, head.learners
            ),
        );
    }
    Ok(())
}

/// A backup file decoded and checked against every rule.
#[derive(Debug)]
pub struct Backup {
    pub head: SnapshotHead,
    pub cluster: ClusterName,
    pub uid: u64,
    pub addrs: BTreeMap<u64, String>,
    pub state: State,
}

/// Decodes a backup (`lockctl snapshot save`): the file rules, a cluster name in the
/// head (identity), then the body's rules.
pub fn decode_backup(bytes: &[u8]) -> Result<Backup, SnapshotError> {
    let (head, body) = decode_file(bytes)?;
    let Some(cluster) = head.cluster.clone() else {
        return broke(
            Rule::Identity,
            "no cluster name: a server's own snapshot file, not a backup",
        );
    };
    let (uid, addrs, state) = decode_snapshot(&bytes[body])?;
    Ok(Backup {
        head,
        cluster,
        uid,
        addrs,
        state,
    })
}

// ---- a server's own files ----

pub(super) fn file_name(index: u64) -> String {
    format!("{FILE_PREFIX}{index}{FILE_SUFFIX}")
}

/// Writes a snapshot file for `meta` and `body` to `<dir>/snapshot-<index>.bin` so that
/// the name only ever holds a whole, durable file: write a temporary file, fsync it,
/// rename it, fsync the directory (which makes the rename durable). Returns the name.
pub(super) fn write_file(
    dir: &Path,
    meta: &SnapshotMetadata,
    body: &[u8],
) -> Result<String, StorageError> {
    let name = file_name(meta.index);
    let head = postcard::to_allocvec(&SnapshotHead::of(meta)).expect("postcard encodes a head");
    write_atomically(dir, &name, &[&header(&head, body), &head, body])?;
    Ok(name)
}

/// Writes `parts` to `<dir>/<name>` through a temporary file, fsync, rename and fsync
/// of the directory: the name holds the whole file or nothing new.
pub fn write_atomically(dir: &Path, name: &str, parts: &[&[u8]]) -> Result<(), StorageError> {
    let path = dir.join(name);
    let temp = dir.join(format!("{name}{TEMP_SUFFIX}"));
    {
        let mut f = File::create(&temp).on_file(&temp, "create")?;
        for part in parts {
            f.write_all(part).on_file(&temp, "write")?;
        }
        f.sync_all().on_file(&temp, "fsync")?;
    }
    std::fs::rename(&temp, &path).on_file(&path, "rename the temporary file to")?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .on_file(dir, "fsync the directory of")
}

/// Reads the snapshot file `name` and checks it, and that it is the snapshot `meta`
/// describes (identity: index and term; membership: voters and learners). Returns the
/// body, sharing the one buffer read from the file.
pub(super) fn read_file(
    dir: &Path,
    name: &str,
    meta: &SnapshotMetadata,
) -> Result<Bytes, StorageError> {
    let path = dir.join(name);
    let mut bytes = Vec::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .on_file(&path, "read")?;
    let corrupt = |problem: SnapshotError| StorageError::SnapshotFileCorrupt {
        path: path.clone(),
        problem,
    };
    let (head, body) = decode_file(&bytes).map_err(corrupt)?;
    let expected = SnapshotHead::of(meta);
    if (head.index, head.term) != (expected.index, expected.term) {
        return Err(corrupt(SnapshotError {
            rule: Rule::Identity,
            detail: format!(
                "holds index {} term {}, the log names index {} term {}",
                head.index, head.term, expected.index, expected.term
            ),
        }));
    }
    if (&head.voters, &head.learners) != (&expected.voters, &expected.learners) {
        return Err(corrupt(SnapshotError {
            rule: Rule::Membership,
            detail: format!(
                "holds voters {:?} learners {:?}, the log names {:?} and {:?}",
                head.voters, head.learners, expected.voters, expected.learners
            ),
        }));
    }
    Ok(Bytes::from(bytes).slice(body))
}

/// Deletes a snapshot file no longer named by the log. A failure only leaves a
/// stale file behind, which the next open deletes, so it is logged, not returned.
pub(super) fn remove_file(dir: &Path, name: &str) {
    let path = dir.join(name);
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), "cannot delete an old snapshot file: {e}");
        }
    }
}

/// Deletes every snapshot file, whole or temporary, other than `current`: left by a
/// crash while one was written or before the previous one was deleted.
pub(super) fn remove_unnamed_files(dir: &Path, current: Option<&str>) -> Result<(), StorageError> {
    for item in std::fs::read_dir(dir).on_file(dir, "list the directory of")? {
        let item = item.on_file(dir, "list the directory of")?;
        let name = item.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with(FILE_PREFIX)
            && (name.ends_with(FILE_SUFFIX) || name.ends_with(TEMP_SUFFIX));
        if ours && Some(name) != current {
            info!(
                file = name,
                "deleting a snapshot file the log does not name"
            );
            remove_file(dir, name);
        }
    }
    Ok(())
}
