//! The nemesis harness: a real 3-server cluster, several client processes (each
//! dialing the servers through its own proxies), and a seeded fault schedule of
//! kill -9 / restart of servers (the leader more often), SIGSTOP/SIGCONT of servers
//! and clients, client partitions, client kills, full-cluster restarts and zombies (a
//! client stopped or cut off until the leader reports its node expired, then resumed
//! while a slow fence agent runs, sending requests with its old session) and wiped
//! followers (restarted without their data: they must refuse to start). Every node
//! is fenced by a test agent that kills the node's current client process and records
//! the fence time. At the end the harness heals everything, stops the clients, reads
//! the leader's lock table into the history and runs the checker.
//!
//! Server-from-server partitions are injected only with `Options::netns` (network
//! namespaces, root); the default schedule needs neither.

use super::checker::{check, Report};
use super::history::{self, now_us, FinalHold, Kind, Record, Writer};
use crate::{Cluster, Rng};
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::LocksRequest;
use lockd_server::config::FenceDeviceConfig;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub seed: u64,
    /// How long faults are injected (set-up and the final check come on top).
    pub duration: Duration,
    pub clients: usize,
    pub resources: u64,
    /// Start the servers with `LOCKD_UNSAFE_RELEASE_ON_EXPIRE=1`, which the test server
    /// binary honours: a broken lock manager the checker must catch.
    pub unsafe_release_on_expire: bool,
    /// Start the servers with `LOCKD_UNSAFE_ACCEPT_FROM_FENCING=1`: they apply the
    /// requests of nodes being fenced (issue 11's bug), which the checker must catch.
    pub unsafe_accept_from_fencing: bool,
    /// Weight of client SIGSTOPs in the schedule (the fault that expires sessions).
    pub client_stop_weight: u64,
    /// Weight of zombie faults in the schedule.
    pub zombie_weight: u64,
    /// Run each server in the network namespace `<prefix>-s<id>` and add server-from-
    /// server partitions to the schedule. The harness must itself run inside
    /// `<prefix>-hub` (see `netns`).
    pub netns: Option<String>,
}

impl Options {
    pub fn new(seed: u64, duration: Duration) -> Options {
        Options {
            seed,
            duration,
            clients: 5,
            resources: 4,
            unsafe_release_on_expire: false,
            unsafe_accept_from_fencing: false,
            client_stop_weight: 3,
            zombie_weight: 2,
            netns: None,
        }
    }
}

/// The outcome of a run: the checker's report and where the history is.
pub struct Outcome {
    pub report: Report,
    /// The history files. After a violation they are kept for study; otherwise they
    /// are deleted when the outcome is dropped.
    pub history_dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

impl Outcome {
    /// Deletes the run's directory even though it was kept (a test that expected the
    /// violations it found).
    pub fn remove(self) {
        if let Some(run_dir) = self.history_dir.parent() {
            let _ = std::fs::remove_dir_all(run_dir);
        }
    }
}

/// The test fence agent (fence-agents stdin protocol): kills the node's current client
/// process with SIGKILL, waits until it is dead (gone or a zombie), then appends the
/// fence record with that pid. Its `dir` parameter is the run's directory. A pid whose
/// process is already gone (or now runs something else) is recorded as dead as is.
/// While the file `slow/<node>` exists in the run's directory it first sleeps 2.5 s,
/// as IPMI or storage agents take seconds: the node lives on meanwhile.
const AGENT: &str = r#"#!/bin/sh
input=$(cat)
get() { printf '%s\n' "$input" | sed -n "s/^$1=//p" | head -n 1; }
node=$(get nodename)
dir=$(get dir)
[ -e "$dir/slow/$node" ] && sleep 2.5
pid=$(cat "$dir/pids/$node" 2>/dev/null)
# Only ever kill this node's client process: a reaped client's pid may be reused.
if [ -n "$pid" ] && ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q "lockd-nemesis-client run [^ ]* $node "; then
  pid_dead=$pid
  pid=""
fi
if [ -n "$pid" ]; then
  kill -9 "$pid" 2>/dev/null
  i=0
  while [ -e "/proc/$pid" ] && [ "$(cut -d' ' -f3 "/proc/$pid/stat" 2>/dev/null)" != Z ]; do
    i=$((i + 1))
    [ "$i" -gt 500 ] && { echo "process $pid survived SIGKILL" >&2; exit 1; }
    sleep 0.01
  done
fi
printf '{"t":%s,"k":"fence","node":"%s","pid":%s}\n' "$(date +%s%6N)" "$node" "${pid:-${pid_dead:-0}}" >> "$dir/history/fence.jsonl"
exit 0
"#;

/// A loopback TCP proxy that can be cut (live connections dropped, new ones refused)
/// and healed again.
pub struct Gate {
    pub addr: String,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Gate {
    pub async fn start(target: String) -> Gate {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind gate");
        let addr = listener.local_addr().expect("gate addr").to_string();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::new(Mutex::new(Vec::new()));
        let (cut2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    continue;
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut conns = conns2.lock().expect("gate conns");
                conns.retain(|t| !t.is_finished());
                conns.push(task);
            }
        });
        Gate {
            addr,
            cut,
            conns,
            accept,
        }
    }

    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.conns.lock().expect("gate conns").drain(..) {
            task.abort();
        }
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

struct NodeSlot {
    node: String,
    gates: Vec<Gate>,
    incarnation: u32,
    child: Option<Child>,
    /// Name of the current (or last) client process.
    client: String,
}

struct Nemesis {
    opts: Options,
    rng: Rng,
    cluster: Cluster,
    dir: PathBuf,
    log: Writer,
    nodes: Vec<NodeSlot>,
    /// Per server (index id-1): killed, stopped.
    down: Vec<bool>,
    stopped: Vec<bool>,
    last_respawn_check: Instant,
    /// Server links cut by blackhole routes (from, to).
    cut_links: Vec<(u64, u64)>,
}

/// A run that ends early (an error, a panic, the runner's SIGTERM dropping it) kills
/// its client processes; its servers go with `Cluster`'s own drop.
impl Drop for Nemesis {
    fn drop(&mut self) {
        for slot in &mut self.nodes {
            if let Some(mut child) = slot.child.take() {
                // SIGKILL ends a stopped process too.
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn client_binary() -> PathBuf {
    crate::server_binary().with_file_name("lockd-nemesis-client")
}

impl Nemesis {
    fn record(&mut self, r: Record) {
        self.log.append(&r).expect("write harness history");
    }

    /// Records a fault and its target ("server 2", a client's name, "all servers").
    fn fault(&mut self, what: &str, target: &str) {
        self.record(Record::new(now_us(), Kind::Fault).what(what).node(target));
    }

    fn spawn_client(&mut self, i: usize) {
        let slot = &mut self.nodes[i];
        slot.incarnation += 1;
        slot.client = format!("{}.{}", slot.node, slot.incarnation);
        for g in &slot.gates {
            g.heal();
        }
        let servers: Vec<String> = slot.gates.iter().map(|g| g.addr.clone()).collect();
        let seed = self.rng.next_u64();
        let child = Command::new(client_binary())
            .arg("run")
            .arg(servers.join(","))
            .arg(&slot.node)
            .arg(&slot.client)
            .arg(
                self.dir
                    .join("history")
                    .join(format!("{}.jsonl", slot.client)),
            )
            .arg(seed.to_string())
            .arg(self.dir.join("stop"))
            .arg(self.opts.resources.to_string())
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn lockd-nemesis-client");
        let pid = child.id();
        std::fs::write(self.dir.join("pids").join(&slot.node), pid.to_string())
            .expect("write pid file");
        slot.child = Some(child);
        let r = Record::new(now_us(), Kind::Start)
            .client(&self.nodes[i].client.clone())
            .node(&self.nodes[i].node.clone())
            .pid(pid);
        self.record(r);
    }

    fn kill_client(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let pid = child.id();
            let _ = child.kill();
            let _ = child.wait();
            self.record(Record::new(now_us(), Kind::Kill).pid(pid));
        }
    }

    fn signal_client(&self, i: usize, signal: &str) {
        if let Some(child) = &self.nodes[i].child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    async fn leader(&self) -> Option<u64> {
        for id in self.cluster.ids() {
            let i = (id - 1) as usize;
            if self.down[i] || self.stopped[i] {
                continue;
            }
            if let Some(s) = self.cluster.status(id).await {
                if s.role == "leader" {
                    return Some(id);
                }
            }
        }
        None
    }

    /// Reaps dead clients and starts a fresh process for a node once its previous
    /// session is fenced (or gone), so the new one can log in.
    async fn supervise(&mut self) {
        let mut dead = Vec::new();
        for (i, slot) in self.nodes.iter_mut().enumerate() {
            if let Some(child) = slot.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    slot.child = None;
                }
            }
            if slot.child.is_none() {
                dead.push(i);
            }
        }
        if dead.is_empty() || self.last_respawn_check.elapsed() < Duration::from_millis(300) {
            return;
        }
        self.last_respawn_check = Instant::now();
        let Some(leader) = self.leader().await else {
            return;
        };
        let Some(status) = self.cluster.status(leader).await else {
            return;
        };
        for i in dead {
            let node = &self.nodes[i].node;
            // Waiting for expiry, fence, or still logged in: not yet.
            let busy = status.nodes.iter().any(|n| {
                n.name == *node
                    && matches!(
                        lockd_proto::v1::NodeState::try_from(n.state),
                        Ok(lockd_proto::v1::NodeState::Expired
                            | lockd_proto::v1::NodeState::Fencing
                            | lockd_proto::v1::NodeState::LoggedIn
                            | lockd_proto::v1::NodeState::WasLoggedIn)
                    )
            });
            if !busy {
                self.spawn_client(i);
            }
        }
    }

    /// Waits `d` while supervising the clients.
    async fn pause(&mut self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.supervise().await;
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
        }
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.rng.below(hi - lo))
    }

    fn pick_server(&mut self, leader: Option<u64>, want_leader: bool) -> u64 {
        let n = self.cluster.ids().len() as u64;
        match leader {
            Some(l) if want_leader => l,
            Some(l) => {
                let others: Vec<u64> = self.cluster.ids().into_iter().filter(|x| *x != l).collect();
                others[self.rng.below(others.len() as u64) as usize]
            }
            None => 1 + self.rng.below(n),
        }
    }

    async fn one_fault(&mut self) {
        let partitions = if self.opts.netns.is_some() { 4 } else { 0 };
        let weights: [(u64, &str); 12] = [
            (self.opts.zombie_weight, "zombie-client"),
            (1, "wipe-follower"),
            (partitions, "partition-leader"),
            (partitions / 2, "partition-link"),
            (3, "kill-leader"),
            (1, "kill-follower"),
            (2, "stop-leader"),
            (1, "stop-follower"),
            (self.opts.client_stop_weight, "stop-client"),
            (2, "partition-client"),
            (1, "kill-client"),
            (1, "restart-cluster"),
        ];
        let total: u64 = weights.iter().map(|w| w.0).sum();
        let mut roll = self.rng.below(total);
        let mut what = weights[0].1;
        for (w, name) in weights {
            if roll < w {
                what = name;
                break;
            }
            roll -= w;
        }
        let leader = self.leader().await;
        match what {
            "partition-leader" | "partition-link" => {
                let a = self.pick_server(leader, what == "partition-leader");
                let others: Vec<u64> = self.cluster.ids().into_iter().filter(|x| *x != a).collect();
                let cut: Vec<u64> = if what == "partition-leader" {
                    others
                } else {
                    vec![others[self.rng.below(others.len() as u64) as usize]]
                };
                self.fault(what, &format!("server {a} from {cut:?}"));
                for b in cut {
                    self.cut_link(a, b);
                    self.cut_link(b, a);
                }
                let d = self.ms(500, 4_000);
                self.pause(d).await;
                self.heal_links();
            }
            "kill-leader" | "kill-follower" => {
                let id = self.pick_server(leader, what == "kill-leader");
                self.fault(what, &format!("server {id}"));
                self.cluster.kill(id);
                self.down[(id - 1) as usize] = true;
                let d = self.ms(300, 2_000);
                self.pause(d).await;
                self.cluster.start_server(id);
                self.down[(id - 1) as usize] = false;
            }
            "stop-leader" | "stop-follower" => {
                let id = self.pick_server(leader, what == "stop-leader");
                self.fault(what, &format!("server {id}"));
                self.cluster.signal(id, "STOP");
                self.stopped[(id - 1) as usize] = true;
                let d = self.ms(300, 3_000);
                self.pause(d).await;
                self.cluster.signal(id, "CONT");
                self.stopped[(id - 1) as usize] = false;
            }
            "zombie-client" => {
                self.zombie().await;
            }
            "wipe-follower" => {
                let id = self.pick_server(leader, false);
                self.fault(what, &format!("server {id}"));
                self.wipe_and_refuse(id).await;
            }
            "stop-client" | "partition-client" | "kill-client" => {
                let live: Vec<usize> = (0..self.nodes.len())
                    .filter(|i| self.nodes[*i].child.is_some())
                    .collect();
                if live.is_empty() {
                    return;
                }
                let i = live[self.rng.below(live.len() as u64) as usize];
                let target = self.nodes[i].client.clone();
                self.fault(what, &target);
                let d = self.ms(200, 3_000);
                match what {
                    "stop-client" => {
                        self.signal_client(i, "STOP");
                        self.pause(d).await;
                        self.signal_client(i, "CONT");
                    }
                    "partition-client" => {
                        for g in &self.nodes[i].gates {
                            g.cut();
                        }
                        self.pause(d).await;
                        for g in &self.nodes[i].gates {
                            g.heal();
                        }
                    }
                    _ => self.kill_client(i),
                }
            }
            _ => {
                self.fault("restart-cluster", "all servers");
                for id in self.cluster.ids() {
                    self.cluster.signal(id, "CONT");
                    self.cluster.kill(id);
                }
                let d = self.ms(200, 1_500);
                self.pause(d).await;
                for id in self.cluster.ids() {
                    self.cluster.start_server(id);
                    self.down[(id - 1) as usize] = false;
                    self.stopped[(id - 1) as usize] = false;
                }
            }
        }
        let quiet = self.ms(200, 1_500);
        self.pause(quiet).await;
    }

    /// A zombie: a live client is told to carry on after losing its session
    /// (SIGUSR1), its node's fence agent is made slow, and the client is stopped or cut
    /// off until the leader reports the node expired or being fenced (recorded as
    /// `expired`); then it is resumed while its fence runs and keeps sending requests
    /// with its old session until the agent kills it.
    /// Returns whether it ran (no logged-in client: nothing to do).
    async fn zombie(&mut self) -> bool {
        // A client whose node is logged in (a fresh process may not be yet).
        let logged_in = self.logged_in_nodes().await;
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].child.is_some() && logged_in.contains(&self.nodes[*i].node))
            .collect();
        if live.is_empty() {
            return false;
        }
        let i = live[self.rng.below(live.len() as u64) as usize];
        let (client, node) = (self.nodes[i].client.clone(), self.nodes[i].node.clone());
        let cut = self.rng.below(2) == 0;
        self.fault(
            if cut {
                "zombie-client (cut off)"
            } else {
                "zombie-client (stopped)"
            },
            &client,
        );
        let slow = self.dir.join("slow").join(&node);
        std::fs::write(&slow, b"").expect("write the slow-agent marker");
        self.signal_client(i, "USR1");
        if cut {
            self.nodes[i].gates.iter().for_each(Gate::cut);
        } else {
            self.signal_client(i, "STOP");
        }
        let deadline = Instant::now() + Duration::from_secs(8);
        let mut expired = false;
        while !expired && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            expired = self.node_failed(&node).await;
        }
        if expired {
            let r = Record::new(now_us(), Kind::Expired)
                .client(&client)
                .node(&node);
            self.record(r);
        }
        if cut {
            self.nodes[i].gates.iter().for_each(Gate::heal);
        } else {
            self.signal_client(i, "CONT");
        }
        // The zombie acts while its fence runs (2.5 s) and until the agent kills it.
        let d = self.ms(2_000, 4_000);
        self.pause(d).await;
        let _ = std::fs::remove_file(&slow);
        true
    }

    /// A server loses its disk: killed, its data directory moved away, started again as
    /// it was. It must refuse to start (issue 12: a member without its log never votes
    /// as if new); a server that runs panics the run. Then its data comes back, as a
    /// repaired disk would, and it rejoins.
    async fn wipe_and_refuse(&mut self, id: u64) {
        let i = (id - 1) as usize;
        self.cluster.signal(id, "CONT");
        self.cluster.kill(id);
        self.down[i] = true;
        let dir = self.cluster.config.server_dir(id);
        let aside = self.dir.join(format!("aside-server-{id}"));
        std::fs::rename(&dir, &aside).expect("move the data directory aside");
        self.cluster.start_server(id);
        let status = self.cluster.wait_exit(id, Duration::from_secs(20)).await;
        assert!(
            !status.success(),
            "server {id} started with a wiped data directory: {status:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&aside, &dir).expect("put the data directory back");
        let d = self.ms(200, 1_000);
        self.pause(d).await;
        self.cluster.start_server(id);
        self.down[i] = false;
        self.stopped[i] = false;
    }

    /// The nodes the leader reports logged in.
    async fn logged_in_nodes(&self) -> Vec<String> {
        use lockd_proto::v1::NodeState;
        let Some(leader) = self.leader().await else {
            return Vec::new();
        };
        let Some(status) = self.cluster.status(leader).await else {
            return Vec::new();
        };
        status
            .nodes
            .into_iter()
            .filter(|n| n.state == NodeState::LoggedIn as i32)
            .map(|n| n.name)
            .collect()
    }

    /// Whether the leader reports `node` expired or being fenced.
    async fn node_failed(&self, node: &str) -> bool {
        use lockd_proto::v1::NodeState;
        let Some(leader) = self.leader().await else {
            return false;
        };
        let Some(status) = self.cluster.status(leader).await else {
            return false;
        };
        status.nodes.iter().any(|n| {
            n.name == node
                && matches!(
                    NodeState::try_from(n.state),
                    Ok(NodeState::Expired | NodeState::Fencing)
                )
        })
    }

    fn cut_link(&mut self, from: u64, to: u64) {
        if let Some(prefix) = &self.opts.netns {
            match super::netns::blackhole(prefix, from, to, true) {
                Ok(()) => self.cut_links.push((from, to)),
                Err(e) => eprintln!("nemesis: cannot cut {from}->{to}: {e}"),
            }
        }
    }

    fn heal_links(&mut self) {
        if let Some(prefix) = &self.opts.netns {
            for (from, to) in self.cut_links.drain(..) {
                if let Err(e) = super::netns::blackhole(prefix, from, to, false) {
                    eprintln!("nemesis: cannot heal {from}->{to}: {e}");
                }
            }
        }
    }

    /// Heals every fault, stops the clients and records the leader's lock table.
    async fn finish(&mut self) -> anyhow::Result<()> {
        self.heal_links();
        for id in self.cluster.ids() {
            let i = (id - 1) as usize;
            if self.down[i] {
                self.cluster.start_server(id);
                self.down[i] = false;
            }
            self.cluster.signal(id, "CONT");
            self.stopped[i] = false;
        }
        for i in 0..self.nodes.len() {
            self.signal_client(i, "CONT");
            for g in &self.nodes[i].gates {
                g.heal();
            }
        }
        std::fs::write(self.dir.join("stop"), b"stop")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Reap only: a fresh process would only see the stop file and leave.
            for slot in &mut self.nodes {
                if let Some(child) = slot.child.as_mut() {
                    if let Ok(Some(_)) = child.try_wait() {
                        slot.child = None;
                    }
                }
            }
            let records = history::read_dir(&self.dir.join("history"))?;
            let settled = self.nodes.iter().all(|slot| {
                slot.child.is_none()
                    || records
                        .iter()
                        .any(|r| r.c == slot.client && r.k == Kind::Stopped)
            });
            if settled {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "clients did not stop within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let leader = crate::poll(
            Duration::from_secs(60),
            "a leader after healing",
            || async { self.leader().await },
        )
        .await;
        let mut admin =
            AdminServiceClient::connect(format!("http://{}", self.cluster.addr(leader))).await?;
        let reply = admin
            .locks(LocksRequest {
                lockspace: "nemesis".into(),
                resource: Vec::new(),
                limit: 10_000,
            })
            .await?
            .into_inner();
        let mut held = Vec::new();
        for r in reply.resources {
            for l in r.locks.iter().filter(|l| l.queue == "holder") {
                held.push(FinalHold {
                    session: l.session,
                    node: l.node.clone(),
                    res: String::from_utf8_lossy(&r.resource).into_owned(),
                    mode: lockd_client::Mode::from_proto(l.granted)
                        .map_or_else(|| "?".to_string(), |m| m.as_str().to_string()),
                    token: l.token,
                });
            }
        }
        let mut fin = Record::new(now_us(), Kind::Final).what(&format!("leader {leader}"));
        fin.held = held;
        self.record(fin);
        for i in 0..self.nodes.len() {
            if let Some(mut child) = self.nodes[i].child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        Ok(())
    }
}

fn write_agent(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("fence_nemesis");
    std::fs::write(&path, AGENT).expect("write agent");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod agent");
    path
}

/// Runs one schedule and checks its history.
pub async fn run(opts: Options) -> anyhow::Result<Outcome> {
    let tmp = tempfile::Builder::new()
        .prefix("lockd-nemesis-")
        .tempdir()?;
    let dir = tmp.path().to_owned();
    std::fs::create_dir_all(dir.join("history"))?;
    std::fs::create_dir_all(dir.join("pids"))?;
    std::fs::create_dir_all(dir.join("slow"))?;
    let agent = write_agent(&dir);
    let mut env: Vec<(&str, &str)> = Vec::new();
    if opts.unsafe_release_on_expire {
        env.push(("LOCKD_UNSAFE_RELEASE_ON_EXPIRE", "1"));
    }
    if opts.unsafe_accept_from_fencing {
        env.push(("LOCKD_UNSAFE_ACCEPT_FROM_FENCING", "1"));
    }
    let netns = opts.netns.clone();
    let tune = |c: &mut lockd_server::config::Config| {
        if netns.is_some() {
            for s in &mut c.servers {
                let ip = super::netns::server_ip(s.id);
                s.addr = format!("{ip}:7100");
                s.metrics_addr = Some(format!("{ip}:7200"));
            }
        }
        // A 1.2 s expiry window: a 0.2-3 s pause or partition often expires a node.
        c.liveness.heartbeat_interval_ms = 400;
        c.liveness.allowed_misses = 3;
        c.fencing.retry_backoff_ms = 200;
        for n in &mut c.nodes {
            let mut params = BTreeMap::new();
            params.insert("dir".to_string(), dir.display().to_string());
            n.fence = vec![FenceDeviceConfig {
                level: 1,
                agent: agent.clone(),
                action: Default::default(),
                unfence: false,
                timeout_ms: 10_000,
                params,
            }];
        }
    };
    let cluster = match &opts.netns {
        Some(prefix) => Cluster::start_in_netns(3, prefix, &env, tune),
        None => Cluster::start_with_env(3, &env, tune),
    };
    cluster.wait_leader(Duration::from_secs(30)).await;
    let mut nodes = Vec::new();
    for i in 0..opts.clients {
        let mut gates = Vec::new();
        for addr in cluster.endpoints() {
            gates.push(Gate::start(addr).await);
        }
        nodes.push(NodeSlot {
            node: format!("node{}", i + 1),
            gates,
            incarnation: 0,
            child: None,
            client: String::new(),
        });
    }
    let mut nem = Nemesis {
        rng: Rng::new(opts.seed),
        log: Writer::open(&dir.join("history").join("harness.jsonl"))?,
        opts: opts.clone(),
        cluster,
        dir: dir.clone(),
        nodes,
        down: vec![false; 3],
        stopped: vec![false; 3],
        last_respawn_check: Instant::now(),
        cut_links: Vec::new(),
    };
    for i in 0..opts.clients {
        nem.spawn_client(i);
    }
    let end = Instant::now() + opts.duration;
    // Every run starts with the two faults of issue 11 and 12 (a zombie, a wiped
    // follower), then draws from the whole schedule.
    if opts.zombie_weight > 0 {
        let until = Instant::now() + Duration::from_secs(20);
        while !nem.zombie().await && Instant::now() < until {
            nem.pause(Duration::from_millis(200)).await;
        }
    }
    let leader = nem.leader().await;
    let follower = nem.pick_server(leader, false);
    nem.fault("wipe-follower", &format!("server {follower}"));
    nem.wipe_and_refuse(follower).await;
    while Instant::now() < end {
        nem.one_fault().await;
    }
    let finished = nem.finish().await;
    let records = history::read_dir(&dir.join("history"))?;
    drop(nem);
    finished?;
    let report = check(&records);
    let keep = !report.violations.is_empty();
    Ok(Outcome {
        report,
        history_dir: dir.join("history"),
        _dir: if keep {
            let _ = tmp.keep();
            None
        } else {
            Some(tmp)
        },
    })
}
