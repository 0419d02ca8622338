//! The leader's memory under the floods of issue #14: resident set size (VmRSS) of the
//! leader of a local 3-server cluster before, during and after
//!
//! - 10,000 idle `Pipeline` streams opened on one connection (the server serves 256
//!   at once, SETTINGS_MAX_CONCURRENT_STREAMS; the client queues the rest), and
//! - 10,000 connections that each send the HTTP/2 preface and stay idle (the server
//!   serves up to its connection limit and closes the others at once).
//!
//! Run (the client needs a descriptor per connection):
//! `cargo build --release -p lockd-tests --bins --examples`, then
//! `sh -c 'ulimit -n 20000; exec target/release/examples/flood'`.
//! "During" is the largest of the samples taken every 100 ms for 2 s once the flood is
//! in place; "after" is 2 s after it was released.

use lockd_proto::v1::lock_service_client::LockServiceClient;
use lockd_proto::v1::PipelineRequest;
use lockd_tests::Cluster;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const FLOOD: usize = 10_000;
const WAIT: Duration = Duration::from_secs(30);

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The largest RSS over 2 s of samples.
async fn peak_rss_kib(pid: u32) -> u64 {
    let mut peak = 0;
    for _ in 0..20 {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    peak
}

fn mb(kib: u64) -> String {
    format!("{:.1} MB", kib as f64 * 1024.0 / 1e6)
}

#[tokio::main]
async fn main() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let pid = cluster.pid(leader).expect("the harness runs the leader");
    let addr = cluster.addr(leader);
    let status = cluster.status(leader).await.expect("leader status");
    println!(
        "leader {leader} (pid {pid}): max_open_files {}, max_connections {}",
        status.max_open_files, status.max_connections
    );
    let idle = peak_rss_kib(pid).await;
    println!("idle leader RSS: {}", mb(idle));

    // 1. 10,000 idle Pipeline streams on one connection.
    let rpc = LockServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let opened = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::with_capacity(FLOOD);
    let mut tasks = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        let (tx, rx) = tokio::sync::mpsc::channel::<PipelineRequest>(1);
        senders.push(tx);
        let mut rpc = rpc.clone();
        let opened = opened.clone();
        tasks.push(tokio::spawn(async move {
            let replies = rpc
                .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await;
            opened.fetch_add(1, Ordering::Relaxed);
            // Keep the stream open until the task is aborted.
            std::future::pending::<()>().await;
            drop(replies);
        }));
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    while opened.load(Ordering::Relaxed) < 256 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = peak_rss_kib(pid).await;
    println!(
        "{FLOOD} idle Pipeline streams requested on one connection, {} open: leader RSS {}",
        opened.load(Ordering::Relaxed),
        mb(during)
    );
    for t in &tasks {
        t.abort();
    }
    drop((senders, tasks, rpc));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(pid);
    println!("after the stream flood: leader RSS {}", mb(after));

    // 2. 10,000 connections, each sending the HTTP/2 preface and an empty SETTINGS.
    let mut connections = Vec::with_capacity(FLOOD);
    let mut failed = 0;
    for _ in 0..FLOOD {
        match tokio::net::TcpStream::connect(&addr).await {
            Ok(mut tcp) => {
                let _ = tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let _ = tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await;
                connections.push(tcp);
            }
            Err(_) => failed += 1,
        }
    }
    let during_conns = peak_rss_kib(pid).await;
    let mut closed = 0;
    for tcp in &connections {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.try_read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
    }
    println!(
        "{FLOOD} connections ({failed} failed to connect, {closed} closed by the server): leader RSS {}",
        mb(during_conns)
    );
    drop(connections);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after_conns = rss_kib(pid);
    println!("after the connection flood: leader RSS {}", mb(after_conns));
    let still = cluster
        .status(leader)
        .await
        .expect("the leader still answers");
    println!("leader still serves: role {}", still.role);
}
