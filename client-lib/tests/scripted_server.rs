//! The client's retry, redirect and request-id rules, checked against scripted in-process
//! `LockService` servers (no Raft, no lock table: each server answers what the test tells
//! it to, and records what it received).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockd_client::{
    Client, ClientConfig, Error, LockOptions, LockspaceOptions, Mode, RecoveryMode, Resource,
};
use lockd_proto::v1::lock_service_server::{LockService, LockServiceServer};
use lockd_proto::v1::*;
use lockd_proto::LEADER_METADATA_KEY;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Request, Response, Status};

/// One received request, as the server saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: &'static str,
    request_id: u64,
    ack_below: u64,
    /// Lock id (Unlock), target request id (Cancel), nonce (Login).
    arg: u64,
}

#[derive(Default)]
struct Script {
    /// Answer everything with UNAVAILABLE, naming this leader (empty = none known).
    follower_of: Option<String>,
    /// Statuses to answer with, in order, before behaving normally; per method.
    failures: Vec<(&'static str, Status)>,
    /// Lock requests on these resources wait until their request id is cancelled.
    waiting_resources: HashSet<Vec<u8>>,
    cancelled: HashSet<u64>,
    /// Cancel "loses the race": it answers `cancelled: false` and lets every waiting lock
    /// be granted.
    cancel_loses: bool,
    seen: Vec<Seen>,
    next_lock_id: u64,
}

#[derive(Clone, Default)]
struct ScriptedServer(Arc<Mutex<Script>>);

impl ScriptedServer {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }

    fn seen(&self, method: &str) -> Vec<Seen> {
        self.script()
            .seen
            .iter()
            .filter(|s| s.method == method)
            .cloned()
            .collect()
    }

    /// Records the request; returns the scripted answer for it, if any.
    #[allow(clippy::result_large_err)] // tonic::Status is what the service must return
    fn receive(&self, seen: Seen) -> Result<(), Status> {
        let mut script = self.script();
        let method = seen.method;
        script.seen.push(seen);
        if let Some(leader) = &script.follower_of {
            let mut md = MetadataMap::new();
            if !leader.is_empty() {
                md.insert(
                    LEADER_METADATA_KEY,
                    MetadataValue::try_from(leader.as_str()).unwrap(),
                );
            }
            return Err(Status::with_metadata(
                Code::Unavailable,
                "not the leader",
                md,
            ));
        }
        if let Some(i) = script.failures.iter().position(|(m, _)| *m == method) {
            return Err(script.failures.remove(i).1);
        }
        Ok(())
    }

    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let service = LockServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }
}

fn seen(method: &'static str, request_id: u64, ack_below: u64, arg: u64) -> Seen {
    Seen {
        method,
        request_id,
        ack_below,
        arg,
    }
}

#[tonic::async_trait]
impl LockService for ScriptedServer {
    type EventsStream = tokio_stream::wrappers::ReceiverStream<Result<Event, Status>>;
    type PipelineStream = tokio_stream::wrappers::ReceiverStream<Result<PipelineReply, Status>>;

    async fn pipeline(
        &self,
        r: Request<tonic::Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        Ok(Response::new(lockd_proto::pipeline_via_unary(
            self.clone(),
            r.into_inner(),
        )))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        Err(Status::unimplemented(
            "this scripted server announces no heartbeats",
        ))
    }
    async fn recovery_done(
        &self,
        _: Request<RecoveryDoneRequest>,
    ) -> Result<Response<RecoveryDoneReply>, Status> {
        Err(Status::unimplemented(
            "this scripted server has no recovery",
        ))
    }
    async fn events(
        &self,
        _: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        Err(Status::unimplemented(
            "this scripted server has no event stream",
        ))
    }

    async fn login(&self, r: Request<LoginRequest>) -> Result<Response<LoginReply>, Status> {
        self.receive(seen("login", 0, 0, r.get_ref().nonce))?;
        // No heartbeat interval: the client starts no keeper, so the script sees
        // only the calls the test makes.
        Ok(Response::new(LoginReply {
            session: 7,
            ..Default::default()
        }))
    }

    async fn logout(&self, r: Request<LogoutRequest>) -> Result<Response<LogoutReply>, Status> {
        self.receive(seen("logout", r.get_ref().request_id, 0, 0))?;
        Ok(Response::new(LogoutReply {}))
    }

    async fn open_lockspace(
        &self,
        r: Request<OpenLockspaceRequest>,
    ) -> Result<Response<OpenLockspaceReply>, Status> {
        let r = r.into_inner();
        self.receive(seen("open_lockspace", r.request_id, 0, 0))?;
        Ok(Response::new(OpenLockspaceReply {
            lvb_len_bytes: 32,
            recovery: lockd_proto::v1::RecoveryMode::Explicit as i32,
        }))
    }

    async fn lock(&self, r: Request<LockRequest>) -> Result<Response<Grant>, Status> {
        let r = r.into_inner();
        self.receive(seen("lock", r.request_id, r.ack_below, 0))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.script().waiting_resources.contains(&r.resource) {
            if self.script().cancelled.contains(&r.request_id) {
                return Err(Status::aborted("cancelled"));
            }
            if Instant::now() > deadline {
                return Err(Status::deadline_exceeded("test server gave up"));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut script = self.script();
        script.next_lock_id += 1;
        Ok(Response::new(Grant {
            lock_id: script.next_lock_id,
            mode: r.mode,
            token: 100 + r.request_id,
            lvb: vec![],
            lvb_invalid: false,
        }))
    }

    async fn convert(&self, r: Request<ConvertRequest>) -> Result<Response<Grant>, Status> {
        let r = r.into_inner();
        self.receive(seen("convert", r.request_id, r.ack_below, r.lock_id))?;
        Ok(Response::new(Grant {
            lock_id: r.lock_id,
            mode: r.mode,
            token: 200 + r.request_id,
            lvb: vec![],
            lvb_invalid: false,
        }))
    }

    async fn unlock(&self, r: Request<UnlockRequest>) -> Result<Response<UnlockReply>, Status> {
        let r = r.into_inner();
        self.receive(seen("unlock", r.request_id, r.ack_below, r.lock_id))?;
        Ok(Response::new(UnlockReply {}))
    }

    async fn cancel(&self, r: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
        let r = r.into_inner();
        self.receive(seen(
            "cancel",
            r.request_id,
            r.ack_below,
            r.target_request_id,
        ))?;
        let mut script = self.script();
        if script.cancel_loses {
            script.waiting_resources.clear();
            return Ok(Response::new(CancelReply { cancelled: false }));
        }
        let cancelled = script.cancelled.insert(r.target_request_id);
        Ok(Response::new(CancelReply { cancelled }))
    }

    async fn check_token(
        &self,
        r: Request<CheckTokenRequest>,
    ) -> Result<Response<CheckTokenReply>, Status> {
        self.receive(seen("check_token", 0, 0, r.get_ref().token))?;
        Ok(Response::new(CheckTokenReply {
            current: true,
            latest: r.get_ref().token,
        }))
    }
}

fn config(servers: &[&str]) -> ClientConfig {
    ClientConfig {
        no_quorum_timeout: Duration::from_millis(800),
        attempt_timeout: Duration::from_millis(300),
        ..ClientConfig::new(servers.iter().copied(), "node1")
    }
}

async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn follower_redirect_is_followed_to_an_unlisted_leader() {
    let leader = ScriptedServer::default();
    let leader_addr = leader.start().await;
    let follower = ScriptedServer::default();
    follower.script().follower_of = Some(leader_addr.clone());
    let follower_addr = follower.start().await;

    let client = Client::connect(config(&[&follower_addr])).await.unwrap();
    assert_eq!(client.session(), 7);
    assert_eq!(follower.seen("login").len(), 1);
    assert_eq!(leader.seen("login").len(), 1);

    // The leader is remembered: the next call goes straight to it.
    client.check_token("ls", b"r", 5).await.unwrap();
    assert!(follower.seen("check_token").is_empty());
    assert_eq!(leader.seen("check_token").len(), 1);
}

/// With `follow_unlisted_redirects` off (a client behind proxies), a redirect to an
/// address it was not given is not followed: the call moves on to the next listed
/// server, and the unlisted leader never sees it.
#[tokio::test]
async fn a_redirect_to_an_unlisted_leader_is_not_followed_when_told_so() {
    let leader = ScriptedServer::default();
    let leader_addr = leader.start().await;
    let follower = ScriptedServer::default();
    follower.script().follower_of = Some(leader_addr.clone());
    let follower_addr = follower.start().await;
    let proxy = ScriptedServer::default(); // stands for a proxy to the leader
    let proxy_addr = proxy.start().await;

    let mut cfg = config(&[&follower_addr, &proxy_addr]);
    cfg.follow_unlisted_redirects = false;
    let client = Client::connect(cfg).await.unwrap();
    assert_eq!(follower.seen("login").len(), 1);
    assert_eq!(proxy.seen("login").len(), 1, "the next listed server");
    assert!(leader.seen("login").is_empty(), "the unlisted leader");
    client.logout().await.unwrap();
    assert!(leader.seen("logout").is_empty());
}

#[tokio::test]
async fn unreachable_and_leaderless_servers_are_skipped() {
    let leader = ScriptedServer::default();
    let leader_addr = leader.start().await;
    let electing = ScriptedServer::default();
    electing.script().follower_of = Some(String::new()); // no leader known
    let electing_addr = electing.start().await;

    let client = Client::connect(config(&["127.0.0.1:1", &electing_addr, &leader_addr]))
        .await
        .unwrap();
    assert_eq!(electing.seen("login").len(), 1);
    assert_eq!(leader.seen("login").len(), 1);
    client.logout().await.unwrap();
}

#[tokio::test]
async fn login_retry_reuses_its_nonce() {
    let leader = ScriptedServer::default();
    leader.script().failures = vec![("login", Status::unavailable("no quorum: not committed"))];
    let addr = leader.start().await;
    Client::connect(config(&[&addr])).await.unwrap();
    let logins = leader.seen("login");
    assert_eq!(logins.len(), 2);
    assert_ne!(logins[0].arg, 0);
    assert_eq!(logins[0].arg, logins[1].arg, "same nonce on the retry");
}

#[tokio::test]
async fn lock_retry_reuses_the_request_id() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    assert_eq!(ls.recovery(), RecoveryMode::Explicit);
    assert_eq!(ls.lvb_len_bytes(), 32);

    leader.script().failures = vec![
        ("lock", Status::unavailable("leader stepped down")),
        ("lock", Status::unavailable("no quorum")),
    ];
    let guard = ls.lock("r", Mode::Ex, LockOptions::new()).await.unwrap();
    let locks = leader.seen("lock");
    assert_eq!(locks.len(), 3);
    assert!(locks.iter().all(|s| s.request_id == locks[0].request_id));
    assert!(locks.iter().all(|s| s.ack_below <= s.request_id));
    assert_eq!(guard.mode(), Mode::Ex);
    assert_eq!(guard.token(), 100 + locks[0].request_id);
    guard.unlock().await.unwrap();
}

#[tokio::test]
async fn request_ids_grow_and_ack_below_follows_the_answers() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let mut guard = ls
        .lock(Resource::gfs(2, 9), Mode::Pr, LockOptions::new())
        .await
        .unwrap();
    guard.convert(Mode::Ex, LockOptions::new()).await.unwrap();
    assert_eq!(guard.mode(), Mode::Ex);
    let lock_id = guard.lock_id();
    guard.unlock().await.unwrap();

    // open_lockspace = 1, lock = 2, convert = 3, unlock = 4; each sent when every
    // earlier id was answered.
    assert_eq!(leader.seen("open_lockspace")[0].request_id, 1);
    assert_eq!(leader.seen("lock"), vec![seen("lock", 2, 2, 0)]);
    assert_eq!(leader.seen("convert"), vec![seen("convert", 3, 3, lock_id)]);
    assert_eq!(leader.seen("unlock"), vec![seen("unlock", 4, 4, lock_id)]);
}

#[tokio::test]
async fn ack_below_holds_at_the_oldest_waiting_request() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    leader.script().waiting_resources.insert(b"a".to_vec());
    let waiting = ls.request("a", Mode::Ex, LockOptions::new());
    let waiting_id = waiting.request_id();
    poll_until("the waiting lock", || leader.seen("lock").len() == 1).await;
    let g = ls.lock("b", Mode::Ex, LockOptions::new()).await.unwrap();
    let second = leader.seen("lock")[1].clone();
    assert!(second.request_id > waiting_id);
    assert_eq!(
        second.ack_below, waiting_id,
        "the waiting request is not acknowledged"
    );
    // The first request is still waiting in the server; release it.
    assert!(waiting.cancel().await.unwrap());
    assert!(matches!(waiting.await, Err(Error::Cancelled(_))));
    g.unlock().await.unwrap();
}

#[tokio::test]
async fn dropping_a_pending_lock_cancels_it() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    leader.script().waiting_resources.insert(b"r".to_vec());
    let pending = ls.request("r", Mode::Ex, LockOptions::new());
    let id = pending.request_id();
    poll_until("the lock to arrive", || leader.seen("lock").len() == 1).await;
    drop(pending);
    poll_until("the cancel", || {
        leader.seen("cancel").iter().any(|c| c.arg == id)
    })
    .await;
}

#[tokio::test]
async fn cancel_handle_works_from_another_task() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    leader.script().waiting_resources.insert(b"r".to_vec());
    let pending = ls.request("r", Mode::Ex, LockOptions::new());
    let handle = pending.cancel_handle();
    let probe = leader.clone();
    tokio::spawn(async move {
        poll_until("the lock to arrive", || probe.seen("lock").len() == 1).await;
        handle.cancel().await.unwrap();
    });
    assert!(matches!(pending.await, Err(Error::Cancelled(m)) if m == "cancelled"));
}

#[tokio::test]
async fn dropped_guard_is_unlocked_in_the_background() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let guard = ls.lock("r", Mode::Ex, LockOptions::new()).await.unwrap();
    let lock_id = guard.lock_id();
    drop(guard);
    poll_until("the background unlock", || {
        leader.seen("unlock").iter().any(|u| u.arg == lock_id)
    })
    .await;
}

#[tokio::test]
async fn logout_retry_that_finds_the_session_gone_succeeds() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    // The first attempt "was applied but its answer lost"; the retry finds no session.
    leader.script().failures = vec![
        ("logout", Status::unavailable("connection lost")),
        ("logout", Status::not_found("unknown session 7")),
    ];
    client.logout().await.unwrap();
    let logouts = leader.seen("logout");
    assert_eq!(logouts.len(), 2);
    assert_eq!(logouts[0].request_id, logouts[1].request_id);
}

#[tokio::test]
async fn logout_of_an_unknown_session_on_the_first_attempt_fails() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    leader.script().failures = vec![("logout", Status::not_found("unknown session 7"))];
    assert_eq!(
        client.logout().await,
        Err(Error::NotFound("unknown session 7".into()))
    );
}

#[tokio::test]
async fn server_errors_are_typed_and_keep_their_message() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    leader.script().failures = vec![
        ("lock", Status::aborted("would block")),
        (
            "lock",
            Status::deadline_exceeded("queue timeout of 50ms passed"),
        ),
        (
            "lock",
            Status::invalid_argument("resource name longer than 64 bytes"),
        ),
    ];
    let try_lock = LockOptions::new().try_lock();
    assert!(matches!(
        ls.lock("r", Mode::Ex, try_lock).await,
        Err(Error::WouldBlock(_))
    ));
    let timed = LockOptions::new().timeout(Duration::from_millis(50));
    assert!(matches!(
        ls.lock("r", Mode::Ex, timed).await,
        Err(Error::Timeout(m)) if m.contains("50ms")
    ));
    assert!(matches!(
        ls.lock("r", Mode::Ex, LockOptions::new()).await,
        Err(Error::InvalidArgument(m)) if m.contains("64 bytes")
    ));
}

#[tokio::test]
async fn leaderless_cluster_fails_short_calls_with_no_quorum() {
    let electing = ScriptedServer::default();
    electing.script().follower_of = Some(String::new());
    let addr = electing.start().await;
    let start = Instant::now();
    let err = Client::connect(config(&[&addr])).await.unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(800));
    assert!(start.elapsed() < Duration::from_secs(3));
    let text = err.to_string();
    assert!(
        text.starts_with("no quorum: no lock server leader answered within 800ms"),
        "{text}"
    );
    assert!(text.contains("not the leader"), "{text}");
}

#[tokio::test]
async fn many_tasks_lock_through_one_client() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64u64)
        .map(|i| {
            let ls = ls.clone();
            tokio::spawn(async move {
                for j in 0..10u64 {
                    let g = ls
                        .lock(Resource::gfs(1, i * 100 + j), Mode::Ex, LockOptions::new())
                        .await?;
                    g.unlock().await?;
                }
                Ok::<(), Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let locks = leader.seen("lock");
    assert_eq!(locks.len(), 640);
    let ids: HashSet<u64> = locks.iter().map(|s| s.request_id).collect();
    assert_eq!(ids.len(), 640, "every lock has its own request id");
    assert!(locks.iter().all(|s| s.ack_below <= s.request_id));
}

#[tokio::test]
async fn a_grant_that_beats_the_cancel_of_a_dropped_request_is_released() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    {
        let mut script = leader.script();
        script.waiting_resources.insert(b"r".to_vec());
        script.cancel_loses = true;
    }
    let pending = ls.request("r", Mode::Ex, LockOptions::new());
    poll_until("the lock to arrive", || leader.seen("lock").len() == 1).await;
    drop(pending);
    poll_until("the unlock of the unwanted grant", || {
        leader.seen("unlock").len() == 1
    })
    .await;
}

#[tokio::test]
async fn dropping_the_last_handle_logs_out() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    drop(client);
    // The lockspace still holds the session.
    let guard = ls.lock("r", Mode::Ex, LockOptions::new()).await.unwrap();
    drop(ls);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        leader.seen("logout").is_empty(),
        "a guard still uses the session"
    );
    drop(guard);
    poll_until("the background logout", || leader.seen("logout").len() == 1).await;
    assert_eq!(
        leader.seen("unlock").len(),
        1,
        "the guard was unlocked first"
    );
}

#[tokio::test]
async fn guards_dropped_after_logout_send_nothing() {
    let leader = ScriptedServer::default();
    let addr = leader.start().await;
    let client = Client::connect(config(&[&addr])).await.unwrap();
    let ls = client
        .open_lockspace("fs", LockspaceOptions::default())
        .await
        .unwrap();
    let guard = ls.lock("r", Mode::Ex, LockOptions::new()).await.unwrap();
    client.logout().await.unwrap();
    drop(guard);
    drop(ls);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(leader.seen("unlock").is_empty());
    assert_eq!(leader.seen("logout").len(), 1, "no second logout");
}
