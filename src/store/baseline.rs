//! The scratch table of `bench pipeline`'s baseline engine: one row per acknowledged change,
//! written in batches (one commit per batch). It lives only in a benchmark's throwaway
//! database.

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// One customer change as the baseline engine records it.
#[derive(Debug, Clone)]
pub struct ChangeRow {
    pub subscription: Uuid,
    pub operation: Uuid,
    pub quantity: Option<i64>,
    pub received_at: OffsetDateTime,
}

pub async fn create(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS bench_baseline_changes (\
         operation uuid PRIMARY KEY, subscription uuid NOT NULL, quantity bigint, \
         received_at timestamptz NOT NULL, recorded_at timestamptz NOT NULL DEFAULT now())",
    )
    .execute(pool)
    .await
    .map(drop)
}

/// Records `rows` in one statement and one commit; a redelivered change is recorded once.
pub async fn insert_batch(pool: &PgPool, rows: &[&ChangeRow]) -> Result<(), sqlx::Error> {
    let subscriptions: Vec<Uuid> = rows.iter().map(|r| r.subscription).collect();
    let operations: Vec<Uuid> = rows.iter().map(|r| r.operation).collect();
    let quantities: Vec<Option<i64>> = rows.iter().map(|r| r.quantity).collect();
    let received: Vec<OffsetDateTime> = rows.iter().map(|r| r.received_at).collect();
    sqlx::query(
        "INSERT INTO bench_baseline_changes (operation, subscription, quantity, received_at) \
         SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::bigint[], $4::timestamptz[]) \
         ON CONFLICT (operation) DO NOTHING",
    )
    .bind(&operations)
    .bind(&subscriptions)
    .bind(&quantities)
    .bind(&received)
    .execute(pool)
    .await
    .map(drop)
}

/// Rows recorded so far.
pub async fn count(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT count(*) FROM bench_baseline_changes")
        .fetch_one(pool)
        .await
}
