//! The bundle's source description (`bundle.toml`) and its signed manifest.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::BundleError;
use crate::policy::Scope;

/// `bundle.toml`: what an operator writes to describe a bundle before signing it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SourceBundle {
    pub name: String,
    /// How long a signed bundle stays valid, e.g. "90d".
    #[serde(default = "default_validity")]
    pub valid_for: String,
    #[serde(rename = "module")]
    pub modules: Vec<SourceModule>,
}

fn default_validity() -> String {
    "365d".to_string()
}

/// One module in `bundle.toml`. Paths are relative to the directory holding it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SourceModule {
    pub name: String,
    /// The built component.
    pub file: PathBuf,
    pub applies_to: Scope,
    /// Fixture files, or directories whose `.toml` and `.json` files are fixtures.
    #[serde(default)]
    pub fixtures: Vec<PathBuf>,
}

/// `manifest.toml`: the signed description of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    pub name: String,
    pub version: u64,
    /// RFC 3339, UTC.
    pub created: String,
    /// RFC 3339, UTC. The bundle is refused after this time.
    pub expires: String,
    #[serde(rename = "module")]
    pub modules: Vec<ManifestModule>,
}

/// One module in the manifest: its file and digest, where it applies, its fixtures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ManifestModule {
    pub name: String,
    pub file: String,
    pub sha256: String,
    pub applies_to: Scope,
    #[serde(default, rename = "fixture", skip_serializing_if = "Vec::is_empty")]
    pub fixtures: Vec<FileDigest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct FileDigest {
    pub file: String,
    pub sha256: String,
}

pub(crate) const FORMAT: u32 = 1;

/// The highest version a bundle may have: a version at the top of `u64` would leave no
/// version to rotate to (every later install a "rollback"). Epoch seconds, dates
/// (`20261129`) and counters all fit far below it, and it is exact in JSON.
pub const MAX_VERSION: u64 = 1 << 53;

/// How far in the future a bundle's `created` may lie (clock skew between the signer
/// and the gateway).
const CREATED_SKEW: std::time::Duration = std::time::Duration::from_secs(300);

impl Manifest {
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let bad = |reason: String| BundleError::BadManifest {
            file: super::MANIFEST_FILE.into(),
            reason,
        };
        let manifest: Manifest = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        if manifest.format != FORMAT {
            return Err(bad(format!(
                "format {} is not supported (this gateway reads format {FORMAT})",
                manifest.format
            )));
        }
        check_name(&manifest.name).map_err(bad)?;
        check_version(manifest.version).map_err(bad)?;
        let mut names = std::collections::HashSet::new();
        for module in &manifest.modules {
            check_name(&module.name).map_err(bad)?;
            check_patterns(&module.applies_to.targets).map_err(bad)?;
            if !names.insert(module.name.as_str()) {
                return Err(bad(format!("module `{}` is listed twice", module.name)));
            }
            if module.applies_to.hooks.is_empty() {
                return Err(bad(format!("module `{}` applies to no hook", module.name)));
            }
        }
        let expires = manifest.expires_at().map_err(bad)?;
        let created = humantime::parse_rfc3339(&manifest.created).map_err(|e| {
            bad(format!(
                "created {:?} is not an RFC 3339 time: {e}",
                manifest.created
            ))
        })?;
        if created > expires {
            return Err(bad("created is after expires".into()));
        }
        Ok(manifest)
    }

    /// Refuses a bundle signed for longer than `max` (`policy.max-validity`).
    pub fn check_validity(&self, max: std::time::Duration) -> Result<(), String> {
        let created = humantime::parse_rfc3339(&self.created).map_err(|e| e.to_string())?;
        let expires = self.expires_at()?;
        let window = expires.duration_since(created).unwrap_or_default();
        if window > max {
            let days = |d: std::time::Duration| d.as_secs().div_ceil(86_400);
            return Err(format!(
                "bundle {} v{} is signed for {} days, longer than this gateway's policy.max-validity of {} days",
                self.name,
                self.version,
                days(window),
                days(max)
            ));
        }
        Ok(())
    }

    /// Refuses a bundle created in the future (beyond clock skew): its signer's clock,
    /// or its claims, cannot be trusted.
    pub fn check_created(&self, now: std::time::SystemTime) -> Result<(), String> {
        let created = humantime::parse_rfc3339(&self.created)
            .map_err(|e| format!("created `{}`: {e}", self.created))?;
        if created > now + CREATED_SKEW {
            return Err(format!(
                "created {} is in the future (more than {}s ahead of this gateway's clock)",
                self.created,
                CREATED_SKEW.as_secs()
            ));
        }
        Ok(())
    }

    pub fn expires_at(&self) -> Result<std::time::SystemTime, String> {
        humantime::parse_rfc3339(&self.expires)
            .map_err(|e| format!("expires `{}` is not an RFC 3339 time: {e}", self.expires))
    }
}

impl SourceBundle {
    pub fn parse(text: &str, file: &Path) -> Result<Self, BundleError> {
        let bad = |reason: String| BundleError::BadManifest {
            file: file.display().to_string(),
            reason,
        };
        let source: SourceBundle = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        check_name(&source.name).map_err(bad)?;
        for module in &source.modules {
            check_name(&module.name).map_err(bad)?;
            check_patterns(&module.applies_to.targets).map_err(bad)?;
        }
        humantime::parse_duration(&source.valid_for)
            .map_err(|e| bad(format!("valid-for `{}`: {e}", source.valid_for)))?;
        Ok(source)
    }
}

/// Versions must leave room to rotate: see [`MAX_VERSION`].
pub fn check_version(version: u64) -> Result<(), String> {
    if version > MAX_VERSION {
        return Err(format!(
            "version {version} is over the limit of {MAX_VERSION} (2^53): a version that high would leave no room for the next bundle; use epoch seconds or a counter"
        ));
    }
    Ok(())
}

/// Target patterns are shown to operators: target-name characters and the wildcards.
fn check_patterns(patterns: &[String]) -> Result<(), String> {
    match patterns.iter().find(|p| {
        p.is_empty()
            || p.len() > 128
            || !p
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'*' | b'?'))
    }) {
        Some(bad) => Err(format!(
            "target pattern {bad:?} must be 1-128 characters of letters, digits, `-`, `_`, `.`, `*` and `?`"
        )),
        None => Ok(()),
    }
}

/// Names become file names: keep them to a safe alphabet.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must be 1-64 characters of letters, digits, `-` and `_`"
        ))
    }
}

/// Resolves a manifest path inside the bundle, refusing absolute paths and `..`.
pub(crate) fn inside(dir: &Path, file: &str) -> Result<PathBuf, BundleError> {
    let relative = Path::new(file);
    let safe = !file.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if safe {
        Ok(dir.join(relative))
    } else {
        Err(BundleError::UnsafePath {
            file: file.to_string(),
        })
    }
}
