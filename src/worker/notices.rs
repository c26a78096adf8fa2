//! The notice emitter: every poll, the lifecycle notices whose time has come
//! (`scheduled_notices`, planned by the machine in the decisions that changed a state or a
//! term) are announced, each once ([`emit_notice`]): an event-log row and an outbox row
//! that publishes its domain event, committed with the notice marked sent. Several workers
//! may run this; a notice is emitted under its subscription's row lock.

use std::time::Duration;

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::store::ledger::{self, LogOutcome, LogRow};
use crate::store::outbox::{self, EffectKind, NewRow};
use crate::store::{self, StoreError, notices, subscriptions};
use crate::worker::protocol::publish;

/// Most notices one pass emits; the next pass takes the rest.
const BATCH: i64 = 100;

/// Emits the notices due at `now`; how many were emitted (those cancelled or sent by
/// another worker meanwhile do not count).
pub async fn emit_due(pool: &PgPool, now: OffsetDateTime) -> Result<usize, StoreError> {
    let mut emitted = 0;
    for (notice_id, subscription_id) in notices::due(pool, now, BATCH).await? {
        if let Some(event_id) = emit_notice(pool, subscription_id, notice_id, now).await? {
            tracing::info!(
                subscription_id = %subscription_id,
                notice_id = %notice_id,
                event_id = %event_id,
                "lifecycle notice emitted"
            );
            emitted += 1;
        }
    }
    Ok(emitted)
}

/// Emits the notice `notice_id` if it is still pending: under its subscription's row lock
/// (a decision that cancels it cannot cross), appends an event-log row that publishes its
/// domain event, queues that effect in the outbox and marks the notice sent, all in one
/// transaction. The event-log row's id, or `None` when the notice was cancelled or sent
/// meanwhile.
pub async fn emit_notice(
    pool: &PgPool,
    subscription_id: Uuid,
    notice_id: Uuid,
    now: OffsetDateTime,
) -> Result<Option<Uuid>, StoreError> {
    let mut tx = pool.begin().await?;
    let Some(machine) = subscriptions::lock_machine(&mut tx, subscription_id).await? else {
        return Ok(None);
    };
    let Some(row) = notices::lock_pending(&mut tx, notice_id).await? else {
        return Ok(None);
    };
    let Some(notice) = row.notice() else {
        // A kind only a newer version knows: left for it, never guessed.
        return Ok(None);
    };
    let effect = notice.effect(machine.state(), machine.details());
    let log = LogRow {
        id: Uuid::now_v7(),
        message_id: Some(format!("notice:{}", notice.key)),
        event_key: format!("notice:{}", notice.key),
        event_kind: format!("notice:{}", notice.kind.as_str()),
        event: store::json_text(&notice),
        from_state: None,
        outcome: LogOutcome::Applied,
        reason: notice.reason.clone(),
        effects: store::json_text(&[&effect]),
        correlation_id: None,
        request_id: None,
        trace_id: None,
        recorded_at: now,
        received_at: None,
        execution: None,
    };
    let Some(sequence) = ledger::append(&mut tx, subscription_id, &log).await? else {
        return Ok(None);
    };
    let kind = EffectKind::of(&effect);
    let row = NewRow {
        id: Uuid::now_v7(),
        subscription_id,
        event_id: log.id,
        event_sequence: sequence,
        kind,
        effect: store::json_text(&effect),
        correlation_id: None,
        traceparent: None,
        first: false,
        due_at: None,
        cloud_event_id: (kind == EffectKind::PublishDomainEvent)
            .then(|| publish::cloud_event_id(log.id, 1, 1)),
        now,
    };
    outbox::enqueue_many(&mut tx, &[], &[row]).await?;
    outbox::notify_runners(&mut tx).await?;
    notices::mark_sent(&mut tx, notice_id, log.id, now).await?;
    tx.commit().await?;
    Ok(Some(log.id))
}

/// Emits due notices every `poll` until `shutdown` fires.
pub async fn run(pool: PgPool, poll: Duration, shutdown: CancellationToken) {
    loop {
        if let Err(error) = emit_due(&pool, OffsetDateTime::now_utc()).await {
            tracing::warn!(error = %error, "lifecycle notices not emitted; retrying on the next poll");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(poll) => {}
        }
    }
}
