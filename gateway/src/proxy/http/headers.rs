//! Which headers cross the gateway, each way.
//!
//! Towards the upstream: never the agent's credential (`Authorization`, `Cookie`,
//! `Proxy-*`), never hop-by-hop headers (they describe the agent's connection, not the
//! request), never forwarding headers an agent could forge (`Forwarded`,
//! `X-Forwarded-*`, `X-Real-IP`), never headers that override the path or method
//! policy decided (`X-Original-URL`, `X-HTTP-Method-Override`, …), and never `Host`
//! (the upstream's own is set). Towards
//! the agent: never hop-by-hop headers and never `Set-Cookie`/`Set-Cookie2` (an upstream session
//! would be access that outlives the grant).

use hyper::header::{self, HeaderMap, HeaderName};

/// Why a request's headers were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum HeaderError {
    #[error("header `{0}` is not text (its bytes could be read two ways)")]
    NotText(String),
    #[error(
        "both Content-Length and Transfer-Encoding: a request the gateway and the upstream could frame differently"
    )]
    Framing,
    #[error("a protocol upgrade (`{0}`) is not served through this gateway")]
    Upgrade(String),
    #[error("a WebSocket handshake {0}")]
    WebSocket(&'static str),
}

/// A request to upgrade the connection, as the gateway read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Upgrade {
    /// A WebSocket handshake (RFC 6455 §4.2.1), well formed.
    WebSocket(WebSocketRequest),
    /// Any other protocol (kubectl's SPDY/3.1, h2c): never served.
    Other(String),
}

/// An agent's WebSocket handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct WebSocketRequest {
    /// `Sec-WebSocket-Key`, which the agent's accept value is derived from.
    pub key: String,
    /// The subprotocols offered, in the agent's order.
    pub protocols: Vec<String>,
}

/// Headers some frameworks read as the request's real path or method: policy decides
/// the path and method on the request line, so the upstream must not see another.
const OVERRIDES: &[&str] = &[
    "x-original-url",
    "x-rewrite-url",
    "x-original-uri",
    "x-envoy-original-path",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Headers named by the hop-by-hop list of RFC 9110 §7.6.1, and `Proxy-Connection`.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn hop_by_hop(name: &HeaderName, connection: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || connection.iter().any(|c| c == name.as_str())
}

/// The names the `Connection` header lists: hop-by-hop for this message.
fn connection_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// A media type's essence, lower-cased: `application/json` of
/// `Application/JSON; charset=utf-8`.
pub(crate) fn essence(media_type: &str) -> String {
    media_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// Whether a media type's essence is JSON (`application/json`, `…+json`).
pub(crate) fn is_json(essence: &str) -> bool {
    essence == "application/json" || essence.ends_with("+json")
}

/// Refuses what would let the gateway and the upstream read one request two ways, and
/// reads the upgrade it asks for, if any (whether one is served is the caller's call).
pub(super) fn check_request(headers: &HeaderMap) -> Result<Option<Upgrade>, HeaderError> {
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(HeaderError::Framing);
    }
    for (name, value) in headers {
        if value.to_str().is_err() {
            return Err(HeaderError::NotText(name.to_string()));
        }
    }
    let upgrades: Vec<&str> = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    match upgrades[..] {
        [] => Ok(None),
        [protocol] if protocol.eq_ignore_ascii_case("websocket") => {
            websocket(headers).map(|ws| Some(Upgrade::WebSocket(ws)))
        }
        _ => Ok(Some(Upgrade::Other(upgrades.join(", ")))),
    }
}

/// Reads a WebSocket handshake, refusing one the upstream could read another way.
fn websocket(headers: &HeaderMap) -> Result<WebSocketRequest, HeaderError> {
    if !connection_names(headers).iter().any(|n| n == "upgrade") {
        return Err(HeaderError::WebSocket("without `Connection: Upgrade`"));
    }
    let one = |name: &str| {
        let mut values = headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(value), None) => value.to_str().ok(),
            _ => None,
        }
    };
    if one("sec-websocket-version") != Some("13") {
        return Err(HeaderError::WebSocket(
            "not of version 13 (`Sec-WebSocket-Version`)",
        ));
    }
    let key = one("sec-websocket-key")
        .filter(|k| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(k)
                .is_ok_and(|k| k.len() == 16)
        })
        .ok_or(HeaderError::WebSocket(
            "without one `Sec-WebSocket-Key` of 16 bytes",
        ))?;
    let protocols = headers
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    Ok(WebSocketRequest {
        key: key.to_string(),
        protocols,
    })
}

/// The agent's headers the upstream may see: also what policy is shown.
pub(super) fn to_upstream(agent: &HeaderMap) -> HeaderMap {
    let connection = connection_names(agent);
    let mut out = HeaderMap::with_capacity(agent.len());
    for (name, value) in agent {
        let n = name.as_str();
        let dropped = hop_by_hop(name, &connection)
            || matches!(
                n,
                "authorization"
                    | "cookie"
                    | "host"
                    | "forwarded"
                    | "x-real-ip"
                    | "x-client-ip"
                    | "true-client-ip"
                    | "expect"
                    | "content-length"
                    // httpoxy: CGI upstreams read it as HTTP_PROXY.
                    | "proxy"
            )
            || OVERRIDES.contains(&n)
            || n.starts_with("proxy-")
            || n.starts_with("x-forwarded-")
            // An authenticating front proxy's identity headers, and the audit id a
            // Kubernetes API server takes from its client: the agent forges neither.
            || n.starts_with("x-remote-")
            || n == "audit-id"
            // A WebSocket handshake is the gateway's own with the upstream.
            || n.starts_with("sec-websocket-");
        if !dropped {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The upstream's response headers the agent may see.
pub(super) fn to_agent(upstream: &HeaderMap) -> HeaderMap {
    let connection = connection_names(upstream);
    let mut out = HeaderMap::with_capacity(upstream.len());
    for (name, value) in upstream {
        if !hop_by_hop(name, &connection)
            && name != header::SET_COOKIE
            && name.as_str() != "set-cookie2"
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// A header map of `pairs`, in order, for tests.
#[cfg(test)]
pub(super) fn from_pairs(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    h
}

#[cfg(test)]
mod tests {
    use super::from_pairs as headers;
    use super::*;

    #[test]
    fn the_agents_credential_and_connection_never_reach_the_upstream() {
        let agent = headers(&[
            ("authorization", "Bearer g_1.s"),
            ("cookie", "session=1"),
            ("proxy-authorization", "Basic x"),
            ("host", "evil.example"),
            ("x-forwarded-for", "10.0.0.1"),
            ("forwarded", "for=10.0.0.1"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("accept", "application/json"),
            ("x-request-id", "42"),
            ("x-original-url", "/admin"),
            ("x-http-method-override", "DELETE"),
            ("proxy", "http://evil:8080"),
            ("true-client-ip", "10.0.0.1"),
        ]);
        let sent = to_upstream(&agent);
        let names: Vec<&str> = sent.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept", "x-request-id"]);
    }

    #[test]
    fn framing_conflicts_upgrades_and_binary_values_are_refused() {
        let both = headers(&[("content-length", "5"), ("transfer-encoding", "chunked")]);
        assert_eq!(check_request(&both), Err(HeaderError::Framing));
        let spdy = headers(&[("connection", "Upgrade"), ("upgrade", "SPDY/3.1")]);
        assert_eq!(
            check_request(&spdy),
            Ok(Some(Upgrade::Other("SPDY/3.1".into())))
        );
        let mut binary = HeaderMap::new();
        binary.insert(
            "x-name",
            hyper::header::HeaderValue::from_bytes(b"caf\xe9").unwrap(),
        );
        assert!(matches!(
            check_request(&binary),
            Err(HeaderError::NotText(_))
        ));
        assert_eq!(check_request(&headers(&[("accept", "*/*")])), Ok(None));
    }

    #[test]
    fn websocket_handshakes_are_read_strictly() {
        let good = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            (
                "sec-websocket-protocol",
                "v5.channel.k8s.io, v4.channel.k8s.io",
            ),
        ];
        let Ok(Some(Upgrade::WebSocket(ws))) = check_request(&headers(&good)) else {
            panic!("a good handshake is read");
        };
        assert_eq!(ws.key, "dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(ws.protocols, ["v5.channel.k8s.io", "v4.channel.k8s.io"]);
        let without = |name: &str| {
            let kept: Vec<(&str, &str)> =
                good.iter().filter(|(n, _)| *n != name).copied().collect();
            check_request(&headers(&kept))
        };
        for name in ["connection", "sec-websocket-version", "sec-websocket-key"] {
            assert!(
                matches!(without(name), Err(HeaderError::WebSocket(_))),
                "{name}"
            );
        }
        let mut twice = headers(&good);
        twice.append(
            "sec-websocket-key",
            "AAAAAAAAAAAAAAAAAAAAAA==".parse().unwrap(),
        );
        assert!(matches!(
            check_request(&twice),
            Err(HeaderError::WebSocket(_))
        ));
        let mut short = headers(&good);
        short.insert("sec-websocket-key", "c2hvcnQ=".parse().unwrap());
        assert!(matches!(
            check_request(&short),
            Err(HeaderError::WebSocket(_))
        ));
        let mut two = headers(&good);
        two.append("upgrade", "h2c".parse().unwrap());
        assert!(matches!(check_request(&two), Ok(Some(Upgrade::Other(_)))));
        // The agent's handshake never reaches the upstream.
        assert!(to_upstream(&headers(&good)).is_empty());
    }

    #[test]
    fn upstream_cookies_never_reach_the_agent() {
        let upstream = headers(&[
            ("set-cookie", "sid=1"),
            ("set-cookie2", "sid=2"),
            ("content-type", "application/json"),
            ("transfer-encoding", "chunked"),
        ]);
        let names: Vec<String> = to_agent(&upstream).keys().map(|n| n.to_string()).collect();
        assert_eq!(names, ["content-type"]);
    }
}
