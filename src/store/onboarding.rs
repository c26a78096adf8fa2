//! `onboarding_answers`: what a customer answered on the landing page when asking for
//! activation, and who had signed in to do it.

use serde_json::Value;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// The answers of one activation request.
#[derive(Debug)]
pub struct NewAnswers<'a> {
    pub subscription_id: Uuid,
    /// `{field name: answer}`.
    pub answers: &'a Value,
    pub object_id: &'a str,
    pub tenant_id: &'a str,
    pub email: Option<&'a str>,
}

/// One stored row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AnswersRow {
    pub subscription_id: Uuid,
    pub answers: Value,
    pub signed_in_object_id: String,
    pub signed_in_tenant_id: String,
    pub signed_in_email: Option<String>,
    pub submitted_at: OffsetDateTime,
}

/// Stores the answers; a later request for the same subscription replaces them.
pub async fn record(pool: &PgPool, new: &NewAnswers<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO onboarding_answers \
         (subscription_id, answers, signed_in_object_id, signed_in_tenant_id, signed_in_email) \
         VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (subscription_id) DO UPDATE SET answers = EXCLUDED.answers, \
         signed_in_object_id = EXCLUDED.signed_in_object_id, \
         signed_in_tenant_id = EXCLUDED.signed_in_tenant_id, \
         signed_in_email = EXCLUDED.signed_in_email, submitted_at = now()",
    )
    .bind(new.subscription_id)
    .bind(new.answers)
    .bind(new.object_id)
    .bind(new.tenant_id)
    .bind(new.email)
    .execute(pool)
    .await
    .map(drop)
}

pub async fn find(pool: &PgPool, subscription_id: Uuid) -> Result<Option<AnswersRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT subscription_id, answers, signed_in_object_id, signed_in_tenant_id, \
         signed_in_email, submitted_at FROM onboarding_answers WHERE subscription_id = $1",
    )
    .bind(subscription_id)
    .fetch_optional(pool)
    .await
}
