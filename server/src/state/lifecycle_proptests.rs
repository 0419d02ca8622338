//! Property tests of BRIEF §3.4's central rule over every node state: random histories
//! interleave expiry, forced expiry, fence start, fence attempts (failed and
//! successful), operator acks, recovery, logout, login, logins that need unfencing and
//! unfence attempts (issue 15), failover and reconnect with requests from sessions in
//! every state — the node's current session and its older
//! ones ("zombies": a node that lives on while its fence agent runs). After every
//! applied entry:
//!
//! - a request from a session that may not act is refused naming its state, emits
//!   nothing and changes nothing, byte for byte;
//! - between a node's expiry and its fence completion none of its granted locks is
//!   released or changed, by any command;
//! - after fencing, what is left of it are expired PW/EX holders in explicit
//!   lockspaces, released only by a live node's RecoveryDone;
//! - an Unfencing session owns nothing; its unfencing ends only by an unfence attempt
//!   (success: LoggedIn; last failure: gone), and says so with one `Unfenced` event;
//! - the table is consistent (its snapshot decodes, the queue rules hold), tokens only
//!   grow, and nothing panics;
//!
//! and the whole history replays to the same replies, events and bytes.

use super::*;
use proptest::prelude::*;
use std::collections::BTreeMap;

const NODES: usize = 3;
const LOCKSPACES: [(&str, RecoveryMode); 2] = [
    ("auto", RecoveryMode::Auto),
    ("gfs", RecoveryMode::Explicit),
];
const RESOURCES: [&str; 2] = ["r0", "r1"];

#[derive(Clone, Debug)]
enum Kind {
    Lock {
        ls: usize,
        res: usize,
        mode: Mode,
        noexp: bool,
        try_: bool,
    },
    Convert {
        pick: usize,
        mode: Mode,
    },
    Unlock {
        pick: usize,
    },
    Cancel {
        back: u64,
    },
    Logout,
    Open {
        ls: usize,
    },
    RecoveryDone {
        ls: usize,
        of: usize,
    },
}

#[derive(Clone, Debug)]
enum Step {
    /// A request from the node's current session, or (`zombie`) from an older one.
    Request {
        who: usize,
        zombie: bool,
        kind: Kind,
    },
    Login {
        who: usize,
    },
    LoginUnfencing {
        who: usize,
        /// Reuse the nonce of the node's last login (a retry) instead of a new one.
        retry: bool,
    },
    UnfenceAttempt {
        who: usize,
        ok: bool,
        last_attempt: bool,
    },
    Expire {
        who: usize,
    },
    ForceExpire {
        who: usize,
    },
    FenceStart {
        who: usize,
    },
    FenceAttempt {
        who: usize,
        ok: bool,
        last_level: bool,
    },
    FenceAck {
        who: usize,
    },
    Failover,
    Reconnect {
        who: usize,
    },
    Tick {
        advance_ms: u64,
    },
    Snapshot,
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![
        1 => Just(Mode::Nl),
        1 => Just(Mode::Cr),
        1 => Just(Mode::Cw),
        2 => Just(Mode::Pr),
        1 => Just(Mode::Pw),
        3 => Just(Mode::Ex),
    ]
}

fn kind() -> impl Strategy<Value = Kind> {
    let ls = || 0..LOCKSPACES.len();
    prop_oneof![
        6 => (ls(), 0..RESOURCES.len(), mode(), prop::bool::weighted(0.2), prop::bool::weighted(0.2))
            .prop_map(|(ls, res, mode, noexp, try_)| Kind::Lock { ls, res, mode, noexp, try_ }),
        3 => (any::<usize>(), mode()).prop_map(|(pick, mode)| Kind::Convert { pick, mode }),
        3 => any::<usize>().prop_map(|pick| Kind::Unlock { pick }),
        1 => (0u64..4).prop_map(|back| Kind::Cancel { back }),
        1 => Just(Kind::Logout),
        2 => ls().prop_map(|ls| Kind::Open { ls }),
        2 => (ls(), 0..NODES).prop_map(|(ls, of)| Kind::RecoveryDone { ls, of }),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let who = || 0..NODES;
    prop_oneof![
        12 => (who(), prop::bool::weighted(0.3), kind())
            .prop_map(|(who, zombie, kind)| Step::Request { who, zombie, kind }),
        2 => who().prop_map(|who| Step::Login { who }),
        2 => (who(), any::<bool>()).prop_map(|(who, retry)| Step::LoginUnfencing { who, retry }),
        2 => (who(), any::<bool>(), any::<bool>())
            .prop_map(|(who, ok, last_attempt)| Step::UnfenceAttempt { who, ok, last_attempt }),
        2 => who().prop_map(|who| Step::Expire { who }),
        1 => who().prop_map(|who| Step::ForceExpire { who }),
        2 => who().prop_map(|who| Step::FenceStart { who }),
        3 => (who(), any::<bool>(), any::<bool>())
            .prop_map(|(who, ok, last_level)| Step::FenceAttempt { who, ok, last_level }),
        1 => who().prop_map(|who| Step::FenceAck { who }),
        1 => Just(Step::Failover),
        1 => who().prop_map(|who| Step::Reconnect { who }),
        1 => (0u64..50).prop_map(|advance_ms| Step::Tick { advance_ms }),
        1 => Just(Step::Snapshot),
    ]
}

/// A granted lock as the central rule sees it.
type Held = BTreeMap<LockId, (SessionId, Option<Mode>, u64, bool)>;

struct Run {
    state: State,
    index: u64,
    now_ms: u64,
    /// Every session each node ever had, newest last.
    sessions: Vec<Vec<SessionId>>,
    next_request: BTreeMap<SessionId, RequestId>,
    last_token: u64,
    /// The nonce of each node's last LoginUnfencing, for retries.
    nonces: BTreeMap<usize, u64>,
    log: Vec<(u64, u64, Command, Reply, Vec<Event>)>,
}

impl Run {
    fn new() -> Run {
        let mut run = Run {
            state: State::new(),
            index: 0,
            now_ms: 1_000,
            sessions: vec![Vec::new(); NODES],
            next_request: BTreeMap::new(),
            last_token: 0,
            nonces: BTreeMap::new(),
            log: Vec::new(),
        };
        for who in 0..NODES {
            run.step(Step::Login { who });
            for ls in 0..LOCKSPACES.len() {
                run.step(Step::Request {
                    who,
                    zombie: false,
                    kind: Kind::Open { ls },
                });
            }
        }
        run
    }

    fn session(&self, who: usize, zombie: bool) -> SessionId {
        let all = &self.sessions[who];
        match (zombie, all.len()) {
            (_, 0) => 424_242,
            (true, n) if n >= 2 => all[n - 2],
            (_, n) => all[n - 1],
        }
    }

    fn request_id(&mut self, session: SessionId) -> RequestId {
        let next = self.next_request.entry(session).or_insert(1);
        *next += 1;
        *next - 1
    }

    fn held(&self) -> Held {
        self.state
            .core
            .locks
            .iter()
            .filter(|(_, l)| l.granted.is_some())
            .map(|(&id, l)| (id, (l.owner, l.granted, l.token, l.expired)))
            .collect()
    }

    fn request(&mut self, session: SessionId, kind: Kind) -> Command {
        let request_id = self.request_id(session);
        let locks = self.state.locks_of_session(session);
        let pick = |i: usize| {
            locks
                .get(i % locks.len().max(1))
                .copied()
                .unwrap_or(999_999)
        };
        match kind {
            Kind::Lock {
                ls,
                res,
                mode,
                noexp,
                try_,
            } => Command::Lock {
                session,
                request_id,
                ack_below: 0,
                lockspace: LOCKSPACES[ls].0.into(),
                resource: RESOURCES[res].as_bytes().to_vec(),
                mode,
                flags: Flags {
                    noexp,
                    try_,
                    ..Flags::default()
                },
                timeout_ms: if try_ { 0 } else { 30 },
            },
            Kind::Convert { pick: i, mode } => Command::Convert {
                session,
                request_id,
                ack_below: 0,
                lock_id: pick(i),
                mode,
                flags: Flags::default(),
                timeout_ms: 30,
                lvb: None,
            },
            Kind::Unlock { pick: i } => Command::Unlock {
                session,
                request_id,
                ack_below: 0,
                lock_id: pick(i),
                lvb: None,
            },
            Kind::Cancel { back } => Command::Cancel {
                session,
                request_id,
                ack_below: 0,
                target: request_id.saturating_sub(1 + back),
            },
            Kind::Logout => Command::Logout {
                session,
                request_id,
            },
            Kind::Open { ls } => Command::OpenLockspace {
                session,
                request_id,
                name: LOCKSPACES[ls].0.into(),
                lvb_len_bytes: 0,
                recovery: LOCKSPACES[ls].1,
            },
            Kind::RecoveryDone { ls, of } => Command::RecoveryDone {
                session,
                request_id,
                lockspace: LOCKSPACES[ls].0.into(),
                node: format!("n{of}"),
            },
        }
    }

    fn command(&mut self, step: Step) -> Option<Command> {
        Some(match step {
            Step::Request { who, zombie, kind } => {
                let session = self.session(who, zombie);
                self.request(session, kind)
            }
            Step::Login { who } => Command::Login {
                node: format!("n{who}"),
                nonce: self.index,
            },
            Step::LoginUnfencing { who, retry } => {
                let nonce = match (retry, self.nonces.get(&who)) {
                    (true, Some(&nonce)) => nonce,
                    _ => self.index,
                };
                self.nonces.insert(who, nonce);
                Command::LoginUnfencing {
                    node: format!("n{who}"),
                    nonce,
                }
            }
            Step::UnfenceAttempt {
                who,
                ok,
                last_attempt,
            } => Command::UnfenceAttempt {
                session: self.session(who, false),
                ok,
                last_attempt,
                detail: "agent".into(),
            },
            Step::Expire { who } => Command::Expire {
                session: self.session(who, false),
            },
            Step::ForceExpire { who } => Command::ForceExpire {
                node: format!("n{who}"),
            },
            Step::FenceStart { who } => Command::FenceStart {
                session: self.session(who, false),
            },
            Step::FenceAttempt {
                who,
                ok,
                last_level,
            } => Command::FenceAttempt {
                session: self.session(who, false),
                level: 1,
                level_index: 0,
                last_level,
                ok,
                detail: String::new(),
            },
            Step::FenceAck { who } => Command::FenceAck {
                node: format!("n{who}"),
                by: "op".into(),
            },
            Step::Failover => Command::Failover,
            Step::Reconnect { who } => Command::Reconnect {
                session: self.session(who, false),
            },
            Step::Tick { advance_ms } => {
                self.now_ms += advance_ms;
                Command::Tick
            }
            Step::Snapshot => {
                self.state = State::decode(&self.state.encode()).expect("snapshot decodes");
                return None;
            }
        })
    }

    /// The session whose fence `cmd` may complete (the only way a failed node's
    /// locks may go).
    fn fence_completed_by(&self, cmd: &Command) -> Option<SessionId> {
        match cmd {
            Command::FenceAttempt {
                session, ok: true, ..
            } => Some(*session),
            Command::FenceAck { node, .. } => self.state.session_of_node(node),
            _ => None,
        }
    }

    fn step(&mut self, step: Step) {
        let Some(cmd) = self.command(step) else {
            return;
        };
        let before_bytes = self.state.encode();
        let before = self.held();
        let states: BTreeMap<SessionId, NodeState> = self
            .state
            .sessions()
            .map(|s| (s.session, s.state))
            .collect();
        let completes = self.fence_completed_by(&cmd);
        self.index += 1;
        let (reply, events) = self.state.apply(self.index, self.now_ms, cmd.clone());
        self.log.push((
            self.index,
            self.now_ms,
            cmd.clone(),
            reply.clone(),
            events.clone(),
        ));

        // A session that may not act changes nothing.
        if let Some(session) = cmd.session() {
            if let Some(&state) = states.get(&session).filter(|s| !s.may_act()) {
                assert_eq!(
                    reply,
                    Reply::Failed(LockError::SessionNotLive { session, state }),
                    "{cmd:?}"
                );
                assert!(events.is_empty(), "{cmd:?} emitted {events:?}");
                assert_eq!(
                    self.state.encode(),
                    before_bytes,
                    "{cmd:?} changed the table"
                );
            }
        }
        // Between expiry and fence completion nothing of a failed node's moves.
        let after = self.held();
        for (id, held) in &before {
            let owner_state = states.get(&held.0).copied();
            let failed = matches!(owner_state, Some(NodeState::Expired | NodeState::Fencing));
            if failed && completes != Some(held.0) {
                assert_eq!(
                    after.get(id),
                    Some(held),
                    "lock {id} of failed session {} ({owner_state:?}) moved on {cmd:?}",
                    held.0
                );
            }
            // A fenced node's leftovers go only by a live node's RecoveryDone.
            if owner_state == Some(NodeState::Fenced) && after.get(id) != Some(held) {
                assert!(
                    matches!(cmd, Command::RecoveryDone { .. }) && !after.contains_key(id),
                    "fenced session {}'s lock {id} changed on {cmd:?}",
                    held.0
                );
            }
        }
        for (id, (owner, _, _, expired)) in &after {
            if self.state.session_state(*owner) == Some(NodeState::Fenced) {
                assert!(*expired, "fenced session {owner} holds live lock {id}");
            }
        }
        if let (
            Reply::LoggedIn { session } | Reply::Unfencing { session },
            Command::Login { node, .. } | Command::LoginUnfencing { node, .. },
        ) = (&reply, &cmd)
        {
            let who: usize = node[1..].parse().expect("a node of the run");
            if self.sessions[who].last() != Some(session) {
                self.sessions[who].push(*session);
            }
        }
        // Unfencing: nothing owned, and it ends only by an unfence attempt, told once.
        for s in self.state.sessions() {
            if s.state == NodeState::Unfencing {
                assert!(
                    self.state.locks_of_session(s.session).is_empty(),
                    "unfencing session {} owns locks",
                    s.session
                );
            }
        }
        for (&session, &state) in &states {
            let now = self.state.session_state(session);
            if state == NodeState::Unfencing && now != Some(NodeState::Unfencing) {
                let ended_by = matches!(
                    cmd,
                    Command::UnfenceAttempt { session: s, .. } if s == session
                );
                assert!(ended_by, "unfencing of {session} ended by {cmd:?}");
                let told: Vec<_> = events
                    .iter()
                    .filter_map(|e| match e {
                        Event::Unfenced { session: s, result } if *s == session => Some(result),
                        _ => None,
                    })
                    .collect();
                match now {
                    Some(NodeState::LoggedIn) => assert_eq!(told, [&Ok(())]),
                    None => assert!(told.len() == 1 && told[0].is_err(), "{told:?}"),
                    other => panic!("unfencing of {session} ended in {other:?}"),
                }
            }
        }
        for e in &events {
            if let Event::Unfenced { session, .. } = e {
                assert_eq!(states.get(session), Some(&NodeState::Unfencing), "{e:?}");
            }
        }
        // Tokens only grow.
        assert!(self.state.last_token() >= self.last_token);
        self.last_token = self.state.last_token();
        let copy = State::decode(&self.state.encode());
        assert!(copy.is_ok(), "after {cmd:?}: {:?}", copy.err());
        self.state.check_queue_rules().expect("queue rules hold");
    }

    fn replay(&self) {
        let mut fresh = State::new();
        for (index, now_ms, cmd, reply, events) in &self.log {
            let out = fresh.apply(*index, *now_ms, cmd.clone());
            assert_eq!(
                &out,
                &(reply.clone(), events.clone()),
                "replay diverged at {cmd:?}"
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
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn failed_nodes_change_nothing_until_fenced_in_every_state(
        steps in prop::collection::vec(step(), 1..150)
    ) {
        let mut run = Run::new();
        for step in steps {
            run.step(step);
        }
        run.replay();
    }
}

/// The property is not vacuous: the histories it draws do reach every state with
/// locks held and requests sent from it.
#[test]
fn the_histories_reach_every_node_state_with_requests() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut refused_in: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..200 {
        let steps = prop::collection::vec(step(), 1..150)
            .new_tree(&mut runner)
            .expect("a history")
            .current();
        let mut run = Run::new();
        for step in steps {
            run.step(step);
        }
        for (_, _, _, reply, _) in &run.log {
            if let Reply::Failed(LockError::SessionNotLive { state, .. }) = reply {
                *refused_in.entry(format!("{state:?}")).or_default() += 1;
            }
        }
    }
    for state in ["Expired", "Fencing", "Fenced", "Unfencing"] {
        assert!(
            refused_in.get(state).copied().unwrap_or(0) > 10,
            "few requests from {state} sessions: {refused_in:?}"
        );
    }
}
