//! The one transaction that applies an event to a subscription (design.md guarantees 2–4):
//! dedupe in the inbox, lock the subscription row, restore the machine, decide, append the
//! event log row, save the state and queue the effects in the outbox — all or nothing.
//! The caller acks its message only after this returns.

use fulfillment_state_machine::{
    Decision, Details, Effect, Event, NoticePolicy, Outcome, Policy, StateName, SubscriptionId,
    SubscriptionMachine, Term, notice,
};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::{StoreError, notices};

/// Where an event came from, for the inbox and the event log.
#[derive(Debug, Clone, Default)]
pub struct EventSource {
    /// The AMQP message id that carried the event (webhook operation id, command id).
    pub message_id: Option<String>,
    /// The inbox key `(message id, kind)`; a second event with the same key is a duplicate.
    /// `None` for events that are idempotent by themselves (effect results, observations).
    pub inbox_key: Option<(String, String)>,
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

/// What one `apply` did.
#[derive(Debug, Clone)]
pub enum ApplyOutcome {
    /// The inbox already held this message: nothing was decided or queued; the copy is
    /// recorded in the event log as ignored (a duplicate), so redeliveries stay visible.
    Duplicate,
    /// The machine decided; the decision, its log row and its outbox rows are committed.
    Decided(Applied),
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

/// The event log's next sequence for the subscription `$id` names, in an `UPDATE
/// subscriptions` that holds its row: the counter, or past the log's newest row if a writer
/// that does not keep the counter (a worker of the version before it, during a rolling
/// upgrade) appended since. An index probe on `(subscription_id, sequence)`.
macro_rules! next_sequence {
    ($id:literal) => {
        concat!(
            "GREATEST(last_sequence, (SELECT coalesce(max(e.sequence), 0) \
             FROM subscription_events e WHERE e.subscription_id = ",
            $id,
            ")) + 1"
        )
    };
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

/// Applies `event` to the subscription in one transaction; creates the subscription row on
/// first sight. Any worker may run the effects ([`Runs::Anywhere`]).
pub async fn apply(
    pool: &PgPool,
    subscription_id: SubscriptionId,
    event: &Event,
    source: &EventSource,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<ApplyOutcome, StoreError> {
    apply_to_run(
        pool,
        subscription_id,
        event,
        source,
        now,
        policy,
        Runs::Anywhere,
    )
    .await
}

/// As [`apply`], saying who runs the effects.
pub async fn apply_to_run(
    pool: &PgPool,
    subscription_id: SubscriptionId,
    event: &Event,
    source: &EventSource,
    now: OffsetDateTime,
    policy: &Policy,
    runs: Runs,
) -> Result<ApplyOutcome, StoreError> {
    let guarded = apply_guarded(
        pool,
        subscription_id,
        None,
        event,
        source,
        now,
        policy,
        runs,
    );
    match guarded.await? {
        Guarded::Applied(outcome) => Ok(outcome),
        Guarded::Changed { .. } => unreachable!("no guard, no refusal"),
    }
}

/// What our side looked like when an operator tool decided to feed an event: the
/// subscription's `version`, or `Absent` when we did not know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected {
    Absent,
    Version(i64),
}

/// What [`apply_if_unchanged`] did.
#[derive(Debug, Clone)]
pub enum Guarded {
    /// The subscription changed since it was read (another event was applied meanwhile):
    /// nothing was done. `current` is its version now (`None`: still unknown).
    Changed {
        current: Option<i64>,
    },
    Applied(ApplyOutcome),
}

/// As [`apply`], but only if the subscription is still as `expected` — checked under the
/// row lock, so the event can never overtake one applied after the caller looked (the
/// reconciler feeds observations this way and never races the worker).
pub async fn apply_if_unchanged(
    pool: &PgPool,
    subscription_id: SubscriptionId,
    expected: Expected,
    event: &Event,
    source: &EventSource,
    now: OffsetDateTime,
    policy: &Policy,
) -> Result<Guarded, StoreError> {
    apply_guarded(
        pool,
        subscription_id,
        Some(expected),
        event,
        source,
        now,
        policy,
        Runs::Anywhere,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn apply_guarded(
    pool: &PgPool,
    subscription_id: SubscriptionId,
    expected: Option<Expected>,
    event: &Event,
    source: &EventSource,
    now: OffsetDateTime,
    policy: &Policy,
    runs: Runs,
) -> Result<Guarded, StoreError> {
    let mut tx = pool.begin().await?;
    let id = subscription_id.as_uuid();
    if let Some(expected) = expected {
        let unchanged = match expected {
            // Creating the row ourselves is the check: it holds the row until commit.
            Expected::Absent => insert_fresh(&mut tx, subscription_id).await?,
            Expected::Version(version) => {
                let current: Option<i64> = sqlx::query_scalar(
                    "SELECT version FROM subscriptions WHERE id = $1 FOR UPDATE",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
                current == Some(version)
            }
        };
        if !unchanged {
            tx.rollback().await?;
            let current = sqlx::query_scalar("SELECT version FROM subscriptions WHERE id = $1")
                .bind(id)
                .fetch_optional(pool)
                .await?;
            return Ok(Guarded::Changed { current });
        }
    }
    if let Some((message_id, kind)) = &source.inbox_key {
        let fresh = sqlx::query(
            "INSERT INTO inbox (message_id, kind, subscription_id) VALUES ($1, $2, $3) \
             ON CONFLICT DO NOTHING",
        )
        .bind(message_id)
        .bind(kind)
        .bind(id)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !fresh {
            record_duplicate(
                &mut tx,
                subscription_id,
                event,
                source,
                (message_id, kind),
                now,
            )
            .await?;
            tx.commit().await?;
            crate::metrics::record_event(
                event.kind().as_str(),
                crate::metrics::EventOutcome::Duplicate,
            );
            return Ok(Guarded::Applied(ApplyOutcome::Duplicate));
        }
    }
    let applied = apply_in(&mut tx, subscription_id, event, source, now, policy, runs).await?;
    tx.commit().await?;
    record_applied(event, &applied);
    Ok(Guarded::Applied(ApplyOutcome::Decided(applied)))
}

/// Counts a decision in the metrics once its transaction committed.
pub fn record_applied(event: &Event, applied: &Applied) {
    crate::metrics::record_decision(event.kind(), &applied.decision);
}

/// As [`apply`] for an event without an inbox key, inside the caller's transaction (an
/// effect's result, committed together with its outbox row's new status): locks (or
/// creates) the subscription, lets the machine decide, appends the event-log row, saves the
/// state and queues the effects; the caller commits, then counts the decision
/// ([`record_applied`]).
pub async fn apply_in(
    conn: &mut PgConnection,
    subscription_id: SubscriptionId,
    event: &Event,
    source: &EventSource,
    now: OffsetDateTime,
    policy: &Policy,
    runs: Runs,
) -> Result<Applied, StoreError> {
    let id = subscription_id.as_uuid();
    let mut machine = lock_or_create(conn, subscription_id).await?;
    let notices_before = NoticeInputs::of(&machine);
    let decision = machine.handle(event, now, policy);
    let event_id = Uuid::now_v7();
    let (outcome, reason) = outcome_columns(&decision.outcome);
    let details = machine.details();
    let term = details.term.as_ref();
    // Save the machine, take the next sequence and append the event-log row: one statement.
    let sequence: i64 = sqlx::query_scalar(concat!(
        "WITH saved AS ( \
             UPDATE subscriptions SET machine = $2, state = $3, offer_id = $4, plan_id = $5, \
               quantity = $6, beneficiary_tenant_id = $7, purchaser_tenant_id = $8, \
               term_unit = $23, charge_duration = $24, private_offer_id = $25, \
               beneficiary = $26, purchaser = $27, allowed_customer_operations = $28, \
               version = version + 1, updated_at = $9, \
               state_since = CASE WHEN state IS DISTINCT FROM $3 OR state_since IS NULL \
                 THEN $9 ELSE state_since END, \
               last_sequence = ",
        next_sequence!("$1"),
        " WHERE id = $1 RETURNING last_sequence) \
         INSERT INTO subscription_events \
         (id, subscription_id, sequence, message_id, event_key, event_kind, event, from_state, \
          to_state, outcome, reason, effects, correlation_id, request_id, trace_id, recorded_at, \
          received_at) \
         SELECT $10, $1, saved.last_sequence, $11, $12, $13, $14, $15, $3, $16, $17, $18, $19, \
                $20, $21, $9, $22 FROM saved \
         RETURNING sequence",
    ))
    .bind(id)
    .bind(to_json(&machine))
    .bind(machine.state().as_str())
    .bind(details.offer_id.as_ref().map(|o| o.as_str().to_string()))
    .bind(details.plan_id.as_ref().map(|p| p.as_str().to_string()))
    .bind(
        details
            .quantity
            .map(|q| i32::try_from(q.get()).unwrap_or(i32::MAX)),
    )
    .bind(details.beneficiary_tenant.map(|t| t.as_uuid()))
    .bind(details.purchaser_tenant.map(|t| t.as_uuid()))
    .bind(now)
    .bind(event_id)
    .bind(&source.message_id)
    .bind(event.key())
    .bind(event.kind().as_str())
    .bind(to_json(event))
    .bind(decision.from.as_str())
    .bind(outcome)
    .bind(reason)
    .bind(to_json(&decision.effects))
    .bind(&source.correlation_id)
    .bind(&source.request_id)
    .bind(&source.trace_id)
    .bind(source.received_at)
    .bind(term.and_then(|t| t.unit.as_deref()))
    .bind(term.and_then(|t| t.charge_duration.as_deref()))
    .bind(details.private_offer_id.as_deref())
    .bind(details.beneficiary.as_ref().map(to_json))
    .bind(details.purchaser.as_ref().map(to_json))
    .bind(
        details
            .allowed_operations
            .as_ref()
            .map(|allowed| allowed.as_slice().to_vec()),
    )
    .fetch_one(&mut *conn)
    .await?;
    if NoticeInputs::of(&machine) != notices_before {
        reschedule_notices(conn, id, &machine, now, &policy.notices, event_id).await?;
    }
    // A decision that answers Microsoft puts the subscription's pending rows first (P7):
    // the ACK waits behind them, so they all go before other subscriptions' rows. Rows a
    // runner holds right now are skipped; they are running already.
    let acknowledges = decision
        .effects
        .iter()
        .any(|effect| matches!(effect, Effect::AckOperation { .. }));
    if acknowledges {
        sqlx::query(
            "UPDATE outbox SET priority = 0 WHERE id IN ( \
                 SELECT id FROM outbox WHERE subscription_id = $1 AND status = 'pending' \
                   AND priority <> 0 FOR UPDATE SKIP LOCKED)",
        )
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    let outbox_ids: Vec<Uuid> = decision.effects.iter().map(|_| Uuid::now_v7()).collect();
    if !outbox_ids.is_empty() {
        let kinds: Vec<&str> = decision.effects.iter().map(Effect::kind_str).collect();
        let effects: Vec<Value> = decision.effects.iter().map(to_json).collect();
        sqlx::query(
            "INSERT INTO outbox (id, subscription_id, event_id, event_sequence, kind, effect, \
             correlation_id, next_attempt_at, created_at, updated_at, traceparent, priority) \
             SELECT effect.id, $1, $2, $3, effect.kind, effect.body, $4, $5, $5, $5, $6, $7 \
             FROM unnest($8::uuid[], $9::text[], $10::jsonb[]) AS effect (id, kind, body)",
        )
        .bind(id)
        .bind(event_id)
        .bind(sequence)
        .bind(&source.correlation_id)
        .bind(now)
        .bind(&source.traceparent)
        .bind(if acknowledges { 0_i16 } else { 1 })
        .bind(&outbox_ids)
        .bind(&kinds)
        .bind(&effects)
        .execute(&mut *conn)
        .await?;
    }
    if !outbox_ids.is_empty() && runs == Runs::Anywhere {
        // A wake-up hint for outbox runners, delivered on commit; they also poll.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(super::outbox::NOTIFY_CHANNEL)
            .bind(id.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok(Applied {
        subscription_id: id,
        event_id,
        sequence,
        decision,
        outbox_ids,
    })
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

/// Emits the notice `notice_id` if it is still pending: under its subscription's row lock
/// (a decision that cancels it cannot cross), appends an event-log row that publishes its
/// domain event, queues that effect in the outbox and marks the notice sent, all in one
/// transaction. The event-log row's id, or `None` when the notice was cancelled or sent
/// meanwhile.
pub async fn emit_notice(
    pool: &PgPool,
    subscription_id: Uuid,
    notice_id: Uuid,
    now: OffsetDateTime,
) -> Result<Option<Uuid>, StoreError> {
    let mut tx = pool.begin().await?;
    let machine: Option<Value> =
        sqlx::query_scalar("SELECT machine FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(subscription_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some(machine) = machine.map(restore).transpose()? else {
        return Ok(None);
    };
    let Some(row) = notices::lock_pending(&mut tx, notice_id).await? else {
        return Ok(None);
    };
    let event_id = Uuid::now_v7();
    let Some(notice) = row.notice() else {
        // A kind only a newer version knows: left for it, never guessed.
        return Ok(None);
    };
    let effects = vec![notice.effect(machine.state(), machine.details())];
    let sequence: i64 = sqlx::query_scalar(concat!(
        "WITH bumped AS ( \
             UPDATE subscriptions SET last_sequence = ",
        next_sequence!("$2"),
        " WHERE id = $2 RETURNING state, last_sequence) \
         INSERT INTO subscription_events \
         (id, subscription_id, sequence, message_id, event_key, event_kind, event, from_state, \
          to_state, outcome, reason, effects, recorded_at) \
         SELECT $1, $2, bumped.last_sequence, $3, $3, $4, $5, bumped.state, bumped.state, \
                'applied', $6, $7, $8 FROM bumped \
         RETURNING sequence",
    ))
    .bind(event_id)
    .bind(subscription_id)
    .bind(format!("notice:{}", notice.key))
    .bind(format!("notice:{}", notice.kind.as_str()))
    .bind(to_json(&notice))
    .bind(&notice.reason)
    .bind(to_json(&effects))
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let outbox_id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO outbox (id, subscription_id, event_id, event_sequence, kind, effect, \
         next_attempt_at, created_at, updated_at, priority) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $7, 1)",
    )
    .bind(outbox_id)
    .bind(subscription_id)
    .bind(event_id)
    .bind(sequence)
    .bind(effects[0].kind_str())
    .bind(to_json(&effects[0]))
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(super::outbox::NOTIFY_CHANNEL)
        .bind(subscription_id.to_string())
        .execute(&mut *tx)
        .await?;
    notices::mark_sent(&mut tx, notice_id, event_id, now).await?;
    tx.commit().await?;
    Ok(Some(event_id))
}

/// Appends an `ignored` row for a message the inbox has seen: the machine is not asked,
/// nothing is queued. Skipped when the subscription row does not exist (the inbox key
/// belongs to another subscription).
async fn record_duplicate(
    tx: &mut Transaction<'static, Postgres>,
    subscription_id: SubscriptionId,
    event: &Event,
    source: &EventSource,
    (message_id, kind): (&str, &str),
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let id = subscription_id.as_uuid();
    // No row, no log: the insert selects from the bumped counter.
    sqlx::query(concat!(
        "WITH bumped AS ( \
             UPDATE subscriptions SET last_sequence = ",
        next_sequence!("$2"),
        " WHERE id = $2 RETURNING state, last_sequence) \
         INSERT INTO subscription_events \
         (id, subscription_id, sequence, message_id, event_key, event_kind, event, from_state, \
          to_state, outcome, reason, correlation_id, request_id, trace_id, recorded_at, \
          received_at) \
         SELECT $1, $2, bumped.last_sequence, $3, $4, $5, $6, bumped.state, bumped.state, \
                'ignored', $7, $8, $9, $10, $11, $12 FROM bumped",
    ))
    .bind(Uuid::now_v7())
    .bind(id)
    .bind(&source.message_id)
    .bind(event.key())
    .bind(event.kind().as_str())
    .bind(to_json(event))
    .bind(format!(
        "duplicate event: message {message_id} ({kind}) was handled before (inbox)"
    ))
    .bind(&source.correlation_id)
    .bind(&source.request_id)
    .bind(&source.trace_id)
    .bind(now)
    .bind(source.received_at)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The machine of a subscription, if we know it (no lock; for reads).
pub async fn load(
    pool: &PgPool,
    subscription_id: SubscriptionId,
) -> Result<Option<SubscriptionMachine>, StoreError> {
    let machine: Option<Value> =
        sqlx::query_scalar("SELECT machine FROM subscriptions WHERE id = $1")
            .bind(subscription_id.as_uuid())
            .fetch_optional(pool)
            .await?;
    machine.map(restore).transpose()
}

async fn lock_or_create(
    conn: &mut PgConnection,
    subscription_id: SubscriptionId,
) -> Result<SubscriptionMachine, StoreError> {
    let id = subscription_id.as_uuid();
    let lock = || {
        sqlx::query_scalar::<_, Value>("SELECT machine FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(id)
    };
    // Known (the common case): one statement.
    if let Some(machine) = lock().fetch_optional(&mut *conn).await? {
        return restore(machine);
    }
    // Two workers meeting a new subscription at once: the insert of one waits for the other's
    // commit, then does nothing, and both go on to the same row lock.
    insert_fresh(conn, subscription_id).await?;
    restore(lock().fetch_one(&mut *conn).await?)
}

/// Inserts a new machine's row unless one exists; true when this call created it.
async fn insert_fresh(
    conn: &mut PgConnection,
    subscription_id: SubscriptionId,
) -> Result<bool, StoreError> {
    let fresh = SubscriptionMachine::new(subscription_id);
    let created = sqlx::query(
        "INSERT INTO subscriptions (id, state, machine) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
    )
    .bind(subscription_id.as_uuid())
    .bind(fresh.state().as_str())
    .bind(to_json(&fresh))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(created == 1)
}

fn restore(machine: Value) -> Result<SubscriptionMachine, StoreError> {
    serde_json::from_value(machine).map_err(StoreError::CorruptMachine)
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("machine types always serialize to JSON")
}

fn outcome_columns(outcome: &Outcome) -> (&'static str, String) {
    match outcome {
        Outcome::Applied { reason } => ("applied", reason.clone()),
        Outcome::Rejected { reason } => ("rejected", reason.clone()),
        Outcome::Ignored { reason } => ("ignored", reason.to_string()),
    }
}

/// One effect execution for the event log (`outcome = 'recorded'`): the calls made, their
/// request and correlation ids, statuses and Microsoft's body on failure.
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

/// Appends an effect execution to the subscription's event log without deciding anything:
/// from and to state are the current state. Takes the subscription row lock for the
/// sequence number. `None` when we do not know the subscription.
pub async fn record_effect_result(
    pool: &PgPool,
    subscription_id: Uuid,
    record: &EffectRecord,
    now: OffsetDateTime,
) -> Result<Option<Uuid>, StoreError> {
    let mut tx = pool.begin().await?;
    let recorded = record_effect_result_in(&mut tx, subscription_id, record, now).await?;
    tx.commit().await?;
    Ok(recorded)
}

/// As [`record_effect_result`], inside the caller's transaction.
pub async fn record_effect_result_in(
    conn: &mut PgConnection,
    subscription_id: Uuid,
    record: &EffectRecord,
    now: OffsetDateTime,
) -> Result<Option<Uuid>, StoreError> {
    let event_id = Uuid::now_v7();
    let appended = sqlx::query(concat!(
        "WITH bumped AS ( \
             UPDATE subscriptions SET last_sequence = ",
        next_sequence!("$2"),
        " WHERE id = $2 RETURNING state, last_sequence) \
         INSERT INTO subscription_events \
         (id, subscription_id, sequence, event_key, event_kind, event, from_state, to_state, \
          outcome, reason, correlation_id, request_id, recorded_at) \
         SELECT $1, $2, bumped.last_sequence, $3, $4, $5, bumped.state, bumped.state, \
                'recorded', $6, $7, $8, $9 FROM bumped",
    ))
    .bind(event_id)
    .bind(subscription_id)
    .bind(&record.event_key)
    .bind(&record.event_kind)
    .bind(&record.details)
    .bind(&record.reason)
    .bind(&record.correlation_id)
    .bind(&record.request_id)
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if appended == 0 {
        return Ok(None);
    }
    Ok(Some(event_id))
}
