//! Masking DataRows on their way to the client, by the RowDescription they belong to.
//!
//! The masking modules are asked once per result shape which columns they mask; rows of
//! a shape nobody masks pass through as they came. Rows that need masking are batched
//! (a policy call per batch, not per row) and streamed: a result is never held whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::catalog::Catalog;
use super::conn::Conn;
use super::wire::{self, Field, WireError};
use crate::policy::types::{Body, Column, GrantContext, Rows};
use crate::policy::{ActivePolicy, MaskError, MaskPlan, PolicySet};

/// Why a result is withheld instead of sent (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum Withheld {
    /// A masking module failed, or the decision pool refused the call.
    #[error(transparent)]
    Mask(#[from] MaskError),
    /// The upstream's message could not be read for masking.
    #[error("the upstream's message cannot be read for masking: {0}")]
    Malformed(String),
    /// A masked value cannot be sent in the format the client asked for.
    #[error("{0}")]
    Unsendable(String),
    #[error("the client connection failed: {0}")]
    Client(#[from] std::io::Error),
}

impl From<WireError> for Withheld {
    fn from(e: WireError) -> Self {
        Withheld::Malformed(e.to_string())
    }
}

/// Runs masking `work` on the decision pool, in the turn of `context`'s agent, under a
/// deadline of its own; a refusal withholds the result as a module's failure does.
pub(super) async fn on_pool<R: Send + 'static>(
    policy: &ActivePolicy,
    context: GrantContext,
    work: impl FnOnce(&GrantContext, Instant) -> Result<R, Withheld> + Send + 'static,
) -> Result<R, Withheld> {
    let agent = context.agent.id.clone();
    policy
        .run(&agent, move |deadline| work(&context, deadline))
        .await
        .unwrap_or_else(|refusal| Err(MaskError::from(refusal).into()))
}

/// Rows masked per policy call.
const MASK_BATCH: usize = 256;

/// Result shapes remembered per session before starting over.
const PLANS_KEPT: usize = 256;

/// Mask plans by row description, for the policy set they were made with.
#[derive(Default)]
pub struct MaskPlans {
    plans: HashMap<(usize, Vec<Column>), Option<Arc<MaskPlan>>>,
}

impl MaskPlans {
    /// How to treat rows of this description: `None` when they pass untouched. Refuses
    /// (fails closed) when a masked column comes in a binary format masking cannot read.
    pub async fn rows(
        &mut self,
        policy: &ActivePolicy,
        set: &Arc<PolicySet>,
        context: &GrantContext,
        fields: &[Field],
        catalog: &Catalog,
    ) -> Result<Option<RowMask>, Withheld> {
        let columns: Vec<Column> = fields
            .iter()
            .map(|f| Column {
                name: f.name.clone(),
                type_name: catalog
                    .type_name(f.type_oid)
                    .map_or_else(|| format!("oid:{}", f.type_oid), str::to_string),
            })
            .collect();
        let key = (Arc::as_ptr(set) as usize, columns);
        let plan = match self.plans.get(&key) {
            Some(plan) => plan.clone(),
            None => {
                let (set, columns) = (set.clone(), key.1.clone());
                let plan = on_pool(policy, context.clone(), move |context, deadline| {
                    Ok(set.mask_plan(context, &columns, deadline)?)
                })
                .await?;
                let plan = (!plan.is_empty()).then(|| Arc::new(plan));
                if self.plans.len() >= PLANS_KEPT {
                    self.plans.clear();
                }
                self.plans.insert(key.clone(), plan.clone());
                plan
            }
        };
        let Some(plan) = plan else { return Ok(None) };
        let mut masked = vec![false; fields.len()];
        for &i in plan.columns() {
            let field = &fields[i as usize];
            if Encoding::of(field) == Encoding::Opaque {
                return Err(Withheld::Unsendable(format!(
                    "column \"{}\" is masked, and was asked for in binary format, which masking cannot rewrite for type {}; ask for text format",
                    field.name, key.1[i as usize].type_name
                )));
            }
            masked[i as usize] = true;
        }
        let readable = fields.iter().map(Encoding::of).collect();
        Ok(Some(RowMask {
            plan,
            columns: key.1,
            masked,
            readable,
            pending: Vec::new(),
        }))
    }
}

/// Masking of one result's rows.
pub struct RowMask {
    plan: Arc<MaskPlan>,
    columns: Vec<Column>,
    /// Columns a module masks: their values come from the modules.
    masked: Vec<bool>,
    /// How each column's values can be read as text.
    readable: Vec<Encoding>,
    pending: Vec<Vec<Option<Bytes>>>,
}

impl RowMask {
    /// Which module masks which columns (by name), for the result's record entry.
    pub fn masked_columns(&self) -> Vec<serde_json::Value> {
        self.plan
            .masked_by()
            .map(|(module, columns)| {
                let names: Vec<&str> = columns
                    .iter()
                    .filter_map(|&i| self.columns.get(i as usize))
                    .map(|c| c.name.as_str())
                    .collect();
                serde_json::json!({ "module": &**module, "columns": names })
            })
            .collect()
    }

    /// Takes one DataRow; returns true when a batch is full and should be flushed.
    pub fn push(&mut self, body: &Bytes) -> Result<bool, Withheld> {
        let values = wire::data_row(body)?;
        if values.len() != self.columns.len() {
            return Err(Withheld::Malformed(
                "a DataRow does not match its RowDescription".into(),
            ));
        }
        self.pending.push(values);
        Ok(self.pending.len() >= MASK_BATCH)
    }

    /// Masks and sends the rows taken so far.
    pub async fn flush(
        &mut self,
        policy: &ActivePolicy,
        context: &GrantContext,
        client: &mut Conn,
    ) -> Result<(), Withheld> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let originals = std::mem::take(&mut self.pending);
        // Modules see every readable column (a masking decision may depend on another
        // column); binary values of other types reach them as null.
        let values = originals
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&self.readable)
                    .map(|(v, encoding)| v.as_ref().and_then(|b| encoding.text(b)))
                    .collect()
            })
            .collect();
        let rows = Rows {
            columns: self.columns.clone(),
            values,
        };
        let plan = self.plan.clone();
        let masked = on_pool(policy, context.clone(), move |context, deadline| {
            Ok(plan.mask_rows(context, rows, deadline)?)
        })
        .await?;
        for (original, row) in originals.into_iter().zip(masked.values) {
            // Only the columns a module declared are taken from its output; every other
            // value goes out exactly as the server sent it.
            let mut out: Vec<Option<Bytes>> = Vec::with_capacity(original.len());
            for (i, (original, masked)) in original.into_iter().zip(row).enumerate() {
                let encoding = self.readable[i];
                if !self.masked[i] {
                    out.push(original);
                } else if encoding == Encoding::Text {
                    out.push(masked.map(Bytes::from));
                } else if masked == original.as_ref().and_then(|b| encoding.text(b)) {
                    out.push(original);
                } else {
                    return Err(Withheld::Unsendable(format!(
                        "a value of column \"{}\" was masked, and a masked value cannot be sent in its binary format; ask for text format",
                        self.columns[i].name
                    )));
                }
            }
            client.send(&wire::encode_data_row(&out)).await?;
        }
        Ok(())
    }
}

/// How a column's values can be read as text for the masking modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoding {
    /// Text format, or a binary format that is the text (text, varchar, name, json, …).
    Text,
    /// A binary integer (int2, int4, int8): rendered as text for the modules; a value a
    /// module changes cannot go back, so it is withheld.
    BinaryInteger,
    /// A binary format the gateway does not render.
    Opaque,
}

impl Encoding {
    fn of(field: &Field) -> Self {
        match (field.format, field.type_oid) {
            (0, _) | (_, 19 | 25 | 114 | 705 | 1042 | 1043) => Encoding::Text,
            (_, 20 | 21 | 23) => Encoding::BinaryInteger,
            _ => Encoding::Opaque,
        }
    }

    fn text(self, value: &[u8]) -> Option<String> {
        match self {
            Encoding::Text => Some(String::from_utf8_lossy(value).into_owned()),
            Encoding::BinaryInteger => match value.len() {
                2 => Some(i16::from_be_bytes(value.try_into().ok()?).to_string()),
                4 => Some(i32::from_be_bytes(value.try_into().ok()?).to_string()),
                8 => Some(i64::from_be_bytes(value.try_into().ok()?).to_string()),
                _ => None,
            },
            Encoding::Opaque => None,
        }
    }
}

/// Fields of an ErrorResponse or NoticeResponse that only identify it (severity, code,
/// position, source file, line, routine): every other field can quote a value, even the
/// schema, table, column and constraint names (`RAISE … USING COLUMN = …`).
const IDENTIFYING_FIELDS: &[u8] = b"SVCPpFLR";

/// Masks the fields of an ErrorResponse or NoticeResponse that can quote data (`invalid
/// input syntax for type integer: "alice@example.com"`) through the masking modules, as
/// text. The codes and names that identify the error pass as they are.
pub fn mask_notice(
    set: &PolicySet,
    context: &GrantContext,
    body: &Bytes,
    deadline: Instant,
) -> Result<Bytes, Withheld> {
    // Modules are told the SQLSTATE and the field: a data error's quotes, detail and
    // context hold a value.
    let sqlstate = wire::error_field(body, b'C').unwrap_or_default();
    let mut rest = body.clone();
    let mut out = BytesMut::with_capacity(body.len());
    while let Some(&code) = rest.first() {
        rest.advance(1);
        if code == 0 {
            break;
        }
        let value = wire::cstr_lossy(&mut rest)?;
        let value = if IDENTIFYING_FIELDS.contains(&code) {
            value
        } else {
            let content_type = format!(
                "text/plain; postgres-sqlstate={sqlstate}; postgres-field={}",
                code as char
            );
            mask_text(set, context, &content_type, value, deadline)?
        };
        out.put_u8(code);
        wire::put_cstr(&mut out, &value);
    }
    out.put_u8(0);
    Ok(out.freeze())
}

/// Masks a NotificationResponse's channel and payload: `pg_notify` can carry any value.
pub fn mask_notification(
    set: &PolicySet,
    context: &GrantContext,
    body: &Bytes,
    deadline: Instant,
) -> Result<Bytes, Withheld> {
    let mut rest = body.clone();
    if rest.len() < 4 {
        return Err(Withheld::Malformed("short NotificationResponse".into()));
    }
    let pid = rest.get_i32();
    let channel = wire::cstr_lossy(&mut rest)?;
    let payload = wire::cstr_lossy(&mut rest)?;
    let mut out = BytesMut::with_capacity(body.len());
    out.put_i32(pid);
    wire::put_cstr(
        &mut out,
        &mask_text(set, context, "text/plain", channel, deadline)?,
    );
    wire::put_cstr(
        &mut out,
        &mask_text(set, context, "text/plain", payload, deadline)?,
    );
    Ok(out.freeze())
}

fn mask_text(
    set: &PolicySet,
    context: &GrantContext,
    content_type: &str,
    text: String,
    deadline: Instant,
) -> Result<String, Withheld> {
    if text.is_empty() {
        return Ok(text);
    }
    set.mask_body(
        context,
        Body {
            content_type: content_type.into(),
            text,
        },
        deadline,
    )
    .map(|body| body.text)
    .map_err(Withheld::from)
}
