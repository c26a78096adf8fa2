//! Read queries on `subscriptions` for the entitlement API and the landing page. Writes
//! belong to the worker (under the row lock, with the event log); nothing here changes a row.

use fulfillment_state_machine::{StateName, SubscriptionMachine, Term};
use serde_json::Value;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

/// Most rows one list call returns.
pub const MAX_PAGE_SIZE: u32 = 500;

/// One row of `subscriptions`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SubscriptionRecord {
    pub id: Uuid,
    pub offer_id: Option<String>,
    pub plan_id: Option<String>,
    pub quantity: Option<i32>,
    pub state: String,
    pub beneficiary_tenant_id: Option<Uuid>,
    pub purchaser_tenant_id: Option<Uuid>,
    /// `term.termUnit` as sent (`PAY`, `P18M` … included).
    pub term_unit: Option<String>,
    /// `term.chargeDuration`.
    pub charge_duration: Option<String>,
    /// `sourceOffers[].externalId` of the purchased plan.
    pub private_offer_id: Option<String>,
    /// The `Party` of the beneficiary and of the purchaser, as JSON.
    pub beneficiary: Option<Value>,
    pub purchaser: Option<Value>,
    /// `allowedCustomerOperations`.
    pub allowed_customer_operations: Option<Vec<String>>,
    /// The serialized state machine.
    pub machine: Value,
    pub version: i64,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

impl SubscriptionRecord {
    /// The lifecycle state, when the column holds a known name (the schema's CHECK says it
    /// always does).
    pub fn state_name(&self) -> Option<StateName> {
        self.state.parse().ok()
    }

    /// The current term, as the stored machine knows it. `None` when the machine has none
    /// or cannot be read (the projections stay usable either way).
    pub fn term(&self) -> Option<Term> {
        serde_json::from_value::<SubscriptionMachine>(self.machine.clone())
            .ok()
            .and_then(|machine| machine.details().term.clone())
    }
}

/// Filters and keyset position of a list call.
#[derive(Debug, Clone, Default)]
pub struct SubscriptionFilter {
    pub state: Option<StateName>,
    pub beneficiary_tenant_id: Option<Uuid>,
    pub offer_id: Option<String>,
    /// Only ids greater than this one (the previous page's last id).
    pub after: Option<Uuid>,
    /// Page size, capped at [`MAX_PAGE_SIZE`].
    pub limit: u32,
}

const COLUMNS: &str = "id, offer_id, plan_id, quantity, state, beneficiary_tenant_id, \
                       purchaser_tenant_id, term_unit, charge_duration, private_offer_id, \
                       beneficiary, purchaser, allowed_customer_operations, machine, version, \
                       created_at, updated_at";

/// The subscription with this id, if we know it.
pub async fn find(pool: &PgPool, id: Uuid) -> Result<Option<SubscriptionRecord>, sqlx::Error> {
    sqlx::query_as::<_, SubscriptionRecord>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(pool)
    .await
}

/// The subscriptions among `ids` that we know (any order).
pub async fn find_many(
    pool: &PgPool,
    ids: &[Uuid],
) -> Result<Vec<SubscriptionRecord>, sqlx::Error> {
    sqlx::query_as::<_, SubscriptionRecord>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM subscriptions WHERE id = ANY($1)"
    )))
    .bind(ids)
    .fetch_all(pool)
    .await
}

/// Up to `limit` subscription ids above `after`, in id order (a walk over every id without
/// reading the rows).
pub async fn ids_after(
    pool: &PgPool,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM subscriptions WHERE ($1::uuid IS NULL OR id > $1) ORDER BY id LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Whether we know the subscription.
pub async fn exists(pool: &PgPool, id: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM subscriptions WHERE id = $1)")
        .bind(id)
        .fetch_one(pool)
        .await
}

/// One page of subscriptions matching `filter`, in id order. Fetch `limit + 1` to learn
/// whether another page follows.
pub async fn list(
    pool: &PgPool,
    filter: &SubscriptionFilter,
) -> Result<Vec<SubscriptionRecord>, sqlx::Error> {
    let limit = i64::from(filter.limit.min(MAX_PAGE_SIZE + 1));
    sqlx::query_as::<_, SubscriptionRecord>(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM subscriptions
         WHERE ($1::text IS NULL OR state = $1)
           AND ($2::uuid IS NULL OR beneficiary_tenant_id = $2)
           AND ($3::text IS NULL OR offer_id = $3)
           AND ($4::uuid IS NULL OR id > $4)
         ORDER BY id
         LIMIT $5"
    )))
    .bind(filter.state.map(StateName::as_str))
    .bind(filter.beneficiary_tenant_id)
    .bind(filter.offer_id.as_deref())
    .bind(filter.after)
    .bind(limit)
    .fetch_all(pool)
    .await
}
