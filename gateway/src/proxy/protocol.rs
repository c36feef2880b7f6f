//! What the gateway's protocol-neutral parts (configuration, the broker, the agent and
//! admin APIs) need to know of each protocol, behind one small trait, so none of them
//! branches on a protocol by name.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::grants::{GrantRecord, SecretProofs, TargetRecord};
use crate::policy::Kind;

/// Where agents reach a listener: the host they dial and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub host: String,
    pub port: u16,
}

impl Advertised {
    /// The listener bound at `bound`, reached at `public_host` if the operator named
    /// one (`gateway.public-host`), else at the bound address.
    pub fn new(bound: SocketAddr, public_host: Option<&str>) -> Self {
        Advertised {
            host: public_host.map_or_else(|| bound.ip().to_string(), str::to_string),
            port: bound.port(),
        }
    }

    /// `host:port`, an IPv6 address bracketed, for URLs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// One protocol's answers to the neutral parts of the gateway.
pub trait Protocol: Send + Sync {
    /// The kind of target it serves.
    fn kind(&self) -> Kind;

    /// Checks a target's protocol-specific settings (its upstream address, …), from the
    /// configuration file or added at run time.
    fn check_target(&self, target: &TargetRecord) -> Result<(), String>;

    /// Proofs of a freshly minted grant secret that this protocol's login checks
    /// without the secret itself (PostgreSQL: a SCRAM verifier), stored with the grant
    /// under their names. The secret itself is never stored.
    fn secret_proofs(&self, _secret: &str) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// Where and how an agent connects through the gateway under `grant`: added to
    /// the grant the agent API returns with its secret (which a protocol that takes
    /// one token, such as HTTP's bearer token, builds it from).
    fn connection(&self, _grant: &GrantRecord, _secret: &str) -> Option<serde_json::Value> {
        None
    }
}

/// A protocol's gateway, built by `serve` once the shared services exist: it accepts
/// agents' connections on its listener until the returned future is dropped.
pub trait ProtocolGateway: Send + Sync + 'static {
    /// For logs: `PostgreSQL`, `SSH`, …
    fn name(&self) -> &'static str;

    fn serve(self: Arc<Self>, listener: TcpListener) -> Pin<Box<dyn Future<Output = ()> + Send>>;
}

/// The protocols this gateway knows, by target kind.
#[derive(Clone)]
pub struct Protocols(Vec<Arc<dyn Protocol>>);

impl Protocols {
    /// Every protocol the gateway implements, before any listens.
    pub fn builtin() -> Self {
        Protocols(vec![
            Arc::new(super::postgres::Postgres::default()),
            Arc::new(super::ssh::Ssh::default()),
            Arc::new(super::http::Http::new(Kind::Http)),
            Arc::new(super::http::Http::new(Kind::Kubernetes)),
        ])
    }

    /// This registry with `protocol` in place of the one of its kind.
    pub fn with(mut self, protocol: Arc<dyn Protocol>) -> Self {
        self.0.retain(|p| p.kind() != protocol.kind());
        self.0.push(protocol);
        self
    }

    pub fn get(&self, kind: Kind) -> Option<&dyn Protocol> {
        self.0.iter().find(|p| p.kind() == kind).map(|p| &**p)
    }

    /// The target's protocol-specific check; a kind no protocol serves yet has none.
    pub fn check_target(&self, target: &TargetRecord) -> Result<(), String> {
        self.get(target.kind)
            .map_or(Ok(()), |p| p.check_target(target))
    }

    pub fn connection(
        &self,
        kind: Kind,
        grant: &GrantRecord,
        secret: &str,
    ) -> Option<serde_json::Value> {
        self.get(kind).and_then(|p| p.connection(grant, secret))
    }
}

impl SecretProofs for Protocols {
    fn proofs(&self, kind: Kind, secret: &str) -> Vec<(&'static str, String)> {
        self.get(kind)
            .map(|p| p.secret_proofs(secret))
            .unwrap_or_default()
    }
}
