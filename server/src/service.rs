//! The gRPC services nodes and `lockctl` call. Each handler is the same three steps:
//! validate and convert (`api`), hand the command to the Raft driver, convert the
//! outcome back. Nothing here touches the lock table directly.

// `tonic::Status` is the error type of every gRPC handler; boxing it here would
// only add an allocation per refusal at the edge.
#![allow(clippy::result_large_err)]

use crate::api;
use crate::config::Config;
use crate::membership::{self, Change};
use crate::raft_node::{Handle, Member, ProposeError, Query, QueryAnswer};
use crate::state::{Command, LockError, Reply};
use crate::tls::{Access, PeerIdentity, TlsFiles};
use futures::stream::FuturesUnordered;
use lockd_proto::v1 as pb;
use lockd_proto::v1::admin_service_server::AdminService;
use lockd_proto::v1::lock_service_server::LockService;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

pub struct Services {
    /// This value itself, for the tasks that serve a pipeline stream.
    me: Weak<Services>,
    node: Handle,
    config: Arc<Config>,
    my_id: u64,
    /// This server's TLS files (for its own calls to the leader); `None` = plaintext.
    tls: Option<TlsFiles>,
    /// Who may call what, read from the caller's certificate when TLS is on.
    access: Access,
    /// With TLS on: which node each session seen so far belongs to. A session's node
    /// never changes (session ids are Raft indexes, never reused), so entries never go
    /// stale; the map is cleared when it reaches MAX_SESSION_OWNERS.
    session_owners: std::sync::Mutex<HashMap<u64, String>>,
    /// Stops this server's gRPC service (and then the process).
    stop: tokio::sync::watch::Sender<bool>,
    /// The newest Events stream of each session with one open, by its number: a stream
    /// that ends while another is the newest was replaced by it and says so.
    event_streams: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
    /// Numbers Events streams.
    next_event_stream: std::sync::atomic::AtomicU64,
    /// What `lockctl status` shows of this server's resource limits.
    limits: crate::server::Limits,
    /// Set when a stop begins (lockctl shutdown or a signal), before the handover, so
    /// the shutdown guard of every other server counts this one as gone at once.
    stopping: Arc<AtomicBool>,
}

/// Bound of `Services::session_owners`.
const MAX_SESSION_OWNERS: usize = 10_000;

impl Services {
    pub fn new(
        node: Handle,
        config: Arc<Config>,
        my_id: u64,
        tls: Option<TlsFiles>,
        stop: tokio::sync::watch::Sender<bool>,
        limits: crate::server::Limits,
        stopping: Arc<AtomicBool>,
    ) -> Arc<Services> {
        Arc::new_cyclic(|me| Services {
            me: me.clone(),
            node,
            config,
            my_id,
            access: Access::of(tls.as_ref()),
            tls,
            session_owners: std::sync::Mutex::new(HashMap::new()),
            stop,
            event_streams: Arc::default(),
            next_event_stream: std::sync::atomic::AtomicU64::new(1),
            limits,
            stopping,
        })
    }

    /// A server's address: as the replicated membership has it, else the config's.
    fn addr_of(&self, id: u64) -> Option<String> {
        self.node
            .addr_of(id)
            .or_else(|| self.config.server(id).map(|s| s.addr.clone()))
    }

    /// With TLS on, a request acting for `session` must come from the certificate of
    /// the session's node (CN), so a node cannot unlock, cancel or log out another
    /// node's session by its (guessable) id. The owner is looked up once per session
    /// with a linearizable read on the leader, then cached. With TLS off: Ok.
    async fn require_session_owner<T>(
        &self,
        request: &Request<T>,
        session: u64,
    ) -> Result<(), Status> {
        let caller = self.access.identity(request)?;
        self.require_owner(caller.as_ref(), session).await
    }

    /// [`Services::require_session_owner`] for a caller already identified.
    async fn require_owner(
        &self,
        caller: Option<&PeerIdentity>,
        session: u64,
    ) -> Result<(), Status> {
        if !self.access.is_on() || session == 0 {
            // Session 0 is refused by the argument check that follows.
            return Ok(());
        }
        let cached = self
            .session_owners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&session)
            .cloned();
        let owner = match cached {
            Some(owner) => owner,
            None => {
                self.ensure_leader()?;
                let answer = self
                    .node
                    .read(Query::SessionNode { session })
                    .await
                    .map_err(api::propose_error_status)?;
                let owner = match answer {
                    QueryAnswer::SessionNode(Some(owner)) => owner,
                    QueryAnswer::SessionNode(None) => {
                        return Err(api::lock_error_status(LockError::UnknownSession(session)))
                    }
                    other => return Err(unexpected_answer("SessionNode", other)),
                };
                let mut owners = self
                    .session_owners
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                if owners.len() >= MAX_SESSION_OWNERS {
                    owners.clear();
                }
                owners.insert(session, owner.clone());
                owner
            }
        };
        Access::require_session_owner(caller, session, &owner)
    }

    /// The check every admin handler that changes the cluster runs first: with TLS on,
    /// the caller's certificate must carry the admin role (OU=lockd-admin); with TLS
    /// off, everything is allowed. PermissionDenied otherwise, naming the certificate.
    pub fn require_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.access.require_admin(request)
    }

    /// (voters running, quorum needed), this server included. Every other voter is
    /// asked directly, over a new connection: one that refuses it (a stopping server
    /// closes its listener first), does not answer within a second, or answers that it
    /// is stopping, is not running. The leader's view (`quorum_has`) cannot serve
    /// here: it still counts a server that stopped a moment ago as active for up to an
    /// election timeout, which let two quick shutdowns take the quorum away.
    async fn running_voters(&self) -> (u64, u64) {
        let s = self.node.status();
        let others: Vec<u64> = s
            .members
            .iter()
            .filter(|m| m.voter && m.id != self.my_id)
            .map(|m| m.id)
            .collect();
        let voters = others.len() as u64 + 1;
        let probes = others.into_iter().map(|id| self.is_running(id));
        let running = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter(|running| *running)
            .count() as u64;
        (running + 1, voters / 2 + 1)
    }

    /// Whether server `id` answers Status within a second and is not stopping.
    async fn is_running(&self, id: u64) -> bool {
        let Some(addr) = self.addr_of(id) else {
            return false;
        };
        let probe = async {
            let endpoint = crate::tls::endpoint(&addr, self.tls.as_ref())
                .ok()?
                .connect_timeout(std::time::Duration::from_millis(500))
                .timeout(std::time::Duration::from_secs(1));
            let mut client = lockd_proto::v1::admin_service_client::AdminServiceClient::new(
                endpoint.connect().await.ok()?,
            );
            let reply = client.status(pb::StatusRequest {}).await.ok()?.into_inner();
            Some(!reply.stopping)
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    fn event_stream_registry(&self) -> std::sync::MutexGuard<'_, HashMap<u64, u64>> {
        self.event_streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses at once on a follower, so the client goes straight to the leader
    /// instead of waiting on a proposal that would be dropped.
    fn ensure_leader(&self) -> Result<(), Status> {
        self.node
            .leadership()
            .map_err(|leader_id| api::not_leader_status(self.addr_of(leader_id).as_deref()))
    }

    async fn submit(&self, command: Command) -> Result<Reply, Status> {
        self.ensure_leader()?;
        self.node
            .propose(command)
            .await
            .map_err(api::propose_error_status)
    }
}

/// A reply the handler has no answer for: a bug, logged here in full; the caller gets
/// no dump of the server's internals.
fn unexpected(reply: Reply) -> Status {
    tracing::error!(?reply, "unexpected reply from the lock table");
    Status::internal("unexpected reply from the lock table (logged on the server)")
}

/// [`unexpected`] for a query's answer.
fn unexpected_answer(what: &str, answer: QueryAnswer) -> Status {
    tracing::error!(?answer, "unexpected answer to {what}");
    Status::internal(format!(
        "unexpected answer to {what} (logged on the server)"
    ))
}

/// An open Events stream's entry in `Services::event_streams`, removed when the stream
/// goes unless a newer stream of the session has taken its place.
struct EventStreamRegistration {
    registry: Arc<std::sync::Mutex<HashMap<u64, u64>>>,
    session: u64,
    me: u64,
}

impl EventStreamRegistration {
    /// Whether a newer stream of the session replaced this one.
    fn replaced(&self) -> bool {
        let streams = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        streams
            .get(&self.session)
            .is_some_and(|&newest| newest != self.me)
    }
}

impl Drop for EventStreamRegistration {
    fn drop(&mut self) {
        let mut streams = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if streams.get(&self.session) == Some(&self.me) {
            streams.remove(&self.session);
        }
    }
}

/// Events buffered per stream before a slow reader has its stream closed.
const EVENT_STREAM_LEN: usize = 1_024;

type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

/// Calls of one pipeline stream in progress at once; beyond it the server reads no
/// further requests from that stream until one finishes.
pub const PIPELINE_IN_FLIGHT: usize = 1_024;

type PipelineReplies =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::PipelineReply, Status>> + Send>>;

#[tonic::async_trait]
impl LockService for Services {
    type EventsStream = EventStream;

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatReply>, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        let session = request.into_inner().session;
        api::check_session_arg(session)?;
        self.ensure_leader()?;
        match self
            .node
            .heartbeat(session)
            .await
            .map_err(api::propose_error_status)?
        {
            Some(state) => Ok(Response::new(pb::HeartbeatReply {
                state: api::node_state_to_proto(state) as i32,
                expiry_window_ms: self.config.liveness.expiry_window_ms(),
            })),
            None => Err(api::lock_error_status(LockError::UnknownSession(session))),
        }
    }

    async fn recovery_done(
        &self,
        request: Request<pb::RecoveryDoneRequest>,
    ) -> Result<Response<pb::RecoveryDoneReply>, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        let command = api::recovery_done_command(request.into_inner())?;
        match self.submit(command).await? {
            Reply::Ok => Ok(Response::new(pb::RecoveryDoneReply {})),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        let session = request.into_inner().session;
        api::check_session_arg(session)?;
        self.ensure_leader()?;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_STREAM_LEN);
        // Registered as the newest before the driver swaps the streams, so the one it
        // replaces finds this one there when it ends.
        let me = self
            .next_event_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let before = self.event_stream_registry().insert(session, me);
        let subscribed = self
            .node
            .subscribe(session, tx)
            .await
            .map_err(api::propose_error_status);
        let refusal = match subscribed {
            Err(status) => Some(status),
            Ok(None) => Some(api::lock_error_status(LockError::UnknownSession(session))),
            Ok(Some(state)) if !state.may_act() => {
                Some(api::lock_error_status(LockError::SessionNotLive {
                    session,
                    state,
                }))
            }
            Ok(Some(_)) => None,
        };
        if let Some(status) = refusal {
            // Nothing was replaced: the previous stream, if any, is the newest again.
            let mut streams = self.event_stream_registry();
            if streams.get(&session) == Some(&me) {
                match before {
                    Some(previous) => streams.insert(session, previous),
                    None => streams.remove(&session),
                };
            }
            return Err(status);
        }
        let registration = EventStreamRegistration {
            registry: self.event_streams.clone(),
            session,
            me,
        };
        // Polled when the events end; dropped unpolled (with its registration) when the
        // client goes away first.
        let ended = futures::stream::once(async move {
            registration.replaced().then(|| {
                Err(Status::aborted(format!(
                    "replaced: a newer Events stream was opened for session {session}; \
                     this one is closed"
                )))
            })
        })
        .filter_map(|end| end);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
            .filter_map(|e| api::event_to_proto(e).map(Ok))
            .chain(ended);
        Ok(Response::new(Box::pin(stream) as EventStream))
    }

    async fn login(
        &self,
        request: Request<pb::LoginRequest>,
    ) -> Result<Response<pb::LoginReply>, Status> {
        let req = request.get_ref();
        if req.cluster_id != 0 && req.cluster_id != self.config.cluster.id {
            return Err(Status::failed_precondition(format!(
                "this server belongs to cluster {} (id {}), not to cluster id {}",
                self.config.cluster.name, self.config.cluster.id, req.cluster_id
            )));
        }
        let command = api::login_command(req)?;
        self.access.require_node_name(&request, &req.node)?;
        if !self.config.has_node(&req.node) {
            return Err(Status::not_found(format!(
                "unknown node `{}`: it is not in the cluster config",
                req.node
            )));
        }
        match self.submit(command).await? {
            Reply::LoggedIn { session } => Ok(Response::new(pb::LoginReply {
                session,
                heartbeat_interval_ms: self.config.liveness.heartbeat_interval_ms,
                expiry_window_ms: self.config.liveness.expiry_window_ms(),
            })),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutReply>, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        let command = api::logout_command(&request.into_inner())?;
        match self.submit(command).await? {
            Reply::Ok => Ok(Response::new(pb::LogoutReply {})),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn open_lockspace(
        &self,
        request: Request<pb::OpenLockspaceRequest>,
    ) -> Result<Response<pb::OpenLockspaceReply>, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        let command = api::open_lockspace_command(request.into_inner())?;
        match self.submit(command).await? {
            Reply::LockspaceOpened {
                lvb_len_bytes,
                recovery,
            } => Ok(Response::new(pb::OpenLockspaceReply {
                lvb_len_bytes,
                recovery: api::recovery_to_proto(recovery) as i32,
            })),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn lock(&self, request: Request<pb::LockRequest>) -> Result<Response<pb::Grant>, Status> {
        let caller = self.access.identity(&request)?;
        let grant = self
            .lock_call(caller.as_ref(), request.into_inner())
            .await?;
        Ok(Response::new(grant))
    }

    async fn convert(
        &self,
        request: Request<pb::ConvertRequest>,
    ) -> Result<Response<pb::Grant>, Status> {
        let caller = self.access.identity(&request)?;
        let grant = self
            .convert_call(caller.as_ref(), request.into_inner())
            .await?;
        Ok(Response::new(grant))
    }

    async fn unlock(
        &self,
        request: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockReply>, Status> {
        let caller = self.access.identity(&request)?;
        let reply = self
            .unlock_call(caller.as_ref(), request.into_inner())
            .await?;
        Ok(Response::new(reply))
    }

    type PipelineStream = PipelineReplies;

    async fn pipeline(
        &self,
        request: Request<tonic::Streaming<pb::PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let caller = self.access.identity(&request)?;
        let me = self
            .me
            .upgrade()
            .ok_or_else(|| Status::unavailable("this server is stopping"))?;
        let (tx, rx) = tokio::sync::mpsc::channel(PIPELINE_IN_FLIGHT);
        tokio::spawn(me.serve_pipeline(caller, request.into_inner(), tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelReply>, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        let command = api::cancel_command(&request.into_inner())?;
        match self.submit(command).await? {
            Reply::Cancelled { cancelled } => Ok(Response::new(pb::CancelReply { cancelled })),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn check_token(
        &self,
        request: Request<pb::CheckTokenRequest>,
    ) -> Result<Response<pb::CheckTokenReply>, Status> {
        let req = request.into_inner();
        api::check_token_args(&req)?;
        self.ensure_leader()?;
        let query = Query::CheckToken {
            lockspace: req.lockspace,
            resource: req.resource,
            token: req.token,
        };
        match self
            .node
            .read(query)
            .await
            .map_err(api::propose_error_status)?
        {
            QueryAnswer::Token { current, latest } => {
                Ok(Response::new(pb::CheckTokenReply { current, latest }))
            }
            other => Err(unexpected_answer("CheckToken", other)),
        }
    }
}

impl Services {
    /// Lock and Convert: the driver answers once the request is granted or has failed,
    /// however long it waited in the queue.
    async fn grant_reply(&self, command: Command) -> Result<pb::Grant, Status> {
        match self.submit(command).await? {
            Reply::Granted(grant) => Ok(api::grant_to_proto(grant)),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    // Lock, Convert and Unlock, whether they came as a call or on a pipeline stream.

    async fn lock_call(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::LockRequest,
    ) -> Result<pb::Grant, Status> {
        self.require_owner(caller, request.session).await?;
        self.grant_reply(api::lock_command(request)?).await
    }

    async fn convert_call(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::ConvertRequest,
    ) -> Result<pb::Grant, Status> {
        self.require_owner(caller, request.session).await?;
        self.grant_reply(api::convert_command(request)?).await
    }

    async fn unlock_call(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::UnlockRequest,
    ) -> Result<pb::UnlockReply, Status> {
        self.require_owner(caller, request.session).await?;
        match self.submit(api::unlock_command(request)?).await? {
            Reply::Ok => Ok(pb::UnlockReply {}),
            Reply::Failed(e) => Err(api::lock_error_status(e)),
            other => Err(unexpected(other)),
        }
    }

    /// Serves one pipeline stream: reads requests while fewer than
    /// [`PIPELINE_IN_FLIGHT`] are in progress, runs them concurrently, and sends each
    /// reply as it is ready. Ends when the client closes its side and every call has
    /// been answered, or when the client stops listening. A request that does not
    /// decode ends the reading: the calls already read are answered, then the stream
    /// ends with that INVALID_ARGUMENT (naming the field), so nothing sent after the
    /// bad frame is dropped silently.
    async fn serve_pipeline(
        self: Arc<Self>,
        caller: Option<PeerIdentity>,
        mut requests: tonic::Streaming<pb::PipelineRequest>,
        replies: tokio::sync::mpsc::Sender<Result<pb::PipelineReply, Status>>,
    ) {
        let caller = caller.as_ref();
        let mut calls = FuturesUnordered::new();
        let mut reading = true;
        let mut refusal = None;
        while reading || !calls.is_empty() {
            tokio::select! {
                next = requests.message(), if reading && calls.len() < PIPELINE_IN_FLIGHT => {
                    match next {
                        Ok(Some(request)) => calls.push(self.pipelined(caller, request)),
                        // The client is done sending: answer what it asked.
                        Ok(None) => reading = false,
                        // An undecodable frame (RequestCodec's INVALID_ARGUMENT) or one
                        // over the size limit: answer what came before it, then say why
                        // the stream ends.
                        Err(status)
                            if matches!(
                                status.code(),
                                tonic::Code::InvalidArgument | tonic::Code::OutOfRange
                            ) =>
                        {
                            reading = false;
                            refusal = Some(status);
                        }
                        // The client is gone (reset, transport error): answer what it
                        // asked while anyone listens.
                        Err(_) => reading = false,
                    }
                }
                Some(reply) = calls.next() => {
                    if replies.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
                _ = replies.closed() => return,
            }
        }
        if let Some(status) = refusal {
            let _ = replies.send(Err(status)).await;
        }
    }

    async fn pipelined(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::PipelineRequest,
    ) -> pb::PipelineReply {
        use pb::pipeline_reply::Result as Answer;
        use pb::pipeline_request::Call;
        let answer = match request.call {
            Some(Call::Lock(r)) => self.lock_call(caller, r).await.map(Answer::Grant),
            Some(Call::Convert(r)) => self.convert_call(caller, r).await.map(Answer::Grant),
            Some(Call::Unlock(r)) => self.unlock_call(caller, r).await.map(Answer::Unlocked),
            None => Err(Status::invalid_argument(
                "a pipeline request must carry a lock, convert or unlock call",
            )),
        };
        pb::PipelineReply {
            tag: request.tag,
            result: Some(
                answer.unwrap_or_else(|status| Answer::Error(pb::CallError::from_status(&status))),
            ),
        }
    }
}

/// Admin commands answer Ok or the lock table's refusal.
fn admin_reply(reply: Reply) -> Result<(), Status> {
    match reply {
        Reply::Ok => Ok(()),
        Reply::Failed(e) => Err(api::lock_error_status(e)),
        other => Err(unexpected(other)),
    }
}

/// How long a stopping leader waits for another server to take over.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);
/// How long `AddServer` waits, by default, for a learner to catch up.
const CATCH_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn member_to_proto(m: &Member) -> pb::ServerMember {
    pb::ServerMember {
        id: m.id,
        addr: m.addr.clone(),
        voter: m.voter,
    }
}

impl Services {
    /// Waits until learner `id` has every entry the leader had committed when it
    /// started waiting; fails if this server stops leading or time runs out.
    async fn wait_caught_up(
        &self,
        id: u64,
        addr: &str,
        within: std::time::Duration,
    ) -> Result<(), Status> {
        let mut status = self.node.watch_status();
        let target = status.borrow().commit;
        let caught_up = tokio::time::timeout(within, async {
            loop {
                {
                    let s = status.borrow_and_update();
                    if s.role != "leader" {
                        return Err(api::not_leader_status(self.addr_of(s.leader_id).as_deref()));
                    }
                    if s.peers.iter().any(|p| p.id == id && p.matched >= target) {
                        return Ok(());
                    }
                }
                if status.changed().await.is_err() {
                    return Err(Status::unavailable("this server is stopping"));
                }
            }
        })
        .await;
        caught_up.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "server {id} joined as a learner but has not caught up within {} s: is it running (lockd run --id {id} --join) and reachable at {addr}? It stays a learner: `lockctl server add {id} {addr}` again resumes, `lockctl server remove {id}` takes it out",
                within.as_secs()
            )))
        })
    }
}

/// The most resources one `Locks` answer lists.
const MAX_LOCKS_LISTED: usize = 10_000;

#[tonic::async_trait]
impl AdminService for Services {
    async fn locks(
        &self,
        request: Request<pb::LocksRequest>,
    ) -> Result<Response<pb::LocksReply>, Status> {
        let req = request.into_inner();
        api::check_locks_args(&req)?;
        let lockspace = (!req.lockspace.is_empty()).then_some(req.lockspace);
        let resource = (!req.resource.is_empty()).then_some(req.resource);
        if resource.is_some() && lockspace.is_none() {
            return Err(Status::invalid_argument("a resource needs its lockspace"));
        }
        let limit = match req.limit {
            0 => 100,
            n => (n as usize).min(MAX_LOCKS_LISTED),
        };
        let (rows, truncated) = self
            .node
            .locks(lockspace, resource, limit)
            .await
            .map_err(api::propose_error_status)?;
        Ok(Response::new(pb::LocksReply {
            resources: rows.into_iter().map(api::resource_row_to_proto).collect(),
            truncated,
        }))
    }

    async fn set_log_level(
        &self,
        request: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelReply>, Status> {
        self.require_admin(&request)?;
        let filter = request.into_inner().filter;
        api::check_log_filter(&filter)?;
        crate::logging::set_filter(&filter)
            // The filter parsed above; what is left is this server's own trouble.
            .map_err(Status::internal)?;
        Ok(Response::new(pb::SetLogLevelReply {}))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        self.require_admin(&request)?;
        let force = request.into_inner().force;
        // Marked before the count, so two shutdowns asked at once of two servers each
        // see the other as gone and neither takes the quorum away unnoticed.
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Err(Status::failed_precondition(format!(
                "server {} is already stopping",
                self.my_id
            )));
        }
        let (running, needed) = self.running_voters().await;
        if running.saturating_sub(1) < needed && !force {
            self.stopping.store(false, Ordering::SeqCst);
            return Err(Status::failed_precondition(format!(
                "refused: {running} voters are running and a quorum needs {needed}; stopping server {} would leave {}. Use --force to stop it anyway",
                self.my_id,
                running.saturating_sub(1)
            )));
        }
        tracing::warn!(force, "shutdown requested");
        let new_leader_id = self.node.step_down(HANDOVER_WAIT).await;
        self.stop.send_replace(true);
        Ok(Response::new(pb::ShutdownReply { new_leader_id }))
    }

    async fn add_server(
        &self,
        request: Request<pb::AddServerRequest>,
    ) -> Result<Response<pb::AddServerReply>, Status> {
        self.require_admin(&request)?;
        let req = request.into_inner();
        api::check_add_server_args(req.id, &req.addr)?;
        self.ensure_leader()?;
        let within = match req.catch_up_timeout_ms {
            0 => CATCH_UP_WAIT,
            ms => std::time::Duration::from_millis(ms),
        };
        let joining = self
            .node
            .status()
            .members
            .into_iter()
            .find(|m| m.id == req.id && !m.voter);
        match joining {
            Some(m) if m.addr != req.addr => {
                return Err(Status::failed_precondition(format!(
                    "server {} is already joining at {}, not {}; remove it first (lockctl server remove {})",
                    req.id, m.addr, req.addr, req.id
                )))
            }
            // Asked again: resume with the catch-up and the promotion.
            Some(_) => {}
            None => {
                self.node
                    .change_membership(Change::AddLearner {
                        id: req.id,
                        addr: req.addr.clone(),
                    })
                    .await
                    .map_err(api::propose_error_status)?;
                tracing::warn!(id = req.id, addr = %req.addr, "server joining as a learner");
            }
        }
        self.wait_caught_up(req.id, &req.addr, within).await?;
        let members = self
            .node
            .change_membership(Change::Promote { id: req.id })
            .await
            .map_err(api::propose_error_status)?;
        tracing::warn!(id = req.id, "server promoted to voter");
        Ok(Response::new(pb::AddServerReply {
            members: members.iter().map(member_to_proto).collect(),
        }))
    }

    async fn remove_server(
        &self,
        request: Request<pb::RemoveServerRequest>,
    ) -> Result<Response<pb::RemoveServerReply>, Status> {
        self.require_admin(&request)?;
        let id = request.into_inner().id;
        api::check_server_id(id)?;
        self.ensure_leader()?;
        if id == self.my_id {
            // A leader does not remove itself: check the rules first, so leadership
            // does not move for a removal that would be refused, then hand over and
            // send the caller to the new leader.
            let s = self.node.status();
            let voters: Vec<u64> = s.members.iter().filter(|m| m.voter).map(|m| m.id).collect();
            let learners: Vec<u64> = s
                .members
                .iter()
                .filter(|m| !m.voter)
                .map(|m| m.id)
                .collect();
            let running: Vec<u64> = s
                .peers
                .iter()
                .filter(|p| p.recent_active)
                .map(|p| p.id)
                .collect();
            let view = membership::View {
                voters: &voters,
                learners: &learners,
                running_voters: &running,
            };
            membership::check(&view, &Change::Remove { id })
                .map_err(|e| api::propose_error_status(ProposeError::Refused(e)))?;
            let new_leader = self.node.step_down(HANDOVER_WAIT).await;
            return Err(api::not_leader_status(self.addr_of(new_leader).as_deref()));
        }
        let members = self
            .node
            .change_membership(Change::Remove { id })
            .await
            .map_err(api::propose_error_status)?;
        tracing::warn!(id, "server removed from the cluster");
        Ok(Response::new(pb::RemoveServerReply {
            members: members.iter().map(member_to_proto).collect(),
        }))
    }

    async fn force_expire(
        &self,
        request: Request<pb::ForceExpireRequest>,
    ) -> Result<Response<pb::ForceExpireReply>, Status> {
        self.require_admin(&request)?;
        let node = request.into_inner().node;
        api::check_node_arg(&node)?;
        admin_reply(self.submit(Command::ForceExpire { node }).await?)?;
        Ok(Response::new(pb::ForceExpireReply {}))
    }

    async fn fence_ack(
        &self,
        request: Request<pb::FenceAckRequest>,
    ) -> Result<Response<pb::FenceAckReply>, Status> {
        self.require_admin(&request)?;
        let req = request.into_inner();
        api::check_node_arg(&req.node)?;
        let by = if req.by.is_empty() {
            "an operator".to_string()
        } else {
            req.by.chars().take(128).collect()
        };
        let node = req.node.clone();
        admin_reply(
            self.submit(Command::FenceAck {
                node: req.node,
                by: by.clone(),
            })
            .await?,
        )?;
        tracing::warn!(%node, %by, "fence acknowledged by hand");
        Ok(Response::new(pb::FenceAckReply {}))
    }

    async fn save_snapshot(
        &self,
        request: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<pb::SaveSnapshotReply>, Status> {
        self.require_admin(&request)?;
        let answer = self
            .node
            .read(Query::Snapshot)
            .await
            .map_err(api::propose_error_status)?;
        let QueryAnswer::Snapshot {
            head,
            body,
            last_token,
        } = answer
        else {
            return Err(Status::internal("the driver answered another query"));
        };
        let (index, term) = (head.index, head.term);
        let file = crate::recovery::backup_file(&self.config, head, &body)
            .map_err(|e| Status::internal(format!("cannot make a snapshot file: {e}")))?;
        Ok(Response::new(pb::SaveSnapshotReply {
            file,
            index,
            term,
            last_token,
        }))
    }

    async fn fence_history(
        &self,
        _request: Request<pb::FenceHistoryRequest>,
    ) -> Result<Response<pb::FenceHistoryReply>, Status> {
        let records = self
            .node
            .fence_history()
            .await
            .map_err(api::propose_error_status)?;
        Ok(Response::new(pb::FenceHistoryReply {
            entries: records
                .into_iter()
                .map(api::fence_record_to_proto)
                .collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.node.status();
        let nodes = self.node.nodes().await.map_err(api::propose_error_status)?;
        let liveness = &self.config.liveness;
        let addr_of = |id: u64| self.addr_of(id).unwrap_or_default();
        Ok(Response::new(pb::StatusReply {
            id: s.id,
            addr: addr_of(self.my_id),
            role: s.role.to_string(),
            term: s.term,
            leader_id: s.leader_id,
            leader_addr: addr_of(s.leader_id),
            commit_index: s.commit,
            applied_index: s.applied,
            voters: s.voters,
            quorum_needs: s.voters / 2 + 1,
            quorum_has: s.quorum_has,
            sessions: s.sessions,
            held_locks: s.held_locks,
            waiting_requests: s.waiting,
            lockspaces: s.lockspaces,
            last_token: s.last_token,
            peers: s
                .peers
                .iter()
                .map(|p| pb::PeerStatus {
                    id: p.id,
                    addr: addr_of(p.id),
                    matched: p.matched,
                    recent_active: p.recent_active,
                    learner: s.members.iter().any(|m| m.id == p.id && !m.voter),
                })
                .collect(),
            members: s.members.iter().map(member_to_proto).collect(),
            stopping: self.stopping.load(Ordering::SeqCst),
            configured_nodes: self.config.nodes.iter().map(|n| n.name.clone()).collect(),
            fence_devices: crate::monitor::snapshot()
                .into_iter()
                .map(|d| pb::FenceDeviceHealth {
                    node: d.node,
                    level: d.level,
                    agent: d.agent,
                    ok: d.ok,
                    detail: d.detail,
                    checked_at_ms: d.checked_at_ms,
                })
                .collect(),
            cluster_name: self.config.cluster.name.clone(),
            cluster_id: self.config.cluster.id,
            heartbeat_interval_ms: liveness.heartbeat_interval_ms,
            allowed_misses: liveness.allowed_misses,
            expiry_window_ms: liveness.expiry_window_ms(),
            grace_ms: liveness.grace_ms(),
            max_open_files: self.limits.max_open_files,
            max_connections: self.limits.max_connections as u64,
            nodes: nodes
                .into_iter()
                .map(|n| pb::NodeInfo {
                    name: n.name,
                    session: n.session,
                    state: api::node_state_to_proto(n.state) as i32,
                    held_locks: n.held_locks,
                    expired_at_ms: n.expired_at_ms,
                    silent_ms: n.silent_ms.unwrap_or(0),
                    fence_next_level_index: n.fence.as_ref().map_or(0, |f| f.next_level_index),
                    fence_failed_rounds: n.fence.as_ref().map_or(0, |f| f.failed_rounds),
                })
                .collect(),
        }))
    }
}
