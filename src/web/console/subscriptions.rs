//! Subscriptions in the console: search and list (keyset pages, as the API's), one
//! subscription's page (state, plan, seats, term, tenants, the timeline from the event log
//! with every call to Microsoft, pending and dead effects, the changes we asked for), and
//! publisher commands with a confirmation step and their outcome.

use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use fulfillment_state_machine::StateName;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::{actor, bad_request, failure, layout, outcome, when};
use crate::http::AppState;
use crate::ops::subscription::{self, EntryOutcome, TimelineEntry};
use crate::queue::PublisherCommand;
use crate::store::dead_effects::{self, EffectStatus};
use crate::store::subscriptions::{self, SubscriptionFilter};
use crate::web::Layout;
use crate::web::auth::{OperatorRole, SignedInOperator};
use crate::worker::protocol::CommandStatus;

/// Rows per page.
pub const PAGE_SIZE: u32 = 50;

#[derive(Debug, Deserialize)]
pub struct ListQuery {
    /// A subscription id (opens it), a tenant id, or an offer id.
    #[serde(default)]
    pub q: Option<String>,
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub after: Option<String>,
}

#[derive(Debug)]
pub struct Row {
    pub id: String,
    pub state: String,
    pub offer: String,
    pub plan: String,
    pub seats: String,
    pub tenant: String,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/subscriptions.html")]
pub struct ListPage {
    pub layout: Layout,
    pub q: String,
    pub state: String,
    pub states: Vec<&'static str>,
    pub rows: Vec<Row>,
    pub next: Option<String>,
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn list(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Query(query): Query<ListQuery>,
) -> Response {
    let q = query
        .q
        .as_deref()
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let wanted_state = match query
        .state
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        None => None,
        Some(name) => match name.parse::<StateName>() {
            Ok(parsed) => Some(parsed),
            Err(_) => {
                return bad_request(
                    &state,
                    &operator,
                    format!(
                        "{name:?} is not a state (PendingFulfillment, Subscribed, Suspended, Unsubscribed)"
                    ),
                    "/console/subscriptions",
                );
            }
        },
    };
    let after = match query.after.as_deref().filter(|a| !a.is_empty()) {
        None => None,
        Some(raw) => match raw.parse::<Uuid>() {
            Ok(id) => Some(id),
            Err(_) => {
                return bad_request(
                    &state,
                    &operator,
                    "The page cursor is not an id.",
                    "/console/subscriptions",
                );
            }
        },
    };
    let mut filter = SubscriptionFilter {
        state: wanted_state,
        after,
        limit: PAGE_SIZE + 1,
        ..SubscriptionFilter::default()
    };
    if !q.is_empty() {
        match q.parse::<Uuid>() {
            Ok(id) => match subscriptions::exists(&state.pool, id).await {
                Ok(true) => {
                    return Redirect::to(&format!("/console/subscriptions/{id}")).into_response();
                }
                Ok(false) => filter.beneficiary_tenant_id = Some(id),
                Err(error) => return failure(&state, &operator, error.into()),
            },
            Err(_) => filter.offer_id = Some(q.clone()),
        }
    }
    let mut records = match subscriptions::list(&state.pool, &filter).await {
        Ok(records) => records,
        Err(error) => return failure(&state, &operator, error.into()),
    };
    let more = records.len() > PAGE_SIZE as usize;
    records.truncate(PAGE_SIZE as usize);
    let next = more
        .then(|| records.last().map(|r| r.id.to_string()))
        .flatten();
    let rows = records
        .iter()
        .map(|r| Row {
            id: r.id.to_string(),
            state: r.state.clone(),
            offer: r.offer_id.clone().unwrap_or_else(|| "-".into()),
            plan: r.plan_id.clone().unwrap_or_else(|| "-".into()),
            seats: r.quantity.map_or("-".into(), |q| q.to_string()),
            tenant: r
                .beneficiary_tenant_id
                .map_or("-".into(), |t| t.to_string()),
        })
        .collect();
    ListPage {
        layout: layout(&state, &operator),
        q,
        state: wanted_state
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        states: StateName::ALL.iter().map(|s| s.as_str()).collect(),
        rows,
        next,
    }
    .into_response()
}

/// One call to Microsoft on the timeline.
#[derive(Debug)]
pub struct CallRow {
    pub call: String,
    pub status: String,
    pub request_id: String,
    pub error: String,
}

#[derive(Debug)]
pub struct EntryRow {
    pub at: String,
    pub kind: String,
    pub what: String,
    pub outcome: EntryOutcome,
    pub reason: String,
    pub change: String,
    pub effects: String,
    pub calls: Vec<CallRow>,
    pub by: String,
}

#[derive(Debug)]
pub struct EffectRowView {
    pub id: String,
    pub kind: String,
    pub status: String,
    pub dead: bool,
    pub attempts: i32,
    pub error: String,
    pub decided: String,
}

#[derive(Debug)]
pub struct OperationRow {
    pub command_id: String,
    pub kind: String,
    pub target: String,
    pub status: CommandStatus,
    pub error: String,
    pub at: String,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "console/subscription.html")]
pub struct SubscriptionPage {
    pub layout: Layout,
    pub id: String,
    pub state: String,
    pub facts: Vec<(String, String)>,
    pub effects: Vec<EffectRowView>,
    pub operations: Vec<OperationRow>,
    pub entries: Vec<EntryRow>,
    pub can_act: bool,
}

fn entry_row(entry: &TimelineEntry) -> EntryRow {
    EntryRow {
        at: when(entry.at),
        kind: entry.kind.clone(),
        what: entry.what.clone(),
        outcome: entry.outcome,
        reason: entry.reason.clone().unwrap_or_default(),
        change: match (&entry.from_state, &entry.to_state) {
            (Some(from), Some(to)) if from != to => format!("{from} → {to}"),
            _ => String::new(),
        },
        effects: entry.effects.join(", "),
        calls: entry
            .calls
            .iter()
            .map(|c| CallRow {
                call: c.call.clone(),
                status: c.status.map_or("no answer".into(), |s| format!("HTTP {s}")),
                request_id: c.request_id.clone().unwrap_or_default(),
                error: c.error.clone().unwrap_or_default(),
            })
            .collect(),
        by: entry.by.clone().unwrap_or_default(),
    }
}

/// The page refusing a path that names no subscription.
fn not_a_subscription_id(state: &AppState, operator: &SignedInOperator) -> Response {
    bad_request(
        state,
        operator,
        "A subscription id is a GUID.",
        "/console/subscriptions",
    )
}

pub async fn page(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(raw): Path<String>,
) -> Response {
    let Ok(id) = raw.parse::<Uuid>() else {
        return not_a_subscription_id(&state, &operator);
    };
    let timeline = match subscription::timeline(&state.pool, id).await {
        Ok(Some(timeline)) => timeline,
        Ok(None) => {
            return outcome(
                &state,
                &operator,
                StatusCode::NOT_FOUND,
                "No such subscription",
                vec![format!("Nothing is known here about {id}.")],
                ("/console/subscriptions".into(), "Subscriptions".into()),
            );
        }
        Err(error) => return failure(&state, &operator, error),
    };
    let effects = match dead_effects::unfinished_for_subscription(&state.pool, id).await {
        Ok(effects) => effects,
        Err(error) => return failure(&state, &operator, error.into()),
    };
    let s = &timeline.subscription;
    let term = &s["term"];
    let party = |p: &Value| match (&p["emailId"], &p["tenantId"]) {
        (Value::Null, Value::Null) => "-".to_string(),
        (email, tenant) => format!("{} (tenant {})", text(email), text(tenant)),
    };
    let facts = vec![
        ("Offer".into(), text(&s["offerId"])),
        ("Plan".into(), text(&s["planId"])),
        ("Seats".into(), text(&s["quantity"])),
        (
            "Term".into(),
            if term.is_null() {
                "-".into()
            } else {
                format!(
                    "{} from {} to {}",
                    text(&term["termUnit"]),
                    text(&term["startDate"]),
                    text(&term["endDate"])
                )
            },
        ),
        ("Beneficiary".into(), party(&s["beneficiary"])),
        ("Purchaser".into(), party(&s["purchaser"])),
        ("Beneficiary tenant".into(), text(&s["beneficiaryTenantId"])),
        ("Purchaser tenant".into(), text(&s["purchaserTenantId"])),
        ("Created".into(), text(&s["createdAt"])),
        (
            "Effects".into(),
            format!(
                "{} pending, {} dead",
                timeline.effects_pending, timeline.effects_dead
            ),
        ),
    ];
    SubscriptionPage {
        layout: layout(&state, &operator),
        id: id.to_string(),
        state: text(&s["state"]),
        facts,
        effects: effects
            .iter()
            .map(|e| EffectRowView {
                id: e.id.to_string(),
                kind: e.kind.clone(),
                status: e.status.as_str().to_string(),
                dead: e.status == EffectStatus::Dead,
                attempts: e.attempts,
                error: e.last_error.clone().unwrap_or_default(),
                decided: when(e.created_at),
            })
            .collect(),
        operations: timeline
            .publisher_operations
            .iter()
            .map(|op| OperationRow {
                command_id: op.command_id.to_string(),
                kind: op.kind.clone(),
                target: op
                    .target_plan_id
                    .clone()
                    .or(op.target_quantity.map(|q| format!("{q} seats")))
                    .unwrap_or_default(),
                status: op.status,
                error: op.last_error.clone().unwrap_or_default(),
                at: when(op.updated_at),
            })
            .collect(),
        entries: timeline.entries.iter().map(entry_row).collect(),
        can_act: operator.role == OperatorRole::Operator,
    }
    .into_response()
}

#[derive(Debug, Deserialize)]
pub struct CommandForm {
    /// `activate`, `change_plan`, `change_quantity` or `cancel`.
    pub command: String,
    #[serde(default)]
    pub plan: Option<String>,
    #[serde(default)]
    pub quantity: Option<String>,
    /// `yes` once the operator confirmed.
    #[serde(default)]
    pub confirm: Option<String>,
}

/// The command a form asks for, or why it makes no sense.
pub fn parse_command(form: &CommandForm) -> Result<PublisherCommand, String> {
    match form.command.as_str() {
        "activate" => Ok(PublisherCommand::Activate),
        "cancel" => Ok(PublisherCommand::Cancel),
        "change_plan" => {
            let plan = form.plan.as_deref().map(str::trim).unwrap_or_default();
            if plan.is_empty()
                || plan.len() > 50
                || !plan
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err("A plan id is 1 to 50 letters, digits, '-' or '_'.".into());
            }
            Ok(PublisherCommand::ChangePlan {
                plan_id: plan.to_string(),
            })
        }
        "change_quantity" => {
            let raw = form.quantity.as_deref().map(str::trim).unwrap_or_default();
            match raw.parse::<u32>() {
                Ok(quantity) if quantity >= 1 => Ok(PublisherCommand::ChangeQuantity { quantity }),
                _ => Err(format!(
                    "The seat count must be a whole number of at least 1; got {raw:?}."
                )),
            }
        }
        other => Err(format!("{other:?} is not a publisher command.")),
    }
}

fn describe(command: &PublisherCommand) -> String {
    match command {
        PublisherCommand::Activate => "activate the subscription".into(),
        PublisherCommand::Cancel => {
            "cancel the subscription at Microsoft (the customer loses it)".into()
        }
        PublisherCommand::ChangePlan { plan_id } => {
            format!("move the subscription to plan {plan_id}")
        }
        PublisherCommand::ChangeQuantity { quantity } => {
            format!("change the seat count to {quantity}")
        }
    }
}

pub async fn command(
    State(state): State<AppState>,
    operator: SignedInOperator,
    Path(raw): Path<String>,
    Form(form): Form<CommandForm>,
) -> Response {
    let Ok(id) = raw.parse::<Uuid>() else {
        return not_a_subscription_id(&state, &operator);
    };
    let back = format!("/console/subscriptions/{id}");
    let command = match parse_command(&form) {
        Ok(command) => command,
        Err(why) => return bad_request(&state, &operator, why, &back),
    };
    if form.confirm.as_deref() != Some("yes") {
        let mut fields = vec![("command".to_string(), form.command.clone())];
        if let Some(plan) = &form.plan {
            fields.push(("plan".into(), plan.trim().to_string()));
        }
        if let Some(quantity) = &form.quantity {
            fields.push(("quantity".into(), quantity.trim().to_string()));
        }
        return super::effects::ConfirmPage {
            layout: layout(&state, &operator),
            title: "Confirm the command".into(),
            paragraphs: vec![
                format!("You are about to {} {id}.", describe(&command)),
                "It goes through the queue and the state machine like every command; Microsoft decides the outcome.".into(),
            ],
            action: format!("/console/subscriptions/{id}/commands"),
            fields,
            button: "Send the command".into(),
            cancel: back,
        }
        .into_response();
    }
    let command_id = match subscription::submit(
        &state.broker,
        &state.pool,
        id,
        command.clone(),
        &actor(&operator),
    )
    .await
    {
        Ok(command_id) => command_id,
        Err(error) => return failure(&state, &operator, error),
    };
    let result =
        subscription::wait_for_outcome(&state.pool, command_id, Duration::from_secs(5)).await;
    let said = match result {
        Ok(outcome) => format!(
            "Status: {}{}.",
            serde_json::to_value(outcome.status)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            outcome
                .reason
                .map(|r| format!(" — {r}"))
                .unwrap_or_default()
        ),
        Err(_) => "Its outcome is not known yet.".into(),
    };
    outcome(
        &state,
        &operator,
        StatusCode::OK,
        "Command sent",
        vec![
            format!(
                "Command {command_id} ({}) was queued for {id}.",
                command.name()
            ),
            said,
            "The subscription's page shows the changes we asked Microsoft for and their outcome."
                .into(),
        ],
        (back, "Back to the subscription".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(command: &str, plan: Option<&str>, quantity: Option<&str>) -> CommandForm {
        CommandForm {
            command: command.into(),
            plan: plan.map(Into::into),
            quantity: quantity.map(Into::into),
            confirm: None,
        }
    }

    #[test]
    fn a_command_form_is_checked_before_anything_is_sent() {
        assert!(matches!(
            parse_command(&form("activate", None, None)),
            Ok(PublisherCommand::Activate)
        ));
        assert!(matches!(
            parse_command(&form("change_quantity", None, Some("7"))),
            Ok(PublisherCommand::ChangeQuantity { quantity: 7 })
        ));
        assert!(parse_command(&form("change_quantity", None, Some("0"))).is_err());
        assert!(parse_command(&form("change_quantity", None, Some("many"))).is_err());
        assert!(parse_command(&form("change_plan", Some("gold plan<script>"), None)).is_err());
        assert!(parse_command(&form("change_plan", Some(" gold "), None)).is_ok());
        assert!(parse_command(&form("delete_everything", None, None)).is_err());
    }
}
