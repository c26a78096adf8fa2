//! The notice emitter: every poll, the lifecycle notices whose time has come
//! (`scheduled_notices`, planned by the machine in the decisions that changed a state or a
//! term) are announced, each once, through `ledger::emit_notice`: an event-log row and an
//! outbox row that publishes its domain event, committed with the notice marked sent.
//! Several workers may run this; a notice is emitted under its subscription's row lock.

use std::time::Duration;

use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::store::{StoreError, ledger, notices};

/// Most notices one pass emits; the next pass takes the rest.
const BATCH: i64 = 100;

/// Emits the notices due at `now`; how many were emitted (those cancelled or sent by
/// another worker meanwhile do not count).
pub async fn emit_due(pool: &PgPool, now: OffsetDateTime) -> Result<usize, StoreError> {
    let mut emitted = 0;
    for (notice_id, subscription_id) in notices::due(pool, now, BATCH).await? {
        if let Some(event_id) = ledger::emit_notice(pool, subscription_id, notice_id, now).await? {
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
