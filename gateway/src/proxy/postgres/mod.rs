//! The PostgreSQL gateway.

pub mod classify;
pub mod scram;
pub mod session;
pub mod upstream;
pub mod wire;
