//! The agent API: ask for a grant, read it, end it; list the targets and the agent's
//! own grants.
//!
//! `POST /v1/grants` → 201 (allowed: the grant with its secret and connection details),
//! 202 (pending an operator's review), or 403 (denied, with the policy's reason and
//! hint). `GET /v1/grants/{id}` shows an active grant's secret again to the agent that
//! owns it, for follow-up commands of the same task; `DELETE /v1/grants/{id}` ends it,
//! or withdraws a pending request. `GET /v1/grants` and `GET /v1/targets` list. Every
//! grant route works on the agent's own grants only. Errors are JSON: `{"code": "...",
//! "message": "..."}` with a stable code.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use tracing::Instrument;

use super::ratelimit::{RateLimiter, RecordCap};
use crate::grants::{AgentRecord, Broker, BrokerError, GrantRecord, GrantRequestBody, GrantStatus};
use crate::proxy::Protocols;
use crate::record::{AuditEvent, EventKind, Write};

/// The MCP server as the agent API serves it: Streamable HTTP, stateless, JSON answers.
pub type McpHttp = rmcp::transport::streamable_http_server::StreamableHttpService<
    crate::mcp::McpServer,
    rmcp::transport::streamable_http_server::session::never::NeverSessionManager,
>;

/// The agent API's shared state.
pub struct AgentApi {
    broker: Arc<Broker>,
    max_body: usize,
    limiter: RateLimiter,
    /// Refused calls recorded, per caller.
    refusals: RecordCap,
    /// The protocols, for the connection details each adds to a grant.
    protocols: Protocols,
    /// MCP at `/mcp`, when the gateway serves it.
    mcp: Option<McpHttp>,
}

/// Refused calls recorded per caller (an agent, or all unauthenticated callers
/// together) per minute.
const REFUSALS_RECORDED_PER_MINUTE: u32 = 60;

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: serde_json::Value) -> Reply {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a static response builds")
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    reply(status, json!({ "code": code, "message": message.into() }))
}

fn broker_error(e: BrokerError) -> Reply {
    match e {
        BrokerError::Invalid(m) => error(StatusCode::BAD_REQUEST, "invalid_request", m),
        BrokerError::UnknownTarget(t) => error(
            StatusCode::NOT_FOUND,
            "unknown_target",
            format!("unknown target `{t}`"),
        ),
        BrokerError::NotFound(what) => error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        ),
        BrokerError::Conflict(m) => error(StatusCode::CONFLICT, "conflict", m),
        BrokerError::Record(e) => {
            tracing::error!(error = %e, "grant refused: the record cannot be written");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "record_unavailable",
                format!("refused: {e}"),
            )
        }
    }
}

/// When `grant` ends (for a pending one: its approval deadline), in RFC 3339.
pub(crate) fn expires_at(grant: &GrantRecord) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(grant.expires_ms),
    )
    .to_string()
}

/// Every target, with its kind and labels: `GET /v1/targets` and MCP's `list_targets`.
/// None is left out by a guess at policy: whether a grant is given depends on the task,
/// the access and the time as much as on the target, and is decided when asked, so
/// listing one promises nothing.
pub(crate) fn targets_json(broker: &Broker) -> serde_json::Value {
    let targets: Vec<_> = broker
        .targets()
        .into_iter()
        .map(|(target, _)| {
            json!({ "name": target.name, "kind": target.kind.as_str(), "labels": target.labels })
        })
        .collect();
    json!({ "targets": targets })
}

/// A grant as the agent sees it. The secret appears only in the response that issues
/// it; connection details name the grant id as the user and the secret as password,
/// and what the target's protocol adds (where to connect).
fn grant_json(
    grant: &GrantRecord,
    secret: Option<&str>,
    connection: Option<serde_json::Value>,
) -> serde_json::Value {
    let mut body = json!({
        "id": grant.id,
        "status": grant.status,
        "agent": grant.agent,
        "target": grant.target,
        "task": grant.task,
        "access": grant.access,
        "read_only": grant.read_only,
        "ttl_seconds": grant.ttl_seconds,
        "expires_at": expires_at(grant),
    });
    if let Some(reason) = &grant.reason {
        body["reason"] = json!(reason);
    }
    if let Some(hint) = &grant.hint {
        body["hint"] = json!(hint);
    }
    if let Some(secret) = secret {
        body["secret"] = json!(secret);
        body["connection"] =
            json!({ "target": grant.target, "user": grant.id, "password": secret });
        if let Some(serde_json::Value::Object(fields)) = connection {
            for (name, value) in fields {
                body["connection"][name] = value;
            }
        }
    }
    body
}

impl AgentApi {
    pub fn new(
        broker: Arc<Broker>,
        max_body: usize,
        requests_per_minute: u32,
        protocols: Protocols,
    ) -> Self {
        AgentApi {
            broker,
            max_body,
            limiter: RateLimiter::new(requests_per_minute),
            refusals: RecordCap::per_minute(REFUSALS_RECORDED_PER_MINUTE),
            protocols,
            mcp: None,
        }
    }

    /// This API serving MCP at `/mcp` as well.
    pub fn with_mcp(self, mcp: McpHttp) -> Self {
        AgentApi {
            mcp: Some(mcp),
            ..self
        }
    }

    /// Records a refused call (`api.refused`): who (if known), what, and the status.
    /// At most [`REFUSALS_RECORDED_PER_MINUTE`] per caller, so refusals cannot flood
    /// the record; the next recorded one counts those left out.
    fn record_refusal(&self, agent: Option<&str>, method: &Method, path: &str, status: StatusCode) {
        let Some(left_out) = self.refusals.admit(agent.unwrap_or("(unauthenticated)")) else {
            return;
        };
        let path: String = withhold_tokens(path).chars().take(256).collect();
        let mut event = AuditEvent::new(EventKind::ApiRefused).detail(json!({
            "method": method.as_str(),
            "path": path,
            "status": status.as_u16(),
            "reason": status.canonical_reason(),
            "unrecorded_before": left_out,
        }));
        if let Some(agent) = agent {
            event = event.agent(agent);
        }
        if let Err(e) = self.broker.record().write_queued(Write::event(event)) {
            tracing::error!(error = %e, "cannot record a refused API call");
        }
    }

    /// Handles one request from `peer`; never fails (every error is a JSON response).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: std::net::SocketAddr,
    ) -> Result<Reply, Infallible> {
        Ok(self.route(req, peer).await)
    }

    async fn route(&self, mut req: Request<Incoming>, peer: std::net::SocketAddr) -> Reply {
        let path = req.uri().path().to_string();
        match (req.method(), path.as_str()) {
            (&Method::GET, "/healthz") => {
                return match self.broker.record().ready() {
                    Ok(()) => reply(StatusCode::OK, json!({ "status": "ready" })),
                    Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", e.to_string()),
                };
            }
            (&Method::GET, "/v1/openapi.json") => {
                return Response::builder()
                    .header(CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from_static(super::OPENAPI.as_bytes())))
                    .expect("a static response builds");
            }
            _ => {}
        }
        let Some(agent) = self.authenticate(&req) else {
            self.record_refusal(None, req.method(), &path, StatusCode::UNAUTHORIZED);
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "a valid agent token is required: Authorization: Bearer airlock_…",
            );
        };
        let span = tracing::info_span!("agent_api", agent = %agent.name, %path);
        let (name, method) = (agent.name.clone(), req.method().clone());
        let reply = match &self.mcp {
            _ if !self.limiter.allow(&agent.name) => error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many requests from this agent; slow down",
            ),
            Some(mcp) if path == "/mcp" => {
                req.extensions_mut().insert(crate::mcp::Caller {
                    agent,
                    peer: peer.to_string(),
                });
                self.mcp(mcp, req).instrument(span).await
            }
            _ => {
                self.authenticated(agent, req, path.clone())
                    .instrument(span)
                    .await
            }
        };
        // A denied grant request is recorded as its decision (403, grant.decided).
        let status = reply.status();
        if status.is_client_error() && status != StatusCode::FORBIDDEN {
            self.record_refusal(Some(&name), &method, &path, status);
        }
        reply
    }

    async fn authenticated(
        &self,
        agent: AgentRecord,
        req: Request<Incoming>,
        path: String,
    ) -> Reply {
        let grant_id = path
            .strip_prefix("/v1/grants/")
            .filter(|id| !id.contains('/'));
        match (req.method().clone(), path.as_str(), grant_id) {
            (Method::POST, "/v1/grants", _) => self.create(&agent, req).await,
            (Method::GET, "/v1/grants", _) => {
                let grants: Vec<_> = self
                    .broker
                    .grants_of(&agent.name)
                    .iter()
                    .map(|g| grant_json(g, None, None))
                    .collect();
                reply(StatusCode::OK, json!({ "grants": grants }))
            }
            (Method::GET, "/v1/targets", _) => reply(StatusCode::OK, targets_json(&self.broker)),
            (Method::GET, _, Some(id)) => self.show(&agent, id).await,
            (Method::DELETE, _, Some(id)) => match self.broker.end(&agent.name, id).await {
                Ok(grant) => reply(StatusCode::OK, grant_json(&grant, None, None)),
                Err(e) => broker_error(e),
            },
            (_, "/v1/grants" | "/v1/targets", _) | (_, _, Some(_)) => error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed on {path}", req.method()),
            ),
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint: {path}"),
            ),
        }
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Option<AgentRecord> {
        let header = req.headers().get(AUTHORIZATION)?.to_str().ok()?;
        // RFC 9110: the scheme is case-insensitive.
        let (scheme, token) = header.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        self.broker.authenticate_agent(token.trim())
    }

    async fn create(&self, agent: &AgentRecord, req: Request<Incoming>) -> Reply {
        let json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a grant request is JSON: send Content-Type: application/json",
            );
        }
        let body = match Limited::new(req.into_body(), self.max_body).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e)
                if e.downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some() =>
            {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("request body is larger than {} bytes", self.max_body),
                );
            }
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_body", e.to_string()),
        };
        let request = match serde_json::from_slice::<GrantRequestBody>(&body) {
            // A task is recorded and shown to operators: no agent token in it.
            Ok(request) => GrantRequestBody {
                task: withhold_tokens(&request.task).into_owned(),
                ..request
            },
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    format!("request body is not a grant request: {e}"),
                );
            }
        };
        match self.broker.request(agent, request).await {
            Ok(issued) => {
                let status = match issued.grant.status {
                    GrantStatus::Active => StatusCode::CREATED,
                    GrantStatus::Pending => StatusCode::ACCEPTED,
                    _ => StatusCode::FORBIDDEN,
                };
                let connection = issued
                    .secret
                    .as_deref()
                    .and_then(|secret| self.connection(&issued.grant, secret));
                let mut body = grant_json(&issued.grant, issued.secret.as_deref(), connection);
                if status == StatusCode::FORBIDDEN {
                    body["code"] = json!("denied");
                    body["message"] = body["reason"].clone();
                }
                reply(status, body)
            }
            Err(e) => broker_error(e),
        }
    }

    /// One MCP request, answered by the MCP server (stateless, so with one JSON body).
    async fn mcp(&self, mcp: &McpHttp, req: Request<Incoming>) -> Reply {
        let response = match tower_service::Service::call(&mut mcp.clone(), req).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let (parts, body) = response.into_parts();
        match body.collect().await {
            Ok(body) => Response::from_parts(parts, Full::new(body.to_bytes())),
            Err(never) => match never {},
        }
    }

    /// Where and how to connect under `grant`, as its target's protocol says.
    fn connection(&self, grant: &GrantRecord, secret: &str) -> Option<serde_json::Value> {
        let kind = self.broker.target(&grant.target)?.kind;
        self.protocols.connection(kind, grant, secret)
    }

    /// The grant; active, with its secret and connection details (minted now if an
    /// operator just approved it).
    async fn show(&self, agent: &AgentRecord, id: &str) -> Reply {
        let shown = match self.broker.collect(&agent.name, id).await {
            Ok(Some(collected)) => Some(collected),
            Ok(None) => self.broker.secret_for(&agent.name, id),
            Err(e) => return broker_error(e),
        };
        if let Some((grant, secret)) = shown {
            let connection = self.connection(&grant, &secret);
            return reply(
                StatusCode::OK,
                grant_json(&grant, Some(&secret), connection),
            );
        }
        match self.broker.grant_for(&agent.name, id) {
            Some(grant) => reply(StatusCode::OK, grant_json(&grant, None, None)),
            None => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("grant `{id}` not found"),
            ),
        }
    }
}

/// `text` with every agent token in it (`airlock_` and what follows, up to a character
/// no token holds) replaced: for what is recorded or logged.
pub(crate) fn withhold_tokens(text: &str) -> std::borrow::Cow<'_, str> {
    const PREFIX: &str = "airlock_";
    if !text.contains(PREFIX) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        out.push_str(&rest[..at]);
        out.push_str("(token withheld)");
        let after = &rest[at + PREFIX.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out.into()
}

#[cfg(test)]
mod tests {
    use super::withhold_tokens;

    #[test]
    fn tokens_are_withheld_from_what_is_recorded() {
        let token = "airlock_0123456789abcdef_nqAe2Qd-KVcq_XvT9f8oIZZ";
        assert_eq!(
            withhold_tokens(&format!("/v1/{token}/x")),
            "/v1/(token withheld)/x"
        );
        assert_eq!(
            withhold_tokens(&format!("fix it, use {token}. thanks")),
            "fix it, use (token withheld). thanks"
        );
        assert_eq!(
            withhold_tokens("confirm migration 42 ran"),
            "confirm migration 42 ran"
        );
    }
}
