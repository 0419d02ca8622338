//! Prometheus metrics: every series lockd exports, named in one place. The Raft driver
//! calls these at the moments they describe; without `metrics_addr` no recorder is
//! installed and every call is a no-op.

use crate::raft_node::NodeStatus;
use metrics::{counter, gauge, histogram};
use std::net::SocketAddr;
use std::time::Duration;

/// Serves `/metrics` on `addr` from now on.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))
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
    gauge!("lockd_is_leader").set(if s.role == "leader" { 1.0 } else { 0.0 });
    gauge!("lockd_sessions").set(s.sessions as f64);
    gauge!("lockd_held_locks").set(s.held_locks as f64);
    gauge!("lockd_waiting_requests").set(s.waiting as f64);
}
