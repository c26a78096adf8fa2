//! `fulfillment work`: connects PostgreSQL, RabbitMQ and the Marketplace client, then runs
//! the consumer and the outbox runner until the shutdown token fires (SIGTERM/ctrl-c):
//! consuming stops, the message in hand is committed and acked, the effects in hand end,
//! and the process exits 0 (style principle 8: shutdown is passed in, never global).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fulfillment_state_machine::Policy;
use sqlx::postgres::PgPool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::marketplace::{MarketplaceClient, RetryPolicy, TokenProvider};
use crate::queue::Broker;
use crate::settings::Settings;
use crate::store::{self, outbox};
use crate::worker::consume::{ConsumerActivity, ConsumerLimits, MessageHandler, run_consumer};
use crate::worker::deliveries::DeliveryRunner;
use crate::worker::effects::{EffectActivity, EffectRunner, EffectsConfig};
use crate::worker::listener::MetricsListener;
use crate::worker::protocol::ProtocolConfig;
use crate::worker::protocol::deliver::DeliveryConfig;

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Unacked deliveries the broker may push ahead (bounded prefetch).
    pub prefetch: u16,
    /// Consumer tag; empty lets the broker choose.
    pub consumer_tag: String,
    pub effects: EffectsConfig,
    /// Once shutdown fires, how long the work in hand may take before it is abandoned (the
    /// broker redelivers its deliveries, the outbox re-runs its effects).
    pub shutdown_grace: Duration,
    /// Closing usage hours into metering batches.
    pub metering: crate::metering::MeteringConfig,
    /// Webhook deliveries to the ISV (their own runner and budget).
    pub deliveries: DeliveryConfig,
    /// Inbound messages (of different subscriptions) applied in one transaction with one
    /// commit; 1 applies each in a transaction of its own.
    pub apply_batch: usize,
}

/// Messages applied in one transaction by default: half of [`MAX_APPLY_BATCH`]. In
/// `bench pipeline --events 2000 --subscriptions 200` (2026-12-06, docs/benchmarks.md) 32
/// moved 196 changes/s at 7.8 ms of CPU per change, 1 moved 137/s at 10.9 ms. A window holds
/// only what is ready when it starts, so the cap matters only under a backlog.
pub const DEFAULT_APPLY_BATCH: usize = 32;

/// At most this many messages share a transaction: each takes a savepoint, and a
/// transaction with more than 64 subtransactions overflows PostgreSQL's per-backend
/// subtransaction cache, after which every other session's snapshot has to look them up.
pub const MAX_APPLY_BATCH: usize = 64;

impl WorkerConfig {
    /// The prefetch the consumer asks for: with batching, at least three windows' worth,
    /// so a window can fill from the backlog while the one before commits (a smaller
    /// prefetch would cap the window at whatever the broker pushed ahead).
    pub fn effective_prefetch(&self) -> u16 {
        let windows = self.apply_batch.saturating_mul(3);
        let wanted = if self.apply_batch > 1 { windows } else { 0 };
        self.prefetch.max(u16::try_from(wanted).unwrap_or(u16::MAX))
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            prefetch: 16,
            consumer_tag: String::new(),
            effects: EffectsConfig::default(),
            shutdown_grace: Duration::from_secs(20),
            metering: crate::metering::MeteringConfig::default(),
            deliveries: DeliveryConfig::default(),
            apply_batch: DEFAULT_APPLY_BATCH,
        }
    }
}

impl WorkerConfig {
    /// Defaults sized for a pool of `max_connections`: each effect in hand holds one
    /// connection for its claim (its results are written in the claim's transaction), and
    /// some read through a second one briefly; the rest is left to the consumer.
    pub fn for_pool(max_connections: u32) -> Self {
        let mut config = Self::default();
        config.effects.concurrency = concurrency_for_pool(max_connections);
        config
    }

    /// The `[worker]` settings; an unset effect concurrency is sized for the pool.
    pub fn from_settings(settings: &Settings) -> Self {
        let worker = &settings.worker;
        Self {
            prefetch: worker.prefetch,
            consumer_tag: String::new(),
            effects: EffectsConfig {
                concurrency: worker
                    .effect_concurrency
                    .unwrap_or_else(|| concurrency_for_pool(settings.database.max_connections)),
                poll_interval: worker.poll_interval,
                protocol: ProtocolConfig {
                    max_attempts: worker.max_attempts,
                    backoff_base: worker.backoff_base,
                    backoff_max: worker.backoff_max,
                    operation_poll_interval: worker.operation_poll_interval,
                    operation_poll_cap: worker.operation_poll_cap,
                    activation_check_interval: worker.activation_check_interval,
                    activation_wait_cap: worker.activation_wait_cap,
                    unknown_outcome_budget: worker.unknown_outcome_budget,
                    lock_wait_budget: worker.lock_wait_budget,
                },
            },
            shutdown_grace: worker.shutdown_grace,
            metering: settings.metering.clone(),
            deliveries: settings.webhooks.delivery_config(),
            apply_batch: worker.apply_batch,
        }
    }

    /// This configuration as the environment of a `fulfillment work` process: the
    /// `FULFILLMENT__WORKER__*` variables that [`from_settings`](Self::from_settings) reads
    /// back into it. Caps and budgets go in whole seconds; the metering and ISV delivery
    /// clocks belong to their own sections and are not written.
    pub fn to_env(&self) -> Vec<(String, String)> {
        let (effects, protocol) = (&self.effects, &self.effects.protocol);
        let ms = |d: Duration| d.as_millis().to_string();
        let secs = |d: Duration| d.as_secs().to_string();
        [
            ("PREFETCH", self.prefetch.to_string()),
            ("EFFECT_CONCURRENCY", effects.concurrency.to_string()),
            ("POLL_INTERVAL_MS", ms(effects.poll_interval)),
            ("MAX_ATTEMPTS", protocol.max_attempts.to_string()),
            ("BACKOFF_BASE_MS", ms(protocol.backoff_base)),
            ("BACKOFF_MAX_MS", ms(protocol.backoff_max)),
            (
                "OPERATION_POLL_INTERVAL_MS",
                ms(protocol.operation_poll_interval),
            ),
            ("OPERATION_POLL_CAP_SECS", secs(protocol.operation_poll_cap)),
            (
                "ACTIVATION_CHECK_INTERVAL_MS",
                ms(protocol.activation_check_interval),
            ),
            (
                "ACTIVATION_WAIT_CAP_SECS",
                secs(protocol.activation_wait_cap),
            ),
            (
                "UNKNOWN_OUTCOME_BUDGET_SECS",
                secs(protocol.unknown_outcome_budget),
            ),
            ("LOCK_WAIT_BUDGET_SECS", secs(protocol.lock_wait_budget)),
            ("SHUTDOWN_GRACE_SECS", secs(self.shutdown_grace)),
            ("APPLY_BATCH", self.apply_batch.to_string()),
        ]
        .map(|(key, value)| (format!("FULFILLMENT__WORKER__{key}"), value))
        .into()
    }
}

/// Two thirds of the pool, at most 10 calls in flight to Microsoft (§8.1).
fn concurrency_for_pool(max_connections: u32) -> usize {
    let share = usize::try_from(max_connections.saturating_mul(2) / 3).unwrap_or(1);
    share.clamp(1, 10)
}

/// The connections a worker needs.
#[derive(Debug, Clone)]
pub struct WorkerParts {
    pub pool: PgPool,
    pub broker: Broker,
    pub client: MarketplaceClient,
    pub policy: Policy,
    /// The Fulfillment API base URL (to rebuild operation locations).
    pub api_url: Url,
}

impl WorkerParts {
    /// Connects PostgreSQL and RabbitMQ (declaring the topology) and builds the client.
    pub async fn connect(settings: &Settings) -> anyhow::Result<Self> {
        let pool = store::connect(&settings.database).await?;
        let broker = Broker::connect(&settings.amqp, "fulfillment-worker").await?;
        store::prefixes::record(&pool, &settings.amqp.prefix, "work").await?;
        let tokens = TokenProvider::for_settings(settings)
            .context("cannot set up the Entra token provider")?;
        let client = MarketplaceClient::new(&settings.marketplace, tokens)
            .context("cannot build the Marketplace client")?
            .with_retry_policy(RetryPolicy::hand_back());
        Ok(Self {
            pool,
            broker,
            client,
            policy: settings.policy.clone(),
            api_url: settings.marketplace.api_url.clone(),
        })
    }
}

/// A running worker: the consumer and the outbox runner as tasks. Tests start and stop it
/// in-process.
#[derive(Debug)]
pub struct Worker {
    shutdown: CancellationToken,
    consumer: JoinHandle<()>,
    runner: JoinHandle<()>,
    deliveries: JoinHandle<()>,
    notices: JoinHandle<()>,
    pool: PgPool,
    consumer_activity: Arc<ConsumerActivity>,
    effect_activity: Arc<EffectActivity>,
    shutdown_grace: Duration,
}

impl Worker {
    /// Starts consuming and running effects; both stop when `shutdown` fires (or on
    /// [`Worker::stop`]).
    pub async fn spawn(
        parts: WorkerParts,
        config: WorkerConfig,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let publisher = parts.broker.publisher().await?;
        let limits = ConsumerLimits {
            concurrency: usize::from(config.effective_prefetch()),
            apply_batch: config.apply_batch,
        };
        let consumer = parts
            .broker
            .consume_inbound(config.effective_prefetch(), &config.consumer_tag)
            .await?;
        let poll_interval = config.effects.poll_interval;
        let runner = EffectRunner::new(
            parts.pool.clone(),
            parts.client.clone(),
            publisher,
            parts.policy.clone(),
            parts.api_url,
            config.effects,
        );
        let handler = MessageHandler::new(parts.pool.clone(), parts.client, parts.policy)
            .with_effects(runner.clone());
        let consumer_activity = Arc::new(ConsumerActivity::default());
        let effect_activity = runner.activity();
        let consumer = tokio::spawn(run_consumer(
            consumer,
            handler,
            consumer_activity.clone(),
            limits,
            shutdown.clone(),
        ));
        let runner = tokio::spawn(runner.run(shutdown.clone()));
        let deliveries = DeliveryRunner::new(
            parts.pool.clone(),
            config.deliveries,
            Some(parts.broker.publisher().await?),
        );
        let deliveries = tokio::spawn(deliveries.run(shutdown.clone()));
        // Closes usage hours into metering batches; stops with the token.
        tokio::spawn(crate::metering::submit::run_periodically(
            parts.pool.clone(),
            config.metering,
            shutdown.clone(),
        ));
        let notices = tokio::spawn(crate::worker::notices::run(
            parts.pool.clone(),
            poll_interval,
            shutdown.clone(),
        ));
        crate::metrics::register_worker_series();
        tracing::info!("worker started");
        Ok(Self {
            shutdown,
            consumer,
            runner,
            deliveries,
            notices,
            pool: parts.pool,
            consumer_activity,
            effect_activity,
            shutdown_grace: config.shutdown_grace,
        })
    }

    /// The consumer's deliveries in hand (for the metrics listener).
    pub fn consumer_activity(&self) -> Arc<ConsumerActivity> {
        self.consumer_activity.clone()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Waits until nothing is in hand, no delivery arrived for a moment, and no outbox row
    /// is due within a few seconds (longer backoffs do not count). For tests.
    pub async fn wait_until_idle(&self, timeout: Duration) -> anyhow::Result<()> {
        const QUIET: Duration = Duration::from_millis(300);
        const HORIZON: Duration = Duration::from_secs(5);
        let deadline = Instant::now() + timeout;
        let mut calm = 0;
        loop {
            let busy = self.consumer_activity.in_flight() > 0
                || self.effect_activity.in_flight() > 0
                || self.consumer_activity.quiet_for() < QUIET
                || outbox::due_within(&self.pool, HORIZON).await? > 0;
            calm = if busy { 0 } else { calm + 1 };
            if calm >= 3 {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the worker did not become idle within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the tasks to end. Once the shutdown token fired they have
    /// `shutdown_grace` to finish the work in hand, whatever it waits for (a broker or a
    /// database that does not answer); then they are aborted: the broker redelivers the
    /// deliveries they held, and their claimed outbox rows are claimed again.
    pub async fn join(self) -> anyhow::Result<()> {
        let Worker {
            shutdown,
            mut consumer,
            mut runner,
            mut deliveries,
            mut notices,
            consumer_activity,
            effect_activity,
            shutdown_grace,
            ..
        } = self;
        let both = async {
            (&mut consumer)
                .await
                .context("the consumer task panicked")?;
            (&mut runner)
                .await
                .context("the outbox runner task panicked")?;
            (&mut notices)
                .await
                .context("the notice emitter task panicked")?;
            (&mut deliveries)
                .await
                .context("the delivery runner task panicked")?;
            anyhow::Ok(())
        };
        let grace_over = async {
            shutdown.cancelled().await;
            tokio::time::sleep(shutdown_grace).await;
        };
        tokio::select! {
            ended = both => {
                ended?;
                tracing::info!("worker stopped");
            }
            () = grace_over => {
                tracing::warn!(
                    deliveries = consumer_activity.in_flight(),
                    effects = effect_activity.in_flight(),
                    grace = ?shutdown_grace,
                    "shutdown grace period over; abandoning the work in hand (the broker redelivers its deliveries, the outbox re-runs its effects)"
                );
                consumer.abort();
                runner.abort();
                deliveries.abort();
                notices.abort();
            }
        }
        Ok(())
    }

    /// Fires the shutdown token and waits for the work in hand to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.join().await
    }
}

/// Runs a worker until `shutdown` fires.
pub async fn run_worker(settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    let parts = WorkerParts::connect(&settings).await?;
    let config = WorkerConfig::from_settings(&settings);
    tracing::info!(
        prefetch = config.effective_prefetch(),
        apply_batch = config.apply_batch,
        effect_concurrency = config.effects.concurrency,
        max_attempts = config.effects.protocol.max_attempts,
        "worker settings"
    );
    let broker = parts.broker.clone();
    let pool = parts.pool.clone();
    // Credential health: expiry gauge, warnings, `credential.expiring` (issue #20).
    let health = tokio::spawn(super::credential_health::run_periodically(
        pool.clone(),
        broker.publisher().await?,
        parts.client.tokens().clone(),
        shutdown.child_token(),
    ));
    let worker = Worker::spawn(parts, config, shutdown.clone()).await?;
    // /metrics, /healthz, /readyz: up while the worker runs.
    let listener = MetricsListener::bind(settings.worker.metrics_addr, pool, broker.clone())
        .await?
        .watching(worker.consumer_activity(), settings.worker.stall_after);
    let listener_stop = shutdown.child_token();
    let listener = tokio::spawn(listener.run_until_stopped(listener_stop.clone()));
    // `[reconcile] interval`: this worker also reconciles with Microsoft periodically.
    let reconciling = match settings.reconcile.interval {
        Some(_) => {
            let reconciler =
                crate::ops::reconcile::reconciler(&settings, "worker:reconcile".into()).await?;
            Some(tokio::spawn(crate::ops::reconcile::run_periodically(
                reconciler,
                settings.reconcile.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let grace = settings.worker.shutdown_grace;
    let result = worker.join().await;
    if let Some(mut reconciling) = reconciling
        && tokio::time::timeout(grace, &mut reconciling).await.is_err()
    {
        tracing::warn!("the periodic reconcile did not stop within the grace period; abandoned");
        reconciling.abort();
    }
    listener_stop.cancel();
    health.abort();
    if let Ok(Err(error)) = listener.await {
        tracing::warn!(error = %format!("{error:#}"), "the worker metrics listener failed");
    }
    broker.close().await;
    result
}

/// `fulfillment work`: runs until SIGTERM or ctrl-c.
pub async fn run_until_signalled(settings: Settings) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing the work in hand");
        trigger.cancel();
    });
    run_worker(settings, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn the_default_settings_give_the_code_defaults() {
        let settings = Settings::from_sources(None, &HashMap::new()).unwrap();
        let from_settings = WorkerConfig::from_settings(&settings);
        let coded = WorkerConfig::for_pool(settings.database.max_connections);
        assert_eq!(from_settings.prefetch, coded.prefetch);
        assert_eq!(from_settings.apply_batch, coded.apply_batch);
        assert_eq!(
            format!("{:?}", from_settings.effects),
            format!("{:?}", coded.effects)
        );
    }

    #[test]
    fn a_config_written_as_environment_reads_back_the_same() {
        let config = WorkerConfig {
            prefetch: 8,
            effects: EffectsConfig {
                concurrency: 2,
                poll_interval: Duration::from_millis(70),
                protocol: ProtocolConfig {
                    max_attempts: 50,
                    operation_poll_cap: Duration::from_secs(7),
                    ..ProtocolConfig::fast()
                },
            },
            shutdown_grace: Duration::from_secs(120),
            apply_batch: 5,
            ..WorkerConfig::default()
        };
        let env: HashMap<String, String> = config.to_env().into_iter().collect();
        let read = WorkerConfig::from_settings(&Settings::from_sources(None, &env).unwrap());
        assert_eq!(format!("{read:?}"), format!("{config:?}"));
    }

    #[test]
    fn settings_reach_the_worker_config() {
        let env: HashMap<String, String> = [
            ("FULFILLMENT__WORKER__PREFETCH", "3"),
            ("FULFILLMENT__WORKER__EFFECT_CONCURRENCY", "2"),
            ("FULFILLMENT__WORKER__BACKOFF_BASE_MS", "25"),
            ("FULFILLMENT__WORKER__ACTIVATION_CHECK_INTERVAL_MS", "100"),
            ("WORKER_APPLY_BATCH", "5"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let config = WorkerConfig::from_settings(&Settings::from_sources(None, &env).unwrap());
        assert_eq!(config.prefetch, 3);
        assert_eq!(config.apply_batch, 5);
        // Batching raises the prefetch so a window can fill; unbatched it is as set.
        assert_eq!(config.effective_prefetch(), 15);
        let unbatched = WorkerConfig {
            apply_batch: 1,
            ..config.clone()
        };
        assert_eq!(unbatched.effective_prefetch(), 3);
        assert_eq!(config.effects.concurrency, 2);
        assert_eq!(
            config.effects.protocol.backoff_base,
            Duration::from_millis(25)
        );
        assert_eq!(
            config.effects.protocol.activation_check_interval,
            Duration::from_millis(100)
        );
    }
}
