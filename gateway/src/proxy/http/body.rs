//! Bodies as they cross the gateway: counted (and, where a target opts in, the first
//! bytes kept for the record), told when they end, or fed from a masking task.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use memchr::memmem::Finder;
use tokio::sync::mpsc;

use super::BoxError;

/// What passed through a [`Counted`] body.
#[derive(Default)]
pub(super) struct Tally {
    bytes: AtomicU64,
    /// The first bytes, when the target records bodies.
    kept: Mutex<Vec<u8>>,
    keep: usize,
    /// Why the body failed, if it did (e.g. the agent's chunking was bad).
    failed: Mutex<Option<String>>,
}

impl Tally {
    pub(super) fn keeping(keep: usize) -> Arc<Self> {
        Arc::new(Tally {
            keep,
            ..Tally::default()
        })
    }

    pub(super) fn add(&self, data: &[u8]) {
        self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        if self.keep > 0 {
            let mut kept = self.kept.lock().unwrap();
            let room = self.keep.saturating_sub(kept.len());
            kept.extend_from_slice(&data[..room.min(data.len())]);
        }
    }

    /// Counts bytes that passed without being kept (a stream's).
    pub(super) fn count(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Why the body failed, if it did.
    pub(super) fn failure(&self) -> Option<String> {
        self.failed.lock().unwrap().clone()
    }

    /// The kept bytes as text, if the target records bodies.
    pub(super) fn kept(&self) -> Option<String> {
        (self.keep > 0).then(|| String::from_utf8_lossy(&self.kept.lock().unwrap()).into_owned())
    }
}

/// How a body ended.
pub(super) enum Ending {
    /// Its last frame was read.
    Complete,
    /// It failed, or was dropped unfinished (the agent went away, the grant ended).
    Cut(String),
}

/// A body that counts what passes and calls `on_end` once, when it ends or is dropped.
pub(super) struct Counted<B: Body> {
    inner: B,
    tally: Arc<Tally>,
    on_end: Option<Box<dyn FnOnce(Ending) + Send + Sync>>,
}

impl<B: Body> Counted<B> {
    pub(super) fn new(inner: B, tally: Arc<Tally>) -> Self {
        Counted {
            inner,
            tally,
            on_end: None,
        }
    }

    pub(super) fn on_end(mut self, f: impl FnOnce(Ending) + Send + Sync + 'static) -> Self {
        self.on_end = Some(Box::new(f));
        self
    }

    fn end(&mut self, ending: Ending) {
        if let Some(f) = self.on_end.take() {
            f(ending);
        }
    }
}

impl<B: Body> Drop for Counted<B> {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended, so its last poll may
        // never come.
        let ending = if self.inner.is_end_stream() {
            Ending::Complete
        } else {
            Ending::Cut("the body was not read to its end".into())
        };
        self.end(ending);
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.tally.add(data);
                }
                if this.inner.is_end_stream() {
                    this.end(Ending::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                *this.tally.failed.lock().unwrap() = Some(e.to_string());
                this.end(Ending::Cut(e.to_string()));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => {
                this.end(Ending::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body whose first chunks were already read (to show policy), then the rest.
pub(super) struct Prefixed<B> {
    pub(super) read: std::collections::VecDeque<Bytes>,
    pub(super) rest: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(chunk) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|frame| frame.map(|r| r.map_err(Into::into)))
    }
}

/// The gateway's secrets as a response is searched for them.
pub(super) type Secrets = Arc<[Finder<'static>]>;

/// Searchers for `secrets`, built once per upstream.
pub(super) fn secrets(secrets: Vec<Vec<u8>>) -> Secrets {
    secrets
        .iter()
        .map(|s| Finder::new(s).into_owned())
        .collect()
}

/// A body with every occurrence of the gateway's secrets (its upstream credential,
/// as it was sent) overwritten with as many `*`: an upstream that reflects its
/// request (an echo, a debug page, an error) must not hand the agent a credential that
/// works without Airlock. The length stays the same, so `Content-Length` holds. A tail
/// that could be the start of a secret is held until the next chunk shows what it is.
pub(super) struct Scrub<B> {
    inner: B,
    secrets: Secrets,
    held: Vec<u8>,
    ended: bool,
}

impl<B> Scrub<B> {
    pub(super) fn new(inner: B, secrets: Secrets) -> Self {
        Scrub {
            inner,
            secrets,
            held: Vec::new(),
            ended: false,
        }
    }
}

/// Overwrites each secret in `bytes`; returns how many bytes at the end could begin
/// one (to be held back).
pub(super) fn scrub(bytes: &mut [u8], secrets: &[Finder<'static>]) -> usize {
    for finder in secrets {
        let secret = finder.needle();
        let mut at = 0;
        while let Some(found) = finder.find(&bytes[at..]) {
            let start = at + found;
            bytes[start..start + secret.len()].fill(b'*');
            at = start + secret.len();
        }
    }
    secrets
        .iter()
        .map(|finder| {
            let secret = finder.needle();
            (1..secret.len().min(bytes.len() + 1))
                .rev()
                .find(|&n| bytes.ends_with(&secret[..n]))
                .unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

impl<B> Body for Scrub<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(None) => {
                    this.ended = true;
                    let rest = std::mem::take(&mut this.held);
                    if rest.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(rest)))));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        // Trailers: dropped, as the gateway sends none.
                        continue;
                    };
                    let mut bytes = std::mem::take(&mut this.held);
                    bytes.extend_from_slice(&data);
                    let hold = scrub(&mut bytes, &this.secrets);
                    this.held = bytes.split_off(bytes.len() - hold);
                    if !bytes.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))));
                    }
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A body fed chunk by chunk from another task (a masking task); an `Err` ends it as
/// failed, so the agent sees a cut transfer, never a clean end.
pub(super) struct ChannelBody(pub(super) mpsc::Receiver<Result<Bytes, BoxError>>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test]
    async fn counted_bodies_count_keep_and_end_once() {
        let tally = Tally::keeping(4);
        let (tx, rx) = std::sync::mpsc::channel();
        let body = Counted::new(Full::new(Bytes::from_static(b"hello world")), tally.clone())
            .on_end(move |e| tx.send(matches!(e, Ending::Complete)).unwrap());
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello world");
        assert_eq!(tally.bytes(), 11);
        assert_eq!(tally.kept().as_deref(), Some("hell"));
        assert_eq!(
            rx.try_iter().collect::<Vec<_>>(),
            [true],
            "ended once, complete"
        );
    }

    #[tokio::test]
    async fn a_body_read_to_its_last_frame_ended_complete() {
        // hyper stops at the frame after which the body says it has ended.
        let (tx, rx) = std::sync::mpsc::channel();
        let mut body = Counted::new(Full::new(Bytes::from_static(b"x")), Tally::keeping(0))
            .on_end(move |e| tx.send(matches!(e, Ending::Complete)).unwrap());
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [true]);
        let (tx, rx) = std::sync::mpsc::channel();
        let empty = Counted::new(http_body_util::Empty::<Bytes>::new(), Tally::keeping(0))
            .on_end(move |e| tx.send(matches!(e, Ending::Complete)).unwrap());
        drop(empty);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [true]);
    }

    #[tokio::test]
    async fn secrets_are_overwritten_even_across_chunks() {
        let secrets = secrets(vec![b"TOKEN-1234567".to_vec()]);
        let mut plain = b"a TOKEN-1234567 b TOKEN-1234567".to_vec();
        assert_eq!(scrub(&mut plain, &secrets), 0);
        assert_eq!(&plain, b"a ************* b *************");
        let mut tail = b"x TOKEN-12".to_vec();
        assert_eq!(scrub(&mut tail, &secrets), 8, "a possible start is held");
        // Split anywhere, the secret never leaves, and the rest leaves whole.
        let text = b"echo: Bearer TOKEN-1234567 done TOKEN-123 end".to_vec();
        for cut in 1..text.len() {
            let chunks = Chunks(
                [&text[..cut], &text[cut..]]
                    .map(Bytes::copy_from_slice)
                    .into_iter()
                    .collect(),
            );
            let out = Scrub::new(chunks, secrets.clone())
                .collect()
                .await
                .unwrap()
                .to_bytes();
            assert_eq!(
                &out[..],
                b"echo: Bearer ************* done TOKEN-123 end",
                "cut at {cut}"
            );
        }
    }

    /// A body of ready chunks.
    struct Chunks(std::collections::VecDeque<Bytes>);

    impl Body for Chunks {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
        }
    }

    #[test]
    fn a_dropped_body_ends_as_cut() {
        let (tx, rx) = std::sync::mpsc::channel();
        let body = Counted::new(Full::new(Bytes::from_static(b"x")), Tally::keeping(0))
            .on_end(move |e| tx.send(matches!(e, Ending::Cut(_))).unwrap());
        drop(body);
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), [true]);
        assert_eq!(Tally::keeping(0).kept(), None);
    }
}
