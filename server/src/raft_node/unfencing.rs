//! The leader's side of unfencing (issue 15, see `crate::unfence`): starting the runs
//! the table says are due, turning a finished run into its `UnfenceAttempt`, and the
//! departure records for `lockctl nodes`.

use std::time::Instant;

use super::{Input, Outbox, RaftNode};
use crate::state::Departure;
use crate::unfence::UnfenceRun;

impl<O: Outbox> RaftNode<O> {
    /// Leader only: starts a run of the unfence devices of each Unfencing session that
    /// has none and is not backing off.
    pub(super) fn run_unfences(&mut self, now: Instant) {
        let inputs = self.inputs_tx.clone();
        let report = move |run| async move {
            let _ = inputs.send(Input::UnfenceDone(run)).await;
        };
        for command in self.unfencer.start_due(&self.state, now, report) {
            self.propose_quietly(command);
        }
    }

    /// A run finished: a leader proposes its attempt (the table decides what follows).
    pub(super) fn on_unfence_done(&mut self, run: UnfenceRun) {
        if !self.is_leader() {
            return;
        }
        if let Some(command) = self.unfencer.ran(run, &self.state, Instant::now()) {
            self.propose_quietly(command);
        }
    }

    pub(super) fn departures(&self) -> Vec<(String, Departure)> {
        self.state
            .departures()
            .map(|(node, d)| (node.to_string(), d.clone()))
            .collect()
    }
}
