//! The validation step of every RPC, one function per RPC: the caller's identity
//! (`tls::Access`), the arguments (`api`), the cluster id, and whether this server
//! leads, in the order a refusal should be reported. Each returns the request in the
//! form its handler hands to the driver, so a handler is: check → `Handle` call →
//! convert. Refusals are `api`'s statuses; nothing here builds a second mapping.

// `tonic::Status` is the error type of every gRPC handler (see the parent module).
#![allow(clippy::result_large_err)]

use super::Services;
use crate::api;
use crate::membership::{self, Change, Plan};
use crate::raft_node::{LocksQuery, NodeStatus, ProposeError, Query};
use crate::state::Command;
use crate::tls::PeerIdentity;
use lockd_proto::v1 as pb;
use std::time::Duration;
use tonic::{Request, Status};

/// How long `AddServer` waits, by default, for a learner to catch up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// The most resources one `Locks` answer lists.
const MAX_LOCKS_LISTED: usize = 10_000;

/// A `Login` that may be proposed.
pub(super) struct CheckedLogin {
    pub command: Command,
    /// The node logging in, for the "being unfenced" answer.
    pub node: String,
}

/// An `AddServer` that may be started.
pub(super) struct CheckedAddServer {
    pub id: u64,
    pub addr: String,
    pub catch_up_within: Duration,
}

/// A `FenceAck` to propose: the node, and who acknowledged (bounded, never empty).
pub(super) struct FenceAck {
    pub node: String,
    pub by: String,
}

/// A `RemoveServer` that may go ahead.
pub(super) enum CheckedRemoval {
    /// Another server: propose its removal.
    Propose(Change),
    /// This leader itself, and the rules allow it: hand over, send the caller on.
    HandOverFirst,
}

impl Services {
    pub(super) async fn check_heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<u64, Status> {
        self.check_session_call(request, |r| r.session).await
    }

    pub(super) async fn check_events(
        &self,
        request: Request<pb::EventsRequest>,
    ) -> Result<u64, Status> {
        self.check_session_call(request, |r| r.session).await
    }

    /// Heartbeat and Events: the session's owner, a valid session, on the leader.
    async fn check_session_call<T>(
        &self,
        request: Request<T>,
        session_of: impl FnOnce(&T) -> u64,
    ) -> Result<u64, Status> {
        let session = session_of(request.get_ref());
        self.require_session_owner(&request, session).await?;
        api::check_session_arg(session)?;
        self.ensure_leader()?;
        Ok(session)
    }

    pub(super) async fn check_recovery_done(
        &self,
        request: Request<pb::RecoveryDoneRequest>,
    ) -> Result<Command, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        api::recovery_done_command(request.into_inner())
    }

    pub(super) fn check_login(
        &self,
        request: &Request<pb::LoginRequest>,
    ) -> Result<CheckedLogin, Status> {
        let req = request.get_ref();
        if req.cluster_id != 0 && req.cluster_id != self.config.cluster.id {
            return Err(Status::failed_precondition(format!(
                "this server belongs to cluster {} (id {}), not to cluster id {}",
                self.config.cluster.name, self.config.cluster.id, req.cluster_id
            )));
        }
        // Unfencing hook (issue 15): a node with unfence devices logs in Unfencing.
        let command = crate::unfence::login_command(&self.config, api::login_command(req)?);
        self.access.require_node_name(request, &req.node)?;
        if !self.config.has_node(&req.node) {
            return Err(Status::not_found(format!(
                "unknown node `{}`: it is not in the cluster config",
                req.node
            )));
        }
        Ok(CheckedLogin {
            command,
            node: req.node.clone(),
        })
    }

    pub(super) async fn check_logout(
        &self,
        request: Request<pb::LogoutRequest>,
    ) -> Result<Command, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        api::logout_command(&request.into_inner())
    }

    pub(super) async fn check_open_lockspace(
        &self,
        request: Request<pb::OpenLockspaceRequest>,
    ) -> Result<Command, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        api::open_lockspace_command(request.into_inner())
    }

    pub(super) async fn check_cancel(
        &self,
        request: Request<pb::CancelRequest>,
    ) -> Result<Command, Status> {
        self.require_session_owner(&request, request.get_ref().session)
            .await?;
        api::cancel_command(&request.into_inner())
    }

    /// Lock, whether it came as a call or on a pipeline stream (`caller` read once
    /// per stream).
    pub(super) async fn check_lock(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::LockRequest,
    ) -> Result<Command, Status> {
        self.require_owner(caller, request.session).await?;
        api::lock_command(request)
    }

    /// Convert, as [`Services::check_lock`].
    pub(super) async fn check_convert(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::ConvertRequest,
    ) -> Result<Command, Status> {
        self.require_owner(caller, request.session).await?;
        api::convert_command(request)
    }

    /// Unlock, as [`Services::check_lock`].
    pub(super) async fn check_unlock(
        &self,
        caller: Option<&PeerIdentity>,
        request: pb::UnlockRequest,
    ) -> Result<Command, Status> {
        self.require_owner(caller, request.session).await?;
        api::unlock_command(request)
    }

    /// CheckToken: anyone may ask (a storage target checking a writer's token).
    pub(super) fn check_check_token(
        &self,
        request: Request<pb::CheckTokenRequest>,
    ) -> Result<Query, Status> {
        let req = request.into_inner();
        api::check_token_args(&req)?;
        self.ensure_leader()?;
        Ok(Query::CheckToken {
            lockspace: req.lockspace,
            resource: req.resource,
            token: req.token,
        })
    }

    // AdminService.

    pub(super) fn check_locks(
        &self,
        request: Request<pb::LocksRequest>,
    ) -> Result<LocksQuery, Status> {
        let req = request.into_inner();
        api::check_locks_args(&req)?;
        let lockspace = (!req.lockspace.is_empty()).then_some(req.lockspace);
        let resource = (!req.resource.is_empty()).then_some(req.resource);
        if resource.is_some() && lockspace.is_none() {
            return Err(Status::invalid_argument("a resource needs its lockspace"));
        }
        let limit = match req.limit {
            0 => 100,
            n => (n as usize).min(MAX_LOCKS_LISTED),
        };
        Ok(LocksQuery {
            lockspace,
            resource,
            limit,
        })
    }

    /// The filter to install.
    pub(super) fn check_set_log_level(
        &self,
        request: Request<pb::SetLogLevelRequest>,
    ) -> Result<String, Status> {
        self.access.require_admin(&request)?;
        let filter = request.into_inner().filter;
        api::check_log_filter(&filter)?;
        Ok(filter)
    }

    /// Whether to stop without a quorum left (`--force`).
    pub(super) fn check_shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<bool, Status> {
        self.access.require_admin(&request)?;
        Ok(request.into_inner().force)
    }

    pub(super) fn check_add_server(
        &self,
        request: Request<pb::AddServerRequest>,
    ) -> Result<CheckedAddServer, Status> {
        self.access.require_admin(&request)?;
        let req = request.into_inner();
        api::check_add_server_args(req.id, &req.addr)?;
        self.ensure_leader()?;
        let catch_up_within = match req.catch_up_timeout_ms {
            0 => CATCH_UP_WAIT,
            ms => Duration::from_millis(ms),
        };
        Ok(CheckedAddServer {
            id: req.id,
            addr: req.addr,
            catch_up_within,
        })
    }

    /// A leader's own removal is checked against the rules here, before it hands
    /// over, so leadership does not move for a removal that would be refused; any
    /// other is checked by the driver when it proposes it.
    pub(super) fn check_remove_server(
        &self,
        request: Request<pb::RemoveServerRequest>,
    ) -> Result<CheckedRemoval, Status> {
        self.access.require_admin(&request)?;
        let id = request.into_inner().id;
        api::check_server_id(id)?;
        self.ensure_leader()?;
        let change = Change::Remove { id };
        match membership::plan(&change, self.my_id) {
            Plan::Propose => Ok(CheckedRemoval::Propose(change)),
            Plan::HandOverFirst => {
                check_membership(&self.node.status(), &change)?;
                Ok(CheckedRemoval::HandOverFirst)
            }
        }
    }

    /// The node whose fencing is expired by hand.
    pub(super) fn check_force_expire(
        &self,
        request: Request<pb::ForceExpireRequest>,
    ) -> Result<Command, Status> {
        self.access.require_admin(&request)?;
        let node = request.into_inner().node;
        api::check_node_arg(&node)?;
        Ok(Command::ForceExpire { node })
    }

    pub(super) fn check_fence_ack(
        &self,
        request: Request<pb::FenceAckRequest>,
    ) -> Result<FenceAck, Status> {
        self.access.require_admin(&request)?;
        let req = request.into_inner();
        api::check_node_arg(&req.node)?;
        let by = if req.by.is_empty() {
            "an operator".to_string()
        } else {
            req.by.chars().take(128).collect()
        };
        Ok(FenceAck { node: req.node, by })
    }

    pub(super) fn check_save_snapshot(
        &self,
        request: Request<pb::SaveSnapshotRequest>,
    ) -> Result<(), Status> {
        self.access.require_admin(&request)
    }
}

/// `membership::check` against the leader's published view (running = recently active).
fn check_membership(s: &NodeStatus, change: &Change) -> Result<(), Status> {
    let ids = |voter: bool| -> Vec<u64> {
        s.members
            .iter()
            .filter(|m| m.voter == voter)
            .map(|m| m.id)
            .collect()
    };
    let (voters, learners) = (ids(true), ids(false));
    let running: Vec<u64> = s
        .peers
        .iter()
        .filter(|p| p.recent_active)
        .map(|p| p.id)
        .collect();
    let view = membership::View {
        voters: &voters,
        learners: &learners,
        running_voters: &running,
    };
    membership::check(&view, change).map_err(|e| api::status(ProposeError::Refused(e)))
}
