//! A held lock: its grant (id, mode, fencing token, LVB) and the operations on it.
//! Dropping a guard that was not unlocked releases the lock in the background.

use std::sync::Arc;

use lockd_proto::v1;

use crate::client::Session;
use crate::error::{Error, Result};
use crate::lockspace::Lockspace;
use crate::mode::Mode;
use crate::options::LockOptions;
use crate::request_ids::Ticket;
use crate::resource::Resource;

/// A granted lock.
///
/// Release it with [`LockGuard::unlock`]. If the guard is dropped instead, an unlock is
/// spawned on the current tokio runtime (best effort, logged); without a runtime the lock
/// stays held until the session logs out.
#[must_use = "dropping a LockGuard releases the lock"]
pub struct LockGuard {
    lockspace: Lockspace,
    resource: Resource,
    lock_id: u64,
    mode: Mode,
    token: u64,
    lvb: Vec<u8>,
    lvb_invalid: bool,
    /// Set once an unlock was sent (or handed to the background), so Drop does nothing.
    released: bool,
}

impl std::fmt::Debug for LockGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LockGuard")
            .field("lockspace", &self.lockspace.name())
            .field("resource", &self.resource.to_string())
            .field("lock_id", &self.lock_id)
            .field("mode", &self.mode)
            .field("token", &self.token)
            .field("lvb_invalid", &self.lvb_invalid)
            .finish_non_exhaustive()
    }
}

impl LockGuard {
    /// Wraps a grant. A grant with an unreadable mode is released again and reported as
    /// [`Error::Protocol`].
    pub(crate) fn from_grant(
        lockspace: Lockspace,
        resource: Resource,
        requested: Mode,
        grant: v1::Grant,
    ) -> Result<LockGuard> {
        let mode = Mode::from_proto(grant.mode);
        let guard = LockGuard {
            lockspace,
            resource,
            lock_id: grant.lock_id,
            mode: mode.unwrap_or(requested),
            token: grant.token,
            lvb: grant.lvb,
            lvb_invalid: grant.lvb_invalid,
            released: false,
        };
        match mode {
            Some(_) => Ok(guard),
            // Dropping the guard releases the lock.
            None => Err(Error::Protocol(format!(
                "grant of lock {} has unknown mode {}",
                grant.lock_id, grant.mode
            ))),
        }
    }

    fn session(&self) -> &Arc<Session> {
        &self.lockspace.client().inner
    }

    /// The server's id of this lock (what `Unlock` and `Convert` name).
    pub fn lock_id(&self) -> u64 {
        self.lock_id
    }

    /// The mode the lock is held in. With the `any` flag this may differ from the mode
    /// requested (PR granted as CW or the other way round).
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The fencing token of the latest grant (the lock or its latest conversion). Send it
    /// with every write to a protected resource; see [`crate::Client::check_token`].
    pub fn token(&self) -> u64 {
        self.token
    }

    /// The lock value block read at the latest grant with `valblk`; empty otherwise.
    pub fn lvb(&self) -> &[u8] {
        &self.lvb
    }

    /// True when the LVB cannot be trusted: a PW/EX holder died without writing it.
    pub fn lvb_invalid(&self) -> bool {
        self.lvb_invalid
    }

    /// The locked resource.
    pub fn resource(&self) -> &Resource {
        &self.resource
    }

    /// The lockspace the lock is in.
    pub fn lockspace(&self) -> &Lockspace {
        &self.lockspace
    }

    /// Converts the lock in place, up or down, and waits until the conversion is granted.
    /// On success the guard's mode, token and (with `valblk`) LVB are updated; on failure
    /// the lock is still held in its old mode.
    ///
    /// During a loss of quorum: as [`Lockspace::lock`](crate::Lockspace::lock) — without
    /// `opts.timeout` it waits until the cluster is back; with one it fails with
    /// [`Error::NoQuorum`] at the timeout if no leader answered, and the conversion is
    /// then cancelled in the background (should it be granted anyway, the server holds
    /// the lock in the new mode while this guard shows the old one). The lock itself
    /// is safe only while [`crate::Client::health`] is not `Lost`.
    ///
    /// If this future is dropped before the answer, the conversion is cancelled in the
    /// background; should it be granted anyway, the server holds the lock in the new mode
    /// while this guard still shows the old one (unlocking still releases it).
    pub async fn convert(&mut self, mode: Mode, opts: LockOptions) -> Result<()> {
        self.convert_inner(mode, opts, Vec::new()).await
    }

    /// Converts down from PW/EX and stores `lvb` as the lock value block (sets `valblk`).
    /// `lvb` must be exactly the lockspace's LVB length. Errors and behaviour during a
    /// loss of quorum as for [`LockGuard::convert`].
    pub async fn convert_with_lvb(
        &mut self,
        mode: Mode,
        mut opts: LockOptions,
        lvb: impl Into<Vec<u8>>,
    ) -> Result<()> {
        opts.flags.valblk = true;
        self.convert_inner(mode, opts, lvb.into()).await
    }

    async fn convert_inner(&mut self, mode: Mode, opts: LockOptions, lvb: Vec<u8>) -> Result<()> {
        let session = Arc::clone(self.session());
        let ticket = Arc::new(session.begin());
        let mut in_flight = ConversionInFlight {
            session: Arc::clone(&session),
            ticket: Arc::clone(&ticket),
            armed: true,
        };
        let outcome = session
            .convert(&ticket, self.lock_id, mode, opts, lvb)
            .await;
        // Given up at its timeout without an answer, the conversion may still wait in
        // the queue: cancel it in the background, as if the future had been dropped.
        in_flight.armed = matches!(&outcome, Err(e) if e.is_no_quorum());
        let grant = outcome?;
        let granted = Mode::from_proto(grant.mode).ok_or_else(|| {
            Error::Protocol(format!(
                "conversion of lock {} granted unknown mode {}",
                self.lock_id, grant.mode
            ))
        })?;
        if grant.lock_id != 0 && grant.lock_id != self.lock_id {
            return Err(Error::Protocol(format!(
                "conversion of lock {} answered for lock {}",
                self.lock_id, grant.lock_id
            )));
        }
        self.mode = granted;
        self.token = grant.token;
        if opts.flags.valblk {
            self.lvb = grant.lvb;
            self.lvb_invalid = grant.lvb_invalid;
        }
        Ok(())
    }

    /// Releases the lock. On an error the lock may still be held; logging out releases
    /// it.
    ///
    /// During a loss of quorum: retried until a leader with quorum answers, then fails
    /// with [`Error::NoQuorum`] after `ClientConfig::no_quorum_timeout` (3 s by default);
    /// whether the unlock was applied is then unknown.
    pub async fn unlock(mut self) -> Result<()> {
        self.released = true;
        self.session().unlock(self.lock_id, None).await
    }

    /// Releases the lock and stores `lvb` as its lock value block (`valblk`; only a PW/EX
    /// holder may write it, and it must be exactly the lockspace's LVB length). Errors and
    /// behaviour during a loss of quorum as for [`LockGuard::unlock`].
    pub async fn unlock_with_lvb(mut self, lvb: impl Into<Vec<u8>>) -> Result<()> {
        self.released = true;
        self.session().unlock(self.lock_id, Some(lvb.into())).await
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if self.released || self.session().is_logged_out() {
            return;
        }
        let lock_id = self.lock_id;
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let session = Arc::clone(self.session());
                tracing::debug!(lock_id, "lock guard dropped; unlocking in the background");
                runtime.spawn(async move {
                    if let Err(err) = session.unlock(lock_id, None).await {
                        tracing::warn!(lock_id, %err, "background unlock of a dropped lock guard failed");
                    }
                });
            }
            Err(_) => tracing::warn!(
                lock_id,
                "lock guard dropped outside a tokio runtime; the lock stays held until logout"
            ),
        }
    }
}

/// A conversion's request id while the conversion waits. If the waiting future is
/// dropped, the conversion is cancelled in the background, and the id stays in flight
/// until that cancel is answered.
struct ConversionInFlight {
    session: Arc<Session>,
    ticket: Arc<Ticket>,
    armed: bool,
}

impl Drop for ConversionInFlight {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let session = Arc::clone(&self.session);
        let ticket = Arc::clone(&self.ticket);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let target = ticket.id();
                if let Err(err) = session.cancel(target).await {
                    tracing::debug!(target, %err, "cancel of an abandoned conversion failed");
                }
                drop(ticket);
            });
        }
    }
}
