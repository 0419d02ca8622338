//! `lockd-client`: the library cluster nodes link to take locks from lockd.
//!
//! ```no_run
//! # async fn demo() -> lockd_client::Result<()> {
//! use lockd_client::{Client, ClientConfig, LockOptions, LockspaceOptions, Mode, Resource};
//!
//! let client = Client::connect(ClientConfig::new(
//!     ["127.0.0.1:7101", "127.0.0.2:7101", "127.0.0.3:7101"],
//!     "node1",
//! ))
//! .await?;
//! let fs = client.open_lockspace("gfs0", LockspaceOptions::default()).await?;
//! let guard = fs.lock(Resource::gfs(2, 4711), Mode::EXCLUSIVE, LockOptions::new()).await?;
//! println!("fencing token {}", guard.token());
//! guard.unlock().await?;
//! client.logout().await?;
//! # Ok(()) }
//! ```
//!
//! # Finding the leader
//!
//! Every call must reach the Raft leader. The client keeps a channel per server and
//! remembers which one answered last. A follower answers UNAVAILABLE with the leader's
//! address in the `lockd-leader` metadata, and the client follows it; without an address
//! (an election is under way, or there is no quorum), after a "no quorum" answer and
//! after a connection error, it tries the next server after a back-off that starts at
//! 20 ms and doubles up to 200 ms. The caller never sees a redirect. Once the call's
//! deadline has passed, it fails with [`Error::NoQuorum`], naming the last failure.
//! The deadline is [`ClientConfig::no_quorum_timeout`] (3 s by default) for every call
//! except `Lock` and `Convert` (and a login with [`ClientConfig::wait_for_login`]),
//! see below.
//!
//! # Why retrying is safe: request ids
//!
//! A retry may reach a server that already applied the first attempt (its answer was lost
//! in a failover). So every state-changing request carries a `request_id`: a per-session
//! counter that starts at 1 and only grows, assigned ONCE per logical operation and
//! REUSED on every retry of that operation. The server applies an id once and answers a
//! retry with the first outcome. Each request also carries `ack_below`, the smallest id
//! whose answer this client has not received yet; the server may forget the outcomes of
//! all ids below it. Login has no session yet, so it carries a random nonce instead,
//! reused on its retries.
//!
//! # Blocking calls
//!
//! `Lock` and `Convert` wait in the server's queue until granted or failed, and a wait
//! may outlive a failover. The client therefore retries them (same request id) through
//! connection losses and leader changes until it gets a final answer; a retried request
//! that is still queued simply waits again. Waiting means waiting: without a queue
//! timeout the call never gives up on its own, however long the cluster is without
//! quorum (a restart of the whole cluster included) — drop the [`PendingLock`] or use
//! its [`CancelHandle`] to stop waiting. With a queue timeout it fails at the timeout:
//! [`Error::Timeout`] if the server's queue timeout fired, [`Error::NoQuorum`] if no
//! leader answered by then (the request is then cancelled in the background and a late
//! grant released).
//!
//! # During a loss of quorum
//!
//! | call | while no leader with quorum answers |
//! |---|---|
//! | [`Client::connect`] | retried; [`Error::NoQuorum`] after [`ClientConfig::no_quorum_timeout`] (3 s), or waits with [`ClientConfig::wait_for_login`] |
//! | [`Lockspace::lock`], [`Lockspace::request`], [`LockGuard::convert`] | wait without a timeout; [`Error::NoQuorum`] at their timeout with one (a `try` request without one: after `no_quorum_timeout`) |
//! | [`Client::open_lockspace`], [`LockGuard::unlock`], [`CancelHandle::cancel`], [`Client::recovery_done`], [`Client::check_token`], [`TokenChecker::check_token`], [`Client::logout`] | retried; [`Error::NoQuorum`] after `no_quorum_timeout` (the outcome of a state-changing one is then unknown; its request id makes a later retry safe) |
//! | [`Client::health`] | `Jeopardy`, then `Lost` strictly before any server could expire the session; `Healthy` again if a heartbeat later finds it alive, `Expired` if not |
//! | [`Client::events`] | silent; reopened on the new leader, events sent meanwhile may be missed |
//!
//! Throughout, the session's keeper heartbeats every 2/3 of the heartbeat interval:
//! the library never abandons a session while a handle on it exists, so a node that
//! keeps its client through an outage shorter than the servers' grace is not expired.
//! Only [`Client::logout`] or dropping every handle ends it.
//!
//! # Dropping handles
//!
//! Dropping a [`PendingLock`] cancels the request on the server, and a grant that arrives
//! anyway is released. Dropping a [`LockGuard`] releases its lock in the background.
//! Dropping the last handle on a session (every [`Client`] clone, [`Lockspace`], guard and
//! request) logs it out in the background; prefer [`Client::logout`], which reports
//! errors. A session that is neither logged out nor kept alive is eventually expired by
//! the servers, and its node fenced.
//!
//! # Liveness
//!
//! After login a background keeper heartbeats every 2/3 of the server's heartbeat
//! interval, keeps the session's event stream open on the leader (reopening it after
//! a failover), and publishes the session's [`SessionHealth`]: `Healthy`, `Jeopardy`
//! after half the expiry window without a quorum-confirmed heartbeat, `Lost` before the
//! window ends (strictly before any server could expire the session and give its
//! locks away; the rule is proved in the `keeper` module), `Expired` once the servers
//! expired it. [`Client::health`] returns a watch of it, [`Client::events`] a stream
//! of blocking callbacks and notices.
//!
//! # Concurrency
//!
//! A [`Client`] is a cheap, clonable handle: many tasks may lock through one session at
//! once. No lock inside the client is held across an await.

#![warn(missing_docs)]

mod client;
mod config;
mod error;
mod guard;
mod keeper;
pub mod leader;
mod lockspace;
mod mode;
mod options;
mod pipeline;
mod request_ids;
mod resource;
mod tls;
mod transport;

pub use client::{Client, TokenCheck, TokenChecker};
pub use config::{parse_servers, ClientConfig};
pub use error::{Error, Result};
pub use guard::LockGuard;
pub use keeper::{Event, SessionHealth};
pub use lockspace::{CancelHandle, Lockspace, PendingLock};
pub use mode::{Mode, ParseModeError};
pub use options::{LockFlags, LockOptions, LockspaceOptions, RecoveryMode};
pub use resource::Resource;
pub use tls::{endpoint, TlsOptions};

/// The gRPC status code type used in [`Error::Rpc`].
pub use tonic::Code;
