//! task-guard: decides grant requests.
//!
//! - A grant needs a real task description: what the agent is about to do, in words an
//!   operator reading the record can check (at least 3 words and 12 characters).
//! - Every grant is capped at 15 minutes.
//! - Write or admin access to a target labelled `env=prod` needs an operator's review.
//! - Read grants are allowed read-only.

use airlock_policy_sdk::*;

const MAX_TTL_SECONDS: u32 = 15 * 60;

struct TaskGuard;

impl Policy for TaskGuard {
    fn authorize(request: GrantRequest) -> Verdict {
        let task = request.task.trim();
        if task.len() < 12 || task.split_whitespace().count() < 3 {
            return deny_with_hint(
                "a grant needs a task description that says what the access is for",
                "describe the task, e.g. --task \"confirm migration 42 ran on prod-db\"",
            );
        }
        if request.access != Access::Read && request.target.has_label("env", "prod") {
            let level = if request.access == Access::Admin {
                "admin"
            } else {
                "write"
            };
            return review(format!(
                "{level} access to production target {} needs an operator's approval",
                request.target.name
            ));
        }
        allow_with(Some(MAX_TTL_SECONDS), request.access == Access::Read)
    }
}

export_policy!(TaskGuard);
