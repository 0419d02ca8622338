//! The `lockd` server, built inside the test package so its tests can spawn it.
fn main() -> anyhow::Result<()> {
    lockd_server::cli::main()
}
