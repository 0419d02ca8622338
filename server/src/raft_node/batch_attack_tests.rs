//! An outside reviewer's tests of one turn's commands batched into one entry
//! (`Op::Batch`): ordering against the other inputs of the same turn, retries inside a
//! batch, replicas and a lagging follower applying batches alike, and the arithmetic of
//! entry contexts and offsets (`Proposals::take`).
//!
//! To put several inputs into one loop turn, a test pushes them with `try_send` onto
//! the leader's queue without yielding: the drivers run on the test's single-threaded
//! runtime, so they see every one of them in their next turn.

use super::proposals::{Own, Proposals, Waiting};
use super::tests::{eventually, lock_ex, lock_ex_on, within, Cluster};
use super::*;
use crate::state::Reply;
use tokio::sync::oneshot;

type Answer = oneshot::Receiver<Result<Reply, ProposeError>>;

/// Puts a command on `id`'s input queue (no await: it joins the driver's next turn).
fn queue(cluster: &Cluster, id: u64, command: Command) -> Answer {
    let (reply, answer) = oneshot::channel();
    cluster
        .handle(id)
        .inputs
        .try_send(Input::Propose { command, reply })
        .expect("the input queue has room");
    answer
}

async fn granted(what: &str, answer: Answer) -> crate::state::GrantInfo {
    match within(what, answer).await {
        Ok(Ok(Reply::Granted(grant))) => grant,
        other => panic!("{what}: {other:?}"),
    }
}

/// Every replica's lock rows, as text (ids, sessions, modes, tokens, queues).
async fn rows(cluster: &Cluster, id: u64) -> String {
    let (rows, cut) = cluster
        .handle(id)
        .locks(LocksQuery {
            limit: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!cut);
    format!("{rows:?}")
}

/// A caller's command that reaches the leader in the same turn as, and before, a
/// graceful hand-over (`TransferLeadership`, sent by `step_down` at shutdown) must be
/// proposed before the hand-over starts, as it was when every command was proposed
/// at once. Were it gathered until the end of the turn, it would be proposed only
/// after `raw.transfer_leader`, and raft-rs drops every proposal while a transfer is
/// in progress: the caller got NotLeader naming this very server (found by this
/// test; `transfer_leadership` now flushes the gathered commands first).
#[tokio::test]
async fn a_command_queued_before_a_leadership_transfer_in_one_turn_is_still_proposed() {
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    // Both followers have been heard from (the login committed), so one is a target.
    let lock = queue(&cluster, leader, lock_ex(a, 2));
    let (tx, transfer) = oneshot::channel();
    cluster
        .handle(leader)
        .inputs
        .try_send(Input::TransferLeadership(tx))
        .unwrap();
    let target = within("the transfer's answer", transfer).await.unwrap();
    assert_ne!(target, 0, "a follower to hand over to");
    match within("the lock queued before the transfer", lock).await {
        Ok(Ok(Reply::Granted(_))) => {}
        other => panic!("a command that arrived before the hand-over got {other:?}"),
    }
}

/// A read (`Op::Read`) that arrives after a command in the same turn is answered at a
/// point after that command: the gathered commands are flushed before the marker. One
/// that arrives before it is not held back behind it either.
#[tokio::test]
async fn a_read_of_the_same_turn_sees_the_commands_queued_before_it_and_not_after() {
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let read = |resource: &str| {
        let (reply, answer) = oneshot::channel();
        cluster
            .handle(leader)
            .inputs
            .try_send(Input::Read {
                query: Query::CheckToken {
                    lockspace: "fs".into(),
                    resource: resource.as_bytes().to_vec(),
                    token: 0,
                },
                reply,
            })
            .unwrap();
        answer
    };
    let before = read("r1");
    let lock1 = queue(&cluster, leader, lock_ex_on(a, 2, "r1"));
    let lock2 = queue(&cluster, leader, lock_ex_on(a, 3, "r2"));
    let after = read("r2");
    let g1 = granted("lock r1", lock1).await;
    let g2 = granted("lock r2", lock2).await;
    let latest = |answer: Result<QueryAnswer, ProposeError>| match answer {
        Ok(QueryAnswer::Token { latest, .. }) => latest,
        other => panic!("a token read got {other:?}"),
    };
    let before = latest(within("the read before", before).await.unwrap());
    let after = latest(within("the read after", after).await.unwrap());
    assert!(before < g1.token, "the read before the locks saw {before}");
    assert_eq!(after, g2.token, "the read after the locks must see them");
}

/// Retries of one waiting request inside one entry (a client that resent on a
/// timeout while the first copy was still gathered) are all parked and all answered
/// with the one grant; a retry after the grant in the same entry gets the recorded
/// outcome. Nothing is granted twice.
#[tokio::test]
async fn retries_of_a_queued_request_inside_one_entry_are_all_answered_with_one_grant() {
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let b = cluster.login(leader, "node2").await;
    let held = granted("a's lock", queue(&cluster, leader, lock_ex(a, 2))).await;
    // One turn: b asks twice (the same request), a unlocks, b asks a third time.
    let first = queue(&cluster, leader, lock_ex(b, 2));
    let second = queue(&cluster, leader, lock_ex(b, 2));
    let unlock = queue(
        &cluster,
        leader,
        Command::Unlock {
            session: a,
            request_id: 3,
            ack_below: 3,
            lock_id: held.lock_id,
            lvb: None,
        },
    );
    let third = queue(&cluster, leader, lock_ex(b, 2));
    assert!(matches!(
        within("the unlock", unlock).await,
        Ok(Ok(Reply::Ok))
    ));
    let grants = [
        granted("b's first copy", first).await,
        granted("b's second copy", second).await,
        granted("b's third copy", third).await,
    ];
    assert!(
        grants.iter().all(|g| g == &grants[0]),
        "one grant for one request: {grants:?}"
    );
    assert!(grants[0].token > held.token);
    let status = cluster.handle(leader).status();
    assert_eq!((status.held_locks, status.waiting), (1, 0));
}

/// A Logout and then a Lock of the same session in one entry: the Lock is refused
/// (the session is gone), nothing is held, and every replica agrees.
#[tokio::test]
async fn a_logout_then_a_lock_of_that_session_in_one_entry_holds_nothing() {
    let cluster = Cluster::start(|_| {});
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let b = cluster.login(leader, "node2").await;
    let logout = queue(
        &cluster,
        leader,
        Command::Logout {
            session: a,
            request_id: 2,
        },
    );
    let lock_a = queue(&cluster, leader, lock_ex_on(a, 3, "r"));
    let lock_b = queue(&cluster, leader, lock_ex_on(b, 2, "r"));
    assert!(
        matches!(within("the logout", logout).await, Ok(Ok(Reply::Ok))),
        "logout"
    );
    match within("a's lock after its logout", lock_a).await {
        Ok(Ok(Reply::Failed(_))) => {}
        other => panic!("a lock of a logged-out session got {other:?}"),
    }
    let g = granted("b's lock on the same resource", lock_b).await;
    let leader_rows = rows(&cluster, leader).await;
    let applied = cluster.handle(leader).status().applied;
    for id in 1..=3 {
        eventually("every replica applied the entry", || {
            let s = cluster.handle(id).status();
            (s.applied >= applied && s.held_locks == 1 && s.last_token == g.token).then_some(())
        })
        .await;
        assert_eq!(rows(&cluster, id).await, leader_rows, "replica {id}");
    }
}

/// A follower cut off while the leader writes batch entries and snapshots (the
/// interval counted in commands) comes back through the snapshot and the batch
/// entries after it, and ends with exactly the leader's locks: the same lock ids,
/// sessions, tokens and queues.
#[tokio::test]
async fn a_lagging_follower_catches_up_through_snapshots_and_batches_to_the_same_ids() {
    let cluster = Cluster::start(|c| {
        c.timing.snapshot_every_entries = 20;
        c.timing.snapshot_keep_entries = 5;
    });
    let leader = cluster.leader_among(&[1, 2, 3]).await;
    let a = cluster.login(leader, "node1").await;
    let b = cluster.login(leader, "node2").await;
    let lagging = (1..=3).find(|id| *id != leader).unwrap();
    cluster.net.cut_off(lagging);
    let mut request = 2;
    // b's requests that wait behind a's locks: parked, never answered here.
    let mut parked = Vec::new();
    for turn in 0..6 {
        let mut answers = Vec::new();
        for i in 0..30 {
            let resource = format!("t{turn}-r{i}");
            answers.push(queue(&cluster, leader, lock_ex_on(a, request, &resource)));
            if i % 3 == 0 {
                // Waits behind a's lock in the same entry.
                parked.push(queue(&cluster, leader, lock_ex_on(b, request, &resource)));
            } else {
                let own = format!("t{turn}-b{i}");
                answers.push(queue(&cluster, leader, lock_ex_on(b, request, &own)));
            }
            request += 1;
        }
        for answer in answers {
            granted("a batched lock", answer).await;
        }
    }
    assert_eq!(cluster.handle(leader).status().waiting, parked.len() as u64);
    let applied = cluster.handle(leader).status().applied;
    cluster.net.cut.lock().unwrap().remove(&lagging);
    let leader_rows = rows(&cluster, leader).await;
    let leader_status = cluster.handle(leader).status();
    eventually("the lagging follower catches up", || {
        let s = cluster.handle(lagging).status();
        (s.applied >= applied
            && s.held_locks == leader_status.held_locks
            && s.waiting == leader_status.waiting
            && s.last_token == leader_status.last_token)
            .then_some(())
    })
    .await;
    assert_eq!(rows(&cluster, lagging).await, leader_rows);
}

/// `Proposals::take`: the command at offset `j` of an entry is found by the entry's
/// context and `j`, once; a context of another process (another nonce), a short one,
/// or one whose sequence number plus the offset overflows finds nothing and does not
/// panic; bytes past the first 16 are ignored.
#[test]
fn take_finds_each_command_of_an_entry_by_offset_and_nothing_foreign() {
    let mut p = Proposals::new();
    // Three consecutive sequence numbers, as `flush_commands` reserves for a batch.
    let (s0, ctx) = p.next_context();
    let (s1, _) = p.next_context();
    let (s2, _) = p.next_context();
    assert_eq!((s1, s2), (s0 + 1, s0 + 2));
    let mut answers = Vec::new();
    for seq in [s0, s1, s2] {
        let (tx, rx) = oneshot::channel();
        p.track(seq, Waiting::Command(tx), None);
        answers.push(rx);
    }
    assert!(p.take(&[], 0).is_none());
    assert!(p.take(&ctx[..15], 0).is_none(), "a short context");
    let mut foreign = ctx.clone();
    foreign[0] ^= 1;
    assert!(p.take(&foreign, 0).is_none(), "another nonce");
    let mut former = Proposals::new();
    assert!(former.take(&ctx, 0).is_none(), "another process");
    let mut top = ctx[..8].to_vec();
    top.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(p.take(&top, 1).is_none(), "seq + offset overflows");
    assert!(p.take(&top, usize::MAX).is_none());
    assert!(p.take(&ctx, 3).is_none(), "past the entry's commands");
    let mut longer = ctx.clone();
    longer.extend_from_slice(&[0xff; 8]);
    for offset in [2, 0, 1] {
        let found = p.take(&longer, offset).expect("a command of the entry");
        let Waiting::Command(tx) = found.waiting else {
            panic!("not a command")
        };
        let _ = tx.send(Ok(Reply::Ok));
        assert!(p.take(&ctx, offset).is_none(), "taken once");
    }
    for mut rx in answers {
        assert!(matches!(rx.try_recv(), Ok(Ok(Reply::Ok))));
    }
    // The leader's own Tick is forgotten once found.
    let (seq, ctx) = p.next_context();
    p.track(seq, Waiting::Own(Own::Tick), None);
    assert!(p.has_own(Own::Tick));
    assert!(p.take(&ctx, 0).is_some());
    assert!(!p.has_own(Own::Tick));
}
