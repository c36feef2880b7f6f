//! pii-mask: masks emails, phone numbers and card numbers in SQL rows and in text and
//! JSON bodies, keeping each value's format (`***@example.com`, `**** **** **** 1111`).
//!
//! Only text-like columns are masked, so a result of integers and timestamps never
//! costs a Wasm call. A column named for the data it holds (`email`, `phone`,
//! `card_number`, …) is masked whole; any other text is scanned and only what looks
//! like PII is masked.

use airlock_policy_sdk::mask::{self, json_strings, redact_text};
use airlock_policy_sdk::*;

/// PostgreSQL type names whose values are text.
const TEXT_TYPES: &[&str] = &[
    "text", "varchar", "bpchar", "char", "name", "citext", "json", "jsonb", "xml", "unknown",
];

/// What a column's name says it holds.
#[derive(Clone, Copy)]
enum Kind {
    Email,
    Phone,
    Card,
    Unknown,
}

fn kind_of(column: &str) -> Kind {
    let name = column.to_ascii_lowercase();
    let has = |words: &[&str]| words.iter().any(|w| name.contains(w));
    if has(&["email", "e_mail", "mail_address"]) {
        Kind::Email
    } else if has(&["phone", "mobile", "msisdn", "fax"]) {
        Kind::Phone
    } else if has(&[
        "card_number",
        "cardnumber",
        "credit_card",
        "cc_number",
        "pan",
    ]) {
        Kind::Card
    } else {
        Kind::Unknown
    }
}

fn mask_value(kind: Kind, value: &str) -> String {
    match kind {
        Kind::Email => mask::email(value),
        Kind::Phone => mask::phone(value),
        Kind::Card => mask::card(value),
        Kind::Unknown => mask_text(value),
    }
}

/// Masks PII inside free text, or inside a JSON document's strings.
fn mask_text(value: &str) -> String {
    let trimmed = value.trim_start();
    if (trimmed.starts_with('{') || trimmed.starts_with('['))
        && let Ok(masked) = json_strings(value, json_field)
    {
        return masked;
    }
    redact_text(value).unwrap_or_else(|| value.to_string())
}

fn json_field(key: Option<&str>, value: &str) -> Option<String> {
    match key.map(kind_of) {
        Some(kind @ (Kind::Email | Kind::Phone | Kind::Card)) => Some(mask_value(kind, value)),
        _ => redact_text(value),
    }
}

struct PiiMask;

impl Policy for PiiMask {
    fn mask_columns(_context: GrantContext, columns: Vec<Column>) -> Vec<u32> {
        columns
            .iter()
            .enumerate()
            .filter(|(_, c)| TEXT_TYPES.contains(&c.type_name.as_str()))
            .map(|(i, _)| i as u32)
            .collect()
    }

    fn mask(_context: GrantContext, payload: Payload) -> Payload {
        match payload {
            Payload::Rows(mut rows) => {
                let plan: Vec<(usize, Kind)> = rows
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| TEXT_TYPES.contains(&c.type_name.as_str()))
                    .map(|(i, c)| (i, kind_of(&c.name)))
                    .collect();
                for row in &mut rows.values {
                    for &(i, kind) in &plan {
                        if let Some(Some(value)) = row.get_mut(i) {
                            *value = mask_value(kind, value);
                        }
                    }
                }
                Payload::Rows(rows)
            }
            Payload::Body(mut body) => {
                body.text = if body.content_type.contains("json") {
                    json_strings(&body.text, json_field).unwrap_or_else(|_| mask_text(&body.text))
                } else {
                    mask_text(&body.text)
                };
                Payload::Body(body)
            }
        }
    }
}

export_policy!(PiiMask);
