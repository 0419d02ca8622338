//! Safety of durable state and identity (issue 12): a server never forgets what it
//! acknowledged and votes anyway, talks only to its own cluster, refuses damaged or
//! foreign data, and exits rather than live on half dead. Real server processes.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_server::config::Config;
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
    copy_dir(&from, &to);
    cluster.start_server(1);
    let status = cluster.wait_exit(1, WAIT).await;
    assert!(!status.success(), "{status:?}");
    let log = cluster.log(1);
    assert!(log.contains("belongs to server 2"), "{log}");
}

/// Copies `from` into a new directory `to`, subdirectories (the Raft log's) included.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Issue 12, sequence 2: servers 1 and 2 run a 3-server config, servers 3, 4 and 5 a
/// 5-server config with the same cluster name and id. They are two cluster
/// identities: each side refuses the other's Raft streams and says so at warn, and
/// neither side elects a leader, because a new cluster's first election waits until
/// every configured server answers with the same identity (the bootstrap gate) —
/// instead of each half forming a quorum of its own list and granting the same lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_bootstrapped_with_different_server_lists_never_elect() {
    let dir = tempfile::tempdir().unwrap();
    let ports = lockd_tests::free_ports(5);
    let config = |n: usize, name: &str| {
        let mut c = Config::dev(n as u64, 0, dir.path().join(name));
        for (s, port) in c.servers.iter_mut().zip(&ports) {
            s.addr = format!("127.0.0.1:{port}");
            s.metrics_addr = None;
        }
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, c.to_toml()).unwrap();
        path
    };
    let (three, five) = (config(3, "three"), config(5, "five"));
    let mut servers = Vec::new();
    for (id, path) in [(1, &three), (2, &three), (3, &five), (4, &five), (5, &five)] {
        let log = std::fs::File::create(dir.path().join(format!("server-{id}.log"))).unwrap();
        let child = Command::new(server_binary())
            .args(["run", "--bootstrap", "--id", &id.to_string(), "--config"])
            .arg(path)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        servers.push(child);
    }
    let log = |id: u64| {
        std::fs::read_to_string(dir.path().join(format!("server-{id}.log"))).unwrap_or_default()
    };
    poll(
        WAIT,
        "both sides to refuse each other and wait at the gate",
        || {
            let (a, b) = (log(1) + &log(2), log(3) + &log(4) + &log(5));
            let refused = |l: &str| {
                l.contains("refused a peer")
                    && l.contains("another incarnation")
                    && l.contains("peer refused this server")
            };
            let gated = |l: &str| l.contains("no election until every configured server");
            let done = refused(&a) && refused(&b) && gated(&a) && gated(&b);
            async move { done.then_some(()) }
        },
    )
    .await;
    for id in 1..=5 {
        assert!(
            !log(id).contains("became leader"),
            "server {id} became leader: {}",
            log(id)
        );
    }
    for mut child in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
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
