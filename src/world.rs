//! One world to run the engine against: a scratch PostgreSQL database, RabbitMQ names of
//! its own, the Marketplace simulator on port 0 and, when asked, the ingress and workers in
//! this process — the one start path of `fulfillment demo`, the benchmarks
//! (`src/bench/harness.rs`) and the system tests (`tests/stack/`). A [`World`] that is
//! dropped without [`World::teardown`] (a panicking test, a failed benchmark) still deletes
//! its queues and its database.
//!
//! Besides starting and stopping, it holds what every caller checks the world with: the
//! simulator's admin API ([`SimHandle`]), a subscription's state on either side ([`View`]),
//! "wait until" by condition ([`wait_until`], [`World::run_until_idle`]), and the audit of
//! both sides after a run ([`World::audit`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use crate::http::{AppState, Application};
use crate::marketplace::{MarketplaceClient, RetryPolicy, TokenProvider};
use crate::queue::{Broker, Topology};
use crate::settings::Settings;
use crate::simulator::{RunningSimulator, Simulator, SimulatorConfig};
use crate::store;
use crate::worker::protocol::CommandStatus;
use crate::worker::{Worker, WorkerConfig, WorkerParts};

/// The offer of the simulator's default catalogue.
pub const OFFER: &str = "contoso-analytics";

/// Last changes to a world's settings and simulator before it starts.
pub type Configure<'a> =
    Box<dyn FnOnce(&mut Settings, &mut SimulatorConfig) -> anyhow::Result<()> + Send + 'a>;

/// What a world runs besides the database, the topology and the simulator.
pub struct WorldOptions<'a> {
    /// Names the world's database (`<base>_<kind>_<id>`) and prefix (`<base>-<kind>-<id>`).
    pub kind: &'static str,
    /// Names without the id (`<base>_<kind>`); what an earlier run left there is removed
    /// first.
    pub fixed_names: bool,
    /// Serve the ingress (`Application`) in this process; the simulator's webhooks and
    /// landing page then point at it.
    pub ingress: bool,
    /// Where the simulator sends its webhooks instead (a tap, a child `fulfillment serve`).
    pub webhook_url: Option<Url>,
    /// Start one in-process worker with this configuration.
    pub worker: Option<WorkerConfig>,
    /// The in-process workers' client retries (`None`: production's hand-back policy).
    pub client_retries: Option<RetryPolicy>,
    /// Retry tiers of the world's topology (`None`: production's).
    pub retry_delays: Option<Vec<Duration>>,
    /// Last changes before anything starts, once the simulator's address and the publisher
    /// identity are in the settings (credentials, catalogue, clocks).
    pub configure: Configure<'a>,
}

impl WorldOptions<'_> {
    /// The database, topology and simulator only.
    pub fn bare(kind: &'static str) -> Self {
        Self {
            kind,
            fixed_names: false,
            ingress: false,
            webhook_url: None,
            worker: None,
            client_retries: None,
            retry_delays: None,
            configure: Box::new(|_, _| Ok(())),
        }
    }
}

impl std::fmt::Debug for WorldOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorldOptions")
            .field("kind", &self.kind)
            .field("ingress", &self.ingress)
            .field("worker", &self.worker.is_some())
            .finish_non_exhaustive()
    }
}

/// A running world; see the module documentation.
pub struct World {
    /// The short random id in the world's names.
    pub id: String,
    /// The world's settings: its database, prefix, simulator and publisher identity.
    pub settings: Settings,
    pub pool: PgPool,
    pub sim: RunningSimulator,
    /// The world's broker connection, on its topology.
    pub broker: Broker,
    /// The Entra client secret the simulator accepts.
    pub client_secret: String,
    /// The in-process ingress, when started.
    pub ingress: Option<SocketAddr>,
    /// The client the in-process workers call the simulator with.
    pub client: MarketplaceClient,
    pub workers: Vec<Worker>,
    stop_ingress: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    cleanup: Cleanup,
}

impl World {
    /// Creates the world's database and topology and starts the simulator, then what
    /// `options` ask for. `base` gives the servers and the names are derived from it.
    pub async fn start(base: &Settings, options: WorldOptions<'_>) -> anyhow::Result<World> {
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let mut settings = base.clone();
        let base_name = base.database.url.url().path().trim_start_matches('/');
        let kind = options.kind;
        let suffix = match options.fixed_names {
            true => kind.to_string(),
            false => format!("{kind}_{id}"),
        };
        settings.database.url = base
            .database
            .url
            .with_path(&format!("/{base_name}_{suffix}"));
        settings.amqp.prefix = format!("{}-{}", base.amqp.prefix, suffix.replace('_', "-"));
        let mut cleanup = Cleanup {
            settings: settings.clone(),
            retry_delays: options.retry_delays.clone(),
            queues: Vec::new(),
            armed: false,
        };
        if options.fixed_names {
            cleanup.run(false).await?;
        }
        cleanup.armed = true;
        store::migrate(&settings.database)
            .await
            .with_context(|| format!("cannot create the {kind} database"))?;
        let pool = store::connect(&settings.database).await?;

        let sim_listener = crate::http::listener::listen(([127, 0, 0, 1], 0).into())
            .context("cannot listen for the simulator")?;
        let sim_base: Url = format!("http://{}/", sim_listener.local_addr()?).parse()?;
        let (tenant, client_id) = (Uuid::new_v4(), Uuid::new_v4());
        let client_secret = format!("{kind}-secret-{}", Uuid::new_v4().simple());
        settings.marketplace.api_url = sim_base.join("api")?;
        settings.marketplace.entra_authority_url = sim_base.clone();
        settings.marketplace.tenant_id = Some(tenant);
        settings.marketplace.client_id = Some(client_id);
        settings.marketplace.client_secret = Some(SecretString::from(client_secret.clone()));
        settings.ingress.webhook_audiences = vec![client_id.to_string()];
        let mut config = SimulatorConfig::new(tenant, client_id);
        config.client_secret = Some(SecretString::from(client_secret.clone()));
        (options.configure)(&mut settings, &mut config)?;

        let stop_ingress = CancellationToken::new();
        let (ingress, server) = match options.ingress {
            true => {
                let application = Application::build(settings.clone())
                    .await
                    .context("cannot start the ingress")?;
                let ingress = application.local_addr();
                config.webhook_url = Some(format!("http://{ingress}/webhook").parse()?);
                config.landing_page_url = Some(format!("http://{ingress}/landing").parse()?);
                let server = tokio::spawn(application.run_until_stopped(stop_ingress.clone()));
                (Some(ingress), Some(server))
            }
            false => (None, None),
        };
        if let Some(url) = options.webhook_url {
            config.webhook_url = Some(url);
        }
        let sim = Simulator::start(config, sim_listener)
            .await
            .context("cannot start the marketplace simulator")?;
        let topology = match &options.retry_delays {
            Some(delays) => Topology::with_retry_delays(&settings.amqp.prefix, delays),
            None => Topology::new(&settings.amqp.prefix),
        };
        let broker = Broker::connect_with_topology(&settings.amqp, "fulfillment-world", topology)
            .await
            .with_context(|| format!("cannot set up the {kind} RabbitMQ topology"))?;
        let tokens = TokenProvider::for_settings(&settings)?;
        let client = MarketplaceClient::new(&settings.marketplace, tokens)?.with_retry_policy(
            options
                .client_retries
                .unwrap_or_else(RetryPolicy::hand_back),
        );
        let mut world = World {
            id,
            settings,
            pool,
            sim,
            broker,
            client_secret,
            ingress,
            client,
            workers: Vec::new(),
            stop_ingress,
            server,
            cleanup,
        };
        if let Some(config) = options.worker {
            world.add_worker(config).await?;
        }
        Ok(world)
    }

    /// Starts one more in-process worker on the world's pool, broker and client.
    pub async fn add_worker(&mut self, config: WorkerConfig) -> anyhow::Result<()> {
        let parts = WorkerParts {
            pool: self.pool.clone(),
            broker: self.broker.clone(),
            client: self.client.clone(),
            policy: self.settings.policy.clone(),
            api_url: self.settings.marketplace.api_url.clone(),
        };
        let worker = Worker::spawn(parts, config, CancellationToken::new()).await?;
        self.workers.push(worker);
        Ok(())
    }

    /// Stops the in-process workers (what they have not taken waits in the queue).
    pub async fn stop_workers(&mut self) -> anyhow::Result<()> {
        for worker in self.workers.drain(..) {
            worker.stop().await?;
        }
        Ok(())
    }

    /// Tells the in-process ingress to stop; returns its task to await.
    pub fn stop_ingress(&mut self) -> Option<JoinHandle<anyhow::Result<()>>> {
        self.stop_ingress.cancel();
        self.server.take()
    }

    /// Replaces the in-process ingress by a new [`Application`] on the same address (so the
    /// simulator's webhook and landing page URLs still reach it), serving the state of the
    /// world's settings as `customise` leaves it (e.g. a webhook verifier of its own).
    pub async fn restart_ingress(
        &mut self,
        customise: impl FnOnce(&Settings, &mut AppState),
    ) -> anyhow::Result<()> {
        if let Some(server) = self.stop_ingress() {
            let _ = server.await;
        }
        let mut state = AppState::from_settings(&self.settings).await?;
        customise(&self.settings, &mut state);
        let mut settings = self.settings.clone();
        settings.http.listen_addr = self.ingress.unwrap_or(([127, 0, 0, 1], 0).into());
        let application = Application::with_state(&settings, state)?;
        self.ingress = Some(application.local_addr());
        self.stop_ingress = CancellationToken::new();
        let serve = application.run_until_stopped(self.stop_ingress.clone());
        self.server = Some(tokio::spawn(serve));
        Ok(())
    }

    /// Starts `exe work` (`name` in its log's name) with `env`, its probes and metrics on
    /// a free local address; the caller waits for it to be ready.
    pub async fn spawn_worker(
        &self,
        exe: PathBuf,
        name: &'static str,
        mut env: Vec<(String, String)>,
    ) -> anyhow::Result<ChildProcess> {
        let metrics = free_local_address()?;
        env.push(("WORKER_METRICS_ADDR".into(), metrics.to_string()));
        ChildProcess::spawn_exe(exe, name, &self.id, &["work"], env, metrics).await
    }

    /// Also deletes `queue` at teardown (a queue the caller declared on the world's broker).
    pub fn delete_at_teardown(&mut self, queue: String) {
        self.cleanup.queues.push(queue);
    }

    /// `path` on the in-process ingress.
    pub fn url(&self, path: &str) -> String {
        let ingress = self.ingress.expect("the world serves no ingress");
        format!("http://{ingress}{path}")
    }

    /// The simulator's admin API.
    pub fn sim_admin(&self, http: &reqwest::Client) -> SimHandle {
        SimHandle {
            http: http.clone(),
            base: self.sim.base_url(),
        }
    }

    /// The environment of a `fulfillment` child process pointed at this world, with the
    /// world's pool size and notice clock.
    pub fn process_env(&self) -> Vec<(String, String)> {
        let notices = &self.settings.policy.notices;
        let notice_days: Vec<String> = notices
            .term_ending_days
            .iter()
            .map(u32::to_string)
            .collect();
        let mut env = simulator_env(&self.sim);
        env.extend(
            [
                (
                    "DATABASE_URL",
                    self.settings.database.url.expose().to_string(),
                ),
                ("AMQP_URL", self.settings.amqp.url.expose().to_string()),
                (
                    "FULFILLMENT__AMQP__PREFIX",
                    self.settings.amqp.prefix.clone(),
                ),
                ("MARKETPLACE_CLIENT_SECRET", self.client_secret.clone()),
                (
                    "FULFILLMENT__DATABASE__MAX_CONNECTIONS",
                    self.settings.database.max_connections.to_string(),
                ),
                (
                    "FULFILLMENT__WORKER__TERM_ENDING_NOTICE_DAYS",
                    notice_days.join(","),
                ),
                (
                    "FULFILLMENT__WORKER__NOTICE_DAY_MS",
                    notices.day.as_millis().to_string(),
                ),
            ]
            .map(|(key, value)| (key.to_string(), value)),
        );
        env
    }

    /// Our side's view of a subscription, `None` before its first event.
    pub async fn engine(&self, id: Uuid) -> anyhow::Result<Option<View>> {
        let row = store::verify::subscription_state(&self.pool, id).await?;
        Ok(row.map(|(state, plan, quantity)| View {
            state,
            plan,
            quantity: quantity.map(i64::from),
        }))
    }

    /// Microsoft's view of a subscription (the simulator's state, read in process).
    pub fn microsoft(&self, id: Uuid) -> Option<View> {
        let (status, plan, quantity) = self.sim.view().subscription_status(id)?;
        Some(View::at_microsoft(
            &status,
            Some(plan),
            quantity.map(i64::from),
        ))
    }

    /// What is still moving: the in-process workers busy, messages waiting in the inbound
    /// queue, outbox rows pending, simulator operations in progress or webhooks not yet
    /// delivered. Empty when the world is at rest.
    pub async fn busy(&self) -> anyhow::Result<Vec<String>> {
        let mut busy = Vec::new();
        for worker in &self.workers {
            if worker
                .wait_until_idle(Duration::from_secs(3))
                .await
                .is_err()
            {
                busy.push("a worker is busy".to_string());
            }
        }
        let (ready, _) = self
            .broker
            .queue_counts(&self.broker.topology().inbound_queue())
            .await?;
        if ready > 0 {
            busy.push(format!("{ready} messages wait in the inbound queue"));
        }
        let pending = store::verify::pending_effects(&self.pool).await?;
        if pending > 0 {
            busy.push(format!("{pending} outbox rows pending"));
        }
        let outstanding = self.sim.view().outstanding();
        if outstanding.operations_in_progress + outstanding.deliveries_pending > 0 {
            busy.push(format!(
                "Microsoft: {} operations in progress, {} webhooks pending",
                outstanding.operations_in_progress, outstanding.deliveries_pending
            ));
        }
        Ok(busy)
    }

    /// Waits until [`World::busy`] finds nothing twice in a row; an error naming what still
    /// moves after `within`.
    pub async fn run_until_idle(&self, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut calm = 0;
        while calm < 2 {
            let busy = self.busy().await?;
            calm = if busy.is_empty() { calm + 1 } else { 0 };
            if Instant::now() >= deadline {
                bail!("still busy after {within:?}: {}", busy.join("; "));
            }
            if calm == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// What still moves or differs for `ids`: [`World::busy`], outbox rows pending,
    /// operations in progress at Microsoft, and each of `ids` whose two sides differ. Empty
    /// when settled.
    pub async fn unsettled(&self, ids: &[Uuid]) -> anyhow::Result<Vec<String>> {
        let mut problems = self.busy().await?;
        let pending = store::verify::pending_effects(&self.pool).await?;
        if pending > 0 {
            problems.push(format!("{pending} outbox rows pending"));
        }
        let in_progress = self.sim.view().outstanding().operations_in_progress;
        if in_progress > 0 {
            problems.push(format!("{in_progress} operations in progress at Microsoft"));
        }
        for id in ids {
            let (ours, theirs) = (self.engine(*id).await?, self.microsoft(*id));
            if ours != theirs {
                problems.push(format!("{id}: ours {ours:?} ≠ Microsoft's {theirs:?}"));
            }
        }
        Ok(problems)
    }

    /// Waits until [`World::unsettled`] finds nothing three times in a row; after `within`
    /// an error with the differences and the event log of (up to two of) the subscriptions
    /// concerned.
    pub async fn settle(&self, ids: &[Uuid], within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        let mut calm = 0;
        while calm < 3 {
            let problems = self.unsettled(ids).await?;
            calm = if problems.is_empty() { calm + 1 } else { 0 };
            if calm == 0 && Instant::now() >= deadline {
                let mut text = format!("not settled after {within:?}:\n{}\n", problems.join("\n"));
                let named = |id: &Uuid| problems.iter().any(|p| p.contains(&id.to_string()));
                for id in ids.iter().filter(|id| named(id)).take(2) {
                    text.push_str(&self.timeline(*id).await?);
                }
                bail!(text);
            }
            if calm < 3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The event log of `id` and Microsoft's view of it, for failure messages.
    pub async fn timeline(&self, id: Uuid) -> anyhow::Result<String> {
        let mut text = format!("--- event log of {id}\n");
        for row in store::timeline::events(&self.pool, id).await? {
            let effects = row.effects.as_array().into_iter().flatten();
            let effects: Vec<&str> = effects.map(|e| e["type"].as_str().unwrap_or("?")).collect();
            let _ = writeln!(
                text,
                "{:>3} {:<28} {}→{} {:<8} {} [{}]",
                row.sequence,
                row.event_kind,
                row.from_state,
                row.to_state,
                row.outcome,
                row.reason.unwrap_or_default(),
                effects.join(", ")
            );
        }
        let microsoft = self
            .microsoft(id)
            .map_or("unknown".into(), |v| v.to_string());
        let _ = writeln!(text, "--- Microsoft: {microsoft}");
        Ok(text)
    }

    /// Waits until the publisher command `command_id` has ended (neither requested nor
    /// accepted); its row.
    pub async fn wait_for_command(
        &self,
        command_id: Uuid,
        within: Duration,
    ) -> anyhow::Result<store::timeline::PublisherOperationRow> {
        wait_until(&format!("command {command_id} to end"), within, || async {
            let row = store::commands::operation(&self.pool, command_id)
                .await
                .ok()??;
            (!matches!(
                row.status,
                CommandStatus::Requested | CommandStatus::Accepted
            ))
            .then_some(row)
        })
        .await
    }

    /// Stops the workers, the ingress and the simulator and removes the topology and the
    /// database.
    pub async fn teardown(self) -> anyhow::Result<()> {
        self.teardown_keeping_database(false).await
    }

    /// As [`World::teardown`], leaving the database for inspection when `keep_database`.
    pub async fn teardown_keeping_database(mut self, keep_database: bool) -> anyhow::Result<()> {
        let stopped = self.stop_workers().await;
        if let Some(server) = self.stop_ingress() {
            let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
        }
        let _ = self.sim.shutdown().await;
        self.pool.close().await;
        let deleted = self.broker.delete_topology().await;
        self.broker.close().await;
        self.cleanup.armed = false;
        let cleaned = self.cleanup.run(keep_database).await;
        stopped?;
        deleted.context("cannot delete the world's RabbitMQ topology")?;
        cleaned
    }
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("World")
            .field("database", &self.settings.database.url.redacted())
            .field("prefix", &self.settings.amqp.prefix)
            .field("simulator", &self.sim.base_url().as_str())
            .field("ingress", &self.ingress)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

// ---- the audit after a run ---------------------------------------------------------------

/// Both sides after a run, for `subscriptions`: Microsoft's operations and webhooks as the
/// simulator logged them, checked against our event log, dead letters and states — what
/// `bench chaos` reports and the burst tests assert ([`World::audit`]).
#[derive(Debug, Default)]
pub struct Audit {
    pub subscriptions: usize,
    /// Operations whose webhook the simulator sent.
    pub webhooks_sent: usize,
    /// Of those, the ones our ingress answered 2xx at least once.
    pub webhooks_accepted: usize,
    pub never_accepted: Vec<String>,
    pub deliveries: usize,
    pub duplicate_deliveries: usize,
    /// Every answer of the ingress to a delivery attempt, by status.
    pub answers: BTreeMap<String, usize>,
    /// Accepted webhooks neither in the event log nor in the dead-letter queue.
    pub lost: Vec<String>,
    /// Accepted webhooks not in the event log but in the dead-letter queue.
    pub accepted_in_dead_letters: usize,
    /// Event keys decided (applied or rejected) more than once.
    pub duplicate_transitions: Vec<String>,
    /// Subscriptions whose event-log sequence has a gap.
    pub sequence_gaps: usize,
    /// Subscriptions whose state, plan or seats differ between the two sides.
    pub divergent: Vec<String>,
    pub dead_letters_queue: usize,
    pub dead_letters_outbox: usize,
    pub dead_letter_reasons: BTreeMap<String, usize>,
    /// The simulator's operations by action, status and resolution.
    pub operations: BTreeMap<String, usize>,
    /// Changes Microsoft accepted because our ACK was late.
    pub auto_accepted: Vec<AutoAccepted>,
}

/// A change Microsoft accepted because our ACK came after its window.
#[derive(Debug, Clone)]
pub struct AutoAccepted {
    pub line: String,
    /// When Microsoft created the operation: its ACK window starts here.
    pub created: Option<OffsetDateTime>,
}

/// One operation of the simulator and what happened to its webhook.
#[derive(Debug, Default)]
struct OperationAudit {
    action: String,
    status: String,
    resolution: String,
    /// Deliveries of its webhook (the first and any duplicates).
    deliveries: usize,
    accepted: bool,
    /// Every answer the ingress gave, by status code (or `error`).
    answers: Vec<String>,
    /// When Microsoft created it: its ACK window starts here.
    created: Option<OffsetDateTime>,
}

impl World {
    /// [`Audit`]s `subscriptions` (the simulator's admin API read with `http`, our side
    /// with `pool`).
    pub async fn audit(
        &self,
        http: &reqwest::Client,
        pool: &PgPool,
        subscriptions: &[Uuid],
    ) -> anyhow::Result<Audit> {
        let mut audit = Audit::default();
        let ours: HashSet<Uuid> = subscriptions.iter().copied().collect();
        let views: Value = http
            .get(self.sim.base_url().join("simulator/subscriptions")?)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
            .context("the simulator's subscription list is not JSON")?;
        let views = views["subscriptions"]
            .as_array()
            .context("the simulator's subscription list has no `subscriptions`")?;

        // The simulator's side: operations, their webhooks, the final state.
        let mut operations: HashMap<Uuid, (Uuid, OperationAudit)> = HashMap::new();
        let mut theirs: HashMap<Uuid, (String, Option<String>, Option<i64>)> = HashMap::new();
        for view in views {
            let Some(id) = uuid_at(&view["subscription"]["id"]).filter(|id| ours.contains(id))
            else {
                continue;
            };
            let sub = &view["subscription"];
            let status = match sub["saasSubscriptionStatus"].as_str().unwrap_or_default() {
                "PendingFulfillmentStart" | "NotStarted" => "PendingFulfillment".to_string(),
                other => other.to_string(),
            };
            theirs.insert(
                id,
                (
                    status,
                    sub["planId"].as_str().map(str::to_string),
                    sub["quantity"].as_i64(),
                ),
            );
            for op in view["operations"].as_array().into_iter().flatten() {
                let Some(op_id) = uuid_at(&op["id"]) else {
                    continue;
                };
                let entry = operations
                    .entry(op_id)
                    .or_insert_with(|| (id, OperationAudit::default()));
                entry.1.action = op["action"].as_str().unwrap_or_default().to_string();
                entry.1.status = op["status"].as_str().unwrap_or_default().to_string();
                entry.1.resolution = op["resolution"].as_str().unwrap_or_default().to_string();
                entry.1.created = op["timeStamp"].as_str().and_then(|t| {
                    OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
                });
            }
            for delivery in view["webhooks"].as_array().into_iter().flatten() {
                if delivery["injected"].as_bool() == Some(true) {
                    continue;
                }
                let Some(op_id) = uuid_at(&delivery["operationId"]) else {
                    continue;
                };
                let entry = operations
                    .entry(op_id)
                    .or_insert_with(|| (id, OperationAudit::default()));
                entry.1.deliveries += 1;
                if delivery["duplicate"].as_bool() == Some(true) {
                    audit.duplicate_deliveries += 1;
                }
                for attempt in delivery["attempts"].as_array().into_iter().flatten() {
                    let answer = match attempt["statusCode"].as_u64() {
                        Some(code) => {
                            if (200..300).contains(&code) {
                                entry.1.accepted = true;
                            }
                            code.to_string()
                        }
                        None => "error".to_string(),
                    };
                    entry.1.answers.push(answer);
                }
            }
        }

        // Our side: the event log's webhooks, the dead letters, the state.
        let logged: HashSet<Uuid> = store::verify::logged_webhook_operations(pool)
            .await?
            .into_iter()
            .collect();
        let dead_letters = crate::ops::dlq::list(&self.broker, &crate::ops::dlq::Filter::default())
            .await
            .context("cannot read the dead-letter queue")?;
        let dead_lettered: HashSet<Uuid> = dead_letters
            .iter()
            .filter_map(|letter| Uuid::parse_str(&letter.id).ok())
            .collect();
        for letter in &dead_letters {
            let reason = format!(
                "queue: {} {}",
                letter.action.as_deref().unwrap_or(&letter.message_type),
                normalize(letter.reason.as_deref().unwrap_or("no reason recorded"))
            );
            *audit.dead_letter_reasons.entry(reason).or_default() += 1;
            audit.dead_letters_queue += 1;
        }
        let dead_rows = store::verify::dead_effects(pool).await?;
        for (kind, error, count) in dead_rows {
            let reason = format!(
                "outbox: {kind} {}",
                normalize(error.as_deref().unwrap_or("no error recorded"))
            );
            *audit.dead_letter_reasons.entry(reason).or_default() += count as usize;
            audit.dead_letters_outbox += count as usize;
        }

        for (op_id, (subscription, op)) in &operations {
            if op.resolution == "auto-accepted" {
                audit.auto_accepted.push(AutoAccepted {
                    line: format!("{subscription} {} {op_id}", op.action),
                    created: op.created,
                });
            }
            *audit
                .operations
                .entry(format!(
                    "{} {} ({})",
                    op.action,
                    op.status,
                    normalize(&op.resolution)
                ))
                .or_default() += 1;
            if op.deliveries == 0 {
                continue;
            }
            audit.webhooks_sent += 1;
            audit.deliveries += op.deliveries;
            for answer in &op.answers {
                *audit.answers.entry(answer.clone()).or_default() += 1;
            }
            if !op.accepted {
                audit.never_accepted.push(format!(
                    "{subscription} {} {op_id}: answers [{}]",
                    op.action,
                    op.answers.join(", ")
                ));
                continue;
            }
            audit.webhooks_accepted += 1;
            if logged.contains(op_id) {
                continue;
            }
            if dead_lettered.contains(op_id) {
                audit.accepted_in_dead_letters += 1;
            } else {
                audit
                    .lost
                    .push(format!("{subscription} {} {op_id}", op.action));
            }
        }

        let duplicates = store::verify::decided_twice(pool).await?;
        audit.duplicate_transitions = duplicates
            .into_iter()
            .map(|(id, key, n)| format!("{id} {key}: decided {n} times"))
            .collect();
        audit.sequence_gaps = store::verify::sequence_gaps(pool).await? as usize;

        let rows = store::verify::subscription_states(pool, subscriptions).await?;
        let rows: HashMap<Uuid, (String, Option<String>, Option<i32>)> = rows
            .into_iter()
            .map(|(id, state, plan, seats)| (id, (state, plan, seats)))
            .collect();
        audit.subscriptions = subscriptions.len();
        for id in subscriptions {
            let Some((status, plan, seats)) = theirs.get(id) else {
                audit
                    .divergent
                    .push(format!("{id}: the simulator does not know it"));
                continue;
            };
            match rows.get(id) {
                None => audit.divergent.push(format!(
                    "{id}: unknown here; Microsoft: {status} {} {seats:?}",
                    plan.as_deref().unwrap_or("-")
                )),
                Some((our_state, our_plan, our_seats))
                    if our_state != status
                        || our_plan != plan
                        || our_seats.map(i64::from) != *seats =>
                {
                    audit.divergent.push(format!(
                        "{id}: ours {our_state} {} {our_seats:?}, Microsoft's {status} {} {seats:?}",
                        our_plan.as_deref().unwrap_or("-"),
                        plan.as_deref().unwrap_or("-")
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(audit)
    }
}

fn uuid_at(value: &Value) -> Option<Uuid> {
    value.as_str().and_then(|s| Uuid::parse_str(s).ok())
}

/// A reason with its ids replaced by `…`, so equal reasons group together.
pub(crate) fn normalize(reason: &str) -> String {
    let words: Vec<String> = reason
        .split(' ')
        .map(|word| {
            let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-');
            if bare.len() >= 32 && Uuid::parse_str(bare).is_ok() {
                word.replace(bare, "…")
            } else {
                word.to_string()
            }
        })
        .collect();
    let joined = words.join(" ");
    match joined.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &joined[..cut]),
        None => joined,
    }
}

/// Deletes a world's queues and database when it was not torn down (after a panic).
struct Cleanup {
    settings: Settings,
    retry_delays: Option<Vec<Duration>>,
    /// Queues the caller declared besides the topology's.
    queues: Vec<String>,
    armed: bool,
}

impl Cleanup {
    async fn run(&self, keep_database: bool) -> anyhow::Result<()> {
        let amqp = &self.settings.amqp;
        let mut topologies = vec![Topology::new(&amqp.prefix)];
        topologies.extend(
            self.retry_delays
                .as_ref()
                .map(|delays| Topology::with_retry_delays(&amqp.prefix, delays)),
        );
        for topology in topologies {
            if let Ok(broker) = Broker::connect_with_topology(amqp, "world-cleanup", topology).await
            {
                for queue in &self.queues {
                    let _ = broker.delete_queue(queue).await;
                }
                let deleted = broker.delete_topology().await;
                broker.close().await;
                deleted.context("cannot delete the world's RabbitMQ topology")?;
            }
        }
        if !keep_database {
            store::drop_database(&self.settings.database.url)
                .await
                .context("cannot drop the world's database")?;
        }
        Ok(())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let cleanup = Cleanup {
            settings: self.settings.clone(),
            retry_delays: self.retry_delays.take(),
            queues: std::mem::take(&mut self.queues),
            armed: false,
        };
        block_on_own_thread(async move { cleanup.run(false).await });
    }
}

/// Runs `work` to completion on a thread with a runtime of its own and waits for it: what
/// `Drop` can do inside a runtime or outside one. `None` when that runtime cannot start.
pub fn block_on_own_thread<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> Option<T> {
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        runtime.ok().map(|runtime| runtime.block_on(work))
    });
    thread.join().ok().flatten()
}

/// The landing page as the ISV's customers see it in the demo and the browser tests:
/// Contoso's branding, a session key and one onboarding question.
pub fn brand_as_contoso(settings: &mut Settings) {
    settings.web.session_key = Some(crate::settings::SessionKey::generate());
    settings.web.branding.product_name = "Contoso Analytics".into();
    settings.web.branding.support_contact = Some("support@contoso-analytics.example".into());
    settings.web.branding.product_url = "https://app.contoso-analytics.example/".parse().ok();
    settings.web.onboarding_fields = vec![crate::settings::OnboardingField {
        name: "company".into(),
        label: "Company name".into(),
    }];
}

/// State, plan and seats of a subscription as one side sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct View {
    pub state: String,
    pub plan: Option<String>,
    pub quantity: Option<i64>,
}

impl View {
    /// In `state`, on `plan` and with `quantity` seats where those are given.
    pub fn is(&self, state: &str, plan: Option<&str>, quantity: Option<i64>) -> bool {
        self.state == state
            && (plan.is_none() || self.plan.as_deref() == plan)
            && (quantity.is_none() || self.quantity == quantity)
    }

    /// Microsoft's `saasSubscriptionStatus` in our state names.
    pub fn at_microsoft(status: &str, plan: Option<String>, quantity: Option<i64>) -> View {
        let state = match status {
            "PendingFulfillmentStart" | "NotStarted" => "PendingFulfillment",
            other => other,
        };
        View {
            state: state.to_string(),
            plan,
            quantity,
        }
    }

    /// The simulator's admin view (`GET /simulator/subscriptions/{id}`) in our terms.
    pub fn of_sim_view(view: &Value) -> View {
        let subscription = &view["subscription"];
        View::at_microsoft(
            subscription["saasSubscriptionStatus"]
                .as_str()
                .unwrap_or("?"),
            subscription["planId"].as_str().map(str::to_string),
            subscription["quantity"].as_i64(),
        )
    }
}

impl std::fmt::Display for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plan = self.plan.as_deref().unwrap_or("-");
        let quantity = self.quantity.map_or("-".to_string(), |q| q.to_string());
        write!(f, "{} / {plan} / {quantity}", self.state)
    }
}

/// A purchase in the simulator: the subscription, its marketplace token and landing page.
#[derive(Debug, Clone)]
pub struct Purchase {
    pub id: Uuid,
    pub token: String,
    pub landing: Url,
}

/// The simulator's admin API (`/simulator/...`), as the customer and Microsoft use it.
#[derive(Debug, Clone)]
pub struct SimHandle {
    pub http: reqwest::Client,
    pub base: Url,
}

impl SimHandle {
    /// `method path` with a JSON body (none when `Null`); the JSON answer, or why not.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, String> {
        let url = self.base.join(path).map_err(|e| e.to_string())?;
        let mut request = self.http.request(method, url);
        if !body.is_null() {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("simulator unreachable: {e}"))?;
        let status = response.status();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            return Err(format!("simulator {path} answered {status}: {answer}"));
        }
        Ok(answer)
    }

    pub async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        self.call(reqwest::Method::POST, path, body).await
    }

    pub async fn get(&self, path: &str) -> Result<Value, String> {
        self.call(reqwest::Method::GET, path, Value::Null).await
    }

    /// A purchase (`POST /simulator/purchases`, `offerId` [`OFFER`] unless given): the
    /// simulator's answer (`subscriptionId`, `token`, `landingUrl`).
    pub async fn purchase(&self, mut body: Value) -> Result<Value, String> {
        if body.get("offerId").is_none() {
            body["offerId"] = json!(OFFER);
        }
        self.post("simulator/purchases", body).await
    }

    /// [`purchase`](Self::purchase), its answer parsed.
    pub async fn buy(&self, body: Value) -> anyhow::Result<Purchase> {
        let answer = self.purchase(body).await.map_err(anyhow::Error::msg)?;
        let field = |name| {
            answer[name]
                .as_str()
                .with_context(|| format!("no {name} in {answer}"))
        };
        Ok(Purchase {
            id: field("subscriptionId")?.parse()?,
            token: field("token")?.to_owned(),
            landing: field("landingUrl")?.parse()?,
        })
    }

    /// A customer- or Microsoft-side action (`{action, planId?, quantity?}`) on
    /// `subscription`; returns the operation id.
    pub async fn act(&self, subscription: Uuid, action: Value) -> Result<Uuid, String> {
        let path = format!("simulator/subscriptions/{subscription}/actions");
        let answer = self.post(&path, action).await?;
        answer["operationId"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| format!("no operationId in {answer}"))
    }

    /// The customer changes the seat count; returns the operation id.
    pub async fn change_seats(&self, subscription: Uuid, seats: u32) -> Result<Uuid, String> {
        let action = json!({ "action": "ChangeQuantity", "quantity": seats });
        self.act(subscription, action).await
    }

    /// The admin view of one subscription: the subscription, its operations and webhooks.
    pub async fn view(&self, subscription: Uuid) -> Result<Value, String> {
        self.get(&format!("simulator/subscriptions/{subscription}"))
            .await
    }

    /// Waits until Microsoft's operation `operation` on `subscription` is final (neither
    /// `NotStarted` nor `InProgress`); the admin view of it.
    pub async fn wait_for_operation(
        &self,
        subscription: Uuid,
        operation: &str,
        within: Duration,
    ) -> anyhow::Result<Value> {
        wait_until(&format!("operation {operation} to end"), within, || async {
            let view = self.view(subscription).await.ok()?;
            let open = |o: &Value| o["status"] == "InProgress" || o["status"] == "NotStarted";
            let mut operations = view["operations"].as_array()?.iter();
            operations
                .find(|o| o["id"] == operation && !open(o))
                .cloned()
        })
        .await
    }

    /// `PUT /simulator/faults`.
    pub async fn set_faults(&self, faults: Value) -> Result<Value, String> {
        self.call(reqwest::Method::PUT, "simulator/faults", faults)
            .await
    }
}

/// How long a child process may take to answer its readiness probe.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child process may take to drain and exit after SIGTERM.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// A child process of this binary (`fulfillment serve`, `work`, …), its output in a log
/// file; killed when dropped. The benchmarks' processes and the tests' worker processes.
#[derive(Debug)]
pub struct ChildProcess {
    pub name: &'static str,
    pub child: Child,
    pub pid: u32,
    pub base: Url,
    pub log: PathBuf,
    /// Keep the log file when the process is stopped (a failed run wants it read).
    pub keep_log: bool,
    exe: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ChildProcess {
    /// Starts this executable with `args` and `env` (on top of ours); `listen` is where
    /// it serves its probes.
    pub async fn spawn(
        name: &'static str,
        id: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find this executable")?;
        Self::spawn_exe(exe, name, id, args, env, listen).await
    }

    /// As [`spawn`](Self::spawn), for the executable `exe` (a test's `fulfillment`).
    pub async fn spawn_exe(
        exe: PathBuf,
        name: &'static str,
        id: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let unique = Uuid::new_v4().simple().to_string();
        let log =
            std::env::temp_dir().join(format!("fulfillment-{id}-{name}-{}.log", &unique[..8]));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = start(&exe, &args, &env, file)?;
        let pid = child.id().context("the child exited at once")?;
        Ok(Self {
            name,
            child,
            pid,
            base: Url::parse(&format!("http://{listen}/"))?,
            log,
            keep_log: false,
            exe,
            args,
            env,
        })
    }

    /// SIGKILL, no chance to finish anything; returns once the process is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        // tokio's `kill` is SIGKILL on Unix, then waits.
        self.child
            .kill()
            .await
            .with_context(|| format!("cannot kill {} (pid {})", self.name, self.pid))
    }

    /// Starts the same command again (after [`kill`](Self::kill) or an exit), its output
    /// appended to the same log.
    pub fn respawn(&mut self) -> anyhow::Result<()> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        self.child = start(&self.exe, &self.args, &self.env, file)?;
        self.pid = self.child.id().context("the child exited at once")?;
        Ok(())
    }

    /// The exit status when the process has ended.
    pub fn exited(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    pub fn url(&self, path: &str) -> Url {
        let mut url = self.base.clone();
        url.set_path(path);
        url
    }

    /// Polls `GET /readyz` until 200; fails when the child exits or the time is up.
    pub async fn wait_ready(&mut self, http: &reqwest::Client) -> anyhow::Result<()> {
        let started = Instant::now();
        let url = self.url("/readyz");
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited during startup ({status}); its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if let Ok(response) = http.get(url.clone()).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if started.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} was not ready within {READY_TIMEOUT:?}; its log:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// SIGTERM, then wait for the drain; SIGKILL when it takes longer than
    /// [`STOP_TIMEOUT`].
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop_within(STOP_TIMEOUT).await
    }

    /// As [`stop`](Self::stop), allowing the drain `timeout`.
    pub async fn stop_within(mut self, timeout: Duration) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()
                .await;
            match tokio::time::timeout(timeout, self.child.wait()).await {
                Ok(status) => {
                    let status = status?;
                    if !status.success() {
                        bail!(
                            "{} exited with {status} after SIGTERM; its log:\n{}",
                            self.name,
                            self.log_tail()
                        );
                    }
                }
                Err(_) => {
                    let _ = self.child.kill().await;
                    bail!("{} did not stop within {timeout:?} of SIGTERM", self.name);
                }
            }
        }
        if !self.keep_log {
            let _ = std::fs::remove_file(&self.log);
        }
        Ok(())
    }
}

fn start(
    exe: &std::path::Path,
    args: &[String],
    env: &[(String, String)],
    log: std::fs::File,
) -> anyhow::Result<Child> {
    Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} {}", exe.display(), args.join(" ")))
}

/// The variables that point an engine at `sim`: its Fulfillment API, its Entra stand-in
/// and the publisher identity it knows (the client secret, if any, is the caller's).
pub fn simulator_env(sim: &RunningSimulator) -> Vec<(String, String)> {
    let config = sim.config();
    [
        ("MARKETPLACE_API_URL", sim.api_url().to_string()),
        ("ENTRA_AUTHORITY_URL", sim.authority_url().to_string()),
        ("MARKETPLACE_TENANT_ID", config.tenant_id.to_string()),
        ("MARKETPLACE_CLIENT_ID", config.client_id.to_string()),
    ]
    .map(|(key, value)| (key.to_string(), value))
    .into()
}

/// The customer opens the landing page `landing`, signs in at the simulator's Entra
/// stand-in and asks for activation (the form's POST).
pub async fn activate_on_landing(landing: &Url) -> anyhow::Result<()> {
    let customer = crate::simulator::customer::ScriptedCustomer::new("customer")?;
    let page = customer.activate(landing, &[]).await?;
    if !page.status.is_success() {
        bail!("the landing page answered {}: {}", page.status, page.html);
    }
    Ok(())
}

/// Runs `rabbitmqctl ARGS` (broker faults in `bench chaos` and the tests); its stdout.
pub async fn rabbitmqctl(args: &[&str]) -> anyhow::Result<String> {
    run_tool("rabbitmqctl", args).await
}

/// Runs a tool with a time limit; its stdout, or an error with its stderr.
pub async fn run_tool(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(program)
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("`{program} {}` did not finish within 60 s", args.join(" ")))?
    .with_context(|| format!("cannot run {program}"))?;
    if !output.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A local address nothing listens on (for a child process to bind, or to find closed).
pub fn free_local_address() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Polls `check` every 50 ms until it gives a value; an error naming `what` after `within`.
pub async fn wait_until<T, F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
