//! The PostgreSQL gateway with a real PostgreSQL 15 and real `psql`: the agent reads
//! through Airlock with a grant, never holding the database's credential.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::gateway::Gateway;
use crate::pg::Postgres;
use crate::support::text;

const TASK: &str = "confirm migration 42 ran";

struct Setup {
    pg: Postgres,
    gw: Gateway,
    token: String,
}

impl Setup {
    fn new() -> Self {
        let pg = Postgres::start();
        let mut gw = Gateway::prepare("");
        gw.set_upstream_port(pg.port);
        gw.spawn();
        let token = gw.agent("claude", &[]);
        Setup { pg, gw, token }
    }

    /// Asks for a grant; returns (id, secret).
    fn grant(&self, target: &str) -> (String, String) {
        let (status, grant) = self.gw.ask(&self.token, target, TASK, "read", "10m");
        assert_eq!(status, 201, "{grant}");
        (
            grant["id"].as_str().unwrap().to_string(),
            grant["secret"].as_str().unwrap().to_string(),
        )
    }

    /// `psql` through the gateway, as the agent would run it.
    fn psql(&self, user: &str, password: &str, database: &str, sql: &str) -> Output {
        Command::new("psql")
            .env("PGPASSWORD", password)
            .env("PGCONNECT_TIMEOUT", "10")
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-v",
                "VERBOSITY=verbose",
            ])
            .arg(format!(
                "host=127.0.0.1 port={} user={user} dbname={database} sslmode=disable",
                self.gw.pg_port()
            ))
            .args(["-c", sql])
            .output()
            .unwrap()
    }
}

#[test]
fn an_agent_reads_through_the_gateway_and_policy_decides_every_statement() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");

    // The worked example: the migration check.
    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "SELECT id FROM schema_migrations WHERE id = 42",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    // Rows come back masked.
    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "SELECT id, email, name FROM users ORDER BY id",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "1|***@example.com|Alice\n2|***@example.com|Bob"
    );

    // An UPDATE under a read grant: 42501 with the policy's reason and hint; the row
    // is unchanged upstream.
    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "UPDATE users SET email = 'x' WHERE id = 1",
    );
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("ERROR:  42501: read-only grant: UPDATE writes to users"),
        "{err}"
    );
    assert!(
        err.contains("HINT:  ask for a grant with access=write"),
        "{err}"
    );
    assert_eq!(
        s.pg.psql_super("SELECT email FROM users WHERE id = 1", "app")
            .trim(),
        "alice@example.com"
    );

    // Two statements in one Query: one denied, so neither runs.
    let out = s.psql(&id, &secret, "prod-db", "SELECT 1; DELETE FROM users");
    assert!(!out.status.success());
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );

    // Inside a transaction the denial aborts it, as PostgreSQL would.
    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "BEGIN; SELECT 1; DELETE FROM users; COMMIT;",
    );
    assert!(!out.status.success());
    let out = Command::new("psql")
        .env("PGPASSWORD", &secret)
        .args(["-X", "-At", "-v", "VERBOSITY=verbose"])
        .arg(format!(
            "host=127.0.0.1 port={} user={id} dbname=prod-db sslmode=disable",
            s.gw.pg_port()
        ))
        .args([
            "-c",
            "BEGIN",
            "-c",
            "DELETE FROM users",
            "-c",
            "SELECT 1",
            "-c",
            "ROLLBACK",
        ])
        .output()
        .unwrap();
    let err = text(&out);
    assert!(err.contains("42501"), "{err}");
    assert!(
        err.contains("25P02"),
        "the transaction is aborted after the denial: {err}"
    );
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );

    // COPY TO bypasses masking, so it is refused where masking applies.
    let out = s.psql(&id, &secret, "prod-db", "COPY users TO STDOUT");
    assert!(
        text(&out).contains("COPY TO is not masked"),
        "{}",
        text(&out)
    );

    // A syntax error is refused by the gateway's own parser.
    let out = s.psql(&id, &secret, "prod-db", "SELEC 1");
    assert!(text(&out).contains("42601"), "{}", text(&out));

    // Every statement is in the record, and it verifies.
    let tail = text(&s.gw.cli(&["audit", "tail", "-n", "200"]));
    let statements: Vec<(String, String)> = tail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "sql.statement")
        .map(|e| {
            (
                e["detail"]["text"].as_str().unwrap().to_string(),
                e["detail"]["verdict"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(statements.contains(&(
        "SELECT id FROM schema_migrations WHERE id = 42".into(),
        "allow".into()
    )));
    assert!(statements.contains(&(
        "UPDATE users SET email = 'x' WHERE id = 1".into(),
        "deny".into()
    )));
    assert!(statements.contains(&("DELETE FROM users".into(), "deny".into())));
    // Refusals by the gateway itself are recorded as denials too.
    assert!(statements.contains(&("COPY users TO STDOUT".into(), "deny".into())));
    assert!(statements.contains(&("SELEC 1".into(), "deny".into())));
    assert!(tail.contains("\"session.opened\"") && tail.contains("\"session.closed\""));
    let results: Vec<Value> = tail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "sql.result")
        .collect();
    assert!(
        results.iter().any(
            |r| r["detail"]["commands"] == serde_json::json!(["SELECT 2"])
                && r["detail"]["rows"] == 2
        ),
        "the masked SELECT's summary is recorded: {results:?}"
    );

    // Sessions: listed, and shown with their statements in order.
    let sessions: Value = serde_json::from_slice(&s.gw.cli(&["sessions", "list"]).stdout).unwrap();
    let sessions = sessions.as_array().unwrap();
    assert!(sessions.len() >= 6, "{sessions:?}");
    assert!(
        sessions
            .iter()
            .all(|s| s["target"] == "prod-db" && s["grant"] == serde_json::json!(id))
    );
    let update = sessions
        .iter()
        .find(|session| {
            let shown = text(
                &s.gw
                    .cli(&["sessions", "show", session["id"].as_str().unwrap()]),
            );
            shown.contains("UPDATE users SET email")
        })
        .expect("the session of the denied UPDATE");
    assert!(update["closed_ms"].is_u64());
    let out = s.gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn wrong_secrets_unknown_targets_and_ended_grants_are_refused() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    let out = s.psql(&id, "wrong-secret", "prod-db", "SELECT 1");
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    let out = s.psql("g_0000000000000000", &secret, "prod-db", "SELECT 1");
    assert!(
        text(&out).contains("password authentication failed"),
        "{}",
        text(&out)
    );
    let out = s.psql(&id, &secret, "no-such-db", "SELECT 1");
    assert!(
        text(&out).contains("3D000") || text(&out).contains("does not exist"),
        "{}",
        text(&out)
    );
    // A grant for staging-db does not open prod-db.
    let (other_id, other_secret) = s.grant("staging-db");
    let out = s.psql(&other_id, &other_secret, "prod-db", "SELECT 1");
    assert!(
        text(&out).contains("this grant is for target `staging-db`"),
        "{}",
        text(&out)
    );
    // The agent's own credential never works as a database password.
    let out = s.psql(&id, &s.token, "prod-db", "SELECT 1");
    assert!(!out.status.success());

    // Revoked mid-query: the session is cut with a FATAL saying why.
    let pg_port = s.gw.pg_port();
    let (id2, secret2) = (id.clone(), secret.clone());
    let session = std::thread::spawn(move || {
        Command::new("psql")
            .env("PGPASSWORD", secret2)
            .args(["-X", "-At", "-v", "VERBOSITY=verbose"])
            .arg(format!(
                "host=127.0.0.1 port={pg_port} user={id2} dbname=prod-db sslmode=disable"
            ))
            .args(["-c", "SELECT count(*) FROM generate_series(1, 300000000)"])
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(s.gw.cli(&["grants", "revoke", &id]).status.success());
    let out = session.join().unwrap();
    let err = text(&out);
    assert!(
        err.contains("57P01") && err.contains("was revoked"),
        "{err}"
    );
    let out = s.psql(&id, &secret, "prod-db", "SELECT 1");
    assert!(text(&out).contains("has ended"), "{}", text(&out));
}

#[test]
fn malformed_startup_and_garbage_get_errors_and_the_gateway_keeps_serving() {
    use std::io::{Read, Write};
    let s = Setup::new();
    let port = s.gw.pg_port();
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0, 0, 0, 8, 0, 9, 0, 0][..],
        &[0x7f, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 3][..],
    ] {
        let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(garbage).unwrap();
        let mut reply = Vec::new();
        let _ = conn.read_to_end(&mut reply);
        assert!(
            reply.is_empty() || reply[0] == b'E',
            "{garbage:?} → {reply:?}"
        );
    }
    let (id, secret) = s.grant("prod-db");
    let out = s.psql(&id, &secret, "prod-db", "SELECT count(*) FROM users");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
}

#[test]
fn airlock_connect_runs_psql_with_the_grant_and_waits_for_review() {
    let s = Setup::new();
    let connect = |args: &[&str]| {
        crate::support::airlock()
            .env("AIRLOCK_TOKEN", &s.token)
            .env("AIRLOCK_URL", format!("http://127.0.0.1:{}", s.gw.port))
            .arg("connect")
            .args(args)
            .output()
            .unwrap()
    };
    // The worked example, end to end.
    let out = connect(&[
        "prod-db",
        "--task",
        TASK,
        "--",
        "-X",
        "-At",
        "-c",
        "SELECT id FROM schema_migrations WHERE id = 42",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "42");

    let out = connect(&["prod-db", "--task", TASK, "--print-env"]);
    let env = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        env.contains("export PGUSER=g_")
            && env.contains("export PGPASSWORD=")
            && env.contains("export PGDATABASE=prod-db"),
        "{env}"
    );

    // Denied: the policy's reason and hint, and no client runs.
    let out = connect(&["prod-db", "--task", "x"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("hint: describe the task"),
        "{}",
        text(&out)
    );

    // Write access to prod waits for an operator, then works.
    let (port, token) = (s.gw.port, s.token.clone());
    let waiting = std::thread::spawn(move || {
        crate::support::airlock()
            .env("AIRLOCK_TOKEN", token)
            .env("AIRLOCK_URL", format!("http://127.0.0.1:{port}"))
            .args([
                "connect",
                "prod-db",
                "--access",
                "write",
                "--task",
                "fix the broken name of user 1",
            ])
            .args([
                "--",
                "-X",
                "-At",
                "-c",
                "UPDATE users SET name = 'Alicia' WHERE id = 1",
            ])
            .output()
            .unwrap()
    });
    let mut pending = None;
    for _ in 0..200 {
        let list: Value =
            serde_json::from_slice(&s.gw.cli(&["grants", "list"]).stdout).unwrap_or(Value::Null);
        pending = list.as_array().and_then(|grants| {
            grants
                .iter()
                .find(|g| g["status"] == "pending")
                .map(|g| g["id"].as_str().unwrap().to_string())
        });
        if pending.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let pending = pending.expect("the write grant waits for review");
    assert!(s.gw.cli(&["grants", "approve", &pending]).status.success());
    let out = waiting.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("needs an operator's approval"),
        "{}",
        text(&out)
    );
    assert_eq!(
        s.pg.psql_super("SELECT name FROM users WHERE id = 1", "app")
            .trim(),
        "Alicia"
    );
}

#[test]
fn cancel_reaches_the_upstream_query() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    let child = Command::new("psql")
        .env("PGPASSWORD", &secret)
        .args(["-X", "-At", "-v", "VERBOSITY=verbose"])
        .arg(format!(
            "host=127.0.0.1 port={} user={id} dbname=prod-db sslmode=disable",
            s.gw.pg_port()
        ))
        .args(["-c", "SELECT count(*) FROM generate_series(1, 400000000)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    // psql answers SIGINT with a CancelRequest on a new connection, carrying the key
    // the gateway gave it.
    assert!(
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    let err = text(&out);
    assert!(
        err.contains("57014") && err.contains("canceling statement due to user request"),
        "{err}"
    );
    // The session is still usable afterwards, on a new connection as psql makes one.
    let out = s.psql(&id, &secret, "prod-db", "SELECT 1");
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn a_million_rows_stream_through_masking_with_bounded_memory() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "SELECT i, 'user' || i || '@example.com' AS email FROM generate_series(1, 1000000) i",
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("1|***@example.com"));
    assert_eq!(stdout.lines().count(), 1_000_000);
    assert!(!stdout.contains("user77@"), "every row is masked");
    // Rows stream in batches: the gateway's peak memory stays far below the result
    // (~35 MB of text). A generous bound, not a speed claim.
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.gw.pid())).unwrap();
    let peak_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(peak_kb < 400 * 1024, "gateway peak RSS {peak_kb} kB");
}
