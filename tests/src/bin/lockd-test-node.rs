//! A cluster node as a separate process, for tests that must SIGSTOP or kill a node.
//!
//! Usage: lockd-test-node <servers> <node> <lockspace> <resource> <mode> [explicit]
//!
//! Logs in, takes the lock and prints one line per happening on stdout, each with the
//! wall-clock time in ms since the Unix epoch, so a test can compare it with the
//! servers' records:
//!   GRANTED <token> <ms>
//!   HEALTH <Healthy|Jeopardy|Lost|Expired> <ms>
//!   RELOGIN ok <ms> | RELOGIN err <message>
//! Once the health is Expired it tries to log in again (the test expects a clear
//! refusal while it is not fenced), prints the outcome and exits.

use lockd_client::{
    Client, ClientConfig, LockOptions, LockspaceOptions, Mode, RecoveryMode, SessionHealth,
};
use std::time::{SystemTime, UNIX_EPOCH};

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (servers, node, lockspace, resource, mode, explicit) = match args.as_slice() {
        [_, s, n, l, r, m] => (s, n, l, r, m, false),
        [_, s, n, l, r, m, e] if e == "explicit" => (s, n, l, r, m, true),
        _ => anyhow::bail!(
            "usage: lockd-test-node <servers> <node> <lockspace> <resource> <mode> [explicit]"
        ),
    };
    let options = LockspaceOptions {
        recovery: if explicit {
            RecoveryMode::Explicit
        } else {
            RecoveryMode::Auto
        },
        ..LockspaceOptions::default()
    };
    let servers: Vec<String> = servers.split(',').map(String::from).collect();
    let mode: Mode = mode.parse()?;
    let client = Client::connect(ClientConfig::new(servers.clone(), node.as_str())).await?;
    let ls = client.open_lockspace(lockspace, options).await?;
    let guard = ls.lock(resource.as_str(), mode, LockOptions::new()).await?;
    println!("GRANTED {} {}", guard.token(), now_ms());
    let mut health = client.health();
    // Report every change until the servers' verdict (Expired) is known; Lost may
    // come first (own timer) or not at all (the expiry notice was already waiting).
    loop {
        health.changed().await?;
        let h = *health.borrow();
        println!("HEALTH {h:?} {}", now_ms());
        if h == SessionHealth::Expired {
            break;
        }
    }
    match Client::connect(ClientConfig::new(servers, node.as_str())).await {
        Ok(_) => println!("RELOGIN ok {}", now_ms()),
        Err(e) => println!("RELOGIN err {e}"),
    }
    std::mem::forget(guard);
    Ok(())
}
