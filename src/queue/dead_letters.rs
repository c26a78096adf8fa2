//! Reading, replaying and removing dead letters without losing any.
//!
//! A quorum queue has no "peek", so a [`DeadLetterReader`] consumes the dead-letter queue
//! with manual acks and holds what it reads, unacknowledged, until the caller decides per
//! message: [`replay`](DeadLetterReader::replay) publishes a copy to the message's work
//! exchange and waits for the broker's confirm, and only then is the dead letter acked
//! ([`remove`](DeadLetterReader::remove)); everything else goes back to the queue on
//! [`release`](DeadLetterReader::release) (`basic.nack` with `requeue`). A crash at any
//! point leaves the message in the dead-letter queue (possibly also in the work queue,
//! where the worker's inbox dedupes it): never lost.
//!
//! The reader sees the messages that were ready when it opened (`expected`), taking a
//! window of them at a time and more only as far as the messages it still holds need.
//!
//! Each return to the queue counts as a delivery for a quorum queue (`x-delivery-count`),
//! and RabbitMQ 4 drops messages past a queue's delivery limit (20 by default) when, like
//! our dead-letter queue, it has nowhere to dead-letter them. So a message that has been
//! read [`REFRESH_AT`] times is refreshed on release: a confirmed copy republished to the
//! dead-letter queue, then the old one acked.
//! <https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use aws_lc_rs::digest;
use futures_util::StreamExt;
use futures_util::future::join_all;
use futures_util::stream::SelectAll;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Consumer};
use uuid::Uuid;

use crate::queue::broker::{AckError, Broker, QueueError, bounded, close_quietly};
use crate::queue::consumer::BROKER_HEADERS;
use crate::queue::headers;
use crate::queue::publisher::{PublishError, Publisher};
use crate::queue::topology::INBOUND_ROUTING_KEY;

/// A dead letter read this many times is refreshed when released (see the module docs).
pub const REFRESH_AT: u32 = 10;

/// How long [`DeadLetterReader::next`] waits for a delivery before deciding that the
/// messages it expected were taken by someone else.
const QUIET: Duration = Duration::from_secs(5);

/// Headers describing a failure; a replayed copy starts without them.
const FAILURE_HEADERS: [&str; 5] = [
    headers::FAILURE_REASON,
    headers::LAST_ERROR,
    headers::DEAD_LETTERED_AT,
    headers::FIRST_FAILED_AT,
    headers::MARKETPLACE_RESPONSE,
];

/// The stable id of a dead letter: its AMQP `message_id` (the webhook's operation id, the
/// command id, `resolve:…` for a landing-page resolution), or `sha256:` and the first 16
/// hex digits of the body's SHA-256 when it has none.
pub fn dead_letter_id(message_id: &str, body: &[u8]) -> String {
    if !message_id.trim().is_empty() {
        return message_id.trim().to_string();
    }
    let hash = digest::digest(&digest::SHA256, body);
    let hex: String = hash.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

/// One message held from a dead-letter queue.
pub struct DeadLetter {
    pub queue: String,
    /// [`dead_letter_id`].
    pub id: String,
    pub message_id: String,
    pub correlation_id: String,
    pub content_type: Option<String>,
    /// AMQP `timestamp` (seconds since the epoch) of the first publish.
    pub timestamp: Option<u64>,
    /// Every header, as text.
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
    /// How often the broker delivered it before (`x-delivery-count`).
    pub delivery_count: u32,
    tag: u64,
    properties: BasicProperties,
}

impl fmt::Debug for DeadLetter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("queue", &self.queue)
            .field("id", &self.id)
            .field("delivery_count", &self.delivery_count)
            .finish_non_exhaustive()
    }
}

impl DeadLetter {
    /// Header `x-subscription-id`, when it holds a GUID.
    pub fn subscription_header(&self) -> Option<Uuid> {
        self.headers
            .get(headers::SUBSCRIPTION_ID)
            .and_then(|s| Uuid::parse_str(s.trim()).ok())
    }
}

/// An open read of one dead-letter queue. Dropping it without
/// [`release`](Self::release) also returns the held messages (when the channel closes).
pub struct DeadLetterReader {
    queue: String,
    exchange: String,
    routing_key: String,
    channel: Channel,
    /// One consumer per window: RabbitMQ applies a prefetch only to consumers started
    /// after it was set, so a read that must hold more starts another consumer.
    consumers: SelectAll<Consumer>,
    consumer_tags: Vec<ShortString>,
    publisher: Publisher,
    expected: u32,
    seen: u32,
    window: u16,
    /// What the consumers may hold together.
    capacity: usize,
    held: usize,
    last_tag: u64,
    /// Held letters due for a refresh on release: tag, body, properties.
    stale: Vec<(u64, Vec<u8>, BasicProperties)>,
}

impl fmt::Debug for DeadLetterReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterReader")
            .field("queue", &self.queue)
            .field("expected", &self.expected)
            .field("seen", &self.seen)
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// The dead-letter queues of this topology (one per work queue).
    pub fn dead_letter_queues(&self) -> Vec<String> {
        vec![self.topology().dead_letter_queue()]
    }

    /// Messages ready in `queue` now (unacknowledged ones not counted).
    pub async fn ready_messages(&self, queue: &str) -> Result<u32, QueueError> {
        let (ready, _consumers) = self.queue_counts(queue).await?;
        Ok(ready)
    }

    /// Empties `queue` (benchmarks and tests only).
    pub async fn purge_queue(&self, queue: &str) -> Result<u32, QueueError> {
        let channel = self.open_channel().await?;
        let purged = bounded(
            "queue.purge",
            channel.queue_purge(queue.into(), QueuePurgeOptions::default()),
        )
        .await;
        close_quietly(channel, "purged");
        purged.map_err(|e| QueueError::Channel(format!("cannot purge {queue}: {e}")))
    }

    /// Opens a read of `queue` (a name from [`dead_letter_queues`](Self::dead_letter_queues))
    /// that holds at most about `window` messages it is not holding on purpose.
    pub async fn read_dead_letters(
        &self,
        queue: &str,
        window: u16,
    ) -> Result<DeadLetterReader, QueueError> {
        let topology = self.topology();
        if queue != topology.dead_letter_queue() {
            return Err(QueueError::Channel(format!(
                "{queue} is not a dead-letter queue of prefix {}",
                topology.prefix()
            )));
        }
        let publisher = self.publisher().await?;
        let channel = self.open_channel().await?;
        let declared = bounded("queue.declare (passive)", inspect_queue(&channel, queue))
            .await
            .map_err(|e| QueueError::Channel(format!("cannot inspect {queue}: {e}")))?;
        let window = window.max(1);
        Ok(DeadLetterReader {
            queue: queue.to_string(),
            exchange: topology.work_exchange(),
            routing_key: INBOUND_ROUTING_KEY.to_string(),
            channel,
            consumers: SelectAll::new(),
            consumer_tags: Vec::new(),
            publisher,
            expected: declared.message_count(),
            seen: 0,
            window,
            capacity: 0,
            held: 0,
            last_tag: 0,
            stale: Vec::new(),
        })
    }
}

impl DeadLetterReader {
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The messages ready in the queue when the read began.
    pub fn expected(&self) -> u32 {
        self.expected
    }

    /// The next dead letter, held until removed or released; `None` once the expected
    /// messages were read (or nothing arrived for a while: someone else took them).
    pub async fn next(&mut self) -> Result<Option<DeadLetter>, QueueError> {
        if self.seen >= self.expected {
            return Ok(None);
        }
        self.ensure_window().await?;
        let delivery = match tokio::time::timeout(QUIET, self.consumers.next()).await {
            Err(_) | Ok(None) => {
                tracing::warn!(
                    queue = %self.queue,
                    seen = self.seen,
                    expected = self.expected,
                    "the dead-letter queue changed while reading; stopping early"
                );
                self.expected = self.seen;
                return Ok(None);
            }
            Ok(Some(Err(e))) => return Err(QueueError::channel(e)),
            Ok(Some(Ok(delivery))) => delivery,
        };
        self.seen += 1;
        self.held += 1;
        self.last_tag = self.last_tag.max(delivery.delivery_tag);
        let table = delivery.properties.headers().as_ref();
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::to_string)
            .unwrap_or_default();
        let delivery_count = headers::count(table, "x-delivery-count");
        if delivery_count + 1 >= REFRESH_AT {
            self.stale.push((
                delivery.delivery_tag,
                delivery.data.clone(),
                delivery.properties.clone(),
            ));
        }
        Ok(Some(DeadLetter {
            queue: self.queue.clone(),
            id: dead_letter_id(&message_id, &delivery.data),
            message_id,
            correlation_id: delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(ShortString::to_string)
                .unwrap_or_default(),
            content_type: delivery
                .properties
                .content_type()
                .as_ref()
                .map(ShortString::to_string),
            timestamp: *delivery.properties.timestamp(),
            headers: headers::stringify(table),
            delivery_count,
            tag: delivery.delivery_tag,
            properties: delivery.properties,
            body: delivery.data,
        }))
    }

    /// Starts another consumer (with a prefetch of `window`) whenever the messages held
    /// come within half a window of what the consumers may hold together.
    async fn ensure_window(&mut self) -> Result<(), QueueError> {
        let window = usize::from(self.window);
        if !self.consumer_tags.is_empty() && self.held + window / 2 <= self.capacity {
            return Ok(());
        }
        bounded(
            "basic.qos",
            self.channel
                .basic_qos(self.window, BasicQosOptions::default()),
        )
        .await?;
        let tag = ShortString::from(format!("dlq-reader-{}", Uuid::new_v4().simple()));
        let consumer = bounded(
            "basic.consume",
            self.channel.basic_consume(
                self.queue.as_str().into(),
                tag.clone(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
        .map_err(|e| QueueError::Channel(format!("cannot read {}: {e}", self.queue)))?;
        self.consumers.push(consumer);
        self.consumer_tags.push(tag);
        self.capacity += window;
        Ok(())
    }

    /// Publishes a copy of each letter to its work exchange (persistent, mandatory) and
    /// waits for every confirm, all in flight at once. The copy starts over: attempt 0,
    /// without the failure headers, with `x-replay-count` incremented and who and when.
    /// The letters stay held: [`remove`](Self::remove) the confirmed ones.
    pub async fn replay(
        &self,
        letters: &[&DeadLetter],
        replayed_by: &str,
        replayed_at: &str,
    ) -> Vec<Result<(), PublishError>> {
        let publishes = letters.iter().map(|letter| {
            let properties = replay_properties(letter, replayed_by, replayed_at);
            self.publisher.publish(
                &self.exchange,
                &self.routing_key,
                &letter.body,
                properties,
                true,
            )
        });
        join_all(publishes).await
    }

    /// Acks the letter: it leaves the dead-letter queue for good.
    pub async fn remove(&mut self, letter: &DeadLetter) -> Result<(), QueueError> {
        bounded(
            "basic.ack",
            self.channel
                .basic_ack(letter.tag, BasicAckOptions::default()),
        )
        .await
        .map_err(|e| QueueError::Ack(AckError::Broker(Box::new(e))))?;
        self.held = self.held.saturating_sub(1);
        self.stale.retain(|(tag, _, _)| *tag != letter.tag);
        Ok(())
    }

    /// Stops reading and returns every held letter to the queue (refreshing the ones read
    /// [`REFRESH_AT`] times); returns how many went back.
    pub async fn release(mut self) -> Result<usize, QueueError> {
        for tag in std::mem::take(&mut self.consumer_tags) {
            let _ = bounded(
                "basic.cancel",
                self.channel
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await;
        }
        let stale = std::mem::take(&mut self.stale);
        let refreshes = stale.iter().map(|(_, body, properties)| {
            let properties = properties
                .clone()
                .with_headers(copy_headers(properties, &[]));
            self.publisher
                .publish("", &self.queue, body, properties, true)
        });
        let results = join_all(refreshes).await;
        for ((tag, _, _), result) in stale.iter().zip(results) {
            match result {
                Ok(()) => {
                    bounded(
                        "basic.ack",
                        self.channel.basic_ack(*tag, BasicAckOptions::default()),
                    )
                    .await
                    .map_err(|e| QueueError::Ack(AckError::Broker(Box::new(e))))?;
                    self.held = self.held.saturating_sub(1);
                }
                Err(error) => {
                    tracing::warn!(%error, queue = %self.queue, "cannot refresh a dead letter; returning it as it is");
                }
            }
        }
        let returned = self.held;
        if self.last_tag > 0 && returned > 0 {
            bounded(
                "basic.nack",
                self.channel.basic_nack(
                    self.last_tag,
                    BasicNackOptions {
                        multiple: true,
                        requeue: true,
                    },
                ),
            )
            .await?;
        }
        let _ = bounded(
            "channel.close",
            self.channel.close(200, "dead letters released".into()),
        )
        .await;
        Ok(returned)
    }
}

/// Properties of a replayed copy: the original's, with the headers of a fresh start.
fn replay_properties(letter: &DeadLetter, replayed_by: &str, replayed_at: &str) -> BasicProperties {
    let mut table = copy_headers(&letter.properties, &FAILURE_HEADERS);
    let replays = headers::count(letter.properties.headers().as_ref(), headers::REPLAY_COUNT);
    headers::set(&mut table, headers::ATTEMPT, AMQPValue::LongLongInt(0));
    headers::set(
        &mut table,
        headers::REPLAY_COUNT,
        AMQPValue::LongLongInt(i64::from(replays) + 1),
    );
    headers::set(
        &mut table,
        headers::REPLAYED_BY,
        headers::long_string(replayed_by),
    );
    headers::set(
        &mut table,
        headers::REPLAYED_AT,
        headers::long_string(replayed_at),
    );
    letter
        .properties
        .clone()
        .with_delivery_mode(2)
        .with_headers(table)
}

/// The headers of `properties` without RabbitMQ's own and without `drop`.
fn copy_headers(properties: &BasicProperties, drop: &[&str]) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(original) = properties.headers() {
        for (key, value) in original.inner() {
            let key_str = key.as_str();
            if !BROKER_HEADERS.contains(&key_str) && !drop.contains(&key_str) {
                table.insert(key.clone(), value.clone());
            }
        }
    }
    table
}

/// `queue` as RabbitMQ holds it now (ready messages, consumers), without creating it: a
/// passive declare, which fails when the queue does not exist.
pub async fn inspect_queue(channel: &Channel, queue: &str) -> Result<lapin::Queue, lapin::Error> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_the_message_id_or_a_hash_of_the_body() {
        assert_eq!(dead_letter_id(" op-1 ", b"x"), "op-1");
        let a = dead_letter_id("", b"{\"a\":1}");
        assert!(a.starts_with("sha256:") && a.len() == 7 + 16, "{a}");
        assert_eq!(a, dead_letter_id("", b"{\"a\":1}"));
        assert_ne!(a, dead_letter_id("", b"{\"a\":2}"));
    }

    #[test]
    fn a_replayed_copy_starts_over_and_says_who_replayed_it() {
        let mut table = FieldTable::default();
        headers::set(&mut table, headers::ATTEMPT, AMQPValue::LongLongInt(4));
        headers::set(
            &mut table,
            headers::FAILURE_REASON,
            headers::long_string("boom"),
        );
        headers::set(&mut table, headers::REPLAY_COUNT, AMQPValue::LongLongInt(1));
        headers::set(&mut table, "x-delivery-count", AMQPValue::LongLongInt(3));
        headers::set(
            &mut table,
            headers::SUBSCRIPTION_ID,
            headers::long_string("s"),
        );
        let letter = DeadLetter {
            queue: "q".into(),
            id: "op".into(),
            message_id: "op".into(),
            correlation_id: String::new(),
            content_type: None,
            timestamp: None,
            headers: BTreeMap::new(),
            body: Vec::new(),
            delivery_count: 3,
            tag: 1,
            properties: BasicProperties::default()
                .with_message_id("op".into())
                .with_headers(table),
        };
        let copy = replay_properties(&letter, "cli:alice", "2026-01-01T00:00:00Z");
        let h = headers::stringify(copy.headers().as_ref());
        assert_eq!(h["x-attempt"], "0");
        assert_eq!(h["x-replay-count"], "2");
        assert_eq!(h["x-replayed-by"], "cli:alice");
        assert_eq!(h["x-subscription-id"], "s");
        assert!(!h.contains_key("x-failure-reason"));
        assert!(!h.contains_key("x-delivery-count"));
        assert_eq!(copy.message_id().as_ref().map(|m| m.as_str()), Some("op"));
        assert_eq!(*copy.delivery_mode(), Some(2));
    }
}
