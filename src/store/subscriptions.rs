//! `subscriptions`: the reads of the entitlement API and the landing page, and the row
//! lock, creation and saved columns of the worker's apply (which saves a machine only with
//! its event-log row, [`super::ledger::append`]).

use fulfillment_state_machine::{StateName, SubscriptionId, SubscriptionMachine, Term};
use serde_json::Value;
use sqlx::postgres::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;

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

/// The columns a decision saves: the machine and what the projections read of it.
#[derive(Debug, Clone)]
pub struct SavedMachine {
    pub machine: Value,
    pub state: &'static str,
    pub offer_id: Option<String>,
    pub plan_id: Option<String>,
    pub quantity: Option<i32>,
    pub beneficiary_tenant_id: Option<Uuid>,
    pub purchaser_tenant_id: Option<Uuid>,
    pub term_unit: Option<String>,
    pub charge_duration: Option<String>,
    pub private_offer_id: Option<String>,
    pub beneficiary: Option<Value>,
    pub purchaser: Option<Value>,
    pub allowed_customer_operations: Option<Vec<String>>,
}

impl SavedMachine {
    /// The columns of `machine`.
    pub fn of(machine: &SubscriptionMachine) -> Self {
        let details = machine.details();
        let term = details.term.as_ref();
        Self {
            machine: to_json(machine),
            state: machine.state().as_str(),
            offer_id: details.offer_id.as_ref().map(|o| o.as_str().to_string()),
            plan_id: details.plan_id.as_ref().map(|p| p.as_str().to_string()),
            quantity: details
                .quantity
                .map(|q| i32::try_from(q.get()).unwrap_or(i32::MAX)),
            beneficiary_tenant_id: details.beneficiary_tenant.map(|t| t.as_uuid()),
            purchaser_tenant_id: details.purchaser_tenant.map(|t| t.as_uuid()),
            term_unit: term.and_then(|t| t.unit.clone()),
            charge_duration: term.and_then(|t| t.charge_duration.clone()),
            private_offer_id: details.private_offer_id.clone(),
            beneficiary: details.beneficiary.as_ref().map(to_json),
            purchaser: details.purchaser.as_ref().map(to_json),
            allowed_customer_operations: details
                .allowed_operations
                .as_ref()
                .map(|allowed| allowed.as_slice().to_vec()),
        }
    }
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("machine types always serialize to JSON")
}

/// A stored machine, read back.
pub(super) fn restore(machine: Value) -> Result<SubscriptionMachine, StoreError> {
    serde_json::from_value(machine).map_err(StoreError::CorruptMachine)
}

/// The subscription's machine, its row locked until the transaction ends; `None` when we
/// do not know it.
pub async fn lock_machine(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<SubscriptionMachine>, StoreError> {
    let machine: Option<Value> =
        sqlx::query_scalar("SELECT machine FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    machine.map(restore).transpose()
}

/// The subscription's machine, if we know it (no lock; for reads).
pub async fn load_machine(
    pool: &PgPool,
    subscription_id: SubscriptionId,
) -> Result<Option<SubscriptionMachine>, StoreError> {
    let machine: Option<Value> =
        sqlx::query_scalar("SELECT machine FROM subscriptions WHERE id = $1")
            .bind(subscription_id.as_uuid())
            .fetch_optional(pool)
            .await?;
    machine.map(restore).transpose()
}

/// Inserts a new subscription's row with its fresh machine unless one exists; `true` when
/// this call created it (and holds it until the transaction ends). Two transactions meeting
/// a new subscription at once: the second waits for the first's commit, then does nothing.
pub async fn insert_new(
    conn: &mut PgConnection,
    machine: &SubscriptionMachine,
) -> Result<bool, StoreError> {
    let created = sqlx::query(
        "INSERT INTO subscriptions (id, state, machine) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(machine.subscription_id().as_uuid())
    .bind(machine.state().as_str())
    .bind(to_json(machine))
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(created == 1)
}

/// The subscription's `version`, its row locked until the transaction ends.
pub async fn lock_version(conn: &mut PgConnection, id: Uuid) -> Result<Option<i64>, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT version FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}
