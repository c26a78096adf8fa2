//! What every benchmark needs: a throwaway world (the simulator in process, a fresh
//! database on `DATABASE_URL`'s server, a `<prefix>-bench-<id>` RabbitMQ topology, all
//! removed at the end), child processes of this binary with their own logs, and a `VmRSS`
//! sampler.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};
use secrecy::SecretString;
use serde_json::{Value, json};
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::measure;
use crate::queue::{Broker, Topology};
use crate::settings::Settings;
use crate::simulator::customer::ScriptedCustomer;
use crate::simulator::{RunningSimulator, Simulator, SimulatorConfig};

/// How long a child process may take to answer its readiness probe.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a child process may take to drain and exit after SIGTERM.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The throwaway world of one run.
pub(crate) struct BenchEnv {
    pub id: String,
    pub settings: Settings,
    pub sim: RunningSimulator,
    pub broker: Broker,
    pub client_secret: String,
}

impl BenchEnv {
    pub async fn setup(base: &Settings) -> anyhow::Result<Self> {
        Self::setup_with(base, None).await
    }

    /// As [`setup`](Self::setup), with the simulator's webhooks sent to `webhook_url`.
    pub async fn setup_with(base: &Settings, webhook_url: Option<Url>) -> anyhow::Result<Self> {
        Self::setup_with_simulator(base, webhook_url, |_| {}).await
    }

    /// As [`setup_with`](Self::setup_with), with the simulator's configuration adjusted by
    /// `configure` (clocks, seed) before it starts.
    pub async fn setup_with_simulator(
        base: &Settings,
        webhook_url: Option<Url>,
        configure: impl FnOnce(&mut SimulatorConfig),
    ) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..12].to_string();
        let mut settings = base.clone();
        let base_name = base.database.url.url().path().trim_start_matches('/');
        settings.database.url = base
            .database
            .url
            .with_path(&format!("/{base_name}_bench_{id}"));
        settings.amqp.prefix = format!("{}-bench-{id}", base.amqp.prefix);

        crate::store::migrate(&settings.database)
            .await
            .context("cannot create the benchmark database")?;
        let client_secret = format!("bench-secret-{}", Uuid::new_v4().simple());
        let mut config = SimulatorConfig::new(Uuid::new_v4(), Uuid::new_v4());
        config.client_secret = Some(SecretString::from(client_secret.clone()));
        // Benchmarks time the engine, not the simulated marketplace's own pause before it
        // sends a webhook; its other clocks (the 10 s ACK window) stay as in production.
        if webhook_url.is_some() {
            config.timings.webhook_delay = Duration::ZERO;
        }
        config.webhook_url = webhook_url;
        configure(&mut config);
        let sim = match Simulator::start(config, TcpListener::bind("127.0.0.1:0").await?).await {
            Ok(sim) => sim,
            Err(e) => {
                drop_database(&settings).await;
                return Err(e.context("cannot start the marketplace simulator"));
            }
        };
        let connected = Broker::connect_with_topology(
            &settings.amqp,
            "fulfillment-bench",
            Topology::new(&settings.amqp.prefix),
        )
        .await;
        let broker = match connected {
            Ok(connected) => connected,
            Err(e) => {
                let _ = sim.shutdown().await;
                drop_database(&settings).await;
                return Err(anyhow::Error::new(e)
                    .context("cannot set up the benchmark's RabbitMQ topology"));
            }
        };
        Ok(Self {
            id,
            settings,
            sim,
            broker,
            client_secret,
        })
    }

    /// Empties the inbound queue so no phase pays for the previous one's backlog.
    pub async fn purge(&self) -> anyhow::Result<()> {
        let queue = self.broker.topology().inbound_queue();
        self.broker
            .purge_queue(&queue)
            .await
            .map(|_| ())
            .with_context(|| format!("cannot purge {queue}"))
    }

    /// Messages ready in `queue` and its consumers, as RabbitMQ counts them now (through
    /// the bench's own broker handle, which comes back after `bench chaos` closes or
    /// restarts RabbitMQ).
    pub async fn queue_counts(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        self.broker
            .queue_counts(queue)
            .await
            .with_context(|| format!("cannot inspect {queue}"))
    }

    /// The environment of `fulfillment serve` pointed at this run's simulator, database
    /// and topology.
    pub fn serve_env(&self, listen: SocketAddr, without_jwt: bool) -> Vec<(String, String)> {
        let config = self.sim.config();
        let auth = if without_jwt { "none" } else { "entra" };
        [
            ("MARKETPLACE_API_URL", self.sim.api_url().to_string()),
            ("ENTRA_AUTHORITY_URL", self.sim.authority_url().to_string()),
            ("MARKETPLACE_TENANT_ID", config.tenant_id.to_string()),
            ("MARKETPLACE_CLIENT_ID", config.client_id.to_string()),
            ("MARKETPLACE_CLIENT_SECRET", self.client_secret.clone()),
            ("MARKETPLACE_TOKEN_ENDPOINT", "v2".into()),
            (
                "DATABASE_URL",
                self.settings.database.url.expose().to_string(),
            ),
            ("AMQP_URL", self.settings.amqp.url.expose().to_string()),
            (
                "FULFILLMENT__AMQP__PREFIX",
                self.settings.amqp.prefix.clone(),
            ),
            ("WEBHOOK_AUTH", auth.into()),
            ("WEBHOOK_AUTH_ALLOW_INSECURE", without_jwt.to_string()),
            ("LISTEN_ADDR", listen.to_string()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    pub async fn teardown(self) -> anyhow::Result<()> {
        self.teardown_keeping_database(false).await
    }

    /// As [`teardown`](Self::teardown), leaving the database for inspection when `keep`.
    pub async fn teardown_keeping_database(self, keep: bool) -> anyhow::Result<()> {
        let deleted = self.broker.delete_topology().await;
        self.broker.close().await;
        let _ = self.sim.shutdown().await;
        if !keep {
            drop_database(&self.settings).await;
        }
        deleted.context("cannot delete the benchmark's RabbitMQ topology")
    }
}

pub(crate) async fn drop_database(settings: &Settings) {
    if let Err(error) = crate::store::drop_database(&settings.database.url).await {
        tracing::warn!(%error, "cannot drop the benchmark database");
    }
}

/// While alive, runs `ANALYZE` on a database every [`ANALYZE_EVERY`]; see
/// [`BenchEnv::analyze_while_autovacuum_off`].
pub(crate) struct Analyzer {
    stop: CancellationToken,
}

impl Drop for Analyzer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// How often [`Analyzer`] refreshes the statistics.
pub(crate) const ANALYZE_EVERY: Duration = Duration::from_secs(5);

impl BenchEnv {
    /// Stands in for autovacuum's ANALYZE when the server runs without it (CI machines
    /// turn it off). A throwaway database then never gets statistics, and the plans that
    /// PostgreSQL caches for prepared statements while the tables are nearly empty stay in
    /// use as they grow: the outbox claim took 0.5–1.4 s per call at a thousand pending
    /// rows instead of milliseconds, and activations crawled. `None` when autovacuum is on.
    pub async fn analyze_while_autovacuum_off(&self) -> anyhow::Result<Option<Analyzer>> {
        // ANALYZE takes a second or two under load: not worth a slow-statement warning.
        let options: PgConnectOptions = self
            .settings
            .database
            .url
            .expose()
            .parse()
            .context("DATABASE_URL is not a PostgreSQL URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.disable_statement_logging())
            .await
            .context("cannot connect to the benchmark database")?;
        if crate::store::autovacuum_enabled(&pool).await? {
            pool.close().await;
            return Ok(None);
        }
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(ANALYZE_EVERY);
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        // Fails while PostgreSQL restarts; the next tick tries again.
                        if let Err(e) = crate::store::analyze(&pool).await {
                            tracing::debug!(error = %e, "ANALYZE of the benchmark database failed");
                        }
                    }
                }
            }
            pool.close().await;
        });
        Ok(Some(Analyzer { stop }))
    }
}

/// A child process of this binary, its output in a log file.
pub(crate) struct ChildProcess {
    pub name: &'static str,
    pub child: Child,
    pub pid: u32,
    pub base: Url,
    pub log: PathBuf,
    /// Keep the log file when the process is stopped (a failed run wants it read).
    pub keep_log: bool,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl ChildProcess {
    pub async fn spawn(
        name: &'static str,
        id: &str,
        args: &[&str],
        env: Vec<(String, String)>,
        listen: SocketAddr,
    ) -> anyhow::Result<Self> {
        let log = std::env::temp_dir().join(format!("fulfillment-bench-{id}-{name}.log"));
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let child = start(&args, &env, file)?;
        let pid = child.id().context("the child exited at once")?;
        Ok(Self {
            name,
            child,
            pid,
            base: Url::parse(&format!("http://{listen}/"))?,
            log,
            keep_log: false,
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
        self.child = start(&self.args, &self.env, file)?;
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

    /// SIGTERM, then wait for the drain; SIGKILL when it takes too long.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status()
                .await;
            match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
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
                    bail!(
                        "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM",
                        self.name
                    );
                }
            }
        }
        if !self.keep_log {
            let _ = std::fs::remove_file(&self.log);
        }
        Ok(())
    }
}

fn start(args: &[String], env: &[(String, String)], log: std::fs::File) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    Command::new(&exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {} {}", exe.display(), args.join(" ")))
}

pub(crate) fn free_local_address() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Samples a process's `VmRSS` every 100 ms.
pub(crate) struct RssSampler {
    pub max_kib: Arc<AtomicU64>,
    pid: u32,
    stop: CancellationToken,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let max_kib = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let (max, token) = (Arc::clone(&max_kib), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    _ = token.cancelled() => break,
                    _ = tick.tick() => {
                        if let Some(rss) = measure::proc_status_kib(pid, "VmRSS") {
                            max.fetch_max(rss, Ordering::Relaxed);
                        }
                    }
                }
            }
        });
        Self { max_kib, pid, stop }
    }

    pub fn max_mib(&self) -> f64 {
        self.max_kib.load(Ordering::Relaxed) as f64 / 1024.0
    }

    /// The process's peak RSS (`VmHWM`) while it runs, else the highest sample.
    pub fn peak_mib(&self) -> f64 {
        measure::proc_status_kib(self.pid, "VmHWM")
            .map(|kib| kib as f64 / 1024.0)
            .unwrap_or_else(|| self.max_mib())
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The offer of the simulator's default catalogue.
pub(crate) const OFFER: &str = "contoso-analytics";

/// The simulator's admin API, as the customer uses it.
pub(crate) struct SimHandle {
    pub http: reqwest::Client,
    pub base: Url,
}

impl SimHandle {
    pub async fn post(&self, path: &str, body: Value) -> Result<Value, String> {
        let url = self.base.join(path).map_err(|e| e.to_string())?;
        let response = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("simulator unreachable: {e}"))?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("simulator answered {status} without JSON: {e}"))?;
        if !status.is_success() {
            return Err(format!("simulator answered {status}: {body}"));
        }
        Ok(body)
    }

    /// A customer- or Microsoft-side action (`{action, planId?, quantity?}`) on
    /// `subscription`; returns the operation id.
    pub async fn act(&self, subscription: Uuid, action: Value) -> Result<Uuid, String> {
        let answer = self
            .post(
                &format!("simulator/subscriptions/{subscription}/actions"),
                action,
            )
            .await?;
        answer["operationId"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .ok_or_else(|| format!("no operationId in {answer}"))
    }

    /// The customer changes the seat count; returns the operation id.
    pub async fn change_seats(&self, subscription: Uuid, seats: u32) -> Result<Uuid, String> {
        self.act(
            subscription,
            json!({ "action": "ChangeQuantity", "quantity": seats }),
        )
        .await
    }
}

/// Runs `measure` in a throwaway world whose simulator sends its webhooks to an ingress on
/// a fresh local address (the world of `bench pipeline`, `burst` and `scale`). The children
/// `measure` starts are stopped and the world is torn down whatever happens; the first
/// error wins.
pub(crate) async fn in_pipeline_world<R>(
    settings: &Settings,
    measure: impl AsyncFnOnce(&BenchEnv, SocketAddr, &mut Vec<ChildProcess>) -> anyhow::Result<R>,
) -> anyhow::Result<R> {
    let ingress_addr = free_local_address()?;
    let webhook_url = Url::parse(&format!("http://{ingress_addr}/webhook"))?;
    let env = BenchEnv::setup_with(settings, Some(webhook_url)).await?;
    let mut children = Vec::new();
    let outcome = measure(&env, ingress_addr, &mut children).await;
    let mut stopped = Ok(());
    for child in children {
        if let Err(e) = child.stop().await {
            stopped = Err(e);
        }
    }
    let torn_down = env.teardown().await;
    let report = outcome?;
    stopped?;
    torn_down?;
    Ok(report)
}

/// Waits until no outbox row is pending, so a phase starts on an idle engine; an error
/// after `max`.
pub(crate) async fn wait_for_empty_outbox(
    pool: &sqlx::PgPool,
    max: Duration,
) -> anyhow::Result<()> {
    let by = Instant::now() + max;
    loop {
        let pending = crate::store::verify::pending_effects(pool).await?;
        if pending == 0 {
            return Ok(());
        }
        if Instant::now() > by {
            bail!("{pending} outbox row(s) still pending after {max:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `fulfillment serve` on `ingress_addr` and one `fulfillment work`, both pointed at
/// this run's world, and waits until both are ready; they are pushed onto `children`
/// (ingress first) so the caller stops them whatever happens.
pub(crate) async fn start_ingress_and_worker(
    env: &BenchEnv,
    ingress_addr: SocketAddr,
    http: &reqwest::Client,
    children: &mut Vec<ChildProcess>,
) -> anyhow::Result<()> {
    let ingress = ChildProcess::spawn(
        "ingress",
        &env.id,
        &["serve"],
        env.serve_env(ingress_addr, false),
        ingress_addr,
    )
    .await?;
    children.push(ingress);
    children
        .last_mut()
        .context("no ingress")?
        .wait_ready(http)
        .await?;
    let worker_addr = free_local_address()?;
    let mut worker_env = env.serve_env(free_local_address()?, false);
    worker_env.push(("WORKER_METRICS_ADDR".into(), worker_addr.to_string()));
    let worker = ChildProcess::spawn("worker", &env.id, &["work"], worker_env, worker_addr).await?;
    children.push(worker);
    children
        .last_mut()
        .context("no worker")?
        .wait_ready(http)
        .await
}

/// One purchase for [`purchase_and_activate`]: a plan of [`OFFER`], with seats when it is
/// priced per seat.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Order {
    pub plan: &'static str,
    pub quantity: Option<u32>,
}

/// Buys one subscription per order and, on each landing page of the ingress, signs in and
/// asks for activation (the ingress resolves the token and queues the purchase for the
/// worker, which activates it); returns
/// the subscription ids, in order, once the simulator shows them all Subscribed.
pub(crate) async fn purchase_and_activate(
    env: &BenchEnv,
    sim: &SimHandle,
    ingress: &ChildProcess,
    orders: &[Order],
    timeout: Duration,
) -> anyhow::Result<Vec<Uuid>> {
    // Sixteen purchases at a time: thousands of them (`bench burst`) take seconds, not minutes.
    let buy = |(i, order): (usize, Order)| async move {
        let answer = sim
            .post(
                "simulator/purchases",
                json!({
                    "offerId": OFFER,
                    "planId": order.plan,
                    "quantity": order.quantity,
                    "name": format!("bench-{i}"),
                }),
            )
            .await
            .map_err(anyhow::Error::msg)?;
        let id = answer["subscriptionId"]
            .as_str()
            .and_then(|id| Uuid::parse_str(id).ok())
            .with_context(|| format!("no subscriptionId in {answer}"))?;
        let token = answer["token"]
            .as_str()
            .with_context(|| format!("no token in {answer}"))?;
        let mut landing = ingress.url("/landing");
        landing.query_pairs_mut().append_pair("token", token);
        // The customer signs in (at the simulator) and activates by POST, as in production.
        let customer = ScriptedCustomer::new("customer")?;
        let page = customer
            .activate(&landing, &[])
            .await
            .with_context(|| format!("the landing page of purchase {i}"))?;
        if !page.status.is_success() {
            bail!("the landing page answered {} for purchase {i}", page.status);
        }
        anyhow::Ok(id)
    };
    let subscriptions: Vec<Uuid> = futures_util::stream::iter(orders.iter().copied().enumerate())
        .map(buy)
        .buffered(16)
        .try_collect()
        .await?;
    let deadline = Instant::now() + timeout;
    loop {
        let pending = subscriptions
            .iter()
            .filter(|id| {
                env.sim
                    .view()
                    .subscription_status(**id)
                    .is_none_or(|(status, _, _)| status != "Subscribed")
            })
            .count();
        if pending == 0 {
            return Ok(subscriptions);
        }
        if Instant::now() > deadline {
            bail!(
                "{pending} of {} subscriptions were not activated within {timeout:?}",
                orders.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
