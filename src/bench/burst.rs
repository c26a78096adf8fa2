//! `fulfillment bench burst`: N customer seat changes, each on its own subscription, issued
//! at the simulator at once (open loop: the next is not waiting for our answer to the last),
//! as after a Microsoft incident that flushes its backlog or a CSP partner's bulk change.
//! Every change must be acknowledged within Microsoft's 10-second window, measured on the
//! simulator's clock from the operation's creation (its webhook); one that is not is
//! auto-accepted by Microsoft — decided without the ISV's policy — and the run exits 1.
//!
//! Where an auto-accepted change was lost is told from both sides: how its webhook's first
//! delivery ended and when (the simulator's record: no answer within the attempt's timeout,
//! or the status answered), and what the ingress counted over the burst (its `/metrics`
//! before and after: webhook requests answered, those answered more than 10 s after they
//! were read, connections that waited for a place under `HTTP_MAX_CONNECTIONS`). A webhook
//! that timed out while the ingress answered every request it read in time never reached the
//! handler. A run that misses its target keeps the ingress's and the worker's log files and
//! names them (a JWKS fetch of a second or more is a warning there). JSON keys:
//! `auto_accepted_first_attempts` (by outcome),
//! `ingress_webhook_requests`, `ingress_webhook_requests_over_10s`,
//! `ingress_connections_waited`, `ingress_jwks_fetches`, `ingress_jwks_fetch_s` (the
//! ingress's fetches of the JWKS during the burst: its first webhooks wait for the keys).
//!
//! The world is the pipeline bench's: the simulator in this process, `fulfillment serve` and
//! one `fulfillment work` as children, a throwaway database and RabbitMQ topology.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use time::OffsetDateTime;
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
    /// Where the auto-accepted changes were lost: the first delivery of each one's webhook.
    missed: Vec<Missed>,
    /// When the burst's first operation was created (the simulator's clock).
    began: Option<OffsetDateTime>,
    /// What the ingress counted while the burst ran.
    ingress: IngressSide,
    /// The children's log files, kept when the run missed its target (name, path).
    kept_logs: Vec<(&'static str, std::path::PathBuf)>,
}

/// The first delivery attempt of an auto-accepted change's webhook.
struct Missed {
    /// When its operation was created.
    created: OffsetDateTime,
    /// When the attempt ended (answer or error), and how; `None` when it was never tried.
    first_attempt: Option<(OffsetDateTime, String)>,
}

impl Missed {
    /// How the first delivery ended: the status answered, or the error's last clause (e.g.
    /// "operation timed out").
    fn outcome(&self) -> String {
        match &self.first_attempt {
            Some((_, outcome)) => outcome.rsplit(": ").next().unwrap_or(outcome).to_string(),
            None => "never tried".to_string(),
        }
    }
}

/// The ingress's own counts over the burst (its `/metrics` before and after): whether a
/// webhook that went unanswered reached its handler, or waited before it.
#[derive(Debug, Default)]
struct IngressSide {
    /// Webhook requests answered (any status).
    webhooks: f64,
    /// Of those, answered more than Microsoft's 10 s window after they were read.
    over_window: f64,
    /// Connections that waited for a place under `HTTP_MAX_CONNECTIONS`.
    waited: f64,
    /// Fetches of Entra's JWKS (the simulator's here), and their time in all: the webhooks
    /// that need the keys wait for them.
    jwks_fetches: f64,
    jwks_seconds: f64,
}

impl IngressSide {
    fn between(before: &str, after: &str) -> Self {
        use crate::http::metrics::{HTTP_REQUEST_DURATION_SECONDS, JWKS_FETCH_SECONDS};
        use crate::metrics::FULFILLMENT_HTTP_CONNECTIONS_WAITED_TOTAL;
        let webhook = "route=\"/webhook\"";
        let count =
            |text: &str| measure::histogram_totals(text, HTTP_REQUEST_DURATION_SECONDS, webhook).1;
        let in_window = |text: &str| {
            measure::histogram_at_most(
                text,
                HTTP_REQUEST_DURATION_SECONDS,
                webhook,
                WINDOW.as_secs_f64(),
            )
        };
        let waited = |text: &str| {
            measure::series_total(text, FULFILLMENT_HTTP_CONNECTIONS_WAITED_TOTAL, &[])
        };
        let jwks = |text: &str| measure::histogram_totals(text, JWKS_FETCH_SECONDS, "outcome=");
        let webhooks = count(after) - count(before);
        let ((seconds_before, fetches_before), (seconds_after, fetches_after)) =
            (jwks(before), jwks(after));
        Self {
            webhooks,
            over_window: webhooks - (in_window(after) - in_window(before)),
            waited: waited(after) - waited(before),
            jwks_fetches: fetches_after - fetches_before,
            jwks_seconds: seconds_after - seconds_before,
        }
    }
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

    let ingress_metrics = url::Url::parse(&format!("http://{ingress_addr}/metrics"))?;
    let metrics_before = measure::scrape(&http, ingress_metrics.clone())
        .await
        .context("cannot read the ingress's /metrics")?;
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
    let mut missed = Vec::new();
    let mut began: Option<OffsetDateTime> = None;
    for (subscription, operation) in operations {
        let left = deadline.saturating_sub(issued.elapsed());
        let progress = view
            .wait_for_operation(subscription, operation, left)
            .await
            .with_context(|| format!("operation {operation} vanished"))?;
        began = Some(began.map_or(progress.created, |t| t.min(progress.created)));
        match (progress.finished, progress.resolution.as_deref()) {
            (Some(finished), Some(resolution)) if resolution.starts_with("acknowledged") => {
                let us = (finished - progress.created).whole_microseconds();
                acked_us.push(u64::try_from(us).unwrap_or(0));
            }
            (Some(_), Some(resolution)) if resolution.starts_with("auto-accepted") => {
                auto_accepted += 1;
                missed.push(Missed {
                    created: progress.created,
                    first_attempt: progress
                        .webhook_attempts
                        .first()
                        .map(|attempt| (attempt.ended, attempt.outcome.clone())),
                });
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
    let metrics_after = measure::scrape(&http, ingress_metrics)
        .await
        .context("cannot read the ingress's /metrics")?;
    acked_us.sort_unstable();
    // A missed target wants the ingress's and the worker's own account read.
    let mut kept_logs = Vec::new();
    if auto_accepted > 0 || not_ended > 0 {
        for child in children.iter_mut() {
            child.keep_log = true;
            kept_logs.push((child.name, child.log.clone()));
        }
    }
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
        missed,
        began,
        ingress: IngressSide::between(&metrics_before, &metrics_after),
        kept_logs,
    })
}

impl Report {
    /// The auto-accepted changes by how their webhook's first delivery ended
    /// ([`Missed::outcome`]).
    fn missed_by_outcome(&self) -> std::collections::BTreeMap<String, usize> {
        let mut by = std::collections::BTreeMap::new();
        for missed in &self.missed {
            *by.entry(missed.outcome()).or_default() += 1;
        }
        by
    }

    /// One line per way the auto-accepted changes' first deliveries ended: how many, when
    /// their operations were created into the burst, and how long after that the attempt
    /// ended.
    fn missed_lines(&self) -> Vec<String> {
        let Some(began) = self.began else {
            return Vec::new();
        };
        let seconds = |d: time::Duration| d.as_seconds_f64();
        self.missed_by_outcome()
            .into_iter()
            .map(|(outcome, count)| {
                let of_outcome = self.missed.iter().filter(|m| m.outcome() == outcome);
                let (mut into, mut after) = (Vec::new(), Vec::new());
                for missed in of_outcome {
                    into.push(seconds(missed.created - began));
                    if let Some((ended, _)) = &missed.first_attempt {
                        after.push(seconds(*ended - missed.created));
                    }
                }
                let range = |values: &[f64]| {
                    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    format!("{min:.2}–{max:.2} s")
                };
                let ended = if after.is_empty() {
                    String::new()
                } else {
                    format!(", the attempt ended {} after the change", range(&after))
                };
                format!(
                    "{count} × first webhook delivery: {outcome} (changes created {} into the \
                     burst{ended})",
                    range(&into)
                )
            })
            .collect()
    }

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
        for line in self.missed_lines() {
            println!("    {line}");
        }
        println!(
            "  ingress, during the burst       {:.0} webhook requests answered, {:.0} of them \
             after more than {} s; {:.0} connections waited for a place (HTTP_MAX_CONNECTIONS); \
             {:.0} JWKS fetch(es), {:.2} s in all",
            self.ingress.webhooks,
            self.ingress.over_window,
            WINDOW.as_secs(),
            self.ingress.waited,
            self.ingress.jwks_fetches,
            self.ingress.jwks_seconds
        );
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
        for (name, path) in &self.kept_logs {
            println!(
                "  log kept                        {name}: {}",
                path.display()
            );
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
            "auto_accepted_first_attempts": self.missed_by_outcome(),
            "ingress_webhook_requests": self.ingress.webhooks.round() as u64,
            "ingress_webhook_requests_over_10s": self.ingress.over_window.round() as u64,
            "ingress_connections_waited": self.ingress.waited.round() as u64,
            "ingress_jwks_fetches": self.ingress.jwks_fetches.round() as u64,
            "ingress_jwks_fetch_s": round(self.ingress.jwks_seconds, 3),
            "target": {"auto_accepted": 0, "met": met},
        });
        println!("{json}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_accepted_changes_are_told_by_how_their_first_delivery_ended() {
        let began = OffsetDateTime::now_utc();
        let ms = |n: i64| time::Duration::milliseconds(n);
        let timed_out = "error sending request for url (http://127.0.0.1:1/webhook): \
                         operation timed out";
        let missed = vec![
            Missed {
                created: began + ms(10),
                first_attempt: Some((began + ms(10_020), timed_out.to_string())),
            },
            Missed {
                created: began + ms(90),
                first_attempt: Some((began + ms(10_140), timed_out.to_string())),
            },
            Missed {
                created: began + ms(2_000),
                first_attempt: Some((began + ms(2_500), "503".to_string())),
            },
            Missed {
                created: began + ms(3_000),
                first_attempt: None,
            },
        ];
        let report = Report {
            acked_us: Vec::new(),
            auto_accepted: missed.len(),
            not_ended: 0,
            other: Vec::new(),
            issue_seconds: 1.0,
            drained_seconds: 12.0,
            ingress_peak_rss_mib: 0.0,
            worker_peak_rss_mib: 0.0,
            simulator_peak_rss_mib: 0.0,
            missed,
            began: Some(began),
            ingress: IngressSide::default(),
            kept_logs: Vec::new(),
        };
        let by: Vec<(String, usize)> = report.missed_by_outcome().into_iter().collect();
        assert_eq!(
            by,
            [
                ("503".to_string(), 1),
                ("never tried".to_string(), 1),
                ("operation timed out".to_string(), 2)
            ]
        );
        assert_eq!(
            report.missed_lines(),
            [
                "1 × first webhook delivery: 503 (changes created 2.00–2.00 s into the burst, \
                 the attempt ended 0.50–0.50 s after the change)",
                "1 × first webhook delivery: never tried (changes created 3.00–3.00 s into the \
                 burst)",
                "2 × first webhook delivery: operation timed out (changes created 0.01–0.09 s \
                 into the burst, the attempt ended 10.01–10.05 s after the change)",
            ]
        );
    }

    #[test]
    fn the_ingress_side_is_the_difference_of_two_scrapes() {
        let exposition = |answered: u32, in_window: u32, waited: u32, jwks_s: f64, jwks: u32| {
            format!(
                "http_request_duration_seconds_bucket{{route=\"/webhook\",status=\"200\",le=\"10\"}} \
                 {in_window}\n\
                 http_request_duration_seconds_bucket{{route=\"/webhook\",status=\"200\",le=\"+Inf\"}} \
                 {answered}\n\
                 http_request_duration_seconds_sum{{route=\"/webhook\",status=\"200\"}} 1.5\n\
                 http_request_duration_seconds_count{{route=\"/webhook\",status=\"200\"}} \
                 {answered}\n\
                 fulfillment_http_connections_waited_total {waited}\n\
                 jwks_fetch_seconds_sum{{outcome=\"ok\"}} {jwks_s}\n\
                 jwks_fetch_seconds_count{{outcome=\"ok\"}} {jwks}\n"
            )
        };
        let side = IngressSide::between(
            &exposition(200, 200, 0, 0.5, 1),
            &exposition(5200, 5175, 300, 3.0, 2),
        );
        assert_eq!(side.webhooks, 5000.0);
        assert_eq!(side.over_window, 25.0);
        assert_eq!(side.waited, 300.0);
        assert_eq!((side.jwks_fetches, side.jwks_seconds), (1.0, 2.5));
    }
}
