//! Consuming the inbound queue with manual acks, and the two ways a delivery can fail:
//! later (a retry tier) or for good (the dead-letter queue).
//!
//! A delivery is acked only after the worker committed its effects; a crash before that
//! means RabbitMQ redelivers (`redelivered = true`), and the worker dedupes. Deliveries
//! received on a connection that has since been lost cannot be acked any more
//! ([`QueueError::Ack`], at once, never a wait): the broker redelivers them too.
//!
//! The consumer never waits on a dead channel: a stream error, the end of the stream, a
//! channel that is no longer open (checked every [`WATCH_INTERVAL`] even when the stream
//! says nothing) or a replaced connection all make it subscribe again on the current
//! connection, and every call that waits for the broker is bounded.

use crate::queue::broker::{AckError, Broker, QueueError, bounded, close_quietly, replaced};
use crate::queue::headers;
use crate::queue::message::{InboundMessage, MessageMeta};
use crate::queue::publisher::Publisher;
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Consumer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

/// How often a consumer waiting for deliveries checks that its channel is still open.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Headers RabbitMQ owns; a republished copy must not carry the previous copy's history.
pub(crate) const BROKER_HEADERS: [&str; 8] = [
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
];

/// What [`InboundDelivery::retry_later`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOutcome {
    /// Parked in retry tier `tier`; back on the inbound queue after `delay`.
    Scheduled { tier: usize, delay: Duration },
    /// The retry tiers are used up: the message is in the dead-letter queue.
    DeadLettered,
}

/// The inbound queue as a stream of deliveries. Survives connection loss: it subscribes
/// again once the broker's supervisor has a working connection.
pub struct InboundConsumer {
    broker: Broker,
    publisher: Publisher,
    prefetch: u16,
    consumer_tag: String,
    generation: u64,
    channel: Channel,
    consumer: Consumer,
    failures: u32,
    /// The stream failed or ended: subscribe again before reading.
    stale: bool,
    generations: tokio::sync::watch::Receiver<u64>,
}

impl fmt::Debug for InboundConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InboundConsumer")
            .field("queue", &self.broker.topology().inbound_queue())
            .field("consumer_tag", &self.consumer_tag)
            .field("prefetch", &self.prefetch)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Broker {
    /// Starts consuming the inbound queue with manual acks and at most `prefetch`
    /// unacknowledged deliveries. An empty `consumer_tag` lets the broker choose one.
    pub async fn consume_inbound(
        &self,
        prefetch: u16,
        consumer_tag: &str,
    ) -> Result<InboundConsumer, QueueError> {
        let publisher = self.publisher().await?;
        let generations = self.generations();
        let (generation, channel, consumer) = subscribe(self, prefetch, consumer_tag).await?;
        tracing::info!(
            queue = %self.topology().inbound_queue(),
            consumer_tag = %consumer.tag(),
            prefetch,
            "consuming"
        );
        Ok(InboundConsumer {
            broker: self.clone(),
            publisher,
            prefetch,
            consumer_tag: consumer_tag.to_string(),
            generation,
            channel,
            consumer,
            failures: 0,
            stale: false,
            generations,
        })
    }
}

async fn subscribe(
    broker: &Broker,
    prefetch: u16,
    consumer_tag: &str,
) -> Result<(u64, Channel, Consumer), QueueError> {
    let (generation, channel) = broker.open_channel_with_generation().await?;
    let subscribed = async {
        bounded(
            "basic.qos",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = ShortString::try_new(consumer_tag).map_err(QueueError::channel)?;
        bounded(
            "basic.consume",
            channel.basic_consume(
                broker.topology().inbound_queue().as_str().into(),
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await
    }
    .await;
    match subscribed {
        Ok(consumer) => Ok((generation, channel, consumer)),
        Err(error) => {
            broker.report_failure(generation, &error);
            close_quietly(channel, "subscription failed");
            Err(QueueError::Channel(format!(
                "cannot consume {}: {error}",
                broker.topology().inbound_queue()
            )))
        }
    }
}

impl InboundConsumer {
    /// The next delivery. `None` once the broker was closed by this process. Cancel-safe:
    /// use it in `tokio::select!` with a shutdown token.
    pub async fn next(&mut self) -> Option<Result<InboundDelivery, QueueError>> {
        loop {
            if self.broker.is_closed() {
                return None;
            }
            if self.stale
                || self.broker.link().generation != self.generation
                || !self.channel.status().connected()
            {
                if let Err(e) = self.resubscribe().await {
                    return Some(Err(e));
                }
                continue;
            }
            let item = tokio::select! {
                item = self.consumer.next() => item,
                () = replaced(&mut self.generations) => continue,
                // Look at the channel now and then: a stream that says nothing about a
                // dead channel must not hold the consumer.
                () = tokio::time::sleep(WATCH_INTERVAL) => continue,
            };
            match item {
                Some(Ok(delivery)) => {
                    self.failures = 0;
                    return Some(Ok(InboundDelivery::new(delivery, self.publisher.clone())));
                }
                Some(Err(error)) => {
                    tracing::warn!(error = %error, "consumer error; subscribing again");
                    self.broker
                        .report_failure(self.generation, &QueueError::channel(&error));
                    self.stale = true;
                }
                None => {
                    if self.broker.is_closed() {
                        return None;
                    }
                    tracing::warn!("the broker ended the consumer; subscribing again");
                    self.stale = true;
                }
            }
        }
    }

    /// Stops consuming: deliveries not yet acked go back to the queue.
    pub async fn cancel(self) {
        let _ = bounded(
            "basic.cancel",
            self.channel
                .basic_cancel(self.consumer.tag(), BasicCancelOptions::default()),
        )
        .await;
        let _ = bounded(
            "channel.close",
            self.channel.close(200, "consumer stopped".into()),
        )
        .await;
    }

    /// Subscribes on the current connection, waiting for the supervisor to have one; a
    /// backoff between failed attempts. Cancel-safe.
    async fn resubscribe(&mut self) -> Result<(), QueueError> {
        if self.failures > 0 {
            let backoff = Duration::from_millis(200)
                .saturating_mul(1 << self.failures.min(5))
                .min(Duration::from_secs(5));
            tokio::time::sleep(backoff).await;
        }
        self.failures += 1;
        let (generation, channel, consumer) =
            subscribe(&self.broker, self.prefetch, &self.consumer_tag).await?;
        let old = std::mem::replace(&mut self.channel, channel);
        close_quietly(old, "resubscribed");
        self.generation = generation;
        self.consumer = consumer;
        self.stale = false;
        tracing::info!(generation, "consuming again");
        Ok(())
    }
}

/// One message from the inbound queue. Exactly one of [`ack`](Self::ack),
/// [`retry_later`](Self::retry_later) or [`dead_letter`](Self::dead_letter) ends it; dropping
/// it leaves the message unacked until the channel closes, then RabbitMQ redelivers it.
#[derive(Debug)]
pub struct InboundDelivery {
    pub meta: MessageMeta,
    /// The parsed message, or why the body is not one (a poison message for the DLQ).
    pub message: Result<InboundMessage, Arc<serde_json::Error>>,
    /// How many times a worker already failed on this message (`x-attempt`).
    pub attempt: u32,
    /// RabbitMQ delivered it before (a consumer died holding it): the worker may have
    /// processed it already.
    pub redelivered: bool,
    pub body: Vec<u8>,
    /// Every header, as text.
    pub headers: BTreeMap<String, String>,
    acker: Acker,
    properties: BasicProperties,
    publisher: Publisher,
}

impl InboundDelivery {
    fn new(delivery: lapin::message::Delivery, publisher: Publisher) -> Self {
        let table = delivery.properties.headers().as_ref();
        let meta = MessageMeta {
            message_id: delivery
                .properties
                .message_id()
                .as_ref()
                .map(ShortString::to_string)
                .unwrap_or_default(),
            correlation_id: delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(ShortString::to_string)
                .unwrap_or_default(),
            traceparent: headers::text(table, headers::TRACEPARENT),
            subscription_id: headers::text(table, headers::SUBSCRIPTION_ID)
                .and_then(|s| Uuid::parse_str(&s).ok()),
        };
        let message = InboundMessage::from_json(&delivery.data).map_err(Arc::new);
        Self {
            meta,
            message,
            attempt: headers::attempt(table),
            redelivered: delivery.redelivered,
            headers: headers::stringify(table),
            body: delivery.data,
            acker: delivery.acker,
            properties: delivery.properties,
            publisher,
        }
    }

    /// The message is done with: the broker forgets it.
    pub async fn ack(self) -> Result<(), QueueError> {
        ack(&self.acker).await
    }

    /// Parks the message in the retry tier for its attempt (republished with `x-attempt`
    /// incremented and `x-last-error`, confirmed), then acks this delivery. Once the tiers
    /// are used up it goes to the dead-letter queue instead.
    #[tracing::instrument(
        name = "queue.retry_later",
        skip_all,
        fields(
            message_id = %self.meta.message_id,
            correlation_id = %self.meta.correlation_id,
            subscription_id = ?self.meta.subscription_id,
            attempt = self.attempt,
        )
    )]
    pub async fn retry_later(self, error: &str) -> Result<RetryOutcome, QueueError> {
        self.retry_later_with_response(error, None).await
    }

    /// As [`retry_later`](Self::retry_later), keeping Microsoft's answer that caused the
    /// failure (`x-marketplace-response`), so `fulfillment dlq show` can print it.
    pub async fn retry_later_with_response(
        self,
        error: &str,
        marketplace_response: Option<&str>,
    ) -> Result<RetryOutcome, QueueError> {
        let topology = self.publisher_topology();
        let tier = self.attempt as usize;
        let Some(&delay) = topology.retry_delays().get(tier) else {
            self.dead_letter(error, marketplace_response).await?;
            return Ok(RetryOutcome::DeadLettered);
        };
        ensure_usable(&self.acker)?;
        let mut table = self.republish_headers();
        headers::set(
            &mut table,
            headers::ATTEMPT,
            AMQPValue::LongLongInt(i64::from(self.attempt) + 1),
        );
        headers::set(&mut table, headers::LAST_ERROR, headers::long_string(error));
        if let Some(response) = marketplace_response {
            headers::set(
                &mut table,
                headers::MARKETPLACE_RESPONSE,
                headers::long_string(response),
            );
        }
        let properties = self
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(table);
        self.publisher
            .publish(
                "",
                &topology.retry_queue(tier),
                &self.body,
                properties,
                true,
            )
            .await?;
        ack(&self.acker).await?;
        tracing::info!(tier, ?delay, error, "scheduled a retry");
        Ok(RetryOutcome::Scheduled { tier, delay })
    }

    /// Moves the message to the dead-letter queue with why (`x-failure-reason`,
    /// `x-last-error`), when (`x-dead-lettered-at`), after how many attempts (`x-attempt`:
    /// the attempts made, this one included)
    /// and, for a permanent Marketplace failure, its response (`x-marketplace-response`);
    /// confirmed, then acks this delivery.
    #[tracing::instrument(
        name = "queue.dead_letter",
        skip_all,
        fields(
            message_id = %self.meta.message_id,
            correlation_id = %self.meta.correlation_id,
            subscription_id = ?self.meta.subscription_id,
            attempt = self.attempt,
        )
    )]
    pub async fn dead_letter(
        self,
        reason: &str,
        marketplace_response: Option<&str>,
    ) -> Result<(), QueueError> {
        ensure_usable(&self.acker)?;
        let topology = self.publisher_topology();
        let mut table = self.republish_headers();
        // The attempts made, this failed one included.
        headers::set(
            &mut table,
            headers::ATTEMPT,
            AMQPValue::LongLongInt(i64::from(self.attempt) + 1),
        );
        headers::set(
            &mut table,
            headers::LAST_ERROR,
            headers::long_string(reason),
        );
        headers::set(
            &mut table,
            headers::FAILURE_REASON,
            headers::long_string(reason),
        );
        let now = now_rfc3339();
        headers::set(
            &mut table,
            headers::DEAD_LETTERED_AT,
            headers::long_string(&now),
        );
        if let Some(response) = marketplace_response {
            headers::set(
                &mut table,
                headers::MARKETPLACE_RESPONSE,
                headers::long_string(response),
            );
        }
        let properties = self
            .properties
            .clone()
            .with_delivery_mode(2)
            .with_headers(table);
        self.publisher
            .publish(
                &topology.dead_letter_exchange(),
                &topology.dead_letter_routing_key(),
                &self.body,
                properties,
                true,
            )
            .await?;
        ack(&self.acker).await?;
        tracing::warn!(reason, "dead-lettered");
        Ok(())
    }

    fn publisher_topology(&self) -> crate::queue::topology::Topology {
        self.publisher.topology().clone()
    }

    /// The headers for a republished copy (retry tier or DLQ): ours kept, RabbitMQ's
    /// dropped, and the time of the first failure set once.
    fn republish_headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        if let Some(original) = self.properties.headers() {
            for (key, value) in original.inner() {
                if !BROKER_HEADERS.contains(&key.as_str()) {
                    table.insert(key.clone(), value.clone());
                }
            }
        }
        if !table.inner().contains_key(headers::FIRST_FAILED_AT) {
            headers::set(
                &mut table,
                headers::FIRST_FAILED_AT,
                headers::long_string(&now_rfc3339()),
            );
        }
        table
    }
}

/// Now in RFC 3339: the times of the dead-letter headers.
pub(crate) fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.format(&Rfc3339)
        .unwrap_or_else(|_| now.unix_timestamp().to_string())
}

/// A delivery from before a connection recovery cannot be settled: republishing it would
/// only duplicate the copy the broker is about to redeliver.
fn ensure_usable(acker: &Acker) -> Result<(), QueueError> {
    if acker.usable() {
        Ok(())
    } else {
        Err(QueueError::Ack(AckError::ChannelGone))
    }
}

async fn ack(acker: &Acker) -> Result<(), QueueError> {
    match bounded("basic.ack", acker.ack(BasicAckOptions::default())).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(QueueError::Ack(AckError::NotSettled)),
        Err(e) => Err(QueueError::Ack(AckError::Broker(Box::new(e)))),
    }
}
