//! Entra's checks of the credentials other than the client secret, and the managed identity
//! endpoints (docs/credentials.md):
//!
//! - certificate client assertions, verified against the certificates registered on the
//!   app (`--client-certificate FILE`, `POST /simulator/entra/certificates`);
//! - federated assertions (workload identity) from a registered issuer and subject; the
//!   simulator is such an issuer itself (`{base}federation`, tokens minted by
//!   `POST /simulator/entra/federated-token`, signed with its keys);
//! - App Service's `IDENTITY_ENDPOINT` (`/msi/token`, header `X-IDENTITY-HEADER`) and IMDS
//!   (`/metadata/identity/oauth2/token`, header `Metadata: true`).
//!
//! Refusals carry Entra's codes: AADSTS700027 (certificate not registered, bad signature,
//! expired certificate), AADSTS700024 (assertion outside its validity), AADSTS50012 (wrong
//! audience), AADSTS700021 (assertion of another app), AADSTS700211/700212/70021 (no
//! federated credential for the issuer / audience / subject).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use axum::Json;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use super::IssuerVersion;
use super::state::Shared;
use crate::marketplace::credential::{JWT_BEARER, thumbprint_s256};
use crate::settings::MARKETPLACE_APP_ID;

/// The audience of federated tokens Entra accepts by default.
pub const FEDERATED_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Clock skew Entra tolerates on assertions.
const SKEW_SECS: i64 = 300;

/// A certificate registered on the app.
struct RegisteredCertificate {
    thumbprint_s256: String,
    thumbprint_sha1: String,
    /// PKCS#1 `RSAPublicKey`.
    public_key: Vec<u8>,
    not_after: i64,
}

/// A federated identity credential of the app.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    #[serde(default = "default_audience")]
    pub audience: String,
}

fn default_audience() -> String {
    FEDERATED_AUDIENCE.into()
}

/// The app's certificates and federated credentials.
#[derive(Default)]
pub(crate) struct Registrations {
    certificates: RwLock<Vec<RegisteredCertificate>>,
    federated: RwLock<Vec<FederatedCredential>>,
}

impl Registrations {
    /// Registers the certificate of a PEM text (a key in it is ignored). Returns its SHA-1
    /// thumbprint, as the portal shows it.
    pub fn add_certificate(&self, pem_text: &[u8]) -> Result<String, String> {
        let der = pem::parse_many(pem_text)
            .map_err(|e| format!("not PEM: {e}"))?
            .into_iter()
            .find(|b| b.tag() == "CERTIFICATE")
            .ok_or("no CERTIFICATE block")?
            .into_contents();
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| format!("not an X.509 certificate: {e}"))?;
        let sha1: String =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY, &der)
                .as_ref()
                .iter()
                .map(|b| format!("{b:02X}"))
                .collect();
        let registered = RegisteredCertificate {
            thumbprint_s256: thumbprint_s256(&der),
            thumbprint_sha1: sha1.clone(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            not_after: cert.validity().not_after.timestamp(),
        };
        let mut certificates = self
            .certificates
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        certificates.retain(|c| c.thumbprint_s256 != registered.thumbprint_s256);
        certificates.push(registered);
        Ok(sha1)
    }

    /// Removes a certificate by SHA-1 thumbprint; whether it was there.
    pub fn remove_certificate(&self, sha1: &str) -> bool {
        let mut certificates = self
            .certificates
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let before = certificates.len();
        certificates.retain(|c| !c.thumbprint_sha1.eq_ignore_ascii_case(sha1));
        before != certificates.len()
    }

    pub fn add_federated(&self, credential: FederatedCredential) {
        let mut federated = self
            .federated
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if !federated.contains(&credential) {
            federated.push(credential);
        }
    }
}

/// An Entra refusal: status, OAuth error, AADSTS number, description.
pub(crate) struct Refusal(pub StatusCode, pub &'static str, pub u32, pub String);

fn invalid_client(code: u32, description: impl Into<String>) -> Refusal {
    Refusal(
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        code,
        description.into(),
    )
}

fn malformed() -> Refusal {
    Refusal(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        50027,
        "JWT token is invalid or malformed.".into(),
    )
}

fn decode_part(part: &str) -> Result<Map<String, Value>, Refusal> {
    URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(malformed)
}

/// Checks `client_assertion` as Entra does for the app `client_id` at the token endpoint
/// `audiences` (v2, v1 URLs).
pub(crate) fn check_assertion(
    shared: &Shared,
    form: &HashMap<String, String>,
    audiences: &[String],
) -> Result<(), Refusal> {
    if form.get("client_assertion_type").map(String::as_str) != Some(JWT_BEARER) {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            50027,
            format!("client_assertion_type must be {JWT_BEARER}."),
        ));
    }
    let assertion = form
        .get("client_assertion")
        .map(String::as_str)
        .unwrap_or("");
    let parts: Vec<&str> = assertion.split('.').collect();
    if parts.len() != 3 {
        return Err(malformed());
    }
    let header = decode_part(parts[0])?;
    let claims = decode_part(parts[1])?;
    let client_id = shared.config.client_id.to_string();
    let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or("");
    if text("iss").eq_ignore_ascii_case(&client_id) {
        check_certificate_assertion(shared, assertion, &header, &claims, &client_id, audiences)
    } else {
        check_federated_assertion(shared, assertion, &claims)
    }
}

fn check_time(claims: &Map<String, Value>) -> Result<(), Refusal> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(0);
    let nbf = claims
        .get("nbf")
        .and_then(Value::as_i64)
        .unwrap_or(i64::MIN);
    if exp + SKEW_SECS <= now || nbf > now + SKEW_SECS {
        return Err(invalid_client(
            700024,
            format!(
                "Client assertion is not within its valid time range. Current time: {now}, \
                 assertion valid from {nbf}, expiry time of assertion {exp}. Review the \
                 documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials ."
            ),
        ));
    }
    Ok(())
}

fn check_certificate_assertion(
    shared: &Shared,
    assertion: &str,
    header: &Map<String, Value>,
    claims: &Map<String, Value>,
    client_id: &str,
    audiences: &[String],
) -> Result<(), Refusal> {
    let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or("");
    if !text("sub").eq_ignore_ascii_case(client_id) {
        return Err(invalid_client(
            700021,
            "Client assertion application identifier doesn't match 'client_id' parameter.",
        ));
    }
    let s256 = header.get("x5t#S256").and_then(Value::as_str);
    let sha1 = header.get("x5t").and_then(Value::as_str).and_then(|t| {
        URL_SAFE_NO_PAD
            .decode(t)
            .ok()
            .map(|b| b.iter().map(|b| format!("{b:02X}")).collect::<String>())
    });
    let certificates = shared
        .credentials
        .certificates
        .read()
        .unwrap_or_else(PoisonError::into_inner);
    let Some(cert) = certificates.iter().find(|c| {
        Some(c.thumbprint_s256.as_str()) == s256 || sha1.as_deref() == Some(&c.thumbprint_sha1)
    }) else {
        return Err(invalid_client(
            700027,
            format!(
                "The certificate with identifier used to sign the client assertion is not \
                 registered on application. [Reason - The key was not found., Thumbprint of key \
                 used by client: '{}', Please visit the Azure Portal, Graph Explorer or directly \
                 use MS Graph to see configured keys for app Id '{client_id}'.]",
                s256.map(str::to_owned).or(sha1).unwrap_or_default()
            ),
        ));
    };
    let algorithm = match header.get("alg").and_then(Value::as_str) {
        Some("PS256") => Algorithm::PS256,
        Some("RS256") => Algorithm::RS256,
        _ => {
            return Err(invalid_client(
                700027,
                "Client assertion failed signature validation. [Reason - The algorithm is not supported (RS256 or PS256).]",
            ));
        }
    };
    let mut validation = Validation::new(algorithm);
    validation.validate_exp = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    if jsonwebtoken::decode::<Value>(
        assertion,
        &DecodingKey::from_rsa_der(&cert.public_key),
        &validation,
    )
    .is_err()
    {
        return Err(invalid_client(
            700027,
            "Client assertion failed signature validation. [Reason - The provided signature value did not match the expected signature value.]",
        ));
    }
    if cert.not_after <= OffsetDateTime::now_utc().unix_timestamp() {
        return Err(invalid_client(
            700027,
            format!(
                "Client assertion contains an invalid signature. [Reason - The key used is \
                 expired., Thumbprint of key used by client: '{}']",
                cert.thumbprint_sha1
            ),
        ));
    }
    drop(certificates);
    check_time(claims)?;
    let audience_ok = match claims.get("aud") {
        Some(Value::String(aud)) => audiences.iter().any(|a| a == aud),
        Some(Value::Array(auds)) => auds.iter().any(|aud| audiences.iter().any(|a| a == aud)),
        _ => false,
    };
    if !audience_ok {
        return Err(invalid_client(
            50012,
            "Client assertion audience claim does not match Realm issuer. Review the \
             documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials .",
        ));
    }
    Ok(())
}

fn check_federated_assertion(
    shared: &Shared,
    assertion: &str,
    claims: &Map<String, Value>,
) -> Result<(), Refusal> {
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (issuer, subject) = (text("iss"), text("sub"));
    let audience = match claims.get("aud") {
        Some(Value::Array(auds)) => auds
            .first()
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        _ => text("aud"),
    };
    let federated = shared
        .credentials
        .federated
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let of_issuer: Vec<&FederatedCredential> =
        federated.iter().filter(|f| f.issuer == issuer).collect();
    if of_issuer.is_empty() {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            700211,
            format!(
                "No matching federated identity record found for presented assertion issuer '{issuer}'."
            ),
        ));
    }
    // Only the simulator's own issuer can be verified (its keys); others are not fetched.
    if issuer != federation_issuer(shared) || shared.keys.verify(assertion).is_err() {
        return Err(invalid_client(
            700027,
            "Client assertion failed signature validation. [Reason - The key was not found.]",
        ));
    }
    check_time(claims)?;
    if !of_issuer.iter().any(|f| f.audience == audience) {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            700212,
            format!(
                "No matching federated identity record found for presented assertion audience '{audience}'."
            ),
        ));
    }
    if !of_issuer
        .iter()
        .any(|f| f.subject == subject && f.audience == audience)
    {
        return Err(Refusal(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            70021,
            format!(
                "No matching federated identity record found for presented assertion. Assertion \
                 Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{audience}'."
            ),
        ));
    }
    Ok(())
}

/// `{base}federation`: the OIDC issuer the simulator plays for workload identity tests.
pub(crate) fn federation_issuer(shared: &Shared) -> String {
    format!("{}federation", shared.base_url)
}

/// A federated token as a Kubernetes service-account token issuer would project it.
pub(crate) fn mint_federated_token(
    shared: &Shared,
    subject: &str,
    audience: &str,
    lifetime_secs: i64,
) -> anyhow::Result<String> {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    shared.keys.current().sign(&json!({
        "iss": federation_issuer(shared),
        "sub": subject,
        "aud": [audience],
        "iat": now, "nbf": now, "exp": now + lifetime_secs,
    }))
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/msi/token", get(app_service_token))
        .route("/metadata/identity/oauth2/token", get(imds_token))
        .route("/simulator/entra/certificates", post(register_certificate))
        .route(
            "/simulator/entra/federated-credentials",
            post(register_federated),
        )
        .route("/simulator/entra/federated-token", post(federated_token))
        .route(
            "/federation/.well-known/openid-configuration",
            get(federation_metadata),
        )
}

fn error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// The resource of a managed identity request: the marketplace API (with or without
/// `/.default`).
fn managed_identity_token(
    shared: &Shared,
    query: &HashMap<String, String>,
    with_expires_in: bool,
) -> Response {
    let resource = query
        .get("resource")
        .map(|r| r.trim_end_matches("/.default"))
        .unwrap_or("");
    if resource != MARKETPLACE_APP_ID && resource != format!("api://{MARKETPLACE_APP_ID}") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_resource",
            &format!(
                "AADSTS500011: The resource principal named {resource} was not found in the tenant."
            ),
        );
    }
    if let Some(client_id) = query.get("client_id")
        && !client_id.eq_ignore_ascii_case(&shared.config.client_id.to_string())
    {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Identity not found",
        );
    }
    let claims = shared.access_token_claims(IssuerVersion::V2);
    match shared.keys.current().sign(&claims) {
        Ok(token) => {
            let mut body = json!({
                "access_token": token,
                "expires_on": claims["exp"].to_string(),
                "resource": MARKETPLACE_APP_ID,
                "token_type": "Bearer",
                "client_id": shared.config.client_id,
            });
            if with_expires_in {
                body["expires_in"] = json!(
                    (claims["exp"].as_i64().unwrap_or(0) - claims["iat"].as_i64().unwrap_or(0))
                        .to_string()
                );
            }
            Json(body).into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "temporarily_unavailable",
            &e.to_string(),
        ),
    }
}

async fn app_service_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let presented = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let ok = match &shared.config.identity_header {
        Some(expected) => presented == secrecy::ExposeSecret::expose_secret(expected),
        None => !presented.is_empty(),
    };
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_request",
            "The X-IDENTITY-HEADER is missing or does not match IDENTITY_HEADER.",
        );
    }
    managed_identity_token(&shared, &query, false)
}

async fn imds_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Required metadata header not specified",
        );
    }
    managed_identity_token(&shared, &query, true)
}

async fn register_certificate(
    State(shared): State<Arc<Shared>>,
    body: axum::body::Bytes,
) -> Response {
    match shared.credentials.add_certificate(&body) {
        Ok(thumbprint) => (
            StatusCode::CREATED,
            Json(json!({ "thumbprint": thumbprint })),
        )
            .into_response(),
        Err(why) => error(StatusCode::BAD_REQUEST, "invalid_request", &why),
    }
}

async fn register_federated(
    State(shared): State<Arc<Shared>>,
    Json(credential): Json<FederatedCredential>,
) -> Response {
    shared.credentials.add_federated(credential);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct FederatedTokenRequest {
    subject: String,
    #[serde(default = "default_audience")]
    audience: String,
    #[serde(default = "default_lifetime")]
    lifetime_secs: i64,
}

fn default_lifetime() -> i64 {
    3600
}

async fn federated_token(
    State(shared): State<Arc<Shared>>,
    Json(request): Json<FederatedTokenRequest>,
) -> Response {
    match mint_federated_token(
        &shared,
        &request.subject,
        &request.audience,
        request.lifetime_secs,
    ) {
        Ok(token) => {
            Json(json!({ "token": token, "issuer": federation_issuer(&shared) })).into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            &e.to_string(),
        ),
    }
}

async fn federation_metadata(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let issuer = federation_issuer(&shared);
    Json(json!({
        "issuer": issuer,
        "jwks_uri": format!("{}{}/discovery/v2.0/keys", shared.base_url, shared.config.tenant_id),
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}
