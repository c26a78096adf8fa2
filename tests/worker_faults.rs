//! The worker under Microsoft's misbehaviour, through the whole stack (simulator → ingress →
//! RabbitMQ → worker → PostgreSQL): webhooks delivered twice and out of order, 5xx/429 for
//! a while, permanent 4xx answers, and webhooks about subscriptions we never saw (P12).

mod stack;

use std::collections::HashMap;
use std::time::Duration;

use marketplace_fulfillment::store::ledger::LogOutcome;
use serde_json::{Value, json};
use stack::{LogRow, Options, Stack, View, WAIT};
use uuid::Uuid;

fn view(state: &str, plan: &str, quantity: Option<i64>) -> Option<View> {
    Some(View {
        state: state.into(),
        plan: Some(plan.into()),
        quantity,
    })
}

fn is_inbox_duplicate(row: &LogRow) -> bool {
    row.outcome == LogOutcome::Ignored
        && row
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("duplicate event"))
}

/// For every webhook the simulator delivered about `id`: exactly one decision in the event
/// log, and each further copy logged as an ignored duplicate. Returns `(decisions, copies
/// logged as duplicates)` and the rows.
async fn check_one_decision_per_webhook(stack: &Stack, id: Uuid) -> (usize, usize, Vec<LogRow>) {
    let view = stack.admin.view(id).await.unwrap();
    let rows = stack.events(id).await;
    let mut copies: HashMap<String, usize> = HashMap::new();
    for hook in view["webhooks"].as_array().unwrap() {
        if hook["delivered"] == true {
            *copies
                .entry(hook["operationId"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    let (mut decisions, mut duplicates) = (0, 0);
    for (op, delivered) in &copies {
        let of_op: Vec<&LogRow> = rows
            .iter()
            .filter(|r| r.message_id.as_deref() == Some(op) && r.event_kind.starts_with("Webhook"))
            .collect();
        let decided = of_op.iter().filter(|r| !is_inbox_duplicate(r)).count();
        let dup = of_op.iter().filter(|r| is_inbox_duplicate(r)).count();
        assert_eq!(
            decided, 1,
            "webhook {op} decided {decided} times: {rows:#?}"
        );
        assert!(
            dup + 1 >= *delivered,
            "webhook {op} delivered {delivered} times but {dup} duplicates logged: {rows:#?}"
        );
        decisions += decided;
        duplicates += dup;
    }
    (decisions, duplicates, rows)
}

/// The sequence numbers of a subscription's event log are 1, 2, 3, … without a gap.
fn assert_contiguous(id: Uuid, rows: &[LogRow]) {
    for (index, row) in rows.iter().enumerate() {
        assert_eq!(
            row.sequence,
            index as i64 + 1,
            "{id}: sequence gap at {index}: {rows:#?}"
        );
    }
}

/// The number of `ACK … recorded` rows for operation `op`.
fn acks_recorded(rows: &[LogRow], op: &str) -> usize {
    rows.iter()
        .filter(|r| {
            r.record_of("effect:ack_operation").is_some_and(|ack| {
                ack.details["operation_id"] == op && ack.note.ends_with(" recorded")
            })
        })
        .count()
}

#[tokio::test]
async fn duplicated_and_reordered_webhooks_change_no_outcome_and_are_logged_as_ignored() {
    let stack = Stack::start(Options::default()).await;
    stack
        .admin
        .set_faults(json!({"duplicateDeliveries": 1.0, "reorder": 400, "seed": 42}))
        .await
        .unwrap();
    let seats = stack.subscribed("per-seat", Some(5)).await;
    let flat = stack.subscribed("silver", None).await;
    // Auto-activated at checkout: the Subscribe webhook (twice) is our first news (P12).
    let auto = stack.buy("per-seat", Some(3), true).await.id;
    let all = [seats, flat, auto];

    let seat_change = stack
        .act(seats, json!({"action": "ChangeQuantity", "quantity": 8}))
        .await;
    let plan_change = stack
        .act(flat, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    stack.settle(&all, WAIT).await.unwrap();

    // Renewals in quick succession, so that their webhooks overtake each other, then a
    // suspension with the reinstatement right behind it.
    for _ in 0..4 {
        for id in all {
            stack.act(id, json!({"action": "Renew"})).await;
        }
    }
    for id in all {
        stack.act(id, json!({"action": "Suspend"})).await;
        stack.act(id, json!({"action": "Reinstate"})).await;
    }
    stack.settle(&all, WAIT).await.unwrap();
    let second_seat_change = stack
        .act(seats, json!({"action": "ChangeQuantity", "quantity": 12}))
        .await;
    stack.act(flat, json!({"action": "Unsubscribe"})).await;
    stack.settle(&all, WAIT).await.unwrap();

    // The outcomes are those of an orderly run, on both sides (settle compared them).
    assert_eq!(
        stack.engine(seats).await.unwrap(),
        view("Subscribed", "per-seat", Some(12))
    );
    assert_eq!(
        stack.engine(flat).await.unwrap(),
        view("Unsubscribed", "gold", None)
    );
    assert_eq!(
        stack.engine(auto).await.unwrap(),
        view("Subscribed", "per-seat", Some(3))
    );

    // The event log: one decision per webhook, every other copy an ignored duplicate, and
    // the overtaken ones ignored as stale.
    let mut stale = 0;
    let mut duplicates = 0;
    for id in all {
        let (decisions, dups, rows) = check_one_decision_per_webhook(&stack, id).await;
        assert!(decisions > 5, "{id}: {rows:#?}");
        assert!(dups > 0, "{id}: no duplicate logged: {rows:#?}");
        duplicates += dups;
        stale += rows
            .iter()
            .filter(|r| {
                r.outcome == LogOutcome::Ignored && r.reason.as_deref() == Some("stale event")
            })
            .count();
        assert_contiguous(id, &rows);
        for op in [&seat_change, &plan_change, &second_seat_change] {
            let acked = acks_recorded(&rows, op);
            assert!(acked <= 1, "{op} ACKed {acked} times: {rows:#?}");
        }
    }
    assert!(duplicates >= 20, "only {duplicates} duplicates logged");
    assert!(stale > 0, "no webhook was logged as stale");
    let seat_rows = stack.events(seats).await;
    assert_eq!(acks_recorded(&seat_rows, &seat_change), 1);
    assert_eq!(acks_recorded(&seat_rows, &second_seat_change), 1);
    assert_eq!(acks_recorded(&stack.events(flat).await, &plan_change), 1);
    assert_eq!(stack.outbox_left().await, (0, 0));
    stack.finish().await;
}

#[tokio::test]
async fn effects_and_messages_outlast_a_spell_of_5xx_and_429() {
    let stack = Stack::start(Options {
        // A large attempt budget: the faults last a while.
        worker: |worker| worker.effects.protocol.max_attempts = 50,
        ..Options::default()
    })
    .await;
    let first = stack.subscribed("per-seat", Some(5)).await;
    let second = stack.subscribed("silver", None).await;

    // First every call fails (500, or 429 with Retry-After) …
    stack
        .admin
        .set_faults(json!({"share5xx": 0.6, "share429": 1.0, "retryAfterSecs": 1, "seed": 11}))
        .await
        .unwrap();
    let seat_change = stack
        .act(first, json!({"action": "ChangeQuantity", "quantity": 9}))
        .await;
    stack.act(second, json!({"action": "Renew"})).await;
    stack
        .wait_for("both kinds of failure in the event log", || async {
            let (transient, throttled): (bool, bool) = sqlx::query_as(
                "SELECT bool_or(jsonb_path_exists(event, '$.calls[*] ? (@.error == \"transient\")')), \
                        bool_or(jsonb_path_exists(event, '$.calls[*] ? (@.error == \"throttled\")')) \
                 FROM subscription_events WHERE outcome = 'recorded'",
            )
            .fetch_one(&stack.pool)
            .await
            .unwrap();
            (transient && throttled).then_some(())
        })
        .await;
    // … then only some do, while a webhook for a new subscription needs a GET (P12) …
    stack
        .admin
        .set_faults(json!({"share5xx": 0.3, "share429": 0.2, "retryAfterSecs": 1, "seed": 12}))
        .await
        .unwrap();
    let third = stack.buy("per-seat", Some(2), true).await.id;
    stack
        .act(second, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    stack
        .wait_for("the new subscription", || async {
            stack.engine(third).await.unwrap().map(|_| ())
        })
        .await;
    // … and then Microsoft is well again.
    stack.admin.set_faults(json!({})).await.unwrap();
    let all = [first, second, third];
    stack.settle(&all, WAIT).await.unwrap();

    assert_eq!(
        stack.engine(first).await.unwrap(),
        view("Subscribed", "per-seat", Some(9))
    );
    assert_eq!(
        stack.engine(second).await.unwrap(),
        view("Subscribed", "gold", None)
    );
    assert_eq!(
        stack.engine(third).await.unwrap(),
        view("Subscribed", "per-seat", Some(2))
    );
    assert_eq!(
        acks_recorded(&stack.events(first).await, &seat_change),
        1,
        "the ACK went through once"
    );
    let operation = stack.admin.view(first).await.unwrap()["operations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["id"] == seat_change.as_str())
        .cloned()
        .unwrap();
    assert_eq!(
        operation["resolution"], "acknowledged Success",
        "{operation}"
    );
    assert_eq!(stack.outbox_left().await, (0, 0), "nothing pending or dead");
    assert!(stack.dead_letters().await.is_empty());
    stack.finish().await;
}

#[tokio::test]
async fn an_ack_that_missed_the_window_is_reconciled_with_microsofts_view() {
    let stack = Stack::start(Options {
        policy: json!({"seats": {"max": 10}}),
        ack_window: Duration::from_millis(1500),
        // A large attempt budget: the faults last a while.
        worker: |worker| worker.effects.protocol.max_attempts = 50,
        ..Options::default()
    })
    .await;
    let id = stack.subscribed("per-seat", Some(5)).await;
    // Every ACK fails with 503 until Microsoft has auto-accepted (P7).
    stack
        .admin
        .set_faults(json!({"failCalls": {"updateOperation": 503}}))
        .await
        .unwrap();
    let op = stack
        .act(id, json!({"action": "ChangeQuantity", "quantity": 20}))
        .await;
    stack
        .wait_for("Microsoft's auto-accept", || async {
            let view = stack.admin.view(id).await.unwrap();
            let op = view["operations"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["id"] == op.as_str())
                .cloned()?;
            (op["status"] == "Succeeded").then_some(())
        })
        .await;
    stack.admin.set_faults(json!({})).await.unwrap();
    // Our refusal came too late: Microsoft's 20 seats stand, and we learn it.
    stack.settle(&[id], WAIT).await.unwrap();
    assert_eq!(
        stack.engine(id).await.unwrap(),
        view("Subscribed", "per-seat", Some(20))
    );
    let rows = stack.events(id).await;
    assert!(
        rows.iter()
            .any(|r| r.event_kind == "WebhookChangeQuantity" && r.outcome == LogOutcome::Rejected),
        "{rows:#?}"
    );
    assert!(
        rows.iter().any(|r| r.event_kind == "effect:ack_operation"
            && r.reason
                .as_deref()
                .is_some_and(|r| r.contains("already final"))),
        "{rows:#?}"
    );
    assert_eq!(stack.outbox_left().await, (0, 0));
    stack.finish().await;
}

#[tokio::test]
async fn a_permanently_refused_ack_is_dead_with_microsofts_answer_in_the_outbox_and_the_log() {
    let stack = Stack::start(Options {
        ack_window: Duration::from_millis(1500),
        ..Options::default()
    })
    .await;
    let id = stack.subscribed("per-seat", Some(5)).await;
    stack
        .admin
        .set_faults(json!({"failCalls": {"updateOperation": 400}}))
        .await
        .unwrap();
    let op = stack
        .act(id, json!({"action": "ChangeQuantity", "quantity": 7}))
        .await;
    let (attempts, last_error) = stack
        .wait_for("the ACK row to die", || async {
            let row: Option<(String, i32, Option<String>)> = sqlx::query_as(
                "SELECT status, attempts, last_error FROM outbox WHERE subscription_id = $1 \
                 AND kind = 'ack_operation'",
            )
            .bind(id)
            .fetch_optional(&stack.pool)
            .await
            .unwrap();
            row.filter(|(status, _, _)| status == "dead")
                .map(|(_, attempts, error)| (attempts, error.unwrap_or_default()))
        })
        .await;
    // A 400 is not retried (§8.2): dead after the first attempt, with the reason.
    assert_eq!(attempts, 1);
    assert!(last_error.contains("update_operation"), "{last_error}");
    assert!(last_error.contains("400"), "{last_error}");
    let rows = stack.events(id).await;
    let failed = rows
        .iter()
        .find(|r| {
            r.event_kind == "effect:ack_operation"
                && r.event["calls"][0]["status"] == 400
                && r.event["operation_id"] == op.as_str()
        })
        .unwrap_or_else(|| panic!("no failed ACK in the log: {rows:#?}"));
    assert!(
        failed.event["calls"][0]["body"]
            .as_str()
            .is_some_and(|b| b.contains("injected fault")),
        "Microsoft's body is recorded: {failed:#?}"
    );
    assert!(
        rows.iter().any(|r| r.event_kind == "effect:ack_operation"
            && r.reason.as_deref().is_some_and(|r| r.starts_with("dead:"))),
        "{rows:#?}"
    );
    stack.admin.set_faults(json!({})).await.unwrap();
    // Microsoft auto-accepts what we had accepted anyway: both sides agree on 7.
    stack
        .wait_for("the auto-accept", || async {
            (stack.microsoft(id)?.quantity == Some(7)).then_some(())
        })
        .await;
    stack.settle(&[id], WAIT).await.unwrap();
    assert_eq!(
        stack.engine(id).await.unwrap(),
        view("Subscribed", "per-seat", Some(7))
    );
    assert_eq!(stack.outbox_left().await, (0, 1), "only the ACK is dead");
    stack.finish().await;
}

#[tokio::test]
async fn a_webhook_whose_verifying_get_is_refused_is_dead_lettered_with_microsofts_answer() {
    let stack = Stack::start(Options::default()).await;
    stack
        .admin
        .set_faults(json!({"failCalls": {"getSubscription": 400}}))
        .await
        .unwrap();
    // Auto-activated at checkout: a Subscribe webhook about a subscription we never saw.
    let id = stack.buy("per-seat", Some(4), true).await.id;
    let dead = stack
        .wait_for("the dead-lettered webhook", || async {
            let dead = stack.dead_letters().await;
            (!dead.is_empty()).then_some(dead)
        })
        .await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let (body, headers) = &dead[0];
    assert_eq!(body["type"], "webhook", "{body}");
    assert_eq!(headers["x-attempt"], "1", "{headers:#?}");
    let reason = &headers["x-failure-reason"];
    assert!(reason.contains("get_subscription"), "{reason}");
    assert!(reason.contains("400"), "{reason}");
    assert_eq!(headers["x-last-error"], *reason);
    let response: Value = serde_json::from_str(&headers["x-marketplace-response"]).unwrap();
    assert_eq!(response["status"], 400, "{response}");
    assert!(
        response["body"]
            .as_str()
            .is_some_and(|b| b.contains("injected fault")),
        "{response}"
    );
    // Nothing was applied on a guess.
    assert_eq!(stack.engine(id).await.unwrap(), None);
    assert!(stack.events(id).await.is_empty());
    stack.admin.set_faults(json!({})).await.unwrap();
    stack.finish().await;
}

#[tokio::test]
async fn a_webhook_for_a_subscription_we_never_saw_is_verified_with_get_and_created() {
    let stack = Stack::start(Options::default()).await;
    // Auto-activation (§5.6): Subscribe arrives before any landing-page visit.
    let auto = stack.buy("per-seat", Some(6), true).await.id;
    // A purchase that never reached our landing page, then cancelled.
    let never = stack.buy("gold", None, false).await.id;
    stack.act(never, json!({"action": "Unsubscribe"})).await;
    stack.settle(&[auto, never], WAIT).await.unwrap();

    assert_eq!(
        stack.engine(auto).await.unwrap(),
        view("Subscribed", "per-seat", Some(6))
    );
    let rows = stack.events(auto).await;
    assert_eq!(rows[0].event_kind, "Observed", "GET first: {rows:#?}");
    assert_eq!(rows[0].outcome, LogOutcome::Applied);
    let request_id: Option<String> = sqlx::query_scalar(
        "SELECT request_id FROM subscription_events WHERE subscription_id = $1 AND sequence = 1",
    )
    .bind(auto)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(request_id.is_some(), "the GET's request id is recorded");
    assert_eq!(rows[1].event_kind, "WebhookSubscribe", "{rows:#?}");

    assert_eq!(
        stack.engine(never).await.unwrap(),
        view("Unsubscribed", "gold", None)
    );
    let rows = stack.events(never).await;
    assert_eq!(rows[0].event_kind, "Observed", "{rows:#?}");
    assert_eq!(rows[0].outcome, LogOutcome::Applied);
    assert_eq!(rows[1].event_kind, "WebhookUnsubscribe", "{rows:#?}");

    // Microsoft does not know it either (404): a tombstone, and the 404 in the log.
    let stranger = Uuid::new_v4();
    let op = Uuid::new_v4();
    let token = stack.sim.mint_webhook_token(json!({})).unwrap();
    let response = stack
        .http
        .post(stack.url("/webhook"))
        .bearer_auth(token)
        .json(&json!({
            "id": op, "activityId": op, "subscriptionId": stranger,
            "offerId": "contoso-analytics", "publisherId": "contoso", "planId": "gold",
            "action": "Unsubscribe", "status": "Succeeded", "operationRequestSource": "Azure",
            "timeStamp": "2026-01-01T00:00:00Z",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let rows = stack
        .wait_for("the stranger's tombstone with the 404", || async {
            let rows = stack.events(stranger).await;
            rows.iter()
                .any(|r| r.event["status"] == 404)
                .then_some(rows)
        })
        .await;
    assert_eq!(
        stack.engine(stranger).await.unwrap().unwrap().state,
        "Unsubscribed"
    );
    assert!(
        rows.iter()
            .any(|r| r.event_kind == "WebhookUnsubscribe" && r.outcome == LogOutcome::Applied),
        "{rows:#?}"
    );
    stack.finish().await;
}
