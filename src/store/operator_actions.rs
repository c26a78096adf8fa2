//! The operators' journal (`operator_actions`, append-only): dead-letter replays and purges,
//! dead-effect retries and abandons, and reconciliation runs, with who, when and which
//! message or effect. `fulfillment subscription
//! show` merges it into the subscription's timeline.

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::text::{TextValue, text_column};

/// What an operator did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    DlqReplay,
    DlqPurge,
    Reconcile,
    /// Webhook deliveries to the ISV queued again (`endpoint replay`).
    WebhookReplay,
    /// A dead effect put back to pending (`details.effect_id`).
    EffectRetry,
    /// A dead effect given up on (`details.effect_id`).
    EffectAbandon,
}

impl TextValue for ActionKind {
    const ALL: &'static [Self] = &[
        Self::DlqReplay,
        Self::DlqPurge,
        Self::Reconcile,
        Self::WebhookReplay,
        Self::EffectRetry,
        Self::EffectAbandon,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::DlqReplay => "dlq_replay",
            Self::DlqPurge => "dlq_purge",
            Self::Reconcile => "reconcile",
            Self::WebhookReplay => "webhook_replay",
            Self::EffectRetry => "effect_retry",
            Self::EffectAbandon => "effect_abandon",
        }
    }
}

text_column!(ActionKind);

impl std::fmt::Display for ActionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ActionKind {
    /// The column's text (without the [`TextValue`] trait in scope).
    pub fn as_str(self) -> &'static str {
        <Self as TextValue>::as_str(self)
    }
}

/// One journal row to append.
#[derive(Debug, Clone)]
pub struct NewAction {
    pub action: ActionKind,
    pub performed_by: String,
    pub performed_at: OffsetDateTime,
    pub subscription_id: Option<Uuid>,
    pub dead_letter_id: Option<String>,
    pub queue: Option<String>,
    pub reason: Option<String>,
    pub details: Value,
}

/// One journal row as stored.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct OperatorAction {
    pub id: Uuid,
    pub action: ActionKind,
    pub performed_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub performed_at: OffsetDateTime,
    pub subscription_id: Option<Uuid>,
    pub dead_letter_id: Option<String>,
    pub queue: Option<String>,
    pub reason: Option<String>,
    pub details: Value,
}

/// Appends `actions` in one statement and one commit (a replay records a whole batch).
pub async fn record_all(pool: &PgPool, actions: &[NewAction]) -> Result<(), sqlx::Error> {
    if actions.is_empty() {
        return Ok(());
    }
    let mut ids = Vec::with_capacity(actions.len());
    let mut kinds = Vec::with_capacity(actions.len());
    let mut by = Vec::with_capacity(actions.len());
    let mut at = Vec::with_capacity(actions.len());
    let mut subscriptions = Vec::with_capacity(actions.len());
    let mut letters = Vec::with_capacity(actions.len());
    let mut queues = Vec::with_capacity(actions.len());
    let mut reasons = Vec::with_capacity(actions.len());
    let mut details = Vec::with_capacity(actions.len());
    for action in actions {
        ids.push(Uuid::now_v7());
        kinds.push(action.action);
        by.push(action.performed_by.clone());
        at.push(action.performed_at);
        subscriptions.push(action.subscription_id);
        letters.push(action.dead_letter_id.clone());
        queues.push(action.queue.clone());
        reasons.push(action.reason.clone());
        details.push(action.details.clone());
    }
    sqlx::query(
        "INSERT INTO operator_actions (id, action, performed_by, performed_at, subscription_id, \
         dead_letter_id, queue, reason, details) \
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::uuid[], \
         $6::text[], $7::text[], $8::text[], $9::jsonb[])",
    )
    .bind(ids)
    .bind(kinds)
    .bind(by)
    .bind(at)
    .bind(subscriptions)
    .bind(letters)
    .bind(queues)
    .bind(reasons)
    .bind(details)
    .execute(pool)
    .await?;
    Ok(())
}

/// Appends one row inside the caller's transaction (committed with what it records).
pub async fn record_in(
    conn: &mut sqlx::PgConnection,
    action: &NewAction,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO operator_actions (id, action, performed_by, performed_at, subscription_id, \
         dead_letter_id, queue, reason, details) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(Uuid::now_v7())
    .bind(action.action)
    .bind(&action.performed_by)
    .bind(action.performed_at)
    .bind(action.subscription_id)
    .bind(action.dead_letter_id.as_deref())
    .bind(action.queue.as_deref())
    .bind(action.reason.as_deref())
    .bind(&action.details)
    .execute(&mut *conn)
    .await
    .map(drop)
}

/// The latest journal rows, newest first; `before` pages on (the last id of the previous
/// page: ids are UUIDv7).
pub async fn recent(
    pool: &PgPool,
    before: Option<Uuid>,
    limit: i64,
) -> Result<Vec<OperatorAction>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, action, performed_by, performed_at, subscription_id, dead_letter_id, queue, \
         reason, details FROM operator_actions WHERE ($1::uuid IS NULL OR id < $1) \
         ORDER BY id DESC LIMIT $2",
    )
    .bind(before)
    .bind(limit.clamp(1, 500))
    .fetch_all(pool)
    .await
}

/// The journal rows about one subscription, oldest first.
pub async fn for_subscription(
    pool: &PgPool,
    subscription_id: Uuid,
) -> Result<Vec<OperatorAction>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, action, performed_by, performed_at, subscription_id, dead_letter_id, queue, \
         reason, details FROM operator_actions WHERE subscription_id = $1 \
         ORDER BY performed_at, id",
    )
    .bind(subscription_id)
    .fetch_all(pool)
    .await
}

/// How many rows of `action` mention the dead letter `dead_letter_id`.
pub async fn count_for_dead_letter(
    pool: &PgPool,
    action: ActionKind,
    dead_letter_id: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM operator_actions WHERE action = $1 AND dead_letter_id = $2",
    )
    .bind(action)
    .bind(dead_letter_id)
    .fetch_one(pool)
    .await
}
