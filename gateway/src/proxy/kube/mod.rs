//! Kubernetes, as a layer over the HTTP gateway: the same listener, the same grant
//! token (kubectl presents it through an exec credential plugin, `airlock
//! kube-credential`), the same session, record and masking; what this layer adds is
//! how a request becomes an action: a `kube` action read with the API server's own
//! request-info rules, and the headers that would make the server act as someone else
//! (`Impersonate-*`) refused.

mod request_info;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Body;
use hyper::{HeaderMap, Response};

pub use request_info::{KubeError, request_info};

/// Refuses what would make the API server authorize the request as someone other
/// than the gateway's own identity.
pub fn check_headers(headers: &HeaderMap) -> Result<(), String> {
    match headers
        .keys()
        .find(|name| name.as_str().starts_with("impersonate-"))
    {
        Some(name) => Err(format!(
            "`{name}`: impersonation is not allowed through Airlock (the request is authorized as the gateway's own identity, and decided by policy as this grant)"
        )),
        None => Ok(()),
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
    }
}
