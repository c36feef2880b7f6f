//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL speaks it: the
//! agent proves it holds the grant secret without sending it, and the gateway proves it
//! holds the verifier. The verifier is PostgreSQL's own format, minted when the secret
//! is: `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Why a SCRAM exchange failed. The client sees only "password authentication failed".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported on this connection")]
    ChannelBinding,
    #[error("proof does not match")]
    BadProof,
}

/// A stored SCRAM verifier.
#[derive(Clone)]
pub struct Verifier {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl Verifier {
    /// Parses PostgreSQL's verifier format.
    pub fn parse(text: &str) -> Option<Self> {
        let rest = text.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iterations, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(Verifier {
            iterations: iterations.parse().ok()?,
            salt: B64.decode(salt).ok()?,
            stored_key: B64.decode(stored).ok()?.try_into().ok()?,
            server_key: B64.decode(server).ok()?.try_into().ok()?,
        })
    }

    /// A verifier no proof matches: used for unknown users, so that an unknown grant
    /// and a wrong secret look the same from outside.
    pub fn impossible() -> Self {
        let mut random = [0u8; 48];
        getrandom::fill(&mut random).expect("the OS random number generator is unavailable");
        Verifier {
            iterations: 4096,
            salt: random[..16].to_vec(),
            stored_key: random[16..48].try_into().expect("32 bytes"),
            server_key: [0; 32],
        }
    }
}

/// One SCRAM exchange in progress.
pub struct Exchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

impl Exchange {
    /// Takes the client-first message; returns the exchange and the server-first
    /// message to send.
    pub fn start(verifier: Verifier, client_first: &str) -> Result<(Self, String), ScramError> {
        // gs2 header: "n,," (no channel binding) or "y,," (client could, server can't).
        let bare = client_first
            .strip_prefix("n,,")
            .or_else(|| client_first.strip_prefix("y,,"))
            .ok_or(if client_first.starts_with("p=") {
                ScramError::ChannelBinding
            } else {
                ScramError::Malformed("gs2 header")
            })?;
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic() && b != b','))
            .ok_or(ScramError::Malformed("client nonce"))?;
        let mut server_nonce = [0u8; 18];
        getrandom::fill(&mut server_nonce).expect("the OS random number generator is unavailable");
        let nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            Exchange {
                verifier,
                client_first_bare: bare.to_string(),
                server_first: server_first.clone(),
                nonce,
            },
            server_first,
        ))
    }

    /// Takes the client-final message; returns the server-final message if the proof
    /// is right.
    pub fn finish(self, client_final: &str) -> Result<String, ScramError> {
        let (without_proof, proof) = client_final
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        // "biws" is base64("n,,"), "eSws" base64("y,,"): no channel binding data.
        if !matches!(channel, Some("biws" | "eSws")) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce"));
        }
        let proof: [u8; 32] = B64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof encoding"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let stored_key: [u8; 32] = Sha256::digest(&client_key).into();
        if !bool::from(stored_key.ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// The server side against postgres-protocol's client side (what tokio-postgres uses).
    fn exchange(secret: &str, presented: &str) -> Result<(), ScramError> {
        let verifier = Verifier::parse(&postgres_protocol::password::scram_sha_256(
            secret.as_bytes(),
        ))
        .expect("a PostgreSQL verifier parses");
        let mut client = ScramSha256::new(presented.as_bytes(), ChannelBinding::unsupported());
        let first = std::str::from_utf8(client.message()).unwrap().to_string();
        let (server, server_first) = Exchange::start(verifier, &first)?;
        client.update(server_first.as_bytes()).unwrap();
        let final_message = std::str::from_utf8(client.message()).unwrap().to_string();
        let server_final = server.finish(&final_message)?;
        client
            .finish(server_final.as_bytes())
            .expect("the client accepts the server's proof");
        Ok(())
    }

    #[test]
    fn the_right_secret_authenticates_and_a_wrong_one_does_not() {
        assert_eq!(exchange("grant-secret", "grant-secret"), Ok(()));
        assert_eq!(
            exchange("grant-secret", "grant-secreT"),
            Err(ScramError::BadProof)
        );
    }

    #[test]
    fn the_impossible_verifier_refuses_everything() {
        let mut client = ScramSha256::new(b"anything", ChannelBinding::unsupported());
        let first = std::str::from_utf8(client.message()).unwrap().to_string();
        let (server, server_first) = Exchange::start(Verifier::impossible(), &first).unwrap();
        client.update(server_first.as_bytes()).unwrap();
        let final_message = std::str::from_utf8(client.message()).unwrap().to_string();
        assert_eq!(server.finish(&final_message), Err(ScramError::BadProof));
    }

    #[test]
    fn malformed_messages_are_refused() {
        let verifier = Verifier::impossible();
        assert!(Exchange::start(verifier.clone(), "garbage").is_err());
        assert_eq!(
            Exchange::start(verifier.clone(), "p=tls-server-end-point,,n=,r=abc").err(),
            Some(ScramError::ChannelBinding)
        );
        let (server, _) = Exchange::start(verifier, "n,,n=,r=abc").unwrap();
        assert!(server.finish("c=biws,r=wrong,p=AAAA").is_err());
    }
}
