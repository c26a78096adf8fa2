//! Fault injection: what `PUT /simulator/faults` sets, and the dice it rolls. The public API
//! can answer 5xx or 429 (with `Retry-After`), respond slowly, fail one kind of call with
//! a fixed status (`failCalls`), or carry a call out and lose its answer (`loseResponses`);
//! the webhook sender can deliver twice, out of order, and
//! invent actions nobody documented (§6.4, §13).

use std::collections::BTreeMap;
use std::time::Duration;

use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::state::Shared;

/// The fault settings; every share is a probability in `0.0..=1.0`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Faults {
    /// Reseeds the fault PRNG when set, for reproducible chaos runs.
    pub seed: Option<u64>,
    /// Share of public API calls answered 500.
    pub share5xx: f64,
    /// Share of public API calls answered 429 with `Retry-After`.
    pub share429: f64,
    /// The `Retry-After` of injected 429s, in seconds.
    pub retry_after_secs: u64,
    /// Added to every public API call.
    pub latency_ms: u64,
    /// Share of webhooks delivered twice.
    pub duplicate_deliveries: f64,
    /// `true` (a 500 ms window) or a window in milliseconds: each webhook waits a random part
    /// of it first, so close events arrive out of order.
    pub reorder: Reorder,
    /// Share of webhooks followed by one with an undocumented `action`.
    pub unknown_actions: f64,
    /// What the Entra stand-in's JWKS endpoint answers instead of every published key.
    pub jwks: JwksFault,
    /// Webhooks queued while this is set are lost on the way: none reaches the publisher,
    /// and each is logged as delivered (a 200 from something in between), so it is not
    /// redelivered.
    pub lose_webhooks: bool,
    /// Calls answered with a fixed status every time, by call name (see [`CALLS`]): e.g.
    /// `{"updateOperation": 400}` makes every ACK fail for good. Wins over the shares.
    pub fail_calls: BTreeMap<String, u16>,
    /// Calls carried out whose answer is then lost, by call name and how many times: e.g.
    /// `{"updateSubscription": 1}` performs the next PATCH (the operation starts) and
    /// answers 504 instead of its 202, as a gateway that timed out would (§15.2);
    /// `{"batchUsageEvent": 1}` records a metering batch and loses its answer. Counts
    /// down as answers are lost.
    pub lose_responses: BTreeMap<String, u32>,
}

/// The public API calls `failCalls` can name: `(name, method, route)`.
pub const CALLS: &[(&str, &str, &str)] = &[
    ("listSubscriptions", "GET", "/api/saas/subscriptions"),
    ("resolve", "POST", "/api/saas/subscriptions/resolve"),
    (
        "getSubscription",
        "GET",
        "/api/saas/subscriptions/{subscription_id}",
    ),
    (
        "updateSubscription",
        "PATCH",
        "/api/saas/subscriptions/{subscription_id}",
    ),
    (
        "deleteSubscription",
        "DELETE",
        "/api/saas/subscriptions/{subscription_id}",
    ),
    (
        "activate",
        "POST",
        "/api/saas/subscriptions/{subscription_id}/activate",
    ),
    (
        "listAvailablePlans",
        "GET",
        "/api/saas/subscriptions/{subscription_id}/listAvailablePlans",
    ),
    (
        "listOperations",
        "GET",
        "/api/saas/subscriptions/{subscription_id}/operations",
    ),
    (
        "getOperation",
        "GET",
        "/api/saas/subscriptions/{subscription_id}/operations/{operation_id}",
    ),
    (
        "updateOperation",
        "PATCH",
        "/api/saas/subscriptions/{subscription_id}/operations/{operation_id}",
    ),
    ("usageEvent", "POST", "/api/usageEvent"),
    ("batchUsageEvent", "POST", "/api/batchUsageEvent"),
    ("usageEvents", "GET", "/api/usageEvents"),
];

/// The `failCalls` name of a request, from its method and matched route.
pub(crate) fn call_name(method: &str, route: &str) -> Option<&'static str> {
    CALLS
        .iter()
        .find(|(_, m, r)| *m == method && *r == route)
        .map(|(name, _, _)| *name)
}

/// The `jwks` fault: how the JWKS endpoint misbehaves (key rotation and outages at Entra).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JwksFault {
    /// Every published key, as Entra does.
    #[default]
    Serve,
    /// Only the newest key: the older ones were withdrawn.
    NewestOnly,
    /// 500.
    Fail,
    /// 200 with an HTML page (a captive portal, a misrouted proxy).
    Garbage,
    /// 200 with a JSON document that holds no usable key.
    NoKeys,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reorder {
    Enabled(bool),
    WindowMs(u64),
}

impl Default for Reorder {
    fn default() -> Self {
        Self::Enabled(false)
    }
}

impl Reorder {
    pub fn window(self) -> Duration {
        match self {
            Self::Enabled(false) => Duration::ZERO,
            Self::Enabled(true) => Duration::from_millis(500),
            Self::WindowMs(ms) => Duration::from_millis(ms),
        }
    }
}

impl Faults {
    pub(crate) fn validate(&self) -> Result<(), ApiError> {
        for (name, share) in [
            ("share5xx", self.share5xx),
            ("share429", self.share429),
            ("duplicateDeliveries", self.duplicate_deliveries),
            ("unknownActions", self.unknown_actions),
        ] {
            if !(0.0..=1.0).contains(&share) {
                return Err(ApiError::bad_request(format!(
                    "{name} must lie between 0.0 and 1.0, got {share}"
                )));
            }
        }
        for call in self.lose_responses.keys() {
            if !CALLS.iter().any(|(name, _, _)| name == call) {
                let known: Vec<&str> = CALLS.iter().map(|(name, _, _)| *name).collect();
                return Err(ApiError::bad_request(format!(
                    "loseResponses names an unknown call {call:?}; known calls: {}",
                    known.join(", ")
                )));
            }
        }
        for (call, status) in &self.fail_calls {
            if !CALLS.iter().any(|(name, _, _)| name == call) {
                let known: Vec<&str> = CALLS.iter().map(|(name, _, _)| *name).collect();
                return Err(ApiError::bad_request(format!(
                    "failCalls names an unknown call {call:?}; known calls: {}",
                    known.join(", ")
                )));
            }
            if !(400..=599).contains(status) {
                return Err(ApiError::bad_request(format!(
                    "failCalls.{call} must be an HTTP error status (400..=599), got {status}"
                )));
            }
        }
        Ok(())
    }
}

/// What the fault layer decided for one public API call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ApiFault {
    ServerError,
    Throttled {
        retry_after_secs: u64,
    },
    /// `failCalls`: this status, every time.
    Fixed {
        call: &'static str,
        status: u16,
    },
}

impl Shared {
    /// True with probability `share`.
    pub fn roll(&self, share: f64) -> bool {
        share > 0.0 && self.rng().random::<f64>() < share
    }

    /// A random duration below `window`.
    pub fn jitter(&self, window: Duration) -> Duration {
        if window.is_zero() {
            return Duration::ZERO;
        }
        let millis = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(self.rng().random_range(0..millis.max(1)))
    }

    /// Whether the answer to this call, already carried out, is to be lost
    /// (`loseResponses`); counts the loss.
    pub fn lose_response(&self, call: Option<&'static str>) -> bool {
        let Some(call) = call else {
            return false;
        };
        self.mutate(|st| match st.faults.lose_responses.get_mut(call) {
            Some(left) if *left > 0 => {
                *left -= 1;
                true
            }
            _ => false,
        })
    }

    /// The latency to add and the failure to inject, if any, for one public API call
    /// (`call`: its `failCalls` name, when it has one).
    pub fn api_fault(&self, call: Option<&'static str>) -> (Duration, Option<ApiFault>) {
        let faults = self.read(|st| st.faults.clone());
        let latency = Duration::from_millis(faults.latency_ms);
        let fixed = call.and_then(|call| {
            faults
                .fail_calls
                .get(call)
                .map(|&status| ApiFault::Fixed { call, status })
        });
        let fault = if fixed.is_some() {
            fixed
        } else if self.roll(faults.share5xx) {
            Some(ApiFault::ServerError)
        } else if self.roll(faults.share429) {
            Some(ApiFault::Throttled {
                retry_after_secs: faults.retry_after_secs,
            })
        } else {
            None
        };
        (latency, fault)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reorder_accepts_a_flag_or_a_window() {
        let f: Faults = serde_json::from_str(r#"{"reorder": true}"#).unwrap();
        assert_eq!(f.reorder.window(), Duration::from_millis(500));
        let f: Faults = serde_json::from_str(r#"{"reorder": 1200, "share5xx": 0.5}"#).unwrap();
        assert_eq!(f.reorder.window(), Duration::from_millis(1200));
        assert_eq!(f.share5xx, 0.5);
        assert!(serde_json::from_str::<Faults>(r#"{"share5XX": 1}"#).is_err());
    }

    #[test]
    fn fail_calls_name_known_calls_and_error_statuses() {
        let f: Faults = serde_json::from_str(r#"{"failCalls": {"updateOperation": 400}}"#).unwrap();
        assert!(f.validate().is_ok());
        assert_eq!(f.fail_calls["updateOperation"], 400);
        let f: Faults = serde_json::from_str(r#"{"failCalls": {"patchThing": 400}}"#).unwrap();
        let err = f.validate().unwrap_err();
        assert!(err.message.contains("getSubscription"), "{}", err.message);
        let f: Faults = serde_json::from_str(r#"{"failCalls": {"activate": 200}}"#).unwrap();
        assert!(f.validate().is_err());
    }

    #[test]
    fn a_call_is_named_by_its_method_and_route() {
        assert_eq!(
            call_name("GET", "/api/saas/subscriptions/{subscription_id}"),
            Some("getSubscription")
        );
        assert_eq!(
            call_name(
                "PATCH",
                "/api/saas/subscriptions/{subscription_id}/operations/{operation_id}"
            ),
            Some("updateOperation")
        );
        assert_eq!(call_name("PUT", "/api/saas/subscriptions"), None);
    }

    #[test]
    fn lose_responses_name_known_calls() {
        let f: Faults =
            serde_json::from_str(r#"{"loseResponses": {"updateSubscription": 1}}"#).unwrap();
        assert!(f.validate().is_ok());
        assert_eq!(f.lose_responses["updateSubscription"], 1);
        // A metering batch recorded whose answer is lost: the repeat must come back Duplicate.
        let f: Faults =
            serde_json::from_str(r#"{"loseResponses": {"batchUsageEvent": 2}}"#).unwrap();
        assert!(f.validate().is_ok());
        let f: Faults = serde_json::from_str(r#"{"loseResponses": {"patch": 1}}"#).unwrap();
        assert!(f.validate().is_err());
    }

    #[test]
    fn shares_outside_zero_to_one_are_rejected() {
        let f = Faults {
            share429: 1.5,
            ..Faults::default()
        };
        assert!(f.validate().is_err());
        assert!(Faults::default().validate().is_ok());
    }
}
