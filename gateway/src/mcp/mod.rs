//! MCP for agents: the gateway's tools, served with the official Rust SDK (rmcp) over
//! Streamable HTTP at the agent API (`/mcp`, the agent token as bearer), and over stdio
//! by `airlock mcp`, which relays to it.
//!
//! The tools are no side door. Asking for access is the agent API's grant request,
//! decided by the same broker and policy; acting under a grant goes through the
//! protocol gateway a human's client would use (the PostgreSQL gateway for
//! `sql_query`), over an in-process stream, logged in with the grant, so the action
//! meets the same policy, masking and record, which says `via: mcp`.

mod tools;

use std::sync::Arc;
use std::time::Duration;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, Implementation, JsonObject,
    ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::{Value, json};

use crate::grants::{AgentRecord, Broker, BrokerError, GrantRecord, GrantRequestBody, GrantStatus};
use crate::proxy::postgres::PgServices;
use crate::proxy::postgres::client::{self, QueryError};

/// Who is calling, put in the HTTP request's extensions by the agent API once it has
/// checked the agent token: the MCP server trusts nothing else to say who the agent is.
#[derive(Clone)]
pub struct Caller {
    pub agent: AgentRecord,
    /// The agent's address, recorded as the in-process sessions' peer.
    pub peer: String,
}

/// The MCP server's shared state: the broker and the protocol gateways it is a client
/// of.
pub struct McpServices {
    pub broker: Arc<Broker>,
    pub postgres: Arc<PgServices>,
}

/// Rows a `sql_query` returns unless it asks for fewer (or more, up to the ceiling).
const DEFAULT_ROWS: usize = 100;
const MAX_ROWS: usize = 10_000;
/// The longest `wait_for_review` waits in one call.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// How often a grant under review is looked at while waiting.
const REVIEW_POLL: Duration = Duration::from_millis(250);

/// One MCP session's handler (stateless: every call names its grant).
#[derive(Clone)]
pub struct McpServer {
    services: Arc<McpServices>,
}

impl McpServer {
    pub fn new(services: Arc<McpServices>) -> Self {
        McpServer { services }
    }
}

/// Why a tool gave no result. The agent is told as a structured result, not a
/// transport error: `{"denied": true, "reason", "hint"}` for a refusal it can act on,
/// `{"error": …}` for anything else.
#[derive(Debug)]
enum ToolError {
    Denied {
        reason: String,
        hint: Option<String>,
    },
    Failed(Box<Value>),
}

impl From<ToolError> for CallToolResult {
    fn from(e: ToolError) -> Self {
        match e {
            ToolError::Denied { reason, hint } => {
                let mut body = json!({ "denied": true, "reason": reason });
                if let Some(hint) = hint {
                    body["hint"] = hint.into();
                }
                CallToolResult::structured_error(body)
            }
            ToolError::Failed(body) => CallToolResult::structured_error(*body),
        }
    }
}

fn refused(reason: impl Into<String>, hint: Option<&str>) -> ToolError {
    ToolError::Denied {
        reason: reason.into(),
        hint: hint.map(str::to_string),
    }
}

fn failed(message: impl Into<String>) -> ToolError {
    ToolError::Failed(Box::new(json!({ "error": message.into() })))
}

fn broker_failed(e: BrokerError) -> ToolError {
    match e {
        BrokerError::Record(e) => failed(format!("refused: the record cannot be written ({e})")),
        other => failed(other.to_string()),
    }
}

/// A grant as a tool reports it: no secret (tools use the grant by id).
fn grant_summary(grant: &GrantRecord) -> Value {
    let mut body = json!({
        "grant": grant.id,
        "status": grant.status,
        "target": grant.target,
        "access": grant.access,
        "read_only": grant.read_only,
        "expires_at": crate::api::agent::expires_at(grant),
    });
    if let Some(reason) = &grant.reason {
        body["reason"] = reason.clone().into();
    }
    if let Some(hint) = &grant.hint {
        body["hint"] = hint.clone().into();
    }
    body
}

fn string<'a>(args: &'a JsonObject, name: &str) -> Result<&'a str, ToolError> {
    args.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| failed(format!("`{name}` is required (a string)")))
}

impl McpServer {
    async fn call(&self, caller: &Caller, name: &str, args: &JsonObject) -> CallToolResult {
        let result = match name {
            "list_targets" => Ok(self.list_targets()),
            "request_access" => self.request_access(caller, args).await,
            "wait_for_review" => self.wait_for_review(caller, args).await,
            "end_access" => self.end_access(caller, args).await,
            "sql_query" => self.sql_query(caller, args).await,
            other => Err(failed(format!("no tool named `{other}`"))),
        };
        result.unwrap_or_else(CallToolResult::from)
    }

    fn list_targets(&self) -> CallToolResult {
        CallToolResult::structured(crate::api::agent::targets_json(&self.services.broker))
    }

    async fn request_access(
        &self,
        caller: &Caller,
        args: &JsonObject,
    ) -> Result<CallToolResult, ToolError> {
        let mut body = json!({
            "target": string(args, "target")?,
            "task": crate::api::agent::withhold_tokens(string(args, "task")?),
            "access": args.get("access").cloned().unwrap_or_else(|| "read".into()),
            "ttl": args.get("ttl").cloned().unwrap_or_else(|| "10m".into()),
        });
        if body["access"].is_null() {
            body["access"] = "read".into();
        }
        let request: GrantRequestBody =
            serde_json::from_value(body).map_err(|e| failed(format!("invalid request: {e}")))?;
        let issued = self
            .services
            .broker
            .request(&caller.agent, request)
            .await
            .map_err(broker_failed)?;
        let grant = &issued.grant;
        Ok(match grant.status {
            GrantStatus::Active => CallToolResult::structured(grant_summary(grant)),
            GrantStatus::Pending => {
                let mut body = grant_summary(grant);
                body["next"] = format!(
                    "an operator must approve it: call wait_for_review with grant {}",
                    grant.id
                )
                .into();
                CallToolResult::structured(body)
            }
            _ => refused(
                grant.reason.clone().unwrap_or_else(|| "denied".into()),
                grant.hint.as_deref(),
            )
            .into(),
        })
    }

    /// The caller's own grant `args.grant`.
    fn own_grant(&self, caller: &Caller, args: &JsonObject) -> Result<GrantRecord, ToolError> {
        let id = string(args, "grant")?;
        self.services
            .broker
            .grant_for(&caller.agent.name, id)
            .ok_or_else(|| failed(format!("grant `{id}` not found")))
    }

    async fn wait_for_review(
        &self,
        caller: &Caller,
        args: &JsonObject,
    ) -> Result<CallToolResult, ToolError> {
        let id = self.own_grant(caller, args)?.id;
        let timeout = args
            .get("timeout_seconds")
            .and_then(Value::as_u64)
            .map_or(MAX_WAIT, Duration::from_secs)
            .min(MAX_WAIT);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let grant = self
                .services
                .broker
                .grant_for(&caller.agent.name, &id)
                .ok_or_else(|| failed(format!("grant `{id}` not found")))?;
            match grant.status {
                GrantStatus::Pending if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(REVIEW_POLL).await;
                }
                GrantStatus::Pending => {
                    let mut body = grant_summary(&grant);
                    body["next"] = "still waiting for review: call wait_for_review again".into();
                    return Ok(CallToolResult::structured(body));
                }
                GrantStatus::Active => {
                    // Approved: its secret is minted now, for the tools to log in with.
                    self.services
                        .broker
                        .collect(&caller.agent.name, &id)
                        .await
                        .map_err(broker_failed)?;
                    return Ok(CallToolResult::structured(grant_summary(&grant)));
                }
                _ => {
                    return Err(refused(
                        grant
                            .reason
                            .unwrap_or_else(|| "the grant was not approved".into()),
                        None,
                    ));
                }
            }
        }
    }

    async fn end_access(
        &self,
        caller: &Caller,
        args: &JsonObject,
    ) -> Result<CallToolResult, ToolError> {
        let id = string(args, "grant")?;
        let grant = self
            .services
            .broker
            .end(&caller.agent.name, id)
            .await
            .map_err(broker_failed)?;
        Ok(CallToolResult::structured(grant_summary(&grant)))
    }

    /// The grant `args.grant` with its secret, for a tool to log in with: the caller's
    /// own, active.
    fn usable(
        &self,
        caller: &Caller,
        args: &JsonObject,
    ) -> Result<(GrantRecord, String), ToolError> {
        let grant = self.own_grant(caller, args)?;
        match self
            .services
            .broker
            .secret_for(&caller.agent.name, &grant.id)
        {
            Some(usable) => Ok(usable),
            None if grant.status == GrantStatus::Pending => Err(refused(
                "this grant is waiting for an operator's approval",
                Some("call wait_for_review first"),
            )),
            None => Err(refused(
                format!(
                    "grant {} is {}",
                    grant.id,
                    serde_json::to_value(grant.status)
                        .unwrap_or_default()
                        .as_str()
                        .unwrap_or("over")
                ),
                Some("ask for a new grant with request_access"),
            )),
        }
    }

    async fn sql_query(
        &self,
        caller: &Caller,
        args: &JsonObject,
    ) -> Result<CallToolResult, ToolError> {
        let (grant, secret) = self.usable(caller, args)?;
        let sql = string(args, "sql")?;
        let params: Vec<Option<String>> = match args.get("params") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    // Numbers, booleans, JSON: their JSON text is what PostgreSQL reads.
                    other => Some(other.to_string()),
                })
                .collect(),
            Some(_) => return Err(failed("`params` is an array")),
        };
        let max_rows = args
            .get("max_rows")
            .and_then(Value::as_u64)
            .map_or(DEFAULT_ROWS, |n| (n as usize).clamp(1, MAX_ROWS));
        let answer = client::query(
            &self.services.postgres,
            caller.peer.clone(),
            (&grant.id, &secret),
            &grant.target,
            sql,
            &params,
            max_rows,
        )
        .await;
        match answer {
            Ok(result) => {
                let columns: Vec<Value> = result
                    .columns
                    .iter()
                    .map(|(name, oid)| json!({ "name": name, "type_oid": oid }))
                    .collect();
                Ok(CallToolResult::structured(json!({
                    "columns": columns,
                    "rows": result.rows,
                    "row_count": result.rows.len(),
                    "truncated": result.truncated,
                    "command": result.command,
                })))
            }
            // The gateway's own refusal (policy, or what it refuses before policy).
            Err(QueryError::Server {
                code,
                message,
                hint,
                ..
            }) if code == "42501" => Err(refused(message, hint.as_deref())),
            Err(QueryError::Server {
                code,
                message,
                detail,
                hint,
            }) => Err(ToolError::Failed(Box::new(json!({
                "error": message, "sqlstate": code, "detail": detail, "hint": hint,
            })))),
            Err(e) => Err(failed(e.to_string())),
        }
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("airlock", env!("CARGO_PKG_VERSION")))
            .with_instructions(tools::INSTRUCTIONS)
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::list()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let caller = context
            .extensions
            .get::<hyper::http::request::Parts>()
            .and_then(|parts| parts.extensions.get::<Caller>())
            .cloned()
            .ok_or_else(|| ErrorData::invalid_request("no authenticated agent", None))?;
        let args = request.arguments.unwrap_or_default();
        let span = tracing::info_span!("mcp", agent = %caller.agent.name, tool = %request.name);
        let result =
            tracing::Instrument::instrument(self.call(&caller, &request.name, &args), span).await;
        Ok(result.into())
    }
}
