//! Calls on the Raft leader for any gRPC service, with the leader following of the
//! node client ([`crate::transport`]'s retry loop, not a second one): a follower's
//! UNAVAILABLE with a `lockd-leader` address moves the call there, UNAVAILABLE without
//! one and transport failures move it to the next server after a pause, until a server
//! answers or the search time is up. `lockctl`'s admin calls go through it.
//!
//! The call is made again on every attempt, so it must be safe to repeat (admin
//! calls are: a retry of an applied change is refused or answered the same way).

use std::future::Future;
use std::time::Duration;

use tonic::transport::Channel;
use tonic::Status;

use crate::config::ClientConfig;
use crate::error::{Error, Result};
use crate::tls::TlsOptions;
use crate::transport::{CallKind, Transport};

/// How a [`Leader`] looks for the leader.
#[derive(Clone)]
pub struct LeaderConfig {
    /// TLS settings; `None` = plaintext.
    pub tls: Option<TlsOptions>,
    /// How long connecting to one server may take.
    pub connect_timeout: Duration,
    /// How long one attempt may take once sent.
    pub call_timeout: Duration,
    /// How long the whole call may take, redirects and retries included.
    pub search_timeout: Duration,
    /// The pause before asking again when no server named a leader.
    pub retry_pause: Duration,
}

/// Why a call on the leader ended without a reply.
#[derive(Debug)]
pub enum LeaderError {
    /// A server answered with this status (not a redirect): the call's own refusal.
    Answered(Box<Status>),
    /// No leader answered within the search time; `last` is the last failure seen.
    NoLeader {
        /// How long the search went on.
        waited: Duration,
        /// The last failure, as `addr: what happened`.
        last: String,
    },
}

/// Channels to the listed servers (and to any leader they name), and the one believed
/// to lead. Cheap to keep for several calls.
pub struct Leader {
    transport: Transport,
}

impl Leader {
    /// Lazily connected channels for `servers` (`host:port`, at most
    /// [`crate::ClientConfig`]'s limit of servers). Needs a tokio runtime.
    pub fn new(servers: &[String], config: LeaderConfig) -> Result<Leader> {
        let cfg = ClientConfig {
            tls: config.tls,
            connect_timeout: config.connect_timeout,
            attempt_timeout: config.call_timeout,
            no_quorum_timeout: config.search_timeout,
            backoff_min: config.retry_pause,
            backoff_max: config.retry_pause,
            // An operator's server list may name only some servers; the leader they
            // name is a member all the same.
            follow_unlisted_redirects: true,
            ..ClientConfig::new(servers.iter().cloned(), "")
        };
        let servers = cfg.validated_servers()?;
        Ok(Leader {
            transport: Transport::new(&servers, &cfg)?,
        })
    }

    /// Runs `call` on the leader's channel: `what` names it in the logs.
    pub async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        mut call: F,
    ) -> std::result::Result<T, LeaderError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        self.transport
            .call_routed(what, CallKind::Short, move |route| call(route.channel))
            .await
            .map_err(|failed| match (failed.answer, failed.error) {
                (Some(status), _) => LeaderError::Answered(status),
                (None, Error::NoQuorum { waited, last }) => LeaderError::NoLeader { waited, last },
                (None, other) => LeaderError::NoLeader {
                    waited: Duration::ZERO,
                    last: other.to_string(),
                },
            })
    }
}
