//! Read-only inspection of a broker for `fulfillment doctor`: connect without declaring
//! anything (unlike [`crate::queue::Broker::connect`]), then look at each exchange and
//! queue of a [`Topology`] passively.
//!
//! **Existence** is a passive `exchange.declare`/`queue.declare`: RabbitMQ answers
//! `NOT_FOUND` instead of creating it.
//!
//! **The queue type** cannot be read over AMQP 0-9-1 (a passive declare ignores and returns
//! no arguments, and the management API is not always enabled). It shows in one refusal:
//! RabbitMQ does not let a consumer under a *global* QoS limit subscribe to a quorum queue
//! (`NOT_IMPLEMENTED … does not support global qos`,
//! <https://www.rabbitmq.com/docs/quorum-queues#global-qos>). So the probe sets
//! `basic.qos(prefetch 1, global)` and asks for `basic.consume`: a quorum queue refuses it;
//! a classic queue accepts, and the probe cancels at once and closes its channel without
//! acknowledging anything, so the one message RabbitMQ may have pushed meanwhile goes back
//! to the queue. Nothing is declared, published, acknowledged or deleted. `NOT_IMPLEMENTED`
//! is a connection-level error, so each queue is probed on a connection of its own.

use std::time::Duration;

use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPHardError, AMQPSoftError};
use lapin::types::{FieldTable, LongString};
use lapin::{Connection, ConnectionProperties, ErrorKind, ExchangeKind};

use crate::queue::broker::probe_tcp;
use crate::queue::topology::Topology;
use crate::settings::AmqpSettings;

/// Why the broker could not be inspected at all, in the terms an operator fixes it in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerFailure {
    /// Nothing answers at the URL's host and port, or no AMQP handshake in time.
    Unreachable(String),
    /// The broker refused the user or password (`ACCESS_REFUSED` during the handshake).
    AuthenticationFailed(String),
    /// The URL's virtual host does not exist, or the user may not use it (`NOT_ALLOWED`).
    VhostMissing(String),
    /// Anything else the broker said.
    Refused(String),
}

/// Whether one exchange or queue exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    Declared,
    Missing,
    /// The broker answered something other than yes or no.
    Unknown(String),
}

/// A queue's type, as far as the global-QoS probe tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueKind {
    Quorum,
    /// Classic (or any type that accepts a globally limited consumer).
    NotQuorum,
    Unknown(String),
}

/// What the broker holds of one topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyInspection {
    pub exchanges: Vec<(String, Presence)>,
    /// Each queue, and its kind when it exists.
    pub queues: Vec<(String, Presence, Option<QueueKind>)>,
}

/// Connects to `settings.url` without declaring anything and inspects the production
/// topology of `settings.prefix`. Every broker call is bounded by `timeout`.
pub async fn inspect_topology(
    settings: &AmqpSettings,
    timeout: Duration,
) -> Result<TopologyInspection, BrokerFailure> {
    let topology = Topology::new(&settings.prefix);
    let connection = connect_read_only(settings, timeout).await?;
    let mut exchanges = Vec::new();
    for exchange in topology.exchanges() {
        let presence = exchange_presence(&connection, &exchange.name, timeout).await;
        exchanges.push((exchange.name, presence));
    }
    let mut queues = Vec::new();
    for queue in topology.all_queues() {
        let presence = queue_presence(&connection, &queue, timeout).await;
        let kind = match presence {
            Presence::Declared => Some(queue_kind(settings, &queue, timeout).await),
            _ => None,
        };
        queues.push((queue, presence, kind));
    }
    close(connection, timeout).await;
    Ok(TopologyInspection { exchanges, queues })
}

/// A connection that declares nothing, named `fulfillment-doctor (prefix)`.
async fn connect_read_only(
    settings: &AmqpSettings,
    timeout: Duration,
) -> Result<Connection, BrokerFailure> {
    let url = settings.url.expose();
    probe_tcp(url).await.map_err(BrokerFailure::Unreachable)?;
    let name = crate::queue::connection_name_for("fulfillment-doctor", &settings.prefix);
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    match tokio::time::timeout(timeout, Connection::connect(url, properties)).await {
        Err(_) => Err(BrokerFailure::Unreachable(format!(
            "no AMQP handshake within {timeout:?}"
        ))),
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(error)) => Err(classify_connect(&error)),
    }
}

pub(crate) fn classify_connect(error: &lapin::Error) -> BrokerFailure {
    let message = error.to_string();
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => match amqp.kind() {
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED) => {
                BrokerFailure::AuthenticationFailed(message)
            }
            AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED) => BrokerFailure::VhostMissing(message),
            _ => BrokerFailure::Refused(message),
        },
        ErrorKind::IOError(_) => BrokerFailure::Unreachable(message),
        _ => BrokerFailure::Refused(message),
    }
}

pub(crate) async fn exchange_presence(
    connection: &Connection,
    name: &str,
    timeout: Duration,
) -> Presence {
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    let probe = async {
        let channel = connection.create_channel().await?;
        let declared = channel
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await;
        if declared.is_ok() {
            let _ = channel.close(200, "inspected".into()).await;
        }
        declared
    };
    presence(tokio::time::timeout(timeout, probe).await, timeout)
}

pub(crate) async fn queue_presence(
    connection: &Connection,
    name: &str,
    timeout: Duration,
) -> Presence {
    let probe = async {
        let channel = connection.create_channel().await?;
        let declared = crate::queue::dead_letters::inspect_queue(&channel, name).await;
        if declared.is_ok() {
            let _ = channel.close(200, "inspected".into()).await;
        }
        declared.map(|_| ())
    };
    presence(tokio::time::timeout(timeout, probe).await, timeout)
}

fn presence(
    answer: Result<Result<(), lapin::Error>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Presence {
    match answer {
        Ok(Ok(())) => Presence::Declared,
        Ok(Err(error)) if is_soft(&error, AMQPSoftError::NOTFOUND) => Presence::Missing,
        Ok(Err(error)) => Presence::Unknown(error.to_string()),
        Err(_) => Presence::Unknown(format!("no answer within {timeout:?}")),
    }
}

/// The global-QoS probe (module doc), on a connection of its own.
async fn queue_kind(settings: &AmqpSettings, queue: &str, timeout: Duration) -> QueueKind {
    let connection = match connect_read_only(settings, timeout).await {
        Ok(connection) => connection,
        Err(failure) => return QueueKind::Unknown(format!("{failure:?}")),
    };
    let probe = async {
        let channel = connection.create_channel().await?;
        channel
            .basic_qos(1, BasicQosOptions { global: true })
            .await?;
        let consumer = channel
            .basic_consume(
                queue.into(),
                "fulfillment-doctor".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        // Accepted: not a quorum queue. Give back whatever was pushed (never acked).
        let _ = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await;
        let _ = channel.close(200, "inspected".into()).await;
        Ok::<_, lapin::Error>(())
    };
    let kind = match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(())) => QueueKind::NotQuorum,
        Ok(Err(error)) if is_hard(&error, AMQPHardError::NOTIMPLEMENTED) => QueueKind::Quorum,
        Ok(Err(error)) => QueueKind::Unknown(error.to_string()),
        Err(_) => QueueKind::Unknown(format!("no answer within {timeout:?}")),
    };
    close(connection, timeout).await;
    kind
}

fn is_soft(error: &lapin::Error, expected: AMQPSoftError) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(expected))
}

fn is_hard(error: &lapin::Error, expected: AMQPHardError) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Hard(expected))
}

async fn close(connection: Connection, timeout: Duration) {
    if connection.status().connected() {
        let _ = tokio::time::timeout(timeout, connection.close(200, "inspected".into())).await;
    }
}
