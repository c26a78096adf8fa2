//! `fulfillment bench chaos`: a bounded, loopback-only chaos run of the whole engine. The
//! simulator plays customers and Microsoft (plan and seat changes, suspend and reinstate,
//! renewals, some unsubscribes) over many subscriptions; every action is a signed webhook
//! through `fulfillment serve` (a child process), RabbitMQ, two `fulfillment work` child
//! processes and PostgreSQL, and every ACK goes back to the simulator. Meanwhile:
//!
//! - the simulator answers 10 % of API calls 500 and 5 % 429 with `Retry-After`, delivers
//!   some webhooks twice and lets close ones overtake each other;
//! - a worker is SIGKILLed and restarted, several times (alternating between the two);
//! - every RabbitMQ connection of this run is force-closed (`rabbitmqctl close_connection`;
//!   the connections carry the run's prefix in their name, so nothing else is touched);
//! - PostgreSQL is restarted (`pg_ctlcluster … restart` for the cluster `pg_lsclusters`
//!   lists on `DATABASE_URL`'s port, or `--postgres-restart-command`);
//! - RabbitMQ is restarted (`--broker-restarts`: `rabbitmqctl stop_app`, 4 s down,
//!   `start_app`, or `--broker-restart-command`), which takes every connection down for
//!   seconds, not just one;
//! - `fulfillment serve` is SIGKILLed and restarted (`--ingress-kills`): Microsoft sees
//!   connection errors and redelivers;
//! - PostgreSQL is stopped for `--postgres-outage-secs`, then started;
//! - the simulator answers 503 to every API call for `--marketplace-outage-secs`
//!   (`failCalls`), then recovers.
//!
//! The processes must recover on their own; the run only waits for their readiness probes.
//! Each disturbance is tied to the load's progress (the customers pause at the next
//! disturbance's mark until the current one is over), so all of them happen while webhooks
//! flow. Then it waits for quiescence (no operation in progress or webhook delivery pending
//! at the simulator, queues empty, no outbox row pending, the event log still) and checks:
//!
//! - **webhooks accepted**: answered 2xx at least once. The simulator redelivers a webhook
//!   on any other answer, as Microsoft does (every second here instead of 500 times over
//!   8 h); one never accepted is reported, and is not ours to lose.
//! - **events lost**: accepted webhooks whose operation is neither in the event log
//!   (`subscription_events.event_key = webhook:{operation}:{action}`) nor in the dead-letter
//!   queue. Must be 0.
//! - **duplicate transitions**: one event key decided (`applied`/`rejected`) twice for a
//!   subscription — a webhook or command applied twice despite the inbox. Must be 0.
//! - **divergent subscriptions**: our state, plan or seats differ from the simulator's.
//!   Must be 0.
//! - **dead letters**: the dead-letter queue and dead outbox rows, grouped by reason
//!   (allowed, listed).
//! - **auto-accepted**: customer changes Microsoft accepted because our ACK came after its
//!   10 s window. Excused only when the whole window lies inside a disturbance we caused
//!   (from its start until every process is ready again); any other must be 0.
//! - **ready again**: after each disturbance ends (the broker or database started again, the
//!   killed process started again, the API answering again), every process must answer its
//!   readiness probe within [`READY_WITHIN`].
//!
//! Exit code 0 only when nothing was lost, duplicated or divergent, no change was
//! auto-accepted outside a disturbance, every process recovered in time and the run settled
//! before `--max-seconds`. Everything is throwaway (see
//! [`super::harness`]); a failed run keeps the child processes' logs and names them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::harness::{
    BenchEnv, ChildProcess, Order, SimHandle, free_local_address, purchase_and_activate,
};
use super::measure::round;
use crate::settings::Settings;
use crate::simulator::SimulatorView;
use crate::world::{Audit, AutoAccepted, rabbitmqctl, run_tool};
use time::OffsetDateTime;

/// The faults of the issue: shares of API calls answered 500 and 429, of webhooks sent
/// twice, and the window within which webhooks are shuffled.
const SHARE_5XX: f64 = 0.10;
const SHARE_429: f64 = 0.05;
const RETRY_AFTER_SECS: u64 = 1;
const SHARE_DUPLICATES: f64 = 0.10;
const REORDER_WINDOW_MS: u64 = 500;
/// Microsoft redelivers a webhook 500 times over 8 hours; compressed so the run is bounded.
const WEBHOOK_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Effect retry delays of the workers, compressed the same way (production: up to 300 s).
const WORKER_BACKOFF_MAX_MS: u64 = 10_000;
/// How long a process may take to be ready again after a disturbance before the run gives
/// up on it.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(120);
/// How soon after a disturbance ends every process must be ready again for the run to pass.
const READY_WITHIN: Duration = Duration::from_secs(15);
/// How long the default `--broker-restarts` keeps RabbitMQ stopped.
const BROKER_DOWN: Duration = Duration::from_secs(4);
/// Microsoft's window for the ACK of a customer's change (the simulator's default).
const ACK_WINDOW: Duration = Duration::from_secs(10);
/// Quiet polls in a row, one second apart, that make the run quiescent.
const QUIET_POLLS: u32 = 3;
/// The two workers.
const WORKERS: usize = 2;
/// How often the customers' gate reads the outbox backlog.
const BACKLOG_POLL: Duration = Duration::from_millis(250);

/// The outbox backlog above which the customers pause. Microsoft does not wait for a slow
/// publisher, but a run that piles up more work than the workers can do only measures how
/// long they take to catch up (and lets every ACK miss its 10 s window); the chaos is
/// meant for a pipeline that keeps up.
fn backlog_cap(subscriptions: usize) -> usize {
    subscriptions.max(100)
}

#[derive(Debug, Clone, clap::Args)]
pub struct ChaosBenchArgs {
    /// Customer and Microsoft actions, each one webhook (duplicate deliveries not counted).
    #[arg(long, default_value_t = 5000)]
    pub webhooks: usize,
    /// Subscriptions the actions are spread over (half on flat plans, half per seat).
    #[arg(long, default_value_t = 500)]
    pub subscriptions: usize,
    /// Seed of the action mix, the pauses and the simulator's faults; random when absent
    /// (the run prints it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Hard deadline of the whole run, in seconds.
    #[arg(long, default_value_t = 900)]
    pub max_seconds: u64,
    /// Times a worker is SIGKILLed and restarted during the load.
    #[arg(long, default_value_t = 4)]
    pub worker_kills: usize,
    /// Times every RabbitMQ connection of the run is force-closed during the load.
    #[arg(long, default_value_t = 1)]
    pub broker_closes: usize,
    /// Times PostgreSQL is restarted during the load (0 where you may not restart it).
    #[arg(long, default_value_t = 1)]
    pub postgres_restarts: usize,
    /// Shell command that restarts PostgreSQL. Default: `pg_ctlcluster
    /// --skip-systemctl-redirect VERSION CLUSTER restart` for the cluster `pg_lsclusters`
    /// lists on DATABASE_URL's port.
    #[arg(long)]
    pub postgres_restart_command: Option<String>,
    /// Times RabbitMQ is restarted during the load: `rabbitmqctl stop_app`, 4 s down,
    /// `rabbitmqctl start_app` (every connection goes down for seconds, not just one).
    #[arg(long, default_value_t = 1)]
    pub broker_restarts: usize,
    /// Shell command that restarts RabbitMQ instead (it may keep the broker down a while).
    #[arg(long)]
    pub broker_restart_command: Option<String>,
    /// Times `fulfillment serve` is SIGKILLed and restarted during the load.
    #[arg(long, default_value_t = 1)]
    pub ingress_kills: usize,
    /// Stop PostgreSQL once during the load for this many seconds (0: never).
    #[arg(long, default_value_t = 0)]
    pub postgres_outage_secs: u64,
    /// Shell command that stops PostgreSQL for the outage. Default: `pg_ctlcluster
    /// --skip-systemctl-redirect VERSION CLUSTER stop` for the cluster on DATABASE_URL's port.
    #[arg(long)]
    pub postgres_stop_command: Option<String>,
    /// Shell command that starts PostgreSQL after the outage (default: `pg_ctlcluster … start`).
    #[arg(long)]
    pub postgres_start_command: Option<String>,
    /// The simulator answers 503 to every API call once during the load for this many
    /// seconds (0: never), then recovers.
    #[arg(long, default_value_t = 0)]
    pub marketplace_outage_secs: u64,
    /// Keep the run's database (event log, outbox, state) for inspection.
    #[arg(long)]
    pub keep: bool,
}

impl ChaosBenchArgs {
    /// Every disturbance but the worker kills, each kind with its count.
    fn specials(&self) -> [(Disturbance, usize); 6] {
        [
            (Disturbance::CloseBrokerConnections, self.broker_closes),
            (Disturbance::RestartPostgres, self.postgres_restarts),
            (Disturbance::RestartBroker, self.broker_restarts),
            (Disturbance::KillIngress, self.ingress_kills),
            (
                Disturbance::PostgresOutage,
                usize::from(self.postgres_outage_secs > 0),
            ),
            (
                Disturbance::MarketplaceOutage,
                usize::from(self.marketplace_outage_secs > 0),
            ),
        ]
    }

    fn special_disturbances(&self) -> usize {
        self.specials().iter().map(|(_, n)| n).sum()
    }

    fn validate(&self, settings: &Settings) -> anyhow::Result<()> {
        if self.subscriptions < 2 {
            bail!("--subscriptions must be at least 2 (one on a flat plan, one per seat)");
        }
        if self.webhooks < self.subscriptions {
            bail!(
                "--webhooks ({}) must be at least --subscriptions ({}): every subscription gets at least one action",
                self.webhooks,
                self.subscriptions
            );
        }
        if self.max_seconds < 60 {
            bail!("--max-seconds must be at least 60");
        }
        if self.worker_kills > 100
            || self.broker_closes > 10
            || self.postgres_restarts > 10
            || self.broker_restarts > 10
            || self.ingress_kills > 20
        {
            bail!(
                "at most 100 --worker-kills, 10 --broker-closes, 10 --postgres-restarts, 10 --broker-restarts and 20 --ingress-kills"
            );
        }
        for (flag, secs) in [
            ("--postgres-outage-secs", self.postgres_outage_secs),
            ("--marketplace-outage-secs", self.marketplace_outage_secs),
        ] {
            if secs > 300 {
                bail!("{flag} must be at most 300 (the run is bounded), got {secs}");
            }
        }
        for (flag, given, needs, count) in [
            (
                "--postgres-restart-command",
                self.postgres_restart_command.is_some(),
                "--postgres-restarts of at least 1",
                self.postgres_restarts,
            ),
            (
                "--broker-restart-command",
                self.broker_restart_command.is_some(),
                "--broker-restarts of at least 1",
                self.broker_restarts,
            ),
            (
                "--postgres-stop-command",
                self.postgres_stop_command.is_some(),
                "--postgres-outage-secs of at least 1",
                usize::from(self.postgres_outage_secs > 0),
            ),
            (
                "--postgres-start-command",
                self.postgres_start_command.is_some(),
                "--postgres-outage-secs of at least 1",
                usize::from(self.postgres_outage_secs > 0),
            ),
        ] {
            if given && count == 0 {
                bail!("{flag} needs {needs}");
            }
        }
        let disturbances = self.worker_kills + self.special_disturbances();
        if disturbances >= self.webhooks {
            bail!(
                "--webhooks ({}) must exceed the number of disturbances ({disturbances}), so each one happens during the load",
                self.webhooks
            );
        }
        // Restarting a server and closing connections is for this machine only.
        for (what, url) in [
            ("DATABASE_URL", settings.database.url.url()),
            ("AMQP_URL", settings.amqp.url.url()),
        ] {
            let host = url.host_str().unwrap_or_default();
            if !matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1") {
                bail!(
                    "bench chaos restarts PostgreSQL and closes RabbitMQ connections, so it runs against services on this machine only; {what} points at {host:?}"
                );
            }
        }
        Ok(())
    }
}

pub async fn run(settings: Settings, args: ChaosBenchArgs) -> anyhow::Result<ExitCode> {
    args.validate(&settings)?;
    let seed = args
        .seed
        .unwrap_or_else(|| Uuid::new_v4().as_u64_pair().0 >> 1);
    let controls = Controls::discover(&settings, &args).await?;
    rabbitmqctl(&["list_connections", "pid", "-q", "--no-table-headers"])
        .await
        .context("bench chaos closes RabbitMQ connections with rabbitmqctl, which must work here (as a user allowed to run it)")?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.max_seconds);
    let ingress_addr = free_local_address()?;
    let webhook_url = url::Url::parse(&format!("http://{ingress_addr}/webhook"))?;
    let env = BenchEnv::setup_with_simulator(&settings, Some(webhook_url), |config| {
        config.timings.webhook_retry_interval = WEBHOOK_RETRY_INTERVAL;
        config.seed = Some(seed);
    })
    .await?;
    eprintln!(
        "chaos: seed {seed}; database {}, prefix {}",
        env.settings.database.url.redacted(),
        env.settings.amqp.prefix
    );
    let mut fleet = Fleet::new()?;
    let outcome = run_in(
        &env,
        &args,
        seed,
        &controls,
        ingress_addr,
        deadline,
        &mut fleet,
    )
    .await;
    let keep_logs = !matches!(&outcome, Ok(report) if report.passed());
    let logs = fleet.logs();
    let stopped = fleet.stop(keep_logs).await;
    let kept = args.keep.then(|| env.settings.database.url.redacted());
    let torn_down = env.teardown_keeping_database(args.keep).await;
    let mut report = outcome?;
    report.stop_errors = stopped;
    if let Err(e) = torn_down {
        eprintln!("chaos: teardown: {e:#}");
    }
    report.print(&args, seed, started.elapsed());
    if let Some(url) = kept {
        eprintln!("chaos: the database is kept: {url}");
    }
    if report.passed() {
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "chaos: the logs of the processes are kept: {}",
            logs.join(", ")
        );
        Ok(ExitCode::from(1))
    }
}

async fn run_in(
    env: &BenchEnv,
    args: &ChaosBenchArgs,
    seed: u64,
    controls: &Controls,
    ingress_addr: SocketAddr,
    deadline: Instant,
    fleet: &mut Fleet,
) -> anyhow::Result<Report> {
    let analyzer = env.analyze_while_autovacuum_off().await?;
    if analyzer.is_some() {
        eprintln!(
            "chaos: autovacuum is off on this server; the run ANALYZEs its database every {} s instead",
            super::harness::ANALYZE_EVERY.as_secs()
        );
    }
    fleet.start(env, ingress_addr).await?;
    let sim = Arc::new(SimHandle {
        http: fleet.http.clone(),
        base: env.sim.base_url(),
    });

    eprintln!(
        "chaos: {} purchases through the landing page and activation…",
        args.subscriptions
    );
    let orders: Vec<Order> = (0..args.subscriptions)
        .map(|i| match Kind::of(i) {
            Kind::Flat => Order {
                plan: FLAT_PLANS[0],
                quantity: None,
            },
            Kind::PerSeat => Order {
                plan: PER_SEAT_PLAN,
                quantity: Some(5),
            },
        })
        .collect();
    let activation_timeout = deadline.saturating_duration_since(Instant::now()) / 2;
    let subscriptions =
        purchase_and_activate(env, &sim, &fleet.processes[0], &orders, activation_timeout).await?;
    let pool = crate::store::connect(&env.settings.database).await?;
    // The run is about a running business, not the seconds after checkout: our side must
    // have confirmed every activation before the customers act.
    wait_until_subscribed_here(&pool, &subscriptions, Instant::now() + activation_timeout).await?;

    set_faults(&fleet.http, env, seed, false).await?;
    let plan = ChaosPlan::new(args, args.webhooks);
    eprintln!(
        "chaos: {} webhooks over {} subscriptions with faults on; disturbances: {}",
        args.webhooks,
        args.subscriptions,
        plan.describe()
    );
    let load_started = Instant::now();
    let gate = Arc::new(Gate::new(
        plan.first_allowance(args.webhooks),
        backlog_cap(args.subscriptions),
    ));
    let backlog_watch = CancellationToken::new();
    watch_backlog(pool.clone(), Arc::clone(&gate), backlog_watch.clone());
    let drivers = spawn_drivers(env, &sim, &subscriptions, args, seed, &gate, deadline);
    let disturbed = plan
        .carry_out(env, fleet, controls, &gate, seed, deadline)
        .await;
    // Whatever happened to the disturbances, the customers may finish.
    gate.allow(usize::MAX);
    let tally = collect(drivers).await;
    backlog_watch.cancel();
    let tally = tally?;
    let disturbances = disturbed?;
    let load_seconds = load_started.elapsed().as_secs_f64();

    eprintln!("chaos: load done in {load_seconds:.1} s; waiting for quiescence…");
    let settle_started = Instant::now();
    let quiescent = wait_for_quiescence(env, fleet, &pool, deadline).await?;
    let settle_seconds = settle_started.elapsed().as_secs_f64();

    eprintln!("chaos: checking both sides…");
    let audit = env.audit(&fleet.http, &pool, &subscriptions).await?;
    pool.close().await;
    let mut report = Report {
        audit,
        ..Report::default()
    };
    report.tally = tally;
    report.excuse_auto_accepts(&disturbances);
    report.disturbances = disturbances;
    report.unexpected_exits = std::mem::take(&mut fleet.unexpected_exits);
    report.quiescent = quiescent;
    report.load_seconds = load_seconds;
    report.settle_seconds = settle_seconds;
    Ok(report)
}

// ---------------------------------------------------------------------------------------
// The processes

/// The ingress (index 0) and the workers, all children of this process.
struct Fleet {
    http: reqwest::Client,
    processes: Vec<ChildProcess>,
    /// Exits nobody asked for, with the log tail: each is a failed recovery.
    unexpected_exits: Vec<String>,
}

impl Fleet {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            http: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(30))
                .build()?,
            processes: Vec::new(),
            unexpected_exits: Vec::new(),
        })
    }

    async fn start(&mut self, env: &BenchEnv, ingress_addr: SocketAddr) -> anyhow::Result<()> {
        let ingress = ChildProcess::spawn(
            "ingress",
            &env.id,
            &["serve"],
            env.serve_env(ingress_addr, false),
            ingress_addr,
        )
        .await?;
        self.processes.push(ingress);
        for name in ["worker-1", "worker-2"].into_iter().take(WORKERS) {
            let mut worker_env = env.serve_env(free_local_address()?, false);
            worker_env.push((
                "FULFILLMENT__WORKER__BACKOFF_MAX_MS".to_string(),
                WORKER_BACKOFF_MAX_MS.to_string(),
            ));
            let exe = std::env::current_exe()?;
            let worker = env.spawn_worker(exe, name, worker_env).await?;
            self.processes.push(worker);
        }
        for process in &mut self.processes {
            process.wait_ready(&self.http).await?;
        }
        Ok(())
    }

    fn worker(&mut self, index: usize) -> &mut ChildProcess {
        &mut self.processes[1 + index % WORKERS]
    }

    /// True when every process answers its readiness probe.
    async fn all_ready(&self) -> bool {
        for process in &self.processes {
            let ready = self
                .http
                .get(process.url("/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if !ready {
                return false;
            }
        }
        true
    }

    /// Restarts any process that exited on its own, and records it.
    async fn revive_exited(&mut self, deadline: Instant) -> anyhow::Result<()> {
        for i in 0..self.processes.len() {
            if let Some(status) = self.processes[i].exited()? {
                let process = &mut self.processes[i];
                let what = format!(
                    "{} (pid {}) exited on its own ({status}); its log ends:\n{}",
                    process.name,
                    process.pid,
                    process.log_tail()
                );
                eprintln!("chaos: {what}");
                self.unexpected_exits.push(what);
                restart_until_ready(&mut self.processes[i], &self.http, deadline).await?;
            }
        }
        Ok(())
    }

    fn logs(&self) -> Vec<String> {
        self.processes
            .iter()
            .map(|p| p.log.display().to_string())
            .collect()
    }

    /// SIGTERM to each; the ones that do not drain and exit 0 are reported.
    async fn stop(self, keep_logs: bool) -> Vec<String> {
        let mut errors = Vec::new();
        for mut process in self.processes {
            process.keep_log = keep_logs;
            let name = process.name;
            if let Err(e) = process.stop().await {
                errors.push(format!("{name}: {e:#}"));
            }
        }
        errors
    }
}

/// Starts `process` again until it answers its readiness probe (a worker started while
/// PostgreSQL is down exits at once, as it should; it is simply started again).
async fn restart_until_ready(
    process: &mut ChildProcess,
    http: &reqwest::Client,
    deadline: Instant,
) -> anyhow::Result<u32> {
    let give_up = (Instant::now() + RECOVERY_TIMEOUT).min(deadline);
    let mut starts = 0;
    loop {
        starts += 1;
        process.respawn()?;
        match process.wait_ready(http).await {
            Ok(()) => return Ok(starts),
            Err(e) if Instant::now() < give_up => {
                tracing::debug!(error = %format!("{e:#}"), process = process.name, "not ready; starting it again");
                let _ = process.kill().await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(e.context(format!(
                    "{} could not be restarted within {RECOVERY_TIMEOUT:?}",
                    process.name
                )));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The disturbances

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disturbance {
    KillWorker(usize),
    CloseBrokerConnections,
    RestartPostgres,
    RestartBroker,
    KillIngress,
    PostgresOutage,
    MarketplaceOutage,
}

/// What one disturbance did, how long it lasted and how long the processes took to be
/// ready again after it ended.
#[derive(Debug, Clone)]
struct Disturbed {
    kind: Disturbance,
    what: String,
    /// Webhooks sent before it began.
    at_webhook: usize,
    /// From its start to its end (the broker or database started again, the killed process
    /// started again, the API answering again).
    lasted: Duration,
    /// From its end until every process was ready again.
    recovered_after: Duration,
    /// Wall-clock start, and when every process was ready again: the span in which an
    /// auto-accepted change is excused.
    began_at: OffsetDateTime,
    ready_at: OffsetDateTime,
    detail: String,
}

/// The disturbances in order, each with the webhook count at which it begins.
struct ChaosPlan {
    steps: Vec<(usize, Disturbance)>,
    total: usize,
}

impl ChaosPlan {
    /// Spreads the disturbances evenly over the load: RabbitMQ closes and PostgreSQL
    /// restarts between the worker kills.
    fn new(args: &ChaosBenchArgs, total: usize) -> Self {
        let kinds = args.specials();
        let rounds = kinds.iter().map(|(_, n)| *n).max().unwrap_or(0);
        let mut specials = Vec::new();
        for i in 0..rounds {
            for (kind, count) in kinds {
                if i < count {
                    specials.push(kind);
                }
            }
        }
        let count = args.worker_kills + specials.len();
        let mut slots: Vec<Option<Disturbance>> = vec![None; count];
        for (i, special) in specials.iter().enumerate() {
            let mut at = ((i + 1) * count / (specials.len() + 1)).min(count - 1);
            while slots[at].is_some() {
                at = (at + 1) % count;
            }
            slots[at] = Some(*special);
        }
        let mut kills = 0;
        let steps = slots
            .into_iter()
            .enumerate()
            .map(|(i, slot)| {
                let disturbance = slot.unwrap_or_else(|| {
                    kills += 1;
                    Disturbance::KillWorker(kills - 1)
                });
                ((i + 1) * total / (count + 1), disturbance)
            })
            .collect();
        Self { steps, total }
    }

    fn describe(&self) -> String {
        if self.steps.is_empty() {
            return "none".into();
        }
        self.steps
            .iter()
            .map(|(at, d)| match d {
                Disturbance::KillWorker(k) => format!("SIGKILL worker-{} at {at}", k % WORKERS + 1),
                Disturbance::CloseBrokerConnections => format!("RabbitMQ close at {at}"),
                Disturbance::RestartPostgres => format!("PostgreSQL restart at {at}"),
                Disturbance::RestartBroker => format!("RabbitMQ restart at {at}"),
                Disturbance::KillIngress => format!("SIGKILL ingress at {at}"),
                Disturbance::PostgresOutage => format!("PostgreSQL outage at {at}"),
                Disturbance::MarketplaceOutage => format!("Marketplace API outage at {at}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// How far the customers may go before the first disturbance is over: up to the
    /// second one's mark.
    fn first_allowance(&self, total: usize) -> usize {
        self.steps.get(1).map_or(total, |(at, _)| *at)
    }

    async fn carry_out(
        &self,
        env: &BenchEnv,
        fleet: &mut Fleet,
        controls: &Controls,
        gate: &Gate,
        seed: u64,
        deadline: Instant,
    ) -> anyhow::Result<Vec<Disturbed>> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xc4a0_5eed);
        let mut done = Vec::with_capacity(self.steps.len());
        // Each disturbance is judged on its own: the next one starts at least one ACK window
        // after the processes were ready again, so no change's window spans two of them.
        let mut calm_until = Instant::now();
        for (i, (at, disturbance)) in self.steps.iter().enumerate() {
            while gate.passed() < *at || Instant::now() < calm_until {
                fleet.revive_exited(deadline).await?;
                if Instant::now() > deadline {
                    bail!("the deadline passed before the disturbances were over");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            fleet.revive_exited(deadline).await?;
            let at_webhook = gate.passed();
            let began = Instant::now();
            let began_at = OffsetDateTime::now_utc();
            let (what, detail, ended) = match disturbance {
                Disturbance::KillWorker(_) | Disturbance::KillIngress => {
                    let http = fleet.http.clone();
                    let process = match disturbance {
                        Disturbance::KillWorker(k) => fleet.worker(*k),
                        _ => &mut fleet.processes[0],
                    };
                    let (name, pid) = (process.name, process.pid);
                    process.kill().await?;
                    let down = Duration::from_millis(rng.random_range(500..3000));
                    tokio::time::sleep(down).await;
                    let ended = Instant::now();
                    let starts = restart_until_ready(process, &http, deadline).await?;
                    (
                        format!("SIGKILL {name}"),
                        format!(
                            "pid {pid} killed, down {:.1} s, ready after {starts} start(s)",
                            down.as_secs_f64(),
                        ),
                        ended,
                    )
                }
                Disturbance::CloseBrokerConnections => {
                    let closed = close_connections(env.broker.topology().prefix()).await?;
                    (
                        "RabbitMQ connections force-closed".to_string(),
                        format!("{closed} connections of this run closed"),
                        Instant::now(),
                    )
                }
                Disturbance::RestartPostgres => {
                    let restart = controls.postgres("restart", |c| c.restart.as_ref())?;
                    restart.run().await?;
                    (
                        "PostgreSQL restarted".to_string(),
                        format!("`{}` took {:.1} s", restart.display, secs(began)),
                        Instant::now(),
                    )
                }
                Disturbance::RestartBroker => {
                    let restart = &controls.broker_restart;
                    restart.run().await?;
                    (
                        "RabbitMQ restarted".to_string(),
                        format!("`{}` took {:.1} s", restart.display, secs(began)),
                        Instant::now(),
                    )
                }
                Disturbance::PostgresOutage => {
                    let stop = controls.postgres("stop", |c| c.stop.as_ref())?;
                    let start = controls.postgres("start", |c| c.start.as_ref())?;
                    stop.run().await?;
                    let down = Duration::from_secs(controls.postgres_outage_secs);
                    tokio::time::sleep(down).await;
                    start.run().await?;
                    (
                        "PostgreSQL stopped".to_string(),
                        format!(
                            "`{}`, {} s down, `{}`; {:.1} s in all",
                            stop.display,
                            down.as_secs(),
                            start.display,
                            secs(began)
                        ),
                        Instant::now(),
                    )
                }
                Disturbance::MarketplaceOutage => {
                    set_faults(&fleet.http, env, seed, true).await?;
                    let down = Duration::from_secs(controls.marketplace_outage_secs);
                    tokio::time::sleep(down).await;
                    set_faults(&fleet.http, env, seed, false).await?;
                    (
                        "Marketplace API outage".to_string(),
                        format!("every API call answered 503 for {} s", down.as_secs()),
                        Instant::now(),
                    )
                }
            };
            wait_for_recovery(env, fleet, deadline, &what).await?;
            let recovered_after = ended.elapsed();
            calm_until = Instant::now() + ACK_WINDOW;
            eprintln!(
                "chaos: {what} at webhook {at_webhook}: {detail}; ready again {:.1} s after it ended",
                recovered_after.as_secs_f64()
            );
            done.push(Disturbed {
                kind: *disturbance,
                what,
                at_webhook,
                lasted: ended.saturating_duration_since(began),
                recovered_after,
                began_at,
                ready_at: OffsetDateTime::now_utc(),
                detail,
            });
            let next = self.steps.get(i + 2).map_or(self.total, |(at, _)| *at);
            gate.allow(next);
        }
        Ok(done)
    }
}

fn secs(since: Instant) -> f64 {
    since.elapsed().as_secs_f64()
}

/// Waits until every process is ready and both workers consume the inbound queue again;
/// returns how long that took.
async fn wait_for_recovery(
    env: &BenchEnv,
    fleet: &mut Fleet,
    deadline: Instant,
    after: &str,
) -> anyhow::Result<Duration> {
    let began = Instant::now();
    let give_up = (began + RECOVERY_TIMEOUT).min(deadline);
    let inbound = env.broker.topology().inbound_queue();
    // The probes may still answer from before the disturbance took effect.
    tokio::time::sleep(Duration::from_millis(200)).await;
    loop {
        fleet.revive_exited(deadline).await?;
        let consumers = env.queue_counts(&inbound).await.map_or(0, |(_, c)| c);
        if consumers as usize >= WORKERS && fleet.all_ready().await {
            return Ok(began.elapsed());
        }
        if Instant::now() > give_up {
            let tails: Vec<String> = fleet
                .processes
                .iter()
                .map(|p| format!("{}:\n{}", p.name, p.log_tail()))
                .collect();
            bail!(
                "the processes did not recover within {:?} of the {after} ({consumers} consumers on {inbound}); their logs end:\n{}",
                give_up - began,
                tails.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Closes every RabbitMQ connection whose name carries `prefix` (see
/// [`crate::queue::connection_name_for`]); returns how many.
async fn close_connections(prefix: &str) -> anyhow::Result<usize> {
    let listing = rabbitmqctl(&[
        "list_connections",
        "pid",
        "client_properties",
        "-q",
        "--no-table-headers",
    ])
    .await?;
    let marker = crate::queue::connection_name_for("", prefix);
    let marker = format!("{}\"", marker.trim_start());
    let pids: Vec<&str> = listing
        .lines()
        .filter(|line| line.contains(&marker))
        .filter_map(|line| line.split('\t').next())
        .collect();
    if pids.is_empty() {
        bail!("rabbitmqctl lists no connection named with {prefix:?}; nothing to close");
    }
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "bench chaos: forced close"]).await?;
    }
    Ok(pids.len())
}

/// A shell step of a disturbance: a program and its arguments.
#[derive(Debug)]
struct ShellStep {
    program: String,
    args: Vec<String>,
    display: String,
}

impl ShellStep {
    fn shell(command: &str) -> Self {
        Self {
            program: "sh".into(),
            args: vec!["-c".into(), command.into()],
            display: command.into(),
        }
    }

    async fn run(&self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        run_tool(&self.program, &args)
            .await
            .with_context(|| format!("`{}` failed", self.display))?;
        Ok(())
    }
}

/// How the run restarts, stops and starts PostgreSQL (`None` where nothing asks for it).
#[derive(Debug, Default)]
struct PostgresControl {
    restart: Option<ShellStep>,
    stop: Option<ShellStep>,
    start: Option<ShellStep>,
}

/// How the run disturbs the services it does not own.
#[derive(Debug)]
struct Controls {
    postgres: PostgresControl,
    broker_restart: ShellStep,
    postgres_outage_secs: u64,
    marketplace_outage_secs: u64,
}

impl Controls {
    /// The commands the arguments ask for: the given ones, or `pg_ctlcluster` for the
    /// cluster listening on `DATABASE_URL`'s port, and `rabbitmqctl stop_app`/`start_app`.
    async fn discover(settings: &Settings, args: &ChaosBenchArgs) -> anyhow::Result<Self> {
        let restarts = args.postgres_restarts > 0;
        let outage = args.postgres_outage_secs > 0;
        let needs_cluster = (restarts && args.postgres_restart_command.is_none())
            || (outage
                && (args.postgres_stop_command.is_none() || args.postgres_start_command.is_none()));
        let cluster = match needs_cluster {
            true => Some(postgres_cluster(settings).await?),
            false => None,
        };
        let step = |given: &Option<String>, verb: &str| {
            given.as_deref().map(ShellStep::shell).or_else(|| {
                cluster.as_ref().map(|(version, name)| {
                    let args: Vec<String> = ["--skip-systemctl-redirect", version, name, verb]
                        .iter()
                        .map(|a| a.to_string())
                        .collect();
                    ShellStep {
                        display: format!("pg_ctlcluster {}", args.join(" ")),
                        program: "pg_ctlcluster".into(),
                        args,
                    }
                })
            })
        };
        let postgres = PostgresControl {
            restart: restarts
                .then(|| step(&args.postgres_restart_command, "restart"))
                .flatten(),
            stop: outage
                .then(|| step(&args.postgres_stop_command, "stop"))
                .flatten(),
            start: outage
                .then(|| step(&args.postgres_start_command, "start"))
                .flatten(),
        };
        let broker_restart = match &args.broker_restart_command {
            Some(command) => ShellStep::shell(command),
            None => ShellStep::shell(&format!(
                "rabbitmqctl -q stop_app && sleep {} && rabbitmqctl -q start_app",
                BROKER_DOWN.as_secs()
            )),
        };
        Ok(Self {
            postgres,
            broker_restart,
            postgres_outage_secs: args.postgres_outage_secs,
            marketplace_outage_secs: args.marketplace_outage_secs,
        })
    }

    fn postgres(
        &self,
        verb: &str,
        pick: impl Fn(&PostgresControl) -> Option<&ShellStep>,
    ) -> anyhow::Result<&ShellStep> {
        pick(&self.postgres)
            .with_context(|| format!("a PostgreSQL {verb} was planned without a way to {verb} it"))
    }
}

/// The `pg_ctlcluster` version and cluster name listening on `DATABASE_URL`'s port.
async fn postgres_cluster(settings: &Settings) -> anyhow::Result<(String, String)> {
    let port = settings.database.url.url().port().unwrap_or(5432);
    let clusters = run_tool("pg_lsclusters", &["--no-header"]).await.with_context(|| {
        "bench chaos restarts and stops PostgreSQL and cannot find how: pg_lsclusters is missing or \
         failed; pass --postgres-restart-command (and --postgres-stop-command, \
         --postgres-start-command), or --postgres-restarts 0 and --postgres-outage-secs 0"
    })?;
    let found = clusters.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [version, cluster, p, ..] if p.parse() == Ok(port) => {
                Some((version.to_string(), cluster.to_string()))
            }
            _ => None,
        }
    });
    found.with_context(|| {
        format!(
            "pg_lsclusters lists no cluster on port {port} (DATABASE_URL); pass \
             --postgres-restart-command (and --postgres-stop-command, --postgres-start-command), \
             or --postgres-restarts 0 and --postgres-outage-secs 0. pg_lsclusters says:\n{clusters}"
        )
    })
}

// ---------------------------------------------------------------------------------------
// The customers

const FLAT_PLANS: [&str; 2] = ["silver", "gold"];
const PER_SEAT_PLAN: &str = "per-seat";
/// Seat counts the per-seat subscriptions move between.
const SEAT_RANGE: std::ops::RangeInclusive<u32> = 1..=20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Flat,
    PerSeat,
}

impl Kind {
    fn of(index: usize) -> Self {
        if index.is_multiple_of(2) {
            Kind::Flat
        } else {
            Kind::PerSeat
        }
    }
}

/// Lets the customers go up to `allowed` webhooks (the disturbances move it forward), and
/// only while the engine's outbox backlog is below `backlog_cap`.
struct Gate {
    issued: AtomicUsize,
    passed: AtomicUsize,
    allowed: watch::Sender<usize>,
    /// Outbox rows pending, as last read (see [`watch_backlog`]).
    backlog: AtomicUsize,
    backlog_cap: usize,
}

impl Gate {
    fn new(allowed: usize, backlog_cap: usize) -> Self {
        Self {
            issued: AtomicUsize::new(0),
            passed: AtomicUsize::new(0),
            allowed: watch::Sender::new(allowed),
            backlog: AtomicUsize::new(0),
            backlog_cap,
        }
    }

    /// Waits for the right to send one more webhook; false when the deadline came first.
    async fn enter(&self, deadline: Instant) -> bool {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst);
        let mut allowed = self.allowed.subscribe();
        let admitted = tokio::time::timeout_at(
            deadline.into(),
            allowed.wait_for(|allowed| *allowed > ticket),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !admitted {
            return false;
        }
        while self.backlog.load(Ordering::Relaxed) > self.backlog_cap {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(BACKLOG_POLL).await;
        }
        self.passed.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn passed(&self) -> usize {
        self.passed.load(Ordering::SeqCst)
    }

    fn allow(&self, upto: usize) {
        self.allowed
            .send_modify(|allowed| *allowed = (*allowed).max(upto));
    }
}

/// What the customers did.
#[derive(Debug, Default, Clone)]
struct Tally {
    /// Actions the simulator accepted (each one operation with its webhook), by action.
    sent: BTreeMap<&'static str, usize>,
    /// Actions the simulator refused, by reason.
    refused: BTreeMap<String, usize>,
    /// Actions not sent because the deadline came.
    skipped: usize,
}

impl Tally {
    fn sent_total(&self) -> usize {
        self.sent.values().sum()
    }

    fn merge(&mut self, other: Tally) {
        for (k, v) in other.sent {
            *self.sent.entry(k).or_default() += v;
        }
        for (k, v) in other.refused {
            *self.refused.entry(k).or_default() += v;
        }
        self.skipped += other.skipped;
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    ChangePlan(&'static str),
    ChangeQuantity(u32),
    Suspend,
    Reinstate,
    Renew,
    Unsubscribe,
}

impl Action {
    fn name(&self) -> &'static str {
        match self {
            Action::ChangePlan(_) => "ChangePlan",
            Action::ChangeQuantity(_) => "ChangeQuantity",
            Action::Suspend => "Suspend",
            Action::Reinstate => "Reinstate",
            Action::Renew => "Renew",
            Action::Unsubscribe => "Unsubscribe",
        }
    }

    fn body(&self) -> Value {
        match self {
            Action::ChangePlan(plan) => json!({ "action": "ChangePlan", "planId": plan }),
            Action::ChangeQuantity(seats) => {
                json!({ "action": "ChangeQuantity", "quantity": seats })
            }
            other => json!({ "action": other.name() }),
        }
    }

    /// Operations the publisher answers (ACK) before Microsoft moves on; the simulator
    /// takes no other change for the subscription until they end.
    fn awaits_answer(&self) -> bool {
        matches!(
            self,
            Action::ChangePlan(_) | Action::ChangeQuantity(_) | Action::Reinstate
        )
    }

    /// The next action of a customer whose subscription is `status` on `plan` with
    /// `seats`: changes most often, suspensions (then a reinstatement), renewals, and
    /// an unsubscribe at the end for some.
    fn next(
        rng: &mut StdRng,
        status: &str,
        plan: &str,
        seats: Option<u32>,
        unsubscribe: bool,
    ) -> Option<Action> {
        match status {
            "Subscribed" | "Suspended" if unsubscribe => Some(Action::Unsubscribe),
            "Suspended" => Some(Action::Reinstate),
            "Subscribed" => {
                let roll = rng.random_range(0..100);
                Some(if roll < 65 {
                    if plan == PER_SEAT_PLAN {
                        let mut target = rng.random_range(SEAT_RANGE);
                        if Some(target) == seats {
                            target = if target == *SEAT_RANGE.end() {
                                1
                            } else {
                                target + 1
                            };
                        }
                        Action::ChangeQuantity(target)
                    } else if plan == FLAT_PLANS[0] {
                        Action::ChangePlan(FLAT_PLANS[1])
                    } else {
                        Action::ChangePlan(FLAT_PLANS[0])
                    }
                } else if roll < 85 {
                    Action::Suspend
                } else {
                    Action::Renew
                })
            }
            _ => None,
        }
    }
}

/// Keeps [`Gate::backlog`] current until `stop`; a failed read (PostgreSQL restarting)
/// keeps the last figure.
fn watch_backlog(pool: PgPool, gate: Arc<Gate>, stop: CancellationToken) {
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            if let Ok(pending) = crate::store::verify::pending_effects(&pool).await {
                gate.backlog
                    .store(usize::try_from(pending).unwrap_or(0), Ordering::Relaxed);
            }
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(BACKLOG_POLL) => {}
            }
        }
    });
}

fn spawn_drivers(
    env: &BenchEnv,
    sim: &Arc<SimHandle>,
    subscriptions: &[Uuid],
    args: &ChaosBenchArgs,
    seed: u64,
    gate: &Arc<Gate>,
    deadline: Instant,
) -> tokio::task::JoinSet<Tally> {
    let mut tasks = tokio::task::JoinSet::new();
    let count = subscriptions.len();
    for (index, id) in subscriptions.iter().copied().enumerate() {
        let actions = args.webhooks / count + usize::from(index < args.webhooks % count);
        let customer = Customer {
            id,
            actions,
            // One in ten ends by unsubscribing.
            unsubscribes: index % 10 == 9,
            rng: StdRng::seed_from_u64(seed.wrapping_add(index as u64 + 1)),
            sim: Arc::clone(sim),
            view: env.sim.view(),
            gate: Arc::clone(gate),
            deadline,
        };
        tasks.spawn(customer.run());
    }
    tasks
}

async fn collect(mut tasks: tokio::task::JoinSet<Tally>) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    while let Some(joined) = tasks.join_next().await {
        tally.merge(joined.context("a customer task panicked")?);
    }
    Ok(tally)
}

/// One subscription's customer: its actions one after another, as Microsoft allows one
/// pending operation per subscription.
struct Customer {
    id: Uuid,
    actions: usize,
    unsubscribes: bool,
    rng: StdRng,
    sim: Arc<SimHandle>,
    view: SimulatorView,
    gate: Arc<Gate>,
    deadline: Instant,
}

impl Customer {
    async fn run(mut self) -> Tally {
        let mut tally = Tally::default();
        for step in 0..self.actions {
            if !self.gate.enter(self.deadline).await {
                tally.skipped += self.actions - step;
                break;
            }
            let Some((status, plan, seats)) = self.view.subscription_status(self.id) else {
                *tally
                    .refused
                    .entry("subscription vanished".into())
                    .or_default() += 1;
                continue;
            };
            let last = step + 1 == self.actions;
            let Some(action) = Action::next(
                &mut self.rng,
                &status,
                &plan,
                seats,
                last && self.unsubscribes,
            ) else {
                *tally
                    .refused
                    .entry(format!("nothing to do while {status}"))
                    .or_default() += 1;
                continue;
            };
            match self.sim.act(self.id, action.body()).await {
                Ok(operation) => {
                    *tally.sent.entry(action.name()).or_default() += 1;
                    if action.awaits_answer() {
                        let left = self.deadline.saturating_duration_since(Instant::now());
                        let _ = self.view.wait_for_operation(self.id, operation, left).await;
                    } else {
                        // Close enough to the next action for the reordering to mix them.
                        let pause = self.rng.random_range(0..200);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
                Err(reason) => {
                    *tally
                        .refused
                        .entry(format!("{}: {reason}", action.name()))
                        .or_default() += 1;
                }
            }
        }
        tally
    }
}

async fn wait_until_subscribed_here(
    pool: &PgPool,
    subscriptions: &[Uuid],
    until: Instant,
) -> anyhow::Result<()> {
    loop {
        let subscribed =
            crate::store::verify::count_in_state(pool, subscriptions, "Subscribed").await?;
        if subscribed as usize == subscriptions.len() {
            return Ok(());
        }
        if Instant::now() > until {
            bail!(
                "only {subscribed} of {} subscriptions are Subscribed on our side, though the simulator activated them all",
                subscriptions.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The run's faults; with `outage`, every public API call also answers 503.
async fn set_faults(
    http: &reqwest::Client,
    env: &BenchEnv,
    seed: u64,
    outage: bool,
) -> anyhow::Result<()> {
    let url = env.sim.base_url().join("simulator/faults")?;
    let fail_calls: serde_json::Map<String, Value> = match outage {
        true => crate::simulator::FAULT_CALLS
            .iter()
            .map(|(name, _, _)| (name.to_string(), json!(503)))
            .collect(),
        false => serde_json::Map::new(),
    };
    let response = http
        .put(url)
        .json(&json!({
            "seed": seed,
            "share5xx": SHARE_5XX,
            "share429": SHARE_429,
            "retryAfterSecs": RETRY_AFTER_SECS,
            "duplicateDeliveries": SHARE_DUPLICATES,
            "reorder": REORDER_WINDOW_MS,
            "failCalls": fail_calls,
        }))
        .send()
        .await?;
    if !response.status().is_success() {
        bail!(
            "the simulator refused the faults: {} {}",
            response.status(),
            response.text().await.unwrap_or_default()
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Quiescence and the checks

/// Waits until nothing moves: no operation in progress and no webhook delivery pending at
/// the simulator, the inbound and retry queues empty, no outbox row pending and the event
/// log unchanged, [`QUIET_POLLS`] times in a row. False when the deadline came first.
async fn wait_for_quiescence(
    env: &BenchEnv,
    fleet: &mut Fleet,
    pool: &PgPool,
    deadline: Instant,
) -> anyhow::Result<bool> {
    let topology = env.broker.topology();
    let dead = topology.dead_letter_queue();
    let queues: Vec<String> = topology
        .all_queues()
        .into_iter()
        .filter(|q| *q != dead)
        .collect();
    let mut last_events = -1i64;
    let mut quiet = 0;
    let mut last_report = Instant::now();
    while Instant::now() < deadline {
        fleet.revive_exited(deadline).await?;
        let outstanding = env.sim.view().outstanding();
        let mut queued = 0u64;
        for queue in &queues {
            queued += u64::from(env.queue_counts(queue).await.map_or(1, |(m, _)| m));
        }
        let (pending, events) = crate::store::verify::pending_effects_and_events(pool)
            .await
            .unwrap_or((-1, -1));
        let still = outstanding.operations_in_progress == 0
            && outstanding.deliveries_pending == 0
            && queued == 0
            && pending == 0
            && events == last_events;
        quiet = if still { quiet + 1 } else { 0 };
        if quiet >= QUIET_POLLS {
            return Ok(true);
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "chaos: settling: {} operations in progress, {} deliveries pending, {queued} messages queued, {pending} outbox rows pending",
                outstanding.operations_in_progress, outstanding.deliveries_pending
            );
            last_report = Instant::now();
        }
        last_events = events;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(false)
}

#[derive(Debug, Default)]
struct Report {
    /// Both sides after the run ([`crate::world::World::audit`]).
    audit: Audit,
    tally: Tally,
    disturbances: Vec<Disturbed>,
    unexpected_exits: Vec<String>,
    stop_errors: Vec<String>,
    quiescent: bool,
    load_seconds: f64,
    settle_seconds: f64,
    /// Of the auto-accepted changes, the ones whose whole window fell inside a disturbance.
    auto_accepted_excused: usize,
}

impl Report {
    fn passed(&self) -> bool {
        self.audit.lost.is_empty()
            && self.audit.duplicate_transitions.is_empty()
            && self.audit.divergent.is_empty()
            && self.unexpected_exits.is_empty()
            && self.stop_errors.is_empty()
            && self.quiescent
            && self.auto_accepted_late().is_empty()
            && self.slow_recoveries().is_empty()
    }

    /// Keeps, among the auto-accepted changes, those whose 10 s window did not lie wholly
    /// inside one disturbance (from its start until every process was ready again).
    fn excuse_auto_accepts(&mut self, disturbances: &[Disturbed]) {
        let window = time::Duration::try_from(ACK_WINDOW).unwrap_or(time::Duration::ZERO);
        let (excused, late): (Vec<AutoAccepted>, Vec<AutoAccepted>) =
            std::mem::take(&mut self.audit.auto_accepted)
                .into_iter()
                .partition(|accepted| {
                    accepted.created.is_some_and(|created| {
                        disturbances
                            .iter()
                            .any(|d| d.began_at <= created && created + window <= d.ready_at)
                    })
                });
        self.auto_accepted_excused = excused.len();
        // Say where each late one sat against the disturbances, for whoever reads the report.
        self.audit.auto_accepted = late
            .into_iter()
            .map(|mut accepted| {
                if let Some(created) = accepted.created {
                    let overlapping = disturbances
                        .iter()
                        .find(|d| d.began_at <= created + window && created <= d.ready_at);
                    let note = match overlapping {
                        Some(d) => format!(
                            " (window opened {:+.1} s from the start of \"{}\", which was over after {:.1} s)",
                            (created - d.began_at).as_seconds_f64(),
                            d.what,
                            (d.ready_at - d.began_at).as_seconds_f64()
                        ),
                        None => " (no disturbance overlaps its window)".to_string(),
                    };
                    accepted.line.push_str(&note);
                }
                accepted
            })
            .collect();
    }

    /// Auto-accepted changes not excused by a disturbance.
    fn auto_accepted_late(&self) -> &[AutoAccepted] {
        &self.audit.auto_accepted
    }

    /// Disturbances after which some process took longer than [`READY_WITHIN`].
    fn slow_recoveries(&self) -> Vec<&Disturbed> {
        self.disturbances
            .iter()
            .filter(|d| d.recovered_after > READY_WITHIN)
            .collect()
    }

    fn print(&self, args: &ChaosBenchArgs, seed: u64, took: Duration) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "fulfillment bench chaos: {cores} cores, loopback, seed {seed}; {} webhooks over {} subscriptions \
             (simulator → ingress → RabbitMQ → 2 workers → PostgreSQL → ACK to the simulator)",
            args.webhooks, args.subscriptions
        );
        println!(
            "  faults: {:.0}% 500, {:.0}% 429 (Retry-After {RETRY_AFTER_SECS} s), {:.0}% webhooks delivered twice, reordering within {REORDER_WINDOW_MS} ms, webhook redelivery every {} s\n",
            SHARE_5XX * 100.0,
            SHARE_429 * 100.0,
            SHARE_DUPLICATES * 100.0,
            WEBHOOK_RETRY_INTERVAL.as_secs()
        );
        println!(
            "  disturbances (during the load; ready again = every process ready after it ended, at most {} s)",
            READY_WITHIN.as_secs()
        );
        for d in &self.disturbances {
            println!(
                "    at webhook {:>5}  {:<34} lasted {:>5.1} s, ready again after {:>5.1} s{}  ({})",
                d.at_webhook,
                d.what,
                d.lasted.as_secs_f64(),
                d.recovered_after.as_secs_f64(),
                if d.recovered_after > READY_WITHIN {
                    " TOO SLOW"
                } else {
                    ""
                },
                d.detail
            );
        }
        for exit in &self.unexpected_exits {
            println!("    UNEXPECTED EXIT: {exit}");
        }
        let actions: Vec<String> = self
            .tally
            .sent
            .iter()
            .map(|(action, n)| format!("{action} {n}"))
            .collect();
        println!(
            "\n  customer actions                {} ({})",
            self.tally.sent_total(),
            actions.join(", ")
        );
        if !self.tally.refused.is_empty() || self.tally.skipped > 0 {
            println!(
                "  actions not sent                {} refused by the simulator, {} skipped at the deadline",
                self.tally.refused.values().sum::<usize>(),
                self.tally.skipped
            );
            for (reason, n) in &self.tally.refused {
                println!("    {n} × {reason}");
            }
        }
        let answers: Vec<String> = self
            .audit
            .answers
            .iter()
            .map(|(status, n)| format!("{status}: {n}"))
            .collect();
        println!(
            "  webhooks sent                   {} ({} deliveries, {} of them duplicates; ingress answers {})",
            self.audit.webhooks_sent,
            self.audit.deliveries,
            self.audit.duplicate_deliveries,
            answers.join(", ")
        );
        println!(
            "  webhooks accepted (2xx once)    {}",
            self.audit.webhooks_accepted
        );
        println!(
            "  webhooks never accepted         {}",
            self.audit.never_accepted.len()
        );
        for line in self.audit.never_accepted.iter().take(10) {
            println!("    {line}");
        }
        println!(
            "  events lost                     {}{}",
            self.audit.lost.len(),
            if self.audit.accepted_in_dead_letters > 0 {
                format!(
                    " ({} more accepted webhooks are in the dead-letter queue)",
                    self.audit.accepted_in_dead_letters
                )
            } else {
                String::new()
            }
        );
        for line in self.audit.lost.iter().take(10) {
            println!("    {line}");
        }
        println!(
            "  duplicate transitions           {}",
            self.audit.duplicate_transitions.len()
        );
        for line in self.audit.duplicate_transitions.iter().take(10) {
            println!("    {line}");
        }
        println!(
            "  divergent subscriptions         {} of {}",
            self.audit.divergent.len(),
            self.audit.subscriptions
        );
        for line in self.audit.divergent.iter().take(10) {
            println!("    {line}");
        }
        println!(
            "  auto-accepted by Microsoft      {} outside any disturbance, {} with the whole 10 s window inside one",
            self.audit.auto_accepted.len(),
            self.auto_accepted_excused
        );
        for accepted in self.audit.auto_accepted.iter().take(20) {
            println!("    {}", accepted.line);
        }
        println!(
            "  dead letters                    {} in the queue, {} dead outbox rows",
            self.audit.dead_letters_queue, self.audit.dead_letters_outbox
        );
        for (reason, n) in &self.audit.dead_letter_reasons {
            println!("    {n} × {reason}");
        }
        if self.audit.sequence_gaps > 0 {
            println!(
                "  event-log sequence gaps         {} subscriptions",
                self.audit.sequence_gaps
            );
        }
        println!("  operations at the simulator");
        for (kind, n) in &self.audit.operations {
            println!("    {n:>6} × {kind}");
        }
        for error in &self.stop_errors {
            println!("  DID NOT STOP CLEANLY: {error}");
        }
        println!(
            "\n  load {:.1} s, settling {:.1} s{}; run took {:.1} s",
            self.load_seconds,
            self.settle_seconds,
            if self.quiescent {
                ""
            } else {
                " (NOT quiescent at the deadline)"
            },
            took.as_secs_f64()
        );
        println!(
            "result: {}",
            if self.passed() {
                "PASSED (nothing lost, nothing twice, both sides agree, nothing auto-accepted outside a disturbance, every process ready in time)"
            } else {
                "FAILED"
            }
        );
        let json = json!({
            "bench": "chaos",
            "seed": seed,
            "webhooks_requested": args.webhooks,
            "subscriptions": self.audit.subscriptions,
            "webhooks_sent": self.audit.webhooks_sent,
            "webhooks_accepted": self.audit.webhooks_accepted,
            "webhooks_never_accepted": self.audit.never_accepted.len(),
            "deliveries": self.audit.deliveries,
            "duplicate_deliveries": self.audit.duplicate_deliveries,
            "events_lost": self.audit.lost.len(),
            "accepted_in_dead_letters": self.audit.accepted_in_dead_letters,
            "duplicate_transitions": self.audit.duplicate_transitions.len(),
            "divergent_subscriptions": self.audit.divergent.len(),
            "dead_letters_queue": self.audit.dead_letters_queue,
            "dead_letters_outbox": self.audit.dead_letters_outbox,
            "dead_letter_reasons": self.audit.dead_letter_reasons,
            "auto_accepted": self.audit.auto_accepted.len() + self.auto_accepted_excused,
            "auto_accepted_in_disturbances": self.auto_accepted_excused,
            "auto_accepted_late": self.audit.auto_accepted.len(),
            "worker_kills": self.count(|d| matches!(d, Disturbance::KillWorker(_))),
            "broker_closes": self.count(|d| *d == Disturbance::CloseBrokerConnections),
            "postgres_restarts": self.count(|d| *d == Disturbance::RestartPostgres),
            "broker_restarts": self.count(|d| *d == Disturbance::RestartBroker),
            "ingress_kills": self.count(|d| *d == Disturbance::KillIngress),
            "postgres_outages": self.count(|d| *d == Disturbance::PostgresOutage),
            "marketplace_outages": self.count(|d| *d == Disturbance::MarketplaceOutage),
            "slow_recoveries": self.slow_recoveries().len(),
            "unexpected_exits": self.unexpected_exits.len(),
            "max_recovery_s": round(
                self.disturbances
                    .iter()
                    .map(|d| d.recovered_after.as_secs_f64())
                    .fold(0.0, f64::max),
                1
            ),
            "quiescent": self.quiescent,
            "load_s": round(self.load_seconds, 1),
            "settle_s": round(self.settle_seconds, 1),
            "passed": self.passed(),
        });
        println!("{json}");
    }

    fn count(&self, kind: impl Fn(&Disturbance) -> bool) -> usize {
        self.disturbances.iter().filter(|d| kind(&d.kind)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::normalize;

    fn args(kills: usize, closes: usize, restarts: usize) -> ChaosBenchArgs {
        ChaosBenchArgs {
            webhooks: 700,
            subscriptions: 70,
            seed: None,
            max_seconds: 600,
            worker_kills: kills,
            broker_closes: closes,
            postgres_restarts: restarts,
            postgres_restart_command: None,
            broker_restarts: 0,
            broker_restart_command: None,
            ingress_kills: 0,
            postgres_outage_secs: 0,
            postgres_stop_command: None,
            postgres_start_command: None,
            marketplace_outage_secs: 0,
            keep: false,
        }
    }

    #[test]
    fn disturbances_are_spread_over_the_load_with_the_special_ones_between_kills() {
        let plan = ChaosPlan::new(&args(4, 1, 1), 700);
        let kinds: Vec<Disturbance> = plan.steps.iter().map(|(_, d)| *d).collect();
        assert_eq!(
            kinds,
            [
                Disturbance::KillWorker(0),
                Disturbance::KillWorker(1),
                Disturbance::CloseBrokerConnections,
                Disturbance::KillWorker(2),
                Disturbance::RestartPostgres,
                Disturbance::KillWorker(3),
            ]
        );
        let marks: Vec<usize> = plan.steps.iter().map(|(at, _)| *at).collect();
        assert_eq!(marks, [100, 200, 300, 400, 500, 600]);
        assert_eq!(plan.first_allowance(700), 200);
        assert!(ChaosPlan::new(&args(0, 0, 0), 700).steps.is_empty());
        assert_eq!(
            ChaosPlan::new(&args(0, 0, 0), 700).first_allowance(700),
            700
        );
    }

    #[test]
    fn a_customer_only_asks_what_the_simulator_allows() {
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            match Action::next(&mut rng, "Subscribed", "per-seat", Some(5), false) {
                Some(Action::ChangeQuantity(n)) => assert!(n != 5 && SEAT_RANGE.contains(&n)),
                Some(Action::Suspend | Action::Renew) => {}
                other => panic!("{other:?}"),
            }
            match Action::next(&mut rng, "Subscribed", "gold", None, false) {
                Some(Action::ChangePlan(plan)) => assert_eq!(plan, "silver"),
                Some(Action::Suspend | Action::Renew) => {}
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            Action::next(&mut rng, "Suspended", "gold", None, false),
            Some(Action::Reinstate)
        );
        assert_eq!(
            Action::next(&mut rng, "Suspended", "gold", None, true),
            Some(Action::Unsubscribe)
        );
        assert_eq!(
            Action::next(&mut rng, "Unsubscribed", "gold", None, false),
            None
        );
    }

    #[test]
    fn reasons_group_without_their_ids() {
        assert_eq!(
            normalize("operation 3f9c6b1e-0000-4000-8000-000000000001 failed: 409"),
            "operation … failed: 409"
        );
    }
}
