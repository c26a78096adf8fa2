//! The consumer loop: inbound deliveries, each turned into a machine event and applied in
//! the store's one transaction, then acked (commit, then ack: guarantee 4), then its
//! effects started at once (the ACK fast path). Several subscriptions are handled at once;
//! one subscription's deliveries one after another, in arrival order.
//!
//! - A body that is not a message, or a message that is not an event ⇒ dead-lettered with
//!   the reason (never a guess).
//! - A webhook for a subscription we have never seen (P12) ⇒ GET it first and apply the
//!   observation, then the webhook. A 404 (a purchase Microsoft no longer knows) still
//!   applies the webhook, with the 404 in the event log; any other refusal (400, 403)
//!   dead-letters the message with Microsoft's response: nothing is applied on a guess.
//! - A redelivery ⇒ the inbox makes it a `Duplicate`: logged as ignored, acked, nothing else.
//! - Database or transient Microsoft errors ⇒ the message goes to a retry tier, then to the
//!   dead-letter queue (with Microsoft's last response, if any).
//!
//! One subscription's events never run at once: `ledger::apply` locks its row, across
//! processes.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fulfillment_state_machine::{Event, Policy};
use serde_json::json;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::marketplace::{CallContext, Error as ApiError, MarketplaceClient};
use crate::metrics::{self, DeadLetterReason, EventOutcome};
use crate::queue::{InboundConsumer, InboundDelivery, InboundMessage, QueueError, RetryOutcome};
use crate::store::ledger::{self, ApplyOutcome, EffectRecord, EventSource};
use crate::store::{StoreError, subscriptions};
use crate::worker::effects::EffectRunner;
use crate::worker::translate::{self, translate};

/// What became of one delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// The machine decided; committed and acked.
    Applied,
    /// Seen before; acked without effect.
    Duplicate,
    /// Parked in a retry tier.
    RetryScheduled,
    /// In the dead-letter queue.
    DeadLettered,
}

/// Counts deliveries in hand, remembers when each arrived (a worker that holds one for
/// long is stuck: the metrics and `/readyz` say so) and when the last one did (for "run
/// until idle").
#[derive(Debug)]
pub struct ConsumerActivity {
    in_flight: AtomicUsize,
    last_delivery: std::sync::Mutex<Instant>,
    /// Deliveries in hand (handled or waiting in their lane), by a local number.
    held: std::sync::Mutex<HashMap<u64, Instant>>,
    next_number: AtomicU64,
}

impl Default for ConsumerActivity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_delivery: std::sync::Mutex::new(Instant::now()),
            held: std::sync::Mutex::default(),
            next_number: AtomicU64::new(0),
        }
    }
}

/// What a worker holds unacknowledged, for the metrics and `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeldDeliveries {
    /// Age of the oldest delivery in hand (zero when none).
    pub oldest: Duration,
    /// Deliveries held for the stall threshold or longer.
    pub stalled: usize,
}

impl ConsumerActivity {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// The deliveries in hand now, against `stall_after`.
    pub fn held(&self, stall_after: Duration) -> HeldDeliveries {
        let held = self
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        let ages = held
            .values()
            .map(|since| now.saturating_duration_since(*since));
        let (oldest, stalled) = ages.fold((Duration::ZERO, 0), |(oldest, stalled), age| {
            (oldest.max(age), stalled + usize::from(age >= stall_after))
        });
        HeldDeliveries { oldest, stalled }
    }

    fn hold(&self) -> u64 {
        let number = self.next_number.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        if let Ok(mut at) = self.last_delivery.lock() {
            *at = now;
        }
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(number, now);
        number
    }

    fn release(&self, number: u64) {
        self.held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&number);
        if let Ok(mut at) = self.last_delivery.lock() {
            *at = Instant::now();
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Time since the last delivery arrived.
    pub fn quiet_for(&self) -> Duration {
        self.last_delivery
            .lock()
            .map(|at| at.elapsed())
            .unwrap_or_default()
    }
}

/// Applies inbound messages. Cheap to clone.
#[derive(Clone)]
pub struct MessageHandler {
    pool: PgPool,
    client: MarketplaceClient,
    policy: Arc<Policy>,
    /// Executes a decision's effects right after its commit (the ACK fast path); without
    /// it they wait for an outbox runner.
    effects: Option<EffectRunner>,
}

impl std::fmt::Debug for MessageHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageHandler").finish_non_exhaustive()
    }
}

/// Why a message cannot be applied now; `response` is Microsoft's answer, if one caused it
/// (`x-marketplace-response` in the dead-letter queue).
enum Failure {
    /// PostgreSQL cannot be reached: the message is fine, the same apply will work once it
    /// is back. The delivery is held (not moved to a retry tier, whose delays would make
    /// every ACK of the outage miss Microsoft's 10 s window).
    DatabaseUnavailable { error: String },
    Later {
        error: String,
        response: Option<String>,
    },
    /// The message can never be applied: dead-lettered at once, counted under `why`.
    Never {
        why: DeadLetterReason,
        reason: String,
        response: Option<String>,
    },
}

impl Failure {
    fn database(error: StoreError) -> Self {
        if error.is_unavailable() {
            Failure::DatabaseUnavailable {
                error: error.to_string(),
            }
        } else {
            Failure::Later {
                error: format!("database: {error}"),
                response: None,
            }
        }
    }
}

/// Between two looks at a database that is down, while a delivery is held.
const DATABASE_RECHECK: Duration = Duration::from_millis(500);

impl MessageHandler {
    pub fn new(pool: PgPool, client: MarketplaceClient, policy: Policy) -> Self {
        Self {
            pool,
            client,
            policy: Arc::new(policy),
            effects: None,
        }
    }

    /// Runs each decision's effects in the consuming task right after commit and ack.
    pub fn with_effects(mut self, effects: EffectRunner) -> Self {
        self.effects = Some(effects);
        self
    }

    /// Handles one delivery to the end: ack, retry tier or dead-letter queue.
    pub async fn handle(&self, delivery: InboundDelivery) -> Result<Handled, QueueError> {
        let span = tracing::info_span!(
            "message",
            message_id = %delivery.meta.message_id,
            correlation_id = %delivery.meta.correlation_id,
            subscription_id = tracing::field::Empty,
            operation_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
            attempt = delivery.attempt,
        );
        // The worker's span continues the trace of the request that queued the message.
        crate::telemetry::continue_trace(&span, delivery.meta.traceparent.as_deref());
        self.handle_in_span(delivery).instrument(span).await
    }

    async fn handle_in_span(&self, delivery: InboundDelivery) -> Result<Handled, QueueError> {
        let message = match &delivery.message {
            Ok(message) => message.clone(),
            Err(reason) => {
                let reason = format!("not an inbound message: {reason}");
                delivery.dead_letter(&reason, None).await?;
                record_dead_letter("unknown", DeadLetterReason::MalformedMessage);
                return Ok(Handled::DeadLettered);
            }
        };
        let translated = match translate(&message) {
            Ok(translated) => translated,
            Err(error) => {
                delivery.dead_letter(&error.to_string(), None).await?;
                record_dead_letter(message.type_name(), DeadLetterReason::Untranslatable);
                return Ok(Handled::DeadLettered);
            }
        };
        tracing::Span::current().record(
            "subscription_id",
            tracing::field::display(translated.subscription_id),
        );
        if let Event::Webhook(webhook) = &translated.event {
            tracing::Span::current().record(
                "operation_id",
                tracing::field::display(webhook.operation_id),
            );
        }
        let action = translated.event.kind().as_str();
        let received_at = match &message {
            InboundMessage::Webhook { received_at, .. } => Some(*received_at),
            _ => None,
        };
        let source = EventSource {
            message_id: Some(delivery.meta.message_id.clone()).filter(|m| !m.is_empty()),
            inbox_key: Some(translated.inbox_key.clone()),
            correlation_id: Some(delivery.meta.correlation_id.clone()).filter(|c| !c.is_empty()),
            request_id: None,
            trace_id: delivery.meta.traceparent.as_deref().and_then(trace_id),
            traceparent: crate::telemetry::current_traceparent()
                .or_else(|| delivery.meta.traceparent.clone()),
            received_at,
        };
        let result = loop {
            let result = self
                .apply(
                    &translated.event,
                    translated.subscription_id.as_uuid(),
                    &source,
                )
                .await;
            let Err(Failure::DatabaseUnavailable { error }) = &result else {
                break result;
            };
            tracing::warn!(
                error,
                "PostgreSQL is unavailable; holding the delivery until it answers"
            );
            self.wait_for_database().await;
        };
        match result {
            Ok(ApplyOutcome::Duplicate) => {
                tracing::info!("duplicate");
                delivery.ack().await?;
                Ok(Handled::Duplicate)
            }
            Ok(ApplyOutcome::Decided(applied)) => {
                tracing::info!(
                    event_id = %applied.event_id,
                    from = %applied.decision.from,
                    to = %applied.decision.to,
                    effects = applied.outbox_ids.len(),
                    "applied"
                );
                delivery.ack().await?;
                if let Some(effects) = &self.effects {
                    effects.execute_now(&applied.outbox_ids).await;
                }
                Ok(Handled::Applied)
            }
            Err(Failure::Later { error, response }) => {
                self.retry_later(delivery, action, &error, response.as_deref())
                    .await
            }
            Err(Failure::Never {
                why,
                reason,
                response,
            }) => {
                delivery.dead_letter(&reason, response.as_deref()).await?;
                record_dead_letter(action, why);
                Ok(Handled::DeadLettered)
            }
            // The loop above holds these; were one to reach here, a retry tier is right.
            Err(Failure::DatabaseUnavailable { error }) => {
                self.retry_later(delivery, action, &format!("database: {error}"), None)
                    .await
            }
        }
    }

    /// Parks the delivery in its retry tier (or the dead-letter queue once they are used up).
    async fn retry_later(
        &self,
        delivery: InboundDelivery,
        action: &'static str,
        error: &str,
        response: Option<&str>,
    ) -> Result<Handled, QueueError> {
        tracing::warn!(error, "cannot apply the message now");
        match delivery.retry_later_with_response(error, response).await? {
            RetryOutcome::Scheduled { .. } => {
                metrics::record_event(action, EventOutcome::RetryScheduled);
                Ok(Handled::RetryScheduled)
            }
            RetryOutcome::DeadLettered => {
                record_dead_letter(action, DeadLetterReason::RetriesExhausted);
                Ok(Handled::DeadLettered)
            }
        }
    }

    /// Returns once PostgreSQL answers again. Unbounded on purpose: a worker whose database
    /// is down can do nothing else; its `/readyz` says so, and shutdown aborts the wait.
    async fn wait_for_database(&self) {
        loop {
            tokio::time::sleep(DATABASE_RECHECK).await;
            if crate::store::ping(&self.pool).await.is_ok() {
                tracing::info!("PostgreSQL answers again; applying the held delivery");
                return;
            }
        }
    }

    async fn apply(
        &self,
        event: &Event,
        subscription_id: Uuid,
        source: &EventSource,
    ) -> Result<ApplyOutcome, Failure> {
        let mut unknown_to_microsoft = None;
        if matches!(event, Event::Webhook(_)) {
            let known = subscriptions::exists(&self.pool, subscription_id)
                .await
                .map_err(|e| Failure::database(e.into()))?;
            if !known {
                unknown_to_microsoft = self.observe_first(subscription_id, source).await?;
            }
        }
        // With an effect runner, the decision's rows run right after the ack (fast path).
        let runs = match self.effects {
            Some(_) => ledger::Runs::Here,
            None => ledger::Runs::Anywhere,
        };
        let outcome = ledger::apply_to_run(
            &self.pool,
            subscription_id.into(),
            event,
            source,
            OffsetDateTime::now_utc(),
            &self.policy,
            runs,
        )
        .await
        .map_err(|error| match error {
            StoreError::CorruptMachine(_) => Failure::Never {
                why: DeadLetterReason::CorruptState,
                reason: error.to_string(),
                response: None,
            },
            other => Failure::database(other),
        })?;
        if let (Some(error), ApplyOutcome::Decided(_)) = (&unknown_to_microsoft, &outcome) {
            self.record_unknown(subscription_id, source, error).await;
        }
        Ok(outcome)
    }

    /// P12: a webhook about a subscription we never saw. GET it and apply what Microsoft
    /// says first, so the webhook meets a machine that knows plan, quantity and state.
    /// Returns the 404 when Microsoft does not know it either (the webhook then applies on
    /// its own, a tombstone for an Unsubscribe); other refusals are failures.
    async fn observe_first(
        &self,
        subscription_id: Uuid,
        source: &EventSource,
    ) -> Result<Option<ApiError>, Failure> {
        let correlation = source
            .correlation_id
            .as_deref()
            .and_then(|c| Uuid::parse_str(c).ok())
            .unwrap_or_else(Uuid::new_v4);
        let ctx = CallContext::new(correlation);
        let now = OffsetDateTime::now_utc();
        match self.client.get_subscription(&ctx, subscription_id).await {
            Ok(found) => {
                let observed_source = EventSource {
                    correlation_id: source.correlation_id.clone(),
                    request_id: Some(found.meta.request_id.to_string()),
                    message_id: source.message_id.clone(),
                    trace_id: source.trace_id.clone(),
                    traceparent: source.traceparent.clone(),
                    ..EventSource::default()
                };
                ledger::apply(
                    &self.pool,
                    subscription_id.into(),
                    &translate::observed(&found.value, now),
                    &observed_source,
                    now,
                    &self.policy,
                )
                .await
                .map_err(Failure::database)?;
                Ok(None)
            }
            Err(error @ ApiError::NotFound { .. }) => {
                tracing::warn!(%error, "Microsoft does not know the subscription either (P12); applying the webhook");
                Ok(Some(error))
            }
            Err(error) => {
                let reason =
                    format!("cannot verify a webhook for an unknown subscription (P12): {error}");
                let response = Some(marketplace_response(&error));
                if error.is_retryable() {
                    Err(Failure::Later {
                        error: reason,
                        response,
                    })
                } else {
                    Err(Failure::Never {
                        why: DeadLetterReason::Refused,
                        reason,
                        response,
                    })
                }
            }
        }
    }

    /// Records the 404 of [`Self::observe_first`] once the webhook created the row (best
    /// effort: the decision is already committed).
    async fn record_unknown(&self, subscription_id: Uuid, source: &EventSource, error: &ApiError) {
        let record = EffectRecord {
            event_kind: "effect:fetch_unknown_subscription".into(),
            event_key: format!("fetch-unknown:{}", Uuid::now_v7()),
            details: json!({
                "call": "get_subscription",
                "error": error.kind(),
                "status": error.status(),
                "body": error.body(),
                "detail": error.to_string(),
                "request_id": error.request_id(),
            }),
            reason: format!("webhook for a subscription Microsoft does not know (P12): {error}"),
            correlation_id: source.correlation_id.clone(),
            request_id: error.request_id().map(|id| id.to_string()),
        };
        if let Err(error) = ledger::record_effect_result(
            &self.pool,
            subscription_id,
            &record,
            OffsetDateTime::now_utc(),
        )
        .await
        {
            tracing::warn!(%error, "cannot record the failed GET in the event log");
        }
    }
}

/// Counts a message that ends in the dead-letter queue.
fn record_dead_letter(action: &'static str, reason: DeadLetterReason) {
    metrics::record_event(action, EventOutcome::DeadLettered);
    metrics::record_dead_letter(reason);
}

/// Microsoft's answer as the `x-marketplace-response` header: call, status, body, ids.
fn marketplace_response(error: &ApiError) -> String {
    json!({
        "call": error.failure().map(|f| f.call.as_str()),
        "error": error.kind(),
        "status": error.status(),
        "body": error.body(),
        "request_id": error.request_id(),
        "response_request_id": error.failure().and_then(|f| f.response_request_id.clone()),
        "attempts": error.failure().map(|f| f.attempts),
    })
    .to_string()
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`).
fn trace_id(traceparent: &str) -> Option<String> {
    let id = traceparent.split('-').nth(1)?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// The ordering key of a delivery: its subscription, when the message names one.
fn ordering_key(delivery: &InboundDelivery) -> Option<Uuid> {
    let message = delivery.message.as_ref().ok()?;
    translate(message)
        .ok()
        .map(|translated| translated.subscription_id.as_uuid())
}

/// Per-subscription queues of deliveries waiting for the one in hand.
type Lanes = Arc<std::sync::Mutex<HashMap<Uuid, VecDeque<Dispatched>>>>;

/// The lanes, locked. Nothing panics while they are locked, so a poisoned lock still holds
/// consistent lanes: taking it anyway never strands a queued delivery.
fn lock_lanes(lanes: &Lanes) -> std::sync::MutexGuard<'_, HashMap<Uuid, VecDeque<Dispatched>>> {
    lanes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A delivery, its number in [`ConsumerActivity`] and the concurrency permit it holds
/// until it is handled.
struct Dispatched {
    delivery: InboundDelivery,
    number: u64,
    _permit: OwnedSemaphorePermit,
}

/// Consumes until `shutdown`. Up to `concurrency` deliveries are handled at once, but one
/// subscription's deliveries one after another, in the order they arrived (its "lane";
/// across processes the subscription row lock serializes them). On shutdown: stops taking
/// deliveries, finishes those in hand (commit, then ack) and cancels the consumer so
/// unacked prefetched messages return to the queue ([`Worker`](crate::worker::run::Worker)
/// bounds how long that may take).
pub async fn run_consumer(
    mut consumer: InboundConsumer,
    handler: MessageHandler,
    activity: Arc<ConsumerActivity>,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(concurrency.max(1)));
    let lanes: Lanes = Arc::default();
    let tasks = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
        };
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            next = consumer.next() => next,
        };
        match next {
            None => break,
            Some(Err(error)) => {
                tracing::warn!(%error, "cannot receive from the inbound queue");
                drop(permit);
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
            Some(Ok(delivery)) => {
                let number = activity.hold();
                let key = ordering_key(&delivery);
                let dispatched = Dispatched {
                    delivery,
                    number,
                    _permit: permit,
                };
                let Some(key) = key else {
                    // Nothing to order by (unreadable): handled on its own.
                    let (handler, activity) = (handler.clone(), activity.clone());
                    tasks.spawn(async move { handle_one(&handler, &activity, dispatched).await });
                    continue;
                };
                let first = {
                    let mut lanes = lock_lanes(&lanes);
                    match lanes.get_mut(&key) {
                        Some(waiting) => {
                            waiting.push_back(dispatched);
                            None
                        }
                        None => {
                            lanes.insert(key, VecDeque::new());
                            Some(dispatched)
                        }
                    }
                };
                if let Some(first) = first {
                    let (handler, activity, lanes) =
                        (handler.clone(), activity.clone(), lanes.clone());
                    tasks.spawn(async move {
                        run_lane(&handler, &activity, &lanes, key, first).await;
                    });
                }
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    consumer.cancel().await;
    tracing::info!("consumer stopped");
}

/// Handles `first`, then whatever queued behind it on the same subscription, until the
/// lane is empty; the lane is removed under the same lock the dispatcher queues under, so
/// no delivery is left behind.
async fn run_lane(
    handler: &MessageHandler,
    activity: &ConsumerActivity,
    lanes: &Lanes,
    key: Uuid,
    first: Dispatched,
) {
    let mut next = Some(first);
    while let Some(dispatched) = next {
        handle_one(handler, activity, dispatched).await;
        let mut waiting = lock_lanes(lanes);
        next = waiting.get_mut(&key).and_then(VecDeque::pop_front);
        if next.is_none() {
            waiting.remove(&key);
        }
    }
}

async fn handle_one(handler: &MessageHandler, activity: &ConsumerActivity, dispatched: Dispatched) {
    let Dispatched {
        delivery,
        number,
        _permit,
    } = dispatched;
    if let Err(error) = handler.handle(delivery).await {
        tracing::warn!(%error, "cannot settle the delivery; the broker will redeliver it");
    }
    activity.release(number);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_deliveries_are_counted_until_released_and_stall_past_the_threshold() {
        let activity = ConsumerActivity::default();
        assert_eq!(
            activity.held(Duration::ZERO),
            HeldDeliveries {
                oldest: Duration::ZERO,
                stalled: 0
            }
        );
        let first = activity.hold();
        let second = activity.hold();
        assert_eq!(activity.in_flight(), 2);
        assert_eq!(activity.held(Duration::ZERO).stalled, 2);
        assert_eq!(activity.held(Duration::from_secs(3600)).stalled, 0);
        activity.release(first);
        assert_eq!(activity.held(Duration::ZERO).stalled, 1);
        activity.release(second);
        assert_eq!(activity.in_flight(), 0);
        assert_eq!(activity.held(Duration::ZERO).oldest, Duration::ZERO);
    }

    #[test]
    fn the_trace_id_is_read_from_a_traceparent() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("garbage"), None);
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
    }
}
