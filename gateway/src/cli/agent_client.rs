//! The agent's side of the agent API, shared by `airlock connect`, `airlock targets`,
//! `airlock grants mine` and `airlock mcp`: HTTPS verified against the CA the agent
//! names (`--ca`, `$AIRLOCK_CA`) or the system's trust store, or plain HTTP to a
//! loopback address only, since the agent token must not cross a network in clear.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// Where the agent API is and who the agent is.
#[derive(Args, Clone)]
pub(crate) struct ApiArgs {
    /// The agent API (default: $AIRLOCK_URL, else http://127.0.0.1:7070).
    #[arg(long)]
    url: Option<String>,
    /// A file holding the agent token (default: $AIRLOCK_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signs the gateway's certificates (default:
    /// $AIRLOCK_CA, else the system's trust store). Handed on to the clients
    /// `airlock connect` runs.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
}

/// Trust roots OpenSSL-based clients (libpq, curl) read when no CA file is named:
/// where Debian, Fedora, Alpine and SUSE keep the system's bundle.
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/cert.pem",
    "/etc/ssl/ca-bundle.pem",
];

/// A client of one gateway's agent API, as one agent.
pub(crate) struct AgentClient {
    base: String,
    token: String,
    ca: Option<PathBuf>,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl AgentClient {
    pub(crate) fn new(args: &ApiArgs) -> anyhow::Result<Self> {
        let token = match &args.token_file {
            Some(file) => {
                std::fs::read_to_string(file).with_context(|| file.display().to_string())?
            }
            None => std::env::var("AIRLOCK_TOKEN")
                .context("no agent token: set AIRLOCK_TOKEN or pass --token-file")?,
        };
        let base = args
            .url
            .clone()
            .or_else(|| std::env::var("AIRLOCK_URL").ok())
            .unwrap_or_else(|| "http://127.0.0.1:7070".to_string());
        let base = base.trim_end_matches('/').to_string();
        let ca = args
            .ca
            .clone()
            .or_else(|| std::env::var_os("AIRLOCK_CA").map(PathBuf::from));
        let tls = match base.strip_prefix("http://") {
            Some(authority) => {
                if !is_loopback(authority) {
                    bail!(
                        "agent API {base}: plain HTTP is for a gateway on this machine only; the agent token would cross the network in clear (use https://)"
                    );
                }
                None
            }
            None if base.starts_with("https://") => Some(tls_config(ca.as_deref())?),
            None => bail!("agent API URL {base}: expected https://HOST:PORT"),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let connector = match tls {
            Some(tls) => builder.with_tls_config(tls).https_only(),
            // Loopback plain HTTP: the TLS roots are never used.
            None => builder
                .with_tls_config(
                    airlock::tls::trusting(rustls::RootCertStore::empty())
                        .map_err(anyhow::Error::msg)?,
                )
                .https_or_http(),
        }
        .enable_http1()
        .wrap_connector(http);
        Ok(AgentClient {
            base,
            token: token.trim().to_string(),
            ca,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The CA file the agent named, for the clients it runs.
    pub(crate) fn ca(&self) -> Option<&Path> {
        self.ca.as_deref()
    }

    /// A CA bundle file for a client that needs one named (libpq): the agent's CA, else
    /// the system's bundle.
    pub(crate) fn ca_file(&self) -> anyhow::Result<PathBuf> {
        if let Some(ca) = &self.ca {
            return Ok(ca.clone());
        }
        std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .into_iter()
            .chain(SYSTEM_BUNDLES.iter().map(PathBuf::from))
            .find(|p| p.is_file())
            .context(
                "no CA file: pass --ca (or set AIRLOCK_CA); no system trust store was found either",
            )
    }

    /// The agent API's base URL.
    pub(crate) fn base(&self) -> &str {
        &self.base
    }

    /// One JSON request; returns the status and the JSON body (Null if it had none).
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let (status, _, bytes) = self
            .send(
                method,
                path,
                &[(CONTENT_TYPE.as_str(), "application/json")],
                body,
            )
            .await?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    }

    /// One request with the agent's token and `headers`; returns the status, the
    /// response's headers and its body.
    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<(u16, hyper::HeaderMap, Bytes)> {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .header(ACCEPT, "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = self
            .client
            .request(request.body(Full::new(body))?)
            .await
            .map_err(|e| unreachable_error(&self.base, &e))?;
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await?.to_bytes();
        Ok((parts.status.as_u16(), parts.headers, bytes))
    }
}

/// The cause of a failed request, named: a certificate the CA did not sign reads as
/// that, not as a bare connection error.
fn unreachable_error(base: &str, e: &hyper_util::client::legacy::Error) -> anyhow::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(inner) = cause {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return anyhow::anyhow!(
                "cannot reach the agent API at {base}: its certificate is not trusted ({tls}); check --ca or AIRLOCK_CA"
            );
        }
        // The TLS connector hands rustls's error on inside io::Errors, whose source()
        // skips the error they wrap.
        cause = match inner.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|e| e as &(dyn std::error::Error + 'static)),
            None => inner.source(),
        };
    }
    anyhow::anyhow!("cannot reach the agent API at {base}: {e:#}")
}

/// Whether `authority` (`host:port`) names a loopback address.
fn is_loopback(authority: &str) -> bool {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// TLS trusting exactly the certificates in `ca` (PEM), or the system's store without
/// one.
fn tls_config(ca: Option<&Path>) -> anyhow::Result<rustls::ClientConfig> {
    let config = match ca {
        Some(ca) => airlock::tls::client_config_with(ca, None)
            .map_err(|e| anyhow::anyhow!("CA file {e}"))?,
        None => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                bail!(
                    "no trusted certificate in the system's store: pass --ca (or set AIRLOCK_CA)"
                );
            }
            airlock::tls::trusting(roots).map_err(anyhow::Error::msg)?
        }
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn plain_http_is_for_loopback_only() {
        assert!(is_loopback("127.0.0.1:7070"));
        assert!(is_loopback("127.0.0.9:7070"));
        assert!(is_loopback("localhost:7070"));
        assert!(is_loopback("[::1]:7070"));
        assert!(!is_loopback("10.0.0.1:7070"));
        assert!(!is_loopback("gateway.example:7070"));
        assert!(!is_loopback("localhost.example:7070"));
    }
}
