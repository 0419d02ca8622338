use super::*;

fn answered(address: &str, id: u64, role: &str, term: u64, leader_id: u64) -> ServerEntry {
    ServerEntry {
        address: address.into(),
        reachable: true,
        error: None,
        status: Some(
            StatusReply {
                id,
                addr: address.into(),
                role: role.into(),
                term,
                leader_id,
                leader_addr: if leader_id == 0 {
                    String::new()
                } else {
                    format!("127.0.0.1:710{leader_id}")
                },
                commit_index: 120,
                applied_index: 119,
                voters: 3,
                quorum_needs: 2,
                quorum_has: if role == "leader" { 3 } else { 0 },
                sessions: 4,
                held_locks: 10,
                waiting_requests: 1,
                lockspaces: 2,
                last_token: 118,
                cluster_name: "alpha".into(),
                cluster_id: 77,
                peers: vec![],
                members: vec![],
                heartbeat_interval_ms: 1_000,
                allowed_misses: 2,
                expiry_window_ms: 2_000,
                grace_ms: 2_000,
                max_open_files: 1_048_576,
                max_connections: 8_448,
                nodes: vec![NodeInfo {
                    name: "gfs-a".into(),
                    session: 12,
                    state: NodeState::Expired as i32,
                    held_locks: 3,
                    expired_at_ms: 1_700_000_000_000,
                    silent_ms: 2_500,
                    ..Default::default()
                }],
                stopping: false,
                configured_nodes: vec!["gfs-a".into()],
                fence_devices: vec![],
                departed_nodes: vec![],
                log_format: 2,
            }
            .into(),
        ),
    }
}

fn unreachable(address: &str) -> ServerEntry {
    ServerEntry {
        address: address.into(),
        reachable: false,
        error: Some("transport error: Connection refused".into()),
        status: None,
    }
}

#[test]
fn table_lists_every_server_and_the_leaders_summary() {
    let view = ClusterView::new(vec![
        answered("127.0.0.1:7101", 1, "leader", 5, 1),
        answered("127.0.0.1:7102", 2, "follower", 5, 1),
        unreachable("127.0.0.1:7103"),
    ]);
    let text = render(&view);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "ID  ADDRESS         ROLE      TERM  LEADER  COMMIT  APPLIED"
    );
    assert_eq!(
        lines[1],
        "1   127.0.0.1:7101  leader    5     1       120     119"
    );
    assert_eq!(
        lines[2],
        "2   127.0.0.1:7102  follower  5     1       120     119"
    );
    assert_eq!(
        lines[3],
        "-   127.0.0.1:7103  unreachable: transport error: Connection refused"
    );
    assert!(
        text.contains("leader:           1 (127.0.0.1:7101), term 5\n"),
        "{text}"
    );
    assert!(
        text.contains("quorum:           has 3, needs 2 of 3 voters\n"),
        "{text}"
    );
    assert!(text.contains("held locks:       10\n"), "{text}");
    assert!(text.contains("last token:       118\n"), "{text}");
    assert!(
        text.contains("heartbeat 1000 ms, expiry after 2 misses (2000 ms), failover grace 2000 ms"),
        "{text}"
    );
    assert!(
        text.contains("gfs-a  EXPIRED  12       3     2.5s    2023-11-14T22:13:20Z ("),
        "{text}"
    );
    assert!(
        text.contains("health:           degraded\n  - server 127.0.0.1:7103 does not answer\n"),
        "{text}"
    );
    assert!(text.contains("cluster:          alpha (id 77)\n"), "{text}");
    assert!(
        text.contains("leader limits:    1048576 open files, 8448 connections\n"),
        "{text}"
    );
    assert_eq!(view.exit_code(), ExitCode::from(EXIT_DEGRADED));
}

/// README, Operations, step 8: during a rolling upgrade the leader's summary says
/// whether it writes entries of several commands, and which servers hold it back.
#[test]
fn the_summary_says_whether_the_leader_writes_batch_entries_and_who_holds_it_back() {
    let peer = |id: u64, log_format: u32| PeerStatus {
        id,
        addr: format!("127.0.0.1:710{id}"),
        log_format,
        ..Default::default()
    };
    let line = |leader_format: u32, peers: Vec<PeerStatus>| {
        let mut leader = answered("127.0.0.1:7101", 1, "leader", 5, 1);
        let status = leader.status.as_mut().unwrap();
        status.log_format = leader_format;
        status.peers = peers.into_iter().map(Peer::from).collect();
        let text = render(&ClusterView::new(vec![leader]));
        let found = text.lines().find(|l| l.starts_with("batch entries:"));
        found
            .unwrap_or_else(|| panic!("no batch entries line:\n{text}"))
            .to_string()
    };
    assert_eq!(
        line(2, vec![peer(1, 2), peer(2, 2), peer(3, 2)]),
        "batch entries:    on (every server reads log format 2)"
    );
    assert_eq!(
        line(2, vec![peer(1, 2), peer(2, 1), peer(3, 0)]),
        "batch entries:    off (server 2: log format 1; \
         server 3: not connected since the leader started)"
    );
    assert_eq!(
        line(0, vec![]),
        "batch entries:    off (the leader's build writes one command per entry)"
    );
}

#[test]
fn no_leader_is_reported_with_its_own_exit_code() {
    let view = ClusterView::new(vec![
        answered("127.0.0.1:7102", 2, "follower", 6, 1),
        answered("127.0.0.1:7103", 3, "candidate", 7, 0),
        unreachable("127.0.0.1:7101"),
    ]);
    assert!(view.leader.is_none());
    assert_eq!(view.exit_code(), ExitCode::from(EXIT_NO_LEADER));
    assert!(render(&view)
        .contains("no leader answered (servers report leader 1 at 127.0.0.1:7101 in term 6)"));
}

#[test]
fn nobody_answering_is_a_failure() {
    let view = ClusterView::new(vec![unreachable("a:1"), unreachable("b:1")]);
    assert_eq!(view.exit_code(), ExitCode::FAILURE);
    assert!(render(&view).ends_with("no server answered\n"));
}

#[test]
fn a_healthy_cluster_exits_0_and_a_lagging_or_stopping_server_degrades_it() {
    let healthy = || {
        vec![
            answered("a:1", 1, "leader", 5, 1),
            answered("b:1", 2, "follower", 5, 1),
            answered("c:1", 3, "follower", 5, 1),
        ]
    };
    let view = ClusterView::new(healthy());
    assert_eq!(
        (view.health, view.exit_code()),
        ("healthy", ExitCode::SUCCESS)
    );
    assert!(render(&view).contains("health:           healthy\n"));

    let mut lagging = healthy();
    if let Some(st) = lagging[0].status.as_mut() {
        (st.commit_index, st.applied_index) = (1_200, 1_200);
    }
    if let Some(st) = lagging[1].status.as_mut() {
        st.applied_index = 300;
    }
    let view = ClusterView::new(lagging);
    assert_eq!(view.exit_code(), ExitCode::from(EXIT_DEGRADED));
    assert_eq!(
        view.problems,
        ["server 3 (c:1) lags: applied 119, the leader committed 1200"]
    );

    let mut stopping = healthy();
    if let Some(st) = stopping[1].status.as_mut() {
        st.stopping = true;
    }
    let view = ClusterView::new(stopping);
    assert_eq!(view.exit_code(), ExitCode::from(EXIT_DEGRADED));
    assert_eq!(view.problems, ["server 2 (b:1) is stopping"]);

    let mut unheard = healthy();
    if let Some(st) = unheard[0].status.as_mut() {
        st.quorum_has = 2;
    }
    let view = ClusterView::new(unheard);
    assert_eq!(view.problems, ["the leader hears from 2 of 3 voters"]);

    let mut broken_device = healthy();
    if let Some(st) = broken_device[0].status.as_mut() {
        st.fence_devices = vec![FenceDevice {
            node: "gfs-a".into(),
            level: 1,
            agent: "/usr/sbin/fence_ipmilan".into(),
            ok: false,
            detail: "exit 1: Unable to connect".into(),
            checked_at_ms: 1,
        }];
    }
    let view = ClusterView::new(broken_device);
    assert_eq!(view.exit_code(), ExitCode::from(EXIT_DEGRADED));
    assert_eq!(
        view.problems,
        ["fence device of gfs-a (level 1, /usr/sbin/fence_ipmilan) fails its monitor check: exit 1: Unable to connect"]
    );
    assert!(
        render(&view).contains("gfs-a            1      /usr/sbin/fence_ipmilan  FAILING"),
        "{}",
        render(&view)
    );
}

#[test]
fn the_leader_with_the_highest_term_wins() {
    let view = ClusterView::new(vec![
        answered("a:1", 1, "leader", 4, 1),
        answered("b:1", 2, "leader", 5, 2),
    ]);
    assert_eq!(
        view.leader.as_ref().map(|l| l.address.as_str()),
        Some("b:1")
    );
}

#[test]
fn json_has_servers_and_leader() {
    let view = ClusterView::new(vec![
        answered("127.0.0.1:7101", 1, "leader", 5, 1),
        unreachable("127.0.0.1:7103"),
    ]);
    let json: serde_json::Value = serde_json::to_value(&view).unwrap();
    assert_eq!(json["servers"][0]["address"], "127.0.0.1:7101");
    assert_eq!(json["servers"][0]["reachable"], true);
    assert_eq!(json["servers"][0]["role"], "leader");
    assert_eq!(json["servers"][0]["commit_index"], 120);
    assert!(json["servers"][0].get("error").is_none());
    assert_eq!(json["servers"][1]["reachable"], false);
    assert!(json["servers"][1]["error"]
        .as_str()
        .unwrap()
        .contains("refused"));
    assert!(json["servers"][1].get("role").is_none());
    assert_eq!(json["leader"]["id"], 1);
    assert_eq!(json["leader"]["held_locks"], 10);

    let view = ClusterView::new(vec![unreachable("a:1")]);
    let json: serde_json::Value = serde_json::to_value(&view).unwrap();
    assert!(json["leader"].is_null());
}

#[tokio::test]
async fn an_unreachable_server_is_reported_not_fatal() {
    let error = query("127.0.0.1:1", Duration::from_millis(500))
        .await
        .unwrap_err();
    assert!(!error.is_empty());
}
