//! The gateway's configuration and data directory.
//!
//! Every command finds the data directory with `--data DIR`, else `AIRLOCK_DATA`, else
//! `$XDG_DATA_HOME/airlock` (or `~/.local/share/airlock`). The configuration is
//! `airlock.toml` in it unless `--config` names another file. Both belong to the gateway:
//! the agent has no path to either.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::keys::{KeyError, PublicKey, TrustedKeys};
use crate::policy::PolicyLimits;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: policy.trusted-keys: {source}")]
    TrustedKey { path: PathBuf, source: KeyError },
    #[error(
        "no data directory: pass --data DIR or set AIRLOCK_DATA (neither HOME nor XDG_DATA_HOME is set)"
    )]
    NoDataDir,
}

/// `airlock.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(skip)]
    path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyConfig {
    /// Operators' bundle-signing public keys: the text form or a file holding it.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Wall-clock deadline per policy call, in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Linear-memory cap per policy instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
}

fn default_deadline_ms() -> u64 {
    20
}
fn default_memory_mib() -> usize {
    64
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            trusted_keys: Vec::new(),
            deadline_ms: default_deadline_ms(),
            memory_mib: default_memory_mib(),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file gives the defaults (which trust no bundle key).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        config.path = path.to_path_buf();
        let invalid = |reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !(1..=10_000).contains(&config.policy.deadline_ms) {
            return Err(invalid("policy.deadline-ms must be between 1 and 10000"));
        }
        if !(1..=4096).contains(&config.policy.memory_mib) {
            return Err(invalid("policy.memory-mib must be between 1 and 4096"));
        }
        config.trusted_keys()?;
        Ok(config)
    }

    pub fn trusted_keys(&self) -> Result<TrustedKeys, ConfigError> {
        self.policy
            .trusted_keys
            .iter()
            .map(|k| PublicKey::from_arg(k))
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedKeys::new)
            .map_err(|source| ConfigError::TrustedKey {
                path: self.path.clone(),
                source,
            })
    }

    pub fn policy_limits(&self) -> PolicyLimits {
        PolicyLimits {
            deadline: Duration::from_millis(self.policy.deadline_ms),
            memory_bytes: self.policy.memory_mib << 20,
            ..PolicyLimits::default()
        }
    }
}

/// The gateway's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// `explicit` (from `--data`), else `AIRLOCK_DATA`, else the XDG default.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let root = match explicit {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("AIRLOCK_DATA") {
                Some(p) => PathBuf::from(p),
                None => match std::env::var_os("XDG_DATA_HOME") {
                    Some(p) => PathBuf::from(p).join("airlock"),
                    None => std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".local/share/airlock"))
                        .ok_or(ConfigError::NoDataDir)?,
                },
            },
        };
        Ok(DataDir { root })
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("airlock.toml")
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.root.join("policy")
    }
}
