//! `airlock targets` and `airlock grants mine`: what an agent may ask for and what it
//! holds, from the agent API with the agent's own token.

use std::process::ExitCode;

use anyhow::bail;
use serde_json::Value;

use super::agent_client::{AgentClient, ApiArgs};

/// GETs `path` from the agent API and prints the array under `field`, one JSON object
/// a line (for scripts) or a table (for people), as `json` says.
fn list(
    api: &ApiArgs,
    path: &str,
    field: &str,
    json: bool,
    columns: &[&str],
) -> anyhow::Result<ExitCode> {
    let client = AgentClient::new(api)?;
    let (status, body) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(client.call("GET", path, None))?;
    if status != 200 {
        bail!(
            "{}: {}",
            client.base(),
            body["message"].as_str().unwrap_or("the agent API refused")
        );
    }
    let rows = body[field].as_array().cloned().unwrap_or_default();
    if json {
        for row in &rows {
            println!("{row}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let cell = |row: &Value, column: &str| match &row[column] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    };
    let table: Vec<Vec<String>> =
        std::iter::once(columns.iter().map(|c| c.to_uppercase()).collect())
            .chain(
                rows.iter()
                    .map(|row| columns.iter().map(|c| cell(row, c)).collect()),
            )
            .collect();
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            table
                .iter()
                .map(|r| r[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(ExitCode::SUCCESS)
}

/// `airlock targets`: the targets this agent may ask for, with kind and labels.
pub(crate) fn targets(api: &ApiArgs, json: bool) -> anyhow::Result<ExitCode> {
    list(
        api,
        "/v1/targets",
        "targets",
        json,
        &["name", "kind", "labels"],
    )
}

/// `airlock grants mine`: this agent's grants and their state, newest first.
pub(crate) fn mine(api: &ApiArgs, json: bool) -> anyhow::Result<ExitCode> {
    list(
        api,
        "/v1/grants",
        "grants",
        json,
        &["id", "target", "access", "status", "expires_at", "task"],
    )
}
