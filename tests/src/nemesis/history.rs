//! The nemesis history: one JSON object per line, appended by every client process
//! (its operations and its library's "lost" notices), by the test fence agent (fence
//! records) and by the harness (process starts, kills, faults, the final lock table).
//!
//! Everything runs on one machine, so `t` — wall-clock microseconds since the Unix
//! epoch — is a common clock for all writers.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

/// What a record says happened.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Harness: a client process `c` (node `node`, process `pid`) was started.
    Start,
    /// Client: logged in with session `session`.
    Login,
    /// Client: an operation was sent.
    Invoke,
    /// Client: the operation succeeded (lock/convert: granted `mode` with `token`).
    Ok,
    /// Client: the operation failed; `ambiguous` if it may have been applied anyway.
    Fail,
    /// Client: its library reported the session Lost or Expired; it stops using locks.
    Lost,
    /// Client: it exits of its own accord (after an ambiguous failure), using no lock.
    Exit,
    /// Zombie client: its library reported the session Lost or Expired (`what`) and it
    /// carries on with its old session regardless.
    Zombie,
    /// Harness: the leader reported node `node` expired or being fenced while its
    /// client process `c` was stopped or cut off: from now until its fence record,
    /// nothing it held may go to anyone else and nothing it sends may be accepted.
    Expired,
    /// Client: it has stopped issuing operations (end of the run) and keeps its locks.
    Stopped,
    /// Fence agent: node `node` was fenced; process `pid` is dead.
    Fence,
    /// Harness: process `pid` was killed with SIGKILL.
    Kill,
    /// Harness: a fault was injected (`what`).
    Fault,
    /// Harness: the leader's lock table after recovery (`held`).
    Final,
}

/// The operation of an invoke / ok / fail record.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Lock,
    Convert,
    Unlock,
}

/// A holder in the final lock table.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FinalHold {
    pub session: u64,
    pub node: String,
    pub res: String,
    pub mode: String,
    pub token: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}
fn is_zero32(v: &u32) -> bool {
    *v == 0
}
fn is_false(v: &bool) -> bool {
    !*v
}

/// One line of the history. Fields a kind does not use stay empty and are not written.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Wall clock, µs since the Unix epoch.
    pub t: u64,
    pub k: Kind,
    /// The client process ("node3.2": node3's second incarnation).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub c: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub node: String,
    #[serde(default, skip_serializing_if = "is_zero32")]
    pub pid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub session: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<Op>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub res: String,
    /// The mode asked for (invoke) or granted (ok).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mode: String,
    /// For a convert: the mode held before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub from: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub token: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub err: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub ambiguous: bool,
    /// A fault's description, or the health that was reported.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub what: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<FinalHold>,
}

impl Record {
    /// A record of kind `k` at time `t` with every other field empty.
    pub fn new(t: u64, k: Kind) -> Record {
        Record {
            t,
            k,
            c: String::new(),
            node: String::new(),
            pid: 0,
            session: 0,
            op: None,
            res: String::new(),
            mode: String::new(),
            from: String::new(),
            token: 0,
            err: String::new(),
            ambiguous: false,
            what: String::new(),
            held: Vec::new(),
        }
    }

    pub fn client(mut self, c: &str) -> Record {
        self.c = c.to_string();
        self
    }
    pub fn op(mut self, op: Op, res: &str, mode: &str) -> Record {
        self.op = Some(op);
        self.res = res.to_string();
        self.mode = mode.to_string();
        self
    }
    pub fn from_mode(mut self, from: &str) -> Record {
        self.from = from.to_string();
        self
    }
    pub fn token(mut self, token: u64) -> Record {
        self.token = token;
        self
    }
    pub fn pid(mut self, pid: u32) -> Record {
        self.pid = pid;
        self
    }
    pub fn node(mut self, node: &str) -> Record {
        self.node = node.to_string();
        self
    }
    pub fn what(mut self, what: &str) -> Record {
        self.what = what.to_string();
        self
    }
}

/// Wall clock in µs since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// An append-only history file. Each record is one `write` of one line on an
/// O_APPEND file, so lines from several processes never interleave.
pub struct Writer {
    file: std::fs::File,
}

impl Writer {
    pub fn open(path: &Path) -> std::io::Result<Writer> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Writer { file })
    }

    pub fn append(&mut self, record: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_string(record).map_err(std::io::Error::other)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())
    }
}

/// Reads every `*.jsonl` file of `dir`; a torn last line (a process killed while
/// writing) is skipped, anything else unparsable is an error.
pub fn read_dir(dir: &Path) -> anyhow::Result<Vec<Record>> {
    let mut records = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    paths.sort();
    for path in paths {
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            match serde_json::from_str::<Record>(line) {
                Ok(r) => records.push(r),
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {}
                Err(e) => anyhow::bail!("{}:{}: {e}: {line}", path.display(), i + 1),
            }
        }
    }
    records.sort_by_key(|r| r.t);
    Ok(records)
}
