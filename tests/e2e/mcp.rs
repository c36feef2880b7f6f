//! The MCP server with the official Python MCP SDK as the agent's client, over both
//! transports (Streamable HTTP at the agent API, and stdio through `airlock mcp`), in
//! front of a real PostgreSQL 15: the tools ask for access, query through the
//! PostgreSQL gateway (masked, decided, recorded `via: mcp`), wait on an operator's
//! review, and end the grant.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

use crate::postgres::Setup;
use crate::support::{text, workspace};

/// The SDK's Python, installed by the project's setup.
fn python() -> std::path::PathBuf {
    workspace().join("target/mcp-venv/bin/python")
}

/// Runs the scripted MCP task over `transport`; approves its write request as the
/// operator when it is pending; returns the steps' lines by name.
fn run_task(s: &Setup, transport: &str) -> HashMap<String, Value> {
    let mut command = Command::new(python());
    command.arg(workspace().join("tests/e2e/mcp_client.py"));
    match transport {
        "http" => {
            command.args(["http", &format!("{}/mcp", s.gw.url), &s.token]);
        }
        _ => {
            command
                .args(["stdio", env!("CARGO_BIN_EXE_airlock")])
                .env("AIRLOCK_URL", &s.gw.url)
                .env("AIRLOCK_TOKEN", &s.token);
        }
    }
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut steps = HashMap::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let step = line["step"].as_str().unwrap().to_string();
        if step == "pending" {
            let id = line["result"]["grant"].as_str().unwrap();
            let out = s.gw.cli(&["grants", "approve", id]);
            assert!(out.status.success(), "{}", text(&out));
        }
        steps.insert(step, line);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{transport}: {}", text(&out));
    steps
}

fn result<'a>(steps: &'a HashMap<String, Value>, step: &str) -> &'a Value {
    &steps
        .get(step)
        .unwrap_or_else(|| panic!("no step {step}: {steps:?}"))["result"]
}

#[test]
fn an_agent_works_a_task_through_mcp_over_http_and_stdio() {
    let s = Setup::new();
    for transport in ["http", "stdio"] {
        let steps = run_task(&s, transport);
        let tools = result(&steps, "tools");
        assert_eq!(
            tools,
            &serde_json::json!([
                "end_access",
                "list_targets",
                "request_access",
                "sql_query",
                "wait_for_review"
            ]),
            "{transport}"
        );
        let targets = result(&steps, "targets")["targets"].as_array().unwrap();
        assert!(
            targets
                .iter()
                .any(|t| t["name"] == "prod-db" && t["kind"] == "postgres")
        );

        let read = result(&steps, "request_read");
        assert_eq!(read["status"], "active", "{transport}: {read}");
        assert_eq!(read["read_only"], true);
        assert!(read.get("secret").is_none(), "tools use the grant by id");

        // Rows as JSON, masked by content as psql's are.
        let select = result(&steps, "select");
        assert_eq!(
            select["rows"],
            serde_json::json!([
                ["1", "***@example.com", "Alice"],
                ["2", "***@example.com", "Bob"]
            ]),
            "{transport}: {select}"
        );
        assert_eq!(select["columns"][1]["name"], "email");
        assert_eq!(
            (&select["truncated"], &select["command"]),
            (&false.into(), &"SELECT 2".into())
        );
        assert_eq!(
            result(&steps, "params")["rows"],
            serde_json::json!([["Bob"]])
        );
        let capped = result(&steps, "capped");
        assert_eq!(
            (capped["row_count"].as_u64(), &capped["truncated"]),
            (Some(1), &true.into())
        );

        // A denied statement is a structured denial the agent can act on.
        let denied = &steps["write_on_read"];
        assert_eq!(denied["is_error"], true);
        assert_eq!(denied["result"]["denied"], true, "{denied}");
        assert!(
            denied["result"]["reason"]
                .as_str()
                .unwrap()
                .contains("read-only grant"),
            "{denied}"
        );
        assert!(
            denied["result"]["hint"]
                .as_str()
                .unwrap()
                .contains("access=write")
        );
        // An ordinary SQL error is an error, not a denial.
        let error = &steps["sql_error"]["result"];
        assert_eq!(
            (&error["sqlstate"], error.get("denied")),
            (&"42P01".into(), None)
        );

        // The write waited for review, the operator approved it, and it ran.
        assert_eq!(result(&steps, "pending")["status"], "pending");
        assert_eq!(result(&steps, "approved")["status"], "active");
        assert_eq!(result(&steps, "write")["command"], "UPDATE 1", "{steps:?}");
        assert_eq!(result(&steps, "end_write")["status"], "ended");
        // An ended grant's tools are refused.
        assert_eq!(result(&steps, "end_read")["status"], "ended");
        let after = &steps["after_end"]["result"];
        assert_eq!(after["denied"], true, "{after}");

        assert_eq!(
            s.pg.psql_super("SELECT name FROM users WHERE id = 1", "app")
                .trim(),
            "Alicia",
            "only the approved write reached the server"
        );
        s.pg.psql_super("UPDATE users SET name = 'Alice' WHERE id = 1", "app");
    }

    // Recorded like psql's statements, each saying it came through MCP.
    let statements: Vec<Value> =
        s.gw.events("sql.statement")
            .into_iter()
            .inspect(crate::gateway::assert_follows_schema)
            .collect();
    let texts: Vec<(&str, &str)> = statements
        .iter()
        .map(|e| {
            (
                e["detail"]["text"].as_str().unwrap(),
                e["detail"]["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        texts.contains(&("UPDATE users SET name = 'Mallory' WHERE id = 1", "deny")),
        "{texts:?}"
    );
    assert!(
        statements.iter().all(|e| e["detail"]["via"] == "mcp"),
        "{statements:?}"
    );
    let opened = s.gw.events("session.opened");
    assert!(!opened.is_empty() && opened.iter().all(|e| e["detail"]["via"] == "mcp"));
}
