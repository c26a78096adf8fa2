//! `webhook_endpoints`: the ISV's registered endpoints. The secret column is read only by
//! the delivery runner and the test event (to sign); listings never select it.

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

/// Whether deliveries go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum EndpointStatus {
    Enabled,
    Disabled,
}

/// One endpoint, without its secrets.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EndpointRow {
    pub id: Uuid,
    pub url: String,
    pub description: String,
    pub topics: Vec<String>,
    pub offer_id: Option<String>,
    pub insecure: bool,
    pub status: EndpointStatus,
    pub disabled_reason: Option<String>,
    pub failing_since: Option<OffsetDateTime>,
    /// Until when the previous secret still signs (a rotation's overlap).
    pub previous_secret_until: Option<OffsetDateTime>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// The secrets that sign now: the current one, and the previous one during an overlap.
#[derive(Clone, sqlx::FromRow)]
pub struct SigningSecrets {
    pub secret: String,
    pub previous_secret: Option<String>,
}

impl std::fmt::Debug for SigningSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningSecrets(<redacted>)")
    }
}

const COLUMNS: &str = "id, url, description, topics, offer_id, insecure, status, \
     disabled_reason, failing_since, previous_secret_until, created_at, updated_at";

/// What a new endpoint is registered with.
#[derive(Debug, Clone)]
pub struct NewEndpoint<'a> {
    pub url: &'a str,
    pub description: &'a str,
    pub topics: &'a [String],
    pub offer_id: Option<&'a str>,
    pub insecure: bool,
    /// `whsec_…`.
    pub secret: &'a str,
}

pub async fn insert(pool: &PgPool, new: &NewEndpoint<'_>) -> Result<EndpointRow, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO webhook_endpoints (id, url, description, topics, offer_id, insecure, secret) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(new.url)
    .bind(new.description)
    .bind(new.topics)
    .bind(new.offer_id)
    .bind(new.insecure)
    .bind(new.secret)
    .fetch_one(pool)
    .await?)
}

pub async fn list(pool: &PgPool) -> Result<Vec<EndpointRow>, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_endpoints ORDER BY created_at, id"
    )))
    .fetch_all(pool)
    .await?)
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<EndpointRow>, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The secrets that sign at `now` (the previous one only inside its overlap).
pub async fn signing_secrets(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<SigningSecrets>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT secret, \
             CASE WHEN previous_secret_until > now() THEN previous_secret END AS previous_secret \
         FROM webhook_endpoints WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// The changes of an update; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct EndpointChanges<'a> {
    pub url: Option<&'a str>,
    pub description: Option<&'a str>,
    pub topics: Option<&'a [String]>,
    /// `Some(None)` clears the offer filter.
    pub offer_id: Option<Option<&'a str>>,
    pub insecure: Option<bool>,
    pub status: Option<EndpointStatus>,
}

pub async fn update(
    pool: &PgPool,
    id: Uuid,
    changes: &EndpointChanges<'_>,
) -> Result<Option<EndpointRow>, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_endpoints SET url = coalesce($2, url), \
             description = coalesce($3, description), topics = coalesce($4, topics), \
             offer_id = CASE WHEN $5 THEN $6 ELSE offer_id END, \
             insecure = coalesce($7, insecure), status = coalesce($8, status), \
             disabled_reason = CASE WHEN $8 = 'enabled' THEN NULL \
                                    WHEN $8 = 'disabled' THEN 'disabled by the ISV' \
                                    ELSE disabled_reason END, \
             failing_since = CASE WHEN $8 = 'enabled' THEN NULL ELSE failing_since END, \
             updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(changes.url)
    .bind(changes.description)
    .bind(changes.topics)
    .bind(changes.offer_id.is_some())
    .bind(changes.offer_id.flatten())
    .bind(changes.insecure)
    .bind(changes.status)
    .fetch_optional(pool)
    .await?)
}

/// Deletes the endpoint; its pending deliveries then finish without sending.
pub async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, StoreError> {
    let deleted = sqlx::query("DELETE FROM webhook_endpoints WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// A new current secret; the old one keeps signing until `overlap_until`.
pub async fn rotate_secret(
    pool: &PgPool,
    id: Uuid,
    secret: &str,
    overlap_until: OffsetDateTime,
) -> Result<Option<EndpointRow>, StoreError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE webhook_endpoints SET previous_secret = secret, secret = $2, \
             previous_secret_until = $3, updated_at = now() \
         WHERE id = $1 RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(secret)
    .bind(overlap_until)
    .fetch_optional(pool)
    .await?)
}

/// An attempt failed: the endpoint is failing since now unless it was already.
pub async fn record_failure(pool: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE webhook_endpoints SET failing_since = coalesce(failing_since, now()) \
         WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

/// An attempt succeeded: the endpoint is healthy again.
pub async fn record_success(pool: &PgPool, id: Uuid) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE webhook_endpoints SET failing_since = NULL WHERE id = $1 \
         AND failing_since IS NOT NULL",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn disable(pool: &PgPool, id: Uuid, reason: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $2, \
             updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(reason)
    .execute(pool)
    .await?;
    Ok(())
}
