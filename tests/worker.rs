//! The worker end to end: real PostgreSQL, RabbitMQ and the simulator on port 0 with fast
//! clocks. Webhooks the simulator sends reach a tiny receiver that publishes them on the
//! inbound queue as the ingress would (no JWT check here: the ingress has its own tests).

mod common;
#[path = "common/event_schemas.rs"]
mod event_schemas;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::TestDatabase;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use marketplace_fulfillment::marketplace::{
    CallContext, MarketplaceClient, RetryPolicy, TokenProvider,
};
use marketplace_fulfillment::queue::{
    Broker, InboundMessage, MessageMeta, Publisher, PublisherCommand, Topology,
};
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::simulator::{RunningSimulator, Simulator, SimulatorConfig, Timings};
use marketplace_fulfillment::worker::{EffectsConfig, Worker, WorkerConfig, WorkerParts};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "worker-test-secret";
const WAIT: Duration = Duration::from_secs(20);

/// Webhook bodies the receiver got, in order.
type Received = Arc<Mutex<Vec<String>>>;

struct App {
    _db: TestDatabase,
    settings: Settings,
    pool: PgPool,
    sim: RunningSimulator,
    client: MarketplaceClient,
    broker: Broker,
    publisher: Publisher,
    worker: Option<Worker>,
    received: Received,
    http: reqwest::Client,
    domain_queue: String,
}

impl App {
    async fn start(policy: Value) -> Self {
        let (db, pool) = TestDatabase::migrated().await;
        let mut settings = db.settings.clone();
        settings.policy = serde_json::from_value(policy).expect("a policy");
        let prefix = settings.amqp.prefix.clone();
        let topology = Topology::with_retry_delays(
            &prefix,
            &[Duration::from_millis(100), Duration::from_millis(200)],
        );
        let broker = Broker::connect_with_topology(&settings.amqp, "worker-test", topology)
            .await
            .expect("RabbitMQ");
        let publisher = broker.publisher().await.unwrap();

        // The receiver: publishes each webhook body as the ingress would.
        let received: Received = Arc::default();
        let receiver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_url: url::Url = format!("http://{}/webhook", receiver.local_addr().unwrap())
            .parse()
            .unwrap();
        let router = axum::Router::new()
            .route("/webhook", post(receive))
            .with_state((publisher.clone(), received.clone()));
        tokio::spawn(async move { axum::serve(receiver, router).await });

        let tenant = Uuid::new_v4();
        let app = Uuid::new_v4();
        let mut config = SimulatorConfig::new(tenant, app);
        config.client_secret = Some(SecretString::from(SECRET));
        config.webhook_url = Some(webhook_url);
        config.timings = Timings {
            // Long enough that an auto-accept cannot pass for our ACK.
            ack_window: Duration::from_secs(5),
            ..Timings::fast()
        };
        let sim = Simulator::start(config, TcpListener::bind("127.0.0.1:0").await.unwrap())
            .await
            .unwrap();
        settings.marketplace.api_url = sim.api_url();
        settings.marketplace.entra_authority_url = sim.authority_url();
        settings.marketplace.tenant_id = Some(tenant);
        settings.marketplace.client_id = Some(app);
        settings.marketplace.client_secret = Some(SecretString::from(SECRET));
        let tokens = TokenProvider::new(&settings.marketplace).unwrap();
        let client = MarketplaceClient::new(&settings.marketplace, tokens)
            .unwrap()
            .with_retry_policy(RetryPolicy {
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
                max_attempts: 2,
                max_retry_after: Duration::from_millis(50),
                give_up_beyond_cap: false,
            });

        let domain_queue = format!("{prefix}{DOMAIN_QUEUE_SUFFIX}");
        bind_domain_queue(&settings, &broker, &domain_queue).await;

        let mut app = Self {
            _db: db,
            settings,
            pool,
            sim,
            client,
            broker,
            publisher,
            worker: None,
            received,
            http: reqwest::Client::new(),
            domain_queue,
        };
        app.start_worker().await;
        app
    }

    async fn start_worker(&mut self) {
        let parts = WorkerParts {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            client: self.client.clone(),
            policy: self.settings.policy.clone(),
            api_url: self.settings.marketplace.api_url.clone(),
        };
        let config = WorkerConfig {
            prefetch: 8,
            consumer_tag: String::new(),
            effects: EffectsConfig::fast(),
            ..WorkerConfig::default()
        };
        let worker = Worker::spawn(parts, config, CancellationToken::new())
            .await
            .expect("worker");
        self.worker = Some(worker);
    }

    async fn stop(mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await.unwrap();
        }
        if queue_exists(&self.settings, &self.domain_queue).await {
            delete_queue(&self.settings, &self.domain_queue).await;
        }
        self.broker.delete_topology().await.unwrap();
        self.broker.close().await;
        self.sim.shutdown().await.unwrap();
    }

    async fn idle(&self) {
        self.worker
            .as_ref()
            .unwrap()
            .wait_until_idle(WAIT)
            .await
            .unwrap();
    }

    async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response = self
            .http
            .request(method, self.sim.base_url().join(path).unwrap())
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{path}: {}",
            response.status()
        );
        response.json().await.unwrap_or(Value::Null)
    }

    async fn sim_view(&self, id: Uuid) -> Value {
        let response = self
            .http
            .get(
                self.sim
                    .base_url()
                    .join(&format!("simulator/subscriptions/{id}"))
                    .unwrap(),
            )
            .send()
            .await
            .unwrap();
        response.json().await.unwrap()
    }

    async fn publish(&self, message: &InboundMessage, message_id: &str, subscription: Uuid) {
        let meta = MessageMeta {
            message_id: message_id.to_string(),
            correlation_id: Uuid::new_v4().to_string(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            subscription_id: Some(subscription),
        };
        self.publisher
            .publish_inbound(message, &meta)
            .await
            .expect("publish");
    }

    /// Purchases in the simulator and resolves the token: the `PurchaseResolved` message
    /// the landing page would publish, with its message id.
    async fn resolve(&self, plan: &str, quantity: Option<u32>) -> (Uuid, InboundMessage, String) {
        let mut body = json!({"offerId": "contoso-analytics", "planId": plan});
        if let Some(q) = quantity {
            body["quantity"] = json!(q);
        }
        let created = self
            .admin(reqwest::Method::POST, "simulator/purchases", body)
            .await;
        let id: Uuid = created["subscriptionId"].as_str().unwrap().parse().unwrap();
        let token = created["token"].as_str().unwrap();
        let resolved = self
            .client
            .resolve(&CallContext::random(), token)
            .await
            .unwrap()
            .into_value();
        let subscription = serde_json::to_string(&resolved.subscription.unwrap()).unwrap();
        let resolved_at = OffsetDateTime::now_utc();
        let message_id = format!("resolve:{id}:{}", resolved_at.unix_timestamp_nanos());
        let message = InboundMessage::PurchaseResolved {
            resolved_at,
            subscription,
        };
        (id, message, message_id)
    }

    /// Purchases, resolves and publishes `PurchaseResolved`.
    async fn purchase(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let (id, message, message_id) = self.resolve(plan, quantity).await;
        self.publish(&message, &message_id, id).await;
        id
    }

    /// Purchases and waits until both sides say Subscribed.
    async fn subscribed(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let id = self.purchase(plan, quantity).await;
        self.wait_for_state(id, "Subscribed").await;
        id
    }

    async fn state(&self, id: Uuid) -> Option<(String, Option<String>, Option<i32>)> {
        sqlx::query_as("SELECT state, plan_id, quantity FROM subscriptions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    async fn wait_for_state(&self, id: Uuid, state: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.state(id).await;
            if now.as_ref().is_some_and(|(s, _, _)| s == state) {
                return;
            }
            assert!(Instant::now() < deadline, "still {now:?}, wanted {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_plan(&self, id: Uuid, plan: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.state(id).await;
            if now.as_ref().and_then(|(_, p, _)| p.as_deref()) == Some(plan) {
                return;
            }
            assert!(Instant::now() < deadline, "still {now:?}, wanted {plan}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the simulator's operation `op` has left InProgress; returns it.
    async fn wait_for_operation(&self, id: Uuid, op: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let view = self.sim_view(id).await;
            let found = view["operations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["id"] == op)
                .cloned();
            if let Some(found) = found.filter(|o| o["status"] != "InProgress") {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "operation {op} still open: {view}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the receiver got a webhook with this operation id; returns its body.
    async fn wait_for_webhook(&self, op: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let found = self
                .received
                .lock()
                .unwrap()
                .iter()
                .find(|b| serde_json::from_str::<Value>(b).unwrap()["id"] == op)
                .cloned();
            if let Some(body) = found {
                return body;
            }
            assert!(Instant::now() < deadline, "no webhook for {op}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn customer_action(&self, id: Uuid, body: Value) -> String {
        let answer = self
            .admin(
                reqwest::Method::POST,
                &format!("simulator/subscriptions/{id}/actions"),
                body,
            )
            .await;
        answer["operationId"].as_str().unwrap().to_string()
    }

    async fn events(&self, id: Uuid) -> Vec<(String, String, Option<String>, Value)> {
        sqlx::query_as(
            "SELECT event_kind, outcome, reason, event FROM subscription_events \
             WHERE subscription_id = $1 ORDER BY sequence",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Publishes a publisher command; returns its id.
    async fn command(&self, id: Uuid, command: PublisherCommand) -> Uuid {
        let command_id = Uuid::new_v4();
        let message = InboundMessage::Command {
            command_id,
            subscription_id: id,
            command,
            requested_by: "api".into(),
            requested_at: OffsetDateTime::now_utc(),
        };
        self.publish(&message, &command_id.to_string(), id).await;
        command_id
    }

    /// Waits until our command's row in `publisher_operations` is final; returns it.
    async fn wait_for_command(&self, command_id: Uuid) -> (String, Option<String>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let row: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT status, last_error FROM publisher_operations WHERE command_id = $1",
            )
            .bind(command_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            if let Some(row) = row
                .as_ref()
                .filter(|(s, _)| s != "Requested" && s != "Accepted")
            {
                return row.clone();
            }
            assert!(
                Instant::now() < deadline,
                "command {command_id} still {row:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn set_faults(&self, faults: Value) {
        self.admin(reqwest::Method::PUT, "simulator/faults", faults)
            .await;
    }
}

async fn receive(
    State((publisher, received)): State<(Publisher, Received)>,
    body: Bytes,
) -> axum::http::StatusCode {
    let payload = String::from_utf8_lossy(&body).to_string();
    let parsed: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
    received.lock().unwrap().push(payload.clone());
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload,
    };
    let meta = MessageMeta {
        message_id: parsed["id"].as_str().unwrap_or_default().to_string(),
        correlation_id: Uuid::new_v4().to_string(),
        traceparent: None,
        subscription_id: parsed["subscriptionId"]
            .as_str()
            .and_then(|s| s.parse().ok()),
    };
    match publisher.publish_inbound(&message, &meta).await {
        Ok(()) => axum::http::StatusCode::OK,
        Err(_) => axum::http::StatusCode::SERVICE_UNAVAILABLE,
    }
}

async fn lapin_channel(settings: &Settings) -> (Connection, lapin::Channel) {
    let connection =
        Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default())
            .await
            .unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}

async fn bind_domain_queue(settings: &Settings, broker: &Broker, queue: &str) {
    let (connection, channel) = lapin_channel(settings).await;
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.into(),
            broker.topology().domain_exchange().as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "bound".into()).await;
}

/// The queue each test binds to the domain exchange; whatever is taken off it is checked
/// against the domain-event schemas of docs/events/.
const DOMAIN_QUEUE_SUFFIX: &str = ".test-domain-events";

/// Every message in `queue` right now (taken off the queue), as JSON bodies with headers.
/// Domain events are checked against their schemas (docs/events.md).
async fn drain(settings: &Settings, queue: &str) -> Vec<(Value, FieldTable)> {
    let all = take_all(settings, queue).await;
    if queue.ends_with(DOMAIN_QUEUE_SUFFIX) {
        event_schemas::Contract::load().assert_valid(all.iter().map(|(body, _)| body));
    }
    all
}

async fn take_all(settings: &Settings, queue: &str) -> Vec<(Value, FieldTable)> {
    let (connection, channel) = lapin_channel(settings).await;
    let mut all = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body = serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
        let headers = message
            .delivery
            .properties
            .headers()
            .clone()
            .unwrap_or_default();
        all.push((body, headers));
    }
    let _ = connection.close(200, "drained".into()).await;
    all
}

async fn queue_exists(settings: &Settings, queue: &str) -> bool {
    let (connection, channel) = lapin_channel(settings).await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let exists = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .is_ok();
    let _ = connection.close(200, "checked".into()).await;
    exists
}

/// Deletes `queue`; the domain-event queue is drained first, so every event a test
/// published is checked against its schema.
async fn delete_queue(settings: &Settings, queue: &str) {
    if queue.ends_with(DOMAIN_QUEUE_SUFFIX) {
        drain(settings, queue).await;
    }
    let (connection, channel) = lapin_channel(settings).await;
    let _ = channel.queue_delete(queue.into(), Default::default()).await;
    let _ = connection.close(200, "deleted".into()).await;
}

fn header(headers: &FieldTable, key: &str) -> Option<String> {
    headers.inner().get(key).map(|v| match v {
        lapin::types::AMQPValue::LongString(s) => s.to_string(),
        other => format!("{other:?}"),
    })
}

#[tokio::test]
async fn a_resolved_purchase_is_activated_exactly_once_and_announced() {
    let app = App::start(json!({})).await;
    let id = app.subscribed("silver", None).await;
    app.idle().await;

    let view = app.sim_view(id).await;
    assert_eq!(view["subscription"]["saasSubscriptionStatus"], "Subscribed");
    let events = app.events(id).await;
    let activations = events
        .iter()
        .filter(|(kind, _, _, event)| {
            kind == "effect:activate"
                && event["calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["call"] == "activate")
        })
        .count();
    assert_eq!(activations, 1, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|(kind, outcome, _, _)| kind == "ActivationConfirmed" && outcome == "applied"),
        "{events:#?}"
    );
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE subscription_id = $1 AND status <> 'done'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(done, 0);

    let published = drain(&app.settings, &app.domain_queue).await;
    let activated: Vec<_> = published
        .iter()
        .filter(|(ce, _)| ce["type"] == "com.fulfillment.subscription.activated")
        .collect();
    assert_eq!(activated.len(), 1, "{published:#?}");
    let ce = &activated[0].0;
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["subject"], id.to_string());
    assert_eq!(ce["data"]["state"], "Subscribed");
    assert_eq!(ce["data"]["planId"], "silver");
    let log_id: Uuid = ce["id"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let in_log: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM subscription_events WHERE id = $1 AND event_kind = 'ActivationConfirmed')",
    )
    .bind(log_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(in_log, "the CloudEvent id is the event-log id");
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

#[tokio::test]
async fn customer_changes_are_acknowledged_inside_the_window_or_refused_by_policy() {
    let app = App::start(json!({"seats": {"max": 10}})).await;
    let flat = app.subscribed("silver", None).await;
    let seats = app.subscribed("per-seat", Some(5)).await;
    app.idle().await;

    let started = Instant::now();
    let op = app
        .customer_action(flat, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let operation = app.wait_for_operation(flat, &op).await;
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    assert_eq!(
        operation["resolution"], "acknowledged Success",
        "{operation}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    app.wait_for_plan(flat, "gold").await;
    app.idle().await;
    let view = app.sim_view(flat).await;
    assert_eq!(view["subscription"]["planId"], "gold");
    let acks: Vec<_> = app
        .events(flat)
        .await
        .into_iter()
        .filter(|(kind, _, _, _)| kind == "effect:ack_operation")
        .collect();
    assert_eq!(acks.len(), 1, "{acks:#?}");
    let ms = acks[0].3["webhook_to_ack_ms"].as_i64().expect("measured");
    assert!((0..5_000).contains(&ms), "webhook to ACK took {ms} ms");
    let received_at: Option<OffsetDateTime> = sqlx::query_scalar(
        "SELECT received_at FROM subscription_events WHERE subscription_id = $1 \
         AND event_kind = 'WebhookChangePlan'",
    )
    .bind(flat)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(received_at.is_some());

    let op = app
        .customer_action(seats, json!({"action": "ChangeQuantity", "quantity": 20}))
        .await;
    let operation = app.wait_for_operation(seats, &op).await;
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_ne!(operation["resolution"], "auto-accepted", "{operation}");
    app.idle().await;
    let view = app.sim_view(seats).await;
    assert_eq!(view["subscription"]["quantity"], 5);
    let (_, _, quantity) = app.state(seats).await.unwrap();
    assert_eq!(quantity, Some(5));
    assert!(
        app.events(seats)
            .await
            .iter()
            .any(|(kind, outcome, _, _)| kind == "WebhookChangeQuantity" && outcome == "rejected")
    );
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

#[tokio::test]
async fn a_webhook_published_twice_is_decided_and_acknowledged_once() {
    let app = App::start(json!({})).await;
    let id = app.subscribed("silver", None).await;
    app.idle().await;
    let op = app
        .customer_action(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let body = app.wait_for_webhook(&op).await;
    app.wait_for_operation(id, &op).await;
    app.idle().await;
    // The same message again, as a redelivery would bring it.
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: body,
    };
    app.publish(&message, &op, id).await;
    app.idle().await;

    let events = app.events(id).await;
    let decisions = events
        .iter()
        .filter(|(kind, outcome, _, _)| kind == "WebhookChangePlan" && outcome == "applied")
        .count();
    assert_eq!(decisions, 1, "{events:#?}");
    // The copy is in the event log, ignored as a duplicate.
    let copies = events
        .iter()
        .filter(|(kind, outcome, reason, _)| {
            kind == "WebhookChangePlan"
                && outcome == "ignored"
                && reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("duplicate event"))
        })
        .count();
    assert_eq!(copies, 1, "{events:#?}");
    let acks = events
        .iter()
        .filter(|(kind, _, _, _)| kind == "effect:ack_operation")
        .count();
    assert_eq!(acks, 1, "{events:#?}");
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = $1")
        .bind(&op)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 1);
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

#[tokio::test]
async fn a_publisher_plan_change_is_requested_polled_and_applied_on_both_sides() {
    let app = App::start(json!({})).await;
    let id = app.subscribed("silver", None).await;
    app.idle().await;
    let command_id = Uuid::new_v4();
    let command = InboundMessage::Command {
        command_id,
        subscription_id: id,
        command: PublisherCommand::ChangePlan {
            plan_id: "gold".into(),
        },
        requested_by: "api".into(),
        requested_at: OffsetDateTime::now_utc(),
    };
    app.publish(&command, &command_id.to_string(), id).await;
    app.wait_for_plan(id, "gold").await;
    app.idle().await;

    let view = app.sim_view(id).await;
    assert_eq!(view["subscription"]["planId"], "gold");
    let (status, operation_id): (String, Option<Uuid>) = sqlx::query_as(
        "SELECT status, operation_id FROM publisher_operations WHERE command_id = $1",
    )
    .bind(command_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "Succeeded");
    let operation_id = operation_id.expect("the operation id is tracked");
    let ops = view["operations"].as_array().unwrap();
    assert!(
        ops.iter()
            .any(|o| o["id"] == operation_id.to_string() && o["status"] == "Succeeded"),
        "{view}"
    );
    let kinds: Vec<String> = app.events(id).await.into_iter().map(|e| e.0).collect();
    for expected in [
        "PublisherChangePlan",
        "effect:request_plan_change",
        "PublisherOperationAccepted",
        "effect:poll_operation",
        "OperationResult",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} missing: {kinds:?}"
        );
    }
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

#[tokio::test]
async fn effects_outlast_transient_faults_and_permanent_failures_end_dead_with_the_reason() {
    let app = App::start(json!({})).await;
    let (id, message, message_id) = app.resolve("silver", None).await;
    app.set_faults(json!({"share5xx": 0.5, "share429": 0.3, "retryAfterSecs": 0, "seed": 7}))
        .await;
    app.publish(&message, &message_id, id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.set_faults(json!({})).await;
    app.wait_for_state(id, "Subscribed").await;
    app.idle().await;
    let retried: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM subscription_events WHERE subscription_id = $1 \
         AND outcome = 'recorded' AND reason LIKE '%failed:%'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(
        retried > 0,
        "the faults made at least one effect attempt fail"
    );
    let view = app.sim_view(id).await;
    assert_eq!(view["subscription"]["saasSubscriptionStatus"], "Subscribed");

    // A forged ChangePlan (P24) for an operation Microsoft never created: the ACK fails
    // for good (404/400) and the effect is dead with Microsoft's answer.
    let fake_op = Uuid::new_v4();
    let payload = json!({
        "id": fake_op, "activityId": Uuid::new_v4(), "subscriptionId": id,
        "offerId": "contoso-analytics", "publisherId": "contoso", "planId": "gold",
        "action": "ChangePlan", "status": "InProgress", "operationRequestSource": "Azure",
        "timeStamp": "2099-01-01T00:00:00Z",
    })
    .to_string();
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload,
    };
    app.publish(&message, &fake_op.to_string(), id).await;
    let deadline = Instant::now() + WAIT;
    let (status, last_error) = loop {
        let row: Option<(String, Option<String>)> = sqlx::query_as(
            "SELECT status, last_error FROM outbox WHERE subscription_id = $1 \
             AND kind = 'ack_operation'",
        )
        .bind(id)
        .fetch_optional(&app.pool)
        .await
        .unwrap();
        if let Some(row) = row.filter(|(s, _)| s != "pending") {
            break row;
        }
        assert!(Instant::now() < deadline, "the ACK row never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status, "dead");
    let last_error = last_error.unwrap();
    assert!(last_error.contains("update_operation"), "{last_error}");
    assert!(
        app.events(id)
            .await
            .iter()
            .any(|(kind, outcome, reason, _)| {
                kind == "effect:ack_operation"
                    && outcome == "recorded"
                    && reason.as_deref().is_some_and(|r| r.starts_with("dead:"))
            }),
        "the death is in the event log"
    );
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_the_reason() {
    let app = App::start(json!({})).await;
    let id = Uuid::new_v4();
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: r#"{"id":"not-a-uuid","action":"Suspend"}"#.into(),
    };
    app.publish(&message, "poison-1", id).await;
    let dlq = app.broker.topology().dead_letter_queue();
    let deadline = Instant::now() + WAIT;
    let dead = loop {
        let got = drain(&app.settings, &dlq).await;
        if !got.is_empty() {
            break got;
        }
        assert!(Instant::now() < deadline, "nothing dead-lettered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead.len(), 1);
    let reason = header(&dead[0].1, "x-failure-reason").expect("a reason");
    assert!(
        reason.contains("not a valid Marketplace webhook"),
        "{reason}"
    );
    let known: i64 = sqlx::query_scalar("SELECT count(*) FROM subscription_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(known, 0);
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

/// §15.2: Microsoft carries a PATCH out and its 202 is lost on the way back. The runner
/// follows the subscription instead of counting the repeat's 400 "locked" as a refusal.
#[tokio::test]
async fn a_plan_change_whose_202_is_lost_ends_succeeded_as_microsoft_carried_it_out() {
    let app = App::start(json!({})).await;
    let id = app.subscribed("silver", None).await;
    app.idle().await;
    drain(&app.settings, &app.domain_queue).await;
    app.set_faults(json!({"loseResponses": {"updateSubscription": 1}}))
        .await;
    let command_id = app
        .command(
            id,
            PublisherCommand::ChangePlan {
                plan_id: "gold".into(),
            },
        )
        .await;

    let (status, last_error) = app.wait_for_command(command_id).await;
    app.idle().await;
    assert_eq!(status, "Succeeded", "{last_error:?}");
    assert_lost_answer_was_followed(&app, id).await;
    let view = app.sim_view(id).await;
    assert_eq!(view["subscription"]["planId"], "gold");
    let (state, plan, _) = app.state(id).await.unwrap();
    assert_eq!(
        (state.as_str(), plan.as_deref()),
        ("Subscribed", Some("gold"))
    );
    let announced = announced(&app).await;
    let changes = announced.iter().filter(|t| t.ends_with("plan_changed"));
    assert_eq!(changes.count(), 1, "announced once: {announced:?}");
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

/// §15.2: the same for DELETE: Microsoft cancels, the 202 is lost, the command succeeds.
#[tokio::test]
async fn a_cancellation_whose_202_is_lost_ends_succeeded_as_microsoft_carried_it_out() {
    let app = App::start(json!({})).await;
    let id = app.subscribed("silver", None).await;
    app.idle().await;
    drain(&app.settings, &app.domain_queue).await;
    app.set_faults(json!({"loseResponses": {"deleteSubscription": 1}}))
        .await;
    let command_id = app.command(id, PublisherCommand::Cancel).await;

    let (status, last_error) = app.wait_for_command(command_id).await;
    app.idle().await;
    assert_eq!(status, "Succeeded", "{last_error:?}");
    assert_lost_answer_was_followed(&app, id).await;
    let view = app.sim_view(id).await;
    assert_eq!(
        view["subscription"]["saasSubscriptionStatus"],
        "Unsubscribed"
    );
    app.wait_for_state(id, "Unsubscribed").await;
    let announced = announced(&app).await;
    let ends = announced
        .iter()
        .filter(|t| t.ends_with("subscription.unsubscribed"));
    assert_eq!(ends.count(), 1, "announced once: {announced:?}");
    delete_queue(&app.settings, &app.domain_queue).await;
    app.stop().await;
}

/// The fault fired (the answer was lost), and nothing counted it as Microsoft's refusal.
async fn assert_lost_answer_was_followed(app: &App, id: Uuid) {
    let faults = app
        .admin(reqwest::Method::GET, "simulator/faults", Value::Null)
        .await;
    assert_eq!(
        faults["loseResponses"]
            .as_object()
            .unwrap()
            .values()
            .map(|left| left.as_u64().unwrap())
            .sum::<u64>(),
        0,
        "the answer was lost: {faults}"
    );
    let events = app.events(id).await;
    assert!(
        events
            .iter()
            .any(|(_, outcome, reason, _)| outcome == "recorded"
                && reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("outcome unknown"))),
        "the lost answer is in the event log: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|(kind, ..)| kind == "PublisherOperationRefused"),
        "{events:#?}"
    );
}

/// The CloudEvents types announced to the ISV since the last drain; never
/// `publisher_operation_failed` here.
async fn announced(app: &App) -> Vec<String> {
    let types: Vec<String> = drain(&app.settings, &app.domain_queue)
        .await
        .into_iter()
        .map(|(body, _)| body["type"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        !types
            .iter()
            .any(|t| t.ends_with("publisher_operation_failed")),
        "{types:?}"
    );
    types
}
