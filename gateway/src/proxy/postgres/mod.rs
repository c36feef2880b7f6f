//! The PostgreSQL gateway.

pub mod classify;
pub mod scram;
pub mod wire;
