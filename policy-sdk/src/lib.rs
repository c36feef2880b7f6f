//! Write Airlock policy modules in Rust.
//!
//! A policy is an ordinary Rust crate (`crate-type = ["cdylib"]`) that implements
//! [`Policy`] and exports it with [`export_policy!`]. `airlock policy build CRATE-DIR
//! --out FILE.wasm` compiles it for `wasm32-unknown-unknown` and turns it into a
//! component. The module gets no WASI: no files, network, clock or randomness. Time
//! arrives as `now_unix_ms`, so the same input always gives the same verdict.
//!
//! ```ignore
//! use airlock_policy_sdk::*;
//!
//! struct NoDeletes;
//!
//! impl Policy for NoDeletes {
//!     fn check(_context: GrantContext, action: Action) -> Verdict {
//!         match action {
//!             Action::Sql(sql) if sql.kind == SqlKind::Delete => deny("no DELETE here"),
//!             _ => abstain(),
//!         }
//!     }
//! }
//!
//! export_policy!(NoDeletes);
//! ```
//!
//! Every hook has a default: `authorize` and `check` abstain (the gateway denies what
//! no module allows), `mask_columns` names every column (a masking module sees every
//! value unless it says otherwise) and `mask` returns the payload unchanged.

extern crate self as airlock_policy_sdk;

pub mod glob;
pub mod labels;
pub mod mask;
pub mod matchers;
pub mod ssh;
pub mod verdict;

pub use glob::glob;
pub use labels::Labels;
pub use verdict::{abstain, allow, allow_with, deny, deny_with_hint, review};

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// Guest bindings generated from `wit/policy.wit`; policy authors use the re-exports.
#[doc(hidden)]
#[allow(
    clippy::too_many_arguments,
    reason = "generated lowering code for wide records"
)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "policy",
        pub_export_macro: true,
        export_macro_name: "__export_policy_world",
        default_bindings_module: "airlock_policy_sdk::bindings",
        runtime_path: "airlock_policy_sdk::__wit_bindgen::rt",
        additional_derives: [PartialEq, Eq],
    });
}

pub use bindings::airlock::policy::types::{
    Access, Action, Agent, Body, Column, Constraints, Denial, GrantContext, GrantRequest,
    HttpRequest, KubeRequest, Label, Payload, RequestBody, Rows, SftpOp, SftpRequest, ShellFeature,
    ShellOperator, SqlFunction, SqlKind, SqlStatement, SshCommand, Target, TargetKind, Verdict,
    Volatility,
};

/// Writes a diagnostic line to the gateway's log, attributed to this module.
pub fn log(message: &str) {
    bindings::airlock::policy::host::log(message);
}

/// A policy module. Implement the hooks the module cares about; the rest keep their
/// safe defaults.
pub trait Policy {
    /// Decide a grant request.
    fn authorize(request: GrantRequest) -> Verdict {
        let _ = request;
        Verdict::Abstain
    }

    /// Decide one action under a live grant.
    fn check(context: GrantContext, action: Action) -> Verdict {
        let _ = (context, action);
        Verdict::Abstain
    }

    /// Which result columns (by index) this module masks. The gateway calls `mask`
    /// with rows only if some module named a column, so a module that only masks text
    /// should name only text columns.
    fn mask_columns(context: GrantContext, columns: Vec<Column>) -> Vec<u32> {
        let _ = context;
        (0..columns.len() as u32).collect()
    }

    /// Return the payload with values masked, keeping its rows and columns.
    fn mask(context: GrantContext, payload: Payload) -> Payload {
        let _ = context;
        payload
    }
}

/// Exports a [`Policy`] implementation as the module's hooks.
#[macro_export]
macro_rules! export_policy {
    ($ty:ident) => {
        impl $crate::bindings::Guest for $ty {
            fn authorize(request: $crate::GrantRequest) -> $crate::Verdict {
                <$ty as $crate::Policy>::authorize(request)
            }
            fn check(context: $crate::GrantContext, action: $crate::Action) -> $crate::Verdict {
                <$ty as $crate::Policy>::check(context, action)
            }
            fn mask_columns(
                context: $crate::GrantContext,
                columns: ::std::vec::Vec<$crate::Column>,
            ) -> ::std::vec::Vec<u32> {
                <$ty as $crate::Policy>::mask_columns(context, columns)
            }
            fn mask(context: $crate::GrantContext, payload: $crate::Payload) -> $crate::Payload {
                <$ty as $crate::Policy>::mask(context, payload)
            }
        }
        $crate::bindings::__export_policy_world!($ty with_types_in $crate::bindings);
    };
}
