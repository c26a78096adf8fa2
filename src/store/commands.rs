//! `commands`: the publisher commands accepted, recorded before they are queued.

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::ledger::LogOutcome;
use super::text::{self, TextValue, text_column};
use crate::worker::protocol::CommandStatus;

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

/// How a command that did not succeed ended: the `status` of an [`UnsuccessfulCommand`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsuccessful {
    /// Our policy refused it (the machine's decision was `rejected`); no call was made.
    Rejected,
    /// Microsoft refused the call.
    Refused,
    /// Microsoft accepted it and its operation ended `Failed`.
    Failed,
    /// Microsoft accepted it and its operation ended `Conflict`.
    Conflict,
    /// Its answer was lost and nothing showed the outcome in time.
    Unknown,
}

impl Unsuccessful {
    /// The publisher operation's status this is, `None` for our policy's refusal.
    pub fn operation_status(self) -> Option<CommandStatus> {
        match self {
            Self::Rejected => None,
            Self::Refused => Some(CommandStatus::Refused),
            Self::Failed => Some(CommandStatus::Failed),
            Self::Conflict => Some(CommandStatus::Conflict),
            Self::Unknown => Some(CommandStatus::Unknown),
        }
    }
}

impl TextValue for Unsuccessful {
    const ALL: &'static [Self] = &[
        Self::Rejected,
        Self::Refused,
        Self::Failed,
        Self::Conflict,
        Self::Unknown,
    ];

    /// `rejected` (the event log's outcome), else the operation's status word.
    fn as_str(self) -> &'static str {
        match self.operation_status() {
            Some(status) => status.as_str(),
            None => LogOutcome::Rejected.as_str(),
        }
    }
}

text_column!(Unsuccessful);

/// A command that did not succeed: refused by our policy or by Microsoft, ended
/// `Failed`/`Conflict` at Microsoft, or with an `Unknown` outcome.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct UnsuccessfulCommand {
    pub command_id: Uuid,
    pub subscription_id: Uuid,
    pub kind: String,
    pub requested_by: String,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// `rejected` (our policy), or the publisher operation's status.
    #[serde(serialize_with = "text::as_word")]
    pub status: Unsuccessful,
    pub reason: Option<String>,
}

/// The commands requested at or after `since` that ended as one of `ends`, newest first, at
/// most `limit`.
pub async fn unsuccessful_since(
    pool: &PgPool,
    since: OffsetDateTime,
    ends: &[Unsuccessful],
    limit: i64,
) -> Result<Vec<UnsuccessfulCommand>, sqlx::Error> {
    let operation_ends: Vec<CommandStatus> = ends
        .iter()
        .filter_map(|end| end.operation_status())
        .collect();
    let policy_refusals = ends.contains(&Unsuccessful::Rejected);
    sqlx::query_as(
        "SELECT c.command_id, c.subscription_id, c.kind, c.requested_by, c.requested_at, \
             coalesce(p.status, $3) AS status, coalesce(p.last_error, nullif(r.reason, '')) AS reason \
         FROM commands c \
         LEFT JOIN publisher_operations p ON p.command_id = c.command_id \
         LEFT JOIN LATERAL ( \
             SELECT coalesce(e.reason, '') AS reason FROM subscription_events e \
             WHERE e.subscription_id = c.subscription_id \
               AND e.message_id = c.command_id::text AND e.outcome = $4 \
             LIMIT 1) r ON true \
         WHERE c.requested_at >= $1 \
           AND (p.status = ANY($5) \
                OR ($6 AND p.command_id IS NULL AND r.reason IS NOT NULL)) \
         ORDER BY c.requested_at DESC LIMIT $2",
    )
    .bind(since)
    .bind(limit)
    .bind(Unsuccessful::Rejected)
    .bind(LogOutcome::Rejected)
    .bind(operation_ends)
    .bind(policy_refusals)
    .fetch_all(pool)
    .await
}
