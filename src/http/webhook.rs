//! `POST /webhook`: Microsoft's connection webhook (docs/marketplace.md §6).
//!
//! Order matters: the bearer token is verified before the body is even read; the body is
//! then parsed leniently (only `id`, `subscriptionId` and `action` are required, §6.2) into
//! a [`VerifiedWebhook`], the only thing this module publishes; and the answer is 200 only
//! once RabbitMQ confirmed the message (design guarantee 1). Any failure to queue is a 503
//! with `Retry-After`, so Microsoft redelivers; an unknown `action` is still a 200 (P9).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tracing::Instrument;
use uuid::Uuid;

use super::auth::AuthError;
use super::error::ApiError;
use super::metrics;
use super::state::AppState;
use crate::marketplace::WebhookEnvelope;
use crate::marketplace::types::parse_body;
use crate::queue::{InboundMessage, InboxKey, MessageMeta};

/// Proof that the caller passed webhook authentication (or that authentication is
/// explicitly off). Only [`authenticate`] makes one.
#[derive(Debug)]
pub struct AuthenticatedCaller {
    _private: (),
}

/// A webhook body that came from an authenticated caller and has the fields the workers
/// cannot do without. The payload is kept byte for byte (unknown fields included, P16).
#[derive(Debug)]
pub struct VerifiedWebhook {
    pub operation_id: Uuid,
    pub subscription_id: Uuid,
    pub action: String,
    pub activity_id: Option<Uuid>,
    payload: String,
}

impl VerifiedWebhook {
    /// Parses `body` with [`WebhookEnvelope::parse`], which accepts exactly what the
    /// worker's parser ([`WebhookPayload::parse`](crate::marketplace::WebhookPayload::parse))
    /// accepts: a GUID `id`, a GUID `subscriptionId` and a non-empty string `action`; every
    /// other field is optional and travels untouched.
    pub fn parse(_caller: AuthenticatedCaller, body: &[u8]) -> Result<Self, ApiError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::bad_request("the body is not UTF-8 text"))?;
        let envelope = WebhookEnvelope::parse(body).map_err(|e| {
            if e.is_syntax() || e.is_eof() {
                ApiError::bad_request(format!("the body is not valid JSON: {e}"))
            } else {
                ApiError::bad_request(format!("the body is not a Marketplace webhook: {e}"))
            }
        })?;
        // PostgreSQL stores no NUL in text or jsonb, so the worker could never record this
        // event (inbox key, event log) and would retry it into the dead-letter queue: refuse
        // it here, where the sender hears of it. JSON can only carry a NUL as the escape
        // `\u0000` (raw control characters are a syntax error), so only a body that holds
        // that text pays for the full check.
        if contains_nul_escape(body)
            && parse_body::<Value>(body)
                .ok()
                .flatten()
                .is_some_and(|value| holds_nul(&value))
        {
            return Err(ApiError::bad_request(
                "the body holds a NUL character (\\u0000), which cannot be stored",
            ));
        }
        Ok(Self {
            operation_id: envelope.id,
            subscription_id: envelope.subscription_id,
            action: envelope.action,
            activity_id: envelope.activity_id,
            payload: text.to_owned(),
        })
    }

    /// The body exactly as received.
    pub fn payload(&self) -> &str {
        &self.payload
    }

    /// The body exactly as received, for the message that carries it.
    pub fn into_payload(self) -> String {
        self.payload
    }
}

/// Whether `body` holds the text `\u0000` anywhere (an over-approximation: `\\u0000` counts).
fn contains_nul_escape(body: &[u8]) -> bool {
    body.windows(6).any(|w| w == b"\\u0000")
}

/// A NUL in any string or key of the document.
fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// Verifies the `Authorization` header. Missing or invalid tokens are a 401 naming the
/// reason; a refusal that comes from our side (a JWKS we cannot fetch, a key cache behind
/// a rotation, our clock, our audience list: [`AuthError::is_ours`]) is a 503, so
/// Microsoft retries and never reads it as a rejection of a change (§15.5).
pub async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<AuthenticatedCaller, ApiError> {
    let Some(verifier) = &state.verifier else {
        return Ok(AuthenticatedCaller { _private: () });
    };
    let header = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    let header = match (headers.get(AUTHORIZATION), header) {
        // Present but not visible ASCII: as good as no bearer token.
        (Some(_), None) => Some(""),
        (_, header) => header,
    };
    match verifier.verify(header).await {
        Ok(_claims) => Ok(AuthenticatedCaller { _private: () }),
        Err(error) => {
            metrics::record_jwt_rejection(error.reason());
            if error.is_ours() {
                tracing::error!(
                    reason = error.reason(),
                    fix = error.fix().unwrap_or_default(),
                    "a webhook token refused by our side, not the caller's; answering 503 so \
                     Microsoft redelivers"
                );
                return Err(ApiError::unavailable(format!(
                    "the token cannot be checked here right now ({}: {error}); retry later",
                    error.reason()
                )));
            }
            Err(unauthorized(error))
        }
    }
}

fn unauthorized(error: AuthError) -> ApiError {
    ApiError::Unauthorized {
        reason: error.reason(),
        message: error.to_string(),
    }
}

/// A body over our limit. The caller passed authentication (it is checked before the body
/// is read), so with webhook authentication on this is Microsoft, and the limit is our
/// configuration: 503 naming the setting, never a 4xx that Microsoft would read as a
/// rejection (§15.5). Without authentication anyone may call: 413.
fn too_large(state: &AppState, limit: usize) -> ApiError {
    if state.verifier.is_none() {
        return ApiError::PayloadTooLarge { limit };
    }
    tracing::error!(
        limit,
        "an authenticated webhook is larger than WEBHOOK_BODY_LIMIT_BYTES; answering 503 so \
         Microsoft redelivers once the limit is raised"
    );
    ApiError::unavailable(format!(
        "the body exceeds this service's limit of {limit} bytes \
         (WEBHOOK_BODY_LIMIT_BYTES); retry later"
    ))
}

/// `POST /webhook`.
pub async fn receive(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Value>, ApiError> {
    let caller = authenticate(&state, request.headers()).await?;
    let traceparent = traceparent_or_new(request.headers());
    let limit = state.config.body_limit_bytes;
    // `DefaultBodyLimit` on the route caps what this buffers.
    let body = Bytes::from_request(request, &state)
        .await
        .map_err(|rejection| {
            if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                too_large(&state, limit)
            } else {
                ApiError::bad_request(format!("cannot read the body: {rejection}"))
            }
        })?;
    let webhook = VerifiedWebhook::parse(caller, &body)?;
    // The body is a slice of the connection's read buffer, which hyper cannot reuse while
    // it is alive: held through the publish, every webhook in flight kept a second buffer.
    drop(body);
    let correlation_id = webhook.activity_id.unwrap_or_else(Uuid::new_v4);
    let span = tracing::info_span!(
        "webhook",
        operation_id = %webhook.operation_id,
        subscription_id = %webhook.subscription_id,
        action = %webhook.action,
        correlation_id = %correlation_id,
    );
    let meta = MessageMeta {
        // The key the worker's inbox will record (`worker::translate`): one constructor.
        message_id: InboxKey::webhook(webhook.operation_id, &webhook.action).into_message_id(),
        correlation_id: correlation_id.to_string(),
        traceparent: Some(traceparent),
        subscription_id: Some(webhook.subscription_id),
    };
    let operation_id = webhook.operation_id;
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: webhook.into_payload(),
    };
    match state
        .publish(&message, &meta)
        .instrument(span.clone())
        .await
    {
        Ok(()) => {
            tracing::info!(parent: &span, "webhook accepted and queued");
            Ok(Json(json!({
                "status": "accepted",
                "id": operation_id,
            })))
        }
        Err(error) => {
            tracing::warn!(parent: &span, error = %error, "webhook not queued; answering 503");
            Err(ApiError::unavailable(
                "the event could not be queued; it was not accepted, retry later",
            ))
        }
    }
}

/// The W3C `traceparent` for the message a request queues: the request span's (a child of
/// the caller's trace, see `request_span`); without an OpenTelemetry layer, the caller's
/// when well formed, else a new one (sampled).
pub fn traceparent_or_new(headers: &HeaderMap) -> String {
    if let Some(current) = crate::telemetry::current_traceparent() {
        return current;
    }
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| is_valid_traceparent(v))
        .map(str::to_owned)
        .unwrap_or_else(new_traceparent)
}

/// A fresh `00-{trace-id}-{parent-id}-01`.
pub fn new_traceparent() -> String {
    let trace_id = Uuid::new_v4().simple().to_string();
    let parent_id = Uuid::new_v4().simple().to_string();
    format!("00-{trace_id}-{}-01", &parent_id[..16])
}

/// `version-traceid-parentid-flags` per <https://www.w3.org/TR/trace-context/#traceparent-header>:
/// lower-case hex, no all-zero ids, version `ff` invalid.
pub fn is_valid_traceparent(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match parts.as_slice() {
        [version, trace, parent, flags, ..] => {
            hex(version, 2)
                && *version != "ff"
                && (*version != "00" || parts.len() == 4)
                && hex(trace, 32)
                && trace.bytes().any(|b| b != b'0')
                && hex(parent, 16)
                && parent.bytes().any(|b| b != b'0')
                && hex(flags, 2)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<VerifiedWebhook, ApiError> {
        VerifiedWebhook::parse(AuthenticatedCaller { _private: () }, body.as_bytes())
    }

    const ID: &str = "7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01";
    const SUB: &str = "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03";

    #[test]
    fn a_minimal_payload_with_unknown_fields_and_action_parses() {
        let body = format!(
            r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":"Teleport","future":{{"x":1}}}}"#
        );
        let webhook = parse(&body).unwrap();
        assert_eq!(webhook.operation_id.to_string(), ID);
        assert_eq!(webhook.action, "Teleport");
        assert_eq!(webhook.payload(), body);
        assert!(webhook.activity_id.is_none());
    }

    #[test]
    fn missing_or_invalid_required_fields_are_bad_requests() {
        let cases = [
            ("not json", "not valid JSON"),
            ("[1,2]", "not a Marketplace webhook"),
            (
                &format!(r#"{{"subscriptionId":"{SUB}","action":"Renew"}}"#),
                "missing field `id`",
            ),
            (
                &format!(r#"{{"id":"{ID}","action":"Renew"}}"#),
                "missing field `subscriptionId`",
            ),
            (
                &format!(r#"{{"id":"nope","subscriptionId":"{SUB}","action":"Renew"}}"#),
                "UUID",
            ),
            (
                &format!(r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":7}}"#),
                "invalid type",
            ),
            (
                &format!(r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":" "}}"#),
                "`action` is empty",
            ),
            (
                &format!(r#"{{"id":"{ID}","subscriptionId":"{SUB}"}}"#),
                "missing field `action`",
            ),
            (
                &format!(r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":"Renew\u0000"}}"#),
                "NUL character",
            ),
            (
                &format!(
                    r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":"Renew","x\u0000":1,}}"#
                ),
                "NUL character",
            ),
        ];
        for (body, expected) in cases {
            match parse(body) {
                Err(ApiError::BadRequest(message)) => {
                    assert!(message.contains(expected), "{body}: {message}")
                }
                other => panic!("{body}: {other:?}"),
            }
        }
    }

    #[test]
    fn traceparents_are_validated() {
        assert!(is_valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent(
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent("garbage"));
        assert!(is_valid_traceparent(&new_traceparent()));
    }
}
