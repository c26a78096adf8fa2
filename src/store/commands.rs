//! `commands`: the publisher commands accepted, recorded before they are queued.

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// One accepted command.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CommandRow {
    pub command_id: Uuid,
    pub subscription_id: Uuid,
    pub kind: String,
    pub requested_by: String,
    pub requested_at: OffsetDateTime,
}

pub async fn record(
    pool: &PgPool,
    command_id: Uuid,
    subscription_id: Uuid,
    kind: &str,
    requested_by: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO commands (command_id, subscription_id, kind, requested_by) \
         VALUES ($1, $2, $3, $4) ON CONFLICT (command_id) DO NOTHING",
    )
    .bind(command_id)
    .bind(subscription_id)
    .bind(kind)
    .bind(requested_by)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn get(pool: &PgPool, command_id: Uuid) -> Result<Option<CommandRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT command_id, subscription_id, kind, requested_by, requested_at FROM commands \
         WHERE command_id = $1",
    )
    .bind(command_id)
    .fetch_optional(pool)
    .await
}

/// The publisher operation of one command, if the worker recorded one.
pub async fn operation(
    pool: &PgPool,
    command_id: Uuid,
) -> Result<Option<crate::store::timeline::PublisherOperationRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT command_id, kind, target_plan_id, target_quantity, operation_id, status, \
         last_error, created_at, updated_at FROM publisher_operations WHERE command_id = $1",
    )
    .bind(command_id)
    .fetch_optional(pool)
    .await
}

/// Removes a command that could not be queued (nothing was accepted).
pub async fn forget(pool: &PgPool, command_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM commands WHERE command_id = $1")
        .bind(command_id)
        .execute(pool)
        .await
        .map(drop)
}
