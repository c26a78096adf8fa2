//! `fulfillment subscription list|show|activate|change-plan|change-quantity|cancel`.
//!
//! `show` is design.md guarantee 7: the current state and the whole timeline, merged from
//! the event log (`subscription_events`: every message, decision and reason, effects, and
//! each call to Microsoft with its status and request ids) and the operator journal
//! (`operator_actions`: dead-letter replays and purges).
//!
//! The commands go through the inbound queue and the machine exactly like the entitlement
//! API's (confirmed publish; `requested_by = cli:<user>@<host>`), so one subscription still
//! sees one decision at a time. `--wait` prints the machine's decision.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use fulfillment_state_machine::{PlanId, Quantity, StateName, SubscriptionMachine};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::render::{Table, clock, or_dash, shorten, when};
use super::{UsageError, cli_actor};
use crate::http::entitlements::subscription_view;
use crate::queue::{Broker, InboundMessage, InboxKey, MessageMeta, PublisherCommand};
use crate::settings::Settings;
use crate::store::ledger::LogOutcome;
use crate::store::notices::{self, NoticeRow, NoticeStatus};
use crate::store::operator_actions::{self, ActionKind, OperatorAction};
use crate::store::subscriptions::{self, MAX_PAGE_SIZE, SubscriptionFilter, SubscriptionRecord};
use crate::store::timeline::{self, EventRow, PublisherOperationRow};

#[derive(Debug, clap::Subcommand)]
pub enum SubscriptionCommand {
    /// List the subscriptions we know, in id order.
    List(ListArgs),
    /// The current state and the whole timeline from the event log.
    Show(ShowArgs),
    /// Ask the machine to activate (manual activation, or a retry after a failure).
    Activate(CommandArgs),
    /// Ask Microsoft to move the subscription to another plan (through the machine).
    ChangePlan(ChangePlanArgs),
    /// Ask Microsoft to change the seat count (through the machine).
    ChangeQuantity(ChangeQuantityArgs),
    /// Ask Microsoft to cancel the subscription (through the machine).
    Cancel(CommandArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// PendingFulfillment, Subscribed, Suspended or Unsubscribed.
    #[arg(long, value_name = "S")]
    pub state: Option<String>,
    /// Offer id.
    #[arg(long, value_name = "O")]
    pub offer: Option<String>,
    /// Beneficiary tenant id.
    #[arg(long, value_name = "T")]
    pub tenant: Option<Uuid>,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The subscription id (Microsoft's, as `subscription list` shows it).
    pub id: Uuid,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CommandArgs {
    /// The subscription id (Microsoft's, as `subscription list` shows it).
    pub id: Uuid,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct WaitArgs {
    /// Wait for the command's final outcome and print it: exit 0 only when it succeeded,
    /// 1 when our policy or Microsoft refused it, it failed, its outcome is unknown, or the
    /// wait timed out.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, in seconds (a publisher change takes at least the 10 s
    /// Microsoft asks before the first poll).
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChangePlanArgs {
    /// The subscription id (Microsoft's, as `subscription list` shows it).
    pub id: Uuid,
    /// The target plan id.
    pub plan: String,
    #[command(flatten)]
    pub wait: WaitArgs,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChangeQuantityArgs {
    /// The subscription id (Microsoft's, as `subscription list` shows it).
    pub id: Uuid,
    /// The target seat count (at least 1).
    pub quantity: u32,
    #[command(flatten)]
    pub wait: WaitArgs,
}

/// Every subscription matching `filter` (all pages).
pub async fn list(
    pool: &PgPool,
    state: Option<StateName>,
    offer_id: Option<String>,
    tenant: Option<Uuid>,
) -> Result<Vec<SubscriptionRecord>, sqlx::Error> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = subscriptions::list(
            pool,
            &SubscriptionFilter {
                state,
                beneficiary_tenant_id: tenant,
                offer_id: offer_id.clone(),
                after,
                limit: MAX_PAGE_SIZE,
            },
        )
        .await?;
        let full = page.len() >= MAX_PAGE_SIZE as usize;
        after = page.last().map(|r| r.id);
        all.extend(page);
        if !full {
            return Ok(all);
        }
    }
}

/// One call to Microsoft, as the event log recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct CallView {
    pub call: String,
    pub status: Option<u64>,
    pub request_id: Option<String>,
    pub correlation_id: Option<String>,
    pub attempts: Option<u64>,
    pub error: Option<String>,
}

/// What became of a timeline entry: the event log's outcome, or the operator's action.
/// Serialized as its word (`applied`, …, `dlq_replay`, …).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryOutcome {
    Log(LogOutcome),
    Operator(ActionKind),
}

impl EntryOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Log(outcome) => crate::store::text::TextValue::as_str(outcome),
            Self::Operator(action) => action.as_str(),
        }
    }
}

impl std::fmt::Display for EntryOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for EntryOutcome {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// One line of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct TimelineEntry {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `event_log` or `operator`.
    pub source: &'static str,
    pub sequence: Option<i64>,
    /// The event kind (`WebhookChangePlan`, `effect:activate`, `dlq_replay`, …).
    pub kind: String,
    /// What happened, in words.
    pub what: String,
    /// `applied`, `rejected`, `ignored`, `recorded` (an effect's calls), or the operator
    /// action.
    pub outcome: EntryOutcome,
    pub reason: Option<String>,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    /// The effects the decision queued.
    pub effects: Vec<String>,
    pub calls: Vec<CallView>,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub by: Option<String>,
}

/// The current state and the whole story of one subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub subscription: Value,
    pub activation: Value,
    pub pending_operation: Value,
    pub effects_pending: i64,
    pub effects_dead: i64,
    pub publisher_operations: Vec<PublisherOperationRow>,
    /// Lifecycle notices: pending, sent and cancelled.
    pub notices: Vec<NoticeRow>,
    pub entries: Vec<TimelineEntry>,
}

/// The timeline of `id`; `None` when we know nothing about it (not even a replay).
pub async fn timeline(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<Timeline>> {
    let record = subscriptions::find(pool, id).await?;
    let events = timeline::events(pool, id).await?;
    let actions = operator_actions::for_subscription(pool, id).await?;
    if record.is_none() && actions.is_empty() {
        return Ok(None);
    }
    let machine = record
        .as_ref()
        .and_then(|r| serde_json::from_value::<SubscriptionMachine>(r.machine.clone()).ok());
    let (effects_pending, effects_dead) = timeline::outbox_counts(pool, id).await?;
    // The event log in its own order (sequence, assigned under the row lock); operator
    // actions slotted in by time.
    let mut operator: Vec<TimelineEntry> = actions.iter().map(operator_entry).collect();
    operator.sort_by_key(|e| e.at);
    let mut operator = operator.into_iter().peekable();
    let mut entries = Vec::with_capacity(events.len() + actions.len());
    for row in &events {
        while let Some(action) = operator.next_if(|a| a.at <= row.recorded_at) {
            entries.push(action);
        }
        entries.push(event_entry(row));
    }
    entries.extend(operator);
    Ok(Some(Timeline {
        subscription: record
            .as_ref()
            .map(subscription_view)
            .unwrap_or_else(|| json!({ "id": id, "state": null })),
        activation: machine
            .as_ref()
            .map(|m| serde_json::to_value(m.activation()).unwrap_or(Value::Null))
            .unwrap_or(Value::Null),
        pending_operation: machine
            .as_ref()
            .and_then(|m| m.pending_operation().cloned())
            .map(|op| serde_json::to_value(op).unwrap_or(Value::Null))
            .unwrap_or(Value::Null),
        effects_pending,
        effects_dead,
        publisher_operations: timeline::publisher_operations(pool, id).await?,
        notices: notices::of_subscription(pool, id).await?,
        entries,
    }))
}

fn event_entry(row: &EventRow) -> TimelineEntry {
    let effects = row
        .effects
        .as_array()
        .map(|effects| effects.iter().map(effect_label).collect())
        .unwrap_or_default();
    // A read's calls are in the row of the event it fed (`execution`), others' in their
    // execution's own row.
    let calls = row
        .execution
        .as_ref()
        .unwrap_or(&row.event)
        .get("calls")
        .and_then(Value::as_array)
        .map(|calls| calls.iter().map(call_view).collect())
        .unwrap_or_default();
    TimelineEntry {
        at: row.recorded_at,
        source: "event_log",
        sequence: Some(row.sequence),
        kind: row.event_kind.clone(),
        what: describe_event(&row.event_kind, &row.event),
        outcome: EntryOutcome::Log(row.outcome),
        reason: row.reason.clone(),
        from_state: Some(row.from_state.clone()),
        to_state: Some(row.to_state.clone()),
        effects,
        calls,
        message_id: row.message_id.clone(),
        correlation_id: row.correlation_id.clone(),
        request_id: row.request_id.clone(),
        by: None,
    }
}

fn operator_entry(action: &OperatorAction) -> TimelineEntry {
    let what = match action.action {
        ActionKind::DlqReplay => format!(
            "dead letter {} replayed from {} to the work queue",
            action.dead_letter_id.as_deref().unwrap_or("?"),
            action.queue.as_deref().unwrap_or("?")
        ),
        ActionKind::DlqPurge => format!(
            "dead letter {} purged from {} (kept in the journal)",
            action.dead_letter_id.as_deref().unwrap_or("?"),
            action.queue.as_deref().unwrap_or("?")
        ),
        ActionKind::EffectRetry => format!(
            "dead effect {} ({}) put back to pending",
            action.details["effect_id"].as_str().unwrap_or("?"),
            action.details["kind"].as_str().unwrap_or("?")
        ),
        ActionKind::EffectAbandon => format!(
            "dead effect {} ({}) abandoned",
            action.details["effect_id"].as_str().unwrap_or("?"),
            action.details["kind"].as_str().unwrap_or("?")
        ),
        other @ (ActionKind::Reconcile | ActionKind::WebhookReplay) => {
            format!("operator action {other}")
        }
    };
    // A dead letter's or dead effect's reason is why it failed; an abandon's is the
    // operator's.
    let reason = match action.action {
        ActionKind::EffectAbandon => action.reason.clone(),
        _ => action.reason.clone().map(|r| format!("it had failed: {r}")),
    };
    TimelineEntry {
        at: action.performed_at,
        source: "operator",
        sequence: None,
        kind: action.action.as_str().to_string(),
        what,
        outcome: EntryOutcome::Operator(action.action),
        reason,
        from_state: None,
        to_state: None,
        effects: Vec::new(),
        calls: Vec::new(),
        message_id: action.details["message_id"].as_str().map(str::to_string),
        correlation_id: action.details["correlation_id"]
            .as_str()
            .filter(|c| !c.is_empty())
            .map(str::to_string),
        request_id: None,
        by: Some(action.performed_by.clone()),
    }
}

fn effect_label(effect: &Value) -> String {
    let kind = effect["type"].as_str().unwrap_or("?");
    match kind {
        "ack_operation" => format!(
            "ack_operation({})",
            effect["status"].as_str().unwrap_or("?")
        ),
        "publish_domain_event" => format!(
            "publish_domain_event({})",
            effect["kind"].as_str().unwrap_or("?")
        ),
        "request_plan_change" => format!(
            "request_plan_change({})",
            effect["plan_id"].as_str().unwrap_or("?")
        ),
        "request_quantity_change" => format!(
            "request_quantity_change({})",
            effect["quantity"].as_u64().unwrap_or(0)
        ),
        other => other.to_string(),
    }
}

fn call_view(call: &Value) -> CallView {
    let text = |key: &str| call[key].as_str().map(str::to_string);
    CallView {
        call: text("call").unwrap_or_else(|| "?".into()),
        status: call["status"].as_u64(),
        request_id: text("request_id"),
        correlation_id: text("correlation_id"),
        attempts: call["attempts"].as_u64(),
        error: text("error").map(|kind| match text("detail") {
            Some(detail) => format!("{kind}: {detail}"),
            None => kind,
        }),
    }
}

/// The event in words, from the JSON the event log keeps.
fn describe_event(kind: &str, event: &Value) -> String {
    let text = |v: &Value| v.as_str().map(str::to_string);
    let plan_and_seats = |plan: &Value, quantity: &Value| {
        let mut out = String::new();
        if let Some(plan) = plan.as_str() {
            out.push_str(&format!(", plan {plan}"));
        }
        if let Some(q) = quantity.as_u64() {
            out.push_str(&format!(", {q} seats"));
        }
        out
    };
    match event["type"].as_str() {
        Some("webhook") => {
            let action = text(&event["action"]).unwrap_or_else(|| "?".into());
            let target = match action.as_str() {
                "ChangePlan" => text(&event["plan_id"]).map(|p| format!(" to plan {p}")),
                "ChangeQuantity" => event["quantity"].as_u64().map(|q| format!(" to {q} seats")),
                _ => None,
            }
            .unwrap_or_default();
            format!(
                "Microsoft webhook {action}{target} (operation {}, source {})",
                text(&event["operation_id"]).unwrap_or_default(),
                text(&event["source"])
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "unknown".into())
            )
        }
        Some("purchase_resolved") => format!(
            "landing page resolved the purchase: {}{}",
            text(&event["snapshot"]["status"]).unwrap_or_default(),
            plan_and_seats(
                &event["snapshot"]["plan_id"],
                &event["snapshot"]["quantity"]
            )
        ),
        Some("observed") => format!(
            "observed at Microsoft: {}{}",
            text(&event["snapshot"]["status"]).unwrap_or_default(),
            plan_and_seats(
                &event["snapshot"]["plan_id"],
                &event["snapshot"]["quantity"]
            )
        ),
        Some("activation_requested") => format!(
            "activation requested (command {})",
            text(&event["command_id"]).unwrap_or_default()
        ),
        Some("activation_confirmed") => "Microsoft confirmed the activation".into(),
        Some("activation_failed") => format!(
            "activation failed: {}",
            text(&event["reason"]).unwrap_or_default()
        ),
        Some("publisher_command") => {
            let command = &event["command"];
            let what = match command["type"].as_str() {
                Some("change_plan") => format!(
                    "change plan to {}",
                    text(&command["plan_id"]).unwrap_or_default()
                ),
                Some("change_quantity") => format!(
                    "change quantity to {}",
                    command["quantity"].as_u64().unwrap_or(0)
                ),
                Some("cancel") => "cancel".into(),
                other => other.unwrap_or("?").to_string(),
            };
            format!(
                "publisher command: {what} (command {})",
                text(&event["command_id"]).unwrap_or_default()
            )
        }
        Some("publisher_operation_accepted") => format!(
            "Microsoft accepted command {} as operation {}",
            text(&event["command_id"]).unwrap_or_default(),
            text(&event["operation_id"]).unwrap_or_default()
        ),
        Some("publisher_operation_refused") => format!(
            "Microsoft refused command {}",
            text(&event["command_id"]).unwrap_or_default()
        ),
        Some("operation_result") => format!(
            "operation {} ended {}",
            text(&event["operation_id"]).unwrap_or_default(),
            text(&event["status"]).unwrap_or_default()
        ),
        _ => {
            if let Some(effect) = kind.strip_prefix("effect:") {
                format!("effect {effect} carried out")
            } else if let Some(notice) = kind.strip_prefix("notice:") {
                format!(
                    "lifecycle notice subscription.{notice} (due {})",
                    text(&event["due"]).unwrap_or_default()
                )
            } else if let Some(what) = kind.strip_prefix("reconcile:") {
                format!("reconciliation: {}", what.replace('_', " "))
            } else {
                kind.to_string()
            }
        }
    }
}

/// Queues a publisher command for `subscription_id` (which must be known here), confirmed
/// by RabbitMQ; returns the command id.
pub async fn submit(
    broker: &Broker,
    pool: &PgPool,
    subscription_id: Uuid,
    command: PublisherCommand,
    requested_by: &str,
) -> anyhow::Result<Uuid> {
    if !subscriptions::exists(pool, subscription_id).await? {
        anyhow::bail!("subscription {subscription_id} is not known here");
    }
    let command_id = Uuid::new_v4();
    let kind = command.name();
    crate::store::commands::record(pool, command_id, subscription_id, kind, requested_by).await?;
    let message = InboundMessage::Command {
        command_id,
        subscription_id,
        command,
        requested_by: requested_by.to_string(),
        requested_at: OffsetDateTime::now_utc(),
    };
    let meta = MessageMeta {
        message_id: InboxKey::command(command_id).into_message_id(),
        correlation_id: command_id.to_string(),
        traceparent: Some(crate::http::webhook::new_traceparent()),
        subscription_id: Some(subscription_id),
    };
    let published = match broker.publisher().await {
        Ok(publisher) => publisher
            .publish_inbound(&message, &meta)
            .await
            .map_err(anyhow::Error::from),
        Err(error) => Err(error.into()),
    };
    if let Err(error) = published {
        let _ = crate::store::commands::forget(pool, command_id).await;
        return Err(error.context("the command was not queued (nothing was accepted); retry later"));
    }
    Ok(command_id)
}

// ---- the command line ------------------------------------------------------------------

pub async fn run(settings: &Settings, command: SubscriptionCommand) -> anyhow::Result<ExitCode> {
    let pool = crate::store::connect(&settings.database).await?;
    let result = run_with(settings, &pool, command).await;
    pool.close().await;
    result
}

async fn run_with(
    settings: &Settings,
    pool: &PgPool,
    command: SubscriptionCommand,
) -> anyhow::Result<ExitCode> {
    let (id, command, wait) = match command {
        SubscriptionCommand::List(args) => return run_list(pool, args).await,
        SubscriptionCommand::Show(args) => return run_show(pool, args).await,
        SubscriptionCommand::Activate(args) => (args.id, PublisherCommand::Activate, args.wait),
        SubscriptionCommand::Cancel(args) => (args.id, PublisherCommand::Cancel, args.wait),
        SubscriptionCommand::ChangePlan(args) => {
            let plan = PlanId::parse(&args.plan)
                .map_err(|e| UsageError::new(format!("invalid plan {:?}: {e}", args.plan)))?;
            (
                args.id,
                PublisherCommand::ChangePlan {
                    plan_id: plan.as_str().to_string(),
                },
                args.wait,
            )
        }
        SubscriptionCommand::ChangeQuantity(args) => {
            let quantity = Quantity::new(args.quantity)
                .map_err(|e| UsageError::new(format!("invalid quantity {}: {e}", args.quantity)))?;
            (
                args.id,
                PublisherCommand::ChangeQuantity {
                    quantity: quantity.get(),
                },
                args.wait,
            )
        }
    };
    let broker = Broker::connect(&settings.amqp, "fulfillment-cli").await?;
    let submitted = submit(&broker, pool, id, command, &cli_actor()).await;
    broker.close().await;
    let command_id = match submitted {
        Ok(command_id) => command_id,
        Err(error) => {
            eprintln!("error: {error:#}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if !wait.wait {
        if wait.json {
            println!(
                "{}",
                json!({ "commandId": command_id, "subscriptionId": id, "status": "queued" })
            );
        } else {
            println!("queued command {command_id} for subscription {id}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = wait_for_outcome(pool, command_id, Duration::from_secs(wait.timeout)).await?;
    if wait.json {
        println!("{}", serde_json::to_string(&outcome)?);
    } else {
        println!(
            "command {command_id} ({}): {}{}{}",
            outcome.command,
            serde_json::to_value(outcome.status)?
                .as_str()
                .unwrap_or_default(),
            outcome
                .operation_id
                .map(|op| format!(", Microsoft's operation {op}"))
                .unwrap_or_default(),
            outcome
                .reason
                .as_deref()
                .map(|why| format!(" — {why}"))
                .unwrap_or_default(),
        );
        if !outcome.status.is_final() {
            println!(
                "no final outcome within {} s; ask again with GET /api/v1/commands/{command_id}",
                wait.timeout
            );
        }
    }
    Ok(if outcome.status == crate::commands::Status::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Polls the command's outcome until it is final or `timeout` passed; the last one seen.
pub async fn wait_for_outcome(
    pool: &PgPool,
    command_id: Uuid,
    timeout: Duration,
) -> anyhow::Result<crate::commands::Outcome> {
    let deadline = Instant::now() + timeout;
    loop {
        let outcome = crate::commands::outcome_of(pool, command_id)
            .await?
            .with_context(|| format!("command {command_id} was not recorded"))?;
        if outcome.status.is_final() || Instant::now() >= deadline {
            return Ok(outcome);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn run_list(pool: &PgPool, args: ListArgs) -> anyhow::Result<ExitCode> {
    let state = args
        .state
        .as_deref()
        .map(|s| {
            s.trim().parse::<StateName>().map_err(|_| {
                UsageError::new(format!(
                    "--state must be PendingFulfillment, Subscribed, Suspended or Unsubscribed; got {s:?}"
                ))
            })
        })
        .transpose()?;
    let records = list(pool, state, args.offer.clone(), args.tenant).await?;
    if args.json {
        let views: Vec<Value> = records.iter().map(subscription_view).collect();
        println!("{}", serde_json::to_string_pretty(&views)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(
        &[
            "ID",
            "STATE",
            "OFFER",
            "PLAN",
            "SEATS",
            "BENEFICIARY TENANT",
            "UPDATED",
        ],
        &[36, 18, 30, 24, 6, 36, 19],
    );
    for r in &records {
        table.row(vec![
            r.id.to_string(),
            r.state.clone(),
            or_dash(r.offer_id.clone()),
            or_dash(r.plan_id.clone()),
            or_dash(r.quantity),
            or_dash(r.beneficiary_tenant_id),
            when(r.updated_at),
        ]);
    }
    print!("{}", table.render());
    println!("{} subscription(s)", records.len());
    Ok(ExitCode::SUCCESS)
}

async fn run_show(pool: &PgPool, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let Some(timeline) = timeline(pool, args.id).await? else {
        if args.json {
            println!("null");
        } else {
            println!("subscription {} is not known here", args.id);
        }
        return Ok(ExitCode::FAILURE);
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&timeline)?);
    } else {
        print!("{}", render_timeline(&timeline));
    }
    Ok(ExitCode::SUCCESS)
}

/// The timeline for a person: a header with the current state, then one block per entry.
pub fn render_timeline(t: &Timeline) -> String {
    let s = &t.subscription;
    let value = |v: &Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut out = format!("Subscription {}\n", value(&s["id"]));
    let mut field = |key: &str, v: String| out.push_str(&format!("  {key:<18} {v}\n"));
    field("state", value(&s["state"]));
    field("offer", value(&s["offerId"]));
    field("plan", value(&s["planId"]));
    field("seats", value(&s["quantity"]));
    field("beneficiary", value(&s["beneficiaryTenantId"]));
    field("purchaser", value(&s["purchaserTenantId"]));
    field(
        "term",
        match &s["term"] {
            Value::Null => "-".into(),
            term => format!(
                "{} from {} to {}",
                value(&term["termUnit"]),
                value(&term["startDate"]),
                value(&term["endDate"])
            ),
        },
    );
    field("activation", value(&t.activation["status"]));
    field(
        "pending operation",
        match &t.pending_operation {
            Value::Null => "none".into(),
            op => format!(
                "command {} ({}), operation {}",
                value(&op["command_id"]),
                value(&op["command"]["type"]),
                value(&op["operation_id"])
            ),
        },
    );
    field(
        "effects",
        format!("{} pending, {} dead", t.effects_pending, t.effects_dead),
    );
    field("created", value(&s["createdAt"]));
    field("updated", value(&s["updatedAt"]));
    if !t.publisher_operations.is_empty() {
        out.push_str("\nChanges we asked Microsoft for\n");
        for op in &t.publisher_operations {
            let target = op
                .target_plan_id
                .clone()
                .or(op.target_quantity.map(|q| format!("{q} seats")))
                .map(|t| format!(" {t}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "  {} {}{target}: {} (operation {}){}\n",
                when(op.created_at),
                op.kind,
                op.status,
                or_dash(op.operation_id),
                op.last_error
                    .as_deref()
                    .map(|e| format!(" — {}", shorten(e, 120)))
                    .unwrap_or_default()
            ));
        }
    }
    if !t.notices.is_empty() {
        out.push_str("\nLifecycle notices\n");
        for notice in &t.notices {
            let status = match notice.status {
                NoticeStatus::Pending => "pending",
                NoticeStatus::Sent => "sent",
                NoticeStatus::Cancelled => "cancelled",
            };
            out.push_str(&format!(
                "  {}{}  subscription.{}: {status} — {}\n",
                when(notice.due_at),
                clock(notice.due_at).get(8..).unwrap_or(""),
                notice.kind,
                shorten(&notice.reason, 120)
            ));
        }
    }
    out.push_str(&format!("\nTimeline ({} entries, UTC)\n", t.entries.len()));
    for e in &t.entries {
        let seq = e.sequence.map_or("  op".to_string(), |s| format!("{s:>4}"));
        let states = match (&e.from_state, &e.to_state) {
            (Some(from), Some(to)) if from != to => format!("  [{from} → {to}]"),
            _ => String::new(),
        };
        out.push_str(&format!(
            "{seq}  {}{}  {}{states}\n",
            when(e.at),
            clock(e.at).get(8..).unwrap_or(""),
            e.what
        ));
        let decision = match (&e.reason, e.outcome) {
            (Some(reason), EntryOutcome::Log(LogOutcome::Recorded)) => format!("result: {reason}"),
            (Some(reason), outcome) => format!("decision: {outcome} — {reason}"),
            (None, outcome) => format!("decision: {outcome}"),
        };
        out.push_str(&format!("        {decision}\n"));
        if !e.effects.is_empty() {
            out.push_str(&format!("        effects: {}\n", e.effects.join(", ")));
        }
        for call in &e.calls {
            out.push_str(&format!(
                "        call {} → {}{}, x-ms-requestid {}{}\n",
                call.call,
                call.status
                    .map_or("no response".into(), |s| format!("HTTP {s}")),
                call.attempts
                    .filter(|a| *a > 1)
                    .map(|a| format!(" after {a} attempts"))
                    .unwrap_or_default(),
                call.request_id.as_deref().unwrap_or("-"),
                call.error
                    .as_deref()
                    .map(|e| format!(" ({})", shorten(e, 160)))
                    .unwrap_or_default()
            ));
        }
        let mut ids = Vec::new();
        if let Some(by) = &e.by {
            ids.push(format!("by {by}"));
        }
        if let Some(m) = &e.message_id {
            ids.push(format!("message {m}"));
        }
        if let Some(c) = &e.correlation_id {
            ids.push(format!("correlation {c}"));
        }
        if let Some(r) = e.request_id.as_ref().filter(|_| e.calls.is_empty()) {
            ids.push(format!("x-ms-requestid {r}"));
        }
        if !ids.is_empty() {
            out.push_str(&format!("        {}\n", ids.join(", ")));
        }
    }
    out
}
