//! `subscriptions`: the reads of the entitlement API and the landing page, and the row
//! locks, creation and saved columns of the worker's apply (which saves a machine only with
//! its event-log row, [`super::ledger::append_many`]).

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
    pub machine: super::JsonText,
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
            machine: super::json_text(machine),
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

/// A stored machine, read back from its text (`machine::text`): straight into the machine,
/// without a `serde_json::Value` tree on the way (a machine is about 2 kB, and the apply
/// path reads one per subscription of every window and settle).
pub(super) fn restore(machine: &str) -> Result<SubscriptionMachine, StoreError> {
    serde_json::from_str(machine).map_err(StoreError::CorruptMachine)
}

/// The subscription's machine, its row locked until the transaction ends; `None` when we
/// do not know it.
pub async fn lock_machine(
    conn: &mut PgConnection,
    id: Uuid,
) -> Result<Option<SubscriptionMachine>, StoreError> {
    let machine: Option<String> =
        sqlx::query_scalar("SELECT machine::text FROM subscriptions WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    machine.as_deref().map(restore).transpose()
}

/// The subscription's machine, if we know it (no lock; for reads).
pub async fn load_machine(
    pool: &PgPool,
    subscription_id: SubscriptionId,
) -> Result<Option<SubscriptionMachine>, StoreError> {
    let machine: Option<String> =
        sqlx::query_scalar("SELECT machine::text FROM subscriptions WHERE id = $1")
            .bind(subscription_id.as_uuid())
            .fetch_optional(pool)
            .await?;
    machine.as_deref().map(restore).transpose()
}

/// A subscription's row as the apply path holds it: its machine and the counters a
/// decision moves on from, read under the row lock (so they stay true until commit).
#[derive(Debug, Clone, PartialEq)]
pub struct LockedRow {
    pub id: Uuid,
    pub machine: SubscriptionMachine,
    /// The `state` column (the state event-log rows that decide nothing record).
    pub state: String,
    pub version: i64,
    /// The event log's last sequence ([`super::ledger`]).
    pub last_sequence: i64,
    pub state_since: Option<OffsetDateTime>,
}

/// The columns of a [`LockedRow`], as the apply path's statements select them.
/// The machine comes as text, for [`restore`].
pub(super) const LOCKED_COLUMNS: &str =
    "id, machine::text AS machine, state, version, last_sequence, state_since";

#[derive(sqlx::FromRow)]
struct LockedColumns {
    id: Uuid,
    machine: String,
    state: String,
    version: i64,
    last_sequence: i64,
    state_since: Option<OffsetDateTime>,
}

impl LockedColumns {
    fn restore(self) -> Result<LockedRow, StoreError> {
        Ok(LockedRow {
            id: self.id,
            machine: restore(&self.machine)?,
            state: self.state,
            version: self.version,
            last_sequence: self.last_sequence,
            state_since: self.state_since,
        })
    }
}

/// The rows among `ids` that we know, locked in id order (every caller locks in the same
/// order, so two transactions cannot deadlock on them) until the transaction ends.
pub async fn lock_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<LockedRow>, StoreError> {
    lock_rows(conn, ids, "").await
}

/// [`lock_many`] without waiting (`NOWAIT`): `None` when another transaction holds one of
/// the rows (nothing is locked then).
pub async fn try_lock_many(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Option<Vec<LockedRow>>, StoreError> {
    match lock_rows(conn, ids, " NOWAIT").await {
        // 55P03 lock_not_available.
        Err(StoreError::Query(sqlx::Error::Database(db)))
            if db.code().as_deref() == Some("55P03") =>
        {
            Ok(None)
        }
        locked => locked.map(Some),
    }
}

/// The statement of [`lock_many`] and [`try_lock_many`]; `wait` follows `FOR UPDATE`.
async fn lock_rows(
    conn: &mut PgConnection,
    ids: &[Uuid],
    wait: &str,
) -> Result<Vec<LockedRow>, StoreError> {
    sqlx::query_as::<_, LockedColumns>(sqlx::AssertSqlSafe(format!(
        "SELECT {LOCKED_COLUMNS} FROM subscriptions WHERE id = ANY($1) ORDER BY id FOR UPDATE{wait}"
    )))
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(LockedColumns::restore)
    .collect()
}

/// Locks those rows among `ids` that no other transaction holds, in id order, without
/// waiting (`SKIP LOCKED`); returns the others: rows we know that another transaction holds
/// now (an effect runner's settle, another worker's window). A consumer's window applies
/// what it could lock and tries the busy ones again in a later window, so it never holds
/// the rows it has while it waits for one it has not (issue #17: windows had waited about
/// 20 ms per call on a settle's rows, holding their own meanwhile). Rows we do not know are
/// in neither list.
pub async fn lock_unheld(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, StoreError> {
    Ok(sqlx::query_scalar(
        "WITH locked AS MATERIALIZED (SELECT id FROM subscriptions WHERE id = ANY($1) \
           ORDER BY id FOR UPDATE SKIP LOCKED) \
         SELECT id FROM subscriptions WHERE id = ANY($1) AND id NOT IN (SELECT id FROM locked)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?)
}

/// Inserts a row for each new subscription's fresh machine unless one exists (in id
/// order); the rows this call created, held until the transaction ends. Another
/// transaction creating one of them at once makes this one wait for its commit, then skip
/// it (the caller locks it).
pub async fn insert_many_new(
    conn: &mut PgConnection,
    machines: &[SubscriptionMachine],
) -> Result<Vec<LockedRow>, StoreError> {
    let ids: Vec<Uuid> = machines
        .iter()
        .map(|machine| machine.subscription_id().as_uuid())
        .collect();
    let states: Vec<&str> = machines
        .iter()
        .map(|machine| machine.state().as_str())
        .collect();
    let saved: Vec<Value> = machines.iter().map(to_json).collect();
    sqlx::query_as::<_, LockedColumns>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO subscriptions (id, state, machine) \
         SELECT * FROM unnest($1::uuid[], $2::text[], $3::jsonb[]) AS new (id, state, machine) \
         ORDER BY id \
         ON CONFLICT (id) DO NOTHING RETURNING {LOCKED_COLUMNS}"
    )))
    .bind(&ids)
    .bind(&states)
    .bind(&saved)
    .fetch_all(&mut *conn)
    .await?
    .into_iter()
    .map(LockedColumns::restore)
    .collect()
}
