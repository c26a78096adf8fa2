//! The outbox: effects the machine decided, committed with their transition by
//! [`ledger::apply`](super::ledger::apply), executed afterwards by the worker.
//!
//! A runner claims one due row with `FOR UPDATE SKIP LOCKED` and keeps the claiming
//! transaction open while it executes the effect, then ends the row in that same transaction
//! (z2p `issue_delivery_worker.rs`): done, rescheduled or dead. A crash in between releases
//! the lock and the row runs again, so every executor is idempotent.
//!
//! Order, per subscription, in the machine's order (event-log sequence, then id): a row
//! that changes something at Microsoft (activate, ACK, publisher PATCH/DELETE) holds back
//! every row behind it; a read or a notification ([`INDEPENDENT_KINDS`]: the confirming
//! GET, a domain event) holds back only the rows of its own kind behind it, so domain
//! events leave in order but an ACK never waits for the previous change's GET or domain
//! event; `poll_operation` and `confirm_operation` rows only wait for Microsoft and hold
//! back nothing ([`WAITING_KINDS`]), nor does a row the runner marked `awaits_microsoft`
//! (e.g. an `activate` whose POST went out: it only waits for Microsoft to report
//! Subscribed, P4, so a customer's first change right after checkout is acknowledged
//! without waiting for our next activation check). Subscriptions
//! with an ACK pending go first, so a burst of domain events cannot eat Microsoft's
//! 10-second window (P7).
//! A `dead` row no longer blocks anything; operators replay it.

use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

/// The `LISTEN`/`NOTIFY` channel `apply` signals when it queued effects: a wake-up hint
/// only; runners also poll.
pub const NOTIFY_CHANNEL: &str = "fulfillment_outbox";

/// Effect kinds that wait for Microsoft to finish an operation; they never block the
/// rows behind them.
pub const WAITING_KINDS: [&str; 2] = ["poll_operation", "confirm_operation"];

/// Effect kinds that change nothing at Microsoft: they hold back only later rows of their
/// own kind. Every other kind (and any kind added later) holds back all later rows.
pub const INDEPENDENT_KINDS: [&str; 3] = [
    "fetch_subscription",
    "publish_domain_event",
    // A metering batch (event sequence 0): batches of a subscription go in order, and
    // none waits for or holds back its lifecycle effects.
    "submit_usage",
];

/// Effect kinds with runners of their own (webhook deliveries to the ISV, `store::deliveries`):
/// the effect runners never claim them, so a slow endpoint never holds an effect's permit.
pub const DEDICATED_KINDS: [&str; 1] = ["deliver_webhook"];

/// One row of `outbox`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: Uuid,
    pub subscription_id: Uuid,
    /// The event-log row whose decision produced the effect.
    pub event_id: Uuid,
    pub kind: String,
    /// The serialized `Effect`.
    pub effect: Value,
    /// Failed attempts so far (waiting for Microsoft does not count).
    pub attempts: i32,
    pub correlation_id: Option<String>,
    pub last_error: Option<String>,
    /// Where the effect's protocol stands (`worker::protocol::Progress`, tagged JSON); only
    /// the effect runner reads it.
    pub progress: Value,
    pub created_at: OffsetDateTime,
    /// W3C trace context of the decision; the execution continues its trace. Absent from
    /// queries that do not select it.
    #[sqlx(default)]
    pub traceparent: Option<String>,
}

/// A claimed row: its lock lives as long as this value; end it with one of the methods.
/// Dropping it rolls back, and the row becomes due again as it was.
#[derive(Debug)]
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    pub row: OutboxRow,
}

/// The columns of [`OutboxRow`], as the claim queries select them. The claim queries are
/// assembled from these constants only (hence `AssertSqlSafe`).
const ROW_COLUMNS: &str = "o.id, o.subscription_id, o.event_id, o.kind, o.effect, o.attempts, \
     o.correlation_id, o.last_error, o.progress, o.created_at, o.traceparent";

/// The claimability test (see the module docs): no earlier pending row of the same
/// subscription that holds this one back. `$1` binds [`WAITING_KINDS`], `$2`
/// [`INDEPENDENT_KINDS`]; a row marked `awaits_microsoft` (by the runner, from its
/// progress) waits like them. An index probe on `outbox_pending_subscription_idx`.
const NOTHING_BEFORE_IT: &str = "NOT EXISTS ( \
         SELECT 1 FROM outbox p \
         WHERE p.subscription_id = o.subscription_id AND p.status = 'pending' \
           AND p.kind <> ALL($1) AND (p.kind = o.kind OR p.kind <> ALL($2)) \
           AND NOT p.awaits_microsoft \
           AND (p.event_sequence, p.id) < (o.event_sequence, o.id))";

/// Claims the most overdue claimable row, if any — first among the subscriptions that
/// have an ACK waiting (`priority` 0, set by `ledger::apply`): Microsoft's 10-second
/// window (P7) must not be spent behind a burst of other subscriptions' domain events.
///
/// The scan follows `outbox_claim_idx` (priority, due time) and stops at the first row
/// that is claimable and not locked by another runner, so a claim costs the rows it skips,
/// not the size of the backlog.
pub async fn claim_next(pool: &PgPool) -> Result<Option<Claimed>, StoreError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query_as::<_, OutboxRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM outbox o \
         WHERE o.status = 'pending' AND o.next_attempt_at <= now() \
           AND o.kind <> ALL($3) AND {NOTHING_BEFORE_IT} \
         ORDER BY o.priority, o.next_attempt_at \
         LIMIT 1 \
         FOR UPDATE OF o SKIP LOCKED"
    )))
    .bind(&WAITING_KINDS[..])
    .bind(&INDEPENDENT_KINDS[..])
    .bind(&DEDICATED_KINDS[..])
    .fetch_optional(&mut *tx)
    .await?;
    finish_claim(tx, row).await
}

/// Like [`claim_next`], for the rows of one of the [`DEDICATED_KINDS`] only.
pub async fn claim_next_of_kind(pool: &PgPool, kind: &str) -> Result<Option<Claimed>, StoreError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query_as::<_, OutboxRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM outbox o \
         WHERE o.status = 'pending' AND o.next_attempt_at <= now() \
           AND o.kind = $3 AND {NOTHING_BEFORE_IT} \
         ORDER BY o.priority, o.next_attempt_at \
         LIMIT 1 \
         FOR UPDATE OF o SKIP LOCKED"
    )))
    .bind(&WAITING_KINDS[..])
    .bind(&INDEPENDENT_KINDS[..])
    .bind(kind)
    .fetch_optional(&mut *tx)
    .await?;
    finish_claim(tx, row).await
}

/// Claims the row `id` if it is claimable now: pending, due, not held back by an earlier
/// row of its subscription, and not held by another runner. `None` otherwise (done already, behind
/// another row, or being executed elsewhere): the runners will take it in its turn.
pub async fn claim(pool: &PgPool, id: Uuid) -> Result<Option<Claimed>, StoreError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query_as::<_, OutboxRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM outbox o \
         WHERE o.id = $3 AND o.status = 'pending' AND o.next_attempt_at <= now() \
           AND {NOTHING_BEFORE_IT} \
         FOR UPDATE OF o SKIP LOCKED"
    )))
    .bind(&WAITING_KINDS[..])
    .bind(&INDEPENDENT_KINDS[..])
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    finish_claim(tx, row).await
}

async fn finish_claim(
    tx: Transaction<'static, Postgres>,
    row: Option<OutboxRow>,
) -> Result<Option<Claimed>, StoreError> {
    match row {
        Some(row) => Ok(Some(Claimed { tx, row })),
        None => {
            tx.rollback().await?;
            Ok(None)
        }
    }
}

impl Claimed {
    /// A savepoint in the claim's transaction, for what the execution writes with the row's
    /// end (one commit for both); dropped without commit it rolls back to the savepoint and
    /// the claim can still reschedule the row.
    pub async fn savepoint(&mut self) -> Result<Transaction<'_, Postgres>, StoreError> {
        Ok(sqlx::Acquire::begin(&mut self.tx).await?)
    }

    /// The effect is carried out.
    pub async fn complete(mut self) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET status = 'done', last_error = NULL, updated_at = now() \
             WHERE id = $1",
        )
        .bind(self.row.id)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Runs the row again after `delay`. `failed` counts an attempt against the budget
    /// (a retryable error); waiting for Microsoft to finish something does not.
    /// `awaits_microsoft`: the row no longer holds back later rows (see the module docs).
    pub async fn reschedule(
        mut self,
        delay: Duration,
        failed: bool,
        error: Option<&str>,
        progress: &Value,
        awaits_microsoft: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + $2, \
                 next_attempt_at = now() + make_interval(secs => $3), \
                 last_error = coalesce($4, last_error), progress = $5, \
                 awaits_microsoft = $6, updated_at = now() \
             WHERE id = $1",
        )
        .bind(self.row.id)
        .bind(i32::from(failed))
        .bind(delay.as_secs_f64())
        .bind(error)
        .bind(progress)
        .bind(awaits_microsoft)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Gives up: the row is `dead` with the reason, for an operator to replay.
    pub async fn bury(mut self, reason: &str, failed: bool) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET status = 'dead', attempts = attempts + $2, last_error = $3, \
                 updated_at = now() WHERE id = $1",
        )
        .bind(self.row.id)
        .bind(i32::from(failed))
        .bind(reason)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// Pending rows due within `horizon` from now (0 = due now). For "run until idle".
pub async fn due_within(pool: &PgPool, horizon: Duration) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'pending' \
         AND next_attempt_at <= now() + make_interval(secs => $1)",
    )
    .bind(horizon.as_secs_f64())
    .fetch_one(pool)
    .await?)
}

/// The unfinished outbox: how many rows are pending and how old the oldest is (zero when
/// there is none). For the backlog gauges.
pub async fn backlog(pool: &PgPool) -> Result<(i64, Duration), StoreError> {
    let (pending, oldest_secs): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 \
         FROM outbox WHERE status = 'pending'",
    )
    .fetch_one(pool)
    .await?;
    let oldest = Duration::from_secs_f64(oldest_secs.unwrap_or(0.0).max(0.0));
    Ok((pending, oldest))
}

/// The kind of the event-log row that produced an effect (`WebhookChangePlan`, …).
pub async fn event_kind(pool: &PgPool, event_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar::<_, String>("SELECT event_kind FROM subscription_events WHERE id = $1")
            .bind(event_id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Where the effect row stands among the `publish_domain_event` rows of its decision:
/// `(1-based position, how many)`. Gives each CloudEvent a stable id.
pub async fn domain_event_position(
    pool: &PgPool,
    row: &OutboxRow,
) -> Result<(i64, i64), StoreError> {
    let (position, total): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE id <= $2), count(*) FROM outbox \
         WHERE event_id = $1 AND kind = 'publish_domain_event'",
    )
    .bind(row.event_id)
    .bind(row.id)
    .fetch_one(pool)
    .await?;
    Ok((position, total))
}

/// When the message behind the event that produced an effect reached us (webhooks).
pub async fn event_received_at(
    pool: &PgPool,
    event_id: Uuid,
) -> Result<Option<OffsetDateTime>, StoreError> {
    Ok(sqlx::query_scalar::<_, Option<OffsetDateTime>>(
        "SELECT received_at FROM subscription_events WHERE id = $1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// A publisher operation as the worker learns about it (`publisher_operations`).
#[derive(Debug, Clone)]
pub struct PublisherOperationUpdate {
    pub command_id: Uuid,
    pub subscription_id: Uuid,
    /// `ChangePlan`, `ChangeQuantity` or `Cancel`.
    pub kind: &'static str,
    pub target_plan_id: Option<String>,
    pub target_quantity: Option<i32>,
    pub operation_id: Option<Uuid>,
    pub operation_location: Option<String>,
    /// `Requested`, `Accepted`, `Refused`, `Succeeded`, `Failed`, `Conflict` or `Unknown`.
    pub status: &'static str,
    pub last_error: Option<String>,
}

/// Inserts or advances the row of a command; known fields are never cleared.
pub async fn upsert_publisher_operation(
    conn: &mut sqlx::PgConnection,
    update: &PublisherOperationUpdate,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO publisher_operations (command_id, subscription_id, kind, target_plan_id, \
             target_quantity, operation_id, operation_location, status, last_error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (command_id) DO UPDATE SET \
             operation_id = coalesce(EXCLUDED.operation_id, publisher_operations.operation_id), \
             operation_location = coalesce(EXCLUDED.operation_location, \
                                           publisher_operations.operation_location), \
             status = EXCLUDED.status, \
             last_error = coalesce(EXCLUDED.last_error, publisher_operations.last_error), \
             updated_at = now()",
    )
    .bind(update.command_id)
    .bind(update.subscription_id)
    .bind(update.kind)
    .bind(update.target_plan_id.as_deref())
    .bind(update.target_quantity)
    .bind(update.operation_id)
    .bind(update.operation_location.as_deref())
    .bind(update.status)
    .bind(update.last_error.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Sets the final status of the command that owns `operation_id`, if we track it.
pub async fn finish_publisher_operation(
    conn: &mut sqlx::PgConnection,
    operation_id: Uuid,
    status: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE publisher_operations SET status = $2, updated_at = now() WHERE operation_id = $1",
    )
    .bind(operation_id)
    .bind(status)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
