//! Grant and agent secrets: 256 bits, stored only as a hash, compared in constant
//! time.
//!
//! Secrets are 256 bits that cannot be guessed, so a plain sha256 is the right storage
//! hash: there is nothing to brute-force that a slow password hash would protect. An
//! agent's token is random and shown once. A grant's secret is derived from the grant
//! id with the gateway's [`GrantKey`], so the broker can show it again to the agent that
//! owns the grant (a follow-up command of the same task, the MCP server's own
//! connections) without storing it.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::fsperm::{self, PermError};

/// The gateway's key for grant secrets: a grant's secret is HMAC-SHA256(key, grant id).
/// It lives in the data directory (0600) beside the gateway's other keys; whoever reads
/// it could compute the secret of any live grant, as whoever reads the secrets file
/// holds the upstreams' credentials.
pub struct GrantKey([u8; 32]);

/// Why the grant key could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum GrantKeyError {
    #[error(transparent)]
    Perm(#[from] PermError),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0} is not a grant key (64 hex characters)")]
    Malformed(String),
}

impl GrantKey {
    /// A fresh random key (for a gateway's first start, and tests).
    pub fn generate() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("the OS random number generator is unavailable");
        GrantKey(key)
    }

    /// Reads the key at `path` (which must be 0600), creating it on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, GrantKeyError> {
        if !path.exists() {
            let key = GrantKey::generate();
            fsperm::write_private_atomic(path, hex::encode(key.0).as_bytes())?;
            return Ok(key);
        }
        fsperm::check_secret(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| GrantKeyError::Io(path.display().to_string(), e))?;
        let mut key = [0u8; 32];
        hex::decode_to_slice(text.trim(), &mut key)
            .map_err(|_| GrantKeyError::Malformed(path.display().to_string()))?;
        Ok(GrantKey(key))
    }

    /// The secret of grant `id`: URL-safe base64 of 256 bits.
    pub(crate) fn secret(&self, id: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(b"airlock grant secret\0");
        mac.update(id.as_bytes());
        B64URL.encode(mac.finalize().into_bytes())
    }
}

/// A fresh random identifier: `prefix` + 16 hex characters (64 bits).
pub fn new_id(prefix: &str) -> String {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
    format!("{prefix}{}", hex::encode(bytes))
}

/// A grant id as the broker mints them (`g_` and hex): what a login's user name must
/// look like before the record keeps it, since a client that swapped user and password
/// would otherwise put a secret there.
pub fn looks_like_grant_id(user: &str) -> bool {
    user.strip_prefix("g_").is_some_and(|hex| {
        (8..=64).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

/// A fresh secret: 256 random bits, URL-safe base64.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
    B64URL.encode(bytes)
}

/// The stored form of a secret.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `presented` is the secret whose stored hash is `stored`, in constant time.
pub fn secret_matches(presented: &str, stored: &str) -> bool {
    let presented = hash_secret(presented);
    presented.as_bytes().ct_eq(stored.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_and_match_only_themselves() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.len() >= 43, "256 bits");
        let stored = hash_secret(&a);
        assert!(secret_matches(&a, &stored));
        assert!(!secret_matches(&b, &stored));
        assert!(!stored.contains(&a));
    }

    #[test]
    fn grant_secrets_are_per_grant_and_per_key() {
        let key = GrantKey::generate();
        let a = key.secret("g_0123456789abcdef");
        assert_eq!(a, key.secret("g_0123456789abcdef"), "shown again, the same");
        assert!(a.len() >= 43, "256 bits");
        assert_ne!(a, key.secret("g_0123456789abcdee"));
        assert_ne!(a, GrantKey::generate().secret("g_0123456789abcdef"));
    }

    #[test]
    fn the_grant_key_is_created_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grant.key");
        let first = GrantKey::load_or_create(&path).unwrap();
        let again = GrantKey::load_or_create(&path).unwrap();
        assert_eq!(first.secret("g_1"), again.secret("g_1"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            GrantKey::load_or_create(&path).is_err(),
            "a readable key is refused"
        );
    }
}
