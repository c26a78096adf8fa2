//! The marketplace simulator over real HTTP on 127.0.0.1:0, with millisecond clocks.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use common::SIM_SECRET;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use marketplace_fulfillment::settings::MARKETPLACE_APP_ID;
use marketplace_fulfillment::simulator::{IssuerVersion, RunningSimulator, SimulatorConfig};
use marketplace_fulfillment::world::wait_until;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, json};
use url::Url;
use uuid::Uuid;

const DEADLINE: Duration = Duration::from_secs(10);

struct TestSim {
    sim: RunningSimulator,
    http: reqwest::Client,
    token: String,
}

impl TestSim {
    async fn start(webhook_url: Option<Url>, adjust: impl FnOnce(&mut SimulatorConfig)) -> Self {
        let sim = common::simulator(|config| {
            config.webhook_url = webhook_url;
            adjust(config);
        })
        .await;
        let token = sim.issue_access_token().unwrap();
        let http = reqwest::Client::new();
        Self { sim, http, token }
    }

    async fn plain() -> Self {
        Self::start(None, |_| {}).await
    }

    fn url(&self, path: &str) -> Url {
        self.sim.base_url().join(path).unwrap()
    }

    /// A link the simulator handed out (on its link host), replayed on its own address as
    /// our client does (§15.1): the link host itself is not listened on.
    fn rebased(&self, link: &str) -> Url {
        let link = Url::parse(link).unwrap();
        assert_eq!(
            link.host_str(),
            self.sim.link_base_url().host_str(),
            "{link} is not on the link host"
        );
        let mut url = self.sim.base_url();
        url.set_path(link.path());
        url.set_query(link.query());
        url
    }

    /// A public API call with a valid token and the api-version.
    fn api(&self, method: Method, path: &str) -> RequestBuilder {
        let mut url = self.url(&format!("api/{path}"));
        url.query_pairs_mut()
            .append_pair("api-version", "2018-08-31");
        self.http
            .request(method, url)
            .bearer_auth(&self.token)
            .header("content-type", "application/json")
    }

    async fn purchase(&self, body: Value) -> Value {
        let response = self
            .http
            .post(self.url("simulator/purchases"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        response.json().await.unwrap()
    }

    async fn purchase_active(&self, plan: &str) -> String {
        let purchased = self
            .purchase(json!({"offerId": "contoso-analytics", "planId": plan, "autoActivate": true}))
            .await;
        purchased["subscriptionId"].as_str().unwrap().to_string()
    }

    async fn act(&self, id: &str, body: Value) -> Response {
        self.http
            .post(self.url(&format!("simulator/subscriptions/{id}/actions")))
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    async fn view(&self, id: &str) -> Value {
        self.http
            .get(self.url(&format!("simulator/subscriptions/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn subscription(&self, id: &str) -> Value {
        let response = self
            .api(Method::GET, &format!("saas/subscriptions/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.json().await.unwrap()
    }

    async fn operation(&self, id: &str, op: &str) -> Value {
        self.api(
            Method::GET,
            &format!("saas/subscriptions/{id}/operations/{op}"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
    }

    async fn set_faults(&self, faults: Value) -> Response {
        self.http
            .put(self.url("simulator/faults"))
            .json(&faults)
            .send()
            .await
            .unwrap()
    }
}

/// A publisher webhook endpoint that records calls and answers from a script (then 200).
#[derive(Clone, Default)]
struct Receiver {
    calls: Arc<Mutex<Vec<(HeaderMap, Value)>>>,
    script: Arc<Mutex<VecDeque<u16>>>,
    reject_changes: Arc<Mutex<bool>>,
}

impl Receiver {
    async fn start() -> (Self, Url) {
        let receiver = Self::default();
        let app = Router::new()
            .route("/webhook", post(receive))
            .with_state(receiver.clone());
        let address = common::serve_local(app).await;
        let url = Url::parse(&format!("http://{address}/webhook")).unwrap();
        (receiver, url)
    }

    fn calls(&self) -> Vec<(HeaderMap, Value)> {
        self.calls.lock().unwrap().clone()
    }

    async fn wait_for(&self, action: &str) -> (HeaderMap, Value) {
        wait_until(&format!("a {action} webhook"), DEADLINE, || async {
            self.calls()
                .into_iter()
                .find(|(_, body)| body["action"] == action)
        })
        .await
        .unwrap()
    }
}

async fn receive(
    State(receiver): State<Receiver>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let body: Value = serde_json::from_slice(&body).unwrap();
    let is_change = matches!(
        body["action"].as_str(),
        Some("ChangePlan" | "ChangeQuantity")
    );
    receiver.calls.lock().unwrap().push((headers, body));
    if is_change && *receiver.reject_changes.lock().unwrap() {
        return StatusCode::BAD_REQUEST;
    }
    let scripted = receiver.script.lock().unwrap().pop_front();
    StatusCode::from_u16(scripted.unwrap_or(200)).unwrap()
}

fn bearer(headers: &HeaderMap) -> String {
    headers["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn token_endpoint_answers_in_v2_and_v1_shapes_and_rejects_a_bad_secret() {
    let s = TestSim::plain().await;
    let tenant = s.sim.config().tenant_id;
    let client = s.sim.config().client_id.to_string();
    let form = |extra: (&'static str, String), secret: &str| {
        vec![
            ("grant_type", "client_credentials".to_string()),
            ("client_id", client.clone()),
            ("client_secret", secret.to_string()),
            (extra.0, extra.1),
        ]
    };
    let v2: Value = s
        .http
        .post(s.url(&format!("{tenant}/oauth2/v2.0/token")))
        .form(&form(
            ("scope", format!("{MARKETPLACE_APP_ID}/.default")),
            SIM_SECRET,
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v2["token_type"], "Bearer");
    assert!(v2["expires_in"].is_u64(), "{v2}");
    assert!(v2.get("resource").is_none());

    let v1: Value = s
        .http
        .post(s.url(&format!("{tenant}/oauth2/token")))
        .form(&form(
            ("resource", MARKETPLACE_APP_ID.to_string()),
            SIM_SECRET,
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(v1["expires_in"].is_string(), "{v1}");
    assert!(v1["expires_on"].as_str().unwrap().parse::<i64>().is_ok());
    assert_eq!(v1["resource"], MARKETPLACE_APP_ID);

    // Both tokens open the API.
    for token in [&v2["access_token"], &v1["access_token"]] {
        let mut url = s.url("api/saas/subscriptions");
        url.set_query(Some("api-version=2018-08-31"));
        let response = s
            .http
            .get(url)
            .bearer_auth(token.as_str().unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }

    let bad = s
        .http
        .post(s.url(&format!("{tenant}/oauth2/v2.0/token")))
        .form(&form(
            ("scope", format!("{MARKETPLACE_APP_ID}/.default")),
            "wrong",
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNAUTHORIZED);
    let body: Value = bad.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .starts_with("AADSTS7000215")
    );

    let other_tenant = s
        .http
        .post(s.url(&format!("{}/oauth2/v2.0/token", Uuid::new_v4())))
        .form(&form(
            ("scope", format!("{MARKETPLACE_APP_ID}/.default")),
            SIM_SECRET,
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(other_tenant.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn api_refuses_missing_forged_and_foreign_tokens_with_403() {
    let s = TestSim::plain().await;
    let other = TestSim::plain().await;
    let mut url = s.url("api/saas/subscriptions");
    url.set_query(Some("api-version=2018-08-31"));

    let mut wrong_tenant = s.sim.issue_access_token().unwrap();
    let mut claims: Value = {
        let payload = wrong_tenant.split('.').nth(1).unwrap();
        use base64::Engine;
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    claims["tid"] = json!(Uuid::new_v4());
    wrong_tenant = s.sim.sign_token(&claims).unwrap();
    let mut other_app = claims.clone();
    other_app["tid"] = json!(s.sim.config().tenant_id);
    other_app["azp"] = json!(Uuid::new_v4());
    let other_app = s.sim.sign_token(&other_app).unwrap();
    let mut expired = other_app.clone();
    if let Some(mut c) = Some(claims.clone()) {
        c["tid"] = json!(s.sim.config().tenant_id);
        c["exp"] = json!(1_600_000_000);
        expired = s.sim.sign_token(&c).unwrap();
    }
    let forged = other.sim.issue_access_token().unwrap();
    let tampered = {
        let valid = s.sim.issue_access_token().unwrap();
        let mut parts: Vec<String> = valid.split('.').map(String::from).collect();
        parts[2] = parts[2].chars().rev().collect();
        parts.join(".")
    };

    let no_token = s.http.get(url.clone()).send().await.unwrap();
    assert_eq!(no_token.status(), StatusCode::FORBIDDEN);
    assert!(no_token.headers().contains_key("x-ms-requestid"));
    for (name, token) in [
        ("forged", forged),
        ("tampered", tampered),
        ("wrong tenant", wrong_tenant),
        ("other app", other_app),
        ("expired", expired),
    ] {
        let response = s
            .http
            .get(url.clone())
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN, "{name}");
    }
}

#[tokio::test]
async fn api_version_is_required_and_request_ids_are_echoed() {
    let s = TestSim::plain().await;
    let missing = s
        .http
        .get(s.url("api/saas/subscriptions"))
        .bearer_auth(&s.token)
        .header("x-ms-requestid", "req-1")
        .header("x-ms-correlationid", "corr-1")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);
    assert_eq!(missing.headers()["x-ms-requestid"], "req-1");
    assert_eq!(missing.headers()["x-ms-correlationid"], "corr-1");
    let body: Value = missing.json().await.unwrap();
    assert_eq!(body["Error"]["Code"], "ApiVersionUnspecified");

    let mut url = s.url("api/saas/subscriptions");
    url.set_query(Some("api-version=2023-01-01"));
    let unknown = s.http.get(url).bearer_auth(&s.token).send().await.unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    let body: Value = unknown.json().await.unwrap();
    assert_eq!(body["Error"]["Code"], "UnsupportedApiVersion");

    let ok = s
        .api(Method::GET, "saas/subscriptions")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
    assert!(Uuid::parse_str(ok.headers()["x-ms-requestid"].to_str().unwrap()).is_ok());
}

#[tokio::test]
async fn a_purchase_resolves_with_the_decoded_token_and_activates_asynchronously() {
    let s = TestSim::plain().await;
    let purchased = s
        .purchase(json!({"offerId": "contoso-analytics", "planId": "per-seat", "quantity": 5}))
        .await;
    let id = purchased["subscriptionId"].as_str().unwrap();
    let token = purchased["token"].as_str().unwrap();
    let landing = Url::parse(purchased["landingUrl"].as_str().unwrap()).unwrap();
    assert!(landing.as_str().contains("%2B") || landing.as_str().contains("%2F"));
    let decoded = landing.query_pairs().find(|(k, _)| k == "token").unwrap().1;
    assert_eq!(decoded, token);

    // Decoding twice turns '+' into a space: the token no longer resolves (P1).
    let mangled = s
        .api(Method::POST, "saas/subscriptions/resolve")
        .header("x-ms-marketplace-token", token.replace('+', " "))
        .send()
        .await
        .unwrap();
    assert_eq!(mangled.status(), StatusCode::BAD_REQUEST);
    let missing = s
        .api(Method::POST, "saas/subscriptions/resolve")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::BAD_REQUEST);

    let resolved: Value = s
        .api(Method::POST, "saas/subscriptions/resolve")
        .header("x-ms-marketplace-token", decoded.as_ref())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(resolved["id"], id);
    assert_eq!(resolved["planId"], "per-seat");
    assert_eq!(resolved["quantity"], 5);
    let subscription = &resolved["subscription"];
    assert_eq!(
        subscription["saasSubscriptionStatus"],
        "PendingFulfillmentStart"
    );
    assert!(subscription["term"].get("startDate").is_none());
    assert_eq!(
        subscription["beneficiary"]["tenantId"],
        subscription["purchaser"]["tenantId"]
    );

    let activate = s
        .api(Method::POST, &format!("saas/subscriptions/{id}/activate"))
        .json(&json!({"planId": "per-seat", "quantity": 5}))
        .send()
        .await
        .unwrap();
    assert_eq!(activate.status(), StatusCode::OK);
    assert_eq!(activate.content_length(), Some(0));

    let active = wait_until("Subscribed", DEADLINE, || async {
        let sub = s.subscription(id).await;
        (sub["saasSubscriptionStatus"] == "Subscribed").then_some(sub)
    })
    .await
    .unwrap();
    assert!(active["term"]["startDate"].as_str().unwrap().ends_with('Z'));
    assert!(active["term"]["endDate"].is_string());

    // Activating again is a harmless no-op; an unknown subscription is 404.
    let again = s
        .api(Method::POST, &format!("saas/subscriptions/{id}/activate"))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let unknown = s
        .api(
            Method::POST,
            &format!("saas/subscriptions/{}/activate", Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

async fn verify_webhook_token(s: &TestSim, token: &str) -> Value {
    let jwks: JwkSet = s
        .http
        .get(s.sim.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = decode_header(token).unwrap().kid.unwrap();
    let key = DecodingKey::from_jwk(jwks.find(&kid).unwrap()).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[s.sim.config().client_id.to_string()]);
    validation.set_issuer(&[s.sim.v2_issuer()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = decode::<Value>(token, &key, &validation).unwrap().claims;
    assert_eq!(claims["tid"], s.sim.config().tenant_id.to_string());
    assert_eq!(claims["azp"], MARKETPLACE_APP_ID);
    claims
}

#[tokio::test]
async fn a_customer_plan_change_sends_a_verifiable_webhook_and_is_auto_accepted() {
    let (receiver, webhook) = Receiver::start().await;
    let s = TestSim::start(Some(webhook), |_| {}).await;
    let id = s.purchase_active("silver").await;
    receiver.wait_for("Subscribe").await;

    let response = s
        .act(&id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let op: Value = response.json().await.unwrap();
    let op_id = op["operationId"].as_str().unwrap().to_string();

    let (headers, body) = receiver.wait_for("ChangePlan").await;
    verify_webhook_token(&s, &bearer(&headers)).await;
    assert_eq!(body["id"], op_id.as_str());
    assert_eq!(body["planId"], "gold");
    assert_eq!(body["status"], "InProgress");
    assert_eq!(body["operationRequestSource"], "Azure");
    assert_eq!(body["subscription"]["planId"], "silver");
    assert!(body["purchaseToken"].is_null());

    // A webhook token for another audience does not verify.
    let wrong = s
        .sim
        .mint_webhook_token(json!({"aud": Uuid::new_v4()}))
        .unwrap();
    let jwks: JwkSet = s
        .http
        .get(s.sim.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[s.sim.config().client_id.to_string()]);
    assert!(decode::<Value>(&wrong, &key, &validation).is_err());

    // Listed as awaiting acknowledgement until the window closes, then applied.
    let pending: Value = s
        .api(Method::GET, &format!("saas/subscriptions/{id}/operations"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        pending["operations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["id"] == op_id.as_str())
    );
    wait_until("auto-accept", DEADLINE, || async {
        (s.subscription(&id).await["planId"] == "gold").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(s.operation(&id, &op_id).await["status"], "Succeeded");
}

#[tokio::test]
async fn a_customer_change_acknowledged_as_failure_keeps_the_old_quantity() {
    let (receiver, webhook) = Receiver::start().await;
    let s = TestSim::start(Some(webhook), |c| {
        c.timings.ack_window = Duration::from_secs(5)
    })
    .await;
    let id = s.purchase_active("per-seat").await;
    let op: Value = s
        .act(&id, json!({"action": "ChangeQuantity", "quantity": 7}))
        .await
        .json()
        .await
        .unwrap();
    let op_id = op["operationId"].as_str().unwrap();
    let (_, body) = receiver.wait_for("ChangeQuantity").await;
    assert_eq!(body["quantity"], 7);

    let path = format!("saas/subscriptions/{id}/operations/{op_id}");
    let ack = s
        .api(Method::PATCH, &path)
        .json(&json!({"status": "Failure"}))
        .send()
        .await
        .unwrap();
    assert_eq!(ack.status(), StatusCode::OK);
    assert_eq!(s.operation(&id, op_id).await["status"], "Failed");
    assert_eq!(s.subscription(&id).await["quantity"], 1);

    let again = s
        .api(Method::PATCH, &path)
        .json(&json!({"status": "Success"}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let bad = s
        .api(Method::PATCH, &path)
        .json(&json!({"status": "Done"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let unknown = s
        .api(
            Method::GET,
            &format!("saas/subscriptions/{id}/operations/{}", Uuid::new_v4()),
        )
        .send()
        .await
        .unwrap();
    // The live service's answer to an unknown operation id (§15.2; `strict_404` gives the docs' 404).
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_4xx_answer_to_a_change_webhook_rejects_it() {
    let (receiver, webhook) = Receiver::start().await;
    *receiver.reject_changes.lock().unwrap() = true;
    let s = TestSim::start(Some(webhook), |c| {
        c.timings.ack_window = Duration::from_secs(5)
    })
    .await;
    let id = s.purchase_active("silver").await;
    let op: Value = s
        .act(&id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await
        .json()
        .await
        .unwrap();
    let op_id = op["operationId"].as_str().unwrap();
    wait_until("rejection", DEADLINE, || async {
        (s.operation(&id, op_id).await["status"] == "Failed").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(s.subscription(&id).await["planId"], "silver");
    let view = s.view(&id).await;
    let delivery = view["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["action"] == "ChangePlan")
        .unwrap()
        .clone();
    assert_eq!(delivery["outcome"], "Rejected");
    assert_eq!(delivery["attempts"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn publisher_changes_complete_asynchronously_and_lock_the_subscription() {
    let s = TestSim::start(None, |c| {
        c.timings.operation_delay = Duration::from_millis(300)
    })
    .await;
    let id = s.purchase_active("silver").await;
    let path = format!("saas/subscriptions/{id}");

    let both = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "gold", "quantity": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), StatusCode::BAD_REQUEST);
    let same = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "silver"}))
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), StatusCode::BAD_REQUEST);
    let unknown_plan = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "platinum"}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_plan.status(), StatusCode::BAD_REQUEST);
    let malformed = s
        .api(Method::PATCH, &path)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);

    let accepted = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "gold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let location = accepted.headers()["operation-location"]
        .to_str()
        .unwrap()
        .to_string();
    let op_id = accepted.headers()["operation-id"]
        .to_str()
        .unwrap()
        .to_string();
    // Production's 202 (§15.1): absolute, on another host, with Operation-Id and Retry-After.
    assert!(
        location.starts_with(s.sim.link_base_url().as_str()),
        "{location}"
    );
    assert_ne!(s.sim.link_base_url().host(), s.sim.base_url().host());
    assert!(location.contains(&op_id) && location.contains("api-version=2018-08-31"));
    assert_eq!(
        accepted.headers()["retry-after"],
        "0",
        "Timings::fast() says 0 s"
    );
    let first: Value = s
        .http
        .get(s.rebased(&location))
        .bearer_auth(&s.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["status"], "NotStarted", "{first}");
    assert_eq!(first["operationRequestSource"], "Partner");

    let locked = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "per-seat"}))
        .send()
        .await
        .unwrap();
    assert_eq!(locked.status(), StatusCode::BAD_REQUEST);
    let body: Value = locked.json().await.unwrap();
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("locked due to pending operations")
    );
    let delete_locked = s.api(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(delete_locked.status(), StatusCode::CONFLICT);

    let poll = |location: String| {
        let s = &s;
        async move {
            wait_until("operation to finish", DEADLINE, || {
                let location = s.rebased(&location);
                async move {
                    let op: Value = s
                        .http
                        .get(location)
                        .bearer_auth(&s.token)
                        .send()
                        .await
                        .unwrap()
                        .json()
                        .await
                        .unwrap();
                    (op["status"] != "InProgress" && op["status"] != "NotStarted").then_some(op)
                }
            })
            .await
            .unwrap()
        }
    };
    let op = poll(location).await;
    assert_eq!(op["status"], "Succeeded");
    assert_eq!(op["action"], "ChangePlan");
    assert_eq!(s.subscription(&id).await["planId"], "gold");

    let deleted = s.api(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(deleted.status(), StatusCode::ACCEPTED);
    let op = poll(
        deleted.headers()["operation-location"]
            .to_str()
            .unwrap()
            .to_string(),
    )
    .await;
    assert_eq!(op["status"], "Succeeded");
    assert_eq!(op["action"], "Unsubscribe");
    assert_eq!(
        s.subscription(&id).await["saasSubscriptionStatus"],
        "Unsubscribed"
    );
    // What a GET answered, in order, is kept for tests of pollers.
    let view = s.view(&id).await;
    let cancel = view["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["action"] == "Unsubscribe")
        .unwrap();
    let reads = cancel["reads"].as_array().unwrap();
    assert_eq!(reads.first(), Some(&json!("NotStarted")), "{view}");
    assert_eq!(reads.last(), Some(&json!("Succeeded")), "{view}");
    let patch_unsubscribed = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "silver"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch_unsubscribed.status(), StatusCode::BAD_REQUEST);
    let activate = s
        .api(Method::POST, &format!("{path}/activate"))
        .send()
        .await
        .unwrap();
    assert_eq!(activate.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn listing_pages_vary_in_size_with_next_links_on_the_other_host_and_none_on_the_last() {
    let s = TestSim::plain().await;
    let empty = s
        .api(Method::GET, "saas/subscriptions")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status(), StatusCode::OK);
    assert!(empty.bytes().await.unwrap().is_empty());

    for i in 0..250 {
        let plan = ["silver", "gold", "per-seat"][i % 3];
        s.purchase(json!({"offerId": "contoso-analytics", "planId": plan}))
            .await;
    }
    let mut next = {
        let mut url = s.url("api/saas/subscriptions");
        url.set_query(Some("api-version=2018-08-31"));
        url.to_string()
    };
    let mut sizes = Vec::new();
    let mut ids = std::collections::HashSet::new();
    loop {
        let page: Value = s
            .http
            .get(next.as_str())
            .bearer_auth(&s.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let subscriptions = page["subscriptions"].as_array().unwrap();
        sizes.push(subscriptions.len());
        ids.extend(
            subscriptions
                .iter()
                .map(|s| s["id"].as_str().unwrap().to_string()),
        );
        match page.get("@nextLink") {
            Some(link) => next = s.rebased(link.as_str().unwrap()).to_string(),
            // The last page has no `@nextLink` at all, not even an empty one.
            None => break,
        }
    }
    assert_eq!(ids.len(), 250);
    let (last, full) = sizes.split_last().unwrap();
    assert!(full.iter().all(|n| (66..=89).contains(n)), "{sizes:?}");
    assert!(*last <= 89, "{sizes:?}");
    assert!(
        full.iter().any(|n| *n != full[0]),
        "pages vary in size: {sizes:?}"
    );
}

#[tokio::test]
async fn a_webhook_answered_500_twice_is_delivered_on_the_third_attempt() {
    let (receiver, webhook) = Receiver::start().await;
    receiver.script.lock().unwrap().extend([500, 500]);
    let s = TestSim::start(Some(webhook), |_| {}).await;
    let id = s.purchase_active("gold").await;
    let delivery = wait_until("delivery", DEADLINE, || async {
        let view = s.view(&id).await;
        let delivery = view["webhooks"][0].clone();
        (delivery["delivered"] == true).then_some(delivery)
    })
    .await
    .unwrap();
    let codes: Vec<u64> = delivery["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["statusCode"].as_u64().unwrap())
        .collect();
    assert_eq!(codes, [500, 500, 200]);
    assert_eq!(delivery["action"], "Subscribe");
    assert_eq!(receiver.calls().len(), 3);
}

#[tokio::test]
async fn injected_faults_answer_500_or_429_with_retry_after() {
    let s = TestSim::plain().await;
    assert_eq!(
        s.set_faults(json!({"share5xx": 1.0})).await.status(),
        StatusCode::OK
    );
    let failed = s
        .api(Method::GET, "saas/subscriptions")
        .send()
        .await
        .unwrap();
    assert_eq!(failed.status(), StatusCode::INTERNAL_SERVER_ERROR);

    s.set_faults(json!({"share429": 1.0, "retryAfterSecs": 7, "seed": 42}))
        .await;
    let throttled = s
        .api(Method::GET, "saas/subscriptions")
        .send()
        .await
        .unwrap();
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.headers()["retry-after"], "7");
    let current: Value = s
        .http
        .get(s.url("simulator/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current["share429"], 1.0);

    assert_eq!(
        s.set_faults(json!({"share5xx": 2.0})).await.status(),
        StatusCode::BAD_REQUEST
    );
    s.set_faults(json!({})).await;
    let ok = s
        .api(Method::GET, "saas/subscriptions")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn metering_rejects_duplicates_in_the_same_hour_and_oversized_batches() {
    let s = TestSim::plain().await;
    let id = s.purchase_active("silver").await;
    let now = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let event = json!({"resourceId": id, "quantity": 5.0, "dimension": "api-calls",
                       "effectiveStartTime": now, "planId": "silver"});
    let first = s
        .api(Method::POST, "usageEvent")
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let accepted: Value = first.json().await.unwrap();
    assert_eq!(accepted["status"], "Accepted");

    let duplicate = s
        .api(Method::POST, "usageEvent")
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    let body: Value = duplicate.json().await.unwrap();
    assert_eq!(body["code"], "Conflict");
    assert_eq!(
        body["additionalInfo"]["acceptedMessage"]["usageEventId"],
        accepted["usageEventId"]
    );

    let too_many = json!({"request": vec![event.clone(); 26]});
    let batch = s
        .api(Method::POST, "batchUsageEvent")
        .json(&too_many)
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), StatusCode::BAD_REQUEST);

    let mut unknown_dimension = event.clone();
    unknown_dimension["dimension"] = json!("storage-gb");
    let pending = s
        .purchase(json!({"offerId": "contoso-analytics", "planId": "silver"}))
        .await;
    let mut inactive = event.clone();
    inactive["resourceId"] = pending["subscriptionId"].clone();
    let mut expired = event.clone();
    expired["effectiveStartTime"] = json!("2020-01-01T00:00:00Z");
    let result: Value = s
        .api(Method::POST, "batchUsageEvent")
        .json(&json!({"request": [event, unknown_dimension, inactive, expired]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let statuses: Vec<&str> = result["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "Duplicate",
            "InvalidDimension",
            "ResourceNotActive",
            "Expired"
        ]
    );
    assert_eq!(result["count"], 4);

    let today = time::OffsetDateTime::now_utc().date();
    let usage: Value = s
        .api(Method::GET, "usageEvents")
        .query(&[("usageStartDate", today.to_string())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(usage[0]["submittedQuantity"], 5.0);
    let no_start = s.api(Method::GET, "usageEvents").send().await.unwrap();
    assert_eq!(no_start.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn rotated_keys_stay_published_and_state_survives_a_restart() {
    let dir = std::env::temp_dir().join(format!("simulator-state-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("state.json");
    let config = |c: &mut SimulatorConfig| c.state_file = Some(file.clone());
    let s = TestSim::start(None, config).await;
    let tenant = s.sim.config().tenant_id;
    let client = s.sim.config().client_id;
    let id = s.purchase_active("gold").await;
    let rotated: Value = s
        .http
        .post(s.url("simulator/keys/rotate"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rotated["kids"].as_array().unwrap().len(), 2);
    let jwks: Value = s
        .http
        .get(s.sim.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(jwks["keys"].as_array().unwrap().len(), 2);
    // The token minted with the old key still opens the API.
    assert_eq!(s.subscription(&id).await["planId"], "gold");
    let old_token = s.token.clone();
    s.sim.shutdown().await.unwrap();

    let restarted = TestSim::start(None, |c| {
        c.tenant_id = tenant;
        c.client_id = client;
        c.state_file = Some(file.clone());
    })
    .await;
    let response = restarted
        .api(Method::GET, &format!("saas/subscriptions/{id}"))
        .bearer_auth(&old_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let sub: Value = response.json().await.unwrap();
    assert_eq!(sub["saasSubscriptionStatus"], "Subscribed");
    restarted.sim.shutdown().await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn admin_actions_follow_the_lifecycle_and_refuse_invalid_transitions() {
    let (receiver, webhook) = Receiver::start().await;
    let s = TestSim::start(Some(webhook), |_| {}).await;
    let id = s.purchase_active("silver").await;
    assert_eq!(
        s.act(&id, json!({"action": "Reinstate"})).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.act(&id, json!({"action": "Explode"})).await.status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        s.act(&id, json!({"action": "Suspend"})).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.subscription(&id).await["saasSubscriptionStatus"],
        "Suspended"
    );
    let (_, suspend) = receiver.wait_for("Suspend").await;
    assert_eq!(suspend["status"], "Succeeded");
    assert_eq!(
        suspend["subscription"]["saasSubscriptionStatus"],
        "Suspended"
    );

    let activate = s
        .api(Method::POST, &format!("saas/subscriptions/{id}/activate"))
        .send()
        .await
        .unwrap();
    assert_eq!(activate.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        s.act(&id, json!({"action": "Reinstate"})).await.status(),
        StatusCode::ACCEPTED
    );
    wait_until("reinstatement", DEADLINE, || async {
        (s.subscription(&id).await["saasSubscriptionStatus"] == "Subscribed").then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        s.act(&id, json!({"action": "Unsubscribe"})).await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        s.subscription(&id).await["saasSubscriptionStatus"],
        "Unsubscribed"
    );
    receiver.wait_for("Unsubscribe").await;
    let all: Value = s
        .http
        .get(s.url("simulator/subscriptions"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let actions: Vec<&str> = all["subscriptions"][0]["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["Subscribe", "Suspend", "Reinstate", "Unsubscribe"]
    );
}

#[tokio::test]
async fn webhook_faults_duplicate_deliveries_and_inject_unknown_actions_with_v1_tokens() {
    let (receiver, webhook) = Receiver::start().await;
    let s = TestSim::start(Some(webhook), |c| c.issuer = IssuerVersion::V1).await;
    let id = s.purchase_active("silver").await;
    receiver.wait_for("Subscribe").await;
    let faults =
        json!({"duplicateDeliveries": 1.0, "unknownActions": 1.0, "reorder": 50, "seed": 7});
    assert_eq!(s.set_faults(faults).await.status(), StatusCode::OK);
    assert_eq!(
        s.act(&id, json!({"action": "Renew"})).await.status(),
        StatusCode::ACCEPTED
    );

    let calls = wait_until("duplicate and injected webhooks", DEADLINE, || async {
        let calls = receiver.calls();
        let renews = calls.iter().filter(|(_, b)| b["action"] == "Renew").count();
        let odd = calls
            .iter()
            .filter(|(_, b)| !matches!(b["action"].as_str(), Some("Renew" | "Subscribe")))
            .count();
        (renews == 2 && odd == 1).then_some(calls)
    })
    .await
    .unwrap();
    let (headers, renew) = calls.iter().find(|(_, b)| b["action"] == "Renew").unwrap();
    assert_eq!(renew["status"], "Succeeded");
    let token = bearer(headers);
    let jwks: JwkSet = s
        .http
        .get(s.sim.jwks_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = DecodingKey::from_jwk(
        jwks.find(&decode_header(&token).unwrap().kid.unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[s.sim.config().client_id.to_string()]);
    let tenant = s.sim.config().tenant_id;
    validation.set_issuer(&[format!("https://sts.windows.net/{tenant}/")]);
    let claims = decode::<Value>(&token, &key, &validation).unwrap().claims;
    assert_eq!(claims["appid"], MARKETPLACE_APP_ID);
    let view = s.view(&id).await;
    let webhooks = view["webhooks"].as_array().unwrap();
    assert!(webhooks.iter().any(|w| w["duplicate"] == true));
    assert!(webhooks.iter().any(|w| w["injected"] == true));
}

#[tokio::test]
async fn operations_are_listed_acknowledged_and_refused_like_the_live_service() {
    let s = TestSim::start(None, |c| {
        c.timings.operation_delay = Duration::from_secs(30);
        c.timings.ack_window = Duration::from_secs(30);
    })
    .await;
    let ours = s.purchase_active("silver").await;
    let theirs = s.purchase_active("per-seat").await;
    let accepted = s
        .api(Method::PATCH, &format!("saas/subscriptions/{ours}"))
        .json(&json!({"planId": "gold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    let partner_op = accepted.headers()["operation-id"]
        .to_str()
        .unwrap()
        .to_string();
    let customer_op = s
        .act(&theirs, json!({"action": "ChangeQuantity", "quantity": 7}))
        .await
        .json::<Value>()
        .await
        .unwrap()["operationId"]
        .as_str()
        .unwrap()
        .to_string();

    let list = |id: String| {
        let s = &s;
        async move {
            let listed: Value = s
                .api(Method::GET, &format!("saas/subscriptions/{id}/operations"))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            listed["operations"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["id"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        }
    };
    // Only what waits for our ACK: the customer's change, never our own PATCH (§15.2).
    assert_eq!(list(ours.clone()).await, Vec::<String>::new());
    assert_eq!(list(theirs.clone()).await, vec![customer_op.clone()]);

    let ack = |id: String, op: String| {
        let s = &s;
        async move {
            s.api(
                Method::PATCH,
                &format!("saas/subscriptions/{id}/operations/{op}"),
            )
            .json(&json!({"status": "Success"}))
            .send()
            .await
            .unwrap()
            .status()
        }
    };
    assert_eq!(
        ack(ours.clone(), partner_op.clone()).await,
        StatusCode::INTERNAL_SERVER_ERROR,
        "ACKing our own operation"
    );
    let unknown = Uuid::new_v4().to_string();
    assert_eq!(
        ack(ours.clone(), unknown.clone()).await,
        StatusCode::BAD_REQUEST
    );
    let get_unknown = s
        .api(
            Method::GET,
            &format!("saas/subscriptions/{ours}/operations/{unknown}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(get_unknown.status(), StatusCode::BAD_REQUEST, "as live");
    assert_eq!(
        ack(theirs.clone(), customer_op.clone()).await,
        StatusCode::OK
    );

    let strict = TestSim::start(None, |c| c.strict_404 = true).await;
    let id = strict.purchase_active("silver").await;
    let documented = strict
        .api(
            Method::GET,
            &format!("saas/subscriptions/{id}/operations/{unknown}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(documented.status(), StatusCode::NOT_FOUND, "--strict-404");
}

#[tokio::test]
async fn purchases_carry_the_2026_fields_and_csp_purchases_refuse_publisher_changes() {
    let s = TestSim::plain().await;
    let buy = |body: Value| {
        let s = &s;
        async move {
            let mut body = body;
            body["offerId"] = json!("contoso-analytics");
            s.http
                .post(s.url("simulator/purchases"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    for unit in ["PAY", "P18M", "P4Y"] {
        let created: Value =
            buy(json!({"planId": "silver", "termUnit": unit, "autoActivate": true}))
                .await
                .json()
                .await
                .unwrap();
        let sub = s
            .subscription(created["subscriptionId"].as_str().unwrap())
            .await;
        assert_eq!(sub["term"]["termUnit"], unit);
        assert!(sub["term"]["endDate"].is_string(), "{sub}");
    }
    let p4y = buy(json!({"planId": "silver", "termUnit": "P4Y"})).await;
    let p4y: Value = p4y.json().await.unwrap();
    let p4y = s
        .subscription(p4y["subscriptionId"].as_str().unwrap())
        .await;
    assert_eq!(p4y["term"]["chargeDuration"], "P1Y", "billed yearly");
    assert_eq!(
        buy(json!({"planId": "silver", "termUnit": "monthly"}))
            .await
            .status(),
        StatusCode::BAD_REQUEST
    );

    let anonymous: Value = buy(json!({"planId": "silver", "nullPuid": true, "autoRenew": false}))
        .await
        .json()
        .await
        .unwrap();
    let anonymous = s
        .subscription(anonymous["subscriptionId"].as_str().unwrap())
        .await;
    assert_eq!(anonymous["beneficiary"]["puid"], Value::Null);
    assert_eq!(anonymous["beneficiary"]["emailId"], Value::Null);
    assert_eq!(anonymous["autoRenew"], false);

    let csp: Value = buy(json!({"planId": "silver", "csp": true, "autoActivate": true}))
        .await
        .json()
        .await
        .unwrap();
    let csp_id = csp["subscriptionId"].as_str().unwrap().to_string();
    let sub = s.subscription(&csp_id).await;
    assert_eq!(sub["sandboxType"], "Csp");
    assert_eq!(sub["allowedCustomerOperations"], json!(["Read"]));
    assert_ne!(sub["purchaser"]["tenantId"], sub["beneficiary"]["tenantId"]);
    let path = format!("saas/subscriptions/{csp_id}");
    let patch = s
        .api(Method::PATCH, &path)
        .json(&json!({"planId": "gold"}))
        .send()
        .await
        .unwrap();
    assert_eq!(patch.status(), StatusCode::BAD_REQUEST);
    let delete = s.api(Method::DELETE, &path).send().await.unwrap();
    assert_eq!(delete.status(), StatusCode::BAD_REQUEST);

    let offer = Uuid::new_v4().to_string();
    let private: Value = buy(json!({"planId": "gold", "privateOfferId": offer}))
        .await
        .json()
        .await
        .unwrap();
    let private_id = private["subscriptionId"].as_str().unwrap();
    let plans: Value = s
        .api(
            Method::GET,
            &format!("saas/subscriptions/{private_id}/listAvailablePlans?planId=gold"),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        plans["plans"][0]["sourceOffers"],
        json!([{"externalId": offer}]),
        "{plans}"
    );
}

#[tokio::test]
async fn the_catalogue_comes_from_a_file_or_the_admin_api() {
    let dir = std::env::temp_dir().join(format!("sim-catalogue-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("catalogue.toml");
    std::fs::write(
        &file,
        r#"
[[plans]]
offerId = "fabrikam-crm"
planId = "team"
isPricePerSeat = true
minQuantity = 5
maxQuantity = 50
price = 9.5
termUnit = "P1Y"
hasFreeTrial = true

[[plans]]
offerId = "fabrikam-crm"
planId = "enterprise"
termUnit = "P18M"
dimensions = ["contacts"]
autoActivate = true
"#,
    )
    .unwrap();
    let catalogue = marketplace_fulfillment::simulator::Catalogue::load(&file).unwrap();
    assert_eq!(catalogue.plans.len(), 2);
    assert_eq!(catalogue.plans[1].display_name, "Enterprise");
    std::fs::write(
        &file,
        "[[plans]]\nofferId = \"x\"\nplanId = \"y\"\ntermUnit = \"monthly\"\n",
    )
    .unwrap();
    let error = marketplace_fulfillment::simulator::Catalogue::load(&file).unwrap_err();
    assert!(format!("{error:#}").contains("termUnit"), "{error:#}");
    std::fs::remove_dir_all(&dir).unwrap();

    let plans = catalogue.plans.clone();
    let s = TestSim::start(None, move |c| c.plans = plans).await;
    // The plan's own auto-activation and free trial apply to a purchase that names neither.
    let created = s
        .purchase(json!({"offerId": "fabrikam-crm", "planId": "enterprise"}))
        .await;
    let sub = s
        .subscription(created["subscriptionId"].as_str().unwrap())
        .await;
    assert_eq!(sub["saasSubscriptionStatus"], "Subscribed");
    assert_eq!(sub["term"]["termUnit"], "P18M");
    let created = s
        .purchase(json!({"offerId": "fabrikam-crm", "planId": "team", "quantity": 10}))
        .await;
    let sub = s
        .subscription(created["subscriptionId"].as_str().unwrap())
        .await;
    assert_eq!(sub["isFreeTrial"], true);
    assert_eq!(sub["saasSubscriptionStatus"], "PendingFulfillmentStart");

    // Replaced while running through the admin API; bad catalogues are refused.
    let put = |body: Value| {
        let s = &s;
        async move {
            s.http
                .put(s.url("simulator/catalogue"))
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let replaced = put(json!({"plans": [
        {"offerId": "contoso-analytics", "planId": "starter", "price": 5.0}
    ]}))
    .await;
    assert_eq!(replaced.status(), StatusCode::OK);
    assert_eq!(
        s.http
            .post(s.url("simulator/purchases"))
            .json(&json!({"offerId": "contoso-analytics", "planId": "starter"}))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::CREATED
    );
    for bad in [
        json!({"plans": []}),
        json!({"plans": [{"offerId": "o", "planId": "p", "isPricePerSeat": true}]}),
        json!({"plans": [{"offerId": "o", "planId": "p"}, {"offerId": "o", "planId": "p"}]}),
        json!({"plans": [{"offerId": "o", "planId": "p", "colour": "red"}]}),
    ] {
        assert_eq!(
            put(bad.clone()).await.status(),
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    let shown: Value = s
        .http
        .get(s.url("simulator/catalogue"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["plans"][0]["planId"], "starter");
}

/// `fulfillment simulate` with no environment generates the publisher's identity and prints
/// what `serve` and `work` need.
#[test]
fn simulate_without_an_environment_prints_a_generated_identity() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut command = Command::new(env!("CARGO_BIN_EXE_fulfillment"));
    command
        .args(["simulate", "--listen", "127.0.0.1:0"])
        .env_remove("FULFILLMENT_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (key, _) in std::env::vars() {
        if key.starts_with("MARKETPLACE_") || key.starts_with("FULFILLMENT__MARKETPLACE") {
            command.env_remove(key);
        }
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = String::new();
    let variables = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            panic!("simulate ended without printing the variables:\n{printed}");
        };
        printed.push_str(&line);
        printed.push('\n');
        if line.contains("MARKETPLACE_TENANT_ID=") {
            break line;
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    let value = |name: &str| {
        variables
            .split_whitespace()
            .find_map(|pair| pair.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("{name} missing: {variables}"))
            .to_owned()
    };
    Uuid::parse_str(&value("MARKETPLACE_TENANT_ID")).unwrap();
    Uuid::parse_str(&value("MARKETPLACE_CLIENT_ID")).unwrap();
    assert!(!value("MARKETPLACE_CLIENT_SECRET").is_empty());
    assert!(value("MARKETPLACE_API_URL").starts_with("http://127.0.0.1:"));
}

/// On a compressed calendar (one day = 40 ms): a term renews the day after its end (the new
/// term starting then) or, with `autoRenew` off, ends the subscription; a subscription
/// Suspended for 30 days is unsubscribed, unless reinstated first (§5.2, §5.5).
#[tokio::test]
async fn terms_renew_or_end_and_the_suspension_grace_ends_on_a_compressed_calendar() {
    let (receiver, webhook) = Receiver::start().await;
    let day = Duration::from_millis(40);
    let s = TestSim::start(Some(webhook), |c| c.timings.day = day).await;
    let buy = |auto_renew: bool| {
        let s = &s;
        async move {
            s.purchase(json!({"offerId": "contoso-analytics", "planId": "silver",
                              "autoActivate": true, "autoRenew": auto_renew}))
                .await["subscriptionId"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let renewing = buy(true).await;
    let ending = buy(false).await;
    let suspended = buy(true).await;
    let reinstated = buy(true).await;
    let first_term = s.subscription(&renewing).await["term"].clone();
    let started = tokio::time::Instant::now();
    for id in [&suspended, &reinstated] {
        assert_eq!(
            s.act(id, json!({"action": "Suspend"})).await.status(),
            StatusCode::ACCEPTED
        );
    }
    assert_eq!(
        s.act(&reinstated, json!({"action": "Reinstate"}))
            .await
            .status(),
        StatusCode::ACCEPTED
    );

    let status = |id: String| {
        let s = &s;
        async move { s.subscription(&id).await["saasSubscriptionStatus"].clone() }
    };
    wait_until("the suspension grace to end", DEADLINE, || async {
        (status(suspended.clone()).await == "Unsubscribed").then_some(())
    })
    .await
    .unwrap();
    assert!(
        started.elapsed() >= day * 30,
        "unsubscribed after {:?}, before 30 days",
        started.elapsed()
    );
    wait_until("the term without autoRenew to end", DEADLINE, || async {
        (status(ending.clone()).await == "Unsubscribed").then_some(())
    })
    .await
    .unwrap();
    let renewed = wait_until("the term to renew", DEADLINE, || async {
        let term = s.subscription(&renewing).await["term"].clone();
        (term["startDate"] != first_term["startDate"]).then_some(term)
    })
    .await
    .unwrap();
    // The new term starts the day after the old one ended.
    let day_after = |date: &str| {
        let date = time::Date::parse(
            &date[..10],
            &time::format_description::well_known::Iso8601::DATE,
        )
        .unwrap();
        date.next_day().unwrap()
    };
    assert_eq!(
        time::Date::parse(
            &renewed["startDate"].as_str().unwrap()[..10],
            &time::format_description::well_known::Iso8601::DATE
        )
        .unwrap(),
        day_after(first_term["endDate"].as_str().unwrap())
    );
    assert_eq!(status(renewing.clone()).await, "Subscribed");
    // Reinstated inside the grace: it outlived the 30 days.
    tokio::time::sleep((day * 31).saturating_sub(started.elapsed())).await;
    assert_eq!(status(reinstated.clone()).await, "Subscribed");

    // Each ending and renewal reached the publisher as Microsoft's notify-only webhook.
    for (id, action) in [
        (&ending, "Unsubscribe"),
        (&suspended, "Unsubscribe"),
        (&renewing, "Renew"),
    ] {
        wait_until(&format!("{action} webhook of {id}"), DEADLINE, || async {
            receiver
                .calls()
                .iter()
                .any(|(_, body)| body["subscriptionId"] == id.as_str() && body["action"] == action)
                .then_some(())
        })
        .await
        .unwrap();
    }
}
