//! Fuzz targets, driven by proptest. cargo-fuzz needs a nightly compiler, which this project's
//! machines do not have, so each target is a property over generated inputs: arbitrary bytes,
//! arbitrary JSON and structure-aware mutations of valid inputs. One module per target; each
//! test states what must hold for every input (never a panic, never a 500, never a forged
//! token accepted, required fields enforced, …).
//!
//! `PROPTEST_CASES` sets the number of cases of every target (the defaults below keep
//! `cargo test` quick); `scripts/fuzz.sh` runs each target much longer in release mode.
//! Every crash found was fixed and kept as a `regression_…` test beside the target that found it.
//!
//! The HTTP targets drive the real router (`tower::ServiceExt::oneshot`, no socket) on a
//! state connected to the local PostgreSQL and RabbitMQ (own database and prefix, removed
//! afterwards) and to an in-process Marketplace simulator.

mod common;

use std::fmt::Debug;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Map, Value, json};

/// Runs `test` over `strategy`; `PROPTEST_CASES` overrides `default_cases`. Failures are
/// shrunk and reported with the minimal input.
fn fuzz<S>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S: Strategy,
    S::Value: Debug,
{
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default_cases);
    let config = Config {
        cases,
        // Regressions are kept as explicit tests in this file instead.
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    if let Err(error) = runner.run(&strategy, test) {
        panic!("fuzz target {name} failed: {error}");
    }
}

/// Runs a target on a thread with a large stack: debug builds of the deeply nested
/// strategies below need more than a test thread's 2 MiB to generate a case.
fn on_big_stack(target: impl FnOnce() + Send + 'static) {
    let thread = std::thread::Builder::new()
        .stack_size(64 * 1024 * 1024)
        .spawn(target)
        .expect("start the fuzz thread");
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

// ---------------------------------------------------------------------------------------
// Generators shared by the targets
// ---------------------------------------------------------------------------------------

/// A timestamp-looking string: valid RFC 3339 and near misses, extreme years and offsets.
fn timestamp_text() -> impl Strategy<Value = String> {
    let offset = prop_oneof![
        Just(String::new()),
        Just("Z".to_string()),
        Just("z".to_string()),
        (prop::bool::ANY, 0u8..=25, 0u8..=60)
            .prop_map(|(plus, h, m)| format!("{}{h:02}:{m:02}", if plus { '+' } else { '-' })),
        (
            prop::bool::ANY,
            prop::sample::select(vec![0u8, 1, 14, 23]),
            prop::sample::select(vec![0u8, 30, 59])
        )
            .prop_map(|(plus, h, m)| format!("{}{h:02}:{m:02}", if plus { '+' } else { '-' })),
    ];
    let anywhere = (
        0i32..=9999,
        0u8..=13,
        0u8..=32,
        0u8..=24,
        0u8..=60,
        0u8..=60,
    );
    // The first and last instants RFC 3339 can write, where offsets push past the range.
    let edges = (
        prop::sample::select(vec![0i32, 1, 1970, 9998, 9999]),
        prop::sample::select(vec![1u8, 12]),
        prop::sample::select(vec![1u8, 28, 31]),
        prop::sample::select(vec![0u8, 23]),
        prop::sample::select(vec![0u8, 59]),
        prop::sample::select(vec![0u8, 59, 60]),
    );
    (
        prop_oneof![anywhere, edges],
        0usize..=9,
        prop::sample::select(vec!['T', ' ', 't']),
        offset,
    )
        .prop_map(|((y, mo, d, h, mi, s), frac, sep, offset)| {
            let fraction = if frac == 0 {
                String::new()
            } else {
                format!(".{}", "1234567890".chars().take(frac).collect::<String>())
            };
            format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{fraction}{offset}")
        })
}

/// GUIDs in every spelling Microsoft or an attacker might use, and near misses.
fn guid_text() -> impl Strategy<Value = String> {
    let guid = any::<u128>().prop_map(uuid::Uuid::from_u128);
    prop_oneof![
        guid.clone().prop_map(|g| g.to_string()),
        guid.clone().prop_map(|g| g.to_string().to_uppercase()),
        guid.clone().prop_map(|g| format!(" {g} ")),
        guid.clone().prop_map(|g| format!("{{{g}}}")),
        guid.clone().prop_map(|g| g.simple().to_string()),
        guid.clone().prop_map(|g| g.urn().to_string()),
        guid.clone().prop_map(|g| g.to_string()[..35].to_string()),
        guid.prop_map(|g| format!("{g}0")),
        Just("00000000-0000-0000-0000-000000000000".to_string()),
    ]
}

/// Strings that tend to break parsers: empty, whitespace, control characters, markup,
/// huge numbers, timestamps, GUIDs, long text and arbitrary Unicode.
fn tricky_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("   ".to_string()),
        Just("\u{0}".to_string()),
        Just("gold\u{0}".to_string()),
        Just("<svg/onload=alert(1)>".to_string()),
        Just("%00%ff%".to_string()),
        Just("18446744073709551616".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("NaN".to_string()),
        Just("\u{feff}Subscribed".to_string()),
        Just("null".to_string()),
        timestamp_text(),
        guid_text(),
        "[ -~]{0,24}",
        ".{0,24}",
        "[a-z]{1,8}".prop_map(|s| s.repeat(300)),
    ]
}

/// Arbitrary JSON, with numbers at the edges and tricky strings.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        prop_oneof![Just(0.5f64), Just(1e300), Just(-0.0), Just(4294967296.0)]
            .prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
                .map(Value::Number)),
        tricky_text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((tricky_text(), inner), 0..6)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

/// Flips, inserts, deletes or overwrites bytes.
#[derive(Clone, Debug)]
enum ByteEdit {
    Flip { at: usize, bit: u8 },
    Insert { at: usize, byte: u8 },
    Delete { at: usize },
    Set { at: usize, byte: u8 },
    Truncate { at: usize },
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[],:\"\\ \t\n0-.eE+/=_%".to_vec())
    ];
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| ByteEdit::Flip { at, bit }),
        (any::<usize>(), byte.clone()).prop_map(|(at, byte)| ByteEdit::Insert { at, byte }),
        any::<usize>().prop_map(|at| ByteEdit::Delete { at }),
        (any::<usize>(), byte).prop_map(|(at, byte)| ByteEdit::Set { at, byte }),
        any::<usize>().prop_map(|at| ByteEdit::Truncate { at }),
    ]
}

fn apply_byte_edits(mut bytes: Vec<u8>, edits: &[ByteEdit]) -> Vec<u8> {
    for edit in edits {
        let len = bytes.len();
        match *edit {
            ByteEdit::Flip { at, bit } if len > 0 => bytes[at % len] ^= 1 << bit,
            ByteEdit::Insert { at, byte } => bytes.insert(at % (len + 1), byte),
            ByteEdit::Delete { at } if len > 0 => {
                bytes.remove(at % len);
            }
            ByteEdit::Set { at, byte } if len > 0 => bytes[at % len] = byte,
            ByteEdit::Truncate { at } => bytes.truncate(at % (len + 1)),
            _ => {}
        }
    }
    bytes
}

// ---------------------------------------------------------------------------------------
// Target: the webhook parser (WebhookPayload::parse), and what the worker does with it
// ---------------------------------------------------------------------------------------

mod webhook_parser {
    use super::*;
    use fulfillment_state_machine::{Policy, StateName, SubscriptionMachine};
    use marketplace_fulfillment::marketplace::WebhookPayload;
    use marketplace_fulfillment::queue::InboundMessage;
    use marketplace_fulfillment::worker::translate::translate;
    use time::OffsetDateTime;
    use uuid::Uuid;

    /// A complete webhook body as Microsoft documents it (§6.7).
    pub fn valid_payload() -> Map<String, Value> {
        let body = json!({
            "id": "7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01",
            "activityId": "0b5f2c77-2222-4e2a-8d4b-6a1c9e3f7b02",
            "publisherId": "contoso",
            "offerId": "contoso-analytics",
            "planId": "gold",
            "quantity": 5,
            "subscriptionId": "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03",
            "timeStamp": "2025-03-10T16:34:41.1370170Z",
            "action": "ChangePlan",
            "status": "InProgress",
            "operationRequestSource": "Azure",
            "subscription": {
                "id": "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03",
                "name": "Analytics - Fabrikam",
                "publisherId": "contoso",
                "offerId": "contoso-analytics",
                "planId": "silver",
                "quantity": null,
                "beneficiary": { "emailId": "admin@fabrikam.example", "objectId": "a1b2c3d4-4444-4f00-8000-00000000aa01", "tenantId": "b2c3d4e5-5555-4f00-8000-00000000bb02", "puid": "100320000ABCDEF0" },
                "purchaser": { "emailId": "admin@fabrikam.example", "objectId": "a1b2c3d4-4444-4f00-8000-00000000aa01", "tenantId": "b2c3d4e5-5555-4f00-8000-00000000bb02", "puid": "100320000ABCDEF0" },
                "allowedCustomerOperations": ["Delete", "Update", "Read"],
                "sessionMode": "None",
                "isFreeTrial": false,
                "isTest": false,
                "sandboxType": "None",
                "saasSubscriptionStatus": "Subscribed",
                "term": { "startDate": "2025-03-01T00:00:00Z", "endDate": "2025-03-31T00:00:00Z", "termUnit": "P1M", "chargeDuration": null },
                "autoRenew": true,
                "created": "2025-02-28T18:45:49.0735944Z",
                "lastModified": "2025-03-10T16:34:40.9012345Z"
            },
            "purchaseToken": null
        });
        match body {
            Value::Object(map) => map,
            _ => unreachable!(),
        }
    }

    /// The keys a mutation may touch: the payload's own and its snapshot's.
    fn known_key() -> impl Strategy<Value = String> {
        prop::sample::select(valid_payload().keys().cloned().collect::<Vec<_>>())
    }

    fn nested_key() -> impl Strategy<Value = String> {
        let subscription = valid_payload()["subscription"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect::<Vec<_>>();
        prop::sample::select(subscription)
    }

    /// A value for a known field: the right shape with odd content, or another shape.
    fn field_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            3 => tricky_text().prop_map(Value::String),
            2 => timestamp_text().prop_map(Value::String),
            2 => guid_text().prop_map(Value::String),
            2 => json_value(),
            1 => any::<u32>().prop_map(Value::from),
            1 => Just(Value::Null),
        ]
    }

    #[derive(Clone, Debug)]
    pub enum Mutation {
        Remove(String),
        Replace(String, Value),
        ReplaceNested(String, Value),
        /// An unknown field; the name never trims to a known one.
        AddUnknown(String, Value),
        /// `"id"` becomes `"id  "` (doc samples do this).
        PadKey(String),
    }

    pub fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            1 => known_key().prop_map(Mutation::Remove),
            4 => (known_key(), field_value()).prop_map(|(k, v)| Mutation::Replace(k, v)),
            2 => (nested_key(), field_value()).prop_map(|(k, v)| Mutation::ReplaceNested(k, v)),
            2 => ("[a-zA-Z]{1,12}", json_value())
                .prop_map(|(k, v)| Mutation::AddUnknown(format!("x-{k}"), v)),
            1 => known_key().prop_map(Mutation::PadKey),
        ]
    }

    pub fn apply(mut map: Map<String, Value>, mutations: &[Mutation]) -> Map<String, Value> {
        for mutation in mutations {
            match mutation {
                Mutation::Remove(key) => {
                    map.remove(key);
                }
                Mutation::Replace(key, value) => {
                    map.insert(key.clone(), value.clone());
                }
                Mutation::ReplaceNested(key, value) => {
                    if let Some(Value::Object(subscription)) = map.get_mut("subscription") {
                        subscription.insert(key.clone(), value.clone());
                    }
                }
                Mutation::AddUnknown(key, value) => {
                    map.insert(key.clone(), value.clone());
                }
                Mutation::PadKey(key) => {
                    if let Some(value) = map.remove(key) {
                        map.insert(format!("{key}  "), value);
                    }
                }
            }
        }
        map
    }

    /// The value of a top-level field after the parser's key trimming (an exact key wins).
    fn field<'a>(map: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
        map.get(name)
            .or_else(|| map.iter().find(|(k, _)| k.trim() == name).map(|(_, v)| v))
    }

    /// Whether the parser must accept `map`: GUID `id` and `subscriptionId`, a non-blank
    /// string `action`; every other field is optional and lenient.
    pub fn must_accept(map: &Map<String, Value>) -> bool {
        let guid =
            |name| matches!(field(map, name), Some(Value::String(s)) if Uuid::parse_str(s).is_ok());
        let action = matches!(field(map, "action"), Some(Value::String(s)) if !s.trim().is_empty());
        guid("id") && guid("subscriptionId") && action
    }

    /// What the worker does with an accepted body: translate it into a machine event and
    /// feed it to a fresh machine and to an active one; the machine must survive a JSON
    /// round trip afterwards.
    pub fn through_the_worker(body: &[u8]) -> Result<(), TestCaseError> {
        let Ok(text) = std::str::from_utf8(body) else {
            return Ok(());
        };
        let message = InboundMessage::Webhook {
            received_at: OffsetDateTime::now_utc(),
            payload: text.to_owned(),
        };
        let translated = translate(&message)
            .map_err(|e| TestCaseError::fail(format!("parsed but not translated: {e}")))?;
        let now = OffsetDateTime::now_utc();
        let policy = Policy::default();
        let mut fresh = SubscriptionMachine::new(translated.subscription_id);
        fresh.handle(&translated.event, now, &policy);
        let mut active = active_machine(translated.subscription_id);
        active.handle(&translated.event, now, &policy);
        for machine in [fresh, active] {
            let stored = serde_json::to_value(&machine)
                .map_err(|e| TestCaseError::fail(format!("machine not serializable: {e}")))?;
            let restored: SubscriptionMachine = serde_json::from_value(stored)
                .map_err(|e| TestCaseError::fail(format!("machine not restorable: {e}")))?;
            prop_assert_eq!(restored, machine);
        }
        Ok(())
    }

    /// A machine that went through purchase and activation.
    fn active_machine(id: fulfillment_state_machine::SubscriptionId) -> SubscriptionMachine {
        use fulfillment_state_machine::{Event, MarketplaceStatus, Snapshot};
        let mut machine = SubscriptionMachine::new(id);
        let now = OffsetDateTime::now_utc();
        let policy = Policy::default();
        machine.handle(
            &Event::PurchaseResolved {
                snapshot: Snapshot::with_status(MarketplaceStatus::PendingFulfillmentStart),
                resolved_at: now,
            },
            now,
            &policy,
        );
        machine.handle(
            &Event::ActivationConfirmed {
                term: None,
                confirmed_at: now,
            },
            now,
            &policy,
        );
        assert_eq!(machine.state(), StateName::Subscribed);
        machine
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_parser() {
        on_big_stack(|| {
            let bytes = prop_oneof![
                prop::collection::vec(any::<u8>(), 0..512),
                // Mostly JSON punctuation, so the parser gets past the first byte.
                prop::collection::vec(
                    prop::sample::select(b"{}[]\",:0123456789.eE-+ \ntrue false null\\u".to_vec()),
                    0..256
                ),
            ];
            fuzz("webhook_parser::bytes", 2000, bytes, |bytes| {
                if let Ok(payload) = WebhookPayload::parse(&bytes) {
                    prop_assert!(!payload.action.trim().is_empty());
                    through_the_worker(&bytes)?;
                }
                Ok(())
            });
        });
    }

    #[test]
    fn arbitrary_json_is_accepted_only_with_the_required_fields() {
        on_big_stack(|| {
            fuzz("webhook_parser::json", 1000, json_value(), |value| {
                let body = serde_json::to_vec(&value).unwrap();
                let parsed = WebhookPayload::parse(&body);
                let expected = match &value {
                    Value::Object(map) => must_accept(map),
                    _ => false,
                };
                prop_assert_eq!(parsed.is_ok(), expected, "{}", value);
                if parsed.is_ok() {
                    through_the_worker(&body)?;
                }
                Ok(())
            });
        });
    }

    #[test]
    fn mutated_valid_payloads_enforce_required_fields_and_tolerate_the_rest() {
        on_big_stack(|| {
            let strategy = (
                prop::collection::vec(mutation(), 1..6),
                prop::bool::ANY,
                prop::bool::ANY,
            );
            fuzz(
                "webhook_parser::mutated",
                1000,
                strategy,
                |(mutations, pretty, trailing_comma)| {
                    let map = apply(valid_payload(), &mutations);
                    let mut body = if pretty {
                        serde_json::to_vec_pretty(&map).unwrap()
                    } else {
                        serde_json::to_vec(&map).unwrap()
                    };
                    if trailing_comma && body.last() == Some(&b'}') && !map.is_empty() {
                        // Doc samples carry trailing commas; the parser tolerates them.
                        body.pop();
                        body.extend_from_slice(b",}");
                    }
                    let parsed = WebhookPayload::parse(&body);
                    prop_assert_eq!(
                        parsed.is_ok(),
                        must_accept(&map),
                        "{}: {:?}",
                        String::from_utf8_lossy(&body),
                        parsed.as_ref().err()
                    );
                    let Ok(payload) = parsed else {
                        return Ok(());
                    };
                    // The required fields are read exactly as sent.
                    let guid = |name| match field(&map, name) {
                        Some(Value::String(s)) => Uuid::parse_str(s).ok(),
                        _ => None,
                    };
                    prop_assert_eq!(Some(payload.id), guid("id"));
                    prop_assert_eq!(Some(payload.subscription_id), guid("subscriptionId"));
                    prop_assert_eq!(
                        Some(&Value::String(payload.action.clone())),
                        field(&map, "action")
                    );
                    // Unknown fields change nothing that was understood.
                    let known: Map<String, Value> = map
                        .iter()
                        .filter(|(k, _)| !k.starts_with("x-"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect();
                    let without_unknown =
                        WebhookPayload::parse(&serde_json::to_vec(&known).unwrap()).unwrap();
                    prop_assert_eq!(&without_unknown, &payload);
                    through_the_worker(&body)
                },
            );
        });
    }

    #[test]
    fn byte_edits_of_valid_payloads_never_panic() {
        on_big_stack(|| {
            let strategy = prop::collection::vec(byte_edit(), 1..8);
            let valid = serde_json::to_vec(&valid_payload()).unwrap();
            fuzz("webhook_parser::byte_edits", 2000, strategy, |edits| {
                let body = apply_byte_edits(valid.clone(), &edits);
                if let Ok(payload) = WebhookPayload::parse(&body) {
                    prop_assert!(!payload.action.trim().is_empty());
                    through_the_worker(&body)?;
                }
                Ok(())
            });
        });
    }

    /// The lenient timestamp parser behind `timeStamp` and the snapshot's dates.
    #[test]
    fn timestamps_in_every_date_field_never_panic() {
        on_big_stack(|| {
            let strategy = prop::collection::vec(timestamp_text(), 5);
            fuzz("webhook_parser::timestamps", 2000, strategy, |stamps| {
                let mut map = valid_payload();
                map.insert("timeStamp".into(), json!(stamps[0]));
                let subscription = map["subscription"].as_object_mut().unwrap();
                subscription.insert("created".into(), json!(stamps[1]));
                subscription.insert("lastModified".into(), json!(stamps[2]));
                subscription["term"]["startDate"] = json!(stamps[3]);
                subscription["term"]["endDate"] = json!(stamps[4]);
                let body = serde_json::to_vec(&map).unwrap();
                let payload = WebhookPayload::parse(&body)
                    .map_err(|e| TestCaseError::fail(format!("dates are optional: {e}")))?;
                if let Some(at) = payload.time_stamp {
                    prop_assert_eq!(at.offset(), time::UtcOffset::UTC);
                }
                through_the_worker(&body)
            });
        });
    }

    /// Found by `timestamps_in_every_date_field_never_panic`: converting a valid RFC 3339
    /// instant near the end of year 9999 with a negative offset to UTC overflowed the
    /// `time` range and panicked (a 500 at the ingress, a crashed worker task).
    #[test]
    fn regression_a_timestamp_past_year_9999_in_utc_is_treated_as_absent() {
        for stamp in [
            "9999-12-31T23:59:59-23:59",
            "9999-12-31T23:00:00.5-01:00",
            "9999-12-31 23:30:00-00:31",
        ] {
            let body = format!(
                r#"{{"id":"{}","subscriptionId":"{}","action":"Renew","timeStamp":"{stamp}","subscription":{{"id":"{}","created":"{stamp}"}}}}"#,
                Uuid::nil(),
                Uuid::nil(),
                Uuid::nil()
            );
            let payload = WebhookPayload::parse(body.as_bytes()).unwrap();
            assert_eq!(payload.time_stamp, None, "{stamp}");
            assert_eq!(payload.subscription.unwrap().created, None, "{stamp}");
        }
        // The other end: the earliest instant with a positive offset is still before 0000.
        let body = format!(
            r#"{{"id":"{}","subscriptionId":"{}","action":"Renew","timeStamp":"0000-01-01T00:00:00+23:59"}}"#,
            Uuid::nil(),
            Uuid::nil()
        );
        assert_eq!(
            WebhookPayload::parse(body.as_bytes()).unwrap().time_stamp,
            None
        );
    }

    #[test]
    fn deeply_nested_bodies_are_refused_without_overflowing_the_stack() {
        on_big_stack(|| {
            for depth in [100, 200, 10_000, 100_000] {
                let body = format!(
                    r#"{{"id":"{}","subscriptionId":"{}","action":"Renew","x":{}{}}}"#,
                    Uuid::nil(),
                    Uuid::nil(),
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                let parsed = WebhookPayload::parse(body.as_bytes());
                // serde_json stops at 128 levels; below that the body is fine.
                assert_eq!(parsed.is_ok(), depth < 127, "depth {depth}");
            }
        });
    }
}

// ---------------------------------------------------------------------------------------
// Target: the webhook JWT verification path
// ---------------------------------------------------------------------------------------

mod jwt {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE, URL_SAFE_NO_PAD};
    use marketplace_fulfillment::http::auth::{
        AuthError, MAX_TOKEN_BYTES, WebhookAuthConfig, WebhookVerifier,
    };
    use marketplace_fulfillment::settings::MARKETPLACE_APP_ID;
    use marketplace_fulfillment::simulator::RunningSimulator;
    use time::OffsetDateTime;
    use tokio::runtime::Runtime;
    use uuid::Uuid;

    struct Fixture {
        runtime: Runtime,
        sim: RunningSimulator,
        verifier: WebhookVerifier,
        genuine: String,
    }

    impl Fixture {
        fn new() -> Self {
            let runtime = Runtime::new().unwrap();
            let sim = runtime.block_on(crate::common::simulator(|_| {}));
            let settings = crate::common::simulator_settings(&sim, &[]).marketplace;
            let config = WebhookAuthConfig::from_settings(&settings, None).unwrap();
            let verifier = WebhookVerifier::new(config, reqwest::Client::new());
            let genuine = sim.mint_webhook_token(json!({})).unwrap();
            let fixture = Self {
                runtime,
                sim,
                verifier,
                genuine,
            };
            // The genuine token verifies, so every rejection below is the mutation's doing.
            fixture
                .verify(&format!("Bearer {}", fixture.genuine))
                .expect("the genuine token verifies");
            fixture
        }

        fn verify(&self, header: &str) -> Result<(), AuthError> {
            self.runtime
                .block_on(self.verifier.verify(Some(header)))
                .map(|_| ())
        }

        /// The property of every target here: only the genuine token is ever accepted.
        fn check_token(&self, token: &str) -> Result<(), TestCaseError> {
            self.check_header(&format!("Bearer {token}"), token, true)
        }

        /// `well_formed`: the header is `Bearer <token>`, so the genuine token must pass.
        fn check_header(
            &self,
            header: &str,
            token: &str,
            well_formed: bool,
        ) -> Result<(), TestCaseError> {
            match self.verify(header) {
                Ok(()) => {
                    prop_assert_eq!(token.trim(), self.genuine.as_str(), "accepted a forgery");
                    Ok(())
                }
                Err(error) => {
                    prop_assert!(!error.is_unavailable(), "the JWKS is up, yet {:?}", error);
                    prop_assert!(
                        !well_formed || token.trim() != self.genuine,
                        "refused the genuine token"
                    );
                    Ok(())
                }
            }
        }
    }

    #[derive(Clone, Debug)]
    enum TokenEdit {
        /// A byte edit of the compact token text.
        Text(ByteEdit),
        /// A bit flip inside the decoded header (0), payload (1) or signature (2), re-encoded.
        Decoded { segment: usize, at: usize, bit: u8 },
        /// A segment re-encoded with padding, the standard alphabet, or whitespace.
        Reencode { segment: usize, how: u8 },
        /// A segment replaced by the same segment of another (also genuine) token.
        Splice { segment: usize },
        /// Segments dropped or duplicated.
        Segments { keep: usize },
    }

    fn token_edit() -> impl Strategy<Value = TokenEdit> {
        prop_oneof![
            3 => byte_edit().prop_map(TokenEdit::Text),
            3 => (0usize..3, any::<usize>(), 0u8..8)
                .prop_map(|(segment, at, bit)| TokenEdit::Decoded { segment, at, bit }),
            1 => (0usize..3, 0u8..4).prop_map(|(segment, how)| TokenEdit::Reencode { segment, how }),
            1 => (0usize..3).prop_map(|segment| TokenEdit::Splice { segment }),
            1 => (0usize..6).prop_map(|keep| TokenEdit::Segments { keep }),
        ]
    }

    fn apply(other: &str, token: &str, edit: &TokenEdit) -> String {
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        match edit {
            TokenEdit::Text(edit) => {
                let bytes = apply_byte_edits(token.as_bytes().to_vec(), std::slice::from_ref(edit));
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            TokenEdit::Decoded { segment, at, bit } => {
                if let Some(part) = parts.get_mut(*segment)
                    && let Ok(mut bytes) = URL_SAFE_NO_PAD.decode(part.as_bytes())
                    && !bytes.is_empty()
                {
                    let len = bytes.len();
                    bytes[at % len] ^= 1 << bit;
                    *part = URL_SAFE_NO_PAD.encode(bytes);
                }
            }
            TokenEdit::Reencode { segment, how } => {
                if let Some(part) = parts.get_mut(*segment)
                    && let Ok(bytes) = URL_SAFE_NO_PAD.decode(part.as_bytes())
                {
                    *part = match how {
                        0 => URL_SAFE.encode(&bytes),
                        1 => STANDARD.encode(&bytes),
                        2 => format!(" {part}"),
                        _ => format!("{part}\t"),
                    };
                }
            }
            TokenEdit::Splice { segment } => {
                let theirs: Vec<&str> = other.split('.').collect();
                if let (Some(part), Some(their)) = (parts.get_mut(*segment), theirs.get(*segment)) {
                    *part = (*their).to_owned();
                }
            }
            TokenEdit::Segments { keep } => {
                let mut next = parts.clone();
                next.resize(*keep, parts.last().cloned().unwrap_or_default());
                parts = next;
            }
        }
        parts.join(".")
    }

    #[test]
    fn mutated_genuine_tokens_are_never_accepted() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            // A second genuine token with other claims, for splicing its segments in.
            let other = fixture
                .sim
                .mint_webhook_token(json!({ "aud": "someone-else", "jti": "x" }))
                .unwrap();
            let strategy = prop::collection::vec(token_edit(), 1..4);
            fuzz("jwt::mutated", 1000, strategy, |edits| {
                let mut token = fixture.genuine.clone();
                for edit in &edits {
                    token = apply(&other, &token, edit);
                }
                fixture.check_token(&token)
            });
        });
    }

    #[test]
    fn random_segments_and_headers_are_never_accepted() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let genuine: Vec<String> = fixture.genuine.split('.').map(str::to_owned).collect();
            let header = (
                prop::option::of(tricky_text()),
                prop::option::of(json_value()),
                prop::option::of(json_value()),
            )
                .prop_map(|(kid, alg, extra)| {
                    let mut header = Map::new();
                    header.insert("alg".into(), alg.unwrap_or(json!("RS256")));
                    if let Some(kid) = kid {
                        header.insert("kid".into(), Value::String(kid));
                    }
                    if let Some(extra) = extra {
                        header.insert("x5t".into(), extra);
                    }
                    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).unwrap())
                });
            let segment = prop::collection::vec(any::<u8>(), 0..300)
                .prop_map(|bytes| URL_SAFE_NO_PAD.encode(bytes));
            let strategy = prop_oneof![
                (segment.clone(), segment.clone(), segment.clone())
                    .prop_map(|(a, b, c)| format!("{a}.{b}.{c}")),
                header.prop_map(move |h| format!("{h}.{}.{}", genuine[1], genuine[2])),
                "[A-Za-z0-9_.-]{0,600}",
            ];
            fuzz("jwt::random", 1000, strategy, |token| {
                fixture.check_token(&token)
            });
        });
    }

    #[test]
    fn arbitrary_authorization_headers_are_never_accepted() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let genuine = fixture.genuine.clone();
            let strategy = prop_oneof![
                ".{0,200}",
                (".{0,8}", ".{0,8}").prop_map(move |(a, b)| format!("{a}Bearer{b}{genuine}")),
                (
                    prop::sample::select(vec![
                        "Bearer", "bearer", "BEARER", "Basic", "Bearer:", ""
                    ]),
                    prop::sample::select(vec![" ", "  ", "\t", ""]),
                    tricky_text()
                )
                    .prop_map(|(scheme, space, token)| format!("{scheme}{space}{token}")),
            ];
            fuzz("jwt::headers", 1000, strategy, |header| {
                let token = header
                    .trim()
                    .split_once(' ')
                    .map(|(_, t)| t.to_owned())
                    .unwrap_or_default();
                fixture.check_header(&header, &token, false)
            });
        });
    }

    #[test]
    fn huge_tokens_are_refused_as_malformed() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let strategy = (0usize..3, 1usize..(4 * MAX_TOKEN_BYTES));
            fuzz("jwt::huge", 64, strategy, |(segment, extra)| {
                let mut parts: Vec<String> =
                    fixture.genuine.split('.').map(str::to_owned).collect();
                parts[segment].push_str(&"A".repeat(extra));
                let token = parts.join(".");
                let result = fixture.verify(&format!("Bearer {token}"));
                prop_assert!(result.is_err());
                if token.len() > MAX_TOKEN_BYTES {
                    prop_assert_eq!(result.unwrap_err(), AuthError::Malformed);
                }
                Ok(())
            });
        });
    }

    /// Claims signed with the genuine key (as if the signing key were used for another
    /// purpose): accepted only when every claim check passes.
    #[test]
    fn well_signed_tokens_with_mutated_claims_are_accepted_only_when_every_claim_is_right() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let base = {
                let payload = fixture.genuine.split('.').nth(1).unwrap();
                let claims: Value =
                    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
                claims.as_object().unwrap().clone()
            };
            let keys: Vec<String> = base.keys().cloned().collect();
            let value = prop_oneof![
                3 => json_value(),
                1 => guid_text().prop_map(Value::String),
                1 => Just(json!(MARKETPLACE_APP_ID)),
                1 => Just(json!(fixture.sim.config().client_id.to_string())),
                1 => Just(json!(fixture.sim.config().tenant_id.to_string())),
                1 => Just(json!(format!("https://sts.windows.net/{}/", fixture.sim.config().tenant_id))),
                1 => any::<i64>().prop_map(Value::from),
            ];
            let edit = (prop::sample::select(keys), prop::option::of(value));
            let strategy = prop::collection::vec(edit, 1..4);
            let tenant = fixture.sim.config().tenant_id;
            let client = fixture.sim.config().client_id;
            fuzz("jwt::claims", 500, strategy, |edits| {
                let mut claims = base.clone();
                for (key, value) in &edits {
                    match value {
                        Some(value) => claims.insert(key.clone(), value.clone()),
                        None => claims.remove(key),
                    };
                }
                let token = fixture
                    .sim
                    .sign_token(&Value::Object(claims.clone()))
                    .unwrap();
                if fixture.verify(&format!("Bearer {token}")).is_ok() {
                    prop_assert!(
                        claims_are_right(&claims, &fixture, tenant, client),
                        "accepted {:?}",
                        claims
                    );
                }
                Ok(())
            });
        });
    }

    /// The checks of §6.6, written independently of the verifier.
    fn claims_are_right(
        claims: &Map<String, Value>,
        fixture: &Fixture,
        tenant: Uuid,
        client: Uuid,
    ) -> bool {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let leeway = 5 * 60;
        let audiences = [client.to_string(), format!("api://{client}")];
        let aud_ok = |s: &str| audiences.iter().any(|a| a.eq_ignore_ascii_case(s));
        let aud = match claims.get("aud") {
            Some(Value::String(s)) => aud_ok(s),
            Some(Value::Array(items)) => items.iter().any(|v| v.as_str().is_some_and(aud_ok)),
            _ => false,
        };
        let guid_is = |name: &str, expected: Uuid| {
            claims
                .get(name)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::try_parse(s).ok())
                == Some(expected)
        };
        let iss = claims.get("iss").and_then(Value::as_str);
        let v1 = iss == Some(&format!("https://sts.windows.net/{tenant}/"));
        let v2 = iss == Some(&format!("https://login.microsoftonline.com/{tenant}/v2.0"))
            || iss == Some(&fixture.sim.v2_issuer());
        let marketplace: Uuid = MARKETPLACE_APP_ID.parse().unwrap();
        let app = (v1 && guid_is("appid", marketplace)) || (v2 && guid_is("azp", marketplace));
        let number = |name: &str| claims.get(name).and_then(Value::as_f64);
        let exp = number("exp").is_some_and(|exp| exp + leeway as f64 >= now as f64);
        let nbf = number("nbf").is_some_and(|nbf| nbf - leeway as f64 <= now as f64);
        aud && guid_is("tid", tenant) && (v1 || v2) && app && exp && nbf
    }
}

// ---------------------------------------------------------------------------------------
// The router on real services, for the HTTP targets
// ---------------------------------------------------------------------------------------

mod router_fixture {
    use super::*;
    use axum::Router;
    use axum::body::{Body, Bytes};
    use axum::http::{HeaderMap, Request, StatusCode};
    use http_body_util::BodyExt;
    use marketplace_fulfillment::http::{AppState, router};
    use marketplace_fulfillment::settings::Settings;
    use marketplace_fulfillment::simulator::{SimulatorConfig, Timings};
    use marketplace_fulfillment::world::{World, WorldOptions};
    use secrecy::SecretString;
    use tokio::runtime::Runtime;
    use tower::ServiceExt;

    pub const API_KEY: &str = "fuzz-entitlement-k3y";

    /// The ingress's router on a [`World`] of its own (database, topology, simulator),
    /// called without a socket.
    pub struct Fixture {
        pub world: World,
        pub state: AppState,
        pub router: Router,
        /// Dropped last: the world's connections close on it.
        pub runtime: Runtime,
    }

    impl std::ops::Deref for Fixture {
        type Target = World;
        fn deref(&self) -> &World {
            &self.world
        }
    }

    pub struct Answer {
        pub status: StatusCode,
        pub headers: HeaderMap,
        pub body: Bytes,
    }

    impl Answer {
        pub fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }

        /// A JSON error body as [`marketplace_fulfillment::http::ApiError`] writes it.
        pub fn is_json_error(&self) -> bool {
            let json_type = self
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            let body: Option<Value> = serde_json::from_slice(&self.body).ok();
            json_type && body.is_some_and(|b| b["error"].is_string() && b["message"].is_string())
        }
    }

    impl Fixture {
        pub fn new() -> Self {
            let runtime = Runtime::new().unwrap();
            let (world, state) = runtime.block_on(async {
                let mut base = common::base_settings();
                base.ingress.api_key = Some(SecretString::from(API_KEY));
                let configure = Box::new(|_: &mut Settings, config: &mut SimulatorConfig| {
                    config.timings = Timings::fast();
                    Ok(())
                });
                let options = WorldOptions {
                    configure,
                    ..WorldOptions::bare("test")
                };
                let world = World::start(&base, options).await.expect("the world");
                let state = AppState::from_settings(&world.settings)
                    .await
                    .expect("state");
                (world, state)
            });
            let router = router(state.clone());
            Self {
                runtime,
                world,
                state,
                router,
            }
        }

        pub fn send(&self, request: Request<Body>) -> Answer {
            self.runtime.block_on(async {
                let response = self.router.clone().oneshot(request).await.unwrap();
                let (parts, body) = response.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body,
                }
            })
        }

        /// Removes the test's queues and exchanges (the database goes with `_db`); also
        /// what dropping the fixture does, so a failing target leaves nothing behind.
        pub fn finish(self) {
            drop(self);
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            // The world removes its topology and database when dropped.
            let state = self.state.clone();
            self.runtime.block_on(async {
                state.broker.close().await;
                state.pool.close().await;
            });
        }
    }

    /// A request, or `None` when `uri` is not a valid request target (hyper answers those
    /// 400 before any router sees them).
    pub fn request(
        method: &str,
        uri: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Option<Request<Body>> {
        let mut builder = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Body::from(body)).ok()
    }

    /// A query-string fragment: URI-safe text with raw `+`, `%`, `&`, `=`, escapes of
    /// arbitrary bytes (invalid UTF-8, NUL), and percent-encoded Unicode.
    pub fn query_text() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => "[A-Za-z0-9_.~/-]{1,12}",
            2 => prop::sample::select(vec!["+", "%", "%2", "&", "=", "%2B", "%20", "%25", "?", ";", "%00", "%ff", "%C3%28", "%E2%82"]).prop_map(str::to_owned),
            2 => any::<u8>().prop_map(|b| format!("%{b:02X}")),
            1 => ".{1,4}".prop_map(|s: String| url::form_urlencoded::byte_serialize(s.as_bytes()).collect()),
            1 => "<svg/onload=1>",
        ];
        prop_oneof![
            20 => prop::collection::vec(piece.clone(), 0..12).prop_map(|p| p.concat()),
            1 => prop::collection::vec(piece, 1..40).prop_map(|p| p.concat().repeat(200)),
        ]
    }
}

// ---------------------------------------------------------------------------------------
// Target: the landing page's token input
// ---------------------------------------------------------------------------------------

mod landing {
    use super::router_fixture::{Fixture, query_text, request};
    use super::*;
    use marketplace_fulfillment::web::auth::{CsrfToken, Session, Surface};

    #[test]
    fn arbitrary_query_strings_get_a_page_never_a_500_or_a_raw_error() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let strategy = prop_oneof![
                3 => query_text().prop_map(|t| format!("token={t}")),
                1 => query_text(),
                1 => (query_text(), query_text()).prop_map(|(a, b)| format!("token={a}&token={b}")),
                1 => (query_text(), query_text()).prop_map(|(a, b)| format!("{a}&token={b}")),
            ];
            // A signed-in customer: the tokens reach Resolve (without a session the page is
            // only a sign-in).
            let session = Session {
                surface: Surface::Customer,
                object_id: "c0c0c0c0-0000-4000-8000-0000000000c1".into(),
                tenant_id: "c0c0c0c0-0000-4000-8000-00000000c05e".into(),
                name: "Fuzz".into(),
                email: None,
                role: None,
                csrf: CsrfToken::new_random(),
                expires_at: time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
            };
            let cookie = session.cookie_header(&fixture.state.web.key);
            fuzz("landing::query", 300, strategy, |query| {
                let Some(request) = request(
                    "GET",
                    &format!("/landing?{query}"),
                    &[("cookie", &cookie)],
                    Vec::new(),
                ) else {
                    return Ok(());
                };
                let answer = fixture.send(request);
                let page = answer.text();
                // Random tokens are refused by Microsoft (400), or there is no usable token.
                prop_assert_eq!(answer.status.as_u16(), 400, "{}", page);
                let content_type = answer
                    .headers
                    .get("content-type")
                    .unwrap()
                    .to_str()
                    .unwrap();
                prop_assert!(content_type.starts_with("text/html"), "{}", content_type);
                prop_assert!(page.starts_with("<!DOCTYPE html>"), "{}", page);
                prop_assert_eq!(answer.headers.get("cache-control").unwrap(), "no-store");
                prop_assert!(
                    !page.contains("<svg"),
                    "markup from the query reached the page"
                );
                for raw in [
                    "Failed to deserialize",
                    "panicked",
                    "error sending",
                    "reqwest",
                ] {
                    prop_assert!(!page.contains(raw), "raw error {:?} in {}", raw, page);
                }
                Ok(())
            });
            fixture.finish();
        });
    }
}

// ---------------------------------------------------------------------------------------
// Target: the entitlement API's inputs (ids, query parameters, JSON bodies)
// ---------------------------------------------------------------------------------------

mod entitlements {
    use super::router_fixture::{API_KEY, Answer, Fixture, query_text, request};
    use super::*;
    use fulfillment_state_machine::{SubscriptionId, SubscriptionMachine};
    use uuid::Uuid;

    #[derive(Clone, Debug)]
    enum Call {
        Get {
            id: String,
        },
        List {
            query: String,
        },
        Command {
            id: String,
            verb: &'static str,
            body: Vec<u8>,
        },
    }

    fn id_text(known: Uuid) -> impl Strategy<Value = String> {
        prop_oneof![
            2 => Just(known.to_string()),
            2 => guid_text().prop_map(|g| url::form_urlencoded::byte_serialize(g.as_bytes()).collect()),
            // Raw `?` and `#` would end the path; `/` stays raw (another route).
            3 => query_text().prop_map(|t| t.replace('?', "%3F").replace('#', "%23")),
        ]
    }

    fn list_query() -> impl Strategy<Value = String> {
        let name = prop::sample::select(vec![
            "state",
            "beneficiaryTenantId",
            "offerId",
            "limit",
            "cursor",
            "other",
        ]);
        let value = prop_oneof![
            query_text(),
            prop::sample::select(vec![
                "Subscribed",
                "subscribed",
                "0",
                "1",
                "500",
                "501",
                "-1",
                "4294967296",
                "99999999999999999999",
                "1.5",
                "%00",
                "gold%00",
            ])
            .prop_map(str::to_owned),
            guid_text().prop_map(|g| url::form_urlencoded::byte_serialize(g.as_bytes()).collect()),
        ];
        prop_oneof![
            5 => prop::collection::vec((name, value), 0..5).prop_map(|pairs| pairs
                .into_iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join("&")),
            1 => query_text(),
        ]
    }

    fn body() -> impl Strategy<Value = Vec<u8>> {
        let object = (
            prop::option::of(json_value()),
            prop::option::of(json_value()),
            prop::option::of(prop_oneof![
                tricky_text().prop_map(Value::String),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
            ]),
        )
            .prop_map(|(plan, quantity, odd)| {
                let mut map = Map::new();
                if let Some(plan) = plan {
                    map.insert("planId".into(), plan);
                }
                if let Some(quantity) = quantity {
                    map.insert("quantity".into(), quantity);
                }
                if let Some(odd) = odd {
                    map.insert(
                        if odd.is_string() {
                            "planId"
                        } else {
                            "quantity"
                        }
                        .into(),
                        odd,
                    );
                }
                serde_json::to_vec(&Value::Object(map)).unwrap()
            });
        prop_oneof![
            4 => object,
            2 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
            1 => prop::collection::vec(any::<u8>(), 0..64),
            1 => (1usize..40_000).prop_map(|n| format!(r#"{{"planId":"{}"}}"#, "a".repeat(n)).into_bytes()),
        ]
    }

    fn call(known: Uuid) -> impl Strategy<Value = Call> {
        prop_oneof![
            2 => id_text(known).prop_map(|id| Call::Get { id }),
            2 => list_query().prop_map(|query| Call::List { query }),
            4 => (
                id_text(known),
                prop::sample::select(vec!["activate", "cancel", "change-plan", "change-quantity"]),
                body(),
            )
                .prop_map(|(id, verb, body)| Call::Command { id, verb, body }),
        ]
    }

    /// The fixture with one known subscription, for calls that reach the database.
    fn fixture_with_a_subscription() -> (Fixture, Uuid) {
        let fixture = Fixture::new();
        let known = Uuid::new_v4();
        fixture.runtime.block_on(async {
            let machine =
                SubscriptionMachine::new(SubscriptionId::parse(&known.to_string()).unwrap());
            sqlx::query(
                "INSERT INTO subscriptions (id, offer_id, plan_id, quantity, state, \
                 beneficiary_tenant_id, purchaser_tenant_id, machine) \
                 VALUES ($1, 'contoso-analytics', 'gold', 5, 'Subscribed', $2, $2, $3)",
            )
            .bind(known)
            .bind(Uuid::new_v4())
            .bind(serde_json::to_value(&machine).unwrap())
            .execute(&fixture.pool)
            .await
            .unwrap();
        });
        (fixture, known)
    }

    /// Sends `call` with the right key; `None` when it is not a valid request target.
    fn send(fixture: &Fixture, call: &Call) -> Option<Answer> {
        let bearer = format!("Bearer {API_KEY}");
        let auth = ("authorization", bearer.as_str());
        let json = ("content-type", "application/json");
        let request = match call {
            Call::Get { id } => request(
                "GET",
                &format!("/api/v1/subscriptions/{id}"),
                &[auth],
                Vec::new(),
            ),
            Call::List { query } => request(
                "GET",
                &format!("/api/v1/subscriptions?{query}"),
                &[auth],
                Vec::new(),
            ),
            Call::Command { id, verb, body } => request(
                "POST",
                &format!("/api/v1/subscriptions/{id}/{verb}"),
                &[auth, json],
                body.clone(),
            ),
        }?;
        Some(fixture.send(request))
    }

    /// Never a 5xx; every error is JSON, every success a JSON object.
    fn check(answer: &Answer) -> Result<(), TestCaseError> {
        let status = answer.status.as_u16();
        prop_assert!(status < 500, "{} {}", status, answer.text());
        // A path the router does not know (an id with a '/' in it) is axum's plain
        // 404 or 405, before any handler.
        let routed = !(matches!(status, 404 | 405) && answer.body.is_empty());
        if status >= 400 && routed {
            prop_assert!(answer.is_json_error(), "{} {}", status, answer.text());
        }
        if status < 300 {
            let body: Value = serde_json::from_slice(&answer.body)
                .map_err(|e| TestCaseError::fail(format!("2xx without JSON: {e}")))?;
            prop_assert!(body.is_object());
        }
        Ok(())
    }

    #[test]
    fn any_input_gets_a_json_answer_and_never_a_500() {
        on_big_stack(|| {
            let (fixture, known) = fixture_with_a_subscription();
            fuzz("entitlements::calls", 500, call(known), |call| {
                match send(&fixture, &call) {
                    Some(answer) => check(&answer),
                    None => Ok(()),
                }
            });
            fixture.finish();
        });
    }

    /// Found by `any_input_gets_a_json_answer_and_never_a_500`:
    /// - `offerId=%00` reached PostgreSQL, which refuses NUL in text: a 500;
    /// - a body over the 16 KiB limit, and an id that percent-decodes to invalid UTF-8, got
    ///   axum's plain-text rejections instead of JSON errors.
    ///
    /// And what the same inputs would have done later: a `planId` with a NUL was queued
    /// (202) and could never be stored by the worker.
    #[test]
    fn regression_nul_bytes_oversized_bodies_and_undecodable_ids_get_json_4xx() {
        on_big_stack(|| {
            let (fixture, known) = fixture_with_a_subscription();
            let cases = [
                (
                    Call::List {
                        query: "offerId=%00".into(),
                    },
                    400,
                ),
                (
                    Call::List {
                        query: "offerId=contoso%00analytics".into(),
                    },
                    400,
                ),
                (
                    Call::Get {
                        id: "%FF%FE".into(),
                    },
                    400,
                ),
                (
                    Call::Command {
                        id: "%C3%28".into(),
                        verb: "cancel",
                        body: Vec::new(),
                    },
                    400,
                ),
                (
                    Call::Command {
                        id: known.to_string(),
                        verb: "change-plan",
                        body: format!(r#"{{"planId":"{}"}}"#, "a".repeat(20_000)).into_bytes(),
                    },
                    413,
                ),
                (
                    Call::Command {
                        id: known.to_string(),
                        verb: "change-plan",
                        body: br#"{"planId":"gold\u0000"}"#.to_vec(),
                    },
                    400,
                ),
            ];
            for (call, expected) in cases {
                let answer = send(&fixture, &call).unwrap();
                check(&answer).unwrap_or_else(|e| panic!("{call:?}: {e}"));
                assert_eq!(
                    answer.status.as_u16(),
                    expected,
                    "{call:?}: {}",
                    answer.text()
                );
                assert!(answer.is_json_error(), "{call:?}: {}", answer.text());
            }
            fixture.finish();
        });
    }
}

// ---------------------------------------------------------------------------------------
// Target: the webhook route end to end (authenticated bodies, arbitrary headers)
// ---------------------------------------------------------------------------------------

mod webhook_ingress {
    use super::router_fixture::{Fixture, request};
    use super::webhook_parser::{apply, mutation, through_the_worker, valid_payload};
    use super::*;
    use marketplace_fulfillment::marketplace::WebhookPayload;
    use marketplace_fulfillment::queue::{Broker, InboundMessage};
    use marketplace_fulfillment::worker::translate::translate;
    use std::sync::Mutex;
    use std::time::Duration;

    #[test]
    fn authenticated_bodies_are_accepted_exactly_when_parseable_and_queued_byte_for_byte() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let token = fixture.sim.mint_webhook_token(json!({})).unwrap();
            let bearer = format!("Bearer {token}");
            let accepted = Mutex::new(Vec::<String>::new());
            let body = prop_oneof![
                3 => (prop::collection::vec(mutation(), 0..5), prop::collection::vec(byte_edit(), 0..3))
                    .prop_map(|(mutations, edits)| {
                        let map = apply(valid_payload(), &mutations);
                        apply_byte_edits(serde_json::to_vec(&map).unwrap(), &edits)
                    }),
                1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
                1 => prop::collection::vec(any::<u8>(), 0..128),
                // Deep nesting in a field nobody reads: serde_json's limit is 128 levels.
                1 => (0usize..200, any::<bool>()).prop_map(|(depth, arrays)| {
                    let (open, close) = if arrays { ("[", "]") } else { (r#"{"a":"#, "}") };
                    let mut body = serde_json::to_string(&valid_payload()).unwrap();
                    body.pop();
                    body.push_str(&format!(
                        r#","deep":{}0{}}}"#,
                        open.repeat(depth),
                        close.repeat(depth)
                    ));
                    body.into_bytes()
                }),
            ];
            fuzz("webhook_ingress::bodies", 200, body, |body| {
                let request = request(
                    "POST",
                    "/webhook",
                    &[
                        ("authorization", bearer.as_str()),
                        ("content-type", "application/json"),
                    ],
                    body.clone(),
                )
                .unwrap();
                let answer = fixture.send(request);
                let parseable =
                    std::str::from_utf8(&body).is_ok() && WebhookPayload::parse(&body).is_ok();
                let has_nul = serde_json::from_slice::<Value>(&body)
                    .map(|v| holds_nul(&v))
                    .unwrap_or(false);
                match answer.status.as_u16() {
                    200 => {
                        prop_assert!(parseable, "accepted an unparseable body");
                        // Whatever the ingress accepts, the worker translates and applies.
                        through_the_worker(&body)?;
                        // What the worker will store (event log, inbox key) must be storable.
                        prop_assert!(storable(&body), "accepted a body the worker cannot store");
                        accepted
                            .lock()
                            .unwrap()
                            .push(String::from_utf8(body).unwrap());
                    }
                    400 => {
                        prop_assert!(
                            !parseable || has_nul,
                            "refused a good body: {}",
                            answer.text()
                        );
                        prop_assert!(answer.is_json_error(), "{}", answer.text());
                    }
                    other => prop_assert!(false, "{} {}", other, answer.text()),
                }
                Ok(())
            });

            // Every accepted body is in the queue exactly as it was sent (unknown fields too).
            let mut expected = accepted.into_inner().unwrap();
            fixture.runtime.block_on(async {
                let broker = Broker::connect(&fixture.settings.amqp, "fuzz-check")
                    .await
                    .unwrap();
                let mut consumer = broker.consume_inbound(50, "").await.unwrap();
                let mut queued = Vec::new();
                while queued.len() < expected.len() {
                    let delivery = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                        .await
                        .expect("every accepted webhook is queued")
                        .unwrap()
                        .unwrap();
                    match &delivery.message {
                        Ok(InboundMessage::Webhook { payload, .. }) => queued.push(payload.clone()),
                        other => panic!("unexpected message {other:?}"),
                    }
                    delivery.ack().await.unwrap();
                }
                consumer.cancel().await;
                broker.close().await;
                queued.sort();
                expected.sort();
                assert_eq!(queued, expected);
            });
            fixture.finish();
        });
    }

    /// A NUL anywhere in the document's strings or keys.
    fn holds_nul(value: &Value) -> bool {
        match value {
            Value::String(s) => s.contains('\0'),
            Value::Array(items) => items.iter().any(holds_nul),
            Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
            _ => false,
        }
    }

    /// The worker's translation of `body` holds nothing PostgreSQL refuses (NUL in text
    /// and jsonb): the inbox key and the event it records.
    fn storable(body: &[u8]) -> bool {
        let message = InboundMessage::Webhook {
            received_at: time::OffsetDateTime::now_utc(),
            payload: String::from_utf8_lossy(body).into_owned(),
        };
        match translate(&message) {
            Ok(translated) => {
                let key = &translated.inbox_key;
                !key.message_id().contains('\0')
                    && !key.kind().contains('\0')
                    && !holds_nul(&serde_json::to_value(&translated.event).unwrap())
            }
            Err(_) => false,
        }
    }

    /// Found by `authenticated_bodies_are_accepted_exactly_when_parseable_…`: a webhook with
    /// a NUL in a string (`"action":"Renew\u0000"`) was accepted and queued, and the worker
    /// could never store it (PostgreSQL refuses NUL in text and jsonb): it would have been
    /// retried into the dead-letter queue.
    #[test]
    fn regression_a_nul_in_any_string_is_refused_before_queueing() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let token = fixture.sim.mint_webhook_token(json!({})).unwrap();
            let bearer = format!("Bearer {token}");
            let id = uuid::Uuid::new_v4();
            let sub = uuid::Uuid::new_v4();
            for body in [
                format!(r#"{{"id":"{id}","subscriptionId":"{sub}","action":"Renew\u0000"}}"#),
                format!(
                    r#"{{"id":"{id}","subscriptionId":"{sub}","action":"Renew","planId":"\u0000gold"}}"#
                ),
                format!(
                    r#"{{"id":"{id}","subscriptionId":"{sub}","action":"Renew","future":{{"a\u0000":[1]}}}}"#
                ),
            ] {
                let request = request(
                    "POST",
                    "/webhook",
                    &[("authorization", bearer.as_str())],
                    body.clone().into_bytes(),
                )
                .unwrap();
                let answer = fixture.send(request);
                assert_eq!(answer.status.as_u16(), 400, "{body}: {}", answer.text());
                assert!(answer.text().contains("NUL"), "{}", answer.text());
            }
            // Nothing was queued: a genuine webhook is the first message.
            let (sentinel, body) = (
                uuid::Uuid::new_v4(),
                json!({ "subscriptionId": sub, "action": "Renew" }),
            );
            let mut body = body;
            body["id"] = json!(sentinel);
            let request = request(
                "POST",
                "/webhook",
                &[("authorization", bearer.as_str())],
                body.to_string().into_bytes(),
            )
            .unwrap();
            assert_eq!(fixture.send(request).status.as_u16(), 200);
            fixture.runtime.block_on(async {
                let broker = Broker::connect(&fixture.settings.amqp, "fuzz-check")
                    .await
                    .unwrap();
                let mut consumer = broker.consume_inbound(10, "").await.unwrap();
                let first = tokio::time::timeout(Duration::from_secs(30), consumer.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                assert_eq!(first.meta.message_id, sentinel.to_string());
                first.ack().await.unwrap();
                consumer.cancel().await;
                broker.close().await;
            });
            fixture.finish();
        });
    }

    #[test]
    fn arbitrary_authorization_headers_get_a_401_and_queue_nothing() {
        on_big_stack(|| {
            let fixture = Fixture::new();
            let body = serde_json::to_vec(&valid_payload()).unwrap();
            let strategy = prop_oneof![
                "[ -~]{0,120}",
                "[A-Za-z0-9_.-]{0,400}".prop_map(|t| format!("Bearer {t}")),
            ];
            fuzz("webhook_ingress::authorization", 200, strategy, |header| {
                let Some(request) = request(
                    "POST",
                    "/webhook",
                    &[
                        ("authorization", header.as_str()),
                        ("content-type", "application/json"),
                    ],
                    body.clone(),
                ) else {
                    return Ok(());
                };
                let answer = fixture.send(request);
                prop_assert_eq!(answer.status.as_u16(), 401, "{}", answer.text());
                prop_assert!(answer.is_json_error());
                Ok(())
            });
            fixture.finish();
        });
    }
}

// ---------------------------------------------------------------------------------------
// Target: the state machine (stored machines and events from JSON, wide event sequences)
// ---------------------------------------------------------------------------------------

mod state_machine {
    use super::*;
    use fulfillment_state_machine::{
        ActivationMode, Command, CommandId, Effect, Event, MarketplaceStatus, OperationId,
        OperationStatus, PlanId, Policy, Quantity, RequestSource, SeatLimits, Snapshot, StateName,
        SubscriptionId, SubscriptionMachine, Term, Webhook, WebhookAction,
    };
    use marketplace_fulfillment::queue::InboundMessage;
    use marketplace_fulfillment::worker::translate::translate;
    use time::OffsetDateTime;
    use uuid::Uuid;

    fn sub() -> SubscriptionId {
        SubscriptionId::from(Uuid::from_u128(0xABCD))
    }

    /// Any instant RFC 3339 can write (years 0000–9999), edges included.
    fn instant() -> impl Strategy<Value = OffsetDateTime> {
        let min = OffsetDateTime::parse(
            "0000-01-01T00:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp();
        let max = OffsetDateTime::parse(
            "9999-12-31T23:59:59Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
        .unix_timestamp();
        prop_oneof![
            Just(min),
            Just(max),
            1_700_000_000i64..1_800_000_000,
            min..=max,
        ]
        .prop_map(|s| OffsetDateTime::from_unix_timestamp(s).unwrap())
    }

    fn name() -> impl Strategy<Value = PlanId> {
        prop_oneof![
            prop::sample::select(vec!["gold", "silver", "platinum"]).prop_map(str::to_owned),
            ".{1,40}",
        ]
        .prop_filter_map("a valid plan id", |s| PlanId::parse(&s).ok())
    }

    fn quantity() -> impl Strategy<Value = Quantity> {
        prop_oneof![Just(1u32), Just(u32::MAX), 1u32..100, any::<u32>()]
            .prop_filter_map("at least one seat", |q| Quantity::new(q).ok())
    }

    fn status() -> impl Strategy<Value = MarketplaceStatus> {
        prop_oneof![
            Just(MarketplaceStatus::NotStarted),
            Just(MarketplaceStatus::PendingFulfillmentStart),
            Just(MarketplaceStatus::Subscribed),
            Just(MarketplaceStatus::Suspended),
            Just(MarketplaceStatus::Unsubscribed),
            ".{0,12}".prop_map(|s: String| MarketplaceStatus::parse(&s)),
        ]
    }

    fn snapshot() -> impl Strategy<Value = Snapshot> {
        (
            status(),
            prop::option::of(name()),
            prop::option::of(quantity()),
            prop::option::of((
                prop::option::of(".{0,6}"),
                prop::option::of(instant()),
                prop::option::of(instant()),
            )),
        )
            .prop_map(|(status, plan_id, quantity, term)| Snapshot {
                plan_id,
                quantity,
                term: term.map(|(unit, start, end)| Term {
                    unit,
                    start,
                    end,
                    ..Term::default()
                }),
                ..Snapshot::with_status(status)
            })
    }

    fn action() -> impl Strategy<Value = WebhookAction> {
        prop_oneof![
            Just(WebhookAction::Subscribe),
            Just(WebhookAction::ChangePlan),
            Just(WebhookAction::ChangeQuantity),
            Just(WebhookAction::Renew),
            Just(WebhookAction::Suspend),
            Just(WebhookAction::Reinstate),
            Just(WebhookAction::Unsubscribe),
            ".{0,10}".prop_map(|s: String| WebhookAction::parse(&s)),
        ]
    }

    fn event() -> impl Strategy<Value = Event> {
        let op = (0u128..6).prop_map(|n| OperationId::from(Uuid::from_u128(0x900 + n)));
        let cmd = (0u128..4).prop_map(|n| CommandId::from(Uuid::from_u128(0xC00 + n)));
        let source = prop_oneof![
            Just(RequestSource::Azure),
            Just(RequestSource::Partner),
            ".{0,6}".prop_map(|s: String| RequestSource::parse(&s)),
        ];
        let command = prop_oneof![
            name().prop_map(|plan_id| Command::ChangePlan { plan_id }),
            quantity().prop_map(|quantity| Command::ChangeQuantity { quantity }),
            Just(Command::Cancel),
        ];
        prop_oneof![
            4 => (op.clone(), action(), source, prop::option::of(instant()), prop::option::of(name()),
                  prop::option::of(quantity()), prop::option::of(snapshot()))
                .prop_map(|(operation_id, action, source, timestamp, plan_id, quantity, subscription)| {
                    Event::Webhook(Webhook { operation_id, action, source, timestamp, plan_id, quantity, subscription })
                }),
            1 => (snapshot(), instant()).prop_map(|(snapshot, resolved_at)| Event::PurchaseResolved { snapshot, resolved_at }),
            1 => cmd.clone().prop_map(|command_id| Event::ActivationRequested { command_id }),
            1 => (prop::option::of(snapshot().prop_filter_map("term", |s| s.term)), instant())
                .prop_map(|(term, confirmed_at)| Event::ActivationConfirmed { term, confirmed_at }),
            1 => (".{0,20}", instant()).prop_map(|(reason, failed_at)| Event::ActivationFailed { reason, failed_at }),
            2 => (cmd.clone(), command).prop_map(|(command_id, command)| Event::PublisherCommand { command_id, command }),
            2 => (cmd.clone(), op.clone(), ".{0,20}").prop_map(|(command_id, operation_id, location)| {
                Event::PublisherOperationAccepted { command_id, operation_id, location, retry_after_ms: None }
            }),
            1 => (cmd, ".{0,20}").prop_map(|(command_id, reason)| Event::PublisherOperationRefused { command_id, reason }),
            2 => (op, prop_oneof![Just(OperationStatus::Succeeded), Just(OperationStatus::Failed), Just(OperationStatus::Conflict)])
                .prop_map(|(operation_id, status)| Event::OperationResult { operation_id, status }),
            2 => (snapshot(), instant()).prop_map(|(snapshot, observed_at)| Event::Observed { snapshot, observed_at }),
        ]
    }

    fn policy() -> impl Strategy<Value = Policy> {
        (
            prop::bool::ANY,
            prop::option::of(any::<u32>()),
            prop::option::of(any::<u32>()),
        )
            .prop_map(|(manual, min, max)| Policy {
                activation: if manual {
                    ActivationMode::Manual
                } else {
                    ActivationMode::Automatic
                },
                seats: SeatLimits { min, max },
                ..Policy::default()
            })
    }

    #[test]
    fn wide_random_event_sequences_keep_the_invariants_and_survive_json() {
        on_big_stack(|| {
            let strategy = (
                policy(),
                prop::collection::vec((event(), instant(), prop::bool::ANY), 0..40),
            );
            fuzz(
                "state_machine::sequences",
                300,
                strategy,
                |(policy, steps)| {
                    let mut machine = SubscriptionMachine::new(sub());
                    for (event, now, round_trip) in &steps {
                        let was_unsubscribed = machine.state() == StateName::Unsubscribed;
                        let event_json = serde_json::to_string(event).unwrap();
                        prop_assert_eq!(
                            &serde_json::from_str::<Event>(&event_json).unwrap(),
                            event
                        );
                        let decision = machine.handle(event, *now, &policy);
                        let decision_json = serde_json::to_value(&decision).unwrap();
                        prop_assert_eq!(
                            serde_json::from_value::<fulfillment_state_machine::Decision>(
                                decision_json
                            )
                            .unwrap(),
                            decision.clone()
                        );
                        if was_unsubscribed {
                            // Terminal: nothing moves or is answered; only reads of the
                            // ended subscription's final details.
                            prop_assert_eq!(machine.state(), StateName::Unsubscribed);
                            prop_assert!(
                                decision.effects.iter().all(Effect::is_read),
                                "{:?}",
                                decision
                            );
                        }
                        if *round_trip {
                            let stored = serde_json::to_value(&machine).unwrap();
                            let restored: SubscriptionMachine =
                                serde_json::from_value(stored).unwrap();
                            prop_assert_eq!(&restored, &machine);
                            machine = restored;
                        }
                    }
                    Ok(())
                },
            );
        });
    }

    #[test]
    fn arbitrary_json_never_panics_as_a_stored_machine_an_event_or_a_queue_message() {
        on_big_stack(|| {
            fuzz("state_machine::json", 1000, json_value(), |value| {
                if let Ok(mut machine) =
                    serde_json::from_value::<SubscriptionMachine>(value.clone())
                {
                    machine.handle(
                        &Event::ActivationRequested {
                            command_id: CommandId::from(Uuid::nil()),
                        },
                        OffsetDateTime::now_utc(),
                        &Policy::default(),
                    );
                }
                let _ = serde_json::from_value::<Event>(value.clone());
                if let Ok(message) = serde_json::from_value::<InboundMessage>(value) {
                    let _ = translate(&message);
                }
                Ok(())
            });
        });
    }

    #[test]
    fn mutated_stored_machines_are_refused_or_restored_whole() {
        on_big_stack(|| {
            let strategy = (
                prop::collection::vec((event(), instant()), 0..12),
                prop::collection::vec((any::<prop::sample::Index>(), json_value()), 1..4),
            );
            fuzz("state_machine::stored", 500, strategy, |(events, edits)| {
                let mut machine = SubscriptionMachine::new(sub());
                for (event, now) in &events {
                    machine.handle(event, *now, &Policy::default());
                }
                let mut stored = serde_json::to_value(&machine).unwrap();
                for (index, value) in &edits {
                    let mut leaves = Vec::new();
                    collect_paths(&stored, String::new(), &mut leaves);
                    let path = index.get(&leaves).clone();
                    if let Some(slot) = stored.pointer_mut(&path) {
                        *slot = value.clone();
                    }
                }
                if let Ok(mut restored) = serde_json::from_value::<SubscriptionMachine>(stored) {
                    // Whatever was restored behaves, and stores again.
                    for (event, now) in events.iter().take(3) {
                        restored.handle(event, *now, &Policy::default());
                    }
                    let again = serde_json::to_value(&restored).unwrap();
                    prop_assert_eq!(
                        serde_json::from_value::<SubscriptionMachine>(again).unwrap(),
                        restored
                    );
                }
                Ok(())
            });
        });
    }

    /// JSON pointers of every value in `value` (the root included).
    fn collect_paths(value: &Value, path: String, out: &mut Vec<String>) {
        out.push(path.clone());
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = k.replace('~', "~0").replace('/', "~1");
                    collect_paths(v, format!("{path}/{key}"), out);
                }
            }
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    collect_paths(v, format!("{path}/{i}"), out);
                }
            }
            _ => {}
        }
    }
}
