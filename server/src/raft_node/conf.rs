//! Membership changes, one step at a time: the leader checks a step against the rules
//! (`crate::membership`) and its view of who is running, proposes it as a raft-rs
//! `ConfChange` whose context carries the new server's address, and every server
//! applies it to Raft, the durable conf state, the address book and the transport's
//! peers. Also the choice of a successor when a leader hands over.

use super::proposals::Waiting;
use super::{Outbox, ProposeError, RaftNode};
use crate::membership::{self, Change, Plan};
use raft::prelude::*;
use std::time::Instant;
use tracing::{info, warn};

impl<O: Outbox> RaftNode<O> {
    /// Checks one membership step against the rules and the leader's view, and
    /// appends it as a Raft configuration change; returns the sequence number its
    /// context carries. Refusals change nothing.
    pub(super) fn propose_membership(&mut self, change: Change) -> Result<u64, ProposeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        if self.raw.raft.has_pending_conf() {
            return Err(ProposeError::Refused(
                "another membership change is still being applied; try again in a moment".into(),
            ));
        }
        let conf = self.raw.store().conf_state();
        let now = Instant::now();
        let running: Vec<u64> = self
            .raw
            .raft
            .prs()
            .iter()
            .map(|(id, _)| *id)
            .filter(|id| self.is_running(*id, now))
            .collect();
        let view = membership::View {
            voters: &conf.voters,
            learners: &conf.learners,
            running_voters: &running,
        };
        membership::check(&view, &change).map_err(ProposeError::Refused)?;
        match membership::plan(&change, self.id) {
            Plan::Propose => {}
            Plan::HandOverFirst => {
                return Err(ProposeError::Refused(format!(
                    "server {} leads; it hands leadership over before it is removed",
                    self.id
                )))
            }
        }
        let mut cc = ConfChange {
            node_id: change.id(),
            ..Default::default()
        };
        match &change {
            Change::AddLearner { addr, .. } => {
                cc.set_change_type(ConfChangeType::AddLearnerNode);
                cc.context = addr.clone().into_bytes().into();
            }
            Change::Promote { id } => {
                cc.set_change_type(ConfChangeType::AddNode);
                cc.context = self
                    .addrs
                    .get(id)
                    .cloned()
                    .unwrap_or_default()
                    .into_bytes()
                    .into();
            }
            Change::Remove { .. } => cc.set_change_type(ConfChangeType::RemoveNode),
        }
        self.flush_commands();
        let (seq, context) = self.proposals.next_context();
        self.raw
            .propose_conf_change(context, cc)
            .map_err(|e| match e {
                raft::Error::ProposalDropped => self.not_leader(),
                e => ProposeError::Internal(format!("cannot propose {change}: {e}")),
            })?;
        info!(%change, "membership change proposed");
        Ok(seq)
    }

    /// Applies a committed configuration change: Raft's view, the durable conf state,
    /// the address book and the peer connections, then answers whoever proposed it.
    pub(super) fn apply_conf_change(
        &mut self,
        entry: &Entry,
        cc: &ConfChange,
    ) -> anyhow::Result<()> {
        let cs = self.raw.apply_conf_change(cc)?;
        self.raw.mut_store().set_conf_state(&cs)?;
        let id = cc.node_id;
        match cc.get_change_type() {
            ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                // raft-rs makes a server install only a snapshot whose configuration
                // names it, so a joining server needs one taken after this change.
                if cc.get_change_type() == ConfChangeType::AddLearnerNode {
                    self.snapshots.soon();
                }
                let addr = String::from_utf8_lossy(&cc.context).into_owned();
                if !addr.is_empty() {
                    if id != self.id {
                        self.outbox.add_peer(id, &addr);
                    }
                    self.addrs.insert(id, addr);
                }
            }
            ConfChangeType::RemoveNode => {
                if id == self.id {
                    warn!("this server was removed from the cluster; it no longer votes or serves");
                } else {
                    self.outbox.remove_peer(id);
                }
                self.addrs.remove(&id);
                // A server added again under this id announces its own build.
                self.peer_log_formats.remove(&id);
            }
        }
        info!(
            node = id,
            change = ?cc.get_change_type(),
            voters = ?cs.voters,
            learners = ?cs.learners,
            "membership changed"
        );
        if let Some(p) = self.proposals.take(entry.get_context(), 0) {
            if let Waiting::Membership(tx) = p.waiting {
                let _ = tx.send(Ok(self.members()));
            }
        }
        self.publish_status();
        Ok(())
    }

    /// Whether server `id` is this one or was heard from within an election timeout.
    /// (raft-rs's `recent_active` is cleared at every quorum check, so it reads "not
    /// running" for a moment after each.)
    pub(super) fn is_running(&self, id: u64, now: Instant) -> bool {
        id == self.id
            || self
                .heard
                .get(&id)
                .is_some_and(|at| now.duration_since(*at) <= self.timing.peer_timeout)
    }

    pub(super) fn transfer_leadership(&mut self) -> u64 {
        if !self.is_leader() {
            return 0;
        }
        // Callers' commands that came before the hand-over go out first: raft-rs drops
        // every proposal once a transfer is under way.
        self.flush_commands();
        let voters = self.raw.store().conf_state().voters;
        let target = self
            .raw
            .raft
            .prs()
            .iter()
            .filter(|(id, _)| {
                **id != self.id && self.is_running(**id, Instant::now()) && voters.contains(id)
            })
            .max_by_key(|(id, pr)| (pr.matched, std::cmp::Reverse(**id)))
            .map(|(id, _)| *id)
            .unwrap_or(0);
        if target != 0 {
            info!(to = target, "handing leadership over before shutdown");
            self.raw.transfer_leader(target);
        }
        target
    }
}
