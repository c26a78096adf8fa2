//! `amqp_prefixes`: the RabbitMQ prefixes this database's processes declared (`serve` and
//! `work` record theirs at startup), for commands that must name the prefixes that exist.

use sqlx::PgPool;

use crate::store::StoreError;

/// Records that `process` declared the topology of `prefix` now.
pub async fn record(pool: &PgPool, prefix: &str, process: &str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO amqp_prefixes (prefix, last_process) VALUES ($1, $2)
         ON CONFLICT (prefix) DO UPDATE SET last_seen = now(), last_process = $2",
    )
    .bind(prefix)
    .bind(process)
    .execute(pool)
    .await?;
    Ok(())
}

/// The recorded prefixes, most recently seen first.
pub async fn list(pool: &PgPool) -> Result<Vec<String>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT prefix FROM amqp_prefixes ORDER BY last_seen DESC, prefix")
            .fetch_all(pool)
            .await?,
    )
}
