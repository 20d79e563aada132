//! The shim <-> agent protocol: messages and the ttrpc service of `proto/agent.proto`.
//!
//! The agent serves [`agent_ttrpc::Agent`] on guest vsock port [`AGENT_PORT`]; the shim and the
//! tests use `blocking::AgentClient` (feature `client`).

#![allow(clippy::all, missing_debug_implementations, unused_qualifications)]

/// Guest vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;

/// Guest vsock port the agent relays port-forwarded connections on (see `WatchPorts`).
pub const FORWARD_PORT: u32 = 1026;

// `agent` (the messages) and `agent_ttrpc` (the client and server of the `Agent` service).
include!(concat!(env!("OUT_DIR"), "/modules.rs"));

#[cfg(feature = "client")]
pub mod blocking;
mod connect;
mod line;
mod relay;
#[cfg(feature = "client")]
pub use connect::{connect_agent, connect_agent_while};
pub use connect::{connect_stream, ConnectError};
pub use line::read_line;
pub use relay::relay;

pub use protobuf;
pub use ttrpc;
