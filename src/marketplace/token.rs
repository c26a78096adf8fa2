//! Entra ID client-credentials tokens for the Marketplace API (docs/marketplace.md §2).
//!
//! One token per provider, cached and refreshed five minutes before it expires (at
//! half-life for tokens shorter than ten minutes). Refreshes are single-flight: the cache
//! sits behind a `tokio::sync::Mutex` held across the request, so concurrent callers wait
//! for the one refresh in progress instead of starting their own. If a refresh fails while
//! the old token is still valid, the old token is used. The client secret and the tokens
//! never reach `Debug` or logs.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use reqwest::header::HeaderMap;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;

use super::client::build_http_client;
use super::credential::{CertificateFiles, JWT_BEARER, client_assertion, read_federated_token};
use super::error::{Call, Error, Failure, TransientCause};
use crate::settings::{
    ChosenCredential, CredentialKind, MARKETPLACE_APP_ID, MarketplaceSettings, Settings,
    TokenEndpoint,
};

/// Refresh this long before expiry.
const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);
/// A cached token this close to expiry is not used even when a refresh fails.
const EXPIRY_SKEW: Duration = Duration::from_secs(30);
/// Assumed lifetime when Entra omits `expires_in` (it never should).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// A bearer token for the Marketplace API. Its `Debug` is redacted.
#[derive(Clone)]
pub struct AccessToken {
    secret: SecretString,
    /// Which fetch produced it, so a 403 only invalidates the token it was sent with.
    generation: u64,
}

impl AccessToken {
    pub(crate) fn expose(&self) -> &str {
        self.secret.expose_secret()
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"[REDACTED]")
            .field("generation", &self.generation)
            .finish()
    }
}

/// Hands out bearer tokens for the Marketplace API. Cheap to clone (shared cache).
#[derive(Clone)]
pub struct TokenProvider {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    cache: Mutex<Option<Cached>>,
    generation: AtomicU64,
    /// `MARKETPLACE_CLIENT_SECRET_EXPIRES_AT`, for the secret's health.
    secret_expires_at: Option<time::OffsetDateTime>,
}

enum Source {
    Entra(EntraSource),
    ManagedIdentity(ManagedIdentitySource),
    Static(SecretString),
}

struct EntraSource {
    http: reqwest::Client,
    endpoint: Url,
    version: TokenEndpoint,
    client_id: String,
    auth: ClientAuth,
}

/// How the app authenticates on Entra's token endpoint.
enum ClientAuth {
    Secret(SecretString),
    Certificate(CertificateFiles),
    /// The federated token file (workload identity).
    Federated(PathBuf),
}

/// The host's managed identity: App Service style (`IDENTITY_ENDPOINT` + `IDENTITY_HEADER`)
/// or IMDS.
struct ManagedIdentitySource {
    http: reqwest::Client,
    endpoint: Url,
    /// `X-IDENTITY-HEADER` (App Service) or `Metadata: true` (IMDS).
    header: (&'static str, SecretString),
}

/// What a credential's health depends on: which credential, and when it expires (`None`:
/// nothing to renew, or unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialStatus {
    pub kind: CredentialKind,
    pub expires_at: Option<time::OffsetDateTime>,
    /// What it is, for people: "certificate CN=… (thumbprint …)".
    pub description: String,
}

struct Cached {
    token: AccessToken,
    refresh_at: Instant,
    expires_at: Instant,
}

impl TokenProvider {
    /// A provider for the Entra app of `settings`. Fails, naming the environment
    /// variables, when the tenant, client id or secret is missing.
    pub fn new(settings: &MarketplaceSettings) -> Result<Self, Error> {
        let missing: Vec<&str> = [
            (settings.tenant_id.is_none(), "MARKETPLACE_TENANT_ID"),
            (settings.client_id.is_none(), "MARKETPLACE_CLIENT_ID"),
            (
                settings.client_secret.is_none(),
                "MARKETPLACE_CLIENT_SECRET",
            ),
        ]
        .into_iter()
        .filter_map(|(absent, var)| absent.then_some(var))
        .collect();
        let (Some(tenant_id), Some(client_id), Some(client_secret)) = (
            settings.tenant_id,
            settings.client_id,
            settings.client_secret.clone(),
        ) else {
            return Err(Error::Configuration {
                message: format!(
                    "{} not set: the Entra tenant id, application (client) id and client \
                     secret of the app registered in Partner Center (Technical configuration) \
                     are needed to call the Marketplace API",
                    missing.join(", ")
                ),
            });
        };
        let path = match settings.token_endpoint {
            TokenEndpoint::V2 => format!("{tenant_id}/oauth2/v2.0/token"),
            TokenEndpoint::V1 => format!("{tenant_id}/oauth2/token"),
        };
        let endpoint = super::client::base_with_slash(&settings.entra_authority_url)
            .join(&path)
            .map_err(|e| Error::Configuration {
                message: format!("invalid ENTRA_AUTHORITY_URL: {e}"),
            })?;
        Ok(Self::from_source(Source::Entra(EntraSource {
            http: build_http_client(settings.request_timeout)?,
            endpoint,
            version: settings.token_endpoint,
            client_id: client_id.to_string(),
            auth: ClientAuth::Secret(client_secret),
        })))
    }

    /// A provider for the credential the settings choose (`MARKETPLACE_CREDENTIAL`, or the
    /// first the environment provides). Fails, naming the variables, when none is set or
    /// the chosen one lacks something; a certificate is loaded (and checked) here already.
    pub fn for_settings(settings: &Settings) -> Result<Self, Error> {
        let m = &settings.marketplace;
        let c = &settings.credential;
        let configuration = |message: String| Error::Configuration { message };
        let chosen = c
            .choose(m.client_secret.is_some())
            .map_err(|missing| configuration(missing.to_owned()))?;
        let mut provider = match chosen {
            ChosenCredential::Secret => Self::new(m)?,
            ChosenCredential::Certificate(path) => {
                let files = CertificateFiles::new(path, c.certificate_key_path.clone());
                files.current().map_err(configuration)?;
                Self::assertion_provider(
                    m,
                    m.tenant_id,
                    m.client_id,
                    &m.entra_authority_url,
                    ("MARKETPLACE_TENANT_ID", "MARKETPLACE_CLIENT_ID"),
                    ClientAuth::Certificate(files),
                )?
            }
            ChosenCredential::WorkloadIdentity(path) => Self::assertion_provider(
                m,
                c.azure_tenant_id.or(m.tenant_id),
                c.azure_client_id.or(m.client_id),
                c.azure_authority_host
                    .as_ref()
                    .unwrap_or(&m.entra_authority_url),
                ("AZURE_TENANT_ID", "AZURE_CLIENT_ID"),
                ClientAuth::Federated(path),
            )?,
            ChosenCredential::ManagedIdentity => {
                let (mut endpoint, header) = match (&c.identity_endpoint, &c.identity_header) {
                    (Some(endpoint), Some(header)) => {
                        let mut endpoint = endpoint.clone();
                        endpoint
                            .query_pairs_mut()
                            .append_pair("api-version", "2019-08-01");
                        (endpoint, ("x-identity-header", header.clone()))
                    }
                    (Some(_), None) | (None, Some(_)) => {
                        return Err(configuration(
                            "IDENTITY_ENDPOINT and IDENTITY_HEADER go together (App Service and \
                             Container Apps set both); unset both to use IMDS"
                                .into(),
                        ));
                    }
                    (None, None) => {
                        let mut endpoint = super::client::base_with_slash(&c.imds_endpoint)
                            .join("metadata/identity/oauth2/token")
                            .map_err(|e| {
                                configuration(format!("invalid MARKETPLACE_IMDS_ENDPOINT: {e}"))
                            })?;
                        endpoint
                            .query_pairs_mut()
                            .append_pair("api-version", "2018-02-01");
                        (
                            endpoint,
                            ("metadata", SecretString::from("true".to_owned())),
                        )
                    }
                };
                endpoint
                    .query_pairs_mut()
                    .append_pair("resource", MARKETPLACE_APP_ID);
                if let Some(client_id) = c.azure_client_id {
                    // A user-assigned identity; without it, the system-assigned one.
                    endpoint
                        .query_pairs_mut()
                        .append_pair("client_id", &client_id.to_string());
                }
                Self::from_source(Source::ManagedIdentity(ManagedIdentitySource {
                    http: build_http_client(m.request_timeout)?,
                    endpoint,
                    header,
                }))
            }
        };
        if let Some(inner) = Arc::get_mut(&mut provider.inner) {
            inner.secret_expires_at = c.secret_expires_at;
        }
        Ok(provider)
    }

    fn assertion_provider(
        m: &MarketplaceSettings,
        tenant_id: Option<uuid::Uuid>,
        client_id: Option<uuid::Uuid>,
        authority: &Url,
        names: (&str, &str),
        auth: ClientAuth,
    ) -> Result<Self, Error> {
        let (Some(tenant_id), Some(client_id)) = (tenant_id, client_id) else {
            return Err(Error::Configuration {
                message: format!(
                    "{} and {} are needed: the Entra tenant id and application (client) id of \
                     the app registered in Partner Center (Technical configuration)",
                    names.0, names.1
                ),
            });
        };
        let path = match m.token_endpoint {
            TokenEndpoint::V2 => format!("{tenant_id}/oauth2/v2.0/token"),
            TokenEndpoint::V1 => format!("{tenant_id}/oauth2/token"),
        };
        let endpoint = super::client::base_with_slash(authority)
            .join(&path)
            .map_err(|e| Error::Configuration {
                message: format!("invalid Entra authority {authority}: {e}"),
            })?;
        Ok(Self::from_source(Source::Entra(EntraSource {
            http: build_http_client(m.request_timeout)?,
            endpoint,
            version: m.token_endpoint,
            client_id: client_id.to_string(),
            auth,
        })))
    }

    /// The credential in use and when it expires (a certificate's `notAfter` is read from
    /// the file as it is now; a secret's from `MARKETPLACE_CLIENT_SECRET_EXPIRES_AT`).
    pub fn credential_status(&self) -> Result<CredentialStatus, String> {
        let (kind, expires_at, description) = match &self.inner.source {
            Source::Static(_) => (CredentialKind::Secret, None, "a static token".to_owned()),
            Source::ManagedIdentity(mi) => (
                CredentialKind::ManagedIdentity,
                None,
                format!("managed identity at {}", without_query(&mi.endpoint)),
            ),
            Source::Entra(entra) => match &entra.auth {
                ClientAuth::Secret(_) => (
                    CredentialKind::Secret,
                    self.inner.secret_expires_at,
                    format!("client secret of app {}", entra.client_id),
                ),
                ClientAuth::Federated(path) => (
                    CredentialKind::WorkloadIdentity,
                    None,
                    format!(
                        "federated token {} for app {}",
                        path.display(),
                        entra.client_id
                    ),
                ),
                ClientAuth::Certificate(files) => {
                    let cert = files.current()?;
                    (
                        CredentialKind::Certificate,
                        Some(cert.not_after),
                        format!(
                            "certificate {} (thumbprint {}) of app {}",
                            cert.subject, cert.thumbprint_sha1, entra.client_id
                        ),
                    )
                }
            },
        };
        Ok(CredentialStatus {
            kind,
            expires_at,
            description,
        })
    }

    /// A provider that always hands out `token` (tests, or a simulator without Entra).
    pub fn from_static(token: SecretString) -> Self {
        Self::from_source(Source::Static(token))
    }

    fn from_source(source: Source) -> Self {
        Self {
            inner: Arc::new(Inner {
                source,
                cache: Mutex::new(None),
                generation: AtomicU64::new(0),
                secret_expires_at: None,
            }),
        }
    }

    /// A valid token: the cached one, or a fresh one (one request for all waiting callers).
    pub async fn token(&self) -> Result<AccessToken, Error> {
        if let Source::Static(secret) = &self.inner.source {
            return Ok(AccessToken {
                secret: secret.clone(),
                generation: 0,
            });
        }
        let mut cache = self.inner.cache.lock().await;
        let now = Instant::now();
        if let Some(cached) = cache.as_ref()
            && now < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let fetched = self.fetch().await;
        if let Err(error) = &fetched {
            let code = failure_code(error);
            crate::metrics::record_token_refresh_failure(&code);
            tracing::warn!(code = %code, %error, "Entra token refresh failed");
        }
        match fetched {
            Ok(fresh) => {
                let token = fresh.token.clone();
                *cache = Some(fresh);
                Ok(token)
            }
            Err(error) => match cache.as_ref() {
                Some(cached) if Instant::now() + EXPIRY_SKEW < cached.expires_at => {
                    tracing::warn!(%error, "Entra token refresh failed; using the cached token until it expires");
                    Ok(cached.token.clone())
                }
                _ => Err(error),
            },
        }
    }

    /// Drops the cached token so the next call fetches a new one (e.g. after a 403).
    pub async fn invalidate(&self) {
        *self.inner.cache.lock().await = None;
    }

    /// Drops the cached token only if it is `used`: a 403 answered to an old token must
    /// not throw away the fresh one another task just fetched.
    pub(crate) async fn invalidate_if_current(&self, used: &AccessToken) {
        let mut cache = self.inner.cache.lock().await;
        if cache
            .as_ref()
            .is_some_and(|c| c.token.generation == used.generation)
        {
            *cache = None;
        }
    }

    /// The token request of the configured credential (files are read here).
    fn request(&self) -> Result<(reqwest::RequestBuilder, String), Error> {
        match &self.inner.source {
            Source::Static(_) => Err(Error::Configuration {
                message: "a static token is never fetched".into(),
            }),
            Source::ManagedIdentity(mi) => Ok((
                mi.http
                    .get(mi.endpoint.clone())
                    .header(mi.header.0, mi.header.1.expose_secret()),
                format!("GET {}", without_query(&mi.endpoint)),
            )),
            Source::Entra(entra) => {
                let mut form: Vec<(&str, String)> = vec![
                    ("grant_type", "client_credentials".into()),
                    ("client_id", entra.client_id.clone()),
                ];
                let configuration = |message: String| Error::Configuration { message };
                match &entra.auth {
                    ClientAuth::Secret(secret) => {
                        form.push(("client_secret", secret.expose_secret().to_owned()));
                    }
                    ClientAuth::Certificate(files) => {
                        let cert = files.current().map_err(configuration)?;
                        let assertion = client_assertion(
                            &cert,
                            &entra.client_id,
                            entra.endpoint.as_str(),
                            time::OffsetDateTime::now_utc(),
                        )
                        .map_err(configuration)?;
                        form.push(("client_assertion_type", JWT_BEARER.into()));
                        form.push(("client_assertion", assertion));
                    }
                    ClientAuth::Federated(path) => {
                        let token = read_federated_token(path).map_err(configuration)?;
                        form.push(("client_assertion_type", JWT_BEARER.into()));
                        form.push(("client_assertion", token.expose_secret().to_owned()));
                    }
                }
                match entra.version {
                    TokenEndpoint::V2 => {
                        form.push(("scope", format!("{MARKETPLACE_APP_ID}/.default")))
                    }
                    TokenEndpoint::V1 => form.push(("resource", MARKETPLACE_APP_ID.into())),
                }
                Ok((
                    entra.http.post(entra.endpoint.clone()).form(&form),
                    format!("POST {}", entra.endpoint),
                ))
            }
        }
    }

    async fn fetch(&self) -> Result<Cached, Error> {
        let sent_at = Instant::now();
        let (request, target) = self.request()?;
        let failure = || Failure::new(Call::EntraToken, target.clone());
        let response = request
            .send()
            .await
            .inspect_err(|_| {
                crate::metrics::record_marketplace_request(
                    Call::EntraToken.as_str(),
                    None,
                    sent_at.elapsed(),
                )
            })
            .map_err(|e| Error::from_transport(e, failure()))?;
        let status = response.status().as_u16();
        crate::metrics::record_marketplace_request(
            Call::EntraToken.as_str(),
            Some(status),
            sent_at.elapsed(),
        );
        let headers = response.headers().clone();
        let body = response
            .bytes()
            .await
            .map_err(|e| Error::from_transport(e, failure()))?;
        tracing::debug!(
            call = Call::EntraToken.as_str(),
            status,
            endpoint = %target,
            "Entra token request"
        );
        if !(200..300).contains(&status) {
            return Err(classify_entra(status, &headers, &body, failure()));
        }
        let parsed: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            // The body holds the token: keep it out of the error.
            Error::permanent(
                Failure::new(Call::EntraToken, "unreadable Entra token response").with_source(e),
            )
        })?;
        let access_token = parsed
            .access_token
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| {
                Error::permanent(Failure::new(
                    Call::EntraToken,
                    "Entra token response without access_token",
                ))
            })?;
        if let Some(kind) = parsed.token_type.as_deref()
            && !kind.eq_ignore_ascii_case("bearer")
        {
            return Err(Error::permanent(Failure::new(
                Call::EntraToken,
                format!("unexpected token_type {kind:?}"),
            )));
        }
        let lifetime = parsed
            .expires_in
            .as_ref()
            .and_then(seconds)
            .or_else(|| {
                // Managed identity endpoints may give only `expires_on` (Unix seconds).
                let on = parsed.expires_on.as_ref().and_then(seconds)?.as_secs();
                let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
                (on > now).then(|| Duration::from_secs(on - now))
            })
            .unwrap_or(DEFAULT_LIFETIME);
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::info!(
            lifetime_secs = lifetime.as_secs(),
            generation,
            "fetched an Entra token for the Marketplace API"
        );
        Ok(Cached {
            token: AccessToken {
                secret: SecretString::from(access_token),
                generation,
            },
            refresh_at: sent_at + refresh_after(lifetime),
            expires_at: sent_at + lifetime,
        })
    }
}

/// When to refresh a token valid for `lifetime`: 5 minutes early, or at half-life for
/// tokens of less than 10 minutes.
pub(crate) fn refresh_after(lifetime: Duration) -> Duration {
    if lifetime >= REFRESH_MARGIN * 2 {
        lifetime - REFRESH_MARGIN
    } else {
        lifetime / 2
    }
}

/// Entra answers 400/401 for bad credentials (`invalid_client`, `unauthorized_client`,
/// AADSTS700016 unknown app, AADSTS500011 missing service principal): configuration, never
/// retried. 429/5xx are retried.
fn classify_entra(status: u16, headers: &HeaderMap, body: &[u8], failure: Failure) -> Error {
    let code = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned));
    let failure = Failure {
        detail: match &code {
            Some(code) => format!("{}: HTTP {status} {code}", failure.detail),
            None => format!("{}: HTTP {status}", failure.detail),
        },
        ..failure
    }
    .with_status(status, body);
    match status {
        400 | 401 | 403 => Error::Unauthorized {
            failure: Box::new(failure),
        },
        _ => match Error::from_status(status, headers, failure) {
            Error::Transient { failure, .. } => Error::Transient {
                cause: TransientCause::Status,
                failure,
            },
            other => other,
        },
    }
}

/// `expires_in` arrives as a number (v2) or a string (v1).
fn seconds(value: &Value) -> Option<Duration> {
    let secs = match value {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().map(|f| f.max(0.0) as u64)),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    }?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    token_type: Option<String>,
    expires_in: Option<Value>,
    expires_on: Option<Value>,
}

/// A URL without its query (the managed identity URLs carry only public parameters, but
/// logs stay short).
fn without_query(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// The label of a failed refresh: Entra's `AADSTS…` code, else its OAuth `error`, else the
/// error's kind (`transient`, `configuration`, …).
pub fn failure_code(error: &Error) -> String {
    let body: Option<Value> = error
        .failure()
        .and_then(|f| f.body.as_deref())
        .and_then(|b| serde_json::from_str(b).ok());
    let field = |name: &str| {
        body.as_ref()
            .and_then(|b| b.get(name))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    field("error_description")
        .and_then(|d| {
            let start = d.find("AADSTS")?;
            let code: String = d[start..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            (code.len() > "AADSTS".len()).then_some(code)
        })
        .or_else(|| field("error"))
        .unwrap_or_else(|| error.kind().to_owned())
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.source {
            Source::Entra(entra) => f
                .debug_struct("TokenProvider")
                .field("endpoint", &entra.endpoint.as_str())
                .field("version", &entra.version)
                .field("client_id", &entra.client_id)
                .field(
                    "credential",
                    &match &entra.auth {
                        ClientAuth::Secret(_) => "client secret [REDACTED]".to_owned(),
                        ClientAuth::Certificate(files) => format!("{files:?}"),
                        ClientAuth::Federated(path) => {
                            format!("federated token {}", path.display())
                        }
                    },
                )
                .finish_non_exhaustive(),
            Source::ManagedIdentity(mi) => f
                .debug_struct("TokenProvider")
                .field("managed_identity", &without_query(&mi.endpoint))
                .finish_non_exhaustive(),
            Source::Static(_) => f
                .debug_struct("TokenProvider")
                .field("token", &"[REDACTED static]")
                .finish(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn settings() -> MarketplaceSettings {
        MarketplaceSettings {
            api_url: Url::parse("http://127.0.0.1:1/api").unwrap(),
            entra_authority_url: Url::parse("https://login.microsoftonline.com").unwrap(),
            tenant_id: Some(Uuid::nil()),
            client_id: Some(Uuid::max()),
            client_secret: Some(SecretString::from("hunter2-secret".to_owned())),
            token_endpoint: TokenEndpoint::V2,
            request_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn missing_credentials_name_the_environment_variables() {
        let err = TokenProvider::new(&MarketplaceSettings {
            tenant_id: None,
            client_secret: None,
            ..settings()
        })
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("MARKETPLACE_TENANT_ID"), "{text}");
        assert!(text.contains("MARKETPLACE_CLIENT_SECRET"), "{text}");
        assert!(!text.contains("MARKETPLACE_CLIENT_ID"), "{text}");
        assert_eq!(err.kind(), "configuration");
    }

    #[test]
    fn endpoints_follow_the_configured_version() {
        let v2 = TokenProvider::new(&settings()).unwrap();
        let debug = format!("{v2:?}");
        assert!(
            debug.contains(
                "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/oauth2/v2.0/token"
            ),
            "{debug}"
        );
        assert!(!debug.contains("hunter2"), "{debug}");
        let v1 = TokenProvider::new(&MarketplaceSettings {
            token_endpoint: TokenEndpoint::V1,
            entra_authority_url: Url::parse("http://127.0.0.1:8090/entra/").unwrap(),
            ..settings()
        })
        .unwrap();
        assert!(format!("{v1:?}").contains(
            "http://127.0.0.1:8090/entra/00000000-0000-0000-0000-000000000000/oauth2/token"
        ));
    }

    #[test]
    fn tokens_are_refreshed_five_minutes_early_or_at_half_life() {
        assert_eq!(
            refresh_after(Duration::from_secs(3599)),
            Duration::from_secs(3299)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(60)),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(1)),
            Duration::from_millis(500)
        );
    }

    #[test]
    fn expires_in_is_a_number_or_a_string() {
        assert_eq!(
            seconds(&serde_json::json!(3599)),
            Some(Duration::from_secs(3599))
        );
        assert_eq!(
            seconds(&serde_json::json!("3600")),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(seconds(&serde_json::json!("soon")), None);
        assert_eq!(seconds(&serde_json::json!(0)), None);
    }

    #[test]
    fn entra_credential_errors_are_not_retried_but_outages_are() {
        let h = HeaderMap::new();
        let f = || Failure::new(Call::EntraToken, "POST x");
        let body = br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided."}"#;
        let e = classify_entra(401, &h, body, f());
        assert_eq!(e.kind(), "unauthorized");
        assert!(!e.is_retryable());
        assert!(e.to_string().contains("invalid_client"), "{e}");
        assert_eq!(classify_entra(400, &h, body, f()).kind(), "unauthorized");
        assert!(classify_entra(429, &h, b"", f()).is_retryable());
        assert!(classify_entra(503, &h, b"", f()).is_retryable());
        assert!(classify_entra(500, &h, b"", f()).request_was_not_processed());
    }

    #[tokio::test]
    async fn static_tokens_are_redacted() {
        let p = TokenProvider::from_static(SecretString::from("abc.def.ghi".to_owned()));
        let t = p.token().await.unwrap();
        assert_eq!(t.expose(), "abc.def.ghi");
        assert!(!format!("{t:?}{p:?}").contains("abc.def"));
    }
}
