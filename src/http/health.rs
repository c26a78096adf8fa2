//! Probes: `/healthz` (the process serves HTTP) and `/readyz` (it can accept work: PostgreSQL
//! answers and the RabbitMQ connection is up). Kubernetes routes traffic on `/readyz` only.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::state::AppState;

/// How long the readiness probe waits for `SELECT 1`.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`.
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /readyz`: 200 when both dependencies are usable, else 503 naming the one that is not.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let database =
        match tokio::time::timeout(DATABASE_PROBE_TIMEOUT, crate::store::ping(&state.pool)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(format!("PostgreSQL query failed: {error}")),
            Err(_) => Err(format!(
                "PostgreSQL did not answer within {DATABASE_PROBE_TIMEOUT:?}"
            )),
        };
    let broker = if state.broker.is_connected() {
        Ok(())
    } else {
        Err("RabbitMQ connection is down".to_string())
    };
    let check = |result: &Result<(), String>| match result {
        Ok(()) => json!({ "status": "up" }),
        Err(reason) => json!({ "status": "down", "reason": reason }),
    };
    let ready = database.is_ok() && broker.is_ok();
    let unavailable: Vec<&str> = [
        (database.is_err(), "postgresql"),
        (broker.is_err(), "rabbitmq"),
    ]
    .into_iter()
    .filter_map(|(down, name)| down.then_some(name))
    .collect();
    if !ready {
        tracing::warn!(unavailable = ?unavailable, "not ready");
    }
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "unavailable" },
            "unavailable": unavailable,
            "checks": { "postgresql": check(&database), "rabbitmq": check(&broker) },
        })),
    )
        .into_response()
}
