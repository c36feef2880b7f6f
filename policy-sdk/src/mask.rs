//! Masking helpers. Every masker keeps the value's shape (separators, length of the
//! visible part, the email domain) so masked results still read sensibly, and every
//! masker is deterministic: the same value always masks the same way.

/// `alice@example.com` → `***@example.com`. A value without `@` is masked whole.
pub fn email(value: &str) -> String {
    match value.rsplit_once('@') {
        Some((_, domain)) => format!("***@{domain}"),
        None => "***".to_string(),
    }
}

/// Masks every digit but the last four, keeping `+`, spaces and punctuation:
/// `+1 (555) 123-4567` → `+* (***) ***-4567`.
pub fn phone(value: &str) -> String {
    mask_digits_keep_last(value, 4)
}

/// Masks every digit but the last four: `4111 1111 1111 1111` → `**** **** **** 1111`.
pub fn card(value: &str) -> String {
    mask_digits_keep_last(value, 4)
}

fn mask_digits_keep_last(value: &str, keep: usize) -> String {
    let digits = value.chars().filter(char::is_ascii_digit).count();
    let mut seen = 0;
    value
        .chars()
        .map(|c| {
            if c.is_ascii_digit() {
                seen += 1;
                if seen + keep <= digits { '*' } else { c }
            } else {
                c
            }
        })
        .collect()
}

/// Masks every character but the last `n`: `keep_last("secret-token", 4)` → `********oken`.
pub fn keep_last(value: &str, n: usize) -> String {
    let len = value.chars().count();
    value
        .chars()
        .enumerate()
        .map(|(i, c)| if i + n < len { '*' } else { c })
        .collect()
}

/// Keeps the format, hides the content: letters become `x`/`X`, digits `0`,
/// everything else stays. `AB-1234-cd` → `XX-0000-xx`.
pub fn format_preserving(value: &str) -> String {
    value
        .chars()
        .map(|c| match c {
            'a'..='z' => 'x',
            'A'..='Z' => 'X',
            '0'..='9' => '0',
            _ if c.is_alphabetic() => 'x',
            _ => c,
        })
        .collect()
}

/// True if the whole value looks like an email address.
pub fn is_email(value: &str) -> bool {
    let value = value.trim();
    find_email(value, 0).is_some_and(|(start, end)| start == 0 && end == value.len())
}

/// True if the value is a card number: 13 to 19 digits (spaces or dashes allowed)
/// that pass the Luhn check.
pub fn is_card_number(value: &str) -> bool {
    let value = value.trim();
    value
        .chars()
        .all(|c| c.is_ascii_digit() || c == ' ' || c == '-')
        && is_card_digits(&digits_of(value))
}

/// The most whole-number digits [`whole_digits`] spells out: `1e38307423` (a hex id
/// can read as one) would otherwise be 38 million zeros.
const MAX_WHOLE_DIGITS: i64 = 1024;

/// The whole-number digits of a number's text form, however PostgreSQL wrote it:
/// `-4111111111111111.00`, `4.111111111111111e+15`, `$4,111,111,111,111,111.00`.
/// `None` if it is not a number, or its whole part is over 1024 digits long.
pub fn whole_digits(value: &str) -> Option<String> {
    let cleaned: String = value
        .trim()
        .chars()
        .filter(|c| !matches!(c, '$' | ',' | ' ' | '(' | ')'))
        .collect();
    let cleaned = cleaned.trim_start_matches(['-', '+']);
    let (mantissa, exponent) = match cleaned.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (cleaned, 0),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if whole.is_empty() && fraction.is_empty()
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let all = format!("{whole}{fraction}");
    let point = whole.len() as i64 + i64::from(exponent);
    if point > MAX_WHOLE_DIGITS {
        return None;
    }
    let digits = if point <= 0 {
        String::new()
    } else if point as usize >= all.len() {
        format!("{all}{}", "0".repeat(point as usize - all.len()))
    } else {
        all[..point as usize].to_string()
    };
    Some(digits.trim_start_matches('0').to_string())
}

/// True if the value is a number whose whole part is a card number (13 to 19 digits
/// passing Luhn), however it is written: see [`whole_digits`].
pub fn is_card_amount(value: &str) -> bool {
    whole_digits(value).is_some_and(|digits| is_card_digits(&digits_of(&digits)))
}

/// True if the value looks like a phone number: 7 to 15 digits, written with a leading
/// `+` or phone punctuation (spaces, `-`, `.`, parentheses).
pub fn is_phone(value: &str) -> bool {
    let value = value.trim();
    let digits = digits_of(value).len();
    value
        .chars()
        .all(|c| c.is_ascii_digit() || " -.()+".contains(c))
        && (7..=15).contains(&digits)
        && !value[1..].contains('+')
}

fn digits_of(value: &str) -> Vec<u8> {
    value
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect()
}

fn is_card_digits(digits: &[u8]) -> bool {
    (13..=19).contains(&digits.len()) && luhn(digits)
}

fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

/// Finds emails, card-like digit groups (13 to 19 digits, with or without spaces or
/// dashes, Luhn or not) and phone numbers inside free text and masks each in place.
/// Returns `None` when there was nothing to mask.
pub fn redact_text(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut pos = 0;
    let mut changed = false;
    while pos < text.len() {
        if let Some((start, end)) = find_email(text, pos) {
            out.push_str(&text[last..start]);
            out.push_str(&email(&text[start..end]));
            last = end;
            pos = end;
            changed = true;
            continue;
        }
        break;
    }
    out.push_str(&text[last..]);
    let text_after_emails = if changed { out } else { text.to_string() };
    let after_numbers = redact_numbers(&text_after_emails);
    let changed = changed || after_numbers.is_some();
    let text = after_numbers.unwrap_or(text_after_emails);
    match redact_amounts(&text) {
        Some(masked) => Some(masked),
        None if changed => Some(text),
        None => None,
    }
}

/// A byte of an address's local part: ASCII letters, digits and `._%+-'`, and any byte
/// of a non-ASCII character (`josé@…`).
fn is_local_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"._%+-'".contains(&c) || !c.is_ascii()
}

fn is_domain_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'.' || c == b'-'
}

/// The next email at or after byte `from`: (start, end) byte offsets.
fn find_email(text: &str, from: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut at = from;
    while let Some(offset) = text[at..].find('@') {
        let i = at + offset;
        let mut start = i;
        while start > 0 && is_local_char(bytes[start - 1]) {
            start -= 1;
        }
        // A quote opens the text around an address (`'alice@example.com':1`); inside
        // one (`o'brien@`) it is part of the name.
        while start < i && bytes[start] == b'\'' {
            start += 1;
        }
        let mut end = i + 1;
        while end < bytes.len() && is_domain_char(bytes[end]) {
            end += 1;
        }
        // A sentence's full stop is not part of the domain.
        while end > i + 1 && bytes[end - 1] == b'.' {
            end -= 1;
        }
        // A domain without a dot counts too (`alice@example` is what a cast to a
        // qualified name leaves of an address in an error message).
        let domain = &text[i + 1..end];
        let domain_ok = domain
            .bytes()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        if start < i && domain_ok {
            return Some((start, end));
        }
        at = i + 1;
    }
    None
}

/// Masks card and phone numbers in text. Dates, times and IPv4 addresses are left
/// alone: a run that starts like `2026-11-24`, runs into a `:`, or is four dotted
/// groups is not a phone number.
fn redact_numbers(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut i = 0;
    let mut changed = false;
    while i < bytes.len() {
        let starts = bytes[i].is_ascii_digit()
            || ((bytes[i] == b'+' || bytes[i] == b'(')
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit));
        let glued = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if !starts || glued {
            i += 1;
            continue;
        }
        let mut end = i + 1;
        while end < bytes.len() {
            let c = bytes[end];
            let sep_then_digit = b" -.()".contains(&c)
                && bytes
                    .get(end + 1)
                    .is_some_and(|n| n.is_ascii_digit() || *n == b'(');
            if c.is_ascii_digit() || c == b')' || sep_then_digit {
                end += 1;
            } else {
                break;
            }
        }
        // A bracket at either end belongs to what encloses the number (a record, an
        // array of records, a range), not to it.
        let mut start = i;
        if bytes[start] == b'(' && !text[start..end].contains(')') {
            start += 1;
        }
        let mut stop = end;
        while stop > start + 1 && bytes[stop - 1] == b')' && !text[start..stop - 1].contains('(') {
            stop -= 1;
        }
        let run = &text[start..stop];
        let next = bytes.get(stop).copied();
        let glued_after = next.is_some_and(|c| c.is_ascii_alphanumeric() || c == b':' || c == b'_');
        let masked = if glued_after || looks_like_date(run) || looks_like_ipv4(run) {
            None
        } else {
            let digits = digits_of(run);
            // The digits before a decimal part (`4111111111111111.00`).
            let whole = run
                .rsplit_once('.')
                .filter(|(_, fraction)| fraction.bytes().all(|c| c.is_ascii_digit()))
                .map_or(digits.len(), |(whole, _)| digits_of(whole).len());
            let card_like = (13..=19).contains(&digits.len()) || (13..=19).contains(&whole);
            // Card-like digit groups are masked whether or not they pass Luhn: test
            // data, typos and partial numbers are still someone's card.
            if card_like && !run.contains(['(', ')']) {
                Some(card(run))
            } else if (10..=15).contains(&digits.len())
                && (run.starts_with('+') || run.bytes().any(|c| !c.is_ascii_digit()))
            {
                Some(phone(run))
            } else {
                None
            }
        };
        if let Some(masked) = masked {
            out.push_str(&text[last..start]);
            out.push_str(&masked);
            last = stop;
            changed = true;
        }
        i = end;
    }
    if !changed {
        return None;
    }
    out.push_str(&text[last..]);
    Some(out)
}

/// Masks numbers written as amounts whose whole part is card-like (13 to 19 digits):
/// with an exponent (`4.111111111111111e+15`), thousands separators or a currency sign
/// (`$4,111,111,111,111,111.00`), wherever they stand (arrays, records, points).
fn redact_amounts(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    let mut i = 0;
    while i < bytes.len() {
        let glued = i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if !bytes[i].is_ascii_digit() || glued {
            i += 1;
            continue;
        }
        let mut end = i;
        let digits = |end: &mut usize| {
            while *end < bytes.len() && bytes[*end].is_ascii_digit() {
                *end += 1;
            }
        };
        digits(&mut end);
        // Thousands separators: a comma followed by exactly three digits.
        while bytes.get(end) == Some(&b',')
            && bytes
                .get(end + 1..end + 4)
                .is_some_and(|g| g.iter().all(u8::is_ascii_digit))
            && !bytes.get(end + 4).is_some_and(u8::is_ascii_digit)
        {
            end += 4;
        }
        if bytes.get(end) == Some(&b'.') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit) {
            end += 1;
            digits(&mut end);
        }
        if matches!(bytes.get(end), Some(b'e' | b'E')) {
            let mut exp = end + 1;
            if matches!(bytes.get(exp), Some(b'+' | b'-')) {
                exp += 1;
            }
            if bytes.get(exp).is_some_and(u8::is_ascii_digit) {
                end = exp;
                digits(&mut end);
            }
        }
        let token = &text[i..end];
        let glued_after = bytes
            .get(end)
            .is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_');
        let card_like = whole_digits(token).is_some_and(|d| (13..=19).contains(&d.len()));
        if card_like && !glued_after {
            out.push_str(&text[last..i]);
            out.push_str(&card(token));
            last = end;
        }
        i = end.max(i + 1);
    }
    if last == 0 {
        return None;
    }
    out.push_str(&text[last..]);
    Some(out)
}

fn looks_like_date(run: &str) -> bool {
    let b = run.as_bytes();
    b.len() >= 10
        && b[..4].iter().all(u8::is_ascii_digit)
        && (b[4] == b'-' || b[4] == b'/')
        && b[5..7].iter().all(u8::is_ascii_digit)
        && b[7] == b[4]
        && b[8..10].iter().all(u8::is_ascii_digit)
}

fn looks_like_ipv4(run: &str) -> bool {
    let groups: Vec<&str> = run.split('.').collect();
    groups.len() == 4
        && groups
            .iter()
            .all(|g| (1..=3).contains(&g.len()) && g.bytes().all(|c| c.is_ascii_digit()))
}

/// Rewrites every string value in a JSON document with `f(key, value)`, where `key` is
/// the name of the object field holding it (if any), and every object key with
/// `f(None, key)`. `f` returns `None` to keep the
/// value. Returns the document re-serialized (compact), or an error if it is not JSON.
pub fn json_strings(
    text: &str,
    mut f: impl FnMut(Option<&str>, &str) -> Option<String>,
) -> Result<String, String> {
    let mut value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    walk(&mut value, None, &mut f);
    serde_json::to_string(&value).map_err(|e| e.to_string())
}

fn walk(
    value: &mut serde_json::Value,
    key: Option<&str>,
    f: &mut impl FnMut(Option<&str>, &str) -> Option<String>,
) {
    use serde_json::Value;
    match value {
        Value::String(s) => {
            if let Some(masked) = f(key, s) {
                *s = masked;
            }
        }
        // A number can hold a card or a phone number too: masked, it becomes a string
        // (a masked value is no longer a number).
        Value::Number(n) => {
            let text = n.to_string();
            if let Some(masked) = f(key, &text)
                && masked != text
            {
                *value = Value::String(masked);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| walk(v, key, f)),
        Value::Object(map) => {
            // Keys are data too (`jsonb_object_agg(email, …)`): rewritten with no key.
            let entries = std::mem::take(map);
            for (k, mut v) in entries {
                walk(&mut v, Some(&k), f);
                let k = f(None, &k).unwrap_or(k);
                map.insert(k, v);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maskers_keep_the_shape() {
        assert_eq!(email("alice@example.com"), "***@example.com");
        assert_eq!(phone("+1 (555) 123-4567"), "+* (***) ***-4567");
        assert_eq!(card("4111 1111 1111 1111"), "**** **** **** 1111");
        assert_eq!(keep_last("secret-token", 4), "********oken");
        assert_eq!(format_preserving("AB-1234-cd"), "XX-0000-xx");
    }

    #[test]
    fn detection() {
        assert!(is_email("bob.smith+tag@mail.example.org"));
        assert!(!is_email("not an email"));
        assert!(is_card_number("4111-1111-1111-1111"));
        assert!(!is_card_number("4111-1111-1111-1112"));
        assert!(is_phone("+44 20 7946 0958"));
        assert!(!is_phone("12"));
    }

    #[test]
    fn redacts_inside_text_and_leaves_the_rest() {
        assert_eq!(
            redact_text("mail alice@example.com or call +1 555 123 4567.").as_deref(),
            Some("mail ***@example.com or call +* *** *** 4567.")
        );
        assert_eq!(
            redact_text("card 4111 1111 1111 1111 on file").as_deref(),
            Some("card **** **** **** 1111 on file")
        );
        assert_eq!(
            redact_text("paid 4111111111111111.00 and 1234-5678-9012-3456").as_deref(),
            Some("paid **************11.00 and ****-****-****-3456")
        );
        assert_eq!(
            redact_text(r#"schema "alice@example" does not exist"#).as_deref(),
            Some(r#"schema "***@example" does not exist"#)
        );
        for (text, masked) in [
            ("(4111111111111111)", "(************1111)"),
            (
                r#"{"(1,4111111111111111)","(2,5500000000000004)"}"#,
                r#"{"(1,************1111)","(2,************0004)"}"#,
            ),
            ("{4.111111111111111e+15}", "{*.*************11e+15}"),
            ("(4.111111111111111e+15,0)", "(*.*************11e+15,0)"),
            (
                r#"{"$4,111,111,111,111,111.00"}"#,
                r#"{"$*,***,***,***,***,*11.00"}"#,
            ),
            ("(1,josé@example.com)", "(1,***@example.com)"),
            ("o'brien@example.com", "***@example.com"),
        ] {
            assert_eq!(redact_text(text).as_deref(), Some(masked), "{text}");
        }
        assert_eq!(
            whole_digits("4.111111111111111e+15").as_deref(),
            Some("4111111111111111")
        );
        assert_eq!(
            whole_digits("$4,111,111,111,111,111.00").as_deref(),
            Some("4111111111111111")
        );
        assert_eq!(
            whole_digits("-4111111111111111.50").as_deref(),
            Some("4111111111111111")
        );
        assert_eq!(whole_digits("1.5e-3").as_deref(), Some(""));
        assert_eq!(whole_digits("NaN"), None);
        assert!(is_card_amount("4.111111111111111e+15"));
        // A huge exponent is not spelled out (a hex id such as `02002349004e38307423`
        // used to ask for 38 million zeros).
        assert_eq!(whole_digits("02002349004e38307423"), None);
        assert_eq!(whole_digits("1e2147483647"), None);
        assert_eq!(whole_digits("1e1023").map(|d| d.len()), Some(1024));
        assert!(!is_card_amount("02002349004e38307423"));
        assert_eq!(redact_text("req 02002349004e38307423d1b51288defd"), None);
        assert!(!is_card_amount("4111111111111112"));
        assert_eq!(whole_digits("12").as_deref(), Some("12"));
        for untouched in [
            "shipped 2026-11-24 10:00:00",
            "from 192.168.100.200",
            "order 12345",
            "v1.2.3",
            "id abc1234567890",
        ] {
            assert_eq!(redact_text(untouched), None, "{untouched}");
        }
    }

    #[test]
    fn json_strings_are_rewritten_in_place() {
        let out = json_strings(r#"{"b":{"email":"a@x.io"},"a":[1,"keep"]}"#, |key, v| {
            (key == Some("email")).then(|| email(v))
        })
        .unwrap();
        assert_eq!(out, r#"{"b":{"email":"***@x.io"},"a":[1,"keep"]}"#);
    }
}
