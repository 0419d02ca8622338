//! `lockctl lock` (hold a lock while a command runs, or until interrupted) and
//! `lockctl check-token`. Both go through `lockd-client`, like any node would.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use lockd_client::{
    Client, ClientConfig, LockGuard, LockOptions, LockspaceOptions, Resource, TokenChecker,
};
use tokio::signal::unix::{signal, Signal, SignalKind};

use crate::cli::{CheckTokenArgs, LockArgs};

/// Exit status after an interrupt before the grant (128 + SIGINT, as a shell reports it).
const EXIT_INTERRUPTED: u8 = 130;
/// Exit status when the command could not be started, and when it was not found.
const EXIT_CANNOT_RUN: u8 = 126;
const EXIT_NOT_FOUND: u8 = 127;
/// Exit status of `check-token` for a token that is no longer current.
const EXIT_STALE_TOKEN: u8 = 3;

/// SIGINT (Ctrl-C) and SIGTERM, as one stream.
struct Interrupts {
    int: Signal,
    term: Signal,
}

impl Interrupts {
    fn new() -> anyhow::Result<Interrupts> {
        Ok(Interrupts {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

pub async fn run(servers: &[String], args: LockArgs, json: bool) -> anyhow::Result<ExitCode> {
    // Installed before logging in: from here on an interrupt must not kill lockctl
    // without a logout, or its node would be expired and fenced.
    let mut interrupts = Interrupts::new()?;
    let cfg = ClientConfig {
        cluster_id: args.cluster_id,
        tls: crate::tls::options(),
        ..ClientConfig::new(servers.iter().cloned(), args.node.clone())
    };
    let client = Client::connect(cfg)
        .await
        .with_context(|| format!("cannot log in as node {:?}", args.node))?;
    let outcome = lock_and_run(&client, &args, json, &mut interrupts).await;
    let logout = client.logout().await;
    match (outcome, logout) {
        (Ok(code), Ok(())) => Ok(code),
        (Ok(code), Err(err)) => {
            eprintln!(
                "lockctl: warning: logout failed ({err}); the session stays until it expires"
            );
            Ok(code)
        }
        (Err(err), _) => Err(err),
    }
}

async fn lock_and_run(
    client: &Client,
    args: &LockArgs,
    json: bool,
    interrupts: &mut Interrupts,
) -> anyhow::Result<ExitCode> {
    let lockspace = client
        .open_lockspace(&args.lockspace, LockspaceOptions::default())
        .await
        .with_context(|| format!("cannot open lockspace {:?}", args.lockspace))?;
    let mut opts = LockOptions::new();
    opts.flags.try_lock = args.try_lock;
    if args.timeout_ms > 0 {
        opts.timeout = Some(Duration::from_millis(args.timeout_ms));
    }
    let what = format!("{}/{} in {}", args.lockspace, args.resource, args.mode);
    let pending = lockspace.request(Resource::from(args.resource.as_str()), args.mode, opts);
    let guard = tokio::select! {
        granted = pending => granted.with_context(|| format!("cannot lock {what}"))?,
        signal = interrupts.next() => {
            // Dropping the request cancels it; the logout that follows releases
            // anything granted meanwhile.
            eprintln!("lockctl: {signal} while waiting for {what}; giving up");
            return Ok(ExitCode::from(EXIT_INTERRUPTED));
        }
    };
    print_grant(args, &guard, json)?;

    let code = if args.command.is_empty() {
        let signal = interrupts.next().await;
        eprintln!("lockctl: {signal}; releasing {what}");
        ExitCode::SUCCESS
    } else {
        run_command(&args.command, args, &guard, interrupts).await
    };
    if let Err(err) = guard.unlock().await {
        eprintln!("lockctl: warning: unlock failed ({err}); logging out releases the lock");
    }
    Ok(code)
}

fn print_grant(args: &LockArgs, guard: &LockGuard, json: bool) -> anyhow::Result<()> {
    if json {
        let line = serde_json::json!({
            "lockspace": args.lockspace,
            "resource": args.resource,
            "token": guard.token(),
            "lock_id": guard.lock_id(),
            "mode": guard.mode().to_string(),
        });
        println!("{}", serde_json::to_string(&line)?);
    } else {
        println!(
            "token={} lock_id={} mode={}",
            guard.token(),
            guard.lock_id(),
            guard.mode()
        );
    }
    Ok(())
}

/// Runs the command with the grant in its environment and returns its exit status.
async fn run_command(
    command: &[String],
    args: &LockArgs,
    guard: &LockGuard,
    interrupts: &mut Interrupts,
) -> ExitCode {
    let Some((program, rest)) = command.split_first() else {
        return ExitCode::SUCCESS;
    };
    let spawned = tokio::process::Command::new(program)
        .args(rest)
        .env("LOCKD_TOKEN", guard.token().to_string())
        .env("LOCKD_LOCK_ID", guard.lock_id().to_string())
        .env("LOCKD_LOCKSPACE", &args.lockspace)
        .env("LOCKD_RESOURCE", &args.resource)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            eprintln!("lockctl: cannot run {program:?}: {err}");
            return ExitCode::from(if err.kind() == std::io::ErrorKind::NotFound {
                EXIT_NOT_FOUND
            } else {
                EXIT_CANNOT_RUN
            });
        }
    };
    let mut interrupted = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            signal = interrupts.next() => {
                if interrupted {
                    eprintln!("lockctl: {signal} again; killing {program:?}");
                    if let Err(err) = child.start_kill() {
                        eprintln!("lockctl: cannot kill {program:?}: {err}");
                    }
                } else {
                    interrupted = true;
                    eprintln!(
                        "lockctl: {signal}; waiting for {program:?} to exit (again to kill it)"
                    );
                }
            }
        }
    };
    match status {
        Ok(status) => ExitCode::from(exit_code_of(status)),
        Err(err) => {
            eprintln!("lockctl: waiting for {program:?} failed: {err}");
            ExitCode::FAILURE
        }
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
