//! Mutual TLS (BRIEF §3.5 security) with real server processes: certificates are made
//! here with rcgen, one cluster CA and a stranger CA. The rules under test: every
//! connection needs a certificate from the cluster CA; a node logs in only under its
//! certificate's CN and acts only for its own sessions; admin operations need
//! OU=lockd-admin; Raft traffic needs OU=lockd-server.

use lockd_client::{Client, ClientConfig, Error, LockOptions, LockspaceOptions, Mode, TlsOptions};
use lockd_proto::v1::admin_service_client::AdminServiceClient;
use lockd_proto::v1::lock_service_client::LockServiceClient;
use lockd_proto::v1::peer_service_client::PeerServiceClient;
use lockd_proto::v1::{
    pipeline_reply, pipeline_request, FenceAckRequest, ForceExpireRequest, HeartbeatRequest,
    LockRequest, LogoutRequest, PipelineRequest, RaftBatch, SetLogLevelRequest, ShutdownRequest,
};
use lockd_server::config::TlsConfig;
use lockd_tests::Cluster;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(15);

/// A certificate authority that signs test certificates.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A certificate and its key, PEM.
struct Issued {
    cert_pem: String,
    key_pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate with Subject CN=`cn` (and OU=`role` if given), valid for 127.0.0.1.
    fn issue(&self, cn: &str, role: Option<&str>) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some(role) = role {
            params
                .distinguished_name
                .push(DnType::OrganizationalUnitName, role);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

/// The cluster CA, certificates for servers 1..=n in `dir` (`server-{id}.pem`), and
/// the `[tls]` section pointing at them.
fn server_files(ca: &Ca, dir: &Path, n: u64) -> TlsConfig {
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    for id in 1..=n {
        let issued = ca.issue(&format!("lockd-server-{id}"), Some("lockd-server"));
        std::fs::write(dir.join(format!("server-{id}.pem")), issued.cert_pem).unwrap();
        std::fs::write(dir.join(format!("server-{id}.key")), issued.key_pem).unwrap();
    }
    TlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join("server-{id}.pem"),
        key: dir.join("server-{id}.key"),
    }
}

fn client_tls(ca: &Ca, issued: &Issued) -> TlsOptions {
    TlsOptions::new(ca.pem())
        .unwrap()
        .identity(issued.cert_pem.clone(), issued.key_pem.clone())
        .unwrap()
}

/// A TLS cluster of `n` servers; the harness polls it with an admin certificate.
fn start_tls_cluster(ca: &Ca, certs: &Path, n: u64) -> Cluster {
    let tls = server_files(ca, certs, n);
    let admin = client_tls(ca, &ca.issue("harness", Some("lockd-admin")));
    Cluster::start_with_tls(n, Some(admin), |c| c.tls = Some(tls))
}

fn node_config(cluster: &Cluster, node: &str, tls: Option<TlsOptions>) -> ClientConfig {
    ClientConfig {
        tls,
        // A refused connection is retried until this runs out; keep refusals quick.
        no_quorum_timeout: Duration::from_millis(1_500),
        ..ClientConfig::new(cluster.endpoints(), node)
    }
}

async fn admin_client(
    cluster: &Cluster,
    id: u64,
    tls: &TlsOptions,
) -> AdminServiceClient<tonic::transport::Channel> {
    let channel = lockd_client::endpoint(&cluster.addr(id), Some(tls))
        .unwrap()
        .connect()
        .await
        .expect("a certificate from the cluster CA is accepted");
    AdminServiceClient::new(channel)
}

fn assert_denied<T: std::fmt::Debug>(what: &str, outcome: Result<T, tonic::Status>) {
    let status = outcome.expect_err(what);
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    assert!(
        status
            .message()
            .contains("needs a certificate with OU=lockd-admin")
            && status.message().contains("CN=node1"),
        "{what}: the refusal says what is missing and who asked: {}",
        status.message()
    );
}

fn lockctl_binary() -> PathBuf {
    let bin = lockd_tests::server_binary().with_file_name("lockctl");
    assert!(
        bin.exists(),
        "{} is missing: run cargo test --workspace",
        bin.display()
    );
    bin
}

async fn lockctl(cluster: &Cluster, tls_args: &[&Path], args: &[&str]) -> Output {
    let mut cmd = tokio::process::Command::new(lockctl_binary());
    cmd.arg("--servers").arg(cluster.endpoints().join(","));
    for (flag, path) in ["--ca", "--cert", "--key"].iter().zip(tls_args) {
        cmd.arg(flag).arg(path);
    }
    cmd.args(args)
        .env_remove("LOCKD_CA")
        .env_remove("LOCKD_CERT")
        .env_remove("LOCKD_KEY");
    tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("lockctl finished in time")
        .expect("lockctl ran")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_elects_a_leader_and_grants_locks() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("lockd test CA");
    let cluster = start_tls_cluster(&ca, certs.path(), 3);
    cluster.wait_leader(WAIT).await;
    // Raft traffic flows over TLS: the leader hears from every peer.
    let s = cluster
        .wait_status(WAIT, "all three servers in contact", |s| s.quorum_has == 3)
        .await;
    assert_eq!(s.voters, 3);

    let node1 = ca.issue("node1", None);
    let client = Client::connect(node_config(
        &cluster,
        "node1",
        Some(client_tls(&ca, &node1)),
    ))
    .await
    .expect("node1 logs in with its own certificate");
    let fs = client
        .open_lockspace("fs1", LockspaceOptions::default())
        .await
        .unwrap();
    let held = fs
        .lock("inode-1", Mode::Ex, LockOptions::new())
        .await
        .unwrap();
    assert!(held.token() > 0);
    held.unlock().await.unwrap();
    client.logout().await.unwrap();

    // lockctl with --ca/--cert/--key: status and a lock taken through it.
    let dir = certs.path();
    let node2 = ca.issue("node2", None);
    std::fs::write(dir.join("node2.pem"), &node2.cert_pem).unwrap();
    std::fs::write(dir.join("node2.key"), &node2.key_pem).unwrap();
    let tls_args = [
        dir.join("ca.pem"),
        dir.join("node2.pem"),
        dir.join("node2.key"),
    ];
    let tls_args: Vec<&Path> = tls_args.iter().map(PathBuf::as_path).collect();
    let o = lockctl(&cluster, &tls_args, &["status"]).await;
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("has 3, needs 2"), "{}", text(&o));
    let o = lockctl(
        &cluster,
        &tls_args,
        &["lock", "--node", "node2", "fs1", "inode-2", "--", "true"],
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    // Without TLS settings lockctl cannot talk to a TLS cluster.
    let o = lockctl(&cluster, &[], &["status"]).await;
    assert!(!o.status.success(), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_from_the_cluster_ca_are_refused() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("lockd test CA");
    let cluster = start_tls_cluster(&ca, certs.path(), 1);
    cluster.wait_leader(WAIT).await;

    // Plaintext against a TLS server.
    let plain = Client::connect(node_config(&cluster, "node1", None)).await;
    assert!(plain.is_err(), "a plaintext client logged in");
    // TLS, trusting the right CA, but no client certificate.
    let anonymous = TlsOptions::new(ca.pem()).unwrap();
    let e = Client::connect(node_config(&cluster, "node1", Some(anonymous)))
        .await
        .expect_err("a client without a certificate logged in");
    assert!(matches!(e, Error::NoQuorum { .. }), "{e}");
    // A certificate named node1 but issued by another CA.
    let stranger = Ca::new("some other CA");
    let forged = stranger.issue("node1", Some("lockd-admin"));
    let tls = TlsOptions::new(ca.pem())
        .unwrap()
        .identity(forged.cert_pem.clone(), forged.key_pem.clone())
        .unwrap();
    assert!(
        Client::connect(node_config(&cluster, "node1", Some(tls.clone())))
            .await
            .is_err(),
        "a certificate from another CA logged in"
    );
    // Nor may it run admin operations.
    let admin = lockd_client::endpoint(&cluster.addr(1), Some(&tls))
        .unwrap()
        .connect()
        .await;
    if let Ok(channel) = admin {
        let refused = AdminServiceClient::new(channel)
            .force_expire(ForceExpireRequest {
                node: "node1".into(),
            })
            .await;
        assert!(refused.is_err(), "another CA's admin cert was obeyed");
    }

    // Nothing got in: no session exists.
    let s = cluster.wait_status(WAIT, "the leader", |_| true).await;
    assert_eq!(s.sessions, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_acts_only_as_its_own_node_and_runs_no_admin_operation() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("lockd test CA");
    let cluster = start_tls_cluster(&ca, certs.path(), 1);
    cluster.wait_leader(WAIT).await;
    let node1 = client_tls(&ca, &ca.issue("node1", None));

    // Logging in as another node is refused, naming the certificate.
    let e = Client::connect(node_config(&cluster, "node2", Some(node1.clone())))
        .await
        .expect_err("node1's certificate logged in as node2");
    match &e {
        Error::PermissionDenied(m) => assert!(
            m.contains("CN=node1") && m.contains("may not log in as node `node2`"),
            "{m}"
        ),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    let own = Client::connect(node_config(&cluster, "node1", Some(node1.clone())))
        .await
        .expect("node1 logs in as node1");

    // Nor may it act for another node's session, whose id anyone can read in Status.
    let node2 = Client::connect(node_config(
        &cluster,
        "node2",
        Some(client_tls(&ca, &ca.issue("node2", None))),
    ))
    .await
    .expect("node2 logs in with its own certificate");
    let channel = lockd_client::endpoint(&cluster.addr(1), Some(&node1))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut as_node1 = LockServiceClient::new(channel);
    let status = as_node1
        .logout(LogoutRequest {
            session: node2.session(),
            request_id: 1,
        })
        .await
        .expect_err("node1's certificate logged node2 out");
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("belongs to node `node2`")
            && status.message().contains("CN=node1"),
        "{}",
        status.message()
    );
    // Nor on a pipeline stream.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(PipelineRequest {
        tag: 7,
        call: Some(pipeline_request::Call::Lock(LockRequest {
            session: node2.session(),
            request_id: 1,
            ack_below: 0,
            lockspace: "fs1".into(),
            resource: b"r".to_vec(),
            mode: lockd_proto::v1::Mode::Ex as i32,
            flags: None,
            timeout_ms: 0,
        })),
    })
    .await
    .unwrap();
    let mut replies = as_node1
        .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let reply = replies.message().await.unwrap().expect("a reply");
    match reply.result {
        Some(pipeline_reply::Result::Error(e)) => {
            assert_eq!(reply.tag, 7);
            assert_eq!(Code::from_i32(e.code), Code::PermissionDenied, "{e:?}");
            assert!(e.message.contains("belongs to node `node2`"), "{e:?}");
        }
        other => panic!("node1's certificate locked for node2's session: {other:?}"),
    }
    // Its own session works through the same connection.
    as_node1
        .heartbeat(HeartbeatRequest {
            session: own.session(),
        })
        .await
        .expect("node1 heartbeats its own session");
    node2.logout().await.expect("node2's session is intact");

    // Admin operations: PermissionDenied with a clear message, and nothing happens.
    let mut admin = admin_client(&cluster, 1, &node1).await;
    assert_denied(
        "shutdown",
        admin.shutdown(ShutdownRequest { force: true }).await,
    );
    assert_denied(
        "forceexpire",
        admin
            .force_expire(ForceExpireRequest {
                node: "node1".into(),
            })
            .await,
    );
    assert_denied(
        "log-level",
        admin
            .set_log_level(SetLogLevelRequest {
                filter: "debug".into(),
            })
            .await,
    );
    assert_denied(
        "fence ack",
        admin
            .fence_ack(FenceAckRequest {
                node: "node1".into(),
                by: "node1".into(),
            })
            .await,
    );
    let voters_before = voters(&mut admin).await;
    assert_denied(
        "server add",
        admin
            .add_server(lockd_proto::v1::AddServerRequest {
                id: 4,
                addr: "127.0.0.1:1".into(),
                catch_up_timeout_ms: 0,
            })
            .await,
    );
    assert_denied(
        "server remove",
        admin
            .remove_server(lockd_proto::v1::RemoveServerRequest { id: 3 })
            .await,
    );
    assert_eq!(
        voters(&mut admin).await,
        voters_before,
        "the membership did not change"
    );
    // Read-only admin calls need only a valid certificate.
    let s = admin
        .status(lockd_proto::v1::StatusRequest {})
        .await
        .expect("status with a node certificate")
        .into_inner();
    assert_eq!(s.sessions, 1, "node1 is still logged in, not expired");
    assert_eq!(s.role, "leader", "the server did not stop");

    // lockctl with a node certificate: the same refusal, exit status 1.
    let dir = certs.path();
    let issued = ca.issue("node1", None);
    std::fs::write(dir.join("node1.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.join("node1.key"), &issued.key_pem).unwrap();
    let tls_args = [
        dir.join("ca.pem"),
        dir.join("node1.pem"),
        dir.join("node1.key"),
    ];
    let tls_args: Vec<&Path> = tls_args.iter().map(PathBuf::as_path).collect();
    let o = lockctl(&cluster, &tls_args, &["log-level", "debug"]).await;
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("needs a certificate with OU=lockd-admin"),
        "{}",
        text(&o)
    );

    own.logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_server_certificate_may_send_raft_messages() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("lockd test CA");
    let cluster = start_tls_cluster(&ca, certs.path(), 1);
    cluster.wait_leader(WAIT).await;
    for (who, role) in [("node1", None), ("ops", Some("lockd-admin"))] {
        let tls = client_tls(&ca, &ca.issue(who, role));
        let channel = lockd_client::endpoint(&cluster.addr(1), Some(&tls))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut peer = PeerServiceClient::new(channel);
        let mut request =
            tonic::Request::new(tokio_stream::iter(vec![RaftBatch { messages: vec![] }]));
        request.metadata_mut().insert(
            lockd_proto::CLUSTER_ID_METADATA_KEY,
            cluster.config.cluster.id.into(),
        );
        let status = peer
            .raft(request)
            .await
            .expect_err("raft from a non-server");
        assert_eq!(status.code(), Code::PermissionDenied, "{who}: {status:?}");
        assert!(
            status.message().contains("OU=lockd-server"),
            "{who}: {}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_certificate_runs_admin_operations() {
    let certs = tempfile::tempdir().unwrap();
    let ca = Ca::new("lockd test CA");
    let mut cluster = start_tls_cluster(&ca, certs.path(), 1);
    cluster.wait_leader(WAIT).await;
    let node1 = Client::connect(node_config(
        &cluster,
        "node1",
        Some(client_tls(&ca, &ca.issue("node1", None))),
    ))
    .await
    .unwrap();

    let admin_tls = client_tls(&ca, &ca.issue("alice", Some("lockd-admin")));
    let mut admin = admin_client(&cluster, 1, &admin_tls).await;
    admin
        .set_log_level(SetLogLevelRequest {
            filter: "info".into(),
        })
        .await
        .expect("log-level with an admin certificate");
    admin
        .force_expire(ForceExpireRequest {
            node: "node1".into(),
        })
        .await
        .expect("forceexpire with an admin certificate");
    cluster
        .wait_status(WAIT, "node1 expired", |s| {
            s.nodes.iter().any(|n| {
                n.name == "node1" && n.state != lockd_proto::v1::NodeState::LoggedIn as i32
            })
        })
        .await;
    admin
        .fence_ack(FenceAckRequest {
            node: "node1".into(),
            by: "alice".into(),
        })
        .await
        .expect("fence ack with an admin certificate");
    drop(node1);
    admin
        .shutdown(ShutdownRequest { force: true })
        .await
        .expect("shutdown with an admin certificate");
    assert!(cluster.wait_exit(1, WAIT).await.success());
}

async fn voters(admin: &mut AdminServiceClient<tonic::transport::Channel>) -> u64 {
    admin
        .status(lockd_proto::v1::StatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .voters
}
