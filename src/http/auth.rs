//! Verification of the Entra bearer token on Microsoft's webhook calls (docs/marketplace.md
//! §6.6, P23, P24): an RS256 signature by a key of the publisher tenant's JWKS, then `exp`,
//! `nbf`, `aud`, `tid`, `azp`/`appid` and `iss`. Anything else is rejected, including when
//! the JWKS cannot be fetched: there is no fail-open path.
//!
//! The JWKS is cached for [`WebhookAuthConfig::cache_ttl`]. A token signed with a key we do
//! not know (Entra rotated its keys) triggers one refetch, shared by concurrent callers and
//! at most one per [`WebhookAuthConfig::refresh_min_interval`], so a flood of forged `kid`s
//! cannot turn us into a load generator against Entra. A failed fetch keeps the cached set
//! for the keys it knows; past its TTL the set is no longer trusted, and calls are refused
//! (`jwks_unavailable`, so Microsoft redelivers) until a fetch succeeds.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tokio::time::Instant;
use url::Url;
use uuid::Uuid;

use crate::settings::{MARKETPLACE_APP_ID, MarketplaceSettings};

/// Tokens longer than this are rejected before any parsing (Entra access tokens are a few KiB).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The largest clock skew we tolerate on `exp`/`nbf`, whatever the configuration says.
pub const MAX_LEEWAY: Duration = Duration::from_secs(5 * 60);

/// A JWKS fetch that takes longer than this fails (callers wait on it).
const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// A JWKS fetch that took this long is logged as a warning: the webhooks waiting for it
/// spent a tenth of Microsoft's window on it.
const SLOW_JWKS_FETCH: Duration = Duration::from_secs(1);

/// Entra's JWKS is a few KiB; anything far larger is not a key set.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// `kid`s are short hashes; a longer one is not Entra's.
const MAX_KID_BYTES: usize = 256;

/// The marketplace service's application: the `azp` (v2) or `appid` (v1) of its webhook tokens.
const MARKETPLACE_APP: Uuid = match Uuid::try_parse(MARKETPLACE_APP_ID) {
    Ok(id) => id,
    Err(_) => panic!("MARKETPLACE_APP_ID is a GUID"),
};

/// What the webhook tokens must look like, and how the key cache behaves.
#[derive(Clone, Debug)]
pub struct WebhookAuthConfig {
    /// The publisher's Entra tenant: the `tid` of the tokens and the tenant in `iss`.
    pub tenant_id: Uuid,
    /// Accepted `aud` values: the publisher's application id, and its `api://{id}` form.
    pub audiences: Vec<String>,
    /// The Entra authority (`ENTRA_AUTHORITY_URL`): `{authority}/{tid}/v2.0` is accepted as an
    /// issuer besides Microsoft's two, so the simulator's tokens verify.
    pub authority_url: Url,
    /// Default `{ENTRA_AUTHORITY_URL}/{tenant}/discovery/v2.0/keys`.
    pub jwks_url: Url,
    /// Clock skew tolerated on `exp` and `nbf`; capped at [`MAX_LEEWAY`].
    pub leeway: Duration,
    /// At most one JWKS fetch per interval (unknown `kid`s, failed fetches).
    pub refresh_min_interval: Duration,
    /// How long a fetched JWKS is trusted without refetching.
    pub cache_ttl: Duration,
}

/// A setting [`WebhookAuthConfig::from_settings`] needs is missing or unusable.
#[derive(Debug, thiserror::Error)]
pub enum WebhookAuthConfigError {
    #[error(
        "{variable} ({key}) is not set: webhook authentication needs the publisher's {what} \
         (Partner Center → Technical configuration)"
    )]
    Missing {
        variable: &'static str,
        key: &'static str,
        what: &'static str,
    },
    #[error("cannot build the JWKS URL from ENTRA_AUTHORITY_URL (marketplace.entra_authority_url)")]
    JwksUrl(#[source] url::ParseError),
}

impl WebhookAuthConfig {
    /// The checks for the publisher identity in `settings`, with the default clocks.
    ///
    /// The audiences are the application id and `api://{id}`: Entra only issues a token for
    /// the second form when the app registration declares that identifier URI, so both name
    /// our application.
    pub fn from_settings(
        settings: &MarketplaceSettings,
        jwks_url_override: Option<Url>,
    ) -> Result<Self, WebhookAuthConfigError> {
        let tenant_id = settings.tenant_id.ok_or(WebhookAuthConfigError::Missing {
            variable: "MARKETPLACE_TENANT_ID",
            key: "marketplace.tenant_id",
            what: "Entra tenant id",
        })?;
        let client_id = settings.client_id.ok_or(WebhookAuthConfigError::Missing {
            variable: "MARKETPLACE_CLIENT_ID",
            key: "marketplace.client_id",
            what: "Entra application (client) id",
        })?;
        let jwks_url = match jwks_url_override {
            Some(url) => url,
            None => default_jwks_url(&settings.entra_authority_url, tenant_id)
                .map_err(WebhookAuthConfigError::JwksUrl)?,
        };
        Ok(Self {
            tenant_id,
            audiences: vec![client_id.to_string(), format!("api://{client_id}")],
            authority_url: settings.entra_authority_url.clone(),
            jwks_url,
            leeway: Duration::from_secs(60),
            refresh_min_interval: Duration::from_secs(30),
            cache_ttl: Duration::from_secs(24 * 3600),
        })
    }
}

/// `{authority}/{tenant}/discovery/v2.0/keys` (§6.6).
pub fn default_jwks_url(authority: &Url, tenant_id: Uuid) -> Result<Url, url::ParseError> {
    Url::parse(&format!(
        "{}/{tenant_id}/discovery/v2.0/keys",
        authority.as_str().trim_end_matches('/')
    ))
}

/// Why a webhook call was refused. [`AuthError::reason`] is the stable label for metrics and
/// logs; `Display` never includes the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no Authorization header")]
    Missing,
    #[error("the Authorization header is not a well-formed bearer JWT")]
    Malformed,
    #[error("the token is not signed with RS256")]
    BadAlgorithm,
    #[error("the token's signing key is not in the tenant's JWKS")]
    UnknownKid,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token is for another audience than the publisher's application")]
    WrongAudience,
    #[error("the token was issued in another tenant than the publisher's")]
    WrongTenant,
    #[error("the token was not requested by the marketplace service's application")]
    WrongApp,
    #[error("the token's issuer is not Entra for the publisher's tenant")]
    WrongIssuer,
    #[error("the tenant's signing keys cannot be fetched")]
    JwksUnavailable,
    /// The signing key is not in our cached key set and the refetch is rate-limited: Entra
    /// may have rotated its keys a moment ago, so our cache, not the caller, is behind.
    #[error("the token's signing key is not in the cached JWKS and it may not be refetched yet")]
    KeysNotRefreshed,
}

impl AuthError {
    /// A short stable label: `missing`, `malformed`, `bad_algorithm`, `unknown_kid`,
    /// `bad_signature`, `expired`, `not_yet_valid`, `wrong_audience`, `wrong_tenant`,
    /// `wrong_app`, `wrong_issuer`, `jwks_unavailable`, `keys_not_refreshed`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::BadAlgorithm => "bad_algorithm",
            Self::UnknownKid => "unknown_kid",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongAudience => "wrong_audience",
            Self::WrongTenant => "wrong_tenant",
            Self::WrongApp => "wrong_app",
            Self::WrongIssuer => "wrong_issuer",
            Self::JwksUnavailable => "jwks_unavailable",
            Self::KeysNotRefreshed => "keys_not_refreshed",
        }
    }

    /// Our side could not check the token (the JWKS is unreachable): answer so that
    /// Microsoft redelivers (any non-2xx does), and alert on it rather than on forgeries.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::JwksUnavailable)
    }

    /// The refusal comes from our side, not from the caller: our JWKS cache or our
    /// configuration cannot accept what looks like Microsoft's genuine token. Answer 503,
    /// never 4xx: Microsoft reads a 4xx to a ChangePlan/ChangeQuantity webhook as our
    /// rejection of the customer's change (§15.5), and redelivers after a 503.
    ///
    /// - `jwks_unavailable`, `keys_not_refreshed`: our key set is unreachable or behind.
    /// - `not_yet_valid`: the signature verified (the `nbf` check runs after it), so Entra
    ///   issued the token and our clock is behind.
    /// - `wrong_audience`: checked last, so the token verified, was issued in our tenant by
    ///   Entra and requested by the marketplace service's application, which nobody else can
    ///   obtain: the audiences we accept (`WEBHOOK_AUDIENCES`, `MARKETPLACE_CLIENT_ID`)
    ///   disagree with the application id in Partner Center.
    ///
    /// Everything else (no token, a forgery, another tenant or application, an expired or
    /// replayed token) stays 401.
    pub fn is_ours(&self) -> bool {
        matches!(
            self,
            Self::JwksUnavailable
                | Self::KeysNotRefreshed
                | Self::NotYetValid
                | Self::WrongAudience
        )
    }

    /// What an operator does about a refusal [`AuthError::is_ours`] says is ours.
    pub fn fix(&self) -> Option<&'static str> {
        match self {
            Self::JwksUnavailable => Some(
                "check that the JWKS URL (WEBHOOK_JWKS_URL or ENTRA_AUTHORITY_URL) is reachable",
            ),
            Self::KeysNotRefreshed => {
                Some("none needed: the key set is refetched once the rate limit allows")
            }
            Self::NotYetValid => Some("synchronize this host's clock (NTP)"),
            Self::WrongAudience => Some(
                "set WEBHOOK_AUDIENCES (or MARKETPLACE_CLIENT_ID) to the application id of \
                 Partner Center's technical configuration",
            ),
            _ => None,
        }
    }
}

/// Which Entra token format carried the call (P23).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenVersion {
    /// `iss` = `https://sts.windows.net/{tid}/`, app in `appid`.
    V1,
    /// `iss` = `…/{tid}/v2.0`, app in `azp`.
    V2,
}

/// The claims of a webhook token that passed every check. Only this module builds one.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifiedClaims {
    /// `tid`: the publisher's tenant.
    pub tenant_id: Uuid,
    /// `azp` (v2) or `appid` (v1): the marketplace service's application.
    pub app_id: Uuid,
    /// The `aud` value that matched the configuration.
    pub audience: String,
    pub issuer: String,
    pub token_version: TokenVersion,
    /// `exp`.
    pub expires_at: OffsetDateTime,
}

/// Verifies webhook bearer tokens; cheap to clone (one shared key cache).
#[derive(Clone, Debug)]
pub struct WebhookVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    config: WebhookAuthConfig,
    http: reqwest::Client,
    validation: Validation,
    issuers: Vec<(String, TokenVersion)>,
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held while fetching, so concurrent callers share one fetch; holds the last attempt.
    fetch_gate: Mutex<Option<Instant>>,
    /// Tokens that passed every check, by SHA-256 of the token (see [`VERIFIED_CACHE_SIZE`]).
    verified: quick_cache::sync::Cache<[u8; 32], Arc<CachedToken>>,
}

/// How many verified tokens are remembered. Entra hands Microsoft one token per hour and
/// audience, and Microsoft reuses it for every webhook call in that hour; re-checking its
/// RS256 signature on each call would be most of the ingress's CPU. A hit is only as good as
/// the original check: the token's `exp`/`nbf` are checked again on every use, and the key
/// that signed it must still be in the trusted key set.
const VERIFIED_CACHE_SIZE: usize = 1024;

/// A token that passed verification: its claims, the key that signed it, and `nbf`.
struct CachedToken {
    claims: VerifiedClaims,
    kid: String,
    not_before: i64,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookVerifier")
            .field("config", &self.config)
            .field("issuers", &self.issuers)
            .finish_non_exhaustive()
    }
}

/// One fetched JWKS: the RS256 signing keys by `kid`.
struct KeySet {
    keys: HashMap<String, Arc<DecodingKey>>,
    fetched_at: Instant,
}

/// The claims we read; signature, `exp` and `nbf` are checked by `jsonwebtoken` first.
#[derive(Deserialize)]
struct RawClaims {
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    tid: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    appid: Option<String>,
    exp: i64,
    nbf: i64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

impl WebhookVerifier {
    /// A verifier with an empty key cache; the first call fetches the JWKS. `leeway` is
    /// capped at [`MAX_LEEWAY`].
    pub fn new(mut config: WebhookAuthConfig, http: reqwest::Client) -> Self {
        config.leeway = config.leeway.min(MAX_LEEWAY);
        // Pinned: the header's `alg` is compared against this list, never trusted.
        let mut validation = Validation::new(Algorithm::RS256);
        validation.set_required_spec_claims(&["exp", "nbf"]);
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = config.leeway.as_secs();
        // `aud` and `iss` are checked below, where the failure can be named precisely.
        validation.validate_aud = false;

        let tid = config.tenant_id;
        let issuers = vec![
            (
                format!("https://login.microsoftonline.com/{tid}/v2.0"),
                TokenVersion::V2,
            ),
            (format!("https://sts.windows.net/{tid}/"), TokenVersion::V1),
            (
                format!(
                    "{}/{tid}/v2.0",
                    config.authority_url.as_str().trim_end_matches('/')
                ),
                TokenVersion::V2,
            ),
        ];
        Self {
            inner: Arc::new(Inner {
                config,
                http,
                validation,
                issuers,
                keys: RwLock::new(None),
                fetch_gate: Mutex::new(None),
                verified: quick_cache::sync::Cache::new(VERIFIED_CACHE_SIZE),
            }),
        }
    }

    pub fn config(&self) -> &WebhookAuthConfig {
        &self.inner.config
    }

    /// Checks the `Authorization` header of a webhook call (§6.6). Rejections are logged at
    /// `warn` with their reason only.
    pub async fn verify(
        &self,
        authorization_header: Option<&str>,
    ) -> Result<VerifiedClaims, AuthError> {
        let result = self.inner.verify(authorization_header).await;
        match &result {
            Ok(claims) => tracing::debug!(
                token_version = ?claims.token_version,
                "webhook token verified"
            ),
            Err(error) => tracing::warn!(reason = error.reason(), "webhook token rejected"),
        }
        result
    }
}

impl Inner {
    async fn verify(&self, authorization: Option<&str>) -> Result<VerifiedClaims, AuthError> {
        let token = bearer_token(authorization)?;
        let digest = super::state::digest_bytes(token.as_bytes());
        if let Some(claims) = self.verified_before(&digest) {
            return Ok(claims);
        }
        let kid = signing_kid(token)?;
        let key = self.decoding_key(&kid).await?;
        let raw = jsonwebtoken::decode::<RawClaims>(token, &key, &self.validation)
            .map_err(|e| map_jwt_error(e.kind()))?
            .claims;
        let not_before = raw.nbf;
        let claims = self.check_claims(raw)?;
        self.verified.insert(
            digest,
            Arc::new(CachedToken {
                claims: claims.clone(),
                kid,
                not_before,
            }),
        );
        Ok(claims)
    }

    /// The claims of a token that passed every check before, when it is still within its
    /// validity window (with the configured leeway) and its signing key is still trusted.
    /// Anything else goes through the full check again, which names the failure.
    fn verified_before(&self, digest: &[u8; 32]) -> Option<VerifiedClaims> {
        let cached = self.verified.get(digest)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let leeway = i64::try_from(self.config.leeway.as_secs()).unwrap_or(i64::MAX);
        let in_window = now
            <= cached
                .claims
                .expires_at
                .unix_timestamp()
                .saturating_add(leeway)
            && now >= cached.not_before.saturating_sub(leeway);
        let key_trusted = self
            .cached_keys(Instant::now())
            .is_some_and(|set| set.keys.contains_key(&cached.kid));
        if in_window && key_trusted {
            Some(cached.claims.clone())
        } else {
            self.verified.remove(digest);
            None
        }
    }

    fn check_claims(&self, claims: RawClaims) -> Result<VerifiedClaims, AuthError> {
        let tenant_id = claims
            .tid
            .as_deref()
            .and_then(|tid| Uuid::try_parse(tid).ok())
            .filter(|tid| *tid == self.config.tenant_id)
            .ok_or(AuthError::WrongTenant)?;

        let issuer = claims.iss.ok_or(AuthError::WrongIssuer)?;
        let token_version = self
            .issuers
            .iter()
            .find(|(accepted, _)| *accepted == issuer)
            .map(|(_, version)| *version)
            .ok_or(AuthError::WrongIssuer)?;

        // The issuer fixes the format, and each format names the caller in its own claim.
        let app = match token_version {
            TokenVersion::V1 => claims.appid,
            TokenVersion::V2 => claims.azp,
        };
        let app_id = app
            .as_deref()
            .and_then(|app| Uuid::try_parse(app).ok())
            .filter(|app| *app == MARKETPLACE_APP)
            .ok_or(AuthError::WrongApp)?;

        // Last: only a token that passed every other check makes a wrong audience ours
        // (see `AuthError::is_ours`).
        let accepted = |aud: &String| {
            self.config
                .audiences
                .iter()
                .any(|a| a.eq_ignore_ascii_case(aud))
        };
        let audience = match claims.aud {
            Some(Audience::One(aud)) => Some(aud).filter(accepted),
            Some(Audience::Many(auds)) => auds.into_iter().find(accepted),
            None => None,
        }
        .ok_or(AuthError::WrongAudience)?;

        let expires_at =
            OffsetDateTime::from_unix_timestamp(claims.exp).map_err(|_| AuthError::Malformed)?;
        Ok(VerifiedClaims {
            tenant_id,
            app_id,
            audience,
            issuer,
            token_version,
            expires_at,
        })
    }

    fn cached_keys(&self, now: Instant) -> Option<Arc<KeySet>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .filter(|set| now.duration_since(set.fetched_at) < self.config.cache_ttl)
            .cloned()
    }

    /// The key for `kid`: from the cache, or after one (rate-limited, shared) refetch.
    async fn decoding_key(&self, kid: &str) -> Result<Arc<DecodingKey>, AuthError> {
        if let Some(key) = self
            .cached_keys(Instant::now())
            .and_then(|set| set.keys.get(kid).cloned())
        {
            return Ok(key);
        }

        let mut last_fetch = self.fetch_gate.lock().await;
        let now = Instant::now();
        let cached = self.cached_keys(now);
        // Another caller may have fetched while we waited.
        if let Some(key) = cached.as_ref().and_then(|set| set.keys.get(kid).cloned()) {
            return Ok(key);
        }
        let may_fetch =
            last_fetch.is_none_or(|at| now.duration_since(at) >= self.config.refresh_min_interval);
        if !may_fetch {
            return Err(if cached.is_some() {
                AuthError::KeysNotRefreshed
            } else {
                AuthError::JwksUnavailable
            });
        }
        *last_fetch = Some(now);

        match self.fetch_keys().await {
            Ok(set) => {
                let key = set.keys.get(kid).cloned();
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(set));
                key.ok_or(AuthError::UnknownKid)
            }
            Err(error) => {
                // A still-valid cached set stays in place for the keys it knows.
                tracing::warn!(
                    jwks_url = %self.config.jwks_url,
                    error = %format!("{error:#}"),
                    "cannot fetch the Entra JWKS"
                );
                Err(AuthError::JwksUnavailable)
            }
        }
    }

    /// [`Self::fetch_jwks`], timed: the metric counts every fetch, and the log tells a
    /// slow one apart (every webhook that needs the keys waits for it, on Microsoft's 10 s
    /// clock).
    async fn fetch_keys(&self) -> anyhow::Result<KeySet> {
        let started = Instant::now();
        let fetched = self.fetch_jwks().await;
        let elapsed = started.elapsed();
        super::metrics::record_jwks_fetch(elapsed, fetched.is_ok());
        if let Ok(set) = &fetched {
            let elapsed_ms = elapsed.as_millis() as u64;
            let keys = set.keys.len();
            if elapsed >= SLOW_JWKS_FETCH {
                tracing::warn!(
                    jwks_url = %self.config.jwks_url,
                    keys,
                    elapsed_ms,
                    "fetched the Entra JWKS slowly; the webhooks that needed it waited as long"
                );
            } else {
                tracing::info!(jwks_url = %self.config.jwks_url, keys, elapsed_ms, "fetched the Entra JWKS");
            }
        }
        fetched
    }

    async fn fetch_jwks(&self) -> anyhow::Result<KeySet> {
        let mut response = self
            .http
            .get(self.config.jwks_url.clone())
            .timeout(JWKS_FETCH_TIMEOUT)
            .send()
            .await?
            .error_for_status()?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                anyhow::bail!("the JWKS is larger than {MAX_JWKS_BYTES} bytes");
            }
            body.extend_from_slice(&chunk);
        }
        let keys = parse_jwks(&body)?;
        anyhow::ensure!(!keys.is_empty(), "the JWKS holds no RS256 signing key");
        Ok(KeySet {
            keys,
            fetched_at: Instant::now(),
        })
    }
}

/// The RS256 signing keys of a JWKS document by `kid`. Keys of other types or uses are
/// skipped one by one, so a new kind of key in Entra's set does not hide the others.
pub(crate) fn parse_jwks(body: &[u8]) -> anyhow::Result<HashMap<String, Arc<DecodingKey>>> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<Value>,
    }
    let document: Document = serde_json::from_slice(body)?;
    let mut keys = HashMap::new();
    for value in document.keys {
        let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
            continue;
        };
        let signing = matches!(
            jwk.common.public_key_use,
            None | Some(PublicKeyUse::Signature)
        );
        let rs256 = matches!(jwk.common.key_algorithm, None | Some(KeyAlgorithm::RS256));
        let rsa = matches!(jwk.algorithm, AlgorithmParameters::RSA(_));
        let (Some(kid), true, true, true) = (jwk.common.key_id.clone(), signing, rs256, rsa) else {
            continue;
        };
        if let Ok(key) = DecodingKey::from_jwk(&jwk) {
            keys.insert(kid, Arc::new(key));
        }
    }
    Ok(keys)
}

/// The token of `Bearer <token>`, bounded in size and shaped like a compact JWS.
fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    // The scheme is case-insensitive (RFC 9110 §11.1).
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Malformed);
    }
    let token = token.trim_start();
    if token.is_empty() || token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::Malformed);
    }
    let base64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 || !parts.iter().all(|part| base64url(part)) {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// The `kid` of a token whose header names RS256; other algorithms (`none`, HS256 keyed
/// with our public key, ...) are refused before any key is looked up.
fn signing_kid(token: &str) -> Result<String, AuthError> {
    let (header, _) = token.split_once('.').ok_or(AuthError::Malformed)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| AuthError::Malformed)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
    match header.get("alg").and_then(Value::as_str) {
        Some("RS256") => {}
        Some(_) => return Err(AuthError::BadAlgorithm),
        None => return Err(AuthError::Malformed),
    }
    // We implement no JWS extension, so any critical one must be refused (RFC 7515 §4.1.11).
    if header.contains_key("crit") {
        return Err(AuthError::Malformed);
    }
    match header.get("kid").and_then(Value::as_str) {
        Some(kid) if !kid.is_empty() && kid.len() <= MAX_KID_BYTES => Ok(kid.to_owned()),
        _ => Err(AuthError::Malformed),
    }
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::BadAlgorithm,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidToken
        | ErrorKind::MissingRequiredClaim(_)
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        // Bad signatures, and anything the crypto backend refuses: fail closed.
        _ => AuthError::BadSignature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_refusals_that_come_from_our_side_are_ours_and_each_names_a_fix() {
        use AuthError::*;
        // (refusal, ours?)
        let table = [
            (Missing, false),
            (Malformed, false),
            (BadAlgorithm, false),
            (UnknownKid, false),
            (BadSignature, false),
            (Expired, false),
            (NotYetValid, true),
            (WrongAudience, true),
            (WrongTenant, false),
            (WrongApp, false),
            (WrongIssuer, false),
            (JwksUnavailable, true),
            (KeysNotRefreshed, true),
        ];
        for (error, ours) in table {
            assert_eq!(error.is_ours(), ours, "{}", error.reason());
            assert_eq!(error.fix().is_some(), ours, "{}", error.reason());
        }
    }
}
