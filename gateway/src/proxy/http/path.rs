//! An HTTP request path, read once the way the upstream reads it.
//!
//! The path is percent-decoded once, its dot-segments and repeated slashes resolved,
//! and the upstream is sent the gateway's own encoding of exactly that path: policy and
//! upstream see one path, whatever spelling the agent chose (`/a/../admin`, `/%61dmin`,
//! `//admin`). What could be read two ways is refused instead of guessed at: an encoded
//! `/`, `\` or control character (servers disagree on whether it separates segments), a
//! `;`, encoded or not (some servers strip `;params` from a segment, some after
//! decoding, others not at all), a second layer of
//! encoding (`%252e` decodes to `%2e`, which a server that decodes twice reads as `.`),
//! a `..` that climbs above the root, and bytes that are not UTF-8.

use percent_encoding::{AsciiSet, CONTROLS, percent_decode, utf8_percent_encode};

/// What a path is refused for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not a path starting with `/`")]
    NotOriginForm,
    #[error("`%` not followed by two hex digits")]
    BadEscape,
    #[error("an encoded `/`, `\\` or control character in a path segment")]
    EncodedSeparator,
    #[error("a `\\` in the path, which some servers read as `/`")]
    Backslash,
    #[error("a `;` in the path, which some servers read as the start of parameters")]
    Semicolon,
    #[error("percent-encoding inside percent-encoding (e.g. `%252e`)")]
    DoubleEncoding,
    #[error("a `..` that climbs above the root")]
    AboveRoot,
    #[error("the decoded path is not UTF-8")]
    NotUtf8,
}

/// Refuses a query with a `%` not followed by two hex digits: servers differ on such a
/// pair (Go's `ParseQuery` drops it, others keep it as text), so policy and the
/// upstream could read different parameters.
pub fn check_query(query: &str) -> Result<(), PathError> {
    let bytes = query.as_bytes();
    for (i, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'%') {
        match bytes.get(i + 1..i + 3) {
            Some(hex) if hex.iter().all(u8::is_ascii_hexdigit) => {}
            _ => return Err(PathError::BadEscape),
        }
    }
    Ok(())
}

/// A path as policy sees it (`decoded`) and as the upstream is sent it (`encoded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalPath {
    /// Decoded, resolved, starting with `/`.
    pub decoded: String,
    /// The same path, percent-encoded by the gateway.
    pub encoded: String,
}

/// What stays unescaped in a segment the gateway sends: RFC 3986's `pchar` less `;`
/// (sub-delims, `:` and `@` are data in a segment) and less `%` (always escaped).
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'/')
    .add(b';')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b'\\')
    .add(b']')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// Reads a request's raw path (`/a/%2e%2e/b/`) into the one path it names.
pub fn normalise(raw: &str) -> Result<NormalPath, PathError> {
    let rest = raw.strip_prefix('/').ok_or(PathError::NotOriginForm)?;
    if raw.contains('\\') {
        return Err(PathError::Backslash);
    }
    if raw.contains(';') {
        return Err(PathError::Semicolon);
    }
    let raw_segments: Vec<&str> = rest.split('/').collect();
    let trailing_slash = raw_segments.len() > 1 && raw_segments.last() == Some(&"");
    let mut segments: Vec<String> = Vec::new();
    for raw_segment in raw_segments {
        let segment = decode_segment(raw_segment)?;
        match segment.as_str() {
            "" | "." => {}
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
            }
            _ => segments.push(segment),
        }
    }
    let mut decoded = String::with_capacity(raw.len());
    let mut encoded = String::with_capacity(raw.len());
    for segment in &segments {
        decoded.push('/');
        decoded.push_str(segment);
        encoded.push('/');
        encoded.extend(utf8_percent_encode(segment, SEGMENT));
    }
    if segments.is_empty() || trailing_slash {
        decoded.push('/');
        encoded.push('/');
    }
    Ok(NormalPath { decoded, encoded })
}

fn decode_segment(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return Err(PathError::BadEscape);
        }
    }
    let decoded: Vec<u8> = percent_decode(bytes).collect();
    if decoded
        .iter()
        .any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        return Err(PathError::EncodedSeparator);
    }
    if decoded.contains(&b';') {
        return Err(PathError::Semicolon);
    }
    if decoded
        .windows(3)
        .any(|w| w[0] == b'%' && w[1].is_ascii_hexdigit() && w[2].is_ascii_hexdigit())
    {
        return Err(PathError::DoubleEncoding);
    }
    String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(raw: &str) -> String {
        normalise(raw).unwrap().decoded
    }

    #[test]
    fn every_spelling_of_a_path_is_one_path() {
        for raw in [
            "/admin",
            "/%61dmin",
            "/%61%64%6D%69%6E",
            "//admin",
            "/./admin",
            "/a/../admin",
            "/a/b/../../admin",
            "/a/%2e%2e/admin",
            "/a/%2E./admin",
            "///a//..//admin",
        ] {
            let path = normalise(raw).unwrap();
            assert_eq!(path.decoded, "/admin", "{raw}");
            assert_eq!(path.encoded, "/admin", "{raw}");
        }
    }

    #[test]
    fn a_trailing_slash_and_the_root_are_kept() {
        assert_eq!(seen("/"), "/");
        assert_eq!(seen("//"), "/");
        assert_eq!(seen("/a/"), "/a/");
        assert_eq!(seen("/a/b/.."), "/a");
        assert_eq!(seen("/a/."), "/a");
    }

    #[test]
    fn what_could_be_read_two_ways_is_refused() {
        for (raw, error) in [
            ("admin", PathError::NotOriginForm),
            ("*", PathError::NotOriginForm),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%2Fb", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a%00b", PathError::EncodedSeparator),
            ("/a%0d%0aHost:x", PathError::EncodedSeparator),
            ("/a\\..\\admin", PathError::Backslash),
            ("/admin;x=1", PathError::Semicolon),
            ("/api;/../admin", PathError::Semicolon),
            ("/users/1%3b", PathError::Semicolon),
            ("/x/..%3B/admin", PathError::Semicolon),
            ("/%252e%252e/admin", PathError::DoubleEncoding),
            ("/%2541dmin", PathError::DoubleEncoding),
            ("/..", PathError::AboveRoot),
            ("/a/../../etc/passwd", PathError::AboveRoot),
            ("/%2e%2e/etc", PathError::AboveRoot),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/%ff", PathError::NotUtf8),
        ] {
            assert_eq!(normalise(raw), Err(error), "{raw}");
        }
    }

    #[test]
    fn the_upstream_gets_the_gateways_own_encoding() {
        let path = normalise("/files/a%20b/caf%C3%A9/100%25/x%3Fy").unwrap();
        assert_eq!(path.decoded, "/files/a b/café/100%/x?y");
        assert_eq!(path.encoded, "/files/a%20b/caf%C3%A9/100%25/x%3Fy");
        // Sub-delimiters, `:` and `@` are data in a segment and go as they came.
        assert_eq!(normalise("/v1/x:y@z,$!").unwrap().encoded, "/v1/x:y@z,$!");
    }

    #[test]
    fn the_encoding_reads_back_as_the_same_path() {
        for raw in ["/a%20b", "/%C3%A9t%C3%A9/", "/x%25y", "/q%3F%23"] {
            let once = normalise(raw).unwrap();
            let twice = normalise(&once.encoded).unwrap();
            assert_eq!(once, twice, "{raw}");
        }
    }
}
