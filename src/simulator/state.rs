//! The simulator's memory (subscriptions with their operations and webhook delivery logs,
//! purchase tokens, usage events, fault settings) and the shared handle that every route and
//! background task goes through. One mutex guards all of it and is never held across an await.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::format_description::FormatItem;
use time::macros::format_description;
use time::{Date, Month, OffsetDateTime, UtcOffset};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use url::Url;
use uuid::Uuid;

use super::entra::KeyRing;
use super::faults::Faults;
use super::{PlanSpec, SimulatorConfig};

/// `saasSubscriptionStatus` (docs/marketplace.md §3.4; `NotStarted` is never produced).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SubscriptionStatus {
    PendingFulfillmentStart,
    Subscribed,
    Suspended,
    Unsubscribed,
}

/// Operation `action` (§3.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Action {
    Subscribe,
    ChangePlan,
    ChangeQuantity,
    Suspend,
    Reinstate,
    Unsubscribe,
    Renew,
}

/// Operation `status` (§3.4, §7.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum OperationStatus {
    NotStarted,
    InProgress,
    Succeeded,
    Failed,
    Conflict,
}

impl OperationStatus {
    /// Not final yet: `NotStarted` or `InProgress`.
    pub fn is_open(self) -> bool {
        matches!(self, Self::NotStarted | Self::InProgress)
    }
}

/// `operationRequestSource`: `Azure` = customer/CSP/Microsoft, `Partner` = the publisher's API call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RequestSource {
    Azure,
    Partner,
}

pub(crate) fn wire_name<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AadIdentifier {
    /// `null` for some identities (§15.3), as `puid`.
    pub email_id: Option<String>,
    pub object_id: Uuid,
    pub tenant_id: Uuid,
    pub puid: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Subscription {
    pub id: Uuid,
    /// Creation order, the key of list paging.
    pub seq: u64,
    pub name: String,
    pub offer_id: String,
    pub plan_id: String,
    pub quantity: Option<u32>,
    pub status: SubscriptionStatus,
    pub beneficiary: AadIdentifier,
    pub purchaser: AadIdentifier,
    /// As the plan (or the purchase) says: `P1M` … `P5Y`, `PAY`, `P18M` (§15.3).
    pub term_unit: String,
    /// `term.chargeDuration`: the billing period inside the term, when it differs.
    #[serde(default)]
    pub charge_duration: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub term_start: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub term_end: Option<OffsetDateTime>,
    pub auto_renew: bool,
    pub is_free_trial: bool,
    pub allowed_customer_operations: Vec<String>,
    /// A CSP integration-sandbox purchase: `sandboxType: Csp` (§10.2).
    #[serde(default)]
    pub csp_sandbox: bool,
    /// The private offer the purchase came through: `sourceOffers[].externalId` (§10.3).
    #[serde(default)]
    pub private_offer_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// The publisher called Activate; completion is scheduled.
    pub activation_requested: bool,
    /// Activation fails at Microsoft: it ends in an Unsubscribe (§4.2, §15.4).
    #[serde(default)]
    pub fail_activation: bool,
    /// When it last left `Subscribed` (Suspend, Unsubscribe): usage from before then is
    /// still accepted (§9, P26).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub inactive_since: Option<OffsetDateTime>,
    pub operations: Vec<Operation>,
    pub deliveries: Vec<Delivery>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Operation {
    pub id: Uuid,
    pub activity_id: Uuid,
    pub action: Action,
    /// ChangePlan: the target plan; otherwise the plan at creation.
    pub plan_id: String,
    /// ChangeQuantity: the target quantity; otherwise the quantity at creation.
    pub quantity: Option<u32>,
    pub status: OperationStatus,
    pub source: RequestSource,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// How the operation ended: "acknowledged", "auto-accepted", "rejected by webhook", ...
    pub resolution: Option<String>,
    /// When it ended (left InProgress).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished: Option<OffsetDateTime>,
    pub error_status_code: String,
    pub error_message: String,
    /// The status each Get Operation answered, in order (tests check what a poller saw).
    #[serde(default)]
    pub reads: Vec<String>,
    /// When the first Get Operation came (tests check a poller waited for `Retry-After`).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub first_read_at: Option<OffsetDateTime>,
}

/// One webhook notification and every attempt to deliver it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Delivery {
    pub id: Uuid,
    pub operation_id: Uuid,
    pub action: String,
    pub attempts: Vec<Attempt>,
    pub outcome: DeliveryOutcome,
    /// Injected by the `duplicateDeliveries` fault.
    pub duplicate: bool,
    /// Injected by the `unknownActions` fault.
    pub injected: bool,
    /// The §6.2 payload as sent (not kept in the state file).
    #[serde(skip)]
    pub payload: Value,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum DeliveryOutcome {
    Pending,
    Delivered,
    /// A 4xx answer to a ChangePlan/ChangeQuantity webhook (§6.3).
    Rejected,
    Exhausted,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Attempt {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub status_code: Option<u16>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct PurchaseToken {
    pub subscription_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct UsageRecord {
    pub usage_event_id: Uuid,
    pub resource_id: Uuid,
    pub offer_id: String,
    pub plan_id: String,
    pub dimension: String,
    pub quantity: f64,
    #[serde(with = "time::serde::rfc3339")]
    pub effective_start_time: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub message_time: OffsetDateTime,
    /// What Partner Center processed, when a test seeds a difference
    /// (`PATCH /simulator/usage`): `GET /usageEvents` then reports `Mismatch`.
    #[serde(default)]
    pub processed_quantity: Option<f64>,
    /// A seeded rejection: `GET /usageEvents` reports `Rejected`.
    #[serde(default)]
    pub rejected: bool,
}

/// Everything that changes; serialisable as a whole for `--state-file`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub subscriptions: HashMap<Uuid, Subscription>,
    /// Subscription ids by `seq`, the order List Subscriptions pages in (an index: a page
    /// of a million subscriptions costs its own size, not a sort of all of them). Not in
    /// the state file: [`State::rebuild_order`] rebuilds it after loading one.
    #[serde(skip)]
    order: BTreeMap<u64, Uuid>,
    pub next_seq: u64,
    pub purchase_tokens: HashMap<String, PurchaseToken>,
    /// Accepted usage, keyed by `resourceId|dimension|hour` (the duplicate bucket, §9).
    pub usage: HashMap<String, UsageRecord>,
    /// Events refused as `Duplicate`, by the same key: repeats of a bucket already billed.
    #[serde(default)]
    pub usage_duplicates: HashMap<String, u32>,
    pub faults: Faults,
}

impl State {
    /// Adds a subscription (its `seq` already assigned).
    pub fn insert_subscription(&mut self, subscription: Subscription) {
        self.order.insert(subscription.seq, subscription.id);
        self.subscriptions.insert(subscription.id, subscription);
    }

    /// Rebuilds the `seq` index from the subscriptions (after a state file was loaded).
    pub fn rebuild_order(&mut self) {
        self.order = self.subscriptions.values().map(|s| (s.seq, s.id)).collect();
    }

    /// The subscriptions whose `seq` is above `after`, in `seq` order.
    pub fn subscriptions_after(&self, after: u64) -> impl Iterator<Item = &Subscription> {
        self.order
            .range(after.saturating_add(1)..)
            .filter_map(|(_, id)| self.subscriptions.get(id))
    }

    pub fn subscriptions_in_order(&self) -> Vec<&Subscription> {
        self.subscriptions_after(0).collect()
    }
}

/// What routes and background tasks share.
pub(crate) struct Shared {
    pub config: SimulatorConfig,
    /// `http://host:port/`.
    pub base_url: Url,
    state: Mutex<State>,
    pub keys: KeyRing,
    rng: Mutex<StdRng>,
    pub http: reqwest::Client,
    pub tasks: TaskTracker,
    pub cancel: CancellationToken,
    pub dirty: AtomicBool,
    /// The plans on sale; starts as `config.plans`, replaced by `PUT /simulator/catalogue`.
    catalogue: Mutex<Vec<PlanSpec>>,
    /// Those waiting for an operation to end, by operation: woken when it ends (benchmarks
    /// wait on it instead of polling). One per operation, so an ending wakes its own
    /// waiters only, not every waiter of a load's hundreds.
    pub operation_waiters: OperationWaiters,
    /// The webhook sender's current token: `(kid, token, minted at)`.
    pub sender_token: Mutex<Option<(String, String, std::time::Instant)>>,
    /// Certificates and federated credentials registered on the app.
    pub credentials: super::credentials::Registrations,
    /// Authorization codes of interactive sign-ins, not yet redeemed.
    pub sign_in_codes: super::sign_in::SignInCodes,
    /// GETs of the JWKS so far (a verifier's cache shows in how few there are).
    pub jwks_fetches: std::sync::atomic::AtomicUsize,
}

/// Who waits for which operation to end: one wake-up per operation, so an operation's end
/// wakes its own waiters only, not every waiter of a load's hundreds (each of which would
/// read the state under its lock to find its operation still open).
#[derive(Debug, Default)]
pub struct OperationWaiters(Mutex<HashMap<Uuid, Arc<tokio::sync::Notify>>>);

impl OperationWaiters {
    fn map(&self) -> MutexGuard<'_, HashMap<Uuid, Arc<tokio::sync::Notify>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The wake-up of `operation`'s end, registered until [`Self::release`].
    pub fn register(&self, operation: Uuid) -> Arc<tokio::sync::Notify> {
        Arc::clone(self.map().entry(operation).or_default())
    }

    /// Gives back a wake-up from [`Self::register`]; the last one unregisters it. Every
    /// clone is taken and dropped under the map's lock, so two waiters releasing at once
    /// cannot both see the other's and leave the entry behind.
    pub fn release(&self, operation: Uuid, waiter: Arc<tokio::sync::Notify>) {
        let mut map = self.map();
        drop(waiter);
        // Only the map's own is left: nobody else waits.
        if map
            .get(&operation)
            .is_some_and(|w| Arc::strong_count(w) == 1)
        {
            map.remove(&operation);
        }
    }

    /// Wakes those waiting for `operation` to end.
    pub fn wake(&self, operation: Uuid) {
        if let Some(waiter) = self.map().get(&operation) {
            waiter.notify_waiters();
        }
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("base_url", &self.base_url.as_str())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(
        config: SimulatorConfig,
        base_url: Url,
        state: State,
        keys: KeyRing,
        rng: StdRng,
        http: reqwest::Client,
    ) -> Self {
        Self {
            catalogue: Mutex::new(config.plans.clone()),
            config,
            base_url,
            state: Mutex::new(state),
            keys,
            rng: Mutex::new(rng),
            http,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            dirty: AtomicBool::new(false),
            operation_waiters: OperationWaiters::default(),
            sender_token: Mutex::new(None),
            credentials: Default::default(),
            sign_in_codes: Default::default(),
            jwks_fetches: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the simulator down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Runs `f` under the lock and marks the state for saving.
    pub fn mutate<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.dirty.store(true, Ordering::Release);
        result
    }

    pub fn rng(&self) -> MutexGuard<'_, StdRng> {
        self.rng.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` after `delay` unless the simulator stops first.
    pub fn spawn_after(
        self: &Arc<Self>,
        delay: Duration,
        f: impl FnOnce(&Arc<Shared>) + Send + 'static,
    ) {
        let shared = Arc::clone(self);
        self.tasks.spawn(async move {
            tokio::select! {
                () = shared.cancel.cancelled() => {}
                () = tokio::time::sleep(delay) => f(&shared),
            }
        });
    }

    /// Sleeps unless the simulator stops first; false when it stopped.
    pub async fn sleep(&self, delay: Duration) -> bool {
        tokio::select! {
            () = self.cancel.cancelled() => false,
            () = tokio::time::sleep(delay) => true,
        }
    }

    pub fn plan(&self, offer_id: &str, plan_id: &str) -> Option<PlanSpec> {
        let offer = base_offer(offer_id);
        self.catalogue()
            .iter()
            .find(|p| p.offer_id == offer && p.plan_id == plan_id)
            .cloned()
    }

    pub fn plans_of_offer(&self, offer_id: &str) -> Vec<PlanSpec> {
        let offer = base_offer(offer_id);
        self.catalogue()
            .iter()
            .filter(|p| p.offer_id == offer)
            .cloned()
            .collect()
    }

    pub fn catalogue(&self) -> MutexGuard<'_, Vec<PlanSpec>> {
        self.catalogue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Where links Microsoft hands out point: the simulator's scheme and port on the
    /// configured link host (§15.1), else the simulator itself.
    pub fn link_base(&self) -> Url {
        let mut url = self.base_url.clone();
        if let Some(host) = &self.config.link_host
            && url.set_host(Some(host)).is_err()
        {
            tracing::warn!(host = %host, "the link host is not a valid host; links stay on the simulator's");
        }
        url
    }

    /// The absolute URL of an API path (`saas/subscriptions/...`) with the api-version, on
    /// the link host.
    pub fn api_link(&self, path: &str) -> Url {
        let mut url = self.link_base();
        url.set_path(&format!("api/{path}"));
        url.query_pairs_mut()
            .append_pair("api-version", super::API_VERSION);
        url
    }

    pub fn operation_location(&self, subscription_id: Uuid, operation_id: Uuid) -> Url {
        self.api_link(&format!(
            "saas/subscriptions/{subscription_id}/operations/{operation_id}"
        ))
    }
}

/// Preview-audience purchases carry a `-preview` suffix on the offer id (§3.1, P14).
fn base_offer(offer_id: &str) -> &str {
    offer_id.strip_suffix("-preview").unwrap_or(offer_id)
}

const WIRE_TIME: &[FormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:7]Z");

/// Marketplace timestamps: UTC, 7 fractional digits, `Z` (§1.5).
pub(crate) fn wire_time(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(WIRE_TIME)
        .unwrap_or_default()
}

fn add_months(date: Date, months: i32) -> Date {
    let index = date.year() * 12 + (i32::from(u8::from(date.month())) - 1) + months;
    let year = index.div_euclid(12);
    let month = Month::try_from(u8::try_from(index.rem_euclid(12) + 1).unwrap_or(1))
        .unwrap_or(Month::January);
    let day = date.day().min(month.length(year));
    Date::from_calendar_date(year, month, day).unwrap_or(date)
}

/// The length of a term unit as (months, days): `P1M`, `P1Y` … `P5Y` and any ISO-8601
/// duration of years, months and days (`P18M`, `P1Y6M`, `P30D`). `None` for `PAY` and
/// anything else (§15.3).
pub(crate) fn term_length(term_unit: &str) -> Option<(u32, u32)> {
    let rest = term_unit.trim().strip_prefix('P')?;
    if rest.is_empty() {
        return None;
    }
    let (mut months, mut days, mut number) = (0u32, 0u32, String::new());
    let mut last_unit = 0;
    for c in rest.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u32 = number.parse().ok()?;
        number.clear();
        // Designators must come in order Y, M, D, each at most once.
        let (rank, add_months, add_days) = match c {
            'Y' => (1, n.checked_mul(12)?, 0),
            'M' => (2, n, 0),
            'D' => (3, 0, n),
            _ => return None,
        };
        if rank <= last_unit {
            return None;
        }
        last_unit = rank;
        months = months.checked_add(add_months)?;
        days = days.checked_add(add_days)?;
    }
    (number.is_empty() && months + days > 0 && months <= 1200).then_some((months, days))
}

/// How the plan page names a term unit.
pub(crate) fn term_description(term_unit: &str) -> String {
    match term_length(term_unit) {
        Some((12, 0)) => "1 year".into(),
        Some((1, 0)) => "1 month".into(),
        Some((months, 0)) if months % 12 == 0 => format!("{} years", months / 12),
        Some((months, 0)) => format!("{months} months"),
        Some((months, days)) => format!("{months} months and {days} days"),
        None if term_unit == "PAY" => "pay as you go".into(),
        None => term_unit.to_owned(),
    }
}

/// The term starting on `start` (midnight UTC): its end is the last day of the term (§3.3).
/// `PAY` and units that are not durations bill monthly [INFER].
pub(crate) fn term_from(start: Date, term_unit: &str) -> (OffsetDateTime, OffsetDateTime) {
    let (months, days) = term_length(term_unit).unwrap_or((1, 0));
    let after_months = add_months(start, i32::try_from(months).unwrap_or(1));
    let after = after_months
        .checked_add(time::Duration::days(i64::from(days)))
        .unwrap_or(after_months);
    let end = after.previous_day().unwrap_or(start);
    (start.midnight().assume_utc(), end.midnight().assume_utc())
}

impl Subscription {
    /// The `Subscription` resource of §3.1.
    pub fn to_wire(&self, publisher_id: &str) -> Value {
        let mut term =
            json!({ "termUnit": self.term_unit, "chargeDuration": self.charge_duration });
        if let (Some(start), Some(end)) = (self.term_start, self.term_end) {
            term["startDate"] = json!(wire_time(start));
            term["endDate"] = json!(wire_time(end));
        }
        json!({
            "id": self.id,
            "name": self.name,
            "publisherId": publisher_id,
            "offerId": self.offer_id,
            "planId": self.plan_id,
            "quantity": self.quantity,
            "beneficiary": self.beneficiary,
            "purchaser": self.purchaser,
            "allowedCustomerOperations": self.allowed_customer_operations,
            "sessionMode": "None",
            "isFreeTrial": self.is_free_trial,
            "isTest": false,
            "sandboxType": if self.csp_sandbox { "Csp" } else { "None" },
            "saasSubscriptionStatus": wire_name(&self.status),
            "term": term,
            "autoRenew": self.auto_renew,
            "created": wire_time(self.created),
            "lastModified": "0001-01-01T00:00:00",
        })
    }

    pub fn operation(&self, id: Uuid) -> Option<&Operation> {
        self.operations.iter().find(|o| o.id == id)
    }

    pub fn operation_mut(&mut self, id: Uuid) -> Option<&mut Operation> {
        self.operations.iter_mut().find(|o| o.id == id)
    }

    /// The operation holding the subscription's lock (§13: one pending operation).
    pub fn pending_operation(&self) -> Option<&Operation> {
        self.operations.iter().find(|o| o.status.is_open())
    }

    /// The admin view: the resource, its operations and its delivery log.
    pub fn to_view(&self, publisher_id: &str) -> Value {
        let operations: Vec<Value> = self
            .operations
            .iter()
            .map(|o| {
                json!({
                    "id": o.id,
                    "action": wire_name(&o.action),
                    "status": wire_name(&o.status),
                    "source": wire_name(&o.source),
                    "planId": o.plan_id,
                    "quantity": o.quantity,
                    "timeStamp": wire_time(o.created),
                    "reads": o.reads,
                    "firstReadAfterMs": o.first_read_at.map(|at| (at - o.created).whole_milliseconds()),
                    "resolution": o.resolution,
                    "finishedAt": o.finished.map(wire_time),
                })
            })
            .collect();
        let webhooks: Vec<Value> = self.deliveries.iter().map(Delivery::to_view).collect();
        json!({
            "subscription": self.to_wire(publisher_id),
            "privateOfferId": self.private_offer_id,
            "operations": operations,
            "webhooks": webhooks,
        })
    }
}

impl Operation {
    /// The `Operation` resource of §3.5.
    pub fn to_wire(&self, subscription: &Subscription, publisher_id: &str) -> Value {
        json!({
            "id": self.id,
            "activityId": self.activity_id,
            "subscriptionId": subscription.id,
            "offerId": subscription.offer_id,
            "publisherId": publisher_id,
            "planId": self.plan_id,
            "quantity": self.quantity,
            "action": wire_name(&self.action),
            "timeStamp": wire_time(self.created),
            "status": wire_name(&self.status),
            "operationRequestSource": wire_name(&self.source),
            "errorStatusCode": self.error_status_code,
            "errorMessage": self.error_message,
        })
    }
}

impl Delivery {
    pub fn to_view(&self) -> Value {
        let attempts: Vec<Value> = self
            .attempts
            .iter()
            .map(|a| match (a.status_code, &a.error) {
                (Some(code), _) => json!({ "statusCode": code, "at": wire_time(a.at) }),
                (None, error) => json!({ "error": error, "at": wire_time(a.at) }),
            })
            .collect();
        json!({
            "id": self.id,
            "operationId": self.operation_id,
            "action": self.action,
            "attempts": attempts,
            "delivered": self.outcome == DeliveryOutcome::Delivered,
            "outcome": wire_name(&self.outcome),
            "duplicate": self.duplicate,
            "injected": self.injected,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    #[test]
    fn an_operation_ends_wakes_its_own_waiters_and_the_last_one_unregisters() {
        use std::future::Future;
        let waiters = OperationWaiters::default();
        let (mine, other) = (Uuid::now_v7(), Uuid::now_v7());
        let first = waiters.register(mine);
        let second = waiters.register(mine);
        let elsewhere = waiters.register(other);
        {
            let (woken, not_woken) = (first.notified(), elsewhere.notified());
            tokio::pin!(woken, not_woken);
            waiters.wake(mine);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            assert!(
                woken.as_mut().poll(&mut cx).is_ready(),
                "the operation's end wakes its waiter"
            );
            assert!(
                not_woken.as_mut().poll(&mut cx).is_pending(),
                "another operation's waiter sleeps on"
            );
        }
        waiters.release(mine, first);
        assert_eq!(waiters.map().len(), 2, "a second waiter still waits");
        waiters.release(mine, second);
        waiters.release(other, elsewhere);
        assert!(waiters.map().is_empty(), "the last waiter unregisters");
    }

    #[test]
    fn monthly_term_ends_the_day_before_the_same_day_next_month() {
        let (start, end) = term_from(date!(2025 - 03 - 01), "P1M");
        assert_eq!(start, datetime!(2025-03-01 0:00 UTC));
        assert_eq!(end, datetime!(2025-03-31 0:00 UTC));
        let (_, end) = term_from(date!(2024 - 01 - 31), "P1M");
        assert_eq!(end.date(), date!(2024 - 02 - 28));
        let (_, end) = term_from(date!(2025 - 06 - 15), "P1Y");
        assert_eq!(end.date(), date!(2026 - 06 - 14));
    }

    #[test]
    fn custom_iso_durations_set_the_term_and_pay_bills_monthly() {
        let (_, end) = term_from(date!(2026 - 01 - 10), "P18M");
        assert_eq!(end.date(), date!(2027 - 07 - 09));
        let (_, end) = term_from(date!(2026 - 01 - 10), "P5Y");
        assert_eq!(end.date(), date!(2031 - 01 - 09));
        let (_, end) = term_from(date!(2026 - 01 - 10), "P1Y6M");
        assert_eq!(end.date(), date!(2027 - 07 - 09));
        let (_, end) = term_from(date!(2026 - 01 - 10), "P30D");
        assert_eq!(end.date(), date!(2026 - 02 - 08));
        let (_, end) = term_from(date!(2026 - 01 - 10), "PAY");
        assert_eq!(end.date(), date!(2026 - 02 - 09));
        for bad in ["PAY", "P", "P1", "PM", "P1M1Y", "P1H", "1M", "P1M1M"] {
            assert_eq!(term_length(bad), None, "{bad}");
        }
        assert_eq!(term_description("P18M"), "18 months");
        assert_eq!(term_description("P3Y"), "3 years");
        assert_eq!(term_description("PAY"), "pay as you go");
    }

    #[test]
    fn wire_time_has_seven_fractional_digits_and_z() {
        let t = datetime!(2022-02-14 20:26:05.1419317 UTC);
        assert_eq!(wire_time(t), "2022-02-14T20:26:05.1419317Z");
    }
}
