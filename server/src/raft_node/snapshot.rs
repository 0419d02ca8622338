//! Snapshot timing: when the driver snapshots (every `snapshot_every_entries` applied
//! entries, an entry of several callers' commands counting each, more for a large
//! table, or at once after an AddLearner), the writer thread
//! that encodes the frozen table and writes and fsyncs the file, and recording it when
//! written. The bytes themselves are storage's (`storage::snapshot`).

use super::{Input, Outbox, QueryAnswer, RaftNode};
pub(super) use crate::storage::snapshot::decode_snapshot;
use crate::storage::snapshot::SnapshotBody;
use crate::storage::{Recorded, StorageError, WrittenSnapshot};
use std::time::{Duration, Instant};
use tracing::info;

/// At least one log entry per this many bytes of the last snapshot between two
/// snapshots (see [`snapshot_interval`]).
const SNAPSHOT_BYTES_PER_ENTRY: usize = 400;

/// When the last snapshot was taken and the one being written.
pub(super) struct Snapshots {
    /// Index of the last snapshot taken or started.
    last_index: u64,
    /// Size of the last snapshot file this server wrote (0 before the first).
    last_bytes: usize,
    every_entries: u64,
    /// Entries kept in the log before a snapshot's index when compacting.
    keep_entries: u64,
    /// Take a snapshot as soon as none is being written, whatever its distance to the
    /// last one.
    now: bool,
    /// The snapshot being written off this thread, if any: one at a time.
    job: Option<SnapshotInFlight>,
    /// Entries applied since the last snapshot started (or was installed)…
    entries_since: u64,
    /// …and their weight: each counts its callers' commands, at least one. With one
    /// command per entry the two are equal; a leader's `Op::Batch` entries make the
    /// log grow by commands, not entries, so the interval and the tail kept behind a
    /// snapshot are measured in commands.
    weight_since: u64,
}

/// A snapshot whose file the writer thread is writing.
struct SnapshotInFlight {
    index: u64,
    started: Instant,
    /// Time the driver spent freezing the lock table for it.
    freeze: Duration,
    /// Entries to keep in the log behind it (see [`Snapshots::keep_entries_now`]).
    keep_entries: u64,
}

/// What the writer thread reports: the file, and how long it took to encode the
/// table and to write and fsync the file.
pub struct SnapshotWritten {
    pub(crate) written: Result<WrittenSnapshot, StorageError>,
    pub(crate) encode: Duration,
    pub(crate) write: Duration,
}

impl Snapshots {
    pub(super) fn new(last_index: u64, every_entries: u64, keep_entries: u64) -> Snapshots {
        Snapshots {
            last_index,
            last_bytes: 0,
            every_entries,
            keep_entries,
            now: false,
            job: None,
            entries_since: 0,
            weight_since: 0,
        }
    }

    /// One more entry applied, carrying `commands` callers' commands (0 for a read
    /// marker, a configuration change or a new leader's empty entry).
    pub(super) fn applied(&mut self, commands: usize) {
        self.entries_since += 1;
        self.weight_since += commands.max(1) as u64;
    }

    /// Whether a snapshot should start with `applied` entries applied.
    fn due(&self, applied: u64) -> bool {
        let interval = snapshot_interval(self.every_entries, self.last_bytes);
        let due = self.weight_since >= interval || (self.now && applied > self.last_index);
        // A pending `now` waits for the snapshot being written.
        due && self.job.is_none()
    }

    /// `snapshot_keep_entries` counted in commands, as entries: scaled by the entries
    /// per command applied since the last snapshot, so a log of batches keeps as many
    /// commands for a lagging follower (and in memory) as a log of single commands.
    fn keep_entries_now(&self) -> u64 {
        match self.weight_since {
            0 => self.keep_entries,
            weight => self
                .keep_entries
                .saturating_mul(self.entries_since)
                .div_ceil(weight),
        }
    }

    /// A snapshot starts (or arrived) here: the counts start again.
    fn restart_counts(&mut self, index: u64) {
        self.last_index = index;
        self.entries_since = 0;
        self.weight_since = 0;
    }

    /// Snapshot as soon as possible (a joining server needs one naming it).
    pub(super) fn soon(&mut self) {
        self.now = true;
    }

    /// Whether the writer thread holds a frozen copy of the table.
    pub(super) fn in_flight(&self) -> bool {
        self.job.is_some()
    }

    /// A snapshot from the leader was installed at `index`.
    pub(super) fn installed(&mut self, index: u64) {
        self.restart_counts(index);
    }
}

/// Entries between two snapshots: `snapshot_every_entries`, or more for a large
/// table, so that encoding (on the writer thread, which shares the CPUs with the Raft
/// thread) costs at most ≈0.8 µs per applied entry, whatever the table's size: 2.1 ns
/// per byte in `snapshot_cost` at 1,000,000 locks (release build, commit e63ad3e;
/// 6–11 ns when this constant was chosen, before the encoder got faster). At 1,000,000 held locks (a 46 MB snapshot) that is one snapshot
/// per ≈115,000 entries instead of one per 10,000; the longer log tail costs ≈20
/// bytes of memory per held lock.
fn snapshot_interval(every_entries: u64, last_snapshot_bytes: usize) -> u64 {
    every_entries.max((last_snapshot_bytes / SNAPSHOT_BYTES_PER_ENTRY) as u64)
}

impl<O: Outbox> RaftNode<O> {
    /// The applied state as a backup's head and body (`lockctl snapshot save`),
    /// answered at a read marker, so it is the leader's state as of a linearizable point.
    pub(super) fn snapshot_query(&self) -> QueryAnswer {
        let store = self.raw.store();
        let cs = store.conf_state();
        QueryAnswer::Snapshot {
            head: crate::storage::snapshot::SnapshotHead {
                index: self.applied,
                // 0 (refused by the snapshot's identity rule) only if the log lost the
                // applied entry's term, which open() rules out.
                term: raft::Storage::term(store, self.applied).unwrap_or(0),
                voters: cs.voters,
                learners: cs.learners,
                cluster: None,
            },
            body: Box::new(self.snapshot_body()),
            last_token: self.state.last_token(),
        }
    }

    /// The snapshot body as of `applied`: the table frozen (shared, not copied).
    fn snapshot_body(&self) -> SnapshotBody {
        SnapshotBody {
            index: self.applied,
            cluster_uid: self.identity.cluster_uid,
            addrs: self.addrs.clone(),
            table: self.state.freeze(),
        }
    }

    /// Starts a snapshot when one is due and none is being written. Only freezing the
    /// lock table happens here, on the driver (`State::freeze`: pointer copies, see
    /// `snapshot_cost`); the table is encoded and the file written and fsynced on a
    /// thread of its own, and [`Self::on_snapshot_written`] records it (a short write)
    /// when it is done. Meanwhile the driver goes on proposing, applying and persisting.
    pub(super) fn maybe_snapshot(&mut self) -> anyhow::Result<()> {
        if !self.snapshots.due(self.applied) {
            return Ok(());
        }
        self.snapshots.now = false;
        let started = Instant::now();
        // The conf state as of `applied`: conf changes are applied in log order, so it
        // names every learner added up to here.
        let conf_state = self.raw.store().conf_state();
        let job = self.raw.store().begin_snapshot(self.applied, conf_state)?;
        let body = self.snapshot_body();
        let freeze = started.elapsed();
        let inputs = self.inputs_tx.clone();
        std::thread::Builder::new()
            .name(format!("snapshot-{}", self.id))
            .spawn(move || {
                let encoding = Instant::now();
                let data = body.encode();
                // Lets the table stop sharing chunks as early as possible.
                drop(body);
                let encode = encoding.elapsed();
                let writing = Instant::now();
                let written = job.write(&data);
                let write = writing.elapsed();
                drop(data);
                // Fails only if the driver has stopped; the file the log does not name is
                // then deleted at the next start.
                let _ = inputs.blocking_send(Input::SnapshotWritten(SnapshotWritten {
                    written,
                    encode,
                    write,
                }));
            })
            .map_err(|e| anyhow::anyhow!("cannot start the snapshot writer thread: {e}"))?;
        self.snapshots.job = Some(SnapshotInFlight {
            index: self.applied,
            started,
            freeze,
            keep_entries: self.snapshots.keep_entries_now(),
        });
        self.snapshots.restart_counts(self.applied);
        Ok(())
    }

    /// Makes a written snapshot the store's and compacts the log, keeping
    /// `keep_entries` entries before it for followers slightly behind, in one short
    /// write; the log files of compacted entries are purged after it (see
    /// `DiskStorage::purge`).
    pub(super) fn on_snapshot_written(
        &mut self,
        SnapshotWritten {
            written,
            encode,
            write,
        }: SnapshotWritten,
    ) -> anyhow::Result<()> {
        self.heap.snapshot_written();
        let Some(job) = self.snapshots.job.take() else {
            return Err(anyhow::anyhow!(
                "a snapshot file was written that the driver did not start"
            ));
        };
        let written = written?;
        anyhow::ensure!(
            written.index() == job.index,
            "snapshot written at index {} while {} was expected",
            written.index(),
            job.index
        );
        let bytes = written.bytes();
        self.snapshots.last_bytes = bytes as usize;
        let recording = Instant::now();
        let recorded = self
            .raw
            .mut_store()
            .record_snapshot(written, job.keep_entries)?;
        let record = recording.elapsed();
        match recorded {
            Recorded::Current { compacted_index } => info!(
                index = job.index,
                bytes,
                compacted_index,
                kept_entries = job.keep_entries,
                freeze_ms = job.freeze.as_millis() as u64,
                encode_ms = encode.as_millis() as u64,
                write_ms = write.as_millis() as u64,
                record_ms = record.as_millis() as u64,
                driver_blocked_ms = (job.freeze + record).as_millis() as u64,
                total_ms = job.started.elapsed().as_millis() as u64,
                "snapshot taken, log compacted"
            ),
            Recorded::Superseded => info!(
                index = job.index,
                "snapshot dropped: a newer one from the leader was installed meanwhile"
            ),
        }
        self.maybe_snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Flags, Mode, RecoveryMode, Reply, State};
    use std::collections::BTreeMap;
    use std::time::Instant;

    /// Builds a table holding `n` EX locks over 16 sessions, as W4 does.
    fn table_holding(n: u64) -> State {
        let mut state = State::new();
        let mut index = 0;
        let mut apply = |state: &mut State, cmd: Command| {
            index += 1;
            state.apply(index, 1_000, cmd).0
        };
        let mut sessions = Vec::new();
        for k in 0..16 {
            let session = match apply(
                &mut state,
                Command::Login {
                    node: format!("node{k}"),
                    nonce: 1,
                },
            ) {
                Reply::LoggedIn { session } => session,
                other => panic!("login: {other:?}"),
            };
            apply(
                &mut state,
                Command::OpenLockspace {
                    session,
                    request_id: 1,
                    name: "bench".into(),
                    lvb_len_bytes: 0,
                    recovery: RecoveryMode::Auto,
                },
            );
            sessions.push(session);
        }
        for i in 0..n {
            let session = sessions[(i % 16) as usize];
            let request_id = 2 + i / 16;
            let reply = apply(
                &mut state,
                Command::Lock {
                    session,
                    request_id,
                    ack_below: request_id,
                    lockspace: "bench".into(),
                    resource: format!("held-{i}").into_bytes(),
                    mode: Mode::Ex,
                    flags: Flags::default(),
                    timeout_ms: 0,
                },
            );
            assert!(matches!(reply, Reply::Granted(_)), "{reply:?}");
        }
        state
    }

    #[test]
    fn entries_count_by_their_commands_for_the_interval_and_the_tail_kept() {
        let mut single = Snapshots::new(0, 1_000, 500);
        for _ in 0..999 {
            single.applied(1);
        }
        assert!(!single.due(999));
        single.applied(0); // a read marker, a configuration change: one each
        assert!(single.due(1_000));
        assert_eq!(single.keep_entries_now(), 500, "one command per entry");

        // 40 entries of 25 commands each: as much log as 1,000 single commands.
        let mut batched = Snapshots::new(0, 1_000, 500);
        for _ in 0..39 {
            batched.applied(25);
        }
        assert!(!batched.due(39));
        batched.applied(25);
        assert!(batched.due(40));
        assert_eq!(
            batched.keep_entries_now(),
            20,
            "500 commands' worth of entries"
        );
        batched.restart_counts(40);
        batched.applied(25);
        assert!(!batched.due(41), "counted again from the snapshot");
        assert_eq!(Snapshots::new(0, 1_000, 0).keep_entries_now(), 0);
    }

    #[test]
    fn a_large_table_is_snapshotted_less_often() {
        assert_eq!(snapshot_interval(10_000, 0), 10_000, "before the first");
        assert_eq!(snapshot_interval(10_000, 2_000_000), 10_000);
        // 1,000,000 held locks: a 46 MB snapshot.
        assert_eq!(snapshot_interval(10_000, 46_000_000), 115_000);
    }

    /// Not a test: the cost of a snapshot's steps at many held locks (issues #7, #17).
    /// `LOCKS=1000000 cargo test --release -p lockd-server snapshot_cost -- --ignored --nocapture`
    ///
    /// `freeze` is what the Raft thread pays to start a snapshot; `encode` and
    /// `write+fsync` happen on the writer thread. `unlocks_frozen` against
    /// `unlocks_alone` is the copy-on-write's worst case: unlocks spread so that each
    /// touches another chunk while the frozen copy is alive, against the same
    /// unlocks with no copy.
    #[test]
    #[ignore = "a measurement, not a check: run by hand in release (see above); .ci/run runs it small"]
    fn snapshot_cost() {
        let n = std::env::var("LOCKS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1_000_000);
        let mut state = table_holding(n);
        let t = Instant::now();
        let frozen = state.freeze();
        let freeze = t.elapsed();
        let t = Instant::now();
        let data = crate::storage::snapshot::encode_snapshot(1, &BTreeMap::new(), &frozen, 0);
        let encode = t.elapsed();
        assert_eq!(frozen.encode(), state.encode(), "the copy is the table");
        let dir = tempfile::TempDir::new().unwrap();
        let t = Instant::now();
        {
            use std::io::Write;
            let mut f = std::fs::File::create(dir.path().join("s.bin")).unwrap();
            f.write_all(&data).unwrap();
            f.sync_all().unwrap();
        }
        let write = t.elapsed();
        // Lock ids of the held locks are the entry indexes 33.. (after 16 logins and
        // 16 opens); one in 256 of them, one per chunk.
        let spread: Vec<u64> = (33..33 + n).step_by(256).collect();
        let unlock = |state: &mut State, from: usize| {
            let t = Instant::now();
            for (k, &lock_id) in spread.iter().enumerate().skip(from).step_by(2) {
                let session = 1 + (lock_id - 33) % 16 * 2;
                // Above every index and request id so far, in both calls.
                let ahead = from as u64 * n + k as u64;
                let index = 10 * n + ahead;
                let request_id = 1_000_000_000 + ahead;
                let cmd = Command::Unlock {
                    session,
                    request_id,
                    ack_below: request_id,
                    lock_id,
                    lvb: None,
                };
                let (reply, _) = state.apply(index, 1_000, cmd);
                assert!(matches!(reply, Reply::Ok), "{reply:?}");
            }
            t.elapsed()
        };
        let unlocks_frozen = unlock(&mut state, 0);
        drop(frozen);
        let unlocks_alone = unlock(&mut state, 1);
        eprintln!(
            "locks={n} bytes={} freeze={freeze:?} encode={encode:?} write+fsync={write:?} \
             {} unlocks_frozen={unlocks_frozen:?} unlocks_alone={unlocks_alone:?}",
            data.len(),
            spread.len() / 2,
        );
    }
}
