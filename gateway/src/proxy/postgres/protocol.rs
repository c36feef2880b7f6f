//! PostgreSQL's answers to the gateway's neutral parts (see `proxy::protocol`).

use super::upstream::UpstreamAddr;
use crate::grants::{GrantRecord, TargetRecord};
use crate::policy::Kind;
use crate::proxy::protocol::{Advertised, Protocol};

/// The name a grant's SCRAM verifier is stored under.
pub(super) const SCRAM_PROOF: &str = "scram-sha-256";

/// The PostgreSQL protocol; `listen` is where its gateway accepts clients, once it
/// does, and `tls` the certificate chain (PEM) it offers them, if it does.
#[derive(Debug, Default)]
pub struct Postgres {
    pub listen: Option<Advertised>,
    pub tls: Option<String>,
}

impl Protocol for Postgres {
    fn kind(&self) -> Kind {
        Kind::Postgres
    }

    fn check_target(&self, target: &TargetRecord) -> Result<(), String> {
        UpstreamAddr::parse(&target.upstream)?;
        if let Some(end_as) = &target.end_as {
            UpstreamAddr::parse(end_as).map_err(|e| format!("end-as: {e}"))?;
        }
        Ok(())
    }

    /// A client proves the secret by SCRAM-SHA-256, so the grant keeps a verifier.
    fn secret_proofs(&self, secret: &str) -> Vec<(&'static str, String)> {
        vec![(
            SCRAM_PROOF,
            postgres_protocol::password::scram_sha_256(secret.as_bytes()),
        )]
    }

    /// psql's host, port, database (the target) and user (the grant id), and the
    /// TLS it needs: `verify-full` against the gateway's CA where the listener offers
    /// TLS (the chain it serves is given as `ca`).
    fn connection(&self, grant: &GrantRecord, _secret: &str) -> Option<serde_json::Value> {
        let at = self.listen.as_ref()?;
        Some(serde_json::json!({
            "protocol": "postgres",
            "host": at.host,
            "port": at.port,
            "database": grant.target,
            "sslmode": if self.tls.is_some() { "verify-full" } else { "disable" },
            "ca": self.tls,
        }))
    }
}
