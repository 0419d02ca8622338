//! `lockctl status`: every server's own view (AdminService.Status, asked of all servers at
//! once), printed as a table or JSON, plus a summary from the leader's view.

use std::process::ExitCode;
use std::time::Duration;

use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::{NodeInfo, NodeState, PeerStatus, ServerMember, StatusReply, StatusRequest};
use serde::Serialize;

/// Exit status when servers answered but none is the leader: no quorum, or an election
/// under way (2 is clap's usage error).
pub const EXIT_NO_LEADER: u8 = 3;
/// Exit status when a leader answered but something needs an operator: a listed
/// server is unreachable, stopping or lagging, or the leader does not hear from every
/// voter (and, for `lockctl nodes`, a node is expired or being fenced).
pub const EXIT_DEGRADED: u8 = 4;
/// A server whose applied index is this far behind the leader's commit index lags.
pub const LAG_ENTRIES: u64 = 1_000;

/// One listed server and what it answered.
#[derive(Debug, Clone, Serialize)]
pub struct ServerEntry {
    /// The address as listed in `--servers`.
    pub address: String,
    pub reachable: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub status: Option<ServerStatus>,
}

/// `StatusReply`, serializable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerStatus {
    pub id: u64,
    pub addr: String,
    pub role: String,
    pub term: u64,
    pub leader_id: u64,
    pub leader_addr: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub voters: u64,
    pub quorum_needs: u64,
    pub quorum_has: u64,
    pub sessions: u64,
    pub held_locks: u64,
    pub waiting_requests: u64,
    pub lockspaces: u64,
    pub last_token: u64,
    /// The newest log format this server's build reads and writes (0: not reported).
    pub log_format: u32,
    pub cluster_name: String,
    pub cluster_id: u64,
    pub peers: Vec<Peer>,
    /// Voters and learners of the configuration this server applied.
    pub members: Vec<Member>,
    pub heartbeat_interval_ms: u64,
    pub allowed_misses: u32,
    pub expiry_window_ms: u64,
    pub grace_ms: u64,
    /// This server's descriptor limit (raised at start where allowed) and the
    /// connections it serves at once.
    pub max_open_files: u64,
    pub max_connections: u64,
    pub nodes: Vec<Node>,
    /// Handing over or draining after `lockctl shutdown` or SIGTERM.
    pub stopping: bool,
    /// Every node of the cluster config.
    pub configured_nodes: Vec<String>,
    /// This server's last monitor check of each fence device.
    pub fence_devices: Vec<FenceDevice>,
    /// How each node without a session left its last one (none: never seen).
    pub departed: Vec<Departed>,
}

/// A node without a session and how it left its last one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Departed {
    pub name: String,
    /// LOGGED_OUT, FENCED or UNFENCE_FAILED.
    pub state: String,
    /// Ms since the Unix epoch.
    pub at_ms: u64,
    /// UNFENCE_FAILED: the attempts and the last one's outcome.
    pub detail: String,
}

/// One fence device's last `action=monitor` result, as a server saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FenceDevice {
    pub node: String,
    pub level: u32,
    pub agent: String,
    pub ok: bool,
    pub detail: String,
    /// Ms since the Unix epoch.
    pub checked_at_ms: u64,
}

/// A node session as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Node {
    pub name: String,
    pub session: u64,
    /// LOGGED_IN, WAS_LOGGED_IN, EXPIRED, ...
    pub state: String,
    pub held_locks: u64,
    /// Ms since the Unix epoch; 0 if not expired.
    pub expired_at_ms: u64,
    /// Leader only: ms since the node was last heard from.
    pub silent_ms: u64,
    /// While expired or fencing: "next level index N, M failed rounds"; else "-".
    pub fence: String,
}

/// A proto NodeState's name (LOGGED_IN, ...), or UNKNOWN(n) from a newer server.
fn state_name(state: i32) -> String {
    NodeState::try_from(state)
        .map(|s| s.as_str_name().to_string())
        .unwrap_or_else(|_| format!("UNKNOWN({state})"))
}

impl From<NodeInfo> for Node {
    fn from(n: NodeInfo) -> Node {
        Node {
            name: n.name,
            session: n.session,
            state: state_name(n.state),
            held_locks: n.held_locks,
            expired_at_ms: n.expired_at_ms,
            silent_ms: n.silent_ms,
            fence: match NodeState::try_from(n.state) {
                Ok(NodeState::Expired | NodeState::Fencing) => format!(
                    "next level index {}, {} failed rounds",
                    n.fence_next_level_index, n.fence_failed_rounds
                ),
                Ok(NodeState::Unfencing) => format!(
                    "unfencing (action=on), {} failed attempts",
                    n.fence_failed_rounds
                ),
                _ => "-".to_string(),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub id: u64,
    pub addr: String,
    pub matched: u64,
    pub recent_active: bool,
    pub learner: bool,
    /// The log format the peer's latest Raft stream announced to this leader (0: not
    /// connected since the leader started).
    pub log_format: u32,
}

/// A server of the cluster's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    pub voter: bool,
}

impl From<ServerMember> for Member {
    fn from(m: ServerMember) -> Member {
        Member {
            id: m.id,
            addr: m.addr,
            voter: m.voter,
        }
    }
}

/// "1 (addr), 2 (addr), 4 (addr, learner)".
pub fn render_members(members: &[Member]) -> String {
    let shown: Vec<String> = members
        .iter()
        .map(|m| {
            let addr = if m.addr.is_empty() { "?" } else { &m.addr };
            if m.voter {
                format!("{} ({addr})", m.id)
            } else {
                format!("{} ({addr}, learner)", m.id)
            }
        })
        .collect();
    shown.join(", ")
}

impl From<StatusReply> for ServerStatus {
    fn from(r: StatusReply) -> ServerStatus {
        ServerStatus {
            id: r.id,
            addr: r.addr,
            role: r.role,
            term: r.term,
            leader_id: r.leader_id,
            leader_addr: r.leader_addr,
            commit_index: r.commit_index,
            applied_index: r.applied_index,
            voters: r.voters,
            quorum_needs: r.quorum_needs,
            quorum_has: r.quorum_has,
            sessions: r.sessions,
            held_locks: r.held_locks,
            waiting_requests: r.waiting_requests,
            lockspaces: r.lockspaces,
            last_token: r.last_token,
            log_format: r.log_format,
            cluster_name: r.cluster_name,
            cluster_id: r.cluster_id,
            peers: r.peers.into_iter().map(Peer::from).collect(),
            members: r.members.into_iter().map(Member::from).collect(),
            heartbeat_interval_ms: r.heartbeat_interval_ms,
            allowed_misses: r.allowed_misses,
            expiry_window_ms: r.expiry_window_ms,
            grace_ms: r.grace_ms,
            max_open_files: r.max_open_files,
            max_connections: r.max_connections,
            nodes: r.nodes.into_iter().map(Node::from).collect(),
            stopping: r.stopping,
            configured_nodes: r.configured_nodes,
            fence_devices: r
                .fence_devices
                .into_iter()
                .map(|d| FenceDevice {
                    node: d.node,
                    level: d.level,
                    agent: d.agent,
                    ok: d.ok,
                    detail: d.detail,
                    checked_at_ms: d.checked_at_ms,
                })
                .collect(),
            departed: r
                .departed_nodes
                .into_iter()
                .map(|d| Departed {
                    name: d.name,
                    state: state_name(d.state),
                    at_ms: d.at_ms,
                    detail: d.detail,
                })
                .collect(),
        }
    }
}

impl From<PeerStatus> for Peer {
    fn from(p: PeerStatus) -> Peer {
        Peer {
            id: p.id,
            addr: p.addr,
            matched: p.matched,
            recent_active: p.recent_active,
            learner: p.learner,
            log_format: p.log_format,
        }
    }
}

/// The whole answer, as printed with `--json`.
#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub servers: Vec<ServerEntry>,
    pub leader: Option<ServerEntry>,
    /// "healthy", "degraded", "no_quorum" or "unreachable" (the exit status in words).
    pub health: &'static str,
    /// Why the cluster is degraded; empty when healthy.
    pub problems: Vec<String>,
}

impl ClusterView {
    pub fn new(servers: Vec<ServerEntry>) -> ClusterView {
        let leader = pick_leader(&servers).cloned();
        let problems = problems(&servers, leader.as_ref().and_then(|l| l.status.as_ref()));
        let health = if !servers.iter().any(|s| s.reachable) {
            "unreachable"
        } else if leader.is_none() {
            "no_quorum"
        } else if !problems.is_empty() {
            "degraded"
        } else {
            "healthy"
        };
        ClusterView {
            servers,
            leader,
            health,
            problems,
        }
    }

    /// 0 healthy, 4 degraded, 3 no leader (no quorum), 1 no server answered.
    pub fn exit_code(&self) -> ExitCode {
        match self.health {
            "unreachable" => ExitCode::FAILURE,
            "no_quorum" => ExitCode::from(EXIT_NO_LEADER),
            "degraded" => ExitCode::from(EXIT_DEGRADED),
            _ => ExitCode::SUCCESS,
        }
    }
}

/// What makes a cluster with a leader degraded.
fn problems(servers: &[ServerEntry], leader: Option<&ServerStatus>) -> Vec<String> {
    let mut out = Vec::new();
    for s in servers {
        match &s.status {
            None => out.push(format!("server {} does not answer", s.address)),
            Some(st) if st.stopping => {
                out.push(format!("server {} ({}) is stopping", st.id, s.address))
            }
            Some(st) => {
                if let Some(l) = leader {
                    if st.applied_index + LAG_ENTRIES < l.commit_index {
                        out.push(format!(
                            "server {} ({}) lags: applied {}, the leader committed {}",
                            st.id, s.address, st.applied_index, l.commit_index
                        ));
                    }
                }
            }
        }
    }
    if let Some(l) = leader {
        for d in l.fence_devices.iter().filter(|d| !d.ok) {
            out.push(format!(
                "fence device of {} (level {}, {}) fails its monitor check: {}",
                d.node, d.level, d.agent, d.detail
            ));
        }
        if l.quorum_has < l.voters {
            out.push(format!(
                "the leader hears from {} of {} voters",
                l.quorum_has, l.voters
            ));
        }
    }
    out
}

/// The server that says it is the leader; if two do (an old leader that has not yet
/// noticed the new term), the one with the higher term.
fn pick_leader(servers: &[ServerEntry]) -> Option<&ServerEntry> {
    servers
        .iter()
        .filter(|s| s.status.as_ref().is_some_and(|st| st.role == "leader"))
        .max_by_key(|s| s.status.as_ref().map_or(0, |st| st.term))
}

/// `lockctl status`, once, or with `watch` every that often until Ctrl-C (then the
/// exit status of the last view).
pub async fn run(
    servers: &[String],
    timeout: Duration,
    watch: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let Some(every) = watch else {
        let view = gather(servers, timeout).await;
        if json {
            println!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            print!("{}", render(&view));
        }
        return Ok(view.exit_code());
    };
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = ExitCode::SUCCESS;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(last),
        }
        let view = gather(servers, timeout).await;
        if terminal && !json {
            // Clear the screen and home the cursor, like watch(1).
            print!("\x1b[2J\x1b[H");
        }
        if !json {
            println!(
                "{}  every {}  (Ctrl-C to stop)\n",
                humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                crate::time::age(every.as_millis() as u64)
            );
        }
        show(&view, json)?;
        last = view.exit_code();
    }
}

fn show(view: &ClusterView, json: bool) -> anyhow::Result<()> {
    if json {
        // One document per line while watching, so each refresh is one JSON value.
        println!("{}", serde_json::to_string(view)?);
    } else {
        print!("{}", render(view));
    }
    Ok(())
}

async fn gather(servers: &[String], timeout: Duration) -> ClusterView {
    let queries = servers.iter().map(|addr| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let answer = query(&addr, timeout).await;
            match answer {
                Ok(reply) => ServerEntry {
                    address: addr,
                    reachable: true,
                    error: None,
                    status: Some(reply.into()),
                },
                Err(error) => ServerEntry {
                    address: addr,
                    reachable: false,
                    error: Some(error),
                    status: None,
                },
            }
        })
    });
    let mut entries = Vec::with_capacity(servers.len());
    for (query, addr) in queries.collect::<Vec<_>>().into_iter().zip(servers) {
        entries.push(query.await.unwrap_or_else(|e| ServerEntry {
            address: addr.clone(),
            reachable: false,
            error: Some(format!("query task failed: {e}")),
            status: None,
        }));
    }
    ClusterView::new(entries)
}

/// One server's status, or why there is none, within `timeout` (connecting included).
async fn query(addr: &str, timeout: Duration) -> Result<StatusReply, String> {
    let endpoint = crate::tls::endpoint(addr)?.connect_timeout(timeout);
    let call = async {
        let channel = endpoint.connect().await.map_err(|e| error_chain(&e))?;
        AdminServiceClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|status| {
                let mut text = format!("{:?}: {}", status.code(), status.message());
                if let Some(source) = std::error::Error::source(&status) {
                    text.push_str(": ");
                    text.push_str(&error_chain(source));
                }
                text
            })
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(answer) => answer.map_err(crate::tls::explain),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

/// "transport error: tcp connect error: Connection refused (os error 111)".
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

fn or_dash(n: u64) -> String {
    if n == 0 {
        "-".to_string()
    } else {
        n.to_string()
    }
}

/// The table and the leader's summary, as printed without `--json`.
pub fn render(view: &ClusterView) -> String {
    const HEADER: [&str; 7] = [
        "ID", "ADDRESS", "ROLE", "TERM", "LEADER", "COMMIT", "APPLIED",
    ];
    let rows: Vec<Vec<String>> = view
        .servers
        .iter()
        .map(|s| match (&s.status, &s.error) {
            (Some(st), _) => vec![
                st.id.to_string(),
                s.address.clone(),
                st.role.clone(),
                st.term.to_string(),
                or_dash(st.leader_id),
                st.commit_index.to_string(),
                st.applied_index.to_string(),
            ],
            (None, error) => vec![
                "-".to_string(),
                s.address.clone(),
                format!(
                    "unreachable: {}",
                    error.as_deref().unwrap_or("unknown error")
                ),
            ],
        })
        .collect();
    // Column widths from the header and the full rows; an unreachable row's message may
    // run past its column.
    let mut widths: Vec<usize> = HEADER.iter().map(|h| h.len()).collect();
    for row in rows.iter().filter(|r| r.len() == HEADER.len()) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in rows.iter().filter(|r| r.len() < HEADER.len()) {
        widths[0] = widths[0].max(row[0].len());
        widths[1] = widths[1].max(row[1].len());
    }
    let mut lines = vec![HEADER.map(String::from).to_vec()];
    lines.extend(rows);
    let mut out = crate::views::table_with_widths(&lines, &widths);
    out.push('\n');
    out.push_str(&summary(view));
    out
}

/// Whether the leader writes entries of several commands (log format 2): "on", or
/// "off" with the servers whose build it has not seen read them.
fn batch_entries(leader: &ServerStatus) -> String {
    const BATCH: u32 = lockd_proto::LOG_FORMAT_BATCH;
    if leader.log_format < BATCH {
        return "off (the leader's build writes one command per entry)".to_string();
    }
    let behind: Vec<String> = (leader.peers.iter())
        .filter(|p| p.log_format < BATCH)
        .map(|p| match p.log_format {
            0 => format!("server {}: not connected since the leader started", p.id),
            f => format!("server {}: log format {f}", p.id),
        })
        .collect();
    if behind.is_empty() {
        format!("on (every server reads log format {BATCH})")
    } else {
        format!("off ({})", behind.join("; "))
    }
}

fn summary(view: &ClusterView) -> String {
    let Some(leader) = view.leader.as_ref().and_then(|l| l.status.as_ref()) else {
        if !view.servers.iter().any(|s| s.reachable) {
            return "no server answered\n".to_string();
        }
        // Name the leader the followers believe in, if any: it may be among the
        // unreachable.
        let believed = view
            .servers
            .iter()
            .filter_map(|s| s.status.as_ref())
            .filter(|st| st.leader_id != 0)
            .max_by_key(|st| st.term);
        return match believed {
            Some(st) => format!(
                "no leader answered (servers report leader {} at {} in term {})\n",
                st.leader_id,
                if st.leader_addr.is_empty() {
                    "?"
                } else {
                    &st.leader_addr
                },
                st.term
            ),
            None => "no leader: election in progress or no quorum\n".to_string(),
        };
    };
    let cluster = if leader.cluster_name.is_empty() {
        format!("{}", leader.cluster_id)
    } else {
        format!("{} (id {})", leader.cluster_name, leader.cluster_id)
    };
    let mut out = format!(
        "cluster:          {cluster}\n\
         leader:           {} ({}), term {}\n\
         quorum:           has {}, needs {} of {} voters\n\
         members:          {}\n\
         sessions:         {}\n\
         held locks:       {}\n\
         waiting requests: {}\n\
         lockspaces:       {}\n\
         last token:       {}\n\
         batch entries:    {}\n\
         liveness:         heartbeat {} ms, expiry after {} misses ({} ms), failover grace {} ms\n\
         leader limits:    {} open files, {} connections\n",
        leader.id,
        leader.addr,
        leader.term,
        leader.quorum_has,
        leader.quorum_needs,
        leader.voters,
        render_members(&leader.members),
        leader.sessions,
        leader.held_locks,
        leader.waiting_requests,
        leader.lockspaces,
        leader.last_token,
        batch_entries(leader),
        leader.heartbeat_interval_ms,
        leader.allowed_misses,
        leader.expiry_window_ms,
        leader.grace_ms,
        leader.max_open_files,
        leader.max_connections,
    );
    out.push_str(&format!("health:           {}\n", view.health));
    for p in &view.problems {
        out.push_str(&format!("  - {p}\n"));
    }
    let now_ms = crate::time::now_ms();
    let nodes = crate::views::node_lines(&leader.configured_nodes, &leader.nodes, &leader.departed);
    if !nodes.is_empty() {
        out.push('\n');
        out.push_str(&crate::views::render_nodes(&nodes, now_ms));
    }
    if !leader.fence_devices.is_empty() {
        let mut rows = vec![[
            "FENCE DEVICE OF",
            "LEVEL",
            "AGENT",
            "MONITOR",
            "CHECKED",
            "DETAIL",
        ]
        .map(String::from)
        .to_vec()];
        for d in &leader.fence_devices {
            rows.push(vec![
                d.node.clone(),
                d.level.to_string(),
                d.agent.clone(),
                if d.ok { "ok" } else { "FAILING" }.to_string(),
                crate::time::when(d.checked_at_ms, now_ms),
                d.detail.clone(),
            ]);
        }
        out.push('\n');
        out.push_str(&crate::views::table(&rows));
    }
    out
}

#[cfg(test)]
mod tests;
