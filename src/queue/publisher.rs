//! The confirmed publisher: a publish returns `Ok` only once RabbitMQ has taken
//! responsibility for the message (publisher confirm, persistent, routed to a durable queue).
//! The ingress answers 200 on that and 503 on any [`PublishError`], so Microsoft retries.
//!
//! A publish that meets a broken channel or connection tries again on a new channel, after
//! the [`Broker`]'s supervisor replaced a lost connection, until it is confirmed or
//! `recovery_timeout` is over; the whole publish, waits included, is bounded by it. A
//! retried publish may duplicate a message whose confirm was lost: consumers dedupe on
//! `message_id` (at-least-once).

use crate::queue::broker::{Broker, QueueError, bounded};
use crate::queue::headers;
use crate::queue::message::{InboundMessage, MessageMeta};
use crate::queue::topology::INBOUND_ROUTING_KEY;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Confirmation};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;
use tokio::time::Instant;

pub const DEFAULT_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_RECOVERY_TIMEOUT: Duration = Duration::from_secs(15);
/// Between two tries of one publish on a failing connection.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

const JSON: &str = "application/json";
const CLOUDEVENTS_JSON: &str = "application/cloudevents+json";

/// Why a message was not confirmed. Every variant means "not accepted; try again later".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ is unavailable: {0}")]
    Unavailable(String),
    #[error("RabbitMQ refused the message (nack)")]
    Nacked,
    #[error("RabbitMQ did not confirm the message in time")]
    Timeout,
    #[error("RabbitMQ could not route the message to any queue (is the topology declared?)")]
    Unroutable,
}

/// Publishes with confirms on one confirm-mode channel; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    shared: Arc<Shared>,
    confirm_timeout: Duration,
    recovery_timeout: Duration,
}

struct Shared {
    broker: Broker,
    /// The channel and the connection generation it belongs to.
    channel: Mutex<Option<(u64, Channel)>>,
}

impl fmt::Debug for Publisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Publisher")
            .field("broker", &self.shared.broker)
            .field("confirm_timeout", &self.confirm_timeout)
            .field("recovery_timeout", &self.recovery_timeout)
            .finish()
    }
}

enum Failure {
    /// Retrying on this channel cannot change the outcome.
    Final(PublishError),
    /// The channel or connection failed; recovery may help.
    Channel(lapin::Error),
}

impl Publisher {
    pub(crate) async fn open(broker: Broker) -> Result<Self, QueueError> {
        let publisher = Publisher {
            shared: Arc::new(Shared {
                broker,
                channel: Mutex::new(None),
            }),
            confirm_timeout: DEFAULT_CONFIRM_TIMEOUT,
            recovery_timeout: DEFAULT_RECOVERY_TIMEOUT,
        };
        publisher.channel().await.map_err(|e| match e {
            PublishError::Unavailable(reason) => QueueError::Channel(reason),
            other => QueueError::Publish(other),
        })?;
        Ok(publisher)
    }

    pub(crate) fn topology(&self) -> &crate::queue::topology::Topology {
        self.shared.broker.topology()
    }

    /// How long to wait for the broker's confirm of one message (default 5 s).
    pub fn with_confirm_timeout(mut self, timeout: Duration) -> Self {
        self.confirm_timeout = timeout;
        self
    }

    /// How long one publish may spend waiting for a lost connection to come back (default
    /// 15 s) before it reports [`PublishError::Unavailable`].
    pub fn with_recovery_timeout(mut self, timeout: Duration) -> Self {
        self.recovery_timeout = timeout;
        self
    }

    /// Publishes one inbound message for the workers: persistent, mandatory, confirmed.
    #[tracing::instrument(
        name = "queue.publish_inbound",
        level = "debug",
        skip_all,
        fields(
            message_id = %meta.message_id,
            correlation_id = %meta.correlation_id,
            subscription_id = ?meta.subscription_id,
            message_type = message.type_name(),
        )
    )]
    pub async fn publish_inbound(
        &self,
        message: &InboundMessage,
        meta: &MessageMeta,
    ) -> Result<(), PublishError> {
        let mut table = meta_headers(meta);
        headers::set(
            &mut table,
            headers::MESSAGE_TYPE,
            headers::long_string(message.type_name()),
        );
        headers::set(&mut table, headers::ATTEMPT, AMQPValue::LongLongInt(0));
        let properties = properties(meta, JSON, table)?;
        let exchange = self.shared.broker.topology().work_exchange();
        self.publish(
            &exchange,
            INBOUND_ROUTING_KEY,
            &message.to_json(),
            properties,
            true,
        )
        .await
    }

    /// Publishes one CloudEvent (`body`) on the domain topic exchange, confirmed.
    ///
    /// Not mandatory: which of its services listen is the ISV's choice, and an event nobody
    /// bound a queue for is not an error (it would otherwise block the outbox forever).
    #[tracing::instrument(
        name = "queue.publish_domain_event",
        level = "debug",
        skip_all,
        fields(
            routing_key,
            message_id = %meta.message_id,
            correlation_id = %meta.correlation_id,
            subscription_id = ?meta.subscription_id,
        )
    )]
    pub async fn publish_domain_event(
        &self,
        routing_key: &str,
        body: &[u8],
        meta: &MessageMeta,
    ) -> Result<(), PublishError> {
        let properties = properties(meta, CLOUDEVENTS_JSON, meta_headers(meta))?;
        let exchange = self.shared.broker.topology().domain_exchange();
        self.publish(&exchange, routing_key, body, properties, false)
            .await
    }

    /// Publishes `body` straight into the dead-letter queue as
    /// [`InboundDelivery::dead_letter`](crate::queue::InboundDelivery::dead_letter) leaves a
    /// message whose `attempts` failed with `reason` (persistent, mandatory, confirmed): how
    /// `bench replay` and the tests of the dead-letter tools fill the queue.
    pub async fn publish_dead_letter(
        &self,
        body: &[u8],
        meta: &MessageMeta,
        attempts: u32,
        reason: &str,
    ) -> Result<(), PublishError> {
        let mut table = meta_headers(meta);
        let attempts = AMQPValue::LongLongInt(i64::from(attempts));
        headers::set(&mut table, headers::ATTEMPT, attempts);
        for key in [headers::FAILURE_REASON, headers::LAST_ERROR] {
            headers::set(&mut table, key, headers::long_string(reason));
        }
        let now = crate::queue::consumer::now_rfc3339();
        for key in [headers::DEAD_LETTERED_AT, headers::FIRST_FAILED_AT] {
            headers::set(&mut table, key, headers::long_string(&now));
        }
        let properties = properties(meta, JSON, table)?;
        let topology = self.topology();
        let (exchange, key) = (
            topology.dead_letter_exchange(),
            topology.dead_letter_routing_key(),
        );
        self.publish(&exchange, &key, body, properties, true).await
    }

    /// Publishes with a confirm, recovering from a broken connection within
    /// `recovery_timeout`.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        let exchange = ShortString::try_new(exchange)
            .map_err(|e| PublishError::Unavailable(format!("invalid exchange name: {e}")))?;
        let routing_key = ShortString::try_new(routing_key)
            .map_err(|e| PublishError::Unavailable(format!("invalid routing key: {e}")))?;
        let attempt = |channel: Channel| {
            let exchange = exchange.clone();
            let routing_key = routing_key.clone();
            let properties = properties.clone();
            async move {
                publish_once(
                    &channel,
                    exchange,
                    routing_key,
                    body,
                    properties,
                    mandatory,
                    self.confirm_timeout,
                )
                .await
            }
        };
        let deadline = Instant::now() + self.recovery_timeout;
        let mut last_error: Option<String> = None;
        loop {
            if self.shared.broker.is_closed() {
                return Err(PublishError::Unavailable(QueueError::Closed.to_string()));
            }
            let round = async {
                let (generation, channel) = self.channel().await?;
                match attempt(channel).await {
                    Ok(()) => Ok(Ok(())),
                    Err(Failure::Final(e)) => Ok(Err(e)),
                    Err(Failure::Channel(e)) => {
                        self.forget_channel(generation).await;
                        self.shared
                            .broker
                            .report_failure(generation, &QueueError::Channel(e.to_string()));
                        Err(PublishError::Unavailable(e.to_string()))
                    }
                }
            };
            match tokio::time::timeout_at(deadline, round).await {
                Ok(Ok(outcome)) => {
                    if outcome.is_ok() && last_error.is_some() {
                        tracing::info!("published after RabbitMQ came back");
                    }
                    return outcome;
                }
                Ok(Err(PublishError::Unavailable(reason))) => {
                    if last_error.is_none() {
                        tracing::warn!(error = %reason, "publish failed; trying again on a new channel");
                    }
                    last_error = Some(reason);
                    // A channel that fails at once (the connection is going down) must not
                    // spin: the supervisor needs a moment to notice.
                    if tokio::time::timeout_at(deadline, tokio::time::sleep(RETRY_PAUSE))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Err(other)) => return Err(other),
                Err(_) => break,
            }
        }
        Err(PublishError::Unavailable(match last_error {
            Some(reason) => format!(
                "no working connection to RabbitMQ within {:?} (last error: {reason})",
                self.recovery_timeout
            ),
            None => format!(
                "no working connection to RabbitMQ within {:?}",
                self.recovery_timeout
            ),
        }))
    }

    /// The confirm-mode channel, opened on the current connection when missing or stale.
    async fn channel(&self) -> Result<(u64, Channel), PublishError> {
        let broker = &self.shared.broker;
        if broker.is_closed() {
            return Err(PublishError::Unavailable(QueueError::Closed.to_string()));
        }
        // Held while a channel is opened, so that one caller opens it for all; the callers'
        // deadlines bound the wait.
        let mut slot = self.shared.channel.lock().await;
        let current_generation = broker.link().generation;
        if let Some((generation, channel)) = slot.as_ref()
            && *generation == current_generation
            && channel.status().connected()
        {
            return Ok((*generation, channel.clone()));
        }
        *slot = None;
        let (generation, channel) = broker
            .open_channel_with_generation()
            .await
            .map_err(|e| PublishError::Unavailable(e.to_string()))?;
        if let Err(error) = bounded(
            "confirm.select",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await
        {
            broker.report_failure(generation, &error);
            return Err(PublishError::Unavailable(format!(
                "cannot enable confirms: {error}"
            )));
        }
        *slot = Some((generation, channel.clone()));
        Ok((generation, channel))
    }

    async fn forget_channel(&self, generation: u64) {
        let mut slot = self.shared.channel.lock().await;
        if matches!(slot.as_ref(), Some((g, _)) if *g == generation) {
            *slot = None;
        }
    }
}

async fn publish_once(
    channel: &Channel,
    exchange: ShortString,
    routing_key: ShortString,
    body: &[u8],
    properties: BasicProperties,
    mandatory: bool,
    confirm_timeout: Duration,
) -> Result<(), Failure> {
    let options = BasicPublishOptions {
        mandatory,
        ..BasicPublishOptions::default()
    };
    // The frame is handed to lapin's IO loop; a connection that stopped answering must not
    // hold the publish past the confirm timeout.
    let confirm = match tokio::time::timeout(
        confirm_timeout,
        channel.basic_publish(exchange, routing_key, options, body, properties),
    )
    .await
    {
        Ok(sent) => sent.map_err(Failure::Channel)?,
        Err(_) => return Err(Failure::Final(PublishError::Timeout)),
    };
    match tokio::time::timeout(confirm_timeout, confirm).await {
        Err(_) => Err(Failure::Final(PublishError::Timeout)),
        // The connection dropped before the confirm: publishing again may duplicate the
        // message, which the consumers tolerate; losing it is not tolerable.
        Ok(Err(e)) => Err(Failure::Channel(e)),
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        Ok(Ok(Confirmation::Ack(Some(_returned)))) => Err(Failure::Final(PublishError::Unroutable)),
        Ok(Ok(Confirmation::Nack(_))) => Err(Failure::Final(PublishError::Nacked)),
        Ok(Ok(Confirmation::NotRequested)) => Err(Failure::Final(PublishError::Unavailable(
            "the channel is not in confirm mode".into(),
        ))),
    }
}

fn meta_headers(meta: &MessageMeta) -> FieldTable {
    let mut table = FieldTable::default();
    if let Some(traceparent) = &meta.traceparent {
        headers::set(
            &mut table,
            headers::TRACEPARENT,
            headers::long_string(traceparent),
        );
    }
    if let Some(subscription_id) = meta.subscription_id {
        headers::set(
            &mut table,
            headers::SUBSCRIPTION_ID,
            headers::long_string(&subscription_id.to_string()),
        );
    }
    table
}

fn properties(
    meta: &MessageMeta,
    content_type: &str,
    table: FieldTable,
) -> Result<BasicProperties, PublishError> {
    let short = |name: &str, value: &str| {
        ShortString::try_new(value).map_err(|e| {
            PublishError::Unavailable(format!("cannot publish: {name} is too long ({e})"))
        })
    };
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from(content_type))
        .with_message_id(short("message_id", &meta.message_id)?)
        .with_correlation_id(short("correlation_id", &meta.correlation_id)?)
        .with_timestamp(timestamp)
        .with_headers(table))
}
