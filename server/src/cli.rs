//! The `lockd` command line: `run`, `dev`, `check-config`, and disaster recovery's
//! `snapshot inspect`, `restore`, `recover` (see `recovery.rs`). Lives in the library so the
//! test harness can build the very same binary.

use crate::config::Config;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lockd",
    version,
    about = "lockd: a Raft-replicated quorum lock manager for cluster file systems",
    after_help = "Environment: RUST_LOG sets the log filter (see [log] in the config); \
                  TOKIO_WORKER_THREADS the gRPC runtime's worker threads (default: one \
                  per core but one, which the Raft driver's thread keeps, at least 1)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one lock server of the cluster described by a config file.
    Run {
        /// The cluster's TOML config (the same file on every server).
        #[arg(long, short, env = "LOCKD_CONFIG")]
        config: PathBuf,
        /// This server's id in the config's [[servers]].
        #[arg(long, env = "LOCKD_ID")]
        id: u64,
        /// Overrides [storage].data_dir; the log goes to <data_dir>/server-<id>/.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Join a running cluster: with an empty data directory, wait to be added by
        /// `lockctl server add <id> <addr>` instead of starting a new cluster of the
        /// config's servers. Ignored once this server has a log.
        #[arg(long, env = "LOCKD_JOIN", conflicts_with = "bootstrap")]
        join: bool,
        /// Form a new cluster: with an empty data directory, create a new Raft log with
        /// the config's servers as voters. Give it to every server of a new cluster on
        /// its first start only (like etcd's --initial-cluster-state=new); ignored once
        /// this server has a log. Without --bootstrap or --join a server whose data
        /// directory holds no log refuses to start: a member that lost its data must
        /// be removed and rejoin, never vote again as if new.
        #[arg(long, env = "LOCKD_BOOTSTRAP")]
        bootstrap: bool,
    },
    /// Start a local cluster on loopback (3 servers on 127.0.0.1:7101-7103 by default)
    /// with a throw-away data directory; Ctrl-C stops all of them and removes it.
    Dev {
        /// Number of servers (1, 3, 4 or 5).
        #[arg(long, default_value_t = 3)]
        servers: u64,
        /// Server N listens on 127.0.0.1:<base-port + N>.
        #[arg(long, default_value_t = 7100)]
        base_port: u16,
        /// Keep the data here instead of a temporary directory (not removed on exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Validate a config file (and that its fence agents and TLS files exist here and
    /// parse) and exit: 0 if valid, 1 with the offending key if not.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
        /// Check the [tls] files of this server only (default: of every server, which
        /// only works where all their files are present, e.g. with `{id}` paths).
        #[arg(long)]
        id: Option<u64>,
    },
    /// Snapshot files: `inspect FILE` checks one (a `lockctl snapshot save` backup or
    /// a server's own snapshot-<index>.bin) and prints what it holds.
    Snapshot {
        #[command(subcommand)]
        command: SnapshotCmd,
    },
    /// Prepare this server's (empty) data directory for a NEW cluster incarnation from
    /// a backup: a new cluster identity (servers of the old one are refused), every
    /// session WasLoggedIn (a node that does not come back is fenced before its locks
    /// move), fencing tokens in the next epoch. Run it on every server of the new
    /// cluster with the same file and config, then start them with `lockd run`.
    Restore {
        /// The backup (`lockctl snapshot save FILE`).
        #[arg(long)]
        snapshot: PathBuf,
        #[arg(long, short, env = "LOCKD_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "LOCKD_ID")]
        id: u64,
        /// Overrides [storage].data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Start tokens above this too (e.g. the highest token a protected resource
        /// saw, or `lockctl status` of a survivor): by default the next epoch.
        #[arg(long, default_value_t = 0)]
        token_floor: u64,
    },
    /// On a stopped server whose peers are gone for good: make it the only voter of a
    /// new cluster incarnation, keeping its state (every entry of its log); then add
    /// servers back with `lockctl server add`. Refuses if another member answers.
    Recover {
        /// Required: says the operator knows the other servers are gone for good.
        #[arg(long, required = true)]
        force_new_cluster: bool,
        #[arg(long, short, env = "LOCKD_CONFIG")]
        config: PathBuf,
        #[arg(long, env = "LOCKD_ID")]
        id: u64,
        /// Overrides [storage].data_dir.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// As for `restore`.
        #[arg(long, default_value_t = 0)]
        token_floor: u64,
    },
    /// Write the man pages lockd.8 and lockd-<command>.8 into DIR (for packaging).
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Check a snapshot file against every rule and print what it holds.
    Inspect { file: PathBuf },
}

/// Parses the process arguments and runs the chosen command.
pub fn main() -> anyhow::Result<()> {
    keep_large_buffers_mapped();
    let cli = Cli::parse();
    crate::logging::init();
    exit_on_panic();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        runtime.worker_threads(runtime_workers());
    }
    runtime.enable_all().build()?.block_on(dispatch(cli))
}

/// Worker threads of the runtime that serves gRPC: one per core but the one the Raft
/// driver's own thread keeps busy, at least one (tokio's default, one per core, makes
/// the driver and the workers take turns on the same cores). On the benchmark's 2
/// cores with three servers, 1 worker each against 2: W1 +8%, W2 +9%, W3 p50 even
/// (three alternated runs each of `deploy/bench.sh 10 --workload w1,w2,w3`, issue 17).
/// `TOKIO_WORKER_THREADS` overrides it.
fn runtime_workers() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |cores| cores.get().saturating_sub(1))
        .max(1)
}

/// A server that cannot serve must exit, so that systemd restarts it: a panic on any
/// thread (the Raft driver's above all) logs its message and location, then ends the
/// process with status 70 (EX_SOFTWARE) instead of leaving it running half dead, its
/// port open and its health SERVING.
fn exit_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        tracing::error!(thread, "panic, stopping this server: {info}");
        eprintln!("lockd: panic on thread {thread}, stopping: {info}");
        let message = info.to_string();
        if message.contains("to_commit") && message.contains("out of range") {
            // raft-rs meets a leader that remembers this server acknowledging entries
            // its log no longer has: amnesia (issue 12).
            tracing::error!(
                "this server's Raft log is shorter than what it acknowledged to the leader: \
                 its data directory was wiped, replaced or restored from a backup. Never \
                 start it like this again: remove it (`lockctl server remove <id>`), empty \
                 its data directory and add it back (`lockd run --join`, then `lockctl \
                 server add <id> <addr>`)"
            );
        }
        std::process::exit(70);
    }));
}

/// `name.8` for `command`, then `name-<sub>.8` for each visible subcommand (clap_mangen
/// renders one command per page).
pub fn write_manpages(command: clap::Command, dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let command = command.version(env!("CARGO_PKG_VERSION"));
    let name = command.get_name().to_string();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.8")), page)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        let mut page = Vec::new();
        // clap names are &'static without its `string` feature; a few pages, once.
        let page_name: &'static str = Box::leak(sub_name.clone().into_boxed_str());
        clap_mangen::Man::new(sub.clone().name(page_name))
            .section("8")
            .render(&mut page)?;
        std::fs::write(dir.join(format!("{sub_name}.8")), page)?;
    }
    Ok(())
}

/// glibc's malloc raises its mmap threshold (up to 32 MiB) each time it frees a large
/// mapped block. After the first snapshot buffer is freed, every block below 32 MiB —
/// the lock table's chunk indexes, the next snapshot's buffer while it grows — comes
/// from the heap instead, and once freed its pages stay resident: at a million held
/// locks that doubled the server's RSS (BRIEF §4.1 W4). A fixed 1 MiB threshold keeps
/// large blocks mapped, so they grow with mremap and go back to the system when freed.
/// (The table's records sit in small chunks on the heap; `raft_node::trim` returns
/// them once the table shrinks.) Must run before any other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_large_buffers_mapped() {
    use std::ffi::c_int;
    const M_MMAP_THRESHOLD: c_int = -3;
    const THRESHOLD_BYTES: c_int = 1 << 20;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // SAFETY: mallopt only changes malloc's tuning; glibc documents M_MMAP_THRESHOLD
    // and this value is in its range. No other thread exists yet.
    let ok = unsafe { mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES) };
    debug_assert_eq!(ok, 1, "mallopt(M_MMAP_THRESHOLD) refused");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_large_buffers_mapped() {}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Run {
            config,
            id,
            data_dir,
            join,
            bootstrap,
        } => {
            // Before anything else: SIGHUP's default action would end the process
            // silently, and systemd would count that as a clean stop.
            let hangups = crate::reload::on_sighup(config.clone())?;
            let mut cfg = Config::load(&config)?;
            cfg.check_fence_agents()?;
            let filter = crate::logging::configured_filter(cfg.log.filter.as_deref(), true);
            if let Err(e) = crate::logging::set_filter(&filter) {
                tracing::warn!("{e}");
            }
            // server::run checks the TLS files again; here the error is the first line.
            cfg.load_tls(id)?;
            if let Some(dir) = data_dir {
                cfg.storage.data_dir = dir;
            }
            let start = match (join, bootstrap) {
                (true, _) => crate::raft_node::Start::Join,
                (false, true) => crate::raft_node::Start::Bootstrap,
                (false, false) => crate::raft_node::Start::Existing,
            };
            let served = crate::server::run(cfg, id, start, shutdown_signal()).await;
            hangups.abort();
            served
        }
        Cmd::Dev {
            servers,
            base_port,
            data_dir,
        } => crate::dev::run(servers, base_port, data_dir).await,
        Cmd::Manpages { dir } => {
            use clap::CommandFactory;
            write_manpages(Cli::command(), &dir)
        }
        Cmd::Snapshot {
            command: SnapshotCmd::Inspect { file },
        } => {
            print!("{}", crate::recovery::inspect(&file)?);
            Ok(())
        }
        Cmd::Restore {
            snapshot,
            config,
            id,
            data_dir,
            token_floor,
        } => {
            let cfg = load_with_dir(&config, data_dir)?;
            let done = crate::recovery::restore(&cfg, id, &snapshot, token_floor)?;
            println!("{done}");
            Ok(())
        }
        Cmd::Recover {
            force_new_cluster: _,
            config,
            id,
            data_dir,
            token_floor,
        } => {
            let cfg = load_with_dir(&config, data_dir)?;
            let done = crate::recovery::recover(&cfg, id, token_floor).await?;
            println!("{done}");
            Ok(())
        }
        Cmd::CheckConfig { config, id } => {
            let cfg = Config::load(&config)?;
            cfg.check_fence_agents()?;
            let ids = match id {
                Some(id) if cfg.server(id).is_none() => {
                    anyhow::bail!("server id {id} is not in the config's [[servers]]")
                }
                Some(id) => vec![id],
                None => cfg.servers.iter().map(|s| s.id).collect(),
            };
            for id in ids {
                cfg.load_tls(id)?;
            }
            println!(
                "{}: valid ({} servers, {} nodes)",
                config.display(),
                cfg.servers.len(),
                cfg.nodes.len()
            );
            Ok(())
        }
    }
}

fn load_with_dir(path: &std::path::Path, data_dir: Option<PathBuf>) -> anyhow::Result<Config> {
    let mut cfg = Config::load(path)?;
    if let Some(dir) = data_dir {
        cfg.storage.data_dir = dir;
    }
    Ok(cfg)
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("stopping on signal");
}
