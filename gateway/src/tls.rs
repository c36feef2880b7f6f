//! TLS to servers the gateway calls (upstream databases, a checkpoint witness): rustls,
//! verifying the server's certificate against a CA file the operator names and never
//! against whatever the machine happens to trust. The agent's CLI builds its own trust
//! on [`trusting`], and on [`client_config_with`] where the agent names a CA file.

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A client configuration that trusts exactly the certificates in `roots` (PEM).
pub(crate) fn client_config(roots: &Path) -> Result<Arc<ClientConfig>, String> {
    client_config_with(roots, None).map(Arc::new)
}

/// A client configuration that trusts exactly `roots`, presenting no certificate.
pub fn trusting(roots: rustls::RootCertStore) -> Result<ClientConfig, String> {
    Ok(builder(roots)?.with_no_client_auth())
}

fn builder(
    roots: rustls::RootCertStore,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>, String> {
    Ok(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots),
    )
}

/// A client configuration that trusts exactly the certificates in `roots` (PEM) and,
/// given `identity` (a PEM certificate chain and its private key), presents it.
pub fn client_config_with(roots: &Path, identity: Option<&str>) -> Result<ClientConfig, String> {
    let unreadable = |e: &dyn std::fmt::Display| format!("{}: {e}", roots.display());
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(roots)
        .and_then(|certs| certs.collect())
        .map_err(|e| unreadable(&e))?;
    let mut store = rustls::RootCertStore::empty();
    for cert in certs {
        store.add(cert).map_err(|e| unreadable(&e))?;
    }
    if store.is_empty() {
        return Err(unreadable(&"no certificate in the file"));
    }
    let builder = builder(store)?;
    let Some(identity) = identity else {
        return Ok(builder.with_no_client_auth());
    };
    // The identity's text is a secret: errors name what is wrong, never what it holds.
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(identity.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|_| "the client certificate credential holds an unreadable certificate")?;
    if chain.is_empty() {
        return Err("the client certificate credential holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(identity.as_bytes())
        .map_err(|_| "the client certificate credential holds no readable private key")?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("the client certificate credential: {e}"))
}
