//! Observability end to end: the Prometheus metrics of the ingress and of the worker's own
//! listener after a real lifecycle (simulator, ingress and worker in-process), and the trace
//! of a webhook followed through the worker's JSON log lines, its calls to Microsoft and
//! the spans it exports over OTLP (the `fulfillment work` binary as a child process).
//!
//! Every test process shares one metrics recorder, so the in-process assertions compare
//! a scrape after the scenario with one before it.

mod stack;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use marketplace_fulfillment::http::Application;
use marketplace_fulfillment::marketplace::{
    CallContext, MarketplaceClient, RetryPolicy, TokenProvider,
};
use marketplace_fulfillment::queue::{Broker, InboundMessage};
use marketplace_fulfillment::settings::WebhookAuth;
use marketplace_fulfillment::simulator::customer::ScriptedCustomer;
use marketplace_fulfillment::worker::MetricsListener;
use marketplace_fulfillment::world::wait_until;
use secrecy::SecretString;
use serde_json::{Value, json};
use stack::{Options, Purchase, Stack, TestDatabase};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use wiremock::matchers::{method, path, path_regex};
use wiremock::{Mock, MockServer, ResponseTemplate};

const SECRET: &str = "observability-test-secret";
const WAIT: Duration = Duration::from_secs(30);

// ---- Prometheus text ------------------------------------------------------------------

/// One scrape: `(name, labels) → value`.
#[derive(Debug, Default)]
struct Scrape {
    series: Vec<(String, BTreeMap<String, String>, f64)>,
    text: String,
}

impl Scrape {
    fn parse(text: &str) -> Self {
        let mut series = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (head, value) = line.rsplit_once(' ').expect("`series value`");
            let value: f64 = value.parse().expect("a number");
            let (name, labels) = match head.split_once('{') {
                Some((name, rest)) => (name, labels_of(rest.trim_end_matches('}'))),
                None => (head, BTreeMap::new()),
            };
            series.push((name.to_string(), labels, value));
        }
        Self {
            series,
            text: text.to_string(),
        }
    }

    /// The sum of the series of `name` whose labels include `labels`; `None` when there is
    /// no such series.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .series
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        (!matching.is_empty()).then(|| matching.iter().sum())
    }

    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }
}

fn labels_of(text: &str) -> BTreeMap<String, String> {
    // Our label values never hold `",` or escapes.
    text.split("\",")
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("key=value");
            (
                key.to_string(),
                value.trim_matches('"').trim_end_matches('"').to_string(),
            )
        })
        .collect()
}

async fn scrape(http: &reqwest::Client, address: SocketAddr) -> Scrape {
    let response = http
        .get(format!("http://{address}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    Scrape::parse(&response.text().await.unwrap())
}

/// The change of a series between two scrapes.
fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

/// Scrapes the worker until `name{labels}` has grown by `by` since `before`.
async fn wait_for_metric(
    stack: &Stack,
    metrics: SocketAddr,
    before: &Scrape,
    (name, labels): (&str, &[(&str, &str)]),
    by: f64,
) {
    stack
        .wait_for(&format!("{name}{labels:?} to grow by {by}"), || async {
            let now = scrape(&stack.http, metrics).await;
            (delta(before, &now, name, labels) >= by).then_some(())
        })
        .await;
}

#[tokio::test]
async fn ingress_and_worker_metrics_tell_the_story_of_a_lifecycle() {
    // An ACK window long enough that an auto-accept cannot pass for our ACK.
    let mut system = Stack::start(Options {
        ack_window: Duration::from_secs(5),
        ..Options::default()
    })
    .await;
    let localhost = "127.0.0.1:0".parse().unwrap();
    let (pool, broker) = (system.pool.clone(), system.broker.clone());
    let listener = MetricsListener::bind(localhost, pool, broker)
        .await
        .unwrap();
    let metrics = listener.local_addr();
    tokio::spawn(listener.run_until_stopped(CancellationToken::new()));
    let before = scrape(&system.http, metrics).await;
    let ingress_before = scrape(&system.http, system.ingress.unwrap()).await;

    // Purchase, landing page, automatic activation.
    let Purchase { id, landing, .. } = system.buy("silver", None, false).await;
    let page = ScriptedCustomer::new("customer")
        .unwrap()
        .activate(&landing, &[])
        .await
        .unwrap();
    assert_eq!(page.status, 200);
    system
        .wait_for_view(id, "Subscribed", Some("silver"), None)
        .await;

    // A customer plan change, acknowledged inside the window.
    let plan_change = system
        .act(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let operation = system
        .admin
        .wait_for_operation(id, &plan_change, stack::WAIT)
        .await
        .unwrap();
    assert_eq!(operation["status"], "Succeeded");
    system
        .wait_for_view(id, "Subscribed", Some("gold"), None)
        .await;
    system.run_until_idle(stack::WAIT).await.unwrap();

    // A plan change Microsoft auto-accepts: no worker runs until the window has passed,
    // so our ACK comes back 409.
    system.stop_workers().await.unwrap();
    let late = system
        .act(id, json!({"action": "ChangePlan", "planId": "silver"}))
        .await;
    system.wait_for_delivery(id, &late).await;
    let operation = system
        .admin
        .wait_for_operation(id, &late, stack::WAIT)
        .await
        .unwrap();
    assert_eq!(operation["status"], "Succeeded");
    system.start_worker().await;
    let auto_accepted = (
        "fulfillment_auto_accepted_total",
        &[("action", "ChangePlan")][..],
    );
    wait_for_metric(&system, metrics, &before, auto_accepted, 1.0).await;
    system
        .wait_for_view(id, "Subscribed", Some("silver"), None)
        .await;

    // A poison message: dead-lettered.
    let poison = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: r#"{"id":"not-a-uuid","action":"Suspend"}"#.into(),
    };
    system.publish(&poison, "poison", None).await;
    let dead_letters = (
        "fulfillment_dead_letters_total",
        &[("reason", "untranslatable")][..],
    );
    wait_for_metric(&system, metrics, &before, dead_letters, 1.0).await;
    system.run_until_idle(stack::WAIT).await.unwrap();

    let after = scrape(&system.http, metrics).await;
    let d = |name: &str, labels: &[(&str, &str)]| delta(&before, &after, name, labels);
    let text = &after.text;

    // Events through the machine and the one activation.
    let events = "fulfillment_events_total";
    for action in [
        "PurchaseResolved",
        "ActivationConfirmed",
        "WebhookChangePlan",
    ] {
        assert!(
            d(events, &[("action", action), ("outcome", "applied")]) >= 1.0,
            "{action}:\n{text}"
        );
    }
    assert_eq!(
        d(
            events,
            &[("action", "PurchaseResolved"), ("outcome", "applied")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        d(
            events,
            &[("action", "WebhookChangePlan"), ("outcome", "applied")]
        ),
        2.0,
        "{text}"
    );
    assert!(d(events, &[("outcome", "applied")]) >= 4.0, "{text}");
    assert_eq!(
        d(
            events,
            &[("action", "webhook"), ("outcome", "dead_lettered")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        d(
            "fulfillment_transitions_total",
            &[("from", "PendingFulfillment"), ("to", "Subscribed")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        d("fulfillment_transitions_total", &[("to", "Suspended")]),
        0.0,
        "{text}"
    );

    // Calls to Microsoft, by endpoint and status.
    let requests = "marketplace_requests_total";
    assert_eq!(
        d(requests, &[("endpoint", "activate"), ("status", "200")]),
        1.0,
        "{text}"
    );
    assert_eq!(
        d(
            "marketplace_request_duration_seconds_count",
            &[("endpoint", "activate"), ("status", "200")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        d(requests, &[("endpoint", "resolve"), ("status", "200")]),
        // The signed-in page, the activation POST, the page after it.
        3.0,
        "the landing page's resolves: {text}"
    );
    assert_eq!(
        d(
            requests,
            &[("endpoint", "patch_operation"), ("status", "200")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        d(
            requests,
            &[("endpoint", "patch_operation"), ("status", "409")]
        ),
        1.0,
        "{text}"
    );
    assert!(
        d(
            requests,
            &[("endpoint", "get_subscription"), ("status", "200")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        d(requests, &[("endpoint", "entra_token"), ("status", "200")]) >= 1.0,
        "{text}"
    );

    // The ACKs: one in time, one auto-accepted by Microsoft.
    assert_eq!(
        d(
            "fulfillment_auto_accepted_total",
            &[("action", "ChangePlan")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        d("fulfillment_webhook_to_ack_seconds_count", &[]),
        2.0,
        "{text}"
    );
    for le in ["0.05", "10", "15", "30", "+Inf"] {
        assert!(
            after
                .get("fulfillment_webhook_to_ack_seconds_bucket", &[("le", le)])
                .is_some(),
            "no bucket le={le}:\n{text}"
        );
    }

    // Dead letters by class; the counters an alert needs exist before their first incident.
    assert_eq!(
        d(
            "fulfillment_dead_letters_total",
            &[("reason", "untranslatable")]
        ),
        1.0,
        "{text}"
    );
    for (name, labels) in [
        (
            "fulfillment_dead_letters_total",
            &[("reason", "retries_exhausted")][..],
        ),
        (
            "fulfillment_dead_letters_total",
            &[("reason", "effect_attempts_exhausted")][..],
        ),
        ("marketplace_token_refresh_failures_total", &[][..]),
        (
            "fulfillment_auto_accepted_total",
            &[("action", "ChangeQuantity")][..],
        ),
    ] {
        assert!(
            after.get(name, labels).is_some(),
            "{name}{labels:?}:\n{text}"
        );
    }

    // Nothing left in the outbox.
    assert_eq!(
        after.get("fulfillment_outbox_backlog", &[]),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        after.get("fulfillment_oldest_unprocessed_event_age_seconds", &[]),
        Some(0.0),
        "{text}"
    );

    // The ingress's own metrics.
    let ingress_after = scrape(&system.http, system.ingress.unwrap()).await;
    let di =
        |name: &str, labels: &[(&str, &str)]| delta(&ingress_before, &ingress_after, name, labels);
    assert!(
        di(
            "http_requests_total",
            &[("route", "/webhook"), ("method", "POST"), ("status", "200")]
        ) >= 2.0,
        "{}",
        ingress_after.text
    );
    assert!(
        di(
            "http_requests_total",
            &[("route", "/landing"), ("method", "GET"), ("status", "200")]
        ) >= 1.0,
        "{}",
        ingress_after.text
    );
    assert!(
        di(
            "http_request_duration_seconds_count",
            &[("route", "/webhook")]
        ) >= 2.0,
        "{}",
        ingress_after.text
    );
    assert!(
        di("publish_confirm_seconds_count", &[]) >= 3.0,
        "{}",
        ingress_after.text
    );

    // Probes of the worker listener.
    let healthz = system
        .http
        .get(format!("http://{}/healthz", metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    let readyz = system
        .http
        .get(format!("http://{}/readyz", metrics))
        .send()
        .await
        .unwrap();
    assert_eq!(readyz.status(), 200);

    system.finish().await;
}

#[tokio::test]
async fn retries_and_token_failures_are_counted() {
    let (db, pool) = TestDatabase::migrated().await;
    let sim = stack::simulator(|_| {}).await;
    let http = reqwest::Client::new();
    let broker = Broker::connect(&db.settings.amqp, "observability-test")
        .await
        .unwrap();
    let metrics = MetricsListener::bind("127.0.0.1:0".parse().unwrap(), pool, broker.clone())
        .await
        .unwrap();
    let address = metrics.local_addr();
    let stop = CancellationToken::new();
    tokio::spawn(metrics.run_until_stopped(stop.clone()));
    let before = scrape(&http, address).await;

    let mut settings = stack::simulator_settings(&sim, &[]).marketplace;

    // A wrong secret: the token cannot be fetched.
    settings.client_secret = Some(SecretString::from("wrong"));
    let refused = TokenProvider::new(&settings).unwrap();
    assert!(refused.token().await.is_err());

    // Microsoft answers 500 to everything: every attempt is counted, and each retry.
    settings.client_secret = Some(SecretString::from(stack::SIM_SECRET));
    let client = MarketplaceClient::new(&settings, TokenProvider::new(&settings).unwrap())
        .unwrap()
        .with_retry_policy(RetryPolicy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            max_attempts: 3,
            max_retry_after: Duration::from_millis(5),
            give_up_beyond_cap: false,
        });
    client
        .tokens()
        .token()
        .await
        .expect("a token before the faults");
    let response = http
        .put(sim.base_url().join("simulator/faults").unwrap())
        .json(&json!({"share5xx": 1.0}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let error = client
        .get_subscription(&CallContext::random(), Uuid::new_v4())
        .await
        .unwrap_err();
    assert!(error.is_retryable(), "{error}");

    let after = scrape(&http, address).await;
    let text = &after.text;
    assert!(
        delta(
            &before,
            &after,
            "marketplace_token_refresh_failures_total",
            &[]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        delta(
            &before,
            &after,
            "marketplace_requests_total",
            &[("endpoint", "entra_token"), ("status", "401")]
        ) + delta(
            &before,
            &after,
            "marketplace_requests_total",
            &[("endpoint", "entra_token"), ("status", "400")]
        ) >= 1.0,
        "{text}"
    );
    assert!(
        delta(
            &before,
            &after,
            "marketplace_requests_total",
            &[("endpoint", "get_subscription"), ("status", "500")]
        ) >= 3.0,
        "{text}"
    );
    assert!(
        delta(
            &before,
            &after,
            "marketplace_retries_total",
            &[("endpoint", "get_subscription")]
        ) >= 2.0,
        "{text}"
    );
    stop.cancel();
    broker.delete_topology().await.unwrap();
    broker.close().await;
    sim.shutdown().await.unwrap();
}

// ---- the trace of a webhook through a worker process ----------------------------------

/// Lines a child process wrote to stderr, collected by a thread.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(child: &mut Child) -> Self {
        let lines = Self::default();
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    async fn wait_for(&self, what: impl Fn(&Value) -> bool) -> Value {
        let lines = || {
            self.all()
                .into_iter()
                .filter_map(|l| serde_json::from_str(&l).ok())
        };
        let found = wait_until("a log line", WAIT, || async { lines().find(|v| what(v)) });
        (found.await).unwrap_or_else(|_| panic!("no such log line in:\n{}", self.all().join("\n")))
    }
}

/// Microsoft (Entra token, GET subscription, PATCH operation) and an OTLP collector.
async fn mock_microsoft(tenant: Uuid, subscription: Uuid) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{tenant}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer", "expires_in": 3600, "access_token": "test-token"
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/api/saas/subscriptions/{subscription}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "id": subscription,
            "name": "observed",
            "offerId": "contoso-analytics",
            "planId": "per-seat",
            "quantity": 5,
            "saasSubscriptionStatus": "Subscribed",
            "beneficiary": {"tenantId": Uuid::new_v4()},
            "purchaser": {"tenantId": Uuid::new_v4()},
        })))
        .mount(&server)
        .await;
    Mock::given(method("PATCH"))
        .and(path_regex(format!(
            "^/api/saas/subscriptions/{subscription}/operations/[0-9a-f-]+$"
        )))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/v1/traces"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&server)
        .await;
    server
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn a_webhooks_trace_id_is_on_every_worker_log_line_and_reaches_microsoft() {
    let (db, _pool) = TestDatabase::migrated().await;
    let tenant = Uuid::new_v4();
    let client_id = Uuid::new_v4();
    let subscription = Uuid::new_v4();
    let operation = Uuid::new_v4();
    let microsoft = mock_microsoft(tenant, subscription).await;
    let base: url::Url = microsoft.uri().parse().unwrap();

    // The ingress, in-process, without webhook authentication (the caller is this test).
    let mut settings = db.settings.clone();
    settings.marketplace.api_url = base.join("api").unwrap();
    settings.marketplace.entra_authority_url = base.clone();
    settings.marketplace.tenant_id = Some(tenant);
    settings.marketplace.client_id = Some(client_id);
    settings.marketplace.client_secret = Some(SecretString::from(SECRET));
    settings.ingress.webhook_auth = WebhookAuth::InsecureNone;
    settings.http.listen_addr = "127.0.0.1:0".parse().unwrap();
    let application = Application::build(settings.clone()).await.expect("ingress");
    let ingress = application.local_addr();
    let ingress_stop = CancellationToken::new();
    let server = tokio::spawn(application.run_until_stopped(ingress_stop.clone()));

    // The worker: the real binary, JSON logs on stderr, traces to the mock collector.
    let mut child = Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .arg("work")
        .env_remove("FULFILLMENT_CONFIG")
        .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .env_remove("OTEL_SERVICE_NAME")
        .env("DATABASE_URL", db.url().expose())
        .env("FULFILLMENT__AMQP__PREFIX", &db.settings.amqp.prefix)
        .env("MARKETPLACE_API_URL", settings.marketplace.api_url.as_str())
        .env("ENTRA_AUTHORITY_URL", base.as_str())
        .env("MARKETPLACE_TENANT_ID", tenant.to_string())
        .env("MARKETPLACE_CLIENT_ID", client_id.to_string())
        .env("MARKETPLACE_CLIENT_SECRET", SECRET)
        .env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .env("WORKER_METRICS_ADDR", "127.0.0.1:0")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", microsoft.uri())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start fulfillment work");
    let lines = Lines::collect(&mut child);
    let listening = lines
        .wait_for(|v| v["message"] == "worker metrics listening")
        .await;
    let metrics: SocketAddr = listening["address"].as_str().unwrap().parse().unwrap();
    lines.wait_for(|v| v["message"] == "worker started").await;

    // A webhook whose caller sends its trace context.
    let trace_id = Uuid::new_v4().simple().to_string();
    let caller_span = &Uuid::new_v4().simple().to_string()[..16];
    let traceparent = format!("00-{trace_id}-{caller_span}-01");
    let body = json!({
        "id": operation,
        "activityId": Uuid::new_v4(),
        "subscriptionId": subscription,
        "offerId": "contoso-analytics",
        "planId": "per-seat",
        "quantity": 8,
        "action": "ChangeQuantity",
        "status": "InProgress",
        "operationRequestSource": "Azure",
        "timeStamp": "2026-11-30T10:00:00.0000000Z",
    });
    let http = reqwest::Client::new();
    let answer = http
        .post(format!("http://{ingress}/webhook"))
        .header("traceparent", &traceparent)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    // The worker acknowledges the operation at "Microsoft".
    let acknowledged = lines
        .wait_for(|v| v["message"] == "operation acknowledged")
        .await;
    assert_eq!(
        acknowledged["trace_id"],
        trace_id.as_str(),
        "{acknowledged}"
    );
    assert_eq!(acknowledged["operation_id"], operation.to_string());
    assert_eq!(acknowledged["subscription_id"], subscription.to_string());

    // Its metrics listener.
    let worker_metrics = scrape(&http, metrics).await;
    let text = &worker_metrics.text;
    assert_eq!(
        worker_metrics.value(
            "marketplace_requests_total",
            &[("endpoint", "patch_operation"), ("status", "200")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        worker_metrics.value(
            "fulfillment_events_total",
            &[("action", "WebhookChangeQuantity"), ("outcome", "applied")]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        worker_metrics.value("fulfillment_webhook_to_ack_seconds_count", &[]),
        1.0,
        "{text}"
    );
    let ready = http
        .get(format!("http://{metrics}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // SIGTERM: the worker finishes, exports its spans and exits 0.
    let signalled = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(signalled.success());
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the worker did not stop:\n{}", lines.all().join("\n"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The reader thread may still hold the last lines.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let all = lines.all();
    assert!(status.success(), "{status}:\n{}", all.join("\n"));

    // Every stderr line is one JSON object; every line about the subscription or the
    // operation carries the webhook's trace id.
    let parsed: Vec<Value> = all
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let about_the_event: Vec<&Value> = parsed
        .iter()
        .filter(|v| {
            v["subscription_id"] == subscription.to_string()
                || v["operation_id"] == operation.to_string()
        })
        .collect();
    assert!(about_the_event.len() >= 3, "{}", all.join("\n"));
    for line in &about_the_event {
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
        assert!(line["correlation_id"].is_string(), "{line}");
        assert_eq!(line["subscription_id"], subscription.to_string(), "{line}");
    }
    assert!(
        about_the_event.iter().any(|v| v["message"] == "applied"),
        "{}",
        all.join("\n")
    );

    // The calls to Microsoft continue the trace under spans of the worker.
    let received = microsoft.received_requests().await.unwrap();
    let api_calls: Vec<_> = received
        .iter()
        .filter(|r| r.url.path().starts_with("/api/"))
        .collect();
    assert!(
        api_calls.iter().any(|r| r.method.as_str() == "PATCH"),
        "{api_calls:?}"
    );
    for call in &api_calls {
        let sent = call
            .headers
            .get("traceparent")
            .unwrap_or_else(|| panic!("no traceparent on {} {}", call.method, call.url))
            .to_str()
            .unwrap();
        assert!(
            sent.starts_with(&format!("00-{trace_id}-")),
            "{sent} on {}",
            call.url
        );
        assert!(!sent.contains(caller_span), "{sent}");
    }

    // The spans went to the OTLP collector, in the webhook's trace.
    let exported: Vec<_> = received
        .iter()
        .filter(|r| r.url.path() == "/v1/traces")
        .collect();
    assert!(!exported.is_empty(), "no OTLP export:\n{}", all.join("\n"));
    let wanted = hex_bytes(&trace_id);
    assert!(
        exported
            .iter()
            .any(|r| r.body.windows(16).any(|w| w == wanted.as_slice())),
        "no exported span in trace {trace_id}"
    );

    ingress_stop.cancel();
    let _ = server.await;
    let broker = Broker::connect(&db.settings.amqp, "observability-cleanup")
        .await
        .unwrap();
    broker.delete_topology().await.unwrap();
    broker.close().await;
}
