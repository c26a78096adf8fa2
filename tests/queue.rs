//! The RabbitMQ module against the local broker (127.0.0.1:5672, or `AMQP_URL`). Each test
//! uses its own prefix and deletes its topology at the end; broker-wide commands are
//! limited to this test's own connections, because other suites share the broker.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use marketplace_fulfillment::queue::{
    Broker, InboundConsumer, InboundDelivery, InboundMessage, MessageMeta, PublishError,
    PublisherCommand, RetryOutcome, Topology,
};
use marketplace_fulfillment::settings::{AmqpSettings, Settings};
use marketplace_fulfillment::world::{rabbitmqctl, wait_until};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

fn unique_prefix() -> String {
    format!("test-{}", &Uuid::new_v4().simple().to_string()[..16])
}

/// A connection on `amqp`'s prefix (one of [`common::test_settings`]).
async fn connect(amqp: &AmqpSettings) -> Broker {
    Broker::connect(amqp, &format!("{}-test", amqp.prefix))
        .await
        .expect("connect to the local RabbitMQ")
}

fn webhook() -> InboundMessage {
    InboundMessage::Webhook {
        received_at: OffsetDateTime::now_utc(),
        payload: r#"{"id":"op-1","action":"Suspend","futureField":[1]}"#.into(),
    }
}

fn meta() -> MessageMeta {
    MessageMeta {
        message_id: Uuid::new_v4().to_string(),
        correlation_id: Uuid::new_v4().to_string(),
        traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        subscription_id: Some(Uuid::new_v4()),
    }
}

async fn next_delivery(consumer: &mut InboundConsumer) -> InboundDelivery {
    tokio::time::timeout(WAIT, consumer.next())
        .await
        .expect("a delivery within the wait")
        .expect("the consumer is open")
        .expect("a delivery, not an error")
}

async fn rabbitmqctl_json(args: &[&str]) -> Vec<Value> {
    let mut all = args.to_vec();
    all.extend(["--formatter", "json", "--quiet"]);
    let text = rabbitmqctl(&all).await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Messages ready in `queue`, as the broker counts them.
async fn messages_in(vhost: &str, queue: &str) -> u64 {
    let queues = rabbitmqctl_json(&["list_queues", "-p", vhost, "name", "messages"]).await;
    queues
        .iter()
        .find(|q| q["name"] == queue)
        .and_then(|q| q["messages"].as_u64())
        .unwrap_or_else(|| panic!("queue {queue} not listed"))
}

async fn wait_until_empty_in(vhost: &str, queue: &str) {
    let empty = || async { (messages_in(vhost, queue).await == 0).then_some(()) };
    wait_until(&format!("{queue} to empty"), WAIT, empty)
        .await
        .unwrap();
}

/// Fetches (and acks) one message from `queue` with a plain lapin channel.
async fn get_one(queue: &str) -> lapin::message::BasicGetMessage {
    let url = common::base_settings().amqp.url.expose().to_string();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let get = || async {
        let options = lapin::options::BasicGetOptions { no_ack: true };
        channel.basic_get(queue.into(), options).await.unwrap()
    };
    let message = wait_until(&format!("a message on {queue}"), WAIT, get)
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    message
}

fn header(message: &lapin::message::BasicGetMessage, key: &str) -> Option<String> {
    let value = message
        .delivery
        .properties
        .headers()
        .as_ref()?
        .inner()
        .get(key)?;
    Some(match value {
        lapin::types::AMQPValue::LongString(s) => s.to_string(),
        other => format!("{other:?}"),
    })
}

#[tokio::test]
async fn declaring_twice_is_idempotent_and_matches_the_definitions() {
    let amqp = common::test_settings().amqp;
    let first = connect(&amqp).await;
    let second = connect(&amqp).await;
    assert!(first.is_connected() && second.is_connected());

    let definitions = first.topology().definitions_json();
    let declared = rabbitmqctl_json(&["list_queues", "name", "durable", "arguments"]).await;
    let mut ours: Vec<&Value> = declared
        .iter()
        .filter(|q| {
            q["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(&format!("{}.", amqp.prefix)))
        })
        .collect();
    ours.sort_by_key(|q| q["name"].as_str().unwrap().to_string());
    let mut expected: Vec<&Value> = definitions["queues"].as_array().unwrap().iter().collect();
    expected.sort_by_key(|q| q["name"].as_str().unwrap().to_string());
    assert_eq!(ours.len(), expected.len(), "{ours:#?}");
    for (got, want) in ours.iter().zip(&expected) {
        assert_eq!(got["name"], want["name"]);
        assert_eq!(got["durable"], true, "{got}");
        assert_eq!(
            arguments_as_map(&got["arguments"]),
            want["arguments"],
            "arguments of {}",
            want["name"]
        );
    }

    let exchanges = rabbitmqctl_json(&["list_exchanges", "name", "type", "durable"]).await;
    for want in definitions["exchanges"].as_array().unwrap() {
        let got = exchanges
            .iter()
            .find(|e| e["name"] == want["name"])
            .unwrap_or_else(|| panic!("exchange {} missing", want["name"]));
        assert_eq!(got["type"], want["type"]);
        assert_eq!(got["durable"], true);
    }
    let bindings = rabbitmqctl_json(&[
        "list_bindings",
        "source_name",
        "destination_name",
        "routing_key",
    ])
    .await;
    for want in definitions["bindings"].as_array().unwrap() {
        assert!(
            bindings.iter().any(|b| b["source_name"] == want["source"]
                && b["destination_name"] == want["destination"]
                && b["routing_key"] == want["routing_key"]),
            "binding {want} missing"
        );
    }

    second.close().await;
    first.delete_topology().await.unwrap();
    first.close().await;
}

/// `rabbitmqctl` renders arguments as `{"x-queue-type":"quorum",..}` or, on some versions, as
/// a list of `[key, type, value]` triples; both become a map.
fn arguments_as_map(arguments: &Value) -> Value {
    match arguments {
        Value::Array(items) => Value::Object(
            items
                .iter()
                .map(|item| {
                    let item = item.as_array().expect("a [key, type, value] triple");
                    (
                        item[0].as_str().unwrap().to_string(),
                        item[item.len() - 1].clone(),
                    )
                })
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn the_deployed_definitions_file_is_current() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/rabbitmq/definitions.json");
    let expected = Topology::new("fulfillment").definitions_json();
    if std::env::var_os("BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text = serde_json::to_string_pretty(&expected).unwrap() + "\n";
        std::fs::write(&path, text).unwrap();
    }
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (run with BLESS=1 to write it)", path.display()));
    let actual: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        actual,
        expected,
        "{} is stale: run `BLESS=1 cargo test --test queue` and commit it",
        path.display()
    );
}

#[tokio::test]
async fn a_confirmed_publish_arrives_intact_and_an_ack_removes_it() {
    let amqp = common::test_settings().amqp;
    let broker = connect(&amqp).await;
    let publisher = broker.publisher().await.unwrap();
    let message = InboundMessage::Command {
        command_id: Uuid::new_v4(),
        subscription_id: Uuid::new_v4(),
        command: PublisherCommand::ChangePlan {
            plan_id: "gold".into(),
        },
        requested_by: "api".into(),
        requested_at: OffsetDateTime::now_utc(),
    };
    let meta = meta();
    publisher.publish_inbound(&message, &meta).await.unwrap();

    let mut consumer = broker.consume_inbound(10, "queue-test").await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta, meta);
    assert_eq!(delivery.attempt, 0);
    assert!(!delivery.redelivered);
    assert_eq!(delivery.body, message.to_json());
    assert!(matches!(
        delivery.message,
        Ok(InboundMessage::Command {
            command: PublisherCommand::ChangePlan { ref plan_id },
            ..
        }) if plan_id == "gold"
    ));
    assert_eq!(delivery.headers["x-message-type"], "command");
    assert_eq!(delivery.headers["x-attempt"], "0");
    assert_eq!(
        delivery.headers["x-subscription-id"],
        meta.subscription_id.unwrap().to_string()
    );
    assert_eq!(
        delivery.headers["traceparent"],
        meta.traceparent.clone().unwrap()
    );
    delivery.ack().await.unwrap();
    wait_until_empty_in("/", &broker.topology().inbound_queue()).await;

    broker.delete_topology().await.unwrap();
    broker.close().await;
    assert!(!broker.is_connected());
    assert!(
        tokio::time::timeout(WAIT, consumer.next())
            .await
            .unwrap()
            .is_none(),
        "a closed broker ends its consumers"
    );
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error_not_a_success() {
    let amqp = common::test_settings().amqp;
    let broker = connect(&amqp).await;
    let publisher = broker.publisher().await.unwrap();
    // The exchange stays, the only queue bound to it goes: the broker returns the message.
    let url = amqp.url.expose().to_string();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            broker.topology().inbound_queue().as_str().into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    let result = publisher.publish_inbound(&webhook(), &meta()).await;
    assert_eq!(result, Err(PublishError::Unroutable));

    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn domain_events_are_published_as_cloudevents_on_the_topic_exchange() {
    let amqp = common::test_settings().amqp;
    let broker = connect(&amqp).await;
    let publisher = broker.publisher().await.unwrap();
    // Nobody listening is fine for domain events.
    publisher
        .publish_domain_event("subscription.activated", b"{}", &meta())
        .await
        .unwrap();

    let url = amqp.url.expose().to_string();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let isv_queue = format!("{}.isv", amqp.prefix);
    channel
        .queue_declare(
            isv_queue.as_str().into(),
            lapin::options::QueueDeclareOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            isv_queue.as_str().into(),
            broker.topology().domain_exchange().as_str().into(),
            "subscription.*".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let meta = meta();
    let event = br#"{"specversion":"1.0","type":"subscription.activated"}"#;
    publisher
        .publish_domain_event("subscription.activated", event, &meta)
        .await
        .unwrap();
    let got = get_one(&isv_queue).await;
    assert_eq!(got.delivery.data, event);
    assert_eq!(
        got.delivery
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.to_string()),
        Some("application/cloudevents+json".into())
    );
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|c| c.to_string()),
        Some(meta.message_id.clone())
    );
    assert_eq!(got.delivery.properties.delivery_mode(), &Some(2));
    channel
        .queue_delete(isv_queue.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

#[tokio::test]
async fn a_failing_message_returns_through_each_retry_tier_then_dead_letters() {
    let amqp = common::test_settings().amqp;
    let delays = [Duration::from_millis(300), Duration::from_millis(600)];
    let topology = Topology::with_retry_delays(&amqp.prefix, &delays);
    let broker = Broker::connect_with_topology(&amqp, "retry-test", topology)
        .await
        .unwrap();
    let publisher = broker.publisher().await.unwrap();
    let meta = meta();
    publisher.publish_inbound(&webhook(), &meta).await.unwrap();
    let mut consumer = broker.consume_inbound(1, "").await.unwrap();

    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.attempt, 0);
    let sent = Instant::now();
    assert_eq!(
        first.retry_later("marketplace 503").await.unwrap(),
        RetryOutcome::Scheduled {
            tier: 0,
            delay: delays[0]
        }
    );

    let second = next_delivery(&mut consumer).await;
    assert!(
        sent.elapsed() >= delays[0],
        "came back before the tier's delay"
    );
    assert_eq!(second.attempt, 1);
    assert_eq!(second.meta, meta, "properties survive the retry");
    assert_eq!(second.headers["x-last-error"], "marketplace 503");
    assert_eq!(
        second.retry_later("marketplace 429").await.unwrap(),
        RetryOutcome::Scheduled {
            tier: 1,
            delay: delays[1]
        }
    );

    let third = next_delivery(&mut consumer).await;
    assert_eq!(third.attempt, 2);
    assert_eq!(
        third.retry_later("marketplace 500").await.unwrap(),
        RetryOutcome::DeadLettered
    );

    let dead = get_one(&broker.topology().dead_letter_queue()).await;
    // Three attempts were made: the first and one per tier.
    assert_eq!(
        header(&dead, "x-attempt").as_deref(),
        Some("LongLongInt(3)")
    );
    assert_eq!(
        header(&dead, "x-last-error").as_deref(),
        Some("marketplace 500")
    );
    assert_eq!(
        header(&dead, "x-failure-reason").as_deref(),
        Some("marketplace 500")
    );
    let at = header(&dead, "x-dead-lettered-at").unwrap();
    OffsetDateTime::parse(&at, &time::format_description::well_known::Rfc3339).unwrap();
    assert_eq!(
        dead.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string()),
        Some(meta.message_id.clone())
    );
    assert_eq!(dead.delivery.data, webhook_body_of(&dead.delivery.data));
    wait_until_empty_in("/", &broker.topology().inbound_queue()).await;

    consumer.cancel().await;
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

/// The dead letter still parses as the message that was published.
fn webhook_body_of(body: &[u8]) -> Vec<u8> {
    match InboundMessage::from_json(body).unwrap() {
        message @ InboundMessage::Webhook { .. } => message.to_json(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_poison_body_is_reported_and_can_be_dead_lettered_with_the_response() {
    let amqp = common::test_settings().amqp;
    let broker = connect(&amqp).await;
    let url = amqp.url.expose().to_string();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            broker.topology().work_exchange().as_str().into(),
            "inbound".into(),
            BasicPublishOptions::default(),
            b"this is not json",
            BasicProperties::default()
                .with_message_id("poison-1".into())
                .with_delivery_mode(2),
        )
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;

    let mut consumer = broker.consume_inbound(1, "poison-test").await.unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, "poison-1");
    assert_eq!(delivery.attempt, 0, "no x-attempt header counts as 0");
    assert!(delivery.message.is_err());
    delivery
        .dead_letter(
            "not an inbound message",
            Some(r#"{"status":400,"body":"bad"}"#),
        )
        .await
        .unwrap();

    let dead = get_one(&broker.topology().dead_letter_queue()).await;
    assert_eq!(dead.delivery.data, b"this is not json");
    assert_eq!(
        header(&dead, "x-failure-reason").as_deref(),
        Some("not an inbound message")
    );
    assert_eq!(
        header(&dead, "x-marketplace-response").as_deref(),
        Some(r#"{"status":400,"body":"bad"}"#)
    );
    assert_eq!(
        header(&dead, "x-attempt").as_deref(),
        Some("LongLongInt(1)"),
        "dead-lettered at its first attempt"
    );
    wait_until_empty_in("/", &broker.topology().inbound_queue()).await;

    consumer.cancel().await;
    broker.delete_topology().await.unwrap();
    broker.close().await;
}

/// A vhost of this test's own, so that `rabbitmqctl close_all_connections --vhost` hits only
/// this test's connections (other suites share the broker).
struct TestVhost {
    name: String,
}

impl TestVhost {
    async fn create(name: &str) -> Self {
        rabbitmqctl(&["add_vhost", name]).await.unwrap();
        rabbitmqctl(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
            .await
            .unwrap();
        Self { name: name.into() }
    }

    /// [`common::test_settings`] on this virtual host.
    fn settings(&self) -> AmqpSettings {
        let mut settings = common::test_settings().amqp;
        settings.url = settings.url.with_path(&format!("/{}", self.name));
        settings
    }

    async fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "--vhost",
            &self.name,
            "test: forced close",
        ])
        .await
        .unwrap();
    }

    async fn delete(self) {
        rabbitmqctl(&["delete_vhost", &self.name]).await.unwrap();
    }
}

#[tokio::test]
async fn publishing_and_consuming_resume_after_the_broker_drops_the_connection() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("marketplace_fulfillment=debug,lapin=info")
        .with_test_writer()
        .try_init();
    let vhost = TestVhost::create(&unique_prefix()).await;
    let broker = Broker::connect(&vhost.settings(), "recovery-test")
        .await
        .unwrap();
    let publisher = broker.publisher().await.unwrap();
    let mut consumer = broker.consume_inbound(5, "recovery-test").await.unwrap();
    let before = meta();
    publisher
        .publish_inbound(&webhook(), &before)
        .await
        .unwrap();
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, before.message_id);
    delivery.ack().await.unwrap();

    vhost.close_all_connections().await;

    // The same publisher, without any help: within its recovery budget.
    let after = meta();
    tokio::time::timeout(WAIT, publisher.publish_inbound(&webhook(), &after))
        .await
        .expect("the publish finishes")
        .expect("the publish succeeds after recovery");
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, after.message_id);
    delivery.ack().await.unwrap();
    assert!(broker.is_connected());
    wait_until_empty_in(&vhost.name, &broker.topology().inbound_queue()).await;

    consumer.cancel().await;
    broker.delete_topology().await.unwrap();
    broker.close().await;
    vhost.delete().await;
}

#[tokio::test]
async fn connecting_to_a_closed_port_fails_fast_and_says_how_to_start_rabbitmq() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let mut env: HashMap<String, String> = std::env::vars().collect();
    env.insert(
        "AMQP_URL".into(),
        format!("amqp://guest:s3cret-pw@127.0.0.1:{port}/%2f"),
    );
    let settings = Settings::from_sources(None, &env).unwrap().amqp;
    let start = Instant::now();
    let error = Broker::connect(&settings, "closed-port-test")
        .await
        .expect_err("nothing listens there");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    let message = error.to_string();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("rabbitmq-server -detached"), "{message}");
    assert!(!message.contains("s3cret-pw"), "{message}");
}

#[tokio::test]
async fn the_broker_replaces_a_connection_that_lapin_cannot_recover() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("marketplace_fulfillment=debug,lapin=warn")
        .with_test_writer()
        .try_init();
    let vhost = TestVhost::create(&unique_prefix()).await;
    let broker = Broker::connect(&vhost.settings(), "replace-test")
        .await
        .unwrap();
    let publisher = broker.publisher().await.unwrap();
    let mut consumer = broker.consume_inbound(5, "replace-test").await.unwrap();

    // While access is refused, lapin's reconnection fails and it gives up on the connection.
    rabbitmqctl(&["clear_permissions", "-p", &vhost.name, "guest"])
        .await
        .unwrap();
    vhost.close_all_connections().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&[
        "set_permissions",
        "-p",
        &vhost.name,
        "guest",
        ".*",
        ".*",
        ".*",
    ])
    .await
    .unwrap();

    let after = meta();
    tokio::time::timeout(WAIT, publisher.publish_inbound(&webhook(), &after))
        .await
        .expect("the publish finishes")
        .expect("the publish succeeds on a replacement connection");
    let delivery = next_delivery(&mut consumer).await;
    assert_eq!(delivery.meta.message_id, after.message_id);
    delivery.ack().await.unwrap();
    assert!(broker.is_connected());

    consumer.cancel().await;
    broker.delete_topology().await.unwrap();
    broker.close().await;
    vhost.delete().await;
}
