//! `fulfillment bench metering`: N usage events over M subscriptions and K dimensions
//! through `POST /api/v1/usage`, while the simulated Metering API answers 5xx and 429,
//! records batches and loses their answers, and has a short outage (a 30-minute outage
//! compressed into seconds). Everything runs in this process on loopback: the simulator,
//! the ingress and a worker, on a throwaway database and RabbitMQ topology.
//!
//! Checks, once every hour is settled: each hour's total at Microsoft equals what the API
//! accepted for it (nothing lost inside the window, nothing billed twice: the simulator
//! keeps one event per hour and counts every repeat it refused). Exit code 1 when a check
//! fails. The last line is one JSON object: `usage_events`, `hours`, `billed_hours`,
//! `double_billed`, `lost`, `expired`.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::harness::{BenchEnv, free_local_address};
use crate::marketplace::{MarketplaceClient, RetryPolicy, TokenProvider};
use crate::metering::{MeteringConfig, hour_of};
use crate::settings::Settings;
use crate::simulator::PlanSpec;
use crate::worker::{EffectsConfig, ProtocolConfig, Worker, WorkerConfig, WorkerParts};

const API_KEY: &str = "bench-metering-key";
const OFFER: &str = "contoso-analytics";
const PLAN: &str = "metered";

#[derive(Debug, clap::Args)]
pub struct MeteringBenchArgs {
    /// Usage events reported (each hour gets several).
    #[arg(long, default_value_t = 2000)]
    pub events: usize,
    /// Subscriptions the usage is spread over.
    #[arg(long, default_value_t = 10)]
    pub subscriptions: usize,
    /// Metering dimensions of the plan (1–30).
    #[arg(long, default_value_t = 3)]
    pub dimensions: usize,
    /// Past clock hours the usage falls in (1–22).
    #[arg(long, default_value_t = 12)]
    pub hours: usize,
    /// The compressed outage of the Metering API, in seconds.
    #[arg(long, default_value_t = 3)]
    pub outage_seconds: u64,
    /// Deadline for everything to settle.
    #[arg(long, default_value_t = 180)]
    pub max_seconds: u64,
}

pub async fn run(settings: Settings, args: MeteringBenchArgs) -> anyhow::Result<ExitCode> {
    if args.events == 0 || args.subscriptions == 0 || args.events > 200_000 {
        bail!("--events must be 1 to 200000 and --subscriptions at least 1");
    }
    if !(1..=30).contains(&args.dimensions) || !(1..=22).contains(&args.hours) {
        bail!("--dimensions must be 1 to 30 and --hours 1 to 22");
    }
    let started = Instant::now();
    let ingress_addr = free_local_address()?;
    let webhook_url = url::Url::parse(&format!("http://{ingress_addr}/webhook"))?;
    let dimensions: Vec<String> = (1..=args.dimensions).map(|d| format!("dim-{d}")).collect();
    let dims: Vec<&str> = dimensions.iter().map(String::as_str).collect();
    let plan = PlanSpec::flat(OFFER, PLAN, 10.0).with_dimensions(&dims);
    let env = BenchEnv::setup_with_simulator(&settings, Some(webhook_url), |config| {
        config.plans.push(plan);
        config.landing_page_url = format!("http://{ingress_addr}/landing").parse().ok();
    })
    .await?;
    let outcome = measure(&env, &args, ingress_addr, &dimensions).await;
    let torn_down = env.teardown().await;
    let report = outcome?;
    torn_down?;
    report.print(started.elapsed());
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Debug, Default)]
struct Report {
    usage_events: usize,
    repeats_sent: usize,
    /// Events the API stored as late (their hour was already submitted): not billed.
    late_events: usize,
    late_sent: usize,
    hours: usize,
    billed_hours: usize,
    double_billed: usize,
    lost: usize,
    expired: usize,
    unsettled: usize,
    resent_hours: usize,
    duplicates_refused: u64,
    ingest_seconds: f64,
    settle_seconds: f64,
    ingest_retries: usize,
    problems: Vec<String>,
}

impl Report {
    fn passed(&self) -> bool {
        self.double_billed == 0 && self.lost == 0 && self.unsettled == 0
    }

    fn print(&self, elapsed: Duration) {
        println!(
            "usage events: {} counted by the API in {:.1} s, {} late (hour already submitted: \
             reported, not billed), {} repeats of an idempotency key counted once, {} requests \
             retried after a 5xx",
            self.usage_events,
            self.ingest_seconds,
            self.late_events,
            self.repeats_sent,
            self.ingest_retries
        );
        println!(
            "hours: {} — billed {} (settled {:.1} s after the last usage), expired {}, \
             unsettled {}",
            self.hours, self.billed_hours, self.settle_seconds, self.expired, self.unsettled
        );
        println!(
            "faults: hours sent more than once {}, repeats Microsoft refused as Duplicate {}",
            self.resent_hours, self.duplicates_refused
        );
        println!(
            "checks: double billed {}, lost {} → {} (whole run {:.1} s)",
            self.double_billed,
            self.lost,
            if self.passed() { "PASS" } else { "FAIL" },
            elapsed.as_secs_f64()
        );
        for problem in self.problems.iter().take(10) {
            println!("  {problem}");
        }
        println!(
            "{}",
            json!({
                "usage_events": self.usage_events,
                "hours": self.hours,
                "billed_hours": self.billed_hours,
                "double_billed": self.double_billed,
                "lost": self.lost,
                "expired": self.expired,
            })
        );
    }
}

async fn measure(
    env: &BenchEnv,
    args: &MeteringBenchArgs,
    ingress_addr: std::net::SocketAddr,
    dimensions: &[String],
) -> anyhow::Result<Report> {
    let mut vars: HashMap<String, String> =
        env.serve_env(ingress_addr, false).into_iter().collect();
    vars.insert("ENTITLEMENT_API_KEY".into(), API_KEY.into());
    vars.insert("ACTIVATION_MODE".into(), "automatic".into());
    let mut settings = Settings::from_sources(None, &vars).context("bench settings")?;
    settings.database.max_connections = 10;
    let application = crate::http::Application::build(settings.clone()).await?;
    let shutdown = CancellationToken::new();
    let server = tokio::spawn(application.run_until_stopped(shutdown.clone()));
    let worker = start_worker(&settings).await?;
    let result = drive(env, args, ingress_addr, dimensions, &settings).await;
    let stopped = worker.stop().await;
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), server).await;
    stopped?;
    result
}

async fn start_worker(settings: &Settings) -> anyhow::Result<Worker> {
    let pool = crate::store::connect(&settings.database).await?;
    let broker = crate::queue::Broker::connect(&settings.amqp, "bench-metering").await?;
    let tokens = TokenProvider::new(&settings.marketplace)?;
    let client = MarketplaceClient::new(&settings.marketplace, tokens)?
        .with_retry_policy(RetryPolicy::hand_back());
    let parts = WorkerParts {
        pool,
        broker,
        client,
        policy: settings.policy.clone(),
        api_url: settings.marketplace.api_url.clone(),
    };
    let config = WorkerConfig {
        effects: EffectsConfig {
            concurrency: 4,
            poll_interval: Duration::from_millis(100),
            protocol: ProtocolConfig {
                backoff_base: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
                ..ProtocolConfig::fast()
            },
        },
        // The bench closes the hours itself, when each wave of usage is in.
        metering: MeteringConfig {
            tick: Duration::from_secs(86_400),
            ..MeteringConfig::default()
        },
        ..WorkerConfig::default()
    };
    Worker::spawn(parts, config, CancellationToken::new()).await
}

async fn drive(
    env: &BenchEnv,
    args: &MeteringBenchArgs,
    ingress_addr: std::net::SocketAddr,
    dimensions: &[String],
    settings: &Settings,
) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()?;
    let admin = |method: reqwest::Method, path: &str, body: Value| {
        let request = http
            .request(method, env.sim.base_url().join(path).expect("a path"))
            .json(&body);
        async move {
            let response = request.send().await?;
            let status = response.status();
            let value: Value = response.json().await.unwrap_or(Value::Null);
            anyhow::ensure!(status.is_success(), "simulator {status}: {value}");
            anyhow::Ok(value)
        }
    };
    let pool = crate::store::connect(&settings.database).await?;

    eprintln!(
        "bench: {} subscriptions through checkout and the landing page…",
        args.subscriptions
    );
    let mut subscriptions = Vec::new();
    for _ in 0..args.subscriptions {
        let created = admin(
            reqwest::Method::POST,
            "simulator/purchases",
            json!({"offerId": OFFER, "planId": PLAN}),
        )
        .await?;
        let id: Uuid = created["subscriptionId"]
            .as_str()
            .unwrap_or_default()
            .parse()?;
        let landing = created["landingUrl"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let response = http.get(&landing).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "landing page: {}",
            response.status()
        );
        subscriptions.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let subscribed = crate::store::verify::count_all_in_state(&pool, "Subscribed").await?;
        if subscribed as usize >= subscriptions.len() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "subscriptions not Subscribed within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The usage: event i goes to subscription i mod M, a dimension and a past hour.
    let now = OffsetDateTime::now_utc();
    let this_hour = hour_of(now);
    let mut events = Vec::with_capacity(args.events);
    for i in 0..args.events {
        let subscription = subscriptions[i % subscriptions.len()];
        let dimension = &dimensions[(i / subscriptions.len()) % dimensions.len()];
        // Every (subscription, dimension) pair in turn, then the next hour.
        let pairs = subscriptions.len() * dimensions.len();
        let hour = this_hour - time::Duration::hours(1 + ((i / pairs) % args.hours) as i64);
        let at = hour + time::Duration::seconds(((i * 131) % 3600) as i64);
        let quantity = 1.0 + (i % 5) as f64 * 0.25;
        events.push(json!({
            "subscriptionId": subscription, "dimension": dimension, "quantity": quantity,
            "effectiveAt": at.format(&Rfc3339)?, "idempotencyKey": format!("bench-{i}"),
        }));
    }
    // Microsoft misbehaves from now on: 5xx, 429 and lost answers.
    let faults = json!({"seed": 22, "share5xx": 0.1, "share429": 0.1, "retryAfterSecs": 1,
                        "loseResponses": {"batchUsageEvent": 5}});
    admin(reqwest::Method::PUT, "simulator/faults", faults.clone()).await?;

    // Two waves: the older half of the hours first, closed (frozen and queued) as soon as
    // it is in; then the younger half while the first is being submitted — with a few late
    // events for hours of the first wave, which must be reported, not billed.
    let split = this_hour - time::Duration::hours((args.hours / 2) as i64);
    let (older, younger): (Vec<&Value>, Vec<&Value>) = events.iter().partition(|e| {
        e["effectiveAt"]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .is_some_and(|t| t < split)
    });
    let late: Vec<Value> = older
        .iter()
        .take(5)
        .enumerate()
        .map(|(n, e)| {
            let mut late = (*e).clone();
            late["idempotencyKey"] = json!(format!("bench-late-{n}"));
            late
        })
        .collect();
    let quantities: HashMap<String, f64> = events
        .iter()
        .chain(late.iter())
        .map(|e| {
            (
                e["idempotencyKey"].as_str().unwrap_or_default().to_owned(),
                e["quantity"].as_f64().unwrap_or_default(),
            )
        })
        .collect();
    let url = format!("http://{ingress_addr}/api/v1/usage");
    let ingest_started = Instant::now();
    let mut report = Report::default();
    let metering = MeteringConfig {
        grace: Duration::ZERO,
        ..MeteringConfig::default()
    };
    eprintln!(
        "bench: {} usage events through POST /api/v1/usage (first wave)…",
        older.len()
    );
    let mut counted: HashMap<(Uuid, String, OffsetDateTime), f64> = HashMap::new();
    send_usage(&http, &url, &older, &quantities, &mut report, &mut counted).await?;
    crate::metering::submit::close_due_hours(&pool, &metering, split + time::Duration::hours(1))
        .await?;
    eprintln!(
        "bench: first wave closed; Metering API outage for {} s while the second wave comes in…",
        args.outage_seconds
    );
    let mut outage = faults.clone();
    outage["failCalls"] = json!({"batchUsageEvent": 503});
    admin(reqwest::Method::PUT, "simulator/faults", outage).await?;
    let outage_until = Instant::now() + Duration::from_secs(args.outage_seconds);
    let mut second: Vec<&Value> = younger;
    second.extend(late.iter());
    send_usage(&http, &url, &second, &quantities, &mut report, &mut counted).await?;
    tokio::time::sleep(outage_until.saturating_duration_since(Instant::now())).await;
    admin(reqwest::Method::PUT, "simulator/faults", faults.clone()).await?;
    report.ingest_seconds = ingest_started.elapsed().as_secs_f64();
    crate::metering::submit::close_due_hours(&pool, &metering, OffsetDateTime::now_utc()).await?;
    let expected = counted;

    eprintln!("bench: waiting for every hour to settle…");
    let settle_started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    loop {
        let pending = crate::store::verify::unsettled_usage_hours(&pool).await?;
        report.unsettled = pending as usize;
        if pending == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.settle_seconds = settle_started.elapsed().as_secs_f64();
    admin(reqwest::Method::PUT, "simulator/faults", json!({})).await?;

    // Ours.
    let rows = crate::store::verify::usage_hours(&pool).await?;
    pool.close().await;
    report.hours = rows.len();
    let mut ours: HashMap<(Uuid, String, OffsetDateTime), (f64, String)> = HashMap::new();
    for (subscription, dimension, hour, quantity, status, sends) in rows {
        match status.as_str() {
            "accepted" | "duplicate" => report.billed_hours += 1,
            "expired" => report.expired += 1,
            _ => {}
        }
        if sends > 1 {
            report.resent_hours += 1;
        }
        ours.insert((subscription, dimension, hour), (quantity, status));
    }
    // Microsoft's.
    let billed = admin(reqwest::Method::GET, "simulator/usage", Value::Null).await?;
    let mut theirs: HashMap<(Uuid, String, OffsetDateTime), f64> = HashMap::new();
    for usage in billed.as_array().map(Vec::as_slice).unwrap_or_default() {
        let at = usage["effectiveStartTime"]
            .as_str()
            .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
            .context("simulator usage without effectiveStartTime")?;
        let key = (
            usage["resourceId"].as_str().unwrap_or_default().parse()?,
            usage["dimension"].as_str().unwrap_or_default().to_owned(),
            hour_of(at),
        );
        report.duplicates_refused += usage["duplicatesRefused"].as_u64().unwrap_or(0);
        *theirs.entry(key).or_default() += usage["quantity"].as_f64().unwrap_or(0.0);
    }
    for (key, quantity) in &expected {
        let at_microsoft = theirs.get(key).copied().unwrap_or(0.0);
        let status = ours.get(key).map(|(_, s)| s.as_str()).unwrap_or("missing");
        if at_microsoft > quantity + 1e-9 {
            report.double_billed += 1;
            report.problems.push(format!(
                "{key:?}: billed {at_microsoft}, accepted {quantity}"
            ));
        } else if (quantity - at_microsoft).abs() > 1e-9 && status != "expired" {
            report.lost += 1;
            report.problems.push(format!(
                "{key:?}: billed {at_microsoft}, accepted {quantity} (ours: {status})"
            ));
        }
    }
    for key in theirs.keys() {
        if !expected.contains_key(key) {
            report.double_billed += 1;
            report
                .problems
                .push(format!("{key:?}: billed but never reported"));
        }
    }
    if report.usage_events + report.late_events != args.events + report.late_sent {
        report.problems.push(format!(
            "the API stored {} of {} events",
            report.usage_events + report.late_events,
            args.events + report.late_sent
        ));
        report.lost += (args.events + report.late_sent)
            .saturating_sub(report.usage_events + report.late_events);
    }
    Ok(report)
}

/// Sends `events` in requests of 100 (every tenth request repeating an event of the one
/// before it), retrying a request the API answered 5xx (nothing was stored: the same keys
/// are safe to send again). Adds what the API counted into its hour to `counted`.
async fn send_usage(
    http: &reqwest::Client,
    url: &str,
    events: &[&Value],
    quantities: &HashMap<String, f64>,
    report: &mut Report,
    counted: &mut HashMap<(Uuid, String, OffsetDateTime), f64>,
) -> anyhow::Result<()> {
    for (n, chunk) in events.chunks(100).enumerate() {
        let mut body: Vec<Value> = chunk.iter().map(|e| (*e).clone()).collect();
        if n % 10 == 9 {
            body.push(events[(n - 1) * 100].clone());
            report.repeats_sent += 1;
        }
        let mut tries = 0;
        let answer = loop {
            tries += 1;
            let response = http
                .post(url)
                .bearer_auth(API_KEY)
                .json(&body)
                .send()
                .await?;
            let status = response.status();
            let answer: Value = response.json().await.unwrap_or(Value::Null);
            if status.is_success() {
                break answer;
            }
            anyhow::ensure!(
                status.is_server_error() && tries < 20,
                "usage refused: {status} {answer}"
            );
            report.ingest_retries += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for item in answer["events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let key = item["idempotencyKey"].as_str().unwrap_or_default();
            match item["status"].as_str() {
                Some("counted") => {
                    report.usage_events += 1;
                    let hour = item["hour"]
                        .as_str()
                        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
                        .context("an answer without its hour")?;
                    *counted
                        .entry((
                            item["subscriptionId"]
                                .as_str()
                                .unwrap_or_default()
                                .parse()?,
                            item["dimension"].as_str().unwrap_or_default().to_owned(),
                            hour,
                        ))
                        .or_default() += quantities.get(key).copied().unwrap_or_default();
                }
                Some("late") => report.late_events += 1,
                _ => {}
            }
            if key.starts_with("bench-late-") {
                report.late_sent += 1;
            }
        }
    }
    Ok(())
}
