//! Bulk preloading for `bench scale`: copies of one real subscription and its event log,
//! streamed in with `COPY … FROM STDIN` (not through the pipeline), so a benchmark can run
//! against a database holding a million subscriptions and ten million event-log rows.
//!
//! The template is read back with `COPY … TO STDOUT` in PostgreSQL's text format, so every
//! column the migrations define is copied as it is, whatever they add later. A copy differs
//! from the template in its ids (the subscription's everywhere in the row, including the
//! machine's JSON; a fresh id per event row), its event sequence numbers and its
//! `last_sequence`.

use futures_util::TryStreamExt;
use sqlx::postgres::{PgPool, PgPoolCopyExt};
use uuid::Uuid;

/// Rows sent per `COPY` chunk.
const CHUNK_BYTES: usize = 1 << 20;

/// One subscription row and its event-log rows, in `COPY` text format (one line each, no
/// newline).
#[derive(Debug, Clone)]
pub struct Template {
    pub subscription_id: Uuid,
    subscription: String,
    events: Vec<String>,
    /// The position of `last_sequence` among `subscriptions`' columns.
    last_sequence_column: usize,
}

impl Template {
    pub fn event_rows(&self) -> usize {
        self.events.len()
    }
}

/// Reads subscription `id` and its event log as the template of [`copy`].
pub async fn template(pool: &PgPool, id: Uuid) -> Result<Template, sqlx::Error> {
    // `id` is a Uuid: its text form cannot break out of the literal.
    let subscription = copy_out(
        pool,
        &format!("COPY (SELECT * FROM subscriptions WHERE id = '{id}') TO STDOUT"),
    )
    .await?;
    let events = copy_out(
        pool,
        &format!(
            "COPY (SELECT * FROM subscription_events WHERE subscription_id = '{id}' \
             ORDER BY sequence) TO STDOUT"
        ),
    )
    .await?;
    let position: i32 = sqlx::query_scalar(
        "SELECT ordinal_position::int FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = 'subscriptions' \
         AND column_name = 'last_sequence'",
    )
    .fetch_one(pool)
    .await?;
    let subscription = subscription
        .into_iter()
        .next()
        .ok_or(sqlx::Error::RowNotFound)?;
    Ok(Template {
        subscription_id: id,
        subscription,
        events,
        last_sequence_column: usize::try_from(position - 1).unwrap_or(0),
    })
}

async fn copy_out(pool: &PgPool, statement: &str) -> Result<Vec<String>, sqlx::Error> {
    let mut stream = pool.copy_out_raw(statement).await?;
    let mut text = Vec::new();
    while let Some(chunk) = stream.try_next().await? {
        text.extend_from_slice(&chunk);
    }
    Ok(String::from_utf8_lossy(&text)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Copies `template` once per id in `ids`, each with `events_each` event-log rows (the
/// template's events repeated in order, numbered 1, 2, …); returns the rows written to
/// `subscriptions` and to `subscription_events`.
pub async fn copy(
    pool: &PgPool,
    template: &Template,
    ids: &[Uuid],
    events_each: usize,
) -> Result<(u64, u64), sqlx::Error> {
    let old = template.subscription_id.to_string();
    let mut subscriptions = pool.copy_in_raw("COPY subscriptions FROM STDIN").await?;
    let mut buffer = String::with_capacity(CHUNK_BYTES + 4096);
    for id in ids {
        let line = template.subscription.replace(&old, &id.to_string());
        let mut fields: Vec<&str> = line.split('\t').collect();
        let last = events_each.to_string();
        if let Some(field) = fields.get_mut(template.last_sequence_column) {
            *field = &last;
        }
        buffer.push_str(&fields.join("\t"));
        buffer.push('\n');
        if buffer.len() >= CHUNK_BYTES {
            subscriptions.send(buffer.as_bytes()).await?;
            buffer.clear();
        }
    }
    subscriptions.send(buffer.as_bytes()).await?;
    buffer.clear();
    let subscription_rows = subscriptions.finish().await?;

    if template.events.is_empty() || events_each == 0 {
        return Ok((subscription_rows, 0));
    }
    let mut events = pool
        .copy_in_raw("COPY subscription_events FROM STDIN")
        .await?;
    for id in ids {
        let id_text = id.to_string();
        for sequence in 1..=events_each {
            let source = &template.events[(sequence - 1) % template.events.len()];
            let line = source.replace(&old, &id_text);
            let mut fields: Vec<&str> = line.split('\t').collect();
            let event_id = Uuid::new_v4().to_string();
            let sequence_text = sequence.to_string();
            // id, subscription_id, sequence: the table's first three columns.
            if fields.len() > 2 {
                fields[0] = &event_id;
                fields[2] = &sequence_text;
            }
            buffer.push_str(&fields.join("\t"));
            buffer.push('\n');
            if buffer.len() >= CHUNK_BYTES {
                events.send(buffer.as_bytes()).await?;
                buffer.clear();
            }
        }
    }
    events.send(buffer.as_bytes()).await?;
    let event_rows = events.finish().await?;
    Ok((subscription_rows, event_rows))
}
