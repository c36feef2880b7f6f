//! Airlock: an access gateway that AI coding agents go through to reach production.
//!
//! Every access decision and every masking step runs in a sandboxed WebAssembly policy
//! module, loaded from a signed bundle that only the gateway owns:
//!
//! - [`policy`] hosts the modules: compile once, a fresh sandboxed instance per
//!   decision, hard limits on every call, verdicts combined across a bundle.
//! - [`bundle`] is the signed bundle format and the gateway-owned policy directory:
//!   keys, signing, verification, atomic install and hot reload.
//! - [`grants`] is the broker: agents ask for per-task grants, policy decides, operators
//!   approve, grants expire or are revoked and their connections are cut.
//! - [`record`] is the gateway's own store and its tamper-evident audit log.
//! - [`api`] is the agent API (HTTP/JSON) and the admin socket; [`serve`] wires it all.
//! - [`config`], [`keys`], [`secrets`] and [`fsperm`] are the gateway's configuration, its
//!   Ed25519 keys, its upstream credentials, and the refusal of any file anyone but the
//!   gateway could write.

pub mod accept;
pub mod api;
pub mod bundle;
pub mod config;
pub mod fsperm;
pub mod grants;
pub mod keys;
pub mod mcp;
pub mod policy;
pub mod proxy;
pub mod record;
pub mod secrets;
pub mod serve;
pub mod tls;
