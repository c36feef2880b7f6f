//! Upstream credentials: the gateway's own secrets, never the agent's.
//!
//! A target names its credential by reference: `secret:NAME` is key `NAME` in the
//! gateway-owned secrets file (TOML, `NAME = "value"`, mode 0600), `env:VAR` is an
//! environment variable of the gateway process. Values never appear in `Debug` output,
//! logs or the record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fsperm;

/// Why a credential could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("`{reference}` is not a credential reference; use `secret:NAME` or `env:VAR`")]
    BadReference { reference: String },
    #[error("credential {reference}: no key `{name}` in {path}")]
    MissingSecret {
        reference: String,
        name: String,
        path: PathBuf,
    },
    #[error("credential {reference}: environment variable {var} is not set")]
    MissingEnv { reference: String, var: String },
}

/// Where a credential lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reference<'a> {
    /// A key in the secrets file.
    Secret(&'a str),
    /// An environment variable of the gateway process.
    Env(&'a str),
}

/// Parses `secret:NAME` or `env:VAR`.
pub fn parse_reference(reference: &str) -> Result<Reference<'_>, SecretError> {
    match reference.split_once(':') {
        Some(("secret", name)) if !name.is_empty() => Ok(Reference::Secret(name)),
        Some(("env", var)) if !var.is_empty() => Ok(Reference::Env(var)),
        _ => Err(SecretError::BadReference {
            reference: reference.to_string(),
        }),
    }
}

/// A credential value; its `Debug` shows nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(String);

impl Credential {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential(***)")
    }
}

/// The secrets file, read once.
pub struct Secrets {
    path: PathBuf,
    values: BTreeMap<String, String>,
}

impl Secrets {
    /// Reads the secrets file, refusing one that anyone but the gateway's user can read.
    /// A missing file is an empty set of secrets.
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let file_err = |reason: String| SecretError::File {
            path: path.to_path_buf(),
            reason,
        };
        let values = match std::fs::read_to_string(path) {
            Ok(text) => {
                fsperm::check_secret(path).map_err(|e| file_err(e.to_string()))?;
                toml::from_str(&text)
                    .map_err(|e| file_err(format!("not a TOML table of strings: {e}")))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(file_err(e.to_string())),
        };
        Ok(Secrets {
            path: path.to_path_buf(),
            values,
        })
    }

    /// Resolves a `secret:NAME` or `env:VAR` reference.
    pub fn resolve(&self, reference: &str) -> Result<Credential, SecretError> {
        match parse_reference(reference)? {
            Reference::Secret(name) => self
                .values
                .get(name)
                .map(|v| Credential(v.clone()))
                .ok_or_else(|| SecretError::MissingSecret {
                    reference: reference.to_string(),
                    name: name.to_string(),
                    path: self.path.clone(),
                }),
            Reference::Env(var) => {
                std::env::var(var)
                    .map(Credential)
                    .map_err(|_| SecretError::MissingEnv {
                        reference: reference.to_string(),
                        var: var.to_string(),
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn resolves_references_and_refuses_a_readable_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.toml");
        std::fs::write(&path, "prod-db = \"s3cret\"\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secrets = Secrets::load(&path).unwrap();
        assert_eq!(
            secrets.resolve("secret:prod-db").unwrap().expose(),
            "s3cret"
        );
        assert_eq!(
            format!("{:?}", secrets.resolve("secret:prod-db").unwrap()),
            "Credential(***)"
        );
        assert!(matches!(
            secrets.resolve("secret:nope"),
            Err(SecretError::MissingSecret { .. })
        ));
        assert!(matches!(
            secrets.resolve("plain"),
            Err(SecretError::BadReference { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Secrets::load(&path).err().unwrap();
        assert!(err.to_string().contains("others"), "{err}");
    }
}
