//! `subscription_events`: the append-only event log — one row per event the machine decided
//! on, per duplicate the inbox caught, per effect execution and per notice emitted.
//! [`append_many`] writes a window of decisions (and duplicates) with the sequences their
//! caller took under the rows' locks, and saves the machines in the same statement; its
//! `INSERT` is the log's only one. [`append`] writes one row that decides nothing, taking the
//! subscription's next sequence under its row lock first.
//! What goes into a row is the caller's (`worker::apply`); this module only writes it.

use serde_json::Value;
use sqlx::postgres::PgConnection;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use super::subscriptions::SavedMachine;
use super::text::{TextValue, text_column};
use super::{JsonText, StoreError};

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
    pub event: JsonText,
    /// The state before; `None`: the subscription's state (a row that decides nothing).
    pub from_state: Option<&'static str>,
    pub outcome: LogOutcome,
    pub reason: String,
    /// The effects decided, as JSON (an empty array for none).
    pub effects: JsonText,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    pub recorded_at: OffsetDateTime,
    /// When the message reached us (a webhook's receipt at the ingress).
    pub received_at: Option<OffsetDateTime>,
    /// The effect execution whose call produced the event, when it has no `effect:*` row
    /// of its own (a GET of the subscription and the observation it fed are one row).
    pub execution: Option<JsonText>,
}

/// Appends `row` to the subscription's log without changing the subscription (a row that
/// decides nothing: an effect execution, a notice): an `UPDATE subscriptions` that holds its
/// row takes the next sequence (the counter plus one; every writer keeps the counter —
/// migration 20261209020000 caught up any a writer before it left behind — so the log
/// itself is not read), and [`append_many`]'s `INSERT`, the log's only one, writes the row.
/// The row's sequence, or `None` when we do not know the subscription (nothing is written).
pub async fn append(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    row: &LogRow,
) -> Result<Option<i64>, StoreError> {
    let counted: Option<(String, i64)> = sqlx::query_as(
        "UPDATE subscriptions SET last_sequence = last_sequence + 1 WHERE id = $1 \
         RETURNING state, last_sequence",
    )
    .bind(subscription_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((state, sequence)) = counted else {
        return Ok(None);
    };
    let row = Sequenced {
        subscription_id,
        sequence,
        to_state: &state,
        row,
    };
    // The counter is taken: no counter for the window's own update.
    append_many(conn, &[], &[row]).await?;
    Ok(Some(sequence))
}

/// One row of a window's append: its sequence and the state the subscription is in after
/// it, both decided by the caller under the subscription's row lock.
#[derive(Debug, Clone, Copy)]
pub struct Sequenced<'a> {
    pub subscription_id: Uuid,
    pub sequence: i64,
    /// The `to_state` column (and `from_state` when the row's is `None`).
    pub to_state: &'a str,
    pub row: &'a LogRow,
}

/// Where a subscription's row stands after a window's appends: its event log's last
/// sequence and, when a decision saved its machine, the saved columns.
#[derive(Debug, Clone, Copy)]
pub struct Counter<'a> {
    pub subscription_id: Uuid,
    pub last_sequence: i64,
    pub saved: Option<Saved<'a>>,
}

/// A saved machine with the row's bookkeeping after the window's last decision.
#[derive(Debug, Clone, Copy)]
pub struct Saved<'a> {
    pub machine: &'a SavedMachine,
    pub version: i64,
    pub updated_at: OffsetDateTime,
    pub state_since: Option<OffsetDateTime>,
}

/// [`append`] for a window: every row in one `INSERT`, and every subscription's counter
/// (with its saved machine, for a decision) in one `UPDATE` per kind, in one statement.
/// The caller holds the rows' locks and numbered the rows from the counters it read under
/// them, so the sequences and versions it passes are the ones [`append`] would take.
pub async fn append_many(
    conn: &mut PgConnection,
    counters: &[Counter<'_>],
    rows: &[Sequenced<'_>],
) -> Result<(), StoreError> {
    let saved: Vec<(Uuid, i64, &Saved<'_>)> = counters
        .iter()
        .filter_map(|c| Some((c.subscription_id, c.last_sequence, c.saved.as_ref()?)))
        .collect();
    let counted: Vec<(Uuid, i64)> = counters
        .iter()
        .filter(|c| c.saved.is_none())
        .map(|c| (c.subscription_id, c.last_sequence))
        .collect();
    let column = |f: &dyn Fn(&SavedMachine) -> Option<String>| -> Vec<Option<String>> {
        saved.iter().map(|(_, _, s)| f(s.machine)).collect()
    };
    let query = sqlx::query(
        "WITH saved AS (UPDATE subscriptions s SET machine = u.machine, state = u.state, \
             offer_id = u.offer_id, plan_id = u.plan_id, quantity = u.quantity, \
             beneficiary_tenant_id = u.beneficiary_tenant_id, \
             purchaser_tenant_id = u.purchaser_tenant_id, term_unit = u.term_unit, \
             charge_duration = u.charge_duration, private_offer_id = u.private_offer_id, \
             beneficiary = u.beneficiary, purchaser = u.purchaser, \
             allowed_customer_operations = CASE WHEN u.allowed IS NULL THEN NULL \
               ELSE ARRAY(SELECT jsonb_array_elements_text(u.allowed)) END, \
             version = u.version, updated_at = u.updated_at, state_since = u.state_since, \
             last_sequence = u.last_sequence \
           FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::text[], $5::text[], \
             $6::int4[], $7::uuid[], $8::uuid[], $9::text[], $10::text[], $11::text[], \
             $12::jsonb[], $13::jsonb[], $14::jsonb[], $15::int8[], $16::timestamptz[], \
             $17::timestamptz[], $18::int8[]) \
             AS u (id, machine, state, offer_id, plan_id, quantity, beneficiary_tenant_id, \
               purchaser_tenant_id, term_unit, charge_duration, private_offer_id, \
               beneficiary, purchaser, allowed, version, updated_at, state_since, \
               last_sequence) \
           WHERE s.id = u.id RETURNING 1), \
         counted AS (UPDATE subscriptions s SET last_sequence = u.last_sequence \
           FROM unnest($19::uuid[], $20::int8[]) AS u (id, last_sequence) \
           WHERE s.id = u.id RETURNING 1) \
         INSERT INTO subscription_events \
         (id, subscription_id, sequence, message_id, event_key, event_kind, event, from_state, \
          to_state, outcome, reason, effects, correlation_id, request_id, trace_id, recorded_at, \
          received_at, execution) \
         SELECT * FROM unnest($21::uuid[], $22::uuid[], $23::int8[], $24::text[], $25::text[], \
           $26::text[], $27::jsonb[], $28::text[], $29::text[], $30::text[], $31::text[], \
           $32::jsonb[], $33::text[], $34::text[], $35::text[], $36::timestamptz[], \
           $37::timestamptz[], $38::jsonb[])",
    )
    .bind(saved.iter().map(|(id, _, _)| *id).collect::<Vec<_>>())
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| Json(&*s.machine.machine))
            .collect::<Vec<_>>(),
    )
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.machine.state)
            .collect::<Vec<_>>(),
    )
    .bind(column(&|m| m.offer_id.clone()))
    .bind(column(&|m| m.plan_id.clone()))
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.machine.quantity)
            .collect::<Vec<_>>(),
    )
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.machine.beneficiary_tenant_id)
            .collect::<Vec<_>>(),
    )
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.machine.purchaser_tenant_id)
            .collect::<Vec<_>>(),
    )
    .bind(column(&|m| m.term_unit.clone()))
    .bind(column(&|m| m.charge_duration.clone()))
    .bind(column(&|m| m.private_offer_id.clone()))
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.machine.beneficiary.as_ref())
            .collect::<Vec<_>>(),
    )
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.machine.purchaser.as_ref())
            .collect::<Vec<_>>(),
    )
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| {
                s.machine
                    .allowed_customer_operations
                    .as_ref()
                    .map(|allowed| Value::from(allowed.clone()))
            })
            .collect::<Vec<_>>(),
    )
    .bind(saved.iter().map(|(_, _, s)| s.version).collect::<Vec<_>>())
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.updated_at)
            .collect::<Vec<_>>(),
    )
    .bind(
        saved
            .iter()
            .map(|(_, _, s)| s.state_since)
            .collect::<Vec<_>>(),
    )
    .bind(saved.iter().map(|(_, last, _)| *last).collect::<Vec<_>>())
    .bind(counted.iter().map(|(id, _)| *id).collect::<Vec<_>>())
    .bind(counted.iter().map(|(_, last)| *last).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.row.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.subscription_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.sequence).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.row.message_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.row.event_key.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.row.event_kind.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| Json(&*r.row.event)).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.row.from_state.unwrap_or(r.to_state))
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.to_state).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.row.outcome).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.row.reason.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| Json(&*r.row.effects))
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.row.correlation_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.row.request_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(
        rows.iter()
            .map(|r| r.row.trace_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.row.recorded_at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.row.received_at).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.row.execution.as_deref().map(Json))
            .collect::<Vec<_>>(),
    );
    query.execute(&mut *conn).await?;
    Ok(())
}
