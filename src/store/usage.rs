//! Metered usage (`usage_events`, `usage_hours`, `plan_dimensions`): typed rows and the
//! SQL of ingest, hour freezing, settlement and the operator views. Decisions (what is
//! due, how hours are batched, how answers settle) belong to [`crate::metering`] and the
//! metering protocol; this module only stores.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use sqlx::PgConnection;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

/// What ingest needs to know about a subscription.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct UsageSubscription {
    pub id: Uuid,
    pub offer_id: Option<String>,
    pub plan_id: Option<String>,
    pub state: String,
    /// When the event log last moved it out of `Subscribed` (for usage before a
    /// cancellation or suspension, P26).
    pub left_subscribed_at: Option<OffsetDateTime>,
}

pub async fn subscription_for_usage(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<UsageSubscription>, StoreError> {
    Ok(sqlx::query_as::<_, UsageSubscription>(
        "SELECT s.id, s.offer_id, s.plan_id, s.state, \
             (SELECT max(e.recorded_at) FROM subscription_events e \
              WHERE e.subscription_id = s.id AND e.from_state = 'Subscribed' \
                AND e.to_state <> 'Subscribed') AS left_subscribed_at \
         FROM subscriptions s WHERE s.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The stored dimensions of a plan and when they were learned.
pub async fn plan_dimensions(
    pool: &PgPool,
    offer_id: &str,
    plan_id: &str,
) -> Result<Option<(Vec<String>, OffsetDateTime)>, StoreError> {
    Ok(sqlx::query_as::<_, (Vec<String>, OffsetDateTime)>(
        "SELECT dimensions, fetched_at FROM plan_dimensions WHERE offer_id = $1 AND plan_id = $2",
    )
    .bind(offer_id)
    .bind(plan_id)
    .fetch_optional(pool)
    .await?)
}

pub async fn save_plan_dimensions(
    pool: &PgPool,
    offer_id: &str,
    plan_id: &str,
    dimensions: &[String],
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO plan_dimensions (offer_id, plan_id, dimensions) VALUES ($1, $2, $3) \
         ON CONFLICT (offer_id, plan_id) DO UPDATE SET dimensions = EXCLUDED.dimensions, \
             fetched_at = now()",
    )
    .bind(offer_id)
    .bind(plan_id)
    .bind(dimensions)
    .execute(pool)
    .await?;
    Ok(())
}

/// One usage event to store.
#[derive(Debug, Clone)]
pub struct NewUsage {
    pub id: Uuid,
    pub idempotency_key: String,
    pub subscription_id: Uuid,
    pub plan_id: String,
    pub dimension: String,
    pub quantity: f64,
    pub effective_at: OffsetDateTime,
    pub hour: OffsetDateTime,
    pub source: &'static str,
}

/// What storing one usage event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stored {
    /// Added to its hour's total.
    Counted,
    /// Its hour was already submitted: kept, reported, billed nowhere.
    Late,
    /// The idempotency key was stored before: nothing changed.
    Repeat,
}

/// Stores one usage event and adds it to its open hour, in `conn`'s transaction. The
/// hour's row lock orders this against freezing: an hour frozen first makes it `late`.
pub async fn record_usage(conn: &mut PgConnection, usage: &NewUsage) -> Result<Stored, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO usage_events (id, idempotency_key, subscription_id, plan_id, dimension, \
             quantity, effective_at, hour, status, source) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'counted', $9) \
         ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(usage.id)
    .bind(&usage.idempotency_key)
    .bind(usage.subscription_id)
    .bind(&usage.plan_id)
    .bind(&usage.dimension)
    .bind(usage.quantity)
    .bind(usage.effective_at)
    .bind(usage.hour)
    .bind(usage.source)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(Stored::Repeat);
    }
    let added = sqlx::query(
        "INSERT INTO usage_hours (id, subscription_id, plan_id, dimension, hour, quantity) \
         VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (subscription_id, dimension, hour) DO UPDATE \
             SET quantity = usage_hours.quantity + EXCLUDED.quantity, updated_at = now() \
             WHERE usage_hours.status = 'open'",
    )
    .bind(Uuid::now_v7())
    .bind(usage.subscription_id)
    .bind(&usage.plan_id)
    .bind(&usage.dimension)
    .bind(usage.hour)
    .bind(usage.quantity)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if added == 1 {
        return Ok(Stored::Counted);
    }
    sqlx::query("UPDATE usage_events SET status = 'late' WHERE id = $1")
        .bind(usage.id)
        .execute(&mut *conn)
        .await?;
    Ok(Stored::Late)
}

/// An hour ready to be frozen into a batch.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct DueHour {
    pub id: Uuid,
    pub subscription_id: Uuid,
    pub plan_id: String,
    pub dimension: String,
    pub hour: OffsetDateTime,
    pub quantity: f64,
}

/// Open hours whose window at Microsoft (24 h from the hour's start) has passed: set
/// `expired` with `reason`. Returns how many.
pub async fn expire_open_hours(
    conn: &mut PgConnection,
    older_than: OffsetDateTime,
    reason: &str,
) -> Result<u64, StoreError> {
    Ok(sqlx::query(
        "UPDATE usage_hours SET status = 'expired', reason = $2, settled_at = now(), \
             updated_at = now() \
         WHERE status = 'open' AND hour < $1",
    )
    .bind(older_than)
    .bind(reason)
    .execute(&mut *conn)
    .await?
    .rows_affected())
}

/// Open hours that closed (`hour < closed_before`), and every open hour of a subscription
/// that is no longer Subscribed (flushed at once: usage before a cancellation or
/// suspension is still billable, P26). Oldest first, locked for freezing.
pub async fn lock_due_hours(
    conn: &mut PgConnection,
    closed_before: OffsetDateTime,
    limit: i64,
) -> Result<Vec<DueHour>, StoreError> {
    Ok(sqlx::query_as::<_, DueHour>(
        "SELECT h.id, h.subscription_id, h.plan_id, h.dimension, h.hour, h.quantity \
         FROM usage_hours h \
         WHERE h.status = 'open' AND (h.hour < $1 OR EXISTS ( \
             SELECT 1 FROM subscriptions s WHERE s.id = h.subscription_id \
               AND s.state IN ('Unsubscribed', 'Suspended'))) \
         ORDER BY h.hour, h.subscription_id, h.dimension \
         LIMIT $2 \
         FOR UPDATE OF h SKIP LOCKED",
    )
    .bind(closed_before)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?)
}

/// Freezes the hours into the batch: their quantity now is the only one ever sent.
pub async fn freeze_hours(
    conn: &mut PgConnection,
    batch_id: Uuid,
    hour_ids: &[Uuid],
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE usage_hours SET status = 'submitting', submitted_quantity = quantity, \
             batch_id = $1, submitted_at = now(), updated_at = now() \
         WHERE id = ANY($2) AND status = 'open'",
    )
    .bind(batch_id)
    .bind(hour_ids)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Queues the batch's submission in the outbox (kind `submit_usage`, its own
/// `batch_id` as the row id and event id; event sequence 0, so it neither waits for nor
/// holds back the subscription's lifecycle effects) and wakes the runners on commit.
pub async fn queue_submission(
    conn: &mut PgConnection,
    batch_id: Uuid,
    subscription_id: Uuid,
    effect: &Value,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO outbox (id, subscription_id, event_id, kind, effect, event_sequence, \
             correlation_id) \
         VALUES ($1, $2, $1, $4, $3, 0, $1::text)",
    )
    .bind(batch_id)
    .bind(subscription_id)
    .bind(effect)
    .bind(super::outbox::EffectKind::SubmitUsage)
    .execute(&mut *conn)
    .await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(super::outbox::NOTIFY_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// How an hour's submission ended.
#[derive(Debug, Clone, PartialEq)]
pub struct HourSettlement {
    pub hour_id: Uuid,
    /// `accepted`, `duplicate`, `expired` or `rejected`.
    pub status: &'static str,
    pub usage_event_id: Option<String>,
    pub billed_quantity: Option<f64>,
    pub reason: Option<String>,
}

/// Ends a submitting hour (an hour already settled stays as it is).
pub async fn settle_hour(
    conn: &mut PgConnection,
    settlement: &HourSettlement,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE usage_hours SET status = $2, usage_event_id = $3, billed_quantity = $4, \
             reason = $5, settled_at = now(), updated_at = now() \
         WHERE id = $1 AND status = 'submitting'",
    )
    .bind(settlement.hour_id)
    .bind(settlement.status)
    .bind(settlement.usage_event_id.as_deref())
    .bind(settlement.billed_quantity)
    .bind(settlement.reason.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Counts one more send of these hours to Microsoft.
pub async fn count_sends(conn: &mut PgConnection, hour_ids: &[Uuid]) -> Result<(), StoreError> {
    sqlx::query("UPDATE usage_hours SET sends = sends + 1, updated_at = now() WHERE id = ANY($1)")
        .bind(hour_ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One row of `usage_hours`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct HourRow {
    pub id: Uuid,
    pub subscription_id: Uuid,
    pub plan_id: String,
    pub dimension: String,
    #[serde(with = "time::serde::rfc3339")]
    pub hour: OffsetDateTime,
    pub quantity: f64,
    pub status: String,
    pub submitted_quantity: Option<f64>,
    pub batch_id: Option<Uuid>,
    pub usage_event_id: Option<String>,
    pub billed_quantity: Option<f64>,
    pub reason: Option<String>,
    pub sends: i32,
    /// Usage events of the hour that came after it was submitted.
    pub late_events: i64,
    pub late_quantity: f64,
}

/// Filters of `usage list`.
#[derive(Debug, Clone, Default)]
pub struct HourFilter {
    pub subscription_id: Option<Uuid>,
    pub status: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub limit: i64,
}

const HOUR_COLUMNS: &str = "h.id, h.subscription_id, h.plan_id, h.dimension, h.hour, h.quantity, \
     h.status, h.submitted_quantity, h.batch_id, h.usage_event_id, h.billed_quantity, h.reason, \
     h.sends, \
     (SELECT count(*) FROM usage_events e WHERE e.subscription_id = h.subscription_id \
        AND e.dimension = h.dimension AND e.hour = h.hour AND e.status = 'late') AS late_events, \
     (SELECT coalesce(sum(e.quantity), 0)::float8 FROM usage_events e \
        WHERE e.subscription_id = h.subscription_id AND e.dimension = h.dimension \
          AND e.hour = h.hour AND e.status = 'late') AS late_quantity";

pub async fn list_hours(pool: &PgPool, filter: &HourFilter) -> Result<Vec<HourRow>, StoreError> {
    Ok(sqlx::query_as::<_, HourRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {HOUR_COLUMNS} FROM usage_hours h \
         WHERE ($1::uuid IS NULL OR h.subscription_id = $1) \
           AND ($2::text IS NULL OR h.status = $2) \
           AND ($3::timestamptz IS NULL OR h.hour >= $3) \
         ORDER BY h.hour, h.subscription_id, h.dimension LIMIT $4"
    )))
    .bind(filter.subscription_id)
    .bind(filter.status.as_deref())
    .bind(filter.since)
    .bind(filter.limit)
    .fetch_all(pool)
    .await?)
}

pub async fn hour(pool: &PgPool, id: Uuid) -> Result<Option<HourRow>, StoreError> {
    Ok(sqlx::query_as::<_, HourRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {HOUR_COLUMNS} FROM usage_hours h WHERE h.id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// One row of `usage_events`.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow)]
pub struct UsageRow {
    pub id: Uuid,
    pub idempotency_key: String,
    pub quantity: f64,
    #[serde(with = "time::serde::rfc3339")]
    pub effective_at: OffsetDateTime,
    pub status: String,
    pub source: String,
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
}

/// The usage events of an hour.
pub async fn usage_of_hour(pool: &PgPool, hour: &HourRow) -> Result<Vec<UsageRow>, StoreError> {
    Ok(sqlx::query_as::<_, UsageRow>(
        "SELECT id, idempotency_key, quantity, effective_at, status, source, received_at \
         FROM usage_events WHERE subscription_id = $1 AND dimension = $2 AND hour = $3 \
         ORDER BY received_at, id",
    )
    .bind(hour.subscription_id)
    .bind(&hour.dimension)
    .bind(hour.hour)
    .fetch_all(pool)
    .await?)
}

/// Billed hours (accepted or duplicate) since `since`, for reconciliation.
pub async fn billed_hours_since(
    pool: &PgPool,
    since: OffsetDateTime,
) -> Result<Vec<HourRow>, StoreError> {
    Ok(sqlx::query_as::<_, HourRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {HOUR_COLUMNS} FROM usage_hours h \
         WHERE h.hour >= $1 AND h.status IN ('accepted', 'duplicate') \
         ORDER BY h.hour, h.subscription_id, h.dimension"
    )))
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// The metering gauges: hours not yet settled (open or submitting) and the age of the
/// oldest one's start.
pub async fn pending_hours(pool: &PgPool) -> Result<(i64, Duration), StoreError> {
    let (pending, oldest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(hour))::float8 \
         FROM usage_hours WHERE status IN ('open', 'submitting')",
    )
    .fetch_one(pool)
    .await?;
    Ok((
        pending,
        Duration::from_secs_f64(oldest.unwrap_or(0.0).max(0.0)),
    ))
}

/// Hours by status, for `usage list` summaries and the bench.
pub async fn hours_by_status(pool: &PgPool) -> Result<Vec<(String, i64, f64)>, StoreError> {
    Ok(sqlx::query_as::<_, (String, i64, f64)>(
        "SELECT status, count(*), coalesce(sum(coalesce(submitted_quantity, quantity)), 0)::float8 \
         FROM usage_hours GROUP BY status ORDER BY status",
    )
    .fetch_all(pool)
    .await?)
}
