//! The one apply path (design.md guarantees 2–4): every event the machine decides on — a
//! queue message in the consumer, an effect's result in the effect runner, an observation
//! of the reconciler — goes through [`apply_many`] (alone: [`apply_in`]), in one
//! transaction: record the inbox key, lock (or create) the subscription, ask the machine,
//! append the event-log row with the saved machine, reschedule the notices its plan
//! changed, queue the effects in the outbox. A window of messages of different
//! subscriptions (the consumer's) takes one statement per table for them all. All or
//! nothing; a message is acked only after it committed. Metrics count what committed
//! ([`count`]). The store only runs the statements.
//!
//! Event-log rows that decide nothing — an effect execution, a drift the reconciler saw —
//! are [`record`]ed through the event log's own append.

use fulfillment_state_machine::{
    Decision, Details, Effect, Event, NoticePolicy, Outcome, Policy, StateName, SubscriptionId,
    SubscriptionMachine, Term, notice,
};
use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::metrics::{self, EventOutcome};
use crate::queue::InboxKey;
use crate::store::inbox;
use crate::store::ledger::{self, LogOutcome, LogRow};
use crate::store::outbox::{self, EffectKind};
use crate::store::subscriptions::{self, LockedRow, SavedMachine};
use crate::store::{self, StoreError, notices};
use crate::worker::protocol::{acknowledge, publish};

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
    /// The effect execution whose call produced `event`, recorded in the event's row
    /// instead of a row of its own (see [`Apply::recorded_with`]).
    pub execution: Option<&'a EffectRecord>,
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
            execution: None,
        }
    }

    /// With the record of the execution whose call produced the event, written in the
    /// event's row (its `execution` column) instead of an `effect:*` row of its own: one
    /// row for a GET and the observation it fed, or an ACK and the operation's end.
    pub fn recorded_with(mut self, record: &'a EffectRecord) -> Self {
        self.execution = Some(record);
        self
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
    let mut tx = store::begin_hot_path(pool).await?;
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
/// outbox row's end); the caller commits, then [`count`]s. The one-command case of
/// [`apply_many`].
pub async fn apply_in(
    conn: &mut PgConnection,
    policy: &Policy,
    command: &Apply<'_>,
) -> Result<ApplyOutcome, StoreError> {
    let mut outcomes = apply_many(conn, policy, std::slice::from_ref(command)).await?;
    Ok(outcomes.pop().expect("apply_many answers once per command"))
}

/// Applies `commands` in the caller's transaction, in their order, as [`apply_in`] would
/// one after the other — the outcomes, rows and sequences are the same — but with one
/// statement per table for them all (issue #17: a consumer's window of messages of
/// different subscriptions is one transaction of a handful of statements, not a handful
/// per message):
///
/// 1. the inbox keys are recorded, then the subscriptions' rows locked (in id order, so two
///    windows wait for each other instead of deadlocking) and read;
/// 2. the machines decide in memory, in order (several commands for one subscription
///    follow each other; its sequences increase), which tells the subscriptions to create;
///    they are created in one statement (one another transaction created at once is
///    locked, and the window decided again; when that lock could deadlock because another
///    transaction holds the row, [`StoreError::Contended`]: the caller rolls back and
///    tries again);
/// 3. every event-log row and every subscription's saved machine and counter: one
///    statement; notices where their inputs changed; every outbox row, after the pending
///    rows of acknowledging subscriptions went first: one statement; `NOTIFY` once.
///
/// The caller commits, then [`count`]s each outcome.
pub async fn apply_many(
    conn: &mut PgConnection,
    policy: &Policy,
    commands: &[Apply<'_>],
) -> Result<Vec<ApplyOutcome>, StoreError> {
    let entries: Vec<Entry<'_>> = commands.iter().copied().map(Entry::Apply).collect();
    Ok(write_many(conn, policy, &entries)
        .await?
        .into_iter()
        .filter_map(|outcome| match outcome {
            EntryOutcome::Applied(outcome) => Some(outcome),
            EntryOutcome::Recorded(_) => None,
        })
        .collect())
}

/// One entry of [`write_many`]: an event to apply, or an event-log row that decides nothing
/// (as [`record_in`]).
#[derive(Debug, Clone, Copy)]
pub enum Entry<'a> {
    Apply(Apply<'a>),
    Record {
        subscription_id: Uuid,
        record: &'a EffectRecord,
        now: OffsetDateTime,
    },
}

/// What an [`Entry`] did.
#[derive(Debug, Clone)]
pub enum EntryOutcome {
    Applied(ApplyOutcome),
    /// The event-log row's id; `None` when we do not know the subscription.
    Recorded(Option<Uuid>),
}

/// [`apply_many`] with event-log rows that decide nothing among the commands (the effect
/// runner's results: each execution's record, then the events it feeds back), in their
/// order, in the same statements.
pub async fn write_many(
    conn: &mut PgConnection,
    policy: &Policy,
    entries: &[Entry<'_>],
) -> Result<Vec<EntryOutcome>, StoreError> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let mut keys: Vec<(&InboxKey, Uuid)> = entries
        .iter()
        .filter_map(|entry| match entry {
            Entry::Apply(c) => Some((c.source.inbox_key.as_ref()?, c.subscription_id.as_uuid())),
            Entry::Record { .. } => None,
        })
        .collect();
    keys.sort_by(|(a, _), (b, _)| (a.message_id(), a.kind()).cmp(&(b.message_id(), b.kind())));
    keys.dedup_by(|(a, _), (b, _)| a == b);
    let mut ids: Vec<Uuid> = entries
        .iter()
        .map(|entry| match entry {
            Entry::Apply(c) => c.subscription_id.as_uuid(),
            Entry::Record {
                subscription_id, ..
            } => *subscription_id,
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let recorded = inbox::record_and_lock_many(conn, &keys, &ids).await?;
    let fresh: HashSet<&InboxKey> = keys
        .iter()
        .zip(&recorded.fresh)
        .filter(|(_, fresh)| **fresh)
        .map(|((key, _), _)| *key)
        .collect();
    let mut rows: HashMap<Uuid, LockedRow> = recorded
        .locked
        .into_iter()
        .map(|row| (row.id, row))
        .collect();
    let mut created: HashMap<Uuid, LockedRow> = HashMap::new();
    let plan = loop {
        let plan = Plan::of(entries, policy, &rows, &created, &fresh);
        let missing: Vec<SubscriptionMachine> = plan
            .to_create
            .iter()
            .filter(|id| !created.contains_key(id))
            .map(|id| SubscriptionMachine::new(SubscriptionId::from(*id)))
            .collect();
        if missing.is_empty() {
            break plan;
        }
        // Two transactions meeting a new subscription at once: the insert of one waits for
        // the other's commit, then skips the row, which this one then locks as it is.
        let new = subscriptions::insert_many_new(conn, &missing).await?;
        // Every row inserted as the plan expected it: the plan stands.
        let as_planned =
            new.len() == missing.len() && new.iter().all(|row| *row == new_row(row.id));
        created.extend(new.into_iter().map(|row| (row.id, row)));
        if as_planned {
            break plan;
        }
        let raced: Vec<Uuid> = missing
            .iter()
            .map(|machine| machine.subscription_id().as_uuid())
            .filter(|id| !created.contains_key(id))
            .collect();
        if !raced.is_empty() {
            // Created by another transaction after the first statement's snapshot. Waiting
            // for them after the rows held keeps the id order only when they all come
            // later; otherwise a transaction that saw them may hold one while it waits for
            // one of ours (a deadlock), so they are taken without waiting, or the caller
            // rolls back and tries again.
            let held = rows.keys().chain(created.keys()).max().copied();
            let in_order = raced.iter().all(|id| held.is_none_or(|held| *id > held));
            let locked = if in_order {
                subscriptions::lock_many(conn, &raced).await?
            } else {
                subscriptions::try_lock_many(conn, &raced)
                    .await?
                    .ok_or_else(|| StoreError::Contended {
                        subscriptions: raced.clone(),
                    })?
            };
            if locked.len() != raced.len() {
                return Err(StoreError::Query(sqlx::Error::RowNotFound));
            }
            rows.extend(locked.into_iter().map(|row| (row.id, row)));
        }
    };
    plan.write(conn, policy).await
}

/// What a window of commands does, decided in memory from the locked rows.
struct Plan<'c> {
    outcomes: Vec<EntryOutcome>,
    /// Subscriptions a command needs that do not exist yet.
    to_create: Vec<Uuid>,
    /// Keys recorded for a command that turned out [`ApplyOutcome::Changed`] and no later
    /// command took: they are taken back.
    unused_keys: Vec<&'c InboxKey>,
    /// The event-log rows, each with its subscription, sequence and state after it.
    log: Vec<(Uuid, i64, &'static str, LogRow)>,
    /// The subscriptions the window moved, in id order.
    subscriptions: Vec<(Uuid, Holding)>,
    /// Per decision whose notice inputs changed: the machine after it, its state's start,
    /// its time, its event-log row.
    notices: Vec<(
        Uuid,
        SubscriptionMachine,
        OffsetDateTime,
        OffsetDateTime,
        Uuid,
    )>,
    /// Subscriptions whose pending rows go first (a decision acknowledges).
    put_first: Vec<Uuid>,
    outbox: Vec<outbox::NewRow<'c>>,
    notify: bool,
}

/// A subscription as a window's commands leave it.
struct Holding {
    row: LockedRow,
    appended: bool,
    /// When its last decision was made (its machine is saved), if one was.
    decided_at: Option<OffsetDateTime>,
}

impl<'c> Plan<'c> {
    fn of(
        entries: &'c [Entry<'c>],
        policy: &Policy,
        rows: &HashMap<Uuid, LockedRow>,
        created: &HashMap<Uuid, LockedRow>,
        fresh: &HashSet<&'c InboxKey>,
    ) -> Self {
        let mut plan = Plan {
            outcomes: Vec::with_capacity(entries.len()),
            to_create: Vec::new(),
            unused_keys: Vec::new(),
            log: Vec::with_capacity(entries.len()),
            subscriptions: Vec::new(),
            notices: Vec::new(),
            put_first: Vec::new(),
            outbox: Vec::new(),
            notify: false,
        };
        // `None`: not created yet (unknown to us).
        let mut held: HashMap<Uuid, Option<Holding>> = HashMap::new();
        let mut taken: HashSet<&InboxKey> = HashSet::new();
        let create = |id: Uuid, to_create: &mut Vec<Uuid>| -> Holding {
            // Until it is inserted, as the insert is expected to leave it.
            let row = created.get(&id).cloned().unwrap_or_else(|| new_row(id));
            to_create.push(id);
            Holding {
                row,
                appended: false,
                decided_at: None,
            }
        };
        // Per decision: its outbox rows' range, for the priorities below.
        let mut acknowledging: Vec<(Uuid, usize)> = Vec::new();
        for entry in entries {
            let command = match entry {
                Entry::Apply(command) => command,
                Entry::Record {
                    subscription_id: id,
                    record,
                    now,
                } => {
                    let slot = held.entry(*id).or_insert_with(|| {
                        rows.get(id).cloned().map(|row| Holding {
                            row,
                            appended: false,
                            decided_at: None,
                        })
                    });
                    let recorded = slot.as_mut().map(|holding| {
                        let row = record_row(record, *now);
                        let event_id = row.id;
                        holding.row.last_sequence += 1;
                        holding.appended = true;
                        let state = state_name(&holding.row);
                        plan.log.push((*id, holding.row.last_sequence, state, row));
                        event_id
                    });
                    plan.outcomes.push(EntryOutcome::Recorded(recorded));
                    continue;
                }
            };
            let Apply {
                subscription_id,
                event,
                source,
                now,
                expected,
                runs,
                execution,
            } = *command;
            let id = subscription_id.as_uuid();
            let slot = held.entry(id).or_insert_with(|| {
                rows.get(&id).cloned().map(|row| Holding {
                    row,
                    appended: false,
                    decided_at: None,
                })
            });
            if let Some(expected) = expected {
                let changed = match (expected, &*slot) {
                    // Creating the row ourselves is the check: it holds the row until commit.
                    (Expected::Absent, None) => {
                        *slot = Some(create(id, &mut plan.to_create));
                        None
                    }
                    (Expected::Absent, Some(holding)) => Some(Some(holding.row.version)),
                    (Expected::Version(_), None) => Some(None),
                    (Expected::Version(version), Some(holding)) => {
                        (holding.row.version != version).then_some(Some(holding.row.version))
                    }
                };
                if let Some(current) = changed {
                    plan.outcomes
                        .push(EntryOutcome::Applied(ApplyOutcome::Changed { current }));
                    continue;
                }
            }
            if let Some(key) = &source.inbox_key
                && (!fresh.contains(key) || !taken.insert(key))
            {
                // Logged only when we know the subscription (else the key belongs to
                // another one).
                if let Some(holding) = slot {
                    let reason =
                        format!("duplicate event: message {key} was handled before (inbox)");
                    let mut row = log_row(event, source, LogOutcome::Ignored, reason, now);
                    // The execution's record stays, whatever became of its event.
                    row.execution = execution.map(ExecutionColumn::of);
                    holding.row.last_sequence += 1;
                    holding.appended = true;
                    let state = state_name(&holding.row);
                    plan.log.push((id, holding.row.last_sequence, state, row));
                }
                plan.outcomes
                    .push(EntryOutcome::Applied(ApplyOutcome::Duplicate));
                continue;
            }
            let holding = slot.get_or_insert_with(|| create(id, &mut plan.to_create));
            let never_saved = holding.row.state_since.is_none();
            let machine = &mut holding.row.machine;
            let notices_before = NoticeInputs::of(machine);
            let before = machine.clone();
            let decision = machine.handle(event, now, policy);
            // A decision that left the machine as it was (an observation older than the
            // newest one it saw) appends its row without saving the machine or moving its
            // version. A confirming GET that shows nothing new still moves it: the machine
            // remembers the observation's time and key.
            let moved = *machine != before || never_saved;
            let (outcome, reason) = outcome_columns(&decision.outcome);
            let mut row = log_row(event, source, outcome, reason, now);
            row.from_state = Some(decision.from.as_str());
            row.effects = store::json_text(&decision.effects);
            row.execution = execution.map(ExecutionColumn::of);
            let event_id = row.id;
            let to_state = machine.state().as_str();
            let stored = &mut holding.row;
            if stored.state != to_state || stored.state_since.is_none() {
                stored.state_since = Some(now);
            }
            stored.state = to_state.to_string();
            stored.last_sequence += 1;
            holding.appended = true;
            if moved {
                stored.version += 1;
                holding.decided_at = Some(now);
            }
            let sequence = stored.last_sequence;
            plan.log.push((id, sequence, to_state, row));
            if NoticeInputs::of(&stored.machine) != notices_before {
                let since = stored.state_since.unwrap_or(now);
                plan.notices
                    .push((id, stored.machine.clone(), since, now, event_id));
            }
            // A decision that answers Microsoft puts the subscription's pending rows first
            // (P7): the ACK waits behind them, so they all go before other subscriptions'
            // rows.
            let acknowledges = decision
                .effects
                .iter()
                .any(|effect| matches!(effect, Effect::AckOperation { .. }));
            if acknowledges {
                plan.put_first.push(id);
                acknowledging.push((id, plan.outbox.len() + decision.effects.len()));
            }
            let outbox_ids: Vec<Uuid> = decision.effects.iter().map(|_| Uuid::now_v7()).collect();
            let published = decision
                .effects
                .iter()
                .filter(|effect| EffectKind::of(effect) == EffectKind::PublishDomainEvent)
                .count();
            let mut position = 0;
            for (effect, outbox_id) in decision.effects.iter().zip(&outbox_ids) {
                let kind = EffectKind::of(effect);
                let cloud_event_id = (kind == EffectKind::PublishDomainEvent).then(|| {
                    position += 1;
                    publish::cloud_event_id(event_id, position, published)
                });
                plan.outbox.push(outbox::NewRow {
                    id: *outbox_id,
                    subscription_id: id,
                    event_id,
                    event_sequence: sequence,
                    kind,
                    effect: store::json_text(effect),
                    correlation_id: source.correlation_id.as_deref(),
                    traceparent: source.traceparent.as_deref(),
                    first: false,
                    // Microsoft's clock starts at the webhook's receipt (P7); a decision
                    // without one (none today) counts from now.
                    due_at: (kind == EffectKind::AckOperation)
                        .then(|| source.received_at.unwrap_or(now) + acknowledge::ACK_WINDOW),
                    cloud_event_id,
                    now,
                });
            }
            // One wake-up per transaction however many decisions it holds; none when the
            // caller runs the rows itself.
            plan.notify |= !outbox_ids.is_empty() && runs == Runs::Anywhere;
            plan.outcomes
                .push(EntryOutcome::Applied(ApplyOutcome::Decided(Applied {
                    subscription_id: id,
                    event_id,
                    sequence,
                    decision,
                    outbox_ids,
                })));
        }
        // A row goes first when its decision, or a later one of its subscription in this
        // window, acknowledges (as when each put the rows before it first).
        for (id, end) in acknowledging {
            for row in &mut plan.outbox[..end] {
                if row.subscription_id == id {
                    row.first = true;
                }
            }
        }
        plan.put_first.sort_unstable();
        plan.put_first.dedup();
        plan.unused_keys = fresh
            .iter()
            .filter(|key| !taken.contains(*key))
            .copied()
            .collect();
        let mut moved: Vec<(Uuid, Holding)> = held
            .into_iter()
            .filter_map(|(id, holding)| Some((id, holding?)))
            .filter(|(_, holding)| holding.appended)
            .collect();
        moved.sort_unstable_by_key(|(id, _)| *id);
        plan.subscriptions = moved;
        plan
    }

    /// Writes what the plan decided; the outcomes.
    async fn write(
        self,
        conn: &mut PgConnection,
        policy: &Policy,
    ) -> Result<Vec<EntryOutcome>, StoreError> {
        if !self.unused_keys.is_empty() {
            inbox::forget(conn, &self.unused_keys).await?;
        }
        if !self.log.is_empty() {
            let saved: Vec<Option<SavedMachine>> = self
                .subscriptions
                .iter()
                .map(|(_, holding)| {
                    holding
                        .decided_at
                        .map(|_| SavedMachine::of(&holding.row.machine))
                })
                .collect();
            let counters: Vec<ledger::Counter<'_>> =
                self.subscriptions
                    .iter()
                    .zip(&saved)
                    .map(|((id, holding), saved)| ledger::Counter {
                        subscription_id: *id,
                        last_sequence: holding.row.last_sequence,
                        saved: saved.as_ref().zip(holding.decided_at).map(
                            |(machine, updated_at)| ledger::Saved {
                                machine,
                                version: holding.row.version,
                                updated_at,
                                state_since: holding.row.state_since,
                            },
                        ),
                    })
                    .collect();
            let rows: Vec<ledger::Sequenced<'_>> = self
                .log
                .iter()
                .map(|(id, sequence, to_state, row)| ledger::Sequenced {
                    subscription_id: *id,
                    sequence: *sequence,
                    to_state,
                    row,
                })
                .collect();
            ledger::append_many(conn, &counters, &rows).await?;
        }
        for (id, machine, since, now, event_id) in &self.notices {
            reschedule_notices(conn, *id, machine, *since, *now, &policy.notices, *event_id)
                .await?;
        }
        if !self.outbox.is_empty() {
            outbox::enqueue_many(conn, &self.put_first, &self.outbox).await?;
        }
        if self.notify {
            outbox::notify_runners(conn).await?;
        }
        Ok(self.outcomes)
    }
}

/// A new subscription's row as [`subscriptions::insert_many_new`] leaves it (the schema's
/// defaults).
fn new_row(id: Uuid) -> LockedRow {
    let machine = SubscriptionMachine::new(SubscriptionId::from(id));
    LockedRow {
        id,
        state: machine.state().as_str().to_string(),
        machine,
        version: 1,
        last_sequence: 0,
        state_since: None,
    }
}

/// The `state` column's name (every stored state is one of the machine's).
fn state_name(row: &LockedRow) -> &'static str {
    row.state
        .parse::<StateName>()
        .map_or_else(|_| row.machine.state().as_str(), StateName::as_str)
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
        event: store::json_text(event),
        from_state: None,
        outcome,
        reason,
        effects: store::json_empty_array(),
        correlation_id: source.correlation_id.clone(),
        request_id: source.request_id.clone(),
        trace_id: source.trace_id.clone(),
        recorded_at: now,
        received_at: source.received_at,
        execution: None,
    }
}

fn outcome_columns(outcome: &Outcome) -> (LogOutcome, String) {
    match outcome {
        Outcome::Applied { reason } => (LogOutcome::Applied, reason.clone()),
        Outcome::Rejected { reason } => (LogOutcome::Rejected, reason.clone()),
        Outcome::Ignored { reason } => (LogOutcome::Ignored, reason.to_string()),
    }
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
    since: OffsetDateTime,
    now: OffsetDateTime,
    policy: &NoticePolicy,
    event_id: Uuid,
) -> Result<(), StoreError> {
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
    let row = record_row(record, now);
    let appended = ledger::append(conn, subscription_id, &row).await?;
    Ok(appended.map(|_| row.id))
}

/// The `execution` column of a decision's row: the record of the execution whose call
/// produced its event, as the execution's own row would have held it (its kind, its note,
/// its details).
#[derive(serde::Serialize)]
struct ExecutionColumn<'a> {
    kind: &'a str,
    note: &'a str,
    #[serde(flatten)]
    details: &'a Value,
}

impl ExecutionColumn<'_> {
    fn of(record: &EffectRecord) -> store::JsonText {
        store::json_text(&ExecutionColumn {
            kind: &record.event_kind,
            note: &record.reason,
            details: &record.details,
        })
    }
}

/// The event-log row of `record`.
fn record_row(record: &EffectRecord, now: OffsetDateTime) -> LogRow {
    LogRow {
        id: Uuid::now_v7(),
        message_id: None,
        event_key: record.event_key.clone(),
        event_kind: record.event_kind.clone(),
        event: store::json_text(&record.details),
        from_state: None,
        outcome: LogOutcome::Recorded,
        reason: record.reason.clone(),
        effects: store::json_empty_array(),
        correlation_id: record.correlation_id.clone(),
        request_id: record.request_id.clone(),
        trace_id: None,
        recorded_at: now,
        received_at: None,
        execution: None,
    }
}
