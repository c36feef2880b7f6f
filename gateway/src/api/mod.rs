//! The gateway's two interfaces, kept apart:
//!
//! - [`agent`]: HTTP/JSON for agents (bearer agent token). It can ask for, read and end
//!   the agent's own grants, and nothing else: no approving, widening or extending a
//!   grant, no policy, no record.
//! - [`admin`]: line-delimited JSON on a Unix socket (mode 0600) in the gateway's data
//!   directory, for the operator's CLI. Access is by filesystem permission; an agent
//!   token means nothing there.

pub mod admin;
pub mod agent;
mod ratelimit;
mod tls;

pub use ratelimit::RecordCap;
pub use tls::{load_tls, load_tls_alpn};

/// The OpenAPI document of the agent API, kept in the repository and served at
/// `/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../../openapi.json");
