//! The outbox runner: claims the effects the machine decided, after commit, and carries out
//! the steps of their protocols ([`super::protocol`]) — it makes the calls, stores the typed
//! progress, writes what the steps record and feeds their events back through the machine
//! (design.md guarantee 4). Every decision about Microsoft's answers is a step's; this
//! module only does IO.
//!
//! Executions are idempotent (at-least-once: a crash re-runs the row from its stored
//! progress). Each execution whose steps noted something is an `outcome = 'recorded'` row
//! of the event log with its calls (request ids, correlation id, statuses, Microsoft's body
//! on failure); waiting polls are not recorded, only their outcome. A step that retries
//! reschedules the row (counting an attempt), one that waits reschedules it without, and
//! one that gives up leaves it `dead` with the reason, also in the event log, for an
//! operator to replay.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fulfillment_state_machine::{
    DomainEvent, Effect, Event, PlanId, Policy, Quantity, SubscriptionId,
};
use serde_json::{Value, json};
use sqlx::postgres::{PgListener, PgPool};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use url::Url;
use uuid::Uuid;

use crate::marketplace::UsageEvent;
use crate::marketplace::{
    self, CallContext, CallMeta, Error as ApiError, MarketplaceClient, Response, TransientCause,
    UpdateOperationStatus, UpdateOutcome,
};
use crate::metrics::{self, DeadLetterReason};
use crate::queue::{MessageMeta, Publisher};
use crate::store::StoreError;
use crate::store::deliveries::PublishedEvent;
use crate::store::outbox::{
    self, ClaimedBatch, EffectKind, End, OutboxRow, PublisherOperationUpdate,
};
use crate::store::usage::{self, HourSettlement};
use crate::worker::apply::{
    self, Apply, ApplyOutcome, EffectRecord, Entry, EntryOutcome, EventSource, Runs,
};
use crate::worker::protocol::acknowledge::ACK_WINDOW;
use crate::worker::protocol::metering::{
    self, MeteringProgress, MeteringTurn, Settlement, UsageBatch,
};
use crate::worker::protocol::{
    self, Answer, Answered, Call, CommandRecord, CommandStatus, GiveUpWhy, Progress,
    ProtocolConfig, Record, Step, Turn, publish,
};

pub use crate::worker::protocol::retry_delay;

/// Rows one claim takes: enough for a consumer's window of ACKs or a backlog's head,
/// small enough that a batch settles in one short transaction.
const BATCH_LIMIT: usize = 64;

/// How effects are run; tests shrink the clocks.
#[derive(Debug, Clone)]
pub struct EffectsConfig {
    /// Effects executed at once, by the runners and the consumer's fast path together (each
    /// holds a claimed row, and its connection, and calls Microsoft at most once at a time;
    /// §8.1 suggests ≤ 10 calls in flight). Keep it at least 2 below the pool size.
    pub concurrency: usize,
    /// Poll of the outbox between wake-ups: the longest a row another worker process left waits.
    pub poll_interval: Duration,
    /// The protocols' clocks, attempts and budgets.
    pub protocol: ProtocolConfig,
}

impl Default for EffectsConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_millis(500),
            protocol: ProtocolConfig::default(),
        }
    }
}

impl EffectsConfig {
    /// Millisecond clocks for tests.
    pub fn fast() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_millis(100),
            protocol: ProtocolConfig::fast(),
        }
    }
}

/// The CloudEvents 1.0 JSON of a domain event. `id` is the event-log id of the decision
/// (with `:n` when the decision produced several), so consumers can dedupe.
pub fn cloud_event(
    id: &str,
    subscription_id: Uuid,
    event: &DomainEvent,
    time: OffsetDateTime,
) -> Value {
    let kind = event.kind.routing_key();
    json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("urn:fulfillment:subscription:{subscription_id}"),
        "type": format!("com.fulfillment.{kind}"),
        "subject": subscription_id.to_string(),
        "time": time.format(&Rfc3339).unwrap_or_default(),
        "datacontenttype": "application/json",
        "data": {
            "subscriptionId": subscription_id,
            "state": event.state.as_str(),
            "planId": event.plan_id.as_ref().map(PlanId::as_str),
            "quantity": event.quantity.map(Quantity::get),
            "reason": event.reason,
        },
    })
}

/// Adds the landing page's onboarding answers to a `subscription.activated` CloudEvent
/// (`data.onboarding`), when there are any.
pub fn with_onboarding(cloud_event: &mut Value, answers: Option<Value>) {
    if let Some(answers) = answers.filter(|a| a.as_object().is_some_and(|o| !o.is_empty())) {
        cloud_event["data"]["onboarding"] = answers;
    }
}

/// How one execution ended.
#[derive(Debug)]
enum Disposition {
    Done,
    /// Microsoft is still working: look again later; not a failure.
    Wait {
        after: Duration,
        progress: Progress,
    },
    /// A retryable failure: counts against the budget.
    Retry {
        error: String,
        after: Duration,
        progress: Progress,
    },
    /// The row is dead.
    Dead {
        reason: String,
        why: GiveUpWhy,
    },
    /// A metering batch to send again (its own progress type).
    RetryUsage {
        error: String,
        after: Duration,
        progress: Value,
    },
}

/// The calls of one execution, for the event log.
#[derive(Debug, Default)]
struct CallLog {
    calls: Vec<Value>,
    last_request_id: Option<String>,
}

impl CallLog {
    fn ok(&mut self, meta: &CallMeta) {
        self.last_request_id = Some(meta.request_id.to_string());
        self.calls
            .push(serde_json::to_value(meta).unwrap_or(Value::Null));
    }

    fn err(&mut self, error: &ApiError) {
        let failure = error.failure();
        if let Some(id) = error.request_id() {
            self.last_request_id = Some(id.to_string());
        }
        self.calls.push(json!({
            "call": failure.map(|f| f.call.as_str()),
            "error": error.kind(),
            "status": error.status(),
            "body": error.body(),
            "detail": error.to_string(),
            "request_id": error.request_id(),
            "correlation_id": failure.and_then(|f| f.correlation_id),
            "response_request_id": failure.and_then(|f| f.response_request_id.clone()),
            "attempts": failure.map(|f| f.attempts),
        }));
    }
}

/// What an execution writes besides its row's end: event-log records of the calls made,
/// the state of a publisher command, and results fed back through the machine. Collected
/// while Microsoft is called and written in the claim's transaction by
/// [`EffectRunner::settle_batch`].
enum Write {
    Record(EffectRecord),
    Command(PublisherOperationUpdate),
    OperationEnded {
        operation_id: Uuid,
        status: CommandStatus,
    },
    Feed {
        event: Event,
        source: EventSource,
    },
    /// Hours of a metering batch settled by Microsoft's answers (or the window).
    UsageSettled(Vec<Settlement>),
    /// Hours of a metering batch sent once more.
    UsageSent(Vec<Uuid>),
    /// A domain event went out: it goes into the ISV's feed with its deliveries, for the
    /// whole batch at once ([`EffectRunner::settle_batch`]).
    Published(Published),
}

/// A published domain event, as the ISV's feed records it.
struct Published {
    /// The CloudEvents id.
    id: String,
    topic: &'static str,
    body: Value,
}

/// A claimed row being executed, with the writes it collects.
struct Execution {
    row: OutboxRow,
    writes: std::sync::Mutex<Vec<Write>>,
}

impl Execution {
    fn new(row: OutboxRow) -> Self {
        Self {
            row,
            writes: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn push(&self, write: Write) {
        if let Ok(mut writes) = self.writes.lock() {
            writes.push(write);
        }
    }

    fn take_writes(&self) -> Vec<Write> {
        self.writes
            .lock()
            .map(|mut writes| std::mem::take(&mut *writes))
            .unwrap_or_default()
    }
}

impl std::ops::Deref for Execution {
    type Target = OutboxRow;

    fn deref(&self) -> &OutboxRow {
        &self.row
    }
}

/// Writes the records and feeds of executions (each with its rows' writes) in `conn`'s
/// transaction: each execution's other writes in order, then every record and feed of them
/// all, in order, through one [`apply::write_many`] (one statement per table for the
/// batch). Returns the decisions the feeds made (to count and to run their effects after
/// commit).
async fn write_all(
    conn: &mut sqlx::PgConnection,
    executions: &[(&OutboxRow, &[Write])],
    policy: &Policy,
) -> Result<Vec<(Event, ApplyOutcome)>, StoreError> {
    let now = OffsetDateTime::now_utc();
    let mut entries = Vec::new();
    for (row, writes) in executions {
        // A call that ended with its result (a GET of the subscription and the one
        // observation it fed, an ACK and the operation's end): its record goes into the
        // result's row.
        if let [Write::Record(record), Write::Feed { event, source }] = writes
            && row.kind.records_with_its_result()
        {
            entries.push(Entry::Apply(
                Apply::new(
                    SubscriptionId::from(row.subscription_id),
                    event,
                    source,
                    now,
                )
                .run_by(Runs::Here)
                .recorded_with(record),
            ));
            continue;
        }
        for write in *writes {
            match write {
                Write::Record(record) => entries.push(Entry::Record {
                    subscription_id: row.subscription_id,
                    record,
                    now,
                }),
                Write::Feed { event, source } => entries.push(Entry::Apply(
                    Apply::new(
                        SubscriptionId::from(row.subscription_id),
                        event,
                        source,
                        now,
                    )
                    // This runner goes on with them: the chain, or its own wake-up when
                    // the row ends.
                    .run_by(Runs::Here),
                )),
                other => write_other(conn, other).await?,
            }
        }
    }
    let outcomes = apply::write_many(conn, policy, &entries).await?;
    Ok(entries
        .iter()
        .zip(outcomes)
        .filter_map(|(step, outcome)| match (step, outcome) {
            (Entry::Apply(command), EntryOutcome::Applied(outcome)) => {
                Some((command.event.clone(), outcome))
            }
            _ => None,
        })
        .collect())
}

/// An execution's write other than a record or a feed.
async fn write_other(conn: &mut sqlx::PgConnection, write: &Write) -> Result<(), StoreError> {
    match write {
        Write::Command(update) => outbox::upsert_publisher_operation(conn, update).await?,
        Write::OperationEnded {
            operation_id,
            status,
        } => outbox::finish_publisher_operation(conn, *operation_id, *status).await?,
        Write::UsageSettled(settled) => {
            for settlement in settled {
                usage::settle_hour(
                    conn,
                    &HourSettlement {
                        hour_id: settlement.hour_id,
                        status: settlement.outcome.as_str(),
                        usage_event_id: settlement.usage_event_id.clone(),
                        billed_quantity: settlement.billed_quantity,
                        reason: settlement.reason.clone(),
                    },
                )
                .await?;
                metrics::record_usage_settled(settlement.outcome.as_str());
            }
        }
        Write::UsageSent(hours) => {
            usage::count_sends(conn, hours).await?;
            metrics::record_usage_submitted(hours.len());
        }
        // Written by `write_all` and by the settle, which writes a batch's events together.
        Write::Record(_) | Write::Feed { .. } | Write::Published(_) => {}
    }
    Ok(())
}

/// Counts effects being executed (for "run until idle").
#[derive(Debug, Default)]
pub struct EffectActivity {
    in_flight: AtomicUsize,
}

impl EffectActivity {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }
}

/// Claims outbox rows and executes them. Cheap to clone.
#[derive(Clone)]
pub struct EffectRunner {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    client: MarketplaceClient,
    publisher: Publisher,
    policy: Policy,
    /// The Fulfillment API base the client calls (shown by `Debug`).
    api_url: Url,
    config: EffectsConfig,
    wake: Notify,
    /// The fast path left a row it could not claim (held back by an earlier row): the
    /// runner is woken again when a fast-path execution ends, since that may free it.
    deferred: AtomicBool,
    /// The runner is shutting down: chains of rounds stop after the round in hand and leave
    /// the rest in the outbox (durable; the next runner takes it), so a stop under a backlog
    /// is bounded by one round, not by the backlog.
    stopping: AtomicBool,
    activity: Arc<EffectActivity>,
    /// One per batch in hand, shared by the runner loop and [`EffectRunner::execute_now`]:
    /// each batch holds a pool connection (its claim's transaction) while Microsoft answers.
    permits: Arc<Semaphore>,
    /// One per execution making its calls, across all batches: at most `concurrency`
    /// calls to Microsoft in flight (§8.1)…
    calls: Semaphore,
    /// …and as many again for the ACKs, so that an ACK whose window is closing never waits
    /// behind a batch of domain events and fetches (deadline first holds at the call too,
    /// not only at the claim). Together they stay within §8.1's ten at the default of 4.
    ack_calls: Semaphore,
    /// Effects running in their own tasks (the runner's, and the follow-ups of the fast
    /// path); the runner waits for them on shutdown.
    tasks: TaskTracker,
}

impl std::fmt::Debug for EffectRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EffectRunner")
            .field("api_url", &self.inner.api_url.as_str())
            .field("config", &self.inner.config)
            .finish()
    }
}

impl EffectRunner {
    pub fn new(
        pool: PgPool,
        client: MarketplaceClient,
        publisher: Publisher,
        policy: Policy,
        api_url: Url,
        config: EffectsConfig,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                client,
                publisher,
                policy,
                api_url,
                wake: Notify::new(),
                deferred: AtomicBool::new(false),
                stopping: AtomicBool::new(false),
                activity: Arc::new(EffectActivity::default()),
                permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
                calls: Semaphore::new(config.concurrency.max(1)),
                ack_calls: Semaphore::new(config.concurrency.max(1)),
                tasks: TaskTracker::new(),
                config,
            }),
        }
    }

    pub fn activity(&self) -> Arc<EffectActivity> {
        self.inner.activity.clone()
    }

    /// Runs due effects until `shutdown`; then finishes the effects in hand and returns.
    /// Claims them in batches ([`outbox::claim_due`]: the ACKs whose window closes soonest
    /// first), each batch holding one permit. Wakes on `NOTIFY fulfillment_outbox` (sent on
    /// commit by decisions nobody runs at once: reconciliation, a consumer without effects),
    /// when a batch ends (the next rows of its subscriptions may be due), when the fast path
    /// leaves a row, and every `poll_interval` (which also finds rows another process's
    /// decision left).
    pub async fn run(self, shutdown: CancellationToken) {
        let config = &self.inner.config;
        let mut listener = match PgListener::connect_with(&self.inner.pool).await {
            Ok(mut listener) => match listener.listen(outbox::NOTIFY_CHANNEL).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "cannot LISTEN for outbox notifications; polling only");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for outbox notifications; polling only");
                None
            }
        };
        let permits = self.inner.permits.clone();
        let tasks = &self.inner.tasks;
        'outer: loop {
            loop {
                let permit = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'outer,
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break 'outer,
                    },
                };
                match outbox::claim_due(&self.inner.pool, BATCH_LIMIT).await {
                    Ok(Some(batch)) => {
                        let runner = self.clone();
                        tasks.spawn(async move {
                            runner.execute_batch(batch).await;
                            drop(permit);
                            runner.inner.wake.notify_one();
                        });
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "cannot claim outbox rows");
                        break;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                lost = next_notification(&mut listener) => {
                    if lost {
                        listener = None;
                    }
                }
                _ = tokio::time::sleep(config.poll_interval) => {}
            }
        }
        self.inner.stopping.store(true, Ordering::SeqCst);
        tasks.close();
        tasks.wait().await;
        tracing::info!("outbox runner stopped");
    }

    /// The fast path after a commit: executes the rows the committed decisions just queued
    /// (any number of subscriptions), so an ACK leaves as soon as its decision is committed
    /// instead of waiting for a runner to notice it (P7). The rows of `ids` that are
    /// claimable now are claimed in one statement ([`outbox::claim_ids`]), run at once and
    /// settled in one transaction, in the caller's task; the rest — rows that waited behind
    /// them (a domain event, a GET), the rows their results queue (the GET after an
    /// operation's end) and the rows that go on at once (an ACK's first poll of its
    /// operation when the PATCH's answer did not tell its end) — continue in rounds of the
    /// same kind in a task of their own, so the caller (a consumer) is free for its next
    /// messages. A row that is not
    /// claimable (held back by an earlier row, held by a runner, not due, done already) is
    /// left to the runners. Returns how many ran in the caller's task.
    pub async fn execute_now(&self, ids: &[Uuid]) -> usize {
        let (ran, rest) = self.round(ids).await;
        if !rest.is_empty() {
            let runner = self.clone();
            self.inner.tasks.spawn(async move {
                runner.execute_rounds(rest).await;
            });
        }
        ran
    }

    /// Rounds of [`Self::round`] until nothing of `todo` is claimable (at most
    /// `MAX_ROUNDS`; what is left then goes to the runners).
    async fn execute_rounds(&self, mut todo: Vec<Uuid>) {
        /// Rounds of one chain; a longer one is left to the runners.
        const MAX_ROUNDS: usize = 8;
        for _ in 0..MAX_ROUNDS {
            if todo.is_empty() || self.inner.stopping.load(Ordering::SeqCst) {
                return;
            }
            let (ran, rest) = self.round(&todo).await;
            if ran == 0 {
                return;
            }
            todo = rest;
        }
        if !todo.is_empty() {
            self.inner.wake.notify_one();
        }
    }

    /// Claims those of `ids` that are claimable now, executes and settles them as one
    /// batch; returns how many ran and what is left to try next: the rows of `ids` not
    /// claimed, then the rows that go on at once and those the results queued.
    async fn round(&self, ids: &[Uuid]) -> (usize, Vec<Uuid>) {
        if ids.is_empty() {
            return (0, Vec::new());
        }
        let Ok(_permit) = self.inner.permits.acquire().await else {
            return (0, Vec::new());
        };
        let batch = match outbox::claim_ids(&self.inner.pool, ids).await {
            Ok(Some(batch)) => batch,
            Ok(None) => {
                // Held back, held elsewhere or done: the runners take what is left, woken
                // when an execution ends.
                self.inner.deferred.store(true, Ordering::SeqCst);
                self.inner.wake.notify_one();
                return (0, Vec::new());
            }
            Err(error) => {
                tracing::warn!(%error, "cannot claim fresh outbox rows; the runners will");
                self.inner.wake.notify_one();
                return (0, Vec::new());
            }
        };
        let claimed: HashSet<Uuid> = batch.rows.iter().map(|row| row.id).collect();
        let mut rest: Vec<Uuid> = ids
            .iter()
            .copied()
            .filter(|id| !claimed.contains(id))
            .collect();
        rest.extend(self.execute_batch(batch).await);
        (claimed.len(), rest)
    }

    /// Executes due rows, a batch at a time, until none is due; returns how many ran. For
    /// tests and one-shot tools.
    pub async fn run_until_idle(&self) -> Result<usize, StoreError> {
        let mut ran = 0;
        while let Some(batch) = outbox::claim_due(&self.inner.pool, BATCH_LIMIT).await? {
            ran += batch.rows.len();
            self.execute_batch(batch).await;
        }
        Ok(ran)
    }

    /// Executes the rows of a batch at once — each call holding one of the `calls`
    /// permits, taken in the claim order, so the ACKs due soonest go first — and settles
    /// them in the batch's transaction; returns the rows that go on at once and those their
    /// results queued.
    async fn execute_batch(&self, batch: ClaimedBatch) -> Vec<Uuid> {
        let count = batch.rows.len();
        self.inner
            .activity
            .in_flight
            .fetch_add(count, Ordering::SeqCst);
        let executed =
            futures_util::future::join_all(batch.rows.iter().cloned().map(|row| self.run_row(row)))
                .await;
        let follow_ups = match self.settle_batch(batch, executed).await {
            Ok(follow_ups) => follow_ups,
            Err(error) => {
                tracing::warn!(%error, rows = count, "cannot settle the outbox rows; they will run again");
                Vec::new()
            }
        };
        self.inner
            .activity
            .in_flight
            .fetch_sub(count, Ordering::SeqCst);
        if self.inner.deferred.swap(false, Ordering::SeqCst) {
            self.inner.wake.notify_one();
        }
        follow_ups
    }

    /// Executes one claimed row's protocol (its calls, not its end): what it collected,
    /// how it ends, and its span (the settle logs in it).
    async fn run_row(&self, row: OutboxRow) -> (Execution, Disposition, tracing::Span) {
        let span = tracing::info_span!(
            "effect",
            subscription_id = %row.subscription_id,
            outbox_id = %row.id,
            kind = %row.kind,
            attempt = row.attempts + 1,
            correlation_id = row.correlation_id.as_deref().unwrap_or(""),
            operation_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        // The execution continues the trace of the decision (and so of the webhook).
        crate::telemetry::continue_trace(&span, row.traceparent.as_deref());
        let execution = Execution::new(row);
        let disposition = async {
            // An ACK row that only polls its operation (its PATCH was answered) calls with
            // the other effects: the ACK permits are for the PATCHes Microsoft's window
            // waits for.
            let patches = execution.kind == EffectKind::AckOperation
                && !Progress::from_stored(&execution.progress, execution.created_at)
                    .awaits_microsoft_only();
            let calls = if patches {
                &self.inner.ack_calls
            } else {
                &self.inner.calls
            };
            let _call = calls.acquire().await;
            if execution.kind == EffectKind::SubmitUsage {
                match self.execute_usage(&execution).await {
                    Ok(disposition) => disposition,
                    Err(error) => self.database_failure(&execution, error),
                }
            } else {
                match serde_json::from_str::<Effect>(execution.effect.get()) {
                    Ok(effect) => {
                        match self.execute(&execution, &record_operation_id(effect)).await {
                            Ok(disposition) => disposition,
                            Err(error) => self.database_failure(&execution, error),
                        }
                    }
                    Err(error) => Disposition::Dead {
                        reason: format!("the stored effect cannot be read: {error}"),
                        why: GiveUpWhy::Permanent,
                    },
                }
            }
        }
        .instrument(span.clone())
        .await;
        (execution, disposition, span)
    }

    /// A database error during an execution: retried like a failed call, so nothing is
    /// half-recorded (the row's writes roll back with it).
    fn database_failure(
        &self,
        execution: &Execution,
        error: impl std::fmt::Display,
    ) -> Disposition {
        let config = &self.inner.config.protocol;
        let failed = u32::try_from(execution.attempts).unwrap_or(0) + 1;
        let error = format!("database: {error}");
        if failed >= config.max_attempts {
            return Disposition::Dead {
                reason: format!("gave up after {failed} attempts: {error}"),
                why: GiveUpWhy::AttemptsExhausted,
            };
        }
        Disposition::Retry {
            after: retry_delay(
                config.backoff_base,
                config.backoff_max,
                failed,
                None,
                rand::random::<f64>(),
            ),
            error,
            progress: Progress::from_stored(&execution.progress, execution.created_at),
        }
    }

    /// Ends the rows of a batch as their dispositions say, in the batch's transaction (one
    /// commit): first the batch's published domain events into the ISV's feed, with their
    /// deliveries, in a short transaction of their own (the feed's lock is global; nothing
    /// waits for it while holding a subscription row); then every row's records and feeds at
    /// once (through `apply::write_many`: one statement per table for the batch) in one
    /// savepoint — if that fails, each row's in a savepoint of its own, so one whose writes
    /// fail is retried with the database error instead (counting an attempt) while the
    /// others stand; then every row's end, one statement per kind of end
    /// ([`ClaimedBatch::end`]). Returns the rows to run next: those rescheduled without
    /// delay (they go on at once, in an execution of their own), then those the results
    /// queued.
    async fn settle_batch(
        &self,
        mut batch: ClaimedBatch,
        mut executed: Vec<(Execution, Disposition, tracing::Span)>,
    ) -> Result<Vec<Uuid>, StoreError> {
        // Subscription rows are locked in id order (stable: a subscription's rows keep the
        // claim order), so two batches settling at once wait for each other instead of
        // deadlocking.
        executed.sort_by_key(|(execution, _, _)| execution.subscription_id);
        let mut fed = Vec::new();
        // Per row of `executed`: the domain events it published, and its other writes.
        let mut published: Vec<Vec<Published>> = Vec::with_capacity(executed.len());
        let mut writes_of: Vec<Vec<Write>> = Vec::with_capacity(executed.len());
        for (execution, disposition, _) in &mut executed {
            if let Disposition::Dead { reason, .. } = &*disposition {
                self.record_dead(execution, reason);
            }
            let (events, writes): (Vec<Write>, Vec<Write>) = execution
                .take_writes()
                .into_iter()
                .partition(|write| matches!(write, Write::Published(_)));
            published.push(
                events
                    .into_iter()
                    .filter_map(|write| match write {
                        Write::Published(event) => Some(event),
                        _ => None,
                    })
                    .collect(),
            );
            writes_of.push(writes);
        }
        // The published events into the ISV's feed first, with their deliveries, in a short
        // transaction of their own. The feed's lock is global: taken after the records it
        // made the batch hold its subscription rows while it waited (the consumer's windows
        // and other settles then waited for those rows); taken before them in the batch's
        // transaction, it was held through the records and the commit, and every publishing
        // settle queued for it. The feed's write is idempotent (an event already in it
        // queues nothing), so a batch that fails to commit after it runs again without a
        // second delivery.
        if published.iter().any(|events| !events.is_empty()) {
            let events: Vec<PublishedEvent<'_>> = executed
                .iter()
                .zip(&published)
                .flat_map(|((execution, _, _), events)| {
                    events.iter().map(|event| PublishedEvent {
                        id: &event.id,
                        subscription_id: execution.subscription_id,
                        topic: event.topic,
                        body: &event.body,
                        decision_id: execution.event_id,
                        correlation_id: execution.correlation_id.as_deref(),
                    })
                })
                .collect();
            let written = async {
                let mut tx = self.inner.pool.begin().await?;
                crate::worker::deliveries::fan_out(&mut tx, &events).await?;
                tx.commit().await?;
                Ok::<(), StoreError>(())
            };
            if let Err(error) = written.await {
                tracing::warn!(%error, events = events.len(), "cannot record the published domain events; retrying their effects");
                for ((execution, disposition, _), events) in executed.iter_mut().zip(&published) {
                    if !events.is_empty() {
                        *disposition = self.database_failure(execution, &error);
                    }
                }
            }
        }
        // Every row's writes at once, in one savepoint; if that fails, row by row, each in
        // a savepoint of its own, so only the rows whose writes fail are retried.
        let at_once = if writes_of.iter().all(Vec::is_empty) {
            Some(Vec::new())
        } else {
            let rows: Vec<(&OutboxRow, &[Write])> = executed
                .iter()
                .zip(&writes_of)
                .filter(|(_, writes)| !writes.is_empty())
                .map(|((execution, _, _), writes)| (&execution.row, writes.as_slice()))
                .collect();
            let mut savepoint = batch.savepoint().await?;
            match write_all(&mut savepoint, &rows, &self.inner.policy).await {
                Ok(applied) => {
                    savepoint.commit().await?;
                    Some(applied)
                }
                Err(error) => {
                    drop(savepoint);
                    tracing::info!(%error, rows = rows.len(), "cannot write the batch's results at once; writing them row by row");
                    None
                }
            }
        };
        match at_once {
            Some(applied) => fed.extend(applied),
            None => {
                for ((execution, disposition, span), writes) in executed.iter_mut().zip(&writes_of)
                {
                    if writes.is_empty() {
                        continue;
                    }
                    let mut savepoint = batch.savepoint().await?;
                    match write_all(
                        &mut savepoint,
                        &[(&execution.row, writes.as_slice())],
                        &self.inner.policy,
                    )
                    .instrument(span.clone())
                    .await
                    {
                        Ok(applied) => {
                            savepoint.commit().await?;
                            fed.extend(applied);
                        }
                        Err(error) => {
                            drop(savepoint);
                            span.in_scope(|| {
                                tracing::warn!(%error, "cannot write the effect's results; retrying the effect");
                            });
                            *disposition = self.database_failure(execution, error);
                        }
                    }
                }
            }
        }
        // Rows that go on at once in an execution of their own (an ACK's first poll of its
        // operation, after the PATCH): next in the chain, like the rows the results queue.
        let go_on: Vec<Uuid> = executed
            .iter()
            .filter(|(_, disposition, _)| {
                matches!(disposition, Disposition::Wait { after, .. } if after.is_zero())
            })
            .map(|(execution, _, _)| execution.id)
            .collect();
        let ends: Vec<(Uuid, End)> = executed
            .into_iter()
            .map(|(execution, disposition, span)| {
                (execution.id, span.in_scope(|| end_of(disposition)))
            })
            .collect();
        batch.end(&ends).await?;
        Ok(go_on
            .into_iter()
            .chain(fed.into_iter().flat_map(|(event, outcome)| {
                apply::count(&event, &outcome);
                match outcome {
                    ApplyOutcome::Decided(applied) => applied.outbox_ids,
                    ApplyOutcome::Duplicate | ApplyOutcome::Changed { .. } => Vec::new(),
                }
            }))
            .collect())
    }

    /// Runs the effect's protocol: asks it for a step, makes the call it names, hands the
    /// answer back, until a step waits, finishes, retries or gives up.
    async fn execute(
        &self,
        execution: &Execution,
        effect: &Effect,
    ) -> Result<Disposition, StoreError> {
        /// Calls in one execution; a protocol that keeps calling is retried later.
        const MAX_CALLS: usize = 8;
        let config = &self.inner.config.protocol;
        let mut progress = Progress::from_stored(&execution.progress, execution.created_at);
        let mut answered: Option<Answered> = None;
        let mut log = CallLog::default();
        let mut extra = serde_json::Map::new();
        let mut note: Option<String> = None;
        for _ in 0..=MAX_CALLS {
            let now = OffsetDateTime::now_utc();
            let next = protocol::step(&Turn {
                effect,
                progress: &progress,
                answered: answered.as_ref(),
                now,
                created_at: execution.created_at,
                attempts: u32::try_from(execution.attempts).unwrap_or(0),
                deadline: execution.due_at,
                jitter: rand::random::<f64>(),
                config,
            });
            progress = next.progress;
            for record in next.records {
                match record {
                    Record::Note(text) => note = Some(text),
                    Record::Command(command) => self.track_command(execution, effect, command),
                    Record::OperationEnded {
                        operation_id,
                        status,
                    } => execution.push(Write::OperationEnded {
                        operation_id: operation_id.as_uuid(),
                        status: status.into(),
                    }),
                }
            }
            let until = |at: OffsetDateTime| Duration::try_from(at - now).unwrap_or_default();
            match next.step {
                Step::Call(call) => {
                    let answer = self
                        .perform(execution, effect, &call, &mut log, &mut extra)
                        .await?;
                    answered = Some(Answered { call, answer });
                }
                Step::WaitUntil(at) => {
                    if let Some(reason) = note {
                        self.record(execution, &log, &reason, extra);
                    }
                    return Ok(Disposition::Wait {
                        after: until(at),
                        progress,
                    });
                }
                Step::Finish { events } => {
                    if let Some(reason) = note {
                        self.record(execution, &log, &reason, extra);
                    }
                    for event in events {
                        self.feed(execution, event, log.last_request_id.clone());
                    }
                    return Ok(Disposition::Done);
                }
                Step::RetryLater { at, because } => {
                    let reason = format!("{} failed: {because}", execution.kind);
                    self.record(execution, &log, &reason, extra);
                    return Ok(Disposition::Retry {
                        error: because,
                        after: until(at),
                        progress,
                    });
                }
                Step::GiveUp { because, why } => {
                    let reason =
                        note.unwrap_or_else(|| format!("{} failed: {because}", execution.kind));
                    self.record(execution, &log, &reason, extra);
                    return Ok(Disposition::Dead {
                        reason: because,
                        why,
                    });
                }
            }
        }
        let error = format!("the protocol made more than {MAX_CALLS} calls in one execution");
        self.record(execution, &log, &error, extra);
        Ok(Disposition::Retry {
            after: self.inner.config.protocol.backoff_base,
            error,
            progress,
        })
    }

    /// Runs a metering batch ([`metering::step`]): sends the hours the step names, hands
    /// the answer back, until the step finishes, retries or gives up.
    async fn execute_usage(&self, execution: &Execution) -> Result<Disposition, StoreError> {
        /// Sends in one execution (an item answered `Error` is sent again at once).
        const MAX_SENDS: usize = 3;
        let batch: UsageBatch = match serde_json::from_str(execution.effect.get()) {
            Ok(batch) => batch,
            Err(error) => {
                return Ok(Disposition::Dead {
                    reason: format!("the stored usage batch cannot be read: {error}"),
                    why: GiveUpWhy::Permanent,
                });
            }
        };
        let config = &self.inner.config.protocol;
        let mut progress = MeteringProgress::from_stored(&execution.progress);
        let mut answered: Option<Answer> = None;
        let mut log = CallLog::default();
        let mut outcomes: Vec<String> = Vec::new();
        let ctx = context(execution);
        for _ in 0..=MAX_SENDS {
            let now = OffsetDateTime::now_utc();
            let next = metering::step(&MeteringTurn {
                batch: &batch,
                progress: &progress,
                answered: answered.as_ref(),
                now,
                attempts: u32::try_from(execution.attempts).unwrap_or(0),
                jitter: rand::random::<f64>(),
                config,
            });
            progress = next.progress;
            for settlement in &next.settled {
                outcomes.push(format!(
                    "{} {}",
                    settlement.outcome.as_str(),
                    settlement.hour_id
                ));
            }
            if !next.settled.is_empty() {
                execution.push(Write::UsageSettled(next.settled));
            }
            let until = |at: OffsetDateTime| Duration::try_from(at - now).unwrap_or_default();
            let summary = |what: &str| {
                if outcomes.is_empty() {
                    what.to_owned()
                } else {
                    format!("{what}; settled: {}", outcomes.join(", "))
                }
            };
            match next.step {
                Step::Call(_) => {
                    let events: Vec<UsageEvent> = batch
                        .items
                        .iter()
                        .filter(|item| next.send.contains(&item.hour_id))
                        .map(|item| UsageEvent {
                            resource_id: batch.subscription_id,
                            quantity: item.quantity,
                            dimension: item.dimension.clone(),
                            effective_start_time: item.hour,
                            plan_id: item.plan_id.clone(),
                        })
                        .collect();
                    execution.push(Write::UsageSent(next.send.clone()));
                    let result = self
                        .inner
                        .client
                        .post_batch_usage_events(&ctx, &events)
                        .await;
                    answered = Some(answer(result, &mut log, |response| {
                        Answer::UsageResults(response.result)
                    }));
                }
                Step::Finish { .. } => {
                    self.record(
                        execution,
                        &log,
                        &summary("usage batch settled"),
                        Default::default(),
                    );
                    return Ok(Disposition::Done);
                }
                Step::RetryLater { at, because } => {
                    self.record(
                        execution,
                        &log,
                        &summary(&format!("usage batch to be sent again: {because}")),
                        Default::default(),
                    );
                    return Ok(Disposition::RetryUsage {
                        error: because,
                        after: until(at),
                        progress: progress.to_stored(),
                    });
                }
                Step::GiveUp { because, why } => {
                    self.record(
                        execution,
                        &log,
                        &summary(&format!("usage batch failed: {because}")),
                        Default::default(),
                    );
                    return Ok(Disposition::Dead {
                        reason: because,
                        why,
                    });
                }
                Step::WaitUntil(at) => {
                    return Ok(Disposition::RetryUsage {
                        error: "waiting".into(),
                        after: until(at),
                        progress: progress.to_stored(),
                    });
                }
            }
        }
        Ok(Disposition::RetryUsage {
            error: format!("items still answered Error after {MAX_SENDS} sends"),
            after: config.backoff_base,
            progress: progress.to_stored(),
        })
    }

    /// Makes one call of a step and classifies its result.
    async fn perform(
        &self,
        row: &Execution,
        effect: &Effect,
        call: &Call,
        log: &mut CallLog,
        extra: &mut serde_json::Map<String, Value>,
    ) -> Result<Answer, StoreError> {
        let client = &self.inner.client;
        let ctx = context(row);
        let sid = row.subscription_id;
        Ok(match call {
            Call::GetSubscription => answer(client.get_subscription(&ctx, sid).await, log, |s| {
                Answer::Subscription(Box::new(s))
            }),
            Call::Activate { plan_id, quantity } => answer(
                client.activate(&ctx, sid, plan_id, *quantity).await,
                log,
                |_| Answer::Activated,
            ),
            Call::Acknowledge {
                operation_id,
                status,
            } => {
                let wire = match status {
                    fulfillment_state_machine::AckStatus::Success => UpdateOperationStatus::Success,
                    fulfillment_state_machine::AckStatus::Failure => UpdateOperationStatus::Failure,
                };
                // Microsoft's clock: the webhook's receipt, carried in the row's deadline
                // (rows queued before it existed read it from the event log).
                let received_at = match row.due_at {
                    Some(due_at) => Some(due_at - ACK_WINDOW),
                    None => outbox::event_received_at(&self.inner.pool, row.event_id).await?,
                };
                let result = client
                    .update_operation(&ctx, sid, operation_id.as_uuid(), wire)
                    .await;
                let webhook_to_ack = received_at.map(|at| OffsetDateTime::now_utc() - at);
                let webhook_to_ack_ms = webhook_to_ack.map(|d| d.whole_milliseconds());
                extra.insert("operation_id".into(), json!(operation_id));
                extra.insert("webhook_to_ack_ms".into(), json!(webhook_to_ack_ms));
                if let Ok(done) = &result {
                    if let Some(elapsed) = webhook_to_ack {
                        let elapsed = Duration::try_from(elapsed).unwrap_or_default();
                        metrics::record_webhook_to_ack(elapsed);
                        if elapsed > ACK_WINDOW {
                            metrics::record_ack_late();
                        }
                    }
                    if done.value == UpdateOutcome::AlreadyFinal {
                        let kind = outbox::event_kind(&self.inner.pool, row.event_id)
                            .await
                            .ok()
                            .flatten();
                        metrics::record_auto_accepted(operation_action(kind.as_deref()));
                    }
                    tracing::info!(
                        operation_id = %operation_id,
                        webhook_to_ack_ms,
                        outcome = ?done.value,
                        "operation acknowledged"
                    );
                }
                answer(result, log, Answer::Acknowledged)
            }
            Call::ChangePlan { plan_id } => answer(
                client.change_plan(&ctx, sid, plan_id.as_str()).await,
                log,
                accepted,
            ),
            Call::ChangeQuantity { quantity } => answer(
                client.change_quantity(&ctx, sid, quantity.get()).await,
                log,
                accepted,
            ),
            Call::Cancel => answer(client.delete_subscription(&ctx, sid).await, log, accepted),
            Call::GetOperation {
                operation_id,
                location,
            } => {
                extra.insert("operation_id".into(), json!(operation_id));
                let result = match location.as_deref().map(Url::parse) {
                    Some(Ok(url)) => client.get_operation_at(&ctx, &url).await,
                    _ => {
                        client
                            .get_operation(&ctx, sid, operation_id.as_uuid())
                            .await
                    }
                };
                if let Ok(found) = &result {
                    extra.insert(
                        "error_status_code".into(),
                        json!(found.value.error_status_code),
                    );
                    extra.insert("error_message".into(), json!(found.value.error_message));
                }
                answer(result, log, |operation| Answer::Operation {
                    error: operation.error_message.clone(),
                    status: operation.status,
                })
            }
            Call::SubmitUsage => Answer::Unexpected {
                status: None,
                detail: "a usage batch is sent by its own runner".into(),
            },
            Call::PublishDomainEvent => match effect {
                Effect::PublishDomainEvent(event) => self.publish_domain_event(row, event).await?,
                other => Answer::Unexpected {
                    status: None,
                    detail: format!("{} has no domain event", other.kind_str()),
                },
            },
        })
    }

    /// Publishes the CloudEvent on the domain exchange (confirmed).
    async fn publish_domain_event(
        &self,
        row: &Execution,
        event: &DomainEvent,
    ) -> Result<Answer, StoreError> {
        let id = match &row.cloud_event_id {
            Some(id) => id.clone(),
            // Queued without it (the notice emitter, rows older than the column).
            None => {
                let (position, total) =
                    outbox::domain_event_position(&self.inner.pool, row).await?;
                let position = usize::try_from(position).unwrap_or(0);
                publish::cloud_event_id(row.event_id, position, usize::try_from(total).unwrap_or(0))
            }
        };
        let mut body = cloud_event(&id, row.subscription_id, event, row.created_at);
        if event.kind == fulfillment_state_machine::DomainEventKind::Activated {
            // What the customer answered on the landing page before asking for activation.
            let answers = crate::store::onboarding::find(&self.inner.pool, row.subscription_id)
                .await?
                .map(|row| row.answers);
            with_onboarding(&mut body, answers);
        }
        let meta = MessageMeta {
            message_id: id.clone(),
            correlation_id: row.correlation_id.clone().unwrap_or_else(|| id.clone()),
            traceparent: crate::telemetry::current_traceparent(),
            subscription_id: Some(row.subscription_id),
        };
        let bytes = serde_json::to_vec(&body).expect("a CloudEvent always serializes");
        // The ISV's webhooks and feed (docs/webhooks.md), written when the batch settles:
        // queued once per event and endpoint.
        row.push(Write::Published(Published {
            id: id.clone(),
            topic: event.kind.routing_key(),
            body,
        }));
        match self
            .inner
            .publisher
            .publish_domain_event(event.kind.routing_key(), &bytes, &meta)
            .await
        {
            Ok(()) => {
                tracing::info!(event_id = %id, routing_key = event.kind.routing_key(), "domain event published");
                Ok(Answer::Published)
            }
            Err(error) => Ok(Answer::PublishFailed {
                detail: format!("cannot publish the domain event: {error}"),
            }),
        }
    }

    // ---- helpers ---------------------------------------------------------------------

    /// The command row of a publisher change, as a step reported it.
    fn track_command(&self, row: &Execution, effect: &Effect, command: CommandRecord) {
        let (command_id, kind, plan, quantity) = match effect {
            Effect::RequestPlanChange {
                command_id,
                plan_id,
            } => (
                command_id,
                "ChangePlan",
                Some(plan_id.as_str().to_owned()),
                None,
            ),
            Effect::RequestQuantityChange {
                command_id,
                quantity,
            } => (
                command_id,
                "ChangeQuantity",
                None,
                i32::try_from(quantity.get()).ok(),
            ),
            Effect::RequestCancel { command_id } => (command_id, "Cancel", None, None),
            _ => return,
        };
        if let Some(operation_id) = command.operation_id {
            tracing::info!(operation_id = %operation_id, status = command.status.as_str(), "publisher command");
        }
        row.push(Write::Command(PublisherOperationUpdate {
            command_id: command_id.as_uuid(),
            subscription_id: row.subscription_id,
            kind,
            target_plan_id: plan,
            target_quantity: quantity,
            operation_id: command.operation_id,
            operation_location: command.location,
            status: command.status,
            last_error: command.error,
        }));
    }

    /// Feeds an effect's result back through the machine (no inbox key: the machine's
    /// own key check makes a repeat harmless). Written with the row's end.
    fn feed(&self, row: &Execution, event: Event, request_id: Option<String>) {
        let source = EventSource {
            correlation_id: row.correlation_id.clone(),
            request_id,
            trace_id: crate::telemetry::trace_id_of(&tracing::Span::current()),
            traceparent: crate::telemetry::current_traceparent(),
            ..EventSource::default()
        };
        row.push(Write::Feed { event, source });
    }

    /// Appends the execution to the event log, with the row's end.
    fn record(
        &self,
        row: &Execution,
        log: &CallLog,
        reason: &str,
        extra: serde_json::Map<String, Value>,
    ) {
        let mut details = json!({
            "outbox_id": row.id,
            "attempt": row.attempts + 1,
            "effect": row.effect,
            "calls": log.calls,
        });
        if let Some(details) = details.as_object_mut() {
            details.extend(extra);
        }
        row.push(Write::Record(EffectRecord {
            event_kind: format!("effect:{}", row.kind),
            event_key: format!("effect:{}:{}", row.id, Uuid::now_v7()),
            details,
            reason: reason.to_string(),
            correlation_id: row.correlation_id.clone(),
            request_id: log.last_request_id.clone(),
        }));
    }

    fn record_dead(&self, row: &Execution, reason: &str) {
        let mut extra = serde_json::Map::new();
        extra.insert("dead".into(), json!(true));
        self.record(row, &CallLog::default(), &format!("dead: {reason}"), extra);
    }
}

/// How a batch's row ends, as its disposition says (logged in the row's span).
fn end_of(disposition: Disposition) -> End {
    match disposition {
        Disposition::Done => {
            tracing::debug!("effect done");
            End::Done
        }
        Disposition::Wait { after, progress } => End::Reschedule {
            delay: after,
            failed: false,
            error: None,
            awaits_microsoft: progress.awaits_microsoft_only(),
            progress: progress.to_stored(),
        },
        Disposition::Retry {
            error,
            after,
            progress,
        } => {
            tracing::warn!(error, ?after, "effect failed; retrying later");
            End::Reschedule {
                delay: after,
                failed: true,
                error: Some(error),
                awaits_microsoft: progress.awaits_microsoft_only(),
                progress: progress.to_stored(),
            }
        }
        Disposition::RetryUsage {
            error,
            after,
            progress,
        } => {
            tracing::warn!(
                error,
                ?after,
                "usage batch not settled; sending again later"
            );
            End::Reschedule {
                delay: after,
                failed: true,
                error: Some(error),
                progress,
                awaits_microsoft: false,
            }
        }
        Disposition::Dead { reason, why } => {
            metrics::record_dead_letter(match why {
                GiveUpWhy::AttemptsExhausted => DeadLetterReason::EffectAttemptsExhausted,
                GiveUpWhy::Permanent | GiveUpWhy::OutcomeUnknown => {
                    DeadLetterReason::EffectPermanent
                }
            });
            tracing::error!(reason, "effect dead");
            End::Bury {
                reason,
                failed: true,
            }
        }
    }
}

/// The answer of a call: its value on success, its class on failure; the call goes into
/// the execution's log either way.
fn answer<T>(
    result: Result<Response<T>, ApiError>,
    log: &mut CallLog,
    success: impl FnOnce(T) -> Answer,
) -> Answer {
    match result {
        Ok(response) => {
            log.ok(&response.meta);
            success(response.value)
        }
        Err(error) => {
            log.err(&error);
            classify(&error)
        }
    }
}

fn accepted(accepted: marketplace::Accepted) -> Answer {
    Answer::Accepted {
        operation_id: accepted.operation_id,
        location: accepted.operation_location.to_string(),
        retry_after: accepted.retry_after,
    }
}

/// The answer class of a failed call (the client's error classes refined where the
/// protocols need more: was the request sent, is a 400 the "locked" one).
fn classify(error: &ApiError) -> Answer {
    let detail = error.to_string();
    let status = error.status();
    let token_call = error
        .failure()
        .is_some_and(|f| f.call == marketplace::Call::EntraToken);
    match error {
        // The token request failed: the call itself never left.
        _ if token_call && error.is_retryable() => Answer::NotSent { detail },
        ApiError::Throttled { retry_after, .. } if status == Some(429) => Answer::Throttled {
            retry_after: *retry_after,
            detail,
        },
        ApiError::Throttled { retry_after, .. } => Answer::ServerError {
            status: status.unwrap_or(503),
            retry_after: *retry_after,
            detail,
        },
        ApiError::Transient { cause, .. } => match cause {
            TransientCause::Connect => Answer::NotSent { detail },
            TransientCause::Timeout => Answer::Timeout { detail },
            TransientCause::Network => Answer::ConnectionReset { detail },
            TransientCause::Status => Answer::ServerError {
                status: status.unwrap_or(500),
                retry_after: None,
                detail,
            },
        },
        ApiError::Unauthorized { .. } => Answer::Unauthorized {
            status: status.unwrap_or(401),
            detail,
        },
        ApiError::NotFound { .. } => Answer::NotFound { detail },
        ApiError::Conflict { .. } => Answer::Conflict { detail },
        ApiError::Permanent { .. } if status == Some(400) => Answer::BadRequest {
            locked: says_locked(error.body().unwrap_or_default()),
            detail,
        },
        _ => Answer::Unexpected { status, detail },
    }
}

/// Microsoft's 400 "Subscription is locked due to pending operations" (P11, §15.2).
fn says_locked(body: &str) -> bool {
    let body = body.to_ascii_lowercase();
    body.contains("locked") || body.contains("pending operation")
}

/// Puts the effect's operation id (if it has one) on the current span.
fn record_operation_id(effect: Effect) -> Effect {
    let operation_id = match &effect {
        Effect::AckOperation { operation_id, .. } | Effect::PollOperation { operation_id, .. } => {
            Some(*operation_id)
        }
        _ => None,
    };
    if let Some(id) = operation_id {
        tracing::Span::current().record("operation_id", tracing::field::display(id));
    }
    effect
}

/// The Marketplace action of the operation an ACK answers, from the kind of the event that
/// decided the ACK (`fulfillment_auto_accepted_total{action}`).
fn operation_action(event_kind: Option<&str>) -> &'static str {
    match event_kind {
        Some("WebhookChangePlan") => "ChangePlan",
        Some("WebhookChangeQuantity") => "ChangeQuantity",
        Some("WebhookReinstate") => "Reinstate",
        Some("WebhookSuspend") => "Suspend",
        Some("WebhookUnsubscribe") => "Unsubscribe",
        Some("WebhookRenew") => "Renew",
        _ => "other",
    }
}

/// The job's correlation id for Microsoft: the message's, or the outbox row id.
fn context(row: &OutboxRow) -> CallContext {
    let id = row
        .correlation_id
        .as_deref()
        .and_then(|c| Uuid::parse_str(c).ok())
        .unwrap_or(row.id);
    CallContext::new(id)
}

/// Waits for the next `NOTIFY`; `true` when the listener broke (fall back to polling).
async fn next_notification(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(listener) => match listener.recv().await {
            Ok(_) => false,
            Err(error) => {
                tracing::warn!(%error, "outbox listener lost; polling only");
                true
            }
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use fulfillment_state_machine::{DomainEventKind, StateName};

    use super::*;
    use crate::marketplace::Failure;

    fn failure(call: marketplace::Call, status: Option<u16>, body: &str) -> Box<Failure> {
        let failure = Failure::new(call, "test");
        Box::new(match status {
            Some(status) => failure.with_status(status, body.as_bytes()),
            None => failure,
        })
    }

    fn transient(cause: TransientCause, status: Option<u16>) -> ApiError {
        ApiError::Transient {
            cause,
            failure: failure(marketplace::Call::ChangePlan, status, ""),
        }
    }

    #[test]
    fn failed_calls_become_the_answer_classes_of_the_protocols() {
        use marketplace::Call as Wire;
        let class = |error: ApiError| match classify(&error) {
            Answer::BadRequest { locked, .. } => format!("400 locked={locked}"),
            Answer::Unauthorized { status, .. } => format!("unauthorized {status}"),
            Answer::NotFound { .. } => "not found".into(),
            Answer::Conflict { .. } => "conflict".into(),
            Answer::Throttled { retry_after, .. } => format!("throttled {retry_after:?}"),
            Answer::ServerError { status, .. } => format!("5xx {status}"),
            Answer::Timeout { .. } => "timeout".into(),
            Answer::ConnectionReset { .. } => "reset".into(),
            Answer::NotSent { .. } => "not sent".into(),
            Answer::Unexpected { status, .. } => format!("unexpected {status:?}"),
            other => format!("{other:?}"),
        };
        let permanent = |status: u16, body: &str| ApiError::Permanent {
            failure: failure(Wire::ChangePlan, Some(status), body),
        };
        let locked = r#"{"error":{"message":"Subscription is locked due to pending operations"}}"#;
        assert_eq!(class(permanent(400, locked)), "400 locked=true");
        assert_eq!(
            class(permanent(400, "Plan gold is not available")),
            "400 locked=false"
        );
        assert_eq!(class(permanent(422, "")), "unexpected Some(422)");
        assert_eq!(class(transient(TransientCause::Timeout, None)), "timeout");
        assert_eq!(class(transient(TransientCause::Network, None)), "reset");
        assert_eq!(class(transient(TransientCause::Connect, None)), "not sent");
        assert_eq!(
            class(transient(TransientCause::Status, Some(502))),
            "5xx 502"
        );
        let throttled = |status: u16| ApiError::Throttled {
            retry_after: Some(Duration::from_secs(3)),
            failure: failure(Wire::ChangePlan, Some(status), ""),
        };
        assert_eq!(class(throttled(429)), "throttled Some(3s)");
        // A 503 with Retry-After may have been processed: not "never sent".
        assert_eq!(class(throttled(503)), "5xx 503");
        // The token request failed: the call itself never left.
        let token = ApiError::Transient {
            cause: TransientCause::Status,
            failure: failure(Wire::EntraToken, Some(503), ""),
        };
        assert_eq!(class(token), "not sent");
        let unauthorized = ApiError::Unauthorized {
            failure: failure(Wire::GetSubscription, Some(403), ""),
        };
        assert_eq!(class(unauthorized), "unauthorized 403");
        let conflict = ApiError::Conflict {
            failure: failure(Wire::DeleteSubscription, Some(409), ""),
        };
        assert_eq!(class(conflict), "conflict");
    }

    #[test]
    fn a_domain_event_becomes_a_cloudevent_with_a_stable_id() {
        let id = Uuid::nil();
        let event = DomainEvent {
            kind: DomainEventKind::PlanChanged,
            plan_id: Some(PlanId::parse("gold").unwrap()),
            quantity: Some(Quantity::new(3).unwrap()),
            state: StateName::Subscribed,
            reason: None,
        };
        let ce = cloud_event("abc:2", id, &event, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(ce["specversion"], "1.0");
        assert_eq!(ce["id"], "abc:2");
        assert_eq!(ce["type"], "com.fulfillment.subscription.plan_changed");
        assert_eq!(ce["source"], format!("urn:fulfillment:subscription:{id}"));
        assert_eq!(ce["subject"], id.to_string());
        assert_eq!(ce["time"], "1970-01-01T00:00:00Z");
        assert_eq!(ce["data"]["planId"], "gold");
        assert_eq!(ce["data"]["quantity"], 3);
        assert_eq!(ce["data"]["state"], "Subscribed");
    }
}
