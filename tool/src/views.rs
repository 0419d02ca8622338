//! `lockctl nodes` and `lockctl lockspaces`: the operator's one-screen views, like
//! crm_mon's node list. Both read the leader's answers (Status, Locks) and only
//! arrange them.

use std::collections::BTreeMap;
use std::process::ExitCode;

use lockd_proto::v1::{LocksRequest, NodeState};
use serde::Serialize;

use crate::admin::{leader_status, on_leader, show_bytes};
use crate::status::{Departed, Node};
use crate::time::{age, now_ms, when};

/// The state shown for a configured node without a session that the cluster has no
/// departure record of: it never logged in (or its record was dropped, the oldest
/// first, beyond the table's 4,096 records). A node that left shows how: LOGGED_OUT,
/// FENCED or UNFENCE_FAILED (the replicated departure records, issue 15).
pub const NEVER_SEEN: &str = "NEVER_SEEN";

/// One row of `lockctl nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeLine {
    pub name: String,
    /// With a session: LOGGED_IN, WAS_LOGGED_IN, UNFENCING, EXPIRED, FENCING, FENCED.
    /// Without one: how it left its last one (LOGGED_OUT, FENCED, UNFENCE_FAILED), or
    /// NEVER_SEEN.
    pub state: String,
    /// 0 without a session.
    pub session: u64,
    pub held_locks: u64,
    /// The leader's ms since it last heard from the session; 0 without one.
    pub silent_ms: u64,
    /// Ms since the Unix epoch; 0 if not expired.
    pub expired_at_ms: u64,
    pub fence: String,
    /// Whether the cluster config names the node (a session of a node since removed
    /// from the config is still shown).
    pub configured: bool,
    /// Without a session: when it left its last one (ms since the Unix epoch); 0
    /// otherwise.
    pub left_at_ms: u64,
    /// Without a session: why its last login was refused (UNFENCE_FAILED).
    pub left_detail: String,
}

/// Every configured node, in config order, each with its sessions (a fenced session
/// and a new login can coexist) or, without one, how it left (`departed`), then
/// sessions of nodes not in the config.
pub fn node_lines(
    configured_nodes: &[String],
    sessions: &[Node],
    departed: &[Departed],
) -> Vec<NodeLine> {
    let mut lines = Vec::new();
    let line = |n: &Node, configured: bool| NodeLine {
        name: n.name.clone(),
        state: n.state.clone(),
        session: n.session,
        held_locks: n.held_locks,
        silent_ms: n.silent_ms,
        expired_at_ms: n.expired_at_ms,
        fence: n.fence.clone(),
        configured,
        left_at_ms: 0,
        left_detail: String::new(),
    };
    for name in configured_nodes {
        let mut own: Vec<&Node> = sessions.iter().filter(|n| &n.name == name).collect();
        own.sort_by_key(|n| n.session);
        if own.is_empty() {
            let left = departed.iter().find(|d| &d.name == name);
            lines.push(NodeLine {
                name: name.clone(),
                state: left.map_or(NEVER_SEEN.to_string(), |d| d.state.clone()),
                session: 0,
                held_locks: 0,
                silent_ms: 0,
                expired_at_ms: 0,
                fence: "-".to_string(),
                configured: true,
                left_at_ms: left.map_or(0, |d| d.at_ms),
                left_detail: left.map_or(String::new(), |d| d.detail.clone()),
            });
        }
        lines.extend(own.into_iter().map(|n| line(n, true)));
    }
    for n in sessions {
        if !configured_nodes.contains(&n.name) {
            lines.push(line(n, false));
        }
    }
    lines
}

/// The text table of `lockctl nodes`.
pub fn render_nodes(lines: &[NodeLine], now_ms: u64) -> String {
    let mut rows = vec![[
        "NODE",
        "STATE",
        "SESSION",
        "HELD",
        "SILENT",
        "EXPIRED",
        "FENCE / LEFT",
    ]
    .map(String::from)
    .to_vec()];
    for l in lines {
        let has_session = l.session != 0;
        let state = match (has_session, l.configured) {
            (false, _) => format!("{} (no session)", l.state),
            (true, false) => format!("{} (not in config)", l.state),
            (true, true) => l.state.clone(),
        };
        let last = if has_session || l.left_at_ms == 0 {
            l.fence.clone()
        } else if l.left_detail.is_empty() {
            format!("left {}", when(l.left_at_ms, now_ms))
        } else {
            format!("left {}: {}", when(l.left_at_ms, now_ms), l.left_detail)
        };
        rows.push(vec![
            l.name.clone(),
            state,
            if has_session {
                l.session.to_string()
            } else {
                "-".into()
            },
            if has_session {
                l.held_locks.to_string()
            } else {
                "-".into()
            },
            if has_session && l.silent_ms > 0 {
                age(l.silent_ms)
            } else {
                "-".into()
            },
            when(l.expired_at_ms, now_ms),
            last,
        ]);
    }
    table(&rows)
}

/// Left-aligned columns two spaces apart; the last column is not padded.
pub fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    table_with_widths(rows, &widths)
}

/// Rows as lines, each cell but a row's last padded to its column's width in `widths`
/// (which has a width for every column but a row's last), two spaces apart.
pub fn table_with_widths(rows: &[Vec<String>], widths: &[usize]) -> String {
    let mut out = String::new();
    for row in rows {
        let last = row.len().saturating_sub(1);
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if i == last {
                    c.clone()
                } else {
                    format!("{c:<width$}", width = widths[i])
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// `lockctl nodes`. Exit 0, or 4 if a configured node is expired or being fenced
/// (something an operator must look at).
pub async fn nodes(servers: &[String], json: bool) -> anyhow::Result<ExitCode> {
    let status = on_leader(servers, leader_status).await?;
    let status = crate::status::ServerStatus::from(status);
    let lines = node_lines(&status.configured_nodes, &status.nodes, &status.departed);
    if json {
        println!("{}", serde_json::to_string_pretty(&lines)?);
    } else {
        print!("{}", render_nodes(&lines, now_ms()));
    }
    let unclean = [NodeState::Expired, NodeState::Fencing].map(|s| s.as_str_name());
    Ok(
        if lines.iter().any(|l| unclean.contains(&l.state.as_str())) {
            ExitCode::from(crate::status::EXIT_DEGRADED)
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// One row of `lockctl lockspaces`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct LockspaceLine {
    pub name: String,
    /// Resources with at least one lock or request.
    pub resources: u64,
    pub granted: u64,
    pub converting: u64,
    pub waiting: u64,
    /// Locks of fenced nodes awaiting RecoveryDone (explicit lockspaces).
    pub expired_holders: u64,
    pub invalid_lvbs: u64,
    /// Nodes holding or waiting for a lock in it.
    pub nodes: Vec<String>,
}

/// The most resources `lockctl lockspaces` reads (the server's own limit).
const MAX_RESOURCES: u32 = 10_000;

/// `lockctl lockspaces`: per lockspace, its resources, locks by queue, and nodes.
pub async fn lockspaces(servers: &[String], json: bool) -> anyhow::Result<ExitCode> {
    let request = LocksRequest {
        lockspace: String::new(),
        resource: Vec::new(),
        limit: MAX_RESOURCES,
    };
    let (status, reply) = on_leader(servers, |mut c| {
        let request = request.clone();
        async move {
            let status = leader_status(c.clone()).await?.into_inner();
            let locks = c.locks(request).await?;
            Ok(tonic::Response::new((status, locks.into_inner())))
        }
    })
    .await?;
    let mut by_name: BTreeMap<String, LockspaceLine> = BTreeMap::new();
    for r in &reply.resources {
        let line = by_name
            .entry(r.lockspace.clone())
            .or_insert_with(|| LockspaceLine {
                name: r.lockspace.clone(),
                ..LockspaceLine::default()
            });
        line.resources += 1;
        line.invalid_lvbs += u64::from(r.lvb_invalid);
        for l in &r.locks {
            match l.queue.as_str() {
                "holder" => line.granted += 1,
                "converting" => line.converting += 1,
                _ => line.waiting += 1,
            }
            line.expired_holders += u64::from(l.expired);
            if !line.nodes.contains(&l.node) {
                line.nodes.push(l.node.clone());
            }
        }
    }
    let lines: Vec<LockspaceLine> = by_name.into_values().collect();
    let unlisted = status.lockspaces.saturating_sub(lines.len() as u64);
    if json {
        let out = serde_json::json!({
            "lockspaces": lines,
            "lockspaces_total": status.lockspaces,
            "truncated": reply.truncated,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let mut rows = vec![[
            "LOCKSPACE",
            "RESOURCES",
            "GRANTED",
            "CONVERTING",
            "WAITING",
            "EXPIRED",
            "BAD_LVB",
            "NODES",
        ]
        .map(String::from)
        .to_vec()];
        for l in &lines {
            rows.push(vec![
                show_bytes(l.name.as_bytes()),
                l.resources.to_string(),
                l.granted.to_string(),
                l.converting.to_string(),
                l.waiting.to_string(),
                l.expired_holders.to_string(),
                l.invalid_lvbs.to_string(),
                l.nodes.join(","),
            ]);
        }
        print!("{}", table(&rows));
        if unlisted > 0 {
            println!("({unlisted} more lockspaces are open but hold no locks)");
        }
        if reply.truncated {
            println!(
                "(more than {MAX_RESOURCES} resources: counts cover the first {MAX_RESOURCES})"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lockd_proto::v1::{NodeInfo, StatusReply};

    fn session(name: &str, session: u64, state: NodeState) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            session,
            state: state as i32,
            held_locks: 2,
            silent_ms: 57_382,
            expired_at_ms: if state == NodeState::LoggedIn {
                0
            } else {
                1_764_518_546_000
            },
            ..NodeInfo::default()
        }
    }

    #[test]
    fn every_configured_node_is_listed_with_or_without_a_session() {
        let status = StatusReply {
            configured_nodes: vec!["a".into(), "b".into(), "c".into()],
            nodes: vec![
                session("c", 9, NodeState::LoggedIn),
                session("a", 4, NodeState::Fencing),
                session("zz", 11, NodeState::LoggedIn),
            ],
            ..StatusReply::default()
        };
        let sessions: Vec<Node> = status.nodes.into_iter().map(Node::from).collect();
        let lines = node_lines(&status.configured_nodes, &sessions, &[]);
        let shown: Vec<(&str, &str, bool)> = lines
            .iter()
            .map(|l| (l.name.as_str(), l.state.as_str(), l.configured))
            .collect();
        assert_eq!(
            shown,
            [
                ("a", "FENCING", true),
                ("b", NEVER_SEEN, true),
                ("c", "LOGGED_IN", true),
                ("zz", "LOGGED_IN", false)
            ]
        );
        let text = render_nodes(&lines, 1_764_518_546_000 + 65_000);
        let rows: Vec<&str> = text.lines().collect();
        assert_eq!(
            rows[0],
            "NODE  STATE                      SESSION  HELD  SILENT  EXPIRED                           FENCE / LEFT"
        );
        assert!(
            rows[1].starts_with(
                "a     FENCING                    4        2     57s     2025-11-30T16:02:26Z (1m 5s ago)"
            ),
            "{text}"
        );
        assert!(
            rows[2].starts_with("b     NEVER_SEEN (no session)    -        -     -       -"),
            "{text}"
        );
        assert!(rows[4].contains("LOGGED_IN (not in config)"), "{text}");
    }

    #[test]
    fn a_node_that_left_shows_how_and_when_and_one_never_seen_says_so() {
        let configured: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        let departed = [
            ("a", "LOGGED_OUT", ""),
            ("b", "FENCED", ""),
            (
                "c",
                "UNFENCE_FAILED",
                "3 attempts, last: fence_scsi: exit 1",
            ),
        ]
        .map(|(name, state, detail)| Departed {
            name: name.into(),
            state: state.into(),
            at_ms: 1_764_518_546_000,
            detail: detail.into(),
        });
        let lines = node_lines(&configured, &[], &departed);
        let states: Vec<&str> = lines.iter().map(|l| l.state.as_str()).collect();
        assert_eq!(
            states,
            ["LOGGED_OUT", "FENCED", "UNFENCE_FAILED", NEVER_SEEN]
        );
        assert_eq!(lines[0].left_at_ms, 1_764_518_546_000);
        assert_eq!(lines[3].left_at_ms, 0);
        let text = render_nodes(&lines, 1_764_518_546_000 + 65_000);
        let rows: Vec<&str> = text.lines().collect();
        assert!(
            rows[1].starts_with("a     LOGGED_OUT (no session)")
                && rows[1].ends_with("left 2025-11-30T16:02:26Z (1m 5s ago)"),
            "{text}"
        );
        assert!(
            rows[3].ends_with("(1m 5s ago): 3 attempts, last: fence_scsi: exit 1"),
            "{text}"
        );
        assert!(
            rows[4].starts_with("d     NEVER_SEEN (no session)"),
            "{text}"
        );
    }
}
