//! A nemesis client: one node session as its own process, so the harness can SIGSTOP,
//! partition (through its own proxies) and SIGKILL it.
//!
//! Usage:
//!   lockd-nemesis-client run <servers> <node> <client> <history.jsonl> <seed> <stop-file> <resources>
//!     Random lock / convert / unlock of mixed modes on `resources` resources of
//!     lockspace "nemesis", one lock per resource at most, appending every invocation
//!     and outcome to the history (see `lockd_tests::nemesis::history`). When its
//!     library reports the session Lost or Expired it records `lost` and exits at once;
//!     after a failure whose outcome is unknown it records `exit` and exits. Once the
//!     stop file exists it records `stopped` and idles, keeping its locks and session.
//!     After a SIGUSR1 it is a zombie: a node that lives on after its session is
//!     lost, as a real node does while its fence agent runs. It records the lost health
//!     as `zombie` and goes on with its old session; a failure whose outcome is unknown
//!     is recorded and the loop continues. Only the fence agent's SIGKILL stops it.
//!     It reaches the servers only through the addresses it is given (never following
//!     a redirect elsewhere), so cutting its proxies cuts it off.
//!   lockd-nemesis-client protected <servers> <node> <resource-addr>
//!     Takes EX on "protected", prints `GRANTED <token>`, then writes to the protected
//!     resource at `resource-addr` with that token every 20 ms, printing each answer as
//!     `WRITE <token> <answer>`, whatever its health: a stale writer on purpose.

use lockd_client::{Client, ClientConfig, Error, LockGuard, LockOptions, Mode, SessionHealth};
use lockd_tests::nemesis::history::{now_us, Kind, Op, Record, Writer};
use lockd_tests::Rng;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A mode, weighted towards the conflicting ones.
fn random_mode(rng: &mut Rng) -> Mode {
    const WEIGHTED: [Mode; 14] = [
        Mode::Nl,
        Mode::Cr,
        Mode::Cr,
        Mode::Cw,
        Mode::Cw,
        Mode::Pr,
        Mode::Pr,
        Mode::Pr,
        Mode::Pw,
        Mode::Pw,
        Mode::Ex,
        Mode::Ex,
        Mode::Ex,
        Mode::Ex,
    ];
    WEIGHTED[rng.below(WEIGHTED.len() as u64) as usize]
}

type Log = Arc<Mutex<Writer>>;

struct Recorder {
    log: Log,
    client: String,
}

impl Recorder {
    fn write(&self, r: Record) {
        let mut w = self.log.lock().unwrap_or_else(|p| p.into_inner());
        let _ = w.append(&r.client(&self.client));
    }

    /// Records `last` and ends the process while still holding the history, so no
    /// other record can follow it.
    fn finish(&self, last: Vec<Record>, code: i32) -> ! {
        let mut w = self.log.lock().unwrap_or_else(|p| p.into_inner());
        for r in last {
            let _ = w.append(&r.client(&self.client));
        }
        std::process::exit(code)
    }
}

/// Failures after which the server certainly did not apply the request.
fn definite(e: &Error) -> bool {
    matches!(
        e,
        Error::WouldBlock(_) | Error::Timeout(_) | Error::Deadlock(_) | Error::Cancelled(_)
    )
}

fn fail(op: Op, res: &str, mode: Mode, e: &Error) -> Record {
    let mut r = Record::new(now_us(), Kind::Fail).op(op, res, mode.as_str());
    r.err = e.to_string();
    r.ambiguous = !definite(e);
    r
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("run") if args.len() == 9 => run(&args[2..]).await,
        Some("protected") if args.len() == 5 => protected(&args[2..]).await,
        _ => anyhow::bail!("usage: see the module documentation of lockd-nemesis-client"),
    }
}

async fn run(args: &[String]) -> anyhow::Result<()> {
    let servers: Vec<String> = args[0].split(',').map(String::from).collect();
    let node = args[1].clone();
    let rec = Recorder {
        log: Arc::new(Mutex::new(Writer::open(&PathBuf::from(&args[3]))?)),
        client: args[2].clone(),
    };
    let mut rng = Rng::new(args[4].parse()?);
    let stop = PathBuf::from(&args[5]);
    let resources: u64 = args[6].parse()?;

    // Log in; refused while this node's previous session awaits its fence.
    let client = loop {
        if stop.exists() {
            rec.finish(
                vec![Record::new(now_us(), Kind::Exit).what("stop before login")],
                0,
            );
        }
        let mut config = ClientConfig::new(servers.clone(), node.as_str());
        config.follow_unlisted_redirects = false;
        match Client::connect(config).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut login = Record::new(now_us(), Kind::Login);
    login.session = client.session();
    rec.write(login);

    let mut health = client.health();
    let watcher = Recorder {
        log: rec.log.clone(),
        client: rec.client.clone(),
    };
    let zombie = Arc::new(AtomicBool::new(false));
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
    let turned = zombie.clone();
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            turned.store(true, Ordering::SeqCst);
        }
    });
    let is_zombie = zombie.clone();
    tokio::spawn(async move {
        while health.changed().await.is_ok() {
            let h = *health.borrow();
            if matches!(h, SessionHealth::Lost | SessionHealth::Expired) {
                let what = format!("{h:?}");
                if is_zombie.load(Ordering::SeqCst) {
                    watcher.write(Record::new(now_us(), Kind::Zombie).what(&what));
                    continue;
                }
                watcher.finish(vec![Record::new(now_us(), Kind::Lost).what(&what)], 3);
            }
        }
    });
    // How an operation whose outcome is unknown ends: a well-behaved client stops
    // using locks; a zombie records it and carries on.
    let give_up = |rec: &Recorder, last: Record| {
        if zombie.load(Ordering::SeqCst) {
            rec.write(last);
        } else {
            rec.finish(vec![last, Record::new(now_us(), Kind::Exit)], 4);
        }
    };

    let ls = match client
        .open_lockspace("nemesis", lockd_client::LockspaceOptions::default())
        .await
    {
        Ok(ls) => ls,
        Err(e) => rec.finish(
            vec![Record::new(now_us(), Kind::Exit).what(&format!("open lockspace: {e}"))],
            4,
        ),
    };

    let mut held: BTreeMap<String, LockGuard> = BTreeMap::new();
    loop {
        if stop.exists() {
            rec.write(Record::new(now_us(), Kind::Stopped));
            // Keep the session (and its locks) alive until the harness kills us.
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.below(30))).await;
        let res = format!("r{}", rng.below(resources));
        let timeout = Duration::from_millis(300 + rng.below(1500));
        match held.remove(&res) {
            None => {
                let mode = random_mode(&mut rng);
                let mut opts = LockOptions::new().timeout(timeout);
                if rng.below(5) == 0 {
                    opts = LockOptions::new().try_lock();
                }
                rec.write(Record::new(now_us(), Kind::Invoke).op(Op::Lock, &res, mode.as_str()));
                match ls.lock(res.as_str(), mode, opts).await {
                    Ok(g) => {
                        rec.write(
                            Record::new(now_us(), Kind::Ok)
                                .op(Op::Lock, &res, g.mode().as_str())
                                .token(g.token()),
                        );
                        held.insert(res, g);
                    }
                    Err(e) if definite(&e) => rec.write(fail(Op::Lock, &res, mode, &e)),
                    Err(e) => give_up(&rec, fail(Op::Lock, &res, mode, &e)),
                }
            }
            Some(g) if rng.below(5) < 2 => {
                rec.write(Record::new(now_us(), Kind::Invoke).op(
                    Op::Unlock,
                    &res,
                    g.mode().as_str(),
                ));
                let mode = g.mode();
                match g.unlock().await {
                    Ok(()) => rec.write(Record::new(now_us(), Kind::Ok).op(
                        Op::Unlock,
                        &res,
                        mode.as_str(),
                    )),
                    Err(e) => give_up(&rec, fail(Op::Unlock, &res, mode, &e)),
                }
            }
            Some(mut g) => {
                let from = g.mode();
                let mut to = random_mode(&mut rng);
                if to == from {
                    to = Mode::ALL[(rng.below(6)) as usize];
                }
                rec.write(
                    Record::new(now_us(), Kind::Invoke)
                        .op(Op::Convert, &res, to.as_str())
                        .from_mode(from.as_str()),
                );
                match g.convert(to, LockOptions::new().timeout(timeout)).await {
                    Ok(()) => rec.write(
                        Record::new(now_us(), Kind::Ok)
                            .op(Op::Convert, &res, g.mode().as_str())
                            .from_mode(from.as_str())
                            .token(g.token()),
                    ),
                    Err(e) if definite(&e) => {
                        rec.write(fail(Op::Convert, &res, to, &e).from_mode(from.as_str()))
                    }
                    Err(e) => give_up(
                        &rec,
                        fail(Op::Convert, &res, to, &e).from_mode(from.as_str()),
                    ),
                }
                held.insert(res, g);
            }
        }
    }
}

async fn protected(args: &[String]) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let servers: Vec<String> = args[0].split(',').map(String::from).collect();
    let client = Client::connect(ClientConfig::new(servers, args[1].as_str())).await?;
    let ls = client
        .open_lockspace("nemesis", lockd_client::LockspaceOptions::default())
        .await?;
    let guard = ls.lock("protected", Mode::Ex, LockOptions::new()).await?;
    let token = guard.token();
    println!("GRANTED {token}");
    loop {
        let answer = match tokio::net::TcpStream::connect(&args[2]).await {
            Ok(mut s) => {
                let _ = s.write_all(format!("WRITE {token}\n").as_bytes()).await;
                let mut line = String::new();
                let _ = BufReader::new(s).read_line(&mut line).await;
                line.trim().to_string()
            }
            Err(e) => format!("ERR {e}"),
        };
        println!("WRITE {token} {answer}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
