//! Online membership change (BRIEF §3.1, issue #5) with real processes and the real
//! `lockctl`: grow 3 → 4 → 5 and shrink back to 3 while a client holds and takes locks,
//! and every refusal of the 1/3/4/5 rule.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_tests::{output_text as text, poll, Cluster};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn json(o: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// (id, voter) of every member in a `--json` reply.
fn members(v: &serde_json::Value) -> Vec<(u64, bool)> {
    v["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["voter"].as_bool().unwrap()))
        .collect()
}

/// Waits until server `id`'s own applied view of the membership has `n` members.
async fn wait_members_seen_by(cluster: &Cluster, id: u64, n: usize) {
    poll(WAIT, "the server's view of the membership", || async {
        cluster.status(id).await.filter(|s| s.members.len() == n)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_to_five_and_shrink_to_three_with_locks_intact() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(WAIT).await;
    let client = cluster.connect("node1").await;
    let ls = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = ls
        .lock("journal-1", Mode::Ex, LockOptions::default())
        .await
        .unwrap();
    let token = held.token();
    // Takes and releases a lock: the cluster serves throughout.
    let churn = |name: &'static str| {
        let ls = ls.clone();
        async move {
            let g = ls
                .lock(name, Mode::Ex, LockOptions::default())
                .await
                .unwrap_or_else(|e| panic!("lock {name}: {e}"));
            g.unlock().await.unwrap();
        }
    };
    churn("inode-1").await;

    // 3 → 4, text output.
    let addr4 = cluster.add_server_config(4);
    cluster.start_joining_server(4);
    let o = cluster.lockctl(&["server", "add", "4", &addr4]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("server 4 ({addr4}) is a voter")),
        "{}",
        text(&o)
    );
    churn("inode-2").await;

    // 4 → 5, JSON output.
    let addr5 = cluster.add_server_config(5);
    cluster.start_joining_server(5);
    let o = cluster
        .lockctl(&["--json", "server", "add", "5", &addr5])
        .await;
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        members(&json(&o)),
        vec![(1, true), (2, true), (3, true), (4, true), (5, true)]
    );
    // The new servers have the lock table, and a restarted one keeps the membership.
    cluster
        .wait_status(WAIT, "5 voters", |s| s.voters == 5)
        .await;
    poll(WAIT, "server 5 to hold the replicated lock", || async {
        cluster
            .status(5)
            .await
            .filter(|s| s.held_locks == 1 && s.last_token >= token)
    })
    .await;
    cluster.kill(4);
    cluster.start_server(4);
    wait_members_seen_by(&cluster, 4, 5).await;

    // 5 → 6 is refused and changes nothing.
    let o = cluster
        .lockctl(&["server", "add", "6", "127.0.0.1:1"])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("at most 5 lock servers"), "{}", text(&o));
    churn("inode-3").await;

    // 5 → 4 by removing the leader itself: it hands over first, lockctl follows.
    let leader = cluster.wait_leader(WAIT).await;
    let o = cluster
        .lockctl(&["server", "remove", &leader.to_string()])
        .await;
    assert!(o.status.success(), "{}", text(&o));
    cluster.kill(leader);
    let new_leader = cluster.wait_leader(WAIT).await;
    assert_ne!(new_leader, leader);
    churn("inode-4").await;

    // 4 → 3 by removing a follower, JSON output.
    let follower = [1, 2, 3, 4, 5]
        .into_iter()
        .find(|id| *id != leader && *id != new_leader)
        .unwrap();
    let o = cluster
        .lockctl(&["--json", "server", "remove", &follower.to_string()])
        .await;
    assert!(o.status.success(), "{}", text(&o));
    let left = members(&json(&o));
    assert_eq!(left.len(), 3, "{left:?}");
    assert!(left
        .iter()
        .all(|(id, voter)| *voter && *id != follower && *id != leader));
    cluster.kill(follower);

    // 3 → 2 is refused.
    let o = cluster
        .lockctl(&["server", "remove", &left[0].0.to_string()])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("3 → 2 voters"), "{}", text(&o));

    // The lock was held throughout with its token, and the cluster still serves.
    let check = client
        .check_token("fs1", b"journal-1", token)
        .await
        .unwrap();
    assert!(
        check.current,
        "the EX lock is still held with token {token}"
    );
    churn("inode-5").await;

    // Three voters now: losing one more still leaves a quorum (2 of 3), which would
    // not be so if the two removed servers still counted (2 of 5).
    let leader = cluster.wait_leader(WAIT).await;
    let other = left
        .iter()
        .map(|(id, _)| *id)
        .find(|id| *id != leader)
        .unwrap();
    cluster.kill(other);
    churn("inode-6").await;
    held.unlock().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_that_never_catches_up_stays_a_learner_and_can_be_removed() {
    let mut cluster = Cluster::start(3);
    cluster.wait_leader(WAIT).await;
    // Server 4 is in the config but never started.
    let addr4 = cluster.add_server_config(4);
    let o = cluster
        .lockctl(&["server", "add", "4", &addr4, "--catch-up-timeout", "2"])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("server 4 joined as a learner but has not caught up"),
        "{}",
        text(&o)
    );
    let s = cluster
        .wait_status(WAIT, "4 as a learner", |s| {
            s.members.iter().any(|m| m.id == 4 && !m.voter)
        })
        .await;
    assert_eq!(s.voters, 3, "a learner does not count towards the quorum");

    // One change at a time: another server cannot join meanwhile.
    let o = cluster
        .lockctl(&["server", "add", "5", "127.0.0.1:1"])
        .await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("server 4 is still joining"),
        "{}",
        text(&o)
    );
    // Bad input: an address that is not ip:port, an id that is no member.
    let o = cluster.lockctl(&["server", "add", "5", "nowhere"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("bad address"), "{}", text(&o));
    let o = cluster.lockctl(&["server", "remove", "9"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("not a member"), "{}", text(&o));

    // Starting it late and asking again resumes the promotion.
    cluster.start_joining_server(4);
    let o = cluster.lockctl(&["server", "add", "4", &addr4]).await;
    assert!(o.status.success(), "{}", text(&o));
    cluster
        .wait_status(WAIT, "4 voters", |s| s.voters == 4)
        .await;
    let o = cluster.lockctl(&["server", "remove", "4"]).await;
    assert!(o.status.success(), "{}", text(&o));
    cluster
        .wait_status(WAIT, "3 voters", |s| s.voters == 3)
        .await;
}
