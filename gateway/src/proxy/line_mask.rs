//! Masking of streamed text: where a masking module applies to the target, a stream
//! reaches the agent only as masked text, whole lines at a time. A line is never cut
//! for its module (a cut could split the value it would mask, wherever the agent chose
//! to put it): one longer than `MAX_LINE` ends the stream, withheld. Used for an SSH
//! command's stdout and stderr, streamed HTTP responses (server-sent events, chunked
//! logs, watches) and a Kubernetes exec's output.
//!
//! Interactive shells are not masked: a terminal's stream is escape sequences and
//! redraws, not lines of text a module could read (the README says so).

use std::sync::Arc;

use crate::policy::types::{Body, GrantContext};
use crate::policy::{ActivePolicy, MaskError, PolicySet};

/// The longest line masked; a longer one is withheld, with the rest of its stream.
const MAX_LINE: usize = 1024 * 1024;

/// Why a stream's text could not be masked: nothing more of it is released.
#[derive(Debug, thiserror::Error)]
pub(crate) enum LineMaskError {
    #[error(transparent)]
    Mask(#[from] MaskError),
    #[error(
        "a line over {MAX_LINE} bytes, which cannot be masked without cutting it; the rest is withheld"
    )]
    TooLong,
}

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
    pub(crate) async fn feed(
        &mut self,
        stream: usize,
        data: &[u8],
    ) -> Result<Vec<u8>, LineMaskError> {
        let pending = &mut self.pending[stream];
        pending.extend_from_slice(data);
        let complete = match pending.iter().rposition(|&b| b == b'\n') {
            Some(i) => i + 1,
            None if pending.len() > MAX_LINE => return Err(LineMaskError::TooLong),
            None => return Ok(Vec::new()),
        };
        if pending.len() - complete > MAX_LINE {
            return Err(LineMaskError::TooLong);
        }
        let rest = pending.split_off(complete);
        let text = std::mem::replace(pending, rest);
        self.mask(text).await
    }

    /// The masked text of what is left on `stream` once it ends.
    pub(crate) async fn finish(&mut self, stream: usize) -> Result<Vec<u8>, LineMaskError> {
        let text = std::mem::take(&mut self.pending[stream]);
        self.mask(text).await
    }

    async fn mask(&self, bytes: Vec<u8>) -> Result<Vec<u8>, LineMaskError> {
        if bytes.is_empty() {
            return Ok(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len());
        // Whole lines, at most MAX_LINE at a time, so a module is never handed an
        // unbounded text.
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (piece, after) = rest.split_at(piece_len(rest)?);
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

/// How much of `bytes` to mask as one piece: all of it up to `MAX_LINE`, else the whole
/// lines within `MAX_LINE`; a line longer than that is refused, never cut.
fn piece_len(bytes: &[u8]) -> Result<usize, LineMaskError> {
    if bytes.len() <= MAX_LINE {
        return Ok(bytes.len());
    }
    bytes[..=MAX_LINE]
        .iter()
        .rposition(|&b| b == b'\n')
        .map(|i| i + 1)
        .ok_or(LineMaskError::TooLong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_masked_whole_or_refused() {
        assert_eq!(piece_len(b"short").unwrap(), 5);
        let mut lines = vec![b'a'; MAX_LINE - 10];
        lines.extend_from_slice(b"\ncard 4111 1111 1111 1111\n");
        assert_eq!(
            piece_len(&lines).unwrap(),
            MAX_LINE - 9,
            "cut at the line's end, never inside the next line"
        );
        assert!(matches!(
            piece_len(&vec![b'x'; MAX_LINE + 1]),
            Err(LineMaskError::TooLong)
        ));
        let mut spaced = vec![b' '; MAX_LINE];
        spaced.extend_from_slice(b"+1 555 123 4567\n");
        assert!(
            matches!(piece_len(&spaced), Err(LineMaskError::TooLong)),
            "a long line is not cut at a space either"
        );
    }
}
