//! The one apply path (design.md guarantees 2–4): every event the machine decides on — a
//! queue message in the consumer, an effect's result in the effect runner, an observation
//! of the reconciler — goes through [`apply_in`], in one transaction: record the inbox
//! key, lock (or create) the subscription, ask the machine, append the event-log row with
//! the saved machine, reschedule the notices its plan changed, queue the effects in the
//! outbox. All or nothing; a message is acked only after it committed. Metrics count what
//! committed ([`count`]). The store only runs the statements.
//!
//! Event-log rows that decide nothing — an effect execution, a drift the reconciler saw —
//! are [`record`]ed through the same append.

use fulfillment_state_machine::{
    Decision, Details, Effect, Event, NoticePolicy, Outcome, Policy, StateName, SubscriptionId,
    SubscriptionMachine, Term, notice,
};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::metrics::{self, EventOutcome};
use crate::queue::InboxKey;
use crate::store::inbox::{self, Recorded};
use crate::store::ledger::{self, LogOutcome, LogRow};
use crate::store::outbox::{self, EffectKind, NewRows};
use crate::store::subscriptions::{self, SavedMachine};
use crate::store::{StoreError, notices};
use crate::worker::protocol::acknowledge;

/// Where an event came from, for the inbox and the event log.
#[derive(Debug, Clone, Default)]
pub struct EventSource {
    /// The AMQP message id that carried the event (webhook operation id, command id).
    pub message_id: Option<String>,
    /// A second event with the same key is a duplicate. `None` for events that are
    /// idempotent by themselves (effect results, observations).
    pub inbox_key: Option<InboxKey>,
    pub correlation_id: Option<String>,
    pub request_id: Option<String>,
    pub trace_id: Option<String>,
    /// W3C trace context of the span that applies the event; stored on the outbox rows so
    /// their execution continues the trace.
    pub traceparent: Option<String>,
    /// When the message reached us (a webhook's receipt at the ingress): the event log
    /// shows how much of Microsoft's 10-second ACK window (P7) was left.
    pub received_at: Option<OffsetDateTime>,
}

/// What our side looked like when a caller decided to feed an event: the subscription's
/// `version`, or `Absent` when we did not know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Absent,
    Version(i64),
}

/// Who executes the outbox rows a decision queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runs {
    /// Any worker: a `NOTIFY` on commit wakes the outbox runners of every process.
    Anywhere,
    /// The caller, right after the commit (the worker's fast path, and an effect whose
    /// result queues more rows for the same runner): no `NOTIFY`. PostgreSQL serializes
    /// the commits of notifying transactions on a cluster-wide lock held until the commit
    /// is durable, so they cannot share a WAL flush; measured with pgbench on this machine
    /// (8 clients, INSERT + COMMIT), adding `pg_notify` halves the commits per second.
    Here,
}

/// One event to apply to one subscription.
#[derive(Debug, Clone, Copy)]
pub struct Apply<'a> {
    pub subscription_id: SubscriptionId,
    pub event: &'a Event,
    pub source: &'a EventSource,
    pub now: OffsetDateTime,
    /// Only if the subscription is still as expected — checked under the row lock, so the
    /// event can never overtake one applied after the caller looked (the reconciler feeds
    /// observations this way and never races the worker). `None`: unconditionally.
    pub expected: Option<Expected>,
    pub runs: Runs,
}

impl<'a> Apply<'a> {
    /// `event` for the subscription, unconditionally, its effects run by any worker.
    pub fn new(
        subscription_id: SubscriptionId,
        event: &'a Event,
        source: &'a EventSource,
        now: OffsetDateTime,
    ) -> Self {
        Self {
            subscription_id,
            event,
            source,
            now,
            expected: None,
            runs: Runs::Anywhere,
        }
    }

    /// Only if the subscription is still as `expected`.
    pub fn if_unchanged(mut self, expected: Expected) -> Self {
        self.expected = Some(expected);
        self
    }

    /// Who runs the effects.
    pub fn run_by(mut self, runs: Runs) -> Self {
        self.runs = runs;
        self
    }
}

/// What one apply did.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    /// The inbox already held this message: nothing was decided or queued; the copy is
    /// recorded in the event log as ignored (a duplicate), so redeliveries stay visible.
    Duplicate,
    /// The machine decided; the decision, its log row and its outbox rows are committed.
    Decided(Applied),
    /// Only for an [`Apply::expected`]: the subscription changed since the caller looked;
    /// nothing was done. `current` is its version now (`None`: still unknown).
    Changed { current: Option<i64> },
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub subscription_id: Uuid,
    /// The event-log row (also the CloudEvents id of domain events it produced).
    pub event_id: Uuid,
    pub sequence: i64,
    pub decision: Decision,
    /// The outbox rows, one per effect, in the machine's order.
    pub outbox_ids: Vec<Uuid>,
}

/// Applies `command` in a transaction of its own and counts it once committed.
pub async fn apply(
    pool: &PgPool,
    policy: &Policy,
    command: &Apply<'_>,
) -> Result<ApplyOutcome, StoreError> {
    let mut tx = pool.begin().await?;
    let outcome = apply_in(&mut tx, policy, command).await?;
    if matches!(outcome, ApplyOutcome::Changed { .. }) {
        tx.rollback().await?;
    } else {
        tx.commit().await?;
    }
    count(command.event, &outcome);
    Ok(outcome)
}

/// Applies `command` in the caller's transaction (an effect's result is committed with its
/// outbox row's end); the caller commits, then [`count`]s.
pub async fn apply_in(
    conn: &mut PgConnection,
    policy: &Policy,
    command: &Apply<'_>,
) -> Result<ApplyOutcome, StoreError> {
    let Apply {
        subscription_id,
        event,
        source,
        now,
        expected,
        runs,
    } = *command;
    let id = subscription_id.as_uuid();
    if let Some(expected) = expected {
        let current = match expected {
            // Creating the row ourselves is the check: it holds the row until commit.
            Expected::Absent => {
                if subscriptions::insert_new(conn, &SubscriptionMachine::new(subscription_id))
                    .await?
                {
                    None
                } else {
                    Some(subscriptions::lock_version(conn, id).await?)
                }
            }
            Expected::Version(version) => Some(subscriptions::lock_version(conn, id).await?)
                .filter(|current| *current != Some(version)),
        };
        if let Some(current) = current {
            return Ok(ApplyOutcome::Changed { current });
        }
    }
    let locked = match &source.inbox_key {
        Some(key) => match inbox::record_and_lock(conn, key, id).await? {
            Recorded::Duplicate => {
                // Skipped when we do not know the subscription (the key belongs to another one).
                let reason = format!("duplicate event: message {key} was handled before (inbox)");
                let row = log_row(event, source, LogOutcome::Ignored, reason, now);
                ledger::append(conn, id, None, &row).await?;
                return Ok(ApplyOutcome::Duplicate);
            }
            Recorded::Fresh(machine) => machine,
        },
        None => subscriptions::lock_machine(conn, id).await?,
    };
    let mut machine = match locked {
        Some(machine) => machine,
        None => create_and_lock(conn, subscription_id).await?,
    };
    let notices_before = NoticeInputs::of(&machine);
    let decision = machine.handle(event, now, policy);
    let (outcome, reason) = outcome_columns(&decision.outcome);
    let mut row = log_row(event, source, outcome, reason, now);
    row.from_state = Some(decision.from.as_str());
    row.effects = to_json(&decision.effects);
    let event_id = row.id;
    let sequence = ledger::append(conn, id, Some(&SavedMachine::of(&machine)), &row)
        .await?
        .ok_or(StoreError::Query(sqlx::Error::RowNotFound))?;
    if NoticeInputs::of(&machine) != notices_before {
        reschedule_notices(conn, id, &machine, now, &policy.notices, event_id).await?;
    }
    // A decision that answers Microsoft puts the subscription's pending rows first (P7):
    // the ACK waits behind them, so they all go before other subscriptions' rows.
    let acknowledges = decision
        .effects
        .iter()
        .any(|effect| matches!(effect, Effect::AckOperation { .. }));
    if acknowledges {
        outbox::put_first(conn, id).await?;
    }
    let outbox_ids: Vec<Uuid> = decision.effects.iter().map(|_| Uuid::now_v7()).collect();
    if !outbox_ids.is_empty() {
        let kinds: Vec<EffectKind> = decision.effects.iter().map(EffectKind::of).collect();
        let effects: Vec<Value> = decision.effects.iter().map(to_json).collect();
        let rows = NewRows {
            subscription_id: id,
            event_id,
            event_sequence: sequence,
            correlation_id: source.correlation_id.as_deref(),
            traceparent: source.traceparent.as_deref(),
            first: acknowledges,
            // Microsoft's clock starts at the webhook's receipt (P7); a decision without
            // one (none today) counts from now.
            ack_due_at: acknowledges
                .then(|| source.received_at.unwrap_or(now) + acknowledge::ACK_WINDOW),
            now,
            ids: &outbox_ids,
            kinds: &kinds,
            effects: &effects,
        };
        outbox::enqueue(conn, &rows).await?;
        // One wake-up per transaction however many decisions it holds (a constant payload
        // folds them); none when the caller runs the rows itself.
        if runs == Runs::Anywhere {
            outbox::notify_runners(conn).await?;
        }
    }
    Ok(ApplyOutcome::Decided(Applied {
        subscription_id: id,
        event_id,
        sequence,
        decision,
        outbox_ids,
    }))
}

/// Counts an apply in the metrics, once its transaction committed.
pub fn count(event: &Event, outcome: &ApplyOutcome) {
    match outcome {
        ApplyOutcome::Duplicate => {
            metrics::record_event(event.kind().as_str(), EventOutcome::Duplicate);
        }
        ApplyOutcome::Decided(applied) => metrics::record_decision(event.kind(), &applied.decision),
        ApplyOutcome::Changed { .. } => {}
    }
}

/// A fresh machine for a subscription met for the first time, its new row locked.
async fn create_and_lock(
    conn: &mut PgConnection,
    subscription_id: SubscriptionId,
) -> Result<SubscriptionMachine, StoreError> {
    // Two workers meeting a new subscription at once: the insert of one waits for the
    // other's commit, then does nothing, and both go on to the same row lock.
    subscriptions::insert_new(conn, &SubscriptionMachine::new(subscription_id)).await?;
    subscriptions::lock_machine(conn, subscription_id.as_uuid())
        .await?
        .ok_or(StoreError::Query(sqlx::Error::RowNotFound))
}

/// The event-log row of `event` from `source`, deciding nothing yet.
fn log_row(
    event: &Event,
    source: &EventSource,
    outcome: LogOutcome,
    reason: String,
    now: OffsetDateTime,
) -> LogRow {
    LogRow {
        id: Uuid::now_v7(),
        message_id: source.message_id.clone(),
        event_key: event.key(),
        event_kind: event.kind().as_str().to_string(),
        event: to_json(event),
        from_state: None,
        outcome,
        reason,
        effects: Value::Array(Vec::new()),
        correlation_id: source.correlation_id.clone(),
        request_id: source.request_id.clone(),
        trace_id: source.trace_id.clone(),
        recorded_at: now,
        received_at: source.received_at,
    }
}

fn outcome_columns(outcome: &Outcome) -> (LogOutcome, String) {
    match outcome {
        Outcome::Applied { reason } => (LogOutcome::Applied, reason.clone()),
        Outcome::Rejected { reason } => (LogOutcome::Rejected, reason.clone()),
        Outcome::Ignored { reason } => (LogOutcome::Ignored, reason.to_string()),
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("machine types always serialize to JSON")
}

/// What the notices a subscription is owed depend on: a decision that changes none of it
/// leaves the schedule alone (and costs no query).
#[derive(Debug, PartialEq)]
struct NoticeInputs {
    state: StateName,
    known: bool,
    term: Option<Term>,
}

impl NoticeInputs {
    fn of(machine: &SubscriptionMachine) -> Self {
        let details: &Details = machine.details();
        Self {
            state: machine.state(),
            known: details.is_known(),
            term: details.term.clone(),
        }
    }
}

/// Brings the stored notice schedule to the machine's plan, in the decision's transaction:
/// pending notices no longer owed are cancelled, new ones scheduled (a moved notice is
/// both).
async fn reschedule_notices(
    conn: &mut PgConnection,
    id: Uuid,
    machine: &SubscriptionMachine,
    now: OffsetDateTime,
    policy: &NoticePolicy,
    event_id: Uuid,
) -> Result<(), StoreError> {
    let since = notices::state_since(conn, id).await?.unwrap_or(now);
    let owed = notice::plan(machine.state(), since, machine.details(), now, policy);
    let pending = notices::pending_keys(conn, id).await?;
    let changes = notice::changes(&pending, &owed);
    if !changes.cancel.is_empty() {
        notices::cancel(conn, id, &changes.cancel, event_id, now).await?;
    }
    if !changes.schedule.is_empty() {
        notices::schedule(conn, id, &changes.schedule, event_id, now).await?;
    }
    Ok(())
}

/// An event-log row that decides nothing (`outcome = 'recorded'`): an effect execution with
/// its calls (request and correlation ids, statuses, Microsoft's body on failure), or an
/// operator tool's note.
#[derive(Debug, Clone)]
pub struct EffectRecord {
    /// e.g. `effect:ack_operation`.
    pub event_kind: String,
    /// Unique per execution, e.g. `effect:{outbox id}:{attempt}`.
    pub event_key: String,
    /// The effect, the calls and any measurements, as JSON.
    pub details: Value,
    /// A one-line summary.
    pub reason: String,
    pub correlation_id: Option<String>,
    /// The `x-ms-requestid` of the last call.
    pub request_id: Option<String>,
}

/// Appends `record` to the subscription's event log in a transaction of its own; from and
/// to state are the current state. `None` when we do not know the subscription.
pub async fn record(
    pool: &PgPool,
    subscription_id: Uuid,
    record: &EffectRecord,
    now: OffsetDateTime,
) -> Result<Option<Uuid>, StoreError> {
    let mut conn = pool.acquire().await?;
    record_in(&mut conn, subscription_id, record, now).await
}

/// As [`record`], inside the caller's transaction.
pub async fn record_in(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    record: &EffectRecord,
    now: OffsetDateTime,
) -> Result<Option<Uuid>, StoreError> {
    let row = LogRow {
        id: Uuid::now_v7(),
        message_id: None,
        event_key: record.event_key.clone(),
        event_kind: record.event_kind.clone(),
        event: record.details.clone(),
        from_state: None,
        outcome: LogOutcome::Recorded,
        reason: record.reason.clone(),
        effects: Value::Array(Vec::new()),
        correlation_id: record.correlation_id.clone(),
        request_id: record.request_id.clone(),
        trace_id: None,
        recorded_at: now,
        received_at: None,
    };
    let appended = ledger::append(conn, subscription_id, None, &row).await?;
    Ok(appended.map(|_| row.id))
}
