//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>, "Signature scheme"):
//! HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}` with the secret's bytes (the
//! base64 after `whsec_`), sent as `v1,<base64>`; several space-separated during a secret
//! rotation. A few lines over the aws-lc-rs HMAC we already ship (crates.md, survey
//! 2026-12), checked against the specification's test vector here and against the
//! `standardwebhooks` crate in `tests/isv_webhooks.rs`.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

const PREFIX: &str = "whsec_";
/// Random bytes of a generated secret (Svix uses 24).
const SECRET_BYTES: usize = 24;

/// An endpoint's signing secret, `whsec_<base64>`. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret that cannot sign.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    #[error("a webhook secret starts with `whsec_`")]
    MissingPrefix,
    #[error("a webhook secret is `whsec_` and base64: {0}")]
    NotBase64(String),
    #[error("a webhook secret has at least 16 bytes")]
    TooShort,
}

impl Secret {
    /// A fresh random secret.
    pub fn generate() -> Self {
        let mut key = vec![0u8; SECRET_BYTES];
        aws_lc_rs::rand::fill(&mut key).expect("the system random generator works");
        Self {
            text: format!("{PREFIX}{}", STANDARD.encode(&key)),
            key,
        }
    }

    /// Parses a stored or given `whsec_…` secret.
    pub fn parse(text: &str) -> Result<Self, SecretError> {
        let encoded = text
            .strip_prefix(PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|e| SecretError::NotBase64(e.to_string()))?;
        if key.len() < 16 {
            return Err(SecretError::TooShort);
        }
        Ok(Self {
            text: text.to_owned(),
            key,
        })
    }

    /// The `whsec_…` text: to store, and to show once.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// `v1,<base64 HMAC-SHA256>` of one message.
    fn signature(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let key = hmac::Key::new(hmac::HMAC_SHA256, &self.key);
        let mut context = hmac::Context::with_key(&key);
        context.update(id.as_bytes());
        context.update(b".");
        context.update(timestamp.to_string().as_bytes());
        context.update(b".");
        context.update(body);
        format!("v1,{}", STANDARD.encode(context.sign().as_ref()))
    }
}

/// The `webhook-signature` header: one signature per secret (the current one first).
pub fn sign(secrets: &[&Secret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| secret.signature(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether `header` (a `webhook-signature` value) holds a valid `v1` signature by `secret`
/// of the message; compared in constant time. For our own receivers (the demo's).
pub fn verify(secret: &Secret, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let key = hmac::Key::new(hmac::HMAC_SHA256, &secret.key);
    let mut signed = Vec::with_capacity(id.len() + body.len() + 24);
    signed.extend_from_slice(id.as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    header
        .split(' ')
        .filter_map(|part| part.strip_prefix("v1,"))
        .filter_map(|encoded| STANDARD.decode(encoded).ok())
        .any(|tag| hmac::verify(&key, &signed, &tag).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The specification's test vector (standard-webhooks, `libraries/`: every
    /// implementation's tests use it).
    #[test]
    fn signs_the_specification_test_vector() {
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let header = sign(
            &[&secret],
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1_614_265_330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(header, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_rotation_sends_one_signature_per_secret() {
        let old = Secret::generate();
        let new = Secret::generate();
        let header = sign(&[&new, &old], "evt", 1, b"{}");
        let parts: Vec<&str> = header.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], sign(&[&new], "evt", 1, b"{}"));
        assert_eq!(parts[1], sign(&[&old], "evt", 1, b"{}"));
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn verify_accepts_any_listed_signature_and_refuses_a_changed_body() {
        let old = Secret::generate();
        let new = Secret::generate();
        let header = sign(&[&new, &old], "evt", 7, b"{}");
        assert!(verify(&old, "evt", 7, b"{}", &header));
        assert!(verify(&new, "evt", 7, b"{}", &header));
        assert!(!verify(&new, "evt", 7, b"{ }", &header));
        assert!(!verify(&new, "evt", 8, b"{}", &header));
        assert!(!verify(&Secret::generate(), "evt", 7, b"{}", &header));
        assert!(!verify(&new, "evt", 7, b"{}", "v2,abc"));
    }

    #[test]
    fn generated_secrets_are_fresh_and_parse_back() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert_ne!(a, b);
        assert!(a.expose().starts_with("whsec_"));
        assert_eq!(Secret::parse(a.expose()).unwrap(), a);
        assert!(!format!("{a:?}").contains(a.expose()));
    }

    #[test]
    fn malformed_secrets_are_refused() {
        assert_eq!(Secret::parse("MfKQ9r8G"), Err(SecretError::MissingPrefix));
        assert!(matches!(
            Secret::parse("whsec_!!!"),
            Err(SecretError::NotBase64(_))
        ));
        assert_eq!(Secret::parse("whsec_AAAA"), Err(SecretError::TooShort));
    }
}
