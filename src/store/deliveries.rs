//! `webhook_events` (the feed, and the bodies deliveries sign), the `deliver_webhook` rows
//! of `outbox`, and `webhook_attempts` (the delivery log).

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;
use super::outbox::{self, Claimed, OutboxStatus};

/// The outbox kind of a delivery.
pub const KIND: outbox::EffectKind = outbox::EffectKind::DeliverWebhook;

/// The `LISTEN`/`NOTIFY` channel [`fan_out`] signals: a wake-up hint for the delivery
/// runners, which also poll.
pub const NOTIFY_CHANNEL: &str = "fulfillment_deliveries";

/// Serializes the inserts of `webhook_events` (see its migration): positions become
/// visible in the order they were taken.
const FEED_LOCK: i64 = 0x7765_6268_6f6f_6b73;

/// A domain event as the ISV sees it.
#[derive(Debug, Clone)]
pub struct PublishedEvent<'a> {
    /// The CloudEvents id.
    pub id: &'a str,
    pub subscription_id: Uuid,
    /// The routing key (`subscription.activated`).
    pub topic: &'a str,
    pub body: &'a Value,
    /// The event-log row and sequence of the decision (the delivery rows' order).
    pub decision_id: Uuid,
    pub correlation_id: Option<&'a str>,
}

/// One delivery row to queue: its outbox id, lane and effect.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub endpoint_id: Uuid,
    pub lane: Uuid,
    pub effect: Value,
}

/// An endpoint a new event may go to: enabled, with a matching offer filter.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Candidate {
    pub id: Uuid,
    pub topics: Vec<String>,
}

/// A [`Candidate`] of one subscription's events.
#[derive(sqlx::FromRow)]
struct SubscriptionCandidate {
    subscription_id: Uuid,
    id: Uuid,
    topics: Vec<String>,
}

/// Records published events in the feed and, for each event new to it, queues the
/// deliveries `deliveries_for` picks among the enabled endpoints of its subscription's offer
/// — in the caller's transaction (the effect runner's settle, with the rows' ends), so each
/// (event, endpoint) gets exactly one delivery row however often a publish runs. A few
/// statements for any number of events. Returns how many events were new.
///
/// The feed lock is held until the caller commits: call it in a short transaction that locks
/// nothing else (the effect runner's settle does, before its own), so no transaction waits
/// for it while holding a row others wait for, and commit at once.
pub async fn fan_out<F>(
    conn: &mut PgConnection,
    events: &[PublishedEvent<'_>],
    mut deliveries_for: F,
) -> Result<usize, StoreError>
where
    F: FnMut(&PublishedEvent<'_>, &[Candidate]) -> Vec<NewDelivery>,
{
    if events.is_empty() {
        return Ok(0);
    }
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(FEED_LOCK)
        .execute(&mut *conn)
        .await?;
    // Positions are taken in the events' order (a batch never holds two of one
    // subscription's events: the claim holds the later one back).
    let inserted: HashSet<String> = sqlx::query_scalar(
        "INSERT INTO webhook_events (id, subscription_id, type, body) \
         SELECT e.id, e.subscription_id, e.type, e.body \
         FROM unnest($1::text[], $2::uuid[], $3::text[], $4::jsonb[]) WITH ORDINALITY \
             AS e (id, subscription_id, type, body, n) \
         ORDER BY e.n \
         ON CONFLICT (id) DO NOTHING RETURNING id",
    )
    .bind(events.iter().map(|e| e.id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.subscription_id).collect::<Vec<_>>())
    .bind(events.iter().map(|e| e.topic).collect::<Vec<_>>())
    .bind(
        events
            .iter()
            .map(|e| e.body.clone())
            .collect::<Vec<Value>>(),
    )
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .collect();
    let new: Vec<&PublishedEvent<'_>> = events.iter().filter(|e| inserted.contains(e.id)).collect();
    if new.is_empty() {
        return Ok(0);
    }
    let subscriptions: Vec<Uuid> = new.iter().map(|e| e.subscription_id).collect();
    let mut candidates: HashMap<Uuid, Vec<Candidate>> = HashMap::new();
    let rows: Vec<SubscriptionCandidate> = sqlx::query_as(
        "SELECT s.id AS subscription_id, e.id, e.topics \
         FROM (SELECT DISTINCT id FROM unnest($1::uuid[]) AS u (id)) AS s \
         JOIN webhook_endpoints e ON e.status = 'enabled' AND (e.offer_id IS NULL OR \
             e.offer_id = (SELECT o.offer_id FROM subscriptions o WHERE o.id = s.id)) \
         ORDER BY s.id, e.id",
    )
    .bind(&subscriptions)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        candidates
            .entry(row.subscription_id)
            .or_default()
            .push(Candidate {
                id: row.id,
                topics: row.topics,
            });
    }
    let mut queued = Queued::default();
    for event in &new {
        let of_subscription = candidates
            .get(&event.subscription_id)
            .map_or(&[][..], Vec::as_slice);
        for delivery in deliveries_for(event, of_subscription) {
            queued.ids.push(Uuid::now_v7());
            queued.lanes.push(delivery.lane);
            queued.decisions.push(event.decision_id);
            queued.effects.push(delivery.effect);
            queued
                .correlations
                .push(event.correlation_id.map(str::to_owned));
        }
    }
    if !queued.ids.is_empty() {
        sqlx::query(
            "INSERT INTO outbox (id, subscription_id, event_id, kind, effect, event_sequence, \
                 correlation_id) \
             SELECT d.id, d.lane, d.decision, $6, d.effect, \
                 coalesce((SELECT sequence FROM subscription_events WHERE id = d.decision), 0), \
                 d.correlation \
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::jsonb[], $5::text[]) \
                 AS d (id, lane, decision, effect, correlation)",
        )
        .bind(&queued.ids)
        .bind(&queued.lanes)
        .bind(&queued.decisions)
        .bind(&queued.effects)
        .bind(&queued.correlations)
        .bind(KIND)
        .execute(&mut *conn)
        .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(NOTIFY_CHANNEL)
            .execute(&mut *conn)
            .await?;
    }
    Ok(new.len())
}

/// The columns of a fan-out's delivery rows, as `unnest` binds them.
#[derive(Default)]
struct Queued {
    ids: Vec<Uuid>,
    lanes: Vec<Uuid>,
    decisions: Vec<Uuid>,
    effects: Vec<Value>,
    correlations: Vec<Option<String>>,
}

/// Claims the most overdue claimable delivery (first in its lane).
pub async fn claim_next(pool: &PgPool) -> Result<Option<Claimed>, StoreError> {
    outbox::claim_next_of_kind(pool, KIND).await
}

/// The signed body of an event (its CloudEvents JSON).
pub async fn event_body(pool: &PgPool, id: &str) -> Result<Option<Value>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT body FROM webhook_events WHERE id = $1")
            .bind(id)
            .fetch_optional(pool)
            .await?,
    )
}

/// What an attempt ended as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize)]
#[sqlx(type_name = "text", rename_all = "lowercase")]
#[serde(rename_all = "lowercase")]
pub enum AttemptOutcome {
    Delivered,
    Failed,
    Skipped,
}

/// One attempt of the delivery log.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AttemptRow {
    pub id: i64,
    pub endpoint_id: Uuid,
    pub event_id: String,
    pub outbox_id: Option<Uuid>,
    pub attempted_at: OffsetDateTime,
    pub status: Option<i32>,
    pub latency_ms: i32,
    pub response_head: String,
    pub outcome: AttemptOutcome,
}

/// A new row of the delivery log.
#[derive(Debug, Clone)]
pub struct NewAttempt<'a> {
    pub endpoint_id: Uuid,
    pub event_id: &'a str,
    pub outbox_id: Option<Uuid>,
    pub status: Option<u16>,
    pub latency_ms: i32,
    pub response_head: &'a str,
    pub outcome: AttemptOutcome,
}

pub async fn record_attempt(pool: &PgPool, attempt: &NewAttempt<'_>) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO webhook_attempts (endpoint_id, event_id, outbox_id, status, latency_ms, \
             response_head, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(attempt.endpoint_id)
    .bind(attempt.event_id)
    .bind(attempt.outbox_id)
    .bind(attempt.status.map(i32::from))
    .bind(attempt.latency_ms)
    .bind(attempt.response_head)
    .bind(attempt.outcome)
    .execute(pool)
    .await?;
    Ok(())
}

/// An endpoint's attempts, newest first, older than `before` (an attempt id) when given.
pub async fn attempts(
    pool: &PgPool,
    endpoint_id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AttemptRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, endpoint_id, event_id, outbox_id, attempted_at, status, latency_ms, \
             response_head, outcome FROM webhook_attempts \
         WHERE endpoint_id = $1 AND ($2::bigint IS NULL OR id < $2) \
         ORDER BY id DESC LIMIT $3",
    )
    .bind(endpoint_id)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

/// One event of the feed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct FeedRow {
    pub position: i64,
    pub id: String,
    pub body: Value,
}

/// Events after `after` (a position), in order, optionally of one type and subscription.
pub async fn feed(
    pool: &PgPool,
    after: i64,
    limit: i64,
    topic: Option<&str>,
    subscription_id: Option<Uuid>,
) -> Result<Vec<FeedRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT position, id, body FROM webhook_events \
         WHERE position > $1 AND ($3::text IS NULL OR type = $3) \
           AND ($4::uuid IS NULL OR subscription_id = $4) \
         ORDER BY position LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .bind(topic)
    .bind(subscription_id)
    .fetch_all(pool)
    .await?)
}

/// Which deliveries a replay takes.
#[derive(Debug, Clone)]
pub enum ReplaySelection {
    /// One event, to every endpoint it was queued for (or one endpoint).
    Event {
        event_id: String,
        endpoint_id: Option<Uuid>,
    },
    /// An endpoint's deliveries that gave up.
    Failures { endpoint_id: Uuid },
    /// Every delivery (done or dead) queued since then, optionally of one endpoint.
    Since {
        since: OffsetDateTime,
        endpoint_id: Option<Uuid>,
    },
}

/// A delivery a replay would send again.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ReplayCandidate {
    pub outbox_id: Uuid,
    pub endpoint_id: Uuid,
    pub event_id: String,
    pub status: OutboxStatus,
    pub created_at: OffsetDateTime,
}

/// The rows a [`ReplaySelection`] names: `$1`–`$4` from [`selection_binds`], `$5` the
/// delivery kind, `$6` pending, `$7` dead (bound from their enums).
const SELECTION: &str = "kind = $5 AND status <> $6 AND ( \
       ($1 = 'event' AND effect->>'event_id' = $2 \
            AND ($3::uuid IS NULL OR (effect->>'endpoint_id')::uuid = $3)) \
    OR ($1 = 'failures' AND status = $7 AND (effect->>'endpoint_id')::uuid = $3) \
    OR ($1 = 'since' AND created_at >= $4 \
            AND ($3::uuid IS NULL OR (effect->>'endpoint_id')::uuid = $3)))";

fn selection_binds(
    selection: &ReplaySelection,
) -> (
    &'static str,
    Option<&str>,
    Option<Uuid>,
    Option<OffsetDateTime>,
) {
    match selection {
        ReplaySelection::Event {
            event_id,
            endpoint_id,
        } => ("event", Some(event_id.as_str()), *endpoint_id, None),
        ReplaySelection::Failures { endpoint_id } => ("failures", None, Some(*endpoint_id), None),
        ReplaySelection::Since { since, endpoint_id } => {
            ("since", None, *endpoint_id, Some(*since))
        }
    }
}

/// The deliveries a replay would send again (the dry run).
pub async fn replay_candidates(
    pool: &PgPool,
    selection: &ReplaySelection,
) -> Result<Vec<ReplayCandidate>, StoreError> {
    let (mode, event, endpoint, since) = selection_binds(selection);
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id AS outbox_id, (effect->>'endpoint_id')::uuid AS endpoint_id, \
             effect->>'event_id' AS event_id, status, created_at \
         FROM outbox WHERE {SELECTION} ORDER BY event_sequence, id"
    )))
    .bind(mode)
    .bind(event)
    .bind(endpoint)
    .bind(since)
    .bind(KIND)
    .bind(OutboxStatus::Pending)
    .bind(OutboxStatus::Dead)
    .fetch_all(pool)
    .await?)
}

/// Queues the selected deliveries again (pending, due now, attempts reset); returns how many.
pub async fn replay(pool: &PgPool, selection: &ReplaySelection) -> Result<u64, StoreError> {
    let (mode, event, endpoint, since) = selection_binds(selection);
    let mut tx = pool.begin().await?;
    let replayed = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE outbox SET status = $6, attempts = 0, next_attempt_at = now(), \
             last_error = NULL, progress = '{{}}'::jsonb, updated_at = now() \
         WHERE {SELECTION}"
    )))
    .bind(mode)
    .bind(event)
    .bind(endpoint)
    .bind(since)
    .bind(KIND)
    .bind(OutboxStatus::Pending)
    .bind(OutboxStatus::Dead)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(NOTIFY_CHANNEL)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(replayed)
}
