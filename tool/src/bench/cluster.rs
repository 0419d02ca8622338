//! The servers under test as processes: their Raft status (AdminService.Status), their
//! pids, resident memory and CPU time (from /proc), and the kill of w5.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::{StatusReply, StatusRequest};
use tonic::transport::Endpoint;

/// Linux's USER_HZ: the unit of utime/stime in /proc/<pid>/stat (100 on every
/// architecture this runs on).
const CLOCK_TICKS_PER_S: u64 = 100;

/// The cluster's servers, in the order of `--servers`, with their pids where known.
pub struct Servers {
    pub addrs: Vec<String>,
    pub pids: Vec<Option<u32>>,
}

impl Servers {
    /// Takes the pids from `--pids` (same order as the addresses) or looks each server
    /// up by the process that listens on its port.
    pub fn new(addrs: Vec<String>, pids: &[u32]) -> anyhow::Result<Servers> {
        let pids = if pids.is_empty() {
            addrs.iter().map(|a| pid_listening_on(a)).collect()
        } else if pids.len() == addrs.len() {
            pids.iter().map(|p| Some(*p)).collect()
        } else {
            bail!(
                "--pids lists {} pids for {} servers; give one per server, in the order of --servers",
                pids.len(),
                addrs.len()
            );
        };
        Ok(Servers { addrs, pids })
    }

    /// True when every server's pid is known.
    pub fn all_pids_known(&self) -> bool {
        self.pids.iter().all(Option::is_some)
    }

    /// Each server's Status, asked of all at once; `None` for a server that did not answer
    /// within a second.
    pub async fn status_all(&self) -> Vec<Option<StatusReply>> {
        let asks: Vec<_> = self
            .addrs
            .iter()
            .map(|a| {
                let a = a.clone();
                tokio::spawn(async move { status(&a).await })
            })
            .collect();
        let mut out = Vec::with_capacity(asks.len());
        for ask in asks {
            out.push(ask.await.ok().flatten());
        }
        out
    }

    /// The index (in `addrs`) and status of the server that says it is the leader with
    /// the highest term.
    pub async fn leader(&self) -> Option<(usize, StatusReply)> {
        self.status_all()
            .await
            .into_iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
            .filter(|(_, s)| s.role == "leader")
            .max_by_key(|(_, s)| s.term)
    }

    /// Waits until some server is the leader.
    pub async fn wait_for_leader(&self, within: Duration) -> anyhow::Result<(usize, StatusReply)> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                bail!(
                    "no server of {} is the leader after {} s",
                    self.addrs.join(","),
                    within.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every reachable server applied everything the leader committed (so a
    /// memory reading sees the whole table on the followers too), at most `within`.
    pub async fn wait_applied(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let all = self.status_all().await;
            let commit = all.iter().flatten().map(|s| s.commit_index).max();
            let caught_up = commit.is_some_and(|c| {
                all.iter()
                    .flatten()
                    .all(|s| s.applied_index >= c && s.commit_index >= c)
            });
            if caught_up {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Each server's resident memory in KiB (None: pid unknown or gone).
    pub fn rss_kib(&self) -> Vec<Option<u64>> {
        self.pids.iter().map(|p| p.and_then(rss_kib)).collect()
    }

    /// Each server's CPU time so far.
    pub fn cpu(&self) -> Vec<Option<Duration>> {
        self.pids.iter().map(|p| p.and_then(cpu_time)).collect()
    }

    /// Sends SIGKILL to server `i`.
    pub fn kill9(&self, i: usize) -> anyhow::Result<u32> {
        let pid = self.pids[i].with_context(|| {
            format!(
                "the pid of server {} is unknown (pass --pids)",
                self.addrs[i]
            )
        })?;
        let status = std::process::Command::new("kill")
            .arg("-9")
            .arg(pid.to_string())
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -9 {pid} failed: {status}");
        }
        Ok(pid)
    }
}

async fn status(addr: &str) -> Option<StatusReply> {
    let ask = async {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500));
        let channel = endpoint.connect().await.ok()?;
        let mut client = AdminServiceClient::new(channel);
        client
            .status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    };
    tokio::time::timeout(Duration::from_secs(1), ask)
        .await
        .ok()
        .flatten()
}

/// VmRSS of a process, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// User plus system CPU time of a process.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_cpu_ticks(&stat).map(|t| Duration::from_millis(t * 1000 / CLOCK_TICKS_PER_S))
}

/// The whole machine's busy and total time, in clock ticks summed over all cores, from
/// the first line of /proc/stat (busy = everything but idle and iowait).
pub fn host_cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// The number of cores (for the machine-wide CPU percentage).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// Our own CPU time.
pub fn own_cpu_time() -> Option<Duration> {
    cpu_time(std::process::id())
}

/// utime + stime from a /proc/<pid>/stat line. The command name (field 2) may contain
/// spaces and parentheses, so fields are counted after its closing parenthesis.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// The pid of the process listening on `addr` (ip:port), found through the socket's
/// inode in /proc/net/tcp{,6} and the processes' open file descriptors.
fn pid_listening_on(addr: &str) -> Option<u32> {
    let port: u16 = addr.rsplit_once(':')?.1.parse().ok()?;
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(listening_inodes(&text, port));
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if wanted.iter().any(|w| target.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Inodes of the sockets in LISTEN state (st 0A) on `port` in a /proc/net/tcp table.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    let want = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = *f.get(1)?;
            let state = *f.get(3)?;
            (local.ends_with(&want) && state == "0A")
                .then(|| f.get(9)?.parse().ok())
                .flatten()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15() {
        let stat = "4242 (lockd (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 31 0 0 20 0 9 0 1234 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(281));
    }

    #[test]
    fn listening_sockets_are_found_by_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
           0: 0100007F:1BBD 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5551 1 0 100 0 0 10 0\n\
           1: 0100007F:1BBD 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 5552 1 0 100 0 0 10 0\n\
           2: 0100007F:1BBE 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5553 1 0 100 0 0 10 0\n";
        assert_eq!(listening_inodes(table, 7101), vec![5551]);
        assert_eq!(listening_inodes(table, 7102), vec![5553]);
        assert!(listening_inodes(table, 7103).is_empty());
    }

    #[test]
    fn own_process_is_readable() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
        assert!(own_cpu_time().is_some());
        let (busy, total) = host_cpu_ticks().unwrap();
        assert!(busy <= total);
    }
}
