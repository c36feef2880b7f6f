//! Grant and agent secrets: random, shown once, stored only as a hash, compared in
//! constant time.
//!
//! Secrets are 256 random bits, so a plain sha256 is the right storage hash: there is
//! nothing to brute-force that a slow password hash would protect.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

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
}
