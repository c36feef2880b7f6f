//! The extended query protocol: Parse, Bind, Describe, Execute, Close, Sync, Flush.
//!
//! Messages are taken in batches up to Sync (or Flush). A batch is decided whole before
//! any of it is sent: each Parse is classified and checked (verdicts cached by statement
//! text for the session), each Execute is checked again (a bundle may have rotated since
//! its Parse) and gets its own record entry with its parameters. Any refusal refuses the
//! whole batch and nothing in it runs. When masking applies, the gateway describes each
//! portal itself before it runs, so the rows of every Execute are masked by their own
//! row description and formats.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};

use super::conn::fatal;
use super::portals::{Discard, Portal, Prepared, RowShape};
use super::session::{Expect, Session, invalid_utf8, message_bytes};
use super::wire::{self, Message, error_response, message, put_cstr, ready_for_query};
use crate::proxy::SessionEnd;
use crate::record::Write;

/// Largest batch (bytes of messages up to Sync or Flush) held before deciding it.
const MAX_BATCH: usize = wire::MAX_MESSAGE;

/// Parameter values kept in the record, each cut to this many bytes.
const PARAM_RECORDED: usize = 256;

/// A refusal of a batch: SQLSTATE, message, hint.
type Refusal = (&'static str, String, Option<String>);

impl Session {
    /// Takes a batch starting with `first`, decides it, and runs it or refuses it.
    pub(super) async fn extended(&mut self, first: Message) -> Result<(), SessionEnd> {
        let mut size = first.body.len() + 5;
        let mut batch = vec![first];
        while !matches!(batch.last().map(|m| m.tag), Some(b'S' | b'H')) {
            let m = self.read_client().await?;
            match m.tag {
                b'P' | b'B' | b'D' | b'E' | b'C' | b'S' | b'H' => {}
                b'X' => {
                    let _ = self.upstream.send_now(&message_bytes(&m)).await;
                    return Err(SessionEnd::ClientTerminated);
                }
                other => {
                    let reason = format!(
                        "message type {:?} inside an extended-query batch: send Sync first",
                        other as char
                    );
                    fatal(&mut self.client, "08P01", &reason).await;
                    return Err(SessionEnd::Protocol(reason));
                }
            }
            size += m.body.len() + 5;
            if size > MAX_BATCH {
                let reason = format!("more than {MAX_BATCH} bytes of messages without a Sync");
                fatal(&mut self.client, "54000", &reason).await;
                return Err(SessionEnd::Protocol(reason));
            }
            batch.push(m);
        }
        let synced = batch.last().is_some_and(|m| m.tag == b'S');
        match self.discard {
            Discard::No => self.run_batch(batch, synced).await,
            _ if !synced => Ok(()),
            Discard::Local => {
                self.discard = Discard::No;
                self.client
                    .send(&ready_for_query(self.tx_status))
                    .await
                    .map_err(SessionEnd::ClientLost)
            }
            Discard::Upstream => {
                self.discard = Discard::No;
                let sync = message(b'S', |_| {});
                self.upstream
                    .send_now(&sync)
                    .await
                    .map_err(|e| SessionEnd::UpstreamLost(e.to_string()))?;
                let set = self.services.proxy.policy.current();
                self.relay(&set, VecDeque::from([Expect::Sync]), &mut [], false)
                    .await?;
                Ok(())
            }
        }
    }

    async fn run_batch(&mut self, batch: Vec<Message>, synced: bool) -> Result<(), SessionEnd> {
        self.unexpired().await?;
        let set = self.services.proxy.policy.current();
        self.current_catalog().await?;
        let masks = set.masks(&self.core.context().target);
        let saved = (self.prepared.clone(), self.portals.clone());
        let mut write = Write::default();
        let mut out = BytesMut::new();
        let mut expects = VecDeque::new();
        let mut read_only = true;
        let mut executes = 0;
        let mut forget = false;
        // The row descriptions of the Executes whose rows are masked, in Execute order,
        // filled in as the gateway's own Describes are answered.
        let mut masked: Vec<Option<RowShape>> = Vec::new();
        let mut refusal: Option<Refusal> = None;
        for m in &batch {
            let mut body = m.body.clone();
            let step = match m.tag {
                b'P' => self
                    .parse(&set, &mut body, &mut write)
                    .await
                    .map(|manages| {
                        forget |= manages;
                        Expect::Complete
                    }),
                b'B' => self.bind(&mut body).map(|()| Expect::Complete),
                b'D' => describe(&mut body),
                b'E' => match self
                    .execute(&set, &mut body, &mut write, &mut read_only)
                    .await
                {
                    Ok(name) if masks => {
                        executes += 1;
                        let index = masked.len();
                        masked.push(None);
                        // Describe the portal right before it runs, every time: its row
                        // description, with the formats Bind chose, is what its rows are
                        // masked by, and a name can stand for another portal or cursor
                        // than the last time (a cursor declared by SQL, FETCH, EXECUTE).
                        out.extend_from_slice(&message(b'D', |o| {
                            o.extend_from_slice(b"P");
                            put_cstr(o, &name);
                        }));
                        expects.push_back(Expect::DescribePortal {
                            gateway: Some(index),
                        });
                        Ok(Expect::Execute {
                            masked: Some(index),
                        })
                    }
                    Ok(_) => {
                        executes += 1;
                        Ok(Expect::Execute { masked: None })
                    }
                    Err(e) => Err(e),
                },
                b'C' => self.close(&mut body).map(|()| Expect::Complete),
                b'S' => Ok(Expect::Sync),
                _ => {
                    wire::put_message(&mut out, m);
                    continue;
                }
            };
            match step {
                Ok(expect) => {
                    wire::put_message(&mut out, m);
                    expects.push_back(expect);
                }
                Err(e) => {
                    refusal = Some(e);
                    break;
                }
            }
        }
        self.core.count_actions(write.events.len() as u64);
        if let Some((code, reason, hint)) = refusal {
            (self.prepared, self.portals) = saved;
            self.portals_stale = false;
            self.record(write).await?;
            return self
                .refuse(
                    error_response("ERROR", code, &reason, hint.as_deref()),
                    synced,
                )
                .await;
        }
        self.forward_recorded(write, &out, read_only).await?;
        if forget {
            self.forget_prepared();
        }
        if std::mem::take(&mut self.portals_stale) {
            self.portals.clear();
        }
        self.unsynced = !synced;
        if expects.is_empty() {
            return Ok(());
        }
        let summary = self.relay(&set, expects, &mut masked, read_only).await?;
        if executes > 0 {
            self.record_result(summary);
        }
        self.refresh_catalog().await
    }

    /// Parse: classified and checked now, so a denied statement is never prepared.
    /// Returns whether the statement manages SQL-level prepared statements.
    async fn parse(
        &mut self,
        set: &Arc<crate::policy::PolicySet>,
        body: &mut Bytes,
        write: &mut Write,
    ) -> Result<bool, Refusal> {
        let name = wire::cstr(body).map_err(malformed)?;
        let text = match wire::cstr_bytes(body).map_err(malformed)? {
            Ok(text) => text,
            Err(invalid) => {
                let reason = invalid_utf8(&invalid);
                let lossy = String::from_utf8_lossy(&invalid);
                write
                    .events
                    .push(self.refusal_event(&lossy, "unparsed", &reason));
                return Err(("22021", reason, None));
            }
        };
        let classified = self.classify(&text).await;
        let statement = match &*classified {
            Err(e) => {
                write
                    .events
                    .push(self.refusal_event(&text, "unparsed", &e.to_string()));
                return Err((e.sqlstate(), e.to_string(), None));
            }
            Ok(all) if all.len() > 1 => {
                let reason = "cannot insert multiple commands into a prepared statement";
                write
                    .events
                    .push(self.refusal_event(&text, "unparsed", reason));
                return Err(("42601", reason.into(), None));
            }
            Ok(all) => all.first().cloned(),
        };
        if let Some(statement) = &statement {
            let checked = self.check(set, statement).await;
            if let Some((reason, hint)) = &checked.denial {
                write
                    .events
                    .push(self.statement_event(statement, &checked, None));
                return Err(("42501", reason.clone(), hint.clone()));
            }
        }
        let manages = statement.as_ref().is_some_and(|s| s.manages_prepared);
        self.prepared.insert(name, Arc::new(Prepared { statement }));
        Ok(manages)
    }

    /// Bind: only to a statement prepared through this gateway, whose verdict it knows.
    fn bind(&mut self, body: &mut Bytes) -> Result<(), Refusal> {
        let portal = wire::cstr(body).map_err(malformed)?;
        let name = wire::cstr(body).map_err(malformed)?;
        let Some(prepared) = self.prepared.get(&name).cloned() else {
            return Err((
                "26000",
                format!(
                    "prepared statement \"{name}\" does not exist (statements must be prepared with Parse through this gateway)"
                ),
                None,
            ));
        };
        let params = bind_params(body).map_err(malformed)?;
        self.portals.insert(portal, Portal { prepared, params });
        Ok(())
    }

    /// Execute: checked again (cached), and recorded with its parameters. Returns the
    /// portal's name.
    async fn execute(
        &mut self,
        set: &Arc<crate::policy::PolicySet>,
        body: &mut Bytes,
        write: &mut Write,
        read_only: &mut bool,
    ) -> Result<String, Refusal> {
        let name = wire::cstr(body).map_err(malformed)?;
        let Some(portal) = self.portals.get(&name).cloned() else {
            return Err(("34000", format!("portal \"{name}\" does not exist"), None));
        };
        if let Some(statement) = &portal.prepared.statement {
            let checked = self.check(set, statement).await;
            write
                .events
                .push(self.statement_event(statement, &checked, Some(&portal.params)));
            if let Some((reason, hint)) = &checked.denial {
                return Err(("42501", reason.clone(), hint.clone()));
            }
            *read_only &= statement.changes_nothing();
            self.catalog_stale |= statement.may_change_catalog();
            // A cursor declared or closed by SQL may take a portal's name: after this
            // batch, the gateway forgets its portals rather than guess which.
            self.portals_stale |= statement.manages_cursors;
        }
        Ok(name)
    }

    /// Close of a statement or portal.
    fn close(&mut self, body: &mut Bytes) -> Result<(), Refusal> {
        if body.remaining() < 1 {
            return Err(malformed("short Close"));
        }
        let kind = body.get_u8();
        let name = wire::cstr(body).map_err(malformed)?;
        match kind {
            b'S' => {
                self.prepared.remove(&name);
            }
            b'P' => {
                self.portals.remove(&name);
            }
            _ => return Err(malformed("Close of neither a statement nor a portal")),
        }
        Ok(())
    }
}

/// Describe of a statement or a portal: relayed as it is.
fn describe(body: &mut Bytes) -> Result<Expect, Refusal> {
    match body.first() {
        Some(b'S') => Ok(Expect::DescribeStatement),
        Some(b'P') => Ok(Expect::DescribePortal { gateway: None }),
        _ => Err(malformed("Describe of neither a statement nor a portal")),
    }
}

/// A Bind's parameter values for the record: text values as text, binary ones in hex,
/// each cut short.
fn bind_params(body: &mut Bytes) -> Result<serde_json::Value, String> {
    let short = || "short Bind".to_string();
    if body.remaining() < 2 {
        return Err(short());
    }
    let formats: Vec<i16> = (0..body.get_i16())
        .map(|_| {
            (body.remaining() >= 2)
                .then(|| body.get_i16())
                .ok_or_else(short)
        })
        .collect::<Result<_, _>>()?;
    if body.remaining() < 2 {
        return Err(short());
    }
    let count = body.get_i16();
    let mut values = Vec::with_capacity(count.max(0) as usize);
    for i in 0..count.max(0) as usize {
        if body.remaining() < 4 {
            return Err(short());
        }
        let len = body.get_i32();
        if len < 0 {
            values.push(serde_json::Value::Null);
            continue;
        }
        let len = len as usize;
        if body.remaining() < len {
            return Err(short());
        }
        let value = body.split_to(len);
        let binary = match formats.as_slice() {
            [] => false,
            [one] => *one == 1,
            many => many.get(i).is_some_and(|f| *f == 1),
        };
        let kept = &value[..len.min(PARAM_RECORDED)];
        let mut text = if binary {
            format!("\\x{}", hex::encode(kept))
        } else {
            String::from_utf8_lossy(kept).into_owned()
        };
        if len > PARAM_RECORDED {
            text.push('…');
        }
        values.push(text.into());
    }
    Ok(values.into())
}

fn malformed(e: impl std::fmt::Display) -> Refusal {
    ("08P01", format!("malformed message: {e}"), None)
}
