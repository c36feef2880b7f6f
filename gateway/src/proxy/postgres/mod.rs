//! The PostgreSQL gateway.

pub mod classify;
pub mod wire;
