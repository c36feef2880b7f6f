//! The SSH gateway: agents run ordinary OpenSSH (`ssh`, `scp`, `sftp`) with the grant
//! as their credential (user = grant id, password = grant secret); the gateway logs in
//! upstream with its own credential, to a host whose key is pinned, and decides every
//! channel request as an action.
//!
//! Data path, per channel: SSH request → action (an `exec` command line parsed by a
//! shell grammar) → policy verdict → record → upstream channel → relay (output
//! recorded as asciicast chunks; input recorded before it is sent on).

mod channel;
pub(crate) mod command;
mod connection;
mod host_key;
mod pump;
mod sftp;
mod upstream;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use upstream::UpstreamAddr;

use crate::grants::{GrantRecord, TargetRecord};
use crate::policy::Kind;
use crate::proxy::protocol::{Advertised, Protocol};
use crate::proxy::{ProtocolGateway, ProxyServices};

/// The SSH protocol; `listen` is where its gateway accepts clients, once it does, and
/// `host_key` the gateway's public host key they pin.
#[derive(Debug, Default)]
pub struct Ssh {
    pub listen: Option<Advertised>,
    pub host_key: Option<String>,
}

impl Protocol for Ssh {
    fn kind(&self) -> Kind {
        Kind::Ssh
    }

    fn check_target(&self, target: &TargetRecord) -> Result<(), String> {
        UpstreamAddr::parse(&target.upstream)?;
        let Some(key) = &target.host_key else {
            return Err(
                "an SSH target needs host-key (the upstream's public host key, e.g. `ssh-ed25519 AAAA…`): the gateway never trusts a host key on first use"
                    .into(),
            );
        };
        upstream::parse_host_key(key)?;
        if target.credential.is_none() {
            return Err(
                "an SSH target needs a credential (a private key or password reference)".into(),
            );
        }
        Ok(())
    }

    /// ssh's host and port, the user (the grant id), and the gateway's host key to
    /// pin, so no client ever answers a host-key prompt.
    fn connection(&self, grant: &GrantRecord, _secret: &str) -> Option<serde_json::Value> {
        let at = self.listen.as_ref()?;
        Some(serde_json::json!({
            "protocol": "ssh",
            "host": at.host,
            "port": at.port,
            "user": grant.id,
            "host_key": self.host_key,
        }))
    }
}

/// What every SSH connection shares.
pub struct SshServices {
    pub(crate) proxy: Arc<ProxyServices>,
    config: Arc<russh::server::Config>,
}

impl SshServices {
    /// The SSH gateway's services, with its host key (created, 0600, when missing).
    pub fn new(proxy: Arc<ProxyServices>, host_key: &Path) -> Result<Self, String> {
        let key = host_key::load_or_create(host_key)?;
        let config = russh::server::Config {
            keys: vec![key],
            methods: russh::MethodSet::from(&[russh::MethodKind::Password][..]),
            auth_rejection_time: Duration::from_millis(300),
            auth_rejection_time_initial: Some(Duration::ZERO),
            max_auth_attempts: 3,
            inactivity_timeout: Some(Duration::from_secs(3600)),
            keepalive_interval: Some(Duration::from_secs(30)),
            nodelay: true,
            ..Default::default()
        };
        Ok(SshServices {
            proxy,
            config: Arc::new(config),
        })
    }

    /// The gateway's host key as a known_hosts key (`ssh-ed25519 AAAA…`), for clients to
    /// pin.
    pub fn host_public_key(&self) -> String {
        self.config.keys[0]
            .public_key()
            .to_openssh()
            .expect("an ed25519 public key encodes")
    }
}

impl ProtocolGateway for SshServices {
    fn name(&self) -> &'static str {
        "SSH"
    }

    fn serve(
        self: Arc<Self>,
        listener: TcpListener,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(connection::listen(listener, self))
    }
}
