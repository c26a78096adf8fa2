//! Prometheus metrics of every process kind: the one process-wide recorder (installed on
//! first use, shared by `serve` and `work`), the metric names, and small recording helpers
//! so call sites stay one line and label values stay low-cardinality.
//!
//! The names are a contract with the Grafana dashboard in `deploy/` and the README's
//! "Observability" section; change them together.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

// ---- ingress ---------------------------------------------------------------------------

/// Counter `{route, method, status}`; `route` is the matched template, never the raw path.
pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
/// Histogram `{route, status}`.
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
/// Histogram `{outcome}`: how long RabbitMQ took to confirm a publish.
pub const PUBLISH_CONFIRM_SECONDS: &str = "publish_confirm_seconds";
/// Counter `{reason}`: webhook tokens refused.
pub const JWT_REJECTIONS_TOTAL: &str = "jwt_rejections_total";
/// Histogram `{outcome}` (`ok`, `failed`): fetches of Entra's JWKS, which every webhook
/// needing the keys waits for.
pub const JWKS_FETCH_SECONDS: &str = "jwks_fetch_seconds";
/// Gauge: connections the ingress has open (at most `HTTP_MAX_CONNECTIONS`).
pub const FULFILLMENT_HTTP_CONNECTIONS: &str = "fulfillment_http_connections";
/// Counter: connections that waited in the accept queue for a place under the limit.
pub const FULFILLMENT_HTTP_CONNECTIONS_WAITED_TOTAL: &str =
    "fulfillment_http_connections_waited_total";

// ---- worker ----------------------------------------------------------------------------

/// Counter `{action, outcome}`: events through the machine. `action` is the event kind
/// (`WebhookChangePlan`, `PurchaseResolved`, `ActivationConfirmed`, …); `outcome` one of
/// [`EventOutcome`].
pub const FULFILLMENT_EVENTS_TOTAL: &str = "fulfillment_events_total";
/// Counter `{from, to}`: state changes (`from != to`), by state name.
pub const FULFILLMENT_TRANSITIONS_TOTAL: &str = "fulfillment_transitions_total";
/// Counter `{reason}`: messages sent to the dead-letter queue and outbox rows given up,
/// by [`DeadLetterReason`].
pub const FULFILLMENT_DEAD_LETTERS_TOTAL: &str = "fulfillment_dead_letters_total";
/// Histogram: webhook receipt at the ingress → PATCH of the operation answered (P7: the
/// budget is 10 s).
pub const FULFILLMENT_WEBHOOK_TO_ACK_SECONDS: &str = "fulfillment_webhook_to_ack_seconds";
/// Gauge: outbox rows not yet carried out (`pending`).
pub const FULFILLMENT_OUTBOX_BACKLOG: &str = "fulfillment_outbox_backlog";
/// Gauge: age of the oldest pending outbox row (0 when there is none).
pub const FULFILLMENT_OLDEST_UNPROCESSED_EVENT_AGE_SECONDS: &str =
    "fulfillment_oldest_unprocessed_event_age_seconds";
/// Gauge: age of the oldest inbound delivery this worker holds unacknowledged (0 when it
/// holds none). Grows without bound only when the worker is stuck.
pub const FULFILLMENT_OLDEST_DELIVERY_HELD_SECONDS: &str =
    "fulfillment_oldest_delivery_held_seconds";
/// Gauge: inbound deliveries held unacknowledged longer than `worker.stall_after_secs`;
/// above 0 the worker's `/readyz` answers 503.
pub const FULFILLMENT_DELIVERIES_HELD_TOO_LONG: &str = "fulfillment_deliveries_held_too_long";
/// Counter `{action}`: operations Microsoft had already closed when we acknowledged them
/// (PATCH answered 409): auto-accepted because we answered late, or decided elsewhere.
pub const FULFILLMENT_AUTO_ACCEPTED_TOTAL: &str = "fulfillment_auto_accepted_total";

// ---- calls to Microsoft ----------------------------------------------------------------

/// Counter `{endpoint, status}`: one per HTTP attempt; `status` is the code or `error`
/// (no response: connection, timeout).
pub const MARKETPLACE_REQUESTS_TOTAL: &str = "marketplace_requests_total";
/// Histogram `{endpoint, status}` of each attempt.
pub const MARKETPLACE_REQUEST_DURATION_SECONDS: &str = "marketplace_request_duration_seconds";
/// Counter `{endpoint}`: in-process retries (a backoff sleep before another attempt).
pub const MARKETPLACE_RETRIES_TOTAL: &str = "marketplace_retries_total";
/// Counter: Entra access tokens that could not be fetched.
pub const MARKETPLACE_TOKEN_REFRESH_FAILURES_TOTAL: &str =
    "marketplace_token_refresh_failures_total";
/// Gauge: seconds until the credential (client secret or certificate) expires, by `credential`.
pub const MARKETPLACE_CREDENTIAL_EXPIRY_SECONDS: &str = "marketplace_credential_expiry_seconds";

/// Buckets for the ingress's request and confirm latencies: it should answer in
/// milliseconds, and Microsoft gives up on a webhook call long before the 10 s end.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Calls to Microsoft: up to the 30 s request timeout.
const MARKETPLACE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Webhook → ACK: up to and past Microsoft's 10 s window, so a late ACK shows as such.
const WEBHOOK_TO_ACK_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle. The first call installs the global `metrics`
/// recorder; later calls (the worker and the ingress in one process, tests) share it.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE.get_or_init(install).clone()
}

/// Histogram samples pile up in the recorder until something drains them; a scrape does, but
/// a process nobody scrapes would grow by a few bytes per request forever. A background
/// thread drains them every few seconds (what `PrometheusBuilder::install` would spawn).
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                handle.run_upkeep();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms are drained by scrapes only");
    }
}

const UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

fn install() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(FULFILLMENT_WEBHOOK_TO_ACK_SECONDS.to_string()),
            WEBHOOK_TO_ACK_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(MARKETPLACE_REQUEST_DURATION_SECONDS.to_string()),
                MARKETPLACE_BUCKETS,
            )
        })
        // `Full` matchers take precedence over this one.
        .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS))
        .expect("the bucket lists are not empty");
    // Build first so a recorder installed by someone else (another subsystem in the same
    // process) does not leave us without a handle: we then render our own, empty registry.
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    match metrics::set_global_recorder(recorder) {
        Ok(()) => {
            describe();
            spawn_upkeep(handle.clone());
        }
        Err(e) => {
            tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics will be empty")
        }
    }
    handle
}

/// `# HELP` lines.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests by route, method and status"
    );
    describe_histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "HTTP request latency by route and status"
    );
    describe_histogram!(
        PUBLISH_CONFIRM_SECONDS,
        Unit::Seconds,
        "Time RabbitMQ took to confirm a publish"
    );
    describe_counter!(JWT_REJECTIONS_TOTAL, "Webhook tokens refused, by reason");
    describe_histogram!(
        JWKS_FETCH_SECONDS,
        Unit::Seconds,
        "Fetches of Entra's JWKS by outcome; the webhooks that need the keys wait for them"
    );
    describe_gauge!(
        FULFILLMENT_HTTP_CONNECTIONS,
        "Connections the ingress has open (at most HTTP_MAX_CONNECTIONS)"
    );
    describe_counter!(
        FULFILLMENT_HTTP_CONNECTIONS_WAITED_TOTAL,
        "Connections that waited in the accept queue for a place under HTTP_MAX_CONNECTIONS"
    );
    describe_counter!(
        FULFILLMENT_EVENTS_TOTAL,
        "Events through the subscription state machine, by event kind and outcome"
    );
    describe_counter!(
        FULFILLMENT_TRANSITIONS_TOTAL,
        "Subscription state changes, by from and to state"
    );
    describe_counter!(
        FULFILLMENT_DEAD_LETTERS_TOTAL,
        "Messages dead-lettered and effects given up, by reason class"
    );
    describe_histogram!(
        FULFILLMENT_WEBHOOK_TO_ACK_SECONDS,
        Unit::Seconds,
        "Webhook receipt to the PATCH of its operation (Microsoft's budget: 10 s)"
    );
    describe_gauge!(
        FULFILLMENT_OUTBOX_BACKLOG,
        "Outbox rows not yet carried out"
    );
    describe_gauge!(
        FULFILLMENT_OLDEST_UNPROCESSED_EVENT_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest outbox row not yet carried out"
    );
    describe_gauge!(
        FULFILLMENT_OLDEST_DELIVERY_HELD_SECONDS,
        Unit::Seconds,
        "Age of the oldest inbound delivery this worker holds unacknowledged"
    );
    describe_gauge!(
        FULFILLMENT_DELIVERIES_HELD_TOO_LONG,
        "Inbound deliveries held unacknowledged longer than worker.stall_after_secs"
    );
    describe_counter!(
        FULFILLMENT_AUTO_ACCEPTED_TOTAL,
        "Operations Microsoft had already closed when we acknowledged them (409)"
    );
    describe_counter!(
        MARKETPLACE_REQUESTS_TOTAL,
        "HTTP attempts to the Marketplace API, by endpoint and status (or error)"
    );
    describe_histogram!(
        MARKETPLACE_REQUEST_DURATION_SECONDS,
        Unit::Seconds,
        "Latency of each attempt to the Marketplace API"
    );
    describe_counter!(
        MARKETPLACE_RETRIES_TOTAL,
        "In-process retries of Marketplace calls, by endpoint"
    );
    describe_counter!(
        MARKETPLACE_TOKEN_REFRESH_FAILURES_TOTAL,
        "Entra access tokens that could not be fetched, by Entra error code (AADSTS…)"
    );
    describe_gauge!(
        MARKETPLACE_CREDENTIAL_EXPIRY_SECONDS,
        Unit::Seconds,
        "Seconds until the Marketplace API credential (secret or certificate) expires"
    );
    describe_usage_series();
    describe_effect_series();
}

/// What became of an event (`fulfillment_events_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventOutcome {
    /// The machine changed our view or produced work.
    Applied,
    /// The machine refused it (policy, state, Microsoft refused).
    Rejected,
    /// Already seen (inbox or the machine's own key check).
    Duplicate,
    /// Older than what the state reflects (P10).
    Stale,
    /// Changes nothing (terminal state, not applicable, no change).
    Ignored,
    /// Parked in a retry tier.
    RetryScheduled,
    /// Sent to the dead-letter queue.
    DeadLettered,
}

impl EventOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "applied",
            Self::Rejected => "rejected",
            Self::Duplicate => "duplicate",
            Self::Stale => "stale",
            Self::Ignored => "ignored",
            Self::RetryScheduled => "retry_scheduled",
            Self::DeadLettered => "dead_lettered",
        }
    }

    /// The outcome of a decision of the machine.
    pub fn of(outcome: &fulfillment_state_machine::Outcome) -> Self {
        use fulfillment_state_machine::{IgnoreReason, Outcome};
        match outcome {
            Outcome::Applied { .. } => Self::Applied,
            Outcome::Rejected { .. } => Self::Rejected,
            Outcome::Ignored {
                reason: IgnoreReason::Duplicate,
            } => Self::Duplicate,
            Outcome::Ignored {
                reason: IgnoreReason::Stale,
            } => Self::Stale,
            Outcome::Ignored { .. } => Self::Ignored,
        }
    }
}

/// Why something ended in a dead letter (`fulfillment_dead_letters_total{reason}`): a
/// class, never the free text (which is in the message headers and the event log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// The body is not one of our messages.
    MalformedMessage,
    /// A message that cannot become a machine event (invalid webhook, ids, …).
    Untranslatable,
    /// The stored machine cannot be read.
    CorruptState,
    /// Microsoft refused what applying the message needs (e.g. a GET of the subscription of
    /// an unknown webhook answered 400 or 403); its answer is in `x-marketplace-response`.
    Refused,
    /// The retry tiers are used up.
    RetriesExhausted,
    /// An effect failed permanently (Microsoft answered 400/403/404 …).
    EffectPermanent,
    /// An effect failed on every attempt of its budget.
    EffectAttemptsExhausted,
}

impl DeadLetterReason {
    pub const ALL: [DeadLetterReason; 7] = [
        Self::MalformedMessage,
        Self::Untranslatable,
        Self::CorruptState,
        Self::Refused,
        Self::RetriesExhausted,
        Self::EffectPermanent,
        Self::EffectAttemptsExhausted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedMessage => "malformed_message",
            Self::Untranslatable => "untranslatable",
            Self::CorruptState => "corrupt_state",
            Self::Refused => "refused",
            Self::RetriesExhausted => "retries_exhausted",
            Self::EffectPermanent => "effect_permanent",
            Self::EffectAttemptsExhausted => "effect_attempts_exhausted",
        }
    }
}

/// Creates the worker's counters at 0, so dashboards and alerts (`increase(…) > 0`) see a
/// series before the first incident.
pub fn register_worker_series() {
    for reason in DeadLetterReason::ALL {
        metrics::counter!(FULFILLMENT_DEAD_LETTERS_TOTAL, "reason" => reason.as_str()).absolute(0);
    }
    for action in ["ChangePlan", "ChangeQuantity"] {
        metrics::counter!(FULFILLMENT_AUTO_ACCEPTED_TOTAL, "action" => action).absolute(0);
    }
    metrics::counter!(MARKETPLACE_TOKEN_REFRESH_FAILURES_TOTAL).absolute(0);
    for outcome in ["accepted", "duplicate", "expired", "rejected"] {
        metrics::counter!(FULFILLMENT_USAGE_HOURS_TOTAL, "outcome" => outcome).absolute(0);
    }
    metrics::counter!(FULFILLMENT_USAGE_HOURS_SUBMITTED_TOTAL).absolute(0);
    metrics::counter!(FULFILLMENT_ACKS_LATE_TOTAL).absolute(0);
}

/// One event decided (or refused before the machine saw it).
pub fn record_event(action: &'static str, outcome: EventOutcome) {
    metrics::counter!(
        FULFILLMENT_EVENTS_TOTAL,
        "action" => action,
        "outcome" => outcome.as_str()
    )
    .increment(1);
}

/// A decision of the machine: the event, and the state change if there was one.
pub fn record_decision(
    action: fulfillment_state_machine::EventKind,
    decision: &fulfillment_state_machine::Decision,
) {
    record_event(action.as_str(), EventOutcome::of(&decision.outcome));
    if decision.from != decision.to {
        metrics::counter!(
            FULFILLMENT_TRANSITIONS_TOTAL,
            "from" => decision.from.as_str(),
            "to" => decision.to.as_str()
        )
        .increment(1);
    }
}

pub fn record_dead_letter(reason: DeadLetterReason) {
    metrics::counter!(FULFILLMENT_DEAD_LETTERS_TOTAL, "reason" => reason.as_str()).increment(1);
}

pub fn record_webhook_to_ack(elapsed: Duration) {
    metrics::histogram!(FULFILLMENT_WEBHOOK_TO_ACK_SECONDS).record(elapsed.as_secs_f64());
}

/// `action` is the Marketplace action of the operation (`ChangePlan`, …).
pub fn record_auto_accepted(action: &'static str) {
    metrics::counter!(FULFILLMENT_AUTO_ACCEPTED_TOTAL, "action" => action).increment(1);
}

/// What the worker holds: the oldest delivery's age and how many are stalled.
pub fn set_deliveries_held(oldest_age: Duration, held_too_long: usize) {
    metrics::gauge!(FULFILLMENT_OLDEST_DELIVERY_HELD_SECONDS).set(oldest_age.as_secs_f64());
    metrics::gauge!(FULFILLMENT_DELIVERIES_HELD_TOO_LONG).set(held_too_long as f64);
}

pub fn set_outbox_backlog(pending: u64, oldest_age: Duration) {
    metrics::gauge!(FULFILLMENT_OUTBOX_BACKLOG).set(pending as f64);
    metrics::gauge!(FULFILLMENT_OLDEST_UNPROCESSED_EVENT_AGE_SECONDS).set(oldest_age.as_secs_f64());
}

/// One HTTP attempt to the Marketplace API; `status` `None` = no response.
pub fn record_marketplace_request(endpoint: &'static str, status: Option<u16>, elapsed: Duration) {
    let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
    metrics::counter!(
        MARKETPLACE_REQUESTS_TOTAL,
        "endpoint" => endpoint,
        "status" => status.clone()
    )
    .increment(1);
    metrics::histogram!(
        MARKETPLACE_REQUEST_DURATION_SECONDS,
        "endpoint" => endpoint,
        "status" => status
    )
    .record(elapsed.as_secs_f64());
}

pub fn record_marketplace_retry(endpoint: &'static str) {
    metrics::counter!(MARKETPLACE_RETRIES_TOTAL, "endpoint" => endpoint).increment(1);
}

/// `code`: Entra's `AADSTS…` code, its OAuth error, or the error kind.
pub fn record_token_refresh_failure(code: &str) {
    metrics::counter!(MARKETPLACE_TOKEN_REFRESH_FAILURES_TOTAL, "code" => code.to_owned())
        .increment(1);
}

/// `credential`: `secret` or `certificate`; negative once expired.
pub fn set_credential_expiry(credential: &'static str, seconds_left: f64) {
    metrics::gauge!(MARKETPLACE_CREDENTIAL_EXPIRY_SECONDS, "credential" => credential)
        .set(seconds_left);
}

// ---- metered billing (src/metering) -----------------------------------------------------

/// Counter `{status}`: usage events the ISV reported and we stored: `counted` (in its
/// hour's total), `late` (its hour was already submitted: reported, not billed), `repeat`
/// (an idempotency key seen before: counted once).
pub const FULFILLMENT_USAGE_EVENTS_TOTAL: &str = "fulfillment_usage_events_total";
/// Counter: hours sent to Microsoft (each send of each hour, repeats included).
pub const FULFILLMENT_USAGE_HOURS_SUBMITTED_TOTAL: &str = "fulfillment_usage_hours_submitted_total";
/// Counter `{outcome}`: hours settled: `accepted`, `duplicate` (billed already),
/// `expired` (Microsoft's 24-hour window passed), `rejected` (with Microsoft's reason).
pub const FULFILLMENT_USAGE_HOURS_TOTAL: &str = "fulfillment_usage_hours_total";
/// Gauge: hours not yet settled (open or being submitted).
pub const FULFILLMENT_USAGE_HOURS_PENDING: &str = "fulfillment_usage_hours_pending";
/// Gauge: age of the oldest unsettled hour's start (0 when none); past 24 h it expires.
pub const FULFILLMENT_USAGE_OLDEST_PENDING_HOUR_AGE_SECONDS: &str =
    "fulfillment_usage_oldest_pending_hour_age_seconds";

fn describe_usage_series() {
    use metrics::{Unit, describe_counter, describe_gauge};
    describe_counter!(
        FULFILLMENT_USAGE_EVENTS_TOTAL,
        "Usage events stored, by status (counted, late, repeat)"
    );
    describe_counter!(
        FULFILLMENT_USAGE_HOURS_SUBMITTED_TOTAL,
        "Usage hours sent to Microsoft (repeats included)"
    );
    describe_counter!(
        FULFILLMENT_USAGE_HOURS_TOTAL,
        "Usage hours settled, by outcome (accepted, duplicate, expired, rejected)"
    );
    describe_gauge!(
        FULFILLMENT_USAGE_HOURS_PENDING,
        "Usage hours not yet settled (open or being submitted)"
    );
    describe_gauge!(
        FULFILLMENT_USAGE_OLDEST_PENDING_HOUR_AGE_SECONDS,
        Unit::Seconds,
        "Age of the oldest unsettled usage hour"
    );
}

/// One usage event stored (or recognised as a repeat).
pub fn record_usage_ingested(status: crate::store::usage::Stored) {
    let status = match status {
        crate::store::usage::Stored::Counted => "counted",
        crate::store::usage::Stored::Late => "late",
        crate::store::usage::Stored::Repeat => "repeat",
    };
    metrics::counter!(FULFILLMENT_USAGE_EVENTS_TOTAL, "status" => status).increment(1);
}

pub fn record_usage_submitted(hours: usize) {
    metrics::counter!(FULFILLMENT_USAGE_HOURS_SUBMITTED_TOTAL).increment(hours as u64);
}

/// `outcome`: `accepted`, `duplicate`, `expired` or `rejected`.
pub fn record_usage_settled(outcome: &'static str) {
    metrics::counter!(FULFILLMENT_USAGE_HOURS_TOTAL, "outcome" => outcome).increment(1);
}

/// Hours that expired while open (never sent).
pub fn record_usage_expired(hours: u64) {
    if hours > 0 {
        metrics::counter!(FULFILLMENT_USAGE_HOURS_TOTAL, "outcome" => "expired").increment(hours);
    }
}

pub fn set_usage_pending(pending: i64, oldest: Duration) {
    metrics::gauge!(FULFILLMENT_USAGE_HOURS_PENDING).set(pending as f64);
    metrics::gauge!(FULFILLMENT_USAGE_OLDEST_PENDING_HOUR_AGE_SECONDS).set(oldest.as_secs_f64());
}

/// ACKs sent after Microsoft's 10-second window from the webhook's receipt (P7): their
/// operation was decided by Microsoft already (it auto-accepts). How late each ACK was is
/// [`FULFILLMENT_WEBHOOK_TO_ACK_SECONDS`].
pub const FULFILLMENT_ACKS_LATE_TOTAL: &str = "fulfillment_acks_late_total";

fn describe_effect_series() {
    metrics::describe_counter!(
        FULFILLMENT_ACKS_LATE_TOTAL,
        "ACKs sent after Microsoft's 10-second window from the webhook's receipt (P7)"
    );
}

/// An ACK left after the window (see [`FULFILLMENT_ACKS_LATE_TOTAL`]).
pub fn record_ack_late() {
    metrics::counter!(FULFILLMENT_ACKS_LATE_TOTAL).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_events_are_told_apart_by_reason() {
        use fulfillment_state_machine::{IgnoreReason, Outcome};
        let ignored = |reason| EventOutcome::of(&Outcome::Ignored { reason });
        assert_eq!(ignored(IgnoreReason::Stale), EventOutcome::Stale);
        assert_eq!(ignored(IgnoreReason::Duplicate), EventOutcome::Duplicate);
        assert_eq!(ignored(IgnoreReason::Terminal), EventOutcome::Ignored);
        assert_eq!(
            EventOutcome::of(&Outcome::Rejected { reason: "x".into() }),
            EventOutcome::Rejected
        );
    }
}
