//! Safety of durable state and identity (issue 12): a server never forgets what it
//! acknowledged and votes anyway, talks only to its own cluster, refuses damaged or
//! foreign data, and exits rather than live on half dead. Real server processes.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_tests::{poll, server_binary, Cluster};
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Amnesia: server 1's data directory is wiped while node1 holds a lock; restarted
/// as it was (no --bootstrap), it refuses to start with a message naming the fix, so
/// it can never vote again as if new (the issue's double grant needed exactly that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_data_was_wiped_refuses_to_start() {
    let mut cluster = Cluster::start(3);
    let node1 = cluster.connect("node1").await;
    let ls = node1
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let _held = ls
        .lock("victim", Mode::Ex, LockOptions::new())
        .await
        .unwrap();
    cluster.kill(1);
    std::fs::remove_dir_all(cluster.config.server_dir(1)).unwrap();
    cluster.start_server(1);
    let status = cluster.wait_exit(1, WAIT).await;
    assert!(!status.success(), "{status:?}");
    let log = cluster.log(1);
    assert!(
        log.contains("refusing to start") && log.contains("lockctl server remove 1"),
        "{log}"
    );
}

/// A data directory copied from another server is refused: it would make one
/// server's acknowledgements count twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_copied_from_another_server_is_refused() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(WAIT).await;
    cluster.kill(1);
    cluster.kill(2);
    let (from, to) = (cluster.config.server_dir(2), cluster.config.server_dir(1));
    std::fs::remove_dir_all(&to).unwrap();
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
    cluster.start_server(1);
    let status = cluster.wait_exit(1, WAIT).await;
    assert!(!status.success(), "{status:?}");
    let log = cluster.log(1);
    assert!(log.contains("belongs to server 2"), "{log}");
}

/// Servers bootstrapped with different server lists under the same cluster id are
/// different clusters: each side refuses the other's Raft streams and says so at
/// warn, and the foreign servers never join the running cluster's quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_bootstrapped_with_another_server_list_are_refused_loudly() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    // Cluster B: the same name and id, servers 1-3 at A's addresses plus 4 and 5.
    let mut b = cluster.config.clone();
    let dir = tempfile::tempdir().unwrap();
    b.storage.data_dir = dir.path().to_owned();
    for id in [4, 5] {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = b.servers[0].clone();
        s.id = id;
        s.addr = format!("127.0.0.1:{port}");
        s.metrics_addr = None;
        b.servers.push(s);
    }
    let path = dir.path().join("b.toml");
    std::fs::write(&path, b.to_toml()).unwrap();
    let log_path = dir.path().join("server-4.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut foreign = Command::new(server_binary())
        .args(["run", "--bootstrap", "--id", "4", "--config"])
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    // Server 4 campaigns (it cannot win: 2 of B's 5); its messages reach A's servers.
    poll(WAIT, "both sides to log the refusal", || {
        let ours = cluster.log(leader) + &cluster.log(1) + &cluster.log(2) + &cluster.log(3);
        let theirs = std::fs::read_to_string(&log_path).unwrap_or_default();
        let done = ours.contains("refused a peer: peer 4 belongs to another incarnation")
            && theirs.contains("peer refused this server");
        async move { done.then_some(()) }
    })
    .await;
    let status = cluster.status(leader).await.unwrap();
    assert_eq!(status.leader_id, leader, "A's leader is undisturbed");
    let _ = foreign.kill();
    let _ = foreign.wait();
}

/// A panic in the Raft driver ends the process (status 70) with the panic in the log,
/// instead of a live process with a dead driver: here raft-rs's own "to_commit is out
/// of range" panic, from a follower wrongly bootstrapped again over a wiped directory
/// while the leader remembers what it had acknowledged (the log names that cause).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_the_raft_driver_stops_the_server() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let node1 = cluster.connect("node1").await;
    let ls = node1
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let _held = ls.lock("r", Mode::Ex, LockOptions::new()).await.unwrap();
    let follower = cluster.ids().into_iter().find(|&id| id != leader).unwrap();
    cluster.kill(follower);
    std::fs::remove_dir_all(cluster.config.server_dir(follower)).unwrap();
    cluster.start_server_with_args(follower, &["--bootstrap"]);
    let status = cluster.wait_exit(follower, WAIT).await;
    assert_eq!(status.code(), Some(70), "{status:?}");
    let log = cluster.log(follower);
    assert!(log.contains("panic, stopping this server"), "{log}");
    assert!(
        log.contains("shorter than what it acknowledged"),
        "the reason is named: {log}"
    );
}
