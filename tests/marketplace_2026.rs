//! The engine against the marketplace as it is in 2026, through the whole stack (simulator
//! → ingress → RabbitMQ → worker → PostgreSQL) with the simulator's production defaults:
//! `Operation-Location` and `@nextLink` on another host, operations that start `NotStarted`
//! behind a `Retry-After`, pages of varying size, CSP purchases that only allow `Read`,
//! term units outside the spec, and auto-activation (docs/marketplace.md §5.6, §15).

mod stack;

use marketplace_fulfillment::store::ledger::LogOutcome;
use std::time::Duration;

use marketplace_fulfillment::ops::reconcile;
use marketplace_fulfillment::simulator::Timings;
use marketplace_fulfillment::simulator::customer::ScriptedCustomer;
use marketplace_fulfillment::world::activate_on_landing;
use reqwest::Method;
use serde_json::{Value, json};
use stack::{Options, Purchase, Stack, WAIT};
use uuid::Uuid;

/// The domain events an event-log row's decision published, by kind.
fn published(effects: &Value) -> Vec<String> {
    effects
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["type"] == "publish_domain_event")
        .filter_map(|e| e["kind"].as_str().map(str::to_owned))
        .collect()
}

async fn decisions(stack: &Stack, id: Uuid) -> Vec<(String, String, Option<String>, Value)> {
    sqlx::query_as(
        "SELECT event_kind, outcome, reason, effects FROM subscription_events \
         WHERE subscription_id = $1 ORDER BY sequence",
    )
    .bind(id)
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

/// How many times the worker called Activate for `id` (the effect's log rows name their calls).
async fn activate_calls(stack: &Stack, id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM subscription_events, jsonb_array_elements(event->'calls') AS call \
         WHERE subscription_id = $1 AND event_kind = 'effect:activate' \
           AND call->>'call' = 'activate'",
    )
    .bind(id)
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_publisher_change_is_polled_through_not_started_on_the_other_host_after_retry_after() {
    let stack = Stack::start(Options {
        simulator: |config| {
            config.timings = Timings {
                ack_window: Duration::from_secs(8),
                retry_after: Duration::from_secs(1),
                operation_start_delay: Duration::from_millis(2500),
                operation_delay: Duration::from_millis(4500),
                ..Timings::fast()
            }
        },
        ..Options::default()
    })
    .await;
    assert_ne!(
        stack.sim.link_base_url().host_str(),
        stack.sim.base_url().host_str(),
        "the simulator hands out links on another host by default"
    );
    let id = stack.subscribed("silver", None).await;

    let (status, answer) = stack
        .entitlement(
            Method::POST,
            &format!("/api/v1/subscriptions/{id}/change-plan"),
            Some(json!({"planId": "gold"})),
        )
        .await;
    assert_eq!(status, 202, "{answer}");
    stack
        .wait_for("the plan change on both sides", || async {
            let ours = stack.engine(id).await.unwrap()?;
            (ours.plan.as_deref() == Some("gold") && stack.microsoft(id) == Some(ours))
                .then_some(())
        })
        .await;
    stack.settle(&[id], WAIT).await.unwrap();

    let view = stack.admin.view(id).await.unwrap();
    let ours = view["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["source"] == "Partner" && o["action"] == "ChangePlan")
        .cloned()
        .unwrap_or_else(|| panic!("no publisher ChangePlan in {view}"));
    assert_eq!(ours["status"], "Succeeded", "{ours}");
    let reads: Vec<&str> = ours["reads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(reads.first(), Some(&"NotStarted"), "{reads:?}");
    // The first poll waited for Retry-After (1 s here; the worker's own interval is 100 ms).
    let first_read_after = ours["firstReadAfterMs"].as_i64().unwrap();
    assert!(
        first_read_after >= 1000,
        "first poll after {first_read_after} ms"
    );
    assert!(reads.contains(&"InProgress"), "{reads:?}");
    assert_eq!(reads.last(), Some(&"Succeeded"), "{reads:?}");
    // 4.5 s at one poll a second at most (Retry-After as the first delay and the floor);
    // the worker's own interval here is 100 ms, which would make it dozens.
    assert!(
        reads.len() <= 7,
        "polled faster than Retry-After: {reads:?}"
    );

    // The location we kept is Microsoft's, on the other host; the polls still reached it.
    let location: String = sqlx::query_scalar(
        "SELECT operation_location FROM publisher_operations WHERE subscription_id = $1",
    )
    .bind(id)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    let link_host = stack.sim.link_base_url().host_str().unwrap().to_owned();
    assert!(location.contains(&link_host), "{location}");
    stack.finish().await;
}

#[tokio::test]
async fn a_reconcile_reads_every_page_of_varying_size_through_next_links_on_the_other_host() {
    let stack = Stack::start(Options {
        simulator: |config| config.page_sizes = 2..=3,
        ..Options::default()
    })
    .await;
    let known = [
        stack.subscribed("silver", None).await,
        stack.subscribed("gold", None).await,
    ];
    let mut never_seen = Vec::new();
    for _ in 0..6 {
        never_seen.push(stack.buy("silver", None, false).await.id);
    }
    stack.settle(&known, WAIT).await.unwrap();

    let mut reconciler = reconcile::reconciler(&stack.settings, "test".into())
        .await
        .unwrap();
    // Purchases seconds old are customers on their way to the landing page, not drift;
    // here every unseen purchase counts as overdue at once.
    reconciler.stuck_pending_after = Duration::ZERO;
    let report = reconciler.run(false).await.unwrap();
    assert_eq!(report.listed_by_microsoft, 8, "every page was read");
    // 8 subscriptions in pages of 2 or 3: at least 3 pages, at most 4.
    assert!(
        (3..=4).contains(&report.list_request_ids.len()),
        "{:?}",
        report.list_request_ids
    );
    assert_eq!(report.known_here, 2);
    for id in &never_seen {
        assert!(
            report.drifts.iter().any(|d| d.subscription_id == *id
                && d.kinds.iter().any(|k| k.as_str() == "missing here")),
            "{id} not reported missing: {:#?}",
            report.drifts
        );
    }
    for id in &known {
        assert!(
            report.drifts.iter().all(|d| d.subscription_id != *id),
            "{id} drifted: {:#?}",
            report.drifts
        );
    }
    stack.finish().await;
}

#[tokio::test]
async fn a_csp_purchase_is_recorded_with_its_purchaser_and_changes_are_refused_locally() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { id, landing, .. } = stack
        .admin
        .buy(json!({"planId": "silver", "csp": true}))
        .await
        .unwrap();
    activate_on_landing(&landing).await.unwrap();
    stack
        .wait_for("the CSP purchase active", || async {
            (stack.engine(id).await.unwrap()?.state == "Subscribed").then_some(())
        })
        .await;
    stack.settle(&[id], WAIT).await.unwrap();

    let (status, shown) = stack
        .entitlement(Method::GET, &format!("/api/v1/subscriptions/{id}"), None)
        .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(
        shown["allowedCustomerOperations"],
        json!(["Read"]),
        "{shown}"
    );
    assert_ne!(
        shown["purchaser"]["tenantId"], shown["beneficiary"]["tenantId"],
        "a CSP buys for its customer: {shown}"
    );
    assert_eq!(shown["purchaserTenantId"], shown["purchaser"]["tenantId"]);

    // The machine refuses both at once: the API answers 409 with its reason, nothing queued.
    for (path, body) in [
        ("change-plan", Some(json!({"planId": "gold"}))),
        ("cancel", None),
    ] {
        let (status, answer) = stack
            .entitlement(
                Method::POST,
                &format!("/api/v1/subscriptions/{id}/{path}"),
                body,
            )
            .await;
        assert_eq!(status, 409, "{path}: {answer}");
        assert_eq!(answer["reason"], "refused", "{path}: {answer}");
        assert!(
            answer["message"]
                .as_str()
                .unwrap()
                .contains("allowedCustomerOperations"),
            "{path}: {answer}"
        );
    }
    stack.settle(&[id], WAIT).await.unwrap();
    // Microsoft never saw a PATCH or a DELETE: refused here, with the reason, at once.
    let view = stack.admin.view(id).await.unwrap();
    assert!(
        view["operations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["source"] != "Partner"),
        "{view}"
    );
    let rejected: Vec<String> = decisions(&stack, id)
        .await
        .iter()
        .flat_map(|(_, _, _, effects)| published(effects))
        .filter(|kind| kind == "change_rejected")
        .collect();
    assert!(rejected.is_empty(), "refused before anything was queued");
    assert_eq!(
        stack.engine(id).await.unwrap().unwrap().plan.as_deref(),
        Some("silver")
    );
    stack.finish().await;
}

#[tokio::test]
async fn pay_and_custom_term_units_and_private_offers_are_activated_recorded_and_shown() {
    let stack = Stack::start(Options::default()).await;
    let mut ids = Vec::new();
    for (unit, extra) in [
        ("PAY", json!({"nullPuid": true})),
        (
            "P18M",
            json!({"privateOfferId": "contoso-private-offer-18"}),
        ),
        ("P3Y", json!({"purchaserTenantId": Uuid::new_v4()})),
    ] {
        let mut body = json!({"planId": "silver", "termUnit": unit});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let Purchase { id, landing, .. } = stack.admin.buy(body).await.unwrap();
        activate_on_landing(&landing).await.unwrap();
        ids.push((unit, id));
    }
    let all: Vec<Uuid> = ids.iter().map(|(_, id)| *id).collect();
    stack
        .wait_for("every purchase active", || async {
            for id in &all {
                if stack.engine(*id).await.unwrap()?.state != "Subscribed" {
                    return None;
                }
            }
            Some(())
        })
        .await;
    stack.settle(&all, WAIT).await.unwrap();

    let show = |id: Uuid| {
        let stack = &stack;
        async move {
            let (status, shown) = stack
                .entitlement(Method::GET, &format!("/api/v1/subscriptions/{id}"), None)
                .await;
            assert_eq!(status, 200, "{shown}");
            shown
        }
    };
    let pay = show(ids[0].1).await;
    assert_eq!(pay["state"], "Subscribed");
    assert_eq!(pay["term"]["termUnit"], "PAY", "{pay}");
    assert_eq!(pay["term"]["length"], Value::Null, "PAY is no duration");
    assert!(pay["term"]["endDate"].is_string(), "{pay}");
    assert_eq!(pay["beneficiary"]["emailId"], Value::Null, "{pay}");

    let custom = show(ids[1].1).await;
    assert_eq!(custom["term"]["termUnit"], "P18M");
    assert_eq!(custom["term"]["length"], json!({"months": 18, "days": 0}));
    assert_eq!(
        custom["privateOfferId"], "contoso-private-offer-18",
        "{custom}"
    );
    assert_eq!(pay["privateOfferId"], Value::Null);
    let start = custom["term"]["startDate"].as_str().unwrap();
    let end = custom["term"]["endDate"].as_str().unwrap();
    let year = |date: &str| date[..4].parse::<i32>().unwrap();
    let month = |date: &str| date[5..7].parse::<i32>().unwrap();
    let months = (year(end) - year(start)) * 12 + month(end) - month(start);
    assert!((17..=18).contains(&months), "{start} .. {end}");

    let multi_year = show(ids[2].1).await;
    assert_eq!(multi_year["term"]["termUnit"], "P3Y");
    assert_eq!(multi_year["term"]["chargeDuration"], "P1Y", "{multi_year}");
    assert_ne!(
        multi_year["purchaser"]["tenantId"],
        multi_year["beneficiary"]["tenantId"]
    );
    // Each activated exactly once: one Activate call reached Microsoft.
    for (unit, id) in &ids {
        assert_eq!(activate_calls(&stack, *id).await, 1, "{unit}");
    }
    stack.finish().await;
}

#[tokio::test]
async fn the_landing_page_shows_the_private_offer_a_purchase_came_through() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { id, landing, .. } = stack
        .admin
        .buy(json!({"planId": "silver", "privateOfferId": "contoso-private-7"}))
        .await
        .unwrap();
    let customer = ScriptedCustomer::new("customer").unwrap();
    let page = customer.open(&landing).await.unwrap().html;
    assert!(
        page.contains("<dt>Private offer</dt><dd>contoso-private-7</dd>"),
        "{page}"
    );
    customer.activate(&landing, &[]).await.unwrap();
    stack
        .wait_for("the purchase active", || async {
            (stack.engine(id).await.unwrap()?.state == "Subscribed").then_some(())
        })
        .await;
    let (_, shown) = stack
        .entitlement(Method::GET, &format!("/api/v1/subscriptions/{id}"), None)
        .await;
    assert_eq!(shown["privateOfferId"], "contoso-private-7", "{shown}");
    stack.settle(&[id], WAIT).await.unwrap();
    stack.finish().await;
}

#[tokio::test]
async fn an_auto_activated_purchase_is_recorded_announced_once_and_never_activated() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { id, landing, .. } = stack
        .admin
        .buy(json!({"planId": "gold", "autoActivate": true}))
        .await
        .unwrap();
    // No landing-page visit: the Subscribe webhook alone makes it known and active.
    stack
        .wait_for("the auto-activated purchase recorded", || async {
            (stack.engine(id).await.unwrap()?.state == "Subscribed").then_some(())
        })
        .await;
    stack.settle(&[id], WAIT).await.unwrap();
    // A later visit shows it active and changes nothing.
    let page = ScriptedCustomer::new("customer")
        .unwrap()
        .open(&landing)
        .await
        .unwrap()
        .html;
    assert!(page.contains("Welcome back"), "{page}");
    // Microsoft delivers the Subscribe webhook again (a redelivery): still nothing new.
    let view = stack.admin.view(id).await.unwrap();
    let subscribe = view["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["action"] == "Subscribe")
        .cloned()
        .unwrap_or_else(|| panic!("no Subscribe operation: {view}"));
    let again = json!({
        "id": subscribe["id"], "activityId": Uuid::new_v4(), "subscriptionId": id,
        "publisherId": "contoso", "offerId": "contoso-analytics", "planId": "gold",
        "action": "Subscribe", "status": "Succeeded", "operationRequestSource": "Azure",
        "timeStamp": subscribe["timeStamp"], "subscription": view["subscription"],
    });
    let token = stack.sim.mint_webhook_token(json!({})).unwrap();
    let answer = stack
        .http
        .post(stack.url("/webhook"))
        .bearer_auth(token)
        .json(&again)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.status());
    stack
        .wait_for("the redelivery logged as a duplicate", || async {
            let rows = stack.events(id).await;
            let copies = rows
                .iter()
                .filter(|r| r.event_kind == "WebhookSubscribe")
                .count();
            (copies >= 2).then_some(())
        })
        .await;
    stack.settle(&[id], WAIT).await.unwrap();

    // The webhook of an unknown subscription is preceded by a GET (P12): that observation
    // records it Subscribed; the Subscribe itself then changes nothing.
    let rows = decisions(&stack, id).await;
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1.as_str()),
        ("Observed", "applied"),
        "{rows:#?}"
    );
    assert!(
        rows.iter()
            .any(|(kind, _, _, _)| kind == "WebhookSubscribe"),
        "{rows:#?}"
    );
    assert!(
        rows.iter().all(|(kind, _, _, _)| kind != "effect:activate"),
        "never activated: {rows:#?}"
    );
    assert_eq!(activate_calls(&stack, id).await, 0);
    let activated = rows
        .iter()
        .flat_map(|(_, _, _, effects)| published(effects))
        .filter(|kind| kind == "activated")
        .count();
    assert_eq!(activated, 1, "announced once: {rows:#?}");
    let (_, shown) = stack
        .entitlement(Method::GET, &format!("/api/v1/subscriptions/{id}"), None)
        .await;
    assert_eq!(shown["state"], "Subscribed");
    assert_eq!(shown["planId"], "gold");
    assert!(shown["term"]["startDate"].is_string(), "{shown}");
    stack.finish().await;
}

#[tokio::test]
async fn renewals_term_ends_and_the_end_of_the_suspension_grace_reach_the_engine() {
    let stack = Stack::start(Options {
        // One simulated day = 50 ms: a monthly term lasts about 1.5 s, the grace 1.5 s.
        simulator: |config| config.timings.day = Duration::from_millis(50),
        ..Options::default()
    })
    .await;
    let renewing = stack.subscribed("silver", None).await;
    let term_start = |id: Uuid| {
        let stack = &stack;
        async move {
            let (_, shown) = stack
                .entitlement(Method::GET, &format!("/api/v1/subscriptions/{id}"), None)
                .await;
            shown["term"]["startDate"].clone()
        }
    };
    let first_term = term_start(renewing).await;
    assert!(first_term.is_string(), "{first_term}");
    let Purchase {
        id: ending,
        landing,
        ..
    } = stack
        .admin
        .buy(json!({"planId": "gold", "autoRenew": false}))
        .await
        .unwrap();
    activate_on_landing(&landing).await.unwrap();
    let suspended = stack.subscribed("silver", None).await;
    stack.act(suspended, json!({"action": "Suspend"})).await;

    for id in [ending, suspended] {
        stack
            .wait_for("the subscription to end on both sides", || async {
                let ours = stack.engine(id).await.unwrap()?;
                (ours.state == "Unsubscribed" && stack.microsoft(id) == Some(ours)).then_some(())
            })
            .await;
    }
    // The renewal moved the term here too, and the subscription stays active.
    stack
        .wait_for("the renewed term recorded", || async {
            (term_start(renewing).await != first_term).then_some(())
        })
        .await;
    assert!(
        stack
            .events(renewing)
            .await
            .iter()
            .any(|r| r.event_kind == "WebhookRenew" && r.outcome == LogOutcome::Applied)
    );
    assert_eq!(
        stack.engine(renewing).await.unwrap().unwrap().state,
        "Subscribed"
    );
    stack.finish().await;
}

#[tokio::test]
async fn an_activation_that_fails_at_microsoft_is_announced_and_ends_the_subscription() {
    let stack = Stack::start(Options::default()).await;
    let Purchase { id, landing, .. } = stack
        .admin
        .buy(json!({"planId": "silver", "failActivation": true}))
        .await
        .unwrap();
    activate_on_landing(&landing).await.unwrap();
    stack
        .wait_for("the failed activation to end the subscription", || async {
            let ours = stack.engine(id).await.unwrap()?;
            (ours.state == "Unsubscribed" && stack.microsoft(id) == Some(ours)).then_some(())
        })
        .await;
    stack.settle(&[id], WAIT).await.unwrap();
    let announced: Vec<String> = decisions(&stack, id)
        .await
        .iter()
        .flat_map(|(_, _, _, effects)| published(effects))
        .collect();
    assert_eq!(
        announced
            .iter()
            .filter(|kind| *kind == "activation_failed")
            .count(),
        1,
        "{announced:?}"
    );
    assert!(
        announced.iter().all(|kind| kind != "activated"),
        "{announced:?}"
    );
    assert_eq!(activate_calls(&stack, id).await, 1);
    stack.finish().await;
}
