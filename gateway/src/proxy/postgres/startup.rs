//! A client's way in: TLS negotiation, SCRAM-SHA-256 with the grant's secret, admission
//! by the broker, and the upstream login with the gateway's own credential. What is
//! left is a [`Session`] relaying statements.

use std::sync::Arc;

use bytes::BufMut;
use tracing::Instrument;

use super::catalog::Catalog;
use super::conn::{Conn, Stream, fatal};
use super::pins;
use super::scram::{Exchange, Verifier};
use super::services::{CancelKey, PgServices};
use super::session::{Admitted, Session};
use super::upstream::{self, Ender, Upstream, UpstreamAddr};
use super::wire::{self, Startup, WireError, message, ready_for_query};
use crate::grants::{Access, GrantAuthError, TargetRecord, looks_like_grant_id};
use crate::policy::Kind;
use crate::proxy::Via;
use crate::secrets::Secrets;

/// Refuses a login with FATAL `code` and records it (`session.refused`; SCRAM never
/// sends a secret, and a user name that is not a grant id is withheld).
async fn refuse_login(
    client: &mut Conn,
    services: &PgServices,
    code: &str,
    reason: &str,
    claimed: (Option<&str>, Option<&str>),
    peer: &str,
) {
    services
        .proxy
        .record_refusal("postgres", code, reason, claimed, peer);
    fatal(client, code, reason).await;
}

/// Accepts PostgreSQL clients on `listener` until the task is dropped.
pub(super) async fn listen(listener: tokio::net::TcpListener, services: Arc<PgServices>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                stream.set_nodelay(true).ok();
                tokio::spawn(run(stream, peer.to_string(), Via::Client, services.clone()));
            }
            Err(e) => crate::accept::pause_after("PostgreSQL gateway", &e).await,
        }
    }
}

/// Runs one client connection to its end: a network client's, or one the gateway's MCP
/// server opened in process (`via`), which takes the same path.
pub(super) async fn run(
    stream: impl Stream + 'static,
    peer: String,
    via: Via,
    services: Arc<PgServices>,
) {
    let mut client = Conn::new(stream);
    let mut tls = false;
    let params = loop {
        match client.read_startup().await {
            Ok(Startup::Ssl) => {
                let Some(acceptor) = services.tls.as_ref().filter(|_| !tls) else {
                    // No TLS configured (a loopback-only listener): the client may go on
                    // in plain text (SCRAM never sends the secret) or give up, as its
                    // sslmode says.
                    if client.send_now(b"N").await.is_err() {
                        return;
                    }
                    continue;
                };
                if client.send_now(b"S").await.is_err() {
                    return;
                }
                let stream = match client.into_stream() {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::info!(error = %e, "PostgreSQL client refused before TLS");
                        return;
                    }
                };
                match acceptor.accept(stream).await {
                    Ok(stream) => client = Conn::new(stream),
                    Err(e) => {
                        tracing::info!(error = %e, "PostgreSQL TLS handshake failed");
                        return;
                    }
                }
                tls = true;
            }
            Ok(Startup::GssEnc) => {
                if client.send_now(b"N").await.is_err() {
                    return;
                }
            }
            Ok(Startup::Cancel { pid, key }) => {
                let target = services.cancels.lock().unwrap().get(&(pid, key)).cloned();
                if let Some((upstream, upstream_key)) = target
                    && let Err(e) = upstream::cancel(&upstream, upstream_key).await
                {
                    tracing::warn!(error = %e, "cancel request to the upstream failed");
                }
                return;
            }
            Ok(Startup::Startup { params }) => break params,
            Err(WireError::Closed) => return,
            Err(e) => {
                let reason = format!("invalid startup packet: {e}");
                refuse_login(
                    &mut client,
                    &services,
                    "08P01",
                    &reason,
                    (None, None),
                    &peer,
                )
                .await;
                return;
            }
        }
    };
    let param = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let (user, database) = (param("user"), param("database"));
    let claimed = (user.as_deref(), database.as_deref());
    // An in-process stream crosses no network.
    if services.require_tls && !tls && via == Via::Client {
        refuse_login(
            &mut client,
            &services,
            "28000",
            "this gateway accepts PostgreSQL connections over TLS only: connect with sslmode=require (or verify-full)",
            claimed,
            &peer,
        )
        .await;
        return;
    }
    if let Err(reason) = pins::check_client_startup(&params) {
        refuse_login(&mut client, &services, "22023", &reason, claimed, &peer).await;
        return;
    }
    let (Some(grant_id), Some(database)) = (user.clone(), database.clone()) else {
        refuse_login(
            &mut client,
            &services,
            "28000",
            "the user must be the grant id and the database the target name",
            claimed,
            &peer,
        )
        .await;
        return;
    };
    let target = match services.proxy.broker.target(&database) {
        Some(t) if t.kind == Kind::Postgres => t,
        _ => {
            let reason = format!(
                "database \"{database}\" does not exist: there is no PostgreSQL target of that name"
            );
            refuse_login(&mut client, &services, "3D000", &reason, claimed, &peer).await;
            return;
        }
    };
    let logged = if looks_like_grant_id(&grant_id) {
        grant_id.as_str()
    } else {
        "(not a grant id)"
    };
    let span = tracing::info_span!("postgres", grant = %logged, target = %target.name);
    serve_session(client, services, grant_id, target, (peer, via))
        .instrument(span)
        .await;
}

async fn serve_session(
    mut client: Conn,
    services: Arc<PgServices>,
    grant_id: String,
    target: TargetRecord,
    (peer, via): (String, Via),
) {
    let claimed = (Some(grant_id.as_str()), Some(target.name.as_str()));
    if let Err(e) = authenticate(&mut client, &services, &grant_id).await {
        tracing::info!(error = %e, "PostgreSQL authentication failed");
        let reason = format!("password authentication failed for grant \"{grant_id}\"");
        refuse_login(&mut client, &services, "28P01", &reason, claimed, &peer).await;
        return;
    }
    let live = match services.proxy.admit(&grant_id, &target.name) {
        Ok(live) => live,
        Err(e) => {
            let code = match e {
                GrantAuthError::BadCredentials => "28P01",
                _ => "28000",
            };
            refuse_login(&mut client, &services, code, &e.to_string(), claimed, &peer).await;
            return;
        }
    };
    let read_only = live.grant.access == Access::Read || live.grant.read_only;
    let (upstream, catalog, ender) = match login(&services, &target, read_only).await {
        Ok(login) => login,
        Err(e) => {
            let detail = match &e {
                LoginError::Credential(detail) => detail.clone(),
                other => other.to_string(),
            };
            tracing::error!(error = %detail, "upstream login refused");
            fatal(&mut client, "08006", &e.to_string()).await;
            return;
        }
    };
    let core = match services.proxy.open(live, &target, "postgres", via).await {
        Ok(core) => core,
        Err(e) => {
            fatal(&mut client, "53000", &format!("refused: {e}")).await;
            return;
        }
    };
    // To the session's own server, not to where the end role logs in.
    let cancel = CancelKey::register(&services, upstream.host_port.clone(), upstream.backend_key);
    let mut hello = Vec::new();
    hello.extend_from_slice(&wire::authentication(0, &[]));
    for p in &upstream.parameters {
        hello.extend_from_slice(p);
    }
    hello.extend_from_slice(&message(b'K', |out| {
        out.put_i32(cancel.key.0);
        out.put_i32(cancel.key.1);
    }));
    hello.extend_from_slice(&ready_for_query(b'I'));
    if client.send_now(&hello).await.is_err() {
        core.close("client closed the connection").await;
        return;
    }
    let admitted = Admitted {
        core,
        catalog,
        read_only,
        superuser_allowed: target.allow_superuser,
        ender,
    };
    Session::new(client, upstream.conn, services.clone(), admitted)
        .serve()
        .await;
    drop(cancel);
}

/// Why the gateway did not give a session an upstream: said to the client as it is
/// (no secret is in any of it), and logged.
#[derive(Debug, thiserror::Error)]
enum LoginError {
    #[error("{0}")]
    Address(String),
    #[error("the gateway cannot log in upstream (its credential is unavailable)")]
    Credential(String),
    #[error("the gateway cannot reach the upstream database: {0}")]
    Upstream(#[from] upstream::UpstreamError),
    #[error("the gateway refuses the upstream session: {0}")]
    Pinned(String),
    #[error("the upstream session did not start read-only for a read grant")]
    NotReadOnly,
    #[error(
        "the gateway refuses to log in upstream as {0}: the role is a superuser or bypasses row security, or can become one, which undoes every server-side limit (use a least-privilege role, or set allow-superuser = true on the target)"
    )]
    Privileged(String),
}

/// Logs in upstream for a session: as the target's read role when the grant is
/// read-only and the target names one, with the pinned settings (and a read-only
/// default for a read grant), then checks what the server says it is, and reads the
/// target's catalog unless a fresh one is kept.
async fn login(
    services: &PgServices,
    target: &TargetRecord,
    read_only: bool,
) -> Result<(Upstream, Arc<Catalog>, Ender), LoginError> {
    let addr = UpstreamAddr::parse(&target.upstream).map_err(LoginError::Address)?;
    let (user, reference) = match (&target.read_user, &target.read_credential) {
        (Some(user), Some(reference)) if read_only => (user.as_str(), Some(reference)),
        _ => (addr.user.as_str(), target.credential.as_ref()),
    };
    let resolve = |reference: Option<&String>| match reference {
        None => Ok(None),
        Some(reference) => Secrets::load(&services.proxy.secrets_file)
            .map_err(|e| e.to_string())
            .and_then(|secrets| secrets.resolve(reference).map_err(|e| e.to_string()))
            .map(Some)
            .map_err(LoginError::Credential),
    };
    let credential = resolve(reference)?;
    let settings = pins::upstream_parameters(read_only);
    let mut upstream = upstream::connect(&addr, user, credential.as_ref(), &settings).await?;
    let ender = match &target.end_as {
        Some(end_as) => {
            let end_addr = UpstreamAddr::parse(end_as).map_err(LoginError::Address)?;
            Ender {
                user: end_addr.user.clone(),
                addr: end_addr,
                credential: resolve(target.end_credential.as_ref())?,
                backend_key: upstream.backend_key,
            }
        }
        None => Ender {
            user: user.to_string(),
            addr: addr.clone(),
            credential: credential.clone(),
            backend_key: upstream.backend_key,
        },
    };
    for parameter in &upstream.parameters {
        let mut body = parameter.slice(5..);
        if let (Ok(name), Ok(value)) = (wire::cstr(&mut body), wire::cstr(&mut body)) {
            // A superuser login is refused below, by what the role can become.
            pins::check_parameter(&name, &value, read_only, true).map_err(LoginError::Pinned)?;
        }
    }
    let facts = upstream::login_facts(&mut upstream.conn).await?;
    if read_only && !facts.read_only {
        return Err(LoginError::NotReadOnly);
    }
    if facts.privileged && !target.allow_superuser {
        return Err(LoginError::Privileged(user.to_string()));
    }
    let catalog = match services.catalogs.latest(&target.name) {
        Some((catalog, true)) => catalog,
        _ => {
            let catalog = Arc::new(upstream::read_catalog(&mut upstream.conn).await?);
            services.catalogs.put(&target.name, catalog.clone());
            catalog
        }
    };
    Ok((upstream, catalog, ender))
}

/// SCRAM-SHA-256 with the grant's secret. An unknown grant runs the same exchange
/// against a verifier nothing matches, so it looks like a wrong secret.
async fn authenticate(
    client: &mut Conn,
    services: &PgServices,
    grant_id: &str,
) -> Result<(), String> {
    let verifier = services
        .proxy
        .broker
        .secret_proof(grant_id, super::protocol::SCRAM_PROOF)
        .and_then(|v| Verifier::parse(&v))
        .unwrap_or_else(Verifier::impossible);
    client
        .send_now(&wire::authentication(10, b"SCRAM-SHA-256\0\0"))
        .await
        .map_err(|e| e.to_string())?;
    let first = client.read_message().await.map_err(|e| e.to_string())?;
    if first.tag != b'p' {
        return Err("expected a SASLInitialResponse".into());
    }
    let mut body = first.body.clone();
    let mechanism = wire::cstr(&mut body).map_err(|e| e.to_string())?;
    if mechanism != "SCRAM-SHA-256" || body.len() < 4 {
        return Err(format!("mechanism {mechanism} is not offered"));
    }
    let data = std::str::from_utf8(&body[4..]).map_err(|e| e.to_string())?;
    let (exchange, server_first) = Exchange::start(verifier, data).map_err(|e| e.to_string())?;
    client
        .send_now(&wire::authentication(11, server_first.as_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    let last = client.read_message().await.map_err(|e| e.to_string())?;
    if last.tag != b'p' {
        return Err("expected a SASLResponse".into());
    }
    let data = std::str::from_utf8(&last.body).map_err(|e| e.to_string())?;
    let server_final = exchange.finish(data).map_err(|e| e.to_string())?;
    client
        .send_now(&wire::authentication(12, server_final.as_bytes()))
        .await
        .map_err(|e| e.to_string())
}
