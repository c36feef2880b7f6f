//! kubectl's streams over WebSocket, relayed message by message once policy allowed
//! the request that opened them.
//!
//! `exec` and `attach` speak the `channel.k8s.io` protocols: each binary message is
//! one byte naming a stream (0 stdin, 1 stdout, 2 stderr, 3 the exit status, 4 a
//! terminal resize, 255 in v5 closing one stream), then its data. What the agent types
//! is recorded before it is sent on; what comes back is masked line by line where a
//! module masks the target, and recorded as the agent saw it, as asciicast (replayed
//! with `airlock sessions replay`). The agent writes only stdin, resizes and v5's
//! close: a message on any other stream ends the exchange.
//!
//! `portforward` is relayed as it is (kubectl tunnels SPDY through the WebSocket):
//! its bytes are the pod's own protocol, which no module reads, so it is relayed only
//! where policy allows it and no module masks the target.

use std::time::Duration;

use bytes::{BufMut as _, Bytes, BytesMut};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::proxy::cast::Cast;
use crate::proxy::line_mask::LineMask;
use crate::proxy::session::CutSignal;

/// The `channel.k8s.io` versions the gateway reads, newest first: v2 to v5 frame
/// messages alike (v3 adds resizes, v4 a JSON exit status, v5 closing one stream).
/// The base64 variants are not read.
const CHANNEL_PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
];

/// Port-forward's protocols: SPDY tunnelled through the WebSocket (kubectl 1.31+), and
/// the API server's own WebSocket port-forward.
const PORTFORWARD_PROTOCOLS: &[&str] = &[
    "SPDY/3.1+portforward.k8s.io",
    "v4.portforward.k8s.io",
    "portforward.k8s.io",
];

/// How long, once one side has closed, the other has to finish its close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const STATUS: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE_STREAM: u8 = 255;

/// Which streams a WebSocket request opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Streams {
    /// exec or attach.
    Channels,
    /// portforward.
    PortForward,
}

impl Streams {
    /// What the request for `subresource` opens, if it opens streams at all.
    pub(crate) fn of(subresource: Option<&str>) -> Option<Self> {
        match subresource {
            Some("exec" | "attach") => Some(Streams::Channels),
            Some("portforward") => Some(Streams::PortForward),
            _ => None,
        }
    }

    /// Of the subprotocols the agent offers, those the gateway reads, in the agent's
    /// order: the upstream is offered only these.
    pub(crate) fn readable(self, offered: &[String]) -> Vec<String> {
        let known = match self {
            Streams::Channels => CHANNEL_PROTOCOLS,
            Streams::PortForward => PORTFORWARD_PROTOCOLS,
        };
        offered
            .iter()
            .filter(|p| known.contains(&p.as_str()))
            .cloned()
            .collect()
    }
}

/// Where a relayed stream's record goes: the session it belongs to.
pub(crate) trait StreamRecord: Send + Sync {
    /// Records a chunk of the stream's cast; false once the record failed.
    fn cast(&self, events: Vec<serde_json::Value>) -> impl Future<Output = bool> + Send;
}

/// How a relayed stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// A side closed it.
    Done,
    /// The grant ended, or the record failed.
    Cut(String),
    /// Output could not be masked: the rest is withheld.
    Withheld(String),
    /// The agent broke the protocol.
    Refused(String),
    /// A connection failed.
    Lost(String),
}

/// What a relayed stream did, for its result entry.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// Bytes of stdin (or, port-forwarded, of everything) the agent sent.
    pub bytes_in: u64,
    /// Bytes of output the agent was sent, as masked.
    pub bytes_out: u64,
    /// The command's exit code, from the status the upstream sent (v4 and later).
    pub exit_code: Option<i64>,
    pub ending: Ending,
}

/// One stream's two WebSockets and what the relay keeps.
pub(crate) struct Relay<A, U> {
    pub agent: WebSocketStream<A>,
    pub upstream: WebSocketStream<U>,
    pub streams: Streams,
    /// Output masking, where a module masks the target (stdout, stderr, the status).
    pub mask: Option<LineMask>,
}

impl<A, U> Relay<A, U>
where
    A: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Relays until either side closes, the grant ends (`cut`), output cannot be
    /// masked or the agent breaks the protocol; both sides are then told and closed.
    pub(crate) async fn run(mut self, mut cut: CutSignal, record: &impl StreamRecord) -> Outcome {
        let mut cast = Cast::new();
        let mut out = Outcome {
            bytes_in: 0,
            bytes_out: 0,
            exit_code: None,
            ending: Ending::Done,
        };
        // The cut is watched outside the relay, so a side that stops reading cannot
        // hold the stream open past its grant.
        let ending = tokio::select! {
            ending = self.relay(&mut cast, &mut out, record) => ending,
            reason = cut.ended() => Ending::Cut(reason),
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, self.end(&ending)).await;
        if let Some(events) = cast.take() {
            record.cast(events).await;
        }
        out.ending = ending;
        out
    }

    async fn relay(
        &mut self,
        cast: &mut Cast,
        out: &mut Outcome,
        record: &impl StreamRecord,
    ) -> Ending {
        let mut agent_open = true;
        let mut close_by = tokio::time::Instant::now();
        loop {
            tokio::select! {
                message = self.agent.next(), if agent_open => match message {
                    Some(Ok(Message::Close(_))) | None => {
                        // The agent is done: the upstream hears so, and finishes.
                        agent_open = false;
                        close_by = tokio::time::Instant::now() + CLOSE_WAIT;
                        let _ = self.upstream.close(None).await;
                    }
                    Some(Ok(message)) => {
                        if let Err(end) = self.agent_sent(message, cast, out, record).await {
                            return end;
                        }
                    }
                    Some(Err(e)) => return Ending::Lost(format!("the agent's WebSocket: {e}")),
                },
                message = self.upstream.next() => match message {
                    Some(Ok(Message::Close(_))) | None => {
                        return match self.flush(cast, out, record).await {
                            Ok(()) => Ending::Done,
                            Err(end) => end,
                        };
                    }
                    Some(Ok(message)) => {
                        if let Err(end) = self.upstream_sent(message, cast, out, record).await {
                            return end;
                        }
                    }
                    Some(Err(e)) => {
                        let _ = self.flush(cast, out, record).await;
                        return Ending::Lost(format!("the upstream's WebSocket: {e}"));
                    }
                },
                // A closed agent leaves the upstream a moment to finish, not forever.
                () = tokio::time::sleep_until(close_by), if !agent_open => return Ending::Done,
            }
        }
    }

    /// One message from the agent: stdin is recorded before it is sent on.
    async fn agent_sent(
        &mut self,
        message: Message,
        cast: &mut Cast,
        out: &mut Outcome,
        record: &impl StreamRecord,
    ) -> Result<(), Ending> {
        let data = match message {
            Message::Binary(data) => data,
            // Answered by the WebSocket itself.
            Message::Ping(_) | Message::Pong(_) => return Ok(()),
            Message::Text(_) => {
                return Err(Ending::Refused(
                    "a text message: these streams carry binary messages".into(),
                ));
            }
            Message::Close(_) | Message::Frame(_) => return Ok(()),
        };
        let message = match self.streams {
            Streams::PortForward => {
                out.bytes_in += data.len() as u64;
                Message::Binary(data)
            }
            Streams::Channels => match data.first() {
                Some(&STDIN) => {
                    out.bytes_in += data.len() as u64 - 1;
                    cast.input(&data[1..]);
                    if let Some(events) = cast.take()
                        && !record.cast(events).await
                    {
                        return Err(Ending::Cut("record unavailable".into()));
                    }
                    Message::Binary(data)
                }
                Some(&RESIZE) => {
                    // Read, and sent on as read: the upstream parses nothing the
                    // gateway did not.
                    let size: Resize = serde_json::from_slice(&data[1..]).map_err(|e| {
                        Ending::Refused(format!("a terminal resize that is not one: {e}"))
                    })?;
                    cast.resize(size.width.into(), size.height.into());
                    let mut sent = BytesMut::with_capacity(40);
                    sent.put_u8(RESIZE);
                    sent.put_slice(
                        format!(r#"{{"Width":{},"Height":{}}}"#, size.width, size.height)
                            .as_bytes(),
                    );
                    Message::Binary(sent.freeze())
                }
                Some(&CLOSE_STREAM) if data[..] == [CLOSE_STREAM, STDIN] => Message::Binary(data),
                Some(&channel) => {
                    return Err(Ending::Refused(format!(
                        "a message on stream {channel}, which is not the agent's to write"
                    )));
                }
                None => return Err(Ending::Refused("an empty message".into())),
            },
        };
        self.upstream
            .send(message)
            .await
            .map_err(|e| Ending::Lost(format!("the upstream's WebSocket: {e}")))
    }

    /// One message from the upstream: output masked and recorded, then sent on.
    async fn upstream_sent(
        &mut self,
        message: Message,
        cast: &mut Cast,
        out: &mut Outcome,
        record: &impl StreamRecord,
    ) -> Result<(), Ending> {
        let Message::Binary(data) = message else {
            // Pings are answered by the WebSocket; text is not these protocols'.
            return Ok(());
        };
        if self.streams == Streams::PortForward {
            out.bytes_out += data.len() as u64;
            return self.send_agent(data).await;
        }
        match data.first().copied() {
            Some(stream @ (STDOUT | STDERR)) => {
                self.output(stream, &data[1..], cast, out, record).await
            }
            Some(STATUS) => {
                // Output first (its last lines may wait in the mask), then the status.
                self.flush(cast, out, record).await?;
                out.exit_code = exit_code(&data[1..]).or(out.exit_code);
                self.output(STATUS, &data[1..], cast, out, record).await?;
                self.flush(cast, out, record).await
            }
            // A stream's close names the stream, and carries nothing else.
            Some(CLOSE_STREAM) if data.len() == 2 => self.send_agent(data).await,
            // Nothing else is the upstream's to send; it goes no further.
            _ => Ok(()),
        }
    }

    /// Output on `stream`, masked where it must be, into the cast and to the agent.
    async fn output(
        &mut self,
        stream: u8,
        data: &[u8],
        cast: &mut Cast,
        out: &mut Outcome,
        record: &impl StreamRecord,
    ) -> Result<(), Ending> {
        let shown = match &mut self.mask {
            Some(mask) => mask
                .feed(mask_stream(stream), data)
                .await
                .map_err(|e| Ending::Withheld(e.to_string()))?,
            None => data.to_vec(),
        };
        self.shown(stream, &shown, cast, out, record).await
    }

    /// Sends `shown` on `stream`, recorded first into the cast (the status is not
    /// terminal output).
    async fn shown(
        &mut self,
        stream: u8,
        shown: &[u8],
        cast: &mut Cast,
        out: &mut Outcome,
        record: &impl StreamRecord,
    ) -> Result<(), Ending> {
        if shown.is_empty() {
            return Ok(());
        }
        out.bytes_out += shown.len() as u64;
        if stream != STATUS
            && cast.output(shown)
            && let Some(events) = cast.take()
            && !record.cast(events).await
        {
            return Err(Ending::Cut("record unavailable".into()));
        }
        let mut message = BytesMut::with_capacity(shown.len() + 1);
        message.put_u8(stream);
        message.put_slice(shown);
        self.send_agent(message.freeze()).await
    }

    /// The masked rest of every output stream (lines not yet ended).
    async fn flush(
        &mut self,
        cast: &mut Cast,
        out: &mut Outcome,
        record: &impl StreamRecord,
    ) -> Result<(), Ending> {
        for stream in [STDOUT, STDERR, STATUS] {
            let Some(mask) = &mut self.mask else {
                return Ok(());
            };
            let rest = mask
                .finish(mask_stream(stream))
                .await
                .map_err(|e| Ending::Withheld(e.to_string()))?;
            self.shown(stream, &rest, cast, out, record).await?;
        }
        Ok(())
    }

    async fn send_agent(&mut self, data: Bytes) -> Result<(), Ending> {
        self.agent
            .send(Message::Binary(data))
            .await
            .map_err(|e| Ending::Lost(format!("the agent's WebSocket: {e}")))
    }

    /// Tells the agent why the stream ended, where it did not simply end, and closes
    /// both sides (the caller bounds how long this may take).
    async fn end(&mut self, ending: &Ending) {
        let (code, said) = match ending {
            Ending::Done | Ending::Lost(_) => (CloseCode::Normal, None),
            Ending::Cut(reason) => (
                CloseCode::Policy,
                Some(format!("airlock: the grant ended: {reason}")),
            ),
            Ending::Withheld(reason) => (
                CloseCode::Policy,
                Some(format!("airlock: output withheld: {reason}")),
            ),
            Ending::Refused(reason) => (CloseCode::Policy, Some(format!("airlock: {reason}"))),
        };
        if let (Some(said), Streams::Channels) = (&said, self.streams) {
            let mut message = BytesMut::with_capacity(said.len() + 2);
            message.put_u8(STDERR);
            message.put_slice(said.as_bytes());
            message.put_u8(b'\n');
            let _ = self.agent.send(Message::Binary(message.freeze())).await;
        }
        let frame = CloseFrame {
            code,
            reason: close_reason(said.as_deref().unwrap_or("")).into(),
        };
        let _ = self.agent.close(Some(frame)).await;
        let _ = self.upstream.close(None).await;
    }
}

/// A resize as kubectl sends it.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    #[serde(rename = "Width")]
    width: u16,
    #[serde(rename = "Height")]
    height: u16,
}

/// The mask's stream for a channel: stdout, stderr and the status each have their
/// own unfinished line.
fn mask_stream(channel: u8) -> usize {
    match channel {
        STDOUT => 0,
        STDERR => 1,
        _ => 2,
    }
}

/// The exit code in a v4+ status: `Success` is 0, a `NonZeroExitCode` names its code.
fn exit_code(status: &[u8]) -> Option<i64> {
    let status: serde_json::Value = serde_json::from_slice(status).ok()?;
    if status["status"] == "Success" {
        return Some(0);
    }
    status["details"]["causes"]
        .as_array()?
        .iter()
        .find(|c| c["reason"] == "ExitCode")
        .and_then(|c| c["message"].as_str()?.parse().ok())
}

/// A close frame's reason holds at most 123 bytes.
fn close_reason(text: &str) -> String {
    let mut end = text.len().min(123);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_protocols_the_gateway_reads_are_offered_upstream() {
        let offered: Vec<String> = [
            "v5.channel.k8s.io",
            "base64.channel.k8s.io",
            "channel.k8s.io",
            "v4.channel.k8s.io",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            Streams::Channels.readable(&offered),
            ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        );
        assert!(Streams::PortForward.readable(&offered).is_empty());
        assert_eq!(Streams::of(Some("exec")), Some(Streams::Channels));
        assert_eq!(Streams::of(Some("log")), None);
    }

    #[test]
    fn exit_codes_are_read_from_the_status() {
        assert_eq!(exit_code(br#"{"metadata":{},"status":"Success"}"#), Some(0));
        let failed = br#"{"metadata":{},"status":"Failure","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"2"}]}}"#;
        assert_eq!(exit_code(failed), Some(2));
        assert_eq!(exit_code(b"not json"), None);
        assert_eq!(close_reason(&"é".repeat(100)).len(), 122);
    }
}
