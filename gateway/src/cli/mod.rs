//! Command-line interface. Errors end here: each command returns `anyhow::Result` and
//! `main` prints the whole chain of causes.

mod agent_client;
mod audit;
mod bundle;
mod connect;
mod discover;
mod mcp;
mod operator;
mod policy;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use airlock::config::{Config, DataDir};

#[derive(Parser)]
#[command(
    name = "airlock",
    version,
    about = "An access gateway for AI coding agents"
)]
struct Cli {
    /// The gateway's data directory (default: $AIRLOCK_DATA, else ~/.local/share/airlock).
    #[arg(long, global = true, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The gateway's configuration file (default: DATA/airlock.toml).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Signed policy bundles: keys, signing, verification, install.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Policy modules: build from a Rust crate, test against fixtures.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Run the gateway: agent API, admin socket, grant broker, record.
    Serve,
    /// Agents (through the running gateway).
    #[command(subcommand)]
    Agent(operator::AgentCommand),
    /// Targets (through the running gateway).
    #[command(subcommand)]
    Target(operator::TargetCommand),
    /// Grants: list, show, approve, deny, revoke (through the running gateway).
    #[command(subcommand)]
    Grants(operator::GrantsCommand),
    /// Recorded sessions (through the running gateway).
    #[command(subcommand)]
    Sessions(operator::SessionsCommand),
    /// The running gateway's health: record, active policy bundle and its expiry,
    /// decisions refused by the policy host.
    Health,
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// For agents: ask for a grant and open the target with its ordinary client.
    Connect(connect::ConnectArgs),
    /// For agents: MCP over stdio, relayed to the gateway's MCP server (for clients
    /// that launch their MCP servers).
    Mcp {
        #[command(flatten)]
        api: agent_client::ApiArgs,
    },
    /// For agents: the targets this agent may ask for, with kind and labels.
    Targets {
        #[command(flatten)]
        api: agent_client::ApiArgs,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Where the gateway's files are, resolved once from the global flags.
pub(crate) struct Context {
    data: Option<PathBuf>,
    config: Option<PathBuf>,
}

impl Context {
    pub(crate) fn data_dir(&self) -> anyhow::Result<DataDir> {
        Ok(DataDir::resolve(self.data.as_deref())?)
    }

    pub(crate) fn config(&self) -> anyhow::Result<Config> {
        let path = match &self.config {
            Some(path) => path.clone(),
            None => self.data_dir()?.config_file(),
        };
        Ok(Config::load(&path)?)
    }
}

pub fn main() -> ExitCode {
    // Run by `ssh` as its askpass program under `airlock connect`: answer with the
    // grant secret it was handed, and nothing else.
    if let Some(secret) = std::env::var_os(connect::ASKPASS_SECRET) {
        return connect::askpass(secret.to_string_lossy().into_owned());
    }
    // Run by `kubectl` as its exec credential plugin under `airlock connect`: answer
    // with the grant token it was handed, as an ExecCredential.
    if let Some(token) = std::env::var_os(connect::KUBE_TOKEN) {
        return connect::exec_credential(&token.to_string_lossy());
    }
    let cli = Cli::parse();
    // The audit commands name a damaged store themselves (by file, byte and entry),
    // on copies they cut and reopen: fjall's own complaint about each is noise, unless
    // AIRLOCK_LOG asks for fjall by name.
    let store_logs = match cli.command {
        Command::Audit(_) => "fjall=off,lsm_tree=off",
        _ => "fjall=warn,lsm_tree=warn",
    };
    let filter = match std::env::var("AIRLOCK_LOG") {
        Ok(asked) if asked.contains("fjall") || asked.contains("lsm_tree") => asked,
        Ok(asked) => format!("{asked},{store_logs}"),
        Err(_) => format!("info,{store_logs}"),
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let context = Context {
        data: cli.data,
        config: cli.config,
    };
    let result = match cli.command {
        Command::Bundle(command) => bundle::run(&context, command),
        Command::Policy(command) => policy::run(&context, command),
        Command::Serve => serve::run(&context),
        Command::Agent(command) => operator::agent(&context, command),
        Command::Target(command) => operator::target(&context, command),
        Command::Grants(command) => operator::grants(&context, command),
        Command::Sessions(command) => operator::sessions(&context, command),
        Command::Health => operator::health(&context),
        Command::Audit(command) => audit::run(&context, command),
        Command::Connect(args) => connect::run(args),
        Command::Targets { api, json } => discover::targets(&api, json),
        Command::Mcp { api } => mcp::run(&api),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // Errors quote names, paths and text from files an attacker may have
            // written (a bundle, a manifest): never let them drive the terminal.
            eprintln!("error: {}", escape_controls(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// `text` with every control character (escape sequences, carriage returns, newlines)
/// written as a Rust escape.
fn escape_controls(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}
