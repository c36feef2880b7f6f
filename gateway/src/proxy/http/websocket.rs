//! WebSocket upgrades through the gateway, for the streams a Kubernetes target's layer
//! relays (kubectl exec, attach, port-forward). The gateway is an endpoint on each
//! side, never a pipe: the upstream gets a handshake of the gateway's own (its own
//! key, only the subprotocols the gateway reads, no extensions, so every message is
//! one it can read), and the agent's is answered only once the upstream's succeeded,
//! with the subprotocol the upstream chose.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{CONNECTION, HeaderMap, HeaderValue, UPGRADE};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_util::task::TaskTracker;

use super::HttpServices;
use super::mask::{Plan, Withheld};
use super::service::{Out, ResultEntry, Session, reply};
use crate::policy::types::GrantContext;
use crate::proxy::kube::{Relay, StreamRecord, Streams};
use crate::proxy::line_mask::LineMask;
use crate::record::{EventKind, Write};

/// The largest message either side may send: kubectl writes stdin and reads output
/// in pieces of 32 KiB, and a message is held whole while it is masked.
const MAX_MESSAGE: usize = 1024 * 1024;

/// A stream the agent asked for, with its connection's upgrade.
pub(super) struct AgentStream {
    /// The agent's `Sec-WebSocket-Key`, which its accept value answers.
    pub agent_key: String,
    /// The gateway's handshake with the upstream.
    pub offer: Handshake,
    pub upgrade: OnUpgrade,
    pub streams: Streams,
    /// The stream's number in its session (its cast entries carry it).
    pub number: u32,
}

/// The gateway's handshake with the upstream.
pub(super) struct Handshake {
    key: String,
    offered: Vec<String>,
}

impl Handshake {
    /// A handshake of the gateway's own, offering `protocols`.
    pub(super) fn new(protocols: Vec<String>) -> Self {
        Handshake {
            key: generate_key(),
            offered: protocols,
        }
    }

    /// Puts the handshake on the upstream request's headers.
    pub(super) fn put_on(&self, headers: &mut HeaderMap) {
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("sec-websocket-version", HeaderValue::from_static("13"));
        if let Ok(value) = HeaderValue::from_str(&self.key) {
            headers.insert("sec-websocket-key", value);
        }
        if let Ok(value) = HeaderValue::from_str(&self.offered.join(", ")) {
            headers.insert("sec-websocket-protocol", value);
        }
    }

    /// The subprotocol the upstream chose, if its answer completes this handshake.
    fn accepted(&self, headers: &HeaderMap) -> Result<String, &'static str> {
        let accept = headers
            .get("sec-websocket-accept")
            .and_then(|v| v.to_str().ok());
        if accept != Some(derive_accept_key(self.key.as_bytes()).as_str()) {
            return Err("its Sec-WebSocket-Accept does not answer the gateway's key");
        }
        if headers.contains_key("sec-websocket-extensions") {
            return Err("it chose an extension the gateway did not offer");
        }
        let chosen = headers
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .ok_or("it chose no subprotocol")?;
        self.offered
            .iter()
            .find(|p| *p == chosen)
            .cloned()
            .ok_or("it chose a subprotocol the gateway did not offer")
    }
}

/// The agent's side of a completed handshake.
fn answer(agent_key: &str, protocol: &str) -> Response<Out> {
    let mut response = Response::new(super::service::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(agent_key.as_bytes())) {
        headers.insert("sec-websocket-accept", accept);
    }
    if let Ok(protocol) = HeaderValue::from_str(protocol) {
        headers.insert("sec-websocket-protocol", protocol);
    }
    response
}

/// One side's upgraded connection, as a WebSocket.
async fn open(
    upgrade: OnUpgrade,
    role: Role,
) -> Result<WebSocketStream<TokioIo<Upgraded>>, hyper::Error> {
    let io = TokioIo::new(upgrade.await?);
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE));
    Ok(WebSocketStream::from_raw_socket(io, role, Some(config)).await)
}

impl Session {
    /// The upstream switched protocols: the agent is answered in kind, and the stream
    /// is relayed on one of the connection's tasks (its session lasts until they end).
    pub(super) async fn upgraded(
        self: &Arc<Self>,
        services: &HttpServices,
        stream: AgentStream,
        response: Response<Incoming>,
        masking: Option<GrantContext>,
        result: ResultEntry,
        tasks: &TaskTracker,
    ) -> Result<Response<Out>, Response<Out>> {
        let status = response.status();
        let protocol = match stream.offer.accepted(response.headers()) {
            Ok(protocol) => protocol,
            Err(why) => {
                let error = format!("the upstream's WebSocket handshake: {why}");
                result.record(Some(status), Plan::Pass, Some(error.clone()));
                return Err(reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream-failed",
                    &error,
                    None,
                ));
            }
        };
        let (mask, plan) = match masking {
            None => (None, Plan::Pass),
            Some(context) => {
                let policy = services.proxy.policy.clone();
                match LineMask::for_target(policy, context, "text/plain", 3) {
                    // Port-forwarded bytes are refused before policy where masking
                    // applies; a bundle that changed since then withholds them too.
                    Some(mask) if stream.streams == Streams::Channels => (Some(mask), Plan::Lines),
                    _ => {
                        let why = Withheld::Upstream("the policy bundle changed".into());
                        return Err(result.withhold(status, Plan::Lines, why));
                    }
                }
            }
        };
        let Some(cut) = self.core.lock().await.as_ref().map(|c| c.cut_signal()) else {
            return Err(super::service::ended());
        };
        let answer = answer(&stream.agent_key, &protocol);
        let session = self.clone();
        tasks.spawn(async move {
            let agent = open(stream.upgrade, Role::Server).await;
            let upstream = open(hyper::upgrade::on(response), Role::Client).await;
            let (agent, upstream) = match (agent, upstream) {
                (Ok(agent), Ok(upstream)) => (agent, upstream),
                (Err(e), _) | (_, Err(e)) => {
                    result.record(Some(status), plan, Some(format!("the upgrade failed: {e}")));
                    return;
                }
            };
            let relay = Relay {
                agent,
                upstream,
                streams: stream.streams,
                mask,
            };
            let record = StreamCast {
                session,
                number: stream.number,
            };
            let outcome = relay.run(cut, &record).await;
            result.streamed(status, plan, outcome);
        });
        Ok(answer)
    }
}

/// Records a stream's cast in its session.
struct StreamCast {
    session: Arc<Session>,
    number: u32,
}

impl StreamRecord for StreamCast {
    async fn cast(&self, events: Vec<serde_json::Value>) -> bool {
        let mut guard = self.session.core.lock().await;
        let Some(core) = guard.as_mut() else {
            return false;
        };
        let detail = json!({
            "session": core.session_id(),
            "stream": self.number,
            "events": events,
        });
        let event = core.event(EventKind::KubeCast, detail);
        match core.record(Write::event(event)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "a Kubernetes stream cannot be recorded; it is cut");
                false
            }
        }
    }
}
