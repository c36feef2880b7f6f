//! The SSH gateway against a real OpenSSH `sshd` on loopback, with the real `ssh`
//! client as the agent runs it.
//!
//! `sshd` runs as root (an sshd that is not root cannot give a session a terminal) and
//! lets in one unprivileged user, `airlock-ssh`, made for the tests, by key. One sshd serves every test of this binary; each test keeps its
//! markers in a directory of its own.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::gateway::{Gateway, free_port, wait_for};
use crate::support::{tempdir, text};

/// The audit entry kinds only the SSH gateway writes: the run of
/// `an_ssh_run_exports_every_ssh_kind_following_the_schema` covers them, the record
/// tests' run covers the rest.
pub const SSH_KINDS: &[&str] = &[
    "ssh.request",
    "ssh.result",
    "ssh.cast",
    "sftp.operation",
    "sftp.transfer",
];

/// The upstream user the gateway logs in as.
const UPSTREAM_USER: &str = "airlock-ssh";

struct Sshd {
    dir: PathBuf,
    port: u16,
    /// `ssh-ed25519 AAAA…`: what a target pins.
    host_key: String,
    /// The private key the gateway logs in with (OpenSSH format).
    client_key: String,
}

fn sshd() -> &'static Sshd {
    static SSHD: OnceLock<Sshd> = OnceLock::new();
    SSHD.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("airlock-sshd-{}", airlock::fsperm::random_suffix()));
        std::fs::create_dir(&dir).unwrap();
        let keygen = |name: &str| {
            let out = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", text(&out));
        };
        keygen("host_key");
        keygen("client_key");
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = free_port();
        let d = dir.display();
        std::fs::write(
            dir.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n\
                 AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 PubkeyAuthentication yes\nPermitRootLogin no\nAllowUsers {UPSTREAM_USER}\n\
                 AllowTcpForwarding yes\nSubsystem sftp internal-sftp\nLogLevel VERBOSE\n"
            ),
        )
        .unwrap();
        // The upstream user: a plain account with a shell, not locked (sshd refuses
        // locked accounts) and with no password (`*`: only its key logs in).
        let exists = Command::new("id").arg(UPSTREAM_USER).output().unwrap();
        if !exists.status.success() {
            let out = Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/bash", UPSTREAM_USER])
                .output()
                .unwrap();
            assert!(out.status.success(), "useradd: {}", text(&out));
        }
        let out = Command::new("usermod")
            .args(["-p", "*", UPSTREAM_USER])
            .output()
            .unwrap();
        assert!(out.status.success(), "usermod: {}", text(&out));
        // Privilege separation's empty directory, as Debian's service would make it.
        std::fs::create_dir_all("/run/sshd").unwrap();
        // In the foreground under a watchdog that stops it once this test process is
        // gone: a shared server has no owner to drop it.
        let watchdog = format!(
            "/usr/sbin/sshd -D -f {d}/sshd_config -E {d}/sshd.log & s=$!; \
             while kill -0 {pid} 2>/dev/null && kill -0 $s 2>/dev/null; do sleep 1; done; kill $s",
            pid = std::process::id()
        );
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(watchdog)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::spawn(move || watchdog.wait());
        wait_for("sshd to listen", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let host_key = std::fs::read_to_string(dir.join("host_key.pub")).unwrap();
        let host_key = host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let client_key = std::fs::read_to_string(dir.join("client_key")).unwrap();
        Sshd {
            dir,
            port,
            host_key,
            client_key,
        }
    })
}

/// A gateway with SSH targets in front of the shared sshd, and an enrolled agent.
struct SshSetup {
    gw: Gateway,
    token: String,
    /// A directory of this test's own on the upstream, writable by its user.
    markers: PathBuf,
    client_dir: tempfile::TempDir,
}

impl SshSetup {
    fn new() -> Self {
        Self::build("", "")
    }

    /// `extra` is more configuration (targets) after `web-1`.
    fn with_targets(extra: &str) -> Self {
        Self::build("", extra)
    }

    /// More labels on `web-1`; `{m}` in them is this test's marker directory.
    fn with_labels(labels: &str) -> Self {
        Self::build(labels, "")
    }

    fn build(labels: &str, extra: &str) -> Self {
        let sshd = sshd();
        let markers = sshd
            .dir
            .join(format!("markers-{}", airlock::fsperm::random_suffix()));
        std::fs::create_dir(&markers).unwrap();
        assert!(
            Command::new("chown")
                .arg(format!("{UPSTREAM_USER}:{UPSTREAM_USER}"))
                .arg(&markers)
                .status()
                .unwrap()
                .success()
        );
        let config = format!(
            r#"
[[target]]
name = "web-1"
kind = "ssh"
upstream = "ssh://{UPSTREAM_USER}@127.0.0.1:{port}"
host-key = "{host_key}"
credential = "secret:web-1-key"
labels = {{ ssh-allow = "sleep *;cat {m}/**", ssh-shell = "allow"{labels} }}
{extra}
"#,
            port = sshd.port,
            host_key = sshd.host_key,
            m = markers.display(),
            labels = if labels.is_empty() {
                String::new()
            } else {
                format!(
                    ", {}",
                    labels.replace("{m}", &markers.display().to_string())
                )
            },
        );
        let mut gw = Gateway::prepare(&config);
        let secrets = gw.data().join("secrets.toml");
        let mut text = std::fs::read_to_string(&secrets).unwrap();
        text.push_str(&format!("web-1-key = '''\n{}'''\n", sshd.client_key));
        std::fs::write(&secrets, text).unwrap();
        gw.spawn();
        let token = gw.agent("claude", &[]);
        SshSetup {
            gw,
            token,
            markers,
            client_dir: tempdir(),
        }
    }

    fn endpoints(&self) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(self.gw.data().join("endpoints.json")).unwrap(),
        )
        .unwrap()
    }

    /// A grant for `target` with `access`; returns (id, secret).
    fn grant(&self, target: &str, access: &str) -> (String, String) {
        let (mut status, mut grant) = self.gw.ask(
            &self.token,
            target,
            "check the web server's health after the deploy",
            access,
            "10m",
        );
        if status == 202 {
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

    /// `ssh` through the gateway as an agent runs it: password from an askpass
    /// program, the gateway's host key pinned, no prompt ever.
    fn ssh_command(&self, grant: &(String, String), args: &[&str]) -> Command {
        let mut command = self.openssh("ssh", grant);
        command
            .args(["-p", &self.ssh_port()])
            .args(args)
            .arg(format!("{}@127.0.0.1", grant.0));
        command
    }

    fn ssh_port(&self) -> String {
        let endpoints = self.endpoints();
        let addr = endpoints["ssh"].as_str().unwrap();
        addr.rsplit_once(':').unwrap().1.to_string()
    }

    /// One of OpenSSH's clients (`ssh`, `scp`, `sftp`) set up as an agent runs it, with
    /// no destination yet (`scp` and `sftp` get the port here).
    fn openssh(&self, program: &str, grant: &(String, String)) -> Command {
        let dir = self.client_dir.path();
        let askpass = dir.join(format!("askpass-{}", grant.0));
        std::fs::write(&askpass, format!("#!/bin/sh\necho '{}'\n", grant.1)).unwrap();
        std::fs::set_permissions(
            &askpass,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let endpoints = self.endpoints();
        let addr = endpoints["ssh"].as_str().unwrap();
        let (_, port) = addr.rsplit_once(':').unwrap();
        let known_hosts = dir.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!(
                "[127.0.0.1]:{port} {}\n",
                endpoints["ssh_host_key"].as_str().unwrap()
            ),
        )
        .unwrap();
        let mut command = Command::new(program);
        command
            .env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .args(["-F", "/dev/null"]);
        if program != "ssh" {
            command.args(["-P", port]);
        }
        command
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
            .args([
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "PreferredAuthentications=password",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "ConnectTimeout=10",
                "-o",
                "NumberOfPasswordPrompts=1",
                // Before sftp's own `-b` (ssh takes an option's first value): the
                // password still comes from the askpass program.
                "-o",
                "BatchMode=no",
            ]);
        command
    }

    fn ssh(&self, grant: &(String, String), command: &str) -> Output {
        self.ssh_command(grant, &[]).arg(command).output().unwrap()
    }

    fn marker(&self, name: &str) -> PathBuf {
        self.markers.join(name)
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_allowed_exec_returns_its_output_and_status_through_the_gateway() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "read");
    let out = s.ssh(&grant, "whoami");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out).trim(),
        UPSTREAM_USER,
        "ran upstream as the gateway's user"
    );
    let out = s.ssh(&grant, "ls /nonexistent-airlock-path");
    assert_eq!(
        out.status.code(),
        Some(2),
        "ls's own exit status: {}",
        text(&out)
    );
    assert!(stderr(&out).contains("No such file"), "{}", text(&out));

    let requests = s.gw.events("ssh.request");
    let whoami = requests
        .iter()
        .find(|e| e["detail"]["name"] == "whoami")
        .expect("the exec is recorded");
    assert_eq!(whoami["detail"]["verdict"], "allow");
    assert_eq!(whoami["detail"]["sent"], "whoami");
    assert_eq!(whoami["grant"], grant.0.as_str());
    let results = s.gw.events("ssh.result");
    assert!(
        results
            .iter()
            .any(|e| e["detail"]["exit_status"] == 2 && e["detail"]["request"] == "exec"),
        "{results:?}"
    );
    let casts = s.gw.events("ssh.cast");
    assert!(
        casts.iter().any(|c| c.to_string().contains(UPSTREAM_USER)),
        "exec output is recorded: {casts:?}"
    );
}

#[test]
fn each_shell_bypass_is_denied_and_nothing_runs_upstream() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "read");
    let marker = s.marker("ran");
    let m = marker.display();
    for command in [
        format!("ls; touch {m}"),
        format!("ls && touch {m}"),
        format!("ls || touch {m}"),
        format!("echo touch {m} | sh"),
        format!("ls $(touch {m})"),
        format!("ls `touch {m}`"),
        format!("cat > {m}"),
        format!("ls\ntouch {m}"),
        format!("ls & touch {m}"),
        format!("(touch {m})"),
        format!("PATH=/x touch {m}"),
        format!("ls \"$(touch {m})\""),
        format!("touch {m}"),
    ] {
        let out = s.ssh(&grant, &command);
        assert_eq!(
            out.status.code(),
            Some(126),
            "{command:?} was not denied: {}",
            text(&out)
        );
        assert!(
            stderr(&out).contains("airlock: denied"),
            "{command:?}: {}",
            text(&out)
        );
        assert!(!marker.exists(), "{command:?} ran upstream");
    }
    // Quoted, a metacharacter is an argument: the upstream sees the same argv, so
    // nothing but `ls` runs (and fails on the odd file name).
    let out = s.ssh(&grant, &format!("ls '/nonexistent;touch {m}'"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(!marker.exists(), "a quoted ; ran a second command upstream");

    let denials: Vec<Value> =
        s.gw.events("ssh.request")
            .into_iter()
            .filter(|e| e["detail"]["verdict"] == "deny")
            .collect();
    assert!(denials.len() >= 13, "every denial is recorded: {denials:?}");
    assert!(denials.iter().all(|e| e["detail"].get("sent").is_none()));
}

#[test]
fn a_changed_upstream_host_key_is_refused_clearly() {
    let other_key =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ";
    let s = SshSetup::with_targets(&format!(
        r#"
[[target]]
name = "web-2"
kind = "ssh"
upstream = "ssh://{UPSTREAM_USER}@127.0.0.1:{port}"
host-key = "{other_key}"
credential = "secret:web-1-key"
"#,
        port = sshd().port
    ));
    let grant = s.grant("web-2", "read");
    let out = s.ssh(&grant, "whoami");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("host key is not the one pinned"),
        "{}",
        text(&out)
    );
    assert!(
        s.gw.events("session.opened").is_empty(),
        "no session was opened"
    );
    let refused = s.gw.events("session.refused");
    assert!(
        refused.iter().any(|e| e["detail"]["code"] == "upstream"
            && e["detail"]["target"] == "web-2"
            && e["detail"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("host key"))),
        "the refusal is recorded: {refused:?}"
    );
}

#[test]
fn wrong_expired_and_other_target_secrets_are_refused_at_authentication() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "read");
    let wrong = (grant.0.clone(), "not-the-secret".to_string());
    let out = s.ssh(&wrong, "whoami");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    assert!(stderr(&out).contains("Permission denied"), "{}", text(&out));
    // A PostgreSQL grant's secret opens nothing here.
    let pg = s.grant("prod-db", "read");
    let out = s.ssh(&pg, "whoami");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    // A revoked grant is refused too.
    let out = s.gw.cli(&["grants", "revoke", &grant.0]);
    assert!(out.status.success(), "{}", text(&out));
    let out = s.ssh(&grant, "whoami");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    let refused = s.gw.events("session.refused");
    assert!(
        refused
            .iter()
            .filter(|e| e["detail"]["protocol"] == "ssh")
            .count()
            >= 3
    );
    assert!(
        !refused
            .iter()
            .any(|e| e.to_string().contains("not-the-secret")),
        "no secret in the record"
    );
}

#[test]
fn port_forwarding_and_agent_forwarding_are_refused_and_recorded() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "read");
    // `-W`: stdio forwarding through a direct-tcpip channel.
    let out = s
        .ssh_command(&grant, &["-W", &format!("127.0.0.1:{}", sshd().port)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let requests = s.gw.events("ssh.request");
    assert!(
        requests
            .iter()
            .any(|e| e["detail"]["request"] == "direct-tcpip" && e["detail"]["verdict"] == "deny"),
        "{requests:?}"
    );
    let out = s
        .ssh_command(&grant, &["-A"])
        .arg("whoami")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the command itself runs: {}",
        text(&out)
    );
}

/// Starts `sleep SECONDS` upstream under `grant`, ends the grant with `end`, and checks
/// that the client was told, cut, and the remote process is gone.
fn cut_mid_command(s: &SshSetup, grant: &(String, String), seconds: &str, end: impl FnOnce()) {
    let mut child = s
        .ssh_command(grant, &[])
        .arg(format!("sleep {seconds}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pattern = format!("^sleep {seconds}$");
    let running = || {
        Command::new("pgrep")
            .args(["-u", UPSTREAM_USER, "-f", &pattern])
            .output()
            .unwrap()
            .status
            .success()
    };
    wait_for("the remote sleep to start", running);
    end();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the ssh client was not cut");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("the grant ended"), "{}", text(&out));
    wait_for("the remote sleep to be gone", || !running());
    let closed = s.gw.events("session.closed");
    assert!(!closed.is_empty(), "the session is closed in the record");
}

#[test]
fn the_grants_revocation_cuts_a_running_command_and_the_remote_process_is_gone() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "read");
    cut_mid_command(&s, &grant, "61.5", || {
        let out = s.gw.cli(&["grants", "revoke", &grant.0]);
        assert!(out.status.success(), "{}", text(&out));
    });
}

#[test]
fn the_grants_expiry_cuts_a_running_command_and_the_remote_process_is_gone() {
    let s = SshSetup::new();
    let (status, grant) = s.gw.ask(
        &s.token,
        "web-1",
        "check the web server's health after the deploy",
        "read",
        "4s",
    );
    assert_eq!(status, 201, "{grant}");
    let grant = (
        grant["id"].as_str().unwrap().to_string(),
        grant["secret"].as_str().unwrap().to_string(),
    );
    // The grant's window passes while the command runs.
    cut_mid_command(&s, &grant, "62.5", || {});
    let ended = s.gw.events("grant.expired");
    assert!(
        ended.iter().any(|e| e["grant"] == grant.0.as_str()),
        "{ended:?}"
    );
}

#[test]
fn an_allowed_shell_is_recorded_and_replays_to_the_same_output() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "write");
    let mut child = s
        .ssh_command(&grant, &["-tt"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        stdin
            .write_all(b"echo shell-$((6*7))-done\nexit\n")
            .unwrap();
    }
    let shown = child.wait_with_output().unwrap();
    assert!(stdout(&shown).contains("shell-42-done"), "{}", text(&shown));
    let requests = s.gw.events("ssh.request");
    let shell = requests
        .iter()
        .find(|e| e["detail"]["request"] == "shell")
        .expect("the shell is recorded");
    assert_eq!(shell["detail"]["verdict"], "allow");
    assert!(shell["detail"]["pty"]["term"].is_string());
    let session = shell["detail"]["session"].as_str().unwrap();
    let cast_file = s.gw.dir.path().join("shell.cast");
    let out = s.gw.cli(&[
        "sessions",
        "replay",
        session,
        "--cast",
        cast_file.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let cast = std::fs::read_to_string(&cast_file).unwrap();
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    let replayed: String = lines
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap().to_string())
        .collect();
    assert!(replayed.contains("shell-42-done"), "{replayed}");
    // What the terminal showed, byte for byte, is what the client received.
    assert_eq!(replayed.as_bytes(), &shown.stdout[..]);
    // The typed input went through the record before it reached the shell.
    assert!(
        s.gw.events("ssh.cast")
            .iter()
            .any(|c| c["detail"]["events"].to_string().contains("\"i\"")),
        "input is recorded"
    );
    let verify = s.gw.cli(&["audit", "verify"]);
    assert!(verify.status.success(), "{}", text(&verify));
}

/// The SFTP tree of a test: `logs/app.log` inside what the target lets grants read,
/// `secret.txt` outside it, and a link from inside to outside.
fn sftp_tree(s: &SshSetup) -> (PathBuf, PathBuf) {
    let logs = s.marker("logs");
    std::fs::create_dir(&logs).unwrap();
    std::fs::write(logs.join("app.log"), "line one\nline two\n").unwrap();
    let secret = s.marker("secret.txt");
    std::fs::write(&secret, "not for agents\n").unwrap();
    std::os::unix::fs::symlink(&secret, logs.join("shadow")).unwrap();
    assert!(
        Command::new("chown")
            .args(["-R", &format!("{UPSTREAM_USER}:{UPSTREAM_USER}")])
            .arg(&s.markers)
            .status()
            .unwrap()
            .success()
    );
    (logs, secret)
}

/// Labels letting grants read `logs/` over SFTP, unmasked (the example bundle's
/// `pii-mask` applies to SSH targets: without the opt-in, SFTP reads are refused).
const UNMASKED_SFTP: &str = "sftp-read = \"{m}/logs/**\", sftp-unmasked = \"allow\"";

/// Runs `sftp -b` with `batch` (each command's failure tolerated with `-`).
fn sftp(s: &SshSetup, grant: &(String, String), batch: &str) -> Output {
    let file = s.client_dir.path().join("batch");
    std::fs::write(&file, batch).unwrap();
    s.openssh("sftp", grant)
        .arg("-b")
        .arg(&file)
        .arg(format!("{}@127.0.0.1", grant.0))
        .output()
        .unwrap()
}

#[test]
fn sftp_reads_what_policy_allows_and_writes_nothing_under_a_read_grant() {
    let s = SshSetup::with_labels(UNMASKED_SFTP);
    let (logs, secret) = sftp_tree(&s);
    let grant = s.grant("web-1", "read");
    let local = s.client_dir.path();
    let upload = local.join("upload.txt");
    std::fs::write(&upload, "from the agent\n").unwrap();
    let out = sftp(
        &s,
        &grant,
        &format!(
            "get {logs}/app.log {local}/got.log\n\
             -put {upload} {logs}/put.txt\n\
             -rm {logs}/app.log\n\
             -rename {logs}/app.log {logs}/moved.log\n\
             -mkdir {logs}/newdir\n\
             -get {logs}/shadow {local}/shadow\n\
             -get {logs}/../secret.txt {local}/secret\n\
             -get {secret} {local}/secret2\n",
            logs = logs.display(),
            local = local.display(),
            upload = upload.display(),
            secret = secret.display(),
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(local.join("got.log")).unwrap(),
        "line one\nline two\n",
        "the allowed read arrived whole"
    );
    // Upstream, nothing changed and nothing outside the tree was read.
    assert!(logs.join("app.log").exists(), "rm was refused");
    assert!(!logs.join("put.txt").exists(), "put was refused");
    assert!(!logs.join("moved.log").exists(), "rename was refused");
    assert!(!logs.join("newdir").exists(), "mkdir was refused");
    for name in ["shadow", "secret", "secret2"] {
        assert!(
            !local.join(name).exists(),
            "{name} was read past the policy"
        );
    }
    let ops = s.gw.events("sftp.operation");
    let read = ops
        .iter()
        .find(|e| e["detail"]["op"] == "open-read" && e["detail"]["verdict"] == "allow")
        .expect("the allowed read is recorded");
    assert_eq!(
        read["detail"]["path"],
        format!("{}/app.log", logs.display())
    );
    // The link was decided on where it leads, not on its name, and the `..` path
    // on where the server puts it: nothing read outside the tree was allowed.
    let secret_path = secret.display().to_string();
    assert!(
        ops.iter().any(
            |e| e["detail"]["path"] == secret_path.as_str() && e["detail"]["verdict"] == "deny"
        ),
        "{ops:?}"
    );
    assert!(
        !ops.iter()
            .any(|e| e["detail"]["path"] == secret_path.as_str()
                && e["detail"]["verdict"] == "allow"),
        "{ops:?}"
    );
    for op in ["open-write", "remove", "rename", "mkdir"] {
        assert!(
            ops.iter()
                .any(|e| e["detail"]["op"] == op && e["detail"]["verdict"] == "deny"),
            "{op} refusal recorded: {ops:?}"
        );
    }
    let transfers = s.gw.events("sftp.transfer");
    assert!(
        transfers
            .iter()
            .any(|t| t["detail"]["bytes_read"] == 18 && t["detail"]["bytes_written"] == 0),
        "{transfers:?}"
    );
}

#[test]
fn scp_downloads_an_allowed_file_and_cannot_upload() {
    let s = SshSetup::with_labels(UNMASKED_SFTP);
    let (logs, _) = sftp_tree(&s);
    let grant = s.grant("web-1", "read");
    let local = s.client_dir.path().join("copy.log");
    let out = s
        .openssh("scp", &grant)
        .arg(format!("{}@127.0.0.1:{}/app.log", grant.0, logs.display()))
        .arg(&local)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&local).unwrap(),
        "line one\nline two\n"
    );
    let out = s
        .openssh("scp", &grant)
        .arg(&local)
        .arg(format!(
            "{}@127.0.0.1:{}/uploaded.log",
            grant.0,
            logs.display()
        ))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        !logs.join("uploaded.log").exists(),
        "nothing was written upstream"
    );
}

#[test]
fn exec_output_is_masked_line_by_line_where_a_masking_module_applies() {
    let s = SshSetup::new();
    let log = s.marker("app.log");
    std::fs::write(
        &log,
        "login by alice@example.com ok\nplain line\nlast, unfinished: bob@example.org",
    )
    .unwrap();
    let grant = s.grant("web-1", "read");
    let out = s.ssh(&grant, &format!("cat {}", log.display()));
    assert!(out.status.success(), "{}", text(&out));
    let shown = stdout(&out);
    assert!(!shown.contains("alice@example.com"), "{shown}");
    assert!(
        !shown.contains("bob@example.org"),
        "the unfinished last line is masked too: {shown}"
    );
    assert!(shown.contains("plain line\n"), "{shown}");
    assert!(shown.contains("@example.com"), "{shown}");
    // stderr too: a name in an error message.
    let out = s.ssh(
        &grant,
        &format!("cat {}/carol@example.net", s.markers.display()),
    );
    assert!(
        !stderr(&out).contains("carol@example.net"),
        "{}",
        text(&out)
    );
    assert!(stderr(&out).contains("No such file"), "{}", text(&out));
    // The record holds what the agent saw, not the unmasked output.
    let casts = s.gw.events("ssh.cast");
    assert!(!casts.is_empty());
    assert!(
        casts
            .iter()
            .all(|c| !c.to_string().contains("alice@example.com")),
        "{casts:?}"
    );
    let results = s.gw.events("ssh.result");
    assert!(
        results.iter().all(|r| r["detail"]["masked"] == true),
        "{results:?}"
    );
}

#[test]
fn an_ssh_run_exports_every_ssh_kind_following_the_schema() {
    let s = SshSetup::with_labels(UNMASKED_SFTP);
    let (logs, _) = sftp_tree(&s);
    let grant = s.grant("web-1", "read");
    let out = s.ssh(&grant, "whoami");
    assert!(out.status.success(), "{}", text(&out));
    let local = s.client_dir.path();
    let out = sftp(
        &s,
        &grant,
        &format!(
            "get {}/app.log {}/got.log\n",
            logs.display(),
            local.display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    // The transfer summary goes with the next entry, or with the session's end.
    let out = s.ssh(&grant, "whoami");
    assert!(out.status.success(), "{}", text(&out));
    let export = local.join("export.jsonl");
    let out =
        s.gw.cli(&["audit", "export", "--out", export.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let mut kinds = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(&export).unwrap().lines() {
        let entry: Value = serde_json::from_str(line).unwrap();
        if entry.get("checkpoint").is_none() {
            crate::gateway::assert_follows_schema(&entry);
            kinds.insert(entry["kind"].as_str().unwrap().to_string());
        }
    }
    for kind in SSH_KINDS {
        assert!(kinds.contains(*kind), "the run wrote no {kind}: {kinds:?}");
    }
}

#[test]
fn airlock_connect_runs_ssh_with_the_grant_and_no_prompt() {
    let s = SshSetup::new();
    let home = tempdir();
    // A temporary directory of this test's own: other tests run `airlock connect` too.
    let tmp = tempdir();
    let connect = |args: &[&str]| {
        crate::support::airlock()
            .env("TMPDIR", tmp.path())
            .env("AIRLOCK_TOKEN", &s.token)
            .env("AIRLOCK_URL", format!("http://127.0.0.1:{}", s.gw.port))
            // No ~/.ssh of the tester's: the host key comes from the grant alone.
            .env("HOME", home.path())
            .env_remove("SSH_AUTH_SOCK")
            .stdin(Stdio::null())
            .arg("connect")
            .args(args)
            .output()
            .unwrap()
    };
    let out = connect(&[
        "web-1",
        "--task",
        "check who the service runs as",
        "--",
        "whoami",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out).trim(), UPSTREAM_USER);
    // A denied command's status comes back as the agent's own.
    let out = connect(&[
        "web-1",
        "--task",
        "check who the service runs as",
        "--",
        "rm -rf /tmp/x",
    ]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out));
    // Nothing of the grant is left on disk: not in the temporary directory, not in HOME.
    let leftovers = crate::support::connect_leftovers(tmp.path());
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        !home.path().join(".ssh/known_hosts").exists(),
        "no known_hosts written in HOME"
    );
}

#[test]
fn sftp_reads_are_refused_where_masking_applies_unless_the_target_opts_in() {
    let s = SshSetup::with_labels("sftp-read = \"{m}/logs/**\"");
    let (logs, _) = sftp_tree(&s);
    let grant = s.grant("web-1", "read");
    let local = s.client_dir.path().join("got.log");
    let out = sftp(
        &s,
        &grant,
        &format!("-get {}/app.log {}\n", logs.display(), local.display()),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!local.exists(), "the file was read past the masking module");
    let ops = s.gw.events("sftp.operation");
    assert!(
        ops.iter().any(|e| e["detail"]["op"] == "open-read"
            && e["detail"]["verdict"] == "deny"
            && e["detail"]["decided_by"] == "gateway"),
        "{ops:?}"
    );
    // The same file through a command comes out masked.
    let out = s.ssh(&grant, &format!("cat {}/app.log", logs.display()));
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn commands_over_one_multiplexed_connection_each_return_their_status() {
    let s = SshSetup::new();
    let grant = s.grant("web-1", "read");
    let control = s.client_dir.path().join("control");
    let control_path = format!("ControlPath={}", control.display());
    let out = s
        .ssh_command(
            &grant,
            &[
                "-o",
                "ControlMaster=yes",
                "-o",
                &control_path,
                "-o",
                "ControlPersist=60",
                "-fN",
            ],
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    // Many short commands in a row, each on a new channel of the one connection: every
    // one must get its exit status (a relayed EOF that overtook it made ssh exit 255).
    for i in 0..30 {
        let out = s
            .ssh_command(&grant, &["-o", &control_path])
            .arg("whoami")
            .output()
            .unwrap();
        assert!(out.status.success(), "command {i}: {}", text(&out));
        assert_eq!(stdout(&out).trim(), UPSTREAM_USER);
    }
    let out = s
        .ssh_command(&grant, &["-o", &control_path, "-O", "exit"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
