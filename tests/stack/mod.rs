//! The one test world: [`marketplace_fulfillment::world::World`] — the start path `demo`
//! and the benchmarks share — wired for system tests. The simulator on port 0 sends signed
//! webhooks through a tap (which records them, and can turn deaf to lose them) to the real
//! ingress, which publishes them to RabbitMQ; workers (in-process, or `fulfillment work`
//! child processes) apply them to the world's database and call the simulator back. Every
//! test gets its own database and RabbitMQ prefix; both are removed when the [`Stack`] is
//! dropped, also when the test panics. Domain events are collected on a queue of the test's
//! own and checked against their schemas (docs/events/).
//!
//! Waiting is by condition, never by a bare sleep: [`Stack::run_until_idle`] returns once
//! the queues, the workers and the simulator's deliveries are at rest; [`Stack::settle`]
//! also waits for both sides to agree; [`Stack::wait_for`] and its named forms wait for one
//! condition with a deadline.
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
pub use common::{TestDatabase, strip_ansi, test_settings};
pub use marketplace_fulfillment::store::timeline::EventRow as LogRow;
pub use marketplace_fulfillment::world::View;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use fulfillment_state_machine::NoticePolicy;
use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use marketplace_fulfillment::http::{AppState, router};
use marketplace_fulfillment::marketplace::{CallContext, RetryPolicy};
use marketplace_fulfillment::queue::{
    Broker, InboundMessage, MessageMeta, Publisher, PublisherCommand,
};
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::simulator::{SimulatorConfig, Timings};
use marketplace_fulfillment::store;
use marketplace_fulfillment::worker::{
    EffectsConfig, MetricsListener, ProtocolConfig, WorkerConfig,
};
use marketplace_fulfillment::world::{
    ChildProcess, SimHandle, World, WorldOptions, activate_on_landing, wait_until,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

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
    /// Last changes to the settings (e.g. `world::brand_as_contoso`).
    pub settings: fn(&mut Settings),
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
            settings: |_| {},
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

/// The world and what tests add to it: the tap, the test's domain-event queue, a
/// publisher, child-process settings. Derefs to the [`World`] (`pool`, `settings`, `sim`,
/// `broker`, `client`, `workers`).
pub struct Stack {
    pub world: World,
    pub ingress: SocketAddr,
    pub http: reqwest::Client,
    /// The simulator's admin API.
    pub admin: SimHandle,
    /// Publishes on the inbound queue as the ingress and the landing page do.
    pub publisher: Publisher,
    /// Bound to the domain exchange: every domain event the test's workers publish.
    pub domain_queue: String,
    /// What `fulfillment work` processes need in their environment.
    pub process_env: Vec<(String, String)>,
    tap: tap::Tap,
    worker_config: WorkerConfig,
    /// An ingress started by [`Stack::restart_ingress`], and what stops it.
    restarted: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    /// Stops what else the stack serves (the worker's listener).
    background: CancellationToken,
}

impl std::ops::Deref for Stack {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl std::ops::DerefMut for Stack {
    fn deref_mut(&mut self) -> &mut World {
        &mut self.world
    }
}

impl Stack {
    pub async fn start(options: Options) -> Stack {
        let mut env: HashMap<String, String> = std::env::vars().collect();
        env.remove("FULFILLMENT_CONFIG");
        env.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
        env.insert("ENTITLEMENT_API_KEY".into(), API_KEY.into());
        for (key, value) in &options.env {
            match value.is_empty() {
                true => env.remove(*key),
                false => env.insert(key.to_string(), value.clone()),
            };
        }
        let mut base = Settings::from_sources(None, &env).expect("stack settings");
        if options.policy != json!({}) {
            base.policy = serde_json::from_value(options.policy).expect("a policy");
        }
        base.policy.notices = options.notices.clone();
        (options.settings)(&mut base);
        let tap = tap::Tap::start().await;
        let worker_config = WorkerConfig {
            prefetch: options.prefetch,
            effects: options.effects,
            ..WorkerConfig::default()
        };
        let (timings, simulator) = (options.timings, options.simulator);
        let world_options = WorldOptions {
            ingress: true,
            webhook_url: Some(tap.url()),
            worker: options.in_process_worker.then(|| worker_config.clone()),
            client_retries: Some(RetryPolicy {
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
                max_attempts: 2,
                max_retry_after: Duration::from_millis(50),
                give_up_beyond_cap: false,
            }),
            retry_delays: options.retry_delays,
            configure: Box::new(
                move |settings: &mut Settings, config: &mut SimulatorConfig| {
                    // A small pool for the ingress: the PostgreSQL server is shared by every test
                    // running at once (the world's own pool, which the workers share, keeps the
                    // default size).
                    settings.database.max_connections = 6;
                    config.timings = timings;
                    simulator(config);
                    Ok(())
                },
            ),
            ..WorldOptions::bare("test")
        };
        let mut world = World::start(&base, world_options).await.expect("the world");
        let ingress = world.ingress.expect("an ingress");
        tap.forward_to(format!("http://{ingress}/webhook").parse().unwrap());
        let domain_queue = format!("{}.test-domain-events", world.settings.amqp.prefix);
        world.delete_at_teardown(domain_queue.clone());
        bind_queue(
            &world.settings,
            &domain_queue,
            &world.broker.topology().domain_exchange(),
        )
        .await;
        let mut process_env = world.process_env();
        // Millisecond clocks for worker processes, through the [worker] settings.
        let notice_days: Vec<String> = options
            .notices
            .term_ending_days
            .iter()
            .map(u32::to_string)
            .collect();
        for (key, value) in [
            ("DATABASE__MAX_CONNECTIONS", "6".to_string()),
            ("WORKER__PREFETCH", "8".into()),
            ("WORKER__EFFECT_CONCURRENCY", "2".into()),
            ("WORKER__POLL_INTERVAL_MS", "100".into()),
            ("WORKER__BACKOFF_BASE_MS", "50".into()),
            ("WORKER__BACKOFF_MAX_MS", "500".into()),
            ("WORKER__OPERATION_POLL_INTERVAL_MS", "100".into()),
            ("WORKER__ACTIVATION_CHECK_INTERVAL_MS", "100".into()),
            ("WORKER__TERM_ENDING_NOTICE_DAYS", notice_days.join(",")),
            (
                "WORKER__NOTICE_DAY_MS",
                options.notices.day.as_millis().to_string(),
            ),
        ] {
            process_env.push((format!("FULFILLMENT__{key}"), value));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Stack {
            admin: world.sim_admin(&http),
            publisher: world.broker.publisher().await.expect("a publisher"),
            ingress,
            http,
            world,
            domain_queue,
            process_env,
            tap,
            worker_config,
            restarted: None,
            background: CancellationToken::new(),
        }
    }

    /// Starts one more in-process worker: fast effect clocks, a fast client retry policy.
    pub async fn start_worker(&mut self) {
        let config = self.worker_config.clone();
        self.world.add_worker(config).await.expect("worker");
    }

    /// Stops the in-process workers (their messages wait in the queue).
    pub async fn stop_workers(&mut self) {
        self.world.stop_workers().await.expect("the workers stop");
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

    /// Stops the workers, the ingress and the simulator, checks the domain events left on
    /// the test's queue against their schemas and removes the queues and the database.
    pub async fn finish(mut self) {
        self.stop_workers().await;
        self.domain_events().await;
        self.background.cancel();
        if let Some((stop, server)) = self.restarted.take() {
            stop.cancel();
            let _ = server.await;
        }
        self.world.teardown().await.expect("the world's teardown");
    }

    // ---- the simulator (Microsoft and the customer) -------------------------------------

    pub async fn admin(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        self.admin.call(method, path, body).await.unwrap()
    }

    pub async fn set_faults(&self, faults: Value) {
        self.admin.set_faults(faults).await.unwrap();
    }

    /// A purchase with every field of `POST /simulator/purchases` (`offerId` defaults to
    /// `contoso-analytics`): `(subscription id, landing page URL)`.
    pub async fn purchase_with(&self, body: Value) -> (Uuid, Url) {
        landing(&self.admin.purchase(body).await.unwrap())
    }

    /// Buys `plan` in the simulator: its answer (`subscriptionId`, `token`, `landingUrl`).
    pub async fn buy(&self, plan: &str, quantity: Option<u32>, auto: bool) -> Value {
        let body = json!({"planId": plan, "quantity": quantity, "autoActivate": auto});
        self.admin.purchase(body).await.unwrap()
    }

    /// A purchase: `(subscription id, landing page URL)`.
    pub async fn purchase(&self, plan: &str, quantity: Option<u32>, auto: bool) -> (Uuid, Url) {
        landing(&self.buy(plan, quantity, auto).await)
    }

    /// A customer/Microsoft action (`{action, planId?, quantity?}`); returns the operation id.
    pub async fn act(&self, id: Uuid, body: Value) -> String {
        self.admin.act(id, body).await.unwrap().to_string()
    }

    pub async fn sim_view(&self, id: Uuid) -> Value {
        self.admin.view(id).await.unwrap()
    }

    /// Every subscription the simulator knows, by id.
    pub async fn sim_views(&self) -> HashMap<Uuid, Value> {
        let all = self.admin.get("simulator/subscriptions").await.unwrap();
        let all = all["subscriptions"].as_array().unwrap().iter();
        all.map(|v| {
            (
                v["subscription"]["id"].as_str().unwrap().parse().unwrap(),
                v.clone(),
            )
        })
        .collect()
    }

    pub async fn sim_side(&self, id: Uuid) -> View {
        View::of_sim_view(&self.sim_view(id).await)
    }

    /// The customer opens the landing page (through the ingress), signs in at the
    /// simulator's Entra stand-in and asks for activation (the form's POST).
    pub async fn open_landing(&self, landing: &Url) {
        activate_on_landing(landing).await.unwrap();
    }

    /// Purchase, landing page, automatic activation; returns once both sides say Subscribed.
    pub async fn subscribed(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let (id, landing) = self.purchase(plan, quantity, false).await;
        self.open_landing(&landing).await;
        self.wait_for(&format!("{id} Subscribed on both sides"), || async {
            let ours = self.engine(id).await?;
            (ours.state == "Subscribed" && Some(ours) == self.microsoft(id)).then_some(())
        })
        .await;
        id
    }

    // ---- the ingress ----------------------------------------------------------------------

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
        let request = self.http.post(self.url("/webhook"));
        let mut request = request
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().await.unwrap()
    }

    /// Tells the ingress to shut down; returns its task to await.
    pub fn begin_ingress_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        match self.restarted.take() {
            Some((stop, server)) => {
                stop.cancel();
                server
            }
            None => self.world.stop_ingress().expect("the ingress runs"),
        }
    }

    /// Replaces the ingress by the production router on a new port, its state
    /// `customise`d (e.g. a webhook verifier of its own); the tap follows it. (The
    /// simulator's landing page URL still names the first ingress.)
    pub async fn restart_ingress(&mut self, customise: impl FnOnce(&Settings, &mut AppState)) {
        let _ = self.begin_ingress_shutdown().await;
        let mut state = AppState::from_settings(&self.settings)
            .await
            .expect("state");
        customise(&self.settings, &mut state);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.ingress = listener.local_addr().unwrap();
        self.tap.forward_to(self.url("/webhook").parse().unwrap());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, router(state.clone()))
                .with_graceful_shutdown(stopped.cancelled_owned())
                .await?;
            state.broker.close().await;
            state.pool.close().await;
            Ok(())
        });
        self.restarted = Some((stop, server));
    }

    // ---- our side --------------------------------------------------------------------

    pub async fn engine(&self, id: Uuid) -> Option<View> {
        self.world.engine(id).await.unwrap()
    }

    pub async fn events(&self, id: Uuid) -> Vec<LogRow> {
        store::timeline::events(&self.pool, id).await.unwrap()
    }

    /// Outbox rows not done: `(pending, dead)`.
    pub async fn outbox_left(&self) -> (i64, i64) {
        let sql = "SELECT count(*) FILTER (WHERE status = 'pending'), \
                   count(*) FILTER (WHERE status = 'dead') FROM outbox";
        sqlx::query_as(sql).fetch_one(&self.pool).await.unwrap()
    }

    /// `SELECT count(*) …` with one text parameter.
    pub async fn count(&self, sql: &str, bind: &str) -> i64 {
        let sql = sqlx::AssertSqlSafe(sql.to_string());
        sqlx::query_scalar(sql)
            .bind(bind)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    // ---- RabbitMQ ----------------------------------------------------------------------

    pub async fn lapin(&self) -> (Connection, lapin::Channel) {
        let url = self.settings.amqp.url.expose();
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        (connection, channel)
    }

    /// A broker connection of the test's own, on the stack's names.
    pub async fn connect_broker(&self) -> Broker {
        Broker::connect(&self.settings.amqp, "stack-test-own")
            .await
            .expect("RabbitMQ")
    }

    /// `(ready messages, consumers)` of the inbound queue.
    pub async fn inbound_queue(&self) -> (u32, u32) {
        let inbound = self.broker.topology().inbound_queue();
        self.broker.queue_counts(&inbound).await.unwrap()
    }

    /// Whether `queue` exists (a passive declare).
    pub async fn queue_exists(&self, queue: &str) -> bool {
        self.broker.queue_counts(queue).await.is_ok()
    }

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.broker.queue_counts(queue).await.unwrap().0
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
        let get = || channel.basic_get(queue.into(), BasicGetOptions { no_ack: true });
        while let Some(message) = get().await.unwrap() {
            let body = serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
            let headers = message
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            let headers = headers
                .inner()
                .iter()
                .map(|(k, v)| (k.to_string(), header_text(v)));
            all.push((body, headers.collect()));
        }
        let _ = connection.close(200, "drained".into()).await;
        all
    }

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
        let events = self.domain_events().await.into_iter();
        events
            .map(|(event, _)| event["type"].as_str().unwrap_or_default().to_owned())
            .collect()
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
        let token = created["token"].as_str().unwrap();
        let resolved = self
            .client
            .resolve(&CallContext::random(), token)
            .await
            .unwrap();
        let resolved_at = OffsetDateTime::now_utc();
        let subscription = resolved.into_value().subscription.unwrap();
        let message = InboundMessage::PurchaseResolved {
            resolved_at,
            subscription: serde_json::to_string(&subscription).unwrap(),
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

    // ---- waiting -----------------------------------------------------------------------

    /// Waits until `check` gives a value; panics naming `what` after [`WAIT`].
    pub async fn wait_for<T, F, Fut>(&self, what: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        self.wait_for_within(what, WAIT, check).await
    }

    /// [`Stack::wait_for`] with a deadline of its own.
    pub async fn wait_for_within<T, F, Fut>(&self, what: &str, within: Duration, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        wait_until(what, within, check).await.unwrap()
    }

    /// Waits until every in-process worker is idle, nothing waits in the inbound queue and
    /// the simulator has no webhook still being delivered, twice in a row.
    pub async fn run_until_idle(&self) {
        self.world.run_until_idle(WAIT).await.unwrap();
    }

    /// Waits until the world is at rest and both sides agree on state, plan and seats of
    /// `ids` (`World::settle`); panics with the differences and timelines after `deadline`.
    pub async fn settle(&self, ids: &[Uuid], deadline: Duration) {
        if let Err(e) = self.world.settle(ids, deadline).await {
            panic!("{e:#}");
        }
    }

    /// Waits until our side holds `id` in `state`.
    pub async fn wait_for_state(&self, id: Uuid, state: &str) -> View {
        self.wait_for_view(id, state, None, None).await
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
        self.admin.wait_for_operation(id, op, WAIT).await.unwrap()
    }

    /// Waits until the simulator sent a webhook with this operation id; returns its body.
    pub async fn wait_for_webhook(&self, op: &str) -> String {
        self.wait_for(&format!("a webhook of {op}"), || async {
            let mut received = self.webhooks_received().into_iter();
            received.find(|body| serde_json::from_str::<Value>(body).unwrap()["id"] == op)
        })
        .await
    }

    /// Waits until Microsoft's webhook for `id` with this action or operation id reached
    /// our ingress (answered 2xx).
    pub async fn wait_for_delivery(&self, id: Uuid, action_or_operation: &str) {
        let what = format!("{action_or_operation} delivered for {id}");
        self.wait_for(&what, || async {
            let view = self.sim_view(id).await;
            let mut webhooks = view["webhooks"].as_array()?.iter();
            let names = |w: &Value| {
                w["action"] == action_or_operation || w["operationId"] == action_or_operation
            };
            webhooks
                .any(|w| names(w) && w["delivered"] == true)
                .then_some(())
        })
        .await
    }

    /// Waits until a publisher command's row is final: `(status, last error)`.
    pub async fn wait_for_command(&self, command_id: Uuid) -> (String, Option<String>) {
        let row = self.world.wait_for_command(command_id, WAIT).await.unwrap();
        (row.status.as_str().to_owned(), row.last_error)
    }

    /// Every webhook Microsoft delivered, as `(subscription, operation id, action)`.
    pub async fn delivered_webhooks(&self) -> Vec<(Uuid, String, String)> {
        let mut all = Vec::new();
        for (id, view) in self.sim_views().await {
            for hook in view["webhooks"].as_array().unwrap() {
                if hook["delivered"] == true {
                    all.push((
                        id,
                        hook["operationId"].as_str().unwrap().to_string(),
                        hook["action"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
        all
    }

    /// Webhook decisions in the event log (redeliveries logged as duplicates excluded), by
    /// `(subscription, operation id, event kind)`.
    pub async fn webhook_decisions(&self) -> HashMap<(Uuid, String, String), i64> {
        let rows: Vec<(Uuid, Option<String>, String, i64)> = sqlx::query_as(
            "SELECT subscription_id, message_id, event_kind, count(*) FROM subscription_events \
             WHERE event_kind LIKE 'Webhook%' \
               AND NOT (outcome = 'ignored' AND reason LIKE 'duplicate event%') \
             GROUP BY 1, 2, 3",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        rows.into_iter()
            .map(|(id, op, kind, n)| ((id, op.unwrap_or_default(), kind), n))
            .collect()
    }

    /// The checks every burst must pass: each delivered webhook decided exactly once, no event
    /// key applied twice, every subscription's sequence numbers 1..n without a gap.
    pub async fn assert_each_event_decided_once(&self) {
        let decisions = self.webhook_decisions().await;
        let delivered = self.delivered_webhooks().await;
        assert!(!delivered.is_empty());
        for (id, op, action) in &delivered {
            let n = decisions
                .get(&(*id, op.clone(), format!("Webhook{action}")))
                .copied()
                .unwrap_or(0);
            assert_eq!(n, 1, "{id}: webhook {action} {op} decided {n} times");
        }
        let twice: Vec<(Uuid, String, i64)> = sqlx::query_as(
            "SELECT subscription_id, event_key, count(*) FROM subscription_events \
             WHERE outcome IN ('applied', 'rejected') GROUP BY 1, 2 HAVING count(*) > 1",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(twice.is_empty(), "applied twice: {twice:?}");
        let gaps: Vec<(Uuid, i64, i64, i64)> = sqlx::query_as(
            "SELECT subscription_id, min(sequence), max(sequence), count(*) \
             FROM subscription_events GROUP BY 1 \
             HAVING min(sequence) <> 1 OR max(sequence) <> count(*)",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap();
        assert!(gaps.is_empty(), "sequences with gaps: {gaps:?}");
    }

    /// Waits until `n` consumers are on the inbound queue, each of `workers` still running.
    pub async fn wait_for_consumers(&self, n: u32, workers: &mut [&mut ChildProcess]) {
        for worker in workers.iter_mut() {
            assert!(worker.exited().unwrap().is_none(), "{}", worker.log_tail());
        }
        self.wait_for(&format!("{n} consumers on the inbound queue"), || async {
            (self.inbound_queue().await.1 == n).then_some(())
        })
        .await;
    }

    /// Waits until `queue` holds exactly `len` messages.
    pub async fn wait_for_queue_len(&self, queue: &str, len: u32) {
        self.wait_for(&format!("{queue} to hold {len}"), || async {
            (self.queue_len(queue).await == len).then_some(())
        })
        .await
    }

    // ---- the command line and worker processes ------------------------------------------

    /// Runs `fulfillment ARGS` against this stack (and `extra` variables):
    /// `(exit code, stdout, stderr)`.
    pub async fn cli(&self, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"));
        command
            .args(args)
            .env_remove("FULFILLMENT_CONFIG")
            .env_remove("COLUMNS")
            .env("RUST_LOG", "warn");
        command
            .envs(self.process_env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied());
        let output = command.output().await.expect("run fulfillment");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        (
            output.status.code().unwrap_or(-1),
            text(&output.stdout),
            text(&output.stderr),
        )
    }

    /// Starts `fulfillment work` with this stack's settings (and `extra` variables); killed
    /// when dropped.
    pub async fn spawn_worker_process(&self, extra: &[(&str, &str)]) -> ChildProcess {
        let mut env = self.process_env.clone();
        let own = [("RUST_LOG", "info"), ("LOG_FORMAT", "pretty")];
        // Several workers (and tests) run at once: each its own metrics port.
        let own = own.iter().chain(&[("WORKER_METRICS_ADDR", "127.0.0.1:0")]);
        env.extend(
            own.chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let exe = env!("CARGO_BIN_EXE_fulfillment").into();
        let listen = "127.0.0.1:0".parse().unwrap();
        let spawned = ChildProcess::spawn_exe(exe, "worker", &self.id, &["work"], env, listen);
        spawned.await.expect("start fulfillment work")
    }
}

/// Declares `queue` (durable, the test's own) and binds it to every key of `exchange`.
async fn bind_queue(settings: &Settings, queue: &str, exchange: &str) {
    let url = settings.amqp.url.expose();
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let (no_options, no_arguments) = (QueueDeclareOptions::default(), FieldTable::default());
    channel
        .queue_declare(queue.into(), no_options, no_arguments.clone())
        .await
        .unwrap();
    let (key, bind) = ("#".into(), QueueBindOptions::default());
    channel
        .queue_bind(queue.into(), exchange.into(), key, bind, no_arguments)
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

pub fn header_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}
