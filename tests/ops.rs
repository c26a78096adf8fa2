//! The operator tools end to end: `fulfillment dlq …`, `fulfillment subscription …` and
//! `fulfillment reconcile`, run as the real binary (and, for the 10,000-message replay, as
//! library calls) against the local PostgreSQL and RabbitMQ and the simulator on port 0.
//! Webhooks the simulator sends reach a tiny receiver that publishes them as the ingress
//! would; switched to "deaf" it answers 200 and drops them, as a lost webhook would be.

mod stack;

use std::time::Duration;

use fulfillment_state_machine::{Event, Snapshot, SubscriptionId};
use marketplace_fulfillment::ops::dlq::{self, Filter, ReplayOptions};
use marketplace_fulfillment::queue::{InboundMessage, MessageMeta, PublisherCommand};
use marketplace_fulfillment::worker::apply::{self, Apply, ApplyOutcome, EventSource, Expected};
use marketplace_fulfillment::world::wait_until;
use serde_json::{Value, json};
use stack::{Options, Stack, TestDatabase, WAIT};
use time::OffsetDateTime;
use uuid::Uuid;

/// The stack with `workers` in-process workers, retry tiers of milliseconds and an ACK
/// window our ACK comes well inside (a lost webhook's change is auto-accepted after it).
async fn start(workers: usize) -> Stack {
    Stack::start(Options {
        ack_window: Duration::from_secs(2),
        retry_delays: Some(vec![Duration::from_millis(50), Duration::from_millis(100)]),
        worker: |worker| worker.prefetch = 32,
        workers,
        ..Options::default()
    })
    .await
}

/// Runs `fulfillment ARGS` as the operator `ops-tester`.
async fn cli(app: &Stack, args: &[&str]) -> (i32, String, String) {
    cli_with(app, args, &[]).await
}

async fn cli_with(app: &Stack, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let env: Vec<(&str, &str)> = [("USER", "ops-tester")]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    app.cli(args, &env).await
}

/// Publishes `letters` (message id, subscription, body) straight into the dead-letter
/// queue as the worker's `dead_letter` would leave them after two attempts.
async fn seed_dead_letters(app: &Stack, letters: &[(String, Option<Uuid>, Vec<u8>)], reason: &str) {
    let publisher = app.broker.publisher().await.unwrap();
    for chunk in letters.chunks(1000) {
        let published = chunk.iter().map(|(message_id, subscription, body)| {
            let meta = MessageMeta {
                message_id: message_id.clone(),
                correlation_id: message_id.clone(),
                traceparent: None,
                subscription_id: *subscription,
            };
            let publisher = &publisher;
            async move { publisher.publish_dead_letter(body, &meta, 2, reason).await }
        });
        for result in futures_util::future::join_all(published).await {
            result.unwrap();
        }
    }
}

fn activate_command(subscription: Uuid, command_id: Uuid) -> Vec<u8> {
    InboundMessage::Command {
        command_id,
        subscription_id: subscription,
        command: PublisherCommand::Activate,
        requested_by: "api".into(),
        requested_at: OffsetDateTime::now_utc(),
    }
    .to_json()
}

fn json_of(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[tokio::test]
async fn dead_letters_from_real_failures_are_listed_filtered_shown_and_replayed_exactly_once() {
    let app = start(1).await;
    // Microsoft is down: webhooks about subscriptions we never saw need a GET first (P12),
    // which fails; the retry tiers run out and both land in the dead-letter queue.
    app.admin
        .set_faults(json!({"share5xx": 1.0}))
        .await
        .unwrap();
    let a = app.buy("silver", None, true).await.id;
    let b = app.buy("gold", None, false).await.id;
    let op_b = app.act(b, json!({"action": "Unsubscribe"})).await;
    // And a message no worker can ever apply.
    let poison = InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: r#"{"id":"not-a-uuid","action":"Suspend"}"#.into(),
    };
    app.publish(&poison, "poison-1", None).await;
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), 3)
        .await;
    let view = app.admin.view(a).await.unwrap();
    let op_a = view["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["action"] == "Subscribe")
        .and_then(|w| w["operationId"].as_str())
        .unwrap_or_else(|| panic!("no Subscribe webhook: {view}"))
        .to_string();

    // list: all three, exit 1 (failures found); a table a person can read.
    let (code, out, err) = cli(&app, &["dlq", "list"]).await;
    assert_eq!(code, 1, "{out}{err}");
    for needle in [
        &op_a,
        &op_b,
        "poison-1",
        "Subscribe",
        "Unsubscribe",
        "REASON",
        "3 dead letter(s)",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    // filters
    let (_, out, _) = cli(
        &app,
        &["dlq", "list", "--json", "--subscription", &a.to_string()],
    )
    .await;
    let found = json_of(&out);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    let letter = &found[0];
    assert_eq!(letter["id"], op_a.as_str());
    assert_eq!(letter["action"], "Subscribe");
    assert_eq!(letter["message_type"], "webhook");
    assert_eq!(
        letter["attempts"], 3,
        "the first try and two retry tiers were made: {letter}"
    );
    assert!(letter["first_failure"].as_str() <= letter["last_failure"].as_str());
    assert!(
        letter["reason"].as_str().unwrap().contains("500"),
        "{letter}"
    );
    let (_, out, _) = cli(&app, &["dlq", "list", "--json", "--action", "unsubscribe"]).await;
    let found = json_of(&out);
    assert_eq!(found.as_array().unwrap().len(), 1, "{found}");
    assert_eq!(found[0]["subscription_id"], b.to_string());
    let (_, out, _) = cli(
        &app,
        &[
            "dlq",
            "list",
            "--json",
            "--reason",
            "not a valid marketplace webhook",
        ],
    )
    .await;
    assert_eq!(json_of(&out)[0]["id"], "poison-1");
    let (_, out, _) = cli(&app, &["dlq", "list", "--json", "--since", "1h"]).await;
    assert_eq!(json_of(&out).as_array().unwrap().len(), 3);
    let (code, out, _) = cli(
        &app,
        &["dlq", "list", "--json", "--since", "2999-01-01T00:00:00Z"],
    )
    .await;
    assert_eq!((code, json_of(&out)), (0, json!([])));
    let (code, _, err) = cli(&app, &["dlq", "list", "--since", "last tuesday"]).await;
    assert_eq!(code, 2, "{err}");

    // show: the whole message, its headers and Microsoft's last answer.
    let (code, out, err) = cli(&app, &["dlq", "show", &op_a]).await;
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        "Last Microsoft response",
        "get_subscription",
        "HTTP 500",
        "x-ms-requestid",
        "x-failure-reason",
        "\"action\": \"Subscribe\"",
        &a.to_string(),
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }

    // A dry run changes nothing.
    let (code, out, err) = cli(&app, &["dlq", "replay", "--reason", "500"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("dry run: 2 of 3"), "{out}");
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), 3)
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    assert!(app.engine(a).await.unwrap().is_none() && app.engine(b).await.unwrap().is_none());
    assert_eq!(
        app.count("SELECT count(*) FROM operator_actions WHERE $1 <> ''", "x")
            .await,
        0
    );

    // The cause removed, the replay moves both; each is processed exactly once.
    app.admin.set_faults(json!({})).await.unwrap();
    let (code, out, err) = cli(&app, &["dlq", "replay", "--reason", "500", "--execute"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("2 of 2 selected dead letter(s) replayed"),
        "{out}"
    );
    app.wait_for_view(a, "Subscribed", Some("silver"), None)
        .await;
    app.wait_for_view(b, "Unsubscribed", None, None).await;
    app.run_until_idle(WAIT).await.unwrap();
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), 1)
        .await; // the poison message stays
    // Decided once: a later copy is only logged as an ignored duplicate (inbox).
    let once = "SELECT count(*) FROM subscription_events WHERE message_id = $1 AND event_kind LIKE 'Webhook%' AND NOT (outcome = 'ignored' AND coalesce(reason, '') LIKE 'duplicate event:%')";
    let duplicates = "SELECT count(*) FROM subscription_events WHERE message_id = $1 AND outcome = 'ignored' AND reason LIKE 'duplicate event:%'";
    assert_eq!(app.count(once, &op_a).await, 1);
    assert_eq!(app.count(once, &op_b).await, 1);
    assert_eq!(
        app.count("SELECT count(*) FROM inbox WHERE message_id = $1", &op_a)
            .await,
        1
    );
    let journal = "SELECT count(*) FROM operator_actions WHERE action = 'dlq_replay' \
                   AND dead_letter_id = $1 AND performed_by LIKE 'cli:ops-tester@%'";
    assert_eq!(app.count(journal, &op_a).await, 1);
    assert_eq!(app.count(journal, &op_b).await, 1);

    // A second copy of the same webhook (Microsoft redelivers) dead-lettered and replayed:
    // the inbox makes it a duplicate, nothing is decided twice.
    let body: String = sqlx::query_scalar(
        "SELECT details->>'body' FROM operator_actions WHERE dead_letter_id = $1",
    )
    .bind(&op_a)
    .fetch_one(&app.pool)
    .await
    .unwrap();
    seed_dead_letters(
        &app,
        &[(op_a.clone(), Some(a), body.into_bytes())],
        "HTTP 500 again",
    )
    .await;
    let (code, out, err) = cli(&app, &["dlq", "replay", "--id", &op_a, "--execute"]).await;
    assert_eq!(code, 0, "{out}{err}");
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), 1)
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    assert_eq!(app.count(once, &op_a).await, 1);
    assert_eq!(app.count(duplicates, &op_a).await, 1);
    assert_eq!(app.count(journal, &op_a).await, 2);

    // The timeline shows the replays.
    let (code, out, err) = cli(&app, &["subscription", "show", &a.to_string()]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("dead letter {op_a} replayed")),
        "{out}"
    );
    assert!(out.contains("by cli:ops-tester@"), "{out}");

    // Purge: refuses without a filter; a dry run first; then gone, and kept in the journal.
    let (code, _, err) = cli(&app, &["dlq", "purge", "--execute"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = cli(&app, &["dlq", "purge", "--id", "poison-1"]).await;
    assert_eq!(code, 0);
    assert!(out.contains("dry run: 1 of 1"), "{out}");
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), 1)
        .await;
    let (code, out, err) = cli(&app, &["dlq", "purge", "--id", "poison-1", "--execute"]).await;
    assert_eq!(code, 0, "{out}{err}");
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), 0)
        .await;
    let kept: String = sqlx::query_scalar(
        "SELECT details->>'body' FROM operator_actions WHERE action = 'dlq_purge' AND dead_letter_id = $1",
    )
    .bind("poison-1")
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(kept.contains("not-a-uuid"), "{kept}");
    let (code, out, _) = cli(&app, &["dlq", "list"]).await;
    assert_eq!(code, 0, "{out}");
    app.finish().await;
}

#[tokio::test]
async fn ten_thousand_dead_letters_are_replayed_and_each_processed_once() {
    const MESSAGES: usize = 10_000;
    let app = start(0).await;
    let subscriptions: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let letters: Vec<(String, Option<Uuid>, Vec<u8>)> = (0..MESSAGES)
        .map(|i| {
            let subscription = subscriptions[i % subscriptions.len()];
            let command_id = Uuid::new_v4();
            (
                command_id.to_string(),
                Some(subscription),
                activate_command(subscription, command_id),
            )
        })
        .collect();
    seed_dead_letters(&app, &letters, "database: connection refused").await;
    assert_eq!(
        app.broker
            .queue_counts(&app.broker.topology().dead_letter_queue())
            .await
            .unwrap()
            .0,
        MESSAGES as u32
    );

    let options = |execute| ReplayOptions {
        limit: None,
        rate: None,
        execute,
        actor: "cli:ten-thousand@test".into(),
        batch: dlq::DEFAULT_BATCH,
    };
    let progress = indicatif::ProgressBar::hidden();
    // The dry run holds all 10,000 at once (its window grows) and returns them.
    let dry = dlq::replay(
        &app.broker,
        &app.pool,
        &Filter::default(),
        &options(false),
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.examined, dry.selected.len(), dry.moved),
        (MESSAGES, MESSAGES, 0)
    );
    app.wait_for_queue_len(&app.broker.topology().dead_letter_queue(), MESSAGES as u32)
        .await;

    let report = dlq::replay(
        &app.broker,
        &app.pool,
        &Filter::default(),
        &options(true),
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(report.moved, MESSAGES, "{:?}", report.not_moved);
    assert!(report.not_moved.is_empty());
    assert_eq!(
        app.broker
            .queue_counts(&app.broker.topology().dead_letter_queue())
            .await
            .unwrap()
            .0,
        0,
        "none left behind"
    );
    assert_eq!(
        app.broker
            .queue_counts(&app.broker.topology().inbound_queue())
            .await
            .unwrap()
            .0,
        MESSAGES as u32
    );

    let mut app = app;
    for _ in 0..3 {
        app.start_worker().await;
    }
    let what = format!("{MESSAGES} commands processed");
    wait_until(&what, Duration::from_secs(600), || async {
        let done = app
            .count("SELECT count(*) FROM inbox WHERE kind = $1", "command")
            .await;
        (done == MESSAGES as i64).then_some(())
    })
    .await
    .unwrap();
    app.run_until_idle(WAIT).await.unwrap();
    let (events, distinct): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT message_id) FROM subscription_events \
         WHERE event_kind = 'ActivationRequested'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!((events, distinct), (MESSAGES as i64, MESSAGES as i64));
    let journalled = app
        .count(
            "SELECT count(DISTINCT dead_letter_id) FROM operator_actions WHERE action = $1",
            "dlq_replay",
        )
        .await;
    assert_eq!(journalled, MESSAGES as i64);
    assert_eq!(
        app.broker
            .queue_counts(&app.broker.topology().dead_letter_queue())
            .await
            .unwrap()
            .0,
        0
    );
    assert_eq!(
        app.broker
            .queue_counts(&app.broker.topology().inbound_queue())
            .await
            .unwrap()
            .0,
        0
    );
    app.finish().await;
}

#[tokio::test]
async fn subscription_show_prints_a_timeline_a_person_can_follow_through_every_action() {
    let app = start(1).await;
    let id = app.purchase_resolved("per-seat", Some(5)).await;
    app.wait_for_view(id, "Subscribed", Some("per-seat"), Some(5))
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    let sid = id.to_string();

    let op = app
        .act(id, json!({"action": "ChangeQuantity", "quantity": 8}))
        .await;
    app.admin.wait_for_operation(id, &op, WAIT).await.unwrap();
    app.wait_for_view(id, "Subscribed", None, Some(8)).await;
    app.run_until_idle(WAIT).await.unwrap();

    // Publisher commands through the queue and the machine, as the entitlement API's.
    let (code, out, err) = cli(
        &app,
        &["subscription", "change-quantity", &sid, "10", "--wait"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("change_quantity): succeeded"), "{out}");
    app.wait_for_view(id, "Subscribed", None, Some(10)).await;
    app.run_until_idle(WAIT).await.unwrap();
    // Microsoft refuses the next change: --wait waits for its answer and exits 1, and the
    // command's outcome says so (issue #18: it printed "applied" and exited 0).
    app.admin
        .set_faults(json!({"failCalls": {"updateSubscription": 400}}))
        .await
        .unwrap();
    let (code, out, err) = cli(
        &app,
        &[
            "subscription",
            "change-quantity",
            &sid,
            "11",
            "--wait",
            "--json",
        ],
    )
    .await;
    assert_eq!(code, 1, "{out}{err}");
    let outcome: Value = serde_json::from_str(out.trim()).expect("one JSON outcome");
    assert_eq!(outcome["status"], "failed", "{outcome}");
    assert!(
        outcome["reason"]
            .as_str()
            .is_some_and(|why| why.starts_with("refused by Microsoft")),
        "{outcome}"
    );
    let command_id = outcome["commandId"].as_str().unwrap().parse().unwrap();
    let stored = marketplace_fulfillment::commands::outcome_of(&app.pool, command_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.status,
        marketplace_fulfillment::commands::Status::Failed
    );
    app.admin.set_faults(json!({})).await.unwrap();
    app.wait_for_view(id, "Subscribed", None, Some(10)).await;
    app.run_until_idle(WAIT).await.unwrap();
    // Already active: the machine says so, and the exit code says it did nothing.
    let (code, out, _) = cli(&app, &["subscription", "activate", &sid, "--wait"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("already activated"), "{out}");

    for action in ["Renew", "Suspend", "Reinstate"] {
        let op = app.act(id, json!({"action": action})).await;
        app.admin.wait_for_operation(id, &op, WAIT).await.unwrap();
        let state = if action == "Suspend" {
            "Suspended"
        } else {
            "Subscribed"
        };
        app.wait_for_view(id, state, None, None).await;
        app.run_until_idle(WAIT).await.unwrap();
    }
    let op = app
        .act(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    app.admin.wait_for_operation(id, &op, WAIT).await.unwrap();
    app.wait_for_view(id, "Subscribed", Some("gold"), None)
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    let (code, out, err) = cli(
        &app,
        &["subscription", "change-plan", &sid, "silver", "--wait"],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    app.wait_for_view(id, "Subscribed", Some("silver"), None)
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    let (code, out, err) = cli(&app, &["subscription", "cancel", &sid]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("queued command"), "{out}");
    app.wait_for_view(id, "Unsubscribed", None, None).await;
    app.run_until_idle(WAIT).await.unwrap();

    let (code, out, err) = cli(&app, &["subscription", "show", &sid]).await;
    assert_eq!(code, 0, "{out}{err}");
    for needle in [
        &format!("Subscription {id}"),
        "state              Unsubscribed",
        "landing page resolved the purchase: PendingFulfillmentStart, plan per-seat, 5 seats",
        ", activate\n",
        "call activate → HTTP",
        "Microsoft confirmed the activation",
        "[PendingFulfillment → Subscribed]",
        "Microsoft webhook ChangeQuantity to 8 seats",
        "ack_operation(Success)",
        "call update_operation → HTTP 200",
        "publisher command: change quantity to 10",
        "Microsoft accepted command",
        "ended Succeeded",
        "Microsoft webhook Renew",
        "[Subscribed → Suspended]",
        "[Suspended → Subscribed]",
        "Microsoft webhook ChangePlan to plan gold",
        "publisher command: change plan to silver",
        "publisher command: cancel",
        "[Subscribed → Unsubscribed]",
        "decision: applied — ",
        "decision: ignored — ",
        "x-ms-requestid ",
        "Changes we asked Microsoft for",
        "publish_domain_event(unsubscribed)",
    ] {
        assert!(out.contains(needle), "{needle:?} missing from:\n{out}");
    }
    // Every row of the event log is in the timeline, in order.
    let rows = app
        .count(
            "SELECT count(*) FROM subscription_events WHERE subscription_id::text = $1",
            &sid,
        )
        .await;
    let (_, out, _) = cli(&app, &["subscription", "show", &sid, "--json"]).await;
    let timeline = json_of(&out);
    let entries = timeline["entries"].as_array().unwrap();
    assert_eq!(entries.len() as i64, rows);
    let sequences: Vec<i64> = entries
        .iter()
        .filter_map(|e| e["sequence"].as_i64())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");

    let (code, out, _) = cli(&app, &["subscription", "list", "--state", "Unsubscribed"]).await;
    assert_eq!(code, 0);
    assert!(
        out.contains(&sid) && out.contains("1 subscription(s)"),
        "{out}"
    );
    let (_, out, _) = cli(
        &app,
        &["subscription", "list", "--state", "Subscribed", "--json"],
    )
    .await;
    assert_eq!(json_of(&out), json!([]));
    let (code, _, err) = cli(&app, &["subscription", "list", "--state", "Active"]).await;
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = cli(&app, &["subscription", "show", &Uuid::new_v4().to_string()]).await;
    assert_eq!(code, 1, "{out}");
    app.finish().await;
}

#[tokio::test]
async fn reconcile_finds_each_kind_of_drift_and_heals_it_through_the_machine() {
    let app = start(1).await;
    // In agreement to begin with.
    let state_drift = app.purchase_resolved("silver", None).await;
    let plan_drift = app.purchase_resolved("silver", None).await;
    let quantity_drift = app.purchase_resolved("per-seat", Some(5)).await;
    for id in [state_drift, plan_drift] {
        app.wait_for_view(id, "Subscribed", Some("silver"), None)
            .await;
    }
    app.wait_for_view(quantity_drift, "Subscribed", Some("per-seat"), Some(5))
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    let (code, out, err) = cli(&app, &["reconcile"]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no drift"), "{out}");

    // Webhooks lost on the way: Microsoft moves on without us.
    let lose = json!({"loseWebhooks": true});
    app.admin.set_faults(lose).await.unwrap();
    let op = app.act(state_drift, json!({"action": "Suspend"})).await;
    app.admin
        .wait_for_operation(state_drift, &op, WAIT)
        .await
        .unwrap();
    app.wait_for_delivery(state_drift, "Suspend").await;
    let op = app
        .act(
            plan_drift,
            json!({"action": "ChangePlan", "planId": "gold"}),
        )
        .await;
    app.admin
        .wait_for_operation(plan_drift, &op, WAIT)
        .await
        .unwrap(); // auto-accepted after the window
    app.wait_for_delivery(plan_drift, "ChangePlan").await;
    let op = app
        .act(
            quantity_drift,
            json!({"action": "ChangeQuantity", "quantity": 7}),
        )
        .await;
    app.admin
        .wait_for_operation(quantity_drift, &op, WAIT)
        .await
        .unwrap();
    app.wait_for_delivery(quantity_drift, "ChangeQuantity")
        .await;
    let missing = app.buy("silver", None, true).await.id;
    app.wait_for("Microsoft's missing Subscribed", || async {
        (app.microsoft(missing)?.state == "Subscribed").then_some(())
    })
    .await;
    app.wait_for_delivery(missing, "Subscribe").await;
    app.admin.set_faults(json!({})).await.unwrap();

    // A subscription Microsoft never sold (a forged webhook got through, P24).
    let unknown = Uuid::new_v4();
    let snapshot: Snapshot = serde_json::from_value(json!({
        "status": "Subscribed", "offer_id": "contoso-analytics", "plan_id": "gold",
    }))
    .unwrap();
    let observed = Event::Observed {
        snapshot,
        observed_at: OffsetDateTime::now_utc(),
    };
    apply::apply(
        &app.pool,
        &app.settings.policy,
        &Apply::new(
            SubscriptionId::from(unknown),
            &observed,
            &EventSource::default(),
            OffsetDateTime::now_utc(),
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        app.engine(unknown).await.unwrap().unwrap().state,
        "Subscribed"
    );

    // A resolved purchase whose Activate effect died while Microsoft was down: stuck.
    let (stuck, resolved, message_id) = app.resolve("gold", None).await;
    app.admin
        .set_faults(json!({"share5xx": 1.0}))
        .await
        .unwrap();
    app.publish(&resolved, &message_id, stuck).await;
    app.wait_for("the Activate effect to die", || async {
        let dead = app
            .count(
                "SELECT count(*) FROM outbox WHERE subscription_id::text = $1 AND kind = 'activate' AND status = 'dead'",
                &stuck.to_string(),
            )
            .await;
        (dead > 0).then_some(())
    })
    .await;
    app.admin.set_faults(json!({})).await.unwrap();
    app.run_until_idle(WAIT).await.unwrap();
    assert_eq!(
        app.engine(stuck).await.unwrap().unwrap().state,
        "PendingFulfillment"
    );

    // The report: every kind, each on its subscription; exit 1; nothing changed.
    let stuck_now = [("FULFILLMENT__RECONCILE__STUCK_PENDING_AFTER_SECS", "0")];
    let (code, out, err) = cli_with(&app, &["reconcile", "--json"], &stuck_now).await;
    assert_eq!(code, 1, "{out}{err}");
    let report = json_of(&out);
    let kinds = |id: Uuid| -> Vec<String> {
        report["drifts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["subscription_id"] == id.to_string())
            .map(|d| {
                d["kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(kinds(state_drift), ["state_mismatch"], "{report}");
    assert_eq!(kinds(plan_drift), ["plan_mismatch"], "{report}");
    assert_eq!(kinds(quantity_drift), ["quantity_mismatch"], "{report}");
    assert_eq!(kinds(missing), ["missing_here"], "{report}");
    assert_eq!(kinds(unknown), ["unknown_to_microsoft"], "{report}");
    assert_eq!(kinds(stuck), ["stuck_pending"], "{report}");
    assert_eq!(report["drifts"].as_array().unwrap().len(), 6, "{report}");
    let (code, out, _) = cli_with(&app, &["reconcile"], &stuck_now).await;
    assert_eq!(code, 1);
    for needle in [
        "state mismatch",
        "missing here",
        "unknown to Microsoft",
        "stuck in PendingFulfillment",
        "add --execute",
    ] {
        assert!(out.contains(needle), "{needle}:\n{out}");
    }
    assert_eq!(
        app.engine(state_drift).await.unwrap().unwrap().state,
        "Subscribed"
    );
    assert!(app.engine(missing).await.unwrap().is_none());

    // Healed through the machine, with event-log entries.
    let (code, out, err) = cli_with(&app, &["reconcile", "--execute"], &stuck_now).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("6 healed, 0 left"), "{out}");
    app.wait_for_view(state_drift, "Suspended", None, None)
        .await;
    app.wait_for_view(plan_drift, "Subscribed", Some("gold"), None)
        .await;
    app.wait_for_view(quantity_drift, "Subscribed", None, Some(7))
        .await;
    app.wait_for_view(missing, "Subscribed", Some("silver"), None)
        .await;
    app.wait_for_view(unknown, "Unsubscribed", None, None).await;
    app.wait_for_view(stuck, "Subscribed", Some("gold"), None)
        .await;
    app.wait_for("Microsoft's stuck Subscribed", || async {
        (app.microsoft(stuck)?.state == "Subscribed").then_some(())
    })
    .await;
    app.run_until_idle(WAIT).await.unwrap();
    for id in [
        state_drift,
        plan_drift,
        quantity_drift,
        missing,
        unknown,
        stuck,
    ] {
        let sid = id.to_string();
        let drift_rows = app
            .count(
                "SELECT count(*) FROM subscription_events WHERE subscription_id::text = $1 AND event_kind = 'reconcile:drift'",
                &sid,
            )
            .await;
        assert_eq!(drift_rows, 1, "{id}");
        let fed = app
            .count(
                "SELECT count(*) FROM subscription_events WHERE subscription_id::text = $1 \
                 AND message_id LIKE 'reconcile:%' AND outcome = 'applied'",
                &sid,
            )
            .await;
        assert!(fed >= 1, "{id}: nothing fed through the machine");
    }
    let (_, out, _) = cli(&app, &["subscription", "show", &stuck.to_string()]).await;
    assert!(out.contains("reconciliation: drift"), "{out}");
    assert!(
        out.contains("activation failed: still pending at Microsoft"),
        "{out}"
    );
    let (code, out, err) = cli_with(&app, &["reconcile"], &stuck_now).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("no drift"), "{out}");

    // Never over an event applied after our side was read: the guarded apply refuses.
    let version: i64 = sqlx::query_scalar("SELECT version FROM subscriptions WHERE id = $1")
        .bind(plan_drift)
        .fetch_one(&app.pool)
        .await
        .unwrap();
    let (code, out, err) = cli(
        &app,
        &[
            "subscription",
            "change-plan",
            &plan_drift.to_string(),
            "silver",
            "--wait",
        ],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    let suspended = Event::Observed {
        snapshot: serde_json::from_value(json!({"status": "Suspended"})).unwrap(),
        observed_at: OffsetDateTime::now_utc(),
    };
    let stale = apply::apply(
        &app.pool,
        &app.settings.policy,
        &Apply::new(
            SubscriptionId::from(plan_drift),
            &suspended,
            &EventSource::default(),
            OffsetDateTime::now_utc(),
        )
        .if_unchanged(Expected::Version(version)),
    )
    .await
    .unwrap();
    assert!(matches!(stale, ApplyOutcome::Changed { .. }), "{stale:?}");
    app.wait_for_view(plan_drift, "Subscribed", Some("silver"), None)
        .await;
    app.run_until_idle(WAIT).await.unwrap();
    app.finish().await;
}

#[tokio::test]
async fn bench_replay_runs_and_prints_a_json_result() {
    let db = TestDatabase::new();
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .args(["bench", "replay", "--messages", "300", "--batch", "50"])
        .env_remove("FULFILLMENT_CONFIG")
        .env("RUST_LOG", "warn")
        .env("DATABASE_URL", db.url().expose())
        .env("FULFILLMENT__AMQP__PREFIX", &db.settings.amqp.prefix)
        .output()
        .await
        .expect("run fulfillment bench replay");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let result = json_of(stdout.lines().last().expect("output"));
    assert_eq!(result["bench"], "replay");
    assert_eq!(result["moved"], 300, "{result}");
    assert_eq!(result["journalled"], 300, "{result}");
    assert_eq!(result["dlq_left"], 0, "{result}");
    for key in ["replay_per_s", "publish_ceiling_per_s", "ratio"] {
        assert!(
            result[key].as_f64().unwrap_or(0.0) > 0.0,
            "{key} in {result}"
        );
    }
}
