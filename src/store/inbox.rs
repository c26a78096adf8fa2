//! `inbox`: the keys of the messages applied, so a redelivery is a duplicate. Written in
//! the apply transaction, before the machine is asked, by the statement that also locks
//! the subscriptions' rows ([`record_and_lock_many`]).

use std::collections::HashSet;

use sqlx::postgres::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use super::StoreError;
use super::subscriptions::{LOCKED_COLUMNS, LockedRow, restore};
use crate::queue::InboxKey;

/// What [`record_and_lock_many`] found.
#[derive(Debug)]
pub struct RecordedMany {
    /// Per key given, in its order: `true` when it is recorded now (the message is fresh).
    pub fresh: Vec<bool>,
    /// The rows we know among the subscriptions given, locked until the transaction ends.
    pub locked: Vec<LockedRow>,
}

/// Records the keys of a window of messages (each with its subscription) in the order
/// given, then locks the rows of `subscriptions` in id order and reads them: one round
/// trip, the apply path's first statement. The keys go first: a second delivery of the
/// same message waits on its key before it touches any row, so the two cannot deadlock;
/// callers give the keys sorted, so two windows holding the same messages wait for each
/// other in the same order. The row of a duplicate is locked too; its apply appends to
/// that row's log anyway.
pub async fn record_and_lock_many(
    conn: &mut PgConnection,
    keys: &[(&InboxKey, Uuid)],
    subscriptions: &[Uuid],
) -> Result<RecordedMany, StoreError> {
    let message_ids: Vec<&str> = keys.iter().map(|(key, _)| key.message_id()).collect();
    let kinds: Vec<&str> = keys.iter().map(|(key, _)| key.kind()).collect();
    let owners: Vec<Uuid> = keys.iter().map(|(_, id)| *id).collect();
    // The select list is evaluated in order: the inserts, then the row locks (each CTE runs
    // once however often it is read).
    let row: RecordedColumns = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "WITH recorded AS (INSERT INTO inbox (message_id, kind, subscription_id) \
           SELECT * FROM unnest($1::text[], $2::text[], $3::uuid[]) \
           ON CONFLICT DO NOTHING RETURNING message_id, kind), \
         locked AS MATERIALIZED (SELECT {LOCKED_COLUMNS} FROM subscriptions \
           WHERE id = ANY($4) ORDER BY id FOR UPDATE) \
         SELECT ARRAY(SELECT message_id FROM recorded) AS recorded_ids, \
           ARRAY(SELECT kind FROM recorded) AS recorded_kinds, \
           ARRAY(SELECT id FROM locked) AS ids, ARRAY(SELECT machine FROM locked) AS machines, \
           ARRAY(SELECT state FROM locked) AS states, \
           ARRAY(SELECT version FROM locked) AS versions, \
           ARRAY(SELECT last_sequence FROM locked) AS last_sequences, \
           ARRAY(SELECT state_since FROM locked) AS state_sinces"
    )))
    .bind(&message_ids)
    .bind(&kinds)
    .bind(&owners)
    .bind(subscriptions)
    .fetch_one(&mut *conn)
    .await?;
    let recorded: HashSet<(&str, &str)> = row
        .recorded_ids
        .iter()
        .zip(&row.recorded_kinds)
        .map(|(id, kind)| (id.as_str(), kind.as_str()))
        .collect();
    let fresh = keys
        .iter()
        .map(|(key, _)| recorded.contains(&(key.message_id(), key.kind())))
        .collect();
    let mut locked = Vec::with_capacity(row.ids.len());
    let columns = row
        .ids
        .into_iter()
        .zip(row.machines)
        .zip(row.states)
        .zip(row.versions)
        .zip(row.last_sequences)
        .zip(row.state_sinces);
    for (((((id, machine), state), version), last_sequence), state_since) in columns {
        locked.push(LockedRow {
            id,
            machine: restore(&machine)?,
            state,
            version,
            last_sequence,
            state_since,
        });
    }
    Ok(RecordedMany { fresh, locked })
}

#[derive(sqlx::FromRow)]
struct RecordedColumns {
    recorded_ids: Vec<String>,
    recorded_kinds: Vec<String>,
    ids: Vec<Uuid>,
    machines: Vec<String>,
    states: Vec<String>,
    versions: Vec<i64>,
    last_sequences: Vec<i64>,
    state_sinces: Vec<Option<OffsetDateTime>>,
}

/// Takes back keys recorded in this transaction whose messages were not applied after all
/// (an [`Apply`](crate::worker::apply::Apply) whose subscription changed since its caller
/// looked).
pub async fn forget(conn: &mut PgConnection, keys: &[&InboxKey]) -> Result<(), StoreError> {
    let message_ids: Vec<&str> = keys.iter().map(|key| key.message_id()).collect();
    let kinds: Vec<&str> = keys.iter().map(|key| key.kind()).collect();
    sqlx::query(
        "DELETE FROM inbox WHERE (message_id, kind) IN \
         (SELECT * FROM unnest($1::text[], $2::text[]))",
    )
    .bind(&message_ids)
    .bind(&kinds)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
