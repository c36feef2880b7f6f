//! One agent connection: startup → SCRAM with the grant → admission → upstream login
//! with the gateway's credential → statements, each classified, decided by policy,
//! recorded, then relayed, with results masked on the way back.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{BufMut, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::classify::{ClassifyCache, changes_nothing};
use super::scram::{Exchange, Verifier};
use super::upstream::{self, UpstreamAddr};
use super::wire::{
    self, Message, Startup, WireError, error_response, message, put_cstr, ready_for_query,
};
use crate::bundle::ActivePolicy;
use crate::grants::{Broker, GrantAuthError, LiveGrant};
use crate::policy::types::{Action, Column, GrantContext, Rows, SqlStatement};
use crate::policy::{Kind, MaskPlan, Outcome};
use crate::record::{AuditEvent, Write};
use crate::secrets::Secrets;

/// Rows masked per policy call.
const MASK_BATCH: usize = 256;

/// What every PostgreSQL session shares.
pub struct PgServices {
    pub broker: Arc<Broker>,
    pub policy: Arc<ActivePolicy>,
    pub classify: ClassifyCache,
    pub secrets_file: std::path::PathBuf,
    /// The cancel keys the gateway gave its clients → the upstream connection and key
    /// to cancel. Clients never see an upstream's key.
    pub cancels: std::sync::Mutex<HashMap<BackendKey, (String, BackendKey)>>,
}

/// A BackendKeyData: (process id, secret key).
pub type BackendKey = (i32, i32);

/// A random BackendKeyData for a client, registered until the session ends.
struct CancelKey<'a> {
    services: &'a PgServices,
    key: (i32, i32),
}

impl<'a> CancelKey<'a> {
    fn register(services: &'a PgServices, upstream: String, upstream_key: (i32, i32)) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
        let key = (
            i32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) & 0x7fff_ffff,
            i32::from_be_bytes(bytes[4..].try_into().expect("4 bytes")),
        );
        services
            .cancels
            .lock()
            .unwrap()
            .insert(key, (upstream, upstream_key));
        CancelKey { services, key }
    }
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.services.cancels.lock().unwrap().remove(&self.key);
    }
}

async fn fatal(client: &mut TcpStream, code: &str, message: &str) {
    let _ = client
        .write_all(&error_response("FATAL", code, message, None))
        .await;
}

/// Runs one client connection to its end.
pub async fn run(mut client: TcpStream, services: Arc<PgServices>) {
    client.set_nodelay(true).ok();
    let params = loop {
        match wire::read_startup(&mut client).await {
            // No TLS on this listener yet, no GSSAPI: the client may go on in plain text
            // (SCRAM never sends the secret) or give up, as libpq's sslmode says.
            Ok(Startup::Ssl | Startup::GssEnc) => {
                if client.write_all(b"N").await.is_err() {
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
                fatal(
                    &mut client,
                    "08P01",
                    &format!("invalid startup packet: {e}"),
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
    let (Some(grant_id), Some(database)) = (param("user"), param("database")) else {
        fatal(
            &mut client,
            "28000",
            "the user must be the grant id and the database the target name",
        )
        .await;
        return;
    };
    let target = match services.broker.target(&database) {
        Some(t) if t.kind == Kind::Postgres => t,
        _ => {
            fatal(
                &mut client,
                "3D000",
                &format!("database \"{database}\" does not exist: there is no PostgreSQL target of that name"),
            )
            .await;
            return;
        }
    };
    let span = tracing::info_span!("postgres", grant = %grant_id, target = %target.name);
    serve_session(client, services, grant_id, target)
        .instrument(span)
        .await;
}

async fn serve_session(
    mut client: TcpStream,
    services: Arc<PgServices>,
    grant_id: String,
    target: crate::grants::TargetRecord,
) {
    if let Err(e) = authenticate(&mut client, &services, &grant_id).await {
        tracing::info!(error = %e, "PostgreSQL authentication failed");
        fatal(
            &mut client,
            "28P01",
            &format!("password authentication failed for grant \"{grant_id}\""),
        )
        .await;
        return;
    }
    let live = match services.broker.admit(&grant_id, &target.name) {
        Ok(live) => live,
        Err(e) => {
            let code = match e {
                GrantAuthError::BadCredentials => "28P01",
                _ => "28000",
            };
            fatal(&mut client, code, &e.to_string()).await;
            return;
        }
    };
    let credential = match (&target.credential, Secrets::load(&services.secrets_file)) {
        (None, _) => None,
        (Some(reference), Ok(secrets)) => match secrets.resolve(reference) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "upstream credential unavailable");
                fatal(
                    &mut client,
                    "08006",
                    "the gateway cannot log in upstream (its credential is unavailable)",
                )
                .await;
                return;
            }
        },
        (Some(_), Err(e)) => {
            tracing::error!(error = %e, "secrets file unavailable");
            fatal(
                &mut client,
                "08006",
                "the gateway cannot log in upstream (its secrets are unavailable)",
            )
            .await;
            return;
        }
    };
    let addr = match UpstreamAddr::parse(&target.upstream) {
        Ok(addr) => addr,
        Err(e) => {
            fatal(&mut client, "08006", &e).await;
            return;
        }
    };
    let upstream = match upstream::connect(&addr, credential.as_ref()).await {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "upstream login failed");
            fatal(
                &mut client,
                "08006",
                &format!("the gateway cannot reach the upstream database: {e}"),
            )
            .await;
            return;
        }
    };
    let grant = live.grant.clone();
    let context = GrantContext {
        grant_id: grant.id.clone(),
        agent: services
            .broker
            .agents()
            .into_iter()
            .find(|a| a.name == grant.agent)
            .map(|a| a.policy_agent())
            .unwrap_or_else(|| crate::policy::types::Agent {
                id: grant.agent.clone(),
                labels: vec![],
            }),
        target: target.policy_target(),
        task: grant.task.clone(),
        access: grant.access.into(),
        now_unix_ms: 0,
    };
    let opened = match services.broker.open_session(&grant, "postgres").await {
        Ok(session) => session,
        Err(e) => {
            fatal(&mut client, "53000", &format!("refused: {e}")).await;
            return;
        }
    };
    let session_id = opened.id.clone();
    let cancel = CancelKey::register(&services, addr.host_port.clone(), upstream.backend_key);
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
    if client.write_all(&hello).await.is_err() {
        return;
    }
    let mut session = Session {
        client,
        upstream: upstream.stream,
        services: services.clone(),
        context,
        live,
        session_id: session_id.clone(),
        tx_status: b'I',
        statements: 0,
        mask_plans: HashMap::new(),
    };
    let reason = session.serve().await;
    drop(cancel);
    if let Err(e) = services
        .broker
        .close_session(opened, session.statements, &reason)
        .await
    {
        tracing::error!(error = %e, "cannot record the session's end");
    }
}

/// SCRAM-SHA-256 with the grant's secret. An unknown grant runs the same exchange
/// against a verifier nothing matches, so it looks like a wrong secret.
async fn authenticate(
    client: &mut TcpStream,
    services: &PgServices,
    grant_id: &str,
) -> Result<(), String> {
    let verifier = services
        .broker
        .scram_verifier(grant_id)
        .and_then(|v| Verifier::parse(&v))
        .unwrap_or_else(Verifier::impossible);
    client
        .write_all(&wire::authentication(10, b"SCRAM-SHA-256\0\0"))
        .await
        .map_err(|e| e.to_string())?;
    let first = wire::read_message(client)
        .await
        .map_err(|e| e.to_string())?;
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
        .write_all(&wire::authentication(11, server_first.as_bytes()))
        .await
        .map_err(|e| e.to_string())?;
    let last = wire::read_message(client)
        .await
        .map_err(|e| e.to_string())?;
    if last.tag != b'p' {
        return Err("expected a SASLResponse".into());
    }
    let data = std::str::from_utf8(&last.body).map_err(|e| e.to_string())?;
    let server_final = exchange.finish(data).map_err(|e| e.to_string())?;
    client
        .write_all(&wire::authentication(12, server_final.as_bytes()))
        .await
        .map_err(|e| e.to_string())
}

struct Session {
    client: TcpStream,
    upstream: TcpStream,
    services: Arc<PgServices>,
    context: GrantContext,
    live: LiveGrant,
    session_id: String,
    tx_status: u8,
    statements: u64,
    /// Mask plans by row description, for the policy set they were made with: the
    /// modules are asked which columns they mask once per result shape, not per query.
    mask_plans: MaskPlans,
}

type MaskPlans = HashMap<(usize, Vec<Column>), Option<Arc<MaskPlan>>>;

/// A PostgreSQL type OID's name, for masking modules (text-like types by name).
fn type_name(oid: u32) -> String {
    match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        700 => "float4",
        701 => "float8",
        705 => "unknown",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        other => return format!("oid:{other}"),
    }
    .to_string()
}

impl Session {
    /// Serves the connection; returns why it ended.
    async fn serve(&mut self) -> String {
        loop {
            let message = tokio::select! {
                m = wire::read_message(&mut self.client) => m,
                _ = self.live.ended.changed() => {
                    let reason = self.live.ended.borrow().clone().unwrap_or_else(|| "the grant ended".into());
                    fatal(&mut self.client, "57P01", &format!("terminating connection: {reason}")).await;
                    return reason;
                }
            };
            let message = match message {
                Ok(m) => m,
                Err(WireError::Closed) => return "client closed the connection".into(),
                Err(e) => {
                    fatal(&mut self.client, "08P01", &format!("invalid message: {e}")).await;
                    return format!("protocol error: {e}");
                }
            };
            let result = match message.tag {
                b'Q' => self.query(message).await,
                b'X' => {
                    let _ = self.upstream.write_all(&message_bytes(&message)).await;
                    return "client terminated".into();
                }
                b'P' | b'B' | b'E' | b'D' | b'S' | b'C' | b'H' | b'F' => {
                    self.unsupported_extended(message.tag).await
                }
                other => {
                    fatal(
                        &mut self.client,
                        "08P01",
                        &format!("unexpected message type {:?}", other as char),
                    )
                    .await;
                    return "protocol error".into();
                }
            };
            if let Err(reason) = result {
                return reason;
            }
        }
    }

    /// The extended query protocol is refused until this gateway checks it at Parse;
    /// after the error, messages are discarded until Sync, as PostgreSQL does.
    async fn unsupported_extended(&mut self, mut tag: u8) -> Result<(), String> {
        let error = error_response(
            "ERROR",
            "0A000",
            "the extended query protocol is not supported by this Airlock gateway yet",
            Some("use the simple query protocol (psql, or a driver's simple-query mode)"),
        );
        self.client
            .write_all(&error)
            .await
            .map_err(|e| e.to_string())?;
        while tag != b'S' {
            tag = wire::read_message(&mut self.client)
                .await
                .map_err(|e| e.to_string())?
                .tag;
        }
        self.client
            .write_all(&ready_for_query(self.tx_status))
            .await
            .map_err(|e| e.to_string())
    }

    async fn deny(&mut self, code: &str, reason: &str, hint: Option<&str>) -> Result<(), String> {
        let error = error_response("ERROR", code, reason, hint);
        if self.tx_status == b'T' {
            // Inside a transaction block PostgreSQL aborts the transaction on an error;
            // make the upstream do the same with a statement that can only fail.
            let poison = message(b'Q', |out| put_cstr(out, "airlock_statement_denied"));
            self.upstream
                .write_all(&poison)
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let m = wire::read_message(&mut self.upstream)
                    .await
                    .map_err(|e| e.to_string())?;
                if m.tag == b'Z' {
                    self.tx_status = m.body.first().copied().unwrap_or(b'E');
                    break;
                }
            }
        }
        let mut out = error.to_vec();
        out.extend_from_slice(&ready_for_query(self.tx_status));
        self.client.write_all(&out).await.map_err(|e| e.to_string())
    }

    async fn query(&mut self, message: Message) -> Result<(), String> {
        let mut body = message.body.clone();
        let text = wire::cstr(&mut body).map_err(|e| e.to_string())?;
        let classified = self.services.classify.classify(&text);
        let statements: Vec<SqlStatement> = match &*classified {
            Ok(s) => s.clone(),
            Err(e) => {
                let refused = self.statement_event(
                    &text,
                    "unparsed",
                    "deny",
                    Some(&e.to_string()),
                    None,
                    &[],
                );
                let result = self
                    .services
                    .broker
                    .record()
                    .write_async(Write::event(refused))
                    .await;
                self.recorded_or_close(result).await?;
                return self.deny("42601", &e.to_string(), None).await;
            }
        };
        if statements.is_empty() {
            let out = [
                message_bytes(&Message {
                    tag: b'I',
                    body: Bytes::new(),
                }),
                ready_for_query(self.tx_status),
            ]
            .concat();
            return self.client.write_all(&out).await.map_err(|e| e.to_string());
        }
        let set = self.services.policy.current();
        let mut write = Write::default();
        let mut denial: Option<(String, Option<String>)> = None;
        for statement in &statements {
            let mut statement_context = self.context.clone();
            statement_context.now_unix_ms = now_ms();
            let decision = set.check(&statement_context, &Action::Sql(statement.clone()));
            let unmaskable = statement.kind == crate::policy::types::SqlKind::CopyTo
                && set.masks(&self.context.target);
            let (reason, hint) = match &decision.outcome {
                Outcome::Allow(_) if unmaskable => (
                    Some(
                        "COPY TO is not masked on this target; read with SELECT instead"
                            .to_string(),
                    ),
                    None,
                ),
                Outcome::Allow(_) => (None, None),
                Outcome::Deny { reason, hint, .. } => (Some(reason.clone()), hint.clone()),
                Outcome::Review { reason, .. } => (Some(format!("needs review: {reason}")), None),
            };
            let verdict = if reason.is_some() { "deny" } else { "allow" };
            write.events.push(self.statement_event(
                &statement.text,
                &format!("{:?}", statement.kind),
                verdict,
                reason.as_deref(),
                decision.bundle.as_ref().map(|b| b.to_string()),
                &decision.votes,
            ));
            if denial.is_none()
                && let Some(reason) = reason
            {
                denial = Some((reason, hint));
            }
        }
        self.statements += statements.len() as u64;
        // A statement that writes runs only once its entry is durable. A Query whose
        // statements all change nothing is sent while the entry is made durable (the
        // fsync overlaps the query), and its result is released only after that.
        let overlap = denial.is_none() && statements.iter().all(changes_nothing);
        let record = self.services.broker.record().clone();
        let recording = tokio::spawn(async move { record.write_async(write).await });
        if overlap {
            self.upstream
                .write_all(&message_bytes(&message))
                .await
                .map_err(|e| e.to_string())?;
        }
        let result = recording.await.map_err(|e| e.to_string())?;
        self.recorded_or_close(result).await?;
        if let Some((reason, hint)) = denial {
            return self.deny("42501", &reason, hint.as_deref()).await;
        }
        if !overlap {
            self.upstream
                .write_all(&message_bytes(&message))
                .await
                .map_err(|e| e.to_string())?;
        }
        self.relay_results(&set).await
    }

    /// The record entry of one statement and its verdict.
    fn statement_event(
        &self,
        text: &str,
        kind: &str,
        verdict: &str,
        reason: Option<&str>,
        bundle: Option<String>,
        votes: &[crate::policy::ModuleVote],
    ) -> AuditEvent {
        let votes: Vec<serde_json::Value> = votes
            .iter()
            .map(|v| serde_json::json!({ "module": &*v.module, "digest": &*v.digest }))
            .collect();
        AuditEvent::new("sql.statement")
            .agent(&self.context.agent.id)
            .target(&self.context.target.name)
            .grant(&self.context.grant_id)
            .detail(serde_json::json!({
                "session": self.session_id,
                "text": text,
                "kind": kind,
                "verdict": verdict,
                "reason": reason,
                "bundle": bundle,
                "votes": votes,
            }))
    }

    /// Goes on only if the record write succeeded; otherwise ends the session with
    /// FATAL: nothing goes on unrecorded.
    async fn recorded_or_close(
        &mut self,
        result: Result<crate::record::Receipt, crate::record::RecordError>,
    ) -> Result<(), String> {
        if let Err(e) = result {
            fatal(&mut self.client, "53000", &format!("refused: {e}")).await;
            return Err(format!("record unavailable: {e}"));
        }
        Ok(())
    }

    /// Relays the upstream's answer to one Query, masking rows, until ReadyForQuery.
    async fn relay_results(&mut self, set: &Arc<crate::policy::PolicySet>) -> Result<(), String> {
        let started = Instant::now();
        let mut plan: Option<(Arc<MaskPlan>, Vec<Column>)> = None;
        let mut pending: Vec<Vec<Option<String>>> = Vec::new();
        let mut rows = 0u64;
        let mut bytes = 0u64;
        let mut commands: Vec<String> = Vec::new();
        loop {
            let m = tokio::select! {
                m = wire::read_message(&mut self.upstream) => m.map_err(|e| e.to_string())?,
                _ = self.live.ended.changed() => {
                    let reason = self.live.ended.borrow().clone().unwrap_or_else(|| "the grant ended".into());
                    fatal(&mut self.client, "57P01", &format!("terminating connection: {reason}")).await;
                    return Err(reason);
                }
            };
            bytes += m.body.len() as u64 + 5;
            if m.tag != b'D' && !pending.is_empty() {
                self.flush_masked(&plan, &mut pending).await?;
            }
            match m.tag {
                b'T' => {
                    let fields = wire::row_description(&m.body).map_err(|e| e.to_string())?;
                    let columns: Vec<Column> = fields
                        .iter()
                        .map(|f| Column {
                            name: f.name.clone(),
                            type_name: type_name(f.type_oid),
                        })
                        .collect();
                    let key = (Arc::as_ptr(set) as usize, columns);
                    let cached = match self.mask_plans.get(&key) {
                        Some(cached) => cached.clone(),
                        None => {
                            let made = match set.mask_plan(&self.context, &key.1) {
                                Ok(p) if p.is_empty() => None,
                                Ok(p) => Some(Arc::new(p)),
                                Err(e) => return self.withhold(&e.to_string()).await,
                            };
                            if self.mask_plans.len() >= 256 {
                                self.mask_plans.clear();
                            }
                            self.mask_plans.insert(key.clone(), made.clone());
                            made
                        }
                    };
                    plan = cached.map(|p| (p, key.1));
                    self.client
                        .write_all(&message_bytes(&m))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                b'D' => {
                    rows += 1;
                    match &plan {
                        None => self
                            .client
                            .write_all(&message_bytes(&m))
                            .await
                            .map_err(|e| e.to_string())?,
                        Some(_) => {
                            let values = wire::data_row(&m.body).map_err(|e| e.to_string())?;
                            pending.push(
                                values
                                    .into_iter()
                                    .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                                    .collect(),
                            );
                            if pending.len() >= MASK_BATCH {
                                self.flush_masked(&plan, &mut pending).await?;
                            }
                        }
                    }
                }
                b'G' => {
                    // COPY FROM STDIN, already allowed: relay the client's data.
                    self.client
                        .write_all(&message_bytes(&m))
                        .await
                        .map_err(|e| e.to_string())?;
                    loop {
                        let c = wire::read_message(&mut self.client)
                            .await
                            .map_err(|e| e.to_string())?;
                        self.upstream
                            .write_all(&message_bytes(&c))
                            .await
                            .map_err(|e| e.to_string())?;
                        if matches!(c.tag, b'c' | b'f') {
                            break;
                        }
                    }
                }
                b'C' => {
                    let mut tag = m.body.clone();
                    commands.push(wire::cstr(&mut tag).unwrap_or_default());
                    self.client
                        .write_all(&message_bytes(&m))
                        .await
                        .map_err(|e| e.to_string())?;
                }
                b'Z' => {
                    self.tx_status = m.body.first().copied().unwrap_or(b'I');
                    self.client
                        .write_all(&message_bytes(&m))
                        .await
                        .map_err(|e| e.to_string())?;
                    // What came back, after the fact: the statement's own entry was durable
                    // before any of it was released. A failure here poisons the record, so
                    // the next statement is refused.
                    let summary = AuditEvent::new("sql.result")
                        .agent(&self.context.agent.id)
                        .target(&self.context.target.name)
                        .grant(&self.context.grant_id)
                        .detail(serde_json::json!({
                            "session": self.session_id,
                            "commands": commands,
                            "rows": rows,
                            "bytes": bytes,
                            "duration_ms": started.elapsed().as_secs_f64() * 1e3,
                        }));
                    let record = self.services.broker.record().clone();
                    tokio::spawn(async move {
                        if let Err(e) = record.write_async(Write::event(summary)).await {
                            tracing::error!(error = %e, "cannot record a statement's result summary");
                        }
                    });
                    return Ok(());
                }
                _ => self
                    .client
                    .write_all(&message_bytes(&m))
                    .await
                    .map_err(|e| e.to_string())?,
            }
        }
    }

    async fn flush_masked(
        &mut self,
        plan: &Option<(Arc<MaskPlan>, Vec<Column>)>,
        pending: &mut Vec<Vec<Option<String>>>,
    ) -> Result<(), String> {
        let Some((plan, columns)) = plan else {
            return Ok(());
        };
        let batch = Rows {
            columns: columns.clone(),
            values: std::mem::take(pending),
        };
        match plan.mask_rows(&self.context, batch) {
            Ok(masked) => {
                let mut out = Vec::new();
                for row in masked.values {
                    let values: Vec<Option<Bytes>> =
                        row.into_iter().map(|v| v.map(Bytes::from)).collect();
                    out.extend_from_slice(&wire::encode_data_row(&values));
                }
                self.client.write_all(&out).await.map_err(|e| e.to_string())
            }
            Err(e) => self.withhold(&e.to_string()).await,
        }
    }

    /// A masking failure: the result is not released and the connection is closed.
    async fn withhold(&mut self, reason: &str) -> Result<(), String> {
        fatal(&mut self.client, "XX000", reason).await;
        Err(reason.to_string())
    }
}

fn message_bytes(m: &Message) -> Bytes {
    message(m.tag, |out| out.put_slice(&m.body))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Accepts PostgreSQL clients on `listener` until the task is dropped.
pub async fn listen(listener: tokio::net::TcpListener, services: Arc<PgServices>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(run(stream, services.clone()));
            }
            Err(e) => tracing::warn!(error = %e, "PostgreSQL accept failed"),
        }
    }
}
