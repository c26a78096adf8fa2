//! Errors of Marketplace calls, classified the way callers branch on them
//! (docs/marketplace.md §8.2): retry now, retry later, fix configuration, give up.

use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, RETRY_AFTER};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc2822;
use uuid::Uuid;

/// Microsoft's error bodies are kept up to this many bytes.
pub const MAX_ERROR_BODY: usize = 4096;

/// Which call a response or failure belongs to; the names are stable (logs, event log).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Call {
    /// The Entra client-credentials token request.
    EntraToken,
    Resolve,
    Activate,
    GetSubscription,
    ListSubscriptions,
    ListAvailablePlans,
    ChangePlan,
    ChangeQuantity,
    DeleteSubscription,
    ListOperations,
    GetOperation,
    UpdateOperation,
    PostUsageEvent,
    PostBatchUsageEvents,
    GetUsageEvents,
}

impl Call {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EntraToken => "entra_token",
            Self::Resolve => "resolve",
            Self::Activate => "activate",
            Self::GetSubscription => "get_subscription",
            Self::ListSubscriptions => "list_subscriptions",
            Self::ListAvailablePlans => "list_available_plans",
            Self::ChangePlan => "change_plan",
            Self::ChangeQuantity => "change_quantity",
            Self::DeleteSubscription => "delete_subscription",
            Self::ListOperations => "list_operations",
            Self::GetOperation => "get_operation",
            Self::UpdateOperation => "update_operation",
            Self::PostUsageEvent => "post_usage_event",
            Self::PostBatchUsageEvents => "post_batch_usage_events",
            Self::GetUsageEvents => "get_usage_events",
        }
    }

    /// Whether repeating the call after an unknown outcome (5xx, timeout) is harmless.
    /// PATCH and DELETE subscription are not: a lost 202 may already have created an
    /// operation, and the repeat then fails with 400 "same plan"/"locked" or 409 (§8.2).
    pub fn is_idempotent(self) -> bool {
        !matches!(
            self,
            Self::ChangePlan | Self::ChangeQuantity | Self::DeleteSubscription
        )
    }
}

impl serde::Serialize for Call {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What went wrong on the wire, for logs and the event log.
pub struct Failure {
    pub call: Call,
    /// HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// Microsoft's raw body (truncated to [`MAX_ERROR_BODY`]); never required to be JSON.
    pub body: Option<String>,
    /// Our one-line description ("HTTP 500", "timed out", ...).
    pub detail: String,
    /// The `x-ms-requestid` we sent on the last attempt (none for the token request).
    pub request_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    /// The `x-ms-requestid` Microsoft answered with, if any.
    pub response_request_id: Option<String>,
    /// How many attempts were made in total (set when the call gives up).
    pub attempts: u32,
    pub(crate) source: Option<Box<dyn StdError + Send + Sync>>,
}

impl Failure {
    pub(crate) fn new(call: Call, detail: impl Into<String>) -> Self {
        Self {
            call,
            status: None,
            body: None,
            detail: detail.into(),
            request_id: None,
            correlation_id: None,
            response_request_id: None,
            attempts: 1,
            source: None,
        }
    }

    pub(crate) fn with_status(mut self, status: u16, body: &[u8]) -> Self {
        self.status = Some(status);
        self.body = (!body.is_empty()).then(|| truncate_body(body));
        self
    }

    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Failure")
            .field("call", &self.call)
            .field("status", &self.status)
            .field("detail", &self.detail)
            .field("body", &self.body)
            .field("request_id", &self.request_id)
            .field("correlation_id", &self.correlation_id)
            .field("response_request_id", &self.response_request_id)
            .field("attempts", &self.attempts)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.call, self.detail)?;
        if let Some(body) = self.body.as_deref().filter(|b| !b.trim().is_empty()) {
            let snippet: String = body.chars().take(300).collect();
            write!(f, ": {}", snippet.trim())?;
            if snippet.len() < body.len() {
                f.write_str("…")?;
            }
        }
        if let Some(id) = self.request_id {
            write!(f, " (x-ms-requestid {id}")?;
            if let Some(corr) = self.correlation_id {
                write!(f, ", x-ms-correlationid {corr}")?;
            }
            f.write_str(")")?;
        }
        if self.attempts > 1 {
            write!(f, " after {} attempts", self.attempts)?;
        }
        Ok(())
    }
}

/// Why a transient failure happened; decides whether a non-idempotent call may repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransientCause {
    /// 5xx or 408: Microsoft may or may not have processed the request.
    Status,
    /// No response in time: the request may have been processed.
    Timeout,
    /// No connection was made (refused, DNS, TLS): the request was never processed.
    Connect,
    /// The connection broke while sending or reading.
    Network,
}

/// A failed Marketplace call, classified per the retry matrix (§8.2).
#[derive(Debug)]
pub enum Error {
    /// 5xx, 408, timeouts, connection failures: retry with backoff.
    Transient {
        cause: TransientCause,
        failure: Box<Failure>,
    },
    /// 429 (or 503 with `Retry-After`): retry after `retry_after` when given.
    Throttled {
        retry_after: Option<Duration>,
        failure: Box<Failure>,
    },
    /// 401/403 from the API (bad token or a subscription of another publisher's app, P2),
    /// or an Entra rejection of our credentials (`invalid_client` ...): a configuration
    /// problem, never retried.
    Unauthorized { failure: Box<Failure> },
    /// 404, and the 400 the real API answers for unknown operation ids (P19).
    NotFound { failure: Box<Failure> },
    /// 409: the subscription is locked by a pending operation, or the operation is final.
    Conflict { failure: Box<Failure> },
    /// Other 4xx, unreadable success bodies, protocol surprises: do not retry.
    Permanent { failure: Box<Failure> },
    /// Missing or invalid settings, detected before any request.
    Configuration { message: String },
    /// An argument this client refuses before sending (e.g. more than 25 usage events).
    InvalidInput { message: String },
}

impl Error {
    /// Transient and throttled failures; everything else will fail the same way again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient { .. } | Self::Throttled { .. })
    }

    /// Retryable *and* certain that Microsoft never acted on the request: a 429, a
    /// connection that was never made, or a failed token request. Only these may repeat a
    /// non-idempotent call (PATCH/DELETE subscription).
    pub fn request_was_not_processed(&self) -> bool {
        match self {
            _ if self.failure().is_some_and(|f| f.call == Call::EntraToken) => self.is_retryable(),
            Self::Throttled { failure, .. } => failure.status == Some(429),
            Self::Transient { cause, .. } => *cause == TransientCause::Connect,
            _ => false,
        }
    }

    /// The delay Microsoft asked for (`Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The wire details, absent for local errors.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Self::Transient { failure, .. }
            | Self::Throttled { failure, .. }
            | Self::Unauthorized { failure }
            | Self::NotFound { failure }
            | Self::Conflict { failure }
            | Self::Permanent { failure } => Some(failure),
            Self::Configuration { .. } | Self::InvalidInput { .. } => None,
        }
    }

    pub(crate) fn failure_mut(&mut self) -> Option<&mut Failure> {
        match self {
            Self::Transient { failure, .. }
            | Self::Throttled { failure, .. }
            | Self::Unauthorized { failure }
            | Self::NotFound { failure }
            | Self::Conflict { failure }
            | Self::Permanent { failure } => Some(failure),
            Self::Configuration { .. } | Self::InvalidInput { .. } => None,
        }
    }

    /// The HTTP status, when a response arrived.
    pub fn status(&self) -> Option<u16> {
        self.failure().and_then(|f| f.status)
    }

    /// Microsoft's raw (truncated) error body.
    pub fn body(&self) -> Option<&str> {
        self.failure().and_then(|f| f.body.as_deref())
    }

    /// The `x-ms-requestid` of the last attempt.
    pub fn request_id(&self) -> Option<Uuid> {
        self.failure().and_then(|f| f.request_id)
    }

    /// A stable lower-case name of the class, for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Transient { .. } => "transient",
            Self::Throttled { .. } => "throttled",
            Self::Unauthorized { .. } => "unauthorized",
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::Permanent { .. } => "permanent",
            Self::Configuration { .. } => "configuration",
            Self::InvalidInput { .. } => "invalid_input",
        }
    }

    pub(crate) fn permanent(failure: Failure) -> Self {
        Self::Permanent {
            failure: Box::new(failure),
        }
    }

    /// Classifies a non-success HTTP status of the Fulfillment/Metering API.
    pub(crate) fn from_status(status: u16, headers: &HeaderMap, failure: Failure) -> Self {
        let failure = Box::new(failure);
        let retry_after = retry_after(headers, OffsetDateTime::now_utc());
        match status {
            429 => Self::Throttled {
                retry_after,
                failure,
            },
            503 if retry_after.is_some() => Self::Throttled {
                retry_after,
                failure,
            },
            408 | 500..=599 => Self::Transient {
                cause: TransientCause::Status,
                failure,
            },
            401 | 403 => Self::Unauthorized { failure },
            404 => Self::NotFound { failure },
            409 => Self::Conflict { failure },
            _ => Self::Permanent { failure },
        }
    }

    /// Classifies a transport error (no complete response).
    pub(crate) fn from_transport(error: reqwest::Error, failure: Failure) -> Self {
        let cause = if error.is_connect() {
            TransientCause::Connect
        } else if error.is_timeout() {
            TransientCause::Timeout
        } else if error.is_builder() {
            return Self::permanent(failure.with_source(error));
        } else {
            TransientCause::Network
        };
        let detail = match cause {
            TransientCause::Connect => "could not connect",
            TransientCause::Timeout => "timed out",
            _ => "connection failed",
        };
        Self::Transient {
            cause,
            failure: Box::new(Failure {
                detail: format!("{}: {detail}", failure.detail),
                ..failure.with_source(error)
            }),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Transient { failure, .. } => {
                write!(f, "transient Marketplace failure: {failure}")
            }
            Self::Throttled {
                failure,
                retry_after,
            } => {
                write!(f, "Marketplace throttled the call: {failure}")?;
                if let Some(delay) = retry_after {
                    write!(f, " (Retry-After {}s)", delay.as_secs_f64())?;
                }
                Ok(())
            }
            Self::Unauthorized { failure } => write!(
                f,
                "Marketplace refused our credentials (check the Entra tenant/app registered in \
                 Partner Center): {failure}"
            ),
            Self::NotFound { failure } => write!(f, "not found at the Marketplace: {failure}"),
            Self::Conflict { failure } => write!(f, "Marketplace conflict: {failure}"),
            Self::Permanent { failure } => write!(f, "Marketplace call failed: {failure}"),
            Self::Configuration { message } => {
                write!(f, "Marketplace client misconfigured: {message}")
            }
            Self::InvalidInput { message } => write!(f, "invalid Marketplace request: {message}"),
        }
    }
}

impl StdError for Error {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.failure()
            .and_then(|f| f.source.as_deref())
            .map(|s| s as &(dyn StdError + 'static))
    }
}

/// `Retry-After` as delta-seconds or an HTTP date (RFC 9110 §10.2.3).
pub(crate) fn retry_after(headers: &HeaderMap, now: OffsetDateTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Ok(secs) = value.parse::<f64>() {
        return Duration::try_from_secs_f64(secs).ok();
    }
    // IMF-fixdate ("Sun, 06 Nov 1994 08:49:37 GMT") is a valid RFC 2822 date.
    let at = OffsetDateTime::parse(value, &Rfc2822).ok()?;
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

pub(crate) fn truncate_body(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    if text.len() <= MAX_ERROR_BODY {
        return text.into_owned();
    }
    let mut end = MAX_ERROR_BODY;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn classify(status: u16, retry_after: Option<&str>) -> Error {
        let mut headers = HeaderMap::new();
        if let Some(v) = retry_after {
            headers.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        }
        Error::from_status(
            status,
            &headers,
            Failure::new(Call::GetSubscription, format!("HTTP {status}"))
                .with_status(status, b"{}"),
        )
    }

    #[test]
    fn every_status_of_the_retry_matrix_is_classified() {
        let cases: &[(u16, Option<&str>, &str, bool)] = &[
            (400, None, "permanent", false),
            (401, None, "unauthorized", false),
            (403, None, "unauthorized", false),
            (404, None, "not_found", false),
            (405, None, "permanent", false),
            (408, None, "transient", true),
            (409, None, "conflict", false),
            (413, None, "permanent", false),
            (422, None, "permanent", false),
            (429, None, "throttled", true),
            (429, Some("3"), "throttled", true),
            (500, None, "transient", true),
            (502, None, "transient", true),
            (503, None, "transient", true),
            (503, Some("2"), "throttled", true),
            (504, None, "transient", true),
            (302, None, "permanent", false),
        ];
        for (status, ra, kind, retryable) in cases {
            let e = classify(*status, *ra);
            assert_eq!(e.kind(), *kind, "{status} {ra:?}");
            assert_eq!(e.is_retryable(), *retryable, "{status}");
            assert_eq!(e.status(), Some(*status));
        }
        assert_eq!(
            classify(429, Some("3")).retry_after(),
            Some(Duration::from_secs(3))
        );
        assert_eq!(classify(429, None).retry_after(), None);
    }

    #[test]
    fn only_unprocessed_requests_may_repeat_a_non_idempotent_call() {
        assert!(classify(429, None).request_was_not_processed());
        assert!(!classify(503, Some("1")).request_was_not_processed());
        assert!(!classify(500, None).request_was_not_processed());
        assert!(!classify(400, None).request_was_not_processed());
        let connect = Error::Transient {
            cause: TransientCause::Connect,
            failure: Box::new(Failure::new(Call::ChangePlan, "x")),
        };
        assert!(connect.request_was_not_processed());
        let timeout = Error::Transient {
            cause: TransientCause::Timeout,
            failure: Box::new(Failure::new(Call::ChangePlan, "x")),
        };
        assert!(!timeout.request_was_not_processed());
        let token = Error::Transient {
            cause: TransientCause::Status,
            failure: Box::new(Failure::new(Call::EntraToken, "HTTP 503")),
        };
        assert!(token.request_was_not_processed());
        assert!(!Call::ChangePlan.is_idempotent());
        assert!(!Call::DeleteSubscription.is_idempotent());
        assert!(Call::Activate.is_idempotent());
        assert!(Call::PostUsageEvent.is_idempotent());
    }

    #[test]
    fn retry_after_accepts_seconds_and_http_dates() {
        let now = OffsetDateTime::parse("Sun, 06 Nov 1994 08:49:37 GMT", &Rfc2822).unwrap();
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            h
        };
        assert_eq!(retry_after(&header("0"), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(&header(" 120 "), now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(
            retry_after(&header("1.5"), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(&header("Sun, 06 Nov 1994 08:50:07 GMT"), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(&header("Sun, 06 Nov 1994 08:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&header("soon"), now), None);
        assert_eq!(retry_after(&header("-5"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn bodies_are_truncated_on_a_char_boundary() {
        let long = "é".repeat(MAX_ERROR_BODY);
        let t = truncate_body(long.as_bytes());
        assert!(t.len() <= MAX_ERROR_BODY + '…'.len_utf8());
        assert!(t.ends_with('…'));
        assert_eq!(truncate_body(b"short"), "short");
    }

    #[test]
    fn display_names_the_call_status_body_and_request_id() {
        let mut failure = Failure::new(Call::Activate, "HTTP 400").with_status(
            400,
            br#"{"code":"BadArgument","message":"Subscription is Suspended"}"#,
        );
        failure.request_id = Some(Uuid::nil());
        failure.attempts = 1;
        let e = Error::permanent(failure);
        let text = e.to_string();
        assert!(text.contains("activate: HTTP 400"), "{text}");
        assert!(text.contains("Subscription is Suspended"), "{text}");
        assert!(
            text.contains("00000000-0000-0000-0000-000000000000"),
            "{text}"
        );
    }
}
