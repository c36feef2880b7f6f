//! http-allowlist: HTTP requests must match a `METHOD PATH-GLOB` rule.
//!
//! Rules come from the target's `http-allow` label (rules separated by `;`, e.g.
//! `GET /api/**; POST /api/v1/search`); without one, reads of anything (`GET /**`,
//! `HEAD /**`). A method that can change state also needs a write or admin grant.
//! Paths with traversal (`..`, encoded dots or slashes) are refused before any rule.

use airlock_policy_sdk::*;

const DEFAULT_RULES: &str = "GET /**; HEAD /**";

struct HttpAllowlist;

impl Policy for HttpAllowlist {
    fn check(context: GrantContext, action: Action) -> Verdict {
        let Action::Http(request) = action else {
            return abstain();
        };
        let lower = request.path.to_ascii_lowercase();
        if lower.contains("..")
            || lower.contains("%2e")
            || lower.contains("%2f")
            || lower.contains("%5c")
        {
            return deny(format!("path `{}` looks like a traversal", request.path));
        }
        let rules = context.target.label("http-allow").unwrap_or(DEFAULT_RULES);
        let allowed = rules.split(';').any(|rule| {
            let mut parts = rule.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(method), Some(path), None) => request.matches(method, path),
                _ => false,
            }
        });
        if !allowed {
            return deny_with_hint(
                format!(
                    "{} {} is not allowed on this target",
                    request.method, request.path
                ),
                format!("allowed: {rules}"),
            );
        }
        if !request.is_safe_method() && context.access == Access::Read {
            return deny_with_hint(
                format!(
                    "{} can change state; this grant is read-only",
                    request.method
                ),
                "ask for a grant with access=write",
            );
        }
        allow_with(None, context.access == Access::Read)
    }
}

export_policy!(HttpAllowlist);
