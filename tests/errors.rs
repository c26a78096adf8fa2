//! The errors a new user meets first, as the real binary prints them (issue #21): each names
//! its fix once, and the exit code tells an alert what happened — 0 all fine, 1 problems
//! found, 2 usage or configuration error, 3 could not check (a dependency unreachable).
//! Against the local PostgreSQL and RabbitMQ, with a fresh database and prefix per test.

mod common;

use common::TestDatabase;
use marketplace_fulfillment::queue::Broker;
use marketplace_fulfillment::settings::Settings;
use marketplace_fulfillment::world::free_local_address;

/// Runs `fulfillment ARGS` with only the variables given (plus PATH), no RUST_LOG:
/// `(exit code, stdout, stderr)`.
fn fulfillment(args: &[&str], env: &[(&str, String)]) -> (i32, String, String) {
    let env: Vec<_> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(common::run_fulfillment(args, env, true))
}

/// The environment of `settings`' database and prefix, and a publisher identity.
fn env_of(settings: &Settings) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", settings.database.url.expose().to_string()),
        ("AMQP_URL", settings.amqp.url.expose().to_string()),
        ("FULFILLMENT__AMQP__PREFIX", settings.amqp.prefix.clone()),
        (
            "MARKETPLACE_TENANT_ID",
            "11111111-1111-1111-1111-111111111111".into(),
        ),
        (
            "MARKETPLACE_CLIENT_ID",
            "22222222-2222-2222-2222-222222222222".into(),
        ),
        ("MARKETPLACE_CLIENT_SECRET", "errors-test-secret".into()),
        ("LISTEN_ADDR", "127.0.0.1:0".into()),
        ("WORKER_METRICS_ADDR", "127.0.0.1:0".into()),
        ("ENTITLEMENT_API_KEY", "errors-test-key".into()),
    ]
}

fn with(
    mut env: Vec<(&'static str, String)>,
    name: &'static str,
    value: String,
) -> Vec<(&'static str, String)> {
    env.retain(|(n, _)| *n != name);
    env.push((name, value));
    env
}

/// The message appears exactly once in `text`.
fn once(text: &str, needle: &str) {
    assert_eq!(
        text.matches(needle).count(),
        1,
        "expected {needle:?} exactly once in:\n{text}"
    );
}

#[test]
fn serve_before_migrate_says_run_migrate_once_and_exits_2() {
    let db = TestDatabase::new();
    let (code, _, err) = fulfillment(&["serve"], &env_of(&db.settings));
    assert_eq!(code, 2, "{err}");
    once(&err, "run `fulfillment migrate`");
    assert!(!err.contains("Is it running"), "{err}");
    assert!(!err.contains("pg_ctlcluster"), "{err}");
}

#[test]
fn an_unmigrated_database_says_the_schema_is_behind_and_exits_2() {
    let db = TestDatabase::new();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // The database exists, its schema does not.
    runtime.block_on(async {
        let admin = db.url().with_path("/postgres");
        let pool = sqlx::PgPool::connect(admin.expose()).await.unwrap();
        let name = db.url().url().path().trim_start_matches('/').to_string();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&pool)
            .await
            .unwrap();
        pool.close().await;
    });
    for args in [&["subscription", "list"][..], &["serve"], &["work"]] {
        let (code, _, err) = fulfillment(args, &env_of(&db.settings));
        assert_eq!(code, 2, "{args:?}: {err}");
        once(&err, "run `fulfillment migrate`");
        assert!(err.contains("schema"), "{args:?}: {err}");
        assert!(!err.contains("relation"), "{args:?}: {err}");
    }
}

#[test]
fn an_unknown_role_is_a_refused_login_and_exits_2() {
    let db = TestDatabase::new();
    let mut url = db.url().url().clone();
    url.set_username("no_such_role_for_errors_test").unwrap();
    let env = with(env_of(&db.settings), "DATABASE_URL", url.to_string());
    let (code, _, err) = fulfillment(&["subscription", "list"], &env);
    assert_eq!(code, 2, "{err}");
    once(&err, "refused the login");
    assert!(
        err.contains("Check the user and password in DATABASE_URL"),
        "{err}"
    );
    assert!(!err.contains("Is it running"), "{err}");
}

#[test]
fn a_wrong_port_is_unreachable_not_a_pool_timeout_and_exits_3() {
    let db = TestDatabase::new();
    let port = free_local_address().unwrap().port();
    let mut url = db.url().url().clone();
    url.set_port(Some(port)).unwrap();
    let env = with(env_of(&db.settings), "DATABASE_URL", url.to_string());
    let (code, _, err) = fulfillment(&["subscription", "list"], &env);
    assert_eq!(code, 3, "{err}");
    once(&err, "cannot reach PostgreSQL");
    assert!(
        err.contains("Check the host and port in DATABASE_URL"),
        "{err}"
    );
    assert!(!err.contains("pool timed out"), "{err}");
}

#[test]
fn reconcile_against_an_unreachable_microsoft_exits_3_not_1() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (db, pool) = runtime.block_on(TestDatabase::migrated());
    runtime.block_on(pool.close());
    let port = free_local_address().unwrap().port();
    let env = env_of(&db.settings);
    let env = with(
        env,
        "MARKETPLACE_API_URL",
        format!("http://127.0.0.1:{port}/api"),
    );
    let env = with(
        env,
        "ENTRA_AUTHORITY_URL",
        format!("http://127.0.0.1:{port}"),
    );
    let env = with(
        env,
        "FULFILLMENT__MARKETPLACE__REQUEST_TIMEOUT_SECS",
        "2".into(),
    );
    let (code, _, err) = fulfillment(&["reconcile"], &env);
    assert_eq!(code, 3, "{err}");
}

#[test]
fn a_mistyped_prefix_on_dlq_list_declares_nothing_names_the_known_prefixes_and_exits_2() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (db, pool) = runtime.block_on(TestDatabase::migrated());
    // The deployment's real prefix, as `serve` and `work` record it.
    let real = db.settings.amqp.prefix.clone();
    runtime.block_on(async {
        marketplace_fulfillment::store::prefixes::record(&pool, &real, "work")
            .await
            .unwrap();
        pool.close().await;
    });
    let typo = format!("{real}-typo");
    let env = with(
        env_of(&db.settings),
        "FULFILLMENT__AMQP__PREFIX",
        typo.clone(),
    );
    let (code, _, err) = fulfillment(&["dlq", "list"], &env);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("no topology with the prefix \"{typo}\"")),
        "{err}"
    );
    assert!(err.contains(&real), "the known prefix is named: {err}");
    // Nothing of the typo's topology was declared.
    let mut settings = db.settings.clone();
    settings.amqp.prefix = typo;
    let declared = runtime.block_on(Broker::connect_existing(&settings.amqp, "errors-test"));
    assert!(declared.is_err(), "dlq list declared the mistyped topology");
}

#[test]
fn dlq_list_with_rabbitmq_unreachable_exits_3() {
    let db = TestDatabase::new();
    let port = free_local_address().unwrap().port();
    let env = with(
        env_of(&db.settings),
        "AMQP_URL",
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
    );
    let (code, _, err) = fulfillment(&["dlq", "list"], &env);
    assert_eq!(code, 3, "{err}");
    once(&err, "cannot connect to RabbitMQ");
}

#[test]
fn a_wrong_rabbitmq_password_is_a_refused_login_and_exits_2() {
    let db = TestDatabase::new();
    let env = with(
        env_of(&db.settings),
        "AMQP_URL",
        "amqp://guest:wrong-password@127.0.0.1:5672/%2f".into(),
    );
    let (code, _, err) = fulfillment(&["dlq", "list"], &env);
    assert_eq!(code, 2, "{err}");
    once(&err, "refused the login");
    assert!(err.contains("AMQP_URL"), "{err}");
    assert!(
        !err.contains("wrong-password"),
        "the password is never printed: {err}"
    );
}

#[test]
fn every_option_of_every_command_has_a_description_and_help_lists_the_settings_read() {
    fn walk(command: &clap::Command, path: &str, undescribed: &mut Vec<String>) {
        for arg in command.get_arguments() {
            let name = arg.get_id().as_str();
            if matches!(name, "help" | "version") {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                undescribed.push(format!("`{path}` {name}"));
            }
        }
        for sub in command.get_subcommands() {
            walk(sub, &format!("{path} {}", sub.get_name()), undescribed);
        }
    }
    let mut undescribed = Vec::new();
    walk(
        &marketplace_fulfillment::cli::command(),
        "fulfillment",
        &mut undescribed,
    );
    assert!(
        undescribed.is_empty(),
        "options without a description:\n{}",
        undescribed.join("\n")
    );
    for args in [
        &["serve", "--help"][..],
        &["dlq", "list", "--help"],
        &["reconcile", "--help"],
    ] {
        let (code, text, _) = fulfillment(args, &[]);
        assert_eq!(code, 0, "{args:?}");
        assert!(text.contains("DATABASE_URL"), "{args:?}: {text}");
        assert!(text.contains("Exit codes: 0 all fine"), "{args:?}: {text}");
    }
}

#[test]
fn every_invalid_setting_is_reported_at_once_with_exit_2() {
    let db = TestDatabase::new();
    let env = with(env_of(&db.settings), "LOG_FORMAT", "xml".into());
    let env = with(env, "MARKETPLACE_TOKEN_ENDPOINT", "v3".into());
    let env = with(env, "AMQP_URL", "http://127.0.0.1:5672".into());
    let (code, _, err) = fulfillment(&["subscription", "list"], &env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("3 problems with the settings"), "{err}");
    for key in ["log.format", "marketplace.token_endpoint", "amqp.url"] {
        assert!(err.contains(key), "{key} not named: {err}");
    }
}

#[test]
fn serve_names_every_missing_setting_at_once_before_connecting_anywhere() {
    // PostgreSQL and RabbitMQ on closed ports: connecting first would exit 3.
    let port = free_local_address().unwrap().port();
    let env = vec![
        (
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{port}/fulfillment"),
        ),
        (
            "AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        ),
    ];
    for command in ["serve", "work", "reconcile"] {
        let (code, _, err) = fulfillment(&[command], &env);
        assert_eq!(code, 2, "{command}: {err}");
        for needle in [
            "3 problems with the settings",
            "MARKETPLACE_TENANT_ID",
            "MARKETPLACE_CLIENT_ID",
            "no credential for the Fulfillment API",
        ] {
            assert!(err.contains(needle), "{command}: {needle} not in {err}");
        }
    }
}
