//! `lockd`: the lock server binary (see `lockd --help`).

fn main() -> anyhow::Result<()> {
    lockd_server::cli::main()
}
