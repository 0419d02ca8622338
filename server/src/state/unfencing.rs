//! Unfencing in the lock table (issue 15): a node whose storage is fenced by
//! `fence_scsi` / `fence_mpath` (SCSI-3 reservations, multipath keys) must be let back
//! onto the storage (`action=on`, Pacemaker's "unfencing" of a device with
//! `provides=unfencing`) before it may use it, hence before it may lock anything on it.
//!
//! A `LoginUnfencing` creates the session in `NodeState::Unfencing`, which is not on
//! the allow-list: the session owns nothing, is not heard (no heartbeats, no expiry)
//! and may do nothing. The leader runs the node's unfence devices and reports each run
//! as `UnfenceAttempt`; the progress (failed attempts) lives in the fence progress map,
//! so a new leader resumes it. Success makes the session LoggedIn and answers the
//! login; failure after the last attempt ends the session, refuses the login, and is
//! remembered (with the login's nonce) so that a retry of that login is refused the
//! same way instead of unfencing again.
//!
//! Also here: the departure records (`Core::departed`), how each node without a
//! session left its last one, for `lockctl nodes`.

use super::command::{Event, LockError, NodeState, Reply, SessionId};
use super::limits::MAX_DEPARTURES;
use super::model::{Departure, DepartureKind, FenceProgress, FenceStep};
use super::table::State;
use std::sync::Arc;

impl State {
    /// The Login that created `session` asks for unfencing: progress starts at zero
    /// failed attempts and the history says so.
    pub(super) fn start_unfencing(&mut self, session: SessionId, now_ms: u64) {
        self.core.fences.insert(session, FenceProgress::default());
        self.record_fence(now_ms, session, FenceStep::UnfenceStarted);
    }

    /// A new login (any other nonce) of a node whose last login's unfencing failed is
    /// a new attempt; a retry of that login (same nonce) gets the same refusal.
    pub(super) fn unfence_refused_before(&self, node: &str, nonce: u64) -> Result<(), LockError> {
        match self.core.departed.get(node) {
            Some(Departure {
                how:
                    DepartureKind::UnfenceFailed {
                        nonce: n,
                        attempts,
                        detail,
                    },
                ..
            }) if *n == nonce => Err(LockError::UnfenceFailed {
                node: node.to_string(),
                attempts: *attempts,
                detail: detail.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub(super) fn unfence_attempt(
        &mut self,
        session: SessionId,
        ok: bool,
        last_attempt: bool,
        detail: String,
        now_ms: u64,
        events: &mut Vec<Event>,
    ) -> Result<Reply, LockError> {
        let s = self.session(session)?;
        if s.state != NodeState::Unfencing {
            return Err(LockError::InvalidArgument(format!(
                "unfence attempt for session {session}, which is {} and not being unfenced",
                s.state
            )));
        }
        // An Unfencing session may not act (`may_act`), so it owns nothing and ending it
        // releases nothing. Checked anyway, before anything changes, rather than
        // asserted: apply must refuse what it cannot do, never stop.
        if s.lock_count != 0 || !s.pending.is_empty() {
            return Err(LockError::InvalidArgument(format!(
                "unfence attempt for session {session}, which owns locks or requests"
            )));
        }
        let (node, nonce) = (s.node.clone(), s.nonce);
        self.record_fence(
            now_ms,
            session,
            FenceStep::UnfenceAttempt {
                ok,
                detail: detail.clone(),
            },
        );
        if ok {
            self.core.fences.remove(&session);
            self.session_mut(session).state = NodeState::LoggedIn;
            events.push(Event::Unfenced {
                session,
                result: Ok(()),
            });
            return Ok(Reply::Ok);
        }
        let progress = self.core.fences.entry(session).or_default();
        progress.failed_rounds = progress.failed_rounds.saturating_add(1);
        let attempts = progress.failed_rounds;
        if !last_attempt {
            events.push(Event::UnfenceDue { session });
            return Ok(Reply::Ok);
        }
        self.record_fence(now_ms, session, FenceStep::UnfenceFailed { attempts });
        self.core.fences.remove(&session);
        // It owns nothing (checked above): it goes whole.
        if let Some(s) = self
            .core
            .sessions
            .remove(&session)
            .map(Arc::unwrap_or_clone)
        {
            self.idx.maybe_unused.extend(s.opened);
        }
        self.idx.node_sessions.remove(&node);
        self.depart(
            node.clone(),
            now_ms,
            DepartureKind::UnfenceFailed {
                nonce,
                attempts,
                detail: detail.clone(),
            },
        );
        events.push(Event::Unfenced {
            session,
            result: Err(LockError::UnfenceFailed {
                node,
                attempts,
                detail,
            }),
        });
        Ok(Reply::Ok)
    }

    /// Remembers how `node`'s last session ended. At the bound, the oldest record
    /// (earliest time, then name: deterministic) makes room.
    pub(super) fn depart(&mut self, node: String, at_ms: u64, how: DepartureKind) {
        let departed = &mut self.core.departed;
        if departed.len() >= MAX_DEPARTURES && !departed.contains_key(&node) {
            let oldest = departed
                .iter()
                .min_by(|a, b| (a.1.at_ms, a.0).cmp(&(b.1.at_ms, b.0)))
                .map(|(name, _)| name.clone());
            if let Some(oldest) = oldest {
                departed.remove(&oldest);
            }
        }
        departed.insert(node, Departure { at_ms, how });
    }

    /// Unfencings the leader must run: (session, node, progress) of every Unfencing
    /// session, by session id.
    pub fn unfences_due(&self) -> Vec<(SessionId, String, FenceProgress)> {
        self.core
            .sessions
            .iter()
            .filter(|(_, s)| s.state == NodeState::Unfencing)
            .map(|(&id, s)| {
                let progress = self.core.fences.get(&id).cloned().unwrap_or_default();
                (id, s.node.clone(), progress)
            })
            .collect()
    }

    /// How each node without a session left its last one, by node name.
    pub fn departures(&self) -> impl Iterator<Item = (&str, &Departure)> {
        self.core.departed.iter().map(|(n, d)| (n.as_str(), d))
    }
}
