//! Ed25519 keys in Airlock's text formats: operators' bundle-signing keys and the keys
//! a gateway trusts.
//!
//! A public key is one line, `airlock-ed25519-pub:<base64>`; a secret key file holds
//! `airlock-ed25519-secret:<base64 seed>` and must be mode 0600. A key's id is the first
//! 8 bytes of the sha256 of its public key, in hex: short, stable, and safe to print.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

const PUB_PREFIX: &str = "airlock-ed25519-pub:";
const SECRET_PREFIX: &str = "airlock-ed25519-secret:";

/// Why a key could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} is not an Airlock public key (expected `{PUB_PREFIX}<base64>`)")]
    NotAPublicKey { what: String },
    #[error("{path} is not an Airlock secret key (expected `{SECRET_PREFIX}<base64>`)")]
    NotASecretKey { path: PathBuf },
    #[error("{path}: mode {mode:04o} lets others read this secret key; refusing it (chmod 600)")]
    SecretReadable { path: PathBuf, mode: u32 },
    #[error("{path} already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error("signed-note key: {0}")]
    NoteKey(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A public key, with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    key: VerifyingKey,
    id: String,
}

impl PublicKey {
    fn new(key: VerifyingKey) -> Self {
        let id = hex::encode(&Sha256::digest(key.as_bytes())[..8]);
        PublicKey { key, id }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Parses the one-line text form.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let not_a_key = || KeyError::NotAPublicKey {
            what: format!("`{}`", text.trim()),
        };
        let b64 = text.trim().strip_prefix(PUB_PREFIX).ok_or_else(not_a_key)?;
        let bytes: [u8; 32] = B64
            .decode(b64)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(not_a_key)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey::new)
            .map_err(|_| not_a_key())
    }

    /// Reads a key given either as its text form or as the path of a file holding it.
    pub fn from_arg(arg: &str) -> Result<Self, KeyError> {
        if arg.starts_with(PUB_PREFIX) {
            return Self::parse(arg);
        }
        let path = Path::new(arg);
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        Self::parse(&text).map_err(|_| KeyError::NotAPublicKey {
            what: path.display().to_string(),
        })
    }

    /// Verifies a signature over `message` (strict: no malleable or weak-key signatures).
    pub fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.key
            .verify_strict(message, &Signature::from_bytes(signature))
            .is_ok()
    }

    pub fn to_text(&self) -> String {
        format!("{PUB_PREFIX}{}", B64.encode(self.key.as_bytes()))
    }

    /// This key as a C2SP signed-note verifier for notes signed under `name`.
    pub fn note_verifier(&self, name: &str) -> Result<signed_note::StandardVerifier, KeyError> {
        signed_note::StandardVerifier::new(&signed_note::new_ed25519_verifier_key(name, &self.key))
            .map_err(|e| KeyError::NoteKey(e.to_string()))
    }
}

/// A secret signing key. Its bytes never appear in `Debug` output or logs.
pub struct SecretKey {
    key: SigningKey,
    public: PublicKey,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey({})", self.public.id)
    }
}

impl SecretKey {
    /// A fresh key from the operating system's random number generator.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed).expect("the OS random number generator is unavailable");
        Self::from_seed(seed)
    }

    fn from_seed(seed: [u8; 32]) -> Self {
        let key = SigningKey::from_bytes(&seed);
        let public = PublicKey::new(key.verifying_key());
        SecretKey { key, public }
    }

    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// This key as a C2SP signed-note signer under `name` (e.g. a log's origin).
    pub fn note_signer(&self, name: &str) -> Result<signed_note::StandardSigner, KeyError> {
        // The signed-note key encoding: algorithm byte 0x01 (Ed25519), then the key.
        let public = [&[1u8][..], self.public.key.as_bytes()].concat();
        let secret = [&[1u8][..], &self.key.to_bytes()[..]].concat();
        let encoded = format!(
            "PRIVATE+KEY+{name}+{:08x}+{}",
            signed_note::key_id(name, &public),
            B64.encode(secret)
        );
        signed_note::StandardSigner::new(&encoded).map_err(|e| KeyError::NoteKey(e.to_string()))
    }

    /// Reads a secret key file, refusing one that group or others can read.
    pub fn read(path: &Path) -> Result<Self, KeyError> {
        let meta = fs::metadata(path).map_err(io_err(path))?;
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::SecretReadable {
                path: path.to_path_buf(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(io_err(path))?;
        let not_a_key = || KeyError::NotASecretKey {
            path: path.to_path_buf(),
        };
        let seed: [u8; 32] = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .and_then(|b64| B64.decode(b64).ok())
            .and_then(|b| b.try_into().ok())
            .ok_or_else(not_a_key)?;
        Ok(Self::from_seed(seed))
    }

    /// Writes the secret key (mode 0600, never overwriting) and its public key beside it
    /// (`<path>.pub`).
    pub fn write(&self, path: &Path) -> Result<PathBuf, KeyError> {
        let secret = format!("{SECRET_PREFIX}{}\n", B64.encode(self.key.to_bytes()));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => KeyError::Exists {
                    path: path.to_path_buf(),
                },
                _ => KeyError::Io {
                    path: path.to_path_buf(),
                    source: e,
                },
            })?;
        file.write_all(secret.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err(path))?;
        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        let pub_path = PathBuf::from(pub_path);
        fs::write(&pub_path, format!("{}\n", self.public.to_text())).map_err(io_err(&pub_path))?;
        Ok(pub_path)
    }
}

/// The keys a gateway trusts, from its own configuration.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys(Vec<PublicKey>);

impl TrustedKeys {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        TrustedKeys(keys)
    }

    pub fn get(&self, id: &str) -> Option<&PublicKey> {
        self.0.iter().find(|k| k.id == id)
    }

    pub fn ids(&self) -> Vec<&str> {
        self.0.iter().map(|k| k.id.as_str()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_and_verify_round_trip_through_text() {
        let key = SecretKey::generate();
        let public = PublicKey::parse(&key.public().to_text()).unwrap();
        assert_eq!(public.id(), key.public().id());
        let sig = key.sign(b"manifest");
        assert!(public.verify(b"manifest", &sig));
        assert!(!public.verify(b"manifesT", &sig));
    }

    #[test]
    fn garbage_is_not_a_key() {
        assert!(PublicKey::parse("airlock-ed25519-pub:AAAA").is_err());
        assert!(PublicKey::parse("ssh-ed25519 AAAA").is_err());
    }
}
