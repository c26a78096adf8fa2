//! The ISV's side of the entitlement API (docs/webhooks.md): its webhook endpoints under
//! `/api/v1/webhook-endpoints` (register, list, read, change, delete, rotate the secret,
//! send a test event, read the delivery log, replay deliveries) and the pull feed
//! `GET /api/v1/events`. Behind the same API key as the rest of `/api/v1`; the work is
//! [`crate::webhooks::manage`]'s, shared with the CLI.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fulfillment_state_machine::DomainEventKind;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::error::ApiError;
use super::state::AppState;
use crate::store::deliveries::{self, ReplaySelection};
use crate::webhooks::manage::{
    self, CreateEndpoint, ManageError, UpdateEndpoint, attempt_view, endpoint_view, replay_view,
    test_view,
};

/// Page size of the feed and the delivery log when `limit` is absent, and the largest.
pub const DEFAULT_LIMIT: i64 = 100;
pub const MAX_LIMIT: i64 = 1000;

/// The longest a test event may wait for the endpoint (below the router's 10 s).
const TEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(8);

impl From<ManageError> for ApiError {
    fn from(error: ManageError) -> Self {
        match error {
            ManageError::Invalid(message) => ApiError::Unprocessable(message),
            ManageError::NotFound(id) => {
                ApiError::not_found(format!("webhook endpoint {id} is not known here"))
            }
            ManageError::Store(error) => ApiError::Internal(anyhow::Error::new(error)),
        }
    }
}

fn endpoint_id(path: Result<Path<String>, PathRejection>) -> Result<Uuid, ApiError> {
    let Path(raw) = path.map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    Uuid::parse_str(raw.trim())
        .map_err(|_| ApiError::bad_request(format!("the endpoint id must be a GUID, got {raw:?}")))
}

/// A JSON body, with every rejection as a JSON error naming the problem.
fn json_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge {
                limit: super::API_BODY_LIMIT,
            }
        } else {
            ApiError::bad_request(format!("cannot read the body: {}", rejection.body_text()))
        }
    })?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not the expected JSON: {e}")))
}

/// Body of `POST /api/v1/webhook-endpoints`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateBody {
    url: String,
    description: Option<String>,
    topics: Option<Vec<String>>,
    offer_id: Option<String>,
    #[serde(default)]
    insecure: bool,
}

/// `POST /api/v1/webhook-endpoints`: 201 with the endpoint and its secret (shown this once).
pub async fn create(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body: CreateBody = json_body(body)?;
    let (row, secret) = manage::create(
        &state.pool,
        &CreateEndpoint {
            url: body.url,
            description: body.description,
            topics: body.topics,
            offer_id: body.offer_id,
            insecure: body.insecure,
        },
    )
    .await?;
    let mut view = endpoint_view(&row);
    view["secret"] = Value::String(secret.expose().to_owned());
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// `GET /api/v1/webhook-endpoints`.
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let rows = crate::store::endpoints::list(&state.pool)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    Ok(Json(json!({
        "endpoints": rows.iter().map(endpoint_view).collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/webhook-endpoints/{id}`.
pub async fn get(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    Ok(Json(endpoint_view(&manage::get(&state.pool, id).await?)))
}

/// Body of `PATCH /api/v1/webhook-endpoints/{id}`: every field optional; `offerId: null`
/// removes the offer filter.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateBody {
    url: Option<String>,
    description: Option<String>,
    topics: Option<Vec<String>>,
    #[serde(default, deserialize_with = "present")]
    offer_id: Option<Option<String>>,
    insecure: Option<bool>,
    enabled: Option<bool>,
}

/// `Some(None)` for an explicit `null`, `None` for an absent field.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// `PATCH /api/v1/webhook-endpoints/{id}`.
pub async fn update(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let body: UpdateBody = json_body(body)?;
    let row = manage::update(
        &state.pool,
        id,
        &UpdateEndpoint {
            url: body.url,
            description: body.description,
            topics: body.topics,
            offer_id: body.offer_id,
            insecure: body.insecure,
            enabled: body.enabled,
        },
    )
    .await?;
    Ok(Json(endpoint_view(&row)))
}

/// `DELETE /api/v1/webhook-endpoints/{id}`: 204; its pending deliveries are dropped.
pub async fn delete(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let id = endpoint_id(path)?;
    manage::delete(&state.pool, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/webhook-endpoints/{id}/rotate-secret`: the new secret (shown this once);
/// the old one keeps signing, as a second signature, until `previousSecretValidUntil`.
pub async fn rotate_secret(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let (row, secret) =
        manage::rotate_secret(&state.pool, id, state.config.webhooks.rotation_overlap).await?;
    let mut view = endpoint_view(&row);
    view["secret"] = Value::String(secret.expose().to_owned());
    Ok(Json(view))
}

/// `POST /api/v1/webhook-endpoints/{id}/test`: sends a signed `webhook.test` event now and
/// reports the endpoint's answer.
pub async fn test(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let timeout = state.config.webhooks.timeout.min(TEST_TIMEOUT);
    let (event_id, sent) = manage::send_test(&state.pool, id, timeout).await?;
    Ok(Json(test_view(&event_id, &sent)))
}

/// Query of the delivery log.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AttemptsQuery {
    before: Option<String>,
    limit: Option<String>,
}

/// `GET /api/v1/webhook-endpoints/{id}/deliveries?before=&limit=`: every attempt, newest
/// first; `nextBefore` pages further back.
pub async fn deliveries(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<AttemptsQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = parse_limit(query.limit.as_deref())?;
    let before = match query.before.as_deref() {
        None => None,
        Some(raw) => Some(
            raw.trim()
                .parse::<i64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`before` must be the `nextBefore` of a previous page, got {raw:?}"
                    ))
                })?,
        ),
    };
    let rows = manage::attempts(&state.pool, id, before, limit).await?;
    let next_before = (rows.len() as i64 == limit)
        .then(|| rows.last().map(|r| r.id.to_string()))
        .flatten();
    Ok(Json(json!({
        "deliveries": rows.iter().map(attempt_view).collect::<Vec<_>>(),
        "nextBefore": next_before,
    })))
}

fn parse_limit(raw: Option<&str>) -> Result<i64, ApiError> {
    match raw {
        None => Ok(DEFAULT_LIMIT),
        Some(raw) => match raw.trim().parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "`limit` must be an integer from 1 to {MAX_LIMIT}, got {raw:?}"
            ))),
        },
    }
}

/// Body of `POST /api/v1/webhook-endpoints/{id}/replay`: exactly one of `eventId`,
/// `failures: true`, `since`; a dry run unless `dryRun: false`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReplayBody {
    event_id: Option<String>,
    #[serde(default)]
    failures: bool,
    since: Option<String>,
    dry_run: Option<bool>,
}

/// `POST /api/v1/webhook-endpoints/{id}/replay`: queues deliveries of this endpoint again.
pub async fn replay(
    State(state): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = endpoint_id(path)?;
    let body: ReplayBody = json_body(body)?;
    manage::get(&state.pool, id).await?;
    let selection = match (body.event_id, body.failures, body.since) {
        (Some(event_id), false, None) => ReplaySelection::Event {
            event_id,
            endpoint_id: Some(id),
        },
        (None, true, None) => ReplaySelection::Failures { endpoint_id: id },
        (None, false, Some(since)) => ReplaySelection::Since {
            since: OffsetDateTime::parse(since.trim(), &Rfc3339).map_err(|_| {
                ApiError::bad_request(format!(
                    "`since` must be an RFC 3339 time such as 2026-12-06T08:00:00Z, got {since:?}"
                ))
            })?,
            endpoint_id: Some(id),
        },
        _ => {
            return Err(ApiError::bad_request(
                "name exactly one of `eventId`, `failures: true` or `since`",
            ));
        }
    };
    let report = manage::replay(
        &state.pool,
        &selection,
        body.dry_run.unwrap_or(true),
        "api:entitlement-key",
    )
    .await?;
    Ok(Json(replay_view(&report)))
}

/// Query of the feed.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedQuery {
    after: Option<String>,
    limit: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    subscription_id: Option<String>,
}

/// `GET /api/v1/events?after=CURSOR&limit=&type=&subscriptionId=`: the events the webhooks
/// carry (same CloudEvents, same ids) in the order they were published. `nextCursor` is
/// always present: pass it as `after` next time (it stays put when nothing is new).
pub async fn feed(
    State(state): State<AppState>,
    query: Result<Query<FeedQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = match query.after.as_deref() {
        None => 0,
        Some(raw) => raw.trim().parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::bad_request(format!(
                "`after` must be the `nextCursor` of a previous answer (omit it to start at the \
                 beginning), got {raw:?}"
            ))
        })?,
    };
    let limit = parse_limit(query.limit.as_deref())?;
    let topic = match query.kind.as_deref() {
        None => None,
        Some(raw) => {
            let topic = raw
                .trim()
                .strip_prefix("com.fulfillment.")
                .unwrap_or(raw.trim());
            if !DomainEventKind::ALL
                .iter()
                .any(|k| k.routing_key() == topic)
            {
                return Err(ApiError::bad_request(format!(
                    "`type` must be an event type of docs/events.md (`subscription.activated` \
                     or `com.fulfillment.subscription.activated`), got {raw:?}"
                )));
            }
            Some(topic.to_owned())
        }
    };
    let subscription_id = match query.subscription_id.as_deref() {
        None => None,
        Some(raw) => Some(Uuid::parse_str(raw.trim()).map_err(|_| {
            ApiError::bad_request(format!("`subscriptionId` must be a GUID, got {raw:?}"))
        })?),
    };
    let rows = deliveries::feed(&state.pool, after, limit, topic.as_deref(), subscription_id)
        .await
        .map_err(|e| ApiError::Internal(e.into()))?;
    let next = rows.last().map_or(after, |row| row.position);
    Ok(Json(json!({
        "events": rows.into_iter().map(|row| row.body).collect::<Vec<_>>(),
        "nextCursor": next.to_string(),
    })))
}
