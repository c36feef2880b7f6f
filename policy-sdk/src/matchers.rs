//! Questions policies ask of actions: is this SQL a write, is this Kubernetes request
//! read-only, does this HTTP request match a rule.

use crate::glob::glob;
use crate::{HttpRequest, KubeRequest, SqlFunction, SqlKind, SqlStatement, Volatility};

impl SqlKind {
    /// Statement kinds that change data or schema, or can (procedures and DO blocks
    /// run arbitrary code).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            SqlKind::Insert
                | SqlKind::Update
                | SqlKind::Delete
                | SqlKind::Merge
                | SqlKind::CopyFrom
                | SqlKind::Ddl
                | SqlKind::Call
                | SqlKind::DoBlock
        )
    }
}

impl SqlStatement {
    /// True if the statement writes: by its kind, or because the host found tables it
    /// writes (e.g. `EXPLAIN ANALYZE UPDATE …`, a data-modifying CTE).
    pub fn is_write(&self) -> bool {
        self.kind.is_write() || !self.tables_written.is_empty()
    }

    /// True if the statement reads or writes a table matching `pattern`.
    pub fn touches(&self, pattern: &str) -> bool {
        self.tables_read
            .iter()
            .chain(&self.tables_written)
            .any(|t| name_matches(pattern, t))
    }

    /// True if the statement writes a table matching `pattern`.
    pub fn writes(&self, pattern: &str) -> bool {
        self.tables_written.iter().any(|t| name_matches(pattern, t))
    }

    /// True if the statement calls a function matching `pattern`.
    pub fn calls(&self, pattern: &str) -> bool {
        self.functions.iter().any(|f| f.is(pattern))
    }
}

impl SqlFunction {
    /// True if the function's name (as written) matches `pattern`.
    pub fn is(&self, pattern: &str) -> bool {
        name_matches(pattern, &self.name)
    }

    /// True if the catalog declares it unable to change anything (immutable or stable)
    /// and it runs no SQL from text. A volatile function may write, lock, notify or
    /// reach outside the database; one the catalog does not know counts as volatile.
    pub fn is_read_only(&self) -> bool {
        self.volatility != Volatility::Volatile && !self.runs_sql_text
    }
}

/// Matches a table or function name against a pattern, case-insensitively. An
/// unqualified pattern matches the name in any schema (`users` matches `public.users`,
/// `pg_read_file` matches `pg_catalog.pg_read_file`): a policy must not be bypassed by
/// qualifying a name.
fn name_matches(pattern: &str, name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    glob(&pattern, &name)
        || (!pattern.contains('.')
            && name
                .rsplit_once('.')
                .is_some_and(|(_, unqualified)| glob(&pattern, unqualified)))
}

impl HttpRequest {
    /// The value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.key.eq_ignore_ascii_case(name))
            .map(|h| h.value.as_str())
    }

    /// True if the method is `method` (case-insensitive, `*` for any) and the path
    /// matches the glob `path`.
    pub fn matches(&self, method: &str, path: &str) -> bool {
        (method == "*" || self.method.eq_ignore_ascii_case(method)) && glob(path, &self.path)
    }

    /// GET, HEAD and OPTIONS.
    pub fn is_safe_method(&self) -> bool {
        ["GET", "HEAD", "OPTIONS"]
            .iter()
            .any(|m| self.method.eq_ignore_ascii_case(m))
    }
}

impl KubeRequest {
    /// get, list and watch: the verbs that change nothing.
    pub fn is_read_only(&self) -> bool {
        matches!(self.verb.as_str(), "get" | "list" | "watch")
    }

    /// True if the request is namespaced and its namespace is one of `namespaces`.
    /// Cluster-scoped requests (no namespace) are not in any namespace.
    pub fn in_namespaces<S: AsRef<str>>(&self, namespaces: &[S]) -> bool {
        self.namespace
            .as_deref()
            .is_some_and(|ns| namespaces.iter().any(|n| n.as_ref() == ns))
    }

    /// `resource` or `resource/subresource`, e.g. `pods/exec`.
    pub fn full_resource(&self) -> String {
        match &self.subresource {
            Some(sub) => format!("{}/{sub}", self.resource_type),
            None => self.resource_type.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(name: &str, volatility: Volatility) -> SqlFunction {
        SqlFunction {
            name: name.into(),
            schemas: vec!["pg_catalog".into()],
            volatility,
            builtin: true,
            runs_sql_text: false,
        }
    }

    fn sql(kind: SqlKind, written: &[&str]) -> SqlStatement {
        SqlStatement {
            text: String::new(),
            kind,
            tables_read: vec!["public.users".into()],
            tables_written: written.iter().map(|s| s.to_string()).collect(),
            functions: vec![function("pg_sleep", Volatility::Volatile)],
            locks_rows: false,
        }
    }

    #[test]
    fn sql_questions() {
        assert!(!sql(SqlKind::Select, &[]).is_write());
        assert!(sql(SqlKind::Update, &["users"]).is_write());
        assert!(sql(SqlKind::Explain, &["users"]).is_write());
        assert!(sql(SqlKind::Select, &[]).touches("users"));
        assert!(sql(SqlKind::Select, &[]).touches("public.*"));
        assert!(!sql(SqlKind::Select, &[]).touches("orders"));
        assert!(sql(SqlKind::Select, &[]).calls("PG_SLEEP"));
        let mut qualified = sql(SqlKind::Select, &[]);
        qualified.functions = vec![function("pg_catalog.pg_read_file", Volatility::Volatile)];
        assert!(qualified.calls("pg_read_file"));
    }

    #[test]
    fn read_only_functions() {
        assert!(function("lower", Volatility::Immutable).is_read_only());
        assert!(function("now", Volatility::Stable).is_read_only());
        assert!(!function("nextval", Volatility::Volatile).is_read_only());
        let mut sql_text = function("query_to_xml", Volatility::Stable);
        sql_text.runs_sql_text = true;
        assert!(!sql_text.is_read_only());
    }
}
