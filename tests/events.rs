//! The domain events are a contract (docs/events.md): every event type the code can emit has
//! a JSON Schema in `docs/events/`, the AsyncAPI document is generated from those schemas,
//! and the events the code builds — every kind through the worker's own CloudEvent builder,
//! and every event the demo emits — match them. (`tests/worker.rs` also checks every event
//! its system tests publish on RabbitMQ.)
//!
//! After adding or changing a schema: `BLESS=1 cargo test --test events` rewrites
//! `docs/asyncapi.yaml`.

mod common;
#[path = "common/event_schemas.rs"]
mod event_schemas;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::TestDatabase;
use event_schemas::{Contract, SCHEMA_SUFFIX, TYPE_PREFIX, schema_of, types_with_schemas};
use fulfillment_state_machine::{
    DomainEvent, DomainEventKind, Effect, PlanId, Quantity, StateName,
};
use marketplace_fulfillment::worker::effects::{cloud_event, with_onboarding};
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

const ASYNCAPI: &str = "docs/asyncapi.yaml";

/// First segments of a routing key; a string literal `"<family>.<snake_case>"` in the code
/// is taken for an event type.
const FAMILIES: [&str; 5] = ["subscription", "credential", "usage", "metering", "webhook"];

/// String literals of that shape that are not event types (settings keys, doctor checks).
const NOT_EVENT_TYPES: [&str; 4] = [
    "metering.grace_secs",
    "metering.tick_ms",
    "webhook.audiences",
    "webhook.jwks",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, found: &mut Vec<(PathBuf, String)>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push((path.clone(), std::fs::read_to_string(&path).unwrap()));
        }
    }
}

fn is_event_type(candidate: &str) -> bool {
    let mut parts = candidate.split('.');
    let family = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    FAMILIES.contains(&family)
        && !rest.is_empty()
        && rest.iter().all(|part| {
            !part.is_empty()
                && !part.starts_with('_')
                && !part.ends_with('_')
                && part.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
}

/// Every event type the code can emit: the routing keys of `DomainEventKind::ALL`, and
/// every string literal in `src/` and `state-machine/src/` shaped like one (bare, or with
/// the `com.fulfillment.` prefix), with where it was found.
fn emitted_types() -> BTreeMap<String, String> {
    let mut types: BTreeMap<String, String> = DomainEventKind::ALL
        .into_iter()
        .map(|kind| {
            (
                kind.routing_key().to_owned(),
                format!("DomainEventKind::{kind:?}"),
            )
        })
        .collect();
    let mut files = Vec::new();
    for dir in ["src", "state-machine/src"] {
        rust_files(&root().join(dir), &mut files);
    }
    for (path, text) in files {
        for (number, line) in text.lines().enumerate() {
            for literal in line.split('"').skip(1).step_by(2) {
                let candidate = literal.strip_prefix(TYPE_PREFIX).unwrap_or(literal);
                if is_event_type(candidate) && !NOT_EVENT_TYPES.contains(&candidate) {
                    let shown = path.strip_prefix(root()).unwrap().display();
                    types
                        .entry(candidate.to_owned())
                        .or_insert_with(|| format!("{shown}:{}", number + 1));
                }
            }
        }
    }
    types
}

#[test]
fn every_event_type_the_code_can_emit_has_a_schema() {
    let emitted = emitted_types();
    assert!(
        emitted.contains_key("subscription.activated"),
        "the scan found {emitted:?}"
    );
    let with_schema: BTreeSet<String> = types_with_schemas().into_iter().collect();
    let missing: Vec<String> = emitted
        .iter()
        .filter(|(event_type, _)| !with_schema.contains(*event_type))
        .map(|(event_type, at)| format!("  {event_type} ({at})"))
        .collect();
    assert!(
        missing.is_empty(),
        "event types without a schema: add docs/events/<type>{SCHEMA_SUFFIX} (copy one \
         that looks alike; `$ref` the envelope, pin `type`), then run \
         `BLESS=1 cargo test --test events` to regenerate {ASYNCAPI}:\n{}",
        missing.join("\n")
    );
    let stale: Vec<&String> = with_schema
        .iter()
        .filter(|event_type| !emitted.contains_key(*event_type))
        .collect();
    assert!(
        stale.is_empty(),
        "schemas of event types the code no longer emits (remove them, and say so in \
         docs/events.md: removing a type is a breaking change): {stale:?}"
    );
}

#[test]
fn every_schema_names_its_type_and_builds_on_the_envelope() {
    // Compiling checks each file is valid JSON Schema 2020-12 and its `$ref`s resolve.
    Contract::load();
    for event_type in types_with_schemas() {
        let schema = schema_of(&event_type);
        assert_eq!(
            schema["$schema"], "https://json-schema.org/draft/2020-12/schema",
            "{event_type}"
        );
        assert_eq!(schema["title"], event_type.as_str());
        assert_eq!(
            schema["properties"]["type"]["const"],
            format!("{TYPE_PREFIX}{event_type}"),
            "{event_type}: `type` must be pinned"
        );
        assert!(
            schema["description"].as_str().is_some_and(|d| d.len() > 20),
            "{event_type}: say what the event means and what a consumer should do"
        );
    }
}

/// A value the schema allows for `data.<field>`: its `const`, or the first of its `enum`.
fn allowed(schema: &Value, field: &str) -> Option<String> {
    let property = &schema["properties"]["data"]["properties"][field];
    property["const"]
        .as_str()
        .or_else(|| property["enum"][0].as_str())
        .map(str::to_owned)
}

fn requires_reason(schema: &Value) -> bool {
    schema["properties"]["data"]["properties"]["reason"]["type"] == "string"
}

/// Each kind the way the machine can publish it, built by the worker's CloudEvent builder.
fn built_events() -> Vec<Value> {
    let mut events = Vec::new();
    for kind in DomainEventKind::ALL {
        let schema = schema_of(kind.routing_key());
        let state: StateName = allowed(&schema, "state")
            .unwrap_or_else(|| "Subscribed".into())
            .parse()
            .unwrap();
        let reason = requires_reason(&schema).then(|| "refused by policy: at most 50 seats".into());
        let plans = [None, Some(PlanId::parse("per-seat-pro").unwrap())];
        let seats = [None, Some(Quantity::new(8).unwrap())];
        for (n, (plan_id, quantity)) in plans
            .iter()
            .flat_map(|p| seats.iter().map(move |q| (p.clone(), *q)))
            .enumerate()
        {
            let event = DomainEvent {
                kind,
                plan_id,
                quantity,
                state,
                reason: reason.clone(),
            };
            let id = format!("{}:{}", Uuid::new_v4(), n + 1);
            events.push(cloud_event(
                &id,
                Uuid::new_v4(),
                &event,
                OffsetDateTime::now_utc(),
            ));
        }
    }
    events
}

#[test]
fn every_domain_event_kind_builds_a_cloudevent_its_schema_accepts() {
    let events = built_events();
    assert_eq!(events.len(), DomainEventKind::ALL.len() * 4);
    Contract::load().assert_valid(&events);
}

#[test]
fn the_activated_event_carries_the_onboarding_answers_and_no_other_shape() {
    let contract = Contract::load();
    let mut activated = built_events()
        .into_iter()
        .find(|e| e["type"] == "com.fulfillment.subscription.activated")
        .unwrap();
    with_onboarding(&mut activated, Some(json!({})));
    assert!(activated["data"].get("onboarding").is_none(), "{activated}");
    with_onboarding(&mut activated, None);
    assert!(activated["data"].get("onboarding").is_none(), "{activated}");
    with_onboarding(&mut activated, Some(json!({"company": "Contoso Ltd"})));
    assert_eq!(activated["data"]["onboarding"]["company"], "Contoso Ltd");
    contract.validate(&activated).unwrap();
    activated["data"]["onboarding"] = json!({"seats": 5});
    assert!(contract.validate(&activated).is_err(), "a non-text answer");
}

#[test]
fn the_schemas_refuse_what_the_contract_excludes() {
    let contract = Contract::load();
    let valid = built_events()
        .into_iter()
        .find(|e| e["type"] == "com.fulfillment.subscription.change_rejected")
        .unwrap();
    contract.validate(&valid).unwrap();
    let broken = |change: &dyn Fn(&mut Value)| {
        let mut event = valid.clone();
        change(&mut event);
        contract.validate(&event)
    };
    for (what, change) in [
        (
            "an undeclared data field",
            &(|e: &mut Value| e["data"]["extra"] = json!(1)) as &dyn Fn(&mut Value),
        ),
        ("an undeclared envelope field", &|e: &mut Value| {
            e["extension"] = json!("x")
        }),
        ("a refusal without its reason", &|e: &mut Value| {
            e["data"]["reason"] = Value::Null
        }),
        ("an unknown state", &|e: &mut Value| {
            e["data"]["state"] = json!("Deleted")
        }),
        ("zero seats", &|e: &mut Value| {
            e["data"]["quantity"] = json!(0)
        }),
        ("a time that is not RFC 3339", &|e: &mut Value| {
            e["time"] = json!("yesterday")
        }),
        ("a missing subject", &|e: &mut Value| {
            e.as_object_mut().unwrap().remove("subject");
        }),
        ("a type without a schema", &|e: &mut Value| {
            e["type"] = json!("com.fulfillment.subscription.teleported")
        }),
    ] {
        assert!(broken(change).is_err(), "accepted {what}");
    }
    assert!(
        contract
            .validate_as(&valid, "subscription.reinstated")
            .is_err(),
        "a schema accepted another type than the one it pins"
    );
}

// ---- the AsyncAPI document ------------------------------------------------------------

/// A YAML scalar: JSON strings are valid YAML double-quoted scalars.
fn quoted(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// `docs/asyncapi.yaml`, generated from the schema files so the two cannot drift.
fn render_asyncapi() -> String {
    let types = types_with_schemas();
    let mut out = String::new();
    out.push_str(
        "# Generated by tests/events.rs from docs/events/*.schema.json; do not edit by hand.\n\
         # After adding or changing a schema: BLESS=1 cargo test --test events\n\
         asyncapi: 3.0.0\n\
         info:\n  \
           title: marketplace-fulfillment domain events\n  \
           version: 1.0.0\n  \
           description: >-\n    \
             Facts about Microsoft marketplace SaaS subscriptions, published by the\n    \
             fulfillment workers as CloudEvents 1.0 (structured JSON mode) on the topic\n    \
             exchange `{prefix}.domain` (`fulfillment.domain` with the default\n    \
             FULFILLMENT__AMQP__PREFIX), routing key = the event type. Delivery is at\n    \
             least once, in order per subscription; deduplicate on the CloudEvents `id`.\n    \
             Bind your own queue with a pattern such as `subscription.#`. See docs/events.md.\n  \
           license:\n    \
             name: MIT OR Apache-2.0\n\
         defaultContentType: application/cloudevents+json\n\
         servers:\n  \
           rabbitmq:\n    \
             host: localhost:5672\n    \
             protocol: amqp\n    \
             protocolVersion: 0.9.1\n    \
             description: The RabbitMQ the engine is configured with (AMQP_URL).\n\
         channels:\n",
    );
    for t in &types {
        let schema = schema_of(t);
        let description = schema["description"].as_str().unwrap_or_default();
        out.push_str(&format!(
            "  {t}:\n    \
               address: {t}\n    \
               description: {}\n    \
               messages:\n      \
                 {t}:\n        \
                   $ref: '#/components/messages/{t}'\n    \
               bindings:\n      \
                 amqp:\n        \
                   is: routingKey\n        \
                   exchange:\n          \
                     name: fulfillment.domain\n          \
                     type: topic\n          \
                     durable: true\n          \
                     autoDelete: false\n          \
                     vhost: /\n        \
                   bindingVersion: 0.3.0\n",
            quoted(description)
        ));
    }
    out.push_str("operations:\n");
    for t in &types {
        out.push_str(&format!(
            "  publish.{t}:\n    \
               action: send\n    \
               channel:\n      \
                 $ref: '#/channels/{t}'\n    \
               messages:\n      \
                 - $ref: '#/channels/{t}/messages/{t}'\n    \
               bindings:\n      \
                 amqp:\n        \
                   deliveryMode: 2\n        \
                   mandatory: false\n        \
                   bindingVersion: 0.3.0\n"
        ));
    }
    out.push_str(
        "components:\n  \
           messageTraits:\n    \
             amqpProperties:\n      \
               headers:\n        \
                 type: object\n        \
                 properties:\n          \
                   traceparent:\n            \
                     type: string\n            \
                     description: W3C trace context of the decision that produced the event.\n          \
                   x-subscription-id:\n            \
                     type: string\n            \
                     description: The SaaS subscription id (also the CloudEvents subject).\n  \
           messages:\n",
    );
    for t in &types {
        let schema = schema_of(t);
        let description = schema["description"].as_str().unwrap_or_default();
        out.push_str(&format!(
            "    {t}:\n      \
                 name: {t}\n      \
                 title: {t}\n      \
                 summary: {}\n      \
                 contentType: application/cloudevents+json\n      \
                 traits:\n        \
                   - $ref: '#/components/messageTraits/amqpProperties'\n      \
                 payload:\n        \
                   schemaFormat: application/schema+json;version=draft-2020-12\n        \
                   schema:\n          \
                     $ref: './events/{t}{SCHEMA_SUFFIX}'\n      \
                 bindings:\n        \
                   amqp:\n          \
                     messageType: {TYPE_PREFIX}{t}\n          \
                     bindingVersion: 0.3.0\n",
            quoted(description)
        ));
    }
    out
}

#[test]
fn the_asyncapi_document_is_generated_from_the_schemas_and_lists_every_type() {
    let path = root().join(ASYNCAPI);
    let expected = render_asyncapi();
    let current = std::fs::read_to_string(&path).unwrap_or_default();
    if current != expected && std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, &expected).unwrap();
    } else {
        assert!(
            current == expected,
            "{ASYNCAPI} is stale: rerun this test with BLESS=1"
        );
    }

    let document: Value = serde_norway::from_str(&expected).expect("valid YAML");
    assert_eq!(document["asyncapi"], "3.0.0");
    for t in types_with_schemas() {
        let channel = &document["channels"][t.as_str()];
        assert_eq!(channel["address"], t.as_str());
        assert_eq!(channel["bindings"]["amqp"]["exchange"]["type"], "topic");
        let message = &document["components"]["messages"][t.as_str()];
        let schema_ref = message["payload"]["schema"]["$ref"].as_str().unwrap();
        assert!(
            root().join("docs").join(schema_ref).is_file(),
            "{schema_ref} does not exist"
        );
        assert_eq!(
            document["operations"][format!("publish.{t}")]["action"],
            "send"
        );
    }
}

// ---- the demo's events -------------------------------------------------------------------

/// A `publish_domain_event` row: decision, subscription, effect, created, status, position
/// among its decision's domain events, how many.
type OutboxEvent = (Uuid, Uuid, Value, OffsetDateTime, String, i64, i64);

/// The demo runs with `--keep`; its outbox still holds every domain event its worker
/// published, and each is rebuilt with the builder the worker used (same id, same time).
#[tokio::test]
async fn the_domain_event_schemas_validate_every_event_the_demo_emits() {
    let db = TestDatabase::new();
    let env = [
        ("DATABASE_URL", db.url().expose()),
        ("FULFILLMENT__AMQP__PREFIX", &db.settings.amqp.prefix),
    ];
    let (code, stdout, stderr) = common::run_fulfillment(&["demo", "--keep"], env, false).await;
    let demo = db
        .url()
        .with_path(&format!("{}_demo", db.url().url().path()));
    let pool = PgPool::connect_lazy(demo.expose()).expect("a demo database URL");
    let rows: Result<Vec<OutboxEvent>, _> = sqlx::query_as(
        "SELECT o.event_id, o.subscription_id, o.effect, o.created_at, o.status,
                    (SELECT count(*) FROM outbox p WHERE p.event_id = o.event_id
                        AND p.kind = 'publish_domain_event' AND p.id <= o.id),
                    (SELECT count(*) FROM outbox p WHERE p.event_id = o.event_id
                        AND p.kind = 'publish_domain_event')
               FROM outbox o
              WHERE o.kind = 'publish_domain_event'
              ORDER BY o.event_sequence, o.id",
    )
    .fetch_all(&pool)
    .await;
    pool.close().await;
    marketplace_fulfillment::store::drop_database(&demo)
        .await
        .unwrap();
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let rows = rows.expect("the demo's outbox");

    let mut events = Vec::new();
    for (event_id, subscription_id, effect, created_at, status, position, total) in rows {
        assert_eq!(status, "done", "an unpublished domain event: {effect}");
        let Effect::PublishDomainEvent(event) = serde_json::from_value(effect.clone()).unwrap()
        else {
            panic!("not a domain event: {effect}");
        };
        let id = if total > 1 {
            format!("{event_id}:{position}")
        } else {
            event_id.to_string()
        };
        events.push(cloud_event(&id, subscription_id, &event, created_at));
    }
    let types: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| e["type"].as_str()?.strip_prefix(TYPE_PREFIX))
        .collect();
    println!("the demo emitted {} domain events: {types:?}", events.len());
    for expected in [
        "subscription.purchased",
        "subscription.activated",
        "subscription.quantity_changed",
        "subscription.change_rejected",
        "subscription.plan_changed",
        "subscription.suspended",
        "subscription.reinstated",
        "subscription.unsubscribed",
    ] {
        assert!(
            types.contains(expected),
            "the demo emitted no {expected}: {types:?}"
        );
    }
    Contract::load().assert_valid(&events);
}
