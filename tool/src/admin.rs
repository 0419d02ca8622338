//! Operator commands that change the cluster or read its replicated records:
//! `forceexpire`, `fence ack`, `fence history`, `node`. Writes must reach the Raft
//! leader: a follower answers UNAVAILABLE naming the leader, which
//! `lockd_client::leader` follows.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use lockd_client::leader::{Leader, LeaderConfig, LeaderError};
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::{
    AddServerRequest, FenceAckRequest, FenceHistoryEntry, FenceHistoryRequest, ForceExpireRequest,
    LocksRequest, Mode, RemoveServerRequest, ServerMember, SetLogLevelRequest, ShutdownRequest,
    StatusRequest,
};
use lockd_proto::LEADER_METADATA_KEY;
use serde::Serialize;
use tonic::transport::Channel;

use crate::status::{render_members, Member};

/// How long an admin call keeps looking for the leader.
const LEADER_SEARCH: Duration = Duration::from_secs(3);

/// How long connecting to one server may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// How long one admin call may take, unless the command says otherwise.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);

async fn client(addr: &str) -> Result<AdminServiceClient<Channel>, tonic::Status> {
    client_within(addr, CALL_TIMEOUT).await
}

async fn client_within(
    addr: &str,
    timeout: Duration,
) -> Result<AdminServiceClient<Channel>, tonic::Status> {
    let endpoint = crate::tls::endpoint(addr)
        .map_err(tonic::Status::invalid_argument)?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(timeout);
    let channel = endpoint.connect().await.map_err(|e| {
        // "transport error" alone hides a refused connection or a TLS failure.
        tonic::Status::unavailable(format!("{addr}: {}", crate::status::error_chain(&e)))
    })?;
    Ok(AdminServiceClient::new(channel))
}

/// Runs `call` on the leader, found by the client library's leader following
/// (`lockd_client::leader`); gives up with the last error after LEADER_SEARCH.
pub(crate) async fn on_leader<T, F, Fut>(servers: &[String], call: F) -> anyhow::Result<T>
where
    F: FnMut(AdminServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    on_leader_within(servers, CALL_TIMEOUT, call).await
}

/// [`on_leader`] for a call that may take up to `timeout` once it reaches the leader.
pub(crate) async fn on_leader_within<T, F, Fut>(
    servers: &[String],
    timeout: Duration,
    mut call: F,
) -> anyhow::Result<T>
where
    F: FnMut(AdminServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let leader = Leader::new(
        servers,
        LeaderConfig {
            tls: crate::tls::options(),
            connect_timeout: CONNECT_TIMEOUT,
            call_timeout: timeout,
            // A long call gets the extra time it may spend at a server on top of the
            // search.
            search_timeout: LEADER_SEARCH + timeout.saturating_sub(CALL_TIMEOUT),
            retry_pause: Duration::from_millis(100),
        },
    )?;
    match leader
        .call("admin", |channel| call(AdminServiceClient::new(channel)))
        .await
    {
        Ok(reply) => Ok(reply),
        Err(LeaderError::Answered(status)) => bail!("{}", status.message()),
        Err(LeaderError::NoLeader { last, .. }) => Err(anyhow!(
            "no quorum: no leader answered within {LEADER_SEARCH:?} (last: {last})"
        )),
    }
}

pub async fn force_expire(servers: &[String], node: String) -> anyhow::Result<ExitCode> {
    on_leader(servers, |mut c| {
        let node = node.clone();
        async move { c.force_expire(ForceExpireRequest { node }).await }
    })
    .await?;
    println!("node {node} expired; it will be fenced before its locks are released");
    Ok(ExitCode::SUCCESS)
}

pub async fn fence_ack(servers: &[String], node: String, by: String) -> anyhow::Result<ExitCode> {
    on_leader(servers, |mut c| {
        let (node, by) = (node.clone(), by.clone());
        async move { c.fence_ack(FenceAckRequest { node, by }).await }
    })
    .await?;
    println!(
        "node {node} recorded as fenced (acknowledged by {by}): its locks are released, \
         except PW/EX locks in explicit lockspaces, which await a survivor's recovery"
    );
    Ok(ExitCode::SUCCESS)
}

/// `lockctl shutdown <addr>`: asks that very server to stop (a leader hands over first).
pub async fn shutdown(addr: String, force: bool) -> anyhow::Result<ExitCode> {
    let addr = if addr.contains(':') {
        addr
    } else {
        format!("{addr}:7100")
    };
    let mut c = client(&addr)
        .await
        .map_err(|e| anyhow!("cannot reach {addr}: {}", e.message()))?;
    let reply = c
        .shutdown(ShutdownRequest { force })
        .await
        .map_err(|e| anyhow!("{addr}: {}", e.message()))?
        .into_inner();
    match reply.new_leader_id {
        0 => println!("server {addr} is stopping (no leader elected yet)"),
        id => println!("server {addr} is stopping; server {id} leads"),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct HistoryLine {
    at_ms: u64,
    node: String,
    session: u64,
    what: String,
    level: u32,
    ok: bool,
    detail: String,
    /// "on" for unfencing records; empty for fencing.
    action: String,
}

impl From<FenceHistoryEntry> for HistoryLine {
    fn from(e: FenceHistoryEntry) -> Self {
        HistoryLine {
            at_ms: e.at_ms,
            node: e.node,
            session: e.session,
            what: e.what,
            level: e.level,
            ok: e.ok,
            detail: e.detail,
            action: e.action,
        }
    }
}

fn render_history(lines: &[HistoryLine], now_ms: u64) -> String {
    let mut rows = vec![[
        "AT", "NODE", "SESSION", "EVENT", "LEVEL", "RESULT", "DETAIL",
    ]
    .map(String::from)
    .to_vec()];
    for l in lines {
        let unfence = l.action == "on";
        let (level, result) = match (l.what.as_str(), unfence) {
            ("attempt", true) => ("-".into(), if l.ok { "unfenced" } else { "failed" }),
            ("attempt", false) => (l.level.to_string(), if l.ok { "ok" } else { "failed" }),
            ("done", _) => ("-".into(), "fenced"),
            ("failed", true) => ("-".into(), "login refused"),
            _ => ("-".into(), "-"),
        };
        let event = if unfence {
            format!("unfence {} (action=on)", l.what)
        } else {
            l.what.clone()
        };
        rows.push(vec![
            crate::time::when(l.at_ms, now_ms),
            l.node.clone(),
            l.session.to_string(),
            event,
            level,
            result.to_string(),
            l.detail.clone(),
        ]);
    }
    crate::views::table(&rows)
}

pub async fn fence_history(servers: &[String], json: bool) -> anyhow::Result<ExitCode> {
    let reply = on_leader(servers, |mut c| async move {
        c.fence_history(FenceHistoryRequest {}).await
    })
    .await?;
    let lines: Vec<HistoryLine> = reply.entries.into_iter().map(HistoryLine::from).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&lines)?);
    } else {
        print!("{}", render_history(&lines, crate::time::now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads answered from the applied state should come from the leader, whose state is
/// the freshest: a Status call that fails on followers, redirecting to the leader.
pub(crate) async fn leader_status(
    mut c: AdminServiceClient<Channel>,
) -> Result<tonic::Response<lockd_proto::v1::StatusReply>, tonic::Status> {
    let reply = c.status(StatusRequest {}).await?;
    if reply.get_ref().role != "leader" {
        let mut s = tonic::Status::unavailable("not the leader");
        if let Ok(v) = reply.get_ref().leader_addr.parse() {
            s.metadata_mut().insert(LEADER_METADATA_KEY, v);
        }
        return Err(s);
    }
    Ok(reply)
}

#[derive(Serialize)]
struct LockLine {
    lockspace: String,
    resource: String,
    lock_id: u64,
    node: String,
    session: u64,
    queue: String,
    granted: String,
    requested: String,
    token: u64,
    expired: bool,
}

fn mode_name(raw: i32) -> String {
    match Mode::try_from(raw) {
        Ok(Mode::Unspecified) | Err(_) => "-".into(),
        Ok(m) => m.as_str_name().into(),
    }
}

/// Printable resource name: text if it is, hex otherwise.
pub(crate) fn show_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => s.to_string(),
        _ => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

/// `lockctl locks [LOCKSPACE] [--resource R]`: holders, conversions and waiters.
pub async fn locks(
    servers: &[String],
    lockspace: Option<String>,
    resource: Option<String>,
    limit: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    if resource.is_some() && lockspace.is_none() {
        bail!("--resource needs a LOCKSPACE");
    }
    let request = LocksRequest {
        lockspace: lockspace.unwrap_or_default(),
        resource: resource.map(String::into_bytes).unwrap_or_default(),
        limit,
    };
    // The leader's applied state is the freshest: ask it, on the same connection.
    let reply = on_leader(servers, |mut c| {
        let request = request.clone();
        async move {
            leader_status(c.clone()).await?;
            c.locks(request).await
        }
    })
    .await?;
    let lines: Vec<LockLine> = reply
        .resources
        .iter()
        .flat_map(|r| {
            r.locks.iter().map(move |l| LockLine {
                lockspace: r.lockspace.clone(),
                resource: show_bytes(&r.resource),
                lock_id: l.lock_id,
                node: l.node.clone(),
                session: l.session,
                queue: l.queue.clone(),
                granted: mode_name(l.granted),
                requested: mode_name(l.requested),
                token: l.token,
                expired: l.expired,
            })
        })
        .collect();
    if json {
        let out = serde_json::json!({ "locks": lines, "truncated": reply.truncated });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("LOCKSPACE    RESOURCE             LOCK_ID   NODE         QUEUE       GRANTED  WANTS  TOKEN");
        for l in &lines {
            println!(
                "{:<12} {:<20} {:<9} {:<12} {:<11} {:<8} {:<6} {}{}",
                l.lockspace,
                l.resource,
                l.lock_id,
                l.node,
                l.queue,
                l.granted,
                l.requested,
                l.token,
                if l.expired { "  (expired holder)" } else { "" }
            );
        }
        for r in reply.resources.iter().filter(|r| r.lvb_invalid) {
            println!(
                "LVB of {}/{} is invalid",
                r.lockspace,
                show_bytes(&r.resource)
            );
        }
        if reply.truncated {
            println!("(more resources than --limit {limit})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_members(members: Vec<ServerMember>, json: bool, what: String) {
    let members: Vec<Member> = members.into_iter().map(Member::from).collect();
    if json {
        println!("{}", serde_json::json!({ "members": members }));
    } else {
        println!("{what}; members: {}", render_members(&members));
    }
}

/// `lockctl server add ID ADDR`: joins as a learner, catches up, becomes a voter.
pub async fn server_add(
    servers: &[String],
    id: u64,
    addr: String,
    catch_up: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    // The leader waits up to `catch_up` for the learner; give the call a little more.
    let reply = on_leader_within(servers, catch_up + Duration::from_secs(5), |mut c| {
        let addr = addr.clone();
        async move {
            c.add_server(AddServerRequest {
                id,
                addr,
                catch_up_timeout_ms: catch_up.as_millis() as u64,
            })
            .await
        }
    })
    .await?;
    print_members(
        reply.members,
        json,
        format!("server {id} ({addr}) is a voter"),
    );
    Ok(ExitCode::SUCCESS)
}

const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);

/// `lockctl server remove ID`.
pub async fn server_remove(servers: &[String], id: u64, json: bool) -> anyhow::Result<ExitCode> {
    // Removing the leader waits for it to hand leadership over.
    let reply = on_leader_within(servers, REMOVE_TIMEOUT, |mut c| async move {
        c.remove_server(RemoveServerRequest { id }).await
    })
    .await?;
    print_members(
        reply.members,
        json,
        format!("server {id} is no longer a member (stop it now)"),
    );
    Ok(ExitCode::SUCCESS)
}

/// `lockctl log-level FILTER`: on every listed server (or one), like gulm's setverb.
pub async fn log_level(
    servers: &[String],
    only: Option<String>,
    filter: String,
) -> anyhow::Result<ExitCode> {
    let targets = match only {
        Some(addr) => vec![addr],
        None => servers.to_vec(),
    };
    let mut failed = 0;
    for addr in targets {
        let outcome = match client(&addr).await {
            Ok(mut c) => c
                .set_log_level(SetLogLevelRequest {
                    filter: filter.clone(),
                })
                .await
                .map(|_| ()),
            Err(e) => Err(e),
        };
        match outcome {
            Ok(()) => println!("{addr}: log filter set to `{filter}`"),
            Err(e) => {
                failed += 1;
                eprintln!("{addr}: {}", e.message());
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `lockctl node <name>`: the leader's view of one node.
pub async fn node(servers: &[String], name: String, json: bool) -> anyhow::Result<ExitCode> {
    let status = on_leader(servers, leader_status).await?;
    let Some(n) = status.nodes.iter().find(|n| n.name == name).cloned() else {
        match status.departed_nodes.iter().find(|d| d.name == name) {
            Some(d) => {
                let state = lockd_proto::v1::NodeState::try_from(d.state)
                    .map_or("UNKNOWN", |s| s.as_str_name());
                let detail = if d.detail.is_empty() {
                    String::new()
                } else {
                    format!(": {}", d.detail)
                };
                bail!(
                    "node {name} has no session: {state} {}{detail}",
                    crate::time::when(d.at_ms, crate::time::now_ms())
                );
            }
            None if status.configured_nodes.contains(&name) => {
                bail!("node {name} has no session: never seen (no login, logout or fence of it is on record)")
            }
            None => bail!("node {name} has no session and is not in the cluster config"),
        }
    };
    let line = crate::status::Node::from(n);
    if json {
        println!("{}", serde_json::to_string_pretty(&line)?);
    } else {
        println!(
            "node:        {}\nsession:     {}\nstate:       {}\nheld locks:  {}\nsilent:      {}\nexpired at:  {}\nfence:       {}",
            line.name,
            line.session,
            line.state,
            line.held_locks,
            crate::time::age(line.silent_ms),
            crate::time::when(line.expired_at_ms, crate::time::now_ms()),
            line.fence,
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_renders_attempts_and_done() {
        let lines = vec![
            HistoryLine {
                at_ms: 1,
                node: "a".into(),
                session: 4,
                what: "started".into(),
                level: 0,
                ok: false,
                detail: String::new(),
                action: String::new(),
            },
            HistoryLine {
                at_ms: 2,
                node: "a".into(),
                session: 4,
                what: "attempt".into(),
                level: 1,
                ok: false,
                detail: "fence_x: exit 1".into(),
                action: String::new(),
            },
            HistoryLine {
                at_ms: 3,
                node: "a".into(),
                session: 4,
                what: "done".into(),
                level: 0,
                ok: true,
                detail: "acknowledged by root".into(),
                action: String::new(),
            },
        ];
        let text = render_history(&lines, 61_002);
        assert!(
            text.contains("attempt  1      failed  fence_x: exit 1"),
            "{text}"
        );
        assert!(
            text.contains("done     -      fenced  acknowledged by root"),
            "{text}"
        );
        assert!(
            text.contains("1970-01-01T00:00:00Z (1m 1s ago)  a     4        started"),
            "{text}"
        );
    }

    #[test]
    fn history_names_unfencing_and_its_action() {
        let line = |what: &str, ok: bool, detail: &str| HistoryLine {
            at_ms: 1,
            node: "a".into(),
            session: 9,
            what: what.into(),
            level: 0,
            ok,
            detail: detail.into(),
            action: "on".into(),
        };
        let lines = vec![
            line("started", false, ""),
            line("attempt", false, "fence_scsi: exit 1"),
            line("attempt", true, "fence_scsi: exit 0"),
            line("failed", false, "3 attempts failed; login refused"),
        ];
        let text = render_history(&lines, 61_002);
        let rows: Vec<&str> = text.lines().collect();
        assert!(rows[1].contains("unfence started (action=on)"), "{text}");
        assert!(
            rows[2]
                .contains("unfence attempt (action=on)  -      failed         fence_scsi: exit 1"),
            "{text}"
        );
        assert!(rows[3].contains("unfenced"), "{text}");
        assert!(rows[4].contains("login refused"), "{text}");
    }
}
