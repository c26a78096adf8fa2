//! `fulfillment migrate` creates the database and the schema, and a second run is a no-op.

mod common;

use std::process::Command;

use common::TestDatabase;
use marketplace_fulfillment::store;

#[tokio::test]
async fn migrate_creates_database_and_schema_then_changes_nothing() {
    let db = TestDatabase::new();

    let first = store::migrate(&db.settings.database).await.unwrap();
    assert!(first.database_created);
    assert_eq!(first.applied.len(), store::MIGRATOR.iter().count());

    let second = store::migrate(&db.settings.database).await.unwrap();
    assert!(!second.database_created);
    assert!(second.applied.is_empty(), "{:?}", second.applied);

    let pool = store::connect(&db.settings.database).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY table_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for table in [
        "inbox",
        "outbox",
        "publisher_operations",
        "subscription_events",
        "subscriptions",
    ] {
        assert!(
            tables.iter().any(|t| t == table),
            "{table} missing: {tables:?}"
        );
    }
    pool.close().await;
}

#[tokio::test]
async fn the_event_log_refuses_updates_and_deletes() {
    let (_db, pool) = TestDatabase::migrated().await;
    sqlx::query(
        "INSERT INTO subscription_events \
         (id, subscription_id, sequence, event_key, event_kind, event, from_state, to_state, outcome) \
         VALUES (gen_random_uuid(), gen_random_uuid(), 1, 'k', 'Observed', '{}', \
                 'PendingFulfillment', 'Subscribed', 'applied')",
    )
    .execute(&pool)
    .await
    .unwrap();
    let update = sqlx::query("UPDATE subscription_events SET reason = 'rewritten'")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(update.to_string().contains("append-only"), "{update}");
    let delete = sqlx::query("DELETE FROM subscription_events")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(delete.to_string().contains("append-only"), "{delete}");
    pool.close().await;
}

#[test]
fn the_migrate_command_reports_what_it_did() {
    let db = TestDatabase::new();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_fulfillment"))
            .arg("migrate")
            .env("DATABASE_URL", db.url().expose())
            .output()
            .expect("run fulfillment migrate")
    };
    let first = run();
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(first.status.success(), "{first:?}");
    assert!(stdout.contains("created database"), "{stdout}");
    assert!(stdout.contains("applied"), "{stdout}");

    let second = run();
    let stdout = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "{second:?}");
    assert!(stdout.contains("schema up to date"), "{stdout}");
    assert!(!stdout.contains("applied"), "{stdout}");
}

#[test]
fn an_unreachable_server_is_named_with_a_hint() {
    let output = Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .arg("migrate")
        .env("DATABASE_URL", "postgres://postgres:pw@127.0.0.1:1/nothing")
        .output()
        .expect("run fulfillment migrate");
    // 3: could not check, a dependency unreachable.
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach PostgreSQL at postgres://postgres:***@127.0.0.1:1/nothing"),
        "{stderr}"
    );
    assert!(!stderr.contains(":pw@"), "{stderr}");
}

#[test]
fn an_invalid_setting_exits_2_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .arg("migrate")
        .env("MARKETPLACE_TENANT_ID", "not-a-guid")
        .output()
        .expect("run fulfillment migrate");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("MARKETPLACE_TENANT_ID"), "{stderr}");
}
