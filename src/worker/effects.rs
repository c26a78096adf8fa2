//! The outbox runner and the effect executors: carries out what the machine decided, after
//! commit, and feeds the results back through the machine (design.md guarantee 4).
//!
//! Every executor is idempotent (at-least-once: a crash re-runs the row). Each execution
//! that called Microsoft is recorded in the event log as an `outcome = 'recorded'` row with
//! the request ids, correlation id, statuses and Microsoft's body on failure. Waiting polls
//! (an operation still `InProgress`, an activation still pending) are not recorded, only
//! their outcome.
//!
//! Failures: retryable errors reschedule the row with jittered exponential backoff
//! ([`retry_delay`], honouring `Retry-After`); after [`EffectsConfig::max_attempts`] failed
//! attempts, or at once for a permanent error, the row is `dead` with the reason, also in
//! the event log, for an operator to replay.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fulfillment_state_machine::{
    AckStatus, CommandId, DomainEvent, Effect, Event, OperationId, OperationStatus, PlanId, Policy,
    Quantity, SubscriptionId,
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

use crate::marketplace::{
    self, CallContext, CallMeta, Error as ApiError, MarketplaceClient, OperationAction,
    SubscriptionStatus, UpdateOperationStatus, UpdateOutcome,
};
use crate::metrics::{self, DeadLetterReason};
use crate::queue::{MessageMeta, Publisher};
use crate::store::StoreError;
use crate::store::ledger::{self, EffectRecord, EventSource};
use crate::store::outbox::{self, Claimed, OutboxRow, PublisherOperationUpdate};
use crate::worker::translate;

/// How effects are run; tests shrink the clocks.
#[derive(Debug, Clone)]
pub struct EffectsConfig {
    /// Effects executed at once, by the runners and the consumer's fast path together (each
    /// holds a claimed row, and its connection, and calls Microsoft at most once at a time;
    /// §8.1 suggests ≤ 10 calls in flight). Keep it at least 2 below the pool size.
    pub concurrency: usize,
    /// Poll of the outbox between wake-ups: the longest a row another worker process left waits.
    pub poll_interval: Duration,
    /// Failed attempts before a row is dead.
    pub max_attempts: u32,
    /// First retry delay; doubles per failed attempt, with jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Between GETs of an Operation-Location still in progress (§7.2: every few seconds).
    pub operation_poll_interval: Duration,
    /// Polling stops after this; the subscription is then fetched and observed (§7.2).
    pub operation_poll_cap: Duration,
    /// Between GETs while an activation is still pending (P4: it is asynchronous).
    pub activation_check_interval: Duration,
    /// Activation checks stop after this; the subscription is observed as it is.
    pub activation_wait_cap: Duration,
}

impl Default for EffectsConfig {
    fn default() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_millis(500),
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            operation_poll_interval: Duration::from_millis(1500),
            operation_poll_cap: Duration::from_secs(30 * 60),
            activation_check_interval: Duration::from_secs(2),
            activation_wait_cap: Duration::from_secs(30 * 60),
        }
    }
}

impl EffectsConfig {
    /// Millisecond clocks for tests.
    pub fn fast() -> Self {
        Self {
            concurrency: 4,
            poll_interval: Duration::from_millis(100),
            max_attempts: 8,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            operation_poll_interval: Duration::from_millis(100),
            operation_poll_cap: Duration::from_secs(20),
            activation_check_interval: Duration::from_millis(100),
            activation_wait_cap: Duration::from_secs(20),
        }
    }
}

/// The delay before retry number `failed_attempts` (1 for the first retry): `base · 2^(n-1)`
/// capped at `max`, scaled by a jitter in `[0.5, 1.0]` (`jitter` in `0..=1`), and never
/// shorter than Microsoft's `Retry-After` (itself capped at `max`).
pub fn retry_delay(
    base: Duration,
    max: Duration,
    failed_attempts: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(20);
    let capped = base.saturating_mul(1u32 << exponent).min(max);
    let jittered = capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(after) => jittered.max(after.min(max)),
        None => jittered,
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

/// How one execution ended.
#[derive(Debug)]
enum Disposition {
    Done,
    /// Microsoft is still working: look again later; not a failure.
    Wait {
        after: Duration,
        progress: Value,
    },
    /// A retryable failure: counts against the budget.
    Retry {
        error: String,
        retry_after: Option<Duration>,
        progress: Value,
    },
    /// Permanent: the row is dead.
    Dead {
        reason: String,
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

    fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }
}

/// What an execution writes besides its row's end: event-log records of the calls made
/// and results fed back through the machine. Collected while Microsoft is called and
/// written in the claim's transaction by [`EffectRunner::settle`].
enum Write {
    Record(EffectRecord),
    Feed { event: Event, source: EventSource },
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

/// Writes an execution's records and feeds, in order, in `conn`'s transaction; returns the
/// decisions the feeds made (to count and to run their effects after commit).
async fn write_all(
    conn: &mut sqlx::PgConnection,
    row: &OutboxRow,
    writes: Vec<Write>,
    policy: &Policy,
) -> Result<Vec<(Event, ledger::Applied)>, StoreError> {
    let now = OffsetDateTime::now_utc();
    let mut fed = Vec::new();
    for write in writes {
        match write {
            Write::Record(record) => {
                ledger::record_effect_result_in(conn, row.subscription_id, &record, now).await?;
            }
            Write::Feed { event, source } => {
                let applied = ledger::apply_in(
                    conn,
                    SubscriptionId::from(row.subscription_id),
                    &event,
                    &source,
                    now,
                    policy,
                    // This runner goes on with them: the chain, or its own wake-up when
                    // the row ends.
                    ledger::Runs::Here,
                )
                .await?;
                fed.push((event, applied));
            }
        }
    }
    Ok(fed)
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
    /// The Fulfillment API base, to rebuild an operation's location (§4.10).
    api_url: Url,
    config: EffectsConfig,
    wake: Notify,
    /// The fast path left a row it could not claim (held back by an earlier row): the
    /// runner is woken again when a fast-path execution ends, since that may free it.
    deferred: AtomicBool,
    activity: Arc<EffectActivity>,
    /// One per effect in hand, shared by the runner loop and [`EffectRunner::execute_now`]:
    /// each claim holds a pool connection while Microsoft answers.
    permits: Arc<Semaphore>,
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
                activity: Arc::new(EffectActivity::default()),
                permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
                tasks: TaskTracker::new(),
                config,
            }),
        }
    }

    pub fn activity(&self) -> Arc<EffectActivity> {
        self.inner.activity.clone()
    }

    /// Runs due effects until `shutdown`; then finishes the effects in hand and returns.
    /// Wakes on `NOTIFY fulfillment_outbox` (sent on commit by decisions nobody runs at
    /// once: reconciliation, a consumer without effects), when an effect ends (the next row
    /// of its subscription may be due), when the fast path leaves a row, and every
    /// `poll_interval` (which also finds rows another process's decision left).
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
                match outbox::claim_next(&self.inner.pool).await {
                    Ok(Some(claimed)) => {
                        let runner = self.clone();
                        runner
                            .inner
                            .activity
                            .in_flight
                            .fetch_add(1, Ordering::SeqCst);
                        tasks.spawn(async move {
                            runner.execute_claimed(claimed).await;
                            runner
                                .inner
                                .activity
                                .in_flight
                                .fetch_sub(1, Ordering::SeqCst);
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
        tasks.close();
        tasks.wait().await;
        tracing::info!("outbox runner stopped");
    }

    /// The fast path after a commit: executes the rows a decision just queued, in order, in
    /// the caller's task, so an ACK leaves as soon as its decision is committed instead of
    /// waiting for a runner to notice it (P7). The rows their results queue (confirming the
    /// operation, the GET after it) continue in a task of their own, so the caller — one
    /// subscription's consumer lane — is free for the subscription's next message. Each row
    /// is claimed like any other ([`outbox::claim`]); one that is not claimable now (held
    /// back by an earlier row, held by a runner, not due, done already) is left to the
    /// runners. Returns how many ran in the caller's task.
    pub async fn execute_now(&self, ids: &[Uuid]) -> usize {
        let (ran, follow_ups) = self
            .execute_chain(ids.iter().copied().collect(), false)
            .await;
        if !follow_ups.is_empty() {
            let runner = self.clone();
            self.inner.tasks.spawn(async move {
                runner.execute_chain(follow_ups, true).await;
            });
        }
        ran
    }

    /// Executes `todo` in order; with `follow` also the rows their results queue (at most
    /// 16 executions), otherwise returns those.
    async fn execute_chain(
        &self,
        mut todo: VecDeque<Uuid>,
        follow: bool,
    ) -> (usize, VecDeque<Uuid>) {
        /// Executions per chain; a longer one is left to the runners.
        const MAX_CHAIN: usize = 16;
        let mut follow_ups = VecDeque::new();
        let mut ran = 0;
        let mut left_over = false;
        while let Some(id) = todo.pop_front() {
            if ran == MAX_CHAIN {
                left_over = true;
                break;
            }
            let Ok(_permit) = self.inner.permits.acquire().await else {
                break;
            };
            let claimed = match outbox::claim(&self.inner.pool, id).await {
                Ok(Some(claimed)) => claimed,
                Ok(None) => {
                    self.inner.deferred.store(true, Ordering::SeqCst);
                    left_over = true;
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot claim a fresh outbox row; the runners will");
                    left_over = true;
                    break;
                }
            };
            self.inner.activity.in_flight.fetch_add(1, Ordering::SeqCst);
            let queued = self.execute_claimed(claimed).await;
            self.inner.activity.in_flight.fetch_sub(1, Ordering::SeqCst);
            if self.inner.deferred.swap(false, Ordering::SeqCst) {
                self.inner.wake.notify_one();
            }
            if follow {
                todo.extend(queued);
            } else {
                follow_ups.extend(queued);
            }
            ran += 1;
        }
        if left_over {
            self.inner.wake.notify_one();
        }
        (ran, follow_ups)
    }

    /// Executes due rows one by one until none is due; returns how many ran. For tests
    /// and one-shot tools.
    pub async fn run_until_idle(&self) -> Result<usize, StoreError> {
        let mut ran = 0;
        while let Some(claimed) = outbox::claim_next(&self.inner.pool).await? {
            self.execute_claimed(claimed).await;
            ran += 1;
        }
        Ok(ran)
    }

    /// Executes a claimed row and ends it; returns the outbox rows its results queued.
    async fn execute_claimed(&self, claimed: Claimed) -> Vec<Uuid> {
        let row = claimed.row.clone();
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
        async move {
            let execution = Execution::new(row);
            let disposition = match serde_json::from_value::<Effect>(execution.effect.clone()) {
                Ok(effect) => match self.execute(&execution, &record_operation_id(effect)).await {
                    Ok(disposition) => disposition,
                    Err(error) => Disposition::Retry {
                        error: format!("database: {error}"),
                        retry_after: None,
                        progress: execution.progress.clone(),
                    },
                },
                Err(error) => Disposition::Dead {
                    reason: format!("the stored effect cannot be read: {error}"),
                },
            };
            match self.settle(claimed, execution, disposition).await {
                Ok(follow_ups) => follow_ups,
                Err(error) => {
                    tracing::warn!(%error, "cannot settle the outbox row; it will run again");
                    Vec::new()
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Ends the row as `disposition` says, writing what the execution recorded and fed in
    /// the same transaction (one commit). When those writes fail, the row is retried with
    /// the database error instead (counting an attempt), so nothing is half-recorded.
    async fn settle(
        &self,
        mut claimed: Claimed,
        execution: Execution,
        disposition: Disposition,
    ) -> Result<Vec<Uuid>, StoreError> {
        let config = &self.inner.config;
        let row = execution.row.clone();
        let mut disposition = disposition;
        // This execution's failure, if it fails, is attempt number `failed`.
        let failed = u32::try_from(row.attempts).unwrap_or(0) + 1;
        let gave_up = |error: &str| format!("gave up after {failed} attempts: {error}");
        // Burying records why, with the rest.
        let dead_reason = match &disposition {
            Disposition::Retry { error, .. } if failed >= config.max_attempts => {
                Some(gave_up(error))
            }
            Disposition::Dead { reason } => Some(reason.clone()),
            _ => None,
        };
        if let Some(reason) = &dead_reason {
            self.record_dead(&execution, reason).await;
        }
        let mut fed = Vec::new();
        let writes = execution.take_writes();
        if !writes.is_empty() {
            let mut savepoint = claimed.savepoint().await?;
            match write_all(&mut savepoint, &row, writes, &self.inner.policy).await {
                Ok(applied) => {
                    savepoint.commit().await?;
                    fed = applied;
                }
                Err(error) => {
                    drop(savepoint);
                    tracing::warn!(%error, "cannot write the effect's results; retrying the effect");
                    disposition = Disposition::Retry {
                        error: format!("database: {error}"),
                        retry_after: None,
                        progress: row.progress.clone(),
                    };
                }
            }
        }
        let ended = match disposition {
            Disposition::Done => {
                tracing::debug!("effect done");
                claimed.complete().await
            }
            Disposition::Wait { after, progress } => {
                claimed.reschedule(after, false, None, &progress).await
            }
            Disposition::Retry {
                error,
                retry_after,
                progress,
            } => {
                if failed >= config.max_attempts {
                    let reason = dead_reason.unwrap_or_else(|| gave_up(&error));
                    metrics::record_dead_letter(DeadLetterReason::EffectAttemptsExhausted);
                    tracing::error!(reason, "effect dead");
                    claimed.bury(&reason, true).await
                } else {
                    let delay = retry_delay(
                        config.backoff_base,
                        config.backoff_max,
                        failed,
                        retry_after,
                        rand::random::<f64>(),
                    );
                    tracing::warn!(error, ?delay, "effect failed; retrying later");
                    claimed
                        .reschedule(delay, true, Some(&error), &progress)
                        .await
                }
            }
            Disposition::Dead { reason } => {
                metrics::record_dead_letter(DeadLetterReason::EffectPermanent);
                tracing::error!(reason, "effect dead");
                claimed.bury(&reason, true).await
            }
        };
        ended?;
        Ok(fed
            .into_iter()
            .flat_map(|(event, applied)| {
                ledger::record_applied(&event, &applied);
                applied.outbox_ids
            })
            .collect())
    }

    async fn execute(&self, row: &Execution, effect: &Effect) -> Result<Disposition, StoreError> {
        match effect {
            Effect::Activate { plan_id, quantity } => {
                self.activate(row, plan_id.as_ref(), *quantity).await
            }
            Effect::AckOperation {
                operation_id,
                status,
                best_effort,
            } => {
                self.ack_operation(row, *operation_id, *status, *best_effort)
                    .await
            }
            Effect::FetchSubscription => self.fetch_subscription(row).await,
            Effect::RequestPlanChange {
                command_id,
                plan_id,
            } => {
                self.request_change(row, *command_id, Change::Plan(plan_id))
                    .await
            }
            Effect::RequestQuantityChange {
                command_id,
                quantity,
            } => {
                self.request_change(row, *command_id, Change::Quantity(*quantity))
                    .await
            }
            Effect::RequestCancel { command_id } => {
                self.request_change(row, *command_id, Change::Cancel).await
            }
            Effect::PollOperation {
                command_id: _,
                operation_id,
                location,
                retry_after_secs,
            } => {
                let retry_after = retry_after_secs.map(Duration::from_secs);
                self.poll_operation(row, *operation_id, location, retry_after)
                    .await
            }
            Effect::ConfirmOperation { operation_id } => {
                let location = self.operation_location(row.subscription_id, operation_id.as_uuid());
                self.poll_operation(row, *operation_id, &location, None)
                    .await
            }
            Effect::PublishDomainEvent(event) => self.publish_domain_event(row, event).await,
        }
    }

    // ---- executors -------------------------------------------------------------------

    /// POST activate once (P3: plan and quantity), then GET until `Subscribed` (P4).
    /// A 400 is success when GET shows `Subscribed` (P5, §8.2); 404, `Unsubscribed` or a
    /// refusal on a subscription that is not `Subscribed` feed `ActivationFailed`.
    async fn activate(
        &self,
        row: &Execution,
        plan_id: Option<&PlanId>,
        quantity: Option<Quantity>,
    ) -> Result<Disposition, StoreError> {
        let client = &self.inner.client;
        let ctx = context(row);
        let sid = row.subscription_id;
        let mut progress = object(&row.progress);
        let mut log = CallLog::default();
        if progress.get("activate_sent").and_then(Value::as_bool) != Some(true) {
            let plan = match plan_id {
                Some(plan) => plan.as_str().to_string(),
                None => match client.get_subscription(&ctx, sid).await {
                    Ok(found) => {
                        log.ok(&found.meta);
                        found.value.plan_id.unwrap_or_default()
                    }
                    Err(error) => return self.failed_call(row, log, error, progress).await,
                },
            };
            match client
                .activate(&ctx, sid, &plan, quantity.map(Quantity::get))
                .await
            {
                Ok(done) => log.ok(&done.meta),
                Err(error @ ApiError::NotFound { .. }) => {
                    log.err(&error);
                    let reason = format!("Microsoft does not know the subscription: {error}");
                    self.record(row, &log, &reason, json!({})).await;
                    self.feed(
                        row,
                        Event::ActivationFailed {
                            reason,
                            failed_at: OffsetDateTime::now_utc(),
                        },
                        log.last_request_id.clone(),
                    )
                    .await?;
                    return Ok(Disposition::Done);
                }
                Err(error @ ApiError::Permanent { .. }) if error.status() == Some(400) => {
                    // Maybe already Subscribed (P5); GET decides.
                    log.err(&error);
                    progress["activate_refused"] = json!(error.to_string());
                }
                Err(error) => return self.failed_call(row, log, error, progress).await,
            }
            progress["activate_sent"] = json!(true);
        }
        let found = match client.get_subscription(&ctx, sid).await {
            Ok(found) => found,
            Err(error @ ApiError::NotFound { .. }) => {
                log.err(&error);
                let reason = format!("Microsoft does not know the subscription: {error}");
                self.record(row, &log, &reason, json!({})).await;
                self.feed(
                    row,
                    Event::ActivationFailed {
                        reason,
                        failed_at: OffsetDateTime::now_utc(),
                    },
                    log.last_request_id.clone(),
                )
                .await?;
                return Ok(Disposition::Done);
            }
            Err(error) => return self.failed_call(row, log, error, progress).await,
        };
        let now = OffsetDateTime::now_utc();
        let request_id = Some(found.meta.request_id.to_string());
        let status = found.value.status.clone();
        let refused = progress
            .get("activate_refused")
            .and_then(Value::as_str)
            .map(str::to_string);
        match status {
            Some(SubscriptionStatus::Subscribed) => {
                log.ok(&found.meta);
                self.record(row, &log, "activation confirmed: Subscribed", json!({}))
                    .await;
                let term = translate::snapshot(&found.value).term;
                self.feed(
                    row,
                    Event::ActivationConfirmed {
                        term,
                        confirmed_at: now,
                    },
                    request_id,
                )
                .await?;
                Ok(Disposition::Done)
            }
            Some(SubscriptionStatus::Unsubscribed) | Some(SubscriptionStatus::Suspended) => {
                log.ok(&found.meta);
                let reason = format!(
                    "Microsoft reports the subscription {}{}",
                    found
                        .value
                        .status
                        .as_ref()
                        .map(|s| s.as_str())
                        .unwrap_or(""),
                    refused.map(|r| format!(" ({r})")).unwrap_or_default()
                );
                self.record(row, &log, &reason, json!({})).await;
                self.feed(
                    row,
                    Event::ActivationFailed {
                        reason,
                        failed_at: now,
                    },
                    request_id,
                )
                .await?;
                Ok(Disposition::Done)
            }
            _ if refused.is_some() => {
                log.ok(&found.meta);
                let reason = format!("activate refused: {}", refused.unwrap_or_default());
                self.record(row, &log, &reason, json!({})).await;
                self.feed(
                    row,
                    Event::ActivationFailed {
                        reason,
                        failed_at: now,
                    },
                    request_id,
                )
                .await?;
                Ok(Disposition::Done)
            }
            _ => {
                let waited = now - row.created_at;
                if waited > self.inner.config.activation_wait_cap {
                    log.ok(&found.meta);
                    self.record(
                        row,
                        &log,
                        "activation still pending after the wait cap; observed as is (P27)",
                        json!({}),
                    )
                    .await;
                    self.feed(row, translate::observed(&found.value, now), request_id)
                        .await?;
                    return Ok(Disposition::Done);
                }
                if !log.is_empty() {
                    // The POST of this execution: worth a line; the waiting GETs are not.
                    self.record(
                        row,
                        &log,
                        "activation requested; waiting for Subscribed",
                        json!({}),
                    )
                    .await;
                }
                Ok(Disposition::Wait {
                    after: self.inner.config.activation_check_interval,
                    progress,
                })
            }
        }
    }

    /// PATCH the operation (§4.11). 409 = already final = done (the `ConfirmOperation` behind
    /// it learns how it ended). Best-effort ACKs (Reinstate) ignore permanent errors. Records
    /// the time from webhook receipt to the PATCH (P7).
    async fn ack_operation(
        &self,
        row: &Execution,
        operation_id: OperationId,
        status: AckStatus,
        best_effort: bool,
    ) -> Result<Disposition, StoreError> {
        let received_at = outbox::event_received_at(&self.inner.pool, row.event_id).await?;
        let wire = match status {
            AckStatus::Success => UpdateOperationStatus::Success,
            AckStatus::Failure => UpdateOperationStatus::Failure,
        };
        let result = self
            .inner
            .client
            .update_operation(
                &context(row),
                row.subscription_id,
                operation_id.as_uuid(),
                wire,
            )
            .await;
        let webhook_to_ack_ms =
            received_at.map(|at| (OffsetDateTime::now_utc() - at).whole_milliseconds());
        let extra = json!({ "operation_id": operation_id, "webhook_to_ack_ms": webhook_to_ack_ms });
        let mut log = CallLog::default();
        match result {
            Ok(done) => {
                log.ok(&done.meta);
                if let Some(elapsed) = received_at.map(|at| OffsetDateTime::now_utc() - at) {
                    metrics::record_webhook_to_ack(elapsed.try_into().unwrap_or_default());
                }
                if done.value == UpdateOutcome::AlreadyFinal {
                    let kind = outbox::event_kind(&self.inner.pool, row.event_id)
                        .await
                        .ok()
                        .flatten();
                    metrics::record_auto_accepted(operation_action(kind.as_deref()));
                }
                let reason = match done.value {
                    UpdateOutcome::Recorded => format!("ACK {status} recorded"),
                    UpdateOutcome::AlreadyFinal => {
                        format!("ACK {status}: the operation was already final (409)")
                    }
                };
                tracing::info!(
                    operation_id = %operation_id,
                    webhook_to_ack_ms,
                    outcome = ?done.value,
                    "operation acknowledged"
                );
                self.record(row, &log, &reason, extra).await;
                Ok(Disposition::Done)
            }
            Err(error) if best_effort && !error.is_retryable() => {
                log.err(&error);
                tracing::info!(operation_id = %operation_id, %error, "best-effort ACK refused; ignored");
                self.record(
                    row,
                    &log,
                    &format!("best-effort ACK {status} ignored: {error}"),
                    extra,
                )
                .await;
                Ok(Disposition::Done)
            }
            Err(error) => {
                log.err(&error);
                self.record(row, &log, &format!("ACK {status} failed: {error}"), extra)
                    .await;
                Ok(disposition_for(&error, object(&row.progress)))
            }
        }
    }

    /// GET the subscription and feed `Observed` (P13, P17). 404: recorded, nothing fed.
    async fn fetch_subscription(&self, row: &Execution) -> Result<Disposition, StoreError> {
        let mut log = CallLog::default();
        match self
            .inner
            .client
            .get_subscription(&context(row), row.subscription_id)
            .await
        {
            Ok(found) => {
                log.ok(&found.meta);
                self.record(row, &log, "subscription fetched", json!({}))
                    .await;
                let now = OffsetDateTime::now_utc();
                self.feed(
                    row,
                    translate::observed(&found.value, now),
                    Some(found.meta.request_id.to_string()),
                )
                .await?;
                Ok(Disposition::Done)
            }
            Err(error @ ApiError::NotFound { .. }) => {
                log.err(&error);
                self.record(
                    row,
                    &log,
                    &format!("Microsoft does not know the subscription: {error}"),
                    json!({}),
                )
                .await;
                Ok(Disposition::Done)
            }
            Err(error) => {
                self.failed_call(row, log, error, object(&row.progress))
                    .await
            }
        }
    }

    /// PATCH plan/quantity or DELETE (§4.6–4.8). 202 feeds `PublisherOperationAccepted`;
    /// 4xx feeds `PublisherOperationRefused`. The client never repeats these after a 5xx
    /// or timeout (the outcome is unknown), so neither do we blindly: such a failure marks
    /// the row `maybe_sent`, and the next attempt first looks for the operation with List
    /// operations and GET subscription (§8.2) — an in-progress operation with our target
    /// is adopted as accepted, a subscription already showing the target is observed —
    /// and only sends again when neither shows the change. A 409 on DELETE (a pending
    /// operation holds the lock, §4.8) is retried.
    async fn request_change(
        &self,
        row: &Execution,
        command_id: CommandId,
        change: Change<'_>,
    ) -> Result<Disposition, StoreError> {
        let client = &self.inner.client;
        let ctx = context(row);
        let sid = row.subscription_id;
        let mut progress = object(&row.progress);
        let mut log = CallLog::default();
        let mut tracked = PublisherOperationUpdate {
            command_id: command_id.as_uuid(),
            subscription_id: sid,
            kind: change.kind(),
            target_plan_id: change.plan(),
            target_quantity: change.quantity(),
            operation_id: None,
            operation_location: None,
            status: "Requested",
            last_error: None,
        };
        outbox::upsert_publisher_operation(&self.inner.pool, &tracked).await?;
        if progress.get("maybe_sent").and_then(Value::as_bool) == Some(true) {
            match self.find_under_way(row, &change, &mut log).await {
                Ok(Some(UnderWay::Operation(operation_id))) => {
                    let operation = AcceptedOperation {
                        operation_id,
                        location: self.operation_location(sid, operation_id),
                        retry_after_secs: None,
                    };
                    return self
                        .accepted(row, command_id, operation, &tracked, &log)
                        .await;
                }
                Ok(Some(UnderWay::Done(subscription))) => {
                    self.record(
                        row,
                        &log,
                        "the change already happened at Microsoft (lost 202); observed",
                        json!({}),
                    )
                    .await;
                    let now = OffsetDateTime::now_utc();
                    self.feed(
                        row,
                        translate::observed(&subscription, now),
                        log.last_request_id.clone(),
                    )
                    .await?;
                    return Ok(Disposition::Done);
                }
                Ok(None) => {}
                Err(error) => return self.failed_call(row, log, error, progress).await,
            }
        }
        let result = match &change {
            Change::Plan(plan) => client.change_plan(&ctx, sid, plan.as_str()).await,
            Change::Quantity(quantity) => client.change_quantity(&ctx, sid, quantity.get()).await,
            Change::Cancel => client.delete_subscription(&ctx, sid).await,
        };
        match result {
            Ok(accepted) => {
                log.ok(&accepted.meta);
                let operation = AcceptedOperation {
                    operation_id: accepted.value.operation_id,
                    location: accepted.value.operation_location.to_string(),
                    // Whole seconds, rounded up: never poll earlier than Microsoft asked.
                    retry_after_secs: accepted
                        .value
                        .retry_after
                        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
                };
                self.accepted(row, command_id, operation, &tracked, &log)
                    .await
            }
            Err(error) if error.request_was_not_processed() => {
                self.failed_call(row, log, error, progress).await
            }
            Err(error) if error.is_retryable() => {
                progress["maybe_sent"] = json!(true);
                self.failed_call(row, log, error, progress).await
            }
            Err(error @ ApiError::Conflict { .. }) if matches!(change, Change::Cancel) => {
                log.err(&error);
                let message = format!("a pending operation locks the subscription: {error}");
                self.record(row, &log, &message, json!({})).await;
                Ok(Disposition::Retry {
                    error: message,
                    retry_after: None,
                    progress,
                })
            }
            Err(
                error @ (ApiError::Permanent { .. }
                | ApiError::NotFound { .. }
                | ApiError::Conflict { .. }),
            ) => {
                log.err(&error);
                let reason = error.to_string();
                tracked.status = "Refused";
                tracked.last_error = Some(&reason);
                outbox::upsert_publisher_operation(&self.inner.pool, &tracked).await?;
                self.record(
                    row,
                    &log,
                    &format!("Microsoft refused: {reason}"),
                    json!({}),
                )
                .await;
                self.feed(
                    row,
                    Event::PublisherOperationRefused {
                        command_id,
                        reason: reason.clone(),
                    },
                    log.last_request_id.clone(),
                )
                .await?;
                Ok(Disposition::Done)
            }
            Err(error) => self.failed_call(row, log, error, progress).await,
        }
    }

    async fn accepted(
        &self,
        row: &Execution,
        command_id: CommandId,
        operation: AcceptedOperation,
        tracked: &PublisherOperationUpdate<'_>,
        log: &CallLog,
    ) -> Result<Disposition, StoreError> {
        let AcceptedOperation {
            operation_id,
            location,
            retry_after_secs,
        } = operation;
        let update = PublisherOperationUpdate {
            status: "Accepted",
            operation_id: Some(operation_id),
            operation_location: Some(&location),
            ..tracked.clone()
        };
        outbox::upsert_publisher_operation(&self.inner.pool, &update).await?;
        tracing::info!(operation_id = %operation_id, "Microsoft accepted our request");
        self.record(
            row,
            log,
            &format!("accepted as operation {operation_id}"),
            json!({ "operation_id": operation_id, "operation_location": location }),
        )
        .await;
        self.feed(
            row,
            Event::PublisherOperationAccepted {
                command_id,
                operation_id: OperationId::from(operation_id),
                location,
                retry_after_secs,
            },
            log.last_request_id.clone(),
        )
        .await?;
        Ok(Disposition::Done)
    }

    /// After an unknown outcome: is our change already under way, or done?
    async fn find_under_way(
        &self,
        row: &Execution,
        change: &Change<'_>,
        log: &mut CallLog,
    ) -> Result<Option<UnderWay>, ApiError> {
        let client = &self.inner.client;
        let ctx = context(row);
        let sid = row.subscription_id;
        let operations = client
            .list_operations(&ctx, sid)
            .await
            .inspect_err(|e| log.err(e))?;
        log.ok(&operations.meta);
        let ours = operations.value.iter().find(|op| {
            let open = op.status.as_ref().is_none_or(|s| !s.is_terminal());
            open && match change {
                Change::Plan(plan) => {
                    op.action == Some(OperationAction::ChangePlan)
                        && op.plan_id.as_deref() == Some(plan.as_str())
                }
                Change::Quantity(quantity) => {
                    op.action == Some(OperationAction::ChangeQuantity)
                        && op.quantity == Some(quantity.get())
                }
                Change::Cancel => op.action == Some(OperationAction::Unsubscribe),
            }
        });
        if let Some(op) = ours {
            return Ok(Some(UnderWay::Operation(op.id)));
        }
        let found = client
            .get_subscription(&ctx, sid)
            .await
            .inspect_err(|e| log.err(e))?;
        log.ok(&found.meta);
        let done = match change {
            Change::Plan(plan) => found.value.plan_id.as_deref() == Some(plan.as_str()),
            Change::Quantity(quantity) => found.value.quantity == Some(quantity.get()),
            Change::Cancel => found.value.status == Some(SubscriptionStatus::Unsubscribed),
        };
        Ok(done.then_some(UnderWay::Done(found.value)))
    }

    /// GET the Operation-Location until a final status (§7.2), then feed `OperationResult`.
    /// Past the cap, or when Microsoft no longer knows the operation (P17), GET the
    /// subscription and feed `Observed` instead. Also confirms an operation we ACKed
    /// (`ConfirmOperation`), at its location rebuilt from the API base.
    /// `retry_after` (of the 202) delays the first poll and is the floor between polls (§15.1).
    async fn poll_operation(
        &self,
        row: &Execution,
        operation_id: OperationId,
        location: &str,
        retry_after: Option<Duration>,
    ) -> Result<Disposition, StoreError> {
        let since_accepted = Duration::try_from(OffsetDateTime::now_utc() - row.created_at)
            .unwrap_or(Duration::ZERO);
        if let Some(wait) = retry_after.and_then(|r| r.checked_sub(since_accepted))
            && !wait.is_zero()
        {
            return Ok(Disposition::Wait {
                after: wait,
                progress: object(&row.progress),
            });
        }
        let client = &self.inner.client;
        let ctx = context(row);
        let mut log = CallLog::default();
        let result = match Url::parse(location) {
            Ok(url) => client.get_operation_at(&ctx, &url).await,
            Err(_) => {
                client
                    .get_operation(&ctx, row.subscription_id, operation_id.as_uuid())
                    .await
            }
        };
        let give_up = match result {
            Ok(found) => {
                let status = match found.value.status {
                    Some(marketplace::OperationStatus::Succeeded) => {
                        Some(OperationStatus::Succeeded)
                    }
                    Some(marketplace::OperationStatus::Failed) => Some(OperationStatus::Failed),
                    Some(marketplace::OperationStatus::Conflict) => Some(OperationStatus::Conflict),
                    _ => None,
                };
                if let Some(status) = status {
                    log.ok(&found.meta);
                    outbox::finish_publisher_operation(
                        &self.inner.pool,
                        operation_id.as_uuid(),
                        status.as_str(),
                    )
                    .await?;
                    tracing::info!(operation_id = %operation_id, %status, "operation final");
                    self.record(
                        row,
                        &log,
                        &format!("operation {operation_id} {status}"),
                        json!({
                            "operation_id": operation_id,
                            "error_status_code": found.value.error_status_code,
                            "error_message": found.value.error_message,
                        }),
                    )
                    .await;
                    self.feed(
                        row,
                        Event::OperationResult {
                            operation_id,
                            status,
                        },
                        log.last_request_id.clone(),
                    )
                    .await?;
                    return Ok(Disposition::Done);
                }
                if OffsetDateTime::now_utc() - row.created_at
                    <= self.inner.config.operation_poll_cap
                {
                    return Ok(Disposition::Wait {
                        after: self
                            .inner
                            .config
                            .operation_poll_interval
                            .max(retry_after.unwrap_or_default()),
                        progress: object(&row.progress),
                    });
                }
                log.ok(&found.meta);
                "still not final after the polling cap"
            }
            Err(error @ ApiError::NotFound { .. }) => {
                log.err(&error);
                "Microsoft does not know the operation"
            }
            Err(error) => {
                return self
                    .failed_call(row, log, error, object(&row.progress))
                    .await;
            }
        };
        // §7.2 "on poll timeout: GET subscription + List operations, reconcile".
        match client.get_subscription(&ctx, row.subscription_id).await {
            Ok(found) => {
                log.ok(&found.meta);
                self.record(
                    row,
                    &log,
                    &format!("operation {operation_id}: {give_up}; observed the subscription"),
                    json!({ "operation_id": operation_id }),
                )
                .await;
                let now = OffsetDateTime::now_utc();
                self.feed(
                    row,
                    translate::observed(&found.value, now),
                    Some(found.meta.request_id.to_string()),
                )
                .await?;
                Ok(Disposition::Done)
            }
            Err(error) => {
                self.failed_call(row, log, error, object(&row.progress))
                    .await
            }
        }
    }

    /// Publishes the CloudEvent on the domain exchange (confirmed).
    async fn publish_domain_event(
        &self,
        row: &Execution,
        event: &DomainEvent,
    ) -> Result<Disposition, StoreError> {
        let (position, total) = outbox::domain_event_position(&self.inner.pool, row).await?;
        let id = if total > 1 {
            format!("{}:{position}", row.event_id)
        } else {
            row.event_id.to_string()
        };
        let body = cloud_event(&id, row.subscription_id, event, row.created_at);
        let meta = MessageMeta {
            message_id: id.clone(),
            correlation_id: row.correlation_id.clone().unwrap_or_else(|| id.clone()),
            traceparent: crate::telemetry::current_traceparent(),
            subscription_id: Some(row.subscription_id),
        };
        let bytes = serde_json::to_vec(&body).expect("a CloudEvent always serializes");
        match self
            .inner
            .publisher
            .publish_domain_event(event.kind.routing_key(), &bytes, &meta)
            .await
        {
            Ok(()) => {
                tracing::info!(event_id = %id, routing_key = event.kind.routing_key(), "domain event published");
                Ok(Disposition::Done)
            }
            Err(error) => Ok(Disposition::Retry {
                error: format!("cannot publish the domain event: {error}"),
                retry_after: None,
                progress: object(&row.progress),
            }),
        }
    }

    // ---- helpers ---------------------------------------------------------------------

    /// Records the failed call and turns the error into a retry or a dead row.
    async fn failed_call(
        &self,
        row: &Execution,
        mut log: CallLog,
        error: ApiError,
        progress: Value,
    ) -> Result<Disposition, StoreError> {
        log.err(&error);
        self.record(
            row,
            &log,
            &format!("{} failed: {error}", row.kind),
            json!({}),
        )
        .await;
        Ok(disposition_for(&error, progress))
    }

    /// Feeds an effect's result back through the machine (no inbox key: the machine's
    /// own key check makes a repeat harmless). Written with the row's end.
    async fn feed(
        &self,
        row: &Execution,
        event: Event,
        request_id: Option<String>,
    ) -> Result<(), StoreError> {
        let source = EventSource {
            correlation_id: row.correlation_id.clone(),
            request_id,
            trace_id: crate::telemetry::trace_id_of(&tracing::Span::current()),
            traceparent: crate::telemetry::current_traceparent(),
            ..EventSource::default()
        };
        row.push(Write::Feed { event, source });
        Ok(())
    }

    /// Appends the execution to the event log, with the row's end.
    async fn record(&self, row: &Execution, log: &CallLog, reason: &str, extra: Value) {
        let mut details = json!({
            "outbox_id": row.id,
            "attempt": row.attempts + 1,
            "effect": row.effect,
            "calls": log.calls,
        });
        if let (Some(details), Value::Object(extra)) = (details.as_object_mut(), extra) {
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

    async fn record_dead(&self, row: &Execution, reason: &str) {
        self.record(
            row,
            &CallLog::default(),
            &format!("dead: {reason}"),
            json!({ "dead": true }),
        )
        .await;
    }

    fn operation_location(&self, subscription_id: Uuid, operation_id: Uuid) -> String {
        let mut base = self.inner.api_url.clone();
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        match base.join(&format!(
            "saas/subscriptions/{subscription_id}/operations/{operation_id}?api-version={}",
            marketplace::API_VERSION
        )) {
            Ok(url) => url.to_string(),
            Err(_) => String::new(),
        }
    }
}

/// What a publisher command asks Microsoft for.
#[derive(Debug)]
enum Change<'a> {
    Plan(&'a PlanId),
    Quantity(Quantity),
    Cancel,
}

impl Change<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Change::Plan(_) => "ChangePlan",
            Change::Quantity(_) => "ChangeQuantity",
            Change::Cancel => "Cancel",
        }
    }

    fn plan(&self) -> Option<&str> {
        match self {
            Change::Plan(plan) => Some(plan.as_str()),
            _ => None,
        }
    }

    fn quantity(&self) -> Option<i32> {
        match self {
            Change::Quantity(quantity) => i32::try_from(quantity.get()).ok(),
            _ => None,
        }
    }
}

enum UnderWay {
    Operation(Uuid),
    Done(marketplace::Subscription),
}

fn disposition_for(error: &ApiError, progress: Value) -> Disposition {
    if error.is_retryable() {
        Disposition::Retry {
            error: error.to_string(),
            retry_after: error.retry_after(),
            progress,
        }
    } else {
        Disposition::Dead {
            reason: error.to_string(),
        }
    }
}

/// Microsoft's 202 to our PATCH/DELETE, or the operation found under way after a lost one.
struct AcceptedOperation {
    operation_id: Uuid,
    location: String,
    /// `Retry-After` of the 202 (none for an operation found under way).
    retry_after_secs: Option<u64>,
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

fn object(value: &Value) -> Value {
    match value {
        Value::Object(_) => value.clone(),
        _ => json!({}),
    }
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

    #[test]
    fn retry_delays_double_up_to_the_cap_with_jitter() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(retry_delay(base, max, 1, None, 1.0), Duration::from_secs(1));
        assert_eq!(
            retry_delay(base, max, 1, None, 0.0),
            Duration::from_millis(500)
        );
        assert_eq!(retry_delay(base, max, 4, None, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(base, max, 30, None, 1.0), max);
        assert_eq!(retry_delay(base, max, 0, None, 1.0), base);
    }

    #[test]
    fn retry_after_is_a_floor_but_never_beyond_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(
            retry_delay(base, max, 1, Some(Duration::from_secs(7)), 0.3),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_delay(base, max, 1, Some(Duration::from_secs(3600)), 0.3),
            max
        );
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
