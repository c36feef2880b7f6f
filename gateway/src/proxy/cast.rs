//! A terminal stream (an SSH channel's, a kubectl exec's) as asciicast v2 events,
//! recorded in chunks (`ssh.cast` and `kube.cast` entries, chained like every other
//! entry), and the `.cast` file a recorded stream replays as.
//!
//! Memory is bounded: a chunk is recorded once it holds `CHUNK_BYTES` of data or its
//! oldest event is `CHUNK_AGE` old, and always before input is sent on.

use std::time::{Duration, Instant};

/// Data one chunk holds at most before it is recorded.
const CHUNK_BYTES: usize = 32 * 1024;

/// Age of the oldest event in a chunk past which the next event records it.
const CHUNK_AGE: Duration = Duration::from_secs(1);

/// The events of one channel not yet recorded.
pub(crate) struct Cast {
    start: Instant,
    events: Vec<serde_json::Value>,
    bytes: usize,
    oldest: Option<Instant>,
    /// An incomplete UTF-8 sequence at the end of the last output (or input): the
    /// rest arrives in the next packet.
    carry_out: Vec<u8>,
    carry_in: Vec<u8>,
}

impl Cast {
    pub(crate) fn new() -> Self {
        Cast {
            start: Instant::now(),
            events: Vec::new(),
            bytes: 0,
            oldest: None,
            carry_out: Vec::new(),
            carry_in: Vec::new(),
        }
    }

    /// Output from the upstream. `true` when the chunk should be recorded now.
    pub(crate) fn output(&mut self, data: &[u8]) -> bool {
        let text = take_utf8(&mut self.carry_out, data);
        self.push("o", text)
    }

    /// Input from the agent; the caller records the chunk before sending it on.
    pub(crate) fn input(&mut self, data: &[u8]) {
        let text = take_utf8(&mut self.carry_in, data);
        self.push("i", text);
    }

    /// The terminal was resized.
    pub(crate) fn resize(&mut self, cols: u32, rows: u32) -> bool {
        self.push("r", format!("{cols}x{rows}"))
    }

    fn push(&mut self, code: &str, data: String) -> bool {
        if data.is_empty() {
            return self.full();
        }
        let at = self.start.elapsed().as_secs_f64();
        self.bytes += data.len();
        self.oldest.get_or_insert_with(Instant::now);
        // Milliseconds are what a replay can honour; the record keeps them exact.
        self.events
            .push(serde_json::json!([(at * 1e6).round() / 1e6, code, data]));
        self.full()
    }

    fn full(&self) -> bool {
        self.bytes >= CHUNK_BYTES || self.oldest.is_some_and(|t| t.elapsed() >= CHUNK_AGE)
    }

    /// The events not yet recorded, if any; the chunk starts over.
    pub(crate) fn take(&mut self) -> Option<Vec<serde_json::Value>> {
        self.bytes = 0;
        self.oldest = None;
        (!self.events.is_empty()).then(|| std::mem::take(&mut self.events))
    }
}

/// The text of `data` after what `carry` held, keeping an incomplete UTF-8 sequence at
/// the end for next time. Bytes that are not UTF-8 become U+FFFD: asciicast is text.
fn take_utf8(carry: &mut Vec<u8>, data: &[u8]) -> String {
    carry.extend_from_slice(data);
    let complete = match std::str::from_utf8(carry) {
        Ok(_) => carry.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => carry.len(),
    };
    let rest = carry.split_off(complete);
    let text = String::from_utf8_lossy(carry).into_owned();
    *carry = rest;
    text
}

/// An asciicast v2 file of one recorded stream: the header from its request's
/// terminal (`pty`, if it had one), then every event of its cast entries, in order. Input events are
/// left out unless `with_input`: what a terminal showed is its output.
pub fn replay_cast(
    request: &serde_json::Value,
    chunks: &[serde_json::Value],
    with_input: bool,
) -> String {
    let pty = &request["pty"];
    let header = serde_json::json!({
        "version": 2,
        "width": pty["cols"].as_u64().unwrap_or(80),
        "height": pty["rows"].as_u64().unwrap_or(24),
        "timestamp": request["time_ms"].as_u64().map(|ms| ms / 1000),
        "env": { "TERM": pty["term"].as_str().unwrap_or("xterm") },
    });
    let mut out = header.to_string();
    out.push('\n');
    for chunk in chunks {
        for event in chunk["events"].as_array().into_iter().flatten() {
            if event[1] == "i" && !with_input {
                continue;
            }
            out.push_str(&event.to_string());
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_packets_is_kept_whole() {
        let mut carry = Vec::new();
        let bytes = "é€".as_bytes();
        assert_eq!(take_utf8(&mut carry, &bytes[..1]), "");
        assert_eq!(take_utf8(&mut carry, &bytes[1..3]), "é");
        assert_eq!(take_utf8(&mut carry, &bytes[3..]), "€");
        assert!(carry.is_empty());
        assert_eq!(take_utf8(&mut carry, b"a\xffb"), "a\u{fffd}b");
    }

    #[test]
    fn chunks_are_bounded_and_replay_in_order() {
        let mut cast = Cast::new();
        assert!(!cast.output(b"hello "));
        cast.input(b"ls\r");
        assert!(
            cast.output(&vec![b'x'; CHUNK_BYTES]),
            "a full chunk asks to be recorded"
        );
        let first = cast.take().unwrap();
        assert_eq!(first.len(), 3);
        assert!(cast.take().is_none());
        cast.output(b"bye");
        let second = cast.take().unwrap();
        let request =
            serde_json::json!({ "pty": { "cols": 100, "rows": 30, "term": "xterm-256color" } });
        let file = replay_cast(
            &request,
            &[
                serde_json::json!({ "events": first }),
                serde_json::json!({ "events": second }),
            ],
            false,
        );
        let lines: Vec<serde_json::Value> = file
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["width"], 100);
        assert_eq!(lines[0]["version"], 2);
        let output: String = lines[1..].iter().map(|e| e[2].as_str().unwrap()).collect();
        assert_eq!(output, format!("hello {}bye", "x".repeat(CHUNK_BYTES)));
    }
}
