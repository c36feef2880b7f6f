//! TLS to servers the gateway calls (upstream databases, a checkpoint witness): rustls,
//! verifying the server's certificate against a CA file the operator names and never
//! against whatever the machine happens to trust.

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A client configuration that trusts exactly the certificates in `roots` (PEM).
pub(crate) fn client_config(roots: &Path) -> Result<Arc<ClientConfig>, String> {
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
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(store)
            .with_no_client_auth();
    Ok(Arc::new(config))
}
