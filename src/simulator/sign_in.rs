//! Interactive sign-in, as Entra's authorization code flow with PKCE does it: the
//! `/authorize` page (a form where one picks a test user instead of typing a password), the
//! code it hands back to the app's redirect URI, and the `authorization_code` grant of the
//! token endpoint that trades it for an ID token. The landing page, the console, the demo
//! and the browser tests sign in here without Microsoft.
//!
//! As Entra: `/organizations` and `/common` sign in users of any tenant, `/{tenant}` only
//! that tenant's; the ID token's `iss` names the user's own tenant
//! (`{authority}/{tid}/v2.0`), codes are single-use and short-lived, and the verifier must
//! hash (S256) to the challenge the authorization request carried.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use askama::Template;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::http::header::LOCATION;
use axum::response::{Html, IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::ExposeSecret;
use serde_json::json;
use time::OffsetDateTime;
use url::Url;
use uuid::{Uuid, uuid};

use super::state::Shared;

/// The tenant of the simulated customer (Contoso).
pub const CUSTOMER_TENANT_ID: Uuid = uuid!("c0c0c0c0-0000-4000-8000-00000000c05e");
/// The group of the publisher's operators (allow it with `CONSOLE_OPERATORS=group:<id>`).
pub const OPERATORS_GROUP_ID: Uuid = uuid!("0b5e0000-0000-4000-8000-0000000000a1");
/// The object id of the publisher's read-only test user.
pub const READER_OBJECT_ID: Uuid = uuid!("0b5e0000-0000-4000-8000-0000000000b2");

/// How long a code may wait to be redeemed (Entra: up to 10 minutes).
const CODE_LIFETIME: Duration = Duration::from_secs(600);
/// ID tokens last an hour.
const ID_TOKEN_LIFETIME_SECS: i64 = 3600;

/// A person one can sign in as.
#[derive(Clone, Debug)]
pub struct TestUser {
    /// The value the sign-in form posts.
    pub handle: &'static str,
    pub name: &'static str,
    pub email: &'static str,
    pub tenant_id: Uuid,
    pub object_id: Uuid,
    pub groups: Vec<Uuid>,
}

/// The test users: three of the publisher's tenant (an operator by group, a reader by object
/// id, one on no list), a customer, and someone of yet another tenant.
pub fn test_users(publisher_tenant: Uuid) -> Vec<TestUser> {
    vec![
        TestUser {
            handle: "customer",
            name: "Chris Customer",
            email: "chris@contoso.example",
            tenant_id: CUSTOMER_TENANT_ID,
            object_id: uuid!("c0c0c0c0-0000-4000-8000-0000000000c1"),
            groups: Vec::new(),
        },
        TestUser {
            handle: "operator",
            name: "Avery Operator",
            email: "avery@publisher.example",
            tenant_id: publisher_tenant,
            object_id: uuid!("0b5e0000-0000-4000-8000-0000000000a2"),
            groups: vec![OPERATORS_GROUP_ID],
        },
        TestUser {
            handle: "reader",
            name: "Riley Reader",
            email: "riley@publisher.example",
            tenant_id: publisher_tenant,
            object_id: READER_OBJECT_ID,
            groups: Vec::new(),
        },
        TestUser {
            handle: "unlisted",
            name: "Uma Unlisted",
            email: "uma@publisher.example",
            tenant_id: publisher_tenant,
            object_id: uuid!("0b5e0000-0000-4000-8000-0000000000c3"),
            groups: Vec::new(),
        },
        TestUser {
            handle: "outsider",
            name: "Olive Outsider",
            email: "olive@fabrikam.example",
            tenant_id: uuid!("fab0fab0-0000-4000-8000-0000000000f1"),
            object_id: uuid!("fab0fab0-0000-4000-8000-0000000000f2"),
            groups: Vec::new(),
        },
    ]
}

/// Codes handed out and not yet redeemed.
#[derive(Debug, Default)]
pub struct SignInCodes(Mutex<HashMap<String, IssuedCode>>);

#[derive(Debug, Clone)]
struct IssuedCode {
    client_id: String,
    redirect_uri: String,
    challenge: String,
    nonce: Option<String>,
    user: TestUser,
    issued: Instant,
}

impl SignInCodes {
    fn insert(&self, code: String, issued: IssuedCode) {
        let mut codes = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        codes.retain(|_, c| c.issued.elapsed() < CODE_LIFETIME);
        codes.insert(code, issued);
    }

    fn take(&self, code: &str) -> Option<IssuedCode> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(code)
            .filter(|c| c.issued.elapsed() < CODE_LIFETIME)
    }
}

#[derive(Template)]
#[template(path = "simulator/sign_in.html")]
struct SignInPage {
    action: String,
    tenant: String,
    hidden: Vec<(String, String)>,
    users: Vec<TestUser>,
}

/// The users `tenant` (`organizations`, `common` or a GUID) signs in.
fn users_of(shared: &Shared, tenant: &str) -> Option<Vec<TestUser>> {
    let all = test_users(shared.config.tenant_id);
    match tenant {
        "organizations" | "common" => Some(all),
        other => {
            let tenant = Uuid::parse_str(other).ok()?;
            Some(all.into_iter().filter(|u| u.tenant_id == tenant).collect())
        }
    }
}

fn page_error(status: StatusCode, message: &str) -> Response {
    (status, format!("Entra ID simulator: {message}\n")).into_response()
}

/// The authorization request's checks, shared by the form and its submission: the
/// refusal Entra would show.
fn check_request(shared: &Shared, params: &HashMap<String, String>) -> Result<(), &'static str> {
    let get = |name: &str| params.get(name).map(String::as_str).unwrap_or("");
    if get("response_type") != "code" {
        return Err("AADSTS900144: response_type must be code");
    }
    if !Uuid::parse_str(get("client_id")).is_ok_and(|c| c == shared.config.client_id) {
        return Err("AADSTS700016: application not found in the directory");
    }
    if Url::parse(get("redirect_uri"))
        .map(|u| !matches!(u.scheme(), "http" | "https"))
        .unwrap_or(true)
    {
        return Err("AADSTS50011: the redirect URI is not valid");
    }
    if get("code_challenge").is_empty() || get("code_challenge_method") != "S256" {
        return Err("AADSTS9002325: PKCE with code_challenge_method=S256 is required");
    }
    if !get("scope").split(' ').any(|s| s == "openid") {
        return Err("AADSTS900144: the scope must include openid");
    }
    Ok(())
}

/// `GET /{tenant}/oauth2/v2.0/authorize`: the sign-in form.
pub(crate) async fn authorize_form(
    State(shared): State<std::sync::Arc<Shared>>,
    Path(tenant): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    if let Err(refusal) = check_request(&shared, &params) {
        return page_error(StatusCode::BAD_REQUEST, refusal);
    }
    let Some(users) = users_of(&shared, &tenant) else {
        return page_error(
            StatusCode::BAD_REQUEST,
            &format!("AADSTS90002: tenant {tenant} not found"),
        );
    };
    let mut hidden: Vec<(String, String)> = params.into_iter().collect();
    hidden.sort();
    let page = SignInPage {
        action: format!("{}{tenant}/oauth2/v2.0/authorize", shared.base_url),
        tenant,
        hidden,
        users,
    };
    match page.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => page_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// `POST /{tenant}/oauth2/v2.0/authorize`: the user picked; back to the app with a code.
pub(crate) async fn authorize_submit(
    State(shared): State<std::sync::Arc<Shared>>,
    Path(tenant): Path<String>,
    body: axum::body::Bytes,
) -> Response {
    let params: HashMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    if let Err(refusal) = check_request(&shared, &params) {
        return page_error(StatusCode::BAD_REQUEST, refusal);
    }
    let handle = params.get("user").map(String::as_str).unwrap_or("");
    let Some(user) = users_of(&shared, &tenant)
        .unwrap_or_default()
        .into_iter()
        .find(|u| u.handle == handle)
    else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "AADSTS50020: that user is not in this tenant",
        );
    };
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator works");
    let code = URL_SAFE_NO_PAD.encode(bytes);
    let redirect_uri = params["redirect_uri"].clone();
    shared.sign_in_codes.insert(
        code.clone(),
        IssuedCode {
            client_id: params["client_id"].clone(),
            redirect_uri: redirect_uri.clone(),
            challenge: params["code_challenge"].clone(),
            nonce: params.get("nonce").cloned(),
            user,
            issued: Instant::now(),
        },
    );
    let mut target = Url::parse(&redirect_uri).expect("checked by check_request");
    target.query_pairs_mut().append_pair("code", &code);
    if let Some(state) = params.get("state") {
        target.query_pairs_mut().append_pair("state", state);
    }
    (StatusCode::FOUND, [(LOCATION, target.to_string())]).into_response()
}

fn grant_error(description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({
            "error": "invalid_grant",
            "error_description": format!("AADSTS70008: {description}"),
        })),
    )
        .into_response()
}

/// The token endpoint's `grant_type=authorization_code`: checks the code, the client, the
/// redirect URI and the PKCE verifier, and issues the ID token.
pub(crate) fn redeem_code(shared: &Shared, form: &HashMap<String, String>) -> Response {
    let get = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    let Some(issued) = shared.sign_in_codes.take(get("code")) else {
        return grant_error("the authorization code is invalid, expired or already redeemed");
    };
    if issued.client_id != get("client_id") {
        return grant_error("the code was issued to another client");
    }
    if issued.redirect_uri != get("redirect_uri") {
        return grant_error("the redirect_uri differs from the authorization request's");
    }
    let presented = get("client_secret");
    let secret_ok = match &shared.config.client_secret {
        Some(secret) => presented == secret.expose_secret(),
        None => !presented.is_empty(),
    };
    if !secret_ok {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({
                "error": "invalid_client",
                "error_description": "AADSTS7000215: Invalid client secret provided.",
            })),
        )
            .into_response();
    }
    let verifier = get("code_verifier");
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, verifier.as_bytes());
    if verifier.is_empty() || URL_SAFE_NO_PAD.encode(digest.as_ref()) != issued.challenge {
        return grant_error("the code_verifier does not match the code_challenge");
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let user = &issued.user;
    let mut claims = json!({
        "aud": issued.client_id,
        "iss": format!("{}{}/v2.0", shared.base_url, user.tenant_id),
        "iat": now, "nbf": now, "exp": now + ID_TOKEN_LIFETIME_SECS,
        "tid": user.tenant_id, "oid": user.object_id, "sub": user.object_id,
        "name": user.name, "preferred_username": user.email, "email": user.email,
        "ver": "2.0",
    });
    if let Some(nonce) = &issued.nonce {
        claims["nonce"] = json!(nonce);
    }
    if !user.groups.is_empty() {
        claims["groups"] = json!(user.groups);
    }
    match shared.keys.current().sign(&claims) {
        Ok(id_token) => Json(json!({
            "token_type": "Bearer",
            "scope": "openid profile email",
            "expires_in": ID_TOKEN_LIFETIME_SECS - 1,
            "access_token": id_token,
            "id_token": id_token,
        }))
        .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot sign an ID token");
            (StatusCode::INTERNAL_SERVER_ERROR, "signing failed").into_response()
        }
    }
}
