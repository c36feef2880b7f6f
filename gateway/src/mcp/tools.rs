//! The MCP tools as an agent sees them: names, what each does, the rules, and the
//! JSON Schema of its arguments.

use std::sync::Arc;

use rmcp::model::{JsonObject, Tool};
use serde_json::{Value, json};

/// Told to the agent once, at initialization.
pub(super) const INSTRUCTIONS: &str = "Airlock is the gateway between you and production. \
You hold no production credential: ask for access per task with request_access (one target, \
one task in words an operator can check, the least access that does the task, a short ttl), \
use the grant with the tools below, and end it with end_access when the task is done. \
Every action is decided by policy and recorded. A refusal comes back as {\"denied\": true, \
\"reason\", \"hint\"}: act on the hint, or ask for a new grant; do not try to work around it.";

fn schema(properties: Value, required: &[&str]) -> Arc<JsonObject> {
    let schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    match schema {
        Value::Object(map) => Arc::new(map),
        _ => unreachable!("a JSON object literal"),
    }
}

fn grant_property() -> Value {
    json!({ "type": "string", "description": "The grant's id (g_…), from request_access." })
}

/// Every tool this server offers.
pub(super) fn list() -> Vec<Tool> {
    vec![
        Tool::new(
            "list_targets",
            "The targets you may ask for access to, with their kind (postgres, ssh, http, \
             kubernetes) and labels. Listing one promises nothing: policy decides each request.",
            schema(json!({}), &[]),
        ),
        Tool::new(
            "request_access",
            "Ask for a grant: access to one target for one task, for a short window. One task \
             per grant; ask for the least access that does it (read unless you must change \
             something). Answers granted (status active), pending an operator's review (call \
             wait_for_review), or denied with a reason and a hint.",
            schema(
                json!({
                    "target": { "type": "string", "description": "The target's name, from list_targets." },
                    "task": { "type": "string", "description": "What the access is for, in words an operator can check." },
                    "access": { "type": "string", "enum": ["read", "write", "admin"], "default": "read" },
                    "ttl": { "type": "string", "description": "How long, e.g. \"10m\" (the grant gets the tightest of this, policy's and the gateway's).", "default": "10m" },
                }),
                &["target", "task"],
            ),
        ),
        Tool::new(
            "wait_for_review",
            "Wait for an operator to approve or deny a grant that is pending review.",
            schema(
                json!({
                    "grant": grant_property(),
                    "timeout_seconds": { "type": "integer", "minimum": 1, "maximum": 300, "default": 300 },
                }),
                &["grant"],
            ),
        ),
        Tool::new(
            "end_access",
            "End a grant now, when its task is done (or withdraw a request still under \
             review). Its open sessions are cut.",
            schema(json!({ "grant": grant_property() }), &["grant"]),
        ),
        Tool::new(
            "sql_query",
            "Run one SQL statement on a PostgreSQL target under a grant, as psql would through \
             the gateway: policy decides it, values are masked by content, and it is recorded. \
             Parameters ($1, $2, …) are passed as text and read by the server. Returns columns \
             and rows (values as text, null as null), at most max_rows rows with \
             truncated: true when more were there.",
            schema(
                json!({
                    "grant": grant_property(),
                    "sql": { "type": "string", "description": "One statement." },
                    "params": { "type": "array", "description": "Values for $1, $2, …: strings, numbers, booleans or null." },
                    "max_rows": { "type": "integer", "minimum": 1, "maximum": super::MAX_ROWS, "default": super::DEFAULT_ROWS },
                }),
                &["grant", "sql"],
            ),
        ),
    ]
}
