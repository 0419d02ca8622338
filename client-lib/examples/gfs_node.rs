//! A simulated GFS node: what a cluster file system does with lockd.
//!
//! ```text
//! gfs_node <servers a,b,c> <node-name> [seconds]
//! ```
//!
//! The program behaves like one machine that mounts the shared file system `gfs0`:
//!
//! 1. it logs in as `<node-name>` and opens the lockspace `gfs0` in EXPLICIT recovery
//!    mode (GFS-style: a dead node's EX/PW locks stay as *expired holders* until a
//!    survivor has replayed its journal);
//! 2. it "mounts": takes its own journal lock (GFS lock type 4) EX and keeps it. Node
//!    `nodeN` uses journal `N-1` (so `node1`..`node16` never share one); any other name
//!    uses a stable hash of the name modulo 16. The journal must follow from the name
//!    alone, because a survivor that recovers a dead node learns only its name;
//! 3. for `[seconds]` (default 10) it works on a few inodes (GFS lock type 2), taking
//!    each SHARED (PR) or EXCLUSIVE (EX) at random and *caching* the lock afterwards,
//!    as GFS caches glocks;
//! 4. meanwhile it answers the servers' events: a blocking callback on a cached inode
//!    lock (GFS's NEED_S / NEED_E) demotes EX to PR when the other node only wants to
//!    read, and releases the lock otherwise; a NeedRecovery for a dead node replays that
//!    node's journal (its journal lock EX with `noexp`, 100 ms of "replay", unlock) and
//!    then tells the servers `recovery_done`;
//! 5. it watches its session's health: in Jeopardy it takes no new locks; when the
//!    locks are Lost or the session Expired it "withdraws" — prints a loud message and
//!    exits with status 3 at once, touching nothing more, as a GFS node must stop
//!    writing to the shared disk;
//! 6. at the end (or on Ctrl-C) it unlocks everything, logs out and prints a summary.
//!
//! # Trying it out
//!
//! Start a local cluster (3 servers on 127.0.0.1:7101-7103, nodes `node1`..`node16`):
//!
//! ```text
//! cargo run -p lockd-server --bin lockd -- dev
//! ```
//!
//! Then, in two more terminals, mount the file system on two nodes for a minute:
//!
//! ```text
//! cargo run -p lockd-client --example gfs_node -- 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103 node1 60
//! cargo run -p lockd-client --example gfs_node -- 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103 node2 60
//! ```
//!
//! Both nodes keep taking inode locks and answer each other's callbacks. Now crash
//! one: `kill -9 <pid>` with the pid `node1` printed at start (killing `cargo run`
//! instead may leave the node running). After the expiry window (2 s by default) the
//! leader expires `node1`, and `node2`'s requests on inodes `node1` held EX wait (and
//! time out, printed) — no lock of a failed node is released before it is fenced. The
//! dev cluster has **no fence devices**, so nothing fences `node1` by itself: the
//! operator must confirm that it is dead:
//!
//! ```text
//! cargo run -p lockctl -- fence ack node1
//! ```
//!
//! (`lockctl` talks to 127.0.0.1:7101-7103 unless given `--servers`.) `node2` then
//! receives NeedRecovery for `node1`, replays `node1`'s journal and calls
//! recovery_done, which releases `node1`'s expired EX locks. `node1` may mount again
//! afterwards.
//!
//! Exit status: 0 after a clean unmount, 1 on an error, 2 on a usage error, 3 after a
//! withdraw.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use lockd_client::{
    parse_servers, Client, ClientConfig, Error, Event, LockGuard, LockOptions, Lockspace,
    LockspaceOptions, Mode, RecoveryMode, Resource, SessionHealth,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinSet;

/// The file system (lockspace) every node mounts.
const FS: &str = "gfs0";
/// GFS lock types (as in lock_gulm / lm_interface.h).
const LM_TYPE_INODE: u32 = 2;
const LM_TYPE_JOURNAL: u32 = 4;
/// Journals in the file system.
const JOURNALS: u64 = 16;
/// The inodes the nodes fight over: few, so that they meet often.
const INODES: u64 = 6;
/// How long an inode lock request may wait in the queue before we move on.
const INODE_WAIT: Duration = Duration::from_secs(1);
/// How long the mount may wait for the node's own journal lock.
const MOUNT_WAIT: Duration = Duration::from_secs(30);
/// Simulated journal replay.
const REPLAY_TIME: Duration = Duration::from_millis(100);
/// How long the unmount waits for recoveries still under way.
const RECOVERY_DRAIN: Duration = Duration::from_secs(10);
/// Exit status of a withdraw.
const EXIT_WITHDRAW: u8 = 3;

static START: OnceLock<Instant> = OnceLock::new();
static NODE: OnceLock<String> = OnceLock::new();

/// One line per action, stamped with the time since start and the node name.
macro_rules! say {
    ($($arg:tt)*) => {
        println!(
            "[{:>7.3}s {}] {}",
            START.get_or_init(Instant::now).elapsed().as_secs_f64(),
            NODE.get().map_or("?", String::as_str),
            format_args!($($arg)*)
        )
    };
}

/// A cached glock: held and idle, or in use by a task right now (the work loop, or the
/// event handler while it demotes it). `Busy` keeps others away from the inode.
enum Slot {
    Cached(LockGuard),
    Busy,
}

/// The node's glock cache.
#[derive(Default)]
struct Cache {
    slots: HashMap<u64, Slot>,
    /// Blocking callbacks that arrived while the inode was busy: (lock id, requested
    /// mode). Answered by whoever puts the lock back into the cache.
    pending: HashMap<u64, Vec<(u64, Mode)>>,
}

type SharedCache = Arc<Mutex<Cache>>;

#[derive(Default)]
struct Stats {
    locks_taken: AtomicU64,
    conversions: AtomicU64,
    cache_hits: AtomicU64,
    waits_timed_out: AtomicU64,
    callbacks_answered: AtomicU64,
    recoveries_done: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn usage() -> ExitCode {
    eprintln!("usage: gfs_node <servers host:port,host:port,...> <node-name> [seconds]");
    eprintln!("  e.g. gfs_node 127.0.0.1:7101,127.0.0.1:7102,127.0.0.1:7103 node1 10");
    ExitCode::from(2)
}

#[tokio::main]
async fn main() -> ExitCode {
    START.get_or_init(Instant::now);
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.len() > 3 || args.iter().any(|a| a == "-h" || a == "--help") {
        return usage();
    }
    let servers = match parse_servers(&args[0]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gfs_node: {e}");
            return usage();
        }
    };
    let node = args[1].clone();
    let seconds = match args.get(2).map(|s| s.parse::<u64>()) {
        None => 10,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!(
                "gfs_node: seconds must be a whole number, not {:?}",
                args[2]
            );
            return usage();
        }
    };
    NODE.get_or_init(|| node.clone());
    match run(servers, node, Duration::from_secs(seconds)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            say!("ERROR: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(servers: Vec<String>, node: String, work_for: Duration) -> Result<(), Error> {
    say!(
        "pid {} (kill -9 {} simulates a crash of this node)",
        std::process::id(),
        std::process::id()
    );
    let client = Client::connect(ClientConfig::new(servers, node.clone())).await?;
    say!("logged in: session {}", client.session());

    // Subscribe before opening the lockspace: opening it may bring a NeedRecovery at
    // once (we are the first mounter after a crash).
    let events = client.events();
    let fs = open_fs(&client).await?;

    let cache: SharedCache = Arc::default();
    let stats = Arc::new(Stats::default());
    let (mounted_tx, mounted_rx) = watch::channel(false);
    let (stop_events_tx, stop_events_rx) = watch::channel(false);

    let health_watch = tokio::spawn(watch_health(client.health()));
    let event_loop = tokio::spawn(handle_events(
        events,
        client.clone(),
        fs.clone(),
        Arc::clone(&cache),
        Arc::clone(&stats),
        mounted_rx,
        stop_events_rx,
    ));

    let journal = journal_of(&node);
    let journal_lock = mount(&fs, journal).await?;
    let _ = mounted_tx.send(true);

    // Ctrl-C ends the work early and unmounts cleanly.
    let (interrupt_tx, interrupt_rx) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            let _ = interrupt_tx.send(true);
        }
    });

    say!(
        "working for {} s on inodes 1..={INODES}",
        work_for.as_secs()
    );
    work(&fs, &client, &cache, &stats, work_for, interrupt_rx).await;

    // Unmount: stop answering events first (waiting for recoveries under way), so
    // nobody else touches the cache, then drop every lock and log out.
    say!("unmounting {FS}");
    let _ = stop_events_tx.send(true);
    if event_loop.await.is_err() {
        say!("event handler ended abnormally");
    }
    unlock_all(&cache, journal_lock, journal).await;
    // A logged-out session reads as Expired: stop watching before logging out.
    health_watch.abort();
    client.logout().await?;
    say!("logged out");
    say!(
        "summary: {} inode locks taken, {} conversions, {} cache hits, {} waits timed out, \
         {} callbacks answered, {} recoveries done",
        stats.locks_taken.load(Ordering::Relaxed),
        stats.conversions.load(Ordering::Relaxed),
        stats.cache_hits.load(Ordering::Relaxed),
        stats.waits_timed_out.load(Ordering::Relaxed),
        stats.callbacks_answered.load(Ordering::Relaxed),
        stats.recoveries_done.load(Ordering::Relaxed),
    );
    Ok(())
}

/// Opens the file system's lockspace in EXPLICIT recovery mode (or as it exists).
async fn open_fs(client: &Client) -> Result<Lockspace, Error> {
    let fs = client
        .open_lockspace(
            FS,
            LockspaceOptions {
                recovery: RecoveryMode::Explicit,
                ..LockspaceOptions::default()
            },
        )
        .await?;
    say!(
        "opened lockspace {FS}: recovery {:?}, LVB {} bytes",
        fs.recovery(),
        fs.lvb_len_bytes()
    );
    if fs.recovery() != RecoveryMode::Explicit {
        say!(
            "WARNING: {FS} exists with recovery {:?}: no journal recovery will be asked for",
            fs.recovery()
        );
    }
    Ok(fs)
}

/// Mount: our own journal, EX, for as long as we are mounted. Like GFS2's mount it uses
/// `noexp`: after a crash and fence our old session's journal lock may still be an
/// expired holder, and replaying our own journal is exactly what mounting does.
async fn mount(fs: &Lockspace, journal: u64) -> Result<LockGuard, Error> {
    say!("mounting {FS}: locking my journal {journal} EX (noexp)");
    let journal_lock = match fs
        .lock(
            Resource::gfs(LM_TYPE_JOURNAL, journal),
            Mode::EXCLUSIVE,
            LockOptions::new().noexp().timeout(MOUNT_WAIT),
        )
        .await
    {
        Ok(guard) => guard,
        Err(Error::Timeout(_)) => {
            say!("mount failed: journal {journal} stays held by another node (two nodes with one journal?)");
            return Err(Error::Timeout(format!("journal {journal} lock")));
        }
        Err(e) => return Err(e),
    };
    say!(
        "mounted {FS}: journal {journal} held EX (lock {}, fencing token {})",
        journal_lock.lock_id(),
        journal_lock.token()
    );
    Ok(journal_lock)
}

/// Unlocks every cached inode lock, in inode order, then the journal.
async fn unlock_all(cache: &SharedCache, journal_lock: LockGuard, journal: u64) {
    let cached: Vec<(u64, Slot)> = cache.lock().unwrap().slots.drain().collect();
    let mut cached: Vec<(u64, LockGuard)> = cached
        .into_iter()
        .filter_map(|(inode, slot)| match slot {
            Slot::Cached(guard) => Some((inode, guard)),
            Slot::Busy => None,
        })
        .collect();
    cached.sort_by_key(|(inode, _)| *inode);
    for (inode, guard) in cached {
        let mode = guard.mode();
        match guard.unlock().await {
            Ok(()) => say!("unlock inode {inode} ({mode})"),
            Err(e) => say!("unlock inode {inode} failed: {e} (logout releases it)"),
        }
    }
    match journal_lock.unlock().await {
        Ok(()) => say!("unlock journal {journal}"),
        Err(e) => say!("unlock journal {journal} failed: {e} (logout releases it)"),
    }
}

/// The journal of a node: `nodeN` has journal `N-1`; other names a stable FNV-1a hash
/// of the name modulo [`JOURNALS`]. Every node computes the same answer.
fn journal_of(node: &str) -> u64 {
    let prefix = node.trim_end_matches(|c: char| c.is_ascii_digit());
    match node[prefix.len()..].parse::<u64>() {
        Ok(n) if n >= 1 => (n - 1) % JOURNALS,
        _ => {
            let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
            hash % JOURNALS
        }
    }
}

/// Reads a GFS-style resource name back: (lock type, number).
fn gfs_name(resource: &Resource) -> Option<(u32, u64)> {
    let bytes = resource.as_bytes();
    if bytes.len() != Resource::GFS_NAME_LEN_BYTES {
        return None;
    }
    let lock_type = u32::from_be_bytes(bytes[..4].try_into().ok()?);
    let number = u64::from_be_bytes(bytes[4..].try_into().ok()?);
    Some((lock_type, number))
}

/// Session health: pause in Jeopardy, withdraw on Lost / Expired.
async fn watch_health(mut health: watch::Receiver<SessionHealth>) {
    while health.changed().await.is_ok() {
        let now = *health.borrow_and_update();
        match now {
            SessionHealth::Healthy => say!("health: Healthy again, resuming work"),
            SessionHealth::Jeopardy => {
                say!("health: JEOPARDY (no quorum heard lately): taking no new locks")
            }
            SessionHealth::Lost | SessionHealth::Expired => {
                say!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
                say!("!!! health: {now:?}: our locks may be given to other nodes.");
                say!("!!! WITHDRAW: stopping all I/O to {FS} at once and exiting.");
                say!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
                // No unlock, no logout, no destructor: a withdrawn node touches nothing.
                std::process::exit(i32::from(EXIT_WITHDRAW));
            }
        }
    }
}

/// What the work loop found in the cache for an inode.
enum Found {
    /// Another task is using it (demoting it); try another inode.
    Busy,
    /// Cached: here is the lock (the slot is now marked busy).
    Cached(LockGuard),
    /// Not cached (the slot is now marked busy while we lock it).
    Absent,
}

/// The work loop: random inodes, random modes, locks cached after use.
async fn work(
    fs: &Lockspace,
    client: &Client,
    cache: &SharedCache,
    stats: &Stats,
    work_for: Duration,
    interrupt: watch::Receiver<bool>,
) {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id());
    let mut rng = StdRng::seed_from_u64(seed);
    let health = client.health();
    let deadline = Instant::now() + work_for;
    while Instant::now() < deadline {
        if *interrupt.borrow() {
            say!("Ctrl-C: stopping work");
            break;
        }
        if *health.borrow() != SessionHealth::Healthy {
            // Jeopardy: no new locks (the watcher announced it).
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let inode = rng.gen_range(1..=INODES);
        let want = if rng.gen_bool(0.5) {
            Mode::SHARED
        } else {
            Mode::EXCLUSIVE
        };
        let found = {
            let mut c = cache.lock().unwrap();
            match c.slots.insert(inode, Slot::Busy) {
                Some(Slot::Busy) => Found::Busy,
                Some(Slot::Cached(guard)) => Found::Cached(guard),
                None => Found::Absent,
            }
        };
        let guard = match found {
            Found::Busy => {
                // The event handler owns the slot: leave it alone.
                say!("inode {inode}: busy (callback being answered), skipping");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Found::Cached(guard) => use_cached(inode, guard, want, stats).await,
            Found::Absent => lock_new(fs, inode, want, stats).await,
        };
        if let Some(guard) = &guard {
            // "I/O" under the lock.
            let what = if guard.mode() == Mode::EXCLUSIVE {
                "write"
            } else {
                "read"
            };
            say!(
                "inode {inode}: {what} under {} (token {})",
                guard.mode(),
                guard.token()
            );
            tokio::time::sleep(Duration::from_millis(rng.gen_range(10..50))).await;
        }
        put_back(cache, stats, inode, guard).await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(50..200))).await;
    }
}

/// A cached lock: use it as is, or convert PR up to EX.
async fn use_cached(
    inode: u64,
    mut guard: LockGuard,
    want: Mode,
    stats: &Stats,
) -> Option<LockGuard> {
    if guard.mode() == want || guard.mode() == Mode::EXCLUSIVE {
        Stats::bump(&stats.cache_hits);
        say!(
            "inode {inode}: cache hit ({} cached, {want} wanted)",
            guard.mode()
        );
        return Some(guard);
    }
    let from = guard.mode();
    match guard
        .convert(want, LockOptions::new().timeout(INODE_WAIT))
        .await
    {
        Ok(()) => {
            Stats::bump(&stats.conversions);
            say!(
                "inode {inode}: convert {from} -> {} (token {})",
                guard.mode(),
                guard.token()
            );
            Some(guard)
        }
        Err(Error::Timeout(_)) => {
            Stats::bump(&stats.waits_timed_out);
            say!("inode {inode}: convert {from} -> {want} waited {INODE_WAIT:?}; keeping {from}");
            Some(guard)
        }
        Err(Error::Deadlock(_)) => {
            say!("inode {inode}: convert {from} -> {want} refused (conversion deadlock); releasing {from}");
            if let Err(e) = guard.unlock().await {
                say!("inode {inode}: unlock failed: {e}");
            }
            None
        }
        Err(e) => {
            say!("inode {inode}: convert {from} -> {want} failed: {e}; keeping {from}");
            Some(guard)
        }
    }
}

/// An inode not in the cache: lock it.
async fn lock_new(fs: &Lockspace, inode: u64, want: Mode, stats: &Stats) -> Option<LockGuard> {
    match fs
        .lock(
            Resource::gfs(LM_TYPE_INODE, inode),
            want,
            LockOptions::new().timeout(INODE_WAIT),
        )
        .await
    {
        Ok(guard) => {
            Stats::bump(&stats.locks_taken);
            say!(
                "inode {inode}: lock {want} granted (lock {}, token {})",
                guard.lock_id(),
                guard.token()
            );
            Some(guard)
        }
        Err(Error::Timeout(_)) => {
            Stats::bump(&stats.waits_timed_out);
            say!("inode {inode}: lock {want} waited {INODE_WAIT:?} (held elsewhere); moving on");
            None
        }
        Err(e) => {
            say!("inode {inode}: lock {want} failed: {e}");
            None
        }
    }
}

/// Puts a lock back into the cache (or clears the slot), first answering callbacks that
/// arrived for it while it was busy. Callbacks that name another lock id are stale.
async fn put_back(cache: &SharedCache, stats: &Stats, inode: u64, mut guard: Option<LockGuard>) {
    loop {
        let requests: Vec<Mode> = {
            let mut c = cache.lock().unwrap();
            let pending = c.pending.remove(&inode).unwrap_or_default();
            let requests: Vec<Mode> = pending
                .into_iter()
                .filter(|(lock_id, _)| guard.as_ref().is_some_and(|g| g.lock_id() == *lock_id))
                .map(|(_, mode)| mode)
                .collect();
            if requests.is_empty() {
                match guard.take() {
                    Some(g) => c.slots.insert(inode, Slot::Cached(g)),
                    None => c.slots.remove(&inode),
                };
                return;
            }
            requests
        };
        for requested in requests {
            if let Some(g) = guard.take() {
                guard = answer_callback(inode, g, requested, stats).await;
            }
        }
    }
}

/// Answers a blocking callback (GFS's NEED_S / NEED_E): another node waits for
/// `requested`. EX is demoted to PR when the other node only wants to read;
/// otherwise the lock is released. Returns the lock if we still hold it.
async fn answer_callback(
    inode: u64,
    mut guard: LockGuard,
    requested: Mode,
    stats: &Stats,
) -> Option<LockGuard> {
    Stats::bump(&stats.callbacks_answered);
    let held = guard.mode();
    if held.is_compatible(requested) {
        say!("callback: inode {inode}: another node wants {requested}, compatible with our {held}; keeping it");
        return Some(guard);
    }
    if held == Mode::EXCLUSIVE && requested.is_compatible(Mode::SHARED) {
        match guard.convert(Mode::SHARED, LockOptions::new()).await {
            Ok(()) => {
                say!("callback: inode {inode}: another node wants {requested}: demoted EX -> PR");
                return Some(guard);
            }
            Err(e) => {
                say!("callback: inode {inode}: demote EX -> PR failed ({e}); releasing instead")
            }
        }
    }
    match guard.unlock().await {
        Ok(()) => {
            say!("callback: inode {inode}: another node wants {requested}: released our {held}")
        }
        Err(e) => say!("callback: inode {inode}: release of {held} failed: {e}"),
    }
    None
}

/// The event handler: blocking callbacks inline (they only demote or release), journal
/// recoveries in tasks of their own (they may wait for locks).
async fn handle_events(
    mut events: broadcast::Receiver<Event>,
    client: Client,
    fs: Lockspace,
    cache: SharedCache,
    stats: Arc<Stats>,
    mounted: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let mut recoveries = JoinSet::new();
    loop {
        let event = tokio::select! {
            _ = stop.changed() => break,
            Some(_) = recoveries.join_next(), if !recoveries.is_empty() => continue,
            event = events.recv() => event,
        };
        match event {
            Ok(Event::Blocking {
                lock_id,
                lockspace,
                resource,
                requested,
            }) => {
                if lockspace != fs.name() {
                    continue;
                }
                match gfs_name(&resource) {
                    Some((LM_TYPE_INODE, inode)) => {
                        on_inode_callback(&cache, &stats, inode, lock_id, requested).await;
                    }
                    Some((LM_TYPE_JOURNAL, journal)) => say!(
                        "callback: journal {journal}: another node wants {requested}; \
                         a mounted node keeps its journal lock"
                    ),
                    _ => say!("callback on unknown resource {resource}; ignored"),
                }
            }
            Ok(Event::NeedRecovery {
                lockspace,
                node,
                first_mounter,
            }) => {
                recoveries.spawn(recover(
                    client.clone(),
                    fs.clone(),
                    Arc::clone(&stats),
                    mounted.clone(),
                    lockspace,
                    node,
                    first_mounter,
                ));
            }
            Ok(Event::Notice { state, message }) => {
                say!("notice from the servers: {state}: {message}")
            }
            Ok(Event::Finished { .. }) => {}
            Err(broadcast::error::RecvError::Lagged(n)) => {
                say!("WARNING: missed {n} events (handler too slow)")
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
    if recoveries.is_empty() {
        return;
    }
    say!("waiting for {} recovery(ies) under way", recoveries.len());
    let drain = async { while recoveries.join_next().await.is_some() {} };
    if tokio::time::timeout(RECOVERY_DRAIN, drain).await.is_err() {
        say!("recovery still under way after {RECOVERY_DRAIN:?}; abandoning it (another node will be asked)");
    }
}

/// A blocking callback for an inode lock: answer it now if the lock is idle in the
/// cache, or leave it for whoever is using the lock.
async fn on_inode_callback(
    cache: &SharedCache,
    stats: &Stats,
    inode: u64,
    lock_id: u64,
    requested: Mode,
) {
    let guard = {
        let mut c = cache.lock().unwrap();
        match c.slots.get(&inode) {
            Some(Slot::Cached(g)) if g.lock_id() == lock_id => {
                match c.slots.insert(inode, Slot::Busy) {
                    Some(Slot::Cached(g)) => g,
                    _ => unreachable!("the slot held this lock a moment ago"),
                }
            }
            Some(Slot::Busy) => {
                c.pending
                    .entry(inode)
                    .or_default()
                    .push((lock_id, requested));
                say!("callback: inode {inode}: another node wants {requested}; in use, answering after use");
                return;
            }
            // An older lock on the inode, already released.
            _ => return,
        }
    };
    let guard = answer_callback(inode, guard, requested, stats).await;
    put_back(cache, stats, inode, guard).await;
}

/// Journal recovery of a fenced node (GFS's recovery thread).
async fn recover(
    client: Client,
    fs: Lockspace,
    stats: Arc<Stats>,
    mut mounted: watch::Receiver<bool>,
    lockspace: String,
    node: String,
    first_mounter: bool,
) {
    if lockspace != fs.name() {
        say!("NeedRecovery for {node} in {lockspace}, which we have not mounted; ignored");
        return;
    }
    let journal = journal_of(&node);
    say!("NeedRecovery: node {node} was fenced (first mounter: {first_mounter}); recovering its journal {journal}");
    if node == client.node() {
        // Our own previous life: our mount holds our journal lock (noexp); replay under it.
        if mounted.wait_for(|m| *m).await.is_err() {
            return;
        }
        say!("recovery: journal {journal} is my own, held since mount: replaying it");
        tokio::time::sleep(REPLAY_TIME).await;
    } else {
        let guard = match fs
            .lock(
                Resource::gfs(LM_TYPE_JOURNAL, journal),
                Mode::EXCLUSIVE,
                LockOptions::new().noexp(),
            )
            .await
        {
            Ok(guard) => guard,
            Err(e) => {
                say!("recovery of {node}: cannot lock journal {journal}: {e}");
                return;
            }
        };
        say!(
            "recovery: journal {journal} of {node} locked EX (noexp, token {}): replaying it",
            guard.token()
        );
        tokio::time::sleep(REPLAY_TIME).await;
        if let Err(e) = guard.unlock().await {
            say!("recovery of {node}: unlock of journal {journal} failed: {e}");
        }
    }
    match client.recovery_done(&lockspace, &node).await {
        Ok(()) => {
            Stats::bump(&stats.recoveries_done);
            say!("RECOVERED {node}'s journal {journal}: recovery_done sent, its expired locks are released");
        }
        Err(Error::FailedPrecondition(msg)) if msg.contains("no expired holders") => {
            say!("recovery of {node}: already done by another node ({msg})");
        }
        Err(e) => say!("recovery of {node}: recovery_done failed: {e}"),
    }
}
