//! The operator tools end to end: `fulfillment dlq …`, `fulfillment subscription …` and
//! `fulfillment reconcile`, run as the real binary (and, for the 10,000-message replay, as
//! library calls) against the local PostgreSQL and RabbitMQ and the simulator on port 0.
//! Webhooks the simulator sends reach a tiny receiver that publishes them as the ingress
//! would; switched to "deaf" it answers 200 and drops them, as a lost webhook would be.

mod common;

use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::post;
use common::TestDatabase;
use fulfillment_state_machine::{Event, Snapshot, SubscriptionId};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use marketplace_fulfillment::marketplace::{
    CallContext, MarketplaceClient, RetryPolicy, TokenProvider,
};
use marketplace_fulfillment::ops::dlq::{self, Filter, ReplayOptions};
use marketplace_fulfillment::queue::{
    Broker, InboundMessage, MessageMeta, Publisher, PublisherCommand, Topology,
};
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::simulator::{RunningSimulator, Simulator, SimulatorConfig, Timings};
use marketplace_fulfillment::worker::apply::{self, Apply, ApplyOutcome, EventSource, Expected};
use marketplace_fulfillment::worker::{EffectsConfig, Worker, WorkerConfig, WorkerParts};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const SECRET: &str = "ops-test-secret";
const WAIT: Duration = Duration::from_secs(60);

struct App {
    db: TestDatabase,
    settings: Settings,
    pool: PgPool,
    sim: RunningSimulator,
    client: MarketplaceClient,
    broker: Broker,
    publisher: Publisher,
    workers: Vec<Worker>,
    deaf: Arc<AtomicBool>,
    http: reqwest::Client,
}

impl App {
    async fn start(policy: Value, workers: usize) -> Self {
        let (db, pool) = TestDatabase::migrated().await;
        let mut settings = db.settings.clone();
        settings.policy = serde_json::from_value(policy).expect("a policy");
        let topology = Topology::with_retry_delays(
            &settings.amqp.prefix,
            &[Duration::from_millis(50), Duration::from_millis(100)],
        );
        let broker = Broker::connect_with_topology(&settings.amqp, "ops-test", topology)
            .await
            .expect("RabbitMQ");
        let publisher = broker.publisher().await.unwrap();

        let deaf = Arc::new(AtomicBool::new(false));
        let receiver = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let webhook_url: url::Url = format!("http://{}/webhook", receiver.local_addr().unwrap())
            .parse()
            .unwrap();
        let router = axum::Router::new()
            .route("/webhook", post(receive))
            .with_state((publisher.clone(), deaf.clone()));
        tokio::spawn(async move { axum::serve(receiver, router).await });

        let tenant = Uuid::new_v4();
        let app = Uuid::new_v4();
        let mut config = SimulatorConfig::new(tenant, app);
        config.client_secret = Some(SecretString::from(SECRET));
        config.webhook_url = Some(webhook_url);
        config.timings = Timings {
            // Our ACK comes well inside it; a lost webhook's change is auto-accepted after it.
            ack_window: Duration::from_secs(2),
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
        let mut app = Self {
            db,
            settings,
            pool,
            sim,
            client,
            broker,
            publisher,
            workers: Vec::new(),
            deaf,
            http: reqwest::Client::new(),
        };
        for _ in 0..workers {
            app.start_worker().await;
        }
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
            prefetch: 32,
            consumer_tag: String::new(),
            effects: EffectsConfig::fast(),
            ..WorkerConfig::default()
        };
        let worker = Worker::spawn(parts, config, CancellationToken::new())
            .await
            .expect("worker");
        self.workers.push(worker);
    }

    async fn stop(mut self) {
        for worker in self.workers.drain(..) {
            worker.stop().await.unwrap();
        }
        self.broker.delete_topology().await.unwrap();
        self.broker.close().await;
        // The CLI declares the production retry tiers under the same prefix: remove them too.
        let cli_topology = Broker::connect(&self.settings.amqp, "ops-test-cleanup")
            .await
            .unwrap();
        cli_topology.delete_topology().await.unwrap();
        cli_topology.close().await;
        self.sim.shutdown().await.unwrap();
        drop(self.db);
    }

    async fn idle(&self) {
        for worker in &self.workers {
            worker.wait_until_idle(WAIT).await.unwrap();
        }
    }

    /// Runs `fulfillment ARGS` against this test's database, broker names and simulator.
    async fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.cli_with(args, &[]).await
    }

    async fn cli_with(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let m = &self.settings.marketplace;
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"));
        command
            .args(args)
            .env_remove("FULFILLMENT_CONFIG")
            .env("RUST_LOG", "warn")
            .env("USER", "ops-tester")
            .env("DATABASE_URL", self.settings.database.url.expose())
            .env("AMQP_URL", self.settings.amqp.url.expose())
            .env("FULFILLMENT__AMQP__PREFIX", &self.settings.amqp.prefix)
            .env("MARKETPLACE_API_URL", m.api_url.as_str())
            .env("ENTRA_AUTHORITY_URL", m.entra_authority_url.as_str())
            .env("MARKETPLACE_TENANT_ID", m.tenant_id.unwrap().to_string())
            .env("MARKETPLACE_CLIENT_ID", m.client_id.unwrap().to_string())
            .env("MARKETPLACE_CLIENT_SECRET", SECRET);
        for (key, value) in env {
            command.env(key, value);
        }
        let Output {
            status,
            stdout,
            stderr,
        } = command.output().await.expect("run fulfillment");
        (
            status.code().unwrap_or(-1),
            String::from_utf8_lossy(&stdout).into_owned(),
            String::from_utf8_lossy(&stderr).into_owned(),
        )
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
        self.http
            .get(
                self.sim
                    .base_url()
                    .join(&format!("simulator/subscriptions/{id}"))
                    .unwrap(),
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn set_faults(&self, faults: Value) {
        self.admin(reqwest::Method::PUT, "simulator/faults", faults)
            .await;
    }

    async fn buy(&self, plan: &str, quantity: Option<u32>, auto_activate: bool) -> Value {
        let mut body =
            json!({"offerId": "contoso-analytics", "planId": plan, "autoActivate": auto_activate});
        if let Some(q) = quantity {
            body["quantity"] = json!(q);
        }
        self.admin(reqwest::Method::POST, "simulator/purchases", body)
            .await
    }

    /// Purchases in the simulator and publishes the landing page's `PurchaseResolved`.
    async fn purchase(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let created = self.buy(plan, quantity, false).await;
        let id: Uuid = created["subscriptionId"].as_str().unwrap().parse().unwrap();
        let resolved = self
            .client
            .resolve(&CallContext::random(), created["token"].as_str().unwrap())
            .await
            .unwrap()
            .into_value();
        let resolved_at = OffsetDateTime::now_utc();
        let message = InboundMessage::PurchaseResolved {
            resolved_at,
            subscription: serde_json::to_string(&resolved.subscription.unwrap()).unwrap(),
        };
        self.publish(
            &message,
            &format!("resolve:{id}:{}", resolved_at.unix_timestamp_nanos()),
            Some(id),
        )
        .await;
        id
    }

    async fn publish(
        &self,
        message: &InboundMessage,
        message_id: &str,
        subscription: Option<Uuid>,
    ) {
        let meta = MessageMeta {
            message_id: message_id.to_string(),
            correlation_id: Uuid::new_v4().to_string(),
            traceparent: None,
            subscription_id: subscription,
        };
        self.publisher
            .publish_inbound(message, &meta)
            .await
            .expect("publish");
    }

    async fn customer_action(&self, id: Uuid, body: Value) -> String {
        self.admin(
            reqwest::Method::POST,
            &format!("simulator/subscriptions/{id}/actions"),
            body,
        )
        .await["operationId"]
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn state(&self, id: Uuid) -> Option<(String, Option<String>, Option<i32>)> {
        sqlx::query_as("SELECT state, plan_id, quantity FROM subscriptions WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    async fn wait_for(&self, id: Uuid, state: &str, plan: Option<&str>, quantity: Option<i32>) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.state(id).await;
            if let Some((s, p, q)) = &now
                && s == state
                && (plan.is_none() || p.as_deref() == plan)
                && (quantity.is_none() || *q == quantity)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id} is {now:?}, wanted {state} {plan:?} {quantity:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for_sim(&self, id: Uuid, status: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let view = self.sim_view(id).await["subscription"].clone();
            if view["saasSubscriptionStatus"] == status {
                return;
            }
            assert!(Instant::now() < deadline, "simulator: {view}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn dlq(&self) -> String {
        self.broker.topology().dead_letter_queue()
    }

    async fn queue_len(&self, queue: &str) -> u32 {
        let (connection, channel) = lapin_channel(&self.settings).await;
        let declared = marketplace_fulfillment::queue::dead_letters::inspect_queue(&channel, queue)
            .await
            .unwrap();
        let _ = connection.close(200, "counted".into()).await;
        declared.message_count()
    }

    async fn wait_for_queue_len(&self, queue: &str, len: u32) {
        let deadline = Instant::now() + WAIT;
        loop {
            let now = self.queue_len(queue).await;
            if now == len {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} holds {now}, wanted {len}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn scalar(&self, sql: &str, bind: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .bind(bind)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

async fn receive(
    State((publisher, deaf)): State<(Publisher, Arc<AtomicBool>)>,
    body: Bytes,
) -> axum::http::StatusCode {
    if deaf.load(Ordering::SeqCst) {
        return axum::http::StatusCode::OK;
    }
    let payload = String::from_utf8_lossy(&body).to_string();
    let parsed: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
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

/// Publishes `bodies` straight into the dead-letter queue as the worker's `dead_letter`
/// would leave them (confirmed, persistent).
async fn seed_dead_letters(app: &App, letters: &[(String, Option<Uuid>, Vec<u8>)], reason: &str) {
    let (connection, channel) = lapin_channel(&app.settings).await;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let topology = app.broker.topology();
    let exchange = topology.dead_letter_exchange();
    let key = topology.dead_letter_routing_key();
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    for chunk in letters.chunks(1000) {
        let mut confirms = Vec::with_capacity(chunk.len());
        for (message_id, subscription, body) in chunk {
            let mut headers = FieldTable::default();
            let text = |s: &str| AMQPValue::LongString(LongString::from(s));
            headers.insert("x-attempt".into(), AMQPValue::LongLongInt(2));
            headers.insert("x-failure-reason".into(), text(reason));
            headers.insert("x-last-error".into(), text(reason));
            headers.insert("x-dead-lettered-at".into(), text(&at));
            headers.insert("x-first-failed-at".into(), text(&at));
            if let Some(s) = subscription {
                headers.insert("x-subscription-id".into(), text(&s.to_string()));
            }
            let properties = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into())
                .with_message_id(ShortString::from(message_id.as_str()))
                .with_correlation_id(ShortString::from(message_id.as_str()))
                .with_headers(headers);
            confirms.push(
                channel
                    .basic_publish(
                        exchange.as_str().into(),
                        key.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        body,
                        properties,
                    )
                    .await
                    .unwrap(),
            );
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack());
        }
    }
    let _ = connection.close(200, "seeded".into()).await;
}

fn activate_command(subscription: Uuid, command_id: Uuid) -> Vec<u8> {
    InboundMessage::Command {
        command_id,
        subscription_id: subscription,
        command: PublisherCommand::Activate,
        requested_by: "api".into(),
        requested_at: OffsetDateTime::now_utc(),
    }
    .to_json()
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn dead_letters_from_real_failures_are_listed_filtered_shown_and_replayed_exactly_once() {
    let app = App::start(json!({}), 1).await;
    // Microsoft is down: webhooks about subscriptions we never saw need a GET first (P12),
    // which fails; the retry tiers run out and both land in the dead-letter queue.
    app.set_faults(json!({"share5xx": 1.0})).await;
    let auto = app.buy("silver", None, true).await;
    let a: Uuid = auto["subscriptionId"].as_str().unwrap().parse().unwrap();
    let pending = app.buy("gold", None, false).await;
    let b: Uuid = pending["subscriptionId"].as_str().unwrap().parse().unwrap();
    let op_b = app
        .customer_action(b, json!({"action": "Unsubscribe"}))
        .await;
    // And a message no worker can ever apply.
    let poison = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: r#"{"id":"not-a-uuid","action":"Suspend"}"#.into(),
    };
    app.publish(&poison, "poison-1", None).await;
    app.wait_for_queue_len(&app.dlq(), 3).await;
    let view = app.sim_view(a).await;
    let op_a = view["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["action"] == "Subscribe")
        .and_then(|w| w["operationId"].as_str())
        .unwrap_or_else(|| panic!("no Subscribe webhook: {view}"))
        .to_string();

    // list: all three, exit 1 (failures found); a table a person can read.
    let (code, out, err) = app.cli(&["dlq", "list"]).await;
    assert_eq!(code, 1, "{out}{err}");
    for needle in [
        &op_a,
        &op_b,
        "poison-1",
        "Subscribe",
        "Unsubscribe",
        "REASON",
        "3 dead letter(s)",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    // filters
    let (_, out, _) = app
        .cli(&["dlq", "list", "--json", "--subscription", &a.to_string()])
        .await;
    let found = json_of(&out);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    let letter = &found[0];
    assert_eq!(letter["id"], op_a.as_str());
    assert_eq!(letter["action"], "Subscribe");
    assert_eq!(letter["message_type"], "webhook");
    assert_eq!(
        letter["attempts"], 3,
        "the first try and two retry tiers were made: {letter}"
    );
    assert!(letter["first_failure"].as_str() <= letter["last_failure"].as_str());
    assert!(
        letter["reason"].as_str().unwrap().contains("500"),
        "{letter}"
    );
    let (_, out, _) = app
        .cli(&["dlq", "list", "--json", "--action", "unsubscribe"])
        .await;
    let found = json_of(&out);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["subscription_id"], b.to_string());
    let (_, out, _) = app
        .cli(&[
            "dlq",
            "list",
            "--json",
            "--reason",
            "not a valid marketplace webhook",
        ])
        .await;
    assert_eq!(json_of(&out)[0]["id"], "poison-1");
    let (_, out, _) = app.cli(&["dlq", "list", "--json", "--since", "1h"]).await;
    assert_eq!(json_of(&out).as_array().unwrap().len(), 3);
    let (code, out, _) = app
        .cli(&["dlq", "list", "--json", "--since", "2999-01-01T00:00:00Z"])
        .await;
    assert_eq!((code, json_of(&out)), (0, json!([])));
    let (code, _, err) = app.cli(&["dlq", "list", "--since", "last tuesday"]).await;
    assert_eq!(code, 2, "{err}");

    // show: the whole message, its headers and Microsoft's last answer.
    let (code, out, err) = app.cli(&["dlq", "show", &op_a]).await;
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        "Last Microsoft response",
        "get_subscription",
        "HTTP 500",
        "x-ms-requestid",
        "x-failure-reason",
        "\"action\": \"Subscribe\"",
        &a.to_string(),
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }

    // A dry run changes nothing.
    let (code, out, err) = app.cli(&["dlq", "replay", "--reason", "500"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dry run: 2 of 3"), "{out}");
    app.wait_for_queue_len(&app.dlq(), 3).await;
    app.idle().await;
    assert!(app.state(a).await.is_none() && app.state(b).await.is_none());
    assert_eq!(
        app.scalar("SELECT count(*) FROM operator_actions WHERE $1 <> ''", "x")
            .await,
        0
    );

    // The cause removed, the replay moves both; each is processed exactly once.
    app.set_faults(json!({})).await;
    let (code, out, err) = app
        .cli(&["dlq", "replay", "--reason", "500", "--execute"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2 of 2 selected dead letter(s) replayed"),
        "{out}"
    );
    app.wait_for(a, "Subscribed", Some("silver"), None).await;
    app.wait_for(b, "Unsubscribed", None, None).await;
    app.idle().await;
    app.wait_for_queue_len(&app.dlq(), 1).await; // the poison message stays
    // Decided once: a later copy is only logged as an ignored duplicate (inbox).
    let once = "SELECT count(*) FROM subscription_events WHERE message_id = $1 AND event_kind LIKE 'Webhook%' AND NOT (outcome = 'ignored' AND coalesce(reason, '') LIKE 'duplicate event:%')";
    let duplicates = "SELECT count(*) FROM subscription_events WHERE message_id = $1 AND outcome = 'ignored' AND reason LIKE 'duplicate event:%'";
    assert_eq!(app.scalar(once, &op_a).await, 1);
    assert_eq!(app.scalar(once, &op_b).await, 1);
    assert_eq!(
        app.scalar("SELECT count(*) FROM inbox WHERE message_id = $1", &op_a)
            .await,
        1
    );
    let journal = "SELECT count(*) FROM operator_actions WHERE action = 'dlq_replay' \
                   AND dead_letter_id = $1 AND performed_by LIKE 'cli:ops-tester@%'";
    assert_eq!(app.scalar(journal, &op_a).await, 1);
    assert_eq!(app.scalar(journal, &op_b).await, 1);

    // A second copy of the same webhook (Microsoft redelivers) dead-lettered and replayed:
    // the inbox makes it a duplicate, nothing is decided twice.
    let body: String = sqlx::query_scalar(
        "SELECT details->>'body' FROM operator_actions WHERE dead_letter_id = $1",
    )
    .bind(&op_a)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    seed_dead_letters(
        &app,
        &[(op_a.clone(), Some(a), body.into_bytes())],
        "HTTP 500 again",
    )
    .await;
    let (code, out, err) = app
        .cli(&["dlq", "replay", "--id", &op_a, "--execute"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    app.wait_for_queue_len(&app.dlq(), 1).await;
    app.idle().await;
    assert_eq!(app.scalar(once, &op_a).await, 1);
    assert_eq!(app.scalar(duplicates, &op_a).await, 1);
    assert_eq!(app.scalar(journal, &op_a).await, 2);

    // The timeline shows the replays.
    let (code, out, err) = app.cli(&["subscription", "show", &a.to_string()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("dead letter {op_a} replayed")),
        "{out}"
    );
    assert!(out.contains("by cli:ops-tester@"), "{out}");

    // Purge: refuses without a filter; a dry run first; then gone, and kept in the journal.
    let (code, _, err) = app.cli(&["dlq", "purge", "--execute"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = app.cli(&["dlq", "purge", "--id", "poison-1"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("dry run: 1 of 1"), "{out}");
    app.wait_for_queue_len(&app.dlq(), 1).await;
    let (code, out, err) = app
        .cli(&["dlq", "purge", "--id", "poison-1", "--execute"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    app.wait_for_queue_len(&app.dlq(), 0).await;
    let kept: String = sqlx::query_scalar(
        "SELECT details->>'body' FROM operator_actions WHERE action = 'dlq_purge' AND dead_letter_id = $1",
    )
    .bind("poison-1")
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(kept.contains("not-a-uuid"), "{kept}");
    let (code, out, _) = app.cli(&["dlq", "list"]).await;
    assert_eq!(code, 0, "{out}");
    app.stop().await;
}

#[tokio::test]
async fn ten_thousand_dead_letters_are_replayed_and_each_processed_once() {
    const MESSAGES: usize = 10_000;
    let app = App::start(json!({}), 0).await;
    let subscriptions: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let letters: Vec<(String, Option<Uuid>, Vec<u8>)> = (0..MESSAGES)
        .map(|i| {
            let subscription = subscriptions[i % subscriptions.len()];
            let command_id = Uuid::new_v4();
            (
                command_id.to_string(),
                Some(subscription),
                activate_command(subscription, command_id),
            )
        })
        .collect();
    seed_dead_letters(&app, &letters, "database: connection refused").await;
    assert_eq!(app.queue_len(&app.dlq()).await, MESSAGES as u32);

    let options = |execute| ReplayOptions {
        limit: None,
        rate: None,
        execute,
        actor: "cli:ten-thousand@test".into(),
        batch: dlq::DEFAULT_BATCH,
    };
    let progress = indicatif::ProgressBar::hidden();
    // The dry run holds all 10,000 at once (its window grows) and returns them.
    let dry = dlq::replay(
        &app.broker,
        &app.pool,
        &Filter::default(),
        &options(false),
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.examined, dry.selected.len(), dry.moved),
        (MESSAGES, MESSAGES, 0)
    );
    app.wait_for_queue_len(&app.dlq(), MESSAGES as u32).await;

    let report = dlq::replay(
        &app.broker,
        &app.pool,
        &Filter::default(),
        &options(true),
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(report.moved, MESSAGES, "{:?}", report.not_moved);
    assert!(report.not_moved.is_empty());
    assert_eq!(app.queue_len(&app.dlq()).await, 0, "none left behind");
    assert_eq!(
        app.queue_len(&app.broker.topology().inbound_queue()).await,
        MESSAGES as u32
    );

    let mut app = app;
    for _ in 0..3 {
        app.start_worker().await;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = app
            .scalar("SELECT count(*) FROM inbox WHERE kind = $1", "command")
            .await;
        if done == MESSAGES as i64 {
            break;
        }
        assert!(Instant::now() < deadline, "{done} of {MESSAGES} processed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    app.idle().await;
    let (events, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_id) FROM subscription_events \
         WHERE event_kind = 'ActivationRequested'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((events, distinct), (MESSAGES as i64, MESSAGES as i64));
    let journalled = app
        .scalar(
            "SELECT count(DISTINCT dead_letter_id) FROM operator_actions WHERE action = $1",
            "dlq_replay",
        )
        .await;
    assert_eq!(journalled, MESSAGES as i64);
    assert_eq!(app.queue_len(&app.dlq()).await, 0);
    assert_eq!(
        app.queue_len(&app.broker.topology().inbound_queue()).await,
        0
    );
    app.stop().await;
}

/// Waits until the simulator's operation `op` has left InProgress.
async fn wait_for_operation(app: &App, id: Uuid, op: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = app.sim_view(id).await;
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

/// Waits until the simulator delivered (answered 2xx) a webhook with `action`.
async fn wait_for_delivery(app: &App, id: Uuid, action: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let view = app.sim_view(id).await;
        let delivered = view["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["action"] == action && w["delivered"] == true);
        if delivered {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {action} webhook delivered: {view}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn subscription_show_prints_a_timeline_a_person_can_follow_through_every_action() {
    let app = App::start(json!({}), 1).await;
    let id = app.purchase("per-seat", Some(5)).await;
    app.wait_for(id, "Subscribed", Some("per-seat"), Some(5))
        .await;
    app.idle().await;
    let sid = id.to_string();

    let op = app
        .customer_action(id, json!({"action": "ChangeQuantity", "quantity": 8}))
        .await;
    wait_for_operation(&app, id, &op).await;
    app.wait_for(id, "Subscribed", None, Some(8)).await;
    app.idle().await;

    // Publisher commands through the queue and the machine, as the entitlement API's.
    let (code, out, err) = app
        .cli(&["subscription", "change-quantity", &sid, "10", "--wait"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("change_quantity): succeeded"), "{out}");
    app.wait_for(id, "Subscribed", None, Some(10)).await;
    app.idle().await;
    // Microsoft refuses the next change: --wait waits for its answer and exits 1, and the
    // command's outcome says so (issue #18: it printed "applied" and exited 0).
    app.set_faults(json!({"failCalls": {"updateSubscription": 400}}))
        .await;
    let (code, out, err) = app
        .cli(&[
            "subscription",
            "change-quantity",
            &sid,
            "11",
            "--wait",
            "--json",
        ])
        .await;
    assert_eq!(code, 1, "{out}{err}");
    let outcome: Value = serde_json::from_str(out.trim()).expect("one JSON outcome");
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|why| why.starts_with("refused by Microsoft")),
        "{outcome}"
    );
    let command_id = outcome["commandId"].as_str().unwrap().parse().unwrap();
    let stored = marketplace_fulfillment::commands::outcome_of(&app.pool, command_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.status,
        marketplace_fulfillment::commands::Status::Failed
    );
    app.set_faults(json!({})).await;
    app.wait_for(id, "Subscribed", None, Some(10)).await;
    app.idle().await;
    // Already active: the machine says so, and the exit code says it did nothing.
    let (code, out, _) = app.cli(&["subscription", "activate", &sid, "--wait"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already activated"), "{out}");

    for action in ["Renew", "Suspend", "Reinstate"] {
        let op = app.customer_action(id, json!({"action": action})).await;
        wait_for_operation(&app, id, &op).await;
        let state = if action == "Suspend" {
            "Suspended"
        } else {
            "Subscribed"
        };
        app.wait_for(id, state, None, None).await;
        app.idle().await;
    }
    let op = app
        .customer_action(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    wait_for_operation(&app, id, &op).await;
    app.wait_for(id, "Subscribed", Some("gold"), None).await;
    app.idle().await;
    let (code, out, err) = app
        .cli(&["subscription", "change-plan", &sid, "silver", "--wait"])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    app.wait_for(id, "Subscribed", Some("silver"), None).await;
    app.idle().await;
    let (code, out, err) = app.cli(&["subscription", "cancel", &sid]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queued command"), "{out}");
    app.wait_for(id, "Unsubscribed", None, None).await;
    app.idle().await;

    let (code, out, err) = app.cli(&["subscription", "show", &sid]).await;
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        &format!("Subscription {id}"),
        "state              Unsubscribed",
        "landing page resolved the purchase: PendingFulfillmentStart, plan per-seat, 5 seats",
        ", activate\n",
        "call activate → HTTP",
        "Microsoft confirmed the activation",
        "[PendingFulfillment → Subscribed]",
        "Microsoft webhook ChangeQuantity to 8 seats",
        "ack_operation(Success)",
        "call update_operation → HTTP 200",
        "publisher command: change quantity to 10",
        "Microsoft accepted command",
        "ended Succeeded",
        "Microsoft webhook Renew",
        "[Subscribed → Suspended]",
        "[Suspended → Subscribed]",
        "Microsoft webhook ChangePlan to plan gold",
        "publisher command: change plan to silver",
        "publisher command: cancel",
        "[Subscribed → Unsubscribed]",
        "decision: applied — ",
        "decision: ignored — ",
        "x-ms-requestid ",
        "Changes we asked Microsoft for",
        "publish_domain_event(unsubscribed)",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    // Every row of the event log is in the timeline, in order.
    let rows = app
        .scalar(
            "SELECT count(*) FROM subscription_events WHERE subscription_id::text = $1",
            &sid,
        )
        .await;
    let (_, out, _) = app.cli(&["subscription", "show", &sid, "--json"]).await;
    let timeline = json_of(&out);
    let entries = timeline["entries"].as_array().unwrap();
    assert_eq!(entries.len() as i64, rows);
    let sequences: Vec<i64> = entries
        .iter()
        .filter_map(|e| e["sequence"].as_i64())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");

    let (code, out, _) = app
        .cli(&["subscription", "list", "--state", "Unsubscribed"])
        .await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&sid) && out.contains("1 subscription(s)"),
        "{out}"
    );
    let (_, out, _) = app
        .cli(&["subscription", "list", "--state", "Subscribed", "--json"])
        .await;
    assert_eq!(json_of(&out), json!([]));
    let (code, _, err) = app
        .cli(&["subscription", "list", "--state", "Active"])
        .await;
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = app
        .cli(&["subscription", "show", &Uuid::new_v4().to_string()])
        .await;
    assert_eq!(code, 1, "{out}");
    app.stop().await;
}

#[tokio::test]
async fn reconcile_finds_each_kind_of_drift_and_heals_it_through_the_machine() {
    let app = App::start(json!({}), 1).await;
    // In agreement to begin with.
    let state_drift = app.purchase("silver", None).await;
    let plan_drift = app.purchase("silver", None).await;
    let quantity_drift = app.purchase("per-seat", Some(5)).await;
    for id in [state_drift, plan_drift] {
        app.wait_for(id, "Subscribed", Some("silver"), None).await;
    }
    app.wait_for(quantity_drift, "Subscribed", Some("per-seat"), Some(5))
        .await;
    app.idle().await;
    let (code, out, err) = app.cli(&["reconcile"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no drift"), "{out}");

    // Webhooks lost on the way: Microsoft moves on without us.
    app.deaf.store(true, Ordering::SeqCst);
    let op = app
        .customer_action(state_drift, json!({"action": "Suspend"}))
        .await;
    wait_for_operation(&app, state_drift, &op).await;
    wait_for_delivery(&app, state_drift, "Suspend").await;
    let op = app
        .customer_action(
            plan_drift,
            json!({"action": "ChangePlan", "planId": "gold"}),
        )
        .await;
    wait_for_operation(&app, plan_drift, &op).await; // auto-accepted after the window
    wait_for_delivery(&app, plan_drift, "ChangePlan").await;
    let op = app
        .customer_action(
            quantity_drift,
            json!({"action": "ChangeQuantity", "quantity": 7}),
        )
        .await;
    wait_for_operation(&app, quantity_drift, &op).await;
    wait_for_delivery(&app, quantity_drift, "ChangeQuantity").await;
    let auto = app.buy("silver", None, true).await;
    let missing: Uuid = auto["subscriptionId"].as_str().unwrap().parse().unwrap();
    app.wait_for_sim(missing, "Subscribed").await;
    wait_for_delivery(&app, missing, "Subscribe").await;
    app.deaf.store(false, Ordering::SeqCst);

    // A subscription Microsoft never sold (a forged webhook got through, P24).
    let unknown = Uuid::new_v4();
    let snapshot: Snapshot = serde_json::from_value(json!({
        "status": "Subscribed", "offer_id": "contoso-analytics", "plan_id": "gold",
    }))
    .unwrap();
    let observed = Event::Observed {
        snapshot,
        observed_at: OffsetDateTime::now_utc(),
    };
    apply::apply(
        &app.pool,
        &app.settings.policy,
        &Apply::new(
            SubscriptionId::from(unknown),
            &observed,
            &EventSource::default(),
            OffsetDateTime::now_utc(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(app.state(unknown).await.unwrap().0, "Subscribed");

    // A resolved purchase whose Activate effect died while Microsoft was down: stuck.
    let created = app.buy("gold", None, false).await;
    let stuck: Uuid = created["subscriptionId"].as_str().unwrap().parse().unwrap();
    let resolved = app
        .client
        .resolve(&CallContext::random(), created["token"].as_str().unwrap())
        .await
        .unwrap()
        .into_value();
    app.set_faults(json!({"share5xx": 1.0})).await;
    let resolved_at = OffsetDateTime::now_utc();
    app.publish(
        &InboundMessage::PurchaseResolved {
            resolved_at,
            subscription: serde_json::to_string(&resolved.subscription.unwrap()).unwrap(),
        },
        &format!("resolve:{stuck}:{}", resolved_at.unix_timestamp_nanos()),
        Some(stuck),
    )
    .await;
    let deadline = Instant::now() + WAIT;
    while app
        .scalar(
            "SELECT count(*) FROM outbox WHERE subscription_id::text = $1 AND kind = 'activate' AND status = 'dead'",
            &stuck.to_string(),
        )
        .await
        == 0
    {
        assert!(Instant::now() < deadline, "the Activate effect never died");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.set_faults(json!({})).await;
    app.idle().await;
    assert_eq!(app.state(stuck).await.unwrap().0, "PendingFulfillment");

    // The report: every kind, each on its subscription; exit 1; nothing changed.
    let stuck_now = [("FULFILLMENT__RECONCILE__STUCK_PENDING_AFTER_SECS", "0")];
    let (code, out, err) = app.cli_with(&["reconcile", "--json"], &stuck_now).await;
    assert_eq!(code, 1, "{out}{err}");
    let report = json_of(&out);
    let kinds = |id: Uuid| -> Vec<String> {
        report["drifts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["subscription_id"] == id.to_string())
            .map(|d| {
                d["kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(kinds(state_drift), ["state_mismatch"], "{report}");
    assert_eq!(kinds(plan_drift), ["plan_mismatch"], "{report}");
    assert_eq!(kinds(quantity_drift), ["quantity_mismatch"], "{report}");
    assert_eq!(kinds(missing), ["missing_here"], "{report}");
    assert_eq!(kinds(unknown), ["unknown_to_microsoft"], "{report}");
    assert_eq!(kinds(stuck), ["stuck_pending"], "{report}");
    assert_eq!(report["drifts"].as_array().unwrap().len(), 6, "{report}");
    let (code, out, _) = app.cli_with(&["reconcile"], &stuck_now).await;
    assert_eq!(code, 1);
    for needle in [
        "state mismatch",
        "missing here",
        "unknown to Microsoft",
        "stuck in PendingFulfillment",
        "add --execute",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    assert_eq!(app.state(state_drift).await.unwrap().0, "Subscribed");
    assert!(app.state(missing).await.is_none());

    // Healed through the machine, with event-log entries.
    let (code, out, err) = app.cli_with(&["reconcile", "--execute"], &stuck_now).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("6 healed, 0 left"), "{out}");
    app.wait_for(state_drift, "Suspended", None, None).await;
    app.wait_for(plan_drift, "Subscribed", Some("gold"), None)
        .await;
    app.wait_for(quantity_drift, "Subscribed", None, Some(7))
        .await;
    app.wait_for(missing, "Subscribed", Some("silver"), None)
        .await;
    app.wait_for(unknown, "Unsubscribed", None, None).await;
    app.wait_for(stuck, "Subscribed", Some("gold"), None).await;
    app.wait_for_sim(stuck, "Subscribed").await;
    app.idle().await;
    for id in [
        state_drift,
        plan_drift,
        quantity_drift,
        missing,
        unknown,
        stuck,
    ] {
        let sid = id.to_string();
        let drift_rows = app
            .scalar(
                "SELECT count(*) FROM subscription_events WHERE subscription_id::text = $1 AND event_kind = 'reconcile:drift'",
                &sid,
            )
            .await;
        assert_eq!(drift_rows, 1, "{id}");
        let fed = app
            .scalar(
                "SELECT count(*) FROM subscription_events WHERE subscription_id::text = $1 \
                 AND message_id LIKE 'reconcile:%' AND outcome = 'applied'",
                &sid,
            )
            .await;
        assert!(fed >= 1, "{id}: nothing fed through the machine");
    }
    let (_, out, _) = app.cli(&["subscription", "show", &stuck.to_string()]).await;
    assert!(out.contains("reconciliation: drift"), "{out}");
    assert!(
        out.contains("activation failed: still pending at Microsoft"),
        "{out}"
    );
    let (code, out, err) = app.cli_with(&["reconcile"], &stuck_now).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no drift"), "{out}");

    // Never over an event applied after our side was read: the guarded apply refuses.
    let version: i64 = sqlx::query_scalar("SELECT version FROM subscriptions WHERE id = $1")
        .bind(plan_drift)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let (code, out, err) = app
        .cli(&[
            "subscription",
            "change-plan",
            &plan_drift.to_string(),
            "silver",
            "--wait",
        ])
        .await;
    assert_eq!(code, 0, "{out}{err}");
    let suspended = Event::Observed {
        snapshot: serde_json::from_value(json!({"status": "Suspended"})).unwrap(),
        observed_at: OffsetDateTime::now_utc(),
    };
    let stale = apply::apply(
        &app.pool,
        &app.settings.policy,
        &Apply::new(
            SubscriptionId::from(plan_drift),
            &suspended,
            &EventSource::default(),
            OffsetDateTime::now_utc(),
        )
        .if_unchanged(Expected::Version(version)),
    )
    .await
    .unwrap();
    assert!(matches!(stale, ApplyOutcome::Changed { .. }), "{stale:?}");
    app.wait_for(plan_drift, "Subscribed", Some("silver"), None)
        .await;
    app.idle().await;
    app.stop().await;
}

#[tokio::test]
async fn bench_replay_runs_and_prints_a_json_result() {
    let db = TestDatabase::new();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .args(["bench", "replay", "--messages", "300", "--batch", "50"])
        .env_remove("FULFILLMENT_CONFIG")
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", db.url().expose())
        .env("FULFILLMENT__AMQP__PREFIX", &db.settings.amqp.prefix)
        .output()
        .await
        .expect("run fulfillment bench replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let result = json_of(stdout.lines().last().expect("output"));
    assert_eq!(result["bench"], "replay");
    assert_eq!(result["moved"], 300, "{result}");
    assert_eq!(result["journalled"], 300, "{result}");
    assert_eq!(result["dlq_left"], 0, "{result}");
    for key in ["replay_per_s", "publish_ceiling_per_s", "ratio"] {
        assert!(
            result[key].as_f64().unwrap_or(0.0) > 0.0,
            "{key} in {result}"
        );
    }
}
