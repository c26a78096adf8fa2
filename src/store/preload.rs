//! Bulk preloading for `bench scale`: copies of one real subscription and its event log,
//! streamed in with `COPY … FROM STDIN` (not through the pipeline), so a benchmark can run
//! against a database holding a million subscriptions and ten million event-log rows.
//!
//! The rest of the history a real database keeps beside its event log goes in too, in the
//! template's proportion to its event-log rows: the inbox's keys (one per message applied;
//! nothing prunes them), the outbox's done rows (kept once done) and the ISV's feed. Those
//! tables are written on every change, the inbox's key first of all (its primary key takes
//! each new message id at a random place), so a database that had only subscriptions and
//! event-log rows would flatter the loaded run.
//!
//! The template is read back with `COPY … TO STDOUT` in PostgreSQL's text format, so every
//! column the migrations define is copied as it is, whatever they add later. A copy differs
//! from the template in its ids (the subscription's everywhere in the row, including the
//! machine's JSON; a fresh id per event row), its event sequence numbers and its
//! `last_sequence`.

use futures_util::TryStreamExt;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgCopyIn, PgPool, PgPoolCopyExt};
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
    /// The template's rows of [`HISTORY`]'s tables, in the same order.
    history: Vec<Vec<String>>,
}

impl Template {
    pub fn event_rows(&self) -> usize {
        self.events.len()
    }
}

/// A table of a subscription's history besides its event log, copied with the event log.
struct History {
    table: &'static str,
    /// The columns copied (`*`: all, in the table's order).
    select: &'static str,
    /// Which of the template's rows, besides being its subscription's (`AND …`, or empty).
    only: &'static str,
    /// The column list of the `COPY … FROM STDIN` (empty: all columns).
    columns: &'static str,
    /// The one field that must be unique, and what a copy puts there.
    fresh: Fresh,
}

/// A new value for a copy's unique field.
#[derive(Debug, Clone, Copy)]
enum Fresh {
    /// A random GUID: a message id as Microsoft makes them.
    Guid,
    /// A time-ordered UUID, as our own ids are made.
    TimeOrdered,
}

/// The history tables a copy gets, each with as many rows per event-log row as the
/// template has.
const HISTORY: [History; 3] = [
    History {
        table: "inbox",
        select: "message_id, kind, subscription_id, received_at",
        only: "",
        columns: "(message_id, kind, subscription_id, received_at)",
        fresh: Fresh::Guid,
    },
    History {
        table: "outbox",
        select: "*",
        // Only what a finished change leaves: done rows, not pending or dead ones.
        only: " AND status = 'done'",
        columns: "",
        fresh: Fresh::TimeOrdered,
    },
    History {
        table: "webhook_events",
        select: "id, subscription_id, type, body, created_at",
        only: "",
        columns: "(id, subscription_id, type, body, created_at)",
        fresh: Fresh::TimeOrdered,
    },
];

/// What [`copy`] wrote: rows per table.
#[derive(Debug, Clone, Default)]
pub struct Preloaded {
    pub subscriptions: u64,
    pub events: u64,
    /// Per history table (`inbox`, `outbox`, `webhook_events`), the rows copied.
    pub history: Vec<(&'static str, u64)>,
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
    let mut history = Vec::with_capacity(HISTORY.len());
    for table in &HISTORY {
        history.push(
            copy_out(
                pool,
                &format!(
                    "COPY (SELECT {} FROM {} WHERE subscription_id = '{id}'{}) TO STDOUT",
                    table.select, table.table, table.only
                ),
            )
            .await?,
        );
    }
    Ok(Template {
        subscription_id: id,
        subscription,
        events,
        last_sequence_column: usize::try_from(position - 1).unwrap_or(0),
        history,
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
/// template's events repeated in order, numbered 1, 2, …) and, per [`HISTORY`] table, as
/// many rows per event-log row as the template has (its rows repeated, each with a fresh
/// unique field); returns the rows written to each table.
pub async fn copy(
    pool: &PgPool,
    template: &Template,
    ids: &[Uuid],
    events_each: usize,
) -> Result<Preloaded, sqlx::Error> {
    let old = template.subscription_id.to_string();
    let mut subscriptions = CopyIn::start(pool, "COPY subscriptions FROM STDIN").await?;
    let last = events_each.to_string();
    for id in ids {
        let line = template.subscription.replace(&old, &id.to_string());
        let mut fields: Vec<&str> = line.split('\t').collect();
        if let Some(field) = fields.get_mut(template.last_sequence_column) {
            *field = &last;
        }
        subscriptions.row(&fields).await?;
    }
    let subscription_rows = subscriptions.finish().await?;

    if template.events.is_empty() || events_each == 0 {
        return Ok(Preloaded {
            subscriptions: subscription_rows,
            ..Preloaded::default()
        });
    }
    let mut events = CopyIn::start(pool, "COPY subscription_events FROM STDIN").await?;
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
            events.row(&fields).await?;
        }
    }
    let event_rows = events.finish().await?;

    let mut history = Vec::with_capacity(HISTORY.len());
    for (table, rows) in HISTORY.iter().zip(&template.history) {
        let each = rows_each(rows.len(), template.events.len(), events_each);
        if each == 0 {
            history.push((table.table, 0));
            continue;
        }
        let statement = format!("COPY {} {} FROM STDIN", table.table, table.columns);
        let mut sink = CopyIn::start(pool, &statement).await?;
        for id in ids {
            let id_text = id.to_string();
            for n in 0..each {
                let line = rows[n % rows.len()].replace(&old, &id_text);
                let mut fields: Vec<&str> = line.split('\t').collect();
                let fresh = match table.fresh {
                    Fresh::Guid => Uuid::new_v4().to_string(),
                    Fresh::TimeOrdered => Uuid::now_v7().to_string(),
                };
                if let Some(field) = fields.first_mut() {
                    *field = &fresh;
                }
                sink.row(&fields).await?;
            }
        }
        history.push((table.table, sink.finish().await?));
    }
    Ok(Preloaded {
        subscriptions: subscription_rows,
        events: event_rows,
        history,
    })
}

/// A `COPY … FROM STDIN`, fed row by row and sent in chunks of about [`CHUNK_BYTES`].
struct CopyIn {
    sink: PgCopyIn<PoolConnection<Postgres>>,
    buffer: String,
}

impl CopyIn {
    async fn start(pool: &PgPool, statement: &str) -> Result<Self, sqlx::Error> {
        Ok(Self {
            sink: pool.copy_in_raw(statement).await?,
            buffer: String::with_capacity(CHUNK_BYTES + 4096),
        })
    }

    /// One row, its fields in COPY's text format.
    async fn row(&mut self, fields: &[&str]) -> Result<(), sqlx::Error> {
        self.buffer.push_str(&fields.join("\t"));
        self.buffer.push('\n');
        if self.buffer.len() >= CHUNK_BYTES {
            self.sink.send(self.buffer.as_bytes()).await?;
            self.buffer.clear();
        }
        Ok(())
    }

    /// Sends what is left; the rows the server took.
    async fn finish(mut self) -> Result<u64, sqlx::Error> {
        self.sink.send(self.buffer.as_bytes()).await?;
        self.sink.finish().await
    }
}

/// A copy's rows of a history table the template has `rows` of beside `template_events`
/// event-log rows, when the copy has `events_each`: the same proportion, rounded.
fn rows_each(rows: usize, template_events: usize, events_each: usize) -> usize {
    if template_events == 0 {
        return 0;
    }
    (rows * events_each + template_events / 2) / template_events
}

#[cfg(test)]
mod tests {
    use super::rows_each;

    #[test]
    fn history_rows_keep_the_templates_proportion_to_its_event_log() {
        // 13 inbox keys beside 12 event-log rows: 10 event rows a copy get 11 keys.
        assert_eq!(rows_each(13, 12, 10), 11);
        assert_eq!(rows_each(24, 12, 10), 20);
        assert_eq!(rows_each(0, 12, 10), 0);
        assert_eq!(rows_each(5, 0, 10), 0);
        assert_eq!(rows_each(12, 12, 0), 0);
    }
}
