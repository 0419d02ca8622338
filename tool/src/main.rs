//! `lockctl`, lockd's operator CLI (gulm_tool's successor): parses the command line,
//! runs one command, and turns its outcome into an exit status. Each command lives in
//! its own module; this file owns only the dispatch and the error reporting.

mod admin;
mod cli;
mod lock;
mod snapshot;
mod status;
mod time;
mod tls;
mod views;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command, FenceCommand, ServerCommand, Shell, SnapshotCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Completions { shell } = cli.command {
        print_completions(shell);
        return ExitCode::SUCCESS;
    }
    if let Command::Manpages { dir } = &cli.command {
        return match write_manpages(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!(
                    "lockctl: cannot write man pages to {}: {err}",
                    dir.display()
                );
                ExitCode::FAILURE
            }
        };
    }
    if let Err(err) = tls::init(&cli) {
        eprintln!("lockctl: {err:#}");
        return ExitCode::FAILURE;
    }
    // The client library logs its retries; keep them off the terminal unless asked.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("lockctl: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("lockctl: {}", tls::explain(format!("{err:#}")));
            ExitCode::FAILURE
        }
    }
}

/// `lockctl completions SHELL`: the script clap_complete derives from the command line.
fn print_completions(shell: Shell) {
    let shell = match shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    clap_complete::generate(
        shell,
        &mut Cli::command(),
        "lockctl",
        &mut std::io::stdout(),
    );
}

/// `lockctl.8`, then `lockctl-<command>.8` for each visible command (clap_mangen
/// renders one command per page), for the .deb (deploy/debian/build-deb.sh).
fn write_manpages(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let command = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone())
        .section("8")
        .render(&mut page)?;
    std::fs::write(dir.join("lockctl.8"), page)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("lockctl-{}", sub.get_name());
        let mut page = Vec::new();
        // clap names are &'static without its `string` feature; a few pages, once.
        let page_name: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(sub.clone().name(page_name))
            .section("8")
            .render(&mut page)?;
        std::fs::write(dir.join(format!("{name}.8")), page)?;
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let servers = &cli.servers.0;
    match cli.command {
        Command::Status(args) => status::run(servers, args.timeout(), args.watch(), cli.json).await,
        Command::Nodes => views::nodes(servers, cli.json).await,
        Command::Lockspaces => views::lockspaces(servers, cli.json).await,
        Command::Lock(args) => lock::run(servers, args, cli.json).await,
        Command::CheckToken(args) => lock::check_token(servers, args, cli.json).await,
        Command::Node { name } => admin::node(servers, name, cli.json).await,
        Command::ForceExpire { node } => admin::force_expire(servers, node).await,
        Command::Shutdown { addr, force } => admin::shutdown(addr, force).await,
        Command::Locks {
            lockspace,
            resource,
            limit,
        } => admin::locks(servers, lockspace, resource, limit, cli.json).await,
        Command::LogLevel { filter, server } => admin::log_level(servers, server, filter).await,
        Command::Fence(FenceCommand::Ack { node, by }) => admin::fence_ack(servers, node, by).await,
        Command::Fence(FenceCommand::History) => admin::fence_history(servers, cli.json).await,
        Command::Server(ServerCommand::Add {
            id,
            addr,
            catch_up_timeout,
        }) => {
            let catch_up = std::time::Duration::from_secs(catch_up_timeout);
            admin::server_add(servers, id, addr, catch_up, cli.json).await
        }
        Command::Server(ServerCommand::Remove { id }) => {
            admin::server_remove(servers, id, cli.json).await
        }
        Command::Snapshot(SnapshotCommand::Save { file }) => {
            snapshot::save(servers, &file, cli.json).await
        }
        Command::Completions { shell } => {
            print_completions(shell);
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpages { .. } => Ok(ExitCode::SUCCESS),
    }
}
