//! Reading agent and target labels.

use crate::{Agent, Label, Target};

/// Label lookups on anything that carries labels.
pub trait Labels {
    fn labels(&self) -> &[Label];

    /// The value of label `key`, if set.
    fn label(&self, key: &str) -> Option<&str> {
        self.labels()
            .iter()
            .find(|l| l.key == key)
            .map(|l| l.value.as_str())
    }

    /// True if label `key` is set to `value`.
    fn has_label(&self, key: &str, value: &str) -> bool {
        self.label(key) == Some(value)
    }

    /// A comma-separated label as a list, e.g. `namespaces=app,jobs` → `["app", "jobs"]`.
    fn label_list(&self, key: &str) -> Vec<&str> {
        self.label(key)
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Labels for Agent {
    fn labels(&self) -> &[Label] {
        &self.labels
    }
}

impl Labels for Target {
    fn labels(&self) -> &[Label] {
        &self.labels
    }
}

impl Labels for [Label] {
    fn labels(&self) -> &[Label] {
        self
    }
}
