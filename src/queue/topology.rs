//! The names and declaration arguments of every exchange and queue, as pure data. The broker
//! declares exactly this at startup and `deploy/rabbitmq/definitions.json` mirrors it (a test
//! fails when the file is stale), so there is one source of truth.
//!
//! ```text
//! publish ──► {p}.work (direct) ──"inbound"──► {p}.inbound (quorum) ──► workers
//!                 ▲                               │ retry_later: republish to a tier
//!                 │ TTL expiry, dead-lettered     ▼
//!                 └────────────────── {p}.inbound.retry.{1s,10s,1m,10m} (quorum, x-message-ttl)
//! dead_letter / x-delivery-limit ──► {p}.dead (direct) ──"{p}.inbound"──► {p}.inbound.dlq (quorum)
//! domain events ──► {p}.domain (topic) ──► the ISV's own queues
//! ```

use serde_json::{Value, json};
use std::time::Duration;

/// Routing key of the inbound work queue on the work exchange.
pub const INBOUND_ROUTING_KEY: &str = "inbound";

/// How often the broker may redeliver one message (a worker crashing on it, connections
/// dropping) before it dead-letters it. Our own retries republish, so they do not count.
/// <https://www.rabbitmq.com/docs/quorum-queues#poison-message-handling>
pub const INBOUND_DELIVERY_LIMIT: i64 = 20;

const DEFAULT_RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(1),
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(600),
];

/// The kind of an exchange we declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeType {
    Direct,
    Topic,
}

impl ExchangeType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Topic => "topic",
        }
    }
}

/// A declaration argument value (the subset of AMQP field values we use).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgValue {
    Str(String),
    Int(i64),
}

impl ArgValue {
    fn to_json(&self) -> Value {
        match self {
            Self::Str(s) => Value::from(s.as_str()),
            Self::Int(i) => Value::from(*i),
        }
    }
}

/// One durable exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExchangeSpec {
    pub name: String,
    pub kind: ExchangeType,
}

/// One durable queue with its `x-` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: Vec<(&'static str, ArgValue)>,
}

/// A queue bound to an exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingSpec {
    pub exchange: String,
    pub queue: String,
    pub routing_key: String,
}

/// The names and arguments for one prefix (one installation, or one test).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    retry_delays: Vec<Duration>,
}

impl Topology {
    /// The production topology: retry tiers of 1 s, 10 s, 1 min and 10 min.
    pub fn new(prefix: &str) -> Self {
        Self::with_retry_delays(prefix, &DEFAULT_RETRY_DELAYS)
    }

    /// Other retry tiers (tests shrink them to milliseconds). Each tier is its own queue
    /// because a TTL only expires messages at the head of a queue.
    ///
    /// # Panics
    /// When `delays` is empty or holds a zero delay: a topology without a delay tier is a
    /// programming error.
    pub fn with_retry_delays(prefix: &str, delays: &[Duration]) -> Self {
        assert!(!delays.is_empty(), "at least one retry delay is required");
        assert!(
            delays.iter().all(|d| d.as_millis() > 0),
            "retry delays must be at least 1 ms"
        );
        Self {
            prefix: prefix.to_string(),
            retry_delays: delays.to_vec(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `{p}.work`: direct exchange the inbound messages are published to.
    pub fn work_exchange(&self) -> String {
        format!("{}.work", self.prefix)
    }

    /// `{p}.inbound`: the quorum queue the workers consume.
    pub fn inbound_queue(&self) -> String {
        format!("{}.inbound", self.prefix)
    }

    /// `{p}.inbound.retry.{delay}` for the tier `tier` (0-based).
    ///
    /// # Panics
    /// When `tier` is not below `retry_delays().len()`.
    pub fn retry_queue(&self, tier: usize) -> String {
        format!(
            "{}.inbound.retry.{}",
            self.prefix,
            delay_label(self.retry_delays[tier])
        )
    }

    pub fn retry_delays(&self) -> &[Duration] {
        &self.retry_delays
    }

    /// `{p}.dead`: direct exchange for dead letters, routing key = the source queue's name.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// `{p}.inbound.dlq`: where inbound messages end when retries are exhausted or the
    /// failure is permanent.
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.inbound.dlq", self.prefix)
    }

    /// `{p}.domain`: topic exchange of CloudEvents for the ISV's own services.
    pub fn domain_exchange(&self) -> String {
        format!("{}.domain", self.prefix)
    }

    /// The routing key under which inbound dead letters reach the dead-letter queue.
    pub fn dead_letter_routing_key(&self) -> String {
        self.inbound_queue()
    }

    /// Every queue of this prefix: inbound, the retry tiers, the dead-letter queue.
    pub fn all_queues(&self) -> Vec<String> {
        self.queues().into_iter().map(|q| q.name).collect()
    }

    /// Every exchange of this prefix.
    pub fn all_exchanges(&self) -> Vec<String> {
        self.exchanges().into_iter().map(|e| e.name).collect()
    }

    pub fn exchanges(&self) -> Vec<ExchangeSpec> {
        vec![
            ExchangeSpec {
                name: self.work_exchange(),
                kind: ExchangeType::Direct,
            },
            ExchangeSpec {
                name: self.dead_letter_exchange(),
                kind: ExchangeType::Direct,
            },
            ExchangeSpec {
                name: self.domain_exchange(),
                kind: ExchangeType::Topic,
            },
        ]
    }

    pub fn queues(&self) -> Vec<QueueSpec> {
        let quorum = ("x-queue-type", ArgValue::Str("quorum".into()));
        // At-least-once dead-lettering: without it a quorum queue drops a message whose
        // dead-lettering fails (at-most-once is the default). It requires reject-publish.
        // https://www.rabbitmq.com/docs/quorum-queues#dead-lettering
        let at_least_once = [
            (
                "x-dead-letter-strategy",
                ArgValue::Str("at-least-once".into()),
            ),
            ("x-overflow", ArgValue::Str("reject-publish".into())),
        ];
        let mut queues = vec![QueueSpec {
            name: self.inbound_queue(),
            arguments: [
                quorum.clone(),
                (
                    "x-dead-letter-exchange",
                    ArgValue::Str(self.dead_letter_exchange()),
                ),
                (
                    "x-dead-letter-routing-key",
                    ArgValue::Str(self.dead_letter_routing_key()),
                ),
                ("x-delivery-limit", ArgValue::Int(INBOUND_DELIVERY_LIMIT)),
            ]
            .into_iter()
            .chain(at_least_once.clone())
            .collect(),
        }];
        for (tier, delay) in self.retry_delays.iter().enumerate() {
            queues.push(QueueSpec {
                name: self.retry_queue(tier),
                arguments: [
                    quorum.clone(),
                    (
                        "x-message-ttl",
                        ArgValue::Int(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX)),
                    ),
                    (
                        "x-dead-letter-exchange",
                        ArgValue::Str(self.work_exchange()),
                    ),
                    (
                        "x-dead-letter-routing-key",
                        ArgValue::Str(INBOUND_ROUTING_KEY.into()),
                    ),
                ]
                .into_iter()
                .chain(at_least_once.clone())
                .collect(),
            });
        }
        queues.push(QueueSpec {
            name: self.dead_letter_queue(),
            arguments: vec![quorum],
        });
        queues
    }

    /// Retry queues need no binding: they are published to through the default exchange.
    pub fn bindings(&self) -> Vec<BindingSpec> {
        vec![
            BindingSpec {
                exchange: self.work_exchange(),
                queue: self.inbound_queue(),
                routing_key: INBOUND_ROUTING_KEY.into(),
            },
            BindingSpec {
                exchange: self.dead_letter_exchange(),
                queue: self.dead_letter_queue(),
                routing_key: self.dead_letter_routing_key(),
            },
        ]
    }

    /// The topology in RabbitMQ's definitions format (`rabbitmqctl import_definitions`,
    /// `load_definitions`), for vhost `/`.
    pub fn definitions_json(&self) -> Value {
        let vhost = "/";
        let exchanges: Vec<Value> = self
            .exchanges()
            .into_iter()
            .map(|e| {
                json!({
                    "name": e.name,
                    "vhost": vhost,
                    "type": e.kind.as_str(),
                    "durable": true,
                    "auto_delete": false,
                    "internal": false,
                    "arguments": {},
                })
            })
            .collect();
        let queues: Vec<Value> = self
            .queues()
            .into_iter()
            .map(|q| {
                let arguments: serde_json::Map<String, Value> = q
                    .arguments
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.to_json()))
                    .collect();
                json!({
                    "name": q.name,
                    "vhost": vhost,
                    "durable": true,
                    "auto_delete": false,
                    "arguments": arguments,
                })
            })
            .collect();
        let bindings: Vec<Value> = self
            .bindings()
            .into_iter()
            .map(|b| {
                json!({
                    "source": b.exchange,
                    "vhost": vhost,
                    "destination": b.queue,
                    "destination_type": "queue",
                    "routing_key": b.routing_key,
                    "arguments": {},
                })
            })
            .collect();
        json!({
            "vhosts": [{ "name": vhost }],
            "exchanges": exchanges,
            "queues": queues,
            "bindings": bindings,
        })
    }
}

/// `1s`, `10s`, `1m`, `10m`, `1h`, or `250ms` for delays that are not whole seconds.
fn delay_label(delay: Duration) -> String {
    let ms = delay.as_millis();
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let t = Topology::new("fulfillment");
        assert_eq!(t.work_exchange(), "fulfillment.work");
        assert_eq!(t.inbound_queue(), "fulfillment.inbound");
        assert_eq!(t.dead_letter_exchange(), "fulfillment.dead");
        assert_eq!(t.dead_letter_queue(), "fulfillment.inbound.dlq");
        assert_eq!(t.domain_exchange(), "fulfillment.domain");
        let retries: Vec<String> = (0..4).map(|i| t.retry_queue(i)).collect();
        assert_eq!(
            retries,
            [
                "fulfillment.inbound.retry.1s",
                "fulfillment.inbound.retry.10s",
                "fulfillment.inbound.retry.1m",
                "fulfillment.inbound.retry.10m"
            ]
        );
        assert_eq!(t.all_queues().len(), 6);
    }

    #[test]
    fn short_test_delays_get_millisecond_labels() {
        let t =
            Topology::with_retry_delays("t", &[Duration::from_millis(250), Duration::from_secs(2)]);
        assert_eq!(t.retry_queue(0), "t.inbound.retry.250ms");
        assert_eq!(t.retry_queue(1), "t.inbound.retry.2s");
    }

    #[test]
    fn retry_tiers_expire_back_to_the_work_exchange() {
        let t = Topology::new("p");
        let defs = t.definitions_json();
        let tier = defs["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "p.inbound.retry.10s")
            .unwrap();
        assert_eq!(tier["arguments"]["x-message-ttl"], 10_000);
        assert_eq!(tier["arguments"]["x-dead-letter-exchange"], "p.work");
        assert_eq!(tier["arguments"]["x-dead-letter-routing-key"], "inbound");
        assert_eq!(tier["arguments"]["x-queue-type"], "quorum");
    }

    #[test]
    fn the_inbound_queue_dead_letters_to_its_dlq() {
        let t = Topology::new("p");
        let defs = t.definitions_json();
        let inbound = &defs["queues"][0];
        assert_eq!(inbound["name"], "p.inbound");
        assert_eq!(inbound["arguments"]["x-dead-letter-exchange"], "p.dead");
        assert_eq!(
            inbound["arguments"]["x-dead-letter-routing-key"],
            "p.inbound"
        );
        let dlq_binding = defs["bindings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["destination"] == "p.inbound.dlq")
            .unwrap();
        assert_eq!(dlq_binding["source"], "p.dead");
        assert_eq!(dlq_binding["routing_key"], "p.inbound");
    }
}
