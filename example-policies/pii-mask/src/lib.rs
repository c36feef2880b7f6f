//! pii-mask: masks emails, phone numbers and card numbers wherever they leave the
//! database: SQL rows, error and notice text, notifications, and text and JSON bodies,
//! keeping each value's format (`***@example.com`, `**** **** **** 1111`).
//!
//! Masking follows the data, not only the column names. Every column that can carry
//! text is masked: text of any type (`citext`, arrays, records, `tsvector`, XML, an
//! unknown type) is scanned, and card-like digit groups (13 to 19 digits) are masked
//! whether or not they pass the Luhn check; JSON is masked string by string; a column
//! named for what it holds (`email`, `phone`, `card_number`, …) is masked whole.
//! Numbers (big integers, numerics, floats, money) are masked when their whole part is a
//! card number (13 to 19 digits passing Luhn, however written: `4.111111111111111e+15`,
//! `$4,111,…`), so an id column stays readable. Only types that cannot hold PII
//! (booleans, small integers, dates and times, UUIDs, OIDs) never cost a call.
//!
//! In the text of a data error (SQLSTATE class 22, e.g. `invalid input syntax for type
//! integer: "…"`), whatever is quoted is a value, so it is hidden whatever it looks like.
//!
//! It also denies reading planner statistics (`pg_stats`, `pg_statistic`, …) where it
//! applies: they hold sample values of every column, which no mask can see.
//!
//! What it cannot see: a value encoded by the query (hex, base64, reversed, split
//! across columns), and facts inferred through predicates (`WHERE email LIKE 'a%'`).

use airlock_policy_sdk::mask::{self, json_strings, redact_text};
use airlock_policy_sdk::*;

/// PostgreSQL types whose values cannot carry PII: never masked, never a call.
const SAFE_TYPES: &[&str] = &[
    "bool",
    "int2",
    "int4",
    "oid",
    "date",
    "time",
    "timetz",
    "timestamp",
    "timestamptz",
    "interval",
    "uuid",
    "regclass",
    "regtype",
    "regproc",
    "regprocedure",
    "regnamespace",
    "regrole",
    "xid",
    "cid",
    "tid",
    "pg_lsn",
];

/// Numbers wide enough to hold a card number, in any notation PostgreSQL writes them.
const NUMBER_TYPES: &[&str] = &["int8", "numeric", "float4", "float8", "money"];

/// Scalar text types: a column named for PII is masked whole.
const TEXT_TYPES: &[&str] = &[
    "text", "varchar", "bpchar", "char", "name", "citext", "unknown",
];

/// Statistics that hold sample values of columns.
const STATISTICS: &[&str] = &[
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic",
    "pg_statistic_ext",
    "pg_statistic_ext_data",
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

/// Masks one value of a column of type `type_name` named for `kind`.
fn mask_value(type_name: &str, kind: Kind, value: &str) -> String {
    if NUMBER_TYPES.contains(&type_name) {
        return match kind {
            Kind::Phone => mask::phone(value),
            Kind::Card => mask::card(value),
            _ if mask::is_card_amount(value) => mask::card(value),
            _ => value.to_string(),
        };
    }
    if TEXT_TYPES.contains(&type_name) {
        return match kind {
            Kind::Email => mask::email(value),
            Kind::Phone => mask::phone(value),
            Kind::Card => mask::card(value),
            Kind::Unknown => mask_text(value),
        };
    }
    if matches!(type_name, "json" | "jsonb")
        && let Ok(masked) = json_strings(value, json_field)
    {
        return masked;
    }
    // Arrays, records, text search vectors, XML, types the gateway could not name:
    // their text form is scanned.
    redact_text(value).unwrap_or_else(|| value.to_string())
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

/// Hides the value a data error (class 22) quotes: what is between double quotes, and
/// in its detail and context (`JSON data, line 1: alice...`) what follows the colon.
fn hide_data_error_value(content_type: &str, text: &str) -> String {
    let text = hide_quoted(text);
    let detail_or_context = ["postgres-field=D", "postgres-field=W"]
        .iter()
        .any(|field| content_type.contains(field));
    match text.split_once(": ") {
        Some((label, value)) if detail_or_context => {
            format!("{label}: {}", mask::format_preserving(value))
        }
        _ => text,
    }
}

/// Hides what is between double quotes, keeping its shape.
fn hide_quoted(text: &str) -> String {
    let mut quoted = false;
    text.chars()
        .map(|c| match c {
            '"' => {
                quoted = !quoted;
                c
            }
            'a'..='z' if quoted => 'x',
            'A'..='Z' if quoted => 'X',
            '0'..='9' if quoted => '0',
            _ => c,
        })
        .collect()
}

fn json_field(key: Option<&str>, value: &str) -> Option<String> {
    match key.map(kind_of) {
        Some(Kind::Email) => Some(mask::email(value)),
        Some(Kind::Phone) => Some(mask::phone(value)),
        Some(Kind::Card) => Some(mask::card(value)),
        _ => redact_text(value),
    }
}

struct PiiMask;

impl Policy for PiiMask {
    fn check(_context: GrantContext, action: Action) -> Verdict {
        match action {
            Action::Sql(sql) if STATISTICS.iter().any(|table| sql.touches(table)) => {
                deny_with_hint(
                    "planner statistics hold sample values of columns, which masking cannot see",
                    "query the tables themselves; their rows are masked",
                )
            }
            _ => abstain(),
        }
    }

    fn mask_columns(_context: GrantContext, columns: Vec<Column>) -> Vec<u32> {
        columns
            .iter()
            .enumerate()
            .filter(|(_, c)| !SAFE_TYPES.contains(&c.type_name.as_str()))
            .map(|(i, _)| i as u32)
            .collect()
    }

    fn mask(_context: GrantContext, payload: Payload) -> Payload {
        match payload {
            Payload::Rows(mut rows) => {
                let plan: Vec<(usize, &str, Kind)> = rows
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| !SAFE_TYPES.contains(&c.type_name.as_str()))
                    .map(|(i, c)| (i, c.type_name.as_str(), kind_of(&c.name)))
                    .collect();
                for row in &mut rows.values {
                    for &(i, type_name, kind) in &plan {
                        if let Some(Some(value)) = row.get_mut(i) {
                            *value = mask_value(type_name, kind, value);
                        }
                    }
                }
                Payload::Rows(rows)
            }
            Payload::Body(mut body) => {
                body.text = if body.content_type.contains("postgres-sqlstate=22") {
                    mask_text(&hide_data_error_value(&body.content_type, &body.text))
                } else if body.content_type.contains("json") {
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
