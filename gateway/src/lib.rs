//! Airlock: an access gateway that AI coding agents go through to reach production.
//!
//! Every access decision and every masking step runs in a sandboxed WebAssembly policy
//! module, loaded from a signed bundle that only the gateway owns:
//!
//! - [`policy`] hosts the modules: compile once, a fresh sandboxed instance per
//!   decision, hard limits on every call, verdicts combined across a bundle.
//! - [`bundle`] is the signed bundle format and the gateway-owned policy directory:
//!   keys, signing, verification, atomic install and hot reload.
//! - [`fsperm`] refuses files and directories that anyone but the gateway could write.

pub mod api;
pub mod bundle;
pub mod config;
pub mod fsperm;
pub mod grants;
pub mod keys;
pub mod policy;
pub mod record;
pub mod serve;
