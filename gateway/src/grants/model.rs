//! What the broker keeps: agents, targets, grants.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::policy::types;
use crate::policy::{Kind, labels};

/// Read, write or admin, as agents ask for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Access {
    Read,
    Write,
    Admin,
}

impl From<Access> for types::Access {
    fn from(a: Access) -> Self {
        match a {
            Access::Read => types::Access::Read,
            Access::Write => types::Access::Write,
            Access::Admin => types::Access::Admin,
        }
    }
}

impl std::fmt::Display for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
            Access::Admin => "admin",
        })
    }
}

/// An enrolled agent. Its token is `airlock_<token_id>_<secret>`; only the secret's
/// hash is kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub token_id: String,
    pub token_hash: String,
    pub created_ms: u64,
    #[serde(default)]
    pub revoked: bool,
}

impl AgentRecord {
    pub fn policy_agent(&self) -> types::Agent {
        types::Agent {
            id: self.name.clone(),
            labels: labels(&self.labels),
        }
    }
}

/// A target: where an agent may be let through to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct TargetRecord {
    pub name: String,
    pub kind: Kind,
    /// `host:port`, or a URL for HTTP and Kubernetes targets.
    pub upstream: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the gateway finds the upstream credential: `secret:NAME` (the
    /// gateway-owned secrets file) or `env:VAR`. Never the credential itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// PostgreSQL: the least-privilege role read grants log in as instead of the
    /// upstream's user, with its own credential reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_credential: Option<String>,
    /// PostgreSQL: where and as whom the gateway logs in to end a grant's backends
    /// (`postgres://USER@HOST:PORT/DATABASE`), with its own credential reference. A
    /// role apart from the one agents act as, member of `pg_signal_backend`: the
    /// agents' role can lock itself out of new logins or kill its own backends, but
    /// not this one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_as: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_credential: Option<String>,
    /// PostgreSQL: the gateway may log in as a role that is a superuser or bypasses
    /// row security. Off by default: such a role can undo every server-side limit.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_superuser: bool,
    /// SSH: the upstream's host key, pinned (`ssh-ed25519 AAAA…`, as in a known_hosts
    /// line after the host). Any other key is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_key: Option<String>,
    /// HTTP and Kubernetes: the CA file (PEM) that signs an `https://` upstream's
    /// certificate. The machine's trust store is never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<std::path::PathBuf>,
    /// HTTP and Kubernetes: how the credential is presented upstream: `bearer` (the
    /// default), `basic` (the credential is `user:password`), `header:NAME`, or
    /// `client-cert` (the credential is a PEM certificate chain and its key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inject: Option<String>,
    /// HTTP and Kubernetes: record request and response bodies, up to this many bytes
    /// each. Off by default: bodies can hold what the record should not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_body_bytes: Option<u32>,
}

impl TargetRecord {
    /// Every credential reference the target names.
    pub fn references(&self) -> impl Iterator<Item = &String> {
        self.credential
            .iter()
            .chain(&self.read_credential)
            .chain(&self.end_credential)
    }

    pub fn policy_target(&self) -> types::Target {
        types::Target {
            name: self.name.clone(),
            kind: self.kind.into(),
            labels: labels(&self.labels),
        }
    }
}

/// Where a grant is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantStatus {
    /// Waiting for an operator's approval.
    Pending,
    /// Usable until `expires_ms`.
    Active,
    /// Refused by policy or by an operator.
    Denied,
    /// Ended by an operator, or because its agent was revoked.
    Revoked,
    /// Its window passed.
    Expired,
    /// Ended early by its agent.
    Ended,
}

impl GrantStatus {
    pub fn is_final(self) -> bool {
        !matches!(self, GrantStatus::Pending | GrantStatus::Active)
    }
}

/// A grant: one agent, one target, one task, one access level, one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub id: String,
    pub agent: String,
    pub target: String,
    pub task: String,
    pub access: Access,
    pub status: GrantStatus,
    /// The window the grant gets once active (the tightest of request, policy, config).
    pub ttl_seconds: u32,
    pub created_ms: u64,
    /// For an active grant, the end of its window; for a pending one, the time by
    /// which an operator must approve it.
    pub expires_ms: u64,
    /// sha256 of the secret; empty for a grant that never had one (denied).
    #[serde(default)]
    pub secret_hash: String,
    /// Proofs of the secret that the target's protocol checks without the secret
    /// itself, by name (PostgreSQL: `scram-sha-256`, its SCRAM verifier).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proofs: BTreeMap<String, String>,
    /// Why it was denied, sent to review, or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// Read-only by policy.
    #[serde(default)]
    pub read_only: bool,
    /// The bundle that decided it, e.g. `example v7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
}

/// One protocol session opened under a grant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub grant: String,
    pub agent: String,
    pub target: String,
    pub protocol: String,
    /// `mcp` for a session the gateway's MCP server opened on its agent's behalf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<String>,
    pub opened_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_ms: Option<u64>,
    #[serde(default)]
    pub statements: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}
