//! Aggregates for the operator console's overview: subscriptions per state, the ACKs of
//! a recent window from the event log (webhook-to-ACK times, auto-accepted operations) and
//! the latest reconciliation run.

use serde::Serialize;
use serde_json::Value;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;

use super::StoreError;

/// How many subscriptions are in each state, by state name.
pub async fn subscriptions_by_state(pool: &PgPool) -> Result<Vec<(String, i64)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT state, count(*) FROM subscriptions GROUP BY state ORDER BY state")
            .fetch_all(pool)
            .await?,
    )
}

/// The ACKs recorded since a point in time.
#[derive(Debug, Clone, Default, Serialize, sqlx::FromRow)]
pub struct AckStats {
    /// ACK calls recorded (each `effect:ack_operation` record of the event log that made the
    /// PATCH, in a row of its own or in the `execution` column of the operation's end it
    /// fed: the later executions of an ACK row, which only poll its operation, are not).
    pub acks: i64,
    /// Of those with a webhook-to-ACK time: the median and 99th percentile, in ms.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// ACKs later than Microsoft's 10-second window.
    pub late: i64,
    /// ACKs Microsoft answered 409: the operation was already final (auto-accepted or
    /// superseded) before our ACK.
    pub auto_accepted: i64,
}

/// The ACKs recorded at or after `since` (an index range on `recorded_at`).
pub async fn ack_stats(pool: &PgPool, since: OffsetDateTime) -> Result<AckStats, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE ack ? 'webhook_to_ack_ms') AS acks, \
             percentile_cont(0.5) WITHIN GROUP (ORDER BY (ack->>'webhook_to_ack_ms')::float8) \
                 AS p50_ms, \
             percentile_cont(0.99) WITHIN GROUP (ORDER BY (ack->>'webhook_to_ack_ms')::float8) \
                 AS p99_ms, \
             count(*) FILTER (WHERE (ack->>'webhook_to_ack_ms')::float8 > 10000) AS late, \
             count(*) FILTER (WHERE ack->'calls' @> '[{{\"status\": 409}}]') AS auto_accepted \
         FROM {} WHERE recorded_at >= $1",
        super::verify::ack_records()
    )))
    .bind(since)
    .fetch_one(pool)
    .await?)
}

/// The latest reconciliation run in the journal.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct ReconcileRun {
    pub performed_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub performed_at: OffsetDateTime,
    /// `N drifted, M healed`.
    pub reason: Option<String>,
    /// The whole report.
    pub details: Value,
}

pub async fn latest_reconcile(pool: &PgPool) -> Result<Option<ReconcileRun>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT performed_by, performed_at, reason, details FROM operator_actions \
         WHERE action = $1 ORDER BY performed_at DESC LIMIT 1",
    )
    .bind(super::operator_actions::ActionKind::Reconcile)
    .fetch_optional(pool)
    .await?)
}
