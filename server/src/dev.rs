//! `lockd dev`: a local cluster on loopback in one command, for trying lockd out.
//!
//! Writes a dev config into a throw-away directory, starts one `lockd run` child
//! process per server (real processes, so `kill -9` of one shows a failover), waits for
//! a leader, prints how to reach it, and on Ctrl-C, SIGTERM or SIGHUP stops the
//! children (SIGTERM, so they stop cleanly; SIGKILL after a deadline) and removes the
//! directory. The children also get SIGKILL from the kernel if this process dies
//! without cleaning up (kill -9), so they never keep serving orphaned.

use crate::config::Config;
use anyhow::Context;
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::StatusRequest;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long to wait for the first leader before giving up.
const ELECTION_DEADLINE: Duration = Duration::from_secs(20);
/// How long the servers get to stop cleanly (a leader hands over first, then drains
/// for up to 5 s) before they are killed.
const STOP_DEADLINE: Duration = Duration::from_secs(10);

pub async fn run(servers: u64, base_port: u16, data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let temp;
    let dir = match data_dir {
        Some(d) => d,
        None => {
            temp = tempfile::Builder::new().prefix("lockd-dev-").tempdir()?;
            temp.path().to_owned()
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = Config::dev(servers, base_port, dir.clone());
    config.validate()?;
    let config_path = dir.join("cluster.toml");
    std::fs::write(&config_path, config.to_toml())?;
    let exe = std::env::current_exe().context("cannot find the lockd binary")?;
    let mut children: Vec<Child> = Vec::new();
    for s in &config.servers {
        let child = Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--id")
            .arg(s.id.to_string())
            // A new cluster the first time; ignored when --data-dir holds its logs.
            .arg("--bootstrap")
            .kill_on_drop(true)
            .pre_exec_die_with_parent()
            .spawn()
            .with_context(|| format!("cannot start server {}", s.id))?;
        children.push(child);
    }
    let started = Instant::now();
    let endpoints: Vec<String> = config.servers.iter().map(|s| s.addr.clone()).collect();
    let mut stop = Box::pin(stop_signal()?);
    let outcome = tokio::select! {
        leader = wait_for_leader(&endpoints) => leader,
        signal = &mut stop => Err(anyhow::anyhow!("interrupted by {signal}")),
    };
    match outcome {
        Ok(leader) => {
            let list = endpoints.join(",");
            println!();
            println!(
                "lockd dev cluster `{}`: {} servers, leader {} elected in {} ms",
                config.cluster.name,
                servers,
                leader,
                started.elapsed().as_millis()
            );
            for s in &config.servers {
                println!("  server {}  {}", s.id, s.addr);
            }
            println!("  data     {}", dir.display());
            println!("  config   {}", config_path.display());
            println!("  nodes    node1 .. node16");
            println!();
            println!("Try:");
            println!("  export LOCKD_SERVERS={list}");
            println!("  lockctl status");
            println!("  lockctl lock --node node1 fs1 inode-1 -- sh -c 'echo holding token $LOCKD_TOKEN; sleep 2'");
            println!();
            println!("Ctrl-C (or SIGTERM) stops all servers.");
            let signal = stop.await;
            println!("lockd dev: {signal}: stopping the servers");
        }
        Err(e) => eprintln!("lockd dev: {e}"),
    }
    stop_all(&mut children).await;
    println!("lockd dev: stopped");
    Ok(())
}

/// The first of SIGINT, SIGTERM, SIGHUP (a closed terminal), by name. The handlers are
/// installed here, at once, not when the future is first polled.
fn stop_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
            _ = hup.recv() => "SIGHUP",
        }
    })
}

/// SIGTERM to every server, then waits; whoever has not exited by the deadline is
/// killed.
async fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        if let Some(pid) = c.id() {
            // SAFETY: kill(2) with a pid of our own child that has not been reaped
            // yet (its id is still set), so the pid cannot name another process.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
    }
    let all = futures::future::join_all(children.iter_mut().map(Child::wait));
    if tokio::time::timeout(STOP_DEADLINE, all).await.is_err() {
        for c in children.iter_mut() {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }
    }
}

/// `Command::pre_exec` setting PR_SET_PDEATHSIG, so a server dies with `lockd dev`.
/// The signal follows the *thread* that forked: `run` is the runtime's `block_on`
/// future, so the servers are spawned from the main thread, which lives as long as
/// the process.
trait DieWithParent {
    fn pre_exec_die_with_parent(&mut self) -> &mut Self;
}

impl DieWithParent for Command {
    fn pre_exec_die_with_parent(&mut self) -> &mut Self {
        // SAFETY: the closure runs in the forked child before exec and only calls
        // prctl(2), which is async-signal-safe.
        unsafe {
            self.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        }
    }
}

async fn wait_for_leader(endpoints: &[String]) -> anyhow::Result<String> {
    let deadline = Instant::now() + ELECTION_DEADLINE;
    while Instant::now() < deadline {
        for ep in endpoints {
            let Ok(mut c) = AdminServiceClient::connect(format!("http://{ep}")).await else {
                continue;
            };
            if let Ok(s) = c.status(StatusRequest {}).await {
                let s = s.into_inner();
                if s.role == "leader" {
                    return Ok(format!("{} ({})", s.id, s.addr));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no leader elected within {} s", ELECTION_DEADLINE.as_secs())
}
