//! `scheduled_notices`: the lifecycle notices the machine's plan owes a subscription
//! ([`fulfillment_state_machine::notice`]), written under the subscription's row lock in
//! the decision's transaction, and the due ones the worker emits. Queries only: which
//! notices are owed is decided by the pure plan, when to emit by the caller's clock.

use fulfillment_state_machine::{Notice, NoticeKind};
use serde::Serialize;
use sqlx::postgres::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

/// Where a notice stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, sqlx::Type)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum NoticeStatus {
    /// Waiting for its time.
    Pending,
    /// Emitted (once).
    Sent,
    /// No longer owed: the state or the term changed first.
    Cancelled,
}

/// One `scheduled_notices` row.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct NoticeRow {
    pub id: Uuid,
    pub subscription_id: Uuid,
    pub kind: String,
    pub notice_key: String,
    #[serde(with = "time::serde::rfc3339")]
    pub due_at: OffsetDateTime,
    pub reason: String,
    pub status: NoticeStatus,
    pub event_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl NoticeRow {
    /// The notice as the machine planned it; `None` for a kind this version does not know.
    pub fn notice(&self) -> Option<Notice> {
        Some(Notice {
            kind: NoticeKind::parse(&self.kind)?,
            key: self.notice_key.clone(),
            due: self.due_at,
            reason: self.reason.clone(),
        })
    }
}

/// The columns of a [`NoticeRow`].
macro_rules! columns {
    () => {
        "id, subscription_id, kind, notice_key, due_at, reason, status, event_id, updated_at"
    };
}

/// The keys of the subscription's pending notices.
pub async fn pending_keys(
    conn: &mut PgConnection,
    subscription_id: Uuid,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT notice_key FROM scheduled_notices WHERE subscription_id = $1 \
         AND status = 'pending' ORDER BY due_at",
    )
    .bind(subscription_id)
    .fetch_all(conn)
    .await
}

/// Cancels the pending notices with these keys.
pub async fn cancel(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    keys: &[String],
    event_id: Uuid,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE scheduled_notices SET status = 'cancelled', event_id = $3, updated_at = $4 \
         WHERE subscription_id = $1 AND status = 'pending' AND notice_key = ANY($2)",
    )
    .bind(subscription_id)
    .bind(keys)
    .bind(event_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Schedules the notices: new keys are inserted, cancelled ones pend again (with the new
/// time), sent ones stay sent (each key once).
pub async fn schedule(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    notices: &[Notice],
    event_id: Uuid,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    let ids: Vec<Uuid> = notices.iter().map(|_| Uuid::now_v7()).collect();
    let kinds: Vec<&str> = notices.iter().map(|n| n.kind.as_str()).collect();
    let keys: Vec<&str> = notices.iter().map(|n| n.key.as_str()).collect();
    let due: Vec<OffsetDateTime> = notices.iter().map(|n| n.due).collect();
    let reasons: Vec<&str> = notices.iter().map(|n| n.reason.as_str()).collect();
    sqlx::query(
        "INSERT INTO scheduled_notices (id, subscription_id, kind, notice_key, due_at, reason, \
         event_id, created_at, updated_at) \
         SELECT n.id, $1, n.kind, n.key, n.due, n.reason, $2, $3, $3 \
         FROM unnest($4::uuid[], $5::text[], $6::text[], $7::timestamptz[], $8::text[]) \
           AS n (id, kind, key, due, reason) \
         ON CONFLICT (subscription_id, notice_key) DO UPDATE \
           SET status = 'pending', due_at = EXCLUDED.due_at, reason = EXCLUDED.reason, \
               event_id = EXCLUDED.event_id, updated_at = EXCLUDED.updated_at \
           WHERE scheduled_notices.status = 'cancelled'",
    )
    .bind(subscription_id)
    .bind(event_id)
    .bind(now)
    .bind(&ids)
    .bind(&kinds)
    .bind(&keys)
    .bind(&due)
    .bind(&reasons)
    .execute(conn)
    .await?;
    Ok(())
}

/// The id and subscription of up to `limit` pending notices due at `now`, earliest first
/// (unlocked: the emitter locks the subscription, then the notice).
pub async fn due(
    pool: &PgPool,
    now: OffsetDateTime,
    limit: i64,
) -> Result<Vec<(Uuid, Uuid)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, subscription_id FROM scheduled_notices \
         WHERE status = 'pending' AND due_at <= $1 ORDER BY due_at LIMIT $2",
    )
    .bind(now)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The notice, locked, if it is still pending (call with its subscription's row locked).
pub async fn lock_pending(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<NoticeRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM scheduled_notices WHERE id = $1 AND status = 'pending' FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await
}

/// Marks the notice sent by the event-log row `event_id`.
pub async fn mark_sent(
    conn: &mut PgConnection,
    id: Uuid,
    event_id: Uuid,
    now: OffsetDateTime,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE scheduled_notices SET status = 'sent', event_id = $2, updated_at = $3 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(event_id)
    .bind(now)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every notice of a subscription, by due time (for `subscription show`).
pub async fn of_subscription(
    pool: &PgPool,
    subscription_id: Uuid,
) -> Result<Vec<NoticeRow>, sqlx::Error> {
    sqlx::query_as(concat!(
        "SELECT ",
        columns!(),
        " FROM scheduled_notices WHERE subscription_id = $1 ORDER BY due_at, notice_key"
    ))
    .bind(subscription_id)
    .fetch_all(pool)
    .await
}
