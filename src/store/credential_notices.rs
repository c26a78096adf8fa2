//! `credential_expiry_notices`: the `credential.expiring` announcements, one per credential,
//! expiry and threshold (issue #20). A row is recorded before the domain event is published
//! and marked once the broker confirmed it, so an announcement is made once and a failed
//! publish is retried.

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// An announcement to publish.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Notice {
    /// What it is: `certificate:<thumbprint>` or `secret:<client id>`.
    pub credential: String,
    pub expires_at: OffsetDateTime,
    pub threshold_days: i32,
    /// The CloudEvents id.
    pub event_id: Uuid,
}

/// Records the notice unless it exists. True when this call recorded it.
pub async fn record(pool: &PgPool, notice: &Notice) -> Result<bool, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO credential_expiry_notices (credential, expires_at, threshold_days, event_id)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
    )
    .bind(&notice.credential)
    .bind(notice.expires_at)
    .bind(notice.threshold_days)
    .bind(notice.event_id)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Notices recorded but not yet confirmed by the broker.
pub async fn unpublished(pool: &PgPool) -> Result<Vec<Notice>, sqlx::Error> {
    sqlx::query_as(
        "SELECT credential, expires_at, threshold_days, event_id
         FROM credential_expiry_notices WHERE published_at IS NULL
         ORDER BY recorded_at",
    )
    .fetch_all(pool)
    .await
}

pub async fn mark_published(pool: &PgPool, event_id: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE credential_expiry_notices SET published_at = now()
         WHERE event_id = $1 AND published_at IS NULL",
    )
    .bind(event_id)
    .execute(pool)
    .await?;
    Ok(())
}
