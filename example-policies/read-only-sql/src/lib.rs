//! read-only-sql: under a read grant, SQL may read and nothing else.
//!
//! Denied under `access = read`: statements that write (INSERT, UPDATE, DELETE, MERGE,
//! COPY FROM, or any statement the host found writing a table, e.g. `EXPLAIN ANALYZE
//! UPDATE`), DDL, procedure calls and DO blocks, row locks (`FOR UPDATE/SHARE`),
//! LISTEN/NOTIFY, two-phase commit, `SET` of anything but harmless session settings,
//! and every function call that is not read-only by the upstream's own catalog: a
//! volatile function (sequences, large objects, advisory locks, `pg_notify`, server
//! files, a user's function that deletes) or one that runs SQL from text. A short list
//! of volatile built-ins that only read or report is allowed. Write and admin grants
//! are allowed everything; their access level was decided when the grant was issued.
//!
//! The gateway opens a read grant's upstream session read-only as well, so what this
//! policy misses, PostgreSQL refuses.

use airlock_policy_sdk::*;

/// Volatile built-ins that change nothing: clocks, randomness, and sizes on disk.
const HARMLESS_VOLATILE: &[&str] = &[
    "random",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "pg_relation_size",
    "pg_total_relation_size",
    "pg_table_size",
    "pg_indexes_size",
    "pg_database_size",
    "pg_is_in_recovery",
];

/// Session settings a read grant may change: what clients send on connect, and limits
/// that only make the session more careful.
const HARMLESS_SETTINGS: &[&str] = &[
    "application_name",
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
        if sql.locks_rows {
            return deny_with_hint("read-only grant: FOR UPDATE/SHARE locks rows", hint);
        }
        match sql.kind {
            SqlKind::Listen | SqlKind::Notify => {
                return deny_with_hint(
                    "read-only grant: LISTEN and NOTIFY signal other sessions",
                    hint,
                );
            }
            SqlKind::TwoPhase => {
                return deny_with_hint(
                    "read-only grant: two-phase commit outlives the session",
                    hint,
                );
            }
            _ => {}
        }
        for function in &sql.functions {
            if function.runs_sql_text {
                return deny_with_hint(
                    format!(
                        "read-only grant: {} runs SQL from text that no policy sees",
                        function.name
                    ),
                    "run the statement itself instead",
                );
            }
            let harmless =
                function.builtin && HARMLESS_VOLATILE.iter().any(|name| function.is(name));
            if !function.is_read_only() && !harmless {
                return deny_with_hint(
                    format!(
                        "read-only grant: calling {} may change state (the catalog says it is volatile{})",
                        function.name,
                        if function.schemas.is_empty() {
                            ", or does not know it"
                        } else {
                            ""
                        }
                    ),
                    hint,
                );
            }
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
