//! The Marketplace client against a wiremock stand-in for Entra and the Marketplace API:
//! request shapes, response parsing, retries and token handling.

use std::collections::HashSet;
use std::time::Duration;

use marketplace_fulfillment::marketplace::{
    CallContext, Error, MarketplaceClient, OperationStatus, RetryPolicy, SubscriptionStatus,
    TokenProvider, UpdateOperationStatus, UpdateOutcome, UsageEvent, UsageEventOutcome,
    UsageEventStatus, UsageEventsQuery,
};
use marketplace_fulfillment::settings::{MARKETPLACE_APP_ID, MarketplaceSettings, TokenEndpoint};
use secrecy::SecretString;
use serde_json::{Value, json};
use time::macros::datetime;
use url::Url;
use uuid::Uuid;
use wiremock::matchers::{
    body_json, body_string_contains, header, header_exists, method, path, query_param,
    query_param_is_missing,
};
use wiremock::{Mock, MockServer, Request, ResponseTemplate};

const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const SECRET: &str = "s3cr3t-client-value";
const ACCESS_TOKEN: &str = "eyJ0eXAi.test.token";
const SUB: &str = "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03";
const OP: &str = "c0ffee00-6666-4a1b-9c2d-3e4f5a6b7c08";

fn sub_id() -> Uuid {
    Uuid::parse_str(SUB).unwrap()
}

fn op_id() -> Uuid {
    Uuid::parse_str(OP).unwrap()
}

fn settings(server: &MockServer, api_suffix: &str, endpoint: TokenEndpoint) -> MarketplaceSettings {
    MarketplaceSettings {
        api_url: Url::parse(&format!("{}/api{api_suffix}", server.uri())).unwrap(),
        entra_authority_url: Url::parse(&server.uri()).unwrap(),
        tenant_id: Some(Uuid::parse_str(TENANT).unwrap()),
        client_id: Some(Uuid::parse_str(CLIENT).unwrap()),
        client_secret: Some(SecretString::from(SECRET.to_owned())),
        token_endpoint: endpoint,
        request_timeout: Duration::from_secs(10),
    }
}

/// Milliseconds instead of seconds; `Retry-After` capped at 2 s.
fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(10),
        max_attempts: 4,
        max_retry_after: Duration::from_secs(2),
        give_up_beyond_cap: false,
    }
}

fn client_for(settings: &MarketplaceSettings) -> MarketplaceClient {
    let tokens = TokenProvider::new(settings).unwrap();
    MarketplaceClient::new(settings, tokens)
        .unwrap()
        .with_retry_policy(fast_policy())
}

fn token_body(expires_in: Value) -> Value {
    json!({ "token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": 3599,
            "access_token": ACCESS_TOKEN })
}

async fn mount_v2_token(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(json!(3599))))
        .named("entra v2 token")
        .mount(server)
        .await;
}

/// A mock server with an Entra token endpoint, and a client pointed at it.
async fn setup() -> (MockServer, MarketplaceClient) {
    let server = MockServer::start().await;
    mount_v2_token(&server).await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V2));
    (server, client)
}

/// Every Marketplace call carries these (§1.2).
fn api_call(verb: &str, p: impl Into<String>) -> wiremock::MockBuilder {
    Mock::given(method(verb))
        .and(path(p.into()))
        .and(query_param("api-version", "2018-08-31"))
        .and(header(
            "authorization",
            format!("Bearer {ACCESS_TOKEN}").as_str(),
        ))
        .and(header("content-type", "application/json"))
        .and(header_exists("x-ms-requestid"))
        .and(header_exists("x-ms-correlationid"))
}

fn subscription_json() -> Value {
    json!({
        "id": SUB, "name": "Analytics - Fabrikam", "publisherId": "contoso",
        "offerId": "contoso-analytics", "planId": "silver", "quantity": "20",
        "saasSubscriptionStatus": "PendingFulfillmentStart",
        "beneficiary": { "emailId": "admin@fabrikam.example", "tenantId": "b2c3d4e5-5555-4f00-8000-00000000bb02" },
        "allowedCustomerOperations": ["Delete", "Update", "Read"],
        "term": { "termUnit": "P1M", "startDate": "2025-03-01T00:00:00" },
        "created": "2025-02-28T18:45:49.0735944Z", "lastModified": "0001-01-01T00:00:00",
        "aFieldFromTheFuture": true
    })
}

fn operation_json(status: &str) -> Value {
    json!({ "id": OP, "activityId": OP, "subscriptionId": SUB, "offerId": "o", "publisherId": "p",
            "planId": "gold", "quantity": null, "action": "ChangePlan",
            "timeStamp": "2018-12-01T00:00:00", "status": status,
            "errorStatusCode": "", "errorMessage": "" })
}

fn header_of(request: &Request, name: &str) -> String {
    request.headers[name].to_str().unwrap().to_owned()
}

/// The requests the server saw on `p` (token requests excluded).
async fn requests_to(server: &MockServer, p: &str) -> Vec<Request> {
    server
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.url.path() == p)
        .collect()
}

#[tokio::test]
async fn resolve_sends_the_decoded_token_and_the_tracing_headers() {
    let (server, client) = setup().await;
    api_call("POST", "/api/saas/subscriptions/resolve")
        .and(header("x-ms-marketplace-token", "ab+cd/ef=="))
        .respond_with(
            ResponseTemplate::new(200)
                .insert_header("x-ms-requestid", "ms-generated-id")
                .set_body_json(json!({
                    "id": SUB, "subscriptionName": "Analytics - Fabrikam", "offerId": "contoso-analytics",
                    "planId": "silver", "quantity": 20, "subscription": subscription_json()
                })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();

    let resolved = client.resolve(&ctx, "ab+cd/ef==").await.unwrap();

    assert_eq!(resolved.value.id, sub_id());
    assert_eq!(resolved.value.quantity, Some(20));
    let subscription = resolved.value.subscription.unwrap();
    assert_eq!(
        subscription.status,
        Some(SubscriptionStatus::PendingFulfillmentStart)
    );
    assert_eq!(subscription.quantity, Some(20));
    let meta = resolved.meta;
    assert_eq!(meta.status, 200);
    assert_eq!(meta.attempts, 1);
    assert_eq!(meta.correlation_id, ctx.correlation_id);
    assert_eq!(meta.response_request_id.as_deref(), Some("ms-generated-id"));
    let seen = requests_to(&server, "/api/saas/subscriptions/resolve").await;
    assert_eq!(
        header_of(&seen[0], "x-ms-requestid"),
        meta.request_id.to_string()
    );
    assert_eq!(
        header_of(&seen[0], "x-ms-correlationid"),
        ctx.correlation_id.to_string()
    );
    assert!(seen[0].body.is_empty());
}

#[tokio::test]
async fn activate_sends_plan_and_quantity() {
    let (server, client) = setup().await;
    api_call("POST", format!("/api/saas/subscriptions/{SUB}/activate"))
        .and(body_json(json!({ "planId": "gold", "quantity": 3 })))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();
    let done = client
        .activate(&ctx, sub_id(), "gold", Some(3))
        .await
        .unwrap();
    assert_eq!(done.meta.status, 200);

    let server = MockServer::start().await;
    mount_v2_token(&server).await;
    let client = client_for(&settings(&server, "/", TokenEndpoint::V2));
    api_call("POST", format!("/api/saas/subscriptions/{SUB}/activate"))
        .and(body_json(json!({ "planId": "silver" })))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    client
        .activate(&ctx, sub_id(), "silver", None)
        .await
        .unwrap();
}

#[tokio::test]
async fn get_subscription_parses_a_lenient_body_with_a_trailing_slash_base() {
    let server = MockServer::start().await;
    mount_v2_token(&server).await;
    let client = client_for(&settings(&server, "/", TokenEndpoint::V2));
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .expect(1)
        .mount(&server)
        .await;

    let s = client
        .get_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap()
        .into_value();

    assert_eq!(s.id, sub_id());
    assert_eq!(s.plan_id.as_deref(), Some("silver"));
    assert_eq!(s.quantity, Some(20));
    assert_eq!(
        s.term.unwrap().start_date,
        Some(datetime!(2025-03-01 0:00 UTC))
    );
    assert_eq!(s.last_modified, None);
}

#[tokio::test]
async fn listing_follows_next_link_as_is_across_three_pages() {
    let (server, client) = setup().await;
    let base = server.uri();
    let page = |ids: &[&str], next: Option<String>| {
        let subs: Vec<Value> = ids
            .iter()
            .map(|id| json!({ "id": id, "saasSubscriptionStatus": "Subscribed" }))
            .collect();
        match next {
            Some(next) => json!({ "subscriptions": subs, "@nextLink": next }),
            None => json!({ "subscriptions": subs }),
        }
    };
    let ids: Vec<String> = (0..5).map(|_| Uuid::new_v4().to_string()).collect();
    api_call("GET", "/api/saas/subscriptions")
        .and(query_param_is_missing("continuationToken"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(
            &[&ids[0], &ids[1]],
            Some(format!(
                "{base}/api/saas/subscriptions?continuationToken=p%2B2%3D&api-version=2018-08-31"
            )),
        )))
        .expect(1)
        .mount(&server)
        .await;
    api_call("GET", "/api/saas/subscriptions")
        .and(query_param("continuationToken", "p+2="))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(
            &[&ids[2], &ids[3]],
            Some(format!(
                "{base}/api/saas/subscriptions?continuationToken=p3&api-version=2018-08-31"
            )),
        )))
        .expect(1)
        .mount(&server)
        .await;
    api_call("GET", "/api/saas/subscriptions")
        .and(query_param("continuationToken", "p3"))
        .respond_with(ResponseTemplate::new(200).set_body_json(page(&[&ids[4]], None)))
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();

    let all = client.list_all_subscriptions(&ctx).await.unwrap();

    let got: Vec<String> = all.subscriptions.iter().map(|s| s.id.to_string()).collect();
    assert_eq!(got, ids);
    assert_eq!(all.pages.len(), 3);
    assert!(
        all.pages
            .iter()
            .all(|m| m.correlation_id == ctx.correlation_id)
    );
    let seen = requests_to(&server, "/api/saas/subscriptions").await;
    assert_eq!(
        seen[1].url.query(),
        Some("continuationToken=p%2B2%3D&api-version=2018-08-31"),
        "the continuation token must not be re-encoded (P28)"
    );
}

#[tokio::test]
async fn an_empty_list_body_means_no_subscriptions() {
    let (server, client) = setup().await;
    api_call("GET", "/api/saas/subscriptions")
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&server)
        .await;
    let page = client
        .list_subscriptions_page(&CallContext::random(), None)
        .await
        .unwrap();
    assert!(page.value.subscriptions.is_empty());
    assert_eq!(page.value.next_link, None);
}

#[tokio::test]
async fn available_plans_pass_the_plan_filter() {
    let (server, client) = setup().await;
    api_call(
        "GET",
        format!("/api/saas/subscriptions/{SUB}/listAvailablePlans"),
    )
    .and(query_param("planId", "silver"))
    .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "plans": [
        { "planId": "silver", "displayName": "Silver", "isPrivate": true,
          "planComponents": { "meteringDimensions": [] },
          "sourceOffers": [{ "externalId": "99999999-2222-3333-4444-555555555555" }] }
    ]})))
    .expect(1)
    .mount(&server)
    .await;
    let plans = client
        .list_available_plans(&CallContext::random(), sub_id(), Some("silver"))
        .await
        .unwrap()
        .into_value();
    assert_eq!(plans.len(), 1);
    assert_eq!(plans[0].is_private, Some(true));
    assert_eq!(plans[0].source_offers.len(), 1);
}

#[tokio::test]
async fn available_plans_refused_with_403_are_not_a_credentials_failure() {
    let (server, client) = setup().await;
    api_call(
        "GET",
        format!("/api/saas/subscriptions/{SUB}/listAvailablePlans"),
    )
    .respond_with(ResponseTemplate::new(403))
    .expect(1)
    .mount(&server)
    .await;
    let error = client
        .list_available_plans(&CallContext::random(), sub_id(), None)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), "permanent", "{error}");
    assert_eq!(error.status(), Some(403));
    assert!(!error.to_string().contains("credentials (check"), "{error}");
}

fn accepted(location: &str) -> ResponseTemplate {
    ResponseTemplate::new(202).insert_header("Operation-Location", location)
}

#[tokio::test]
async fn changes_and_cancellation_return_the_operation_to_poll() {
    let (server, client) = setup().await;
    let location = format!(
        "{}/api/saas/subscriptions/{SUB}/operations/{OP}?api-version=2018-08-31",
        server.uri()
    );
    api_call("PATCH", format!("/api/saas/subscriptions/{SUB}"))
        .and(body_json(json!({ "planId": "gold" })))
        .respond_with(accepted(&location))
        .expect(1)
        .mount(&server)
        .await;
    api_call("PATCH", format!("/api/saas/subscriptions/{SUB}"))
        .and(body_json(json!({ "quantity": 25 })))
        .respond_with(accepted(&location))
        .expect(1)
        .mount(&server)
        .await;
    api_call("DELETE", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(accepted(&location))
        .expect(1)
        .mount(&server)
        .await;
    api_call(
        "GET",
        format!("/api/saas/subscriptions/{SUB}/operations/{OP}"),
    )
    .respond_with(ResponseTemplate::new(200).set_body_json(operation_json("Succeeded")))
    .expect(2)
    .mount(&server)
    .await;
    let ctx = CallContext::random();

    let plan = client.change_plan(&ctx, sub_id(), "gold").await.unwrap();
    assert_eq!(plan.meta.status, 202);
    assert_eq!(plan.value.retry_after, None);
    assert_eq!(plan.value.operation_id, op_id());
    assert_eq!(plan.value.operation_location.as_str(), location);
    let qty = client.change_quantity(&ctx, sub_id(), 25).await.unwrap();
    assert_eq!(qty.value.operation_id, op_id());
    let delete = client.delete_subscription(&ctx, sub_id()).await.unwrap();
    assert_eq!(delete.value.operation_id, op_id());

    let polled = client
        .get_operation_at(&ctx, &plan.value.operation_location)
        .await
        .unwrap();
    assert_eq!(polled.value.status, Some(OperationStatus::Succeeded));
    assert!(polled.value.status.unwrap().is_terminal());
    let direct = client.get_operation(&ctx, sub_id(), op_id()).await.unwrap();
    assert_eq!(direct.value.id, op_id());
}

/// §15.1: production's 202 carries `Retry-After: 10`, the first poll's delay and floor.
#[tokio::test]
async fn a_202_keeps_its_retry_after() {
    let (server, client) = setup().await;
    let location = format!(
        "https://main.prod.marketplaceapi.azure.com/api/saas/subscriptions/{SUB}/operations/{OP}\
         ?api-version=2018-08-31"
    );
    api_call("DELETE", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(accepted(&location).insert_header("Retry-After", "10"))
        .expect(1)
        .mount(&server)
        .await;
    let accepted = client
        .delete_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap()
        .into_value();
    assert_eq!(accepted.operation_id, op_id());
    assert_eq!(accepted.retry_after, Some(Duration::from_secs(10)));
}

/// §15.2: the emulator answers List operations with a bare array.
#[tokio::test]
async fn list_operations_reads_a_bare_array() {
    let (server, client) = setup().await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}/operations"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!([operation_json("InProgress")])),
        )
        .expect(1)
        .mount(&server)
        .await;
    let ops = client
        .list_operations(&CallContext::random(), sub_id())
        .await
        .unwrap();
    assert_eq!(ops.value.len(), 1);
    assert_eq!(ops.value[0].id, op_id());
}

#[tokio::test]
async fn list_operations_accepts_every_shape_of_nothing() {
    let (server, client) = setup().await;
    let subs: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let responses = [
        ResponseTemplate::new(200).set_body_json(json!({})),
        ResponseTemplate::new(200).set_body_json(json!({ "operations": [] })),
        ResponseTemplate::new(200),
        ResponseTemplate::new(404).set_body_json(json!({ "code": "EntityNotFound" })),
        ResponseTemplate::new(200)
            .set_body_json(json!({ "operations": [operation_json("InProgress")] })),
    ];
    for (sub, response) in subs.iter().zip(responses) {
        api_call("GET", format!("/api/saas/subscriptions/{sub}/operations"))
            .respond_with(response)
            .expect(1)
            .mount(&server)
            .await;
    }
    let ctx = CallContext::random();
    for sub in &subs[..4] {
        let ops = client.list_operations(&ctx, *sub).await.unwrap();
        assert!(ops.value.is_empty(), "{sub}: {:?}", ops.value);
    }
    let ops = client.list_operations(&ctx, subs[4]).await.unwrap();
    assert_eq!(ops.value.len(), 1);
    assert_eq!(ops.value[0].status, Some(OperationStatus::InProgress));
}

#[tokio::test]
async fn acknowledging_an_operation_treats_409_as_already_final() {
    let (server, client) = setup().await;
    let ops: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let cases = [
        (ops[0], "Success", ResponseTemplate::new(200)),
        (ops[1], "Failure", ResponseTemplate::new(409)),
        (
            ops[2],
            "Success",
            ResponseTemplate::new(400).set_body_string("Operation not found"),
        ),
    ];
    for (op, status, response) in cases {
        api_call(
            "PATCH",
            format!("/api/saas/subscriptions/{SUB}/operations/{op}"),
        )
        .and(body_json(json!({ "status": status })))
        .respond_with(response)
        .expect(1)
        .mount(&server)
        .await;
    }
    let ctx = CallContext::random();
    let recorded = client
        .update_operation(&ctx, sub_id(), ops[0], UpdateOperationStatus::Success)
        .await
        .unwrap();
    assert_eq!(recorded.value, UpdateOutcome::Recorded);
    let final_ = client
        .update_operation(&ctx, sub_id(), ops[1], UpdateOperationStatus::Failure)
        .await
        .unwrap();
    assert_eq!(final_.value, UpdateOutcome::AlreadyFinal);
    assert_eq!(final_.meta.status, 409);
    let unknown = client
        .update_operation(&ctx, sub_id(), ops[2], UpdateOperationStatus::Success)
        .await
        .unwrap_err();
    assert!(matches!(unknown, Error::NotFound { .. }), "{unknown:?}");
    assert_eq!(unknown.body(), Some("Operation not found"));
}

fn usage_event(hour: u8) -> UsageEvent {
    UsageEvent {
        resource_id: sub_id(),
        quantity: 5.0,
        dimension: "dim1".into(),
        effective_start_time: datetime!(2025-06-02 08:30:14 UTC)
            .replace_hour(hour)
            .unwrap(),
        plan_id: "plan1".into(),
    }
}

#[tokio::test]
async fn metering_posts_events_and_reports_duplicates() {
    let (server, client) = setup().await;
    let event_json = json!({ "resourceId": SUB, "quantity": 5.0, "dimension": "dim1",
                             "effectiveStartTime": "2025-06-02T08:30:14Z", "planId": "plan1" });
    let accepted_json = json!({ "usageEventId": "0f8e7d6c-0000-4000-8000-000000000001",
        "status": "Accepted", "messageTime": "2025-06-02T08:35:01.1234567Z", "resourceId": SUB,
        "quantity": 5, "dimension": "dim1", "effectiveStartTime": "2025-06-02T08:30:14Z",
        "planId": "plan1" });
    api_call("POST", "/api/usageEvent")
        .and(body_json(event_json.clone()))
        .respond_with(ResponseTemplate::new(200).set_body_json(accepted_json.clone()))
        .up_to_n_times(1)
        .expect(1)
        .with_priority(1)
        .mount(&server)
        .await;
    api_call("POST", "/api/usageEvent")
        .and(body_json(event_json))
        .respond_with(ResponseTemplate::new(409).set_body_json(json!({
            "additionalInfo": { "acceptedMessage": accepted_json },
            "message": "This usage event already exist.", "code": "Conflict" })))
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();

    match client
        .post_usage_event(&ctx, &usage_event(8))
        .await
        .unwrap()
        .value
    {
        UsageEventOutcome::Accepted(r) => {
            assert_eq!(r.status, Some(UsageEventStatus::Accepted));
            assert_eq!(r.quantity, Some(5.0));
        }
        other => panic!("{other:?}"),
    }
    match client
        .post_usage_event(&ctx, &usage_event(8))
        .await
        .unwrap()
        .value
    {
        UsageEventOutcome::Duplicate(conflict) => {
            assert_eq!(conflict.accepted_message().unwrap().quantity, Some(5.0));
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn batches_hold_one_to_twenty_five_events() {
    let (server, client) = setup().await;
    api_call("POST", "/api/batchUsageEvent")
        .and(body_json(json!({ "request": [
            { "resourceId": SUB, "quantity": 5.0, "dimension": "dim1",
              "effectiveStartTime": "2025-06-02T01:30:14Z", "planId": "plan1" },
            { "resourceId": SUB, "quantity": 5.0, "dimension": "dim1",
              "effectiveStartTime": "2025-06-02T02:30:14Z", "planId": "plan1" } ] })))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({ "count": 2, "result": [
            { "usageEventId": "a", "status": "Accepted", "quantity": 5.0 },
            { "status": "Expired", "messageTime": "0001-01-01T00:00:00",
              "error": { "code": "BadArgument", "message": "too old" } } ] })),
        )
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();

    let batch = client
        .post_batch_usage_events(&ctx, &[usage_event(1), usage_event(2)])
        .await
        .unwrap();
    assert_eq!(batch.value.result.len(), 2);
    assert_eq!(
        batch.value.result[1].status,
        Some(UsageEventStatus::Expired)
    );

    let too_many: Vec<UsageEvent> = (0..26).map(|h| usage_event(h % 24)).collect();
    let err = client
        .post_batch_usage_events(&ctx, &too_many)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    let err = client.post_batch_usage_events(&ctx, &[]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
}

#[tokio::test]
async fn usage_events_are_queried_with_the_documented_parameters() {
    let (server, client) = setup().await;
    api_call("GET", "/api/usageEvents")
        .and(query_param("usageStartDate", "2025-06-01T00:00:00Z"))
        .and(query_param("UsageEndDate", "2025-06-02T00:00:00Z"))
        .and(query_param("offerId", "contoso-analytics"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([
            { "usageDate": "2025-06-01T00:00:00", "usageResourceId": SUB, "dimension": "dim1",
              "reconStatus": "Accepted", "submittedQuantity": 5, "processedQuantity": 5,
              "submittedCount": 1 } ])))
        .expect(1)
        .mount(&server)
        .await;
    let query = UsageEventsQuery {
        usage_end_date: Some(datetime!(2025-06-02 00:00 UTC)),
        offer_id: Some("contoso-analytics".into()),
        ..UsageEventsQuery::since(datetime!(2025-06-01 00:00 UTC))
    };
    let rows = client
        .get_usage_events(&CallContext::random(), &query)
        .await
        .unwrap();
    assert_eq!(rows.value.len(), 1);
    assert_eq!(rows.value[0].submitted_quantity, Some(5.0));
}

#[tokio::test]
async fn transient_failures_are_retried_with_new_request_ids_and_one_correlation_id() {
    let (server, client) = setup().await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(500).set_body_json(
            json!({ "error": { "code": "UnexpectedError", "message": "An unexpected error has occurred." } }),
        ))
        .up_to_n_times(2)
        .with_priority(1)
        .expect(2)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();

    let got = client.get_subscription(&ctx, sub_id()).await.unwrap();

    assert_eq!(got.meta.attempts, 3);
    assert_eq!(got.meta.request_ids.len(), 3);
    assert_eq!(got.meta.request_ids[2], got.meta.request_id);
    let seen = requests_to(&server, &format!("/api/saas/subscriptions/{SUB}")).await;
    let request_ids: HashSet<String> = seen
        .iter()
        .map(|r| header_of(r, "x-ms-requestid"))
        .collect();
    assert_eq!(request_ids.len(), 3, "a new x-ms-requestid per attempt");
    let sent: HashSet<String> = got.meta.request_ids.iter().map(Uuid::to_string).collect();
    assert_eq!(request_ids, sent);
    let correlation_ids: HashSet<String> = seen
        .iter()
        .map(|r| header_of(r, "x-ms-correlationid"))
        .collect();
    assert_eq!(
        correlation_ids,
        HashSet::from([ctx.correlation_id.to_string()])
    );
}

#[tokio::test]
async fn throttling_honours_retry_after() {
    for retry_after in ["0", "1"] {
        let (server, client) = setup().await;
        api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
            .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", retry_after))
            .up_to_n_times(1)
            .with_priority(1)
            .expect(1)
            .mount(&server)
            .await;
        api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
            .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
            .expect(1)
            .mount(&server)
            .await;
        let started = std::time::Instant::now();
        let got = client
            .get_subscription(&CallContext::random(), sub_id())
            .await
            .unwrap();
        assert_eq!(got.meta.attempts, 2);
        let waited = started.elapsed();
        let asked = Duration::from_secs(retry_after.parse().unwrap());
        assert!(waited >= asked, "waited {waited:?}, Retry-After {asked:?}");
        assert!(waited < asked + Duration::from_millis(900), "{waited:?}");
    }
}

#[tokio::test]
async fn final_errors_are_classified_and_not_retried() {
    let (server, client) = setup().await;
    let cases = [
        (400, "permanent"),
        (403, "unauthorized"),
        (404, "not_found"),
        (409, "conflict"),
    ];
    let mut subs = Vec::new();
    for (status, _) in cases {
        let sub = Uuid::new_v4();
        subs.push(sub);
        api_call("GET", format!("/api/saas/subscriptions/{sub}"))
            .respond_with(ResponseTemplate::new(status).set_body_json(
                json!({ "code": "BadArgument", "message": format!("status {status}") }),
            ))
            .expect(1)
            .mount(&server)
            .await;
    }
    let ctx = CallContext::random();
    for ((status, kind), sub) in cases.iter().zip(&subs) {
        let err = client.get_subscription(&ctx, *sub).await.unwrap_err();
        assert_eq!(err.kind(), *kind, "{status}: {err}");
        assert!(!err.is_retryable());
        assert_eq!(err.status(), Some(*status));
        let failure = err.failure().unwrap();
        assert_eq!(failure.attempts, 1);
        assert_eq!(failure.correlation_id, Some(ctx.correlation_id));
        assert!(failure.request_id.is_some());
        assert!(
            err.body().unwrap().contains(&format!("status {status}")),
            "{err:?}"
        );
    }
    // Verified on drop: each mock saw exactly one request.
}

#[tokio::test]
async fn persistent_5xx_gives_up_after_max_attempts() {
    let (server, client) = setup().await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(503).set_body_string("Service Unavailable"))
        .expect(4)
        .mount(&server)
        .await;
    let err = client
        .get_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    assert_eq!(err.failure().unwrap().attempts, 4);
    assert_eq!(err.status(), Some(503));
}

#[tokio::test]
async fn patching_a_subscription_is_not_repeated_after_a_500() {
    let (server, client) = setup().await;
    api_call("PATCH", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(500))
        .expect(1)
        .mount(&server)
        .await;
    api_call("DELETE", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(504))
        .expect(1)
        .mount(&server)
        .await;
    let ctx = CallContext::random();
    let err = client
        .change_plan(&ctx, sub_id(), "gold")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Transient { .. }), "{err:?}");
    assert_eq!(err.failure().unwrap().attempts, 1);
    let err = client
        .delete_subscription(&ctx, sub_id())
        .await
        .unwrap_err();
    assert!(err.is_retryable() && !err.request_was_not_processed());
}

#[tokio::test]
async fn patching_a_subscription_is_repeated_after_a_429() {
    let (server, client) = setup().await;
    let location = format!(
        "{}/api/saas/subscriptions/{SUB}/operations/{OP}?api-version=2018-08-31",
        server.uri()
    );
    api_call("PATCH", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "0"))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    api_call("PATCH", format!("/api/saas/subscriptions/{SUB}"))
        .and(body_json(json!({ "quantity": 7 })))
        .respond_with(accepted(&location))
        .expect(1)
        .mount(&server)
        .await;
    let got = client
        .change_quantity(&CallContext::random(), sub_id(), 7)
        .await
        .unwrap();
    assert_eq!(got.meta.attempts, 2);
    assert_eq!(got.value.operation_id, op_id());
}

#[tokio::test]
async fn a_connection_that_is_never_made_is_retried_even_for_patch() {
    // Nothing listens on this port: every attempt fails to connect.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let tokens = TokenProvider::from_static(SecretString::from(ACCESS_TOKEN.to_owned()));
    let settings = MarketplaceSettings {
        api_url: Url::parse(&format!("http://127.0.0.1:{port}/api")).unwrap(),
        entra_authority_url: Url::parse("http://127.0.0.1:1").unwrap(),
        tenant_id: None,
        client_id: None,
        client_secret: None,
        token_endpoint: TokenEndpoint::V2,
        request_timeout: Duration::from_secs(5),
    };
    let client = MarketplaceClient::new(&settings, tokens)
        .unwrap()
        .with_retry_policy(fast_policy());
    let err = client
        .change_plan(&CallContext::random(), sub_id(), "gold")
        .await
        .unwrap_err();
    assert!(err.request_was_not_processed(), "{err:?}");
    assert_eq!(err.failure().unwrap().attempts, 4);
    assert_eq!(err.status(), None);
}

#[tokio::test]
async fn one_token_request_serves_many_concurrent_calls() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .and(body_string_contains("grant_type=client_credentials"))
        .and(body_string_contains(format!("client_id={CLIENT}")))
        .and(body_string_contains(format!("client_secret={SECRET}")))
        .and(body_string_contains(format!(
            "scope={MARKETPLACE_APP_ID}%2F.default"
        )))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(token_body(json!(3599)))
                .set_delay(Duration::from_millis(200)),
        )
        .expect(1)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .expect(20)
        .mount(&server)
        .await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V2));

    let calls = (0..20).map(|_| {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .get_subscription(&CallContext::random(), sub_id())
                .await
        })
    });
    for result in futures_util::future::join_all(calls).await {
        result.unwrap().unwrap();
    }
}

#[tokio::test]
async fn a_token_near_expiry_is_refreshed() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(json!(1))))
        .expect(2)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .expect(3)
        .mount(&server)
        .await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V2));
    let ctx = CallContext::random();
    client.get_subscription(&ctx, sub_id()).await.unwrap();
    client.get_subscription(&ctx, sub_id()).await.unwrap();
    // A 1-second token is refreshed at half-life.
    tokio::time::sleep(Duration::from_millis(600)).await;
    client.get_subscription(&ctx, sub_id()).await.unwrap();
}

#[tokio::test]
async fn the_v1_endpoint_uses_resource_and_accepts_string_numbers() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/token")))
        .and(header("content-type", "application/x-www-form-urlencoded"))
        .and(body_string_contains(format!(
            "resource={MARKETPLACE_APP_ID}"
        )))
        .and(body_string_contains("grant_type=client_credentials"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "token_type": "Bearer", "expires_in": "3600", "ext_expires_in": "0",
            "expires_on": "1525000000", "not_before": "1524996100",
            "resource": MARKETPLACE_APP_ID, "access_token": ACCESS_TOKEN })))
        .expect(1)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .expect(2)
        .mount(&server)
        .await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V1));
    let ctx = CallContext::random();
    client.get_subscription(&ctx, sub_id()).await.unwrap();
    client.get_subscription(&ctx, sub_id()).await.unwrap();
}

#[tokio::test]
async fn bad_credentials_are_a_configuration_error_not_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "error": "invalid_client",
            "error_description": "AADSTS7000215: Invalid client secret provided." })))
        .expect(1)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200))
        .expect(0)
        .mount(&server)
        .await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V2));
    let err = client
        .get_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    let text = format!("{err} {err:?}");
    assert!(text.contains("invalid_client"), "{text}");
    assert!(!text.contains(SECRET), "{text}");
}

#[tokio::test]
async fn an_entra_outage_is_retried() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    mount_v2_token(&server).await;
    api_call("DELETE", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(accepted(&format!(
            "{}/api/saas/subscriptions/{SUB}/operations/{OP}",
            server.uri()
        )))
        .expect(1)
        .mount(&server)
        .await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V2));
    // Even a DELETE may repeat: the failed token request means it was never sent.
    let got = client
        .delete_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap();
    assert_eq!(got.meta.attempts, 2);
}

#[tokio::test]
async fn a_403_drops_the_cached_token() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path(format!("/{TENANT}/oauth2/v2.0/token")))
        .respond_with(ResponseTemplate::new(200).set_body_json(token_body(json!(3599))))
        .expect(2)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(403))
        .up_to_n_times(1)
        .with_priority(1)
        .expect(1)
        .mount(&server)
        .await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .expect(2)
        .mount(&server)
        .await;
    let client = client_for(&settings(&server, "", TokenEndpoint::V2));
    let ctx = CallContext::random();
    let err = client.get_subscription(&ctx, sub_id()).await.unwrap_err();
    assert!(matches!(err, Error::Unauthorized { .. }), "{err:?}");
    client.get_subscription(&ctx, sub_id()).await.unwrap();
    client.get_subscription(&ctx, sub_id()).await.unwrap();
}

#[tokio::test]
async fn secrets_never_reach_debug_output() {
    let (server, client) = setup().await;
    api_call("GET", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(200).set_body_json(subscription_json()))
        .mount(&server)
        .await;
    client
        .get_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap();
    let debug = format!("{client:?} {:?}", client.tokens().token().await.unwrap());
    assert!(!debug.contains(SECRET), "{debug}");
    assert!(!debug.contains(ACCESS_TOKEN), "{debug}");
}

#[tokio::test]
async fn a_202_without_operation_location_falls_back_to_operation_id() {
    let (server, client) = setup().await;
    api_call("DELETE", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(ResponseTemplate::new(202).insert_header("Operation-Id", OP))
        .expect(1)
        .mount(&server)
        .await;
    let got = client
        .delete_subscription(&CallContext::random(), sub_id())
        .await
        .unwrap();
    assert_eq!(got.value.operation_id, op_id());
    assert_eq!(
        got.value.operation_location.as_str(),
        format!(
            "{}/api/saas/subscriptions/{SUB}/operations/{OP}?api-version=2018-08-31",
            server.uri()
        )
    );
}

#[test]
fn client_futures_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let settings = MarketplaceSettings {
        api_url: Url::parse("http://127.0.0.1:1/api").unwrap(),
        entra_authority_url: Url::parse("http://127.0.0.1:1").unwrap(),
        tenant_id: None,
        client_id: None,
        client_secret: None,
        token_endpoint: TokenEndpoint::V2,
        request_timeout: Duration::from_secs(1),
    };
    let client = MarketplaceClient::new(
        &settings,
        TokenProvider::from_static(SecretString::from("t".to_owned())),
    )
    .unwrap();
    let ctx = CallContext::random();
    assert_send(&client.get_subscription(&ctx, sub_id()));
    assert_send(&client.change_plan(&ctx, sub_id(), "gold"));
    assert_send(&client.list_all_subscriptions(&ctx));
    assert_send(&client.post_batch_usage_events(&ctx, &[]));
}

/// What Microsoft's emulator sends (§15.2): bare arrays, `text/plain` bodies (Express's
/// `sendStatus`), `operationRequestedSource`, and 202s whose location names its own host.
#[tokio::test]
async fn the_client_accepts_what_microsofts_emulator_sends() {
    let (server, client) = setup().await;
    let mut op = operation_json("InProgress");
    op.as_object_mut().unwrap().remove("operationRequestSource");
    op["operationRequestedSource"] = json!("Partner");
    api_call("GET", format!("/api/saas/subscriptions/{SUB}/operations"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!([op])))
        .expect(1)
        .mount(&server)
        .await;
    api_call(
        "GET",
        format!("/api/saas/subscriptions/{SUB}/listAvailablePlans"),
    )
    .respond_with(ResponseTemplate::new(200).set_body_json(json!([])))
    .expect(1)
    .mount(&server)
    .await;
    let text = |status: u16, body: &str| {
        ResponseTemplate::new(status).set_body_raw(body.as_bytes().to_vec(), "text/plain")
    };
    api_call("POST", format!("/api/saas/subscriptions/{SUB}/activate"))
        .respond_with(text(200, "OK"))
        .expect(1)
        .mount(&server)
        .await;
    api_call(
        "PATCH",
        format!("/api/saas/subscriptions/{SUB}/operations/{OP}"),
    )
    .respond_with(text(200, "OK"))
    .expect(1)
    .mount(&server)
    .await;
    // The location on a host we never called (production's other host, §15.1): only its
    // path is used, on our base URL, with Retry-After kept for the poller.
    api_call("PATCH", format!("/api/saas/subscriptions/{SUB}"))
        .respond_with(
            text(202, "Accepted")
                .insert_header(
                    "Operation-Location",
                    format!(
                        "https://main.prod.marketplaceapi.azure.com/api/saas/subscriptions/{SUB}/operations/{OP}?api-version=2018-08-31"
                    )
                    .as_str(),
                )
                .insert_header("Operation-Id", OP)
                .insert_header("Retry-After", "10"),
        )
        .expect(1)
        .mount(&server)
        .await;
    api_call(
        "GET",
        format!("/api/saas/subscriptions/{SUB}/operations/{OP}"),
    )
    .respond_with(ResponseTemplate::new(200).set_body_json(operation_json("NotStarted")))
    .expect(1)
    .mount(&server)
    .await;

    let ctx = CallContext::random();
    let ops = client.list_operations(&ctx, sub_id()).await.unwrap().value;
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].request_source().map(|s| s.as_str()), Some("Partner"));
    let plans = client
        .list_available_plans(&ctx, sub_id(), None)
        .await
        .unwrap();
    assert!(plans.value.is_empty());
    client
        .activate(&ctx, sub_id(), "silver", None)
        .await
        .unwrap();
    let acked = client
        .update_operation(&ctx, sub_id(), op_id(), UpdateOperationStatus::Success)
        .await
        .unwrap();
    assert_eq!(acked.value, UpdateOutcome::Recorded);
    let accepted = client
        .change_plan(&ctx, sub_id(), "gold")
        .await
        .unwrap()
        .value;
    assert_eq!(accepted.operation_id, op_id());
    assert_eq!(accepted.retry_after, Some(Duration::from_secs(10)));
    assert_eq!(
        accepted.operation_location.host_str(),
        Some("main.prod.marketplaceapi.azure.com")
    );
    let polled = client
        .get_operation_at(&ctx, &accepted.operation_location)
        .await
        .unwrap();
    assert_eq!(polled.value.status, Some(OperationStatus::NotStarted));
    assert!(!polled.value.status.unwrap().is_terminal());
}
