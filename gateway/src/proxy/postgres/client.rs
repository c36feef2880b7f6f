//! The gateway as a client of its own PostgreSQL gateway: how the MCP server runs an
//! agent's `sql_query`. It logs in with the grant over an in-process stream and sends
//! one statement by the extended protocol, so the statement meets exactly what `psql`'s
//! would: the grant's login, policy, the server-side read-only session, masking and
//! the record (`via: mcp`). Parameters and results travel as text, read and written by
//! the server's own input and output functions.

use std::sync::Arc;

use bytes::BufMut;

use super::conn::Conn;
use super::services::PgServices;
use super::upstream::{UpstreamError, login};
use super::wire::{self, Message, WireError, message, put_cstr};

/// One statement's answer.
#[derive(Debug, Default)]
pub struct QueryResult {
    /// Column names and type OIDs; empty for a statement that returns no rows.
    pub columns: Vec<(String, u32)>,
    pub rows: Vec<Vec<Option<String>>>,
    /// More rows were there than the cap: the rest were never fetched.
    pub truncated: bool,
    /// The command tag (`SELECT 2`, `UPDATE 1`), unless truncated.
    pub command: Option<String>,
}

/// Why a statement gave no result.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The login with the grant was refused (ended, wrong target, …).
    #[error("{0}")]
    Login(UpstreamError),
    /// The gateway or the server answered with an error.
    #[error("{message}")]
    Server {
        code: String,
        message: String,
        detail: Option<String>,
        hint: Option<String>,
    },
    #[error("PostgreSQL protocol: {0}")]
    Wire(#[from] WireError),
}

impl QueryError {
    fn server(body: &bytes::Bytes) -> Self {
        QueryError::Server {
            code: wire::error_field(body, b'C').unwrap_or_default(),
            message: wire::error_field(body, b'M').unwrap_or_else(|| "unknown error".into()),
            detail: wire::error_field(body, b'D'),
            hint: wire::error_field(body, b'H'),
        }
    }
}

/// Runs `sql` with `params` (text, or NULL) under grant `grant_id` on `target`, through
/// the PostgreSQL gateway, keeping at most `max_rows` rows.
pub async fn query(
    services: &Arc<PgServices>,
    peer: String,
    (grant_id, secret): (&str, &str),
    target: &str,
    sql: &str,
    params: &[Option<String>],
    max_rows: usize,
) -> Result<QueryResult, QueryError> {
    let stream = services.connect_in_process(peer);
    let mut conn = login(
        Conn::new(stream),
        grant_id,
        target,
        Some(secret),
        &[],
        "mcp",
    )
    .await
    .map_err(QueryError::Login)?
    .conn;
    let fetch = i32::try_from(max_rows.saturating_add(1)).unwrap_or(i32::MAX);
    let mut out = Vec::new();
    out.extend_from_slice(&message(b'P', |m| {
        put_cstr(m, "");
        put_cstr(m, sql);
        m.put_i16(0);
    }));
    let count = i16::try_from(params.len()).map_err(|_| QueryError::Server {
        code: "54023".into(),
        message: format!("{} parameters; at most {}", params.len(), i16::MAX),
        detail: None,
        hint: None,
    })?;
    out.extend_from_slice(&message(b'B', |m| {
        put_cstr(m, "");
        put_cstr(m, "");
        // Every parameter and every result column as text.
        m.put_i16(0);
        m.put_i16(count);
        for param in params {
            match param {
                Some(text) => {
                    m.put_i32(text.len() as i32);
                    m.put_slice(text.as_bytes());
                }
                None => m.put_i32(-1),
            }
        }
        m.put_i16(0);
    }));
    out.extend_from_slice(&message(b'D', |m| {
        m.put_u8(b'P');
        put_cstr(m, "");
    }));
    out.extend_from_slice(&message(b'E', |m| {
        put_cstr(m, "");
        m.put_i32(fetch);
    }));
    out.extend_from_slice(&message(b'S', |_| {}));
    conn.send_now(&out).await.map_err(WireError::from)?;

    let mut result = QueryResult::default();
    let mut error = None;
    loop {
        let Message { tag, body } = conn.read_message().await?;
        match tag {
            b'T' => {
                result.columns = wire::row_description(&body)?
                    .into_iter()
                    .map(|f| (f.name, f.type_oid))
                    .collect();
            }
            b'D' if result.rows.len() < max_rows => {
                let row = wire::data_row(&body)?
                    .into_iter()
                    .map(|v| v.map(|v| String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                result.rows.push(row);
            }
            b'D' | b's' => result.truncated = true,
            b'C' => result.command = Some(wire::cstr_lossy(&mut body.clone())?),
            b'E' => {
                error.get_or_insert_with(|| QueryError::server(&body));
            }
            b'Z' => break,
            _ => {}
        }
    }
    let _ = conn.send_now(&message(b'X', |_| {})).await;
    match error {
        Some(e) => Err(e),
        None => Ok(result),
    }
}
