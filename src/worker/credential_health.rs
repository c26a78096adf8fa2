//! Credential health (issue #20): the client secret's or certificate's expiry as the gauge
//! `marketplace_credential_expiry_seconds`, a warning in the log when 30 and 7 days are
//! left, and the domain event `credential.expiring` (CloudEvents, on the domain exchange),
//! announced once per credential, expiry and threshold.
//!
//! The worker checks at start and then hourly. Once-only is kept in PostgreSQL
//! ([`crate::store::credential_notices`]): the notice is recorded first (the insert decides
//! which worker announces), published with a confirm, then marked; an unconfirmed one is
//! published again on the next check. [`thresholds_crossed`] and [`expiring_event`] are
//! pure.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::marketplace::TokenProvider;
use crate::marketplace::token::CredentialStatus;
use crate::queue::message::MessageMeta;
use crate::queue::publisher::Publisher;
use crate::store::credential_notices::{self, Notice};

/// Days ahead of expiry at which the credential is announced.
pub const THRESHOLDS_DAYS: [i32; 2] = [30, 7];
/// Routing key (and `type` suffix) of the domain event.
pub const ROUTING_KEY: &str = "credential.expiring";
/// How often the worker looks.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(3600);

/// The thresholds `expires_at` is within at `now` (an expired credential is within all).
pub fn thresholds_crossed(expires_at: OffsetDateTime, now: OffsetDateTime) -> Vec<i32> {
    let left = expires_at - now;
    THRESHOLDS_DAYS
        .into_iter()
        .filter(|days| left <= time::Duration::days(i64::from(*days)))
        .collect()
}

/// The CloudEvent of a notice.
pub fn expiring_event(notice: &Notice, kind: &str, now: OffsetDateTime) -> Value {
    json!({
        "specversion": "1.0",
        "id": notice.event_id.to_string(),
        "source": "urn:fulfillment:credential",
        "type": format!("com.fulfillment.{ROUTING_KEY}"),
        "subject": notice.credential,
        "time": now.format(&Rfc3339).unwrap_or_default(),
        "datacontenttype": "application/json",
        "data": {
            "credential": kind,
            "description": notice.credential,
            "expiresAt": notice.expires_at.format(&Rfc3339).unwrap_or_default(),
            "thresholdDays": notice.threshold_days,
            "daysLeft": (notice.expires_at - now).whole_days(),
        },
    })
}

/// One check: gauge, warnings, notices recorded and published. Returns the notices this
/// call published.
pub async fn check_once(
    pool: &PgPool,
    publisher: &Publisher,
    status: &CredentialStatus,
    now: OffsetDateTime,
) -> anyhow::Result<Vec<Notice>> {
    let kind = status.kind.as_str();
    if let Some(expires_at) = status.expires_at {
        let left = expires_at - now;
        crate::metrics::set_credential_expiry(kind, left.as_seconds_f64());
        if left <= time::Duration::ZERO {
            tracing::error!(credential = kind, description = %status.description, %expires_at,
                "the Marketplace API credential has expired: no new token can be obtained");
        }
        for threshold_days in thresholds_crossed(expires_at, now) {
            let notice = Notice {
                credential: status.description.clone(),
                expires_at,
                threshold_days,
                event_id: Uuid::new_v4(),
            };
            if credential_notices::record(pool, &notice).await? {
                tracing::warn!(
                    credential = kind,
                    description = %status.description,
                    %expires_at,
                    days_left = left.whole_days(),
                    threshold_days,
                    "the Marketplace API credential expires soon: renew it (docs/credentials.md)"
                );
            }
        }
    }
    let mut published = Vec::new();
    for notice in credential_notices::unpublished(pool).await? {
        let body = serde_json::to_vec(&expiring_event(&notice, kind, now))?;
        let meta = MessageMeta {
            message_id: notice.event_id.to_string(),
            correlation_id: notice.event_id.to_string(),
            traceparent: None,
            subscription_id: None,
        };
        publisher
            .publish_domain_event(ROUTING_KEY, &body, &meta)
            .await
            .map_err(|e| anyhow::anyhow!("cannot publish {ROUTING_KEY}: {e}"))?;
        credential_notices::mark_published(pool, notice.event_id).await?;
        tracing::info!(event_id = %notice.event_id, threshold_days = notice.threshold_days,
            "credential.expiring published");
        published.push(notice);
    }
    Ok(published)
}

/// Checks at start and every [`CHECK_INTERVAL`] until `shutdown`.
pub async fn run_periodically(
    pool: PgPool,
    publisher: Publisher,
    tokens: TokenProvider,
    shutdown: CancellationToken,
) {
    loop {
        match tokens.credential_status() {
            Ok(status) => {
                if let Err(error) =
                    check_once(&pool, &publisher, &status, OffsetDateTime::now_utc()).await
                {
                    tracing::warn!(error = %format!("{error:#}"), "credential health check failed; trying again later");
                }
            }
            Err(error) => tracing::error!(%error, "cannot read the Marketplace API credential"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn thirty_and_seven_days_ahead() {
        let now = datetime!(2027-01-01 0:00 UTC);
        let at = |days: i64| now + time::Duration::days(days);
        assert!(thresholds_crossed(at(31), now).is_empty());
        assert_eq!(thresholds_crossed(at(30), now), vec![30]);
        assert_eq!(thresholds_crossed(at(8), now), vec![30]);
        assert_eq!(thresholds_crossed(at(7), now), vec![30, 7]);
        assert_eq!(thresholds_crossed(at(-1), now), vec![30, 7]);
    }

    #[test]
    fn the_event_is_a_cloudevent_with_the_notice_id() {
        let now = datetime!(2027-01-01 0:00 UTC);
        let notice = Notice {
            credential: "certificate CN=x (thumbprint AB) of app y".into(),
            expires_at: now + time::Duration::days(6),
            threshold_days: 7,
            event_id: Uuid::nil(),
        };
        let event = expiring_event(&notice, "certificate", now);
        assert_eq!(event["type"], "com.fulfillment.credential.expiring");
        assert_eq!(event["id"], Uuid::nil().to_string());
        assert_eq!(event["data"]["daysLeft"], 6);
        assert_eq!(event["data"]["thresholdDays"], 7);
        assert_eq!(event["data"]["expiresAt"], "2027-01-07T00:00:00Z");
    }
}
