//! Audit entries: what happened, chained to the entry before it.
//!
//! An entry is stored as its exact JSON bytes. Its hash is sha256 of those bytes; the
//! next entry's `prev` carries that hash, and the Merkle tree's leaf for it is the
//! RFC 6962 leaf hash of the same bytes. Secrets never appear in an entry.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::EventKind;

/// The version of the published schema new entries follow, stored in each entry's
/// `schema` field. It changes only when a field's meaning or type does; a new field or
/// kind keeps it.
pub const SCHEMA_VERSION: u32 = 1;

/// The published JSON Schema (2020-12) of an audit entry at [`SCHEMA_VERSION`].
pub const SCHEMA: &str = include_str!("../../schema/audit-v1.schema.json");

/// What the caller records; the writer adds the sequence number, time and chain link.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// e.g. `grant.requested`, `grant.decided`, `agent.added`, `session.opened`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    /// Kind-specific fields.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub detail: serde_json::Value,
}

impl AuditEvent {
    pub fn new(kind: EventKind) -> Self {
        AuditEvent {
            kind: kind.as_str().to_string(),
            agent: None,
            target: None,
            grant: None,
            detail: serde_json::Value::Null,
        }
    }

    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = Some(agent.to_string());
        self
    }

    pub fn target(mut self, target: &str) -> Self {
        self.target = Some(target.to_string());
        self
    }

    pub fn grant(mut self, grant: &str) -> Self {
        self.grant = Some(grant.to_string());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

/// One entry of the audit log, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// When the writer recorded it, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Hex sha256 of the previous entry's bytes; 64 zeros for the first entry.
    pub prev: String,
    /// The schema version the entry follows; absent in entries written before the
    /// schema was published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<u32>,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// An entry being written, borrowing its event: serializes to the same bytes as the
/// [`AuditEntry`] it will be read back as, without copying the event.
#[derive(Serialize)]
pub(crate) struct NewEntry<'a> {
    pub seq: u64,
    pub time_ms: u64,
    pub prev: &'a str,
    pub schema: u32,
    #[serde(flatten)]
    pub event: &'a AuditEvent,
}

/// The `prev` of the first entry.
pub const GENESIS: [u8; 32] = [0; 32];

/// The hash that chains an entry to the next: sha256 of its stored bytes.
pub fn entry_hash(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}
