//! One admitted session: each client message becomes statements → policy verdicts →
//! a durable record entry → the upstream → results masked on their way back → the
//! record of what came back.
//!
//! The simple query protocol lives here; the extended protocol (Parse/Bind/Execute) is
//! in `extended.rs`; both share the checks, the record and the relay of results.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};

use super::catalog::Catalog;
use super::classify::{Classified, ParseError, Statement};
use super::conn::{Conn, fatal};
use super::masking::{self, MaskPlans, RowMask, Withheld};
use super::pins;
use super::portals::{Discard, Portal, Prepared, RowShape};
use super::services::PgServices;
use super::upstream::Ender;
use super::wire::{
    self, Field, Message, WireError, error_response, message, put_cstr, ready_for_query,
};
use crate::config::Durability;
use crate::policy::types::{Action, SqlKind};
use crate::policy::{PolicySet, sql_kind_name};
use crate::proxy::{SessionCore, SessionEnd, Verdict};
use crate::record::{AuditEvent, EventKind, RecordError, Write};

/// A result summary waits at most this long, while the session is idle, for the next
/// statement's record write to carry it.
const RESULT_SUMMARY_DELAY: Duration = Duration::from_millis(200);

/// What the gateway waits for from the upstream, in order, for what it forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expect {
    /// A simple Query's results, up to its ReadyForQuery.
    Query,
    /// ParseComplete, BindComplete or CloseComplete.
    Complete,
    /// A client's Describe of a statement: ParameterDescription, then RowDescription or
    /// NoData.
    DescribeStatement,
    /// A Describe of a portal: the client's own (relayed), or the gateway's (`gateway`:
    /// the index of the masked portal whose row description it is; kept, not relayed).
    DescribePortal { gateway: Option<usize> },
    /// An Execute's rows, up to CommandComplete, EmptyQueryResponse or PortalSuspended;
    /// `masked`: the index of its portal among those whose rows are masked.
    Execute { masked: Option<usize> },
    /// Sync's ReadyForQuery.
    Sync,
}

/// What came back for one client message, for the record.
#[derive(Default)]
pub(super) struct ResultSummary {
    commands: Vec<String>,
    rows: u64,
    bytes: u64,
    duration: Duration,
    /// Which masking module masked which columns of the results.
    masked: Vec<serde_json::Value>,
}

impl ResultSummary {
    /// Keeps what `rows` masks, once per module and columns.
    fn note_masked(&mut self, rows: Option<&RowMask>) {
        for masked in rows.map(RowMask::masked_columns).unwrap_or_default() {
            if !self.masked.contains(&masked) {
                self.masked.push(masked);
            }
        }
    }
}

pub(super) struct Session {
    pub(super) client: Conn,
    pub(super) upstream: Conn,
    pub(super) services: Arc<PgServices>,
    /// The grant, its verdicts, its record: what every protocol's session shares.
    pub(super) core: SessionCore,
    /// The target's catalog, as read at login or after DDL.
    catalog: Arc<Catalog>,
    /// DDL ran since the catalog was read: read it again once the session is idle.
    pub(super) catalog_stale: bool,
    /// The grant is read-only: the upstream session was opened read-only, and nothing
    /// may lift that.
    read_only: bool,
    superuser_allowed: bool,
    ender: Ender,
    pub(super) tx_status: u8,
    masks: MaskPlans,
    /// Prepared statements and portals made through this session's Parse and Bind.
    pub(super) prepared: HashMap<String, Arc<Prepared>>,
    pub(super) portals: HashMap<String, Portal>,
    /// An Execute in the batch being decided declares or closes a cursor.
    pub(super) portals_stale: bool,
    /// After an error in an extended-protocol batch, messages up to Sync are dropped.
    pub(super) discard: Discard,
    /// The upstream has had extended-protocol messages since its last Sync, so it may be
    /// inside an implicit transaction.
    pub(super) unsynced: bool,
}

/// What admission and the upstream login hand a session: the core (the grant as
/// policies see it and as it lives), the target's catalog, and whether the session is
/// read-only.
pub(super) struct Admitted {
    pub(super) core: SessionCore,
    pub(super) catalog: Arc<Catalog>,
    pub(super) read_only: bool,
    /// The target allows a superuser upstream role (`allow-superuser`).
    pub(super) superuser_allowed: bool,
    /// Ends the upstream session from outside when the grant ends.
    pub(super) ender: Ender,
}

impl Session {
    pub(super) fn new(
        client: Conn,
        upstream: Conn,
        services: Arc<PgServices>,
        admitted: Admitted,
    ) -> Self {
        let Admitted {
            core,
            catalog,
            read_only,
            superuser_allowed,
            ender,
        } = admitted;
        Session {
            client,
            upstream,
            services,
            core,
            catalog,
            catalog_stale: false,
            read_only,
            superuser_allowed,
            ender,
            tx_status: b'I',
            masks: MaskPlans::default(),
            prepared: HashMap::new(),
            portals: HashMap::new(),
            portals_stale: false,
            discard: Discard::No,
            unsynced: false,
        }
    }

    /// Serves the connection until it ends; records why, and closes the session
    /// record.
    pub(super) async fn serve(mut self) {
        let end = self.serve_messages().await;
        self.core.close(&end.to_string()).await;
    }

    async fn serve_messages(&mut self) -> SessionEnd {
        loop {
            let message = match self.read_client().await {
                Ok(m) => m,
                Err(reason) => return reason,
            };
            let result = match message.tag {
                b'Q' => self.query(message).await,
                b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' => self.extended(message).await,
                b'F' => self.refuse_function_call().await,
                // Copy messages outside COPY are ignored, as PostgreSQL does.
                b'd' | b'c' | b'f' => Ok(()),
                b'X' => {
                    let _ = self.upstream.send_now(&message_bytes(&message)).await;
                    return SessionEnd::ClientTerminated;
                }
                other => {
                    fatal(
                        &mut self.client,
                        "08P01",
                        &format!("unexpected message type {:?}", other as char),
                    )
                    .await;
                    return SessionEnd::Protocol(format!(
                        "unexpected message type {:?}",
                        other as char
                    ));
                }
            };
            if let Err(reason) = result {
                return reason;
            }
        }
    }

    /// The client's next message; answers buffered so far are sent first unless the
    /// client has already pipelined more. Ends the session when the grant ends.
    pub(super) async fn read_client(&mut self) -> Result<Message, SessionEnd> {
        if !self.client.has_message() {
            self.client.flush().await.map_err(SessionEnd::ClientLost)?;
        }
        let message = loop {
            tokio::select! {
                m = self.client.read_message() => break m,
                reason = self.core.ended() => return Err(self.end_grant(reason, false).await),
                () = tokio::time::sleep(RESULT_SUMMARY_DELAY), if self.core.result_waiting() => {
                    self.core.flush_result();
                }
            }
        };
        match message {
            Ok(m) => Ok(m),
            Err(WireError::Closed) => Err(SessionEnd::ClientClosed),
            Err(e) => {
                fatal(&mut self.client, "08P01", &format!("invalid message: {e}")).await;
                Err(SessionEnd::Protocol(e.to_string()))
            }
        }
    }

    /// Checks the grant's expiry at decision time, before anything of a message is
    /// decided or sent: a statement past it is refused and the session ends.
    pub(super) async fn unexpired(&mut self) -> Result<(), SessionEnd> {
        match self.core.expired() {
            None => Ok(()),
            Some(reason) => Err(self.end_grant(reason, false).await),
        }
    }

    /// Ends the session because its grant ended: FATAL 57P01 to the client, the
    /// upstream session cancelled and terminated, and that recorded.
    async fn end_grant(&mut self, reason: String, running: bool) -> SessionEnd {
        fatal(
            &mut self.client,
            "57P01",
            &format!("terminating connection: {reason}"),
        )
        .await;
        // The grant's end reaches the server: what the session has running or open
        // there is stopped and rolled back, not left to finish (and commit).
        // Bounded: a TLS close_notify must not wait on an upstream that reads nothing.
        let closed = tokio::time::timeout(Duration::from_secs(1), self.upstream.shutdown())
            .await
            .is_ok_and(|r| r.is_ok());
        let ended = self.ender.end().await;
        if !ended.terminated {
            tracing::error!(error = ?ended.error, "cannot confirm the upstream backend ended (its connection is closed; a running statement stops within 100 ms)");
        }
        let detail = serde_json::json!({
            "statement_running": running,
            // As of the server's last ReadyForQuery.
            "transaction_open": self.tx_status != b'I',
            "connection_closed": closed,
            "terminated": ended.terminated,
            "error": ended.error,
        });
        self.core.record_upstream_end(&reason, detail).await;
        SessionEnd::GrantEnded(reason)
    }

    /// A simple Query: every statement is checked before any is sent; one deny refuses
    /// the whole message.
    async fn query(&mut self, message: Message) -> Result<(), SessionEnd> {
        let mut body = message.body.clone();
        let text =
            match wire::cstr_bytes(&mut body).map_err(|e| SessionEnd::Protocol(e.to_string()))? {
                Ok(text) => text,
                Err(invalid) => return self.refuse_invalid_utf8(&invalid, true).await,
            };
        // A Query is one string: bytes after its NUL would be relayed unread, so the
        // record and the policy would see less than the server is sent.
        if !body.is_empty() {
            fatal(
                &mut self.client,
                "08P01",
                "invalid message format: a Query holds bytes after its string",
            )
            .await;
            return Err(SessionEnd::Protocol(
                "a Query with bytes after its string".into(),
            ));
        }
        let classified = self.classify(&text).await;
        let statements: &[Statement] = match &*classified {
            Ok(s) => s,
            Err(e) => return self.refuse_unparsed(&text, e, true).await,
        };
        if statements.is_empty() {
            let out = [
                message_bytes(&empty_query()),
                ready_for_query(self.tx_status),
            ]
            .concat();
            return self.client.send(&out).await.map_err(SessionEnd::ClientLost);
        }
        self.unexpired().await?;
        let set = self.services.proxy.policy.current();
        self.current_catalog().await?;
        let mut write = Write::default();
        let mut denial: Option<(String, Option<String>)> = None;
        for statement in statements {
            let checked = self.check(&set, statement).await;
            write
                .events
                .push(self.statement_event(statement, &checked, None));
            if denial.is_none() {
                denial.clone_from(&checked.denial);
            }
        }
        self.core.count_actions(statements.len() as u64);
        if let Some((reason, hint)) = denial {
            self.record(write).await?;
            let error = error_response("ERROR", "42501", &reason, hint.as_deref());
            return self.refuse(error, true).await;
        }
        if statements.iter().any(|s| s.manages_prepared) {
            self.forget_prepared();
        }
        if statements.iter().any(|s| s.manages_cursors) {
            self.portals.clear();
        }
        let read_only = statements.iter().all(Statement::changes_nothing);
        self.catalog_stale |= statements.iter().any(Statement::may_change_catalog);
        self.forward_recorded(write, &message_bytes(&message), read_only)
            .await?;
        let summary = self
            .relay(&set, VecDeque::from([Expect::Query]), &mut [], read_only)
            .await?;
        self.record_result(summary);
        self.refresh_catalog().await
    }

    /// Classifies `text` (see [`super::classify::ClassifyCache::classify_for`]).
    pub(super) async fn classify(&mut self, text: &str) -> Classified {
        let services = self.services.clone();
        services
            .classify
            .classify_for(&self.core.context().agent.id, text)
            .await
    }

    /// Before deciding: takes a catalog another session read since this one's, or,
    /// once the target's is older than its TTL and the upstream session is idle, reads
    /// it again (a function created outside the gateway resolves within the TTL).
    /// Verdicts made with the old one are forgotten.
    pub(super) async fn current_catalog(&mut self) -> Result<(), SessionEnd> {
        if let Some((latest, fresh)) = self
            .services
            .catalogs
            .latest(&self.core.context().target.name)
        {
            if !Arc::ptr_eq(&latest, &self.catalog) {
                self.catalog = latest;
                self.core.forget_verdicts();
            }
            self.catalog_stale |= !fresh;
        }
        self.refresh_catalog().await
    }

    /// Reads the target's catalog again after DDL, once the upstream session is idle
    /// (outside a transaction and a pipeline), so functions and types it made resolve.
    pub(super) async fn refresh_catalog(&mut self) -> Result<(), SessionEnd> {
        if !self.catalog_stale || self.tx_status != b'I' || self.unsynced {
            return Ok(());
        }
        self.catalog_stale = false;
        match super::upstream::read_catalog(&mut self.upstream).await {
            Ok(catalog) => {
                let catalog = Arc::new(catalog);
                self.services
                    .catalogs
                    .put(&self.core.context().target.name, catalog.clone());
                self.catalog = catalog;
                self.core.forget_verdicts();
                Ok(())
            }
            Err(e) => {
                let reason = format!("the gateway cannot read the upstream's catalog: {e}");
                fatal(&mut self.client, "08006", &reason).await;
                Err(SessionEnd::Upstream(reason))
            }
        }
    }

    /// Forgets the statements and portals made through this session's Parse and Bind:
    /// SQL-level PREPARE, DEALLOCATE or DISCARD may have replaced them upstream, and a
    /// Bind must not run under another statement's verdict, record entry or row shape.
    /// A Bind to a forgotten name is refused until it is parsed again.
    pub(super) fn forget_prepared(&mut self) {
        self.prepared.clear();
        self.portals.clear();
    }

    /// The verdict on one statement, from the session's cache when it is recent and the
    /// policy set is the same. What the gateway pins is refused before any policy runs.
    pub(super) async fn check(
        &mut self,
        set: &Arc<PolicySet>,
        statement: &Statement,
    ) -> Arc<Verdict> {
        let admin = self.core.context().access == crate::policy::types::Access::Admin;
        if let Some(denial) = pins::refusal(statement, self.read_only, admin) {
            return Verdict::refused_by_gateway(denial);
        }
        let unmaskable =
            statement.kind == SqlKind::CopyTo && set.masks(&self.core.context().target);
        let catalog = &self.catalog;
        self.core
            .check(
                set,
                &statement.text,
                || Action::Sql(statement.action(catalog)),
                unmaskable.then(|| {
                    (
                        "COPY TO is not masked on this target; read with SELECT instead".into(),
                        None,
                    )
                }),
            )
            .await
    }

    /// The record entry of one statement and its verdict; `params` are an extended-
    /// protocol Execute's parameters.
    pub(super) fn statement_event(
        &self,
        statement: &Statement,
        checked: &Verdict,
        params: Option<&serde_json::Value>,
    ) -> AuditEvent {
        let mut detail = serde_json::json!({
            "session": self.core.session_id(),
            "text": statement.text,
            "kind": sql_kind_name(statement.kind),
            "verdict": if checked.denial.is_some() { "deny" } else { "allow" },
            "decided_by": checked.decided_by,
            "reason": checked.denial.as_ref().map(|d| &d.0),
            "bundle": checked.bundle,
            "votes": checked.votes,
        });
        if let Some(params) = params {
            detail["params"] = params.clone();
        }
        self.event(EventKind::SqlStatement, detail)
    }

    fn event(&self, kind: EventKind, detail: serde_json::Value) -> AuditEvent {
        self.core.event(kind, detail)
    }

    /// The record entry of something the gateway refused without asking policy: a
    /// statement it could not classify (`kind` "unparsed"), or a fastpath call.
    pub(super) fn refusal_event(&self, text: &str, kind: &str, reason: &str) -> AuditEvent {
        self.event(
            EventKind::SqlStatement,
            serde_json::json!({
                "session": self.core.session_id(),
                "text": text,
                "kind": kind,
                "verdict": "deny",
                "decided_by": "gateway",
                "reason": reason,
            }),
        )
    }

    /// A FunctionCall names a function by OID, outside any statement a policy could
    /// see: recorded as a denial and never relayed.
    async fn refuse_function_call(&mut self) -> Result<(), SessionEnd> {
        let reason = "the fastpath function call interface is not allowed through Airlock";
        let refused = self.refusal_event("(fastpath function call)", "function-call", reason);
        self.core.count_actions(1);
        self.record(Write::event(refused)).await?;
        let hint = Some("call the function in a SELECT statement");
        self.refuse(error_response("ERROR", "42501", reason, hint), true)
            .await
    }

    /// Records a statement the parser rejected (a denial) and refuses it as PostgreSQL
    /// would: `42601` for a syntax error, `54001` for nesting too deep; `54000` for one
    /// longer than the gateway checks.
    pub(super) async fn refuse_unparsed(
        &mut self,
        text: &str,
        error: &ParseError,
        ready: bool,
    ) -> Result<(), SessionEnd> {
        let reason = error.to_string();
        let refused = self.refusal_event(text, "unparsed", &reason);
        self.core.count_actions(1);
        self.record(Write::event(refused)).await?;
        let hint = matches!(error, ParseError::TooDeep)
            .then_some("simplify the statement: PostgreSQL refuses expressions nested this deeply");
        let response = error_response("ERROR", error.sqlstate(), &reason, hint);
        self.refuse(response, ready).await
    }

    /// Records and refuses a statement that is not UTF-8 (`22021`, PostgreSQL's answer):
    /// the session goes on.
    async fn refuse_invalid_utf8(&mut self, text: &[u8], ready: bool) -> Result<(), SessionEnd> {
        let reason = invalid_utf8(text);
        let refused = self.refusal_event(&String::from_utf8_lossy(text), "unparsed", &reason);
        self.core.count_actions(1);
        self.record(Write::event(refused)).await?;
        self.refuse(error_response("ERROR", "22021", &reason, None), ready)
            .await
    }

    /// Records `write` as the configured durability says: made durable (strict), or
    /// queued ahead of everything that follows (batched). A failure ends the session.
    pub(super) async fn record(&mut self, write: Write) -> Result<(), SessionEnd> {
        let result = self.core.record(write).await;
        self.recorded_or_close(result).await
    }

    /// Sends `message` upstream once `write` is recorded. Strict: a message that
    /// changes nothing (`read_only`) is sent while the entry is being made durable, and
    /// its result is released only after that (the relay starts after this returns).
    pub(super) async fn forward_recorded(
        &mut self,
        mut write: Write,
        message: &[u8],
        read_only: bool,
    ) -> Result<(), SessionEnd> {
        if write.events.is_empty() {
            return self.upstream.send_now(message).await.map_err(upstream_lost);
        }
        if self.services.proxy.durability == Durability::Batched || !read_only {
            self.record(write).await?;
            return self.upstream.send_now(message).await.map_err(upstream_lost);
        }
        self.core.carry_result(&mut write);
        let record = self.services.proxy.broker.record().clone();
        let recording = tokio::spawn(async move { record.write_async(write).await });
        self.upstream
            .send_now(message)
            .await
            .map_err(upstream_lost)?;
        let result = recording
            .await
            .map_err(|e| SessionEnd::Record(RecordError::Store(e.to_string())))?;
        self.recorded_or_close(result.map(drop)).await
    }

    /// Refuses what the client sent with `error` (an ErrorResponse), leaving the
    /// upstream as PostgreSQL would be after that error: a transaction block, or the
    /// implicit transaction of an unsynced pipeline, is aborted. `ready`: the client
    /// waits for ReadyForQuery (it sent Sync or a Query); otherwise the rest of its
    /// batch, up to Sync, is dropped.
    pub(super) async fn refuse(&mut self, error: Bytes, ready: bool) -> Result<(), SessionEnd> {
        if self.tx_status == b'T' || self.unsynced {
            let mut poison = BytesMut::new();
            poison.extend_from_slice(&message(b'P', |out| {
                put_cstr(out, "");
                put_cstr(out, "airlock_statement_denied");
                out.put_i16(0);
            }));
            poison.extend_from_slice(&message(b'S', |_| {}));
            self.upstream
                .send_now(&poison)
                .await
                .map_err(upstream_lost)?;
            loop {
                let m = self.upstream.read_message().await.map_err(upstream_lost)?;
                if m.tag == b'Z' {
                    self.tx_status = m.body.first().copied().unwrap_or(b'E');
                    break;
                }
            }
            self.unsynced = false;
        }
        self.client
            .send(&error)
            .await
            .map_err(SessionEnd::ClientLost)?;
        if ready {
            self.client
                .send(&ready_for_query(self.tx_status))
                .await
                .map_err(SessionEnd::ClientLost)
        } else {
            self.discard = Discard::Local;
            Ok(())
        }
    }

    /// Goes on only if the record write succeeded; otherwise ends the session with
    /// FATAL: nothing goes on unrecorded.
    async fn recorded_or_close(
        &mut self,
        result: Result<(), RecordError>,
    ) -> Result<(), SessionEnd> {
        if let Err(e) = result {
            fatal(&mut self.client, "53000", &format!("refused: {e}")).await;
            return Err(SessionEnd::Record(e));
        }
        Ok(())
    }

    /// Relays the upstream's answers to what was forwarded, masking rows, until every
    /// expected answer has come. `masked` are the portals of the Executes whose rows
    /// are masked, as their `Expect`s index them. `changes_nothing`: every statement
    /// forwarded was decided as one that changes nothing, so an answer that says it
    /// wrote trips the tripwire.
    pub(super) async fn relay(
        &mut self,
        set: &Arc<PolicySet>,
        mut expects: VecDeque<Expect>,
        masked: &mut [Option<RowShape>],
        changes_nothing: bool,
    ) -> Result<ResultSummary, SessionEnd> {
        let started = Instant::now();
        let mut summary = ResultSummary::default();
        let mut rows: Option<RowMask> = None;
        let mut executing = false;
        while let Some(&front) = expects.front() {
            if !self.upstream.has_message() {
                self.client.flush().await.map_err(SessionEnd::ClientLost)?;
            }
            let m = tokio::select! {
                m = self.upstream.read_message() => match m {
                    Ok(m) => m,
                    Err(e) => {
                        fatal(&mut self.client, "08006", "the upstream connection was lost").await;
                        return Err(upstream_lost(e));
                    }
                },
                reason = self.core.ended() => return Err(self.end_grant(reason, true).await),
            };
            summary.bytes += m.body.len() as u64 + 5;
            let m = self.mask_message(set, m).await?;
            if let Expect::Execute { masked: Some(i) } = front
                && !executing
            {
                // The first answer to a masked Execute: its rows' description is known
                // by now (remembered, or from the gateway's Describe just before).
                executing = true;
                let fields = masked[i].clone().flatten();
                rows = self
                    .plan_rows(set, fields.as_deref().map(Vec::as_slice))
                    .await?;
                summary.note_masked(rows.as_ref());
            }
            if m.tag != b'D'
                && let Some(mask) = rows.as_mut()
            {
                let flushed = mask
                    .flush(
                        &self.services.proxy.policy,
                        &self.core.context_now(),
                        &mut self.client,
                    )
                    .await;
                self.or_withhold(flushed).await?;
            }
            let relay = match m.tag {
                b'T' | b'n' => {
                    let fields = match m.tag {
                        b'T' => Some(
                            wire::row_description(&m.body)
                                .map_err(|e| SessionEnd::Upstream(e.to_string()))?,
                        ),
                        _ => None,
                    };
                    match front {
                        Expect::Query => {
                            rows = self.plan_rows(set, fields.as_deref()).await?;
                            summary.note_masked(rows.as_ref());
                            true
                        }
                        Expect::DescribeStatement => {
                            expects.pop_front();
                            true
                        }
                        Expect::DescribePortal { gateway } => {
                            expects.pop_front();
                            if let Some(i) = gateway {
                                masked[i] = Some(fields.map(Arc::new));
                            }
                            gateway.is_none()
                        }
                        _ => return Err(self.out_of_step(m.tag).await),
                    }
                }
                b'D' => {
                    summary.rows += 1;
                    match rows.as_mut() {
                        Some(mask) => {
                            let full = mask.push(&m.body);
                            if self.or_withhold(full).await? {
                                let context = self.core.context_now();
                                let flushed = mask
                                    .flush(&self.services.proxy.policy, &context, &mut self.client)
                                    .await;
                                self.or_withhold(flushed).await?;
                            }
                            false
                        }
                        None => true,
                    }
                }
                b'1' | b'2' | b'3' => {
                    if front != Expect::Complete {
                        return Err(self.out_of_step(m.tag).await);
                    }
                    expects.pop_front();
                    true
                }
                b'C' | b'I' | b's' => {
                    if m.tag == b'C' {
                        let mut tag = m.body.clone();
                        let tag = wire::cstr(&mut tag).unwrap_or_default();
                        if changes_nothing && !reads_only(&tag) {
                            return Err(self.mismatch(&tag).await);
                        }
                        summary.commands.push(tag);
                    }
                    rows = None;
                    if matches!(front, Expect::Execute { .. }) {
                        expects.pop_front();
                        executing = false;
                    }
                    true
                }
                b'E' => {
                    rows = None;
                    executing = false;
                    if front != Expect::Query {
                        // The server skips to the next Sync; so do the expectations.
                        while expects.front().is_some_and(|e| *e != Expect::Sync) {
                            expects.pop_front();
                        }
                        if expects.is_empty() {
                            self.discard = Discard::Upstream;
                        }
                    }
                    true
                }
                b'Z' => {
                    expects.pop_front();
                    self.tx_status = m.body.first().copied().unwrap_or(b'I');
                    if self.tx_status == b'I' {
                        // Portals end with their transaction, upstream as here.
                        self.portals.clear();
                    }
                    if front == Expect::Sync {
                        self.unsynced = false;
                    }
                    true
                }
                b'G' if changes_nothing => return Err(self.mismatch("COPY FROM").await),
                b'S' => {
                    self.check_parameter(&m).await?;
                    true
                }
                b'G' => {
                    self.client
                        .send_now(&message_bytes(&m))
                        .await
                        .map_err(SessionEnd::ClientLost)?;
                    self.copy_in(matches!(front, Expect::Execute { .. }))
                        .await?;
                    false
                }
                _ => true,
            };
            if relay {
                self.client
                    .send_message(&m)
                    .await
                    .map_err(SessionEnd::ClientLost)?;
            }
        }
        summary.duration = started.elapsed();
        Ok(summary)
    }

    /// Errors, notices and notifications can quote values: where masking applies, their
    /// text goes through the masking modules too. A failure withholds the message.
    async fn mask_message(
        &mut self,
        set: &Arc<PolicySet>,
        m: Message,
    ) -> Result<Message, SessionEnd> {
        let mask = match m.tag {
            b'E' | b'N' => masking::mask_notice,
            b'A' => masking::mask_notification,
            _ => return Ok(m),
        };
        if !set.masks(&self.core.context().target) {
            return Ok(m);
        }
        let (set, body) = (set.clone(), m.body.clone());
        let masked = masking::on_pool(
            &self.services.proxy.policy,
            self.core.context_now(),
            move |context, deadline| mask(&set, context, &body, deadline),
        )
        .await;
        let body = self.or_withhold(masked).await?;
        Ok(Message { tag: m.tag, body })
    }

    /// How rows of this description (`None`: no rows) are masked; a result masking
    /// cannot handle is withheld.
    async fn plan_rows(
        &mut self,
        set: &Arc<PolicySet>,
        fields: Option<&[Field]>,
    ) -> Result<Option<RowMask>, SessionEnd> {
        let planned = match fields {
            Some(fields) => {
                self.masks
                    .rows(
                        &self.services.proxy.policy,
                        set,
                        &self.core.context_now(),
                        fields,
                        &self.catalog,
                    )
                    .await
            }
            None => Ok(None),
        };
        self.or_withhold(planned).await
    }

    /// COPY FROM STDIN, already allowed: the client's data goes upstream up to CopyDone
    /// or CopyFail. In the extended protocol the server ignores the Sync the client sent
    /// with the Execute, and the client sends another after CopyDone: relay up to that
    /// one too.
    async fn copy_in(&mut self, extended: bool) -> Result<(), SessionEnd> {
        let mut copying = true;
        loop {
            let c = self.read_client().await?;
            self.upstream
                .send_message(&c)
                .await
                .map_err(upstream_lost)?;
            if !self.client.has_message() {
                self.upstream.flush().await.map_err(upstream_lost)?;
            }
            match c.tag {
                b'c' | b'f' if !extended => break,
                b'c' | b'f' => copying = false,
                b'S' if !copying => break,
                _ => {}
            }
        }
        self.upstream.flush().await.map_err(upstream_lost)
    }

    /// Records what came back for one client message, after the fact (the statements'
    /// own entries were recorded before any of it was released), with the next write.
    pub(super) fn record_result(&mut self, summary: ResultSummary) {
        let detail = serde_json::json!({
            "session": self.core.session_id(),
            "commands": summary.commands,
            "rows": summary.rows,
            "bytes": summary.bytes,
            "duration_ms": summary.duration.as_secs_f64() * 1e3,
            "masked": summary.masked,
        });
        self.core.result(EventKind::SqlResult, detail);
    }

    /// A masking failure: the result is not released and the connection is closed.
    async fn or_withhold<T>(&mut self, result: Result<T, Withheld>) -> Result<T, SessionEnd> {
        match result {
            Ok(value) => Ok(value),
            Err(withheld) => {
                let reason = withheld.to_string();
                fatal(&mut self.client, "XX000", &reason).await;
                Err(SessionEnd::Withheld(reason))
            }
        }
    }

    /// The tripwire: statements decided as changing nothing were answered with a
    /// command that writes. The classification and the server disagreed, so nothing
    /// decided for this session can be trusted: recorded, and the session ends.
    async fn mismatch(&mut self, command: &str) -> SessionEnd {
        let reason =
            format!("the server answered {command:?} to statements decided as changing nothing");
        let event = self.event(
            EventKind::SqlMismatch,
            serde_json::json!({ "session": self.core.session_id(), "command": command, "reason": reason }),
        );
        if let Err(e) = self.record(Write::event(event)).await {
            return e;
        }
        fatal(
            &mut self.client,
            "XX000",
            &format!("terminating connection: {reason}"),
        )
        .await;
        SessionEnd::Upstream(reason)
    }

    /// A ParameterStatus mid-session: a pinned setting that changed ends the session,
    /// recorded, since statements would no longer be read as they were decided.
    async fn check_parameter(&mut self, m: &Message) -> Result<(), SessionEnd> {
        let mut body = m.body.clone();
        let (Ok(name), Ok(value)) = (wire::cstr(&mut body), wire::cstr(&mut body)) else {
            return Err(self.out_of_step(m.tag).await);
        };
        let Err(reason) =
            pins::check_parameter(&name, &value, self.read_only, self.superuser_allowed)
        else {
            return Ok(());
        };
        let event = self.event(
            EventKind::SqlPinBroken,
            serde_json::json!({ "session": self.core.session_id(), "parameter": name, "value": value, "reason": reason }),
        );
        self.record(Write::event(event)).await?;
        fatal(
            &mut self.client,
            "55000",
            &format!("terminating connection: {reason}"),
        )
        .await;
        Err(SessionEnd::Upstream(reason))
    }

    /// The upstream answered something the gateway did not ask for: it cannot tell
    /// which statement the answer belongs to, so it stops.
    async fn out_of_step(&mut self, tag: u8) -> SessionEnd {
        let reason = format!("the upstream sent an unexpected message {:?}", tag as char);
        fatal(&mut self.client, "08P01", &reason).await;
        SessionEnd::Upstream(reason)
    }
}

/// PostgreSQL's message for text that is not UTF-8, naming the first bad bytes.
pub(super) fn invalid_utf8(text: &[u8]) -> String {
    let at = std::str::from_utf8(text).map_or_else(|e| e.valid_up_to(), |_| text.len());
    let bad: Vec<String> = text[at..]
        .iter()
        .take(2)
        .map(|b| format!("0x{b:02x}"))
        .collect();
    format!(
        "invalid byte sequence for encoding \"UTF8\": {}",
        bad.join(" ")
    )
}

/// Command tags of statements that change nothing (as `Statement::changes_nothing`
/// decides): any other answer to them trips the tripwire.
fn reads_only(tag: &str) -> bool {
    const READS: &[&str] = &[
        "SELECT",
        "SHOW",
        "EXPLAIN",
        "COPY",
        "BEGIN",
        "START TRANSACTION",
        "COMMIT",
        "ROLLBACK",
        "SAVEPOINT",
        "RELEASE",
        "PREPARE TRANSACTION",
        "COMMIT PREPARED",
        "ROLLBACK PREPARED",
        "DECLARE CURSOR",
    ];
    READS.iter().any(|read| {
        tag.strip_prefix(read)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
    })
}

fn upstream_lost(e: impl std::fmt::Display) -> SessionEnd {
    SessionEnd::UpstreamLost(e.to_string())
}

fn empty_query() -> Message {
    Message {
        tag: b'I',
        body: Bytes::new(),
    }
}

pub(super) fn message_bytes(m: &Message) -> Bytes {
    let mut out = BytesMut::with_capacity(m.body.len() + 5);
    wire::put_message(&mut out, m);
    out.freeze()
}
