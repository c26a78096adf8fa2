//! Listening to the domain events as an ISV's service does: a queue of the caller's own,
//! outside the topology, bound to `{p}.domain` with a routing-key pattern, and read by
//! taking what is on it. `fulfillment demo` shows what such a service receives; the system tests
//! check every event their workers publish. The caller deletes the queue
//! ([`Broker::delete_queue`]).

use std::collections::BTreeMap;

use lapin::options::{BasicGetOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::queue::broker::{Broker, QueueError, bounded, close_quietly};
use crate::queue::headers;

/// A message taken off a queue.
#[derive(Debug, Clone)]
pub struct Taken {
    pub body: Vec<u8>,
    /// Every header, as text.
    pub headers: BTreeMap<String, String>,
}

impl Broker {
    /// Declares `queue` (classic, not durable) and binds it to the domain exchange with
    /// `pattern` (`subscription.*`, `#` for all): the domain events published from now on
    /// that match it are also routed there.
    pub async fn listen_to_domain_events(
        &self,
        queue: &str,
        pattern: &str,
    ) -> Result<(), QueueError> {
        let channel = self.open_channel().await?;
        let exchange = self.topology().domain_exchange();
        let no_arguments = FieldTable::default();
        let bound = async {
            let declare = QueueDeclareOptions::default();
            bounded(
                "queue.declare",
                channel.queue_declare(queue.into(), declare, no_arguments.clone()),
            )
            .await?;
            let bind = QueueBindOptions::default();
            bounded(
                "queue.bind",
                channel.queue_bind(
                    queue.into(),
                    exchange.into(),
                    pattern.into(),
                    bind,
                    no_arguments,
                ),
            )
            .await
        }
        .await;
        close_quietly(channel, "bound");
        bound
    }

    /// Takes every message ready in `queue` off it (`basic.get`, acknowledged as taken): for
    /// a queue of the caller's own. Dead letters are read without loss by
    /// [`Broker::read_dead_letters`] instead.
    pub async fn take_all(&self, queue: &str) -> Result<Vec<Taken>, QueueError> {
        let channel = self.open_channel().await?;
        let mut taken = Vec::new();
        let get = || channel.basic_get(queue.into(), BasicGetOptions { no_ack: true });
        let read = loop {
            match bounded("basic.get", get()).await {
                Ok(Some(message)) => taken.push(Taken {
                    headers: headers::stringify(message.delivery.properties.headers().as_ref()),
                    body: message.delivery.data,
                }),
                Ok(None) => break Ok(taken),
                Err(error) => break Err(error),
            }
        };
        close_quietly(channel, "taken");
        read
    }
}
