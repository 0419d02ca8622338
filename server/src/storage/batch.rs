//! The batch codec: how one `persist`'s entries are stored as one value of the
//! `entry_batches` table — each entry protobuf-encoded after its length (u32, little
//! endian). One key per Raft Ready instead of one per entry: redb's cost per key (B-tree
//! pages rebuilt on every commit) was most of the Raft thread's time under load.

use raft::prelude::Entry;

use super::error::{StorageError, StoreKey};
use super::schema::{decode, encode};

/// A batch's stored value: each entry protobuf-encoded, after its length (u32, little
/// endian).
pub(super) fn encode_batch(entries: &[Entry]) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    for entry in entries {
        let bytes = encode(StoreKey::Batch(entries[0].index), entry)?;
        let len = u32::try_from(bytes.len())
            .map_err(|_| StorageError::Corrupt(format!("entry {} is over 4 GiB", entry.index)))?;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    Ok(out)
}

/// The entries of the batch stored under `first`, checked to run on from it.
pub(super) fn decode_batch(first: u64, mut bytes: &[u8]) -> Result<Vec<Entry>, StorageError> {
    let key = StoreKey::Batch(first);
    let mut entries: Vec<Entry> = Vec::new();
    while !bytes.is_empty() {
        let (len, rest) = bytes
            .split_first_chunk::<4>()
            .ok_or_else(|| StorageError::Corrupt(format!("{key}: truncated length")))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(StorageError::Corrupt(format!("{key}: truncated entry")));
        }
        let entry: Entry = decode(key, &rest[..len])?;
        let expected = first + entries.len() as u64;
        if entry.index != expected {
            return Err(StorageError::Corrupt(format!(
                "{key}: expected entry {expected}, found entry {}",
                entry.index
            )));
        }
        entries.push(entry);
        bytes = &rest[len..];
    }
    if entries.is_empty() {
        return Err(StorageError::Corrupt(format!("{key}: an empty batch")));
    }
    Ok(entries)
}
