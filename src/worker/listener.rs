//! The worker's own small HTTP listener (`worker.metrics_addr`, default `127.0.0.1:9464`):
//! `/metrics` (Prometheus), `/healthz` (the process runs) and `/readyz` (PostgreSQL answers,
//! the RabbitMQ connection is up and no inbound delivery has been held longer than
//! `worker.stall_after_secs`: a worker that cannot make progress says so). It also
//! refreshes the outbox backlog and held-delivery gauges, every few seconds and on each
//! scrape, so they are current whoever reads them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sqlx::postgres::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics;
use crate::queue::Broker;
use crate::store::outbox;
use crate::worker::consume::ConsumerActivity;

/// Between two refreshes of the backlog gauges (and upkeep of the histograms).
const REFRESH_INTERVAL: Duration = Duration::from_secs(5);
/// How long a probe or a gauge refresh waits for PostgreSQL.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct ListenerState {
    pool: PgPool,
    broker: Broker,
    metrics: PrometheusHandle,
    /// The consumer whose held deliveries count for readiness, with the stall threshold.
    consumer: Option<(Arc<ConsumerActivity>, Duration)>,
}

impl ListenerState {
    /// Deliveries held too long (0 without a consumer), refreshing the gauges.
    fn stalled_deliveries(&self) -> usize {
        let Some((activity, stall_after)) = &self.consumer else {
            return 0;
        };
        let held = activity.held(*stall_after);
        metrics::set_deliveries_held(held.oldest, held.stalled);
        held.stalled
    }
}

/// A bound listener, not yet serving.
pub struct MetricsListener {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: ListenerState,
}

impl std::fmt::Debug for MetricsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsListener")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl MetricsListener {
    /// Binds `address` (port 0 picks a free port).
    pub async fn bind(address: SocketAddr, pool: PgPool, broker: Broker) -> anyhow::Result<Self> {
        let listener = crate::http::listener::listen(address)
            .with_context(|| format!("cannot listen on {address} (WORKER_METRICS_ADDR)"))?;
        let local_addr = listener.local_addr()?;
        Ok(Self {
            listener,
            local_addr,
            state: ListenerState {
                pool,
                broker,
                metrics: metrics::prometheus_handle(),
                consumer: None,
            },
        })
    }

    /// Counts `activity`'s deliveries held longer than `stall_after` in the gauges and
    /// against readiness.
    pub fn watching(mut self, activity: Arc<ConsumerActivity>, stall_after: Duration) -> Self {
        self.state.consumer = Some((activity, stall_after));
        self
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves and refreshes the gauges until `shutdown` fires.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let MetricsListener {
            listener,
            local_addr,
            state,
        } = self;
        tracing::info!(address = %local_addr, "worker metrics listening");
        let refresher = tokio::spawn({
            let state = state.clone();
            let stop = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(REFRESH_INTERVAL);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {
                            refresh_backlog_gauges(&state.pool).await;
                            state.stalled_deliveries();
                            state.metrics.run_upkeep();
                        }
                    }
                }
            }
        });
        let served = axum::serve(listener, router(state))
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("the worker metrics listener failed");
        refresher.abort();
        served
    }
}

fn router(state: ListenerState) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Sets `fulfillment_outbox_backlog` and `fulfillment_oldest_unprocessed_event_age_seconds`
/// from the outbox; a failure leaves the last values and is logged at debug (the readiness
/// probe reports the database).
pub async fn refresh_backlog_gauges(pool: &PgPool) {
    match tokio::time::timeout(DATABASE_TIMEOUT, outbox::backlog(pool)).await {
        Ok(Ok((pending, oldest))) => {
            metrics::set_outbox_backlog(u64::try_from(pending).unwrap_or(0), oldest)
        }
        Ok(Err(error)) => tracing::debug!(%error, "cannot read the outbox backlog"),
        Err(_) => tracing::debug!("the outbox backlog query timed out"),
    }
}

/// `GET /metrics`: the gauges refreshed, then the Prometheus text format.
async fn render(State(state): State<ListenerState>) -> impl IntoResponse {
    refresh_backlog_gauges(&state.pool).await;
    state.stalled_deliveries();
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
}

/// `GET /readyz`: 200 when PostgreSQL answers, RabbitMQ is connected and no delivery is
/// stalled, else 503 naming what is wrong (`postgresql`, `rabbitmq`, `stalled_deliveries`).
async fn readyz(State(state): State<ListenerState>) -> Response {
    let database = matches!(
        tokio::time::timeout(DATABASE_TIMEOUT, crate::store::ping(&state.pool)).await,
        Ok(Ok(()))
    );
    let broker = state.broker.is_connected();
    let stalled = state.stalled_deliveries();
    let unavailable: Vec<&str> = [
        (!database, "postgresql"),
        (!broker, "rabbitmq"),
        (stalled > 0, "stalled_deliveries"),
    ]
    .into_iter()
    .filter_map(|(down, name)| down.then_some(name))
    .collect();
    let status = if unavailable.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if unavailable.is_empty() { "ready" } else { "unavailable" },
        "unavailable": unavailable,
    });
    (status, axum::Json(body)).into_response()
}
