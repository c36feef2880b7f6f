//! The policy host: sandboxed WebAssembly policy modules decide every grant and every
//! action, and mask every result.
//!
//! The shape follows Kubewarden's evaluator: a [`PolicyEngine`] (one wasmtime engine, its
//! limits and its artifact cache) compiles each module once into a pre-instantiated
//! [`LoadedModule`]; every decision gets a fresh instance, so no state crosses decisions
//! or agents; a [`PolicySet`] is the group evaluator that combines the verdicts of every
//! module in a bundle that applies to the target.
//!
//! Anything a module does wrong (trap, timeout, memory or stack exhaustion, malformed
//! output) becomes a deny that names the module and the cause. The host keeps serving.

mod active;
mod bindings;
mod build;
mod engine;
pub mod fixture;
mod module;
mod pool;
mod scope;
mod set;
mod verdict;

pub use active::ActivePolicy;
pub use bindings::types;
pub use build::{BuildError, build_policy_crate, componentize};
pub use engine::{LoadError, PolicyEngine, PolicyLimits};
pub use module::{Fault, LoadedModule};
pub use pool::{DecisionPool, Refusal};
pub use scope::{Hook, Kind, Scope};
pub use set::{BundleId, EXPIRY_WARNING, MaskError, MaskPlan, PolicySet};
pub use verdict::{Decision, ModuleVote, Outcome, sql_kind_name};

/// Labels as the contract carries them, from a `key → value` map (sorted by key).
pub fn labels(map: &std::collections::BTreeMap<String, String>) -> Vec<types::Label> {
    map.iter()
        .map(|(key, value)| types::Label {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}
