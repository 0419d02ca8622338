//! Network namespaces for server-from-server partitions (root only): a hub namespace
//! `<prefix>-hub` holding a bridge at 203.0.113.1/24, and one namespace `<prefix>-s<id>`
//! per server at 203.0.113.1<id>, joined to the bridge by a veth pair. The harness runs
//! inside the hub (so its clients and proxies reach every server); a partition is a
//! blackhole route inside a server's namespace. Nothing outside these namespaces is
//! touched, and dropping [`Namespaces`] deletes them.

use std::process::Command;

/// The address of server `id` inside its namespace.
pub fn server_ip(id: u64) -> String {
    format!("203.0.113.1{id}")
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Cuts (or heals) the link from server `from` to server `to`, one direction.
pub fn blackhole(prefix: &str, from: u64, to: u64, cut: bool) -> anyhow::Result<()> {
    let ns = format!("{prefix}-s{from}");
    let dst = format!("{}/32", server_ip(to));
    ip(&[
        "-n",
        &ns,
        "route",
        if cut { "add" } else { "del" },
        "blackhole",
        &dst,
    ])
}

/// The namespaces of one run; deleted on drop.
pub struct Namespaces {
    pub prefix: String,
    servers: u64,
}

impl Namespaces {
    pub fn create(prefix: &str, servers: u64) -> anyhow::Result<Namespaces> {
        let ns = Namespaces {
            prefix: prefix.to_string(),
            servers,
        };
        let hub = ns.hub();
        ip(&["netns", "add", &hub])?;
        ip(&["-n", &hub, "link", "set", "lo", "up"])?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "addr", "add", "203.0.113.1/24", "dev", "br0"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        for id in 1..=servers {
            let s = format!("{prefix}-s{id}");
            let veth = format!("v{id}");
            ip(&["netns", "add", &s])?;
            ip(&["-n", &s, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", &hub, "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns",
                &s,
            ])?;
            ip(&["-n", &hub, "link", "set", &veth, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &veth, "up"])?;
            let addr = format!("{}/24", server_ip(id));
            ip(&["-n", &s, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &s, "link", "set", "eth0", "up"])?;
        }
        Ok(ns)
    }

    pub fn hub(&self) -> String {
        format!("{}-hub", self.prefix)
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for id in 1..=self.servers {
            let _ = ip(&["netns", "del", &format!("{}-s{id}", self.prefix)]);
        }
        let _ = ip(&["netns", "del", &self.hub()]);
    }
}
