//! The operator console at `/console`: the overview, subscriptions (search, list, a
//! subscription's page with its timeline and effects), dead letters (show, replay with a dry
//! run then a confirmation, purge), dead effects (retry, abandon), publisher commands with a
//! confirmation, and the operators' journal.
//!
//! Every page takes a [`SignedInOperator`]: no session redirects to the console sign-in, a
//! read-only operator sees every page and is refused every action (403, by the extractor).
//! The handlers call the same library functions as the CLI (`ops::…`), with the operator's
//! identity as the journal's actor (`console:<name> <email> (oid)`).
//!
//! - [`overview`] serves `/console`;
//! - [`subscriptions`] `/console/subscriptions…` and publisher commands;
//! - [`dead_letters`] `/console/dead-letters…`;
//! - [`effects`] `/console/effects…` and `/console/journal`.

pub mod dead_letters;
pub mod effects;
pub mod overview;
pub mod subscriptions;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};

use crate::http::AppState;
use crate::web::auth::SignedInOperator;
use crate::web::{Layout, MessagePage, SignedInAs, auth::Surface};

/// The console's routes, nested at `/console` by [`crate::web::routes`].
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(overview::page))
        .route("/subscriptions", get(subscriptions::list))
        .route("/subscriptions/{id}", get(subscriptions::page))
        .route("/subscriptions/{id}/commands", post(subscriptions::command))
        .route("/dead-letters", get(dead_letters::list))
        .route("/dead-letters/{id}", get(dead_letters::page))
        .route("/dead-letters/{id}/replay", post(dead_letters::replay))
        .route("/dead-letters/{id}/purge", post(dead_letters::purge))
        .route("/effects", get(effects::list))
        .route("/effects/{id}/retry", post(effects::retry))
        .route("/effects/{id}/abandon", post(effects::abandon))
        .route("/journal", get(effects::journal))
}

/// The journal's name for the operator.
pub fn actor(operator: &SignedInOperator) -> String {
    format!("console:{}", operator.identity())
}

/// The frame of a console page.
pub fn layout(state: &AppState, operator: &SignedInOperator) -> Layout {
    state.web.layout(
        "Console",
        Some(SignedInAs {
            surface: Surface::Console,
            name: format!("{} ({})", operator.name, operator.role.as_str()),
            csrf: operator.csrf.clone(),
        }),
    )
}

/// A page saying what an action came to, with a link on.
pub fn outcome(
    state: &AppState,
    operator: &SignedInOperator,
    status: StatusCode,
    title: impl Into<String>,
    paragraphs: Vec<String>,
    link: (String, String),
) -> Response {
    MessagePage {
        layout: layout(state, operator),
        title: title.into(),
        paragraphs,
        link: Some(link),
    }
    .with_status(status)
}

/// A failure reading or acting: logged once here, shown without internals.
pub fn failure(state: &AppState, operator: &SignedInOperator, error: anyhow::Error) -> Response {
    tracing::error!(error = %format!("{error:#}"), "console request failed");
    outcome(
        state,
        operator,
        StatusCode::SERVICE_UNAVAILABLE,
        "Something went wrong",
        vec![
            "The console could not read or change what it needed (the database or RabbitMQ \
             did not answer as expected). Nothing was half-done: try again in a moment; the \
             service log has the details."
                .into(),
        ],
        ("/console".into(), "Back to the overview".into()),
    )
}

/// A bad request (an unknown id, a malformed form), said plainly.
pub fn bad_request(
    state: &AppState,
    operator: &SignedInOperator,
    message: impl Into<String>,
    back: &str,
) -> Response {
    outcome(
        state,
        operator,
        StatusCode::BAD_REQUEST,
        "That did not work",
        vec![message.into()],
        (back.to_string(), "Back".into()),
    )
}

/// `2026-03-01 12:00:05` UTC.
pub fn when(at: time::OffsetDateTime) -> String {
    crate::ops::render::when(at) + " UTC"
}
