//! `fulfillment bench ingress`: signed Marketplace webhooks through `fulfillment serve`, run
//! as a child process so its memory is its own, against two ceilings measured in the same
//! run at the same concurrency: RabbitMQ's confirmed publishes of the same messages through
//! the queue module's publisher (what every accepted webhook must wait for), and a bare
//! axum `POST` endpoint (what HTTP alone costs on this machine).
//!
//! Everything is local and throwaway: the marketplace simulator in process (it serves the
//! JWKS and mints the webhook tokens), a fresh database on `DATABASE_URL`'s server and a
//! `<prefix>-bench-<id>` RabbitMQ topology, all removed at the end. Every phase is bounded
//! by a request count and a deadline.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::routing::{get, post};
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use super::harness::{BenchEnv, ChildProcess, RssSampler, free_local_address};
use super::measure::{self, CpuMark, CpuUse, PhaseStats, round};
use crate::http::webhook::new_traceparent;
use crate::queue::{InboundMessage, MessageMeta, Publisher};
use crate::settings::Settings;

/// The target: at this concurrency, the ingress reaches this share of the
/// confirmed-publish ceiling with a p99 below this many milliseconds.
pub const TARGET_CONCURRENCY: usize = 64;
pub const TARGET_MIN_RATIO: f64 = 0.70;
pub const TARGET_MAX_P99_MS: f64 = 20.0;

/// How many distinct subscriptions the webhooks are spread over.
const SUBSCRIPTIONS: usize = 1024;

#[derive(Debug, Clone, clap::Args)]
pub struct IngressBenchArgs {
    /// Measured requests (and confirmed publishes) per concurrency level.
    #[arg(long, default_value_t = 20_000)]
    pub requests: usize,
    /// Concurrency levels: concurrent connections (and messages in flight).
    #[arg(long, value_delimiter = ',', default_values_t = [64, 256])]
    pub concurrency: Vec<usize>,
    /// Unmeasured requests before each measured phase (connections, JWKS, JIT-free warm caches);
    /// default: a tenth of --requests, at most 1000.
    #[arg(long)]
    pub warmup: Option<usize>,
    /// Deadline of each phase in seconds; a phase that hits it reports what finished.
    #[arg(long, default_value_t = 120)]
    pub max_seconds: u64,
    /// Webhook tokens minted up front and reused round-robin.
    #[arg(long, default_value_t = 8)]
    pub tokens: usize,
    /// Skip the bare axum endpoint ceiling.
    #[arg(long)]
    pub no_bare_http: bool,
    /// Profiling aid: run the ingress with `WEBHOOK_AUTH=none` (no JWT verification) to see
    /// what verification costs. The target is then not evaluated.
    #[arg(long)]
    pub profile_without_jwt: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BareHttpArgs {
    /// Address to listen on.
    #[arg(long)]
    pub listen: SocketAddr,
}

/// `bench bare-http`: answers `POST /webhook` with a small JSON 200 after reading the body,
/// and `GET /readyz` with 200, until SIGTERM.
pub async fn serve_bare_http(args: BareHttpArgs) -> anyhow::Result<ExitCode> {
    let router = Router::new()
        .route(
            "/webhook",
            post(|body: Bytes| async move {
                Json(json!({ "status": "accepted", "bytes": body.len() }))
            }),
        )
        .route("/readyz", get(|| async { "ok" }));
    let listener = crate::http::listener::listen(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    axum::serve(listener, router)
        .with_graceful_shutdown(crate::http::shutdown_signal())
        .await?;
    Ok(ExitCode::SUCCESS)
}

/// `bench ingress`.
pub async fn run(settings: Settings, args: IngressBenchArgs) -> anyhow::Result<ExitCode> {
    if args.requests == 0 {
        bail!("--requests must be at least 1");
    }
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency needs one or more levels, each at least 1");
    }
    if args.tokens == 0 {
        bail!("--tokens must be at least 1");
    }
    let started = Instant::now();
    let env = BenchEnv::setup(&settings).await?;
    let mut children = Children::default();
    let outcome = measure_all(&env, &args, &mut children).await;
    let stopped = children.stop_all().await;
    let torn_down = env.teardown().await;
    let report = outcome?;
    stopped?;
    torn_down?;
    report.print(&args, started.elapsed());
    Ok(ExitCode::SUCCESS)
}

#[derive(Default)]
struct Children {
    ingress: Option<ChildProcess>,
    bare: Option<ChildProcess>,
}

impl Children {
    async fn stop_all(&mut self) -> anyhow::Result<()> {
        let mut result = Ok(());
        for child in [self.ingress.take(), self.bare.take()]
            .into_iter()
            .flatten()
        {
            if let Err(e) = child.stop().await {
                result = Err(e);
            }
        }
        result
    }
}

/// The deterministic ids of webhook `i`: a unique operation and activity, and one of
/// [`SUBSCRIPTIONS`] subscriptions.
struct Ids {
    run: u128,
    subscriptions: Vec<Uuid>,
}

impl Ids {
    fn new() -> Self {
        Self {
            run: Uuid::new_v4().as_u128(),
            subscriptions: (0..SUBSCRIPTIONS).map(|_| Uuid::new_v4()).collect(),
        }
    }

    /// (operation id, activity id, subscription id) of request `i` of phase `phase`.
    fn of(&self, phase: u32, i: usize) -> (Uuid, Uuid, Uuid) {
        let unique = self.run ^ ((u128::from(phase) << 64) | i as u128);
        let operation = uuid::Builder::from_random_bytes(unique.to_be_bytes()).into_uuid();
        let activity =
            uuid::Builder::from_random_bytes((!unique).rotate_left(17).to_be_bytes()).into_uuid();
        (
            operation,
            activity,
            self.subscriptions[i % self.subscriptions.len()],
        )
    }
}

const ACTIONS: &[&str] = &[
    "Renew",
    "ChangePlan",
    "ChangeQuantity",
    "Suspend",
    "Reinstate",
    "Unsubscribe",
];

/// A docs/marketplace.md §6.2 webhook body: the operation envelope and the subscription
/// snapshot, as the simulator (and Microsoft) send it.
fn webhook_payload(i: usize, operation: Uuid, activity: Uuid, subscription: Uuid) -> String {
    let action = ACTIONS[i % ACTIONS.len()];
    let quantity = 5 + (i % 20);
    json!({
        "id": operation,
        "activityId": activity,
        "publisherId": "contoso",
        "offerId": "contoso-analytics",
        "planId": "per-seat",
        "quantity": quantity,
        "subscriptionId": subscription,
        "timeStamp": "2026-03-01T09:30:12.0000000Z",
        "action": action,
        "status": "Succeeded",
        "operationRequestSource": "Azure",
        "subscription": {
            "id": subscription,
            "name": "Contoso analytics for Fabrikam",
            "publisherId": "contoso",
            "offerId": "contoso-analytics",
            "planId": "per-seat",
            "quantity": quantity,
            "beneficiary": {
                "emailId": "admin@fabrikam.example",
                "objectId": "2ca6e5a4-7d2a-4b8f-9c1e-5f0a3b6d8e21",
                "tenantId": "9b3c4d5e-6f70-4a81-92b3-c4d5e6f7a8b9",
                "puid": "10032001A2B3C4D5",
            },
            "purchaser": {
                "emailId": "buyer@fabrikam.example",
                "objectId": "4e5f6a7b-8c9d-4e0f-a1b2-c3d4e5f6a7b8",
                "tenantId": "9b3c4d5e-6f70-4a81-92b3-c4d5e6f7a8b9",
                "puid": "10032001F6E5D4C3",
            },
            "allowedCustomerOperations": ["Delete", "Update", "Read"],
            "sessionMode": "None",
            "isFreeTrial": false,
            "isTest": false,
            "sandboxType": "None",
            "saasSubscriptionStatus": "Subscribed",
            "term": {
                "startDate": "2026-02-01T00:00:00Z",
                "endDate": "2026-02-28T00:00:00Z",
                "termUnit": "P1M",
            },
            "autoRenew": true,
            "created": "2026-02-01T08:12:44.0000000Z",
            "lastModified": "0001-01-01T00:00:00",
        },
        "purchaseToken": null,
    })
    .to_string()
}

/// Counts failures by kind (HTTP status or error), so a failed run says why.
#[derive(Default, Clone)]
struct Failures(Arc<Mutex<BTreeMap<String, usize>>>);

impl Failures {
    fn add(&self, kind: String) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(kind).or_default() += 1;
        }
    }

    fn take(&self) -> BTreeMap<String, usize> {
        self.0
            .lock()
            .map(|mut map| std::mem::take(&mut *map))
            .unwrap_or_default()
    }
}

/// Sends webhook `i` (of `phase`) to `url`; `true` on a 200.
fn http_load(
    client: reqwest::Client,
    url: Url,
    tokens: Arc<Vec<HeaderValue>>,
    ids: Arc<Ids>,
    phase: u32,
    failures: Failures,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync + 'static
{
    move |i| {
        let (operation, activity, subscription) = ids.of(phase, i);
        let body = webhook_payload(i, operation, activity, subscription);
        let request = client
            .post(url.clone())
            .header(AUTHORIZATION, tokens[i % tokens.len()].clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let failures = failures.clone();
        Box::pin(async move {
            match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let read = response.bytes().await;
                    if status == reqwest::StatusCode::OK && read.is_ok() {
                        true
                    } else {
                        failures.add(format!("HTTP {}", status.as_u16()));
                        false
                    }
                }
                Err(e) => {
                    failures.add(format!("transport: {e}"));
                    false
                }
            }
        })
    }
}

/// Publishes webhook `i` (of `phase`) as the ingress would; `true` on a confirm.
fn publish_load(
    publisher: Publisher,
    ids: Arc<Ids>,
    phase: u32,
    failures: Failures,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync + 'static
{
    move |i| {
        let (operation, activity, subscription) = ids.of(phase, i);
        let publisher = publisher.clone();
        let failures = failures.clone();
        Box::pin(async move {
            let meta = MessageMeta {
                message_id: operation.to_string(),
                correlation_id: activity.to_string(),
                traceparent: Some(new_traceparent()),
                subscription_id: Some(subscription),
            };
            let message = InboundMessage::Webhook {
                received_at: OffsetDateTime::now_utc(),
                payload: webhook_payload(i, operation, activity, subscription),
            };
            match publisher.publish_inbound(&message, &meta).await {
                Ok(()) => true,
                Err(e) => {
                    failures.add(e.to_string());
                    false
                }
            }
        })
    }
}

fn http_client(concurrency: usize) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(concurrency)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build the load generator's HTTP client")
}

/// One measured phase with its failures by kind and its CPU use.
struct Phase {
    stats: PhaseStats,
    failures: BTreeMap<String, usize>,
    cpu: CpuUse,
}

impl Phase {
    fn json(&self) -> Value {
        json!({
            "completed": self.stats.completed,
            "per_s": round(self.stats.ok_per_second(), 1),
            "p50_ms": round(self.stats.percentile_ms(0.50), 3),
            "p90_ms": round(self.stats.percentile_ms(0.90), 3),
            "p99_ms": round(self.stats.percentile_ms(0.99), 3),
            "max_ms": round(self.stats.max_ms(), 3),
            "errors": self.stats.errors,
            "truncated": self.stats.truncated,
        })
    }
}

/// What the ingress's own `/metrics` say about one phase (deltas).
#[derive(Default, Clone, Copy)]
struct ServerSide {
    /// Mean time inside the router (middleware + handler) per webhook, ms.
    handler_mean_ms: f64,
    /// Mean time the handler waited for `publisher()` + publish + confirm, ms.
    publish_mean_ms: f64,
    webhooks: f64,
}

struct Level {
    concurrency: usize,
    ingress: Phase,
    publish: Phase,
    bare: Option<Phase>,
    server: ServerSide,
    rss_max_mib: f64,
}

impl Level {
    fn ratio(&self) -> f64 {
        let ceiling = self.publish.stats.ok_per_second();
        if ceiling > 0.0 {
            self.ingress.stats.ok_per_second() / ceiling
        } else {
            0.0
        }
    }
}

struct Report {
    levels: Vec<Level>,
    peak_rss_mib: f64,
    sampled_rss_mib: f64,
    idle_rss_mib: f64,
    payload_bytes: usize,
    warmup: usize,
}

fn server_side(before: &str, after: &str) -> ServerSide {
    use crate::http::metrics::{HTTP_REQUEST_DURATION_SECONDS, PUBLISH_CONFIRM_SECONDS};
    let delta = |metric: &str, label: &str| {
        let (s0, c0) = measure::histogram_totals(before, metric, label);
        let (s1, c1) = measure::histogram_totals(after, metric, label);
        (s1 - s0, c1 - c0)
    };
    let (handler_sum, handler_count) = delta(HTTP_REQUEST_DURATION_SECONDS, "route=\"/webhook\"");
    let (publish_sum, publish_count) = delta(PUBLISH_CONFIRM_SECONDS, "outcome=");
    let mean_ms = |sum: f64, count: f64| if count > 0.0 { sum / count * 1e3 } else { 0.0 };
    ServerSide {
        handler_mean_ms: mean_ms(handler_sum, handler_count),
        publish_mean_ms: mean_ms(publish_sum, publish_count),
        webhooks: handler_count,
    }
}

async fn measure_all(
    env: &BenchEnv,
    args: &IngressBenchArgs,
    children: &mut Children,
) -> anyhow::Result<Report> {
    let probe = http_client(4)?;
    let ingress_address = free_local_address()?;
    children.ingress = Some(
        ChildProcess::spawn(
            "serve",
            &env.id,
            &["serve"],
            env.serve_env(ingress_address, args.profile_without_jwt),
            ingress_address,
        )
        .await?,
    );
    let ingress = children.ingress.as_mut().expect("just set");
    ingress.wait_ready(&probe).await?;
    let ingress_pid = ingress.pid;
    let ingress_webhook = ingress.url("/webhook");
    let ingress_metrics = ingress.url("/metrics");
    let idle_rss_mib = measure::proc_status_kib(ingress_pid, "VmRSS").unwrap_or(0) as f64 / 1024.0;

    let (bare_webhook, bare_pid) = if args.no_bare_http {
        (None, None)
    } else {
        let address = free_local_address()?;
        let listen = address.to_string();
        let mut bare = ChildProcess::spawn(
            "bare-http",
            &env.id,
            &["bench", "bare-http", "--listen", &listen],
            vec![("RUST_LOG".into(), "warn".into())],
            address,
        )
        .await?;
        bare.wait_ready(&probe).await?;
        let url = bare.url("/webhook");
        let pid = bare.pid;
        children.bare = Some(bare);
        (Some(url), Some(pid))
    };

    let tokens: Vec<HeaderValue> = (0..args.tokens)
        .map(|_| {
            let token = env.sim.mint_webhook_token(json!({}))?;
            Ok(HeaderValue::from_str(&format!("Bearer {token}"))?)
        })
        .collect::<anyhow::Result<_>>()?;
    let tokens = Arc::new(tokens);
    let ids = Arc::new(Ids::new());
    let (o, a, s) = ids.of(0, 0);
    let payload_bytes = webhook_payload(0, o, a, s).len();
    let warmup = args
        .warmup
        .unwrap_or_else(|| (args.requests / 10).min(1000));
    let deadline = Duration::from_secs(args.max_seconds);
    let publisher = env
        .broker
        .publisher()
        .await
        .context("cannot open the benchmark's publisher")?;
    let rss = RssSampler::start(ingress_pid);

    let mut levels = Vec::new();
    let mut phase_no = 0u32;
    let mut next_phase = || {
        phase_no += 1;
        phase_no
    };
    for &concurrency in &args.concurrency {
        eprintln!("bench: concurrency {concurrency}: confirmed publishes…");
        // Ceiling 1: confirmed publishes of the same messages, same number in flight.
        let failures = Failures::default();
        if warmup > 0 {
            let load = publish_load(
                publisher.clone(),
                ids.clone(),
                next_phase(),
                failures.clone(),
            );
            measure::drive(concurrency, warmup, deadline, load).await;
            failures.take();
        }
        env.purge().await?;
        let load = publish_load(
            publisher.clone(),
            ids.clone(),
            next_phase(),
            failures.clone(),
        );
        let mark = CpuMark::now(None);
        let stats = measure::drive(concurrency, args.requests, deadline, load).await;
        let publish = Phase {
            stats,
            failures: failures.take(),
            cpu: mark.since(None),
        };
        env.purge().await?;

        // The ingress, over HTTP with signed tokens.
        eprintln!("bench: concurrency {concurrency}: ingress…");
        let client = http_client(concurrency)?;
        if warmup > 0 {
            let load = http_load(
                client.clone(),
                ingress_webhook.clone(),
                tokens.clone(),
                ids.clone(),
                next_phase(),
                failures.clone(),
            );
            measure::drive(concurrency, warmup, deadline, load).await;
            failures.take();
        }
        env.purge().await?;
        let before = measure::scrape(&probe, ingress_metrics.clone())
            .await
            .unwrap_or_default();
        let load = http_load(
            client.clone(),
            ingress_webhook.clone(),
            tokens.clone(),
            ids.clone(),
            next_phase(),
            failures.clone(),
        );
        let rss_before = rss.max_kib.swap(0, Ordering::Relaxed);
        let mark = CpuMark::now(Some(ingress_pid));
        let stats = measure::drive(concurrency, args.requests, deadline, load).await;
        let cpu = mark.since(Some(ingress_pid));
        let rss_max_mib = rss.max_mib();
        rss.max_kib.fetch_max(rss_before, Ordering::Relaxed);
        let after = measure::scrape(&probe, ingress_metrics.clone())
            .await
            .unwrap_or_default();
        let ingress = Phase {
            stats,
            failures: failures.take(),
            cpu,
        };
        drop(client);
        env.purge().await?;

        // Ceiling 2: HTTP alone.
        let bare = match &bare_webhook {
            None => None,
            Some(url) => {
                eprintln!("bench: concurrency {concurrency}: bare axum…");
                let client = http_client(concurrency)?;
                if warmup > 0 {
                    let load = http_load(
                        client.clone(),
                        url.clone(),
                        tokens.clone(),
                        ids.clone(),
                        next_phase(),
                        failures.clone(),
                    );
                    measure::drive(concurrency, warmup, deadline, load).await;
                    failures.take();
                }
                let load = http_load(
                    client.clone(),
                    url.clone(),
                    tokens.clone(),
                    ids.clone(),
                    next_phase(),
                    failures.clone(),
                );
                let mark = CpuMark::now(bare_pid);
                let stats = measure::drive(concurrency, args.requests, deadline, load).await;
                Some(Phase {
                    stats,
                    failures: failures.take(),
                    cpu: mark.since(bare_pid),
                })
            }
        };

        let level = Level {
            concurrency,
            server: server_side(&before, &after),
            ingress,
            publish,
            bare,
            rss_max_mib,
        };
        if level.ingress.stats.completed == level.ingress.stats.errors {
            bail!(
                "no webhook was accepted at concurrency {concurrency}: {:?}; the ingress log:\n{}",
                level.ingress.failures,
                children
                    .ingress
                    .as_ref()
                    .map(ChildProcess::log_tail)
                    .unwrap_or_default()
            );
        }
        if level.publish.stats.completed == level.publish.stats.errors {
            bail!(
                "no publish was confirmed at concurrency {concurrency}: {:?}",
                level.publish.failures
            );
        }
        levels.push(level);
    }
    let peak_rss_mib = measure::proc_status_kib(ingress_pid, "VmHWM")
        .context("cannot read VmHWM of the ingress")? as f64
        / 1024.0;
    let sampled_rss_mib = rss.max_mib();
    drop(rss);
    Ok(Report {
        levels,
        peak_rss_mib,
        sampled_rss_mib,
        idle_rss_mib,
        payload_bytes,
        warmup,
    })
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_string())
}

impl Report {
    fn target(&self, args: &IngressBenchArgs) -> Option<(&Level, bool)> {
        if args.profile_without_jwt {
            return None;
        }
        let level = self
            .levels
            .iter()
            .find(|l| l.concurrency == TARGET_CONCURRENCY)?;
        let met = level.ratio() >= TARGET_MIN_RATIO
            && level.ingress.stats.percentile_ms(0.99) < TARGET_MAX_P99_MS
            && level.ingress.stats.errors == 0;
        Some((level, met))
    }

    fn print(&self, args: &IngressBenchArgs, elapsed: Duration) {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let model = cpu_model();
        println!(
            "fulfillment bench ingress: {cores} cores ({}), loopback; {} measured + {} warm-up \
             requests per phase; webhook payload {} B; {} RS256 webhook tokens reused",
            model.as_deref().unwrap_or("unknown CPU"),
            args.requests,
            self.warmup,
            self.payload_bytes,
            args.tokens,
        );
        println!();
        println!(
            "{:>5}  {:<34} {:>9} {:>8} {:>8} {:>8} {:>8} {:>7}",
            "conc", "path", "ok/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"
        );
        for level in &self.levels {
            let mut rows = vec![
                ("ingress: JWT + confirmed publish", &level.ingress),
                ("ceiling: confirmed publish", &level.publish),
            ];
            if let Some(bare) = &level.bare {
                rows.push(("ceiling: bare axum POST", bare));
            }
            for (name, phase) in rows {
                let s = &phase.stats;
                println!(
                    "{:>5}  {:<34} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>7}{}",
                    level.concurrency,
                    name,
                    s.ok_per_second(),
                    s.percentile_ms(0.50),
                    s.percentile_ms(0.90),
                    s.percentile_ms(0.99),
                    s.max_ms(),
                    s.errors,
                    if s.truncated { " (deadline)" } else { "" },
                );
                for (kind, count) in &phase.failures {
                    println!("{:>7}  {count} × {kind}", "");
                }
            }
            let per_request_us = |secs: f64, phase: &Phase| {
                let ok = (phase.stats.completed - phase.stats.errors).max(1);
                secs * 1e6 / ok as f64
            };
            println!(
                "{:>7}  ratio ingress/publish ceiling {:.2}{}; ingress server-side mean {:.2} ms \
                 of which publisher()+confirm {:.2} ms (client-side mean {:.2} ms)",
                "",
                level.ratio(),
                level
                    .bare
                    .as_ref()
                    .map(|b| format!(
                        ", ingress/bare HTTP {:.2}",
                        level.ingress.stats.ok_per_second() / b.stats.ok_per_second().max(1e-9)
                    ))
                    .unwrap_or_default(),
                level.server.handler_mean_ms,
                level.server.publish_mean_ms,
                level.ingress.stats.mean_ms(),
            );
            println!(
                "{:>7}  CPU per webhook: ingress {:.0} µs{}, load generator {:.0} µs; machine \
                 busy {:.0}% (ingress phase), {:.0}% (publish phase: bench process {:.0} µs per \
                 publish)",
                "",
                per_request_us(level.ingress.cpu.other_secs, &level.ingress),
                level
                    .bare
                    .as_ref()
                    .map(|b| format!(" (bare axum {:.0} µs)", per_request_us(b.cpu.other_secs, b)))
                    .unwrap_or_default(),
                per_request_us(level.ingress.cpu.own_secs, &level.ingress),
                level.ingress.cpu.system_busy * 100.0,
                level.publish.cpu.system_busy * 100.0,
                per_request_us(level.publish.cpu.own_secs, &level.publish),
            );
        }
        println!();
        println!(
            "ingress memory: peak RSS (VmHWM) {:.1} MiB; sampled VmRSS max {:.1} MiB; idle after \
             startup {:.1} MiB",
            self.peak_rss_mib, self.sampled_rss_mib, self.idle_rss_mib
        );
        let target = self.target(args);
        match target {
            Some((level, met)) => println!(
                "target (≥ {:.0}% of the confirmed-publish ceiling and p99 < {TARGET_MAX_P99_MS} ms \
                 at {TARGET_CONCURRENCY} connections, no errors): {} (ratio {:.2}, p99 {:.2} ms, \
                 errors {})",
                TARGET_MIN_RATIO * 100.0,
                if met { "MET" } else { "NOT MET" },
                level.ratio(),
                level.ingress.stats.percentile_ms(0.99),
                level.ingress.stats.errors,
            ),
            None => println!(
                "target: not evaluated (no {TARGET_CONCURRENCY}-connection level in this run, \
                 or --profile-without-jwt)"
            ),
        }
        println!("run took {:.1} s", elapsed.as_secs_f64());

        let levels: Vec<Value> = self
            .levels
            .iter()
            .map(|level| {
                let s = &level.ingress.stats;
                json!({
                    "concurrency": level.concurrency,
                    "requests": s.completed,
                    "rps": round(s.ok_per_second(), 1),
                    "p50_ms": round(s.percentile_ms(0.50), 3),
                    "p90_ms": round(s.percentile_ms(0.90), 3),
                    "p99_ms": round(s.percentile_ms(0.99), 3),
                    "max_ms": round(s.max_ms(), 3),
                    "errors": s.errors,
                    "publish_ceiling_per_s": round(level.publish.stats.ok_per_second(), 1),
                    "ratio": round(level.ratio(), 3),
                    "publish": level.publish.json(),
                    "bare_http": level.bare.as_ref().map(Phase::json),
                    "server_mean_ms": round(level.server.handler_mean_ms, 3),
                    "server_publish_mean_ms": round(level.server.publish_mean_ms, 3),
                    "server_webhooks": level.server.webhooks,
                    "ingress_cpu_s": round(level.ingress.cpu.other_secs, 2),
                    "ingress_cpu_us_per_request": round(
                        level.ingress.cpu.other_secs * 1e6 / (s.completed - s.errors).max(1) as f64,
                        0,
                    ),
                    "machine_busy": round(level.ingress.cpu.system_busy, 3),
                    "rss_max_mib": round(level.rss_max_mib, 1),
                })
            })
            .collect();
        let line = json!({
            "bench": "ingress",
            "levels": levels,
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "idle_rss_mib": round(self.idle_rss_mib, 1),
            "payload_bytes": self.payload_bytes,
            "target": {
                "concurrency": TARGET_CONCURRENCY,
                "min_ratio": TARGET_MIN_RATIO,
                "max_p99_ms": TARGET_MAX_P99_MS,
                "met": target.map(|(_, met)| met),
            },
            "machine": { "cores": cores, "cpu": model },
            "jwt_verified": !args.profile_without_jwt,
            "duration_s": round(elapsed.as_secs_f64(), 1),
        });
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_distinct_valid_webhooks() {
        let ids = Ids::new();
        let mut seen = std::collections::HashSet::new();
        for i in 0..2000 {
            let (operation, activity, subscription) = ids.of(1, i);
            assert!(seen.insert(operation), "operation id {i} repeats");
            let body = webhook_payload(i, operation, activity, subscription);
            let parsed = crate::marketplace::WebhookPayload::parse(body.as_bytes()).unwrap();
            assert_eq!(parsed.id, operation);
            assert_eq!(parsed.subscription_id, subscription);
        }
        assert_ne!(ids.of(1, 0).0, ids.of(2, 0).0);
    }
}
