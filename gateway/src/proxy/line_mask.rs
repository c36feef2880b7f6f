//! Masking of streamed text: where a masking module applies to the target, a stream
//! reaches the agent only as masked text, whole lines at a time (a line longer than
//! `MAX_LINE` is masked in pieces of that size). Used for an SSH command's stdout and
//! stderr, and for streamed HTTP responses (server-sent events, chunked logs, watches).
//!
//! Interactive shells are not masked: a terminal's stream is escape sequences and
//! redraws, not lines of text a module could read (the README says so).

use std::sync::Arc;

use crate::policy::types::{Body, GrantContext};
use crate::policy::{ActivePolicy, MaskError, PolicySet};

/// The longest line masked as one; longer ones are masked in pieces this size.
const MAX_LINE: usize = 16 * 1024;

/// One exchange's masking: the set in force when it started, and the unfinished line
/// of each of its streams (SSH: stdout and stderr).
pub(crate) struct LineMask {
    policy: Arc<ActivePolicy>,
    set: Arc<PolicySet>,
    context: GrantContext,
    /// What modules are told the text is.
    content_type: String,
    pending: Vec<Vec<u8>>,
}

impl LineMask {
    /// Masking for `streams` streams of `content_type` text under this grant, if some
    /// module masks its target.
    pub(crate) fn for_target(
        policy: Arc<ActivePolicy>,
        context: GrantContext,
        content_type: &str,
        streams: usize,
    ) -> Option<Self> {
        let set = policy.current();
        set.masks(&context.target).then(|| LineMask {
            policy,
            set,
            context,
            content_type: content_type.to_string(),
            pending: vec![Vec::new(); streams],
        })
    }

    /// The masked text of the whole lines `data` completes on `stream`; an unfinished
    /// line waits for the rest.
    pub(crate) async fn feed(&mut self, stream: usize, data: &[u8]) -> Result<Vec<u8>, MaskError> {
        let pending = &mut self.pending[stream];
        pending.extend_from_slice(data);
        let complete = match pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if pending.len() >= MAX_LINE => piece_len(pending),
            None => return Ok(Vec::new()),
        };
        let rest = pending.split_off(complete);
        let text = std::mem::replace(pending, rest);
        self.mask(text).await
    }

    /// The masked text of what is left on `stream` once it ends.
    pub(crate) async fn finish(&mut self, stream: usize) -> Result<Vec<u8>, MaskError> {
        let text = std::mem::take(&mut self.pending[stream]);
        self.mask(text).await
    }

    async fn mask(&self, bytes: Vec<u8>) -> Result<Vec<u8>, MaskError> {
        if bytes.is_empty() {
            return Ok(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len());
        // Pieces of at most MAX_LINE, so a module is never handed an unbounded text.
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(piece_len(rest));
            rest = after;
            let text = String::from_utf8_lossy(piece).into_owned();
            let set = self.set.clone();
            let context = self.context.clone();
            let body = Body {
                content_type: self.content_type.clone(),
                text,
            };
            let masked = self
                .policy
                .run(&self.context.agent.id, move |deadline| {
                    set.mask_body(&context, body, deadline)
                })
                .await
                .unwrap_or_else(|refusal| Err(MaskError::from(refusal)))?;
            out.extend_from_slice(masked.text.as_bytes());
        }
        Ok(out)
    }
}

/// How much of `bytes` to mask as one piece: all of it up to `MAX_LINE`, else up to
/// the last line end or space within `MAX_LINE`, so a value (an email, a token) is cut
/// only when it alone is longer than that.
fn piece_len(bytes: &[u8]) -> usize {
    if bytes.len() <= MAX_LINE {
        return bytes.len();
    }
    bytes[..MAX_LINE]
        .iter()
        .rposition(|b| b.is_ascii_whitespace())
        .map_or(MAX_LINE, |i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lines_are_cut_at_whitespace_within_the_bound() {
        assert_eq!(piece_len(b"short"), 5);
        let mut long = vec![b'a'; MAX_LINE - 10];
        long.extend_from_slice(b" alice@example.com and more");
        long.extend(vec![b'b'; MAX_LINE]);
        assert_eq!(
            piece_len(&long),
            MAX_LINE - 9,
            "cut before the email, not inside it"
        );
        assert_eq!(piece_len(&vec![b'x'; MAX_LINE * 2]), MAX_LINE);
    }
}
