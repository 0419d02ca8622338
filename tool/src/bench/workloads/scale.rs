//! W4 scale: the table filled with held locks, the servers' memory per held lock, w1's
//! load on top, and the release.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockd_client::{LockGuard, LockOptions, Lockspace, Mode, Resource};
use serde_json::json;

use super::super::args::Args;
use super::super::cluster::Servers;
use super::super::load::{self, LoadResult, LoadSpec};
use super::super::report::{cpu_note, opt_list, round1, Outcome, Row};
use super::super::{progress, stopped};
use super::{load_outcome, merge, Sessions, TYPE_W4_HELD, TYPE_W4_LOAD};

/// How often the fill reports progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// One attempt of a fill lock may take this long before it is retried.
const FILL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// W4 scale: fill the table with `--locks` held locks over `--w4-nodes` sessions, read the
/// servers' RSS before, halfway and after, run w1's load on top, then log out (releasing
/// them).
///
/// Two memory figures per server: the whole growth divided by the locks held, and the
/// growth of the second half divided by its locks (the marginal cost: fixed costs such as
/// caches and buffers that grow at the start are left out).
pub async fn w4(
    args: &Args,
    servers: &Arc<Servers>,
    w1_rate: Option<f64>,
) -> anyhow::Result<Outcome> {
    let nodes = args.w4_nodes.max(1);
    let target = args.locks;
    progress!(
        "w4: holding {target} locks over {nodes} sessions ({} requests in flight), then w1 load for {} s",
        args.fill_concurrency,
        args.duration
    );
    let s = Sessions::login(args, servers, 0..nodes).await?;
    let rss_before = settled_rss(servers).await;
    let before_locks = servers.leader().await.map(|(_, st)| st.held_locks);
    progress!("w4: server RSS before: {}", kib_list(&rss_before));

    let filled = fill_in_halves(&s.lockspaces, target, args.fill_concurrency, servers).await;
    let held = filled.guards.len() as u64;
    let rss_after = settled_rss(servers).await;
    let table_locks = servers.leader().await.map(|(_, st)| st.held_locks);
    let added = match (table_locks, before_locks) {
        (Some(a), Some(b)) if a > b => a - b,
        _ => held,
    };
    let per_lock = bytes_per_lock(&rss_before, &rss_after, added);
    let marginal = bytes_per_lock(&filled.rss_mid, &rss_after, held - filled.held_mid);
    progress!(
        "w4: server RSS after: {}; bytes per held lock {} (second half only: {})",
        kib_list(&rss_after),
        bytes_list(&per_lock),
        bytes_list(&marginal)
    );

    let mut load_result = None;
    if !stopped() && filled.error.is_none() {
        load_result = Some(load_while_held(args, &s.lockspaces, servers, held).await);
    }
    let (release_s, rss_released) = release(s, filled.guards, servers, held, nodes).await;

    let report = Report {
        target,
        nodes,
        held,
        table_locks,
        fill_time: filled.time,
        fill_error: filled.error,
        rss: [rss_before, filled.rss_mid, rss_after, rss_released],
        per_lock,
        marginal,
        release_s,
    };
    Ok(report.outcome(load_result, w1_rate))
}

/// W1's load on top of the held locks.
async fn load_while_held(
    args: &Args,
    lockspaces: &[Lockspace],
    servers: &Arc<Servers>,
    held: u64,
) -> LoadResult {
    progress!(
        "w4: w1 load ({} workers) while {held} locks are held",
        args.workers
    );
    let spec = LoadSpec::new(
        args.workers,
        args.workers,
        TYPE_W4_LOAD,
        args.warmup(),
        args.duration(),
    );
    load::run(lockspaces, &spec, servers).await
}

/// Logs the `nodes` sessions out, which releases the `held` locks: the seconds that
/// took, and every server's RSS afterwards.
async fn release(
    s: Sessions,
    guards: Vec<LockGuard>,
    servers: &Servers,
    held: u64,
    nodes: usize,
) -> (f64, Vec<Option<u64>>) {
    progress!("w4: releasing {held} locks (logging {nodes} sessions out)");
    let released_at = Instant::now();
    s.logout().await;
    let release_s = released_at.elapsed().as_secs_f64();
    drop(guards); // after the logout: the guards know their locks are gone
    let rss_released = settled_rss(servers).await;
    progress!(
        "w4: released in {release_s:.1} s; server RSS after release: {}",
        kib_list(&rss_released)
    );
    (release_s, rss_released)
}

/// What filling the table came to.
struct Filled {
    guards: Vec<LockGuard>,
    /// Locks held, and every server's RSS, halfway.
    held_mid: u64,
    rss_mid: Vec<Option<u64>>,
    /// The time spent filling (not reading RSS).
    time: Duration,
    /// Why the fill stopped early, if it did.
    error: Option<String>,
}

/// Takes `target` locks in two halves, reading the servers' RSS in between; the second
/// half only if the first completed.
async fn fill_in_halves(
    lockspaces: &[Lockspace],
    target: u64,
    concurrency: usize,
    servers: &Arc<Servers>,
) -> Filled {
    let half = target / 2;
    let started = Instant::now();
    let mut guards = Vec::with_capacity(target.min(16_000_000) as usize);
    let mut error = fill(
        lockspaces,
        0..half,
        target,
        concurrency,
        servers,
        &mut guards,
    )
    .await;
    let mut time = started.elapsed();
    let held_mid = guards.len() as u64;
    let rss_mid = settled_rss(servers).await;
    progress!(
        "w4: halfway, {held_mid} locks held: server RSS {}",
        kib_list(&rss_mid)
    );
    if error.is_none() {
        let second = Instant::now();
        error = fill(
            lockspaces,
            half..target,
            target,
            concurrency,
            servers,
            &mut guards,
        )
        .await;
        time += second.elapsed();
    }
    let held = guards.len() as u64;
    progress!(
        "w4: {held} locks held after {:.1} s of filling ({:.0} locks/s){}",
        time.as_secs_f64(),
        fill_rate(held, time),
        error
            .as_deref()
            .map_or_else(String::new, |e| format!("; stopped early: {e}"))
    );
    Filled {
        guards,
        held_mid,
        rss_mid,
        time,
        error,
    }
}

fn fill_rate(held: u64, time: Duration) -> f64 {
    held as f64 / time.as_secs_f64().max(1e-9)
}

/// W4's figures, for its JSON line and table row.
struct Report {
    target: u64,
    nodes: usize,
    held: u64,
    table_locks: Option<u64>,
    fill_time: Duration,
    fill_error: Option<String>,
    /// Every server's RSS in KiB: before, halfway, after the fill, after the release.
    rss: [Vec<Option<u64>>; 4],
    per_lock: Vec<Option<f64>>,
    marginal: Vec<Option<f64>>,
    release_s: f64,
}

impl Report {
    /// The outcome, with the load's figures when the load ran.
    fn outcome(self, load_result: Option<LoadResult>, w1_rate: Option<f64>) -> Outcome {
        let held = self.held;
        let fill_rate = fill_rate(held, self.fill_time);
        let max_per_lock = max_of(&self.per_lock);
        let max_marginal = max_of(&self.marginal);
        let [rss_before, rss_mid, rss_after, rss_released] = &self.rss;
        let fields = json!({
            "locks": self.target,
            "held": held,
            "table_locks": self.table_locks,
            "nodes": self.nodes,
            "fill_s": round1(self.fill_time.as_secs_f64()),
            "fill_locks_per_s": round1(fill_rate),
            "fill_error": self.fill_error,
            "rss_before_kib": opt_list(rss_before),
            "rss_half_kib": opt_list(rss_mid),
            "rss_after_kib": opt_list(rss_after),
            "rss_after_release_kib": opt_list(rss_released),
            "bytes_per_lock": opt_list(&self.per_lock.iter().map(|b| b.map(round1)).collect::<Vec<_>>()),
            "max_bytes_per_lock": max_per_lock.map(round1),
            "marginal_bytes_per_lock": opt_list(&self.marginal.iter().map(|b| b.map(round1)).collect::<Vec<_>>()),
            "max_marginal_bytes_per_lock": max_marginal.map(round1),
            "release_s": round1(self.release_s),
            "w1_pairs_per_s": w1_rate.map(round1),
        });
        let fmt_b = |b: Option<f64>| b.map_or_else(|| "?".to_string(), |b| format!("{b:.0}"));
        let mem_note = format!(
            "{held} locks held, {} B/lock ({} B/lock marginal; max over servers), fill {fill_rate:.0} locks/s",
            fmt_b(max_per_lock),
            fmt_b(max_marginal),
        );
        match load_result {
            Some(r) => {
                let ratio = w1_rate.filter(|w| *w > 0.0).map_or_else(String::new, |w| {
                    format!(", {:.0}% of w1", r.pairs_per_s() / w * 100.0)
                });
                let note = format!("{mem_note}; load while held{ratio}; {}", cpu_note(&r.cpu));
                load_outcome("w4", &r, fields, note)
            }
            None => {
                let mut json = json!({"workload": "w4"});
                merge(&mut json, fields);
                Outcome {
                    json,
                    row: Row {
                        workload: "w4".into(),
                        pairs_per_s: None,
                        p50_us: None,
                        p99_us: None,
                        p999_us: None,
                        server_cpu_us_per_pair: None,
                        note: mem_note,
                    },
                }
            }
        }
    }
}
/// Every server's RSS once all of them applied everything committed and any snapshot
/// that triggered had time to finish.
async fn settled_rss(servers: &Servers) -> Vec<Option<u64>> {
    if !servers.wait_applied(Duration::from_secs(120)).await {
        progress!("w4: the servers have not all caught up after 120 s; reading RSS anyway");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    servers.rss_kib()
}

/// Per server: (after - before) / locks, in bytes.
fn bytes_per_lock(before: &[Option<u64>], after: &[Option<u64>], locks: u64) -> Vec<Option<f64>> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| match (b, a) {
            (Some(b), Some(a)) if locks > 0 => {
                Some((*a as f64 - *b as f64) * 1024.0 / locks as f64)
            }
            _ => None,
        })
        .collect()
}

fn max_of(v: &[Option<f64>]) -> Option<f64> {
    v.iter()
        .flatten()
        .copied()
        .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
}

fn bytes_list(v: &[Option<f64>]) -> String {
    v.iter()
        .map(|b| b.map_or_else(|| "?".to_string(), |b| format!("{b:.0}")))
        .collect::<Vec<_>>()
        .join("/")
}

fn kib_list(v: &[Option<u64>]) -> String {
    v.iter()
        .map(|k| {
            k.map_or_else(
                || "?".to_string(),
                |k| format!("{:.1} MiB", k as f64 / 1024.0),
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the fill tasks share.
struct FillState {
    /// The number of the next resource to lock.
    next: AtomicU64,
    /// Locks held so far (for the progress lines).
    held: AtomicU64,
    /// Set when a lock failed for good: every task stops.
    abort: AtomicBool,
    /// The first reason the fill stopped early.
    error: Mutex<Option<String>>,
}

impl FillState {
    fn stop_with(&self, error: String) {
        self.error
            .lock()
            .expect("not poisoned")
            .get_or_insert(error);
    }
}

/// Takes EX locks on the resources numbered `range` (of `target` in all, for the
/// progress lines), at most `concurrency` requests in flight, spread over the sessions,
/// and appends the guards to `guards`. Stops early on Ctrl-C or when a lock fails three
/// times in a row (e.g. a table limit); returns why.
async fn fill(
    lockspaces: &[Lockspace],
    range: Range<u64>,
    target: u64,
    concurrency: usize,
    servers: &Arc<Servers>,
    guards: &mut Vec<LockGuard>,
) -> Option<String> {
    let state = Arc::new(FillState {
        next: AtomicU64::new(range.start),
        held: AtomicU64::new(guards.len() as u64),
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
    });
    let tasks: Vec<_> = (0..concurrency.max(1))
        .map(|k| {
            let ls = lockspaces[k % lockspaces.len()].clone();
            tokio::spawn(fill_task(ls, range.end, Arc::clone(&state)))
        })
        .collect();
    // Progress until the fillers are done.
    let reporter = tokio::spawn(fill_progress(
        Arc::clone(&state),
        Arc::clone(servers),
        target,
    ));
    for t in tasks {
        match t.await {
            Ok(mut g) => guards.append(&mut g),
            Err(e) => state.stop_with(format!("a fill task panicked: {e}")),
        }
    }
    reporter.abort();
    let error = state.error.lock().expect("not poisoned").take();
    error.or_else(|| stopped().then(|| "interrupted".to_string()))
}

/// One filler: takes the next resource number until `end`, an abort or Ctrl-C; returns
/// its guards.
async fn fill_task(ls: Lockspace, end: u64, state: Arc<FillState>) -> Vec<LockGuard> {
    let mut guards = Vec::new();
    loop {
        let i = state.next.fetch_add(1, Ordering::Relaxed);
        if i >= end || state.abort.load(Ordering::Relaxed) || stopped() {
            break;
        }
        match lock_ex(&ls, i).await {
            Ok(g) => {
                guards.push(g);
                state.held.fetch_add(1, Ordering::Relaxed);
            }
            Err(last_err) => {
                state.abort.store(true, Ordering::Relaxed);
                state.stop_with(format!("lock {i} failed 3 times: {last_err}"));
                break;
            }
        }
    }
    guards
}

/// Resource `i` locked EX, in at most three attempts 100 ms apart; else the last error.
async fn lock_ex(ls: &Lockspace, i: u64) -> Result<LockGuard, String> {
    let res = Resource::gfs(TYPE_W4_HELD, i);
    let mut last_err = String::new();
    for _ in 0..3 {
        let attempt = ls.lock(&res, Mode::Ex, LockOptions::new());
        match tokio::time::timeout(FILL_ATTEMPT_TIMEOUT, attempt).await {
            Ok(Ok(g)) => return Ok(g),
            Ok(Err(e)) => last_err = e.to_string(),
            Err(_) => last_err = format!("no grant within {} s", FILL_ATTEMPT_TIMEOUT.as_secs()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last_err)
}

/// A progress line every [`PROGRESS_EVERY`]: locks held, rate, eta, largest RSS.
async fn fill_progress(state: Arc<FillState>, servers: Arc<Servers>, target: u64) {
    let mut last = (Instant::now(), state.held.load(Ordering::Relaxed));
    loop {
        tokio::time::sleep(PROGRESS_EVERY).await;
        let (now, n) = (Instant::now(), state.held.load(Ordering::Relaxed));
        let rate = (n - last.1) as f64 / (now - last.0).as_secs_f64();
        let eta = if rate > 0.0 {
            format!("{:.0} s", (target.saturating_sub(n)) as f64 / rate)
        } else {
            "?".into()
        };
        let rss: u64 = servers
            .rss_kib()
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0);
        progress!(
            "w4: {n}/{target} locks held ({:.1}%), {rate:.0} locks/s, eta {eta}, largest server RSS {:.0} MiB",
            n as f64 * 100.0 / target.max(1) as f64,
            rss as f64 / 1024.0
        );
        last = (now, n);
    }
}
