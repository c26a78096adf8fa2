//! The ways the app proves its identity to Entra for the Fulfillment API token
//! (docs/credentials.md): a client secret, a client assertion signed with the app's
//! certificate, a federated token from a file (workload identity) or the host's managed
//! identity (requested in [`super::token`]).
//!
//! The two assertion forms are built here on `jsonwebtoken` (not `azure_identity`: its
//! certificate credential needs openssl, and it refuses plain-HTTP authorities such as our
//! simulator; see docs/credentials.md). Pure parts — [`parse_certificate`],
//! [`client_assertion`] — are separate from the file reads ([`CertificateFiles`],
//! [`read_federated_token`]), which run before each token refresh so a rotated certificate
//! or a re-projected token file is picked up without a restart.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use secrecy::SecretString;
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

/// The `client_assertion_type` of both assertion forms.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Lifetime of a certificate client assertion (Entra accepts up to a day; ten minutes is
/// what the Microsoft libraries use).
const ASSERTION_LIFETIME_SECS: i64 = 600;

/// A certificate and its private key, parsed.
pub struct LoadedCertificate {
    /// base64url SHA-256 of the certificate's DER: the `x5t#S256` header.
    pub thumbprint_s256: String,
    /// Hex SHA-1 thumbprint, as Entra's portal shows it (for messages only).
    pub thumbprint_sha1: String,
    pub not_after: OffsetDateTime,
    pub subject: String,
    key: EncodingKey,
}

impl fmt::Debug for LoadedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCertificate")
            .field("thumbprint_sha1", &self.thumbprint_sha1)
            .field("not_after", &self.not_after)
            .field("subject", &self.subject)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

/// Parses the certificate (first `CERTIFICATE` block of `cert_pem`) and the RSA private key
/// (`PRIVATE KEY` or `RSA PRIVATE KEY` block of `key_pem`, which may be the same text) and
/// checks that they belong together.
pub fn parse_certificate(cert_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCertificate, String> {
    let blocks = |text: &[u8]| pem::parse_many(text).map_err(|e| format!("not PEM: {e}"));
    let cert_der = blocks(cert_pem)?
        .into_iter()
        .find(|b| b.tag() == "CERTIFICATE")
        .ok_or("no CERTIFICATE block")?
        .into_contents();
    let key_block = blocks(key_pem)?
        .into_iter()
        .find(|b| matches!(b.tag(), "PRIVATE KEY" | "RSA PRIVATE KEY"))
        .ok_or(
            "no unencrypted PRIVATE KEY or RSA PRIVATE KEY block (Entra certificate \
                credentials use RSA keys; decrypt the key with `openssl pkey`)",
        )?;
    let (_, cert) = x509_parser::parse_x509_certificate(&cert_der)
        .map_err(|e| format!("the CERTIFICATE block is not an X.509 certificate: {e}"))?;
    let cert_public = cert.public_key().subject_public_key.data.to_vec();
    let key_public = match key_block.tag() {
        "PRIVATE KEY" => aws_lc_rs::rsa::KeyPair::from_pkcs8(key_block.contents()),
        _ => aws_lc_rs::rsa::KeyPair::from_der(key_block.contents()),
    }
    .map_err(|_| "the private key is not an RSA key (Entra certificate credentials use RSA)")?;
    use aws_lc_rs::signature::KeyPair as _;
    if key_public.public_key().as_ref() != cert_public.as_slice() {
        return Err("the private key does not belong to the certificate".into());
    }
    let key = EncodingKey::from_rsa_pem(pem::encode(&key_block).as_bytes())
        .map_err(|e| format!("unusable RSA key: {e}"))?;
    let not_after = OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|_| "the certificate's notAfter is out of range")?;
    Ok(LoadedCertificate {
        thumbprint_s256: thumbprint_s256(&cert_der),
        thumbprint_sha1: hex(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
            &cert_der,
        )
        .as_ref()),
        not_after,
        subject: cert.subject().to_string(),
        key,
    })
}

/// base64url(SHA-256(DER)): the `x5t#S256` of a certificate.
pub fn thumbprint_s256(cert_der: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        cert_der,
    ))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

/// The client assertion Entra expects from a certificate credential: a PS256 JWT with the
/// certificate's `x5t#S256`, issued by and about the app, for the token endpoint.
pub fn client_assertion(
    certificate: &LoadedCertificate,
    client_id: &str,
    token_endpoint: &str,
    now: OffsetDateTime,
) -> Result<String, String> {
    let mut header = Header::new(Algorithm::PS256);
    header.typ = Some("JWT".into());
    header.x5t_s256 = Some(certificate.thumbprint_s256.clone());
    let now = now.unix_timestamp();
    let claims = json!({
        "aud": token_endpoint,
        "iss": client_id,
        "sub": client_id,
        "jti": Uuid::new_v4(),
        "iat": now,
        "nbf": now,
        "exp": now + ASSERTION_LIFETIME_SECS,
    });
    jsonwebtoken::encode(&header, &claims, &certificate.key)
        .map_err(|e| format!("cannot sign the client assertion: {e}"))
}

/// The certificate and key files, re-read before each token refresh: a changed file
/// (rotation) is parsed again, an unchanged one is not.
pub struct CertificateFiles {
    pub certificate_path: PathBuf,
    /// `None`: the key is in the certificate file.
    pub key_path: Option<PathBuf>,
    loaded: Mutex<Option<(Vec<u8>, std::sync::Arc<LoadedCertificate>)>>,
}

impl fmt::Debug for CertificateFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateFiles")
            .field("certificate_path", &self.certificate_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl CertificateFiles {
    pub fn new(certificate_path: PathBuf, key_path: Option<PathBuf>) -> Self {
        Self {
            certificate_path,
            key_path,
            loaded: Mutex::new(None),
        }
    }

    /// The certificate as the files hold it now. Errors name the file and the fix.
    pub fn current(&self) -> Result<std::sync::Arc<LoadedCertificate>, String> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|e| {
                format!(
                    "cannot read {} (MARKETPLACE_CLIENT_CERTIFICATE_PATH / \
                     MARKETPLACE_CLIENT_CERTIFICATE_KEY_PATH): {e}",
                    path.display()
                )
            })
        };
        let cert = read(&self.certificate_path)?;
        let key = match &self.key_path {
            Some(path) => read(path)?,
            None => Vec::new(),
        };
        let mut both = cert.clone();
        both.extend_from_slice(&key);
        let mut slot = self.loaded.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, loaded)) = slot.as_ref()
            && *seen == both
        {
            return Ok(loaded.clone());
        }
        let key_text = if self.key_path.is_some() { &key } else { &cert };
        let loaded = std::sync::Arc::new(parse_certificate(&cert, key_text).map_err(|e| {
            format!(
                "the client certificate {} is unusable: {e}",
                self.certificate_path.display()
            )
        })?);
        if slot.is_some() {
            tracing::info!(
                thumbprint = %loaded.thumbprint_sha1,
                not_after = %loaded.not_after,
                "client certificate changed on disk; using the new one"
            );
        }
        *slot = Some((both, loaded.clone()));
        Ok(loaded)
    }
}

/// The federated token (workload identity): the file's content, re-read before each refresh
/// (the kubelet rotates it).
pub fn read_federated_token(path: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read the federated token file {} (AZURE_FEDERATED_TOKEN_FILE): {e}",
            path.display()
        )
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!(
            "the federated token file {} (AZURE_FEDERATED_TOKEN_FILE) is empty",
            path.display()
        ));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// A fresh RSA-2048 key, PKCS#8 DER: the certificates below and the simulator's token
/// signing key.
pub fn generate_rsa_pkcs8() -> anyhow::Result<Vec<u8>> {
    use aws_lc_rs::encoding::AsDer;
    let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .map_err(|_| anyhow::anyhow!("cannot generate an RSA key"))?;
    Ok(pair
        .as_der()
        .map_err(|_| anyhow::anyhow!("cannot export the RSA key"))?
        .as_ref()
        .to_vec())
}

/// A self-signed RSA certificate and its PKCS#8 key, PEM, valid from `not_before` to
/// `not_after`: for the simulator, the demo and tests (production certificates come from
/// Key Vault or a CA).
pub fn generate_self_signed(
    common_name: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> anyhow::Result<(String, String)> {
    let pkcs8 = generate_rsa_pkcs8()?;
    let key = rcgen::KeyPair::try_from(pkcs8.as_slice())?;
    let mut params = rcgen::CertificateParams::new(vec![common_name.to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.self_signed(&key)?;
    let cert_pem = pem::encode(&pem::Pem::new("CERTIFICATE", cert.der().to_vec()));
    let key_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8));
    Ok((cert_pem, key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn pair(days: i64) -> (String, String) {
        let now = OffsetDateTime::now_utc();
        generate_self_signed("test", now - Duration::days(1), now + Duration::days(days)).unwrap()
    }

    #[test]
    fn a_generated_certificate_parses_and_signs_an_assertion() {
        let (cert, key) = pair(30);
        let loaded = parse_certificate(cert.as_bytes(), key.as_bytes()).unwrap();
        let both = format!("{cert}{key}");
        let same = parse_certificate(both.as_bytes(), both.as_bytes()).unwrap();
        assert_eq!(loaded.thumbprint_s256, same.thumbprint_s256);
        let days_left = (loaded.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((29..=30).contains(&days_left), "{days_left}");
        let jwt = client_assertion(
            &loaded,
            "app",
            "https://x/t/oauth2/v2.0/token",
            OffsetDateTime::now_utc(),
        )
        .unwrap();
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.alg, Algorithm::PS256);
        assert_eq!(
            header.x5t_s256.as_deref(),
            Some(loaded.thumbprint_s256.as_str())
        );
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (cert, _) = pair(30);
        let (_, other_key) = pair(30);
        let err = parse_certificate(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(err.contains("does not belong"), "{err}");
        let err = parse_certificate(cert.as_bytes(), cert.as_bytes()).unwrap_err();
        assert!(err.contains("PRIVATE KEY"), "{err}");
        assert!(parse_certificate(b"junk", b"junk").is_err());
    }
}
