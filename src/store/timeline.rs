//! Read queries behind the operator CLI: a subscription's event log and what is still in
//! flight for it (effects not yet run, publisher operations not yet final).

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgPool;
use std::collections::HashMap;
use time::OffsetDateTime;
use uuid::Uuid;

use super::ledger::LogOutcome;
use super::outbox::OutboxStatus;
use super::text::{self, TextValue};
use crate::worker::protocol::CommandStatus;

// Shown as the words the columns hold (the CLI's text and logs quote them).
impl std::fmt::Display for LogOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for CommandStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One `subscription_events` row.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct EventRow {
    pub id: Uuid,
    pub sequence: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub received_at: Option<OffsetDateTime>,
    pub message_id: Option<String>,
    pub event_kind: String,
    pub event: Value,
    pub from_state: String,
    pub to_state: String,
    #[serde(serialize_with = "text::as_word")]
    pub outcome: LogOutcome,
    pub reason: Option<String>,
    pub effects: Value,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    /// The execution whose call produced the event, when it has no row of its own
    /// (`kind`, `note`, `calls`, …: what that row's `event` would hold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub execution: Option<Value>,
}

/// An effect execution's record, as an event-log row holds it.
#[derive(Debug, Clone, Copy)]
pub struct ExecutionRecord<'a> {
    /// Its details: `calls`, `attempt`, the kind's own keys (`operation_id`,
    /// `webhook_to_ack_ms`, …).
    pub details: &'a Value,
    /// What became of the execution (`ACK Success … recorded`, `dead: …`).
    pub note: &'a str,
}

impl EventRow {
    /// The record of an execution of `kind` (`effect:<kind>`, e.g. `effect:ack_operation`)
    /// that this row holds: the row itself when it is the execution's own (its `event`, its
    /// note in `reason`), or its `execution` column when the execution is recorded with the
    /// event it fed (a GET and its observation, an ACK and the operation's end).
    pub fn record_of(&self, kind: &str) -> Option<ExecutionRecord<'_>> {
        if self.event_kind == kind {
            return Some(ExecutionRecord {
                details: &self.event,
                note: self.reason.as_deref().unwrap_or_default(),
            });
        }
        let execution = self.execution.as_ref()?;
        (execution["kind"] == kind).then(|| ExecutionRecord {
            details: execution,
            note: execution["note"].as_str().unwrap_or_default(),
        })
    }
}

/// The whole event log of a subscription, in sequence order.
pub async fn events(pool: &PgPool, subscription_id: Uuid) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, sequence, recorded_at, received_at, message_id, event_kind, event, from_state, \
         to_state, outcome, reason, effects, correlation_id, request_id, execution \
         FROM subscription_events WHERE subscription_id = $1 ORDER BY sequence",
    )
    .bind(subscription_id)
    .fetch_all(pool)
    .await
}

/// The event-log rows carried by one message (e.g. a command id).
pub async fn events_of_message(
    pool: &PgPool,
    message_id: &str,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, sequence, recorded_at, received_at, message_id, event_kind, event, from_state, \
         to_state, outcome, reason, effects, correlation_id, request_id, execution \
         FROM subscription_events WHERE message_id = $1 ORDER BY recorded_at, sequence",
    )
    .bind(message_id)
    .fetch_all(pool)
    .await
}

/// Whether the landing page ever resolved this purchase.
pub async fn was_resolved(pool: &PgPool, subscription_id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM subscription_events WHERE subscription_id = $1 \
         AND event_kind = 'PurchaseResolved')",
    )
    .bind(subscription_id)
    .fetch_one(pool)
    .await
}

/// Outbox rows by status for one subscription: (pending, dead).
pub async fn outbox_counts(
    pool: &PgPool,
    subscription_id: Uuid,
) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status = $2), count(*) FILTER (WHERE status = $3) \
         FROM outbox WHERE subscription_id = $1",
    )
    .bind(subscription_id)
    .bind(OutboxStatus::Pending)
    .bind(OutboxStatus::Dead)
    .fetch_one(pool)
    .await
}

/// Subscriptions with effects still pending, and how many.
pub async fn pending_effects(pool: &PgPool) -> Result<HashMap<Uuid, i64>, sqlx::Error> {
    let rows: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT subscription_id, count(*) FROM outbox WHERE status = $1 \
         GROUP BY subscription_id",
    )
    .bind(OutboxStatus::Pending)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// One `publisher_operations` row.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct PublisherOperationRow {
    pub command_id: Uuid,
    pub kind: String,
    pub target_plan_id: Option<String>,
    pub target_quantity: Option<i32>,
    pub operation_id: Option<Uuid>,
    #[serde(serialize_with = "text::as_word")]
    pub status: CommandStatus,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// The changes we asked Microsoft for, oldest first.
pub async fn publisher_operations(
    pool: &PgPool,
    subscription_id: Uuid,
) -> Result<Vec<PublisherOperationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT command_id, kind, target_plan_id, target_quantity, operation_id, status, \
         last_error, created_at, updated_at FROM publisher_operations \
         WHERE subscription_id = $1 ORDER BY created_at",
    )
    .bind(subscription_id)
    .fetch_all(pool)
    .await
}
