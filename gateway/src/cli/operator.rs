//! The operator's commands that go through the running gateway's admin socket:
//! `airlock agent …`, `airlock target …`, `airlock grants …`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::Value;

use airlock::api::admin::{AdminRequest, call};
use airlock::grants::TargetRecord;
use airlock::policy::Kind;

use super::Context;

#[derive(Subcommand)]
pub(crate) enum AgentCommand {
    /// Enroll an agent; prints its token once (only a hash is kept).
    Add {
        name: String,
        /// A label, `key=value`. Repeatable.
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
    },
    List,
    /// Revoke an agent's token and end its live grants.
    Revoke {
        name: String,
    },
}

// Parsed once per command line: the size of its largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub(crate) enum TargetCommand {
    /// Add a target at run time (kept in the gateway's store).
    Add {
        name: String,
        #[arg(long, value_enum)]
        kind: KindArg,
        /// `host:port` (SSH: `user@host:port`), or a URL for HTTP and Kubernetes
        /// targets.
        #[arg(long)]
        upstream: String,
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// Where the gateway finds the upstream credential: `secret:NAME` or `env:VAR`.
        #[arg(long)]
        credential: Option<String>,
        /// PostgreSQL: the least-privilege role read grants log in as.
        #[arg(long, requires = "read_credential")]
        read_user: Option<String>,
        /// PostgreSQL: where the gateway finds the read role's credential.
        #[arg(long, requires = "read_user")]
        read_credential: Option<String>,
        /// PostgreSQL: let the gateway log in as a superuser or a role that bypasses
        /// row security.
        #[arg(long)]
        allow_superuser: bool,
        /// PostgreSQL: `postgres://USER@HOST:PORT/DATABASE` of a role apart from the
        /// agents' one, member of pg_signal_backend, that ends a grant's backends.
        #[arg(long, requires = "end_credential")]
        end_as: Option<String>,
        /// PostgreSQL: where the gateway finds the end-as role's credential.
        #[arg(long, requires = "end_as")]
        end_credential: Option<String>,
        /// SSH: the upstream's host key, pinned (`ssh-ed25519 AAAA…`).
        #[arg(long)]
        host_key: Option<String>,
        /// HTTP and Kubernetes: the CA file (PEM) of an `https://` upstream.
        #[arg(long)]
        ca: Option<std::path::PathBuf>,
        /// HTTP and Kubernetes: `bearer` (default), `basic`, `header:NAME` or
        /// `client-cert`: how the credential is presented upstream.
        #[arg(long)]
        inject: Option<String>,
        /// HTTP and Kubernetes: record request and response bodies up to this many
        /// bytes each.
        #[arg(long)]
        record_body_bytes: Option<u32>,
    },
    List,
    Remove {
        name: String,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum KindArg {
    Postgres,
    Ssh,
    Http,
    Kubernetes,
}

impl From<KindArg> for Kind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Postgres => Kind::Postgres,
            KindArg::Ssh => Kind::Ssh,
            KindArg::Http => Kind::Http,
            KindArg::Kubernetes => Kind::Kubernetes,
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum SessionsCommand {
    /// Every recorded session, newest first.
    List,
    /// One session and every audit entry of it, in order.
    Show { id: String },
    /// Plays a recorded SSH shell or command, or Kubernetes exec or attach, in this
    /// terminal at the speed it ran, or writes it as an asciicast v2 file
    /// (`asciinema play FILE`).
    Replay {
        id: String,
        /// The SSH channel (or Kubernetes stream) to play; the session's first allowed
        /// one by default.
        #[arg(long)]
        channel: Option<u32>,
        /// Faster (2) or slower (0.5) than it ran.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Write the recording to FILE instead of playing it.
        #[arg(long, value_name = "FILE")]
        cast: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
pub(crate) enum GrantsCommand {
    List,
    Show {
        id: String,
    },
    /// Approve a grant waiting for review; its window starts now.
    Approve {
        id: String,
    },
    /// Deny a grant waiting for review.
    Deny {
        id: String,
        #[arg(long)]
        reason: String,
    },
    /// End a grant now; its connections are closed.
    Revoke {
        id: String,
    },
    /// For agents: this agent's own grants and their state, from the agent API.
    Mine {
        #[command(flatten)]
        api: super::agent_client::ApiArgs,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn labels(pairs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .with_context(|| format!("--label {p}: expected key=value"))
        })
        .collect()
}

fn admin(context: &Context, request: AdminRequest) -> anyhow::Result<Value> {
    Ok(call(&context.data_dir()?.admin_socket(), &request)?)
}

fn print(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON prints")
    );
}

/// `airlock health`: the running gateway's record readiness, active policy bundle
/// (with the seconds until it expires) and the decision pool's refusals, as JSON.
pub(crate) fn health(context: &Context) -> anyhow::Result<ExitCode> {
    print(&admin(context, AdminRequest::Health)?);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn agent(context: &Context, command: AgentCommand) -> anyhow::Result<ExitCode> {
    match command {
        AgentCommand::Add { name, labels: l } => {
            let result = admin(
                context,
                AdminRequest::AgentAdd {
                    name,
                    labels: labels(&l)?,
                },
            )?;
            println!(
                "agent {} enrolled",
                result["agent"].as_str().unwrap_or_default()
            );
            println!("token (shown once; give it to the agent, e.g. as AIRLOCK_TOKEN):");
            println!("{}", result["token"].as_str().unwrap_or_default());
        }
        AgentCommand::List => print(&admin(context, AdminRequest::AgentList)?),
        AgentCommand::Revoke { name } => {
            let result = admin(context, AdminRequest::AgentRevoke { name: name.clone() })?;
            println!(
                "agent {name} revoked; {} live grants ended",
                result["grants_ended"]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn target(context: &Context, command: TargetCommand) -> anyhow::Result<ExitCode> {
    match command {
        TargetCommand::Add {
            name,
            kind,
            upstream,
            labels: l,
            credential,
            read_user,
            read_credential,
            allow_superuser,
            end_as,
            end_credential,
            host_key,
            ca,
            inject,
            record_body_bytes,
        } => {
            let target = TargetRecord {
                name: name.clone(),
                kind: kind.into(),
                upstream,
                labels: labels(&l)?,
                credential,
                read_user,
                read_credential,
                allow_superuser,
                end_as,
                end_credential,
                host_key,
                ca,
                inject,
                record_body_bytes,
            };
            admin(
                context,
                AdminRequest::TargetAdd {
                    target: Box::new(target),
                },
            )?;
            println!("target {name} added");
        }
        TargetCommand::List => print(&admin(context, AdminRequest::TargetList)?),
        TargetCommand::Remove { name } => {
            admin(context, AdminRequest::TargetRemove { name: name.clone() })?;
            println!("target {name} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn grants(context: &Context, command: GrantsCommand) -> anyhow::Result<ExitCode> {
    let result = match command {
        GrantsCommand::List => admin(context, AdminRequest::GrantsList)?,
        GrantsCommand::Show { id } => admin(context, AdminRequest::GrantsShow { id })?,
        GrantsCommand::Approve { id } => admin(context, AdminRequest::GrantsApprove { id })?,
        GrantsCommand::Deny { id, reason } => {
            admin(context, AdminRequest::GrantsDeny { id, reason })?
        }
        GrantsCommand::Revoke { id } => admin(context, AdminRequest::GrantsRevoke { id })?,
        GrantsCommand::Mine { api, json } => return super::discover::mine(&api, json),
    };
    print(&result);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn sessions(context: &Context, command: SessionsCommand) -> anyhow::Result<ExitCode> {
    let result = match command {
        SessionsCommand::List => admin(context, AdminRequest::SessionsList)?,
        SessionsCommand::Show { id } => admin(context, AdminRequest::SessionsShow { id })?,
        SessionsCommand::Replay {
            id,
            channel,
            speed,
            cast,
        } => {
            let shown = admin(context, AdminRequest::SessionsShow { id: id.clone() })?;
            return replay(&shown, &id, channel, speed, cast.as_deref());
        }
    };
    print(&result);
    Ok(ExitCode::SUCCESS)
}

/// `sessions replay`: the stream's asciicast, written to a file or played.
fn replay(
    shown: &serde_json::Value,
    id: &str,
    channel: Option<u32>,
    speed: f64,
    cast: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(speed > 0.0, "--speed must be above 0");
    let entries = shown["entries"].as_array().cloned().unwrap_or_default();
    let (request, field, cast_kind) = entries
        .iter()
        .find_map(|e| {
            let detail = &e["detail"];
            let opened = match e["kind"].as_str()? {
                "ssh.request" if matches!(detail["request"].as_str(), Some("shell" | "exec")) => {
                    (e, "channel", "ssh.cast")
                }
                "http.request"
                    if detail["stream"].is_u64()
                        && matches!(
                            detail["action"]["subresource"].as_str(),
                            Some("exec" | "attach")
                        ) =>
                {
                    (e, "stream", "kube.cast")
                }
                _ => return None,
            };
            (detail["verdict"] == "allow" && channel.is_none_or(|c| detail[opened.1] == c))
                .then_some(opened)
        })
        .ok_or_else(|| {
            anyhow::anyhow!(
                "session {id} has no recorded SSH shell or command, or Kubernetes exec{}",
                channel.map_or(String::new(), |c| format!(" numbered {c}"))
            )
        })?;
    let number = &request["detail"][field];
    let chunks: Vec<serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == cast_kind && &e["detail"][field] == number)
        .map(|e| e["detail"].clone())
        .collect();
    let mut header = request["detail"].clone();
    header["time_ms"] = request["time_ms"].clone();
    let file = airlock::proxy::replay_cast(&header, &chunks, false);
    if let Some(path) = cast {
        airlock::fsperm::write_private_atomic(path, file.as_bytes())?;
        return Ok(ExitCode::SUCCESS);
    }
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let mut last = 0.0;
    for line in file.lines().skip(1) {
        let event: serde_json::Value = serde_json::from_str(line)?;
        let at = event[0].as_f64().unwrap_or(last);
        if at > last {
            std::thread::sleep(std::time::Duration::from_secs_f64((at - last) / speed));
            last = at;
        }
        if event[1] == "o" {
            out.write_all(event[2].as_str().unwrap_or_default().as_bytes())?;
            out.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
