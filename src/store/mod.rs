//! PostgreSQL: the pool, the schema (embedded sqlx migrations) and, in submodules, the
//! queries of each table. No other module writes SQL.

use std::time::Duration;

use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection, Postgres};

use crate::settings::{ConnectionUrl, DatabaseSettings};

pub mod ledger;
pub mod notices;
pub mod operator_actions;
pub mod outbox;
pub mod subscriptions;
pub mod timeline;

/// The migrations in `migrations/`, embedded at compile time.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Why the store could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "cannot reach PostgreSQL at {url}: {source}. Is it running? Start it with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
         or set DATABASE_URL"
    )]
    Unreachable {
        /// Redacted: the password never reaches a message.
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("cannot create database {url}: {source}")]
    CreateDatabase {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    #[error("a stored state machine cannot be read back: {0}")]
    CorruptMachine(#[source] serde_json::Error),
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

/// Opens a pool on an existing database.
pub async fn connect(settings: &DatabaseSettings) -> Result<PgPool, StoreError> {
    PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .connect(settings.url.expose())
        .await
        .map_err(|source| StoreError::Unreachable {
            url: settings.url.redacted(),
            source,
        })
}

/// Creates the database when absent, then applies the migrations not yet applied. A second
/// run changes nothing.
pub async fn migrate(settings: &DatabaseSettings) -> Result<MigrationReport, StoreError> {
    let url = &settings.url;
    let exists = Postgres::database_exists(url.expose())
        .await
        .map_err(|source| StoreError::Unreachable {
            url: url.redacted(),
            source,
        })?;
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
        .map_err(|source| StoreError::Unreachable {
            url: url.redacted(),
            source,
        })?;
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
        Ok(Err(sqlx::Error::Database(db))) => {
            let message = db.message().to_string();
            Err(match db.code().as_deref() {
                Some("28P01" | "28000") => ConnectFailure::AuthenticationFailed(message),
                Some("3D000") => ConnectFailure::DatabaseMissing(message),
                _ => ConnectFailure::Refused(message),
            })
        }
        Ok(Err(error)) => Err(ConnectFailure::Unreachable(error.to_string())),
    }
}
