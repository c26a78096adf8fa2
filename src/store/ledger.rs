//! `subscription_events`: the append-only event log — one row per event the machine decided
//! on, per duplicate the inbox caught, per effect execution and per notice emitted.
//! [`append`] is its one `INSERT`: it takes the subscription's next sequence under the
//! subscription's row lock and, for a decision, saves the machine in the same statement.
//! What goes into a row is the caller's (`worker::apply`); this module only writes it.

use serde_json::Value;
use sqlx::postgres::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;
use super::subscriptions::SavedMachine;
use super::text::{TextValue, text_column};

/// What became of the event a row logs: the `outcome` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogOutcome {
    /// The machine applied it (a transition, or effects).
    Applied,
    /// The machine refused it (e.g. a command the state does not allow).
    Rejected,
    /// Nothing to do (a duplicate, a repeat the machine recognised).
    Ignored,
    /// Not a decision: an effect execution or an operator's note.
    Recorded,
}

impl TextValue for LogOutcome {
    const ALL: &'static [Self] = &[Self::Applied, Self::Rejected, Self::Ignored, Self::Recorded];

    fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Rejected => "rejected",
            Self::Ignored => "ignored",
            Self::Recorded => "recorded",
        }
    }
}

text_column!(LogOutcome);

/// One row to append.
#[derive(Debug, Clone)]
pub struct LogRow {
    /// Also the CloudEvents id of the domain events its decision produced.
    pub id: Uuid,
    /// The AMQP message id that carried the event, if one did.
    pub message_id: Option<String>,
    pub event_key: String,
    pub event_kind: String,
    pub event: Value,
    /// The state before; `None`: the subscription's state (a row that decides nothing).
    pub from_state: Option<&'static str>,
    pub outcome: LogOutcome,
    pub reason: String,
    /// The effects decided, as JSON (an empty array for none).
    pub effects: Value,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub recorded_at: OffsetDateTime,
    /// When the message reached us (a webhook's receipt at the ingress).
    pub received_at: Option<OffsetDateTime>,
}

/// The event log's next sequence for the subscription `$1`, in an `UPDATE subscriptions`
/// that holds its row: the counter plus one. Every writer keeps the counter (migration
/// 20261209020000 caught up any a writer before it left behind), so the log itself is not
/// read: the `UPDATE` is one primary-key probe.
macro_rules! next_sequence {
    () => {
        "last_sequence + 1"
    };
}

/// The one `INSERT`, from the CTE `s` (the subscription's state and new sequence).
macro_rules! insert_row {
    () => {
        " INSERT INTO subscription_events \
         (id, subscription_id, sequence, message_id, event_key, event_kind, event, from_state, \
          to_state, outcome, reason, effects, correlation_id, request_id, trace_id, recorded_at, \
          received_at) \
         SELECT $2, $1, s.last_sequence, $3, $4, $5, $6, coalesce($7, s.state), s.state, $8, \
                $9, $10, $11, $12, $13, $14, $15 FROM s \
         RETURNING sequence"
    };
}

/// Appends without changing the subscription (a row that decides nothing).
const APPEND: &str = concat!(
    "WITH s AS (UPDATE subscriptions SET last_sequence = ",
    next_sequence!(),
    " WHERE id = $1 RETURNING state, last_sequence)",
    insert_row!()
);

/// Saves the machine and appends its decision: one statement (the hot path's).
const SAVE_AND_APPEND: &str = concat!(
    "WITH s AS ( \
         UPDATE subscriptions SET machine = $16, state = $17, offer_id = $18, plan_id = $19, \
           quantity = $20, beneficiary_tenant_id = $21, purchaser_tenant_id = $22, \
           term_unit = $23, charge_duration = $24, private_offer_id = $25, \
           beneficiary = $26, purchaser = $27, allowed_customer_operations = $28, \
           version = version + 1, updated_at = $14, \
           state_since = CASE WHEN state IS DISTINCT FROM $17 OR state_since IS NULL \
             THEN $14 ELSE state_since END, \
           last_sequence = ",
    next_sequence!(),
    " WHERE id = $1 RETURNING state, last_sequence)",
    insert_row!()
);

/// Appends `row` to the subscription's log, saving `saved` with it when given; the row's
/// sequence, or `None` when we do not know the subscription (nothing is written). Call
/// with the subscription's row locked when saving.
pub async fn append(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    saved: Option<&SavedMachine>,
    row: &LogRow,
) -> Result<Option<i64>, StoreError> {
    let query = sqlx::query_scalar::<_, i64>(match saved {
        Some(_) => SAVE_AND_APPEND,
        None => APPEND,
    })
    .bind(subscription_id)
    .bind(row.id)
    .bind(&row.message_id)
    .bind(&row.event_key)
    .bind(&row.event_kind)
    .bind(&row.event)
    .bind(row.from_state)
    .bind(row.outcome)
    .bind(&row.reason)
    .bind(&row.effects)
    .bind(&row.correlation_id)
    .bind(&row.request_id)
    .bind(&row.trace_id)
    .bind(row.recorded_at)
    .bind(row.received_at);
    let query = match saved {
        Some(saved) => query
            .bind(&saved.machine)
            .bind(saved.state)
            .bind(&saved.offer_id)
            .bind(&saved.plan_id)
            .bind(saved.quantity)
            .bind(saved.beneficiary_tenant_id)
            .bind(saved.purchaser_tenant_id)
            .bind(&saved.term_unit)
            .bind(&saved.charge_duration)
            .bind(&saved.private_offer_id)
            .bind(&saved.beneficiary)
            .bind(&saved.purchaser)
            .bind(&saved.allowed_customer_operations),
        None => query,
    };
    Ok(query.fetch_optional(&mut *conn).await?)
}
