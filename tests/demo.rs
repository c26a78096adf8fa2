//! `fulfillment demo` end to end: the real binary against the local PostgreSQL and RabbitMQ,
//! with its own database name and RabbitMQ prefix, so it touches nothing else.

mod common;

use std::time::Duration;

use common::TestDatabase;
use marketplace_fulfillment::store;

/// Runs `fulfillment demo` with `db`'s server and prefix: `(exit code, stdout, stderr)`.
async fn run_demo(db: &TestDatabase, extra_env: &[(&str, &str)]) -> (i32, String, String) {
    let own = [
        ("DATABASE_URL", db.url().expose()),
        ("FULFILLMENT__AMQP__PREFIX", &db.settings.amqp.prefix),
    ];
    let env = own.iter().chain(extra_env).copied();
    common::run_fulfillment(&["demo"], env, false).await
}

#[tokio::test]
async fn the_demo_plays_the_whole_lifecycle_and_both_sides_agree() {
    let db = TestDatabase::new();
    let (code, stdout, stderr) = run_demo(&db, &[]).await;
    // The demo drops `<name>_demo` itself; was it still there?
    let demo = db
        .url()
        .with_path(&format!("{}_demo", db.url().url().path()));
    let left_behind = store::connect_once(&demo, Duration::from_secs(5))
        .await
        .is_ok();
    store::drop_database(&demo).await.unwrap();
    assert_eq!(code, 0, "--- stdout\n{stdout}\n--- stderr\n{stderr}");

    // The story, step by step.
    for expected in [
        // Issue #20: the engine's token comes from a certificate client assertion.
        "credential: certificate CN=fulfillment-demo",
        "1. customer buys contoso-analytics / per-seat with 5 seats",
        "2. customer opens the landing page: http://127.0.0.1:",
        "| Welcome to Contoso Analytics",
        "| Plan: Per-seat",
        "| Seats: 5",
        "signed in as Chris Customer and pressed Activate: HTTP 200",
        "| Activation pending",
        "3. worker activates automatically: both sides Subscribed / per-seat / 5",
        "with auto-activation: Subscribed at checkout, recorded from the Subscribe webhook without a landing-page visit or an Activate: both sides Subscribed / per-seat / 3",
        "4. customer changes seats 5 → 8: Microsoft's operation Succeeded (acknowledged Success)",
        "5. customer asks for 60 seats (limit 50): refused by policy: Microsoft's operation Failed",
        "6. customer changes plan per-seat → per-seat-pro: Microsoft's operation Succeeded",
        "7. Microsoft suspends (payment failed): both sides Suspended / per-seat-pro / 8",
        "8. Microsoft reinstates (payment fixed)",
        "→ HTTP 202, command",
        "polled operation",
        "publisher plan change per-seat-pro → per-seat done: both sides Subscribed / per-seat / 8",
        "10. customer unsubscribes: both sides Unsubscribed / per-seat / 8",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in\n{stdout}"
        );
    }
    assert!(stdout.contains("webhook → ACK"), "{stdout}");
    // Issue #18: the ISV's endpoint got every event of the subscription, verified.
    assert!(
        stdout.contains("0. the ISV registers its webhook endpoint"),
        "{stdout}"
    );
    assert!(
        stdout.contains("each received once, in order; every signature valid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok  com.fulfillment.subscription.unsubscribed"),
        "{stdout}"
    );
    // The ISV's queue on the domain exchange got the events over AMQP too.
    let amqp = stdout.split("domain events on RabbitMQ, queue").nth(1);
    let amqp = amqp.unwrap_or_else(|| panic!("no domain events from RabbitMQ in\n{stdout}"));
    assert!(
        amqp.contains("com.fulfillment.subscription.unsubscribed"),
        "{stdout}"
    );

    // The timeline comes from the event log.
    let timeline = stdout
        .split("Timeline (event log")
        .nth(1)
        .expect("a timeline");
    for kind in [
        "PurchaseResolved",
        "effect:activate",
        "WebhookChangeQuantity",
        "WebhookChangePlan",
        "effect:ack_operation",
        "PublisherChangePlan",
        "effect:poll_operation",
        "Subscribed → Suspended",
        "→ Unsubscribed",
        "rejected",
    ] {
        assert!(
            timeline.contains(kind),
            "timeline misses {kind:?}:\n{timeline}"
        );
    }

    // The final check: every line ok, each ACK made once.
    let check = stdout.split("Final check").nth(1).expect("a final check");
    assert!(!check.contains("MISMATCH"), "{check}");
    for row in [
        "state",
        "plan",
        "quantity",
        "ACK ChangeQuantity 5 → 8",
        "ACK ChangeQuantity 8 → 60",
        "ACK ChangePlan per-seat → per-seat-pro",
        "publisher ChangePlan per-seat-pro → per-seat",
        "webhooks delivered",
        "outbox pending / dead",
    ] {
        let line = check
            .lines()
            .find(|l| l.trim_start().starts_with(row))
            .unwrap_or_else(|| panic!("no {row:?} row in\n{check}"));
        assert!(line.trim_end().ends_with("ok"), "{line}");
    }
    let ack_rows: Vec<&str> = check
        .lines()
        .filter(|l| l.trim_start().starts_with("ACK "))
        .collect();
    assert_eq!(ack_rows.len(), 4, "{check}");
    for row in ack_rows {
        assert!(row.contains(" ×1 (1 outbox row)"), "{row}");
    }
    assert!(
        stdout.contains("shutdown: ingress and worker stopped gracefully"),
        "{stdout}"
    );
    assert!(stdout.contains("cleanup: dropped database"), "{stdout}");
    assert!(stdout.contains("demo OK in"), "{stdout}");
    assert!(!left_behind, "the demo left its database behind");
}

#[tokio::test]
async fn the_demo_names_the_missing_service_and_how_to_start_it() {
    let db = TestDatabase::new();
    let unreachable = db.url().url().clone();
    let mut unreachable = unreachable;
    unreachable.set_port(Some(1)).unwrap();
    let (code, stdout, _) = run_demo(
        &db,
        &[
            ("DATABASE_URL", unreachable.as_str()),
            ("AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f"),
        ],
    )
    .await;
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("PostgreSQL is not reachable"), "{stdout}");
    assert!(stdout.contains("pg_ctlcluster"), "{stdout}");
    assert!(stdout.contains("RabbitMQ is not reachable"), "{stdout}");
    assert!(stdout.contains("rabbitmq-server -detached"), "{stdout}");
    assert!(!stdout.contains("customer buys"), "{stdout}");
}
