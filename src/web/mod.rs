//! The pages people use, server-rendered with askama: the customer's landing page and
//! (nested under `/console`) the operator console, both signed in with Entra ID.
//!
//! - [`landing`]: `/landing`, the customer's onboarding page, and its activation form.
//! - [`console`]: `/console`, the operators' console.
//! - [`auth`]: sessions (signed cookies), the [`auth::SignedInOperator`] and
//!   [`auth::SignedInCustomer`] extractors, CSRF tokens and their check on every POST.
//! - [`oidc`]: sign-in with Entra ID (code + PKCE), the ID token check, console roles.
//! - [`security`]: CSP without script, `nosniff`, `frame-ancestors`, `Referrer-Policy`.
//! - [`Layout`]: what `templates/base.html` needs (brand, who is signed in, the CSRF token).
//!
//! [`routes`] builds the web routes with their layers; [`crate::http::router`] merges them.

pub mod auth;
pub mod console;
pub mod landing;
pub mod oidc;
pub mod security;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_extra::extract::cookie::Key;

use crate::http::AppState;
use crate::settings::{Branding, OnboardingField, OperatorRule, Settings};

use self::auth::{CsrfToken, Surface};

/// The web settings the handlers read, parsed once.
pub struct WebConfig {
    /// Signs session cookies and encrypts the pending sign-in.
    pub key: Key,
    pub branding: Branding,
    pub onboarding_fields: Vec<OnboardingField>,
    pub activate_after_sign_in: bool,
    pub console_operators: Vec<OperatorRule>,
    pub console_read_only: Vec<OperatorRule>,
    /// The sign-in app; `None` when none is configured.
    pub oidc: Option<oidc::OidcConfig>,
    /// The stylesheet, with the brand colour in it (no inline style is allowed by the CSP).
    pub stylesheet: String,
}

impl std::fmt::Debug for WebConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebConfig")
            .field("key", &"<redacted>")
            .field("branding", &self.branding)
            .field("onboarding_fields", &self.onboarding_fields)
            .field("activate_after_sign_in", &self.activate_after_sign_in)
            .field("console_operators", &self.console_operators.len())
            .field("console_read_only", &self.console_read_only.len())
            .finish_non_exhaustive()
    }
}

impl WebConfig {
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let web = &settings.web;
        let key = match &web.session_key {
            Some(key) => Key::from(key.expose()),
            None => {
                tracing::warn!(
                    "WEB_SESSION_KEY is not set: sessions are signed with a random key, end at \
                     a restart and are not shared between replicas"
                );
                Key::generate()
            }
        };
        Ok(Self {
            oidc: oidc::OidcConfig::from_settings(settings)?,
            key,
            stylesheet: stylesheet(&web.branding.brand_colour),
            branding: web.branding.clone(),
            onboarding_fields: web.onboarding_fields.clone(),
            activate_after_sign_in: web.activate_after_sign_in,
            console_operators: web.console_operators.clone(),
            console_read_only: web.console_read_only.clone(),
        })
    }

    /// The frame of a page for `templates/base.html`.
    pub fn layout(&self, section: &'static str, signed_in: Option<SignedInAs>) -> Layout {
        let (signed_in_as, csrf, sign_out_path) = match signed_in {
            Some(who) => (
                Some(who.name),
                Some(who.csrf),
                match who.surface {
                    Surface::Customer => "/auth/customer/sign-out",
                    Surface::Console => "/auth/console/sign-out",
                },
            ),
            None => (None, None, ""),
        };
        Layout {
            product_name: self.branding.product_name.clone(),
            logo_url: self.branding.logo_url.as_ref().map(|u| u.to_string()),
            support_contact: self.branding.support_contact.clone(),
            section,
            signed_in_as,
            csrf: csrf.map(|t| t.to_string()).unwrap_or_default(),
            sign_out_path,
        }
    }
}

/// Who the header shows as signed in, with the token its sign-out form posts.
#[derive(Debug)]
pub struct SignedInAs {
    pub surface: Surface,
    pub name: String,
    pub csrf: CsrfToken,
}

/// What `templates/base.html` reads: every page struct has a `layout: Layout` field and its
/// template starts with `{% extends "base.html" %}`.
#[derive(Debug, Clone)]
pub struct Layout {
    pub product_name: String,
    pub logo_url: Option<String>,
    pub support_contact: Option<String>,
    /// Shown beside the product name ("Console"); empty for none.
    pub section: &'static str,
    pub signed_in_as: Option<String>,
    /// The sign-out form's token (empty when nobody is signed in).
    pub csrf: String,
    pub sign_out_path: &'static str,
}

/// A page that only says something: an error, a refusal, "signed out".
#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "message.html")]
pub struct MessagePage {
    pub layout: Layout,
    pub title: String,
    pub paragraphs: Vec<String>,
    /// A button-styled link: (href, text).
    pub link: Option<(String, String)>,
}

impl MessagePage {
    /// The page with `status`.
    pub fn with_status(self, status: StatusCode) -> Response {
        (status, self).into_response()
    }
}

/// The web routes (landing page, sign-in, stylesheet) with their layers: security headers,
/// tower-http's cross-site check, and the CSRF token check on every POST.
pub fn routes(state: &AppState) -> Router<AppState> {
    Router::new()
        .route("/landing", get(landing::landing))
        .route("/landing/activate", post(landing::activate))
        .route("/assets/site.css", get(site_css))
        .route("/auth/{surface}/sign-in", get(oidc::sign_in))
        .route("/auth/callback", get(oidc::callback))
        .route("/auth/{surface}/sign-out", post(oidc::sign_out))
        .nest("/console", console::routes())
        // Route layers: only requests these routes match (the API's and the webhook's
        // unmatched paths keep their own answers).
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::verify_csrf,
        ))
        .route_layer(tower_http::csrf::CsrfLayer::new())
        .route_layer(middleware::from_fn(security::security_headers))
}

/// The `[web]` state the router shares.
pub fn config(settings: &Settings) -> anyhow::Result<Arc<WebConfig>> {
    Ok(Arc::new(WebConfig::from_settings(settings)?))
}

async fn site_css(State(state): State<AppState>) -> Response {
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("text/css; charset=utf-8"),
            ),
            (
                CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            ),
        ],
        state.web.stylesheet.clone(),
    )
        .into_response()
}

/// The site's stylesheet with the brand colour (validated as `#rrggbb` by the settings).
fn stylesheet(brand: &str) -> String {
    include_str!("../../templates/site.css").replace("#1f4e79", brand)
}
