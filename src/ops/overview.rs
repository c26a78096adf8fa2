//! The operator console's overview, one read of everything an operator checks first:
//! subscriptions per state, webhook-to-ACK p50/p99 against Microsoft's 10 s (from the
//! event log, last 24 hours), auto-accepted operations, the outbox backlog and its oldest
//! row, the latest reconciliation's drift, and what needs a person ([`super::status`]).

use std::time::Duration;

use serde::Serialize;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;

use super::status::{self, Attention};
use crate::queue::Broker;
use crate::store::overview::{self, AckStats, ReconcileRun};

/// The window of the ACK figures.
pub const ACK_WINDOW: time::Duration = time::Duration::hours(24);
/// Microsoft's ACK window (P7).
pub const ACK_DEADLINE_MS: f64 = 10_000.0;

#[derive(Debug, Clone, Serialize)]
pub struct Overview {
    pub subscriptions_by_state: Vec<(String, i64)>,
    pub acks: AckStats,
    /// Pending outbox rows and the age of the oldest, in seconds.
    pub outbox_pending: i64,
    pub outbox_oldest_secs: u64,
    pub latest_reconcile: Option<ReconcileRun>,
    /// Drifted subscriptions in the latest reconciliation (left after healing).
    pub reconcile_drift: Option<usize>,
    pub attention: Attention,
}

impl Overview {
    /// The p99 is within Microsoft's window (or there was no ACK).
    pub fn acks_in_time(&self) -> bool {
        self.acks.p99_ms.is_none_or(|p99| p99 <= ACK_DEADLINE_MS)
    }

    pub fn dead_letters(&self) -> i64 {
        self.count(status::Need::DeadLetters)
    }

    pub fn dead_effects(&self) -> i64 {
        self.count(status::Need::DeadEffects)
    }

    fn count(&self, need: status::Need) -> i64 {
        self.attention
            .items
            .iter()
            .filter(|i| i.need == need)
            .map(|i| i.count)
            .sum()
    }
}

/// Drift left by a reconciliation report (`details` of its journal row).
pub fn drift_left(report: &serde_json::Value) -> Option<usize> {
    let drifts = report["drifts"].as_array()?;
    Some(
        drifts
            .iter()
            .filter(|d| d["heal"]["status"] != "healed")
            .count(),
    )
}

pub async fn read(
    pool: &PgPool,
    broker: Result<&Broker, String>,
    stuck_after: Duration,
    now: OffsetDateTime,
) -> anyhow::Result<Overview> {
    let answers_for = status::ANSWERS_LISTED_FOR;
    let facts = status::gather(
        pool,
        broker,
        now - time::Duration::days(7),
        now - time::Duration::try_from(answers_for)?,
    )
    .await?;
    let (outbox_pending, oldest) = crate::store::outbox::backlog(pool).await?;
    let latest_reconcile = overview::latest_reconcile(pool).await?;
    Ok(Overview {
        subscriptions_by_state: overview::subscriptions_by_state(pool).await?,
        acks: overview::ack_stats(pool, now - ACK_WINDOW).await?,
        outbox_pending,
        outbox_oldest_secs: oldest.as_secs(),
        reconcile_drift: latest_reconcile
            .as_ref()
            .and_then(|r| drift_left(&r.details)),
        latest_reconcile,
        attention: status::attention(
            &facts,
            now,
            status::Windows {
                stuck_after,
                answers_for,
            },
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn drift_left_counts_what_was_not_healed() {
        let report = json!({"drifts": [
            {"heal": {"status": "healed", "events": []}},
            {"heal": {"status": "not_attempted"}},
            {"heal": {"status": "deferred", "reason": "x"}},
        ]});
        assert_eq!(drift_left(&report), Some(2));
        assert_eq!(drift_left(&json!({})), None);
    }
}
