//! Shared helpers of the system tests: each test gets its own PostgreSQL database on the
//! local server (dropped afterwards) and its own RabbitMQ names.
#![allow(dead_code)]

use std::collections::HashMap;

use marketplace_fulfillment::settings::{ConnectionUrl, Settings};
use sqlx::postgres::PgPool;
use uuid::Uuid;

/// Settings as the process environment gives them (so `DATABASE_URL` still points the tests
/// at another server), e.g. the base a `World` derives its names from.
pub fn base_settings() -> Settings {
    let env: HashMap<String, String> = std::env::vars().collect();
    Settings::from_sources(None, &env).expect("settings from the environment")
}

/// [`base_settings`] with a fresh database name and a fresh RabbitMQ prefix.
pub fn test_settings() -> Settings {
    let mut env: HashMap<String, String> = std::env::vars().collect();
    let id = Uuid::new_v4().simple().to_string();
    let base = base_settings();
    let url = base
        .database
        .url
        .with_path(&format!("/fulfillment_test_{}", &id[..16]));
    env.insert("DATABASE_URL".into(), url.expose().to_string());
    env.insert(
        "FULFILLMENT__AMQP__PREFIX".into(),
        format!("test-{}", &id[..16]),
    );
    Settings::from_sources(None, &env).expect("test settings")
}

/// A database that exists for one test and is dropped when this value is.
pub struct TestDatabase {
    pub settings: Settings,
}

impl TestDatabase {
    /// Names a fresh database; nothing is created until `migrate` or the code under test does.
    pub fn new() -> Self {
        Self {
            settings: test_settings(),
        }
    }

    /// Creates the database with the schema and returns a pool on it.
    pub async fn migrated() -> (Self, PgPool) {
        let db = Self::new();
        marketplace_fulfillment::store::migrate(&db.settings.database)
            .await
            .expect("migrate the test database");
        let pool = marketplace_fulfillment::store::connect(&db.settings.database)
            .await
            .expect("connect to the test database");
        (db, pool)
    }

    pub fn url(&self) -> &ConnectionUrl {
        &self.settings.database.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let url = self.settings.database.url.clone();
        // Drop runs inside or outside a runtime; a thread with its own runtime works in both.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                let name = url.url().path().trim_start_matches('/').to_string();
                let admin = url.with_path("/postgres");
                if let Ok(pool) = PgPool::connect(admin.expose()).await {
                    let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                    pool.close().await;
                }
            });
        })
        .join();
    }
}

/// `text` without the terminal colour sequences (`ESC [ … m`) of the log formatter, so a
/// value split by them would still be found.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
