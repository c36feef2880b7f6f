//! The gateway-owned policy directory:
//!
//! ```text
//! policy/                 0700, owned by the gateway's user
//!   bundles/<name>-v<N>/  installed bundles, never modified after install
//!   current -> bundles/…  the active bundle (a symlink, swapped atomically)
//!   cache/                precompiled artifacts, keyed by module digest and engine
//! ```
//!
//! Install stages the verified bytes, loads them (compile + fixtures), renames the
//! staged directory into `bundles/` and swaps `current`: a reader sees the old bundle
//! or the new one, never a mix.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use super::manifest::{MAX_VERSION, Manifest};
use super::read::SizeLimits;
use super::verify::{VerifiedBundle, verify_within};
use super::{BundleError, MANIFEST_FILE, io_err};
use crate::fsperm;
use crate::keys::TrustedKeys;
use crate::policy::{BundleId, LoadError, PolicyEngine, PolicySet, fixture};

const BUNDLES: &str = "bundles";
const CURRENT: &str = "current";
const CACHE: &str = "cache";
const LOCK: &str = ".install.lock";
const RECOVERY: &str = "recovery.json";

/// What `airlock bundle status` shows.
#[derive(Debug, Clone)]
pub struct BundleStatus {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// The policy directory of one gateway.
#[derive(Debug, Clone)]
pub struct PolicyDir {
    root: PathBuf,
    limits: SizeLimits,
}

impl PolicyDir {
    /// Opens (creating with 0700 if needed) the policy directory, refusing it if anyone
    /// but the gateway's user could write anything in it.
    pub fn open(root: &Path) -> Result<Self, BundleError> {
        fsperm::create_private_dir(root)?;
        fsperm::create_private_dir(&root.join(BUNDLES))?;
        fsperm::create_private_dir(&root.join(CACHE))?;
        let dir = PolicyDir {
            root: root.to_path_buf(),
            limits: SizeLimits::default(),
        };
        dir.check_permissions()?;
        Ok(dir)
    }

    /// Installs and loads bundles within `limits` (default: [`SizeLimits::default`]).
    pub fn with_limits(mut self, limits: SizeLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Refuses the directory if anyone but the gateway's user could write what the
    /// gateway loads or installs through: the directory, `bundles/`, the cache, and the
    /// active bundle. An inactive bundle others could write is never loaded again (a
    /// rollback is refused), so it is reported, not fatal: remove it.
    fn check_permissions(&self) -> Result<(), BundleError> {
        self.check_in_use()?;
        let active = self.current()?;
        let bundles = self.root.join(BUNDLES);
        for entry in fs::read_dir(&bundles).map_err(io_err(&bundles))? {
            let path = entry.map_err(io_err(&bundles))?.path();
            if Some(&path) == active.as_ref() {
                continue;
            }
            if let Err(e) = fsperm::check_private_tree(&path) {
                tracing::warn!(
                    bundle = %path.display(),
                    error = %e,
                    "an inactive bundle is writable by others; it is never loaded again, remove it"
                );
            }
        }
        Ok(())
    }

    /// Refuses the directory if anyone but the gateway's user could write what the
    /// gateway is deciding with: the directory, `bundles/`, the cache and the active
    /// bundle. The running gateway checks this on every reload poll.
    pub fn check_in_use(&self) -> Result<(), BundleError> {
        fsperm::check_private(&self.root)?;
        fsperm::check_private(&self.root.join(BUNDLES))?;
        fsperm::check_private_tree(&self.root.join(CACHE))?;
        if let Some(active) = self.current()? {
            fsperm::check_private_tree(&active)?;
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.root.join(CACHE)
    }

    /// The active bundle's directory, if one is installed. `current` is followed only
    /// to a directory the gateway made: `bundles/<one name>`, inside the policy
    /// directory.
    pub fn current(&self) -> Result<Option<PathBuf>, BundleError> {
        let link = self.root.join(CURRENT);
        match fs::read_link(&link) {
            Ok(target) => {
                let mut parts = target.components();
                let inside = matches!(
                    (parts.next(), parts.next(), parts.next()),
                    (
                        Some(std::path::Component::Normal(first)),
                        Some(std::path::Component::Normal(_)),
                        None
                    ) if first == BUNDLES
                );
                if !inside {
                    return Err(BundleError::UnsafePath {
                        file: format!("{CURRENT} -> {}", target.display()),
                    });
                }
                Ok(Some(self.root.join(target)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(BundleError::Io {
                path: link,
                source: e,
            }),
        }
    }

    /// The installed bundle's manifest, read from the gateway's own directory.
    pub fn status(&self) -> Result<Option<BundleStatus>, BundleError> {
        let Some(path) = self.current()? else {
            return Ok(None);
        };
        let manifest_path = path.join(MANIFEST_FILE);
        let bytes = super::read::read_bounded(&manifest_path, super::read::MANIFEST_LIMIT)
            .map_err(|reason| BundleError::UnreadableFile {
                file: manifest_path.display().to_string(),
                reason,
            })?;
        let text = String::from_utf8_lossy(&bytes);
        Ok(Some(BundleStatus {
            manifest: Manifest::parse(&text)?,
            path,
        }))
    }

    /// Verifies `src`, refuses it unless it is newer than the installed bundle, loads
    /// it (compile and fixtures), and makes it the active bundle atomically.
    pub fn install(&self, src: &Path, rules: &InstallRules) -> Result<Manifest, BundleError> {
        let _lock = self.lock()?;
        self.check_permissions()?;
        let verified = rules.verify(src, &self.limits)?;
        let manifest = &verified.manifest;
        let installed = self.status().map_err(|e| BundleError::ActiveUnreadable {
            reason: e.to_string(),
        })?;
        if let Some(installed) = installed
            && manifest.version <= installed.manifest.version
        {
            return Err(BundleError::Rollback {
                name: manifest.name.clone(),
                version: manifest.version,
                installed: installed.manifest.version,
                stuck: installed.manifest.version >= MAX_VERSION,
            });
        }
        load(rules.engine, &verified)?;
        self.activate(&verified, None)?;
        Ok(verified.manifest)
    }

    /// The operator's way out of a gateway stuck on a bundle it cannot rotate from:
    /// one whose manifest this gateway cannot read (a version over the limit or a name
    /// an older gateway accepted), or whose version leaves no room above it. Installs
    /// `src` (verified, signed by a trusted key, loaded and tested like any install)
    /// whatever its version, and leaves a recovery note with `reason` in the policy
    /// directory; the gateway records the note when it activates the bundle. Refused
    /// when the active bundle is fine: then a newer version is the way.
    pub fn recover(
        &self,
        src: &Path,
        rules: &InstallRules,
        reason: &str,
        operator: &str,
    ) -> Result<(Manifest, Recovery), BundleError> {
        let reason = reason.trim();
        if reason.is_empty() || reason.len() > 1024 || reason.chars().any(char::is_control) {
            return Err(BundleError::NotStuck(
                "a recovery needs --reason: one line of at most 1024 characters saying why".into(),
            ));
        }
        let _lock = self.lock()?;
        self.check_permissions()?;
        let replaced = self.current()?;
        let stuck_on = match self.status() {
            Err(e) => format!("the active bundle cannot be read: {e}"),
            Ok(None) => {
                return Err(BundleError::NotStuck(
                    "no bundle is installed; use airlock bundle install".into(),
                ));
            }
            Ok(Some(active)) if active.manifest.version >= MAX_VERSION => format!(
                "the active bundle's version {} leaves no version above it",
                active.manifest.version
            ),
            Ok(Some(active)) => {
                return Err(BundleError::NotStuck(format!(
                    "the active bundle {} v{} can be rotated from: install a newer version with airlock bundle install",
                    active.manifest.name, active.manifest.version
                )));
            }
        };
        let verified = rules.verify(src, &self.limits)?;
        load(rules.engine, &verified)?;
        let recovery = Recovery {
            bundle: bundle_dir_name(&verified.manifest),
            replaced: replaced
                .as_deref()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned()),
            stuck_on,
            reason: reason.to_string(),
            operator: operator.to_string(),
            at: humantime::format_rfc3339_seconds(rules.now).to_string(),
        };
        self.activate(&verified, Some(&recovery))?;
        Ok((verified.manifest, recovery))
    }

    /// The recovery note, if the active bundle was installed by `airlock bundle
    /// recover`.
    pub fn recovery(&self) -> Result<Option<Recovery>, BundleError> {
        let path = self.root.join(RECOVERY);
        let bytes = match super::read::read_bounded(&path, super::read::MANIFEST_LIMIT) {
            Ok(bytes) => bytes,
            Err(super::read::ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None);
            }
            Err(reason) => {
                return Err(BundleError::UnreadableFile {
                    file: path.display().to_string(),
                    reason,
                });
            }
        };
        let recovery: Recovery =
            serde_json::from_slice(&bytes).map_err(|e| BundleError::BadManifest {
                file: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let active = self.current()?;
        let names_active = active
            .as_deref()
            .and_then(Path::file_name)
            .is_some_and(|n| *n == *recovery.bundle);
        Ok(names_active.then_some(recovery))
    }

    /// Removes every installed bundle but the active one, and any staging left by an
    /// interrupted install. Returns the names removed. Holds the install lock.
    pub fn prune(&self) -> Result<Vec<String>, BundleError> {
        let _lock = self.lock()?;
        let active = self.current()?;
        let mut removed = Vec::new();
        let bundles = self.root.join(BUNDLES);
        for entry in fs::read_dir(&bundles).map_err(io_err(&bundles))? {
            let path = entry.map_err(io_err(&bundles))?.path();
            if Some(&path) != active.as_ref() {
                remove_entry(&path)?;
                removed.push(format!("{BUNDLES}/{}", path_name(&path)));
            }
        }
        for entry in fs::read_dir(&self.root).map_err(io_err(&self.root))? {
            let path = entry.map_err(io_err(&self.root))?.path();
            let name = path_name(&path);
            if name.starts_with(".staging-") || name.starts_with(".current-") {
                remove_entry(&path)?;
                removed.push(name);
            }
        }
        if active.is_none() {
            let note = self.root.join(RECOVERY);
            if note.exists() {
                remove_entry(&note)?;
                removed.push(RECOVERY.into());
            }
        }
        Ok(removed)
    }

    /// Writes the verified bundle to `bundles/<name>-v<version>` and points `current`
    /// at it; with a recovery, the note is written first, so whoever sees the new
    /// `current` finds the note that explains it.
    fn activate(
        &self,
        verified: &VerifiedBundle,
        recovery: Option<&Recovery>,
    ) -> Result<(), BundleError> {
        let dir_name = bundle_dir_name(&verified.manifest);
        let relative = Path::new(BUNDLES).join(&dir_name);
        let final_dir = self.root.join(&relative);
        if final_dir.symlink_metadata().is_ok() {
            return Err(BundleError::AlreadyInstalled {
                version: verified.manifest.version,
            });
        }
        let staging = self
            .root
            .join(format!(".staging-{}", fsperm::random_suffix()));
        let staged = verified
            .write_to(&staging)
            .and_then(|()| fs::rename(&staging, &final_dir).map_err(io_err(&final_dir)));
        if let Err(e) = staged {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        let note = self.root.join(RECOVERY);
        match recovery {
            Some(recovery) => {
                let json = serde_json::to_vec_pretty(recovery).expect("a note serializes");
                fsperm::write_private_atomic(&note, &json)?;
            }
            None => match fs::remove_file(&note) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(&note)(e));
                }
                _ => {}
            },
        }
        let tmp_link = self
            .root
            .join(format!(".current-{}", fsperm::random_suffix()));
        symlink(&relative, &tmp_link).map_err(io_err(&tmp_link))?;
        fs::rename(&tmp_link, self.root.join(CURRENT)).map_err(io_err(&tmp_link))?;
        fs::File::open(&self.root)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&self.root))?;
        Ok(())
    }

    /// Verifies and loads the active bundle, if any.
    pub fn load_current(
        &self,
        engine: &Arc<PolicyEngine>,
        trust: &TrustedKeys,
        now: SystemTime,
    ) -> Result<Option<PolicySet>, BundleError> {
        self.check_permissions()?;
        match self.current()? {
            None => Ok(None),
            Some(path) => load(engine, &verify_within(&path, trust, now, &self.limits)?).map(Some),
        }
    }

    /// Serializes installs: two operators installing at once cannot both pass the
    /// rollback check.
    fn lock(&self) -> Result<fs::File, BundleError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.root.join(LOCK);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive).map_err(|e| {
            BundleError::Io {
                path,
                source: e.into(),
            }
        })?;
        Ok(file)
    }
}

/// Why and by whom the active bundle was installed over a stuck one: written by
/// `airlock bundle recover`, recorded by the gateway when it activates the bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Recovery {
    /// The bundle installed (its directory under `bundles/`).
    pub bundle: String,
    /// The bundle it replaced, if one was installed.
    pub replaced: Option<String>,
    /// What made the replaced bundle impossible to rotate from.
    pub stuck_on: String,
    pub reason: String,
    pub operator: String,
    pub at: String,
}

/// The directory an installed bundle gets: derived from its validated name and version.
fn bundle_dir_name(manifest: &Manifest) -> String {
    format!("{}-v{}", manifest.name, manifest.version)
}

fn path_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Removes a file, a link, or a directory tree, never following a link.
fn remove_entry(path: &Path) -> Result<(), BundleError> {
    let meta = path.symlink_metadata().map_err(io_err(path))?;
    if meta.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
    .map_err(io_err(path))
}

/// What an install checks a bundle against, and the engine it loads it with.
pub struct InstallRules<'a> {
    pub trust: &'a TrustedKeys,
    pub engine: &'a Arc<PolicyEngine>,
    pub now: SystemTime,
    /// The longest window a bundle may be signed for.
    pub max_validity: std::time::Duration,
}

impl InstallRules<'_> {
    /// Signature, digests, expiry, and a validity window no longer than allowed.
    fn verify(&self, src: &Path, limits: &SizeLimits) -> Result<VerifiedBundle, BundleError> {
        let verified = verify_within(src, self.trust, self.now, limits)?;
        verified
            .manifest
            .check_validity(self.max_validity)
            .map_err(BundleError::TooLong)?;
        Ok(verified)
    }
}

/// Compiles every module of a verified bundle and runs each module's own fixtures
/// against it. A module that fails to load or fails a fixture refuses the bundle.
/// Fixtures a module passed before (same module, fixtures, engine and gateway version)
/// are not run again, so a reload costs no fixture run.
pub fn load(engine: &Arc<PolicyEngine>, bundle: &VerifiedBundle) -> Result<PolicySet, BundleError> {
    load_with(engine, bundle, true, |_| {})
}

/// [`load`], running every fixture case and handing its result to `report`.
pub fn load_reporting(
    engine: &Arc<PolicyEngine>,
    bundle: &VerifiedBundle,
    report: impl FnMut(&fixture::CaseResult),
) -> Result<PolicySet, BundleError> {
    load_with(engine, bundle, false, report)
}

fn load_with(
    engine: &Arc<PolicyEngine>,
    bundle: &VerifiedBundle,
    cached: bool,
    mut report: impl FnMut(&fixture::CaseResult),
) -> Result<PolicySet, BundleError> {
    let mut modules = Vec::with_capacity(bundle.modules.len());
    for module in &bundle.modules {
        let entry = &module.entry;
        let loaded = engine.load_module(&entry.name, &module.bytes, entry.applies_to.clone())?;
        let key = fixtures_key(module);
        if cached && engine.fixtures_passed(&key) {
            modules.push(loaded);
            continue;
        }
        let subject = fixture::Subject::Module(&loaded);
        let mut total = 0;
        let mut failed = 0;
        for (file, bytes) in &module.fixtures {
            let results =
                fixture::run(&subject, file, bytes).map_err(|reason| LoadError::BadFixture {
                    module: entry.name.clone(),
                    file: file.clone(),
                    reason,
                })?;
            for result in results {
                report(&result);
                total += 1;
                if let Some(failure) = result.failure {
                    failed += 1;
                    tracing::error!(
                        module = %entry.name,
                        fixture = %result.file,
                        case = %result.name,
                        "fixture failed: {failure}"
                    );
                }
            }
        }
        if failed > 0 {
            return Err(LoadError::FixturesFailed {
                module: entry.name.clone(),
                failed,
                total,
            }
            .into());
        }
        engine.remember_fixtures_passed(&key);
        modules.push(loaded);
    }
    let set = PolicySet::new(
        BundleId {
            name: bundle.manifest.name.clone(),
            version: bundle.manifest.version,
        },
        modules,
    );
    // Verified bundles always have a parsed expiry; time is enforced while running,
    // not only at install and load.
    Ok(match bundle.manifest.expires_at() {
        Ok(expires) => set.expiring_at(
            expires
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        ),
        Err(_) => set.expiring_at(0),
    })
}

/// A digest of a module's bytes and its fixtures' names and bytes.
fn fixtures_key(module: &super::verify::VerifiedModule) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(module.entry.sha256.as_bytes());
    for (file, bytes) in &module.fixtures {
        hasher.update(file.as_bytes());
        hasher.update([0]);
        hasher.update(Sha256::digest(bytes));
    }
    hex::encode(hasher.finalize())
}
