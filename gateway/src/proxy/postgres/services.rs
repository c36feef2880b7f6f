//! What every PostgreSQL session shares, and the cancel keys the gateway hands its
//! clients in place of the upstream's.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::catalog::Catalogs;
use super::classify::ClassifyCache;
use crate::proxy::{ProtocolGateway, ProxyServices};

/// What every PostgreSQL session shares.
pub struct PgServices {
    /// What every protocol's sessions share: broker, policy, record, credentials.
    pub proxy: Arc<ProxyServices>,
    pub classify: ClassifyCache,
    /// Each target's functions and types, as its upstream's catalog says.
    pub catalogs: Catalogs,
    /// TLS for clients that ask for it (SSLRequest).
    pub tls: Option<TlsAcceptor>,
    /// Refuse clients that do not ask for TLS.
    pub require_tls: bool,
    /// The cancel keys the gateway gave its clients → the upstream connection and key
    /// to cancel. Clients never see an upstream's key.
    pub cancels: std::sync::Mutex<HashMap<BackendKey, (String, BackendKey)>>,
}

/// The buffer of an in-process connection, each way.
const IN_PROCESS_BUFFER: usize = 64 * 1024;

impl PgServices {
    /// A connection to this gateway from inside the process, for the MCP server acting
    /// on an agent's behalf (`peer` names the agent's own address): served as a network
    /// client's is, its session recorded `via: mcp`. Returns the client's end.
    pub fn connect_in_process(self: &Arc<Self>, peer: String) -> tokio::io::DuplexStream {
        let (client, server) = tokio::io::duplex(IN_PROCESS_BUFFER);
        tokio::spawn(super::startup::run(
            server,
            peer,
            crate::proxy::Via::Mcp,
            self.clone(),
        ));
        client
    }
}

impl ProtocolGateway for PgServices {
    fn name(&self) -> &'static str {
        "PostgreSQL"
    }

    fn serve(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(super::startup::listen(listener, self))
    }
}

/// A BackendKeyData: (process id, secret key).
pub type BackendKey = (i32, i32);

/// A random BackendKeyData for a client, registered until the session ends.
pub(super) struct CancelKey<'a> {
    services: &'a PgServices,
    pub(super) key: BackendKey,
}

impl<'a> CancelKey<'a> {
    pub(super) fn register(
        services: &'a PgServices,
        upstream: String,
        upstream_key: BackendKey,
    ) -> Self {
        let mut bytes = [0u8; 8];
        getrandom::fill(&mut bytes).expect("the OS random number generator is unavailable");
        let key = (
            i32::from_be_bytes(bytes[..4].try_into().expect("4 bytes")) & 0x7fff_ffff,
            i32::from_be_bytes(bytes[4..].try_into().expect("4 bytes")),
        );
        services
            .cancels
            .lock()
            .unwrap()
            .insert(key, (upstream, upstream_key));
        CancelKey { services, key }
    }
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.services.cancels.lock().unwrap().remove(&self.key);
    }
}
