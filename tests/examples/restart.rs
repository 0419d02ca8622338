//! Restart and join with many held locks (issue #7): on a real local 3-server cluster,
//! holds `--locks N` (default 1,000,000) EX locks over 16 sessions, then measures
//!
//! - a follower's `kill -9` and restart → it has applied everything the leader had
//!   committed (it restores the snapshot and replays the log tail);
//! - a full-cluster `kill -9` and restart → a leader, and a new lock granted to a node
//!   that held locks before (serving again);
//! - a new server 4 started with `--join` → `lockctl server add` done (it is sent the
//!   whole table as a snapshot, then promoted to voter).
//!
//! Run: `cargo run --release -p lockd-tests --example restart -- --locks 1000000`.

use lockd_client::{LockGuard, LockOptions, Lockspace, LockspaceOptions, Mode};
use lockd_tests::{poll, Cluster};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SESSIONS: usize = 16;
const IN_FLIGHT: usize = 512;
const WAIT: Duration = Duration::from_secs(600);

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

async fn hold(lockspaces: &[Lockspace], n: u64) -> Vec<LockGuard> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..IN_FLIGHT)
        .map(|k| {
            let ls = lockspaces[k % lockspaces.len()].clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut held = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return held;
                    }
                    let name = format!("held-{i}");
                    let g = ls
                        .lock(name.as_str(), Mode::Ex, LockOptions::new())
                        .await
                        .unwrap_or_else(|e| panic!("lock {name}: {e}"));
                    held.push(g);
                    if i.is_multiple_of(100_000) && i > 0 {
                        eprintln!("  {i} locks held");
                    }
                }
            })
        })
        .collect();
    let mut guards = Vec::with_capacity(n as usize);
    for t in tasks {
        guards.extend(t.await.expect("fill task"));
    }
    guards
}

/// Waits until server `id` has applied at least `index`.
async fn applied(cluster: &Cluster, id: u64, index: u64) {
    poll(WAIT, "the server to apply the log", || async {
        cluster
            .status(id)
            .await
            .filter(|s| s.applied_index >= index)
    })
    .await;
}

#[tokio::main]
async fn main() {
    let mut n: u64 = 1_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--locks" => n = args.next().and_then(|v| v.parse().ok()).expect("--locks N"),
            _ => panic!("usage: restart [--locks N]"),
        }
    }
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(WAIT).await;
    let mut clients = Vec::new();
    let mut lockspaces = Vec::new();
    for i in 1..=SESSIONS {
        let c = cluster.connect(&format!("node{i}")).await;
        lockspaces.push(
            c.open_lockspace("fs", LockspaceOptions::default())
                .await
                .expect("open lockspace"),
        );
        clients.push(c);
    }
    let t = Instant::now();
    let guards = hold(&lockspaces, n).await;
    let s = cluster
        .wait_status(WAIT, "every lock held", |s| s.held_locks >= n)
        .await;
    println!(
        "held {} locks in {} (leader applied index {})",
        guards.len(),
        secs(t.elapsed()),
        s.applied_index
    );

    // A follower restarts.
    let leader = cluster.wait_leader(WAIT).await;
    let follower = if leader == 1 { 2 } else { 1 };
    let commit = cluster
        .status(leader)
        .await
        .expect("leader status")
        .commit_index;
    applied(&cluster, follower, commit).await;
    cluster.kill(follower);
    let t = Instant::now();
    cluster.start_server(follower);
    applied(&cluster, follower, commit).await;
    println!(
        "follower kill -9 -> restarted and caught up:  {}",
        secs(t.elapsed())
    );

    // The whole cluster restarts.
    for id in cluster.ids() {
        cluster.kill(id);
    }
    let t = Instant::now();
    for id in cluster.ids() {
        cluster.start_server(id);
    }
    cluster.wait_leader(WAIT).await;
    let elected = t.elapsed();
    let g = lockspaces[0]
        .lock("after-restart", Mode::Ex, LockOptions::new())
        .await
        .expect("a lock after the restart");
    println!(
        "full restart -> leader {} -> first new grant: {}",
        secs(elected),
        secs(t.elapsed())
    );
    g.unlock().await.expect("unlock");
    let s = cluster
        .wait_status(WAIT, "the locks after the restart", |s| s.held_locks >= n)
        .await;
    assert!(s.held_locks >= n, "every lock survived the restart");

    // A new server joins.
    let addr = cluster.add_server_config(4);
    let t = Instant::now();
    cluster.start_joining_server(4);
    let o = cluster.lockctl(&["server", "add", "4", &addr]).await;
    assert!(o.status.success(), "{}", lockd_tests::output_text(&o));
    println!(
        "new server --join -> voter (snapshot sent):   {}",
        secs(t.elapsed())
    );
    let rss = std::fs::read_to_string(format!(
        "/proc/{}/status",
        cluster.pid(4).expect("server 4 runs")
    ))
    .ok()
    .and_then(|st| {
        st.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .map(|l| l.to_string())
    });
    println!("server 4 {}", rss.unwrap_or_default());
    println!("server 1's log of the full restart:");
    for line in cluster.log(1).lines().filter(|l| {
        l.contains("restored")
            || l.contains("raft log opened")
            || l.contains("became leader")
            || l.contains("server started")
            || l.contains("snapshot taken")
    }) {
        println!("  {line}");
    }
    drop(guards);
    drop(clients);
}
