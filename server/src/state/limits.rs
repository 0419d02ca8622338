//! Every bound the lock table enforces. A request that would cross one fails with
//! `LockError::Limit` and changes nothing: a lock server that grows a table without
//! bound falls over exactly when a cluster is in trouble.

/// Longest node, lockspace or resource name (BRIEF §3.2).
pub const MAX_NAME_BYTES: usize = 64;
/// The LVB length of a lockspace opened with `lvb_len_bytes: 0`.
pub const DEFAULT_LVB_LEN_BYTES: u32 = 32;
/// LVB lengths are multiples of this…
pub const LVB_LEN_STEP_BYTES: u32 = 8;
/// …up to this.
pub const MAX_LVB_LEN_BYTES: u32 = 64;

/// Logged-in sessions (nodes) at once.
pub const MAX_SESSIONS: usize = 4_096;
/// Lockspaces ever opened (they are not closed).
pub const MAX_LOCKSPACES: usize = 4_096;
/// Locks (granted or waiting) one session may own.
pub const MAX_LOCKS_PER_SESSION: usize = 4_000_000;
/// Locks in the whole table; at the ~200 bytes per lock aimed for, about 3.4 GB.
pub const MAX_LOCKS: usize = 16_777_216;
/// Locks (granted or waiting) on one resource. A grant decision looks at every holder
/// of the resource once, so this also bounds the work of one decision.
pub const MAX_LOCKS_PER_RESOURCE: usize = 131_072;
/// Waiting requests (conversions plus new requests) on one resource.
pub const MAX_WAITERS_PER_RESOURCE: usize = 65_536;
/// Finished-request records one session keeps for retries; beyond it the smallest id
/// is forgotten and treated as acknowledged. Waiting requests are not counted here:
/// they are bounded by `MAX_LOCKS_PER_SESSION`.
pub const MAX_REQUEST_RECORDS_PER_SESSION: usize = 4_096;

/// Fence history records kept (oldest dropped first).
pub const MAX_FENCE_HISTORY: usize = 1_024;
/// Nodes whose last departure (logout, fence, failed unfencing) is remembered for
/// `lockctl nodes`; beyond it the oldest record is dropped (the node then shows as
/// never seen). As many as sessions may exist at once.
pub const MAX_DEPARTURES: usize = MAX_SESSIONS;
