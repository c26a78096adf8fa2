//! The apply transaction against real PostgreSQL: inbox dedupe, event log, state projection,
//! outbox, and one decision at a time per subscription under concurrency.

mod common;

use common::TestDatabase;
use fulfillment_state_machine::{
    Event, MarketplaceStatus, OfferId, OperationId, PlanId, Policy, RequestSource, Snapshot,
    StateName, SubscriptionId, Webhook, WebhookAction,
};
use marketplace_fulfillment::queue::InboxKey;
use marketplace_fulfillment::store::subscriptions;
use marketplace_fulfillment::store::{MIGRATOR, StoreError};
use marketplace_fulfillment::worker::apply::{
    self, Apply, ApplyOutcome, EffectRecord, Entry, EntryOutcome, EventSource, Expected,
};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

fn observed(status: MarketplaceStatus, plan: &str) -> Event {
    Event::Observed {
        snapshot: Snapshot {
            offer_id: Some(OfferId::parse("contoso-analytics").unwrap()),
            plan_id: Some(PlanId::parse(plan).unwrap()),
            ..Snapshot::with_status(status)
        },
        observed_at: OffsetDateTime::now_utc(),
    }
}

fn renew_webhook(operation: Uuid) -> Event {
    Event::Webhook(Webhook {
        operation_id: OperationId::from(operation),
        action: WebhookAction::Renew,
        source: RequestSource::Azure,
        timestamp: None,
        plan_id: None,
        quantity: None,
        subscription: None,
    })
}

fn from_message(id: &str) -> EventSource {
    EventSource {
        message_id: Some(id.to_string()),
        inbox_key: Some(InboxKey::webhook(id.parse().unwrap(), "Renew")),
        correlation_id: Some("corr-1".into()),
        ..EventSource::default()
    }
}

/// Our side's first sight of the subscription: Microsoft reports it Subscribed on gold at
/// `now`.
async fn seen_subscribed(pool: &PgPool, id: SubscriptionId, now: OffsetDateTime, policy: &Policy) {
    let subscribed = observed_at(MarketplaceStatus::Subscribed, now);
    let source = EventSource::default();
    let command = Apply::new(id, &subscribed, &source, now);
    apply::apply(pool, policy, &command).await.unwrap();
}

/// A Renew webhook of operation `op`, carried by a message of the same id.
async fn apply_renew(
    pool: &PgPool,
    id: SubscriptionId,
    op: Uuid,
    now: OffsetDateTime,
    policy: &Policy,
) -> ApplyOutcome {
    let (renew, source) = (renew_webhook(op), from_message(&op.to_string()));
    let command = Apply::new(id, &renew, &source, now);
    apply::apply(pool, policy, &command).await.unwrap()
}

#[tokio::test]
async fn first_sight_creates_the_subscription_and_records_the_decision() {
    let (_db, pool) = TestDatabase::migrated().await;
    let id = SubscriptionId::from(Uuid::new_v4());
    let outcome = apply::apply(
        &pool,
        &Policy::default(),
        &Apply::new(
            id,
            &observed(MarketplaceStatus::Subscribed, "gold"),
            &EventSource::default(),
            OffsetDateTime::now_utc(),
        ),
    )
    .await
    .unwrap();
    let ApplyOutcome::Decided(applied) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(applied.sequence, 1);
    assert_eq!(applied.decision.to, StateName::Subscribed);
    assert_eq!(applied.outbox_ids.len(), applied.decision.effects.len());

    let (state, plan, version): (String, Option<String>, i64) =
        sqlx::query_as("SELECT state, plan_id, version FROM subscriptions WHERE id = $1")
            .bind(id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), plan.as_deref(), version),
        ("Subscribed", Some("gold"), 2)
    );
    let (from, to, outcome): (String, String, String) = sqlx::query_as(
        "SELECT from_state, to_state, outcome FROM subscription_events WHERE id = $1",
    )
    .bind(applied.event_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        (from.as_str(), to.as_str(), outcome.as_str()),
        ("PendingFulfillment", "Subscribed", "applied")
    );
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE event_id = $1")
        .bind(applied.event_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(outbox as usize, applied.decision.effects.len());
    let restored = subscriptions::load_machine(&pool, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored.state(), StateName::Subscribed);
}

#[tokio::test]
async fn a_message_seen_before_is_a_duplicate_that_changes_nothing_but_is_logged_as_ignored() {
    let (_db, pool) = TestDatabase::migrated().await;
    let id = SubscriptionId::from(Uuid::new_v4());
    let now = OffsetDateTime::now_utc();
    let policy = Policy::default();
    seen_subscribed(&pool, id, now, &policy).await;
    let op = Uuid::new_v4();
    let first = apply_renew(&pool, id, op, now, &policy).await;
    assert!(matches!(first, ApplyOutcome::Decided(_)));
    let count = |pool: sqlx::PgPool| async move {
        let events: i64 = sqlx::query_scalar("SELECT count(*) FROM subscription_events")
            .fetch_one(&pool)
            .await
            .unwrap();
        let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
            .fetch_one(&pool)
            .await
            .unwrap();
        (events, outbox)
    };
    let before = count(pool.clone()).await;
    let second = apply_renew(&pool, id, op, now, &policy).await;
    assert!(matches!(second, ApplyOutcome::Duplicate), "{second:?}");
    let (events, outbox) = count(pool.clone()).await;
    assert_eq!(outbox, before.1, "a duplicate queues nothing");
    assert_eq!(events, before.0 + 1, "the copy is in the event log");
    let (kind, outcome, reason, from, to, message): (
        String,
        String,
        String,
        String,
        String,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT event_kind, outcome, reason, from_state, to_state, message_id \
             FROM subscription_events ORDER BY sequence DESC LIMIT 1",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(kind, "WebhookRenew");
    assert_eq!(outcome, "ignored");
    assert!(reason.starts_with("duplicate event"), "{reason}");
    assert_eq!((from.as_str(), to.as_str()), ("Subscribed", "Subscribed"));
    assert_eq!(message.as_deref(), Some(op.to_string().as_str()));
    let restored = subscriptions::load_machine(&pool, id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(restored.state(), StateName::Subscribed);
}

#[tokio::test]
async fn concurrent_events_of_one_subscription_get_one_gapless_sequence() {
    let (_db, pool) = TestDatabase::migrated().await;
    let id = SubscriptionId::from(Uuid::new_v4());
    let policy = Policy::default();
    seen_subscribed(&pool, id, OffsetDateTime::now_utc(), &policy).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let pool = pool.clone();
        let policy = policy.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..15 {
                let op = Uuid::new_v4();
                let outcome = apply_renew(&pool, id, op, OffsetDateTime::now_utc(), &policy).await;
                assert!(matches!(outcome, ApplyOutcome::Decided(_)));
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let sequences: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM subscription_events WHERE subscription_id = $1 ORDER BY sequence",
    )
    .bind(id.as_uuid())
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(sequences, (1..=61).collect::<Vec<i64>>());
    let version: i64 = sqlx::query_scalar("SELECT version FROM subscriptions WHERE id = $1")
        .bind(id.as_uuid())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(version, 62);
}

#[tokio::test]
async fn windows_over_the_same_subscriptions_at_once_wait_for_each_other_without_gaps() {
    let (_db, pool) = TestDatabase::migrated().await;
    let policy = Policy::default();
    let now = OffsetDateTime::now_utc();
    let mut ids = Vec::new();
    for _ in 0..5 {
        let id = SubscriptionId::from(Uuid::new_v4());
        seen_subscribed(&pool, id, now, &policy).await;
        ids.push(id);
    }
    // One more, met by both windows at once for the first time.
    ids.push(SubscriptionId::from(Uuid::new_v4()));
    let rounds = 10;
    let mut tasks = Vec::new();
    for task in 0..3 {
        let (pool, policy, mut ids) = (pool.clone(), policy.clone(), ids.clone());
        tasks.push(tokio::spawn(async move {
            // Each window lists the subscriptions in its own order; the locks are taken in
            // id order whatever the order given.
            ids.rotate_left(task * 2);
            for _ in 0..rounds {
                let events: Vec<(Event, EventSource)> = ids
                    .iter()
                    .map(|_| {
                        let op = Uuid::new_v4();
                        (renew_webhook(op), from_message(&op.to_string()))
                    })
                    .collect();
                let commands: Vec<Apply<'_>> = ids
                    .iter()
                    .zip(&events)
                    .map(|(id, (event, source))| {
                        Apply::new(*id, event, source, OffsetDateTime::now_utc())
                    })
                    .collect();
                // A subscription created by one window while another waited is taken
                // without waiting when it comes before rows already held: that window
                // rolls back and tries again instead of deadlocking.
                let outcomes = loop {
                    let mut tx = pool.begin().await.unwrap();
                    match apply::apply_many(&mut tx, &policy, &commands).await {
                        Ok(outcomes) => {
                            tx.commit().await.unwrap();
                            break outcomes;
                        }
                        Err(StoreError::Contended { .. }) => tx.rollback().await.unwrap(),
                        Err(error) => panic!("{error}"),
                    }
                };
                assert!(
                    outcomes
                        .iter()
                        .all(|outcome| matches!(outcome, ApplyOutcome::Decided(_))),
                    "{outcomes:?}"
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for (index, id) in ids.iter().enumerate() {
        let sequences: Vec<i64> = sqlx::query_scalar(
            "SELECT sequence FROM subscription_events WHERE subscription_id = $1 \
             ORDER BY sequence",
        )
        .bind(id.as_uuid())
        .fetch_all(&pool)
        .await
        .unwrap();
        // The seen ones start with their observation; the new one with the first renewal.
        let first_sight = i64::from(index < 5);
        let last = first_sight + 3 * rounds;
        assert_eq!(sequences, (1..=last).collect::<Vec<i64>>(), "{id}");
    }
}

#[tokio::test]
async fn subscriptions_with_an_ack_waiting_get_their_effects_run_first() {
    use marketplace_fulfillment::store::outbox::{self, EffectKind, End};
    let (_db, pool) = TestDatabase::migrated().await;
    let policy = Policy::default();
    let now = OffsetDateTime::now_utc();
    // A burst: many subscriptions whose effects (domain events) were queued first …
    let mut earlier = Vec::new();
    for _ in 0..5 {
        let id = SubscriptionId::from(Uuid::new_v4());
        seen_subscribed(&pool, id, now, &policy).await;
        earlier.push(id.as_uuid());
    }
    // … then one whose customer changed the plan: its ACK is due within 10 s (P7).
    let changed = SubscriptionId::from(Uuid::new_v4());
    seen_subscribed(&pool, changed, now, &policy).await;
    let change = Event::Webhook(Webhook {
        plan_id: Some(PlanId::parse("silver").unwrap()),
        action: WebhookAction::ChangePlan,
        ..match renew_webhook(Uuid::new_v4()) {
            Event::Webhook(w) => w,
            _ => unreachable!(),
        }
    });
    apply::apply(
        &pool,
        &policy,
        &Apply::new(changed, &change, &EventSource::default(), now),
    )
    .await
    .unwrap();

    // The ACK first: its window closes soonest (P7), so it goes ahead of every other row,
    // its own subscription's older domain event included (a domain event never holds back
    // an ACK).
    let ack = outbox::claim_due(&pool, 1)
        .await
        .unwrap()
        .expect("a due row");
    let row = ack.rows[0].clone();
    assert_eq!(
        (row.subscription_id, row.kind),
        (changed.as_uuid(), EffectKind::AckOperation)
    );
    ack.end(&[(row.id, End::Done)]).await.unwrap();
    // Then the changed subscription's other rows (put first), before the burst's.
    let next = outbox::claim_due(&pool, 1)
        .await
        .unwrap()
        .expect("a due row");
    let row = &next.rows[0];
    assert_eq!(row.subscription_id, changed.as_uuid(), "{row:?}");
    assert_ne!(row.kind, EffectKind::AckOperation);
    drop(next);
    // And the burst's rows are still there, for after them.
    let left: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE status = 'pending' AND subscription_id = ANY($1)",
    )
    .bind(&earlier)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(left > 0);
}

/// A decision that leaves the machine as it was (an observation older than the newest one
/// seen) is logged, but the saved machine, its version and its `updated_at` stay; one that
/// changes it saves.
#[tokio::test]
async fn a_decision_that_changes_nothing_appends_its_row_without_saving_the_machine() {
    let (_db, pool) = TestDatabase::migrated().await;
    let policy = Policy::default();
    let now = OffsetDateTime::now_utc();
    let id = SubscriptionId::from(Uuid::new_v4());
    seen_subscribed(&pool, id, now, &policy).await;
    let saved = |pool: PgPool| async move {
        sqlx::query_as::<_, (i64, i64, String, OffsetDateTime)>(
            "SELECT version, last_sequence, machine::text, updated_at FROM subscriptions \
             WHERE id = $1",
        )
        .bind(id.as_uuid())
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    let before = saved(pool.clone()).await;
    let later = now + time::Duration::seconds(5);
    let stale = observed_at(
        MarketplaceStatus::Suspended,
        now - time::Duration::seconds(5),
    );
    let outcome = apply::apply(
        &pool,
        &policy,
        &Apply::new(id, &stale, &EventSource::default(), later),
    )
    .await
    .unwrap();
    let ApplyOutcome::Decided(applied) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(applied.sequence, before.1 + 1);
    let after = saved(pool.clone()).await;
    assert_eq!(after.1, before.1 + 1, "the row is counted");
    assert_eq!(
        (after.0, &after.2, after.3),
        (before.0, &before.2, before.3),
        "version, machine and updated_at stay"
    );
    let outcome: String = sqlx::query_scalar(
        "SELECT outcome FROM subscription_events WHERE subscription_id = $1 AND sequence = $2",
    )
    .bind(id.as_uuid())
    .bind(applied.sequence)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(outcome, "ignored");
    // A change is saved as before.
    let suspended = observed_at(MarketplaceStatus::Suspended, later);
    apply::apply(
        &pool,
        &policy,
        &Apply::new(id, &suspended, &EventSource::default(), later),
    )
    .await
    .unwrap();
    let changed = saved(pool.clone()).await;
    assert_eq!(changed.0, before.0 + 1);
    assert_ne!(changed.2, before.2);
}

fn observed_at(status: MarketplaceStatus, at: OffsetDateTime) -> Event {
    let Event::Observed { snapshot, .. } = observed(status, "gold") else {
        unreachable!()
    };
    Event::Observed {
        snapshot,
        observed_at: at,
    }
}

/// The notice schedule lives in the database, written with the decision that caused it, and
/// any process emits it once when a clock it is given says so (real days here: the clock
/// is injected, nothing sleeps).
#[tokio::test]
async fn notices_are_scheduled_with_the_decision_emitted_once_when_due_and_cancelled_by_a_change() {
    use marketplace_fulfillment::store::notices::{NoticeStatus, of_subscription};
    use marketplace_fulfillment::worker::notices::emit_due;
    use time::Duration;

    let (_db, pool) = TestDatabase::migrated().await;
    let policy = Policy::default();
    let id = SubscriptionId::from(Uuid::new_v4());
    // PostgreSQL keeps microseconds.
    let now = OffsetDateTime::now_utc();
    let t0 = now
        .replace_nanosecond(now.nanosecond() / 1000 * 1000)
        .unwrap();
    let apply = |status: MarketplaceStatus, at: OffsetDateTime| {
        let pool = pool.clone();
        let policy = policy.clone();
        async move {
            apply::apply(
                &pool,
                &policy,
                &Apply::new(id, &observed_at(status, at), &EventSource::default(), at),
            )
            .await
            .unwrap()
        }
    };
    let notices = || async { of_subscription(&pool, id.as_uuid()).await.unwrap() };
    apply(MarketplaceStatus::Subscribed, t0).await;
    assert!(notices().await.is_empty(), "a renewing term owes nothing");

    let suspended = t0 + Duration::hours(1);
    apply(MarketplaceStatus::Suspended, suspended).await;
    let scheduled = notices().await;
    assert_eq!(scheduled.len(), 1, "{scheduled:?}");
    assert!(scheduled[0].notice_key.starts_with("grace_ending:"));
    assert_eq!(scheduled[0].status, NoticeStatus::Pending);
    assert_eq!(scheduled[0].due_at, suspended + Duration::days(23));

    assert_eq!(
        emit_due(&pool, suspended + Duration::days(22))
            .await
            .unwrap(),
        0
    );
    let day_23 = suspended + Duration::days(23) + Duration::seconds(1);
    assert_eq!(emit_due(&pool, day_23).await.unwrap(), 1);
    assert_eq!(emit_due(&pool, day_23).await.unwrap(), 0, "once");
    let (kind, outcome, effects, event_id): (String, String, serde_json::Value, Uuid) =
        sqlx::query_as(
            "SELECT event_kind, outcome, effects, id FROM subscription_events \
             WHERE subscription_id = $1 ORDER BY sequence DESC LIMIT 1",
        )
        .bind(id.as_uuid())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(
        (kind.as_str(), outcome.as_str()),
        ("notice:grace_ending", "applied")
    );
    assert_eq!(effects[0]["kind"], "grace_ending", "{effects}");
    let queued: (String, String) =
        sqlx::query_as("SELECT kind, status FROM outbox WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(queued, ("publish_domain_event".into(), "pending".into()));

    // Suspended again later: a new grace, a new notice; then the Unsubscribe cancels it and
    // owes the retention notice instead.
    let again = day_23 + Duration::days(1);
    apply(MarketplaceStatus::Subscribed, again).await;
    apply(MarketplaceStatus::Suspended, again + Duration::hours(1)).await;
    let ended = again + Duration::days(2);
    apply(MarketplaceStatus::Unsubscribed, ended).await;
    let statuses: Vec<(String, NoticeStatus)> = notices()
        .await
        .into_iter()
        .map(|row| {
            (
                row.notice_key.split(':').next().unwrap().to_string(),
                row.status,
            )
        })
        .collect();
    // By due time: the retention notice is due before the cancelled second grace would be.
    assert_eq!(
        statuses,
        [
            ("grace_ending".to_string(), NoticeStatus::Sent),
            ("data_retention_ends".to_string(), NoticeStatus::Pending),
            ("grace_ending".to_string(), NoticeStatus::Cancelled),
        ]
    );
    assert_eq!(emit_due(&pool, ended + Duration::days(8)).await.unwrap(), 1);
}

/// A rolling upgrade: a newer worker queued a row of a kind this version does not know.
/// It is left for a worker that knows it (never claimed, never buried as unreadable), and
/// it holds back its own subscription's later rows, not other subscriptions'.
#[tokio::test]
async fn a_row_of_a_kind_this_version_does_not_know_is_left_for_a_newer_worker() {
    use marketplace_fulfillment::store::outbox::{self, EffectKind, End};
    let (_db, pool) = TestDatabase::migrated().await;
    let (newer, other) = (Uuid::new_v4(), Uuid::new_v4());
    let insert = |subscription: Uuid, sequence: i64, kind: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox (id, subscription_id, event_id, event_sequence, kind, effect) \
                 VALUES ($1, $2, $1, $3, $4, '{}'::jsonb)",
            )
            .bind(Uuid::now_v7())
            .bind(subscription)
            .bind(sequence)
            .bind(kind)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    insert(newer, 1, "deliver_to_the_future").await;
    insert(newer, 2, "publish_domain_event").await;
    insert(other, 1, "fetch_subscription").await;

    let claimed = outbox::claim_due(&pool, 1).await.unwrap().expect("a row");
    let row = claimed.rows[0].clone();
    assert_eq!(row.subscription_id, other);
    assert_eq!(row.kind, EffectKind::FetchSubscription);
    claimed.end(&[(row.id, End::Done)]).await.unwrap();
    assert!(outbox::claim_due(&pool, 1).await.unwrap().is_none());
}

/// Index scans of `outbox_subscription_idx` so far, as the statistics report them (a
/// backend reports its counts within a second of going idle).
async fn subscription_index_scans(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = 'outbox_subscription_idx'",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Whatever the statistics say, a claim checks each candidate with a probe of its
/// subscription's pending rows, never with a scan of the whole outbox. Statistics taken
/// while nothing was pending (a burst's start) once made the planner turn the probe into an
/// anti-join over a sequential scan of the outbox, per claim (seen in `bench pipeline`: a
/// third of the claims, 26 ms each).
#[tokio::test]
async fn a_claim_probes_each_candidates_subscription_whatever_the_statistics_say() {
    use marketplace_fulfillment::store::outbox;
    let (_db, pool) = TestDatabase::migrated().await;
    let insert = |subscription: Uuid, sequence: i64, status: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO outbox (id, subscription_id, event_id, event_sequence, kind, effect, \
                 status) VALUES ($1, $2, $1, $3, 'fetch_subscription', '{}'::jsonb, $4)",
            )
            .bind(Uuid::now_v7())
            .bind(subscription)
            .bind(sequence)
            .bind(status)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    for sequence in 0..100 {
        insert(Uuid::new_v4(), sequence, "done").await;
    }
    sqlx::query("ANALYZE outbox").execute(&pool).await.unwrap();
    // Then a burst: two rows each of ten subscriptions, the second held back by the first.
    let subscriptions: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    for subscription in &subscriptions {
        for sequence in [1, 2] {
            insert(*subscription, sequence, "pending").await;
        }
    }
    let before = subscription_index_scans(&pool).await;

    let claimed = outbox::claim_due(&pool, 64).await.unwrap().expect("rows");
    assert_eq!(claimed.rows.len(), subscriptions.len());
    claimed.release().await.unwrap();
    // One probe per candidate: the twenty pending rows.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let probes = loop {
        let probes = subscription_index_scans(&pool).await - before;
        if probes >= 20 || std::time::Instant::now() > deadline {
            break probes;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert!(
        probes >= 20,
        "{probes} probes of outbox_subscription_idx for 20 candidates"
    );
}

/// A domain event queued before decisions fixed their CloudEvent ids (migration
/// 20261210020000) is numbered among its decision's domain events when it is published.
#[tokio::test]
async fn a_domain_event_queued_without_its_cloud_event_id_is_numbered_among_its_decisions() {
    use marketplace_fulfillment::store::outbox::{self, EffectKind, OutboxRow};
    let (_db, pool) = TestDatabase::migrated().await;
    let (subscription, decision) = (Uuid::new_v4(), Uuid::now_v7());
    let mut rows = Vec::new();
    for sequence in [1, 2] {
        let row = OutboxRow {
            id: Uuid::now_v7(),
            subscription_id: subscription,
            event_id: decision,
            kind: EffectKind::PublishDomainEvent,
            effect: marketplace_fulfillment::store::json_text(&serde_json::json!({})),
            attempts: 0,
            correlation_id: None,
            last_error: None,
            progress: serde_json::json!({}),
            created_at: OffsetDateTime::now_utc(),
            traceparent: None,
            due_at: None,
            cloud_event_id: None,
        };
        sqlx::query(
            "INSERT INTO outbox (id, subscription_id, event_id, event_sequence, kind, effect) \
             VALUES ($1, $2, $3, $4, 'publish_domain_event', '{}'::jsonb)",
        )
        .bind(row.id)
        .bind(subscription)
        .bind(decision)
        .bind(sequence)
        .execute(&pool)
        .await
        .unwrap();
        rows.push(row);
    }
    for (position, row) in (1..).zip(&rows) {
        assert_eq!(
            outbox::domain_event_position(&pool, row).await.unwrap(),
            (position, 2)
        );
    }
}

/// A machine bigger than a quarter page after compression stays in its row, and so do the
/// small JSON columns beside it: saving a subscription does not write and delete values in
/// the TOAST table (migration 20261211020000).
#[tokio::test]
async fn a_large_machine_is_kept_in_its_subscriptions_row() {
    let (_db, pool) = TestDatabase::migrated().await;
    let id = SubscriptionId::from(Uuid::new_v4());
    seen_subscribed(&pool, id, OffsetDateTime::now_utc(), &Policy::default()).await;
    // 6,000 characters of random hex, which compression leaves about as long.
    sqlx::query(
        "UPDATE subscriptions SET machine = machine || jsonb_build_object('padding', \
           (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 190))), \
           beneficiary = jsonb_build_object('emailId', 'customer@example.com', \
             'objectId', gen_random_uuid(), 'tenantId', gen_random_uuid()), \
           purchaser = jsonb_build_object('emailId', 'buyer@example.com', \
             'objectId', gen_random_uuid(), 'tenantId', gen_random_uuid()) \
         WHERE id = $1",
    )
    .bind(id.as_uuid())
    .execute(&pool)
    .await
    .unwrap();
    let (stored, toasted): (i32, i64) = sqlx::query_as(
        "SELECT pg_column_size(machine), \
           (SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'subscriptions') \
         FROM subscriptions WHERE id = $1",
    )
    .bind(id.as_uuid())
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(stored > 2100, "the machine takes {stored} bytes");
    assert_eq!(toasted, 0, "the TOAST table holds {toasted} bytes");
}

#[tokio::test]
async fn a_counter_a_writer_before_it_left_behind_is_caught_up_by_the_migration() {
    // A worker of the version before `subscriptions.last_sequence` appended with
    // max(sequence) + 1 and left the counter behind; the appends of this version read only
    // the counter, so migration 20261209020000 catches it up once. Its SQL runs here on
    // today's schema (this version's apply cannot write to the schema of its time).
    let (_db, pool) = TestDatabase::migrated().await;
    let id = SubscriptionId::from(Uuid::new_v4());
    let policy = Policy::default();
    seen_subscribed(&pool, id, OffsetDateTime::now_utc(), &policy).await;
    sqlx::query(
        "INSERT INTO subscription_events (id, subscription_id, sequence, event_key, event_kind, \
         event, from_state, to_state, outcome) \
         VALUES ($1, $2, 2, 'old-writer', 'Observed', '{}', 'Subscribed', 'Subscribed', \
         'ignored')",
    )
    .bind(Uuid::now_v7())
    .bind(id.as_uuid())
    .execute(&pool)
    .await
    .unwrap();
    let migration = MIGRATOR
        .iter()
        .find(|migration| migration.version == 20261209020000)
        .expect("the catch-up migration");
    sqlx::raw_sql(sqlx::AssertSqlSafe(migration.sql.as_str().to_owned()))
        .execute(&pool)
        .await
        .unwrap();
    let now = OffsetDateTime::now_utc();
    for expected in [3, 4] {
        let outcome = apply_renew(&pool, id, Uuid::new_v4(), now, &policy).await;
        let ApplyOutcome::Decided(applied) = outcome else {
            panic!("a fresh message is decided: {outcome:?}");
        };
        assert_eq!(applied.sequence, expected);
    }
}

/// The subscriptions of the window test, by role.
struct Window {
    known: SubscriptionId,
    fresh: SubscriptionId,
    handled: SubscriptionId,
    stale: SubscriptionId,
    absent: SubscriptionId,
    twice: SubscriptionId,
    unknown_duplicate: SubscriptionId,
}

/// Both databases of the window test start the same: four subscriptions seen Subscribed,
/// one message already handled, one inbox key of a subscription we never saw.
async fn window_setup(pool: &PgPool, w: &Window, handled: Uuid, orphan: Uuid, now: OffsetDateTime) {
    let policy = Policy::default();
    for id in [w.known, w.handled, w.stale, w.twice] {
        seen_subscribed(pool, id, now, &policy).await;
    }
    apply_renew(pool, w.handled, handled, now, &policy).await;
    // A row written before `state_since` existed (or preloaded without it).
    sqlx::query("UPDATE subscriptions SET state_since = NULL WHERE id = $1")
        .bind(w.stale.as_uuid())
        .execute(pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO inbox (message_id, kind, subscription_id) VALUES ($1, 'Renew', $2)")
        .bind(orphan.to_string())
        .bind(w.unknown_duplicate.as_uuid())
        .execute(pool)
        .await
        .unwrap();
}

/// What a test compares of a database after the window: the event log, the subscriptions,
/// the outbox, the inbox and the notices, without the generated ids, one line per row.
async fn window_rows(pool: &PgPool) -> Vec<String> {
    const TABLES: [&str; 5] = [
        "SELECT 'event ' || (subscription_id, sequence, message_id, event_key, event_kind, \
           from_state, to_state, outcome, reason, effects, correlation_id, recorded_at)::text \
         FROM subscription_events ORDER BY subscription_id, sequence",
        "SELECT 'subscription ' || (id, state, version, last_sequence, plan_id, machine, \
           state_since, updated_at)::text FROM subscriptions ORDER BY id",
        "SELECT 'outbox ' || (subscription_id, event_sequence, kind, effect, priority, due_at, \
           status, correlation_id)::text FROM outbox ORDER BY subscription_id, event_sequence, id",
        "SELECT 'inbox ' || (message_id, kind, subscription_id)::text FROM inbox \
         ORDER BY message_id, kind",
        "SELECT 'notice ' || (subscription_id, notice_key, due_at, status, updated_at)::text \
         FROM scheduled_notices ORDER BY subscription_id, notice_key",
    ];
    let mut rows = Vec::new();
    for query in TABLES {
        rows.extend(
            sqlx::query_scalar::<_, String>(query)
                .fetch_all(pool)
                .await
                .unwrap(),
        );
    }
    rows
}

fn outcome_summary(outcome: &ApplyOutcome) -> String {
    match outcome {
        ApplyOutcome::Duplicate => "duplicate".into(),
        ApplyOutcome::Changed { current } => format!("changed {current:?}"),
        ApplyOutcome::Decided(applied) => format!(
            "decided {} #{} {:?} {} effects",
            applied.subscription_id,
            applied.sequence,
            applied.decision.to,
            applied.outbox_ids.len()
        ),
    }
}

#[tokio::test]
async fn a_window_written_at_once_leaves_the_rows_and_sequences_of_one_by_one() {
    let (_one_db, one_by_one) = TestDatabase::migrated().await;
    let (_many_db, at_once) = TestDatabase::migrated().await;
    let policy = Policy::default();
    let now = OffsetDateTime::now_utc();
    let new_id = || SubscriptionId::from(Uuid::new_v4());
    let w = Window {
        known: new_id(),
        fresh: new_id(),
        handled: new_id(),
        stale: new_id(),
        absent: new_id(),
        twice: new_id(),
        unknown_duplicate: new_id(),
    };
    let (handled, orphan) = (Uuid::new_v4(), Uuid::new_v4());
    for pool in [&one_by_one, &at_once] {
        window_setup(pool, &w, handled, orphan, now).await;
    }

    let (renew, renew_known) = (Uuid::new_v4(), Uuid::new_v4());
    let change_plan = Event::Webhook(Webhook {
        plan_id: Some(PlanId::parse("silver").unwrap()),
        action: WebhookAction::ChangePlan,
        ..match renew_webhook(Uuid::new_v4()) {
            Event::Webhook(w) => w,
            _ => unreachable!(),
        }
    });
    let change_plan_source = EventSource {
        message_id: Some("change-plan".into()),
        inbox_key: Some(InboxKey::command(Uuid::new_v4())),
        received_at: Some(now),
        ..EventSource::default()
    };
    let suspended = observed_at(MarketplaceStatus::Suspended, now + time::Duration::hours(1));
    let subscribed = observed_at(MarketplaceStatus::Subscribed, now);
    let renew_event = renew_webhook(renew);
    let renew_known_event = renew_webhook(renew_known);
    let handled_event = renew_webhook(handled);
    let orphan_event = renew_webhook(orphan);
    let (renew_source, renew_known_source) = (
        from_message(&renew.to_string()),
        from_message(&renew_known.to_string()),
    );
    let (handled_source, orphan_source) = (
        from_message(&handled.to_string()),
        from_message(&orphan.to_string()),
    );
    let stale_source = EventSource {
        inbox_key: Some(InboxKey::command(Uuid::new_v4())),
        ..EventSource::default()
    };
    let none = EventSource::default();
    let commands = [
        // A known subscription: a decision without an ACK, then (below) one with an ACK,
        // which puts the first one's rows first too.
        Apply::new(w.known, &renew_known_event, &renew_known_source, now),
        // A subscription we never saw: created.
        Apply::new(w.fresh, &subscribed, &none, now),
        // A message handled before: a duplicate in the log.
        Apply::new(w.handled, &handled_event, &handled_source, now),
        // A subscription that changed since the caller looked: nothing, its key not kept.
        Apply::new(w.stale, &suspended, &stale_source, now).if_unchanged(Expected::Version(1)),
        Apply::new(w.known, &change_plan, &change_plan_source, now),
        // Absent as expected: created by the check.
        Apply::new(w.absent, &subscribed, &none, now).if_unchanged(Expected::Absent),
        // The same message twice in one window: the second is a duplicate.
        Apply::new(w.twice, &renew_event, &renew_source, now),
        Apply::new(w.twice, &renew_event, &renew_source, now),
        // A duplicate of a subscription we do not know: nothing logged, nothing created.
        Apply::new(w.unknown_duplicate, &orphan_event, &orphan_source, now),
        // As expected (seen, then nothing): decided.
        Apply::new(w.stale, &suspended, &none, now).if_unchanged(Expected::Version(2)),
        // Absent, but created by an earlier command of the window.
        Apply::new(w.fresh, &subscribed, &none, now).if_unchanged(Expected::Absent),
    ];

    // An effect runner's records among them: of a known subscription between its two
    // decisions, and of one we do not know (nothing written).
    let record = EffectRecord {
        event_kind: "effect:fetch_subscription".into(),
        event_key: "effect:1:1".into(),
        details: serde_json::json!({"status": 200}),
        reason: "fetched".into(),
        correlation_id: None,
        request_id: Some("req-1".into()),
    };
    let mut entries: Vec<Entry<'_>> = commands.iter().copied().map(Entry::Apply).collect();
    for (at, subscription_id) in [(1, w.known), (9, w.unknown_duplicate)] {
        entries.insert(
            at,
            Entry::Record {
                subscription_id: subscription_id.as_uuid(),
                record: &record,
                now,
            },
        );
    }

    let mut tx = one_by_one.begin().await.unwrap();
    let mut expected = Vec::new();
    for entry in &entries {
        expected.push(match entry {
            Entry::Apply(command) => {
                EntryOutcome::Applied(apply::apply_in(&mut tx, &policy, command).await.unwrap())
            }
            Entry::Record {
                subscription_id,
                record,
                now,
            } => EntryOutcome::Recorded(
                apply::record_in(&mut tx, *subscription_id, record, *now)
                    .await
                    .unwrap(),
            ),
        });
    }
    tx.commit().await.unwrap();
    let mut tx = at_once.begin().await.unwrap();
    let outcomes = apply::write_many(&mut tx, &policy, &entries).await.unwrap();
    tx.commit().await.unwrap();

    let summary = |outcomes: &[EntryOutcome]| -> Vec<String> {
        outcomes
            .iter()
            .map(|outcome| match outcome {
                EntryOutcome::Applied(outcome) => outcome_summary(outcome),
                EntryOutcome::Recorded(id) => format!("recorded {}", id.is_some()),
            })
            .collect()
    };
    assert_eq!(summary(&outcomes), summary(&expected));
    assert_eq!(
        summary(&outcomes)
            .iter()
            .map(|s| s.split(' ').next().unwrap())
            .collect::<Vec<_>>(),
        [
            "decided",
            "recorded",
            "decided",
            "duplicate",
            "changed",
            "decided",
            "decided",
            "decided",
            "duplicate",
            "recorded",
            "duplicate",
            "decided",
            "changed"
        ]
    );
    assert_eq!(summary(&outcomes)[9], "recorded false");
    let (one, many) = (window_rows(&one_by_one).await, window_rows(&at_once).await);
    assert!(
        one.iter()
            .any(|row| row.starts_with("outbox") && row.contains("ack_operation")),
        "the window queues an ACK: {one:#?}"
    );
    assert!(
        one.iter().any(|row| row.starts_with("notice")),
        "the window schedules notices: {one:#?}"
    );
    for (one, many) in one.iter().zip(&many) {
        assert_eq!(one, many);
    }
    assert_eq!(one.len(), many.len());
}
