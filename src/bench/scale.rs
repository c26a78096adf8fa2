//! `fulfillment bench scale`: does the engine stay as fast with a big database? The pipeline
//! bench's changes and a `fulfillment reconcile` run first against an empty database, then
//! again after N subscriptions (at the simulator and here) and M event-log rows were
//! preloaded with `COPY` (copies of a real subscription and its event log, not through the
//! pipeline), with the inbox keys, done outbox rows and feed events that much history leaves
//! (`store::preload`); the report puts the two side by side.
//!
//! The world is the pipeline bench's: the simulator in this process, `fulfillment serve` and
//! one `fulfillment work` as children, a throwaway database and RabbitMQ topology;
//! `fulfillment reconcile --json` runs as a child too, so its time and peak RSS are its own.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::harness::{
    BenchEnv, ChildProcess, OFFER, Order, RssSampler, SimHandle, free_local_address,
    in_pipeline_world, purchase_and_activate, start_ingress_and_worker, wait_for_empty_outbox,
};
use super::measure::{self, round};
use super::pipeline::{Phase, drive_changes};
use crate::settings::Settings;
use crate::store::preload::Preloaded;

const PLAN: &str = "per-seat";
const SEATS: u32 = 5;
/// The target: loaded throughput at least this share of the empty database's.
const TARGET_LOADED_RATIO: f64 = 0.9;
/// The target for reconciling the preloaded subscriptions.
const TARGET_RECONCILE: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, clap::Args)]
pub struct ScaleBenchArgs {
    /// Subscriptions preloaded at the simulator and in the database.
    #[arg(long, default_value_t = 1_000_000)]
    pub subscriptions: usize,
    /// Event-log rows preloaded, spread evenly over the preloaded subscriptions.
    #[arg(long, default_value_t = 10_000_000)]
    pub events: usize,
    /// Seat changes of each pipeline phase (empty, loaded).
    #[arg(long, default_value_t = 2000)]
    pub changes: usize,
    /// Subscriptions the changes go through (changes in flight).
    #[arg(long, default_value_t = 200)]
    pub in_flight: usize,
    /// Deadline of each phase in seconds.
    #[arg(long, default_value_t = 600)]
    pub max_seconds: u64,
}

pub async fn run(settings: Settings, args: ScaleBenchArgs) -> anyhow::Result<ExitCode> {
    if args.subscriptions == 0 || args.changes == 0 || args.in_flight == 0 {
        bail!("--subscriptions, --changes and --in-flight must be at least 1");
    }
    if args.in_flight > args.changes {
        bail!(
            "--in-flight ({}) must not exceed --changes ({}): every subscription gets a change",
            args.in_flight,
            args.changes
        );
    }
    if args.events > 0 && args.events < args.subscriptions {
        bail!(
            "--events ({}) must be 0 or at least --subscriptions ({}): event-log rows are spread \
             evenly over the preloaded subscriptions",
            args.events,
            args.subscriptions
        );
    }
    let started = Instant::now();
    let report = in_pipeline_world(&settings, async |env, ingress_addr, children| {
        measure(env, &args, ingress_addr, children).await
    })
    .await?;
    report.print(&args, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

struct Report {
    empty: Phase,
    loaded: Phase,
    reconcile_empty: Reconciled,
    reconcile_loaded: Reconciled,
    /// The rows the preload copied, per table.
    preloaded: Preloaded,
    preload_seconds: f64,
    database_mib: f64,
    ingress_peak_rss_mib: f64,
    worker_peak_rss_mib: f64,
    /// This process (the simulator and the load driver) before the preload, and at the end
    /// (the simulator then holds every preloaded subscription, as Microsoft's side would).
    simulator_peak_rss_mib_empty: f64,
    simulator_peak_rss_mib: f64,
}

/// What one `fulfillment reconcile --json` run did.
struct Reconciled {
    seconds: f64,
    listed: u64,
    known_here: u64,
    drifts: usize,
    peak_rss_mib: f64,
}

async fn measure(
    env: &BenchEnv,
    args: &ScaleBenchArgs,
    ingress_addr: std::net::SocketAddr,
    children: &mut Vec<ChildProcess>,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    start_ingress_and_worker(env, ingress_addr, &http, children).await?;
    let ingress_rss = RssSampler::start(children[0].pid);
    let worker_rss = RssSampler::start(children[1].pid);
    let sim = Arc::new(SimHandle {
        http: http.clone(),
        base: env.sim.base_url(),
    });
    eprintln!(
        "bench: {} purchases through the landing page and activation…",
        args.in_flight
    );
    let orders = vec![
        Order {
            plan: PLAN,
            quantity: Some(SEATS),
        };
        args.in_flight
    ];
    let subscriptions =
        purchase_and_activate(env, &sim, &children[0], &orders, Duration::from_secs(120)).await?;
    let pool = crate::store::connect(&env.settings.database).await?;
    let max = Duration::from_secs(args.max_seconds);
    wait_for_empty_outbox(&pool, max).await?;

    eprintln!("bench: {} seat changes, empty database…", args.changes);
    let empty = drive_changes(env, &sim, &subscriptions, args.changes, args.max_seconds, 0).await?;
    wait_for_empty_outbox(&pool, max).await?;
    eprintln!("bench: reconcile, empty database…");
    let reconcile_empty = reconcile(env).await?;
    let simulator_peak_rss_mib_empty = measure::own_peak_rss_mib();

    eprintln!(
        "bench: preloading {} subscriptions and {} event-log rows…",
        args.subscriptions, args.events
    );
    let preloading = Instant::now();
    let template = crate::store::preload::template(&pool, subscriptions[0]).await?;
    if template.event_rows() == 0 {
        bail!("the template subscription has no event-log rows to copy");
    }
    let view = env.sim.view();
    let preloaded_ids = tokio::task::spawn_blocking({
        let count = args.subscriptions;
        move || view.preload_subscribed(OFFER, PLAN, Some(SEATS), count)
    })
    .await
    .context("the simulator's preload panicked")??;
    let preloaded = crate::store::preload::copy(
        &pool,
        &template,
        &preloaded_ids,
        args.events / args.subscriptions,
    )
    .await
    .context("cannot preload the database")?;
    drop(preloaded_ids);
    crate::store::analyze(&pool).await?;
    let preload_seconds = preloading.elapsed().as_secs_f64();
    let database_mib = crate::store::verify::database_bytes(&pool).await? as f64 / 1048576.0;

    eprintln!("bench: {} seat changes, loaded database…", args.changes);
    let share = args.changes / args.in_flight;
    let loaded = drive_changes(
        env,
        &sim,
        &subscriptions,
        args.changes,
        args.max_seconds,
        share,
    )
    .await?;
    wait_for_empty_outbox(&pool, max).await?;
    eprintln!(
        "bench: reconcile of {} subscriptions…",
        args.subscriptions + args.in_flight
    );
    let reconcile_loaded = reconcile(env).await?;
    pool.close().await;
    Ok(Report {
        empty,
        loaded,
        reconcile_empty,
        reconcile_loaded,
        preloaded,
        preload_seconds,
        database_mib,
        ingress_peak_rss_mib: ingress_rss.peak_mib(),
        worker_peak_rss_mib: worker_rss.peak_mib(),
        simulator_peak_rss_mib_empty,
        simulator_peak_rss_mib: measure::own_peak_rss_mib(),
    })
}

/// `fulfillment reconcile --json` as a child process against this run's world.
async fn reconcile(env: &BenchEnv) -> anyhow::Result<Reconciled> {
    let exe = std::env::current_exe().context("cannot find this executable")?;
    let started = Instant::now();
    let child = tokio::process::Command::new(exe)
        .args(["reconcile", "--json"])
        .envs(env.serve_env(free_local_address()?, false))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start fulfillment reconcile")?;
    let rss = child.id().map(RssSampler::start);
    let output = child.wait_with_output().await?;
    let seconds = started.elapsed().as_secs_f64();
    // Exit 1 means drift was found: a report all the same.
    if !matches!(output.status.code(), Some(0 | 1)) {
        bail!(
            "fulfillment reconcile failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let report: Value = serde_json::from_slice(&output.stdout)
        .context("fulfillment reconcile --json printed no JSON")?;
    Ok(Reconciled {
        seconds,
        listed: report["listed_by_microsoft"].as_u64().unwrap_or(0),
        known_here: report["known_here"].as_u64().unwrap_or(0),
        drifts: report["drifts"].as_array().map_or(0, Vec::len),
        peak_rss_mib: rss.map_or(0.0, |r| r.max_mib()),
    })
}

impl Report {
    fn loaded_ratio(&self) -> f64 {
        let empty = self.empty.per_second();
        if empty > 0.0 {
            self.loaded.per_second() / empty
        } else {
            0.0
        }
    }

    fn target_met(&self) -> bool {
        self.empty.failed.is_empty()
            && self.loaded.failed.is_empty()
            && self.loaded_ratio() >= TARGET_LOADED_RATIO
            && self.reconcile_loaded.seconds < TARGET_RECONCILE.as_secs_f64()
    }

    fn print(&self, args: &ScaleBenchArgs, took: Duration) {
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "fulfillment bench scale: {cores} cores, loopback; {} seat changes over {} subscriptions, \
             on an empty database and after preloading {} subscriptions and {} event-log rows\n",
            args.changes, args.in_flight, self.preloaded.subscriptions, self.preloaded.events
        );
        println!(
            "  preload (COPY)                  {:.1} s; database {:.0} MiB",
            self.preload_seconds, self.database_mib
        );
        let history: Vec<String> = self
            .preloaded
            .history
            .iter()
            .map(|(table, rows)| format!("{table} {rows}"))
            .collect();
        println!(
            "  preloaded beside the event log  {} (rows, in the template's proportion to its event log)",
            history.join(", ")
        );
        for (name, phase) in [("empty", &self.empty), ("loaded", &self.loaded)] {
            println!(
                "  pipeline, {name:<6}                {:>8.0} events/s  (ACK p99 {:.0} ms; {} not acknowledged)",
                phase.per_second(),
                phase.ack_ms(0.99),
                phase.failed.len()
            );
        }
        println!(
            "  ratio loaded/empty              {:>8.2}",
            self.loaded_ratio()
        );
        for (name, run) in [
            ("empty", &self.reconcile_empty),
            ("loaded", &self.reconcile_loaded),
        ] {
            println!(
                "  reconcile, {name:<6}               {:>8.1} s     ({} listed by Microsoft, {} here, {} drifted; peak RSS {:.0} MiB)",
                run.seconds, run.listed, run.known_here, run.drifts, run.peak_rss_mib
            );
        }
        println!(
            "  peak RSS (VmHWM)                ingress {:.1} MiB, worker {:.1} MiB; simulator and \
             driver {:.1} MiB before the preload, {:.1} MiB holding the preloaded subscriptions",
            self.ingress_peak_rss_mib,
            self.worker_peak_rss_mib,
            self.simulator_peak_rss_mib_empty,
            self.simulator_peak_rss_mib
        );
        println!(
            "\ntarget (loaded ≥ {:.0}% of empty, reconcile < {} s): {}",
            TARGET_LOADED_RATIO * 100.0,
            TARGET_RECONCILE.as_secs(),
            if self.target_met() { "met" } else { "NOT MET" }
        );
        println!("run took {:.1} s", took.as_secs_f64());
        let json = json!({
            "bench": "scale",
            "subscriptions": self.preloaded.subscriptions,
            "events": self.preloaded.events,
            "preloaded_rows": self
                .preloaded
                .history
                .iter()
                .map(|(table, rows)| (table.to_string(), json!(rows)))
                .collect::<serde_json::Map<String, Value>>(),
            "changes": args.changes,
            "in_flight": args.in_flight,
            "preload_s": round(self.preload_seconds, 1),
            "database_mib": round(self.database_mib, 0),
            "events_per_s_empty": round(self.empty.per_second(), 1),
            "events_per_s_loaded": round(self.loaded.per_second(), 1),
            "loaded_ratio": round(self.loaded_ratio(), 3),
            "ack_p99_ms_empty": round(self.empty.ack_ms(0.99), 1),
            "ack_p99_ms_loaded": round(self.loaded.ack_ms(0.99), 1),
            "not_acknowledged": self.empty.failed.len() + self.loaded.failed.len(),
            "reconcile_s": round(self.reconcile_loaded.seconds, 1),
            "reconcile_s_empty": round(self.reconcile_empty.seconds, 2),
            "reconcile_listed": self.reconcile_loaded.listed,
            "reconcile_drifts": self.reconcile_loaded.drifts,
            "reconcile_peak_rss_mib": round(self.reconcile_loaded.peak_rss_mib, 1),
            "ingress_peak_rss_mib": round(self.ingress_peak_rss_mib, 1),
            "worker_peak_rss_mib": round(self.worker_peak_rss_mib, 1),
            "simulator_peak_rss_mib_empty": round(self.simulator_peak_rss_mib_empty, 1),
            "simulator_peak_rss_mib": round(self.simulator_peak_rss_mib, 1),
            "target": {
                "min_loaded_ratio": TARGET_LOADED_RATIO,
                "max_reconcile_s": TARGET_RECONCILE.as_secs(),
                "met": self.target_met(),
            },
        });
        println!("{json}");
    }
}
