//! AdminService: `lockctl`'s calls. The ones that change the cluster (shutdown,
//! force-expire, fence ack, log level, server add/remove) need the admin role when
//! TLS is on; the rest read the leader's or this server's views.

// `tonic::Status` is the error type of every gRPC handler (see the parent module).
#![allow(clippy::result_large_err)]

use super::check::{CheckedRemoval, FenceAck};
use super::{unexpected, Services};
use crate::api;
use crate::membership::Change;
use crate::raft_node::{Member, Query, QueryAnswer, Role};
use crate::state::{Command, Reply};
use lockd_proto::v1 as pb;
use lockd_proto::v1::admin_service_server::AdminService;
use std::sync::atomic::Ordering;
use tonic::{Request, Response, Status};

/// Admin commands answer Ok or the lock table's refusal.
fn admin_reply(reply: Reply) -> Result<(), Status> {
    match reply {
        Reply::Ok => Ok(()),
        Reply::Failed(e) => Err(api::status(e)),
        other => Err(unexpected(other)),
    }
}

/// How long a stopping leader waits for another server to take over.
const HANDOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn member_to_proto(m: &Member) -> pb::ServerMember {
    pb::ServerMember {
        id: m.id,
        addr: m.addr.clone(),
        voter: m.voter,
    }
}

impl Services {
    /// (voters running, quorum needed), this server included. Every other voter is
    /// asked directly, over a new connection: one that refuses it (a stopping server
    /// closes its listener first), does not answer within a second, or answers that it
    /// is stopping, is not running. The leader's view (`quorum_has`) cannot serve
    /// here: it still counts a server that stopped a moment ago as active for up to an
    /// election timeout, which let two quick shutdowns take the quorum away.
    async fn running_voters(&self) -> (u64, u64) {
        let s = self.node.status();
        let others: Vec<u64> = s
            .members
            .iter()
            .filter(|m| m.voter && m.id != self.my_id)
            .map(|m| m.id)
            .collect();
        let voters = others.len() as u64 + 1;
        let probes = others.into_iter().map(|id| self.is_running(id));
        let running = futures::future::join_all(probes)
            .await
            .into_iter()
            .filter(|running| *running)
            .count() as u64;
        (running + 1, voters / 2 + 1)
    }

    /// Whether server `id` answers Status within a second and is not stopping.
    async fn is_running(&self, id: u64) -> bool {
        let Some(addr) = self.addr_of(id) else {
            return false;
        };
        let probe = async {
            let endpoint = crate::tls::endpoint(&addr, self.tls.as_ref())
                .ok()?
                .connect_timeout(std::time::Duration::from_millis(500))
                .timeout(std::time::Duration::from_secs(1));
            let mut client = lockd_proto::v1::admin_service_client::AdminServiceClient::new(
                endpoint.connect().await.ok()?,
            );
            let reply = client.status(pb::StatusRequest {}).await.ok()?.into_inner();
            Some(!reply.stopping)
        };
        tokio::time::timeout(std::time::Duration::from_secs(2), probe)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    /// Waits until learner `id` has every entry the leader had committed when it
    /// started waiting; fails if this server stops leading or time runs out.
    async fn wait_caught_up(
        &self,
        id: u64,
        addr: &str,
        within: std::time::Duration,
    ) -> Result<(), Status> {
        let mut status = self.node.watch_status();
        let target = status.borrow().commit;
        let caught_up = tokio::time::timeout(within, async {
            loop {
                {
                    let s = status.borrow_and_update();
                    if s.role != Role::Leader {
                        return Err(api::not_leader_status(self.addr_of(s.leader_id).as_deref()));
                    }
                    if s.peers.iter().any(|p| p.id == id && p.matched >= target) {
                        return Ok(());
                    }
                }
                if status.changed().await.is_err() {
                    return Err(Status::unavailable("this server is stopping"));
                }
            }
        })
        .await;
        caught_up.unwrap_or_else(|_| {
            Err(Status::deadline_exceeded(format!(
                "server {id} joined as a learner but has not caught up within {} s: is it running (lockd run --id {id} --join) and reachable at {addr}? It stays a learner: `lockctl server add {id} {addr}` again resumes, `lockctl server remove {id}` takes it out",
                within.as_secs()
            )))
        })
    }
}

#[tonic::async_trait]
impl AdminService for Services {
    async fn locks(
        &self,
        request: Request<pb::LocksRequest>,
    ) -> Result<Response<pb::LocksReply>, Status> {
        let query = self.check_locks(request)?;
        let (rows, truncated) = self.node.locks(query).await.map_err(api::status)?;
        Ok(Response::new(pb::LocksReply {
            resources: rows.into_iter().map(api::resource_row_to_proto).collect(),
            truncated,
        }))
    }

    async fn set_log_level(
        &self,
        request: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelReply>, Status> {
        let filter = self.check_set_log_level(request)?;
        crate::logging::set_filter(&filter)
            // The filter parsed above; what is left is this server's own trouble.
            .map_err(Status::internal)?;
        Ok(Response::new(pb::SetLogLevelReply {}))
    }

    async fn shutdown(
        &self,
        request: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        let force = self.check_shutdown(request)?;
        // Marked before the count, so two shutdowns asked at once of two servers each
        // see the other as gone and neither takes the quorum away unnoticed.
        if self.stopping.swap(true, Ordering::SeqCst) {
            return Err(Status::failed_precondition(format!(
                "server {} is already stopping",
                self.my_id
            )));
        }
        let (running, needed) = self.running_voters().await;
        if running.saturating_sub(1) < needed && !force {
            self.stopping.store(false, Ordering::SeqCst);
            return Err(Status::failed_precondition(format!(
                "refused: {running} voters are running and a quorum needs {needed}; stopping server {} would leave {}. Use --force to stop it anyway",
                self.my_id,
                running.saturating_sub(1)
            )));
        }
        tracing::warn!(force, "shutdown requested");
        let new_leader_id = self.node.step_down(HANDOVER_WAIT).await;
        self.stop.send_replace(true);
        Ok(Response::new(pb::ShutdownReply { new_leader_id }))
    }

    async fn add_server(
        &self,
        request: Request<pb::AddServerRequest>,
    ) -> Result<Response<pb::AddServerReply>, Status> {
        let req = self.check_add_server(request)?;
        let joining = self
            .node
            .status()
            .members
            .into_iter()
            .find(|m| m.id == req.id && !m.voter);
        match joining {
            Some(m) if m.addr != req.addr => {
                return Err(Status::failed_precondition(format!(
                    "server {} is already joining at {}, not {}; remove it first (lockctl server remove {})",
                    req.id, m.addr, req.addr, req.id
                )))
            }
            // Asked again: resume with the catch-up and the promotion.
            Some(_) => {}
            None => {
                self.node
                    .change_membership(Change::AddLearner {
                        id: req.id,
                        addr: req.addr.clone(),
                    })
                    .await
                    .map_err(api::status)?;
                tracing::warn!(id = req.id, addr = %req.addr, "server joining as a learner");
            }
        }
        self.wait_caught_up(req.id, &req.addr, req.catch_up_within)
            .await?;
        let members = self
            .node
            .change_membership(Change::Promote { id: req.id })
            .await
            .map_err(api::status)?;
        tracing::warn!(id = req.id, "server promoted to voter");
        Ok(Response::new(pb::AddServerReply {
            members: members.iter().map(member_to_proto).collect(),
        }))
    }

    async fn remove_server(
        &self,
        request: Request<pb::RemoveServerRequest>,
    ) -> Result<Response<pb::RemoveServerReply>, Status> {
        let change = match self.check_remove_server(request)? {
            CheckedRemoval::Propose(change) => change,
            // A leader does not remove itself: it hands over and sends the caller to
            // the new leader.
            CheckedRemoval::HandOverFirst => {
                let new_leader = self.node.step_down(HANDOVER_WAIT).await;
                return Err(api::not_leader_status(self.addr_of(new_leader).as_deref()));
            }
        };
        let id = change.id();
        let members = self
            .node
            .change_membership(change)
            .await
            .map_err(api::status)?;
        tracing::warn!(id, "server removed from the cluster");
        Ok(Response::new(pb::RemoveServerReply {
            members: members.iter().map(member_to_proto).collect(),
        }))
    }

    async fn force_expire(
        &self,
        request: Request<pb::ForceExpireRequest>,
    ) -> Result<Response<pb::ForceExpireReply>, Status> {
        let command = self.check_force_expire(request)?;
        admin_reply(self.submit(command).await?)?;
        Ok(Response::new(pb::ForceExpireReply {}))
    }

    async fn fence_ack(
        &self,
        request: Request<pb::FenceAckRequest>,
    ) -> Result<Response<pb::FenceAckReply>, Status> {
        let FenceAck { node, by } = self.check_fence_ack(request)?;
        let command = Command::FenceAck {
            node: node.clone(),
            by: by.clone(),
        };
        admin_reply(self.submit(command).await?)?;
        tracing::warn!(%node, %by, "fence acknowledged by hand");
        Ok(Response::new(pb::FenceAckReply {}))
    }

    async fn save_snapshot(
        &self,
        request: Request<pb::SaveSnapshotRequest>,
    ) -> Result<Response<pb::SaveSnapshotReply>, Status> {
        self.check_save_snapshot(request)?;
        let answer = self.node.read(Query::Snapshot).await.map_err(api::status)?;
        let QueryAnswer::Snapshot {
            head,
            body,
            last_token,
        } = answer
        else {
            return Err(Status::internal("the driver answered another query"));
        };
        let (index, term) = (head.index, head.term);
        let body = tokio::task::spawn_blocking(move || body.encode())
            .await
            .map_err(|e| Status::internal(format!("cannot encode the snapshot: {e}")))?;
        let file = crate::recovery::backup_file(&self.config, head, &body)
            .map_err(|e| Status::internal(format!("cannot make a snapshot file: {e}")))?;
        Ok(Response::new(pb::SaveSnapshotReply {
            file,
            index,
            term,
            last_token,
        }))
    }

    async fn fence_history(
        &self,
        _request: Request<pb::FenceHistoryRequest>,
    ) -> Result<Response<pb::FenceHistoryReply>, Status> {
        let records = self.node.fence_history().await.map_err(api::status)?;
        Ok(Response::new(pb::FenceHistoryReply {
            entries: records
                .into_iter()
                .map(api::fence_record_to_proto)
                .collect(),
        }))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let s = self.node.status();
        let nodes = self.node.nodes().await.map_err(api::status)?;
        let departed = self.node.departures().await.map_err(api::status)?;
        let liveness = &self.config.liveness;
        let addr_of = |id: u64| self.addr_of(id).unwrap_or_default();
        Ok(Response::new(pb::StatusReply {
            id: s.id,
            addr: addr_of(self.my_id),
            role: s.role.to_string(),
            term: s.term,
            leader_id: s.leader_id,
            leader_addr: addr_of(s.leader_id),
            commit_index: s.commit,
            applied_index: s.applied,
            log_format: crate::raft_node::LOG_FORMAT,
            voters: s.voters,
            quorum_needs: s.voters / 2 + 1,
            quorum_has: s.quorum_has,
            sessions: s.sessions,
            held_locks: s.held_locks,
            waiting_requests: s.waiting,
            lockspaces: s.lockspaces,
            last_token: s.last_token,
            peers: s
                .peers
                .iter()
                .map(|p| pb::PeerStatus {
                    id: p.id,
                    addr: addr_of(p.id),
                    matched: p.matched,
                    recent_active: p.recent_active,
                    learner: s.members.iter().any(|m| m.id == p.id && !m.voter),
                    log_format: p.log_format,
                })
                .collect(),
            members: s.members.iter().map(member_to_proto).collect(),
            stopping: self.stopping.load(Ordering::SeqCst),
            configured_nodes: self.config.nodes.iter().map(|n| n.name.clone()).collect(),
            fence_devices: crate::monitor::snapshot()
                .into_iter()
                .map(|d| pb::FenceDeviceHealth {
                    node: d.node,
                    level: d.level,
                    agent: d.agent,
                    ok: d.ok,
                    detail: d.detail,
                    checked_at_ms: d.checked_at_ms,
                })
                .collect(),
            departed_nodes: departed.into_iter().map(api::departure_to_proto).collect(),
            cluster_name: self.config.cluster.name.clone(),
            cluster_id: self.config.cluster.id,
            heartbeat_interval_ms: liveness.heartbeat_interval_ms,
            allowed_misses: liveness.allowed_misses,
            expiry_window_ms: liveness.expiry_window_ms(),
            grace_ms: liveness.grace_ms(),
            max_open_files: self.limits.max_open_files,
            max_connections: self.limits.max_connections as u64,
            nodes: nodes
                .into_iter()
                .map(|n| pb::NodeInfo {
                    name: n.name,
                    session: n.session,
                    state: api::node_state_to_proto(n.state) as i32,
                    held_locks: n.held_locks,
                    expired_at_ms: n.expired_at_ms,
                    silent_ms: n.silent_ms.unwrap_or(0),
                    fence_next_level_index: n.fence.as_ref().map_or(0, |f| f.next_level_index),
                    fence_failed_rounds: n.fence.as_ref().map_or(0, |f| f.failed_rounds),
                })
                .collect(),
        }))
    }
}
