//! The gateway's own connection to the upstream server, logged in with the credential
//! the gateway holds for the target. The agent never sees it.

use bytes::{BufMut, Bytes};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use tokio::net::TcpStream;

use super::wire::{self, Message, WireError, message, put_cstr};
use crate::secrets::Credential;

/// Where and as whom the gateway logs in upstream, from a target's
/// `upstream = "postgres://USER@HOST:PORT/DATABASE"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamAddr {
    pub host_port: String,
    pub user: String,
    pub database: String,
}

impl UpstreamAddr {
    pub fn parse(upstream: &str) -> Result<Self, String> {
        let bad = || format!("upstream `{upstream}` is not postgres://USER@HOST:PORT/DATABASE");
        let rest = upstream.strip_prefix("postgres://").ok_or_else(bad)?;
        let (user, rest) = rest.split_once('@').ok_or_else(bad)?;
        let (host_port, database) = rest.split_once('/').ok_or_else(bad)?;
        if user.is_empty() || host_port.is_empty() || database.is_empty() || user.contains(':') {
            return Err(bad());
        }
        Ok(UpstreamAddr {
            host_port: host_port.to_string(),
            user: user.to_string(),
            database: database.to_string(),
        })
    }
}

/// Why the upstream login failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to the upstream {0}: {1}")]
    Connect(String, std::io::Error),
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
    pub stream: TcpStream,
    /// ParameterStatus messages to pass on to the client.
    pub parameters: Vec<Bytes>,
    /// The upstream's BackendKeyData (process id, secret key), for cancelling.
    pub backend_key: (i32, i32),
}

fn field(body: &Bytes, code: u8) -> Option<String> {
    let mut b = body.clone();
    while !b.is_empty() {
        let tag = b[0];
        b = b.slice(1..);
        if tag == 0 {
            break;
        }
        let value = wire::cstr(&mut b).ok()?;
        if tag == code {
            return Some(value);
        }
    }
    None
}

/// Logs in upstream.
pub async fn connect(
    addr: &UpstreamAddr,
    password: Option<&Credential>,
) -> Result<Upstream, UpstreamError> {
    let mut stream = TcpStream::connect(&addr.host_port)
        .await
        .map_err(|e| UpstreamError::Connect(addr.host_port.clone(), e))?;
    stream.set_nodelay(true).ok();
    let mut startup = bytes::BytesMut::new();
    startup.put_i32(0);
    startup.put_i32(wire::PROTOCOL_V3);
    for (k, v) in [
        ("user", addr.user.as_str()),
        ("database", addr.database.as_str()),
        ("application_name", "airlock"),
    ] {
        put_cstr(&mut startup, k);
        put_cstr(&mut startup, v);
    }
    startup.put_u8(0);
    let len = startup.len() as i32;
    startup[..4].copy_from_slice(&len.to_be_bytes());
    wire::write_all(&mut stream, &startup).await?;

    let password = || {
        password
            .map(|p| p.expose().as_bytes())
            .ok_or(UpstreamError::NoCredential)
    };
    let mut scram: Option<ScramSha256> = None;
    let mut parameters = Vec::new();
    let mut backend_key = (0, 0);
    loop {
        let Message { tag, body } = wire::read_message(&mut stream).await?;
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
                        let hash = md5_hash(addr.user.as_bytes(), password()?, salt);
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
                    wire::write_all(&mut stream, &reply).await?;
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
                    field(&body, b'M').unwrap_or_else(|| "unknown error".into()),
                ));
            }
            b'Z' => {
                return Ok(Upstream {
                    stream,
                    parameters,
                    backend_key,
                });
            }
            _ => {}
        }
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
    tokio::io::AsyncWriteExt::write_all(&mut stream, &packet).await
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
                database: "app".into()
            }
        );
        for bad in [
            "127.0.0.1:5432",
            "postgres://127.0.0.1:5432/app",
            "postgres://u@h:1/",
            "postgres://u:pw@h:1/db",
        ] {
            assert!(UpstreamAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
