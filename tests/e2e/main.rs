//! End-to-end tests: the real `airlock` binary, real policy modules built with the real
//! `airlock policy build`, real files and signatures.

mod agent;
mod broker;
mod bundles;
mod examples;
mod flood;
mod gateway;
mod http;
mod kube;
mod mcp;
mod pg;
mod policy_host;
mod postgres;
mod postgres_hostile;
mod record;
mod ssh;
mod support;
