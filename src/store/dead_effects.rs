//! Dead effects: outbox rows the runner gave up on (`status = 'dead'`), for an operator to
//! list, read, retry or abandon (`fulfillment effects …` and the console).
//!
//! A retry puts the row back to `pending` with a fresh attempt budget and a fresh protocol
//! clock (`created_at`), keeping its progress, so a conversation resumes where it stood
//! (an ACK is not sent twice by a retry: the executors are idempotent and the progress says
//! what was sent). An abandon ends the row as `abandoned`. Each change and its journal row
//! (`operator_actions`) commit together.

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;
use super::operator_actions::{self, NewAction};

/// The largest page [`list`] returns.
pub const MAX_PAGE_SIZE: i64 = 500;

pub use super::outbox::OutboxStatus as EffectStatus;

/// One outbox row as an operator sees it.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct EffectRow {
    pub id: Uuid,
    pub subscription_id: Uuid,
    /// The event-log row whose decision produced the effect.
    pub event_id: Uuid,
    /// The kind of that event (`WebhookChangePlan`, …).
    pub event_kind: Option<String>,
    pub kind: String,
    pub status: EffectStatus,
    /// The serialized effect.
    pub effect: Value,
    /// Failed attempts (since the last retry).
    pub attempts: i32,
    pub last_error: Option<String>,
    pub correlation_id: Option<String>,
    /// The protocol's progress (what was already sent).
    pub progress: Value,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When the row last changed: for a dead row, when it died.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

const COLUMNS: &str = "o.id, o.subscription_id, o.event_id, e.event_kind, o.kind, o.status, \
     o.effect, o.attempts, o.last_error, o.correlation_id, o.progress, o.created_at, \
     o.updated_at";

/// Which dead effects, and the page.
#[derive(Debug, Clone, Default)]
pub struct DeadEffectFilter {
    pub subscription_id: Option<Uuid>,
    pub kind: Option<String>,
    /// Keyset cursor: only rows with a larger id (the last id of the previous page).
    pub after: Option<Uuid>,
    /// At most this many (1..=[`MAX_PAGE_SIZE`]).
    pub limit: i64,
}

/// Dead effects in id order (the order they were decided in: ids are UUIDv7).
pub async fn list(pool: &PgPool, filter: &DeadEffectFilter) -> Result<Vec<EffectRow>, StoreError> {
    Ok(sqlx::query_as::<_, EffectRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM outbox o LEFT JOIN subscription_events e ON e.id = o.event_id \
         WHERE o.status = $5 \
           AND ($1::uuid IS NULL OR o.subscription_id = $1) \
           AND ($2::text IS NULL OR o.kind = $2) \
           AND ($3::uuid IS NULL OR o.id > $3) \
         ORDER BY o.id LIMIT $4"
    )))
    .bind(filter.subscription_id)
    .bind(filter.kind.as_deref())
    .bind(filter.after)
    .bind(filter.limit.clamp(1, MAX_PAGE_SIZE))
    .bind(EffectStatus::Dead)
    .fetch_all(pool)
    .await?)
}

/// One outbox row, whatever its status.
pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<EffectRow>, StoreError> {
    Ok(sqlx::query_as::<_, EffectRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM outbox o LEFT JOIN subscription_events e ON e.id = o.event_id \
         WHERE o.id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The pending and dead rows of one subscription, in the machine's order.
pub async fn unfinished_for_subscription(
    pool: &PgPool,
    subscription_id: Uuid,
) -> Result<Vec<EffectRow>, StoreError> {
    Ok(sqlx::query_as::<_, EffectRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM outbox o LEFT JOIN subscription_events e ON e.id = o.event_id \
         WHERE o.subscription_id = $1 AND o.status = ANY($2) \
         ORDER BY o.event_sequence, o.id"
    )))
    .bind(subscription_id)
    .bind(vec![EffectStatus::Pending, EffectStatus::Dead])
    .fetch_all(pool)
    .await?)
}

/// Dead effects per kind: `(kind, how many, when the oldest died)`.
pub async fn count_by_kind(
    pool: &PgPool,
) -> Result<Vec<(String, i64, OffsetDateTime)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT kind, count(*), min(updated_at) FROM outbox WHERE status = $1 \
         GROUP BY kind ORDER BY kind",
    )
    .bind(EffectStatus::Dead)
    .fetch_all(pool)
    .await?)
}

/// Puts the dead row `id` back to pending (attempts 0, due now, its protocol clock
/// restarted) and journals `action` in the same transaction; wakes the runners. `None`
/// when the row is not dead (nothing changes, nothing is journalled).
pub async fn retry(
    pool: &PgPool,
    id: Uuid,
    action: &NewAction,
) -> Result<Option<EffectRow>, StoreError> {
    change_dead(
        pool,
        id,
        action,
        "UPDATE outbox SET status = $2, attempts = 0, next_attempt_at = now(), \
             created_at = now(), updated_at = now() \
         WHERE id = $1",
        EffectStatus::Pending,
    )
    .await
}

/// Ends the dead row `id` as `abandoned` and journals `action` in the same transaction.
/// `None` when the row is not dead.
pub async fn abandon(
    pool: &PgPool,
    id: Uuid,
    action: &NewAction,
) -> Result<Option<EffectRow>, StoreError> {
    change_dead(
        pool,
        id,
        action,
        "UPDATE outbox SET status = $2, updated_at = now() WHERE id = $1",
        EffectStatus::Abandoned,
    )
    .await
}

/// Locks the dead row `id`, runs `update` on it (`$1` the id, `$2` the new status) and
/// journals `action`, in one transaction; a row put back to pending wakes the runners.
/// The row as it was, `None` when it is not dead.
async fn change_dead(
    pool: &PgPool,
    id: Uuid,
    action: &NewAction,
    update: &'static str,
    status: EffectStatus,
) -> Result<Option<EffectRow>, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(before) = lock_dead(&mut tx, id).await? else {
        tx.rollback().await?;
        return Ok(None);
    };
    sqlx::query(update)
        .bind(id)
        .bind(status)
        .execute(&mut *tx)
        .await?;
    operator_actions::record_in(&mut tx, action).await?;
    if status == EffectStatus::Pending {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(super::outbox::NOTIFY_CHANNEL)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(Some(before))
}

async fn lock_dead(conn: &mut PgConnection, id: Uuid) -> Result<Option<EffectRow>, StoreError> {
    Ok(sqlx::query_as::<_, EffectRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM outbox o LEFT JOIN subscription_events e ON e.id = o.event_id \
         WHERE o.id = $1 AND o.status = $2 FOR UPDATE OF o"
    )))
    .bind(id)
    .bind(EffectStatus::Dead)
    .fetch_optional(&mut *conn)
    .await?)
}
