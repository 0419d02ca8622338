//! `lockd-bench`'s command line.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;

/// The default server list: a local 3-server cluster on loopback.
const DEFAULT_SERVERS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";

#[derive(Debug, Parser)]
#[command(
    name = "lockd-bench",
    version,
    args_override_self = true,
    about = "Lock throughput, latency, scale and failover benchmark for a lockd cluster",
    long_about = "lockd-bench runs BRIEF §4.1's workloads against a running lockd cluster:\n\
        \n\
        w1  uncontended: --workers workers, each its own resource, loop lock EX / unlock\n\
        w2  contended: --workers workers over --resources resources\n\
        w3  latency: 1 worker; acquire latency p50/p99/p999\n\
        w4  scale: hold --locks locks across --w4-nodes nodes; server RSS per held lock,\n\
        \x20   and the w1 rate while they are held\n\
        w5  failover: w1 load, kill -9 the leader after --kill-after s; longest stall\n\
        \x20   and the time until the rate is back to 90%\n\
        \n\
        It prints one JSON line per workload on stdout as each finishes, then a table. \
        Progress goes to stderr. w4 and w5 need the servers' pids (--pids, or found by \
        their listening sockets in /proc). w5 kills a server: run it last. \
        deploy/bench.sh starts a throw-away local cluster and runs everything."
)]
pub struct Args {
    /// Lock servers' client addresses, comma separated host:port list.
    #[arg(long, env = "LOCKD_SERVERS", default_value = DEFAULT_SERVERS, value_name = "HOST:PORT,...")]
    pub servers: String,

    /// Workloads to run, comma separated (w1..w5), or `all`. They always run in the order
    /// w1, w2, w3, w4, w5.
    #[arg(long, default_value = "w1,w2,w3", value_name = "W,...|all")]
    pub workload: WorkloadList,

    /// Measured seconds per workload (w4: of its w1 phase).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,

    /// Unmeasured warm-up before each timed phase, in milliseconds.
    #[arg(long, default_value_t = 500)]
    pub warmup_ms: u64,

    /// Concurrent workers of w1, w2, w4's load phase and w5.
    #[arg(long, default_value_t = 64)]
    pub workers: usize,

    /// Distinct resources of w2, shared round robin by the workers.
    #[arg(long, default_value_t = 8)]
    pub resources: usize,

    /// Sessions (nodes) the workers of w1, w2 and w5 are spread over, round robin; each
    /// session is one client with its own connections.
    #[arg(long, default_value_t = 4)]
    pub sessions: usize,

    /// Node names are <prefix>1, <prefix>2, ... (the dev cluster allows node1..node16).
    #[arg(long, default_value = "node")]
    pub node_prefix: String,

    /// The lockspace the benchmark locks in.
    #[arg(long, default_value = "bench")]
    pub lockspace: String,

    /// w4: how many locks to hold.
    #[arg(long, default_value_t = 1_000_000)]
    pub locks: u64,

    /// w4: the nodes (sessions) the held locks are spread over.
    #[arg(long, default_value_t = 16)]
    pub w4_nodes: usize,

    /// w4: lock requests in flight at once while filling.
    #[arg(long, default_value_t = 512)]
    pub fill_concurrency: usize,

    /// w5: seconds of load (after the warm-up) before the leader is killed.
    #[arg(long)]
    pub kill_after: Option<f64>,

    /// The servers' pids, in the order of --servers (w4's memory, w5's kill, and the
    /// per-server CPU shown for every workload). Without it they are looked up by their
    /// listening sockets in /proc.
    #[arg(long, value_delimiter = ',', value_name = "PID,...")]
    pub pids: Vec<u32>,

    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,

    /// A file of reference lines from shared/bench/etcd-workloads.sh or zk-workloads.sh
    /// (`W1 system=etcd … pairs_per_s=… acquire_p50_us=… acquire_p99_us=…`); repeat for
    /// several. A closing table then sets lockd beside them with its ratio to the better
    /// one and issue #17's goal.
    #[arg(long, value_name = "FILE")]
    pub reference: Vec<std::path::PathBuf>,

    /// Before the workloads, measure fdatasync of 2.3 KB appends (1,000 of them) in this
    /// directory, the disk the servers write to: the floor W3's goal is set from.
    #[arg(long, value_name = "DIR")]
    pub fsync_probe: Option<std::path::PathBuf>,
}

impl Args {
    pub fn warmup(&self) -> Duration {
        Duration::from_millis(self.warmup_ms)
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration)
    }

    /// The name of the `i`-th node, counting from 0.
    pub fn node(&self, i: usize) -> String {
        format!("{}{}", self.node_prefix, i + 1)
    }
}

/// One of the five workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Workload {
    W1,
    W2,
    W3,
    W4,
    W5,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::W1,
        Workload::W2,
        Workload::W3,
        Workload::W4,
        Workload::W5,
    ];
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Workload::W1 => "w1",
            Workload::W2 => "w2",
            Workload::W3 => "w3",
            Workload::W4 => "w4",
            Workload::W5 => "w5",
        };
        f.write_str(name)
    }
}

/// The workloads asked for, sorted and de-duplicated.
#[derive(Debug, Clone)]
pub struct WorkloadList(pub Vec<Workload>);

impl FromStr for WorkloadList {
    type Err = String;

    fn from_str(s: &str) -> Result<WorkloadList, String> {
        let mut out = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if part.eq_ignore_ascii_case("all") {
                out.extend(Workload::ALL);
                continue;
            }
            let w = Workload::ALL
                .into_iter()
                .find(|w| w.to_string().eq_ignore_ascii_case(part))
                .ok_or_else(|| format!("unknown workload {part:?} (expected w1..w5 or all)"))?;
            out.push(w);
        }
        if out.is_empty() {
            return Err("no workload given".into());
        }
        out.sort();
        out.dedup();
        Ok(WorkloadList(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_lists_parse_sort_and_dedup() {
        let l: WorkloadList = "w5, W1,w1".parse().unwrap();
        assert_eq!(l.0, vec![Workload::W1, Workload::W5]);
        let l: WorkloadList = "all".parse().unwrap();
        assert_eq!(l.0.len(), 5);
        assert!("w6".parse::<WorkloadList>().is_err());
        assert!(" , ".parse::<WorkloadList>().is_err());
    }

    #[test]
    fn args_parse() {
        let a = Args::try_parse_from([
            "lockd-bench",
            "--workload",
            "w4",
            "--locks",
            "1000",
            "--pids",
            "1,2,3",
            "--reference",
            "etcd.txt",
            "--reference",
            "zk.txt",
        ])
        .unwrap();
        assert_eq!(a.reference.len(), 2);
        assert_eq!(a.workload.0, vec![Workload::W4]);
        assert_eq!(a.pids, vec![1, 2, 3]);
        assert_eq!(a.node(0), "node1");
    }
}
