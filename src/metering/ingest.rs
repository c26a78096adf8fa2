//! Usage in: a report (from `POST /api/v1/usage` or `fulfillment usage import`) is
//! checked as a whole — every event against its subscription's state and plan and the
//! plan's metering dimensions — and stored in one transaction, or refused with the
//! reasons and nothing stored. Stored means durable: the caller's 2xx follows the commit.
//!
//! A plan's dimensions are Microsoft's: `planComponents.meteringDimensions` of
//! listAvailablePlans (§3.6, §4.5), fetched for the subscription on first use and kept in
//! `plan_dimensions` for [`MeteringConfig::dimensions_ttl`](super::MeteringConfig).

use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{MeteringConfig, RawUsage, Usage, hour_of};
use crate::marketplace::{CallContext, MarketplaceClient};
use crate::store::StoreError;
use crate::store::usage::{self, NewUsage, Stored, UsageSubscription};

/// Why a report was not stored.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// Some events are invalid: nothing was stored. `(index or line, key, reason)`.
    #[error("{} usage event(s) refused; nothing stored", .0.len())]
    Refused(Vec<Refusal>),
    /// The plan's dimensions could not be learned from Microsoft (and none are stored).
    #[error("{0}")]
    DimensionsUnavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One refused event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    /// Position in the request (0-based) or line of the file.
    pub index: usize,
    pub idempotency_key: Option<String>,
    pub reason: String,
}

impl Refusal {
    pub fn to_json(refusals: &[Refusal]) -> Value {
        json!(refusals)
    }
}

/// What happened to each stored event.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ingested {
    pub idempotency_key: String,
    pub subscription_id: Uuid,
    pub dimension: String,
    #[serde(with = "time::serde::rfc3339")]
    pub hour: OffsetDateTime,
    pub plan_id: String,
    /// `counted`, `late` (its hour was already submitted: reported, not billed) or
    /// `repeat` (the key was stored before; counted once).
    pub status: Stored,
}

/// Validates `reports` (`(index, report)`) at `now` and, unless `dry_run`, stores them.
pub async fn ingest(
    pool: &PgPool,
    client: &MarketplaceClient,
    config: &MeteringConfig,
    reports: &[(usize, RawUsage)],
    source: &'static str,
    dry_run: bool,
    now: OffsetDateTime,
) -> Result<Vec<Ingested>, IngestError> {
    let mut refusals = Vec::new();
    let mut parsed: Vec<(usize, Usage)> = Vec::new();
    for (index, report) in reports {
        match report.parse(now) {
            Ok(usage) => parsed.push((*index, usage)),
            Err(reason) => refusals.push(Refusal {
                index: *index,
                idempotency_key: report
                    .idempotency_key
                    .as_ref()
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                reason,
            }),
        }
    }
    // Each subscription and each plan's dimensions once per report.
    let mut subscriptions: HashMap<Uuid, Option<UsageSubscription>> = HashMap::new();
    let mut dimensions: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut ready = Vec::new();
    for (index, usage) in parsed {
        let refuse = |reason: String| Refusal {
            index,
            idempotency_key: Some(usage.idempotency_key.clone()),
            reason,
        };
        if let std::collections::hash_map::Entry::Vacant(entry) =
            subscriptions.entry(usage.subscription_id)
        {
            entry.insert(usage::subscription_for_usage(pool, usage.subscription_id).await?);
        }
        let Some(Some(sub)) = subscriptions.get(&usage.subscription_id) else {
            refusals.push(refuse(format!(
                "subscription {} is unknown here (not purchased through this offer, or \
                 not yet seen)",
                usage.subscription_id
            )));
            continue;
        };
        if let Err(reason) = check_state(sub, usage.effective_at) {
            refusals.push(refuse(reason));
            continue;
        }
        let (Some(offer_id), Some(plan_id)) = (sub.offer_id.clone(), sub.plan_id.clone()) else {
            refusals.push(refuse(format!("subscription {} has no plan yet", sub.id)));
            continue;
        };
        let key = (offer_id.clone(), plan_id.clone());
        if !dimensions.contains_key(&key) {
            let dims =
                plan_dimensions(pool, client, config, sub.id, &offer_id, &plan_id, now).await?;
            dimensions.insert(key.clone(), dims);
        }
        let dims = &dimensions[&key];
        if !dims.contains(&usage.dimension) {
            refusals.push(refuse(if dims.is_empty() {
                format!("plan {plan_id} has no metering dimensions: it cannot bill usage")
            } else {
                format!(
                    "dimension {:?} is not one of plan {plan_id}'s metering dimensions ({})",
                    usage.dimension,
                    dims.join(", ")
                )
            }));
            continue;
        }
        ready.push((usage, plan_id));
    }
    if !refusals.is_empty() {
        refusals.sort_by_key(|r| r.index);
        return Err(IngestError::Refused(refusals));
    }
    let mut ingested = Vec::with_capacity(ready.len());
    if dry_run {
        for (usage, plan_id) in ready {
            ingested.push(Ingested {
                idempotency_key: usage.idempotency_key,
                subscription_id: usage.subscription_id,
                dimension: usage.dimension,
                hour: hour_of(usage.effective_at),
                plan_id,
                status: Stored::Counted,
            });
        }
        return Ok(ingested);
    }
    let mut tx = pool.begin().await.map_err(StoreError::from)?;
    for (usage, plan_id) in ready {
        let hour = hour_of(usage.effective_at);
        let stored = usage::record_usage(
            &mut tx,
            &NewUsage {
                id: Uuid::now_v7(),
                idempotency_key: usage.idempotency_key.clone(),
                subscription_id: usage.subscription_id,
                plan_id: plan_id.clone(),
                dimension: usage.dimension.clone(),
                quantity: usage.quantity,
                effective_at: usage.effective_at,
                hour,
                source,
            },
        )
        .await?;
        ingested.push(Ingested {
            idempotency_key: usage.idempotency_key,
            subscription_id: usage.subscription_id,
            dimension: usage.dimension,
            hour,
            plan_id,
            status: stored,
        });
    }
    tx.commit().await.map_err(StoreError::from)?;
    for item in &ingested {
        crate::metrics::record_usage_ingested(item.status);
    }
    Ok(ingested)
}

/// Usage is billable while the subscription is `Subscribed`, and for the time before it
/// left `Subscribed` (Unsubscribe, Suspend; P26). Never while PendingFulfillment.
fn check_state(sub: &UsageSubscription, effective_at: OffsetDateTime) -> Result<(), String> {
    match sub.state.as_str() {
        "Subscribed" => Ok(()),
        "Unsubscribed" | "Suspended" => match sub.left_subscribed_at {
            Some(left) if effective_at < left => Ok(()),
            _ => Err(format!(
                "subscription {} is {}: only usage from before that is billable",
                sub.id, sub.state
            )),
        },
        other => Err(format!(
            "subscription {} is {other}: usage is billable only once it is Subscribed",
            sub.id
        )),
    }
}

/// The plan's dimensions: stored ones while fresh, else listAvailablePlans for `sub`.
async fn plan_dimensions(
    pool: &PgPool,
    client: &MarketplaceClient,
    config: &MeteringConfig,
    subscription_id: Uuid,
    offer_id: &str,
    plan_id: &str,
    now: OffsetDateTime,
) -> Result<Vec<String>, IngestError> {
    let stored = usage::plan_dimensions(pool, offer_id, plan_id).await?;
    if let Some((dims, fetched_at)) = &stored
        && now - *fetched_at < config.dimensions_ttl
    {
        return Ok(dims.clone());
    }
    let fetched = client
        .list_available_plans(&CallContext::random(), subscription_id, Some(plan_id))
        .await;
    match fetched {
        Ok(response) => {
            let plans = response.into_value();
            let plan = plans.iter().find(|p| p.plan_id.as_deref() == Some(plan_id));
            let dims = super::dimensions_of_plan(plan.and_then(|p| p.plan_components.as_ref()));
            usage::save_plan_dimensions(pool, offer_id, plan_id, &dims).await?;
            Ok(dims)
        }
        // Stale beats nothing when Microsoft is away.
        Err(_) if stored.is_some() => Ok(stored.map(|(d, _)| d).unwrap_or_default()),
        Err(error) => Err(IngestError::DimensionsUnavailable(format!(
            "cannot learn plan {plan_id}'s metering dimensions from Microsoft \
             (listAvailablePlans): {error}; nothing stored, send the usage again later"
        ))),
    }
}
