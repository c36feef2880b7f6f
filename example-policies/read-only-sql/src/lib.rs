//! read-only-sql: under a read grant, SQL may read and nothing else.
//!
//! Denied under `access = read`: statements that write (INSERT, UPDATE, DELETE, MERGE,
//! COPY FROM, or any statement the host found writing a table, e.g. `EXPLAIN ANALYZE
//! UPDATE`), DDL, procedure calls and DO blocks, functions with side effects, and `SET`
//! of anything but harmless session settings (a read grant must not be able to switch
//! off `default_transaction_read_only` or change role). Write and admin grants are
//! allowed everything; their access level was decided when the grant was issued.

use airlock_policy_sdk::*;

/// Functions that change state, reach outside the database, or read server files.
const SIDE_EFFECT_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "set_config",
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_read_file",
    "pg_read_binary_file",
    "pg_ls_dir",
    "pg_stat_file",
    "lo_import",
    "lo_export",
    "lo_unlink",
    "dblink*",
    "pg_advisory_lock*",
    "pg_sleep*",
    "txid_current",
    "pg_switch_wal",
    "pg_create_*",
    "pg_drop_*",
];

/// Session settings a read grant may change: what clients send on connect, and limits
/// that only make the session more careful.
const HARMLESS_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "extra_float_digits",
    "intervalstyle",
    "lock_timeout",
    "search_path",
    "statement_timeout",
    "timezone",
    "time zone",
    "idle_in_transaction_session_timeout",
];

struct ReadOnlySql;

impl Policy for ReadOnlySql {
    fn check(context: GrantContext, action: Action) -> Verdict {
        let Action::Sql(sql) = action else {
            return abstain();
        };
        if context.access != Access::Read {
            return allow();
        }
        let hint = "ask for a grant with access=write for this task";
        if sql.kind == SqlKind::Ddl {
            return deny_with_hint("read-only grant: DDL changes the schema", hint);
        }
        if sql.kind == SqlKind::CopyFrom {
            return deny_with_hint("read-only grant: COPY FROM writes rows", hint);
        }
        if matches!(sql.kind, SqlKind::Call | SqlKind::DoBlock) {
            return deny_with_hint(
                "read-only grant: procedures and DO blocks can run arbitrary writes",
                hint,
            );
        }
        if sql.is_write() {
            let tables = if sql.tables_written.is_empty() {
                "data".to_string()
            } else {
                sql.tables_written.join(", ")
            };
            return deny_with_hint(
                format!("read-only grant: {} writes to {tables}", keyword(sql.kind)),
                hint,
            );
        }
        if let Some(function) = SIDE_EFFECT_FUNCTIONS.iter().find(|f| sql.calls(f)) {
            return deny_with_hint(
                format!(
                    "read-only grant: calling {} has side effects",
                    function.trim_end_matches('*')
                ),
                hint,
            );
        }
        if sql.kind == SqlKind::Set && !is_harmless_set(&sql.text) {
            return deny_with_hint(
                "read-only grant: this SET could change the session's privileges or read-only mode",
                "only session settings like search_path, statement_timeout or timezone may be set",
            );
        }
        allow_with(None, true)
    }
}

fn keyword(kind: SqlKind) -> &'static str {
    match kind {
        SqlKind::Insert => "INSERT",
        SqlKind::Update => "UPDATE",
        SqlKind::Delete => "DELETE",
        SqlKind::Merge => "MERGE",
        SqlKind::Explain => "EXPLAIN ANALYZE",
        _ => "this statement",
    }
}

/// `SET [SESSION|LOCAL] name {TO|=} …` or `RESET name` for a harmless `name`.
fn is_harmless_set(text: &str) -> bool {
    let lower = text.trim().to_ascii_lowercase();
    let rest = lower
        .strip_prefix("set")
        .or_else(|| lower.strip_prefix("reset"))
        .unwrap_or("");
    let rest = rest.trim_start();
    let rest = rest
        .strip_prefix("session ")
        .or_else(|| rest.strip_prefix("local "))
        .unwrap_or(rest)
        .trim_start();
    HARMLESS_SETTINGS.iter().any(|name| {
        rest.strip_prefix(name)
            .is_some_and(|after| after.is_empty() || after.starts_with([' ', '=', ';']))
    })
}

export_policy!(ReadOnlySql);

#[cfg(test)]
mod tests {
    use super::is_harmless_set;

    #[test]
    fn harmless_sets() {
        assert!(is_harmless_set("SET search_path TO app, public"));
        assert!(is_harmless_set("set session statement_timeout = '5s'"));
        assert!(is_harmless_set("SET TIME ZONE 'UTC'"));
        assert!(!is_harmless_set("SET default_transaction_read_only = off"));
        assert!(!is_harmless_set("SET ROLE postgres"));
        assert!(!is_harmless_set("SET search_path_x = 1"));
        assert!(!is_harmless_set("SET session_authorization = 'postgres'"));
    }
}
