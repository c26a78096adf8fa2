//! System tests of the ingress (`fulfillment serve`) against real PostgreSQL and RabbitMQ
//! and the marketplace simulator, each test with its own database, RabbitMQ prefix and
//! simulator on port 0.

mod stack;

use std::collections::HashMap;
use std::time::Duration;

use fulfillment_state_machine::{SubscriptionId, SubscriptionMachine};
use marketplace_fulfillment::http::Application;
use marketplace_fulfillment::queue::{InboundConsumer, InboundDelivery, InboundMessage};
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::simulator::Timings;
use marketplace_fulfillment::simulator::customer::ScriptedCustomer;
use marketplace_fulfillment::world::{block_on_own_thread, rabbitmqctl, wait_until};
use reqwest::StatusCode;
use serde_json::{Value, json};
use stack::{Options, Purchase, Stack, TestDatabase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;
use uuid::Uuid;

const CLIENT_SECRET: &str = "s3cr3t-value";
const WAIT: Duration = Duration::from_secs(10);

/// The world without a worker: the ingress alone takes webhooks and landing pages.
async fn spawn_app() -> Stack {
    spawn_app_with(Options::default()).await
}

async fn spawn_app_with(options: Options) -> Stack {
    Stack::start(Options {
        workers: 0,
        ..options
    })
    .await
}

/// A subscription row whose stored machine agrees with its state (commands are decided
/// against the machine before they are queued).
async fn insert_subscription(app: &Stack, row: Row) {
    let mut machine = SubscriptionMachine::new(SubscriptionId::parse(&row.id.to_string()).unwrap());
    use fulfillment_state_machine::{
        ActivationMode, Event, MarketplaceStatus, OfferId, PlanId, Policy, Quantity, Snapshot,
    };
    let now = time::OffsetDateTime::now_utc();
    let policy = Policy {
        activation: ActivationMode::Manual,
        ..Policy::default()
    };
    if matches!(row.state, "PendingFulfillment" | "Subscribed") {
        let mut snapshot = Snapshot::with_status(MarketplaceStatus::PendingFulfillmentStart);
        snapshot.offer_id = OfferId::parse(row.offer).ok();
        snapshot.plan_id = PlanId::parse(row.plan).ok();
        snapshot.quantity = row
            .quantity
            .and_then(|q| u32::try_from(q).ok())
            .and_then(|q| Quantity::new(q).ok());
        machine.handle(
            &Event::PurchaseResolved {
                snapshot,
                resolved_at: now,
            },
            now,
            &policy,
        );
    }
    if row.state == "Subscribed" {
        machine.handle(
            &Event::ActivationConfirmed {
                term: None,
                confirmed_at: now,
            },
            now,
            &policy,
        );
    }
    sqlx::query(
        "INSERT INTO subscriptions (id, offer_id, plan_id, quantity, state, \
         beneficiary_tenant_id, purchaser_tenant_id, machine) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(row.id)
    .bind(row.offer)
    .bind(row.plan)
    .bind(row.quantity)
    .bind(row.state)
    .bind(row.beneficiary)
    .bind(row.beneficiary)
    .bind(serde_json::to_value(&machine).unwrap())
    .execute(&app.pool)
    .await
    .unwrap();
}

struct Row {
    id: Uuid,
    offer: &'static str,
    plan: &'static str,
    quantity: Option<i32>,
    state: &'static str,
    beneficiary: Uuid,
}

fn webhook_body(action: &str) -> (Uuid, Uuid, String) {
    let id = Uuid::new_v4();
    let subscription = Uuid::new_v4();
    // Spacing and field order as a sender might produce them: must arrive byte for byte.
    let body = format!(
        "{{\"id\": \"{id}\",\n \"activityId\":\"{}\", \"subscriptionId\":\"{subscription}\", \
         \"action\":\"{action}\", \"timeStamp\":\"2025-03-10T16:34:41.1370170Z\", \
         \"status\":\"Succeeded\", \"futureField\": {{\"x\": [1, 2]}}}}",
        Uuid::new_v4()
    );
    (id, subscription, body)
}

async fn next_delivery(consumer: &mut InboundConsumer) -> InboundDelivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a message arrives")
        .expect("the consumer is open")
        .expect("the delivery is readable")
}

async fn assert_no_more(consumer: &mut InboundConsumer) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(700), consumer.next()).await
    {
        panic!("unexpected extra message: {:?}", extra.map(|d| d.meta));
    }
}

async fn json_body(response: reqwest::Response) -> Value {
    response.json().await.unwrap()
}

// ---------------------------------------------------------------------------------------
// Webhook

#[tokio::test]
async fn a_signed_webhook_is_accepted_and_queued_exactly_once_byte_for_byte() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let (id, subscription, body) = webhook_body("Suspend");
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    let response = app
        .http
        .post(app.url("/webhook"))
        .bearer_auth(app.sim.mint_webhook_token(json!({})).unwrap())
        .header("content-type", "application/json")
        .header("traceparent", traceparent)
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().contains_key("x-request-id"));

    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, id.to_string());
    assert_eq!(delivery.meta.subscription_id, Some(subscription));
    assert_eq!(delivery.meta.traceparent.as_deref(), Some(traceparent));
    assert_eq!(
        delivery.headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    match delivery.message.as_ref().unwrap() {
        InboundMessage::Webhook { payload, .. } => assert_eq!(payload.as_bytes(), body.as_bytes()),
        other => panic!("{other:?}"),
    }
    delivery.ack().await.unwrap();
    assert_no_more(&mut consumer).await;
    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn a_webhook_without_traceparent_gets_a_new_one_and_activity_id_correlates() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let (_, _, body) = webhook_body("Renew");
    let activity: Value = serde_json::from_str(&body).unwrap();
    let response = app
        .post_webhook(Some(&app.sim.mint_webhook_token(json!({})).unwrap()), body)
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let delivery = next_delivery(&mut consumer).await;
    let traceparent = delivery.meta.traceparent.clone().expect("a traceparent");
    assert!(
        traceparent.starts_with("00-") && traceparent.len() == 55,
        "{traceparent}"
    );
    assert_eq!(
        delivery.meta.correlation_id,
        activity["activityId"].as_str().unwrap()
    );
    delivery.ack().await.unwrap();
    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn webhooks_without_a_valid_token_are_refused_with_the_reason() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let (_, _, body) = webhook_body("Suspend");

    let response = app.post_webhook(None, body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let error = json_body(response).await;
    assert_eq!(error["error"], "unauthorized");
    assert_eq!(error["reason"], "missing");

    let wrong_audience = app
        .sim
        .mint_webhook_token(json!({ "aud": Uuid::new_v4().to_string() }))
        .unwrap();
    // Microsoft's genuine token for an audience we do not list: our configuration is
    // wrong, not the call (503, see `failures_of_our_own_side_answer_503_…`).
    let response = app.post_webhook(Some(&wrong_audience), body.clone()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        json_body(response).await["message"]
            .as_str()
            .unwrap()
            .contains("wrong_audience")
    );

    let wrong_app = app
        .sim
        .mint_webhook_token(json!({ "azp": Uuid::new_v4().to_string() }))
        .unwrap();
    let response = app.post_webhook(Some(&wrong_app), body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_body(response).await["reason"], "wrong_app");

    let response = app.post_webhook(Some("not-a-jwt"), body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_body(response).await["reason"], "malformed");

    // Nothing refused reached the queue, and the refusals are counted.
    assert_no_more(&mut consumer).await;
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("jwt_rejections_total")
                && l.contains("reason=\"wrong_audience\"")),
        "{metrics}"
    );
    // The keys were fetched to check the tokens, and the fetch is timed.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("jwks_fetch_seconds_count{outcome=\"ok\"}")),
        "{metrics}"
    );
    consumer.cancel().await;
    app.finish().await;
}

/// Microsoft reads any 4xx to a ChangePlan/ChangeQuantity webhook as our rejection of the
/// customer's change (docs/marketplace.md §15.5). So each refusal is classed by whose fault
/// it is: the caller's (no or a forged token, another tenant or application, an expired
/// token, a body that is not a webhook) is a 4xx; ours (our clock, our audience list, our
/// body limit; the JWKS and the broker are covered by their own tests) is a 503 with
/// `Retry-After`, so Microsoft redelivers. Nothing refused reaches the queue.
#[tokio::test]
async fn failures_of_our_own_side_answer_503_and_the_callers_4xx() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let (_, _, body) = webhook_body("ChangePlan");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = |claims: Value| app.sim.mint_webhook_token(claims).unwrap();
    let foreign_app = Uuid::new_v4().to_string();
    let cases: Vec<(&str, Option<String>, String, StatusCode, &str)> = vec![
        // The caller's.
        (
            "no token",
            None,
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "missing",
        ),
        (
            "not a JWT",
            Some("not-a-jwt".into()),
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "malformed",
        ),
        (
            "another tenant",
            Some(token(json!({ "tid": Uuid::new_v4().to_string() }))),
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "wrong_tenant",
        ),
        (
            "another application, and another audience",
            Some(token(json!({ "azp": foreign_app, "aud": foreign_app }))),
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "wrong_app",
        ),
        (
            "an expired token (a replay)",
            Some(token(json!({ "nbf": now - 7200, "exp": now - 3600 }))),
            body.clone(),
            StatusCode::UNAUTHORIZED,
            "expired",
        ),
        (
            "a body that is not a webhook",
            Some(app.sim.mint_webhook_token(json!({})).unwrap()),
            "{\"id\": 1}".into(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Ours.
        (
            "a genuine token for an audience we do not list",
            Some(token(json!({ "aud": Uuid::new_v4().to_string() }))),
            body.clone(),
            StatusCode::SERVICE_UNAVAILABLE,
            "wrong_audience",
        ),
        (
            "a genuine token our clock says is not valid yet",
            Some(token(json!({ "nbf": now + 3600, "exp": now + 7200 }))),
            body.clone(),
            StatusCode::SERVICE_UNAVAILABLE,
            "not_yet_valid",
        ),
        (
            "a body over our limit",
            Some(app.sim.mint_webhook_token(json!({})).unwrap()),
            body.replacen(
                '{',
                &format!("{{\"padding\":\"{}\",", "x".repeat(65 * 1024)),
                1,
            ),
            StatusCode::SERVICE_UNAVAILABLE,
            "WEBHOOK_BODY_LIMIT_BYTES",
        ),
    ];
    for (case, token, body, status, says) in cases {
        let response = app.post_webhook(token.as_deref(), body).await;
        assert_eq!(response.status(), status, "{case}");
        let retry_after = response.headers().get("retry-after").cloned();
        let answer = json_body(response).await;
        assert!(answer.to_string().contains(says), "{case}: {answer}");
        assert_eq!(
            retry_after.is_some(),
            status == StatusCode::SERVICE_UNAVAILABLE,
            "{case}: Retry-After on the 503s only"
        );
    }
    assert_no_more(&mut consumer).await;
    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn malformed_incomplete_and_oversized_webhooks_are_refused_and_unknown_actions_accepted() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let token = app.sim.mint_webhook_token(json!({})).unwrap();

    let response = app.post_webhook(Some(&token), "{\"id\": ").await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let error = json_body(response).await;
    assert_eq!(error["error"], "bad_request");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON"),
        "{error}"
    );

    let missing = json!({ "id": Uuid::new_v4(), "action": "Suspend" }).to_string();
    let response = app.post_webhook(Some(&token), missing).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(
        json_body(response).await["message"]
            .as_str()
            .unwrap()
            .contains("subscriptionId")
    );

    let bad_guid = json!({ "id": "42", "subscriptionId": Uuid::new_v4(), "action": "Suspend" });
    let response = app.post_webhook(Some(&token), bad_guid.to_string()).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let (_, _, small) = webhook_body("Suspend");
    let padding = "x".repeat(65 * 1024);
    let oversized = small.replacen('{', &format!("{{\"padding\":\"{padding}\","), 1);
    // Authenticated, so Microsoft: over our limit is our configuration (503 naming it).
    let response = app.post_webhook(Some(&token), oversized).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        json_body(response).await["message"]
            .as_str()
            .unwrap()
            .contains("WEBHOOK_BODY_LIMIT_BYTES")
    );

    let (id, _, unknown) = webhook_body("Teleport");
    let response = app.post_webhook(Some(&token), unknown.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, id.to_string());
    assert!(!delivery.body.is_empty());
    delivery.ack().await.unwrap();
    assert_no_more(&mut consumer).await;

    consumer.cancel().await;
    app.finish().await;
}

async fn create_vhost(vhost: &str) {
    rabbitmqctl(&["add_vhost", vhost]).await.unwrap();
    rabbitmqctl(&["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"])
        .await
        .unwrap();
}

/// Removes the test vhost even when an assertion fails.
struct VhostGuard(String);

impl Drop for VhostGuard {
    fn drop(&mut self) {
        let vhost = self.0.clone();
        let _ = block_on_own_thread(async move { rabbitmqctl(&["delete_vhost", &vhost]).await });
    }
}

#[tokio::test]
async fn a_broker_outage_answers_503_then_the_same_process_recovers() {
    let vhost = format!("test-{}", &Uuid::new_v4().simple().to_string()[..12]);
    create_vhost(&vhost).await;
    let _guard = VhostGuard(vhost.clone());
    let app = spawn_app_with(Options {
        env: vec![
            (
                "AMQP_URL",
                format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
            ),
            (
                "FULFILLMENT__INGRESS__PUBLISH_CONFIRM_TIMEOUT_MS",
                "2000".to_string(),
            ),
        ],
        ..Options::default()
    })
    .await;
    let token = app.sim.mint_webhook_token(json!({})).unwrap();
    let (_, _, body) = webhook_body("Suspend");
    assert_eq!(
        app.post_webhook(Some(&token), body.clone()).await.status(),
        StatusCode::OK
    );

    // Outage: the vhost disappears, its connections are closed and cannot come back.
    rabbitmqctl(&["delete_vhost", &vhost]).await.unwrap();
    let (_, _, during) = webhook_body("Suspend");
    let response = app.post_webhook(Some(&token), during).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(response.headers()["retry-after"], "5");
    let error = json_body(response).await;
    assert_eq!(error["error"], "unavailable");
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let ready = json_body(ready).await;
    assert_eq!(ready["unavailable"], json!(["rabbitmq"]), "{ready}");

    // The broker is back: the same process accepts again within some seconds.
    create_vhost(&vhost).await;
    wait_until(
        "the ingress to recover",
        Duration::from_secs(90),
        || async {
            let (_, _, after) = webhook_body("Suspend");
            let answer = app.post_webhook(Some(&token), after).await.status();
            (answer == StatusCode::OK).then_some(())
        },
    )
    .await
    .unwrap();
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);

    let mut app = app;
    tokio::time::timeout(WAIT, app.stop_ingress().unwrap())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Deleting the vhost (the guard) removes its queues and exchanges.
    app.finish().await;
}

#[tokio::test]
async fn startup_fails_naming_the_unreachable_dependency() {
    let (db, _pool) = TestDatabase::migrated().await;
    let mut env: HashMap<String, String> = std::env::vars().collect();
    env.insert("DATABASE_URL".into(), db.url().expose().to_string());
    env.insert(
        "AMQP_URL".into(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
    );
    env.insert("LISTEN_ADDR".into(), "127.0.0.1:0".into());
    env.insert("MARKETPLACE_TENANT_ID".into(), Uuid::new_v4().to_string());
    env.insert("MARKETPLACE_CLIENT_ID".into(), Uuid::new_v4().to_string());
    env.insert("MARKETPLACE_CLIENT_SECRET".into(), CLIENT_SECRET.into());
    let settings = Settings::from_sources(None, &env).unwrap();
    let error = Application::build(settings).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("cannot connect to RabbitMQ at amqp://guest:***@127.0.0.1:1/%2f"),
        "{message}"
    );

    env.insert(
        "DATABASE_URL".into(),
        "postgres://postgres@127.0.0.1:1/fulfillment".into(),
    );
    let settings = Settings::from_sources(None, &env).unwrap();
    let error = Application::build(settings).await.unwrap_err();
    let message = format!("{error:#}");
    assert!(
        message.contains("cannot reach PostgreSQL at postgres://postgres@127.0.0.1:1/fulfillment"),
        "{message}"
    );
}

// ---------------------------------------------------------------------------------------
// Landing page

fn customer() -> ScriptedCustomer {
    ScriptedCustomer::new("customer").unwrap()
}

#[tokio::test]
async fn the_landing_page_shows_a_signed_in_customer_the_purchase_and_queues_it_only_when_asked() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let Purchase {
        id: subscription,
        token,
        landing,
        ..
    } = app.buy("silver", None, false).await;
    assert!(token.contains('+') && token.contains('/'), "{token}");

    // The simulator's landing link, with its percent-encoded token, pointed at us.
    let url = Url::parse(&format!(
        "{}?{}",
        app.url("/landing"),
        landing.query().unwrap()
    ))
    .unwrap();
    assert!(url.as_str().contains("%2B"), "{url}");
    let customer = customer();
    let page = customer.open(&url).await.unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.html);
    for expected in [
        "Welcome to",
        "Silver",
        "Not active yet",
        "id=\"activate-form\"",
        &subscription.to_string(),
    ] {
        assert!(
            page.html.contains(expected),
            "{expected} missing from {}",
            page.html
        );
    }
    // Signing in and looking queued nothing: only the form's POST does.
    assert_no_more(&mut consumer).await;

    let page = customer.activate(&url, &[]).await.unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.html);
    assert!(page.html.contains("Activation pending"), "{}", page.html);
    assert!(
        page.html.contains("http-equiv=\"refresh\""),
        "{}",
        page.html
    );
    let delivery = next_delivery(&mut consumer).await;
    assert!(
        delivery
            .meta
            .message_id
            .starts_with(&format!("resolve:{subscription}:")),
        "{}",
        delivery.meta.message_id
    );
    assert_eq!(delivery.meta.subscription_id, Some(subscription));
    match delivery.message.as_ref().unwrap() {
        InboundMessage::PurchaseResolved {
            subscription: json, ..
        } => {
            let resolved: Value = serde_json::from_str(json).unwrap();
            assert_eq!(resolved["id"], subscription.to_string());
            assert_eq!(resolved["planId"], "silver");
        }
        other => panic!("{other:?}"),
    }
    delivery.ack().await.unwrap();

    // A token with a raw, unencoded `+` (a careless proxy) still resolves: never decoded twice.
    let raw = Url::parse(&format!(
        "{}?token={}",
        app.url("/landing"),
        token.replace('/', "%2F").replace('=', "%3D")
    ))
    .unwrap();
    let page = customer.open(&raw).await.unwrap();
    assert_eq!(page.status, StatusCode::OK, "{}", page.html);
    assert!(page.html.contains("Welcome to"), "{}", page.html);

    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn the_landing_page_shows_our_state_when_we_know_the_subscription() {
    let app = spawn_app().await;
    let Purchase {
        id: subscription,
        token,
        ..
    } = app.buy("per-seat", Some(5), false).await;
    insert_subscription(
        &app,
        Row {
            id: subscription,
            offer: "contoso-analytics",
            plan: "per-seat",
            quantity: Some(5),
            state: "Subscribed",
            beneficiary: Uuid::new_v4(),
        },
    )
    .await;
    let mut url = Url::parse(&app.url("/landing")).unwrap();
    url.query_pairs_mut().append_pair("token", &token);
    let page = customer().open(&url).await.unwrap();
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.html.contains("Welcome back"), "{}", page.html);
    assert!(!page.html.contains("Activation pending"), "{}", page.html);
    assert!(!page.html.contains("activate-form"), "{}", page.html);
    app.finish().await;
}

#[tokio::test]
async fn manual_activation_says_the_publisher_activates() {
    let app = spawn_app_with(Options {
        env: vec![("ACTIVATION_MODE", "manual".to_string())],
        ..Options::default()
    })
    .await;
    let Purchase { token, .. } = app.buy("silver", None, false).await;
    let mut url = Url::parse(&app.url("/landing")).unwrap();
    url.query_pairs_mut().append_pair("token", &token);
    let page = customer().activate(&url, &[]).await.unwrap();
    assert!(page.html.contains("Activation pending"), "{}", page.html);
    assert!(
        page.html.contains("Your purchase is confirmed"),
        "{}",
        page.html
    );
    assert!(
        page.html.contains("Billing starts only then"),
        "{}",
        page.html
    );
    app.finish().await;
}

#[tokio::test]
async fn missing_invalid_and_expired_tokens_get_a_helpful_page() {
    let app = spawn_app_with(Options {
        simulator: |config| {
            config.timings = Timings {
                token_ttl: Duration::from_millis(300),
                ..Timings::fast()
            }
        },
        ..Options::default()
    })
    .await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();

    let response = app.http.get(app.url("/landing")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let page = response.text().await.unwrap();
    assert!(page.contains("missing its purchase token"), "{page}");
    assert!(page.contains("click Configure account"), "{page}");

    let customer = customer();
    let mut url = Url::parse(&app.url("/landing")).unwrap();
    url.query_pairs_mut()
        .append_pair("token", "bm90LWEtcmVhbC10b2tlbg+/<script>");
    let page = customer.open(&url).await.unwrap();
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(
        page.html.contains("expired or is not valid"),
        "{}",
        page.html
    );
    assert!(
        page.html.contains("Azure portal or Microsoft 365"),
        "{}",
        page.html
    );
    assert!(page.html.contains("Configure account"), "{}", page.html);
    assert!(!page.html.contains("<script>"), "{}", page.html);

    let Purchase { token, .. } = app.buy("silver", None, false).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut url = Url::parse(&app.url("/landing")).unwrap();
    url.query_pairs_mut().append_pair("token", &token);
    let page = customer.open(&url).await.unwrap();
    assert_eq!(page.status, StatusCode::BAD_REQUEST);
    assert!(page.html.contains("expired"), "{}", page.html);
    assert!(page.html.contains("Configure account"), "{}", page.html);

    // Nothing was queued for refused tokens.
    assert_no_more(&mut consumer).await;
    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn microsoft_failing_gives_a_retry_in_a_minute_page() {
    let app = spawn_app().await;
    let Purchase { token, .. } = app.buy("silver", None, false).await;
    let mut url = Url::parse(&app.url("/landing")).unwrap();
    url.query_pairs_mut().append_pair("token", &token);
    let customer = customer();
    assert_eq!(customer.open(&url).await.unwrap().status, StatusCode::OK);
    let faults = app
        .http
        .put(app.sim.base_url().join("simulator/faults").unwrap())
        .json(&json!({ "share5xx": 1.0 }))
        .send()
        .await
        .unwrap();
    assert!(faults.status().is_success(), "{}", faults.status());
    let page = customer.open(&url).await.unwrap();
    assert_eq!(page.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(page.html.contains("retry in a minute"), "{}", page.html);
    app.finish().await;
}

// ---------------------------------------------------------------------------------------
// Entitlement API

#[tokio::test]
async fn the_entitlement_api_refuses_missing_and_wrong_keys() {
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url("/api/v1/subscriptions"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let response = app
        .http
        .get(app.url("/api/v1/subscriptions"))
        .bearer_auth("entitlement-k3z")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(json_body(response).await["reason"], "invalid");
    let response = app
        .http
        .post(app.url(&format!("/api/v1/subscriptions/{}/cancel", Uuid::new_v4())))
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    app.finish().await;
}

#[tokio::test]
async fn an_unknown_or_malformed_command_id_is_refused_with_the_reason() {
    let app = spawn_app().await;
    let response = app
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/commands/{}", Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let response = app
        .api(reqwest::Method::GET, "/api/v1/commands/not-a-uuid")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let response = app
        .http
        .get(app.url(&format!("/api/v1/commands/{}", Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    app.finish().await;
}

#[tokio::test]
async fn without_a_configured_key_every_api_call_is_refused() {
    let app = spawn_app_with(Options {
        env: vec![("ENTITLEMENT_API_KEY", String::new())],
        ..Options::default()
    })
    .await;
    let response = app
        .api(reqwest::Method::GET, "/api/v1/subscriptions")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let error = json_body(response).await;
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("not configured"),
        "{error}"
    );
    app.finish().await;
}

#[tokio::test]
async fn subscriptions_can_be_read_filtered_and_paged() {
    let app = spawn_app().await;
    let tenant = Uuid::new_v4();
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = Uuid::new_v4();
        ids.push(id);
        insert_subscription(
            &app,
            Row {
                id,
                offer: if i < 3 {
                    "contoso-analytics"
                } else {
                    "contoso-seats"
                },
                plan: "silver",
                quantity: (i >= 3).then_some(10),
                state: if i % 2 == 0 {
                    "Subscribed"
                } else {
                    "PendingFulfillment"
                },
                beneficiary: if i == 0 { tenant } else { Uuid::new_v4() },
            },
        )
        .await;
    }
    ids.sort();

    let one = app
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/subscriptions/{}", ids[0]),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(one.status(), StatusCode::OK);
    let one = json_body(one).await;
    assert_eq!(one["id"], ids[0].to_string());
    assert_eq!(one["planId"], "silver");
    assert_eq!(one["version"], 1);
    for field in [
        "state",
        "offerId",
        "quantity",
        "term",
        "beneficiaryTenantId",
        "purchaserTenantId",
        "updatedAt",
    ] {
        assert!(one.get(field).is_some(), "{field} missing from {one}");
    }

    let unknown = app
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/subscriptions/{}", Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(json_body(unknown).await["error"], "not_found");
    let bad = app
        .api(reqwest::Method::GET, "/api/v1/subscriptions/not-a-guid")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);

    // Paging: 2 + 2 + 1, in id order, no duplicates.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/api/v1/subscriptions?limit=2".to_string();
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let page = json_body(app.api(reqwest::Method::GET, &path).send().await.unwrap()).await;
        pages += 1;
        for item in page["subscriptions"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().parse::<Uuid>().unwrap());
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    let filtered = json_body(
        app.api(
            reqwest::Method::GET,
            "/api/v1/subscriptions?state=Subscribed&offerId=contoso-analytics",
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(
        filtered["subscriptions"].as_array().unwrap().len(),
        2,
        "{filtered}"
    );
    let by_tenant = json_body(
        app.api(
            reqwest::Method::GET,
            &format!("/api/v1/subscriptions?beneficiaryTenantId={tenant}"),
        )
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(by_tenant["subscriptions"].as_array().unwrap().len(), 1);
    assert_eq!(by_tenant["nextCursor"], Value::Null);

    for bad in [
        "state=Active",
        "limit=0",
        "limit=501",
        "cursor=zzz",
        "beneficiaryTenantId=x",
    ] {
        let response = app
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/subscriptions?{bad}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    app.finish().await;
}

#[tokio::test]
async fn commands_are_validated_queued_and_answered_202() {
    let app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let id = Uuid::new_v4();
    insert_subscription(
        &app,
        Row {
            id,
            offer: "contoso-seats",
            plan: "per-user",
            quantity: Some(5),
            state: "Subscribed",
            beneficiary: Uuid::new_v4(),
        },
    )
    .await;

    // Activation is asked for a purchase not yet active (the machine ignores it for an
    // active one, and the API then refuses it at once).
    let pending = Uuid::new_v4();
    insert_subscription(
        &app,
        Row {
            id: pending,
            offer: "contoso-seats",
            plan: "per-user",
            quantity: Some(5),
            state: "PendingFulfillment",
            beneficiary: Uuid::new_v4(),
        },
    )
    .await;
    let cases: [(&str, Option<Value>, &str, Uuid); 4] = [
        ("activate", None, "activate", pending),
        (
            "change-plan",
            Some(json!({ "planId": "gold" })),
            "change_plan",
            id,
        ),
        (
            "change-quantity",
            Some(json!({ "quantity": 12 })),
            "change_quantity",
            id,
        ),
        ("cancel", None, "cancel", id),
    ];
    for (path, body, kind, id) in cases {
        let mut request = app.api(
            reqwest::Method::POST,
            &format!("/api/v1/subscriptions/{id}/{path}"),
        );
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::ACCEPTED, "{path}");
        let accepted = json_body(response).await;
        let command_id: Uuid = accepted["commandId"].as_str().unwrap().parse().unwrap();
        // Its outcome can be asked for at once: queued until a worker decides.
        let response = app
            .api(
                reqwest::Method::GET,
                &format!("/api/v1/commands/{command_id}"),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let outcome = json_body(response).await;
        assert_eq!(outcome["status"], "queued", "{outcome}");
        assert_eq!(outcome["command"], kind, "{outcome}");
        assert_eq!(outcome["subscriptionId"], id.to_string(), "{outcome}");

        let delivery = next_delivery(&mut consumer).await;
        assert_eq!(delivery.meta.message_id, command_id.to_string());
        match delivery.message.as_ref().unwrap() {
            InboundMessage::Command {
                command_id: queued,
                subscription_id,
                command,
                requested_by,
                ..
            } => {
                assert_eq!(*queued, command_id);
                assert_eq!(*subscription_id, id);
                assert_eq!(requested_by, "api");
                let json = serde_json::to_value(command).unwrap();
                assert_eq!(json["kind"], kind);
            }
            other => panic!("{other:?}"),
        }
        delivery.ack().await.unwrap();
    }

    let bad_bodies = [
        ("change-plan", "{}"),
        ("change-plan", "{\"planId\": \"  \"}"),
        ("change-plan", "not json"),
        ("change-quantity", "{\"quantity\": 0}"),
        ("change-quantity", "{\"quantity\": \"ten\"}"),
        ("change-quantity", "{\"quantity\": 1.5}"),
    ];
    for (path, body) in bad_bodies {
        let response = app
            .api(
                reqwest::Method::POST,
                &format!("/api/v1/subscriptions/{id}/{path}"),
            )
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path} {body}");
        assert_eq!(json_body(response).await["error"], "bad_request");
    }
    let unknown = app
        .api(
            reqwest::Method::POST,
            &format!("/api/v1/subscriptions/{}/cancel", Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    let not_guid = app
        .api(reqwest::Method::POST, "/api/v1/subscriptions/nope/activate")
        .send()
        .await
        .unwrap();
    assert_eq!(not_guid.status(), StatusCode::BAD_REQUEST);

    assert_no_more(&mut consumer).await;
    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn the_openapi_document_parses_and_lists_every_path() {
    let app = spawn_app().await;
    let response = app
        .http
        .get(app.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let document: Value = response.json().await.unwrap();
    assert!(document["openapi"].as_str().unwrap().starts_with("3.0"));
    let paths = document["paths"].as_object().unwrap();
    for path in [
        "/api/v1/subscriptions",
        "/api/v1/subscriptions/{id}",
        "/api/v1/subscriptions/{id}/activate",
        "/api/v1/subscriptions/{id}/change-plan",
        "/api/v1/subscriptions/{id}/change-quantity",
        "/api/v1/subscriptions/{id}/cancel",
        "/api/v1/commands/{id}",
    ] {
        assert!(paths.contains_key(path), "{path} missing");
    }
    app.finish().await;
}

// ---------------------------------------------------------------------------------------
// Probes, metrics, shutdown

#[tokio::test]
async fn probes_and_metrics_report() {
    let app = spawn_app().await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "ok");
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(json_body(ready).await["status"], "ready");

    let (_, _, body) = webhook_body("Renew");
    assert_eq!(
        app.post_webhook(Some(&app.sim.mint_webhook_token(json!({})).unwrap()), body)
            .await
            .status(),
        StatusCode::OK
    );
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), StatusCode::OK);
    let text = metrics.text().await.unwrap();
    let has = |name: &str, needle: &str| {
        text.lines()
            .any(|l| l.starts_with(name) && l.contains(needle))
    };
    assert!(has("http_requests_total{", "route=\"/webhook\""), "{text}");
    assert!(has("http_requests_total{", "status=\"200\""), "{text}");
    assert!(
        has(
            "http_request_duration_seconds_bucket{",
            "route=\"/webhook\""
        ),
        "{text}"
    );
    assert!(
        has("publish_confirm_seconds_bucket{", "outcome=\"confirmed\""),
        "{text}"
    );
    // Drain the queued webhook.
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    next_delivery(&mut consumer).await.ack().await.unwrap();
    consumer.cancel().await;
    app.finish().await;
}

#[tokio::test]
async fn shutdown_finishes_the_request_in_flight_and_stops_accepting() {
    let mut app = spawn_app().await;
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let (id, _, body) = webhook_body("Suspend");
    let (head, tail) = body.split_at(body.len() / 2);

    // A webhook whose body is still arriving when the shutdown begins.
    let mut stream = TcpStream::connect(app.ingress.unwrap()).await.unwrap();
    let request = format!(
        "POST /webhook HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{head}",
        app.ingress.unwrap(),
        app.sim.mint_webhook_token(json!({})).unwrap(),
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    let server = app.stop_ingress().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !server.is_finished(),
        "the server returned with a request in flight"
    );
    assert!(
        TcpStream::connect(app.ingress.unwrap()).await.is_err(),
        "new connections are still accepted"
    );

    stream.write_all(tail.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut response))
        .await
        .expect("the response arrives")
        .unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    tokio::time::timeout(WAIT, server)
        .await
        .expect("run_until_stopped returns")
        .unwrap()
        .unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, id.to_string());
    delivery.ack().await.unwrap();
    consumer.cancel().await;
    app.broker.delete_topology().await.unwrap();
}
