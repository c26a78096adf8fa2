//! The effect runner's batches against real PostgreSQL, RabbitMQ and the simulator: many
//! rows claimed in one statement and settled in one transaction, a row whose call fails
//! settling alone, a subscription's later row never overtaking an earlier one, ACK rows
//! claimed by their deadline ahead of an older backlog, an ACK whose PATCH was answered and
//! that only polls its operation holding back nothing and ranked behind the ACKs, a
//! customer's seat change whose ACK makes the GET of its operation unnecessary, and a
//! batch's domain events entering the ISV's feed once each, in the batch's settle.
//!
//! The rows are queued straight into the outbox (the store's `enqueue`, as the apply does)
//! after the stack's worker is stopped, so the test's own runner is the only one claiming.

mod stack;

use std::time::Duration;

use fulfillment_state_machine::{
    AckStatus, DomainEvent, DomainEventKind, Effect, OperationId, Quantity, StateName,
};
use marketplace_fulfillment::store::outbox::{self, EffectKind, End, NewRow};
use marketplace_fulfillment::worker::EffectRunner;
use marketplace_fulfillment::worker::protocol::{Progress, Stage};
use serde_json::{Value, json};
use stack::{LogRow, Options, Stack};
use time::OffsetDateTime;
use uuid::Uuid;

/// A stack with `n` Subscribed subscriptions, its worker stopped and its outbox at rest,
/// and a runner of the test's own on it (the workers' clocks, a large attempt budget).
async fn quiet_stack(n: usize) -> (Stack, EffectRunner, Vec<Uuid>) {
    let mut stack = Stack::start(Options::default()).await;
    let ids = stack.subscribed_then_stopped("silver", Some(5), n).await;
    let mut effects = stack.worker_config.effects.clone();
    effects.protocol.max_attempts = 50;
    let runner = EffectRunner::new(
        stack.pool.clone(),
        stack.client.clone(),
        stack.broker.publisher().await.unwrap(),
        stack.settings.policy.clone(),
        stack.settings.marketplace.api_url.clone(),
        effects,
    );
    (stack, runner, ids)
}

/// Queues one row of `effect` for `subscription` as the decision `event_sequence` (later
/// sequences come later in the subscription's order); an ACK is due at `ack_due_at`.
async fn queue(
    stack: &Stack,
    subscription: Uuid,
    event_sequence: i64,
    effect: &Effect,
    ack_due_at: Option<OffsetDateTime>,
) -> Uuid {
    let id = Uuid::now_v7();
    let mut conn = stack.pool.acquire().await.unwrap();
    let kind = EffectKind::of(effect);
    let row = NewRow {
        id,
        subscription_id: subscription,
        event_id: Uuid::now_v7(),
        event_sequence,
        kind,
        effect: marketplace_fulfillment::store::json_text(&effect),
        correlation_id: None,
        traceparent: None,
        first: false,
        due_at: ack_due_at.filter(|_| kind == EffectKind::AckOperation),
        cloud_event_id: None,
        now: OffsetDateTime::now_utc(),
    };
    outbox::enqueue_many(&mut conn, &[], &[row]).await.unwrap();
    id
}

fn domain_event(quantity: u32) -> Effect {
    Effect::PublishDomainEvent(DomainEvent {
        kind: DomainEventKind::QuantityChanged,
        plan_id: None,
        quantity: Some(Quantity::new(quantity).unwrap()),
        state: StateName::Subscribed,
        reason: None,
    })
}

fn ack_of_unknown_operation() -> Effect {
    Effect::AckOperation {
        operation_id: OperationId::from(Uuid::now_v7()),
        status: AckStatus::Success,
        best_effort: false,
    }
}

/// `(status, last_error)` of an outbox row.
async fn row_status(stack: &Stack, id: Uuid) -> (String, Option<String>) {
    sqlx::query_as("SELECT status, last_error FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_batch_whose_one_call_fails_settles_the_others() {
    let (stack, runner, subs) = quiet_stack(3).await;
    let fetch_a = queue(&stack, subs[0], 1000, &Effect::FetchSubscription, None).await;
    let soon = OffsetDateTime::now_utc() + Duration::from_secs(10);
    let ack_b = queue(
        &stack,
        subs[1],
        1000,
        &ack_of_unknown_operation(),
        Some(soon),
    )
    .await;
    let fetch_c = queue(&stack, subs[2], 1000, &Effect::FetchSubscription, None).await;

    // All three are claimable: one claim, one batch, settled together.
    let ran = runner.execute_now(&[fetch_a, ack_b, fetch_c]).await;
    assert_eq!(ran, 3, "the three rows ran as one batch");

    // The ACK of an operation Microsoft does not know gives up (P19) ...
    let (status, error) = row_status(&stack, ack_b).await;
    assert_eq!(status, "dead", "{error:?}");
    assert!(error.is_some_and(|e| !e.is_empty()));
    // ... and the others' ends and writes stand: done, recorded, their GETs observed.
    for (row, sub) in [(fetch_a, subs[0]), (fetch_c, subs[2])] {
        assert_eq!(row_status(&stack, row).await.0, "done");
        let events = stack.events(sub).await;
        assert!(
            events
                .iter()
                .any(|e| e.event_kind == "Observed" && fetched(e)),
            "the fetch's result went through the machine, recorded with its call: {events:?}"
        );
    }
    let b_events = stack.events(subs[1]).await;
    assert!(
        b_events
            .iter()
            .any(|e| e.event_kind == "effect:ack_operation"
                && e.reason.as_deref().is_some_and(|r| r.contains("failed"))),
        "the dead ACK is recorded with its failure: {b_events:?}"
    );
    stack.finish().await;
}

#[tokio::test]
async fn a_subscriptions_later_row_never_overtakes_an_earlier_one() {
    let (stack, runner, subs) = quiet_stack(1).await;
    let sub = subs[0];
    let first = queue(&stack, sub, 1000, &domain_event(6), None).await;
    let second = queue(&stack, sub, 1001, &domain_event(7), None).await;
    let fetch = queue(&stack, sub, 1002, &Effect::FetchSubscription, None).await;
    let ids = [second, fetch, first];

    // One claim of all three takes the first domain event and the fetch (another kind), not
    // the second domain event: the first, still pending, holds it back even in the same
    // statement.
    let batch = outbox::claim_ids(&stack.pool, &ids)
        .await
        .unwrap()
        .expect("claimable rows");
    let mut claimed: Vec<Uuid> = batch.rows.iter().map(|row| row.id).collect();
    claimed.sort();
    let mut wanted = vec![first, fetch];
    wanted.sort();
    assert_eq!(claimed, wanted);
    batch.release().await.unwrap();

    // Run for real: the first round runs those two, a later round the second event.
    assert_eq!(runner.execute_now(&ids).await, 2);
    stack
        .wait_for("every row done", || async {
            (stack.outbox_left().await == (0, 0)).then_some(())
        })
        .await;
    let published: Vec<Value> = stack
        .take_all(&stack.domain_queue)
        .await
        .into_iter()
        .map(|(body, _)| body)
        .collect();
    // The subscription's purchase announced itself before the test's rows.
    let quantities: Vec<&Value> = published
        .iter()
        .filter(|e| e["type"] == "com.fulfillment.subscription.quantity_changed")
        .map(|e| &e["data"]["quantity"])
        .collect();
    assert_eq!(quantities, [&json!(6), &json!(7)], "in the machine's order");
    stack.finish().await;
}

#[tokio::test]
async fn ack_rows_are_claimed_by_deadline_before_an_older_backlog() {
    let (stack, _runner, subs) = quiet_stack(3).await;
    // A backlog: domain events and fetches queued first (older, and due for longer).
    let mut backlog = Vec::new();
    for (n, sub) in subs.iter().enumerate() {
        let n = i64::try_from(n).unwrap();
        backlog.push(queue(&stack, *sub, 1000 + n, &domain_event(6), None).await);
        backlog.push(queue(&stack, *sub, 1000 + n, &Effect::FetchSubscription, None).await);
    }
    // Then two ACKs: the one received later is queued first, the one whose window closes
    // soonest last.
    let now = OffsetDateTime::now_utc();
    let later = queue(
        &stack,
        subs[0],
        2000,
        &ack_of_unknown_operation(),
        Some(now + Duration::from_secs(9)),
    )
    .await;
    let soonest = queue(
        &stack,
        subs[1],
        2000,
        &ack_of_unknown_operation(),
        Some(now + Duration::from_secs(3)),
    )
    .await;

    let one = outbox::claim_due(&stack.pool, 1)
        .await
        .unwrap()
        .expect("a row");
    assert_eq!(one.rows[0].id, soonest, "the ACK whose window closes first");
    one.release().await.unwrap();
    let all = outbox::claim_due(&stack.pool, 64)
        .await
        .unwrap()
        .expect("rows");
    let order: Vec<Uuid> = all.rows.iter().map(|row| row.id).collect();
    assert_eq!(order[..2], [soonest, later], "the ACKs, by deadline, first");
    assert!(
        order[2..].iter().all(|id| backlog.contains(id)),
        "then the backlog"
    );
    all.release().await.unwrap();
    stack.finish().await;
}

#[tokio::test]
async fn an_ack_that_only_polls_its_operation_holds_back_nothing_and_loses_its_deadline() {
    let (stack, _runner, subs) = quiet_stack(2).await;
    let now = OffsetDateTime::now_utc();
    let ack = |seconds: u64| Some(now + Duration::from_secs(seconds));
    let first = queue(&stack, subs[0], 1000, &ack_of_unknown_operation(), ack(1)).await;
    let next_change = queue(&stack, subs[0], 1001, &ack_of_unknown_operation(), ack(2)).await;
    let other = queue(&stack, subs[1], 1000, &ack_of_unknown_operation(), ack(5)).await;

    // While its PATCH is to be made, an ACK holds back the next change's ACK.
    let batch = outbox::claim_ids(&stack.pool, &[first, next_change])
        .await
        .unwrap()
        .expect("the first ACK");
    let claimed: Vec<Uuid> = batch.rows.iter().map(|row| row.id).collect();
    assert_eq!(claimed, [first]);
    // Its PATCH answered without telling the operation's end, the row polls it: as the
    // runner ends such an execution (a wait of zero, awaiting Microsoft only).
    let polling = Progress {
        stage: Stage::Polling { polls: 0 },
        fresh_token_tried: false,
    };
    assert!(polling.awaits_microsoft_only());
    batch
        .end(&[(
            first,
            End::Reschedule {
                delay: Duration::ZERO,
                failed: false,
                error: None,
                progress: polling.to_stored(),
                awaits_microsoft: polling.awaits_microsoft_only(),
            },
        )])
        .await
        .unwrap();
    let due_at: Option<OffsetDateTime> =
        sqlx::query_scalar("SELECT due_at FROM outbox WHERE id = $1")
            .bind(first)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(due_at, None, "a row that only polls keeps no ACK deadline");

    // Now the next change's ACK is claimable, and every ACK ranks ahead of the polling row.
    let all = outbox::claim_due(&stack.pool, 64)
        .await
        .unwrap()
        .expect("rows");
    let order: Vec<Uuid> = all.rows.iter().map(|row| row.id).collect();
    assert_eq!(order, [next_change, other, first]);
    all.release().await.unwrap();
    stack.finish().await;
}

#[tokio::test]
async fn a_seat_change_acknowledged_with_success_is_confirmed_by_no_get_a_plan_change_by_one() {
    let stack = Stack::start(Options::default()).await;
    let sub = stack.subscribed("per-seat", Some(5)).await;
    stack
        .act(sub, json!({"action": "ChangeQuantity", "quantity": 7}))
        .await;
    stack
        .wait_for("the change on both sides, the outbox at rest", || async {
            let ours = stack.engine(sub).await.unwrap()?;
            (ours.quantity == Some(7)
                && Some(ours) == stack.microsoft(sub)
                && stack.outbox_left().await == (0, 0))
                .then_some(())
        })
        .await;
    let events = stack.events(sub).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event_kind.as_str()).collect();
    // The ACK's 200 told the operation's end: its result went through the machine, and
    // neither a GET of the operation nor one of the subscription followed (the success
    // of a seat change we accepted says its whole outcome).
    let result = events
        .iter()
        .find(|e| e.event_kind == "OperationResult")
        .unwrap_or_else(|| panic!("{kinds:?}"));
    assert!(
        result
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("no GET needed")),
        "{result:?}"
    );
    // The ACK is recorded in the row of the operation's end it fed, with its call and its
    // time from the webhook, not in a row of its own.
    let ack = result
        .record_of("effect:ack_operation")
        .unwrap_or_else(|| panic!("{result:?}"));
    assert!(ack.note.starts_with("ACK Success"), "{ack:?}");
    assert_eq!(ack.details["calls"][0]["call"], "update_operation");
    assert_eq!(ack.details["calls"][0]["status"], 200);
    assert!(ack.details["webhook_to_ack_ms"].is_i64(), "{ack:?}");
    assert!(!kinds.contains(&"effect:ack_operation"), "{kinds:?}");
    assert!(!kinds.contains(&"effect:confirm_operation"), "{kinds:?}");
    assert!(!kinds.contains(&"Observed"), "{kinds:?}");
    assert!(!kinds.contains(&"effect:fetch_subscription"), "{kinds:?}");
    let gets: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE subscription_id = $1 AND kind = 'fetch_subscription'",
    )
    .bind(sub)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(gets, 0);
    // A plan change's success still brings the GET (a plan may drop the seats, P13), and
    // the GET is recorded in the row of the observation it fed, not in a row of its own.
    stack
        .act(sub, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    stack
        .wait_for("the plan change confirmed by a GET", || async {
            let events = stack.events(sub).await;
            events
                .iter()
                .any(|e| e.event_kind == "Observed" && fetched(e))
                .then_some(())
        })
        .await;
    let ours = stack.engine(sub).await.unwrap().unwrap();
    assert_eq!(ours.plan.as_deref(), Some("gold"));
    assert_eq!(ours.quantity, None, "the flat plan's GET dropped the seats");
    let kinds: Vec<String> = stack
        .events(sub)
        .await
        .into_iter()
        .map(|e| e.event_kind)
        .collect();
    assert!(
        !kinds.iter().any(|k| k == "effect:fetch_subscription"),
        "{kinds:?}"
    );
    // The ACK row carried its deadline: the webhook's receipt plus the window (P7).
    let (due_at, received_at): (OffsetDateTime, OffsetDateTime) = sqlx::query_as(
        "SELECT o.due_at, e.received_at FROM outbox o \
         JOIN subscription_events e ON e.id = o.event_id \
         WHERE o.subscription_id = $1 AND o.kind = 'ack_operation'",
    )
    .bind(sub)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(due_at - received_at, time::Duration::seconds(10));
    stack.finish().await;
}

#[tokio::test]
async fn a_batchs_domain_events_enter_the_feed_once_each_in_its_settle() {
    let (stack, runner, subs) = quiet_stack(3).await;
    let mut rows = Vec::new();
    for (n, sub) in subs.iter().enumerate() {
        let quantity = 6 + u32::try_from(n).unwrap();
        rows.push(queue(&stack, *sub, 1000, &domain_event(quantity), None).await);
    }
    let feed = |sub: Uuid| {
        let pool = stack.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM webhook_events \
                 WHERE subscription_id = $1 AND type = 'subscription.quantity_changed'",
            )
            .bind(sub)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };

    // One claim, one batch: the three events are published and recorded in the feed with
    // the rows' ends, one commit.
    assert_eq!(runner.execute_now(&rows).await, 3, "one batch");
    for (row, sub) in rows.iter().zip(&subs) {
        assert_eq!(row_status(&stack, *row).await.0, "done");
        assert_eq!(feed(*sub).await, 1, "the event is in the feed");
    }

    // Published again (a runner that died before its commit): the feed keeps one each.
    sqlx::query("UPDATE outbox SET status = 'pending' WHERE id = ANY($1)")
        .bind(&rows)
        .execute(&stack.pool)
        .await
        .unwrap();
    assert_eq!(runner.execute_now(&rows).await, 3);
    for sub in &subs {
        assert_eq!(feed(*sub).await, 1, "still once");
    }
    stack.finish().await;
}

/// Whether an event-log row carries the record of the GET of the subscription that
/// produced it (its `execution` column: kind, note, calls).
fn fetched(row: &LogRow) -> bool {
    row.execution.as_ref().is_some_and(|execution| {
        execution["kind"] == "effect:fetch_subscription"
            && execution["calls"][0]["call"] == "get_subscription"
            && execution["calls"][0]["status"] == 200
    })
}
