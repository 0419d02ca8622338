use std::path::{Path, PathBuf};

use super::*;
use crate::config::FenceAction;

/// Writes an executable `/bin/sh` agent. install(1) writes the executable from a
/// child process, so no descriptor open for writing on it can leak into an agent
/// forked concurrently by another test (which would make exec fail with ETXTBSY).
fn agent(dir: &Path, name: &str, body: &str) -> PathBuf {
    let source = dir.join(format!("{name}.txt"));
    std::fs::write(&source, format!("#!/bin/sh\n{body}\n")).expect("write agent source");
    let path = dir.join(name);
    let status = std::process::Command::new("install")
        .args(["-m", "0755"])
        .arg(&source)
        .arg(&path)
        .status()
        .expect("run install");
    assert!(status.success(), "install failed");
    path
}

fn device(
    agent: PathBuf,
    level: u32,
    timeout_ms: u64,
    params: &[(&str, &str)],
) -> FenceDeviceConfig {
    FenceDeviceConfig {
        level,
        agent,
        action: FenceAction::Reboot,
        unfence: false,
        timeout_ms,
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn pid_is_dead(pid: &str) -> bool {
    // Gone, or a zombie waiting for whoever inherited it: either way it is dead.
    match std::fs::read_to_string(format!("/proc/{pid}/status")) {
        Err(_) => true,
        Ok(status) => status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z')),
    }
}

#[test]
fn input_is_action_nodename_default_port_then_params() {
    let d = device(
        "/usr/sbin/fence_ipmilan".into(),
        1,
        1000,
        &[
            ("ipaddr", "192.0.2.9"),
            ("login", "admin"),
            ("passwd", "s3cret"),
        ],
    );
    assert_eq!(
        agent_input(&d, "gfs1"),
        "action=reboot\nnodename=gfs1\nport=gfs1\nipaddr=192.0.2.9\nlogin=admin\npasswd=s3cret\n"
    );
}

#[test]
fn configured_port_or_plug_replaces_the_default_port() {
    let mut d = device("/usr/sbin/fence_apc".into(), 1, 1000, &[("port", "3")]);
    d.action = FenceAction::Off;
    assert_eq!(
        agent_input(&d, "gfs1"),
        "action=off\nnodename=gfs1\nport=3\n"
    );
    let d = device("/usr/sbin/fence_apc".into(), 1, 1000, &[("plug", "7")]);
    assert_eq!(
        agent_input(&d, "gfs1"),
        "action=reboot\nnodename=gfs1\nplug=7\n"
    );
}

#[tokio::test]
async fn agent_gets_no_arguments_and_exactly_the_protocol_lines_on_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().display().to_string();
    let path = agent(
        dir.path(),
        "fence_dump",
        &format!("echo \"$#\" > '{out}/args'\ncat > '{out}/stdin'"),
    );
    let d = device(
        path,
        1,
        10_000,
        &[("ipaddr", "192.0.2.9"), ("passwd", "s3cret")],
    );

    let outcome = run_agent(&d, "gfs1").await;

    assert!(outcome.ok, "{outcome:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("args")).unwrap(),
        "0\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("stdin")).unwrap(),
        "action=reboot\nnodename=gfs1\nport=gfs1\nipaddr=192.0.2.9\npasswd=s3cret\n"
    );
}

#[tokio::test]
async fn exit_zero_is_success() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(
        agent(dir.path(), "fence_ok", "cat >/dev/null\nexit 0"),
        1,
        10_000,
        &[],
    );

    let outcome = run_agent(&d, "gfs1").await;

    assert!(outcome.ok);
    assert_eq!(outcome.detail, "exit 0");
}

#[tokio::test]
async fn nonzero_exit_fails_naming_the_code_and_the_last_stderr_line() {
    let dir = tempfile::tempdir().unwrap();
    let body = "echo 'connecting' >&2\necho '  Failed: Unable to obtain correct plug status  ' >&2\necho >&2\nexit 3";
    let d = device(agent(dir.path(), "fence_fail", body), 1, 10_000, &[]);

    let outcome = run_agent(&d, "gfs1").await;

    assert!(!outcome.ok);
    assert_eq!(
        outcome.detail,
        "exit 3: Failed: Unable to obtain correct plug status"
    );
}

#[tokio::test]
async fn stderr_line_in_detail_is_capped_and_hides_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(
        agent(
            dir.path(),
            "fence_leaky",
            "echo 'login admin/s3cret refused' >&2\nexit 1",
        ),
        1,
        10_000,
        &[("login", "admin"), ("passwd", "s3cret")],
    );
    let outcome = run_agent(&d, "gfs1").await;
    assert_eq!(outcome.detail, "exit 1: login admin/*** refused");

    let d = device(
        agent(dir.path(), "fence_long", "printf '%0300d\\n' 0 >&2\nexit 2"),
        1,
        10_000,
        &[],
    );
    let outcome = run_agent(&d, "gfs1").await;
    assert_eq!(outcome.detail, format!("exit 2: {}", "0".repeat(200)));
}

#[tokio::test]
async fn agent_killed_by_a_signal_fails() {
    let dir = tempfile::tempdir().unwrap();
    let d = device(
        agent(dir.path(), "fence_sig", "kill -TERM $$"),
        1,
        10_000,
        &[],
    );

    let outcome = run_agent(&d, "gfs1").await;

    assert!(!outcome.ok);
    assert_eq!(outcome.detail, "killed by signal 15");
}

#[tokio::test]
async fn hanging_agent_and_its_children_are_killed_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    let body = format!(
        "sleep 1000 &\necho $! > '{}'\nsleep 1000",
        pid_file.display()
    );
    let d = device(agent(dir.path(), "fence_hang", &body), 1, 300, &[]);

    let started = Instant::now();
    let outcome = run_agent(&d, "gfs1").await;

    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(!outcome.ok);
    assert_eq!(
        outcome.detail,
        "timed out after 300 ms; process group killed"
    );
    assert!(outcome.elapsed_ms >= 300);
    let pid = std::fs::read_to_string(&pid_file).expect("agent wrote its child's pid");
    let pid = pid.trim();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pid_is_dead(pid) {
        assert!(
            Instant::now() < deadline,
            "agent's child {pid} survived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn abandoning_a_run_kills_the_agent_group() {
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("child.pid");
    let body = format!(
        "sleep 1000 &\necho $! > '{}'\nsleep 1000",
        pid_file.display()
    );
    let d = device(agent(dir.path(), "fence_hang", &body), 1, 60_000, &[]);

    let pid = {
        let run = run_agent(&d, "gfs1");
        tokio::pin!(run);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            tokio::select! {
                outcome = &mut run => panic!("agent finished early: {outcome:?}"),
                () = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            if let Ok(pid) = std::fs::read_to_string(&pid_file) {
                if pid.ends_with('\n') {
                    break pid.trim().to_owned();
                }
            }
            assert!(Instant::now() < deadline, "agent never started its child");
        }
        // `run` is dropped here, mid-run.
    };

    let deadline = Instant::now() + Duration::from_secs(5);
    while !pid_is_dead(&pid) {
        assert!(
            Instant::now() < deadline,
            "agent's child {pid} outlived the abandoned run"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn missing_agent_cannot_start() {
    let d = device("/nonexistent/fence_x".into(), 1, 10_000, &[]);

    let outcome = run_agent(&d, "gfs1").await;

    assert!(!outcome.ok);
    assert_eq!(
        outcome.detail,
        "cannot start /nonexistent/fence_x: No such file or directory"
    );
}

#[tokio::test]
async fn line_break_in_a_value_is_refused_without_running_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let path = agent(
        dir.path(),
        "fence_marker",
        &format!("touch '{}'", marker.display()),
    );
    let d = device(path, 1, 10_000, &[("passwd", "x\naction=on")]);

    let outcome = run_agent(&d, "gfs1").await;

    assert!(!outcome.ok);
    assert!(outcome.detail.contains("line break"), "{}", outcome.detail);
    assert!(!outcome.detail.contains("action=on"));
    assert!(!marker.exists());
}

#[tokio::test]
async fn agent_flooding_stdout_and_stderr_does_not_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let body = "yes stderr | head -c 1048576 >&2\nyes stdout | head -c 1048576\necho >&2\necho done >&2\nexit 1";
    let d = device(agent(dir.path(), "fence_flood", body), 1, 30_000, &[]);

    let outcome = run_agent(&d, "gfs1").await;

    assert_eq!(outcome.detail, "exit 1: done");
}

#[test]
fn describe_hides_password_values_but_shows_the_rest() {
    let d = device(
        "/usr/sbin/fence_ipmilan".into(),
        1,
        1000,
        &[
            ("ipaddr", "192.0.2.9"),
            ("login", "admin"),
            ("passwd", "s3cret"),
            ("passwd_script", "/etc/fence/pw"),
        ],
    );
    let text = describe(&d);
    assert_eq!(
        text,
        "/usr/sbin/fence_ipmilan action=reboot ipaddr=192.0.2.9 login=admin passwd=*** passwd_script=***"
    );
    assert!(!text.contains("s3cret") && !text.contains("/etc/fence/pw"));
}

#[test]
fn levels_group_devices_in_ascending_order_keeping_config_order_within_a_level() {
    let devices = vec![
        device("/a".into(), 2, 1000, &[]),
        device("/b".into(), 1, 1000, &[]),
        device("/c".into(), 2, 1000, &[]),
        device("/d".into(), 5, 1000, &[]),
    ];
    let grouped: Vec<(u32, Vec<&Path>)> = levels(&devices)
        .into_iter()
        .map(|(level, ds)| (level, ds.iter().map(|d| d.agent.as_path()).collect()))
        .collect();
    assert_eq!(
        grouped,
        vec![
            (1, vec![Path::new("/b")]),
            (2, vec![Path::new("/a"), Path::new("/c")]),
            (5, vec![Path::new("/d")]),
        ]
    );
    assert!(levels(&[]).is_empty());
}

#[tokio::test]
async fn run_level_stops_at_the_first_failing_device() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("third_ran");
    let ok = device(agent(dir.path(), "fence_ok", "exit 0"), 1, 10_000, &[]);
    let fail = device(agent(dir.path(), "fence_fail", "exit 1"), 1, 10_000, &[]);
    let third = device(
        agent(
            dir.path(),
            "fence_third",
            &format!("touch '{}'", marker.display()),
        ),
        1,
        10_000,
        &[],
    );

    let outcomes = run_level(&[&ok, &fail, &third], "gfs1").await;

    let summary: Vec<(usize, bool)> = outcomes.iter().map(|(i, o)| (*i, o.ok)).collect();
    assert_eq!(summary, vec![(0, true), (1, false)]);
    assert!(!marker.exists(), "a device after the failed one ran");

    let outcomes = run_level(&[&ok, &third], "gfs1").await;
    assert!(outcomes.iter().all(|(_, o)| o.ok) && outcomes.len() == 2);
    assert!(marker.exists());
}
