//! RabbitMQ (lapin): the topology, the confirmed publisher and the consumers. No lapin type
//! leaves this module.

pub mod message;

pub use message::{InboundMessage, MessageMeta, PublisherCommand};
