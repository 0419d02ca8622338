//! `lockd-bench`: runs BRIEF §4.1's workloads against a running cluster.
//!
//! - `args` — the command line.
//! - `cluster` — the servers as processes: Status, leader, pids, RSS, CPU, kill.
//! - `load` — the lock/unlock worker loop and its measurements.
//! - `workloads` — w1..w5 built from those.
//! - `report` — JSON lines and the closing table.
//! - `compare` — the fdatasync probe and the etcd/ZooKeeper reference comparison.

mod args;
mod cluster;
mod compare;
mod load;
mod report;
mod workloads;

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

use args::{Args, Workload};
use cluster::Servers;

/// Set on Ctrl-C: the workloads wind down and log out, so the nodes can log in again.
static STOP: AtomicBool = AtomicBool::new(false);

/// True once Ctrl-C was pressed.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

/// A progress line on stderr.
macro_rules! progress {
    ($($arg:tt)*) => {{
        eprintln!("lockd-bench: {}", format_args!($($arg)*));
    }};
}
pub(crate) use progress;

pub fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lockd-bench: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lockd-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    tokio::spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            progress!("interrupted: winding down and logging out");
            STOP.store(true, Ordering::Relaxed);
        }
    });
    let references = args
        .reference
        .iter()
        .map(|p| compare::Reference::read_file(p))
        .collect::<anyhow::Result<Vec<_>>>()?
        .concat();
    let fsync = match &args.fsync_probe {
        Some(dir) => {
            let f = compare::probe_fdatasync(dir, 1000, 2300)?;
            println!(
                "{}",
                serde_json::json!({"probe": "fdatasync", "bytes": 2300, "p50_us": f.p50_us, "p99_us": f.p99_us})
            );
            Some(f)
        }
        None => None,
    };
    let addrs = lockd_client::parse_servers(&args.servers)?;
    let servers = Arc::new(Servers::new(addrs, &args.pids)?);
    let needs_pids = args
        .workload
        .0
        .iter()
        .any(|w| matches!(w, Workload::W4 | Workload::W5));
    if needs_pids && !servers.all_pids_known() {
        anyhow::bail!(
            "w4 and w5 need every server's pid: pass --pids (found: {:?})",
            servers.pids
        );
    }
    let (leader, status) = servers.wait_for_leader(Duration::from_secs(20)).await?;
    progress!(
        "cluster `{}`: {} servers, leader {} ({}), pids {:?}",
        status.cluster_name,
        servers.addrs.len(),
        status.id,
        servers.addrs[leader],
        servers.pids
    );
    let mut rows = Vec::new();
    let mut w1_rate = None;
    for w in args.workload.0.clone() {
        if stopped() {
            break;
        }
        let outcome = match w {
            Workload::W1 => workloads::w1(&args, &servers).await,
            Workload::W2 => workloads::w2(&args, &servers).await,
            Workload::W3 => workloads::w3(&args, &servers).await,
            Workload::W4 => workloads::w4(&args, &servers, w1_rate).await,
            Workload::W5 => workloads::w5(&args, &servers).await,
        };
        match outcome {
            Ok(o) => {
                if w == Workload::W1 {
                    w1_rate = o.row.pairs_per_s;
                }
                o.emit();
                rows.push(o.row);
            }
            Err(e) => {
                report::table(&rows);
                return Err(e.context(format!("workload {w} failed")));
            }
        }
    }
    report::table(&rows);
    if !references.is_empty() || fsync.is_some() {
        compare::table(&rows, &references, fsync);
    }
    Ok(())
}
