//! Attacks on the ingress from outside, against real servers on 127.0.0.1 (own database,
//! RabbitMQ prefix and simulator per test), beyond the verifier-level tests of
//! `webhook_auth.rs`:
//!
//! - JWKS key rotation and JWKS outages through the HTTP route: never fail-open, nothing
//!   queued, recovery once the keys are back;
//! - request smuggling and oversized headers over raw TCP against a listening `Application`;
//! - entitlement API keys that are almost right;
//! - no secret in any log line of a whole `fulfillment demo` run at `RUST_LOG=debug`.
//!
//! "Nothing was queued" is checked without waiting for silence: after the attack a genuine
//! webhook (the sentinel) is posted, and it must be the first message in the queue.

mod stack;

use std::net::SocketAddr;
use std::time::Duration;

use axum::http::StatusCode;
use marketplace_fulfillment::http::auth::{WebhookAuthConfig, WebhookVerifier};
use marketplace_fulfillment::queue::InboundConsumer;
use marketplace_fulfillment::simulator::JwksFault;
use marketplace_fulfillment::world::{block_on_own_thread, rabbitmqctl};
use serde_json::{Value, json};
use stack::{Options, Stack, TestDatabase};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use url::Url;
use uuid::Uuid;

const API_KEY: &str = "attack-entitlement-k3y-0123456789";
/// Liveness bound for a message that must arrive (not a performance assertion).
const WAIT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

/// The world without a worker: the ingress on a real socket with its own database, AMQP
/// prefix and simulator, and this file's entitlement API key.
async fn spawn_application() -> Stack {
    Stack::start(Options {
        workers: 0,
        env: vec![("ENTITLEMENT_API_KEY", API_KEY.to_string())],
        ..Options::default()
    })
    .await
}

/// The production application in place of the ingress, with the webhook verifier
/// reading the JWKS at `jwks_url` and allowed to refetch every 100 ms (production: 30 s),
/// so rotation and outages play out quickly.
async fn with_jwks(app: &mut Stack, jwks_url: Url) {
    app.world
        .restart_ingress(|settings, state| {
            let mut config =
                WebhookAuthConfig::from_settings(&settings.marketplace, Some(jwks_url)).unwrap();
            config.refresh_min_interval = REFRESH_MIN_INTERVAL;
            state.verifier = Some(WebhookVerifier::new(config, reqwest::Client::new()));
        })
        .await
        .unwrap();
}

/// Posts a genuine webhook and checks that it is the first message in the queue: every
/// attack before it queued nothing.
async fn assert_nothing_queued_before_a_sentinel(app: &Stack) {
    let token = app.sim.mint_webhook_token(json!({})).unwrap();
    let (sentinel, body) = webhook_body("Renew");
    let response = app.post_webhook(Some(&token), body).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut consumer: InboundConsumer = app.broker.consume_inbound(10, "").await.unwrap();
    let first = tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("the sentinel is queued")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.meta.message_id,
        sentinel.to_string(),
        "something was queued before the sentinel: {:?}",
        first.message
    );
    first.ack().await.unwrap();
    consumer.cancel().await;
}

/// `(operation id, body)` of a well-formed webhook.
fn webhook_body(action: &str) -> (Uuid, String) {
    let id = Uuid::new_v4();
    let body = json!({
        "id": id,
        "activityId": Uuid::new_v4(),
        "subscriptionId": Uuid::new_v4(),
        "action": action,
        "timeStamp": "2025-03-10T16:34:41.1370170Z",
        "status": "Succeeded",
    })
    .to_string();
    (id, body)
}

async fn error_json(response: reqwest::Response) -> Value {
    assert!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json")),
        "{:?}",
        response.headers()
    );
    response.json().await.unwrap()
}

// ---------------------------------------------------------------------------------------
// A JWKS endpoint we can break: in front of the simulator's, counting requests
// ---------------------------------------------------------------------------------------

/// What the simulator's JWKS endpoint answers from now on (every other fault off).
async fn set_jwks(app: &Stack, fault: JwksFault) {
    app.admin
        .set_faults(json!({ "jwks": fault }))
        .await
        .unwrap();
}

/// How often the simulator's JWKS was fetched so far.
fn jwks_fetches(app: &Stack) -> usize {
    app.sim.view().jwks_fetches()
}

/// The verifier's refetch rate limit in these tests. Steps that must fall *within* it (a
/// second unknown kid answered 503 without a fetch) are two requests apart, so it is long
/// enough for a loaded machine (at 100 ms such a step failed while other builds ran).
const REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Lets the verifier's refetch rate limit pass, so the next unknown `kid` or empty cache
/// triggers a fetch. A pause for a rate limit, not a timed assertion.
async fn past_refresh_interval() {
    tokio::time::sleep(REFRESH_MIN_INTERVAL + Duration::from_millis(100)).await;
}

fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

// ---------------------------------------------------------------------------------------
// JWKS key rotation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rotated_signing_key_is_fetched_on_its_unknown_kid_and_a_withdrawn_key_stops_verifying() {
    let mut app = spawn_application().await;
    let jwks = app.sim.jwks_url();
    with_jwks(&mut app, jwks).await;
    let old_token = app.sim.mint_webhook_token(json!({})).unwrap();
    let (_, body) = webhook_body("Renew");
    assert_eq!(
        app.post_webhook(Some(&old_token), body.clone())
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(jwks_fetches(&app), 1);

    // Entra rolls its keys: a token signed with the new key names a kid we never saw.
    past_refresh_interval().await;
    let new_kid = app.sim.rotate_signing_key().unwrap();
    let new_token = app.sim.mint_webhook_token(json!({})).unwrap();
    assert_eq!(kid_of(&new_token), new_kid);
    assert_ne!(kid_of(&old_token), new_kid);
    let (_, body) = webhook_body("Renew");
    assert_eq!(
        app.post_webhook(Some(&new_token), body.clone())
            .await
            .status(),
        StatusCode::OK,
        "the new key is fetched on its unknown kid"
    );
    assert_eq!(jwks_fetches(&app), 2, "exactly one refetch");

    // The old key is still published (Entra keeps both during a rollover): still valid.
    let (_, body) = webhook_body("Renew");
    assert_eq!(
        app.post_webhook(Some(&old_token), body.clone())
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(jwks_fetches(&app), 2, "known kids come from the cache");

    // The old key is withdrawn. The cache keeps it until the next fetch (at most the cache
    // TTL); a fetch, here provoked by another unknown kid, replaces the whole set.
    set_jwks(&app, JwksFault::NewestOnly).await;
    past_refresh_interval().await;
    let forged_kid = {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = new_token.split('.').map(str::to_owned).collect();
        parts[0] = engine.encode(
            json!({ "alg": "RS256", "typ": "JWT", "kid": "not-a-published-kid" }).to_string(),
        );
        parts.join(".")
    };
    let (_, body) = webhook_body("Renew");
    let response = app.post_webhook(Some(&forged_kid), body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_json(response).await["reason"], "unknown_kid");
    assert_eq!(jwks_fetches(&app), 3);

    // Within the refetch interval, a kid we no longer hold may be our cache's lag, not the
    // caller's fault: 503 (Microsoft redelivers; a 401 would reject a ChangePlan, §15.5).
    let (_, body) = webhook_body("Renew");
    let response = app.post_webhook(Some(&old_token), body.clone()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        error_json(response).await["message"]
            .as_str()
            .unwrap()
            .contains("keys_not_refreshed")
    );
    assert_eq!(jwks_fetches(&app), 3);
    // Once a refetch is allowed and confirms the key is gone: the caller's, 401.
    past_refresh_interval().await;
    let (_, body) = webhook_body("Renew");
    let response = app.post_webhook(Some(&old_token), body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_json(response).await["reason"], "unknown_kid");
    assert_eq!(jwks_fetches(&app), 4);
    let (_, body) = webhook_body("Renew");
    assert_eq!(
        app.post_webhook(Some(&new_token), body.clone())
            .await
            .status(),
        StatusCode::OK
    );

    // Drain the three accepted webhooks, then nothing else may follow them.
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    for _ in 0..4 {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("accepted webhooks are queued")
            .unwrap()
            .unwrap();
        delivery.ack().await.unwrap();
    }
    consumer.cancel().await;
    assert_nothing_queued_before_a_sentinel(&app).await;
    app.finish().await;
}

// ---------------------------------------------------------------------------------------
// JWKS outages: never fail-open
// ---------------------------------------------------------------------------------------

/// While the keys cannot be fetched, a genuine token cannot be told from a forged one: the
/// call is refused (503 + Retry-After by design, so Microsoft redelivers; a 401 would read
/// as "the token is bad") and nothing is queued. Once the JWKS is back, the same process
/// accepts again.
#[tokio::test]
async fn while_the_jwks_fails_every_webhook_is_refused_and_nothing_is_queued_then_it_recovers() {
    let mut app = spawn_application().await;
    set_jwks(&app, JwksFault::Fail).await;
    let jwks = app.sim.jwks_url();
    with_jwks(&mut app, jwks).await;
    let genuine = app.sim.mint_webhook_token(json!({})).unwrap();
    let foreign_tenant = app
        .sim
        .mint_webhook_token(json!({ "tid": Uuid::new_v4().to_string() }))
        .unwrap();

    for mode in [JwksFault::Fail, JwksFault::Garbage, JwksFault::NoKeys] {
        set_jwks(&app, mode).await;
        for token in [&genuine, &foreign_tenant] {
            past_refresh_interval().await;
            let before = jwks_fetches(&app);
            let (_, body) = webhook_body("Unsubscribe");
            let response = app.post_webhook(Some(token), body.clone()).await;
            assert!(
                !response.status().is_success(),
                "{mode:?}: fail-open with {}",
                response.status()
            );
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{mode:?}"
            );
            assert_eq!(response.headers()["retry-after"], "5");
            let error = error_json(response).await;
            assert_eq!(error["error"], "unavailable", "{mode:?}: {error}");
            assert_eq!(
                jwks_fetches(&app),
                before + 1,
                "{mode:?}: the JWKS was asked"
            );
        }
    }

    // The JWKS server is gone altogether (connection refused).
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let mut dead = spawn_application().await;
    with_jwks(
        &mut dead,
        Url::parse(&format!("http://{closed}/keys")).unwrap(),
    )
    .await;
    let token = dead.sim.mint_webhook_token(json!({})).unwrap();
    let (_, body) = webhook_body("Unsubscribe");
    let response = dead.post_webhook(Some(&token), body.clone()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    // No sentinel can get past a JWKS that never answers: count the queue instead (no
    // consumer runs, and a 200 would only have come after the broker's confirm).
    assert_eq!(
        dead.broker
            .queue_counts(&dead.broker.topology().inbound_queue())
            .await
            .unwrap()
            .0,
        0
    );
    dead.finish().await;

    // Back: the same process accepts the genuine token and still refuses the forgery.
    set_jwks(&app, JwksFault::Serve).await;
    past_refresh_interval().await;
    let (_, body) = webhook_body("Unsubscribe");
    let response = app.post_webhook(Some(&foreign_tenant), body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_json(response).await["reason"], "wrong_tenant");
    assert_nothing_queued_before_a_sentinel(&app).await;
    app.finish().await;
}

/// Keys already cached keep verifying during an outage (refusing them would turn a JWKS
/// blip into lost webhooks), but a forgery under a cached `kid` is still a forgery.
#[tokio::test]
async fn during_an_outage_cached_keys_verify_and_forgeries_under_a_cached_kid_are_401() {
    let mut app = spawn_application().await;
    let jwks = app.sim.jwks_url();
    with_jwks(&mut app, jwks).await;
    let genuine = app.sim.mint_webhook_token(json!({})).unwrap();
    let (_, body) = webhook_body("Suspend");
    assert_eq!(
        app.post_webhook(Some(&genuine), body.clone())
            .await
            .status(),
        StatusCode::OK
    );

    set_jwks(&app, JwksFault::Fail).await;
    past_refresh_interval().await;
    // Same header (cached kid), other claims, the original signature.
    let tampered = {
        use base64::Engine;
        let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = genuine.split('.').collect();
        let mut claims: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
        claims["tid"] = json!(Uuid::new_v4().to_string());
        format!(
            "{}.{}.{}",
            parts[0],
            engine.encode(claims.to_string()),
            parts[2]
        )
    };
    let (_, body) = webhook_body("Suspend");
    let response = app.post_webhook(Some(&tampered), body.clone()).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error_json(response).await["reason"], "bad_signature");

    // Drain the accepted webhook; then a cached-key webhook during the outage, as sentinel.
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let first = tokio::time::timeout(WAIT, consumer.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    first.ack().await.unwrap();
    consumer.cancel().await;
    assert_nothing_queued_before_a_sentinel(&app).await;
    assert_eq!(
        jwks_fetches(&app),
        1,
        "no fetch was needed for the cached kid"
    );
    app.finish().await;
}

// ---------------------------------------------------------------------------------------
// Raw HTTP/1.1 against the listening Application: smuggling and oversized headers
// ---------------------------------------------------------------------------------------

/// What came back on one connection.
struct Exchange {
    text: String,
    /// The server closed the connection (rather than keeping it open for another request).
    closed: bool,
}

/// Writes `request` on a fresh connection and reads until the server closes it, or until
/// the liveness bound passes with the connection still open. The server may hang up before
/// reading everything: write errors are part of the answer.
async fn raw_exchange(address: SocketAddr, request: &[u8]) -> Exchange {
    let mut stream = TcpStream::connect(address).await.unwrap();
    let _ = stream.write_all(request).await;
    let _ = stream.flush().await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), stream.read_to_end(&mut answer)).await;
    Exchange {
        text: String::from_utf8_lossy(&answer).into_owned(),
        closed: read.is_ok(),
    }
}

/// The status codes of every response in `answer` (HTTP/1.1 may answer several requests).
fn statuses(answer: &str) -> Vec<u16> {
    answer
        .match_indices("HTTP/1.1 ")
        .filter_map(|(at, _)| answer.get(at + 9..at + 12)?.parse().ok())
        .collect()
}

fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

/// Each attack is one write on a keep-alive connection: an ambiguously framed webhook
/// followed by a complete, genuine webhook (the smuggled request). Whatever the framing,
/// the smuggled webhook must never be processed: the server refuses the first request
/// (400) or, where RFC 9112 §6.3 lets it follow `Transfer-Encoding` alone, answers it and
/// closes the connection before reading further.
#[tokio::test]
async fn smuggling_shaped_requests_never_get_a_second_request_processed() {
    let app = spawn_application().await;
    let token = app.sim.mint_webhook_token(json!({})).unwrap();
    let webhook = |body: &str, framing: &str| {
        format!(
            "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\n{framing}\r\n{body}"
        )
    };
    let mut smuggled_ids = Vec::new();
    let mut smuggled = || {
        let (id, body) = webhook_body("Unsubscribe");
        smuggled_ids.push(id);
        webhook(&body, &format!("Content-Length: {}\r\n", body.len()))
    };
    let (_, body) = webhook_body("Unsubscribe");
    let len = body.len();
    // The one request an RFC-compliant server may process: framed by Transfer-Encoding.
    let (te_framed_id, te_framed_body) = webhook_body("Unsubscribe");

    let attacks: Vec<(&str, String, Expect)> = vec![
        (
            "two different Content-Length headers",
            format!(
                "{}{}",
                webhook(
                    &body,
                    &format!("Content-Length: {len}\r\nContent-Length: {}\r\n", len - 1)
                ),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "a Content-Length list with different values",
            format!(
                "{}{}",
                webhook(&body, &format!("Content-Length: {len}, {}\r\n", len + 1)),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "CL.TE: Content-Length spans a smuggled request that chunked framing leaves over",
            {
                let inner = format!("0\r\n\r\n{}", smuggled());
                webhook(
                    &inner,
                    &format!(
                        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                        inner.len()
                    ),
                )
            },
            Expect::Refused,
        ),
        (
            "TE.CL: a short Content-Length next to a chunked body, then a smuggled request",
            format!(
                "{}{}",
                webhook(
                    &chunked(&te_framed_body),
                    "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n"
                ),
                smuggled()
            ),
            Expect::FramedByTransferEncodingThenClosed,
        ),
        (
            "Transfer-Encoding that does not end in chunked",
            format!(
                "{}{}",
                webhook(&chunked(&body), "Transfer-Encoding: chunked, identity\r\n"),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "an unknown transfer coding",
            format!(
                "{}{}",
                webhook(&chunked(&body), "Transfer-Encoding: xchunked\r\n"),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "whitespace before the header colon",
            format!(
                "{}{}",
                webhook(&chunked(&body), "Transfer-Encoding : chunked\r\n"),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "an obs-fold continuation line",
            format!(
                "{}{}",
                webhook(
                    &body,
                    &format!("Content-Length: {len}\r\n X-Folded: yes\r\n")
                ),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "a negative Content-Length",
            format!("{}{}", webhook(&body, "Content-Length: -1\r\n"), smuggled()),
            Expect::Refused,
        ),
        (
            "a Content-Length with a sign",
            format!(
                "{}{}",
                webhook(&body, &format!("Content-Length: +{len}\r\n")),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "a Content-Length that overflows",
            format!(
                "{}{}",
                webhook(&body, "Content-Length: 99999999999999999999999\r\n"),
                smuggled()
            ),
            Expect::Refused,
        ),
        (
            "a bad chunk size",
            format!(
                "{}{}",
                webhook(
                    &format!("zz\r\n{body}\r\n0\r\n\r\n"),
                    "Transfer-Encoding: chunked\r\n"
                ),
                smuggled()
            ),
            Expect::Refused,
        ),
    ];
    for (what, request, expect) in &attacks {
        let exchange = raw_exchange(app.ingress.unwrap(), request.as_bytes()).await;
        let codes = statuses(&exchange.text);
        match expect {
            Expect::Refused => assert!(
                codes.len() <= 1 && codes.iter().all(|code| (400..500).contains(code)),
                "{what}: answered {codes:?}\n{}",
                exchange.text
            ),
            Expect::FramedByTransferEncodingThenClosed => assert!(
                codes.len() == 1 && (codes[0] == 200 || (400..500).contains(&codes[0])),
                "{what}: answered {codes:?}\n{}",
                exchange.text
            ),
        }
        assert!(
            exchange.closed,
            "{what}: the connection stayed open after an ambiguous request"
        );
    }

    // Only the Transfer-Encoding-framed webhook may have been queued; none of the smuggled
    // ones, whose ids are all distinct.
    let mut consumer = app.broker.consume_inbound(10, "").await.unwrap();
    let (sentinel, sentinel_body) = webhook_body("Renew");
    let response = app.post_webhook(Some(&token), sentinel_body.clone()).await;
    assert_eq!(response.status(), StatusCode::OK);
    loop {
        let delivery = tokio::time::timeout(WAIT, consumer.next())
            .await
            .expect("the sentinel is queued")
            .unwrap()
            .unwrap();
        let id: Uuid = delivery.meta.message_id.parse().unwrap();
        delivery.ack().await.unwrap();
        if id == sentinel {
            break;
        }
        assert!(
            !smuggled_ids.contains(&id),
            "a smuggled request was processed"
        );
        assert_eq!(id, te_framed_id, "an unexpected message was queued");
    }
    consumer.cancel().await;
    app.finish().await;
}

#[derive(Debug)]
enum Expect {
    /// A 4xx (or a closed connection) for the first request.
    Refused,
    /// Content-Length next to Transfer-Encoding: hyper follows Transfer-Encoding alone
    /// and closes the connection after answering (RFC 9112 §6.3 allows both this and a
    /// 400).
    FramedByTransferEncodingThenClosed,
}

/// Honest framing on the same listener, to show the checks above are about the framing.
#[tokio::test]
async fn honestly_framed_webhooks_are_accepted_over_raw_tcp() {
    let app = spawn_application().await;
    let token = app.sim.mint_webhook_token(json!({})).unwrap();
    let (_, body) = webhook_body("Unsubscribe");
    let head = format!(
        "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nConnection: close\r\n"
    );
    let with_length = format!("{head}Content-Length: {}\r\n\r\n{body}", body.len());
    let exchange = raw_exchange(app.ingress.unwrap(), with_length.as_bytes()).await;
    assert_eq!(statuses(&exchange.text), vec![200], "{}", exchange.text);
    let (_, body) = webhook_body("Unsubscribe");
    let with_chunks = format!("{head}Transfer-Encoding: chunked\r\n\r\n{}", chunked(&body));
    let exchange = raw_exchange(app.ingress.unwrap(), with_chunks.as_bytes()).await;
    assert_eq!(statuses(&exchange.text), vec![200], "{}", exchange.text);
    app.finish().await;
}

#[tokio::test]
async fn oversized_and_too_many_headers_are_refused_and_queue_nothing() {
    let app = spawn_application().await;
    let token = app.sim.mint_webhook_token(json!({})).unwrap();
    let (_, body) = webhook_body("Unsubscribe");
    let request = |extra: String| {
        format!(
            "POST /webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nConnection: close\r\n{extra}\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
    };
    let attacks = vec![
        (
            "one 1 MiB header",
            request(format!("X-Big: {}\r\n", "a".repeat(1024 * 1024))),
        ),
        (
            "a 1 MiB Authorization header",
            format!(
                "POST /webhook HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
                 Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
                "A".repeat(1024 * 1024),
                body.len()
            ),
        ),
        (
            "500 headers",
            request((0..500).map(|i| format!("X-H{i}: v\r\n")).collect()),
        ),
        (
            "a 1 MiB request target",
            format!(
                "GET /landing?token={} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                "t".repeat(1024 * 1024)
            ),
        ),
    ];
    for (what, attack) in attacks {
        let answer = raw_exchange(app.ingress.unwrap(), attack.as_bytes())
            .await
            .text;
        let codes = statuses(&answer);
        assert!(
            codes
                .iter()
                .all(|code| matches!(code, 400 | 401 | 413 | 414 | 431)),
            "{what}: answered {codes:?}: {}",
            answer.chars().take(300).collect::<String>()
        );
    }
    // The server is still serving.
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_nothing_queued_before_a_sentinel(&app).await;
    app.finish().await;
}

// ---------------------------------------------------------------------------------------
// Entitlement API keys
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn almost_right_entitlement_api_keys_are_all_401() {
    let app = spawn_application().await;
    let prefix = &API_KEY[..API_KEY.len() - 1];
    let headers: Vec<(&str, Option<String>)> = vec![
        ("no header", None),
        ("an empty header", Some(String::new())),
        ("the scheme alone", Some("Bearer".into())),
        ("the scheme and a space", Some("Bearer ".into())),
        ("the key without a scheme", Some(API_KEY.into())),
        (
            "the key with the Basic scheme",
            Some(format!("Basic {API_KEY}")),
        ),
        (
            "the key with a Token scheme",
            Some(format!("Token {API_KEY}")),
        ),
        (
            "the key glued to the scheme",
            Some(format!("Bearer{API_KEY}")),
        ),
        ("a wrong key", Some("Bearer wrong".into())),
        ("a prefix of the key", Some(format!("Bearer {prefix}"))),
        (
            "its first character",
            Some(format!("Bearer {}", &API_KEY[..1])),
        ),
        (
            "the key and one more character",
            Some(format!("Bearer {API_KEY}x")),
        ),
        ("the key twice", Some(format!("Bearer {API_KEY}{API_KEY}"))),
        (
            "the key in upper case",
            Some(format!("Bearer {}", API_KEY.to_uppercase())),
        ),
        (
            "the key and a second token",
            Some(format!("Bearer {API_KEY} {API_KEY}")),
        ),
        (
            "the key's SHA-256 (what the server keeps)",
            Some(format!("Bearer {}", hex_sha256(API_KEY))),
        ),
    ];
    for path in [
        "/api/v1/subscriptions".to_string(),
        format!("/api/v1/subscriptions/{}", Uuid::new_v4()),
    ] {
        for (what, header) in &headers {
            let mut request = app.http.get(app.url(&path));
            if let Some(header) = header {
                request = request.header("authorization", header);
            }
            let response = request.send().await.unwrap();
            assert_eq!(
                response.status(),
                StatusCode::UNAUTHORIZED,
                "{what} on {path}"
            );
            let error = error_json(response).await;
            assert_eq!(error["error"], "unauthorized", "{what}: {error}");
            assert!(
                !error.to_string().contains(API_KEY),
                "{what}: the key leaked: {error}"
            );
        }
    }
    // A command with a wrong key is refused before anything is looked at or queued.
    let response = app
        .http
        .post(app.url(&format!("/api/v1/subscriptions/{}/cancel", Uuid::new_v4())))
        .bearer_auth(prefix)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // And the right key works, so the refusals above were about the key.
    let response = app
        .http
        .get(app.url("/api/v1/subscriptions"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_nothing_queued_before_a_sentinel(&app).await;
    app.finish().await;
}

fn hex_sha256(text: &str) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A code-level check, not a timing test: the key comparison goes through `subtle`'s
/// constant-time equality on fixed-size digests, and no `==` on the presented key exists.
#[test]
fn the_entitlement_api_key_is_compared_in_constant_time() {
    let source = include_str!("../src/http/entitlements.rs");
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let code = code.split("#[cfg(test)]").next().unwrap();
    assert!(
        code.contains("use subtle::ConstantTimeEq;"),
        "subtle is not used"
    );
    assert!(
        code.contains("digest_bytes(presented.as_bytes()).ct_eq(&expected)"),
        "the presented key is not compared with ct_eq on its digest"
    );
    for shortcut in [
        "presented ==",
        "== presented",
        "presented.eq(",
        "presented !=",
        "expected ==",
        "== expected",
        "starts_with(",
    ] {
        assert!(
            !code.contains(shortcut),
            "a non-constant-time comparison: {shortcut:?}"
        );
    }
    // The digest is what is kept: the key itself never is.
    let state = include_str!("../src/http/state.rs");
    assert!(state.contains("pub api_key_digest: Option<[u8; 32]>"));
}

// ---------------------------------------------------------------------------------------
// No secret in the logs of a whole demo run
// ---------------------------------------------------------------------------------------

/// A RabbitMQ user that exists for one test.
struct RabbitUser(String);

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let user = self.0.clone();
        let _ = block_on_own_thread(async move { rabbitmqctl(&["delete_user", &user]).await });
    }
}

/// Every configured secret, and the demo's own generated ones, are absent from stdout and
/// stderr of a full `fulfillment demo` at `RUST_LOG=debug` (lapin, sqlx, reqwest, hyper and
/// our own spans all log at that level).
#[tokio::test]
async fn a_debug_level_demo_run_logs_no_secret() {
    let db = TestDatabase::new();
    let id = Uuid::new_v4().simple().to_string();
    let client_secret = format!("client-secret-{id}");
    let api_key = format!("api-key-{id}");
    let pg_password = format!("pg-pass-{id}");
    // A RabbitMQ user of our own, so the AMQP password is a unique string; when rabbitmqctl
    // is not usable, guest/guest, and then "guest" must not appear as a URL password.
    let amqp_user = format!("attack-{}", &id[..12]);
    let amqp_password = format!("amqp-pass-{id}");
    let added = match rabbitmqctl(&["add_user", &amqp_user, &amqp_password]).await {
        Ok(_) => rabbitmqctl(&["set_permissions", "-p", "/", &amqp_user, ".*", ".*", ".*"]).await,
        Err(error) => Err(error),
    };
    let _user_guard = match added {
        Ok(_) => Some(RabbitUser(amqp_user.clone())),
        Err(error) => {
            eprintln!("no RabbitMQ user of our own ({error}); using guest");
            None
        }
    };
    let (amqp_url, amqp_secret) = match &_user_guard {
        Some(_) => (
            format!("amqp://{amqp_user}:{amqp_password}@127.0.0.1:5672/%2f"),
            amqp_password.clone(),
        ),
        None => (
            "amqp://guest:guest@127.0.0.1:5672/%2f".to_string(),
            ":guest@".to_string(),
        ),
    };
    let mut database_url = db.url().url().clone();
    database_url.set_password(Some(&pg_password)).unwrap();

    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .arg("demo")
        .env("DATABASE_URL", database_url.as_str())
        .env("AMQP_URL", &amqp_url)
        .env("FULFILLMENT__AMQP__PREFIX", &db.settings.amqp.prefix)
        .env("MARKETPLACE_CLIENT_SECRET", &client_secret)
        .env("ENTITLEMENT_API_KEY", &api_key)
        .env("RUST_LOG", "debug")
        .env_remove("FULFILLMENT_CONFIG")
        .env_remove("LOG_FORMAT")
        .kill_on_drop(true)
        .output()
        .await
        .expect("run fulfillment demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let logs = format!("{stdout}\n{stderr}");
    assert!(
        output.status.success(),
        "the demo failed ({:?}):\n{}",
        output.status,
        logs.lines().rev().take(80).collect::<Vec<_>>().join("\n")
    );
    // The run really logged at debug level, so the absence below means something.
    assert!(
        stderr.lines().filter(|l| l.contains("DEBUG")).count() > 50,
        "too few debug lines to judge:\n{stderr}"
    );

    // The URLs are logged, with the password replaced: proof that the scan below looks at
    // the lines where a leak would be.
    if _user_guard.is_some() {
        assert!(
            logs.contains(&format!("amqp://{amqp_user}:***@")),
            "the AMQP URL is not logged redacted"
        );
    }
    assert!(logs.contains("postgres://postgres:***@"), "{stdout}");

    let mut leaks = Vec::new();
    for (what, secret) in [
        ("MARKETPLACE_CLIENT_SECRET", client_secret.as_str()),
        ("ENTITLEMENT_API_KEY", api_key.as_str()),
        ("the PostgreSQL password", pg_password.as_str()),
        ("the AMQP password", amqp_secret.as_str()),
    ] {
        for (n, line) in logs.lines().enumerate() {
            if line.contains(secret) {
                leaks.push(format!("{what} on line {n}: {line}"));
            }
        }
    }
    // The demo generates its own client secret (`demo-<32 hex>`) and API key
    // (`demo-key-<32 hex>`), and the simulator issues bearer and purchase tokens: none of
    // them may be logged either.
    for (n, line) in logs.lines().enumerate() {
        for marker in ["demo-key-", "Bearer ey", "client_secret=", "\"token\":\"ey"] {
            if line.contains(marker) {
                leaks.push(format!("{marker:?} on line {n}: {line}"));
            }
        }
        if let Some(at) = line.find("demo-") {
            let rest = &line[at + 5..];
            if rest.len() >= 32 && rest[..32].bytes().all(|b| b.is_ascii_hexdigit()) {
                leaks.push(format!("the demo's client secret on line {n}: {line}"));
            }
        }
        if has_jwt(line) {
            leaks.push(format!("a JWT on line {n}: {line}"));
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the logs:\n{}",
        leaks.join("\n")
    );

    // The demo drops its database; make sure, in case it failed halfway.
    let admin = db.url().with_path("/postgres");
    if let Ok(pool) = sqlx::postgres::PgPool::connect(admin.expose()).await {
        let name = format!("{}_demo", db.url().url().path().trim_start_matches('/'));
        let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
        let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
        pool.close().await;
    }
}

/// A compact JWS: `eyJ…` header, then two more base64url segments.
fn has_jwt(line: &str) -> bool {
    line.match_indices("eyJ").any(|(at, _)| {
        let candidate: String = line[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect();
        let parts: Vec<&str> = candidate.split('.').collect();
        parts.len() >= 3 && parts.iter().take(3).all(|p| p.len() >= 8)
    })
}
