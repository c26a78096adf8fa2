//! The public SaaS Fulfillment API v2 under `/api/saas/subscriptions` (§4), behind the layers
//! every real call passes: request/correlation ids (§1.2, §1.3), injected faults, the
//! `api-version` check (§1.1) and bearer-token authorization (403 on any failure, §1.4).

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use super::API_VERSION;
use super::error::{ApiError, parse_json};
use super::faults::ApiFault;
use super::lifecycle::{self, Ack, Change};
use super::state::{OperationStatus, RequestSource, Shared, SubscriptionStatus, wire_name};

const REQUEST_ID: HeaderName = HeaderName::from_static("x-ms-requestid");
const CORRELATION_ID: HeaderName = HeaderName::from_static("x-ms-correlationid");
const MARKETPLACE_TOKEN: &str = "x-ms-marketplace-token";

pub(crate) fn routes(shared: &Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/saas/subscriptions", get(list_subscriptions))
        .route("/api/saas/subscriptions/resolve", post(resolve))
        .route(
            "/api/saas/subscriptions/{subscription_id}",
            get(get_subscription)
                .patch(update_subscription)
                .delete(delete_subscription),
        )
        .route(
            "/api/saas/subscriptions/{subscription_id}/activate",
            post(activate),
        )
        .route(
            "/api/saas/subscriptions/{subscription_id}/listAvailablePlans",
            get(list_available_plans),
        )
        .route(
            "/api/saas/subscriptions/{subscription_id}/operations",
            get(list_operations),
        )
        .route(
            "/api/saas/subscriptions/{subscription_id}/operations/{operation_id}",
            get(get_operation).patch(update_operation),
        )
        .merge(super::metering::routes())
        // The last layer added runs first.
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(shared),
            authorize,
        ))
        .route_layer(middleware::from_fn(check_api_version))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(shared),
            inject_faults,
        ))
        .route_layer(middleware::from_fn(echo_request_ids))
}

/// Echoes `x-ms-requestid`/`x-ms-correlationid`, generating the missing ones.
async fn echo_request_ids(request: Request, next: Next) -> Response {
    let (request_id, correlation_id) = {
        let headers = request.headers();
        (
            id_or_new(headers, &REQUEST_ID),
            id_or_new(headers, &CORRELATION_ID),
        )
    };
    let mut response = next.run(request).await;
    response.headers_mut().insert(REQUEST_ID, request_id);
    response
        .headers_mut()
        .insert(CORRELATION_ID, correlation_id);
    response
}

fn id_or_new(headers: &HeaderMap, name: &HeaderName) -> HeaderValue {
    headers.get(name).cloned().unwrap_or_else(|| {
        HeaderValue::from_str(&Uuid::new_v4().to_string()).unwrap_or(HeaderValue::from_static("0"))
    })
}

async fn inject_faults(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let call = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|route| super::faults::call_name(request.method().as_str(), route.as_str()));
    let (latency, fault) = shared.api_fault(call);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match fault {
        None if shared.read(|st| st.faults.lose_responses.is_empty()) => next.run(request).await,
        None => {
            let response = next.run(request).await;
            if !shared.lose_response(call) {
                return response;
            }
            tracing::info!(call, "answer lost after the call was carried out (loseResponses)");
            (
                StatusCode::GATEWAY_TIMEOUT,
                Json(json!({"error": {
                    "code": "GatewayTimeout",
                    "message": "The answer was lost on the way back: injected fault (loseResponses)",
                }})),
            )
                .into_response()
        }
        Some(ApiFault::ServerError) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": {"code": "UnexpectedError", "message": "An unexpected error has occurred."}})),
        )
            .into_response(),
        Some(ApiFault::Throttled { retry_after_secs }) => (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, retry_after_secs.to_string())],
            Json(json!({"code": "TooManyRequests", "message": "Rate limit exceeded; retry later."})),
        )
            .into_response(),
        Some(ApiFault::Fixed { call, status }) => (
            StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            Json(json!({"error": {
                "code": if status < 500 { "BadRequest" } else { "UnexpectedError" },
                "message": format!("{call} failed: injected fault (failCalls)"),
            }})),
        )
            .into_response(),
    }
}

pub(crate) fn query_params(uri: &Uri) -> HashMap<String, String> {
    uri.query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

/// The ASP.NET API-versioning answers the emulator reproduces (§1.1).
async fn check_api_version(request: Request, next: Next) -> Response {
    let params = query_params(request.uri());
    let error = match params.get("api-version").map(String::as_str) {
        Some(API_VERSION) => return next.run(request).await,
        None | Some("") => json!({"Error": {
            "Code": "ApiVersionUnspecified",
            "Message": "An API version is required, but was not specified.",
        }}),
        Some(other) => json!({"Error": {
            "Code": "UnsupportedApiVersion",
            "Message": format!(
                "The HTTP resource that matches the request URI '{}' does not support the API version '{other}'.",
                request.uri().path()
            ),
        }}),
    };
    (StatusCode::BAD_REQUEST, Json(error)).into_response()
}

async fn authorize(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let verdict = match token {
        None => Err("missing bearer token".to_string()),
        Some(token) => shared.authorize_access_token(token),
    };
    match verdict {
        Ok(()) => next.run(request).await,
        Err(reason) => {
            tracing::info!(reason = %reason, path = %request.uri().path(), "API call refused");
            ApiError::forbidden(format!("Authorization failed: {reason}")).into_response()
        }
    }
}

fn subscription_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("Subscription {raw} not found")))
}

async fn resolve(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let token = headers
        .get(MARKETPLACE_TOKEN)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::bad_request("The x-ms-marketplace-token header is missing"))?;
    shared.read(|st| {
        let entry = st.purchase_tokens.get(token).ok_or_else(|| {
            ApiError::bad_request(
                "The marketplace token is invalid (was it URL-decoded exactly once?)",
            )
        })?;
        if entry.expires_at <= OffsetDateTime::now_utc() {
            return Err(ApiError::bad_request("The marketplace token has expired"));
        }
        let sub = st
            .subscriptions
            .get(&entry.subscription_id)
            .ok_or_else(|| ApiError::bad_request("The marketplace token is invalid"))?;
        let mut body = json!({
            "id": sub.id,
            "subscriptionName": sub.name,
            "offerId": sub.offer_id,
            "planId": sub.plan_id,
            "subscription": sub.to_wire(&shared.config.publisher_id),
        });
        if let Some(quantity) = sub.quantity {
            body["quantity"] = json!(quantity);
        }
        Ok(Json(body))
    })
}

/// Activate accepts no body, `{}` or `{planId, quantity}`; a mismatch is ignored like the
/// real service does (§4.2, [EMU]).
async fn activate(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, ApiError> {
    let id = subscription_id(&id)?;
    if !body.iter().all(u8::is_ascii_whitespace) {
        let _: serde_json::Map<String, Value> = parse_json(&body)?;
    }
    lifecycle::activate(&shared, id)?;
    Ok(StatusCode::OK)
}

/// The size of the page after `after`: drawn from the configured range, but the same for
/// the same continuation token, so a page read twice is the same page.
fn page_size(sizes: &std::ops::RangeInclusive<usize>, after: u64) -> usize {
    let (min, max) = (*sizes.start(), (*sizes.end()).max(*sizes.start()));
    let span = u64::try_from(max - min + 1).unwrap_or(1);
    let mixed = (after.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    (min + usize::try_from(mixed % span).unwrap_or(0)).max(1)
}

/// Pages of varying size (§15.1), `@nextLink` on the link host, none on the last page.
async fn list_subscriptions(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let params = query_params(&uri);
    let after = match params.get("continuationToken") {
        None => 0,
        Some(token) => STANDARD
            .decode(token)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| s.strip_prefix("after:").and_then(|n| n.parse::<u64>().ok()))
            .ok_or_else(|| ApiError::bad_request("The continuationToken is invalid"))?,
    };
    let publisher_id = &shared.config.publisher_id;
    let size = page_size(&shared.config.page_sizes, after);
    let (page, more, last) = shared.read(|st| {
        if st.subscriptions.is_empty() {
            return (None, false, 0);
        }
        let rest: Vec<_> = st.subscriptions_after(after).take(size + 1).collect();
        let page: Vec<Value> = rest
            .iter()
            .take(size)
            .map(|s| s.to_wire(publisher_id))
            .collect();
        let last = rest
            .get(rest.len().min(size).wrapping_sub(1))
            .map_or(after, |s| s.seq);
        (Some(page), rest.len() > size, last)
    });
    let Some(page) = page else {
        // No subscriptions at all: 200 with an empty body (§4.3).
        return Ok(StatusCode::OK.into_response());
    };
    if !more {
        // The last page has no `@nextLink` at all (§15.1).
        return Ok(Json(json!({ "subscriptions": page })).into_response());
    }
    let mut link = shared.link_base();
    link.set_path("api/saas/subscriptions");
    link.query_pairs_mut()
        .append_pair(
            "continuationToken",
            &STANDARD.encode(format!("after:{last}")),
        )
        .append_pair("api-version", API_VERSION);
    Ok(Json(json!({ "subscriptions": page, "@nextLink": link.to_string() })).into_response())
}

async fn get_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = subscription_id(&id)?;
    shared.read(|st| {
        st.subscriptions
            .get(&id)
            .map(|s| Json(s.to_wire(&shared.config.publisher_id)))
            .ok_or_else(|| ApiError::not_found(format!("Subscription {id} not found")))
    })
}

async fn list_available_plans(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let id = subscription_id(&id)?;
    let filter = query_params(&uri).remove("planId");
    let (offer_id, current_plan, status, private_offer) = shared.read(|st| {
        st.subscriptions
            .get(&id)
            .map(|s| {
                (
                    s.offer_id.clone(),
                    s.plan_id.clone(),
                    s.status,
                    s.private_offer_id.clone(),
                )
            })
            .ok_or_else(|| ApiError::not_found(format!("Subscription {id} not found")))
    })?;
    if status == SubscriptionStatus::Unsubscribed {
        return Err(ApiError::forbidden("The subscription is Unsubscribed"));
    }
    let plans: Vec<Value> = match &filter {
        // The filter must name the purchased plan; anything else yields an empty list (§4.5).
        Some(plan_id) if *plan_id != current_plan => Vec::new(),
        Some(plan_id) => shared
            .plan(&offer_id, plan_id)
            .map(|p| {
                let mut plan = p.to_wire();
                // The private offer the purchase came through (§4.5, §10.3).
                plan["sourceOffers"] = json!(
                    private_offer
                        .iter()
                        .map(|id| json!({ "externalId": id }))
                        .collect::<Vec<_>>()
                );
                vec![plan]
            })
            .unwrap_or_default(),
        None => shared
            .plans_of_offer(&offer_id)
            .into_iter()
            .map(|p| p.to_wire())
            .collect(),
    };
    Ok(Json(json!({ "plans": plans })))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateSubscription {
    plan_id: Option<String>,
    quantity: Option<Value>,
}

/// Quantity as a number or a numeric string (the wire has seen both, §1.5).
fn parse_quantity(value: &Value) -> Result<u32, ApiError> {
    let number = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    number.and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
        ApiError::bad_request(format!("quantity must be a positive integer, got {value}"))
    })
}

/// The 202 as recorded from production (§15.1): `Operation-Location` absolute on the link
/// host, `Operation-Id`, and `Retry-After` in whole seconds.
fn accepted(shared: &Shared, id: Uuid, op_id: Uuid) -> Response {
    let location = shared.operation_location(id, op_id).to_string();
    let retry_after = shared.config.timings.retry_after;
    let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    (
        StatusCode::ACCEPTED,
        [
            (HeaderName::from_static("operation-location"), location),
            (HeaderName::from_static("operation-id"), op_id.to_string()),
            (header::RETRY_AFTER, seconds.to_string()),
        ],
    )
        .into_response()
}

async fn update_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    if !shared.read(|st| st.subscriptions.contains_key(&id)) {
        return Err(ApiError::not_found(format!("Subscription {id} not found")));
    }
    let update: UpdateSubscription = parse_json(&body)?;
    let quantity = update.quantity.filter(|q| !q.is_null());
    let change = match (update.plan_id, quantity) {
        (Some(plan_id), None) => Change::Plan(plan_id),
        (None, Some(quantity)) => Change::Quantity(parse_quantity(&quantity)?),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "Change either planId or quantity, not both",
            ));
        }
        (None, None) => return Err(ApiError::bad_request("The body needs planId or quantity")),
    };
    let op_id = lifecycle::request_change(&shared, id, change, RequestSource::Partner)?;
    Ok(accepted(&shared, id, op_id))
}

async fn delete_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = subscription_id(&id)?;
    let op_id = lifecycle::request_cancellation(&shared, id)?;
    Ok(accepted(&shared, id, op_id))
}

/// Only operations awaiting the publisher's acknowledgement (§4.9).
async fn list_operations(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = subscription_id(&id)?;
    shared.read(|st| {
        let sub = st
            .subscriptions
            .get(&id)
            .ok_or_else(|| ApiError::not_found(format!("Subscription {id} not found")))?;
        let operations: Vec<Value> = sub
            .operations
            .iter()
            .filter(|o| o.status == OperationStatus::InProgress && o.source == RequestSource::Azure)
            .map(|o| o.to_wire(sub, &shared.config.publisher_id))
            .collect();
        Ok(Json(json!({ "operations": operations })))
    })
}

/// Unknown subscription or operation ids answer 400 like the live service (404 with
/// `strict_404`); each answer's status is recorded for the admin view.
async fn get_operation(
    State(shared): State<Arc<Shared>>,
    Path((id, op_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let unknown = || lifecycle::unknown_operation(&shared, &op_id);
    let id = Uuid::parse_str(&id).map_err(|_| unknown())?;
    let op_uuid = Uuid::parse_str(&op_id).map_err(|_| unknown())?;
    shared.mutate(|st| {
        let sub = st.subscriptions.get_mut(&id).ok_or_else(unknown)?;
        let op = sub.operation_mut(op_uuid).ok_or_else(unknown)?;
        op.reads.push(wire_name(&op.status));
        op.first_read_at.get_or_insert_with(OffsetDateTime::now_utc);
        let sub = &*sub;
        let op = sub.operation(op_uuid).ok_or_else(unknown)?;
        Ok(Json(op.to_wire(sub, &shared.config.publisher_id)))
    })
}

#[derive(Deserialize)]
struct UpdateOperation {
    status: Option<String>,
}

async fn update_operation(
    State(shared): State<Arc<Shared>>,
    Path((id, op_id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let id = Uuid::parse_str(&id).map_err(|_| lifecycle::unknown_operation(&shared, &op_id))?;
    let op_id =
        Uuid::parse_str(&op_id).map_err(|_| lifecycle::unknown_operation(&shared, &op_id))?;
    let update: UpdateOperation = parse_json(&body)?;
    let ack = match update.status.as_deref().map(str::trim) {
        Some("Success") => Ack::Success,
        Some("Failure") => Ack::Failure,
        other => {
            return Err(ApiError::bad_request(format!(
                "status must be Success or Failure, got {}",
                other.unwrap_or("nothing")
            )));
        }
    };
    lifecycle::acknowledge(&shared, id, op_id, ack)?;
    Ok((StatusCode::OK, Body::empty()).into_response())
}
