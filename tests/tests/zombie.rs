//! A failed node can change nothing until it is fenced (issue 11, BRIEF §3.4). A real
//! node lives on while its fence agent runs, which takes seconds with IPMI, virsh or
//! storage agents: here it is a raw gRPC client (no lockd client library) that keeps
//! its old session id and stops heartbeating, so the servers expire it, and then
//! sends every request a node can send while its (slow) fence runs and after.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::lock_service_client::LockServiceClient;
use lockd_proto::v1::{
    EventsRequest, FenceAckRequest, FenceHistoryRequest, LockRequest, LoginRequest, LogoutRequest,
    NodeState, OpenLockspaceRequest, RecoveryMode, UnlockRequest,
};
use lockd_server::config::FenceDeviceConfig;
use lockd_tests::{now_ms, Cluster};
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);

/// A node speaking the wire protocol by hand, with its session id.
struct Raw {
    rpc: LockServiceClient<Channel>,
    session: u64,
    next_id: u64,
}

impl Raw {
    /// Logs `node` in on the leader and opens lockspace `fs`; sends no heartbeat.
    async fn login(cluster: &Cluster, node: &str) -> Raw {
        let leader = cluster.wait_leader(WAIT).await;
        let mut rpc = LockServiceClient::connect(format!("http://{}", cluster.addr(leader)))
            .await
            .unwrap();
        let session = rpc
            .login(LoginRequest {
                node: node.into(),
                cluster_id: 0,
                nonce: 7,
            })
            .await
            .unwrap()
            .into_inner()
            .session;
        let mut raw = Raw {
            rpc,
            session,
            next_id: 1,
        };
        let request_id = raw.id();
        raw.rpc
            .open_lockspace(OpenLockspaceRequest {
                session,
                request_id,
                lockspace: "fs".into(),
                lvb_len_bytes: 0,
                recovery: RecoveryMode::Auto as i32,
            })
            .await
            .unwrap();
        raw
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn lock_req(&mut self, resource: &str) -> LockRequest {
        LockRequest {
            session: self.session,
            request_id: self.id(),
            ack_below: 0,
            lockspace: "fs".into(),
            resource: resource.as_bytes().to_vec(),
            mode: lockd_proto::v1::Mode::Ex as i32,
            flags: None,
            timeout_ms: 0,
        }
    }

    /// Every request a node can send, with its old session; each must be refused with
    /// FAILED_PRECONDITION naming the state (login: its node must be fenced first).
    async fn assert_everything_refused(&mut self, lock_id: u64, state: &str) {
        let refused = |what: &str, r: Result<(), tonic::Status>| {
            let status = r.expect_err(what);
            assert_eq!(
                status.code(),
                Code::FailedPrecondition,
                "{what}: {status:?}"
            );
            assert!(
                status.message().contains(state) || what == "login",
                "{what}: {status:?} does not name the state `{state}`"
            );
        };
        let (session, unlock_id) = (self.session, self.id());
        let unlock = UnlockRequest {
            session,
            request_id: unlock_id,
            ack_below: 0,
            lock_id,
            lvb: Vec::new(),
            valblk: false,
        };
        refused("unlock", self.rpc.unlock(unlock).await.map(drop));
        let lock = self.lock_req("other");
        refused("lock", self.rpc.lock(lock).await.map(drop));
        let request_id = self.id();
        let open = OpenLockspaceRequest {
            session,
            request_id,
            lockspace: "fs2".into(),
            lvb_len_bytes: 0,
            recovery: RecoveryMode::Auto as i32,
        };
        refused("open", self.rpc.open_lockspace(open).await.map(drop));
        let events = self.rpc.events(EventsRequest { session }).await;
        refused("events", events.map(drop));
        let request_id = self.id();
        let logout = LogoutRequest {
            session,
            request_id,
        };
        refused("logout", self.rpc.logout(logout).await.map(drop));
        let login = LoginRequest {
            node: "node1".into(),
            cluster_id: 0,
            nonce: 8,
        };
        refused("login", self.rpc.login(login).await.map(drop));
    }
}

/// The slow agent: sleeps `delay_ms`, then appends its end time to `record` and
/// succeeds.
const SLOW_AGENT: &str = r#"#!/bin/sh
input=$(cat)
get() { printf '%s\n' "$input" | sed -n "s/^$1=//p"; }
sleep "$(awk "BEGIN{print $(get delay_ms)/1000}")"
date +%s%3N >> "$(get record)"
exit 0
"#;

/// Issue 11, sequence 1: node1 holds EX on fs/r; its fence agent takes 4 s. While the
/// fence runs, node1's Unlock, Logout, Login, Lock, OpenLockspace and event stream
/// are refused; node2, waiting for fs/r, is granted only after the agent succeeded,
/// and the history shows the fence done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_alive_while_its_slow_fence_runs_can_change_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let agent = dir.path().join("fence_slow");
    std::fs::write(&agent, SLOW_AGENT).unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let record = dir.path().join("fenced");
    let cluster = Cluster::start_with(3, |c| {
        c.liveness.heartbeat_interval_ms = 200;
        c.liveness.allowed_misses = 2;
        let mut params = BTreeMap::new();
        params.insert("delay_ms".to_string(), "4000".to_string());
        params.insert("record".to_string(), record.display().to_string());
        c.nodes[0].fence = vec![FenceDeviceConfig {
            level: 1,
            agent: agent.clone(),
            action: Default::default(),
            unfence: false,
            timeout_ms: 20_000,
            params,
        }];
    });
    let mut zombie = Raw::login(&cluster, "node1").await;
    let lock = zombie.lock_req("r");
    let lock_id = zombie.rpc.lock(lock).await.unwrap().into_inner().lock_id;

    // No heartbeats: node1 is expired, then fenced (slowly).
    cluster
        .wait_node(WAIT, "node1", |n| n.state == NodeState::Fencing as i32)
        .await;
    let node2 = cluster.connect("node2").await;
    let ls = node2
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let waiter = tokio::spawn(async move {
        let guard = ls.lock("r", Mode::Ex, LockOptions::new()).await;
        (guard, now_ms())
    });
    zombie
        .assert_everything_refused(lock_id, "being fenced")
        .await;

    let (guard, granted_ms) = tokio::time::timeout(WAIT, waiter).await.unwrap().unwrap();
    let _granted = guard.expect("node2 is granted once node1 is fenced");
    let fenced_ms: u64 = std::fs::read_to_string(&record)
        .expect("the agent ran to its end")
        .trim()
        .parse()
        .unwrap();
    assert!(
        granted_ms >= fenced_ms,
        "node2 granted at {granted_ms}, before the agent finished at {fenced_ms}"
    );
    // After the fence: the old session is gone; the node may log in anew.
    let unlock = UnlockRequest {
        session: zombie.session,
        request_id: zombie.id(),
        ack_below: 0,
        lock_id,
        lvb: Vec::new(),
        valblk: false,
    };
    assert_eq!(
        zombie.rpc.unlock(unlock).await.unwrap_err().code(),
        Code::NotFound
    );
    let leader = cluster.wait_leader(WAIT).await;
    let mut admin = AdminServiceClient::connect(format!("http://{}", cluster.addr(leader)))
        .await
        .unwrap();
    let history = admin
        .fence_history(FenceHistoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let steps: Vec<String> = history
        .entries
        .iter()
        .filter(|r| r.node == "node1")
        .map(|r| r.what.clone())
        .collect();
    assert_eq!(
        steps.iter().filter(|w| *w == "done").count(),
        1,
        "the fence history shows the fence done once: {steps:?}"
    );
}

/// Issue 11, sequence 2: node1 has no fence device and is being fenced; it sends Lock
/// on a resource node2 holds (refused, not queued); the operator acknowledges the
/// fence. Every server keeps running, and after a restart of all three a leader is
/// elected again (the committed entries replay without a panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_ack_after_a_request_from_a_fencing_node_keeps_the_cluster_up() {
    let mut cluster = Cluster::start_with(3, |c| {
        c.liveness.heartbeat_interval_ms = 200;
        c.liveness.allowed_misses = 2;
    });
    let node2 = cluster.connect("node2").await;
    let ls = node2
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let held = ls.lock("x", Mode::Ex, LockOptions::new()).await.unwrap();
    let mut zombie = Raw::login(&cluster, "node1").await;
    let own = zombie.lock_req("mine");
    let own_id = zombie.rpc.lock(own).await.unwrap().into_inner().lock_id;
    cluster
        .wait_node(WAIT, "node1", |n| n.state == NodeState::Fencing as i32)
        .await;
    let lock = zombie.lock_req("x");
    let status = tokio::time::timeout(WAIT, zombie.rpc.lock(lock))
        .await
        .expect("answered at once, not queued")
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    zombie
        .assert_everything_refused(own_id, "being fenced")
        .await;

    let leader = cluster.wait_leader(WAIT).await;
    let mut admin = AdminServiceClient::connect(format!("http://{}", cluster.addr(leader)))
        .await
        .unwrap();
    admin
        .fence_ack(FenceAckRequest {
            node: "node1".into(),
            by: "test".into(),
        })
        .await
        .unwrap();
    cluster
        .wait_status(WAIT, "node1 fenced and gone", |s| {
            s.nodes.iter().all(|n| n.name != "node1")
        })
        .await;
    held.unlock().await.expect("the cluster still serves");
    for id in cluster.ids() {
        cluster.kill(id);
    }
    for id in cluster.ids() {
        cluster.start_server(id);
    }
    cluster.wait_leader(WAIT).await;
    let again = cluster.connect("node1").await;
    let ls = again
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let _granted = ls
        .lock("x", Mode::Ex, LockOptions::new())
        .await
        .expect("a leader after the restart, and node1 back as a new session");
}
