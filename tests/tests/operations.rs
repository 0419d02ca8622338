//! Operations (BRIEF §3.4 graceful shutdown, §3.5): stopping servers cleanly.

use lockd_client::{LockOptions, LockspaceOptions, Mode};
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::{NodeState, ShutdownRequest};
use lockd_tests::Cluster;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(15);

async fn channel(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn shutdown(cluster: &Cluster, id: u64, force: bool) -> Result<u64, tonic::Status> {
    let mut c = AdminServiceClient::connect(format!("http://{}", cluster.addr(id)))
        .await
        .expect("connect");
    c.shutdown(ShutdownRequest { force })
        .await
        .map(|r| r.into_inner().new_leader_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutting_down_the_leader_hands_over_and_clients_keep_working() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let client = cluster.connect("node1").await;
    let fs = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = fs
        .lock("inode-1", Mode::Ex, LockOptions::new())
        .await
        .unwrap();

    let new_leader = shutdown(&cluster, leader, false).await.unwrap();
    assert!(
        new_leader != 0 && new_leader != leader,
        "leadership moved to {new_leader}"
    );
    assert!(
        cluster.wait_exit(leader, WAIT).await.success(),
        "a clean stop exits 0"
    );
    assert!(cluster.log(leader).contains("lock server stopped cleanly"));

    // The client never sees an error: its calls go to the new leader.
    held.unlock().await.unwrap();
    let again = fs
        .lock("inode-1", Mode::Ex, LockOptions::new())
        .await
        .unwrap();
    again.unlock().await.unwrap();
    let s = cluster
        .wait_status(WAIT, "node1 logged in under the new leader", |s| {
            s.nodes
                .iter()
                .any(|n| n.name == "node1" && n.state == NodeState::LoggedIn as i32)
        })
        .await;
    assert_eq!(s.id, new_leader);
    assert!(
        s.nodes
            .iter()
            .all(|n| n.state == NodeState::LoggedIn as i32),
        "nothing expired or fenced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_may_stop_while_a_quorum_remains_and_not_after_unless_forced() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster
        .wait_status(WAIT, "all three voters active", |s| s.quorum_has == 3)
        .await;

    // 3 running, quorum 2: stopping one leaves exactly a quorum.
    shutdown(&cluster, followers[0], false).await.unwrap();
    assert!(cluster.wait_exit(followers[0], WAIT).await.success());
    cluster
        .wait_status(WAIT, "the leader to notice", |s| s.quorum_has == 2)
        .await;

    // 2 running: stopping another would leave 1, below the quorum of 2.
    let refused = shutdown(&cluster, followers[1], false).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("2 voters are running and a quorum needs 2")
            && refused.message().contains("--force"),
        "{}",
        refused.message()
    );
    assert!(
        cluster.status(followers[1]).await.is_some(),
        "the refused server still runs"
    );

    shutdown(&cluster, followers[1], true).await.unwrap();
    assert!(cluster.wait_exit(followers[1], WAIT).await.success());
}

/// Issue 15, bug 1: a server still handing over or draining counted as running, so a
/// second shutdown right after the first was accepted and took the quorum away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_shutdown_right_after_the_first_counts_the_stopping_server_as_gone() {
    let mut cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let followers: Vec<u64> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    cluster
        .wait_status(WAIT, "all three voters active", |s| s.quorum_has == 3)
        .await;

    shutdown(&cluster, followers[0], false).await.unwrap();
    // At once, while the first still drains and the leader still counts it active.
    let refused = shutdown(&cluster, leader, false).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused
            .message()
            .contains("2 voters are running and a quorum needs 2"),
        "{}",
        refused.message()
    );
    let refused = shutdown(&cluster, followers[1], false).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(cluster.wait_exit(followers[0], WAIT).await.success());
    let s = cluster.status(leader).await.expect("the leader still runs");
    assert!(!s.stopping, "a refused shutdown leaves the server running");
    assert!(cluster.status(followers[1]).await.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_grpc_health_and_reflection_answer() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    for id in cluster.ids() {
        let mut h = HealthClient::new(channel(&cluster.addr(id)).await);
        let check = |service: &str| HealthCheckRequest {
            service: service.to_string(),
        };
        let overall = h.check(check("")).await.unwrap().into_inner().status;
        assert_eq!(overall, ServingStatus::Serving as i32, "server {id} serves");
        let want = if id == leader {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        // A follower may take a moment to learn its role after the election.
        lockd_tests::poll(WAIT, "the lock service's health", || {
            let mut h = h.clone();
            async move {
                let got = h.check(check("lockd.v1.LockService")).await.ok()?;
                (got.into_inner().status == want as i32).then_some(())
            }
        })
        .await;
    }

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(channel(&cluster.addr(leader)).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = r
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = replies
        .message()
        .await
        .unwrap()
        .expect("a reflection answer");
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reflection answer: {reply:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for wanted in [
        "lockd.v1.LockService",
        "lockd.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing from {names:?}"
        );
    }

    // v1alpha too (issue 15): grpcurl before 1.9, grpcui and Postman ask only that.
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient as AlphaClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse as AlphaResponse;
    let mut r = AlphaClient::new(channel(&cluster.addr(leader)).await);
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::ListServices(String::new())),
    };
    let reply = r
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("v1alpha reflection is served")
        .into_inner()
        .message()
        .await
        .unwrap()
        .expect("a v1alpha reflection answer");
    let Some(AlphaResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected v1alpha reflection answer: {reply:?}");
    };
    assert!(
        list.service
            .iter()
            .any(|s| s.name == "lockd.v1.AdminService"),
        "{list:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hears_ready_and_stopping_and_sigterm_stops_cleanly() {
    let mut cluster = Cluster::start(1);
    cluster.wait_leader(WAIT).await;
    cluster.kill(1);
    let socket_path = cluster.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    cluster.start_server_with_env(1, &[("NOTIFY_SOCKET", socket_path.to_str().unwrap())]);

    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("a readiness message");
    let ready = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(ready.contains("READY=1"), "{ready}");
    cluster.wait_leader(WAIT).await;

    cluster.signal(1, "TERM");
    let n = socket.recv(&mut buf).expect("a stopping message");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(
        cluster.wait_exit(1, WAIT).await.success(),
        "SIGTERM stops with exit 0"
    );
    assert!(cluster.log(1).contains("lock server stopped cleanly"));
}

/// Issue 15: with systemd's watchdog on (WatchdogSec= sets WATCHDOG_USEC and
/// WATCHDOG_PID), the Raft driver pings WATCHDOG=1 at half the interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_raft_driver_pings_the_systemd_watchdog() {
    let mut cluster = Cluster::start(1);
    cluster.wait_leader(WAIT).await;
    cluster.kill(1);
    let socket_path = cluster.dir.path().join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    // WATCHDOG_PID must be lockd's own pid, as systemd sets it: exec from a shell.
    let mut lockd = std::process::Command::new("sh")
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" \"$@\"")
        .arg(lockd_tests::server_binary())
        .args(["run", "--config"])
        .arg(cluster.dir.path().join("cluster.toml"))
        .args(["--id", "1"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let mut pings = 0;
    let started = std::time::Instant::now();
    while pings < 3 {
        let n = socket.recv(&mut buf).expect("a message from lockd");
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
        }
    }
    // Three pings at 200 ms intervals, the first at once: well under the deadline.
    assert!(started.elapsed() < WAIT);
    let _ = lockd.kill();
    let _ = lockd.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_answer_with_the_expected_series() {
    let cluster = Cluster::start(3);
    let leader = cluster.wait_leader(WAIT).await;
    let client = cluster.connect("node1").await;
    let fs = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = fs
        .lock("inode-1", Mode::Ex, LockOptions::new())
        .await
        .unwrap();
    let metrics_addr = cluster.metrics_addr(leader);
    let text = lockd_tests::poll(WAIT, "the gauges to be published", || {
        let addr = metrics_addr.clone();
        async move {
            let text = lockd_tests::scrape_metrics(&addr).await;
            text.contains("lockd_held_locks 1").then_some(text)
        }
    })
    .await;
    assert!(
        text.starts_with("HTTP/1.") && text.contains(" 200"),
        "{text}"
    );
    for series in [
        "lockd_grants_total",
        "lockd_raft_term",
        "lockd_raft_commit_index",
        "lockd_raft_apply_lag_entries",
        "lockd_is_leader 1",
        "lockd_sessions 1",
        "lockd_fsync_seconds",
        "lockd_ready_batch_entries",
        "lockd_commit_seconds",
        // Issue 15: histograms with buckets, node states, fence backlog, build info.
        "lockd_fsync_seconds_bucket{le=\"0.001\"}",
        "lockd_commit_seconds_bucket{le=\"0.01\"}",
        "lockd_ready_batch_entries_bucket{le=\"1\"}",
        "lockd_entry_commands_bucket{le=\"1\"}",
        "lockd_nodes{state=\"logged_in\"} 1",
        "lockd_nodes{state=\"fencing\"} 0",
        "lockd_fence_pending 0",
        "lockd_build_info{version=\"",
    ] {
        assert!(text.contains(series), "{series} missing:\n{text}");
    }
    // promtool's rule: every series has HELP text (and no summaries where a
    // histogram is wanted).
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let name = line.split_whitespace().nth(2).unwrap_or_default();
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP text"
        );
        assert!(
            !line.ends_with(" summary"),
            "{line}: a summary, not a histogram"
        );
    }
    held.unlock().await.unwrap();
}

/// The path of a file of the repository.
fn repo_file(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

/// Issue 15: Prometheus's own checker accepts a live server's /metrics, the shipped
/// alert rules and scrape config. Needs `promtool` (Debian's `prometheus` package),
/// so ignored by the plain test command; .ci/run installs it and runs this.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs promtool (apt-get install prometheus); run by .ci/run"]
async fn promtool_accepts_a_live_servers_metrics_and_the_shipped_rules() {
    use std::io::Write;
    let cluster = Cluster::start(1);
    cluster.wait_leader(WAIT).await;
    let client = cluster.connect("node1").await;
    let fs = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    fs.lock("inode-1", Mode::Ex, LockOptions::new())
        .await
        .unwrap()
        .unlock()
        .await
        .unwrap();
    let metrics_addr = cluster.config.servers[0].metrics_addr.clone().unwrap();
    let response = lockd_tests::poll(WAIT, "every histogram to have a sample", || {
        let addr = metrics_addr.clone();
        async move {
            let text = lockd_tests::scrape_metrics(&addr).await;
            text.contains("lockd_commit_seconds_bucket").then_some(text)
        }
    })
    .await;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .expect("an HTTP body");
    let mut check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (apt-get install prometheus)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (what, file) in [
        ("rules", "deploy/prometheus/lockd-rules.yml"),
        ("config", "deploy/prometheus/prometheus.yml"),
    ] {
        let out = std::process::Command::new("promtool")
            .args(["check", what])
            .arg(repo_file(file))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check {what} {file}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dashboard = std::fs::read(repo_file("deploy/prometheus/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_slice(&dashboard).expect("valid JSON");
    assert!(dashboard["panels"]
        .as_array()
        .is_some_and(|p| !p.is_empty()));
}

/// Issue 15, bug 2: SIGHUP ended lockd silently (systemd counts that as a clean stop).
/// Now it rereads the config's `[log] filter`, says what it did, and keeps serving; a
/// broken file is reported and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_log_filter_and_never_stops_the_server() {
    let cluster = Cluster::start(1);
    cluster.wait_leader(WAIT).await;
    let config_path = cluster.dir.path().join("cluster.toml");
    let good = std::fs::read_to_string(&config_path).unwrap();

    std::fs::write(&config_path, format!("{good}\n[log]\nfilter = \"debug\"\n")).unwrap();
    cluster.signal(1, "HUP");
    lockd_tests::poll(WAIT, "the reload's log line", || {
        let log = cluster.log(1);
        async move {
            log.contains("SIGHUP: reloaded the log filter")
                .then_some(())
        }
    })
    .await;
    assert!(
        cluster.log(1).contains("filter=debug"),
        "{}",
        cluster.log(1)
    );
    assert!(cluster.status(1).await.is_some(), "still serving");

    std::fs::write(&config_path, format!("{good}\n[log]\nfilter = \"[[[\"\n")).unwrap();
    cluster.signal(1, "HUP");
    lockd_tests::poll(WAIT, "the refusal's log line", || {
        let log = cluster.log(1);
        async move { log.contains("SIGHUP: not reloaded").then_some(()) }
    })
    .await;
    assert!(
        cluster.log(1).contains("`log.filter`"),
        "{}",
        cluster.log(1)
    );
    assert!(cluster.status(1).await.is_some(), "still serving");
}

/// Issue 15, bug 3: `lockd dev` ended on SIGTERM without stopping its servers (they
/// kept serving with PPID 1) and left its data directory behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lockd_dev_stops_its_servers_and_removes_its_directory_on_sigterm() {
    use std::io::BufRead;
    // Ports base+1..base+3 and base+11..base+13; a range of its own per run.
    let base = 20_000 + (std::process::id() % 2_000) as u16 * 20;
    let mut dev = std::process::Command::new(lockd_tests::server_binary())
        .args(["dev", "--base-port", &base.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn lockd dev");
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let stdout = dev.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut data_dir = None;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines_rx.recv_timeout(left).expect("lockd dev's banner");
        if let Some(d) = line.trim().strip_prefix("data") {
            data_dir = Some(std::path::PathBuf::from(d.trim()));
        }
        if line.contains("stops all servers") {
            break;
        }
    }
    let data_dir = data_dir.expect("the banner names the data directory");
    let servers = children_of(dev.id());
    assert_eq!(servers.len(), 3, "three server processes: {servers:?}");

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &dev.id().to_string()])
        .status();
    let status = lockd_tests::poll(WAIT, "lockd dev to exit", || {
        let s = dev.try_wait().ok().flatten();
        async move { s }
    })
    .await;
    assert!(status.success(), "lockd dev exits 0 on SIGTERM: {status:?}");
    for pid in servers {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "server {pid} still runs after lockd dev stopped"
        );
    }
    assert!(!data_dir.exists(), "{} was removed", data_dir.display());
}

/// The pids of a process's children (Linux /proc).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
