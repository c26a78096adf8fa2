//! Who is signed in: the session cookies, the extractors handlers take
//! ([`SignedInOperator`], [`SignedInCustomer`]) and the CSRF token every form carries.
//!
//! A session is a signed cookie (HMAC with the `[web]` session key) holding the person's
//! Entra identity, their console role, a CSRF token and an expiry; nothing is stored
//! server-side, so signing out is removing the cookie and rotating the key signs everyone
//! out. The customer's and the operator's sessions are separate cookies: a customer of the
//! landing page never becomes an operator. Every POST under the web routes must carry the
//! session's token in a `csrf` form field ([`verify_csrf`]), on top of tower-http's
//! `Sec-Fetch-Site`/`Origin` check.

use std::fmt;

use axum::body::{Body, to_bytes};
use axum::extract::{FromRef, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, Key, SameSite, SignedCookieJar};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use crate::http::AppState;

/// The operator's session cookie (console).
pub const OPERATOR_COOKIE: &str = "fulfillment_operator";
/// The customer's session cookie (landing page).
pub const CUSTOMER_COOKIE: &str = "fulfillment_customer";

/// How long a session lasts after sign-in.
pub const OPERATOR_SESSION: time::Duration = time::Duration::hours(8);
pub const CUSTOMER_SESSION: time::Duration = time::Duration::hours(1);

/// Largest form a web page posts.
pub const FORM_LIMIT: usize = 16 * 1024;

impl FromRef<AppState> for Key {
    fn from_ref(state: &AppState) -> Key {
        state.web.key.clone()
    }
}

/// Which sign-in a session came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Surface {
    /// The landing page: any tenant's customer.
    Customer,
    /// The console: the ISV's operators.
    Console,
}

impl Surface {
    pub fn cookie(self) -> &'static str {
        match self {
            Surface::Customer => CUSTOMER_COOKIE,
            Surface::Console => OPERATOR_COOKIE,
        }
    }

    pub fn lifetime(self) -> time::Duration {
        match self {
            Surface::Customer => CUSTOMER_SESSION,
            Surface::Console => OPERATOR_SESSION,
        }
    }

    /// The path that starts this surface's sign-in.
    pub fn sign_in_path(self) -> &'static str {
        match self {
            Surface::Customer => "/auth/customer/sign-in",
            Surface::Console => "/auth/console/sign-in",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Surface::Customer => "customer",
            Surface::Console => "console",
        }
    }

    /// The surface whose session guards `path` (the console's paths, else the customer's).
    pub fn for_path(path: &str) -> Surface {
        if path == "/console" || path.starts_with("/console/") || path.starts_with("/auth/console/")
        {
            Surface::Console
        } else {
            Surface::Customer
        }
    }
}

/// What an operator may do in the console.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorRole {
    /// Sees every page, acts on nothing.
    ReadOnly,
    /// Replays, retries, abandons, sends publisher commands.
    Operator,
}

impl OperatorRole {
    pub fn as_str(self) -> &'static str {
        match self {
            OperatorRole::ReadOnly => "read-only",
            OperatorRole::Operator => "operator",
        }
    }
}

/// A per-session secret every form posts back; rendered with `{{ csrf }}` in templates.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CsrfToken(String);

impl CsrfToken {
    /// 32 random bytes, base64url.
    pub fn new_random() -> Self {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator works");
        Self(URL_SAFE_NO_PAD.encode(bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Constant-time comparison with what a form posted.
    pub fn matches(&self, posted: &str) -> bool {
        !posted.is_empty() && bool::from(self.0.as_bytes().ct_eq(posted.as_bytes()))
    }
}

impl fmt::Display for CsrfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CsrfToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CsrfToken(<redacted>)")
    }
}

/// The content of a session cookie.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    pub surface: Surface,
    /// Entra `oid`.
    pub object_id: String,
    /// Entra `tid`.
    pub tenant_id: String,
    pub name: String,
    pub email: Option<String>,
    /// Console sessions only.
    pub role: Option<OperatorRole>,
    pub csrf: CsrfToken,
    /// Unix seconds.
    pub expires_at: i64,
}

impl Session {
    /// The session cookie: signed, `HttpOnly`, `Secure`, `SameSite=Lax` (so the link a
    /// customer follows from Microsoft's e-mail or portal still arrives signed in; the CSRF
    /// token covers forms), and no longer than the session.
    pub fn cookie(&self) -> Cookie<'static> {
        let value = serde_json::to_string(self).expect("a session serializes");
        Cookie::build((self.surface.cookie(), value))
            .path("/")
            .http_only(true)
            .secure(true)
            .same_site(SameSite::Lax)
            .max_age(self.surface.lifetime())
            .build()
    }

    /// The session in `jar` for `surface`, if signed by our key and not expired.
    pub fn read(jar: &SignedCookieJar, surface: Surface, now: OffsetDateTime) -> Option<Session> {
        let cookie = jar.get(surface.cookie())?;
        let session: Session = serde_json::from_str(cookie.value()).ok()?;
        (session.surface == surface && session.expires_at > now.unix_timestamp()).then_some(session)
    }

    /// The `Cookie` header a browser holding this session sends back, signed with `key`
    /// (for tests and tools that act as a signed-in browser).
    pub fn cookie_header(&self, key: &Key) -> String {
        let response = SignedCookieJar::new(key.clone())
            .add(self.cookie())
            .into_response();
        response
            .headers()
            .get(axum::http::header::SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .unwrap_or_default()
            .to_owned()
    }

    /// A removal cookie for `surface`.
    pub fn removal(surface: Surface) -> Cookie<'static> {
        Cookie::build((surface.cookie(), "")).path("/").build()
    }
}

/// An operator signed in to the console. As an extractor: without a session a GET is
/// redirected to the console sign-in (and comes back), anything else is 401; a read-only
/// operator is refused (403) on anything but GET and HEAD.
#[derive(Clone, Debug)]
pub struct SignedInOperator {
    pub object_id: String,
    pub name: String,
    pub email: Option<String>,
    pub role: OperatorRole,
    /// Put it in every form: `<input type="hidden" name="csrf" value="{{ operator.csrf }}">`.
    pub csrf: CsrfToken,
}

impl SignedInOperator {
    /// How the journal names this operator: `name <email> (oid)`.
    pub fn identity(&self) -> String {
        match &self.email {
            Some(email) => format!("{} <{email}> ({})", self.name, self.object_id),
            None => format!("{} ({})", self.name, self.object_id),
        }
    }
}

impl FromRequestParts<AppState> for SignedInOperator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let session = session_of(parts, state, Surface::Console).map_err(|r| *r)?;
        let role = session.role.unwrap_or(OperatorRole::ReadOnly);
        if role == OperatorRole::ReadOnly && !is_safe(&parts.method) {
            return Err(refusal(
                state,
                StatusCode::FORBIDDEN,
                "You have read-only access to the console",
            ));
        }
        Ok(SignedInOperator {
            object_id: session.object_id,
            name: session.name,
            email: session.email,
            role,
            csrf: session.csrf,
        })
    }
}

/// A customer signed in on the landing page (any tenant).
#[derive(Clone, Debug)]
pub struct SignedInCustomer {
    pub object_id: String,
    pub tenant_id: String,
    pub name: String,
    pub email: Option<String>,
    pub csrf: CsrfToken,
}

impl FromRequestParts<AppState> for SignedInCustomer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let session = session_of(parts, state, Surface::Customer).map_err(|r| *r)?;
        Ok(SignedInCustomer {
            object_id: session.object_id,
            tenant_id: session.tenant_id,
            name: session.name,
            email: session.email,
            csrf: session.csrf,
        })
    }
}

/// The customer, when one is signed in; never a rejection (the landing page shows a sign-in).
#[derive(Clone, Debug)]
pub struct MaybeCustomer(pub Option<SignedInCustomer>);

impl FromRequestParts<AppState> for MaybeCustomer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(MaybeCustomer(
            SignedInCustomer::from_request_parts(parts, state)
                .await
                .ok(),
        ))
    }
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD)
}

/// The valid session of `surface`, or the answer for someone without one: a GET goes to
/// sign-in and comes back, anything else is 401.
fn session_of(parts: &Parts, state: &AppState, surface: Surface) -> Result<Session, Box<Response>> {
    let jar = SignedCookieJar::from_headers(&parts.headers, state.web.key.clone());
    match Session::read(&jar, surface, OffsetDateTime::now_utc()) {
        Some(session) => Ok(session),
        None if is_safe(&parts.method) => {
            // Under a nested router (the console) `parts.uri` lacks the prefix; the
            // original URI has the whole path to come back to.
            let uri = parts
                .extensions
                .get::<axum::extract::OriginalUri>()
                .map_or(&parts.uri, |original| &original.0);
            let back = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            Err(Box::new(
                Redirect::to(&sign_in_url(surface, back)).into_response(),
            ))
        }
        None => Err(Box::new(refusal(
            state,
            StatusCode::UNAUTHORIZED,
            "Please sign in again: your session has ended",
        ))),
    }
}

/// The sign-in that returns to `back` afterwards.
pub fn sign_in_url(surface: Surface, back: &str) -> String {
    let query: String = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("return", back)
        .finish();
    format!("{}?{query}", surface.sign_in_path())
}

/// Where a sign-in may return to: a path on this site, never another site.
pub fn safe_return_path(candidate: &str, surface: Surface) -> String {
    let fallback = match surface {
        Surface::Customer => "/",
        Surface::Console => "/console",
    };
    let ok = candidate.starts_with('/')
        && !candidate.starts_with("//")
        && !candidate.starts_with("/\\")
        && !candidate.chars().any(|c| c.is_control());
    if ok {
        candidate.to_owned()
    } else {
        fallback.to_owned()
    }
}

/// A page for refused requests (no session, no permission, bad CSRF token): the message
/// as its heading, in the site's layout.
pub fn refusal(state: &AppState, status: StatusCode, message: &'static str) -> Response {
    super::MessagePage {
        layout: state.web.layout("", None),
        title: message.to_owned(),
        paragraphs: Vec::new(),
        link: None,
    }
    .with_status(status)
}

/// Middleware on the web routes: every POST (PUT, PATCH, DELETE) must carry, in its
/// `csrf` form field, the token of the session that guards its path.
pub async fn verify_csrf(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if is_safe(request.method()) || request.method() == Method::OPTIONS {
        return next.run(request).await;
    }
    let surface = Surface::for_path(request.uri().path());
    let (parts, body) = request.into_parts();
    let jar = SignedCookieJar::from_headers(&parts.headers, state.web.key.clone());
    let Some(session) = Session::read(&jar, surface, OffsetDateTime::now_utc()) else {
        return refusal(
            &state,
            StatusCode::UNAUTHORIZED,
            "Please sign in again: your session has ended",
        );
    };
    let Ok(bytes) = to_bytes(body, FORM_LIMIT).await else {
        return refusal(
            &state,
            StatusCode::PAYLOAD_TOO_LARGE,
            "This form is too large",
        );
    };
    let posted = url::form_urlencoded::parse(&bytes)
        .find(|(name, _)| name == "csrf")
        .map(|(_, value)| value.into_owned())
        .unwrap_or_default();
    if !session.csrf.matches(&posted) {
        tracing::warn!(
            surface = surface.as_str(),
            "form refused: CSRF token mismatch"
        );
        return refusal(
            &state,
            StatusCode::FORBIDDEN,
            "This form has expired: go back, reload the page and try again",
        );
    }
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csrf_tokens_differ_and_match_only_themselves() {
        let a = CsrfToken::new_random();
        let b = CsrfToken::new_random();
        assert_ne!(a, b);
        assert!(a.matches(a.as_str()));
        assert!(!a.matches(b.as_str()));
        assert!(!a.matches(""));
        assert_eq!(format!("{a:?}"), "CsrfToken(<redacted>)");
    }

    #[test]
    fn sign_in_returns_only_to_this_site() {
        assert_eq!(
            safe_return_path("/landing?token=a%2Bb", Surface::Customer),
            "/landing?token=a%2Bb"
        );
        for evil in ["https://evil.example/", "//evil.example", "/\\evil", "evil"] {
            assert_eq!(safe_return_path(evil, Surface::Console), "/console");
        }
    }

    #[test]
    fn console_paths_are_guarded_by_the_operator_session() {
        assert_eq!(Surface::for_path("/console"), Surface::Console);
        assert_eq!(Surface::for_path("/console/effects"), Surface::Console);
        assert_eq!(Surface::for_path("/consoles"), Surface::Customer);
        assert_eq!(Surface::for_path("/landing/activate"), Surface::Customer);
    }

    #[test]
    fn sessions_signed_with_another_key_or_expired_are_not_read() {
        let key = Key::from(&[7u8; 64]);
        let now = OffsetDateTime::now_utc();
        let session = Session {
            surface: Surface::Console,
            object_id: "o".into(),
            tenant_id: "t".into(),
            name: "Ada".into(),
            email: None,
            role: Some(OperatorRole::Operator),
            csrf: CsrfToken::new_random(),
            expires_at: now.unix_timestamp() + 60,
        };
        let cookie = session.cookie();
        assert_eq!(cookie.secure(), Some(true));
        assert_eq!(cookie.http_only(), Some(true));
        assert_eq!(cookie.same_site(), Some(SameSite::Lax));
        assert_eq!(cookie.path(), Some("/"));
        let jar = SignedCookieJar::new(key.clone()).add(session.cookie());
        assert!(Session::read(&jar, Surface::Console, now).is_some());
        assert!(Session::read(&jar, Surface::Customer, now).is_none());
        assert!(Session::read(&jar, Surface::Console, now + time::Duration::minutes(2)).is_none());
        let response = jar.into_response();
        let set_cookie = response.headers()[axum::http::header::SET_COOKIE]
            .to_str()
            .unwrap();
        let pair = set_cookie.split(';').next().unwrap();
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::COOKIE, pair.parse().unwrap());
        let same = SignedCookieJar::from_headers(&headers, key);
        assert!(Session::read(&same, Surface::Console, now).is_some());
        let other = SignedCookieJar::from_headers(&headers, Key::from(&[8u8; 64]));
        assert!(Session::read(&other, Surface::Console, now).is_none());
    }
}
