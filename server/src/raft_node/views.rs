//! The admin views: this server's published [`NodeStatus`] (with its typed [`Role`]),
//! and the node and resource rows `lockctl status` and `lockctl locks` show. Read-only
//! arrangements of the lock table and Raft's progress; nothing here changes state.

use super::{LocksQuery, Outbox, RaftNode};
use crate::state::{FenceProgress, LockView, NodeState, ResourceView, SessionId};
use crate::telemetry;
use raft::StateRole;
use std::time::Instant;

/// This server's Raft role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Follower,
    PreCandidate,
    Candidate,
    Leader,
}

impl Role {
    /// The name `lockctl status` shows (the wire's `StatusReply.role`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
        }
    }
}

impl From<StateRole> for Role {
    fn from(role: StateRole) -> Role {
        match role {
            StateRole::Leader => Role::Leader,
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A view of this server for `lockctl status`, republished after every change of role
/// and at every tick.
#[derive(Debug, Clone, Default)]
pub struct NodeStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: u64,
    pub quorum_has: u64,
    /// Every voter and learner of the applied configuration, by id.
    pub members: Vec<Member>,
    pub peers: Vec<PeerProgress>,
    pub sessions: u64,
    pub held_locks: u64,
    pub waiting: u64,
    pub lockspaces: u64,
    pub last_token: u64,
}

/// A resource and its locks as `lockctl locks` shows them.
#[derive(Debug, Clone)]
pub struct ResourceRow {
    pub lockspace: String,
    pub resource: Vec<u8>,
    pub view: ResourceView,
    /// Every lock of the resource, holders first, then conversions, then waiters.
    pub locks: Vec<LockRow>,
}

/// One lock of a resource as `lockctl locks` shows it.
#[derive(Debug, Clone)]
pub struct LockRow {
    pub lock: LockView,
    /// "holder", "converting" or "waiting".
    pub queue: &'static str,
    /// The node whose session owns it ("?" if unknown).
    pub node: String,
}

/// One node session as `lockctl status` shows it.
#[derive(Debug, Clone)]
pub struct NodeRow {
    pub name: String,
    pub session: SessionId,
    pub state: NodeState,
    pub held_locks: u64,
    pub expired_at_ms: u64,
    /// Only on the leader: how long the session has been silent.
    pub silent_ms: Option<u64>,
    pub fence: Option<FenceProgress>,
}

/// A server of the cluster's current configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// Its client and peer address ("" if this server does not know it).
    pub addr: String,
    /// A learner receives the log but does not vote (yet).
    pub voter: bool,
}

#[derive(Debug, Clone, Default)]
pub struct PeerProgress {
    pub id: u64,
    pub matched: u64,
    pub recent_active: bool,
    /// See [`RaftNode::log_format_of`].
    pub log_format: u32,
}

impl<O: Outbox> RaftNode<O> {
    /// Every voter and learner of the applied configuration, by id.
    pub(super) fn members(&self) -> Vec<Member> {
        let conf = self.raw.store().conf_state();
        let member = |id: &u64, voter: bool| Member {
            id: *id,
            addr: self.addrs.get(id).cloned().unwrap_or_default(),
            voter,
        };
        let mut members: Vec<Member> = conf
            .voters
            .iter()
            .map(|id| member(id, true))
            .chain(conf.learners.iter().map(|id| member(id, false)))
            .collect();
        members.sort_by_key(|m| m.id);
        members
    }

    pub(super) fn resource_rows(&self, query: LocksQuery) -> (Vec<ResourceRow>, bool) {
        let (names, more) = match (query.lockspace, query.resource) {
            (Some(ls), Some(res)) => (vec![(ls, res)], false),
            (ls, _) => self.state.resource_names(ls.as_deref(), query.limit),
        };
        let rows = names
            .into_iter()
            .filter_map(|(ls, res)| {
                let view = self.state.resource_view(&ls, &res)?;
                let queues = [
                    ("holder", &view.holders),
                    ("converting", &view.converting),
                    ("waiting", &view.waiting),
                ];
                let locks = queues
                    .iter()
                    .flat_map(|(queue, ids)| ids.iter().map(move |id| (*queue, *id)))
                    .filter_map(|(queue, id)| {
                        let lock = self.state.lock_view(id)?;
                        let node = self
                            .state
                            .session_node(lock.session)
                            .unwrap_or("?")
                            .to_string();
                        Some(LockRow { lock, queue, node })
                    })
                    .collect();
                Some(ResourceRow {
                    lockspace: ls,
                    resource: res,
                    view,
                    locks,
                })
            })
            .collect();
        (rows, more)
    }

    pub(super) fn node_rows(&self) -> Vec<NodeRow> {
        let now = Instant::now();
        let leader = self.is_leader();
        self.state
            .sessions()
            .map(|s| NodeRow {
                name: s.node.to_string(),
                session: s.session,
                state: s.state,
                held_locks: s.held_locks as u64,
                expired_at_ms: s.expired_at_ms,
                silent_ms: leader
                    .then(|| self.liveness.silent_for(s.session, now))
                    .flatten()
                    .map(|d| d.as_millis() as u64),
                fence: self.state.fence_progress(s.session),
            })
            .collect()
    }

    pub(super) fn publish_status(&self) {
        let raft = &self.raw.raft;
        let conf = self.raw.store().conf_state();
        let now = Instant::now();
        let mut peers = Vec::new();
        let mut quorum_has = 0;
        if raft.state == StateRole::Leader {
            for (id, pr) in raft.prs().iter() {
                let active = self.is_running(*id, now);
                if active && conf.voters.contains(id) {
                    quorum_has += 1;
                }
                peers.push(PeerProgress {
                    id: *id,
                    matched: pr.matched,
                    recent_active: active,
                    log_format: self.log_format_of(*id),
                });
            }
            peers.sort_by_key(|p| p.id);
        }
        let status = NodeStatus {
            id: self.id,
            role: raft.state.into(),
            term: raft.term,
            leader_id: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            voters: conf.voters.len() as u64,
            quorum_has,
            members: self.members(),
            peers,
            sessions: self.state.session_count() as u64,
            held_locks: self.state.held_lock_count() as u64,
            waiting: self.state.waiting_count() as u64,
            lockspaces: self.state.lockspace_count() as u64,
            last_token: self.state.last_token(),
        };
        telemetry::status(&status);
        telemetry::node_states(self.state.session_states());
        self.status_tx.send_replace(status);
    }
}
