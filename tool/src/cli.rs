//! `lockctl`'s command line: every flag, its environment variable and its help text.
//! Parsing only; the commands themselves live in their own modules.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use lockd_client::Mode;

/// The default server list: a local 3-server cluster on loopback.
pub const DEFAULT_SERVERS: &str = "127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103";

#[derive(Debug, Parser)]
#[command(
    name = "lockctl",
    version,
    about = "Inspect lockd lock servers and take locks from the shell",
    long_about = "lockctl is lockd's operator tool (the successor of GFS's gulm_tool).\n\
        \n\
        It talks gRPC to the lock servers named by --servers (or LOCKD_SERVERS). \
        Lock-service calls are sent to the Raft leader; followers redirect and lockctl \
        follows, retrying for up to 3 s before it reports \"no quorum\" (`lock` waits \
        longer; see `lockctl lock --help`).\n\
        \n\
        Set RUST_LOG (e.g. RUST_LOG=lockd_client=debug) to see redirects and retries on \
        stderr.",
    after_help = "Exit status: 0 on success; 1 on errors (unreachable cluster, no quorum, lock \
        refused, ...); 2 on command-line usage errors; other codes are listed in each \
        command's --help."
)]
pub struct Cli {
    /// Lock servers' client addresses, comma separated host:port list.
    #[arg(
        long,
        global = true,
        env = "LOCKD_SERVERS",
        default_value = DEFAULT_SERVERS,
        value_parser = parse_server_list,
        value_name = "HOST:PORT,..."
    )]
    pub servers: ServerList,

    /// Print machine-readable JSON on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// Mutual TLS: the CA (PEM) that issued the servers' certificates. Without it
    /// lockctl talks plaintext.
    #[arg(long, global = true, env = "LOCKD_CA", value_name = "PEM")]
    pub ca: Option<PathBuf>,

    /// Mutual TLS: this client's certificate (PEM). Admin commands (shutdown,
    /// forceexpire, fence ack, log-level) need one with OU=lockd-admin; `lock --node N`
    /// needs one whose CN is N.
    #[arg(long, global = true, env = "LOCKD_CERT", value_name = "PEM")]
    pub cert: Option<PathBuf>,

    /// Mutual TLS: the private key (PEM) of --cert.
    #[arg(long, global = true, env = "LOCKD_KEY", value_name = "PEM")]
    pub key: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// A validated, de-duplicated server list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerList(pub Vec<String>);

fn parse_server_list(s: &str) -> Result<ServerList, String> {
    lockd_client::parse_servers(s)
        .map(ServerList)
        .map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show every server's role, term and indexes, and the leader's view of the cluster.
    #[command(
        long_about = "Asks every server in --servers for its status (AdminService.Status), \
            all at once, each with its own timeout, and prints one row per server: id, \
            address, role, term, the leader it knows, commit and applied index. A server \
            that does not answer is shown as \"unreachable: <error>\". Then, from the \
            leader's own answer: leader, term, quorum (voters it hears from / voters it \
            needs), sessions, held locks, waiting requests, lockspaces, the last \
            fencing token, and whether it writes entries of several commands (\"batch \
            entries: on\", or \"off\" naming the servers whose build it has not seen \
            read them: log format 2).\n\
            \n\
            With --json, prints one object: {\"servers\": [...], \"leader\": {...} or null}; \
            each server entry has \"address\" (as listed in --servers) and either \
            \"reachable\": true and the status fields, or \"reachable\": false and \"error\".",
        after_help = "Exit status: 0 healthy (a leader answered and all is well); 4 degraded \
            (a leader answered, but a listed server does not answer, is stopping or lags \
            more than 1000 entries behind the leader's commit index, or the leader does \
            not hear from every voter); 3 no quorum (servers answered but none of them is \
            the leader: election under way, no quorum, or the leader is among the \
            unreachable); 1 if no server answered. With --watch: the last view's status."
    )]
    Status(StatusArgs),

    /// Take a lock, then run a command while holding it, or hold it until interrupted.
    #[command(
        long_about = "Logs in as --node, opens LOCKSPACE (creating it with default options \
            if needed), requests RESOURCE (its name's bytes as given) in --mode and waits \
            until it is granted. Then prints \"token=<fencing token> lock_id=<id> \
            mode=<granted mode>\" (a JSON object with --json) and:\n\
            \n\
            - with a COMMAND (after \"--\"): runs it in a process group of its own with \
            LOCKD_TOKEN, LOCKD_LOCK_ID, LOCKD_LOCKSPACE and LOCKD_RESOURCE set in its \
            environment, waits for it, unlocks, logs out and exits with the command's exit \
            status (128+N if it was killed by signal N). Ctrl-C, SIGTERM or SIGHUP to \
            lockctl is passed on to the command's process group and lockctl keeps waiting \
            for it; a second one kills the group. Being in its own group (so that it can be \
            signalled whole), the command cannot read from the terminal.\n\
            \n\
            - without a COMMAND: holds the lock until Ctrl-C (SIGINT), SIGTERM or SIGHUP, then \
            unlocks, logs out and exits 0.\n\
            \n\
            While it holds the lock, lockctl watches its session. When the client library \
            declares the lock lost (no quorum-confirmed heartbeat for the expiry window \
            minus a margin, which comes strictly before any server could expire the node \
            and give the lock to another; or the servers expired the session, e.g. \
            `lockctl forceexpire`), lockctl sends --lost-signal to the command's process \
            group, SIGKILL after --kill-after if it is still running, prints one line \
            \"lockctl: LOCK LOST: ...\" with the resource and the token to stderr, logs \
            out if it can (and says so if it cannot) and exits 125. Without a COMMAND it \
            prints the line and exits 125 the same way. This is NFSv4's SIGLOST.\n\
            \n\
            Waiting means waiting: without --timeout-ms (and without --try) the login and \
            the request wait through a loss of quorum and a restart of the whole cluster, \
            and the session is kept alive meanwhile (heartbeats go on), so the node is not \
            expired for it. With --timeout-ms lockctl gives up at the timeout, also during \
            an outage. Whenever it gives up it logs out, and it says so when it could not \
            (the session then stays until the servers expire it and fence its node).\n\
            \n\
            One node name has one session at a time: a second `lockctl lock --node N` is \
            refused (exit 1) while the first holds its lock. Give each concurrent user \
            (each script or job) a node name of its own in the cluster config, fenced like \
            the machine it runs on; see the README's \"lockctl lock in scripts\".",
        after_help = "Exit status:\n  \
            0    the command exited 0, or the lock was held until Ctrl-C/SIGTERM/SIGHUP\n  \
            N    the command's own exit status (128+N if killed by signal N)\n  \
            1    any other error (refused login, bad lockspace or resource name, ...)\n  \
            2    usage error on the command line\n  \
            69   no quorum / cluster unreachable: no leader answered in time (--try, \
            --timeout-ms)\n  \
            75   would block: --try and the lock is held elsewhere\n  \
            124  timed out: --timeout-ms passed while the request waited in the queue\n  \
            125  lock lost: the session was lost or expired (the command was signalled)\n  \
            126  the command could not be started; 127 it was not found\n  \
            130  interrupted (Ctrl-C/SIGTERM/SIGHUP) before the lock was granted"
    )]
    Lock(LockArgs),

    /// Ask whether a fencing token is still current on a resource.
    #[command(
        long_about = "Calls CheckToken(LOCKSPACE, RESOURCE, TOKEN) without logging in and \
            prints \"current=<true|false> latest=<highest token granted on the resource>\" \
            (JSON with --json). A token is current while the lock granted with it is held.",
        after_help = "Exit status: 0 if the token is current, 3 if it is not, 1 on error."
    )]
    CheckToken(CheckTokenArgs),

    /// List every configured node with its state, session, held locks and silence.
    #[command(
        long_about = "Lists every node of the cluster config (and sessions of nodes no \
            longer in it), like crm_mon's node list, from the leader's view: state \
            (LOGGED_IN; WAS_LOGGED_IN after a failover or cold start, until it heartbeats; \
            UNFENCING: logged in, its login not answered until its storage is unfenced \
            (action=on of its devices with unfence = true); EXPIRED, FENCING, FENCED: \
            failed, its locks held until fenced), session id, held locks, how long the \
            leader has not heard from it, when it expired (RFC 3339 and age), and fence \
            or unfence progress. A node without a session shows how it left its last one \
            and when: LOGGED_OUT, FENCED, or UNFENCE_FAILED (its login was refused, with \
            the last agent's outcome); NEVER_SEEN if the cluster has no record of it (the \
            records are replicated and kept for the 4,096 most recent departures). --json \
            prints raw values (ms).",
        after_help = "Exit status: 0; 4 if a node is EXPIRED or FENCING (needs fencing or \
            an operator's `lockctl fence ack`); 1 if no leader answered."
    )]
    Nodes,

    /// List the lockspaces in use: resources, locks by queue, expired holders, nodes.
    #[command(
        long_about = "Per lockspace, from the leader's lock table: resources with locks or \
            requests, granted locks, conversions and waiters, expired holders awaiting \
            recovery (explicit lockspaces), invalid LVBs, and the nodes holding or \
            waiting. Counts cover the first 10000 resources; open lockspaces without any \
            lock are counted, not listed.",
        after_help = "Exit status: 0 on success, 1 if no leader answered."
    )]
    Lockspaces,

    /// Show one node: session, state, held locks, silence, fence progress.
    #[command(
        long_about = "Shows NODE's session from the leader: its state (UNFENCING while \
            its login waits for its storage unfencing), held locks, silence, and fence or \
            unfence progress. Without a session it says how the node left its last one \
            (LOGGED_OUT, FENCED, UNFENCE_FAILED, with when) or that it was never seen.",
        after_help = "Exit status: 0 if the node has a session, 1 otherwise."
    )]
    Node {
        /// The node's name in the cluster config.
        name: String,
    },

    /// Expire a logged-in node now; it is then fenced like any failed node.
    #[command(
        name = "forceexpire",
        long_about = "Proposes Expire(NODE) on the leader. The node's waiting requests fail, its locks stay held, and the leader fences it with its configured fence levels; only after the fence succeeds (or `lockctl fence ack NODE`) are its locks released."
    )]
    ForceExpire {
        /// The node's name in the cluster config.
        node: String,
    },

    /// Stop one lock server cleanly (a leader hands its leadership over first).
    #[command(
        long_about = "Asks the server at ADDR itself to stop. If it leads, it first hands \
            leadership to its most up-to-date follower, so clients move on without an \
            error. The stop is refused when fewer than a quorum of voters would remain \
            running (the message says how many run and how many are needed), unless \
            --force. The server then exits 0. A stopped server is never fenced: only node \
            sessions are. SIGTERM to lockd does the same as --force.",
        after_help = "Exit status: 0 if the server is stopping, 1 if refused or unreachable."
    )]
    Shutdown {
        /// The server's address, host:port (port 7100 if omitted).
        addr: String,
        /// Stop even if fewer than a quorum of voters would remain.
        #[arg(long)]
        force: bool,
    },

    /// List resources with their holders, conversions and waiters (leader's view).
    #[command(after_help = "Exit status: 0 on success, 1 on error.")]
    Locks {
        /// Only this lockspace.
        lockspace: Option<String>,
        /// Only this resource (needs LOCKSPACE).
        #[arg(long)]
        resource: Option<String>,
        /// Most resources listed.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },

    /// Change the running servers' log filter, e.g. `debug` or `lockd_server=debug,info`.
    #[command(
        name = "log-level",
        long_about = "Sets the tracing filter of every server in --servers (or only --server) \
            at once, like gulm_tool's setverb. Not persistent: a restarted or reloaded \
            (SIGHUP) server goes back to its config's [log] filter, or RUST_LOG, or \
            info. A malformed filter is refused and changes nothing.",
        after_help = "Exit status: 0 if every server took it, 1 otherwise."
    )]
    LogLevel {
        /// The tracing filter directives.
        filter: String,
        /// Only this server (host:port).
        #[arg(long)]
        server: Option<String>,
    },

    /// Fencing: acknowledge a fence by hand, or show the fence history.
    #[command(subcommand)]
    Fence(FenceCommand),

    /// Membership: add or remove a lock server while the cluster runs.
    #[command(subcommand)]
    Server(ServerCommand),

    /// Backups: `snapshot save FILE`.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Print a shell completion script, e.g. `lockctl completions bash > /etc/bash_completion.d/lockctl`.
    #[command(
        long_about = "Prints a completion script for SHELL on stdout. Install it where your \
            shell looks for completions, for example:\n\
            \n\
            bash: lockctl completions bash > /etc/bash_completion.d/lockctl\n\
            zsh:  lockctl completions zsh > \"${fpath[1]}/_lockctl\"\n\
            fish: lockctl completions fish > ~/.config/fish/completions/lockctl.fish",
        after_help = "Exit status: 0."
    )]
    Completions {
        /// The shell.
        shell: Shell,
    },
    /// Write the man pages lockctl.8 and lockctl-<command>.8 into DIR (for packaging).
    #[command(hide = true)]
    Manpages { dir: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save a consistent snapshot of the leader's applied state to FILE.
    #[command(
        long_about = "Asks the leader for a snapshot of its applied state, taken at a \
            ReadIndex point (everything acknowledged before the call is in it): the lock \
            table with every session, lock, queue and the last fencing token, its Raft \
            index and term, the cluster's name, id and identity, and the membership, in \
            lockd's snapshot file format with a CRC-32. FILE is written atomically \
            (temporary file, fsync, rename): it holds the whole snapshot or is left as it \
            was. `lockd snapshot inspect FILE` checks it; `lockd restore` starts a new \
            cluster from it (README, Disaster recovery). Needs an admin certificate with TLS.",
        after_help = "Exit status: 0 once FILE is written, 1 otherwise."
    )]
    Save {
        /// Where to write the snapshot.
        file: std::path::PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ServerCommand {
    /// Add server ID at ADDR: it joins as a learner and becomes a voter once caught up.
    #[command(
        long_about = "Adds a lock server while the cluster runs, one at a time. First put the \
            new server in the config file ([[servers]] id = ID, addr = ADDR) and start it with \
            `lockd run --id ID --join`. The leader adds it as a learner (it receives the log \
            or a snapshot but does not vote), waits until it has caught up, then makes it a \
            voter. The cluster must have 1, 3, 4 or 5 voters afterwards: growing 3 → 4 → 5 \
            works; 5 → 6 and 1 → 2 are refused. If the server does not catch up within \
            --catch-up-timeout it stays a learner: run the same command again to resume, or \
            `lockctl server remove ID`. Prints the members afterwards (JSON with --json).",
        after_help = "Exit status: 0 once the server is a voter, 1 if refused, not caught up or \
            no leader answered."
    )]
    Add {
        /// The new server's id (unique in the cluster, 1 or more).
        id: u64,
        /// Its address for clients and peers, ip:port.
        addr: String,
        /// How long the leader waits for the learner to catch up, in seconds.
        #[arg(long, default_value_t = 60, value_name = "SECONDS")]
        catch_up_timeout: u64,
    },
    /// Remove server ID (a voter or a joining learner); then stop it.
    #[command(
        long_about = "Removes a lock server from the cluster's configuration. Refused when the \
            cluster would be left with 2 voters (or none), or when the voters left running \
            would not make a quorum (the message says how many run and how many are \
            needed). Removing the leader first hands its leadership to another server. \
            The removed server stops voting and serving; stop its process afterwards \
            and remove it from the config file. Prints the members afterwards.",
        after_help = "Exit status: 0 once removed, 1 if refused or no leader answered."
    )]
    Remove {
        /// The server's id.
        id: u64,
    },
}

/// The shells `lockctl completions` writes scripts for.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Subcommand)]
pub enum FenceCommand {
    /// Confirm that NODE is fenced (e.g. you powered it off): its locks are released.
    #[command(
        long_about = "Tells the leader that NODE is fenced, as gulm's `fence_ack_manual` did. Do this only after making sure the node can no longer write to the shared storage: its locks are released at once (or, in explicit lockspaces, its PW/EX locks await recovery). Recorded in the fence history with --by and the time."
    )]
    Ack {
        /// The node's name.
        node: String,
        /// Who confirms (recorded in the history).
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// Show every fence start, level attempt (with its result) and completion.
    #[command(
        long_about = "Shows the replicated fence history, oldest first (the last 1,024 \
            records): every fence start, level attempt with its result and completion \
            (by an agent level or `fence ack`), and every unfencing of a node whose \
            devices have unfence = true: its start at login, each run of its devices with \
            action=on (EVENT `unfence ... (action=on)`), and, when the attempts ran out, \
            the refusal of the login. --json adds `action` (\"on\" for unfencing)."
    )]
    History,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// How long to wait for each server's answer, in milliseconds (connecting included).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    pub timeout_ms: u64,

    /// Refresh every SECONDS (default 2) until Ctrl-C, like watch(1); with --json one
    /// JSON document per line.
    #[arg(
        long,
        value_name = "SECONDS",
        num_args = 0..=1,
        default_missing_value = "2",
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub watch: Option<u64>,
}

impl StatusArgs {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms.max(1))
    }

    pub fn watch(&self) -> Option<Duration> {
        self.watch.map(Duration::from_secs)
    }
}

#[derive(Debug, Args)]
pub struct LockArgs {
    /// The lockspace (e.g. a file system's name).
    pub lockspace: String,

    /// The resource to lock: its name's bytes, exactly as given.
    pub resource: String,

    /// Lock mode: NL, CR, CW, PR, PW, EX, or GFS's SHARED (PR), DEFERRED (CW),
    /// EXCLUSIVE (EX); any case.
    #[arg(long, default_value = "EX")]
    pub mode: Mode,

    /// The node to log in as; must be a node of the cluster configuration.
    #[arg(long, env = "LOCKD_NODE")]
    pub node: String,

    /// The cluster id to check at login (0 = do not check).
    #[arg(long, env = "LOCKD_CLUSTER_ID", default_value_t = 0, value_name = "ID")]
    pub cluster_id: u64,

    /// Give up if the lock is not granted within this many milliseconds, counted from
    /// lockctl's start and also during a loss of quorum (exit 124 if the request timed
    /// out in the queue, 69 if no leader answered). 0 = wait forever, also through a
    /// loss of quorum and a restart of the whole cluster.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    pub timeout_ms: u64,

    /// Fail at once (exit 75, "would block") instead of waiting in the queue. Without a
    /// leader with quorum it fails after 3 s (exit 69).
    #[arg(long = "try")]
    pub try_lock: bool,

    /// The signal sent to the command's process group when the lock is lost: a name
    /// (TERM, SIGTERM, term) or a number.
    #[arg(long, default_value = "TERM", value_parser = parse_signal, value_name = "SIGNAL")]
    pub lost_signal: LostSignal,

    /// After --lost-signal, send SIGKILL to the command's process group if it is still
    /// running this much later: seconds (10, 2.5) or with a unit (500ms, 10s). 0 = never.
    #[arg(long, default_value = "10", value_parser = parse_duration, value_name = "DURATION")]
    pub kill_after: Duration,

    /// The command to run while holding the lock, after "--".
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A signal `lockctl lock` may send to its command: the number and a name for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LostSignal {
    pub signal: rustix::process::Signal,
    pub name: &'static str,
}

/// The signals worth sending to a command whose lock is gone, by name.
const SIGNALS: [(&str, rustix::process::Signal); 10] = {
    use rustix::process::Signal;
    [
        ("TERM", Signal::TERM),
        ("KILL", Signal::KILL),
        ("INT", Signal::INT),
        ("HUP", Signal::HUP),
        ("QUIT", Signal::QUIT),
        ("USR1", Signal::USR1),
        ("USR2", Signal::USR2),
        ("ALRM", Signal::ALARM),
        ("PWR", Signal::POWER),
        ("ABRT", Signal::ABORT),
    ]
};

fn parse_signal(s: &str) -> Result<LostSignal, String> {
    let upper = s.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("SIG").unwrap_or(&upper);
    let found = match bare.parse::<i32>() {
        Ok(number) => SIGNALS.iter().find(|(_, sig)| sig.as_raw() == number),
        Err(_) => SIGNALS.iter().find(|(name, _)| *name == bare),
    };
    let names: Vec<&str> = SIGNALS.iter().map(|(name, _)| *name).collect();
    found
        .map(|(name, signal)| LostSignal {
            signal: *signal,
            name,
        })
        .ok_or_else(|| format!("unknown signal {s:?}: use one of {}", names.join(", ")))
}

/// "10" and "2.5" are seconds; "500ms" and "10s" say their unit. At most a day.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (number, scale) = if let Some(ms) = t.strip_suffix("ms") {
        (ms, 0.001)
    } else if let Some(secs) = t.strip_suffix('s') {
        (secs, 1.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: use seconds (10, 2.5) or 500ms, 10s"))?;
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range: 0 to 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[derive(Debug, Args)]
pub struct CheckTokenArgs {
    /// The lockspace.
    pub lockspace: String,
    /// The resource, as given to `lockctl lock`.
    pub resource: String,
    /// The fencing token to check.
    pub token: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lockctl").chain(args.iter().copied()))
    }

    fn lock_args(cli: Cli) -> LockArgs {
        match cli.command {
            Command::Lock(args) => args,
            other => panic!("expected lock, got {other:?}"),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn status_defaults_to_the_local_cluster() {
        // The test relies on LOCKD_SERVERS not being set in the environment.
        if std::env::var_os("LOCKD_SERVERS").is_some() {
            return;
        }
        let cli = parse(&["status"]).unwrap();
        assert_eq!(
            cli.servers.0,
            ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"]
        );
        assert!(!cli.json);
        match cli.command {
            Command::Status(args) => assert_eq!(args.timeout(), Duration::from_secs(1)),
            other => panic!("expected status, got {other:?}"),
        }
    }

    #[test]
    fn global_flags_go_before_or_after_the_command() {
        let cli = parse(&["--servers", "a:1,b:2", "status", "--json"]).unwrap();
        assert_eq!(cli.servers.0, ["a:1", "b:2"]);
        assert!(cli.json);
        let cli = parse(&["--json", "status", "--servers=c:3", "--timeout-ms", "250"]).unwrap();
        assert_eq!(cli.servers.0, ["c:3"]);
        assert!(cli.json);
    }

    #[test]
    fn malformed_server_list_is_rejected() {
        let err = parse(&["--servers", "a:1,nope", "status"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn lock_with_defaults() {
        let args = lock_args(parse(&["lock", "fs1", "inode-7", "--node", "n1"]).unwrap());
        assert_eq!(args.lockspace, "fs1");
        assert_eq!(args.resource, "inode-7");
        assert_eq!(args.node, "n1");
        assert_eq!(args.mode, Mode::Ex);
        assert_eq!(args.timeout_ms, 0);
        assert_eq!(args.cluster_id, 0);
        assert!(!args.try_lock);
        assert!(args.command.is_empty());
    }

    #[test]
    fn lock_takes_mode_try_timeout_and_a_command() {
        let args = lock_args(
            parse(&[
                "lock",
                "fs1",
                "r",
                "--node",
                "n2",
                "--mode",
                "pr",
                "--try",
                "--timeout-ms",
                "500",
                "--",
                "sh",
                "-c",
                "echo $LOCKD_TOKEN --not-ours",
            ])
            .unwrap(),
        );
        assert_eq!(args.mode, Mode::Pr);
        assert!(args.try_lock);
        assert_eq!(args.timeout_ms, 500);
        assert_eq!(args.command, ["sh", "-c", "echo $LOCKD_TOKEN --not-ours"]);
    }

    #[test]
    fn lock_accepts_gfs_state_names() {
        let args =
            lock_args(parse(&["lock", "fs1", "r", "--node", "n", "--mode", "shared"]).unwrap());
        assert_eq!(args.mode, Mode::SHARED);
    }

    #[test]
    fn lock_rejects_unknown_modes() {
        let err = parse(&["lock", "fs1", "r", "--node", "n", "--mode", "XX"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("unknown lock mode"), "{err}");
    }

    #[test]
    fn lock_needs_a_node() {
        if std::env::var_os("LOCKD_NODE").is_some() {
            return;
        }
        let err = parse(&["lock", "fs1", "r"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        assert!(err.to_string().contains("--node"), "{err}");
    }

    #[test]
    fn lock_needs_lockspace_and_resource() {
        let err = parse(&["lock", "fs1", "--node", "n"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn command_words_need_the_double_dash() {
        let err = parse(&["lock", "fs1", "r", "--node", "n", "sleep", "1"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn lock_lost_signal_defaults_to_term_then_kill_after_10_s() {
        let args = lock_args(parse(&["lock", "fs1", "r", "--node", "n"]).unwrap());
        assert_eq!(args.lost_signal.signal, rustix::process::Signal::TERM);
        assert_eq!(args.kill_after, Duration::from_secs(10));
    }

    #[test]
    fn lost_signal_takes_names_with_or_without_sig_and_numbers() {
        use rustix::process::Signal;
        for (given, want) in [
            ("TERM", Signal::TERM),
            ("sigkill", Signal::KILL),
            ("Hup", Signal::HUP),
            ("USR1", Signal::USR1),
            ("9", Signal::KILL),
            ("15", Signal::TERM),
        ] {
            assert_eq!(parse_signal(given).unwrap().signal, want, "{given}");
        }
        for bad in ["", "SIG", "NOPE", "0", "-9", "999", "STOP"] {
            let err = parse_signal(bad).unwrap_err();
            assert!(
                err.contains("unknown signal") && err.contains("TERM"),
                "{bad}: {err}"
            );
        }
        let err =
            parse(&["lock", "fs1", "r", "--node", "n", "--lost-signal", "bogus"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn kill_after_takes_seconds_or_a_unit() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("2.5").unwrap(), Duration::from_millis(2_500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("3s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        for bad in ["", "x", "-1", "1e9", "NaN", "inf", "5m", "ms"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lock_help_lists_every_exit_status() {
        let mut cmd = Cli::command();
        let lock = cmd.find_subcommand_mut("lock").expect("lock subcommand");
        let help = lock.render_long_help().to_string();
        for status in ["69 ", "75 ", "124 ", "125 ", "130 ", "2 ", "1 "] {
            assert!(
                help.contains(&format!("  {status}")),
                "status {status}missing: {help}"
            );
        }
    }

    #[test]
    fn check_token_parses_its_token() {
        let cli = parse(&["check-token", "fs1", "r", "42"]).unwrap();
        match cli.command {
            Command::CheckToken(args) => {
                assert_eq!(
                    (args.lockspace.as_str(), args.resource.as_str()),
                    ("fs1", "r")
                );
                assert_eq!(args.token, 42);
            }
            other => panic!("expected check-token, got {other:?}"),
        }
        assert!(parse(&["check-token", "fs1", "r", "-1"]).is_err());
    }

    #[test]
    fn status_watch_takes_an_optional_interval() {
        let watch = |args: &[&str]| match parse(args).unwrap().command {
            Command::Status(a) => a.watch(),
            other => panic!("expected status, got {other:?}"),
        };
        assert_eq!(watch(&["status"]), None);
        assert_eq!(watch(&["status", "--watch"]), Some(Duration::from_secs(2)));
        assert_eq!(
            watch(&["status", "--watch", "5"]),
            Some(Duration::from_secs(5))
        );
        assert!(parse(&["status", "--watch", "0"]).is_err());
    }

    #[test]
    fn unknown_commands_are_rejected() {
        let err = parse(&["frobnicate"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidSubcommand);
    }
}
