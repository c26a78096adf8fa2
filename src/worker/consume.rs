//! The consumer loop: inbound deliveries, each turned into a machine event and applied in
//! the store's one transaction (alone, or in a window with others), then acked (commit,
//! then ack: guarantee 4), then its effects started at once (the ACK fast path). Several
//! subscriptions are handled at once; one subscription's deliveries one after another, in
//! arrival order.
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
//!
//! Windows (`worker.apply_batch` above 1, issue #17): a lane translates its head (and
//! observes it first, P12) outside any transaction, then hands it to the batcher and waits.
//! The batcher takes up to `apply_batch` ready heads of different subscriptions
//! ([`next_window`]: the earliest ACK deadline first, applied in subscription-id order so
//! two workers lock rows in the same order) and applies them in one transaction, one
//! commit, through one [`apply::apply_many`] (one statement per table for the window) — first
//! locking only the rows no other transaction holds: a head whose row is busy goes back for a
//! later window, so a window never holds its rows while it waits for another's; then
//! acks them, frees their lanes, and starts all their effects in one
//! [`EffectRunner::execute_now`]. A message that fails makes the window run again with a
//! savepoint each: it is rolled back to its savepoint alone and takes the same way as
//! unbatched; one that lost a deadlock or a
//! serialization race, or a whole window that could not commit, is applied again message
//! by message (the inbox turns a commit whose answer was lost into a duplicate).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fulfillment_state_machine::{Event, Policy};
use serde_json::json;
use sqlx::Acquire;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::marketplace::{CallContext, Error as ApiError, MarketplaceClient};
use crate::metrics::{self, DeadLetterReason, EventOutcome};
use crate::queue::{InboundConsumer, InboundDelivery, InboundMessage, QueueError, RetryOutcome};
use crate::store::{self, StoreError, subscriptions};
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
    windows: std::sync::Mutex<Windows>,
}

/// The windows a consumer committed (with batching), for tests and diagnosis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Windows {
    /// Windows whose transaction committed.
    pub committed: u64,
    /// Messages in the largest of them.
    pub largest: usize,
    /// Messages in the largest one in which a message was rolled back to its savepoint
    /// while the others committed.
    pub largest_with_a_rollback: usize,
    /// Times a window left a message out because another transaction held its row.
    pub left_out_busy: u64,
}

impl Default for ConsumerActivity {
    fn default() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last_delivery: std::sync::Mutex::new(Instant::now()),
            held: std::sync::Mutex::default(),
            next_number: AtomicU64::new(0),
            windows: std::sync::Mutex::default(),
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

    /// The windows committed so far.
    pub fn windows(&self) -> Windows {
        *self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn record_window(&self, messages: usize, rolled_back: bool, busy: usize) {
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        windows.left_out_busy += busy as u64;
        if messages == 0 {
            return;
        }
        windows.committed += 1;
        windows.largest = windows.largest.max(messages);
        if rolled_back {
            windows.largest_with_a_rollback = windows.largest_with_a_rollback.max(messages);
        }
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
    known: Arc<KnownSubscriptions>,
}

/// Subscriptions this process saw stored: a subscription's row is never deleted, so a
/// webhook about one of them needs no `SELECT EXISTS` before it is applied (P12), a round
/// trip per webhook saved. Bounded: when full it forgets them all and learns again.
#[derive(Debug, Default)]
struct KnownSubscriptions(std::sync::Mutex<HashSet<Uuid>>);

/// Subscriptions [`KnownSubscriptions`] holds at most (about 1 MiB).
const KNOWN_SUBSCRIPTIONS: usize = 32_768;

impl KnownSubscriptions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Uuid>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn contains(&self, id: Uuid) -> bool {
        self.lock().contains(&id)
    }

    /// Only once its row is committed.
    fn insert(&self, id: Uuid) {
        let mut known = self.lock();
        if known.len() >= KNOWN_SUBSCRIPTIONS {
            known.clear();
        }
        known.insert(id);
    }
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

/// How long Microsoft waits for the ACK of a webhook operation before it decides itself
/// (P7): a webhook's deadline is its receipt at the ingress plus this.
const MICROSOFT_ACK_WINDOW: time::Duration = time::Duration::seconds(10);

/// Windows applied at once by one consumer: one commits while the next is applied, and
/// the lane heads freed meanwhile gather for the one after. More would only contend for
/// the same cores and connections.
const WINDOWS_IN_FLIGHT: usize = 2;

/// How long a window may wait for lane heads still being translated (a few milliseconds
/// of CPU and one `SELECT` each) before it starts without them. Only when some are: a lone
/// message never waits.
const WINDOW_LINGER: Duration = Duration::from_millis(2);

/// How long a head whose row another transaction held waits before it is ready again.
const BUSY_RETRY: Duration = Duration::from_millis(2);

/// Windows that may leave a head out for a busy row; the last applies it alone, waiting
/// for the row like any transaction (so a row held over and over cannot starve it).
const MAX_TIMES_BUSY: u32 = 25;

/// How much the consumer takes on at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumerLimits {
    /// Deliveries in hand at once (being handled or waiting in their lane).
    pub concurrency: usize,
    /// Lane heads applied in one transaction; 1 applies each in a transaction of its own.
    pub apply_batch: usize,
}

/// What [`MessageHandler::translate_and_observe`] makes of a message.
struct Prepared {
    /// The event's kind: the metrics' `action`.
    action: &'static str,
    event: Event,
    subscription_id: Uuid,
    source: EventSource,
    /// Microsoft's 404 for a subscription it does not know either: recorded once the
    /// webhook created the row.
    unknown_to_microsoft: Option<ApiError>,
}

/// A delivery translated (and, for a subscription we never saw, observed first), ready to
/// be applied alone or in a window.
struct Ready {
    delivery: InboundDelivery,
    span: tracing::Span,
    prepared: Prepared,
}

impl Ready {
    /// When Microsoft stops waiting for our answer to a webhook; `None` for messages
    /// nobody outside waits on (observations, publisher commands, resolved purchases).
    fn deadline(&self) -> Option<OffsetDateTime> {
        match self.prepared.event {
            Event::Webhook(_) => {
                (self.prepared.source.received_at).map(|at| at + MICROSOFT_ACK_WINDOW)
            }
            _ => None,
        }
    }
}

/// A delivery that cannot be applied: malformed, untranslatable, or its subscription not
/// verifiable at Microsoft.
struct NotReady {
    delivery: InboundDelivery,
    span: tracing::Span,
    action: &'static str,
    error: DeliveryError,
}

impl NotReady {
    async fn settle(self, handler: &MessageHandler) -> Result<Handled, QueueError> {
        let Self {
            delivery,
            span,
            action,
            error,
        } = self;
        handler
            .settle_failed(delivery, action, &error)
            .instrument(span)
            .await
    }
}

/// A lane head waiting for its window, and its lane waiting for it: the lane goes on once
/// `done` is dropped (after the head's ack, retry or dead letter).
struct Waiting {
    ready: Ready,
    arrival: u64,
    done: oneshot::Sender<()>,
    /// Windows that left it out because another transaction held its subscription's row.
    busy: u32,
}

/// A message of a window that did not commit with it.
#[derive(Debug)]
enum Together {
    /// Applied again alone after the window: the window failed as a whole, or the message
    /// lost a deadlock or a serialization race against another worker (40P01, 40001), or
    /// the connection went: none of that is the message's fault.
    Again,
    /// Left out: another transaction held its subscription's row
    /// ([`subscriptions::lock_unheld`]). It goes back to the ready heads for a later window.
    Busy,
    /// Its own failure: dead letter or retry tier, as when applied alone.
    Failed(StoreError),
}

impl Together {
    fn after(error: StoreError) -> Self {
        if error.is_unavailable() || is_conflict(&error) {
            Self::Again
        } else {
            Self::Failed(error)
        }
    }
}

/// A deadlock (40P01) or serialization failure (40001): the same statements succeed when
/// run again.
fn is_conflict(error: &StoreError) -> bool {
    match error {
        StoreError::Query(sqlx::Error::Database(db)) => db
            .code()
            .is_some_and(|code| matches!(code.as_ref(), "40P01" | "40001")),
        _ => false,
    }
}

/// A lane head ready to apply, as [`next_window`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub subscription_id: Uuid,
    /// When Microsoft stops waiting for its ACK (a webhook's receipt plus 10 s, P7);
    /// `None`: nobody outside waits on it.
    pub deadline: Option<OffsetDateTime>,
    /// Its place in the order the heads became ready.
    pub arrival: u64,
}

/// The heads that make the next window, by index into `heads`, in the order they are
/// applied:
/// - deadline first: heads Microsoft waits on, the earliest deadline first, ahead of
///   everything else (observations, publisher commands), which follows in arrival order;
/// - at most one per subscription, its earliest: a subscription's later message waits for
///   the next window, so its order holds;
/// - at most `cap` (at least one);
/// - applied sorted by subscription id: every worker locks subscription rows in the same
///   order, so two workers' windows cannot deadlock on each other.
pub fn next_window(heads: &[Head], cap: usize) -> Vec<usize> {
    let mut first_of: HashMap<Uuid, usize> = HashMap::new();
    for (index, head) in heads.iter().enumerate() {
        first_of
            .entry(head.subscription_id)
            .and_modify(|first| {
                if heads[*first].arrival > head.arrival {
                    *first = index;
                }
            })
            .or_insert(index);
    }
    let mut chosen: Vec<usize> = first_of.into_values().collect();
    chosen.sort_by_key(|&i| {
        (
            heads[i].deadline.is_none(),
            heads[i].deadline,
            heads[i].arrival,
        )
    });
    chosen.truncate(cap.max(1));
    chosen.sort_by_key(|&i| (heads[i].subscription_id, heads[i].arrival));
    chosen
}

/// Gathers the lanes' ready heads into windows.
struct Batcher {
    pending: std::sync::Mutex<Pending>,
    /// Woken when a head becomes ready or a lane stops preparing one.
    wake: Notify,
    cap: usize,
}

#[derive(Default)]
struct Pending {
    ready: Vec<Waiting>,
    /// Lanes translating a head right now.
    preparing: usize,
    next_arrival: u64,
}

impl Batcher {
    fn new(cap: usize) -> Self {
        Self {
            pending: std::sync::Mutex::default(),
            wake: Notify::new(),
            cap: cap.max(1),
        }
    }

    /// Nothing panics while it is locked, so a poisoned lock still holds consistent heads.
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Marks a head in preparation until the guard drops.
    fn preparing(&self) -> PreparingGuard<'_> {
        self.lock().preparing += 1;
        PreparingGuard(self)
    }

    /// Queues `ready` for a window; returns once it was acked (or parked, or
    /// dead-lettered).
    async fn apply(&self, ready: Ready, preparing: PreparingGuard<'_>) {
        let (done, settled) = oneshot::channel();
        {
            let mut pending = self.lock();
            let arrival = pending.next_arrival;
            pending.next_arrival += 1;
            pending.ready.push(Waiting {
                ready,
                arrival,
                done,
                busy: 0,
            });
        }
        drop(preparing);
        // `Err` too once the window dropped the sender: either way the head is settled.
        let _ = settled.await;
    }

    /// Puts back heads a window left out because their rows were busy, with their arrival
    /// (and so their deadline's place): the next window takes them first.
    fn put_back(&self, heads: Vec<Waiting>) {
        if heads.is_empty() {
            return;
        }
        self.lock().ready.extend(heads);
        self.wake.notify_one();
    }

    fn has_ready(&self) -> bool {
        !self.lock().ready.is_empty()
    }

    /// Whether to wait for heads still being prepared: only when the window is not full.
    fn worth_waiting(&self) -> bool {
        let pending = self.lock();
        pending.preparing > 0 && pending.ready.len() < self.cap
    }

    /// Takes the next window out of the ready heads ([`next_window`]).
    fn take_window(&self) -> Vec<Waiting> {
        let mut pending = self.lock();
        let heads: Vec<Head> = pending
            .ready
            .iter()
            .map(|waiting| Head {
                subscription_id: waiting.ready.prepared.subscription_id,
                deadline: waiting.ready.deadline(),
                arrival: waiting.arrival,
            })
            .collect();
        let order = next_window(&heads, self.cap);
        let mut slots: Vec<Option<Waiting>> = std::mem::take(&mut pending.ready)
            .into_iter()
            .map(Some)
            .collect();
        let window = order
            .iter()
            .filter_map(|&index| slots[index].take())
            .collect();
        pending.ready = slots.into_iter().flatten().collect();
        window
    }
}

struct PreparingGuard<'a>(&'a Batcher);

impl Drop for PreparingGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().preparing -= 1;
        self.0.wake.notify_one();
    }
}

/// Forms windows out of the ready heads and applies them, [`WINDOWS_IN_FLIGHT`] at once,
/// until `stop` (fired once every lane ended, so no head is left behind).
async fn run_batcher(
    batcher: Arc<Batcher>,
    handler: MessageHandler,
    activity: Arc<ConsumerActivity>,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(WINDOWS_IN_FLIGHT));
    let windows = TaskTracker::new();
    'windows: loop {
        // A free slot first: while both are busy the heads gather into a fuller window.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        while !batcher.has_ready() {
            tokio::select! {
                biased;
                () = batcher.wake.notified() => {}
                () = stop.cancelled() => break 'windows,
            }
        }
        let linger = tokio::time::Instant::now() + WINDOW_LINGER;
        while batcher.worth_waiting() {
            tokio::select! {
                () = batcher.wake.notified() => {}
                () = tokio::time::sleep_until(linger) => break,
            }
        }
        let window = batcher.take_window();
        let (handler, activity, heads) = (handler.clone(), activity.clone(), batcher.clone());
        windows.spawn(async move {
            handler.apply_window(window, slot, &activity, heads).await;
        });
    }
    windows.close();
    windows.wait().await;
}

impl MessageHandler {
    pub fn new(pool: PgPool, client: MarketplaceClient, policy: Policy) -> Self {
        Self {
            pool,
            client,
            policy: Arc::new(policy),
            effects: None,
            known: Arc::default(),
        }
    }

    /// Runs each decision's effects in the consuming task right after commit and ack.
    pub fn with_effects(mut self, effects: EffectRunner) -> Self {
        self.effects = Some(effects);
        self
    }

    /// Handles one delivery to the end in a transaction of its own: ack, retry tier or
    /// dead-letter queue.
    pub async fn handle(&self, delivery: InboundDelivery) -> Result<Handled, QueueError> {
        match self.prepare(delivery).await {
            Ok(ready) => {
                let span = ready.span.clone();
                let (handled, outbox_ids) = self.settle_alone(ready).await?;
                if let Some(effects) = &self.effects {
                    effects.execute_now(&outbox_ids).instrument(span).await;
                }
                Ok(handled)
            }
            Err(not_ready) => not_ready.settle(self).await,
        }
    }

    /// Translates the delivery (once) and, for a webhook about a subscription we never
    /// saw, observes it at Microsoft first (P12): everything before the apply, outside any
    /// transaction. Holds the delivery while PostgreSQL is down.
    async fn prepare(&self, delivery: InboundDelivery) -> Result<Ready, NotReady> {
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
        let prepared = self
            .translate_and_observe(&delivery)
            .instrument(span.clone())
            .await;
        match prepared {
            Ok(prepared) => Ok(Ready {
                delivery,
                span,
                prepared,
            }),
            Err((action, error)) => Err(NotReady {
                delivery,
                span,
                action,
                error,
            }),
        }
    }

    async fn translate_and_observe(
        &self,
        delivery: &InboundDelivery,
    ) -> Result<Prepared, (&'static str, DeliveryError)> {
        let message = match &delivery.message {
            Ok(message) => message,
            Err(error) => return Err(("unknown", DeliveryError::Malformed(error.clone()))),
        };
        let translated = translate(message).map_err(|error| (message.type_name(), error.into()))?;
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
        let event = translated.event;
        let action = event.kind().as_str();
        let subscription_id = translated.subscription_id.as_uuid();
        let unknown_to_microsoft = loop {
            match self
                .observe_if_unknown(&event, subscription_id, &source)
                .await
            {
                Err(error) if error.handling() == Handling::HoldUntilDatabaseAnswers => {
                    self.hold_for_database(&error).await;
                }
                Err(error) => return Err((action, error)),
                Ok(unknown) => break unknown,
            }
        };
        Ok(Prepared {
            action,
            event,
            subscription_id,
            source,
            unknown_to_microsoft,
        })
    }

    /// Applies `ready` in a transaction of its own (holding it while PostgreSQL is down),
    /// then acks, parks or dead-letters it; the outbox rows to execute now.
    async fn settle_alone(&self, ready: Ready) -> Result<(Handled, Vec<Uuid>), QueueError> {
        let span = ready.span.clone();
        async move {
            let result = loop {
                let result = self.apply_alone(&ready).await;
                match &result {
                    Err(error) if error.handling() == Handling::HoldUntilDatabaseAnswers => {
                        self.hold_for_database(error).await;
                    }
                    _ => break result,
                }
            };
            self.finish(ready.delivery, ready.prepared.action, result)
                .await
        }
        .instrument(span)
        .await
    }

    /// What follows an apply: the ack of a committed one (commit, then ack: guarantee 4),
    /// the retry tier or the dead-letter queue of a failed one; the outbox rows to execute.
    async fn finish(
        &self,
        delivery: InboundDelivery,
        action: &'static str,
        result: Result<ApplyOutcome, DeliveryError>,
    ) -> Result<(Handled, Vec<Uuid>), QueueError> {
        match result {
            Ok(ApplyOutcome::Duplicate) => {
                tracing::info!("duplicate");
                delivery.ack().await?;
                Ok((Handled::Duplicate, Vec::new()))
            }
            Ok(ApplyOutcome::Decided(applied)) => {
                tracing::info!(
                    event_id = %applied.event_id,
                    from = %applied.decision.from,
                    to = %applied.decision.to,
                    effects = applied.outbox_ids.len(),
                    "applied"
                );
                self.known.insert(applied.subscription_id);
                delivery.ack().await?;
                Ok((Handled::Applied, applied.outbox_ids))
            }
            Ok(ApplyOutcome::Changed { .. }) => {
                unreachable!("the consumer applies without an expected version")
            }
            Err(error) => Ok((
                self.settle_failed(delivery, action, &error).await?,
                Vec::new(),
            )),
        }
    }

    async fn hold_for_database(&self, error: &DeliveryError) {
        tracing::warn!(
            %error,
            "PostgreSQL is unavailable; holding the delivery until it answers"
        );
        self.wait_for_database().await;
    }

    /// Applies `window` — lane heads of different subscriptions, in lock order
    /// ([`next_window`]) — in one transaction and one commit ([`Self::apply_together`]);
    /// then acks each (commit, then ack: guarantee 4) and frees its lane; then executes all
    /// their effects in one call. A message whose apply fails is rolled back to its
    /// savepoint alone and goes its own way (dead letter or retry tier, as alone); one that
    /// lost a deadlock or a serialization race against another worker is applied again
    /// alone after the commit. If the transaction itself fails (PostgreSQL down, the
    /// commit refused), nothing of it counts and every message is applied alone: the inbox
    /// makes a commit whose answer was lost a duplicate, never a second decision.
    async fn apply_window(
        &self,
        window: Vec<Waiting>,
        slot: OwnedSemaphorePermit,
        activity: &ConsumerActivity,
        batcher: Arc<Batcher>,
    ) {
        let outcomes = match self.apply_together(&window).await {
            Ok(outcomes) => {
                let busy = outcomes
                    .iter()
                    .filter(|outcome| matches!(outcome, Err(Together::Busy)))
                    .count();
                let rolled_back = outcomes
                    .iter()
                    .any(|outcome| matches!(outcome, Err(Together::Again | Together::Failed(_))));
                activity.record_window(outcomes.len() - busy, rolled_back, busy);
                outcomes
            }
            Err(error) => {
                tracing::warn!(
                    %error,
                    messages = window.len(),
                    "cannot apply the window in one transaction; applying its messages one by one"
                );
                window.iter().map(|_| Err(Together::Again)).collect()
            }
        };
        let mut executions = Vec::new();
        let mut again = Vec::new();
        let mut busy = Vec::new();
        for (mut waiting, outcome) in window.into_iter().zip(outcomes) {
            let result = match outcome {
                Ok(outcome) => {
                    apply::count(&waiting.ready.prepared.event, &outcome);
                    self.record_if_unknown(&waiting.ready, &outcome)
                        .instrument(waiting.ready.span.clone())
                        .await;
                    Ok(outcome)
                }
                // Past its share of windows it waits for the row alone, after this one.
                Err(Together::Busy) if waiting.busy + 1 >= MAX_TIMES_BUSY => {
                    again.push((waiting.ready, waiting.done));
                    continue;
                }
                Err(Together::Busy) => {
                    waiting.busy += 1;
                    busy.push(waiting);
                    continue;
                }
                Err(Together::Again) => {
                    again.push((waiting.ready, waiting.done));
                    continue;
                }
                Err(Together::Failed(error)) => Err(DeliveryError::Database(error)),
            };
            let Waiting { ready, done, .. } = waiting;
            let deadline = ready.deadline();
            let span = ready.span.clone();
            match self
                .finish(ready.delivery, ready.prepared.action, result)
                .instrument(span.clone())
                .await
            {
                Ok((_, ids)) => executions.push((deadline, ids)),
                Err(error) => span.in_scope(|| {
                    tracing::warn!(%error, "cannot settle the delivery; the broker will redeliver it");
                }),
            }
            drop(done);
        }
        // The next window may start; what is left of this one touches no row it holds.
        drop(slot);
        if !busy.is_empty() {
            // Whoever holds their rows (a settle, mostly) commits within milliseconds; this
            // window's own ACKs do not wait for that.
            tokio::spawn(async move {
                tokio::time::sleep(BUSY_RETRY).await;
                batcher.put_back(busy);
            });
        }
        for (ready, done) in again {
            let span = ready.span.clone();
            let deadline = ready.deadline();
            match self.settle_alone(ready).await {
                Ok((_, ids)) => executions.push((deadline, ids)),
                Err(error) => span.in_scope(|| {
                    tracing::warn!(%error, "cannot settle the delivery; the broker will redeliver it");
                }),
            }
            drop(done);
        }
        if let Some(effects) = &self.effects {
            // The ACK whose window closes first goes first (P7), then the rest in order.
            executions.sort_by_key(|(deadline, _)| (deadline.is_none(), *deadline));
            let ids: Vec<Uuid> = executions.into_iter().flat_map(|(_, ids)| ids).collect();
            if !ids.is_empty() {
                effects.execute_now(&ids).await;
            }
        }
    }

    /// The window's transaction, one commit. `Err` when the transaction failed as a whole
    /// (nothing of it committed).
    ///
    /// First without savepoints: each costs two round trips per message, while the rows of
    /// the window stay locked, and a message almost never fails. If one does, the whole
    /// transaction is rolled back and the window applied again with a savepoint each, so
    /// only that message is rolled back while the others commit.
    async fn apply_together(
        &self,
        window: &[Waiting],
    ) -> Result<Vec<Result<ApplyOutcome, Together>>, StoreError> {
        match self.apply_all_or_nothing(window).await? {
            Some(outcomes) => Ok(outcomes
                .into_iter()
                .map(|outcome| outcome.ok_or(Together::Busy))
                .collect()),
            None => self.apply_with_savepoints(window).await,
        }
    }

    /// Every message of the window in one transaction without savepoints, through one
    /// [`apply::apply_many`] (a handful of statements for the whole window); `None` when it
    /// failed (the transaction is rolled back: nothing of it committed). First the rows no
    /// other transaction holds are locked, without waiting
    /// ([`subscriptions::lock_unheld`]); a message whose row is busy is left out (`None`
    /// in its place) for a later window, so the window never holds its rows while it waits
    /// for another's.
    async fn apply_all_or_nothing(
        &self,
        window: &[Waiting],
    ) -> Result<Option<Vec<Option<ApplyOutcome>>>, StoreError> {
        let mut tx = store::begin_hot_path(&self.pool).await?;
        let mut ids: Vec<Uuid> = window
            .iter()
            .map(|waiting| waiting.ready.prepared.subscription_id)
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let busy: HashSet<Uuid> = subscriptions::lock_unheld(&mut tx, &ids)
            .await?
            .into_iter()
            .collect();
        let free = |waiting: &Waiting| !busy.contains(&waiting.ready.prepared.subscription_id);
        let commands: Vec<Apply<'_>> = window
            .iter()
            .filter(|waiting| free(waiting))
            .map(|waiting| self.command(&waiting.ready))
            .collect();
        if commands.is_empty() {
            tx.rollback().await?;
            return Ok(Some(window.iter().map(|_| None).collect()));
        }
        match apply::apply_many(&mut tx, &self.policy, &commands).await {
            Ok(outcomes) => {
                tx.commit().await?;
                let mut outcomes = outcomes.into_iter();
                Ok(Some(
                    window
                        .iter()
                        .map(|waiting| free(waiting).then(|| outcomes.next()).flatten())
                        .collect(),
                ))
            }
            Err(error) => {
                tracing::info!(
                    %error,
                    messages = window.len(),
                    "the window's apply failed; applying it again with a savepoint each"
                );
                tx.rollback().await?;
                Ok(None)
            }
        }
    }

    /// The window's transaction with each message under its own savepoint: one that fails
    /// is rolled back alone.
    async fn apply_with_savepoints(
        &self,
        window: &[Waiting],
    ) -> Result<Vec<Result<ApplyOutcome, Together>>, StoreError> {
        let mut tx = store::begin_hot_path(&self.pool).await?;
        let mut outcomes = Vec::with_capacity(window.len());
        for waiting in window {
            let ready = &waiting.ready;
            let command = self.command(ready);
            let mut savepoint = (&mut tx).begin().await?;
            let outcome = apply::apply_in(&mut savepoint, &self.policy, &command)
                .instrument(ready.span.clone())
                .await;
            match outcome {
                Ok(outcome) => {
                    savepoint.commit().await?;
                    outcomes.push(Ok(outcome));
                }
                Err(error) => {
                    savepoint.rollback().await?;
                    ready.span.in_scope(|| {
                        tracing::warn!(%error, "the message's apply failed; rolled back alone");
                    });
                    outcomes.push(Err(Together::after(error)));
                }
            }
        }
        tx.commit().await?;
        Ok(outcomes)
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

    /// The apply command of `ready`, its effects run by this worker right after the ack
    /// when it has an effect runner (fast path).
    fn command<'a>(&self, ready: &'a Ready) -> Apply<'a> {
        let runs = match self.effects {
            Some(_) => Runs::Here,
            None => Runs::Anywhere,
        };
        Apply::new(
            ready.prepared.subscription_id.into(),
            &ready.prepared.event,
            &ready.prepared.source,
            OffsetDateTime::now_utc(),
        )
        .run_by(runs)
    }

    async fn apply_alone(&self, ready: &Ready) -> Result<ApplyOutcome, DeliveryError> {
        let outcome = apply::apply(&self.pool, &self.policy, &self.command(ready)).await?;
        self.record_if_unknown(ready, &outcome).await;
        Ok(outcome)
    }

    /// After a decided apply of a message Microsoft did not know (P12), records that.
    async fn record_if_unknown(&self, ready: &Ready, outcome: &ApplyOutcome) {
        if let (Some(error), ApplyOutcome::Decided(_)) =
            (&ready.prepared.unknown_to_microsoft, outcome)
        {
            self.record_unknown(
                ready.prepared.subscription_id,
                &ready.prepared.source,
                error,
            )
            .await;
        }
    }

    /// For a webhook about a subscription we have never seen, the observation first (P12);
    /// Microsoft's 404 when it does not know the subscription either.
    async fn observe_if_unknown(
        &self,
        event: &Event,
        subscription_id: Uuid,
        source: &EventSource,
    ) -> Result<Option<ApiError>, DeliveryError> {
        if !matches!(event, Event::Webhook(_)) || self.known.contains(subscription_id) {
            return Ok(None);
        }
        let known = subscriptions::exists(&self.pool, subscription_id)
            .await
            .map_err(StoreError::from)?;
        if known {
            self.known.insert(subscription_id);
            return Ok(None);
        }
        self.observe_first(subscription_id, source).await
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

/// Consumes until `shutdown`. Up to `limits.concurrency` deliveries are in hand at once,
/// but one subscription's deliveries one after another, in the order they arrived (its
/// "lane"; across processes the subscription row lock serializes them). With
/// `limits.apply_batch` above 1, the lanes' ready heads are applied in windows of up to
/// that many, one transaction each ([`MessageHandler::apply_window`]). On shutdown: stops
/// taking deliveries, finishes those in hand (commit, then ack) and cancels the consumer
/// so unacked prefetched messages return to the queue
/// ([`Worker`](crate::worker::run::Worker) bounds how long that may take).
pub async fn run_consumer(
    mut consumer: InboundConsumer,
    handler: MessageHandler,
    activity: Arc<ConsumerActivity>,
    limits: ConsumerLimits,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(limits.concurrency.max(1)));
    let lanes: Lanes = Arc::default();
    let tasks = TaskTracker::new();
    let batching = (limits.apply_batch > 1).then(|| {
        let batcher = Arc::new(Batcher::new(limits.apply_batch));
        let stop = CancellationToken::new();
        let running = tokio::spawn(run_batcher(
            batcher.clone(),
            handler.clone(),
            activity.clone(),
            stop.clone(),
        ));
        (batcher, stop, running)
    });
    let batcher = batching.as_ref().map(|(batcher, ..)| batcher.clone());
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
                    tasks.spawn(async move {
                        handle_one(&handler, &activity, None, dispatched).await;
                    });
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
                    let (handler, activity, lanes, batcher) = (
                        handler.clone(),
                        activity.clone(),
                        lanes.clone(),
                        batcher.clone(),
                    );
                    tasks.spawn(async move {
                        let batcher = batcher.as_deref();
                        run_lane(&handler, &activity, batcher, &lanes, key, first).await;
                    });
                }
            }
        }
    }
    tasks.close();
    tasks.wait().await;
    // Every lane ended, so every head was applied: the batcher has nothing left.
    if let Some((_, stop, running)) = batching {
        stop.cancel();
        if let Err(error) = running.await {
            tracing::warn!(%error, "the window batcher panicked");
        }
    }
    consumer.cancel().await;
    tracing::info!("consumer stopped");
}

/// Handles `first`, then whatever queued behind it on the same subscription, until the
/// lane is empty; the lane is removed under the same lock the dispatcher queues under, so
/// no delivery is left behind.
async fn run_lane(
    handler: &MessageHandler,
    activity: &ConsumerActivity,
    batcher: Option<&Batcher>,
    lanes: &Lanes,
    key: Uuid,
    first: Dispatched,
) {
    let mut next = Some(first);
    while let Some(dispatched) = next {
        handle_one(handler, activity, batcher, dispatched).await;
        let mut waiting = lock_lanes(lanes);
        next = waiting.get_mut(&key).and_then(VecDeque::pop_front);
        if next.is_none() {
            waiting.remove(&key);
        }
    }
}

/// Handles one delivery to the end: alone, or through a window when batching.
async fn handle_one(
    handler: &MessageHandler,
    activity: &ConsumerActivity,
    batcher: Option<&Batcher>,
    dispatched: Dispatched,
) {
    let Dispatched {
        delivery,
        number,
        _permit,
    } = dispatched;
    let settled = match batcher {
        None => handler.handle(delivery).await.map(drop),
        Some(batcher) => {
            let preparing = batcher.preparing();
            match handler.prepare(delivery).await {
                Ok(ready) => {
                    batcher.apply(ready, preparing).await;
                    Ok(())
                }
                Err(not_ready) => {
                    drop(preparing);
                    not_ready.settle(handler).await.map(drop)
                }
            }
        }
    };
    if let Err(error) = settled {
        tracing::warn!(%error, "cannot settle the delivery; the broker will redeliver it");
    }
    activity.release(number);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_subscriptions_stay_known_until_the_set_is_full_then_start_again() {
        let known = KnownSubscriptions::default();
        let first = Uuid::new_v4();
        assert!(!known.contains(first));
        known.insert(first);
        assert!(known.contains(first));
        for _ in 1..KNOWN_SUBSCRIPTIONS {
            known.insert(Uuid::new_v4());
        }
        assert!(known.contains(first), "not full yet");
        let last = Uuid::new_v4();
        known.insert(last);
        assert!(!known.contains(first), "forgotten when full");
        assert!(known.contains(last));
    }

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

    fn head(subscription: u128, deadline_secs: Option<i64>, arrival: u64) -> Head {
        Head {
            subscription_id: Uuid::from_u128(subscription),
            deadline: deadline_secs
                .map(|secs| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(secs)),
            arrival,
        }
    }

    /// The subscriptions of the chosen heads, in the order they are applied.
    fn window(heads: &[Head], cap: usize) -> Vec<(u128, u64)> {
        next_window(heads, cap)
            .into_iter()
            .map(|i| (heads[i].subscription_id.as_u128(), heads[i].arrival))
            .collect()
    }

    #[test]
    fn a_window_takes_the_earliest_ack_deadlines_first_and_everything_else_after() {
        let heads = [
            head(1, None, 0),     // an observation, first to arrive
            head(2, Some(30), 1), // a webhook received later
            head(3, Some(10), 2), // the webhook whose window closes first
            head(4, None, 3),     // a publisher command
            head(5, Some(20), 4),
        ];
        // Room for two: the two earliest deadlines, whatever arrived before them.
        assert_eq!(window(&heads, 2), [(3, 2), (5, 4)]);
        // Room for four: all three webhooks, then the oldest of the rest.
        assert_eq!(window(&heads, 4), [(1, 0), (2, 1), (3, 2), (5, 4)]);
        // Everything fits: applied in subscription order (the lock order of every worker).
        assert_eq!(window(&heads, 32), [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]);
        // A cap of zero still makes progress.
        assert_eq!(window(&heads, 0), [(3, 2)]);
        assert!(next_window(&[], 8).is_empty());
    }

    #[test]
    fn a_window_holds_one_message_per_subscription_its_earliest() {
        // Subscription 7's second message has the earlier deadline, yet it must wait for
        // the first: a subscription's order beats the deadline.
        let heads = [
            head(9, Some(50), 0),
            head(7, Some(40), 1),
            head(7, Some(5), 2),
            head(8, None, 3),
        ];
        assert_eq!(window(&heads, 8), [(7, 1), (8, 3), (9, 0)]);
        // Arrival order decides, not the place in the slice.
        let heads = [head(7, None, 6), head(7, None, 5)];
        assert_eq!(window(&heads, 8), [(7, 5)]);
    }

    #[test]
    fn windows_are_applied_in_subscription_order_so_two_workers_cannot_deadlock() {
        let heads: Vec<Head> = (0..20u64)
            .map(|n| {
                head(
                    u128::from((n * 7919) % 20),
                    Some(i64::try_from(n).unwrap()),
                    n,
                )
            })
            .collect();
        let ids: Vec<u128> = window(&heads, 20).iter().map(|(id, _)| *id).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted);
        assert_eq!(ids.len(), 20);
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
