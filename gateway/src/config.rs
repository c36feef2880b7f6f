//! The gateway's configuration and data directory.
//!
//! Every command finds the data directory with `--data DIR`, else `AIRLOCK_DATA`, else
//! `$XDG_DATA_HOME/airlock` (or `~/.local/share/airlock`). The configuration is
//! `airlock.toml` in it unless `--config` names another file. Both belong to the gateway:
//! the agent has no path to either.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::grants::TargetRecord;
use crate::keys::{KeyError, PublicKey, TrustedKeys};
use crate::policy::PolicyLimits;

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path}: policy.trusted-keys: {source}")]
    TrustedKey { path: PathBuf, source: KeyError },
    #[error(
        "no data directory: pass --data DIR or set AIRLOCK_DATA (neither HOME nor XDG_DATA_HOME is set)"
    )]
    NoDataDir,
}

/// `airlock.toml`. Every section and key has a default, so an empty file (or none)
/// gives a working development gateway on loopback.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: GatewayConfig,
    #[serde(default)]
    pub agent_api: AgentApiConfig,
    #[serde(default)]
    pub record: RecordConfig,
    #[serde(default)]
    pub postgres: PostgresConfig,
    #[serde(default)]
    pub ssh: SshConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    /// Upstream targets; more can be added at run time with `airlock target add`.
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetRecord>,
    #[serde(skip)]
    path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's name: the origin line of its signed checkpoints.
    #[serde(default = "default_name")]
    pub name: String,
    /// The longest grant any request can get, e.g. "1h".
    #[serde(default = "default_max_ttl")]
    pub max_grant_ttl: String,
    /// The gateway-owned secrets file (mode 0600) holding upstream credentials,
    /// relative to the data directory.
    #[serde(default = "default_secrets")]
    pub secrets_file: PathBuf,
    /// The host name (or address) agents reach the listeners at, as their TLS
    /// certificates name it; connection details carry it. Default: the address each
    /// listener is bound to.
    #[serde(default)]
    pub public_host: Option<String>,
}

fn default_name() -> String {
    "airlock".into()
}
fn default_max_ttl() -> String {
    "1h".into()
}
fn default_secrets() -> PathBuf {
    "secrets.toml".into()
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            name: default_name(),
            max_grant_ttl: default_max_ttl(),
            secrets_file: default_secrets(),
            public_host: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AgentApiConfig {
    /// Where the agent API listens.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// PEM certificate chain and key: with both, the agent API speaks TLS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Largest request body accepted.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Requests per minute per agent (a token bucket with this burst).
    #[serde(default = "default_rate")]
    pub requests_per_minute: u32,
}

fn default_listen() -> String {
    "127.0.0.1:7070".into()
}
fn default_max_body() -> usize {
    16 * 1024
}
fn default_rate() -> u32 {
    120
}

impl Default for AgentApiConfig {
    fn default() -> Self {
        AgentApiConfig {
            listen: default_listen(),
            tls_cert: None,
            tls_key: None,
            max_body_bytes: default_max_body(),
            requests_per_minute: default_rate(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PostgresConfig {
    /// Where agents' PostgreSQL clients connect (user = grant id, password = grant
    /// secret, database = target name). Loopback only unless TLS is configured.
    #[serde(default = "default_pg_listen")]
    pub listen: String,
    /// PEM certificate chain and private key (0600) for clients' SSLRequest.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Refuse clients that do not start TLS. Always on for a non-loopback listener.
    #[serde(default)]
    pub require_tls: bool,
}

fn default_pg_listen() -> String {
    "127.0.0.1:6432".into()
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            listen: default_pg_listen(),
            tls_cert: None,
            tls_key: None,
            require_tls: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SshConfig {
    /// Where agents' OpenSSH clients connect (user = grant id, password = grant
    /// secret). SSH encrypts on its own; a non-loopback address is allowed.
    #[serde(default = "default_ssh_listen")]
    pub listen: String,
    /// The gateway's own SSH host key (OpenSSH format, mode 0600), relative to the data
    /// directory; created on first start.
    #[serde(default = "default_ssh_host_key")]
    pub host_key: PathBuf,
}

fn default_ssh_listen() -> String {
    "127.0.0.1:2222".into()
}
fn default_ssh_host_key() -> PathBuf {
    "ssh-host-key".into()
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            listen: default_ssh_listen(),
            host_key: default_ssh_host_key(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct HttpConfig {
    /// Where agents' HTTP clients (curl, kubectl, …) connect, with the grant as a
    /// bearer token; the grant names the target. Loopback only unless TLS is set.
    #[serde(default = "default_http_listen")]
    pub listen: String,
    /// PEM certificate chain and private key (0600): with both, the listener speaks
    /// TLS only (HTTP/1.1 and HTTP/2 by ALPN).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// JSON and form request bodies up to this size are shown to policy; larger or
    /// other bodies are forwarded as not inspected.
    #[serde(default = "default_inspect_body")]
    pub inspect_body_bytes: usize,
    /// Where a masking module applies, a response is held whole up to this size to be
    /// masked; a larger one is withheld.
    #[serde(default = "default_mask_body")]
    pub mask_body_bytes: usize,
    /// The largest request body forwarded.
    #[serde(default = "default_max_request_body")]
    pub max_request_body_bytes: u64,
}

fn default_http_listen() -> String {
    "127.0.0.1:8443".into()
}
fn default_inspect_body() -> usize {
    64 * 1024
}
fn default_mask_body() -> usize {
    8 << 20
}
fn default_max_request_body() -> u64 {
    64 << 20
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
            tls_cert: None,
            tls_key: None,
            inspect_body_bytes: default_inspect_body(),
            mask_body_bytes: default_mask_body(),
            max_request_body_bytes: default_max_request_body(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct RecordConfig {
    /// Sign a checkpoint after this many entries…
    #[serde(default = "default_cp_every")]
    pub checkpoint_every: u64,
    /// …or this long after the last one, e.g. "10s".
    #[serde(default = "default_cp_interval")]
    pub checkpoint_interval: String,
    /// A file outside the data directory each signed checkpoint is also appended to,
    /// for `airlock audit verify --witness`.
    #[serde(default)]
    pub witness: Option<PathBuf>,
    /// An endpoint each signed checkpoint is also POSTed to, as one JSON line
    /// (`{"checkpoint": …}`): https:// verified against `witness-ca`, or http:// to a
    /// loopback address.
    #[serde(default)]
    pub witness_url: Option<String>,
    /// The CA file (PEM) that signs the witness endpoint's certificate.
    #[serde(default)]
    pub witness_ca: Option<PathBuf>,
    /// When a statement's record entry must be durable: `strict` (before its result is
    /// released) or `batched` (queued before it runs, durable within the writer's next
    /// group commit; a record failure cuts every session).
    #[serde(default)]
    pub durability: Durability,
    /// With `batched` durability: how long the record's writer gathers entries into one
    /// commit (one fsync), at most 100ms. The longest an entry waits to be durable is
    /// this plus one fsync.
    #[serde(default = "default_batch_window")]
    pub batch_window: String,
}

fn default_batch_window() -> String {
    "2ms".into()
}

/// When an action's record entry must be durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Before the action's result is released (the fsync may overlap the action when
    /// the action changes nothing).
    #[default]
    Strict,
    /// Queued, in order, before the action runs; durable within the next group commit.
    Batched,
}

fn default_cp_every() -> u64 {
    10_000
}
fn default_cp_interval() -> String {
    "10s".into()
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            checkpoint_every: default_cp_every(),
            checkpoint_interval: default_cp_interval(),
            witness: None,
            witness_url: None,
            witness_ca: None,
            durability: Durability::Strict,
            batch_window: default_batch_window(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PolicyConfig {
    /// Operators' bundle-signing public keys: the text form or a file holding it.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Wall-clock deadline per policy call, in milliseconds.
    #[serde(default = "default_deadline_ms")]
    pub deadline_ms: u64,
    /// Linear-memory cap per policy instance, in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: usize,
    /// The longest window a bundle may be signed for (`expires` − `created`): a bundle
    /// signed for longer is refused at install.
    #[serde(default = "default_max_validity")]
    pub max_validity: String,
    /// Wall-clock deadline of one whole decision (every module it asks, and its wait
    /// for a worker), in milliseconds.
    #[serde(default = "default_decision_deadline_ms")]
    pub decision_deadline_ms: u64,
    /// Threads that run policy decisions (default: one per core).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Decisions one agent may have queued or running at once; more are denied.
    #[serde(default = "default_agent_decisions")]
    pub agent_decisions: usize,
    /// Largest module a bundle may hold, in MiB.
    #[serde(default = "default_max_module_mib")]
    pub max_module_mib: u64,
    /// Largest fixture file a bundle may hold, in MiB.
    #[serde(default = "default_max_fixture_mib")]
    pub max_fixture_mib: u64,
    /// Largest sum of a bundle's modules and fixtures, in MiB.
    #[serde(default = "default_max_bundle_mib")]
    pub max_bundle_mib: u64,
}

fn default_max_module_mib() -> u64 {
    crate::bundle::SizeLimits::default().module >> 20
}

fn default_max_fixture_mib() -> u64 {
    crate::bundle::SizeLimits::default().fixture >> 20
}

fn default_max_bundle_mib() -> u64 {
    crate::bundle::SizeLimits::default().bundle >> 20
}

fn default_decision_deadline_ms() -> u64 {
    100
}

fn default_agent_decisions() -> usize {
    16
}

fn default_max_validity() -> String {
    "400d".to_string()
}

fn default_deadline_ms() -> u64 {
    20
}
fn default_memory_mib() -> usize {
    64
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            trusted_keys: Vec::new(),
            deadline_ms: default_deadline_ms(),
            memory_mib: default_memory_mib(),
            max_validity: default_max_validity(),
            decision_deadline_ms: default_decision_deadline_ms(),
            workers: None,
            agent_decisions: default_agent_decisions(),
            max_module_mib: default_max_module_mib(),
            max_fixture_mib: default_max_fixture_mib(),
            max_bundle_mib: default_max_bundle_mib(),
        }
    }
}

impl Config {
    /// Reads `path`; a missing file gives the defaults (which trust no bundle key).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        config.path = path.to_path_buf();
        let invalid = |reason: &str| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        if !(1..=10_000).contains(&config.policy.deadline_ms) {
            return Err(invalid("policy.deadline-ms must be between 1 and 10000"));
        }
        if !(1..=4096).contains(&config.policy.memory_mib) {
            return Err(invalid("policy.memory-mib must be between 1 and 4096"));
        }
        if !(1..=60_000).contains(&config.policy.decision_deadline_ms) {
            return Err(invalid(
                "policy.decision-deadline-ms must be between 1 and 60000",
            ));
        }
        if config
            .policy
            .workers
            .is_some_and(|n| !(1..=256).contains(&n))
        {
            return Err(invalid("policy.workers must be between 1 and 256"));
        }
        if !(1..=10_000).contains(&config.policy.agent_decisions) {
            return Err(invalid(
                "policy.agent-decisions must be between 1 and 10000",
            ));
        }
        let sizes = [
            config.policy.max_module_mib,
            config.policy.max_fixture_mib,
            config.policy.max_bundle_mib,
        ];
        if sizes.iter().any(|mib| !(1..=4096).contains(mib)) {
            return Err(invalid(
                "policy.max-module-mib, max-fixture-mib and max-bundle-mib must be between 1 and 4096",
            ));
        }
        if humantime::parse_duration(&config.policy.max_validity).is_err() {
            return Err(invalid(
                "policy.max-validity must be a duration such as \"400d\"",
            ));
        }
        config.trusted_keys()?;
        config.validate().map_err(|reason| invalid(&reason))?;
        Ok(config)
    }

    /// Checks the values serde cannot: durations, addresses, names, references.
    fn validate(&self) -> Result<(), String> {
        let duration = |key: &str, value: &str| {
            humantime::parse_duration(value)
                .map_err(|e| format!("{key} = {value:?} is not a duration ({e}); use e.g. \"10m\""))
        };
        let max = duration("gateway.max-grant-ttl", &self.gateway.max_grant_ttl)?;
        if max.is_zero() || max > Duration::from_secs(24 * 3600) {
            return Err("gateway.max-grant-ttl must be between 1s and 24h".into());
        }
        duration(
            "record.checkpoint-interval",
            &self.record.checkpoint_interval,
        )?;
        if self.record.checkpoint_every == 0 {
            return Err("record.checkpoint-every must be at least 1".into());
        }
        if duration("record.batch-window", &self.record.batch_window)? > Duration::from_millis(100)
        {
            return Err("record.batch-window must be at most 100ms".into());
        }
        if self.gateway.name.is_empty() || self.gateway.name.contains(['+', ' ', '\n']) {
            return Err("gateway.name must be non-empty, without spaces or `+`".into());
        }
        self.agent_api
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| format!("agent-api.listen = {:?}: {e}", self.agent_api.listen))?;
        let pg: std::net::SocketAddr = self
            .postgres
            .listen
            .parse()
            .map_err(|e| format!("postgres.listen = {:?}: {e}", self.postgres.listen))?;
        if self.postgres.tls_cert.is_some() != self.postgres.tls_key.is_some() {
            return Err("postgres.tls-cert and postgres.tls-key must be set together".into());
        }
        if !pg.ip().is_loopback() && self.postgres.tls_cert.is_none() {
            return Err(format!(
                "postgres.listen = {:?} is not a loopback address: set postgres.tls-cert and postgres.tls-key (clients there must use TLS)",
                self.postgres.listen
            ));
        }
        if self.postgres.require_tls && self.postgres.tls_cert.is_none() {
            return Err("postgres.require-tls needs postgres.tls-cert and postgres.tls-key".into());
        }
        let http: std::net::SocketAddr = self
            .http
            .listen
            .parse()
            .map_err(|e| format!("http.listen = {:?}: {e}", self.http.listen))?;
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err("http.tls-cert and http.tls-key must be set together".into());
        }
        if !http.ip().is_loopback() && self.http.tls_cert.is_none() {
            return Err(format!(
                "http.listen = {:?} is not a loopback address: set http.tls-cert and http.tls-key (grant tokens must not cross a network in the clear)",
                self.http.listen
            ));
        }
        if self.http.inspect_body_bytes > 16 << 20 || self.http.mask_body_bytes > 1 << 30 {
            return Err(
                "http.inspect-body-bytes is at most 16 MiB and http.mask-body-bytes at most 1 GiB"
                    .into(),
            );
        }
        if self.agent_api.tls_cert.is_some() != self.agent_api.tls_key.is_some() {
            return Err("agent-api.tls-cert and agent-api.tls-key must be set together".into());
        }
        if self.agent_api.max_body_bytes == 0 || self.agent_api.requests_per_minute == 0 {
            return Err("agent-api.max-body-bytes and requests-per-minute must be positive".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, target) in self.targets.iter().enumerate() {
            if !names.insert(&target.name) {
                return Err(format!(
                    "target[{i}].name: `{}` is defined twice",
                    target.name
                ));
            }
            if target.upstream.is_empty() {
                return Err(format!("target[{i}] `{}`: upstream is empty", target.name));
            }
            check_target(target).map_err(|e| format!("target[{i}] `{}`: {e}", target.name))?;
        }
        Ok(())
    }

    /// The longest window a bundle may be signed for.
    pub fn max_bundle_validity(&self) -> Duration {
        humantime::parse_duration(&self.policy.max_validity)
            .unwrap_or(Duration::from_secs(400 * 86_400))
    }

    pub fn max_grant_ttl(&self) -> Duration {
        humantime::parse_duration(&self.gateway.max_grant_ttl).unwrap_or(Duration::from_secs(3600))
    }

    pub fn checkpoint_interval(&self) -> Duration {
        humantime::parse_duration(&self.record.checkpoint_interval)
            .unwrap_or(Duration::from_secs(10))
    }

    /// How long the record's writer gathers a commit: only in `batched` durability,
    /// where nothing waits on it.
    pub fn commit_window(&self) -> Duration {
        match self.record.durability {
            Durability::Strict => Duration::ZERO,
            Durability::Batched => humantime::parse_duration(&self.record.batch_window)
                .unwrap_or(Duration::from_millis(2)),
        }
    }

    pub fn trusted_keys(&self) -> Result<TrustedKeys, ConfigError> {
        self.policy
            .trusted_keys
            .iter()
            .map(|k| PublicKey::from_arg(k))
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedKeys::new)
            .map_err(|source| ConfigError::TrustedKey {
                path: self.path.clone(),
                source,
            })
    }

    /// The file this configuration was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How large an installed bundle's files may be.
    pub fn bundle_limits(&self) -> crate::bundle::SizeLimits {
        crate::bundle::SizeLimits {
            module: self.policy.max_module_mib << 20,
            fixture: self.policy.max_fixture_mib << 20,
            bundle: self.policy.max_bundle_mib << 20,
        }
    }

    pub fn policy_limits(&self) -> PolicyLimits {
        PolicyLimits {
            deadline: Duration::from_millis(self.policy.deadline_ms),
            memory_bytes: self.policy.memory_mib << 20,
            decision_deadline: Duration::from_millis(self.policy.decision_deadline_ms),
            agent_decisions: self.policy.agent_decisions,
            workers: self
                .policy
                .workers
                .unwrap_or_else(|| PolicyLimits::default().workers),
            ..PolicyLimits::default()
        }
    }
}

/// The gateway's data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// `explicit` (from `--data`), else `AIRLOCK_DATA`, else the XDG default.
    pub fn resolve(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let root = match explicit {
            Some(p) => p.to_path_buf(),
            None => match std::env::var_os("AIRLOCK_DATA") {
                Some(p) => PathBuf::from(p),
                None => match std::env::var_os("XDG_DATA_HOME") {
                    Some(p) => PathBuf::from(p).join("airlock"),
                    None => std::env::var_os("HOME")
                        .map(|h| PathBuf::from(h).join(".local/share/airlock"))
                        .ok_or(ConfigError::NoDataDir)?,
                },
            },
        };
        Ok(DataDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config_file(&self) -> PathBuf {
        self.root.join("airlock.toml")
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.root.join("policy")
    }

    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }

    /// The admin interface's Unix socket (mode 0600).
    pub fn admin_socket(&self) -> PathBuf {
        self.root.join("admin.sock")
    }

    /// The gateway's own checkpoint-signing key, created on first start.
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("gateway-signing.key")
    }

    /// The key grants' secrets are derived with, created on first start.
    pub fn grant_key(&self) -> PathBuf {
        self.root.join("grant-secrets.key")
    }
}

/// Checks a target's own settings, from the configuration file or added at run time:
/// its credential references, the settings that go together, and what its protocol
/// checks (its upstream address, …).
pub fn check_target(target: &TargetRecord) -> Result<(), String> {
    for reference in target.references() {
        crate::secrets::parse_reference(reference).map_err(|e| format!("credential: {e}"))?;
    }
    if target.read_user.is_some() != target.read_credential.is_some() {
        return Err("read-user and read-credential must be set together".into());
    }
    let postgres = target.kind == crate::policy::Kind::Postgres;
    if target.end_as.is_some() != target.end_credential.is_some()
        || (target.end_as.is_some() && !postgres)
    {
        return Err("end-as and end-credential go together, on PostgreSQL targets".into());
    }
    if !postgres && (target.read_user.is_some() || target.allow_superuser) {
        return Err("read-user and allow-superuser are for PostgreSQL targets".into());
    }
    if target.host_key.is_some() && target.kind != crate::policy::Kind::Ssh {
        return Err("host-key is for SSH targets".into());
    }
    let http = matches!(
        target.kind,
        crate::policy::Kind::Http | crate::policy::Kind::Kubernetes
    );
    if !http
        && (target.ca.is_some() || target.inject.is_some() || target.record_body_bytes.is_some())
    {
        return Err("ca, inject and record-body-bytes are for HTTP and Kubernetes targets".into());
    }
    crate::proxy::Protocols::builtin().check_target(target)
}
