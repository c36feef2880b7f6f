//! A policy module whose start function never returns. Every hook would allow, but no
//! call could get past instantiation: the gateway must refuse it at install, not deny
//! every decision at the deadline once it is active.

use std::hint::black_box;

use airlock_policy_sdk::*;

struct StuckStart;

impl Policy for StuckStart {
    fn authorize(_request: GrantRequest) -> Verdict {
        allow()
    }

    fn check(_context: GrantContext, _action: Action) -> Verdict {
        allow()
    }
}

export_policy!(StuckStart);

/// The reactor start function: `wit-component` runs it when the component is
/// instantiated, before any export.
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    let mut n = 0u64;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}
