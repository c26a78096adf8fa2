//! The Metering API (§9): single and batch usage events with one accepted event per
//! (resource, dimension, clock hour), a 24-hour window, and usage only for Subscribed
//! subscriptions; plus the `GET /usageEvents` aggregation.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{Date, Duration, OffsetDateTime, PrimitiveDateTime};
use uuid::Uuid;

use super::api::query_params;
use super::error::{ApiError, parse_json};
use super::state::{Shared, State as SimState, SubscriptionStatus, UsageRecord, wire_time};

const MAX_BATCH: usize = 25;
const FAILED_MESSAGE_TIME: &str = "0001-01-01T00:00:00";

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/usageEvent", post(usage_event))
        .route("/api/batchUsageEvent", post(batch_usage_event))
        .route("/api/usageEvents", get(usage_events))
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct UsageEvent {
    resource_id: Option<String>,
    quantity: Option<f64>,
    dimension: Option<String>,
    effective_start_time: Option<String>,
    plan_id: Option<String>,
}

/// Why an event was not accepted: the batch item `status` and a message.
#[derive(Debug)]
struct Refusal {
    status: &'static str,
    message: String,
    /// For `Duplicate`: the event accepted earlier.
    accepted: Option<Value>,
}

fn refuse(status: &'static str, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        accepted: None,
    }
}

/// Offset-less timestamps are UTC (§1.5).
fn parse_time(raw: &str) -> Option<OffsetDateTime> {
    let raw = raw.trim();
    OffsetDateTime::parse(raw, &Rfc3339).ok().or_else(|| {
        let format = format_description!(
            version = 2,
            "[year]-[month]-[day]T[hour]:[minute]:[second][optional [.[subsecond]]]"
        );
        PrimitiveDateTime::parse(raw, &format)
            .ok()
            .map(PrimitiveDateTime::assume_utc)
    })
}

fn parse_date_or_time(raw: &str) -> Option<OffsetDateTime> {
    parse_time(raw).or_else(|| {
        Date::parse(raw.trim(), format_description!("[year]-[month]-[day]"))
            .ok()
            .map(|d| d.midnight().assume_utc())
    })
}

fn accepted_message(record: &UsageRecord, status: &str) -> Value {
    json!({
        "usageEventId": record.usage_event_id,
        "status": status,
        "messageTime": wire_time(record.message_time),
        "resourceId": record.resource_id,
        "quantity": record.quantity,
        "dimension": record.dimension,
        "effectiveStartTime": wire_time(record.effective_start_time),
        "planId": record.plan_id,
    })
}

/// Records one event or says why not.
fn submit(shared: &Shared, st: &mut SimState, event: &UsageEvent) -> Result<Value, Refusal> {
    let resource_id = event
        .resource_id
        .as_deref()
        .ok_or_else(|| refuse("BadArgument", "resourceId is required"))?;
    let resource_id = Uuid::parse_str(resource_id.trim())
        .map_err(|_| refuse("BadArgument", "resourceId must be a SaaS subscription id"))?;
    let dimension = event
        .dimension
        .as_deref()
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .ok_or_else(|| refuse("BadArgument", "dimension is required"))?;
    let plan_id = event
        .plan_id
        .as_deref()
        .map(str::trim)
        .ok_or_else(|| refuse("BadArgument", "planId is required"))?;
    let quantity = event
        .quantity
        .ok_or_else(|| refuse("BadArgument", "quantity is required"))?;
    if quantity.is_nan() || quantity <= 0.0 || !quantity.is_finite() {
        return Err(refuse("InvalidQuantity", "quantity must be greater than 0"));
    }
    let effective = event
        .effective_start_time
        .as_deref()
        .and_then(parse_time)
        .ok_or_else(|| {
            refuse(
                "BadArgument",
                "effectiveStartTime must be an ISO-8601 date-time",
            )
        })?;
    let now = OffsetDateTime::now_utc();
    if effective < now - Duration::hours(24) {
        return Err(refuse(
            "Expired",
            "effectiveStartTime is more than 24 hours in the past",
        ));
    }
    if effective > now + Duration::minutes(5) {
        return Err(refuse("BadArgument", "effectiveStartTime is in the future"));
    }
    let sub = st.subscriptions.get(&resource_id).ok_or_else(|| {
        refuse(
            "ResourceNotFound",
            format!("resource {resource_id} not found"),
        )
    })?;
    // Usage from before a cancellation or suspension is still accepted (§9, P26).
    let active_then = sub.status == SubscriptionStatus::Subscribed
        || sub.inactive_since.is_some_and(|since| effective < since);
    if !active_then {
        return Err(refuse(
            "ResourceNotActive",
            "the subscription is not Subscribed",
        ));
    }
    if sub.plan_id != plan_id {
        return Err(refuse(
            "BadArgument",
            format!("planId {plan_id} is not the subscription's plan"),
        ));
    }
    let known_dimension = shared
        .plan(&sub.offer_id, &sub.plan_id)
        .is_some_and(|p| p.dimensions.iter().any(|d| d == dimension));
    if !known_dimension {
        return Err(refuse(
            "InvalidDimension",
            format!("plan {plan_id} has no dimension {dimension}"),
        ));
    }
    let key = format!(
        "{resource_id}|{dimension}|{}",
        effective.unix_timestamp().div_euclid(3600)
    );
    if let Some(previous) = st.usage.get(&key) {
        *st.usage_duplicates.entry(key.clone()).or_default() += 1;
        return Err(Refusal {
            status: "Duplicate",
            message: "This usage event already exist.".into(),
            accepted: Some(accepted_message(previous, "Duplicate")),
        });
    }
    let record = UsageRecord {
        usage_event_id: Uuid::new_v4(),
        resource_id,
        offer_id: sub.offer_id.clone(),
        plan_id: plan_id.to_string(),
        dimension: dimension.to_string(),
        quantity,
        effective_start_time: effective,
        message_time: now,
        processed_quantity: None,
        rejected: false,
    };
    let body = accepted_message(&record, "Accepted");
    st.usage.insert(key, record);
    Ok(body)
}

fn conflict_body(refusal: &Refusal) -> Value {
    json!({
        "additionalInfo": { "acceptedMessage": refusal.accepted },
        "message": refusal.message,
        "code": "Conflict",
    })
}

fn bad_argument(message: &str, code: &str) -> Value {
    json!({
        "code": "BadArgument",
        "message": "One or more errors have occurred.",
        "target": "usageEventRequest",
        "details": [{ "message": message, "target": "usageEventRequest", "code": code }],
    })
}

async fn usage_event(State(shared): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let event: UsageEvent = parse_json(&body)?;
    let result = shared.mutate(|st| submit(&shared, st, &event));
    Ok(match result {
        Ok(accepted) => Json(accepted).into_response(),
        Err(refusal) if refusal.status == "Duplicate" => {
            (StatusCode::CONFLICT, Json(conflict_body(&refusal))).into_response()
        }
        Err(refusal) => (
            StatusCode::BAD_REQUEST,
            Json(bad_argument(&refusal.message, refusal.status)),
        )
            .into_response(),
    })
}

#[derive(Deserialize)]
struct Batch {
    request: Option<Vec<UsageEvent>>,
}

async fn batch_usage_event(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let batch: Batch = parse_json(&body)?;
    let events = batch.request.unwrap_or_default();
    if events.is_empty() || events.len() > MAX_BATCH {
        return Ok((
            StatusCode::BAD_REQUEST,
            Json(bad_argument(
                &format!(
                    "a batch holds 1 to {MAX_BATCH} events, got {}",
                    events.len()
                ),
                "BadArgument",
            )),
        )
            .into_response());
    }
    let result: Vec<Value> = shared.mutate(|st| {
        events
            .iter()
            .map(|event| match submit(&shared, st, event) {
                Ok(accepted) => accepted,
                Err(refusal) => {
                    let error = if refusal.status == "Duplicate" {
                        conflict_body(&refusal)
                    } else {
                        json!({ "message": refusal.message, "code": refusal.status })
                    };
                    json!({
                        "status": refusal.status,
                        "messageTime": FAILED_MESSAGE_TIME,
                        "resourceId": event.resource_id,
                        "quantity": event.quantity,
                        "dimension": event.dimension,
                        "effectiveStartTime": event.effective_start_time,
                        "planId": event.plan_id,
                        "error": error,
                    })
                }
            })
            .collect()
    });
    Ok(Json(json!({ "count": result.len(), "result": result })).into_response())
}

/// `GET /simulator/usage` (every accepted event, with how often its bucket was sent again)
/// and `PATCH /simulator/usage` (seed what Partner Center processed, for reconciliation).
pub(crate) fn admin_routes() -> Router<Arc<Shared>> {
    Router::new().route("/simulator/usage", get(list_usage).patch(seed_usage))
}

async fn list_usage(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let records = shared.read(|st| {
        let mut all: Vec<Value> = st
            .usage
            .iter()
            .map(|(key, record)| {
                let mut item = accepted_message(record, "Accepted");
                item["duplicatesRefused"] =
                    json!(st.usage_duplicates.get(key).copied().unwrap_or(0));
                item
            })
            .collect();
        all.sort_by(|a, b| {
            (
                a["effectiveStartTime"].as_str(),
                a["resourceId"].as_str(),
                a["dimension"].as_str(),
            )
                .cmp(&(
                    b["effectiveStartTime"].as_str(),
                    b["resourceId"].as_str(),
                    b["dimension"].as_str(),
                ))
        });
        all
    });
    Json(Value::Array(records))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SeedUsage {
    resource_id: Uuid,
    dimension: String,
    /// Any time inside the hour.
    effective_start_time: String,
    processed_quantity: Option<f64>,
    #[serde(default)]
    rejected: bool,
}

async fn seed_usage(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let seed: SeedUsage = parse_json(&body)?;
    let at = parse_time(&seed.effective_start_time)
        .ok_or_else(|| ApiError::bad_request("effectiveStartTime must be a date-time"))?;
    let key = format!(
        "{}|{}|{}",
        seed.resource_id,
        seed.dimension,
        at.unix_timestamp().div_euclid(3600)
    );
    shared
        .mutate(|st| {
            st.usage.get_mut(&key).map(|record| {
                record.processed_quantity = seed.processed_quantity;
                record.rejected = seed.rejected;
                accepted_message(record, "Accepted")
            })
        })
        .map(Json)
        .ok_or_else(|| ApiError::bad_request(format!("no accepted usage for {key}")))
}

/// (day, resource, dimension, plan).
type DayKey = (Date, Uuid, String, String);
/// (offer, quantity, events).
/// (offer, submitted quantity, processed quantity, events, any rejected).
type DayTotal = (String, f64, f64, u64, bool);

/// Daily aggregates of accepted usage (§9.3).
async fn usage_events(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
) -> Result<Json<Value>, ApiError> {
    let params: BTreeMap<String, String> = query_params(&uri)
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let start = params
        .get("usagestartdate")
        .and_then(|s| parse_date_or_time(s))
        .ok_or_else(|| {
            ApiError::bad_request("usageStartDate is required (ISO-8601 date or date-time)")
        })?;
    let end = match params.get("usageenddate") {
        Some(raw) => parse_date_or_time(raw)
            .ok_or_else(|| ApiError::bad_request("UsageEndDate is not a date"))?,
        None => OffsetDateTime::now_utc(),
    };
    let matches = |field: &str, value: &str| params.get(field).is_none_or(|want| want == value);
    let rows = shared.read(|st| {
        let mut groups: BTreeMap<DayKey, DayTotal> = BTreeMap::new();
        for record in st.usage.values() {
            if record.effective_start_time < start
                || record.effective_start_time > end
                || !matches("offerid", &record.offer_id)
                || !matches("planid", &record.plan_id)
                || !matches("dimension", &record.dimension)
            {
                continue;
            }
            let entry = groups
                .entry((
                    record.effective_start_time.date(),
                    record.resource_id,
                    record.dimension.clone(),
                    record.plan_id.clone(),
                ))
                .or_insert_with(|| (record.offer_id.clone(), 0.0, 0.0, 0, false));
            entry.1 += record.quantity;
            entry.2 += record.processed_quantity.unwrap_or(record.quantity);
            entry.3 += 1;
            entry.4 |= record.rejected;
        }
        groups
            .into_iter()
            .map(
                |(
                    (date, resource, dimension, plan),
                    (offer, quantity, processed, count, rejected),
                )| {
                    let recon_status = if rejected {
                        "Rejected"
                    } else if (processed - quantity).abs() > 1e-9 {
                        "Mismatch"
                    } else {
                        "Accepted"
                    };
                    json!({
                        "usageDate": format!("{date}T00:00:00"),
                        "usageResourceId": resource,
                        "dimension": dimension,
                        "planId": plan,
                        "planName": plan,
                        "offerId": offer,
                        "offerName": offer,
                        "offerType": "SaaS",
                        "azureSubscriptionId": "",
                        "reconStatus": recon_status,
                        "submittedQuantity": quantity,
                        "processedQuantity": if rejected { 0.0 } else { processed },
                        "submittedCount": count,
                    })
                },
            )
            .collect::<Vec<_>>()
    });
    Ok(Json(Value::Array(rows)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_without_offset_are_utc_and_dates_are_midnight() {
        let t = parse_time("2025-06-02T08:30:14").unwrap();
        assert_eq!(t.unix_timestamp(), 1_748_853_014);
        assert_eq!(parse_time("2025-06-02T08:30:14Z"), Some(t));
        assert_eq!(
            parse_time("2025-06-02T08:30:14.1234567"),
            Some(t + Duration::nanoseconds(123_456_700))
        );
        assert_eq!(parse_date_or_time("2025-06-02").unwrap().hour(), 0);
    }
}
