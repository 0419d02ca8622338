//! A logged-in session ([`Client`]) and the session-less [`TokenChecker`].
//!
//! This module owns the session's request ids and turns each `LockService` RPC into one
//! call of the transport's retry loop; lock handles live in [`crate::lockspace`] and
//! [`crate::guard`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lockd_proto::v1;
use tokio::sync::{broadcast, watch};

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::keeper::{Event, Keeper, SessionHealth};
use crate::lockspace::Lockspace;
use crate::mode::Mode;
use crate::options::{LockOptions, LockspaceOptions, RecoveryMode};
use crate::request_ids::{RequestIds, Ticket};
use crate::resource::Resource;
use crate::transport::{CallKind, Failed, Transport};

/// The answer of [`Client::check_token`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCheck {
    /// True while a lock granted with this token is still held on the resource.
    pub current: bool,
    /// The highest token ever granted on the resource (0 if none).
    pub latest: u64,
}

/// A handle on one logged-in session. Cheap to clone; all clones share the session, its
/// connections and its request-id counter, and may be used from many tasks at once.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Session>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("node", &self.inner.node)
            .field("session", &self.inner.session)
            .finish_non_exhaustive()
    }
}

/// What every clone of a [`Client`] shares.
pub(crate) struct Session {
    /// Shared with the background logout that runs if the session is dropped.
    transport: Arc<Transport>,
    node: String,
    session: u64,
    ids: Arc<RequestIds>,
    /// Set by [`Client::logout`], so dropping the session does not log out twice.
    logged_out: AtomicBool,
    /// Heartbeats, health and events; stops with the session.
    keeper: Keeper,
}

impl Client {
    /// Logs in as `cfg.node` and returns the session.
    ///
    /// The login carries a random nonce that is reused on retries, so a login whose
    /// answer was lost in a failover is not refused as "already logged in".
    /// Must be called inside a tokio runtime.
    ///
    /// During a loss of quorum: retried until a leader with quorum answers; fails with
    /// [`Error::NoQuorum`] after `cfg.no_quorum_timeout`, or never with
    /// `cfg.wait_for_login`. Other errors: [`Error::Config`], [`Error::NotFound`] /
    /// [`Error::InvalidArgument`] (node not in the cluster config, cluster id
    /// mismatch), [`Error::AlreadyExists`] (the node has a live session),
    /// [`Error::FailedPrecondition`] (the node is expired and not yet fenced; or its
    /// storage unfencing failed, or another login of it is being unfenced),
    /// [`Error::PermissionDenied`] (TLS identity).
    ///
    /// A node whose config has unfence devices (`unfence = true`) is logged in only
    /// once the leader has run them with `action=on`: the call waits for that as long
    /// as the leader says it is unfencing (the wait does not count as a loss of quorum).
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        let servers = cfg.validated_servers()?;
        if cfg.node.is_empty() {
            return Err(Error::Config("the node name is empty".into()));
        }
        let transport = Arc::new(Transport::new(&servers, &cfg)?);
        let request = v1::LoginRequest {
            node: cfg.node.clone(),
            cluster_id: cfg.cluster_id,
            nonce: rand::random::<u64>().max(1),
        };
        let login_sent = Instant::now();
        let kind = if cfg.wait_for_login {
            CallKind::Patient { deadline: None }
        } else {
            CallKind::Short
        };
        let reply = transport
            .call("login", kind, |mut c| {
                let request = request.clone();
                async move { c.login(request).await }
            })
            .await?;
        if reply.session == 0 {
            return Err(Error::Protocol("login answered with session 0".into()));
        }
        tracing::debug!(node = %cfg.node, session = reply.session, "logged in");
        let keeper = Keeper::start(
            Arc::clone(&transport),
            reply.session,
            Duration::from_millis(reply.heartbeat_interval_ms),
            Duration::from_millis(reply.expiry_window_ms),
            login_sent,
        );
        Ok(Client {
            inner: Arc::new(Session {
                transport,
                node: cfg.node,
                session: reply.session,
                ids: RequestIds::new(),
                logged_out: AtomicBool::new(false),
                keeper,
            }),
        })
    }

    /// The session's health: `Healthy`, `Jeopardy`, `Lost` or `Expired`. Watch it and
    /// stop using the locks on `Lost`; see [`SessionHealth`] for the timing rule that
    /// guarantees `Lost` comes before any server could give the locks away.
    ///
    /// During a loss of quorum it goes `Jeopardy` after half the expiry window and
    /// `Lost` before the window ends; the heartbeats go on, and once a leader answers
    /// one it is `Healthy` again (the servers kept the session, e.g. a cold start
    /// within the grace) or `Expired` (final).
    pub fn health(&self) -> watch::Receiver<SessionHealth> {
        self.inner.keeper.health.clone()
    }

    /// Subscribes to the session's events: blocking callbacks for locks it holds,
    /// finished queued requests, notices about the session. Events arriving before
    /// the call are not replayed; a subscriber that falls more than 1,024 events behind
    /// loses the oldest.
    ///
    /// During a loss of quorum the stream is silent; it is reopened on the new leader
    /// when the cluster is back. Events the servers sent while it was broken may be
    /// missed: re-read what matters (e.g. with the lock table) after a `Lost`.
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.inner.keeper.events.subscribe()
    }

    /// The session id the server assigned at login.
    pub fn session(&self) -> u64 {
        self.inner.session
    }

    /// The node name this session logged in as.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// Opens a lockspace, creating it with `opts` if it does not exist yet. If it exists,
    /// its own options stay in force; the returned handle reports them.
    ///
    /// During a loss of quorum: retried until a leader with quorum answers, then fails
    /// with [`Error::NoQuorum`] after `ClientConfig::no_quorum_timeout` (3 s by default).
    /// Calling it again is safe: opening an open lockspace changes nothing.
    pub async fn open_lockspace(&self, name: &str, opts: LockspaceOptions) -> Result<Lockspace> {
        let ticket = self.inner.ids.begin();
        let request = v1::OpenLockspaceRequest {
            session: self.inner.session,
            request_id: ticket.id(),
            lockspace: name.to_string(),
            lvb_len_bytes: opts.lvb_len_bytes.unwrap_or(0),
            recovery: opts.recovery.to_proto() as i32,
        };
        let reply = self
            .inner
            .transport
            .call("open_lockspace", CallKind::Short, |mut c| {
                let request = request.clone();
                async move { c.open_lockspace(request).await }
            })
            .await?;
        drop(ticket);
        let recovery = RecoveryMode::from_proto(reply.recovery).ok_or_else(|| {
            Error::Protocol(format!("unknown recovery mode {} in reply", reply.recovery))
        })?;
        Ok(Lockspace::new(
            self.clone(),
            name.to_string(),
            reply.lvb_len_bytes,
            recovery,
        ))
    }

    /// Tells the servers this node has replayed the journal of fenced node `node` in
    /// `lockspace` (after an [`Event::NeedRecovery`]): `node`'s expired holders there
    /// are released. Take the locks needed for the replay with `noexp` first.
    ///
    /// During a loss of quorum: retried, then [`Error::NoQuorum`] after
    /// `ClientConfig::no_quorum_timeout`; whether it was applied is then unknown, and
    /// calling it again is safe.
    pub async fn recovery_done(&self, lockspace: &str, node: &str) -> Result<()> {
        let ticket = self.inner.ids.begin();
        let request = v1::RecoveryDoneRequest {
            session: self.inner.session,
            request_id: ticket.id(),
            lockspace: lockspace.to_string(),
            node: node.to_string(),
        };
        self.inner
            .transport
            .call("recovery_done", CallKind::Short, |mut c| {
                let request = request.clone();
                async move { c.recovery_done(request).await }
            })
            .await?;
        Ok(())
    }

    /// Asks whether `token` is still the token of a held lock on the resource — what a
    /// protected resource (a disk, a service) checks before accepting a write from a
    /// lock holder. Needs no session of its own; see also [`TokenChecker`].
    ///
    /// During a loss of quorum: retried, then [`Error::NoQuorum`] after
    /// `ClientConfig::no_quorum_timeout`; a protected resource must then refuse the
    /// write (it cannot know the token is current).
    pub async fn check_token(
        &self,
        lockspace: &str,
        resource: &[u8],
        token: u64,
    ) -> Result<TokenCheck> {
        check_token(&self.inner.transport, lockspace, resource, token).await
    }

    /// Logs out: the server releases every lock of the session at once, and the node is
    /// never fenced for it. Other clones of this handle stop working.
    ///
    /// If an earlier attempt was applied but its answer lost, the retry finds the session
    /// gone ("unknown session"); that counts as success.
    ///
    /// Dropping the last handle of a session (and the last lock guard and lock request
    /// of it) without calling this logs out in the background, best effort.
    ///
    /// During a loss of quorum: retried, then [`Error::NoQuorum`] after
    /// `ClientConfig::no_quorum_timeout`. The session then stays until the servers
    /// expire it (its heartbeats stop with this call), and the node is fenced: tell
    /// the operator.
    pub async fn logout(self) -> Result<()> {
        let session = &self.inner;
        session.logged_out.store(true, Ordering::Relaxed);
        logout(&session.transport, session.session, session.ids.begin()).await
    }
}

/// Sends `Logout` with `ticket`'s request id until answered.
async fn logout(transport: &Transport, session: u64, ticket: Ticket) -> Result<()> {
    let request = v1::LogoutRequest {
        session,
        request_id: ticket.id(),
    };
    let outcome = transport
        .call("logout", CallKind::Short, |mut c| {
            // The request is `Copy`: each attempt gets its own copy.
            async move { c.logout(request).await }
        })
        .await;
    drop(ticket);
    match outcome {
        Ok(_) => Ok(()),
        Err(Failed {
            error: Error::NotFound(msg),
            attempts,
            ..
        }) if attempts > 1 => {
            tracing::debug!(%msg, "logout retry found the session gone: already logged out");
            Ok(())
        }
        Err(failed) => Err(failed.error),
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.logged_out.load(Ordering::Relaxed) {
            return;
        }
        let (session, node) = (self.session, self.node.clone());
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(session, %node, "client dropped outside a tokio runtime without logout; the session stays until it expires");
            return;
        };
        let transport = Arc::clone(&self.transport);
        let ticket = self.ids.begin();
        tracing::debug!(session, %node, "client dropped without logout; logging out in the background");
        runtime.spawn(async move {
            if let Err(err) = logout(&transport, session, ticket).await {
                tracing::warn!(session, %node, %err, "background logout of a dropped client failed");
            }
        });
    }
}

/// The RPCs lock handles use. Each takes or reuses a [`Ticket`]; none holds a lock
/// across an await.
impl Session {
    pub(crate) fn begin(&self) -> Ticket {
        self.ids.begin()
    }

    /// True once [`Client::logout`] was called: the server released every lock, so
    /// background unlocks are pointless.
    pub(crate) fn is_logged_out(&self) -> bool {
        self.logged_out.load(Ordering::Relaxed)
    }

    /// The deadline of a `Lock` / `Convert` call sent now: its queue timeout (the call
    /// fails then even if no leader could be reached); for a `try` request without one,
    /// `no_quorum_timeout` (it asked not to wait); none otherwise.
    pub(crate) fn blocking_deadline(&self, opts: &LockOptions) -> Option<Instant> {
        let tries = opts.flags.try_lock || opts.flags.try_1cb;
        match opts.timeout {
            Some(t) => Some(Instant::now() + t),
            None if tries => Some(Instant::now() + self.transport.no_quorum_timeout()),
            None => None,
        }
    }

    /// Sends `Lock` until it is granted or fails for good, or until `deadline` (see
    /// [`CallKind::Blocking`]). `ticket` must stay alive until this returns.
    pub(crate) async fn lock(
        &self,
        ticket: &Ticket,
        lockspace: &str,
        resource: &Resource,
        mode: Mode,
        opts: LockOptions,
        deadline: Option<Instant>,
    ) -> Result<v1::Grant> {
        let mut request = v1::LockRequest {
            session: self.session,
            request_id: ticket.id(),
            ack_below: 0,
            lockspace: lockspace.to_string(),
            resource: resource.as_bytes().to_vec(),
            mode: mode.to_proto() as i32,
            flags: Some(opts.flags.to_proto()),
            timeout_ms: opts.timeout_ms(),
        };
        let grant = self
            .transport
            .call_pipelined("lock", CallKind::Blocking { deadline }, |p| {
                request.ack_below = ticket.ack_below();
                let request = request.clone();
                async move { p.lock(request).await }
            })
            .await?;
        Ok(grant)
    }

    /// Sends `Convert` until it is granted or fails for good.
    pub(crate) async fn convert(
        &self,
        ticket: &Ticket,
        lock_id: u64,
        mode: Mode,
        opts: LockOptions,
        lvb: Vec<u8>,
    ) -> Result<v1::Grant> {
        let mut request = v1::ConvertRequest {
            session: self.session,
            request_id: ticket.id(),
            ack_below: 0,
            lock_id,
            mode: mode.to_proto() as i32,
            flags: Some(opts.flags.to_proto()),
            timeout_ms: opts.timeout_ms(),
            lvb,
        };
        let grant = self
            .transport
            .call_pipelined(
                "convert",
                CallKind::Blocking {
                    deadline: self.blocking_deadline(&opts),
                },
                |p| {
                    request.ack_below = ticket.ack_below();
                    let request = request.clone();
                    async move { p.convert(request).await }
                },
            )
            .await?;
        Ok(grant)
    }

    /// Releases a held lock, optionally storing its LVB.
    pub(crate) async fn unlock(&self, lock_id: u64, lvb: Option<Vec<u8>>) -> Result<()> {
        let ticket = self.begin();
        let mut request = v1::UnlockRequest {
            session: self.session,
            request_id: ticket.id(),
            ack_below: 0,
            lock_id,
            valblk: lvb.is_some(),
            lvb: lvb.unwrap_or_default(),
        };
        self.transport
            .call_pipelined("unlock", CallKind::Short, |p| {
                request.ack_below = ticket.ack_below();
                let request = request.clone();
                async move { p.unlock(request).await }
            })
            .await?;
        Ok(())
    }

    /// Cancels the waiting `Lock` / `Convert` with request id `target`. `Ok(false)` when
    /// it was not waiting (already granted, failed, or not arrived yet).
    pub(crate) async fn cancel(&self, target: u64) -> Result<bool> {
        let ticket = self.begin();
        let mut request = v1::CancelRequest {
            session: self.session,
            request_id: ticket.id(),
            ack_below: 0,
            target_request_id: target,
        };
        let reply = self
            .transport
            .call("cancel", CallKind::Short, |mut c| {
                request.ack_below = ticket.ack_below();
                async move { c.cancel(request).await }
            })
            .await?;
        Ok(reply.cancelled)
    }
}

async fn check_token(
    transport: &Transport,
    lockspace: &str,
    resource: &[u8],
    token: u64,
) -> Result<TokenCheck> {
    let request = v1::CheckTokenRequest {
        lockspace: lockspace.to_string(),
        resource: resource.to_vec(),
        token,
    };
    let reply = transport
        .call("check_token", CallKind::Short, |mut c| {
            let request = request.clone();
            async move { c.check_token(request).await }
        })
        .await?;
    Ok(TokenCheck {
        current: reply.current,
        latest: reply.latest,
    })
}

/// Checks fencing tokens without logging in: for a protected resource that is not a
/// cluster node (a storage target, a service) and only needs to validate the tokens lock
/// holders send it.
pub struct TokenChecker {
    transport: Transport,
}

impl TokenChecker {
    /// Prepares channels to the servers (`cfg.node` is not used). Connects lazily, on
    /// the first check. Must be called inside a tokio runtime.
    pub fn new(cfg: &ClientConfig) -> Result<TokenChecker> {
        let servers = cfg.validated_servers()?;
        Ok(TokenChecker {
            transport: Transport::new(&servers, cfg)?,
        })
    }

    /// See [`Client::check_token`], also for what happens during a loss of quorum.
    pub async fn check_token(
        &self,
        lockspace: &str,
        resource: &[u8],
        token: u64,
    ) -> Result<TokenCheck> {
        check_token(&self.transport, lockspace, resource, token).await
    }
}
