//! Building verdicts.

use crate::{Constraints, Denial, Verdict};

/// Allow, with no constraints of this module's own.
pub fn allow() -> Verdict {
    allow_with(None, false)
}

/// Allow, capping the grant's lifetime and/or making it read-only.
pub fn allow_with(max_ttl_seconds: Option<u32>, read_only: bool) -> Verdict {
    Verdict::Allow(Constraints {
        max_ttl_seconds,
        read_only,
    })
}

/// Deny, with a reason the agent sees.
pub fn deny(reason: impl Into<String>) -> Verdict {
    Verdict::Deny(Denial {
        reason: reason.into(),
        hint: None,
    })
}

/// Deny, with a reason and a hint the agent can act on.
pub fn deny_with_hint(reason: impl Into<String>, hint: impl Into<String>) -> Verdict {
    Verdict::Deny(Denial {
        reason: reason.into(),
        hint: Some(hint.into()),
    })
}

/// Ask for an operator's approval.
pub fn review(reason: impl Into<String>) -> Verdict {
    Verdict::Review(reason.into())
}

/// No opinion: leave the decision to other modules.
pub fn abstain() -> Verdict {
    Verdict::Abstain
}
