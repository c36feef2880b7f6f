//! Which hooks and targets a module applies to, as its bundle manifest declares.

use serde::{Deserialize, Serialize};

use super::types::{Target, TargetKind};

/// One of the three calls a module can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Authorize,
    Check,
    Mask,
}

impl std::fmt::Display for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hook::Authorize => "authorize",
            Hook::Check => "check",
            Hook::Mask => "mask",
        })
    }
}

/// A target kind as written in manifests and configuration files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Postgres,
    Ssh,
    Http,
    Kubernetes,
}

impl Kind {
    /// The name configuration files and the record use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::Ssh => "ssh",
            Kind::Http => "http",
            Kind::Kubernetes => "kubernetes",
        }
    }
}

impl From<Kind> for TargetKind {
    fn from(kind: Kind) -> Self {
        match kind {
            Kind::Postgres => TargetKind::Postgres,
            Kind::Ssh => TargetKind::Ssh,
            Kind::Http => TargetKind::Http,
            Kind::Kubernetes => TargetKind::Kubernetes,
        }
    }
}

impl From<TargetKind> for Kind {
    fn from(kind: TargetKind) -> Self {
        match kind {
            TargetKind::Postgres => Kind::Postgres,
            TargetKind::Ssh => Kind::Ssh,
            TargetKind::Http => Kind::Http,
            TargetKind::Kubernetes => Kind::Kubernetes,
        }
    }
}

/// Where a module applies: the hooks it answers, and the targets (by kind and by name
/// pattern) it answers them for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Scope {
    pub hooks: Vec<Hook>,
    /// Empty means every kind.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_kinds: Vec<Kind>,
    /// Target-name patterns (`*` matches any run of characters, `?` one character).
    #[serde(default = "every_target")]
    pub targets: Vec<String>,
}

fn every_target() -> Vec<String> {
    vec!["*".to_string()]
}

impl Scope {
    /// A scope for every hook on every target, for a module tested on its own.
    pub fn everything() -> Self {
        Scope {
            hooks: vec![Hook::Authorize, Hook::Check, Hook::Mask],
            target_kinds: Vec::new(),
            targets: every_target(),
        }
    }

    pub fn applies(&self, hook: Hook, target: &Target) -> bool {
        self.hooks.contains(&hook)
            && (self.target_kinds.is_empty()
                || self.target_kinds.contains(&Kind::from(target.kind)))
            && self
                .targets
                .iter()
                .any(|pattern| wildcard_match(pattern.as_bytes(), target.name.as_bytes()))
    }
}

/// `*` and `?` wildcard matching, iterative with single backtracking point (linear in
/// practice, no recursion on hostile patterns).
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::wildcard_match;

    #[test]
    fn wildcards() {
        for (pattern, text, expected) in [
            ("*", "prod-db", true),
            ("prod-*", "prod-db", true),
            ("prod-*", "staging-db", false),
            ("*-db", "prod-db", true),
            ("p?od-db", "prod-db", true),
            ("prod-db", "prod-db2", false),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("", "", true),
            ("", "x", false),
        ] {
            assert_eq!(
                wildcard_match(pattern.as_bytes(), text.as_bytes()),
                expected,
                "{pattern} vs {text}"
            );
        }
    }
}
