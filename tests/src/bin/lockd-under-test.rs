//! The `lockd` server, built inside the test package so its tests can spawn it.
//! Unlike `lockd`, it honours `LOCKD_UNSAFE_RELEASE_ON_EXPIRE=1` and
//! `LOCKD_UNSAFE_ACCEPT_FROM_FENCING=1`, the deliberately broken behaviours the nemesis
//! checker must catch.
fn main() -> anyhow::Result<()> {
    if std::env::var("LOCKD_UNSAFE_RELEASE_ON_EXPIRE").is_ok_and(|v| v == "1") {
        eprintln!("UNSAFE: releasing expired nodes' locks at expiry (test switch)");
        lockd_server::state::enable_unsafe_release_on_expire();
    }
    if std::env::var("LOCKD_UNSAFE_ACCEPT_FROM_FENCING").is_ok_and(|v| v == "1") {
        eprintln!("UNSAFE: accepting requests of nodes being fenced (test switch)");
        lockd_server::state::enable_unsafe_accept_from_fencing();
    }
    lockd_server::cli::main()
}
