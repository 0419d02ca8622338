//! One Raft Ready, handled in the order raft-rs requires, and the committed entries
//! it brings applied in log order: commands to the lock table (`State::apply`), whose
//! outcome goes to the effects step, reads answered at their marker, configuration
//! changes to `conf`.

use super::proposals::{InFlight, Waiting};
use super::run::stop_on_storage_failure;
use super::snapshot::decode_snapshot;
use super::{Envelope, Op, Outbox, RaftNode};
use crate::state::Command;
use crate::telemetry;
use protobuf::Message as _;
use raft::prelude::*;
use std::time::Instant;
use tracing::info;

impl<O: Outbox> RaftNode<O> {
    /// One Raft Ready, in the order raft-rs requires: send leader messages, apply a
    /// received snapshot, apply committed entries, persist new entries and hard state
    /// in one write (one fdatasync), then send the messages that needed them durable.
    pub(super) fn on_ready(&mut self) -> anyhow::Result<()> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        if !ready.messages().is_empty() {
            self.outbox.send(ready.take_messages());
        }
        if !ready.read_states().is_empty() {
            let read_states = ready.take_read_states();
            self.beats.confirmed(read_states, &self.state);
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            self.install_snapshot(&snap)?;
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        let hard_state = ready.hs().cloned();
        if !ready.entries().is_empty() || hard_state.is_some() {
            let started = Instant::now();
            let wrote = self
                .raw
                .mut_store()
                .persist(ready.entries(), hard_state.as_ref())?;
            if wrote {
                telemetry::persisted(ready.entries().len(), started.elapsed());
            }
        }
        if !ready.persisted_messages().is_empty() {
            self.outbox.send(ready.take_persisted_messages());
        }
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            self.raw.mut_store().set_commit(commit)?;
        }
        if !light.messages().is_empty() {
            self.outbox.send(light.take_messages());
        }
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        self.maybe_snapshot()?;
        let locks = self.state.held_lock_count() + self.state.waiting_count();
        self.heap.table_size(locks, self.snapshots.in_flight());
        Ok(())
    }

    /// A snapshot from the leader replaces the lock table and the address book. It is
    /// decoded and checked whole before anything is written: a bad snapshot from a
    /// peer stops this server with its disk as it was.
    fn install_snapshot(&mut self, snap: &Snapshot) -> anyhow::Result<()> {
        let (uid, addrs, state) = decode_snapshot(snap.get_data()).map_err(|e| {
            anyhow::anyhow!(
                "the leader's snapshot at index {} is unreadable: {e}",
                snap.get_metadata().index
            )
        })?;
        self.adopt_cluster_uid(uid)?;
        self.raw.mut_store().apply_snapshot(snap)?;
        self.state = state;
        for (peer, addr) in &addrs {
            if *peer != self.id && self.addrs.get(peer) != Some(addr) {
                self.outbox.add_peer(*peer, addr);
            }
        }
        self.addrs = addrs;
        self.applied = snap.get_metadata().index;
        self.snapshots.installed(self.applied);
        info!(index = self.applied, "installed a snapshot from the leader");
        Ok(())
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        for entry in entries {
            let index = entry.index;
            // The table issues fresh ids to whatever it is given, so an entry applied a
            // second time would repeat its commands (Login, Tick, Expire are not
            // deduplicated by request id). raft-rs never does this; if it ever did, stop.
            anyhow::ensure!(
                index > self.applied,
                "committed entry {index} is at or below the applied index {}: applying it \
                 again would repeat its commands",
                self.applied
            );
            let commands = match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(entry.get_data())?;
                    self.apply_conf_change(&entry, &cc)?;
                    0
                }
                EntryType::EntryConfChangeV2 => {
                    // lockd proposes only single changes (ConfChange); a V2 entry can
                    // only come from a foreign log.
                    anyhow::bail!("unexpected joint configuration change at index {index}");
                }
            };
            self.applied = index;
            self.snapshots.applied(commands);
        }
        Ok(())
    }

    /// Applies one normal entry: its commands to the lock table (then each one's
    /// effects), or the marker at which a read is answered. Returns how many commands
    /// it carried.
    fn apply_normal(&mut self, entry: &Entry) -> usize {
        // A new leader's empty entry.
        if entry.get_data().is_empty() {
            return 0;
        }
        let envelope: Envelope = match postcard::from_bytes(entry.get_data()) {
            Ok(e) => e,
            // A committed entry this server cannot read: skipping it would let this
            // replica diverge from any that can (a newer version, a damaged log), so
            // it stops and says which entry.
            Err(e) => stop_on_storage_failure(format!(
                "committed entry {} (term {}) is undecodable: {e}",
                entry.index, entry.term
            )),
        };
        let now_ms = envelope.now_ms;
        match envelope.op {
            Op::Apply(command) => {
                self.apply_command(entry, 0, now_ms, command);
                1
            }
            Op::Batch(commands) => {
                let count = commands.len();
                for (offset, command) in commands.into_iter().enumerate() {
                    self.apply_command(entry, offset, now_ms, command);
                }
                count
            }
            Op::Read => {
                let waiting = self.proposals.take(entry.get_context(), 0);
                if let Some(InFlight {
                    waiting: Waiting::Read(query, tx),
                    ..
                }) = waiting
                {
                    let _ = tx.send(Ok(self.answer_query(&query)));
                }
                0
            }
        }
    }

    /// Applies the command at `offset` in `entry` and answers whoever waits for it.
    fn apply_command(&mut self, entry: &Entry, offset: usize, now_ms: u64, command: Command) {
        let waiting = self.proposals.take(entry.get_context(), offset);
        let (reply, events) = self.state.apply(entry.index, now_ms, command);
        self.effects(waiting, reply, events);
    }
}
