//! A signed delivery of one event to one of the ISV's webhook endpoints, sans-IO (style
//! principle 20): the delivery runner (`worker::deliveries`) sends what [`step`] says and
//! hands the answer back; every answer class is a row of `tests/delivery_protocol.rs`.
//!
//! | endpoint / answer | next |
//! |---|---|
//! | deleted | finish without sending |
//! | disabled | give up (replayable once the endpoint is enabled again) |
//! | not sent yet | send |
//! | 2xx | delivered |
//! | 410 Gone | disable the endpoint; the delivery gives up |
//! | any other status, timeout, connection failure | retry on the schedule (Svix's: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h), waiting at least `Retry-After` |
//! | failing, and the endpoint has failed for `disable_after` (5 days) | disable the endpoint with an alert |
//! | failing after the last retry of the schedule | give up (the row is dead, replayable) |
//!
//! Order: delivery rows of one (endpoint, subscription) share an outbox lane ([`lane`]), so
//! they leave in event order and a failing endpoint holds back only its own lane — never
//! another endpoint, nor any effect towards Microsoft.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// The outbox `kind` of a delivery.
pub const KIND: &str = "deliver_webhook";

/// The effect stored in a `deliver_webhook` outbox row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub endpoint_id: Uuid,
    /// The CloudEvents id: the `webhook-id` header and the row of `webhook_events`.
    pub event_id: String,
    pub subscription_id: Uuid,
    pub topic: String,
}

/// The outbox lane of an endpoint's deliveries for one subscription (the row's
/// `subscription_id` column): rows of a lane run one at a time in order; lanes never wait
/// for each other or for the subscription's own effects.
pub fn lane(endpoint_id: Uuid, subscription_id: Uuid) -> Uuid {
    // Both are random (v4/v7) ids; their XOR is as unlikely to meet a real subscription id
    // as any random id, and is the same for every delivery of the pair.
    Uuid::from_u128(endpoint_id.as_u128() ^ subscription_id.as_u128() ^ LANE_SALT)
}

const LANE_SALT: u128 = 0x7765_6268_6f6f_6b5f_6c61_6e65_0000_0001;

/// The clocks of deliveries. Tests shrink them to milliseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryConfig {
    /// Delay before each retry; its length bounds the attempts (one more than retries).
    pub schedule: Vec<Duration>,
    /// An endpoint failing for this long (no success in between) is disabled.
    pub disable_after: Duration,
    /// How long one attempt may take.
    pub timeout: Duration,
    /// Deliveries in flight at once (their own budget: never the effects').
    pub concurrency: usize,
    /// Poll of the outbox for due deliveries between wake-ups.
    pub poll_interval: Duration,
}

/// Svix's schedule (docs.svix.com "Retries").
pub const DEFAULT_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            schedule: DEFAULT_SCHEDULE.to_vec(),
            disable_after: Duration::from_secs(5 * 24 * 3600),
            timeout: Duration::from_secs(15),
            concurrency: 8,
            poll_interval: Duration::from_millis(500),
        }
    }
}

impl DeliveryConfig {
    /// Millisecond clocks for tests.
    pub fn fast() -> Self {
        Self {
            schedule: vec![Duration::from_millis(50); 7],
            disable_after: Duration::from_secs(5 * 24 * 3600),
            timeout: Duration::from_millis(500),
            concurrency: 8,
            poll_interval: Duration::from_millis(50),
        }
    }
}

/// The endpoint as the step sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointState {
    Enabled {
        /// The first failure since the last success.
        failing_since: Option<OffsetDateTime>,
    },
    Disabled,
    Deleted,
}

/// What the endpoint answered, in the classes the step branches on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryAnswer {
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within the timeout.
    Timeout,
    /// No connection, TLS failure, a reset.
    Unreachable { detail: String },
}

impl DeliveryAnswer {
    pub fn describe(&self) -> String {
        match self {
            DeliveryAnswer::Status { status, .. } => format!("HTTP {status}"),
            DeliveryAnswer::Timeout => "no answer in time".to_owned(),
            DeliveryAnswer::Unreachable { detail } => format!("unreachable: {detail}"),
        }
    }
}

/// One turn of a delivery.
#[derive(Debug, Clone)]
pub struct DeliveryTurn<'a> {
    pub endpoint: EndpointState,
    /// The answer to this execution's send, once sent.
    pub answer: Option<&'a DeliveryAnswer>,
    /// Failed attempts before this execution.
    pub failed_attempts: u32,
    pub now: OffsetDateTime,
    pub config: &'a DeliveryConfig,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryStep {
    Send,
    /// The endpoint is gone: nothing to deliver (the row is done).
    Drop,
    Delivered,
    RetryAt {
        at: OffsetDateTime,
        because: String,
    },
    /// The row is dead with the reason (an operator or the ISV replays it).
    GiveUp {
        because: String,
    },
    /// Disable the endpoint and give up on this delivery; `alert`: tell the operators.
    DisableEndpoint {
        because: String,
        alert: bool,
    },
}

/// The next step of a delivery.
pub fn step(turn: &DeliveryTurn<'_>) -> DeliveryStep {
    let failing_since = match turn.endpoint {
        EndpointState::Deleted => return DeliveryStep::Drop,
        EndpointState::Disabled => {
            return DeliveryStep::GiveUp {
                because: "the endpoint is disabled".to_owned(),
            };
        }
        EndpointState::Enabled { failing_since } => failing_since,
    };
    let answer = match turn.answer {
        None => return DeliveryStep::Send,
        Some(answer) => answer,
    };
    let retry_after = match answer {
        DeliveryAnswer::Status { status, .. } if (200..300).contains(status) => {
            return DeliveryStep::Delivered;
        }
        DeliveryAnswer::Status { status: 410, .. } => {
            return DeliveryStep::DisableEndpoint {
                because: "the endpoint answered 410 Gone".to_owned(),
                alert: false,
            };
        }
        DeliveryAnswer::Status { retry_after, .. } => *retry_after,
        DeliveryAnswer::Timeout | DeliveryAnswer::Unreachable { .. } => None,
    };
    let because = answer.describe();
    let failing_for = failing_since.map_or(Duration::ZERO, |since| {
        Duration::try_from(turn.now - since).unwrap_or_default()
    });
    if failing_for >= turn.config.disable_after {
        return DeliveryStep::DisableEndpoint {
            because: format!(
                "the endpoint has failed for {} h ({because})",
                failing_for.as_secs() / 3600
            ),
            alert: true,
        };
    }
    let Some(delay) = usize::try_from(turn.failed_attempts)
        .ok()
        .and_then(|n| turn.config.schedule.get(n))
    else {
        return DeliveryStep::GiveUp {
            because: format!(
                "gave up after {} attempts: {because}",
                turn.failed_attempts + 1
            ),
        };
    };
    // Retry-After is honoured (waited at least), but never past the schedule's longest wait.
    let longest = turn.config.schedule.iter().max().copied().unwrap_or(*delay);
    let delay = retry_after.map_or(*delay, |asked| asked.min(longest).max(*delay));
    DeliveryStep::RetryAt {
        at: turn.now + delay,
        because,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_are_per_endpoint_and_subscription() {
        let (e1, e2, s1, s2) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        assert_eq!(lane(e1, s1), lane(e1, s1));
        assert_ne!(lane(e1, s1), lane(e2, s1));
        assert_ne!(lane(e1, s1), lane(e1, s2));
        assert_ne!(lane(e1, s1), s1);
    }

    #[test]
    fn the_default_schedule_is_svix_s() {
        let total: Duration = DeliveryConfig::default().schedule.iter().sum();
        assert_eq!(
            total.as_secs(),
            5 + 300 + 1800 + 7200 + 18000 + 36000 + 36000
        );
    }
}
