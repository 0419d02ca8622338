//! The lockd lock server.
//!
//! Data flow (one module per step): an RPC arrives in `service`, is validated and
//! turned into a `state::Command` by `api`, proposed to Raft by `raft_node`, committed,
//! applied to the pure lock table in `state`, and its effects (replies, events) are
//! dispatched back by `raft_node`. `storage` keeps the Raft log durable (raft-engine);
//! `transport` carries Raft messages between servers. See ARCHITECTURE.md.

pub mod api;
pub mod cli;
pub mod config;
pub mod dev;
pub mod fence;
pub mod liveness;
pub mod logging;
pub mod membership;
pub mod monitor;
pub mod raft_node;
pub mod recovery;
pub mod reload;
pub mod server;
pub mod service;
pub mod state;
pub mod storage;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod unfence;
pub mod watchdog;
