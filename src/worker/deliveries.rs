//! The delivery runner: the IO of webhook deliveries to the ISV (docs/webhooks.md). It
//! claims `deliver_webhook` outbox rows with its own permits (a slow or dead endpoint never
//! holds a permit of the effects towards Microsoft), signs and sends what
//! [`deliver::step`](crate::worker::protocol::deliver::step) says, logs every attempt and
//! settles the row as the step decides. [`fan_out`] queues the deliveries of domain events
//! (called by the effect runner when it settles the rows that published them); [`send`] is
//! one signed POST, also used by the test event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sqlx::postgres::{PgConnection, PgListener, PgPool};
use time::OffsetDateTime;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use uuid::Uuid;

use crate::queue::{MessageMeta, Publisher};
use crate::store::StoreError;
use crate::store::deliveries::{self, AttemptOutcome, NewAttempt, NewDelivery, PublishedEvent};
use crate::store::endpoints::{self, EndpointStatus};
use crate::store::outbox::Claimed;
use crate::webhooks::{Secret, TopicFilter, sign};
use crate::worker::protocol::deliver::{
    self, Delivery, DeliveryAnswer, DeliveryConfig, DeliveryStep, DeliveryTurn, EndpointState,
};

/// Bytes of an answer kept in the delivery log.
pub const RESPONSE_HEAD_BYTES: usize = 1024;

/// The routing key of the alert published when an endpoint is disabled for failing too long.
pub const ENDPOINT_DISABLED_TOPIC: &str = "webhook.endpoint_disabled";

/// The HTTP client of deliveries: no redirects (a redirect is an answer, not a delivery),
/// `timeout` per attempt.
pub fn http_client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .user_agent(concat!("fulfillment-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the TLS backend initialises")
}

/// What one signed POST came back with.
#[derive(Debug, Clone)]
pub struct SendResult {
    pub answer: DeliveryAnswer,
    pub latency: Duration,
    /// The first [`RESPONSE_HEAD_BYTES`] of the answer, or the transport error.
    pub head: String,
}

impl SendResult {
    pub fn status(&self) -> Option<u16> {
        match self.answer {
            DeliveryAnswer::Status { status, .. } => Some(status),
            _ => None,
        }
    }
}

/// POSTs `body` to `url` signed with `secrets` (Standard Webhooks headers), timestamped now.
pub async fn send(
    client: &reqwest::Client,
    url: &str,
    secrets: &[&Secret],
    id: &str,
    body: &[u8],
) -> SendResult {
    let timestamp = OffsetDateTime::now_utc().unix_timestamp();
    let signature = sign(secrets, id, timestamp, body);
    let started = Instant::now();
    let result = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body.to_vec())
        .send()
        .await;
    match result {
        Ok(mut response) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let mut head = Vec::new();
            while head.len() < RESPONSE_HEAD_BYTES {
                match response.chunk().await {
                    Ok(Some(chunk)) => head.extend_from_slice(&chunk),
                    Ok(None) | Err(_) => break,
                }
            }
            head.truncate(RESPONSE_HEAD_BYTES);
            SendResult {
                answer: DeliveryAnswer::Status {
                    status,
                    retry_after,
                },
                latency: started.elapsed(),
                head: String::from_utf8_lossy(&head).into_owned(),
            }
        }
        Err(error) => {
            let detail = without_url(&error);
            SendResult {
                answer: if error.is_timeout() {
                    DeliveryAnswer::Timeout
                } else {
                    DeliveryAnswer::Unreachable {
                        detail: detail.clone(),
                    }
                },
                latency: started.elapsed(),
                head: detail,
            }
        }
    }
}

/// A transport error with its source chain, without the URL (which may carry a token in
/// its query).
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), "<endpoint>");
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Records published domain events in the feed and queues their deliveries to the endpoints
/// whose topic filter matches (once per event and endpoint, however often a publish runs),
/// in `conn`'s transaction: the effect runner's settle of the rows that published them.
pub async fn fan_out(
    conn: &mut PgConnection,
    events: &[PublishedEvent<'_>],
) -> Result<(), StoreError> {
    deliveries::fan_out(conn, events, |event, candidates| {
        candidates
            .iter()
            .filter(|c| TopicFilter::parse(&c.topics).is_ok_and(|f| f.matches(event.topic)))
            .map(|c| NewDelivery {
                endpoint_id: c.id,
                lane: deliver::lane(c.id, event.subscription_id),
                effect: serde_json::to_value(Delivery {
                    endpoint_id: c.id,
                    event_id: event.id.to_owned(),
                    subscription_id: event.subscription_id,
                    topic: event.topic.to_owned(),
                })
                .unwrap_or(Value::Null),
            })
            .collect()
    })
    .await?;
    Ok(())
}

/// Claims due deliveries and carries them out. Cheap to clone.
#[derive(Clone, Debug)]
pub struct DeliveryRunner {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    http: reqwest::Client,
    config: DeliveryConfig,
    /// For the alert when an endpoint is disabled for failing too long.
    publisher: Option<Publisher>,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    wake: Notify,
}

impl DeliveryRunner {
    pub fn new(pool: PgPool, config: DeliveryConfig, publisher: Option<Publisher>) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                http: http_client(config.timeout),
                permits: Arc::new(Semaphore::new(config.concurrency.max(1))),
                config,
                publisher,
                tasks: TaskTracker::new(),
                wake: Notify::new(),
            }),
        }
    }

    /// Runs due deliveries until `shutdown`, then finishes those in hand. Wakes on
    /// `NOTIFY fulfillment_deliveries`, when a delivery ends, and every `poll_interval`.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = match PgListener::connect_with(&self.inner.pool).await {
            Ok(mut listener) => match listener.listen(deliveries::NOTIFY_CHANNEL).await {
                Ok(()) => Some(listener),
                Err(error) => {
                    tracing::warn!(%error, "cannot LISTEN for deliveries; polling only");
                    None
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot LISTEN for deliveries; polling only");
                None
            }
        };
        'outer: loop {
            loop {
                let permit = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'outer,
                    permit = self.inner.permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break 'outer,
                    },
                };
                match deliveries::claim_next(&self.inner.pool).await {
                    Ok(Some(claimed)) => {
                        let runner = self.clone();
                        self.inner.tasks.spawn(async move {
                            runner.execute_claimed(claimed).await;
                            drop(permit);
                            runner.inner.wake.notify_one();
                        });
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, "cannot claim deliveries");
                        break;
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = self.inner.wake.notified() => {}
                ok = next_notification(&mut listener) => {
                    if !ok {
                        listener = None;
                    }
                }
                _ = tokio::time::sleep(self.inner.config.poll_interval) => {}
            }
        }
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        tracing::info!("delivery runner stopped");
    }

    /// Executes due deliveries one by one until none is due; returns how many ran.
    pub async fn run_until_idle(&self) -> Result<usize, StoreError> {
        let mut ran = 0;
        while let Some(claimed) = deliveries::claim_next(&self.inner.pool).await? {
            self.execute_claimed(claimed).await;
            ran += 1;
        }
        Ok(ran)
    }

    async fn execute_claimed(&self, claimed: Claimed) {
        let row = claimed.row.clone();
        let span = tracing::info_span!(
            "delivery",
            outbox_id = %row.id,
            attempt = row.attempts + 1,
            endpoint_id = tracing::field::Empty,
            event_id = tracing::field::Empty,
            subscription_id = tracing::field::Empty,
        );
        async move {
            if let Err(error) = self.execute(claimed).await {
                tracing::warn!(%error, "cannot settle the delivery; it will run again");
            }
        }
        .instrument(span)
        .await
    }

    async fn execute(&self, claimed: Claimed) -> Result<(), StoreError> {
        let pool = &self.inner.pool;
        let config = &self.inner.config;
        let delivery: Delivery = match serde_json::from_str(claimed.row.effect.get()) {
            Ok(delivery) => delivery,
            Err(error) => {
                let reason = format!("the stored delivery cannot be read: {error}");
                return claimed.bury(&reason, false).await;
            }
        };
        let span = tracing::Span::current();
        span.record("endpoint_id", tracing::field::display(delivery.endpoint_id));
        span.record("event_id", delivery.event_id.as_str());
        span.record(
            "subscription_id",
            tracing::field::display(delivery.subscription_id),
        );
        let endpoint = endpoints::get(pool, delivery.endpoint_id).await?;
        let state = match &endpoint {
            None => EndpointState::Deleted,
            Some(e) if e.status == EndpointStatus::Disabled => EndpointState::Disabled,
            Some(e) => EndpointState::Enabled {
                failing_since: e.failing_since,
            },
        };
        let failed_attempts = u32::try_from(claimed.row.attempts).unwrap_or(0);
        let turn = |answer| DeliveryTurn {
            endpoint: state,
            answer,
            failed_attempts,
            now: OffsetDateTime::now_utc(),
            config,
        };
        let mut next = deliver::step(&turn(None));
        if next == DeliveryStep::Send {
            let endpoint = endpoint
                .as_ref()
                .expect("only an existing endpoint is sent to");
            let body = deliveries::event_body(pool, &delivery.event_id).await?;
            let secrets = endpoints::signing_secrets(pool, delivery.endpoint_id).await?;
            let (Some(body), Some(secrets)) = (body, secrets) else {
                return claimed
                    .bury("the event or the endpoint's secret is gone", false)
                    .await;
            };
            let secrets = match parse_secrets(&secrets) {
                Ok(secrets) => secrets,
                Err(reason) => return claimed.bury(&reason, false).await,
            };
            let secret_refs: Vec<&Secret> = secrets.iter().collect();
            let bytes = serde_json::to_vec(&body).expect("JSON always serializes");
            let sent = send(
                &self.inner.http,
                &endpoint.url,
                &secret_refs,
                &delivery.event_id,
                &bytes,
            )
            .await;
            next = deliver::step(&turn(Some(&sent.answer)));
            let outcome = if next == DeliveryStep::Delivered {
                AttemptOutcome::Delivered
            } else {
                AttemptOutcome::Failed
            };
            deliveries::record_attempt(
                pool,
                &NewAttempt {
                    endpoint_id: delivery.endpoint_id,
                    event_id: &delivery.event_id,
                    outbox_id: Some(claimed.row.id),
                    status: sent.status(),
                    latency_ms: i32::try_from(sent.latency.as_millis()).unwrap_or(i32::MAX),
                    response_head: &sent.head,
                    outcome,
                },
            )
            .await?;
            tracing::info!(
                status = sent.status(),
                latency_ms = sent.latency.as_millis() as u64,
                ?outcome,
                "webhook delivery attempted"
            );
            if outcome == AttemptOutcome::Delivered {
                endpoints::record_success(pool, delivery.endpoint_id).await?;
            } else {
                endpoints::record_failure(pool, delivery.endpoint_id).await?;
            }
        }
        match next {
            DeliveryStep::Send => claimed.bury("the delivery step repeated Send", false).await,
            DeliveryStep::Drop => claimed.complete().await,
            DeliveryStep::Delivered => claimed.complete().await,
            DeliveryStep::RetryAt { at, because } => {
                let after = Duration::try_from(at - OffsetDateTime::now_utc()).unwrap_or_default();
                claimed
                    .reschedule(after, true, Some(&because), &json!({}), false)
                    .await
            }
            DeliveryStep::GiveUp { because } => {
                tracing::warn!(reason = because, "webhook delivery gave up");
                claimed.bury(&because, true).await
            }
            DeliveryStep::DisableEndpoint { because, alert } => {
                endpoints::disable(pool, delivery.endpoint_id, &because).await?;
                if alert {
                    self.alert_disabled(delivery.endpoint_id, &because).await;
                } else {
                    tracing::warn!(reason = because, "webhook endpoint disabled");
                }
                claimed.bury(&because, true).await
            }
        }
    }

    /// Tells the operators an endpoint was disabled: an error log line and an alert event
    /// on the domain exchange (`webhook.endpoint_disabled`).
    async fn alert_disabled(&self, endpoint_id: Uuid, reason: &str) {
        tracing::error!(%endpoint_id, reason, alert = true, "webhook endpoint disabled");
        let Some(publisher) = &self.inner.publisher else {
            return;
        };
        let id = Uuid::now_v7().to_string();
        let body = endpoint_disabled_event(&id, endpoint_id, reason, OffsetDateTime::now_utc());
        let meta = MessageMeta {
            message_id: id.clone(),
            correlation_id: id,
            traceparent: crate::telemetry::current_traceparent(),
            subscription_id: None,
        };
        let bytes = serde_json::to_vec(&body).expect("JSON always serializes");
        if let Err(error) = publisher
            .publish_domain_event(ENDPOINT_DISABLED_TOPIC, &bytes, &meta)
            .await
        {
            tracing::warn!(%error, "cannot publish the endpoint-disabled alert");
        }
    }
}

/// The CloudEvent of the alert.
pub fn endpoint_disabled_event(
    id: &str,
    endpoint_id: Uuid,
    reason: &str,
    time: OffsetDateTime,
) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("urn:fulfillment:webhook-endpoint:{endpoint_id}"),
        "type": format!("com.fulfillment.{ENDPOINT_DISABLED_TOPIC}"),
        "subject": endpoint_id.to_string(),
        "time": time.format(&time::format_description::well_known::Rfc3339).unwrap_or_default(),
        "datacontenttype": "application/json",
        "data": { "endpointId": endpoint_id, "reason": reason },
    })
}

/// The secrets that sign, parsed (current first).
pub fn parse_secrets(stored: &endpoints::SigningSecrets) -> Result<Vec<Secret>, String> {
    let mut secrets = vec![
        Secret::parse(&stored.secret).map_err(|e| format!("the stored secret is invalid: {e}"))?,
    ];
    if let Some(previous) = &stored.previous_secret {
        secrets.push(
            Secret::parse(previous)
                .map_err(|e| format!("the stored previous secret is invalid: {e}"))?,
        );
    }
    Ok(secrets)
}

/// Waits for the next `NOTIFY`; `false` when the listener broke (fall back to polling).
async fn next_notification(listener: &mut Option<PgListener>) -> bool {
    match listener {
        Some(listener) => listener.recv().await.is_ok(),
        None => std::future::pending().await,
    }
}
