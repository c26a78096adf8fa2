//! `fulfillment doctor` as the real binary, with an explicit environment, against the local
//! PostgreSQL and RabbitMQ (a fresh database and prefix per test) and the simulator on port
//! 0: a correct setup passes every check; each seeded misconfiguration exits 1 naming the
//! problem and its fix; unparsable settings exit 2.

mod common;

use common::{TestDatabase, base_settings, run_fulfillment};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use marketplace_fulfillment::store;
use marketplace_fulfillment::world::{
    World, WorldOptions, block_on_own_thread, free_local_address, run_tool,
};
use serde_json::Value;
use uuid::Uuid;

/// A correct local deployment: a migrated database, the declared topology, the simulator
/// as Microsoft.
async fn deployment() -> World {
    World::start(&base_settings(), WorldOptions::bare("test"))
        .await
        .unwrap()
}

/// The environment of a correct setup; `overrides` replace or add variables.
fn env(world: &World, overrides: &[(&str, String)]) -> Vec<(String, String)> {
    let mut env = world.process_env();
    env.push(("LISTEN_ADDR".into(), "127.0.0.1:8080".into()));
    env.push(("PUBLIC_URL".into(), "http://127.0.0.1:8080".into()));
    for (key, value) in overrides {
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.clone()));
    }
    env
}

/// `fulfillment doctor --json` with exactly this environment: (exit code, report).
async fn doctor_json(world: &World, overrides: &[(&str, String)]) -> (i32, Value, String) {
    let (code, stdout, stderr) =
        run_fulfillment(&["doctor", "--json"], env(world, overrides), true).await;
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("stdout is one JSON object ({e}):\n{stdout}\n{stderr}"));
    (code, report, stdout)
}

/// The check `name` of a JSON report.
fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {report:#}"))
}

/// This machine's CI PostgreSQL runs with `autovacuum = off` (conf.d/90-ci.conf), which the
/// doctor rightly reports; the tests cannot change a shared server, so they expect that one
/// problem exactly when the server has it.
async fn server_autovacuum_is_off(world: &World) -> bool {
    !store::autovacuum_enabled(&world.pool).await.unwrap()
}

/// The checks a correct setup may still fail on this server.
async fn expected_problems(world: &World) -> Vec<&'static str> {
    if server_autovacuum_is_off(world).await {
        vec!["postgres.autovacuum"]
    } else {
        Vec::new()
    }
}

#[tokio::test]
async fn a_correct_local_setup_passes_every_check() {
    let deployment = deployment().await;

    let expected = expected_problems(&deployment).await;
    let (code, report, stdout) = doctor_json(&deployment, &[]).await;
    assert_eq!(code, if expected.is_empty() { 0 } else { 1 }, "{report:#}");
    assert_eq!(report["ok"], expected.is_empty());
    for check in report["checks"].as_array().unwrap() {
        if expected.contains(&check["name"].as_str().unwrap()) {
            assert_eq!(check["status"], "problem", "{check:#}");
            continue;
        }
        assert_eq!(check["status"], "ok", "{check:#}");
        assert!(check["fix"].is_null(), "{check:#}");
    }
    assert!(
        check(&report, "rabbitmq.quorum")["detail"]
            .as_str()
            .unwrap()
            .contains("all 6 queues are quorum"),
        "{report:#}"
    );
    assert!(!stdout.contains(&deployment.client_secret));

    let (code, human, stderr) = run_fulfillment(&["doctor"], env(&deployment, &[]), true).await;
    if expected.is_empty() {
        assert_eq!(code, 0, "{human}{stderr}");
        assert!(human.ends_with("all 13 checks passed\n"), "{human}");
    } else {
        assert_eq!(code, 1, "{human}{stderr}");
        assert!(human.ends_with("1 problem found\n"), "{human}");
    }
    // Lines fit 80 columns, but for one holding a single word: a URL is never broken.
    assert!(
        human
            .lines()
            .all(|l| l.chars().count() <= 80 || !l.trim().contains(' ')),
        "{human}"
    );
    let secret = deployment.client_secret.as_str();
    assert!(!human.contains(secret) && !stderr.contains(secret));
    assert!(stderr.is_empty(), "{stderr}");
    println!("{human}");

    deployment.teardown().await.unwrap();
}

/// One misconfiguration: the environment it takes, the check that must name it, words of
/// the detail and words of the fix.
struct Seeded {
    what: &'static str,
    env: Vec<(&'static str, String)>,
    check: &'static str,
    detail: &'static str,
    fix: &'static str,
}

#[tokio::test]
async fn each_seeded_misconfiguration_exits_1_naming_the_problem_and_its_fix() {
    let deployment = deployment().await;
    let closed = free_local_address().unwrap().port();
    // Another publisher's simulator: its API refuses tokens of ours, as Microsoft refuses
    // an app that is not the one of the offer.
    let other = common::simulator(|_| {}).await;
    let amqp = deployment.settings.amqp.url.url().clone();
    let with_password = |password: &str| {
        let mut url = amqp.clone();
        url.set_password(Some(password)).unwrap();
        url.to_string()
    };
    let with_vhost = |vhost: &str| {
        let mut url = amqp.clone();
        url.set_path(vhost);
        url.to_string()
    };
    let cases = vec![
        Seeded {
            what: "wrong tenant",
            env: vec![("MARKETPLACE_TENANT_ID", Uuid::new_v4().to_string())],
            check: "entra.token",
            detail: "AADSTS90002",
            fix: "MARKETPLACE_TENANT_ID",
        },
        Seeded {
            what: "wrong client id",
            env: vec![("MARKETPLACE_CLIENT_ID", Uuid::new_v4().to_string())],
            check: "entra.token",
            detail: "AADSTS700016",
            fix: "MARKETPLACE_CLIENT_ID",
        },
        Seeded {
            what: "wrong client secret",
            env: vec![("MARKETPLACE_CLIENT_SECRET", "not-the-secret".into())],
            check: "entra.token",
            detail: "invalid_client AADSTS7000215",
            fix: "MARKETPLACE_CLIENT_SECRET",
        },
        Seeded {
            what: "an app that is not the offer's",
            env: vec![("MARKETPLACE_API_URL", other.api_url().to_string())],
            check: "marketplace.api",
            detail: "not the one registered in the offer's technical configuration",
            fix: "Technical configuration",
        },
        Seeded {
            what: "unreachable broker",
            env: vec![(
                "AMQP_URL",
                format!("amqp://guest:guest@127.0.0.1:{closed}/%2f"),
            )],
            check: "rabbitmq.reachable",
            detail: "cannot reach RabbitMQ",
            fix: "start RabbitMQ",
        },
        Seeded {
            what: "wrong broker password",
            env: vec![("AMQP_URL", with_password("not-the-password"))],
            check: "rabbitmq.reachable",
            detail: "refused the login",
            fix: "password in AMQP_URL",
        },
        Seeded {
            what: "missing vhost",
            env: vec![("AMQP_URL", with_vhost("/doctor-no-such-vhost"))],
            check: "rabbitmq.reachable",
            detail: "no such virtual host",
            fix: "add_vhost",
        },
        Seeded {
            what: "topology of another prefix",
            env: vec![(
                "FULFILLMENT__AMQP__PREFIX",
                format!("doctor-absent-{}", Uuid::new_v4().simple()),
            )],
            check: "rabbitmq.topology",
            detail: "none of the 9 exchanges and queues",
            fix: "fulfillment work",
        },
        Seeded {
            what: "empty webhook audience",
            env: vec![("WEBHOOK_AUDIENCES", " , ".into())],
            check: "webhook.audiences",
            detail: "no webhook audience",
            fix: "WEBHOOK_AUDIENCES",
        },
        Seeded {
            what: "malformed webhook audience",
            env: vec![("WEBHOOK_AUDIENCES", "contoso-webhooks".into())],
            check: "webhook.audiences",
            detail: "\"contoso-webhooks\" is neither an application id",
            fix: "WEBHOOK_AUDIENCES",
        },
        Seeded {
            what: "unreachable JWKS",
            env: vec![(
                "WEBHOOK_JWKS_URL",
                format!("http://127.0.0.1:{closed}/keys"),
            )],
            check: "webhook.jwks",
            detail: "cannot fetch",
            fix: "WEBHOOK_JWKS_URL",
        },
        Seeded {
            what: "HTTP public URL on a non-loopback host",
            env: vec![
                ("PUBLIC_URL", "http://fulfillment.contoso.com".into()),
                ("LISTEN_ADDR", "0.0.0.0:8080".into()),
            ],
            check: "http.urls",
            detail: "is not HTTPS",
            fix: "https://",
        },
        Seeded {
            what: "ingress on loopback behind a public URL",
            env: vec![("PUBLIC_URL", "https://fulfillment.contoso.com".into())],
            check: "http.urls",
            detail: "listens on 127.0.0.1:8080 (this host only)",
            fix: "LISTEN_ADDR",
        },
    ];
    // Certificate credentials (issue #20): one registered on the app but expired, one valid
    // but never uploaded to the app.
    let now = time::OffsetDateTime::now_utc();
    let generate = |from: i64, to: i64| {
        marketplace_fulfillment::marketplace::credential::generate_self_signed(
            "doctor-test",
            now + time::Duration::days(from),
            now + time::Duration::days(to),
        )
        .unwrap()
    };
    let dir = std::env::temp_dir().join(format!("doctor-certs-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (expired_cert, expired_key) = generate(-400, -3);
    deployment
        .sim
        .register_client_certificate(&expired_cert)
        .unwrap();
    let expired = dir.join("expired.pem");
    std::fs::write(&expired, format!("{expired_cert}{expired_key}")).unwrap();
    let (unknown_cert, unknown_key) = generate(-1, 300);
    let unknown = dir.join("unknown.pem");
    std::fs::write(&unknown, format!("{unknown_cert}{unknown_key}")).unwrap();
    let certificate = |path: &std::path::Path| {
        vec![
            ("MARKETPLACE_CLIENT_SECRET", String::new()),
            (
                "MARKETPLACE_CLIENT_CERTIFICATE_PATH",
                path.display().to_string(),
            ),
        ]
    };
    let mut cases = cases;
    cases.push(Seeded {
        what: "expired certificate",
        env: certificate(&expired),
        check: "entra.credential",
        detail: "expired 3 days ago",
        fix: "MARKETPLACE_CLIENT_CERTIFICATE_PATH",
    });
    cases.push(Seeded {
        what: "certificate not uploaded to the app",
        env: certificate(&unknown),
        check: "entra.token",
        detail: "AADSTS700027",
        fix: "upload its public part",
    });
    let environmental = expected_problems(&deployment).await;
    let mut failures = Vec::new();
    for case in &cases {
        let (code, report, stdout) = doctor_json(&deployment, &case.env).await;
        let named = check(&report, case.check);
        let detail = named["detail"].as_str().unwrap_or_default();
        let fix = named["fix"].as_str().unwrap_or_default();
        let right = code == 1
            && report["ok"] == false
            && named["status"] == "problem"
            && detail.contains(case.detail)
            && fix.contains(case.fix);
        if !right {
            failures.push(format!("{}: exit {code}, {named:#}", case.what));
        }
        let others: Vec<&str> = report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "problem" && c["name"] != case.check)
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        // A wrong tenant also moves the derived JWKS URL; nothing else may be affected.
        let allowed: &[&str] = match case.what {
            "wrong tenant" => &["webhook.jwks"],
            "expired certificate" => &["entra.token"],
            _ => &[],
        };
        if others
            .iter()
            .any(|name| !allowed.contains(name) && !environmental.contains(name))
        {
            failures.push(format!(
                "{}: other checks failed too: {others:?}",
                case.what
            ));
        }
        for secret in [
            &deployment.client_secret,
            "not-the-secret",
            "not-the-password",
        ] {
            assert!(!stdout.contains(secret), "{}: {secret} printed", case.what);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    other.shutdown().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    deployment.teardown().await.unwrap();
}

#[tokio::test]
async fn a_missing_or_unmigrated_database_asks_for_migrate() {
    let deployment = deployment().await;

    let missing = TestDatabase::new();
    let url = missing.url().expose().to_string();
    let (code, report, _) = doctor_json(&deployment, &[("DATABASE_URL", url.clone())]).await;
    assert_eq!(code, 1, "{report:#}");
    let reachable = check(&report, "postgres.reachable");
    assert_eq!(reachable["status"], "problem");
    assert!(
        reachable["detail"]
            .as_str()
            .unwrap()
            .contains("database is missing")
    );
    assert_eq!(
        reachable["fix"],
        "run `fulfillment migrate` (it creates the database and the schema)"
    );
    assert_eq!(check(&report, "postgres.migrated")["status"], "skipped");

    // The database exists, without the schema.
    let admin = sqlx::PgPool::connect(missing.url().with_path("/postgres").expose())
        .await
        .unwrap();
    let name = missing
        .url()
        .url()
        .path()
        .trim_start_matches('/')
        .to_string();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
        .execute(&admin)
        .await
        .unwrap();
    admin.close().await;
    let (code, report, _) = doctor_json(&deployment, &[("DATABASE_URL", url)]).await;
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(check(&report, "postgres.reachable")["status"], "ok");
    let migrated = check(&report, "postgres.migrated");
    assert_eq!(migrated["status"], "problem", "{migrated:#}");
    assert!(migrated["detail"].as_str().unwrap().contains("no schema"));
    assert_eq!(migrated["fix"], "run `fulfillment migrate`");
    let autovacuum = if server_autovacuum_is_off(&deployment).await {
        "problem"
    } else {
        "ok"
    };
    assert_eq!(check(&report, "postgres.autovacuum")["status"], autovacuum);

    drop(missing);
    deployment.teardown().await.unwrap();
}

#[tokio::test]
async fn a_classic_queue_is_found_without_declaring_anything() {
    let deployment = deployment().await;
    let prefix = format!("doctor-classic-{}", Uuid::new_v4().simple());
    let inbound = format!("{prefix}.inbound");
    let connection = Connection::connect(
        deployment.settings.amqp.url.expose(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_declare(
            inbound.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let (code, report, _) = doctor_json(
        &deployment,
        &[("FULFILLMENT__AMQP__PREFIX", prefix.clone())],
    )
    .await;
    assert_eq!(code, 1, "{report:#}");
    let quorum = check(&report, "rabbitmq.quorum");
    assert_eq!(quorum["status"], "problem", "{quorum:#}");
    assert_eq!(quorum["detail"], format!("not quorum queues: {inbound}"));
    let topology = check(&report, "rabbitmq.topology")["detail"]
        .as_str()
        .unwrap();
    assert!(topology.contains("8 of 9"), "{topology}");

    // Still only the one queue: the doctor declared nothing.
    let absent = connection.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    assert!(
        absent
            .queue_declare(
                format!("{prefix}.inbound.dlq").as_str().into(),
                passive,
                FieldTable::default()
            )
            .await
            .is_err()
    );
    channel
        .queue_delete(inbound.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = connection.close(200, "done".into()).await;
    deployment.teardown().await.unwrap();
}

/// A PostgreSQL server of the test's own (initdb in /tmp, a free port, autovacuum at its
/// default `on`), stopped and removed on drop. The shared server is never touched.
struct PrivatePostgres {
    dir: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("fulfillment-doctor-pg-{}", Uuid::new_v4()));
        let port = free_local_address().unwrap().port();
        let dir_text = dir.to_str().unwrap().to_string();
        let init = [
            "-D",
            &dir_text,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ];
        Self::run("initdb", &init).await.unwrap();
        let options = format!("-p {port} -k {dir_text} -c listen_addresses=127.0.0.1");
        let log = format!("{dir_text}/log");
        let start = ["-D", &dir_text, "-o", &options, "-w", "-l", &log, "start"];
        Self::run("pg_ctl", &start).await.unwrap();
        Self { dir, port }
    }

    /// Runs a PostgreSQL tool (`world::run_tool`), as the `postgres` user when the tests
    /// run as root (initdb refuses root).
    async fn run(tool: &str, args: &[&str]) -> anyhow::Result<String> {
        let root = std::env::var("USER").is_ok_and(|u| u == "root")
            || run_tool("id", &["-u"]).await.is_ok_and(|uid| uid == "0\n");
        let tool = format!("/usr/lib/postgresql/15/bin/{tool}");
        let as_postgres = [&["-u", "postgres", "--", tool.as_str()], args].concat();
        match root {
            true => run_tool("runuser", &as_postgres).await,
            false => run_tool(&tool, args).await,
        }
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/fulfillment_doctor",
            self.port
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let dir = self.dir.to_str().unwrap().to_string();
        block_on_own_thread(async move {
            Self::run("pg_ctl", &["-D", &dir, "-m", "immediate", "stop"]).await
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shared server runs without autovacuum on this machine; a private one with the
/// default shows a correct setup passing every check.
#[tokio::test]
async fn a_correct_setup_exits_0_on_a_server_with_autovacuum() {
    let deployment = deployment().await;
    if !server_autovacuum_is_off(&deployment).await {
        // The shared server is correct: the test above already expects exit 0.
        deployment.teardown().await.unwrap();
        return;
    }
    let postgres = PrivatePostgres::start().await;
    let database = [("DATABASE_URL".to_string(), postgres.url())];
    let (code, stdout, stderr) = run_fulfillment(&["migrate"], database, true).await;
    assert_eq!(code, 0, "{stdout}{stderr}");

    let env = env(&deployment, &[("DATABASE_URL", postgres.url())]);
    let (code, human, stderr) = run_fulfillment(&["doctor"], env, true).await;
    assert_eq!(code, 0, "{human}{stderr}");
    assert!(human.ends_with("all 13 checks passed\n"), "{human}");
    assert!(
        !human.contains("problem") && !human.contains("skipped"),
        "{human}"
    );
    println!("{human}");

    drop(postgres);
    deployment.teardown().await.unwrap();
}

#[tokio::test]
async fn unparsable_settings_exit_2_with_the_setting_named() {
    let env = vec![
        ("LISTEN_ADDR".to_string(), "nowhere".to_string()),
        (
            "PATH".to_string(),
            std::env::var("PATH").unwrap_or_default(),
        ),
    ];
    let (code, stdout, _) = run_fulfillment(&["doctor", "--json"], env.clone(), true).await;
    assert_eq!(code, 2, "{stdout}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["ok"], false);
    let config = check(&report, "config");
    assert_eq!(config["status"], "problem");
    assert!(
        config["detail"].as_str().unwrap().contains("LISTEN_ADDR"),
        "{config:#}"
    );
    assert_eq!(check(&report, "postgres.reachable")["status"], "skipped");

    let (code, human, _) = run_fulfillment(&["doctor"], env, true).await;
    assert_eq!(code, 2);
    assert!(human.starts_with("problem  config"), "{human}");
}
