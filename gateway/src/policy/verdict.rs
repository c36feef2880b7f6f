//! Combining the verdicts of several modules into one decision.

use std::sync::Arc;

use super::module::Fault;
use super::set::BundleId;
use super::types::{Constraints, Verdict};

/// What one module said about one input, kept for the record.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleVote {
    pub module: Arc<str>,
    pub digest: Arc<str>,
    pub verdict: Result<Verdict, Fault>,
}

impl ModuleVote {
    /// The vote as the record keeps it: the module, its digest, what it said and why,
    /// in stable names (no Rust debug text).
    pub fn to_record(&self) -> serde_json::Value {
        let (verdict, reason, constraints) = match &self.verdict {
            Ok(Verdict::Allow(c)) => (
                "allow",
                None,
                Some(serde_json::json!({
                    "max_ttl_seconds": c.max_ttl_seconds,
                    "read_only": c.read_only,
                })),
            ),
            Ok(Verdict::Deny(denial)) => ("deny", Some(denial.reason.clone()), None),
            Ok(Verdict::Review(reason)) => ("review", Some(reason.clone()), None),
            Ok(Verdict::Abstain) => ("abstain", None, None),
            Err(fault) => ("fault", Some(fault.to_string()), None),
        };
        let mut vote = serde_json::json!({
            "module": &*self.module,
            "digest": &*self.digest,
            "verdict": verdict,
        });
        if let Some(reason) = reason {
            vote["reason"] = reason.into();
        }
        if let Some(constraints) = constraints {
            vote["constraints"] = constraints;
        }
        vote
    }
}

/// The SQL kind as the record and the WIT contract name it (`copy-to`, not
/// `SqlKind::CopyTo`).
pub fn sql_kind_name(kind: super::types::SqlKind) -> &'static str {
    use super::types::SqlKind as K;
    match kind {
        K::Select => "select",
        K::Insert => "insert",
        K::Update => "update",
        K::Delete => "delete",
        K::Merge => "merge",
        K::CopyTo => "copy-to",
        K::CopyFrom => "copy-from",
        K::Ddl => "ddl",
        K::Transaction => "transaction",
        K::Set => "set",
        K::Show => "show",
        K::Call => "call",
        K::DoBlock => "do-block",
        K::Explain => "explain",
        K::Other => "other",
        K::Listen => "listen",
        K::Notify => "notify",
        K::TwoPhase => "two-phase",
    }
}

/// The combined verdict.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every voting module allowed or abstained, and at least one allowed; the
    /// constraints are the tightest any of them set.
    Allow(Constraints),
    /// A module denied, failed, or nothing vouched for the input. `module` is the
    /// module that denied, if one did.
    Deny {
        module: Option<Arc<str>>,
        reason: String,
        hint: Option<String>,
    },
    /// No module denied and at least one asked for an operator's approval.
    Review { module: Arc<str>, reason: String },
}

impl Outcome {
    pub fn is_allow(&self) -> bool {
        matches!(self, Outcome::Allow(_))
    }

    pub(crate) fn fail_closed(reason: String) -> Self {
        Outcome::Deny {
            module: None,
            reason,
            hint: None,
        }
    }
}

/// A combined verdict with its provenance: the bundle that decided and every vote.
#[derive(Debug, Clone)]
pub struct Decision {
    pub outcome: Outcome,
    /// `None` when no bundle was active (and so the outcome is a deny).
    pub bundle: Option<Arc<BundleId>>,
    pub votes: Vec<ModuleVote>,
}

/// Any deny (or fault) → deny; else any review → review; else any allow → allow with
/// the tightest constraints; all abstain → deny: nothing vouched for the input.
pub(crate) fn combine(votes: &[ModuleVote], what: &str) -> Outcome {
    let mut review: Option<Outcome> = None;
    let mut allow: Option<Constraints> = None;
    for vote in votes {
        match &vote.verdict {
            Err(fault) => {
                return Outcome::Deny {
                    module: Some(vote.module.clone()),
                    reason: format!(
                        "policy module `{}` {fault}; denied (fail closed)",
                        vote.module
                    ),
                    hint: None,
                };
            }
            Ok(Verdict::Deny(denial)) => {
                return Outcome::Deny {
                    module: Some(vote.module.clone()),
                    reason: denial.reason.clone(),
                    hint: denial.hint.clone(),
                };
            }
            Ok(Verdict::Review(reason)) => {
                review.get_or_insert_with(|| Outcome::Review {
                    module: vote.module.clone(),
                    reason: reason.clone(),
                });
            }
            Ok(Verdict::Allow(constraints)) => {
                allow = Some(match allow {
                    None => *constraints,
                    Some(current) => tightest(current, *constraints),
                });
            }
            Ok(Verdict::Abstain) => {}
        }
    }
    review.or(allow.map(Outcome::Allow)).unwrap_or_else(|| {
        Outcome::fail_closed(format!(
            "no policy module allowed {what} (every module abstained); denied (fail closed)"
        ))
    })
}

fn tightest(a: Constraints, b: Constraints) -> Constraints {
    Constraints {
        max_ttl_seconds: match (a.max_ttl_seconds, b.max_ttl_seconds) {
            (Some(x), Some(y)) => Some(x.min(y)),
            (x, y) => x.or(y),
        },
        read_only: a.read_only || b.read_only,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::types::Denial;

    fn vote(verdict: Result<Verdict, Fault>) -> ModuleVote {
        ModuleVote {
            module: "m".into(),
            digest: "d".into(),
            verdict,
        }
    }

    fn allow(ttl: Option<u32>, read_only: bool) -> Result<Verdict, Fault> {
        Ok(Verdict::Allow(Constraints {
            max_ttl_seconds: ttl,
            read_only,
        }))
    }

    #[test]
    fn any_deny_wins() {
        let votes = [
            vote(allow(None, false)),
            vote(Ok(Verdict::Review("why".into()))),
            vote(Ok(Verdict::Deny(Denial {
                reason: "no".into(),
                hint: Some("ask".into()),
            }))),
        ];
        assert!(
            matches!(combine(&votes, "x"), Outcome::Deny { reason, hint: Some(_), .. } if reason == "no")
        );
    }

    #[test]
    fn a_fault_is_a_deny_naming_the_module() {
        let votes = [vote(allow(None, false)), vote(Err(Fault::StackOverflow))];
        let Outcome::Deny { reason, .. } = combine(&votes, "x") else {
            panic!("expected deny")
        };
        assert!(reason.contains("`m` overflowed its stack"), "{reason}");
    }

    #[test]
    fn review_beats_allow() {
        let votes = [
            vote(allow(None, false)),
            vote(Ok(Verdict::Review("op".into()))),
        ];
        assert!(matches!(combine(&votes, "x"), Outcome::Review { .. }));
    }

    #[test]
    fn allow_takes_the_tightest_constraints() {
        let votes = [
            vote(allow(Some(900), false)),
            vote(Ok(Verdict::Abstain)),
            vote(allow(Some(300), false)),
            vote(allow(None, true)),
        ];
        assert_eq!(
            combine(&votes, "x"),
            Outcome::Allow(Constraints {
                max_ttl_seconds: Some(300),
                read_only: true
            })
        );
    }

    #[test]
    fn all_abstain_is_a_deny() {
        let votes = [vote(Ok(Verdict::Abstain)), vote(Ok(Verdict::Abstain))];
        assert!(matches!(
            combine(&votes, "x"),
            Outcome::Deny { module: None, .. }
        ));
        assert!(matches!(
            combine(&[], "x"),
            Outcome::Deny { module: None, .. }
        ));
    }
}
