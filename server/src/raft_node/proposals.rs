//! Entries this leader proposed and who waits for them: callers in flight (found
//! again by the entry's context when it applies), Lock/Convert callers parked until
//! the lock table finishes their request, and the leader's own Tick and Reconnect
//! entries (one of each in flight at a time).
//!
//! Callers' commands of one loop turn are gathered and proposed together at its end
//! as one entry (`Op::Batch`, up to [`MAX_COMMANDS_PER_ENTRY`]): one Raft entry to
//! encode, send, store and commit instead of one per command. Any other proposal
//! first flushes the gathered commands, so entries keep the order of the inputs.
//!
//! Knows nothing of Raft's internals beyond an entry's context, and decides nothing
//! about a request: whether it waits is the table's `Reply::Queued`.

use super::{Envelope, Member, Op, Outbox, LOG_FORMAT, LOG_FORMAT_BATCH};
use super::{ProposeError, Query, QueryAnswer, RaftNode};
use crate::state::{Command, Reply, RequestId, SessionId};
use crate::telemetry;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{debug, info};

pub(super) type CommandReply = oneshot::Sender<Result<Reply, ProposeError>>;
pub(super) type ReadReply = oneshot::Sender<Result<QueryAnswer, ProposeError>>;
pub(super) type MembershipReply = oneshot::Sender<Result<Vec<Member>, ProposeError>>;

/// Who waits for an entry.
pub(super) enum Waiting {
    Command(CommandReply),
    Read(Query, ReadReply),
    Membership(MembershipReply),
    /// The leader itself, so that it proposes one at a time.
    Own(Own),
}

/// The leader's own entries it keeps count of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Own {
    /// Queue timeouts are due.
    Tick,
    /// A WasLoggedIn session was heard again.
    Reconnect(SessionId),
}

/// Most callers' commands carried by one entry. A command is at most a few hundred
/// bytes (names and LVBs are bounded), so an entry stays far below Raft's
/// `max_size_per_msg`; 64 workers' requests of one turn fit in one entry.
pub(super) const MAX_COMMANDS_PER_ENTRY: usize = 256;

/// Peers whose announced log format is kept (a cluster has at most 5 voters and the
/// servers joining it; the rest are servers removed, or streams naming any id).
const MAX_ANNOUNCED_PEERS: usize = 64;

pub(super) struct InFlight {
    pub(super) waiting: Waiting,
    /// For Lock and Convert: where to park the caller if the request queues.
    park_as: Option<(SessionId, RequestId)>,
    /// When it was appended to the leader's log.
    proposed: Instant,
}

pub(super) struct Proposals {
    /// Proposal context = this process's random nonce + a sequence number, so a reply
    /// goes only to the proposal that made the entry, never to one of a former run.
    nonce: u64,
    next_seq: u64,
    in_flight: HashMap<u64, InFlight>,
    parked: HashMap<(SessionId, RequestId), Vec<CommandReply>>,
    /// Callers' commands of this turn, not yet proposed (`RaftNode::flush_commands`).
    gathered: Vec<(Command, CommandReply)>,
    tick_in_flight: bool,
    reconnecting: HashSet<SessionId>,
}

impl Proposals {
    pub(super) fn new() -> Proposals {
        Proposals {
            nonce: rand::random(),
            next_seq: 0,
            in_flight: HashMap::new(),
            parked: HashMap::new(),
            gathered: Vec::new(),
            tick_in_flight: false,
            reconnecting: HashSet::new(),
        }
    }

    /// The next proposal's sequence number and the entry context that carries it.
    pub(super) fn next_context(&mut self) -> (u64, Vec<u8>) {
        self.next_contexts(1)
    }

    /// Sequence numbers for an entry of `count` commands: the first is in its
    /// context, the command at offset `j` has the first + `j`.
    fn next_contexts(&mut self, count: u64) -> (u64, Vec<u8>) {
        let seq = self.next_seq;
        self.next_seq += count;
        let mut context = Vec::with_capacity(16);
        context.extend_from_slice(&self.nonce.to_le_bytes());
        context.extend_from_slice(&seq.to_le_bytes());
        (seq, context)
    }

    /// Remembers who waits for the entry with sequence number `seq`.
    pub(super) fn track(
        &mut self,
        seq: u64,
        waiting: Waiting,
        park_as: Option<(SessionId, RequestId)>,
    ) {
        match &waiting {
            Waiting::Own(Own::Tick) => self.tick_in_flight = true,
            Waiting::Own(Own::Reconnect(session)) => {
                self.reconnecting.insert(*session);
            }
            _ => {}
        }
        let proposed = Instant::now();
        self.in_flight.insert(
            seq,
            InFlight {
                waiting,
                park_as,
                proposed,
            },
        );
    }

    /// Whether this own entry is already in flight.
    pub(super) fn has_own(&self, own: Own) -> bool {
        match own {
            Own::Tick => self.tick_in_flight,
            Own::Reconnect(session) => self.reconnecting.contains(&session),
        }
    }

    /// Who waits for the command at `offset` in the entry with this context, if this
    /// process proposed it.
    pub(super) fn take(&mut self, context: &[u8], offset: usize) -> Option<InFlight> {
        let nonce = u64::from_le_bytes(context.get(0..8)?.try_into().ok()?);
        let seq = u64::from_le_bytes(context.get(8..16)?.try_into().ok()?);
        if nonce != self.nonce {
            return None;
        }
        let seq = seq.checked_add(u64::try_from(offset).ok()?)?;
        let p = self.in_flight.remove(&seq)?;
        match p.waiting {
            Waiting::Own(own) => self.forget_own(own),
            _ => telemetry::committed(p.proposed.elapsed()),
        }
        Some(p)
    }

    fn forget_own(&mut self, own: Own) {
        match own {
            Own::Tick => self.tick_in_flight = false,
            Own::Reconnect(session) => {
                self.reconnecting.remove(&session);
            }
        }
    }

    /// Answers a command's caller with the table's reply, or parks it until the
    /// request finishes when the table queued it.
    pub(super) fn answer(&mut self, p: InFlight, reply: Reply) {
        let Waiting::Command(tx) = p.waiting else {
            return;
        };
        match (reply, p.park_as) {
            (Reply::Queued { .. }, Some(key)) => {
                let parked = self.parked.entry(key).or_default();
                parked.retain(|tx| !tx.is_closed());
                parked.push(tx);
            }
            (reply, _) => {
                let _ = tx.send(Ok(reply));
            }
        }
    }

    /// The table finished a queued request: answers every caller parked on it.
    pub(super) fn finish(&mut self, key: (SessionId, RequestId), reply: Reply) {
        for tx in self.parked.remove(&key).unwrap_or_default() {
            let _ = tx.send(Ok(reply.clone()));
        }
    }

    /// Fails every proposal older than `timeout`: without a quorum the caller must
    /// hear so quickly rather than hang (BRIEF §3.1).
    pub(super) fn expire(&mut self, now: Instant, timeout: Duration) {
        let expired: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, p)| now.duration_since(p.proposed) >= timeout)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in expired {
            if let Some(p) = self.in_flight.remove(&seq) {
                let msg = format!("entry not committed within {} ms", timeout.as_millis());
                self.fail(p.waiting, ProposeError::NoQuorum(msg));
            }
        }
    }

    /// Fails everything in flight, gathered and parked (on loss of leadership).
    pub(super) fn fail_all(&mut self, err: &ProposeError) {
        for (_, tx) in self.gathered.drain(..) {
            let _ = tx.send(Err(err.clone()));
        }
        let in_flight: Vec<InFlight> = self.in_flight.drain().map(|(_, p)| p).collect();
        for p in in_flight {
            self.fail(p.waiting, err.clone());
        }
        for (_, txs) in self.parked.drain() {
            for tx in txs {
                let _ = tx.send(Err(err.clone()));
            }
        }
        self.tick_in_flight = false;
        self.reconnecting.clear();
    }

    pub(super) fn fail(&mut self, waiting: Waiting, e: ProposeError) {
        match waiting {
            Waiting::Command(tx) => {
                let _ = tx.send(Err(e));
            }
            Waiting::Read(_, tx) => {
                let _ = tx.send(Err(e));
            }
            Waiting::Membership(tx) => {
                let _ = tx.send(Err(e));
            }
            Waiting::Own(own) => self.forget_own(own),
        }
    }
}

/// Where a Lock or Convert caller is parked if the table queues its request.
fn park_key(command: &Command) -> Option<(SessionId, RequestId)> {
    match command {
        Command::Lock {
            session,
            request_id,
            ..
        }
        | Command::Convert {
            session,
            request_id,
            ..
        } => Some((*session, *request_id)),
        _ => None,
    }
}

impl<O: Outbox> RaftNode<O> {
    /// Gathers a caller's command for this turn's entry (`flush_commands`); the
    /// caller is answered when it applies.
    pub(super) fn propose_command(&mut self, command: Command, reply: CommandReply) {
        if !self.is_leader() {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        self.proposals.gathered.push((command, reply));
        if self.proposals.gathered.len() >= MAX_COMMANDS_PER_ENTRY {
            self.flush_commands();
        }
    }

    /// Records the log format a peer's new Raft stream announced. Bounded: with
    /// [`MAX_ANNOUNCED_PEERS`] recorded, those of servers outside the configuration
    /// are forgotten first; if all are members, a stranger's is not recorded.
    pub(super) fn log_format_announced(&mut self, peer: u64, format: u32) {
        let formats = &mut self.peer_log_formats;
        if formats.len() >= MAX_ANNOUNCED_PEERS && !formats.contains_key(&peer) {
            let members = self.raw.raft.prs();
            formats.retain(|id, _| members.get(*id).is_some());
            if formats.len() >= MAX_ANNOUNCED_PEERS {
                debug!(
                    peer,
                    "log format of a server outside the configuration not kept"
                );
                return;
            }
        }
        formats.insert(peer, format);
    }

    /// The newest log format server `id` reads: this build's for this server, what
    /// its latest Raft stream announced for a peer (1 when it named none), 0 for a
    /// peer not connected since this server started.
    pub(super) fn log_format_of(&self, id: u64) -> u32 {
        if id == self.id {
            return LOG_FORMAT;
        }
        self.peer_log_formats.get(&id).copied().unwrap_or(0)
    }

    /// Most commands one entry may carry now: [`MAX_COMMANDS_PER_ENTRY`] once every
    /// other voter and learner has announced a build that reads `Op::Batch` on its
    /// latest stream (`Input::PeerLogFormat`), else 1. A peer not heard from since
    /// this server started counts as an older build: it may come back as one.
    fn commands_per_entry(&mut self) -> usize {
        let raft = &self.raw.raft;
        let unready = (raft.prs().iter())
            .map(|(id, _)| *id)
            .find(|id| self.log_format_of(*id) < LOG_FORMAT_BATCH);
        let batching = unready.is_none();
        if batching != self.batching {
            self.batching = batching;
            match unready {
                None => {
                    info!("batch entries on: every server announced log format {LOG_FORMAT_BATCH}")
                }
                Some(peer) => match self.log_format_of(peer) {
                    0 => info!(
                        peer,
                        "batch entries off: server {peer} has not announced its log format \
                         (not connected since this server started)"
                    ),
                    format => info!(
                        peer,
                        "batch entries off: server {peer} runs a build of log format {format}, \
                         which cannot read them; one command per entry until it is upgraded"
                    ),
                },
            }
        }
        if batching {
            MAX_COMMANDS_PER_ENTRY
        } else {
            1
        }
    }

    /// Proposes the gathered commands, as one entry when every peer reads batches
    /// (else one entry each, see [`Self::commands_per_entry`]). Called at the end of
    /// each loop turn's inputs and before any other proposal.
    pub(super) fn flush_commands(&mut self) {
        if self.proposals.gathered.is_empty() {
            return;
        }
        let mut gathered = std::mem::take(&mut self.proposals.gathered);
        // Decided when they go out (the turn's end, or before another proposal), not
        // per command: an older build announced after some were gathered counts too.
        let limit = self.commands_per_entry();
        while gathered.len() > limit {
            let rest = gathered.split_off(limit);
            self.append_commands(gathered);
            gathered = rest;
        }
        self.append_commands(gathered);
    }

    /// Proposes commands as one entry: `Op::Apply` for one (the same entry a leader
    /// of log format 1 writes), `Op::Batch` for several.
    fn append_commands(&mut self, gathered: Vec<(Command, CommandReply)>) {
        let (commands, waiting): (Vec<Command>, Vec<CommandReply>) = gathered.into_iter().unzip();
        let park_as: Vec<_> = commands.iter().map(park_key).collect();
        let appended = if self.is_leader() {
            telemetry::proposed_commands(commands.len());
            let count = commands.len() as u64;
            let op = match <[Command; 1]>::try_from(commands) {
                Ok([command]) => Op::Apply(command),
                Err(commands) => Op::Batch(commands),
            };
            self.append_entry(op, count)
        } else {
            Err(self.not_leader())
        };
        match appended {
            Ok(first) => {
                for ((seq, tx), park_as) in (first..).zip(waiting).zip(park_as) {
                    self.proposals.track(seq, Waiting::Command(tx), park_as);
                }
            }
            Err(e) => {
                for tx in waiting {
                    let _ = tx.send(Err(e.clone()));
                }
            }
        }
    }

    pub(super) fn propose_with(
        &mut self,
        op: Op,
        waiting: Waiting,
        park_as: Option<(SessionId, RequestId)>,
    ) {
        if !self.is_leader() {
            let err = self.not_leader();
            self.proposals.fail(waiting, err);
            return;
        }
        match self.append(op) {
            Ok(seq) => self.proposals.track(seq, waiting, park_as),
            Err(e) => self.proposals.fail(waiting, e),
        }
    }

    /// Appends one entry to the leader's log after the commands gathered so far, and
    /// returns the sequence number its context carries, by which the caller is found
    /// when it applies.
    fn append(&mut self, op: Op) -> Result<u64, ProposeError> {
        self.flush_commands();
        self.append_entry(op, 1)
    }

    /// Appends one entry of `count` commands, stamped with the leader's clock; returns
    /// the first of their sequence numbers.
    fn append_entry(&mut self, op: Op, count: u64) -> Result<u64, ProposeError> {
        let envelope = Envelope {
            now_ms: Self::now_ms(),
            op,
        };
        let data = postcard::to_allocvec(&envelope)
            .map_err(|e| ProposeError::Internal(format!("cannot encode entry: {e}")))?;
        let (seq, context) = self.proposals.next_contexts(count);
        self.raw
            .propose(context, data)
            .map_err(|_| self.not_leader())?;
        Ok(seq)
    }

    /// An entry the leader proposes on its own behalf; nobody waits for its reply.
    pub(super) fn propose_quietly(&mut self, command: Command) {
        if let Err(e) = self.append(Op::Apply(command)) {
            debug!("proposal dropped: {e}");
        }
    }

    /// An entry of the leader's own that is proposed again only once this one applied
    /// or failed.
    pub(super) fn propose_once(&mut self, own: Own, command: Command) {
        if self.proposals.has_own(own) {
            return;
        }
        self.propose_with(Op::Apply(command), Waiting::Own(own), None);
    }

    pub(super) fn answer_query(&self, query: &Query) -> QueryAnswer {
        match query {
            Query::CheckToken {
                lockspace,
                resource,
                token,
            } => {
                let (current, latest) = self.state.check_token(lockspace, resource, *token);
                QueryAnswer::Token { current, latest }
            }
            Query::SessionNode { session } => {
                QueryAnswer::SessionNode(self.state.session_node(*session).map(str::to_string))
            }
            Query::Snapshot => self.snapshot_query(),
        }
    }
}
