//! An HTTP(S) witness (`[record] witness-url`): each checkpoint line is POSTed to an
//! endpoint the operator runs, from a thread of its own, so the record's writer never
//! waits on the network. Checkpoints that cannot be delivered wait in a bounded queue
//! and are retried with backoff; when the queue is full the oldest is dropped (each
//! checkpoint covers every entry before it, so the newest is the one that matters).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::Witness;

/// Checkpoints kept while the endpoint is unreachable.
const QUEUE: usize = 64;
/// One delivery attempt, connection to answer.
const ATTEMPT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long a closing record waits to deliver what is queued.
const FLUSH_AT_CLOSE: Duration = Duration::from_secs(2);

/// Why a witness endpoint was refused or a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("`{0}` is not an http:// or https:// URL with a host")]
    BadUrl(String),
    #[error(
        "`{0}` is plain HTTP to a host that is not loopback: use https:// and name the CA that signs the endpoint's certificate (witness-ca)"
    )]
    PlainOffLoopback(String),
    #[error("`{0}` is https://: set record.witness-ca to the CA file that signs its certificate")]
    NeedsCa(String),
    #[error("`{0}` holds credentials: the endpoint must not need them in its URL")]
    Credentials(String),
    #[error("`{0}` is plain HTTP: witness-ca is only for an https:// endpoint")]
    CaWithoutTls(String),
    #[error("witness-ca {0}")]
    Ca(String),
    #[error("cannot connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("the endpoint answered {0}")]
    Status(StatusCode),
    #[error("no answer within {ATTEMPT:?}")]
    Timeout,
}

/// A checked witness endpoint.
#[derive(Clone)]
pub struct WitnessUrl {
    uri: Uri,
    host: String,
    port: u16,
    tls: Option<Arc<ClientConfig>>,
}

impl std::fmt::Display for WitnessUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.uri.fmt(f)
    }
}

impl WitnessUrl {
    /// `https://` verified against `ca`, or plain `http://` to a loopback host only: a
    /// checkpoint is not secret, but a witness an attacker on the path can answer for
    /// witnesses nothing.
    pub fn parse(url: &str, ca: Option<&Path>) -> Result<Self, WitnessError> {
        let bad = || WitnessError::BadUrl(url.to_string());
        let uri: Uri = url.parse().map_err(|_| bad())?;
        // Credentials in a URL would travel in the Host header, and be logged.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(WitnessError::Credentials(url.to_string()));
        }
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let (tls, default_port) = match uri.scheme_str() {
            Some("https") => {
                let ca = ca.ok_or_else(|| WitnessError::NeedsCa(url.to_string()))?;
                (
                    Some(crate::tls::client_config(ca).map_err(WitnessError::Ca)?),
                    443,
                )
            }
            Some("http") if ca.is_some() => {
                return Err(WitnessError::CaWithoutTls(url.to_string()));
            }
            Some("http") => {
                let loopback =
                    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(WitnessError::PlainOffLoopback(url.to_string()));
                }
                (None, 80)
            }
            _ => return Err(bad()),
        };
        Ok(WitnessUrl {
            port: uri.port_u16().unwrap_or(default_port),
            uri,
            host,
            tls,
        })
    }

    /// POSTs one checkpoint line; a 2xx answer is a delivery.
    async fn post(&self, line: Bytes) -> Result<(), WitnessError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        let request = Request::post(self.uri.path_and_query().map_or("/", |p| p.as_str()))
            .header(
                HOST,
                self.uri
                    .authority()
                    .map_or(self.host.as_str(), |a| a.as_str()),
            )
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(line))
            .expect("a witness request is well-formed");
        let status = match &self.tls {
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| WitnessError::Tls(e.to_string()))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| WitnessError::Tls(e.to_string()))?;
                send(tls, request).await?
            }
            None => send(tcp, request).await?,
        };
        if status.is_success() {
            Ok(())
        } else {
            Err(WitnessError::Status(status))
        }
    }
}

async fn send<S>(stream: S, request: Request<Full<Bytes>>) -> Result<StatusCode, hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender.send_request(request).await?.status())
}

/// What the sender thread and the writer share.
#[derive(Default)]
struct Queue {
    lines: VecDeque<Bytes>,
    closing: bool,
}

/// Delivers checkpoints to a [`WitnessUrl`] from a thread of its own.
pub struct HttpWitness {
    shared: Arc<(Mutex<Queue>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl HttpWitness {
    pub fn start(url: WitnessUrl) -> std::io::Result<Self> {
        let shared = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("airlock-witness".into())
            .spawn(move || deliver(&url, &theirs))?;
        Ok(HttpWitness {
            shared,
            thread: Some(thread),
        })
    }
}

impl std::fmt::Debug for HttpWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queued = self.shared.0.lock().unwrap().lines.len();
        f.debug_struct("HttpWitness")
            .field("queued", &queued)
            .finish()
    }
}

impl Witness for HttpWitness {
    fn witness(&self, line: &[u8]) {
        let (queue, ready) = &*self.shared;
        let mut queue = queue.lock().unwrap();
        if queue.lines.len() == QUEUE {
            queue.lines.pop_front();
            tracing::warn!(
                "the witness endpoint is behind by {QUEUE} checkpoints: the oldest is dropped (the newer ones cover it)"
            );
        }
        queue.lines.push_back(Bytes::copy_from_slice(line));
        ready.notify_one();
    }
}

impl Drop for HttpWitness {
    fn drop(&mut self) {
        let (queue, ready) = &*self.shared;
        queue.lock().unwrap().closing = true;
        ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The sender: the oldest queued checkpoint first, each until delivered; backs off
/// while the endpoint fails; at close, tries what is queued for a bounded time.
fn deliver(url: &WitnessUrl, shared: &(Mutex<Queue>, Condvar)) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the witness sender: no checkpoint reaches {url}");
            return;
        }
    };
    let (queue, ready) = shared;
    let mut backoff = Duration::from_secs(1);
    loop {
        let (line, closing) = {
            let mut q = queue.lock().unwrap();
            while q.lines.is_empty() && !q.closing {
                q = ready.wait(q).unwrap();
            }
            match q.lines.front() {
                Some(line) => (line.clone(), q.closing),
                None => return,
            }
        };
        let limit = if closing { FLUSH_AT_CLOSE } else { ATTEMPT };
        let result = runtime
            .block_on(async { tokio::time::timeout(limit, url.post(line)).await })
            .unwrap_or(Err(WitnessError::Timeout));
        match result {
            Ok(()) => {
                queue.lock().unwrap().lines.pop_front();
                backoff = Duration::from_secs(1);
            }
            Err(e) if closing => {
                let left = queue.lock().unwrap().lines.len();
                tracing::error!(witness = %url, error = %e, "closing with {left} checkpoints the witness endpoint did not take");
                return;
            }
            Err(e) => {
                tracing::error!(witness = %url, error = %e, retry_in = ?backoff, "cannot deliver a checkpoint to the witness endpoint");
                // Wait out the backoff, waking early only to close.
                let q = queue.lock().unwrap();
                let _ = ready
                    .wait_timeout_while(q, backoff, |q| !q.closing)
                    .unwrap();
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
