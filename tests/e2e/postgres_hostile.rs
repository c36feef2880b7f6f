//! A hostile agent against the PostgreSQL gateway, with a real PostgreSQL 15: every test
//! asserts what happened upstream (rows, sequences, settings), not only what the client
//! was told.

use std::io::{Read, Write as _};
use std::net::TcpListener;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;

use crate::gateway::{Gateway, wait_for};
use crate::pg::Postgres;
use crate::postgres::{Raw, Setup, cstrs, recorded_statements, sqlstate};
use crate::support::text;

/// The SQLSTATE of psql's (verbose) error output, or "" when it succeeded.
fn failure(out: &Output) -> String {
    let err = text(out);
    err.split("ERROR:  ")
        .nth(1)
        .or_else(|| err.split("FATAL:  ").nth(1))
        .map(|rest| rest.chars().take(5).collect())
        .unwrap_or_default()
}

fn events(gw: &Gateway, kind: &str) -> Vec<Value> {
    gw.events(kind)
}

impl Raw {
    /// A simple Query: the first column of each row, or the first error's SQLSTATE
    /// (also when the gateway then closes the connection, as after a FATAL).
    pub(crate) fn simple(&mut self, sql: &[u8]) -> Result<Vec<String>, String> {
        self.send(b'Q', &[sql, b"\0"].concat());
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read_or_closed() {
                Some((b'D', body)) => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    rows.push(String::from_utf8_lossy(&body[6..6 + len.max(0) as usize]).into());
                }
                Some((b'E', body)) => error = error.or(Some(sqlstate(&body))),
                Some((b'Z', _)) => return error.map_or(Ok(rows), Err),
                Some(_) => {}
                None => return Err(error.unwrap_or_else(|| "closed".into())),
            }
        }
    }
}

/// A gateway in front of a PostgreSQL holding `flip()`: a function an earlier
/// migration left behind, which flips a lexing setting for the whole session when
/// called.
pub(crate) fn setup_with_flip() -> Setup {
    let pg = Postgres::start();
    pg.psql_super(
        "CREATE FUNCTION flip() RETURNS text LANGUAGE sql \
         AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$; \
         ALTER FUNCTION flip() OWNER TO airlock;",
        "app",
    );
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    Setup::start(pg, gw)
}

/// The lexing the gateway parses with is the lexing the server runs with: nothing can
/// change the encoding or the meaning of a backslash, and a server that reports
/// otherwise ends the session.
#[test]
fn the_server_reads_statements_as_the_gateway_decided_them() {
    let s = setup_with_flip();
    let (id, secret) = s.grant_for("prod-db", "write");
    let port = s.gw.pg_port();

    // A client may not ask for another encoding or pass settings in `options`.
    for params in [
        [("client_encoding", "SJIS")],
        [("options", "-c standard_conforming_strings=off")],
        [("standard_conforming_strings", "off")],
    ] {
        let refused = Raw::login_with(port, &id, &secret, &params).err().unwrap();
        assert_eq!(sqlstate(&refused), "22023", "{params:?}");
    }
    assert!(Raw::login_with(port, &id, &secret, &[("client_encoding", "UTF8")]).is_ok());

    // A Query is one string: bytes after its NUL are not relayed unread (the record
    // and the policy would see only the first part).
    let mut raw = Raw::login(port, &id, &secret);
    raw.send(b'Q', b"SELECT 1\0; DROP TABLE users\0");
    let fatal = raw.fatal_until_closed();
    assert!(fatal.contains("08P01"), "{fatal}");
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );

    // No statement changes them, however it is spelled, even under a write grant.
    for sql in [
        "SET client_encoding = 'SJIS'",
        "SET NAMES 'SJIS'",
        "set local standard_conforming_strings to off",
        "SELECT set_config('standard_conforming_strings', 'off', false)",
        "SELECT set_config(name, 'off', false) FROM pg_settings LIMIT 1",
        "ALTER ROLE airlock SET client_encoding = 'SJIS'",
    ] {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert_eq!(failure(&out), "42501", "{sql}: {}", text(&out));
    }
    assert_eq!(
        s.pg.psql_super(
            "SELECT count(*) FROM pg_db_role_setting WHERE setrole = 'airlock'::regrole",
            "app"
        )
        .trim(),
        "0"
    );

    // The SJIS disguise: 0x95 0x5c is one character in SJIS, but 0x5c alone is a
    // backslash, so under SJIS with backslash escapes this hides a DELETE. Sent as it
    // is, it is not UTF-8: refused with 22021, and nothing ran.
    let mut raw = Raw::login(port, &id, &secret);
    assert_eq!(
        raw.simple(b"SET client_encoding = 'SJIS'"),
        Err("42501".into())
    );
    let disguised = b"SELECT '\x95\x5c'' ; DELETE FROM users; --'";
    assert_eq!(raw.simple(disguised), Err("22021".into()));
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );

    // Invalid UTF-8 gets PostgreSQL's 22021, and the session goes on, in both protocols.
    assert_eq!(raw.simple(b"SELECT '\xff\xfe'"), Err("22021".into()));
    raw.send(
        b'P',
        &[b"\0SELECT '\x81\x5c'\0".as_slice(), &[0, 0]].concat(),
    );
    raw.send(b'S', &[]);
    assert_eq!(raw.errors_until_ready(), ["22021"]);
    assert_eq!(raw.simple(b"SELECT 7"), Ok(vec!["7".into()]));

    // A function that flips a lexing setting from inside: the upstream reports the
    // change, and the session ends before another statement is read, recorded.
    raw.send(b'Q', b"SELECT flip()\0");
    let fatal = raw.fatal_until_closed();
    assert!(
        fatal.contains("FATAL") && fatal.contains("standard_conforming_strings"),
        "{fatal}"
    );
    let broken = events(&s.gw, "sql.pin-broken");
    assert_eq!(broken.len(), 1, "{broken:?}");
    assert_eq!(
        broken[0]["detail"]["parameter"],
        "standard_conforming_strings"
    );
    let out = s.gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Restarts the gateway with the `reader` role (password `reader-password`) as the
/// prod-db target's read role.
fn use_read_role(s: &mut Setup) {
    s.gw.stop(false);
    s.gw.edit_config(
        "credential = \"secret:prod-db\"",
        "credential = \"secret:prod-db\"\nread-user = \"reader\"\nread-credential = \"secret:reader\"",
    );
    let secrets = s.gw.data().join("secrets.toml");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&secrets)
        .unwrap();
    writeln!(file, "reader = \"reader-password\"").unwrap();
    s.gw.restart();
}

/// What a read grant tries in order to write, with the SQLSTATE it gets: policy refuses
/// what the catalog says may write (42501); what it lets through because a function's
/// declaration says it only reads, the server refuses (25006).
const WRITES_A_READ_GRANT_TRIES: &[(&str, &str)] = &[
    ("SELECT wipe()", "42501"),
    ("SELECT wipe_plpgsql()", "42501"),
    ("EXPLAIN ANALYZE SELECT wipe()", "42501"),
    (
        "BEGIN; DECLARE c CURSOR FOR SELECT wipe(); FETCH c; COMMIT",
        "42501",
    ),
    (
        "SELECT query_to_xml('select nextval(''order_ids'')', true, true, '')",
        "42501",
    ),
    ("SELECT id FROM users FOR UPDATE", "42501"),
    ("SELECT lo_from_bytea(0, 'x')", "42501"),
    ("SELECT pg_try_advisory_lock(1)", "42501"),
    ("SELECT pg_notify('c', 'x')", "42501"),
    // A function called by field notation: `u.touch_lock` is touch_lock(u).
    ("SELECT u.touch_lock FROM users u", "42501"),
    ("SELECT (u).touch_lock FROM users u", "42501"),
    // Field notation reaches functions whose other arguments have defaults.
    ("SELECT (1::int4).pg_terminate_backend", "42501"),
    // xml2's xpath_table builds and runs a query from its text arguments.
    (
        "SELECT * FROM xpath_table('id', '''<a/>''', 'users', '/a', 'true; SELECT pg_advisory_lock(777)') AS t(id text, x text)",
        "42501",
    ),
    // Stable, yet assigns a transaction id.
    ("SELECT txid_current()", "42501"),
    // Limits set by the database's owner can be tightened, not lifted.
    ("SET statement_timeout = 0", "42501"),
    ("SET idle_in_transaction_session_timeout = '10h'", "42501"),
    ("SET statement_timeout = '.4'", "42501"),
    ("SELECT bump()", "25006"),
    (
        "BEGIN; DECLARE c CURSOR FOR SELECT bump(); FETCH c; COMMIT",
        "25006",
    ),
];

/// What a read grant tries in order to lift read-only: refused by the gateway.
const LIFTS_A_READ_GRANT_TRIES: &[(&str, &str)] = &[
    ("BEGIN READ WRITE", "42501"),
    (
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "42501",
    ),
    ("BEGIN; SET TRANSACTION READ WRITE", "42501"),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "42501",
    ),
    ("SET default_transaction_read_only = off", "42501"),
    (
        "SELECT set_config('transaction_read_only', 'off', true)",
        "42501",
    ),
    ("RESET ALL", "42501"),
    ("SET ROLE postgres", "42501"),
    ("SET SESSION AUTHORIZATION postgres", "42501"),
];

/// A read grant is read-only at the server: writes the policy never saw (inside
/// functions, through cursors, EXPLAIN ANALYZE, SQL run from strings) fail with
/// PostgreSQL's own 25006, and nothing lifts the read-only default.
#[test]
fn a_read_grant_is_read_only_at_the_server() {
    let pg = Postgres::start();
    pg.psql_super(
        "CREATE SEQUENCE order_ids; \
         CREATE FUNCTION wipe() RETURNS int LANGUAGE sql \
           AS $$ DELETE FROM users RETURNING 1 $$; \
         CREATE FUNCTION wipe_plpgsql() RETURNS int LANGUAGE plpgsql \
           AS $$ BEGIN DELETE FROM users; RETURN 1; END $$; \
         CREATE EXTENSION xml2; \
         CREATE FUNCTION touch_lock(u users) RETURNS bigint LANGUAGE sql VOLATILE \
           AS $$ SELECT pg_advisory_lock(424242); SELECT 1::bigint $$; \
         CREATE FUNCTION bump() RETURNS bigint LANGUAGE sql STABLE \
           AS $$ SELECT nextval('order_ids') $$; \
         ALTER SEQUENCE order_ids OWNER TO airlock; \
         ALTER FUNCTION wipe() OWNER TO airlock; \
         ALTER FUNCTION wipe_plpgsql() OWNER TO airlock; \
         CREATE ROLE reader LOGIN PASSWORD 'reader-password'; \
         GRANT SELECT ON users, schema_migrations TO reader;",
        "app",
    );
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    let s = Setup::start(pg, gw);
    let (id, secret) = s.grant("prod-db");

    for (sql, code) in WRITES_A_READ_GRANT_TRIES
        .iter()
        .chain(LIFTS_A_READ_GRANT_TRIES)
    {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert_eq!(failure(&out), *code, "{sql}: {}", text(&out));
    }
    // Upstream: every row is there, and the sequence never moved.
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM users", "app").trim(),
        "2"
    );
    assert_eq!(
        s.pg.psql_super("SELECT is_called FROM order_ids", "app")
            .trim(),
        "f"
    );
    assert_eq!(
        s.pg.psql_super("SELECT count(*) FROM pg_largeobject_metadata", "app")
            .trim(),
        "0"
    );
    // Reads still work.
    let out = s.psql(&id, &secret, "prod-db", "SELECT count(*) FROM users");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");

    // A target with a read role: read grants log in as it, write grants do not.
    let mut s = s;
    use_read_role(&mut s);
    let out = s.psql(&id, &secret, "prod-db", "SELECT current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reader",
        "{}",
        text(&out)
    );
    // The same attempts as the read role: each refused (by policy, by the read-only
    // session, or by the role's own privileges), and nothing changed upstream.
    for (sql, _) in WRITES_A_READ_GRANT_TRIES
        .iter()
        .chain(LIFTS_A_READ_GRANT_TRIES)
    {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert!(!failure(&out).is_empty(), "{sql}: {}", text(&out));
    }
    assert_eq!(
        s.pg.psql_super(
            "SELECT (SELECT count(*) FROM users), (SELECT is_called FROM order_ids), \
             (SELECT count(*) FROM pg_largeobject_metadata)",
            "app"
        )
        .trim(),
        "2|f|0"
    );
    assert_eq!(
        s.pg.psql_super(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'",
            "app"
        )
        .trim(),
        "0"
    );
    let (wid, wsecret) = s.grant_for("prod-db", "write");
    let out = s.psql(&wid, &wsecret, "prod-db", "SELECT current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "airlock",
        "{}",
        text(&out)
    );

    // An upstream role that is a superuser (or bypasses row security), or can become
    // one with SET ROLE, is refused unless the target allows it.
    s.pg.psql_super(
        "CREATE ROLE boss SUPERUSER NOLOGIN; GRANT boss TO airlock",
        "postgres",
    );
    let out = s.psql(&wid, &wsecret, "prod-db", "SET ROLE boss");
    assert!(text(&out).contains("or can become one"), "{}", text(&out));
    s.pg.psql_super("REVOKE boss FROM airlock", "postgres");
    s.pg.psql_super("ALTER ROLE airlock SUPERUSER", "postgres");
    let out = s.psql(&wid, &wsecret, "prod-db", "SELECT 1");
    assert!(
        text(&out).contains("superuser or bypasses row security"),
        "{}",
        text(&out)
    );
    s.gw.stop(false);
    s.gw.edit_config(
        "credential = \"secret:prod-db\"",
        "credential = \"secret:prod-db\"\nallow-superuser = true",
    );
    s.gw.restart();
    let out = s.psql(&wid, &wsecret, "prod-db", "SELECT 1");
    assert!(out.status.success(), "{}", text(&out));
}

/// Deep, huge and long statements: PostgreSQL's own answers, no crash, and nothing the
/// server would accept is refused.
#[test]
fn deep_and_huge_statements_get_postgres_answers_and_the_gateway_lives() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    let port = s.gw.pg_port();
    let mut raw = Raw::login(port, &id, &secret);

    // A 48-term sum, once refused by a decoder's recursion limit.
    let sum = format!("SELECT 1{}", "+1".repeat(47));
    assert_eq!(raw.simple(sum.as_bytes()), Ok(vec!["48".into()]));
    // 10,000 operators: the server's own 54001, relayed.
    let chain = format!("SELECT 1{}", "+1".repeat(10_000));
    assert_eq!(raw.simple(chain.as_bytes()), Err("54001".into()));
    // 100,000 operators (200 KB): deeper than any server evaluates, refused by the
    // gateway with the server's own answer, without parsing.
    let deeper = format!("SELECT 1{}", "+1".repeat(100_000));
    assert_eq!(raw.simple(deeper.as_bytes()), Err("54001".into()));
    // A 10 MB expression: longer than the gateway checks.
    let huge = format!("SELECT 1{}", "+1".repeat(5 << 20));
    assert_eq!(raw.simple(huge.as_bytes()), Err("54000".into()));
    // 100,000 nested parentheses: the parser's own 42601.
    let nested = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert_eq!(raw.simple(nested.as_bytes()), Err("42601".into()));
    // The same through Parse.
    raw.send(b'P', &[cstrs(&["", &deeper]), vec![0, 0]].concat());
    raw.send(b'S', &[]);
    assert_eq!(raw.errors_until_ready(), ["54001"]);
    // Long but flat: 200 KB of VALUES is not refused.
    let values: Vec<String> = (0..25_000).map(|i| format!("({i})")).collect();
    let flat = format!("SELECT count(*) FROM (VALUES {}) v", values.join(","));
    assert_eq!(raw.simple(flat.as_bytes()), Ok(vec!["25000".into()]));
    // Many statements in one Query are as deep as the deepest.
    let many = "SELECT 1;".repeat(25_000);
    assert!(raw.simple(many.as_bytes()).is_ok());
    // The session and the gateway go on.
    assert_eq!(raw.simple(b"SELECT 1"), Ok(vec!["1".into()]));
    let out = s.psql(&id, &secret, "prod-db", "SELECT count(*) FROM users");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2",
        "{}",
        text(&out)
    );
    // Each refusal is in the record.
    let denied = recorded_statements(&s.gw)
        .into_iter()
        .filter(|(_, verdict, _)| verdict == "deny")
        .count();
    assert!(denied >= 3, "{denied}");
}

/// A stand-in upstream that says it wrote when asked to read: no real PostgreSQL can
/// be made to disagree with the gateway's classification (that is the point), so this
/// one lies, to prove the tripwire would fire.
pub(crate) fn lying_upstream() -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let message = |tag: u8, body: &[u8]| {
            let mut m = vec![tag];
            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            m.extend_from_slice(body);
            m
        };
        let read_message = |stream: &mut std::net::TcpStream, tagged: bool| {
            let mut header = vec![0u8; if tagged { 5 } else { 4 }];
            stream.read_exact(&mut header).ok()?;
            let len = i32::from_be_bytes(header[header.len() - 4..].try_into().unwrap());
            let mut body = vec![0u8; len as usize - 4];
            stream.read_exact(&mut body).ok()?;
            Some((header[0], body))
        };
        read_message(&mut stream, false).unwrap();
        let mut hello = message(b'R', &0i32.to_be_bytes());
        for (k, v) in [
            ("client_encoding", "UTF8"),
            ("standard_conforming_strings", "on"),
            ("default_transaction_read_only", "on"),
        ] {
            hello.extend(message(b'S', &cstrs(&[k, v])));
        }
        hello.extend(message(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]));
        hello.extend(message(b'Z', b"I"));
        stream.write_all(&hello).unwrap();
        // The gateway's login check and catalog read, then the agent's statements.
        let description = |columns: i16| {
            let mut body = columns.to_be_bytes().to_vec();
            for _ in 0..columns {
                body.extend_from_slice(b"c\0");
                body.extend_from_slice(&[0; 6]);
                body.extend_from_slice(&25u32.to_be_bytes());
                body.extend_from_slice(&[0; 8]);
            }
            message(b'T', &body)
        };
        while let Some((tag, body)) = read_message(&mut stream, true) {
            if tag != b'Q' {
                continue;
            }
            let query = String::from_utf8_lossy(&body);
            let answer = if query.contains("pg_roles") {
                let mut row = 2i16.to_be_bytes().to_vec();
                for v in [b"t", b"f"] {
                    row.extend_from_slice(&1i32.to_be_bytes());
                    row.extend_from_slice(v);
                }
                [
                    description(2),
                    message(b'D', &row),
                    message(b'C', b"SELECT 1\0"),
                    message(b'Z', b"I"),
                ]
                .concat()
            } else if query.contains("pg_proc") {
                [
                    description(4),
                    message(b'C', b"SELECT 0\0"),
                    description(2),
                    message(b'C', b"SELECT 0\0"),
                    message(b'Z', b"I"),
                ]
                .concat()
            } else {
                [message(b'C', b"DELETE 2\0"), message(b'Z', b"I")].concat()
            };
            stream.write_all(&answer).unwrap();
        }
    });
    (port, handle)
}

#[test]
fn a_read_answered_with_a_write_trips_the_tripwire() {
    let (port, upstream) = lying_upstream();
    let mut gw = Gateway::prepare("");
    gw.set_upstream_port(port);
    gw.spawn();
    let token = gw.agent("claude", &[]);
    let (status, grant) = gw.ask(&token, "prod-db", "confirm migration 42 ran", "read", "10m");
    assert_eq!(status, 201, "{grant}");
    let (id, secret) = (
        grant["id"].as_str().unwrap(),
        grant["secret"].as_str().unwrap(),
    );
    let mut raw = Raw::login(gw.pg_port(), id, secret);
    raw.send(b'Q', b"SELECT 1\0");
    let fatal = raw.fatal_until_closed();
    assert!(
        fatal.contains("FATAL") && fatal.contains("DELETE 2"),
        "{fatal}"
    );
    let mismatches = events(&gw, "sql.mismatch");
    assert_eq!(mismatches.len(), 1);
    assert_eq!(mismatches[0]["detail"]["command"], "DELETE 2");
    drop(gw);
    upstream.join().unwrap();
}

/// Every byte the client received, as text, for a check that no clear PII is in it.
fn received(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The clear values the masking tests look for in what the client received.
const CLEAR: &[&str] = &[
    "alice",
    "bob@",
    "555",
    "4111 1111",
    "4111111111111111",
    "1234 5678 9012",
];

fn assert_masked(what: &str, got: &str) {
    for clear in CLEAR {
        assert!(!got.contains(clear), "{what}: {clear:?} in clear: {got}");
    }
}

/// Reads whose results carry PII in other shapes than a plain text column.
const MASKED_READS: &[&str] = &[
    "SELECT array_agg(email) FROM customers",
    "SELECT c FROM customers c",
    "SELECT ROW(email, phone) FROM customers",
    "SELECT email::citext AS x FROM customers",
    "SELECT to_tsvector('simple', email) FROM customers",
    "SELECT json_agg(c) FROM customers c",
    "SELECT notes AS remark FROM customers",
    "SELECT card_number AS n, replace(card_number, ' ', '')::numeric AS m FROM customers",
    "SELECT string_agg(phone, ';') AS p FROM customers",
    "SELECT row(replace(card_number, ' ', '')) FROM customers",
    "SELECT array_agg(c) FROM (SELECT id, replace(card_number, ' ', '') AS card FROM customers) c",
    "SELECT jsonb_object_agg(email, 1) FROM customers",
    "SELECT jsonb_build_object(replace(card_number, ' ', ''), 1) FROM customers WHERE card_number IS NOT NULL",
    "SELECT replace(card_number, ' ', '')::xid8 AS x FROM customers",
    "SELECT ARRAY[replace(card_number, ' ', '')::float8] AS x FROM customers",
    "SELECT ARRAY[replace(card_number, ' ', '')::numeric::money] AS x FROM customers",
    "SELECT point(replace(card_number, ' ', '')::float8, 0) AS x FROM customers",
];

/// Masking follows the data: arrays, whole rows, extension types, text search vectors,
/// error text and notifications are masked by content; statistics are denied; a cursor
/// re-declared over another column is described again.
#[test]
fn masking_follows_the_data_wherever_it_leaves() {
    let pg = Postgres::start();
    pg.psql_super(
        "CREATE EXTENSION citext; \
         CREATE TABLE customers (id int PRIMARY KEY, email text, phone text, card_number text, notes text); \
         INSERT INTO customers VALUES \
           (1, 'alice@example.com', '+1 (555) 123-4567', '4111 1111 1111 1111', 'paid with 1234 5678 9012 3456'), \
           (2, 'bob@example.com', '+1 (555) 765-4321', '4111111111111111', 'call +1 555 222 3333'), \
           (3, 'josé@example.com', NULL, NULL, NULL); \
         ALTER TABLE customers OWNER TO airlock; ANALYZE customers; \
         CREATE ROLE reader LOGIN PASSWORD 'reader-password'; \
         GRANT SELECT ON customers TO reader;",
        "app",
    );
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    let mut s = Setup::start(pg, gw);
    let (id, secret) = s.grant("prod-db");

    let reads_masked = |s: &Setup| {
        for sql in MASKED_READS {
            let out = s.psql(&id, &secret, "prod-db", sql);
            assert!(out.status.success(), "{sql}: {}", text(&out));
            assert!(
                received(&out).contains("@example.com") || !sql.contains("email"),
                "{sql}: {}",
                text(&out)
            );
            assert_masked(sql, &received(&out));
        }
    };
    reads_masked(&s);
    // An address whose name is not ASCII, inside a record and an array. (A text search
    // vector splits it into lexemes, which no content scan can tie back together.)
    for sql in [
        "SELECT c FROM customers c",
        "SELECT array_agg(email) FROM customers",
    ] {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert!(!received(&out).contains("josé@"), "{sql}: {}", text(&out));
    }
    // An error that quotes a value: masked too.
    let out = s.psql(&id, &secret, "prod-db", "SELECT email::int FROM customers");
    assert_eq!(failure(&out), "22P02", "{}", text(&out));
    assert!(received(&out).contains("***@"), "{}", text(&out));
    assert_masked("error", &received(&out));
    // Planner statistics hold sample values: denied where masking applies.
    let out = s.psql(
        &id,
        &secret,
        "prod-db",
        "SELECT histogram_bounds FROM pg_stats WHERE tablename = 'customers'",
    );
    assert_eq!(failure(&out), "42501", "{}", text(&out));
    assert_masked("pg_stats", &received(&out));

    // A notification's payload, under a write grant that may LISTEN and NOTIFY.
    let (wid, wsecret) = s.grant_for("prod-db", "write");
    let out = s.psql(
        &wid,
        &wsecret,
        "prod-db",
        "LISTEN c; SELECT pg_notify('c', email) FROM customers; SELECT 1",
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        received(&out).contains("***@example.com"),
        "{}",
        received(&out)
    );
    assert_masked("notification", &received(&out));

    // A prepared FETCH whose cursor is re-declared over another column: the rows of
    // the second Execute are described again and masked.
    let mut raw = Raw::login(s.gw.pg_port(), &id, &secret);
    assert!(raw.simple(b"BEGIN").is_ok());
    assert!(
        raw.simple(b"DECLARE cur CURSOR FOR SELECT id FROM customers")
            .is_ok()
    );
    raw.send(
        b'P',
        &[cstrs(&["fetch", "FETCH 1 FROM cur"]), vec![0, 0]].concat(),
    );
    let execute = |raw: &mut Raw| {
        raw.send(b'B', &[cstrs(&["", "fetch"]), vec![0; 6]].concat());
        raw.send(b'E', &[b"\0".as_slice(), &0i32.to_be_bytes()].concat());
        raw.send(b'S', &[]);
        let mut rows = Vec::new();
        loop {
            match raw.read() {
                (b'D', body) => rows.push(String::from_utf8_lossy(&body).into_owned()),
                (b'E', body) => panic!("{}", String::from_utf8_lossy(&body)),
                (b'Z', _) => return rows,
                _ => {}
            }
        }
    };
    let first = execute(&mut raw);
    assert_eq!(first.len(), 1);
    assert!(
        raw.simple(b"CLOSE cur; DECLARE cur CURSOR FOR SELECT email FROM customers")
            .is_ok()
    );
    let second = execute(&mut raw).concat();
    assert!(second.contains("***@example.com"), "{second}");
    assert_masked("FETCH", &second);
    assert!(raw.simple(b"COMMIT").is_ok());

    // A portal the gateway bound, gone upstream with its transaction, and a cursor
    // declared by SQL under its name: the gateway no longer knows that portal.
    raw.send(
        b'P',
        &[cstrs(&["x", "SELECT 1::int4 AS a"]), vec![0, 0]].concat(),
    );
    raw.send(b'B', &[cstrs(&["p", "x"]), vec![0; 6]].concat());
    raw.send(b'E', &[b"p\0".as_slice(), &0i32.to_be_bytes()].concat());
    raw.send(b'S', &[]);
    assert!(raw.errors_until_ready().is_empty());
    assert!(
        raw.simple(
            b"DECLARE p CURSOR WITH HOLD FOR SELECT email, phone, card_number FROM customers"
        )
        .is_ok()
    );
    raw.send(b'E', &[b"p\0".as_slice(), &0i32.to_be_bytes()].concat());
    raw.send(b'S', &[]);
    let mut got = String::new();
    let mut codes = Vec::new();
    loop {
        match raw.read() {
            (b'E', body) => codes.push(sqlstate(&body)),
            (b'Z', _) => break,
            (_, body) => got.push_str(&String::from_utf8_lossy(&body)),
        }
    }
    assert_eq!(codes, ["34000"]);
    assert_masked("a cursor under a known portal's name", &got);

    // Numbers in other notations, and error text that quotes a value.
    for sql in [
        "SELECT replace(card_number, ' ', '')::numeric::float8 AS x FROM customers",
        "SELECT replace(card_number, ' ', '')::numeric * 1.0 AS x FROM customers",
        "SELECT replace(card_number, ' ', '')::numeric::money AS x FROM customers",
        "SELECT replace(card_number, ' ', '') || '.00' AS x FROM customers",
    ] {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert!(out.status.success(), "{sql}: {}", text(&out));
        assert_masked(sql, &received(&out));
    }
    for sql in [
        "SELECT email::regclass FROM customers",
        "SELECT email::json FROM customers",
    ] {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert!(!failure(&out).is_empty(), "{sql}: {}", text(&out));
        assert_masked(sql, &received(&out));
    }

    // The same reads through a read role: masking does not depend on who logs in.
    use_read_role(&mut s);
    let out = s.psql(&id, &secret, "prod-db", "SELECT current_user");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "reader");
    reads_masked(&s);
}

/// A grant's end reaches the server: revoking a write grant in the middle of
/// `BEGIN; INSERT … FROM pg_sleep(3); COMMIT` leaves no row; a long read is gone from
/// `pg_stat_activity`; both are recorded. And a statement past the grant's expiry is
/// refused at decision time, not up to a sweep later.
#[test]
fn a_grants_end_stops_its_work_upstream_and_expiry_is_checked_per_statement() {
    let s = Setup::new();
    let table = format!("grant_end_{}", airlock::fsperm::random_suffix());
    s.pg.psql_super(
        &format!("CREATE TABLE {table} (x int); ALTER TABLE {table} OWNER TO airlock;"),
        "app",
    );
    let port = s.gw.pg_port();
    let revoke_during = |access: &str, first: &str, sql: String| {
        let (id, secret) = s.grant_for("prod-db", access);
        let mut raw = Raw::login(port, &id, &secret);
        if !first.is_empty() {
            assert_eq!(raw.simple(first.as_bytes()), Ok(vec![]));
        }
        let running = std::thread::spawn(move || raw.simple(sql.as_bytes()));
        std::thread::sleep(Duration::from_millis(1000));
        let out = s.gw.cli(&["grants", "revoke", &id]);
        assert!(out.status.success(), "{}", text(&out));
        let answer = running.join().unwrap();
        assert_eq!(
            answer,
            Err("57P01".to_string()),
            "{:?}",
            events(&s.gw, "sql.statement")
        );
    };

    revoke_during(
        "write",
        "",
        format!("BEGIN; INSERT INTO {table} SELECT 1 FROM pg_sleep(3); COMMIT"),
    );
    revoke_during(
        "read",
        "",
        "SELECT count(*) AS long_read FROM generate_series(1, 3000000000)".to_string(),
    );
    // An admin grant (below admin the gateway refuses role management, tested below)
    // that locks the gateway's second login out (a new password for the role) and
    // catches the cancel: the backend still dies, once the gateway's connection is
    // gone, before it can write.
    revoke_during(
        "admin",
        "ALTER ROLE airlock PASSWORD 'locked-out'",
        format!(
            "DO $$ BEGIN \
               FOR i IN 1..3 LOOP \
                 BEGIN PERFORM pg_sleep(1); EXCEPTION WHEN query_canceled THEN NULL; END; \
               END LOOP; \
               INSERT INTO {table} VALUES (2); \
             END $$"
        ),
    );

    // Past the end of every sleep an INSERT was behind: nothing was committed.
    std::thread::sleep(Duration::from_millis(3500));
    let rows = s.pg.psql_super(&format!("SELECT x FROM {table}"), "app");
    assert_eq!(rows.trim(), "", "a revoked grant's work committed");
    s.pg.psql_super(
        &format!(
            "ALTER ROLE airlock PASSWORD '{}'",
            crate::pg::UPSTREAM_PASSWORD
        ),
        "postgres",
    );
    // The review's attack on the above: inside a DO block (which the gateway cannot read
    // into) unpin the connection check, lock the agents' role out of new logins, and
    // catch cancels while committing rows. Only a login as a role apart (`end-as`, a
    // member of pg_signal_backend) can end that backend: with one, nothing is committed
    // after the revoke.
    s.pg.psql_super(
        "CREATE ROLE airlock_end LOGIN PASSWORD 'end-role-password'; \
         GRANT pg_signal_backend TO airlock_end;",
        "postgres",
    );
    let secrets = s.gw.data().join("secrets.toml");
    let mut text_secrets = std::fs::read_to_string(&secrets).unwrap();
    text_secrets.push_str("prod-db-end = \"end-role-password\"\n");
    std::fs::write(&secrets, text_secrets).unwrap();
    let pg_port = s.pg.port.to_string();
    let out = s.gw.cli(&[
        "target",
        "add",
        "prod-db-guarded",
        "--kind",
        "postgres",
        "--upstream",
        &format!("postgres://airlock@127.0.0.1:{pg_port}/app"),
        "--credential",
        "secret:prod-db",
        "--end-as",
        &format!("postgres://airlock_end@127.0.0.1:{pg_port}/postgres"),
        "--end-credential",
        "secret:prod-db-end",
        "--label",
        "env=prod",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (id, secret) = s.grant_for("prod-db-guarded", "write");
    let mut raw = Raw::login_with(port, &id, &secret, &[("database", "prod-db-guarded")]).unwrap();
    let unpinned = format!(
        "DO $$ BEGIN \
           PERFORM set_config('client_connection_check_interval', '0', false); \
           EXECUTE 'ALTER ROLE airlock PASSWORD ''locked-out'''; \
           COMMIT; \
           FOR i IN 1..8 LOOP \
             INSERT INTO {table} VALUES (100 + i); \
             COMMIT; \
             BEGIN PERFORM pg_sleep(0.5); EXCEPTION WHEN query_canceled THEN NULL; END; \
           END LOOP; \
         END $$"
    );
    let running = std::thread::spawn(move || raw.simple(unpinned.as_bytes()));
    std::thread::sleep(Duration::from_millis(1200));
    assert!(s.gw.cli(&["grants", "revoke", &id]).status.success());
    assert_eq!(running.join().unwrap(), Err("57P01".to_string()));
    let count = || {
        s.pg.psql_super(&format!("SELECT count(*) FROM {table}"), "app")
            .trim()
            .to_string()
    };
    let at_revoke = count();
    assert_ne!(
        at_revoke, "0",
        "the attack's loop was running: it had committed rows"
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(count(), at_revoke, "rows were committed after the revoke");
    let guarded = events(&s.gw, "session.upstream-ended")
        .into_iter()
        .find(|e| e["grant"] == id.as_str())
        .unwrap();
    assert_eq!(guarded["detail"]["terminated"], true, "{guarded}");
    s.pg.psql_super(
        &format!(
            "ALTER ROLE airlock PASSWORD '{}'",
            crate::pg::UPSTREAM_PASSWORD
        ),
        "postgres",
    );

    // A write grant cannot change the gateway's credential: refused before it runs, and
    // the gateway still logs in with it.
    let (id, secret) = s.grant_for("prod-db", "write");
    let mut raw = Raw::login(port, &id, &secret);
    assert_eq!(
        raw.simple(b"ALTER ROLE airlock PASSWORD 'locked-out'"),
        Err("42501".into())
    );
    assert_eq!(
        raw.simple(b"ALTER USER CURRENT_USER NOLOGIN"),
        Err("42501".into())
    );
    assert_eq!(
        Raw::login(port, &id, &secret).simple(b"SELECT 1"),
        Ok(vec!["1".into()])
    );
    let running = s.pg.psql_super(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%AS long_read FROM%' AND pid <> pg_backend_pid()",
        "app",
    );
    assert_eq!(running.trim(), "0", "the long read still runs upstream");
    // Each statement entry names its kind and every module's vote, in stable names.
    let insert = events(&s.gw, "sql.statement")
        .into_iter()
        .find(|e| {
            e["detail"]["text"]
                .as_str()
                .unwrap()
                .starts_with("INSERT INTO grant_end")
        })
        .unwrap();
    assert_eq!(insert["detail"]["kind"], "insert", "{insert}");
    let votes = insert["detail"]["votes"].as_array().unwrap();
    assert!(!votes.is_empty());
    for vote in votes {
        assert!(
            ["allow", "abstain"].contains(&vote["verdict"].as_str().unwrap()),
            "{vote}"
        );
        assert_eq!(vote["digest"].as_str().unwrap().len(), 64, "{vote}");
    }
    let ended = events(&s.gw, "session.upstream-ended");
    assert_eq!(ended.len(), 4, "{ended:?}");
    for event in &ended {
        assert_eq!(event["detail"]["connection_closed"], true, "{event}");
        assert_eq!(event["detail"]["statement_running"], true, "{event}");
    }
    assert_eq!(ended[0]["detail"]["terminated"], true, "{:?}", ended[0]);
    assert_eq!(ended[1]["detail"]["terminated"], true, "{:?}", ended[1]);
    // The second login was locked out, and the record says so.
    assert_eq!(ended[2]["detail"]["terminated"], false, "{:?}", ended[2]);

    // Expiry, with no grace window: statements up to a 1 s grant's end, then refused.
    let (status, grant) = s.gw.ask(
        &s.token,
        "prod-db",
        "confirm migration 42 ran",
        "read",
        "1s",
    );
    assert_eq!(status, 201, "{grant}");
    let id = grant["id"].as_str().unwrap();
    let mut raw = Raw::login(port, id, grant["secret"].as_str().unwrap());
    let expires_ms = events(&s.gw, "grant.decided")
        .into_iter()
        .find(|e| e["grant"] == id)
        .unwrap()["detail"]["expires_ms"]
        .as_u64()
        .unwrap();
    // Each statement reports when it ran, relative to the expiry (a small number, so
    // masking leaves it alone).
    let query = format!(
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint - {expires_ms} AS late_ms"
    );
    let mut ran = Vec::new();
    let refusal = loop {
        match raw.simple(query.as_bytes()) {
            Ok(rows) => ran.push(rows[0].parse::<i64>().unwrap()),
            Err(code) => break code,
        }
        assert!(ran.len() < 1_000_000, "never refused");
    };
    assert_eq!(refusal, "57P01");
    let last = *ran.last().expect("statements ran before expiry");
    // Each statement's check precedes its run by well under a millisecond; 50 ms of
    // slack absorbs a loaded machine. The sweep alone let them run up to 200 ms late.
    assert!(
        last < 50,
        "a statement ran {last} ms past the grant's expiry"
    );
}

/// kill -9 under 8 busy sessions (4 reading, 4 writing): after the restart every
/// statement a client saw answered is in the record, so is every row that reached the
/// server, each session is closed as `gateway_restart`, and the record verifies.
#[test]
fn a_crash_under_eight_sessions_loses_no_acknowledged_statement() {
    let mut s = Setup::new();
    s.pg.psql_super(
        "CREATE TABLE crash_log (v text); ALTER TABLE crash_log OWNER TO airlock;",
        "app",
    );
    let port = s.gw.pg_port();
    let grants: Vec<(String, String)> = (0..8)
        .map(|i| s.grant_for("prod-db", if i < 4 { "read" } else { "write" }))
        .collect();
    let running: Vec<_> = grants
        .into_iter()
        .enumerate()
        .map(|(i, (id, secret))| {
            std::thread::spawn(move || {
                let mut raw = Raw::login(port, &id, &secret);
                let mut acknowledged = Vec::new();
                // Bounded: the gateway is killed well before the last.
                for n in 0..100_000 {
                    let sql = if i < 4 {
                        format!("SELECT 'c{i}-{n}'")
                    } else {
                        format!("INSERT INTO crash_log VALUES ('c{i}-{n}')")
                    };
                    match raw.simple(sql.as_bytes()) {
                        Ok(_) => acknowledged.push(sql),
                        Err(_) => break,
                    }
                }
                acknowledged
            })
        })
        .collect();
    // Let every session get going, then kill the gateway mid-stream.
    wait_for("all eight sessions to run", || {
        events(&s.gw, "session.opened").len() == 8
    });
    std::thread::sleep(Duration::from_millis(500));
    s.gw.stop(true);
    let acknowledged: Vec<String> = running
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    assert!(
        acknowledged.len() > 8,
        "{} statements ran",
        acknowledged.len()
    );

    s.gw.spawn();
    let recorded: std::collections::HashSet<String> = events(&s.gw, "sql.statement")
        .iter()
        .map(|e| e["detail"]["text"].as_str().unwrap().to_string())
        .collect();
    let missing: Vec<_> = acknowledged
        .iter()
        .filter(|sql| !recorded.contains(*sql))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not recorded: {missing:?}"
    );
    // Record first, then act: every row the server has, its statement is recorded.
    let rows = s.pg.psql_super("SELECT v FROM crash_log", "app");
    for row in rows.lines().filter(|r| !r.is_empty()) {
        let sql = format!("INSERT INTO crash_log VALUES ('{row}')");
        assert!(
            recorded.contains(&sql),
            "{sql} reached the server unrecorded"
        );
    }

    let interrupted: Vec<_> = events(&s.gw, "session.closed")
        .into_iter()
        .filter(|e| e["detail"]["reason"] == "gateway_restart")
        .collect();
    assert_eq!(interrupted.len(), 8, "{interrupted:?}");
    let started = events(&s.gw, "gateway.started");
    assert_eq!(started.len(), 2, "{started:?}");
    assert_eq!(started[1]["detail"]["sessions_closed_as_interrupted"], 8);
    assert_eq!(
        started[1]["detail"]["config_sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    s.gw.stop(false);
    let out = s.gw.cli(&["audit", "tail", "-n", "1"]);
    assert!(text(&out).contains("\"gateway.stopped\""), "{}", text(&out));
    let out = s.gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

/// Refused logins are in the record (who claimed which grant for what, from where,
/// and why), and no secret, right or wrong, ever is.
#[test]
fn refused_logins_are_recorded_without_any_secret() {
    let s = Setup::new();
    let (id, secret) = s.grant("prod-db");
    assert!(
        !s.psql(&id, "wrong-secret-7f3a9", "prod-db", "SELECT 1")
            .status
            .success()
    );
    assert!(!s.psql(&id, &secret, "nowhere", "SELECT 1").status.success());
    assert!(s.gw.cli(&["grants", "revoke", &id]).status.success());
    assert!(!s.psql(&id, &secret, "prod-db", "SELECT 1").status.success());
    // User and password swapped: the "user" is a secret, and is not recorded.
    assert!(!s.psql(&secret, &id, "prod-db", "SELECT 1").status.success());
    // A startup packet that is not one (here a user name that is not UTF-8).
    {
        use std::io::Write as _;
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", s.gw.pg_port())).unwrap();
        let body = [&196_608i32.to_be_bytes()[..], b"user\0\xff\xfe\0\0"].concat();
        stream
            .write_all(&[&((body.len() + 4) as i32).to_be_bytes()[..], &body].concat())
            .unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        assert!(String::from_utf8_lossy(&answer).contains("08P01"));
    }
    let refused = events(&s.gw, "session.refused");
    let codes: Vec<&str> = refused
        .iter()
        .map(|e| e["detail"]["code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["28P01", "3D000", "28000", "28P01", "08P01"],
        "{refused:?}"
    );
    let swapped = &refused[3];
    assert_eq!(
        swapped["detail"]["claimed_grant"],
        "(not a grant id; withheld)"
    );
    for event in &refused[..3] {
        assert_eq!(event["detail"]["claimed_grant"], id.as_str(), "{event}");
        assert!(
            event["detail"]["peer"]
                .as_str()
                .unwrap()
                .starts_with("127.0.0.1:")
        );
        assert!(!event["detail"]["reason"].as_str().unwrap().is_empty());
    }
    assert!(
        refused[2]["detail"]["reason"]
            .as_str()
            .unwrap()
            .contains("revoked")
    );
    let record = text(&s.gw.cli(&["audit", "tail", "-n", "100000"]));
    assert!(!record.contains(&secret) && !record.contains("wrong-secret-7f3a9"));
    assert!(
        !s.gw.log_text().contains(&secret),
        "a secret reached the log"
    );
}
