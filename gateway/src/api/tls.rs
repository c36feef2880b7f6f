//! TLS for the gateway's listeners (agent API, PostgreSQL), with rustls.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// Builds a TLS acceptor from a PEM certificate chain and private key; `section` names
/// the configuration section in errors.
pub fn load_tls(section: &str, cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    load_tls_alpn(section, cert, key, &[])
}

/// [`load_tls`], offering the application protocols `alpn` (e.g. `h2`, `http/1.1`).
pub fn load_tls_alpn(
    section: &str,
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect())
        .map_err(|e| format!("{section}.tls-cert {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{section}.tls-cert {}: no certificate in it",
            cert.display()
        ));
    }
    crate::fsperm::check_private(key).map_err(|e| format!("{section}.tls-key: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("{section}.tls-key {}: {e}", key.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("{section} TLS: {e}"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(TlsAcceptor::from(Arc::new(config)))
}
