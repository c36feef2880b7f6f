//! The policy set decisions are made with right now, and where they are made.
//!
//! Decisions take an `Arc` of the current set and finish on it, so swapping in a new
//! bundle never drops or splits a decision in flight. Every decision that may call a
//! module runs on the [`DecisionPool`], under one deadline for the whole decision; a
//! decision the pool refuses is a denial.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;

use super::engine::PolicyLimits;
use super::pool::{DecisionPool, Refusal};
use super::set::{EXPIRY_WARNING, PolicySet};
use super::types::{Action, GrantContext, GrantRequest};
use super::verdict::Decision;

/// The active policy set, swapped whole on reload, and the pool that runs it.
pub struct ActivePolicy {
    set: ArcSwap<PolicySet>,
    pool: DecisionPool,
}

impl ActivePolicy {
    /// Starts the decision pool sized by `limits`, with `set` in force.
    pub fn new(set: PolicySet, limits: &PolicyLimits) -> Self {
        ActivePolicy {
            set: ArcSwap::from_pointee(set),
            pool: DecisionPool::new(
                limits.workers,
                limits.agent_decisions,
                limits.decision_deadline,
            ),
        }
    }

    /// The current set; hold it for the length of one decision or one result stream.
    pub fn current(&self) -> Arc<PolicySet> {
        self.set.load_full()
    }

    /// The active bundle's version, if a bundle is active.
    pub(crate) fn version(&self) -> Option<u64> {
        self.set.load().bundle().map(|b| b.version)
    }

    pub(crate) fn replace(&self, set: PolicySet) {
        self.set.store(Arc::new(set));
    }

    /// What the operator's health view shows of the policy host: the active bundle,
    /// how long until it expires (negative once it has), and the pool's refusals.
    pub fn health(&self) -> serde_json::Value {
        let now_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let set = self.current();
        let expires_in = set
            .expires_unix_ms()
            .map(|at| (at as i64 - now_unix_ms as i64) / 1000);
        serde_json::json!({
            "bundle": set.bundle().map(|b| b.to_string()),
            "expires_in_seconds": expires_in,
            "expiring_soon": expires_in.is_some_and(|s| s < EXPIRY_WARNING.as_secs() as i64),
            "expired": expires_in.is_some_and(|s| s <= 0),
            "decisions": self.pool.stats(),
        })
    }

    /// Decides a grant request with the current set.
    pub async fn authorize(&self, request: GrantRequest) -> Decision {
        let set = self.current();
        let agent = request.agent.id.clone();
        let deciding = set.clone();
        self.pool
            .run(&agent, move |deadline| {
                deciding.authorize(&request, deadline)
            })
            .await
            .unwrap_or_else(|refusal| set.refused(refusal))
    }

    /// Decides one action under a live grant with `set`.
    pub async fn check(
        &self,
        set: &Arc<PolicySet>,
        context: GrantContext,
        action: Action,
    ) -> Decision {
        let deciding = set.clone();
        let agent = context.agent.id.clone();
        self.pool
            .run(&agent, move |deadline| {
                deciding.check(&context, &action, deadline)
            })
            .await
            .unwrap_or_else(|refusal| set.refused(refusal))
    }

    /// Runs other policy work (masking) on the pool for `agent`, under a decision
    /// deadline of its own: `work` gets the deadline to hand every module call.
    pub async fn run<R: Send + 'static>(
        &self,
        agent: &str,
        work: impl FnOnce(Instant) -> R + Send + 'static,
    ) -> Result<R, Refusal> {
        self.pool.run(agent, work).await
    }
}
