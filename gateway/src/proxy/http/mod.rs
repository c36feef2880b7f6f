//! The HTTP gateway: agents send ordinary HTTP (curl, an SDK; HTTP/1.1 or HTTP/2) to
//! one listener with their grant as a bearer token, and the grant alone routes the
//! request to its one target. The gateway strips the agent's credential, decides the
//! request as an action, records it, sends it upstream with the gateway's own
//! credential, and masks the response where a masking module applies.
//!
//! Data path, per request (`service.rs`): grant token → path read once
//! (`path.rs`) → action → verdict → record → upstream (`upstream.rs`) → mask
//! (`mask.rs`) → agent → result entry; or, where the request opens a stream (kubectl
//! exec), the upstream's WebSocket → the stream relayed message by message
//! (`websocket.rs`, and `kube::streams` for what the messages are).

mod body;
pub(crate) mod headers;
mod listen;
mod mask;
pub(crate) mod path;
mod service;
mod token;
pub(crate) mod upstream;
mod websocket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::config::HttpConfig;
use crate::grants::{GrantRecord, TargetRecord};
use crate::policy::Kind;
use crate::proxy::protocol::{Advertised, Protocol};
use crate::proxy::{ProtocolGateway, ProxyServices};
use crate::secrets::Secrets;
use upstream::{Upstream, UpstreamError};

pub use token::bearer;

/// An error a body can fail with.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// HTTP targets (and, through the same listener, Kubernetes ones); `listen` is where
/// the gateway accepts agents, once it does.
#[derive(Debug)]
pub struct Http {
    kind: Kind,
    pub listen: Option<Advertised>,
    /// The listener's certificate chain (PEM), when it speaks TLS: clients pin it
    /// (kubectl's kubeconfig names it as the cluster's CA).
    pub tls: Option<String>,
}

impl Http {
    pub fn new(kind: Kind) -> Self {
        Http {
            kind,
            listen: None,
            tls: None,
        }
    }

    /// This protocol, served at `at` (over TLS with the chain `tls`, if given).
    pub fn at(self, at: Advertised, tls: Option<String>) -> Self {
        Http {
            listen: Some(at),
            tls,
            ..self
        }
    }
}

impl Protocol for Http {
    fn kind(&self) -> Kind {
        self.kind
    }

    fn check_target(&self, target: &TargetRecord) -> Result<(), String> {
        upstream::check_target(target).map_err(|e| e.to_string())
    }

    /// The gateway's URL and the bearer token (`GRANT_ID.SECRET`) to send it.
    fn connection(&self, grant: &GrantRecord, secret: &str) -> Option<serde_json::Value> {
        let at = self.listen.as_ref()?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let token = bearer(&grant.id, secret);
        Some(serde_json::json!({
            "protocol": self.kind.as_str(),
            "url": format!("{scheme}://{}", at.authority()),
            "token": token,
            "header": format!("Authorization: Bearer {token}"),
            "ca": self.tls,
        }))
    }
}

/// Sizes the HTTP gateway holds to.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub inspect_body_bytes: usize,
    pub mask_body_bytes: usize,
    pub max_request_body_bytes: u64,
}

impl From<&HttpConfig> for HttpLimits {
    fn from(config: &HttpConfig) -> Self {
        HttpLimits {
            inspect_body_bytes: config.inspect_body_bytes,
            mask_body_bytes: config.mask_body_bytes,
            max_request_body_bytes: config.max_request_body_bytes,
        }
    }
}

/// What every HTTP connection shares.
pub struct HttpServices {
    pub(crate) proxy: Arc<ProxyServices>,
    limits: HttpLimits,
    tls: Option<TlsAcceptor>,
    /// Each target's upstream client, kept for its connection pool; rebuilt when the
    /// target or its credential changes.
    upstreams: Mutex<HashMap<String, Arc<Upstream>>>,
}

impl HttpServices {
    pub fn new(proxy: Arc<ProxyServices>, limits: HttpLimits, tls: Option<TlsAcceptor>) -> Self {
        HttpServices {
            proxy,
            limits,
            tls,
            upstreams: Mutex::new(HashMap::new()),
        }
    }

    /// The kinds of target this listener serves.
    fn serves(&self, kind: Kind) -> bool {
        matches!(kind, Kind::Http | Kind::Kubernetes)
    }

    /// `target`'s upstream, with its credential as the secrets file holds it now.
    fn upstream(&self, target: &TargetRecord) -> Result<Arc<Upstream>, UpstreamError> {
        let secrets = Secrets::load(&self.proxy.secrets_file)
            .map_err(|e| UpstreamError::Credential(e.to_string()))?;
        let mut upstreams = self.upstreams.lock().unwrap();
        if let Some(upstream) = upstreams.get(&target.name)
            && upstream.current(target, &secrets)
        {
            return Ok(upstream.clone());
        }
        let upstream = Arc::new(Upstream::build(target, &secrets)?);
        upstreams.insert(target.name.clone(), upstream.clone());
        Ok(upstream)
    }
}

impl ProtocolGateway for HttpServices {
    fn name(&self) -> &'static str {
        "HTTP"
    }

    fn serve(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(listen::listen(listener, self))
    }
}
