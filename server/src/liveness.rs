//! The leader's memory of when it last heard from each session (BRIEF §3.3).
//!
//! Heartbeats are not replicated: only the leader tracks them, and a new leader starts
//! from nothing, giving every session one grace period from its takeover. What *is*
//! replicated is the verdict (an `Expire` entry), proposed by the Raft driver for the
//! sessions this tracker reports as overdue. Time enters as `Instant` values so the
//! rules are tested without a clock.

use crate::state::SessionId;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

pub struct Liveness {
    expiry_window: Duration,
    grace: Duration,
    /// When this server became leader; `None` while it is not.
    leader_since: Option<Instant>,
    last_heard: HashMap<SessionId, Instant>,
    /// Expire entries proposed and not yet applied, so each is proposed once.
    expiring: HashSet<SessionId>,
    /// When expired sessions (Expired, Fencing, Fenced) were last heard from, for
    /// `silent_for` only; at most MAX_REMEMBERED_EXPIRED, the oldest dropped first.
    expired_heard: HashMap<SessionId, Instant>,
}

/// Bound of `Liveness::expired_heard`.
const MAX_REMEMBERED_EXPIRED: usize = 4_096;

impl Liveness {
    pub fn new(expiry_window: Duration, grace: Duration) -> Liveness {
        Liveness {
            expiry_window,
            grace,
            leader_since: None,
            last_heard: HashMap::new(),
            expiring: HashSet::new(),
            expired_heard: HashMap::new(),
        }
    }

    /// This server just became leader: it knows nothing of anyone's heartbeats, so
    /// every session gets the grace period from now.
    pub fn became_leader(&mut self, now: Instant) {
        self.leader_since = Some(now);
        self.last_heard.clear();
        self.expiring.clear();
        self.expired_heard.clear();
    }

    pub fn lost_leadership(&mut self) {
        self.leader_since = None;
        self.last_heard.clear();
        self.expiring.clear();
        self.expired_heard.clear();
    }

    /// A heartbeat, or a login, from `session`.
    pub fn heard(&mut self, session: SessionId, now: Instant) {
        self.last_heard.insert(session, now);
    }

    /// The session logged out: forget it.
    pub fn forget(&mut self, session: SessionId) {
        self.last_heard.remove(&session);
        self.expiring.remove(&session);
        self.expired_heard.remove(&session);
    }

    /// The session expired: it is no longer watched, but its silence still counts from
    /// when it was last heard (not from the takeover) while it is fenced.
    pub fn expired(&mut self, session: SessionId) {
        self.expiring.remove(&session);
        let Some(heard) = self.last_heard.remove(&session).or(self.leader_since) else {
            return;
        };
        if self.expired_heard.len() >= MAX_REMEMBERED_EXPIRED {
            if let Some(oldest) = self
                .expired_heard
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(s, _)| *s)
            {
                self.expired_heard.remove(&oldest);
            }
        }
        self.expired_heard.insert(session, heard);
    }

    /// How long `session` has been silent as the leader sees it: since its last
    /// heartbeat (also once it expired), or since the takeover if this leader has not
    /// heard from it.
    pub fn silent_for(&self, session: SessionId, now: Instant) -> Option<Duration> {
        let since = self
            .last_heard
            .get(&session)
            .or_else(|| self.expired_heard.get(&session))
            .copied()
            .or(self.leader_since)?;
        Some(now.saturating_duration_since(since))
    }

    /// The live sessions (from the lock table) that are overdue and not yet being
    /// expired; each is returned once until [`Liveness::forget`] or a new term.
    pub fn overdue(
        &mut self,
        live_sessions: impl IntoIterator<Item = SessionId>,
        now: Instant,
    ) -> Vec<SessionId> {
        let Some(leader_since) = self.leader_since else {
            return Vec::new();
        };
        let mut due = Vec::new();
        for session in live_sessions {
            if self.expiring.contains(&session) {
                continue;
            }
            let deadline = match self.last_heard.get(&session) {
                Some(heard) => *heard + self.expiry_window,
                None => leader_since + self.grace,
            };
            if now > deadline {
                self.expiring.insert(session);
                due.push(session);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(2_000);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_follower_expires_nobody() {
        let mut l = Liveness::new(WINDOW, WINDOW);
        let t0 = Instant::now();
        assert!(l.overdue([1, 2], t0 + ms(60_000)).is_empty());
    }

    #[test]
    fn a_silent_session_is_overdue_after_the_window_once() {
        let mut l = Liveness::new(WINDOW, WINDOW);
        let t0 = Instant::now();
        l.became_leader(t0);
        l.heard(7, t0);
        assert!(
            l.overdue([7], t0 + ms(2_000)).is_empty(),
            "exactly at the window"
        );
        assert_eq!(l.overdue([7], t0 + ms(2_001)), vec![7]);
        assert!(l.overdue([7], t0 + ms(3_000)).is_empty(), "proposed once");
    }

    #[test]
    fn heartbeats_keep_a_session_alive() {
        let mut l = Liveness::new(WINDOW, WINDOW);
        let t0 = Instant::now();
        l.became_leader(t0);
        for i in 1..20 {
            l.heard(3, t0 + ms(i * 667));
            assert!(l.overdue([3], t0 + ms(i * 667 + 1_000)).is_empty());
        }
    }

    #[test]
    fn a_new_leader_grants_every_session_the_grace_from_its_takeover() {
        let grace = ms(5_000);
        let mut l = Liveness::new(WINDOW, grace);
        let t0 = Instant::now();
        l.became_leader(t0);
        l.heard(1, t0);
        l.lost_leadership();
        let t1 = t0 + ms(10_000);
        l.became_leader(t1);
        assert!(l.overdue([1, 2], t1 + ms(4_999)).is_empty());
        assert_eq!(l.overdue([1, 2], t1 + ms(5_001)), vec![1, 2]);
    }

    #[test]
    fn forgetting_a_session_allows_a_new_verdict_later() {
        let mut l = Liveness::new(WINDOW, WINDOW);
        let t0 = Instant::now();
        l.became_leader(t0);
        assert_eq!(l.overdue([4], t0 + ms(2_001)), vec![4]);
        l.forget(4);
        l.heard(4, t0 + ms(3_000));
        assert_eq!(l.silent_for(4, t0 + ms(3_500)), Some(ms(500)));
        assert_eq!(l.overdue([4], t0 + ms(5_001)), vec![4]);
    }

    #[test]
    fn an_expired_session_stays_silent_since_its_last_heartbeat() {
        let mut l = Liveness::new(WINDOW, WINDOW);
        let t0 = Instant::now();
        l.became_leader(t0);
        l.heard(4, t0 + ms(10_000));
        assert_eq!(l.overdue([4], t0 + ms(12_001)), vec![4]);
        l.expired(4);
        // Fencing takes a while: the silence keeps growing from the last heartbeat,
        // it does not fall back to the time since the takeover.
        assert_eq!(l.silent_for(4, t0 + ms(12_500)), Some(ms(2_500)));
        assert_eq!(l.silent_for(4, t0 + ms(13_000)), Some(ms(3_000)));
        // A logout forgets it entirely.
        l.forget(4);
        assert_eq!(l.silent_for(4, t0 + ms(13_000)), Some(ms(13_000)));
    }
}
