//! The whole stack for system tests of the worker, wired as in production: the simulator on
//! port 0 sends signed webhooks to the real ingress (`Application`), which publishes them
//! to RabbitMQ; a worker (in-process, or `fulfillment work` child processes) applies them
//! to a fresh PostgreSQL database and calls the simulator back. Every test gets its own
//! database and RabbitMQ prefix; both are removed when the [`Stack`] is dropped, also when
//! the test panics, and child processes are killed.
#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::TestDatabase;
use fulfillment_state_machine::NoticePolicy;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use marketplace_fulfillment::http::Application;
use marketplace_fulfillment::marketplace::{MarketplaceClient, RetryPolicy, TokenProvider};
use marketplace_fulfillment::queue::{Broker, Topology};
use marketplace_fulfillment::settings::{AmqpSettings, Settings};
use marketplace_fulfillment::simulator::customer::ScriptedCustomer;
use marketplace_fulfillment::simulator::{RunningSimulator, Simulator, SimulatorConfig, Timings};
use marketplace_fulfillment::worker::{
    EffectsConfig, ProtocolConfig, Worker, WorkerConfig, WorkerParts,
};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
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
    pub worker: Option<Worker>,
    /// The in-process worker's broker (also used to read the queues).
    pub broker: Broker,
    /// What `fulfillment work` processes need in their environment.
    pub process_env: Vec<(String, String)>,
    effects: EffectsConfig,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    _topology: TopologyGuard,
    _db: TestDatabase,
}

impl Stack {
    pub async fn start(options: Options) -> Stack {
        let (db, pool) = TestDatabase::migrated().await;
        let topology = TopologyGuard {
            amqp: db.settings.amqp.clone(),
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
        env.insert("ACTIVATION_MODE".into(), "automatic".into());
        let mut settings = Settings::from_sources(None, &env).expect("stack settings");
        settings.policy = serde_json::from_value(options.policy).expect("a policy");
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

        let mut config = SimulatorConfig::new(tenant, client_id);
        config.client_secret = Some(SecretString::from(CLIENT_SECRET));
        config.webhook_url = Some(format!("http://{ingress}/webhook").parse().unwrap());
        config.landing_page_url = Some(format!("http://{ingress}/landing").parse().unwrap());
        config.timings = options.timings;
        (options.simulator)(&mut config);
        let sim = Simulator::start(config, sim_listener)
            .await
            .expect("start the simulator");

        let broker = Broker::connect(&settings.amqp, "stack-test")
            .await
            .expect("RabbitMQ");
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
            broker,
            process_env,
            effects: options.effects,
            shutdown,
            server: Some(server),
            _topology: topology,
            _db: db,
        };
        if options.in_process_worker {
            stack.start_worker().await;
        }
        stack
    }

    /// Starts the in-process worker: fast effect clocks, a fast client retry policy.
    pub async fn start_worker(&mut self) {
        let tokens = TokenProvider::new(&self.settings.marketplace).unwrap();
        let client = MarketplaceClient::new(&self.settings.marketplace, tokens)
            .unwrap()
            .with_retry_policy(RetryPolicy {
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
                max_attempts: 2,
                max_retry_after: Duration::from_millis(50),
                give_up_beyond_cap: false,
            });
        let parts = WorkerParts {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            client,
            policy: self.settings.policy.clone(),
            api_url: self.settings.marketplace.api_url.clone(),
        };
        let config = WorkerConfig {
            prefetch: 8,
            consumer_tag: String::new(),
            effects: self.effects.clone(),
            ..WorkerConfig::default()
        };
        let worker = Worker::spawn(parts, config, CancellationToken::new())
            .await
            .expect("worker");
        self.worker = Some(worker);
    }

    /// Stops the worker, the ingress and the simulator; the guards then delete the queues
    /// and drop the database.
    pub async fn finish(mut self) {
        if let Some(worker) = self.worker.take() {
            worker.stop().await.expect("the worker stops");
        }
        self.shutdown.cancel();
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
        (
            created["subscriptionId"].as_str().unwrap().parse().unwrap(),
            created["landingUrl"].as_str().unwrap().parse().unwrap(),
        )
    }

    /// Our entitlement API (`/api/v1/...`) with the stack's key: `(status, JSON body)`.
    pub async fn entitlement(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("http://{}{path}", self.ingress))
            .bearer_auth(API_KEY);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// A purchase: `(subscription id, landing page URL)`.
    pub async fn purchase(&self, plan: &str, quantity: Option<u32>, auto: bool) -> (Uuid, Url) {
        let mut body =
            json!({"offerId": "contoso-analytics", "planId": plan, "autoActivate": auto});
        if let Some(quantity) = quantity {
            body["quantity"] = json!(quantity);
        }
        let created = self
            .admin(reqwest::Method::POST, "simulator/purchases", body)
            .await;
        (
            created["subscriptionId"].as_str().unwrap().parse().unwrap(),
            created["landingUrl"].as_str().unwrap().parse().unwrap(),
        )
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

    async fn lapin(&self) -> (Connection, lapin::Channel) {
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
        let queue = channel
            .queue_declare(
                self.broker.topology().inbound_queue().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "looked".into()).await;
        (queue.message_count(), queue.consumer_count())
    }

    /// Takes every message off the dead-letter queue: bodies and headers as text.
    pub async fn drain_dlq(&self) -> Vec<(Value, HashMap<String, String>)> {
        let (connection, channel) = self.lapin().await;
        let queue = self.broker.topology().dead_letter_queue();
        let mut all = Vec::new();
        while let Some(message) = channel
            .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
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
    pub async fn wait_for<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + WAIT;
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
        if let Some(worker) = &self.worker
            && worker
                .wait_until_idle(Duration::from_secs(3))
                .await
                .is_err()
        {
            problems.push("the worker is busy".into());
        }
        problems
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
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        let amqp = self.amqp.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let topology = Topology::new(&amqp.prefix);
                if let Ok(broker) =
                    Broker::connect_with_topology(&amqp, "stack-test-cleanup", topology).await
                {
                    if let Err(error) = broker.delete_topology().await {
                        eprintln!("cannot delete the test topology: {error}");
                    }
                    broker.close().await;
                }
            });
        })
        .join();
    }
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

fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
