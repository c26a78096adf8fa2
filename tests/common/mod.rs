//! Shared helpers of the system tests: each test gets its own PostgreSQL database on the
//! local server (dropped afterwards) and its own RabbitMQ names.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::OsStr;
use std::net::SocketAddr;

use marketplace_fulfillment::settings::{ConnectionUrl, Settings};
use marketplace_fulfillment::simulator::{RunningSimulator, Simulator, SimulatorConfig, Timings};
use marketplace_fulfillment::store;
use marketplace_fulfillment::world::{block_on_own_thread, simulator_env};
use secrecy::SecretString;
use sqlx::postgres::PgPool;
use tokio::net::TcpListener;
use uuid::Uuid;

/// Settings as the process environment gives them (so `DATABASE_URL` still points the tests
/// at another server), e.g. the base a `World` derives its names from.
pub fn base_settings() -> Settings {
    Settings::load(None).expect("settings from the environment")
}

/// [`base_settings`] with a fresh database name and a fresh RabbitMQ prefix.
pub fn test_settings() -> Settings {
    let mut settings = base_settings();
    let id = &Uuid::new_v4().simple().to_string()[..16];
    let database = format!("/fulfillment_test_{id}");
    settings.database.url = settings.database.url.with_path(&database);
    settings.amqp.prefix = format!("test-{id}");
    settings
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
        store::migrate(&db.settings.database).await.unwrap();
        let pool = store::connect(&db.settings.database).await.unwrap();
        (db, pool)
    }

    pub fn url(&self) -> &ConnectionUrl {
        &self.settings.database.url
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let url = self.settings.database.url.clone();
        block_on_own_thread(async move { store::drop_database(&url).await });
    }
}

/// The client secret a [`simulator`] accepts.
pub const SIM_SECRET: &str = "simulator-test-secret";

/// The simulator alone on 127.0.0.1:0, the one start of the tests that need no database or
/// broker (a `World` starts it with those): a fresh publisher identity that knows
/// [`SIM_SECRET`], millisecond clocks, then `configure`.
pub async fn simulator(configure: impl FnOnce(&mut SimulatorConfig)) -> RunningSimulator {
    let mut config = SimulatorConfig::new(Uuid::new_v4(), Uuid::new_v4());
    config.client_secret = Some(SecretString::from(SIM_SECRET));
    config.timings = Timings::fast();
    configure(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::start(config, listener)
        .await
        .expect("the simulator")
}

/// Settings of an engine that `sim`'s variables ([`simulator_env`]) and `extra` (only
/// those, not this process's environment) point at the simulator.
pub fn simulator_settings(sim: &RunningSimulator, extra: &[(&str, String)]) -> Settings {
    let mut env: HashMap<String, String> = simulator_env(sim).into_iter().collect();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.clone())));
    Settings::from_sources(None, &env).expect("settings pointed at the simulator")
}

/// Serves `app` on 127.0.0.1:0 in the background (an endpoint of the test's own, e.g. where
/// webhooks go): its address.
pub async fn serve_local(app: axum::Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// Runs `fulfillment ARGS` with `env` on top of this process's environment (less
/// `FULFILLMENT_CONFIG`, `COLUMNS` and `RUST_LOG`), or on top of `PATH` alone when `clean`:
/// `(exit code, stdout, stderr)`.
pub async fn run_fulfillment<K: AsRef<OsStr>, V: AsRef<OsStr>>(
    args: &[&str],
    env: impl IntoIterator<Item = (K, V)>,
    clean: bool,
) -> (i32, String, String) {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_fulfillment"));
    let path = std::env::var_os("PATH").unwrap_or_default();
    match clean {
        true => command.env_clear().env("PATH", path),
        false => command
            .env_remove("FULFILLMENT_CONFIG")
            .env_remove("COLUMNS")
            .env_remove("RUST_LOG"),
    };
    let output = command.args(args).envs(env).output().await;
    let output = output.expect("run fulfillment");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    let code = output.status.code().unwrap_or(-1);
    (code, text(&output.stdout), text(&output.stderr))
}
