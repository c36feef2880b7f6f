//! The PostgreSQL gateway.

pub mod classify;
