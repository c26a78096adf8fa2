//! `inbox`: the keys of the messages applied, so a redelivery is a duplicate. Written in
//! the apply transaction, before the machine is asked, by the statement that also locks
//! the subscription's row ([`record_and_lock`]).

use fulfillment_state_machine::SubscriptionMachine;
use serde_json::Value;
use sqlx::postgres::PgConnection;
use uuid::Uuid;

use super::StoreError;
use super::subscriptions::restore;
use crate::queue::InboxKey;

/// What [`record_and_lock`] found.
#[derive(Debug)]
pub enum Recorded {
    /// The key was recorded before: the message is a duplicate.
    Duplicate,
    /// The key is recorded now; the subscription's machine, its row locked until the
    /// transaction ends, or `None` when we do not know the subscription.
    Fresh(Option<SubscriptionMachine>),
}

/// Records `key` for the subscription and locks the subscription's row, in one round trip
/// (the apply path's first statement). The key goes first, as when they were two
/// statements: a second delivery of the same message waits on the key before it touches
/// the row, so the two cannot deadlock. The row of a duplicate is locked too; its apply
/// appends to that row's log anyway.
pub async fn record_and_lock(
    conn: &mut PgConnection,
    key: &InboxKey,
    subscription_id: Uuid,
) -> Result<Recorded, StoreError> {
    // The select list is evaluated in order: the insert, then the row lock.
    let (fresh, machine): (bool, Option<Value>) = sqlx::query_as(
        "WITH recorded AS (INSERT INTO inbox (message_id, kind, subscription_id) \
           VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1), \
         locked AS (SELECT machine FROM subscriptions WHERE id = $3 FOR UPDATE) \
         SELECT EXISTS (SELECT FROM recorded), (SELECT machine FROM locked)",
    )
    .bind(key.message_id())
    .bind(key.kind())
    .bind(subscription_id)
    .fetch_one(&mut *conn)
    .await?;
    if !fresh {
        return Ok(Recorded::Duplicate);
    }
    Ok(Recorded::Fresh(machine.map(restore).transpose()?))
}
