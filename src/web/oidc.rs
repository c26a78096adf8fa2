//! Sign-in with Entra ID: OpenID Connect authorization code flow with PKCE (`oauth2` over
//! our reqwest), the ID token checked with `jsonwebtoken` against Entra's published keys.
//!
//! - `GET /auth/{customer|console}/sign-in?return=<path>` remembers `state`, `nonce`, the
//!   PKCE verifier and where to return in a private (encrypted) cookie, `SameSite=Lax` so
//!   it survives the redirect back, and sends the browser to Entra: customers to
//!   `/organizations` (any tenant), operators to the ISV's tenant.
//! - `GET /auth/callback` compares `state`, redeems the code with the verifier, checks the
//!   ID token (signature, `aud`, `exp`, `nonce`, and `iss` against the token's own `tid`:
//!   the multi-tenant metadata only holds a `{tenantid}` placeholder, so the issuer cannot
//!   be known before), decides the console role, and starts the session.
//! - `POST /auth/{customer|console}/sign-out` ends it.

use std::time::Duration;

use anyhow::Context;
use axum::extract::{Path, Query, State};
use axum::http::header::HOST;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, PrivateCookieJar, SameSite, SignedCookieJar};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use oauth2::basic::{
    BasicErrorResponse, BasicRevocationErrorResponse, BasicTokenIntrospectionResponse,
    BasicTokenType,
};
use oauth2::{
    AuthType, AuthUrl, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken as State_,
    EndpointNotSet, EndpointSet, ExtraTokenFields, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, StandardRevocableToken, StandardTokenResponse, TokenResponse as _,
    TokenUrl,
};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use super::MessagePage;
use super::auth::{CsrfToken, OperatorRole, Session, Surface, safe_return_path};
use crate::http::AppState;
use crate::settings::{OperatorRule, Settings};

/// The cookie holding a sign-in in progress.
pub const PENDING_COOKIE: &str = "fulfillment_sign_in";
/// How long a sign-in may take at Entra.
const PENDING_LIFETIME: time::Duration = time::Duration::minutes(10);
/// Entra's token and key endpoints answer within this, or the sign-in fails readably.
const ENTRA_TIMEOUT: Duration = Duration::from_secs(8);

/// Entra's token answer with its `id_token` (oauth2's basic response drops it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdTokenField {
    pub id_token: String,
}
impl ExtraTokenFields for IdTokenField {}

type TokenResponse = StandardTokenResponse<IdTokenField, BasicTokenType>;
type NewClient = Client<
    BasicErrorResponse,
    TokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
>;
type OidcClient = Client<
    BasicErrorResponse,
    TokenResponse,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

/// The sign-in app and where Entra is.
pub struct OidcConfig {
    pub client_id: String,
    pub client_secret: Option<SecretString>,
    /// Without a trailing slash: `https://login.microsoftonline.com`.
    pub authority: String,
    /// The ISV's tenant: the only one whose users reach the console.
    pub console_tenant: Option<Uuid>,
    /// Where browsers reach us (`PUBLIC_URL`); else the request's loopback `Host`.
    pub public_url: Option<Url>,
    http: reqwest::Client,
}

impl std::fmt::Debug for OidcConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcConfig")
            .field("client_id", &self.client_id)
            .field("authority", &self.authority)
            .field("console_tenant", &self.console_tenant)
            .finish_non_exhaustive()
    }
}

impl OidcConfig {
    /// `None` when no sign-in app is configured (neither `WEB_CLIENT_ID` nor
    /// `MARKETPLACE_CLIENT_ID`): the pages then say sign-in is not set up.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Option<Self>> {
        let web = &settings.web;
        let Some(client_id) = web
            .client_id
            .clone()
            .or_else(|| settings.marketplace.client_id.map(|id| id.to_string()))
        else {
            return Ok(None);
        };
        let authority = web
            .authority_url
            .as_ref()
            .unwrap_or(&settings.marketplace.entra_authority_url)
            .as_str()
            .trim_end_matches('/')
            .to_owned();
        // No redirects: the token endpoint answers, it never sends us elsewhere.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ENTRA_TIMEOUT)
            .build()
            .context("cannot build the HTTP client for sign-in")?;
        Ok(Some(Self {
            client_id,
            client_secret: web
                .client_secret
                .clone()
                .or_else(|| settings.marketplace.client_secret.clone()),
            authority,
            console_tenant: web.console_tenant_id.or(settings.marketplace.tenant_id),
            public_url: settings.http.public_url.clone(),
            http,
        }))
    }

    /// The tenant segment of the authority for a surface.
    fn tenant(&self, surface: Surface) -> Option<String> {
        match surface {
            Surface::Customer => Some("organizations".into()),
            Surface::Console => self.console_tenant.map(|t| t.to_string()),
        }
    }

    fn client(&self, tenant: &str, redirect_uri: &str) -> anyhow::Result<OidcClient> {
        let mut client = NewClient::new(ClientId::new(self.client_id.clone()))
            .set_auth_uri(AuthUrl::new(format!(
                "{}/{tenant}/oauth2/v2.0/authorize",
                self.authority
            ))?)
            .set_token_uri(TokenUrl::new(format!(
                "{}/{tenant}/oauth2/v2.0/token",
                self.authority
            ))?)
            .set_redirect_uri(RedirectUrl::new(redirect_uri.to_owned())?)
            .set_auth_type(AuthType::RequestBody);
        if let Some(secret) = &self.client_secret {
            client = client.set_client_secret(ClientSecret::new(secret.expose_secret().into()));
        }
        Ok(client)
    }

    /// `{base}/auth/callback`, from `PUBLIC_URL`, or from `Host` when it is a loopback
    /// address (local runs and tests); anything else needs `PUBLIC_URL`, so a forged `Host`
    /// can never choose where Entra sends the code.
    fn redirect_uri(&self, headers: &HeaderMap) -> Option<String> {
        if let Some(public) = &self.public_url {
            return Some(format!(
                "{}/auth/callback",
                public.as_str().trim_end_matches('/')
            ));
        }
        let host = headers.get(HOST)?.to_str().ok()?;
        let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
        matches!(name, "localhost" | "127.0.0.1" | "[::1]")
            .then(|| format!("http://{host}/auth/callback"))
    }
}

/// What survives the trip to Entra, encrypted in [`PENDING_COOKIE`].
#[derive(Debug, Serialize, Deserialize)]
struct PendingSignIn {
    surface: Surface,
    tenant: String,
    state: String,
    nonce: String,
    verifier: String,
    redirect_uri: String,
    return_to: String,
}

#[derive(Debug, Deserialize)]
pub struct SignInQuery {
    #[serde(rename = "return")]
    return_to: Option<String>,
}

fn parse_surface(raw: &str) -> Option<Surface> {
    match raw {
        "customer" => Some(Surface::Customer),
        "console" => Some(Surface::Console),
        _ => None,
    }
}

fn message(
    state: &AppState,
    status: StatusCode,
    title: &str,
    paragraphs: &[&str],
    link: Option<(String, String)>,
) -> Response {
    MessagePage {
        layout: state.web.layout("", None),
        title: title.to_owned(),
        paragraphs: paragraphs.iter().map(|p| (*p).to_owned()).collect(),
        link,
    }
    .with_status(status)
}

fn not_configured(state: &AppState) -> Response {
    message(
        state,
        StatusCode::SERVICE_UNAVAILABLE,
        "Sign-in is not set up",
        &[
            "This service has no Entra ID app for sign-in configured yet. Please contact the \
           publisher's support.",
        ],
        None,
    )
}

/// `GET /auth/{surface}/sign-in`: off to Entra.
pub async fn sign_in(
    State(state): State<AppState>,
    Path(surface): Path<String>,
    Query(query): Query<SignInQuery>,
    headers: HeaderMap,
    jar: PrivateCookieJar,
) -> Response {
    let Some(surface) = parse_surface(&surface) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let Some(oidc) = state.web.oidc.as_ref() else {
        return not_configured(&state);
    };
    let Some(tenant) = oidc.tenant(surface) else {
        return not_configured(&state);
    };
    let Some(redirect_uri) = oidc.redirect_uri(&headers) else {
        tracing::error!("sign-in needs PUBLIC_URL (the address browsers reach us at)");
        return not_configured(&state);
    };
    let client = match oidc.client(&tenant, &redirect_uri) {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the sign-in request");
            return not_configured(&state);
        }
    };
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let nonce = State_::new_random();
    let (url, csrf_state) = client
        .authorize_url(State_::new_random)
        .add_scopes(["openid", "profile", "email"].map(|s| Scope::new(s.into())))
        .add_extra_param("nonce", nonce.secret().clone())
        .set_pkce_challenge(challenge)
        .url();
    let pending = PendingSignIn {
        surface,
        tenant,
        state: csrf_state.secret().clone(),
        nonce: nonce.secret().clone(),
        verifier: verifier.secret().clone(),
        redirect_uri,
        return_to: safe_return_path(query.return_to.as_deref().unwrap_or(""), surface),
    };
    let cookie = Cookie::build((
        PENDING_COOKIE,
        serde_json::to_string(&pending).expect("serializes"),
    ))
    .path("/auth")
    .http_only(true)
    .secure(true)
    // Strict would not be sent on Entra's redirect back to the callback.
    .same_site(SameSite::Lax)
    .max_age(PENDING_LIFETIME)
    .build();
    (jar.add(cookie), Redirect::to(url.as_str())).into_response()
}

#[derive(Debug, Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// The claims we read from an ID token.
#[derive(Debug, Deserialize)]
pub struct IdClaims {
    pub iss: String,
    pub tid: String,
    pub oid: String,
    #[serde(default)]
    pub nonce: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub preferred_username: Option<String>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
}

/// `GET /auth/callback`: Entra sent the browser back with a code.
pub async fn callback(
    State(state): State<AppState>,
    Query(query): Query<CallbackQuery>,
    jar: PrivateCookieJar,
    sessions: SignedCookieJar,
) -> Response {
    let pending = jar
        .get(PENDING_COOKIE)
        .and_then(|c| serde_json::from_str::<PendingSignIn>(c.value()).ok());
    let jar = jar.remove(Cookie::build(PENDING_COOKIE).path("/auth").build());
    let Some(pending) = pending else {
        return (
            jar,
            message(
                &state,
                StatusCode::BAD_REQUEST,
                "This sign-in has expired",
                &[
                    "Sign-in took too long or was started in another browser. Please go back \
                   to the page you came from and sign in again.",
                ],
                None,
            ),
        )
            .into_response();
    };
    let retry = Some((
        super::auth::sign_in_url(pending.surface, &pending.return_to),
        "Sign in again".to_owned(),
    ));
    if let Some(error) = &query.error {
        tracing::info!(
            error = %error,
            description = query.error_description.as_deref().unwrap_or(""),
            "Entra refused the sign-in"
        );
        return (
            jar,
            message(
                &state,
                StatusCode::UNAUTHORIZED,
                "Sign-in did not complete",
                &["Microsoft did not sign you in (you may have cancelled). You can try again."],
                retry,
            ),
        )
            .into_response();
    }
    let state_ok = query
        .state
        .as_deref()
        .is_some_and(|s| bool::from(s.as_bytes().ct_eq(pending.state.as_bytes())));
    let (Some(code), true) = (query.code, state_ok) else {
        tracing::warn!("sign-in callback with a wrong or missing state");
        return (
            jar,
            message(
                &state,
                StatusCode::BAD_REQUEST,
                "This sign-in link is not valid",
                &["Please sign in again from the page you came from."],
                retry,
            ),
        )
            .into_response();
    };
    let Some(oidc) = state.web.oidc.as_ref() else {
        return (jar, not_configured(&state)).into_response();
    };
    let claims = match redeem(oidc, &pending, code).await {
        Ok(claims) => claims,
        Err(error) => {
            tracing::warn!(error = %format!("{error:#}"), surface = pending.surface.as_str(), "sign-in failed");
            return (
                jar,
                message(
                    &state,
                    StatusCode::BAD_GATEWAY,
                    "We could not sign you in",
                    &[
                        "Microsoft's answer to the sign-in could not be confirmed. Please try \
                       again in a moment.",
                    ],
                    retry,
                ),
            )
                .into_response();
        }
    };
    let email = claims
        .email
        .clone()
        .or_else(|| claims.preferred_username.clone())
        .filter(|e| e.contains('@'));
    let role = match pending.surface {
        Surface::Customer => None,
        Surface::Console => {
            let in_tenant = oidc
                .console_tenant
                .is_some_and(|t| Uuid::parse_str(&claims.tid).is_ok_and(|tid| tid == t));
            let role = in_tenant
                .then(|| {
                    role_for(
                        &state.web.console_operators,
                        &state.web.console_read_only,
                        &claims.oid,
                        email.as_deref(),
                        &claims.groups,
                    )
                })
                .flatten();
            match role {
                Some(role) => Some(role),
                None => {
                    tracing::warn!(object_id = %claims.oid, tenant_id = %claims.tid, "console sign-in refused: not an operator");
                    return (
                        jar,
                        message(
                            &state,
                            StatusCode::FORBIDDEN,
                            "You are not an operator of this console",
                            &[
                                "You signed in, but your account is not on the console's list \
                               of operators. Ask an administrator to add your object id, \
                               e-mail or group (CONSOLE_OPERATORS or CONSOLE_READ_ONLY).",
                            ],
                            None,
                        ),
                    )
                        .into_response();
                }
            }
        }
    };
    let session = Session {
        surface: pending.surface,
        object_id: claims.oid.clone(),
        tenant_id: claims.tid.clone(),
        name: claims
            .name
            .clone()
            .or_else(|| email.clone())
            .unwrap_or_else(|| "Signed-in user".into()),
        email,
        role,
        csrf: CsrfToken::new_random(),
        expires_at: (OffsetDateTime::now_utc() + pending.surface.lifetime()).unix_timestamp(),
    };
    tracing::info!(
        surface = pending.surface.as_str(),
        object_id = %session.object_id,
        tenant_id = %session.tenant_id,
        role = session.role.map(OperatorRole::as_str).unwrap_or("customer"),
        "signed in"
    );
    (
        jar,
        sessions.add(session.cookie()),
        Redirect::to(&pending.return_to),
    )
        .into_response()
}

/// Redeems the code and checks the ID token.
async fn redeem(
    oidc: &OidcConfig,
    pending: &PendingSignIn,
    code: String,
) -> anyhow::Result<IdClaims> {
    let client = oidc.client(&pending.tenant, &pending.redirect_uri)?;
    let http = oidc.http.clone();
    let send = move |request: oauth2::HttpRequest| {
        let http = http.clone();
        async move {
            let (parts, body) = request.into_parts();
            let response = http
                .request(parts.method, parts.uri.to_string())
                .headers(parts.headers)
                .body(body)
                .send()
                .await?;
            let mut out = oauth2::http::Response::builder().status(response.status());
            if let Some(headers) = out.headers_mut() {
                *headers = response.headers().clone();
            }
            let bytes = response.bytes().await?;
            Ok::<_, reqwest::Error>(out.body(bytes.to_vec()).expect("valid parts"))
        }
    };
    let token = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(PkceCodeVerifier::new(pending.verifier.clone()))
        .request_async(&send)
        .await
        .map_err(|e| anyhow::anyhow!("the token endpoint refused the code: {e}"))?;
    let _ = token.access_token();
    let id_token = &token.extra_fields().id_token;
    let header = jsonwebtoken::decode_header(id_token).context("the ID token is not a JWT")?;
    let kid = header.kid.context("the ID token names no key")?;
    // Entra's keys are the same for every tenant; `common` serves them for all.
    let keys_url = format!("{}/common/discovery/v2.0/keys", oidc.authority);
    let keys: JwkSet = oidc
        .http
        .get(&keys_url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("cannot fetch Entra's keys from {keys_url}"))?
        .json()
        .await
        .context("Entra's keys are not a JWK set")?;
    let jwk = keys
        .find(&kid)
        .with_context(|| format!("no published key {kid}"))?;
    let key = DecodingKey::from_jwk(jwk).context("unusable published key")?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[&oidc.client_id]);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    validation.leeway = 120;
    let claims = jsonwebtoken::decode::<IdClaims>(id_token, &key, &validation)
        .context("the ID token does not verify")?
        .claims;
    check_claims(&claims, &oidc.authority, &pending.nonce)?;
    Ok(claims)
}

/// The checks `jsonwebtoken` cannot do: the issuer is the user's own tenant's (multi-tenant
/// sign-in has no fixed issuer), and the nonce is ours.
pub fn check_claims(claims: &IdClaims, authority: &str, nonce: &str) -> anyhow::Result<()> {
    let tid = Uuid::parse_str(&claims.tid).context("the ID token's tid is not a GUID")?;
    let expected = format!("{}/{tid}/v2.0", authority.trim_end_matches('/'));
    anyhow::ensure!(
        claims.iss == expected,
        "unexpected issuer {} (expected {expected})",
        claims.iss
    );
    anyhow::ensure!(
        claims
            .nonce
            .as_deref()
            .is_some_and(|n| bool::from(n.as_bytes().ct_eq(nonce.as_bytes()))),
        "the ID token's nonce is not this sign-in's"
    );
    anyhow::ensure!(!claims.oid.trim().is_empty(), "the ID token has no oid");
    Ok(())
}

/// The console role of a person: operator if any operator rule matches, else read-only if
/// a read-only rule does, else none.
pub fn role_for(
    operators: &[OperatorRule],
    read_only: &[OperatorRule],
    object_id: &str,
    email: Option<&str>,
    groups: &[String],
) -> Option<OperatorRole> {
    let oid = Uuid::parse_str(object_id).ok();
    let groups: Vec<Uuid> = groups
        .iter()
        .filter_map(|g| Uuid::parse_str(g).ok())
        .collect();
    let email = email.map(str::to_lowercase);
    let matches = |rule: &OperatorRule| match rule {
        OperatorRule::ObjectId(id) => oid == Some(*id),
        OperatorRule::Group(id) => groups.contains(id),
        OperatorRule::Email(address) => email.as_deref() == Some(address.as_str()),
    };
    if operators.iter().any(matches) {
        Some(OperatorRole::Operator)
    } else if read_only.iter().any(matches) {
        Some(OperatorRole::ReadOnly)
    } else {
        None
    }
}

/// `POST /auth/{surface}/sign-out` (CSRF-checked like every POST).
pub async fn sign_out(
    State(state): State<AppState>,
    Path(surface): Path<String>,
    sessions: SignedCookieJar,
) -> Response {
    let Some(surface) = parse_surface(&surface) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let page = message(
        &state,
        StatusCode::OK,
        "You are signed out",
        &["You can close this window."],
        None,
    );
    (sessions.remove(Session::removal(surface)), page).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0b5e0000-0000-4000-8000-0000000000a2";
    const G: &str = "0b5e0000-0000-4000-8000-0000000000a1";

    #[test]
    fn roles_come_from_object_id_email_or_group_and_operator_wins() {
        let operators = [OperatorRule::Group(Uuid::parse_str(G).unwrap())];
        let readers = [
            OperatorRule::ObjectId(Uuid::parse_str(A).unwrap()),
            OperatorRule::Email("riley@publisher.example".into()),
        ];
        assert_eq!(
            role_for(&operators, &readers, A, None, &[G.into()]),
            Some(OperatorRole::Operator)
        );
        assert_eq!(
            role_for(&operators, &readers, A, None, &[]),
            Some(OperatorRole::ReadOnly)
        );
        assert_eq!(
            role_for(
                &operators,
                &readers,
                "x",
                Some("Riley@Publisher.example"),
                &[]
            ),
            Some(OperatorRole::ReadOnly)
        );
        assert_eq!(
            role_for(&operators, &readers, "x", Some("eve@x"), &[]),
            None
        );
    }

    fn claims(iss: &str, tid: &str, nonce: Option<&str>) -> IdClaims {
        IdClaims {
            iss: iss.into(),
            tid: tid.into(),
            oid: A.into(),
            nonce: nonce.map(Into::into),
            name: None,
            preferred_username: None,
            email: None,
            groups: Vec::new(),
        }
    }

    #[test]
    fn the_issuer_must_be_the_users_own_tenant_and_the_nonce_ours() {
        let authority = "https://login.microsoftonline.com/";
        let ok = claims(
            &format!("https://login.microsoftonline.com/{G}/v2.0"),
            G,
            Some("n"),
        );
        check_claims(&ok, authority, "n").unwrap();
        // The metadata's placeholder issuer, another tenant's issuer, a v1 issuer: refused.
        for iss in [
            "https://login.microsoftonline.com/{tenantid}/v2.0".to_string(),
            format!("https://login.microsoftonline.com/{A}/v2.0"),
            format!("https://sts.windows.net/{G}/"),
        ] {
            assert!(check_claims(&claims(&iss, G, Some("n")), authority, "n").is_err());
        }
        assert!(check_claims(&ok, authority, "other").is_err());
        let no_nonce = claims(
            &format!("https://login.microsoftonline.com/{G}/v2.0"),
            G,
            None,
        );
        assert!(check_claims(&no_nonce, authority, "n").is_err());
    }
}
