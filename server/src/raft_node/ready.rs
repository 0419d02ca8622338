use super::*;

/// Grants, waits and expiries for the metrics.
fn count_outcomes(reply: &Reply, events: &[Event]) {
    match reply {
        Reply::Granted(_) => telemetry::granted(1),
        Reply::Queued { .. } => telemetry::queued(),
        _ => {}
    }
    for e in events {
        match e {
            Event::Finished { result: Ok(_), .. } => telemetry::granted(1),
            Event::SessionExpired { .. } => telemetry::expired(),
            _ => {}
        }
    }
}

impl<O: Outbox> RaftNode<O> {
    /// One Raft Ready, in the order raft-rs requires: send leader messages, apply a
    /// received snapshot, apply committed entries, persist new entries and hard state
    /// in one transaction (one fsync), then send the messages that needed them durable.
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
            self.answer_beats(read_states);
        }
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            // Decoded and checked whole before anything is written: a bad snapshot
            // from a peer stops this server with its disk as it was.
            let (uid, addrs, state) = decode_snapshot(snap.get_data()).map_err(|e| {
                anyhow::anyhow!(
                    "the leader's snapshot at index {} is unreadable: {e}",
                    snap.get_metadata().index
                )
            })?;
            self.adopt_cluster_uid(uid)?;
            self.raw.mut_store().apply_snapshot(&snap)?;
            self.state = state;
            for (peer, addr) in &addrs {
                if *peer != self.id && self.addrs.get(peer) != Some(addr) {
                    self.outbox.add_peer(*peer, addr);
                }
            }
            self.addrs = addrs;
            self.applied = snap.get_metadata().index;
            self.last_snapshot = self.applied;
            info!(index = self.applied, "installed a snapshot from the leader");
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
        Ok(())
    }

    pub(super) fn apply_entries(&mut self, entries: Vec<Entry>) -> anyhow::Result<()> {
        for entry in entries {
            let index = entry.index;
            match entry.get_entry_type() {
                EntryType::EntryNormal => self.apply_normal(&entry),
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    cc.merge_from_bytes(entry.get_data())?;
                    self.apply_conf_change(&entry, &cc)?;
                }
                EntryType::EntryConfChangeV2 => {
                    // lockd proposes only single changes (ConfChange); a V2 entry can
                    // only come from a foreign log.
                    anyhow::bail!("unexpected joint configuration change at index {index}");
                }
            }
            self.applied = index;
        }
        Ok(())
    }

    pub(super) fn apply_normal(&mut self, entry: &Entry) {
        // A new leader's empty entry.
        if entry.get_data().is_empty() {
            return;
        }
        let waiting = self.take_in_flight(entry.get_context());
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
        match envelope.op {
            Op::Apply(command) => {
                match &command {
                    Command::Tick => self.tick_proposed_at = None,
                    Command::Reconnect { session } => {
                        self.reconnecting.remove(session);
                    }
                    Command::FenceAttempt { session, .. } => {
                        self.fence_busy.remove(session);
                    }
                    _ => {}
                }
                let logout = match command {
                    Command::Logout { session, .. } => Some(session),
                    _ => None,
                };
                let (reply, events) = self.state.apply(entry.index, envelope.now_ms, command);
                count_outcomes(&reply, &events);
                match (&reply, logout) {
                    // A new session's expiry window starts at its login.
                    (Reply::LoggedIn { session }, _) => {
                        self.liveness.heard(*session, Instant::now())
                    }
                    // Forgotten only once the table let it go: a refused logout (of a
                    // session being fenced, say) leaves everything as it was.
                    (Reply::Ok, Some(session)) => self.liveness.forget(session),
                    _ => {}
                }
                if let Some(p) = waiting {
                    self.answer(p, reply);
                }
                self.dispatch(events);
            }
            Op::Read => {
                if let Some(InFlight {
                    waiting: Waiting::Read(query, tx),
                    ..
                }) = waiting
                {
                    let _ = tx.send(Ok(self.answer_query(&query)));
                }
            }
        }
    }
}
