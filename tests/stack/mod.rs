//! The one test world: [`World`] (the start path `demo` and the benchmarks share) wired
//! for system tests. The simulator on port 0 sends signed webhooks through a [`tap`]
//! (which records them, and can turn deaf to lose them) to the real ingress; workers
//! (in-process, or `fulfillment work` child processes) apply them. Every test gets its own
//! database and RabbitMQ prefix, removed when the [`Stack`] is dropped, also on a panic.
//! Domain events are collected on a queue of the test's own and checked against
//! docs/events/. Waiting is by condition ([`Stack::wait_for`], [`World::run_until_idle`],
//! [`World::settle`]), never by a bare sleep.
//!
//! ```ignore
//! let stack = Stack::start(Options::default()).await;
//! let id = stack.subscribed("silver", None).await;        // landing page, activation
//! let op = stack.act(id, json!({"action": "ChangePlan", "planId": "gold"})).await;
//! stack.wait_for_operation(id, &op).await;
//! stack.run_until_idle().await;
//! stack.finish().await;
//! ```
#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/event_schemas.rs"]
pub mod event_schemas;
mod tap;

#[allow(unused_imports)]
pub use common::{TestDatabase, strip_ansi, test_settings};
pub use marketplace_fulfillment::store::timeline::EventRow as LogRow;
pub use marketplace_fulfillment::world::{Purchase, View};

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::{Connection, ConnectionProperties};
use marketplace_fulfillment::http::{AppState, router};
use marketplace_fulfillment::marketplace::{CallContext, RetryPolicy};
use marketplace_fulfillment::queue::{
    Broker, InboundMessage, InboxKey, MessageMeta, Publisher, PublisherCommand, headers,
};
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::simulator::{SimulatorConfig, Timings};
use marketplace_fulfillment::store;
use marketplace_fulfillment::worker::{
    EffectsConfig, MetricsListener, ProtocolConfig, WorkerConfig,
};
use marketplace_fulfillment::world::{ChildProcess, SimHandle, World, WorldOptions};
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
    /// Microsoft's ACK window; the simulator's other clocks are fast.
    pub ack_window: Duration,
    /// Run a worker inside the test process (else start `fulfillment work` processes).
    pub in_process_worker: bool,
    /// Last changes to the in-process workers' configuration (prefetch, effect clocks,
    /// ISV deliveries).
    pub worker: fn(&mut WorkerConfig),
    /// Last changes to the simulator's configuration (catalogue, page sizes, link host).
    pub simulator: fn(&mut SimulatorConfig),
    /// Retry tiers of the in-process workers' broker (`None`: production's).
    pub retry_delays: Option<Vec<Duration>>,
    /// Variables on top of the environment (an empty value removes one).
    pub env: Vec<(&'static str, String)>,
    /// Last changes to the settings (e.g. `world::brand_as_contoso`).
    pub settings: fn(&mut Settings),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            policy: json!({}),
            // Long enough that Microsoft's auto-accept cannot pass for our ACK.
            ack_window: Duration::from_secs(8),
            in_process_worker: true,
            worker: |_| {},
            simulator: |_| {},
            retry_delays: None,
            env: Vec::new(),
            settings: |_| {},
        }
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

/// The world and what tests add to it; derefs to the [`World`] (`pool`, `settings`,
/// `sim`, `broker`, `client`, `workers`, `engine`, `run_until_idle`, …).
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
    /// Stops what the stack serves besides the world (a restarted ingress, the worker's
    /// listener), and the restarted ingress's task.
    background: CancellationToken,
    restarted: Option<JoinHandle<anyhow::Result<()>>>,
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
        for (key, value) in options.env {
            match value.is_empty() {
                true => env.remove(key),
                false => env.insert(key.to_string(), value),
            };
        }
        let mut base = Settings::from_sources(None, &env).expect("stack settings");
        if options.policy != json!({}) {
            base.policy = serde_json::from_value(options.policy).expect("a policy");
        }
        (options.settings)(&mut base);
        let (tap, tap_url) = tap::Tap::start().await;
        let mut worker_config = WorkerConfig {
            prefetch: 8,
            effects: EffectsConfig {
                concurrency: 2,
                ..EffectsConfig::fast()
            },
            ..WorkerConfig::default()
        };
        (options.worker)(&mut worker_config);
        let (ack_window, simulator) = (options.ack_window, options.simulator);
        let world_options = WorldOptions {
            ingress: true,
            webhook_url: Some(tap_url),
            worker: options.in_process_worker.then(|| worker_config.clone()),
            client_retries: Some(RetryPolicy {
                min_delay: Duration::from_millis(5),
                max_delay: Duration::from_millis(20),
                max_attempts: 2,
                max_retry_after: Duration::from_millis(50),
                give_up_beyond_cap: false,
            }),
            retry_delays: options.retry_delays,
            configure: Box::new(move |settings, config| {
                // A small pool for the ingress: the PostgreSQL server is shared by every test
                // running at once (the world's own pool, for the workers, keeps its size).
                settings.database.max_connections = 6;
                config.timings = Timings {
                    ack_window,
                    ..Timings::fast()
                };
                simulator(config);
                Ok(())
            }),
            ..WorldOptions::bare("test")
        };
        let mut world = World::start(&base, world_options).await.expect("the world");
        let ingress = world.ingress.expect("an ingress");
        tap.forward_to(world.url("/webhook").parse().unwrap());
        let domain_queue = format!("{}.test-domain-events", world.settings.amqp.prefix);
        world.delete_at_teardown(domain_queue.clone());
        let (connection, channel) = lapin(&world.settings).await;
        let (declare, bind) = (QueueDeclareOptions::default(), QueueBindOptions::default());
        let exchange = world.broker.topology().domain_exchange();
        let no_arguments = lapin::types::FieldTable::default();
        (channel.queue_declare(domain_queue.as_str().into(), declare, no_arguments.clone()))
            .await
            .unwrap();
        let (queue, key) = (domain_queue.as_str().into(), "#".into());
        (channel.queue_bind(queue, exchange.into(), key, bind, no_arguments))
            .await
            .unwrap();
        let _ = connection.close(200, "bound".into()).await;
        // Millisecond clocks for worker processes, through the [worker] settings.
        let notices = &world.settings.policy.notices;
        let notice_days = notices.term_ending_days.iter().map(u32::to_string);
        let mut process_env = world.process_env();
        for (key, value) in [
            ("DATABASE__MAX_CONNECTIONS", "6".to_string()),
            ("WORKER__PREFETCH", "8".into()),
            ("WORKER__EFFECT_CONCURRENCY", "2".into()),
            ("WORKER__POLL_INTERVAL_MS", "100".into()),
            ("WORKER__BACKOFF_BASE_MS", "50".into()),
            ("WORKER__BACKOFF_MAX_MS", "500".into()),
            ("WORKER__OPERATION_POLL_INTERVAL_MS", "100".into()),
            ("WORKER__ACTIVATION_CHECK_INTERVAL_MS", "100".into()),
            (
                "WORKER__TERM_ENDING_NOTICE_DAYS",
                notice_days.collect::<Vec<_>>().join(","),
            ),
            ("WORKER__NOTICE_DAY_MS", notices.day.as_millis().to_string()),
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
            background: CancellationToken::new(),
            restarted: None,
        }
    }

    /// Starts one more in-process worker: fast effect clocks, a fast client retry policy.
    pub async fn start_worker(&mut self) {
        let config = self.worker_config.clone();
        self.world.add_worker(config).await.expect("worker");
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
        self.world.stop_workers().await.expect("the workers stop");
        self.domain_events().await;
        self.background.cancel();
        if let Some(server) = self.restarted.take() {
            let _ = server.await;
        }
        self.world.teardown().await.expect("the world's teardown");
    }

    // ---- the simulator (Microsoft and the customer) -------------------------------------

    /// A purchase with every field of `POST /simulator/purchases`: `(subscription id,
    /// landing page URL)`.
    pub async fn purchase_with(&self, body: Value) -> (Uuid, Url) {
        let purchase = self.admin.buy(body).await.unwrap();
        (purchase.id, purchase.landing)
    }

    /// Buys `plan` in the simulator (activated by Microsoft itself when `auto`).
    pub async fn buy(&self, plan: &str, quantity: Option<u32>, auto: bool) -> Purchase {
        let body = json!({"planId": plan, "quantity": quantity, "autoActivate": auto});
        self.admin.buy(body).await.unwrap()
    }

    /// A purchase: `(subscription id, landing page URL)`.
    pub async fn purchase(&self, plan: &str, quantity: Option<u32>, auto: bool) -> (Uuid, Url) {
        let purchase = self.buy(plan, quantity, auto).await;
        (purchase.id, purchase.landing)
    }

    /// A customer/Microsoft action (`{action, planId?, quantity?}`); returns the operation id.
    pub async fn act(&self, id: Uuid, body: Value) -> String {
        self.admin.act(id, body).await.unwrap().to_string()
    }

    /// Every subscription the simulator knows (its admin view), by id.
    pub async fn sim_views(&self) -> HashMap<Uuid, Value> {
        let all = self.admin.get("simulator/subscriptions").await.unwrap();
        let all = all["subscriptions"].as_array().unwrap().iter();
        let id = |v: &Value| v["subscription"]["id"].as_str().unwrap().parse().unwrap();
        all.map(|v| (id(v), v.clone())).collect()
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

    /// The customer opens the landing page, signs in and asks for activation.
    pub async fn open_landing(&self, landing: &Url) {
        marketplace_fulfillment::world::activate_on_landing(landing)
            .await
            .unwrap();
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
        let request = self.http.request(method, self.url(path));
        request.bearer_auth(API_KEY)
    }

    /// `path` on the ingress (also after [`Stack::restart_ingress`]).
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
        let mut request = request.header("content-type", "application/json");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.body(body).send().await.unwrap()
    }

    /// Tells the ingress to shut down; returns its task to await.
    pub fn begin_ingress_shutdown(&mut self) -> JoinHandle<anyhow::Result<()>> {
        self.background.cancel();
        let restarted = self.restarted.take();
        restarted.unwrap_or_else(|| self.world.stop_ingress().expect("the ingress runs"))
    }

    /// Replaces the ingress by the production router on a new port, its state
    /// `customise`d (e.g. a webhook verifier of its own); the tap follows it. (The
    /// simulator's landing page URL still names the first ingress.)
    pub async fn restart_ingress(&mut self, customise: impl FnOnce(&Settings, &mut AppState)) {
        let _ = self.begin_ingress_shutdown().await;
        self.background = CancellationToken::new();
        let mut state = AppState::from_settings(&self.settings).await.unwrap();
        customise(&self.settings, &mut state);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        self.ingress = listener.local_addr().unwrap();
        self.tap.forward_to(self.url("/webhook").parse().unwrap());
        let stopped = self.background.clone().cancelled_owned();
        self.restarted = Some(tokio::spawn(async move {
            let serve = axum::serve(listener, router(state.clone()));
            serve.with_graceful_shutdown(stopped).await?;
            state.broker.close().await;
            state.pool.close().await;
            Ok(())
        }));
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
        let sql = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()));
        sql.bind(bind).fetch_one(&self.pool).await.unwrap()
    }

    // ---- RabbitMQ ----------------------------------------------------------------------

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

    /// Messages ready in `queue`.
    pub async fn queue_len(&self, queue: &str) -> u32 {
        self.broker.queue_counts(queue).await.unwrap().0
    }

    /// Takes every message off the dead-letter queue: bodies and headers as text.
    pub async fn drain_dlq(&self) -> Vec<(Value, BTreeMap<String, String>)> {
        self.take_all(&self.broker.topology().dead_letter_queue())
            .await
    }

    /// Takes every message off `queue`: bodies and headers as text.
    pub async fn take_all(&self, queue: &str) -> Vec<(Value, BTreeMap<String, String>)> {
        let (connection, channel) = lapin(&self.settings).await;
        let mut all = Vec::new();
        let get = || channel.basic_get(queue.into(), BasicGetOptions { no_ack: true });
        while let Some(message) = get().await.unwrap() {
            let body = serde_json::from_slice(&message.delivery.data).unwrap_or(Value::Null);
            let headers = headers::stringify(message.delivery.properties.headers().as_ref());
            all.push((body, headers));
        }
        let _ = connection.close(200, "drained".into()).await;
        all
    }

    /// Takes the domain events published since the last call off the test's queue and
    /// checks each against its schema (docs/events/): `(CloudEvent, headers)`.
    pub async fn domain_events(&self) -> Vec<(Value, BTreeMap<String, String>)> {
        if self.broker.queue_counts(&self.domain_queue).await.is_err() {
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
            .map(|(event, _)| event["type"].as_str().unwrap().to_owned())
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
            .unwrap();
    }

    /// Purchases in the simulator and resolves the token: the `PurchaseResolved` message
    /// the landing page would publish, with its message id.
    pub async fn resolve(
        &self,
        plan: &str,
        quantity: Option<u32>,
    ) -> (Uuid, InboundMessage, String) {
        let body = json!({"planId": plan, "quantity": quantity});
        let Purchase { id, token, .. } = self.admin.buy(body).await.unwrap();
        let resolved = self.client.resolve(&CallContext::random(), &token).await;
        let subscription = resolved.unwrap().into_value().subscription.unwrap();
        let resolved_at = OffsetDateTime::now_utc();
        let message = InboundMessage::PurchaseResolved {
            resolved_at,
            subscription: serde_json::to_string(&subscription).unwrap(),
        };
        let key = InboxKey::purchase_resolved(id, resolved_at);
        (id, message, key.into_message_id())
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

    /// Deaf: webhooks are answered 200 and lost before the ingress (Microsoft thinks they
    /// were delivered).
    pub fn set_deaf(&self, deaf: bool) {
        self.tap.set_deaf(deaf);
    }

    // ---- waiting -----------------------------------------------------------------------

    /// Waits until `check` gives a value; panics naming `what` after [`WAIT`].
    pub async fn wait_for<T, Fut>(&self, what: &str, check: impl FnMut() -> Fut) -> T
    where
        Fut: std::future::Future<Output = Option<T>>,
    {
        marketplace_fulfillment::world::wait_until(what, WAIT, check)
            .await
            .unwrap()
    }

    /// Waits until the world is at rest ([`World::run_until_idle`]) within [`WAIT`].
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

    /// Waits until our side holds `id` in `state`, on `plan` and with `quantity` seats
    /// where those are given ([`View::is`]).
    pub async fn wait_for_view(
        &self,
        id: Uuid,
        state: &str,
        plan: Option<&str>,
        quantity: Option<i64>,
    ) -> View {
        let what = format!("{id} in {state} {plan:?} {quantity:?}");
        self.wait_for(&what, || async {
            let view = self.engine(id).await;
            view.filter(|view| view.is(state, plan, quantity))
        })
        .await
    }

    /// Waits until Microsoft's subscription `id` has the status `status`.
    pub async fn wait_for_sim(&self, id: Uuid, status: &str) {
        self.wait_for(&format!("Microsoft's {id} {status}"), || async {
            let view = self.admin.view(id).await.unwrap();
            (view["subscription"]["saasSubscriptionStatus"] == status).then_some(())
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
            let mut received = self.tap.received().into_iter();
            received.find(|body| serde_json::from_str::<Value>(body).unwrap()["id"] == op)
        })
        .await
    }

    /// Waits until Microsoft's webhook for `id` with this action or operation id reached
    /// our ingress (answered 2xx).
    pub async fn wait_for_delivery(&self, id: Uuid, action_or_operation: &str) {
        let what = format!("{action_or_operation} delivered for {id}");
        self.wait_for(&what, || async {
            let view = self.admin.view(id).await.unwrap();
            let named = |w: &&Value| {
                w["action"] == action_or_operation || w["operationId"] == action_or_operation
            };
            let mut webhooks = view["webhooks"].as_array()?.iter().filter(named);
            webhooks.any(|w| w["delivered"] == true).then_some(())
        })
        .await
    }

    /// Waits until a publisher command's row is final: `(status, last error)`.
    pub async fn wait_for_command(&self, command_id: Uuid) -> (String, Option<String>) {
        let row = self.world.wait_for_command(command_id, WAIT).await.unwrap();
        (row.status.as_str().to_owned(), row.last_error)
    }

    /// The checks every burst must pass, those of `bench chaos` and more: each webhook
    /// Microsoft delivered decided exactly once (redeliveries logged as duplicates aside),
    /// no event decided twice, no gap in a subscription's sequence.
    pub async fn assert_each_event_decided_once(&self) {
        let logged = store::verify::logged_webhook_operations(&self.pool).await;
        let logged = logged.unwrap();
        let mut delivered = 0;
        for (id, view) in self.sim_views().await {
            let hooks = view["webhooks"].as_array().unwrap().iter();
            for hook in hooks.filter(|hook| hook["delivered"] == true) {
                let op: Uuid = hook["operationId"].as_str().unwrap().parse().unwrap();
                assert!(logged.contains(&op), "{id}: webhook {hook} not in the log");
                delivered += 1;
            }
        }
        let decided = "SELECT count(*) FROM subscription_events WHERE event_kind LIKE $1 \
                       AND NOT (outcome = 'ignored' AND reason LIKE 'duplicate event%')";
        assert_eq!(
            self.count(decided, "Webhook%").await,
            delivered,
            "webhook decisions"
        );
        assert!(delivered > 0);
        let twice = store::verify::decided_twice(&self.pool).await.unwrap();
        assert!(twice.is_empty(), "decided twice: {twice:?}");
        let gaps = store::verify::sequence_gaps(&self.pool).await.unwrap();
        assert_eq!(gaps, 0, "subscriptions with gaps in their sequence");
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
        (command
            .args(args)
            .env_remove("FULFILLMENT_CONFIG")
            .env_remove("COLUMNS"))
        .env("RUST_LOG", "warn")
        .envs(self.process_env.iter().map(|(k, v)| (k, v)))
        .envs(extra.iter().copied());
        let output = command.output().await.expect("run fulfillment");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let code = output.status.code().unwrap_or(-1);
        (code, text(&output.stdout), text(&output.stderr))
    }

    /// Starts `fulfillment work` with this stack's settings (and `extra` variables); killed
    /// when dropped.
    pub async fn spawn_worker_process(&self, extra: &[(&str, &str)]) -> ChildProcess {
        let mut env = self.process_env.clone();
        // Several workers (and tests) run at once: each its own metrics port.
        let own = [("RUST_LOG", "info"), ("LOG_FORMAT", "pretty")];
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

/// A RabbitMQ connection and channel of the test's own.
pub async fn lapin(settings: &Settings) -> (Connection, lapin::Channel) {
    let url = settings.amqp.url.expose();
    let properties = ConnectionProperties::default();
    let connection = Connection::connect(url, properties).await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    (connection, channel)
}
