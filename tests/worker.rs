//! The worker end to end in the test world (`tests/stack`): real PostgreSQL, RabbitMQ, the
//! ingress and the simulator on port 0 with fast clocks. Purchases and publisher commands
//! are published on the inbound queue as the landing page and the entitlement API would.

mod stack;

use marketplace_fulfillment::store::ledger::LogOutcome;
use std::time::{Duration, Instant};

use marketplace_fulfillment::ops::subscription::submit;
use marketplace_fulfillment::queue::{InboundMessage, PublisherCommand};
use serde_json::{Value, json};
use stack::{Options, Stack, WAIT};
use time::OffsetDateTime;
use uuid::Uuid;

/// The stack with this policy and retry tiers of milliseconds.
async fn start(policy: Value) -> Stack {
    Stack::start(Options {
        retry_delays: Some(vec![Duration::from_millis(100), Duration::from_millis(200)]),
        policy,
        ..Options::default()
    })
    .await
}

/// Purchases, publishes `PurchaseResolved` and waits until our side says Subscribed.
async fn subscribed(stack: &Stack, plan: &str, quantity: Option<u32>) -> Uuid {
    let id = stack.purchase_resolved(plan, quantity).await;
    stack.wait_for_view(id, "Subscribed", None, None).await;
    id
}

#[tokio::test]
async fn a_resolved_purchase_is_activated_exactly_once_and_announced() {
    let app = start(json!({})).await;
    let id = subscribed(&app, "silver", None).await;
    app.run_until_idle(WAIT).await.unwrap();

    let view = app.admin.view(id).await.unwrap();
    assert_eq!(view["subscription"]["saasSubscriptionStatus"], "Subscribed");
    let events = app.events(id).await;
    let activations = events
        .iter()
        .filter(|e| {
            e.event_kind == "effect:activate"
                && e.event["calls"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|c| c["call"] == "activate")
        })
        .count();
    assert_eq!(activations, 1, "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e.event_kind == "ActivationConfirmed" && e.outcome == LogOutcome::Applied),
        "{events:#?}"
    );
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE subscription_id = $1 AND status <> 'done'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(done, 0);

    let published = app.domain_events().await;
    let activated: Vec<_> = published
        .iter()
        .filter(|(ce, _)| ce["type"] == "com.fulfillment.subscription.activated")
        .collect();
    assert_eq!(activated.len(), 1, "{published:#?}");
    let ce = &activated[0].0;
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["subject"], id.to_string());
    assert_eq!(ce["data"]["state"], "Subscribed");
    assert_eq!(ce["data"]["planId"], "silver");
    let log_id: Uuid = ce["id"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let in_log: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM subscription_events WHERE id = $1 AND event_kind = 'ActivationConfirmed')",
    )
    .bind(log_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(in_log, "the CloudEvent id is the event-log id");
    app.finish().await;
}

#[tokio::test]
async fn customer_changes_are_acknowledged_inside_the_window_or_refused_by_policy() {
    let app = start(json!({"seats": {"max": 10}})).await;
    let flat = subscribed(&app, "silver", None).await;
    let seats = subscribed(&app, "per-seat", Some(5)).await;
    app.run_until_idle(WAIT).await.unwrap();

    let started = Instant::now();
    let op = app
        .act(flat, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let operation = app.admin.wait_for_operation(flat, &op, WAIT).await.unwrap();
    assert_eq!(operation["status"], "Succeeded", "{operation}");
    assert_eq!(
        operation["resolution"], "acknowledged Success",
        "{operation}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    app.wait_for_view(flat, "Subscribed", Some("gold"), None)
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    let view = app.admin.view(flat).await.unwrap();
    assert_eq!(view["subscription"]["planId"], "gold");
    let events = app.events(flat).await;
    let acks: Vec<_> = events
        .iter()
        .filter_map(|e| e.record_of("effect:ack_operation"))
        .collect();
    assert_eq!(acks.len(), 1, "{acks:#?}");
    let ms = acks[0].details["webhook_to_ack_ms"]
        .as_i64()
        .expect("measured");
    assert!((0..5_000).contains(&ms), "webhook to ACK took {ms} ms");
    let received_at: Option<OffsetDateTime> = sqlx::query_scalar(
        "SELECT received_at FROM subscription_events WHERE subscription_id = $1 \
         AND event_kind = 'WebhookChangePlan'",
    )
    .bind(flat)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(received_at.is_some());

    let op = app
        .act(seats, json!({"action": "ChangeQuantity", "quantity": 20}))
        .await;
    let operation = app
        .admin
        .wait_for_operation(seats, &op, WAIT)
        .await
        .unwrap();
    assert_eq!(operation["status"], "Failed", "{operation}");
    assert_ne!(operation["resolution"], "auto-accepted", "{operation}");
    app.run_until_idle(WAIT).await.unwrap();
    let view = app.admin.view(seats).await.unwrap();
    assert_eq!(view["subscription"]["quantity"], 5);
    assert_eq!(app.engine(seats).await.unwrap().unwrap().quantity, Some(5));
    assert!(
        app.events(seats)
            .await
            .iter()
            .any(|e| e.event_kind == "WebhookChangeQuantity" && e.outcome == LogOutcome::Rejected)
    );
    app.finish().await;
}

#[tokio::test]
async fn a_webhook_published_twice_is_decided_and_acknowledged_once() {
    let app = start(json!({})).await;
    let id = subscribed(&app, "silver", None).await;
    app.run_until_idle(WAIT).await.unwrap();
    let op = app
        .act(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let body = app
        .wait_for(&format!("a webhook of {op}"), || async {
            let mut sent = app.sim.view().webhook_payloads(id).into_iter();
            sent.find(|body| body["id"] == op)
                .map(|body| body.to_string())
        })
        .await;
    app.admin.wait_for_operation(id, &op, WAIT).await.unwrap();
    app.run_until_idle(WAIT).await.unwrap();
    // The same message again, as a redelivery would bring it.
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: body,
    };
    app.publish(&message, &op, id).await;
    app.run_until_idle(WAIT).await.unwrap();

    let events = app.events(id).await;
    let decisions = events
        .iter()
        .filter(|e| e.event_kind == "WebhookChangePlan" && e.outcome == LogOutcome::Applied)
        .count();
    assert_eq!(decisions, 1, "{events:#?}");
    // The copy is in the event log, ignored as a duplicate.
    let copies = events
        .iter()
        .filter(|e| {
            e.event_kind == "WebhookChangePlan"
                && e.outcome == LogOutcome::Ignored
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("duplicate event"))
        })
        .count();
    assert_eq!(copies, 1, "{events:#?}");
    let acks = events
        .iter()
        .filter(|e| e.record_of("effect:ack_operation").is_some())
        .count();
    assert_eq!(acks, 1, "{events:#?}");
    let inbox: i64 = sqlx::query_scalar("SELECT count(*) FROM inbox WHERE message_id = $1")
        .bind(&op)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(inbox, 1);
    app.finish().await;
}

#[tokio::test]
async fn a_publisher_plan_change_is_requested_polled_and_applied_on_both_sides() {
    let app = start(json!({})).await;
    let id = subscribed(&app, "silver", None).await;
    app.run_until_idle(WAIT).await.unwrap();
    let command_id = Uuid::new_v4();
    let command = InboundMessage::Command {
        command_id,
        subscription_id: id,
        command: PublisherCommand::ChangePlan {
            plan_id: "gold".into(),
        },
        requested_by: "api".into(),
        requested_at: OffsetDateTime::now_utc(),
    };
    app.publish(&command, &command_id.to_string(), id).await;
    app.wait_for_view(id, "Subscribed", Some("gold"), None)
        .await;
    app.run_until_idle(WAIT).await.unwrap();

    let view = app.admin.view(id).await.unwrap();
    assert_eq!(view["subscription"]["planId"], "gold");
    let (status, operation_id): (String, Option<Uuid>) = sqlx::query_as(
        "SELECT status, operation_id FROM publisher_operations WHERE command_id = $1",
    )
    .bind(command_id)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(status, "Succeeded");
    let operation_id = operation_id.expect("the operation id is tracked");
    let ops = view["operations"].as_array().unwrap();
    assert!(
        ops.iter()
            .any(|o| o["id"] == operation_id.to_string() && o["status"] == "Succeeded"),
        "{view}"
    );
    let kinds: Vec<String> = app
        .events(id)
        .await
        .into_iter()
        .map(|e| e.event_kind)
        .collect();
    for expected in [
        "PublisherChangePlan",
        "effect:request_plan_change",
        "PublisherOperationAccepted",
        "effect:poll_operation",
        "OperationResult",
    ] {
        assert!(
            kinds.iter().any(|k| k == expected),
            "{expected} missing: {kinds:?}"
        );
    }
    app.finish().await;
}

#[tokio::test]
async fn effects_outlast_transient_faults_and_permanent_failures_end_dead_with_the_reason() {
    let app = start(json!({})).await;
    let (id, message, message_id) = app.resolve("silver", None).await;
    app.admin
        .set_faults(json!({"share5xx": 0.5, "share429": 0.3, "retryAfterSecs": 0, "seed": 7}))
        .await
        .unwrap();
    app.publish(&message, &message_id, id).await;
    // The faults stay until they made an effect attempt fail.
    app.wait_for("a failed effect attempt", || async {
        (failed_attempts(&app, id).await > 0).then_some(())
    })
    .await;
    app.admin.set_faults(json!({})).await.unwrap();
    app.wait_for_view(id, "Subscribed", None, None).await;
    app.run_until_idle(WAIT).await.unwrap();
    let retried = failed_attempts(&app, id).await;
    assert!(
        retried > 0,
        "the faults made at least one effect attempt fail"
    );
    let view = app.admin.view(id).await.unwrap();
    assert_eq!(view["subscription"]["saasSubscriptionStatus"], "Subscribed");

    // A forged ChangePlan (P24) for an operation Microsoft never created: the ACK fails
    // for good (404/400) and the effect is dead with Microsoft's answer.
    let fake_op = Uuid::new_v4();
    let payload = json!({
        "id": fake_op, "activityId": Uuid::new_v4(), "subscriptionId": id,
        "offerId": "contoso-analytics", "publisherId": "contoso", "planId": "gold",
        "action": "ChangePlan", "status": "InProgress", "operationRequestSource": "Azure",
        "timeStamp": "2099-01-01T00:00:00Z",
    })
    .to_string();
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload,
    };
    app.publish(&message, &fake_op.to_string(), id).await;
    let (status, last_error) = app
        .wait_for("the ACK row to end", || async {
            let row: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT status, last_error FROM outbox WHERE subscription_id = $1 \
                 AND kind = 'ack_operation'",
            )
            .bind(id)
            .fetch_optional(&app.pool)
            .await
            .unwrap();
            row.filter(|(s, _)| s != "pending")
        })
        .await;
    assert_eq!(status, "dead");
    let last_error = last_error.unwrap();
    assert!(last_error.contains("update_operation"), "{last_error}");
    assert!(
        app.events(id).await.iter().any(|e| {
            e.event_kind == "effect:ack_operation"
                && e.outcome == LogOutcome::Recorded
                && e.reason.as_deref().is_some_and(|r| r.starts_with("dead:"))
        }),
        "the death is in the event log"
    );
    app.finish().await;
}

#[tokio::test]
async fn a_poison_message_is_dead_lettered_with_the_reason() {
    let app = start(json!({})).await;
    let id = Uuid::new_v4();
    let message = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: r#"{"id":"not-a-uuid","action":"Suspend"}"#.into(),
    };
    app.publish(&message, "poison-1", id).await;
    let dead = app
        .wait_for("a dead letter", || async {
            Some(app.dead_letters().await).filter(|got| !got.is_empty())
        })
        .await;
    assert_eq!(dead.len(), 1);
    let reason = dead[0].1.get("x-failure-reason").expect("a reason");
    assert!(
        reason.contains("not a valid Marketplace webhook"),
        "{reason}"
    );
    let known: i64 = sqlx::query_scalar("SELECT count(*) FROM subscription_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(known, 0);
    app.finish().await;
}

/// §15.2: Microsoft carries a PATCH out and its 202 is lost on the way back. The runner
/// follows the subscription instead of counting the repeat's 400 "locked" as a refusal.
#[tokio::test]
async fn a_plan_change_whose_202_is_lost_ends_succeeded_as_microsoft_carried_it_out() {
    let app = start(json!({})).await;
    let id = subscribed(&app, "silver", None).await;
    app.run_until_idle(WAIT).await.unwrap();
    app.domain_events().await;
    app.admin
        .set_faults(json!({"loseResponses": {"updateSubscription": 1}}))
        .await
        .unwrap();
    let plan = PublisherCommand::ChangePlan {
        plan_id: "gold".into(),
    };
    let command_id = submit(&app.broker, &app.pool, id, plan, "api")
        .await
        .unwrap();

    let row = app.world.wait_for_command(command_id, WAIT).await.unwrap();
    app.run_until_idle(WAIT).await.unwrap();
    assert_eq!(row.status.as_str(), "Succeeded", "{:?}", row.last_error);
    assert_lost_answer_was_followed(&app, id).await;
    let view = app.admin.view(id).await.unwrap();
    assert_eq!(view["subscription"]["planId"], "gold");
    let ours = app.engine(id).await.unwrap().unwrap();
    assert_eq!(
        (ours.state.as_str(), ours.plan.as_deref()),
        ("Subscribed", Some("gold"))
    );
    let announced = announced(&app).await;
    let changes = announced.iter().filter(|t| t.ends_with("plan_changed"));
    assert_eq!(changes.count(), 1, "announced once: {announced:?}");
    app.finish().await;
}

/// §15.2: the same for DELETE: Microsoft cancels, the 202 is lost, the command succeeds.
#[tokio::test]
async fn a_cancellation_whose_202_is_lost_ends_succeeded_as_microsoft_carried_it_out() {
    let app = start(json!({})).await;
    let id = subscribed(&app, "silver", None).await;
    app.run_until_idle(WAIT).await.unwrap();
    app.domain_events().await;
    app.admin
        .set_faults(json!({"loseResponses": {"deleteSubscription": 1}}))
        .await
        .unwrap();
    let cancel = PublisherCommand::Cancel;
    let command_id = submit(&app.broker, &app.pool, id, cancel, "api")
        .await
        .unwrap();

    let row = app.world.wait_for_command(command_id, WAIT).await.unwrap();
    app.run_until_idle(WAIT).await.unwrap();
    assert_eq!(row.status.as_str(), "Succeeded", "{:?}", row.last_error);
    assert_lost_answer_was_followed(&app, id).await;
    let view = app.admin.view(id).await.unwrap();
    assert_eq!(
        view["subscription"]["saasSubscriptionStatus"],
        "Unsubscribed"
    );
    app.wait_for_view(id, "Unsubscribed", None, None).await;
    let announced = announced(&app).await;
    let ends = announced
        .iter()
        .filter(|t| t.ends_with("subscription.unsubscribed"));
    assert_eq!(ends.count(), 1, "announced once: {announced:?}");
    app.finish().await;
}

/// Effect attempts of `id` that failed (and were retried or given up).
async fn failed_attempts(app: &Stack, id: Uuid) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM subscription_events WHERE subscription_id = $1 \
         AND outcome = 'recorded' AND reason LIKE '%failed:%'",
    )
    .bind(id)
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

/// The fault fired (the answer was lost), and nothing counted it as Microsoft's refusal.
async fn assert_lost_answer_was_followed(app: &Stack, id: Uuid) {
    let faults = app
        .admin
        .call(reqwest::Method::GET, "simulator/faults", Value::Null)
        .await
        .unwrap();
    assert_eq!(
        faults["loseResponses"]
            .as_object()
            .unwrap()
            .values()
            .map(|left| left.as_u64().unwrap())
            .sum::<u64>(),
        0,
        "the answer was lost: {faults}"
    );
    let events = app.events(id).await;
    assert!(
        events.iter().any(|e| e.outcome == LogOutcome::Recorded
            && e.reason
                .as_deref()
                .is_some_and(|r| r.starts_with("outcome unknown"))),
        "the lost answer is in the event log: {events:#?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.event_kind == "PublisherOperationRefused"),
        "{events:#?}"
    );
}

/// The CloudEvents types announced to the ISV since the last drain; never
/// `publisher_operation_failed` here.
async fn announced(app: &Stack) -> Vec<String> {
    let events = app.domain_events().await.into_iter();
    let types: Vec<String> = events
        .map(|(e, _)| e["type"].as_str().unwrap().into())
        .collect();
    assert!(
        !types
            .iter()
            .any(|t| t.ends_with("publisher_operation_failed")),
        "{types:?}"
    );
    types
}
