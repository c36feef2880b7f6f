//! The running gateway: `airlock serve` over real HTTP (curl), the admin socket through
//! the real CLI, the record on disk.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{airlock, component, run, tempdir, text, workspace};

const EXAMPLES: [&str; 6] = [
    "task-guard",
    "read-only-sql",
    "ssh-allowlist",
    "kube-readonly",
    "http-allowlist",
    "pii-mask",
];

/// A signed example bundle, installed once into a template policy directory (so the
/// modules compile once per test run), and the key that signed it.
struct Template {
    _dir: tempfile::TempDir,
    policy: PathBuf,
    public_key: PathBuf,
    /// The example bundle's manifest, with paths relative to `src`.
    manifest: String,
    /// The example bundle's source directory: the manifest, built modules, fixtures.
    src: PathBuf,
    key: PathBuf,
}

fn template() -> &'static Template {
    static TEMPLATE: OnceLock<Template> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        let dir = tempdir();
        let keys = dir.path().join("keys");
        assert!(
            run(&["bundle", "keygen", "--out", keys.to_str().unwrap()])
                .status
                .success()
        );
        // A source directory laid out as example-policies/ is: the signer reads only
        // files inside it.
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("build")).unwrap();
        let toml =
            std::fs::read_to_string(workspace().join("example-policies/bundle.toml")).unwrap();
        for name in EXAMPLES {
            let built = component(&format!("example-policies/{name}"));
            std::fs::copy(built, src.join(format!("build/{name}.wasm"))).unwrap();
            std::fs::create_dir(src.join(name)).unwrap();
            let status = Command::new("cp")
                .arg("-r")
                .arg(workspace().join(format!("example-policies/{name}/fixtures")))
                .arg(src.join(name))
                .status()
                .unwrap();
            assert!(status.success());
        }
        std::fs::write(src.join("bundle.toml"), &toml).unwrap();
        let bundle = dir.path().join("bundle");
        let key = keys.join("bundle-signing.key");
        let out = run(&[
            "bundle",
            "sign",
            src.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--version",
            "1",
            "--out",
            bundle.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let public_key = keys.join("bundle-signing.key.pub");
        write_config(&data, &public_key, "");
        let out = run(&[
            "--data",
            data.to_str().unwrap(),
            "bundle",
            "install",
            bundle.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        Template {
            policy: data.join("policy"),
            public_key,
            manifest: toml,
            src,
            key,
            _dir: dir,
        }
    })
}

fn write_config(data: &Path, public_key: &Path, extra: &str) {
    std::fs::write(
        data.join("airlock.toml"),
        format!(
            r#"
[postgres]
listen = "127.0.0.1:0"
[ssh]
listen = "127.0.0.1:0"
[http]
listen = "127.0.0.1:0"
[agent-api]
listen = "127.0.0.1:0"
max-body-bytes = 4096
requests-per-minute = 100000
[record]
checkpoint-every = 8
checkpoint-interval = "1s"
[policy]
trusted-keys = [{public_key:?}]
[[target]]
name = "prod-db"
kind = "postgres"
upstream = "postgres://airlock@127.0.0.1:{{UPSTREAM_PORT}}/app"
labels = {{ env = "prod" }}
credential = "secret:prod-db"
[[target]]
name = "staging-db"
kind = "postgres"
upstream = "postgres://airlock@127.0.0.1:5433/app"
labels = {{ env = "staging" }}
{extra}
"#
        ),
    )
    .unwrap();
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `airlock serve` on a private data directory; killed when dropped.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    /// The agent API's port, once started.
    pub port: u16,
    /// The agent API's URL, once started.
    pub url: String,
    /// The CA that signs the agent API's certificate, where it has one.
    pub api_ca: Option<PathBuf>,
    pg_port: u16,
    child: Option<Child>,
}

impl Gateway {
    pub fn start() -> Self {
        Self::start_with("")
    }

    pub fn start_with(extra_config: &str) -> Self {
        let mut gateway = Self::prepare(extra_config);
        gateway.spawn();
        gateway
    }

    /// A data directory ready to serve (bundle installed, configuration and secrets
    /// written), not started.
    pub fn prepare(extra_config: &str) -> Self {
        let template = template();
        let dir = tempdir();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let status = Command::new("cp")
            .arg("-a")
            .arg(&template.policy)
            .arg(data.join("policy"))
            .status()
            .unwrap();
        assert!(status.success());
        write_config(&data, &template.public_key, extra_config);
        let secrets = data.join("secrets.toml");
        std::fs::write(&secrets, "prod-db = \"upstream-password-for-tests\"\n").unwrap();
        std::fs::set_permissions(
            &secrets,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        Gateway {
            dir,
            port: 0,
            url: String::new(),
            api_ca: None,
            pg_port: 0,
            child: None,
        }
    }

    /// Installs version 2 of the example bundle without `module`, signed by the
    /// trusted key: e.g. without `pii-mask`, no masking module applies.
    pub fn install_bundle_without(&self, module: &str) {
        let template = template();
        let mut manifest = String::new();
        for block in template.manifest.split("\n[[module]]") {
            if !block
                .trim_start()
                .starts_with(&format!("name = \"{module}\""))
            {
                if !manifest.is_empty() {
                    manifest.push_str("\n[[module]]");
                }
                manifest.push_str(block);
            }
        }
        assert_ne!(
            manifest, template.manifest,
            "{module} is in the example bundle"
        );
        self.install_bundle(2, &manifest, &[]);
    }

    /// Signs `manifest` as `version` with the trusted key and installs it; a running
    /// gateway picks it up within a second. See [`Gateway::sign_bundle`].
    pub fn install_bundle(&self, version: u64, manifest: &str, files: &[(&str, &Path)]) {
        let bundle = self.sign_bundle(version, manifest, files);
        let out = self.cli(&["bundle", "install", bundle.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out));
    }

    /// Signs `manifest` as `version` with the trusted key, from a source directory
    /// holding the example bundle's built modules and fixtures plus `files` (name in
    /// the source directory, file to copy); returns the bundle.
    pub fn sign_bundle(&self, version: u64, manifest: &str, files: &[(&str, &Path)]) -> PathBuf {
        let src = self.dir.path().join(format!("bundle-src-v{version}"));
        let status = Command::new("cp")
            .arg("-r")
            .arg(&template().src)
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::write(src.join("bundle.toml"), manifest).unwrap();
        for (name, from) in files {
            std::fs::copy(from, src.join(name)).unwrap();
        }
        let bundle = self.dir.path().join(format!("bundle-v{version}"));
        let key = template().key.to_str().unwrap();
        let out = run(&[
            "bundle",
            "sign",
            src.to_str().unwrap(),
            "--key",
            key,
            "--version",
            &version.to_string(),
            "--out",
            bundle.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        bundle
    }

    /// The example bundle's manifest, with paths relative to its source directory.
    pub fn example_manifest(&self) -> String {
        template().manifest.clone()
    }

    /// The record's entries of `kind`, newest last. Every entry read, of any kind, must
    /// follow the published schema: so each test that looks at the record checks the
    /// schema against what the gateway really wrote.
    pub fn events(&self, kind: &str) -> Vec<Value> {
        text(&self.cli(&["audit", "tail", "-n", "100000"]))
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .inspect(assert_follows_schema)
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Why each session under `grant` closed, as the record says.
    pub fn closed_reasons(&self, grant: &str) -> Vec<String> {
        self.events("session.closed")
            .iter()
            .filter(|e| e["grant"] == grant)
            .filter_map(|e| e["detail"]["reason"].as_str().map(str::to_string))
            .collect()
    }

    /// Runs `airlock serve` expecting it to refuse to start; returns what it said.
    pub fn refused_start(&self) -> String {
        let mut child = airlock()
            .arg("--data")
            .arg(self.data())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(!status.success(), "serve was expected to refuse to start");
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                return err;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("serve started when it should have refused");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Replaces `from` (which must be there) with `to` in the gateway's configuration.
    pub fn edit_config(&self, from: &str, to: &str) {
        let path = self.data().join("airlock.toml");
        let config = std::fs::read_to_string(&path).unwrap();
        assert!(
            config.contains(from),
            "{from:?} is not in the configuration"
        );
        std::fs::write(&path, config.replace(from, to)).unwrap();
    }

    /// Points the `prod-db` target at a PostgreSQL server on `port`.
    pub fn set_upstream_port(&self, port: u16) {
        self.edit_config("{UPSTREAM_PORT}", &port.to_string());
    }

    /// The port of the gateway's PostgreSQL listener.
    pub fn pg_port(&self) -> u16 {
        self.pg_port
    }

    /// Reads the ports the running gateway bound from its `endpoints.json`, written
    /// once it listens; `false` until then.
    pub fn read_endpoints(&mut self) -> bool {
        let Ok(text) = std::fs::read_to_string(self.data().join("endpoints.json")) else {
            return false;
        };
        let Ok(endpoints) = serde_json::from_str::<Value>(&text) else {
            return false;
        };
        let port = |key: &str| {
            endpoints[key]
                .as_str()
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| p.parse().ok())
        };
        match (port("agent_api"), port("postgres")) {
            (Some(api), Some(pg)) => {
                self.port = api;
                self.url = endpoints["agent_api_url"].as_str().unwrap().to_string();
                self.pg_port = pg;
                true
            }
            _ => false,
        }
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    pub fn spawn(&mut self) {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        // The log goes through a pipe, as under a service manager, so a limit put on
        // the gateway's own files does not also silence its log.
        let mut child = airlock()
            .env("AIRLOCK_LOG", "info")
            .arg("--data")
            .arg(self.data())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut log));
        self.child = Some(child);
        let _ = std::fs::remove_file(self.data().join("endpoints.json"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.read_endpoints()
                && self.http("GET", "/healthz", None, None).0 == 200
                && self.data().join("admin.sock").exists()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log()).unwrap_or_default()
    }

    /// Stops the gateway: gracefully, or with SIGKILL.
    pub fn stop(&mut self, kill: bool) {
        if let Some(mut child) = self.child.take() {
            if kill {
                child.kill().unwrap();
            } else {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
            }
            child.wait().unwrap();
        }
    }

    pub fn restart(&mut self) {
        self.stop(false);
        self.spawn();
    }

    /// One HTTP request with curl; returns the status and the JSON body (or Null).
    pub fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args([
            "-s",
            "-S",
            "--max-time",
            "10",
            "-X",
            method,
            "-w",
            "\n%{http_code}",
        ]);
        if let Some(token) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        if let Some(ca) = &self.api_ca {
            cmd.arg("--cacert").arg(ca);
        }
        if body.is_some() {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                "@-",
            ]);
        }
        cmd.arg(format!("{}{path}", self.url));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("curl runs");
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            if let Some(body) = body {
                let _ = stdin.write_all(body.as_bytes());
            }
        }
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        child.wait().unwrap();
        let (body, code) = out.rsplit_once('\n').unwrap_or(("", "0"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(body).unwrap_or(Value::Null),
        )
    }

    /// `airlock --data DATA ARGS…` (the operator's CLI, over the admin socket).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = airlock();
        cmd.arg("--data").arg(self.data()).args(args);
        cmd.output().unwrap()
    }

    /// Enrolls an agent and returns its token.
    pub fn agent(&self, name: &str, labels: &[&str]) -> String {
        let mut args = vec!["agent", "add", name];
        for l in labels {
            args.extend(["--label", l]);
        }
        let out = self.cli(&args);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .last()
            .unwrap()
            .to_string()
    }

    pub fn ask(
        &self,
        token: &str,
        target: &str,
        task: &str,
        access: &str,
        ttl: &str,
    ) -> (u16, Value) {
        let body =
            json!({ "target": target, "task": task, "access": access, "ttl": ttl }).to_string();
        self.http("POST", "/v1/grants", Some(token), Some(&body))
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop(true);
    }
}

/// Panics, naming the entry and what is wrong, unless `entry` follows the published
/// audit schema (`airlock audit schema`).
pub fn assert_follows_schema(entry: &Value) {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let schema: Value = serde_json::from_str(airlock::record::SCHEMA).unwrap();
        jsonschema::draft202012::new(&schema).unwrap()
    });
    let errors: Vec<String> = validator
        .iter_errors(entry)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "entry does not follow the audit schema: {entry}\n{}",
        errors.join("\n")
    );
}

pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const TASK: &str = "confirm migration 42 ran";

#[test]
fn the_grant_lifecycle_over_http() {
    let gw = Gateway::start();
    let token = gw.agent("claude", &["team=payments"]);

    // Allowed: 201, the secret, the policy's 15-minute cap, read-only.
    let (status, grant) = gw.ask(&token, "prod-db", TASK, "read", "1h");
    assert_eq!(status, 201, "{grant}");
    assert_eq!(grant["status"], "active");
    assert_eq!(grant["ttl_seconds"], 900);
    assert_eq!(grant["read_only"], true);
    let secret = grant["secret"].as_str().unwrap();
    assert!(secret.len() >= 43);
    assert_eq!(grant["connection"]["user"], grant["id"]);
    let id = grant["id"].as_str().unwrap().to_string();
    let (status, again) = gw.http("GET", &format!("/v1/grants/{id}"), Some(&token), None);
    assert_eq!(status, 200);
    assert_eq!(
        again["secret"], secret,
        "shown again to its agent, for the task's follow-up commands"
    );

    // Denied: 403 with the policy's reason and hint.
    let (status, denied) = gw.ask(&token, "prod-db", "x", "read", "10m");
    assert_eq!(status, 403, "{denied}");
    assert_eq!(denied["code"], "denied");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("task description")
    );
    assert!(denied["hint"].as_str().unwrap().contains("--task"));
    assert!(denied.get("secret").is_none());

    // Review → the operator approves through the admin socket → the agent collects.
    let (status, pending) = gw.ask(
        &token,
        "prod-db",
        "fix the broken row in users",
        "write",
        "10m",
    );
    assert_eq!(status, 202, "{pending}");
    assert!(pending.get("secret").is_none());
    let pid = pending["id"].as_str().unwrap().to_string();
    let (_, polled) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&token), None);
    assert_eq!(polled["status"], "pending");
    let out = gw.cli(&["grants", "approve", &pid]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !text(&out).contains("secret"),
        "the operator never sees a secret"
    );
    let (status, approved) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&token), None);
    assert_eq!(status, 200);
    assert_eq!(approved["status"], "active");
    assert!(approved["secret"].as_str().is_some(), "{approved}");
    let (_, later) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&token), None);
    assert_eq!(
        later["secret"], approved["secret"],
        "minted once, shown again"
    );

    // The agent ends its task early.
    let (status, ended) = gw.http("DELETE", &format!("/v1/grants/{id}"), Some(&token), None);
    assert_eq!(status, 200);
    assert_eq!(ended["status"], "ended");
    let (status, _) = gw.http("DELETE", &format!("/v1/grants/{id}"), Some(&token), None);
    assert_eq!(status, 409, "an ended grant cannot end again");

    // An operator revokes.
    let out = gw.cli(&["grants", "revoke", &pid]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, revoked) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&token), None);
    assert_eq!(revoked["status"], "revoked");

    // Expiry: a 1-second grant on staging is dead after its window.
    let (status, short) = gw.ask(&token, "staging-db", TASK, "read", "1s");
    assert_eq!(status, 201, "{short}");
    let sid = short["id"].as_str().unwrap().to_string();
    wait_for("the grant to expire", || {
        gw.http("GET", &format!("/v1/grants/{sid}"), Some(&token), None)
            .1["status"]
            == "expired"
    });
    wait_for("the expiry to be recorded", || {
        text(&gw.cli(&["audit", "tail", "-n", "50"])).contains("\"grant.expired\"")
    });

    // Every step is in the record, in order, and the record verifies.
    let tail = text(&gw.cli(&["audit", "tail", "-n", "100"]));
    let kinds: Vec<String> = tail
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["grant"] == json!(pid))
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "grant.requested",
            "grant.decided",
            "grant.approved",
            "grant.collected",
            "grant.revoked"
        ]
    );
    let out = gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn an_agent_token_reaches_nothing_but_its_own_grants() {
    let gw = Gateway::start();
    let alice = gw.agent("alice", &[]);
    let bob = gw.agent("bob", &[]);
    let (_, grant) = gw.ask(&alice, "prod-db", TASK, "read", "10m");
    let id = grant["id"].as_str().unwrap().to_string();
    let (_, pending) = gw.ask(
        &alice,
        "prod-db",
        "fix the broken row in users",
        "write",
        "10m",
    );
    let pid = pending["id"].as_str().unwrap().to_string();

    // Another agent's grant is invisible and cannot be ended.
    assert_eq!(
        gw.http("GET", &format!("/v1/grants/{id}"), Some(&bob), None)
            .0,
        404
    );
    assert_eq!(
        gw.http("DELETE", &format!("/v1/grants/{id}"), Some(&bob), None)
            .0,
        404
    );
    // No way to approve, extend or widen through the agent API.
    for (method, path, body) in [
        ("POST", format!("/v1/grants/{pid}/approve"), None),
        (
            "PATCH",
            format!("/v1/grants/{pid}"),
            Some(r#"{"status":"active"}"#),
        ),
        (
            "PUT",
            format!("/v1/grants/{id}"),
            Some(r#"{"ttl":"24h","access":"admin"}"#),
        ),
        ("POST", "/v1/admin/agents".to_string(), Some("{}")),
    ] {
        let (status, body) = gw.http(method, &path, Some(&alice), body);
        assert!(
            status == 404 || status == 405,
            "{method} {path} → {status} {body}"
        );
    }
    let (_, still) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&alice), None);
    assert_eq!(still["status"], "pending");
    // Bad tokens.
    for token in [
        "",
        "airlock_nope",
        &alice.replace('_', "-"),
        &format!("{alice}x"),
    ] {
        assert_eq!(
            gw.http("POST", "/v1/grants", Some(token), Some("{}")).0,
            401,
            "{token}"
        );
    }
    // The admin socket is the gateway user's alone: another user cannot even connect.
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(env!("CARGO_BIN_EXE_airlock"))
        .arg("--data")
        .arg(gw.data())
        .args(["grants", "approve", &pid])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out).contains("cannot reach the gateway's admin socket"),
        "{}",
        text(&out)
    );
    let (_, still) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&alice), None);
    assert_eq!(still["status"], "pending");

    // A revoked agent's token stops working and its live grants end.
    let out = gw.cli(&["agent", "revoke", "alice"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 live grants ended"), "{}", text(&out));
    assert_eq!(
        gw.http("GET", &format!("/v1/grants/{id}"), Some(&alice), None)
            .0,
        401
    );
    let show = text(&gw.cli(&["grants", "show", &id]));
    assert!(show.contains("\"revoked\""), "{show}");
}

#[test]
fn bad_input_gets_a_clear_4xx_and_the_gateway_keeps_serving() {
    let gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    let huge = format!(
        r#"{{"target":"prod-db","task":"{}","ttl":"10m"}}"#,
        "a".repeat(10_000)
    );
    let cases: Vec<(String, u16, &str)> = vec![
        ("{not json".into(), 400, "invalid_json"),
        (
            r#"{"target":"prod-db","task":"t t t t t t","ttl":"10m","admin":true}"#.into(),
            400,
            "invalid_json",
        ),
        (
            r#"{"target":"prod-db","task":"confirm things work","ttl":"forever"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            r#"{"target":"prod-db","task":"confirm things work","ttl":0}"#.into(),
            400,
            "invalid_request",
        ),
        (
            r#"{"target":"prod-db","task":"confirm things work","ttl":"48h"}"#.into(),
            400,
            "invalid_request",
        ),
        (
            r#"{"target":"prod-db","task":"confirm things work","ttl":"10m","access":"root"}"#
                .into(),
            400,
            "invalid_json",
        ),
        (
            r#"{"target":"nowhere","task":"confirm things work","ttl":"10m"}"#.into(),
            404,
            "unknown_target",
        ),
        (huge, 413, "body_too_large"),
        ("".into(), 400, "invalid_json"),
    ];
    for (body, expected, code) in cases {
        let (status, reply) = gw.http("POST", "/v1/grants", Some(&token), Some(&body));
        assert_eq!(status, expected, "{body:.80} → {reply}");
        assert_eq!(reply["code"], code, "{body:.80} → {reply}");
        assert!(
            !reply["message"].as_str().unwrap_or("").is_empty(),
            "{reply}"
        );
    }
    let (status, _) = gw.http("GET", "/v1/nothing", Some(&token), None);
    assert_eq!(status, 404);
    // A body not declared JSON gets 415; the auth scheme is case-insensitive.
    let post = |headers: &[String]| -> String {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-S", "--max-time", "10", "-w", "\n%{http_code}"]);
        for header in headers {
            cmd.args(["-H", header]);
        }
        let body = json!({"target":"prod-db","task":TASK,"access":"read","ttl":"10m"});
        cmd.args(["--data-binary", &body.to_string()])
            .arg(format!("http://127.0.0.1:{}/v1/grants", gw.port));
        String::from_utf8(cmd.output().unwrap().stdout).unwrap()
    };
    let form = post(&[format!("Authorization: Bearer {token}")]);
    assert!(
        form.ends_with("\n415") && form.contains("unsupported_media_type"),
        "{form}"
    );
    let lower = post(&[
        format!("Authorization: bearer {token}"),
        "Content-Type: application/json; charset=utf-8".into(),
    ]);
    assert!(lower.ends_with("\n201"), "{lower}");
    let (status, grant) = gw.ask(&token, "prod-db", TASK, "read", "10m");
    assert_eq!(status, 201, "still serving: {grant}");
    let (status, doc) = gw.http("GET", "/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.0.3");

    // Refused calls are recorded, with who and why, and never a token.
    let (status, _) = gw.http(
        "POST",
        "/v1/grants",
        Some("airlock_not-a-real-token"),
        Some("{}"),
    );
    assert_eq!(status, 401);
    let refused = gw.events("api.refused");
    let statuses: Vec<u64> = refused
        .iter()
        .map(|e| e["detail"]["status"].as_u64().unwrap())
        .collect();
    for expected in [400, 404, 413, 415, 401] {
        assert!(statuses.contains(&expected), "{expected}: {statuses:?}");
    }
    assert!(refused.iter().any(|e| e["agent"] == "claude"));
    let record = text(&gw.cli(&["audit", "tail", "-n", "100000"]));
    assert!(!record.contains(&token) && !record.contains("airlock_not-a-real-token"));
}

#[test]
fn grants_survive_a_restart_and_no_secret_is_left_in_logs_or_store() {
    let mut gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    let (_, active) = gw.ask(&token, "prod-db", TASK, "read", "10m");
    let (_, pending) = gw.ask(
        &token,
        "prod-db",
        "fix the broken row in users",
        "write",
        "10m",
    );
    let aid = active["id"].as_str().unwrap().to_string();
    let pid = pending["id"].as_str().unwrap().to_string();
    gw.restart();
    let (status, after) = gw.http("GET", &format!("/v1/grants/{aid}"), Some(&token), None);
    assert_eq!(status, 200, "the agent token survives too");
    assert_eq!(after["status"], "active");
    assert_eq!(
        gw.http("GET", &format!("/v1/grants/{pid}"), Some(&token), None)
            .1["status"],
        "pending"
    );
    assert!(gw.cli(&["grants", "approve", &pid]).status.success());
    let (_, collected) = gw.http("GET", &format!("/v1/grants/{pid}"), Some(&token), None);
    // A token in a refused path, or in a task, is withheld from what is recorded.
    assert_eq!(gw.http("GET", &format!("/v1/{token}"), None, None).0, 401);
    let (status, _) = gw.ask(
        &token,
        "prod-db",
        &format!("confirm migration 42 ran with {token}"),
        "read",
        "10m",
    );
    assert_eq!(status, 201);
    let secrets = [
        token.clone(),
        // `airlock_<id>_<secret>`: the secret is URL-safe base64 and may hold `_`.
        token.splitn(3, '_').nth(2).unwrap().to_string(),
        active["secret"].as_str().unwrap().to_string(),
        collected["secret"].as_str().unwrap().to_string(),
    ];
    gw.stop(false);

    // Raw bytes of every file the gateway wrote, and its log.
    let mut files = vec![gw.log()];
    let mut stack = vec![gw.data()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path)
            } else {
                files.push(path)
            }
        }
    }
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        for secret in &secrets {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "a secret is in {}",
                file.display()
            );
        }
    }
    // And every value in the store, decompressed.
    let spaces = airlock::record::Spaces::open(&gw.data().join("store")).unwrap();
    for space in [
        &spaces.agents,
        &spaces.grants,
        &spaces.targets,
        &spaces.audit,
        &spaces.meta,
    ] {
        for kv in space.iter() {
            let value = kv.value().unwrap();
            for secret in &secrets {
                assert!(!value.windows(secret.len()).any(|w| w == secret.as_bytes()));
            }
        }
    }
}

#[test]
fn audit_verify_names_an_edited_or_deleted_entry() {
    let mut gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    for _ in 0..5 {
        gw.ask(&token, "prod-db", TASK, "read", "10m");
    }
    gw.stop(false);
    let ok = gw.cli(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok));
    // The gateway's start (bundle activated, started), the agent, two per grant
    // request, and the gateway's stop.
    assert!(text(&ok).contains("ok: 14 entries"), "{}", text(&ok));

    let store = gw.data().join("store");
    {
        let spaces = airlock::record::Spaces::open(&store).unwrap();
        let mut bytes = spaces
            .audit
            .get(6u64.to_be_bytes())
            .unwrap()
            .unwrap()
            .to_vec();
        let at = bytes.iter().position(|&b| b == b'c').unwrap();
        bytes[at] = b'C';
        spaces.audit.insert(6u64.to_be_bytes(), bytes).unwrap();
    }
    let out = gw.cli(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("does NOT verify: entry 6: was modified"),
        "{}",
        text(&out)
    );

    let fresh = Gateway::start();
    let token = fresh.agent("claude", &[]);
    for _ in 0..5 {
        fresh.ask(&token, "prod-db", TASK, "read", "10m");
    }
    let mut fresh = fresh;
    fresh.stop(false);
    {
        let spaces = airlock::record::Spaces::open(&fresh.data().join("store")).unwrap();
        spaces.audit.remove(4u64.to_be_bytes()).unwrap();
    }
    let out = fresh.cli(&["audit", "verify"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("entry 4: is missing"), "{}", text(&out));
}

#[test]
fn a_saved_checkpoint_proves_the_log_only_grew() {
    let gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    for _ in 0..4 {
        gw.ask(&token, "prod-db", TASK, "read", "10m");
    }
    wait_for("a checkpoint", || {
        gw.cli(&["audit", "checkpoint"]).status.success()
    });
    let saved = gw.dir.path().join("saved-checkpoint");
    std::fs::write(&saved, gw.cli(&["audit", "checkpoint"]).stdout).unwrap();
    for _ in 0..6 {
        gw.ask(&token, "prod-db", TASK, "read", "10m");
    }
    let out = gw.cli(&["audit", "verify", "--against", saved.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("consistent: the log"), "{}", text(&out));

    // An export verifies on its own, offline.
    let export = gw.dir.path().join("audit.jsonl");
    assert!(
        gw.cli(&["audit", "export", "--out", export.to_str().unwrap()])
            .status
            .success()
    );
    let key = gw.data().join("gateway-signing.key.pub");
    let out = run(&[
        "audit",
        "verify",
        "--export",
        export.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn kill_9_loses_no_acknowledged_grant() {
    let mut gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    let port = gw.port;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let token = token.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut acknowledged = Vec::new();
                for _ in 0..500 {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    let out = Command::new("curl")
                        .args([
                            "-s",
                            "--max-time",
                            "5",
                            "-H",
                            &format!("Authorization: Bearer {token}"),
                            "-H",
                            "Content-Type: application/json",
                        ])
                        .args([
                            "--data-binary",
                            &json!({"target":"prod-db","task":TASK,"ttl":"10m"}).to_string(),
                        ])
                        .arg(format!("http://127.0.0.1:{port}/v1/grants"))
                        .output()
                        .unwrap();
                    if let Ok(grant) = serde_json::from_slice::<Value>(&out.stdout)
                        && grant["status"] == "active"
                    {
                        acknowledged.push(grant["id"].as_str().unwrap().to_string());
                    }
                }
                acknowledged
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    gw.stop(true);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let acknowledged: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert!(
        acknowledged.len() > 5,
        "the loop ran: {}",
        acknowledged.len()
    );

    let spaces = airlock::record::Spaces::open(&gw.data().join("store")).unwrap();
    for id in &acknowledged {
        assert!(
            spaces.grants.get(id).unwrap().is_some(),
            "acknowledged grant {id} was lost"
        );
    }
    drop(spaces);
    let out = gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    gw.spawn();
    let listed = text(&gw.cli(&["grants", "list"]));
    assert!(acknowledged.iter().all(|id| listed.contains(id.as_str())));
}

#[test]
fn when_the_record_cannot_be_written_grants_are_refused() {
    let gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    let (status, _) = gw.ask(&token, "prod-db", TASK, "read", "10m");
    assert_eq!(status, 201);
    // The file-size limit makes every further write to the store fail with EFBIG,
    // as a full disk would.
    let limit = Command::new("prlimit")
        .args(["--pid", &gw.pid().to_string(), "--fsize=1:"])
        .status()
        .unwrap();
    assert!(limit.success());
    let (status, refused) = gw.ask(&token, "prod-db", "the unrecorded request", "read", "10m");
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["code"], "record_unavailable");
    assert!(refused.get("secret").is_none());
    assert!(
        refused["message"].as_str().unwrap().contains("refus"),
        "{refused}"
    );
    let (status, health) = gw.http("GET", "/healthz", None, None);
    assert_eq!(status, 503, "{health}");
    assert_eq!(health["code"], "not_ready");
    assert!(
        health["message"]
            .as_str()
            .unwrap()
            .contains("File too large"),
        "says why: {health}"
    );
    // Still refused: fjall refuses every write after a failed one (its state on disk
    // is unknown), so the store must be reopened once it has room.
    assert_eq!(gw.ask(&token, "prod-db", TASK, "read", "10m").0, 503);
    assert!(
        gw.log_text().contains("record write failed"),
        "{}",
        gw.log_text()
    );
    // Room again: the gateway notices, restarts in place (the same process), and
    // serves; the grant from before the failure is still there.
    let limit = Command::new("prlimit")
        .args(["--pid", &gw.pid().to_string(), "--fsize=unlimited"])
        .status()
        .unwrap();
    assert!(limit.success());
    // (It listens on new ephemeral ports, as this test's configuration asks.)
    let mut gw = gw;
    let _ = std::fs::remove_file(gw.data().join("endpoints.json"));
    wait_for("the gateway to be ready again", || {
        gw.read_endpoints() && gw.http("GET", "/healthz", None, None).0 == 200
    });
    assert_eq!(gw.ask(&token, "prod-db", TASK, "read", "10m").0, 201);
    assert_eq!(gw.events("gateway.started").len(), 2);
    assert!(
        gw.log_text().contains("writable again"),
        "{}",
        gw.log_text()
    );
    gw.stop(false);
    let out = gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let spaces = airlock::record::Spaces::open(&gw.data().join("store")).unwrap();
    for kv in spaces.grants.iter() {
        let value = kv.value().unwrap();
        assert!(!String::from_utf8_lossy(&value).contains("the unrecorded request"));
    }
}

#[test]
fn startup_refuses_a_missing_credential_and_plain_http_off_loopback() {
    let gw = Gateway::prepare("");
    std::fs::remove_file(gw.data().join("secrets.toml")).unwrap();
    let err = gw.refused_start();
    assert!(
        err.contains("target `prod-db`: credential secret:prod-db: no key `prod-db` in"),
        "{err}"
    );

    let gw = Gateway::prepare("");
    std::fs::set_permissions(
        gw.data().join("secrets.toml"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    assert!(
        gw.refused_start()
            .contains("lets others read these secrets")
    );

    // A configuration with `from` replaced by `to` stops startup; what it said.
    let refused = |from: &str, to: &str| {
        let gw = Gateway::prepare("");
        gw.edit_config(from, to);
        gw.refused_start()
    };
    let err = refused(
        "[agent-api]\nlisten = \"127.0.0.1:",
        "[agent-api]\nlisten = \"0.0.0.0:",
    );
    assert!(
        err.contains("refusing to serve the agent API in plain HTTP"),
        "{err}"
    );
    let err = refused(
        "[postgres]\nlisten = \"127.0.0.1:",
        "[postgres]\nlisten = \"0.0.0.0:",
    );
    assert!(
        err.contains("is not a loopback address: set postgres.tls-cert"),
        "{err}"
    );
    // An upstream off loopback must say how TLS to it is verified.
    let err = refused(
        "postgres://airlock@127.0.0.1:5433/app",
        "postgres://airlock@db.internal:5433/app",
    );
    assert!(
        err.contains("is not on loopback: add ?sslmode=verify-full"),
        "{err}"
    );
    let err = refused(
        "max-body-bytes = 4096",
        "max-body-bytes = 4096\nlisten-backlog = 5",
    );
    assert!(err.contains("unknown field `listen-backlog`"), "{err}");
}

#[test]
fn the_agent_api_speaks_tls_when_configured() {
    let mut gw = Gateway::prepare("");
    let dir = gw.dir.path();
    let (ca, cert, key) = crate::support::test_certificates(dir, "api");
    gw.edit_config(
        "max-body-bytes = 4096",
        &format!("max-body-bytes = 4096\ntls-cert = {cert:?}\ntls-key = {key:?}"),
    );
    let mut child = airlock()
        .arg("--data")
        .arg(gw.data())
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the gateway's endpoints", || gw.read_endpoints());
    let https = format!("https://127.0.0.1:{}/healthz", gw.port);
    let curl = |extra: &[&str], url: &str| {
        Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(extra)
            .arg(url)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap()
    };
    let cacert = ["--cacert", ca.to_str().unwrap()];
    wait_for("the TLS listener", || curl(&cacert, &https) == "200");
    // Plain HTTP to the TLS port gets no HTTP answer; an unknown CA is refused.
    assert_eq!(
        curl(&[], &format!("http://127.0.0.1:{}/healthz", gw.port)),
        "000"
    );
    assert_eq!(curl(&[], &https), "000");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Every file under `dir`, with its bytes: to show a reader left a store as it was.
/// The range in "entries A to B of the N this gateway acknowledged cannot be read".
fn lost_entries(said: &str) -> (u64, u64) {
    let after = &said[said.find("; entries ").expect(said) + "; entries ".len()..];
    let mut words = after.split(' ');
    let first = words.next().unwrap().parse().expect(said);
    assert_eq!(words.next(), Some("to"), "{said}");
    (first, words.next().unwrap().parse().expect(said))
}

/// Panics naming the files that differ, if any.
fn assert_same_files(got: &[(PathBuf, Vec<u8>)], want: &[(PathBuf, Vec<u8>)], what: &str) {
    if got != want {
        let names = |files: &[(PathBuf, Vec<u8>)]| -> Vec<String> {
            files
                .iter()
                .map(|(p, b)| format!("{} ({} bytes)", p.display(), b.len()))
                .collect()
        };
        let (got, want) = (names(got), names(want));
        let added: Vec<_> = got.iter().filter(|f| !want.contains(f)).collect();
        let removed: Vec<_> = want.iter().filter(|f| !got.contains(f)).collect();
        panic!("{what}: now {added:?}, before {removed:?} (or same names, other bytes)");
    }
}

fn tree_bytes(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(root).unwrap().to_path_buf();
                files.push((relative, std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// The record cannot be shortened quietly: a store whose tail is gone, or whose
/// journal has a flipped byte, fails `audit verify` naming what is missing, and the
/// store's files are byte-identical afterwards; `serve` refuses such a store until an
/// operator accepts the loss, and the acceptance is an entry of the log.
#[test]
fn a_shortened_record_is_named_by_verify_refused_by_serve_and_accepted_on_record() {
    let mut gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    for _ in 0..5 {
        gw.ask(&token, "prod-db", TASK, "read", "10m");
    }
    gw.stop(false);
    let store = gw.data().join("store");
    let before = tree_bytes(&store);
    let ok = gw.cli(&["audit", "verify"]);
    assert!(ok.status.success(), "{}", text(&ok));
    assert_eq!(tree_bytes(&store), before, "verify changed the store");

    let saved = gw.data().join("../store.saved");
    let cp = |from: &Path, to: &Path| {
        let status = Command::new("cp")
            .arg("-a")
            .arg(from)
            .arg(to)
            .status()
            .unwrap();
        assert!(status.success());
    };
    cp(&store, &saved);
    let head_before = std::fs::read(gw.data().join("store.head")).unwrap();

    // A flipped byte near the end of the newest journal's data.
    let mut journals: Vec<_> = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .collect();
    journals.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok())
    });
    let newest = journals.last().expect("a journal").clone();
    let original = std::fs::read(&newest).unwrap();
    let end = original
        .iter()
        .rposition(|&b| b != 0)
        .expect("journal data");
    // A flipped byte in the middle of the journal's data: the entries written from
    // there on are unreadable.
    let at = end / 2;
    let mut flipped = original.clone();
    flipped[at] ^= 0x01;
    std::fs::write(&newest, &flipped).unwrap();
    let damaged = tree_bytes(&store);
    let out = gw.cli(&["audit", "verify"]);
    let said = text(&out);
    assert!(
        !out.status.success(),
        "a flipped journal byte verified: {said}"
    );
    assert!(!said.contains("ok:"), "{said}");
    // Named by file, byte and entry; fjall's own words are not the message.
    let journal = newest.file_name().unwrap().to_str().unwrap();
    let named = format!("the store's journal {journal} is damaged from byte ");
    assert!(said.contains(&named), "{said}");
    let lost = lost_entries(&said);
    assert!(lost.0 < lost.1 && lost.1 == 13, "{said}");
    assert!(
        !said.contains("ChecksumMismatch") && !said.contains("fjall"),
        "{said}"
    );
    let offset: usize = said[said.find(&named).unwrap() + named.len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        offset <= at,
        "the damage starts after the flipped byte: {said}"
    );
    assert_same_files(
        &tree_bytes(&store),
        &damaged,
        "verify changed the damaged store",
    );
    // serve refuses it the same way, and says what to do.
    let refused = gw.refused_start();
    assert!(refused.contains(&named), "{refused}");
    assert!(refused.contains("airlock audit accept-loss"), "{refused}");
    // The journal, the evidence, is as it was (fjall's open in place has removed
    // superseded version files of a keyspace before it refused the journal).
    let journals = |files: &[(PathBuf, Vec<u8>)]| -> Vec<(PathBuf, Vec<u8>)> {
        files
            .iter()
            .filter(|(p, _)| p.extension().is_some_and(|e| e == "jnl"))
            .cloned()
            .collect()
    };
    assert_same_files(
        &journals(&tree_bytes(&store)),
        &journals(&damaged),
        "serve changed the damaged journal",
    );
    // Accepting the loss cuts the journal there, keeps the store as it was, and
    // records where it was cut.
    let before_accept = tree_bytes(&store);
    let out = gw.cli(&["audit", "accept-loss", "--reason", "disk fault on host 7"]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("accepted and recorded"), "{said}");
    let kept: Vec<_> = std::fs::read_dir(gw.data())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("store.damaged-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{}", text(&out));
    assert_same_files(
        &tree_bytes(&kept[0]),
        &before_accept,
        "the damaged store is kept as it was",
    );
    let out = gw.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", text(&out));
    let accepted = gw.events("record.loss-accepted");
    assert_eq!(accepted.len(), 1, "{}", text(&out));
    assert_eq!(accepted[0]["detail"]["cut"]["journal"], journal);
    assert_eq!(accepted[0]["detail"]["cut"]["offset"], offset);
    // Back to the undamaged store for the cases below.
    std::fs::remove_dir_all(&store).unwrap();
    std::fs::remove_dir_all(&kept[0]).unwrap();
    std::fs::write(gw.data().join("store.head"), &head_before).unwrap();
    cp(&saved, &store);
    assert_eq!(tree_bytes(&store), before);

    // A lost tail: the last two entries gone (as a cut-back journal leaves it).
    {
        let spaces = airlock::record::Spaces::open(&store).unwrap();
        let len = spaces.audit_len().unwrap();
        for seq in [len - 1, len - 2] {
            spaces.audit.remove(seq.to_be_bytes()).unwrap();
        }
    }
    let cut = tree_bytes(&store);
    let out = gw.cli(&["audit", "verify"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("does NOT verify: the store holds 12 entries but this gateway acknowledged 14: entries 12 to 13 are missing"),
        "{said}"
    );
    assert_eq!(tree_bytes(&store), cut);

    // serve refuses it, saying what is missing and what to do.
    let refused = gw.refused_start();
    assert!(
        refused.contains("shorter than this gateway acknowledged")
            && refused.contains("entries 12 to 13 are missing")
            && refused.contains("airlock audit accept-loss"),
        "{refused}"
    );
    let out = gw.cli(&[
        "audit",
        "accept-loss",
        "--reason",
        "disk fault on 2026-11-29, ticket 42",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    gw.spawn();
    let accepted = gw.events("record.loss-accepted");
    assert_eq!(accepted.len(), 1, "{accepted:?}");
    let detail = &accepted[0]["detail"];
    assert_eq!(detail["found_entries"], 12, "{detail}");
    assert_eq!(detail["acknowledged"]["entries"], 14, "{detail}");
    assert!(
        detail["reason"]
            .as_str()
            .unwrap()
            .starts_with("disk fault on 2026-11-29, ticket 42 (accepted by uid:"),
        "{detail}"
    );
    // It serves again.
    let (status, _) = gw.ask(&token, "prod-db", TASK, "read", "10m");
    assert_eq!(status, 201);

    // A deleted mark is not a store from before marks: it is refused the same way.
    gw.stop(false);
    std::fs::remove_file(gw.data().join("store.head")).unwrap();
    let out = gw.cli(&["audit", "verify"]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("store.head) is missing"), "{said}");
    assert!(gw.refused_start().contains("is missing"));
    let out = gw.cli(&["audit", "accept-loss", "--reason", "mark deleted in test"]);
    assert!(out.status.success(), "{}", text(&out));
    gw.spawn();
    assert_eq!(gw.events("record.loss-accepted").len(), 2);
}

/// A policy directory made writable by others while the gateway runs: every decision
/// is denied (and that recorded) until it is fixed; then the bundle is loaded again.
#[test]
fn a_policy_directory_made_writable_at_run_time_stops_decisions_until_fixed() {
    use std::os::unix::fs::PermissionsExt;
    let gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    assert_eq!(gw.ask(&token, "prod-db", TASK, "read", "10m").0, 201);
    let bundles = gw.data().join("policy/bundles");
    std::fs::set_permissions(&bundles, std::fs::Permissions::from_mode(0o770)).unwrap();
    let mut denied = Value::Null;
    wait_for("decisions to stop", || {
        let (status, answer) = gw.ask(&token, "prod-db", TASK, "read", "10m");
        denied = answer;
        status == 403
    });
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("the policy directory is unsafe"),
        "{denied}"
    );
    assert_eq!(gw.events("policy.unsafe").len(), 1);
    std::fs::set_permissions(&bundles, std::fs::Permissions::from_mode(0o700)).unwrap();
    wait_for("decisions to resume", || {
        gw.ask(&token, "prod-db", TASK, "read", "10m").0 == 201
    });
    assert_eq!(
        gw.events("policy.activated").len(),
        2,
        "loaded again, checked"
    );
}

/// A checkpoint witness outside the data directory: `audit verify --witness` proves
/// the log extends every checkpoint the gateway ever signed, and catches a gateway
/// that signs over a rewritten (here: shortened, then continued) history.
#[test]
fn a_witness_file_catches_a_rewritten_history() {
    let mut gw = Gateway::prepare("");
    let outside = crate::support::tempdir();
    let witness = outside.path().join("witness.jsonl");
    gw.edit_config(
        "checkpoint-interval = \"1s\"",
        &format!(
            "checkpoint-interval = \"1s\"\nwitness = {:?}",
            witness.to_str().unwrap()
        ),
    );
    gw.spawn();
    let token = gw.agent("claude", &[]);
    for _ in 0..6 {
        gw.ask(&token, "prod-db", TASK, "read", "10m");
    }
    gw.stop(false);
    let witness_arg = witness.to_str().unwrap();
    let out = gw.cli(&["audit", "verify", "--witness", witness_arg]);
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("consistent with all"), "{said}");
    let witnessed = std::fs::read_to_string(&witness).unwrap().lines().count();
    assert!(witnessed >= 2, "{witnessed} checkpoints witnessed");

    // History rewritten: the tail cut, the loss accepted, new entries signed over it.
    {
        let spaces = airlock::record::Spaces::open(&gw.data().join("store")).unwrap();
        let len = spaces.audit_len().unwrap();
        for seq in [len - 1, len - 2, len - 3] {
            spaces.audit.remove(seq.to_be_bytes()).unwrap();
        }
        // And the checkpoints it kept itself, so its own store shows nothing amiss.
        let signed: Vec<_> = spaces
            .checkpoints
            .iter()
            .map(|kv| kv.key().unwrap().to_vec())
            .collect();
        for key in signed {
            spaces.checkpoints.remove(key).unwrap();
        }
    }
    let out = gw.cli(&["audit", "accept-loss", "--reason", "testing a rewrite"]);
    assert!(out.status.success(), "{}", text(&out));
    gw.spawn();
    for _ in 0..3 {
        gw.ask(&token, "prod-db", TASK, "read", "10m");
    }
    gw.stop(false);
    let out = gw.cli(&["audit", "verify", "--witness", witness_arg]);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("NOT consistent"), "{said}");

    // A witness inside the data directory is refused at start.
    let inside = gw.data().join("witness.jsonl");
    gw.edit_config(
        &format!("witness = {:?}", witness_arg),
        &format!("witness = {:?}", inside.to_str().unwrap()),
    );
    assert!(gw.refused_start().contains("outside the data directory"));
}

/// `audit tail -f` streams entries as the running gateway records them.
#[test]
fn audit_tail_follows_new_entries() {
    use std::io::BufRead as _;
    let gw = Gateway::start();
    let token = gw.agent("claude", &[]);
    let mut tail = airlock()
        .arg("--data")
        .arg(gw.data())
        .args(["audit", "tail", "-n", "0", "-f"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = tail.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let (status, grant) = gw.ask(&token, "prod-db", TASK, "read", "10m");
    assert_eq!(status, 201);
    let id = grant["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("grant.decided") && l.contains(id))
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(_) => panic!("no grant.decided followed: {seen:?}"),
        }
    }
    let _ = tail.kill();
    let _ = tail.wait();
    assert!(
        !seen.iter().any(|l| l.contains("agent.added")),
        "-n 0 starts after the existing entries: {seen:?}"
    );
}
