use super::*;

const GOOD: &str = r#"
[cluster]
name = "prod"
id = 7

[[servers]]
id = 1
addr = "127.0.0.1:7101"

[[servers]]
id = 2
addr = "127.0.0.1:7102"

[[servers]]
id = 3
addr = "127.0.0.1:7103"

[[nodes]]
name = "gfs1"
"#;

fn err_of(text: &str) -> String {
    Config::parse(text).unwrap_err().to_string()
}

#[test]
fn good_config_parses_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.servers.len(), 3);
    assert!(c.has_node("gfs1"));
    assert_eq!(c.timing.tick_ms, 50);
    assert_eq!(c.server_dir(2), PathBuf::from("/var/lib/lockd/server-2"));
}

#[test]
fn two_servers_are_refused() {
    let text = GOOD.replace("[[servers]]\nid = 3\naddr = \"127.0.0.1:7103\"\n", "");
    assert!(err_of(&text).contains("`servers`: 2 servers cannot survive"));
}

#[test]
fn each_bad_config_names_its_key() {
    let cases = [
        (GOOD.replace("id = 2\n", "id = 1\n"), "servers[1].id"),
        (GOOD.replace("127.0.0.1:7102", "nowhere"), "servers[1].addr"),
        (
            GOOD.replace("127.0.0.1:7102", "127.0.0.1:7101"),
            "servers[1].addr",
        ),
        (GOOD.replace("id = 7", "id = 0"), "cluster.id"),
        (
            GOOD.replace("name = \"gfs1\"", "name = \"\""),
            "nodes[0].name",
        ),
        (
            format!("{GOOD}\n[[nodes]]\nname = \"gfs1\"\n"),
            "duplicate node",
        ),
        (
            format!("{GOOD}\n[timing]\nheartbeat_ticks = 10\n"),
            "timing.heartbeat_ticks",
        ),
        (format!("{GOOD}\n[timing]\ntick_ms = 0\n"), "timing.tick_ms"),
        (
            format!("{GOOD}\n[timing]\nsnapshot_keep_entries = 2000000\n"),
            "timing.snapshot_keep_entries",
        ),
        (
            format!("{GOOD}\n[liveness]\nheartbeat_interval_ms = 20\n"),
            "liveness.heartbeat_interval_ms",
        ),
        (
            format!("{GOOD}\n[liveness]\nallowed_misses = 0\n"),
            "liveness.allowed_misses",
        ),
        (
            format!("{GOOD}\n[liveness]\ngrace_ms = 10\n"),
            "liveness.grace_ms",
        ),
        (GOOD.replace("[cluster]", "[cluster]\ncolour = 1"), "colour"),
    ];
    for (text, want) in cases {
        let got = err_of(&text);
        assert!(got.contains(want), "expected `{want}` in: {got}");
    }
}

#[test]
fn fence_devices_parse_and_round_trip() {
    let text = GOOD.replace(
        "name = \"gfs1\"",
        "name = \"gfs1\"\nfence = [\n  { level = 1, agent = \"/usr/sbin/fence_ipmilan\", params = { ipaddr = \"192.0.2.9\", passwd_script = \"/etc/p\" } },\n  { level = 2, agent = \"/usr/sbin/fence_apc\", action = \"off\", timeout_ms = 5000, params = { port = \"3\" } },\n]",
    );
    let c = Config::parse(&text).unwrap();
    let fence = &c.node("gfs1").unwrap().fence;
    assert_eq!(fence.len(), 2);
    assert_eq!(fence[0].action, FenceAction::Reboot);
    assert_eq!(fence[0].timeout_ms, 60_000);
    assert_eq!(fence[1].action, FenceAction::Off);
    let back = Config::parse(&c.to_toml()).unwrap();
    assert_eq!(back.node("gfs1").unwrap().fence, *fence);
    assert!(
        c.check_fence_agents().is_err() || std::path::Path::new("/usr/sbin/fence_ipmilan").exists()
    );
}

#[test]
fn bad_fence_devices_name_their_key() {
    let with = |dev: &str| {
        GOOD.replace(
            "name = \"gfs1\"",
            &format!("name = \"gfs1\"\nfence = [ {dev} ]"),
        )
    };
    let cases = [
        (
            with("{ level = 0, agent = \"/bin/true\" }"),
            "nodes[0].fence[0].level",
        ),
        (
            with("{ level = 1, agent = \"fence_x\" }"),
            "nodes[0].fence[0].agent",
        ),
        (
            with("{ level = 1, agent = \"/bin/true\", action = \"on\" }"),
            "action",
        ),
        (
            with("{ level = 1, agent = \"/bin/true\", params = { nodename = \"x\" } }"),
            "nodes[0].fence[0].params.nodename",
        ),
        (
            with("{ level = 1, agent = \"/bin/true\", timeout_ms = 0 }"),
            "nodes[0].fence[0].timeout_ms",
        ),
    ];
    for (text, want) in cases {
        let got = err_of(&text);
        assert!(got.contains(want), "expected `{want}` in: {got}");
    }
}

#[test]
fn unfence_devices_parse_round_trip_and_on_is_not_a_fencing_action() {
    let text = GOOD.replace(
        "name = \"gfs1\"",
        "name = \"gfs1\"\nfence = [\n  { level = 2, agent = \"/usr/sbin/fence_scsi\", action = \"off\", unfence = true, params = { devices = \"/dev/sdb\" } },\n  { level = 1, agent = \"/usr/sbin/fence_ipmilan\" },\n]",
    );
    let c = Config::parse(&text).unwrap();
    let node = c.node("gfs1").unwrap();
    assert!(node.fence[0].unfence && !node.fence[1].unfence);
    let unfence = node.unfence_devices();
    assert_eq!(unfence.len(), 1);
    assert_eq!(unfence[0].action, FenceAction::On);
    assert_eq!(unfence[0].params["devices"], "/dev/sdb");
    assert_eq!(c.fencing.unfence_attempts, 3);
    let back = Config::parse(&c.to_toml()).unwrap();
    assert_eq!(back.node("gfs1").unwrap().fence, node.fence);

    let on = GOOD.replace(
        "name = \"gfs1\"",
        "name = \"gfs1\"\nfence = [ { level = 1, agent = \"/usr/sbin/fence_scsi\", action = \"on\" } ]",
    );
    let err = err_of(&on);
    assert!(
        err.contains("nodes[0].fence[0].action") && err.contains("unfence = true"),
        "{err}"
    );
    for bad in ["0", "101"] {
        let err = err_of(&format!("{GOOD}\n[fencing]\nunfence_attempts = {bad}\n"));
        assert!(err.contains("fencing.unfence_attempts"), "{err}");
    }
}

#[test]
fn a_missing_fence_agent_is_reported_at_start() {
    let text = GOOD.replace(
        "name = \"gfs1\"",
        "name = \"gfs1\"\nfence = [ { level = 1, agent = \"/nonexistent/fence_nothing\" } ]",
    );
    let c = Config::parse(&text).unwrap();
    let err = c.check_fence_agents().unwrap_err().to_string();
    assert!(
        err.contains("nodes[0].fence[0].agent") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn the_shipped_example_configs_are_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(
        seen >= 2,
        "expected the 3- and 5-server examples in {}",
        dir.display()
    );
}

#[test]
fn dev_config_round_trips_through_toml() {
    let c = Config::dev(3, 7100, PathBuf::from("/tmp/x"));
    let back = Config::parse(&c.to_toml()).unwrap();
    assert_eq!(back.servers[2].addr, "127.0.0.1:7103");
    assert_eq!(back.nodes.len(), 16);
    assert_eq!(back.storage.data_dir, PathBuf::from("/tmp/x"));
}

/// A CA and a certificate signed by it, PEM, with Subject CN=`cn` and OU=`ou`.
fn ca_and_cert(cn: &str, ou: Option<&str>) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "test CA");
    let ca = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, cn);
    if let Some(ou) = ou {
        leaf.distinguished_name
            .push(DnType::OrganizationalUnitName, ou);
    }
    let cert = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

fn with_tls(dir: &Path) -> String {
    format!(
        "{GOOD}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
        dir.join("ca.pem"),
        dir.join("server-{id}.pem"),
        dir.join("server-{id}.key")
    )
}

#[test]
fn tls_section_parses_substitutes_the_id_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::parse(&with_tls(dir.path())).unwrap();
    let tls = c.tls.as_ref().unwrap();
    assert_eq!(tls.cert_path(2), dir.path().join("server-2.pem"));
    assert_eq!(tls.key_path(3), dir.path().join("server-3.key"));
    assert_eq!(Config::parse(&c.to_toml()).unwrap().tls, c.tls);
    // No [tls] section: plaintext, nothing to load.
    assert!(Config::parse(GOOD).unwrap().load_tls(1).unwrap().is_none());
}

#[test]
fn bad_tls_sections_name_their_key() {
    let cases = [
        (
            "[tls]\nca = \"\"\ncert = \"c\"\nkey = \"k\"\n",
            "`tls.ca`: must be the path",
        ),
        (
            "[tls]\nca = \"a\"\ncert = \"\"\nkey = \"k\"\n",
            "`tls.cert`: must be the path",
        ),
        ("[tls]\nca = \"a\"\ncert = \"c\"\n", "missing field `key`"),
        (
            "[tls]\nca = \"a\"\ncert = \"c\"\nkey = \"k\"\ncrl = \"x\"\n",
            "unknown field `crl`",
        ),
    ];
    for (section, want) in cases {
        let got = err_of(&format!("{GOOD}\n{section}"));
        assert!(got.contains(want), "expected `{want}` in: {got}");
    }
}

#[test]
fn tls_files_are_checked_at_start_naming_key_and_problem() {
    let dir = tempfile::tempdir().unwrap();
    let c = Config::parse(&with_tls(dir.path())).unwrap();
    let err = |c: &Config| c.load_tls(1).unwrap_err().to_string();
    // Missing files.
    let e = err(&c);
    assert!(e.contains("`tls.ca`") && e.contains("cannot read"), "{e}");

    let (ca, cert, key) = ca_and_cert("lockd-server-1", Some("lockd-server"));
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write("ca.pem", "not a certificate");
    let e = err(&c);
    assert!(
        e.contains("`tls.ca`") && e.contains("no PEM CERTIFICATE"),
        "{e}"
    );
    write(
        "ca.pem",
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
    );
    let e = err(&c);
    assert!(
        e.contains("`tls.ca`") && e.contains("not a valid X.509"),
        "{e}"
    );
    write("ca.pem", &ca);
    let e = err(&c);
    assert!(
        e.contains("`tls.cert`") && e.contains("server-1.pem"),
        "{e}"
    );
    write("server-1.pem", &cert);
    let e = err(&c);
    assert!(e.contains("`tls.key`") && e.contains("cannot read"), "{e}");
    write("server-1.key", &cert);
    let e = err(&c);
    assert!(
        e.contains("`tls.key`") && e.contains("no PEM private key"),
        "{e}"
    );
    write("server-1.key", &key);
    c.load_tls(1).expect("a complete set of files loads");

    // A certificate without the server role would be refused by every peer.
    let (_, node_cert, _) = ca_and_cert("gfs1", None);
    write("server-1.pem", &node_cert);
    let e = err(&c);
    assert!(
        e.contains("`tls.cert`") && e.contains("no OU=lockd-server") && e.contains("CN=gfs1"),
        "{e}"
    );
}
