//! Read-only queries that check a whole run: the demo's final check and the benchmarks'
//! progress and verdicts (what is pending, what was decided twice, which sequences have
//! gaps, where each subscription ended). Nothing here is on the engine's hot path.

use sqlx::postgres::PgPool;
use uuid::Uuid;

/// Effects not yet carried out, over all subscriptions.
pub async fn pending_effects(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {}",
        super::outbox::PENDING_ROWS
    )))
    .fetch_one(pool)
    .await
}

/// The size of the current database on disk, in bytes (tables, indexes, TOAST).
pub async fn database_bytes(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(pool)
        .await
}

/// Effects not yet carried out and event-log rows, in one snapshot: a run is quiet when
/// neither moves.
pub async fn pending_effects_and_events(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM {}), (SELECT count(*) FROM subscription_events)",
        super::outbox::PENDING_ROWS
    )))
    .fetch_one(pool)
    .await
}

/// How many of `ids` are in `state`.
pub async fn count_in_state(pool: &PgPool, ids: &[Uuid], state: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE id = ANY($1) AND state = $2")
        .bind(ids)
        .bind(state)
        .fetch_one(pool)
        .await
}

/// Where each of `ids` stands: (id, state, plan, seats).
pub async fn subscription_states(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<Vec<(Uuid, String, Option<String>, Option<i32>)>, sqlx::Error> {
    sqlx::query_as("SELECT id, state, plan_id, quantity FROM subscriptions WHERE id = ANY($1)")
        .bind(ids)
        .fetch_all(pool)
        .await
}

/// Where one subscription stands: (state, plan, seats), if we know it.
pub async fn subscription_state(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<(String, Option<String>, Option<i32>)>, sqlx::Error> {
    sqlx::query_as("SELECT state, plan_id, quantity FROM subscriptions WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// The Microsoft operation ids of every webhook the event log recorded.
pub async fn logged_webhook_operations(pool: &PgPool) -> Result<Vec<Uuid>, sqlx::Error> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT split_part(event_key, ':', 2) FROM subscription_events \
         WHERE event_key LIKE 'webhook:%'",
    )
    .fetch_all(pool)
    .await?;
    Ok(ids
        .iter()
        .filter_map(|id| Uuid::parse_str(id).ok())
        .collect())
}

/// Dead outbox rows grouped by (kind, last error), with their count.
pub async fn dead_effects(
    pool: &PgPool,
) -> Result<Vec<(String, Option<String>, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT kind, last_error, count(*) FROM outbox WHERE status = 'dead' GROUP BY 1, 2",
    )
    .fetch_all(pool)
    .await
}

/// Events decided (applied or rejected) more than once: (subscription, event key, times).
/// Exactly-once means this is empty.
pub async fn decided_twice(pool: &PgPool) -> Result<Vec<(Uuid, String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subscription_id, event_key, count(*) FROM subscription_events \
         WHERE outcome IN ('applied', 'rejected') GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .fetch_all(pool)
    .await
}

/// Subscriptions whose event-log sequence is not 1..n without a hole.
pub async fn sequence_gaps(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT subscription_id FROM subscription_events GROUP BY 1 \
         HAVING min(sequence) <> 1 OR max(sequence) <> count(*)) AS gaps",
    )
    .fetch_one(pool)
    .await
}

/// Event-log rows of one kind for one subscription (e.g. `effect:activate`).
pub async fn count_events_of_kind(
    pool: &PgPool,
    subscription_id: Uuid,
    event_kind: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM subscription_events WHERE subscription_id = $1 AND event_kind = $2",
    )
    .bind(subscription_id)
    .bind(event_kind)
    .fetch_one(pool)
    .await
}

/// How long after Microsoft's webhook our ACK of `operation_id` was recorded, in ms.
pub async fn webhook_to_ack_ms(
    pool: &PgPool,
    subscription_id: Uuid,
    operation_id: &str,
) -> Result<Option<i64>, sqlx::Error> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT (ack->>'webhook_to_ack_ms')::bigint FROM {} \
         WHERE subscription_id = $1 AND ack->>'operation_id' = $2 ORDER BY sequence LIMIT 1",
        ack_records()
    )))
    .bind(subscription_id)
    .bind(operation_id)
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// The ACK of one operation: (outbox rows made for it, ACKs recorded as made, the ACK's
/// status sent).
pub async fn ack_of_operation(
    pool: &PgPool,
    subscription_id: Uuid,
    operation_id: &str,
) -> Result<(i64, i64, Option<String>), sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT (SELECT count(*) FROM outbox WHERE subscription_id = $1 \
           AND kind = $3 AND effect->>'operation_id' = $2), \
         (SELECT count(*) FROM {} WHERE subscription_id = $1 \
           AND ack->>'operation_id' = $2 AND note LIKE 'ACK % recorded'), \
         (SELECT min(effect->>'status') FROM outbox WHERE subscription_id = $1 \
           AND kind = $3 AND effect->>'operation_id' = $2)",
        ack_records()
    )))
    .bind(subscription_id)
    .bind(operation_id)
    .bind(super::outbox::EffectKind::AckOperation)
    .fetch_one(pool)
    .await
}

/// The ACK executions recorded, per subscription and operation: `(subscription, operation
/// id, executions)`, each in a row of its own or in the row of the operation's end it fed.
pub async fn acks_per_operation(pool: &PgPool) -> Result<Vec<(Uuid, String, i64)>, sqlx::Error> {
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT subscription_id, ack->>'operation_id', count(*) FROM {} GROUP BY 1, 2",
        ack_records()
    )))
    .fetch_all(pool)
    .await
}

/// Every ACK execution's record, as a subquery `acks (subscription_id, sequence,
/// recorded_at, ack, note)`: the execution's own `effect:ack_operation` row (`ack` its
/// `event`, `note` its `reason`), or the `execution` column of the operation's end it fed
/// (`EffectKind::records_with_its_result`; `note` in it). The one place that knows where an
/// ACK is recorded, for the console's statistics and these checks.
pub(crate) fn ack_records() -> String {
    let kind = format!("effect:{}", super::outbox::EffectKind::AckOperation);
    format!(
        "(SELECT subscription_id, sequence, recorded_at, coalesce(execution, event) AS ack, \
           coalesce(execution->>'note', reason) AS note FROM subscription_events \
         WHERE event_kind = '{kind}' OR execution->>'kind' = '{kind}') acks"
    )
}

/// Operator-journal rows of one action (e.g. `dlq_replay`).
pub async fn journalled(pool: &PgPool, action: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM operator_actions WHERE action = $1")
        .bind(action)
        .fetch_one(pool)
        .await
}

/// Subscriptions in `state`, over all of them.
pub async fn count_all_in_state(pool: &PgPool, state: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM subscriptions WHERE state = $1")
        .bind(state)
        .fetch_one(pool)
        .await
}

/// A subscription's usage hour: (status, quantity sent to Microsoft), if it has one.
pub async fn usage_hour_of(
    pool: &PgPool,
    subscription_id: Uuid,
) -> Result<Option<(String, Option<f64>)>, sqlx::Error> {
    sqlx::query_as("SELECT status, submitted_quantity FROM usage_hours WHERE subscription_id = $1")
        .bind(subscription_id)
        .fetch_optional(pool)
        .await
}

/// Usage hours not settled yet (open or being submitted).
pub async fn unsettled_usage_hours(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM usage_hours WHERE status IN ('open', 'submitting')")
        .fetch_one(pool)
        .await
}

/// Every usage hour: (subscription, dimension, hour, quantity sent or counted, status,
/// times sent).
pub async fn usage_hours(
    pool: &PgPool,
) -> Result<Vec<(Uuid, String, time::OffsetDateTime, f64, String, i32)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subscription_id, dimension, hour, coalesce(submitted_quantity, quantity), \
         status, sends FROM usage_hours",
    )
    .fetch_all(pool)
    .await
}
