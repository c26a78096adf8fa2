//! Where PostgreSQL's time goes, from the `pg_stat_statements` extension: `bench pipeline`
//! resets the counters of its own database before the measured phase and reads the most
//! expensive statements afterwards. The extension only counts when the server loads it at
//! start (`shared_preload_libraries`); nothing here changes the server's configuration.

use sqlx::postgres::PgPool;

/// The library name in `shared_preload_libraries`.
const LIBRARY: &str = "pg_stat_statements";

/// Whether the server counts statements, and if not, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// Loaded and the extension exists in this database: counters can be reset and read.
    Counting,
    /// The server does not load the library (`shared_preload_libraries` as it is now).
    NotPreloaded { preload: String },
}

/// Checks the server's preload list and, when it loads the library, creates the extension
/// in the connected database (a throwaway benchmark database; `IF NOT EXISTS` so a second
/// call is harmless).
pub async fn enable(pool: &PgPool) -> Result<Availability, sqlx::Error> {
    let preload: String = sqlx::query_scalar("SELECT current_setting('shared_preload_libraries')")
        .fetch_one(pool)
        .await?;
    if !preload
        .split(',')
        .any(|library| library.trim().trim_matches('"') == LIBRARY)
    {
        return Ok(Availability::NotPreloaded { preload });
    }
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await?;
    Ok(Availability::Counting)
}

/// Forgets what was counted so far in the connected database (other databases keep theirs:
/// the server may be shared).
pub async fn reset(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_stat_statements_reset(0, \
         (SELECT oid FROM pg_database WHERE datname = current_database()), 0)",
    )
    .execute(pool)
    .await
    .map(drop)
}

/// One normalised statement's totals since the last [`reset`].
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StatementCost {
    pub query: String,
    pub calls: i64,
    /// Execution time in milliseconds (planning not included: statements are prepared).
    pub total_ms: f64,
    pub rows: i64,
}

/// The `limit` statements of the connected database with the most execution time, and the
/// total execution time of all its statements, in milliseconds.
pub async fn top(pool: &PgPool, limit: i64) -> Result<(Vec<StatementCost>, f64), sqlx::Error> {
    let rows = sqlx::query_as::<_, StatementCost>(
        "SELECT query, calls, total_exec_time AS total_ms, rows FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         ORDER BY total_exec_time DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let total: f64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(total_exec_time), 0)::float8 FROM pg_stat_statements \
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await?;
    Ok((rows, total))
}
