//! PostgreSQL: the pool, the schema (embedded sqlx migrations) and, in submodules, the
//! queries of each table. No other module writes SQL.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres, Transaction};

use uuid::Uuid;

use crate::settings::{ConnectionUrl, DatabaseSettings};

pub mod baseline;
pub mod commands;
pub mod credential_notices;
pub mod dead_effects;
pub mod deliveries;
pub mod endpoints;
pub mod inbox;
pub mod ledger;
pub mod notices;
pub mod onboarding;
pub mod operator_actions;
pub mod outbox;
pub mod overview;
pub mod prefixes;
pub mod preload;
pub mod statements;
pub mod subscriptions;
pub mod text;
pub mod timeline;
pub mod usage;
pub mod verify;

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Why the store could not be reached or prepared, in the terms an operator fixes it in.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot reach PostgreSQL at {url}: {reason}. Is it running and listening there? \
         Check the host and port in DATABASE_URL"
    )]
    Unreachable {
        /// Redacted: the password never reaches a message.
        url: String,
        reason: String,
    },
    #[error(
        "PostgreSQL at {url} refused the login: {message}. Check the user and password in \
         DATABASE_URL"
    )]
    AuthenticationFailed { url: String, message: String },
    #[error(
        "the database of {url} does not exist: run `fulfillment migrate` (it creates the \
         database and its schema)"
    )]
    DatabaseMissing { url: String },
    #[error(
        "the schema of {url} is behind this version ({missing} migration(s) not applied, the \
         latest is {latest}): run `fulfillment migrate`"
    )]
    SchemaBehind {
        url: String,
        missing: usize,
        latest: String,
    },
    #[error(
        "the database has no table the query needs ({message}): its schema is missing or \
         behind; run `fulfillment migrate`"
    )]
    SchemaMissing { message: String },
    #[error("cannot create database {url}: {source}")]
    CreateDatabase {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(sqlx::Error),
    #[error(
        "subscription(s) {} were created by another transaction while this one waited for \
         its rows and are now held by a third; taking them after the rows this one holds \
         could deadlock: roll back and try again",
        subscriptions.iter().map(Uuid::to_string).collect::<Vec<_>>().join(", ")
    )]
    Contended { subscriptions: Vec<Uuid> },
    #[error("a stored state machine cannot be read back: {0}")]
    CorruptMachine(#[source] serde_json::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match &error {
            // 42P01 undefined_table, 42703 undefined_column: the schema is not this version's.
            sqlx::Error::Database(db)
                if matches!(db.code().as_deref(), Some("42P01" | "42703")) =>
            {
                StoreError::SchemaMissing {
                    message: db.message().to_string(),
                }
            }
            _ => StoreError::Query(error),
        }
    }
}

impl StoreError {
    /// The database could not be reached or is restarting (connection refused or lost,
    /// pool timeout, server shutting down or starting): nothing is wrong with the request,
    /// and the same call will work once PostgreSQL is back.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::Query(error) => is_unavailable(error),
            _ => false,
        }
    }

    /// The error of a failed first connection, from its classification.
    fn from_connect(url: &ConnectionUrl, failure: ConnectFailure) -> Self {
        let url = url.redacted();
        match failure {
            ConnectFailure::Unreachable(reason) | ConnectFailure::Refused(reason) => {
                StoreError::Unreachable { url, reason }
            }
            ConnectFailure::AuthenticationFailed(message) => {
                StoreError::AuthenticationFailed { url, message }
            }
            ConnectFailure::DatabaseMissing(_) => StoreError::DatabaseMissing { url },
        }
    }
}

/// JSON text for a `jsonb` column, written once from the value (no `serde_json::Value`
/// tree on the way: issue #17).
pub type JsonText = Box<serde_json::value::RawValue>;

/// `value` as [`JsonText`]. For types whose serialization cannot fail (no maps with
/// non-string keys, no failing `Serialize`): the machine's and the store's own.
pub fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> JsonText {
    serde_json::value::to_raw_value(value).expect("the store's types always serialize to JSON")
}

/// An empty JSON array as [`JsonText`] (a row without effects).
pub fn json_empty_array() -> JsonText {
    json_text::<[(); 0]>(&[])
}

/// See [`StoreError::is_unavailable`]. SQLSTATE class 08 is "connection exception"; 57P01-03
/// are the server shutting down or not yet accepting connections; 53300 is "too many
/// connections".
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// One round trip: `Ok` when PostgreSQL answers (readiness probes, waiting for it to come
/// back).
pub async fn ping(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query_scalar::<_, i32>("SELECT 1")
        .fetch_one(pool)
        .await?;
    Ok(())
}

/// What `migrate` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    pub database_created: bool,
    pub applied: Vec<String>,
}

/// Opens a pool on an existing database whose schema is this version's (newer is fine: a
/// rolling upgrade migrates before the old processes stop). The first connection is opened
/// alone, so a failure is named once and in an operator's terms.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    let url = &settings.url;
    let mut first = connect_once(url, settings.acquire_timeout)
        .await
        .map_err(|failure| StoreError::from_connect(url, failure))?;
    let applied = applied_migrations(&mut first).await?;
    let _ = first.close().await;
    let missing: Vec<_> = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !applied.contains(&m.version))
        .collect();
    if let Some(latest) = missing.last() {
        return Err(StoreError::SchemaBehind {
            url: url.redacted(),
            missing: missing.len(),
            latest: format!("{} {}", latest.version, latest.description),
        });
    }
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .connect(url.expose())
        .await
        .map_err(|source| StoreError::Unreachable {
            url: url.redacted(),
            reason: source.to_string(),
        })
}

/// Creates the database when absent, then applies the migrations not yet applied. A second
/// run changes nothing.
pub async fn migrate(settings: &DatabaseSettings) -> Result<MigrationReport, StoreError> {
    let url = &settings.url;
    let exists = Postgres::database_exists(url.expose())
        .await
        .map_err(|source| StoreError::from_connect(url, connect_failure(source)))?;
    if !exists {
        Postgres::create_database(url.expose())
            .await
            .map_err(|source| StoreError::CreateDatabase {
                url: url.redacted(),
                source,
            })?;
    }
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url.expose())
        .await
        .map_err(|source| StoreError::from_connect(url, connect_failure(source)))?;
    let before = applied_versions(&pool).await?;
    MIGRATOR.run(&pool).await?;
    let applied = MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration() && !before.contains(&m.version))
        .map(|m| format!("{} {}", m.version, m.description))
        .collect();
    pool.close().await;
    Ok(MigrationReport {
        database_created: !exists,
        applied,
    })
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, StoreError> {
    applied_migrations(pool).await
}

/// The versions of the migrations applied successfully, in order; empty when the schema
/// was never migrated (no `_sqlx_migrations` table).
pub async fn applied_migrations(
    executor: impl sqlx::PgExecutor<'_>,
) -> Result<Vec<i64>, StoreError> {
    let versions =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(executor)
            .await;
    match versions {
        Ok(versions) => Ok(versions),
        // 42P01 undefined_table: never migrated.
        Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => Ok(Vec::new()),
        Err(error) => Err(error.into()),
    }
}

/// How the worker's hot-path transactions begin (a consumer's window, an apply, an outbox
/// claim and its settle): every statement in them reaches its rows through an index by
/// design (a primary key, `outbox_subscription_idx`, `outbox_claim_due_idx`), and this
/// keeps it so whatever the statistics say. PostgreSQL plans a prepared statement once it
/// has run a few times, and keeps the plan until the table's statistics change; planned
/// while a table is nearly empty, or where statistics never come (autovacuum off, a table
/// never analyzed), the plan scans the table, and keeps scanning it as it grows: in
/// `bench pipeline` on a server without autovacuum, the settle's `UPDATE outbox … WHERE
/// id = ANY($1)` read the whole outbox on every call (5-6 ms each, auto_explain), and the
/// window's save read every subscription. Only a cost penalty: a statement without an index
/// path still runs. One round trip, like a plain `BEGIN`.
pub const HOT_PATH_BEGIN: &str = "BEGIN; SET LOCAL enable_seqscan = off";

/// Begins a hot-path transaction ([`HOT_PATH_BEGIN`]).
pub async fn begin_hot_path(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    Ok(pool.begin_with(HOT_PATH_BEGIN).await?)
}

/// Whether the server runs autovacuum (`SHOW autovacuum`). Without it the outbox and inbox
/// tables, which churn rows, bloat until queries slow down.
pub async fn autovacuum_enabled(executor: impl sqlx::PgExecutor<'_>) -> Result<bool, StoreError> {
    let setting: String = sqlx::query_scalar("SELECT current_setting('autovacuum')")
        .fetch_one(executor)
        .await?;
    Ok(setting == "on")
}

/// Why one connection could not be opened, in the terms an operator fixes it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectFailure {
    /// No server answered (refused, DNS, TLS, timeout).
    Unreachable(String),
    /// The server refused the user or password (SQLSTATE 28P01, 28000).
    AuthenticationFailed(String),
    /// The server answered but has no such database (SQLSTATE 3D000).
    DatabaseMissing(String),
    /// Anything else the server said.
    Refused(String),
}

/// Opens one connection (no pool, no retries) within `timeout`, and says why it failed:
/// for read-only checks such as `fulfillment doctor`.
pub async fn connect_once(
    url: &ConnectionUrl,
    timeout: Duration,
) -> Result<PgConnection, ConnectFailure> {
    match tokio::time::timeout(timeout, PgConnection::connect(url.expose())).await {
        Err(_) => Err(ConnectFailure::Unreachable(format!(
            "no answer within {timeout:?}"
        ))),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(connect_failure(error)),
    }
}

/// Classifies the error of opening a connection.
fn connect_failure(error: sqlx::Error) -> ConnectFailure {
    match error {
        sqlx::Error::Database(db) => {
            let message = db.message().to_string();
            match db.code().as_deref() {
                Some("28P01" | "28000") => ConnectFailure::AuthenticationFailed(message),
                Some("3D000") => ConnectFailure::DatabaseMissing(message),
                _ => ConnectFailure::Refused(message),
            }
        }
        error => ConnectFailure::Unreachable(error.to_string()),
    }
}

/// Drops the database `url` names, closing its connections (benchmarks and the demo start
/// from an empty one and leave nothing behind).
pub async fn drop_database(url: &ConnectionUrl) -> Result<(), StoreError> {
    let name = url
        .url()
        .path()
        .trim_start_matches('/')
        .replace('"', "\"\"");
    let admin = url.with_path("/postgres");
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(admin.expose())
        .await
        .map_err(|source| StoreError::from_connect(&admin, connect_failure(source)))?;
    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
    let dropped = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
    pool.close().await;
    dropped?;
    Ok(())
}

/// `ANALYZE` of the whole database: fresh planner statistics where autovacuum is off.
pub async fn analyze(pool: &PgPool) -> Result<(), StoreError> {
    sqlx::query("ANALYZE").execute(pool).await?;
    Ok(())
}

/// The commit ceiling of `bench pipeline`: a scratch table of rows the size of an event-log
/// decision, committed one by one.
pub mod ceiling {
    use sqlx::postgres::PgPool;

    pub async fn create(pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE bench_commit_ceiling (id bigserial PRIMARY KEY, \
             at timestamptz NOT NULL DEFAULT now(), body text NOT NULL)",
        )
        .execute(pool)
        .await
        .map(drop)
    }

    pub async fn commit_one(pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO bench_commit_ceiling (body) VALUES ($1)")
            .bind("a row the size of an event-log entry's decision text")
            .execute(pool)
            .await
            .map(drop)
    }

    pub async fn drop_table(pool: &PgPool) -> Result<(), sqlx::Error> {
        sqlx::query("DROP TABLE bench_commit_ceiling")
            .execute(pool)
            .await
            .map(drop)
    }
}
