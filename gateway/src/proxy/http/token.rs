//! The grant an HTTP request presents: `Authorization: Bearer GRANT_ID.SECRET`, or
//! Basic authentication with the grant id as user and its secret as password (for
//! clients that only speak Basic).

use base64::Engine as _;
use hyper::header::{AUTHORIZATION, HeaderMap};

/// Why a request's credential was not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum TokenError {
    #[error(
        "no grant: send `Authorization: Bearer GRANT_ID.SECRET` (airlock connect does it for you)"
    )]
    Missing,
    #[error("more than one Authorization header")]
    Repeated,
    #[error("the Authorization header is not `Bearer GRANT_ID.SECRET` or Basic GRANT_ID:SECRET")]
    Malformed,
}

/// A presented grant id and secret.
pub(super) struct Token {
    pub id: String,
    pub secret: String,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Token({}, ***)", self.id)
    }
}

/// The bearer token an agent sends for a grant.
pub fn bearer(id: &str, secret: &str) -> String {
    format!("{id}.{secret}")
}

pub(super) fn grant_token(headers: &HeaderMap) -> Result<Token, TokenError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(TokenError::Missing)?;
    if values.next().is_some() {
        return Err(TokenError::Repeated);
    }
    let value = value.to_str().map_err(|_| TokenError::Malformed)?;
    let (scheme, rest) = value.split_once(' ').ok_or(TokenError::Malformed)?;
    let rest = rest.trim();
    let (id, secret) = if scheme.eq_ignore_ascii_case("bearer") {
        rest.split_once('.').ok_or(TokenError::Malformed)?
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| TokenError::Malformed)?;
        let text = String::from_utf8(decoded).map_err(|_| TokenError::Malformed)?;
        let (id, secret) = text.split_once(':').ok_or(TokenError::Malformed)?;
        return Ok(Token {
            id: id.to_string(),
            secret: secret.to_string(),
        });
    } else {
        return Err(TokenError::Malformed);
    };
    if id.is_empty() || secret.is_empty() {
        return Err(TokenError::Malformed);
    }
    Ok(Token {
        id: id.to_string(),
        secret: secret.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(values: &[&str]) -> Result<(String, String), TokenError> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(AUTHORIZATION, v.parse().unwrap());
        }
        grant_token(&headers).map(|t| (t.id, t.secret))
    }

    #[test]
    fn bearer_and_basic_carry_the_same_grant() {
        let want = Ok(("g_0123456789".to_string(), "c2VjcmV0".to_string()));
        assert_eq!(read(&["Bearer g_0123456789.c2VjcmV0"]), want);
        assert_eq!(read(&["bearer  g_0123456789.c2VjcmV0"]), want);
        let basic = base64::engine::general_purpose::STANDARD.encode("g_0123456789:c2VjcmV0");
        assert_eq!(read(&[&format!("Basic {basic}")]), want);
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(read(&[]), Err(TokenError::Missing));
        assert_eq!(
            read(&["Bearer a.b", "Bearer c.d"]),
            Err(TokenError::Repeated)
        );
        for bad in [
            "Bearer",
            "Bearer nodot",
            "Bearer .x",
            "Bearer x.",
            "Token a.b",
            "Basic !!",
        ] {
            assert_eq!(read(&[bad]), Err(TokenError::Malformed), "{bad}");
        }
    }
}
