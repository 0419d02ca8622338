//! The gRPC services nodes and `lockctl` call. Each handler is the same three steps:
//! its validation step (`check`: identity, arguments, cluster id, leadership), the
//! command to the Raft driver, the outcome converted back (`api`). Nothing here touches the lock table directly.

// `tonic::Status` is the error type of every gRPC handler; boxing it here would
// only add an allocation per refusal at the edge.
#![allow(clippy::result_large_err)]

mod admin;
mod check;

use crate::api;
use crate::config::Config;
use crate::raft_node::{Handle, Query, QueryAnswer};
use crate::state::{Command, LockError, Reply};
use crate::tls::{Access, PeerIdentity, TlsFiles};
use futures::stream::FuturesUnordered;
use lockd_proto::v1 as pb;
use lockd_proto::v1::lock_service_server::LockService;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
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
    /// never changes (session ids are issued in log order, never reused), so entries never go
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
                    .map_err(api::status)?;
                let owner = match answer {
                    QueryAnswer::SessionNode(Some(owner)) => owner,
                    QueryAnswer::SessionNode(None) => {
                        return Err(api::status(LockError::UnknownSession(session)))
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
        self.node.propose(command).await.map_err(api::status)
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
        let session = self.check_heartbeat(request).await?;
        match self.node.heartbeat(session).await.map_err(api::status)? {
            Some(state) => Ok(Response::new(pb::HeartbeatReply {
                state: api::node_state_to_proto(state) as i32,
                expiry_window_ms: self.config.liveness.expiry_window_ms(),
            })),
            None => Err(api::status(LockError::UnknownSession(session))),
        }
    }

    async fn recovery_done(
        &self,
        request: Request<pb::RecoveryDoneRequest>,
    ) -> Result<Response<pb::RecoveryDoneReply>, Status> {
        let command = self.check_recovery_done(request).await?;
        match self.submit(command).await? {
            Reply::Ok => Ok(Response::new(pb::RecoveryDoneReply {})),
            Reply::Failed(e) => Err(api::status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        let session = self.check_events(request).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_STREAM_LEN);
        // Registered as the newest before the driver swaps the streams, so the one it
        // replaces finds this one there when it ends.
        let me = self
            .next_event_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let before = self.event_stream_registry().insert(session, me);
        let subscribed = self.node.subscribe(session, tx).await.map_err(api::status);
        let refusal = match subscribed {
            Err(status) => Some(status),
            Ok(None) => Some(api::status(LockError::UnknownSession(session))),
            Ok(Some(state)) if !state.may_act() => {
                Some(api::status(LockError::SessionNotLive { session, state }))
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
        let check::CheckedLogin { command, node } = self.check_login(&request)?;
        match self.submit(command).await? {
            Reply::LoggedIn { session } => Ok(Response::new(pb::LoginReply {
                session,
                heartbeat_interval_ms: self.config.liveness.heartbeat_interval_ms,
                expiry_window_ms: self.config.liveness.expiry_window_ms(),
            })),
            Reply::Failed(e) => Err(api::status(e)),
            // Unfencing hook (issue 15): held for `unfence::LOGIN_HOLD` and not
            // unfenced yet; the client asks again (see UNFENCING_METADATA_KEY).
            Reply::Unfencing { session } => {
                let mut status = Status::unavailable(format!(
                    "node `{}` is being unfenced (session {session}); the login is \
                     answered when that ends",
                    node
                ));
                status.metadata_mut().insert(
                    lockd_proto::UNFENCING_METADATA_KEY,
                    tonic::metadata::MetadataValue::from(session),
                );
                Err(status)
            }
            other => Err(unexpected(other)),
        }
    }

    async fn logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Response<pb::LogoutReply>, Status> {
        let command = self.check_logout(request).await?;
        match self.submit(command).await? {
            Reply::Ok => Ok(Response::new(pb::LogoutReply {})),
            Reply::Failed(e) => Err(api::status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn open_lockspace(
        &self,
        request: Request<pb::OpenLockspaceRequest>,
    ) -> Result<Response<pb::OpenLockspaceReply>, Status> {
        let command = self.check_open_lockspace(request).await?;
        match self.submit(command).await? {
            Reply::LockspaceOpened {
                lvb_len_bytes,
                recovery,
            } => Ok(Response::new(pb::OpenLockspaceReply {
                lvb_len_bytes,
                recovery: api::recovery_to_proto(recovery) as i32,
            })),
            Reply::Failed(e) => Err(api::status(e)),
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
        let command = self.check_cancel(request).await?;
        match self.submit(command).await? {
            Reply::Cancelled { cancelled } => Ok(Response::new(pb::CancelReply { cancelled })),
            Reply::Failed(e) => Err(api::status(e)),
            other => Err(unexpected(other)),
        }
    }

    async fn check_token(
        &self,
        request: Request<pb::CheckTokenRequest>,
    ) -> Result<Response<pb::CheckTokenReply>, Status> {
        let query = self.check_check_token(request)?;
        match self.node.read(query).await.map_err(api::status)? {
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
            Reply::Failed(e) => Err(api::status(e)),
            other => Err(unexpected(other)),
        }
    }

    // Lock, Convert and Unlock, whether they came as a call or on a pipeline stream.

    async fn lock_call(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::LockRequest,
    ) -> Result<pb::Grant, Status> {
        let command = self.check_lock(caller, request).await?;
        self.grant_reply(command).await
    }

    async fn convert_call(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::ConvertRequest,
    ) -> Result<pb::Grant, Status> {
        let command = self.check_convert(caller, request).await?;
        self.grant_reply(command).await
    }

    async fn unlock_call(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::UnlockRequest,
    ) -> Result<pb::UnlockReply, Status> {
        let command = self.check_unlock(caller, request).await?;
        match self.submit(command).await? {
            Reply::Ok => Ok(pb::UnlockReply {}),
            Reply::Failed(e) => Err(api::status(e)),
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
