//! Dead letters in the console: the list, one message whole, a replay (a dry run first,
//! then the confirmed move) and a purge (confirmed; the message is kept in the journal).

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use indicatif::ProgressBar;
use serde::Deserialize;

use super::{actor, bad_request, failure, layout, outcome, when};
use crate::http::AppState;
use crate::ops::dlq::{self, DEFAULT_BATCH, DeadLetterSummary, Filter, ReplayOptions};
use crate::web::Layout;
use crate::web::auth::{OperatorRole, SignedInOperator};

#[derive(Debug)]
pub struct Row {
    pub id: String,
    pub queue: String,
    pub subscription_id: String,
    pub action: String,
    pub attempts: u32,
    pub last_failure: String,
    pub reason: String,
}

fn row(s: &DeadLetterSummary) -> Row {
    Row {
        id: s.id.clone(),
        queue: s.queue.clone(),
        subscription_id: s.subscription_id.map(|i| i.to_string()).unwrap_or_default(),
        action: s.action.clone().unwrap_or_else(|| s.message_type.clone()),
        attempts: s.attempts,
        last_failure: s.last_failure.map(when).unwrap_or_default(),
        reason: s.reason.clone().unwrap_or_default(),
    }
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/dead_letters.html")]
pub struct ListPage {
    pub layout: Layout,
    pub rows: Vec<Row>,
}

pub async fn list(State(state): State<AppState>, operator: SignedInOperator) -> Response {
    match dlq::list(&state.broker, &Filter::default()).await {
        Ok(letters) => ListPage {
            layout: layout(&state, &operator),
            rows: letters.iter().map(row).collect(),
        }
        .into_response(),
        Err(error) => failure(&state, &operator, error),
    }
}

/// One copy of a dead letter, whole.
#[derive(Debug)]
pub struct Copy {
    pub row: Row,
    pub headers: Vec<(String, String)>,
    /// Microsoft's last answer, pretty JSON (empty when none).
    pub response: String,
    pub message: String,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/dead_letter.html")]
pub struct LetterPage {
    pub layout: Layout,
    pub id: String,
    pub copies: Vec<Copy>,
    pub can_act: bool,
}

/// Dead-letter ids are message ids or `sha256:…`: printable, short.
fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && id.chars().all(|c| c.is_ascii_graphic())
}

/// The page refusing a path that names no dead letter.
fn not_a_dead_letter_id(state: &AppState, operator: &SignedInOperator) -> Response {
    bad_request(
        state,
        operator,
        "That is not a dead-letter id.",
        "/console/dead-letters",
    )
}

pub async fn page(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(id): Path<String>,
) -> Response {
    if !valid_id(&id) {
        return not_a_dead_letter_id(&state, &operator);
    }
    let details = match show_settled(&state, &id).await {
        Ok(details) => details,
        Err(error) => return failure(&state, &operator, error),
    };
    if details.is_empty() {
        return outcome(
            &state,
            &operator,
            StatusCode::NOT_FOUND,
            "No such dead letter",
            vec![format!(
                "No dead letter {id} is waiting (replayed or purged already?)."
            )],
            ("/console/dead-letters".into(), "Dead letters".into()),
        );
    }
    LetterPage {
        layout: layout(&state, &operator),
        id: id.clone(),
        copies: details
            .iter()
            .map(|d| Copy {
                row: row(&d.summary),
                headers: d
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                response: d
                    .last_marketplace_response
                    .as_ref()
                    .map(|r| serde_json::to_string_pretty(r).unwrap_or_default())
                    .unwrap_or_default(),
                message: serde_json::to_string_pretty(&d.message).unwrap_or_default(),
            })
            .collect(),
        can_act: operator.role == OperatorRole::Operator,
    }
    .into_response()
}

/// Messages another read just gave back (`basic.nack(requeue)`) are not ready again at
/// once, so a page opened right after the list may find none: look again, briefly.
const SETTLE_TRIES: u32 = 4;
const SETTLE_PAUSE: std::time::Duration = std::time::Duration::from_millis(250);

async fn show_settled(state: &AppState, id: &str) -> anyhow::Result<Vec<dlq::DeadLetterDetail>> {
    let mut tries = 1;
    loop {
        let details = dlq::show(&state.broker, id).await?;
        if !details.is_empty() || tries >= SETTLE_TRIES {
            return Ok(details);
        }
        tries += 1;
        tokio::time::sleep(SETTLE_PAUSE).await;
    }
}

#[derive(Debug, Deserialize)]
pub struct MoveForm {
    #[serde(default)]
    pub confirm: Option<String>,
}

pub async fn replay(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(id): Path<String>,
    Form(form): Form<MoveForm>,
) -> Response {
    move_letter(state, operator, id, form, true).await
}

pub async fn purge(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(id): Path<String>,
    Form(form): Form<MoveForm>,
) -> Response {
    move_letter(state, operator, id, form, false).await
}

/// A replay or purge of the dead letter `id` (all its copies): without `confirm=yes` a
/// dry run that says what would happen and asks; with it, done and journalled.
async fn move_letter(
    state: AppState,
    operator: SignedInOperator,
    id: String,
    form: MoveForm,
    replay: bool,
) -> Response {
    if !valid_id(&id) {
        return not_a_dead_letter_id(&state, &operator);
    }
    let execute = form.confirm.as_deref() == Some("yes");
    let filter = Filter {
        ids: vec![id.clone()],
        ..Filter::default()
    };
    let who = actor(&operator);
    let mut tries = 1;
    let report = loop {
        let report = if replay {
            let options = ReplayOptions {
                limit: None,
                rate: None,
                execute,
                actor: who.clone(),
                batch: DEFAULT_BATCH,
            };
            dlq::replay(
                &state.broker,
                &state.pool,
                &filter,
                &options,
                &ProgressBar::hidden(),
            )
            .await
        } else {
            dlq::purge(&state.broker, &state.pool, &filter, execute, &who).await
        };
        match report {
            Ok(report) if !report.selected.is_empty() || tries >= SETTLE_TRIES => break report,
            Ok(_) => {
                tries += 1;
                tokio::time::sleep(SETTLE_PAUSE).await;
            }
            Err(error) => return failure(&state, &operator, error),
        }
    };
    let verb = if replay { "replay" } else { "purge" };
    if report.selected.is_empty() {
        return outcome(
            &state,
            &operator,
            StatusCode::NOT_FOUND,
            "Nothing to do",
            vec![format!(
                "No dead letter {id} is waiting (replayed or purged already?)."
            )],
            ("/console/dead-letters".into(), "Dead letters".into()),
        );
    }
    if !execute {
        let first = &report.selected[0];
        return super::effects::ConfirmPage {
            layout: layout(&state, &operator),
            title: format!("Confirm the {verb}"),
            paragraphs: vec![
                format!(
                    "Dry run: {} cop(ies) of dead letter {id} ({}, subscription {}) would be {}.",
                    report.selected.len(),
                    first
                        .action
                        .clone()
                        .unwrap_or_else(|| first.message_type.clone()),
                    first
                        .subscription_id
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "-".into()),
                    if replay {
                        "moved back to the work queue (the worker's inbox applies it once)"
                    } else {
                        "removed from the dead-letter queue (each kept whole in the journal)"
                    }
                ),
                format!("Last failure: {}", first.reason.clone().unwrap_or_default()),
            ],
            action: format!("/console/dead-letters/{id}/{verb}"),
            fields: Vec::new(),
            button: if replay {
                "Replay it".into()
            } else {
                "Purge it".into()
            },
            cancel: format!("/console/dead-letters/{id}"),
        }
        .into_response();
    }
    let mut said = vec![format!(
        "{} of {} cop(ies) of dead letter {id} {}; journalled as done by {who}.",
        report.moved,
        report.selected.len(),
        if replay {
            "moved back to the work queue"
        } else {
            "purged"
        }
    )];
    for failed in &report.not_moved {
        said.push(format!("Not moved: {}", failed.error));
    }
    let back = report.selected[0]
        .subscription_id
        .map(|s| {
            (
                format!("/console/subscriptions/{s}"),
                "The subscription".to_string(),
            )
        })
        .unwrap_or(("/console/dead-letters".into(), "Dead letters".into()));
    outcome(
        &state,
        &operator,
        if report.not_moved.is_empty() {
            StatusCode::OK
        } else {
            StatusCode::BAD_GATEWAY
        },
        if replay {
            "Dead letter replayed"
        } else {
            "Dead letter purged"
        },
        said,
        back,
    )
}
