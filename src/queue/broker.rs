//! The connection to RabbitMQ: connect, declare the topology, and keep a working connection
//! behind a cheap handle for the lifetime of the process.
//!
//! Two layers of recovery. lapin's own (`enable_auto_recover`) reconnects and replays
//! channels, confirm mode, QoS and consumers; callers wait for it with
//! `Channel::wait_for_recovery` and retry. When that cannot help (recovery gave up, the error
//! is not recoverable) [`Broker::reconnect`] replaces the connection with a new one, with
//! backoff, and bumps a generation number so publishers and consumers know to open new
//! channels. No process restart is ever needed.

use crate::queue::publisher::Publisher;
use crate::queue::topology::{ArgValue, ExchangeType, Topology};
use crate::settings::AmqpSettings;
use backon::{ExponentialBuilder, Retryable};
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{Mutex, watch};

/// How long one connection attempt (TCP + AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "cannot connect to RabbitMQ at {url}: {reason}. Is it running? Start it with \
         `rabbitmq-server -detached`, or point AMQP_URL at a running broker"
    )]
    Connect { url: String, reason: String },
    #[error(
        "cannot declare {name} on RabbitMQ: {reason} (if it exists with other arguments, \
         delete it or use another prefix)"
    )]
    Declare { name: String, reason: String },
    #[error("RabbitMQ channel error: {0}")]
    Channel(String),
    #[error(transparent)]
    Publish(#[from] crate::queue::publisher::PublishError),
    #[error("cannot acknowledge the delivery: {0} (the broker will redeliver it)")]
    Ack(String),
    #[error("the broker connection was closed by this process")]
    Closed,
}

impl QueueError {
    pub(crate) fn channel(err: impl fmt::Display) -> Self {
        Self::Channel(err.to_string())
    }
}

/// A handle on the RabbitMQ connection; cheap to clone, share it.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<BrokerInner>,
}

struct BrokerInner {
    /// With the password: only for the driver.
    url: String,
    redacted_url: String,
    connection_name: String,
    topology: Topology,
    link: RwLock<Link>,
    /// Serialises replacement of the connection.
    reconnecting: Mutex<()>,
    closed: AtomicBool,
    publisher: Mutex<Option<Publisher>>,
    /// Announces each replacement of the connection to publishers and consumers.
    generation: watch::Sender<u64>,
}

#[derive(Clone)]
pub(crate) struct Link {
    pub(crate) generation: u64,
    pub(crate) connection: Arc<Connection>,
}

impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Broker")
            .field("url", &self.inner.redacted_url)
            .field("connection_name", &self.inner.connection_name)
            .field("prefix", &self.inner.topology.prefix())
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Broker {
    /// Connects (with lapin's auto-recovery on) and declares the topology of
    /// `settings.prefix` idempotently.
    pub async fn connect(
        settings: &AmqpSettings,
        connection_name: &str,
    ) -> Result<Broker, QueueError> {
        Self::connect_with_topology(settings, connection_name, Topology::new(&settings.prefix))
            .await
    }

    /// As [`Broker::connect`], with a topology of one's own (tests shorten the retry delays).
    pub async fn connect_with_topology(
        settings: &AmqpSettings,
        connection_name: &str,
        topology: Topology,
    ) -> Result<Broker, QueueError> {
        let url = settings.url.expose().to_string();
        let redacted_url = settings.url.redacted();
        // The prefix in the name tells operators (`rabbitmqctl list_connections
        // client_properties`, the management UI) which deployment a connection belongs to,
        // and lets `bench chaos` close only its own.
        let connection_name = connection_name_for(connection_name, topology.prefix());
        let connection = open_connection(&url, &redacted_url, &connection_name).await?;
        declare_topology(&connection, &topology).await?;
        tracing::info!(url = %redacted_url, prefix = topology.prefix(), "connected to RabbitMQ");
        Ok(Broker {
            inner: Arc::new(BrokerInner {
                url,
                redacted_url,
                connection_name,
                topology,
                link: RwLock::new(Link {
                    generation: 0,
                    connection: Arc::new(connection),
                }),
                reconnecting: Mutex::new(()),
                closed: AtomicBool::new(false),
                publisher: Mutex::new(None),
                generation: watch::Sender::new(0),
            }),
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    /// The publisher of this broker: one confirm-mode channel shared by all clones.
    pub async fn publisher(&self) -> Result<Publisher, QueueError> {
        let mut slot = self.inner.publisher.lock().await;
        if let Some(publisher) = slot.as_ref() {
            return Ok(publisher.clone());
        }
        let publisher = Publisher::open(self.clone()).await?;
        *slot = Some(publisher.clone());
        Ok(publisher)
    }

    /// True while the connection is up (lapin is not in the middle of a recovery). For
    /// `/readyz`.
    pub fn is_connected(&self) -> bool {
        !self.is_closed() && self.link().connection.status().connected()
    }

    /// Closes the connection; consumers end, publishes fail with `Unavailable`.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Wakes consumers waiting for a recovery that will not come now.
        self.inner.generation.send_modify(|_| {});
        let link = self.link();
        if let Err(err) = link.connection.close(200, "closing".into()).await {
            tracing::debug!(error = %err, "closing the RabbitMQ connection");
        }
    }

    /// Deletes every queue and exchange of this prefix (tests, `demo` teardown).
    pub async fn delete_topology(&self) -> Result<(), QueueError> {
        let channel = self.open_channel().await?;
        let topology = &self.inner.topology;
        for queue in topology.all_queues() {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| QueueError::Declare {
                    name: queue.clone(),
                    reason: format!("delete failed: {e}"),
                })?;
        }
        for exchange in topology.all_exchanges() {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await
                .map_err(|e| QueueError::Declare {
                    name: exchange.clone(),
                    reason: format!("delete failed: {e}"),
                })?;
        }
        let _ = channel.close(200, "done".into()).await;
        Ok(())
    }

    /// Changes whenever [`Broker::reconnect`] replaced the connection.
    pub(crate) fn generations(&self) -> watch::Receiver<u64> {
        self.inner.generation.subscribe()
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }

    pub(crate) fn link(&self) -> Link {
        self.inner
            .link
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// A new channel on the current connection; replaces the connection when it is gone
    /// for good.
    pub(crate) async fn open_channel(&self) -> Result<Channel, QueueError> {
        let (_, channel) = self.open_channel_with_generation().await?;
        Ok(channel)
    }

    pub(crate) async fn open_channel_with_generation(&self) -> Result<(u64, Channel), QueueError> {
        if self.is_closed() {
            return Err(QueueError::Closed);
        }
        let link = self.link();
        match link.connection.create_channel().await {
            Ok(channel) => Ok((link.generation, channel)),
            Err(err) => {
                tracing::warn!(error = %err, "cannot open a RabbitMQ channel; reconnecting");
                let link = self.reconnect(link.generation).await?;
                let channel = link
                    .connection
                    .create_channel()
                    .await
                    .map_err(QueueError::channel)?;
                Ok((link.generation, channel))
            }
        }
    }

    /// Replaces the connection of generation `seen` with a new one (with backoff), unless
    /// another task already did, or lapin recovered it meanwhile. Returns the current link.
    pub(crate) async fn reconnect(&self, seen: u64) -> Result<Link, QueueError> {
        let _guard = self.inner.reconnecting.lock().await;
        if self.is_closed() {
            return Err(QueueError::Closed);
        }
        let current = self.link();
        if current.generation != seen || current.connection.status().connected() {
            return Ok(current);
        }
        let inner = &self.inner;
        let connection = (|| async {
            let connection =
                open_connection(&inner.url, &inner.redacted_url, &inner.connection_name).await?;
            declare_topology(&connection, &inner.topology).await?;
            Ok::<_, QueueError>(connection)
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(6)
                .with_jitter(),
        )
        .when(|e| !matches!(e, QueueError::Declare { .. }))
        .notify(|err, delay| {
            tracing::warn!(error = %err, ?delay, "RabbitMQ reconnect failed; retrying");
        })
        .await?;
        let link = Link {
            generation: current.generation + 1,
            connection: Arc::new(connection),
        };
        *inner
            .link
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = link.clone();
        inner.generation.send_replace(link.generation);
        tracing::info!(
            url = %inner.redacted_url,
            generation = link.generation,
            "replaced the RabbitMQ connection"
        );
        // The old connection may still be retrying in lapin's IO loop: stop it.
        let old = current.connection;
        tokio::spawn(async move {
            let _ = old.close(200, "replaced".into()).await;
        });
        Ok(link)
    }
}

/// The `connection_name` client property: the process kind and the topology prefix, e.g.
/// `fulfillment-worker (fulfillment)`.
pub fn connection_name_for(process: &str, prefix: &str) -> String {
    format!("{process} ({prefix})")
}

async fn open_connection(
    url: &str,
    redacted_url: &str,
    connection_name: &str,
) -> Result<Connection, QueueError> {
    let fail = |reason: String| QueueError::Connect {
        url: redacted_url.to_string(),
        reason,
    };
    // lapin with auto-recovery retries the first TCP connect too, for a long time; a broker
    // that is simply not there must fail fast with a clear message instead.
    probe_tcp(url).await.map_err(fail)?;
    let properties = ConnectionProperties::default()
        .with_connection_name(LongString::from(connection_name))
        .enable_auto_recover()
        // lapin's default schedule (1 s doubling to 60 s, 16 times) leaves the ingress
        // answering 503 for minutes after the broker is back; reconnect sooner and let
        // `Broker::reconnect` take over when this gives up.
        .with_backoff(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                .with_max_delay(Duration::from_secs(3))
                .with_max_times(10)
                .with_jitter(),
        );
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(fail(err.to_string())),
        Err(_) => Err(fail(format!(
            "no AMQP handshake within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

async fn probe_tcp(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| "the URL has no host".to_string())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed.port().unwrap_or(if parsed.scheme() == "amqps" {
        5671
    } else {
        5672
    });
    match tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("TCP connect timed out after 5s".to_string()),
    }
}

/// Declares every exchange, queue and binding; RabbitMQ treats an identical redeclaration
/// as a no-op.
async fn declare_topology(connection: &Connection, topology: &Topology) -> Result<(), QueueError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(QueueError::channel)?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    for exchange in topology.exchanges() {
        let kind = match exchange.kind {
            ExchangeType::Direct => ExchangeKind::Direct,
            ExchangeType::Topic => ExchangeKind::Topic,
        };
        channel
            .exchange_declare(
                exchange.name.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::Declare {
                name: format!("exchange {}", exchange.name),
                reason: e.to_string(),
            })?;
    }
    for queue in topology.queues() {
        let mut arguments = FieldTable::default();
        for (key, value) in &queue.arguments {
            let value = match value {
                ArgValue::Str(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                ArgValue::Int(i) => AMQPValue::LongLongInt(*i),
            };
            arguments.insert(ShortString::from(*key), value);
        }
        channel
            .queue_declare(
                queue.name.as_str().into(),
                QueueDeclareOptions::durable(),
                arguments,
            )
            .await
            .map_err(|e| QueueError::Declare {
                name: format!("queue {}", queue.name),
                reason: e.to_string(),
            })?;
    }
    for binding in topology.bindings() {
        channel
            .queue_bind(
                binding.queue.as_str().into(),
                binding.exchange.as_str().into(),
                binding.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| QueueError::Declare {
                name: format!("binding {} -> {}", binding.exchange, binding.queue),
                reason: e.to_string(),
            })?;
    }
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// Resolves when the connection was replaced (or the broker closed). Cancel-safe.
pub(crate) async fn replaced(generations: &mut watch::Receiver<u64>) {
    if generations.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}
