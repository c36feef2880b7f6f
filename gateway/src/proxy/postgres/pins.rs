//! What the gateway pins in every upstream session, whatever the policies say.
//!
//! - **How the server lexes.** The classifier parses UTF-8 text with
//!   `standard_conforming_strings` on. A session whose `client_encoding` were SJIS, or
//!   whose backslashes escaped inside `'…'`, would run a different statement than the
//!   one decided (a `SELECT` of a string literal becomes a `SELECT` and a `DELETE`). So
//!   the upstream session starts with these settings, no client may ask otherwise, no
//!   statement may change them, and the upstream's own reports of them are watched.
//! - **Read at the server.** A read session starts with `default_transaction_read_only`
//!   and may not lift it (`READ WRITE`, the read-only settings, `RESET ALL`, a role
//!   change): PostgreSQL itself then refuses writes inside functions, sequences and
//!   `FOR UPDATE` (`25006`), whatever a policy missed. (It allows large objects,
//!   advisory locks and `NOTIFY` in a read-only transaction: policy holds those.)

use super::classify::Statement;

/// The settings that change how the server reads a statement's bytes, and the values
/// the classifier assumes.
const LEXING: &[(&str, &str)] = &[
    ("client_encoding", "UTF8"),
    ("standard_conforming_strings", "on"),
    // Only matters without standard strings, but costs nothing to hold still.
    ("backslash_quote", "safe_encoding"),
];

/// Settings that let a grant's end stop what its session started. The gateway ends a
/// session by cancelling, terminating the backend from a second login, and closing the
/// connection; a statement can catch the cancel, and a write grant can make the second
/// login fail (change the role's password). With this, the backend checks every
/// 100 ms during a statement that the gateway is still there, and dies (rolling back)
/// once it is not: no statement outlives the connection by more than that.
const ENDING: &[(&str, &str)] = &[("client_connection_check_interval", "100")];

/// Settings that could lift a read session's read-only default or change whose
/// privileges it runs with.
const READ_ONLY: &[&str] = &[
    "default_transaction_read_only",
    "transaction_read_only",
    "role",
    "session_authorization",
];

/// A refusal: the reason and a hint, as a policy denial carries them.
pub(super) type Refusal = (String, Option<String>);

/// The startup parameters the gateway logs in upstream with, after user and database.
pub(super) fn upstream_parameters(read_only: bool) -> Vec<(&'static str, &'static str)> {
    let mut params: Vec<_> = LEXING.iter().chain(ENDING).copied().collect();
    if read_only {
        params.push(("default_transaction_read_only", "on"));
    }
    params
}

/// Checks a client's startup parameters: nothing may ask for other lexing, another
/// role or a writable session, and `options` (arbitrary `-c` settings) is refused.
pub(super) fn check_client_startup(params: &[(String, String)]) -> Result<(), String> {
    for (key, value) in params {
        let key = key.to_ascii_lowercase();
        if key == "client_encoding" {
            let value = value.to_ascii_lowercase().replace(['-', '_'], "");
            if !matches!(value.as_str(), "utf8" | "unicode") {
                return Err(format!(
                    "this gateway speaks UTF8 only, and the client asked for client_encoding {value}: set PGCLIENTENCODING=UTF8"
                ));
            }
        } else if key == "options" && !value.trim().is_empty() {
            return Err(
                "startup options are not passed upstream through this gateway: unset PGOPTIONS (run SET after connecting instead)"
                    .into(),
            );
        } else if LEXING.iter().chain(ENDING).any(|(name, _)| *name == key)
            || READ_ONLY.contains(&key.as_str())
        {
            return Err(format!(
                "the startup parameter {key} is pinned by this gateway and cannot be set by a client"
            ));
        }
    }
    Ok(())
}

/// Why the gateway refuses a statement itself, if it does: it changes a pinned lexing
/// setting (any grant), or could lift read-only (a read session).
pub(super) fn refusal(statement: &Statement, read_only: bool, admin: bool) -> Option<Refusal> {
    if statement.manages_logins && !admin {
        return Some((
            "changing roles or the database's logins (CREATE, ALTER, DROP or GRANT of a role; ALTER DATABASE; GRANT or REVOKE on the database) is refused on read and write grants: it can change or lock out the credential the gateway holds".into(),
            Some("ask for a grant with access=admin for this task".into()),
        ));
    }
    for setting in &statement.settings {
        match setting.as_str() {
            // RESET ALL restores what the session started with: the pinned values.
            "all" if read_only => {
                return Some((
                    "read-only grant: RESET ALL could lift the session's read-only mode".into(),
                    Some("reset named settings one at a time".into()),
                ));
            }
            "all" => {}
            "*" => {
                return Some((
                    "set_config with a setting named at run time is refused: it could change a setting the gateway pins".into(),
                    Some("name the setting as a constant: set_config('search_path', …)".into()),
                ));
            }
            name if LEXING.iter().any(|(pinned, _)| *pinned == name) => {
                return Some((
                    format!(
                        "{name} is pinned by the gateway: it changes how the server reads statements"
                    ),
                    Some("the gateway speaks UTF8 with standard_conforming_strings on".into()),
                ));
            }
            name if ENDING.iter().any(|(pinned, _)| *pinned == name) => {
                return Some((
                    format!(
                        "{name} is pinned by the gateway: it lets a grant's end stop the work its session started"
                    ),
                    None,
                ));
            }
            name if read_only && READ_ONLY.contains(&name) => {
                return Some((
                    format!("read-only grant: {name} cannot be changed in a read-only session"),
                    Some("ask for a grant with access=write for this task".into()),
                ));
            }
            _ => {}
        }
    }
    if read_only && statement.read_write {
        return Some((
            "read-only grant: the session cannot start a READ WRITE transaction".into(),
            Some("ask for a grant with access=write for this task".into()),
        ));
    }
    None
}

/// Checks a ParameterStatus from the upstream against what is pinned; `Err` says why
/// the session must end.
pub(super) fn check_parameter(
    name: &str,
    value: &str,
    read_only: bool,
    superuser_allowed: bool,
) -> Result<(), String> {
    let name = name.to_ascii_lowercase();
    if name == "is_superuser" && value.eq_ignore_ascii_case("on") && !superuser_allowed {
        return Err(
            "the upstream session became a superuser, which this target does not allow".into(),
        );
    }
    if let Some((_, pinned)) = LEXING.iter().find(|(n, _)| *n == name)
        && !value.eq_ignore_ascii_case(pinned)
    {
        return Err(format!(
            "the upstream reports {name} = {value}, not {pinned}: statements would no longer be read as they were decided"
        ));
    }
    if read_only && name == "default_transaction_read_only" && !value.eq_ignore_ascii_case("on") {
        return Err(format!(
            "the upstream reports default_transaction_read_only = {value} in a read-only session"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::postgres::classify::classify;

    fn refused(sql: &str, read_only: bool) -> bool {
        classify(sql)
            .unwrap()
            .iter()
            .any(|s| refusal(s, read_only, false).is_some())
    }

    #[test]
    fn changing_who_may_log_in_needs_an_admin_grant() {
        for sql in [
            "ALTER ROLE airlock PASSWORD 'locked-out'",
            "ALTER USER CURRENT_USER WITH PASSWORD 'x'",
            "ALTER ROLE airlock NOLOGIN",
            "ALTER ROLE airlock VALID UNTIL '2000-01-01'",
            "ALTER ROLE airlock SET search_path = evil",
            "ALTER ROLE airlock RENAME TO gone",
            "CREATE ROLE backdoor LOGIN PASSWORD 'x'",
            "DROP ROLE someone",
            "GRANT pg_read_server_files TO airlock",
            "REVOKE app_rw FROM airlock",
            "BEGIN; ALTER USER airlock PASSWORD 'x'; COMMIT",
            "ALTER DATABASE app CONNECTION LIMIT 0",
            "ALTER DATABASE app ALLOW_CONNECTIONS false",
            "ALTER DATABASE app SET search_path = evil",
            "ALTER DATABASE app RENAME TO gone",
            "REVOKE CONNECT, TEMP ON DATABASE app FROM PUBLIC, airlock",
        ] {
            assert!(refused(sql, false), "{sql}");
            let statements = classify(sql).unwrap();
            assert!(
                statements.iter().all(|s| refusal(s, false, true).is_none()),
                "an admin grant may: {sql}"
            );
        }
        for sql in [
            "SELECT rolname FROM pg_roles",
            "GRANT SELECT ON t TO reporting",
            "ALTER TABLE t RENAME TO u",
        ] {
            assert!(!refused(sql, false), "{sql}");
        }
    }

    #[test]
    fn lexing_settings_are_pinned_for_every_grant() {
        for sql in [
            "SET client_encoding = 'SJIS'",
            "SET NAMES 'SJIS'",
            "SET LOCAL standard_conforming_strings = off",
            "RESET standard_conforming_strings",
            "SELECT set_config('standard_conforming_strings', 'off', false)",
            "SELECT set_config(n, 'off', false) FROM t",
            "ALTER ROLE app SET client_encoding = 'SJIS'",
            "ALTER DATABASE app SET standard_conforming_strings = off",
            "SET backslash_quote = on",
        ] {
            assert!(refused(sql, false), "{sql}");
        }
        for sql in [
            "SET search_path TO app",
            "SELECT set_config('search_path', 'app', false)",
            "RESET ALL",
            "BEGIN READ WRITE",
        ] {
            assert!(!refused(sql, false), "{sql}");
        }
    }

    #[test]
    fn read_only_cannot_be_lifted() {
        for sql in [
            "BEGIN READ WRITE",
            "START TRANSACTION READ WRITE",
            "SET TRANSACTION READ WRITE",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
            "SET default_transaction_read_only = off",
            "SET transaction_read_only = off",
            "RESET default_transaction_read_only",
            "RESET ALL",
            "SET ROLE postgres",
            "SET SESSION AUTHORIZATION postgres",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "SELECT set_config(n, 'off', false) FROM t",
        ] {
            assert!(refused(sql, true), "{sql}");
        }
        for sql in ["BEGIN", "BEGIN READ ONLY", "SET statement_timeout = '5s'"] {
            assert!(!refused(sql, true), "{sql}");
        }
    }

    #[test]
    fn startup_parameters() {
        let p = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        assert!(check_client_startup(&p("client_encoding", "UTF8")).is_ok());
        assert!(check_client_startup(&p("client_encoding", "utf-8")).is_ok());
        assert!(check_client_startup(&p("application_name", "psql")).is_ok());
        assert!(check_client_startup(&p("client_encoding", "SJIS")).is_err());
        assert!(check_client_startup(&p("options", "-c standard_conforming_strings=off")).is_err());
        assert!(check_client_startup(&p("standard_conforming_strings", "off")).is_err());
        assert!(check_client_startup(&p("default_transaction_read_only", "off")).is_err());
    }

    #[test]
    fn reported_parameters() {
        assert!(check_parameter("client_encoding", "UTF8", false, false).is_ok());
        assert!(check_parameter("client_encoding", "SJIS", false, false).is_err());
        assert!(check_parameter("standard_conforming_strings", "off", true, false).is_err());
        assert!(check_parameter("default_transaction_read_only", "off", true, false).is_err());
        assert!(check_parameter("default_transaction_read_only", "off", false, false).is_ok());
        assert!(check_parameter("TimeZone", "UTC", true, false).is_ok());
        assert!(check_parameter("is_superuser", "on", false, false).is_err());
        assert!(check_parameter("is_superuser", "on", false, true).is_ok());
        assert!(check_parameter("is_superuser", "off", false, false).is_ok());
    }
}
