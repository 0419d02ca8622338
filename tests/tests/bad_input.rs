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

/// Keeps a raw session alive (the fixture's sessions have no library keeper).
fn heartbeat(mut rpc: LockServiceClient<Channel>, session: u64) -> tokio::task::JoinHandle<()> {
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
    let _beat1 = heartbeat(f.rpc.clone(), f.session);
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
    let _beat2 = heartbeat(f.rpc.clone(), s2);
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
                if len == 16 {
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
    let _beat1 = heartbeat(f.rpc.clone(), f.session);
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
