//! The replicated state machine: lockd's lock table (BRIEF §3.2).
//!
//! Owns every lock rule: sessions and their applied-once request records, lockspaces,
//! resources and their holder / conversion / wait queues, the six DLM modes, grants and
//! fencing tokens, LVBs, blocking callbacks, timeouts, conversion deadlock, expired
//! holders, and the snapshot format. `State::apply(index, now_ms, command)` returns the
//! reply for the proposer and the events for everyone else.
//!
//! It must stay pure and deterministic, like raft-rs's core: no I/O, no clock (time
//! arrives as `now_ms` inside the entry), no threads, no randomness, no iteration in
//! hash order, and no dependency on any other module of the crate. Replicas that apply
//! the same entries reach byte-identical state. Bad input gets a precise `LockError`
//! and changes nothing.
//!
//! Layout: `mode` (modes and their matrix), `command` (commands, replies, events,
//! errors), `limits` (every bound), `model` (the stored records), `table` (`State`,
//! its indexes and `apply`), `sessions`, `lockspaces`, `locking` (Lock, Convert,
//! Unlock, Cancel, Tick), `requests` (applied-once request records), `resources`
//! (locks, resources, the LVB), `queries`, `snapshot` (encode/decode), `queue`
//! (grant order, callbacks, deadlock),
//! `fencing` (fence progress, what fencing releases, recovery), `unfencing` (a login
//! that waits for its node's storage unfencing, and how nodes left).

#[cfg(test)]
mod batch_attack_tests;
mod command;
mod digest;
mod fencing;
mod id_map;
#[cfg(test)]
mod id_map_attack_tests;
mod incarnation;
mod limits;
mod locking;
mod lockspaces;
#[cfg(test)]
mod memory;
mod mode;
mod model;
mod queries;
mod queue;
mod requests;
mod resources;
mod sessions;
mod snapshot;
mod table;
mod unfencing;

#[cfg(test)]
mod lifecycle_proptests;
#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use command::{
    Command, Event, FenceNext, Flags, GrantInfo, LockError, LockId, NodeState, RecoveryMode, Reply,
    RequestId, SessionId,
};
pub use incarnation::{token_epoch, TOKEN_COUNTER_BITS, TOKEN_EPOCH_BITS};
pub use limits::*;
pub use mode::Mode;
pub use model::{Departure, DepartureKind, FenceProgress, FenceRecord, FenceStep};
pub use queries::{LockView, ResourceView, SessionInfo};
pub use snapshot::Frozen;
pub use table::State;
#[cfg(feature = "unsafe-test-switches")]
pub use table::{enable_unsafe_accept_from_fencing, enable_unsafe_release_on_expire};
