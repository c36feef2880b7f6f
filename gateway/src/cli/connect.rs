//! `airlock connect`: the agent's side. Asks the gateway for a grant with the agent's
//! token, waits visibly while an operator reviews it, then runs the target's ordinary
//! client (`psql`, `ssh`, `curl`, `kubectl`) with the grant in its environment or a
//! pipe only (never on disk).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[derive(Args)]
pub(crate) struct ConnectArgs {
    /// The target's name.
    target: String,
    /// What the access is for, in words an operator can check.
    #[arg(long)]
    task: String,
    #[arg(long, default_value = "read", value_parser = ["read", "write", "admin"])]
    access: String,
    #[arg(long, default_value = "10m")]
    ttl: String,
    /// Print the client's environment variables instead of running the client.
    #[arg(long)]
    print_env: bool,
    /// The agent API (default: $AIRLOCK_URL, else http://127.0.0.1:7070).
    #[arg(long)]
    url: Option<String>,
    /// A file holding the agent token (default: $AIRLOCK_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Arguments for the client (psql; ssh: the remote command; curl: its options and
    /// paths on the target, e.g. `-s /v1/orders/42`; kubectl: e.g. `get pods -n shop`),
    /// after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// One request to the agent API.
async fn call(
    base: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<(u16, Value)> {
    let authority = base
        .strip_prefix("http://")
        .map(|a| a.trim_end_matches('/'))
        .with_context(|| format!("agent API URL {base}: only http:// (loopback) is supported by `airlock connect` for now"))?;
    let stream = tokio::net::TcpStream::connect(authority)
        .await
        .with_context(|| format!("cannot reach the agent API at {base}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, authority)
        .header(AUTHORIZATION, format!("Bearer {token}"))
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Tells the agent, on stderr, which grant it holds and until when.
fn announce(args: &ConnectArgs, grant: &Value) {
    eprintln!(
        "airlock: grant {} on {} ({}), until {}",
        grant["id"].as_str().unwrap_or("?"),
        args.target,
        args.access,
        grant["expires_at"].as_str().unwrap_or("?")
    );
}

fn explain(grant: &Value) -> String {
    let mut text = grant["reason"]
        .as_str()
        .or(grant["message"].as_str())
        .unwrap_or("refused")
        .to_string();
    if let Some(hint) = grant["hint"].as_str() {
        text += &format!("\nhint: {hint}");
    }
    text
}

pub(crate) fn run(args: ConnectArgs) -> anyhow::Result<ExitCode> {
    let token = match &args.token_file {
        Some(file) => std::fs::read_to_string(file).with_context(|| file.display().to_string())?,
        None => std::env::var("AIRLOCK_TOKEN")
            .context("no agent token: set AIRLOCK_TOKEN or pass --token-file")?,
    };
    let token = token.trim().to_string();
    let base = args
        .url
        .clone()
        .or_else(|| std::env::var("AIRLOCK_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:7070".to_string());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let grant = runtime.block_on(async {
        let body = json!({ "target": args.target, "task": args.task, "access": args.access, "ttl": args.ttl });
        let (status, grant) = call(&base, &token, "POST", "/v1/grants", Some(body)).await?;
        match status {
            201 => Ok(grant),
            202 => {
                let id = grant["id"].as_str().unwrap_or_default().to_string();
                eprintln!("airlock: grant {id} needs an operator's approval: {}", grant["reason"].as_str().unwrap_or(""));
                loop {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    let (status, grant) = call(&base, &token, "GET", &format!("/v1/grants/{id}"), None).await?;
                    match (status, grant["status"].as_str()) {
                        (200, Some("active")) if grant.get("secret").is_some() => {
                            eprintln!("airlock: grant {id} approved");
                            return Ok(grant);
                        }
                        (200, Some("pending")) => eprintln!("airlock: waiting for approval of grant {id} (until {})", grant["expires_at"].as_str().unwrap_or("?")),
                        _ => bail!("grant {id} was not approved: {}", explain(&grant)),
                    }
                }
            }
            _ => bail!("{}", explain(&grant)),
        }
    })?;
    let connection = &grant["connection"];
    if connection["protocol"] == "ssh" {
        announce(&args, &grant);
        return run_ssh(&args, &grant);
    }
    if connection["protocol"] == "http" {
        announce(&args, &grant);
        return run_curl(&args, &grant);
    }
    if connection["protocol"] == "kubernetes" {
        announce(&args, &grant);
        return run_kubectl(&args, &grant);
    }
    let (Some(host), Some(port)) = (connection["host"].as_str(), connection["port"].as_u64())
    else {
        bail!(
            "the gateway gave no PostgreSQL connection details for target {}",
            args.target
        );
    };
    let env = [
        ("PGHOST", host.to_string()),
        ("PGPORT", port.to_string()),
        (
            "PGUSER",
            connection["user"].as_str().unwrap_or_default().to_string(),
        ),
        (
            "PGPASSWORD",
            connection["password"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        (
            "PGDATABASE",
            connection["database"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        ),
        ("PGSSLMODE", "disable".to_string()),
    ];
    announce(&args, &grant);
    if args.print_env {
        for (key, value) in &env {
            println!("export {key}={value}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let status = std::process::Command::new("psql")
        .args(&args.args)
        .envs(env)
        .status()
        .context("cannot run psql")?;
    Ok(ExitCode::from(
        status.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

/// The environment variable through which `airlock connect` hands the grant secret to
/// itself, run by `ssh` as its askpass program: the secret is never written to disk.
pub(crate) const ASKPASS_SECRET: &str = "AIRLOCK_ASKPASS_SECRET";

/// Run by `ssh` as `SSH_ASKPASS`: prints the secret `airlock connect` put in the
/// environment, once.
pub(crate) fn askpass(secret: String) -> ExitCode {
    println!("{secret}");
    ExitCode::SUCCESS
}

/// `ssh` to the gateway with the grant: the password from `airlock` itself as askpass,
/// the gateway's host key pinned in a private known_hosts file, removed afterwards.
fn run_ssh(args: &ConnectArgs, grant: &Value) -> anyhow::Result<ExitCode> {
    let connection = &grant["connection"];
    let field = |name: &str| {
        connection[name]
            .as_str()
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "the gateway gave no SSH `{name}` for target {}",
                    args.target
                )
            })
    };
    let (host, user, password, host_key) = (
        field("host")?,
        field("user")?,
        field("password")?,
        field("host_key")?,
    );
    let port = connection["port"]
        .as_u64()
        .with_context(|| format!("the gateway gave no SSH port for target {}", args.target))?;
    let known_host = format!("[{host}]:{port} {host_key}");
    if args.print_env {
        println!("export AIRLOCK_SSH_HOST={host} AIRLOCK_SSH_PORT={port} AIRLOCK_SSH_USER={user}");
        println!("export AIRLOCK_SSH_PASSWORD={password}");
        println!("export AIRLOCK_SSH_KNOWN_HOST='{known_host}'");
        return Ok(ExitCode::SUCCESS);
    }
    let dir = std::env::temp_dir().join(format!(
        "airlock-connect-{}",
        airlock::fsperm::random_suffix()
    ));
    airlock::fsperm::create_private_dir(&dir)?;
    let known_hosts = dir.join("known_hosts");
    let run = || -> anyhow::Result<std::process::ExitStatus> {
        airlock::fsperm::write_private_atomic(&known_hosts, format!("{known_host}\n").as_bytes())?;
        std::process::Command::new("ssh")
            .env("SSH_ASKPASS", std::env::current_exe()?)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env(ASKPASS_SECRET, &password)
            .arg("-p")
            .arg(port.to_string())
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
                "NumberOfPasswordPrompts=1",
            ])
            .arg(format!("{user}@{host}"))
            .args(&args.args)
            .status()
            .context("cannot run ssh")
    };
    let status = run();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::from(
        status?.code().unwrap_or(255).clamp(0, 255) as u8
    ))
}

/// The environment variable through which `airlock connect` hands the grant token to
/// itself, run by `kubectl` as its exec credential plugin: never on disk.
pub(crate) const KUBE_TOKEN: &str = "AIRLOCK_KUBE_TOKEN";

/// Run by `kubectl` as an exec credential plugin: prints the token `airlock connect`
/// put in the environment as a `client.authentication.k8s.io/v1` ExecCredential.
pub(crate) fn exec_credential(token: &str) -> ExitCode {
    let credential = json!({
        "apiVersion": "client.authentication.k8s.io/v1",
        "kind": "ExecCredential",
        "status": { "token": token },
    });
    println!("{credential}");
    ExitCode::SUCCESS
}

/// `kubectl` against the gateway with the grant: a kubeconfig in a private temporary
/// directory naming the gateway as the cluster (its certificate as the CA) and
/// `airlock` itself as the exec credential plugin, which answers with the token from
/// kubectl's environment. The kubeconfig holds no secret, and is removed afterwards.
fn run_kubectl(args: &ConnectArgs, grant: &Value) -> anyhow::Result<ExitCode> {
    let connection = &grant["connection"];
    let (Some(url), Some(token)) = (connection["url"].as_str(), connection["token"].as_str())
    else {
        bail!(
            "the gateway gave no Kubernetes URL or token for target {}",
            args.target
        );
    };
    let mut cluster = json!({ "server": url });
    if let Some(ca) = connection["ca"].as_str() {
        cluster["certificate-authority-data"] =
            base64::engine::general_purpose::STANDARD.encode(ca).into();
    }
    let kubeconfig = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": args.target, "cluster": cluster }],
        "users": [{ "name": "airlock", "user": { "exec": {
            "apiVersion": "client.authentication.k8s.io/v1",
            "command": std::env::current_exe()?,
            "interactiveMode": "Never",
            "provideClusterInfo": false,
        }}}],
        "contexts": [{ "name": args.target, "context": { "cluster": args.target, "user": "airlock" } }],
        "current-context": args.target,
    });
    if args.print_env {
        println!("export AIRLOCK_KUBE_URL={url}");
        println!("export {KUBE_TOKEN}={token}");
        return Ok(ExitCode::SUCCESS);
    }
    let dir = std::env::temp_dir().join(format!(
        "airlock-connect-{}",
        airlock::fsperm::random_suffix()
    ));
    airlock::fsperm::create_private_dir(&dir)?;
    let file = dir.join("kubeconfig");
    let run = || -> anyhow::Result<std::process::ExitStatus> {
        airlock::fsperm::write_private_atomic(&file, kubeconfig.to_string().as_bytes())?;
        std::process::Command::new("kubectl")
            .env_remove("KUBECONFIG")
            .env(KUBE_TOKEN, token)
            .arg("--kubeconfig")
            .arg(&file)
            .args(&args.args)
            .status()
            .context("cannot run kubectl")
    };
    let status = run();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::from(
        status?.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

/// curl options that take no value: a path after one of these is a URL's path.
const CURL_FLAGS: &[&str] = &[
    "--silent",
    "--show-error",
    "--verbose",
    "--include",
    "--head",
    "--location",
    "--fail",
    "--fail-with-body",
    "--no-buffer",
    "--http1.1",
    "--http2",
    "--http2-prior-knowledge",
    "--path-as-is",
    "--globoff",
    "--compressed",
    "--get",
];

/// Short curl options that take no value (`-sSfL` is a cluster of them).
const CURL_SHORT_FLAGS: &str = "sSvIiLfNgGqj";

/// Whether argument `i` of curl's is a path on the target, to be made a URL: it
/// starts with `/` and does not follow an option that takes a value (`-o /tmp/x`).
fn is_target_path(args: &[String], i: usize) -> bool {
    if !args[i].starts_with('/') {
        return false;
    }
    let Some(previous) = i.checked_sub(1).map(|p| args[p].as_str()) else {
        return true;
    };
    if let Some(long) = previous.strip_prefix("--") {
        return long.contains('=') || CURL_FLAGS.contains(&previous);
    }
    match previous.strip_prefix('-') {
        Some(short) => !short.is_empty() && short.chars().all(|c| CURL_SHORT_FLAGS.contains(c)),
        None => true,
    }
}

/// `curl` to the gateway with the grant: each path argument (`/v1/orders/42`) made a
/// URL on the gateway, and the bearer token handed over on a pipe (`--config
/// /dev/fd/N`), never on disk or on a command line others can read.
fn run_curl(args: &ConnectArgs, grant: &Value) -> anyhow::Result<ExitCode> {
    let connection = &grant["connection"];
    let (Some(url), Some(token)) = (connection["url"].as_str(), connection["token"].as_str())
    else {
        bail!(
            "the gateway gave no HTTP URL or token for target {}",
            args.target
        );
    };
    if args.print_env {
        println!("export AIRLOCK_HTTP_URL={url}");
        println!("export AIRLOCK_HTTP_TOKEN={token}");
        return Ok(ExitCode::SUCCESS);
    }
    let curl_args: Vec<String> = (0..args.args.len())
        .map(|i| {
            if is_target_path(&args.args, i) {
                format!("{url}{}", args.args[i])
            } else {
                args.args[i].clone()
            }
        })
        .collect();
    // The read end is inherited by curl (no close-on-exec); the write end is closed
    // before curl starts, so curl reads the one line and then the end.
    let (read, write) = rustix::pipe::pipe()?;
    let config = format!("header = \"Authorization: Bearer {token}\"\n");
    rustix::io::write(&write, config.as_bytes())?;
    drop(write);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&read);
    let status = std::process::Command::new("curl")
        .arg("--config")
        .arg(format!("/dev/fd/{fd}"))
        .args(&curl_args)
        .env("AIRLOCK_HTTP_URL", url)
        .status()
        .context("cannot run curl");
    drop(read);
    Ok(ExitCode::from(
        status?.code().unwrap_or(1).clamp(0, 255) as u8
    ))
}

#[cfg(test)]
mod tests {
    use super::is_target_path;

    #[test]
    fn paths_become_urls_but_option_values_stay() {
        let args: Vec<String> = [
            "-sS",
            "/v1/orders/42",
            "-o",
            "/tmp/out",
            "--data=@/x",
            "/v2",
            "-H",
            "/h",
            "--fail",
            "/v3",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let paths: Vec<&str> = (0..args.len())
            .filter(|&i| is_target_path(&args, i))
            .map(|i| args[i].as_str())
            .collect();
        assert_eq!(paths, ["/v1/orders/42", "/v2", "/v3"]);
    }
}
