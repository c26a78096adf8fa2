//! The consumer's windows (issue #17): lane heads of different subscriptions applied in one
//! transaction, a savepoint each, one commit, then the acks. A poisoned message is rolled
//! back alone and dead-lettered while the rest of its window commits; one subscription's
//! messages keep their order; two batching worker processes share a burst and lose or
//! repeat nothing.
//!
//! The in-process worker runs with the default window (`worker.apply_batch`); the worker
//! processes read theirs from `WORKER_APPLY_BATCH`.

mod stack;

use marketplace_fulfillment::store::ledger::LogOutcome;
use marketplace_fulfillment::store::verify;
use std::time::Duration;

use marketplace_fulfillment::queue::InboundMessage;
use serde_json::json;
use stack::{Options, Stack, WAIT};
use time::OffsetDateTime;
use tokio::sync::Mutex;
use uuid::Uuid;

/// The tests with worker processes run one at a time on a shared machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

/// Subscriptions per round of the poison test.
const ROUND: usize = 5;

/// Rounds before the test gives up on seeing the poisoned message share a window (the
/// window forms from what is ready when it starts; on a loaded machine a round may split).
const ROUNDS: usize = 6;

#[tokio::test]
async fn a_window_with_a_poisoned_message_commits_the_others_and_dead_letters_only_that_one() {
    let mut stack = Stack::start(Options::default()).await;
    for round in 0..ROUNDS {
        let ids = stack
            .subscribed_then_stopped("per-seat", Some(5), ROUND)
            .await;
        // A stored machine nobody can read back: its message can never be applied.
        let poisoned = ids[ROUND / 2];
        sqlx::query("UPDATE subscriptions SET machine = '{\"not\": \"a machine\"}' WHERE id = $1")
            .bind(poisoned)
            .execute(&stack.pool)
            .await
            .unwrap();
        for id in &ids {
            stack
                .act(*id, json!({"action": "ChangeQuantity", "quantity": 6}))
                .await;
        }
        let inbound = stack.broker.topology().inbound_queue();
        stack
            .wait_for_queue_len(&inbound, u32::try_from(ROUND).unwrap())
            .await;
        stack.start_worker().await;
        for id in ids.iter().filter(|id| **id != poisoned) {
            stack
                .wait_for(&format!("{id} at 6 seats"), || async {
                    stack
                        .engine(*id)
                        .await
                        .unwrap()
                        .filter(|v| v.quantity == Some(6))
                })
                .await;
        }
        let dead = stack
            .wait_for("the poisoned message in the dead-letter queue", || async {
                let dead = stack.dead_letters().await;
                (!dead.is_empty()).then_some(dead)
            })
            .await;
        assert_eq!(dead.len(), 1, "only the poisoned message: {dead:?}");
        let (body, headers) = &dead[0];
        let payload: serde_json::Value =
            serde_json::from_str(body["payload"].as_str().unwrap()).unwrap();
        assert_eq!(payload["subscriptionId"], poisoned.to_string());
        let reason = headers.get("x-last-error").cloned().unwrap_or_default();
        assert!(reason.contains("database"), "{headers:?}");
        // Nothing of the poisoned message committed; each other one decided once.
        assert!(
            !stack
                .events(poisoned)
                .await
                .iter()
                .any(|e| e.event_kind == "WebhookChangeQuantity"),
            "the poisoned message left no trace"
        );
        for id in ids.iter().filter(|id| **id != poisoned) {
            let decided = stack
                .events(*id)
                .await
                .iter()
                .filter(|e| {
                    e.event_kind == "WebhookChangeQuantity" && e.outcome == LogOutcome::Applied
                })
                .count();
            assert_eq!(decided, 1, "{id}");
        }
        let windows = stack.workers[0].consumer_activity().windows();
        if windows.largest_with_a_rollback >= 2 {
            eprintln!("round {round}: {windows:?}");
            stack.finish().await;
            return;
        }
    }
    panic!("in {ROUNDS} rounds the poisoned message never shared a window");
}

/// A `Renew` webhook of `id` stamped `at`, as the ingress queues it.
fn renew(id: Uuid, at: &str) -> InboundMessage {
    let payload = json!({
        "id": Uuid::new_v4(), "activityId": Uuid::new_v4(), "subscriptionId": id,
        "offerId": "contoso-analytics", "publisherId": "contoso", "planId": "per-seat",
        "quantity": 5, "action": "Renew", "status": "Succeeded",
        "operationRequestSource": "Azure", "timeStamp": at,
    })
    .to_string();
    InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload,
    }
}

#[tokio::test]
async fn one_subscriptions_messages_keep_their_order_across_windows() {
    let mut stack = Stack::start(Options::default()).await;
    let ids = stack.subscribed_then_stopped("per-seat", Some(5), 6).await;
    // Two renewals each, the newer second: applied out of order, the older one would be
    // ignored as stale.
    for id in &ids {
        let first = renew(*id, "2099-01-01T00:00:00Z");
        stack.publish(&first, &format!("renew-1-{id}"), *id).await;
        let second = renew(*id, "2099-01-02T00:00:00Z");
        stack.publish(&second, &format!("renew-2-{id}"), *id).await;
    }
    let inbound = stack.broker.topology().inbound_queue();
    stack.wait_for_queue_len(&inbound, 12).await;
    stack.start_worker().await;
    stack.run_until_idle(WAIT).await.unwrap();
    for id in &ids {
        let renewals: Vec<(String, LogOutcome)> = stack
            .events(*id)
            .await
            .into_iter()
            .filter(|e| e.event_kind == "WebhookRenew")
            .map(|e| (e.message_id.unwrap_or_default(), e.outcome))
            .collect();
        assert_eq!(
            renewals,
            [
                (format!("renew-1-{id}"), LogOutcome::Applied),
                (format!("renew-2-{id}"), LogOutcome::Applied),
            ],
            "{id}"
        );
    }
    let windows = stack.workers[0].consumer_activity().windows();
    assert!(windows.committed > 0, "{windows:?}");
    assert!(stack.dead_letters().await.is_empty());
    stack.finish().await;
}

#[tokio::test]
async fn two_batching_worker_processes_share_a_burst_and_lose_or_repeat_nothing() {
    let _one = ONE_AT_A_TIME.lock().await;
    let stack = Stack::start(Options {
        workers: 0,
        ack_window: Duration::from_secs(10),
        ..Options::default()
    })
    .await;
    let batch = [("WORKER_APPLY_BATCH", "16")];
    let mut first = stack.spawn_worker_process(&batch).await;
    let mut second = stack.spawn_worker_process(&batch).await;
    stack
        .wait_for_consumers(2, &mut [&mut first, &mut second])
        .await;

    // Bought with auto-activation (the Subscribe webhook is our first news, P12), then each
    // changed by its customer at once.
    let mut ids = Vec::new();
    for i in 0..60 {
        let id = stack.buy("per-seat", Some(5), true).await.id;
        let quantity = 6 + i % 3;
        stack
            .act(
                id,
                json!({"action": "ChangeQuantity", "quantity": quantity}),
            )
            .await;
        ids.push((id, quantity));
    }
    let only_ids: Vec<Uuid> = ids.iter().map(|(id, _)| *id).collect();
    stack
        .settle(&only_ids, Duration::from_secs(240))
        .await
        .unwrap();
    assert!(first.exited().unwrap().is_none() && second.exited().unwrap().is_none());

    for (id, quantity) in &ids {
        let ours = stack.engine(*id).await.unwrap().unwrap();
        assert_eq!(ours.quantity, Some(i64::from(*quantity)), "{id}");
        assert_eq!(ours.state, "Subscribed", "{id}");
    }
    // Every event decided once, every ACK made once.
    stack.assert_each_event_decided_once(&only_ids).await;
    let acks = verify::acks_per_operation(&stack.pool).await.unwrap();
    assert_eq!(
        acks.len(),
        ids.len(),
        "one ACKed operation per subscription"
    );
    for (id, op, n) in &acks {
        assert_eq!(*n, 1, "{id}: operation {op} ACKed {n} times");
    }
    assert_eq!(stack.outbox_left().await, (0, 0));
    assert!(stack.dead_letters().await.is_empty());
    // The settings reached the processes: each logged its window size.
    for worker in [&first, &second] {
        let log = std::fs::read_to_string(&worker.log).unwrap();
        assert!(log.contains("apply_batch=16"), "{log}");
    }

    let within = Duration::from_secs(60);
    tokio::try_join!(first.stop_within(within), second.stop_within(within)).unwrap();
    stack.finish().await;
}

#[tokio::test]
async fn a_window_leaves_out_a_message_whose_row_another_transaction_holds_and_applies_it_later() {
    let mut stack = Stack::start(Options::default()).await;
    let ids = stack.subscribed_then_stopped("per-seat", Some(5), 4).await;
    // Another transaction (an effect runner's settle, say) holds the first row.
    let mut holder = stack.pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM subscriptions WHERE id = $1 FOR UPDATE")
        .bind(ids[0])
        .execute(&mut *holder)
        .await
        .unwrap();
    for id in &ids {
        let renewal = renew(*id, "2099-01-01T00:00:00Z");
        stack.publish(&renewal, &format!("renew-{id}"), *id).await;
    }
    stack.start_worker().await;
    let renewed = async |id: Uuid| {
        stack
            .events(id)
            .await
            .into_iter()
            .filter(|e| e.event_kind == "WebhookRenew")
            .map(|e| e.outcome)
            .collect::<Vec<_>>()
    };
    // The others do not wait for it.
    for id in &ids[1..] {
        stack
            .wait_for(&format!("{id} renewed"), || async {
                (renewed(*id).await == [LogOutcome::Applied]).then_some(())
            })
            .await;
    }
    assert!(renewed(ids[0]).await.is_empty(), "applied under a held row");
    let windows = stack.workers[0].consumer_activity().windows();
    assert!(windows.left_out_busy > 0, "{windows:?}");
    holder.rollback().await.unwrap();
    stack.run_until_idle(WAIT).await.unwrap();
    assert_eq!(renewed(ids[0]).await, [LogOutcome::Applied]);
    assert!(stack.dead_letters().await.is_empty());
    stack.finish().await;
}
