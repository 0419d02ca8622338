//! Lockspace handles and lock requests in flight.
//!
//! Every lock request runs in its own task, so it keeps going (and is cleaned up) no
//! matter what the caller does with its [`PendingLock`]: awaiting it yields the
//! [`LockGuard`]; dropping it before the answer cancels the request on the server, and a
//! grant that arrives anyway is released at once instead of leaking.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;

use crate::client::{Client, Session};
use crate::error::{Error, Result};
use crate::guard::LockGuard;
use crate::mode::Mode;
use crate::options::{LockOptions, RecoveryMode};
use crate::request_ids::Ticket;
use crate::resource::Resource;

/// How often an abandoned request is cancelled again while its outcome is unknown (the
/// first cancel may overtake the request itself, or be lost in a failover).
const ABANDON_CANCEL_INTERVAL: Duration = Duration::from_secs(1);

/// An opened lockspace. Cheap to clone.
#[derive(Clone)]
pub struct Lockspace {
    inner: Arc<LockspaceInner>,
}

struct LockspaceInner {
    client: Client,
    name: String,
    lvb_len_bytes: u32,
    recovery: RecoveryMode,
}

impl std::fmt::Debug for Lockspace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lockspace")
            .field("name", &self.inner.name)
            .field("lvb_len_bytes", &self.inner.lvb_len_bytes)
            .field("recovery", &self.inner.recovery)
            .finish()
    }
}

impl Lockspace {
    pub(crate) fn new(
        client: Client,
        name: String,
        lvb_len_bytes: u32,
        recovery: RecoveryMode,
    ) -> Lockspace {
        Lockspace {
            inner: Arc::new(LockspaceInner {
                client,
                name,
                lvb_len_bytes,
                recovery,
            }),
        }
    }

    /// The lockspace's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The LVB length in force for this lockspace.
    pub fn lvb_len_bytes(&self) -> u32 {
        self.inner.lvb_len_bytes
    }

    /// The recovery mode in force for this lockspace.
    pub fn recovery(&self) -> RecoveryMode {
        self.inner.recovery
    }

    /// The session this lockspace was opened with.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Takes a lock and waits until it is granted or fails.
    ///
    /// Failures: [`Error::WouldBlock`] (with `try_lock` / `try_1cb`), [`Error::Timeout`]
    /// (the server's queue timeout fired), [`Error::Cancelled`], [`Error::NoQuorum`]
    /// (see below), [`Error::FailedPrecondition`] / [`Error::NotFound`] (the session was
    /// expired meanwhile), and the input errors.
    ///
    /// During a loss of quorum (including a restart of the whole cluster): without
    /// `opts.timeout` the request waits, retried with its request id, until the cluster
    /// is back and the request is granted or fails; it never gives up on its own. With
    /// a timeout it fails with [`Error::NoQuorum`] at the timeout if no leader has
    /// answered by then (an attempt in flight on a leader gets up to 500 ms more, for
    /// the server's own timeout answer); the request is then cancelled in the
    /// background and a grant that comes anyway is released. A `try_lock` / `try_1cb`
    /// request without a timeout, which asked not to wait, fails with
    /// [`Error::NoQuorum`] after `ClientConfig::no_quorum_timeout` the same way. Either
    /// way the session's heartbeats go on meanwhile.
    ///
    /// Dropping the future (or the [`PendingLock`] of [`Lockspace::request`]) cancels
    /// the request.
    pub async fn lock(
        &self,
        resource: impl Into<Resource>,
        mode: Mode,
        opts: LockOptions,
    ) -> Result<LockGuard> {
        self.request(resource, mode, opts).await
    }

    /// Sends a lock request at once and returns a handle on it, which can be awaited for
    /// the grant and used to cancel the request while it waits (see [`PendingLock`]).
    /// Awaiting it behaves as [`Lockspace::lock`], also during a loss of quorum.
    ///
    /// # Panics
    /// Outside a tokio runtime (the request runs in its own task).
    pub fn request(
        &self,
        resource: impl Into<Resource>,
        mode: Mode,
        opts: LockOptions,
    ) -> PendingLock {
        let ticket = self.inner.client.inner.begin();
        let request_id = ticket.id();
        let (reply_tx, reply_rx) = oneshot::channel();
        tokio::spawn(drive_lock(
            self.clone(),
            ticket,
            resource.into(),
            mode,
            opts,
            reply_tx,
        ));
        PendingLock {
            reply: reply_rx,
            cancel: CancelHandle {
                client: self.inner.client.clone(),
                target: request_id,
            },
        }
    }
}

/// Runs one lock request to its end: hands the grant to the [`PendingLock`], or, if that
/// was dropped, cancels the request and releases a grant that comes anyway. A request
/// that fails at its deadline for want of a leader may still sit in a queue (or be
/// applied once a leader is back): it is handled like an abandoned one.
async fn drive_lock(
    lockspace: Lockspace,
    ticket: Ticket,
    resource: Resource,
    mode: Mode,
    opts: LockOptions,
    mut reply: oneshot::Sender<Result<LockGuard>>,
) {
    let session = Arc::clone(&lockspace.inner.client.inner);
    let deadline = session.blocking_deadline(&opts);
    let first = {
        let call = session.lock(&ticket, lockspace.name(), &resource, mode, opts, deadline);
        tokio::pin!(call);
        tokio::select! {
            outcome = &mut call => Some(outcome),
            () = reply.closed() => None,
        }
    };
    let mut reply_to = None;
    let outcome = match first {
        Some(Err(err)) if err.is_no_quorum() && deadline.is_some() => {
            // Given up at the queue timeout without an answer: tell the caller now, and
            // find out in the background what became of the request.
            tracing::debug!(request_id = ticket.id(), %err, "lock request gave up at its deadline; cancelling it");
            let _ = reply.send(Err(err));
            reply_to = None;
            abandon(&session, &ticket, &lockspace, &resource, mode, opts).await
        }
        Some(outcome) => {
            reply_to = Some(reply);
            outcome
        }
        None => {
            tracing::debug!(
                request_id = ticket.id(),
                "lock request abandoned; cancelling it"
            );
            abandon(&session, &ticket, &lockspace, &resource, mode, opts).await
        }
    };
    // The reply is in hand: the id may now be acknowledged.
    drop(ticket);
    let guard = outcome.and_then(|grant| LockGuard::from_grant(lockspace, resource, mode, grant));
    let unwanted = match reply_to {
        Some(reply) => match reply.send(guard) {
            Err(Ok(guard)) => Some(guard),
            _ => None,
        },
        None => guard.ok(),
    };
    if let Some(guard) = unwanted {
        if session.is_logged_out() {
            return; // the logout released it; the guard's Drop knows
        }
        tracing::debug!(
            lock_id = guard.lock_id(),
            "lock granted after its request was abandoned; releasing it"
        );
        if let Err(err) = guard.unlock().await {
            tracing::warn!(%err, "could not release a lock nobody waits for; it stays held until logout");
        }
    }
}

/// Keeps sending the request (same id, so the server answers with its outcome) and
/// cancels it every [`ABANDON_CANCEL_INTERVAL`], until it has an outcome, or until the
/// session is logged out (which released everything).
async fn abandon(
    session: &Arc<Session>,
    ticket: &Ticket,
    lockspace: &Lockspace,
    resource: &Resource,
    mode: Mode,
    opts: LockOptions,
) -> Result<lockd_proto::v1::Grant> {
    let call = session.lock(ticket, lockspace.name(), resource, mode, opts, None);
    tokio::pin!(call);
    loop {
        tokio::select! {
            outcome = &mut call => return outcome,
            () = async {
                if let Err(err) = session.cancel(ticket.id()).await {
                    tracing::debug!(%err, "cancel of an abandoned lock request failed");
                }
                tokio::time::sleep(ABANDON_CANCEL_INTERVAL).await;
            } => {}
        }
        if session.is_logged_out() {
            return Err(Error::Cancelled(
                "the session logged out while the request was abandoned".into(),
            ));
        }
    }
}

/// A lock request on its way: await it for the [`LockGuard`].
///
/// The request was sent when [`Lockspace::request`] returned; it does not need to be
/// polled to make progress. Dropping the handle before the answer cancels the request
/// (best effort, in the background) and releases the lock if it is granted anyway.
#[must_use = "dropping a PendingLock cancels the request"]
pub struct PendingLock {
    reply: oneshot::Receiver<Result<LockGuard>>,
    cancel: CancelHandle,
}

impl PendingLock {
    /// The request id the server knows this request by (the `Cancel` target).
    pub fn request_id(&self) -> u64 {
        self.cancel.target
    }

    /// A handle that can cancel this request from another task.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }

    /// Cancels the request if it is waiting in the server's queue; awaiting the
    /// `PendingLock` then yields [`Error::Cancelled`]. See [`CancelHandle::cancel`], also
    /// for a loss of quorum.
    pub async fn cancel(&self) -> Result<bool> {
        self.cancel.cancel().await
    }
}

impl Future for PendingLock {
    type Output = Result<LockGuard>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<LockGuard>> {
        Pin::new(&mut self.reply)
            .poll(cx)
            .map(|reply| reply.unwrap_or(Err(Error::Abandoned)))
    }
}

/// Cancels one waiting lock request; cheap to clone and `Send`.
#[derive(Clone)]
pub struct CancelHandle {
    client: Client,
    target: u64,
}

impl CancelHandle {
    /// The request id this handle cancels.
    pub fn request_id(&self) -> u64 {
        self.target
    }

    /// Sends `Cancel` for the request. `Ok(true)`: it was waiting and now fails with
    /// [`Error::Cancelled`]. `Ok(false)`: it was not waiting — already granted or failed,
    /// or not yet arrived at the server (then it queues normally; cancel again later).
    ///
    /// During a loss of quorum: retried until a leader answers, then fails with
    /// [`Error::NoQuorum`] after `ClientConfig::no_quorum_timeout`; the request keeps
    /// waiting. Dropping the [`PendingLock`] instead cancels it as soon as a leader is back.
    pub async fn cancel(&self) -> Result<bool> {
        self.client.inner.cancel(self.target).await
    }
}
