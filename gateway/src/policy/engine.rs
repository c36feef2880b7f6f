//! One wasmtime engine for every policy module: its configuration and limits, the
//! epoch ticker that enforces deadlines, and the cache of precompiled artifacts.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

use super::bindings::{Policy, PolicyPre};
use super::module::{Fault, GuestState, LoadedModule};
use super::scope::Scope;
use crate::fsperm;

/// The interfaces a policy module may import. Everything else (WASI above all) is
/// refused at load time: a module gets no files, network, clock or randomness.
const ALLOWED_IMPORTS: [&str; 2] = ["airlock:policy/types@0.4.0", "airlock:policy/host@0.4.0"];

/// How often the epoch advances; deadlines are counted in these ticks.
const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Limits on every call into a policy module.
#[derive(Debug, Clone)]
pub struct PolicyLimits {
    /// Wall-clock deadline for one call, instantiation included.
    pub deadline: Duration,
    /// Linear-memory cap per instance.
    pub memory_bytes: usize,
    /// Wasm stack cap.
    pub stack_bytes: usize,
    /// Instances that may be live at once (the pooling allocator's size).
    pub max_instances: u32,
    /// Wall-clock deadline for one whole decision (every module it asks, and the time
    /// it waited for a worker), from when it was asked for.
    pub decision_deadline: Duration,
    /// Threads that run decisions: the async runtime never runs a Wasm call.
    pub workers: usize,
    /// Decisions one agent may have queued or running at once.
    pub agent_decisions: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            deadline: Duration::from_millis(20),
            memory_bytes: 64 << 20,
            stack_bytes: 512 << 10,
            max_instances: 256,
            decision_deadline: Duration::from_millis(100),
            workers: std::thread::available_parallelism().map_or(2, usize::from),
            agent_decisions: 16,
        }
    }
}

/// Why a module could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("policy engine configuration: {0}")]
    Engine(String),
    #[error("module `{module}` is not a valid Wasm component: {reason}")]
    InvalidComponent { module: String, reason: String },
    #[error(
        "module `{module}` imports `{import}`; policy modules may import only {}",
        ALLOWED_IMPORTS.join(" and ")
    )]
    ForbiddenImport { module: String, import: String },
    #[error("module `{module}` does not implement the airlock:policy world: {reason}")]
    WrongWorld { module: String, reason: String },
    #[error("module `{module}` cannot start: instantiating it {fault}")]
    Unstartable { module: String, fault: Fault },
    #[error("module `{module}` failed its fixtures: {failed} of {total} cases failed")]
    FixturesFailed {
        module: String,
        failed: usize,
        total: usize,
    },
    #[error("module `{module}` fixture {file}: {reason}")]
    BadFixture {
        module: String,
        file: String,
        reason: String,
    },
    #[error(transparent)]
    Permissions(#[from] fsperm::PermError),
}

/// The wasmtime engine, linker and limits shared by every loaded module.
pub struct PolicyEngine {
    engine: Engine,
    linker: Linker<GuestState>,
    limits: PolicyLimits,
    deadline_ticks: u64,
    cache_dir: Option<PathBuf>,
    engine_key: String,
    _ticker: EpochTicker,
}

impl PolicyEngine {
    /// Builds the engine. With `cache_dir`, compiled artifacts are kept there (keyed by
    /// module digest and engine configuration) so a module compiles once per gateway.
    pub fn new(limits: PolicyLimits, cache_dir: Option<&Path>) -> Result<Arc<Self>, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(e.to_string());
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(limits.max_instances)
            // wit-component adds small shim modules around the main one.
            .total_core_instances(limits.max_instances * 4)
            .total_memories(limits.max_instances)
            .total_tables(limits.max_instances * 4)
            .max_memory_size(limits.memory_bytes)
            // Keep the first 2 MiB of a slot resident (reset by memset, not madvise):
            // a Rust module's 1 MiB shadow stack and its data sit there, so a fresh
            // instance does not fault those pages in again on every decision.
            .linear_memory_keep_resident(2 << 20)
            .table_keep_resident(16 << 10);
        let mut config = Config::new();
        config
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .epoch_interruption(true)
            .max_wasm_stack(limits.stack_bytes);
        let engine = Engine::new(&config).map_err(engine_err)?;

        let mut linker = Linker::new(&engine);
        Policy::add_to_linker::<GuestState, HasSelf<GuestState>>(&mut linker, |state| state)
            .map_err(engine_err)?;

        if let Some(dir) = cache_dir {
            fsperm::create_private_dir(dir)?;
        }
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        let deadline_ticks = limits.deadline.as_millis().max(1) as u64;
        let ticker = EpochTicker::start(engine.clone());
        Ok(Arc::new(PolicyEngine {
            engine,
            linker,
            limits,
            deadline_ticks,
            cache_dir: cache_dir.map(Path::to_path_buf),
            engine_key,
            _ticker: ticker,
        }))
    }

    pub fn limits(&self) -> &PolicyLimits {
        &self.limits
    }

    /// Compiles (or loads from the cache) one module, checks it imports nothing but the
    /// host interface and implements the policy world, and pre-instantiates it.
    pub fn load_module(
        self: &Arc<Self>,
        name: &str,
        bytes: &[u8],
        scope: Scope,
    ) -> Result<LoadedModule, LoadError> {
        let digest = hex::encode(Sha256::digest(bytes));
        let component = self.component(name, bytes, &digest)?;
        for (import, _) in component.component_type().imports(&self.engine) {
            if !ALLOWED_IMPORTS.contains(&import) {
                return Err(LoadError::ForbiddenImport {
                    module: name.to_string(),
                    import: import.to_string(),
                });
            }
        }
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            module: name.to_string(),
            reason: format!("{e:#}"),
        };
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = PolicyPre::new(pre).map_err(wrong_world)?;
        let module = LoadedModule::new(self.clone(), name.into(), digest.into(), scope, pre);
        module.probe().map_err(|fault| LoadError::Unstartable {
            module: name.to_string(),
            fault,
        })?;
        Ok(module)
    }

    /// True if a module with these fixtures (`key`: a digest of the module's and the
    /// fixtures' bytes) passed them before on this engine and gateway version, as
    /// recorded in the cache directory. Without a cache, never.
    pub(crate) fn fixtures_passed(&self, key: &str) -> bool {
        self.fixture_marker(key).is_some_and(|path| path.is_file())
    }

    /// Records that the fixtures behind `key` passed. Best effort: without the marker
    /// they only run again.
    pub(crate) fn remember_fixtures_passed(&self, key: &str) {
        if let Some(path) = self.fixture_marker(key)
            && let Err(e) = fsperm::write_private_atomic(&path, b"passed\n")
        {
            tracing::warn!(error = %e, "cannot cache a fixture result");
        }
    }

    fn fixture_marker(&self, key: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        Some(dir.join(format!(
            "fixtures-{key}-{}-{}.ok",
            self.engine_key,
            env!("CARGO_PKG_VERSION")
        )))
    }

    fn component(&self, name: &str, bytes: &[u8], digest: &str) -> Result<Component, LoadError> {
        let invalid = |e: wasmtime::Error| LoadError::InvalidComponent {
            module: name.to_string(),
            reason: format!("{e:#}"),
        };
        let Some(dir) = &self.cache_dir else {
            return Component::new(&self.engine, bytes).map_err(invalid);
        };
        let path = dir.join(format!("{digest}-{}.cwasm", self.engine_key));
        if path.exists() {
            fsperm::check_private(&path)?;
            // SAFETY: the artifact was written by this gateway into its own directory,
            // whose owner and mode were checked above (no one else can plant native code
            // there), and wasmtime checks its header against this engine's configuration.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => tracing::warn!(
                    module = name,
                    artifact = %path.display(),
                    error = %e,
                    "cached policy artifact does not load; recompiling"
                ),
            }
        }
        let component = Component::new(&self.engine, bytes).map_err(invalid)?;
        match component.serialize() {
            Ok(artifact) => {
                if let Err(e) = fsperm::write_private_atomic(&path, &artifact) {
                    tracing::warn!(module = name, error = %e, "could not cache policy artifact");
                }
            }
            Err(e) => {
                tracing::warn!(module = name, error = %e, "could not serialize policy artifact")
            }
        }
        Ok(component)
    }

    /// A store for one call: fresh state, memory cap, and the deadline armed: the
    /// call's own, or what is left of the decision's if that is sooner.
    pub(crate) fn new_store(
        &self,
        module: &Arc<str>,
        decision_deadline: Instant,
    ) -> Result<Store<GuestState>, Fault> {
        let left = decision_deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fault::DecisionDeadline(self.limits.decision_deadline));
        }
        let left_ticks = left.as_micros().div_ceil(1000) as u64;
        let cut_by_decision = left_ticks < self.deadline_ticks;
        let mut store = Store::new(
            &self.engine,
            GuestState::new(module.clone(), self.limits.memory_bytes, cut_by_decision),
        );
        store.limiter(|state| &mut state.memory);
        store.set_epoch_deadline(left_ticks.min(self.deadline_ticks));
        store.epoch_deadline_trap();
        Ok(store)
    }
}

/// Advances the engine's epoch every [`EPOCH_TICK`], so a call that runs past its
/// deadline traps wherever it is. Stops when the engine is dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("airlock-policy-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("cannot start the policy epoch thread");
        EpochTicker {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
