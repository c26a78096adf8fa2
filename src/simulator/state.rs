//! The simulator's memory (subscriptions with their operations and webhook delivery logs,
//! purchase tokens, usage events, fault settings) and the shared handle that every route and
//! background task goes through. One mutex guards all of it and is never held across an await.

use std::collections::HashMap;
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

/// `saasSubscriptionStatus` (marketplace-api.md §3.4; `NotStarted` is never produced).
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
    pub email_id: String,
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
    pub term_unit: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub term_start: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub term_end: Option<OffsetDateTime>,
    pub auto_renew: bool,
    pub is_free_trial: bool,
    pub allowed_customer_operations: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created: OffsetDateTime,
    /// The publisher called Activate; completion is scheduled.
    pub activation_requested: bool,
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
}

/// Everything that changes; serialisable as a whole for `--state-file`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct State {
    pub subscriptions: HashMap<Uuid, Subscription>,
    pub next_seq: u64,
    pub purchase_tokens: HashMap<String, PurchaseToken>,
    /// Accepted usage, keyed by `resourceId|dimension|hour` (the duplicate bucket, §9).
    pub usage: HashMap<String, UsageRecord>,
    pub faults: Faults,
}

impl State {
    pub fn subscriptions_in_order(&self) -> Vec<&Subscription> {
        let mut all: Vec<&Subscription> = self.subscriptions.values().collect();
        all.sort_by_key(|s| s.seq);
        all
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
    /// Woken whenever an operation ends (benchmarks wait on it instead of polling).
    pub operation_finished: tokio::sync::Notify,
    /// The webhook sender's current token: `(kid, token, minted at)`.
    pub sender_token: Mutex<Option<(String, String, std::time::Instant)>>,
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
            config,
            base_url,
            state: Mutex::new(state),
            keys,
            rng: Mutex::new(rng),
            http,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            dirty: AtomicBool::new(false),
            operation_finished: tokio::sync::Notify::new(),
            sender_token: Mutex::new(None),
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

    pub fn plan(&self, offer_id: &str, plan_id: &str) -> Option<&PlanSpec> {
        let offer = base_offer(offer_id);
        self.config
            .plans
            .iter()
            .find(|p| p.offer_id == offer && p.plan_id == plan_id)
    }

    pub fn plans_of_offer(&self, offer_id: &str) -> Vec<&PlanSpec> {
        let offer = base_offer(offer_id);
        self.config
            .plans
            .iter()
            .filter(|p| p.offer_id == offer)
            .collect()
    }

    /// The absolute URL of an API path (`saas/subscriptions/...`) with the api-version.
    pub fn api_link(&self, path: &str) -> Url {
        let mut url = self.base_url.clone();
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

/// The term starting on `start` (midnight UTC): its end is the last day of the term (§3.3).
pub(crate) fn term_from(start: Date, term_unit: &str) -> (OffsetDateTime, OffsetDateTime) {
    let months = match term_unit {
        "P1Y" => 12,
        "P2Y" => 24,
        "P3Y" => 36,
        "P4Y" => 48,
        "P5Y" => 60,
        _ => 1,
    };
    let end = add_months(start, months).previous_day().unwrap_or(start);
    (start.midnight().assume_utc(), end.midnight().assume_utc())
}

impl Subscription {
    /// The `Subscription` resource of §3.1.
    pub fn to_wire(&self, publisher_id: &str) -> Value {
        let mut term = json!({ "termUnit": self.term_unit, "chargeDuration": null });
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
            "sandboxType": "None",
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

    pub fn pending_operation(&self) -> Option<&Operation> {
        self.operations
            .iter()
            .find(|o| o.status == OperationStatus::InProgress)
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
                    "resolution": o.resolution,
                    "finishedAt": o.finished.map(wire_time),
                })
            })
            .collect();
        let webhooks: Vec<Value> = self.deliveries.iter().map(Delivery::to_view).collect();
        json!({
            "subscription": self.to_wire(publisher_id),
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
    fn wire_time_has_seven_fractional_digits_and_z() {
        let t = datetime!(2022-02-14 20:26:05.1419317 UTC);
        assert_eq!(wire_time(t), "2022-02-14T20:26:05.1419317Z");
    }
}
