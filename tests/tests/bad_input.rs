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

    fn unlock_req(&mut self, lock_id: u64) -> UnlockRequest {
        UnlockRequest {
            session: self.session,
            request_id: self.id(),
            ack_below: 0,
            lock_id,
            valblk: false,
            lvb: vec![],
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
    let req = UnlockRequest {
        valblk: true,
        lvb: vec![1; 15],
        ..f.unlock_req(held.lock_id)
    };
    let r = f.rpc.unlock(req).await;
    expect_code(r, Code::InvalidArgument, "LVB");
    let req = f.unlock_req(31_337);
    let r = f.rpc.unlock(req).await;
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
    let req = UnlockRequest {
        session: other,
        ..f.unlock_req(held.lock_id)
    };
    let r = f.rpc.unlock(req).await;
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
    let req = f.unlock_req(held.lock_id);
    f.rpc.unlock(req).await.unwrap();
    let req = f.unlock_req(held.lock_id);
    let r = f.rpc.unlock(req).await;
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

    let unlock = f.unlock_req(first.lock_id);
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

/// Keeps a raw session alive (the fixture's sessions have no library keeper), on a
/// connection of its own as the client library's are: a server serves 256 streams of
/// one connection at once, so heartbeats behind a flood of calls on the same
/// connection would wait their turn and the session expire.
async fn heartbeat(f: &Fixture, session: u64) -> tokio::task::JoinHandle<()> {
    let leader = f.cluster.wait_leader(ELECTION).await;
    let mut rpc = LockServiceClient::connect(format!("http://{}", f.cluster.addr(leader)))
        .await
        .unwrap();
    tokio::spawn(async move {
        loop {
            let _ = rpc.heartbeat(HeartbeatRequest { session }).await;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// The fingerprint once the healthy client's probe lock is gone again (Status is the
/// leader's view, refreshed as it applies, so it may lag a reply by a moment).
async fn settled(f: &Fixture, held_locks: u64) -> (u64, u64, u64, u64, u64) {
    f.cluster
        .wait_status(ELECTION, "the probe's lock released", |s| {
            s.held_locks == held_locks && s.waiting_requests == 0
        })
        .await;
    f.fingerprint().await
}

/// Another client's lock + unlock, which must keep working while hostile clients do
/// their worst; returns how long it took.
async fn probe(healthy: &lockd_client::Lockspace, resource: &str) -> Duration {
    let start = std::time::Instant::now();
    let guard = tokio::time::timeout(
        Duration::from_secs(10),
        healthy.lock(
            resource,
            lockd_client::Mode::Ex,
            lockd_client::LockOptions::new(),
        ),
    )
    .await
    .expect("the healthy client was starved")
    .expect("the healthy client's lock failed");
    guard.unlock().await.expect("the healthy client's unlock");
    start.elapsed()
}

/// Seeded generated hostile requests (oversized names and LVBs, invalid enums, unknown
/// sessions and lock ids, another session's lock), a flood from one session, half-open
/// connections and an event stream nobody reads: each request gets its precise status,
/// a healthy client keeps being served throughout, and the lock table does not change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_hostile_requests_floods_and_stalled_streams_change_nothing() {
    let mut f = Fixture::new().await;
    let _beat1 = heartbeat(&f, f.session).await;
    let req = f.lock_req("held", Mode::Ex);
    let held = f.rpc.lock(req).await.unwrap().into_inner();
    // node2: a second raw session holding PR on "cb", for foreign-lock and callback abuse.
    let s2 = f
        .rpc
        .login(LoginRequest {
            node: "node2".into(),
            cluster_id: 1,
            nonce: 2,
        })
        .await
        .unwrap()
        .into_inner()
        .session;
    let _beat2 = heartbeat(&f, s2).await;
    f.rpc
        .open_lockspace(OpenLockspaceRequest {
            session: s2,
            request_id: 1,
            lockspace: "fs1".into(),
            lvb_len_bytes: 16,
            recovery: RecoveryMode::Auto as i32,
        })
        .await
        .unwrap();
    let mut cb = LockRequest {
        session: s2,
        request_id: 2,
        ack_below: 0,
        lockspace: "fs1".into(),
        resource: b"cb".to_vec(),
        mode: Mode::Pr as i32,
        flags: None,
        timeout_ms: 0,
    };
    let s2_lock = f.rpc.lock(cb.clone()).await.unwrap().into_inner();
    let healthy_client = f.cluster.connect("node3").await;
    let healthy = healthy_client
        .open_lockspace("healthy", lockd_client::LockspaceOptions::default())
        .await
        .unwrap();
    probe(&healthy, "probe").await;
    // Refreshed after each probe: the healthy client's own grants move the token.
    let mut before = settled(&f, 2).await;

    // 1. Generated hostile requests, each with the one status it deserves.
    let mut rng = lockd_tests::Rng::new(4711);
    let mut counts = std::collections::BTreeMap::<&str, u32>::new();
    for i in 0..400 {
        let kind = rng.below(7);
        let (what, r): (&str, Result<(), tonic::Status>) = match kind {
            0 => {
                let mut req = f.lock_req("r", Mode::Ex);
                req.resource = vec![b'x'; 65 + rng.below(64 * 1024) as usize];
                ("oversized resource", f.rpc.lock(req).await.map(drop))
            }
            1 => {
                let mut req = f.lock_req("r", Mode::Ex);
                req.lockspace = "l".repeat(65 + rng.below(4096) as usize);
                ("oversized lockspace", f.rpc.lock(req).await.map(drop))
            }
            2 => {
                let mut req = f.lock_req("r", Mode::Ex);
                req.mode = match rng.below(3) {
                    0 => 7 + rng.below(1 << 30) as i32,
                    1 => -(1 + rng.below(1 << 30) as i32),
                    _ => 0,
                };
                ("invalid mode", f.rpc.lock(req).await.map(drop))
            }
            3 => {
                let mut len = rng.below(70 * 1024) as usize;
                // 16 is the lockspace's LVB length; none at all writes nothing.
                if len == 16 || len == 0 {
                    len = 17;
                }
                let req = UnlockRequest {
                    valblk: true,
                    lvb: vec![7; len],
                    ..f.unlock_req(held.lock_id)
                };
                let r = f.rpc.unlock(req).await;
                ("wrong-size LVB", r.map(drop))
            }
            4 => {
                let mut req = f.lock_req("r", Mode::Ex);
                req.session = 1_000_000 + rng.below(u64::MAX / 2);
                ("unknown session", f.rpc.lock(req).await.map(drop))
            }
            5 => {
                let id = f.id();
                let r = f
                    .rpc
                    .convert(ConvertRequest {
                        session: f.session,
                        request_id: id,
                        ack_below: 0,
                        lock_id: 1_000_000 + rng.below(u64::MAX / 2),
                        mode: Mode::Pr as i32,
                        flags: None,
                        timeout_ms: 0,
                        lvb: Vec::new(),
                    })
                    .await;
                ("unknown lock id", r.map(drop))
            }
            _ => {
                // node1 unlocking node2's lock: not its lock, so not found for it.
                let req = f.unlock_req(s2_lock.lock_id);
                let r = f.rpc.unlock(req).await;
                ("another session's lock", r.map(drop))
            }
        };
        let want = match kind {
            0..=3 => Code::InvalidArgument,
            _ => Code::NotFound,
        };
        match r {
            Ok(()) => panic!("request {i} ({what}) was accepted"),
            Err(st) => assert_eq!(st.code(), want, "request {i} ({what}): {}", st.message()),
        }
        *counts.entry(what).or_default() += 1;
        if i % 100 == 99 {
            assert_eq!(f.fingerprint().await, before, "after {} requests", i + 1);
            probe(&healthy, "probe").await;
            before = settled(&f, 2).await;
        }
    }
    println!("hostile requests refused: {counts:?}");

    // 2. A flood from one session: 2,000 concurrent try-locks on a held resource,
    // while the healthy client keeps working.
    let flood: Vec<_> = (0..2_000)
        .map(|_| {
            let req = f.lock_req("held", Mode::Pr);
            let mut req = req;
            req.flags = Some(LockFlags {
                r#try: true,
                ..Default::default()
            });
            let mut rpc = f.rpc.clone();
            tokio::spawn(async move { rpc.lock(req).await.map(drop) })
        })
        .collect();
    let during = probe(&healthy, "probe").await;
    let probed = settled(&f, 2).await;
    let mut codes = std::collections::BTreeMap::<String, u32>::new();
    for t in flood {
        let r = t.await.unwrap();
        let code = match r {
            Ok(()) => panic!("a try-lock on an EX-held resource was granted"),
            Err(st) => st.code(),
        };
        assert!(
            matches!(code, Code::Aborted | Code::ResourceExhausted),
            "flood request answered {code:?}"
        );
        *codes.entry(format!("{code:?}")).or_default() += 1;
    }
    println!("flood of 2000 try-locks: {codes:?}; healthy lock+unlock during it took {during:?}");
    assert_eq!(f.fingerprint().await, probed, "after the flood");
    // The flood itself changed nothing but the probe's token.
    assert_eq!(
        (probed.0, probed.1, probed.2, probed.3),
        (before.0, before.1, before.2, before.3)
    );

    // 3. Half-open connections: one that sends half an HTTP/2 preface, one that sends
    // nothing. The server must keep serving others.
    let leader = f.cluster.wait_leader(ELECTION).await;
    let mut half = tokio::net::TcpStream::connect(f.cluster.addr(leader))
        .await
        .unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut half, b"PRI * HTTP/2.0\r\n")
        .await
        .unwrap();
    let silent = tokio::net::TcpStream::connect(f.cluster.addr(leader))
        .await
        .unwrap();
    probe(&healthy, "probe").await;

    // 4. node2 opens its event stream and does not read it, while node1 sends it
    // blocking callbacks (try_1cb; one per holder and requested mode) on resources
    // node2 holds in PR. The server keeps serving everyone and loses no callback.
    // (Overflowing the stream's bound, 1,024 events plus the HTTP/2 windows, would
    // take tens of thousands of callbacks: too slow for this suite.)
    const RESOURCES: usize = 150;
    for i in 0..RESOURCES {
        cb.request_id = 3 + i as u64;
        cb.resource = format!("cb{i}").into_bytes();
        f.rpc.lock(cb.clone()).await.unwrap();
    }
    let before = settled(&f, 2 + RESOURCES as u64).await;
    let stalled = f.rpc.events(EventsRequest { session: s2 }).await.unwrap();
    const CALLBACKS: usize = 2 * RESOURCES;
    for i in 0..RESOURCES {
        for mode in [Mode::Ex, Mode::Pw] {
            let mut req = f.lock_req(&format!("cb{i}"), mode);
            req.flags = Some(LockFlags {
                try_1cb: true,
                ..Default::default()
            });
            let r = f.rpc.lock(req).await;
            expect_code(r, Code::Aborted, "would block");
        }
    }
    assert_eq!(f.fingerprint().await, before, "after the unread stream");
    probe(&healthy, "probe").await;
    // Read late, the stream still holds every callback, in order of sending.
    let mut stalled = stalled.into_inner();
    let mut delivered = 0;
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        while delivered < CALLBACKS {
            match stalled.message().await {
                Ok(Some(_)) => delivered += 1,
                _ => break,
            }
        }
    })
    .await;
    println!("unread event stream: {delivered} of {CALLBACKS} callbacks delivered when read late");
    assert!(
        read.is_ok(),
        "the late reader got only {delivered} callbacks"
    );
    assert_eq!(delivered, CALLBACKS);
    // node2's session is still alive and served.
    cb.request_id = 3 + RESOURCES as u64;
    cb.resource = b"after".to_vec();
    f.rpc.lock(cb).await.expect("node2 still served");
    drop((half, silent));
}

/// One reply of a pipeline stream, with a deadline.
async fn next_reply(replies: &mut tonic::Streaming<PipelineReply>) -> PipelineReply {
    tokio::time::timeout(ELECTION, replies.message())
        .await
        .expect("no pipeline reply in time")
        .expect("the pipeline stream failed")
        .expect("the pipeline stream ended")
}

fn pipelined(tag: u64, call: pipeline_request::Call) -> PipelineRequest {
    PipelineRequest {
        tag,
        call: Some(call),
    }
}

/// The Pipeline stream answers each call by its tag as it finishes (a queued lock
/// holds up nothing behind it), refuses bad calls with the unary call's code, and
/// works on at most 1,024 calls of one stream at once: a stream that floods it with
/// locks that can only wait gets exactly that many queued, while another client is
/// served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_answers_by_tag_refuses_like_the_unary_calls_and_bounds_a_stream() {
    use pipeline_reply::Result as Answer;
    use pipeline_request::Call;
    let mut f = Fixture::new().await;
    let _beat1 = heartbeat(&f, f.session).await;
    let req = f.lock_req("held", Mode::Ex);
    let held = f.rpc.lock(req).await.unwrap().into_inner();
    let before = f.fingerprint().await;

    let (tx, rx) = tokio::sync::mpsc::channel(2_048);
    let mut replies = f
        .rpc
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Tag 1 waits behind `held` (the same session asks again for EX).
    tx.send(pipelined(1, Call::Lock(f.lock_req("held", Mode::Ex))))
        .await
        .unwrap();
    tx.send(PipelineRequest { tag: 2, call: None })
        .await
        .unwrap();
    let mut bad_mode = f.lock_req("r", Mode::Ex);
    bad_mode.mode = 12;
    tx.send(pipelined(3, Call::Lock(bad_mode))).await.unwrap();
    tx.send(pipelined(4, Call::Unlock(f.unlock_req(31_337))))
        .await
        .unwrap();
    let mut refused = std::collections::BTreeMap::new();
    for _ in 0..3 {
        let reply = next_reply(&mut replies).await;
        match reply.result {
            Some(Answer::Error(e)) => {
                refused.insert(reply.tag, (Code::from_i32(e.code), e.message))
            }
            other => panic!("tag {}: expected a refusal, got {other:?}", reply.tag),
        };
    }
    let expect = |tag: u64, code: Code, words: &str| {
        let (got, message) = &refused[&tag];
        assert_eq!(*got, code, "tag {tag}: {message}");
        assert!(
            message.contains(words),
            "tag {tag}: `{message}` should mention `{words}`"
        );
    };
    expect(2, Code::InvalidArgument, "lock, convert or unlock");
    expect(3, Code::InvalidArgument, "unknown lock mode 12");
    expect(4, Code::NotFound, "31337");
    let (sessions, held_locks, waiting, lockspaces, token) = f.fingerprint().await;
    assert_eq!(
        (sessions, held_locks, waiting, lockspaces, token),
        (before.0, before.1, before.2 + 1, before.3, before.4),
        "the refused calls changed nothing; tag 1 waits"
    );

    // A lock on a free resource is answered while tag 1 still waits.
    tx.send(pipelined(5, Call::Lock(f.lock_req("free", Mode::Ex))))
        .await
        .unwrap();
    let reply = next_reply(&mut replies).await;
    assert_eq!(reply.tag, 5);
    let Some(Answer::Grant(free)) = reply.result else {
        panic!("{reply:?}")
    };
    // Unlocking `held` on the stream answers tag 6, then grants tag 1.
    tx.send(pipelined(6, Call::Unlock(f.unlock_req(held.lock_id))))
        .await
        .unwrap();
    let mut answered = std::collections::BTreeMap::new();
    for _ in 0..2 {
        let reply = next_reply(&mut replies).await;
        answered.insert(reply.tag, reply.result);
    }
    assert!(
        matches!(answered[&6], Some(Answer::Unlocked(_))),
        "{answered:?}"
    );
    match &answered[&1] {
        Some(Answer::Grant(g)) => assert!(g.token > free.token, "{g:?} after {free:?}"),
        other => panic!("tag 1: {other:?}"),
    }

    // Flood: 1,100 locks on "busy", which the fixture's session holds, so they can
    // only wait. The server takes 1,024 and reads no further from this stream.
    let req = f.lock_req("busy", Mode::Ex);
    f.rpc.lock(req).await.unwrap();
    let (sessions, held_locks, waiting, _, _) = f.fingerprint().await;
    for tag in 100..1_200 {
        tx.send(pipelined(tag, Call::Lock(f.lock_req("busy", Mode::Ex))))
            .await
            .unwrap();
    }
    f.cluster
        .wait_status(ELECTION, "1,024 flood locks queued", |s| {
            s.waiting_requests == waiting + 1_024
        })
        .await;
    let healthy_client = f.cluster.connect("node3").await;
    let healthy = healthy_client
        .open_lockspace("healthy", lockd_client::LockspaceOptions::default())
        .await
        .unwrap();
    probe(&healthy, "probe").await;
    f.cluster
        .wait_status(ELECTION, "the probe's lock released", |s| {
            s.held_locks == held_locks
        })
        .await;
    let (s, h, w, _, _) = f.fingerprint().await;
    assert_eq!(
        (s, h, w),
        (sessions + 1, held_locks, waiting + 1_024),
        "no more than 1,024 read"
    );
}

// ---- issue #14: each finding of the outside campaign, with its exact status ----

/// A codec that sends and receives message bodies as they are: for requests the
/// generated types cannot express (strings that are not UTF-8, truncated fields).
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;

    fn encoder(&mut self) -> Raw {
        Raw
    }

    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        prost::bytes::BufMut::put_slice(buf, &item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let n = buf.remaining();
        Ok(Some(buf.copy_to_bytes(n).to_vec()))
    }
}

async fn raw_grpc(addr: &str) -> tonic::client::Grpc<Channel> {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

/// One unary call with a raw body.
async fn raw_call(addr: &str, path: &'static str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = raw_grpc(addr).await;
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(body),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        Raw,
    )
    .await
    .map(|r| r.into_inner())
}

fn expect_status<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, words: &str) {
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

async fn admin(f: &Fixture) -> lockd_proto::v1::admin_service_client::AdminServiceClient<Channel> {
    let leader = f.cluster.wait_leader(ELECTION).await;
    lockd_proto::v1::admin_service_client::AdminServiceClient::connect(format!(
        "http://{}",
        f.cluster.addr(leader)
    ))
    .await
    .unwrap()
}

/// Finding 1: a request id names one request. The same id with another request is
/// refused, naming the id, and never answered with the first request's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_reused_for_another_request_is_invalid_argument_naming_the_id() {
    let mut f = Fixture::new().await;
    let _beat = heartbeat(&f, f.session).await;
    let mut a = f.lock_req("A", Mode::Ex);
    a.request_id = 100;
    let grant = f.rpc.lock(a.clone()).await.unwrap().into_inner();
    let before = f.fingerprint().await;
    let mut b = f.lock_req("B", Mode::Pr);
    b.request_id = 100;
    expect_code(f.rpc.lock(b).await, Code::InvalidArgument, "request id 100");
    let unlock = UnlockRequest {
        request_id: 100,
        ..f.unlock_req(grant.lock_id)
    };
    expect_code(
        f.rpc.unlock(unlock).await,
        Code::InvalidArgument,
        "request id 100",
    );
    assert_eq!(
        f.fingerprint().await,
        before,
        "the refusals changed nothing"
    );
    // The same request again is still a retry, answered with the first grant.
    a.ack_below = 100;
    assert_eq!(f.rpc.lock(a).await.unwrap().into_inner(), grant);
}

/// Finding 2: a request that does not decode is INVALID_ARGUMENT naming the field, on
/// every service, not INTERNAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_requests_are_invalid_arguments_naming_the_field() {
    let f = Fixture::new().await;
    let before = f.fingerprint().await;
    let leader = f.cluster.wait_leader(ELECTION).await;
    let addr = f.cluster.addr(leader);
    // A string field (wire type 2) holding the one byte 0xff, which is not UTF-8.
    let bad_string = |field: u8| vec![(field << 3) | 2, 1, 0xff];
    let cases: Vec<(&'static str, Vec<u8>, &str)> = vec![
        (
            "/lockd.v1.LockService/Login",
            bad_string(1),
            "LoginRequest.node",
        ),
        (
            "/lockd.v1.LockService/OpenLockspace",
            bad_string(3),
            "OpenLockspaceRequest.lockspace",
        ),
        (
            "/lockd.v1.LockService/Lock",
            bad_string(4),
            "LockRequest.lockspace",
        ),
        (
            "/lockd.v1.LockService/CheckToken",
            bad_string(1),
            "CheckTokenRequest.lockspace",
        ),
        (
            "/lockd.v1.AdminService/ForceExpire",
            bad_string(1),
            "ForceExpireRequest.node",
        ),
        (
            "/lockd.v1.AdminService/FenceAck",
            bad_string(2),
            "FenceAckRequest.by",
        ),
        (
            "/lockd.v1.AdminService/AddServer",
            bad_string(2),
            "AddServerRequest.addr",
        ),
        (
            "/lockd.v1.AdminService/SetLogLevel",
            bad_string(1),
            "SetLogLevelRequest.filter",
        ),
        // Field 1 (force) announced as a varint that never comes.
        (
            "/lockd.v1.AdminService/Shutdown",
            vec![0x08],
            "ShutdownRequest",
        ),
        // Field 2 (the lock) announced as 5 bytes, 1 sent.
        (
            "/lockd.v1.LockService/Lock",
            vec![0x12, 0x05, 0x0a],
            "LockRequest",
        ),
    ];
    for (path, body, field) in cases {
        let r = raw_call(&addr, path, body).await;
        match r {
            Ok(v) => panic!("{path}: undecodable request accepted: {v:?}"),
            Err(s) => {
                assert_eq!(s.code(), Code::InvalidArgument, "{path}: {}", s.message());
                assert!(
                    s.message().contains(field),
                    "{path}: `{}` should name `{field}`",
                    s.message()
                );
            }
        }
    }
    assert_eq!(f.fingerprint().await, before, "nothing changed");
    assert!(
        f.cluster.status(leader).await.is_some(),
        "the server that got undecodable Shutdown bytes still runs"
    );
}

/// Finding 3: an error quotes at most 64 bytes of the input, so a 1 MiB argument gets
/// its real error, not RESOURCE_EXHAUSTED from an oversized reply header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_at_most_64_bytes_of_a_huge_argument() {
    let f = Fixture::new().await;
    let mut admin = admin(&f).await;
    let huge = "x".repeat(1 << 20);
    let r = admin
        .add_server(AddServerRequest {
            id: 9,
            addr: huge.clone(),
            catch_up_timeout_ms: 0,
        })
        .await;
    let capped = |r: Result<_, tonic::Status>, words: &str| {
        expect_status(
            r.map(|_: tonic::Response<()>| ()),
            Code::InvalidArgument,
            words,
        );
    };
    let s = r.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(
        s.message().contains(&format!("`{}…`", "x".repeat(64))),
        "{}",
        s.message()
    );
    assert!(s.message().len() < 300, "{} bytes", s.message().len());
    let r = admin
        .set_log_level(SetLogLevelRequest {
            filter: huge.clone(),
        })
        .await;
    capped(r.map(|_| tonic::Response::new(())), "exceeds the maximum");
    let s = admin
        .set_log_level(SetLogLevelRequest {
            filter: format!("{}=[", "y".repeat(200)),
        })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument, "{}", s.message());
    assert!(
        s.message().contains("…") && s.message().len() < 300,
        "{}",
        s.message()
    );
}

/// Finding 4: malformed AddServer / RemoveServer arguments are INVALID_ARGUMENT (not
/// FAILED_PRECONDITION, which is for a well-formed change the cluster cannot make now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_server_changes_are_invalid_arguments() {
    let f = Fixture::new().await;
    let before = f.fingerprint().await;
    let mut admin = admin(&f).await;
    let add = |id: u64, addr: &str| AddServerRequest {
        id,
        addr: addr.into(),
        catch_up_timeout_ms: 1,
    };
    expect_code(
        admin.add_server(add(0, "127.0.0.1:7109")).await,
        Code::InvalidArgument,
        "non-zero",
    );
    expect_code(
        admin.add_server(add(9, "nowhere")).await,
        Code::InvalidArgument,
        "bad address `nowhere`: expected ip:port",
    );
    expect_code(
        admin.remove_server(RemoveServerRequest { id: 0 }).await,
        Code::InvalidArgument,
        "non-zero",
    );
    assert_eq!(f.fingerprint().await, before);
    let s = f.cluster.wait_status(ELECTION, "status", |_| true).await;
    assert_eq!(s.members.len(), 3, "no member added: {:?}", s.members);
}

/// Finding 5: an undecodable Pipeline frame ends the stream with INVALID_ARGUMENT
/// after the calls read before it are answered; nothing after it is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_answers_what_came_before_an_undecodable_frame_then_refuses_it() {
    use prost::Message;
    let mut f = Fixture::new().await;
    let _beat = heartbeat(&f, f.session).await;
    let before = f.fingerprint().await;
    let frame = |tag: u64, lock: LockRequest| {
        pipelined(tag, pipeline_request::Call::Lock(lock)).encode_to_vec()
    };
    let frames = vec![
        frame(1, f.lock_req("p1", Mode::Ex)),
        // Field 2 (a lock) announced as 5 bytes, 1 sent.
        vec![0x12, 0x05, 0x0a],
        frame(3, f.lock_req("p3", Mode::Ex)),
    ];
    let leader = f.cluster.wait_leader(ELECTION).await;
    let mut grpc = raw_grpc(&f.cluster.addr(leader)).await;
    grpc.ready().await.unwrap();
    let mut replies = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(frames)),
            tonic::codegen::http::uri::PathAndQuery::from_static("/lockd.v1.LockService/Pipeline"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(ELECTION, replies.message())
        .await
        .expect("a reply in time")
        .expect("the first call is answered")
        .expect("the stream carries the first reply");
    let first = PipelineReply::decode(first.as_slice()).unwrap();
    assert_eq!(first.tag, 1);
    assert!(
        matches!(first.result, Some(pipeline_reply::Result::Grant(_))),
        "{first:?}"
    );
    let end = tokio::time::timeout(ELECTION, replies.message())
        .await
        .expect("the stream ends in time");
    expect_status(end, Code::InvalidArgument, "PipelineRequest");
    let (sessions, held, waiting, lockspaces, _) = f.fingerprint().await;
    assert_eq!(
        (sessions, held, waiting, lockspaces),
        (before.0, before.1 + 1, before.2, before.3),
        "p1 granted, p3 (after the bad frame) never read"
    );

    // A frame over the 4 MiB request limit ends a stream the same way, OUT_OF_RANGE.
    let frames = vec![frame(4, f.lock_req("p4", Mode::Ex)), vec![0; 5 << 20]];
    grpc.ready().await.unwrap();
    let mut replies = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(frames)),
            tonic::codegen::http::uri::PathAndQuery::from_static("/lockd.v1.LockService/Pipeline"),
            Raw,
        )
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(ELECTION, replies.message())
        .await
        .expect("a reply in time")
        .expect("the call before the oversized frame is answered")
        .expect("the stream carries its reply");
    assert_eq!(PipelineReply::decode(first.as_slice()).unwrap().tag, 4);
    let end = tokio::time::timeout(ELECTION, replies.message())
        .await
        .expect("the stream ends in time");
    expect_status(end, Code::OutOfRange, "too large");
}

/// Finding 6: a second Events stream for a session closes the first with a status
/// that says it was replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_events_stream_closes_the_first_as_replaced() {
    let mut f = Fixture::new().await;
    let _beat = heartbeat(&f, f.session).await;
    let session = f.session;
    let mut first = f
        .rpc
        .events(EventsRequest { session })
        .await
        .unwrap()
        .into_inner();
    let mut second = f
        .rpc
        .events(EventsRequest { session })
        .await
        .unwrap()
        .into_inner();
    let end = tokio::time::timeout(ELECTION, first.message())
        .await
        .expect("the first stream ends in time");
    expect_status(end, Code::Aborted, "replaced");
    // The newer stream works: it gets a blocking callback.
    let req = f.lock_req("cb", Mode::Ex);
    let held = f.rpc.lock(req).await.unwrap().into_inner();
    let node2 = f
        .rpc
        .login(LoginRequest {
            node: "node2".into(),
            cluster_id: 1,
            nonce: 3,
        })
        .await
        .unwrap()
        .into_inner()
        .session;
    f.rpc
        .open_lockspace(OpenLockspaceRequest {
            session: node2,
            request_id: 1,
            lockspace: "fs1".into(),
            lvb_len_bytes: 16,
            recovery: RecoveryMode::Auto as i32,
        })
        .await
        .unwrap();
    let blocked = LockRequest {
        session: node2,
        request_id: 2,
        ack_below: 0,
        lockspace: "fs1".into(),
        resource: b"cb".to_vec(),
        mode: Mode::Pr as i32,
        flags: Some(LockFlags {
            try_1cb: true,
            ..Default::default()
        }),
        timeout_ms: 0,
    };
    expect_code(f.rpc.lock(blocked).await, Code::Aborted, "would block");
    let event = tokio::time::timeout(ELECTION, second.message())
        .await
        .expect("an event in time")
        .expect("the newer stream is open")
        .expect("an event");
    match event.kind {
        Some(event::Kind::Blocking(cb)) => assert_eq!(cb.lock_id, held.lock_id),
        other => panic!("{other:?}"),
    }
}

/// Reads the server's first SETTINGS frame on a fresh HTTP/2 connection: (id, value).
async fn server_http2_settings(addr: &str) -> Vec<(u16, u32)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    tcp.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).await.unwrap();
    loop {
        let mut header = [0u8; 9];
        tokio::time::timeout(ELECTION, tcp.read_exact(&mut header))
            .await
            .expect("a frame in time")
            .unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        // SETTINGS, not an ACK.
        if header[3] == 4 && header[4] & 1 == 0 {
            return payload
                .chunks(6)
                .map(|e| {
                    (
                        u16::from_be_bytes([e[0], e[1]]),
                        u32::from_be_bytes([e[2], e[3], e[4], e[5]]),
                    )
                })
                .collect();
        }
    }
}

/// Finding 7: the server advertises its limit of concurrent streams per connection
/// (SETTINGS_MAX_CONCURRENT_STREAMS = 256), so a flood of streams on one connection
/// is queued by the client instead of held by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_advertises_its_stream_limit_per_connection() {
    let cluster = Cluster::start(1);
    let leader = cluster.wait_leader(ELECTION).await;
    let settings = server_http2_settings(&cluster.addr(leader)).await;
    const MAX_CONCURRENT_STREAMS: u16 = 3;
    assert!(
        settings.contains(&(MAX_CONCURRENT_STREAMS, 256)),
        "SETTINGS: {settings:?}"
    );
}

/// Finding 8: the smaller ones. An empty log filter is refused; the LVB rule is one
/// for Unlock and Convert (valblk without bytes writes nothing; bytes from a holder
/// that does not write the LVB are refused, not ignored); CheckToken answers as the
/// proto says (an unknown lockspace or a free resource: not current, latest 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_log_filters_stray_lvbs_and_check_token_answer_as_documented() {
    let mut f = Fixture::new().await;
    let _beat = heartbeat(&f, f.session).await;
    let mut admin = admin(&f).await;
    expect_code(
        admin
            .set_log_level(SetLogLevelRequest {
                filter: String::new(),
            })
            .await,
        Code::InvalidArgument,
        "filter is empty",
    );

    // A PR holder's Unlock with 33 LVB bytes: refused, the lock stays.
    let req = f.lock_req("lvb-pr", Mode::Pr);
    let pr = f.rpc.lock(req).await.unwrap().into_inner();
    let before = f.fingerprint().await;
    let req = UnlockRequest {
        valblk: true,
        lvb: vec![3; 33],
        ..f.unlock_req(pr.lock_id)
    };
    expect_code(f.rpc.unlock(req).await, Code::InvalidArgument, "held in PR");
    // LVB bytes without valblk: refused, not ignored.
    let req = UnlockRequest {
        lvb: vec![3; 16],
        ..f.unlock_req(pr.lock_id)
    };
    expect_code(
        f.rpc.unlock(req).await,
        Code::InvalidArgument,
        "without valblk",
    );
    assert_eq!(f.fingerprint().await, before);

    // An EX holder: valblk without bytes writes nothing, on Convert and on Unlock alike.
    let req = f.lock_req("lvb-ex", Mode::Ex);
    let ex = f.rpc.lock(req).await.unwrap().into_inner();
    let id = f.id();
    let valblk = Some(LockFlags {
        valblk: true,
        ..Default::default()
    });
    let converted = f
        .rpc
        .convert(ConvertRequest {
            session: f.session,
            request_id: id,
            ack_below: 0,
            lock_id: ex.lock_id,
            mode: Mode::Pw as i32,
            flags: valblk,
            timeout_ms: 0,
            lvb: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(converted.lvb, vec![0; 16]);
    let req = UnlockRequest {
        valblk: true,
        ..f.unlock_req(ex.lock_id)
    };
    f.rpc
        .unlock(req)
        .await
        .expect("valblk without an LVB writes nothing");

    // CheckToken: a free resource and an unknown lockspace are not current, latest 0.
    let r = f
        .rpc
        .check_token(CheckTokenRequest {
            lockspace: "fs1".into(),
            resource: b"lvb-ex".to_vec(),
            token: converted.token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.current, r.latest), (false, 0));
    let r = f
        .rpc
        .check_token(CheckTokenRequest {
            lockspace: "nowhere".into(),
            resource: b"r".to_vec(),
            token: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.current, r.latest), (false, 0));
    let r = f
        .rpc
        .check_token(CheckTokenRequest {
            lockspace: "fs1".into(),
            resource: b"lvb-pr".to_vec(),
            token: pr.token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.current, r.latest), (true, pr.token));
}

/// A server process started by hand under a shell's descriptor limits; killed on drop.
struct LimitedServer {
    child: std::process::Child,
    addr: String,
    dir: tempfile::TempDir,
}

impl Drop for LimitedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LimitedServer {
    /// A one-server cluster whose process starts with `ulimit` soft/hard descriptors.
    fn start(soft: u32, hard: u32) -> LimitedServer {
        let dir = tempfile::tempdir().unwrap();
        let port = lockd_tests::free_ports(1)[0];
        let mut config = lockd_server::config::Config::dev(1, 0, dir.path().to_owned());
        config.servers[0].addr = format!("127.0.0.1:{port}");
        config.servers[0].metrics_addr = None;
        config.validate().unwrap();
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, config.to_toml()).unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
            ))
            .arg(lockd_tests::server_binary())
            .args(["run", "--config"])
            .arg(&config_path)
            .args(["--id", "1", "--bootstrap"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        LimitedServer {
            child,
            addr: format!("127.0.0.1:{port}"),
            dir,
        }
    }

    async fn status(&self) -> Option<StatusReply> {
        let endpoint = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_millis(500));
        let channel = endpoint.connect().await.ok()?;
        let mut admin = lockd_proto::v1::admin_service_client::AdminServiceClient::new(channel);
        admin
            .status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

/// Issue #12 item 5: under a low descriptor limit the server raises its soft limit to
/// the hard one, serves connections only up to a limit below it (closing the others
/// at once), and keeps accepting: after a flood of 400 connections, clients are
/// served again. (On main the listener died of EMFILE for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_under_a_low_descriptor_limit_survives_a_connection_flood() {
    // (soft, hard) → (descriptors in force, connections served): raised where the
    // hard limit allows, as it is under a plain `ulimit -n 64`.
    for (soft, hard, open_files, connections) in [(64, 256, 256, 128), (64, 64, 64, 32)] {
        survives_a_connection_flood(soft, hard, open_files, connections).await;
    }
}

async fn survives_a_connection_flood(soft: u32, hard: u32, open_files: u64, connections: usize) {
    let server = LimitedServer::start(soft, hard);
    let s = lockd_tests::poll(ELECTION, "the server leads", || async {
        server.status().await.filter(|s| s.role == "leader")
    })
    .await;
    assert_eq!(
        (s.max_open_files, s.max_connections),
        (open_files, connections as u64),
        "soft limit raised to the hard one, connections below it"
    );
    const FLOOD: usize = 400;
    let mut flood = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    // Connections beyond the limit are closed at once: at least FLOOD - limit see EOF.
    let closed = lockd_tests::poll(ELECTION, "connections over the limit closed", || async {
        let mut closed = 0;
        for tcp in &flood {
            let mut buf = [0u8; 256];
            match tcp.try_read(&mut buf) {
                Ok(0) => closed += 1,
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => closed += 1,
                _ => {}
            }
        }
        (closed >= FLOOD - connections).then_some(closed)
    })
    .await;
    println!("ulimit {soft}/{hard}: {closed} of {FLOOD} flood connections closed by the server");
    drop(flood);
    // Accepting again: status and a node's login.
    let after = lockd_tests::poll(ELECTION, "served again after the flood", || async {
        server.status().await
    })
    .await;
    assert_eq!(after.role, "leader");
    let mut rpc = LockServiceClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    rpc.login(LoginRequest {
        node: "node1".into(),
        cluster_id: 1,
        nonce: 1,
    })
    .await
    .expect("a node logs in after the flood");
    let log = server.log();
    assert!(
        log.contains("connection limit reached"),
        "the refusals are logged:\n{log}"
    );
}

/// Connections that never start HTTP/2 do not keep the connection slots: each must
/// send its first bytes within 10 s, so a server whose every slot is taken by silent
/// connections serves clients again once they time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_give_their_slots_back() {
    // 64 descriptors, not raisable: 32 connection slots.
    let server = LimitedServer::start(64, 64);
    let s = lockd_tests::poll(ELECTION, "the server leads", || async {
        server.status().await.filter(|s| s.role == "leader")
    })
    .await;
    assert_eq!(s.max_connections, 32);
    let mut silent = Vec::new();
    for _ in 0..40 {
        silent.push(tokio::net::TcpStream::connect(&server.addr).await.unwrap());
    }
    let served = lockd_tests::poll(Duration::from_secs(30), "served again", || async {
        server.status().await
    })
    .await;
    assert_eq!(served.role, "leader");
    // Every silent connection was closed: 8 at once (over the limit), 32 at the timeout.
    for tcp in &silent {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(ELECTION, async {
            loop {
                tcp.readable().await.unwrap();
                match tcp.try_read(&mut buf) {
                    // Closed (EOF or reset).
                    Ok(0) => return,
                    Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
                    // The server's own HTTP/2 settings, or nothing yet.
                    _ => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a silent connection was kept open");
    }
}
