//! Client configuration and the parsing of server addresses, from the configured list
//! and from a follower's `lockd-leader` redirect.

use std::time::Duration;

use crate::error::{Error, Result};
use crate::tls::TlsOptions;

/// How to reach the cluster and how patiently.
///
/// Build it with [`ClientConfig::new`] and adjust fields, or with struct-update syntax
/// from `ClientConfig::default()`.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The lock servers' client addresses, `host:port` (an `http://` prefix is accepted).
    /// The order is only where the search for the leader starts.
    pub servers: Vec<String>,
    /// This node's name; it must be a node in the cluster configuration.
    pub node: String,
    /// The cluster the client expects; the server refuses the login on a mismatch.
    /// 0 = do not check.
    pub cluster_id: u64,
    /// How long one call keeps looking for a leader with quorum before it fails with
    /// [`Error::NoQuorum`]: every call except `Lock` / `Convert` (which wait as long as
    /// their queue timeout says, see [`crate::LockOptions::timeout`]; a `try` request
    /// without one gets this limit too) and a login with `wait_for_login`. Default 3 s.
    pub no_quorum_timeout: Duration,
    /// What [`crate::Client::connect`] does while no leader with quorum answers:
    /// `false` (the default) fails with [`Error::NoQuorum`] after `no_quorum_timeout`;
    /// `true` keeps trying until a leader answers, through any loss of quorum or
    /// restart of the whole cluster (each retry reuses the login's nonce, so a login
    /// that was applied but whose answer was lost is not refused as "already logged in").
    pub wait_for_login: bool,
    /// How long one attempt of a short call (everything but `Lock` / `Convert`) may take
    /// on one server before the client tries again, possibly elsewhere. Guards against a
    /// stopped (SIGSTOP) or partitioned server that keeps its connection open.
    pub attempt_timeout: Duration,
    /// TCP connect timeout per server.
    pub connect_timeout: Duration,
    /// HTTP/2 keep-alive ping interval. A connection that does not answer a ping within
    /// two intervals is dropped, which ends the calls blocked on it (so a waiting
    /// `Lock` moves to the new leader after a failover).
    pub keepalive_interval: Duration,
    /// First pause between attempts; doubled after each failed attempt ...
    pub backoff_min: Duration,
    /// ... up to this.
    pub backoff_max: Duration,
    /// Mutual TLS (CA and client identity); `None` = plaintext. With TLS on, the servers
    /// accept a login only under the Common Name of the client's certificate.
    pub tls: Option<TlsOptions>,
    /// Whether a follower's redirect may send the client to an address it was not
    /// configured with (the leader's own address, learned from the redirect). `false`
    /// for a client that reaches the servers only through proxies or NAT listed in
    /// `servers`: a redirect to an unlisted address then moves the call to the next
    /// listed server instead. Default `true`.
    pub follow_unlisted_redirects: bool,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            servers: Vec::new(),
            node: String::new(),
            cluster_id: 0,
            no_quorum_timeout: Duration::from_secs(3),
            wait_for_login: false,
            attempt_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            tls: None,
            follow_unlisted_redirects: true,
        }
    }
}

impl ClientConfig {
    /// A configuration with the given servers and node name and default timings.
    pub fn new<S: Into<String>>(
        servers: impl IntoIterator<Item = S>,
        node: impl Into<String>,
    ) -> ClientConfig {
        ClientConfig {
            servers: servers.into_iter().map(Into::into).collect(),
            node: node.into(),
            ..ClientConfig::default()
        }
    }

    /// Checks the configuration and returns the normalized server addresses.
    pub(crate) fn validated_servers(&self) -> Result<Vec<String>> {
        if self.servers.is_empty() {
            return Err(Error::Config("the server list is empty".into()));
        }
        if self.servers.len() > MAX_SERVERS {
            return Err(Error::Config(format!(
                "{} servers listed; at most {MAX_SERVERS} are supported",
                self.servers.len()
            )));
        }
        if self.no_quorum_timeout.is_zero() || self.attempt_timeout.is_zero() {
            return Err(Error::Config(
                "no_quorum_timeout and attempt_timeout must be positive".into(),
            ));
        }
        let mut out: Vec<String> = Vec::with_capacity(self.servers.len());
        for raw in &self.servers {
            let addr = normalize_addr(raw).ok_or_else(|| {
                Error::Config(format!("bad server address {raw:?}: expected host:port"))
            })?;
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        Ok(out)
    }
}

/// The most addresses a client keeps channels for (configured plus learned from
/// redirects). A cluster has at most 5 voters; the slack covers membership changes and
/// aliases of one server (a name and an IP).
pub(crate) const MAX_SERVERS: usize = 16;

/// Parses a comma-separated server list (`"h1:7101,h2:7101"`), as given to `lockctl
/// --servers` or `LOCKD_SERVERS`. Blank entries are skipped; duplicates removed.
pub fn parse_servers(list: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let addr = normalize_addr(raw).ok_or_else(|| {
            Error::Config(format!("bad server address {raw:?}: expected host:port"))
        })?;
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    if out.is_empty() {
        return Err(Error::Config("the server list is empty".into()));
    }
    Ok(out)
}

/// Normalizes a server address to `host:port`: trims, drops an `http://` prefix and a
/// trailing `/`, and requires a non-empty host and a numeric port. IPv6 hosts must be
/// bracketed (`[::1]:7101`). Returns `None` for anything else, including an empty value
/// (how a follower that knows no leader might fill the redirect header).
pub(crate) fn normalize_addr(raw: &str) -> Option<String> {
    let s = raw.trim();
    let s = s.strip_prefix("http://").unwrap_or(s);
    let s = s.strip_suffix('/').unwrap_or(s);
    if s.is_empty() || s.len() > 255 || s.contains(|c: char| c.is_whitespace() || c == '/') {
        return None;
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok().filter(|p| *p != 0)?;
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner.strip_suffix(']').is_some_and(|h| !h.is_empty())
    } else {
        !host.is_empty() && !host.contains(':')
    };
    host_ok.then(|| s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_normalized() {
        assert_eq!(
            normalize_addr("127.0.0.1:7101").as_deref(),
            Some("127.0.0.1:7101")
        );
        assert_eq!(
            normalize_addr(" 127.0.0.1:7101 ").as_deref(),
            Some("127.0.0.1:7101")
        );
        assert_eq!(
            normalize_addr("http://lock1:7101/").as_deref(),
            Some("lock1:7101")
        );
        assert_eq!(normalize_addr("[::1]:7101").as_deref(), Some("[::1]:7101"));
    }

    #[test]
    fn malformed_addresses_are_rejected() {
        for bad in [
            "",
            " ",
            "lock1",
            "lock1:",
            ":7101",
            "lock1:port",
            "lock1:70000",
            "lock1:0",
            "::1:7101",
            "[]:7101",
            "https://lock1:7101",
            "a b:1",
            "lock1:7101/x",
        ] {
            assert_eq!(normalize_addr(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn server_lists_split_on_commas() {
        assert_eq!(
            parse_servers("127.0.0.1:7101, 127.0.0.1:7102,,127.0.0.1:7101").unwrap(),
            vec!["127.0.0.1:7101".to_string(), "127.0.0.1:7102".to_string()]
        );
        assert!(matches!(parse_servers(" , "), Err(Error::Config(_))));
        assert!(matches!(parse_servers("a:1,b"), Err(Error::Config(m)) if m.contains("\"b\"")));
    }

    #[test]
    fn config_validation_names_the_problem() {
        let cfg = ClientConfig::new(Vec::<String>::new(), "n1");
        assert!(matches!(cfg.validated_servers(), Err(Error::Config(m)) if m.contains("empty")));
        let cfg = ClientConfig::new(["h:1", "nope"], "n1");
        assert!(matches!(cfg.validated_servers(), Err(Error::Config(m)) if m.contains("nope")));
        let cfg = ClientConfig::new(["h:1", "http://h:1"], "n1");
        assert_eq!(cfg.validated_servers().unwrap(), vec!["h:1".to_string()]);
    }
}
