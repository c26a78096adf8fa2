//! The control surface for tests and demos under `/simulator`: make purchases, play the
//! customer or Microsoft (plan/seat changes, suspend, reinstate, cancel, renew), inspect a
//! subscription with its operations and webhook deliveries, set faults, replace the
//! catalogue, rotate keys.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::Catalogue;
use super::error::{ApiError, parse_json};
use super::faults::Faults;
use super::lifecycle::{self, Change, Event, Purchase};
use super::state::{RequestSource, Shared};

pub(crate) fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/simulator/health", get(|| async { "ok" }))
        .route("/simulator/purchases", post(purchase))
        .route("/simulator/subscriptions", get(list_subscriptions))
        .route(
            "/simulator/subscriptions/{subscription_id}",
            get(get_subscription),
        )
        .route(
            "/simulator/subscriptions/{subscription_id}/actions",
            post(act),
        )
        .route(
            "/simulator/subscriptions/{subscription_id}/token",
            post(new_token),
        )
        .route("/simulator/faults", put(set_faults).get(get_faults))
        .route(
            "/simulator/catalogue",
            put(set_catalogue).get(get_catalogue),
        )
        .route("/simulator/keys/rotate", post(rotate_keys))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PurchaseRequest {
    offer_id: String,
    plan_id: String,
    quantity: Option<u32>,
    name: Option<String>,
    beneficiary_tenant_id: Option<Uuid>,
    purchaser_tenant_id: Option<Uuid>,
    /// Default: the plan's setting.
    auto_activate: Option<bool>,
    /// A CSP purchase: `allowedCustomerOperations` is `["Read"]` (§10.2).
    #[serde(default)]
    csp: bool,
    is_free_trial: Option<bool>,
    term_unit: Option<String>,
    auto_renew: Option<bool>,
    private_offer_id: Option<String>,
    #[serde(default)]
    null_puid: bool,
    /// Activate is accepted, then fails at Microsoft (an Unsubscribe follows).
    #[serde(default)]
    fail_activation: bool,
}

async fn purchase(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request: PurchaseRequest = parse_json(&body)?;
    let purchased = lifecycle::purchase(
        &shared,
        Purchase {
            offer_id: request.offer_id,
            plan_id: request.plan_id,
            quantity: request.quantity,
            name: request.name,
            beneficiary_tenant_id: request.beneficiary_tenant_id,
            purchaser_tenant_id: request.purchaser_tenant_id,
            auto_activate: request.auto_activate,
            csp: request.csp,
            is_free_trial: request.is_free_trial,
            term_unit: request.term_unit,
            auto_renew: request.auto_renew,
            private_offer_id: request.private_offer_id,
            null_puid: request.null_puid,
            fail_activation: request.fail_activation,
        },
    )?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "subscriptionId": purchased.subscription_id,
            "token": purchased.token,
            "landingUrl": purchased.landing_url.to_string(),
        })),
    ))
}

fn parse_id(raw: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(raw).map_err(|_| ApiError::not_found(format!("Subscription {raw} not found")))
}

async fn list_subscriptions(State(shared): State<Arc<Shared>>) -> Json<Value> {
    let views: Vec<Value> = shared.read(|st| {
        st.subscriptions_in_order()
            .into_iter()
            .map(|s| s.to_view(&shared.config.publisher_id))
            .collect()
    });
    Json(json!({ "subscriptions": views }))
}

async fn get_subscription(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    shared.read(|st| {
        st.subscriptions
            .get(&id)
            .map(|s| Json(s.to_view(&shared.config.publisher_id)))
            .ok_or_else(|| ApiError::not_found(format!("Subscription {id} not found")))
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ActionRequest {
    action: String,
    plan_id: Option<String>,
    quantity: Option<u32>,
}

/// Customer- or Microsoft-side events; all answer 202 `{operationId}`.
async fn act(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = parse_id(&id)?;
    let request: ActionRequest = parse_json(&body)?;
    let operation_id = match request.action.trim() {
        "ChangePlan" => {
            let plan_id = request
                .plan_id
                .ok_or_else(|| ApiError::bad_request("ChangePlan needs planId"))?;
            lifecycle::request_change(&shared, id, Change::Plan(plan_id), RequestSource::Azure)?
        }
        "ChangeQuantity" => {
            let quantity = request
                .quantity
                .ok_or_else(|| ApiError::bad_request("ChangeQuantity needs quantity"))?;
            lifecycle::request_change(
                &shared,
                id,
                Change::Quantity(quantity),
                RequestSource::Azure,
            )?
        }
        "Suspend" => lifecycle::raise(&shared, id, Event::Suspend)?,
        "Reinstate" => lifecycle::raise(&shared, id, Event::Reinstate)?,
        "Unsubscribe" => lifecycle::raise(&shared, id, Event::Unsubscribe)?,
        "Renew" => lifecycle::raise(&shared, id, Event::Renew)?,
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown action {other:?}; expected ChangePlan, ChangeQuantity, Suspend, Reinstate, Unsubscribe or Renew"
            )));
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "operationId": operation_id })),
    ))
}

/// A fresh landing-page token, as a "Manage account" click produces (P5).
async fn new_token(
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id(&id)?;
    shared.mutate(|st| {
        if !st.subscriptions.contains_key(&id) {
            return Err(ApiError::not_found(format!("Subscription {id} not found")));
        }
        let (token, landing_url) = lifecycle::issue_purchase_token(&shared, st, id);
        Ok(Json(
            json!({ "token": token, "landingUrl": landing_url.to_string() }),
        ))
    })
}

async fn set_faults(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Faults>, ApiError> {
    let faults: Faults = parse_json(&body)?;
    faults.validate()?;
    if let Some(seed) = faults.seed {
        *shared.rng() = StdRng::seed_from_u64(seed);
    }
    tracing::info!(?faults, "faults set");
    shared.mutate(|st| st.faults = faults.clone());
    Ok(Json(faults))
}

async fn get_faults(State(shared): State<Arc<Shared>>) -> Json<Faults> {
    Json(shared.read(|st| st.faults.clone()))
}

/// Replaces the plans on sale; existing subscriptions keep their plan ids (a plan no
/// longer listed cannot be changed to, like a stop-sold one).
async fn set_catalogue(
    State(shared): State<Arc<Shared>>,
    body: Bytes,
) -> Result<Json<Catalogue>, ApiError> {
    let catalogue: Catalogue = parse_json(&body)?;
    let catalogue = catalogue.validated().map_err(ApiError::bad_request)?;
    *shared.catalogue() = catalogue.plans.clone();
    tracing::info!(plans = catalogue.plans.len(), "catalogue replaced");
    Ok(Json(catalogue))
}

async fn get_catalogue(State(shared): State<Arc<Shared>>) -> Json<Catalogue> {
    Json(Catalogue {
        plans: shared.catalogue().clone(),
    })
}

async fn rotate_keys(State(shared): State<Arc<Shared>>) -> Result<Json<Value>, ApiError> {
    let kid = shared
        .keys
        .rotate()
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    shared
        .dirty
        .store(true, std::sync::atomic::Ordering::Release);
    tracing::info!(kid = %kid, "signing key rotated");
    Ok(Json(json!({ "kid": kid, "kids": shared.keys.kids() })))
}
