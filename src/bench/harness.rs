//! What every benchmark needs: a throwaway [`World`] (the simulator in process, a fresh
//! database on `DATABASE_URL`'s server, a `<prefix>-bench-<id>` RabbitMQ topology, all
//! removed at the end), child processes of this binary with their own logs
//! ([`ChildProcess`]), and a `VmRSS` sampler.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::json;
use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use super::measure;
use crate::settings::Settings;
use crate::simulator::SimulatorConfig;
use crate::world::{Purchase, World, WorldOptions, activate_on_landing, wait_until};

/// The throwaway world of one run: the shared [`World`] without an ingress or workers of
/// its own (the benchmarks start those as child processes).
pub(crate) type BenchEnv = World;

impl World {
    pub(crate) async fn setup(base: &Settings) -> anyhow::Result<Self> {
        Self::setup_with(base, None).await
    }

    /// As [`setup`](Self::setup), with the simulator's webhooks sent to `webhook_url`.
    pub(crate) async fn setup_with(
        base: &Settings,
        webhook_url: Option<Url>,
    ) -> anyhow::Result<Self> {
        Self::setup_with_simulator(base, webhook_url, |_| {}).await
    }

    /// As [`setup_with`](Self::setup_with), with the simulator's configuration adjusted by
    /// `configure` (clocks, seed) before it starts.
    pub(crate) async fn setup_with_simulator(
        base: &Settings,
        webhook_url: Option<Url>,
        configure: impl FnOnce(&mut SimulatorConfig) + Send,
    ) -> anyhow::Result<Self> {
        // Benchmarks time the engine, not the simulated marketplace's own pause before it
        // sends a webhook; its other clocks (the 10 s ACK window) stay as in production.
        let fast_webhooks = webhook_url.is_some();
        let options = WorldOptions {
            webhook_url,
            configure: Box::new(move |_, config| {
                if fast_webhooks {
                    config.timings.webhook_delay = Duration::ZERO;
                }
                configure(config);
                Ok(())
            }),
            ..WorldOptions::bare("bench")
        };
        World::start(base, options).await
    }

    /// Empties the inbound queue so no phase pays for the previous one's backlog.
    pub(crate) async fn purge(&self) -> anyhow::Result<()> {
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
    pub(crate) async fn queue_counts(&self, queue: &str) -> anyhow::Result<(u32, u32)> {
        self.broker
            .queue_counts(queue)
            .await
            .with_context(|| format!("cannot inspect {queue}"))
    }

    /// The environment of `fulfillment serve` pointed at this run's simulator, database
    /// and topology.
    pub(crate) fn serve_env(&self, listen: SocketAddr, without_jwt: bool) -> Vec<(String, String)> {
        let auth = if without_jwt { "none" } else { "entra" };
        let mut env = self.process_env();
        env.extend(
            [
                ("MARKETPLACE_TOKEN_ENDPOINT", "v2".into()),
                ("WEBHOOK_AUTH", auth.into()),
                ("WEBHOOK_AUTH_ALLOW_INSECURE", without_jwt.to_string()),
                ("LISTEN_ADDR", listen.to_string()),
                ("LOG_FORMAT", "json".into()),
                ("RUST_LOG", "warn".into()),
            ]
            .map(|(k, v)| (k.to_string(), v)),
        );
        env
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
    pub(crate) async fn analyze_while_autovacuum_off(&self) -> anyhow::Result<Option<Analyzer>> {
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

pub(crate) use crate::world::{ChildProcess, free_local_address};

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

pub(crate) use crate::world::{OFFER, SimHandle};

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
    wait_until("an empty outbox", max, || async {
        let pending = crate::store::verify::pending_effects(pool).await.ok()?;
        (pending == 0).then_some(())
    })
    .await
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
    let worker_env = env.serve_env(free_local_address()?, false);
    let worker = env.spawn_worker(std::env::current_exe()?, "worker", worker_env);
    let worker = worker.await?;
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
        let (plan, quantity, name) = (order.plan, order.quantity, format!("bench-{i}"));
        let purchase = json!({"planId": plan, "quantity": quantity, "name": name});
        let Purchase { id, token, .. } = sim.buy(purchase).await?;
        let mut landing = ingress.url("/landing");
        landing.query_pairs_mut().append_pair("token", &token);
        // The customer signs in (at the simulator) and activates by POST, as in production.
        activate_on_landing(&landing)
            .await
            .with_context(|| format!("the landing page of purchase {i}"))?;
        anyhow::Ok(id)
    };
    let subscriptions: Vec<Uuid> = futures_util::stream::iter(orders.iter().copied().enumerate())
        .map(buy)
        .buffered(16)
        .try_collect()
        .await?;
    let pending = || {
        let view = env.sim.view();
        let activated = |id: &Uuid| {
            view.subscription_status(*id)
                .is_some_and(|(s, _, _)| s == "Subscribed")
        };
        subscriptions.iter().filter(|id| !activated(id)).count()
    };
    let what = format!("{} subscriptions to be activated", orders.len());
    wait_until(&what, timeout, || async { (pending() == 0).then_some(()) }).await?;
    Ok(subscriptions)
}
