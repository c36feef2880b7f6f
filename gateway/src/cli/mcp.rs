//! `airlock mcp`: MCP over stdio, for clients that launch their servers. It relays, and
//! decides nothing: each JSON-RPC message read from stdin (one a line) is POSTed to the
//! gateway's MCP server at the agent API with the agent's token, and each answer is
//! written to stdout as a line. The gateway's MCP server is stateless and answers in
//! JSON, so one message in makes at most one message out.

use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::sync::Mutex;

use super::agent_client::{AgentClient, ApiArgs};

/// The JSON-RPC error code for a message the gateway could not answer.
const UNREACHABLE: i64 = -32000;

pub(crate) fn run(api: &ApiArgs) -> anyhow::Result<ExitCode> {
    let client = Arc::new(AgentClient::new(api)?);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(relay(client))?;
    Ok(ExitCode::SUCCESS)
}

async fn relay(client: Arc<AgentClient>) -> anyhow::Result<()> {
    let stdout = Arc::new(Mutex::new(tokio::io::stdout()));
    // The protocol version initialize settled on, sent with every later message as
    // Streamable HTTP asks.
    let version: Arc<RwLock<Option<String>>> = Arc::default();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut calls = tokio::task::JoinSet::new();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        let (client, stdout, version) = (client.clone(), stdout.clone(), version.clone());
        // Each message on its own task: a long call (wait_for_review) holds up no other.
        calls.spawn(async move {
            if let Some(answer) = forward(&client, &version, line).await {
                let mut out = stdout.lock().await;
                let _ = out.write_all(format!("{answer}\n").as_bytes()).await;
                let _ = out.flush().await;
            }
        });
    }
    // stdin closed: the client is done; let the calls in flight answer.
    while calls.join_next().await.is_some() {}
    Ok(())
}

/// POSTs one message; returns the answer to write, if any.
async fn forward(
    client: &AgentClient,
    version: &RwLock<Option<String>>,
    line: String,
) -> Option<Value> {
    let message: Value = match serde_json::from_str(&line) {
        Ok(message) => message,
        Err(e) => {
            return Some(json!({
                "jsonrpc": "2.0", "id": null,
                "error": { "code": -32700, "message": format!("parse error: {e}") },
            }));
        }
    };
    let id = message.get("id").cloned();
    let mut headers = vec![
        ("content-type", "application/json".to_string()),
        ("accept", "application/json, text/event-stream".to_string()),
    ];
    if let Some(v) = version.read().unwrap().clone() {
        headers.push(("mcp-protocol-version", v));
    }
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    let failure = |message: String| {
        id.clone().map(|id| {
            json!({ "jsonrpc": "2.0", "id": id, "error": { "code": UNREACHABLE, "message": message } })
        })
    };
    let (status, _, body) = match client
        .send("POST", "/mcp", &headers, Bytes::from(line))
        .await
    {
        Ok(answer) => answer,
        Err(e) => return failure(format!("{e:#}")),
    };
    if body.is_empty() {
        // 202: a notification or a response, accepted.
        return None;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(answer) if answer.get("jsonrpc").is_some() => {
            if let Some(v) = answer["result"]["protocolVersion"].as_str() {
                *version.write().unwrap() = Some(v.to_string());
            }
            Some(answer)
        }
        Ok(error) => failure(format!(
            "the gateway answered {status}: {}",
            error["message"].as_str().unwrap_or("(no message)")
        )),
        Err(_) => failure(format!(
            "the gateway answered {status} with something that is not JSON"
        )),
    }
}
