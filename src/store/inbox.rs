//! `inbox`: the keys of the messages applied, so a redelivery is a duplicate. Written in
//! the apply transaction, before the machine is asked.

use sqlx::postgres::PgConnection;
use uuid::Uuid;

use super::StoreError;
use crate::queue::InboxKey;

/// Records `key` for the subscription; `false` when it was recorded before (a duplicate).
pub async fn record(
    conn: &mut PgConnection,
    key: &InboxKey,
    subscription_id: Uuid,
) -> Result<bool, StoreError> {
    let inserted = sqlx::query(
        "INSERT INTO inbox (message_id, kind, subscription_id) VALUES ($1, $2, $3) \
         ON CONFLICT DO NOTHING",
    )
    .bind(key.message_id())
    .bind(key.kind())
    .bind(subscription_id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}
