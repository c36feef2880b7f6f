//! The upstream of an HTTP or Kubernetes target: its URL, the TLS it is verified with
//! (the target's own CA file, never the machine's trust store), the gateway's own
//! credential as the upstream expects it, and a pooled keep-alive client.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::Uri;
use hyper::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::BoxError;
use crate::grants::TargetRecord;
use crate::secrets::{Credential, Secrets};

/// Why a target's upstream cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {0:?}: {1}")]
    Url(String, &'static str),
    #[error("inject = {0:?}: use bearer, basic, header:NAME or client-cert")]
    Inject(String),
    #[error("{0}")]
    Credential(String),
    #[error("ca {path}: {reason}")]
    Ca { path: String, reason: String },
}

/// A target's upstream URL: `http(s)://host:port` and an optional path prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamUrl {
    pub https: bool,
    /// `host:port`, as the URL wrote it.
    pub authority: String,
    /// Prepended to every request's path; empty or starting with `/`, never ending
    /// with one.
    pub prefix: String,
}

impl UpstreamUrl {
    pub(crate) fn parse(url: &str) -> Result<Self, UpstreamError> {
        let bad = |why| UpstreamError::Url(url.to_string(), why);
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or(bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad(
                "credentials in the URL; name them with `credential` instead",
            ));
        }
        if uri.query().is_some() {
            return Err(bad("a query in the upstream URL"));
        }
        let prefix = uri.path().trim_end_matches('/').to_string();
        Ok(UpstreamUrl {
            https,
            authority: authority.to_string(),
            prefix,
        })
    }
}

/// How the gateway's credential reaches the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum InjectKind {
    Bearer,
    Basic,
    Header(HeaderName),
    ClientCert,
}

impl InjectKind {
    fn parse(inject: Option<&str>) -> Result<Self, UpstreamError> {
        let bad = || UpstreamError::Inject(inject.unwrap_or_default().to_string());
        match inject {
            None | Some("bearer") => Ok(InjectKind::Bearer),
            Some("basic") => Ok(InjectKind::Basic),
            Some("client-cert") => Ok(InjectKind::ClientCert),
            Some(other) => {
                let name = other.strip_prefix("header:").ok_or_else(bad)?;
                let name = HeaderName::from_bytes(name.as_bytes()).map_err(|_| bad())?;
                if name == hyper::header::HOST || name == hyper::header::CONTENT_LENGTH {
                    return Err(bad());
                }
                Ok(InjectKind::Header(name))
            }
        }
    }
}

/// Checks a target's HTTP settings without reading its credential.
pub(crate) fn check_target(target: &TargetRecord) -> Result<(), UpstreamError> {
    let url = UpstreamUrl::parse(&target.upstream)?;
    let inject = InjectKind::parse(target.inject.as_deref())?;
    if url.https && target.ca.is_none() {
        return Err(UpstreamError::Url(
            target.upstream.clone(),
            "an https upstream needs `ca` (its CA file): the machine's trust store is never used",
        ));
    }
    if !url.https && (target.ca.is_some() || inject == InjectKind::ClientCert) {
        return Err(UpstreamError::Url(
            target.upstream.clone(),
            "`ca` and client certificates need an https upstream",
        ));
    }
    if inject == InjectKind::ClientCert && target.credential.is_none() {
        return Err(UpstreamError::Credential(
            "inject = client-cert needs a credential (a PEM certificate chain and key)".into(),
        ));
    }
    Ok(())
}

/// The body the upstream client sends.
pub(super) type UpBody = BoxBody<Bytes, BoxError>;

/// One target's upstream, ready to send requests on.
pub(super) struct Upstream {
    /// The target as it was when this was built: a changed target builds a new one.
    target: TargetRecord,
    credential: Option<Credential>,
    url: UpstreamUrl,
    /// The header the credential travels in, if not a client certificate.
    inject: Option<(HeaderName, HeaderValue)>,
    /// Every form in which the credential was sent, for responses to be scrubbed of.
    secrets: super::body::Secrets,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>,
    /// HTTP/1.1 only, for WebSocket upgrades.
    upgrades: Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody>,
}

impl Upstream {
    /// Builds the upstream of `target` with its credential from `secrets`.
    pub(super) fn build(target: &TargetRecord, secrets: &Secrets) -> Result<Self, UpstreamError> {
        check_target(target)?;
        let url = UpstreamUrl::parse(&target.upstream)?;
        let kind = InjectKind::parse(target.inject.as_deref())?;
        let credential = target
            .credential
            .as_deref()
            .map(|r| secrets.resolve(r))
            .transpose()
            .map_err(|e| UpstreamError::Credential(e.to_string()))?;
        let header = |value: String| {
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                UpstreamError::Credential(
                    "the credential cannot be sent in an HTTP header (it holds a line break or a control character)"
                        .into(),
                )
            })?;
            value.set_sensitive(true);
            Ok::<_, UpstreamError>(value)
        };
        let inject = match (&kind, &credential) {
            (_, None) | (InjectKind::ClientCert, _) => None,
            (InjectKind::Bearer, Some(c)) => {
                Some((AUTHORIZATION, header(format!("Bearer {}", c.expose()))?))
            }
            (InjectKind::Basic, Some(c)) => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(c.expose());
                Some((AUTHORIZATION, header(format!("Basic {encoded}"))?))
            }
            (InjectKind::Header(name), Some(c)) => {
                Some((name.clone(), header(c.expose().to_string())?))
            }
        };
        // What an upstream could reflect: the credential, and each encoding of it that
        // was sent (too short a secret would scrub innocent text, and is left out).
        let mut secrets: Vec<Vec<u8>> = Vec::new();
        if let (Some(c), false) = (&credential, kind == InjectKind::ClientCert) {
            let raw = c.expose();
            secrets.push(raw.as_bytes().to_vec());
            if kind == InjectKind::Basic {
                secrets.push(
                    base64::engine::general_purpose::STANDARD
                        .encode(raw)
                        .into_bytes(),
                );
                if let Some((_, password)) = raw.split_once(':') {
                    secrets.push(password.as_bytes().to_vec());
                }
            }
        }
        secrets.retain(|s| s.len() >= 8);
        let identity = match kind {
            InjectKind::ClientCert => credential.as_ref().map(|c| c.expose()),
            _ => None,
        };
        let tls = match &target.ca {
            Some(ca) => tls_config(ca, identity)?,
            // Never used for an http:// upstream; the connector wants one all the same.
            None => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| UpstreamError::Credential(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http.clone());
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        // A WebSocket is an HTTP/1.1 upgrade: its connection offers nothing else, and
        // leaves the pool once upgraded.
        let upgrades = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(0)
            .build(
                hyper_rustls::HttpsConnectorBuilder::new()
                    .with_tls_config(tls)
                    .https_or_http()
                    .enable_http1()
                    .wrap_connector(http),
            );
        Ok(Upstream {
            target: target.clone(),
            credential,
            url,
            inject,
            secrets: super::body::secrets(secrets),
            client,
            upgrades,
        })
    }

    /// Whether this was built from `target` as it is now, with `secrets`' credential.
    pub(super) fn current(&self, target: &TargetRecord, secrets: &Secrets) -> bool {
        &self.target == target
            && target
                .credential
                .as_deref()
                .map(|r| secrets.resolve(r).ok())
                == self.credential.as_ref().map(|c| Some(c.clone()))
    }

    /// The upstream URI of a request for `path` (the gateway's encoding) and `query`
    /// (as the agent sent it).
    pub(super) fn uri(&self, path: &str, query: Option<&str>) -> Result<Uri, hyper::http::Error> {
        let scheme = if self.url.https { "https" } else { "http" };
        let mut path_and_query = format!("{}{path}", self.url.prefix);
        if let Some(query) = query {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Uri::builder()
            .scheme(scheme)
            .authority(self.url.authority.as_str())
            .path_and_query(path_and_query)
            .build()
    }

    /// Puts the gateway's credential on a request's headers.
    pub(super) fn inject(&self, headers: &mut HeaderMap) {
        if let Some((name, value)) = &self.inject {
            headers.insert(name.clone(), value.clone());
        }
    }

    /// What responses are scrubbed of.
    pub(super) fn secrets(&self) -> &super::body::Secrets {
        &self.secrets
    }

    /// The client for a request: an upgrade's speaks HTTP/1.1 only.
    pub(super) fn client(
        &self,
        upgrade: bool,
    ) -> &Client<hyper_rustls::HttpsConnector<HttpConnector>, UpBody> {
        if upgrade {
            &self.upgrades
        } else {
            &self.client
        }
    }
}

/// The TLS the upstream is verified with; the connector offers h2 and http/1.1 by ALPN.
fn tls_config(ca: &Path, identity: Option<&str>) -> Result<rustls::ClientConfig, UpstreamError> {
    crate::tls::client_config_with(ca, identity).map_err(|reason| UpstreamError::Ca {
        path: ca.display().to_string(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_urls_are_a_scheme_an_authority_and_a_prefix() {
        let url = UpstreamUrl::parse("https://api.internal:8443/base/").unwrap();
        assert!(url.https);
        assert_eq!(url.authority, "api.internal:8443");
        assert_eq!(url.prefix, "/base");
        assert_eq!(
            UpstreamUrl::parse("http://127.0.0.1:9000").unwrap().prefix,
            ""
        );
        for bad in [
            "ftp://x",
            "127.0.0.1:9000",
            "http://user:pw@host/",
            "http://host/?q=1",
        ] {
            assert!(UpstreamUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn inject_names_a_way_to_present_the_credential() {
        assert_eq!(InjectKind::parse(None).unwrap(), InjectKind::Bearer);
        assert_eq!(
            InjectKind::parse(Some("header:X-Api-Key")).unwrap(),
            InjectKind::Header(HeaderName::from_static("x-api-key"))
        );
        for bad in ["token", "header:", "header:bad name", "header:host"] {
            assert!(InjectKind::parse(Some(bad)).is_err(), "{bad}");
        }
    }
}
