//! The gateway's own connection to the upstream server, logged in with the credential
//! the gateway holds for the target. The agent never sees it.

use std::path::PathBuf;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::catalog::{self, Catalog};
use super::conn::Conn;
use super::wire::{self, Message, WireError, message, put_cstr};
use crate::secrets::Credential;

/// Where and as whom the gateway logs in upstream, from a target's
/// `upstream = "postgres://USER@HOST:PORT/DATABASE[?sslmode=…&sslrootcert=…]"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host_port: String,
    pub user: String,
    pub database: String,
    /// TLS to the upstream, verifying its certificate against this CA file
    /// (`sslmode=verify-full&sslrootcert=PATH`).
    pub tls_root: Option<PathBuf>,
}

impl UpstreamAddr {
    /// Parses a target's upstream. Plain text is the default only on loopback; anywhere
    /// else the target must say `sslmode=verify-full` (or, knowingly, `disable`).
    pub fn parse(upstream: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "upstream `{upstream}` is not postgres://USER@HOST:PORT/DATABASE[?sslmode=verify-full&sslrootcert=PATH]"
            )
        };
        let rest = upstream.strip_prefix("postgres://").ok_or_else(bad)?;
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (user, rest) = rest.split_once('@').ok_or_else(bad)?;
        let (host_port, database) = rest.split_once('/').ok_or_else(bad)?;
        if user.is_empty() || host_port.is_empty() || database.is_empty() || user.contains(':') {
            return Err(bad());
        }
        let (mut sslmode, mut root) = (None, None);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=') {
                Some(("sslmode", v)) => sslmode = Some(v),
                Some(("sslrootcert", v)) => root = Some(PathBuf::from(v)),
                _ => return Err(format!("upstream `{upstream}`: unknown parameter `{pair}`")),
            }
        }
        let host = host_of(host_port);
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let tls_root = match (sslmode, root) {
            (Some("verify-full"), Some(root)) => Some(root),
            (Some("verify-full"), None) => {
                return Err(format!(
                    "upstream `{upstream}`: sslmode=verify-full needs sslrootcert=PATH (the CA that signed the server's certificate)"
                ));
            }
            (Some("disable"), None) => None,
            (None, None) if loopback => None,
            (None, None) => {
                return Err(format!(
                    "upstream `{upstream}` is not on loopback: add ?sslmode=verify-full&sslrootcert=PATH (or sslmode=disable to accept plain text)"
                ));
            }
            (Some(mode), _) => {
                return Err(format!(
                    "upstream `{upstream}`: sslmode={mode} is not supported: use verify-full or disable"
                ));
            }
            (None, Some(_)) => {
                return Err(format!(
                    "upstream `{upstream}`: sslrootcert needs sslmode=verify-full"
                ));
            }
        };
        Ok(UpstreamAddr {
            host_port: host_port.to_string(),
            user: user.to_string(),
            database: database.to_string(),
            tls_root,
        })
    }

    fn host(&self) -> &str {
        host_of(&self.host_port)
    }
}

/// The host of `HOST:PORT` (brackets of an IPv6 literal removed).
fn host_of(host_port: &str) -> &str {
    host_port
        .rsplit_once(':')
        .map_or(host_port, |(h, _)| h)
        .trim_matches(['[', ']'])
}

/// Why the upstream login failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("TLS to the upstream {0}: {1}")]
    Tls(String, String),
    #[error("upstream protocol: {0}")]
    Wire(#[from] WireError),
    #[error("the upstream refused the gateway's login: {0}")]
    Refused(String),
    #[error("the upstream asks for a password and the target has no credential")]
    NoCredential,
    #[error("the upstream asks for an unsupported authentication method ({0})")]
    Unsupported(i32),
}

/// A logged-in upstream connection.
pub struct Upstream {
    pub conn: Conn,
    /// ParameterStatus messages to pass on to the client.
    pub parameters: Vec<Bytes>,
    /// The upstream's BackendKeyData (process id, secret key), for cancelling.
    pub backend_key: (i32, i32),
    /// Where the backend is (`host:port`): a client's CancelRequest goes there.
    pub host_port: String,
}

/// Logs in upstream as `user`, with `settings` as startup parameters.
pub async fn connect(
    addr: &UpstreamAddr,
    user: &str,
    password: Option<&Credential>,
    settings: &[(&str, &str)],
) -> Result<Upstream, UpstreamError> {
    let stream = TcpStream::connect(&addr.host_port)
        .await
        .map_err(|e| UpstreamError::Connect(addr.host_port.clone(), e))?;
    stream.set_nodelay(true).ok();
    let conn = match &addr.tls_root {
        Some(root) => Conn::new(start_tls(stream, addr, root).await?),
        None => Conn::new(stream),
    };
    let password = password.map(|p| p.expose());
    login(
        conn,
        user,
        &addr.database,
        password,
        settings,
        &addr.host_port,
    )
    .await
}

/// Logs in on `conn` as `user` to `database`, with `settings` as startup parameters:
/// to an upstream server (at `host_port`), or to the gateway's own PostgreSQL listener
/// from inside the process (the MCP server, with a grant).
pub(crate) async fn login(
    mut conn: Conn,
    user: &str,
    database: &str,
    password: Option<&str>,
    settings: &[(&str, &str)],
    host_port: &str,
) -> Result<Upstream, UpstreamError> {
    let mut startup = bytes::BytesMut::new();
    startup.put_i32(0);
    startup.put_i32(wire::PROTOCOL_V3);
    for (k, v) in [
        ("user", user),
        ("database", database),
        ("application_name", "airlock"),
    ]
    .into_iter()
    .chain(settings.iter().copied())
    {
        put_cstr(&mut startup, k);
        put_cstr(&mut startup, v);
    }
    startup.put_u8(0);
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    conn.send_now(&startup).await.map_err(WireError::from)?;

    let password = || {
        password
            .map(str::as_bytes)
            .ok_or(UpstreamError::NoCredential)
    };
    let mut scram: Option<ScramSha256> = None;
    let mut parameters = Vec::new();
    let mut backend_key = (0, 0);
    loop {
        let Message { tag, body } = conn.read_message().await?;
        match tag {
            b'R' => {
                let kind =
                    i32::from_be_bytes(body.get(..4).and_then(|b| b.try_into().ok()).ok_or_else(
                        || UpstreamError::Wire(WireError::Malformed("short Authentication".into())),
                    )?);
                let data = body.slice(4..);
                let reply = match kind {
                    0 => None,
                    3 => {
                        let password = password()?;
                        Some(message(b'p', |out| {
                            out.put_slice(password);
                            out.put_u8(0);
                        }))
                    }
                    5 => {
                        let salt: [u8; 4] = data
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| {
                                UpstreamError::Wire(WireError::Malformed("short md5 salt".into()))
                            })?;
                        let hash = md5_hash(user.as_bytes(), password()?, salt);
                        Some(message(b'p', |out| put_cstr(out, &hash)))
                    }
                    10 => {
                        let client = ScramSha256::new(password()?, ChannelBinding::unsupported());
                        let first = client.message().to_vec();
                        scram = Some(client);
                        Some(message(b'p', |out| {
                            put_cstr(out, "SCRAM-SHA-256");
                            out.put_i32(first.len() as i32);
                            out.put_slice(&first);
                        }))
                    }
                    11 => {
                        let client = scram.as_mut().ok_or(UpstreamError::Unsupported(kind))?;
                        client
                            .update(&data)
                            .map_err(|e| UpstreamError::Refused(e.to_string()))?;
                        let next = client.message().to_vec();
                        Some(message(b'p', |out| out.put_slice(&next)))
                    }
                    12 => {
                        let client = scram.as_mut().ok_or(UpstreamError::Unsupported(kind))?;
                        client
                            .finish(&data)
                            .map_err(|e| UpstreamError::Refused(e.to_string()))?;
                        None
                    }
                    other => return Err(UpstreamError::Unsupported(other)),
                };
                if let Some(reply) = reply {
                    conn.send_now(&reply).await.map_err(WireError::from)?;
                }
            }
            b'S' => parameters.push(message(b'S', |out| out.put_slice(&body))),
            b'K' if body.len() == 8 => {
                backend_key = (
                    i32::from_be_bytes(body[..4].try_into().expect("4 bytes")),
                    i32::from_be_bytes(body[4..].try_into().expect("4 bytes")),
                );
            }
            b'E' => {
                return Err(UpstreamError::Refused(
                    wire::error_field(&body, b'M').unwrap_or_else(|| "unknown error".into()),
                ));
            }
            b'Z' => {
                return Ok(Upstream {
                    conn,
                    parameters,
                    backend_key,
                    host_port: host_port.to_string(),
                });
            }
            _ => {}
        }
    }
}

/// What the gateway checks of its upstream session before letting a client use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginFacts {
    /// `transaction_read_only` as the session starts.
    pub read_only: bool,
    /// The role, or a role it can become, is a superuser or bypasses row-level
    /// security.
    pub privileged: bool,
}

/// Asks the upstream session what it is: one round trip, before the client's first
/// statement.
pub async fn login_facts(conn: &mut Conn) -> Result<LoginFacts, UpstreamError> {
    // Privileged if the role, or any role it is a member of (and so can SET ROLE to),
    // is a superuser or bypasses row security.
    let query = "SELECT current_setting('transaction_read_only') = 'on', \
                 coalesce(bool_or(r.rolsuper OR r.rolbypassrls), false) \
                 FROM pg_catalog.pg_roles r \
                 WHERE pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER')";
    let results = simple_query(conn, query).await?;
    let row = results
        .first()
        .and_then(|rows| rows.first())
        .ok_or_else(|| UpstreamError::Refused("the upstream role is not in pg_roles".into()))?;
    let truth = |i: usize| row.get(i).and_then(Option::as_deref) == Some("t");
    Ok(LoginFacts {
        read_only: truth(0),
        privileged: truth(1),
    })
}

/// Reads the upstream's catalog of functions and types.
pub async fn read_catalog(conn: &mut Conn) -> Result<Catalog, UpstreamError> {
    let results = simple_query(conn, catalog::QUERY).await?;
    match results.as_slice() {
        [functions, types] => Ok(Catalog::from_rows(functions, types)),
        _ => Err(UpstreamError::Refused(
            "the upstream's catalog could not be read".into(),
        )),
    }
}

/// The gateway's own simple Query on an idle upstream session: the rows of each result,
/// values as text. Any error refuses.
async fn simple_query(
    conn: &mut Conn,
    query: &str,
) -> Result<Vec<Vec<Vec<Option<String>>>>, UpstreamError> {
    conn.send_now(&message(b'Q', |out| put_cstr(out, query)))
        .await
        .map_err(WireError::from)?;
    let mut results: Vec<Vec<Vec<Option<String>>>> = Vec::new();
    let mut error = None;
    loop {
        let Message { tag, body } = conn.read_message().await?;
        match tag {
            b'T' => results.push(Vec::new()),
            b'D' => {
                let row = wire::data_row(&body)?
                    .into_iter()
                    .map(|v| v.map(|v| String::from_utf8_lossy(&v).into_owned()))
                    .collect();
                results
                    .last_mut()
                    .ok_or_else(|| WireError::Malformed("a DataRow before its description".into()))?
                    .push(row);
            }
            b'E' => {
                error.get_or_insert(
                    wire::error_field(&body, b'M').unwrap_or_else(|| "unknown error".into()),
                );
            }
            b'Z' => {
                return match error {
                    Some(e) => Err(UpstreamError::Refused(e)),
                    None => Ok(results),
                };
            }
            _ => {}
        }
    }
}

/// Asks for TLS (SSLRequest) and verifies the server's certificate against `root` and
/// the upstream's host name. A server that declines TLS is refused.
async fn start_tls(
    mut stream: TcpStream,
    addr: &UpstreamAddr,
    root: &std::path::Path,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, UpstreamError> {
    let tls_error = |e: String| UpstreamError::Tls(addr.host_port.clone(), e);
    let config =
        crate::tls::client_config(root).map_err(|e| tls_error(format!("sslrootcert {e}")))?;
    let name = ServerName::try_from(addr.host().to_string())
        .map_err(|e| tls_error(format!("server name: {e}")))?;
    let mut request = bytes::BytesMut::new();
    request.put_i32(8);
    request.put_i32(wire::SSL_REQUEST);
    stream
        .write_all(&request)
        .await
        .map_err(|e| UpstreamError::Connect(addr.host_port.clone(), e))?;
    let answer = stream
        .read_u8()
        .await
        .map_err(|e| UpstreamError::Connect(addr.host_port.clone(), e))?;
    if answer != b'S' {
        return Err(tls_error(
            "the server does not offer TLS, and the target requires it".into(),
        ));
    }
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|e| tls_error(e.to_string()))
}

/// What it takes to confirm an upstream session has ended: a login as the same role
/// (a role may terminate its own backends).
///
/// The session is ended first by closing its connection: every upstream session runs
/// with `client_connection_check_interval` pinned, so the backend checks every 100 ms
/// while a statement runs and dies (FATAL, which no exception handler catches, rolling
/// back) once the gateway is gone; an idle one sees the close at once. Without that
/// pin a backend runs the statement in hand, and the rest of the Query it was sent, to
/// completion (`BEGIN; INSERT …; COMMIT` commits). No CancelRequest is sent: a statement
/// can catch a cancel (`EXCEPTION WHEN query_canceled`), and a caught cancel stops that
/// check. The second login then terminates the backend and waits until it is gone, as
/// confirmation; a write grant can make that login fail (a new password for the
/// role), which the record shows.
pub struct Ender {
    /// Where and as whom to log in to terminate: the target's `end-as` role when it
    /// names one, else the session's own role.
    pub(super) addr: UpstreamAddr,
    pub(super) user: String,
    pub(super) credential: Option<Credential>,
    pub(super) backend_key: (i32, i32),
}

/// What ending an upstream session did, for the record.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ended {
    /// `pg_terminate_backend` reported the backend gone (its open transaction rolled
    /// back); else why it could not be confirmed.
    pub terminated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How long the gateway waits for the server to confirm a backend has ended: a loaded
/// server can take seconds to schedule a terminated backend's exit (4 s was once too
/// short on a busy 2-core machine).
const TERMINATE_WAIT: Duration = Duration::from_secs(12);

impl Ender {
    /// Terminates the backend (after its connection was closed) and waits, bounded,
    /// for it to be gone.
    pub async fn end(&self) -> Ended {
        let terminated = tokio::time::timeout(TERMINATE_WAIT, self.terminate()).await;
        let (terminated, error) = match terminated {
            Ok(Ok(true)) => (true, None),
            Ok(Ok(false)) => (false, Some("the server did not end the backend".into())),
            Ok(Err(e)) => (false, Some(e.to_string())),
            Err(_) => (false, Some(format!("no answer within {TERMINATE_WAIT:?}"))),
        };
        Ended { terminated, error }
    }

    async fn terminate(&self) -> Result<bool, UpstreamError> {
        // Only a function call runs on this login: read-only is enough.
        let settings = super::pins::upstream_parameters(true);
        let mut side = connect(&self.addr, &self.user, self.credential.as_ref(), &settings).await?;
        // Waits up to 10 s for the backend to exit, so the answer means it is gone.
        let query = format!(
            "SELECT pg_catalog.pg_terminate_backend({}, 10000)",
            self.backend_key.0
        );
        let results = simple_query(&mut side.conn, &query).await?;
        let _ = side.conn.send_now(&message(b'X', |_| {})).await;
        Ok(results
            .first()
            .and_then(|rows| rows.first())
            .and_then(|row| row.first())
            .is_some_and(|value| value.as_deref() == Some("t")))
    }
}

/// Asks the upstream to cancel the query running on the connection with `key`.
pub async fn cancel(host_port: &str, key: (i32, i32)) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(host_port).await?;
    let mut packet = bytes::BytesMut::new();
    packet.put_i32(16);
    packet.put_i32(wire::CANCEL_REQUEST);
    packet.put_i32(key.0);
    packet.put_i32(key.1);
    stream.write_all(&packet).await
}

#[cfg(test)]
mod tests {
    use super::UpstreamAddr;

    #[test]
    fn upstream_addresses() {
        assert_eq!(
            UpstreamAddr::parse("postgres://airlock@127.0.0.1:5432/app").unwrap(),
            UpstreamAddr {
                host_port: "127.0.0.1:5432".into(),
                user: "airlock".into(),
                database: "app".into(),
                tls_root: None,
            }
        );
        assert_eq!(
            UpstreamAddr::parse(
                "postgres://a@db.internal:5432/app?sslmode=verify-full&sslrootcert=/ca.pem"
            )
            .unwrap()
            .tls_root,
            Some("/ca.pem".into())
        );
        for bad in [
            "127.0.0.1:5432",
            "postgres://127.0.0.1:5432/app",
            "postgres://u@h:1/",
            "postgres://u:pw@h:1/db",
            "postgres://u@db.internal:5432/app",
            "postgres://u@h:1/db?sslmode=require",
            "postgres://u@h:1/db?sslmode=verify-full",
            "postgres://u@127.0.0.1:1/db?password=x",
        ] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
