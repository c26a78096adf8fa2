//! `GET /console`: what an operator checks first (see [`crate::ops::overview`]) and what
//! needs a person, each linked to the page that deals with it.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use time::OffsetDateTime;

use super::{failure, layout};
use crate::http::AppState;
use crate::ops::overview;
use crate::ops::render::age;
use crate::ops::status::Need;
use crate::web::Layout;
use crate::web::auth::SignedInOperator;

/// One thing that needs a person, with where to deal with it.
#[derive(Debug)]
pub struct AttentionRow {
    pub what: String,
    pub href: String,
    pub command: String,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/overview.html")]
pub struct OverviewPage {
    pub layout: Layout,
    pub states: Vec<(String, i64)>,
    pub acks: i64,
    pub p50: String,
    pub p99: String,
    pub acks_in_time: bool,
    pub late: i64,
    pub auto_accepted: i64,
    pub dead_letters: i64,
    pub dead_effects: i64,
    pub outbox_pending: i64,
    pub outbox_oldest: String,
    pub drift: String,
    pub attention: Vec<AttentionRow>,
    pub unchecked: Vec<String>,
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "no ACK".to_string(), |v| format!("{:.0} ms", v))
}

pub async fn page(State(state): State<AppState>, operator: SignedInOperator) -> Response {
    let now = OffsetDateTime::now_utc();
    let read = overview::read(
        &state.pool,
        Ok(&state.broker),
        state.config.stuck_pending_after,
        now,
    )
    .await;
    let view = match read {
        Ok(view) => view,
        Err(error) => return failure(&state, &operator, error),
    };
    let attention = view
        .attention
        .items
        .iter()
        .map(|item| AttentionRow {
            what: item.what.clone(),
            href: match (item.need, item.subscription_id) {
                (Need::DeadLetters, _) => "/console/dead-letters".to_string(),
                (Need::DeadEffects, _) => "/console/effects".to_string(),
                (_, Some(id)) => format!("/console/subscriptions/{id}"),
                (_, None) => "/console".to_string(),
            },
            command: item.command.clone(),
        })
        .collect();
    let drift = match (&view.latest_reconcile, view.reconcile_drift) {
        (None, _) => "no reconciliation run yet (fulfillment reconcile)".to_string(),
        (Some(run), left) => format!(
            "{} drifted subscription(s) left by the run of {} ago ({})",
            left.map_or("?".to_string(), |n| n.to_string()),
            age(now - run.performed_at),
            run.reason.as_deref().unwrap_or("")
        ),
    };
    OverviewPage {
        layout: layout(&state, &operator),
        p50: ms(view.acks.p50_ms),
        p99: ms(view.acks.p99_ms),
        acks_in_time: view.acks_in_time(),
        acks: view.acks.acks,
        late: view.acks.late,
        auto_accepted: view.acks.auto_accepted,
        dead_letters: view.dead_letters(),
        dead_effects: view.dead_effects(),
        outbox_pending: view.outbox_pending,
        outbox_oldest: age(time::Duration::seconds(
            i64::try_from(view.outbox_oldest_secs).unwrap_or(i64::MAX),
        )),
        drift,
        states: view.subscriptions_by_state,
        attention,
        unchecked: view.attention.unchecked,
    }
    .into_response()
}
