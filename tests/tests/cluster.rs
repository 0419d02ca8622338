//! Multi-process tests of the replicated core (BRIEF §3.1, §3.2): real `lockd`
//! processes on loopback, killed and restarted for real.

use lockd_client::{Client, ClientConfig, Error, LockOptions, LockspaceOptions, Mode};
use lockd_tests::{poll, Cluster};
use std::time::{Duration, Instant};

const ELECTION: Duration = Duration::from_secs(15);

fn client_config(servers: Vec<String>, node: &str) -> ClientConfig {
    ClientConfig::new(servers, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_through_a_follower_address_reaches_the_leader() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(ELECTION).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    // The client knows only the follower; it must be redirected without noticing.
    let client = Client::connect(client_config(vec![cluster.addr(follower)], "node1"))
        .await
        .unwrap();
    let ls = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let guard = ls
        .lock("inode-7", Mode::Ex, LockOptions::default())
        .await
        .unwrap();
    assert!(guard.token() > 0);
    let s = cluster
        .wait_status(ELECTION, "one held lock", |s| s.held_locks == 1)
        .await;
    assert_eq!(s.sessions, 1);
    guard.unlock().await.unwrap();
    cluster
        .wait_status(ELECTION, "no held locks", |s| s.held_locks == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_keeps_held_locks_and_queued_requests() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(ELECTION).await;
    let holder = cluster.connect("node1").await;
    let waiter = cluster.connect("node2").await;
    let ls1 = holder
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let ls2 = waiter
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = ls1
        .lock("journal-1", Mode::Ex, LockOptions::default())
        .await
        .unwrap();
    let first_token = held.token();
    let queued = tokio::spawn(async move {
        ls2.lock("journal-1", Mode::Pr, LockOptions::default())
            .await
    });
    cluster
        .wait_status(ELECTION, "the PR request queued", |s| {
            s.waiting_requests == 1
        })
        .await;

    cluster.kill(leader);
    let new_leader = cluster.wait_leader(ELECTION).await;
    assert_ne!(new_leader, leader);
    let s = cluster
        .wait_status(ELECTION, "state on the new leader", |s| s.applied_index > 0)
        .await;
    assert_eq!(s.held_locks, 1, "the EX lock survived the failover");
    assert_eq!(s.waiting_requests, 1, "the PR request is still queued");
    assert!(!queued.is_finished(), "the waiter must still be waiting");

    // The holder's library finds the new leader by itself.
    held.unlock().await.unwrap();
    let granted = tokio::time::timeout(ELECTION, queued)
        .await
        .expect("queued request granted after unlock")
        .unwrap()
        .expect("grant");
    assert_eq!(granted.mode(), Mode::Pr);
    assert!(
        granted.token() > first_token,
        "tokens only grow across failover"
    );
    granted.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_restart_keeps_locks_sessions_and_tokens() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(ELECTION).await;
    let client = cluster.connect("node1").await;
    let ls = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = ls
        .lock("rg-3", Mode::Pw, LockOptions::default())
        .await
        .unwrap();
    let token = held.token();
    let before = cluster
        .wait_status(ELECTION, "one lock", |s| s.held_locks == 1)
        .await;

    for id in cluster.ids() {
        cluster.kill(id);
    }
    for id in cluster.ids() {
        cluster.start_server(id);
    }
    cluster.wait_leader(ELECTION).await;
    let after = cluster
        .wait_status(ELECTION, "the log replayed", |s| {
            s.applied_index >= before.applied_index
        })
        .await;
    assert_eq!(after.held_locks, 1);
    assert_eq!(after.sessions, 1);
    assert_eq!(
        after.last_token, before.last_token,
        "tokens did not go back"
    );

    let check = client.check_token("fs1", b"rg-3", token).await.unwrap();
    assert!(
        check.current,
        "the lock granted before the restart is still current"
    );
    // The same session goes on working: a new grant has a larger token.
    let other = ls
        .lock("rg-4", Mode::Ex, LockOptions::default())
        .await
        .unwrap();
    assert!(other.token() > token);
    held.unlock().await.unwrap();
    let check = client.check_token("fs1", b"rg-3", token).await.unwrap();
    assert!(
        !check.current,
        "an unlocked grant's token is no longer current"
    );
}

/// Without quorum a short call fails with "no quorum" in bounded time and a lock with a
/// timeout fails at its timeout, while a lock without one waits (issue 13: waiting means
/// waiting) and is granted once the quorum is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_calls_fail_in_bounded_time_but_an_untimed_lock_waits() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(ELECTION).await;
    let mut cfg = client_config(cluster.endpoints(), "node1");
    cfg.no_quorum_timeout = Duration::from_secs(3);
    let client = Client::connect(cfg).await.unwrap();
    let ls = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    // Keep the leader, lose both followers: the leader can no longer commit.
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    for id in &followers {
        cluster.kill(*id);
    }
    let untimed = {
        let ls = ls.clone();
        tokio::spawn(async move { ls.lock("inode-1", Mode::Ex, LockOptions::default()).await })
    };
    let started = Instant::now();
    let result = client
        .open_lockspace("fs2", LockspaceOptions::default())
        .await;
    let elapsed = started.elapsed();
    assert!(matches!(result, Err(Error::NoQuorum { .. })), "{result:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "no-quorum error took {elapsed:?}"
    );

    // A try request asked not to wait: it fails like a short call.
    let started = Instant::now();
    let result = ls
        .lock("inode-3", Mode::Ex, LockOptions::new().try_lock())
        .await;
    let elapsed = started.elapsed();
    assert!(matches!(result, Err(Error::NoQuorum { .. })), "{result:?}");
    assert!(
        elapsed < Duration::from_secs(10),
        "no-quorum error took {elapsed:?}"
    );

    let timeout = Duration::from_millis(3_500);
    let started = Instant::now();
    let result = ls
        .lock("inode-2", Mode::Ex, LockOptions::new().timeout(timeout))
        .await;
    let elapsed = started.elapsed();
    assert!(matches!(result, Err(Error::NoQuorum { .. })), "{result:?}");
    assert!(
        elapsed >= timeout && elapsed < timeout + Duration::from_secs(2),
        "a lock with a {timeout:?} timeout failed after {elapsed:?}"
    );
    assert!(
        !untimed.is_finished(),
        "a lock without a timeout keeps waiting through the loss of quorum: {:?}",
        untimed.await
    );

    for id in followers {
        cluster.start_server(id);
    }
    let granted = tokio::time::timeout(ELECTION, untimed)
        .await
        .expect("the waiting lock is granted once the quorum is back")
        .unwrap()
        .unwrap();
    assert_eq!(granted.mode(), Mode::Ex);
}

/// Stops a follower, takes 150 locks (snapshots every 100 entries, `keep` entries kept
/// behind each), restarts the follower and waits until it has caught up. Returns the
/// follower's log.
async fn restart_a_follower_150_entries_behind(keep: u64) -> String {
    let mut cluster = Cluster::start_with(3, |c| {
        c.timing.snapshot_every_entries = 100;
        c.timing.snapshot_keep_entries = keep;
    });
    let leader = cluster.wait_leader(ELECTION).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    cluster.kill(follower);
    let client = cluster.connect("node1").await;
    let ls = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    // Enough entries for the leader to snapshot and compact past the follower.
    let mut guards = Vec::new();
    for i in 0..150u32 {
        guards.push(
            ls.lock(
                format!("res-{i}").as_str(),
                Mode::Ex,
                LockOptions::default(),
            )
            .await
            .unwrap(),
        );
    }
    let target = cluster
        .wait_status(ELECTION, "150 held", |s| s.held_locks == 150)
        .await;
    assert!(
        cluster.log(leader).contains("snapshot taken"),
        "the leader compacted its log"
    );
    cluster.start_server(follower);
    poll(ELECTION, "the follower to catch up", || async {
        let s = cluster.status(follower).await?;
        (s.applied_index >= target.applied_index && s.held_locks == 150).then_some(())
    })
    .await;
    cluster.log(follower)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_follower_catches_up_from_a_snapshot() {
    // No log tail behind a snapshot: the follower's next entry is compacted away.
    let log = restart_a_follower_150_entries_behind(0).await;
    assert!(log.contains("installed a snapshot"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_a_little_behind_catches_up_from_the_log_kept_behind_a_snapshot() {
    // The default number of entries (5,000) kept behind each snapshot.
    let keep = lockd_server::config::Config::dev(3, 0, std::env::temp_dir())
        .timing
        .snapshot_keep_entries;
    let log = restart_a_follower_150_entries_behind(keep).await;
    assert!(
        !log.contains("installed a snapshot"),
        "a follower 150 entries behind is sent entries, not a snapshot"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_try_lock_fails_at_once_and_changes_nothing() {
    let cluster = Cluster::start(3);
    cluster.wait_leader(ELECTION).await;
    let a = cluster.connect("node1").await;
    let b = cluster.connect("node2").await;
    let la = a
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let lb = b
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = la
        .lock("inode-1", Mode::Ex, LockOptions::default())
        .await
        .unwrap();
    match lb
        .lock("inode-1", Mode::Pr, LockOptions::new().try_lock())
        .await
    {
        Err(Error::WouldBlock(_)) => {}
        other => panic!("expected WouldBlock, got {other:?}"),
    }
    let s = cluster.wait_status(ELECTION, "status", |_| true).await;
    assert_eq!((s.held_locks, s.waiting_requests), (1, 0));
    held.unlock().await.unwrap();
}

/// Rolling upgrades (README, Operations): a leader writes entries of several commands
/// (`Op::Batch`, log format 2) only while every peer's current stream announced format
/// 2. A build from before batches announces none, and would stop at the first batch
/// entry. Here a stream that names no format, opened in a follower's name, stands for
/// that follower restarted on an older build: batching stops; the follower's own next
/// stream starts it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_stream_of_an_older_build_stops_batch_entries_until_the_peer_announces_them() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(ELECTION).await;
    let follower = cluster.ids().into_iter().find(|id| *id != leader).unwrap();
    let metrics = cluster.metrics_addr(leader);
    let client = cluster.connect("node1").await;
    let fs = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    poll(ELECTION, "a burst of locks to share an entry", || async {
        (batched_entries_of_a_burst(&fs, &metrics).await > 0.0).then_some(())
    })
    .await;
    let status = cluster.status(leader).await.expect("the leader's status");
    assert_eq!(status.log_format, 2);
    let formats: Vec<(u64, u32)> = (status.peers.iter())
        .map(|p| (p.id, p.log_format))
        .collect();
    assert_eq!(formats, [(1, 2), (2, 2), (3, 2)]);
    let said = lockd_tests::output_text(&cluster.lockctl(&["status"]).await);
    assert!(
        said.contains("batch entries:    on (every server reads log format 2)"),
        "{said}"
    );

    open_a_stream_without_log_format(&cluster, leader, follower).await;
    let off = format!("batch entries off: server {follower} runs a build of log format 1");
    poll(
        ELECTION,
        "the leader to log that batching is off",
        || async {
            batched_entries_of_a_burst(&fs, &metrics).await;
            cluster.log(leader).contains(&off).then_some(())
        },
    )
    .await;
    for _ in 0..5 {
        let batched = batched_entries_of_a_burst(&fs, &metrics).await;
        assert_eq!(batched, 0.0, "a batch entry with a peer of log format 1");
    }
    let said = lockd_tests::output_text(&cluster.lockctl(&["status"]).await);
    let off = format!("batch entries:    off (server {follower}: log format 1)");
    assert!(said.contains(&off), "{said}");

    cluster.kill(follower);
    cluster.start_server(follower);
    poll(
        ELECTION,
        "batching again once the follower reconnected",
        || async { (batched_entries_of_a_burst(&fs, &metrics).await > 0.0).then_some(()) },
    )
    .await;
    assert_eq!(leader, cluster.wait_leader(ELECTION).await);
}

/// Takes and releases 32 EX locks at once; returns how many of the entries the
/// leader proposed meanwhile carried more than one command (its
/// `lockd_entry_commands` histogram).
async fn batched_entries_of_a_burst(fs: &lockd_client::Lockspace, metrics: &str) -> f64 {
    let batched = |text: &str| {
        let all = lockd_tests::metric_value(text, "lockd_entry_commands_count");
        let single = lockd_tests::metric_value(text, "lockd_entry_commands_bucket{le=\"1\"}");
        all.unwrap_or(0.0) - single.unwrap_or(0.0)
    };
    let before = batched(&lockd_tests::scrape_metrics(metrics).await);
    let locks: Vec<_> = (0..32)
        .map(|i| {
            let fs = fs.clone();
            tokio::spawn(async move {
                let guard = fs.lock(format!("inode-{i}"), Mode::Ex, LockOptions::default());
                guard.await.unwrap().unlock().await.unwrap();
            })
        })
        .collect();
    for lock in locks {
        lock.await.unwrap();
    }
    batched(&lockd_tests::scrape_metrics(metrics).await) - before
}

/// Opens a Raft stream to `to` in `from`'s name carrying no `lockd-log-format`, as a
/// build from before log format 2 does, and sends nothing on it.
async fn open_a_stream_without_log_format(cluster: &Cluster, to: u64, from: u64) {
    use lockd_proto::v1::peer_service_client::PeerServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.addr(to)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut request = tonic::Request::new(tokio_stream::iter(Vec::new()));
    let md = request.metadata_mut();
    md.insert(
        lockd_proto::CLUSTER_ID_METADATA_KEY,
        cluster.config.cluster.id.into(),
    );
    md.insert(lockd_proto::FROM_METADATA_KEY, from.into());
    PeerServiceClient::new(channel)
        .raft(request)
        .await
        .expect("a stream of this cluster id is taken");
}
