//! The agent's interfaces with the real binary, a real PostgreSQL 15 and real `psql`:
//! `airlock connect` ends its grant when the client exits (unless kept), serves
//! follow-up commands of the same task from the same grant, withdraws a request under
//! review on Ctrl-C, and runs the whole path over TLS on other loopback addresses;
//! `airlock targets` and `airlock grants mine` show what an agent may ask for and holds.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

use crate::gateway::Gateway;
use crate::pg::Postgres;
use crate::postgres::Setup;
use crate::support::{tempdir, test_certificates_for, text};

const TASK: &str = "confirm migration 42 ran";
const WRITE_TASK: &str = "fix the broken name of user 1";

/// `airlock connect ARGS…` as the agent `token` runs it, against `gw`.
fn connect(gw: &Gateway, token: &str, args: &[&str]) -> Command {
    let mut command = crate::support::airlock();
    command
        .env("AIRLOCK_TOKEN", token)
        .env("AIRLOCK_URL", &gw.url)
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null())
        .arg("connect")
        .args(args);
    command
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The grant id `airlock connect` announced on stderr.
fn announced(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = stderr
        .find("airlock: grant g_")
        .unwrap_or_else(|| panic!("no grant announced: {stderr}"));
    stderr[at + "airlock: grant ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The grant as its agent sees it.
fn grant(s: &Setup, token: &str, id: &str) -> Value {
    let (status, grant) =
        s.gw.http("GET", &format!("/v1/grants/{id}"), Some(token), None);
    assert_eq!(status, 200, "{grant}");
    grant
}

/// The ids of the grants waiting for review, as the operator lists them.
fn pending(s: &Setup) -> Vec<String> {
    let list: Value = serde_json::from_slice(&s.gw.cli(&["grants", "list"]).stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|g| g["status"] == "pending")
        .map(|g| g["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_grant_ends_with_its_client_unless_kept_and_serves_the_tasks_follow_ups() {
    let s = Setup::new();
    let psql =
        |sql: &str| -> Vec<String> { ["--", "-X", "-At", "-c", sql].map(String::from).to_vec() };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = connect(&s.gw, &s.token, &args).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
        out
    };
    let args = |head: &[&str], sql: &str| {
        head.iter()
            .map(|a| a.to_string())
            .chain(psql(sql))
            .collect()
    };

    // One command, one grant: gone once psql exits, and its secret with it.
    let out = run(args(&["prod-db", "--task", TASK], "SELECT 42"));
    assert_eq!(stdout(&out), "42");
    let once = announced(&out);
    assert_eq!(grant(&s, &s.token, &once)["status"], "ended");
    assert!(
        text(&out).contains(&format!("grant {once} ended")),
        "{}",
        text(&out)
    );
    let ended = s.gw.events("grant.ended");
    assert!(
        ended
            .iter()
            .any(|e| e["grant"] == once.as_str() && e["detail"]["by"] == "claude"),
        "{ended:?}"
    );

    // Kept: the grant stays for the task's next commands, which ask for nothing new.
    let out = run(args(&["prod-db", "--task", TASK, "--keep"], "SELECT 1"));
    let kept = announced(&out);
    assert_eq!(grant(&s, &s.token, &kept)["status"], "active");
    let out = run(args(&["--grant", &kept, "--keep"], "SELECT 2"));
    assert_eq!((stdout(&out), announced(&out)), ("2".into(), kept.clone()));
    // The secret is shown again to the agent that owns the grant, and works.
    let shown = grant(&s, &s.token, &kept);
    assert_eq!(shown["connection"]["user"], kept.as_str());
    let out = run(vec![
        "--grant".into(),
        kept.clone(),
        "--print-env".into(),
        "--format".into(),
        "json".into(),
    ]);
    let env: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(env["PGUSER"], kept.as_str());
    assert_eq!(env["PGPASSWORD"], shown["secret"]);
    let url = env["DATABASE_URL"].as_str().unwrap();
    assert!(url.starts_with(&format!("postgres://{kept}:")), "{url}");
    let out = Command::new("psql")
        .args(["-X", "-At", url, "-c", "SELECT 3"])
        .output()
        .unwrap();
    assert_eq!(stdout(&out), "3", "{}", text(&out));
    assert_eq!(
        grant(&s, &s.token, &kept)["status"],
        "active",
        "--print-env keeps it"
    );
    // The last command without --keep ends it; it cannot be used again.
    let out = run(args(&["--grant", &kept], "SELECT 4"));
    assert_eq!(stdout(&out), "4");
    assert_eq!(grant(&s, &s.token, &kept)["status"], "ended");
    let out = connect(&s.gw, &s.token, &["--grant", &kept, "--", "-c", "SELECT 5"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("is over"), "{}", text(&out));
    // Nor can another agent use (or see) this agent's grant.
    let other = s.gw.agent("codex", &[]);
    let out = run(args(&["prod-db", "--task", TASK, "--keep"], "SELECT 6"));
    let claudes = announced(&out);
    let out = connect(
        &s.gw,
        &other,
        &["--grant", &claudes, "--", "-c", "SELECT 7"],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("not found"), "{}", text(&out));
    let (status, _) = s.gw.http(
        "DELETE",
        &format!("/v1/grants/{claudes}"),
        Some(&other),
        None,
    );
    assert_eq!(status, 404);
    assert_eq!(grant(&s, &s.token, &claudes)["status"], "active");

    // Discovery: the targets, and the agent's own grants (no secrets in the list).
    let cli = |token: &str, args: &[&str]| {
        let out = crate::support::airlock()
            .env("AIRLOCK_TOKEN", token)
            .env("AIRLOCK_URL", &s.gw.url)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        stdout(&out)
    };
    let targets: Vec<Value> = cli(&s.token, &["targets", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let prod = targets.iter().find(|t| t["name"] == "prod-db").unwrap();
    assert_eq!(
        (&prod["kind"], &prod["labels"]["env"]),
        (&"postgres".into(), &"prod".into())
    );
    assert!(targets.iter().any(|t| t["name"] == "staging-db"));
    let mine: Vec<Value> = cli(&s.token, &["grants", "mine", "--json"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let status = |id: &str| {
        mine.iter()
            .find(|g| g["id"] == id)
            .map(|g| g["status"].clone())
    };
    assert_eq!(status(&once), Some("ended".into()));
    assert_eq!(status(&kept), Some("ended".into()));
    assert_eq!(status(&claudes), Some("active".into()));
    assert!(mine.iter().all(|g| g.get("secret").is_none()), "{mine:?}");
    assert_eq!(
        mine.first().unwrap()["id"],
        claudes.as_str(),
        "newest first"
    );
    assert!(cli(&other, &["grants", "mine", "--json"]).is_empty());
    let table = cli(&s.token, &["grants", "mine"]);
    assert!(
        table.starts_with("ID") && table.contains(&claudes),
        "{table}"
    );
}

/// `airlock connect` run in the background with its stderr read line by line.
struct Waiting {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl Waiting {
    fn start(mut command: Command) -> Self {
        let mut child = command
            .stderr(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = send.send(line);
            }
        });
        Waiting { child, lines }
    }

    /// Waits for a stderr line containing `text`; returns it.
    fn until(&self, text: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(20))
                .unwrap_or_else(|_| panic!("airlock connect never said {text:?}"));
            if line.contains(text) {
                return line;
            }
        }
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    fn exit_code(mut self) -> Option<i32> {
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("airlock connect did not exit");
    }
}

#[test]
fn ctrl_c_withdraws_a_request_under_review_and_a_rerun_waits_on_the_same_one() {
    let s = Setup::new();
    let write = |extra: &[&str]| {
        let mut args = vec!["prod-db", "--access", "write", "--task", WRITE_TASK];
        args.extend(extra);
        args.extend([
            "--",
            "-X",
            "-At",
            "-c",
            "UPDATE users SET name = 'Mallory' WHERE id = 1",
        ]);
        connect(&s.gw, &s.token, &args)
    };
    // --no-wait returns the pending grant's id at once.
    let out = write(&["--no-wait"]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let id = stdout(&out);
    assert_eq!(grant(&s, &s.token, &id)["status"], "pending");
    // A rerun of the same request (its first asker timed out) is the same grant, not
    // a second one for the operator.
    let out = write(&["--no-wait"]).output().unwrap();
    assert_eq!(stdout(&out), id, "{}", text(&out));
    assert_eq!(pending(&s), std::slice::from_ref(&id));

    // Waiting on it later, Ctrl-C withdraws it.
    let waiting = Waiting::start(connect(
        &s.gw,
        &s.token,
        &[
            "--grant",
            &id,
            "--",
            "-X",
            "-At",
            "-c",
            "UPDATE users SET name = 'Mallory' WHERE id = 1",
        ],
    ));
    waiting.until("needs an operator's approval");
    waiting.signal(rustix::process::Signal::INT);
    assert_eq!(waiting.exit_code(), Some(130));
    let withdrawn = grant(&s, &s.token, &id);
    assert_eq!(withdrawn["status"], "ended");
    assert!(
        withdrawn["reason"].as_str().unwrap().contains("withdrawn"),
        "{withdrawn}"
    );
    assert!(pending(&s).is_empty());
    let out = s.gw.cli(&["grants", "approve", &id]);
    assert!(
        !out.status.success(),
        "a withdrawn request cannot be approved"
    );

    // A harness's SIGTERM while it waits withdraws the request too.
    let waiting = Waiting::start(write(&[]));
    let line = waiting.until("needs an operator's approval");
    let second = line.split_whitespace().nth(2).unwrap().to_string();
    assert_ne!(second, id, "a withdrawn request is not waited on again");
    waiting.signal(rustix::process::Signal::TERM);
    assert_eq!(waiting.exit_code(), Some(130));
    assert_eq!(grant(&s, &s.token, &second)["status"], "ended");
    assert!(pending(&s).is_empty());

    // Upstream, nothing was written.
    let name =
        s.pg.psql_super("SELECT name FROM users WHERE id = 1", "app");
    assert_eq!(name.trim(), "Alice");
}

#[test]
fn the_whole_agent_path_runs_over_verified_tls_on_other_loopback_addresses() {
    const HOST: &str = "127.0.0.7";
    let dir = tempdir();
    let (ca, cert, key) = test_certificates_for(dir.path(), "gateway", HOST);
    let (wrong_ca, _, _) = test_certificates_for(dir.path(), "impostor", HOST);
    let pg = Postgres::start();
    let mut gw = Gateway::prepare("");
    gw.set_upstream_port(pg.port);
    let tls = format!("tls-cert = {cert:?}\ntls-key = {key:?}");
    for section in ["postgres", "ssh", "http", "agent-api"] {
        let with_tls = if section == "ssh" { "" } else { tls.as_str() };
        gw.edit_config(
            &format!("[{section}]\nlisten = \"127.0.0.1:0\""),
            &format!("[{section}]\nlisten = \"{HOST}:0\"\n{with_tls}"),
        );
    }
    gw.api_ca = Some(ca.clone());
    let s = Setup::start(pg, gw);
    assert!(
        s.gw.url.starts_with(&format!("https://{HOST}:")),
        "{}",
        s.gw.url
    );
    let ca_arg = ca.to_str().unwrap();

    // The agent API, verified with --ca; psql verifies the PostgreSQL listener.
    let out = connect(
        &s.gw,
        &s.token,
        &[
            "--ca",
            ca_arg,
            "prod-db",
            "--task",
            TASK,
            "--",
            "-X",
            "-At",
            "-c",
            "SELECT 42",
        ],
    )
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out), "42");
    // What the grant says the client needs: full verification, on the listener's host.
    let out = connect(
        &s.gw,
        &s.token,
        &["prod-db", "--task", TASK, "--print-env", "--format", "json"],
    )
    .env("AIRLOCK_CA", &ca)
    .output()
    .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let env: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(env["PGHOST"], HOST);
    assert_eq!(env["PGSSLMODE"], "verify-full");
    assert_eq!(env["PGSSLROOTCERT"], ca_arg);
    let url = env["DATABASE_URL"].as_str().unwrap();
    assert!(
        url.contains("sslmode=verify-full") && url.contains("sslrootcert="),
        "{url}"
    );
    // The same URL, with a CA that did not sign the gateway's certificate: refused.
    let encoded = |path: &std::path::Path| path.to_str().unwrap().replace('/', "%2F");
    assert!(url.contains(&encoded(&ca)), "{url}");
    let wrong_url = url.replace(&encoded(&ca), &encoded(&wrong_ca));
    let out = Command::new("psql")
        .args(["-X", "-At", &wrong_url, "-c", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("certificate verify failed"),
        "{}",
        text(&out)
    );

    // The wrong CA, or none (the system's store does not know this test CA): a clear
    // error before any grant is asked for.
    let before = s.gw.events("grant.requested").len();
    for ca in [Some(wrong_ca.to_str().unwrap()), None] {
        let mut command = connect(
            &s.gw,
            &s.token,
            &["prod-db", "--task", TASK, "--", "-c", "SELECT 1"],
        );
        if let Some(ca) = ca {
            command.args(["--ca", ca]);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success());
        assert!(
            text(&out).contains("certificate is not trusted") && text(&out).contains("--ca"),
            "{}",
            text(&out)
        );
    }
    assert_eq!(s.gw.events("grant.requested").len(), before);
    // Plain HTTP is for this machine's gateway only: the token never leaves in clear.
    let out = connect(&s.gw, &s.token, &["prod-db", "--task", TASK])
        .env("AIRLOCK_URL", "http://gateway.example:7070")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("plain HTTP is for a gateway on this machine only"),
        "{}",
        text(&out)
    );
}
