//! Specification tests for the lock table: one rule of BRIEF §3.2 per test, named for
//! the rule. Every apply in the harness also checks the table's invariants and that a
//! snapshot round trip reproduces the same bytes.

use super::model::Core;
use super::*;
use std::collections::BTreeMap;

const LS: &str = "fs1";
const NONCE: u64 = 7;

/// A lock table driven the way the Raft driver drives it: increasing indexes, a clock.
struct Table {
    state: State,
    index: u64,
    now_ms: u64,
    next_request: BTreeMap<SessionId, RequestId>,
    /// Check invariants and the snapshot round trip after every apply (off for the
    /// limit tests, which apply tens of thousands of entries).
    checks: bool,
}

/// A command's reply and events, with the request id it was sent with.
struct Outcome {
    request_id: RequestId,
    reply: Reply,
    events: Vec<Event>,
}

impl Outcome {
    #[track_caller]
    fn granted(&self) -> GrantInfo {
        match &self.reply {
            Reply::Granted(info) => info.clone(),
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[track_caller]
    fn queued(&self) -> LockId {
        match &self.reply {
            Reply::Queued { lock_id } => *lock_id,
            other => panic!("expected Queued, got {other:?}"),
        }
    }

    #[track_caller]
    fn error(&self) -> LockError {
        match &self.reply {
            Reply::Failed(e) => e.clone(),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// (request id, result) of every Finished event, in order.
    fn finished(&self) -> Vec<(RequestId, Result<GrantInfo, LockError>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Finished {
                    request_id, result, ..
                } => Some((*request_id, result.clone())),
                _ => None,
            })
            .collect()
    }

    /// (holder lock, requested mode) of every blocking callback, in order.
    fn blocking(&self) -> Vec<(LockId, Mode)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Blocking {
                    lock_id, requested, ..
                } => Some((*lock_id, *requested)),
                _ => None,
            })
            .collect()
    }
}

fn flags() -> Flags {
    Flags::default()
}

impl Table {
    fn new() -> Self {
        Table {
            state: State::new(),
            index: 0,
            now_ms: 1_000,
            next_request: BTreeMap::new(),
            checks: true,
        }
    }

    fn apply(&mut self, cmd: Command) -> (Reply, Vec<Event>) {
        self.index += 1;
        let out = self.state.apply(self.index, self.now_ms, cmd);
        if self.checks {
            self.check();
        }
        out
    }

    fn check(&self) {
        self.state.check_queue_rules().expect("queue rules hold");
        let bytes = self.state.encode();
        let copy = State::decode(&bytes).expect("the snapshot decodes");
        assert_eq!(
            copy.encode(),
            bytes,
            "a snapshot round trip changes nothing"
        );
    }

    fn request_id(&mut self, s: SessionId) -> RequestId {
        let next = self.next_request.entry(s).or_insert(1);
        *next += 1;
        *next - 1
    }

    fn login(&mut self, node: &str) -> SessionId {
        match self.apply(Command::Login {
            node: node.into(),
            nonce: NONCE,
        }) {
            (Reply::LoggedIn { session }, _) => session,
            other => panic!("login failed: {other:?}"),
        }
    }

    fn open(&mut self, s: SessionId, name: &str, lvb_len_bytes: u32) -> Reply {
        let request_id = self.request_id(s);
        self.apply(Command::OpenLockspace {
            session: s,
            request_id,
            name: name.into(),
            lvb_len_bytes,
            recovery: RecoveryMode::Auto,
        })
        .0
    }

    /// A logged-in node that opened `LS` with default options.
    fn node(&mut self, name: &str) -> SessionId {
        let s = self.login(name);
        self.open(s, LS, 0);
        s
    }

    fn send(&mut self, request_id: RequestId, cmd: Command) -> Outcome {
        let (reply, events) = self.apply(cmd);
        Outcome {
            request_id,
            reply,
            events,
        }
    }

    fn lock(&mut self, s: SessionId, res: &str, mode: Mode) -> Outcome {
        self.lock_with(s, res, mode, flags(), 0)
    }

    fn lock_with(
        &mut self,
        s: SessionId,
        res: &str,
        mode: Mode,
        flags: Flags,
        timeout_ms: u64,
    ) -> Outcome {
        let request_id = self.request_id(s);
        self.send(
            request_id,
            lock_cmd(s, request_id, res, mode, flags, timeout_ms),
        )
    }

    fn convert(&mut self, s: SessionId, lock_id: LockId, mode: Mode) -> Outcome {
        self.convert_with(s, lock_id, mode, flags(), 0, None)
    }

    fn convert_with(
        &mut self,
        s: SessionId,
        lock_id: LockId,
        mode: Mode,
        flags: Flags,
        timeout_ms: u64,
        lvb: Option<Vec<u8>>,
    ) -> Outcome {
        let request_id = self.request_id(s);
        self.send(
            request_id,
            Command::Convert {
                session: s,
                request_id,
                ack_below: 0,
                lock_id,
                mode,
                flags,
                timeout_ms,
                lvb,
            },
        )
    }

    fn unlock(&mut self, s: SessionId, lock_id: LockId) -> Outcome {
        self.unlock_lvb(s, lock_id, None)
    }

    fn unlock_lvb(&mut self, s: SessionId, lock_id: LockId, lvb: Option<Vec<u8>>) -> Outcome {
        let request_id = self.request_id(s);
        self.send(
            request_id,
            Command::Unlock {
                session: s,
                request_id,
                ack_below: 0,
                lock_id,
                lvb,
            },
        )
    }

    fn cancel(&mut self, s: SessionId, target: RequestId) -> Outcome {
        let request_id = self.request_id(s);
        self.send(
            request_id,
            Command::Cancel {
                session: s,
                request_id,
                ack_below: 0,
                target,
            },
        )
    }

    fn tick(&mut self, now_ms: u64) -> Outcome {
        self.now_ms = now_ms;
        self.send(0, Command::Tick)
    }

    fn resource(&self, res: &str) -> ResourceView {
        self.state
            .resource_view(LS, res.as_bytes())
            .expect("the resource exists")
    }

    fn granted_mode(&self, lock_id: LockId) -> Option<Mode> {
        self.state.lock_view(lock_id).and_then(|v| v.granted)
    }

    fn requested_mode(&self, lock_id: LockId) -> Option<Mode> {
        self.state.lock_view(lock_id).and_then(|v| v.requested)
    }
}

fn lock_cmd(
    s: SessionId,
    request_id: RequestId,
    res: &str,
    mode: Mode,
    flags: Flags,
    timeout_ms: u64,
) -> Command {
    Command::Lock {
        session: s,
        request_id,
        ack_below: 0,
        lockspace: LS.into(),
        resource: res.as_bytes().to_vec(),
        mode,
        flags,
        timeout_ms,
    }
}

// ---- modes ----

#[test]
fn compatibility_matrix_is_dlms() {
    use Mode::*;
    // BRIEF §3.2: NL with all; CR with all but EX; CW with NL, CR, CW; PR with NL, CR,
    // PR; PW with NL, CR; EX with NL.
    let compatible_with: [(Mode, &[Mode]); 6] = [
        (Nl, &[Nl, Cr, Cw, Pr, Pw, Ex]),
        (Cr, &[Nl, Cr, Cw, Pr, Pw]),
        (Cw, &[Nl, Cr, Cw]),
        (Pr, &[Nl, Cr, Pr]),
        (Pw, &[Nl, Cr]),
        (Ex, &[Nl]),
    ];
    for (mode, partners) in compatible_with {
        for other in Mode::ALL {
            let expected = partners.contains(&other);
            assert_eq!(mode.compatible(other), expected, "{mode} with {other}");
            assert_eq!(other.compatible(mode), expected, "{other} with {mode}");
        }
    }
}

#[test]
fn every_pair_of_modes_behaves_as_the_matrix_says_on_a_resource() {
    for held in Mode::ALL {
        for wanted in Mode::ALL {
            let mut t = Table::new();
            let (a, b) = (t.node("a"), t.node("b"));
            t.lock(a, "r", held).granted();
            let second = t.lock(b, "r", wanted);
            if held.compatible(wanted) {
                assert_eq!(second.granted().mode, wanted, "{wanted} after {held}");
            } else {
                second.queued();
            }
        }
    }
}

// ---- sessions ----

#[test]
fn login_session_id_is_the_entry_index() {
    let mut t = Table::new();
    t.index = 41;
    assert_eq!(t.login("a"), 42);
    assert_eq!(t.state.session_node(42), Some("a"));
    assert_eq!(t.state.session_of_node("a"), Some(42));
    assert_eq!(t.state.session_count(), 1);
}

#[test]
fn login_retry_with_same_nonce_returns_the_same_session() {
    let mut t = Table::new();
    let s = t.login("a");
    assert_eq!(t.login("a"), s);
    assert_eq!(t.state.session_count(), 1);
}

#[test]
fn login_with_another_nonce_is_refused_while_logged_in() {
    let mut t = Table::new();
    let s = t.login("a");
    let (reply, _) = t.apply(Command::Login {
        node: "a".into(),
        nonce: NONCE + 1,
    });
    let error = LockError::AlreadyLoggedIn {
        node: "a".into(),
        session: s,
    };
    assert_eq!(
        error.to_string(),
        format!("node 'a' is already logged in as session {s}")
    );
    assert_eq!(reply, Reply::Failed(error));
}

#[test]
fn logout_releases_locks_and_grants_waiters() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let waiter = t.lock(b, "r", Mode::Pr);
    let lock = waiter.queued();
    let (reply, events) = t.apply(Command::Logout {
        session: a,
        request_id: 99,
    });
    assert_eq!(reply, Reply::Ok);
    let grant = match &events[..] {
        [Event::Finished {
            session,
            request_id,
            result: Ok(grant),
        }, Event::LoggedOut { session: gone }]
            if *session == b && *request_id == waiter.request_id && *gone == a =>
        {
            grant.clone()
        }
        other => panic!("expected b's grant, got {other:?}"),
    };
    assert_eq!((grant.lock_id, grant.mode), (lock, Mode::Pr));
    assert_eq!(t.state.session_count(), 1);
    assert_eq!(t.state.session_of_node("a"), None);
    assert_eq!(t.state.held_lock_count(), 1);
}

#[test]
fn logout_fails_own_waiting_requests_with_cancelled() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let waiter = t.lock(b, "r", Mode::Ex);
    waiter.queued();
    let (_, events) = t.apply(Command::Logout {
        session: b,
        request_id: 99,
    });
    assert_eq!(
        events,
        vec![
            Event::Finished {
                session: b,
                request_id: waiter.request_id,
                result: Err(LockError::Cancelled),
            },
            Event::LoggedOut { session: b }
        ]
    );
    assert_eq!(t.state.waiting_count(), 0);
    assert_eq!(t.state.resource_view(LS, b"r").unwrap().holders.len(), 1);
}

#[test]
fn logged_out_node_may_log_in_again_with_a_new_session() {
    let mut t = Table::new();
    let a = t.node("a");
    t.apply(Command::Logout {
        session: a,
        request_id: 5,
    });
    let again = t.login("a");
    assert_ne!(again, a);
    assert_eq!(t.state.session_of_node("a"), Some(again));
}

// ---- lockspaces ----

#[test]
fn open_lockspace_defaults_the_lvb_to_32_bytes() {
    let mut t = Table::new();
    let a = t.login("a");
    assert_eq!(
        t.open(a, LS, 0),
        Reply::LockspaceOpened {
            lvb_len_bytes: 32,
            recovery: RecoveryMode::Auto
        }
    );
    let flags = Flags {
        valblk: true,
        ..flags()
    };
    let grant = t.lock_with(a, "r", Mode::Ex, flags, 0).granted();
    assert_eq!(grant.lvb, Some(vec![0; 32]));
}

#[test]
fn lockspace_lvb_length_is_the_one_asked_for() {
    let mut t = Table::new();
    let a = t.login("a");
    t.open(a, LS, 8);
    let flags = Flags {
        valblk: true,
        ..flags()
    };
    assert_eq!(
        t.lock_with(a, "r", Mode::Ex, flags, 0).granted().lvb,
        Some(vec![0; 8])
    );
}

#[test]
fn opening_a_lockspace_with_other_options_is_a_mismatch() {
    let mut t = Table::new();
    let (a, b) = (t.login("a"), t.login("b"));
    t.open(a, LS, 16);
    let error = LockError::LockspaceMismatch {
        name: LS.into(),
        lvb_len_bytes: 16,
        recovery: RecoveryMode::Auto,
    };
    assert_eq!(t.open(b, LS, 0), Reply::Failed(error.clone()));
    assert_eq!(
        error.to_string(),
        "lockspace 'fs1' already exists with LVB length 16 bytes and recovery auto"
    );
    // Same options: b joins it.
    assert!(matches!(t.open(b, LS, 16), Reply::LockspaceOpened { .. }));
    assert_eq!(t.state.lockspace_count(), 1);
}

#[test]
fn lock_needs_the_lockspace_opened_by_the_session() {
    let mut t = Table::new();
    t.node("a");
    let b = t.login("b");
    let refused = t.lock(b, "r", Mode::Ex);
    assert_eq!(refused.error(), LockError::LockspaceNotOpened(LS.into()));
}

// ---- queue order ----

#[test]
fn ex_blocks_pr_until_release() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let held = t.lock(a, "r", Mode::Ex).granted();
    let waiter = t.lock(b, "r", Mode::Pr);
    let lock = waiter.queued();
    assert_eq!(t.granted_mode(lock), None);
    let released = t.unlock(a, held.lock_id);
    let finished = released.finished();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].0, waiter.request_id);
    assert_eq!(finished[0].1.as_ref().unwrap().mode, Mode::Pr);
    assert_eq!(t.granted_mode(lock), Some(Mode::Pr));
}

#[test]
fn waiters_are_granted_in_fifo_order() {
    let mut t = Table::new();
    let (a, b, c, d) = (t.node("a"), t.node("b"), t.node("c"), t.node("d"));
    let first = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let waiters: Vec<(SessionId, LockId)> = [b, c, d]
        .into_iter()
        .map(|s| (s, t.lock(s, "r", Mode::Ex).queued()))
        .collect();
    assert_eq!(
        t.resource("r").waiting,
        waiters.iter().map(|w| w.1).collect::<Vec<_>>()
    );
    let mut holder = (a, first);
    for &(s, lock) in &waiters {
        t.unlock(holder.0, holder.1);
        assert_eq!(t.granted_mode(lock), Some(Mode::Ex));
        holder = (s, lock);
    }
}

#[test]
fn compatible_late_request_does_not_jump_an_incompatible_earlier_waiter() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let reader = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let writer = t.lock(b, "r", Mode::Ex).queued();
    // Compatible with the PR holder, but not with the EX waiting ahead of it.
    let late = t.lock(c, "r", Mode::Pr).queued();
    t.unlock(a, reader);
    assert_eq!(t.granted_mode(writer), Some(Mode::Ex));
    assert_eq!(t.granted_mode(late), None);
}

#[test]
fn waiter_compatible_with_holders_and_every_waiter_ahead_is_granted_at_once() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    t.lock(a, "r", Mode::Pw).granted();
    t.lock(b, "r", Mode::Pr).queued();
    // CR fits next to PW and behind PR.
    assert_eq!(t.lock(c, "r", Mode::Cr).granted().mode, Mode::Cr);
}

#[test]
fn conversions_are_served_before_new_requests() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Pr).granted().lock_id;
    t.convert(a, la, Mode::Ex).queued();
    // PR fits both holders, but not the EX that a's conversion asks for.
    let lc = t.lock(c, "r", Mode::Pr).queued();
    t.unlock(b, lb);
    assert_eq!(t.granted_mode(la), Some(Mode::Ex));
    assert_eq!(t.granted_mode(lc), None);
    t.unlock(a, la);
    assert_eq!(t.granted_mode(lc), Some(Mode::Pr));
}

#[test]
fn up_conversion_waits_for_other_holders() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Pr).granted().lock_id;
    let conversion = t.convert(a, la, Mode::Ex);
    assert_eq!(conversion.queued(), la);
    assert_eq!(
        t.granted_mode(la),
        Some(Mode::Pr),
        "keeps PR while converting"
    );
    assert_eq!(t.requested_mode(la), Some(Mode::Ex));
    let released = t.unlock(b, lb);
    let finished = released.finished();
    assert_eq!(finished.len(), 1);
    assert_eq!(finished[0].0, conversion.request_id);
    assert_eq!(finished[0].1.as_ref().unwrap().mode, Mode::Ex);
    assert_eq!(t.requested_mode(la), None);
}

#[test]
fn down_conversion_is_granted_at_once_and_wakes_waiters() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let waiter = t.lock(b, "r", Mode::Pr);
    let down = t.convert(a, la, Mode::Pr);
    assert_eq!(down.granted().mode, Mode::Pr);
    assert_eq!(down.finished()[0].0, waiter.request_id);
    assert_eq!(t.granted_mode(waiter.queued()), Some(Mode::Pr));
}

#[test]
fn conversion_is_not_held_back_by_queued_conversions() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Pr).granted().lock_id;
    t.lock(c, "r", Mode::Pr).granted();
    t.convert(a, la, Mode::Ex).queued();
    // b's down-conversion is compatible with every other holder's granted mode.
    assert_eq!(t.convert(b, lb, Mode::Nl).granted().mode, Mode::Nl);
}

#[test]
fn conversion_to_the_held_mode_is_granted_with_a_new_token() {
    let mut t = Table::new();
    let a = t.node("a");
    let first = t.lock(a, "r", Mode::Pr).granted();
    let again = t.convert(a, first.lock_id, Mode::Pr).granted();
    assert_eq!(again.mode, Mode::Pr);
    assert!(again.token > first.token);
}

#[test]
fn convert_of_a_waiting_lock_is_not_granted() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let waiting = t.lock(b, "r", Mode::Pr).queued();
    let refused = t.convert(b, waiting, Mode::Nl);
    assert_eq!(refused.error(), LockError::NotGranted(waiting));
}

#[test]
fn convert_while_a_conversion_is_pending_is_not_granted() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    t.lock(b, "r", Mode::Pr).granted();
    t.convert(a, la, Mode::Ex).queued();
    assert_eq!(
        t.convert(a, la, Mode::Nl).error(),
        LockError::NotGranted(la)
    );
}

#[test]
fn locks_of_one_session_on_one_resource_conflict_like_any_others() {
    let mut t = Table::new();
    let a = t.node("a");
    let first = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let second = t.lock(a, "r", Mode::Pr).queued();
    assert_ne!(first, second);
    t.unlock(a, first);
    assert_eq!(t.granted_mode(second), Some(Mode::Pr));
}

// ---- conversion deadlock ----

#[test]
fn two_pr_to_ex_conversions_deadlock_exactly_one() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Pr).granted().lock_id;
    let first = t.convert(a, la, Mode::Ex);
    first.queued();
    let second = t.convert(b, lb, Mode::Ex);
    assert_eq!(second.reply, Reply::Failed(LockError::Deadlock));
    assert_eq!(
        t.granted_mode(lb),
        Some(Mode::Pr),
        "the refused lock keeps PR"
    );
    assert_eq!(t.requested_mode(lb), None);
    assert_eq!(
        t.requested_mode(la),
        Some(Mode::Ex),
        "the other keeps waiting"
    );
    let released = t.unlock(b, lb);
    assert_eq!(released.finished()[0].0, first.request_id);
    assert_eq!(t.granted_mode(la), Some(Mode::Ex));
}

#[test]
fn deadlock_victim_down_converting_lets_the_other_conversion_through() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Pr).granted().lock_id;
    t.convert(a, la, Mode::Ex).queued();
    assert_eq!(t.convert(b, lb, Mode::Ex).error(), LockError::Deadlock);
    t.convert(b, lb, Mode::Nl).granted();
    assert_eq!(t.granted_mode(la), Some(Mode::Ex));
}

#[test]
fn conversion_deadlock_is_found_with_other_holders_present() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Cr).granted().lock_id;
    t.lock(c, "r", Mode::Pr).granted();
    // a (PR -> EX) waits for b's CR; b (CR -> PW) would wait for a's PR: a cycle,
    // although c's PR, which is not converting, blocks both as well.
    t.convert(a, la, Mode::Ex).queued();
    assert_eq!(t.convert(b, lb, Mode::Pw).error(), LockError::Deadlock);
}

#[test]
fn conversion_blocked_only_by_non_converting_holders_is_no_deadlock() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Nl).granted().lock_id;
    t.lock(c, "r", Mode::Pr).granted();
    t.convert(a, la, Mode::Ex).queued();
    // b's PW waits for a's PR and c's PR, but a does not wait for b's NL.
    t.convert(b, lb, Mode::Pw).queued();
}

// ---- flags ----

#[test]
fn try_fails_with_would_block_and_queues_nothing() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let before = (t.state.held_lock_count(), t.state.last_token());
    let tried = t.lock_with(
        b,
        "r",
        Mode::Pr,
        Flags {
            try_: true,
            ..flags()
        },
        0,
    );
    assert_eq!(tried.error(), LockError::WouldBlock);
    assert!(tried.events.is_empty(), "plain try sends no callback");
    assert_eq!(t.state.waiting_count(), 0);
    assert!(t.state.locks_of_session(b).is_empty());
    assert_eq!((t.state.held_lock_count(), t.state.last_token()), before);
}

#[test]
fn try_conversion_fails_with_would_block_and_keeps_the_mode() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    t.lock(b, "r", Mode::Pr).granted();
    let tried = t.convert_with(
        a,
        la,
        Mode::Ex,
        Flags {
            try_: true,
            ..flags()
        },
        0,
        None,
    );
    assert_eq!(tried.error(), LockError::WouldBlock);
    assert_eq!(
        (t.granted_mode(la), t.requested_mode(la)),
        (Some(Mode::Pr), None)
    );
}

#[test]
fn try_1cb_sends_one_callback_to_blocking_holders_and_queues_nothing() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let held = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let try_1cb = Flags {
        try_1cb: true,
        ..flags()
    };
    let tried = t.lock_with(b, "r", Mode::Pr, try_1cb, 0);
    assert_eq!(tried.error(), LockError::WouldBlock);
    assert_eq!(tried.blocking(), vec![(held, Mode::Pr)]);
    assert_eq!(t.state.waiting_count(), 0);
    // The holder was already told about PR during this grant.
    let again = t.lock_with(b, "r", Mode::Pr, try_1cb, 0);
    assert!(again.blocking().is_empty());
}

#[test]
fn expired_holder_blocks_requests_without_noexp() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let dead = t.lock(a, "r", Mode::Ex).granted().lock_id;
    assert!(t.state.mark_expired_holders(a).is_empty());
    assert!(t.state.lock_view(dead).unwrap().expired);
    let waiter = t.lock(b, "r", Mode::Pr);
    waiter.queued();
    assert!(
        waiter.blocking().is_empty(),
        "a dead holder gets no callback"
    );
}

#[test]
fn noexp_request_ignores_expired_holders() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let dead = t.lock(a, "r", Mode::Ex).granted();
    t.state.mark_expired_holders(a);
    let noexp = Flags {
        noexp: true,
        ..flags()
    };
    let recovery = t.lock_with(b, "r", Mode::Ex, noexp, 0).granted();
    assert!(recovery.token > dead.token);
    assert_eq!(t.resource("r").holders.len(), 2);
    assert_eq!(
        t.state.check_token(LS, b"r", dead.token),
        (true, recovery.token)
    );
}

#[test]
fn marking_expired_holders_grants_waiting_noexp_requests() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Pw).granted();
    let noexp = Flags {
        noexp: true,
        ..flags()
    };
    let waiter = t.lock_with(b, "r", Mode::Ex, noexp, 0);
    waiter.queued();
    let events = t.state.mark_expired_holders(a);
    t.check();
    assert!(matches!(
        &events[..],
        [Event::Finished { request_id, result: Ok(grant), .. }]
            if *request_id == waiter.request_id && grant.mode == Mode::Ex
    ));
}

#[test]
fn marking_expired_holders_touches_only_pw_and_ex_locks() {
    let mut t = Table::new();
    let a = t.node("a");
    let pr = t.lock(a, "r1", Mode::Pr).granted().lock_id;
    let pw = t.lock(a, "r2", Mode::Pw).granted().lock_id;
    t.state.mark_expired_holders(a);
    assert!(!t.state.lock_view(pr).unwrap().expired);
    assert!(t.state.lock_view(pw).unwrap().expired);
    assert!(!t.resource("r1").lvb_invalid);
    assert!(t.resource("r2").lvb_invalid);
}

#[test]
fn marking_expired_holders_cancels_their_pending_conversions() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pw).granted().lock_id;
    t.lock(b, "r", Mode::Cr).granted();
    let conversion = t.convert(a, la, Mode::Ex);
    conversion.queued();
    let events = t.state.mark_expired_holders(a);
    t.check();
    assert_eq!(
        events,
        vec![Event::Finished {
            session: a,
            request_id: conversion.request_id,
            result: Err(LockError::Cancelled)
        }]
    );
    assert_eq!(
        t.convert(a, la, Mode::Nl).error(),
        LockError::NotGranted(la)
    );
}

#[test]
fn marking_expired_holders_of_an_unknown_session_changes_nothing() {
    let mut t = Table::new();
    let a = t.node("a");
    t.lock(a, "r", Mode::Ex).granted();
    let before = t.state.encode();
    assert!(t.state.mark_expired_holders(a + 100).is_empty());
    assert_eq!(t.state.encode(), before);
}

#[test]
fn any_pr_request_is_granted_as_cw() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Cw).granted();
    let any = Flags {
        any: true,
        ..flags()
    };
    assert_eq!(
        t.lock_with(b, "r", Mode::Pr, any, 0).granted().mode,
        Mode::Cw
    );
    // Without `any` the same request waits.
    t.lock(b, "r", Mode::Pr).queued();
}

#[test]
fn any_cw_request_is_granted_as_pr() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Pr).granted();
    let any = Flags {
        any: true,
        ..flags()
    };
    assert_eq!(
        t.lock_with(b, "r", Mode::Cw, any, 0).granted().mode,
        Mode::Pr
    );
}

#[test]
fn any_waiter_is_granted_the_alternative_in_a_later_pass() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pw).granted().lock_id;
    let any = Flags {
        any: true,
        ..flags()
    };
    let waiter = t.lock_with(b, "r", Mode::Pr, any, 0);
    let lb = waiter.queued();
    let moved = t.convert(a, la, Mode::Cw);
    moved.granted();
    assert_eq!(moved.finished()[0].1.as_ref().unwrap().mode, Mode::Cw);
    assert_eq!(t.granted_mode(lb), Some(Mode::Cw));
}

#[test]
fn any_conversion_is_granted_as_the_alternative() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Cw).granted();
    let lb = t.lock(b, "r", Mode::Nl).granted().lock_id;
    let any = Flags {
        any: true,
        ..flags()
    };
    let converted = t.convert_with(b, lb, Mode::Pr, any, 0, None).granted();
    assert_eq!(converted.mode, Mode::Cw);
}

#[test]
fn priority_request_is_queued_at_the_head() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let held = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let normal = t.lock(b, "r", Mode::Pr).queued();
    let priority = Flags {
        priority: true,
        ..flags()
    };
    let urgent = t.lock_with(c, "r", Mode::Ex, priority, 0).queued();
    assert_eq!(t.resource("r").waiting, vec![urgent, normal]);
    t.unlock(a, held);
    assert_eq!(t.granted_mode(urgent), Some(Mode::Ex));
    assert_eq!(t.granted_mode(normal), None);
}

#[test]
fn priority_request_passes_incompatible_waiters_when_holders_allow() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    t.lock(a, "r", Mode::Pr).granted();
    let writer = t.lock(b, "r", Mode::Ex).queued();
    let priority = Flags {
        priority: true,
        ..flags()
    };
    let reader = t.lock_with(c, "r", Mode::Pr, priority, 0);
    reader.granted();
    assert_eq!(t.granted_mode(writer), None);
}

#[test]
fn priority_conversion_is_queued_at_the_head_of_the_convert_queue() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let blocker = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Nl).granted().lock_id;
    let lc = t.lock(c, "r", Mode::Nl).granted().lock_id;
    t.convert(b, lb, Mode::Ex).queued();
    let priority = Flags {
        priority: true,
        ..flags()
    };
    t.convert_with(c, lc, Mode::Ex, priority, 0, None).queued();
    assert_eq!(t.resource("r").converting, vec![lc, lb]);
    t.unlock(a, blocker);
    assert_eq!(t.granted_mode(lc), Some(Mode::Ex));
    assert_eq!(t.granted_mode(lb), Some(Mode::Nl));
}

// ---- LVB ----

fn valblk() -> Flags {
    Flags {
        valblk: true,
        ..flags()
    }
}

#[test]
fn lvb_is_written_by_unlock_from_ex() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(b, "r", Mode::Nl).granted(); // keeps the resource (and its LVB) alive
    let writer = t.lock_with(a, "r", Mode::Ex, valblk(), 0).granted();
    t.unlock_lvb(a, writer.lock_id, Some(vec![7; 32]));
    let reader = t.lock_with(a, "r", Mode::Pr, valblk(), 0).granted();
    assert_eq!(reader.lvb, Some(vec![7; 32]));
    assert!(!reader.lvb_invalid);
}

#[test]
fn lvb_write_from_a_mode_below_pw_is_refused_and_changes_nothing() {
    let mut t = Table::new();
    let a = t.node("a");
    t.lock(a, "r", Mode::Nl).granted();
    let reader = t.lock_with(a, "r", Mode::Pr, valblk(), 0).granted();
    let before = t.state.encode();
    let unlocked = t.unlock_lvb(a, reader.lock_id, Some(vec![9; 32]));
    assert!(
        matches!(unlocked.error(), LockError::InvalidArgument(ref m) if m.contains("held in PR")),
        "{:?}",
        unlocked.reply
    );
    assert_eq!(t.state.encode(), before);
    let converted = t.lock(a, "r", Mode::Cr).granted().lock_id;
    let down = t.convert_with(a, converted, Mode::Nl, valblk(), 0, Some(vec![9; 32]));
    assert!(matches!(down.error(), LockError::InvalidArgument(_)));
    assert_eq!(t.resource("r").lvb, vec![0; 32]);
    // valblk without bytes writes nothing and is no error.
    t.unlock_lvb(a, reader.lock_id, None);
    assert_eq!(t.resource("r").lvb, vec![0; 32]);
}

#[test]
fn lvb_is_written_by_a_down_conversion_from_pw_with_valblk() {
    let mut t = Table::new();
    let a = t.node("a");
    let writer = t.lock(a, "r", Mode::Pw).granted().lock_id;
    // Up to EX does not write: bytes there are refused; valblk alone reads.
    let up = t.convert_with(a, writer, Mode::Ex, valblk(), 0, Some(vec![1; 32]));
    assert!(matches!(up.error(), LockError::InvalidArgument(_)));
    let up = t.convert_with(a, writer, Mode::Ex, valblk(), 0, None);
    assert_eq!(up.granted().lvb, Some(vec![0; 32]));
    let down = t.convert_with(a, writer, Mode::Nl, valblk(), 0, Some(vec![3; 32]));
    assert_eq!(down.granted().lvb, Some(vec![3; 32]));
    // Without valblk LVB bytes are refused, not ignored.
    let again = t.convert(a, writer, Mode::Pw).granted().lock_id;
    let unflagged = t.convert_with(a, again, Mode::Nl, flags(), 0, Some(vec![4; 32]));
    assert!(matches!(unflagged.error(), LockError::InvalidArgument(_)));
    assert_eq!(t.resource("r").lvb, vec![3; 32]);
}

#[test]
fn lvb_is_invalid_after_mark_expired_holders_until_rewritten() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    t.state.mark_expired_holders(a);
    let noexp = Flags {
        noexp: true,
        valblk: true,
        ..flags()
    };
    let recovery = t.lock_with(b, "r", Mode::Ex, noexp, 0).granted();
    assert!(recovery.lvb_invalid);
    t.unlock_lvb(b, recovery.lock_id, Some(vec![5; 32]));
    let after = t.lock_with(b, "r", Mode::Nl, noexp, 0).granted();
    assert_eq!((after.lvb, after.lvb_invalid), (Some(vec![5; 32]), false));
}

#[test]
fn lvb_of_the_wrong_length_is_rejected_without_change() {
    let mut t = Table::new();
    let a = t.node("a");
    let writer = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let before = t.state.encode();
    let refused = t.unlock_lvb(a, writer, Some(vec![1; 31]));
    assert_eq!(
        refused.error().to_string(),
        "invalid argument: LVB of 31 bytes does not match the 32-byte LVBs of lockspace 'fs1'"
    );
    let refused = t.convert_with(a, writer, Mode::Nl, valblk(), 0, Some(vec![1; 40]));
    assert!(matches!(refused.error(), LockError::InvalidArgument(_)));
    assert_eq!(t.state.encode(), before);
    assert_eq!(t.granted_mode(writer), Some(Mode::Ex));
}

#[test]
fn lvb_is_returned_only_with_valblk() {
    let mut t = Table::new();
    let a = t.node("a");
    let plain = t.lock(a, "r", Mode::Ex).granted();
    assert_eq!((plain.lvb, plain.lvb_invalid), (None, false));
    t.state.mark_expired_holders(a);
    let noexp = Flags {
        noexp: true,
        ..flags()
    };
    let plain = t.lock_with(a, "r", Mode::Nl, noexp, 0).granted();
    assert_eq!((plain.lvb, plain.lvb_invalid), (None, false));
}

#[test]
fn resource_without_locks_is_freed_with_its_lvb() {
    let mut t = Table::new();
    let a = t.node("a");
    let writer = t.lock(a, "r", Mode::Ex).granted().lock_id;
    t.unlock_lvb(a, writer, Some(vec![8; 32]));
    assert_eq!(t.state.resource_view(LS, b"r"), None);
    let fresh = t.lock_with(a, "r", Mode::Ex, valblk(), 0).granted();
    assert_eq!(fresh.lvb, Some(vec![0; 32]));
}

// ---- timeouts ----

#[test]
fn tick_times_out_a_waiting_lock_at_its_deadline() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let waiter = t.lock_with(b, "r", Mode::Pr, flags(), 100);
    let lock = waiter.queued();
    assert_eq!(t.state.next_deadline_ms(), Some(1_100));
    assert!(t.tick(1_099).events.is_empty());
    let tick = t.tick(1_100);
    assert_eq!(tick.reply, Reply::Ok);
    assert_eq!(
        tick.finished(),
        vec![(waiter.request_id, Err(LockError::Timeout))]
    );
    assert_eq!(t.state.lock_view(lock), None);
    assert_eq!(t.state.waiting_count(), 0);
    assert_eq!(t.state.next_deadline_ms(), None);
}

#[test]
fn tick_times_out_a_conversion_which_keeps_its_granted_mode() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    t.lock(b, "r", Mode::Pr).granted();
    let conversion = t.convert_with(a, la, Mode::Ex, flags(), 50, None);
    conversion.queued();
    let tick = t.tick(2_000);
    assert_eq!(
        tick.finished(),
        vec![(conversion.request_id, Err(LockError::Timeout))]
    );
    assert_eq!(
        (t.granted_mode(la), t.requested_mode(la)),
        (Some(Mode::Pr), None)
    );
}

#[test]
fn tick_grants_waiters_behind_a_timed_out_request() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    t.lock(a, "r", Mode::Pr).granted();
    t.lock_with(b, "r", Mode::Ex, flags(), 10).queued();
    let reader = t.lock(c, "r", Mode::Pr);
    reader.queued();
    let tick = t.tick(1_010);
    let finished = tick.finished();
    assert_eq!(finished.len(), 2);
    assert_eq!(finished[1].0, reader.request_id);
    assert_eq!(finished[1].1.as_ref().unwrap().mode, Mode::Pr);
}

#[test]
fn next_deadline_is_the_earliest_waiting_deadline() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    t.lock(a, "r", Mode::Ex).granted();
    t.lock_with(b, "r", Mode::Ex, flags(), 500).queued();
    let sooner = t.lock_with(c, "r", Mode::Ex, flags(), 200);
    sooner.queued();
    t.lock(c, "r", Mode::Ex).queued(); // no deadline
    assert_eq!(t.state.next_deadline_ms(), Some(1_200));
    t.cancel(c, sooner.request_id);
    assert_eq!(t.state.next_deadline_ms(), Some(1_500));
}

// ---- cancel ----

#[test]
fn cancel_removes_a_waiting_lock() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let waiter = t.lock(b, "r", Mode::Pr);
    let lock = waiter.queued();
    let cancel = t.cancel(b, waiter.request_id);
    assert_eq!(cancel.reply, Reply::Cancelled { cancelled: true });
    assert_eq!(
        cancel.finished(),
        vec![(waiter.request_id, Err(LockError::Cancelled))]
    );
    assert_eq!(t.state.lock_view(lock), None);
    assert!(t.resource("r").waiting.is_empty());
}

#[test]
fn cancel_drops_a_pending_conversion_and_keeps_the_lock() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    t.lock(b, "r", Mode::Pr).granted();
    let conversion = t.convert(a, la, Mode::Ex);
    conversion.queued();
    let cancel = t.cancel(a, conversion.request_id);
    assert_eq!(cancel.reply, Reply::Cancelled { cancelled: true });
    assert_eq!(
        cancel.finished(),
        vec![(conversion.request_id, Err(LockError::Cancelled))]
    );
    assert_eq!(
        (t.granted_mode(la), t.requested_mode(la)),
        (Some(Mode::Pr), None)
    );
}

#[test]
fn cancel_of_a_request_that_is_not_waiting_reports_false() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let granted = t.lock(a, "r", Mode::Ex);
    granted.granted();
    assert_eq!(
        t.cancel(a, granted.request_id).reply,
        Reply::Cancelled { cancelled: false }
    );
    assert_eq!(
        t.cancel(a, 12_345).reply,
        Reply::Cancelled { cancelled: false }
    );
    // Another session's waiting request is not this session's to cancel.
    let waiter = t.lock(b, "r", Mode::Ex);
    waiter.queued();
    let other = t.cancel(a, waiter.request_id);
    assert_eq!(other.reply, Reply::Cancelled { cancelled: false });
    assert_eq!(t.state.waiting_count(), 1);
}

#[test]
fn cancel_lets_a_waiter_behind_it_through() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    t.lock(a, "r", Mode::Pr).granted();
    let writer = t.lock(b, "r", Mode::Ex);
    writer.queued();
    let reader = t.lock(c, "r", Mode::Pr);
    let lc = reader.queued();
    let cancel = t.cancel(b, writer.request_id);
    assert_eq!(cancel.finished()[1].0, reader.request_id);
    assert_eq!(t.granted_mode(lc), Some(Mode::Pr));
}

// ---- unlock ----

#[test]
fn unlock_of_a_waiting_lock_cancels_it() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    t.lock(a, "r", Mode::Ex).granted();
    let waiter = t.lock(b, "r", Mode::Pr);
    let lock = waiter.queued();
    let unlock = t.unlock(b, lock);
    assert_eq!(unlock.reply, Reply::Ok);
    assert_eq!(
        unlock.finished(),
        vec![(waiter.request_id, Err(LockError::Cancelled))]
    );
    assert_eq!(t.state.lock_view(lock), None);
}

#[test]
fn unlock_with_a_pending_conversion_finishes_it_cancelled_first() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    t.lock(b, "r", Mode::Pr).granted();
    let waiter = t.lock(b, "r", Mode::Ex);
    waiter.queued();
    let conversion = t.convert(a, la, Mode::Ex);
    conversion.queued();
    let unlock = t.unlock(a, la);
    assert_eq!(
        unlock.finished(),
        vec![(conversion.request_id, Err(LockError::Cancelled))]
    );
    assert_eq!(t.state.lock_view(la), None);
}

#[test]
fn double_unlock_is_an_unknown_lock() {
    let mut t = Table::new();
    let a = t.node("a");
    let lock = t.lock(a, "r", Mode::Ex).granted().lock_id;
    assert_eq!(t.unlock(a, lock).reply, Reply::Ok);
    let again = t.unlock(a, lock);
    assert_eq!(again.error(), LockError::UnknownLock(lock));
    assert_eq!(again.error().to_string(), format!("unknown lock id {lock}"));
}

#[test]
fn unlock_of_another_sessions_lock_is_an_unknown_lock() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let lock = t.lock(a, "r", Mode::Ex).granted().lock_id;
    assert_eq!(t.unlock(b, lock).error(), LockError::UnknownLock(lock));
    assert_eq!(t.granted_mode(lock), Some(Mode::Ex));
}

// ---- applied once ----

#[test]
fn unlock_retry_with_the_same_request_id_gets_the_recorded_ok() {
    let mut t = Table::new();
    let a = t.node("a");
    let lock = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let unlock = Command::Unlock {
        session: a,
        request_id: 50,
        ack_below: 0,
        lock_id: lock,
        lvb: None,
    };
    assert_eq!(t.apply(unlock.clone()).0, Reply::Ok);
    assert_eq!(t.apply(unlock).0, Reply::Ok);
}

#[test]
fn lock_retry_is_applied_once() {
    let mut t = Table::new();
    let a = t.node("a");
    let cmd = lock_cmd(a, 50, "r", Mode::Ex, flags(), 0);
    let first = t.apply(cmd.clone());
    let state_after_first = (t.state.held_lock_count(), t.state.last_token());
    let retry = t.apply(cmd);
    assert_eq!(retry, first);
    assert_eq!(
        (t.state.held_lock_count(), t.state.last_token()),
        state_after_first
    );
}

#[test]
fn queued_lock_retry_gets_queued_then_the_recorded_grant() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let held = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let cmd = lock_cmd(b, 50, "r", Mode::Pr, flags(), 0);
    let (queued, _) = t.apply(cmd.clone());
    assert!(matches!(queued, Reply::Queued { .. }));
    assert_eq!(t.apply(cmd.clone()), (queued, vec![]));
    assert_eq!(t.state.waiting_count(), 1);
    let released = t.unlock(a, held);
    let grant = released.finished()[0].1.clone().unwrap();
    assert_eq!(t.apply(cmd), (Reply::Granted(grant), vec![]));
    assert_eq!(t.state.locks_of_session(b).len(), 1);
}

#[test]
fn convert_retry_is_applied_once() {
    let mut t = Table::new();
    let a = t.node("a");
    let lock = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let cmd = Command::Convert {
        session: a,
        request_id: 50,
        ack_below: 0,
        lock_id: lock,
        mode: Mode::Ex,
        flags: flags(),
        timeout_ms: 0,
        lvb: None,
    };
    let first = t.apply(cmd.clone());
    let token = t.state.last_token();
    assert_eq!(t.apply(cmd), first);
    assert_eq!(t.state.last_token(), token);
}

#[test]
fn ack_below_prunes_finished_records() {
    let mut t = Table::new();
    let a = t.node("a"); // used request id 1
    for request_id in 2..=4 {
        let res = format!("r{request_id}");
        t.apply(lock_cmd(a, request_id, &res, Mode::Ex, flags(), 0));
    }
    let mut cmd = lock_cmd(a, 5, "r5", Mode::Ex, flags(), 0);
    if let Command::Lock { ack_below, .. } = &mut cmd {
        *ack_below = 4;
    }
    t.apply(cmd);
    let retried_4 = t.apply(lock_cmd(a, 4, "r4", Mode::Ex, flags(), 0)).0;
    assert!(
        matches!(retried_4, Reply::Granted(_)),
        "4 was not acknowledged"
    );
    let retried_3 = t.apply(lock_cmd(a, 3, "r3", Mode::Ex, flags(), 0)).0;
    assert_eq!(
        retried_3,
        Reply::Failed(LockError::InvalidArgument(format!(
            "stale request id 3: session {a} acknowledged every request below 4"
        )))
    );
    assert_eq!(t.state.held_lock_count(), 4);
}

#[test]
fn ack_below_above_the_requests_own_id_is_refused() {
    let mut t = Table::new();
    let a = t.node("a");
    let mut cmd = lock_cmd(a, 5, "r", Mode::Ex, flags(), 0);
    if let Command::Lock { ack_below, .. } = &mut cmd {
        *ack_below = 6;
    }
    let (reply, _) = t.apply(cmd);
    assert!(
        matches!(reply, Reply::Failed(LockError::InvalidArgument(m)) if m.contains("ack_below 6"))
    );
}

#[test]
fn request_records_are_capped_and_the_evicted_become_stale() {
    let mut t = Table::new();
    t.checks = false;
    let a = t.node("a"); // request id 1
    let last = MAX_REQUEST_RECORDS_PER_SESSION as u64 + 2;
    for request_id in 2..=last {
        let cancel = Command::Cancel {
            session: a,
            request_id,
            ack_below: 0,
            target: 1_000_000,
        };
        assert_eq!(t.apply(cancel).0, Reply::Cancelled { cancelled: false });
    }
    t.check();
    let retry = |request_id| Command::Cancel {
        session: a,
        request_id,
        ack_below: 0,
        target: 1_000_000,
    };
    assert!(matches!(
        t.apply(retry(2)).0,
        Reply::Failed(LockError::InvalidArgument(m)) if m.starts_with("stale request id 2")
    ));
    assert_eq!(t.apply(retry(3)).0, Reply::Cancelled { cancelled: false });
}

// ---- tokens ----

#[test]
fn tokens_strictly_grow_with_every_grant() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let mut tokens = vec![];
    let la = t.lock(a, "r", Mode::Pr).granted();
    tokens.push(la.token);
    tokens.push(t.convert(a, la.lock_id, Mode::Ex).granted().token);
    tokens.push(t.lock(b, "other", Mode::Ex).granted().token);
    t.lock(b, "r", Mode::Pr).queued();
    let down = t.convert(a, la.lock_id, Mode::Nl);
    tokens.push(down.granted().token);
    tokens.push(down.finished()[0].1.as_ref().unwrap().token);
    assert!(tokens.windows(2).all(|w| w[0] < w[1]), "{tokens:?}");
    assert_eq!(t.state.last_token(), *tokens.last().unwrap());
}

#[test]
fn check_token_reports_current_holders() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let first = t.lock(a, "r", Mode::Pr).granted();
    let second = t.lock(b, "r", Mode::Pr).granted();
    assert_eq!(
        t.state.check_token(LS, b"r", first.token),
        (true, second.token)
    );
    assert_eq!(t.state.check_token(LS, b"r", 999), (false, second.token));
    t.unlock(a, first.lock_id);
    assert_eq!(
        t.state.check_token(LS, b"r", first.token),
        (false, second.token)
    );
    assert_eq!(t.state.check_token(LS, b"nothing", 1), (false, 0));
    assert_eq!(t.state.check_token("nols", b"r", 1), (false, 0));
}

// ---- blocking callbacks ----

#[test]
fn holder_is_told_once_per_requested_mode_per_grant() {
    let mut t = Table::new();
    let (a, b, c, d) = (t.node("a"), t.node("b"), t.node("c"), t.node("d"));
    let held = t.lock(a, "r", Mode::Ex).granted().lock_id;
    assert_eq!(t.lock(b, "r", Mode::Pr).blocking(), vec![(held, Mode::Pr)]);
    assert_eq!(t.lock(c, "r", Mode::Pr).blocking(), vec![]);
    assert_eq!(t.lock(d, "r", Mode::Ex).blocking(), vec![(held, Mode::Ex)]);
    match &t.lock(d, "r", Mode::Ex).events[..] {
        [] => {}
        other => panic!("no second EX callback expected, got {other:?}"),
    }
}

#[test]
fn blocking_callback_names_holder_resource_and_requested_mode() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let held = t.lock(a, "r", Mode::Pw).granted().lock_id;
    let waiter = t.lock(b, "r", Mode::Cw);
    assert_eq!(
        waiter.events,
        vec![Event::Blocking {
            session: a,
            lock_id: held,
            lockspace: LS.into(),
            resource: b"r".to_vec(),
            requested: Mode::Cw
        }]
    );
}

#[test]
fn holder_is_told_again_after_its_mode_is_converted() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let held = t.lock(a, "r", Mode::Ex).granted().lock_id;
    t.lock(b, "r", Mode::Pr).queued();
    let down = t.convert(a, held, Mode::Pw);
    down.granted();
    assert_eq!(
        down.blocking(),
        vec![(held, Mode::Pr)],
        "PW still blocks PR"
    );
}

#[test]
fn newly_granted_holder_is_told_about_the_waiters_it_blocks() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let first = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let reader = t.lock(b, "r", Mode::Pr).queued();
    t.lock(c, "r", Mode::Ex).queued();
    let released = t.unlock(a, first);
    assert_eq!(released.finished().len(), 1);
    assert_eq!(released.blocking(), vec![(reader, Mode::Ex)]);
}

#[test]
fn holder_is_not_told_about_its_own_conversion() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.node("b"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    let lb = t.lock(b, "r", Mode::Pr).granted().lock_id;
    assert_eq!(t.convert(a, la, Mode::Ex).blocking(), vec![(lb, Mode::Ex)]);
}

// ---- snapshots ----

#[test]
fn encode_decode_round_trip_preserves_behaviour() {
    let mut t = Table::new();
    let (a, b, c) = (t.node("a"), t.node("b"), t.node("c"));
    let la = t.lock(a, "r", Mode::Pr).granted().lock_id;
    t.lock(b, "r", Mode::Pr).granted();
    t.convert_with(a, la, Mode::Ex, valblk(), 300, None)
        .queued();
    t.lock_with(c, "r", Mode::Cw, valblk(), 100).queued();
    let lx = t.lock(c, "x", Mode::Ex).granted().lock_id;
    t.unlock_lvb(c, lx, Some(vec![6; 32]));
    t.lock(b, "y", Mode::Pw).granted();
    t.state.mark_expired_holders(b);

    let mut copy = Table::new();
    copy.state = State::decode(&t.state.encode()).unwrap();
    copy.index = t.index;
    copy.next_request = t.next_request.clone();
    assert_eq!(copy.state.encode(), t.state.encode());
    assert_eq!(copy.state.next_deadline_ms(), Some(1_100));
    assert_eq!(
        (copy.state.held_lock_count(), copy.state.waiting_count()),
        (t.state.held_lock_count(), t.state.waiting_count())
    );
    let script = |t: &mut Table| {
        let mut out = vec![t.tick(1_150).events];
        out.push(t.lock(a, "x", Mode::Pr).events);
        out.push(t.unlock(b, la + 1).events);
        out.push(
            t.lock_with(
                c,
                "y",
                Mode::Pr,
                Flags {
                    noexp: true,
                    valblk: true,
                    ..flags()
                },
                0,
            )
            .events,
        );
        out.push(t.tick(1_400).events);
        out
    };
    let original = script(&mut t);
    assert_eq!(script(&mut copy), original);
    assert_eq!(copy.state.encode(), t.state.encode());
    assert!(original.iter().flatten().count() > 0);
}

#[test]
fn decode_refuses_garbage_and_inconsistent_snapshots() {
    assert!(State::decode(&[]).is_err());
    assert!(State::decode(&[0xff; 7]).is_err());
    let mut t = Table::new();
    let a = t.node("a");
    t.lock(a, "r", Mode::Ex).granted();
    let mut bytes = t.state.encode();
    bytes.push(0);
    assert!(State::decode(&bytes).unwrap_err().contains("trailing"));

    let core: Core = postcard::from_bytes(&t.state.encode()).unwrap();
    let mut orphaned = core.clone();
    orphaned.sessions.clear();
    let bytes = postcard::to_allocvec(&orphaned).unwrap();
    assert!(State::decode(&bytes).unwrap_err().contains("inconsistent"));
    let mut tokenless = core;
    tokenless.last_token = 0;
    let bytes = postcard::to_allocvec(&tokenless).unwrap();
    assert!(State::decode(&bytes).is_err());
}

#[test]
fn decode_refuses_twin_resource_names_and_stray_lvbs() {
    let mut t = Table::new();
    let a = t.node("a");
    t.lock(a, "r", Mode::Ex).granted();
    t.lock(a, "s", Mode::Ex).granted();
    let core: Core = postcard::from_bytes(&t.state.encode()).unwrap();
    let ids: Vec<u64> = core.resources.iter().map(|(&id, _)| id).collect();

    let mut twins = core.clone();
    let first = twins.resources.get(&ids[0]).unwrap().name.clone();
    twins.resources.get_mut(&ids[1]).unwrap().name = first;
    let bytes = postcard::to_allocvec(&twins).unwrap();
    assert!(State::decode(&bytes).unwrap_err().contains("inconsistent"));

    let mut stray = core.clone();
    stray.lvbs.insert(ids[1] + 100, vec![1; 32].into());
    let bytes = postcard::to_allocvec(&stray).unwrap();
    assert!(State::decode(&bytes).unwrap_err().contains("LVB"));

    let mut short = core;
    short.lvbs.insert(ids[0], vec![1; 8].into());
    let bytes = postcard::to_allocvec(&short).unwrap();
    assert!(State::decode(&bytes).unwrap_err().contains("LVB"));
}

#[test]
fn tokens_survive_encode_decode() {
    let mut t = Table::new();
    let a = t.node("a");
    let before = t.lock(a, "r", Mode::Ex).granted().token;
    t.state = State::decode(&t.state.encode()).unwrap();
    assert_eq!(t.state.last_token(), before);
    assert!(t.lock(a, "s", Mode::Ex).granted().token > before);
}

// ---- bad input ----

#[test]
fn bad_inputs_get_precise_errors_and_change_nothing() {
    let mut t = Table::new();
    let (a, b) = (t.node("a"), t.login("b"));
    let held = t.lock(a, "r", Mode::Ex).granted().lock_id;
    let waiting = t.lock(a, "r", Mode::Pr).queued();
    // Acknowledge everything below 10.
    let mut cmd = lock_cmd(a, 10, "s", Mode::Ex, flags(), 0);
    if let Command::Lock { ack_below, .. } = &mut cmd {
        *ack_below = 10;
    }
    t.apply(cmd);

    let long = "x".repeat(65);
    let open = |session, name: &str, lvb_len_bytes| Command::OpenLockspace {
        session,
        request_id: 100,
        name: name.into(),
        lvb_len_bytes,
        recovery: RecoveryMode::Auto,
    };
    let lock = |session, request_id, lockspace: &str, resource: &[u8]| Command::Lock {
        session,
        request_id,
        ack_below: 0,
        lockspace: lockspace.into(),
        resource: resource.to_vec(),
        mode: Mode::Ex,
        flags: flags(),
        timeout_ms: 0,
    };
    let convert = |session, lock_id, lvb| Command::Convert {
        session,
        request_id: 100,
        ack_below: 0,
        lock_id,
        mode: Mode::Nl,
        flags: valblk(),
        timeout_ms: 0,
        lvb,
    };
    let unlock = |session, lock_id, lvb| Command::Unlock {
        session,
        request_id: 100,
        ack_below: 0,
        lock_id,
        lvb,
    };
    let cases: Vec<(Command, LockError, &str)> = vec![
        (
            Command::Login { node: String::new(), nonce: 1 },
            LockError::InvalidArgument("node name must be 1 to 64 bytes, got 0".into()),
            "invalid argument: node name must be 1 to 64 bytes, got 0",
        ),
        (
            Command::Login { node: long.clone(), nonce: 1 },
            LockError::InvalidArgument("node name must be 1 to 64 bytes, got 65".into()),
            "invalid argument: node name must be 1 to 64 bytes, got 65",
        ),
        (
            Command::Logout { session: 999, request_id: 1 },
            LockError::UnknownSession(999),
            "unknown session 999",
        ),
        (open(999, LS, 0), LockError::UnknownSession(999), "unknown session 999"),
        (
            open(b, &long, 0),
            LockError::InvalidArgument("lockspace name must be 1 to 64 bytes, got 65".into()),
            "invalid argument: lockspace name must be 1 to 64 bytes, got 65",
        ),
        (
            open(b, "other", 12),
            LockError::InvalidArgument(
                "LVB length 12 bytes must be a multiple of 8 from 8 to 64 (or 0 for 32)".into(),
            ),
            "invalid argument: LVB length 12 bytes must be a multiple of 8 from 8 to 64 (or 0 for 32)",
        ),
        (
            open(b, "other", 72),
            LockError::InvalidArgument(
                "LVB length 72 bytes must be a multiple of 8 from 8 to 64 (or 0 for 32)".into(),
            ),
            "invalid argument: LVB length 72 bytes must be a multiple of 8 from 8 to 64 (or 0 for 32)",
        ),
        (
            open(b, LS, 64),
            LockError::LockspaceMismatch {
                name: LS.into(),
                lvb_len_bytes: 32,
                recovery: RecoveryMode::Auto,
            },
            "lockspace 'fs1' already exists with LVB length 32 bytes and recovery auto",
        ),
        (lock(999, 100, LS, b"r"), LockError::UnknownSession(999), "unknown session 999"),
        (
            lock(a, 100, "nols", b"r"),
            LockError::UnknownLockspace("nols".into()),
            "unknown lockspace 'nols'",
        ),
        (
            lock(b, 100, LS, b"r"),
            LockError::LockspaceNotOpened(LS.into()),
            "lockspace 'fs1' was not opened by this session",
        ),
        (
            lock(a, 100, LS, b""),
            LockError::InvalidArgument("resource name must be 1 to 64 bytes, got 0".into()),
            "invalid argument: resource name must be 1 to 64 bytes, got 0",
        ),
        (
            lock(a, 100, LS, long.as_bytes()),
            LockError::InvalidArgument("resource name must be 1 to 64 bytes, got 65".into()),
            "invalid argument: resource name must be 1 to 64 bytes, got 65",
        ),
        (
            lock(a, 9, LS, b"r"),
            LockError::InvalidArgument(format!(
                "stale request id 9: session {a} acknowledged every request below 10"
            )),
            "invalid argument: stale request id 9",
        ),
        (convert(a, 4242, None), LockError::UnknownLock(4242), "unknown lock id 4242"),
        (convert(b, held, None), LockError::UnknownLock(held), "unknown lock id"),
        (
            convert(a, waiting, None),
            LockError::NotGranted(waiting),
            "is not granted, is an expired holder, or already has a conversion pending",
        ),
        (
            convert(a, held, Some(vec![0; 8])),
            LockError::InvalidArgument(
                "LVB of 8 bytes does not match the 32-byte LVBs of lockspace 'fs1'".into(),
            ),
            "invalid argument: LVB of 8 bytes",
        ),
        (unlock(a, 4242, None), LockError::UnknownLock(4242), "unknown lock id 4242"),
        (unlock(b, held, None), LockError::UnknownLock(held), "unknown lock id"),
        (
            unlock(a, held, Some(vec![])),
            LockError::InvalidArgument(
                "LVB of 0 bytes does not match the 32-byte LVBs of lockspace 'fs1'".into(),
            ),
            "invalid argument: LVB of 0 bytes",
        ),
        (
            Command::Cancel { session: 999, request_id: 100, ack_below: 0, target: 1 },
            LockError::UnknownSession(999),
            "unknown session 999",
        ),
    ];
    for (cmd, error, message) in cases {
        let before = t.state.encode();
        let (reply, events) = t.apply(cmd.clone());
        assert_eq!(reply, Reply::Failed(error.clone()), "{cmd:?}");
        assert!(error.to_string().contains(message), "{error} vs {message}");
        assert!(events.is_empty(), "{cmd:?}");
        assert_eq!(t.state.encode(), before, "{cmd:?} changed the table");
    }
}

#[test]
fn commands_of_one_entry_get_increasing_ids_and_later_entries_continue_above() {
    let mut t = Table::new();
    let a = t.node("a");
    let entry = t.index + 1;
    let granted = |reply: Reply| match reply {
        Reply::Granted(info) => info.lock_id,
        other => panic!("expected a grant, got {other:?}"),
    };
    let lock = |state: &mut State, request_id, res: &str| {
        let cmd = lock_cmd(a, request_id, res, Mode::Ex, flags(), 0);
        granted(state.apply(entry, 0, cmd).0)
    };
    // Three commands in the entry at `entry`; the second is refused (an unknown
    // lockspace) and issues nothing.
    let first = lock(&mut t.state, 50, "r1");
    let mut bad = lock_cmd(a, 51, "r2", Mode::Ex, flags(), 0);
    if let Command::Lock { lockspace, .. } = &mut bad {
        *lockspace = "nope".into();
    }
    assert!(matches!(t.state.apply(entry, 0, bad).0, Reply::Failed(_)));
    let third = lock(&mut t.state, 52, "r3");
    assert_eq!((first, third), (entry, entry + 1));
    // The next entry's index is taken by the batch: its command continues above.
    t.index = entry;
    let next = t.apply(lock_cmd(a, 53, "r4", Mode::Ex, flags(), 0));
    assert_eq!(granted(next.0), entry + 2);
    // An index far above every id is used as it is (a log of one command per entry).
    t.index = entry + 100;
    let far = t.apply(lock_cmd(a, 54, "r5", Mode::Ex, flags(), 0));
    assert_eq!(granted(far.0), entry + 101);
    let encoded = t.state.encode();
    assert_eq!(State::decode(&encoded).unwrap().encode(), encoded);
}

#[test]
fn a_table_with_every_id_spent_refuses_commands_and_changes_nothing() {
    let mut t = Table::new();
    let a = t.node("a");
    t.state.core.last_id = u64::MAX;
    let before = t.state.encode();
    for cmd in [lock_cmd(a, 50, "r", Mode::Ex, flags(), 0), Command::Tick] {
        let (reply, events) = t.state.apply(u64::MAX, t.now_ms, cmd);
        assert!(
            matches!(&reply, Reply::Failed(LockError::Limit(m)) if m.contains("no id left")),
            "{reply:?}"
        );
        assert!(events.is_empty());
    }
    assert_eq!(t.state.encode(), before);
}

// ---- limits ----

#[test]
fn sessions_are_limited() {
    let mut t = Table::new();
    t.checks = false;
    for n in 0..MAX_SESSIONS {
        t.login(&format!("n{n}"));
    }
    let before = t.state.encode();
    let (reply, _) = t.apply(Command::Login {
        node: "one-too-many".into(),
        nonce: 1,
    });
    assert_eq!(
        reply,
        Reply::Failed(LockError::Limit("4096 sessions are logged in".into()))
    );
    assert_eq!(t.state.encode(), before);
}

#[test]
fn lockspaces_are_limited() {
    let mut t = Table::new();
    t.checks = false;
    let a = t.login("a");
    for n in 0..MAX_LOCKSPACES {
        t.open(a, &format!("ls{n}"), 0);
    }
    assert_eq!(
        t.open(a, "one-too-many", 0),
        Reply::Failed(LockError::Limit("4096 lockspaces are open".into()))
    );
    assert_eq!(t.state.lockspace_count(), MAX_LOCKSPACES);
}

/// Issue 12: a lockspace nobody has open and with nothing left in it is closed when
/// its last opener leaves, so a client that opened the maximum and logged out does not
/// make every later new lockspace fail for good (across snapshots too). One still in
/// use — opened by a live node, or holding a fenced node's expired holder awaiting
/// recovery — stays.
#[test]
fn lockspaces_are_closed_when_their_last_opener_leaves() {
    let mut t = Table::new();
    t.checks = false;
    let a = t.login("a");
    for n in 0..MAX_LOCKSPACES {
        t.open(a, &format!("ls{n}"), 0);
    }
    let b = t.login("b");
    t.open(b, "ls7", 0);
    let request_id = t.request_id(a);
    t.apply(Command::Logout {
        session: a,
        request_id,
    });
    t.check();
    assert_eq!(t.state.lockspace_count(), 1, "ls7 stays: b has it open");
    t.state = State::decode(&t.state.encode()).expect("closed slots survive a snapshot");
    let c = t.login("c");
    for n in 0..MAX_LOCKSPACES - 1 {
        assert!(
            matches!(
                t.open(c, &format!("new{n}"), 0),
                Reply::LockspaceOpened { .. }
            ),
            "new{n}"
        );
    }
    assert!(matches!(
        t.open(c, "one-too-many", 0),
        Reply::Failed(LockError::Limit(_))
    ));
    assert!(
        matches!(t.open(c, "ls7", 0), Reply::LockspaceOpened { .. }),
        "an open lockspace is joined, not created"
    );
    t.check();

    // An explicit lockspace whose only opener was fenced keeps its expired holder
    // (recovery pending) and so stays open.
    let mut t = Table::new();
    let d = t.login("d");
    assert!(matches!(
        t.apply(Command::OpenLockspace {
            session: d,
            request_id: 1,
            name: "gfs".into(),
            lvb_len_bytes: 0,
            recovery: RecoveryMode::Explicit,
        })
        .0,
        Reply::LockspaceOpened { .. }
    ));
    let mut lock = lock_cmd(d, 2, "inode", Mode::Ex, flags(), 0);
    if let Command::Lock { lockspace, .. } = &mut lock {
        *lockspace = "gfs".into();
    }
    assert!(matches!(t.apply(lock).0, Reply::Granted(_)));
    t.apply(Command::Expire { session: d });
    t.apply(Command::FenceStart { session: d });
    t.apply(Command::FenceAck {
        node: "d".into(),
        by: "op".into(),
    });
    assert_eq!(t.state.lockspace_count(), 1, "gfs awaits recovery");
    let e = t.login("e");
    let (reply, events) = t.apply(Command::OpenLockspace {
        session: e,
        request_id: 1,
        name: "gfs".into(),
        lvb_len_bytes: 0,
        recovery: RecoveryMode::Explicit,
    });
    assert!(matches!(reply, Reply::LockspaceOpened { .. }));
    assert_eq!(events.len(), 1, "told to recover d: {events:?}");
    t.apply(Command::RecoveryDone {
        session: e,
        request_id: 2,
        lockspace: "gfs".into(),
        node: "d".into(),
    });
    t.apply(Command::Logout {
        session: e,
        request_id: 3,
    });
    assert_eq!(t.state.lockspace_count(), 0, "recovered and left: closed");
}

#[test]
fn waiters_per_resource_are_limited() {
    let mut t = Table::new();
    t.checks = false;
    let a = t.node("a");
    t.lock(a, "r", Mode::Ex).granted();
    for _ in 0..MAX_WAITERS_PER_RESOURCE {
        t.lock(a, "r", Mode::Ex).queued();
    }
    let before = t.state.encode();
    let refused = t.lock(a, "r", Mode::Ex);
    assert_eq!(
        refused.error(),
        LockError::Limit("resource 'r' in lockspace 'fs1' has 65536 waiting requests".into())
    );
    assert_eq!(t.state.encode(), before);
    // A request that needs no queue still gets through.
    t.lock(a, "r", Mode::Nl).granted();
    t.check();
}

// ---- memory ----

#[test]
fn per_lock_records_stay_small() {
    use super::model::{Lock, Resource};
    use std::mem::size_of;
    // BRIEF §4.1 W4 aims at under 200 bytes per held lock: a lock refers to its resource
    // by id, its waiting request is boxed, and a resource boxes its queues.
    assert!(
        size_of::<Lock>() <= 40,
        "Lock is {} bytes",
        size_of::<Lock>()
    );
    assert!(
        size_of::<Resource>() <= 72,
        "Resource is {} bytes",
        size_of::<Resource>()
    );
}

// ---- liveness: expiry, failover, reconnect (BRIEF §3.3) ----

mod liveness {
    use super::super::*;

    fn login(state: &mut State, index: u64, node: &str) -> SessionId {
        match state
            .apply(
                index,
                0,
                Command::Login {
                    node: node.into(),
                    nonce: index,
                },
            )
            .0
        {
            Reply::LoggedIn { session } => session,
            other => panic!("login failed: {other:?}"),
        }
    }

    fn open(state: &mut State, index: u64, session: SessionId) {
        let cmd = Command::OpenLockspace {
            session,
            request_id: 1,
            name: "fs".into(),
            lvb_len_bytes: 0,
            recovery: RecoveryMode::Auto,
        };
        assert_eq!(
            state.apply(index, 0, cmd).0,
            Reply::LockspaceOpened {
                lvb_len_bytes: 32,
                recovery: RecoveryMode::Auto
            }
        );
    }

    fn lock(session: SessionId, request_id: RequestId, mode: Mode) -> Command {
        Command::Lock {
            session,
            request_id,
            ack_below: 0,
            lockspace: "fs".into(),
            resource: b"r".to_vec(),
            mode,
            flags: Flags::default(),
            timeout_ms: 0,
        }
    }

    /// a holds EX on r; b waits for PR on r.
    fn holder_and_waiter() -> (State, SessionId, SessionId) {
        let mut s = State::new();
        let a = login(&mut s, 1, "a");
        let b = login(&mut s, 2, "b");
        open(&mut s, 3, a);
        open(&mut s, 4, b);
        assert!(matches!(
            s.apply(5, 0, lock(a, 2, Mode::Ex)).0,
            Reply::Granted(_)
        ));
        assert!(matches!(
            s.apply(6, 0, lock(b, 2, Mode::Pr)).0,
            Reply::Queued { .. }
        ));
        (s, a, b)
    }

    #[test]
    fn expiry_keeps_granted_locks_held_and_fails_waiting_requests() {
        let (mut s, a, b) = holder_and_waiter();
        // a also waits on another resource; expiry must fail that request.
        let mut other = lock(b, 3, Mode::Ex);
        if let Command::Lock { resource, .. } = &mut other {
            *resource = b"q".to_vec();
        }
        assert!(matches!(s.apply(7, 0, other).0, Reply::Granted(_)));
        let mut wait_q = lock(a, 3, Mode::Ex);
        if let Command::Lock { resource, .. } = &mut wait_q {
            *resource = b"q".to_vec();
        }
        assert!(matches!(s.apply(8, 0, wait_q).0, Reply::Queued { .. }));

        let (reply, events) = s.apply(9, 1_234, Command::Expire { session: a });
        assert_eq!(reply, Reply::Ok);
        assert!(events.contains(&Event::Finished {
            session: a,
            request_id: 3,
            result: Err(LockError::SessionExpired(a)),
        }));
        assert!(events.contains(&Event::SessionExpired { session: a }));
        assert_eq!(s.session_state(a), Some(NodeState::Expired));
        assert_eq!(s.held_lock_count(), 2, "a's EX and b's EX on q stay held");
        assert_eq!(
            s.waiting_count(),
            1,
            "b still waits behind the expired holder"
        );
        let info = s.sessions().find(|i| i.session == a).unwrap();
        assert_eq!((info.expired_at_ms, info.held_locks), (1_234, 1));
        assert_eq!(s.live_sessions().collect::<Vec<_>>(), vec![b]);
    }

    #[test]
    fn an_expired_session_can_do_nothing_and_its_node_cannot_log_in() {
        let (mut s, a, _) = holder_and_waiter();
        s.apply(7, 0, Command::Expire { session: a });
        let before = s.encode();
        let refused = [
            Command::Logout {
                session: a,
                request_id: 9,
            },
            lock(a, 9, Mode::Nl),
            Command::Unlock {
                session: a,
                request_id: 9,
                ack_below: 0,
                lock_id: 5,
                lvb: None,
            },
            Command::Cancel {
                session: a,
                request_id: 9,
                ack_below: 0,
                target: 2,
            },
        ];
        for (i, cmd) in refused.into_iter().enumerate() {
            let (reply, events) = s.apply(8 + i as u64, 0, cmd);
            let state = NodeState::Expired;
            assert_eq!(
                reply,
                Reply::Failed(LockError::SessionNotLive { session: a, state })
            );
            assert!(events.is_empty());
        }
        let (reply, _) = s.apply(
            20,
            0,
            Command::Login {
                node: "a".into(),
                nonce: 1,
            },
        );
        assert_eq!(
            reply,
            Reply::Failed(LockError::NodeExpired {
                node: "a".into(),
                session: a
            })
        );
        assert!(LockError::NodeExpired {
            node: "a".into(),
            session: a
        }
        .to_string()
        .contains("fenced"));
        assert_eq!(s.encode(), before, "refusals changed nothing");
    }

    #[test]
    fn failover_marks_logged_in_sessions_and_a_heartbeat_reconnects_them() {
        let (mut s, a, b) = holder_and_waiter();
        s.apply(7, 0, Command::Expire { session: b });
        s.apply(8, 0, Command::Failover);
        assert_eq!(s.session_state(a), Some(NodeState::WasLoggedIn));
        assert_eq!(
            s.session_state(b),
            Some(NodeState::Expired),
            "expired stays expired"
        );
        // A WasLoggedIn session keeps its locks and may go on working.
        assert_eq!(s.held_lock_count(), 1);
        s.apply(9, 0, Command::Reconnect { session: a });
        assert_eq!(s.session_state(a), Some(NodeState::LoggedIn));
        s.apply(10, 0, Command::Reconnect { session: b });
        assert_eq!(
            s.session_state(b),
            Some(NodeState::Expired),
            "reconnect cannot revive"
        );
    }

    #[test]
    fn liveness_states_survive_a_snapshot() {
        let (mut s, a, b) = holder_and_waiter();
        s.apply(7, 55, Command::Expire { session: a });
        s.apply(8, 0, Command::Failover);
        let back = State::decode(&s.encode()).unwrap();
        assert_eq!(back.session_state(a), Some(NodeState::Expired));
        assert_eq!(back.session_state(b), Some(NodeState::WasLoggedIn));
        assert_eq!(
            back.sessions()
                .find(|i| i.session == a)
                .unwrap()
                .expired_at_ms,
            55
        );
    }
}

// ---- fencing and recovery (BRIEF §3.4) ----

mod fencing {
    use super::super::*;

    struct World {
        s: State,
        index: u64,
    }

    impl World {
        fn new() -> World {
            World {
                s: State::new(),
                index: 0,
            }
        }
        fn apply(&mut self, cmd: Command) -> (Reply, Vec<Event>) {
            self.index += 1;
            self.s.apply(self.index, 1_000 + self.index, cmd)
        }
        fn login(&mut self, node: &str) -> SessionId {
            match self
                .apply(Command::Login {
                    node: node.into(),
                    nonce: 1,
                })
                .0
            {
                Reply::LoggedIn { session } => session,
                other => panic!("{other:?}"),
            }
        }
        fn open(&mut self, session: SessionId, ls: &str, recovery: RecoveryMode) -> Vec<Event> {
            let (reply, events) = self.apply(Command::OpenLockspace {
                session,
                request_id: 1,
                name: ls.into(),
                lvb_len_bytes: 0,
                recovery,
            });
            assert!(matches!(reply, Reply::LockspaceOpened { .. }), "{reply:?}");
            events
        }
        fn lock(
            &mut self,
            session: SessionId,
            rid: RequestId,
            ls: &str,
            res: &str,
            mode: Mode,
            flags: Flags,
        ) -> Reply {
            self.apply(Command::Lock {
                session,
                request_id: rid,
                ack_below: 0,
                lockspace: ls.into(),
                resource: res.as_bytes().to_vec(),
                mode,
                flags,
                timeout_ms: 0,
            })
            .0
        }
        fn expire_and_start(&mut self, session: SessionId) {
            self.apply(Command::Expire { session });
            assert_eq!(self.apply(Command::FenceStart { session }).0, Reply::Ok);
            assert_eq!(self.s.session_state(session), Some(NodeState::Fencing));
        }
        fn attempt(
            &mut self,
            session: SessionId,
            level_index: u32,
            last: bool,
            ok: bool,
        ) -> (Reply, Vec<Event>) {
            self.apply(Command::FenceAttempt {
                session,
                level: level_index + 1,
                level_index,
                last_level: last,
                ok,
                detail: if ok { "exit 0".into() } else { "exit 1".into() },
            })
        }
    }

    fn granted(r: &Reply) -> bool {
        matches!(r, Reply::Granted(_))
    }

    /// Nodes `a` and `b` in lockspace `fs`: `a` holds "mine" in `a_mode`, `b` holds
    /// "x" EX.
    fn two_holders(recovery: RecoveryMode, a_mode: Mode) -> (World, SessionId, SessionId) {
        let mut w = World::new();
        let (a, b) = (w.login("a"), w.login("b"));
        w.open(a, "fs", recovery);
        w.open(b, "fs", recovery);
        assert!(granted(&w.lock(
            a,
            2,
            "fs",
            "mine",
            a_mode,
            Flags::default()
        )));
        assert!(granted(&w.lock(
            b,
            2,
            "fs",
            "x",
            Mode::Ex,
            Flags::default()
        )));
        (w, a, b)
    }

    /// A plain conversion of `lock_id` to `mode`.
    fn convert_cmd(
        session: SessionId,
        request_id: RequestId,
        lock_id: LockId,
        mode: Mode,
    ) -> Command {
        Command::Convert {
            session,
            request_id,
            ack_below: 0,
            lock_id,
            mode,
            flags: Flags::default(),
            timeout_ms: 0,
            lvb: None,
        }
    }

    #[test]
    fn no_lock_of_an_expired_node_is_released_until_a_fence_succeeds() {
        let mut w = World::new();
        let (a, b) = (w.login("a"), w.login("b"));
        w.open(a, "fs", RecoveryMode::Auto);
        w.open(b, "fs", RecoveryMode::Auto);
        assert!(granted(&w.lock(
            a,
            2,
            "fs",
            "r",
            Mode::Ex,
            Flags::default()
        )));
        assert!(matches!(
            w.lock(b, 2, "fs", "r", Mode::Ex, Flags::default()),
            Reply::Queued { .. }
        ));
        w.expire_and_start(a);
        // Two failed levels and a failed round: still held.
        w.attempt(a, 0, false, false);
        w.attempt(a, 1, true, false);
        assert_eq!(
            w.s.fence_progress(a),
            Some(FenceProgress {
                next_level_index: 0,
                failed_rounds: 1
            })
        );
        assert_eq!((w.s.held_lock_count(), w.s.waiting_count()), (1, 1));
        let (_, events) = w.attempt(a, 0, false, true);
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Finished { session, result: Ok(_), .. } if *session == b)));
        assert_eq!(
            w.s.session_state(a),
            None,
            "a fenced session owning nothing is gone"
        );
        let steps: Vec<_> = w.s.fence_history().map(|r| r.what.clone()).collect();
        assert_eq!(steps.len(), 5, "{steps:?}");
        assert!(matches!(&steps[4], FenceStep::Done { by } if by.contains("level 1")));
    }

    #[test]
    fn fencing_invalidates_the_lvb_of_a_dead_writer() {
        let mut w = World::new();
        let (a, b) = (w.login("a"), w.login("b"));
        w.open(a, "fs", RecoveryMode::Auto);
        w.open(b, "fs", RecoveryMode::Auto);
        w.lock(a, 2, "fs", "r", Mode::Pw, Flags::default());
        let valblk = Flags {
            valblk: true,
            ..Flags::default()
        };
        w.lock(b, 2, "fs", "r", Mode::Pr, valblk);
        w.expire_and_start(a);
        let (_, events) = w.attempt(a, 0, true, true);
        let grant = events.iter().find_map(|e| match e {
            Event::Finished { result: Ok(g), .. } => Some(g.clone()),
            _ => None,
        });
        assert!(grant.expect("b granted").lvb_invalid);
    }

    #[test]
    fn an_operator_ack_fences_and_the_node_may_log_in_again() {
        let mut w = World::new();
        let a = w.login("a");
        w.open(a, "fs", RecoveryMode::Auto);
        w.lock(a, 2, "fs", "r", Mode::Ex, Flags::default());
        w.apply(Command::Expire { session: a });
        // Refused while expired, and an ack for a live node is refused.
        assert!(matches!(
            w.apply(Command::Login {
                node: "a".into(),
                nonce: 9
            })
            .0,
            Reply::Failed(LockError::NodeExpired { .. })
        ));
        let b = w.login("b");
        assert_eq!(
            w.apply(Command::FenceAck {
                node: "b".into(),
                by: "root".into()
            })
            .0,
            Reply::Failed(LockError::NotFencing("b".into()))
        );
        assert_eq!(
            w.apply(Command::FenceAck {
                node: "a".into(),
                by: "root".into()
            })
            .0,
            Reply::Ok
        );
        assert_eq!(w.s.held_lock_count(), 0);
        let again = w.login("a");
        assert_ne!(again, a, "a fresh session");
        let _ = b;
    }

    #[test]
    fn explicit_lockspaces_keep_writers_as_expired_holders_until_recovery_done() {
        let mut w = World::new();
        let (a, b, c) = (w.login("a"), w.login("b"), w.login("c"));
        for s in [a, b, c] {
            w.open(s, "gfs", RecoveryMode::Explicit);
        }
        w.lock(a, 2, "gfs", "journal", Mode::Ex, Flags::default());
        w.lock(a, 3, "gfs", "inode", Mode::Pr, Flags::default());
        w.expire_and_start(a);
        let (_, events) = w.attempt(a, 0, true, true);
        let told: Vec<SessionId> = events
            .iter()
            .filter_map(|e| match e {
                Event::NeedRecovery {
                    session,
                    node,
                    lockspace,
                    first_mounter: false,
                } if node == "a" && lockspace == "gfs" => Some(*session),
                _ => None,
            })
            .collect();
        assert_eq!(told, vec![b, c], "every survivor is told");
        assert_eq!(
            w.s.session_state(a),
            Some(NodeState::Fenced),
            "kept while it owns expired holders"
        );
        assert_eq!(
            w.s.held_lock_count(),
            1,
            "the PR was released, the EX is an expired holder"
        );
        // A normal request waits; a noexp request passes.
        assert!(matches!(
            w.lock(b, 2, "gfs", "journal", Mode::Pr, Flags::default()),
            Reply::Queued { .. }
        ));
        let noexp = Flags {
            noexp: true,
            ..Flags::default()
        };
        assert!(granted(&w.lock(c, 2, "gfs", "journal", Mode::Pr, noexp)));
        // The node may log in again meanwhile.
        let a2 = w.login("a");
        assert_ne!(a2, a);
        let done = Command::RecoveryDone {
            session: c,
            request_id: 3,
            lockspace: "gfs".into(),
            node: "a".into(),
        };
        let (reply, events) = w.apply(done);
        assert_eq!(reply, Reply::Ok);
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Finished { session, result: Ok(_), .. } if *session == b)));
        assert_eq!(w.s.session_state(a), None, "the old session is gone");
        let again = Command::RecoveryDone {
            session: c,
            request_id: 4,
            lockspace: "gfs".into(),
            node: "a".into(),
        };
        let (reply, _) = w.apply(again);
        assert_eq!(
            reply,
            Reply::Failed(LockError::NothingToRecover {
                node: "a".into(),
                lockspace: "gfs".into()
            })
        );
    }

    #[test]
    fn the_first_mounter_is_told_to_recover() {
        let mut w = World::new();
        let a = w.login("a");
        w.open(a, "gfs", RecoveryMode::Explicit);
        w.lock(a, 2, "gfs", "journal", Mode::Ex, Flags::default());
        w.expire_and_start(a);
        let (_, events) = w.attempt(a, 0, true, true);
        assert!(
            events
                .iter()
                .all(|e| !matches!(e, Event::NeedRecovery { .. })),
            "nobody to tell yet"
        );
        let b = w.login("b");
        let events = w.open(b, "gfs", RecoveryMode::Explicit);
        assert_eq!(
            events,
            vec![Event::NeedRecovery {
                session: b,
                lockspace: "gfs".into(),
                node: "a".into(),
                first_mounter: true
            }]
        );
        let c = w.login("c");
        assert_eq!(
            w.open(c, "gfs", RecoveryMode::Explicit),
            vec![Event::NeedRecovery {
                session: c,
                lockspace: "gfs".into(),
                node: "a".into(),
                first_mounter: false
            }],
            "a later opener is told of every recovery still pending, not as first mounter"
        );
        assert_eq!(
            w.s.pending_recoveries(c),
            vec![Event::NeedRecovery {
                session: c,
                lockspace: "gfs".into(),
                node: "a".into(),
                first_mounter: false
            }],
            "and again whenever its event stream reopens"
        );
    }

    /// Every command a session can send, as sent by `session` (lock 1000 and request
    /// ids from 100 are made up: the refusal must come before they are looked at).
    fn every_session_command(session: SessionId, ls: &str) -> Vec<Command> {
        let rid = 100;
        vec![
            Command::Logout {
                session,
                request_id: rid,
            },
            Command::OpenLockspace {
                session,
                request_id: rid,
                name: "other".into(),
                lvb_len_bytes: 0,
                recovery: RecoveryMode::Auto,
            },
            Command::Lock {
                session,
                request_id: rid,
                ack_below: 0,
                lockspace: ls.into(),
                resource: b"r".to_vec(),
                mode: Mode::Ex,
                flags: Flags::default(),
                timeout_ms: 0,
            },
            Command::Convert {
                session,
                request_id: rid,
                ack_below: 0,
                lock_id: 1000,
                mode: Mode::Nl,
                flags: Flags::default(),
                timeout_ms: 0,
                lvb: None,
            },
            Command::Unlock {
                session,
                request_id: rid,
                ack_below: 0,
                lock_id: 1000,
                lvb: None,
            },
            Command::Cancel {
                session,
                request_id: rid,
                ack_below: 0,
                target: 1,
            },
            Command::RecoveryDone {
                session,
                request_id: rid,
                lockspace: ls.into(),
                node: "b".into(),
            },
        ]
    }

    /// Sends every command as `session` (and a login as its node): each is refused,
    /// naming the state, and the table is unchanged byte for byte.
    fn assert_refused_everything(w: &mut World, session: SessionId, state: NodeState) {
        let before = w.s.encode();
        let mut commands = every_session_command(session, "fs");
        // Its real locks too, not only made-up ids.
        for lock_id in w.s.locks_of_session(session) {
            commands.push(Command::Unlock {
                session,
                request_id: 200 + lock_id,
                ack_below: 0,
                lock_id,
                lvb: None,
            });
            commands.push(Command::Convert {
                session,
                request_id: 300 + lock_id,
                ack_below: 0,
                lock_id,
                mode: Mode::Nl,
                flags: Flags::default(),
                timeout_ms: 0,
                lvb: None,
            });
        }
        for cmd in commands {
            let (reply, events) = w.apply(cmd.clone());
            assert_eq!(
                reply,
                Reply::Failed(LockError::SessionNotLive { session, state }),
                "{cmd:?}"
            );
            assert!(events.is_empty(), "{cmd:?} emitted {events:?}");
        }
        let node = w.s.session_node(session).unwrap_or("a").to_string();
        let (reply, _) = w.apply(Command::Login { node, nonce: 1 });
        if state != NodeState::Fenced {
            assert!(
                matches!(reply, Reply::Failed(LockError::NodeExpired { .. })),
                "{reply:?}"
            );
        }
        let mut after = w.s.clone();
        if state == NodeState::Fenced {
            // A fenced node may log in again: that is the one change allowed.
            after = State::decode(&before).expect("decodes");
            assert!(matches!(reply, Reply::LoggedIn { .. }), "{reply:?}");
        }
        assert_eq!(after.encode(), before, "a refusal changed the table");
    }

    /// Issue 11, sequence 1: a node that lives on while its (slow) fence agent runs
    /// sends Unlock, Logout, Login and Lock: all refused; the waiter is granted only
    /// when the agent reports success.
    #[test]
    fn a_failed_node_can_change_nothing_until_it_is_fenced() {
        let mut w = World::new();
        let (a, b) = (w.login("a"), w.login("b"));
        w.open(a, "fs", RecoveryMode::Auto);
        w.open(b, "fs", RecoveryMode::Auto);
        assert!(granted(&w.lock(
            a,
            2,
            "fs",
            "r",
            Mode::Ex,
            Flags::default()
        )));
        assert!(granted(&w.lock(
            a,
            3,
            "fs",
            "q",
            Mode::Pr,
            Flags::default()
        )));
        w.apply(Command::Expire { session: a });
        assert_refused_everything(&mut w, a, NodeState::Expired);
        assert_eq!(w.apply(Command::FenceStart { session: a }).0, Reply::Ok);
        let waiting = w.lock(b, 2, "fs", "r", Mode::Ex, Flags::default());
        assert!(matches!(waiting, Reply::Queued { .. }), "{waiting:?}");
        assert_refused_everything(&mut w, a, NodeState::Fencing);
        let (_, events) = w.attempt(a, 0, true, false);
        assert_eq!(
            events,
            vec![Event::FenceDue {
                session: a,
                node: "a".into(),
                next: FenceNext::Level(0),
            }],
            "a failed attempt releases nothing; the next round is due"
        );
        assert_refused_everything(&mut w, a, NodeState::Fencing);
        let (reply, events) = w.attempt(a, 0, true, true);
        assert_eq!(reply, Reply::Ok, "the agent's success is accepted");
        assert!(events
            .iter()
            .any(|e| matches!(e, Event::Finished { session, result: Ok(_), .. } if *session == b)));
        let done =
            w.s.fence_history()
                .filter(|r| r.session == a && matches!(r.what, FenceStep::Done { .. }))
                .count();
        assert_eq!(done, 1, "the history shows the fence done");
    }

    /// Issue 11, sequence 2: a request of a node being fenced is not queued, so the
    /// operator's fence ack finds nothing waiting and the table stays whole.
    #[test]
    fn a_request_from_a_fencing_node_is_not_queued_and_the_ack_completes() {
        for convert in [false, true] {
            let (mut w, a, _) = two_holders(RecoveryMode::Auto, Mode::Pr);
            w.expire_and_start(a);
            let reply = if convert {
                let lock_id = w.s.locks_of_session(a)[0];
                w.apply(convert_cmd(a, 3, lock_id, Mode::Ex)).0
            } else {
                w.lock(a, 3, "fs", "x", Mode::Ex, Flags::default())
            };
            assert!(
                matches!(reply, Reply::Failed(LockError::SessionNotLive { .. })),
                "{reply:?}"
            );
            assert_eq!(w.s.waiting_count(), 0);
            let (reply, _) = w.apply(Command::FenceAck {
                node: "a".into(),
                by: "op".into(),
            });
            assert_eq!(reply, Reply::Ok);
            assert!(State::decode(&w.s.encode()).is_ok());
        }
    }

    /// Applying is total: even a table in which a node being fenced has a waiting
    /// request (which the allow-list keeps out; built by hand here, as a foreign or
    /// older log could leave it) completes the fence without panicking, on every
    /// replica alike, failing the request.
    #[test]
    fn completing_a_fence_ends_waiting_requests_instead_of_panicking() {
        for recovery in [RecoveryMode::Auto, RecoveryMode::Explicit] {
            for convert in [false, true] {
                let (mut w, a, b) = two_holders(recovery, Mode::Ex);
                let queued = if convert {
                    for s in [b, a] {
                        assert!(granted(&w.lock(
                            s,
                            3,
                            "fs",
                            "y",
                            Mode::Pr,
                            Flags::default()
                        )));
                    }
                    let lock_id = *w.s.locks_of_session(a).last().unwrap();
                    w.apply(convert_cmd(a, 4, lock_id, Mode::Ex)).0
                } else {
                    w.lock(a, 4, "fs", "x", Mode::Ex, Flags::default())
                };
                assert!(matches!(queued, Reply::Queued { .. }), "{queued:?}");
                // The state the allow-list prevents: Fencing with a request waiting.
                std::sync::Arc::make_mut(w.s.core.sessions.get_mut(&a).unwrap()).state =
                    NodeState::Fencing;
                let mut replica = w.s.clone();
                let ack = Command::FenceAck {
                    node: "a".into(),
                    by: "op".into(),
                };
                let out = w.apply(ack.clone());
                assert_eq!(out.0, Reply::Ok);
                assert!(out.1.iter().any(|e| matches!(
                    e,
                    Event::Finished { session, request_id: 4, result: Err(_) } if *session == a
                )));
                assert_eq!(replica.apply(w.index, 1_000 + w.index, ack), out);
                assert_eq!(replica.encode(), w.s.encode(), "replicas agree");
                let whole = State::decode(&w.s.encode());
                assert!(whole.is_ok(), "{recovery:?} {convert}: {:?}", whole.err());
                assert_eq!(w.s.waiting_count(), 0);
            }
        }
    }

    /// Issue 11, sequence 3: the node told to recover dies (or logs out) before its
    /// RecoveryDone; the recovery passes to the live nodes left, and one of them ends it.
    #[test]
    fn recovery_duty_survives_the_recovering_node() {
        for recoverer_leaves_by_logout in [false, true] {
            let mut w = World::new();
            let a = w.login("a");
            w.open(a, "gfs", RecoveryMode::Explicit);
            assert!(granted(&w.lock(
                a,
                2,
                "gfs",
                "inode-1",
                Mode::Ex,
                Flags::default()
            )));
            w.expire_and_start(a);
            w.attempt(a, 0, true, true);
            let b = w.login("b");
            let told_b = w.open(b, "gfs", RecoveryMode::Explicit);
            assert!(
                matches!(&told_b[..], [Event::NeedRecovery { session, first_mounter: true, .. }] if *session == b)
            );
            let c = w.login("c");
            assert_eq!(w.open(c, "gfs", RecoveryMode::Explicit).len(), 1);
            let noexp = Flags {
                noexp: true,
                ..Flags::default()
            };
            assert!(granted(&w.lock(b, 2, "gfs", "journal-a", Mode::Ex, noexp)));
            let waiting = w.lock(c, 2, "gfs", "inode-1", Mode::Ex, Flags::default());
            assert!(matches!(waiting, Reply::Queued { .. }), "{waiting:?}");
            let (_, events) = if recoverer_leaves_by_logout {
                w.apply(Command::Logout {
                    session: b,
                    request_id: 3,
                })
            } else {
                w.apply(Command::Expire { session: b })
            };
            assert!(
                events.contains(&Event::NeedRecovery {
                    session: c,
                    lockspace: "gfs".into(),
                    node: "a".into(),
                    first_mounter: true,
                }),
                "c takes over a's recovery: {events:?}"
            );
            let (reply, events) = w.apply(Command::RecoveryDone {
                session: c,
                request_id: 3,
                lockspace: "gfs".into(),
                node: "a".into(),
            });
            assert_eq!(reply, Reply::Ok);
            assert!(events.iter().any(
                |e| matches!(e, Event::Finished { session, result: Ok(_), .. } if *session == c)
            ));
        }
    }

    #[test]
    fn fence_progress_and_history_survive_a_snapshot() {
        let mut w = World::new();
        let a = w.login("a");
        w.open(a, "fs", RecoveryMode::Auto);
        w.lock(a, 2, "fs", "r", Mode::Ex, Flags::default());
        w.expire_and_start(a);
        w.attempt(a, 0, false, false);
        let back = State::decode(&w.s.encode()).unwrap();
        assert_eq!(
            back.fence_progress(a),
            Some(FenceProgress {
                next_level_index: 1,
                failed_rounds: 0
            })
        );
        assert_eq!(back.fence_history().count(), 2);
        assert_eq!(back.fences_due().len(), 1);
    }

    #[test]
    fn a_fence_attempt_before_its_start_changes_nothing() {
        let mut w = World::new();
        let a = w.login("a");
        w.apply(Command::Expire { session: a });
        let before = w.s.encode();
        assert!(matches!(
            w.attempt(a, 0, true, true).0,
            Reply::Failed(LockError::InvalidArgument(_))
        ));
        assert_eq!(w.s.encode(), before);
    }

    #[test]
    fn force_expire_needs_a_logged_in_node() {
        let mut w = World::new();
        let a = w.login("a");
        assert_eq!(
            w.apply(Command::ForceExpire { node: "zed".into() }).0,
            Reply::Failed(LockError::NotLoggedIn("zed".into()))
        );
        assert_eq!(
            w.apply(Command::ForceExpire { node: "a".into() }).0,
            Reply::Ok
        );
        assert_eq!(w.s.session_state(a), Some(NodeState::Expired));
        assert_eq!(
            w.apply(Command::ForceExpire { node: "a".into() }).0,
            Reply::Failed(LockError::NotLoggedIn("a".into()))
        );
    }
}

#[test]
fn a_request_id_reused_for_another_request_is_refused_and_changes_nothing() {
    let mut t = Table::new();
    let a = t.node("node1");
    // Granted at once, then the same id for a lock on another resource.
    let id = t.request_id(a);
    let first = t.send(id, lock_cmd(a, id, "A", Mode::Ex, flags(), 0));
    let grant = first.granted();
    let before = t.state.encode();
    let other = t.send(id, lock_cmd(a, id, "B", Mode::Pr, flags(), 0));
    assert!(
        matches!(other.error(), LockError::InvalidArgument(ref m) if m.contains(&format!("request id {id}"))),
        "{:?}",
        other.reply
    );
    let unlock = t.send(
        id,
        Command::Unlock {
            session: a,
            request_id: id,
            ack_below: 0,
            lock_id: grant.lock_id,
            lvb: None,
        },
    );
    assert!(matches!(unlock.error(), LockError::InvalidArgument(_)));
    assert_eq!(t.state.encode(), before, "the refusals changed nothing");
    // The same request again is a retry: the first outcome, with another ack_below.
    let mut again = lock_cmd(a, id, "A", Mode::Ex, flags(), 0);
    if let Command::Lock { ack_below, .. } = &mut again {
        *ack_below = id;
    }
    assert_eq!(t.send(id, again).granted(), grant);
    assert_eq!(t.state.held_lock_count(), 1, "no second grant");

    // A waiting request's id is bound the same way.
    let b = t.node("node2");
    let wid = t.request_id(b);
    let queued = t
        .send(wid, lock_cmd(b, wid, "A", Mode::Ex, flags(), 0))
        .queued();
    let other = t.send(wid, lock_cmd(b, wid, "A", Mode::Pr, flags(), 0));
    assert!(matches!(other.error(), LockError::InvalidArgument(_)));
    let retry = t.send(wid, lock_cmd(b, wid, "A", Mode::Ex, flags(), 0));
    assert_eq!(retry.queued(), queued);
    assert_eq!(t.state.waiting_count(), 1);
}

// ---- unfencing and departures (issue 15) ----

mod unfencing {
    use super::*;

    fn login_unfencing(t: &mut Table, node: &str, nonce: u64) -> Reply {
        t.apply(Command::LoginUnfencing {
            node: node.into(),
            nonce,
        })
        .0
    }

    fn attempt(t: &mut Table, session: SessionId, ok: bool, last: bool) -> (Reply, Vec<Event>) {
        t.apply(Command::UnfenceAttempt {
            session,
            ok,
            last_attempt: last,
            detail: if ok {
                "fence_scsi: exit 0"
            } else {
                "fence_scsi: exit 1"
            }
            .into(),
        })
    }

    fn unfencing_session(t: &mut Table, node: &str) -> SessionId {
        match login_unfencing(t, node, NONCE) {
            Reply::Unfencing { session } => session,
            other => panic!("expected Unfencing, got {other:?}"),
        }
    }

    fn departure(t: &Table, node: &str) -> Option<DepartureKind> {
        t.state
            .departures()
            .find(|(n, _)| *n == node)
            .map(|(_, d)| d.how.clone())
    }

    #[test]
    fn a_login_that_needs_unfencing_is_answered_only_once_unfenced() {
        let mut t = Table::new();
        let s = unfencing_session(&mut t, "a");
        assert_eq!(t.state.session_state(s), Some(NodeState::Unfencing));
        assert_eq!(t.state.unfences_due().len(), 1);
        // A retry of the login joins the wait; any other login is refused.
        assert_eq!(
            login_unfencing(&mut t, "a", NONCE),
            Reply::Unfencing { session: s }
        );
        for cmd in [
            Command::Login {
                node: "a".into(),
                nonce: NONCE + 1,
            },
            Command::LoginUnfencing {
                node: "a".into(),
                nonce: NONCE + 1,
            },
        ] {
            assert_eq!(
                t.apply(cmd).0,
                Reply::Failed(LockError::NodeUnfencing {
                    node: "a".into(),
                    session: s
                })
            );
        }
        // It may do nothing, and nothing but its unfencing moves it.
        let open = Command::OpenLockspace {
            session: s,
            request_id: 1,
            name: LS.into(),
            lvb_len_bytes: 0,
            recovery: RecoveryMode::Auto,
        };
        assert_eq!(
            t.apply(open.clone()).0,
            Reply::Failed(LockError::SessionNotLive {
                session: s,
                state: NodeState::Unfencing
            })
        );
        t.apply(Command::Expire { session: s });
        t.apply(Command::Failover);
        t.apply(Command::Reconnect { session: s });
        assert!(matches!(
            t.apply(Command::ForceExpire { node: "a".into() }).0,
            Reply::Failed(LockError::NotLoggedIn(_))
        ));
        assert!(matches!(
            t.apply(Command::FenceStart { session: s }).0,
            Reply::Failed(LockError::NotFencing(_))
        ));
        assert_eq!(t.state.session_state(s), Some(NodeState::Unfencing));
        assert_eq!(
            t.state.live_sessions().count(),
            0,
            "not heard, so never expired"
        );

        let (reply, events) = attempt(&mut t, s, true, false);
        assert_eq!(reply, Reply::Ok);
        assert_eq!(
            events,
            [Event::Unfenced {
                session: s,
                result: Ok(())
            }]
        );
        assert_eq!(t.state.session_state(s), Some(NodeState::LoggedIn));
        assert!(t.state.unfences_due().is_empty());
        assert_eq!(t.state.fence_progress(s), None);
        assert_eq!(
            login_unfencing(&mut t, "a", NONCE),
            Reply::LoggedIn { session: s }
        );
        assert!(matches!(t.apply(open).0, Reply::LockspaceOpened { .. }));
        let steps: Vec<FenceStep> = t.state.fence_history().map(|r| r.what.clone()).collect();
        assert_eq!(
            steps,
            [
                FenceStep::UnfenceStarted,
                FenceStep::UnfenceAttempt {
                    ok: true,
                    detail: "fence_scsi: exit 0".into()
                }
            ]
        );
    }

    #[test]
    fn a_failing_unfence_ends_the_session_after_its_last_attempt_and_refuses_the_login() {
        let mut t = Table::new();
        let s = unfencing_session(&mut t, "a");
        let (_, events) = attempt(&mut t, s, false, false);
        // Not the last attempt: the leader is told to run the devices again.
        assert_eq!(events, [Event::UnfenceDue { session: s }]);
        assert_eq!(t.state.session_state(s), Some(NodeState::Unfencing));
        assert_eq!(t.state.fence_progress(s).map(|p| p.failed_rounds), Some(1));

        let (reply, events) = attempt(&mut t, s, false, true);
        assert_eq!(reply, Reply::Ok);
        let refusal = LockError::UnfenceFailed {
            node: "a".into(),
            attempts: 2,
            detail: "fence_scsi: exit 1".into(),
        };
        assert_eq!(
            events,
            [Event::Unfenced {
                session: s,
                result: Err(refusal.clone())
            }]
        );
        assert_eq!(t.state.session_state(s), None, "the session is gone");
        assert_eq!(t.state.session_of_node("a"), None);
        assert!(matches!(
            t.state.fence_history().last().map(|r| &r.what),
            Some(FenceStep::UnfenceFailed { attempts: 2 })
        ));
        assert!(matches!(
            departure(&t, "a"),
            Some(DepartureKind::UnfenceFailed {
                nonce: NONCE,
                attempts: 2,
                ..
            })
        ));
        // A retry of that login (after a failover, say) gets the same refusal and
        // starts no second unfencing.
        let before = t.state.encode();
        assert_eq!(login_unfencing(&mut t, "a", NONCE), Reply::Failed(refusal));
        assert_eq!(t.state.encode(), before, "a refused retry changes nothing");
        // A new login (another nonce) is a new attempt.
        let Reply::Unfencing { session: again } = login_unfencing(&mut t, "a", NONCE + 1) else {
            panic!("a new login unfences again");
        };
        assert_ne!(again, s);
        assert_eq!(departure(&t, "a"), None);
    }

    #[test]
    fn unfence_attempts_for_a_session_not_being_unfenced_change_nothing() {
        let mut t = Table::new();
        let live = t.login("a");
        let before = t.state.encode();
        for session in [live, 999] {
            for ok in [true, false] {
                let (reply, events) = attempt(&mut t, session, ok, true);
                assert!(matches!(reply, Reply::Failed(_)), "{reply:?}");
                assert!(events.is_empty());
            }
        }
        assert_eq!(t.state.encode(), before);
    }

    #[test]
    fn an_unfencing_session_and_its_progress_survive_a_snapshot() {
        let mut t = Table::new();
        let s = unfencing_session(&mut t, "a");
        attempt(&mut t, s, false, false);
        let back = State::decode(&t.state.encode()).unwrap();
        assert_eq!(back.session_state(s), Some(NodeState::Unfencing));
        assert_eq!(back.unfences_due()[0].2.failed_rounds, 1);
    }

    #[test]
    fn logouts_and_fences_are_remembered_until_the_node_logs_in_again() {
        let mut t = Table::new();
        assert_eq!(departure(&t, "a"), None, "never seen");
        let a = t.login("a");
        t.now_ms = 5_000;
        t.apply(Command::Logout {
            session: a,
            request_id: 1,
        });
        assert_eq!(departure(&t, "a"), Some(DepartureKind::LoggedOut));
        assert_eq!(
            t.state.departures().next().map(|(_, d)| d.at_ms),
            Some(5_000)
        );
        let back = State::decode(&t.state.encode()).unwrap();
        assert_eq!(back.departures().count(), 1, "kept in snapshots");

        let a = t.login("a");
        assert_eq!(departure(&t, "a"), None, "a session replaces it");
        t.apply(Command::Expire { session: a });
        t.apply(Command::FenceAck {
            node: "a".into(),
            by: "op".into(),
        });
        assert_eq!(departure(&t, "a"), Some(DepartureKind::Fenced));
    }

    #[test]
    fn departures_are_bounded_dropping_the_oldest() {
        let mut t = Table::new();
        t.checks = false;
        for i in 0..=MAX_DEPARTURES {
            let node = format!("n{i}");
            let s = t.login(&node);
            t.now_ms += 1;
            t.apply(Command::Logout {
                session: s,
                request_id: 1,
            });
        }
        assert_eq!(t.state.departures().count(), MAX_DEPARTURES);
        assert_eq!(departure(&t, "n0"), None, "the oldest went");
        assert_eq!(
            departure(&t, &format!("n{MAX_DEPARTURES}")),
            Some(DepartureKind::LoggedOut)
        );
        t.check();
    }

    #[test]
    fn a_snapshot_written_before_departures_decodes_and_nothing_else_is_tolerated() {
        let mut t = Table::new();
        let a = t.login("a");
        t.apply(Command::Logout {
            session: a,
            request_id: 1,
        });
        // The core alone: what a server before issue 15 wrote.
        let old: Vec<u8> = postcard::to_allocvec(&t.state.core).unwrap();
        let back = State::decode(&old).expect("an older snapshot decodes");
        assert_eq!(back.departures().count(), 0);
        let mut trailing = t.state.encode();
        trailing.push(0);
        assert!(
            State::decode(&trailing).is_err(),
            "trailing bytes are refused"
        );
        let mut cut = t.state.encode();
        cut.pop();
        assert!(
            State::decode(&cut).is_err(),
            "a cut departure list is refused"
        );
        // A departure of a node that has a session contradicts the table.
        let mut core: Core = postcard::from_bytes(&old).unwrap();
        core.departed.insert(
            "b".into(),
            Departure {
                at_ms: 1,
                how: DepartureKind::LoggedOut,
            },
        );
        let b = t.login("b");
        let mut core2: Core =
            postcard::from_bytes(&postcard::to_allocvec(&t.state.core).unwrap()).unwrap();
        core2.departed = core.departed;
        let bytes = postcard::to_allocvec(&(&core2, &core2.departed)).unwrap();
        assert!(
            State::decode(&bytes).is_err(),
            "session {b} and a departure"
        );
    }
}
