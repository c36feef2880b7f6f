//! The protocol-neutral core of a proxied session: admission, the grant as policies see
//! it, verdicts with a per-session cache, the action's record entry, record-before-act
//! in either durability mode, result summaries, and the grant's end.
//!
//! It never writes to a socket. It decides, records and says why a session must end;
//! each protocol holds one by composition and renders that on its own wire (PostgreSQL
//! a FATAL, SSH a stderr line and a channel close, HTTP a status).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::api::RecordCap;
use crate::config::Durability;
use crate::grants::{Broker, BrokerError, GrantAuthError, LiveGrant, SessionRecord, TargetRecord};
use crate::policy::types::{Action, Agent, GrantContext};
use crate::policy::{ActivePolicy, Outcome, PolicySet};
use crate::record::{AuditEvent, EventKind, RecordError, Write};

/// How long a cached verdict on an action is reused. Verdicts take the time as an
/// input, so a cached one is only as good as a recent one.
const VERDICT_TTL: Duration = Duration::from_secs(1);

/// Actions whose verdicts a session remembers before starting over.
const VERDICTS_KEPT: usize = 1024;

/// What every protocol gateway is handed by `serve`.
pub struct ProxyServices {
    pub broker: Arc<Broker>,
    pub policy: Arc<ActivePolicy>,
    /// The gateway-owned file of upstream credentials.
    pub secrets_file: PathBuf,
    /// When an action's record entry must be durable.
    pub durability: Durability,
    /// Refused logins recorded, per client address.
    pub refusals: RecordCap,
}

/// Why a session ends. Each protocol renders it on its own wire (PostgreSQL a FATAL,
/// SSH a stderr line and a channel close); its text is the reason `session.closed`
/// records.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    #[error("client closed the connection")]
    ClientClosed,
    #[error("client terminated")]
    ClientTerminated,
    #[error("client connection lost: {0}")]
    ClientLost(std::io::Error),
    /// The client broke its protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The grant was revoked, expired, or ended by its agent.
    #[error("{0}")]
    GrantEnded(String),
    /// Nothing more can be recorded, so nothing more may happen.
    #[error("record unavailable: {0}")]
    Record(RecordError),
    #[error("upstream connection lost: {0}")]
    UpstreamLost(String),
    /// The upstream said or did what the gateway cannot vouch for: a pinned setting
    /// changed, an answer out of step or contradicting the decision, a catalog it
    /// could not read.
    #[error("{0}")]
    Upstream(String),
    /// A result could not be masked, so it was withheld.
    #[error("{0}")]
    Withheld(String),
}

/// How a session reached its protocol gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The agent's own client, over the network.
    Client,
    /// The gateway's MCP server, on the agent's behalf, over an in-process stream
    /// that nothing outside the gateway can open. Every entry of the session says
    /// `via: mcp`.
    Mcp,
}

impl Via {
    /// What the record says, where it says anything.
    fn recorded(self) -> Option<&'static str> {
        match self {
            Via::Client => None,
            Via::Mcp => Some("mcp"),
        }
    }
}

/// A refusal: the reason, and a hint for the agent.
pub type Denial = (String, Option<String>);

/// A verdict on one action, as the record and the client need it.
pub struct Verdict {
    /// `None` when allowed.
    pub denial: Option<Denial>,
    pub bundle: Option<String>,
    pub votes: Vec<serde_json::Value>,
    /// `gateway` for what the gateway refuses before any policy runs, else `policy`.
    pub decided_by: &'static str,
}

impl Verdict {
    /// A refusal by the gateway itself, before any policy runs.
    pub fn refused_by_gateway(denial: Denial) -> Arc<Self> {
        Arc::new(Verdict {
            denial: Some(denial),
            bundle: None,
            votes: Vec::new(),
            decided_by: "gateway",
        })
    }
}

impl ProxyServices {
    /// Records a refused login (`session.refused`): who claimed which grant for which
    /// target, from where, and why. At most so many per client address a minute reach
    /// the record, so a flood of bad logins cannot fill it; the next recorded one counts
    /// the rest. A claimed user name not shaped like a grant id is withheld, here and in
    /// the reason: a client that swapped user and password would otherwise put a secret
    /// in the record. Queued, not awaited: a refusal costs the refused client nothing.
    pub fn record_refusal(
        &self,
        protocol: &str,
        code: &str,
        reason: &str,
        (grant, target): (Option<&str>, Option<&str>),
        peer: &str,
    ) {
        let host = peer.rsplit_once(':').map_or(peer, |(host, _)| host);
        let Some(left_out) = self.refusals.admit(host) else {
            return;
        };
        let bounded = |s: &str| s.chars().take(128).collect::<String>();
        let (grant, recorded_reason) = match grant {
            Some(user) if !crate::grants::looks_like_grant_id(user) => (
                Some("(not a grant id; withheld)".to_string()),
                // (An empty pattern would match between every character.)
                if user.is_empty() {
                    reason.to_string()
                } else {
                    reason.replace(user, "(withheld)")
                },
            ),
            grant => (grant.map(bounded), reason.to_string()),
        };
        let event = AuditEvent::new(EventKind::SessionRefused).detail(serde_json::json!({
            "protocol": protocol,
            "code": code,
            "reason": bounded(&recorded_reason),
            "claimed_grant": grant,
            "target": target.map(bounded),
            "peer": peer,
            "unrecorded_before": left_out,
        }));
        if let Err(e) = self.broker.record().write_queued(Write::event(event)) {
            tracing::error!(error = %e, "cannot record a refused login");
        }
    }

    /// The live grant behind a presented grant id, for `target`: refused when unknown,
    /// for another target, or no longer active.
    pub fn admit(&self, grant_id: &str, target: &str) -> Result<LiveGrant, GrantAuthError> {
        self.broker.admit(grant_id, target)
    }

    /// Opens the session record (`session.opened`) for an admitted grant whose
    /// upstream is ready: from here on every action goes through the returned core.
    pub async fn open(
        self: &Arc<Self>,
        live: LiveGrant,
        target: &TargetRecord,
        protocol: &str,
        via: Via,
    ) -> Result<SessionCore, BrokerError> {
        let grant = live.grant.clone();
        let agent = self
            .broker
            .agents()
            .into_iter()
            .find(|a| a.name == grant.agent)
            .map(|a| a.policy_agent())
            .unwrap_or_else(|| Agent {
                id: grant.agent.clone(),
                labels: vec![],
            });
        let context = GrantContext {
            grant_id: grant.id.clone(),
            agent,
            target: target.policy_target(),
            task: grant.task.clone(),
            access: grant.access.into(),
            now_unix_ms: 0,
        };
        let opened = self
            .broker
            .open_session(&grant, protocol, via.recorded())
            .await?;
        Ok(SessionCore {
            services: self.clone(),
            via,
            context,
            live,
            opened,
            verdicts: HashMap::new(),
            result_summary: None,
            actions: 0,
        })
    }
}

/// Resolves once a session's grant ends; see [`SessionCore::cut_signal`].
#[derive(Clone)]
pub struct CutSignal(tokio::sync::watch::Receiver<Option<String>>);

impl CutSignal {
    /// The reason, once the grant has ended (revoked, expired, ended by its agent).
    pub async fn ended(&mut self) -> String {
        loop {
            if let Some(reason) = self.0.borrow_and_update().clone() {
                return reason;
            }
            if self.0.changed().await.is_err() {
                return "the grant ended".into();
            }
        }
    }
}

/// One admitted session's enforcement state.
pub struct SessionCore {
    services: Arc<ProxyServices>,
    via: Via,
    context: GrantContext,
    live: LiveGrant,
    opened: SessionRecord,
    verdicts: HashMap<String, (Instant, Arc<PolicySet>, Arc<Verdict>)>,
    /// The last result summary, not yet recorded: it goes with the next action's
    /// entry (one record write instead of two), or on its own when the session idles
    /// or ends.
    result_summary: Option<AuditEvent>,
    /// Actions decided in this session, allowed or refused.
    actions: u64,
}

impl SessionCore {
    pub fn services(&self) -> &Arc<ProxyServices> {
        &self.services
    }

    pub fn context(&self) -> &GrantContext {
        &self.context
    }

    /// The grant's context as of now: time is an input to every check and mask call.
    pub fn context_now(&self) -> GrantContext {
        GrantContext {
            now_unix_ms: now_ms(),
            ..self.context.clone()
        }
    }

    pub fn via(&self) -> Via {
        self.via
    }

    pub fn session_id(&self) -> &str {
        &self.opened.id
    }

    /// Counts decided actions, allowed or refused.
    pub fn count_actions(&mut self, n: u64) {
        self.actions += n;
    }

    /// Resolves with the reason once the grant ends (revoked, expired by the sweep,
    /// ended by its agent, or its agent revoked). Select on it wherever the session
    /// waits.
    pub async fn ended(&mut self) -> String {
        let _ = self.live.ended.changed().await;
        self.live
            .ended
            .borrow()
            .clone()
            .unwrap_or_else(|| "the grant ended".into())
    }

    /// The grant's end as a value of its own, for a task that does not hold the core
    /// (a protocol's per-connection watcher, a stream's relay).
    pub fn cut_signal(&self) -> CutSignal {
        CutSignal(self.live.ended.clone())
    }

    /// Why the grant is over, if it is past its expiry now: checked before anything of
    /// an action is decided or sent, with no grace window (the broker's sweep is only
    /// for idle connections).
    pub fn expired(&self) -> Option<String> {
        let expires = self.live.grant.expires_ms;
        (now_ms() >= expires).then(|| {
            let at = humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(expires));
            format!("grant expired at {at}")
        })
    }

    /// The verdict on one action, from the session's cache when it is recent and the
    /// policy set is the same. `key` names the action (a statement's text); `action`
    /// builds it only when policy must be asked; `unless_allowed` is a refusal the
    /// protocol adds to an allow (e.g. a result it could not mask).
    pub async fn check(
        &mut self,
        set: &Arc<PolicySet>,
        key: &str,
        action: impl FnOnce() -> Action,
        unless_allowed: Option<Denial>,
    ) -> Arc<Verdict> {
        if let Some((at, cached_set, verdict)) = self.verdicts.get(key)
            && at.elapsed() < VERDICT_TTL
            && Arc::ptr_eq(cached_set, set)
        {
            return verdict.clone();
        }
        let decision = self
            .services
            .policy
            .check(set, self.context_now(), action())
            .await;
        let denial = match decision.outcome {
            Outcome::Allow(_) => unless_allowed,
            Outcome::Deny { reason, hint, .. } => Some((reason, hint)),
            Outcome::Review { reason, .. } => Some((format!("needs review: {reason}"), None)),
        };
        let verdict = Arc::new(Verdict {
            denial,
            bundle: decision.bundle.as_ref().map(|b| b.to_string()),
            votes: decision.votes.iter().map(|v| v.to_record()).collect(),
            decided_by: "policy",
        });
        if self.verdicts.len() >= VERDICTS_KEPT {
            self.verdicts.clear();
        }
        self.verdicts.insert(
            key.to_string(),
            (Instant::now(), set.clone(), verdict.clone()),
        );
        verdict
    }

    /// Forgets every cached verdict: what an action is has changed (e.g. the target's
    /// catalog was read again).
    pub fn forget_verdicts(&mut self) {
        self.verdicts.clear();
    }

    /// An entry about this session: its agent, target and grant filled in.
    pub fn event(&self, kind: EventKind, mut detail: serde_json::Value) -> AuditEvent {
        if let (Some(via), Some(fields)) = (self.via.recorded(), detail.as_object_mut()) {
            fields.insert("via".into(), via.into());
        }
        AuditEvent::new(kind)
            .agent(&self.context.agent.id)
            .target(&self.context.target.name)
            .grant(&self.context.grant_id)
            .detail(detail)
    }

    /// Records `write` as the configured durability says: made durable (strict), or
    /// queued ahead of everything that follows (batched). The waiting result summary
    /// goes with it.
    pub async fn record(&mut self, mut write: Write) -> Result<(), RecordError> {
        self.carry_result(&mut write);
        let record = self.services.broker.record();
        match self.services.durability {
            Durability::Strict => record.write_async(write).await.map(drop),
            Durability::Batched => record.write_queued(write),
        }
    }

    /// Puts the waiting result summary first in `write`, for a caller that records it
    /// itself (while it acts on something that changes nothing).
    pub fn carry_result(&mut self, write: &mut Write) {
        write.events.splice(0..0, self.result_summary.take());
    }

    /// Keeps the summary of what came back for one action, to be recorded with the
    /// next write; one still waiting is queued first.
    pub fn result(&mut self, kind: EventKind, detail: serde_json::Value) {
        self.flush_result();
        self.result_summary = Some(self.event(kind, detail));
    }

    pub fn result_waiting(&self) -> bool {
        self.result_summary.is_some()
    }

    /// Queues the waiting result summary on its own. A failure poisons the record,
    /// which cuts every session.
    pub fn flush_result(&mut self) {
        if let Some(event) = self.result_summary.take()
            && let Err(e) = self
                .services
                .broker
                .record()
                .write_queued(Write::event(event))
        {
            tracing::error!(error = %e, "cannot record an action's result summary");
        }
    }

    /// Records that the grant's end reached the upstream (`session.upstream-ended`):
    /// the neutral facts, and what the protocol adds about its server's side.
    pub async fn record_upstream_end(&self, reason: &str, mut detail: serde_json::Value) {
        detail["session"] = self.opened.id.clone().into();
        detail["reason"] = reason.into();
        let event = self.event(EventKind::SessionUpstreamEnded, detail);
        if let Err(e) = self
            .services
            .broker
            .record()
            .write_async(Write::event(event))
            .await
        {
            tracing::error!(error = %e, "cannot record the upstream session's end");
        }
    }

    /// Closes the session record (`session.closed`), after the waiting result summary.
    pub async fn close(mut self, reason: &str) {
        self.flush_result();
        if let Err(e) = self
            .services
            .broker
            .close_session(self.opened, self.actions, reason)
            .await
        {
            tracing::error!(error = %e, "cannot record the session's end");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
