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
    "search_path",
    "timezone",
    "time zone",
];

/// Limits a read grant may only tighten: set to at most five minutes, never off (0),
/// or reset to the role's own default.
const LIMITS: &[&str] = &[
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
];

/// The longest a read grant may set one of [`LIMITS`] to, in milliseconds.
const LONGEST_LIMIT_MS: f64 = 300_000.0;

/// Stable built-ins that still change the server: each call assigns a transaction id
/// (a WAL commit record).
const ASSIGNS_TRANSACTION_ID: &[&str] = &["txid_current", "pg_current_xact_id"];

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
            if function.builtin && ASSIGNS_TRANSACTION_ID.iter().any(|name| function.is(name)) {
                return deny_with_hint(
                    format!(
                        "read-only grant: {} assigns a transaction id",
                        function.name
                    ),
                    "use txid_current_if_assigned() or pg_current_snapshot()",
                );
            }
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
    let value_of = |name: &str| {
        rest.strip_prefix(name)
            .filter(|after| after.is_empty() || after.starts_with([' ', '=', ';']))
    };
    if HARMLESS_SETTINGS
        .iter()
        .any(|name| value_of(name).is_some())
    {
        return true;
    }
    LIMITS
        .iter()
        .find_map(|name| value_of(name))
        .is_some_and(|after| lower.starts_with("reset") || tightens_limit(after))
}

/// True if `after` (what follows a limit's name in a SET) sets it to a duration
/// between zero and [`LONGEST_LIMIT_MS`]: `= '5s'`, `TO 5000`, `= '2min'`.
fn tightens_limit(after: &str) -> bool {
    let value = after
        .trim()
        .trim_start_matches('=')
        .trim_start()
        .trim_start_matches("to ")
        .trim()
        .trim_end_matches(';')
        .trim()
        .trim_matches('\'');
    if value == "default" {
        return true;
    }
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let Ok(number) = number.parse::<f64>() else {
        return false;
    };
    let ms = match unit.trim() {
        "" | "ms" => number,
        "s" => number * 1e3,
        "min" => number * 60e3,
        "h" => number * 3_600e3,
        "d" => number * 86_400e3,
        _ => return false,
    };
    // PostgreSQL rounds to whole milliseconds, and 0 is no limit at all.
    (1.0..=LONGEST_LIMIT_MS).contains(&ms.round())
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

    #[test]
    fn limits_may_only_tighten() {
        for sql in [
            "SET statement_timeout = '5s'",
            "set local lock_timeout to 2000",
            "SET idle_in_transaction_session_timeout = '2min'",
            "SET statement_timeout TO DEFAULT",
            "RESET statement_timeout",
        ] {
            assert!(is_harmless_set(sql), "{sql}");
        }
        for sql in [
            "SET statement_timeout = 0",
            "SET idle_in_transaction_session_timeout = '0'",
            "SET statement_timeout = '1h'",
            "SET lock_timeout = '10 weeks'",
            "SET statement_timeout = 'abc'",
            "SET statement_timeout = '.4'",
        ] {
            assert!(!is_harmless_set(sql), "{sql}");
        }
    }
}
