//! Masking DataRows on their way to the client, by the RowDescription they belong to.
//!
//! The masking modules are asked once per result shape which columns they mask; rows of
//! a shape nobody masks pass through as they came. Rows that need masking are batched
//! (a policy call per batch, not per row) and streamed: a result is never held whole.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::conn::Conn;
use super::wire::{self, Field};
use crate::policy::types::{Column, GrantContext, Rows};
use crate::policy::{MaskPlan, PolicySet};

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
    pub fn rows(
        &mut self,
        set: &Arc<PolicySet>,
        context: &GrantContext,
        fields: &[Field],
    ) -> Result<Option<RowMask>, String> {
        let columns: Vec<Column> = fields
            .iter()
            .map(|f| Column {
                name: f.name.clone(),
                type_name: type_name(f.type_oid),
            })
            .collect();
        let key = (Arc::as_ptr(set) as usize, columns);
        let plan = match self.plans.get(&key) {
            Some(plan) => plan.clone(),
            None => {
                let plan = set.mask_plan(context, &key.1).map_err(|e| e.to_string())?;
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
            if field.format != 0 && !binary_is_text(field.type_oid) {
                return Err(format!(
                    "column \"{}\" is masked, and was asked for in binary format, which masking cannot rewrite for type {}; ask for text format",
                    field.name, key.1[i as usize].type_name
                ));
            }
            masked[i as usize] = true;
        }
        let readable = fields
            .iter()
            .map(|f| f.format == 0 || binary_is_text(f.type_oid))
            .collect();
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
    /// Columns whose bytes are text (text format, or a binary format that is the text).
    readable: Vec<bool>,
    pending: Vec<Vec<Option<Bytes>>>,
}

impl RowMask {
    /// Takes one DataRow; masks and sends a batch when one is full.
    pub async fn push(
        &mut self,
        context: &GrantContext,
        body: &Bytes,
        client: &mut Conn,
    ) -> Result<(), String> {
        let values = wire::data_row(body).map_err(|e| e.to_string())?;
        if values.len() != self.columns.len() {
            return Err("a DataRow does not match its RowDescription".into());
        }
        self.pending.push(values);
        if self.pending.len() >= MASK_BATCH {
            self.flush(context, client).await?;
        }
        Ok(())
    }

    /// Masks and sends the rows taken so far.
    pub async fn flush(&mut self, context: &GrantContext, client: &mut Conn) -> Result<(), String> {
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
                    .map(|(v, &readable)| {
                        v.as_ref()
                            .filter(|_| readable)
                            .map(|b| String::from_utf8_lossy(b).into_owned())
                    })
                    .collect()
            })
            .collect();
        let masked = self
            .plan
            .mask_rows(
                context,
                Rows {
                    columns: self.columns.clone(),
                    values,
                },
            )
            .map_err(|e| e.to_string())?;
        for (original, row) in originals.into_iter().zip(masked.values) {
            // Only the columns a module declared are taken from its output; every other
            // value goes out exactly as the server sent it.
            let out: Vec<Option<Bytes>> = original
                .into_iter()
                .zip(row)
                .zip(&self.masked)
                .map(|((original, masked), &is_masked)| {
                    if is_masked {
                        masked.map(Bytes::from)
                    } else {
                        original
                    }
                })
                .collect();
            client
                .send(&wire::encode_data_row(&out))
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Types whose binary wire format is their text, so masking can rewrite them in either.
fn binary_is_text(oid: u32) -> bool {
    matches!(oid, 19 | 25 | 114 | 705 | 1042 | 1043)
}

/// A PostgreSQL type OID's name, for masking modules (text-like types by name).
fn type_name(oid: u32) -> String {
    match oid {
        16 => "bool",
        17 => "bytea",
        18 => "char",
        19 => "name",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        25 => "text",
        26 => "oid",
        114 => "json",
        142 => "xml",
        700 => "float4",
        701 => "float8",
        705 => "unknown",
        1042 => "bpchar",
        1043 => "varchar",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1700 => "numeric",
        2950 => "uuid",
        3802 => "jsonb",
        other => return format!("oid:{other}"),
    }
    .to_string()
}
