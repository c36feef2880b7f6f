//! One agent's SSH connection: password authentication with the grant, the upstream
//! login, one session core for the connection, a task per session channel, and
//! refusals of everything else (port forwarding, X11, agent forwarding).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::Instrument;

use super::SshServices;
use super::channel::ChannelTask;
use super::upstream::{self, Upstream, UpstreamAddr};
use crate::grants::GrantAuthError;
use crate::policy::Kind;
use crate::proxy::Via;
use crate::proxy::{CutSignal, SessionCore};
use crate::record::{EventKind, Write};
use crate::secrets::Secrets;

/// Connections served at once; past it a new one is closed at once, so a flood of idle
/// connections uses up this listener's slots, not the process's files.
const MAX_CONNECTIONS: usize = 512;

/// Connections from one address that have not logged in yet, at most.
const MAX_UNAUTHENTICATED_PER_ADDRESS: usize = 16;

/// How long a connection has to log in.
const LOGIN_GRACE: Duration = Duration::from_secs(30);

pub(super) async fn listen(listener: TcpListener, services: Arc<SshServices>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let waiting: Waiting = Arc::default();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                crate::accept::pause_after("SSH gateway", &e).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "SSH connection refused: {MAX_CONNECTIONS} already served");
            continue;
        };
        let Some(unauthenticated) = Unauthenticated::enter(&waiting, peer.ip()) else {
            tracing::warn!(%peer, "SSH connection refused: too many from this address not logged in yet");
            continue;
        };
        let services = services.clone();
        tokio::spawn(async move {
            run(stream, peer.to_string(), services, unauthenticated).await;
            drop(slot);
        });
    }
}

/// Connections not logged in yet, per client address.
type Waiting = Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>;

/// One connection counted as not logged in until it is dropped.
struct Unauthenticated {
    waiting: Waiting,
    ip: IpAddr,
}

impl Unauthenticated {
    fn enter(waiting: &Waiting, ip: IpAddr) -> Option<Self> {
        let mut map = waiting.lock().unwrap();
        let count = map.entry(ip).or_default();
        if *count >= MAX_UNAUTHENTICATED_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(Unauthenticated {
            waiting: waiting.clone(),
            ip,
        })
    }
}

impl Drop for Unauthenticated {
    fn drop(&mut self) {
        let mut map = self.waiting.lock().unwrap();
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn run(
    stream: TcpStream,
    peer: String,
    services: Arc<SshServices>,
    unauthenticated: Unauthenticated,
) {
    // russh sets this only on sockets it accepts itself; without it, small messages
    // wait for delayed acknowledgements (40 ms a command).
    stream.set_nodelay(true).ok();
    let shared: Shared = Arc::default();
    let connection = Connection {
        services: services.clone(),
        peer,
        admitted: shared.clone(),
        refused_upstream: None,
        unauthenticated: Some(unauthenticated),
    };
    let started = server::run_stream(services.config.clone(), stream, connection);
    let session = match tokio::time::timeout(LOGIN_GRACE, started).await {
        Ok(Ok(session)) => session,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "SSH handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("SSH handshake did not finish in time");
            return;
        }
    };
    // Logged in within the grace period, or let go.
    let grace = tokio::spawn({
        let handle = session.handle();
        let shared = shared.clone();
        async move {
            tokio::time::sleep(LOGIN_GRACE).await;
            if shared.lock().unwrap().is_none() {
                let _ = handle
                    .disconnect(
                        russh::Disconnect::ByApplication,
                        "no login within 30 seconds".into(),
                        "en".into(),
                    )
                    .await;
            }
        }
    });
    let result = session.await;
    grace.abort();
    let admitted = shared.lock().unwrap().take();
    if let Some(admitted) = admitted {
        let reason = match (&result, admitted.cut_reason()) {
            (_, Some(reason)) => reason,
            (Ok(()), None) => "client closed the connection".to_string(),
            (Err(e), None) => format!("client connection lost: {e}"),
        };
        admitted.over.send_replace(true);
        admitted.close(&reason).await;
    }
}

/// A connection whose grant was admitted and whose upstream is logged in.
pub(super) struct Admitted {
    pub(super) core: tokio::sync::Mutex<Option<SessionCore>>,
    pub(super) session_id: String,
    pub(super) upstream: Upstream,
    /// A read grant: its commands run upstream without a terminal (see `channel`).
    pub(super) read_only: bool,
    pub(super) cut: CutSignal,
    /// Set once the grant's end (or the record's failure) cut the connection.
    cut_reason: std::sync::Mutex<Option<String>>,
    /// The agent's open session channels, for the grant's end.
    channels: std::sync::Mutex<HashSet<ChannelId>>,
    /// Set once the connection is over: the grant's watcher for it stops.
    over: tokio::sync::watch::Sender<bool>,
}

impl Admitted {
    pub(super) fn set_cut(&self, reason: &str) {
        self.cut_reason
            .lock()
            .unwrap()
            .get_or_insert_with(|| reason.to_string());
    }

    fn cut_reason(&self) -> Option<String> {
        self.cut_reason.lock().unwrap().clone()
    }

    async fn close(&self, reason: &str) {
        let _ = self
            .upstream
            .disconnect(russh::Disconnect::ByApplication, "", "")
            .await;
        if let Some(core) = self.core.lock().await.take() {
            core.close(reason).await;
        }
    }
}

type Shared = Arc<std::sync::Mutex<Option<Arc<Admitted>>>>;

struct Connection {
    services: Arc<SshServices>,
    peer: String,
    /// Set once the grant is admitted; shared with `run`, which closes it.
    admitted: Shared,
    /// Why the upstream was not logged in, said on each channel the agent opens.
    refused_upstream: Option<String>,
    /// Counts against the client address's connections not logged in, until login.
    unauthenticated: Option<Unauthenticated>,
}

impl Connection {
    fn admitted(&self) -> Option<Arc<Admitted>> {
        self.admitted.lock().unwrap().clone()
    }

    /// Records a refused login (see `ProxyServices::record_refusal`).
    fn refuse(&self, code: &str, reason: &str, claimed: &str, target: Option<&str>) {
        self.services.proxy.record_refusal(
            "ssh",
            code,
            reason,
            (Some(claimed), target),
            &self.peer,
        );
    }

    /// Admits the grant, logs in upstream and opens the session record.
    async fn admit(&mut self, grant_id: &str, secret: &str) -> Result<(), String> {
        let broker = &self.services.proxy.broker;
        // The grant names its one target; the secret must be its own.
        let live = broker
            .authenticate_own(grant_id, secret)
            .map_err(|e| e.to_string())?;
        let target = broker
            .target(&live.grant.target)
            .filter(|t| t.kind == Kind::Ssh);
        let Some(target) = target else {
            return Err(GrantAuthError::BadCredentials.to_string());
        };
        let read_only = live.grant.access == crate::grants::Access::Read || live.grant.read_only;
        let span = tracing::info_span!("ssh", grant = %grant_id, target = %target.name);
        let upstream = async {
            let addr = UpstreamAddr::parse(&target.upstream)?;
            let host_key = upstream::parse_host_key(target.host_key.as_deref().unwrap_or(""))?;
            let reference = target
                .credential
                .as_deref()
                .ok_or("the target has no credential")?;
            let credential = Secrets::load(&self.services.proxy.secrets_file)
                .and_then(|s| s.resolve(reference))
                .map_err(|e| {
                    tracing::error!(error = %e, "the SSH target's credential is unavailable");
                    "the gateway cannot log in upstream (its credential is unavailable)".to_string()
                })?;
            upstream::login(&addr, &host_key, &credential)
                .await
                .map_err(|e| e.to_string())
        }
        .instrument(span.clone())
        .await;
        let upstream = match upstream {
            Ok(upstream) => upstream,
            Err(reason) => {
                tracing::error!(parent: &span, error = %reason, "SSH upstream login refused");
                // The agent's own credential was good: it is told why on the channel it
                // opens, and the record says why no session opened.
                self.refuse("upstream", &reason, grant_id, Some(&target.name));
                self.refused_upstream = Some(reason);
                return Ok(());
            }
        };
        let core = self
            .services
            .proxy
            .open(live, &target, "ssh", Via::Client)
            .await
            .map_err(|e| format!("refused: {e}"))?;
        let admitted = Arc::new(Admitted {
            session_id: core.session_id().to_string(),
            cut: core.cut_signal(),
            core: tokio::sync::Mutex::new(Some(core)),
            upstream,
            read_only,
            cut_reason: std::sync::Mutex::new(None),
            channels: std::sync::Mutex::new(HashSet::new()),
            over: tokio::sync::watch::Sender::new(false),
        });
        *self.admitted.lock().unwrap() = Some(admitted);
        Ok(())
    }

    /// A refused channel type or global request, recorded for the admitted session.
    async fn record_refusal(&self, request: &str, reason: &str, detail: serde_json::Value) {
        let Some(admitted) = self.admitted() else {
            return;
        };
        let mut guard = admitted.core.lock().await;
        let Some(core) = guard.as_mut() else {
            return;
        };
        let mut detail_all = serde_json::json!({
            "session": admitted.session_id,
            "channel": null,
            "request": request,
            "verdict": "deny",
            "decided_by": "gateway",
            "reason": reason,
        });
        if let (Some(all), Some(extra)) = (detail_all.as_object_mut(), detail.as_object()) {
            all.extend(extra.clone());
        }
        let event = core.event(EventKind::SshRequest, detail_all);
        if let Err(e) = core.record(Write::event(event)).await {
            admitted.set_cut(&format!("record unavailable: {e}"));
        }
    }
}

impl server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        if self.admitted().is_some() || self.refused_upstream.is_some() {
            return Ok(Auth::reject());
        }
        match self.admit(user, password).await {
            Ok(()) => {
                self.unauthenticated = None;
                Ok(Auth::Accept)
            }
            Err(reason) => {
                tracing::info!(error = %reason, "SSH authentication failed");
                self.refuse("auth", &reason, user, None);
                Ok(Auth::reject())
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        // The grant's end closes the whole connection, from outside the handler.
        if let Some(admitted) = self.admitted() {
            let handle = session.handle();
            let mut cut = admitted.cut.clone();
            let mut over = admitted.over.subscribe();
            tokio::spawn(async move {
                let reason = tokio::select! {
                    reason = cut.ended() => reason,
                    // The connection ended first: nothing is left to cut.
                    _ = over.wait_for(|over| *over) => return,
                };
                admitted.set_cut(&reason);
                // Each channel's task tells its agent why on stderr and hangs up its
                // upstream; the agent's client then leaves on its own. Whatever is
                // still connected a moment later is disconnected.
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                while !admitted.channels.lock().unwrap().is_empty()
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, reason, "en".into())
                    .await;
            });
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(admitted) = self.admitted() else {
            let reason = self
                .refused_upstream
                .clone()
                .unwrap_or_else(|| "not logged in".into());
            reply
                .reject(ChannelOpenFailure::Other { code: 2, reason })
                .await;
            return Ok(());
        };
        reply.accept().await;
        let id = channel.id();
        admitted.channels.lock().unwrap().insert(id);
        let task = ChannelTask::new(admitted.clone(), channel, session.handle());
        tokio::spawn(async move {
            task.run().await;
            admitted.channels.lock().unwrap().remove(&id);
        });
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = "port forwarding is not allowed through Airlock";
        self.record_refusal(
            "direct-tcpip",
            reason,
            serde_json::json!({ "name": format!("{host_to_connect}:{port_to_connect}") }),
        )
        .await;
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        _channel: Channel<Msg>,
        socket_path: &str,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.record_refusal(
            "direct-streamlocal",
            "socket forwarding is not allowed through Airlock",
            serde_json::json!({ "name": socket_path }),
        )
        .await;
        reply
            .reject(ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.record_refusal(
            "tcpip-forward",
            "remote port forwarding is not allowed through Airlock",
            serde_json::json!({ "name": format!("{address}:{port}") }),
        )
        .await;
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        self.record_refusal(
            "streamlocal-forward",
            "socket forwarding is not allowed through Airlock",
            serde_json::json!({ "name": socket_path }),
        )
        .await;
        Ok(false)
    }
}
