//! HTTP ingress (axum), `fulfillment serve`: the front door Microsoft (webhooks), customers
//! (landing page) and the ISV's product (entitlement API) knock on.
//!
//! - [`webhook`]: `POST /webhook`, verified ([`auth`]), parsed leniently, answered 200 only
//!   after RabbitMQ confirmed the message (design guarantee 1).
//! - The landing page and the console are in [`crate::web`], merged here.
//! - [`entitlements`]: `/api/v1/subscriptions…`, reads and commands behind an API key;
//!   [`openapi`] describes them.
//! - [`isv`]: the ISV's webhook endpoints and the event feed (docs/webhooks.md).
//! - [`health`] and [`metrics`]: probes and Prometheus metrics.
//! - [`state`]: what handlers share; [`error`]: the JSON error answers.
//!
//! [`Application`] binds, connects and serves until its cancellation token fires;
//! [`router`] builds the same routes for tests.

pub mod auth;
pub mod entitlements;
pub mod error;
pub mod health;
pub mod isv;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod state;
pub mod webhook;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::DefaultBodyLimit;
use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderName, Request, StatusCode};
use axum::middleware;
use axum::routing::{get, post};
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;

pub use error::ApiError;
use listener::LimitedListener;
pub use state::{AppState, IngressConfig};

use crate::settings::Settings;

/// Every request gets an answer within this time; Microsoft treats anything slow as a
/// failure and retries anyway.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest body of an entitlement API call.
pub(crate) const API_BODY_LIMIT: usize = 16 * 1024;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Every route of the ingress with its layers.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route(
            "/api/v1/subscriptions",
            get(entitlements::list_subscriptions),
        )
        .route(
            "/api/v1/subscriptions/{id}",
            get(entitlements::get_subscription),
        )
        .route(
            "/api/v1/subscriptions/{id}/activate",
            post(entitlements::activate),
        )
        .route(
            "/api/v1/subscriptions/{id}/change-plan",
            post(entitlements::change_plan),
        )
        .route(
            "/api/v1/subscriptions/{id}/change-quantity",
            post(entitlements::change_quantity),
        )
        .route(
            "/api/v1/subscriptions/{id}/cancel",
            post(entitlements::cancel),
        )
        .route("/api/v1/commands/{id}", get(entitlements::get_command))
        .route(
            "/api/v1/webhook-endpoints",
            get(isv::list).post(isv::create),
        )
        .route(
            "/api/v1/webhook-endpoints/{id}",
            get(isv::get).patch(isv::update).delete(isv::delete),
        )
        .route(
            "/api/v1/webhook-endpoints/{id}/rotate-secret",
            post(isv::rotate_secret),
        )
        .route("/api/v1/webhook-endpoints/{id}/test", post(isv::test))
        .route(
            "/api/v1/webhook-endpoints/{id}/deliveries",
            get(isv::deliveries),
        )
        .route("/api/v1/webhook-endpoints/{id}/replay", post(isv::replay))
        .route("/api/v1/events", get(isv::feed))
        .route(
            "/api/v1/usage",
            post(entitlements::report_usage)
                .layer(DefaultBodyLimit::max(entitlements::USAGE_BODY_LIMIT)),
        )
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            entitlements::require_api_key,
        ))
        .layer(DefaultBodyLimit::max(API_BODY_LIMIT));

    let webhook_limit = DefaultBodyLimit::max(state.config.body_limit_bytes);
    Router::new()
        .route("/webhook", post(webhook::receive).layer(webhook_limit))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::render))
        .route("/api/v1/openapi.json", get(openapi::openapi_json))
        .merge(api)
        .merge(crate::web::routes(&state))
        .layer(
            ServiceBuilder::new()
                .layer(SetSensitiveRequestHeadersLayer::new([AUTHORIZATION]))
                .layer(SetRequestIdLayer::new(X_REQUEST_ID, MakeRequestUuid))
                .layer(
                    TraceLayer::new_for_http()
                        .make_span_with(request_span)
                        .on_response(DefaultOnResponse::new().level(Level::INFO)),
                )
                .layer(PropagateRequestIdLayer::new(X_REQUEST_ID))
                // Counted outside the panic and timeout layers, so their 500/503 show up.
                .layer(middleware::from_fn(metrics::track_requests))
                .layer(CatchPanicLayer::new())
                .layer(TimeoutLayer::with_status_code(
                    StatusCode::SERVICE_UNAVAILABLE,
                    REQUEST_TIMEOUT,
                )),
        )
        .with_state(state)
}

/// The request span: method, path, request id and trace id (continuing the caller's
/// `traceparent`). Never the query string, which carries the landing page's purchase token.
fn request_span(request: &Request<Body>) -> tracing::Span {
    let request_id = request
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let span = tracing::info_span!(
        "http_request",
        method = %request.method(),
        path = %request.uri().path(),
        request_id = %request_id,
        trace_id = tracing::field::Empty,
    );
    // The caller's W3C trace context, when it sent a valid one; else a new trace.
    let traceparent = request
        .headers()
        .get(crate::telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| webhook::is_valid_traceparent(v.trim()));
    crate::telemetry::continue_trace(&span, traceparent);
    span
}

fn listen(settings: &Settings) -> anyhow::Result<LimitedListener> {
    let http = &settings.http;
    LimitedListener::bind(http.listen_addr, http.max_connections, http.idle_timeout)
}

/// The ingress process: a bound listener and its connected state.
#[derive(Debug)]
pub struct Application {
    listener: LimitedListener,
    local_addr: SocketAddr,
    state: AppState,
}

impl Application {
    /// Binds `http.listen_addr` (port 0 picks a free port), connects PostgreSQL and
    /// RabbitMQ (declaring the topology), and builds the webhook verifier and the
    /// Marketplace client. Errors name what is unreachable or missing.
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let listener = listen(&settings)?;
        let state = AppState::from_settings(&settings).await?;
        Application::serving(listener, state)
    }

    /// Binds `http.listen_addr` to serve `state` as it is (a state the caller changed, e.g.
    /// a webhook verifier of its own: `World::restart_ingress`).
    pub fn with_state(settings: &Settings, state: AppState) -> anyhow::Result<Application> {
        Application::serving(listen(settings)?, state)
    }

    fn serving(listener: LimitedListener, state: AppState) -> anyhow::Result<Application> {
        Ok(Application {
            local_addr: listener.local_addr()?,
            listener,
            state,
        })
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled: then stops accepting connections, lets the
    /// requests in flight finish, closes the pool and the broker connection, and returns.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            local_addr,
            state,
        } = self;
        tracing::info!(address = %local_addr, "ingress listening");
        let app = router(state.clone()).layer(middleware::map_response_with_state(
            listener.saturation(),
            listener::close_when_full,
        ));
        let upkeep = tokio::spawn({
            let handle = state.metrics.clone();
            let stop = shutdown.clone();
            async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => handle.run_upkeep(),
                    }
                }
            }
        });
        // `into_make_service`: each connection gets a clone of the one router (an `Arc`).
        // Served as a bare `Router`, axum rebuilds the whole routing table for every
        // connection (`Router::with_state`, meant for routers whose handlers still wait for
        // their state; ours have it): about 10 KiB and 40 route clones per connection, held
        // while it is open, which in `bench burst` (thousands of webhooks on as many
        // connections) was the largest share of the ingress's heap.
        let served = axum::serve(listener, app.into_make_service())
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
            .context("the HTTP server failed");
        upkeep.abort();
        tracing::info!("ingress stopped accepting; closing connections to PostgreSQL and RabbitMQ");
        state.broker.close().await;
        state.pool.close().await;
        served
    }
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `fulfillment serve`: build, serve until ctrl-c/SIGTERM, drain, return.
pub async fn serve(settings: Settings) -> anyhow::Result<()> {
    let application = Application::build(settings).await?;
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    application.run_until_stopped(shutdown).await
}
