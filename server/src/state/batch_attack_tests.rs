//! An outside reviewer's tests of ids issued by `State::id_base` when an entry carries
//! several commands (`Op::Batch`): a log of batches replays to the same table and the
//! same replies whatever entry boundary a snapshot falls on (a follower that restarts
//! from its snapshot, `lockd recover` replaying the log), and ids never repeat.

use super::*;

type Entry = (u64, u64, Vec<Command>);

fn login(node: &str, nonce: u64) -> Command {
    Command::Login {
        node: node.into(),
        nonce,
    }
}

fn open(session: SessionId) -> Command {
    Command::OpenLockspace {
        session,
        request_id: 1,
        name: "fs".into(),
        lvb_len_bytes: 0,
        recovery: RecoveryMode::Auto,
    }
}

fn lock(session: SessionId, request_id: u64, resource: &str) -> Command {
    Command::Lock {
        session,
        request_id,
        ack_below: request_id,
        lockspace: "fs".into(),
        resource: resource.as_bytes().to_vec(),
        mode: Mode::Ex,
        flags: Flags::default(),
        timeout_ms: 0,
    }
}

/// Applies `log` to `state` as the driver (and `recovery::replay`) does: each command
/// of an entry with the entry's index.
fn run(state: &mut State, log: &[Entry]) -> Vec<Reply> {
    let mut replies = Vec::new();
    for (index, now_ms, commands) in log {
        for command in commands {
            replies.push(state.apply(*index, *now_ms, command.clone()).0);
        }
    }
    replies
}

/// The id a reply names, if the command created something.
fn created(reply: &Reply) -> Option<u64> {
    match reply {
        Reply::LoggedIn { session } | Reply::Unfencing { session } => Some(*session),
        Reply::Granted(grant) => Some(grant.lock_id),
        Reply::Queued { lock_id } => Some(*lock_id),
        _ => None,
    }
}

#[test]
fn a_log_of_batches_replays_alike_from_a_snapshot_at_any_entry_boundary() {
    // Sessions 1, 2, 3 in entry 1 (ids 1, 2, 3); the next entries' indexes are below
    // the ids already issued, and one leaves a gap (read markers, a configuration
    // change, a new leader's empty entry took 5..=8).
    let (a, b, c) = (1, 2, 3);
    let mut log: Vec<Entry> = vec![
        (1, 1_000, vec![login("a", 1), login("b", 1), login("c", 1)]),
        (2, 1_000, vec![open(a), open(b), open(c)]),
        (
            3,
            1_100,
            vec![
                lock(a, 2, "r1"),
                lock(b, 2, "r1"), // waits behind a
                lock(a, 3, "r2"),
                lock(b, 2, "r1"), // a retry of the waiting request
                Command::Logout {
                    session: c,
                    request_id: 2,
                },
                login("c", 2),    // c again, a new session
                lock(c, 3, "r3"), // the old session: refused
            ],
        ),
        (4, 1_200, vec![lock(b, 3, "r4")]),
    ];
    let mut reference = State::new();
    let replies = run(&mut reference, &log);
    let Reply::Granted(first) = &replies[6] else {
        panic!("a's lock: {:?}", replies[6]);
    };
    log.push((
        9,
        1_300,
        vec![
            Command::Unlock {
                session: a,
                request_id: 4,
                ack_below: 4,
                lock_id: first.lock_id,
                lvb: None,
            },
            lock(a, 5, "r1"), // waits behind b, who was granted by the unlock
            Command::Tick,
        ],
    ));
    let mut whole = State::new();
    let replies = run(&mut whole, &log);
    let ids: Vec<u64> = replies.iter().filter_map(created).collect();
    // The retry names the same lock as its first copy; every other id is new and larger.
    let retry_removed: Vec<u64> = {
        let mut seen = std::collections::BTreeSet::new();
        ids.iter().copied().filter(|id| seen.insert(*id)).collect()
    };
    assert!(
        retry_removed.windows(2).all(|w| w[0] < w[1]),
        "ids in log order: {ids:?}"
    );
    assert_eq!(ids.len(), retry_removed.len() + 1, "one retry: {ids:?}");
    let encoded = whole.encode();
    for cut in 0..=log.len() {
        let mut state = State::new();
        let mut again = run(&mut state, &log[..cut]);
        let mut state = State::decode(&state.encode()).expect("the snapshot decodes");
        again.extend(run(&mut state, &log[cut..]));
        assert_eq!(again, replies, "snapshot after entry {cut}");
        assert_eq!(state.encode(), encoded, "snapshot after entry {cut}");
    }
}

#[test]
fn a_relogin_inside_one_entry_gets_a_new_session_id_and_later_entries_continue_above() {
    let mut state = State::new();
    let e = 10;
    let first = state.apply(e, 0, login("a", 1)).0;
    let out = state
        .apply(
            e,
            0,
            Command::Logout {
                session: e,
                request_id: 1,
            },
        )
        .0;
    let second = state.apply(e, 0, login("a", 2)).0;
    assert_eq!(first, Reply::LoggedIn { session: e });
    assert_eq!(out, Reply::Ok);
    let Reply::LoggedIn { session } = second else {
        panic!("{second:?}");
    };
    assert!(session > e, "a session id is never reused: {session}");
    // The next entry's index is below the ids issued: it continues above them.
    let next = state.apply(e + 1, 0, login("b", 1)).0;
    assert_eq!(
        next,
        Reply::LoggedIn {
            session: session + 1
        }
    );
    // A snapshot keeps the counter.
    let mut decoded = State::decode(&state.encode()).unwrap();
    assert_eq!(
        decoded.apply(e + 2, 0, login("c", 1)).0,
        state.apply(e + 2, 0, login("c", 1)).0
    );
}

/// A snapshot taken where the ids run ahead of its entry index (only batches do that)
/// ends with `IDS_AHEAD_OF_LOG`. A build from before batches refuses bytes after the
/// departures, so it refuses such a snapshot instead of reading the last id as its
/// last applied index and refusing the entries up to it. Taken anywhere else, the
/// bytes are exactly those that build reads.
#[test]
fn a_snapshot_with_ids_ahead_of_its_index_is_refused_by_the_rule_of_older_builds() {
    use super::model::{Core, Departure};
    use super::snapshot::IDS_AHEAD_OF_LOG;
    use std::collections::BTreeMap;
    let mut state = State::new();
    let e = 10;
    for node in ["a", "b"] {
        let reply = state.apply(e, 0, login(node, 1)).0;
        assert!(matches!(reply, Reply::LoggedIn { .. }), "{reply:?}");
    }
    let ahead = state.freeze().encode_at(e);
    let caught_up = state.freeze().encode_at(e + 1);
    assert_eq!(caught_up, state.encode());
    assert_eq!(ahead, [state.encode(), vec![IDS_AHEAD_OF_LOG]].concat());
    for bytes in [&ahead, &caught_up] {
        let decoded = State::decode(bytes).expect("this build reads both");
        assert_eq!(decoded.encode(), state.encode());
    }
    // The older builds' rule: the core, the departures, then nothing.
    let older_builds_read = |bytes: &[u8]| {
        let (_, rest): (Core, &[u8]) = postcard::take_from_bytes(bytes).unwrap();
        let (_, rest): (BTreeMap<String, Departure>, &[u8]) =
            postcard::take_from_bytes(rest).unwrap();
        rest.is_empty()
    };
    assert!(!older_builds_read(&ahead));
    assert!(older_builds_read(&caught_up));
    // Any other trailing bytes are still refused.
    for bad in [
        [caught_up.clone(), vec![7]].concat(),
        [ahead.clone(), vec![IDS_AHEAD_OF_LOG]].concat(),
    ] {
        let err = State::decode(&bad)
            .map(|_| ())
            .expect_err("trailing bytes refused");
        assert!(err.contains("trailing bytes"), "{err}");
    }
}
