//! The admin interface: one JSON request per line on a Unix socket, one JSON response
//! per line back. The socket is mode 0600 in the gateway's 0700 data directory, so
//! only the gateway's own user can reach it; the operator is named by the socket
//! peer's uid in the record.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::Instrument;

use crate::grants::{Broker, BrokerError, TargetRecord};
use crate::record::{ExportLine, export_lines};
use crate::secrets::Secrets;

/// Longest request line accepted.
const MAX_LINE: usize = 1 << 20;

/// An operator's request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum AdminRequest {
    AgentAdd {
        name: String,
        #[serde(default)]
        labels: BTreeMap<String, String>,
    },
    AgentList,
    AgentRevoke {
        name: String,
    },
    TargetAdd {
        target: Box<TargetRecord>,
    },
    TargetList,
    TargetRemove {
        name: String,
    },
    GrantsList,
    GrantsShow {
        id: String,
    },
    GrantsApprove {
        id: String,
    },
    GrantsDeny {
        id: String,
        reason: String,
    },
    GrantsRevoke {
        id: String,
    },
    SessionsList,
    /// A session and, in order, every audit entry of it (statements, verdicts, results).
    SessionsShow {
        id: String,
    },
    /// Entries from `since` on, and every checkpoint, as export lines.
    AuditExport {
        since: u64,
    },
    AuditCheckpoint,
    Health,
}

/// The response to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminResponse {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub result: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<AdminError>,
}

#[derive(Debug, Clone, Serialize, Deserialize, thiserror::Error)]
#[error("{message} ({code})")]
pub struct AdminError {
    pub code: String,
    pub message: String,
}

impl AdminError {
    fn new(code: &str, message: impl Into<String>) -> Self {
        AdminError {
            code: code.into(),
            message: message.into(),
        }
    }
}

impl From<Result<Value, AdminError>> for AdminResponse {
    fn from(result: Result<Value, AdminError>) -> Self {
        match result {
            Ok(result) => AdminResponse {
                ok: true,
                result,
                error: None,
            },
            Err(error) => AdminResponse {
                ok: false,
                result: Value::Null,
                error: Some(error),
            },
        }
    }
}

impl From<BrokerError> for AdminError {
    fn from(e: BrokerError) -> Self {
        let code = match &e {
            BrokerError::Invalid(_) => "invalid_request",
            BrokerError::UnknownTarget(_) | BrokerError::NotFound(_) => "not_found",
            BrokerError::Conflict(_) => "conflict",
            BrokerError::Record(_) => "record_unavailable",
        };
        AdminError::new(code, e.to_string())
    }
}

/// Serves the admin socket at `path` until the task is dropped. `secrets_file` is
/// where targets added at run time must find their credentials.
pub async fn serve(path: &Path, broker: Arc<Broker>, secrets_file: PathBuf) -> std::io::Result<()> {
    let secrets_file = Arc::new(secrets_file);
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    loop {
        // A failed accept (no file descriptors left) must not end the operators'
        // interface: they are who would revoke grants meanwhile.
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                crate::accept::pause_after("admin socket", &e).await;
                continue;
            }
        };
        let broker = broker.clone();
        let secrets_file = secrets_file.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, broker, &secrets_file).await {
                tracing::warn!(error = %e, "admin connection failed");
            }
        });
    }
}

async fn connection(
    stream: UnixStream,
    broker: Arc<Broker>,
    secrets_file: &Path,
) -> std::io::Result<()> {
    let operator = match stream.peer_cred() {
        Ok(cred) => format!("uid:{}", cred.uid()),
        Err(_) => "uid:unknown".to_string(),
    };
    let (read, mut write) = stream.into_split();
    let mut lines = AsyncBufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let result = if line.len() > MAX_LINE {
            Err(AdminError::new(
                "too_large",
                format!("request is larger than {MAX_LINE} bytes"),
            ))
        } else {
            match serde_json::from_str::<AdminRequest>(&line) {
                Ok(request) => handle(&broker, &operator, secrets_file, request).await,
                Err(e) => Err(AdminError::new(
                    "invalid_request",
                    format!("not an admin request: {e}"),
                )),
            }
        };
        let response = AdminResponse::from(result);
        let mut out = serde_json::to_vec(&response).expect("a response serializes");
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// A grant for the operator: everything but what is derived from its secret.
fn grant_view(grant: &crate::grants::GrantRecord) -> Value {
    let mut view = json!(grant);
    if let Some(fields) = view.as_object_mut() {
        fields.remove("secret_hash");
        fields.remove("proofs");
    }
    view
}

async fn handle(
    broker: &Broker,
    operator: &str,
    secrets_file: &Path,
    request: AdminRequest,
) -> Result<Value, AdminError> {
    let span = tracing::info_span!("admin", %operator);
    dispatch(broker, operator, secrets_file, request)
        .instrument(span)
        .await
}

async fn dispatch(
    broker: &Broker,
    operator: &str,
    secrets_file: &Path,
    request: AdminRequest,
) -> Result<Value, AdminError> {
    match request {
        AdminRequest::AgentAdd { name, labels } => broker
            .add_agent(&name, labels)
            .await
            .map(|t| json!({ "agent": t.agent.name, "token": t.token }))
            .map_err(Into::into),
        AdminRequest::AgentList => Ok(json!(broker
            .agents()
            .iter()
            .map(|a| json!({ "name": a.name, "labels": a.labels, "revoked": a.revoked, "created_ms": a.created_ms }))
            .collect::<Vec<_>>())),
        AdminRequest::AgentRevoke { name } => broker
            .revoke_agent(&name, operator)
            .await
            .map(|ended| json!({ "agent": name, "grants_ended": ended }))
            .map_err(Into::into),
        AdminRequest::TargetAdd { target } => {
            // The upstream must be usable and the credential must resolve now: a target
            // the gateway cannot reach is refused.
            crate::config::check_target(&target)
                .map_err(|e| AdminError::new("invalid_request", e))?;
            for reference in target.references() {
                Secrets::load(secrets_file)
                    .and_then(|secrets| secrets.resolve(reference))
                    .map_err(|e| AdminError::new("invalid_request", e.to_string()))?;
            }
            broker
                .add_target(*target, operator)
                .await
                .map(|()| json!({ "added": true }))
                .map_err(Into::into)
        }
        AdminRequest::TargetList => Ok(json!(broker
            .targets()
            .iter()
            .map(|(t, source)| json!({ "target": t, "source": source }))
            .collect::<Vec<_>>())),
        AdminRequest::TargetRemove { name } => broker
            .remove_target(&name, operator)
            .await
            .map(|()| json!({ "removed": name }))
            .map_err(Into::into),
        AdminRequest::GrantsList => Ok(json!(broker.grants().iter().map(grant_view).collect::<Vec<_>>())),
        AdminRequest::GrantsShow { id } => broker
            .grant(&id)
            .map(|g| grant_view(&g))
            .ok_or_else(|| AdminError::new("not_found", format!("grant `{id}` not found"))),
        AdminRequest::GrantsApprove { id } => broker
            .approve(&id, operator)
            .await
            .map(|g| grant_view(&g))
            .map_err(Into::into),
        AdminRequest::GrantsDeny { id, reason } => broker
            .deny(&id, operator, &reason)
            .await
            .map(|g| grant_view(&g))
            .map_err(Into::into),
        AdminRequest::GrantsRevoke { id } => broker
            .revoke(&id, operator)
            .await
            .map(|g| grant_view(&g))
            .map_err(Into::into),
        AdminRequest::SessionsList => broker.sessions().map(|s| json!(s)).map_err(Into::into),
        AdminRequest::SessionsShow { id } => {
            let session = broker
                .sessions()?
                .into_iter()
                .find(|s| s.id == id)
                .ok_or_else(|| AdminError::new("not_found", format!("session `{id}` not found")))?;
            let mut entries = Vec::new();
            for kv in broker.record().spaces().audit.iter() {
                let value = kv
                    .value()
                    .map_err(|e| AdminError::new("record_unavailable", e.to_string()))?;
                if let Ok(entry) = serde_json::from_slice::<Value>(&value)
                    && entry["detail"]["session"] == json!(id)
                {
                    entries.push(entry);
                }
            }
            Ok(json!({ "session": session, "entries": entries }))
        }
        AdminRequest::AuditExport { since } => export_lines(broker.record().spaces(), since)
            .map(|lines| {
                json!(lines
                    .iter()
                    .map(|l| String::from_utf8_lossy(&l.to_line()).into_owned())
                    .collect::<Vec<_>>())
            })
            .map_err(|e| AdminError::new("record_unavailable", e.to_string())),
        AdminRequest::AuditCheckpoint => broker
            .record()
            .spaces()
            .latest_checkpoint()
            .map_err(|e| AdminError::new("record_unavailable", e.to_string()))
            .and_then(|cp| {
                cp.map(|note| json!(String::from_utf8_lossy(&note)))
                    .ok_or_else(|| AdminError::new("not_found", "no checkpoint has been signed yet"))
            }),
        AdminRequest::Health => match broker.record().ready() {
            Ok(()) => Ok(json!({
                "status": "ready",
                "policy": broker.policy().health(),
            })),
            Err(e) => Err(AdminError::new("not_ready", e.to_string())),
        },
    }
}

/// The operator CLI's side: one request, one response, over the socket at `path`.
pub fn call(path: &Path, request: &AdminRequest) -> Result<Value, AdminCallError> {
    let stream =
        std::os::unix::net::UnixStream::connect(path).map_err(|e| AdminCallError::Connect {
            path: path.display().to_string(),
            source: e,
        })?;
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(AdminCallError::Io)?;
    let mut response = String::new();
    BufReader::new(&stream)
        .read_line(&mut response)
        .map_err(AdminCallError::Io)?;
    let response: AdminResponse =
        serde_json::from_str(&response).map_err(|e| AdminCallError::Protocol(e.to_string()))?;
    match response.error {
        Some(error) => Err(AdminCallError::Refused(error)),
        None => Ok(response.result),
    }
}

/// Parses the lines of an `audit-export` result.
pub fn export_from(result: &Value) -> Result<Vec<ExportLine>, String> {
    let lines: Vec<String> = serde_json::from_value(result.clone()).map_err(|e| e.to_string())?;
    crate::record::parse_export(lines.join("\n").as_bytes())
}

/// Why an admin call failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminCallError {
    #[error(
        "cannot reach the gateway's admin socket {path} ({source}); is `airlock serve` running with this data directory?"
    )]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Io(std::io::Error),
    #[error("admin socket: malformed response: {0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(AdminError),
}
