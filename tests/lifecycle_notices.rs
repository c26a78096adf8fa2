//! Lifecycle notices through the whole stack on a compressed calendar (issue #16, Build 3):
//! the simulator's `--day-ms` and the worker's `worker.notice_day_ms` both make a day
//! 100 ms, so a monthly term, the 30-day suspension grace and the 30-day activation window
//! pass in seconds. Each notice is emitted once, recorded in the event log, published
//! through the outbox and shown by `fulfillment subscription show`; a changed state cancels
//! the notice it no longer owes.

mod stack;

use std::collections::HashMap;
use std::time::Duration;

use fulfillment_state_machine::NoticePolicy;
use marketplace_fulfillment::ops::subscription::{render_timeline, timeline};
use marketplace_fulfillment::world::activate_on_landing;
use serde_json::json;
use stack::{Options, Purchase, Stack, WAIT};
use uuid::Uuid;

const DAY: Duration = Duration::from_millis(100);

fn compressed(policy: serde_json::Value) -> Options {
    Options {
        policy,
        simulator: |config| config.timings.day = DAY,
        settings: |settings| {
            settings.policy.notices = NoticePolicy {
                term_ending_days: vec![30, 7],
                day: DAY,
            }
        },
        ..Options::default()
    }
}

/// The notices emitted for `id` (event-log rows), by notice key.
async fn emitted(stack: &Stack, id: Uuid) -> HashMap<String, usize> {
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT event->>'key' FROM subscription_events \
         WHERE subscription_id = $1 AND event_kind LIKE 'notice:%'",
    )
    .bind(id)
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    let mut counts = HashMap::new();
    for key in keys {
        *counts.entry(key).or_insert(0) += 1;
    }
    counts
}

/// The kinds of the notices emitted for `id`, with how often each key was emitted.
async fn emitted_kinds(stack: &Stack, id: Uuid) -> Vec<(String, usize)> {
    let mut kinds: Vec<(String, usize)> = emitted(stack, id)
        .await
        .into_iter()
        .map(|(key, n)| {
            let kind = key.split(':').next().unwrap().to_string();
            let days = key.split(':').nth(1).filter(|d| d.ends_with('d'));
            (days.map_or(kind.clone(), |d| format!("{kind}:{d}")), n)
        })
        .collect();
    kinds.sort();
    kinds
}

/// The outbox rows that publish notices and have not been published yet.
async fn unpublished_notices(stack: &Stack) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox o JOIN subscription_events e ON e.id = o.event_id \
         WHERE e.event_kind LIKE 'notice:%' AND o.status <> 'done'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap()
}

async fn notice_statuses(stack: &Stack, id: Uuid) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT notice_key, status FROM scheduled_notices WHERE subscription_id = $1 \
         ORDER BY notice_key",
    )
    .bind(id)
    .fetch_all(&stack.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn each_lifecycle_notice_is_emitted_once_on_a_compressed_calendar_and_shown() {
    // Manual activation keeps one purchase pending; the others activate at checkout.
    let stack = Stack::start(compressed(json!({"activation": "manual"}))).await;
    let Purchase { id: ending, .. } = stack
        .admin
        .buy(json!({
            "planId": "gold", "termUnit": "P1M", "autoActivate": true, "autoRenew": false
        }))
        .await
        .unwrap();
    let Purchase { id: suspended, .. } = stack
        .admin
        .buy(json!({"planId": "silver", "termUnit": "P1M", "autoActivate": true}))
        .await
        .unwrap();
    let Purchase {
        id: pending,
        landing,
        ..
    } = stack
        .admin
        .buy(json!({"planId": "silver", "termUnit": "P1M"}))
        .await
        .unwrap();
    activate_on_landing(&landing).await.unwrap();
    for id in [ending, suspended] {
        stack
            .wait_for("the auto-activated purchase recorded", || async {
                (stack.engine(id).await.unwrap()?.state == "Subscribed").then_some(())
            })
            .await;
    }
    stack
        .wait_for("the pending purchase recorded", || async {
            (stack.engine(pending).await.unwrap()?.state == "PendingFulfillment").then_some(())
        })
        .await;
    stack.act(suspended, json!({"action": "Suspend"})).await;

    // The term ends (no renewal), the grace ends: both end Unsubscribed, and 7 days later
    // their data retention ends.
    let expected = [
        (
            ending,
            vec![
                ("data_retention_ends".to_string(), 1),
                ("term_ending:30d".to_string(), 1),
                ("term_ending:7d".to_string(), 1),
            ],
        ),
        (
            suspended,
            vec![
                ("data_retention_ends".to_string(), 1),
                ("grace_ending".to_string(), 1),
            ],
        ),
        (pending, vec![("activation_window_closing".to_string(), 1)]),
    ];
    for (id, kinds) in &expected {
        stack
            .wait_for("the subscription's notices", || async {
                (emitted_kinds(&stack, *id).await.len() == kinds.len()).then_some(())
            })
            .await;
    }
    // Ten more compressed days: nothing is emitted twice.
    tokio::time::sleep(DAY * 10).await;
    for (id, kinds) in &expected {
        assert_eq!(&emitted_kinds(&stack, *id).await, kinds, "{id}");
    }
    assert_eq!(
        stack.engine(ending).await.unwrap().unwrap().state,
        "Unsubscribed"
    );
    assert_eq!(
        stack.engine(suspended).await.unwrap().unwrap().state,
        "Unsubscribed"
    );
    stack
        .wait_for("every notice published", || async {
            (unpublished_notices(&stack).await == 0).then_some(())
        })
        .await;

    // `fulfillment subscription show`: the schedule, and the notices in the timeline.
    for (id, kinds) in &expected {
        let shown = timeline(&stack.pool, *id).await.unwrap().unwrap();
        assert!(
            shown
                .notices
                .iter()
                .all(|n| format!("{:?}", n.status) != "Pending"),
            "{:?}",
            shown.notices
        );
        let text = render_timeline(&shown);
        assert!(text.contains("Lifecycle notices"), "{text}");
        for (kind, _) in kinds {
            let kind = kind.split(':').next().unwrap();
            assert!(
                text.contains(&format!("lifecycle notice subscription.{kind}")),
                "{kind} not in the timeline:\n{text}"
            );
            assert!(
                text.contains(&format!("publish_domain_event({kind})")),
                "{kind}'s domain event not in the timeline:\n{text}"
            );
        }
    }
    stack.finish().await;
}

#[tokio::test]
async fn a_changed_state_cancels_the_pending_notice_and_schedules_the_new_one() {
    let stack = Stack::start(compressed(json!({}))).await;
    // A yearly term without renewal: its notices are 33 and 36 s away.
    let Purchase { id, .. } = stack
        .admin
        .buy(json!({
            "planId": "gold", "termUnit": "P1Y", "autoActivate": true, "autoRenew": false
        }))
        .await
        .unwrap();
    stack
        .wait_for("the term's notices scheduled", || async {
            let statuses = notice_statuses(&stack, id).await;
            (statuses.len() == 2 && statuses.iter().all(|(_, s)| s == "pending")).then_some(())
        })
        .await;
    // The customer cancels: the term's notices are no longer owed, the retention notice is.
    stack.act(id, json!({"action": "Unsubscribe"})).await;
    stack
        .wait_for("the retention notice emitted", || async {
            (emitted(&stack, id).await.len() == 1).then_some(())
        })
        .await;
    let statuses = notice_statuses(&stack, id).await;
    let term: Vec<&str> = statuses
        .iter()
        .filter(|(key, _)| key.starts_with("term_ending"))
        .map(|(_, status)| status.as_str())
        .collect();
    assert_eq!(term, ["cancelled", "cancelled"], "{statuses:?}");
    let kinds = emitted_kinds(&stack, id).await;
    assert_eq!(kinds, [("data_retention_ends".to_string(), 1)]);
    stack.settle(&[id], WAIT).await.unwrap();
    stack.finish().await;
}
