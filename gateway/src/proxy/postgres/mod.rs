//! The PostgreSQL gateway: `startup` lets a client in, `session` and `extended` turn its
//! messages into checked, recorded statements, `masking` rewrites rows on the way back.

pub mod catalog;
pub mod classify;
pub mod client;
mod conn;
#[cfg(test)]
mod corpus_replay;
mod extended;
mod masking;
mod parser;
mod pins;
mod portals;
mod protocol;
pub mod scram;
mod services;
mod session;
mod startup;
pub mod upstream;
pub mod wire;

pub use protocol::Postgres;
pub use services::PgServices;
