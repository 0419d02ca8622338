//! A harness for multi-process tests: starts real lock servers as separate processes on
//! loopback ports, kills (-9), restarts and inspects them. Tests poll with deadlines;
//! nothing here sleeps for a fixed time to "let things settle".
//!
//! Every address used is on 127.0.0.1.

use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::{StatusReply, StatusRequest};
use lockd_server::config::Config;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod nemesis;

/// Path of the server binary built by this package. Cargo builds a package's binaries
/// before its integration tests and puts them in the directory above the tests'
/// `deps/`, which is where the running test executable lives.
/// A binary of this package (the `nemesis` runner) lives beside it instead.
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let beside = exe.with_file_name("lockd-under-test");
    if beside.exists() {
        return beside;
    }
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable inside target/<profile>/deps");
    let bin = dir.join("lockd-under-test");
    assert!(
        bin.exists(),
        "{} is missing: run the tests through cargo (cargo test -p lockd-tests)",
        bin.display()
    );
    bin
}

/// The `lockctl` binary, built by the same `cargo test --workspace`.
pub fn lockctl_binary() -> PathBuf {
    let bin = server_binary().with_file_name("lockctl");
    assert!(
        bin.exists(),
        "{} is missing: run the README's test command (cargo test --workspace)",
        bin.display()
    );
    bin
}

/// Runs the server binary's `ARGS` (`restore`, `recover`, `snapshot inspect`: the
/// commands that do not serve) and returns its output; fails the test after 90 s.
pub async fn lockd(args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(server_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output();
    tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("lockd finished in time")
        .expect("lockd ran")
}

/// Runs `lockctl ARGS` and returns its output; fails the test if it takes over 90 s.
pub async fn lockctl(args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(lockctl_binary())
        .args(args)
        .output();
    tokio::time::timeout(Duration::from_secs(90), run)
        .await
        .expect("lockctl finished in time")
        .expect("lockctl ran")
}

/// A command's stdout then stderr, as text.
pub fn output_text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `n` distinct free loopback ports for servers to listen on.
///
/// A port found free here is released before the server binds it, so two rules keep
/// anyone else from taking it in between:
/// - ports come from outside the kernel's ephemeral range
///   (`/proc/sys/net/ipv4/ip_local_port_range`), which outgoing connections and
///   `bind(…:0)` draw from, so no client or peer connection of a running test gets one
///   as its local port (where that range leaves no room, from `bind(127.0.0.1:0)`);
/// - this process never hands out a port twice, so concurrent tests of one test binary
///   cannot choose the same one.
///
/// The scan starts at a random point, so two test processes started together rarely
/// meet.
pub fn free_ports(n: usize) -> Vec<u16> {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|p| p.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let bind = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).ok();
    let mut held = Vec::with_capacity(n);
    match ports_outside_ephemeral() {
        Some((first, end)) => {
            let span = u32::from(end - first);
            let start = (RandomState::new().hash_one(std::process::id()) % u64::from(span)) as u32;
            let ports = (0..span).map(|step| first + ((start + step) % span) as u16);
            for port in ports.filter(|p| !handed_out.contains(p)) {
                if held.len() == n {
                    break;
                }
                held.extend(bind(port).map(|listener| (port, listener)));
            }
        }
        None => {
            // Every listener stays open until all are chosen: no port comes twice.
            for _ in 0..n + 1_000 {
                if held.len() == n {
                    break;
                }
                let Some(listener) = bind(0) else { continue };
                let Ok(port) = listener.local_addr().map(|a| a.port()) else {
                    continue;
                };
                if !handed_out.contains(&port) {
                    held.push((port, listener));
                }
            }
        }
    }
    assert_eq!(held.len(), n, "no {n} free loopback ports");
    held.into_iter()
        .map(|(port, _listener)| {
            handed_out.insert(port);
            port
        })
        .collect()
}

/// `first..end`, at least 1,000 ports outside the kernel's ephemeral range: from
/// 10000 up to its low end (Linux's default range is 32768–60999), else above its
/// high end; `None` where it leaves no such room.
fn ports_outside_ephemeral() -> Option<(u16, u16)> {
    const FIRST: u16 = 10_000;
    const ROOM: u16 = 1_000;
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = (range.iter())
        .flat_map(|s| s.split_whitespace())
        .map(|n| n.parse::<u16>().ok());
    let (low, high) = match (bounds.next(), bounds.next()) {
        (Some(Some(low)), Some(Some(high))) => (low, high),
        _ => (32_768, 60_999),
    };
    if low >= FIRST + ROOM {
        Some((FIRST, low))
    } else if high <= u16::MAX - ROOM {
        Some((high + 1, u16::MAX))
    } else {
        None
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: Config,
    config_path: PathBuf,
    children: Vec<Option<Child>>,
    /// How the harness itself reaches the servers (status polls): with TLS on, a
    /// certificate the servers accept.
    tls: Option<lockd_client::TlsOptions>,
    /// Environment given to every server start.
    env: Vec<(String, String)>,
    /// Prefix of the per-server network namespaces, if any.
    netns: Option<String>,
    /// Servers started at least once: the first start of each of the cluster's own
    /// servers gets `--bootstrap`, as an operator forms a new cluster; later starts
    /// (restarts, or a start after a test wiped the data) do not.
    started: std::collections::BTreeSet<u64>,
}

impl Cluster {
    /// Starts `n` servers with the default timings.
    pub fn start(n: u64) -> Cluster {
        Cluster::start_with(n, |_| {})
    }

    /// Starts `n` servers after `tune` adjusts the config.
    pub fn start_with(n: u64, tune: impl FnOnce(&mut Config)) -> Cluster {
        Cluster::start_full(n, &[], None, None, tune)
    }

    /// Like [`Cluster::start_with`]; the harness reaches the servers with `tls` (for a
    /// config whose `[tls]` section `tune` sets).
    pub fn start_with_tls(
        n: u64,
        tls: Option<lockd_client::TlsOptions>,
        tune: impl FnOnce(&mut Config),
    ) -> Cluster {
        Cluster::start_full(n, &[], None, tls, tune)
    }

    /// Like [`Cluster::start_with`]; every start of every server (restarts too) gets
    /// the environment variables `env`.
    pub fn start_with_env(n: u64, env: &[(&str, &str)], tune: impl FnOnce(&mut Config)) -> Cluster {
        Cluster::start_full(n, env, None, None, tune)
    }

    /// Like [`Cluster::start_with_env`], but server `id` runs in the network namespace
    /// `<netns>-s<id>` (made by the caller; `tune` must give the servers addresses
    /// there). Needs root.
    pub fn start_in_netns(
        n: u64,
        netns: &str,
        env: &[(&str, &str)],
        tune: impl FnOnce(&mut Config),
    ) -> Cluster {
        Cluster::start_full(n, env, Some(netns.to_string()), None, tune)
    }

    fn start_full(
        n: u64,
        env: &[(&str, &str)],
        netns: Option<String>,
        tls: Option<lockd_client::TlsOptions>,
        tune: impl FnOnce(&mut Config),
    ) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("lockd-test-")
            .tempdir()
            .expect("temp dir");
        let mut config = Config::dev(n, 0, dir.path().to_owned());
        let n_servers = config.servers.len();
        let ports = free_ports(2 * n_servers);
        for (i, s) in config.servers.iter_mut().enumerate() {
            s.addr = format!("127.0.0.1:{}", ports[i]);
            s.metrics_addr = Some(format!("127.0.0.1:{}", ports[n_servers + i]));
        }
        tune(&mut config);
        config.validate().expect("test config is valid");
        let config_path = dir.path().join("cluster.toml");
        std::fs::write(&config_path, config.to_toml()).expect("write config");
        let mut cluster = Cluster {
            dir,
            config,
            config_path,
            children: (0..n).map(|_| None).collect(),
            tls,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            netns,
            started: Default::default(),
        };
        for id in 1..=n {
            cluster.start_server(id);
        }
        cluster
    }

    /// The cluster's config file, as the servers read it.
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    pub fn ids(&self) -> Vec<u64> {
        self.config.servers.iter().map(|s| s.id).collect()
    }

    pub fn addr(&self, id: u64) -> String {
        self.config
            .server(id)
            .map(|s| s.addr.clone())
            .expect("known server id")
    }

    /// Server `id`'s metrics address (the harness gives every server one).
    pub fn metrics_addr(&self, id: u64) -> String {
        (self.config.server(id))
            .and_then(|s| s.metrics_addr.clone())
            .unwrap_or_else(|| panic!("server {id} has no metrics address"))
    }

    /// Logs `node` in through every server of the cluster.
    pub async fn connect(&self, node: &str) -> lockd_client::Client {
        lockd_client::Client::connect(lockd_client::ClientConfig::new(self.endpoints(), node))
            .await
            .unwrap_or_else(|e| panic!("{node} cannot log in: {e}"))
    }

    /// Runs `lockctl --servers <this cluster's servers> ARGS`.
    pub async fn lockctl(&self, args: &[&str]) -> std::process::Output {
        let servers = self.endpoints().join(",");
        let mut all = vec!["--servers", servers.as_str()];
        all.extend_from_slice(args);
        lockctl(&all).await
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.config.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// Starts server `id` (again), appending its log to `server-<id>.log`.
    pub fn start_server(&mut self, id: u64) {
        self.start_server_with_env(id, &[]);
    }

    /// Like [`Cluster::start_server`], with extra environment variables.
    pub fn start_server_with_env(&mut self, id: u64, env: &[(&str, &str)]) {
        self.spawn_server(id, &[], env);
    }

    /// Puts server `id` in the config file on a fresh loopback port, as an operator
    /// does before adding a server; returns its address. Running servers do not
    /// reread the file: they learn the address from the membership change.
    pub fn add_server_config(&mut self, id: u64) -> String {
        let ports = free_ports(1);
        let addr = format!("127.0.0.1:{}", ports[0]);
        self.config
            .servers
            .push(lockd_server::config::ServerConfig {
                id,
                addr: addr.clone(),
                metrics_addr: None,
            });
        std::fs::write(&self.config_path, self.config.to_toml()).expect("write config");
        addr
    }

    /// Starts server `id` with extra `lockd run` arguments (e.g. `--bootstrap` again,
    /// as an operator might by mistake).
    pub fn start_server_with_args(&mut self, id: u64, args: &[&str]) {
        self.spawn_server(id, args, &[]);
    }

    /// Starts server `id` with `--join`: it waits to be added (`lockctl server add`).
    pub fn start_joining_server(&mut self, id: u64) {
        self.spawn_server(id, &["--join"], &[]);
    }

    fn spawn_server(&mut self, id: u64, args: &[&str], env: &[(&str, &str)]) {
        let first = self.started.insert(id);
        let bootstrap: &[&str] = if first && args.is_empty() {
            &["--bootstrap"]
        } else {
            &[]
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("server-{id}.log")))
            .expect("open server log");
        let mut command = match &self.netns {
            // `ip netns exec` execs the server, so the child's pid is the server's.
            Some(prefix) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{prefix}-s{id}")])
                    .arg(server_binary());
                c
            }
            None => Command::new(server_binary()),
        };
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--id")
            .arg(id.to_string())
            .args(args)
            .args(bootstrap)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lockd");
        let slot = (id - 1) as usize;
        if self.children.len() <= slot {
            self.children.resize_with(slot + 1, || None);
        }
        self.children[slot] = Some(child);
    }

    /// The process id of server `id`, if this harness runs it.
    pub fn pid(&self, id: u64) -> Option<u32> {
        self.children
            .get((id - 1) as usize)
            .and_then(Option::as_ref)
            .map(Child::id)
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self
            .children
            .get_mut((id - 1) as usize)
            .and_then(Option::take)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits for server `id` to exit by itself and returns its exit status.
    pub async fn wait_exit(&mut self, id: u64, within: Duration) -> std::process::ExitStatus {
        let slot = (id - 1) as usize;
        let status = poll(within, "the server to exit", || {
            let status = self.children[slot]
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            async move { status }
        })
        .await;
        self.children[slot] = None;
        status
    }

    /// SIGSTOP / SIGCONT a server process.
    pub fn signal(&self, id: u64, signal: &str) {
        if let Some(child) = &self.children[(id - 1) as usize] {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    pub fn log(&self, id: u64) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("server-{id}.log")))
            .unwrap_or_default()
    }

    pub async fn status(&self, id: u64) -> Option<StatusReply> {
        let endpoint = lockd_client::endpoint(&self.addr(id), self.tls.as_ref())
            .ok()?
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_millis(500));
        let mut client = AdminServiceClient::new(endpoint.connect().await.ok()?);
        client
            .status(StatusRequest {})
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Waits for a server among the running ones to report itself leader.
    pub async fn wait_leader(&self, within: Duration) -> u64 {
        let running: Vec<u64> = self
            .ids()
            .into_iter()
            .filter(|id| self.children[(*id - 1) as usize].is_some())
            .collect();
        poll(within, "a leader", || async {
            for id in &running {
                if let Some(s) = self.status(*id).await {
                    if s.role == "leader" {
                        return Some(*id);
                    }
                }
            }
            None
        })
        .await
    }

    /// The leader's status once it satisfies `pred`.
    pub async fn wait_status(
        &self,
        within: Duration,
        what: &str,
        pred: impl Fn(&StatusReply) -> bool,
    ) -> StatusReply {
        poll(within, what, || async {
            for id in self.ids() {
                if let Some(s) = self.status(id).await {
                    if s.role == "leader" && pred(&s) {
                        return Some(s);
                    }
                }
            }
            None
        })
        .await
    }

    pub fn dump_logs(&self) {
        for id in self.ids() {
            eprintln!("----- server {id} log -----\n{}", self.log(id));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for id in self.ids() {
            self.kill(id);
        }
    }
}

/// GET /metrics with a minimal HTTP/1.0 request (loopback only): the response, head
/// and body.
pub async fn scrape_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics port");
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lockd\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

/// The value of the sample `series` (name and labels, exactly as exposed) in a
/// Prometheus text exposition; `None` when it is absent.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// Polls `probe` every 20 ms until it yields a value, panicking after `within`.
pub async fn poll<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Path of a binary built by this package (next to the server binary).
fn sibling_binary(name: &str) -> PathBuf {
    server_binary().with_file_name(name)
}

/// A node as its own process (`lockd-test-node`), whose stdout lines the test reads.
pub struct NodeProcess {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
}

impl NodeProcess {
    /// Starts a node that logs in as `node` and takes `mode` on `lockspace/resource`.
    pub fn start(
        servers: &[String],
        node: &str,
        lockspace: &str,
        resource: &str,
        mode: &str,
    ) -> NodeProcess {
        NodeProcess::spawn(&[&servers.join(","), node, lockspace, resource, mode])
    }

    /// Like [`NodeProcess::start`], opening the lockspace in explicit recovery mode.
    pub fn start_explicit(
        servers: &[String],
        node: &str,
        lockspace: &str,
        resource: &str,
        mode: &str,
    ) -> NodeProcess {
        NodeProcess::spawn(&[
            &servers.join(","),
            node,
            lockspace,
            resource,
            mode,
            "explicit",
        ])
    }

    fn spawn(args: &[&str]) -> NodeProcess {
        NodeProcess::spawn_binary("lockd-test-node", args)
    }

    /// Starts `binary` (a binary of this package) with `args`; its stdout lines are
    /// read with [`NodeProcess::expect_line`]. Killed (after a SIGCONT) on drop.
    pub fn spawn_binary(binary: &str, args: &[&str]) -> NodeProcess {
        let mut child = Command::new(sibling_binary(binary))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        NodeProcess { child, lines }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status();
    }

    /// Drops the stdout lines printed so far and not yet read.
    pub fn discard_pending_lines(&self) {
        while self.lines.try_recv().is_ok() {}
    }

    /// The next stdout line that starts with `prefix`, skipping others.
    pub fn expect_line(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => continue,
                Err(_) => panic!("node printed no `{prefix}` line within {within:?}"),
            }
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.signal("CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy on a loopback port that forwards to `target` until it is cut; then it
/// drops every connection and refuses new ones: a network partition between a client
/// and a server, without touching either process.
pub struct Proxy {
    pub addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (cut2, conns2) = (cut.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if cut2.load(Ordering::SeqCst) {
                    continue; // dropped: the partition refuses it
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns2.lock().expect("proxy conns").push(task);
            }
        });
        Proxy {
            addr,
            cut,
            conns,
            accept,
        }
    }

    /// Partitions: drops live connections, refuses new ones.
    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.conns.lock().expect("proxy conns").drain(..) {
            task.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// The wall clock in ms since the Unix epoch (the unit servers record times in).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Cluster {
    /// The leader's view of node `name`, once it exists and satisfies `pred`.
    pub async fn wait_node(
        &self,
        within: Duration,
        name: &str,
        pred: impl Fn(&lockd_proto::v1::NodeInfo) -> bool,
    ) -> lockd_proto::v1::NodeInfo {
        let what = format!("node {name} in the wanted state");
        let s = self
            .wait_status(within, &what, |s| {
                s.nodes.iter().any(|n| n.name == name && pred(n))
            })
            .await;
        s.nodes
            .into_iter()
            .find(|n| n.name == name)
            .expect("node present")
    }
}

/// splitmix64: a seeded, dependency-free generator for fault schedules and client
/// workloads; the same seed gives the same sequence of choices.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI failure this rule is for: a server's metrics port, chosen free, was taken
    /// by another test before the server bound it ("Address already in use").
    #[test]
    fn free_ports_stay_outside_the_ephemeral_range_and_are_never_handed_out_twice() {
        let range = ports_outside_ephemeral();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            for port in free_ports(4) {
                if let Some((first, end)) = range {
                    assert!((first..end).contains(&port), "port {port}");
                }
                assert!(seen.insert(port), "port {port} handed out twice");
            }
        }
    }
}
