//! The rules of a config file, one function per section (or group of keys). Each names
//! the offending key in its error; none looks at the machine it runs on (that is
//! `check_fence_agents` and `load_tls`, run on the server itself).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use super::{
    invalid, ClusterConfig, Config, ConfigError, FenceAction, FenceDeviceConfig, FencingConfig,
    LivenessConfig, LogConfig, NodeConfig, ServerConfig, TimingConfig, TlsConfig,
    MAX_SNAPSHOT_KEEP_ENTRIES, MIN_HEARTBEAT_INTERVAL_MS, MIN_MONITOR_INTERVAL_MS,
};
use crate::state::MAX_NAME_BYTES;

impl Config {
    /// Checks every rule of the file. With several problems, the first in this order is
    /// the one reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.cluster.validate()?;
        validate_servers(&self.servers)?;
        validate_nodes(&self.nodes)?;
        self.timing.validate_raft()?;
        self.liveness.validate()?;
        self.fencing.validate_retry_backoff()?;
        self.timing.validate_snapshots()?;
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        self.fencing.validate_unfencing_and_monitor()?;
        self.log.validate()
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.name.is_empty() || self.name.len() > MAX_NAME_BYTES {
            return Err(invalid(
                "cluster.name",
                format!("must be 1 to {MAX_NAME_BYTES} bytes"),
            ));
        }
        if self.id == 0 {
            return Err(invalid("cluster.id", "must be non-zero"));
        }
        Ok(())
    }
}

/// A cluster of 1, 3, 4 or 5 servers, each with its own id, address and metrics address.
fn validate_servers(servers: &[ServerConfig]) -> Result<(), ConfigError> {
    match servers.len() {
        1 | 3 | 4 | 5 => {}
        2 => {
            return Err(invalid(
                "servers",
                "2 servers cannot survive any failure (a quorum of 2 is 2); use 1, 3, 4 or 5",
            ))
        }
        n => {
            return Err(invalid(
                "servers",
                format!("{n} servers configured; a cluster has 1, 3, 4 or 5"),
            ))
        }
    }
    let mut ids = BTreeSet::new();
    let mut addrs = BTreeSet::new();
    for (i, s) in servers.iter().enumerate() {
        if s.id == 0 {
            return Err(invalid(format!("servers[{i}].id"), "must be non-zero"));
        }
        if !ids.insert(s.id) {
            return Err(invalid(
                format!("servers[{i}].id"),
                format!("duplicate server id {}", s.id),
            ));
        }
        let addr = socket_addr(format!("servers[{i}].addr"), &s.addr)?;
        if !addrs.insert(addr) {
            return Err(invalid(
                format!("servers[{i}].addr"),
                format!("duplicate address {addr}"),
            ));
        }
        if let Some(m) = &s.metrics_addr {
            let key = format!("servers[{i}].metrics_addr");
            let metrics = socket_addr(key.clone(), m)?;
            if !addrs.insert(metrics) {
                return Err(invalid(key, format!("address {metrics} is already used")));
            }
        }
    }
    Ok(())
}

fn socket_addr(key: String, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|_| invalid(key, format!("`{text}` is not an ip:port address")))
}

/// Unique node names, and each node's fence devices.
fn validate_nodes(nodes: &[NodeConfig]) -> Result<(), ConfigError> {
    let mut names = BTreeSet::new();
    for (i, n) in nodes.iter().enumerate() {
        if n.name.is_empty() || n.name.len() > MAX_NAME_BYTES {
            return Err(invalid(
                format!("nodes[{i}].name"),
                format!("must be 1 to {MAX_NAME_BYTES} bytes"),
            ));
        }
        if !names.insert(n.name.as_str()) {
            return Err(invalid(
                format!("nodes[{i}].name"),
                format!("duplicate node `{}`", n.name),
            ));
        }
        for (j, d) in n.fence.iter().enumerate() {
            d.validate(&format!("nodes[{i}].fence[{j}]"))?;
        }
    }
    Ok(())
}

impl FenceDeviceConfig {
    /// The device at `key` (`nodes[i].fence[j]`).
    fn validate(&self, key: &str) -> Result<(), ConfigError> {
        if self.level == 0 {
            return Err(invalid(format!("{key}.level"), "levels start at 1"));
        }
        if self.action == FenceAction::On {
            return Err(invalid(
                format!("{key}.action"),
                "`on` does not fence: for storage fencing (fence_scsi, fence_mpath) \
                 give the device its fencing action (`off`) and `unfence = true`, \
                 which runs it with action=on before the node's login is answered \
                 (Pacemaker's provides=unfencing)",
            ));
        }
        if !self.agent.is_absolute() {
            return Err(invalid(
                format!("{key}.agent"),
                format!("`{}` must be an absolute path", self.agent.display()),
            ));
        }
        if !(1..=3_600_000).contains(&self.timeout_ms) {
            return Err(invalid(format!("{key}.timeout_ms"), "must be 1 to 3600000"));
        }
        for k in self.params.keys() {
            if k.is_empty() || k.contains(['=', '\n']) || k == "action" || k == "nodename" {
                return Err(invalid(
                    format!("{key}.params.{k}"),
                    "not a usable agent parameter (action and nodename are set by lockd)",
                ));
            }
        }
        Ok(())
    }
}

impl TimingConfig {
    /// The Raft clock: tick, election and heartbeat ticks, proposal timeout.
    fn validate_raft(&self) -> Result<(), ConfigError> {
        if !(1..=1_000).contains(&self.tick_ms) {
            return Err(invalid("timing.tick_ms", "must be 1 to 1000"));
        }
        if self.heartbeat_ticks == 0 || self.heartbeat_ticks >= self.election_ticks {
            return Err(invalid(
                "timing.heartbeat_ticks",
                "must be at least 1 and below timing.election_ticks",
            ));
        }
        if self.election_ticks > 1_000 {
            return Err(invalid("timing.election_ticks", "must be at most 1000"));
        }
        if self.proposal_timeout_ms < self.tick_ms {
            return Err(invalid(
                "timing.proposal_timeout_ms",
                "must be at least one tick",
            ));
        }
        Ok(())
    }

    fn validate_snapshots(&self) -> Result<(), ConfigError> {
        if self.snapshot_every_entries < 100 {
            return Err(invalid(
                "timing.snapshot_every_entries",
                "must be at least 100",
            ));
        }
        if self.snapshot_keep_entries > MAX_SNAPSHOT_KEEP_ENTRIES {
            return Err(invalid(
                "timing.snapshot_keep_entries",
                format!("must be at most {MAX_SNAPSHOT_KEEP_ENTRIES} (entries are kept in memory)"),
            ));
        }
        Ok(())
    }
}

impl LivenessConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_HEARTBEAT_INTERVAL_MS..=600_000).contains(&self.heartbeat_interval_ms) {
            return Err(invalid(
                "liveness.heartbeat_interval_ms",
                format!("must be {MIN_HEARTBEAT_INTERVAL_MS} to 600000"),
            ));
        }
        if !(1..=100).contains(&self.allowed_misses) {
            return Err(invalid("liveness.allowed_misses", "must be 1 to 100"));
        }
        if self.grace_ms != 0 && self.grace_ms < self.expiry_window_ms() {
            return Err(invalid(
                "liveness.grace_ms",
                "must be 0 (one expiry window) or at least heartbeat_interval_ms * allowed_misses",
            ));
        }
        Ok(())
    }
}

impl FencingConfig {
    fn validate_retry_backoff(&self) -> Result<(), ConfigError> {
        if !(100..=3_600_000).contains(&self.retry_backoff_ms) {
            return Err(invalid(
                "fencing.retry_backoff_ms",
                "must be 100 to 3600000",
            ));
        }
        Ok(())
    }

    fn validate_unfencing_and_monitor(&self) -> Result<(), ConfigError> {
        if !(1..=100).contains(&self.unfence_attempts) {
            return Err(invalid("fencing.unfence_attempts", "must be 1 to 100"));
        }
        let monitor = self.monitor_interval_ms;
        if monitor != 0 && monitor < MIN_MONITOR_INTERVAL_MS {
            return Err(invalid(
                "fencing.monitor_interval_ms",
                format!("must be 0 (off) or at least {MIN_MONITOR_INTERVAL_MS}"),
            ));
        }
        Ok(())
    }
}

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, path) in [
            ("tls.ca", &self.ca),
            ("tls.cert", &self.cert),
            ("tls.key", &self.key),
        ] {
            if path.as_os_str().is_empty() {
                return Err(invalid(key, "must be the path of a PEM file"));
            }
        }
        Ok(())
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(filter) = &self.filter {
            tracing_subscriber::EnvFilter::try_new(filter)
                .map_err(|e| invalid("log.filter", format!("`{filter}` is not a filter: {e}")))?;
        }
        Ok(())
    }
}
