//! `airlock connect`: the agent's side. Asks the gateway for a grant with the agent's
//! token (or takes one it already holds, `--grant`), waits visibly while an operator
//! reviews it, runs the target's ordinary client (`psql`, `ssh`, `curl`, `kubectl`)
//! with the grant in its environment or a pipe only (never on disk), and ends the grant
//! when the client exits: one task, one grant, nothing left alive after it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use clap::Args;
use serde_json::{Value, json};
use tokio::signal::unix::{Signal, SignalKind, signal};

use airlock::policy::Kind;

use super::agent_client::{AgentClient, ApiArgs};

#[derive(Args)]
pub(crate) struct ConnectArgs {
    /// The target's name (with --grant, optional: the grant names it).
    #[arg(required_unless_present = "grant")]
    target: Option<String>,
    /// What the access is for, in words an operator can check.
    #[arg(long, required_unless_present = "grant", conflicts_with = "grant")]
    task: Option<String>,
    #[arg(long, default_value = "read", value_parser = ["read", "write", "admin"])]
    access: String,
    #[arg(long, default_value = "10m")]
    ttl: String,
    /// Use grant ID, which this agent asked for, instead of asking for another: a
    /// follow-up command of the same task, or a request still waiting for review.
    #[arg(long, value_name = "ID")]
    grant: Option<String>,
    /// Keep the grant when the client exits (it ends with its window, or when a
    /// later `airlock connect --grant ID` without --keep exits).
    #[arg(long)]
    keep: bool,
    /// When the grant waits for review, print its id and return at once; wait on it
    /// later with --grant ID.
    #[arg(long)]
    no_wait: bool,
    /// Print the client's settings instead of running the client (the grant is kept).
    #[arg(long)]
    print_env: bool,
    /// How --print-env prints: shell `export` lines, or one JSON object.
    #[arg(long, default_value = "sh", value_parser = ["sh", "json"], requires = "print_env")]
    format: String,
    #[command(flatten)]
    api: ApiArgs,
    /// Arguments for the client (psql; ssh: the remote command; curl: its options and
    /// paths on the target, e.g. `-s /v1/orders/42`; kubectl: e.g. `get pods -n shop`),
    /// after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

/// What is written as is in a URL's user, password, path or query value: RFC 3986's
/// unreserved characters.
const URL_COMPONENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// How often a grant waiting for review is asked after.
const REVIEW_POLL: Duration = Duration::from_secs(1);

/// The exit status of a command interrupted by a signal, as shells report SIGINT.
const INTERRUPTED: u8 = 130;

/// The signals that would end `airlock connect`: watched from the start, so that none
/// ends it between asking for a grant and ending it.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// The next signal: Ctrl-C, a harness's SIGTERM, or a closed terminal's SIGHUP.
    async fn next(&mut self) -> rustix::process::Signal {
        use rustix::process::Signal as S;
        tokio::select! {
            _ = self.interrupt.recv() => S::INT,
            _ = self.terminate.recv() => S::TERM,
            _ = self.hangup.recv() => S::HUP,
        }
    }
}

/// What asking for (or resuming) a grant came to.
enum Obtained {
    /// Active, with its secret and connection details.
    Grant(Value),
    /// Waiting for review, and `--no-wait` was given.
    Waiting(String),
    /// The agent interrupted the wait; the request was withdrawn.
    Withdrawn,
}

/// Tells the agent, on stderr, which grant it holds and until when.
fn announce(target: &str, grant: &Value) {
    eprintln!(
        "airlock: grant {} on {target} ({}), until {}",
        grant["id"].as_str().unwrap_or("?"),
        grant["access"].as_str().unwrap_or("?"),
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
    let api = AgentClient::new(&args.api)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(connect(&api, &args))
}

async fn connect(api: &AgentClient, args: &ConnectArgs) -> anyhow::Result<ExitCode> {
    let mut signals = Signals::new()?;
    let grant = match obtain(api, args, &mut signals).await? {
        Obtained::Grant(grant) => grant,
        Obtained::Waiting(id) => {
            eprintln!(
                "airlock: grant {id} waits for an operator's review; wait on it with `airlock connect --grant {id}`"
            );
            println!("{id}");
            return Ok(ExitCode::SUCCESS);
        }
        Obtained::Withdrawn => return Ok(ExitCode::from(INTERRUPTED)),
    };
    let id = grant["id"].as_str().unwrap_or_default().to_string();
    let target = grant["target"].as_str().unwrap_or_default().to_string();
    if let Some(asked) = &args.target
        && *asked != target
    {
        bail!("grant {id} is for target {target}, not {asked}");
    }
    announce(&target, &grant);
    let client = match Client::for_grant(&target, &grant, api) {
        Ok(client) => client,
        Err(e) => {
            // Nothing will use the grant: it ends here, as it would after a client.
            if !args.keep {
                end(api, &id, "ended").await;
            }
            return Err(e);
        }
    };
    if args.print_env {
        client.print_env(&args.format);
        eprintln!(
            "airlock: grant {id} stays until {} (end it with `airlock connect --grant {id}` or DELETE /v1/grants/{id})",
            grant["expires_at"].as_str().unwrap_or("?")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let status = client.run(&args.args, &mut signals).await;
    if args.keep {
        eprintln!(
            "airlock: grant {id} kept until {}; follow up with `airlock connect --grant {id} -- …`",
            grant["expires_at"].as_str().unwrap_or("?")
        );
    } else {
        end(api, &id, "ended").await;
    }
    Ok(ExitCode::from(status?))
}

/// Ends grant `id` (or withdraws it, pending), saying so on stderr.
async fn end(api: &AgentClient, id: &str, done: &str) {
    match api.call("DELETE", &format!("/v1/grants/{id}"), None).await {
        Ok((200, _)) => eprintln!("airlock: grant {id} {done}"),
        // Already over (expired, revoked): nothing is left to end.
        Ok((409, _)) => {}
        Ok((_, body)) => eprintln!("airlock: could not end grant {id}: {}", explain(&body)),
        Err(e) => eprintln!("airlock: could not end grant {id}: {e:#}"),
    }
}

/// Asks for a grant (or reads the one `--grant` names), waiting while it is reviewed.
async fn obtain(
    api: &AgentClient,
    args: &ConnectArgs,
    signals: &mut Signals,
) -> anyhow::Result<Obtained> {
    let id = match &args.grant {
        Some(id) => {
            let (status, grant) = api.call("GET", &format!("/v1/grants/{id}"), None).await?;
            if status != 200 {
                bail!("grant {id}: {}", explain(&grant));
            }
            match grant["status"].as_str() {
                Some("active") if grant.get("secret").is_some() => {
                    return Ok(Obtained::Grant(grant));
                }
                Some("pending") => id.clone(),
                Some("active") => bail!(
                    "grant {id} is active but its secret cannot be shown again (issued before this gateway derived grant secrets); ask for a new grant"
                ),
                _ => bail!("grant {id} is over: {}", explain(&grant)),
            }
        }
        None => {
            let body = json!({
                "target": args.target, "task": args.task, "access": args.access, "ttl": args.ttl,
            });
            let (status, grant) = api.call("POST", "/v1/grants", Some(body)).await?;
            match status {
                201 => return Ok(Obtained::Grant(grant)),
                202 => grant["id"].as_str().unwrap_or_default().to_string(),
                _ => bail!("{}", explain(&grant)),
            }
        }
    };
    if args.no_wait {
        return Ok(Obtained::Waiting(id));
    }
    eprintln!(
        "airlock: grant {id} needs an operator's approval; waiting (Ctrl-C withdraws the request)"
    );
    loop {
        tokio::select! {
            _ = signals.next() => {
                end(api, &id, "withdrawn").await;
                return Ok(Obtained::Withdrawn);
            }
            () = tokio::time::sleep(REVIEW_POLL) => {}
        }
        let (status, grant) = api.call("GET", &format!("/v1/grants/{id}"), None).await?;
        match (status, grant["status"].as_str()) {
            (200, Some("active")) if grant.get("secret").is_some() => {
                eprintln!("airlock: grant {id} approved");
                return Ok(Obtained::Grant(grant));
            }
            (200, Some("pending")) => {}
            _ => bail!("grant {id} was not approved: {}", explain(&grant)),
        }
    }
}

/// The client for a grant's target, with its settings.
struct Client {
    kind: Kind,
    /// The settings `--print-env` prints and the client gets in its environment.
    env: Vec<(&'static str, String)>,
    connection: Value,
    /// The CA file the agent named, if any.
    ca: Option<PathBuf>,
}

impl Client {
    fn for_grant(target: &str, grant: &Value, api: &AgentClient) -> anyhow::Result<Self> {
        let connection = grant["connection"].clone();
        let field = |name: &str| -> anyhow::Result<String> {
            match &connection[name] {
                Value::String(s) => Ok(s.clone()),
                Value::Number(n) => Ok(n.to_string()),
                _ => bail!("the gateway gave no `{name}` to connect to target {target}"),
            }
        };
        let Ok(kind) = serde_json::from_value::<Kind>(connection["protocol"].clone()) else {
            bail!("the gateway gave no connection details for target {target}");
        };
        let env = match kind {
            Kind::Postgres => {
                let (host, port, user, password, database) = (
                    field("host")?,
                    field("port")?,
                    field("user")?,
                    field("password")?,
                    field("database")?,
                );
                let mode = connection["sslmode"].as_str().unwrap_or("disable");
                let mut env = vec![
                    ("PGHOST", host.clone()),
                    ("PGPORT", port.clone()),
                    ("PGUSER", user.clone()),
                    ("PGPASSWORD", password.clone()),
                    ("PGDATABASE", database.clone()),
                    ("PGSSLMODE", mode.to_string()),
                ];
                let enc =
                    |s: &str| percent_encoding::utf8_percent_encode(s, URL_COMPONENT).to_string();
                let mut url = format!(
                    "postgres://{}:{}@{host}:{port}/{}?sslmode={mode}",
                    enc(&user),
                    enc(&password),
                    enc(&database)
                );
                if mode != "disable" {
                    let roots = api.ca_file()?;
                    url += &format!("&sslrootcert={}", enc(&roots.display().to_string()));
                    env.push(("PGSSLROOTCERT", roots.display().to_string()));
                }
                env.push(("DATABASE_URL", url));
                env
            }
            Kind::Ssh => {
                let (host, port) = (field("host")?, field("port")?);
                let known_host = format!("[{host}]:{port} {}", field("host_key")?);
                vec![
                    ("AIRLOCK_SSH_HOST", host),
                    ("AIRLOCK_SSH_PORT", port),
                    ("AIRLOCK_SSH_USER", field("user")?),
                    ("AIRLOCK_SSH_PASSWORD", field("password")?),
                    ("AIRLOCK_SSH_KNOWN_HOST", known_host),
                ]
            }
            Kind::Http => vec![
                ("AIRLOCK_HTTP_URL", field("url")?),
                ("AIRLOCK_HTTP_TOKEN", field("token")?),
            ],
            Kind::Kubernetes => vec![
                ("AIRLOCK_KUBE_URL", field("url")?),
                (KUBE_TOKEN, field("token")?),
            ],
        };
        Ok(Client {
            kind,
            env,
            connection,
            ca: api.ca().map(Path::to_path_buf),
        })
    }

    fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn print_env(&self, format: &str) {
        if format == "json" {
            let object: serde_json::Map<String, Value> = self
                .env
                .iter()
                .map(|(name, value)| (name.to_string(), json!(value)))
                .collect();
            println!("{}", Value::Object(object));
            return;
        }
        for (name, value) in &self.env {
            println!("export {name}='{}'", value.replace('\'', "'\\''"));
        }
    }

    /// Runs the client with `args` until it exits; returns its exit status. A SIGTERM
    /// or SIGHUP to `airlock connect` is passed on to it (Ctrl-C reaches it from the
    /// terminal directly), so the grant is ended only once the client is gone.
    async fn run(&self, args: &[String], signals: &mut Signals) -> anyhow::Result<u8> {
        let launch = match self.kind {
            Kind::Postgres => {
                let mut command = std::process::Command::new("psql");
                command.args(args).envs(
                    self.env
                        .iter()
                        .filter(|(name, _)| *name != "DATABASE_URL")
                        .map(|(n, v)| (*n, v)),
                );
                Launch::new(command, "psql")
            }
            Kind::Ssh => self.ssh(args)?,
            Kind::Http => self.curl(args)?,
            Kind::Kubernetes => self.kubectl(args)?,
        };
        launch.run(signals).await
    }
}

/// A client ready to run, and what lives only as long as it does: a private directory
/// (removed afterwards) and a pipe end it inherits.
struct Launch {
    command: std::process::Command,
    name: &'static str,
    dir: Option<PathBuf>,
    inherited: Option<OwnedFd>,
}

impl Launch {
    fn new(command: std::process::Command, name: &'static str) -> Self {
        Launch {
            command,
            name,
            dir: None,
            inherited: None,
        }
    }

    /// A private directory for the client's files, removed when the launch is.
    fn private_dir(&mut self) -> anyhow::Result<PathBuf> {
        let dir = std::env::temp_dir().join(format!(
            "airlock-connect-{}",
            airlock::fsperm::random_suffix()
        ));
        airlock::fsperm::create_private_dir(&dir)?;
        self.dir = Some(dir.clone());
        Ok(dir)
    }

    async fn run(mut self, signals: &mut Signals) -> anyhow::Result<u8> {
        let child = self
            .command
            .spawn()
            .with_context(|| format!("cannot run {}", self.name))?;
        // The client holds its own copy of the pipe now.
        drop(self.inherited.take());
        let pid = rustix::process::Pid::from_child(&child);
        let mut child = Some(child);
        let mut waiting = tokio::task::spawn_blocking(move || child.take().map(|mut c| c.wait()));
        loop {
            tokio::select! {
                waited = &mut waiting => {
                    let status = waited?.context("the client was never started")??;
                    let code = status
                        .code()
                        .or_else(|| std::os::unix::process::ExitStatusExt::signal(&status).map(|s| 128 + s))
                        .unwrap_or(1);
                    return Ok(code.clamp(0, 255) as u8);
                }
                signal = signals.next() => {
                    if signal != rustix::process::Signal::INT {
                        let _ = rustix::process::kill_process(pid, signal);
                    }
                }
            }
        }
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
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

impl Client {
    /// `ssh` to the gateway with the grant: the password from `airlock` itself as
    /// askpass, the gateway's host key pinned in a private known_hosts file.
    fn ssh(&self, args: &[String]) -> anyhow::Result<Launch> {
        let mut launch = Launch::new(std::process::Command::new("ssh"), "ssh");
        let known_hosts = launch.private_dir()?.join("known_hosts");
        let line = format!("{}\n", self.var("AIRLOCK_SSH_KNOWN_HOST"));
        airlock::fsperm::write_private_atomic(&known_hosts, line.as_bytes())?;
        launch
            .command
            .env("SSH_ASKPASS", std::env::current_exe()?)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env(ASKPASS_SECRET, self.var("AIRLOCK_SSH_PASSWORD"))
            .arg("-p")
            .arg(self.var("AIRLOCK_SSH_PORT"))
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
            .arg(format!(
                "{}@{}",
                self.var("AIRLOCK_SSH_USER"),
                self.var("AIRLOCK_SSH_HOST")
            ))
            .args(args);
        Ok(launch)
    }

    /// The PEM certificates an HTTPS client pins for the gateway: the agent's CA
    /// file, else the chain the gateway's listener serves (as the agent API, which
    /// was itself verified or on loopback, reported it); `None`: the system's store.
    fn server_ca(&self) -> anyhow::Result<Option<String>> {
        match &self.ca {
            Some(ca) => Ok(Some(
                std::fs::read_to_string(ca).with_context(|| ca.display().to_string())?,
            )),
            None => Ok(self.connection["ca"].as_str().map(str::to_string)),
        }
    }

    /// `kubectl` against the gateway with the grant: a kubeconfig in a private
    /// directory naming the gateway as the cluster (its CA pinned) and `airlock`
    /// itself as the exec credential plugin, which answers with the token from
    /// kubectl's environment. The kubeconfig holds no secret.
    fn kubectl(&self, args: &[String]) -> anyhow::Result<Launch> {
        let url = self.var("AIRLOCK_KUBE_URL");
        let mut cluster = json!({ "server": url });
        if let Some(ca) = self.server_ca()? {
            cluster["certificate-authority-data"] =
                base64::engine::general_purpose::STANDARD.encode(ca).into();
        }
        let kubeconfig = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "airlock", "cluster": cluster }],
            "users": [{ "name": "airlock", "user": { "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": std::env::current_exe()?,
                "interactiveMode": "Never",
                "provideClusterInfo": false,
            }}}],
            "contexts": [{ "name": "airlock", "context": { "cluster": "airlock", "user": "airlock" } }],
            "current-context": "airlock",
        });
        let mut launch = Launch::new(std::process::Command::new("kubectl"), "kubectl");
        let file = launch.private_dir()?.join("kubeconfig");
        airlock::fsperm::write_private_atomic(&file, kubeconfig.to_string().as_bytes())?;
        launch
            .command
            .env_remove("KUBECONFIG")
            .env(KUBE_TOKEN, self.var(KUBE_TOKEN))
            .arg("--kubeconfig")
            .arg(&file)
            .args(args);
        Ok(launch)
    }

    /// `curl` to the gateway with the grant: each path argument (`/v1/orders/42`)
    /// made a URL on the gateway, and the bearer token handed over on a pipe
    /// (`--config /dev/fd/N`), never on disk or on a command line others can read.
    fn curl(&self, args: &[String]) -> anyhow::Result<Launch> {
        let url = self.var("AIRLOCK_HTTP_URL");
        let curl_args: Vec<String> = (0..args.len())
            .map(|i| {
                if is_target_path(args, i) {
                    format!("{url}{}", args[i])
                } else {
                    args[i].clone()
                }
            })
            .collect();
        let mut launch = Launch::new(std::process::Command::new("curl"), "curl");
        if url.starts_with("https://")
            && let Some(ca) = self.server_ca()?
        {
            let file = launch.private_dir()?.join("ca.pem");
            airlock::fsperm::write_private_atomic(&file, ca.as_bytes())?;
            launch.command.arg("--cacert").arg(file);
        }
        // The read end is inherited by curl (no close-on-exec); the write end is
        // closed before curl starts, so curl reads the one line and then the end.
        let (read, write) = rustix::pipe::pipe()?;
        let config = format!(
            "header = \"Authorization: Bearer {}\"\n",
            self.var("AIRLOCK_HTTP_TOKEN")
        );
        rustix::io::write(&write, config.as_bytes())?;
        drop(write);
        let fd = std::os::fd::AsRawFd::as_raw_fd(&read);
        launch
            .command
            .arg("--config")
            .arg(format!("/dev/fd/{fd}"))
            .args(&curl_args)
            .env("AIRLOCK_HTTP_URL", url);
        launch.inherited = Some(read);
        Ok(launch)
    }
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
