//! Closing hours: an hour closes [`MeteringConfig::grace`] after its end (at once when its
//! subscription is no longer Subscribed: the hours before a cancellation are flushed, P26).
//! Closing freezes its quantity — the only quantity ever sent for it — and queues its
//! batch (≤ 25 hours of one subscription, oldest first) as a `submit_usage` outbox row in
//! the same transaction. Hours whose 24-hour window passed while open are `expired`
//! (reported, never sent).

use std::time::Duration;

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::{MeteringConfig, WINDOW, plan_batches};
use crate::store::StoreError;
use crate::store::usage;
use crate::worker::protocol::metering::{UsageBatch, UsageItem};

/// Hours frozen per transaction.
const HOURS_PER_PASS: i64 = 500;

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Closed {
    pub batches: usize,
    pub hours: usize,
    pub expired: u64,
}

/// Closes the due hours at `now` and queues their batches; repeats until none is due.
pub async fn close_due_hours(
    pool: &PgPool,
    config: &MeteringConfig,
    now: OffsetDateTime,
) -> Result<Closed, StoreError> {
    let mut closed = Closed::default();
    loop {
        let mut tx = pool.begin().await?;
        closed.expired += usage::expire_open_hours(
            &mut tx,
            now - WINDOW,
            "its 24-hour window at Microsoft passed before the hour closed",
        )
        .await?;
        let closed_before = now - config.grace - Duration::from_secs(3600);
        let due = usage::lock_due_hours(&mut tx, closed_before, HOURS_PER_PASS).await?;
        let found = due.len();
        for batch in plan_batches(due) {
            let batch_id = uuid::Uuid::now_v7();
            let subscription_id = batch[0].subscription_id;
            let ids: Vec<_> = batch.iter().map(|h| h.id).collect();
            usage::freeze_hours(&mut tx, batch_id, &ids).await?;
            let effect = UsageBatch {
                batch_id,
                subscription_id,
                items: batch
                    .iter()
                    .map(|h| UsageItem {
                        hour_id: h.id,
                        plan_id: h.plan_id.clone(),
                        dimension: h.dimension.clone(),
                        hour: h.hour,
                        quantity: h.quantity,
                    })
                    .collect(),
            };
            usage::queue_submission(&mut tx, batch_id, subscription_id, &effect.to_stored())
                .await?;
            closed.batches += 1;
            closed.hours += batch.len();
        }
        tx.commit().await?;
        if found < HOURS_PER_PASS as usize {
            break;
        }
    }
    crate::metrics::record_usage_expired(closed.expired);
    Ok(closed)
}

/// Closes due hours every `config.tick` until `shutdown` (inside `fulfillment work`), and
/// keeps the pending-hours gauges current.
pub async fn run_periodically(pool: PgPool, config: MeteringConfig, shutdown: CancellationToken) {
    loop {
        match close_due_hours(&pool, &config, OffsetDateTime::now_utc()).await {
            Ok(closed) if closed.batches > 0 || closed.expired > 0 => {
                tracing::info!(
                    batches = closed.batches,
                    hours = closed.hours,
                    expired = closed.expired,
                    "usage hours closed"
                );
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot close usage hours; trying again"),
        }
        if let Ok((pending, oldest)) = usage::pending_hours(&pool).await {
            crate::metrics::set_usage_pending(pending, oldest);
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(config.tick) => {}
        }
    }
}
