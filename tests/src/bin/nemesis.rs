//! The long nemesis schedule, for soak runs outside CI:
//!
//!   cargo build -p lockd-tests --release --bins
//!   cargo run -p lockd-tests --release --bin nemesis -- --duration 30m --seed 42
//!
//! Options: `--duration <N>[s|m|h]` (default 5m), `--seed <u64>` (default: random,
//! printed), `--clients <N>` (default 5, at most 16), `--resources <N>` (default 4),
//! `--unsafe-release-on-expire` and `--unsafe-accept-from-fencing` (run against a
//! deliberately broken switch), `--zombie-weight <N>` (default 2),
//! `--netns <prefix>` (server-from-server partitions too: needs root; the runner
//! creates the namespaces `<prefix>-hub` and `<prefix>-s<id>`, runs itself again inside
//! the hub, and deletes them at the end).
//! Exits 1 on a violation, leaving the history directory in place. SIGTERM or SIGINT
//! (Ctrl-C) stops the run early: its servers and clients are killed, the namespaces
//! deleted, and it exits 1 without a report.

use lockd_tests::nemesis::run::{run, Options};
use std::time::Duration;

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse()?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => anyhow::bail!("bad duration {s:?}: use e.g. 90s, 30m, 2h"),
    }))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut opts = Options::new(rand_seed(), Duration::from_secs(300));
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--duration" => opts.duration = parse_duration(&value()?)?,
            "--seed" => opts.seed = value()?.parse()?,
            "--clients" => opts.clients = value()?.parse::<usize>()?.clamp(1, 16),
            "--resources" => opts.resources = value()?.parse::<u64>()?.max(1),
            "--unsafe-release-on-expire" => opts.unsafe_release_on_expire = true,
            "--unsafe-accept-from-fencing" => opts.unsafe_accept_from_fencing = true,
            "--zombie-weight" => opts.zombie_weight = value()?.parse()?,
            "--netns" => opts.netns = Some(value()?),
            _ => anyhow::bail!("unknown argument {a}; see the header of tests/src/bin/nemesis.rs"),
        }
    }
    if let Some(prefix) = &opts.netns {
        if std::env::var_os(IN_HUB).is_none() {
            return run_in_namespaces(prefix, opts.clone()).await;
        }
    }
    let client = lockd_tests::server_binary().with_file_name("lockd-nemesis-client");
    anyhow::ensure!(
        client.exists(),
        "{} is missing: run `cargo build -p lockd-tests --release --bins` first",
        client.display()
    );
    println!(
        "nemesis: seed {} duration {:?} clients {} resources {}{}{}",
        opts.seed,
        opts.duration,
        opts.clients,
        opts.resources,
        if opts.unsafe_release_on_expire {
            " UNSAFE-RELEASE-ON-EXPIRE"
        } else {
            ""
        },
        if opts.netns.is_some() {
            " with server partitions (network namespaces)"
        } else {
            " without server partitions"
        }
    );
    // Dropping `run`'s future (and, as main returns, the runtime's tasks) kills the
    // servers and clients it started.
    let outcome = tokio::select! {
        outcome = run(opts.clone()) => outcome?,
        signal = stop_signal() => anyhow::bail!("stopped by {}: servers and clients killed, no report", signal?),
    };
    print!("{}", outcome.report);
    if !outcome.report.violations.is_empty() {
        println!(
            "history kept in {} (seed {})",
            outcome.history_dir.display(),
            opts.seed
        );
        std::process::exit(1);
    }
    Ok(())
}

/// Set for the copy of the runner that runs inside the hub namespace.
const IN_HUB: &str = "LOCKD_NEMESIS_IN_HUB";

/// Creates the namespaces, runs this runner again inside the hub with the same
/// arguments (the seed made explicit), and deletes the namespaces afterwards; a
/// SIGTERM or SIGINT is passed on to that runner (`ip netns exec` execs it, so it has
/// the child's pid), which stops its servers and clients before the namespaces go.
async fn run_in_namespaces(prefix: &str, opts: Options) -> anyhow::Result<()> {
    let ns = lockd_tests::nemesis::netns::Namespaces::create(prefix, 3)?;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    args.extend(["--seed".to_string(), opts.seed.to_string()]);
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", &ns.hub()])
        .arg(std::env::current_exe()?)
        .args(&args)
        .env(IN_HUB, "1")
        .spawn()?;
    let status = tokio::select! {
        status = child.wait() => status?,
        signal = stop_signal() => {
            let signal = signal?;
            if let Some(pid) = child.id() {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
            }
            eprintln!("nemesis: {signal}: stopping the runner in the hub namespace");
            match tokio::time::timeout(std::time::Duration::from_secs(30), child.wait()).await {
                Ok(status) => status?,
                Err(_) => {
                    eprintln!("nemesis: the runner did not stop within 30 s: killing it");
                    child.kill().await?;
                    child.wait().await?
                }
            }
        }
    };
    drop(ns);
    std::process::exit(status.code().unwrap_or(1));
}

/// Resolves at the first SIGTERM or SIGINT, naming it.
async fn stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

fn rand_seed() -> u64 {
    lockd_tests::nemesis::history::now_us() ^ u64::from(std::process::id()).rotate_left(32)
}
