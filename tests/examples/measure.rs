//! Measures lockd's failure-handling times and a quick lock/unlock rate on a real local
//! cluster (3 `lockd` processes on loopback, default timings), printing one line each:
//!
//! - election: start of 3 servers to a leader;
//! - leader kill -9 to the next grant of a queued request;
//! - node silence to its expiry (kill -9 of a node process);
//! - node death to its lock granted elsewhere, with a fence agent that succeeds at once;
//! - sequential lock/unlock pairs per second (1 worker) and with 64 workers on one session.
//!
//! Run: `cargo run --release -p lockd-tests --example measure`. Not a benchmark of
//! record (that is `lockd-bench`, compared with etcd); these are the figures the
//! liveness and fencing rules imply, measured.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_proto::v1::NodeState;
use lockd_server::config::FenceDeviceConfig;
use lockd_tests::{Cluster, NodeProcess};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main]
async fn main() {
    let agent_dir = tempfile::tempdir().expect("temp dir");
    let agent = agent_dir.path().join("fence_instant");
    std::fs::write(&agent, "#!/bin/sh\ncat >/dev/null\nexit 0\n").expect("write agent");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    // Election.
    let started = Instant::now();
    let mut cluster = Cluster::start_with(3, |c| {
        c.nodes[0].fence = vec![FenceDeviceConfig {
            level: 1,
            agent: agent.clone(),
            action: Default::default(),
            unfence: false,
            timeout_ms: 5_000,
            params: Default::default(),
        }];
    });
    cluster.wait_leader(WAIT).await;
    println!(
        "election (3 servers started -> leader):            {}",
        ms(started.elapsed())
    );

    // Throughput on a fresh cluster.
    let c = cluster.connect("node3").await;
    let ls = c
        .open_lockspace("bench", LockspaceOptions::default())
        .await
        .unwrap();
    let pairs = 2_000;
    let t = Instant::now();
    for _ in 0..pairs {
        let g = ls.lock("r", Mode::Ex, LockOptions::new()).await.unwrap();
        g.unlock().await.unwrap();
    }
    let rate = pairs as f64 / t.elapsed().as_secs_f64();
    println!(
        "lock/unlock pairs, 1 worker:                       {rate:.0}/s ({} per pair)",
        ms(t.elapsed() / pairs)
    );
    let t = Instant::now();
    let per_worker = 200;
    let workers: Vec<_> = (0..64)
        .map(|w| {
            let ls = ls.clone();
            tokio::spawn(async move {
                let name = format!("w{w}");
                for _ in 0..per_worker {
                    let g = ls
                        .lock(name.as_str(), Mode::Ex, LockOptions::new())
                        .await
                        .unwrap();
                    g.unlock().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let rate = (64 * per_worker) as f64 / t.elapsed().as_secs_f64();
    println!("lock/unlock pairs, 64 workers on one session:      {rate:.0}/s");

    // Leader kill -9 -> next grant of a queued request.
    let holder = cluster.connect("node4").await;
    let hls = holder
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let waiter = cluster.connect("node5").await;
    let wls = waiter
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let held = hls.lock("x", Mode::Ex, LockOptions::new()).await.unwrap();
    let queued = tokio::spawn(async move { wls.lock("x", Mode::Ex, LockOptions::new()).await });
    cluster
        .wait_status(WAIT, "queued", |s| s.waiting_requests == 1)
        .await;
    let leader = cluster.wait_leader(WAIT).await;
    let killed = Instant::now();
    cluster.kill(leader);
    // The holder's client finds the new leader by itself; its unlock lets the queued
    // request (which survived the failover) be granted.
    held.unlock().await.unwrap();
    let _granted = queued.await.unwrap().unwrap();
    println!(
        "leader kill -9 -> queued request granted:          {}",
        ms(killed.elapsed())
    );

    // Node silence -> expiry; node death -> lock granted elsewhere (instant agent).
    let victim = NodeProcess::start(&cluster.endpoints(), "node1", "fs", "journal", "EX");
    victim.expect_line("GRANTED", WAIT);
    let other = cluster.connect("node2").await;
    let ols = other
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    // The task notes when the grant arrives, so polling below cannot delay it.
    let pending = tokio::spawn(async move {
        let g = ols.lock("journal", Mode::Ex, LockOptions::new()).await;
        (g, Instant::now())
    });
    cluster
        .wait_status(WAIT, "queued", |s| s.waiting_requests >= 1)
        .await;
    let died = Instant::now();
    drop(victim); // kill -9
    let expired_after = loop {
        let leader = cluster.wait_leader(WAIT).await;
        if let Some(s) = cluster.status(leader).await {
            let gone_or_expired = s.nodes.iter().all(|n| {
                n.name != "node1"
                    || [NodeState::Expired, NodeState::Fencing, NodeState::Fenced]
                        .iter()
                        .any(|st| *st as i32 == n.state)
            });
            if gone_or_expired {
                break died.elapsed();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let (granted, at) = pending.await.unwrap();
    let _granted = granted.unwrap();
    println!(
        "node kill -9 -> expired (seen by a 5 ms poll):     {}",
        ms(expired_after)
    );
    println!(
        "node kill -9 -> its lock granted elsewhere:        {}",
        ms(at.duration_since(died))
    );
}
