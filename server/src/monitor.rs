//! Periodic fence device monitoring: every `[fencing] monitor_interval_ms`, each server
//! runs every configured device's agent with `action=monitor` (fence::monitor), one
//! after another, so an operator learns that a BMC or PDU is broken before a node
//! needs fencing. The result of each device is kept here for `lockctl status` (the
//! Status RPC reads [`snapshot`]), exported as `lockd_fence_device_up`, and a change
//! is logged: a warning when a device stops answering, info when it answers again.
//!
//! Not replicated and not the lock table's business: each server reports what it can
//! reach (only the leader fences, but any server may become the leader). Owns no other
//! state and never fences.

use crate::config::{Config, FenceDeviceConfig};
use std::sync::Mutex;
use std::time::Duration;
use tracing::{info, warn};

/// The last monitor result of one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceHealth {
    pub node: String,
    pub level: u32,
    pub agent: String,
    pub ok: bool,
    /// The agent's outcome ("exit 0", "exit 1: <its last stderr line>", "timed out ...").
    pub detail: String,
    /// When the check finished, ms since the Unix epoch.
    pub checked_at_ms: u64,
}

/// The newest result per device, in config order. One server per process.
static LATEST: Mutex<Vec<DeviceHealth>> = Mutex::new(Vec::new());

/// The newest result of every device checked so far.
pub fn snapshot() -> Vec<DeviceHealth> {
    LATEST.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Monitors `config`'s devices forever (until the task is aborted); returns at once
/// if the interval is 0 or no node has a device.
pub async fn run(config: Config) {
    let every = Duration::from_millis(config.fencing.monitor_interval_ms);
    let devices: Vec<(String, FenceDeviceConfig)> = config
        .nodes
        .iter()
        .flat_map(|n| n.fence.iter().map(|d| (n.name.clone(), d.clone())))
        .collect();
    if every.is_zero() || devices.is_empty() {
        return;
    }
    info!(
        devices = devices.len(),
        every_ms = every.as_millis() as u64,
        "monitoring fence devices"
    );
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        for (i, (node, device)) in devices.iter().enumerate() {
            let outcome = crate::fence::monitor(device, node).await;
            let health = DeviceHealth {
                node: node.clone(),
                level: device.level,
                agent: device.agent.display().to_string(),
                ok: outcome.ok,
                detail: outcome.detail,
                checked_at_ms: now_ms(),
            };
            record(i, health);
        }
    }
}

/// Stores device `i`'s result, logs a change, sets its gauge.
fn record(i: usize, health: DeviceHealth) {
    let before = {
        let mut latest = LATEST.lock().unwrap_or_else(|p| p.into_inner());
        let before = latest.get(i).map(|h| h.ok);
        if latest.len() <= i {
            latest.resize(i + 1, health.clone());
        }
        latest[i] = health.clone();
        before
    };
    let device = format!("level {} {}", health.level, health.agent);
    match (before, health.ok) {
        (Some(true) | None, false) => warn!(
            node = %health.node,
            %device,
            detail = %health.detail,
            "fence device does not answer its monitor check: fencing this node would fail"
        ),
        (Some(false), true) => info!(node = %health.node, %device, "fence device answers again"),
        _ => {}
    }
    crate::telemetry::fence_device(&health.node, &device, health.ok);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
