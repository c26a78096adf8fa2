//! The one test world: the whole stack for system tests, wired as in production. The
//! simulator on port 0 sends signed webhooks through a tap (which records them, and can
//! turn deaf to lose them) to the real ingress (`Application`), which publishes them to
//! RabbitMQ; workers (in-process, or `fulfillment work` child processes) apply them to a
//! fresh PostgreSQL database and call the simulator back. Every test gets its own database
//! and RabbitMQ prefix; both are removed when the [`Stack`] is dropped, also when the test
//! panics, and child processes are killed. Domain events are collected on a queue of the
//! test's own and checked against their schemas (docs/events/).
//!
//! Waiting is by condition, never by a bare sleep: [`Stack::run_until_idle`] returns once
//! the queues, the outbox, the workers and the simulator's deliveries are all at rest;
//! [`Stack::wait_for`] and its named forms poll one condition with a deadline.
//!
//! ```ignore
//! let stack = Stack::start(Options::with_policy(json!({"seats": {"max": 10}}))).await;
//! let id = stack.subscribed("silver", None).await;        // landing page, activation
//! let op = stack.act(id, json!({"action": "ChangePlan", "planId": "gold"})).await;
//! stack.wait_for_operation(id, &op).await;
//! stack.run_until_idle().await;
//! assert!(stack.domain_event_types().await.iter().any(|t| t.ends_with("plan_changed")));
//! stack.finish().await;
//! ```
//!
//! The same world without a worker serves ingress tests (`in_process_worker: false`,
//! [`Stack::post_webhook`], [`Stack::api`], [`Stack::restart_ingress`] for a customised
//! verifier); messages can be published as the ingress would ([`Stack::publish`],
//! [`Stack::purchase_resolved`], [`Stack::command`]); [`Stack::cli`] runs the binary
//! against the stack and [`Stack::spawn_worker_process`] runs `fulfillment work`.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/event_schemas.rs"]
pub mod event_schemas;
mod tap;

#[allow(unused_imports)]
pub use common::{TestDatabase, test_settings};

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fulfillment_state_machine::NoticePolicy;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use marketplace_fulfillment::http::{AppState, Application, router};
use marketplace_fulfillment::marketplace::{
    CallContext, MarketplaceClient, RetryPolicy, TokenProvider,
};
use marketplace_fulfillment::queue::{
    Broker, InboundMessage, MessageMeta, Publisher, PublisherCommand, Topology, dead_letters,
};
use marketplace_fulfillment::settings::{AmqpSettings, Settings};
use marketplace_fulfillment::simulator::customer::ScriptedCustomer;
use marketplace_fulfillment::simulator::{RunningSimulator, Simulator, SimulatorConfig, Timings};
use marketplace_fulfillment::worker::{
    EffectsConfig, MetricsListener, ProtocolConfig, Worker, WorkerConfig, WorkerParts,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

pub const CLIENT_SECRET: &str = "stack-test-secret";
pub const API_KEY: &str = "stack-test-key";

/// How long one condition may take to come true. Generous: the machine is shared.
pub const WAIT: Duration = Duration::from_secs(60);

/// How a stack is started.
#[derive(Debug, Clone)]
pub struct Options {
    /// The machine's policy (JSON of `[policy]`).
    pub policy: Value,
    pub timings: Timings,
    /// Run a worker inside the test process (else start `fulfillment work` processes).
    pub in_process_worker: bool,
    /// The in-process worker's effect clocks and budget.
    pub effects: EffectsConfig,
    /// Last changes to the simulator's configuration (catalogue, page sizes, link host).
    pub simulator: fn(&mut SimulatorConfig),
    /// When lifecycle notices are due (a compressed day to match the simulator's).
    pub notices: NoticePolicy,
    /// Retry tiers of the in-process workers' broker (`None`: production's).
    pub retry_delays: Option<Vec<Duration>>,
    /// Deliveries an in-process worker holds at once.
    pub prefetch: u16,
    /// Variables on top of the environment the settings are read from (an empty value
    /// removes one), e.g. `("ACTIVATION_MODE", "manual")`.
    pub env: Vec<(&'static str, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            policy: json!({}),
            timings: Timings {
                // Long enough that Microsoft's auto-accept cannot pass for our ACK.
                ack_window: Duration::from_secs(8),
                ..Timings::fast()
            },
            in_process_worker: true,
            effects: EffectsConfig {
                concurrency: 2,
                ..EffectsConfig::fast()
            },
            simulator: |_| {},
            notices: NoticePolicy::default(),
            retry_delays: None,
            prefetch: 8,
            env: Vec::new(),
        }
    }
}

impl Options {
    /// The default stack with this machine policy (JSON of `[policy]`).
    pub fn with_policy(policy: Value) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }
}

/// The simulator's fast clocks with Microsoft's ACK window set to `ack_window`.
pub fn fast_timings(ack_window: Duration) -> Timings {
    Timings {
        ack_window,
        ..Timings::fast()
    }
}

/// Fast effect clocks with a large attempt budget (for faults that last a while).
pub fn patient_effects() -> EffectsConfig {
    EffectsConfig {
        concurrency: 2,
        protocol: ProtocolConfig {
            max_attempts: 50,
            ..ProtocolConfig::fast()
        },
        ..EffectsConfig::fast()
    }
}

/// State, plan and seats as one side sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub state: String,
    pub plan: Option<String>,
    pub quantity: Option<i64>,
}

/// One row of the event log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct LogRow {
    pub sequence: i64,
    pub event_kind: String,
    pub outcome: String,
    pub reason: Option<String>,
    pub message_id: Option<String>,
    pub event_key: String,
    pub event: Value,
}

pub struct Stack {
    pub settings: Settings,
    pub pool: PgPool,
    pub sim: RunningSimulator,
    pub ingress: SocketAddr,
    pub http: reqwest::Client,
    /// The first in-process worker.
    pub worker: Option<Worker>,
    /// In-process workers started after the first.
    pub more_workers: Vec<Worker>,
    /// The in-process workers' broker (also used to read the queues).
    pub broker: Broker,
    /// Publishes on the inbound queue as the ingress and the landing page do.
    pub publisher: Publisher,
    /// A Marketplace client on the simulator, with the workers' fast retry policy.
    pub client: MarketplaceClient,
    /// Bound to the domain exchange: every domain event the test's workers publish.
    pub domain_queue: String,
    /// What `fulfillment work` processes need in their environment.
    pub process_env: Vec<(String, String)>,
    tap: tap::Tap,
    effects: EffectsConfig,
    prefetch: u16,
    /// Stops the ingress.
    shutdown: CancellationToken,
    /// Stops what else the stack serves (the worker's listener).
    background: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _topology: TopologyGuard,
    _db: TestDatabase,
}

impl Stack {
    pub async fn start(options: Options) -> Stack {
        let (db, pool) = TestDatabase::migrated().await;
        let domain_queue = format!("{}.test-domain-events", db.settings.amqp.prefix);
        let topology = TopologyGuard {
            amqp: db.settings.amqp.clone(),
            retry_delays: options.retry_delays.clone(),
            domain_queue: domain_queue.clone(),
        };
        let sim_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let sim_base: Url = format!("http://{}/", sim_listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let tenant = Uuid::new_v4();
        let client_id = Uuid::new_v4();
        let mut process_env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), db.url().expose().to_string()),
            ("AMQP_URL".into(), db.settings.amqp.url.expose().to_string()),
            (
                "FULFILLMENT__AMQP__PREFIX".into(),
                db.settings.amqp.prefix.clone(),
            ),
            (
                "MARKETPLACE_API_URL".into(),
                sim_base.join("api").unwrap().to_string(),
            ),
            ("ENTRA_AUTHORITY_URL".into(), sim_base.to_string()),
            ("MARKETPLACE_TENANT_ID".into(), tenant.to_string()),
            ("MARKETPLACE_CLIENT_ID".into(), client_id.to_string()),
            ("MARKETPLACE_CLIENT_SECRET".into(), CLIENT_SECRET.into()),
        ];
        let mut env: HashMap<String, String> = std::env::vars().collect();
        env.remove("FULFILLMENT_CONFIG");
        env.extend(process_env.iter().cloned());
        env.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
        env.insert("ENTITLEMENT_API_KEY".into(), API_KEY.into());
        for (key, value) in &options.env {
            match value.is_empty() {
                true => env.remove(*key),
                false => env.insert(key.to_string(), value.clone()),
            };
        }
        let mut settings = Settings::from_sources(None, &env).expect("stack settings");
        if options.policy != json!({}) {
            settings.policy = serde_json::from_value(options.policy).expect("a policy");
        }
        settings.policy.notices = options.notices.clone();
        // Small pools: the PostgreSQL server is shared by every test running at once.
        settings.database.max_connections = 6;
        // Millisecond clocks for worker processes, through the [worker] settings.
        for (key, value) in [
            ("FULFILLMENT__DATABASE__MAX_CONNECTIONS", "6"),
            ("FULFILLMENT__WORKER__PREFETCH", "8"),
            ("FULFILLMENT__WORKER__EFFECT_CONCURRENCY", "2"),
            ("FULFILLMENT__WORKER__POLL_INTERVAL_MS", "100"),
            ("FULFILLMENT__WORKER__BACKOFF_BASE_MS", "50"),
            ("FULFILLMENT__WORKER__BACKOFF_MAX_MS", "500"),
            ("FULFILLMENT__WORKER__OPERATION_POLL_INTERVAL_MS", "100"),
            ("FULFILLMENT__WORKER__ACTIVATION_CHECK_INTERVAL_MS", "100"),
        ] {
            process_env.push((key.into(), value.into()));
        }
        let notice_days: Vec<String> = options
            .notices
            .term_ending_days
            .iter()
            .map(u32::to_string)
            .collect();
        process_env.push((
            "FULFILLMENT__WORKER__TERM_ENDING_NOTICE_DAYS".into(),
            notice_days.join(","),
        ));
        process_env.push((
            "FULFILLMENT__WORKER__NOTICE_DAY_MS".into(),
            options.notices.day.as_millis().to_string(),
        ));

        let application = Application::build(settings.clone())
            .await
            .expect("build the ingress");
        let ingress = application.local_addr();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(application.run_until_stopped(shutdown.clone()));
        let tap = tap::Tap::start(format!("http://{ingress}/webhook").parse().unwrap()).await;

        let mut config = SimulatorConfig::new(tenant, client_id);
        config.client_secret = Some(SecretString::from(CLIENT_SECRET));
        config.webhook_url = Some(tap.url());
        config.landing_page_url = Some(format!("http://{ingress}/landing").parse().unwrap());
        config.timings = options.timings;
        (options.simulator)(&mut config);
        let sim = Simulator::start(config, sim_listener)
            .await
            .expect("start the simulator");

        let tiers = match &options.retry_delays {
            Some(delays) => Topology::with_retry_delays(&settings.amqp.prefix, delays),
            None => Topology::new(&settings.amqp.prefix),
        };
        let broker = Broker::connect_with_topology(&settings.amqp, "stack-test", tiers)
            .await
            .expect("RabbitMQ");
        let publisher = broker.publisher().await.expect("a publisher");
        bind_queue(
            &settings,
            &domain_queue,
            &broker.topology().domain_exchange(),
        )
        .await;
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
        let mut stack = Stack {
            settings,
            pool,
            sim,
            ingress,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
            worker: None,
            more_workers: Vec::new(),
            broker,
            publisher,
            client,
            domain_queue,
            process_env,
            tap,
            effects: options.effects,
            prefetch: options.prefetch,
            shutdown,
            background: CancellationToken::new(),
            server: Some(server),
            _topology: topology,
            _db: db,
        };
        if options.in_process_worker {
            stack.start_worker().await;
        }
        stack
    }

    /// Starts an in-process worker (the first is [`Stack::worker`], later ones
    /// [`Stack::more_workers`]): fast effect clocks, a fast client retry policy.
    pub async fn start_worker(&mut self) {
        let parts = WorkerParts {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            client: self.client.clone(),
            policy: self.settings.policy.clone(),
            api_url: self.settings.marketplace.api_url.clone(),
        };
        let config = WorkerConfig {
            prefetch: self.prefetch,
            consumer_tag: String::new(),
            effects: self.effects.clone(),
            ..WorkerConfig::default()
        };
        let worker = Worker::spawn(parts, config, CancellationToken::new())
            .await
            .expect("worker");
        if self.worker.is_none() {
            self.worker = Some(worker);
        } else {
            self.more_workers.push(worker);
        }
    }

    /// Stops the in-process workers (their messages wait in the queue).
    pub async fn stop_workers(&mut self) {
        let workers = self
            .worker
            .take()
            .into_iter()
            .chain(self.more_workers.drain(..));
        for worker in workers {
            worker.stop().await.expect("the worker stops");
        }
    }

    /// Serves the worker's listener (`/metrics`, `/healthz`, `/readyz`) on port 0 until
    /// the stack finishes; returns its address.
    pub async fn serve_worker_metrics(&self) -> SocketAddr {
        let localhost = "127.0.0.1:0".parse().unwrap();
        let listener = MetricsListener::bind(localhost, self.pool.clone(), self.broker.clone())
            .await
            .expect("the worker's listener");
        let address = listener.local_addr();
        tokio::spawn(listener.run_until_stopped(self.background.clone()));
        address
    }

    /// Every in-process worker.
    fn workers(&self) -> impl Iterator<Item = &Worker> {
        self.worker.iter().chain(&self.more_workers)
    }

    /// Stops the workers, the ingress and the simulator and checks the domain events left
    /// on the test's queue against their schemas; the guards then delete the queues and
    /// drop the database.
    pub async fn finish(mut self) {
        self.stop_workers().await;
        self.domain_events().await;
        self.shutdown.cancel();
        self.background.cancel();
        if let Some(server) = self.server.take() {
            let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
        }
        self.broker.close().await;
        let _ = self.sim.shutdown().await;
        self.pool.close().await;
    }

    // ---- the simulator (Microsoft and the customer) -------------------------------------

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let response = self
            .http
            .request(method, self.sim.base_url().join(path).unwrap())
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "{path}: {status} {answer}");
        answer
    }

    pub async fn set_faults(&self, faults: Value) {
        self.admin(reqwest::Method::PUT, "simulator/faults", faults)
            .await;
    }

    /// A purchase with every field of `POST /simulator/purchases` (`offerId` defaults to
    /// `contoso-analytics`): `(subscription id, landing page URL)`.
    pub async fn purchase_with(&self, mut body: Value) -> (Uuid, Url) {
        if body.get("offerId").is_none() {
            body["offerId"] = json!("contoso-analytics");
        }
        let created = self
            .admin(reqwest::Method::POST, "simulator/purchases", body)
            .await;
        landing(&created)
    }

    /// Our entitlement API (`/api/v1/...`) with the stack's key: `(status, JSON body)`.
    pub async fn entitlement(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.api(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A request to our entitlement API with the stack's key.
    pub fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, self.url(path))
            .bearer_auth(API_KEY)
    }

    /// `path` on the ingress.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.ingress)
    }

    /// A webhook token as Microsoft signs them for this stack's ingress.
    pub fn webhook_token(&self) -> String {
        self.sim.mint_webhook_token(json!({})).unwrap()
    }

    /// Posts `body` to the ingress's `/webhook` (with `token` as its bearer token).
    pub async fn post_webhook(
        &self,
        token: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(self.url("/webhook"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// Tells the ingress to shut down; returns its task to await.
    pub fn begin_ingress_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        self.shutdown.cancel();
        self.server.take().expect("the ingress runs")
    }

    /// Replaces the ingress by the production router on a new port, its state
    /// `customise`d (e.g. a webhook verifier of its own); the tap follows it. (The
    /// simulator's landing page URL still names the first ingress.)
    pub async fn restart_ingress(&mut self, customise: impl FnOnce(&Settings, &mut AppState)) {
        if let Some(server) = self.server.take() {
            self.shutdown.cancel();
            let _ = server.await;
        }
        let mut state = AppState::from_settings(&self.settings)
            .await
            .expect("state");
        customise(&self.settings, &mut state);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.ingress = listener.local_addr().unwrap();
        self.tap.forward_to(self.url("/webhook").parse().unwrap());
        self.shutdown = CancellationToken::new();
        let stop = self.shutdown.clone();
        self.server = Some(tokio::spawn(async move {
            axum::serve(listener, router(state.clone()))
                .with_graceful_shutdown(stop.cancelled_owned())
                .await?;
            state.broker.close().await;
            state.pool.close().await;
            Ok(())
        }));
    }

    /// Buys `plan` in the simulator: its answer (`subscriptionId`, `token`, `landingUrl`).
    pub async fn buy(&self, plan: &str, quantity: Option<u32>, auto: bool) -> Value {
        let mut body =
            json!({"offerId": "contoso-analytics", "planId": plan, "autoActivate": auto});
        if let Some(quantity) = quantity {
            body["quantity"] = json!(quantity);
        }
        self.admin(reqwest::Method::POST, "simulator/purchases", body)
            .await
    }

    /// A purchase: `(subscription id, landing page URL)`.
    pub async fn purchase(&self, plan: &str, quantity: Option<u32>, auto: bool) -> (Uuid, Url) {
        let created = self.buy(plan, quantity, auto).await;
        landing(&created)
    }

    /// The customer opens the landing page (through the ingress), signs in at the
    /// simulator's Entra stand-in and asks for activation (the form's POST).
    pub async fn open_landing(&self, landing: &Url) {
        let customer = ScriptedCustomer::new("customer").unwrap();
        let page = customer
            .activate(landing, &[])
            .await
            .unwrap_or_else(|e| panic!("landing page: {e:#}"));
        assert!(
            page.status.is_success(),
            "landing page: {} {}",
            page.status,
            page.html
        );
    }

    /// Purchase, landing page, automatic activation; returns once both sides say Subscribed.
    pub async fn subscribed(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let (id, landing) = self.purchase(plan, quantity, false).await;
        self.open_landing(&landing).await;
        self.wait_for(&format!("{id} Subscribed on both sides"), || async {
            let ours = self.engine(id).await?;
            (ours.state == "Subscribed" && ours == self.sim_side(id).await).then_some(())
        })
        .await;
        id
    }

    /// A customer/Microsoft action (`{action, planId?, quantity?}`); returns the operation id.
    pub async fn act(&self, id: Uuid, body: Value) -> String {
        let answer = self
            .admin(
                reqwest::Method::POST,
                &format!("simulator/subscriptions/{id}/actions"),
                body,
            )
            .await;
        answer["operationId"].as_str().unwrap().to_string()
    }

    pub async fn sim_view(&self, id: Uuid) -> Value {
        self.admin(
            reqwest::Method::GET,
            &format!("simulator/subscriptions/{id}"),
            Value::Null,
        )
        .await
    }

    /// Every subscription the simulator knows, by id.
    pub async fn sim_views(&self) -> HashMap<Uuid, Value> {
        let all = self
            .admin(reqwest::Method::GET, "simulator/subscriptions", Value::Null)
            .await;
        all["subscriptions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| {
                (
                    v["subscription"]["id"].as_str().unwrap().parse().unwrap(),
                    v.clone(),
                )
            })
            .collect()
    }

    pub async fn sim_side(&self, id: Uuid) -> View {
        sim_side(&self.sim_view(id).await)
    }

    // ---- our side --------------------------------------------------------------------

    pub async fn engine(&self, id: Uuid) -> Option<View> {
        let row: Option<(String, Option<String>, Option<i32>)> =
            sqlx::query_as("SELECT state, plan_id, quantity FROM subscriptions WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .unwrap();
        row.map(|(state, plan, quantity)| View {
            state,
            plan,
            quantity: quantity.map(i64::from),
        })
    }

    pub async fn events(&self, id: Uuid) -> Vec<LogRow> {
        sqlx::query_as(
            "SELECT sequence, event_kind, outcome, reason, message_id, event_key, event \
             FROM subscription_events WHERE subscription_id = $1 ORDER BY sequence",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    /// Outbox rows not done: `(pending, dead)`.
    pub async fn outbox_left(&self) -> (i64, i64) {
        sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'pending'), \
                    count(*) FILTER (WHERE status = 'dead') FROM outbox",
        )
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    // ---- RabbitMQ ----------------------------------------------------------------------

    pub async fn lapin(&self) -> (Connection, lapin::Channel) {
        let connection = Connection::connect(
            self.settings.amqp.url.expose(),
            ConnectionProperties::default(),
        )
        .await
        .unwrap();
        let channel = connection.create_channel().await.unwrap();
        (connection, channel)
    }

    /// `(ready messages, consumers)` of the inbound queue.
    pub async fn inbound_queue(&self) -> (u32, u32) {
        let (connection, channel) = self.lapin().await;
        let inbound = self.broker.topology().inbound_queue();
        let queue = dead_letters::inspect_queue(&channel, &inbound)
            .await
            .unwrap();
        let _ = connection.close(200, "looked".into()).await;
        (queue.message_count(), queue.consumer_count())
    }

    /// Takes every message off the dead-letter queue: bodies and headers as text.
    pub async fn drain_dlq(&self) -> Vec<(Value, HashMap<String, String>)> {
        self.take_all(&self.broker.topology().dead_letter_queue())
            .await
    }

    /// Takes every message off `queue`: bodies and headers as text.
    pub async fn take_all(&self, queue: &str) -> Vec<(Value, HashMap<String, String>)> {
        let (connection, channel) = self.lapin().await;
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
                .unwrap_or_default()
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), header_text(v)))
                .collect();
            all.push((body, headers));
        }
        let _ = connection.close(200, "drained".into()).await;
        all
    }

    // ---- waiting -----------------------------------------------------------------------

    /// Polls `check` until it gives a value; panics naming `what` after [`WAIT`].
    pub async fn wait_for<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        self.wait_for_within(what, WAIT, check).await
    }

    /// [`Stack::wait_for`] with a deadline of its own.
    pub async fn wait_for_within<T, F, Fut>(&self, what: &str, within: Duration, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if let Some(value) = check().await {
                return value;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until everything has come to rest for `ids`: the simulator has no operation in
    /// progress and no webhook still being delivered, RabbitMQ's inbound queue is empty, no
    /// outbox row is pending, and both sides agree on state, plan and seats — three checks
    /// in a row. Panics with the differences after `deadline`.
    pub async fn settle(&self, ids: &[Uuid], deadline: Duration) {
        let until = Instant::now() + deadline;
        let mut calm = 0;
        loop {
            let problems = self.unsettled(ids).await;
            calm = if problems.is_empty() { calm + 1 } else { 0 };
            if calm >= 3 {
                return;
            }
            if Instant::now() >= until {
                let mut timelines = String::new();
                for id in ids
                    .iter()
                    .filter(|id| problems.iter().any(|p| p.starts_with(&id.to_string())))
                    .take(2)
                {
                    timelines.push_str(&self.timeline(*id).await);
                }
                panic!(
                    "not settled after {deadline:?}:\n{}\n{timelines}",
                    problems.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The event log of `id` and Microsoft's view of it, for failure messages.
    pub async fn timeline(&self, id: Uuid) -> String {
        type Row = (i64, String, String, String, String, Option<String>, Value);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT sequence, event_kind, from_state, to_state, outcome, reason, effects \
                 FROM subscription_events WHERE subscription_id = $1 ORDER BY sequence",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await
        .unwrap();
        let mut text = format!("--- event log of {id}\n");
        for (sequence, kind, from, to, outcome, reason, effects) in rows {
            let effects: Vec<String> = effects
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e["type"].as_str().unwrap_or("?").to_string())
                .collect();
            text.push_str(&format!(
                "{sequence:>3} {kind:<28} {from}→{to} {outcome:<8} {} [{}]\n",
                reason.unwrap_or_default(),
                effects.join(", ")
            ));
        }
        let view = self.sim_view(id).await;
        text.push_str(&format!(
            "--- Microsoft: {}\n--- operations: {}\n",
            view["subscription"], view["operations"]
        ));
        text
    }

    /// What is still moving or differs; empty when settled.
    pub async fn unsettled(&self, ids: &[Uuid]) -> Vec<String> {
        let mut problems = Vec::new();
        let views = self.sim_views().await;
        for id in ids {
            let Some(view) = views.get(id) else {
                problems.push(format!("{id}: unknown to the simulator"));
                continue;
            };
            let moving_ops = view["operations"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|o| o["status"] == "InProgress" || o["status"] == "NotStarted")
                .count();
            let moving_hooks = view["webhooks"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|w| w["outcome"] == "Pending")
                .count();
            if moving_ops + moving_hooks > 0 {
                problems.push(format!(
                    "{id}: {moving_ops} operations in progress, {moving_hooks} webhooks pending"
                ));
            }
            let theirs = sim_side(view);
            let ours = self.engine(*id).await;
            if ours.as_ref() != Some(&theirs) {
                problems.push(format!("{id}: ours {ours:?} ≠ Microsoft's {theirs:?}"));
            }
        }
        let (ready, _) = self.inbound_queue().await;
        if ready > 0 {
            problems.push(format!("{ready} messages wait in the inbound queue"));
        }
        let (pending, _) = self.outbox_left().await;
        if pending > 0 {
            problems.push(format!("{pending} outbox rows pending"));
        }
        for worker in self.workers() {
            if worker
                .wait_until_idle(Duration::from_secs(3))
                .await
                .is_err()
            {
                problems.push("a worker is busy".into());
            }
        }
        problems
    }

    // ---- the inbound queue, as the ingress and the landing page publish ----------------

    /// Publishes `message` on the inbound queue under `message_id`.
    pub async fn publish(
        &self,
        message: &InboundMessage,
        message_id: &str,
        subscription: impl Into<Option<Uuid>>,
    ) {
        let meta = MessageMeta {
            message_id: message_id.to_string(),
            correlation_id: Uuid::new_v4().to_string(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            subscription_id: subscription.into(),
        };
        self.publisher
            .publish_inbound(message, &meta)
            .await
            .expect("publish");
    }

    /// Purchases in the simulator and resolves the token: the `PurchaseResolved` message
    /// the landing page would publish, with its message id.
    pub async fn resolve(
        &self,
        plan: &str,
        quantity: Option<u32>,
    ) -> (Uuid, InboundMessage, String) {
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
        let message_id = format!("resolve:{id}:{}", resolved_at.unix_timestamp_nanos());
        (id, message, message_id)
    }

    /// Purchases, resolves and publishes `PurchaseResolved` (no landing page involved).
    pub async fn purchase_resolved(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let (id, message, message_id) = self.resolve(plan, quantity).await;
        self.publish(&message, &message_id, id).await;
        id
    }

    /// Publishes a publisher command as the entitlement API would; returns its id.
    pub async fn command(&self, id: Uuid, command: PublisherCommand) -> Uuid {
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

    // ---- webhooks on the way ------------------------------------------------------------

    /// Webhook bodies the simulator sent, in order.
    pub fn webhooks_received(&self) -> Vec<String> {
        self.tap.received()
    }

    /// Deaf: webhooks are answered 200 and lost before the ingress (Microsoft thinks they
    /// were delivered).
    pub fn set_deaf(&self, deaf: bool) {
        self.tap.set_deaf(deaf);
    }

    // ---- waiting for named conditions ---------------------------------------------------

    /// Waits until every in-process worker is idle, nothing waits in the inbound queue and
    /// the simulator has no webhook still being delivered, twice in a row.
    pub async fn run_until_idle(&self) {
        let deadline = Instant::now() + WAIT;
        let mut calm = 0;
        while calm < 2 {
            for worker in self.workers() {
                worker.wait_until_idle(WAIT).await.expect("an idle worker");
            }
            let (ready, _) = self.inbound_queue().await;
            let delivering = self.sim_views().await.values().any(|view| {
                view["webhooks"]
                    .as_array()
                    .is_some_and(|hooks| hooks.iter().any(|w| w["outcome"] == "Pending"))
            });
            calm = if ready == 0 && !delivering {
                calm + 1
            } else {
                0
            };
            assert!(
                Instant::now() < deadline,
                "the stack is still busy after {WAIT:?}"
            );
            if calm == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Waits until our side holds `id` in `state`.
    pub async fn wait_for_state(&self, id: Uuid, state: &str) -> View {
        self.wait_for(&format!("{id} in {state}"), || async {
            self.engine(id).await.filter(|view| view.state == state)
        })
        .await
    }

    /// Waits until our side holds `id` on `plan`.
    pub async fn wait_for_plan(&self, id: Uuid, plan: &str) -> View {
        self.wait_for(&format!("{id} on {plan}"), || async {
            self.engine(id)
                .await
                .filter(|view| view.plan.as_deref() == Some(plan))
        })
        .await
    }

    /// Waits until our side holds `id` in `state`, on `plan` and with `quantity` seats
    /// where those are given.
    pub async fn wait_for_view(
        &self,
        id: Uuid,
        state: &str,
        plan: Option<&str>,
        quantity: Option<i64>,
    ) -> View {
        let what = format!("{id} in {state} {plan:?} {quantity:?}");
        self.wait_for(&what, || async {
            self.engine(id).await.filter(|view| {
                view.state == state
                    && (plan.is_none() || view.plan.as_deref() == plan)
                    && (quantity.is_none() || view.quantity == quantity)
            })
        })
        .await
    }

    /// Waits until Microsoft's subscription `id` has the status `status`.
    pub async fn wait_for_sim(&self, id: Uuid, status: &str) -> Value {
        self.wait_for(&format!("Microsoft's {id} {status}"), || async {
            let view = self.sim_view(id).await;
            (view["subscription"]["saasSubscriptionStatus"] == status).then_some(view)
        })
        .await
    }

    /// Waits until the simulator's operation `op` on `id` is final; returns it.
    pub async fn wait_for_operation(&self, id: Uuid, op: &str) -> Value {
        self.wait_for(&format!("operation {op} to end"), || async {
            let view = self.sim_view(id).await;
            view["operations"]
                .as_array()?
                .iter()
                .find(|o| {
                    o["id"] == op && o["status"] != "InProgress" && o["status"] != "NotStarted"
                })
                .cloned()
        })
        .await
    }

    /// Waits until the simulator sent a webhook with this operation id; returns its body.
    pub async fn wait_for_webhook(&self, op: &str) -> String {
        self.wait_for(&format!("a webhook of {op}"), || async {
            self.webhooks_received()
                .into_iter()
                .find(|body| serde_json::from_str::<Value>(body).unwrap()["id"] == op)
        })
        .await
    }

    /// Waits until Microsoft's webhook for `id` with this action or operation id reached
    /// our ingress (answered 2xx).
    pub async fn wait_for_delivery(&self, id: Uuid, action_or_operation: &str) {
        let what = format!("{action_or_operation} delivered for {id}");
        self.wait_for(&what, || async {
            let view = self.sim_view(id).await;
            view["webhooks"]
                .as_array()?
                .iter()
                .any(|w| {
                    (w["action"] == action_or_operation || w["operationId"] == action_or_operation)
                        && w["delivered"] == true
                })
                .then_some(())
        })
        .await
    }

    /// Waits until a publisher command's row is final: `(status, last error)`.
    pub async fn wait_for_command(&self, command_id: Uuid) -> (String, Option<String>) {
        self.wait_for(&format!("command {command_id} to end"), || async {
            let row: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT status, last_error FROM publisher_operations WHERE command_id = $1",
            )
            .bind(command_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap();
            row.filter(|(status, _)| status != "Requested" && status != "Accepted")
        })
        .await
    }

    /// Waits until `queue` holds exactly `len` messages.
    pub async fn wait_for_queue_len(&self, queue: &str, len: u32) {
        self.wait_for(&format!("{queue} to hold {len}"), || async {
            (self.queue_len(queue).await == len).then_some(())
        })
        .await
    }

    // ---- domain events and queues -------------------------------------------------------

    /// Takes the domain events published since the last call off the test's queue and
    /// checks each against its schema (docs/events/): `(CloudEvent, headers)`.
    pub async fn domain_events(&self) -> Vec<(Value, HashMap<String, String>)> {
        if !self.queue_exists(&self.domain_queue).await {
            // Gone with its virtual host (a test of a broker outage): nothing to check.
            return Vec::new();
        }
        let events = self.take_all(&self.domain_queue).await;
        event_schemas::Contract::load().assert_valid(events.iter().map(|(body, _)| body));
        events
    }

    /// The `type`s of [`Stack::domain_events`].
    pub async fn domain_event_types(&self) -> Vec<String> {
        self.domain_events()
            .await
            .into_iter()
            .map(|(event, _)| event["type"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// `SELECT count(*) …` with one text parameter.
    pub async fn count(&self, sql: &str, bind: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .bind(bind)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    /// A broker connection of the test's own, on the stack's names.
    pub async fn connect_broker(&self) -> Broker {
        Broker::connect(&self.settings.amqp, "stack-test-own")
            .await
            .expect("RabbitMQ")
    }

    /// Whether `queue` exists (a passive declare).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        let (connection, channel) = self.lapin().await;
        let exists = dead_letters::inspect_queue(&channel, queue).await.is_ok();
        let _ = connection.close(200, "looked".into()).await;
        exists
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        let (connection, channel) = self.lapin().await;
        let declared = dead_letters::inspect_queue(&channel, queue).await.unwrap();
        let _ = connection.close(200, "counted".into()).await;
        declared.message_count()
    }

    // ---- the command line ---------------------------------------------------------------

    /// Runs `fulfillment ARGS` against this stack (and `extra` variables):
    /// `(exit code, stdout, stderr)`.
    pub async fn cli(&self, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"));
        command
            .args(args)
            .env_remove("FULFILLMENT_CONFIG")
            .env("RUST_LOG", "warn")
            .envs(self.process_env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied());
        let output = command.output().await.expect("run fulfillment");
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    // ---- worker processes --------------------------------------------------------------

    /// Starts `fulfillment work` with this stack's settings (and `extra` variables).
    pub fn spawn_worker_process(&self, extra: &[(&str, &str)]) -> WorkerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fulfillment"));
        command
            .arg("work")
            .env_remove("FULFILLMENT_CONFIG")
            .env("RUST_LOG", "info")
            .env("LOG_FORMAT", "pretty")
            // Several workers (and tests) run at once: each its own metrics port.
            .env("WORKER_METRICS_ADDR", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in &self.process_env {
            command.env(key, value);
        }
        for (key, value) in extra {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("start fulfillment work");
        let log = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let log = log.clone();
            std::thread::spawn(move || drain(stream, &log));
        }
        WorkerProcess { child, log }
    }
}

/// A `fulfillment work` child process; killed when dropped.
pub struct WorkerProcess {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl WorkerProcess {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: the graceful way.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to end on its own.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < until,
                "the worker did not exit within {deadline:?}; its log:\n{}",
                self.log_tail(60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The last `lines` lines of its output, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn drain(mut stream: Box<dyn Read + Send>, log: &Mutex<String>) {
    let mut buffer = [0u8; 8192];
    while let Ok(n) = stream.read(&mut buffer) {
        if n == 0 {
            break;
        }
        if let Ok(mut log) = log.lock() {
            log.push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    }
}

/// Deletes the test's queues and exchanges when dropped, also after a panic.
struct TopologyGuard {
    amqp: AmqpSettings,
    /// The workers' retry tiers when they are not production's.
    retry_delays: Option<Vec<Duration>>,
    domain_queue: String,
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        let amqp = self.amqp.clone();
        let retry_delays = self.retry_delays.clone();
        let domain_queue = self.domain_queue.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let mut topologies = vec![Topology::new(&amqp.prefix)];
                topologies.extend(
                    retry_delays.map(|delays| Topology::with_retry_delays(&amqp.prefix, &delays)),
                );
                for topology in topologies {
                    if let Ok(broker) =
                        Broker::connect_with_topology(&amqp, "stack-test-cleanup", topology).await
                    {
                        if let Err(error) = broker.delete_topology().await {
                            eprintln!("cannot delete the test topology: {error}");
                        }
                        broker.close().await;
                    }
                }
                if let Ok(connection) =
                    Connection::connect(amqp.url.expose(), ConnectionProperties::default()).await
                {
                    if let Ok(channel) = connection.create_channel().await {
                        let _ = channel
                            .queue_delete(domain_queue.as_str().into(), Default::default())
                            .await;
                    }
                    let _ = connection.close(200, "cleaned".into()).await;
                }
            });
        })
        .join();
    }
}

/// Declares `queue` (durable, the test's own) and binds it to every key of `exchange`.
async fn bind_queue(settings: &Settings, queue: &str, exchange: &str) {
    let connection =
        Connection::connect(settings.amqp.url.expose(), ConnectionProperties::default())
            .await
            .expect("RabbitMQ");
    let channel = connection.create_channel().await.unwrap();
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
            exchange.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "bound".into()).await;
}

/// `(subscription id, landing page URL)` of the simulator's answer to a purchase.
fn landing(created: &Value) -> (Uuid, Url) {
    (
        created["subscriptionId"].as_str().unwrap().parse().unwrap(),
        created["landingUrl"].as_str().unwrap().parse().unwrap(),
    )
}

/// The simulator's view of a subscription, in our terms.
pub fn sim_side(view: &Value) -> View {
    let subscription = &view["subscription"];
    let state = match subscription["saasSubscriptionStatus"]
        .as_str()
        .unwrap_or("?")
    {
        "PendingFulfillmentStart" | "NotStarted" => "PendingFulfillment",
        other => other,
    };
    View {
        state: state.to_string(),
        plan: subscription["planId"].as_str().map(str::to_string),
        quantity: subscription["quantity"].as_i64(),
    }
}

pub fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
