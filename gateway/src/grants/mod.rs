//! The grant broker: agents ask for per-task grants, policy decides, operators approve,
//! and grants end (by expiry, revocation, or the agent) with every live connection cut.
//!
//! State lives in the record and is mirrored in memory. Every change is written to the
//! record, with the audit entries that explain it, and only then applied and answered:
//! if the record cannot be written, nothing changes and the caller is refused.

mod broker;
mod model;
mod secret;

pub use broker::{
    AgentToken, Broker, BrokerError, GrantAuthError, GrantRequestBody, Issued, LiveGrant,
    SecretProofs, TargetSource,
};
pub use model::{Access, AgentRecord, GrantRecord, GrantStatus, SessionRecord, TargetRecord};
pub use secret::{
    GrantKey, GrantKeyError, hash_secret, looks_like_grant_id, new_id, new_secret, secret_matches,
};
