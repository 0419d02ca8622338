//! Prometheus metrics: every series lockd exports, named, described (HELP) and bucketed
//! in one place. The Raft driver calls these at the moments they describe; without
//! `metrics_addr` no recorder is installed and every call is a no-op.
//! `deploy/prometheus/` holds the alert rules and dashboard built on these names.

use crate::raft_node::NodeStatus;
use crate::state::NodeState;
use metrics::Unit;
use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Set once a recorder serves /metrics, so work done only for metrics is skipped
/// without one.
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// Buckets of the fast durations (fsync, commit): 50 µs to 2.5 s.
const FAST_SECONDS: [f64; 15] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5,
];
/// Buckets of a fence agent's run: 0.1 s to its default 60 s timeout and beyond.
const FENCE_SECONDS: [f64; 10] = [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0];
/// Buckets of entries per fsync and of commands per entry.
const BATCH_ENTRIES: [f64; 12] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0,
];

/// Serves `/metrics` on `addr` from now on.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    builder()
        .and_then(|b| b.with_http_listener(addr).install())
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    INSTALLED.store(true, Ordering::Relaxed);
    describe();
    Ok(())
}

/// The exporter with lockd's histogram buckets (without buckets it would export
/// summaries, which cannot be aggregated across servers).
fn builder() -> Result<PrometheusBuilder, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full("lockd_fsync_seconds".into()), &FAST_SECONDS)?
        .set_buckets_for_metric(Matcher::Full("lockd_commit_seconds".into()), &FAST_SECONDS)?
        .set_buckets_for_metric(
            Matcher::Full("lockd_fence_attempt_seconds".into()),
            &FENCE_SECONDS,
        )?
        .set_buckets_for_metric(
            Matcher::Full("lockd_ready_batch_entries".into()),
            &BATCH_ENTRIES,
        )?
        .set_buckets_for_metric(Matcher::Full("lockd_entry_commands".into()), &BATCH_ENTRIES)
}

/// HELP text of every series, and the build info.
fn describe() {
    describe_counter!(
        "lockd_grants_total",
        "Locks granted by applied entries, at once or after waiting."
    );
    describe_counter!(
        "lockd_waits_total",
        "Lock requests that had to wait in a queue."
    );
    describe_counter!(
        "lockd_expiries_total",
        "Node sessions expired for missing their heartbeats or by forceexpire."
    );
    describe_counter!(
        "lockd_fence_attempts_total",
        "Fence agent runs by this server as leader, by result (ok, failed)."
    );
    describe_histogram!(
        "lockd_fence_attempt_seconds",
        Unit::Seconds,
        "How long one fence agent run took."
    );
    describe_histogram!(
        "lockd_ready_batch_entries",
        Unit::Count,
        "Raft entries written per Ready, i.e. per fsync."
    );
    describe_histogram!(
        "lockd_entry_commands",
        Unit::Count,
        "Callers' commands in one entry this leader proposed (one loop turn's, at most 256)."
    );
    describe_histogram!(
        "lockd_fsync_seconds",
        Unit::Seconds,
        "How long writing one Raft Ready to disk took (one fsync)."
    );
    describe_histogram!(
        "lockd_commit_seconds",
        Unit::Seconds,
        "A leader's proposal from its append to its apply: replication, fsyncs, commit."
    );
    describe_gauge!("lockd_raft_term", "The Raft term this server is in.");
    describe_gauge!(
        "lockd_raft_commit_index",
        "This server's Raft commit index."
    );
    describe_gauge!(
        "lockd_raft_applied_index",
        "The last Raft index applied to the lock table."
    );
    describe_gauge!(
        "lockd_raft_apply_lag_entries",
        Unit::Count,
        "Committed entries not yet applied."
    );
    describe_gauge!(
        "lockd_is_leader",
        "1 while this server is the Raft leader, else 0."
    );
    describe_gauge!(
        "lockd_sessions",
        "Node sessions in the lock table, in any state."
    );
    describe_gauge!("lockd_held_locks", "Granted locks in the lock table.");
    describe_gauge!("lockd_waiting_requests", "Lock requests waiting in queues.");
    describe_gauge!(
        "lockd_nodes",
        "Node sessions by state (logged_in, was_logged_in, expired, fencing, fenced, unfencing)."
    );
    describe_gauge!(
        "lockd_fence_pending",
        "Nodes expired and not yet fenced (expired or fencing): their locks stay held."
    );
    describe_gauge!(
        "lockd_fence_device_up",
        "1 if the fence device answered its last monitor check (action=monitor), else 0."
    );
    describe_gauge!(
        "lockd_build_info",
        "Always 1; the labels say which lockd version runs."
    );
    gauge!("lockd_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Locks granted by applied entries (at once or after waiting).
pub fn granted(n: u64) {
    counter!("lockd_grants_total").increment(n);
}

/// Requests that had to wait in a queue.
pub fn queued() {
    counter!("lockd_waits_total").increment(1);
}

pub fn expired() {
    counter!("lockd_expiries_total").increment(1);
}

pub fn fence_attempt(ok: bool, took: Duration) {
    let result = if ok { "ok" } else { "failed" };
    counter!("lockd_fence_attempts_total", "result" => result).increment(1);
    histogram!("lockd_fence_attempt_seconds").record(took.as_secs_f64());
}

/// One Raft Ready written to disk: how many entries went into its single fsync, and
/// how long the write took. (A Ready whose only change is the commit index writes
/// nothing.)
pub fn persisted(entries: usize, took: Duration) {
    histogram!("lockd_ready_batch_entries").record(entries as f64);
    histogram!("lockd_fsync_seconds").record(took.as_secs_f64());
}

/// This leader proposed one entry carrying `commands` callers' commands.
pub fn proposed_commands(commands: usize) {
    histogram!("lockd_entry_commands").record(commands as f64);
}

/// One of this leader's proposals applied: the time from its append to the leader's
/// log to its apply (replication, both fsyncs, commit), before the reply is sent.
pub fn committed(took: Duration) {
    histogram!("lockd_commit_seconds").record(took.as_secs_f64());
}

pub fn status(s: &NodeStatus) {
    gauge!("lockd_raft_term").set(s.term as f64);
    gauge!("lockd_raft_commit_index").set(s.commit as f64);
    gauge!("lockd_raft_applied_index").set(s.applied as f64);
    gauge!("lockd_raft_apply_lag_entries").set(s.commit.saturating_sub(s.applied) as f64);
    gauge!("lockd_is_leader").set(if s.role == crate::raft_node::Role::Leader {
        1.0
    } else {
        0.0
    });
    gauge!("lockd_sessions").set(s.sessions as f64);
    gauge!("lockd_held_locks").set(s.held_locks as f64);
    gauge!("lockd_waiting_requests").set(s.waiting as f64);
}

/// A fence device's monitor result.
pub fn fence_device(node: &str, device: &str, ok: bool) {
    let labels = [("node", node.to_string()), ("device", device.to_string())];
    gauge!("lockd_fence_device_up", &labels).set(if ok { 1.0 } else { 0.0 });
}

/// The sessions' states: `lockd_nodes{state}` and `lockd_fence_pending`. Counts only
/// when metrics are served (it walks every session).
pub fn node_states(states: impl Iterator<Item = NodeState>) {
    if !INSTALLED.load(Ordering::Relaxed) {
        return;
    }
    let mut counts = [0u64; 6];
    for state in states {
        counts[index(state)] += 1;
    }
    for (state, name) in [
        (NodeState::LoggedIn, "logged_in"),
        (NodeState::WasLoggedIn, "was_logged_in"),
        (NodeState::Expired, "expired"),
        (NodeState::Fencing, "fencing"),
        (NodeState::Fenced, "fenced"),
        (NodeState::Unfencing, "unfencing"),
    ] {
        gauge!("lockd_nodes", "state" => name).set(counts[index(state)] as f64);
    }
    let pending = counts[index(NodeState::Expired)] + counts[index(NodeState::Fencing)];
    gauge!("lockd_fence_pending").set(pending as f64);
}

fn index(state: NodeState) -> usize {
    match state {
        NodeState::LoggedIn => 0,
        NodeState::WasLoggedIn => 1,
        NodeState::Expired => 2,
        NodeState::Fencing => 3,
        NodeState::Fenced => 4,
        NodeState::Unfencing => 5,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_histogram_bucket_list_is_accepted() {
        super::builder().expect("valid buckets");
    }
}
