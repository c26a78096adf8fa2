//! The connection to RabbitMQ: connect, declare the topology, and keep a working connection
//! behind a cheap handle for the lifetime of the process.
//!
//! **One recovery mechanism, ours.** lapin's auto-recovery is off: with it, a broker restart
//! (`rabbitmqctl stop_app`/`start_app`) left channels in its `Reconnecting` state, where an
//! ack, a publish or a `wait_for_recovery` could wait forever, and a worker wedged holding
//! its whole prefetch (issue #14). Without it a lost connection fails every call on it at
//! once (acks report the delivery unusable, publishes and consumers get an error).
//!
//! A supervisor task owns the connection: it checks it every [`SUPERVISE_INTERVAL`], or at
//! once when a caller reports a failure, and replaces a dead or unresponsive connection
//! with a new one (backoff up to [`MAX_RECONNECT_DELAY`], for as long as the process runs),
//! bumping a generation number so publishers and consumers open new channels. Callers never
//! reconnect themselves; they wait for the next generation within their own deadline. Every
//! call that waits for the broker is bounded ([`OPERATION_TIMEOUT`]). No process restart is
//! ever needed.

use crate::queue::inspect::BrokerFailure;
use crate::queue::publisher::Publisher;
use crate::queue::topology::{ArgValue, ExchangeType, Topology};
use crate::settings::AmqpSettings;
use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;
use tokio::sync::{Mutex, Notify, watch};

/// How long one connection attempt (TCP + AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one call that waits for the broker's answer may take (channel open, QoS,
/// consume, cancel, ack); past it the call fails and the connection is suspect.
pub(crate) const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the supervisor looks at the connection when nobody reported a failure.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(500);
/// The longest pause between two reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(3);

/// What went wrong talking to RabbitMQ.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "cannot connect to RabbitMQ at {url}: {reason}. Is it running? Start it with \
         `rabbitmq-server -detached`, or point AMQP_URL at a running broker"
    )]
    Connect { url: String, reason: String },
    #[error(
        "RabbitMQ at {url} refused the login: {message}. Check the user and password in \
         AMQP_URL"
    )]
    AuthenticationFailed { url: String, message: String },
    #[error(
        "RabbitMQ at {url} has no such virtual host, or the user may not use it: {message}. \
         Check the vhost in AMQP_URL (`/%2f` is the default vhost)"
    )]
    VhostMissing { url: String, message: String },
    #[error(
        "RabbitMQ at {url} has no topology with the prefix {prefix:?} (missing: {}); nothing \
         was declared. {}",
        missing.join(", "),
        known_prefixes_hint(known)
    )]
    TopologyMissing {
        url: String,
        prefix: String,
        missing: Vec<String>,
        /// The prefixes the deployment's processes declared (from the database), if known.
        known: Vec<String>,
    },
    #[error(
        "cannot declare {name} on RabbitMQ: {reason} (if it exists with other arguments, \
         delete it or use another prefix)"
    )]
    Declare { name: String, reason: String },
    #[error("RabbitMQ channel error: {0}")]
    Channel(String),
    /// The broker answered a call with an error (the channel or connection closed, …).
    #[error("RabbitMQ channel error: {call}: {source}")]
    Amqp {
        call: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error(transparent)]
    Publish(#[from] crate::queue::publisher::PublishError),
    #[error("cannot acknowledge the delivery: {0} (the broker will redeliver it)")]
    Ack(#[source] AckError),
    #[error("the broker connection was closed by this process")]
    Closed,
    #[error("RabbitMQ did not answer {call} within {after:?}")]
    Unresponsive { call: &'static str, after: Duration },
}

/// Why a delivery could not be acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error("the channel it arrived on is gone (connection recovered since)")]
    ChannelGone,
    #[error("already settled, or the channel it arrived on is gone")]
    NotSettled,
    #[error(transparent)]
    Broker(Box<QueueError>),
}

fn known_prefixes_hint(known: &[String]) -> String {
    if known.is_empty() {
        "Set FULFILLMENT__AMQP__PREFIX to the prefix `serve` and `work` use".to_string()
    } else {
        format!(
            "The prefixes this deployment's processes use: {}; set FULFILLMENT__AMQP__PREFIX to one of them",
            known.join(", ")
        )
    }
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
    /// Whether (re)connecting declares the topology; read-only handles never do.
    declares: bool,
    topology: Topology,
    link: RwLock<Link>,
    /// Serialises replacement of the connection.
    reconnecting: Mutex<()>,
    closed: AtomicBool,
    publisher: Mutex<Option<Publisher>>,
    /// Announces each replacement of the connection to publishers and consumers.
    generation: watch::Sender<u64>,
    /// Wakes the supervisor when a caller saw the connection fail.
    wake: Arc<Notify>,
    /// A generation whose connection looks connected but stopped answering: the supervisor
    /// replaces it. `u64::MAX` when none.
    condemned: AtomicU64,
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
        Self::open(settings, connection_name, topology, true).await
    }

    /// Connects without declaring anything, for commands that must not create a topology
    /// (`dlq …`): when an exchange or queue of `settings.prefix` does not exist, the answer is
    /// [`QueueError::TopologyMissing`] — a mistyped prefix never yields an empty new topology.
    pub async fn connect_existing(
        settings: &AmqpSettings,
        connection_name: &str,
    ) -> Result<Broker, QueueError> {
        Self::open(
            settings,
            connection_name,
            Topology::new(&settings.prefix),
            false,
        )
        .await
    }

    async fn open(
        settings: &AmqpSettings,
        connection_name: &str,
        topology: Topology,
        declare: bool,
    ) -> Result<Broker, QueueError> {
        let url = settings.url.expose().to_string();
        let redacted_url = settings.url.redacted();
        // The prefix in the name tells operators (`rabbitmqctl list_connections
        // client_properties`, the management UI) which deployment a connection belongs to,
        // and lets `bench chaos` close only its own.
        let connection_name = connection_name_for(connection_name, topology.prefix());
        let connection = open_connection(&url, &redacted_url, &connection_name).await?;
        if declare {
            declare_topology(&connection, &topology).await?;
        } else {
            let missing = missing_topology(&connection, &topology).await;
            if !missing.is_empty() {
                let _ = bounded(
                    "connection.close",
                    connection.close(200, "no topology".into()),
                )
                .await;
                return Err(QueueError::TopologyMissing {
                    url: redacted_url,
                    prefix: topology.prefix().to_string(),
                    missing,
                    known: Vec::new(),
                });
            }
        }
        tracing::info!(url = %redacted_url, prefix = topology.prefix(), "connected to RabbitMQ");
        let wake = Arc::new(Notify::new());
        let broker = Broker {
            inner: Arc::new(BrokerInner {
                url,
                redacted_url,
                connection_name,
                topology,
                declares: declare,
                link: RwLock::new(Link {
                    generation: 0,
                    connection: Arc::new(connection),
                }),
                reconnecting: Mutex::new(()),
                closed: AtomicBool::new(false),
                publisher: Mutex::new(None),
                generation: watch::Sender::new(0),
                wake: wake.clone(),
                condemned: AtomicU64::new(u64::MAX),
            }),
        };
        tokio::spawn(supervise(Arc::downgrade(&broker.inner), wake));
        Ok(broker)
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
        let link = self.link();
        !self.is_closed() && link.connection.status().connected() && !self.is_condemned(&link)
    }

    /// Closes the connection; consumers end, publishes fail with `Unavailable`.
    pub async fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
        // Wakes consumers waiting for a recovery that will not come now, and the supervisor.
        self.inner.generation.send_modify(|_| {});
        self.inner.wake.notify_one();
        let link = self.link();
        if let Err(err) = bounded(
            "connection.close",
            link.connection.close(200, "closing".into()),
        )
        .await
        {
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

    /// Deletes one queue outside the topology (a test's own listening queue).
    pub async fn delete_queue(&self, queue: &str) -> Result<(), QueueError> {
        let channel = self.open_channel().await?;
        let deleted = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
        close_quietly(channel, "deleted");
        deleted.map(|_| ()).map_err(|e| QueueError::Declare {
            name: queue.to_string(),
            reason: format!("delete failed: {e}"),
        })
    }

    /// Messages ready in `queue` and its consumers, as RabbitMQ counts them now.
    pub async fn queue_counts(&self, queue: &str) -> Result<(u32, u32), QueueError> {
        let channel = self.open_channel().await?;
        let declared = bounded(
            "queue.declare (passive)",
            crate::queue::dead_letters::inspect_queue(&channel, queue),
        )
        .await;
        close_quietly(channel, "inspected");
        let declared = declared?;
        Ok((declared.message_count(), declared.consumer_count()))
    }

    /// Changes whenever the supervisor replaced the connection.
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

    /// A new channel on a working connection, waiting at most [`CONNECT_TIMEOUT`] for the
    /// supervisor to replace a lost one (operator commands, tests).
    pub(crate) async fn open_channel(&self) -> Result<Channel, QueueError> {
        match tokio::time::timeout(CONNECT_TIMEOUT, self.open_channel_with_generation()).await {
            Ok(opened) => opened.map(|(_, channel)| channel),
            Err(_) => Err(QueueError::Unresponsive {
                call: "a working connection",
                after: CONNECT_TIMEOUT,
            }),
        }
    }

    /// A new channel on a working connection, waiting for the supervisor to replace a lost
    /// one for as long as that takes: callers bound it with their own deadline.
    pub(crate) async fn open_channel_with_generation(&self) -> Result<(u64, Channel), QueueError> {
        let link = self.connected_link().await?;
        match bounded("channel.open", link.connection.create_channel()).await {
            Ok(channel) => Ok((link.generation, channel)),
            Err(error) => {
                self.report_failure(link.generation, &error);
                Err(error)
            }
        }
    }

    /// The current connection once it is up: at once when it is, else after the supervisor
    /// replaced it. Cancel-safe.
    pub(crate) async fn connected_link(&self) -> Result<Link, QueueError> {
        let mut generations = self.generations();
        loop {
            if self.is_closed() {
                return Err(QueueError::Closed);
            }
            let link = self.link();
            if link.connection.status().connected() && !self.is_condemned(&link) {
                return Ok(link);
            }
            self.inner.wake.notify_one();
            // The supervisor may fail to reconnect for a while; look again now and then.
            let _ = tokio::time::timeout(SUPERVISE_INTERVAL, replaced(&mut generations)).await;
        }
    }

    /// A caller's call on generation `generation` failed. A connection that still claims
    /// to be up but let a call time out is condemned: the supervisor replaces it.
    pub(crate) fn report_failure(&self, generation: u64, error: &QueueError) {
        if matches!(error, QueueError::Unresponsive { .. }) {
            self.inner.condemned.store(generation, Ordering::SeqCst);
        }
        self.inner.wake.notify_one();
    }

    fn is_condemned(&self, link: &Link) -> bool {
        self.inner.condemned.load(Ordering::SeqCst) == link.generation
    }
}

/// Owns the connection for the broker's lifetime: replaces it whenever it is lost or
/// condemned. Ends when the broker is closed or dropped.
async fn supervise(broker: Weak<BrokerInner>, wake: Arc<Notify>) {
    let mut failures: u32 = 0;
    loop {
        let pause = if failures == 0 {
            SUPERVISE_INTERVAL
        } else {
            Duration::from_millis(200)
                .saturating_mul(1 << failures.min(5))
                .min(MAX_RECONNECT_DELAY)
        };
        let _ = tokio::time::timeout(pause, wake.notified()).await;
        let Some(inner) = broker.upgrade() else {
            return;
        };
        let broker = Broker { inner };
        if broker.is_closed() {
            return;
        }
        let link = broker.link();
        if link.connection.status().connected() && !broker.is_condemned(&link) {
            failures = 0;
            continue;
        }
        match broker.replace(link.generation).await {
            Ok(_) => failures = 0,
            Err(error) => {
                failures = failures.saturating_add(1);
                tracing::warn!(error = %error, attempt = failures, "RabbitMQ reconnect failed; retrying");
            }
        }
    }
}

impl Broker {
    /// Replaces the connection of generation `seen` with a new one (one attempt), unless
    /// another call already did. Only the supervisor calls it.
    async fn replace(&self, seen: u64) -> Result<Link, QueueError> {
        let _guard = self.inner.reconnecting.lock().await;
        if self.is_closed() {
            return Err(QueueError::Closed);
        }
        let current = self.link();
        if current.generation != seen {
            return Ok(current);
        }
        let inner = &self.inner;
        let connection =
            open_connection(&inner.url, &inner.redacted_url, &inner.connection_name).await?;
        if inner.declares
            && let Err(error) = declare_topology(&connection, &inner.topology).await
        {
            let _ = tokio::time::timeout(
                OPERATION_TIMEOUT,
                connection.close(200, "declaration failed".into()),
            )
            .await;
            return Err(error);
        }
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
        // The old connection may still be open (condemned): close it, which also returns
        // its unacked deliveries to their queues.
        let old = current.connection;
        tokio::spawn(async move {
            let _ =
                tokio::time::timeout(OPERATION_TIMEOUT, old.close(200, "replaced".into())).await;
        });
        Ok(link)
    }
}

/// Closes a channel in the background (its unacked deliveries return to their queue); a
/// channel on a dead connection fails at once, an unresponsive one after the bound.
pub(crate) fn close_quietly(channel: Channel, reason: &'static str) {
    tokio::spawn(async move {
        let _ = bounded("channel.close", channel.close(200, reason.into())).await;
    });
}

/// Awaits a call that waits for the broker, at most [`OPERATION_TIMEOUT`].
pub(crate) async fn bounded<T>(
    call: &'static str,
    future: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(QueueError::Amqp { call, source }),
        Err(_) => Err(QueueError::Unresponsive {
            call,
            after: OPERATION_TIMEOUT,
        }),
    }
}

/// The `connection_name` client property: the process kind and the topology prefix, e.g.
/// `fulfillment-worker (fulfillment)`.
pub fn connection_name_for(process: &str, prefix: &str) -> String {
    format!("{process} ({prefix})")
}

/// The largest AMQP frame we offer the broker (RabbitMQ's default is 128 KiB). lapin keeps
/// a receive and a send buffer of 32 frames each per connection, zero-filled when the
/// connection opens: at 128 KiB that was 8 MiB of every process's resident memory, for
/// messages of a few KiB; at 32 KiB it is 2 MiB. A bigger body is split into frames, as
/// AMQP allows; the headers travel in one frame, and ours stay far below 32 KiB (three
/// values of at most `MAX_HEADER_VALUE_BYTES`, 4 KiB, plus ids and RabbitMQ's `x-death`).
pub const FRAME_MAX: u32 = 32 * 1024;

/// `url` with `frame_max` set to [`FRAME_MAX`] unless the URL sets it (`?frame_max=…`).
pub fn with_frame_max(url: &str) -> Result<lapin::uri::AMQPUri, String> {
    let mut uri: lapin::uri::AMQPUri = url.parse()?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Ok(uri)
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
    // A broker that is simply not there must fail fast with a clear message.
    probe_tcp(url).await.map_err(fail)?;
    // No `enable_auto_recover`: the supervisor is the one recovery mechanism (module doc).
    let properties =
        ConnectionProperties::default().with_connection_name(LongString::from(connection_name));
    let uri = with_frame_max(url).map_err(|e| fail(format!("not an AMQP URL: {e}")))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect_uri(uri, properties)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(err)) => Err(match crate::queue::inspect::classify_connect(&err) {
            BrokerFailure::AuthenticationFailed(message) => QueueError::AuthenticationFailed {
                url: redacted_url.to_string(),
                message,
            },
            BrokerFailure::VhostMissing(message) => QueueError::VhostMissing {
                url: redacted_url.to_string(),
                message,
            },
            BrokerFailure::Unreachable(reason) | BrokerFailure::Refused(reason) => fail(reason),
        }),
        Err(_) => Err(fail(format!(
            "no AMQP handshake within {CONNECT_TIMEOUT:?}"
        ))),
    }
}

pub(crate) async fn probe_tcp(url: &str) -> Result<(), String> {
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
/// as a no-op. Bounded like a connection attempt: a broker that stops answering half-way
/// fails it.
/// The exchanges and the work and dead-letter queues of `topology` the broker does not have
/// (passive declarations; nothing is created). The retry queues are not looked at: their
/// names follow the delays a deployment chose.
async fn missing_topology(connection: &Connection, topology: &Topology) -> Vec<String> {
    use crate::queue::inspect::{Presence, exchange_presence, queue_presence};
    let mut missing = Vec::new();
    for exchange in topology.exchanges() {
        if exchange_presence(connection, &exchange.name, OPERATION_TIMEOUT).await
            == Presence::Missing
        {
            missing.push(exchange.name);
        }
    }
    for queue in [topology.inbound_queue(), topology.dead_letter_queue()] {
        if queue_presence(connection, &queue, OPERATION_TIMEOUT).await == Presence::Missing {
            missing.push(queue);
        }
    }
    missing
}

async fn declare_topology(connection: &Connection, topology: &Topology) -> Result<(), QueueError> {
    match tokio::time::timeout(CONNECT_TIMEOUT, declare_each(connection, topology)).await {
        Ok(declared) => declared,
        Err(_) => Err(QueueError::Unresponsive {
            call: "the topology declaration",
            after: CONNECT_TIMEOUT,
        }),
    }
}

async fn declare_each(connection: &Connection, topology: &Topology) -> Result<(), QueueError> {
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

#[cfg(test)]
mod frame_max_tests {
    use super::{FRAME_MAX, with_frame_max};

    #[test]
    fn frame_max_is_ours_unless_the_url_sets_it() {
        let ours = with_frame_max("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(ours.query.frame_max, Some(FRAME_MAX));
        assert_eq!(ours.authority.port, 5672);
        let theirs = with_frame_max("amqp://127.0.0.1:5672/%2f?frame_max=131072").unwrap();
        assert_eq!(theirs.query.frame_max, Some(131_072));
        assert!(with_frame_max("http://not-amqp").is_err());
    }
}
