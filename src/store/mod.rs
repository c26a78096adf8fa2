//! PostgreSQL: the pool, the schema (embedded sqlx migrations) and, in submodules, the
//! queries of each table. No other module writes SQL.

use std::time::Duration;

use sqlx::Postgres;
use sqlx::migrate::{MigrateDatabase, Migrator};
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::settings::DatabaseSettings;

pub mod ledger;
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
    let table: Option<String> = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
        .fetch_one(pool)
        .await?;
    if table.is_none() {
        return Ok(Vec::new());
    }
    Ok(
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await?,
    )
}
