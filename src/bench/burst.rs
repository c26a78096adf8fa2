//! `fulfillment bench burst`: N customer seat changes, each on its own subscription, issued
//! at the simulator at once (open loop: the next is not waiting for our answer to the last),
//! as after a Microsoft incident that flushes its backlog or a CSP partner's bulk change.
//! Every change must be acknowledged within Microsoft's 10-second window, measured on the
//! simulator's clock from the operation's creation (its webhook); one that is not is
//! auto-accepted by Microsoft — decided without the ISV's policy — and the run exits 1.
//!
//! The world is the pipeline bench's: the simulator in this process, `fulfillment serve` and
//! one `fulfillment work` as children, a throwaway database and RabbitMQ topology.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use uuid::Uuid;

use super::harness::{
    BenchEnv, ChildProcess, Order, RssSampler, SimHandle, in_pipeline_world, purchase_and_activate,
    start_ingress_and_worker, wait_for_empty_outbox,
};
use super::measure::{self, round};
use crate::settings::Settings;

/// Microsoft's ACK window (§4.11): what is not acknowledged by then is auto-accepted.
const WINDOW: Duration = Duration::from_secs(10);
const PLAN: &str = "per-seat";
const SEATS_BEFORE: u32 = 5;
const SEATS_AFTER: u32 = 6;
/// Requests in flight while the changes are issued (the simulator creates an operation
/// and queues its webhook per request; issuing 5,000 takes well under a second).
const ISSUING: usize = 256;

#[derive(Debug, Clone, clap::Args)]
pub struct BurstBenchArgs {
    /// Customer changes issued at once, each on its own subscription.
    #[arg(long, default_value_t = 5000)]
    pub changes: usize,
    /// How long to wait for the last change to end, in seconds.
    #[arg(long, default_value_t = 120)]
    pub max_seconds: u64,
}

pub async fn run(settings: Settings, args: BurstBenchArgs) -> anyhow::Result<ExitCode> {
    if args.changes == 0 {
        bail!("--changes must be at least 1");
    }
    if args.max_seconds == 0 {
        bail!("--max-seconds must be at least 1");
    }
    let started = Instant::now();
    let report = in_pipeline_world(&settings, async |env, ingress_addr, children| {
        measure(env, &args, ingress_addr, children).await
    })
    .await?;
    report.print(&args, started.elapsed());
    Ok(if report.auto_accepted == 0 && report.not_ended == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

struct Report {
    /// Webhook-to-ACK of every change our PATCH acknowledged, sorted.
    acked_us: Vec<u64>,
    auto_accepted: usize,
    /// Ended otherwise (failed, refused) or still open at the deadline, with why.
    not_ended: usize,
    other: Vec<String>,
    issue_seconds: f64,
    drained_seconds: f64,
    ingress_peak_rss_mib: f64,
    worker_peak_rss_mib: f64,
    /// This process: the simulator and the load driver.
    simulator_peak_rss_mib: f64,
}

async fn measure(
    env: &BenchEnv,
    args: &BurstBenchArgs,
    ingress_addr: std::net::SocketAddr,
    children: &mut Vec<ChildProcess>,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    start_ingress_and_worker(env, ingress_addr, &http, children).await?;
    let (ingress_pid, worker_pid) = (children[0].pid, children[1].pid);
    let ingress_rss = RssSampler::start(ingress_pid);
    let worker_rss = RssSampler::start(worker_pid);
    let sim = Arc::new(SimHandle {
        http: http.clone(),
        base: env.sim.base_url(),
    });
    eprintln!(
        "bench: {} purchases through the landing page and activation…",
        args.changes
    );
    let orders = vec![
        Order {
            plan: PLAN,
            quantity: Some(SEATS_BEFORE),
        };
        args.changes
    ];
    let activation_budget = Duration::from_secs(120.max(args.changes as u64 / 10));
    let subscriptions =
        purchase_and_activate(env, &sim, &children[0], &orders, activation_budget).await?;
    // Activation leaves confirmations and domain events in the outbox: the burst starts on
    // an idle engine.
    let pool = crate::store::connect(&env.settings.database).await?;
    wait_for_empty_outbox(&pool, Duration::from_secs(args.max_seconds))
        .await
        .context("the outbox did not drain after the purchases")?;
    pool.close().await;

    eprintln!("bench: {} seat changes issued at once…", args.changes);
    let issued = Instant::now();
    let operations: Vec<(Uuid, Uuid)> = {
        use futures_util::{StreamExt, TryStreamExt};
        futures_util::stream::iter(subscriptions.iter().copied())
            .map(|subscription| {
                let sim = Arc::clone(&sim);
                async move {
                    sim.change_seats(subscription, SEATS_AFTER)
                        .await
                        .map(|operation| (subscription, operation))
                        .map_err(|e| anyhow::anyhow!("cannot issue a change: {e}"))
                }
            })
            .buffer_unordered(ISSUING)
            .try_collect()
            .await?
    };
    let issue_seconds = issued.elapsed().as_secs_f64();

    let view = env.sim.view();
    let deadline = Duration::from_secs(args.max_seconds);
    let mut acked_us = Vec::with_capacity(operations.len());
    let (mut auto_accepted, mut not_ended) = (0, 0);
    let mut other = Vec::new();
    for (subscription, operation) in operations {
        let left = deadline.saturating_sub(issued.elapsed());
        let progress = view
            .wait_for_operation(subscription, operation, left)
            .await
            .with_context(|| format!("operation {operation} vanished"))?;
        match (progress.finished, progress.resolution.as_deref()) {
            (Some(finished), Some(resolution)) if resolution.starts_with("acknowledged") => {
                let us = (finished - progress.created).whole_microseconds();
                acked_us.push(u64::try_from(us).unwrap_or(0));
            }
            (Some(_), Some(resolution)) if resolution.starts_with("auto-accepted") => {
                auto_accepted += 1;
            }
            (finished, resolution) => {
                not_ended += 1;
                other.push(format!(
                    "{} ({})",
                    progress.status,
                    match finished {
                        Some(_) => resolution.unwrap_or("no resolution").to_string(),
                        None => "still open at the deadline".to_string(),
                    }
                ));
            }
        }
    }
    let drained_seconds = issued.elapsed().as_secs_f64();
    acked_us.sort_unstable();
    Ok(Report {
        acked_us,
        auto_accepted,
        not_ended,
        other,
        issue_seconds,
        drained_seconds,
        ingress_peak_rss_mib: ingress_rss.peak_mib(),
        worker_peak_rss_mib: worker_rss.peak_mib(),
        simulator_peak_rss_mib: measure::own_peak_rss_mib(),
    })
}

impl Report {
    fn in_window(&self) -> usize {
        let window = WINDOW.as_micros() as u64;
        self.acked_us.iter().filter(|us| **us <= window).count()
    }

    fn print(&self, args: &BurstBenchArgs, took: Duration) {
        let ms = |p: f64| measure::percentile_us(&self.acked_us, p) as f64 / 1000.0;
        let in_window = self.in_window();
        let share = in_window as f64 / args.changes as f64;
        let cores = std::thread::available_parallelism().map_or(0, usize::from);
        println!(
            "fulfillment bench burst: {cores} cores, loopback; {} customer seat changes on as many \
             subscriptions, issued at once\n",
            args.changes
        );
        println!(
            "  issued                          in {:.2} s (open loop)",
            self.issue_seconds
        );
        println!(
            "  acknowledged within 10 s        {in_window} of {} ({:.1}%)",
            args.changes,
            share * 100.0
        );
        println!("  auto-accepted by Microsoft      {}", self.auto_accepted);
        println!(
            "  webhook-to-ACK                  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (simulator clock)",
            ms(0.50),
            ms(0.99),
            ms(1.0)
        );
        println!(
            "  every change ended              after {:.1} s",
            self.drained_seconds
        );
        println!(
            "  peak RSS (VmHWM)                ingress {:.1} MiB, worker {:.1} MiB, simulator and \
             driver {:.1} MiB",
            self.ingress_peak_rss_mib, self.worker_peak_rss_mib, self.simulator_peak_rss_mib
        );
        if !self.other.is_empty() {
            let mut kinds = std::collections::BTreeMap::<&str, usize>::new();
            for reason in &self.other {
                *kinds.entry(reason.as_str()).or_default() += 1;
            }
            println!(
                "  neither acknowledged nor auto-accepted: {}",
                self.not_ended
            );
            for (reason, n) in kinds {
                println!("    {n} × {reason}");
            }
        }
        let met = self.auto_accepted == 0 && self.not_ended == 0;
        println!(
            "\ntarget (every change acknowledged within 10 s, none auto-accepted): {}",
            if met { "met" } else { "NOT MET" }
        );
        println!("run took {:.1} s", took.as_secs_f64());
        let json = json!({
            "bench": "burst",
            "changes": args.changes,
            "acked_in_window": in_window,
            "share_in_window": round(share, 4),
            "auto_accepted": self.auto_accepted,
            "not_ended": self.not_ended,
            "ack_p50_ms": round(ms(0.50), 1),
            "ack_p99_ms": round(ms(0.99), 1),
            "ack_max_ms": round(ms(1.0), 1),
            "issue_s": round(self.issue_seconds, 2),
            "drained_s": round(self.drained_seconds, 1),
            "ingress_peak_rss_mib": round(self.ingress_peak_rss_mib, 1),
            "worker_peak_rss_mib": round(self.worker_peak_rss_mib, 1),
            "simulator_peak_rss_mib": round(self.simulator_peak_rss_mib, 1),
            "target": {"auto_accepted": 0, "met": met},
        });
        println!("{json}");
    }
}
