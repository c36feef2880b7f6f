//! The gateway's own SSH host key: created on first start (ed25519, OpenSSH format,
//! mode 0600), then only read. Agents' clients pin it; it is never an upstream's key.

use std::path::Path;

use russh::keys::PrivateKey;
use russh::keys::ssh_key::LineEnding;
use russh::keys::ssh_key::private::Ed25519Keypair;

use crate::fsperm;

pub(super) fn load_or_create(path: &Path) -> Result<PrivateKey, String> {
    let shown = path.display();
    if path.exists() {
        fsperm::check_secret(path).map_err(|e| format!("SSH host key {shown}: {e}"))?;
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("SSH host key {shown}: {e}"))?;
        return PrivateKey::from_openssh(text.trim())
            .map_err(|e| format!("SSH host key {shown}: not an OpenSSH private key: {e}"));
    }
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| format!("no randomness for a host key: {e}"))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| format!("SSH host key: {e}"))?;
    fsperm::write_private_atomic(path, text.as_bytes())
        .map_err(|e| format!("SSH host key {shown}: {e}"))?;
    tracing::info!(path = %shown, "created the gateway's SSH host key");
    Ok(key)
}
