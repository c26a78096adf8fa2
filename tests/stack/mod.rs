//! The one test world: [`World`] (the start path `demo` and the benchmarks share) wired
//! for system tests. The simulator on port 0 sends signed webhooks to the real ingress (its
//! `loseWebhooks` fault loses them on the way); workers (in-process, or `fulfillment work`
//! child processes) apply them. Every test gets its own
//! database and RabbitMQ prefix, removed when the [`Stack`] is dropped, also on a panic.
//! Domain events are collected on a queue of the test's own and checked against
//! docs/events/. Waiting is by condition ([`Stack::wait_for`], [`World::run_until_idle`],
//! [`World::settle`]), never by a bare sleep.
//!
//! ```ignore
//! let stack = Stack::start(Options::default()).await;
//! let id = stack.subscribed("silver", None).await;        // landing page, activation
//! let op = stack.act(id, json!({"action": "ChangePlan", "planId": "gold"})).await;
//! stack.admin.wait_for_operation(id, &op, WAIT).await.unwrap();
//! stack.run_until_idle(WAIT).await.unwrap();
//! stack.finish().await;
//! ```
#![allow(dead_code)]

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/event_schemas.rs"]
pub mod event_schemas;

#[allow(unused_imports)]
pub use common::{
    SIM_SECRET, TestDatabase, serve_local, simulator, simulator_settings, test_settings,
};
pub use marketplace_fulfillment::store::timeline::EventRow as LogRow;
pub use marketplace_fulfillment::world::{Purchase, View};

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use marketplace_fulfillment::marketplace::{CallContext, RetryPolicy};
use marketplace_fulfillment::queue::{InboundMessage, InboxKey, MessageMeta};
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::simulator::{SimulatorConfig, Timings};
use marketplace_fulfillment::store;
use marketplace_fulfillment::worker::{EffectsConfig, WorkerConfig};
use marketplace_fulfillment::world::{
    ChildProcess, SimHandle, World, WorldOptions, activate_on_landing,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
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
    /// Workers inside the test process (0: the test starts `fulfillment work` processes,
    /// or none).
    pub workers: usize,
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
            workers: 1,
            worker: |_| {},
            simulator: |_| {},
            retry_delays: None,
            env: Vec::new(),
            settings: |_| {},
        }
    }
}

/// The world and what tests add to it; derefs to the [`World`] (`pool`, `settings`,
/// `sim`, `broker`, `client`, `workers`, `engine`, `run_until_idle`, …).
pub struct Stack {
    pub world: World,
    pub http: reqwest::Client,
    /// The simulator's admin API.
    pub admin: SimHandle,
    /// Bound to the domain exchange: every domain event the test's workers publish.
    pub domain_queue: String,
    /// What `fulfillment work` processes need in their environment.
    pub process_env: Vec<(String, String)>,
    /// The workers' configuration: fast effect clocks, then `Options::worker`.
    pub worker_config: WorkerConfig,
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
            worker: (options.workers > 0).then(|| worker_config.clone()),
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
        let domain_queue = format!("{}.test-domain-events", world.settings.amqp.prefix);
        world.delete_at_teardown(domain_queue.clone());
        let every_event = world.broker.listen_to_domain_events(&domain_queue, "#");
        every_event.await.expect("the test's domain-event queue");
        // Worker processes run as the in-process workers do.
        let mut process_env = world.process_env();
        process_env.extend(worker_config.to_env());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let mut stack = Stack {
            admin: world.sim_admin(&http),
            http,
            world,
            domain_queue,
            process_env,
            worker_config,
        };
        for _ in 1..options.workers {
            stack.start_worker().await;
        }
        stack
    }

    /// Starts one more in-process worker: fast effect clocks, a fast client retry policy.
    pub async fn start_worker(&mut self) {
        let config = self.worker_config.clone();
        self.world.add_worker(config).await.expect("worker");
    }

    /// Stops the workers, the ingress and the simulator, checks the domain events left on
    /// the test's queue against their schemas and removes the queues and the database.
    pub async fn finish(mut self) {
        self.world.stop_workers().await.expect("the workers stop");
        self.domain_events().await;
        self.world.teardown().await.expect("the world's teardown");
    }

    // ---- the simulator (Microsoft and the customer) -------------------------------------

    /// Buys `plan` in the simulator (activated by Microsoft itself when `auto`).
    pub async fn buy(&self, plan: &str, quantity: Option<u32>, auto: bool) -> Purchase {
        let body = json!({"planId": plan, "quantity": quantity, "autoActivate": auto});
        self.admin.buy(body).await.unwrap()
    }

    /// A customer/Microsoft action (`{action, planId?, quantity?}`); returns the operation id.
    pub async fn act(&self, id: Uuid, body: Value) -> String {
        self.admin.act(id, body).await.unwrap().to_string()
    }

    /// Purchase, landing page, automatic activation; returns once both sides say Subscribed.
    pub async fn subscribed(&self, plan: &str, quantity: Option<u32>) -> Uuid {
        let Purchase { id, landing, .. } = self.buy(plan, quantity, false).await;
        activate_on_landing(&landing).await.unwrap();
        self.wait_for(&format!("{id} Subscribed on both sides"), || async {
            let ours = self.engine(id).await.unwrap()?;
            (ours.state == "Subscribed" && Some(ours) == self.microsoft(id)).then_some(())
        })
        .await;
        id
    }

    /// `n` subscriptions to `plan` (with `quantity` seats), activated, their effects done,
    /// then the workers stopped: what is published next waits on the queue until a worker
    /// starts.
    pub async fn subscribed_then_stopped(
        &mut self,
        plan: &str,
        quantity: Option<u32>,
        n: usize,
    ) -> Vec<Uuid> {
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            ids.push(self.subscribed(plan, quantity).await);
        }
        self.run_until_idle(WAIT).await.unwrap();
        self.world.stop_workers().await.expect("the workers stop");
        ids
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

    // ---- our side --------------------------------------------------------------------

    pub async fn events(&self, id: Uuid) -> Vec<LogRow> {
        store::timeline::events(&self.pool, id).await.unwrap()
    }

    /// Outbox rows not done: `(pending, dead)`.
    pub async fn outbox_left(&self) -> (i64, i64) {
        let pending = store::verify::pending_effects(&self.pool).await.unwrap();
        let dead = store::verify::dead_effects(&self.pool).await.unwrap();
        (pending, dead.iter().map(|(_, _, n)| n).sum())
    }

    /// `SELECT count(*) …` with one text parameter.
    pub async fn count(&self, sql: &str, bind: &str) -> i64 {
        let sql = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()));
        sql.bind(bind).fetch_one(&self.pool).await.unwrap()
    }

    // ---- RabbitMQ ----------------------------------------------------------------------

    /// `(ready messages, consumers)` of the inbound queue.
    pub async fn inbound_queue(&self) -> (u32, u32) {
        let inbound = self.broker.topology().inbound_queue();
        self.broker.queue_counts(&inbound).await.unwrap()
    }

    /// Takes every message off `queue` (a queue of the test's own, or the dead letters):
    /// bodies as JSON and headers as text.
    pub async fn take_all(&self, queue: &str) -> Vec<(Value, BTreeMap<String, String>)> {
        let taken = self.broker.take_all(queue).await.unwrap().into_iter();
        let json = |body: &[u8]| serde_json::from_slice(body).unwrap_or(Value::Null);
        taken.map(|m| (json(&m.body), m.headers)).collect()
    }

    /// Takes every message off the dead-letter queue ([`Self::take_all`]).
    pub async fn dead_letters(&self) -> Vec<(Value, BTreeMap<String, String>)> {
        self.take_all(&self.broker.topology().dead_letter_queue())
            .await
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
        let publisher = self.broker.publisher().await.unwrap();
        publisher.publish_inbound(message, &meta).await.unwrap();
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
            let view = self.engine(id).await.unwrap();
            view.filter(|view| view.is(state, plan, quantity))
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

    /// The checks every burst must pass: those of `bench chaos` ([`World::audit`] of `ids`:
    /// each webhook our ingress accepted is in the event log, no event decided twice, no gap
    /// in a sequence, both sides agree) and one more: as many webhook decisions
    /// (redeliveries logged as duplicates aside) as webhooks accepted.
    pub async fn assert_each_event_decided_once(&self, ids: &[Uuid]) {
        let audit = self.world.audit(&self.http, &self.pool, ids).await.unwrap();
        let lost = audit.lost.len() + audit.accepted_in_dead_letters;
        assert_eq!(lost, 0, "accepted webhooks not in the log: {audit:#?}");
        assert!(audit.duplicate_transitions.is_empty(), "{audit:#?}");
        assert!(
            audit.sequence_gaps == 0 && audit.divergent.is_empty(),
            "{audit:#?}"
        );
        let decided = "SELECT count(*) FROM subscription_events WHERE event_kind LIKE $1 \
                       AND NOT (outcome = 'ignored' AND reason LIKE 'duplicate event%')";
        let accepted = audit.webhooks_accepted as i64;
        assert_eq!(
            self.count(decided, "Webhook%").await,
            accepted,
            "webhook decisions"
        );
        assert!(accepted > 0);
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
            let (ready, _) = self.broker.queue_counts(queue).await.unwrap();
            (ready == len).then_some(())
        })
        .await
    }

    // ---- the command line and worker processes ------------------------------------------

    /// Runs `fulfillment ARGS` against this stack (and `extra` variables):
    /// `(exit code, stdout, stderr)`.
    pub async fn cli(&self, args: &[&str], extra: &[(&str, &str)]) -> (i32, String, String) {
        let own = self
            .process_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()));
        let env = [("RUST_LOG", "warn")].into_iter().chain(own);
        common::run_fulfillment(args, env.chain(extra.iter().copied()), false).await
    }

    /// Starts `fulfillment work` with this stack's settings (and `extra` variables); killed
    /// when dropped.
    pub async fn spawn_worker_process(&self, extra: &[(&str, &str)]) -> ChildProcess {
        let own = [("RUST_LOG", "info"), ("LOG_FORMAT", "pretty")];
        let mut env = self.process_env.clone();
        env.extend(
            own.iter()
                .chain(extra)
                .map(|(k, v)| (k.to_string(), v.to_string())),
        );
        let exe = env!("CARGO_BIN_EXE_fulfillment").into();
        let spawned = self.world.spawn_worker(exe, "worker", env).await;
        spawned.expect("start fulfillment work")
    }
}
