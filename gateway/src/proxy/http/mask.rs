//! Masking of HTTP responses, where a masking module applies to the target.
//!
//! No unmasked byte leaves: a JSON body is held whole (up to `http.mask-body-bytes`)
//! and masked as one text; a text stream (plain text, server-sent events, NDJSON,
//! Kubernetes watches and logs) is masked line by line as it arrives; anything a module
//! cannot read (another content type, a compressed body, bytes that are not UTF-8, a
//! body over the limit) is withheld, and the agent is told why.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_ENCODING, CONTENT_TYPE, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::BoxError;
use super::body::ChannelBody;
use crate::policy::types::{Body, GrantContext};
use crate::policy::{ActivePolicy, MaskError, PolicySet};
use crate::proxy::line_mask::{LineMask, LineMaskError};

/// Why a response did not reach the agent.
#[derive(Debug, thiserror::Error)]
pub(super) enum Withheld {
    #[error("the response is {0} and masking applies: only JSON and text can be masked")]
    ContentType(String),
    #[error("the upstream compressed the response ({0}) and masking applies")]
    Encoded(String),
    #[error("the response is over http.mask-body-bytes ({0} bytes), so it cannot be masked")]
    TooLarge(usize),
    #[error("the response is not UTF-8 text, so it cannot be masked")]
    NotText,
    #[error("the response is in charset {0}, which masking cannot read (only UTF-8)")]
    Charset(String),
    #[error("the response is part of a body ({0}), which cannot be masked on its own")]
    Partial(u16),
    #[error("masking failed: {0}")]
    Mask(#[from] MaskError),
    #[error("{0}")]
    Lines(#[from] LineMaskError),
    #[error("masking turned the JSON response into something that is not JSON")]
    BrokeJson,
    #[error("masking changed how many header values the response has, or made one unsendable")]
    BrokeHeaders,
    #[error("the upstream's response failed: {0}")]
    Upstream(String),
}

/// How a response is masked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// No module masks the target, or there is no body: the bytes pass as they are.
    Pass,
    /// Held whole and masked as one text.
    Whole,
    /// Masked line by line as it streams.
    Lines,
}

impl Plan {
    /// The record's name for it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Plan::Pass => "none",
            Plan::Whole => "whole",
            Plan::Lines => "lines",
        }
    }
}

/// How a response to `method` with `status` and `headers` is masked, when `masks`
/// (some module masks the target); `json_stream` says a JSON response is a stream of
/// lines (a Kubernetes watch).
pub(super) fn plan(
    masks: bool,
    method: &Method,
    status: StatusCode,
    headers: &HeaderMap,
    json_stream: bool,
) -> Result<Plan, Withheld> {
    if !masks
        || method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Plan::Pass);
    }
    if let Some(encoding) = headers.get(CONTENT_ENCODING) {
        let encoding = String::from_utf8_lossy(encoding.as_bytes()).into_owned();
        if !encoding.eq_ignore_ascii_case("identity") {
            return Err(Withheld::Encoded(encoding));
        }
    }
    if status == StatusCode::PARTIAL_CONTENT {
        return Err(Withheld::Partial(status.as_u16()));
    }
    let content_type = headers
        .get(CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase())
        .unwrap_or_default();
    // Text in UTF-16 or UTF-32 would read as UTF-8 full of NULs, and pass unmasked.
    if let Some(charset) = content_type
        .split(';')
        .skip(1)
        .filter_map(|p| p.trim().strip_prefix("charset="))
        .map(|c| c.trim_matches('"'))
        .find(|c| !matches!(*c, "utf-8" | "utf8" | "us-ascii" | "ascii"))
    {
        return Err(Withheld::Charset(charset.to_string()));
    }
    let essence = super::headers::essence(&content_type);
    if essence == "application/x-ndjson"
        || essence == "application/jsonl"
        || essence.starts_with("text/")
    {
        Ok(Plan::Lines)
    } else if super::headers::is_json(&essence) {
        Ok(if json_stream {
            Plan::Lines
        } else {
            Plan::Whole
        })
    } else if headers
        .get(hyper::header::CONTENT_LENGTH)
        .is_some_and(|l| l == "0")
    {
        Ok(Plan::Pass)
    } else {
        Err(Withheld::ContentType(if content_type.is_empty() {
            "of no content type".into()
        } else {
            content_type
        }))
    }
}

/// A session's recently masked small bodies. A module's mask is a function of the
/// grant's context (the time included) and the body, so, as with verdicts, a body
/// masked under the same policy set within `MASKED_TTL` is masked the same way: a
/// polled endpoint costs one Wasm call a second, not one a response.
#[derive(Default)]
pub(super) struct MaskCache(HashMap<[u8; 32], (Instant, Arc<PolicySet>, Bytes)>);

/// How long a masked body is reused.
const MASKED_TTL: Duration = Duration::from_secs(1);
/// Bodies larger than this are always masked afresh (and never held).
const CACHED_BODY: usize = 4096;
/// Masked bodies a session remembers before starting over.
const CACHED_BODIES: usize = 64;

/// Masks a whole body of `content_type`, read up to `limit` bytes.
pub(super) async fn whole(
    policy: &Arc<ActivePolicy>,
    context: GrantContext,
    content_type: String,
    body: Incoming,
    limit: usize,
    cache: &Mutex<MaskCache>,
) -> Result<Bytes, Withheld> {
    let bytes = http_body_util::Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                Withheld::TooLarge(limit)
            } else {
                Withheld::Upstream(e.to_string())
            }
        })?
        .to_bytes();
    text(policy, context, content_type, bytes, cache).await
}

/// Masks the values of a response's headers that could carry data (all but the
/// protocol's own), as one text, a line per value.
pub(super) async fn headers(
    policy: &Arc<ActivePolicy>,
    context: GrantContext,
    headers: &mut HeaderMap,
    cache: &Mutex<MaskCache>,
) -> Result<(), Withheld> {
    let carried: Vec<HeaderName> = headers
        .keys()
        .filter(|name| !PROTOCOL_HEADERS.contains(&name.as_str()))
        .cloned()
        .collect();
    let mut values = Vec::new();
    for name in &carried {
        for value in headers.get_all(name) {
            values.push(value.as_bytes().to_vec());
        }
    }
    if values.is_empty() {
        return Ok(());
    }
    let joined = Bytes::from(values.join(&b'\n'));
    let masked = text(policy, context, "text/plain".into(), joined, cache).await?;
    let lines: Vec<&[u8]> = masked.split(|&b| b == b'\n').collect();
    if lines.len() != values.len() {
        return Err(Withheld::BrokeHeaders);
    }
    let mut lines = lines.into_iter();
    for name in &carried {
        let count = headers.get_all(name).iter().count();
        headers.remove(name);
        for line in lines.by_ref().take(count) {
            let value = HeaderValue::from_bytes(line).map_err(|_| Withheld::BrokeHeaders)?;
            headers.append(name.clone(), value);
        }
    }
    Ok(())
}

/// Headers that describe the message, never data: not masked.
const PROTOCOL_HEADERS: &[&str] = &[
    "content-type",
    "content-length",
    "date",
    "cache-control",
    "etag",
    "last-modified",
    "expires",
    "vary",
    "server",
    "age",
    "accept-ranges",
    "x-content-type-options",
    "strict-transport-security",
];

/// Masks `bytes` of `content_type` with the modules in force (or as this session last
/// masked the same bytes, within `MASKED_TTL`).
async fn text(
    policy: &Arc<ActivePolicy>,
    context: GrantContext,
    content_type: String,
    bytes: Bytes,
    cache: &Mutex<MaskCache>,
) -> Result<Bytes, Withheld> {
    let set = policy.current();
    let key = (bytes.len() <= CACHED_BODY).then(|| {
        let mut digest = Sha256::new();
        digest.update(content_type.as_bytes());
        digest.update([0]);
        digest.update(&bytes);
        <[u8; 32]>::from(digest.finalize())
    });
    if let Some(key) = &key
        && let Some((at, cached_set, masked)) = cache.lock().unwrap().0.get(key)
        && at.elapsed() < MASKED_TTL
        && Arc::ptr_eq(cached_set, &set)
    {
        return Ok(masked.clone());
    }
    if bytes.contains(&0) {
        return Err(Withheld::NotText);
    }
    let text = String::from_utf8(bytes.to_vec()).map_err(|_| Withheld::NotText)?;
    let was_json = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
    let agent = context.agent.id.clone();
    let module_set = set.clone();
    let masked = policy
        .run(&agent, move |deadline| {
            module_set.mask_body(&context, Body { content_type, text }, deadline)
        })
        .await
        .unwrap_or_else(|refusal| Err(MaskError::from(refusal)))?;
    if was_json && serde_json::from_str::<serde::de::IgnoredAny>(&masked.text).is_err() {
        return Err(Withheld::BrokeJson);
    }
    let masked = Bytes::from(masked.text);
    if let Some(key) = key {
        let mut cache = cache.lock().unwrap();
        if cache.0.len() >= CACHED_BODIES {
            cache.0.clear();
        }
        cache.0.insert(key, (Instant::now(), set, masked.clone()));
    }
    Ok(masked)
}

/// Masks a streamed body line by line on a task of its own; `withheld` is told why,
/// if the stream stops reaching the agent before its end.
pub(super) fn lines(
    mut mask: LineMask,
    mut body: Incoming,
    withheld: Arc<Mutex<Option<String>>>,
) -> ChannelBody {
    let (tx, rx) = mpsc::channel::<Result<Bytes, BoxError>>(8);
    tokio::spawn(async move {
        let fail = |e: Withheld| {
            let text = e.to_string();
            *withheld.lock().unwrap() = Some(text.clone());
            Err::<Bytes, BoxError>(text.into())
        };
        loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                // The agent is gone: stop reading the upstream.
                () = tx.closed() => return,
            };
            let data = match frame {
                None => break,
                Some(Ok(frame)) if frame.data_ref().is_some_and(|d| d.contains(&0)) => {
                    let _ = tx.send(fail(Withheld::NotText)).await;
                    return;
                }
                Some(Err(e)) => {
                    let _ = tx.send(fail(Withheld::Upstream(e.to_string()))).await;
                    return;
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(_) => continue,
                },
            };
            match mask.feed(0, &data).await {
                Ok(masked) if masked.is_empty() => {}
                Ok(masked) => {
                    if tx.send(Ok(Bytes::from(masked))).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(fail(e.into())).await;
                    return;
                }
            }
        }
        match mask.finish(0).await {
            Ok(rest) if rest.is_empty() => {}
            Ok(rest) => {
                let _ = tx.send(Ok(Bytes::from(rest))).await;
            }
            Err(e) => {
                let _ = tx.send(fail(e.into())).await;
            }
        }
    });
    ChannelBody(rx)
}

#[cfg(test)]
mod tests {
    use super::super::headers::from_pairs as headers;
    use super::*;

    fn plan_status(status: StatusCode, h: &[(&str, &str)]) -> Result<Plan, Withheld> {
        plan(true, &Method::GET, status, &headers(h), false)
    }

    #[test]
    fn what_a_module_cannot_read_is_withheld_never_passed() {
        let plan =
            |h: &[(&str, &str)]| plan(true, &Method::GET, StatusCode::OK, &headers(h), false);
        assert_eq!(
            plan(&[("content-type", "application/json")]).unwrap(),
            Plan::Whole
        );
        assert_eq!(
            plan(&[("content-type", "application/problem+json")]).unwrap(),
            Plan::Whole
        );
        assert_eq!(
            plan(&[("content-type", "text/plain; charset=utf-8")]).unwrap(),
            Plan::Lines
        );
        assert_eq!(
            plan(&[("content-type", "text/event-stream")]).unwrap(),
            Plan::Lines
        );
        assert!(matches!(
            plan(&[("content-type", "application/octet-stream")]),
            Err(Withheld::ContentType(_))
        ));
        assert!(matches!(plan(&[]), Err(Withheld::ContentType(_))));
        assert!(matches!(
            plan(&[
                ("content-type", "application/json"),
                ("content-encoding", "gzip")
            ]),
            Err(Withheld::Encoded(_))
        ));
        assert_eq!(plan(&[("content-length", "0")]).unwrap(), Plan::Pass);
        assert!(matches!(
            plan(&[("content-type", "text/plain; charset=utf-16le")]),
            Err(Withheld::Charset(_))
        ));
        assert_eq!(
            plan(&[("content-type", "application/json; charset=UTF-8")]).unwrap(),
            Plan::Whole
        );
        let partial = plan_status(
            StatusCode::PARTIAL_CONTENT,
            &[("content-type", "text/plain")],
        );
        assert!(matches!(partial, Err(Withheld::Partial(206))));
    }

    #[test]
    fn without_a_masking_module_or_a_body_bytes_pass() {
        let octets = headers(&[("content-type", "application/octet-stream")]);
        assert_eq!(
            plan(false, &Method::GET, StatusCode::OK, &octets, false).unwrap(),
            Plan::Pass
        );
        assert_eq!(
            plan(true, &Method::HEAD, StatusCode::OK, &octets, false).unwrap(),
            Plan::Pass
        );
        assert_eq!(
            plan(true, &Method::GET, StatusCode::NOT_MODIFIED, &octets, false).unwrap(),
            Plan::Pass
        );
        let json = headers(&[("content-type", "application/json")]);
        assert_eq!(
            plan(true, &Method::GET, StatusCode::OK, &json, true).unwrap(),
            Plan::Lines,
            "a watch is masked event by event"
        );
    }
}
