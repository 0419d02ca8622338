//! `lockd dev`: a local cluster on loopback in one command, for trying lockd out.
//!
//! Writes a dev config into a throw-away directory, starts one `lockd run` child
//! process per server (real processes, so `kill -9` of one shows a failover), waits for
//! a leader, prints how to reach it, and on Ctrl-C stops the children and removes the
//! directory.

use crate::config::Config;
use anyhow::Context;
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::StatusRequest;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long to wait for the first leader before giving up.
const ELECTION_DEADLINE: Duration = Duration::from_secs(20);

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
            .spawn()
            .with_context(|| format!("cannot start server {}", s.id))?;
        children.push(child);
    }
    let started = Instant::now();
    let endpoints: Vec<String> = config.servers.iter().map(|s| s.addr.clone()).collect();
    let outcome = tokio::select! {
        leader = wait_for_leader(&endpoints) => leader,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
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
            println!("Ctrl-C stops all servers.");
            tokio::signal::ctrl_c().await?;
        }
        Err(e) => eprintln!("lockd dev: {e}"),
    }
    for c in &mut children {
        let _ = c.start_kill();
    }
    for c in &mut children {
        let _ = c.wait().await;
    }
    println!("lockd dev: stopped");
    Ok(())
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
