//! The edge between the wire and the lock table: turns protobuf requests into
//! validated [`Command`]s and lock-table outcomes into protobuf replies and gRPC
//! statuses. Every check that needs no state happens here, so malformed input never
//! reaches Raft; checks that need state (sessions, lock ids, LVB lengths) are the lock
//! table's, which changes nothing when it refuses.
//!
//! This is the only place that maps errors to gRPC codes (BRIEF §3.6).

// `tonic::Status` is the error type of every gRPC handler; boxing it here would
// only add an allocation per refusal at the edge.
#![allow(clippy::result_large_err)]

use crate::raft_node::ProposeError;
use crate::state::{
    Command, Departure, DepartureKind, Event, FenceRecord, FenceStep, Flags, GrantInfo, LockError,
    Mode, NodeState, RecoveryMode,
};
use crate::state::{MAX_LVB_LEN_BYTES, MAX_NAME_BYTES};
use lockd_proto::v1 as pb;
use lockd_proto::{quote, LEADER_METADATA_KEY};
use tonic::{Code, Status};

pub fn mode_from_proto(raw: i32) -> Result<Mode, Status> {
    match pb::Mode::try_from(raw) {
        Ok(pb::Mode::Nl) => Ok(Mode::Nl),
        Ok(pb::Mode::Cr) => Ok(Mode::Cr),
        Ok(pb::Mode::Cw) => Ok(Mode::Cw),
        Ok(pb::Mode::Pr) => Ok(Mode::Pr),
        Ok(pb::Mode::Pw) => Ok(Mode::Pw),
        Ok(pb::Mode::Ex) => Ok(Mode::Ex),
        Ok(pb::Mode::Unspecified) | Err(_) => Err(Status::invalid_argument(format!(
            "unknown lock mode {raw}: use NL, CR, CW, PR, PW or EX"
        ))),
    }
}

pub fn mode_to_proto(mode: Mode) -> pb::Mode {
    match mode {
        Mode::Nl => pb::Mode::Nl,
        Mode::Cr => pb::Mode::Cr,
        Mode::Cw => pb::Mode::Cw,
        Mode::Pr => pb::Mode::Pr,
        Mode::Pw => pb::Mode::Pw,
        Mode::Ex => pb::Mode::Ex,
    }
}

fn recovery_from_proto(raw: i32) -> Result<RecoveryMode, Status> {
    match pb::RecoveryMode::try_from(raw) {
        Ok(pb::RecoveryMode::Unspecified) | Ok(pb::RecoveryMode::Auto) => Ok(RecoveryMode::Auto),
        Ok(pb::RecoveryMode::Explicit) => Ok(RecoveryMode::Explicit),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown recovery mode {raw}: use AUTO or EXPLICIT"
        ))),
    }
}

pub fn recovery_to_proto(r: RecoveryMode) -> pb::RecoveryMode {
    match r {
        RecoveryMode::Auto => pb::RecoveryMode::Auto,
        RecoveryMode::Explicit => pb::RecoveryMode::Explicit,
    }
}

fn flags_from_proto(f: Option<pb::LockFlags>) -> Flags {
    let f = f.unwrap_or_default();
    Flags {
        try_: f.r#try,
        try_1cb: f.try_1cb,
        noexp: f.noexp,
        any: f.any,
        priority: f.priority,
        valblk: f.valblk,
    }
}

fn check_name(what: &str, name: &[u8]) -> Result<(), Status> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(Status::invalid_argument(format!(
            "{what} must be 1 to {MAX_NAME_BYTES} bytes, got {}",
            name.len()
        )));
    }
    Ok(())
}

fn check_session(session: u64) -> Result<(), Status> {
    if session == 0 {
        return Err(Status::invalid_argument("session is missing (0)"));
    }
    Ok(())
}

fn check_request_id(request_id: u64) -> Result<(), Status> {
    if request_id == 0 {
        return Err(Status::invalid_argument("request_id must be non-zero"));
    }
    Ok(())
}

/// The most an LVB can be (BRIEF §3.2); the exact length is the lockspace's.
const MAX_LVB_BYTES: usize = MAX_LVB_LEN_BYTES as usize;

/// The LVB of an Unlock or Convert: bytes are passed on only with `valblk` (the table
/// then checks that the request writes the LVB and that the length is the
/// lockspace's); `valblk` without bytes writes nothing; bytes without `valblk` are
/// refused rather than ignored.
fn lvb_arg(lvb: Vec<u8>, valblk: bool) -> Result<Option<Vec<u8>>, Status> {
    if lvb.len() > MAX_LVB_BYTES {
        return Err(Status::invalid_argument(format!(
            "LVB of {} bytes exceeds the maximum of {MAX_LVB_BYTES}",
            lvb.len()
        )));
    }
    if lvb.is_empty() {
        return Ok(None);
    }
    if !valblk {
        return Err(Status::invalid_argument(format!(
            "an LVB of {} bytes without valblk: the LVB is written only with valblk",
            lvb.len()
        )));
    }
    Ok(Some(lvb))
}

pub fn login_command(req: &pb::LoginRequest) -> Result<Command, Status> {
    check_name("node name", req.node.as_bytes())?;
    Ok(Command::Login {
        node: req.node.clone(),
        nonce: req.nonce,
    })
}

pub fn logout_command(req: &pb::LogoutRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    Ok(Command::Logout {
        session: req.session,
        request_id: req.request_id,
    })
}

pub fn open_lockspace_command(req: pb::OpenLockspaceRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    check_name("lockspace name", req.lockspace.as_bytes())?;
    Ok(Command::OpenLockspace {
        session: req.session,
        request_id: req.request_id,
        name: req.lockspace,
        lvb_len_bytes: req.lvb_len_bytes,
        recovery: recovery_from_proto(req.recovery)?,
    })
}

pub fn lock_command(req: pb::LockRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    check_name("lockspace name", req.lockspace.as_bytes())?;
    check_name("resource name", &req.resource)?;
    Ok(Command::Lock {
        session: req.session,
        request_id: req.request_id,
        ack_below: req.ack_below,
        lockspace: req.lockspace,
        resource: req.resource,
        mode: mode_from_proto(req.mode)?,
        flags: flags_from_proto(req.flags),
        timeout_ms: req.timeout_ms,
    })
}

pub fn convert_command(req: pb::ConvertRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    let flags = flags_from_proto(req.flags);
    let lvb = lvb_arg(req.lvb, flags.valblk)?;
    Ok(Command::Convert {
        session: req.session,
        request_id: req.request_id,
        ack_below: req.ack_below,
        lock_id: req.lock_id,
        mode: mode_from_proto(req.mode)?,
        flags,
        timeout_ms: req.timeout_ms,
        lvb,
    })
}

pub fn unlock_command(req: pb::UnlockRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    Ok(Command::Unlock {
        session: req.session,
        request_id: req.request_id,
        ack_below: req.ack_below,
        lock_id: req.lock_id,
        lvb: lvb_arg(req.lvb, req.valblk)?,
    })
}

pub fn cancel_command(req: &pb::CancelRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    check_request_id(req.target_request_id)?;
    Ok(Command::Cancel {
        session: req.session,
        request_id: req.request_id,
        ack_below: req.ack_below,
        target: req.target_request_id,
    })
}

pub fn recovery_done_command(req: pb::RecoveryDoneRequest) -> Result<Command, Status> {
    check_session(req.session)?;
    check_request_id(req.request_id)?;
    check_name("lockspace name", req.lockspace.as_bytes())?;
    check_name("node name", req.node.as_bytes())?;
    Ok(Command::RecoveryDone {
        session: req.session,
        request_id: req.request_id,
        lockspace: req.lockspace,
        node: req.node,
    })
}

/// Longest log filter `SetLogLevel` takes: a filter is a few directives, not a file.
pub const MAX_LOG_FILTER_BYTES: usize = 1_024;

/// A `SetLogLevel` filter: non-empty (an empty one would silence everything but
/// errors, which nobody asks for on purpose), bounded, and one tracing parses.
pub fn check_log_filter(filter: &str) -> Result<(), Status> {
    if filter.trim().is_empty() {
        return Err(Status::invalid_argument(
            "filter is empty: give a tracing filter, e.g. `info` or `lockd_server::raft_node=debug,info`",
        ));
    }
    if filter.len() > MAX_LOG_FILTER_BYTES {
        return Err(Status::invalid_argument(format!(
            "filter of {} bytes exceeds the maximum of {MAX_LOG_FILTER_BYTES}: `{}`",
            filter.len(),
            quote(filter)
        )));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(filter) {
        return Err(Status::invalid_argument(format!(
            "invalid log filter `{}`: {}",
            quote(filter),
            quote(&e.to_string())
        )));
    }
    Ok(())
}

/// A server id in an admin request: ids are non-zero (Raft reserves 0).
pub fn check_server_id(id: u64) -> Result<(), Status> {
    if id == 0 {
        return Err(Status::invalid_argument(
            "server id must be non-zero (id 0 is reserved by Raft)",
        ));
    }
    Ok(())
}

/// `AddServer`'s arguments: a non-zero id and an ip:port address.
pub fn check_add_server_args(id: u64, addr: &str) -> Result<(), Status> {
    check_server_id(id)?;
    if addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "bad address `{}`: expected ip:port, e.g. 192.0.2.14:7100",
            quote(addr)
        )));
    }
    Ok(())
}

/// `Locks`' filters: either may be empty (everything), but a given name must be one a
/// lockspace or resource could have.
pub fn check_locks_args(req: &pb::LocksRequest) -> Result<(), Status> {
    if !req.lockspace.is_empty() {
        check_name("lockspace name", req.lockspace.as_bytes())?;
    }
    if !req.resource.is_empty() {
        check_name("resource name", &req.resource)?;
    }
    Ok(())
}

pub fn check_node_arg(node: &str) -> Result<(), Status> {
    check_name("node name", node.as_bytes())
}

pub fn check_session_arg(session: u64) -> Result<(), Status> {
    check_session(session)
}

pub fn check_token_args(req: &pb::CheckTokenRequest) -> Result<(), Status> {
    check_name("lockspace name", req.lockspace.as_bytes())?;
    check_name("resource name", &req.resource)
}

pub fn node_state_to_proto(s: NodeState) -> pb::NodeState {
    match s {
        NodeState::LoggedIn => pb::NodeState::LoggedIn,
        NodeState::WasLoggedIn => pb::NodeState::WasLoggedIn,
        NodeState::Expired => pb::NodeState::Expired,
        NodeState::Fencing => pb::NodeState::Fencing,
        NodeState::Fenced => pb::NodeState::Fenced,
        NodeState::Unfencing => pb::NodeState::Unfencing,
    }
}

/// An event for a node's stream; `None` for events that are not the node's business.
pub fn event_to_proto(event: Event) -> Option<pb::Event> {
    use pb::event::Kind;
    let kind = match event {
        Event::Blocking {
            lock_id,
            lockspace,
            resource,
            requested,
            ..
        } => Kind::Blocking(pb::BlockingCallback {
            lock_id,
            lockspace,
            resource,
            requested: mode_to_proto(requested) as i32,
        }),
        Event::Finished {
            request_id, result, ..
        } => {
            let (grant, error) = match result {
                Ok(g) => (Some(grant_to_proto(g)), String::new()),
                Err(e) => (None, e.to_string()),
            };
            Kind::Finished(pb::RequestFinished {
                request_id,
                grant,
                error,
            })
        }
        Event::NeedRecovery {
            lockspace,
            node,
            first_mounter,
            ..
        } => Kind::NeedRecovery(pb::NeedRecovery {
            lockspace,
            node,
            first_mounter,
        }),
        // Answers a held login (the driver's business), not a stream event.
        Event::SessionExpired { session } => Kind::Notice(pb::SessionNotice {
            state: pb::NodeState::Expired as i32,
            message: LockError::SessionExpired(session).to_string(),
        }),
        // The driver's own business (fence jobs, liveness).
        // The leader's own business, not the node's.
        Event::FenceDue { .. }
        | Event::Fenced { .. }
        | Event::LoggedOut { .. }
        | Event::Unfenced { .. }
        | Event::UnfenceDue { .. } => return None,
    };
    Some(pb::Event { kind: Some(kind) })
}

pub fn resource_row_to_proto(row: crate::raft_node::ResourceRow) -> pb::ResourceInfo {
    let mode = |m: Option<Mode>| m.map_or(pb::Mode::Unspecified, mode_to_proto) as i32;
    pb::ResourceInfo {
        lockspace: row.lockspace,
        resource: row.resource,
        lvb: row.view.lvb,
        lvb_invalid: row.view.lvb_invalid,
        locks: row
            .locks
            .into_iter()
            .map(
                |crate::raft_node::LockRow { lock, queue, node }| pb::LockInfo {
                    lock_id: lock.lock_id,
                    session: lock.session,
                    node,
                    queue: queue.to_string(),
                    granted: mode(lock.granted),
                    requested: mode(lock.requested),
                    token: lock.token,
                    expired: lock.expired,
                },
            )
            .collect(),
    }
}

/// A node's departure for `lockctl nodes` (issue 15).
pub fn departure_to_proto((name, d): (String, Departure)) -> pb::NodeDeparture {
    let (state, detail) = match d.how {
        DepartureKind::LoggedOut => (pb::NodeState::LoggedOut, String::new()),
        DepartureKind::Fenced => (pb::NodeState::Fenced, String::new()),
        DepartureKind::UnfenceFailed {
            attempts, detail, ..
        } => (
            pb::NodeState::UnfenceFailed,
            format!("{attempts} attempts, last: {detail}"),
        ),
    };
    pb::NodeDeparture {
        name,
        state: state as i32,
        at_ms: d.at_ms,
        detail,
    }
}

pub fn fence_record_to_proto(r: FenceRecord) -> pb::FenceHistoryEntry {
    let (what, level, ok, detail, action) = match r.what {
        FenceStep::Started => ("started", 0, false, String::new(), ""),
        FenceStep::Attempt { level, ok, detail } => ("attempt", level, ok, detail, ""),
        FenceStep::Done { by } => ("done", 0, true, by, ""),
        FenceStep::UnfenceStarted => ("started", 0, false, String::new(), "on"),
        FenceStep::UnfenceAttempt { ok, detail } => ("attempt", 0, ok, detail, "on"),
        FenceStep::UnfenceFailed { attempts } => (
            "failed",
            0,
            false,
            format!("{attempts} attempts failed; login refused"),
            "on",
        ),
    };
    pb::FenceHistoryEntry {
        at_ms: r.at_ms,
        node: r.node,
        session: r.session,
        what: what.to_string(),
        level,
        ok,
        detail,
        action: action.to_string(),
    }
}

pub fn grant_to_proto(g: GrantInfo) -> pb::Grant {
    pb::Grant {
        lock_id: g.lock_id,
        mode: mode_to_proto(g.mode) as i32,
        token: g.token,
        lvb: g.lvb.unwrap_or_default(),
        lvb_invalid: g.lvb_invalid,
    }
}

/// Why the lock table or the driver refused a call: what [`status`] maps.
#[derive(Debug)]
pub enum Refusal {
    Lock(LockError),
    Propose(ProposeError),
}

impl From<LockError> for Refusal {
    fn from(e: LockError) -> Refusal {
        Refusal::Lock(e)
    }
}

impl From<ProposeError> for Refusal {
    fn from(e: ProposeError) -> Refusal {
        Refusal::Propose(e)
    }
}

/// The one mapping from lock-table and driver refusals to gRPC statuses.
pub fn status(refusal: impl Into<Refusal>) -> Status {
    let e = match refusal.into() {
        Refusal::Propose(ProposeError::NotLeader { leader }) => {
            return not_leader_status(leader.as_deref())
        }
        Refusal::Propose(ProposeError::NoQuorum(msg)) => {
            return Status::unavailable(format!("no quorum: {msg}"))
        }
        Refusal::Propose(ProposeError::Refused(msg)) => {
            return Status::failed_precondition(format!("refused: {msg}"))
        }
        Refusal::Propose(ProposeError::Internal(msg)) => return Status::internal(msg),
        Refusal::Lock(e) => e,
    };
    let code = match &e {
        LockError::UnknownSession(_)
        | LockError::UnknownLockspace(_)
        | LockError::UnknownLock(_)
        | LockError::NotLoggedIn(_) => Code::NotFound,
        LockError::AlreadyLoggedIn { .. }
        | LockError::LockspaceNotOpened(_)
        | LockError::LockspaceMismatch { .. }
        | LockError::NotGranted(_) => Code::FailedPrecondition,
        LockError::InvalidArgument(_) => Code::InvalidArgument,
        LockError::WouldBlock | LockError::Cancelled | LockError::Deadlock => Code::Aborted,
        LockError::Timeout => Code::DeadlineExceeded,
        LockError::Limit(_) => Code::ResourceExhausted,
        LockError::SessionExpired(_)
        | LockError::SessionNotLive { .. }
        | LockError::NodeExpired { .. }
        | LockError::NotFencing(_)
        | LockError::NothingToRecover { .. }
        | LockError::NodeUnfencing { .. }
        | LockError::UnfenceFailed { .. } => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

/// UNAVAILABLE, with the leader's address in metadata when it is known (the client
/// library follows it); without one the cluster has no leader, i.e. no quorum yet.
pub fn not_leader_status(leader: Option<&str>) -> Status {
    match leader {
        Some(addr) => {
            let mut status = Status::unavailable(format!("not the leader; the leader is {addr}"));
            if let Ok(v) = addr.parse() {
                status.metadata_mut().insert(LEADER_METADATA_KEY, v);
            }
            status
        }
        None => Status::unavailable("no quorum: no leader is elected at the moment"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lock_req() -> pb::LockRequest {
        pb::LockRequest {
            session: 5,
            request_id: 1,
            ack_below: 1,
            lockspace: "fs1".into(),
            resource: b"inode-1".to_vec(),
            mode: pb::Mode::Ex as i32,
            flags: None,
            timeout_ms: 0,
        }
    }

    #[test]
    fn well_formed_lock_becomes_a_command() {
        let cmd = lock_command(lock_req()).unwrap();
        assert!(matches!(
            cmd,
            Command::Lock {
                mode: Mode::Ex,
                session: 5,
                ..
            }
        ));
    }

    #[test]
    fn malformed_lock_requests_are_invalid_arguments() {
        type Mutation = Box<dyn Fn(&mut pb::LockRequest)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (Box::new(|r| r.mode = 0), "unknown lock mode 0"),
            (Box::new(|r| r.mode = 99), "unknown lock mode 99"),
            (
                Box::new(|r| r.resource = vec![b'x'; 65]),
                "resource name must be 1 to 64 bytes",
            ),
            (Box::new(|r| r.resource.clear()), "resource name"),
            (Box::new(|r| r.lockspace = "l".repeat(65)), "lockspace name"),
            (Box::new(|r| r.session = 0), "session is missing"),
            (Box::new(|r| r.request_id = 0), "request_id"),
        ];
        for (mutate, want) in cases {
            let mut req = lock_req();
            mutate(&mut req);
            let status = lock_command(req).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument);
            assert!(
                status.message().contains(want),
                "{} lacks {want}",
                status.message()
            );
        }
    }

    #[test]
    fn oversized_lvb_is_refused_before_raft() {
        let req = pb::UnlockRequest {
            session: 1,
            request_id: 1,
            ack_below: 0,
            lock_id: 3,
            valblk: true,
            lvb: vec![0; 65],
        };
        assert_eq!(
            unlock_command(req).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn redirect_carries_the_leader_address() {
        let s = not_leader_status(Some("127.0.0.1:7102"));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(
            s.metadata()
                .get(LEADER_METADATA_KEY)
                .unwrap()
                .to_str()
                .unwrap(),
            "127.0.0.1:7102"
        );
        let s = not_leader_status(None);
        assert!(s.message().starts_with("no quorum"));
        assert!(s.metadata().get(LEADER_METADATA_KEY).is_none());
    }

    #[test]
    fn lock_errors_map_to_precise_codes() {
        assert_eq!(status(LockError::UnknownLock(4)).code(), Code::NotFound);
        assert_eq!(status(LockError::Timeout).code(), Code::DeadlineExceeded);
        assert_eq!(status(LockError::Deadlock).code(), Code::Aborted);
        assert_eq!(
            status(LockError::NotGranted(4)).code(),
            Code::FailedPrecondition
        );
    }
}
