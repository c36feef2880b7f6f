//! Kubernetes, as a layer over the HTTP gateway: the same listener, the same grant
//! token (kubectl presents it through an exec credential plugin: `airlock` itself, run
//! by kubectl with the token in its environment), the same session, record and
//! masking; what this layer adds is
//! how a request becomes an action: a `kube` action read with the API server's own
//! request-info rules, and the headers that would make the server act as someone else
//! (`Impersonate-*`) refused, and the streams kubectl opens over WebSocket (exec,
//! attach, port-forward: `streams.rs`).

mod request_info;
mod streams;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Body;
use hyper::{HeaderMap, Response};

pub use request_info::{KubeError, request_info};
pub(crate) use streams::{Ending, Outcome, Relay, StreamRecord, Streams};

use crate::policy::types::KubeRequest;
use crate::proxy::http::headers;

/// Refuses what would make the API server authorize the request as someone other
/// than the gateway's own identity (`Impersonate_User` too: a proxy on the way may
/// read `_` as `-`).
pub fn check_headers(headers: &HeaderMap) -> Result<(), KubeError> {
    match headers
        .keys()
        .find(|name| name.as_str().starts_with("impersonate"))
    {
        Some(name) => Err(KubeError::Impersonation(name.to_string())),
        None => Ok(()),
    }
}

/// Where masking applies, refuses what would let an agent rebuild a masked value: a
/// log cut at a byte the agent chooses (`limitBytes`) shows each value's prefixes, one
/// request at a time, and a mask that keeps a value's shape gives it away.
pub fn check_maskable(info: &KubeRequest, query: &str) -> Result<(), KubeError> {
    let limited = form_urlencoded::parse(query.as_bytes()).any(|(k, _)| k == "limitBytes");
    if info.subresource.as_deref() == Some("log") && limited {
        return Err(KubeError::LimitBytes);
    }
    Ok(())
}

/// Keeps only the JSON media types of a request's `Accept` (kubectl asks for protobuf
/// first, which no masking module can read); `application/json` if none is left.
pub fn json_only(headers: &mut HeaderMap) {
    let accept: Vec<String> = headers
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| headers::is_json(&headers::essence(t)))
        .collect();
    let value = if accept.is_empty() {
        "application/json".to_string()
    } else {
        accept.join(", ")
    };
    if let Ok(value) = hyper::header::HeaderValue::from_str(&value) {
        headers.insert(hyper::header::ACCEPT, value);
    }
}

/// The gateway's own answer (`{"error", "reason", "hint"}`) as a Kubernetes `Status`,
/// which kubectl shows as `Error from server (Forbidden): airlock: REASON`.
pub(crate) async fn status<B: Body>(answer: Response<B>) -> Response<Full<Bytes>> {
    let (mut parts, body) = answer.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let ours: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut message = format!("airlock: {}", ours["reason"].as_str().unwrap_or("refused"));
    if let Some(hint) = ours["hint"].as_str() {
        message.push_str(&format!(" (hint: {hint})"));
    }
    let code = parts.status.as_u16();
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        413 => "RequestEntityTooLarge",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    let status = serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": { "causes": [{ "reason": ours["error"], "message": message }] },
        "code": code,
    });
    let text = Bytes::from(status.to_string());
    parts
        .headers
        .insert(hyper::header::CONTENT_LENGTH, text.len().into());
    Response::from_parts(parts, Full::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impersonation_headers_are_refused_whatever_their_case() {
        for name in [
            "Impersonate-User",
            "impersonate-group",
            "Impersonate-Extra-Scopes",
            "Impersonate-Uid",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(
                hyper::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                "system:admin".parse().unwrap(),
            );
            assert!(check_headers(&headers).is_err(), "{name}");
        }
        assert!(check_headers(&HeaderMap::new()).is_ok());
        let mut underscore = HeaderMap::new();
        underscore.insert("impersonate_user", "admin".parse().unwrap());
        assert!(check_headers(&underscore).is_err());
    }

    #[test]
    fn accept_keeps_json_only() {
        let mut headers = HeaderMap::new();
        headers.insert(
            hyper::header::ACCEPT,
            "application/vnd.kubernetes.protobuf, application/json;as=Table;v=v1;g=meta.k8s.io, application/json"
                .parse()
                .unwrap(),
        );
        json_only(&mut headers);
        assert_eq!(
            headers[hyper::header::ACCEPT],
            "application/json;as=Table;v=v1;g=meta.k8s.io, application/json"
        );
        headers.insert(
            hyper::header::ACCEPT,
            "application/vnd.kubernetes.protobuf".parse().unwrap(),
        );
        json_only(&mut headers);
        assert_eq!(headers[hyper::header::ACCEPT], "application/json");
    }
}
