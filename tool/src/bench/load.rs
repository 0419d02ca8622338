//! The load loop shared by w1, w2, w3, w4's load phase and w5: workers that lock EX and
//! unlock in a loop, each on its resource, with acquire latencies in an HDR histogram,
//! the longest gap between two completed pairs per worker, and (for w5) completions per
//! 10 ms bucket.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use lockd_client::{LockOptions, Lockspace, Mode, Resource};

use super::cluster::{self, Servers};

/// The width of one timeline bucket.
pub const BUCKET: Duration = Duration::from_millis(10);

/// How long after the end of the window a worker's last lock may still wait before it
/// is abandoned (a lock that can never be granted must not hang the benchmark).
const LAST_CALL_GRACE: Duration = Duration::from_secs(10);

/// One timed load phase.
pub struct LoadSpec {
    /// Concurrent workers; worker `w` uses lockspace `w % lockspaces.len()`.
    pub workers: usize,
    /// Worker `w` locks resource `w % resources`.
    pub resources: usize,
    /// The resources are `Resource::gfs(resource_type, index)`, so phases do not share
    /// names.
    pub resource_type: u32,
    /// Measurement starts here (the time before it is warm-up) ...
    pub start: Instant,
    /// ... and ends here.
    pub end: Instant,
    /// Keep completions per [`BUCKET`] (w5).
    pub timeline: bool,
}

impl LoadSpec {
    /// A phase that starts measuring after `warmup` from now and lasts `duration`.
    pub fn new(
        workers: usize,
        resources: usize,
        resource_type: u32,
        warmup: Duration,
        duration: Duration,
    ) -> LoadSpec {
        let start = Instant::now() + warmup;
        LoadSpec {
            workers,
            resources: resources.max(1),
            resource_type,
            start,
            end: start + duration,
            timeline: false,
        }
    }

    pub fn measured(&self) -> Duration {
        self.end - self.start
    }
}

/// CPU used during the measured window: per process in percent of one core, the whole
/// machine in percent of all its cores.
#[derive(Debug, Clone, Default)]
pub struct CpuUse {
    pub servers: Vec<Option<f64>>,
    pub bench: Option<f64>,
    pub host: Option<f64>,
    /// What the rest of the machine used (host minus servers and bench), in % of one
    /// core: other load that disturbs the measurement.
    pub others: Option<f64>,
    /// CPU time of all servers together inside the window (user + system), when every
    /// server's pid is known.
    pub servers_total: Option<Duration>,
}

/// CPU times at one instant.
struct CpuSample {
    servers: Vec<Option<Duration>>,
    bench: Option<Duration>,
    host: Option<(u64, u64)>,
    at: Instant,
}

impl CpuUse {
    /// Samples every server, this process and the machine now.
    fn sample(servers: &Servers) -> CpuSample {
        CpuSample {
            servers: servers.cpu(),
            bench: cluster::own_cpu_time(),
            host: cluster::host_cpu_ticks(),
            at: Instant::now(),
        }
    }

    fn between(a: CpuSample, b: CpuSample) -> CpuUse {
        let wall = (b.at - a.at).as_secs_f64().max(1e-9);
        let pct = |x: Option<Duration>, y: Option<Duration>| match (x, y) {
            (Some(x), Some(y)) if y >= x => Some((y - x).as_secs_f64() / wall * 100.0),
            _ => None,
        };
        let host = match (a.host, b.host) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 && b1 >= b0 => {
                Some((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0)
            }
            _ => None,
        };
        let servers: Vec<Option<f64>> = a
            .servers
            .iter()
            .zip(&b.servers)
            .map(|(x, y)| pct(*x, *y))
            .collect();
        let bench = pct(a.bench, b.bench);
        let ours: f64 = servers.iter().flatten().sum::<f64>() + bench.unwrap_or(0.0);
        let others = host.map(|h| (h * cluster::cores() as f64 - ours).max(0.0));
        let servers_total = a
            .servers
            .iter()
            .zip(&b.servers)
            .map(|(x, y)| match (x, y) {
                (Some(x), Some(y)) => y.checked_sub(*x),
                _ => None,
            })
            .sum::<Option<Duration>>();
        CpuUse {
            servers,
            bench,
            host,
            others,
            servers_total,
        }
    }
}

/// What one phase measured.
pub struct LoadResult {
    /// Lock/unlock pairs completed inside the window.
    pub pairs: u64,
    pub measured: Duration,
    /// Acquire latency (lock call until granted), microseconds, of locks asked inside the
    /// window.
    pub acquire_us: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The longest time any worker went without completing a pair, inside the window.
    pub max_gap: Duration,
    /// Completions per [`BUCKET`] from `start` (empty unless asked for).
    pub timeline: Vec<u32>,
    pub cpu: CpuUse,
}

impl LoadResult {
    pub fn pairs_per_s(&self) -> f64 {
        self.pairs as f64 / self.measured.as_secs_f64()
    }

    pub fn quantile_us(&self, q: f64) -> u64 {
        self.acquire_us.value_at_quantile(q)
    }

    /// Server CPU microseconds per lock/unlock pair, summed over every server (the
    /// per-entry cost issue #17 compares with etcd's and ZooKeeper's ~1.2 ms).
    pub fn server_cpu_us_per_pair(&self) -> Option<f64> {
        let total = self.cpu.servers_total?;
        (self.pairs > 0).then(|| total.as_secs_f64() * 1e6 / self.pairs as f64)
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to one hour at 3 significant digits; larger values saturate.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

struct WorkerOut {
    pairs: u64,
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
    max_gap: Duration,
}

/// Runs the phase over `lockspaces` (one per session) and waits for every worker.
pub async fn run(lockspaces: &[Lockspace], spec: &LoadSpec, servers: &Arc<Servers>) -> LoadResult {
    assert!(!lockspaces.is_empty(), "a load phase needs a session");
    let buckets = if spec.timeline {
        (spec.measured().as_millis() / BUCKET.as_millis()) as usize + 1
    } else {
        0
    };
    let timeline: Arc<Vec<AtomicU32>> = Arc::new((0..buckets).map(|_| AtomicU32::new(0)).collect());
    let cpu = {
        let servers = Arc::clone(servers);
        let (start, end) = (spec.start, spec.end);
        tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let a = CpuUse::sample(&servers);
            tokio::time::sleep_until(end.into()).await;
            CpuUse::between(a, CpuUse::sample(&servers))
        })
    };
    let workers: Vec<_> = (0..spec.workers)
        .map(|w| {
            let ls = lockspaces[w % lockspaces.len()].clone();
            let res = Resource::gfs(spec.resource_type, (w % spec.resources) as u64);
            tokio::spawn(worker(ls, res, spec.start, spec.end, Arc::clone(&timeline)))
        })
        .collect();
    let mut out = LoadResult {
        pairs: 0,
        measured: spec.measured(),
        acquire_us: new_histogram(),
        errors: 0,
        first_error: None,
        max_gap: Duration::ZERO,
        timeline: Vec::new(),
        cpu: CpuUse::default(),
    };
    for w in workers {
        match w.await {
            Ok(w) => {
                out.pairs += w.pairs;
                out.acquire_us.add(&w.hist).expect("same histogram bounds");
                out.errors += w.errors;
                out.max_gap = out.max_gap.max(w.max_gap);
                if out.first_error.is_none() {
                    out.first_error = w.first_error;
                }
            }
            Err(e) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert(format!("worker panicked: {e}"));
            }
        }
    }
    out.cpu = cpu.await.unwrap_or_default();
    out.timeline = timeline.iter().map(|b| b.load(Ordering::Relaxed)).collect();
    out
}

async fn worker(
    ls: Lockspace,
    res: Resource,
    start: Instant,
    end: Instant,
    timeline: Arc<Vec<AtomicU32>>,
) -> WorkerOut {
    let mut out = WorkerOut {
        pairs: 0,
        hist: new_histogram(),
        errors: 0,
        first_error: None,
        max_gap: Duration::ZERO,
    };
    let mut last = start;
    loop {
        let asked = Instant::now();
        if asked >= end || super::stopped() {
            break;
        }
        let pair = async {
            let guard = ls.lock(&res, Mode::Ex, LockOptions::new()).await?;
            let acquired = asked.elapsed();
            guard.unlock().await?;
            Ok::<_, lockd_client::Error>(acquired)
        };
        let outcome = tokio::time::timeout_at((end + LAST_CALL_GRACE).into(), pair).await;
        let now = Instant::now();
        match outcome {
            Ok(Ok(acquired)) => {
                if now > start {
                    out.max_gap = out.max_gap.max(now - last);
                    last = now;
                    if now <= end {
                        out.pairs += 1;
                        if asked >= start {
                            out.hist.saturating_record(acquired.as_micros() as u64);
                        }
                        let b = ((now - start).as_millis() / BUCKET.as_millis()) as usize;
                        if let Some(bucket) = timeline.get(b) {
                            bucket.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            Ok(Err(e)) => {
                out.errors += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                out.errors += 1;
                out.first_error
                    .get_or_insert_with(|| "a lock was still waiting 10 s after the end".into());
            }
        }
    }
    // A worker stuck until the end stalled from its last completion to the end.
    let stop = Instant::now().min(end);
    if stop > last {
        out.max_gap = out.max_gap.max(stop - last);
    }
    out
}
