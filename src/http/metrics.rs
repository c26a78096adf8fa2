//! Prometheus metrics of the ingress: the process-wide recorder (installed once), the
//! per-request middleware, and the `/metrics` route that renders them.
//!
//! Names: `http_requests_total{route,method,status}`,
//! `http_request_duration_seconds{route,status}`, `publish_confirm_seconds{outcome}`,
//! `jwt_rejections_total{reason}`. `route` is the matched route template (`/api/v1/
//! subscriptions/{id}`), never the raw path, so label cardinality stays bounded.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::state::AppState;

pub const HTTP_REQUESTS_TOTAL: &str = "http_requests_total";
pub const HTTP_REQUEST_DURATION_SECONDS: &str = "http_request_duration_seconds";
pub const PUBLISH_CONFIRM_SECONDS: &str = "publish_confirm_seconds";
pub const JWT_REJECTIONS_TOTAL: &str = "jwt_rejections_total";

/// Buckets for request and confirm latencies: the ingress should answer in milliseconds,
/// and Microsoft gives up on a webhook call long before the 10 s end.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle. The first call installs the global `metrics`
/// recorder; later calls (more `Application`s in one test process) share it.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE.get_or_init(install).clone()
}

fn install() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), LATENCY_BUCKETS)
        .expect("the latency buckets are not empty");
    // Build first so a recorder installed by someone else (another subsystem in the same
    // process) does not leave us without a handle: we then render our own, empty registry.
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if let Err(e) = metrics::set_global_recorder(recorder) {
        tracing::warn!(error = %e, "a metrics recorder was already installed; /metrics will be empty");
    }
    handle
}

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
