//! `fulfillment demo`: the whole lifecycle in one process. Starts the marketplace simulator,
//! the ingress and one worker in-process against the local PostgreSQL and RabbitMQ (in a
//! demo database and under a demo AMQP prefix, never the configured ones), plays a
//! subscription from purchase to unsubscribe through real HTTP and AMQP, prints the
//! timeline from the event log and checks that both sides agree.
//!
//! Logs stay at `warn` unless `RUST_LOG` says otherwise, so the story on stdout reads well.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::format_description;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

use crate::settings::{Settings, WebhookAuth};
use crate::simulator::customer::{ScriptedCustomer, page_text};
use crate::simulator::{PlanSpec, SimulatorConfig, Timings};
use crate::worker::protocol::CommandStatus;
use crate::worker::{EffectsConfig, ProtocolConfig, WorkerConfig};
use crate::world::{OFFER, Purchase, SimHandle, View, World, WorldOptions, wait_until};

/// Options of `fulfillment demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Leave the demo database in place afterwards for inspection (it is recreated on the
    /// next run anyway).
    #[arg(long)]
    pub keep: bool,
    /// The policy's seat maximum; the demo asks for 10 seats more and sees it refused.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(8..=90))]
    pub seat_limit: u32,
}

/// The demo's second per-seat plan, added to the simulator's catalogue.
const PRO_PLAN: &str = "per-seat-pro";
/// Longest wait for one step to settle on both sides.
const STEP_DEADLINE: Duration = Duration::from_secs(30);
/// Microsoft's window for ACKing a customer change (§5.3), kept realistic.
const ACK_WINDOW: Duration = Duration::from_secs(10);

/// Runs the demo on a runtime of its own whose threads log at `warn` (or `RUST_LOG`), so the
/// global subscriber installed by the CLI does not drown the story.
pub async fn run(settings: Settings, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let (send, receive) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("demo".into())
        .spawn(move || {
            let dispatch = quiet_dispatch();
            let _main = tracing::dispatcher::set_default(&dispatch);
            let threads = dispatch.clone();
            let result = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .on_thread_start(move || {
                    // Lives as long as the thread: its default stays the quiet subscriber.
                    std::mem::forget(tracing::dispatcher::set_default(&threads));
                })
                .build()
                .context("cannot start the demo runtime")
                .and_then(|runtime| runtime.block_on(demo(settings, args)));
            let _ = send.send(result);
        })
        .context("cannot start the demo thread")?;
    receive.await.context("the demo thread ended abruptly")?
}

fn quiet_dispatch() -> tracing::Dispatch {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::prelude::*;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn"));
    let subscriber = tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr));
    tracing::Dispatch::new(subscriber)
}

async fn demo(settings: Settings, args: DemoArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    if !services_reachable(&settings).await {
        return Ok(ExitCode::FAILURE);
    }

    // Our own database and names, never the configured ones.
    let api_key = format!("demo-key-{}", Uuid::new_v4().simple());
    let cert_dir =
        std::env::temp_dir().join(format!("fulfillment-demo-{}", Uuid::new_v4().simple()));
    let worker_config = WorkerConfig {
        effects: EffectsConfig {
            protocol: ProtocolConfig {
                backoff_base: Duration::from_millis(200),
                backoff_max: Duration::from_secs(3),
                operation_poll_interval: Duration::from_millis(250),
                activation_check_interval: Duration::from_millis(250),
                ..ProtocolConfig::default()
            },
            ..EffectsConfig::default()
        },
        ..WorkerConfig::for_pool(settings.database.max_connections)
    };
    let options = WorldOptions {
        fixed_names: true,
        ingress: true,
        worker: Some(worker_config),
        configure: Box::new(|settings, config| {
            configure(settings, config, &args, &api_key, &cert_dir)
        }),
        ..WorldOptions::bare("demo")
    };
    let world = World::start(&settings, options).await;
    let mut world = match world {
        Ok(world) => world,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&cert_dir);
            return Err(e);
        }
    };
    let settings = world.settings.clone();
    let demo_name = settings
        .database
        .url
        .url()
        .path()
        .trim_start_matches('/')
        .to_string();
    let ingress = world.ingress.context("the demo's ingress")?;
    // The ISV's other service: a queue of its own on the domain exchange.
    let isv_queue = format!("{}.isv-events", settings.amqp.prefix);
    world.delete_at_teardown(isv_queue.clone());
    let listening = world
        .broker
        .listen_to_domain_events(&isv_queue, "subscription.*");
    (listening.await).context("cannot bind the ISV's queue to the domain exchange")?;

    println!("fulfillment demo");
    println!(
        "  database {}   AMQP prefix {}   seat limit {}",
        settings.database.url.redacted(),
        settings.amqp.prefix,
        args.seat_limit
    );
    println!(
        "  simulator {}   ingress http://{ingress}   worker in-process   ACK window {}s",
        world.sim.base_url(),
        ACK_WINDOW.as_secs()
    );
    println!(
        "  console http://{ingress}/console (sign in as `operator` on the simulator's login form)"
    );
    if let Ok(status) = crate::marketplace::TokenProvider::for_settings(&settings).and_then(|t| {
        t.credential_status()
            .map_err(|message| crate::marketplace::Error::Configuration { message })
    }) {
        println!(
            "  credential: {} (client assertion, x5t#S256)",
            status.description
        );
    }
    println!();

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .build()?;
    let shutdown = CancellationToken::new();
    let mut demo = Demo {
        sim: world.sim_admin(&http),
        http,
        ingress,
        api_key,
        world,
        started,
        seat_limit: args.seat_limit,
        expected_ops: Vec::new(),
        publisher_op: None,
    };
    // The ISV's product: a local endpoint that verifies our signatures.
    let (receiver, inbox) = demo.register_endpoint(shutdown.child_token()).await?;
    let played = demo.play().await;
    let verdict = match &played {
        Ok(id) => {
            let agreed = demo.report(*id).await;
            let delivered = demo.show_deliveries(*id, receiver, &inbox).await;
            demo.show_domain_events(&isv_queue).await;
            Some(agreed && delivered)
        }
        Err(_) => None,
    };

    // Shut down: stop accepting, finish the work in hand, then remove what the demo made.
    shutdown.cancel();
    let mut world = demo.world;
    let server = world.stop_ingress().context("the demo's ingress")?;
    let worker_stopped = world.stop_workers().await;
    let server_stopped = tokio::time::timeout(Duration::from_secs(15), server).await;
    let cleaned = world.teardown_keeping_database(args.keep).await;
    let _ = std::fs::remove_dir_all(&cert_dir);

    println!();
    match (&worker_stopped, &server_stopped) {
        (Ok(()), Ok(Ok(Ok(())))) => println!("shutdown: ingress and worker stopped gracefully"),
        _ => println!(
            "shutdown: worker {worker_stopped:?}, ingress {}",
            match &server_stopped {
                Ok(Ok(Ok(()))) => "stopped".to_string(),
                Ok(Ok(Err(e))) => format!("failed: {e:#}"),
                Ok(Err(e)) => format!("panicked: {e}"),
                Err(_) => "did not stop within 15 s".to_string(),
            }
        ),
    }
    match &cleaned {
        Ok(()) => println!(
            "cleanup: deleted the {}.* queues and exchanges",
            settings.amqp.prefix
        ),
        Err(e) => println!("cleanup: {e:#}"),
    }
    match (&cleaned, args.keep) {
        (Ok(()), true) => println!(
            "cleanup: kept database {demo_name} (--keep); inspect it with psql {}",
            settings.database.url.redacted()
        ),
        (Ok(()), false) => println!("cleanup: dropped database {demo_name}"),
        (Err(_), _) => {}
    }
    let elapsed = started.elapsed().as_secs_f64();
    match (played, verdict) {
        (Ok(_), Some(true))
            if worker_stopped.is_ok() && matches!(server_stopped, Ok(Ok(Ok(())))) =>
        {
            println!("demo OK in {elapsed:.1} s: both sides agree, every ACK made exactly once");
            Ok(ExitCode::SUCCESS)
        }
        (Ok(_), _) => {
            println!("demo FAILED in {elapsed:.1} s: see the mismatches above");
            Ok(ExitCode::FAILURE)
        }
        (Err(e), _) => {
            println!("demo FAILED in {elapsed:.1} s: {e:#}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The demo's world: the engine proves its identity with a certificate (issue #20), a
/// branded landing page with one onboarding question, the console, a second per-seat plan
/// and clocks worth watching.
fn configure(
    settings: &mut Settings,
    config: &mut SimulatorConfig,
    args: &DemoArgs,
    api_key: &str,
    cert_dir: &std::path::Path,
) -> anyhow::Result<()> {
    let secret = settings.marketplace.client_secret.take();
    let client = settings.marketplace.client_id.context("a client id")?;
    // A fresh self-signed certificate, registered on the simulated app; the client
    // assertion carries its x5t#S256.
    let now = time::OffsetDateTime::now_utc();
    let (cert_pem, key_pem) = crate::marketplace::credential::generate_self_signed(
        "fulfillment-demo",
        now - time::Duration::hours(1),
        now + time::Duration::days(90),
    )?;
    std::fs::create_dir_all(cert_dir).context("cannot create the demo certificate directory")?;
    let cert_path = cert_dir.join("client.pem");
    std::fs::write(&cert_path, format!("{cert_pem}{key_pem}"))
        .context("cannot write the demo certificate")?;
    config.client_certificates.push(cert_pem);
    settings.credential.kind = Some(crate::settings::CredentialKind::Certificate);
    settings.credential.certificate_path = Some(cert_path);
    settings.credential.certificate_key_path = None;
    settings.ingress.webhook_auth = WebhookAuth::Entra;
    settings.ingress.jwks_url = None;
    settings.ingress.webhook_audiences = vec![client.to_string()];
    settings.ingress.api_key = Some(SecretString::from(api_key.to_string()));
    settings.http.listen_addr = SocketAddr::from(([127, 0, 0, 1], 0));
    settings.policy.seats.max = Some(args.seat_limit);
    settings.policy.activation = fulfillment_state_machine::ActivationMode::Automatic;
    // The landing page as a customer sees it: branded, one onboarding question, sign-in
    // at the simulator's Entra stand-in.
    crate::world::brand_as_contoso(settings);
    // Sign-in is a confidential client with a secret even where the Fulfillment API token
    // comes from the certificate.
    settings.web.client_secret = secret;
    // The console: the simulator's `operator` test user (by group) may act.
    settings.web.console_operators = vec![crate::settings::OperatorRule::Group(
        crate::simulator::sign_in::OPERATORS_GROUP_ID,
    )];
    // A second per-seat plan: moves between per-seat plans keep the seat count on both
    // sides (a flat plan has no quantity at Microsoft).
    config
        .plans
        .push(PlanSpec::per_seat(OFFER, PRO_PLAN, 20.0, 1, 100));
    config.timings = Timings {
        activation_delay: Duration::from_millis(500),
        operation_delay: Duration::from_millis(500),
        ack_window: ACK_WINDOW,
        webhook_delay: Duration::from_millis(50),
        webhook_retry_interval: Duration::from_secs(1),
        webhook_max_attempts: 20,
        // Production's 202 asks for 10 s before the first poll; the demo keeps the shape
        // (NotStarted, then InProgress, behind a Retry-After) at a pace worth watching.
        retry_after: Duration::from_secs(1),
        operation_start_delay: Duration::from_millis(200),
        ..Timings::default()
    };
    Ok(())
}

/// Checks PostgreSQL and RabbitMQ; prints what is missing and how to start it.
async fn services_reachable(settings: &Settings) -> bool {
    let admin = settings.database.url.with_path("/postgres");
    let postgres = match crate::store::connect_once(&admin, Duration::from_secs(5)).await {
        Ok(connection) => {
            drop(connection);
            Ok(())
        }
        Err(failure) => Err(format!("{failure:?}")),
    };
    let rabbit = async {
        let connection = lapin::Connection::connect(
            settings.amqp.url.expose(),
            lapin::ConnectionProperties::default(),
        )
        .await?;
        let _ = connection.close(200, "demo check".into()).await;
        Ok::<_, lapin::Error>(())
    };
    let rabbit = match tokio::time::timeout(Duration::from_secs(5), rabbit).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".to_string()),
    };
    if let Err(e) = &postgres {
        println!(
            "PostgreSQL is not reachable at {} ({e}).\n  Start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n  (or start both services with: bash .ci/services)",
            settings.database.url.redacted()
        );
    }
    if let Err(e) = &rabbit {
        println!(
            "RabbitMQ is not reachable at {} ({e}).\n  Start it with: rabbitmq-server -detached\n  (or start both services with: bash .ci/services)",
            settings.amqp.url.redacted()
        );
    }
    postgres.is_ok() && rabbit.is_ok()
}

/// A customer-side operation the worker must ACK, and how it should end.
struct ExpectedOp {
    id: String,
    label: String,
    status: &'static str,
}

struct Demo {
    http: reqwest::Client,
    sim: SimHandle,
    ingress: SocketAddr,
    api_key: String,
    world: World,
    started: Instant,
    seat_limit: u32,
    expected_ops: Vec<ExpectedOp>,
    /// The command id of the publisher-initiated plan change.
    publisher_op: Option<Uuid>,
}

impl Demo {
    fn say(&self, text: &str) {
        println!("[{:6.2}s] {text}", self.started.elapsed().as_secs_f64());
    }

    fn detail(&self, text: &str) {
        println!("          {text}");
    }

    /// Starts a verifying receiver on loopback and registers it through the entitlement API
    /// (the secret, shown once, goes to the receiver).
    async fn register_endpoint(
        &self,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(SocketAddr, crate::webhooks::receiver::Inbox)> {
        let (address, inbox, set_secret) = crate::webhooks::receiver::start(shutdown)
            .await
            .context("cannot start the demo's webhook receiver")?;
        let response = self
            .http
            .post(format!("http://{}/api/v1/webhook-endpoints", self.ingress))
            .bearer_auth(&self.api_key)
            .json(
                &json!({"url": format!("http://{address}/hooks"), "topics": ["subscription.*"],
                          "description": "fulfillment demo"}),
            )
            .send()
            .await?;
        ensure!(
            response.status() == reqwest::StatusCode::CREATED,
            "registering the webhook endpoint answered {}",
            response.status()
        );
        let created: Value = response.json().await?;
        let secret = created["secret"]
            .as_str()
            .context("no secret in the registration's answer")?;
        set_secret(crate::webhooks::Secret::parse(secret)?);
        self.say(&format!(
            "0. the ISV registers its webhook endpoint http://{address}/hooks (subscription.*)"
        ));
        Ok((address, inbox))
    }

    /// Waits until the endpoint received every event of the feed for `id`, then prints each
    /// delivery with its signature check. True when all arrived, verified, once, in order.
    async fn show_deliveries(
        &self,
        id: Uuid,
        receiver: SocketAddr,
        inbox: &crate::webhooks::receiver::Inbox,
    ) -> bool {
        let deadline = Instant::now() + STEP_DEADLINE;
        let feed_ids = loop {
            let feed: Option<Vec<String>> = async {
                let page: Value = self
                    .http
                    .get(format!(
                        "http://{}/api/v1/events?subscriptionId={id}&limit=1000",
                        self.ingress
                    ))
                    .bearer_auth(&self.api_key)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                Some(
                    page["events"]
                        .as_array()?
                        .iter()
                        .filter_map(|e| e["id"].as_str().map(str::to_owned))
                        .collect(),
                )
            }
            .await;
            let received: Vec<String> = inbox.all().into_iter().map(|r| r.id).collect();
            if let Some(feed) = feed
                && !feed.is_empty()
                && feed.iter().all(|id| received.contains(id))
            {
                break feed;
            }
            if Instant::now() > deadline {
                println!("  webhooks: not every event reached http://{receiver}/hooks in time");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let received = inbox.all();
        println!();
        println!(
            "webhooks received by the ISV's endpoint http://{receiver}/hooks (signature checked):"
        );
        for delivery in &received {
            println!(
                "  {} {:<52} {}",
                if delivery.verified { "ok " } else { "BAD" },
                delivery.event_type,
                delivery.id
            );
        }
        // The endpoint also hears the other subscriptions the demo makes; this one's
        // events must have arrived once each, in the feed's order.
        let mine: Vec<&str> = received
            .iter()
            .map(|r| r.id.as_str())
            .filter(|id| feed_ids.iter().any(|f| f == id))
            .collect();
        let in_order = mine == feed_ids.iter().map(String::as_str).collect::<Vec<_>>();
        let verified = received.iter().all(|r| r.verified);
        println!(
            "  {} deliveries; subscription {id}: {} feed events, {}; every signature {}",
            received.len(),
            feed_ids.len(),
            if in_order {
                "each received once, in order"
            } else {
                "NOT each received once in order"
            },
            if verified {
                "valid"
            } else {
                "checked: SOME INVALID"
            }
        );
        in_order && verified
    }

    /// Prints the domain events the ISV's queue on the domain exchange received: the same
    /// events, over AMQP, for the ISV's services.
    async fn show_domain_events(&self, queue: &str) {
        let exchange = self.world.broker.topology().domain_exchange();
        println!();
        println!("domain events on RabbitMQ, queue {queue} bound to {exchange} (subscription.*):");
        let taken = match self.world.broker.take_all(queue).await {
            Ok(taken) => taken,
            Err(e) => return println!("  cannot read {queue}: {e}"),
        };
        for message in &taken {
            let event: Value = serde_json::from_slice(&message.body).unwrap_or(Value::Null);
            let kind = event["type"].as_str().unwrap_or("(not a CloudEvent)");
            println!("  {kind:<56} {}", event["id"].as_str().unwrap_or("-"));
        }
        println!("  {} events", taken.len());
    }

    /// The whole lifecycle; returns the subscription id.
    async fn play(&mut self) -> anyhow::Result<Uuid> {
        // 1. Purchase.
        let purchase = json!({"planId": "per-seat", "quantity": 5});
        let Purchase { id, landing, .. } = self.sim.buy(purchase).await?;
        self.say(&format!(
            "1. customer buys {OFFER} / per-seat with 5 seats: subscription {id}"
        ));

        // 2. Landing page: the customer signs in (simulated Entra ID) and activates.
        self.say(&format!("2. customer opens the landing page: {landing}"));
        let customer = ScriptedCustomer::new("customer")?;
        let before = customer.open(&landing).await?;
        for line in page_text(&before.html) {
            self.detail(&format!("| {line}"));
        }
        ensure!(
            before.status.is_success(),
            "the landing page answered {}",
            before.status
        );
        let after = customer
            .activate(&landing, &[("company", "Contoso Ltd")])
            .await?;
        self.say(&format!(
            "   signed in as Chris Customer and pressed Activate: HTTP {}",
            after.status.as_u16()
        ));
        for line in page_text(&after.html) {
            self.detail(&format!("| {line}"));
        }

        // 3. Activation.
        let view = self.settle(id, "Subscribed", Some("per-seat")).await?;
        self.say(&format!(
            "3. worker activates automatically: both sides {view}"
        ));

        // 3a. Beside it, a purchase of a plan with auto-activation (2026, §5.6).
        let auto = json!({"planId": "per-seat", "quantity": 3, "autoActivate": true});
        let auto_id = self.sim.buy(auto).await?.id;
        let auto_view = self.settle(auto_id, "Subscribed", Some("per-seat")).await?;
        let activations = crate::store::verify::count_events_of_kind(
            &self.world.pool,
            auto_id,
            "effect:activate",
        )
        .await?;
        ensure!(
            activations == 0,
            "the auto-activated purchase was activated again"
        );
        self.say(&format!(
            "   another customer buys per-seat with auto-activation: Subscribed at checkout, recorded from the Subscribe webhook without a landing-page visit or an Activate: both sides {auto_view}"
        ));

        // 3b. Metered billing: usage through the entitlement API, billed hourly (§9).
        self.meter().await?;

        // 4. Seat change inside the limit.
        let op = self
            .customer(
                id,
                json!({"action": "ChangeQuantity", "quantity": 8}),
                "ChangeQuantity 5 → 8",
                "Succeeded",
            )
            .await?;
        let view = self.settle(id, "Subscribed", Some("per-seat")).await?;
        ensure!(
            view.quantity == Some(8),
            "the seat change did not land: {view}"
        );
        self.say(&format!(
            "4. customer changes seats 5 → 8: {op}; both sides {view}"
        ));

        // 5. Seat change above the policy's limit.
        let too_many = self.seat_limit + 10;
        let op = self
            .customer(
                id,
                json!({"action": "ChangeQuantity", "quantity": too_many}),
                &format!("ChangeQuantity 8 → {too_many}"),
                "Failed",
            )
            .await?;
        let view = self.settle(id, "Subscribed", Some("per-seat")).await?;
        ensure!(
            view.quantity == Some(8),
            "the refused change landed: {view}"
        );
        self.say(&format!(
            "5. customer asks for {too_many} seats (limit {}): refused by policy: {op}; both sides {view}",
            self.seat_limit
        ));

        // 6. Plan change by the customer.
        let op = self
            .customer(
                id,
                json!({"action": "ChangePlan", "planId": PRO_PLAN}),
                "ChangePlan per-seat → per-seat-pro",
                "Succeeded",
            )
            .await?;
        let view = self.settle(id, "Subscribed", Some(PRO_PLAN)).await?;
        self.say(&format!(
            "6. customer changes plan per-seat → {PRO_PLAN}: {op}; both sides {view}"
        ));

        // 7. Suspend (Microsoft: payment failed).
        self.admin_post(
            &format!("simulator/subscriptions/{id}/actions"),
            json!({"action": "Suspend"}),
        )
        .await?;
        let view = self.settle(id, "Suspended", Some(PRO_PLAN)).await?;
        self.say(&format!(
            "7. Microsoft suspends (payment failed): both sides {view}"
        ));

        // 8. Reinstate.
        let op = self
            .customer(id, json!({"action": "Reinstate"}), "Reinstate", "Succeeded")
            .await?;
        let view = self.settle(id, "Subscribed", Some(PRO_PLAN)).await?;
        self.say(&format!(
            "8. Microsoft reinstates (payment fixed): {op}; both sides {view}"
        ));

        // 9. Publisher-initiated plan change through the entitlement API.
        let response = self
            .http
            .post(format!(
                "http://{}/api/v1/subscriptions/{id}/change-plan",
                self.ingress
            ))
            .bearer_auth(&self.api_key)
            .json(&json!({"planId": "per-seat"}))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status == reqwest::StatusCode::ACCEPTED,
            "change-plan answered {status}: {body}"
        );
        let command: Uuid = body["commandId"]
            .as_str()
            .context("no commandId")?
            .parse()?;
        self.publisher_op = Some(command);
        self.say(&format!(
            "9. publisher: POST /api/v1/subscriptions/{{id}}/change-plan {{planId: per-seat}} → HTTP 202, command {command}"
        ));
        let polled = Instant::now();
        let operation = self.wait_for_command(command).await?;
        let view = self.settle(id, "Subscribed", Some("per-seat")).await?;
        let api: Value = self
            .http
            .get(format!("http://{}/api/v1/subscriptions/{id}", self.ingress))
            .bearer_auth(&self.api_key)
            .send()
            .await?
            .json()
            .await?;
        self.detail(&format!(
            "worker PATCHed the plan, polled operation {operation} to Succeeded in {} ms; GET /api/v1/subscriptions/{{id}} says {} / {}",
            polled.elapsed().as_millis(),
            api["state"].as_str().unwrap_or("?"),
            api["planId"].as_str().unwrap_or("?"),
        ));
        self.say(&format!(
            "   publisher plan change {PRO_PLAN} → per-seat done: both sides {view}"
        ));

        // 10. Unsubscribe.
        self.admin_post(
            &format!("simulator/subscriptions/{id}/actions"),
            json!({"action": "Unsubscribe"}),
        )
        .await?;
        let view = self.settle(id, "Unsubscribed", Some("per-seat")).await?;
        self.say(&format!("10. customer unsubscribes: both sides {view}"));
        Ok(id)
    }

    /// A metered purchase (`silver`, dimension `api-calls`) reports usage for an hour two
    /// hours ago; the worker closes the hour and submits it; the simulator shows it billed.
    async fn meter(&self) -> anyhow::Result<()> {
        let purchase = json!({"planId": "silver", "autoActivate": true});
        let id = self.sim.buy(purchase).await?.id;
        self.settle(id, "Subscribed", Some("silver")).await?;
        let hour = crate::metering::hour_of(OffsetDateTime::now_utc()) - time::Duration::hours(2);
        let events: Vec<Value> = [(5, 40.0), (25, 2.5), (50, 7.5)]
            .iter()
            .map(|(minute, quantity)| {
                let at = hour + time::Duration::minutes(*minute);
                json!({"subscriptionId": id, "dimension": "api-calls", "quantity": quantity,
                       "effectiveAt": at.format(&time::format_description::well_known::Rfc3339)
                           .unwrap_or_default(),
                       "idempotencyKey": format!("demo-{minute}")})
            })
            .collect();
        let response = self
            .http
            .post(format!("http://{}/api/v1/usage", self.ingress))
            .bearer_auth(&self.api_key)
            .json(&events)
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        ensure!(
            status.is_success(),
            "POST /api/v1/usage answered {status}: {body}"
        );
        self.say(&format!(
            "   a customer of the metered plan silver uses api-calls: POST /api/v1/usage with 3 events (40 + 2.5 + 7.5) for {} → HTTP {}, {} counted",
            crate::ops::render::when(hour),
            status.as_u16(),
            body["counted"]
        ));
        let deadline = Instant::now() + STEP_DEADLINE;
        let (status, sent): (String, Option<f64>) = loop {
            let row = crate::store::verify::usage_hour_of(&self.world.pool, id).await?;
            if let Some(row) = row.filter(|(s, _)| s != "open" && s != "submitting") {
                break row;
            }
            ensure!(
                Instant::now() < deadline,
                "the usage hour was not billed in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let billed = self.admin_get("simulator/usage").await?;
        let at_microsoft: f64 = billed
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter(|u| u["resourceId"].as_str() == Some(id.to_string().as_str()))
            .filter_map(|u| u["quantity"].as_f64())
            .sum();
        ensure!(
            status == "accepted" && sent == Some(50.0) && at_microsoft == 50.0,
            "usage hour {status}, sent {sent:?}, billed at the simulator {at_microsoft}"
        );
        self.detail(&format!(
            "worker closed the hour and sent batchUsageEvent: {status}; the simulator bills api-calls = {at_microsoft} for that hour"
        ));
        Ok(())
    }

    async fn admin_get(&self, path: &str) -> anyhow::Result<Value> {
        self.sim.get(path).await.map_err(anyhow::Error::msg)
    }

    async fn admin_post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.sim.post(path, body).await.map_err(anyhow::Error::msg)
    }

    async fn sim_view(&self, id: Uuid) -> anyhow::Result<Value> {
        self.sim.view(id).await.map_err(anyhow::Error::msg)
    }

    /// A customer-side action that the worker must ACK: waits until Microsoft's operation
    /// is final and describes how it ended.
    async fn customer(
        &mut self,
        id: Uuid,
        body: Value,
        label: &str,
        expected: &'static str,
    ) -> anyhow::Result<String> {
        let asked = Instant::now();
        let answer = self
            .admin_post(&format!("simulator/subscriptions/{id}/actions"), body)
            .await?;
        let op = answer["operationId"]
            .as_str()
            .context("no operationId")?
            .to_string();
        self.expected_ops.push(ExpectedOp {
            id: op.clone(),
            label: label.to_string(),
            status: expected,
        });
        let operation = self.sim.wait_for_operation(id, &op, STEP_DEADLINE).await;
        let operation = operation.with_context(|| format!("{label} at Microsoft"))?;
        let final_after = asked.elapsed();
        let ack_ms = crate::store::verify::webhook_to_ack_ms(&self.world.pool, id, &op).await?;
        let status = operation["status"].as_str().unwrap_or("?");
        let resolution = operation["resolution"].as_str().unwrap_or("?");
        ensure!(
            status == expected,
            "{label}: Microsoft's operation ended {status} ({resolution}), expected {expected}"
        );
        Ok(format!(
            "Microsoft's operation {status} ({resolution}) {} ms after the request{}",
            final_after.as_millis(),
            match ack_ms {
                Some(ms) => format!(
                    ", webhook → ACK {ms} ms of the {} s window",
                    ACK_WINDOW.as_secs()
                ),
                None => String::new(),
            }
        ))
    }

    /// Waits until the world has settled (see [`World::unsettled`]) with our side in
    /// `state` (and on `plan`).
    async fn settle(&self, id: Uuid, state: &str, plan: Option<&str>) -> anyhow::Result<View> {
        let what = format!("both sides to settle on {state}");
        let settled = wait_until(&what, STEP_DEADLINE, || async {
            let view = self.world.engine(id).await.ok()??;
            let calm = self.world.unsettled(&[id]).await.ok()?.is_empty();
            (view.is(state, plan, None) && calm).then_some(view)
        })
        .await;
        match settled {
            Ok(view) => Ok(view),
            Err(e) => Err(e.context(self.world.unsettled(&[id]).await?.join("; "))),
        }
    }

    /// Waits until the publisher operation of a command has ended Succeeded; returns
    /// Microsoft's operation id.
    async fn wait_for_command(&self, command: Uuid) -> anyhow::Result<String> {
        let row = self.world.wait_for_command(command, STEP_DEADLINE).await;
        let row = row.context("the publisher plan change")?;
        match (row.status, row.operation_id) {
            (CommandStatus::Succeeded, Some(operation)) => Ok(operation.to_string()),
            (status, _) => bail!(
                "the publisher plan change ended {status}: {}",
                row.last_error.as_deref().unwrap_or("-")
            ),
        }
    }

    /// An operator signs in to the console and opens the subscription's page: its HTTP
    /// status, and whether it shows the timeline of the ended subscription.
    async fn console_check(&self, id: Uuid) -> anyhow::Result<(u16, bool)> {
        let page = format!("/console/subscriptions/{id}");
        let console: Url = format!("http://{}{page}", self.ingress).parse()?;
        let operator = ScriptedCustomer::new("operator")?;
        let start = console.join(&crate::web::auth::sign_in_url(
            crate::web::auth::Surface::Console,
            &page,
        ))?;
        operator.sign_in(&start).await?;
        let shown = operator.open(&console).await?;
        self.say(&format!(
            "the operator console: {console} (signed in as Avery Operator): HTTP {}",
            shown.status.as_u16()
        ));
        let ok = shown.status.is_success()
            && shown.html.contains("id=\"timeline\"")
            && shown.html.contains("Unsubscribed");
        Ok((shown.status.as_u16(), ok))
    }

    /// Prints the timeline and the final check; true when everything matches.
    async fn report(&self, id: Uuid) -> bool {
        match self.try_report(id).await {
            Ok(ok) => ok,
            Err(e) => {
                println!("cannot check the result: {e:#}");
                false
            }
        }
    }

    async fn try_report(&self, id: Uuid) -> anyhow::Result<bool> {
        type Row = (
            i64,
            OffsetDateTime,
            String,
            String,
            String,
            String,
            Option<String>,
            Value,
            Value,
            Option<Value>,
        );
        let rows: Vec<Row> = crate::store::timeline::events(&self.world.pool, id)
            .await?
            .into_iter()
            .map(|row| {
                (
                    row.sequence,
                    row.recorded_at,
                    row.event_kind,
                    row.from_state,
                    row.to_state,
                    row.outcome.to_string(),
                    row.reason,
                    row.effects,
                    row.event,
                    row.execution,
                )
            })
            .collect();
        let clock = format_description!("[hour]:[minute]:[second].[subsecond digits:3]");
        println!();
        println!(
            "Timeline (event log of subscription {id}, {} rows)",
            rows.len()
        );
        println!(
            "{:>4}  {:<12}  {:<28}  {:<32}  {:<8}  {:<56}  effects",
            "seq", "time (UTC)", "event", "from → to", "outcome", "reason"
        );
        for (sequence, at, kind, from, to, outcome, reason, effects, event, execution) in &rows {
            let states = if from == to {
                from.clone()
            } else {
                format!("{from} → {to}")
            };
            let mut reason = reason.clone().unwrap_or_default();
            // The call that produced the event, when recorded in its row (a GET, an ACK):
            // named first, as its own row would have been, with the ACK's time.
            match execution {
                Some(execution) => {
                    let by = execution["kind"].as_str().unwrap_or("effect");
                    reason = match execution["webhook_to_ack_ms"].as_i64() {
                        Some(ms) => format!("[{by}, {ms} ms after the webhook] {reason}"),
                        None => format!("[{by}] {reason}"),
                    };
                }
                None => {
                    if let Some(ms) = event["webhook_to_ack_ms"].as_i64() {
                        let _ = write!(reason, " ({ms} ms after the webhook)");
                    }
                }
            }
            println!(
                "{sequence:>4}  {:<12}  {kind:<28}  {states:<32}  {outcome:<8}  {:<56}  {}",
                at.format(&clock).unwrap_or_default(),
                shorten(&reason, 56),
                effects_summary(effects)
            );
        }

        // The operator console shows the same story.
        let (console_status, console_ok) = self.console_check(id).await?;

        // Final check.
        let sim_view = self.sim_view(id).await?;
        let sim = View::of_sim_view(&sim_view);
        let engine = self
            .world
            .engine(id)
            .await?
            .context("the engine has no row")?;
        let mut ok = true;
        println!();
        println!("Final check");
        println!(
            "  {:<44}  {:<26}  {:<36}  result",
            "", "engine (PostgreSQL)", "marketplace (simulator)"
        );
        let mut line = |what: &str, ours: String, theirs: String, good: bool| {
            ok &= good;
            println!(
                "  {what:<44}  {ours:<26}  {theirs:<36}  {}",
                if good { "ok" } else { "MISMATCH" }
            );
        };
        line(
            "operator console: the subscription's page",
            format!("HTTP {console_status}"),
            "signed in as Avery Operator".into(),
            console_ok,
        );
        let show = |q: Option<i64>| q.map_or("-".to_string(), |q| q.to_string());
        line(
            "state",
            engine.state.clone(),
            sim.state.clone(),
            engine.state == sim.state && engine.state == "Unsubscribed",
        );
        line(
            "plan",
            engine.plan.clone().unwrap_or_default(),
            sim.plan.clone().unwrap_or_default(),
            engine.plan == sim.plan && engine.plan.as_deref() == Some("per-seat"),
        );
        line(
            "quantity",
            show(engine.quantity),
            show(sim.quantity),
            engine.quantity == sim.quantity && engine.quantity == Some(8),
        );

        // Every ACKable customer operation: ACKed exactly once, ended as expected.
        let operations = sim_view["operations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        for op in &operations {
            let action = op["action"].as_str().unwrap_or("?");
            let source = op["source"].as_str().unwrap_or("?");
            let ackable = source == "Azure"
                && matches!(action, "ChangePlan" | "ChangeQuantity" | "Reinstate");
            if !ackable {
                continue;
            }
            let op_id = op["id"].as_str().unwrap_or_default();
            let expected = self.expected_ops.iter().find(|e| e.id == op_id);
            let label = expected.map_or(action.to_string(), |e| e.label.clone());
            let (rows, made, ack) =
                crate::store::verify::ack_of_operation(&self.world.pool, id, op_id).await?;
            let status = op["status"].as_str().unwrap_or("?");
            let resolution = op["resolution"].as_str().unwrap_or("?");
            let good = rows == 1
                && made == 1
                && resolution != "auto-accepted"
                && expected.is_some_and(|e| e.status == status);
            line(
                &format!("ACK {label}"),
                format!(
                    "{} ×{made} ({rows} outbox row)",
                    ack.as_deref().unwrap_or("none")
                ),
                format!("{status}: {}", shorten(resolution, 26)),
                good,
            );
        }
        if operations.is_empty() {
            line("operations", "-".into(), "none".into(), false);
        }

        // The publisher-initiated change.
        if let Some(command) = self.publisher_op {
            let recorded = crate::store::commands::operation(&self.world.pool, command)
                .await?
                .context("the publisher command was never recorded")?;
            let (status, op) = (recorded.status, recorded.operation_id);
            let theirs = op
                .and_then(|op| {
                    operations
                        .iter()
                        .find(|o| o["id"] == op.to_string().as_str())
                        .and_then(|o| o["status"].as_str().map(str::to_string))
                })
                .unwrap_or_else(|| "not found".into());
            line(
                "publisher ChangePlan per-seat-pro → per-seat",
                status.to_string(),
                theirs.clone(),
                status == CommandStatus::Succeeded && theirs == "Succeeded",
            );
        }

        // Webhooks all delivered; no effect left pending or dead.
        let webhooks = sim_view["webhooks"].as_array().cloned().unwrap_or_default();
        let delivered = webhooks.iter().filter(|w| w["delivered"] == true).count();
        line(
            "webhooks delivered",
            format!("{delivered} received"),
            format!("{} sent", webhooks.len()),
            delivered == webhooks.len() && !webhooks.is_empty(),
        );
        let (pending, dead) = crate::store::timeline::outbox_counts(&self.world.pool, id).await?;
        line(
            "outbox pending / dead",
            format!("{pending} / {dead}"),
            String::new(),
            pending == 0 && dead == 0,
        );
        Ok(ok)
    }
}

fn effects_summary(effects: &Value) -> String {
    let Some(effects) = effects.as_array() else {
        return String::new();
    };
    effects
        .iter()
        .map(|effect| {
            let kind = effect["type"].as_str().unwrap_or("?");
            match effect["status"].as_str() {
                Some(status) if kind == "ack_operation" => format!("{kind}({status})"),
                _ => kind.to_string(),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut short: String = text.chars().take(max.saturating_sub(1)).collect();
    short.push('…');
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_are_summarised_by_type() {
        let effects = json!([
            {"type": "ack_operation", "status": "Failure"},
            {"type": "publish_domain_event"}
        ]);
        assert_eq!(
            effects_summary(&effects),
            "ack_operation(Failure), publish_domain_event"
        );
        assert_eq!(shorten("abcdef", 4), "abc…");
    }
}
