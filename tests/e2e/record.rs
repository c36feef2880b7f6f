//! The record as an auditor reads it: a run through every kind of entry, exported and
//! checked against the published schema (`airlock audit schema`).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::gateway::{Gateway, assert_follows_schema, wait_for};
use crate::postgres::Raw;
use crate::postgres_hostile::{lying_upstream, setup_with_flip};
use crate::support::{tempdir, test_certificates, text};

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
    // The SSH, HTTP and Kubernetes gateways' kinds are driven through a real sshd, a
    // real HTTP upstream and real kubectl by their own tests, which check their entries
    // the same way.
    let every: BTreeSet<String> = airlock::record::EventKind::ALL
        .iter()
        .map(|k| k.as_str().to_string())
        .filter(|k| {
            !crate::ssh::SSH_KINDS.contains(&k.as_str())
                && !crate::http::HTTP_KINDS.contains(&k.as_str())
                && !crate::kube::KUBE_KINDS.contains(&k.as_str())
        })
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

/// A checkpoint witness as an operator might run one: an HTTPS endpoint that appends
/// each POSTed body as a line of `file`, on `port`, until the test ends.
fn https_witness(port: u16, cert: &Path, key: &Path, file: PathBuf) {
    use http_body_util::BodyExt as _;
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, PrivateKeyDer::from_pem_file(key).unwrap())
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        crate::support::runtime().block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let file = file.clone();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let file = file.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            let mut out = std::fs::OpenOptions::new()
                                .append(true)
                                .create(true)
                                .open(&file)
                                .unwrap();
                            out.write_all(&[&body[..], b"\n"].concat()).unwrap();
                            Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Empty::<
                                bytes::Bytes,
                            >::new(
                            )))
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service),
                );
            }
        })
    });
}

/// With `witness-url`, each signed checkpoint also reaches an HTTPS endpoint the
/// operator runs; while it is down the gateway serves on and delivers later; what the
/// endpoint kept is what `audit verify --witness` checks. Plain HTTP off loopback, and
/// HTTPS without a CA to verify it by, are refused at start.
#[test]
fn checkpoints_reach_an_https_witness_that_was_down_when_they_were_signed() {
    let outside = tempdir();
    let (ca, cert, key) = test_certificates(outside.path(), "witness");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let witnessed = outside.path().join("witnessed.jsonl");
    let mut gw = Gateway::prepare("");
    let setting = format!(
        "checkpoint-interval = \"1s\"\nwitness-url = \"https://localhost:{port}/airlock/checkpoints\"\nwitness-ca = {:?}",
        ca.to_str().unwrap()
    );
    gw.edit_config("checkpoint-interval = \"1s\"", &setting);
    gw.spawn();
    // The endpoint is down: grants are still decided and recorded.
    let token = gw.agent("claude", &[]);
    for _ in 0..3 {
        assert_eq!(gw.ask(&token, "prod-db", TASK, "read", "10m").0, 201);
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!witnessed.exists());
    https_witness(port, &cert, &key, witnessed.clone());
    let lines = || {
        std::fs::read_to_string(&witnessed)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    wait_for("the queued checkpoints to be delivered", || lines() >= 1);
    let delivered = lines();
    for _ in 0..3 {
        assert_eq!(gw.ask(&token, "prod-db", TASK, "read", "10m").0, 201);
    }
    wait_for("a new checkpoint to be delivered", || lines() > delivered);
    gw.stop(false);
    let out = gw.cli(&["audit", "verify", "--witness", witnessed.to_str().unwrap()]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("consistent with all"), "{said}");

    // Plain HTTP to another host, and HTTPS with nothing to verify it by, are refused.
    gw.edit_config(&setting, "witness-url = \"http://192.0.2.1/checkpoints\"");
    let refused = gw.refused_start();
    assert!(refused.contains("not loopback"), "{refused}");
    gw.edit_config(
        "witness-url = \"http://192.0.2.1/checkpoints\"",
        "witness-url = \"https://192.0.2.1/checkpoints\"",
    );
    let refused = gw.refused_start();
    assert!(refused.contains("witness-ca"), "{refused}");
    // Credentials in the URL would travel in its Host header.
    gw.edit_config(
        "witness-url = \"https://192.0.2.1/checkpoints\"",
        "witness-url = \"http://user:pw@127.0.0.1:9/checkpoints\"",
    );
    let refused = gw.refused_start();
    assert!(refused.contains("holds credentials"), "{refused}");
}
