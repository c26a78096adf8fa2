//! The outbox: effects the machine decided, queued with their transition by the worker's
//! apply ([`enqueue_many`]), executed afterwards by the effect runner.
//!
//! A runner claims due rows with `FOR UPDATE SKIP LOCKED` — many in one statement
//! ([`claim_due`], [`claim_ids`]: a [`ClaimedBatch`]; a kind with runners of its own one at a
//! time, [`claim_next_of_kind`]) — and keeps the claiming transaction open while it
//! executes the effects, then ends the rows in that same
//! transaction (z2p `issue_delivery_worker.rs`): done, rescheduled or dead, a batch's ends in
//! one statement per kind of end and one commit. A crash in between releases the locks and
//! the rows run again, so every executor is idempotent.
//!
//! Order, per subscription, in the machine's order (event-log sequence, then id), by each
//! row's [`EffectKind::ordering`]: a row that changes something at Microsoft (activate, ACK,
//! publisher PATCH/DELETE) holds back every row behind it; a read or a notification (the
//! confirming GET, a domain event, a metering batch) holds back only the rows of its own
//! kind behind it, so domain events leave in order but an ACK never waits for the previous
//! change's GET or domain event; `poll_operation` and `confirm_operation` rows only wait for
//! Microsoft and hold back nothing, nor does a row the runner marked `awaits_microsoft`
//! (e.g. an `activate` whose POST went out: it only waits for Microsoft to report
//! Subscribed, P4, so a customer's first change right after checkout is acknowledged
//! without waiting for our next activation check; an `ack_operation` whose PATCH was
//! answered and that polls its operation to its end, so the next change's ACK never waits
//! for it). ACK rows go first, the one whose 10-second window (P7) closes soonest first
//! (`due_at`: the webhook's receipt plus the window, written at enqueue, and cleared when
//! the runner marks the row `awaits_microsoft`: an ACK row that only polls ranks with the
//! other reads), then the subscriptions with an ACK pending, so a burst of
//! confirmations, GETs and domain events cannot eat Microsoft's window.
//! A `dead` row no longer blocks anything; operators replay it. Webhook deliveries to the
//! ISV ([`EffectKind::DeliverWebhook`]) have runners of their own ([`claim_next_of_kind`]);
//! the effect runners never claim them.
//! A row of a kind this version does not know (a newer worker's, during a rolling upgrade)
//! is never claimed here — it waits for a worker that knows it — and holds back the later
//! rows of its subscription like any kind that changes something at Microsoft.
//!
//! Kinds and statuses are typed ([`EffectKind`], [`OutboxStatus`], [`CommandStatus`]) and
//! bound as parameters, except `status = 'pending'` in the queries the partial indexes
//! serve: a bound status would hide the index predicate from the planner's generic plans.

use std::time::Duration;

use fulfillment_state_machine::Effect;
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use sqlx::{Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;
use super::text::{TextValue, text_column};
use crate::worker::protocol::CommandStatus;

/// The `LISTEN`/`NOTIFY` channel `apply` signals when it queued effects: a wake-up hint
/// only; runners also poll.
pub const NOTIFY_CHANNEL: &str = "fulfillment_outbox";

/// What an outbox row does: the `kind` column. Every row the runners execute is one of
/// these; the claim query's ordering lists are generated from [`EffectKind::ordering`], so a
/// new kind is added here once and nowhere in SQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EffectKind {
    Activate,
    AckOperation,
    FetchSubscription,
    RequestPlanChange,
    RequestQuantityChange,
    RequestCancel,
    PollOperation,
    ConfirmOperation,
    PublishDomainEvent,
    /// A metering batch (event sequence 0), queued by the metering, not by the machine.
    SubmitUsage,
    /// A signed delivery of a domain event to one of the ISV's endpoints
    /// (`store::deliveries`); its lane (the `subscription_id` column) is the pair
    /// (endpoint, subscription), and it has runners of its own.
    DeliverWebhook,
}

/// How a pending row holds back the later rows of its subscription (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ordering {
    /// It changes something at Microsoft: every later row waits for it.
    HoldsBackAll,
    /// A read or a notification: only later rows of its own kind wait for it.
    HoldsBackItsKind,
    /// It only waits for Microsoft to finish something: nothing waits for it.
    HoldsBackNothing,
}

impl EffectKind {
    /// Whether an execution that ends with its call's result (one event fed back, nothing
    /// else written) is recorded in that event's row (its `execution` column) instead of a
    /// row of its own (issue #17: one event-log row less per step): a GET of the
    /// subscription and the observation it fed; an ACK whose answer told the operation's
    /// end and the `OperationResult` it fed. The ACK statistics and tools read an ACK's
    /// record from either place (`store::verify`, `store::overview`). An ACK execution that
    /// feeds nothing (its operation is polled next) and the other calls that change
    /// something at Microsoft keep their own row.
    pub fn records_with_its_result(self) -> bool {
        matches!(self, Self::FetchSubscription | Self::AckOperation)
    }

    /// The kind of a machine effect.
    pub fn of(effect: &Effect) -> Self {
        match effect {
            Effect::Activate { .. } => Self::Activate,
            Effect::AckOperation { .. } => Self::AckOperation,
            Effect::FetchSubscription => Self::FetchSubscription,
            Effect::RequestPlanChange { .. } => Self::RequestPlanChange,
            Effect::RequestQuantityChange { .. } => Self::RequestQuantityChange,
            Effect::RequestCancel { .. } => Self::RequestCancel,
            Effect::PollOperation { .. } => Self::PollOperation,
            Effect::ConfirmOperation { .. } => Self::ConfirmOperation,
            Effect::PublishDomainEvent(_) => Self::PublishDomainEvent,
        }
    }

    /// What the claim query lets pass this row while it is pending.
    pub fn ordering(self) -> Ordering {
        match self {
            Self::PollOperation | Self::ConfirmOperation => Ordering::HoldsBackNothing,
            // Batches of a subscription go in order, and none waits for or holds back its
            // lifecycle effects.
            Self::FetchSubscription | Self::PublishDomainEvent | Self::SubmitUsage => {
                Ordering::HoldsBackItsKind
            }
            // A delivery's lane holds only that endpoint's deliveries of one subscription:
            // they go one after another, in event order.
            Self::Activate
            | Self::AckOperation
            | Self::RequestPlanChange
            | Self::RequestQuantityChange
            | Self::RequestCancel
            | Self::DeliverWebhook => Ordering::HoldsBackAll,
        }
    }

    /// Kinds with runners of their own (webhook deliveries to the ISV): the effect runners
    /// never claim them, so a slow endpoint never holds a permit an ACK needs.
    pub fn has_own_runner(self) -> bool {
        matches!(self, Self::DeliverWebhook)
    }

    /// The kinds the effect runners claim: every kind this version knows (a newer
    /// version's row is left alone during a rolling upgrade) except those with their own
    /// runners.
    fn claimed_by_effect_runners() -> Vec<EffectKind> {
        Self::ALL
            .iter()
            .copied()
            .filter(|kind| !kind.has_own_runner())
            .collect()
    }

    /// The kinds with this ordering, as the claim query binds them.
    fn with_ordering(ordering: Ordering) -> Vec<EffectKind> {
        Self::ALL
            .iter()
            .copied()
            .filter(|kind| kind.ordering() == ordering)
            .collect()
    }
}

impl TextValue for EffectKind {
    const ALL: &'static [Self] = &[
        Self::Activate,
        Self::AckOperation,
        Self::FetchSubscription,
        Self::RequestPlanChange,
        Self::RequestQuantityChange,
        Self::RequestCancel,
        Self::PollOperation,
        Self::ConfirmOperation,
        Self::PublishDomainEvent,
        Self::SubmitUsage,
        Self::DeliverWebhook,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::AckOperation => "ack_operation",
            Self::FetchSubscription => "fetch_subscription",
            Self::RequestPlanChange => "request_plan_change",
            Self::RequestQuantityChange => "request_quantity_change",
            Self::RequestCancel => "request_cancel",
            Self::PollOperation => "poll_operation",
            Self::ConfirmOperation => "confirm_operation",
            Self::PublishDomainEvent => "publish_domain_event",
            Self::SubmitUsage => "submit_usage",
            Self::DeliverWebhook => "deliver_webhook",
        }
    }
}

text_column!(EffectKind);

impl std::fmt::Display for EffectKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an outbox row stands: the `status` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutboxStatus {
    /// Due now or later.
    Pending,
    /// Carried out.
    Done,
    /// Given up, for an operator to retry or abandon; blocks nothing.
    Dead,
    /// A dead row an operator gave up on (`fulfillment effects abandon`, the console).
    Abandoned,
}

impl TextValue for OutboxStatus {
    const ALL: &'static [Self] = &[Self::Pending, Self::Done, Self::Dead, Self::Abandoned];

    fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Done => "done",
            Self::Dead => "dead",
            Self::Abandoned => "abandoned",
        }
    }
}

text_column!(OutboxStatus);

impl OutboxStatus {
    /// The column's text (without the [`TextValue`] trait in scope).
    pub fn as_str(self) -> &'static str {
        <Self as TextValue>::as_str(self)
    }
}

// The status column of `publisher_operations` is the protocol's own type.
impl TextValue for CommandStatus {
    const ALL: &'static [Self] = &[
        Self::Requested,
        Self::Accepted,
        Self::Refused,
        Self::Succeeded,
        Self::Failed,
        Self::Conflict,
        Self::Unknown,
    ];

    fn as_str(self) -> &'static str {
        CommandStatus::as_str(self)
    }
}

text_column!(CommandStatus);

/// One row of `outbox`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: Uuid,
    pub subscription_id: Uuid,
    /// The event-log row whose decision produced the effect.
    pub event_id: Uuid,
    pub kind: EffectKind,
    /// The serialized `Effect` (a usage batch for [`EffectKind::SubmitUsage`]).
    pub effect: super::JsonText,
    /// Failed attempts so far (waiting for Microsoft does not count).
    pub attempts: i32,
    pub correlation_id: Option<String>,
    pub last_error: Option<String>,
    /// Where the effect's protocol stands (`worker::protocol::Progress`, tagged JSON); only
    /// the effect runner reads it.
    pub progress: Value,
    pub created_at: OffsetDateTime,
    /// W3C trace context of the decision; the execution continues its trace. Absent from
    /// queries that do not select it.
    #[sqlx(default)]
    pub traceparent: Option<String>,
    /// An ACK row's deadline: the webhook's receipt plus Microsoft's window (P7). `None`
    /// for other kinds (and for ACK rows queued before the column existed).
    #[sqlx(default)]
    pub due_at: Option<OffsetDateTime>,
    /// A `publish_domain_event` row's CloudEvent id, fixed when its decision queued it.
    /// `None` for other kinds and for rows queued without it (see [`domain_event_position`]).
    #[sqlx(default)]
    pub cloud_event_id: Option<String>,
}

/// A claimed row: its lock lives as long as this value; end it with one of the methods.
/// Dropping it rolls back, and the row becomes due again as it was.
#[derive(Debug)]
pub struct Claimed {
    tx: Transaction<'static, Postgres>,
    pub row: OutboxRow,
}

/// The columns of [`OutboxRow`], as the claim queries select them. The claim queries are
/// assembled from these constants and the kinds' own words only (hence `AssertSqlSafe`).
const ROW_COLUMNS: &str = "o.id, o.subscription_id, o.event_id, o.kind, o.effect, o.attempts, \
     o.correlation_id, o.last_error, o.progress, o.created_at, o.traceparent, o.due_at, \
     o.cloud_event_id";

/// The claim order (see the module docs): ACK rows by deadline (`due_at` is NULL for every
/// other row, and for an ACK row whose PATCH was answered, and NULL sorts last), then the
/// subscriptions with an ACK pending, then the most overdue. `outbox_claim_due_idx` holds
/// the rows in this order.
const CLAIM_ORDER: &str = "o.due_at, o.priority, o.next_attempt_at";

/// The claimability test (see the module docs): no earlier pending row of the same
/// subscription that holds this one back. `$1` binds the kinds that hold back nothing, `$2`
/// those that hold back only their own kind ([`EffectKind::ordering`]); a row marked `awaits_microsoft` (by the runner, from its
/// progress) waits like them. A probe of one range of `outbox_subscription_idx`, the only
/// index it can use (see that index's migration: whatever the statistics, the planner
/// never scans it whole per candidate), once per candidate: `OFFSET 0` keeps the planner
/// from turning the test into an anti-join, which statistics taken while little was
/// pending made a sequential scan of the whole outbox per claim, its pending rows then
/// compared with every candidate (measured in `bench pipeline`: a third of the claims,
/// 26 ms each; in the runs that hit it, PostgreSQL used 2.3-2.9 ms of CPU per change
/// instead of 1.3-1.6).
const NOTHING_BEFORE_IT: &str = "NOT EXISTS ( \
         SELECT 1 FROM outbox p \
         WHERE p.subscription_id = o.subscription_id AND p.status = 'pending' \
           AND p.kind <> ALL($1) AND (p.kind = o.kind OR p.kind <> ALL($2)) \
           AND NOT p.awaits_microsoft \
           AND (p.event_sequence, p.id) < (o.event_sequence, o.id) \
         OFFSET 0)";

/// Begins a claim's transaction, whose statements — the claim, then the settle's — run with
/// generic plans. They bind arrays (ids, kinds, a batch's ends), and for an array of known
/// length PostgreSQL estimates a custom plan cheaper than the generic one of the same shape,
/// so it planned every execution anew: measured under a burst, planning `claim_ids` took
/// 0.41 ms a call against 0.14 ms to run it. A hot-path transaction ([`super::HOT_PATH_BEGIN`]):
/// a generic plan is made once, so it must not be the scan of a table still nearly empty.
/// One round trip, like a plain `BEGIN`.
async fn begin_claim(pool: &PgPool) -> Result<Transaction<'static, Postgres>, StoreError> {
    Ok(pool
        .begin_with(sqlx::AssertSqlSafe(format!(
            "{}; SET LOCAL plan_cache_mode = force_generic_plan",
            super::HOT_PATH_BEGIN
        )))
        .await?)
}

/// Claims the first claimable row of one kind with runners of its own
/// ([`EffectKind::has_own_runner`]): by priority, then the most overdue. The kind is written
/// into the statement, so its generic plan can use the kind's partial index
/// (`outbox_deliveries_claim_idx` for deliveries).
pub async fn claim_next_of_kind(
    pool: &PgPool,
    kind: EffectKind,
) -> Result<Option<Claimed>, StoreError> {
    let mut tx = begin_claim(pool).await?;
    let kind = kind.as_str();
    let row = sqlx::query_as::<_, OutboxRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM outbox o \
         WHERE o.status = 'pending' AND o.next_attempt_at <= now() \
           AND o.kind = '{kind}' AND {NOTHING_BEFORE_IT} \
         ORDER BY o.priority, o.next_attempt_at \
         LIMIT 1 \
         FOR UPDATE OF o SKIP LOCKED"
    )))
    .bind(EffectKind::with_ordering(Ordering::HoldsBackNothing))
    .bind(EffectKind::with_ordering(Ordering::HoldsBackItsKind))
    .fetch_optional(&mut *tx)
    .await?;
    finish_claim(tx, row).await
}

async fn finish_claim(
    tx: Transaction<'static, Postgres>,
    row: Option<OutboxRow>,
) -> Result<Option<Claimed>, StoreError> {
    match row {
        Some(row) => Ok(Some(Claimed { tx, row })),
        None => {
            tx.rollback().await?;
            Ok(None)
        }
    }
}

/// Claims up to `limit` claimable rows in the claim order ([`CLAIM_ORDER`]), in one
/// statement and one transaction: the ACK whose window closes soonest first, else the most
/// overdue row of the subscriptions that have an ACK waiting (`priority` 0, set through
/// [`enqueue_many`] by the worker's apply), else the most overdue row: Microsoft's 10-second
/// window (P7) must not be spent behind a burst of confirmations, GETs and domain events.
/// `None` when nothing is claimable.
///
/// The scan follows `outbox_claim_due_idx` and stops once it has `limit` rows that are
/// claimable and not locked by another runner, so a claim costs the rows it skips, not the
/// size of the backlog. A row held back by an earlier pending row of its subscription is
/// never claimed, not even with that row in the same batch (the earlier one is still
/// pending), so the rows of a batch may run at once without a later row of a subscription
/// overtaking an earlier one.
pub async fn claim_due(pool: &PgPool, limit: usize) -> Result<Option<ClaimedBatch>, StoreError> {
    let mut tx = begin_claim(pool).await?;
    // The kinds are written into the statement: they tell the planner that no delivery is
    // wanted, which `outbox_claim_due_idx`'s predicate requires.
    let kinds = EffectKind::claimed_by_effect_runners()
        .iter()
        .map(|kind| format!("'{}'", kind.as_str()))
        .collect::<Vec<_>>()
        .join(", ");
    let rows = sqlx::query_as::<_, OutboxRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM outbox o \
         WHERE o.status = 'pending' AND o.next_attempt_at <= now() AND o.kind IN ({kinds}) \
           AND {NOTHING_BEFORE_IT} \
         ORDER BY {CLAIM_ORDER} \
         LIMIT $3 \
         FOR UPDATE OF o SKIP LOCKED"
    )))
    .bind(EffectKind::with_ordering(Ordering::HoldsBackNothing))
    .bind(EffectKind::with_ordering(Ordering::HoldsBackItsKind))
    .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
    .fetch_all(&mut *tx)
    .await?;
    finish_batch(tx, rows).await
}

/// Claims those of `ids` that are claimable now — pending, due, not held back by an earlier
/// row of their subscription, not held by another runner — in one statement and one
/// transaction, in the claim order. `None` when none is: the others are done already,
/// behind an earlier row, or being executed elsewhere, and the runners take them in their
/// turn.
pub async fn claim_ids(pool: &PgPool, ids: &[Uuid]) -> Result<Option<ClaimedBatch>, StoreError> {
    if ids.is_empty() {
        return Ok(None);
    }
    let mut tx = begin_claim(pool).await?;
    let rows = sqlx::query_as::<_, OutboxRow>(sqlx::AssertSqlSafe(format!(
        "SELECT {ROW_COLUMNS} FROM outbox o \
         WHERE o.id = ANY($3) AND o.status = 'pending' AND o.next_attempt_at <= now() \
           AND o.kind = ANY($4) AND {NOTHING_BEFORE_IT} \
         ORDER BY {CLAIM_ORDER} \
         FOR UPDATE OF o SKIP LOCKED"
    )))
    .bind(EffectKind::with_ordering(Ordering::HoldsBackNothing))
    .bind(EffectKind::with_ordering(Ordering::HoldsBackItsKind))
    .bind(ids)
    .bind(EffectKind::ALL)
    .fetch_all(&mut *tx)
    .await?;
    finish_batch(tx, rows).await
}

async fn finish_batch(
    tx: Transaction<'static, Postgres>,
    rows: Vec<OutboxRow>,
) -> Result<Option<ClaimedBatch>, StoreError> {
    if rows.is_empty() {
        tx.rollback().await?;
        return Ok(None);
    }
    Ok(Some(ClaimedBatch { tx, rows }))
}

/// Rows claimed together ([`claim_due`], [`claim_ids`]): their locks live as long as this
/// value. Each row's writes go in a [`ClaimedBatch::savepoint`] of their own, so one that
/// fails rolls back alone; [`ClaimedBatch::end`] ends every row and commits once. Dropping
/// it rolls back, and the rows become due again as they were.
#[derive(Debug)]
pub struct ClaimedBatch {
    tx: Transaction<'static, Postgres>,
    pub rows: Vec<OutboxRow>,
}

/// How a row of a batch ends (the single-row [`Claimed`] methods, as data).
#[derive(Debug, Clone)]
pub enum End {
    /// Carried out.
    Done,
    /// Runs again after `delay`; see [`Claimed::reschedule`].
    Reschedule {
        delay: Duration,
        failed: bool,
        error: Option<String>,
        progress: Value,
        awaits_microsoft: bool,
    },
    /// Dead with the reason; see [`Claimed::bury`].
    Bury { reason: String, failed: bool },
}

impl ClaimedBatch {
    /// A savepoint in the batch's transaction, for what one row's execution writes; dropped
    /// without commit it rolls back to the savepoint, and the other rows' writes stand.
    pub async fn savepoint(&mut self) -> Result<Transaction<'_, Postgres>, StoreError> {
        Ok(sqlx::Acquire::begin(&mut self.tx).await?)
    }

    /// Gives the rows back unchanged, at once (dropping the batch also does, when its
    /// connection is next used).
    pub async fn release(self) -> Result<(), StoreError> {
        self.tx.rollback().await?;
        Ok(())
    }

    /// Ends the rows — one statement per kind of end — and commits everything once. A
    /// delay counts from the statement's own clock (`clock_timestamp()`), not from `now()`:
    /// that is the start of the claim's transaction, before the calls, and a poll told to
    /// wait for the 202's `Retry-After` would come early by as long as the calls took. A
    /// row rescheduled `awaits_microsoft` loses its ACK deadline (`due_at`): what it had to
    /// send within Microsoft's window has left, and it must not rank ahead of other ACKs.
    pub async fn end(mut self, ends: &[(Uuid, End)]) -> Result<(), StoreError> {
        let done: Vec<Uuid> = ends
            .iter()
            .filter(|(_, end)| matches!(end, End::Done))
            .map(|(id, _)| *id)
            .collect();
        if !done.is_empty() {
            sqlx::query(
                "UPDATE outbox SET status = $2, last_error = NULL, updated_at = now() \
                 WHERE id = ANY($1)",
            )
            .bind(&done)
            .bind(OutboxStatus::Done)
            .execute(&mut *self.tx)
            .await?;
        }
        let mut again = Rescheduled::default();
        let mut dead = Buried::default();
        for (id, end) in ends {
            match end {
                End::Done => {}
                End::Reschedule {
                    delay,
                    failed,
                    error,
                    progress,
                    awaits_microsoft,
                } => {
                    again.ids.push(*id);
                    again.failed.push(i32::from(*failed));
                    again.delays.push(delay.as_secs_f64());
                    again.errors.push(error.clone());
                    again.progress.push(progress.clone());
                    again.awaits.push(*awaits_microsoft);
                }
                End::Bury { reason, failed } => {
                    dead.ids.push(*id);
                    dead.failed.push(i32::from(*failed));
                    dead.reasons.push(reason.clone());
                }
            }
        }
        if !again.ids.is_empty() {
            sqlx::query(
                "UPDATE outbox o SET attempts = o.attempts + r.failed, \
                     next_attempt_at = clock_timestamp() + make_interval(secs => r.delay), \
                     last_error = coalesce(r.error, o.last_error), progress = r.progress, \
                     awaits_microsoft = r.awaits, \
                     due_at = CASE WHEN r.awaits THEN NULL ELSE o.due_at END, \
                     updated_at = now() \
                 FROM unnest($1::uuid[], $2::int4[], $3::float8[], $4::text[], $5::jsonb[], \
                             $6::bool[]) AS r (id, failed, delay, error, progress, awaits) \
                 WHERE o.id = r.id",
            )
            .bind(&again.ids)
            .bind(&again.failed)
            .bind(&again.delays)
            .bind(&again.errors)
            .bind(&again.progress)
            .bind(&again.awaits)
            .execute(&mut *self.tx)
            .await?;
        }
        if !dead.ids.is_empty() {
            sqlx::query(
                "UPDATE outbox o SET status = $4, attempts = o.attempts + r.failed, \
                     last_error = r.reason, updated_at = now() \
                 FROM unnest($1::uuid[], $2::int4[], $3::text[]) AS r (id, failed, reason) \
                 WHERE o.id = r.id",
            )
            .bind(&dead.ids)
            .bind(&dead.failed)
            .bind(&dead.reasons)
            .bind(OutboxStatus::Dead)
            .execute(&mut *self.tx)
            .await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}

/// The columns of the rescheduled rows of a batch, as `unnest` binds them.
#[derive(Default)]
struct Rescheduled {
    ids: Vec<Uuid>,
    failed: Vec<i32>,
    delays: Vec<f64>,
    errors: Vec<Option<String>>,
    progress: Vec<Value>,
    awaits: Vec<bool>,
}

/// The columns of the buried rows of a batch.
#[derive(Default)]
struct Buried {
    ids: Vec<Uuid>,
    failed: Vec<i32>,
    reasons: Vec<String>,
}

impl Claimed {
    /// A savepoint in the claim's transaction, for what the execution writes with the row's
    /// end (one commit for both); dropped without commit it rolls back to the savepoint and
    /// the claim can still reschedule the row.
    pub async fn savepoint(&mut self) -> Result<Transaction<'_, Postgres>, StoreError> {
        Ok(sqlx::Acquire::begin(&mut self.tx).await?)
    }

    /// The effect is carried out.
    pub async fn complete(mut self) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET status = $2, last_error = NULL, updated_at = now() \
             WHERE id = $1",
        )
        .bind(self.row.id)
        .bind(OutboxStatus::Done)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Runs the row again after `delay`. `failed` counts an attempt against the budget
    /// (a retryable error); waiting for Microsoft to finish something does not.
    /// `awaits_microsoft`: the row no longer holds back later rows, nor keeps an ACK
    /// deadline (see the module docs).
    pub async fn reschedule(
        mut self,
        delay: Duration,
        failed: bool,
        error: Option<&str>,
        progress: &Value,
        awaits_microsoft: bool,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET attempts = attempts + $2, \
                 next_attempt_at = clock_timestamp() + make_interval(secs => $3), \
                 last_error = coalesce($4, last_error), progress = $5, \
                 awaits_microsoft = $6, due_at = CASE WHEN $6 THEN NULL ELSE due_at END, \
                 updated_at = now() \
             WHERE id = $1",
        )
        .bind(self.row.id)
        .bind(i32::from(failed))
        .bind(delay.as_secs_f64())
        .bind(error)
        .bind(progress)
        .bind(awaits_microsoft)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }

    /// Gives up: the row is `dead` with the reason, for an operator to replay.
    pub async fn bury(mut self, reason: &str, failed: bool) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE outbox SET status = $4, attempts = attempts + $2, last_error = $3, \
                 updated_at = now() WHERE id = $1",
        )
        .bind(self.row.id)
        .bind(i32::from(failed))
        .bind(reason)
        .bind(OutboxStatus::Dead)
        .execute(&mut *self.tx)
        .await?;
        self.tx.commit().await?;
        Ok(())
    }
}

/// One row a window of decisions queues ([`enqueue_many`]).
#[derive(Debug, Clone)]
pub struct NewRow<'a> {
    pub id: Uuid,
    pub subscription_id: Uuid,
    /// The event-log row of the decision, and its sequence (the rows' order).
    pub event_id: Uuid,
    pub event_sequence: i64,
    pub kind: EffectKind,
    pub effect: super::JsonText,
    pub correlation_id: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    /// Ahead of other subscriptions' rows (an ACK of its subscription is queued with it or
    /// after it, P7).
    pub first: bool,
    /// An ACK row's deadline: the webhook's receipt plus Microsoft's window (P7); the claim
    /// order puts ACK rows by it, ahead of every other row. `None` for other kinds.
    pub due_at: Option<OffsetDateTime>,
    /// A domain-event row's CloudEvent id ([`OutboxRow::cloud_event_id`]).
    pub cloud_event_id: Option<String>,
    pub now: OffsetDateTime,
}

/// A window's decisions' rows, in one statement: first the pending rows of the
/// subscriptions in `put_first` go ahead of other subscriptions' (`priority` 0; rows a
/// runner holds right now are skipped, they are running already; the rows inserted here
/// are not among them, they carry their own [`NewRow::first`]), then the new rows are
/// inserted.
pub async fn enqueue_many(
    conn: &mut PgConnection,
    put_first: &[Uuid],
    rows: &[NewRow<'_>],
) -> Result<(), StoreError> {
    sqlx::query(
        "WITH first AS (UPDATE outbox SET priority = 0 WHERE id IN ( \
             SELECT id FROM outbox WHERE subscription_id = ANY($1) AND status = 'pending' \
               AND priority <> 0 FOR UPDATE SKIP LOCKED) RETURNING 1) \
         INSERT INTO outbox (id, subscription_id, event_id, event_sequence, kind, effect, \
         correlation_id, next_attempt_at, created_at, updated_at, traceparent, priority, \
         due_at, cloud_event_id) \
         SELECT r.id, r.subscription_id, r.event_id, r.event_sequence, r.kind, r.effect, \
             r.correlation_id, r.now, r.now, r.now, r.traceparent, r.priority, r.due_at, \
             r.cloud_event_id \
         FROM unnest($2::uuid[], $3::uuid[], $4::uuid[], $5::int8[], $6::text[], $7::jsonb[], \
             $8::text[], $9::timestamptz[], $10::text[], $11::int2[], $12::timestamptz[], \
             $13::text[]) \
           AS r (id, subscription_id, event_id, event_sequence, kind, effect, correlation_id, \
             now, traceparent, priority, due_at, cloud_event_id)",
    )
    .bind(put_first)
    .bind(rows.iter().map(|r| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.subscription_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.event_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.event_sequence).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.kind).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| sqlx::types::Json(&*r.effect))
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.correlation_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.now).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.traceparent).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| if r.first { 0_i16 } else { 1 })
            .collect::<Vec<_>>(),
    )
    .bind(rows.iter().map(|r| r.due_at).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.cloud_event_id.as_deref())
            .collect::<Vec<_>>(),
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Wakes the outbox runners of every process when the transaction commits (a hint; they
/// also poll). The payload is always the same (the runners never read it), so PostgreSQL
/// folds the notifications of one transaction into one: a transaction that decides for many
/// subscriptions wakes the runners once.
pub async fn notify_runners(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The pending rows, each half through its partial index (no index covers every pending
/// row: see the migration of `outbox_subscription_idx`).
pub(crate) const PENDING_ROWS: &str = "(SELECT created_at, next_attempt_at FROM outbox \
         WHERE status = 'pending' AND kind <> 'deliver_webhook' \
     UNION ALL SELECT created_at, next_attempt_at FROM outbox \
         WHERE status = 'pending' AND kind = 'deliver_webhook') AS pending";

/// Pending rows due within `horizon` from now (0 = due now). For "run until idle".
pub async fn due_within(pool: &PgPool, horizon: Duration) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM {PENDING_ROWS} \
         WHERE next_attempt_at <= now() + make_interval(secs => $1)"
    )))
    .bind(horizon.as_secs_f64())
    .fetch_one(pool)
    .await?)
}

/// The unfinished outbox: how many rows are pending and how old the oldest is (zero when
/// there is none). For the backlog gauges.
pub async fn backlog(pool: &PgPool) -> Result<(i64, Duration), StoreError> {
    let (pending, oldest_secs): (i64, Option<f64>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), extract(epoch FROM now() - min(created_at))::float8 \
         FROM {PENDING_ROWS}"
    )))
    .fetch_one(pool)
    .await?;
    let oldest = Duration::from_secs_f64(oldest_secs.unwrap_or(0.0).max(0.0));
    Ok((pending, oldest))
}

/// The kind of the event-log row that produced an effect (`WebhookChangePlan`, …).
pub async fn event_kind(pool: &PgPool, event_id: Uuid) -> Result<Option<String>, StoreError> {
    Ok(
        sqlx::query_scalar::<_, String>("SELECT event_kind FROM subscription_events WHERE id = $1")
            .bind(event_id)
            .fetch_optional(pool)
            .await?,
    )
}

/// Where the effect row stands among the `publish_domain_event` rows of its decision:
/// `(1-based position, how many)`. Gives each CloudEvent a stable id when the row was
/// queued without [`OutboxRow::cloud_event_id`]: rows older than the column, whose
/// decision's rows all lack it (every row queued since carries it). The kind and the
/// missing id are written into the statement: they are the predicate of the partial
/// `outbox_event_idx`, which holds only such rows.
pub async fn domain_event_position(
    pool: &PgPool,
    row: &OutboxRow,
) -> Result<(i64, i64), StoreError> {
    let kind = EffectKind::PublishDomainEvent.as_str();
    let (position, total): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FILTER (WHERE id <= $2), count(*) FROM outbox \
         WHERE event_id = $1 AND kind = '{kind}' AND cloud_event_id IS NULL"
    )))
    .bind(row.event_id)
    .bind(row.id)
    .fetch_one(pool)
    .await?;
    Ok((position, total))
}

/// When the message behind the event that produced an effect reached us (webhooks).
pub async fn event_received_at(
    pool: &PgPool,
    event_id: Uuid,
) -> Result<Option<OffsetDateTime>, StoreError> {
    Ok(sqlx::query_scalar::<_, Option<OffsetDateTime>>(
        "SELECT received_at FROM subscription_events WHERE id = $1",
    )
    .bind(event_id)
    .fetch_optional(pool)
    .await?
    .flatten())
}

/// A publisher operation as the worker learns about it (`publisher_operations`).
#[derive(Debug, Clone)]
pub struct PublisherOperationUpdate {
    pub command_id: Uuid,
    pub subscription_id: Uuid,
    /// `ChangePlan`, `ChangeQuantity` or `Cancel`.
    pub kind: &'static str,
    pub target_plan_id: Option<String>,
    pub target_quantity: Option<i32>,
    pub operation_id: Option<Uuid>,
    pub operation_location: Option<String>,
    pub status: CommandStatus,
    pub last_error: Option<String>,
}

/// Inserts or advances the row of a command; known fields are never cleared.
pub async fn upsert_publisher_operation(
    conn: &mut sqlx::PgConnection,
    update: &PublisherOperationUpdate,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO publisher_operations (command_id, subscription_id, kind, target_plan_id, \
             target_quantity, operation_id, operation_location, status, last_error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
         ON CONFLICT (command_id) DO UPDATE SET \
             operation_id = coalesce(EXCLUDED.operation_id, publisher_operations.operation_id), \
             operation_location = coalesce(EXCLUDED.operation_location, \
                                           publisher_operations.operation_location), \
             status = EXCLUDED.status, \
             last_error = coalesce(EXCLUDED.last_error, publisher_operations.last_error), \
             updated_at = now()",
    )
    .bind(update.command_id)
    .bind(update.subscription_id)
    .bind(update.kind)
    .bind(update.target_plan_id.as_deref())
    .bind(update.target_quantity)
    .bind(update.operation_id)
    .bind(update.operation_location.as_deref())
    .bind(update.status)
    .bind(update.last_error.as_deref())
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Sets the final status of the command that owns `operation_id`, if we track it.
pub async fn finish_publisher_operation(
    conn: &mut sqlx::PgConnection,
    operation_id: Uuid,
    status: CommandStatus,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE publisher_operations SET status = $2, updated_at = now() WHERE operation_id = $1",
    )
    .bind(operation_id)
    .bind(status)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_and_status_reads_back_as_itself_and_an_unknown_word_is_not_guessed() {
        for kind in EffectKind::ALL {
            assert_eq!(EffectKind::parse(kind.as_str()), Some(*kind));
        }
        for status in OutboxStatus::ALL {
            assert_eq!(OutboxStatus::parse(status.as_str()), Some(*status));
        }
        for status in <CommandStatus as TextValue>::ALL {
            assert_eq!(CommandStatus::parse(status.as_str()), Some(*status));
        }
        assert_eq!(EffectKind::parse("Activate"), None);
        assert_eq!(OutboxStatus::parse(""), None);
    }

    #[test]
    fn the_claim_query_lists_are_generated_from_the_kinds() {
        assert_eq!(
            EffectKind::with_ordering(Ordering::HoldsBackNothing),
            [EffectKind::PollOperation, EffectKind::ConfirmOperation]
        );
        assert_eq!(
            EffectKind::with_ordering(Ordering::HoldsBackItsKind),
            [
                EffectKind::FetchSubscription,
                EffectKind::PublishDomainEvent,
                EffectKind::SubmitUsage
            ]
        );
        // Each kind is in exactly one class, so a new kind cannot be left out of the query.
        let classes = [
            Ordering::HoldsBackAll,
            Ordering::HoldsBackItsKind,
            Ordering::HoldsBackNothing,
        ];
        let classified: usize = classes
            .iter()
            .map(|class| EffectKind::with_ordering(*class).len())
            .sum();
        assert_eq!(classified, EffectKind::ALL.len());
    }

    #[test]
    fn a_machine_effect_has_the_kind_of_its_label() {
        use fulfillment_state_machine::{CommandId, OperationId};
        let command_id = CommandId::from(Uuid::from_u128(1));
        let operation_id = OperationId::from(Uuid::from_u128(2));
        let effects = [
            Effect::FetchSubscription,
            Effect::RequestCancel { command_id },
            Effect::ConfirmOperation { operation_id },
            Effect::PollOperation {
                command_id,
                operation_id,
                location: "https://example.test/operations/2".into(),
                retry_after_ms: None,
            },
        ];
        for effect in effects {
            assert_eq!(EffectKind::of(&effect).as_str(), effect.kind_str());
        }
    }

    #[test]
    fn the_pending_literal_the_partial_indexes_need_is_the_status_word() {
        let pending = format!("status = '{}'", OutboxStatus::Pending.as_str());
        assert!(NOTHING_BEFORE_IT.contains(&pending));
        assert!(PENDING_ROWS.contains(&pending));
    }

    #[test]
    fn the_delivery_literal_the_claim_indexes_split_on_is_the_kind_word() {
        // outbox_claim_due_idx and outbox_deliveries_claim_idx split the pending rows on it.
        let delivery = EffectKind::DeliverWebhook.as_str();
        assert!(PENDING_ROWS.contains(&format!("kind <> '{delivery}'")));
        assert!(PENDING_ROWS.contains(&format!("kind = '{delivery}'")));
        assert!(!EffectKind::claimed_by_effect_runners().contains(&EffectKind::DeliverWebhook));
    }
}
