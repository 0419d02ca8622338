//! The cluster configuration: one TOML file shared by every server of a cluster.
//!
//! Owns parsing and validation only. Validation runs once at start-up and names the
//! offending key in every error, so a bad file never gets as far as Raft. The rules
//! themselves are in `validate.rs`.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config: `{key}`: {problem}")]
    Invalid { key: String, problem: String },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub cluster: ClusterConfig,
    pub servers: Vec<ServerConfig>,
    #[serde(default)]
    pub nodes: Vec<NodeConfig>,
    #[serde(default)]
    pub timing: TimingConfig,
    #[serde(default)]
    pub liveness: LivenessConfig,
    #[serde(default)]
    pub fencing: FencingConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    /// Mutual TLS for nodes, lockctl and peers; absent = plaintext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub log: LogConfig,
}

/// The `[log]` section, reread on SIGHUP.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter (`info`, `lockd_server::raft_node=debug,info`); RUST_LOG, when
    /// set, wins at start-up. Absent: RUST_LOG, else `info`.
    pub filter: Option<String>,
}

/// The `[tls]` section: PEM files. `{id}` in `cert` and `key` is replaced by the
/// server's id, so one config can serve several servers on one host.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The cluster CA: client and server certificates must be issued by it.
    pub ca: PathBuf,
    /// This server's certificate (chain); its Subject needs OU=lockd-server, and it must
    /// be valid for the server's address (an IP address SAN, or a DNS name). It is also
    /// the server's client certificate towards the other servers.
    pub cert: PathBuf,
    /// This server's private key.
    pub key: PathBuf,
}

impl TlsConfig {
    fn with_id(path: &Path, id: u64) -> PathBuf {
        PathBuf::from(path.to_string_lossy().replace("{id}", &id.to_string()))
    }

    pub fn cert_path(&self, id: u64) -> PathBuf {
        TlsConfig::with_id(&self.cert, id)
    }

    pub fn key_path(&self, id: u64) -> PathBuf {
        TlsConfig::with_id(&self.key, id)
    }
}

/// Smallest heartbeat interval accepted: below it, scheduling noise on a busy server
/// would expire healthy nodes.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Bound on `timing.snapshot_keep_entries`: the kept entries stay in memory.
pub const MAX_SNAPSHOT_KEEP_ENTRIES: u64 = 1_000_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LivenessConfig {
    /// Nodes heartbeat every 2/3 of this.
    pub heartbeat_interval_ms: u64,
    /// A node not heard from for `allowed_misses` intervals is expired.
    pub allowed_misses: u32,
    /// How long a new leader (after a failover or a cold start) waits for a node that
    /// was logged in before expiring it; 0 means one expiry window.
    pub grace_ms: u64,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            heartbeat_interval_ms: 1_000,
            allowed_misses: 2,
            grace_ms: 0,
        }
    }
}

impl LivenessConfig {
    /// How long a node may stay silent before it is expired.
    pub fn expiry_window_ms(&self) -> u64 {
        self.heartbeat_interval_ms * u64::from(self.allowed_misses)
    }

    pub fn grace_ms(&self) -> u64 {
        if self.grace_ms == 0 {
            self.expiry_window_ms()
        } else {
            self.grace_ms
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// Non-zero; checked in every handshake so a server or node of another cluster is refused.
    pub id: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Raft id: non-zero and unique.
    pub id: u64,
    /// One gRPC address serves nodes, lockctl and the other servers.
    pub addr: String,
    /// Where this server serves Prometheus metrics over HTTP (`/metrics`); none if unset.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The name a node logs in with.
    pub name: String,
    /// Fence devices; devices with the same `level` form one level, tried in
    /// ascending level order (BRIEF §3.4). A node without devices can only be fenced
    /// by an operator's `lockctl fence ack`.
    #[serde(default)]
    pub fence: Vec<FenceDeviceConfig>,
}

impl NodeConfig {
    /// The devices that unfence this node (`unfence = true`), in level order and
    /// config order within a level, each with `action = on`: what runs before the
    /// node's login is answered. Empty: its logins need no unfencing.
    pub fn unfence_devices(&self) -> Vec<FenceDeviceConfig> {
        let mut devices: Vec<&FenceDeviceConfig> =
            self.fence.iter().filter(|d| d.unfence).collect();
        devices.sort_by_key(|d| d.level);
        devices
            .into_iter()
            .map(|d| FenceDeviceConfig {
                action: FenceAction::On,
                ..d.clone()
            })
            .collect()
    }
}

/// One fence device: a ClusterLabs-compatible agent and its parameters.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FenceDeviceConfig {
    /// 1 is tried first; every device of a level must succeed.
    pub level: u32,
    /// Path of the agent program, e.g. /usr/sbin/fence_ipmilan.
    pub agent: PathBuf,
    #[serde(default)]
    pub action: FenceAction,
    /// The agent and all its children are killed after this long; default 60 s.
    #[serde(default = "default_fence_timeout_ms")]
    pub timeout_ms: u64,
    /// Passed to the agent as `key=value` lines on stdin (`ipaddr`, `login`,
    /// `passwd_script`, `port`, ...). Keys containing "passw" never appear in logs.
    #[serde(default)]
    pub params: std::collections::BTreeMap<String, String>,
    /// The device also unfences the node (Pacemaker's `meta provides=unfencing`):
    /// before any login of the node is answered, the leader runs this agent with
    /// `action=on` (and the same parameters), as storage fencing needs — `fence_scsi`
    /// re-registers the node's reservation key, `fence_mpath` its multipath keys. Every
    /// such device must succeed; `[fencing] unfence_attempts` bounds the tries.
    #[serde(default)]
    pub unfence: bool,
}

fn default_fence_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum FenceAction {
    #[default]
    Reboot,
    Off,
    /// Unfencing only: set by lockd on a device with `unfence = true`; refused as a
    /// device's fencing `action` (it would "fence" by switching the node on).
    On,
}

impl FenceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            FenceAction::Reboot => "reboot",
            FenceAction::Off => "off",
            FenceAction::On => "on",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FencingConfig {
    /// After the last level failed, wait this long and start again from level 1.
    pub retry_backoff_ms: u64,
    /// Every this often, each server runs every configured fence device's agent with
    /// `action=monitor`, so a broken device is known before it is needed; 0 = never.
    pub monitor_interval_ms: u64,
    /// How many times the leader runs a node's unfence devices (`unfence = true`)
    /// for one login before it gives up and refuses the login; 1 to 100. Attempts are
    /// `UNFENCE_RETRY_DELAY` (1 s) apart.
    pub unfence_attempts: u32,
}

/// The shortest monitor interval: agents log in to BMCs and PDUs.
pub const MIN_MONITOR_INTERVAL_MS: u64 = 1_000;

impl Default for FencingConfig {
    fn default() -> Self {
        FencingConfig {
            retry_backoff_ms: 5_000,
            monitor_interval_ms: 60_000,
            unfence_attempts: 3,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimingConfig {
    /// One Raft tick.
    pub tick_ms: u64,
    /// Ticks without a leader before a follower campaigns (randomised up to twice this).
    pub election_ticks: u64,
    /// Ticks between leader heartbeats; must be below `election_ticks`.
    pub heartbeat_ticks: u64,
    /// How long a client call waits for its entry to commit before failing with
    /// "no quorum" (Unavailable). Retrying is safe: request ids make it apply once.
    pub proposal_timeout_ms: u64,
    /// Take a snapshot of the lock table (and compact the log) every this many entries,
    /// an entry that carries several callers' commands counting each; a large table
    /// waits longer: at least one entry per 400 bytes of the last snapshot (≈115,000
    /// entries at 1,000,000 held locks).
    pub snapshot_every_entries: u64,
    /// Entries kept in the log before a snapshot's index when compacting, so that a
    /// follower this far behind is sent entries rather than the whole snapshot;
    /// counted like `snapshot_every_entries` (fewer entries are kept when they carry
    /// several commands each).
    pub snapshot_keep_entries: u64,
}

impl Default for TimingConfig {
    fn default() -> Self {
        TimingConfig {
            tick_ms: 50,
            election_ticks: 10,
            heartbeat_ticks: 2,
            proposal_timeout_ms: 2_000,
            snapshot_every_entries: 10_000,
            snapshot_keep_entries: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Each server keeps its Raft log under `<data_dir>/server-<id>/`, so one file can
    /// describe several servers sharing a host (as `lockd dev` does).
    pub data_dir: PathBuf,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("/var/lib/lockd"),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn server(&self, id: u64) -> Option<&ServerConfig> {
        self.servers.iter().find(|s| s.id == id)
    }

    pub fn has_node(&self, name: &str) -> bool {
        self.nodes.iter().any(|n| n.name == name)
    }

    pub fn node(&self, name: &str) -> Option<&NodeConfig> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Checks that every fence agent exists and is executable. Run by `lockd run` and
    /// `check-config` on the server itself (not by `parse`, which must not depend on
    /// the machine that reads the file).
    pub fn check_fence_agents(&self) -> Result<(), ConfigError> {
        use std::os::unix::fs::PermissionsExt;
        for (i, n) in self.nodes.iter().enumerate() {
            for (j, d) in n.fence.iter().enumerate() {
                let ok = std::fs::metadata(&d.agent)
                    .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                    .unwrap_or(false);
                if !ok {
                    return Err(invalid(
                        format!("nodes[{i}].fence[{j}].agent"),
                        format!("`{}` is missing or not executable", d.agent.display()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads and checks server `id`'s TLS files (see `tls::TlsFiles::load`); `None`
    /// without a `[tls]` section. Run by `lockd run` and `check-config` on the server
    /// itself, like `check_fence_agents`.
    pub fn load_tls(&self, id: u64) -> Result<Option<crate::tls::TlsFiles>, ConfigError> {
        crate::tls::load(self, id)
    }

    pub fn server_dir(&self, id: u64) -> PathBuf {
        self.storage.data_dir.join(format!("server-{id}"))
    }

    /// A loopback cluster of `servers` servers on ports `base_port + 1 ..`, with nodes
    /// `node1..node16`; what `lockd dev` runs.
    pub fn dev(servers: u64, base_port: u16, data_dir: PathBuf) -> Config {
        Config {
            cluster: ClusterConfig {
                name: "dev".into(),
                id: 1,
            },
            servers: (1..=servers)
                .map(|id| ServerConfig {
                    id,
                    addr: format!("127.0.0.1:{}", u64::from(base_port) + id),
                    metrics_addr: Some(format!("127.0.0.1:{}", u64::from(base_port) + 10 + id)),
                })
                .collect(),
            nodes: (1..=16)
                .map(|i| NodeConfig {
                    name: format!("node{i}"),
                    fence: Vec::new(),
                })
                .collect(),
            timing: TimingConfig::default(),
            liveness: LivenessConfig::default(),
            // No fence devices; tests that add some turn monitoring on themselves.
            fencing: FencingConfig {
                monitor_interval_ms: 0,
                ..FencingConfig::default()
            },
            storage: StorageConfig { data_dir },
            tls: None,
            log: LogConfig::default(),
        }
    }

    /// The TOML text of this config (used to hand `lockd dev`'s config to its servers).
    pub fn to_toml(&self) -> String {
        let mut s = format!(
            "[cluster]\nname = {:?}\nid = {}\n\n",
            self.cluster.name, self.cluster.id
        );
        for srv in &self.servers {
            s += &format!("[[servers]]\nid = {}\naddr = {:?}\n", srv.id, srv.addr);
            if let Some(m) = &srv.metrics_addr {
                s += &format!("metrics_addr = {m:?}\n");
            }
            s += "\n";
        }
        for n in &self.nodes {
            s += &format!("[[nodes]]\nname = {:?}\n", n.name);
            if !n.fence.is_empty() {
                s += "fence = [\n";
                for d in &n.fence {
                    let params: Vec<String> = d
                        .params
                        .iter()
                        .map(|(k, v)| format!("{k:?} = {v:?}"))
                        .collect();
                    s += &format!(
                        "  {{ level = {}, agent = {:?}, action = {:?}, timeout_ms = {}, unfence = {}, params = {{ {} }} }},\n",
                        d.level,
                        d.agent,
                        d.action.as_str(),
                        d.timeout_ms,
                        d.unfence,
                        params.join(", ")
                    );
                }
                s += "]\n";
            }
            s += "\n";
        }
        s += &format!(
            "[fencing]\nretry_backoff_ms = {}\nmonitor_interval_ms = {}\nunfence_attempts = {}\n\n",
            self.fencing.retry_backoff_ms,
            self.fencing.monitor_interval_ms,
            self.fencing.unfence_attempts
        );
        let t = &self.timing;
        s += &format!(
            "[timing]\ntick_ms = {}\nelection_ticks = {}\nheartbeat_ticks = {}\nproposal_timeout_ms = {}\nsnapshot_every_entries = {}\nsnapshot_keep_entries = {}\n\n",
            t.tick_ms, t.election_ticks, t.heartbeat_ticks, t.proposal_timeout_ms, t.snapshot_every_entries, t.snapshot_keep_entries
        );
        let l = &self.liveness;
        s += &format!(
            "[liveness]\nheartbeat_interval_ms = {}\nallowed_misses = {}\ngrace_ms = {}\n\n",
            l.heartbeat_interval_ms, l.allowed_misses, l.grace_ms
        );
        s += &format!("[storage]\ndata_dir = {:?}\n", self.storage.data_dir);
        if let Some(tls) = &self.tls {
            s += &format!(
                "\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
                tls.ca, tls.cert, tls.key
            );
        }
        if let Some(filter) = &self.log.filter {
            s += &format!("\n[log]\nfilter = {filter:?}\n");
        }
        s
    }
}

mod validate;

#[cfg(test)]
mod tests;
