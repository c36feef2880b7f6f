//! Host-side bindings generated from `wit/policy.wit`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "policy",
    additional_derives: [PartialEq, Eq, Hash],
});

pub(crate) use self::airlock::policy::host;
/// The contract's data types: grant requests and contexts, actions, verdicts, payloads.
pub use self::airlock::policy::types;
