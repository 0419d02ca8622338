//! The gRPC protocol shared by the lock server, the client library and `lockctl`.
//! Generated from `proto/lockd.proto`; this crate owns nothing else.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("lockd.v1");

    /// Encoded file descriptor set, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lockd_descriptor");
}

/// Response metadata key naming the leader's client address on a redirect.
pub const LEADER_METADATA_KEY: &str = "lockd-leader";
/// Request metadata key carrying the sender's cluster id on peer streams.
pub const CLUSTER_ID_METADATA_KEY: &str = "lockd-cluster-id";
/// Request metadata key carrying the sending server's id on peer streams.
pub const FROM_METADATA_KEY: &str = "lockd-from";
