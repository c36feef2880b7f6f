//! `airlock serve`: the gateway's main job.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::api::admin;
use crate::api::agent::AgentApi;
use crate::bundle::{PolicyDir, Reloader, activated_event, refused_event};
use crate::config::{Config, DataDir};
use crate::fsperm;
use crate::grants::{Broker, GrantKey};
use crate::keys::SecretKey;
use crate::mcp::{McpServer, McpServices};
use crate::policy::Kind;
use crate::policy::{ActivePolicy, PolicyEngine, PolicySet};
use crate::proxy::http::{Http, HttpLimits, HttpServices};
use crate::proxy::postgres::PgServices;
use crate::proxy::postgres::Postgres;
use crate::proxy::postgres::classify::ClassifyCache;
use crate::proxy::ssh::{Ssh, SshServices};
use crate::proxy::{Advertised, ProtocolGateway, Protocols, ProxyServices};
use crate::record::{
    AuditEvent, EventKind, FileWitness, HttpWitness, Record, RecordOptions, Witness, WitnessUrl,
    Write,
};
use crate::secrets::Secrets;

/// How often grants are checked for expiry (their connections are cut within this).
const EXPIRY_SWEEP: Duration = Duration::from_millis(200);
/// How often the policy directory is checked for a new bundle.
const RELOAD_INTERVAL: Duration = Duration::from_secs(1);

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> ServeError + '_ {
    move |e| ServeError::Setup(format!("{what}: {e}"))
}

/// Reads the gateway's checkpoint-signing key, creating it (0600) on first start.
pub fn signing_key(path: &Path) -> Result<SecretKey, ServeError> {
    if !path.exists() {
        let key = SecretKey::generate();
        key.write(path).map_err(setup("gateway signing key"))?;
        tracing::info!(key = %path.display(), id = %key.public().id(), "created the gateway's signing key");
    }
    SecretKey::read(path).map_err(setup("gateway signing key"))
}

/// Runs the gateway until `shutdown` resolves.
/// The checkpoint witnesses the configuration names: a file outside the data
/// directory, an HTTP(S) endpoint, or both.
fn witnesses(config: &Config, data: &DataDir) -> Result<Vec<Arc<dyn Witness>>, ServeError> {
    let mut witnesses: Vec<Arc<dyn Witness>> = Vec::new();
    if let Some(path) = &config.record.witness {
        if !path.is_absolute() || path.starts_with(data.root()) {
            return Err(ServeError::Setup(format!(
                "record.witness = {}: the witness must be an absolute path outside the data directory, where the gateway's own files cannot rewrite it",
                path.display()
            )));
        }
        witnesses.push(Arc::new(FileWitness::new(path)));
    }
    if let Some(url) = &config.record.witness_url {
        let url = WitnessUrl::parse(url, config.record.witness_ca.as_deref())
            .map_err(setup("record.witness-url"))?;
        witnesses.push(Arc::new(
            HttpWitness::start(url).map_err(setup("record.witness-url"))?,
        ));
    }
    Ok(witnesses)
}

/// How often a gateway whose record failed checks whether its store is writable.
const RECORD_PROBE: Duration = Duration::from_secs(5);

/// Why [`run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The shutdown future resolved.
    Shutdown,
    /// The record had failed and its store is writable again. fjall refuses every
    /// write after a failed one until the store is reopened, and the gateway's state
    /// is loaded from the store, so the caller starts the gateway again, whole (the
    /// binary re-executes itself in place).
    RecordWritableAgain,
}

pub async fn run(
    config: Config,
    data: DataDir,
    shutdown: impl Future<Output = ()>,
) -> Result<Ended, ServeError> {
    fsperm::create_private_dir(data.root()).map_err(setup("data directory"))?;
    // A write past a file-size limit must fail (and be refused, fail closed), not kill
    // the gateway: handling SIGXFSZ turns it into an EFBIG error from write(2).
    let _file_size_signal = tokio::signal::unix::signal(
        tokio::signal::unix::SignalKind::from_raw(rustix::process::Signal::XFSZ.as_raw()),
    )?;
    let key = signing_key(&data.signing_key())?;
    let record = Record::open(
        RecordOptions {
            origin: config.gateway.name.clone(),
            checkpoint_every: config.record.checkpoint_every,
            checkpoint_interval: config.checkpoint_interval(),
            commit_window: config.commit_window(),
            witnesses: witnesses(&config, &data)?,
            ..RecordOptions::new(data.store_dir())
        },
        key,
    )
    .map_err(setup("record"))?;

    // Every configured target's credential must resolve now, not at an agent's first
    // connection: a gateway that cannot reach its upstreams should not start.
    let secrets_file = data.root().join(&config.gateway.secrets_file);
    let secrets = Secrets::load(&secrets_file).map_err(setup("gateway.secrets-file"))?;
    for target in &config.targets {
        if target.kind == crate::policy::Kind::Postgres && target.end_as.is_none() {
            tracing::warn!(
                target = %target.name,
                "no end-as role: a grant's end is confirmed by logging in as the agents' own role, which a write grant can lock out, and a locked-out session that also unpins its connection check can keep working past its grant; see the README, \"A grant's end reaches the server\""
            );
        }
        for reference in target.references() {
            secrets
                .resolve(reference)
                .map_err(|e| ServeError::Setup(format!("target `{}`: {e}", target.name)))?;
        }
    }

    let trust = config.trusted_keys().map_err(setup("configuration"))?;
    let policy_dir = PolicyDir::open(&data.policy_dir())
        .map_err(setup("policy directory"))?
        .with_limits(config.bundle_limits());
    let engine = PolicyEngine::new(config.policy_limits(), Some(&policy_dir.cache_dir()))
        .map_err(setup("policy engine"))?;
    let installed = policy_dir.current().map_err(setup("policy directory"))?;
    let initial = match policy_dir.load_current(&engine, &trust, SystemTime::now()) {
        Ok(Some(set)) => {
            let recovery = policy_dir.recovery().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "the recovery note cannot be read");
                None
            });
            record
                .write_async(Write::event(activated_event(&set, None, recovery.as_ref())))
                .await
                .map_err(setup("record"))?;
            set
        }
        Ok(None) => {
            tracing::warn!(
                "no policy bundle is installed: every request is denied until one is (airlock bundle install)"
            );
            PolicySet::empty()
        }
        Err(e) => {
            tracing::error!(error = %e, "the installed policy bundle is refused: every request is denied until a good one is installed");
            record
                .write_async(Write::event(refused_event(installed.as_deref(), &e)))
                .await
                .map_err(setup("record"))?;
            PolicySet::empty()
        }
    };
    if let Some(bundle) = initial.bundle() {
        tracing::info!(bundle = %bundle, "policy bundle active");
    }
    let policy = Arc::new(ActivePolicy::new(initial, engine.limits()));
    let _reloader = Reloader::new(policy_dir.clone(), engine, trust, policy.clone(), installed)
        .recording(record.clone())
        .spawn(RELOAD_INTERVAL);

    let broker = Arc::new(
        Broker::load(
            record.clone(),
            policy.clone(),
            Arc::new(Protocols::builtin()),
            GrantKey::load_or_create(&data.grant_key()).map_err(setup("grant key"))?,
            config.targets.clone(),
            config.max_grant_ttl(),
        )
        .map_err(setup("grant broker"))?,
    );

    let interrupted = broker
        .close_interrupted_sessions()
        .await
        .map_err(setup("record"))?;
    let config_text = std::fs::read(config.path()).unwrap_or_default();
    record
        .write_async(Write::event(
            AuditEvent::new(EventKind::GatewayStarted).detail(serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "pid": std::process::id(),
                "config": config.path().display().to_string(),
                "config_sha256": hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&config_text)),
                "sessions_closed_as_interrupted": interrupted,
            })),
        ))
        .await
        .map_err(setup("record"))?;

    let addr: SocketAddr = config
        .agent_api
        .listen
        .parse()
        .map_err(setup("agent-api.listen"))?;
    let tls = match (&config.agent_api.tls_cert, &config.agent_api.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::api::load_tls("agent-api", cert, key).map_err(ServeError::Setup)?)
        }
        _ if !addr.ip().is_loopback() => {
            return Err(ServeError::Setup(format!(
                "refusing to serve the agent API in plain HTTP on {addr}, which is not a loopback address; set agent-api.tls-cert and agent-api.tls-key"
            )));
        }
        _ => None,
    };
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    match tls {
        Some(_) => tracing::info!("agent API listening on https://{local}"),
        None => tracing::warn!(
            "agent API listening on http://{local}: plain HTTP on loopback, for development only; set agent-api.tls-cert and tls-key"
        ),
    }
    let pg_tls = match (&config.postgres.tls_cert, &config.postgres.tls_key) {
        (Some(cert), Some(key)) => {
            Some(crate::api::load_tls("postgres", cert, key).map_err(ServeError::Setup)?)
        }
        _ => None,
    };
    let pg_listener = TcpListener::bind(&config.postgres.listen).await?;
    let pg_addr = pg_listener.local_addr()?;
    tracing::info!("PostgreSQL gateway listening on {pg_addr}");
    let proxy = Arc::new(ProxyServices {
        broker: broker.clone(),
        policy: policy.clone(),
        secrets_file: secrets_file.clone(),
        durability: config.record.durability,
        refusals: crate::api::RecordCap::per_minute(60),
    });
    let ssh_services = Arc::new(
        SshServices::new(proxy.clone(), &data.root().join(&config.ssh.host_key))
            .map_err(ServeError::Setup)?,
    );
    let ssh_listener = TcpListener::bind(&config.ssh.listen).await?;
    let ssh_addr = ssh_listener.local_addr()?;
    let ssh_host_key = ssh_services.host_public_key();
    tracing::info!("SSH gateway listening on {ssh_addr}");
    let http_tls = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::api::load_tls_alpn("http", cert, key, &[b"h2", b"http/1.1"])
                .map_err(ServeError::Setup)?,
        ),
        _ => None,
    };
    let http_listener = TcpListener::bind(&config.http.listen).await?;
    let http_addr = http_listener.local_addr()?;
    match http_tls {
        Some(_) => tracing::info!("HTTP gateway listening on https://{http_addr}"),
        None => tracing::warn!(
            "HTTP gateway listening on http://{http_addr}: plain HTTP on loopback, for development only; set http.tls-cert and tls-key"
        ),
    }
    let http_is_tls = http_tls.is_some();
    // The chain kubectl and other clients pin as the gateway's CA.
    let http_chain = served_chain("http", config.http.tls_cert.as_deref(), http_is_tls)?;
    let http_services = Arc::new(HttpServices::new(
        proxy.clone(),
        HttpLimits::from(&config.http),
        http_tls,
    ));
    // The addresses actually bound (a configured port 0 picks a free one), for
    // operators, scripts and tests.
    let endpoints = serde_json::json!({
        "agent_api": local.to_string(),
        "agent_api_url": format!(
            "{}://{}",
            if tls.is_some() { "https" } else { "http" },
            Advertised::new(local, config.gateway.public_host.as_deref()).authority()
        ),
        "postgres": pg_addr.to_string(),
        "ssh": ssh_addr.to_string(),
        "ssh_host_key": ssh_host_key,
        "http": http_addr.to_string(),
        "http_tls": http_is_tls,
    });
    fsperm::write_private_atomic(
        &data.root().join("endpoints.json"),
        endpoints.to_string().as_bytes(),
    )
    .map_err(setup("endpoints file"))?;
    let public_host = config.gateway.public_host.as_deref();
    let at = |addr| Advertised::new(addr, public_host);
    let pg_chain = served_chain(
        "postgres",
        config.postgres.tls_cert.as_deref(),
        pg_tls.is_some(),
    )?;
    let pg_services = Arc::new(PgServices {
        proxy,
        classify: ClassifyCache::new(10_000),
        catalogs: Default::default(),
        require_tls: config.postgres.require_tls || !pg_addr.ip().is_loopback(),
        tls: pg_tls,
        cancels: Default::default(),
    });
    let api = Arc::new(
        AgentApi::new(
            broker.clone(),
            config.agent_api.max_body_bytes,
            config.agent_api.requests_per_minute,
            Protocols::builtin()
                .with(Arc::new(Postgres {
                    listen: Some(at(pg_addr)),
                    tls: pg_chain,
                }))
                .with(Arc::new(Ssh {
                    listen: Some(at(ssh_addr)),
                    host_key: Some(ssh_host_key),
                }))
                .with(Arc::new(
                    Http::new(Kind::Http).at(at(http_addr), http_chain.clone()),
                ))
                .with(Arc::new(
                    Http::new(Kind::Kubernetes).at(at(http_addr), http_chain),
                )),
        )
        .with_mcp(mcp_http(
            Arc::new(McpServices {
                broker: broker.clone(),
                postgres: pg_services.clone(),
            }),
            local,
            public_host,
        )),
    );

    // Each protocol's gateway on its own listener.
    let gateways: Vec<(Arc<dyn ProtocolGateway>, TcpListener)> = vec![
        (pg_services, pg_listener),
        (ssh_services, ssh_listener),
        (http_services, http_listener),
    ];
    let gateway_tasks: Vec<_> = gateways
        .into_iter()
        .map(|(gateway, listener)| {
            tracing::debug!(protocol = gateway.name(), "serving");
            tokio::spawn(gateway.serve(listener))
        })
        .collect();
    // A record that cannot be written ends every session: nothing goes on unrecorded.
    // Then the store is probed until it is writable again.
    let (writable, writable_again) = tokio::sync::oneshot::channel();
    let failure_task = tokio::spawn({
        let (failure, broker) = (record.failure(), broker.clone());
        let store = data.store_dir();
        async move {
            let reason = failure.await;
            broker.cut_all(&format!(
                "the gateway's record is unavailable ({reason}), so nothing more can be recorded"
            ));
            loop {
                tokio::time::sleep(RECORD_PROBE).await;
                let store = store.clone();
                match tokio::task::spawn_blocking(move || probe_writable(&store)).await {
                    Ok(Ok(())) => break,
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "the record's store is still not writable; every action stays refused")
                    }
                    Err(e) => tracing::error!(error = %e, "the record's store probe failed"),
                }
            }
            tracing::warn!(
                "the record's store is writable again: the gateway restarts in place to reopen it"
            );
            let _ = writable.send(());
        }
    });

    let admin_path = data.admin_socket();
    let admin_task = tokio::spawn({
        let broker = broker.clone();
        let path = admin_path.clone();
        async move {
            if let Err(e) = admin::serve(&path, broker, secrets_file).await {
                tracing::error!(error = %e, "admin socket failed");
            }
        }
    });
    tracing::info!(socket = %admin_path.display(), "admin interface listening");

    let expiry_task = tokio::spawn({
        let broker = broker.clone();
        async move {
            loop {
                tokio::time::sleep(EXPIRY_SWEEP).await;
                broker.expire_due().await;
            }
        }
    });

    let accept = async {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    crate::accept::pause_after("agent API", &e).await;
                    continue;
                }
            };
            let api = api.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| api.clone().handle(req, peer));
                let http = hyper::server::conn::http1::Builder::new();
                let result = match tls {
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => http.serve_connection(TokioIo::new(stream), service).await,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                    },
                    None => http.serve_connection(TokioIo::new(stream), service).await,
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "agent API connection ended with an error");
                }
            });
        }
    };
    let ended = tokio::select! {
        () = accept => Ended::Shutdown,
        () = shutdown => {
            tracing::info!("shutting down");
            Ended::Shutdown
        }
        Ok(()) = writable_again => Ended::RecordWritableAgain,
    };
    admin_task.abort();
    expiry_task.abort();
    failure_task.abort();
    for task in &gateway_tasks {
        task.abort();
    }
    // Open sessions end as PostgreSQL's own do on shutdown (57P01), before the record
    // closes under them.
    broker.cut_all("the gateway is shutting down");
    if ended == Ended::RecordWritableAgain {
        // The store is left open, not closed: closing would flush the batch whose
        // write failed, and was refused to its callers, now that there is room. The
        // caller replaces the process next, which drops it as a kill would.
        std::mem::forget(record);
        return Ok(ended);
    }
    if let Err(e) = record
        .write_async(Write::event(
            AuditEvent::new(EventKind::GatewayStopped).detail(
                serde_json::json!({ "pid": std::process::id(), "reason": "shutdown signal" }),
            ),
        ))
        .await
    {
        tracing::error!(error = %e, "cannot record the gateway's stop");
    }
    let _ = std::fs::remove_file(&admin_path);
    drop(broker);
    drop(api);
    record.close();
    Ok(ended)
}

/// The certificate chain (PEM) a listener serves over TLS (`tls`), for connection
/// details: clients pin it. `section` names the configuration section in errors.
fn served_chain(
    section: &str,
    cert: Option<&Path>,
    tls: bool,
) -> Result<Option<String>, ServeError> {
    match cert {
        Some(cert) if tls => std::fs::read_to_string(cert)
            .map(Some)
            .map_err(|e| ServeError::Setup(format!("{section}.tls-cert: {e}"))),
        _ => Ok(None),
    }
}

/// The MCP server at the agent API: stateless Streamable HTTP answering in JSON, its
/// `Host` check admitting loopback names, the address the agent API is bound to and
/// the public host.
fn mcp_http(
    services: Arc<McpServices>,
    bound: SocketAddr,
    public_host: Option<&str>,
) -> crate::api::agent::McpHttp {
    use rmcp::transport::streamable_http_server::StreamableHttpServerConfig;
    let hosts = ["localhost".to_string(), "127.0.0.1".into(), "::1".into()]
        .into_iter()
        .chain([bound.ip().to_string()])
        .chain(public_host.map(str::to_string));
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        .with_json_response(true)
        .with_sse_keep_alive(None)
        .with_allowed_hosts(hosts);
    crate::api::agent::McpHttp::new(
        move || Ok(McpServer::new(services.clone())),
        Default::default(),
        config,
    )
}

/// Whether the store's directory takes a write as big as a commit and its fsync: a
/// file is written, synced and removed.
fn probe_writable(store: &Path) -> std::io::Result<()> {
    use std::io::Write as _;
    let path = store.join(format!(".airlock-probe-{}", std::process::id()));
    let result = std::fs::File::create(&path).and_then(|mut file| {
        file.write_all(&[0; 64 * 1024])?;
        file.sync_all()
    });
    let _ = std::fs::remove_file(&path);
    result
}
