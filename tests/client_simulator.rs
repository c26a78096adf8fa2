//! The Marketplace client against the simulator over real HTTP (the test world's, as its
//! workers call it): the whole publisher-side lifecycle, retries through injected faults,
//! and classified errors that are not retried.

use std::time::{Duration, Instant};

use marketplace_fulfillment::marketplace::{
    CallContext, Error, MarketplaceClient, OperationStatus, RetryPolicy, SubscriptionStatus,
    TokenProvider,
};
use marketplace_fulfillment::settings::{Settings, TokenEndpoint};
use marketplace_fulfillment::simulator::Timings;
use marketplace_fulfillment::world::{Configure, SimHandle, World, WorldOptions, wait_until};
use secrecy::SecretString;
use serde_json::{Value, json};
use uuid::Uuid;

mod common;

const WAIT: Duration = Duration::from_secs(10);

/// The test world's simulator (fast clocks) and the client its workers would use, with six
/// quick attempts per call; derefs to the [`World`] (`client`, `sim`).
struct Harness {
    world: World,
    admin: SimHandle,
}

impl std::ops::Deref for Harness {
    type Target = World;
    fn deref(&self) -> &World {
        &self.world
    }
}

impl Harness {
    async fn start(token_endpoint: TokenEndpoint) -> Self {
        let configure: Configure = Box::new(move |settings, config| {
            settings.marketplace.token_endpoint = token_endpoint;
            config.timings = Timings::fast();
            Ok(())
        });
        let client_retries = Some(RetryPolicy {
            min_delay: Duration::from_millis(5),
            max_delay: Duration::from_millis(50),
            max_attempts: 6,
            max_retry_after: Duration::from_secs(2),
            give_up_beyond_cap: false,
        });
        let options = WorldOptions {
            configure,
            client_retries,
            ..WorldOptions::bare("test")
        };
        let world = World::start(&common::base_settings(), options).await;
        let world = world.expect("the world");
        let admin = world.sim_admin(&reqwest::Client::new());
        Self { world, admin }
    }

    async fn purchase(&self, plan: &str, quantity: Option<u32>) -> (Uuid, String) {
        let body = json!({"planId": plan, "quantity": quantity});
        let purchase = self.admin.buy(body).await.unwrap();
        (purchase.id, purchase.token)
    }

    async fn set_faults(&self, faults: Value) {
        self.admin.set_faults(faults).await.unwrap();
    }

    /// Waits until Microsoft's view of the subscription has `status`.
    async fn wait_for_status(&self, id: Uuid, status: SubscriptionStatus) {
        wait_until(&format!("{id} {status:?}"), WAIT, || async {
            let sub = self
                .client
                .get_subscription(&CallContext::random(), id)
                .await;
            (sub.unwrap().into_value().status.as_ref() == Some(&status)).then_some(())
        })
        .await
        .unwrap()
    }

    /// Waits until the operation at `location` is final.
    async fn poll_operation(&self, location: &url::Url) -> OperationStatus {
        wait_until("a final operation", WAIT, || async {
            let context = CallContext::random();
            let operation = self.client.get_operation_at(&context, location).await;
            let status = operation.unwrap().into_value().status?;
            use OperationStatus::*;
            matches!(status, Succeeded | Failed | Conflict).then_some(status)
        })
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn purchase_resolve_activate_change_plan_and_delete_through_the_client() {
    let h = Harness::start(TokenEndpoint::V2).await;
    let (id, token) = h.purchase("silver", None).await;
    let ctx = CallContext::random();

    let resolved = h.client.resolve(&ctx, &token).await.unwrap();
    assert_eq!(resolved.value.id, id);
    assert_eq!(resolved.value.plan_id.as_deref(), Some("silver"));
    assert_eq!(resolved.meta.correlation_id, ctx.correlation_id);
    assert_eq!(resolved.meta.status, 200);

    h.client.activate(&ctx, id, "silver", None).await.unwrap();
    h.wait_for_status(id, SubscriptionStatus::Subscribed).await;

    let plans = h
        .client
        .list_available_plans(&ctx, id, None)
        .await
        .unwrap()
        .into_value();
    assert!(
        plans.iter().any(|p| p.plan_id.as_deref() == Some("gold")),
        "{plans:?}"
    );

    let accepted = h
        .client
        .change_plan(&ctx, id, "gold")
        .await
        .unwrap()
        .into_value();
    assert_eq!(
        h.poll_operation(&accepted.operation_location).await,
        OperationStatus::Succeeded
    );
    let operation = h
        .client
        .get_operation(&ctx, id, accepted.operation_id)
        .await
        .unwrap()
        .into_value();
    assert_eq!(operation.plan_id.as_deref(), Some("gold"));
    let sub = h
        .client
        .get_subscription(&ctx, id)
        .await
        .unwrap()
        .into_value();
    assert_eq!(sub.plan_id.as_deref(), Some("gold"));

    let deleted = h
        .client
        .delete_subscription(&ctx, id)
        .await
        .unwrap()
        .into_value();
    assert_eq!(
        h.poll_operation(&deleted.operation_location).await,
        OperationStatus::Succeeded
    );
    h.wait_for_status(id, SubscriptionStatus::Unsubscribed)
        .await;
}

#[tokio::test]
async fn the_v1_token_endpoint_works_as_well() {
    let h = Harness::start(TokenEndpoint::V1).await;
    let (id, _) = h.purchase("gold", None).await;
    let sub = h
        .client
        .get_subscription(&CallContext::random(), id)
        .await
        .unwrap();
    assert_eq!(
        sub.value.status,
        Some(SubscriptionStatus::PendingFulfillmentStart)
    );
}

#[tokio::test]
async fn list_all_follows_next_links_across_pages() {
    let h = Harness::start(TokenEndpoint::V2).await;
    for _ in 0..120 {
        h.purchase("silver", None).await;
    }
    let all = h
        .client
        .list_all_subscriptions(&CallContext::random())
        .await
        .unwrap();
    assert_eq!(all.subscriptions.len(), 120);
    assert_eq!(all.pages.len(), 2);
}

#[tokio::test]
async fn calls_succeed_through_injected_server_errors_and_throttling() {
    let h = Harness::start(TokenEndpoint::V2).await;
    let (id, _) = h.purchase("silver", None).await;
    // Half the calls fail: with six attempts each, twenty calls all get through.
    h.set_faults(json!({"seed": 7, "share5xx": 0.3, "share429": 0.2, "retryAfterSecs": 0}))
        .await;
    let mut retried = 0;
    for _ in 0..20 {
        let response = h
            .client
            .get_subscription(&CallContext::random(), id)
            .await
            .expect("retries get through");
        if response.meta.attempts > 1 {
            retried += 1;
            assert!(response.meta.request_ids.len() as u32 == response.meta.attempts);
        }
    }
    assert!(retried > 0, "the faults were never hit");
}

#[tokio::test]
async fn throttling_honours_retry_after() {
    let h = Harness::start(TokenEndpoint::V2).await;
    let (id, _) = h.purchase("silver", None).await;
    h.set_faults(json!({"share429": 1.0, "retryAfterSecs": 1}))
        .await;
    let started = Instant::now();
    let error = h
        .client
        .get_subscription(&CallContext::random(), id)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::Throttled { .. }), "{error:?}");
    assert_eq!(error.retry_after(), Some(Duration::from_secs(1)));
    // Five waits of one second (capped by max_retry_after = 2 s, so Retry-After wins).
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn client_errors_are_classified_and_not_retried() {
    let h = Harness::start(TokenEndpoint::V2).await;
    let ctx = CallContext::random();

    // 404: unknown subscription.
    let error = h
        .client
        .get_subscription(&ctx, Uuid::new_v4())
        .await
        .unwrap_err();
    assert!(matches!(error, Error::NotFound { .. }), "{error:?}");
    assert_eq!(error.failure().map(|f| f.attempts), Some(1));

    // 400: an invalid purchase token.
    let error = h.client.resolve(&ctx, "not-a-token").await.unwrap_err();
    assert!(matches!(error, Error::Permanent { .. }), "{error:?}");
    assert_eq!(error.status(), Some(400));
    assert_eq!(error.failure().map(|f| f.attempts), Some(1));

    // 400: the same plan again.
    let (id, _) = h.purchase("silver", None).await;
    h.client.activate(&ctx, id, "silver", None).await.unwrap();
    h.wait_for_status(id, SubscriptionStatus::Subscribed).await;
    let error = h.client.change_plan(&ctx, id, "silver").await.unwrap_err();
    assert!(matches!(error, Error::Permanent { .. }), "{error:?}");

    // 403: a token the simulator did not issue.
    let forged = MarketplaceClient::new(
        &Settings::from_sources(
            None,
            &[("MARKETPLACE_API_URL", h.sim.api_url().to_string())]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
        .unwrap()
        .marketplace,
        TokenProvider::from_static(SecretString::from("eyJhbGciOiJub25lIn0.e30.")),
    )
    .unwrap();
    let error = forged.get_subscription(&ctx, id).await.unwrap_err();
    assert!(matches!(error, Error::Unauthorized { .. }), "{error:?}");
    assert_eq!(error.status(), Some(403));
}
