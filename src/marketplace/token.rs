//! Entra ID client-credentials tokens for the Marketplace API (marketplace-api.md §2).
//!
//! One token per provider, cached and refreshed five minutes before it expires (at
//! half-life for tokens shorter than ten minutes). Refreshes are single-flight: the cache
//! sits behind a `tokio::sync::Mutex` held across the request, so concurrent callers wait
//! for the one refresh in progress instead of starting their own. If a refresh fails while
//! the old token is still valid, the old token is used. The client secret and the tokens
//! never reach `Debug` or logs.

use std::fmt;
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
use super::error::{Call, Error, Failure, TransientCause};
use crate::settings::{MARKETPLACE_APP_ID, MarketplaceSettings, TokenEndpoint};

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
}

enum Source {
    Entra(EntraSource),
    Static(SecretString),
}

struct EntraSource {
    http: reqwest::Client,
    endpoint: Url,
    version: TokenEndpoint,
    client_id: String,
    client_secret: SecretString,
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
            client_secret,
        })))
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
            }),
        }
    }

    /// A valid token: the cached one, or a fresh one (one request for all waiting callers).
    pub async fn token(&self) -> Result<AccessToken, Error> {
        let entra = match &self.inner.source {
            Source::Static(secret) => {
                return Ok(AccessToken {
                    secret: secret.clone(),
                    generation: 0,
                });
            }
            Source::Entra(entra) => entra,
        };
        let mut cache = self.inner.cache.lock().await;
        let now = Instant::now();
        if let Some(cached) = cache.as_ref()
            && now < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        let fetched = self.fetch(entra).await;
        if fetched.is_err() {
            crate::metrics::record_token_refresh_failure();
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

    async fn fetch(&self, entra: &EntraSource) -> Result<Cached, Error> {
        let sent_at = Instant::now();
        let mut form: Vec<(&str, &str)> = vec![
            ("grant_type", "client_credentials"),
            ("client_id", &entra.client_id),
            ("client_secret", entra.client_secret.expose_secret()),
        ];
        let scope = format!("{MARKETPLACE_APP_ID}/.default");
        match entra.version {
            TokenEndpoint::V2 => form.push(("scope", &scope)),
            TokenEndpoint::V1 => form.push(("resource", MARKETPLACE_APP_ID)),
        }
        let failure = || Failure::new(Call::EntraToken, format!("POST {}", entra.endpoint));
        let response = entra
            .http
            .post(entra.endpoint.clone())
            .form(&form)
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
            endpoint = %entra.endpoint,
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
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.source {
            Source::Entra(entra) => f
                .debug_struct("TokenProvider")
                .field("endpoint", &entra.endpoint.as_str())
                .field("version", &entra.version)
                .field("client_id", &entra.client_id)
                .field("client_secret", &"[REDACTED]")
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
