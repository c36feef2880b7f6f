//! Hot reload: the installed bundle, once it verifies and loads, becomes the active one;
//! and the bundle's lifecycle (activated, refused, recovered, expired) goes into the
//! record, not only the log.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::{BundleError, PolicyDir, Recovery};
use crate::keys::TrustedKeys;
use crate::policy::{ActivePolicy, BundleId, EXPIRY_WARNING, PolicyEngine, PolicySet};
use crate::record::{AuditEvent, EventKind, Record, Write};

/// Watches the policy directory and swaps in each newly installed bundle that
/// verifies, compiles and passes its fixtures. A bundle that fails keeps the old one
/// active.
pub struct Reloader {
    dir: PolicyDir,
    engine: Arc<PolicyEngine>,
    trust: TrustedKeys,
    active: Arc<ActivePolicy>,
    seen: Option<PathBuf>,
    record: Option<Record>,
    /// The bundle version whose coming expiry was warned about.
    warned: Option<u64>,
    /// The bundle version whose expiry was recorded.
    expired: Option<u64>,
}

/// Stops the reload thread when dropped.
pub struct ReloaderHandle {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for ReloaderHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Reloader {
    /// `seen` is the bundle directory `active` was loaded from, if any.
    pub fn new(
        dir: PolicyDir,
        engine: Arc<PolicyEngine>,
        trust: TrustedKeys,
        active: Arc<ActivePolicy>,
        seen: Option<PathBuf>,
    ) -> Self {
        Reloader {
            dir,
            engine,
            trust,
            active,
            seen,
            record: None,
            warned: None,
            expired: None,
        }
    }

    /// Records every activation, refusal, recovery and expiry in `record`.
    pub fn recording(mut self, record: Record) -> Self {
        self.record = Some(record);
        self
    }

    /// Activates the installed bundle if it changed since the last poll. Returns the
    /// bundle activated, or why the installed one was refused (the old one stays).
    pub fn poll(&mut self) -> Result<Option<BundleId>, BundleError> {
        // Checked on every poll, not only at install and start: a directory made
        // writable by others while running stops every decision until it is fixed.
        if let Err(e) = self.dir.check_in_use() {
            if self.seen.is_some() || self.active.current().bundle().is_some() {
                let reason = format!(
                    "the policy directory is unsafe ({e}); every decision is denied until it is fixed (fail closed)"
                );
                tracing::error!("{reason}");
                self.write(
                    AuditEvent::new(EventKind::PolicyUnsafe)
                        .detail(json!({ "error": e.to_string() })),
                );
                self.active.replace(PolicySet::refusing(reason));
                // Load the bundle again, checked, once the directory is safe.
                self.seen = None;
            }
            return Ok(None);
        }
        let current = self.dir.current()?;
        if current == self.seen {
            return Ok(None);
        }
        // Remember it even if it fails, so a broken bundle is reported once, not on
        // every poll.
        self.seen.clone_from(&current);
        let result = self.activate_current();
        if let Err(e) = &result {
            self.write(refused_event(current.as_deref(), e));
        }
        result
    }

    fn activate_current(&mut self) -> Result<Option<BundleId>, BundleError> {
        let Some(set) = self
            .dir
            .load_current(&self.engine, &self.trust, SystemTime::now())?
        else {
            return Ok(None);
        };
        let id = set
            .bundle()
            .map(|b| (**b).clone())
            .expect("a loaded bundle has an id");
        // Only `airlock bundle recover` may put an older version in force, and it
        // leaves a note naming the bundle it installed.
        let recovery = self.dir.recovery()?;
        if let Some(active) = self.active.version()
            && id.version <= active
            && recovery.is_none()
        {
            return Err(BundleError::Rollback {
                name: id.name,
                version: id.version,
                installed: active,
                stuck: false,
            });
        }
        let previous = self.active.current().bundle().map(|b| b.to_string());
        self.write(activated_event(&set, previous, recovery.as_ref()));
        self.active.replace(set);
        Ok(Some(id))
    }

    /// Warns (log) when the active bundle expires within [`EXPIRY_WARNING`], and
    /// records its expiry once it has passed: from then on every decision is a denial.
    fn watch_expiry(&mut self) {
        let set = self.active.current();
        let (Some(bundle), Some(expires)) = (set.bundle(), set.expires_unix_ms()) else {
            return;
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(expires);
        let expires_at = humantime::format_rfc3339_seconds(at).to_string();
        match at.duration_since(SystemTime::now()) {
            Ok(left) if left >= EXPIRY_WARNING => {}
            Ok(_) => {
                if self.warned != Some(bundle.version) {
                    self.warned = Some(bundle.version);
                    tracing::warn!(
                        bundle = %bundle,
                        expires = %expires_at,
                        "the active policy bundle expires soon: at expiry every decision is denied; install a newer signed bundle"
                    );
                }
            }
            Err(_) => {
                if self.expired != Some(bundle.version) {
                    self.expired = Some(bundle.version);
                    self.write(AuditEvent::new(EventKind::PolicyExpired).detail(json!({
                        "bundle": bundle.to_string(),
                        "expires": expires_at,
                        "effect": "every decision is denied until a newer bundle is installed",
                    })));
                }
            }
        }
    }

    fn write(&self, event: AuditEvent) {
        if let Some(record) = &self.record
            && let Err(e) = record.write(Write::event(event))
        {
            tracing::error!(error = %e, "cannot record a policy bundle event");
        }
    }

    /// Polls every `interval` on a thread of its own until the handle is dropped.
    pub fn spawn(mut self, interval: Duration) -> ReloaderHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("airlock-policy-reload".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    self.watch_expiry();
                    match self.poll() {
                        Ok(Some(id)) => tracing::info!(bundle = %id, "policy bundle activated"),
                        Ok(None) => {}
                        Err(e) => tracing::error!(
                            error = %e,
                            "installed policy bundle refused; the active bundle stays in force"
                        ),
                    }
                    std::thread::sleep(interval);
                }
            })
            .expect("cannot start the policy reload thread");
        ReloaderHandle {
            stop,
            thread: Some(thread),
        }
    }
}

/// `policy.activated`: which bundle decides from now on, its modules' digests, what it
/// replaced, and the operator's recovery note when it was installed over a stuck one.
pub fn activated_event(
    set: &PolicySet,
    previous: Option<String>,
    recovery: Option<&Recovery>,
) -> AuditEvent {
    let modules: Vec<_> = set
        .modules()
        .iter()
        .map(|m| json!({ "name": &**m.name(), "sha256": &**m.digest() }))
        .collect();
    AuditEvent::new(EventKind::PolicyActivated).detail(json!({
        "bundle": set.bundle().map(|b| b.to_string()),
        "modules": modules,
        "previous": previous,
        "recovery": recovery,
    }))
}

/// `policy.refused`: the installed bundle did not load; the active one stays.
pub fn refused_event(installed: Option<&Path>, error: &BundleError) -> AuditEvent {
    AuditEvent::new(EventKind::PolicyRefused).detail(json!({
        "installed": installed.and_then(Path::file_name).map(|n| n.to_string_lossy()),
        "error": error.to_string(),
    }))
}
