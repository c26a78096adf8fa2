//! Dead effects in the console (list by keyset pages, retry, abandon with a reason), the
//! operators' journal, and the confirmation page every action goes through.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{actor, bad_request, failure, layout, outcome, when};
use crate::http::AppState;
use crate::ops::effects::{self, Outcome};
use crate::ops::render::age;
use crate::store::operator_actions::{self, ActionKind};
use crate::web::Layout;
use crate::web::auth::{OperatorRole, SignedInOperator};

/// "Are you sure?": the same form again with `confirm=yes`.
#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/confirm.html")]
pub struct ConfirmPage {
    pub layout: Layout,
    pub title: String,
    pub paragraphs: Vec<String>,
    pub action: String,
    /// Hidden fields posted again.
    pub fields: Vec<(String, String)>,
    pub button: String,
    pub cancel: String,
}

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub subscription: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug)]
pub struct Row {
    pub id: String,
    pub subscription_id: String,
    pub kind: String,
    pub attempts: i32,
    pub died: String,
    pub error: String,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/effects.html")]
pub struct ListPage {
    pub layout: Layout,
    pub kind: String,
    pub rows: Vec<Row>,
    pub next: Option<String>,
    pub can_act: bool,
}

fn optional_id(raw: Option<&str>) -> Result<Option<Uuid>, ()> {
    match raw.map(str::trim).filter(|r| !r.is_empty()) {
        None => Ok(None),
        Some(raw) => raw.parse().map(Some).map_err(|_| ()),
    }
}

pub async fn list(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Query(query): Query<ListQuery>,
) -> Response {
    let (Ok(subscription), Ok(after)) = (
        optional_id(query.subscription.as_deref()),
        optional_id(query.after.as_deref()),
    ) else {
        return bad_request(
            &state,
            &operator,
            "A subscription id or page cursor is a GUID.",
            "/console/effects",
        );
    };
    let filter = match effects::filter(
        subscription,
        query.kind.as_deref(),
        after,
        effects::DEFAULT_PAGE_SIZE,
    ) {
        Ok(filter) => filter,
        Err(error) => return bad_request(&state, &operator, error.to_string(), "/console/effects"),
    };
    let page = match effects::list(&state.pool, &filter).await {
        Ok(page) => page,
        Err(error) => return failure(&state, &operator, error),
    };
    let now = OffsetDateTime::now_utc();
    ListPage {
        layout: layout(&state, &operator),
        kind: filter.kind.unwrap_or_default(),
        rows: page
            .effects
            .iter()
            .map(|e| Row {
                id: e.id.to_string(),
                subscription_id: e.subscription_id.to_string(),
                kind: e.kind.clone(),
                attempts: e.attempts,
                died: format!("{} ago", age(now - e.updated_at)),
                error: e.last_error.clone().unwrap_or_default(),
            })
            .collect(),
        next: page.next.map(|n| n.to_string()),
        can_act: operator.role == OperatorRole::Operator,
    }
    .into_response()
}

#[derive(Debug, Deserialize)]
pub struct ActForm {
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub confirm: Option<String>,
}

pub async fn retry(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(raw): Path<String>,
    Form(form): Form<ActForm>,
) -> Response {
    act(state, operator, raw, form, false).await
}

pub async fn abandon(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(raw): Path<String>,
    Form(form): Form<ActForm>,
) -> Response {
    act(state, operator, raw, form, true).await
}

async fn act(
    state: AppState,
    operator: SignedInOperator,
    raw: String,
    form: ActForm,
    abandon: bool,
) -> Response {
    let Ok(id) = raw.parse::<Uuid>() else {
        return bad_request(
            &state,
            &operator,
            "An effect id is a GUID.",
            "/console/effects",
        );
    };
    let row = match effects::show(&state.pool, id).await {
        Ok(Some(row)) => row,
        Ok(None) => {
            return bad_request(
                &state,
                &operator,
                format!("No effect {id}."),
                "/console/effects",
            );
        }
        Err(error) => return failure(&state, &operator, error),
    };
    let back = format!("/console/subscriptions/{}", row.subscription_id);
    let reason = match (abandon, form.reason.as_deref()) {
        (true, raw) => match effects::parse_reason(raw.unwrap_or_default()) {
            Ok(reason) => Some(reason),
            Err(error) => return bad_request(&state, &operator, error.to_string(), &back),
        },
        (false, _) => None,
    };
    let verb = if abandon { "abandon" } else { "retry" };
    if form.confirm.as_deref() != Some("yes") {
        let mut fields = Vec::new();
        if let Some(reason) = &reason {
            fields.push(("reason".to_string(), reason.clone()));
        }
        return ConfirmPage {
            layout: layout(&state, &operator),
            title: format!("Confirm: {verb} the dead effect"),
            paragraphs: vec![
                format!(
                    "Effect {id} ({}) of subscription {}, dead after {} attempt(s): {}",
                    row.kind,
                    row.subscription_id,
                    row.attempts,
                    row.last_error.clone().unwrap_or_default()
                ),
                if abandon {
                    format!("It will never be carried out. Reason kept in the journal: {}", reason.clone().unwrap_or_default())
                } else {
                    "It goes back to pending with a fresh attempt budget; the worker takes it at once.".to_string()
                },
            ],
            action: format!("/console/effects/{id}/{verb}"),
            fields,
            button: if abandon { "Abandon it".into() } else { "Retry it".into() },
            cancel: back,
        }
        .into_response();
    }
    let who = actor(&operator);
    let result = match &reason {
        Some(reason) => effects::abandon(&state.pool, id, &who, reason).await,
        None => effects::retry(&state.pool, id, &who).await,
    };
    let result = match result {
        Ok(result) => result,
        Err(error) => return failure(&state, &operator, error),
    };
    let (status, title, said) = match result.outcome {
        Outcome::Retried => (
            StatusCode::OK,
            "Effect retried",
            "It is pending again; the worker carries it out now.".to_string(),
        ),
        Outcome::Abandoned => (
            StatusCode::OK,
            "Effect abandoned",
            "It will not be carried out.".to_string(),
        ),
        Outcome::NotDead => (
            StatusCode::CONFLICT,
            "Nothing changed",
            format!(
                "The effect is not dead any more (it is {}).",
                result.status.map_or("gone", |s| s.as_str())
            ),
        ),
        Outcome::NotFound => (
            StatusCode::NOT_FOUND,
            "Nothing changed",
            "No such effect.".to_string(),
        ),
    };
    outcome(
        &state,
        &operator,
        status,
        title,
        vec![
            format!("Effect {id} ({}): {said}", row.kind),
            format!("Journalled as done by {who}."),
        ],
        (back, "Back to the subscription".into()),
    )
}

#[derive(Debug, Deserialize)]
pub struct JournalQuery {
    #[serde(default)]
    pub before: Option<String>,
}

#[derive(Debug)]
pub struct JournalRow {
    pub at: String,
    pub action: ActionKind,
    pub by: String,
    pub subscription_id: String,
    pub what: String,
    pub reason: String,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/journal.html")]
pub struct JournalPage {
    pub layout: Layout,
    pub rows: Vec<JournalRow>,
    pub next: Option<String>,
}

/// Journal rows per page.
const JOURNAL_PAGE: i64 = 50;

pub async fn journal(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Query(query): Query<JournalQuery>,
) -> Response {
    let Ok(before) = optional_id(query.before.as_deref()) else {
        return bad_request(
            &state,
            &operator,
            "The page cursor is a GUID.",
            "/console/journal",
        );
    };
    let mut rows = match operator_actions::recent(&state.pool, before, JOURNAL_PAGE + 1).await {
        Ok(rows) => rows,
        Err(error) => return failure(&state, &operator, error.into()),
    };
    let more = rows.len() as i64 > JOURNAL_PAGE;
    rows.truncate(JOURNAL_PAGE as usize);
    let next = more
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    JournalPage {
        layout: layout(&state, &operator),
        rows: rows
            .iter()
            .map(|a| JournalRow {
                at: when(a.performed_at),
                action: a.action,
                by: a.performed_by.clone(),
                subscription_id: a.subscription_id.map(|s| s.to_string()).unwrap_or_default(),
                what: a
                    .details
                    .get("effect_id")
                    .and_then(|v| v.as_str())
                    .map(|e| format!("effect {e}"))
                    .or(a.dead_letter_id.clone().map(|d| format!("dead letter {d}")))
                    .unwrap_or_default(),
                reason: a.reason.clone().unwrap_or_default(),
            })
            .collect(),
        next,
    }
    .into_response()
}
