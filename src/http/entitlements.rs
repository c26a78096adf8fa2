//! The entitlement API under `/api/v1`: the ISV's product asks what a customer may use and
//! asks for changes. Reads come from PostgreSQL (the worker's projections); commands go
//! through the inbound queue and the state machine like Microsoft's events, so one
//! subscription still sees one decision at a time. Every call needs
//! `Authorization: Bearer <ENTITLEMENT_API_KEY>`.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fulfillment_state_machine::{OfferId, Outcome, Party, PlanId, Quantity, StateName};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tracing::Instrument;
use uuid::Uuid;

use super::error::ApiError;
use super::state::{AppState, digest_bytes};
use super::webhook::traceparent_or_new;
use crate::queue::{InboundMessage, InboxKey, MessageMeta, PublisherCommand};
use crate::settings::ApiScope;
use crate::store::subscriptions::{self, MAX_PAGE_SIZE, SubscriptionFilter, SubscriptionRecord};

/// Page size when `limit` is absent.
pub const DEFAULT_PAGE_SIZE: u32 = 50;

/// Middleware: refuses every call without a configured bearer key (compared in constant
/// time, on SHA-256 digests so the key's length does not leak either, and against every
/// key whatever matched first), and every call but a read with a read-only key.
pub async fn require_api_key(
    axum::extract::State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let config = &state.config;
    if config.api_key_digest.is_none() && config.scoped_key_digests.is_empty() {
        return Err(ApiError::Unauthorized {
            reason: "not_configured",
            message: "the entitlement API key is not configured on this server (set \
                      ENTITLEMENT_API_KEY or ENTITLEMENT_API_KEYS); every call is refused \
                      until one is"
                .into(),
        });
    }
    let presented = bearer(request.headers()).ok_or_else(|| ApiError::Unauthorized {
        reason: "missing",
        message: "send the entitlement API key as `Authorization: Bearer <key>`".into(),
    })?;
    let keys = config
        .api_key_digest
        .iter()
        .map(|digest| (*digest, ApiScope::Write))
        .chain(config.scoped_key_digests.iter().copied());
    let mut granted: Option<ApiScope> = None;
    for (expected, scope) in keys {
        if bool::from(digest_bytes(presented.as_bytes()).ct_eq(&expected)) {
            granted = Some(match granted {
                Some(ApiScope::Write) => ApiScope::Write,
                _ => scope,
            });
        }
    }
    let Some(scope) = granted else {
        return Err(ApiError::Unauthorized {
            reason: "invalid",
            message: "the entitlement API key is not valid".into(),
        });
    };
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if scope == ApiScope::Read && !reads {
        return Err(ApiError::Forbidden {
            reason: "read_only_key",
            message: "this API key is read-only; a read-write key is needed for this call".into(),
        });
    }
    Ok(next.run(request).await)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, key) = value.split_once(' ')?;
    let key = key.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !key.is_empty()).then_some(key)
}

/// The `{id}` segment. axum's own rejection (e.g. percent-decoding to invalid UTF-8) is
/// plain text; callers of this API get JSON errors only.
fn path_id(path: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    path.map(|Path(id)| id)
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))
}

/// The request body, with axum's plain-text rejections (over the size limit, a broken
/// stream) turned into JSON errors.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: super::API_BODY_LIMIT,
            }
        } else {
            ApiError::bad_request(format!("cannot read the body: {}", rejection.body_text()))
        }
    })
}

fn parse_subscription_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw.trim()).map_err(|_| {
        ApiError::bad_request(format!("the subscription id must be a GUID, got {raw:?}"))
    })
}

fn timestamp(at: OffsetDateTime) -> Value {
    at.format(&Rfc3339)
        .map(Value::String)
        .unwrap_or(Value::Null)
}

/// The JSON view of one subscription. `term.termUnit` is as Microsoft sent it (`PAY`,
/// `P18M`, …); `term.length` reads it as an ISO-8601 duration, `null` where it is none.
pub fn subscription_view(record: &SubscriptionRecord) -> Value {
    let term = record.term().map(|term| {
        json!({
            "termUnit": term.unit,
            "length": term.length().map(|l| json!({ "months": l.months, "days": l.days })),
            "chargeDuration": term.charge_duration,
            "startDate": term.start.map(timestamp),
            "endDate": term.end.map(timestamp),
        })
    });
    json!({
        "id": record.id,
        "state": record.state,
        "offerId": record.offer_id,
        "planId": record.plan_id,
        "quantity": record.quantity,
        "term": term,
        "beneficiaryTenantId": record.beneficiary_tenant_id,
        "purchaserTenantId": record.purchaser_tenant_id,
        "beneficiary": party_view(record.beneficiary.as_ref()),
        "purchaser": party_view(record.purchaser.as_ref()),
        "privateOfferId": record.private_offer_id,
        "allowedCustomerOperations": record.allowed_customer_operations,
        "createdAt": timestamp(record.created_at),
        "updatedAt": timestamp(record.updated_at),
        "version": record.version,
    })
}

/// A stored `Party` in this API's camelCase; `null` when unknown or unreadable.
fn party_view(stored: Option<&Value>) -> Value {
    stored
        .and_then(|v| serde_json::from_value::<Party>(v.clone()).ok())
        .map_or(Value::Null, |party| {
            json!({
                "tenantId": party.tenant_id.map(|t| t.as_uuid()),
                "objectId": party.object_id,
                "emailId": party.email,
            })
        })
}

/// `GET /api/v1/subscriptions/{id}`.
pub async fn get_subscription(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_subscription_id(&path_id(path)?)?;
    let record = subscriptions::find(&state.pool, id)
        .await
        .map_err(|e| database_error(e, "read the subscription"))?
        .ok_or_else(|| ApiError::not_found(format!("subscription {id} is not known here")))?;
    Ok(Json(subscription_view(&record)))
}

/// Query of `GET /api/v1/subscriptions`; parsed by hand for precise messages.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    state: Option<String>,
    beneficiary_tenant_id: Option<String>,
    offer_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

impl ListQuery {
    fn into_filter(self) -> Result<SubscriptionFilter, ApiError> {
        let non_empty =
            |v: Option<String>| v.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty());
        let state = match non_empty(self.state) {
            None => None,
            Some(raw) => Some(raw.parse::<StateName>().map_err(|_| {
                ApiError::bad_request(format!(
                    "`state` must be one of PendingFulfillment, Subscribed, Suspended, \
                     Unsubscribed; got {raw:?}"
                ))
            })?),
        };
        let beneficiary_tenant_id = match non_empty(self.beneficiary_tenant_id) {
            None => None,
            Some(raw) => Some(Uuid::parse_str(&raw).map_err(|_| {
                ApiError::bad_request(format!("`beneficiaryTenantId` must be a GUID, got {raw:?}"))
            })?),
        };
        let limit = match non_empty(self.limit) {
            None => DEFAULT_PAGE_SIZE,
            Some(raw) => match raw.parse::<u32>() {
                Ok(n) if (1..=MAX_PAGE_SIZE).contains(&n) => n,
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "`limit` must be an integer from 1 to {MAX_PAGE_SIZE}, got {raw:?}"
                    )));
                }
            },
        };
        // An empty `cursor=` is refused like any other value that is not a `nextCursor`
        // (the OpenAPI document says a UUID); omit the parameter for the first page.
        let after = match self.cursor.map(|s| s.trim().to_owned()) {
            None => None,
            Some(raw) => Some(Uuid::parse_str(&raw).map_err(|_| {
                ApiError::bad_request(format!(
                    "`cursor` must be the `nextCursor` of a previous page, got {raw:?}"
                ))
            })?),
        };
        let offer_id = match non_empty(self.offer_id) {
            None => None,
            // The same rules as stored offer ids (no NUL, which PostgreSQL refuses: a 500).
            Some(raw) => Some(
                OfferId::parse(&raw)
                    .map_err(|e| ApiError::bad_request(format!("`offerId` is invalid: {e}")))?
                    .as_str()
                    .to_owned(),
            ),
        };
        Ok(SubscriptionFilter {
            state,
            beneficiary_tenant_id,
            offer_id,
            after,
            limit,
        })
    }
}

/// `GET /api/v1/subscriptions?state=&beneficiaryTenantId=&offerId=&limit=&cursor=`: keyset
/// pages in id order; `nextCursor` is null on the last page.
pub async fn list_subscriptions(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let filter = query.into_filter()?;
    let page_size = filter.limit as usize;
    let mut rows = subscriptions::list(
        &state.pool,
        &SubscriptionFilter {
            limit: filter.limit + 1,
            ..filter
        },
    )
    .await
    .map_err(|e| database_error(e, "list subscriptions"))?;
    let next_cursor = if rows.len() > page_size {
        rows.truncate(page_size);
        rows.last().map(|row| row.id)
    } else {
        None
    };
    Ok(Json(json!({
        "subscriptions": rows.iter().map(subscription_view).collect::<Vec<_>>(),
        "nextCursor": next_cursor,
    })))
}

/// `POST /api/v1/subscriptions/{id}/activate`.
pub async fn activate(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    submit(
        &state,
        &path_id(path)?,
        &headers,
        |_| Ok(PublisherCommand::Activate),
        None,
    )
    .await
}

/// `POST /api/v1/subscriptions/{id}/cancel`.
pub async fn cancel(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    submit(
        &state,
        &path_id(path)?,
        &headers,
        |_| Ok(PublisherCommand::Cancel),
        None,
    )
    .await
}

/// `POST /api/v1/subscriptions/{id}/change-plan` with `{"planId": "gold"}`.
pub async fn change_plan(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    let body = body_bytes(body)?;
    let parse = |body: &Map<String, Value>| {
        let raw = match body.get("planId") {
            Some(Value::String(raw)) => raw,
            Some(_) => return Err(ApiError::bad_request("`planId` must be a string")),
            None => return Err(ApiError::bad_request("`planId` is required")),
        };
        let plan_id = PlanId::parse(raw)
            .map_err(|e| ApiError::bad_request(format!("`planId` is invalid: {e}")))?;
        Ok(PublisherCommand::ChangePlan {
            plan_id: plan_id.as_str().to_owned(),
        })
    };
    submit(&state, &id, &headers, parse, Some(&body)).await
}

/// `POST /api/v1/subscriptions/{id}/change-quantity` with `{"quantity": 12}`.
pub async fn change_quantity(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let id = path_id(path)?;
    let body = body_bytes(body)?;
    let parse = |body: &Map<String, Value>| {
        let raw = body
            .get("quantity")
            .ok_or_else(|| ApiError::bad_request("`quantity` is required"))?;
        let quantity = match raw.as_u64() {
            Some(n) if n > u64::from(u32::MAX) => {
                return Err(ApiError::bad_request(format!(
                    "`quantity` must be at most {} seats, got {raw}",
                    u32::MAX
                )));
            }
            Some(n) => u32::try_from(n).ok().and_then(|n| Quantity::new(n).ok()),
            None => None,
        }
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "`quantity` must be a whole number of seats of at least 1, got {raw}"
            ))
        })?;
        Ok(PublisherCommand::ChangeQuantity {
            quantity: quantity.get(),
        })
    };
    submit(&state, &id, &headers, parse, Some(&body)).await
}

/// Validates, checks the subscription exists, queues the command (confirmed) and answers
/// 202 with its id.
async fn submit(
    state: &AppState,
    raw_id: &str,
    headers: &HeaderMap,
    parse: impl FnOnce(&Map<String, Value>) -> Result<PublisherCommand, ApiError>,
    body: Option<&Bytes>,
) -> Result<Response, ApiError> {
    let subscription_id = parse_subscription_id(raw_id)?;
    let object = match body {
        Some(body) => json_object(body)?,
        None => Map::new(),
    };
    let command = parse(&object)?;
    let known = subscriptions::exists(&state.pool, subscription_id)
        .await
        .map_err(|e| database_error(e, "look the subscription up"))?;
    if !known {
        return Err(ApiError::not_found(format!(
            "subscription {subscription_id} is not known here"
        )));
    }
    let command_id = Uuid::new_v4();
    let kind = command.name();
    let message = InboundMessage::Command {
        command_id,
        subscription_id,
        command,
        requested_by: "api".into(),
        requested_at: OffsetDateTime::now_utc(),
    };
    if let Some(reason) = refused_now(state, &message).await? {
        tracing::info!(%subscription_id, command = kind, reason, "command refused at once");
        return Err(ApiError::Conflict {
            reason: "refused",
            message: reason,
        });
    }
    let meta = MessageMeta {
        message_id: InboxKey::command(command_id).into_message_id(),
        correlation_id: command_id.to_string(),
        traceparent: Some(traceparent_or_new(headers)),
        subscription_id: Some(subscription_id),
    };
    crate::store::commands::record(&state.pool, command_id, subscription_id, kind, "api")
        .await
        .map_err(|e| database_error(e, "record the command"))?;
    let span = tracing::info_span!(
        "entitlement_command",
        %subscription_id,
        command_id = %command_id,
        correlation_id = %command_id,
        command = kind,
    );
    match state
        .publish(&message, &meta)
        .instrument(span.clone())
        .await
    {
        Ok(()) => {
            tracing::info!(parent: &span, "command queued");
            Ok((
                StatusCode::ACCEPTED,
                Json(json!({
                    "commandId": command_id,
                    "subscriptionId": subscription_id,
                    "command": kind,
                    "status": "queued",
                })),
            )
                .into_response())
        }
        Err(error) => {
            tracing::warn!(parent: &span, error = %error, "command not queued; answering 503");
            if let Err(error) = crate::store::commands::forget(&state.pool, command_id).await {
                tracing::warn!(parent: &span, %error, "cannot forget the command not queued");
            }
            Err(ApiError::unavailable(
                "the command could not be queued; nothing was accepted, retry later",
            ))
        }
    }
}

/// Whether the machine, as the subscription stands now, would refuse the command (an
/// unknown or same plan, seats outside the plan's or the policy's limits, a subscription
/// that is not Subscribed, a read-only CSP purchase, an operation pending): the machine
/// decides on a copy of the stored machine, nothing is written, so the ISV hears the reason
/// at once instead of a 202 whose command fails a moment later. A state change still in the
/// queue is not seen; a command refused because of one can be sent again.
async fn refused_now(
    state: &AppState,
    message: &InboundMessage,
) -> Result<Option<String>, ApiError> {
    let translated = crate::worker::translate::translate(message)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let machine =
        crate::store::subscriptions::load_machine(&state.pool, translated.subscription_id)
            .await
            .map_err(|e| ApiError::Internal(anyhow::Error::new(e)))?;
    let Some(mut machine) = machine else {
        return Ok(None);
    };
    let decision = machine.handle(
        &translated.event,
        OffsetDateTime::now_utc(),
        &state.config.policy,
    );
    // As `commands::decide` reads a decision: anything but applied fails the command (a
    // refusal, or nothing to do in this state, e.g. any change to an Unsubscribed one).
    Ok(match decision.outcome {
        Outcome::Applied { .. } => None,
        Outcome::Rejected { reason } => Some(reason),
        Outcome::Ignored { reason } => Some(format!("not applied: {reason}")),
    })
}

/// `GET /api/v1/commands/{id}`: what became of a command (`queued`, `requested` with
/// Microsoft's operation id, `succeeded`, `failed` with the reason, `unknown`).
pub async fn get_command(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let raw = path_id(path)?;
    let command_id = Uuid::parse_str(raw.trim())
        .map_err(|_| ApiError::bad_request(format!("command id {raw:?} is not a UUID")))?;
    match crate::commands::outcome_of(&state.pool, command_id).await {
        Ok(Some(outcome)) => Ok(Json(outcome).into_response()),
        Ok(None) => Err(ApiError::not_found(format!(
            "no command {command_id} was accepted here"
        ))),
        Err(error) if error.is_unavailable() => {
            tracing::warn!(%error, "PostgreSQL unavailable; cannot read the command");
            Err(ApiError::unavailable(
                "the database is unavailable; retry later",
            ))
        }
        Err(error) => Err(ApiError::Internal(
            anyhow::Error::new(error).context("cannot read the command"),
        )),
    }
}

/// An empty body counts as `{}`; anything else must be a JSON object.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// Largest body of `POST /api/v1/usage` (up to 1000 events).
pub(crate) const USAGE_BODY_LIMIT: usize = 1024 * 1024;

/// `POST /api/v1/usage`: one usage event `{subscriptionId, dimension, quantity,
/// effectiveAt, idempotencyKey}`, an array of them, or `{"events": [...]}`. All stored
/// (durably, before the 200) or none: a refused event answers 422 with every reason. The
/// same `idempotencyKey` again counts once (`"status": "repeat"`). Needs the entitlement
/// API key (the API has one key, no read-only scope).
pub async fn report_usage(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: USAGE_BODY_LIMIT,
            }
        } else {
            ApiError::bad_request(format!("cannot read the body: {}", rejection.body_text()))
        }
    })?;
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    let reports = crate::metering::reports_of_json(&value).map_err(ApiError::bad_request)?;
    let indexed: Vec<(usize, crate::metering::RawUsage)> =
        reports.into_iter().enumerate().collect();
    let result = crate::metering::ingest::ingest(
        &state.pool,
        &state.marketplace,
        &state.config.metering,
        &indexed,
        "api",
        false,
        OffsetDateTime::now_utc(),
    )
    .await;
    match result {
        Ok(ingested) => {
            let count = |status| ingested.iter().filter(|i| i.status == status).count();
            use crate::store::usage::Stored;
            Ok(Json(json!({
                "stored": ingested.len(),
                "counted": count(Stored::Counted),
                "late": count(Stored::Late),
                "repeats": count(Stored::Repeat),
                "events": ingested,
            }))
            .into_response())
        }
        Err(crate::metering::ingest::IngestError::Refused(refused)) => Ok((
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({
                "error": "usage_refused",
                "message": format!(
                    "{} of {} usage event(s) refused; nothing was stored: fix them and send \
                     the request again",
                    refused.len(),
                    indexed.len()
                ),
                "refused": refused,
            })),
        )
            .into_response()),
        Err(crate::metering::ingest::IngestError::DimensionsUnavailable(message)) => {
            Err(ApiError::unavailable(message))
        }
        Err(crate::metering::ingest::IngestError::Store(error)) if error.is_unavailable() => {
            tracing::warn!(%error, "PostgreSQL unavailable; usage not stored");
            Err(ApiError::unavailable(
                "the database is unavailable; nothing stored, retry later",
            ))
        }
        Err(crate::metering::ingest::IngestError::Store(error)) => Err(ApiError::Internal(
            anyhow::Error::new(error).context("cannot store usage"),
        )),
    }
}

fn database_error(error: sqlx::Error, what: &str) -> ApiError {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            tracing::warn!(error = %error, "PostgreSQL unavailable; cannot {what}");
            ApiError::unavailable("the database is unavailable; retry later")
        }
        other => ApiError::Internal(anyhow::Error::new(other).context(format!("cannot {what}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_read_case_insensitively_and_trimmed() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, "bearer  k3y ".parse().unwrap());
        assert_eq!(bearer(&headers), Some("k3y"));
        headers.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&headers), None);
        headers.insert(AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&headers), None);
    }

    #[test]
    fn list_queries_are_validated_with_clear_messages() {
        let bad = |q: ListQuery, expected: &str| match q.into_filter() {
            Err(ApiError::BadRequest(m)) => assert!(m.contains(expected), "{m}"),
            other => panic!("{other:?}"),
        };
        bad(
            ListQuery {
                cursor: Some(String::new()),
                ..Default::default()
            },
            "`cursor`",
        );
        bad(
            ListQuery {
                state: Some("Active".into()),
                ..Default::default()
            },
            "`state`",
        );
        bad(
            ListQuery {
                limit: Some("501".into()),
                ..Default::default()
            },
            "`limit`",
        );
        bad(
            ListQuery {
                cursor: Some("x".into()),
                ..Default::default()
            },
            "`cursor`",
        );
        let filter = ListQuery::default().into_filter().unwrap();
        assert_eq!(filter.limit, DEFAULT_PAGE_SIZE);
    }
}
