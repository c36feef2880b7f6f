//! One agent connection's requests, each read top to bottom: the grant it presents →
//! the request as an action → policy's verdict → the record → the upstream, with the
//! gateway's credential → the response, masked → the agent → the result's record.
//!
//! A connection carries one grant: its first authenticated request opens the session
//! (`session.opened`), and the connection is cut when the grant ends. A request that
//! opens a stream (a WebSocket: kubectl exec) is decided and recorded like any other,
//! then relayed by `websocket.rs`; the session lasts until its streams end.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body as _, Incoming};
use hyper::header::{ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, IF_RANGE, RANGE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;
use sha2::Digest as _;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use super::body::{Counted, Ending, Prefixed, Scrub, Tally, scrub};
use super::headers::Upgrade;
use super::mask::{self, Plan};
use super::path::{self, NormalPath};
use super::token::{Token, grant_token};
use super::upstream::Upstream;
use super::websocket::{AgentStream, Handshake};
use super::{BoxError, HttpServices, headers};
use crate::config::Durability;
use crate::grants::{GrantAuthError, TargetRecord};
use crate::policy::Kind;
use crate::policy::types::{Action, GrantContext, HttpRequest, KubeRequest, Label, RequestBody};
use crate::proxy::Via;
use crate::proxy::kube;
use crate::proxy::line_mask::LineMask;
use crate::proxy::session::{CutSignal, Denial, SessionCore};
use crate::record::{AuditEvent, EventKind, Record, RecordError, Write};

/// What the agent is sent.
pub(super) type Out = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// One agent connection.
pub(super) struct Conn {
    services: Arc<HttpServices>,
    peer: SocketAddr,
    /// The session the connection's first authenticated request opened.
    session: tokio::sync::Mutex<Option<Arc<Session>>>,
    /// The grant's end, once a session is open: the connection task cuts on it.
    cut: watch::Sender<Option<CutSignal>>,
    /// The streams the connection was upgraded to, each relayed on a task.
    streams: TaskTracker,
}

/// A session: one connection under one grant.
pub(super) struct Session {
    grant_id: String,
    target: TargetRecord,
    upstream: Arc<Upstream>,
    /// `None` once closed; results that arrive later are recorded on their own.
    pub(super) core: tokio::sync::Mutex<Option<SessionCore>>,
    /// For entries written once the core is closed.
    agent: String,
    record: Record,
    session_id: String,
    /// Why the connection was cut, once it was.
    ended: Mutex<Option<String>>,
    /// Small bodies masked in the last second.
    masked: Mutex<mask::MaskCache>,
    /// Streams opened so far (their number in the record).
    opened_streams: AtomicU32,
}

impl Conn {
    pub(super) fn new(services: Arc<HttpServices>, peer: SocketAddr) -> Self {
        Conn {
            services,
            peer,
            session: tokio::sync::Mutex::new(None),
            cut: watch::channel(None).0,
            streams: TaskTracker::new(),
        }
    }

    /// Resolves once every stream the connection was upgraded to has ended; when the
    /// grant ended (`cut`), waits at most a few seconds for them to record their end.
    pub(super) async fn streams_ended(&self, cut: bool) {
        self.streams.close();
        if cut {
            let _ = tokio::time::timeout(Duration::from_secs(5), self.streams.wait()).await;
        } else {
            self.streams.wait().await;
        }
    }

    /// Resolves with the reason once the grant of this connection's session ends.
    pub(super) async fn cut(&self) -> String {
        let mut slot = self.cut.subscribe();
        let mut signal = loop {
            if let Some(signal) = slot.borrow_and_update().clone() {
                break signal;
            }
            if slot.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        signal.ended().await
    }

    /// Closes the session, if one was opened, with `reason`.
    pub(super) async fn close(&self, reason: &str, cut: bool) {
        let Some(session) = self.session.lock().await.take() else {
            return;
        };
        if cut {
            *session.ended.lock().unwrap() = Some(reason.to_string());
        }
        let core = session.core.lock().await.take();
        if let Some(core) = core {
            core.close(reason).await;
        }
    }

    pub(super) async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Out>, Infallible> {
        Ok(match self.serve(request).await {
            Ok(response) | Err(response) => response,
        })
    }

    async fn serve(&self, request: Request<Incoming>) -> Result<Response<Out>, Response<Out>> {
        let token = grant_token(request.headers()).map_err(|e| {
            self.refused("401", &e.to_string(), None);
            unauthorized(&e.to_string())
        })?;
        let session = self.session(&token).await?;
        match session
            .exchange(&self.services, request, &self.streams)
            .await
        {
            Err(refusal) if session.target.kind == Kind::Kubernetes => {
                let status = kube::status(refusal).await;
                Err(status.map(|body| body.map_err(|e| match e {}).boxed()))
            }
            answer => answer,
        }
    }

    /// The session `token` opens or continues on this connection.
    async fn session(&self, token: &Token) -> Result<Arc<Session>, Response<Out>> {
        let proxy = &self.services.proxy;
        let broker = &proxy.broker;
        // Every request proves its grant, and that the grant is still active.
        let live = broker
            .authenticate_own(&token.id, &token.secret)
            .map_err(|e| {
                self.refused("401", &e.to_string(), Some(&token.id));
                match e {
                    GrantAuthError::BadCredentials => unauthorized(&e.to_string()),
                    _ => reply(StatusCode::FORBIDDEN, "grant-refused", &e.to_string(), None),
                }
            })?;
        let mut slot = self.session.lock().await;
        if let Some(session) = &*slot {
            if session.grant_id != token.id {
                return Err(reply(
                    StatusCode::BAD_REQUEST,
                    "one-grant-per-connection",
                    &format!(
                        "this connection carries grant {}; open a new connection for another grant",
                        session.grant_id
                    ),
                    None,
                ));
            }
            return Ok(session.clone());
        }
        let target_name = live.grant.target.clone();
        let target = broker.target(&target_name).ok_or_else(|| {
            reply(
                StatusCode::FORBIDDEN,
                "grant-refused",
                &format!("target `{target_name}` no longer exists"),
                None,
            )
        })?;
        if !self.services.serves(target.kind) {
            let reason = format!(
                "grant {} is for a {} target, which is not served on this listener",
                token.id,
                target.kind.as_str()
            );
            self.refused("400", &reason, Some(&token.id));
            return Err(reply(
                StatusCode::BAD_REQUEST,
                "wrong-protocol",
                &reason,
                None,
            ));
        }
        let upstream = self.services.upstream(&target).map_err(|e| {
            tracing::error!(target = %target.name, error = %e, "HTTP upstream unusable");
            self.refused("502", &e.to_string(), Some(&token.id));
            reply(
                StatusCode::BAD_GATEWAY,
                "upstream-unusable",
                "the gateway cannot reach this target's upstream (see the gateway's log)",
                None,
            )
        })?;
        let core = proxy
            .open(live, &target, target.kind.as_str(), Via::Client)
            .await
            .map_err(|e| {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "record-unavailable",
                    &format!("the session cannot be recorded: {e}"),
                    None,
                )
            })?;
        let _ = self.cut.send(Some(core.cut_signal()));
        let session = Arc::new(Session {
            grant_id: token.id.clone(),
            agent: core.context().agent.id.clone(),
            record: broker.record().clone(),
            session_id: core.session_id().to_string(),
            target,
            upstream,
            core: tokio::sync::Mutex::new(Some(core)),
            ended: Mutex::new(None),
            masked: Mutex::default(),
            opened_streams: AtomicU32::new(0),
        });
        *slot = Some(session.clone());
        Ok(session)
    }

    /// Records a refused request (`session.refused`), at most so many per address.
    fn refused(&self, code: &str, reason: &str, grant: Option<&str>) {
        self.services.proxy.record_refusal(
            "http",
            code,
            reason,
            (grant, None),
            &self.peer.to_string(),
        );
    }
}

/// A request read far enough to be decided.
struct Described {
    method: Method,
    path: NormalPath,
    query: Option<String>,
    headers: hyper::HeaderMap,
    body: RequestBody,
    /// For a Kubernetes target: the request as the API server reads it.
    kube: Option<KubeRequest>,
    /// What the upstream is sent as the body.
    upstream_body: super::upstream::UpBody,
    bytes_in: Arc<Tally>,
    /// The stream a WebSocket request opens, once allowed.
    stream: Option<AgentStream>,
    /// Why the gateway refuses the request even where policy allows it (a policy's
    /// denial is the one the agent is told, when there is one).
    refused_after_policy: Option<String>,
    /// The policy set the request is read and decided under.
    set: Arc<crate::policy::PolicySet>,
    /// Whether a module of `set` masks the target.
    masks: bool,
}

impl Session {
    async fn exchange(
        self: &Arc<Self>,
        services: &Arc<HttpServices>,
        request: Request<Incoming>,
        streams: &TaskTracker,
    ) -> Result<Response<Out>, Response<Out>> {
        let started = Instant::now();
        let method = request.method().clone();
        let raw_path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or("").to_string();
        let described = match self.describe(services, request).await {
            Ok(described) => described,
            Err((status, reason)) => {
                let denial = (reason, None);
                self.decided_by_gateway(&method, &raw_path, &query, &denial)
                    .await?;
                return Err(reply(status, "refused", &denial.0, None));
            }
        };
        let (masking, recording) = self.decide(services, &described).await?;
        let masks = masking.is_some();

        // Upstream, with the gateway's credential.
        let uri = self
            .upstream
            .uri(&described.path.encoded, described.query.as_deref())
            .map_err(|e| reply(StatusCode::BAD_REQUEST, "refused", &e.to_string(), None))?;
        let mut headers = described.headers;
        self.upstream.inject(&mut headers);
        if let Some(stream) = &described.stream {
            stream.offer.put_on(&mut headers);
        }
        if masks {
            // A compressed response could not be masked, and parts of one could each
            // pass a mask that the whole would not (a card number split by a Range).
            headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
            headers.remove(RANGE);
            headers.remove(IF_RANGE);
            if described.kube.is_some() {
                // kubectl asks for protobuf first, which no module can read: it is
                // asked for in JSON, which it also takes.
                kube::json_only(&mut headers);
            }
        }
        let mut upstream_request = Request::new(described.upstream_body);
        *upstream_request.method_mut() = described.method.clone();
        *upstream_request.uri_mut() = uri;
        *upstream_request.headers_mut() = headers;
        let result = ResultEntry {
            session: self.clone(),
            method: described.method.clone(),
            path: described.path.decoded.clone(),
            started,
            bytes_in: described.bytes_in.clone(),
            bytes_out: Tally::keeping(self.record_body_bytes()),
            withheld: Arc::new(Mutex::new(None)),
            recorded: Default::default(),
            stream: described.stream.as_ref().map(|s| s.number),
            exit_code: None,
        };
        let upgrade = described.stream.is_some();
        let response = self
            .upstream
            .client(upgrade)
            .request(upstream_request)
            .await;
        if let Some(recording) = recording {
            let durable = recording
                .await
                .map_err(|e| RecordError::Store(e.to_string()))
                .and_then(|written| written.map(drop));
            if let Err(e) = durable {
                return Err(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "record-unavailable",
                    &format!("the request could not be recorded, so its answer is withheld: {e}"),
                    None,
                ));
            }
        }
        let response = match response {
            Ok(response) => response,
            Err(e) => {
                let error = error_chain(&e);
                result.record(None, Plan::Pass, Some(error.clone()));
                if let Some(failure) = result.bytes_in.failure() {
                    // The agent's body broke off (bad chunking, over the size limit):
                    // the upstream saw an unfinished request, which it discards.
                    return Err(reply(
                        StatusCode::BAD_REQUEST,
                        "refused",
                        &format!("the request body: {failure}"),
                        None,
                    ));
                }
                return Err(reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream-failed",
                    &format!("the upstream did not answer: {error}"),
                    None,
                ));
            }
        };

        if let Some(stream) = described.stream
            && response.status() == StatusCode::SWITCHING_PROTOCOLS
        {
            return self
                .upgraded(services, stream, response, masking, result, streams)
                .await;
        }

        // The response, masked where a module masks the target.
        let (parts, body) = response.into_parts();
        let status = parts.status;
        let watch = described.kube.as_ref().is_some_and(|k| k.verb == "watch");
        let plan = match mask::plan(masks, &described.method, status, &parts.headers, watch) {
            Ok(plan) => plan,
            Err(withheld) => return Err(result.withhold(status, Plan::Pass, withheld)),
        };
        let mut agent_headers = headers::to_agent(&parts.headers);
        if let Some(context) = &masking {
            let policy = &services.proxy.policy;
            if let Err(withheld) =
                mask::headers(policy, context.clone(), &mut agent_headers, &self.masked).await
            {
                return Err(result.withhold(status, plan, withheld));
            }
        }
        let body: Out = match plan {
            Plan::Pass => result.counted(body, status, plan),
            Plan::Whole => {
                let content_type = content_type(&parts.headers);
                let context = masking.expect(MASKING_PLAN);
                match mask::whole(
                    &services.proxy.policy,
                    context,
                    content_type,
                    body,
                    services.limits.mask_body_bytes,
                    &self.masked,
                )
                .await
                {
                    Ok(masked) => {
                        agent_headers.insert(CONTENT_LENGTH, masked.len().into());
                        result.counted(Full::new(masked), status, plan)
                    }
                    Err(withheld) => return Err(result.withhold(status, plan, withheld)),
                }
            }
            Plan::Lines => {
                let context = masking.expect(MASKING_PLAN);
                let content_type = content_type(&parts.headers);
                let Some(line_mask) =
                    LineMask::for_target(services.proxy.policy.clone(), context, &content_type, 1)
                else {
                    // The bundle changed between the plan and now, to one with no
                    // masking module: the answer was decided under the old one, so it
                    // is withheld rather than passed unmasked.
                    return Err(result.withhold(
                        status,
                        plan,
                        mask::Withheld::Upstream("the policy bundle changed".into()),
                    ));
                };
                agent_headers.remove(CONTENT_LENGTH);
                let body = mask::lines(line_mask, body, result.withheld.clone());
                result.counted(body, status, plan)
            }
        };
        let secrets = self.upstream.secrets();
        let body = if secrets.is_empty() {
            body
        } else {
            scrub_headers(&mut agent_headers, secrets);
            Scrub::new(body, secrets.clone()).boxed()
        };
        let mut response = Response::new(body);
        *response.status_mut() = status;
        *response.headers_mut() = agent_headers;
        Ok(response)
    }

    /// Reads what policy sees of a request: refused here (by the gateway) when it
    /// could be read two ways.
    async fn describe(
        &self,
        services: &HttpServices,
        mut request: Request<Incoming>,
    ) -> Result<Described, (StatusCode, String)> {
        let bad = |reason: String| (StatusCode::BAD_REQUEST, reason);
        let upgrade = headers::check_request(request.headers()).map_err(|e| bad(e.to_string()))?;
        let on_upgrade = matches!(upgrade, Some(Upgrade::WebSocket(_)))
            .then(|| hyper::upgrade::on(&mut request));
        let (parts, body) = request.into_parts();
        if parts.method == Method::CONNECT {
            return Err((
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not served through this gateway".into(),
            ));
        }
        // Methods are case-sensitive: `get` is not `GET` to a server, and a policy
        // must not read it as one.
        if !parts
            .method
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_uppercase())
        {
            return Err(bad(format!(
                "method `{}` is not upper case",
                parts.method.as_str()
            )));
        }
        let path = path::normalise(parts.uri.path()).map_err(|e| bad(format!("path: {e}")))?;
        if let Some(query) = parts.uri.query() {
            path::check_query(query).map_err(|e| bad(format!("query: {e}")))?;
        }
        // One policy set reads the whole request: what masking refuses here, and the
        // verdict and masking in `decide`.
        let set = services.proxy.policy.current();
        let masks = set.masks(&self.target.policy_target());
        let kube = match self.target.kind {
            Kind::Kubernetes => {
                kube::check_headers(&parts.headers)
                    .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))?;
                let query = parts.uri.query().unwrap_or("");
                let info = kube::request_info(&parts.method, &path.decoded, query)
                    .map_err(|e| bad(e.to_string()))?;
                if masks {
                    kube::check_maskable(&info, query).map_err(|e| bad(e.to_string()))?;
                }
                Some(info)
            }
            _ => None,
        };
        let (stream, refused_after_policy) =
            self.stream(upgrade, on_upgrade, &parts, kube.as_ref(), masks)?;
        let inspectable = is_inspectable(&parts.headers);
        let limit = services.limits.inspect_body_bytes;
        let bytes_in = Tally::keeping(self.record_body_bytes());
        let max = services.limits.max_request_body_bytes;
        if body.size_hint().lower() > max {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is over http.max-request-body-bytes ({max})"),
            ));
        }
        let mut body = http_body_util::Limited::new(body, max as usize);
        let (policy_body, upstream_body): (RequestBody, super::upstream::UpBody) =
            if body.is_end_stream() {
                (RequestBody::None, empty())
            } else if inspectable {
                // Read up to the limit; the body is shown whole or not at all.
                let mut read = VecDeque::new();
                let mut total = 0usize;
                let complete = loop {
                    match body.frame().await {
                        None => break true,
                        Some(Err(e)) => return Err(bad(format!("the request body: {e}"))),
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data() {
                                total += data.len();
                                read.push_back(data);
                                if total > limit {
                                    break false;
                                }
                            }
                        }
                    }
                };
                if complete {
                    let whole: Vec<u8> = read.iter().flat_map(|b| b.iter().copied()).collect();
                    let text = String::from_utf8(whole)
                        .map_err(|_| bad("the request body is not UTF-8 text".into()))?;
                    let upstream = Full::new(Bytes::from(text.clone()));
                    (
                        RequestBody::Text(text),
                        Counted::new(upstream, bytes_in.clone())
                            .map_err(|e| e)
                            .boxed(),
                    )
                } else {
                    let rest = Prefixed { read, rest: body };
                    (
                        RequestBody::NotInspected,
                        Counted::new(rest, bytes_in.clone()).boxed(),
                    )
                }
            } else {
                (
                    RequestBody::NotInspected,
                    Counted::new(body, bytes_in.clone()).boxed(),
                )
            };
        if stream.is_some() && !matches!(policy_body, RequestBody::None) {
            return Err(bad("a WebSocket handshake with a body".into()));
        }
        Ok(Described {
            method: parts.method,
            path,
            query: parts.uri.query().map(str::to_string),
            headers: headers::to_upstream(&parts.headers),
            body: policy_body,
            kube,
            upstream_body,
            bytes_in,
            stream,
            refused_after_policy,
            set,
            masks,
        })
    }

    /// The stream an upgrade asks for: a WebSocket is served only to open a Kubernetes
    /// exec, attach or port-forward, and only with a subprotocol the gateway reads.
    /// Refused once policy has allowed the request (so a denial's reason is the one
    /// kubectl shows): kubectl's SPDY (what it falls back to when the WebSocket was
    /// refused), and streams no mask could read where a module masks the target.
    fn stream(
        &self,
        upgrade: Option<Upgrade>,
        on_upgrade: Option<hyper::upgrade::OnUpgrade>,
        parts: &hyper::http::request::Parts,
        kube: Option<&KubeRequest>,
        masks: bool,
    ) -> Result<(Option<AgentStream>, Option<String>), (StatusCode, String)> {
        let bad = |reason: String| Err((StatusCode::BAD_REQUEST, reason));
        let streams = kube.and_then(|k| kube::Streams::of(k.subresource.as_deref()));
        let (upgrade, streams) = match (upgrade, streams) {
            (None, _) => return Ok((None, None)),
            (Some(Upgrade::Other(protocol)), None) => {
                return bad(headers::HeaderError::Upgrade(protocol).to_string());
            }
            (Some(Upgrade::WebSocket(_)), None) => {
                return bad(
                    "a WebSocket is served only to open a Kubernetes exec, attach or port-forward"
                        .into(),
                );
            }
            (Some(upgrade), Some(streams)) => (upgrade, streams),
        };
        let after_policy = match (&upgrade, streams) {
            (Upgrade::Other(protocol), _) => Some(format!(
                "{protocol} streams are not served; kubectl 1.30 and later open exec, attach and port-forward over WebSocket, which is"
            )),
            (_, kube::Streams::PortForward) if masks => Some(
                "a masking module applies to this target, and port-forwarded bytes cannot be masked"
                    .into(),
            ),
            (_, kube::Streams::Channels) if masks && kube.is_some_and(|k| k.tty) => Some(
                "a masking module applies to this target, and a terminal's output cannot be masked line by line: run the command without a TTY (no -t)"
                    .into(),
            ),
            _ => None,
        };
        let (Upgrade::WebSocket(handshake), Some(upgrade)) = (upgrade, on_upgrade) else {
            return Ok((None, after_policy));
        };
        if parts.method != Method::GET || parts.version != hyper::Version::HTTP_11 {
            return bad("a WebSocket is opened by a GET over HTTP/1.1".into());
        }
        let protocols = streams.readable(&handshake.protocols);
        if protocols.is_empty() {
            return bad(format!(
                "none of the WebSocket subprotocols offered ({}) is one the gateway reads",
                handshake.protocols.join(", ")
            ));
        }
        let stream = AgentStream {
            agent_key: handshake.key,
            offer: Handshake::new(protocols),
            upgrade,
            streams,
            number: self.opened_streams.fetch_add(1, Ordering::Relaxed),
        };
        Ok((Some(stream), after_policy))
    }

    /// Decides and records the request; refused, the agent gets a 403 and nothing
    /// reaches the upstream. Allowed, hands back the grant's context as of the decision
    /// when a module masks the target (for the mask calls), and the entry's write when
    /// it is still becoming durable.
    async fn decide(
        &self,
        services: &HttpServices,
        described: &Described,
    ) -> Result<(Option<GrantContext>, Option<Recording>), Response<Out>> {
        let header_labels: Vec<Label> = described
            .headers
            .iter()
            .map(|(name, value)| Label {
                key: name.as_str().to_string(),
                value: value.to_str().unwrap_or_default().to_string(),
            })
            .collect();
        let query = described.query.clone().unwrap_or_default();
        let key = verdict_key(described, &query, &header_labels);
        let mut guard = self.core.lock().await;
        let core = guard.as_mut().ok_or_else(ended)?;
        if let Some(reason) = core.expired() {
            return Err(reply(
                StatusCode::UNAUTHORIZED,
                "grant-ended",
                &reason,
                None,
            ));
        }
        let set = &described.set;
        let action = || match &described.kube {
            Some(kube) => Action::Kube(kube.clone()),
            None => Action::Http(HttpRequest {
                method: described.method.as_str().to_string(),
                path: described.path.decoded.clone(),
                query: query.clone(),
                headers: header_labels.clone(),
                body: described.body.clone(),
            }),
        };
        let unless_allowed = described.refused_after_policy.clone().map(|r| (r, None));
        let verdict = core.check(set, &key, action, unless_allowed).await;
        core.count_actions(1);
        let mut detail = json!({
            "session": core.session_id(),
            "method": described.method.as_str(),
            "path": described.path.decoded,
            "query": query,
            "body": match described.body {
                RequestBody::None => "none",
                RequestBody::Text(_) => "inspected",
                RequestBody::NotInspected => "not-inspected",
            },
            "verdict": if verdict.denial.is_some() { "deny" } else { "allow" },
            "decided_by": verdict.decided_by,
            "reason": verdict.denial.as_ref().map(|d| &d.0),
            "bundle": verdict.bundle,
            "votes": verdict.votes,
        });
        if let Some(kube) = &described.kube {
            detail["action"] = json!({
                "verb": kube.verb,
                "api_group": kube.api_group,
                "api_version": kube.api_version,
                "resource": kube.resource_type,
                "subresource": kube.subresource,
                "namespace": kube.namespace,
                "name": kube.name,
                "command": kube.command,
                "tty": kube.tty,
                "ports": kube.ports,
            });
        }
        if let Some(stream) = &described.stream {
            detail["stream"] = stream.number.into();
        }
        if let (Some(keep), RequestBody::Text(text)) =
            (self.target.record_body_bytes, &described.body)
        {
            detail["recorded_body"] = truncate(text, keep as usize).into();
        }
        let masking = described.masks.then(|| core.context_now());
        let mut write = Write::event(core.event(EventKind::HttpRequest, detail));
        let allowed = verdict.denial.is_none();
        // A safe method's entry may become durable while the upstream answers (it is
        // awaited before anything of the answer is released); any other request's is
        // durable before it is sent, and so is a stream's (a GET that runs a command).
        if allowed
            && services.proxy.durability == Durability::Strict
            && is_safe(&described.method)
            && described.stream.is_none()
        {
            core.carry_result(&mut write);
            let record = services.proxy.broker.record().clone();
            let recording = tokio::spawn(async move { record.write_async(write).await });
            return Ok((masking, Some(recording)));
        }
        core.record(write).await.map_err(|e| {
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "record-unavailable",
                &format!("the request cannot be recorded, so it is not sent: {e}"),
                None,
            )
        })?;
        if let Some((reason, hint)) = &verdict.denial {
            return Err(reply(
                StatusCode::FORBIDDEN,
                "denied",
                reason,
                hint.as_deref(),
            ));
        }
        Ok((masking, None))
    }

    /// Records a request the gateway refused before policy could read it.
    async fn decided_by_gateway(
        &self,
        method: &Method,
        raw_path: &str,
        query: &str,
        denial: &Denial,
    ) -> Result<(), Response<Out>> {
        let mut guard = self.core.lock().await;
        let core = guard.as_mut().ok_or_else(ended)?;
        core.count_actions(1);
        let event = core.event(
            EventKind::HttpRequest,
            json!({
                "session": core.session_id(),
                "method": method.as_str(),
                "path": raw_path,
                "query": query,
                "body": "not-inspected",
                "verdict": "deny",
                "decided_by": "gateway",
                "reason": denial.0,
            }),
        );
        core.record(Write::event(event)).await.map_err(|e| {
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "record-unavailable",
                &format!("the request cannot be recorded: {e}"),
                None,
            )
        })
    }

    fn record_body_bytes(&self) -> usize {
        self.target.record_body_bytes.unwrap_or(0) as usize
    }
}

/// What one allowed request's result entry needs.
pub(super) struct ResultEntry {
    session: Arc<Session>,
    method: Method,
    path: String,
    started: Instant,
    bytes_in: Arc<Tally>,
    bytes_out: Arc<Tally>,
    withheld: Arc<Mutex<Option<String>>>,
    /// Set once the entry is recorded: one dropped before (the agent went away while
    /// the upstream answered) records itself, so no allowed request goes unaccounted.
    recorded: std::sync::atomic::AtomicBool,
    /// The stream the request opened, if it did.
    stream: Option<u32>,
    /// How the stream's command exited, as the upstream said.
    exit_code: Option<i64>,
}

impl Drop for ResultEntry {
    fn drop(&mut self) {
        if !self.recorded.load(std::sync::atomic::Ordering::Relaxed) {
            let error = "the agent went away before the answer";
            self.record(None, Plan::Pass, Some(error.to_string()));
        }
    }
}

impl ResultEntry {
    /// The agent's body, counted; its end records the result.
    fn counted<B>(self, body: B, status: StatusCode, plan: Plan) -> Out
    where
        B: hyper::body::Body<Data = Bytes> + Unpin + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let tally = self.bytes_out.clone();
        Counted::new(body, tally)
            .on_end(move |ending| {
                let cut = match ending {
                    Ending::Complete => None,
                    Ending::Cut(reason) => Some(reason),
                };
                let withheld = self.withheld.lock().unwrap().clone();
                let ended = self.session.ended.lock().unwrap().clone();
                let withheld = withheld.or(ended.filter(|_| cut.is_some())).or(cut);
                *self.withheld.lock().unwrap() = withheld;
                self.record(Some(status), plan, None);
            })
            .boxed()
    }

    /// The end of the stream the request opened.
    pub(super) fn streamed(mut self, status: StatusCode, plan: Plan, outcome: kube::Outcome) {
        self.bytes_in.count(outcome.bytes_in);
        self.bytes_out.count(outcome.bytes_out);
        self.exit_code = outcome.exit_code;
        let (withheld, error) = match outcome.ending {
            kube::Ending::Done => (None, None),
            kube::Ending::Cut(reason) | kube::Ending::Withheld(reason) => (Some(reason), None),
            kube::Ending::Refused(reason) => (
                None,
                Some(format!("the agent broke the stream's protocol: {reason}")),
            ),
            kube::Ending::Lost(reason) => (None, Some(reason)),
        };
        *self.withheld.lock().unwrap() = withheld;
        self.record(Some(status), plan, error);
    }

    /// The agent is told why the response was withheld; the record says so too.
    pub(super) fn withhold(
        self,
        status: StatusCode,
        plan: Plan,
        withheld: mask::Withheld,
    ) -> Response<Out> {
        let reason = withheld.to_string();
        *self.withheld.lock().unwrap() = Some(reason.clone());
        self.record(Some(status), plan, None);
        reply(StatusCode::BAD_GATEWAY, "withheld", &reason, None)
    }

    /// Keeps the result summary for the session's next entry (or writes it now, if
    /// the session has closed).
    pub(super) fn record(&self, status: Option<StatusCode>, plan: Plan, error: Option<String>) {
        self.recorded
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let session = &self.session;
        let mut detail = json!({
            "session": session.session_id,
            "method": self.method.as_str(),
            "path": self.path,
            "status": status.map(|s| s.as_u16()),
            "bytes_in": self.bytes_in.bytes(),
            "bytes_out": self.bytes_out.bytes(),
            "duration_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "masked": plan.name(),
            "withheld": *self.withheld.lock().unwrap(),
        });
        if let Some(error) = error {
            detail["error"] = error.into();
        }
        if let Some(stream) = self.stream {
            detail["stream"] = stream.into();
            detail["exit_code"] = self.exit_code.into();
        }
        if let Some(body) = self.bytes_out.kept() {
            detail["recorded_body"] = body.into();
        }
        let session = session.clone();
        let write = move |core: Option<&mut SessionCore>| match core {
            Some(core) => core.result(EventKind::HttpResult, detail),
            None => {
                let event = AuditEvent::new(EventKind::HttpResult)
                    .agent(&session.agent)
                    .target(&session.target.name)
                    .grant(&session.grant_id)
                    .detail(detail);
                if let Err(e) = session.record.write_queued(Write::event(event)) {
                    tracing::error!(error = %e, "cannot record an HTTP result");
                }
            }
        };
        // Usually the core is free (the result comes as the body ends); when a
        // decision holds it, the summary waits its turn on a task.
        match self.session.core.try_lock() {
            Ok(mut guard) => write(guard.as_mut()),
            Err(_) => {
                let session = self.session.clone();
                tokio::spawn(async move {
                    let mut guard = session.core.lock().await;
                    write(guard.as_mut());
                });
            }
        }
    }
}

/// Overwrites the gateway's secrets in response headers (see [`Scrub`]).
fn scrub_headers(headers: &mut hyper::HeaderMap, secrets: &[memchr::memmem::Finder<'static>]) {
    for value in headers.values_mut() {
        let mut bytes = value.as_bytes().to_vec();
        scrub(&mut bytes, secrets);
        if bytes != value.as_bytes()
            && let Ok(scrubbed) = HeaderValue::from_bytes(&bytes)
        {
            *value = scrubbed;
        }
    }
}

/// Why a masking plan always has a context: `mask::plan` makes one only where a module
/// masks the target, and then `decide` hands the context back.
const MASKING_PLAN: &str = "a masking plan is made only where masking applies";

/// A request's record entry on its way to being durable.
type Recording = tokio::task::JoinHandle<Result<crate::record::Receipt, RecordError>>;

/// GET, HEAD and OPTIONS: methods that change nothing, by HTTP's definition.
fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The session's cache key for a request's verdict: everything the action holds.
fn verdict_key(described: &Described, query: &str, headers: &[Label]) -> String {
    let mut key = format!("{} {}?{query}\n", described.method, described.path.decoded);
    for label in headers {
        key.push_str(&label.key);
        key.push(':');
        key.push_str(&label.value);
        key.push('\n');
    }
    // The upgrade asked for is not among the headers policy is shown.
    if described.stream.is_some() {
        key.push_str("stream\n");
    }
    if let Some(refused) = &described.refused_after_policy {
        key.push_str(refused);
        key.push('\n');
    }
    match &described.body {
        RequestBody::None => key.push_str("body:none"),
        RequestBody::NotInspected => key.push_str("body:not-inspected"),
        RequestBody::Text(text) => {
            key.push_str("body:");
            key.push_str(&hex::encode(sha2::Sha256::digest(text.as_bytes())));
        }
    }
    key
}

/// JSON and form bodies are shown to policy.
fn is_inspectable(headers: &hyper::HeaderMap) -> bool {
    let essence = headers::essence(&content_type(headers));
    headers::is_json(&essence) || essence == "application/x-www-form-urlencoded"
}

fn content_type(headers: &hyper::HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase()
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

pub(super) fn ended() -> Response<Out> {
    reply(
        StatusCode::UNAUTHORIZED,
        "grant-ended",
        "this connection's session has ended",
        None,
    )
}

/// An empty body.
pub(super) fn empty() -> Out {
    Empty::new().map_err(|e| match e {}).boxed()
}

fn unauthorized(reason: &str) -> Response<Out> {
    let mut response = reply(StatusCode::UNAUTHORIZED, "unauthorized", reason, None);
    response.headers_mut().insert(
        hyper::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"airlock\""),
    );
    response
}

/// A JSON answer from the gateway itself.
pub(super) fn reply(
    status: StatusCode,
    code: &str,
    reason: &str,
    hint: Option<&str>,
) -> Response<Out> {
    let mut body = json!({ "error": code, "reason": reason, "from": "airlock" });
    if let Some(hint) = hint {
        body["hint"] = hint.into();
    }
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|e| match e {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
