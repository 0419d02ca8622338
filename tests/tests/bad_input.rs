//! BRIEF §3.6: every RPC refuses malformed or unknown input with a precise status and
//! changes nothing; a retried request id is applied once. Raw gRPC, no client library,
//! so the requests can be as hostile as we like.

use lockd_proto::v1::lock_service_client::LockServiceClient;
use lockd_proto::v1::*;
use lockd_tests::Cluster;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const ELECTION: Duration = Duration::from_secs(15);

struct Fixture {
    cluster: Cluster,
    rpc: LockServiceClient<Channel>,
    session: u64,
    next_id: u64,
}

impl Fixture {
    async fn new() -> Fixture {
        let cluster = Cluster::start(3);
        let leader = cluster.wait_leader(ELECTION).await;
        let mut rpc = LockServiceClient::connect(format!("http://{}", cluster.addr(leader)))
            .await
            .unwrap();
        let session = rpc
            .login(LoginRequest {
                node: "node1".into(),
                cluster_id: 1,
                nonce: 42,
            })
            .await
            .unwrap()
            .into_inner()
            .session;
        let mut f = Fixture {
            cluster,
            rpc,
            session,
            next_id: 1,
        };
        let id = f.id();
        f.rpc
            .open_lockspace(OpenLockspaceRequest {
                session,
                request_id: id,
                lockspace: "fs1".into(),
                lvb_len_bytes: 16,
                recovery: RecoveryMode::Auto as i32,
            })
            .await
            .unwrap();
        f
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn lock_req(&mut self, resource: &str, mode: Mode) -> LockRequest {
        LockRequest {
            session: self.session,
            request_id: self.id(),
            ack_below: 0,
            lockspace: "fs1".into(),
            resource: resource.as_bytes().to_vec(),
            mode: mode as i32,
            flags: Some(LockFlags {
                valblk: true,
                ..Default::default()
            }),
            timeout_ms: 0,
        }
    }

    /// What a refused request must leave untouched.
    /// The leader publishes its status just after it answers, so one read may miss
    /// the last answered request: read until two reads agree on a fully applied log.
    async fn fingerprint(&self) -> (u64, u64, u64, u64, u64) {
        let read = || async {
            let s = self.cluster.wait_status(ELECTION, "status", |_| true).await;
            let print = (
                s.sessions,
                s.held_locks,
                s.waiting_requests,
                s.lockspaces,
                s.last_token,
            );
            (s.applied_index, s.commit_index, print)
        };
        lockd_tests::poll(ELECTION, "a settled status", || async {
            let (applied, commit, print) = read().await;
            let again = read().await;
            (applied == commit && again == (applied, commit, print)).then_some(print)
        })
        .await
    }
}

fn expect_code<T: std::fmt::Debug>(
    r: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    words: &str,
) {
    match r {
        Ok(v) => panic!("expected {code:?} ({words}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "wrong code for `{words}`: {}", s.message());
            assert!(
                s.message().contains(words),
                "message `{}` should mention `{words}`",
                s.message()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_refuses_bad_input_precisely_and_changes_nothing() {
    let mut f = Fixture::new().await;
    let req = f.lock_req("held", Mode::Ex);
    let held = f.rpc.lock(req).await.unwrap().into_inner();
    let before = f.fingerprint().await;
    let s = f.session;

    // Login
    let r = f
        .rpc
        .login(LoginRequest {
            node: "stranger".into(),
            cluster_id: 1,
            nonce: 1,
        })
        .await;
    expect_code(r, Code::NotFound, "unknown node `stranger`");
    let r = f
        .rpc
        .login(LoginRequest {
            node: String::new(),
            cluster_id: 1,
            nonce: 1,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "node name");
    let r = f
        .rpc
        .login(LoginRequest {
            node: "node2".into(),
            cluster_id: 99,
            nonce: 1,
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "cluster");
    let r = f
        .rpc
        .login(LoginRequest {
            node: "node1".into(),
            cluster_id: 1,
            nonce: 7,
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "node1");

    // OpenLockspace
    for (len, what) in [(7u32, "lvb"), (72, "lvb")] {
        let id = f.id();
        let r = f
            .rpc
            .open_lockspace(OpenLockspaceRequest {
                session: s,
                request_id: id,
                lockspace: "fs2".into(),
                lvb_len_bytes: len,
                recovery: 0,
            })
            .await;
        match r {
            Err(st) => {
                assert_eq!(st.code(), Code::InvalidArgument);
                assert!(
                    st.message().to_lowercase().contains(what),
                    "{}",
                    st.message()
                );
            }
            Ok(v) => panic!("lvb_len {len} accepted: {v:?}"),
        }
    }
    let id = f.id();
    let r = f
        .rpc
        .open_lockspace(OpenLockspaceRequest {
            session: s,
            request_id: id,
            lockspace: "fs1".into(),
            lvb_len_bytes: 32,
            recovery: 0,
        })
        .await;
    expect_code(r, Code::FailedPrecondition, "fs1");
    let id = f.id();
    let r = f
        .rpc
        .open_lockspace(OpenLockspaceRequest {
            session: 999_999,
            request_id: id,
            lockspace: "fs3".into(),
            lvb_len_bytes: 0,
            recovery: 0,
        })
        .await;
    expect_code(r, Code::NotFound, "999999");
    let id = f.id();
    let r = f
        .rpc
        .open_lockspace(OpenLockspaceRequest {
            session: s,
            request_id: id,
            lockspace: "x".repeat(65),
            lvb_len_bytes: 0,
            recovery: 0,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "lockspace name");
    let id = f.id();
    let r = f
        .rpc
        .open_lockspace(OpenLockspaceRequest {
            session: s,
            request_id: id,
            lockspace: "fs4".into(),
            lvb_len_bytes: 0,
            recovery: 17,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "recovery mode");

    // Lock
    let mut req = f.lock_req("r", Mode::Ex);
    req.mode = 0;
    expect_code(
        f.rpc.lock(req).await,
        Code::InvalidArgument,
        "unknown lock mode",
    );
    let mut req = f.lock_req("r", Mode::Ex);
    req.mode = 12;
    expect_code(
        f.rpc.lock(req).await,
        Code::InvalidArgument,
        "unknown lock mode 12",
    );
    let mut req = f.lock_req("r", Mode::Ex);
    req.resource = vec![b'r'; 65];
    expect_code(
        f.rpc.lock(req).await,
        Code::InvalidArgument,
        "resource name",
    );
    let mut req = f.lock_req("r", Mode::Ex);
    req.session = 424_242;
    expect_code(f.rpc.lock(req).await, Code::NotFound, "424242");
    let mut req = f.lock_req("r", Mode::Ex);
    req.lockspace = "nope".into();
    expect_code(f.rpc.lock(req).await, Code::NotFound, "nope");

    // Convert
    let id = f.id();
    let r = f
        .rpc
        .convert(ConvertRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: 77_777,
            mode: Mode::Pr as i32,
            flags: None,
            timeout_ms: 0,
            lvb: vec![],
        })
        .await;
    expect_code(r, Code::NotFound, "77777");
    let id = f.id();
    let r = f
        .rpc
        .convert(ConvertRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: held.lock_id,
            mode: 9,
            flags: None,
            timeout_ms: 0,
            lvb: vec![],
        })
        .await;
    expect_code(r, Code::InvalidArgument, "unknown lock mode");
    let id = f.id();
    let valblk = Some(LockFlags {
        valblk: true,
        ..Default::default()
    });
    let r = f
        .rpc
        .convert(ConvertRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: held.lock_id,
            mode: Mode::Pr as i32,
            flags: valblk,
            timeout_ms: 0,
            lvb: vec![1; 8],
        })
        .await;
    expect_code(r, Code::InvalidArgument, "LVB");

    // Unlock: wrong LVB size, unknown lock, another session's lock.
    let id = f.id();
    let r = f
        .rpc
        .unlock(UnlockRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: held.lock_id,
            valblk: true,
            lvb: vec![1; 15],
        })
        .await;
    expect_code(r, Code::InvalidArgument, "LVB");
    let id = f.id();
    let r = f
        .rpc
        .unlock(UnlockRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: 31_337,
            valblk: false,
            lvb: vec![],
        })
        .await;
    expect_code(r, Code::NotFound, "31337");
    let other = f
        .rpc
        .login(LoginRequest {
            node: "node2".into(),
            cluster_id: 1,
            nonce: 5,
        })
        .await
        .unwrap()
        .into_inner()
        .session;
    let id = f.id();
    let r = f
        .rpc
        .unlock(UnlockRequest {
            session: other,
            request_id: id,
            ack_below: 0,
            lock_id: held.lock_id,
            valblk: false,
            lvb: vec![],
        })
        .await;
    expect_code(r, Code::NotFound, &held.lock_id.to_string());
    let id = f.id();
    f.rpc
        .logout(LogoutRequest {
            session: other,
            request_id: id,
        })
        .await
        .unwrap();

    // Cancel
    let id = f.id();
    let r = f
        .rpc
        .cancel(CancelRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            target_request_id: 0,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "request_id");
    let id = f.id();
    let r = f
        .rpc
        .cancel(CancelRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            target_request_id: 5_555,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.cancelled, "nothing was waiting under request id 5555");

    // CheckToken
    let r = f
        .rpc
        .check_token(CheckTokenRequest {
            lockspace: String::new(),
            resource: b"r".to_vec(),
            token: 1,
        })
        .await;
    expect_code(r, Code::InvalidArgument, "lockspace name");
    let r = f
        .rpc
        .check_token(CheckTokenRequest {
            lockspace: "fs1".into(),
            resource: b"held".to_vec(),
            token: held.token + 1000,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.current);

    assert_eq!(
        f.fingerprint().await,
        before,
        "refused requests changed the state"
    );

    // Double unlock: the first succeeds, the second is NotFound.
    let id = f.id();
    f.rpc
        .unlock(UnlockRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: held.lock_id,
            valblk: false,
            lvb: vec![],
        })
        .await
        .unwrap();
    let id = f.id();
    let r = f
        .rpc
        .unlock(UnlockRequest {
            session: s,
            request_id: id,
            ack_below: 0,
            lock_id: held.lock_id,
            valblk: false,
            lvb: vec![],
        })
        .await;
    expect_code(r, Code::NotFound, &held.lock_id.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_id_is_applied_once() {
    let mut f = Fixture::new().await;
    let req = f.lock_req("retried", Mode::Ex);
    let first = f.rpc.lock(req.clone()).await.unwrap().into_inner();
    let second = f.rpc.lock(req).await.unwrap().into_inner();
    assert_eq!(first, second, "a retry gets the first outcome");
    let (_, held, _, _, last_token) = f.fingerprint().await;
    assert_eq!(held, 1);
    assert_eq!(last_token, first.token, "no second grant was made");

    let id = f.id();
    let unlock = UnlockRequest {
        session: f.session,
        request_id: id,
        ack_below: 0,
        lock_id: first.lock_id,
        valblk: false,
        lvb: vec![],
    };
    f.rpc.unlock(unlock.clone()).await.unwrap();
    // The retry of the same unlock is answered OK, not "unknown lock".
    f.rpc.unlock(unlock).await.unwrap();

    // Login with the same nonce returns the same session.
    let again = f
        .rpc
        .login(LoginRequest {
            node: "node1".into(),
            cluster_id: 1,
            nonce: 42,
        })
        .await
        .unwrap()
        .into_inner()
        .session;
    assert_eq!(again, f.session);
}
