//! The gateway's own SSH connection to the target, logged in with the credential the
//! gateway holds and to a host whose key is pinned in the target's configuration.

use std::sync::Arc;
use std::time::Duration;

use russh::client;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use crate::secrets::Credential;

/// How long connecting and logging in upstream may take.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);

/// `upstream = "ssh://USER@HOST:PORT"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub user: String,
    pub host_port: String,
}

impl UpstreamAddr {
    pub fn parse(upstream: &str) -> Result<Self, String> {
        let bad = || format!("upstream `{upstream}` is not ssh://USER@HOST:PORT");
        let rest = upstream.strip_prefix("ssh://").ok_or_else(bad)?;
        let (user, host_port) = rest.split_once('@').ok_or_else(bad)?;
        let port_ok = host_port
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if user.is_empty() || user.contains([':', '/']) || !port_ok || host_port.contains('/') {
            return Err(bad());
        }
        Ok(UpstreamAddr {
            user: user.to_string(),
            host_port: host_port.to_string(),
        })
    }
}

/// Parses a pinned host key: `ALGORITHM BASE64` as in a known_hosts line after the
/// host names (a trailing comment is allowed).
pub fn parse_host_key(text: &str) -> Result<PublicKey, String> {
    PublicKey::from_openssh(text.trim()).map_err(|e| {
        format!(
            "host-key `{}` is not an OpenSSH public key: {e}",
            text.trim()
        )
    })
}

/// Why the gateway could not give a session its upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("the gateway cannot reach the upstream SSH server: {0}")]
    Connect(String),
    /// The server presented another key than the pinned one: a different host, a
    /// re-keyed one, or someone in between. Never accepted.
    #[error(
        "the upstream's host key is not the one pinned for this target (it presented {presented}): refusing to connect"
    )]
    HostKeyChanged { presented: String },
    #[error("the upstream SSH server refused the gateway's credential")]
    LoginRefused,
    #[error("the gateway's credential for this target is not usable: {0}")]
    Credential(String),
    #[error("the upstream SSH server did not answer in time")]
    Timeout,
}

/// The client side's one decision: is this the pinned host?
pub struct PinnedHost {
    pinned: PublicKey,
    /// What the server presented, when it was not the pinned key.
    presented: Arc<std::sync::Mutex<Option<String>>>,
}

impl client::Handler for PinnedHost {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = key else {
            *self.presented.lock().unwrap() = Some("a certificate".into());
            return Ok(false);
        };
        // Compared as key data: the comment is not part of the key.
        if key.key_data() == self.pinned.key_data() {
            return Ok(true);
        }
        *self.presented.lock().unwrap() = Some(
            key.to_openssh()
                .unwrap_or_else(|_| key.algorithm().to_string()),
        );
        Ok(false)
    }
}

/// A logged-in upstream connection.
pub type Upstream = client::Handle<PinnedHost>;

/// Connects to the target and logs in: by private key when the credential is one
/// (OpenSSH format), else by password.
pub async fn login(
    addr: &UpstreamAddr,
    host_key: &PublicKey,
    credential: &Credential,
) -> Result<Upstream, UpstreamError> {
    tokio::time::timeout(LOGIN_TIMEOUT, login_now(addr, host_key, credential))
        .await
        .map_err(|_| UpstreamError::Timeout)?
}

async fn login_now(
    addr: &UpstreamAddr,
    host_key: &PublicKey,
    credential: &Credential,
) -> Result<Upstream, UpstreamError> {
    let config = Arc::new(client::Config {
        nodelay: true,
        inactivity_timeout: None,
        // AES-GCM first: with `ring` it runs on the CPU's AES instructions, faster here
        // than ChaCha20-Poly1305 in software.
        preferred: russh::Preferred {
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_256_GCM,
                russh::cipher::AES_128_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
            ]),
            ..Default::default()
        },
        ..Default::default()
    });
    let presented = Arc::new(std::sync::Mutex::new(None));
    let handler = PinnedHost {
        pinned: host_key.clone(),
        presented: presented.clone(),
    };
    let mut handle = match client::connect(config, addr.host_port.as_str(), handler).await {
        Ok(handle) => handle,
        Err(e) => {
            if let Some(presented) = presented.lock().unwrap().take() {
                return Err(UpstreamError::HostKeyChanged { presented });
            }
            return Err(UpstreamError::Connect(e.to_string()));
        }
    };
    let secret = credential.expose();
    let result = if secret.trim_start().starts_with("-----BEGIN") {
        let key = PrivateKey::from_openssh(secret.trim())
            .map_err(|e| UpstreamError::Credential(format!("not an OpenSSH private key: {e}")))?;
        let hash = handle
            .best_supported_rsa_hash()
            .await
            .map_err(|e| UpstreamError::Connect(e.to_string()))?
            .flatten();
        handle
            .authenticate_publickey(&addr.user, PrivateKeyWithHashAlg::new(Arc::new(key), hash))
            .await
    } else {
        handle.authenticate_password(&addr.user, secret).await
    };
    match result {
        Ok(russh::client::AuthResult::Success) => Ok(handle),
        Ok(_) => Err(UpstreamError::LoginRefused),
        Err(e) => Err(UpstreamError::Connect(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_addresses_name_user_host_and_port() {
        assert_eq!(
            UpstreamAddr::parse("ssh://deploy@10.0.0.5:22").unwrap(),
            UpstreamAddr {
                user: "deploy".into(),
                host_port: "10.0.0.5:22".into()
            }
        );
        for bad in [
            "deploy@host:22",
            "ssh://host:22",
            "ssh://@host:22",
            "ssh://deploy@host",
            "ssh://deploy@host:99999",
            "ssh://a:b@host:22",
            "ssh://deploy@host:22/x",
        ] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn host_keys_parse_as_known_hosts_lines_do() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
        assert!(parse_host_key(line).is_ok());
        assert!(parse_host_key(&format!("{line} root@web-1")).is_ok());
        assert!(parse_host_key("ssh-ed25519 not-base64").is_err());
        assert!(parse_host_key("").is_err());
    }
}
