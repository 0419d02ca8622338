//! `lockctl snapshot save FILE`: a backup of the leader's applied state (AdminService
//! SaveSnapshot), written atomically. The file's format and checks are the server's
//! (`lockd snapshot inspect FILE` verifies one); this module only moves the bytes.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, Context};
use lockd_proto::v1::SaveSnapshotRequest;
use serde::Serialize;

/// A snapshot of a table near its lock limit is up to the peer message limit (1 GiB).
const MAX_SNAPSHOT_BYTES: usize = 1 << 30;
/// Encoding 1,000,000 held locks takes the leader about half a second; this leaves
/// room for a slow disk and a large table.
const SAVE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Serialize)]
struct Saved<'a> {
    file: &'a str,
    bytes: usize,
    index: u64,
    term: u64,
    last_token: u64,
}

pub async fn save(servers: &[String], file: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let reply = crate::admin::on_leader_within(servers, SAVE_TIMEOUT, |c| async move {
        c.max_decoding_message_size(MAX_SNAPSHOT_BYTES)
            .save_snapshot(SaveSnapshotRequest {})
            .await
    })
    .await?;
    write_atomically(file, &reply.file)?;
    let shown = file.display().to_string();
    let saved = Saved {
        file: &shown,
        bytes: reply.file.len(),
        index: reply.index,
        term: reply.term,
        last_token: reply.last_token,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&saved)?);
    } else {
        println!(
            "snapshot saved to {shown}: {} bytes, Raft index {} term {}, last fencing token {} \
             (check it with `lockd snapshot inspect {shown}`)",
            saved.bytes, saved.index, saved.term, saved.last_token
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `file` holds all of `bytes` or is left as it was: a temporary file in the same
/// directory (tempfile, which also removes it on any error), fsync, rename, fsync of
/// the directory.
fn write_atomically(file: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    temp.write_all(bytes)
        .and_then(|_| temp.as_file().sync_all())
        .with_context(|| format!("cannot write {}", temp.path().display()))?;
    temp.persist(file).map_err(|e| {
        anyhow!(
            "cannot rename the snapshot to {}: {}",
            file.display(),
            e.error
        )
    })?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", dir.display()))
}
