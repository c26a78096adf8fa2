//! The ISV's side, through the whole stack (docs/webhooks.md): an endpoint served by a test
//! HTTP server receives the signed deliveries of purchase → activation → seat change →
//! suspend → reinstate → unsubscribe, each verified by an independent implementation (the
//! `standardwebhooks` crate, not our signing code), in order, exactly once per event id,
//! although the server answers 500 and then times out for a while. Secret rotation, the
//! test event, the delivery log, replay, 410 and the pull feed are checked on the way.

mod stack;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use marketplace_fulfillment::http::Application;
use marketplace_fulfillment::settings::{ApiScope, ScopedApiKey};
use marketplace_fulfillment::worker::protocol::deliver::DeliveryConfig;
use reqwest::Method;
use secrecy::SecretString;
use serde_json::{Value, json};
use stack::{API_KEY, Options, Stack};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const READ_ONLY_KEY: &str = "isv-test-read-only-key";

/// How the test endpoint answers `/hooks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Ok,
    Fail500,
    /// Answers after the sender's timeout (it counts as not received).
    Hang,
}

/// One request that reached `/hooks`.
#[derive(Debug, Clone)]
struct Received {
    id: String,
    body: Value,
    /// Which of the known secrets verified it (by index), with `standardwebhooks`.
    verified_by: Vec<usize>,
    /// Whether the endpoint accepted it (2xx).
    accepted: bool,
}

#[derive(Debug)]
struct Receiver {
    mode: Mode,
    secrets: Vec<String>,
    received: Vec<Received>,
    gone_hits: usize,
}

type Shared = Arc<Mutex<Receiver>>;

async fn hooks(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let (mode, secrets) = {
        let r = shared.lock().unwrap();
        (r.mode, r.secrets.clone())
    };
    let verified_by = secrets
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            standardwebhooks::Webhook::new(s)
                .unwrap()
                .verify(&body, &headers)
                .is_ok()
        })
        .map(|(i, _)| i)
        .collect();
    let id = headers
        .get("webhook-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = match mode {
        Mode::Ok => StatusCode::OK,
        Mode::Fail500 => StatusCode::INTERNAL_SERVER_ERROR,
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(2)).await;
            StatusCode::SERVICE_UNAVAILABLE
        }
    };
    shared.lock().unwrap().received.push(Received {
        id,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        verified_by,
        accepted: status.is_success(),
    });
    status
}

async fn gone(State(shared): State<Shared>) -> StatusCode {
    shared.lock().unwrap().gone_hits += 1;
    StatusCode::GONE
}

async fn start_receiver() -> (SocketAddr, Shared) {
    let shared = Arc::new(Mutex::new(Receiver {
        mode: Mode::Ok,
        secrets: Vec::new(),
        received: Vec::new(),
        gone_hits: 0,
    }));
    let app = Router::new()
        .route("/hooks", post(hooks))
        .route("/gone", post(gone))
        .with_state(shared.clone());
    (stack::serve_local(app).await, shared)
}

fn accepted(shared: &Shared) -> Vec<Received> {
    shared
        .lock()
        .unwrap()
        .received
        .iter()
        .filter(|r| r.accepted)
        .cloned()
        .collect()
}

/// The feed's events of one subscription, from the start.
async fn feed(stack: &Stack, subscription: Uuid) -> Vec<Value> {
    let (status, page) = stack
        .entitlement(
            Method::GET,
            &format!("/api/v1/events?subscriptionId={subscription}&limit=1000"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    page["events"].as_array().unwrap().clone()
}

async fn attempts_failed_since(stack: &Stack, endpoint: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM webhook_attempts WHERE endpoint_id = $1::uuid AND outcome = 'failed'",
    )
    .bind(endpoint)
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_isv_receives_every_event_signed_in_order_exactly_once_through_failures() {
    let mut stack = Stack::start(Options {
        workers: 0,
        // Fast delivery clocks and a long retry schedule: an endpoint failing for a while
        // loses nothing.
        worker: |worker| {
            worker.deliveries = DeliveryConfig {
                schedule: vec![Duration::from_millis(100); 200],
                timeout: Duration::from_millis(400),
                ..DeliveryConfig::fast()
            }
        },
        ..Options::default()
    })
    .await;
    stack.start_worker().await;
    let (receiver, shared) = start_receiver().await;

    // Registration: HTTPS only, except loopback; the secret is shown once.
    let (status, refused) = stack
        .entitlement(
            Method::POST,
            "/api/v1/webhook-endpoints",
            Some(json!({"url": "http://isv.example/hooks"})),
        )
        .await;
    assert_eq!(status, 422, "{refused}");
    assert!(refused["message"].as_str().unwrap().contains("https"));
    let (status, created) = stack
        .entitlement(
            Method::POST,
            "/api/v1/webhook-endpoints",
            Some(json!({
                "url": format!("http://{receiver}/hooks"),
                "topics": ["subscription.*"],
                "description": "the ISV's product",
            })),
        )
        .await;
    assert_eq!(status, 201, "{created}");
    let endpoint = created["id"].as_str().unwrap().to_owned();
    let first_secret = created["secret"].as_str().unwrap().to_owned();
    assert!(first_secret.starts_with("whsec_"));
    shared.lock().unwrap().secrets.push(first_secret.clone());
    let (_, shown) = stack
        .entitlement(
            Method::GET,
            &format!("/api/v1/webhook-endpoints/{endpoint}"),
            None,
        )
        .await;
    assert!(shown.get("secret").is_none(), "the secret is shown once");
    assert!(!shown.to_string().contains(&first_secret));

    // A second endpoint that answers 410 Gone is disabled by its first delivery.
    let (status, gone) = stack
        .entitlement(
            Method::POST,
            "/api/v1/webhook-endpoints",
            Some(json!({"url": format!("http://{receiver}/gone"), "topics": ["subscription.activated"]})),
        )
        .await;
    assert_eq!(status, 201, "{gone}");
    let gone_id = gone["id"].as_str().unwrap().to_owned();

    // The test event: signed, answered, reported.
    let (status, test) = stack
        .entitlement(
            Method::POST,
            &format!("/api/v1/webhook-endpoints/{endpoint}/test"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{test}");
    assert_eq!(test["delivered"], true, "{test}");
    assert_eq!(test["status"], 200);
    let test_id = test["eventId"].as_str().unwrap().to_owned();
    {
        let got = accepted(&shared);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, test_id);
        assert_eq!(got[0].body["type"], "com.fulfillment.webhook.test");
        assert_eq!(got[0].verified_by, vec![0]);
    }

    // The endpoint fails with 500s from the purchase on.
    shared.lock().unwrap().mode = Mode::Fail500;
    let id = stack.subscribed("per-seat", Some(5)).await;
    stack
        .wait_for("three failed attempts", || async {
            (attempts_failed_since(&stack, &endpoint).await >= 3).then_some(())
        })
        .await;
    // ... then stops answering in time for a while ...
    shared.lock().unwrap().mode = Mode::Hang;
    let failed = attempts_failed_since(&stack, &endpoint).await;
    stack
        .wait_for("two timed-out attempts", || async {
            (attempts_failed_since(&stack, &endpoint).await >= failed + 2).then_some(())
        })
        .await;
    // ... while the lifecycle goes on.
    stack
        .act(id, json!({"action": "ChangeQuantity", "quantity": 8}))
        .await;
    stack
        .wait_for("8 seats", || async {
            (stack.engine(id).await.unwrap()?.quantity == Some(8)).then_some(())
        })
        .await;
    stack.act(id, json!({"action": "Suspend"})).await;
    stack
        .wait_for("Suspended", || async {
            (stack.engine(id).await.unwrap()?.state == "Suspended").then_some(())
        })
        .await;
    // Then it recovers.
    shared.lock().unwrap().mode = Mode::Ok;
    stack.act(id, json!({"action": "Reinstate"})).await;
    stack
        .wait_for("Subscribed again", || async {
            (stack.engine(id).await.unwrap()?.state == "Subscribed").then_some(())
        })
        .await;

    // Secret rotation: during the overlap every delivery carries both signatures.
    let (status, rotated) = stack
        .entitlement(
            Method::POST,
            &format!("/api/v1/webhook-endpoints/{endpoint}/rotate-secret"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{rotated}");
    let second_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(second_secret, first_secret);
    assert!(rotated["previousSecretValidUntil"].is_string());
    shared.lock().unwrap().secrets.push(second_secret.clone());
    let rotated_at = shared.lock().unwrap().received.len();

    stack.act(id, json!({"action": "Unsubscribe"})).await;
    stack
        .wait_for("Unsubscribed", || async {
            (stack.engine(id).await.unwrap()?.state == "Unsubscribed").then_some(())
        })
        .await;

    // Everything the feed holds for the subscription arrives, once, in order.
    let events = stack
        .wait_for("every event delivered", || async {
            let events = feed(&stack, id).await;
            let types: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            let complete = types.contains(&"com.fulfillment.subscription.unsubscribed");
            let delivered: HashSet<String> = accepted(&shared).into_iter().map(|r| r.id).collect();
            (complete
                && events
                    .iter()
                    .all(|e| delivered.contains(e["id"].as_str().unwrap())))
            .then_some(events)
        })
        .await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    for expected in [
        "com.fulfillment.subscription.activated",
        "com.fulfillment.subscription.quantity_changed",
        "com.fulfillment.subscription.suspended",
        "com.fulfillment.subscription.reinstated",
        "com.fulfillment.subscription.unsubscribed",
    ] {
        assert!(
            types.contains(&expected),
            "{expected} missing from {types:?}"
        );
    }
    let got: Vec<Received> = accepted(&shared)
        .into_iter()
        .filter(|r| r.id != test_id)
        .collect();
    let ids: Vec<&str> = got.iter().map(|r| r.id.as_str()).collect();
    let feed_ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids, feed_ids,
        "in order, exactly once per event id, as in the feed"
    );
    // Every delivered body, the test event included, meets its contract (docs/events/).
    let contract = stack::event_schemas::Contract::load();
    contract.assert_valid(accepted(&shared).iter().map(|r| &r.body));
    for (received, event) in got.iter().zip(&events) {
        assert_eq!(&received.body, event, "the same CloudEvent as the feed");
        assert!(
            !received.verified_by.is_empty(),
            "{} verified by standardwebhooks",
            received.id
        );
    }
    // Before the rotation only the first secret verifies; after it, both do.
    let all = shared.lock().unwrap().received.clone();
    for (index, received) in all.iter().enumerate().filter(|(_, r)| r.accepted) {
        if index >= rotated_at {
            assert_eq!(received.verified_by, vec![0, 1], "{}", received.id);
        } else {
            assert_eq!(received.verified_by, vec![0], "{}", received.id);
        }
    }
    assert!(
        all[rotated_at..].iter().any(|r| r.accepted),
        "a delivery during the overlap"
    );
    // The failures really happened and were retried: more requests than events.
    assert!(all.iter().filter(|r| !r.accepted).count() >= 3);

    // 410 disabled the second endpoint.
    let (_, gone_now) = stack
        .entitlement(
            Method::GET,
            &format!("/api/v1/webhook-endpoints/{gone_id}"),
            None,
        )
        .await;
    assert_eq!(gone_now["status"], "disabled", "{gone_now}");
    assert!(gone_now["disabledReason"].as_str().unwrap().contains("410"));
    assert_eq!(shared.lock().unwrap().gone_hits, 1);

    // The delivery log: failures with their status (500) or none (timeouts), then success.
    let (status, log) = stack
        .entitlement(
            Method::GET,
            &format!("/api/v1/webhook-endpoints/{endpoint}/deliveries?limit=1000"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{log}");
    let log = log["deliveries"].as_array().unwrap();
    assert!(
        log.iter()
            .any(|a| a["status"] == 500 && a["outcome"] == "failed")
    );
    assert!(
        log.iter()
            .any(|a| a["status"].is_null() && a["outcome"] == "failed")
    );
    assert!(
        log.iter()
            .any(|a| a["outcome"] == "delivered" && a["latencyMs"].is_number())
    );

    // Replay of one event: a dry run first, then the real one, journalled.
    let replayed_id = feed_ids[0].to_owned();
    let path = format!("/api/v1/webhook-endpoints/{endpoint}/replay");
    let (status, dry) = stack
        .entitlement(Method::POST, &path, Some(json!({"eventId": replayed_id})))
        .await;
    assert_eq!(status, 200, "{dry}");
    assert_eq!(dry["dryRun"], true);
    assert_eq!(dry["deliveries"].as_array().unwrap().len(), 1);
    let before = accepted(&shared).len();
    let (_, done) = stack
        .entitlement(
            Method::POST,
            &path,
            Some(json!({"eventId": replayed_id, "dryRun": false})),
        )
        .await;
    assert_eq!(done["replayed"], 1, "{done}");
    stack
        .wait_for("the replayed delivery", || async {
            (accepted(&shared).len() > before).then_some(())
        })
        .await;
    assert_eq!(accepted(&shared).last().unwrap().id, replayed_id);
    let journal: i64 =
        sqlx::query_scalar("SELECT count(*) FROM operator_actions WHERE action = 'webhook_replay'")
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(journal, 1);

    // The feed's cursor survives a restart: a fresh ingress continues where it stopped.
    let (_, page) = stack
        .entitlement(
            Method::GET,
            &format!("/api/v1/events?subscriptionId={id}&limit=2"),
            None,
        )
        .await;
    let cursor = page["nextCursor"].as_str().unwrap().to_owned();
    // (The fresh ingress also has a read-only key, ENTITLEMENT_API_KEYS' `read:` scope.)
    let mut settings = stack.settings.clone();
    settings.ingress.api_keys = vec![ScopedApiKey {
        scope: ApiScope::Read,
        key: SecretString::from(READ_ONLY_KEY),
    }];
    let restarted = Application::build(settings).await.unwrap();
    let address = restarted.local_addr();
    let stop = CancellationToken::new();
    let server = tokio::spawn(restarted.run_until_stopped(stop.clone()));
    let rest: Value = stack
        .http
        .get(format!(
            "http://{address}/api/v1/events?subscriptionId={id}&after={cursor}&limit=1000"
        ))
        .bearer_auth(READ_ONLY_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rest_ids: Vec<&str> = rest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(rest_ids, feed_ids[2..].to_vec());
    // A read-only key reads but cannot change anything; the read-write key still works.
    let post = |key: &'static str| {
        stack
            .http
            .post(format!("http://{address}/api/v1/webhook-endpoints"))
            .bearer_auth(key)
            .json(&json!({"url": format!("http://{receiver}/hooks")}))
            .send()
    };
    let refused = post(READ_ONLY_KEY).await.unwrap();
    assert_eq!(refused.status(), 403);
    let refused: Value = refused.json().await.unwrap();
    assert_eq!(refused["reason"], "read_only_key", "{refused}");
    assert_eq!(post(API_KEY).await.unwrap().status(), 201);
    stop.cancel();
    let _ = server.await;

    // The request schemas match what the server accepts: an empty cursor is refused, and a
    // seat count above 2^32-1 is refused for what it is.
    let (status, answer) = stack
        .entitlement(Method::GET, "/api/v1/subscriptions?cursor=", None)
        .await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = stack
        .entitlement(
            Method::POST,
            &format!("/api/v1/subscriptions/{id}/change-quantity"),
            Some(json!({"quantity": 4_294_967_296u64})),
        )
        .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("at most 4294967295"),
        "{answer}"
    );

    // A command the machine refuses now is answered 409 with its reason, not 202.
    let (status, answer) = stack
        .entitlement(
            Method::POST,
            &format!("/api/v1/subscriptions/{id}/change-quantity"),
            Some(json!({"quantity": 9})),
        )
        .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["reason"], "refused");
    assert!(
        answer["message"].as_str().unwrap().contains("unsubscribed"),
        "{answer}"
    );

    // Bad cursors and filters are refused with a reason.
    for query in [
        "after=",
        "after=abc",
        "limit=0",
        "type=nope",
        "subscriptionId=x",
    ] {
        let (status, answer) = stack
            .entitlement(Method::GET, &format!("/api/v1/events?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {answer}");
    }
    // The same from the command line: `fulfillment endpoint …`.
    let cli = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"))
            .args(args)
            .env_remove("FULFILLMENT_CONFIG")
            .envs(
                stack
                    .process_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env("RUST_LOG", "error")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, _, err) = cli(&["endpoint", "add", "http://isv.example/hooks"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("https"), "{err}");
    let (code, out, err) = cli(&[
        "endpoint",
        "add",
        &format!("http://{receiver}/hooks"),
        "--topic",
        "subscription.activated,subscription.suspended",
        "--json",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let added: Value = serde_json::from_str(&out).unwrap();
    let cli_endpoint = added["id"].as_str().unwrap().to_owned();
    let cli_secret = added["secret"].as_str().unwrap().to_owned();
    assert!(cli_secret.starts_with("whsec_"));
    shared.lock().unwrap().secrets = vec![cli_secret];
    let (code, out, err) = cli(&["endpoint", "test", &cli_endpoint]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("HTTP 200"), "{out}");
    assert_eq!(accepted(&shared).last().unwrap().verified_by, vec![0]);
    let (code, out, _) = cli(&["endpoint", "list"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains(&cli_endpoint) && out.contains(&endpoint),
        "{out}"
    );
    assert!(!out.contains("whsec_"), "no secret in a listing: {out}");
    let (code, out, err) = cli(&["endpoint", "deliveries", &endpoint, "--json"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len()
            > 3
    );
    let (code, out, err) = cli(&[
        "endpoint",
        "replay",
        "--endpoint",
        &endpoint,
        "--since",
        "1h",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("dry run"), "{out}");
    let (code, _, err) = cli(&["endpoint", "replay", "--failures"]);
    assert_eq!(code, Some(2), "{err}");
    let (code, out, err) = cli(&["endpoint", "disable", &cli_endpoint]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("disabled"), "{out}");
    let (code, _, _) = cli(&["endpoint", "show", &Uuid::new_v4().to_string()]);
    assert_eq!(code, Some(2));
    stack.finish().await;
}
