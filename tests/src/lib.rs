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

/// Path of the server binary built by this package. Cargo builds a package's binaries
/// before its integration tests and puts them in the directory above the tests'
/// `deps/`, which is where the running test executable lives.
pub fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
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

/// A free loopback port (the OS picks; the tiny race with other processes is accepted).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub config: Config,
    config_path: PathBuf,
    children: Vec<Option<Child>>,
}

impl Cluster {
    /// Starts `n` servers with the default timings.
    pub fn start(n: u64) -> Cluster {
        Cluster::start_with(n, |_| {})
    }

    /// Starts `n` servers after `tune` adjusts the config.
    pub fn start_with(n: u64, tune: impl FnOnce(&mut Config)) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("lockd-test-")
            .tempdir()
            .expect("temp dir");
        let mut config = Config::dev(n, 0, dir.path().to_owned());
        for s in &mut config.servers {
            s.addr = format!("127.0.0.1:{}", free_port());
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
        };
        for id in 1..=n {
            cluster.start_server(id);
        }
        cluster
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

    pub fn endpoints(&self) -> Vec<String> {
        self.config.servers.iter().map(|s| s.addr.clone()).collect()
    }

    /// Starts server `id` (again), appending its log to `server-<id>.log`.
    pub fn start_server(&mut self, id: u64) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("server-{id}.log")))
            .expect("open server log");
        let child = Command::new(server_binary())
            .arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--id")
            .arg(id.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn lockd");
        self.children[(id - 1) as usize] = Some(child);
    }

    /// kill -9.
    pub fn kill(&mut self, id: u64) {
        if let Some(mut child) = self.children[(id - 1) as usize].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
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
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{}", self.addr(id)))
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
