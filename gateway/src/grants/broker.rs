//! The broker itself.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::model::{Access, AgentRecord, GrantRecord, GrantStatus, SessionRecord, TargetRecord};
use super::secret::{GrantKey, hash_secret, new_id, new_secret, secret_matches};
use crate::policy::ActivePolicy;
use crate::policy::types::GrantRequest;
use crate::policy::{Decision, Kind, Outcome};
use crate::record::{AuditEvent, EventKind, Record, RecordError, Space, Write};

/// How long an operator has to approve a pending grant.
const REVIEW_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Longest task description kept.
const MAX_TASK_BYTES: usize = 2000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A grant request, as the agent API receives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantRequestBody {
    pub target: String,
    pub task: String,
    #[serde(default = "default_access")]
    pub access: Access,
    /// `"10m"`, `"90s"`, or a number of seconds.
    pub ttl: TtlValue,
}

fn default_access() -> Access {
    Access::Read
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TtlValue {
    Seconds(u64),
    Text(String),
}

impl TtlValue {
    fn seconds(&self) -> Result<u64, String> {
        match self {
            TtlValue::Seconds(s) => Ok(*s),
            TtlValue::Text(t) => humantime::parse_duration(t)
                .map(|d| d.as_secs())
                .map_err(|e| format!("ttl `{t}` is not a duration ({e}); use e.g. \"10m\"")),
        }
    }
}

/// Why the broker refused.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{0}")]
    Invalid(String),
    #[error("unknown target `{0}`")]
    UnknownTarget(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// Why a grant's credentials were refused at a protocol gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantAuthError {
    /// Unknown grant or wrong secret: the two are indistinguishable on purpose.
    #[error("grant id or secret is wrong")]
    BadCredentials,
    #[error("this grant is for target `{expected}`, not `{presented}`")]
    WrongTarget { expected: String, presented: String },
    #[error("this grant is waiting for an operator's approval")]
    NotApproved,
    #[error("this grant has ended ({0})")]
    Ended(String),
}

/// A grant a protocol gateway let through, and how it learns the grant ended.
pub struct LiveGrant {
    pub grant: GrantRecord,
    /// Changes to `Some(reason)` when the grant ends: close the connection.
    pub ended: watch::Receiver<Option<String>>,
}

/// What a grant request produced.
#[derive(Debug, Clone, Serialize)]
pub struct Issued {
    pub grant: GrantRecord,
    /// Present only when the grant was allowed outright: shown once, never stored.
    pub secret: Option<String>,
}

/// An agent's freshly issued token, shown once.
pub struct AgentToken {
    pub agent: AgentRecord,
    pub token: String,
}

/// Where a target is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetSource {
    Config,
    Admin,
}

#[derive(Default)]
struct State {
    agents: HashMap<String, AgentRecord>,
    tokens: HashMap<String, String>,
    targets: BTreeMap<String, (TargetRecord, TargetSource)>,
    grants: HashMap<String, GrantRecord>,
    /// Grants with a state change in flight, so two cannot race.
    changing: HashSet<String>,
}

/// Proofs of a fresh secret that a target's protocol checks without the secret itself
/// (a SCRAM verifier for PostgreSQL): the protocols supply them, the broker stores them.
pub trait SecretProofs: Send + Sync {
    fn proofs(&self, kind: Kind, secret: &str) -> Vec<(&'static str, String)>;
}

/// The grant broker; share it behind an `Arc`.
pub struct Broker {
    record: Record,
    policy: Arc<ActivePolicy>,
    proofs: Arc<dyn SecretProofs>,
    /// Derives each grant's secret from its id.
    key: GrantKey,
    max_ttl: Duration,
    state: RwLock<State>,
    live: Mutex<HashMap<String, watch::Sender<Option<String>>>>,
}

/// Mints `grant`'s secret, storing only its hash and the proofs its target's protocol
/// checks. Returns the secret, for the agent that owns the grant.
fn mint_secret(
    grant: &mut GrantRecord,
    kind: Kind,
    key: &GrantKey,
    proofs: &dyn SecretProofs,
) -> String {
    let secret = key.secret(&grant.id);
    grant.secret_hash = hash_secret(&secret);
    grant.proofs = proofs
        .proofs(kind, &secret)
        .into_iter()
        .map(|(name, proof)| (name.to_string(), proof))
        .collect();
    secret
}

/// `grant` as it is at `now`: an unswept grant past its window is dead.
fn as_of(mut grant: GrantRecord, now: u64) -> GrantRecord {
    if !grant.status.is_final() && now >= grant.expires_ms {
        grant.status = GrantStatus::Expired;
    }
    grant
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("state serializes")
}

fn decision_detail(decision: &Decision) -> serde_json::Value {
    let votes: Vec<serde_json::Value> = decision.votes.iter().map(|v| v.to_record()).collect();
    let (outcome, reason) = match &decision.outcome {
        Outcome::Allow(_) => ("allow", None),
        Outcome::Deny { reason, .. } => ("deny", Some(reason.clone())),
        Outcome::Review { reason, .. } => ("review", Some(reason.clone())),
    };
    serde_json::json!({
        "outcome": outcome,
        "reason": reason,
        "bundle": decision.bundle.as_ref().map(|b| b.to_string()),
        "votes": votes,
    })
}

impl Broker {
    /// Loads agents, targets and grants from the record; `config_targets` are the
    /// configuration file's targets, which the admin interface cannot remove; `key`
    /// derives grants' secrets (the same key across restarts, or grants issued before
    /// one cannot be shown again).
    pub fn load(
        record: Record,
        policy: Arc<ActivePolicy>,
        proofs: Arc<dyn SecretProofs>,
        key: GrantKey,
        config_targets: Vec<TargetRecord>,
        max_ttl: Duration,
    ) -> Result<Self, BrokerError> {
        let mut state = State::default();
        let spaces = record.spaces();
        let corrupt = |what: &str, e: serde_json::Error| {
            BrokerError::Record(RecordError::Store(format!(
                "stored {what} is unreadable: {e}"
            )))
        };
        for kv in spaces.agents.iter() {
            let value = kv.value().map_err(RecordError::from)?;
            let agent: AgentRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("agent", e))?;
            state
                .tokens
                .insert(agent.token_id.clone(), agent.name.clone());
            state.agents.insert(agent.name.clone(), agent);
        }
        for kv in spaces.grants.iter() {
            let value = kv.value().map_err(RecordError::from)?;
            let grant: GrantRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("grant", e))?;
            state.grants.insert(grant.id.clone(), grant);
        }
        for kv in spaces.targets.iter() {
            let value = kv.value().map_err(RecordError::from)?;
            let target: TargetRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("target", e))?;
            state
                .targets
                .insert(target.name.clone(), (target, TargetSource::Admin));
        }
        for target in config_targets {
            state
                .targets
                .insert(target.name.clone(), (target, TargetSource::Config));
        }
        Ok(Broker {
            record,
            policy,
            proofs,
            key,
            max_ttl,
            state: RwLock::new(state),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// The policy set in force and the pool it decides on.
    pub fn policy(&self) -> &Arc<ActivePolicy> {
        &self.policy
    }

    pub fn record(&self) -> &Record {
        &self.record
    }

    // ---- agents ----

    /// Enrolls an agent and returns its token, which is never shown again.
    pub async fn add_agent(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<AgentToken, BrokerError> {
        check_name("agent", name)?;
        if self.state.read().unwrap().agents.contains_key(name) {
            return Err(BrokerError::Conflict(format!(
                "agent `{name}` already exists"
            )));
        }
        let token_id = new_id("");
        let secret = new_secret();
        let agent = AgentRecord {
            name: name.to_string(),
            labels,
            token_id: token_id.clone(),
            token_hash: hash_secret(&secret),
            created_ms: now_ms(),
            revoked: false,
        };
        let write = Write::event(
            AuditEvent::new(EventKind::AgentAdded)
                .agent(name)
                .detail(serde_json::json!({ "labels": agent.labels })),
        )
        .put(Space::Agents, name, json(&agent));
        self.record.write_async(write).await?;
        let mut state = self.state.write().unwrap();
        state.tokens.insert(token_id.clone(), name.to_string());
        state.agents.insert(name.to_string(), agent.clone());
        Ok(AgentToken {
            agent,
            token: format!("airlock_{token_id}_{secret}"),
        })
    }

    pub fn agents(&self) -> Vec<AgentRecord> {
        let mut agents: Vec<_> = self
            .state
            .read()
            .unwrap()
            .agents
            .values()
            .cloned()
            .collect();
        agents.sort_by(|a, b| a.name.cmp(&b.name));
        agents
    }

    /// Revokes an agent: its token stops working and its live grants end.
    #[tracing::instrument(skip(self))]
    pub async fn revoke_agent(&self, name: &str, by: &str) -> Result<usize, BrokerError> {
        let mut agent = self
            .state
            .read()
            .unwrap()
            .agents
            .get(name)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("agent `{name}`")))?;
        if agent.revoked {
            return Err(BrokerError::Conflict(format!(
                "agent `{name}` is already revoked"
            )));
        }
        agent.revoked = true;
        let write = Write::event(
            AuditEvent::new(EventKind::AgentRevoked)
                .agent(name)
                .detail(serde_json::json!({ "by": by })),
        )
        .put(Space::Agents, name, json(&agent));
        self.record.write_async(write).await?;
        self.state
            .write()
            .unwrap()
            .agents
            .insert(name.to_string(), agent);
        let live: Vec<String> = self
            .state
            .read()
            .unwrap()
            .grants
            .values()
            .filter(|g| g.agent == name && !g.status.is_final())
            .map(|g| g.id.clone())
            .collect();
        let mut ended = 0;
        for id in live {
            if self
                .finish(&id, GrantStatus::Revoked, "its agent was revoked", by)
                .await
                .is_ok()
            {
                ended += 1;
            }
        }
        Ok(ended)
    }

    /// The agent a bearer token belongs to, if the token is valid and not revoked.
    pub fn authenticate_agent(&self, token: &str) -> Option<AgentRecord> {
        let (token_id, secret) = token.strip_prefix("airlock_")?.split_once('_')?;
        let state = self.state.read().unwrap();
        let agent = state.agents.get(state.tokens.get(token_id)?)?;
        (secret_matches(secret, &agent.token_hash) && !agent.revoked).then(|| agent.clone())
    }

    // ---- targets ----

    pub fn targets(&self) -> Vec<(TargetRecord, TargetSource)> {
        self.state
            .read()
            .unwrap()
            .targets
            .values()
            .cloned()
            .collect()
    }

    pub fn target(&self, name: &str) -> Option<TargetRecord> {
        self.state
            .read()
            .unwrap()
            .targets
            .get(name)
            .map(|(t, _)| t.clone())
    }

    pub async fn add_target(&self, target: TargetRecord, by: &str) -> Result<(), BrokerError> {
        check_name("target", &target.name)?;
        if self
            .state
            .read()
            .unwrap()
            .targets
            .contains_key(&target.name)
        {
            return Err(BrokerError::Conflict(format!(
                "target `{}` already exists",
                target.name
            )));
        }
        let write = Write::event(
            AuditEvent::new(EventKind::TargetAdded)
                .target(&target.name)
                .detail(serde_json::json!({ "kind": target.kind, "upstream": target.upstream, "labels": target.labels, "by": by })),
        )
        .put(Space::Targets, target.name.as_str(), json(&target));
        self.record.write_async(write).await?;
        self.state
            .write()
            .unwrap()
            .targets
            .insert(target.name.clone(), (target, TargetSource::Admin));
        Ok(())
    }

    pub async fn remove_target(&self, name: &str, by: &str) -> Result<(), BrokerError> {
        match self.state.read().unwrap().targets.get(name) {
            None => return Err(BrokerError::NotFound(format!("target `{name}`"))),
            Some((_, TargetSource::Config)) => {
                return Err(BrokerError::Conflict(format!(
                    "target `{name}` is defined in the configuration file; remove it there"
                )));
            }
            Some(_) => {}
        }
        let write = Write::event(
            AuditEvent::new(EventKind::TargetRemoved)
                .target(name)
                .detail(serde_json::json!({ "by": by })),
        )
        .delete(Space::Targets, name);
        self.record.write_async(write).await?;
        self.state.write().unwrap().targets.remove(name);
        Ok(())
    }

    // ---- grants ----

    /// Decides a grant request with the active policy bundle and records the request
    /// and the decision before answering.
    #[tracing::instrument(skip_all, fields(agent = %agent.name, target = %body.target))]
    pub async fn request(
        &self,
        agent: &AgentRecord,
        body: GrantRequestBody,
    ) -> Result<Issued, BrokerError> {
        let target = self
            .target(&body.target)
            .ok_or_else(|| BrokerError::UnknownTarget(body.target.clone()))?;
        if body.task.len() > MAX_TASK_BYTES {
            return Err(BrokerError::Invalid(format!(
                "task is {} bytes; at most {MAX_TASK_BYTES}",
                body.task.len()
            )));
        }
        let ttl = body.ttl.seconds().map_err(BrokerError::Invalid)?;
        if ttl == 0 || ttl > self.max_ttl.as_secs() {
            return Err(BrokerError::Invalid(format!(
                "ttl must be between 1s and {} (the gateway's maximum)",
                humantime::format_duration(self.max_ttl)
            )));
        }
        if let Some(pending) = self.pending_like(agent, &target.name, &body, ttl) {
            // A rerun of a request still waiting for review (its first asker timed
            // out) waits on the same grant instead of queueing a second for the
            // operator.
            return Ok(Issued {
                grant: pending,
                secret: None,
            });
        }
        let now = now_ms();
        let request = GrantRequest {
            agent: agent.policy_agent(),
            target: target.policy_target(),
            task: body.task.clone(),
            access: body.access.into(),
            ttl_seconds: ttl as u32,
            now_unix_ms: now,
        };
        let decision = self.policy.authorize(request).await;
        let id = new_id("g_");
        let mut grant = GrantRecord {
            id: id.clone(),
            agent: agent.name.clone(),
            target: target.name.clone(),
            task: body.task.clone(),
            access: body.access,
            status: GrantStatus::Denied,
            ttl_seconds: ttl as u32,
            created_ms: now,
            expires_ms: now,
            secret_hash: String::new(),
            proofs: Default::default(),
            reason: None,
            hint: None,
            read_only: false,
            bundle: decision.bundle.as_ref().map(|b| b.to_string()),
            approved_by: None,
        };
        let mut secret = None;
        match &decision.outcome {
            Outcome::Allow(constraints) => {
                let ttl = constraints
                    .max_ttl_seconds
                    .map_or(ttl, |cap| ttl.min(u64::from(cap)));
                grant.ttl_seconds = ttl as u32;
                grant.status = GrantStatus::Active;
                grant.expires_ms = now + ttl * 1000;
                grant.read_only = constraints.read_only;
                secret = Some(mint_secret(
                    &mut grant,
                    target.kind,
                    &self.key,
                    &*self.proofs,
                ));
            }
            Outcome::Review { reason, .. } => {
                grant.status = GrantStatus::Pending;
                grant.expires_ms = now + REVIEW_WINDOW.as_millis() as u64;
                grant.reason = Some(reason.clone());
            }
            Outcome::Deny { reason, hint, .. } => {
                grant.reason = Some(reason.clone());
                grant.hint = hint.clone();
            }
        }
        let requested = AuditEvent::new(EventKind::GrantRequested)
            .agent(&agent.name)
            .target(&target.name)
            .grant(&id)
            .detail(serde_json::json!({
                "task": body.task,
                "access": body.access,
                "ttl_seconds": ttl,
            }));
        let mut decided = decision_detail(&decision);
        decided["status"] = serde_json::json!(grant.status);
        decided["expires_ms"] = serde_json::json!(grant.expires_ms);
        let decided = AuditEvent::new(EventKind::GrantDecided)
            .agent(&agent.name)
            .target(&target.name)
            .grant(&id)
            .detail(decided);
        let write =
            Write::event(requested)
                .and(decided)
                .put(Space::Grants, id.as_str(), json(&grant));
        self.store_grant(write, &grant).await?;
        Ok(Issued { grant, secret })
    }

    /// `agent`'s grant still waiting for review that asks for just what `body` does.
    fn pending_like(
        &self,
        agent: &AgentRecord,
        target: &str,
        body: &GrantRequestBody,
        ttl: u64,
    ) -> Option<GrantRecord> {
        let now = now_ms();
        self.state
            .read()
            .unwrap()
            .grants
            .values()
            .find(|g| {
                g.status == GrantStatus::Pending
                    && now < g.expires_ms
                    && g.agent == agent.name
                    && g.target == target
                    && g.task == body.task
                    && g.access == body.access
                    && u64::from(g.ttl_seconds) == ttl
            })
            .cloned()
    }

    /// `agent`'s own grants as they are now, newest first.
    pub fn grants_of(&self, agent: &str) -> Vec<GrantRecord> {
        let now = now_ms();
        let mut grants: Vec<GrantRecord> = self
            .state
            .read()
            .unwrap()
            .grants
            .values()
            .filter(|g| g.agent == agent)
            .map(|g| as_of(g.clone(), now))
            .collect();
        grants.sort_by_key(|g| std::cmp::Reverse(g.created_ms));
        grants
    }

    /// The secret of `agent`'s own active grant `id`, shown again: for a follow-up
    /// command of the same task, or the MCP server's connection under it. `None` for
    /// a grant that is not active or not `agent`'s, or that has no secret yet (approved
    /// but not collected: [`Broker::collect`] mints it).
    pub fn secret_for(&self, agent: &str, id: &str) -> Option<(GrantRecord, String)> {
        let grant = self.grant_for(agent, id)?;
        if grant.status != GrantStatus::Active || grant.secret_hash.is_empty() {
            return None;
        }
        let secret = self.key.secret(id);
        // A grant minted before secrets were derived has a random one, gone for good.
        secret_matches(&secret, &grant.secret_hash).then_some((grant, secret))
    }

    /// A grant, if `agent` owns it (an agent cannot see another's grants).
    pub fn grant_for(&self, agent: &str, id: &str) -> Option<GrantRecord> {
        self.grant(id).filter(|g| g.agent == agent)
    }

    pub fn grant(&self, id: &str) -> Option<GrantRecord> {
        let grant = self.state.read().unwrap().grants.get(id).cloned()?;
        Some(as_of(grant, now_ms()))
    }

    pub fn grants(&self) -> Vec<GrantRecord> {
        let mut grants: Vec<_> = self
            .state
            .read()
            .unwrap()
            .grants
            .values()
            .cloned()
            .collect();
        grants.sort_by_key(|g| g.created_ms);
        grants
    }

    /// An operator approves a pending grant; its window starts now. The operator never
    /// sees a secret: the agent collects one with [`Broker::collect`].
    #[tracing::instrument(skip(self))]
    pub async fn approve(&self, id: &str, operator: &str) -> Result<GrantRecord, BrokerError> {
        let _guard = self.begin_change(id)?;
        let mut grant = self
            .grant(id)
            .ok_or_else(|| BrokerError::NotFound(format!("grant `{id}`")))?;
        if grant.status != GrantStatus::Pending {
            return Err(BrokerError::Conflict(format!(
                "grant `{id}` is {:?}, not pending",
                grant.status
            )));
        }
        grant.status = GrantStatus::Active;
        grant.expires_ms = now_ms() + u64::from(grant.ttl_seconds) * 1000;
        grant.approved_by = Some(operator.to_string());
        let write = Write::event(
            AuditEvent::new(EventKind::GrantApproved)
                .agent(&grant.agent)
                .target(&grant.target)
                .grant(id)
                .detail(serde_json::json!({ "by": operator, "expires_ms": grant.expires_ms })),
        )
        .put(Space::Grants, id, json(&grant));
        self.store_grant(write, &grant).await?;
        Ok(grant)
    }

    /// The agent collects the secret of a grant an operator approved: minted now,
    /// shown once. `None` if there is nothing to collect (not approved, or collected).
    #[tracing::instrument(skip(self))]
    pub async fn collect(
        &self,
        agent: &str,
        id: &str,
    ) -> Result<Option<(GrantRecord, String)>, BrokerError> {
        let _guard = self.begin_change(id)?;
        let mut grant = self
            .grant_for(agent, id)
            .ok_or_else(|| BrokerError::NotFound(format!("grant `{id}`")))?;
        if grant.status != GrantStatus::Active
            || grant.approved_by.is_none()
            || !grant.secret_hash.is_empty()
        {
            return Ok(None);
        }
        let kind = self.target(&grant.target).map_or(Kind::Http, |t| t.kind);
        let secret = mint_secret(&mut grant, kind, &self.key, &*self.proofs);
        let write = Write::event(
            AuditEvent::new(EventKind::GrantCollected)
                .agent(agent)
                .target(&grant.target)
                .grant(id),
        )
        .put(Space::Grants, id, json(&grant));
        self.store_grant(write, &grant).await?;
        Ok(Some((grant, secret)))
    }

    /// An operator denies a pending grant.
    pub async fn deny(
        &self,
        id: &str,
        operator: &str,
        reason: &str,
    ) -> Result<GrantRecord, BrokerError> {
        let pending = self
            .grant(id)
            .ok_or_else(|| BrokerError::NotFound(format!("grant `{id}`")))?;
        if pending.status != GrantStatus::Pending {
            return Err(BrokerError::Conflict(format!(
                "grant `{id}` is {:?}, not pending",
                pending.status
            )));
        }
        self.finish(id, GrantStatus::Denied, reason, operator).await
    }

    /// An operator revokes a grant; its connections are closed.
    pub async fn revoke(&self, id: &str, operator: &str) -> Result<GrantRecord, BrokerError> {
        self.finish(id, GrantStatus::Revoked, "revoked by an operator", operator)
            .await
    }

    /// The agent ends its own grant early, or withdraws its request for review.
    pub async fn end(&self, agent: &str, id: &str) -> Result<GrantRecord, BrokerError> {
        let Some(grant) = self.grant_for(agent, id) else {
            return Err(BrokerError::NotFound(format!("grant `{id}`")));
        };
        let reason = match grant.status {
            GrantStatus::Pending => "withdrawn by its agent before review",
            _ => "ended by its agent",
        };
        self.finish(id, GrantStatus::Ended, reason, agent).await
    }

    /// Ends every grant whose window has passed. Returns how many it ended.
    pub async fn expire_due(&self) -> usize {
        let now = now_ms();
        let due: Vec<String> = self
            .state
            .read()
            .unwrap()
            .grants
            .values()
            .filter(|g| !g.status.is_final() && now >= g.expires_ms)
            .map(|g| g.id.clone())
            .collect();
        let mut ended = 0;
        for id in due {
            match self
                .finish(&id, GrantStatus::Expired, "its window passed", "gateway")
                .await
            {
                Ok(_) => ended += 1,
                Err(BrokerError::Record(e)) => {
                    // The grant is dead regardless (checks compare times), but its
                    // connections are cut only once the end is recorded.
                    tracing::error!(grant = %id, error = %e, "cannot record grant expiry");
                }
                Err(_) => {}
            }
        }
        ended
    }

    /// Moves a grant to a final status, records it, and closes its connections.
    #[tracing::instrument(skip(self))]
    async fn finish(
        &self,
        id: &str,
        status: GrantStatus,
        reason: &str,
        by: &str,
    ) -> Result<GrantRecord, BrokerError> {
        let _guard = self.begin_change(id)?;
        let mut grant = self
            .state
            .read()
            .unwrap()
            .grants
            .get(id)
            .cloned()
            .ok_or_else(|| BrokerError::NotFound(format!("grant `{id}`")))?;
        if grant.status.is_final() {
            return Err(BrokerError::Conflict(format!(
                "grant `{id}` has already ended ({:?})",
                grant.status
            )));
        }
        grant.status = status;
        grant.reason = Some(reason.to_string());
        let kind = match status {
            GrantStatus::Denied => EventKind::GrantDenied,
            GrantStatus::Expired => EventKind::GrantExpired,
            GrantStatus::Ended => EventKind::GrantEnded,
            _ => EventKind::GrantRevoked,
        };
        let write = Write::event(
            AuditEvent::new(kind)
                .agent(&grant.agent)
                .target(&grant.target)
                .grant(id)
                .detail(serde_json::json!({ "by": by, "reason": reason })),
        )
        .put(Space::Grants, id, json(&grant));
        self.store_grant(write, &grant).await?;
        if let Some(live) = self.live.lock().unwrap().remove(id) {
            let _ = live.send(Some(format!(
                "grant {id} {}: {reason}",
                status_word(status)
            )));
        }
        Ok(grant)
    }

    /// Records a grant change (with the audit entries in `write`) and only then applies
    /// it in memory.
    async fn store_grant(&self, write: Write, grant: &GrantRecord) -> Result<(), BrokerError> {
        self.record.write_async(write).await?;
        self.state
            .write()
            .unwrap()
            .grants
            .insert(grant.id.clone(), grant.clone());
        Ok(())
    }

    fn begin_change(&self, id: &str) -> Result<ChangeGuard<'_>, BrokerError> {
        if !self.state.write().unwrap().changing.insert(id.to_string()) {
            return Err(BrokerError::Conflict(format!(
                "grant `{id}` is being changed; try again"
            )));
        }
        Ok(ChangeGuard {
            broker: self,
            id: id.to_string(),
        })
    }

    /// Checks a grant's credentials for `target` and registers a live connection under
    /// it. The connection must close when `ended` changes.
    pub fn authenticate_grant(
        &self,
        id: &str,
        secret: &str,
        target: &str,
    ) -> Result<LiveGrant, GrantAuthError> {
        let grant = self.verified(id, secret)?;
        self.admit_grant(grant, Some(target))
    }

    /// Checks a grant's credentials for the one target the grant names (a protocol
    /// whose clients present only the grant: SSH, HTTP) and registers a live
    /// connection under it. One lookup: HTTP calls it for every request.
    pub fn authenticate_own(&self, id: &str, secret: &str) -> Result<LiveGrant, GrantAuthError> {
        let grant = self.verified(id, secret)?;
        self.admit_grant(grant, None)
    }

    /// The grant `id`, if `secret` is its own.
    fn verified(&self, id: &str, secret: &str) -> Result<GrantRecord, GrantAuthError> {
        let grant = self.grant(id).ok_or(GrantAuthError::BadCredentials)?;
        if grant.secret_hash.is_empty() || !secret_matches(secret, &grant.secret_hash) {
            return Err(GrantAuthError::BadCredentials);
        }
        Ok(grant)
    }

    /// The proof named `name` of a grant's secret, for a protocol that proves the
    /// secret without sending it. `None` for an unknown grant or one without it.
    pub fn secret_proof(&self, id: &str, name: &str) -> Option<String> {
        self.grant(id).and_then(|g| g.proofs.get(name).cloned())
    }

    /// Admits a connection under a grant whose secret the caller has already checked
    /// (directly, or by a SCRAM proof): the grant must be active and for `target`.
    pub fn admit(&self, id: &str, target: &str) -> Result<LiveGrant, GrantAuthError> {
        let grant = self.grant(id).ok_or(GrantAuthError::BadCredentials)?;
        self.admit_grant(grant, Some(target))
    }

    /// Admits a connection under `grant` (for `target`, when the client named one):
    /// the grant must be active.
    fn admit_grant(
        &self,
        grant: GrantRecord,
        target: Option<&str>,
    ) -> Result<LiveGrant, GrantAuthError> {
        if let Some(target) = target
            && grant.target != target
        {
            return Err(GrantAuthError::WrongTarget {
                expected: grant.target,
                presented: target.to_string(),
            });
        }
        match grant.status {
            GrantStatus::Active => {}
            GrantStatus::Pending => return Err(GrantAuthError::NotApproved),
            other => return Err(GrantAuthError::Ended(status_word(other).to_string())),
        }
        let mut live = self.live.lock().unwrap();
        let ended = live
            .entry(grant.id.clone())
            .or_insert_with(|| watch::channel(None).0)
            .subscribe();
        Ok(LiveGrant { grant, ended })
    }

    /// Records a session opened under `grant` (state and audit entry, durably) before
    /// the client is let in; `via` names the interface that opened it on the agent's
    /// behalf (`mcp`), if not the agent's own client.
    pub async fn open_session(
        &self,
        grant: &GrantRecord,
        protocol: &str,
        via: Option<&str>,
    ) -> Result<SessionRecord, BrokerError> {
        let session = SessionRecord {
            id: new_id("s_"),
            grant: grant.id.clone(),
            agent: grant.agent.clone(),
            target: grant.target.clone(),
            protocol: protocol.to_string(),
            via: via.map(str::to_string),
            opened_ms: now_ms(),
            closed_ms: None,
            statements: 0,
            end_reason: None,
        };
        let mut detail = serde_json::json!({ "session": session.id, "protocol": protocol });
        if let Some(via) = via {
            detail["via"] = via.into();
        }
        let write = Write::event(
            AuditEvent::new(EventKind::SessionOpened)
                .agent(&grant.agent)
                .target(&grant.target)
                .grant(&grant.id)
                .detail(detail),
        )
        .put(Space::Sessions, session.id.as_str(), json(&session));
        self.record.write_async(write).await?;
        Ok(session)
    }

    /// Records a session's end.
    pub async fn close_session(
        &self,
        mut session: SessionRecord,
        statements: u64,
        reason: &str,
    ) -> Result<(), BrokerError> {
        session.closed_ms = Some(now_ms());
        session.statements = statements;
        session.end_reason = Some(reason.to_string());
        let write = Write::event(
            AuditEvent::new(EventKind::SessionClosed)
                .agent(&session.agent)
                .target(&session.target)
                .grant(&session.grant)
                .detail(serde_json::json!({ "session": session.id, "statements": statements, "reason": reason })),
        )
        .put(Space::Sessions, session.id.as_str(), json(&session));
        self.record.write_async(write).await?;
        Ok(())
    }

    /// Every recorded session, newest first.
    pub fn sessions(&self) -> Result<Vec<SessionRecord>, BrokerError> {
        let mut sessions = Vec::new();
        for kv in self.record.spaces().sessions.iter() {
            let value = kv.value().map_err(RecordError::from)?;
            sessions.push(
                serde_json::from_slice::<SessionRecord>(&value).map_err(|e| {
                    BrokerError::Record(RecordError::Store(format!(
                        "stored session is unreadable: {e}"
                    )))
                })?,
            );
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.opened_ms));
        Ok(sessions)
    }

    /// At start: every session the record still shows open was cut by the gateway's
    /// own end (a crash or a kill); closes each with reason `gateway_restart`.
    pub async fn close_interrupted_sessions(&self) -> Result<usize, BrokerError> {
        let open: Vec<_> = self
            .sessions()?
            .into_iter()
            .filter(|s| s.closed_ms.is_none())
            .collect();
        let count = open.len();
        for session in open {
            let statements = session.statements;
            self.close_session(session, statements, "gateway_restart")
                .await?;
        }
        Ok(count)
    }

    /// Closes every live connection, e.g. when the record has failed and nothing more
    /// can be recorded.
    pub fn cut_all(&self, reason: &str) {
        for (_, live) in self.live.lock().unwrap().drain() {
            let _ = live.send(Some(reason.to_string()));
        }
    }

    /// How many connections are open under a grant.
    pub fn live_connections(&self, id: &str) -> usize {
        self.live
            .lock()
            .unwrap()
            .get(id)
            .map_or(0, |tx| tx.receiver_count())
    }
}

struct ChangeGuard<'a> {
    broker: &'a Broker,
    id: String,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.broker.state.write().unwrap().changing.remove(&self.id);
    }
}

fn status_word(status: GrantStatus) -> &'static str {
    match status {
        GrantStatus::Pending => "is pending",
        GrantStatus::Active => "is active",
        GrantStatus::Denied => "was denied",
        GrantStatus::Revoked => "was revoked",
        GrantStatus::Expired => "expired",
        GrantStatus::Ended => "was ended",
    }
}

fn check_name(what: &str, name: &str) -> Result<(), BrokerError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::Invalid(format!(
            "{what} name `{name}` must be 1-64 characters of letters, digits, `-`, `_` and `.`"
        )))
    }
}
