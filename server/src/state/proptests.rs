//! Property tests: random command sequences from a few sessions on a few resources,
//! checked after every step against the table's invariants and a model of what each
//! client has been told; then replayed on a fresh table, which must end byte-identical
//! (determinism). Also: no command and no snapshot bytes make the table panic.

use super::model::Core;
use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

const LS: &str = "fs1";
const LVB_LEN_BYTES: usize = 32;
const NODES: usize = 3;
const RESOURCES: [&str; 3] = ["r0", "r1", "r2"];
/// A lock id no Lock entry of these runs creates.
const UNKNOWN_LOCK: LockId = 999_999;

#[derive(Clone, Debug)]
enum Step {
    Lock {
        who: usize,
        res: usize,
        mode: Mode,
        flags: Flags,
        timeout_ms: u64,
    },
    Convert {
        who: usize,
        pick: Option<usize>,
        mode: Mode,
        flags: Flags,
        timeout_ms: u64,
        lvb: Option<u8>,
    },
    Unlock {
        who: usize,
        pick: Option<usize>,
        lvb: Option<u8>,
    },
    /// Cancel one of the session's recent request ids.
    Cancel {
        who: usize,
        back: u64,
    },
    /// Send one of the session's accepted commands again, with its request id.
    Retry {
        who: usize,
        back: usize,
    },
    Tick {
        advance_ms: u64,
    },
    /// The node fails: its PW/EX locks become expired holders.
    Expire {
        who: usize,
    },
    /// Clean logout, then a fresh login.
    Relogin {
        who: usize,
    },
    /// Continue on a table decoded from a snapshot of this one.
    Snapshot,
    /// The next `commands` commands join the last one's entry, as the commands of
    /// one turn do in a leader's `Op::Batch`: they are applied with its index.
    SameEntry {
        commands: usize,
    },
}

/// Every mode, PR and EX (the modes of conversion deadlocks) more often.
fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        1 => Just(Mode::Nl),
        1 => Just(Mode::Cr),
        1 => Just(Mode::Cw),
        3 => Just(Mode::Pr),
        1 => Just(Mode::Pw),
        3 => Just(Mode::Ex),
    ]
}

fn flags() -> impl Strategy<Value = Flags> {
    let rare = || prop::bool::weighted(0.15);
    (
        rare(),
        rare(),
        rare(),
        rare(),
        rare(),
        prop::bool::weighted(0.5),
    )
        .prop_map(|(try_, try_1cb, noexp, any, priority, valblk)| Flags {
            try_,
            try_1cb,
            noexp,
            any,
            priority,
            valblk,
        })
}

/// Mostly one of the session's locks, now and then an unknown one.
fn lock_pick() -> impl Strategy<Value = Option<usize>> {
    prop::option::weighted(0.9, any::<usize>())
}

fn timeout_ms() -> impl Strategy<Value = u64> {
    prop_oneof![3 => Just(0u64), 1 => 1u64..60]
}

/// A random step on the first `resources` resources; Lock and Convert draw their
/// modes from the strategies given.
fn step_with(
    resources: usize,
    lock_mode: BoxedStrategy<Mode>,
    convert_mode: BoxedStrategy<Mode>,
) -> impl Strategy<Value = Step> {
    let who = || 0..NODES;
    prop_oneof![
        7 => (who(), 0..resources, lock_mode, flags(), timeout_ms()).prop_map(
            |(who, res, mode, flags, timeout_ms)| Step::Lock { who, res, mode, flags, timeout_ms }
        ),
        5 => (who(), lock_pick(), convert_mode, flags(), timeout_ms(), prop::option::of(any::<u8>()))
            .prop_map(|(who, pick, mode, flags, timeout_ms, lvb)| Step::Convert {
                who, pick, mode, flags, timeout_ms, lvb
            }),
        3 => (who(), lock_pick(), prop::option::of(any::<u8>()))
            .prop_map(|(who, pick, lvb)| Step::Unlock { who, pick, lvb }),
        1 => (who(), 0u64..6).prop_map(|(who, back)| Step::Cancel { who, back }),
        1 => (who(), 0usize..8).prop_map(|(who, back)| Step::Retry { who, back }),
        2 => (0u64..40).prop_map(|advance_ms| Step::Tick { advance_ms }),
        1 => who().prop_map(|who| Step::Expire { who }),
        1 => who().prop_map(|who| Step::Relogin { who }),
        1 => Just(Step::Snapshot),
        2 => (1usize..6).prop_map(|commands| Step::SameEntry { commands }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    step_with(RESOURCES.len(), mode().boxed(), mode().boxed())
}

/// Steps that pile conversions onto one resource, where conversion deadlocks live:
/// locks are mostly taken shared (so several are granted) and converted up.
fn conversion_step() -> impl Strategy<Value = Step> {
    let lock_mode = prop_oneof![2 => Just(Mode::Nl), 4 => Just(Mode::Pr), 1 => Just(Mode::Ex)];
    let convert_mode = prop_oneof![1 => Just(Mode::Nl), 1 => Just(Mode::Pr), 3 => Just(Mode::Ex)];
    step_with(1, lock_mode.boxed(), convert_mode.boxed())
}

/// One thing that changed the table, kept for the replay.
#[derive(Clone, Debug)]
enum Applied {
    Entry(u64, u64, Command),
    Expire(SessionId),
}

/// A node as its client library sees it.
#[derive(Default)]
struct Client {
    session: SessionId,
    next_request: RequestId,
    /// Requests answered Queued whose Finished has not come yet.
    waiting: BTreeSet<RequestId>,
    /// The answer each finished request got (what a retry must get back).
    answers: BTreeMap<RequestId, Reply>,
    /// Commands the table accepted (not refused as bad input), for retries.
    accepted: Vec<(RequestId, Command)>,
    /// The highest ack_below sent.
    acked_below: RequestId,
}

struct Run {
    state: State,
    index: u64,
    now_ms: u64,
    clients: Vec<Client>,
    last_token: u64,
    log: Vec<(Applied, Reply, Vec<Event>)>,
    /// Commands still to be applied with the current entry index (`Step::SameEntry`).
    same_entry: usize,
}

/// Whether a failure means "refused as bad input, nothing changed".
fn refused(reply: &Reply) -> bool {
    matches!(
        reply,
        Reply::Failed(
            LockError::UnknownSession(_)
                | LockError::UnknownLockspace(_)
                | LockError::UnknownLock(_)
                | LockError::AlreadyLoggedIn { .. }
                | LockError::LockspaceNotOpened(_)
                | LockError::LockspaceMismatch { .. }
                | LockError::InvalidArgument(_)
                | LockError::NotGranted(_)
                | LockError::Limit(_)
        )
    )
}

impl Run {
    fn new() -> Run {
        let mut run = Run {
            state: State::new(),
            index: 0,
            now_ms: 10_000,
            clients: (0..NODES).map(|_| Client::default()).collect(),
            last_token: 0,
            log: Vec::new(),
            same_entry: 0,
        };
        for who in 0..NODES {
            run.login(who);
        }
        run
    }

    fn login(&mut self, who: usize) {
        let (reply, _) = self.apply(Command::Login {
            node: format!("node{who}"),
            nonce: self.index,
        });
        let Reply::LoggedIn { session } = reply else {
            panic!("login refused: {reply:?}");
        };
        self.clients[who] = Client {
            session,
            next_request: 1,
            ..Client::default()
        };
        let request_id = self.next_request(who);
        let (reply, _) = self.apply(Command::OpenLockspace {
            session,
            request_id,
            name: LS.into(),
            lvb_len_bytes: 0,
            recovery: RecoveryMode::Explicit,
        });
        assert!(matches!(reply, Reply::LockspaceOpened { .. }), "{reply:?}");
    }

    fn next_request(&mut self, who: usize) -> RequestId {
        let client = &mut self.clients[who];
        client.next_request += 1;
        client.next_request - 1
    }

    /// What a well-behaved client acknowledges with its next request.
    fn ack_below(&self, who: usize, request_id: RequestId) -> RequestId {
        let client = &self.clients[who];
        client.waiting.first().copied().unwrap_or(request_id)
    }

    fn apply(&mut self, cmd: Command) -> (Reply, Vec<Event>) {
        if self.same_entry > 0 {
            self.same_entry -= 1;
        } else {
            self.index += 1;
        }
        let (reply, events) = self.state.apply(self.index, self.now_ms, cmd.clone());
        self.log.push((
            Applied::Entry(self.index, self.now_ms, cmd),
            reply.clone(),
            events.clone(),
        ));
        (reply, events)
    }

    fn who(&self, session: SessionId) -> usize {
        self.clients
            .iter()
            .position(|c| c.session == session)
            .unwrap_or_else(|| panic!("event for unknown session {session}"))
    }

    fn saw_grant(&mut self, info: &GrantInfo) {
        assert!(
            info.token > self.last_token,
            "token {} after {}",
            info.token,
            self.last_token
        );
        self.last_token = info.token;
        assert_eq!(
            info.lvb.as_ref().map_or(LVB_LEN_BYTES, Vec::len),
            LVB_LEN_BYTES
        );
    }

    /// Checks a new request's reply and the events against the clients' model.
    fn observe(
        &mut self,
        sent: Option<(usize, RequestId, Command)>,
        reply: &Reply,
        events: &[Event],
    ) {
        if let Some((who, request_id, cmd)) = sent {
            if let Reply::Granted(info) = reply {
                self.saw_grant(info);
            }
            let client = &mut self.clients[who];
            if !refused(reply) {
                // A refused request changes nothing, its acknowledgement included.
                if let Command::Lock { ack_below, .. }
                | Command::Convert { ack_below, .. }
                | Command::Unlock { ack_below, .. }
                | Command::Cancel { ack_below, .. } = &cmd
                {
                    client.acked_below = client.acked_below.max(*ack_below);
                }
                client.accepted.push((request_id, cmd));
                match reply {
                    Reply::Queued { .. } => {
                        assert!(client.waiting.insert(request_id));
                    }
                    other => {
                        client.answers.insert(request_id, other.clone());
                    }
                }
            }
        }
        for event in events {
            match event {
                Event::Finished {
                    session,
                    request_id,
                    result,
                } => {
                    if let Ok(info) = result {
                        self.saw_grant(info);
                    }
                    let who = self.who(*session);
                    let client = &mut self.clients[who];
                    assert!(
                        client.waiting.remove(request_id),
                        "Finished for request {request_id}, which was not waiting"
                    );
                    let answer = match result {
                        Ok(info) => Reply::Granted(info.clone()),
                        Err(e) => Reply::Failed(e.clone()),
                    };
                    client.answers.insert(*request_id, answer);
                }
                Event::Blocking {
                    session, lock_id, ..
                } => {
                    let view = self.state.lock_view(*lock_id).expect("callback for a lock");
                    assert_eq!(view.session, *session);
                    assert!(view.granted.is_some() && !view.expired);
                }
                Event::SessionExpired { .. }
                | Event::NeedRecovery { .. }
                | Event::Unfenced { .. }
                | Event::UnfenceDue { .. }
                | Event::FenceDue { .. }
                | Event::Fenced { .. } => {
                    unreachable!("histories here expire holders, not sessions")
                }
                Event::LoggedOut { .. } => {}
            }
        }
    }

    /// One of the session's locks (`None`: a lock id that does not exist).
    fn pick_lock(&self, who: usize, pick: Option<usize>) -> LockId {
        let locks = self.state.locks_of_session(self.clients[who].session);
        match pick {
            Some(pick) if !locks.is_empty() => locks[pick % locks.len()],
            _ => UNKNOWN_LOCK,
        }
    }

    fn send(&mut self, who: usize, request_id: RequestId, cmd: Command) {
        let (reply, events) = self.apply(cmd.clone());
        self.observe(Some((who, request_id, cmd)), &reply, &events);
    }

    fn step(&mut self, step: Step) {
        match step {
            Step::Lock {
                who,
                res,
                mode,
                flags,
                timeout_ms,
            } => {
                let request_id = self.next_request(who);
                let cmd = Command::Lock {
                    session: self.clients[who].session,
                    request_id,
                    ack_below: self.ack_below(who, request_id),
                    lockspace: LS.into(),
                    resource: RESOURCES[res].as_bytes().to_vec(),
                    mode,
                    flags,
                    timeout_ms,
                };
                self.send(who, request_id, cmd);
            }
            Step::Convert {
                who,
                pick,
                mode,
                flags,
                timeout_ms,
                lvb,
            } => {
                let request_id = self.next_request(who);
                let cmd = Command::Convert {
                    session: self.clients[who].session,
                    request_id,
                    ack_below: self.ack_below(who, request_id),
                    lock_id: self.pick_lock(who, pick),
                    mode,
                    flags,
                    timeout_ms,
                    lvb: lvb.map(|b| vec![b; LVB_LEN_BYTES]),
                };
                self.send(who, request_id, cmd);
            }
            Step::Unlock { who, pick, lvb } => {
                let request_id = self.next_request(who);
                let cmd = Command::Unlock {
                    session: self.clients[who].session,
                    request_id,
                    ack_below: self.ack_below(who, request_id),
                    lock_id: self.pick_lock(who, pick),
                    lvb: lvb.map(|b| vec![b; LVB_LEN_BYTES]),
                };
                self.send(who, request_id, cmd);
            }
            Step::Cancel { who, back } => {
                let request_id = self.next_request(who);
                let cmd = Command::Cancel {
                    session: self.clients[who].session,
                    request_id,
                    ack_below: self.ack_below(who, request_id),
                    target: request_id.saturating_sub(1 + back),
                };
                self.send(who, request_id, cmd);
            }
            Step::Retry { who, back } => self.retry(who, back),
            Step::Tick { advance_ms } => {
                self.now_ms += advance_ms;
                let (reply, events) = self.apply(Command::Tick);
                assert_eq!(reply, Reply::Ok);
                self.observe(None, &reply, &events);
                assert!(self
                    .state
                    .next_deadline_ms()
                    .iter()
                    .all(|&d| d > self.now_ms));
            }
            Step::Expire { who } => {
                let session = self.clients[who].session;
                let events = self.state.mark_expired_holders(session);
                self.log
                    .push((Applied::Expire(session), Reply::Ok, events.clone()));
                self.observe(None, &Reply::Ok, &events);
            }
            Step::Relogin { who } => {
                let request_id = self.next_request(who);
                let session = self.clients[who].session;
                let (reply, events) = self.apply(Command::Logout {
                    session,
                    request_id,
                });
                assert_eq!(reply, Reply::Ok);
                self.observe(None, &reply, &events);
                assert!(
                    self.clients[who].waiting.is_empty(),
                    "logout finished every request"
                );
                assert_eq!(self.state.locks_of_session(session), Vec::<LockId>::new());
                self.login(who);
            }
            Step::Snapshot => {
                self.state = State::decode(&self.state.encode()).expect("snapshot decodes");
            }
            Step::SameEntry { commands } => self.same_entry = commands,
        }
    }

    /// A retry is applied once: it changes no lock and gets the first answer again.
    fn retry(&mut self, who: usize, back: usize) {
        let client = &self.clients[who];
        let Some((request_id, cmd)) = client
            .accepted
            .len()
            .checked_sub(1 + back % client.accepted.len().max(1))
            .map(|i| client.accepted[i].clone())
        else {
            return;
        };
        let expected = if client.waiting.contains(&request_id) {
            None // Queued, with the lock's id
        } else if request_id < client.acked_below {
            Some(Reply::Failed(LockError::InvalidArgument(format!(
                "stale request id {request_id}: session {} acknowledged every request below {}",
                client.session, client.acked_below
            ))))
        } else {
            Some(client.answers[&request_id].clone())
        };
        let before = (
            self.state.held_lock_count(),
            self.state.waiting_count(),
            self.state.last_token(),
        );
        let (reply, events) = self.apply(cmd);
        assert!(events.is_empty(), "a retry emitted {events:?}");
        match expected {
            Some(expected) => assert_eq!(reply, expected),
            None => assert!(matches!(reply, Reply::Queued { .. }), "{reply:?}"),
        }
        let after = (
            self.state.held_lock_count(),
            self.state.waiting_count(),
            self.state.last_token(),
        );
        assert_eq!(before, after, "a retry changed the table");
    }

    fn check(&self) {
        let bytes = self.state.encode();
        let copy = State::decode(&bytes).expect("the table is consistent");
        assert_eq!(copy.encode(), bytes);
        self.state.check_queue_rules().expect("queue rules hold");
        let waiting: usize = self.clients.iter().map(|c| c.waiting.len()).sum();
        assert_eq!(
            self.state.waiting_count(),
            waiting,
            "waiting requests match the clients'"
        );
        for client in &self.clients {
            let pending = &self.state.core.sessions[&client.session].pending;
            assert_eq!(
                pending.keys().copied().collect::<BTreeSet<_>>(),
                client.waiting,
                "session {}'s pending records",
                client.session
            );
        }
        assert_eq!(self.state.last_token(), self.last_token);
    }

    /// Replays the log on a fresh table: every output and the final bytes must match.
    fn replay(&self) {
        let mut fresh = State::new();
        for (applied, reply, events) in &self.log {
            let out = match applied {
                Applied::Entry(index, now_ms, cmd) => fresh.apply(*index, *now_ms, cmd.clone()),
                Applied::Expire(session) => (Reply::Ok, fresh.mark_expired_holders(*session)),
            };
            assert_eq!(
                &out,
                &(reply.clone(), events.clone()),
                "replay diverged at {applied:?}"
            );
        }
        assert_eq!(
            fresh.encode(),
            self.state.encode(),
            "replay ends in other bytes"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_every_invariant_and_replay_identically(
        steps in prop::collection::vec(step(), 1..120)
    ) {
        let mut run = Run::new();
        for step in steps {
            run.step(step);
            run.check();
        }
        run.replay();
    }

    #[test]
    fn conversion_heavy_histories_keep_every_invariant_and_replay_identically(
        steps in prop::collection::vec(conversion_step(), 1..120)
    ) {
        let mut run = Run::new();
        for step in steps {
            run.step(step);
            run.check();
        }
        run.replay();
    }
}

// ---- nothing panics ----

fn session_id() -> impl Strategy<Value = SessionId> {
    prop_oneof![Just(1u64), Just(2), Just(0), 0u64..40, any::<u64>()]
}

fn small_id() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..40, any::<u64>()]
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(LS.to_string()),
        "[a-z]{0,3}",
        "[a-z]{60,70}",
        any::<String>()
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"r0".to_vec()),
        prop::collection::vec(any::<u8>(), 0..3),
        prop::collection::vec(any::<u8>(), 0..80)
    ]
}

fn any_flags() -> impl Strategy<Value = Flags> {
    any::<[bool; 6]>().prop_map(|b| Flags {
        try_: b[0],
        try_1cb: b[1],
        noexp: b[2],
        any: b[3],
        priority: b[4],
        valblk: b[5],
    })
}

fn any_recovery() -> impl Strategy<Value = RecoveryMode> {
    prop_oneof![Just(RecoveryMode::Auto), Just(RecoveryMode::Explicit)]
}

fn command() -> impl Strategy<Value = Command> {
    let lvb = || prop::option::of(prop_oneof![Just(vec![1u8; 32]), bytes()]);
    prop_oneof![
        (name(), 0u64..3).prop_map(|(node, nonce)| Command::Login { node, nonce }),
        (name(), 0u64..3).prop_map(|(node, nonce)| Command::LoginUnfencing { node, nonce }),
        (session_id(), any::<bool>(), any::<bool>()).prop_map(|(session, ok, last_attempt)| {
            Command::UnfenceAttempt {
                session,
                ok,
                last_attempt,
                detail: String::new(),
            }
        }),
        (session_id(), small_id()).prop_map(|(session, request_id)| Command::Logout {
            session,
            request_id
        }),
        (
            session_id(),
            small_id(),
            name(),
            any::<u32>(),
            any_recovery()
        )
            .prop_map(|(session, request_id, name, lvb_len_bytes, recovery)| {
                Command::OpenLockspace {
                    session,
                    request_id,
                    name,
                    lvb_len_bytes: lvb_len_bytes % 80,
                    recovery,
                }
            }),
        (
            session_id(),
            small_id(),
            small_id(),
            name(),
            bytes(),
            mode(),
            any_flags(),
            small_id()
        )
            .prop_map(
                |(session, request_id, ack_below, lockspace, resource, mode, flags, timeout_ms)| {
                    Command::Lock {
                        session,
                        request_id,
                        ack_below,
                        lockspace,
                        resource,
                        mode,
                        flags,
                        timeout_ms,
                    }
                }
            ),
        (
            session_id(),
            small_id(),
            small_id(),
            small_id(),
            mode(),
            any_flags(),
            small_id(),
            lvb()
        )
            .prop_map(
                |(session, request_id, ack_below, lock_id, mode, flags, timeout_ms, lvb)| {
                    Command::Convert {
                        session,
                        request_id,
                        ack_below,
                        lock_id,
                        mode,
                        flags,
                        timeout_ms,
                        lvb,
                    }
                }
            ),
        (session_id(), small_id(), small_id(), small_id(), lvb()).prop_map(
            |(session, request_id, ack_below, lock_id, lvb)| Command::Unlock {
                session,
                request_id,
                ack_below,
                lock_id,
                lvb
            }
        ),
        (session_id(), small_id(), small_id(), small_id()).prop_map(
            |(session, request_id, ack_below, target)| Command::Cancel {
                session,
                request_id,
                ack_below,
                target
            }
        ),
        Just(Command::Tick),
        session_id().prop_map(|session| Command::Expire { session }),
        Just(Command::Failover),
        session_id().prop_map(|session| Command::Reconnect { session }),
        session_id().prop_map(|session| Command::FenceStart { session }),
        (session_id(), 0u32..3, any::<bool>(), any::<bool>()).prop_map(
            |(session, level_index, last_level, ok)| Command::FenceAttempt {
                session,
                level: level_index + 1,
                level_index,
                last_level,
                ok,
                detail: String::new(),
            }
        ),
        prop_oneof![Just("a"), Just("b"), Just("zz")].prop_map(|n| Command::FenceAck {
            node: n.into(),
            by: "test".into()
        }),
        prop_oneof![Just("a"), Just("b"), Just("zz")]
            .prop_map(|n| Command::ForceExpire { node: n.into() }),
        (session_id(), small_id(), prop_oneof![Just("a"), Just("b")]).prop_map(
            |(session, request_id, node)| Command::RecoveryDone {
                session,
                request_id,
                lockspace: LS.into(),
                node: node.into(),
            }
        ),
    ]
}

/// Two sessions (ids 1 and 2) in `LS`, each holding a lock on "r0".
fn seeded() -> State {
    let mut state = State::new();
    for (index, node) in [(1, "a"), (2, "b")] {
        state.apply(
            index,
            0,
            Command::Login {
                node: node.into(),
                nonce: 0,
            },
        );
    }
    for (index, session) in [(3, 1), (4, 2)] {
        let open = Command::OpenLockspace {
            session,
            request_id: 1,
            name: LS.into(),
            lvb_len_bytes: 0,
            recovery: RecoveryMode::Auto,
        };
        state.apply(index, 0, open);
    }
    for (index, session, mode) in [(5, 1, Mode::Pr), (6, 2, Mode::Ex)] {
        let lock = Command::Lock {
            session,
            request_id: 2,
            ack_below: 0,
            lockspace: LS.into(),
            resource: b"r0".to_vec(),
            mode,
            flags: Flags::default(),
            timeout_ms: 0,
        };
        state.apply(index, 0, lock);
    }
    state
}

proptest! {
    #[test]
    fn arbitrary_commands_never_panic_and_refusals_change_nothing(
        commands in prop::collection::vec((0u64..3, command()), 1..40)
    ) {
        let mut state = seeded();
        let mut index = 6;
        let mut now_ms = 0;
        for (advance_ms, cmd) in commands {
            index += 1;
            now_ms += advance_ms;
            let before = state.encode();
            let (reply, events) = state.apply(index, now_ms, cmd);
            if refused(&reply) {
                prop_assert!(events.is_empty());
                prop_assert_eq!(state.encode(), before);
            }
            let copy = State::decode(&state.encode());
            prop_assert!(copy.is_ok(), "{:?}", copy.err());
            prop_assert!(state.check_queue_rules().is_ok());
        }
    }

    #[test]
    fn corrupt_snapshots_are_refused_or_usable(
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        commands in prop::collection::vec(command(), 0..10),
    ) {
        let mut bytes = seeded().encode();
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        if let Ok(mut state) = State::decode(&bytes) {
            let mut index = state.core.last_id;
            for cmd in commands {
                index += 1;
                state.apply(index, 0, cmd);
            }
            let _ = state.mark_expired_holders(1);
            prop_assert!(State::decode(&state.encode()).is_ok());
        }
    }

    #[test]
    fn arbitrary_bytes_never_make_decode_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = State::decode(&bytes);
        let _ = postcard::from_bytes::<Core>(&bytes);
    }

    /// Raft entries carry postcard-encoded commands: whatever bytes a log holds, the
    /// decoder refuses them or yields a command the table applies without panicking,
    /// and a refused command changes nothing.
    #[test]
    fn arbitrary_bytes_decoded_as_a_command_never_panic_when_applied(
        bytes in prop::collection::vec(any::<u8>(), 0..256)
    ) {
        if let Ok(cmd) = postcard::from_bytes::<Command>(&bytes) {
            let mut state = seeded();
            let before = state.encode();
            let index = state.core.last_id + 1;
            let (reply, events) = state.apply(index, 0, cmd);
            if refused(&reply) {
                prop_assert!(events.is_empty());
                prop_assert_eq!(state.encode(), before);
            }
            prop_assert!(state.check_queue_rules().is_ok());
        }
    }

    /// What the leader encodes, every replica decodes to the same command.
    #[test]
    fn commands_survive_their_log_encoding(cmd in command()) {
        let bytes = postcard::to_allocvec(&cmd).expect("commands encode");
        let back: Command = postcard::from_bytes(&bytes).expect("encoded commands decode");
        prop_assert_eq!(back, cmd);
    }
}
