//! Three drivers in one process, as raft-rs's harness runs its nodes: an in-memory
//! network (an [`Outbox`] that puts each message on the receiver's input queue, with
//! servers that can be cut off) and storage in temp directories. No sockets, no
//! processes; every wait polls with a deadline.

use super::*;
use crate::config::{Config, FenceDeviceConfig, NodeConfig};
use crate::state::{FenceStep, Flags, Mode, NodeState, RecoveryMode, Reply, SessionId};
use raft::eraftpb::MessageType;
use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// How long any awaited outcome may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(20);

/// The in-memory network: each server's input queue, the servers cut off from all
/// others, and the ReadIndex rounds the leaders sent (heartbeat contexts).
#[derive(Clone, Default)]
pub(super) struct Net {
    inboxes: Arc<Mutex<HashMap<u64, mpsc::Sender<Input>>>>,
    pub(super) cut: Arc<Mutex<HashSet<u64>>>,
    read_rounds: Arc<Mutex<HashSet<Vec<u8>>>>,
}

impl Net {
    pub(super) fn cut_off(&self, id: u64) {
        self.cut.lock().unwrap().insert(id);
    }

    fn read_rounds(&self) -> usize {
        self.read_rounds.lock().unwrap().len()
    }
}

struct MemOutbox {
    from: u64,
    net: Net,
}

impl Outbox for MemOutbox {
    fn send(&mut self, messages: Vec<Message>) {
        let cut = self.net.cut.lock().unwrap().clone();
        let inboxes = self.net.inboxes.lock().unwrap().clone();
        for m in messages {
            if cut.contains(&self.from) || cut.contains(&m.to) {
                continue;
            }
            if m.get_msg_type() == MessageType::MsgHeartbeat && !m.context.is_empty() {
                self.net
                    .read_rounds
                    .lock()
                    .unwrap()
                    .insert(m.context.to_vec());
            }
            if let Some(inbox) = inboxes.get(&m.to) {
                // A full queue drops, as the transport does; Raft retransmits.
                let _ = inbox.try_send(Input::Raft(Box::new(m)));
            }
        }
    }

    fn add_peer(&mut self, _id: u64, _addr: &str) {}

    fn remove_peer(&mut self, _id: u64) {}
}

pub(super) struct Cluster {
    handles: Vec<Handle>,
    pub(super) net: Net,
    _dir: tempfile::TempDir,
}

/// A config of three servers with fast ticks and nodes that never expire on their
/// own (the tests expire them by hand).
fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::dev(3, 40_000, dir.to_path_buf());
    config.timing.tick_ms = 10;
    config.timing.election_ticks = 10;
    config.timing.heartbeat_ticks = 2;
    config.timing.proposal_timeout_ms = 2_000;
    config.liveness.heartbeat_interval_ms = 600_000;
    config.fencing.retry_backoff_ms = 100;
    config
}

impl Cluster {
    /// Starts three bootstrapped drivers as tasks of the test's runtime, each told
    /// that its peers run this build (log format [`LOG_FORMAT`]).
    pub(super) fn start(edit: impl FnOnce(&mut Config)) -> Cluster {
        Cluster::start_announcing(edit, Some(LOG_FORMAT))
    }

    /// As [`Cluster::start`], with the peers' streams announcing `log_format` (`None`:
    /// no announcement yet, as before any peer connected).
    pub(super) fn start_announcing(
        edit: impl FnOnce(&mut Config),
        log_format: Option<u32>,
    ) -> Cluster {
        let dir = tempfile::TempDir::new().unwrap();
        let mut config = config(dir.path());
        edit(&mut config);
        let net = Net::default();
        let channels: Vec<_> = (1..=3).map(|_| input_channel()).collect();
        for (id, (tx, _)) in (1..=3).zip(&channels) {
            net.inboxes.lock().unwrap().insert(id, tx.clone());
        }
        let mut handles = Vec::new();
        for (id, channel) in (1..=3).zip(channels) {
            let outbox = MemOutbox {
                from: id,
                net: net.clone(),
            };
            let uid = ClusterUid::default();
            let (node, handle) =
                RaftNode::open(&config, id, Start::Bootstrap, uid, outbox, channel).unwrap();
            tokio::spawn(node.run());
            handles.push(handle);
        }
        // What the transport reports when a peer's stream shows this cluster's identity.
        for (id, handle) in (1..=3).zip(&handles) {
            for peer in (1..=3).filter(|p| *p != id) {
                handle.inputs.try_send(Input::PeerConfirmed(peer)).unwrap();
                if let Some(format) = log_format {
                    let announced = Input::PeerLogFormat { peer, format };
                    handle.inputs.try_send(announced).unwrap();
                }
            }
        }
        Cluster {
            handles,
            net,
            _dir: dir,
        }
    }

    pub(super) fn handle(&self, id: u64) -> &Handle {
        &self.handles[id as usize - 1]
    }

    /// Waits until one of `among` leads; returns its id.
    pub(super) async fn leader_among(&self, among: &[u64]) -> u64 {
        eventually("a leader is elected", || {
            among
                .iter()
                .copied()
                .find(|id| self.handle(*id).status().role == Role::Leader)
        })
        .await
    }

    pub(super) async fn login(&self, leader: u64, node: &str) -> SessionId {
        let reply = self
            .handle(leader)
            .propose(Command::Login {
                node: node.into(),
                nonce: 1,
            })
            .await
            .unwrap();
        let Reply::LoggedIn { session } = reply else {
            panic!("login of {node}: {reply:?}");
        };
        let opened = self
            .handle(leader)
            .propose(Command::OpenLockspace {
                session,
                request_id: 1,
                name: "fs".into(),
                lvb_len_bytes: 0,
                recovery: RecoveryMode::Auto,
            })
            .await
            .unwrap();
        assert!(
            matches!(opened, Reply::LockspaceOpened { .. }),
            "{opened:?}"
        );
        session
    }
}

/// An EX lock on `inode-1` in lockspace `fs`.
pub(super) fn lock_ex(session: SessionId, request_id: u64) -> Command {
    lock_ex_on(session, request_id, "inode-1")
}

/// An EX lock on `resource` in lockspace `fs`.
pub(super) fn lock_ex_on(session: SessionId, request_id: u64, resource: &str) -> Command {
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

/// Polls `probe` until it yields a value; fails the test after [`DEADLINE`].
pub(super) async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < until, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `call`; fails the test after [`DEADLINE`] (a call that hangs is a bug).
pub(super) async fn within<T>(what: &str, call: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, call)
        .await
        .unwrap_or_else(|_| panic!("not answered within {DEADLINE:?}: {what}"))
}

/// A call to the driver running on a task of its own.
type Waiter = tokio::task::JoinHandle<Result<Reply, ProposeError>>;

/// node1 holds an EX lock on the leader; node2's EX request on the same resource waits
/// in the table. Returns the leader, node1's session and grant, and node2's call.
async fn one_holder_one_waiter(
    cluster: &Cluster,
) -> (u64, SessionId, crate::state::GrantInfo, Waiter) {
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let (a, b) = (
        cluster.login(leader, "node1").await,
        cluster.login(leader, "node2").await,
    );
    let handle = cluster.handle(leader).clone();
    let Reply::Granted(first) = handle.propose(lock_ex(a, 2)).await.unwrap() else {
        panic!("node1's lock is not granted");
    };
    let waiter = tokio::spawn({
        let handle = handle.clone();
        async move { handle.propose(lock_ex(b, 2)).await }
    });
    eventually("node2's request waits in the table", || {
        (handle.status().waiting == 1).then_some(())
    })
    .await;
    (leader, a, first, waiter)
}

/// Callers' commands that reach the leader in one loop turn go out as one entry
/// (`Op::Batch`); each caller still gets its own reply with its own lock id, and
/// every replica applies them alike.
#[tokio::test]
async fn the_commands_of_one_turn_share_an_entry_and_keep_their_own_replies() {
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let entries = entries_of_one_turn(&cluster, leader, a, 0, || {}).await;
    assert!(
        entries < TURN_CALLS / 4,
        "{TURN_CALLS} commands of one turn took {entries} entries"
    );
}

/// Rolling upgrades: a server of log format 1 stops at the first `Op::Batch` entry,
/// so a leader writes one command per entry while any peer has not announced format
/// 2 on its latest stream: never announced (not connected since the leader
/// started), or announced 1 (restarted as an older build). Once all have, it batches.
#[tokio::test]
async fn a_leader_batches_only_once_every_peer_announced_a_build_that_reads_batches() {
    let cluster = Cluster::start_announcing(|_| {}, None);
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let (f1, f2) = match leader {
        1 => (2, 3),
        2 => (1, 3),
        _ => (1, 2),
    };
    let announce = |peer: u64, format: u32| {
        let input = Input::PeerLogFormat { peer, format };
        cluster.handle(leader).inputs.try_send(input).unwrap();
    };
    // Streams naming ids of no member fill the record (it is bounded) but never keep
    // the members' own announcements out.
    for stranger in 100..400 {
        announce(stranger, LOG_FORMAT_BATCH);
    }
    let one_each = |entries: u64, when: &str| {
        // The leader's own entries may come between.
        assert!(
            entries >= TURN_CALLS,
            "{when}: {entries} entries, not one per command"
        );
    };
    one_each(
        entries_of_one_turn(&cluster, leader, a, 0, || {}).await,
        "nobody announced",
    );
    announce(f1, LOG_FORMAT_BATCH);
    announce(f2, 1);
    one_each(
        entries_of_one_turn(&cluster, leader, a, 1, || {}).await,
        "one peer of format 1",
    );
    announce(f2, LOG_FORMAT_BATCH);
    let entries = entries_of_one_turn(&cluster, leader, a, 2, || {}).await;
    assert!(entries < TURN_CALLS / 4, "all announced: {entries} entries");
    announce(f1, 1);
    one_each(
        entries_of_one_turn(&cluster, leader, a, 3, || {}).await,
        "a peer back as format 1",
    );
    announce(f1, LOG_FORMAT_BATCH);
    // The announcement comes in the middle of a turn: the commands gathered before it
    // go out one per entry too.
    let midway = || announce(f2, 1);
    one_each(
        entries_of_one_turn(&cluster, leader, a, 4, midway).await,
        "format 1 announced midway",
    );
}

/// A server added to the cluster counts as an older build until its own stream
/// announces log format 2, also when its id belonged to a server removed before: the
/// removed server's announcement goes with it.
#[tokio::test]
async fn a_server_added_again_under_a_removed_id_must_announce_its_own_log_format() {
    use crate::membership::Change;
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let handle = cluster.handle(leader);
    let batched = |entries: u64| entries < TURN_CALLS / 4;
    let add = || Change::AddLearner {
        id: 4,
        addr: "127.0.0.1:1".into(),
    };
    assert!(batched(
        entries_of_one_turn(&cluster, leader, a, 0, || {}).await
    ));
    within("adding server 4", handle.change_membership(add()))
        .await
        .unwrap();
    assert!(!batched(
        entries_of_one_turn(&cluster, leader, a, 1, || {}).await
    ));
    let announced = Input::PeerLogFormat {
        peer: 4,
        format: LOG_FORMAT,
    };
    handle.inputs.try_send(announced).unwrap();
    assert!(batched(
        entries_of_one_turn(&cluster, leader, a, 2, || {}).await
    ));
    let removed = handle.change_membership(Change::Remove { id: 4 });
    within("removing server 4", removed).await.unwrap();
    within("adding server 4 again", handle.change_membership(add()))
        .await
        .unwrap();
    let entries = entries_of_one_turn(&cluster, leader, a, 3, || {}).await;
    assert!(
        !batched(entries),
        "{entries} entries with server 4 unannounced"
    );
}

/// Locks queued for one driver turn by [`entries_of_one_turn`].
const TURN_CALLS: u64 = 40;

/// Sends [`TURN_CALLS`] EX locks of `session` on fresh resources (round `round`) to
/// the leader in one loop turn, calling `midway` once half of them are queued; checks
/// each caller got its own grant and every replica applied them alike; returns the
/// entries they took.
async fn entries_of_one_turn(
    cluster: &Cluster,
    leader: u64,
    session: SessionId,
    round: u64,
    midway: impl FnOnce(),
) -> u64 {
    let handle = cluster.handle(leader);
    let before = handle.status();
    let call = |i: u64| {
        let request_id = 2 + round * TURN_CALLS + i;
        let resource = format!("inode-{round}-{i}");
        handle.propose(lock_ex_on(session, request_id, &resource))
    };
    let half = TURN_CALLS / 2;
    // On this single-threaded runtime the driver runs only once every call below has
    // queued its input (`join` polls the first half, then the second), so they meet
    // in one turn.
    let first = futures::future::join_all((0..half).map(call));
    let second = async {
        midway();
        futures::future::join_all((half..TURN_CALLS).map(call)).await
    };
    let both = futures::future::join(first, second);
    let (mut replies, rest) = within("the turn's locks", both).await;
    replies.extend(rest);
    let mut ids = HashSet::new();
    for reply in replies {
        match reply {
            Ok(Reply::Granted(grant)) => assert!(ids.insert(grant.lock_id), "{grant:?}"),
            other => panic!("a caller got {other:?}"),
        }
    }
    let after = handle.status();
    assert_eq!(after.held_locks, before.held_locks + TURN_CALLS);
    for id in 1..=3 {
        eventually("every replica applied the turn alike", || {
            let status = cluster.handle(id).status();
            (status.applied >= after.applied
                && status.held_locks == after.held_locks
                && status.last_token == after.last_token)
                .then_some(())
        })
        .await;
    }
    after.applied - before.applied
}

/// A call the driver has not answered is parked, not lost: it is answered with the
/// grant as soon as the table grants it.
#[tokio::test]
async fn a_queued_lock_is_parked_until_the_table_grants_it() {
    let cluster = Cluster::start(|_| {});
    let (leader, a, first, waiter) = one_holder_one_waiter(&cluster).await;
    let handle = cluster.handle(leader);
    assert!(
        !waiter.is_finished(),
        "a queued request is not answered yet"
    );
    let unlocked = handle
        .propose(Command::Unlock {
            session: a,
            request_id: 3,
            ack_below: 3,
            lock_id: first.lock_id,
            lvb: None,
        })
        .await
        .unwrap();
    assert_eq!(unlocked, Reply::Ok);
    match within("the parked call", waiter).await.unwrap() {
        Ok(Reply::Granted(grant)) => assert!(grant.token > first.token),
        other => panic!("the parked caller got {other:?}"),
    }
}

/// A leader that loses its quorum fails its parked callers with NotLeader, so they
/// retry on the new leader instead of hanging.
#[tokio::test]
async fn parked_callers_fail_when_leadership_is_lost() {
    let cluster = Cluster::start(|_| {});
    let (leader, _, _, waiter) = one_holder_one_waiter(&cluster).await;
    cluster.net.cut_off(leader);
    match within("the parked call on a deposed leader", waiter)
        .await
        .unwrap()
    {
        Err(ProposeError::NotLeader { .. }) => {}
        other => panic!("the parked caller got {other:?}"),
    }
}

/// The heartbeats of one loop turn are confirmed by one ReadIndex round, and a leader
/// cut off from its quorum never confirms one (so a node's `Lost` comes first).
#[tokio::test]
async fn heartbeats_of_one_turn_share_one_read_index_round() {
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let session = cluster.login(leader, "node1").await;
    let handle = cluster.handle(leader).clone();
    let rounds_before = cluster.net.read_rounds();
    // Queued before the driver (a task of this single-threaded runtime) runs again,
    // so one turn takes them all.
    let mut replies = Vec::new();
    for _ in 0..50 {
        let (reply, rx) = oneshot::channel();
        handle
            .inputs
            .try_send(Input::Heartbeat { session, reply })
            .unwrap();
        replies.push(rx);
    }
    for rx in replies {
        let state = within("a heartbeat", rx).await.unwrap().unwrap();
        assert_eq!(state, Some(NodeState::LoggedIn));
    }
    assert_eq!(
        cluster.net.read_rounds() - rounds_before,
        1,
        "50 heartbeats of one turn, one ReadIndex round"
    );
    cluster.net.cut_off(leader);
    let beat = within("a heartbeat on a cut-off leader", handle.heartbeat(session)).await;
    assert!(
        matches!(
            beat,
            Err(ProposeError::NoQuorum(_) | ProposeError::NotLeader { .. })
        ),
        "a leader without its quorum confirmed a heartbeat: {beat:?}"
    );
}

/// A fence that a leader started and could not finish is resumed by the next leader
/// from the replicated progress.
#[tokio::test]
async fn a_new_leader_resumes_an_unfinished_fence() {
    let agents = tempfile::TempDir::new().unwrap();
    let agent = agents.path().join("fence_until_allowed");
    let allowed = agents.path().join("allowed");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\ncat >/dev/null\n[ -e {} ] && exit 0\nexit 1\n",
            allowed.display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cluster = Cluster::start(|config| {
        config.nodes = vec![NodeConfig {
            name: "node1".into(),
            fence: vec![FenceDeviceConfig {
                level: 1,
                agent: agent.clone(),
                action: Default::default(),
                timeout_ms: 5_000,
                params: Default::default(),
                unfence: false,
            }],
        }];
    });
    let first = cluster.leader_among(&[1, 2, 3]).await;
    cluster.login(first, "node1").await;
    let expired = cluster
        .handle(first)
        .propose(Command::ForceExpire {
            node: "node1".into(),
        })
        .await
        .unwrap();
    assert_eq!(expired, Reply::Ok);
    // The first leader's agent fails until allowed: wait for a failed attempt.
    let history = || async { cluster.handle(first).fence_history().await.unwrap() };
    let until = Instant::now() + DEADLINE;
    while !history()
        .await
        .iter()
        .any(|r| matches!(r.what, FenceStep::Attempt { ok: false, .. }))
    {
        assert!(Instant::now() < until, "no failed fence attempt recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.net.cut_off(first);
    let others: Vec<u64> = (1..=3).filter(|id| *id != first).collect();
    let second = cluster.leader_among(&others).await;
    std::fs::write(&allowed, b"").unwrap();
    let until = Instant::now() + DEADLINE;
    loop {
        let records = cluster.handle(second).fence_history().await.unwrap();
        if records
            .iter()
            .any(|r| matches!(r.what, FenceStep::Done { .. }))
        {
            break;
        }
        assert!(
            Instant::now() < until,
            "the new leader did not finish the fence: {records:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Fenced, the node's session may log in again.
    let again = cluster
        .handle(second)
        .propose(Command::Login {
            node: "node1".into(),
            nonce: 2,
        })
        .await
        .unwrap();
    assert!(matches!(again, Reply::LoggedIn { .. }), "{again:?}");
}
