//! The HTTP listener: TLS when configured, HTTP/1.1 or HTTP/2 (by ALPN, or by the
//! HTTP/2 preface on plain loopback), bounded connections and header waits, and each
//! connection cut the moment its grant ends. A connection upgraded to a stream
//! (kubectl exec) keeps its session until the stream ends.

use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::HttpServices;
use super::service::Conn;

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 1024;
/// How long a client has to send a request's headers, or finish a TLS handshake.
const HEADER_WAIT: Duration = Duration::from_secs(30);

pub(super) async fn listen(listener: TcpListener, services: Arc<HttpServices>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                crate::accept::pause_after("HTTP gateway", &e).await;
                continue;
            }
        };
        let services = services.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let _ = stream.set_nodelay(true);
            serve(stream, peer, services).await;
        });
    }
}

async fn serve(stream: TcpStream, peer: std::net::SocketAddr, services: Arc<HttpServices>) {
    let conn = Arc::new(Conn::new(services.clone(), peer));
    let service = service_fn({
        let conn = conn.clone();
        move |request| conn.clone().handle(request)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_WAIT)
        .max_buf_size(64 * 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(128)
        .max_header_list_size(64 * 1024);
    let served = async {
        match &services.tls {
            Some(acceptor) => {
                let tls = match tokio::time::timeout(HEADER_WAIT, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => return Err(format!("TLS handshake failed: {e}")),
                    Err(_) => return Err("TLS handshake timed out".to_string()),
                };
                builder
                    .serve_connection_with_upgrades(TokioIo::new(tls), service)
                    .await
                    .map_err(|e| e.to_string())
            }
            None => builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
                .map_err(|e| e.to_string()),
        }
    };
    let (reason, cut) = tokio::select! {
        result = served => match result {
            Ok(()) => ("client closed the connection".to_string(), false),
            Err(e) => {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                (format!("client connection lost: {e}"), false)
            }
        },
        // Dropping the connection drops every request on it; its streams watch the
        // grant themselves.
        reason = conn.cut() => (reason, true),
    };
    let (reason, cut) = if cut {
        conn.streams_ended(true).await;
        (reason, cut)
    } else {
        tokio::select! {
            () = conn.streams_ended(false) => (reason, cut),
            reason = conn.cut() => {
                conn.streams_ended(true).await;
                (reason, true)
            }
        }
    };
    conn.close(&reason, cut).await;
}
