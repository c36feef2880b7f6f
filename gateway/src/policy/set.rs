//! The group evaluator: every module of one bundle that applies, combined.

use std::sync::Arc;
use std::time::Instant;

use super::module::{Fault, LoadedModule};
use super::pool::Refusal;
use super::scope::Hook;
use super::types::{
    Action, Body, Column, GrantContext, GrantRequest, Payload, Rows, Target, Verdict,
};
use super::verdict::{Decision, ModuleVote, Outcome, combine};

/// How long before its expiry the active bundle is warned about.
pub const EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(7 * 86_400);

/// Which bundle a decision came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleId {
    pub name: String,
    pub version: u64,
}

impl std::fmt::Display for BundleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{}", self.name, self.version)
    }
}

/// The modules of one bundle, in bundle order. A set is immutable: a new bundle is a
/// new set, swapped in whole, so one decision never mixes two bundles.
pub struct PolicySet {
    bundle: Option<Arc<BundleId>>,
    modules: Vec<LoadedModule>,
    /// When the bundle's signature stops vouching for it: from then on every decision
    /// is a denial, whatever the modules would say.
    expires_unix_ms: Option<u64>,
    /// The expiry has been logged (once per set).
    expiry_logged: std::sync::atomic::AtomicBool,
    /// Why a set with no bundle denies (default: none is installed).
    refusal: Option<String>,
}

/// Masking failed: the result must not be released.
#[derive(Debug, Clone, thiserror::Error)]
pub enum MaskError {
    #[error("masking module `{module}` {fault}; result withheld (fail closed)")]
    Module { module: Arc<str>, fault: Fault },
    #[error("{0}; result withheld")]
    Refused(#[from] Refusal),
}

impl PolicySet {
    /// The set in force before any bundle is installed: it denies everything.
    pub fn empty() -> Self {
        PolicySet {
            bundle: None,
            modules: Vec::new(),
            expires_unix_ms: None,
            expiry_logged: Default::default(),
            refusal: None,
        }
    }

    /// A set that denies everything for `reason` (e.g. the policy directory became
    /// writable by others: nothing loaded from it is trusted until that is fixed).
    pub fn refusing(reason: String) -> Self {
        PolicySet {
            refusal: Some(reason),
            ..PolicySet::empty()
        }
    }

    pub fn new(bundle: BundleId, modules: Vec<LoadedModule>) -> Self {
        PolicySet {
            bundle: Some(Arc::new(bundle)),
            modules,
            expires_unix_ms: None,
            expiry_logged: Default::default(),
            refusal: None,
        }
    }

    /// The set stops deciding at `expires_unix_ms` (the bundle's signed expiry).
    pub fn expiring_at(mut self, expires_unix_ms: u64) -> Self {
        self.expires_unix_ms = Some(expires_unix_ms);
        self
    }

    /// When the set stops deciding, if it ever does.
    pub fn expires_unix_ms(&self) -> Option<u64> {
        self.expires_unix_ms
    }

    pub fn bundle(&self) -> Option<&Arc<BundleId>> {
        self.bundle.as_ref()
    }

    pub fn modules(&self) -> &[LoadedModule] {
        &self.modules
    }

    /// The denial for a decision the pool would not make.
    pub(crate) fn refused(&self, refusal: Refusal) -> Decision {
        Decision {
            outcome: Outcome::fail_closed(refusal.to_string()),
            bundle: self.bundle.clone(),
            votes: Vec::new(),
        }
    }

    /// Decides a grant request with every module whose scope covers `authorize` on the
    /// requested target.
    pub fn authorize(&self, request: &GrantRequest, deadline: Instant) -> Decision {
        self.decide(
            Hook::Authorize,
            &request.target,
            "this grant request",
            request.now_unix_ms,
            |m| m.authorize(request, deadline),
        )
    }

    /// Decides one action under a live grant.
    pub fn check(&self, context: &GrantContext, action: &Action, deadline: Instant) -> Decision {
        self.decide(
            Hook::Check,
            &context.target,
            "this action",
            context.now_unix_ms,
            |m| m.check(context, action, deadline),
        )
    }

    fn decide(
        &self,
        hook: Hook,
        target: &Target,
        what: &str,
        now_unix_ms: u64,
        call: impl Fn(&LoadedModule) -> Result<Verdict, Fault>,
    ) -> Decision {
        if let (Some(bundle), Some(expires)) = (&self.bundle, self.expires_unix_ms)
            && now_unix_ms >= expires
        {
            let at = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(expires),
            );
            if !self
                .expiry_logged
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::error!(bundle = %bundle, expires = %at, "the active policy bundle has expired: every decision is denied until a newer one is installed");
            }
            return Decision {
                outcome: Outcome::Deny {
                    module: None,
                    reason: format!(
                        "policy bundle {bundle} expired at {at}; every decision is denied (fail closed)"
                    ),
                    hint: Some(
                        "an operator must install a newer signed bundle (airlock bundle install)"
                            .into(),
                    ),
                },
                bundle: self.bundle.clone(),
                votes: Vec::new(),
            };
        }
        let mut votes = Vec::new();
        for module in self.modules.iter().filter(|m| m.applies(hook, target)) {
            let verdict = call(module);
            // The first deny decides; later modules cannot change it.
            let decisive = matches!(verdict, Err(_) | Ok(Verdict::Deny(_)));
            votes.push(ModuleVote {
                module: module.name().clone(),
                digest: module.digest().clone(),
                verdict,
            });
            if decisive {
                break;
            }
        }
        let outcome = match (&self.bundle, votes.is_empty()) {
            (None, _) => Outcome::fail_closed(
                self.refusal
                    .clone()
                    .unwrap_or_else(|| "no policy bundle is active; denied (fail closed)".into()),
            ),
            (Some(bundle), true) => Outcome::fail_closed(format!(
                "no module in policy bundle {bundle} decides `{hook}` for target `{}`; denied (fail closed)",
                target.name
            )),
            (Some(_), false) => combine(&votes, what),
        };
        Decision {
            outcome,
            bundle: self.bundle.clone(),
            votes,
        }
    }

    /// Asks every masking module that applies which of `columns` it masks. Call once
    /// per row description; an empty plan means rows pass through untouched.
    pub fn mask_plan(
        self: &Arc<Self>,
        context: &GrantContext,
        columns: &[Column],
        deadline: Instant,
    ) -> Result<MaskPlan, MaskError> {
        let mut modules = Vec::new();
        let mut masked = Vec::new();
        for (index, module) in self.maskers(&context.target) {
            let wanted = module
                .mask_columns(context, columns, deadline)
                .map_err(|fault| MaskError::Module {
                    module: module.name().clone(),
                    fault,
                })?;
            if !wanted.is_empty() {
                masked.extend(wanted.iter().copied());
                modules.push((index, wanted));
            }
        }
        masked.sort_unstable();
        masked.dedup();
        Ok(MaskPlan {
            set: self.clone(),
            modules,
            columns: masked,
        })
    }

    /// Masks a text or JSON body with every masking module that applies, in bundle order.
    pub fn mask_body(
        &self,
        context: &GrantContext,
        body: Body,
        deadline: Instant,
    ) -> Result<Body, MaskError> {
        let mut payload = Payload::Body(body);
        for (_, module) in self.maskers(&context.target) {
            payload = mask_one(module, context, &payload, deadline)?;
        }
        match payload {
            Payload::Body(body) => Ok(body),
            Payload::Rows(_) => unreachable!("mask output shape is checked"),
        }
    }

    /// True if some masking module applies to `target`.
    pub fn masks(&self, target: &Target) -> bool {
        self.maskers(target).next().is_some()
    }

    fn maskers<'a>(
        &'a self,
        target: &'a Target,
    ) -> impl Iterator<Item = (usize, &'a LoadedModule)> + 'a {
        self.modules
            .iter()
            .enumerate()
            .filter(move |(_, m)| m.applies(Hook::Mask, target))
    }
}

fn mask_one(
    module: &LoadedModule,
    context: &GrantContext,
    payload: &Payload,
    deadline: Instant,
) -> Result<Payload, MaskError> {
    module
        .mask(context, payload, deadline)
        .map_err(|fault| MaskError::Module {
            module: module.name().clone(),
            fault,
        })
}

/// The masking modules that care about one row description. It keeps its policy set
/// alive, so a result streams through one bundle even if another is swapped in.
pub struct MaskPlan {
    set: Arc<PolicySet>,
    /// The planned modules (by index in the set) and the columns each masks.
    modules: Vec<(usize, Vec<u32>)>,
    /// Every column some planned module masks.
    columns: Vec<u32>,
}

impl MaskPlan {
    /// True when no module masks any of the columns: rows need no Wasm call at all.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// The columns (by index, ascending) that some planned module masks; values of the
    /// others are not theirs to change.
    pub fn columns(&self) -> &[u32] {
        &self.columns
    }

    /// Each planned module's name and the columns (by index) it masks.
    pub fn masked_by(&self) -> impl Iterator<Item = (&Arc<str>, &[u32])> {
        self.modules
            .iter()
            .map(|(index, columns)| (self.set.modules[*index].name(), columns.as_slice()))
    }

    /// Masks one batch of rows with each planned module in bundle order.
    pub fn mask_rows(
        &self,
        context: &GrantContext,
        rows: Rows,
        deadline: Instant,
    ) -> Result<Rows, MaskError> {
        let mut payload = Payload::Rows(rows);
        for &(index, _) in &self.modules {
            payload = mask_one(&self.set.modules[index], context, &payload, deadline)?;
        }
        match payload {
            Payload::Rows(rows) => Ok(rows),
            Payload::Body(_) => unreachable!("mask output shape is checked"),
        }
    }
}
