//! A framed, buffered PostgreSQL connection (to a client or to the upstream), plain or
//! TLS.
//!
//! Reads fill a buffer with as much as the socket has and hand out whole messages, so a
//! pipeline of messages costs one read, and a read can be abandoned in a `select!`
//! without losing bytes. Writes collect in a buffer that the caller flushes when it is
//! about to wait, so one round trip's messages leave in one write.

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::wire::{self, Message, Startup, WireError};

/// Anything a connection can run over: a TCP socket or a TLS session on one.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Unflushed output above this is written out at once.
const WRITE_HIGH_WATER: usize = 64 << 10;

pub struct Conn {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
}

impl Conn {
    pub fn new(stream: impl Stream + 'static) -> Self {
        Conn {
            stream: Box::new(stream),
            read: BytesMut::with_capacity(16 << 10),
            write: BytesMut::with_capacity(16 << 10),
        }
    }

    /// The stream, to start TLS on. Refused if the peer already sent bytes past the
    /// request: those were sent in the clear and must not be taken as if inside TLS.
    pub fn into_stream(self) -> Result<Box<dyn Stream>, WireError> {
        if !self.read.is_empty() {
            return Err(WireError::Malformed(
                "data sent after the TLS request, before the handshake".into(),
            ));
        }
        Ok(self.stream)
    }

    /// Reads more from the socket. Cancel-safe: bytes read stay in the buffer.
    async fn fill(&mut self, needed: usize) -> Result<(), WireError> {
        self.read
            .reserve(needed.saturating_sub(self.read.len()).max(8 << 10));
        if self.stream.read_buf(&mut self.read).await? == 0 {
            return Err(if self.read.is_empty() {
                WireError::Closed
            } else {
                WireError::Malformed("truncated message".into())
            });
        }
        Ok(())
    }

    /// The client's untagged first message.
    pub async fn read_startup(&mut self) -> Result<Startup, WireError> {
        loop {
            if let Some(startup) = wire::parse_startup(&mut self.read)? {
                return Ok(startup);
            }
            self.fill(8).await?;
        }
    }

    /// The next tagged message. Cancel-safe.
    pub async fn read_message(&mut self) -> Result<Message, WireError> {
        loop {
            match wire::parse_message(&mut self.read)? {
                Ok(message) => return Ok(message),
                Err(needed) => self.fill(needed).await?,
            }
        }
    }

    /// True if a whole message is already buffered, so reading it will not wait.
    pub fn has_message(&self) -> bool {
        self.read.len() >= 5
            && i32::from_be_bytes(self.read[1..5].try_into().expect("4 bytes"))
                .try_into()
                .is_ok_and(|len: usize| self.read.len() > len)
    }

    /// Queues bytes; they leave at the next flush, or now if much is queued.
    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.extend_from_slice(bytes);
        if self.write.len() >= WRITE_HIGH_WATER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Queues a message read from the other side, as it was.
    pub async fn send_message(&mut self, m: &Message) -> std::io::Result<()> {
        wire::put_message(&mut self.write, m);
        if self.write.len() >= WRITE_HIGH_WATER {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes out everything queued.
    pub async fn flush(&mut self) -> std::io::Result<()> {
        if !self.write.is_empty() {
            self.stream.write_all(&self.write).await?;
            self.write.clear();
        }
        self.stream.flush().await
    }

    /// Queues `bytes` and writes everything out.
    /// Ends the connection from this side (FIN): the peer sees it closed at once.
    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.stream.shutdown().await
    }

    pub async fn send_now(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write.extend_from_slice(bytes);
        self.flush().await
    }
}

/// Sends a FATAL ErrorResponse; the caller then closes the connection.
pub(super) async fn fatal(client: &mut Conn, code: &str, message: &str) {
    let _ = client
        .send_now(&wire::error_response("FATAL", code, message, None))
        .await;
}
