//! The five workloads of BRIEF §4.1, each from login to logout; w4 (scale: held locks
//! and the servers' memory) in `scale.rs`.

mod scale;

pub use scale::w4;

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lockd_client::{Client, ClientConfig, Lockspace, LockspaceOptions};
use serde_json::{json, Value};

use super::args::Args;
use super::cluster::Servers;
use super::load::{self, LoadResult, LoadSpec, BUCKET};
use super::progress;
use super::report::{cpu_note, opt_list, round1, Outcome, Row};

/// Resource types (the first 4 bytes of a GFS-style name), one per phase, so no phase
/// ever meets another's resources.
const TYPE_W1: u32 = 1;
const TYPE_W2: u32 = 2;
const TYPE_W3: u32 = 3;
const TYPE_W4_HELD: u32 = 4;
const TYPE_W4_LOAD: u32 = 5;
const TYPE_W5: u32 = 6;

/// The w5 window over which "the rate is back" is judged.
const RECOVERY_WINDOW: Duration = Duration::from_millis(500);

/// Logged-in sessions, one lockspace handle each.
struct Sessions {
    clients: Vec<Client>,
    lockspaces: Vec<Lockspace>,
}

impl Sessions {
    /// Logs in as the nodes with indexes `nodes` (0 = node1) and opens the benchmark's
    /// lockspace in each. On a failure the sessions already made are logged out.
    async fn login(
        args: &Args,
        servers: &Servers,
        nodes: Range<usize>,
    ) -> anyhow::Result<Sessions> {
        let mut s = Sessions {
            clients: Vec::new(),
            lockspaces: Vec::new(),
        };
        for i in nodes {
            let node = args.node(i);
            let attempt = async {
                let client =
                    Client::connect(ClientConfig::new(servers.addrs.clone(), node.as_str()))
                        .await?;
                let ls = match client
                    .open_lockspace(&args.lockspace, LockspaceOptions::default())
                    .await
                {
                    Ok(ls) => ls,
                    Err(e) => {
                        let _ = client.logout().await;
                        return Err(e);
                    }
                };
                Ok::<_, lockd_client::Error>((client, ls))
            };
            match attempt.await {
                Ok((client, ls)) => {
                    s.clients.push(client);
                    s.lockspaces.push(ls);
                }
                Err(e) => {
                    s.logout().await;
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot log in as {node} (a node holds one session at a time: is \
                         another benchmark or client logged in as it?)"
                    )));
                }
            }
        }
        Ok(s)
    }

    /// Logs every session out (the servers release their locks); errors are reported,
    /// not returned, so one failure does not keep the other nodes logged in.
    async fn logout(self) {
        drop(self.lockspaces);
        for c in self.clients {
            let node = c.node().to_string();
            if let Err(e) = c.logout().await {
                progress!("logout of {node} failed: {e}");
            }
        }
    }
}

/// The common JSON fields and table row of a load phase.
fn load_outcome(workload: &str, r: &LoadResult, fields: Value, note: String) -> Outcome {
    let mut json = json!({
        "workload": workload,
        "pairs_per_s": round1(r.pairs_per_s()),
        "p50_us": r.quantile_us(0.5),
        "p99_us": r.quantile_us(0.99),
        "p999_us": r.quantile_us(0.999),
        "max_us": r.acquire_us.max(),
        "pairs": r.pairs,
        "duration_s": r.measured.as_secs_f64(),
        "errors": r.errors,
        "server_cpu_pct": opt_list(&r.cpu.servers.iter().map(|c| c.map(round1)).collect::<Vec<_>>()),
        "bench_cpu_pct": r.cpu.bench.map(round1),
        "host_cpu_busy_pct": r.cpu.host.map(round1),
        "others_cpu_pct": r.cpu.others.map(round1),
        "server_cpu_us_per_pair": r.server_cpu_us_per_pair().map(round1),
    });
    merge(&mut json, fields);
    if let Some(e) = &r.first_error {
        json["first_error"] = Value::from(e.as_str());
    }
    let mut note = note;
    if r.errors > 0 {
        note = format!(
            "{note}; {} errors, first: {}",
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        );
    }
    Outcome {
        json,
        row: Row {
            workload: workload.to_string(),
            pairs_per_s: Some(r.pairs_per_s()),
            p50_us: Some(r.quantile_us(0.5)),
            p99_us: Some(r.quantile_us(0.99)),
            p999_us: Some(r.quantile_us(0.999)),
            server_cpu_us_per_pair: r.server_cpu_us_per_pair(),
            note,
        },
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(into), Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

/// A plain load phase: log in, run, log out.
async fn simple_load(
    args: &Args,
    servers: &Arc<Servers>,
    name: &str,
    workers: usize,
    resources: usize,
    sessions: usize,
    resource_type: u32,
) -> anyhow::Result<Outcome> {
    let sessions = sessions.clamp(1, workers.max(1));
    progress!(
        "{name}: {workers} workers over {resources} resources, {sessions} sessions, {} s",
        args.duration
    );
    let s = Sessions::login(args, servers, 0..sessions).await?;
    let spec = LoadSpec::new(
        workers,
        resources,
        resource_type,
        args.warmup(),
        args.duration(),
    );
    let r = load::run(&s.lockspaces, &spec, servers).await;
    s.logout().await;
    let note = format!(
        "{workers} workers / {resources} resources / {sessions} sessions; {}",
        cpu_note(&r.cpu)
    );
    Ok(load_outcome(
        name,
        &r,
        json!({"workers": workers, "resources": resources, "sessions": sessions}),
        note,
    ))
}

/// W1 uncontended: every worker its own resource.
pub async fn w1(args: &Args, servers: &Arc<Servers>) -> anyhow::Result<Outcome> {
    simple_load(
        args,
        servers,
        "w1",
        args.workers,
        args.workers,
        args.sessions,
        TYPE_W1,
    )
    .await
}

/// W2 contended: the workers share `--resources` resources.
pub async fn w2(args: &Args, servers: &Arc<Servers>) -> anyhow::Result<Outcome> {
    simple_load(
        args,
        servers,
        "w2",
        args.workers,
        args.resources,
        args.sessions,
        TYPE_W2,
    )
    .await
}

/// W3 latency: one worker, one session.
pub async fn w3(args: &Args, servers: &Arc<Servers>) -> anyhow::Result<Outcome> {
    simple_load(args, servers, "w3", 1, 1, 1, TYPE_W3).await
}

/// What w5's killer did.
struct Kill {
    at: Instant,
    server_id: u64,
    pid: u32,
    /// Until another server reported itself leader, and its id.
    elected: Option<(Duration, u64)>,
}

/// W5 failover: w1's load; kill -9 the leader after `--kill-after` s; the longest stall
/// any worker saw and the time until the rate is back to 90% of before.
pub async fn w5(args: &Args, servers: &Arc<Servers>) -> anyhow::Result<Outcome> {
    let duration = args.duration();
    let kill_after = match args.kill_after {
        Some(s) if s > 0.0 => Duration::from_secs_f64(s),
        Some(_) => bail!("--kill-after must be positive"),
        None => (duration / 3).max(Duration::from_secs(1)),
    };
    if kill_after + Duration::from_secs(2) > duration {
        bail!(
            "w5 needs at least 2 s of load after the kill: --duration {} is too short for --kill-after {:.1}",
            args.duration,
            kill_after.as_secs_f64()
        );
    }
    let sessions = args.sessions.clamp(1, args.workers.max(1));
    progress!(
        "w5: {} workers, {sessions} sessions, {} s; kill -9 of the leader after {:.1} s",
        args.workers,
        args.duration,
        kill_after.as_secs_f64()
    );
    let s = Sessions::login(args, servers, 0..sessions).await?;
    let mut spec = LoadSpec::new(args.workers, args.workers, TYPE_W5, args.warmup(), duration);
    spec.timeline = true;
    let kill_at = spec.start + kill_after;
    let killer = {
        let servers = Arc::clone(servers);
        tokio::spawn(async move {
            tokio::time::sleep_until(kill_at.into()).await;
            let (idx, st) = servers.leader().await.context("no leader to kill")?;
            let at = Instant::now();
            let pid = servers.kill9(idx)?;
            progress!("w5: killed the leader, server {} (pid {pid})", st.id);
            let mut elected = None;
            while at.elapsed() < Duration::from_secs(15) {
                if let Some((j, new)) = servers.leader().await {
                    if j != idx {
                        elected = Some((at.elapsed(), new.id));
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some((t, id)) = elected {
                progress!(
                    "w5: server {id} is the leader {} ms after the kill",
                    t.as_millis()
                );
            }
            Ok::<_, anyhow::Error>(Kill {
                at,
                server_id: st.id,
                pid,
                elected,
            })
        })
    };
    let r = load::run(&s.lockspaces, &spec, servers).await;
    let kill = killer.await;
    s.logout().await;
    let kill = kill.context("the killer task panicked")??;

    let f = failover_stats(&r.timeline, spec.start, kill.at);
    let fields = json!({
        "workers": args.workers,
        "sessions": sessions,
        "killed_server": kill.server_id,
        "killed_pid": kill.pid,
        "kill_after_s": round1(kill_after.as_secs_f64()),
        "new_leader": kill.elected.map(|e| e.1),
        "election_ms": kill.elected.map(|e| e.0.as_millis() as u64),
        "pairs_per_s_before": round1(f.before_rate),
        "max_stall_ms": r.max_gap.as_millis() as u64,
        "zero_throughput_ms": f.zero_run.as_millis() as u64,
        "recovery_ms": f.recovery.map(|d| d.as_millis() as u64),
        "pairs_per_s_after": f.after_rate.map(round1),
    });
    let note = format!(
        "stall {} ms (longest per worker), rate back to >=90% of {:.0}/s after {}, leader elected after {}; {}",
        r.max_gap.as_millis(),
        f.before_rate,
        f.recovery
            .map_or_else(|| "never".to_string(), |d| format!("{} ms", d.as_millis())),
        kill.elected
            .map_or_else(|| "?".to_string(), |e| format!("{} ms", e.0.as_millis())),
        cpu_note(&r.cpu)
    );
    Ok(load_outcome("w5", &r, fields, note))
}

struct FailoverStats {
    before_rate: f64,
    /// From the kill until the first [`RECOVERY_WINDOW`] that starts with completions and
    /// whose rate is at least 90% of `before_rate`.
    recovery: Option<Duration>,
    /// The rate from that point to the end.
    after_rate: Option<f64>,
    /// The longest run of buckets in which no worker completed a pair.
    zero_run: Duration,
}

fn failover_stats(timeline: &[u32], start: Instant, kill: Instant) -> FailoverStats {
    let bucket_s = BUCKET.as_secs_f64();
    let kill_b =
        ((kill.saturating_duration_since(start)).as_micros() / BUCKET.as_micros()) as usize;
    let kill_b = kill_b.min(timeline.len());
    let before: u64 = timeline[..kill_b].iter().map(|&c| u64::from(c)).sum();
    let before_rate = before as f64 / (kill_b.max(1) as f64 * bucket_s);
    let window = (RECOVERY_WINDOW.as_micros() / BUCKET.as_micros()) as usize;
    let mut recovery = None;
    let mut after_rate = None;
    let mut b = kill_b;
    while b + window <= timeline.len() {
        let sum: u64 = timeline[b..b + window].iter().map(|&c| u64::from(c)).sum();
        // The window must start with completions, or it could begin inside the stall.
        if timeline[b] > 0 && sum as f64 / RECOVERY_WINDOW.as_secs_f64() >= 0.9 * before_rate {
            let at = start + BUCKET * b as u32;
            recovery = Some(at.saturating_duration_since(kill));
            let rest: u64 = timeline[b..].iter().map(|&c| u64::from(c)).sum();
            after_rate = Some(rest as f64 / ((timeline.len() - b) as f64 * bucket_s));
            break;
        }
        b += 1;
    }
    let mut zero_run = 0usize;
    let mut run = 0usize;
    // The last bucket is partial; leave it out.
    for &c in &timeline[..timeline.len().saturating_sub(1)] {
        run = if c == 0 { run + 1 } else { 0 };
        zero_run = zero_run.max(run);
    }
    FailoverStats {
        before_rate,
        recovery,
        after_rate,
        zero_run: BUCKET * zero_run as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failover_stats_find_the_stall_and_the_recovery() {
        // 100 pairs per 10 ms for 1 s, nothing for 0.8 s, then 95 per bucket for 1 s.
        let mut t = vec![100u32; 100];
        t.extend(vec![0; 80]);
        t.extend(vec![95; 100]);
        let start = Instant::now();
        let kill = start + Duration::from_millis(1000);
        let f = failover_stats(&t, start, kill);
        assert!((f.before_rate - 10_000.0).abs() < 1.0);
        assert_eq!(f.zero_run, Duration::from_millis(800));
        assert_eq!(f.recovery, Some(Duration::from_millis(800)));
        assert!((f.after_rate.unwrap() - 9_500.0).abs() < 1.0);
    }

    #[test]
    fn failover_stats_without_recovery() {
        let mut t = vec![100u32; 100];
        t.extend(vec![10; 100]);
        let start = Instant::now();
        let f = failover_stats(&t, start, start + Duration::from_secs(1));
        assert_eq!(f.recovery, None);
        assert_eq!(f.after_rate, None);
    }
}
