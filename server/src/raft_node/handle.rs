//! What the services see of the driver: the [`Handle`] they call, the [`Input`]s it
//! sends on the driver's one bounded queue, and the published [`NodeStatus`]. Every
//! call is a message answered on a oneshot channel; nothing here touches the driver's
//! state.

use super::{ClusterUid, FenceLevelResult, Member, NodeRow, NodeStatus, ResourceRow, Role};
use super::{ProposeError, INPUT_QUEUE_LEN};
use crate::membership::Change;
use crate::state::{Command, Event, FenceRecord, NodeState, Reply, SessionId};
use raft::prelude::Message;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// A read answered from the lock table at a point linearized through the log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum Query {
    CheckToken {
        lockspace: String,
        resource: Vec<u8>,
        token: u64,
    },
    /// Which node a session belongs to (with TLS on, a request must come from that
    /// node's certificate).
    SessionNode { session: SessionId },
    /// The applied state as a snapshot body, with where it sits in the log and the
    /// membership there (`lockctl snapshot save`).
    Snapshot,
}

#[derive(Debug, Clone)]
pub enum QueryAnswer {
    Token {
        current: bool,
        latest: u64,
    },
    /// `None`: no such session.
    SessionNode(Option<String>),
    Snapshot {
        head: crate::storage::snapshot::SnapshotHead,
        /// Encoded by the caller, off the Raft thread.
        body: Box<crate::storage::snapshot::SnapshotBody>,
        last_token: u64,
    },
}

pub enum Input {
    /// A peer opened a Raft stream carrying this cluster's identity (see the
    /// bootstrap gate, `open::BootstrapGate`).
    PeerConfirmed(u64),
    /// A peer opened a Raft stream announcing the newest log format its build reads
    /// (1 when it announced none: a build from before format 2).
    PeerLogFormat { peer: u64, format: u32 },
    Propose {
        command: Command,
        reply: oneshot::Sender<Result<Reply, ProposeError>>,
    },
    Read {
        query: Query,
        reply: oneshot::Sender<Result<QueryAnswer, ProposeError>>,
    },
    /// A node's heartbeat. Answered with the session's state once this server has
    /// confirmed with a quorum that it still leads (ReadIndex); `None` = unknown session.
    Heartbeat {
        session: SessionId,
        reply: oneshot::Sender<Result<Option<NodeState>, ProposeError>>,
    },
    /// Opens the session's event stream on the leader (replacing an older one).
    /// Answered with the session's state; `None` = unknown session, and an expired
    /// session gets no stream.
    Subscribe {
        session: SessionId,
        events: mpsc::Sender<Event>,
        reply: oneshot::Sender<Option<NodeState>>,
    },
    /// The per-node view for `lockctl status`.
    Nodes(oneshot::Sender<Vec<NodeRow>>),
    /// The replicated fence history.
    FenceHistory(oneshot::Sender<Vec<FenceRecord>>),
    /// Resources and their locks for `lockctl locks`; answered with the rows and
    /// whether the list was cut at the limit.
    Locks {
        query: LocksQuery,
        reply: oneshot::Sender<(Vec<ResourceRow>, bool)>,
    },
    /// Graceful shutdown of a leader: hand leadership to the most up-to-date active
    /// follower. Answered with its id, 0 if there is none (or this is no leader).
    TransferLeadership(oneshot::Sender<u64>),
    /// A fence level this leader ran has finished.
    FenceLevelDone(FenceLevelResult),
    /// A run of a node's unfence devices this leader started has finished.
    UnfenceDone(crate::unfence::UnfenceRun),
    /// How each node without a session left its last one.
    Departures(oneshot::Sender<Vec<(String, crate::state::Departure)>>),
    /// The snapshot writer thread has written (or failed to write) a snapshot file.
    SnapshotWritten(super::snapshot::SnapshotWritten),
    /// One step of a membership change (leader only); answered with the membership
    /// once the change is applied.
    ChangeMembership {
        change: Change,
        reply: oneshot::Sender<Result<Vec<Member>, ProposeError>>,
    },
    /// A message from a peer.
    Raft(Box<Message>),
    /// The transport could not deliver to this peer.
    Unreachable(u64),
    /// Outcome of sending a snapshot to a peer.
    SnapshotSent { to: u64, ok: bool },
}

/// Which resources `lockctl locks` lists.
#[derive(Debug, Clone, Default)]
pub struct LocksQuery {
    /// Only this lockspace (every lockspace if `None`).
    pub lockspace: Option<String>,
    /// Only this resource of `lockspace`.
    pub resource: Option<Vec<u8>>,
    /// At most this many resources.
    pub limit: usize,
}

/// How the services reach the driver.
#[derive(Clone)]
pub struct Handle {
    pub(super) inputs: mpsc::Sender<Input>,
    status: watch::Receiver<NodeStatus>,
    uid: ClusterUid,
}

impl Handle {
    /// The cluster identity this server has (shared with the transport).
    pub fn cluster_uid(&self) -> ClusterUid {
        self.uid.clone()
    }

    /// Sends the input `make` builds around a reply channel and awaits the answer.
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Input,
    ) -> Result<T, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| driver_stopped())
    }

    pub async fn propose(&self, command: Command) -> Result<Reply, ProposeError> {
        self.ask(|reply| Input::Propose { command, reply }).await?
    }

    pub async fn read(&self, query: Query) -> Result<QueryAnswer, ProposeError> {
        self.ask(|reply| Input::Read { query, reply }).await?
    }

    pub async fn heartbeat(&self, session: SessionId) -> Result<Option<NodeState>, ProposeError> {
        self.ask(|reply| Input::Heartbeat { session, reply })
            .await?
    }

    pub async fn subscribe(
        &self,
        session: SessionId,
        events: mpsc::Sender<Event>,
    ) -> Result<Option<NodeState>, ProposeError> {
        self.ask(|reply| Input::Subscribe {
            session,
            events,
            reply,
        })
        .await
    }

    pub async fn fence_history(&self) -> Result<Vec<FenceRecord>, ProposeError> {
        self.ask(Input::FenceHistory).await
    }

    /// How each node without a session left its last one (`lockctl nodes`).
    pub async fn departures(&self) -> Result<Vec<(String, crate::state::Departure)>, ProposeError> {
        self.ask(Input::Departures).await
    }

    /// One membership step; answered with the membership once it is applied.
    pub async fn change_membership(&self, change: Change) -> Result<Vec<Member>, ProposeError> {
        self.ask(|reply| Input::ChangeMembership { change, reply })
            .await?
    }

    /// A member's address as this server knows it.
    pub fn addr_of(&self, id: u64) -> Option<String> {
        let s = self.status.borrow();
        s.members
            .iter()
            .find(|m| m.id == id && !m.addr.is_empty())
            .map(|m| m.addr.clone())
    }

    pub async fn transfer_leadership(&self) -> Result<u64, ProposeError> {
        self.ask(Input::TransferLeadership).await
    }

    /// Hands leadership over if this server leads, and waits (bounded) until it no
    /// longer does, so clients move to the new leader before this one stops.
    pub async fn step_down(&self, within: Duration) -> u64 {
        if let Err(leader_id) = self.leadership() {
            return leader_id;
        }
        let target = self.transfer_leadership().await.unwrap_or(0);
        if target == 0 {
            return 0;
        }
        let mut status = self.watch_status();
        let _ = tokio::time::timeout(within, async {
            // Until another server leads and this one has heard from it.
            while {
                let s = status.borrow_and_update();
                s.role == Role::Leader || s.leader_id == 0 || s.leader_id == s.id
            } {
                if status.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        self.leadership().err().unwrap_or(0)
    }

    pub async fn locks(&self, query: LocksQuery) -> Result<(Vec<ResourceRow>, bool), ProposeError> {
        self.ask(|reply| Input::Locks { query, reply }).await
    }

    pub async fn nodes(&self) -> Result<Vec<NodeRow>, ProposeError> {
        self.ask(Input::Nodes).await
    }

    pub async fn send(&self, input: Input) -> Result<(), ProposeError> {
        self.inputs.send(input).await.map_err(|_| driver_stopped())
    }

    /// Built by `open` around the driver's queue and published status.
    pub(super) fn new(
        inputs: mpsc::Sender<Input>,
        status: watch::Receiver<NodeStatus>,
        uid: ClusterUid,
    ) -> Handle {
        Handle {
            inputs,
            status,
            uid,
        }
    }

    pub fn status(&self) -> NodeStatus {
        self.status.borrow().clone()
    }

    /// `Ok` on the leader, else the leader's id as this server knows it (0 = none).
    /// Reads the published status in place: it is on every request's path.
    pub fn leadership(&self) -> Result<(), u64> {
        let s = self.status.borrow();
        if s.role == Role::Leader {
            Ok(())
        } else {
            Err(s.leader_id)
        }
    }

    pub fn watch_status(&self) -> watch::Receiver<NodeStatus> {
        self.status.clone()
    }
}

/// The driver's bounded input queue.
pub fn input_channel() -> (mpsc::Sender<Input>, mpsc::Receiver<Input>) {
    mpsc::channel(INPUT_QUEUE_LEN)
}

pub(super) fn driver_stopped() -> ProposeError {
    ProposeError::Internal("the Raft driver stopped".into())
}
