//! The Entra side: RS256 signing keys (rotatable, all published), the client-credentials
//! token endpoints (the interactive sign-in is in [`super::sign_in`]) in their v2 and v1 shapes, the JWKS and OpenID metadata, and the two
//! kinds of JWT the marketplace involves: access tokens the publisher presents to the API
//! (§2, §2.5) and the tokens Microsoft puts on webhook calls (§6.6).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};

use anyhow::Context;
use aws_lc_rs::rsa::{KeyPair, PublicKeyComponents};
use aws_lc_rs::signature::{
    KeyPair as _, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_SHA256, UnparsedPublicKey,
};
use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, http::HeaderMap};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::IssuerVersion;
use super::faults::JwksFault;
use super::state::Shared;
use crate::settings::MARKETPLACE_APP_ID;

/// Lifetime of access tokens and webhook tokens: one hour (§2.4).
const TOKEN_LIFETIME_SECS: i64 = 3600;

/// How long the webhook sender reuses one token (well inside its lifetime).
const SENDER_TOKEN_REUSE: std::time::Duration = std::time::Duration::from_secs(300);

/// One RSA signing key.
pub(crate) struct SigningKey {
    pub kid: String,
    pair: KeyPair,
    pkcs8: Vec<u8>,
    /// PKCS#1 `RSAPublicKey`, for verification.
    public_der: Vec<u8>,
    n: String,
    e: String,
}

impl SigningKey {
    fn generate() -> anyhow::Result<Self> {
        Self::from_pkcs8(&crate::marketplace::credential::generate_rsa_pkcs8()?)
    }

    fn from_pkcs8(pkcs8: &[u8]) -> anyhow::Result<Self> {
        let pair = KeyPair::from_pkcs8(pkcs8).map_err(|e| anyhow::anyhow!("bad RSA key: {e}"))?;
        let public = pair.public_key();
        let public_der = public.as_ref().to_vec();
        let components = PublicKeyComponents::<Vec<u8>>::from(public);
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &public_der);
        Ok(Self {
            kid: URL_SAFE_NO_PAD.encode(&digest.as_ref()[..20]),
            pair,
            pkcs8: pkcs8.to_vec(),
            public_der,
            n: URL_SAFE_NO_PAD.encode(&components.n),
            e: URL_SAFE_NO_PAD.encode(&components.e),
        })
    }

    fn jwk(&self) -> Value {
        json!({
            "kty": "RSA", "use": "sig", "kid": self.kid, "x5t": self.kid,
            "n": self.n, "e": self.e, "alg": "RS256",
        })
    }

    /// A compact RS256 JWS of `claims`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let header = json!({ "typ": "JWT", "alg": "RS256", "kid": self.kid, "x5t": self.kid });
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header)?),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims)?)
        );
        let mut signature = vec![0; self.pair.public_modulus_len()];
        self.pair
            .sign(
                &RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                message.as_bytes(),
                &mut signature,
            )
            .map_err(|_| anyhow::anyhow!("RSA signing failed"))?;
        Ok(format!("{message}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// Every key ever generated (all published in the JWKS); the last one signs.
pub(crate) struct KeyRing {
    keys: RwLock<Vec<Arc<SigningKey>>>,
}

impl KeyRing {
    pub fn generate() -> anyhow::Result<Self> {
        Ok(Self {
            keys: RwLock::new(vec![Arc::new(SigningKey::generate()?)]),
        })
    }

    /// Restores keys saved by [`KeyRing::export`] (base64 PKCS#8, oldest first).
    pub fn restore(saved: &[String]) -> anyhow::Result<Self> {
        let keys = saved
            .iter()
            .map(|b64| {
                let der = STANDARD.decode(b64).context("saved key is not base64")?;
                SigningKey::from_pkcs8(&der).map(Arc::new)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        if keys.is_empty() {
            return Self::generate();
        }
        Ok(Self {
            keys: RwLock::new(keys),
        })
    }

    pub fn export(&self) -> Vec<String> {
        self.all()
            .iter()
            .map(|k| STANDARD.encode(&k.pkcs8))
            .collect()
    }

    fn all(&self) -> Vec<Arc<SigningKey>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn current(&self) -> Arc<SigningKey> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(keys.last().expect("a key ring always holds a key"))
    }

    /// Adds a new signing key; older ones stay published. Returns the new `kid`.
    pub fn rotate(&self) -> anyhow::Result<String> {
        let key = Arc::new(SigningKey::generate()?);
        let kid = key.kid.clone();
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(key);
        Ok(kid)
    }

    pub fn kids(&self) -> Vec<String> {
        self.all().iter().map(|k| k.kid.clone()).collect()
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": self.all().iter().map(|k| k.jwk()).collect::<Vec<_>>() })
    }

    /// Checks the signature of an RS256 JWT signed by one of our keys; returns its claims.
    pub fn verify(&self, token: &str) -> Result<Map<String, Value>, String> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("not a compact JWT".into());
        };
        let decode_json = |part: &str| -> Result<Map<String, Value>, String> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| "JWT part is not base64url".to_string())?;
            serde_json::from_slice(&bytes).map_err(|_| "JWT part is not a JSON object".to_string())
        };
        let signed = &token[..header.len() + 1 + payload.len()];
        let header = decode_json(header)?;
        if header.get("alg").and_then(Value::as_str) != Some("RS256") {
            return Err("alg must be RS256".into());
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or("no kid in the JWT header")?;
        let key = self
            .all()
            .into_iter()
            .find(|k| k.kid == kid)
            .ok_or_else(|| format!("unknown signing key {kid}"))?;
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "signature is not base64url".to_string())?;
        UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &key.public_der)
            .verify(signed.as_bytes(), &signature)
            .map_err(|_| "bad signature".to_string())?;
        decode_json(payload)
    }
}

impl Shared {
    fn v2_issuer(&self) -> String {
        format!("{}{}/v2.0", self.base_url, self.config.tenant_id)
    }

    fn v1_issuer(&self) -> String {
        format!("https://sts.windows.net/{}/", self.config.tenant_id)
    }

    /// The claims of an access token for the marketplace API, as Entra issues them to the
    /// publisher's app.
    pub fn access_token_claims(&self, version: IssuerVersion) -> Value {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let client = self.config.client_id.to_string();
        let mut claims = json!({
            "aud": MARKETPLACE_APP_ID,
            "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME_SECS,
            "tid": self.config.tenant_id,
            "oid": client, "sub": client, "idtyp": "app",
        });
        match version {
            IssuerVersion::V1 => {
                claims["iss"] = json!(self.v1_issuer());
                claims["appid"] = json!(client);
                claims["appidacr"] = json!("1");
                claims["ver"] = json!("1.0");
            }
            IssuerVersion::V2 => {
                claims["iss"] = json!(self.v2_issuer());
                claims["azp"] = json!(client);
                claims["azpacr"] = json!("1");
                claims["ver"] = json!("2.0");
            }
        }
        claims
    }

    /// The claims Microsoft's webhook calls carry (§6.6): issued to the publisher's app by
    /// the marketplace's own app.
    pub fn webhook_token_claims(&self) -> Value {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut claims = json!({
            "aud": self.config.client_id,
            "iat": now, "nbf": now, "exp": now + TOKEN_LIFETIME_SECS,
            "tid": self.config.tenant_id,
            "oid": MARKETPLACE_APP_ID, "sub": MARKETPLACE_APP_ID, "idtyp": "app",
        });
        match self.config.issuer {
            IssuerVersion::V1 => {
                claims["iss"] = json!(self.v1_issuer());
                claims["appid"] = json!(MARKETPLACE_APP_ID);
                claims["ver"] = json!("1.0");
            }
            IssuerVersion::V2 => {
                claims["iss"] = json!(self.v2_issuer());
                claims["azp"] = json!(MARKETPLACE_APP_ID);
                claims["ver"] = json!("2.0");
            }
        }
        claims
    }

    /// The bearer token on the sender's webhook calls. Like Microsoft's sender, which gets
    /// an hour-long token from Entra and reuses it, one token serves many calls: it is
    /// minted again after [`SENDER_TOKEN_REUSE`] or when the signing key changes.
    pub fn sender_webhook_token(&self) -> anyhow::Result<String> {
        let key = self.keys.current();
        let mut slot = self
            .sender_token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((kid, token, minted)) = slot.as_ref()
            && *kid == key.kid
            && minted.elapsed() < SENDER_TOKEN_REUSE
        {
            return Ok(token.clone());
        }
        let token = self.mint_webhook_token(&Value::Null)?;
        *slot = Some((key.kid.clone(), token.clone(), std::time::Instant::now()));
        Ok(token)
    }

    /// A webhook token with `overrides` merged into the claims (a `null` removes a claim).
    pub fn mint_webhook_token(&self, overrides: &Value) -> anyhow::Result<String> {
        let mut claims = self.webhook_token_claims();
        if let (Some(target), Some(changes)) = (claims.as_object_mut(), overrides.as_object()) {
            for (name, value) in changes {
                if value.is_null() {
                    target.remove(name);
                } else {
                    target.insert(name.clone(), value.clone());
                }
            }
        }
        self.keys.current().sign(&claims)
    }

    /// Accepts a bearer token for the public API: signed by us, unexpired, for the
    /// marketplace API, issued in the publisher's tenant to the publisher's app (§2.5).
    pub fn authorize_access_token(&self, token: &str) -> Result<(), String> {
        let claims = self.keys.verify(token)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let number = |name: &str| claims.get(name).and_then(Value::as_i64);
        let text = |name: &str| claims.get(name).and_then(Value::as_str).unwrap_or("");
        if number("exp").is_none_or(|exp| exp <= now) {
            return Err("the token has expired".into());
        }
        if number("nbf").is_some_and(|nbf| nbf > now + 60) {
            return Err("the token is not valid yet".into());
        }
        let audience_ok = match claims.get("aud") {
            Some(Value::String(aud)) => aud == MARKETPLACE_APP_ID,
            Some(Value::Array(auds)) => auds.iter().any(|a| a == MARKETPLACE_APP_ID),
            _ => false,
        };
        if !audience_ok {
            return Err(format!("the token audience is not {MARKETPLACE_APP_ID}"));
        }
        let tenant = self.config.tenant_id.to_string();
        if !text("tid").eq_ignore_ascii_case(&tenant) {
            return Err("the token was issued in another tenant".into());
        }
        let issuer = text("iss");
        if issuer != self.v1_issuer()
            && issuer != self.v2_issuer()
            && issuer != format!("https://login.microsoftonline.com/{tenant}/v2.0")
        {
            return Err(format!("unexpected issuer {issuer}"));
        }
        let app = if claims.contains_key("appid") {
            text("appid")
        } else {
            text("azp")
        };
        if !app.eq_ignore_ascii_case(&self.config.client_id.to_string()) {
            return Err(
                "the token belongs to another application than the offer's (Technical configuration)"
                    .into(),
            );
        }
        Ok(())
    }
}

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/{tenant}/oauth2/v2.0/token", post(token_v2))
        .route(
            "/{tenant}/oauth2/v2.0/authorize",
            get(super::sign_in::authorize_form).post(super::sign_in::authorize_submit),
        )
        .route("/{tenant}/oauth2/token", post(token_v1))
        .route("/{tenant}/discovery/v2.0/keys", get(jwks))
        .route("/{tenant}/discovery/keys", get(jwks))
        .route(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            get(openid_configuration_v2),
        )
        .route(
            "/{tenant}/.well-known/openid-configuration",
            get(openid_configuration_v1),
        )
}

/// An Entra-style OAuth error (`error`, `error_description`, `error_codes`, ...).
fn oauth_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    let trace = Uuid::new_v4();
    (
        status,
        Json(json!({
            "error": error,
            "error_description": format!("AADSTS{code}: {description} Trace ID: {trace}"),
            "error_codes": [code],
            "timestamp": super::state::wire_time(OffsetDateTime::now_utc()),
            "trace_id": trace,
            "correlation_id": Uuid::new_v4(),
        })),
    )
        .into_response()
}

/// Checks the form of a client-credentials request; `target` is the `scope` (v2) or
/// `resource` (v1) parameter and what it must name.
fn check_client_credentials(
    shared: &Shared,
    tenant: &str,
    form: &HashMap<String, String>,
    target: (&str, &[String]),
) -> Result<(), Box<Response>> {
    let tenant_ok = Uuid::parse_str(tenant).is_ok_and(|t| t == shared.config.tenant_id);
    if !tenant_ok {
        return Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!("Tenant '{tenant}' not found."),
        )));
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type; only client_credentials is simulated.",
        )));
    }
    let client_ok = form
        .get("client_id")
        .and_then(|c| Uuid::parse_str(c.trim()).ok())
        .is_some_and(|c| c == shared.config.client_id);
    if !client_ok {
        return Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            "Application with the given identifier was not found in the directory.",
        )));
    }
    if form.contains_key("client_assertion") || form.contains_key("client_assertion_type") {
        let audiences: Vec<String> = [
            format!("{}{tenant}/oauth2/v2.0/token", shared.base_url),
            format!("{}{tenant}/oauth2/token", shared.base_url),
            format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
            format!("https://login.microsoftonline.com/{tenant}/oauth2/token"),
        ]
        .into();
        super::credentials::check_assertion(shared, form, &audiences).map_err(
            |super::credentials::Refusal(status, error, code, description)| {
                Box::new(oauth_error(status, error, code, &description))
            },
        )?;
    } else if !form.contains_key("client_secret") {
        return Err(Box::new(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000218,
            "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
        )));
    }
    let presented = form.get("client_secret").map(String::as_str).unwrap_or("");
    let secret_ok = form.contains_key("client_assertion")
        || match &shared.config.client_secret {
            Some(secret) => presented == secret.expose_secret(),
            None => !presented.is_empty(),
        };
    if !secret_ok {
        return Err(Box::new(oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID.",
        )));
    }
    let (name, accepted) = target;
    let value = form.get(name).map(|v| v.trim()).unwrap_or("");
    if !accepted.iter().any(|a| a == value) {
        return Err(Box::new(oauth_error(
            StatusCode::BAD_REQUEST,
            if name == "scope" {
                "invalid_scope"
            } else {
                "invalid_resource"
            },
            500011,
            &format!(
                "The resource principal named {value} was not found in the tenant. Expected {name}={}.",
                accepted[0]
            ),
        )));
    }
    Ok(())
}

fn parse_form(body: &[u8]) -> HashMap<String, String> {
    url::form_urlencoded::parse(body).into_owned().collect()
}

async fn token_v2(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    if form.get("grant_type").map(String::as_str) == Some("authorization_code") {
        return super::sign_in::redeem_code(&shared, &form);
    }
    let scopes = [
        format!("{MARKETPLACE_APP_ID}/.default"),
        format!("api://{MARKETPLACE_APP_ID}/.default"),
    ];
    if let Err(response) = check_client_credentials(&shared, &tenant, &form, ("scope", &scopes)) {
        return *response;
    }
    match shared
        .keys
        .current()
        .sign(&shared.access_token_claims(IssuerVersion::V2))
    {
        Ok(token) => Json(json!({
            "token_type": "Bearer",
            "expires_in": TOKEN_LIFETIME_SECS - 1,
            "ext_expires_in": TOKEN_LIFETIME_SECS - 1,
            "access_token": token,
        }))
        .into_response(),
        Err(e) => signing_failed(&e),
    }
}

async fn token_v1(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    body: Bytes,
) -> Response {
    let form = parse_form(&body);
    let resources = [MARKETPLACE_APP_ID.to_string()];
    if let Err(response) =
        check_client_credentials(&shared, &tenant, &form, ("resource", &resources))
    {
        return *response;
    }
    let claims = shared.access_token_claims(IssuerVersion::V1);
    match shared.keys.current().sign(&claims) {
        // v1 answers carry numbers as strings (§2.4).
        Ok(token) => Json(json!({
            "token_type": "Bearer",
            "expires_in": (TOKEN_LIFETIME_SECS - 1).to_string(),
            "ext_expires_in": "0",
            "expires_on": claims["exp"].to_string(),
            "not_before": claims["nbf"].to_string(),
            "resource": MARKETPLACE_APP_ID,
            "access_token": token,
        }))
        .into_response(),
        Err(e) => signing_failed(&e),
    }
}

fn signing_failed(error: &anyhow::Error) -> Response {
    tracing::error!(error = %error, "cannot sign a token");
    oauth_error(
        StatusCode::INTERNAL_SERVER_ERROR,
        "temporarily_unavailable",
        50000,
        "There was an error issuing a token.",
    )
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    shared.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    // Entra publishes the same keys for every tenant.
    let mut jwks = shared.keys.jwks();
    match shared.read(|st| st.faults.jwks) {
        JwksFault::Serve => Json(jwks).into_response(),
        JwksFault::NewestOnly => {
            let keys = jwks["keys"].as_array_mut().expect("a key list");
            keys.drain(..keys.len() - 1);
            Json(jwks).into_response()
        }
        JwksFault::Fail => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        JwksFault::Garbage => {
            let page = "<html><body>Sign in to continue</body></html>";
            ([("content-type", "text/html")], page).into_response()
        }
        JwksFault::NoKeys => Json(json!({ "keys": [
            { "kty": "oct", "kid": "x", "k": "c2VjcmV0" },
            { "kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB" },
        ] }))
        .into_response(),
    }
}

async fn openid_configuration_v2(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
    _headers: HeaderMap,
) -> Json<Value> {
    let base = &shared.base_url;
    Json(json!({
        "issuer": format!("{base}{tenant}/v2.0"),
        "token_endpoint": format!("{base}{tenant}/oauth2/v2.0/token"),
        "jwks_uri": format!("{base}{tenant}/discovery/v2.0/keys"),
        "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["pairwise"],
        "tenant_region_scope": "NA",
    }))
}

async fn openid_configuration_v1(
    State(shared): State<Arc<Shared>>,
    Path(tenant): Path<String>,
) -> Json<Value> {
    let base = &shared.base_url;
    Json(json!({
        "issuer": format!("https://sts.windows.net/{tenant}/"),
        "token_endpoint": format!("{base}{tenant}/oauth2/token"),
        "jwks_uri": format!("{base}{tenant}/discovery/keys"),
        "token_endpoint_auth_methods_supported": ["client_secret_post"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_and_tampering_is_detected() {
        let ring = KeyRing::generate().unwrap();
        let token = ring.current().sign(&json!({"aud": "x", "n": 1})).unwrap();
        assert_eq!(ring.verify(&token).unwrap()["aud"], "x");

        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"aud":"y","n":1}"#);
        parts[1] = &forged;
        assert_eq!(ring.verify(&parts.join(".")).unwrap_err(), "bad signature");
    }

    #[test]
    fn rotation_keeps_old_keys_verifiable_and_survives_export() {
        let ring = KeyRing::generate().unwrap();
        let old = ring.current().sign(&json!({"k": "old"})).unwrap();
        let new_kid = ring.rotate().unwrap();
        assert_eq!(ring.current().kid, new_kid);
        assert!(ring.verify(&old).is_ok());
        assert_eq!(ring.jwks()["keys"].as_array().unwrap().len(), 2);

        let restored = KeyRing::restore(&ring.export()).unwrap();
        assert_eq!(restored.kids(), ring.kids());
        assert!(restored.verify(&old).is_ok());
    }
}
