//! RabbitMQ (lapin): the topology, the confirmed publisher and the consumers. No lapin type
//! leaves this module.
//!
//! - [`topology`]: names and declaration arguments as pure data, mirrored in
//!   `deploy/rabbitmq/definitions.json`.
//! - [`broker`]: the connection, declared topology and recovery ([`Broker`]).
//! - [`publisher`]: persistent, mandatory, confirmed publishes ([`Publisher`]); the ingress
//!   answers 200 only after a confirm.
//! - [`consumer`]: the inbound queue with manual acks ([`InboundConsumer`],
//!   [`InboundDelivery`]).
//! - [`dead_letters`]: reading, replaying and removing dead letters without loss
//!   ([`DeadLetterReader`]), for the operator CLI.
//! - [`listener`]: a queue of one's own bound to the domain exchange, as an ISV's service
//!   listens (`fulfillment demo`, the system tests).
//! - [`inspect`]: a read-only look at a broker (connect without declaring, passive checks
//!   of the topology and the queue types), for `fulfillment doctor`.
//! - [`message`]: the message contract shared by producers and consumers.
//!
//! **Retries are explicit republishes, not nack-to-DLX.** A failed delivery is republished
//! (confirmed) to the TTL queue of its tier, `{p}.inbound.retry.{delay}`, with `x-attempt`
//! incremented and `x-last-error` set, and only then acked; when the TTL expires RabbitMQ
//! dead-letters it back to `{p}.work` → `{p}.inbound`. After the last tier, or for a
//! permanent failure, it is republished to `{p}.dead` → `{p}.inbound.dlq` with the reason.
//! Owning the headers this way keeps attempt counts and errors ours (nack-to-DLX would leave
//! only RabbitMQ's `x-death`, with no error text), and a crash between the republish and the
//! ack only duplicates the message, which the worker dedupes (at-least-once everywhere).
//! The inbound queue still dead-letters to the DLQ by itself after
//! [`topology::INBOUND_DELIVERY_LIMIT`] redeliveries, for a message that crashes workers.

pub mod broker;
pub mod consumer;
pub mod dead_letters;
pub mod headers;
pub mod inspect;
pub mod listener;
pub mod message;
pub mod publisher;
pub mod topology;

pub use broker::{AckError, Broker, QueueError, connection_name_for};
pub use consumer::{InboundConsumer, InboundDelivery, RetryOutcome};
pub use dead_letters::{DeadLetter, DeadLetterReader, dead_letter_id};
pub use listener::Taken;
pub use message::{InboundMessage, InboxKey, MessageMeta, PublisherCommand};
pub use publisher::{PublishError, Publisher};
pub use topology::Topology;
