//! The client's typed errors and the one place where a gRPC status from a lock server
//! becomes an [`Error`].
//!
//! Redirects, "no quorum" answers and transport failures never reach this mapping on
//! their own: the retry loop in [`crate::transport`] absorbs them and only reports
//! [`Error::NoQuorum`] once the call's deadline has passed. Everything else is final and
//! keeps the server's message verbatim.

use std::time::Duration;

use tonic::{Code, Status};

/// Shorthand for `Result<T, lockd_client::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a lockd call failed.
///
/// Variants that carry a `String` keep the server's message unchanged, so it can be shown
/// to an operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// No server that is the Raft leader with a working quorum answered before the call's
    /// deadline. `last` describes the last failure seen (a redirect, a refused connection,
    /// the leader's own "no quorum" answer, ...).
    #[error("no quorum: no lock server leader answered within {} (last: {last})", fmt_duration(*.waited))]
    NoQuorum {
        /// How long the client kept trying.
        waited: Duration,
        /// The last failure seen before giving up.
        last: String,
    },
    /// A `try` / `try_1cb` request could not be granted at once (ABORTED "would block").
    #[error("{}", prefixed("would block", .0))]
    WouldBlock(String),
    /// The waiting request was cancelled (ABORTED "cancelled").
    #[error("{}", prefixed("cancelled", .0))]
    Cancelled(String),
    /// The conversion was refused because it would deadlock with another conversion
    /// (ABORTED "conversion deadlock").
    #[error("{}", prefixed("deadlock", .0))]
    Deadlock(String),
    /// Any other ABORTED answer.
    #[error("{}", prefixed("aborted", .0))]
    Aborted(String),
    /// The request's queue timeout passed before it could be granted (DEADLINE_EXCEEDED).
    #[error("{}", prefixed("timed out", .0))]
    Timeout(String),
    /// Unknown session, lock id or lockspace (NOT_FOUND).
    #[error("{}", prefixed("not found", .0))]
    NotFound(String),
    /// Malformed input: bad name, mode, LVB size, ... (INVALID_ARGUMENT).
    #[error("{}", prefixed("invalid argument", .0))]
    InvalidArgument(String),
    /// The request does not fit the current state: expired session, double unlock, ...
    /// (FAILED_PRECONDITION).
    #[error("{}", prefixed("failed precondition", .0))]
    FailedPrecondition(String),
    /// A server-side limit was reached (RESOURCE_EXHAUSTED).
    #[error("{}", prefixed("resource exhausted", .0))]
    ResourceExhausted(String),
    /// The caller lacks the identity the operation needs (PERMISSION_DENIED /
    /// UNAUTHENTICATED).
    #[error("{}", prefixed("permission denied", .0))]
    PermissionDenied(String),
    /// The thing to create exists already (ALREADY_EXISTS), e.g. a node logged in twice.
    #[error("{}", prefixed("already exists", .0))]
    AlreadyExists(String),
    /// Any other status the server (or the transport) returned.
    #[error("rpc failed ({code:?}): {message}")]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
    /// The server answered with something this client cannot interpret.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The client configuration is unusable (empty or malformed server list, ...).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// The task that drove a lock request ended without an answer, which happens only
    /// when the tokio runtime shuts down.
    #[error("the lock request was abandoned: the runtime is shutting down")]
    Abandoned,
}

impl Error {
    /// Maps a final gRPC status to an error, keeping the server's message.
    ///
    /// ABORTED is split by its message, which the server words as "would block",
    /// "cancelled" or "conversion deadlock". UNAVAILABLE should not get here (the retry
    /// loop consumes it); if it does, it is reported as [`Error::NoQuorum`].
    pub fn from_status(status: &Status) -> Error {
        let message = status.message().to_string();
        match status.code() {
            Code::Aborted => {
                let lower = message.to_ascii_lowercase();
                if lower.contains("would block") {
                    Error::WouldBlock(message)
                } else if lower.contains("deadlock") {
                    Error::Deadlock(message)
                } else if lower.contains("cancel") {
                    Error::Cancelled(message)
                } else {
                    Error::Aborted(message)
                }
            }
            Code::DeadlineExceeded => Error::Timeout(message),
            Code::NotFound => Error::NotFound(message),
            Code::InvalidArgument => Error::InvalidArgument(message),
            Code::FailedPrecondition => Error::FailedPrecondition(message),
            Code::ResourceExhausted => Error::ResourceExhausted(message),
            Code::PermissionDenied | Code::Unauthenticated => Error::PermissionDenied(message),
            Code::AlreadyExists => Error::AlreadyExists(message),
            Code::Unavailable => Error::NoQuorum {
                waited: Duration::ZERO,
                last: message,
            },
            code => Error::Rpc { code, message },
        }
    }

    /// True for [`Error::NoQuorum`]: the cluster could not be reached or has no quorum,
    /// and the outcome of a state-changing call is unknown.
    pub fn is_no_quorum(&self) -> bool {
        matches!(self, Error::NoQuorum { .. })
    }
}

/// The server's message, prefixed with the error kind unless it already says it
/// ("would block" rather than "would block: would block").
fn prefixed(kind: &str, message: &str) -> String {
    if message.is_empty() {
        kind.to_string()
    } else if message.to_ascii_lowercase().contains(kind) {
        message.to_string()
    } else {
        format!("{kind}: {message}")
    }
}

/// "3s", "1.5s", "250ms": a deadline as an operator would write it.
fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else if ms > 1000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aborted_is_split_by_the_servers_wording() {
        let e = Error::from_status(&Status::aborted("would block: EX held by node2"));
        assert_eq!(e, Error::WouldBlock("would block: EX held by node2".into()));
        let e = Error::from_status(&Status::aborted("cancelled"));
        assert_eq!(e, Error::Cancelled("cancelled".into()));
        let e = Error::from_status(&Status::aborted("conversion deadlock with lock 7"));
        assert_eq!(e, Error::Deadlock("conversion deadlock with lock 7".into()));
        let e = Error::from_status(&Status::aborted("something else"));
        assert_eq!(e, Error::Aborted("something else".into()));
    }

    #[test]
    fn input_errors_keep_code_and_message() {
        assert_eq!(
            Error::from_status(&Status::invalid_argument("resource longer than 64 bytes")),
            Error::InvalidArgument("resource longer than 64 bytes".into())
        );
        assert_eq!(
            Error::from_status(&Status::not_found("unknown lock id 9")),
            Error::NotFound("unknown lock id 9".into())
        );
        assert_eq!(
            Error::from_status(&Status::failed_precondition("session expired")),
            Error::FailedPrecondition("session expired".into())
        );
        assert_eq!(
            Error::from_status(&Status::resource_exhausted("too many waiters")),
            Error::ResourceExhausted("too many waiters".into())
        );
        assert_eq!(
            Error::from_status(&Status::permission_denied("admin only")),
            Error::PermissionDenied("admin only".into())
        );
    }

    #[test]
    fn display_does_not_repeat_the_kind() {
        assert_eq!(
            Error::WouldBlock("would block".into()).to_string(),
            "would block"
        );
        assert_eq!(Error::WouldBlock(String::new()).to_string(), "would block");
        assert_eq!(
            Error::NotFound("unknown session 4".into()).to_string(),
            "not found: unknown session 4"
        );
        assert_eq!(
            Error::Deadlock("conversion deadlock".into()).to_string(),
            "conversion deadlock"
        );
    }

    #[test]
    fn queue_timeout_is_timeout() {
        let e = Error::from_status(&Status::deadline_exceeded("waited 100ms"));
        assert_eq!(e, Error::Timeout("waited 100ms".into()));
    }

    #[test]
    fn unexpected_codes_are_kept_raw() {
        let e = Error::from_status(&Status::internal("boom"));
        assert_eq!(
            e,
            Error::Rpc {
                code: Code::Internal,
                message: "boom".into()
            }
        );
    }

    #[test]
    fn no_quorum_message_names_the_deadline_and_last_failure() {
        let e = Error::NoQuorum {
            waited: Duration::from_secs(3),
            last: "127.0.0.1:7101: connection refused".into(),
        };
        assert_eq!(
            e.to_string(),
            "no quorum: no lock server leader answered within 3s \
             (last: 127.0.0.1:7101: connection refused)"
        );
        assert!(e.is_no_quorum());
        let e = Error::NoQuorum {
            waited: Duration::from_millis(1500),
            last: "x".into(),
        };
        assert!(e.to_string().contains("within 1.5s"), "{e}");
        let e = Error::NoQuorum {
            waited: Duration::from_millis(250),
            last: "x".into(),
        };
        assert!(e.to_string().contains("within 250ms"), "{e}");
    }
}
