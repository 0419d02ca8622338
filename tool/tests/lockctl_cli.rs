//! `lockctl` run as a process against scripted in-process servers: exit codes, output,
//! the command's environment, and the unlock + logout that must follow every path.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lockd_proto::v1::admin_service_server::{AdminService, AdminServiceServer};
use lockd_proto::v1::lock_service_server::{LockService, LockServiceServer};
use lockd_proto::v1::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Request, Response, Status};

#[derive(Default)]
struct Script {
    /// Lock answers with this (ABORTED "would block", ...) instead of granting.
    lock_error: Option<Status>,
    /// Calls received, in order: "login", "open_lockspace", "lock", "unlock 1", ...
    calls: Vec<String>,
    role: String,
    /// SaveSnapshot answers with this instead of a snapshot.
    snapshot_error: Option<Status>,
}

#[derive(Clone, Default)]
struct Scripted(Arc<Mutex<Script>>);

impl Scripted {
    fn note(&self, call: impl Into<String>) {
        self.0.lock().unwrap().calls.push(call.into());
    }

    fn calls(&self) -> Vec<String> {
        self.0.lock().unwrap().calls.clone()
    }

    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(LockServiceServer::new(self.clone()))
                .add_service(AdminServiceServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        addr
    }
}

#[tonic::async_trait]
impl LockService for Scripted {
    type EventsStream = tokio_stream::wrappers::ReceiverStream<Result<Event, Status>>;
    type PipelineStream = tokio_stream::wrappers::ReceiverStream<Result<PipelineReply, Status>>;

    async fn pipeline(
        &self,
        r: Request<tonic::Streaming<PipelineRequest>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        Ok(Response::new(lockd_proto::pipeline_via_unary(
            self.clone(),
            r.into_inner(),
        )))
    }

    async fn heartbeat(
        &self,
        _: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatReply>, Status> {
        Err(Status::unimplemented(
            "this scripted server announces no heartbeats",
        ))
    }
    async fn recovery_done(
        &self,
        _: Request<RecoveryDoneRequest>,
    ) -> Result<Response<RecoveryDoneReply>, Status> {
        Err(Status::unimplemented(
            "this scripted server has no recovery",
        ))
    }
    async fn events(
        &self,
        _: Request<EventsRequest>,
    ) -> Result<Response<Self::EventsStream>, Status> {
        Err(Status::unimplemented(
            "this scripted server has no event stream",
        ))
    }

    async fn login(&self, r: Request<LoginRequest>) -> Result<Response<LoginReply>, Status> {
        self.note(format!("login {}", r.get_ref().node));
        // No heartbeat interval: the client starts no keeper, so the script sees
        // only the calls the test makes.
        Ok(Response::new(LoginReply {
            session: 3,
            ..Default::default()
        }))
    }
    async fn logout(&self, _: Request<LogoutRequest>) -> Result<Response<LogoutReply>, Status> {
        self.note("logout");
        Ok(Response::new(LogoutReply {}))
    }
    async fn open_lockspace(
        &self,
        r: Request<OpenLockspaceRequest>,
    ) -> Result<Response<OpenLockspaceReply>, Status> {
        self.note(format!("open_lockspace {}", r.get_ref().lockspace));
        Ok(Response::new(OpenLockspaceReply {
            lvb_len_bytes: 32,
            recovery: RecoveryMode::Auto as i32,
        }))
    }
    async fn lock(&self, r: Request<LockRequest>) -> Result<Response<Grant>, Status> {
        let r = r.into_inner();
        let flags = r.flags.unwrap_or_default();
        self.note(format!(
            "lock {} mode={} try={}",
            String::from_utf8_lossy(&r.resource),
            r.mode,
            flags.r#try
        ));
        if let Some(status) = self.0.lock().unwrap().lock_error.clone() {
            return Err(status);
        }
        Ok(Response::new(Grant {
            lock_id: 11,
            mode: r.mode,
            token: 4242,
            lvb: vec![],
            lvb_invalid: false,
        }))
    }
    async fn convert(&self, _: Request<ConvertRequest>) -> Result<Response<Grant>, Status> {
        Err(Status::unimplemented("convert"))
    }
    async fn unlock(&self, r: Request<UnlockRequest>) -> Result<Response<UnlockReply>, Status> {
        self.note(format!("unlock {}", r.get_ref().lock_id));
        Ok(Response::new(UnlockReply {}))
    }
    async fn cancel(&self, r: Request<CancelRequest>) -> Result<Response<CancelReply>, Status> {
        self.note(format!("cancel {}", r.get_ref().target_request_id));
        Ok(Response::new(CancelReply { cancelled: true }))
    }
    async fn check_token(
        &self,
        r: Request<CheckTokenRequest>,
    ) -> Result<Response<CheckTokenReply>, Status> {
        let token = r.get_ref().token;
        Ok(Response::new(CheckTokenReply {
            current: token == 4242,
            latest: 4242,
        }))
    }
}

#[tonic::async_trait]
impl AdminService for Scripted {
    async fn locks(&self, _: Request<LocksRequest>) -> Result<Response<LocksReply>, Status> {
        Ok(Response::new(LocksReply::default()))
    }
    async fn set_log_level(
        &self,
        r: Request<SetLogLevelRequest>,
    ) -> Result<Response<SetLogLevelReply>, Status> {
        self.note(format!("log-level {}", r.get_ref().filter));
        Ok(Response::new(SetLogLevelReply {}))
    }
    async fn shutdown(
        &self,
        r: Request<ShutdownRequest>,
    ) -> Result<Response<ShutdownReply>, Status> {
        self.note(format!("shutdown force={}", r.get_ref().force));
        Ok(Response::new(ShutdownReply { new_leader_id: 2 }))
    }
    async fn force_expire(
        &self,
        r: Request<ForceExpireRequest>,
    ) -> Result<Response<ForceExpireReply>, Status> {
        self.note(format!("forceexpire {}", r.get_ref().node));
        Ok(Response::new(ForceExpireReply {}))
    }
    async fn fence_ack(
        &self,
        r: Request<FenceAckRequest>,
    ) -> Result<Response<FenceAckReply>, Status> {
        self.note(format!(
            "fence ack {} by {}",
            r.get_ref().node,
            r.get_ref().by
        ));
        Ok(Response::new(FenceAckReply {}))
    }
    async fn add_server(
        &self,
        r: Request<AddServerRequest>,
    ) -> Result<Response<AddServerReply>, Status> {
        let r = r.into_inner();
        self.note(format!(
            "server add {} {} within {} ms",
            r.id, r.addr, r.catch_up_timeout_ms
        ));
        Ok(Response::new(AddServerReply::default()))
    }
    async fn remove_server(
        &self,
        r: Request<RemoveServerRequest>,
    ) -> Result<Response<RemoveServerReply>, Status> {
        self.note(format!("server remove {}", r.get_ref().id));
        Ok(Response::new(RemoveServerReply::default()))
    }
    async fn save_snapshot(
        &self,
        _: Request<SaveSnapshotRequest>,
    ) -> Result<Response<SaveSnapshotReply>, Status> {
        self.note("snapshot save");
        if let Some(e) = self.0.lock().unwrap().snapshot_error.clone() {
            return Err(e);
        }
        Ok(Response::new(SaveSnapshotReply {
            file: snapshot_bytes(),
            index: 40,
            term: 3,
            last_token: 77,
        }))
    }
    async fn fence_history(
        &self,
        _: Request<FenceHistoryRequest>,
    ) -> Result<Response<FenceHistoryReply>, Status> {
        Ok(Response::new(FenceHistoryReply { entries: vec![] }))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let role = self.0.lock().unwrap().role.clone();
        Ok(Response::new(StatusReply {
            id: 1,
            addr: "127.0.0.1:7101".into(),
            role: role.clone(),
            term: 9,
            leader_id: if role == "leader" { 1 } else { 0 },
            commit_index: 50,
            applied_index: 50,
            voters: 1,
            quorum_needs: 1,
            quorum_has: 1,
            held_locks: 12,
            last_token: 49,
            ..StatusReply::default()
        }))
    }
}

fn lockctl(servers: &str) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_lockctl"));
    cmd.env_remove("LOCKD_NODE")
        .env_remove("LOCKD_CLUSTER_ID")
        .env("LOCKD_SERVERS", servers)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn run(mut cmd: tokio::process::Command) -> Run {
    let out = tokio::time::timeout(Duration::from_secs(20), cmd.output())
        .await
        .expect("lockctl did not finish")
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[tokio::test]
async fn lock_runs_the_command_with_the_token_then_unlocks_and_logs_out() {
    let server = Scripted::default();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args([
        "lock", "fs1", "inode-7", "--node", "n1", "--mode", "pr", "--",
    ])
    .args([
        "sh",
        "-c",
        "echo \"in=$LOCKD_TOKEN/$LOCKD_LOCK_ID/$LOCKD_RESOURCE\"; exit 7",
    ]);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(7), "{}", out.stderr);
    assert_eq!(
        out.stdout,
        "token=4242 lock_id=11 mode=PR\nin=4242/11/inode-7\n"
    );
    assert_eq!(
        server.calls(),
        [
            "login n1",
            "open_lockspace fs1",
            "lock inode-7 mode=4 try=false",
            "unlock 11",
            "logout"
        ]
    );
}

#[tokio::test]
async fn lock_prints_json_when_asked() {
    let server = Scripted::default();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args(["--json", "lock", "fs1", "r", "--node", "n1", "--", "true"]);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(json["token"], 4242);
    assert_eq!(json["lock_id"], 11);
    assert_eq!(json["mode"], "EX");
    assert_eq!(json["lockspace"], "fs1");
}

#[tokio::test]
async fn refused_try_lock_exits_75_and_still_logs_out() {
    let server = Scripted::default();
    server.0.lock().unwrap().lock_error = Some(Status::aborted("would block"));
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args(["lock", "fs1", "r", "--node", "n1", "--try", "--", "true"]);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(75), "would block has its own status");
    assert_eq!(out.stdout, "");
    assert!(
        out.stderr.contains("cannot lock fs1/r in EX: would block"),
        "{}",
        out.stderr
    );
    let calls = server.calls();
    assert_eq!(calls[2], "lock r mode=6 try=true");
    assert_eq!(calls.last().map(String::as_str), Some("logout"));
}

#[tokio::test]
async fn missing_command_is_127_after_unlock_and_logout() {
    let server = Scripted::default();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args([
        "lock",
        "fs1",
        "r",
        "--node",
        "n1",
        "--",
        "/nonexistent/lockd-test",
    ]);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(127), "{}", out.stderr);
    let calls = server.calls();
    assert_eq!(&calls[calls.len() - 2..], ["unlock 11", "logout"]);
}

#[tokio::test]
async fn lock_without_command_holds_until_sigterm() {
    let server = Scripted::default();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args(["lock", "fs1", "r", "--node", "n1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .expect("no grant line")
        .unwrap();
    assert_eq!(line.as_deref(), Some("token=4242 lock_id=11 mode=EX"));
    assert!(
        !server.calls().contains(&"unlock 11".to_string()),
        "still held"
    );

    let pid = child.id().unwrap().to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("lockctl did not exit after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let calls = server.calls();
    assert_eq!(&calls[calls.len() - 2..], ["unlock 11", "logout"]);
}

#[tokio::test]
async fn check_token_exit_code_says_whether_it_is_current() {
    let server = Scripted::default();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args(["check-token", "fs1", "r", "4242"]);
    let out = run(cmd).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "current=true latest=4242\n")
    );
    let mut cmd = lockctl(&addr);
    cmd.args(["check-token", "fs1", "r", "17"]);
    let out = run(cmd).await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(3), "current=false latest=4242\n")
    );
    assert!(server.calls().is_empty(), "check-token does not log in");
}

#[tokio::test]
async fn status_shows_the_leader_and_the_unreachable() {
    let server = Scripted::default();
    server.0.lock().unwrap().role = "leader".into();
    let addr = server.start().await;
    let mut cmd = lockctl(&format!("{addr},127.0.0.1:1"));
    cmd.arg("status");
    let start = Instant::now();
    let out = run(cmd).await;
    assert!(start.elapsed() < Duration::from_secs(5));
    // A listed server down: degraded (issue 15: it used to exit 0).
    assert_eq!(out.code, Some(4), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("health:           degraded\n  - server 127.0.0.1:1 does not answer"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout.contains(&format!("1   {addr}  leader")),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("127.0.0.1:1"), "{}", out.stdout);
    assert!(out.stdout.contains("unreachable: "), "{}", out.stdout);
    assert!(
        out.stdout.contains("held locks:       12"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn status_without_a_leader_exits_3() {
    let server = Scripted::default();
    server.0.lock().unwrap().role = "candidate".into();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    cmd.args(["status", "--json"]);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(3), "{}", out.stderr);
    let json: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(json["leader"].is_null());
    assert_eq!(json["servers"][0]["role"], "candidate");
}

#[test]
fn completions_print_a_script_naming_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockctl"))
            .args(["completions", shell])
            // Completions need no server and no TLS files, even if these are set.
            .env("LOCKD_CA", "/nonexistent/ca.pem")
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}: {out:?}");
        let script = String::from_utf8(out.stdout).unwrap();
        for sub in [
            "status",
            "forceexpire",
            "shutdown",
            "log-level",
            "fence",
            "completions",
        ] {
            assert!(script.contains(sub), "{shell} script lacks `{sub}`");
        }
        // The global flags too (fish writes them as `-l servers`).
        assert!(
            script.contains("servers") && script.contains("cert"),
            "{shell}"
        );
    }
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_lockctl"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
}

#[test]
fn tls_flags_with_bad_files_fail_with_the_file_named() {
    let dir = tempfile_dir();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockctl"))
        .args(["--servers", "127.0.0.1:1", "--ca"])
        .arg(&ca)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ca.pem") && err.contains("no PEM CERTIFICATE"),
        "{err}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lockctl"))
        .args([
            "--servers",
            "127.0.0.1:1",
            "--cert",
            "/x.pem",
            "--key",
            "/x.key",
            "status",
        ])
        .env_remove("LOCKD_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("need --ca"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A fresh directory under the system temp dir, unique to this process.
fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("lockctl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_interrupt_is_passed_on_to_the_commands_process_group() {
    let server = Scripted::default();
    let addr = server.start().await;
    let mut cmd = lockctl(&addr);
    // The command runs in a group of its own, so only lockctl can pass a signal on; the
    // shell reports which one reached it, and exits 9.
    cmd.args(["lock", "fs1", "r", "--node", "n1", "--", "sh", "-c"])
        .arg("trap 'echo got-HUP; exit 9' HUP; echo started; while :; do sleep 0.1; done")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let started = async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line == "started" {
                return;
            }
        }
        panic!("the command never started");
    };
    tokio::time::timeout(Duration::from_secs(10), started)
        .await
        .expect("no `started` line");

    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .await
        .unwrap();
    assert!(sent.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("lockctl did not exit once the command did")
        .unwrap();
    assert_eq!(status.code(), Some(9), "the command's own status");
    let rest = tokio::time::timeout(Duration::from_secs(10), stdout.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest.as_deref(), Some("got-HUP"));
    let calls = server.calls();
    assert_eq!(&calls[calls.len() - 2..], ["unlock 11", "logout"]);
}

/// Over tonic's default 4 MiB message limit, so the test shows lockctl raised it.
fn snapshot_bytes() -> Vec<u8> {
    (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect()
}

#[tokio::test]
async fn snapshot_save_writes_the_leaders_snapshot_whole() {
    let server = Scripted::default();
    let addr = server.start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    let mut cmd = lockctl(&addr);
    cmd.args(["snapshot", "save"]).arg(&file);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    assert!(
        out.stdout
            .contains("Raft index 40 term 3, last fencing token 77"),
        "{}",
        out.stdout
    );
    assert!(std::fs::read(&file).unwrap() == snapshot_bytes());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
}

#[tokio::test]
async fn a_refused_snapshot_save_leaves_the_file_as_it_was() {
    let server = Scripted::default();
    server.0.lock().unwrap().snapshot_error = Some(Status::permission_denied("admin only"));
    let addr = server.start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("backup.snap");
    std::fs::write(&file, b"yesterday's backup").unwrap();
    let mut cmd = lockctl(&addr);
    cmd.args(["snapshot", "save"]).arg(&file);
    let out = run(cmd).await;
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("admin only"), "{}", out.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), b"yesterday's backup");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}
