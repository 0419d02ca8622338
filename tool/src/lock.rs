//! `lockctl lock` (hold a lock while a command runs, or until interrupted) and
//! `lockctl check-token`. Both go through `lockd-client`, like any node would.
//!
//! `lock` owns three promises to scripts (issue 13): a command never outlives its lock
//! unknowingly (at `Lost` its process group is signalled, before any server could give
//! the lock away); waiting means waiting (no timeout = through any outage); and every
//! way of ending has its own exit status, listed in `--help` and the README.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use lockd_client::{
    Client, ClientConfig, Error, LockGuard, LockOptions, Lockspace, LockspaceOptions, Resource,
    SessionHealth, TokenChecker,
};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;

use crate::cli::{CheckTokenArgs, LockArgs, LostSignal};

/// `lock`'s own exit statuses (the command's status passes through otherwise).
pub mod exit {
    /// Any other error.
    pub const ERROR: u8 = 1;
    /// No leader with quorum answered in time (sysexits' EX_UNAVAILABLE).
    pub const NO_QUORUM: u8 = 69;
    /// `--try` and the lock is held elsewhere (sysexits' EX_TEMPFAIL: try again later).
    pub const WOULD_BLOCK: u8 = 75;
    /// `--timeout-ms` passed while the request waited in the queue (as timeout(1)).
    pub const TIMED_OUT: u8 = 124;
    /// The session was lost or expired: the lock is gone.
    pub const LOCK_LOST: u8 = 125;
    /// The command could not be started / was not found (as a shell reports it).
    pub const CANNOT_RUN: u8 = 126;
    pub const NOT_FOUND: u8 = 127;
    /// Interrupted before the grant (128 + SIGINT, as a shell reports it).
    pub const INTERRUPTED: u8 = 130;
}

/// Exit status of `check-token` for a token that is no longer current.
const EXIT_STALE_TOKEN: u8 = 3;
/// While the login or the lockspace still waits for a leader, say so this often.
const STILL_WAITING_EVERY: Duration = Duration::from_secs(10);

/// SIGINT (Ctrl-C), SIGTERM and SIGHUP, as one stream. SIGHUP too because the command
/// runs in a process group of its own, which a hung-up terminal does not reach: lockctl
/// passes it on.
struct Interrupts {
    int: Signal,
    term: Signal,
    hup: Signal,
}

impl Interrupts {
    fn new() -> anyhow::Result<Interrupts> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// The next interrupt: its name and the signal itself (to pass on to the command).
    async fn next(&mut self) -> (&'static str, rustix::process::Signal) {
        tokio::select! {
            _ = self.int.recv() => ("SIGINT", rustix::process::Signal::INT),
            _ = self.term.recv() => ("SIGTERM", rustix::process::Signal::TERM),
            _ = self.hup.recv() => ("SIGHUP", rustix::process::Signal::HUP),
        }
    }
}

/// What the lock is, for messages: `fs1/inode-7 (EX)`.
struct Target<'a> {
    args: &'a LockArgs,
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} in {}",
            self.args.lockspace, self.args.resource, self.args.mode
        )
    }
}

pub async fn run(servers: &[String], args: LockArgs, json: bool) -> anyhow::Result<ExitCode> {
    // Installed before logging in: from here on an interrupt must not kill lockctl
    // without a logout, or its node would be expired and fenced.
    let mut interrupts = Interrupts::new()?;
    let deadline =
        (args.timeout_ms > 0).then(|| Instant::now() + Duration::from_millis(args.timeout_ms));
    // Without a timeout and without --try, lockctl waits for a leader however long it
    // takes; --try asks for a quick answer, so the login keeps its 3 s limit then.
    let patient = deadline.is_none() && !args.try_lock;
    let cfg = ClientConfig {
        cluster_id: args.cluster_id,
        tls: crate::tls::options(),
        wait_for_login: patient,
        ..ClientConfig::new(servers.iter().cloned(), args.node.clone())
    };
    let client = match login(cfg, &args, deadline, &mut interrupts).await {
        Ok(client) => client,
        Err(code) => return Ok(ExitCode::from(code)),
    };
    let code = lock_and_run(&client, &args, json, deadline, patient, &mut interrupts).await;
    let session = client.session();
    if *client.health().borrow() == SessionHealth::Expired {
        // Nothing to log out: the servers ended the session (and said why above).
        return Ok(ExitCode::from(code));
    }
    match client.logout().await {
        Ok(()) => {}
        Err(err) => eprintln!(
            "lockctl: could not log out node {} (session {session}): {err}; the session \
             stays until the servers expire it, and the node is then fenced",
            args.node
        ),
    }
    Ok(ExitCode::from(code))
}

/// Logs in; on failure prints why and returns the exit status.
async fn login(
    cfg: ClientConfig,
    args: &LockArgs,
    deadline: Option<Instant>,
    interrupts: &mut Interrupts,
) -> Result<Client, u8> {
    let node = args.node.clone();
    let connect = Client::connect(cfg);
    tokio::pin!(connect);
    let started = Instant::now();
    let give_up = sleep_until(deadline);
    tokio::pin!(give_up);
    let mut said_waiting = false;
    loop {
        tokio::select! {
            logged_in = &mut connect => {
                return logged_in.map_err(|err| {
                    let code = status_of(&err, SessionHealth::Healthy);
                    let duplicate = match &err {
                        Error::AlreadyExists(_) => true,
                        Error::FailedPrecondition(m) => m.contains("already logged in"),
                        _ => false,
                    };
                    let hint = if duplicate {
                        " (one session per node name: give each concurrent lockctl its own \
                         node name, see the README)"
                    } else {
                        ""
                    };
                    eprintln!("lockctl: cannot log in as node {node:?}: {err}{hint}");
                    code
                });
            }
            () = &mut give_up => {
                eprintln!(
                    "lockctl: cannot log in as node {node:?}: no quorum: no lock server \
                     leader answered within --timeout-ms {} (if a login was applied \
                     unanswered, that session expires and the node is fenced)",
                    args.timeout_ms
                );
                return Err(exit::NO_QUORUM);
            }
            (name, _) = interrupts.next() => {
                eprintln!(
                    "lockctl: {name} while logging in as node {node:?}; giving up (if a \
                     login was applied unanswered, that session expires and the node is fenced)"
                );
                return Err(exit::INTERRUPTED);
            }
            () = tokio::time::sleep(STILL_WAITING_EVERY), if !said_waiting => {
                said_waiting = true;
                eprintln!(
                    "lockctl: no lock server leader with quorum has answered for {} s; \
                     still trying to log in as node {node:?} (Ctrl-C to give up)",
                    started.elapsed().as_secs()
                );
            }
        }
    }
}

/// Sleeps until `deadline`, forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// The exit status for a failed call, given the session's health at that moment.
fn status_of(err: &Error, health: SessionHealth) -> u8 {
    match err {
        Error::WouldBlock(_) => exit::WOULD_BLOCK,
        Error::Timeout(_) => exit::TIMED_OUT,
        Error::NoQuorum { .. } => exit::NO_QUORUM,
        _ if health == SessionHealth::Expired => exit::LOCK_LOST,
        // The servers' answer to a request of an expired session may overtake the
        // keeper's news of the expiry.
        Error::FailedPrecondition(m) if m.contains("expired") => exit::LOCK_LOST,
        _ => exit::ERROR,
    }
}

/// Opens the lockspace; while patient, retries through a loss of quorum (opening is
/// idempotent). On failure prints why and returns the exit status.
async fn open(
    client: &Client,
    args: &LockArgs,
    deadline: Option<Instant>,
    patient: bool,
    interrupts: &mut Interrupts,
) -> Result<Lockspace, u8> {
    let started = Instant::now();
    let mut said_waiting = false;
    loop {
        let opening = client.open_lockspace(&args.lockspace, LockspaceOptions::default());
        let outcome = tokio::select! {
            outcome = opening => outcome,
            () = sleep_until(deadline) => Err(Error::NoQuorum {
                waited: started.elapsed(),
                last: "--timeout-ms passed while opening the lockspace".into(),
            }),
            (name, _) = interrupts.next() => {
                eprintln!("lockctl: {name} while opening lockspace {:?}; giving up", args.lockspace);
                return Err(exit::INTERRUPTED);
            }
        };
        match outcome {
            Ok(lockspace) => return Ok(lockspace),
            Err(err) if patient && err.is_no_quorum() => {
                if !said_waiting {
                    said_waiting = true;
                    eprintln!(
                        "lockctl: {err}; still trying to open lockspace {:?} (Ctrl-C to give up)",
                        args.lockspace
                    );
                }
            }
            Err(err) => {
                let health = *client.health().borrow();
                eprintln!("lockctl: cannot open lockspace {:?}: {err}", args.lockspace);
                return Err(status_of(&err, health));
            }
        }
    }
}

/// Everything between login and logout; returns the exit status.
async fn lock_and_run(
    client: &Client,
    args: &LockArgs,
    json: bool,
    deadline: Option<Instant>,
    patient: bool,
    interrupts: &mut Interrupts,
) -> u8 {
    let lockspace = match open(client, args, deadline, patient, interrupts).await {
        Ok(lockspace) => lockspace,
        Err(code) => return code,
    };
    let what = Target { args };
    let mut opts = LockOptions::new();
    opts.flags.try_lock = args.try_lock;
    if let Some(d) = deadline {
        opts.timeout = Some(
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        );
    }
    let mut health = client.health();
    let pending = lockspace.request(Resource::from(args.resource.as_str()), args.mode, opts);
    tokio::pin!(pending);
    let mut said_lost = false;
    let mut health_open = true;
    let guard = loop {
        tokio::select! {
            granted = &mut pending => match granted {
                Ok(guard) => break guard,
                Err(err) => {
                    let code = status_of(&err, *health.borrow());
                    eprintln!("lockctl: cannot lock {what}: {err}");
                    return code;
                }
            },
            (name, _) = interrupts.next() => {
                // Dropping the request cancels it; the logout that follows releases
                // anything granted meanwhile.
                eprintln!("lockctl: {name} while waiting for {what}; giving up");
                return exit::INTERRUPTED;
            }
            changed = health.changed(), if health_open => {
                health_open = changed.is_ok();
                match *health.borrow_and_update() {
                    SessionHealth::Expired => {
                        eprintln!(
                            "lockctl: the servers expired node {}'s session while it waited for {what}",
                            args.node
                        );
                        return exit::LOCK_LOST;
                    }
                    SessionHealth::Lost if !said_lost => {
                        said_lost = true;
                        eprintln!(
                            "lockctl: no lock server leader with quorum answers; still waiting \
                             for {what}, heartbeats go on"
                        );
                    }
                    _ => {}
                }
            }
        }
    };
    print_grant(args, &guard, json);
    // A grant that arrives while the health still says Lost (an outage just ended):
    // wait for a heartbeat to confirm the session before anything runs under it.
    if let Err(code) = confirmed(&mut health, &what, &guard, interrupts).await {
        return code;
    }

    let code = if args.command.is_empty() {
        tokio::select! {
            (name, _) = interrupts.next() => {
                eprintln!("lockctl: {name}; releasing {what}");
                0
            }
            lost = until_lost(&mut health) => {
                report_lost(args, &guard, lost, None);
                exit::LOCK_LOST
            }
        }
    } else {
        run_command(&args.command, args, &guard, &mut health, interrupts).await
    };
    if code != exit::LOCK_LOST {
        if let Err(err) = guard.unlock().await {
            eprintln!("lockctl: warning: unlock failed ({err}); logging out releases the lock");
        }
    }
    // A lost lock is not unlocked: the logout that follows releases it if the servers
    // still know the session.
    code
}

/// Waits while the health is `Lost`; `Err(status)` if it turns `Expired` or lockctl is
/// interrupted first.
async fn confirmed(
    health: &mut watch::Receiver<SessionHealth>,
    what: &Target<'_>,
    guard: &LockGuard,
    interrupts: &mut Interrupts,
) -> Result<(), u8> {
    loop {
        match *health.borrow_and_update() {
            SessionHealth::Healthy | SessionHealth::Jeopardy => return Ok(()),
            SessionHealth::Expired => {
                report_lost(what.args, guard, SessionHealth::Expired, None);
                return Err(exit::LOCK_LOST);
            }
            SessionHealth::Lost => {}
        }
        tokio::select! {
            changed = health.changed() => {
                if changed.is_err() {
                    // The keeper ended while the health said Lost: only `Expired` ends it.
                    report_lost(what.args, guard, SessionHealth::Expired, None);
                    return Err(exit::LOCK_LOST);
                }
            }
            (name, _) = interrupts.next() => {
                eprintln!("lockctl: {name}; releasing {what}");
                return Err(exit::INTERRUPTED);
            }
        }
    }
}

/// Returns once the session's health is `Lost` or `Expired` (which it returns).
async fn until_lost(health: &mut watch::Receiver<SessionHealth>) -> SessionHealth {
    loop {
        let now = *health.borrow_and_update();
        if matches!(now, SessionHealth::Lost | SessionHealth::Expired) {
            return now;
        }
        if health.changed().await.is_err() {
            // The keeper has ended. It ends after `Expired` (caught above) or, for a
            // server that announced no heartbeats, never started: nothing to watch.
            return std::future::pending().await;
        }
    }
}

/// The one line a lost lock gets on stderr.
fn report_lost(args: &LockArgs, guard: &LockGuard, why: SessionHealth, signalled: Option<&str>) {
    let cause = match why {
        SessionHealth::Expired => format!("the servers expired node {}'s session", args.node),
        _ => "no quorum-confirmed heartbeat within the expiry window (the servers may expire \
              the node from now on)"
            .to_string(),
    };
    let action = signalled.map(|s| format!("; {s}")).unwrap_or_default();
    say(&format!(
        "lockctl: LOCK LOST: {}/{} ({}, token {}, lock id {}): {cause}{action}",
        args.lockspace,
        args.resource,
        guard.mode(),
        guard.token(),
        guard.lock_id()
    ));
}

/// Writes `line` to stderr in one write, so that the command (which shares lockctl's
/// stderr) cannot split it: `eprintln!` may write it in pieces.
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn print_grant(args: &LockArgs, guard: &LockGuard, json: bool) {
    if json {
        let line = serde_json::json!({
            "lockspace": args.lockspace,
            "resource": args.resource,
            "token": guard.token(),
            "lock_id": guard.lock_id(),
            "mode": guard.mode().to_string(),
        });
        println!("{line}");
    } else {
        println!(
            "token={} lock_id={} mode={}",
            guard.token(),
            guard.lock_id(),
            guard.mode()
        );
    }
}

/// Sends `signal` to process group `pgid`; says so on stderr if it fails.
fn signal_group(pgid: u32, signal: rustix::process::Signal, name: &str) {
    let Some(pid) = i32::try_from(pgid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        eprintln!("lockctl: cannot signal process group {pgid}: not a process id");
        return;
    };
    if let Err(err) = rustix::process::kill_process_group(pid, signal) {
        // ESRCH: the whole group is gone already, which is what was wanted.
        if err != rustix::io::Errno::SRCH {
            eprintln!("lockctl: cannot send {name} to process group {pgid}: {err}");
        }
    }
}

/// Runs the command in its own process group with the grant in its environment, and
/// returns its exit status, or [`exit::LOCK_LOST`] after signalling it at `Lost`.
async fn run_command(
    command: &[String],
    args: &LockArgs,
    guard: &LockGuard,
    health: &mut watch::Receiver<SessionHealth>,
    interrupts: &mut Interrupts,
) -> u8 {
    let Some((program, rest)) = command.split_first() else {
        return 0;
    };
    let spawned = tokio::process::Command::new(program)
        .args(rest)
        .env("LOCKD_TOKEN", guard.token().to_string())
        .env("LOCKD_LOCK_ID", guard.lock_id().to_string())
        .env("LOCKD_LOCKSPACE", &args.lockspace)
        .env("LOCKD_RESOURCE", &args.resource)
        // Its own group, so that a lost lock stops its children too.
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            say(&format!("lockctl: cannot run {program:?}: {err}"));
            return if err.kind() == std::io::ErrorKind::NotFound {
                exit::NOT_FOUND
            } else {
                exit::CANNOT_RUN
            };
        }
    };
    // The group id is the child's pid (process_group(0)); known until it is reaped.
    let Some(pgid) = child.id() else {
        return exit::ERROR;
    };
    let mut interrupted = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            (name, signal) = interrupts.next() => {
                if interrupted {
                    say(&format!("lockctl: {name} again; killing {program:?} and its process group"));
                    signal_group(pgid, rustix::process::Signal::KILL, "SIGKILL");
                } else {
                    interrupted = true;
                    say(&format!(
                        "lockctl: {name}; passed on to {program:?}, waiting for it to exit (again to kill it)"
                    ));
                    signal_group(pgid, signal, name);
                }
            }
            lost = until_lost(health) => {
                stop_lost_command(&mut child, pgid, args, guard, lost).await;
                return exit::LOCK_LOST;
            }
        }
    };
    match status {
        Ok(status) => exit_code_of(status),
        Err(err) => {
            say(&format!("lockctl: waiting for {program:?} failed: {err}"));
            exit::ERROR
        }
    }
}

/// At `Lost`: --lost-signal to the command's group at once, the report line, then
/// SIGKILL after --kill-after unless the command exited.
async fn stop_lost_command(
    child: &mut tokio::process::Child,
    pgid: u32,
    args: &LockArgs,
    guard: &LockGuard,
    lost: SessionHealth,
) {
    let LostSignal { signal, name } = args.lost_signal;
    signal_group(pgid, signal, name);
    let then = if args.kill_after.is_zero() || signal == rustix::process::Signal::KILL {
        String::new()
    } else {
        format!(", SIGKILL in {:?} if it has not exited", args.kill_after)
    };
    report_lost(
        args,
        guard,
        lost,
        Some(&format!(
            "sent SIG{name} to the command's process group {pgid}{then}"
        )),
    );
    if then.is_empty() {
        let _ = child.wait().await;
        return;
    }
    if tokio::time::timeout(args.kill_after, child.wait())
        .await
        .is_err()
    {
        say(&format!(
            "lockctl: the command did not exit within {:?}; sending SIGKILL to its process group",
            args.kill_after
        ));
        signal_group(pgid, rustix::process::Signal::KILL, "SIGKILL");
        let _ = child.wait().await;
    }
}

/// The status a shell would report: the exit code, or 128 + the signal that killed it.
fn exit_code_of(status: std::process::ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(255),
        (None, None) => 1,
    }
}

pub async fn check_token(
    servers: &[String],
    args: CheckTokenArgs,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let checker = TokenChecker::new(&ClientConfig {
        tls: crate::tls::options(),
        ..ClientConfig::new(servers.iter().cloned(), "")
    })?;
    let check = checker
        .check_token(&args.lockspace, args.resource.as_bytes(), args.token)
        .await
        .with_context(|| {
            format!(
                "cannot check token {} on {}/{}",
                args.token, args.lockspace, args.resource
            )
        })?;
    if json {
        let line = serde_json::json!({
            "lockspace": args.lockspace,
            "resource": args.resource,
            "token": args.token,
            "current": check.current,
            "latest": check.latest,
        });
        println!("{}", serde_json::to_string(&line)?);
    } else {
        println!("current={} latest={}", check.current, check.latest);
    }
    Ok(if check.current {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_STALE_TOKEN)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_exit_status() {
        let healthy = SessionHealth::Healthy;
        let no_quorum = Error::NoQuorum {
            waited: Duration::from_secs(2),
            last: "x".into(),
        };
        assert_eq!(status_of(&no_quorum, healthy), exit::NO_QUORUM);
        assert_eq!(
            status_of(&Error::WouldBlock(String::new()), healthy),
            exit::WOULD_BLOCK
        );
        assert_eq!(
            status_of(&Error::Timeout(String::new()), healthy),
            exit::TIMED_OUT
        );
        let refused = Error::FailedPrecondition("double unlock".into());
        assert_eq!(status_of(&refused, healthy), exit::ERROR);
        assert_eq!(status_of(&refused, SessionHealth::Expired), exit::LOCK_LOST);
        let expired = Error::FailedPrecondition("session 4 expired".into());
        assert_eq!(status_of(&expired, healthy), exit::LOCK_LOST);
        assert_eq!(
            status_of(&Error::InvalidArgument("bad".into()), healthy),
            exit::ERROR
        );
        let statuses = [
            exit::ERROR,
            exit::NO_QUORUM,
            exit::WOULD_BLOCK,
            exit::TIMED_OUT,
            exit::LOCK_LOST,
            exit::CANNOT_RUN,
            exit::NOT_FOUND,
            exit::INTERRUPTED,
            2, // clap's usage error
        ];
        let distinct: std::collections::BTreeSet<u8> = statuses.into_iter().collect();
        assert_eq!(distinct.len(), statuses.len(), "every status is its own");
    }
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_status_is_reported_like_a_shell() {
        // Raw wait statuses: exit code in the high byte, signal in the low bits.
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(0)), 0);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(9)), 137);
        assert_eq!(exit_code_of(std::process::ExitStatus::from_raw(15)), 143);
    }
}
