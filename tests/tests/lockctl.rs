//! `lockctl` against a real cluster: the built binary, in text and JSON, including its
//! error paths (BRIEF §3.5). The binary comes from the same `cargo test --workspace`.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_tests::{output_text as text, Cluster};
use std::process::Output;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

async fn lockctl(cluster: &Cluster, args: &[&str]) -> Output {
    cluster.lockctl(args).await
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_lockctl_command_works_against_a_real_cluster() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;

    // status, text and JSON.
    let o = lockctl(&cluster, &["status"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("quorum:           has 3, needs 2 of 3 voters"),
        "{}",
        text(&o)
    );
    let o = lockctl(&cluster, &["--json", "status"]).await;
    assert_eq!(json(&o)["leader"]["id"], leader);

    // lock -- command: runs it holding the lock, with the token in its environment.
    let o = lockctl(
        &cluster,
        &[
            "lock",
            "--node",
            "node5",
            "fs1",
            "inode-1",
            "--",
            "sh",
            "-c",
            "echo held:$LOCKD_TOKEN",
        ],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("held:") && text(&o).contains("token="),
        "{}",
        text(&o)
    );

    // locks and node, while a client holds a lock and another waits.
    let a = cluster.connect("node1").await;
    let fa = a
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = fa
        .lock("journal-7", Mode::Ex, LockOptions::new())
        .await
        .unwrap();
    let b = cluster.connect("node2").await;
    let fb = b
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let waiting =
        tokio::spawn(async move { fb.lock("journal-7", Mode::Pr, LockOptions::new()).await });
    cluster
        .wait_status(WAIT, "queued", |s| s.waiting_requests == 1)
        .await;
    let o = lockctl(&cluster, &["locks", "fs1"]).await;
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("journal-7") && t.contains("node1") && t.contains("holder") && t.contains("EX"),
        "{t}"
    );
    assert!(
        t.contains("node2") && t.contains("waiting") && t.contains("PR"),
        "{t}"
    );
    let o = lockctl(
        &cluster,
        &["--json", "locks", "fs1", "--resource", "journal-7"],
    )
    .await;
    let v = json(&o);
    assert_eq!(v["locks"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["locks"][0]["token"], held.token());
    let o = lockctl(&cluster, &["node", "node1"]).await;
    assert!(
        o.status.success() && text(&o).contains("LOGGED_IN"),
        "{}",
        text(&o)
    );
    let o = lockctl(&cluster, &["--json", "node", "node1"]).await;
    assert_eq!(json(&o)["held_locks"], 1);

    // forceexpire, fence history, fence ack (no fence devices: only the ack releases).
    let o = lockctl(&cluster, &["forceexpire", "node1"]).await;
    assert!(o.status.success(), "{}", text(&o));
    // The leader starts the fence at its next tick.
    lockd_tests::poll(WAIT, "the fence to start", || async {
        let o = lockctl(&cluster, &["fence", "history"]).await;
        (text(&o).contains("node1") && text(&o).contains("started")).then_some(())
    })
    .await;
    assert!(
        !waiting.is_finished(),
        "the expired node's lock is still held"
    );
    let o = lockctl(&cluster, &["fence", "ack", "node1", "--by", "tester"]).await;
    assert!(o.status.success(), "{}", text(&o));
    let granted = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(granted.mode(), Mode::Pr);
    let o = lockctl(&cluster, &["--json", "fence", "history"]).await;
    let v = json(&o);
    assert!(
        v.as_array().unwrap().iter().any(|e| e["what"] == "done"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("acknowledged by tester")),
        "{v}"
    );

    // log-level.
    let o = lockctl(&cluster, &["log-level", "debug"]).await;
    assert!(o.status.success(), "{}", text(&o));

    // Error paths: each exits 1 with a clear message.
    for (args, words) in [
        (vec!["node", "nobody"], "node nobody has no session"),
        (vec!["forceexpire", "nobody"], "not logged in"),
        (vec!["fence", "ack", "node2"], "not awaiting fencing"),
        (vec!["log-level", "a=b=c"], "invalid log filter"),
        (
            vec!["locks", "--resource", "x"],
            "--resource needs a LOCKSPACE",
        ),
    ] {
        let o = lockctl(&cluster, &args).await;
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o));
        assert!(
            text(&o).contains(words),
            "{args:?} should say `{words}`: {}",
            text(&o)
        );
    }
    let o = lockd_tests::lockctl(&["--servers", "127.0.0.1:1", "status"]).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("no server answered"), "{}", text(&o));
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockctl_shutdown_is_refused_below_quorum_and_forced_with_force() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster
        .wait_status(WAIT, "three voters active", |s| s.quorum_has == 3)
        .await;
    let o = lockctl(&cluster, &["shutdown", &cluster.addr(followers[0])]).await;
    assert!(o.status.success(), "{}", text(&o));
    cluster.wait_exit(followers[0], WAIT).await;
    cluster
        .wait_status(WAIT, "two voters active", |s| s.quorum_has == 2)
        .await;
    let o = lockctl(&cluster, &["shutdown", &cluster.addr(followers[1])]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("refused: 2 voters are running and a quorum needs 2"),
        "{}",
        text(&o)
    );
    let o = lockctl(
        &cluster,
        &["shutdown", "--force", &cluster.addr(followers[1])],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(cluster.wait_exit(followers[1], WAIT).await.success());
}

/// Issue 15: `lockctl nodes` lists every configured node, `lockspaces` the lockspaces
/// in use, and `lockctl status` exits 0 healthy, 4 degraded, 3 without quorum.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_lockspaces_and_the_exit_status_of_status() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    cluster
        .wait_status(WAIT, "all three voters active", |s| s.quorum_has == 3)
        .await;
    let o = lockctl(&cluster, &["status"]).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).contains("health:           healthy"),
        "{}",
        text(&o)
    );

    let a = cluster.connect("node1").await;
    let fs = a
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let _held = fs
        .lock("inode-1", Mode::Ex, LockOptions::new())
        .await
        .unwrap();

    // node3 logs in and out: the cluster remembers it left (issue 15), unlike node2,
    // which it never saw.
    cluster.connect("node3").await.logout().await.unwrap();

    let o = lockctl(&cluster, &["nodes"]).await;
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    let row = |name: &str| {
        t.lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row for {name}: {t}"))
            .to_string()
    };
    assert!(row("node1").contains("LOGGED_IN"), "{t}");
    assert!(row("node2").contains("NEVER_SEEN (no session)"), "{t}");
    assert!(
        row("node3").contains("LOGGED_OUT (no session)") && row("node3").contains("ago)"),
        "{t}"
    );
    assert!(
        row("node16").contains("NEVER_SEEN"),
        "every configured node: {t}"
    );
    let v = json(&lockctl(&cluster, &["--json", "nodes"]).await);
    let nodes = v.as_array().unwrap();
    assert_eq!(nodes.len(), cluster.config.nodes.len(), "{v}");
    let node1 = nodes.iter().find(|n| n["name"] == "node1").unwrap();
    assert_eq!(
        (node1["state"].as_str(), node1["held_locks"].as_u64()),
        (Some("LOGGED_IN"), Some(1))
    );
    let node3 = nodes.iter().find(|n| n["name"] == "node3").unwrap();
    assert_eq!(node3["state"], "LOGGED_OUT", "{v}");
    assert!(node3["left_at_ms"].as_u64().unwrap() > 0, "{v}");
    // Every server knows (the record is replicated): `node` on the leader says so too.
    let o = lockctl(&cluster, &["node", "node3"]).await;
    assert!(
        !o.status.success() && text(&o).contains("LOGGED_OUT"),
        "{}",
        text(&o)
    );

    let o = lockctl(&cluster, &["lockspaces"]).await;
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    let fs1 = t
        .lines()
        .find(|l| l.starts_with("fs1 "))
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(
        fs1.split_whitespace().collect::<Vec<_>>(),
        ["fs1", "1", "1", "0", "0", "0", "0", "node1"],
        "{t}"
    );

    // One follower down: degraded (4); two: no quorum (3).
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster.kill(followers[0]);
    let o = lockctl(&cluster, &["status"]).await;
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        text(&o).contains("health:           degraded"),
        "{}",
        text(&o)
    );
    assert!(text(&o).contains("does not answer"), "{}", text(&o));
    let v = json(&lockctl(&cluster, &["--json", "status"]).await);
    assert_eq!(v["health"], "degraded", "{v}");
    cluster.kill(followers[1]);
    lockd_tests::poll(WAIT, "status to report no quorum", || async {
        (lockctl(&cluster, &["status"]).await.status.code() == Some(3)).then_some(())
    })
    .await;
}
