//! A hostile agent against the PostgreSQL gateway, with a real PostgreSQL 15: every test
//! asserts what happened upstream (rows, sequences, settings), not only what the client
//! was told.

use std::io::{Read, Write as _};
use std::net::TcpListener;
use std::process::Output;

use serde_json::Value;

use crate::gateway::Gateway;
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
    text(&gw.cli(&["audit", "tail", "-n", "100000"]))
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == kind)
        .collect()
}

impl Raw {
    /// A simple Query: the first column of each row, or the first error's SQLSTATE.
    fn simple(&mut self, sql: &[u8]) -> Result<Vec<String>, String> {
        self.send(b'Q', &[sql, b"\0"].concat());
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.read() {
                (b'D', body) => {
                    let len = i32::from_be_bytes(body[2..6].try_into().unwrap());
                    rows.push(String::from_utf8_lossy(&body[6..6 + len.max(0) as usize]).into());
                }
                (b'E', body) => error = error.or(Some(sqlstate(&body))),
                (b'Z', _) => return error.map_or(Ok(rows), Err),
                _ => {}
            }
        }
    }
}

/// The lexing the gateway parses with is the lexing the server runs with: nothing can
/// change the encoding or the meaning of a backslash, and a server that reports
/// otherwise ends the session.
#[test]
fn the_server_reads_statements_as_the_gateway_decided_them() {
    let pg = Postgres::start();
    // A function an earlier migration left behind, which flips a lexing setting for
    // the whole session when called.
    pg.psql_super(
        "CREATE FUNCTION flip() RETURNS text LANGUAGE sql \
         AS $$ SELECT set_config('standard_conforming_strings', 'off', false) $$; \
         ALTER FUNCTION flip() OWNER TO airlock;",
        "app",
    );
    let gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    let s = Setup::start(pg, gw);
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
    let mut fatal = None;
    while let Some((tag, body)) = raw.read_or_closed() {
        if tag == b'E' {
            fatal = Some(body);
        }
    }
    let fatal = String::from_utf8_lossy(&fatal.expect("a FATAL")).into_owned();
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

    for sql in [
        "SELECT wipe()",
        "SELECT wipe_plpgsql()",
        "EXPLAIN ANALYZE SELECT wipe()",
        "BEGIN; DECLARE c CURSOR FOR SELECT wipe(); FETCH c; COMMIT",
        "SELECT query_to_xml('select nextval(''order_ids'')', true, true, '')",
        "SELECT id FROM users FOR UPDATE",
    ] {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert_eq!(failure(&out), "25006", "{sql}: {}", text(&out));
    }
    // Nothing can lift it.
    for sql in [
        "BEGIN READ WRITE",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "BEGIN; SET TRANSACTION READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SET default_transaction_read_only = off",
        "SELECT set_config('transaction_read_only', 'off', true)",
        "RESET ALL",
        "SET ROLE postgres",
        "SET SESSION AUTHORIZATION postgres",
    ] {
        let out = s.psql(&id, &secret, "prod-db", sql);
        assert_eq!(failure(&out), "42501", "{sql}: {}", text(&out));
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
    // Reads still work, and a write grant still writes (the same function runs).
    let out = s.psql(&id, &secret, "prod-db", "SELECT count(*) FROM users");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");

    // A target with a read role: read grants log in as it, write grants do not.
    let mut s = s;
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
    let out = s.psql(&id, &secret, "prod-db", "SELECT current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "reader",
        "{}",
        text(&out)
    );
    let (wid, wsecret) = s.grant_for("prod-db", "write");
    let out = s.psql(&wid, &wsecret, "prod-db", "SELECT current_user");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "airlock",
        "{}",
        text(&out)
    );

    // An upstream role that is a superuser (or bypasses row security) is refused
    // unless the target allows it.
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
    // A 10 MB expression: refused by the gateway with the server's answer.
    let huge = format!("SELECT 1{}", "+1".repeat(5 << 20));
    assert_eq!(raw.simple(huge.as_bytes()), Err("54001".into()));
    // 100,000 nested parentheses: the parser's own 42601.
    let nested = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    assert_eq!(raw.simple(nested.as_bytes()), Err("42601".into()));
    // The same through Parse.
    raw.send(b'P', &[cstrs(&["", &huge]), vec![0, 0]].concat());
    raw.send(b'S', &[]);
    assert_eq!(raw.errors_until_ready(), ["54001"]);
    // Long but flat: 2 MB of VALUES is not refused.
    let values: Vec<String> = (0..200_000).map(|i| format!("({i})")).collect();
    let flat = format!("SELECT count(*) FROM (VALUES {}) v", values.join(","));
    assert_eq!(raw.simple(flat.as_bytes()), Ok(vec!["200000".into()]));
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
fn lying_upstream() -> (u16, std::thread::JoinHandle<()>) {
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
        // The gateway's login check, then the agent's statements.
        let mut queries = 0;
        while let Some((tag, _)) = read_message(&mut stream, true) {
            if tag != b'Q' {
                continue;
            }
            queries += 1;
            let answer = if queries > 1 {
                [message(b'C', b"DELETE 2\0"), message(b'Z', b"I")].concat()
            } else {
                let mut row = 2i16.to_be_bytes().to_vec();
                for v in [b"t", b"f"] {
                    row.extend_from_slice(&1i32.to_be_bytes());
                    row.extend_from_slice(v);
                }
                [
                    message(b'D', &row),
                    message(b'C', b"SELECT 1\0"),
                    message(b'Z', b"I"),
                ]
                .concat()
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
    let mut fatal = None;
    while let Some((tag, body)) = raw.read_or_closed() {
        if tag == b'E' {
            fatal = Some(body);
        }
    }
    let fatal = String::from_utf8_lossy(&fatal.expect("a FATAL")).into_owned();
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
