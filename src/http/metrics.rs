//! Prometheus metrics of the ingress: the per-request middleware and the `/metrics` route.
//! The process-wide recorder and every metric name live in [`crate::metrics`].
//!
//! Names: `http_requests_total{route,method,status}`,
//! `http_request_duration_seconds{route,status}`, `publish_confirm_seconds{outcome}`,
//! `jwt_rejections_total{reason}`, `jwks_fetch_seconds{outcome}`. `route` is the matched
//! route template (`/api/v1/subscriptions/{id}`), never the raw path, so label cardinality
//! stays bounded.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::state::AppState;
pub use crate::metrics::{
    HTTP_REQUEST_DURATION_SECONDS, HTTP_REQUESTS_TOTAL, JWKS_FETCH_SECONDS, JWT_REJECTIONS_TOTAL,
    PUBLISH_CONFIRM_SECONDS, prometheus_handle,
};

/// Counts and times every request under its matched route.
pub async fn track_requests(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        HTTP_REQUESTS_TOTAL,
        "route" => route.clone(),
        "method" => method,
        "status" => status.clone()
    )
    .increment(1);
    metrics::histogram!(
        HTTP_REQUEST_DURATION_SECONDS,
        "route" => route,
        "status" => status
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Records how long RabbitMQ took to confirm (or refuse) a publish.
pub fn record_publish_confirm(elapsed: Duration, outcome: &'static str) {
    metrics::histogram!(PUBLISH_CONFIRM_SECONDS, "outcome" => outcome)
        .record(elapsed.as_secs_f64());
}

/// Records how long a fetch of Entra's JWKS took, and whether it gave keys.
pub fn record_jwks_fetch(elapsed: Duration, ok: bool) {
    let outcome = if ok { "ok" } else { "failed" };
    metrics::histogram!(JWKS_FETCH_SECONDS, "outcome" => outcome).record(elapsed.as_secs_f64());
}

/// Counts a refused webhook token by reason.
pub fn record_jwt_rejection(reason: &'static str) {
    metrics::counter!(JWT_REJECTIONS_TOTAL, "reason" => reason).increment(1);
}

/// `GET /metrics`: the Prometheus text exposition format.
pub async fn render(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}
