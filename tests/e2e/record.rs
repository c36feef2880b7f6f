//! The record as an auditor reads it: a run through every kind of entry, exported and
//! checked against the published schema (`airlock audit schema`).

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;

use serde_json::Value;

use crate::gateway::{assert_follows_schema, wait_for};
use crate::postgres::Raw;
use crate::postgres_hostile::{lying_upstream, setup_with_flip};
use crate::support::text;

const TASK: &str = "confirm migration 42 ran";

fn ok(out: std::process::Output) {
    assert!(out.status.success(), "{}", text(&out));
}

/// Drives one gateway through every kind of entry it writes, then exports its record:
/// every line follows the schema and every kind the gateway can write is there.
#[test]
fn a_run_through_every_event_kind_exports_entries_that_follow_the_published_schema() {
    // gateway.started, policy.activated, agent.added; flip() for sql.pin-broken
    let mut s = setup_with_flip();
    let port = s.gw.pg_port();

    // api.refused
    let (status, _) =
        s.gw.http("GET", "/v1/grants", Some("airlock_0_wrong"), None);
    assert_eq!(status, 401);

    // grant.requested, grant.decided, session.opened, sql.statement, sql.result (with
    // masked columns), session.closed
    let (id, secret) = s.grant("prod-db");
    let out = s.psql(&id, &secret, "prod-db", "SELECT id, email FROM users");
    assert!(out.status.success(), "{}", text(&out));
    // session.refused
    let out = s.psql(&id, "not-the-secret", "prod-db", "SELECT 1");
    assert!(!out.status.success());

    // A write grant: grant.approved and grant.collected on the way; sql.pin-broken.
    let (wid, wsecret) = s.grant_for("prod-db", "write");
    let mut raw = Raw::login(port, &wid, &wsecret);
    raw.send(b'Q', b"SELECT flip()\0");
    assert!(
        raw.fatal_until_closed()
            .contains("standard_conforming_strings")
    );
    // grant.revoked and session.upstream-ended: revoked under an open session.
    let mut raw = Raw::login(port, &wid, &wsecret);
    assert_eq!(raw.simple(b"BEGIN"), Ok(vec![]));
    ok(s.gw.cli(&["grants", "revoke", &wid]));
    wait_for("the upstream end to be recorded", || {
        !s.gw.events("session.upstream-ended").is_empty()
    });
    // grant.denied
    let (status, pending) = s.gw.ask(&s.token, "prod-db", TASK, "write", "10m");
    assert_eq!(status, 202, "{pending}");
    let pid = pending["id"].as_str().unwrap();
    ok(s.gw.cli(&["grants", "deny", pid, "--reason", "not during the freeze"]));
    // grant.ended
    let (status, _) =
        s.gw.http("DELETE", &format!("/v1/grants/{id}"), Some(&s.token), None);
    assert_eq!(status, 200);
    // grant.expired
    let (status, short) = s.gw.ask(&s.token, "staging-db", TASK, "read", "1s");
    assert_eq!(status, 201, "{short}");
    wait_for("the grant's expiry to be recorded", || {
        !s.gw.events("grant.expired").is_empty()
    });

    // target.added, sql.mismatch (only a server that lies can answer a read with a
    // write's tag: a stand-in), target.removed
    let (liar_port, liar) = lying_upstream();
    ok(s.gw.cli(&[
        "target",
        "add",
        "liar",
        "--kind",
        "postgres",
        "--upstream",
        &format!("postgres://airlock@127.0.0.1:{liar_port}/app"),
        "--credential",
        "secret:prod-db",
    ]));
    let (status, grant) = s.gw.ask(&s.token, "liar", TASK, "read", "10m");
    assert_eq!(status, 201, "{grant}");
    let mut raw = Raw::login_with(
        port,
        grant["id"].as_str().unwrap(),
        grant["secret"].as_str().unwrap(),
        &[("database", "liar")],
    )
    .unwrap();
    raw.send(b'Q', b"SELECT 1\0");
    assert!(raw.fatal_until_closed().contains("DELETE 2"));
    liar.join().unwrap();
    ok(s.gw.cli(&["target", "remove", "liar"]));

    // agent.revoked
    s.gw.agent("contractor", &[]);
    ok(s.gw.cli(&["agent", "revoke", "contractor"]));

    // policy.refused: an installed bundle whose manifest no longer matches its
    // signature; the active one stays, and comes back when `current` does.
    let policy = s.gw.data().join("policy");
    let current = std::fs::read_link(policy.join("current")).unwrap();
    let forged = policy.join("bundles/example-v99");
    ok(std::process::Command::new("cp")
        .arg("-a")
        .arg(policy.join(&current))
        .arg(&forged)
        .output()
        .unwrap());
    let manifest = forged.join("manifest.toml");
    let original = std::fs::read_to_string(&manifest).unwrap();
    let edited = original.replacen("version = ", "version = 99 #", 1);
    assert_ne!(edited, original);
    std::fs::write(&manifest, edited).unwrap();
    let point = |to: &std::path::Path| {
        std::os::unix::fs::symlink(to, policy.join("current.new")).unwrap();
        std::fs::rename(policy.join("current.new"), policy.join("current")).unwrap();
    };
    point(std::path::Path::new("bundles/example-v99"));
    wait_for("the refusal to be recorded", || {
        !s.gw.events("policy.refused").is_empty()
    });
    point(&current);
    // policy.unsafe: the directory made writable by its group, then fixed.
    let mode = std::fs::metadata(&policy).unwrap().permissions().mode();
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(mode | 0o020)).unwrap();
    wait_for("the unsafe directory to be recorded", || {
        !s.gw.events("policy.unsafe").is_empty()
    });
    std::fs::set_permissions(&policy, std::fs::Permissions::from_mode(mode)).unwrap();

    // gateway.stopped, record.loss-accepted (the high-water mark deleted), and a
    // gateway.started that closes nothing.
    s.gw.stop(false);
    std::fs::remove_file(s.gw.data().join("store.head")).unwrap();
    ok(s.gw.cli(&["audit", "accept-loss", "--reason", "restored from backup"]));
    s.gw.spawn();

    // policy.expired: a bundle valid for two seconds.
    let short_lived =
        s.gw.example_manifest()
            .replace("valid-for = \"365d\"", "valid-for = \"2s\"");
    s.gw.install_bundle(100, &short_lived, &[]);
    wait_for("the expiry to be recorded", || {
        !s.gw.events("policy.expired").is_empty()
    });

    // The export, as a SIEM would take it: every entry follows the schema.
    let export = s.gw.data().join("../export.jsonl");
    ok(s.gw.cli(&["audit", "export", "--out", export.to_str().unwrap()]));
    let mut kinds = BTreeSet::new();
    for line in std::fs::read_to_string(&export).unwrap().lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        if entry.get("checkpoint").is_some() {
            continue;
        }
        assert_follows_schema(&entry);
        assert_eq!(entry["schema"], 1);
        kinds.insert(entry["kind"].as_str().unwrap().to_string());
    }
    let every: BTreeSet<String> = airlock::record::EventKind::ALL
        .iter()
        .map(|k| k.as_str().to_string())
        .collect();
    let missing: Vec<_> = every.difference(&kinds).collect();
    assert!(missing.is_empty(), "the run wrote no {missing:?}");
    // And the schema printed for operators is the one the entries were checked against.
    let printed = s.gw.cli(&["audit", "schema"]);
    assert_eq!(
        String::from_utf8(printed.stdout).unwrap(),
        airlock::record::SCHEMA
    );
    ok(s.gw.cli(&["audit", "verify"]));
}
