//! `fulfillment bench pipeline`: customer seat changes made on the simulator travel the whole
//! way (signed webhook, `fulfillment serve`, RabbitMQ, `fulfillment work`, PostgreSQL, the
//! PATCH that acknowledges the operation) and the simulator times each one from the
//! operation's creation to its acknowledgement, as Microsoft would.
//!
//! The ceiling, measured in the same run: PostgreSQL's single-row commits per second from 8
//! connections, since every event costs the worker several commits (decision, outbox claim,
//! effect result). The report gives end-to-end events/s against it, the webhook-to-ACK
//! latency percentiles and the peak RSS of the ingress and the worker (child processes).
//!
//! Changes to one subscription are sequential: Microsoft keeps one operation pending per
//! subscription, so `--subscriptions` bounds the events in flight. Everything is local and
//! throwaway (see [`super::harness`]).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::postgres::{PgPool, PgPoolOptions};
use uuid::Uuid;

use super::harness::{
    BenchEnv, ChildProcess, Order, RssSampler, SimHandle, free_local_address, in_pipeline_world,
    purchase_and_activate, start_ingress_and_worker,
};
use super::measure::{self, PipelineCpu, round};
use crate::settings::Settings;

/// The targets: at least this many changes per second end to end, at least this share of
/// the baseline engine's rate, the ACK p99 below this.
pub const TARGET_MIN_PER_S: f64 = 1000.0;
pub const TARGET_MIN_BASELINE_RATIO: f64 = 0.5;
pub const TARGET_MAX_P99_MS: f64 = 1000.0;

/// Connections of the PostgreSQL ceiling phase.
const CEILING_CONNECTIONS: usize = 8;
/// The simulator's per-seat plan and the seat counts the changes alternate between.
const PLAN: &str = "per-seat";
const SEATS: [u32; 2] = [5, 6];

#[derive(Debug, Clone, clap::Args)]
pub struct PipelineBenchArgs {
    /// Customer seat changes sent through the whole pipeline (measured).
    #[arg(long, default_value_t = 2000)]
    pub events: usize,
    /// Subscriptions the changes are spread over (each one's changes run one after another).
    #[arg(long, default_value_t = 200)]
    pub subscriptions: usize,
    /// Length of the PostgreSQL commit-ceiling phase, in seconds.
    #[arg(long, default_value_t = 5)]
    pub ceiling_seconds: u64,
    /// Deadline of the measured phase in seconds; what did not finish by then counts as failed.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
}

pub async fn run(settings: Settings, args: PipelineBenchArgs) -> anyhow::Result<ExitCode> {
    if args.events == 0 || args.subscriptions == 0 {
        bail!("--events and --subscriptions must be at least 1");
    }
    if args.subscriptions > args.events {
        bail!(
            "--subscriptions ({}) must not exceed --events ({}): every subscription gets at least one change",
            args.subscriptions,
            args.events
        );
    }
    if args.ceiling_seconds == 0 {
        bail!("--ceiling-seconds must be at least 1");
    }
    let started = Instant::now();
    let report = in_pipeline_world(&settings, async |env, ingress_addr, children| {
        measure_all(env, &args, ingress_addr, children).await
    })
    .await?;
    report.print(&args, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

struct Report {
    commit_ceiling_per_s: f64,
    events_per_s: f64,
    acknowledged: usize,
    failed: Vec<String>,
    ack_p50_ms: f64,
    ack_p99_ms: f64,
    ack_max_ms: f64,
    ingress_peak_rss_mib: f64,
    worker_peak_rss_mib: f64,
    /// This process: the simulator and the load driver.
    simulator_peak_rss_mib: f64,
    /// The baseline engine's acknowledged changes per second.
    baseline_per_s: f64,
    baseline_failed: usize,
    baseline_p99_ms: f64,
    /// CPU ms per change by process: the worker's phase and the baseline's.
    cpu_worker: serde_json::Value,
    cpu_baseline: serde_json::Value,
    agreeing_subscriptions: usize,
    measured_seconds: f64,
    /// Since the first change until every effect of every change was done.
    drained_seconds: Option<f64>,
    /// PostgreSQL's most expensive statements of the worker's phase.
    statements: Statements,
}

/// What `pg_stat_statements` counted in the worker's phase, per acknowledged change.
enum Statements {
    Counted {
        top: Vec<crate::store::statements::StatementCost>,
        /// Execution time of every statement of the phase, in ms.
        total_ms: f64,
        changes: usize,
    },
    NotPreloaded {
        preload: String,
    },
}

/// Statements the report lists, and the characters of each one's text it keeps.
const TOP_STATEMENTS: i64 = 10;
const STATEMENT_CHARS: usize = 90;

impl Statements {
    /// `pg_stat_statements` enabled in the benchmark's database and its counters reset,
    /// or why not.
    async fn start(pool: &PgPool) -> anyhow::Result<Option<String>> {
        use crate::store::statements::{self, Availability};
        match statements::enable(pool)
            .await
            .context("cannot check for pg_stat_statements")?
        {
            Availability::Counting => {
                statements::reset(pool)
                    .await
                    .context("cannot reset pg_stat_statements")?;
                Ok(None)
            }
            Availability::NotPreloaded { preload } => Ok(Some(preload)),
        }
    }

    async fn read(
        pool: &PgPool,
        not_preloaded: Option<String>,
        changes: usize,
    ) -> anyhow::Result<Self> {
        if let Some(preload) = not_preloaded {
            return Ok(Self::NotPreloaded { preload });
        }
        let (top, total_ms) = crate::store::statements::top(pool, TOP_STATEMENTS)
            .await
            .context("cannot read pg_stat_statements")?;
        Ok(Self::Counted {
            top,
            total_ms,
            changes,
        })
    }

    fn print(&self) {
        match self {
            Self::Counted {
                top,
                total_ms,
                changes,
            } => {
                let per = |value: f64| value / (*changes).max(1) as f64;
                println!(
                    "\nwhere PostgreSQL's time goes (pg_stat_statements, worker phase until every effect \
                     was done: {:.2} ms of statement execution per change; top {}):",
                    per(*total_ms),
                    top.len()
                );
                println!(
                    "  {:>9} {:>9} {:>6}  statement",
                    "ms/change", "calls/chg", "share"
                );
                for statement in top {
                    println!(
                        "  {:>9.3} {:>9.2} {:>5.1}%  {}",
                        per(statement.total_ms),
                        per(statement.calls as f64),
                        if *total_ms > 0.0 {
                            statement.total_ms / total_ms * 100.0
                        } else {
                            0.0
                        },
                        shorten(&statement.query, STATEMENT_CHARS)
                    );
                }
            }
            Self::NotPreloaded { preload } => println!(
                "\nwhere PostgreSQL's time goes: not measured, the server does not load \
                 pg_stat_statements (shared_preload_libraries = '{preload}'). To see it, add \
                 pg_stat_statements to shared_preload_libraries in postgresql.conf, restart \
                 PostgreSQL, and run the bench again (it creates the extension in its own database)."
            ),
        }
    }

    fn json(&self) -> serde_json::Value {
        match self {
            Self::Counted {
                top,
                total_ms,
                changes,
            } => {
                let per = |value: f64| round(value / (*changes).max(1) as f64, 3);
                json!({
                    "exec_ms_per_change": per(*total_ms),
                    "top": top.iter().map(|s| json!({
                        "query": shorten(&s.query, STATEMENT_CHARS),
                        "calls_per_change": per(s.calls as f64),
                        "ms_per_change": per(s.total_ms),
                        "rows_per_change": per(s.rows as f64),
                    })).collect::<Vec<_>>(),
                })
            }
            Self::NotPreloaded { .. } => json!("not loaded (shared_preload_libraries)"),
        }
    }
}

/// A statement's text on one line, whitespace collapsed, cut to `chars` characters.
fn shorten(query: &str, chars: usize) -> String {
    let line = query.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= chars {
        return line;
    }
    let mut cut: String = line.chars().take(chars.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

async fn measure_all(
    env: &BenchEnv,
    args: &PipelineBenchArgs,
    ingress_addr: std::net::SocketAddr,
    children: &mut Vec<ChildProcess>,
) -> anyhow::Result<Report> {
    eprintln!("bench: PostgreSQL single-row commit ceiling ({CEILING_CONNECTIONS} connections)…");
    let commit_ceiling_per_s =
        commit_ceiling(env, Duration::from_secs(args.ceiling_seconds)).await?;

    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    start_ingress_and_worker(env, ingress_addr, &http, children).await?;
    let (ingress_pid, worker_pid) = (children[0].pid, children[1].pid);
    let ingress_rss = RssSampler::start(ingress_pid);
    let worker_rss = RssSampler::start(worker_pid);

    eprintln!(
        "bench: {} purchases through the landing page and activation…",
        args.subscriptions
    );
    let sim = Arc::new(SimHandle {
        http: http.clone(),
        base: env.sim.base_url(),
    });
    let orders = vec![
        Order {
            plan: PLAN,
            quantity: Some(SEATS[0]),
        };
        args.subscriptions
    ];
    let subscriptions =
        purchase_and_activate(env, &sim, &children[0], &orders, Duration::from_secs(120)).await?;

    eprintln!(
        "bench: {} seat changes over {} subscriptions through the worker…",
        args.events, args.subscriptions
    );
    let pool = crate::store::connect(&env.settings.database).await?;
    let statements_off = Statements::start(&pool).await?;
    let deadline = Duration::from_secs(args.max_seconds);
    let measured = Instant::now();
    let cpu_before = PipelineCpu::now(ingress_pid, worker_pid);
    let worker_phase =
        drive_changes(env, &sim, &subscriptions, args.events, args.max_seconds, 0).await?;
    let cpu_worker = cpu_before.per_change_since(
        &PipelineCpu::now(ingress_pid, worker_pid),
        worker_phase.latencies_us.len(),
    );
    let Phase {
        latencies_us,
        mut failed,
        seconds: measured_seconds,
    } = worker_phase;
    let ms = |p: f64| measure::percentile_us(&latencies_us, p) as f64 / 1000.0;

    // The ACK is the first of a change's effects; the confirmation, the GET and the domain
    // event may still be queued. The run is over when the outbox is empty.
    let drained_seconds = loop {
        let pending = crate::store::verify::pending_effects(&pool).await?;
        if pending == 0 {
            break Some(measured.elapsed().as_secs_f64());
        }
        if measured.elapsed() > deadline {
            eprintln!("bench: {pending} outbox row(s) still pending at the deadline");
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let statements = Statements::read(&pool, statements_off, latencies_us.len()).await?;
    let agreeing_subscriptions = agreeing(env, &pool, &subscriptions).await?;
    explain(&pool, &mut failed).await?;
    pool.close().await;
    let worker_peak_rss_mib = worker_rss.peak_mib();

    // The baseline: the same changes through the same simulator, ingress and RabbitMQ,
    // consumed by the minimal engine instead of the worker.
    let worker = children.pop().context("the worker is gone")?;
    worker.stop().await?;
    let baseline_addr = free_local_address()?;
    let listen = baseline_addr.to_string();
    let baseline = ChildProcess::spawn(
        "baseline",
        &env.id,
        &["bench", "baseline-engine", "--listen", &listen],
        env.serve_env(free_local_address()?, false),
        baseline_addr,
    )
    .await?;
    children.push(baseline);
    children[1].wait_ready(&http).await?;
    let baseline_pid = children[1].pid;
    eprintln!(
        "bench: the same {} seat changes through the baseline engine…",
        args.events
    );
    let share = args.events / args.subscriptions;
    let cpu_before = PipelineCpu::now(ingress_pid, baseline_pid);
    let baseline_phase = drive_changes(
        env,
        &sim,
        &subscriptions,
        args.events,
        args.max_seconds,
        share,
    )
    .await?;
    let cpu_baseline = cpu_before.per_change_since(
        &PipelineCpu::now(ingress_pid, baseline_pid),
        baseline_phase.latencies_us.len(),
    );
    let baseline_p99_ms =
        measure::percentile_us(&baseline_phase.latencies_us, 0.99) as f64 / 1000.0;
    Ok(Report {
        commit_ceiling_per_s,
        events_per_s: latencies_us.len() as f64 / measured_seconds,
        acknowledged: latencies_us.len(),
        failed,
        ack_p50_ms: ms(0.50),
        ack_p99_ms: ms(0.99),
        ack_max_ms: ms(1.0),
        ingress_peak_rss_mib: ingress_rss.peak_mib(),
        worker_peak_rss_mib,
        simulator_peak_rss_mib: measure::own_peak_rss_mib(),
        baseline_per_s: baseline_phase.latencies_us.len() as f64 / baseline_phase.seconds,
        baseline_failed: baseline_phase.failed.len(),
        baseline_p99_ms,
        cpu_worker,
        cpu_baseline,
        agreeing_subscriptions,
        measured_seconds,
        drained_seconds,
        statements,
    })
}

/// What one phase of changes measured.
pub(crate) struct Phase {
    /// Webhook-to-ACK times of the acknowledged changes, sorted.
    pub latencies_us: Vec<u64>,
    pub failed: Vec<String>,
    pub seconds: f64,
}

impl Phase {
    pub fn per_second(&self) -> f64 {
        self.latencies_us.len() as f64 / self.seconds
    }

    pub fn ack_ms(&self, p: f64) -> f64 {
        measure::percentile_us(&self.latencies_us, p) as f64 / 1000.0
    }
}

/// `events` seat changes spread over `subscriptions`, each subscription's one after
/// another (Microsoft keeps one operation pending per subscription); change numbers start at
/// `first` so the seat counts keep alternating from where an earlier phase left them.
pub(crate) async fn drive_changes(
    env: &BenchEnv,
    sim: &Arc<SimHandle>,
    subscriptions: &[Uuid],
    events: usize,
    max_seconds: u64,
    first: usize,
) -> anyhow::Result<Phase> {
    let deadline = Duration::from_secs(max_seconds);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (index, subscription) in subscriptions.iter().copied().enumerate() {
        let share =
            events / subscriptions.len() + usize::from(index < events % subscriptions.len());
        let sim = Arc::clone(sim);
        let progress_of = ProgressReader(env.sim.view());
        tasks.spawn(async move {
            let mut outcomes = Vec::with_capacity(share);
            for change in first..first + share {
                if started.elapsed() > deadline {
                    outcomes.push(Err("deadline passed before it was sent".to_string()));
                    continue;
                }
                let seats = SEATS[(change + 1) % SEATS.len()];
                let operation = match sim.change_seats(subscription, seats).await {
                    Ok(operation) => operation,
                    Err(e) => {
                        outcomes.push(Err(e));
                        continue;
                    }
                };
                let left = deadline.saturating_sub(started.elapsed());
                outcomes.push(
                    progress_of
                        .wait(subscription, operation, left)
                        .await
                        .map_err(|reason| format!("operation {operation}: {reason}")),
                );
            }
            outcomes
        });
    }
    let mut latencies_us = Vec::with_capacity(events);
    let mut failed = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        for outcome in joined.context("a load task panicked")? {
            match outcome {
                Ok(us) => latencies_us.push(us),
                Err(reason) => failed.push(reason),
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    latencies_us.sort_unstable();
    Ok(Phase {
        latencies_us,
        failed,
        seconds,
    })
}

/// Single-row INSERT commits from [`CEILING_CONNECTIONS`] connections for `length`.
async fn commit_ceiling(env: &BenchEnv, length: Duration) -> anyhow::Result<f64> {
    let pool = PgPoolOptions::new()
        .max_connections(CEILING_CONNECTIONS as u32)
        .connect(env.settings.database.url.expose())
        .await
        .context("cannot connect to the benchmark database")?;
    crate::store::ceiling::create(&pool).await?;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CEILING_CONNECTIONS {
        let pool = pool.clone();
        tasks.spawn(async move {
            let mut commits = 0u64;
            while started.elapsed() < length {
                crate::store::ceiling::commit_one(&pool).await?;
                commits += 1;
            }
            anyhow::Ok(commits)
        });
    }
    let mut total = 0u64;
    while let Some(joined) = tasks.join_next().await {
        total += joined.context("a ceiling task panicked")??;
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    crate::store::ceiling::drop_table(&pool).await?;
    pool.close().await;
    Ok(rate)
}

/// Reads operation progress from the simulator in this process.
#[derive(Clone)]
struct ProgressReader(crate::simulator::SimulatorView);

impl ProgressReader {
    /// The webhook-to-ACK time in µs of an operation acknowledged by the engine's PATCH;
    /// anything else (auto-accepted, failed, still pending at the deadline) is an error.
    async fn wait(
        &self,
        subscription: Uuid,
        operation: Uuid,
        left: Duration,
    ) -> Result<u64, String> {
        let progress = self
            .0
            .wait_for_operation(subscription, operation, left)
            .await
            .ok_or_else(|| format!("operation {operation} vanished"))?;
        match (progress.finished, progress.resolution.as_deref()) {
            (Some(finished), Some(resolution))
                if progress.status == "Succeeded" && resolution.starts_with("acknowledged") =>
            {
                let us = (finished - progress.created).whole_microseconds();
                Ok(u64::try_from(us).unwrap_or(0))
            }
            (Some(_), resolution) => Err(format!(
                "{} ({}); webhook attempts: [{}]",
                progress.status,
                resolution.unwrap_or("no resolution"),
                progress
                    .webhook_attempts
                    .iter()
                    .map(|attempt| attempt.outcome.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            (None, _) => Err("still InProgress at the deadline".into()),
        }
    }
}

/// Adds what the engine decided (from its event log) to each failure that names an operation.
async fn explain(pool: &PgPool, failed: &mut [String]) -> anyhow::Result<()> {
    for reason in failed.iter_mut() {
        let Some(operation) = reason
            .strip_prefix("operation ")
            .and_then(|rest| rest.split(':').next())
        else {
            continue;
        };
        let decisions: Vec<String> = crate::store::timeline::events_of_message(pool, operation)
            .await?
            .into_iter()
            .map(|row| format!("{}: {}", row.outcome, row.reason.unwrap_or_default()))
            .collect();
        *reason = format!("{reason}; our event log: [{}]", decisions.join("; "));
    }
    Ok(())
}

/// How many subscriptions end with the same state, plan and seats on both sides.
async fn agreeing(env: &BenchEnv, pool: &PgPool, subscriptions: &[Uuid]) -> anyhow::Result<usize> {
    let mut agree = 0;
    for id in subscriptions {
        let ours = crate::store::subscriptions::find(pool, *id).await?;
        let theirs = env.sim.view().subscription_status(*id);
        if let (Some(ours), Some((status, plan, quantity))) = (ours, theirs)
            && ours.state == status
            && ours.plan_id.as_deref() == Some(plan.as_str())
            && ours.quantity.and_then(|q| u32::try_from(q).ok()) == quantity
        {
            agree += 1;
        }
    }
    Ok(agree)
}

impl Report {
    fn ratio(&self) -> f64 {
        if self.commit_ceiling_per_s > 0.0 {
            self.events_per_s / self.commit_ceiling_per_s
        } else {
            0.0
        }
    }

    fn baseline_ratio(&self) -> f64 {
        if self.baseline_per_s > 0.0 {
            self.events_per_s / self.baseline_per_s
        } else {
            0.0
        }
    }

    fn target_met(&self) -> bool {
        self.failed.is_empty()
            && self.events_per_s >= TARGET_MIN_PER_S
            && self.baseline_ratio() >= TARGET_MIN_BASELINE_RATIO
            && self.ack_p99_ms < TARGET_MAX_P99_MS
    }

    fn print(&self, args: &PipelineBenchArgs, took: Duration) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "fulfillment bench pipeline: {cores} cores, loopback; {} seat changes over {} subscriptions \
             (simulator → ingress → RabbitMQ → worker → PostgreSQL → PATCH to the simulator)\n",
            args.events, args.subscriptions
        );
        println!(
            "  end-to-end                      {:>8.0} events/s  ({} acknowledged in {:.1} s)",
            self.events_per_s, self.acknowledged, self.measured_seconds
        );
        println!(
            "  ceiling: PostgreSQL commits     {:>8.0} /s        ({CEILING_CONNECTIONS} connections, single-row INSERT each)",
            self.commit_ceiling_per_s
        );
        println!("  ratio end-to-end/ceiling        {:>8.2}", self.ratio());
        println!(
            "  baseline engine                 {:>8.0} events/s  (consume, GET, batched INSERT, PATCH; \
             ACK p99 {:.1} ms; {} not acknowledged)",
            self.baseline_per_s, self.baseline_p99_ms, self.baseline_failed
        );
        println!(
            "  ratio end-to-end/baseline       {:>8.2}",
            self.baseline_ratio()
        );
        println!(
            "  CPU ms per change               worker run {}, baseline run {}",
            self.cpu_worker, self.cpu_baseline
        );
        match self.drained_seconds {
            Some(drained) => println!(
                "  every effect done               after {drained:.1} s ({:.0} changes/s with their \
                 confirmations, GETs and domain events)",
                self.acknowledged as f64 / drained
            ),
            None => println!("  every effect done               NOT before the deadline"),
        }
        println!(
            "  webhook-to-ACK                  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (operation created → PATCH received, simulator clock)",
            self.ack_p50_ms, self.ack_p99_ms, self.ack_max_ms
        );
        println!(
            "  peak RSS (VmHWM)                ingress {:.1} MiB, worker {:.1} MiB, simulator and \
             driver {:.1} MiB",
            self.ingress_peak_rss_mib, self.worker_peak_rss_mib, self.simulator_peak_rss_mib
        );
        println!(
            "  both sides agree                {} of {} subscriptions",
            self.agreeing_subscriptions, args.subscriptions
        );
        if !self.failed.is_empty() {
            let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
            for reason in &self.failed {
                *kinds.entry(reason.as_str()).or_default() += 1;
            }
            println!("  not acknowledged: {}", self.failed.len());
            for (reason, n) in kinds {
                println!("    {n} × {reason}");
            }
        }
        println!(
            "\ntarget (≥ {TARGET_MIN_PER_S:.0} events/s, ≥ {:.0}% of the baseline engine, ACK p99 < \
             {TARGET_MAX_P99_MS:.0} ms, every change acknowledged): {}",
            TARGET_MIN_BASELINE_RATIO * 100.0,
            if self.target_met() { "met" } else { "NOT MET" }
        );
        self.statements.print();
        println!("run took {:.1} s", took.as_secs_f64());
        let json = json!({
            "bench": "pipeline",
            "events": args.events,
            "subscriptions": args.subscriptions,
            "events_per_s": round(self.events_per_s, 1),
            "commit_ceiling_per_s": round(self.commit_ceiling_per_s, 1),
            "ratio": round(self.ratio(), 3),
            "baseline_per_s": round(self.baseline_per_s, 1),
            "baseline_ratio": round(self.baseline_ratio(), 3),
            "baseline_ack_p99_ms": round(self.baseline_p99_ms, 1),
            "baseline_not_acknowledged": self.baseline_failed,
            "cpu_ms_per_change": self.cpu_worker,
            "baseline_cpu_ms_per_change": self.cpu_baseline,
            "ack_p50_ms": round(self.ack_p50_ms, 1),
            "ack_p99_ms": round(self.ack_p99_ms, 1),
            "ack_max_ms": round(self.ack_max_ms, 1),
            "acknowledged": self.acknowledged,
            "not_acknowledged": self.failed.len(),
            "ingress_peak_rss_mib": round(self.ingress_peak_rss_mib, 1),
            "worker_peak_rss_mib": round(self.worker_peak_rss_mib, 1),
            "simulator_peak_rss_mib": round(self.simulator_peak_rss_mib, 1),
            "agreeing_subscriptions": self.agreeing_subscriptions,
            "effects_drained_s": self.drained_seconds.map(|s| round(s, 1)),
            "pg_statements": self.statements.json(),
            "target": {
                "min_events_per_s": TARGET_MIN_PER_S,
                "min_baseline_ratio": TARGET_MIN_BASELINE_RATIO,
                "max_p99_ms": TARGET_MAX_P99_MS,
                "met": self.target_met(),
            },
        });
        println!("{json}");
    }
}

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn statements_are_shortened_to_one_line() {
        assert_eq!(
            shorten("SELECT id\n   FROM subscriptions\tWHERE id = $1", 90),
            "SELECT id FROM subscriptions WHERE id = $1"
        );
        assert_eq!(shorten("UPDATE outbox SET status = $1", 10), "UPDATE ou…");
        assert_eq!(
            shorten("UPDATE outbox SET status = $1", 10).chars().count(),
            10
        );
    }
}
