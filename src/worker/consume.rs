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
//! One subscription's events never run at once: in this process its deliveries queue in
//! its lane (keyed by the message's `x-subscription-id` header), across processes
//! [`apply`] locks its row.

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
use crate::store::{StoreError, subscriptions};
use crate::worker::apply::{self, Apply, ApplyOutcome, EffectRecord, EventSource, Runs};
use crate::worker::effects::EffectRunner;
use crate::worker::translate::{self, TranslateError, translate};

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

/// Why a delivery was not applied. What becomes of it ([`DeliveryError::handling`]) and
/// the dead-letter reason it is counted under follow from the variant and its source.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The body is not one of our messages.
    #[error("not an inbound message: {0}")]
    Malformed(#[source] Arc<serde_json::Error>),
    /// A message that cannot become a machine event.
    #[error(transparent)]
    Untranslatable(#[from] TranslateError),
    /// PostgreSQL failed, or the stored machine cannot be read back.
    #[error("database: {0}")]
    Database(#[from] StoreError),
    /// A webhook for a subscription we have never seen (P12), and Microsoft would not
    /// show the subscription: nothing is applied on a guess.
    #[error(
        "cannot verify a webhook for a subscription we have never seen (Microsoft would not \
         show it): {0}"
    )]
    Unverified(#[source] ApiError),
}

/// What the consumer does with a delivery it could not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handling {
    /// PostgreSQL cannot be reached: the message is fine, the same apply will work once it
    /// is back. The delivery is held (not moved to a retry tier, whose delays would make
    /// every ACK of the outage miss Microsoft's 10 s window).
    HoldUntilDatabaseAnswers,
    /// Parked in its retry tier.
    RetryLater,
    /// It can never be applied: dead-lettered at once, counted under the reason.
    DeadLetter(DeadLetterReason),
}

impl DeliveryError {
    pub fn handling(&self) -> Handling {
        match self {
            Self::Malformed(_) => Handling::DeadLetter(DeadLetterReason::MalformedMessage),
            Self::Untranslatable(_) => Handling::DeadLetter(DeadLetterReason::Untranslatable),
            Self::Database(StoreError::CorruptMachine(_)) => {
                Handling::DeadLetter(DeadLetterReason::CorruptState)
            }
            Self::Database(error) if error.is_unavailable() => Handling::HoldUntilDatabaseAnswers,
            Self::Database(_) => Handling::RetryLater,
            Self::Unverified(error) if error.is_retryable() => Handling::RetryLater,
            Self::Unverified(_) => Handling::DeadLetter(DeadLetterReason::Refused),
        }
    }

    /// Microsoft's answer, when one caused it (`x-marketplace-response` in the queues).
    fn marketplace_response(&self) -> Option<String> {
        match self {
            Self::Unverified(error) => Some(marketplace_response(error)),
            _ => None,
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
        let (action, result) = match &delivery.message {
            Ok(message) => self.translate_and_apply(&delivery, message).await,
            Err(error) => ("unknown", Err(DeliveryError::Malformed(error.clone()))),
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
            Ok(ApplyOutcome::Changed { .. }) => {
                unreachable!("the consumer applies without an expected version")
            }
            Err(error) => self.settle_failed(delivery, action, &error).await,
        }
    }

    /// Translates the message (once) and applies it, holding the delivery while PostgreSQL
    /// is down; the event's kind (the metrics' `action`) and what became of it.
    async fn translate_and_apply(
        &self,
        delivery: &InboundDelivery,
        message: &InboundMessage,
    ) -> (&'static str, Result<ApplyOutcome, DeliveryError>) {
        let translated = match translate(message) {
            Ok(translated) => translated,
            Err(error) => return (message.type_name(), Err(error.into())),
        };
        let span = tracing::Span::current();
        span.record(
            "subscription_id",
            tracing::field::display(translated.subscription_id),
        );
        if let Event::Webhook(webhook) = &translated.event {
            span.record(
                "operation_id",
                tracing::field::display(webhook.operation_id),
            );
        }
        let received_at = match message {
            InboundMessage::Webhook { received_at, .. } => Some(*received_at),
            _ => None,
        };
        let source = EventSource {
            message_id: Some(delivery.meta.message_id.clone()).filter(|m| !m.is_empty()),
            inbox_key: Some(translated.inbox_key),
            correlation_id: Some(delivery.meta.correlation_id.clone()).filter(|c| !c.is_empty()),
            request_id: None,
            trace_id: delivery.meta.traceparent.as_deref().and_then(trace_id),
            traceparent: crate::telemetry::current_traceparent()
                .or_else(|| delivery.meta.traceparent.clone()),
            received_at,
        };
        let event = &translated.event;
        let result = loop {
            let result = self
                .apply(event, translated.subscription_id.as_uuid(), &source)
                .await;
            match &result {
                Err(error) if error.handling() == Handling::HoldUntilDatabaseAnswers => {
                    tracing::warn!(
                        %error,
                        "PostgreSQL is unavailable; holding the delivery until it answers"
                    );
                    self.wait_for_database().await;
                }
                _ => break result,
            }
        };
        (event.kind().as_str(), result)
    }

    /// Parks a delivery that failed in its retry tier, or dead-letters it, as its error
    /// says.
    async fn settle_failed(
        &self,
        delivery: InboundDelivery,
        action: &'static str,
        error: &DeliveryError,
    ) -> Result<Handled, QueueError> {
        let reason = error.to_string();
        let response = error.marketplace_response();
        match error.handling() {
            Handling::DeadLetter(why) => {
                delivery.dead_letter(&reason, response.as_deref()).await?;
                record_dead_letter(action, why);
                Ok(Handled::DeadLettered)
            }
            // The apply loop holds the latter; were one to reach here, a retry tier is right.
            Handling::RetryLater | Handling::HoldUntilDatabaseAnswers => {
                self.retry_later(delivery, action, &reason, response.as_deref())
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
    ) -> Result<ApplyOutcome, DeliveryError> {
        let mut unknown_to_microsoft = None;
        if matches!(event, Event::Webhook(_)) {
            let known = subscriptions::exists(&self.pool, subscription_id)
                .await
                .map_err(StoreError::from)?;
            if !known {
                unknown_to_microsoft = self.observe_first(subscription_id, source).await?;
            }
        }
        // With an effect runner, the decision's rows run right after the ack (fast path).
        let runs = match self.effects {
            Some(_) => Runs::Here,
            None => Runs::Anywhere,
        };
        let command = Apply::new(
            subscription_id.into(),
            event,
            source,
            OffsetDateTime::now_utc(),
        )
        .run_by(runs);
        let outcome = apply::apply(&self.pool, &self.policy, &command).await?;
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
    ) -> Result<Option<ApiError>, DeliveryError> {
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
                let observed = translate::observed(&found.value, now);
                let command = Apply::new(subscription_id.into(), &observed, &observed_source, now);
                apply::apply(&self.pool, &self.policy, &command).await?;
                Ok(None)
            }
            Err(error @ ApiError::NotFound { .. }) => {
                tracing::warn!(%error, "Microsoft does not know the subscription either (a purchase cancelled before we saw it); applying the webhook");
                Ok(Some(error))
            }
            Err(error) => Err(DeliveryError::Unverified(error)),
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
            reason: format!("webhook for a subscription Microsoft does not know either: {error}"),
            correlation_id: source.correlation_id.clone(),
            request_id: error.request_id().map(|id| id.to_string()),
        };
        if let Err(error) = apply::record(
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

/// The ordering key of a delivery: the subscription its producer named in the
/// `x-subscription-id` header (every producer of the inbound queue sets it), read without
/// parsing the body; the message itself is translated once, when it is handled.
fn ordering_key(delivery: &InboundDelivery) -> Option<Uuid> {
    delivery.meta.subscription_id
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
    fn what_becomes_of_a_failed_delivery_follows_from_its_error() {
        let dead = |why| Handling::DeadLetter(why);
        let malformed = serde_json::from_str::<InboundMessage>("{").unwrap_err();
        assert_eq!(
            DeliveryError::Malformed(Arc::new(malformed)).handling(),
            dead(DeadLetterReason::MalformedMessage)
        );
        let untranslatable = TranslateError::Invalid {
            field: "planId",
            reason: "empty".into(),
        };
        assert_eq!(
            DeliveryError::from(untranslatable).handling(),
            dead(DeadLetterReason::Untranslatable)
        );
        let corrupt = serde_json::from_str::<u8>("x").unwrap_err();
        assert_eq!(
            DeliveryError::from(StoreError::CorruptMachine(corrupt)).handling(),
            dead(DeadLetterReason::CorruptState)
        );
        let down = StoreError::Unreachable {
            url: "postgres://db".into(),
            reason: "connection refused".into(),
        };
        assert_eq!(
            DeliveryError::from(down).handling(),
            Handling::HoldUntilDatabaseAnswers
        );
        let other = StoreError::from(sqlx::Error::RowNotFound);
        assert_eq!(DeliveryError::from(other).handling(), Handling::RetryLater);
        // A GET Microsoft refused is "refused", never a corrupt state.
        let refused = ApiError::Configuration {
            message: "no credential".into(),
        };
        let error = DeliveryError::Unverified(refused);
        assert_eq!(error.handling(), dead(DeadLetterReason::Refused));
        assert!(error.marketplace_response().is_some());
        assert!(std::error::Error::source(&error).is_some());
        let timed_out = ApiError::Transient {
            cause: crate::marketplace::TransientCause::Timeout,
            failure: Box::new(crate::marketplace::Failure::new(
                crate::marketplace::Call::GetSubscription,
                "timed out",
            )),
        };
        assert_eq!(
            DeliveryError::Unverified(timed_out).handling(),
            Handling::RetryLater
        );
    }

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
