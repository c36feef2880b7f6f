//! Hot reload: the installed bundle, once it verifies and loads, becomes the active one.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use super::{BundleError, PolicyDir};
use crate::keys::TrustedKeys;
use crate::policy::{ActivePolicy, BundleId, PolicyEngine};

/// Watches the policy directory and swaps in each newly installed bundle that
/// verifies, compiles and passes its fixtures. A bundle that fails keeps the old one
/// active.
pub struct Reloader {
    dir: PolicyDir,
    engine: Arc<PolicyEngine>,
    trust: TrustedKeys,
    active: Arc<ActivePolicy>,
    seen: Option<PathBuf>,
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

/// How long before its expiry the active bundle is warned about.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 86_400);

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
        }
    }

    /// Activates the installed bundle if it changed since the last poll. Returns the
    /// bundle activated, or why the installed one was refused (the old one stays).
    pub fn poll(&mut self) -> Result<Option<BundleId>, BundleError> {
        let current = self.dir.current()?;
        if current == self.seen {
            return Ok(None);
        }
        // Remember it even if it fails, so a broken bundle is reported once, not on
        // every poll.
        self.seen = current;
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
        if let Some(active) = self.active.version()
            && id.version <= active
        {
            return Err(BundleError::Rollback {
                name: id.name,
                version: id.version,
                installed: active,
            });
        }
        self.active.replace(set);
        Ok(Some(id))
    }

    /// Warns, once per bundle version, when the active bundle expires within
    /// [`EXPIRY_WARNING`]: at expiry every decision becomes a denial.
    fn warn_of_expiry(&self, warned: &mut Option<u64>) {
        let set = self.active.current();
        let (Some(bundle), Some(expires)) = (set.bundle(), set.expires_unix_ms()) else {
            return;
        };
        let expires = SystemTime::UNIX_EPOCH + Duration::from_millis(expires);
        let soon = expires
            .duration_since(SystemTime::now())
            .map_or(true, |left| left < EXPIRY_WARNING);
        if soon && *warned != Some(bundle.version) {
            *warned = Some(bundle.version);
            tracing::warn!(
                bundle = %bundle,
                expires = %humantime::format_rfc3339_seconds(expires),
                "the active policy bundle expires soon: at expiry every decision is denied; install a newer signed bundle"
            );
        }
    }

    /// Polls every `interval` on a thread of its own until the handle is dropped.
    pub fn spawn(mut self, interval: Duration) -> ReloaderHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("airlock-policy-reload".into())
            .spawn(move || {
                let mut warned: Option<u64> = None;
                while !flag.load(Ordering::Relaxed) {
                    self.warn_of_expiry(&mut warned);
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
