//! The PostgreSQL gateway with a real PostgreSQL 15 and real `psql`: the agent reads
//! through Airlock with a grant, never holding the database's credential.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;

use crate::gateway::Gateway;
use crate::pg::Postgres;
use crate::support::{runtime, tempdir, test_certificates, text};

const TASK: &str = "confirm migration 42 ran";

/// The `sql.statement` entries of the record, as (text, verdict, params).
pub(crate) fn recorded_statements(gw: &Gateway) -> Vec<(String, String, Value)> {
    text(&gw.cli(&["audit", "tail", "-n", "100000"]))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .inspect(crate::gateway::assert_follows_schema)
        .filter(|e| e["kind"] == "sql.statement")
        .map(|e| {
            (
                e["detail"]["text"].as_str().unwrap().to_string(),
                e["detail"]["verdict"].as_str().unwrap().to_string(),
                e["detail"]["params"].clone(),
            )
        })
        .collect()
}

pub(crate) struct Setup {
    pub(crate) pg: Postgres,
    pub(crate) gw: Gateway,
    pub(crate) token: String,
}

impl Setup {
    pub(crate) fn new() -> Self {
        let pg = Postgres::start();
        let gw = Gateway::prepare("");
        gw.set_upstream_port(pg.port);
        Self::start(pg, gw)
    }

    /// Starts a prepared gateway in front of `pg` and enrolls the agent.
    pub(crate) fn start(pg: Postgres, mut gw: Gateway) -> Self {
        gw.spawn();
        let token = gw.agent("claude", &[]);
        Setup { pg, gw, token }
    }

    /// Asks for a grant; returns (id, secret).
    pub(crate) fn grant(&self, target: &str) -> (String, String) {
        self.grant_for(target, "read")
    }

    /// Asks for a grant with this access; returns (id, secret).
    pub(crate) fn grant_for(&self, target: &str, access: &str) -> (String, String) {
        let (mut status, mut grant) = self.gw.ask(&self.token, target, TASK, access, "10m");
        if status == 202 {
            // Write access to production waits for an operator: approve it, collect it.
            let id = grant["id"].as_str().unwrap().to_string();
            let out = self.gw.cli(&["grants", "approve", &id]);
            assert!(out.status.success(), "{}", text(&out));
            (status, grant) =
                self.gw
                    .http("GET", &format!("/v1/grants/{id}"), Some(&self.token), None);
            assert_eq!(status, 200, "{grant}");
            status = 201;
        }
        assert_eq!(status, 201, "{grant}");
        (
            grant["id"].as_str().unwrap().to_string(),
            grant["secret"].as_str().unwrap().to_string(),
        )
    }

    /// `psql` through the gateway, as the agent would run it.
    pub(crate) fn psql(&self, user: &str, password: &str, database: &str, sql: &str) -> Output {
        self.psql_tls(user, password, database, "sslmode=disable", sql)
    }

    /// `psql` through the gateway with the given TLS settings.
    fn psql_tls(&self, user: &str, password: &str, database: &str, tls: &str, sql: &str) -> Output {
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
                "host=127.0.0.1 port={} user={user} dbname={database} {tls}",
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
    // The result's record entry says which module masked which columns. A result's
    // entry is written when the next statement starts or the session closes, which
    // the gateway sees after psql has exited.
    let masked_by_pii = || {
        s.gw.events("sql.result")
            .iter()
            .flat_map(|e| {
                e["detail"]["masked"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .find(|m| m["module"] == "pii-mask")
    };
    crate::gateway::wait_for("a masked result's record entry", || {
        masked_by_pii().is_some()
    });
    let masked = masked_by_pii().expect("a masked result names its module");
    let columns: Vec<&str> = masked["columns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert!(columns.contains(&"email"), "{masked}");

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
    let statements: Vec<(String, String)> = recorded_statements(&s.gw)
        .into_iter()
        .map(|(text, verdict, _)| (text, verdict))
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
    // A target added at run time must say how its upstream's TLS is verified.
    let out = s.gw.cli(&[
        "target",
        "add",
        "remote-db",
        "--kind",
        "postgres",
        "--upstream",
        "postgres://airlock@db.internal:5432/app",
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("sslmode=verify-full"), "{}", text(&out));
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
        env.contains("export PGUSER='g_")
            && env.contains("export PGPASSWORD='")
            && env.contains("export PGDATABASE='prod-db'"),
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

/// tokio-postgres speaks the extended protocol (Parse/Bind/Execute, pipelined, with
/// binary results): checked at Parse, masked by the portal's formats, recorded per
/// Execute with its parameters.
#[test]
fn tokio_postgres_prepared_statements_are_checked_masked_and_recorded() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    let config = format!(
        "host=127.0.0.1 port={} user={id} password={secret} dbname=prod-db",
        s.gw.pg_port()
    );
    runtime().block_on(async {
        let (mut client, connection) = tokio_postgres::connect(&config, NoTls).await.unwrap();
        let connection = tokio::spawn(connection);
        let by_id = client
            .prepare("SELECT id, email, name FROM users WHERE id = $1")
            .await
            .unwrap();
        let row = client.query_one(&by_id, &[&1i32]).await.unwrap();
        assert_eq!(
            (
                row.get::<_, i32>(0),
                row.get::<_, &str>(1),
                row.get::<_, &str>(2)
            ),
            (1, "***@example.com", "Alice")
        );
        // Pipelined: both are in flight at once.
        let (bob, migrations) = tokio::join!(
            client.query_one(&by_id, &[&2i32]),
            client.query(
                "SELECT id FROM schema_migrations WHERE id > $1 ORDER BY id",
                &[&0i32]
            ),
        );
        assert_eq!(bob.unwrap().get::<_, &str>(1), "***@example.com");
        let ids: Vec<i32> = migrations.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(ids, [41, 42]);

        // Denied at Parse: 42501 with the policy's reason and hint.
        let err = client
            .execute(
                "UPDATE users SET email = $1 WHERE id = $2",
                &[&"x@evil.test", &1i32],
            )
            .await
            .unwrap_err();
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
        assert!(
            db.message()
                .contains("read-only grant: UPDATE writes to users"),
            "{db:?}"
        );
        assert!(
            db.hint().is_some_and(|h| h.contains("access=write")),
            "{db:?}"
        );
        let err = client.prepare("SELECT 1; SELECT 2").await.unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
        // COPY FROM is a write.
        let err = client
            .copy_in::<_, bytes::Bytes>("COPY users FROM STDIN")
            .await
            .err()
            .expect("COPY FROM is refused");
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{err}");

        // A denial inside a transaction aborts it, as PostgreSQL would.
        let tx = client.transaction().await.unwrap();
        let n: i64 = tx
            .query_one("SELECT count(*) FROM users", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 2);
        let err = tx
            .execute("DELETE FROM users WHERE id = $1", &[&1i32])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
        let err = tx.query_one("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
            "{err}"
        );
        tx.rollback().await.unwrap();

        // The session goes on.
        let row = client.query_one(&by_id, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, &str>(2), "Alice");

        // SQL-level DEALLOCATE (or PREPARE, DISCARD) can drop or replace statements
        // under the names Parse used: the gateway forgets its own, so a Bind never runs
        // under another statement's verdict, record entry or row shape.
        client.batch_execute("DEALLOCATE ALL").await.unwrap();
        let err = client.query_one(&by_id, &[&1i32]).await.unwrap_err();
        assert_eq!(
            err.code(),
            Some(&SqlState::INVALID_SQL_STATEMENT_NAME),
            "{err}"
        );
        assert!(
            err.as_db_error()
                .is_some_and(|e| e.message().contains("through this gateway")),
            "{err}"
        );
        let by_id = client
            .prepare("SELECT id, email, name FROM users WHERE id = $1")
            .await
            .unwrap();
        let row = client.query_one(&by_id, &[&2i32]).await.unwrap();
        assert_eq!(row.get::<_, &str>(1), "***@example.com");
        drop(client);
        connection.await.unwrap().unwrap();
    });
    assert_eq!(
        s.pg.psql_super("SELECT email FROM users WHERE id = 1", "app")
            .trim(),
        "alice@example.com"
    );
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );

    let statements = recorded_statements(&s.gw);
    let select = "SELECT id, email, name FROM users WHERE id = $1";
    // Each Execute is its own entry, with its (binary int4) parameter.
    for param in ["\\x00000001", "\\x00000002"] {
        assert!(
            statements
                .iter()
                .any(|(t, v, p)| t == select && v == "allow" && *p == serde_json::json!([param])),
            "{param}: {statements:?}"
        );
    }
    assert!(
        statements
            .iter()
            .any(|(t, v, _)| t == "UPDATE users SET email = $1 WHERE id = $2" && v == "deny")
    );
    assert!(
        statements
            .iter()
            .any(|(t, v, _)| t == "COPY users FROM STDIN" && v == "deny")
    );
    assert!(
        statements
            .iter()
            .any(|(t, v, _)| t == "SELECT 1; SELECT 2" && v == "deny")
    );
    let out = s.gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn tls_from_the_client_and_verified_tls_to_the_upstream() {
    let certs = tempdir();
    let (upstream_ca, upstream_cert, upstream_key) = test_certificates(certs.path(), "upstream");
    let (gateway_ca, gateway_cert, gateway_key) = test_certificates(certs.path(), "gateway");
    let pg = Postgres::start_tls(&upstream_cert, &upstream_key);
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    let port = pg.port;
    let plain_upstream = format!("127.0.0.1:{port}/app\"");
    let tls_upstream = |ca: &std::path::Path| {
        format!(
            "127.0.0.1:{port}/app?sslmode=verify-full&sslrootcert={}\"",
            ca.display()
        )
    };
    gw.edit_config(&plain_upstream, &tls_upstream(&upstream_ca));
    gw.edit_config(
        "[postgres]\nlisten = \"127.0.0.1:0\"",
        &format!(
            "[postgres]\nlisten = \"127.0.0.1:0\"\ntls-cert = {gateway_cert:?}\ntls-key = {gateway_key:?}\nrequire-tls = true"
        ),
    );
    let mut s = Setup::start(pg, gw);
    let (id, secret) = s.grant("prod-db");
    let verify = format!("sslmode=verify-full sslrootcert={}", gateway_ca.display());

    // The client verifies the gateway; the gateway's upstream session is TLS too.
    let out = s.psql_tls(
        &id,
        &secret,
        "prod-db",
        &verify,
        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "t");

    // Plain text is refused, saying why.
    let out = s.psql(&id, &secret, "prod-db", "SELECT 1");
    assert!(!out.status.success());
    assert!(text(&out).contains("over TLS only"), "{}", text(&out));

    // An upstream whose certificate the configured CA did not sign is refused.
    s.gw.stop(false);
    s.gw.edit_config(&tls_upstream(&upstream_ca), &tls_upstream(&gateway_ca));
    s.gw.spawn();
    let out = s.psql_tls(&id, &secret, "prod-db", &verify, "SELECT 1");
    assert!(!out.status.success());
    let err = text(&out);
    assert!(
        err.contains("TLS to the upstream") && err.contains("certificate"),
        "{err}"
    );
}

/// The `batched` durability mode: entries are queued before each statement runs and
/// made durable by the next group commit; when the record fails, every session is cut.
#[test]
fn batched_durability_records_every_statement_and_a_record_failure_cuts_sessions() {
    let pg = Postgres::start();
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    gw.edit_config(
        "checkpoint-interval = \"1s\"",
        "checkpoint-interval = \"1s\"\ndurability = \"batched\"",
    );
    let s = Setup::start(pg, gw);
    let (id, secret) = s.grant("prod-db");
    let config = format!(
        "host=127.0.0.1 port={} user={id} password={secret} dbname=prod-db",
        s.gw.pg_port()
    );
    let select = "SELECT email FROM users WHERE id = $1";
    let ended = runtime().block_on(async {
        let (client, connection) = tokio_postgres::connect(&config, NoTls).await.unwrap();
        let connection = tokio::spawn(connection);
        for _ in 0..50 {
            let row = client.query_one(select, &[&1i32]).await.unwrap();
            assert_eq!(row.get::<_, &str>(0), "***@example.com");
        }
        let recorded = (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            recorded_statements(&s.gw)
                .iter()
                .filter(|(t, _, _)| t == select)
                .count()
                == 50
        });
        assert!(recorded, "all 50 statements are in the record");

        // Every further write to the store fails, as on a full disk.
        let limit = Command::new("prlimit")
            .args(["--pid", &s.gw.pid().to_string(), "--fsize=1"])
            .status()
            .unwrap();
        assert!(limit.success());
        let mut errors = Vec::new();
        for _ in 0..50 {
            match client.query_one(select, &[&1i32]).await {
                Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    errors.push(format!("{e:?}"));
                    break;
                }
            }
        }
        errors.push(format!("{:?}", connection.await.unwrap()));
        errors.join("\n")
    });
    assert!(
        ended.contains("record is unavailable") || ended.contains("record unavailable"),
        "{ended}"
    );
    // No new session starts while nothing can be recorded.
    let out = s.psql(&id, &secret, "prod-db", "SELECT 1");
    assert!(!out.status.success(), "{}", text(&out));
}

/// Where no masking module applies, rows pass through untouched and COPY TO is an
/// ordinary read; COPY FROM stays a write.
#[test]
fn without_masking_rows_pass_untouched_and_copy_to_is_a_read() {
    let pg = Postgres::start();
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    gw.install_bundle_without("pii-mask");
    let s = Setup::start(pg, gw);
    let (id, secret) = s.grant("prod-db");
    let stdout = |out: &Output| String::from_utf8_lossy(&out.stdout).trim().to_string();

    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "SELECT email FROM users WHERE id = 1",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "alice@example.com");

    let out = s.psql(&id, &secret, "prod-db", "COPY users TO STDOUT");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out),
        "1\talice@example.com\tAlice\n2\tbob@example.com\tBob"
    );

    let out = s.psql(&id, &secret, "prod-db", "COPY users FROM STDIN");
    assert!(!out.status.success());
    assert!(text(&out).contains("42501"), "{}", text(&out));
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );
    let statements = recorded_statements(&s.gw);
    assert!(
        statements
            .iter()
            .any(|(t, v, _)| t == "COPY users TO STDOUT" && v == "allow")
    );
    assert!(
        statements
            .iter()
            .any(|(t, v, _)| t == "COPY users FROM STDIN" && v == "deny")
    );
}

/// A bare v3 protocol client, logged in with SCRAM (postgres-protocol's client side),
/// for sending what no driver would.
pub(crate) struct Raw(std::net::TcpStream);

impl Raw {
    pub(crate) fn login(port: u16, user: &str, secret: &str) -> Self {
        Self::login_with(port, user, secret, &[])
            .unwrap_or_else(|e| panic!("login refused: {}", String::from_utf8_lossy(&e)))
    }

    /// Logs in with extra startup parameters; `Err` is the ErrorResponse's body.
    pub(crate) fn login_with(
        port: u16,
        user: &str,
        secret: &str,
        params: &[(&str, &str)],
    ) -> Result<Self, Vec<u8>> {
        use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
        let stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut raw = Raw(stream);
        let mut startup = Vec::new();
        startup.extend_from_slice(&196_608i32.to_be_bytes());
        // The target is `prod-db` unless the parameters name another.
        let database: &[(&str, &str)] = if params.iter().any(|(k, _)| *k == "database") {
            &[]
        } else {
            &[("database", "prod-db")]
        };
        let params = database.iter().chain(params).flat_map(|(k, v)| [*k, *v]);
        for s in ["user", user].into_iter().chain(params) {
            startup.extend_from_slice(s.as_bytes());
            startup.push(0);
        }
        startup.push(0);
        let mut packet = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend_from_slice(&startup);
        raw.write(&packet);
        let mut scram = ScramSha256::new(secret.as_bytes(), ChannelBinding::unsupported());
        loop {
            let (tag, body) = raw.read();
            match (
                tag,
                body.get(..4)
                    .map(|k| i32::from_be_bytes(k.try_into().unwrap())),
            ) {
                (b'R', Some(10)) => {
                    let mut first = b"SCRAM-SHA-256\0".to_vec();
                    first.extend_from_slice(&(scram.message().len() as i32).to_be_bytes());
                    first.extend_from_slice(scram.message());
                    raw.send(b'p', &first);
                }
                (b'R', Some(11)) => {
                    scram.update(&body[4..]).unwrap();
                    let next = scram.message().to_vec();
                    raw.send(b'p', &next);
                }
                (b'R', Some(12)) => scram.finish(&body[4..]).unwrap(),
                (b'Z', _) => return Ok(raw),
                (b'E', _) => return Err(body),
                _ => {}
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) {
        use std::io::Write;
        self.0.write_all(bytes).unwrap();
    }

    pub(crate) fn send(&mut self, tag: u8, body: &[u8]) {
        let mut message = vec![tag];
        message.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        message.extend_from_slice(body);
        self.write(&message);
    }

    pub(crate) fn read(&mut self) -> (u8, Vec<u8>) {
        self.read_or_closed()
            .expect("the gateway closed the connection")
    }

    /// The next message, or `None` once the gateway has closed the connection.
    pub(crate) fn read_or_closed(&mut self) -> Option<(u8, Vec<u8>)> {
        use std::io::Read;
        let mut header = [0u8; 5];
        self.0.read_exact(&mut header).ok()?;
        let len = i32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
        let mut body = vec![0; len - 4];
        self.0.read_exact(&mut body).ok()?;
        Some((header[0], body))
    }

    /// Reads until the gateway closes the connection; returns the last ErrorResponse
    /// on the way (the FATAL that closed it), as text.
    pub(crate) fn fatal_until_closed(&mut self) -> String {
        let mut fatal = None;
        while let Some((tag, body)) = self.read_or_closed() {
            if tag == b'E' {
                fatal = Some(body);
            }
        }
        String::from_utf8_lossy(&fatal.expect("a FATAL")).into_owned()
    }

    /// Reads up to ReadyForQuery; returns the SQLSTATEs of the errors on the way.
    pub(crate) fn errors_until_ready(&mut self) -> Vec<String> {
        let mut codes = Vec::new();
        loop {
            match self.read() {
                (b'Z', _) => return codes,
                (b'E', body) => codes.push(sqlstate(&body)),
                _ => {}
            }
        }
    }
}

pub(crate) fn sqlstate(error: &[u8]) -> String {
    error
        .split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"C"))
        .map(|code| String::from_utf8_lossy(code).into_owned())
        .unwrap_or_default()
}

pub(crate) fn cstrs(parts: &[&str]) -> Vec<u8> {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain(std::iter::once(0)))
        .collect()
}

/// Malformed, out-of-order and oversized extended-protocol input: a clear error each
/// time, the session goes on where PostgreSQL's would, and other sessions are served.
#[test]
fn malformed_extended_protocol_input_gets_clear_errors() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    let mut raw = Raw::login(s.gw.pg_port(), &id, &secret);
    let sync = |raw: &mut Raw| raw.send(b'S', &[]);

    // A Bind cut short.
    raw.send(b'B', b"portal\0");
    sync(&mut raw);
    assert_eq!(raw.errors_until_ready(), ["08P01"]);
    // Execute of a portal that does not exist; Bind of a statement never prepared.
    raw.send(b'E', &[b"nope\0".as_slice(), &0i32.to_be_bytes()].concat());
    sync(&mut raw);
    assert_eq!(raw.errors_until_ready(), ["34000"]);
    raw.send(b'B', &[cstrs(&["", "never"]), vec![0; 6]].concat());
    sync(&mut raw);
    assert_eq!(raw.errors_until_ready(), ["26000"]);
    // A fastpath function call is never relayed.
    raw.send(b'F', &[0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(raw.errors_until_ready(), ["42501"]);
    // After an error the rest of a batch is skipped up to Sync, as PostgreSQL does:
    // the denied Parse's Execute never runs, and the session answers the next batch.
    raw.send(
        b'P',
        &[cstrs(&["", "DELETE FROM users"]), vec![0, 0]].concat(),
    );
    raw.send(b'H', &[]);
    raw.send(b'B', &[cstrs(&["", ""]), vec![0; 6]].concat());
    raw.send(b'E', &[b"\0".as_slice(), &0i32.to_be_bytes()].concat());
    sync(&mut raw);
    assert_eq!(raw.errors_until_ready(), ["42501"]);
    raw.send(b'Q', &cstrs(&["SELECT count(*) FROM users"]));
    let mut rows = Vec::new();
    loop {
        match raw.read() {
            (b'D', body) => rows.push(String::from_utf8_lossy(&body[6..]).into_owned()),
            (b'Z', _) => break,
            (b'E', body) => panic!("{}", String::from_utf8_lossy(&body)),
            _ => {}
        }
    }
    assert_eq!(rows, ["2"]);

    // More than the batch limit (64 MiB) without a Sync: FATAL, and the connection
    // closes. Exactly enough is sent to pass the limit, so the gateway has read it all.
    let big = [cstrs(&["", &" ".repeat(1 << 20)]), vec![0, 0]].concat();
    for _ in 0..64 {
        raw.send(b'P', &big);
    }
    let (tag, body) = raw.read();
    assert_eq!((tag, sqlstate(&body)), (b'E', "54000".to_string()));

    assert!(
        recorded_statements(&s.gw)
            .iter()
            .any(|(t, v, _)| t == "(fastpath function call)" && v == "deny")
    );
    // The gateway goes on serving.
    let out = s.psql(&id, &secret, "prod-db", "SELECT count(*) FROM users");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );
}
