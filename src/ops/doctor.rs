//! `fulfillment doctor`: a read-only preflight of a deployment. It asks each dependency one
//! cheap question with a short deadline — PostgreSQL, RabbitMQ, Entra, the Fulfillment API,
//! the webhook JWKS — and turns the raw answers, together with the settings, into one
//! verdict per check (ok / problem / skipped because an earlier check failed) with the fix
//! in words.
//!
//! The probes ([`probe`]) do the IO and keep what they saw; [`verdicts`] is a pure function
//! from the settings and those observations to the checks, so every answer class is
//! unit-tested without a network. Nothing is written anywhere: the database is only read,
//! the broker is inspected passively ([`crate::queue::inspect`]), the Fulfillment API is
//! asked for page 1 of List subscriptions. Secrets never reach the output; connection URLs
//! are printed redacted.
//!
//! Exit codes: 0 every check passed, 1 a problem was found, 2 the settings do not parse.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use url::{Host, Url};
use uuid::Uuid;

use crate::marketplace::token::CredentialStatus;
use crate::marketplace::{CallContext, Error, MarketplaceClient, RetryPolicy, TokenProvider};
use crate::queue::inspect::{self, BrokerFailure, Presence, QueueKind, TopologyInspection};
use crate::settings::{Settings, SettingsError, WebhookAuth};
use crate::store::{self, ConnectFailure};

/// The deadline of each network call.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Print one JSON object (`{"ok", "checks": [{"name", "status", "detail", "fix"}]}`).
    #[arg(long)]
    pub json: bool,
}

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Problem,
    /// Not checked because a check it depends on failed (or it does not apply).
    Skipped,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Problem => "problem",
            Status::Skipped => "skipped",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable: `postgres.migrated`, `entra.token`, …
    pub name: &'static str,
    pub status: Status,
    pub detail: String,
    /// What to do, for a problem.
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn problem(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Problem,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn skipped(name: &'static str, because: impl Into<String>) -> Self {
        Self {
            name,
            status: Status::Skipped,
            detail: because.into(),
            fix: None,
        }
    }
}

/// Every check, in the order they are printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub ok: bool,
    pub checks: Vec<Check>,
}

impl Report {
    fn new(checks: Vec<Check>) -> Self {
        Self {
            ok: checks.iter().all(|c| c.status != Status::Problem),
            checks,
        }
    }

    /// The report of settings that do not parse: every other check is skipped.
    pub fn unparsable(error: &SettingsError) -> Self {
        let mut checks = vec![Check::problem(
            "config",
            error.to_string(),
            "correct the setting named above (docs/configuration.md lists every variable)",
        )];
        checks.extend(
            CHECK_NAMES[1..]
                .iter()
                .map(|name| Check::skipped(name, "the configuration does not parse")),
        );
        Self::new(checks)
    }

    /// One line per check (`status  name  detail`, wrapped to 80 columns), the fix under a
    /// problem, and a summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for check in &self.checks {
            let head = format!(
                "{:<STATUS_WIDTH$}{:<NAME_WIDTH$}",
                check.status.label(),
                check.name
            );
            push_wrapped(&mut out, &head, &check.detail);
            if let Some(fix) = &check.fix {
                push_wrapped(&mut out, &format!("{:STATUS_WIDTH$}fix: ", ""), fix);
            }
        }
        let problems = self
            .checks
            .iter()
            .filter(|c| c.status == Status::Problem)
            .count();
        match problems {
            0 => {
                let _ = writeln!(out, "all {} checks passed", self.checks.len());
            }
            1 => out.push_str("1 problem found\n"),
            n => {
                let _ = writeln!(out, "{n} problems found");
            }
        }
        out
    }
}

const STATUS_WIDTH: usize = 9;
const NAME_WIDTH: usize = 21;
const LINE_WIDTH: usize = 80;

/// `head` then `text` word-wrapped to [`LINE_WIDTH`], continuation lines indented to the
/// text's column. A word longer than the column (a URL) gets a line of its own and is
/// never broken, so it can still be copied.
fn push_wrapped(out: &mut String, head: &str, text: &str) {
    let indent = head.chars().count();
    let width = LINE_WIDTH.saturating_sub(indent).max(20);
    let mut line = String::new();
    let mut first = true;
    let flush = |line: &mut String, first: &mut bool, out: &mut String| {
        if *first {
            out.push_str(head);
            *first = false;
        } else {
            out.push_str(&" ".repeat(indent));
        }
        out.push_str(line.trim_end());
        out.push('\n');
        line.clear();
    };
    for word in text.split_whitespace() {
        if !line.is_empty() && line.chars().count() + 1 + word.chars().count() > width {
            flush(&mut line, &mut first, out);
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(word);
    }
    if !line.is_empty() || first {
        flush(&mut line, &mut first, out);
    }
}

/// The checks, in order.
pub const CHECK_NAMES: [&str; 13] = [
    "config",
    "postgres.reachable",
    "postgres.migrated",
    "postgres.autovacuum",
    "rabbitmq.reachable",
    "rabbitmq.topology",
    "rabbitmq.quorum",
    "entra.credential",
    "entra.token",
    "marketplace.api",
    "webhook.jwks",
    "webhook.audiences",
    "http.urls",
];

/// What PostgreSQL answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseFacts {
    /// Versions of the applied migrations, or why they could not be read.
    pub applied: Result<Vec<i64>, String>,
    pub autovacuum: Result<bool, String>,
}

/// What Entra answered to the token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenOutcome {
    /// The settings lack what a token request needs (the message names the variables).
    NotConfigured(String),
    Obtained,
    /// Entra answered with an error: `error` is the OAuth code (`invalid_client`), `code`
    /// the `AADSTS…` number, `description` Entra's text.
    Refused {
        status: Option<u16>,
        error: Option<String>,
        code: Option<String>,
        description: Option<String>,
    },
    /// No answer (connection refused, DNS, timeout), or Entra's own trouble (429, 5xx).
    Unreachable(String),
}

/// What the Fulfillment API answered to List subscriptions, page 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiOutcome {
    Answered { subscriptions: usize },
    Status { status: u16, detail: String },
    Unreachable(String),
}

/// What the JWKS URL answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksOutcome {
    /// Not fetched: webhook authentication is off, or no URL could be derived.
    NotApplicable(String),
    Keys(usize),
    Status(u16),
    Unreadable(String),
    Unreachable(String),
}

/// The raw outcome of every probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probes {
    pub database: Result<DatabaseFacts, ConnectFailure>,
    pub broker: Result<TopologyInspection, BrokerFailure>,
    pub token: TokenOutcome,
    /// The credential in use and its expiry; `None` when none is configured.
    pub credential: Option<Result<CredentialStatus, String>>,
    /// `None` when no token was obtained.
    pub api: Option<ApiOutcome>,
    /// The URL fetched (or that would be) and its outcome.
    pub jwks: (Option<Url>, JwksOutcome),
}

/// Runs `fulfillment doctor`: probes, prints, and returns the exit code.
pub async fn run(settings: &Settings, args: DoctorArgs) -> anyhow::Result<ExitCode> {
    let probes = probe(settings).await;
    let expected: Vec<i64> = store::MIGRATOR
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .map(|m| m.version)
        .collect();
    let report = Report::new(verdicts(settings, &expected, &probes));
    print_report(&report, args.json);
    Ok(exit_code(&report))
}

/// Prints the report: JSON alone on stdout, or the human table.
pub fn print_report(report: &Report, json: bool) {
    let text = if json {
        match serde_json::to_string_pretty(report) {
            Ok(text) => text + "\n",
            Err(e) => {
                eprintln!("error: cannot render the report: {e}");
                return;
            }
        }
    } else {
        report.render()
    };
    // A closed pipe (`doctor | head`) is the reader's choice, not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
}

pub fn exit_code(report: &Report) -> ExitCode {
    if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Asks every dependency its question, concurrently, each within [`PROBE_TIMEOUT`].
pub async fn probe(settings: &Settings) -> Probes {
    let (database, broker, (credential, token, api), jwks) = tokio::join!(
        probe_database(settings),
        inspect::inspect_topology(&settings.amqp, PROBE_TIMEOUT),
        probe_marketplace(settings),
        probe_jwks(settings),
    );
    Probes {
        database,
        broker,
        token,
        credential,
        api,
        jwks,
    }
}

async fn probe_database(settings: &Settings) -> Result<DatabaseFacts, ConnectFailure> {
    let mut connection = store::connect_once(&settings.database.url, PROBE_TIMEOUT).await?;
    let applied = within(
        tokio::time::timeout(PROBE_TIMEOUT, store::applied_migrations(&mut connection)).await,
    );
    let autovacuum = within(
        tokio::time::timeout(PROBE_TIMEOUT, store::autovacuum_enabled(&mut connection)).await,
    );
    let _ = tokio::time::timeout(PROBE_TIMEOUT, sqlx::Connection::close(connection)).await;
    Ok(DatabaseFacts {
        applied,
        autovacuum,
    })
}

fn within<T>(
    answer: Result<Result<T, store::StoreError>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    match answer {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

type CredentialProbe = Option<Result<CredentialStatus, String>>;

async fn probe_marketplace(
    settings: &Settings,
) -> (CredentialProbe, TokenOutcome, Option<ApiOutcome>) {
    let mut short = settings.clone();
    short.marketplace.request_timeout = short.marketplace.request_timeout.min(PROBE_TIMEOUT);
    let marketplace = short.marketplace.clone();
    let tokens = match TokenProvider::for_settings(&short) {
        Ok(tokens) => tokens,
        Err(error) => return (None, TokenOutcome::NotConfigured(error.to_string()), None),
    };
    let credential = Some(tokens.credential_status());
    let (token, api) = probe_api(&marketplace, tokens).await;
    (credential, token, api)
}

async fn probe_api(
    marketplace: &crate::settings::MarketplaceSettings,
    tokens: TokenProvider,
) -> (TokenOutcome, Option<ApiOutcome>) {
    if let Err(error) = tokens.token().await {
        return (token_outcome(&error), None);
    }
    let client = match MarketplaceClient::new(marketplace, tokens) {
        Ok(client) => client.with_retry_policy(RetryPolicy::never()),
        Err(error) => {
            return (
                TokenOutcome::Obtained,
                Some(ApiOutcome::Unreachable(error.to_string())),
            );
        }
    };
    let api = match client
        .list_subscriptions_page(&CallContext::random(), None)
        .await
    {
        Ok(page) => ApiOutcome::Answered {
            subscriptions: page.into_value().subscriptions.len(),
        },
        Err(error) => match error.failure().and_then(|f| f.status) {
            Some(status) => ApiOutcome::Status {
                status,
                detail: error.to_string(),
            },
            None => ApiOutcome::Unreachable(error.to_string()),
        },
    };
    (TokenOutcome::Obtained, Some(api))
}

/// Entra's answer as the verdict needs it: the OAuth error and the `AADSTS` code.
fn token_outcome(error: &Error) -> TokenOutcome {
    match error {
        Error::Configuration { message } => TokenOutcome::NotConfigured(message.clone()),
        _ => match error.failure() {
            // 400/401/403 are Entra refusing these credentials; 429 and 5xx are Entra's
            // trouble, not ours.
            Some(failure) if matches!(failure.status, Some(400 | 401 | 403)) => {
                let body: Option<serde_json::Value> = failure
                    .body
                    .as_deref()
                    .and_then(|b| serde_json::from_str(b).ok());
                let field = |name: &str| {
                    body.as_ref()
                        .and_then(|b| b.get(name))
                        .and_then(|v| v.as_str())
                        .map(str::to_owned)
                };
                let description = field("error_description");
                TokenOutcome::Refused {
                    status: failure.status,
                    error: field("error"),
                    code: description.as_deref().and_then(aadsts_code),
                    description: description.map(|d| first_sentence(&d)),
                }
            }
            _ => TokenOutcome::Unreachable(error.to_string()),
        },
    }
}

/// `AADSTS700016` out of Entra's `error_description`.
fn aadsts_code(description: &str) -> Option<String> {
    let start = description.find("AADSTS")?;
    let code: String = description[start..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    (code.len() > "AADSTS".len()).then_some(code)
}

/// Entra's descriptions end with trace and correlation ids and timestamps: keep the first
/// line, without the `AADSTS…:` prefix.
fn first_sentence(description: &str) -> String {
    let line = description.lines().next().unwrap_or_default();
    let line = match line.split_once(": ") {
        Some((code, rest)) if code.starts_with("AADSTS") => rest,
        _ => line,
    };
    match line.find(" Trace ID:") {
        Some(end) => line[..end].trim().to_string(),
        None => line.trim().to_string(),
    }
}

/// The JWKS the ingress would fetch: `ingress.jwks_url`, or the one derived from the
/// authority and the tenant.
pub fn jwks_url(settings: &Settings) -> Option<Url> {
    settings.ingress.jwks_url.clone().or_else(|| {
        settings.marketplace.tenant_id.and_then(|tenant| {
            crate::http::auth::default_jwks_url(&settings.marketplace.entra_authority_url, tenant)
                .ok()
        })
    })
}

async fn probe_jwks(settings: &Settings) -> (Option<Url>, JwksOutcome) {
    if settings.ingress.webhook_auth == WebhookAuth::InsecureNone {
        return (
            None,
            JwksOutcome::NotApplicable("webhook authentication is off (WEBHOOK_AUTH=none)".into()),
        );
    }
    let Some(url) = jwks_url(settings) else {
        return (
            None,
            JwksOutcome::NotApplicable(
                "no WEBHOOK_JWKS_URL, and no MARKETPLACE_TENANT_ID to derive it from".into(),
            ),
        );
    };
    let http = match reqwest::Client::builder().timeout(PROBE_TIMEOUT).build() {
        Ok(http) => http,
        Err(error) => return (Some(url), JwksOutcome::Unreachable(error.to_string())),
    };
    let outcome = match http.get(url.clone()).send().await {
        Err(error) => JwksOutcome::Unreachable(without_url(&error)),
        Ok(response) if !response.status().is_success() => {
            JwksOutcome::Status(response.status().as_u16())
        }
        Ok(response) => match response.bytes().await {
            Err(error) => JwksOutcome::Unreachable(without_url(&error)),
            Ok(body) => match crate::http::auth::parse_jwks(&body) {
                Ok(keys) => JwksOutcome::Keys(keys.len()),
                Err(error) => JwksOutcome::Unreadable(error.to_string()),
            },
        },
    };
    (Some(url), outcome)
}

/// reqwest's message with its root cause, without repeating the URL (printed beside it).
fn without_url(error: &reqwest::Error) -> String {
    let mut message = if error.is_timeout() {
        format!("no answer within {PROBE_TIMEOUT:?}")
    } else if error.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = std::error::Error::source(error);
    let mut root = None;
    while let Some(cause) = source {
        root = Some(cause.to_string());
        source = cause.source();
    }
    if let Some(root) = root {
        message.push_str(": ");
        message.push_str(&root);
    }
    message
}

/// The verdicts, from the settings and what the probes saw. `expected_migrations` are the
/// versions embedded in this binary.
pub fn verdicts(settings: &Settings, expected_migrations: &[i64], probes: &Probes) -> Vec<Check> {
    let mut checks = vec![Check::ok(
        "config",
        "settings parsed (defaults, settings file, environment)",
    )];
    checks.extend(database_verdicts(
        settings,
        expected_migrations,
        &probes.database,
    ));
    checks.extend(broker_verdicts(settings, &probes.broker));
    checks.push(credential_verdict(
        probes.credential.as_ref(),
        time::OffsetDateTime::now_utc(),
    ));
    checks.extend(marketplace_verdicts(
        settings,
        &probes.token,
        probes.api.as_ref(),
    ));
    checks.push(jwks_verdict(&probes.jwks));
    checks.push(audiences_verdict(settings));
    checks.push(urls_verdict(settings));
    checks
}

fn database_verdicts(
    settings: &Settings,
    expected: &[i64],
    database: &Result<DatabaseFacts, ConnectFailure>,
) -> Vec<Check> {
    let url = settings.database.url.redacted();
    let facts = match database {
        Ok(facts) => facts,
        Err(failure) => {
            let reachable = match failure {
                ConnectFailure::Unreachable(why) => Check::problem(
                    "postgres.reachable",
                    format!("cannot reach PostgreSQL at {url}: {why}"),
                    "start PostgreSQL, or correct the host and port in DATABASE_URL",
                ),
                ConnectFailure::AuthenticationFailed(why) => Check::problem(
                    "postgres.reachable",
                    format!("PostgreSQL at {url} refused the login: {why}"),
                    "correct the user and password in DATABASE_URL (or the server's pg_hba.conf)",
                ),
                ConnectFailure::DatabaseMissing(why) => Check::problem(
                    "postgres.reachable",
                    format!("the database is missing at {url}: {why}"),
                    "run `fulfillment migrate` (it creates the database and the schema)",
                ),
                ConnectFailure::Refused(why) => Check::problem(
                    "postgres.reachable",
                    format!("PostgreSQL at {url} refused the connection: {why}"),
                    "read PostgreSQL's message above; check DATABASE_URL",
                ),
            };
            return vec![
                reachable,
                Check::skipped("postgres.migrated", "PostgreSQL could not be reached"),
                Check::skipped("postgres.autovacuum", "PostgreSQL could not be reached"),
            ];
        }
    };
    let migrated = match &facts.applied {
        Err(why) => Check::problem(
            "postgres.migrated",
            format!("cannot read the applied migrations: {why}"),
            "check that the user of DATABASE_URL may read _sqlx_migrations",
        ),
        Ok(applied) => {
            let applied: BTreeSet<i64> = applied.iter().copied().collect();
            let expected: BTreeSet<i64> = expected.iter().copied().collect();
            let missing: Vec<String> = expected.difference(&applied).map(i64::to_string).collect();
            let unknown: Vec<String> = applied.difference(&expected).map(i64::to_string).collect();
            if applied.is_empty() {
                Check::problem(
                    "postgres.migrated",
                    format!(
                        "the database has no schema (0 of {} migrations)",
                        expected.len()
                    ),
                    "run `fulfillment migrate`",
                )
            } else if !missing.is_empty() {
                Check::problem(
                    "postgres.migrated",
                    format!(
                        "the schema is behind this binary: {} of {} migrations applied, missing {}",
                        expected.len() - missing.len(),
                        expected.len(),
                        missing.join(", ")
                    ),
                    "run `fulfillment migrate`",
                )
            } else if !unknown.is_empty() {
                Check::problem(
                    "postgres.migrated",
                    format!(
                        "the schema is ahead of this binary: migrations {} are unknown to it",
                        unknown.join(", ")
                    ),
                    "deploy the binary that applied them (this one is older than the schema)",
                )
            } else {
                Check::ok(
                    "postgres.migrated",
                    format!("all {} migrations applied", expected.len()),
                )
            }
        }
    };
    let autovacuum = match facts.autovacuum {
        Ok(true) => Check::ok("postgres.autovacuum", "autovacuum is on"),
        Ok(false) => Check::problem(
            "postgres.autovacuum",
            "autovacuum is off: the outbox and inbox tables will bloat",
            "set `autovacuum = on` in postgresql.conf and reload (SELECT pg_reload_conf())",
        ),
        Err(ref why) => Check::problem(
            "postgres.autovacuum",
            format!("cannot read the autovacuum setting: {why}"),
            "check the user's rights on the database",
        ),
    };
    vec![
        Check::ok("postgres.reachable", format!("connected to {url}")),
        migrated,
        autovacuum,
    ]
}

fn broker_verdicts(
    settings: &Settings,
    broker: &Result<TopologyInspection, BrokerFailure>,
) -> Vec<Check> {
    let url = settings.amqp.url.redacted();
    let prefix = &settings.amqp.prefix;
    let inspection = match broker {
        Ok(inspection) => inspection,
        Err(failure) => {
            let reachable = match failure {
                BrokerFailure::Unreachable(why) => Check::problem(
                    "rabbitmq.reachable",
                    format!("cannot reach RabbitMQ at {url}: {why}"),
                    "start RabbitMQ, or correct the host and port in AMQP_URL",
                ),
                BrokerFailure::AuthenticationFailed(why) => Check::problem(
                    "rabbitmq.reachable",
                    format!("RabbitMQ at {url} refused the login: {why}"),
                    "correct the user and password in AMQP_URL",
                ),
                BrokerFailure::VhostMissing(why) => Check::problem(
                    "rabbitmq.reachable",
                    format!("RabbitMQ at {url} has no such virtual host for this user: {why}"),
                    "create it (`rabbitmqctl add_vhost V`, then `set_permissions`), or correct \
                     the path of AMQP_URL (`%2f` is the default vhost `/`)",
                ),
                BrokerFailure::Refused(why) => Check::problem(
                    "rabbitmq.reachable",
                    format!("RabbitMQ at {url} refused the connection: {why}"),
                    "read RabbitMQ's message above; check AMQP_URL",
                ),
            };
            return vec![
                reachable,
                Check::skipped("rabbitmq.topology", "RabbitMQ could not be reached"),
                Check::skipped("rabbitmq.quorum", "RabbitMQ could not be reached"),
            ];
        }
    };
    let everything: Vec<(&str, &Presence)> = inspection
        .exchanges
        .iter()
        .map(|(name, presence)| (name.as_str(), presence))
        .chain(
            inspection
                .queues
                .iter()
                .map(|(name, presence, _)| (name.as_str(), presence)),
        )
        .collect();
    let missing: Vec<&str> = everything
        .iter()
        .filter(|(_, presence)| **presence == Presence::Missing)
        .map(|(name, _)| *name)
        .collect();
    let unknown: Vec<String> = everything
        .iter()
        .filter_map(|(name, presence)| match presence {
            Presence::Unknown(why) => Some(format!("{name} ({why})")),
            _ => None,
        })
        .collect();
    let total = everything.len();
    let topology = if !missing.is_empty() {
        Check::problem(
            "rabbitmq.topology",
            if missing.len() == total {
                format!("none of the {total} exchanges and queues of prefix {prefix:?} exists")
            } else {
                format!(
                    "{} of {total} exchanges and queues of prefix {prefix:?} are missing: {}",
                    missing.len(),
                    missing.join(", ")
                )
            },
            "start `fulfillment serve` or `fulfillment work` once (they declare the topology), \
             or import deploy/rabbitmq/definitions.json; check FULFILLMENT__AMQP__PREFIX",
        )
    } else if !unknown.is_empty() {
        Check::problem(
            "rabbitmq.topology",
            format!("cannot inspect {}", unknown.join(", ")),
            "check the permissions of AMQP_URL's user on the vhost (configure and read)",
        )
    } else {
        Check::ok(
            "rabbitmq.topology",
            format!("the {total} exchanges and queues of prefix {prefix:?} are declared"),
        )
    };
    let kinds: Vec<(&str, &QueueKind)> = inspection
        .queues
        .iter()
        .filter_map(|(name, _, kind)| kind.as_ref().map(|k| (name.as_str(), k)))
        .collect();
    let classic: Vec<&str> = kinds
        .iter()
        .filter(|(_, kind)| **kind == QueueKind::NotQuorum)
        .map(|(name, _)| *name)
        .collect();
    let unknown: Vec<String> = kinds
        .iter()
        .filter_map(|(name, kind)| match kind {
            QueueKind::Unknown(why) => Some(format!("{name} ({why})")),
            _ => None,
        })
        .collect();
    let quorum = if kinds.is_empty() {
        Check::skipped("rabbitmq.quorum", "none of the queues exists")
    } else if !classic.is_empty() {
        Check::problem(
            "rabbitmq.quorum",
            format!("not quorum queues: {}", classic.join(", ")),
            "drain them (or `fulfillment dlq replay`), delete them, and let `fulfillment work` \
             declare them again as quorum queues",
        )
    } else if !unknown.is_empty() {
        Check::problem(
            "rabbitmq.quorum",
            format!("cannot tell the type of {}", unknown.join(", ")),
            "check the permissions of AMQP_URL's user on the vhost (read)",
        )
    } else {
        Check::ok(
            "rabbitmq.quorum",
            format!("all {} queues are quorum queues", kinds.len()),
        )
    };
    vec![
        Check::ok("rabbitmq.reachable", format!("connected to {url}")),
        topology,
        quorum,
    ]
}

fn marketplace_verdicts(
    settings: &Settings,
    token: &TokenOutcome,
    api: Option<&ApiOutcome>,
) -> Vec<Check> {
    let m = &settings.marketplace;
    let id = |id: Option<Uuid>| id.map_or_else(|| "(unset)".to_string(), |id| id.to_string());
    let who = format!("app {} in tenant {}", id(m.client_id), id(m.tenant_id));
    let token_check = match token {
        TokenOutcome::Obtained => Check::ok(
            "entra.token",
            format!("token for the Marketplace API obtained for {who}"),
        ),
        TokenOutcome::NotConfigured(message) => Check::problem(
            "entra.token",
            message.clone(),
            "set the variables named above (Partner Center → the offer → Technical configuration \
             shows the tenant and application ids)",
        ),
        TokenOutcome::Unreachable(why) => Check::problem(
            "entra.token",
            format!("no token from Entra at {}: {why}", m.entra_authority_url),
            "check ENTRA_AUTHORITY_URL and that outbound HTTPS to it is allowed (proxy, \
             firewall); an HTTP 429 or 5xx is Entra's side: run doctor again later",
        ),
        TokenOutcome::Refused {
            status,
            error,
            code,
            description,
        } => {
            let mut detail = format!("Entra refused the token for {who}:");
            for part in [
                status.map(|s| format!("HTTP {s}")),
                error.clone(),
                code.clone(),
            ]
            .into_iter()
            .flatten()
            {
                detail.push(' ');
                detail.push_str(&part);
            }
            if let Some(description) = description {
                detail.push_str(" — ");
                detail.push_str(description);
            }
            Check::problem(
                "entra.token",
                detail,
                entra_fix(error.as_deref(), code.as_deref()),
            )
        }
    };
    let api_check = match api {
        None => Check::skipped("marketplace.api", "no Entra token"),
        Some(ApiOutcome::Answered { subscriptions }) => Check::ok(
            "marketplace.api",
            format!(
                "List subscriptions answered at {} ({subscriptions} on page 1)",
                m.api_url
            ),
        ),
        Some(ApiOutcome::Status {
            status: 403,
            detail,
        }) => Check::problem(
            "marketplace.api",
            format!(
                "403 from List subscriptions: this app is not the one registered in the offer's \
                 technical configuration ({detail})"
            ),
            format!(
                "in Partner Center → the offer → Technical configuration, the Microsoft Entra \
                 application ID must be {} and the tenant ID {}; or configure the credentials of \
                 the app registered there",
                id(m.client_id),
                id(m.tenant_id)
            ),
        ),
        Some(ApiOutcome::Status {
            status: 401,
            detail,
        }) => Check::problem(
            "marketplace.api",
            format!("401 from List subscriptions: the token was not accepted ({detail})"),
            format!(
                "the token must come from the publisher's tenant for the resource \
                 {} (MARKETPLACE_TENANT_ID, ENTRA_AUTHORITY_URL, MARKETPLACE_TOKEN_ENDPOINT)",
                crate::settings::MARKETPLACE_APP_ID
            ),
        ),
        Some(ApiOutcome::Status { status, detail }) => Check::problem(
            "marketplace.api",
            format!("HTTP {status} from List subscriptions: {detail}"),
            "check MARKETPLACE_API_URL; 5xx and 429 are Microsoft's side: run doctor again later",
        ),
        Some(ApiOutcome::Unreachable(why)) => Check::problem(
            "marketplace.api",
            format!("cannot reach the Fulfillment API at {}: {why}", m.api_url),
            "check MARKETPLACE_API_URL and that outbound HTTPS to it is allowed",
        ),
    };
    vec![token_check, api_check]
}

/// The fix for an Entra refusal, by its AADSTS code, else its OAuth error.
/// Which credential is used and how long it has left: a problem once expired (or when the
/// certificate file cannot be read), a warning in the detail within 30 days.
pub fn credential_verdict(
    credential: Option<&Result<CredentialStatus, String>>,
    now: time::OffsetDateTime,
) -> Check {
    let status = match credential {
        None => return Check::skipped("entra.credential", "no credential is configured"),
        Some(Err(why)) => {
            return Check::problem(
                "entra.credential",
                why.clone(),
                "point MARKETPLACE_CLIENT_CERTIFICATE_PATH (and MARKETPLACE_CLIENT_CERTIFICATE_KEY_PATH) \
                 at readable PEM files holding the certificate uploaded to the app registration \
                 and its unencrypted RSA private key",
            );
        }
        Some(Ok(status)) => status,
    };
    let kind = status.kind.as_str();
    let date = |at: time::OffsetDateTime| {
        at.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default()
    };
    match status.expires_at {
        None => Check::ok(
            "entra.credential",
            match status.kind {
                crate::settings::CredentialKind::Secret => format!(
                    "{kind}: {} (expiry unknown: set MARKETPLACE_CLIENT_SECRET_EXPIRES_AT to be \
                     warned before it expires)",
                    status.description
                ),
                _ => format!("{kind}: {} (nothing to renew)", status.description),
            },
        ),
        Some(expires_at) if expires_at <= now => Check::problem(
            "entra.credential",
            format!(
                "{kind}: {} expired {} days ago ({})",
                status.description,
                (now - expires_at).whole_days(),
                date(expires_at)
            ),
            match status.kind {
                crate::settings::CredentialKind::Certificate => {
                    "create a new certificate, upload its public part to the app registration \
                     (Certificates & secrets) and replace the file at \
                     MARKETPLACE_CLIENT_CERTIFICATE_PATH (picked up without a restart)"
                }
                _ => {
                    "create a new client secret (app registration → Certificates & secrets), set \
                     MARKETPLACE_CLIENT_SECRET and MARKETPLACE_CLIENT_SECRET_EXPIRES_AT"
                }
            },
        ),
        Some(expires_at) => {
            let days = (expires_at - now).whole_days();
            let urgency = if days < 30 { " — renew it soon" } else { "" };
            Check::ok(
                "entra.credential",
                format!(
                    "{kind}: {} expires in {days} days ({}){urgency}",
                    status.description,
                    date(expires_at)
                ),
            )
        }
    }
}

fn entra_fix(error: Option<&str>, code: Option<&str>) -> String {
    let text = match (code, error) {
        (Some("AADSTS700027"), _) => {
            "Entra does not accept the certificate: upload its public part to the app \
             registration (Certificates & secrets), check that it has not expired and that \
             MARKETPLACE_CLIENT_CERTIFICATE_PATH holds that certificate and its key"
        }
        (Some("AADSTS700024"), _) => {
            "the client assertion is outside its validity: check this host's clock (NTP), or \
             renew the federated token file"
        }
        (Some("AADSTS50012"), _) => {
            "the client assertion names another token endpoint: check ENTRA_AUTHORITY_URL / \
             AZURE_AUTHORITY_HOST and MARKETPLACE_TENANT_ID"
        }
        (Some("AADSTS70021" | "AADSTS700211" | "AADSTS700212"), _) => {
            "no federated credential on the app matches the token's issuer, subject and \
             audience: add one (app registration → Certificates & secrets → Federated \
             credentials) with the cluster's OIDC issuer, subject \
             system:serviceaccount:<namespace>:<service account> and audience \
             api://AzureADTokenExchange"
        }
        (Some("AADSTS700021"), _) => {
            "the assertion was made for another app: MARKETPLACE_CLIENT_ID / AZURE_CLIENT_ID \
             must be the app the certificate belongs to"
        }
        (Some("AADSTS90002" | "AADSTS900023"), _) => {
            "MARKETPLACE_TENANT_ID is not the tenant of the app: use the Directory (tenant) ID \
             of the app registration (Partner Center → Technical configuration → Microsoft Entra \
             tenant ID)"
        }
        (Some("AADSTS700016"), _) | (_, Some("unauthorized_client")) => {
            "MARKETPLACE_CLIENT_ID is not an app of that tenant: use the Application (client) ID \
             registered in the offer's technical configuration"
        }
        (Some("AADSTS7000222"), _) => {
            "the client secret has expired: create a new one (app registration → Certificates & \
             secrets) and set MARKETPLACE_CLIENT_SECRET to its Value"
        }
        (Some("AADSTS7000215"), _) | (_, Some("invalid_client")) => {
            "MARKETPLACE_CLIENT_SECRET is wrong: set it to the secret's Value (not its Secret ID), \
             or create a new one (app registration → Certificates & secrets)"
        }
        (Some("AADSTS500011"), _) | (_, Some("invalid_scope" | "invalid_resource")) => {
            "the Marketplace API (20e940b3-4c77-4b0b-9a53-9e16a1b010a7) is not known in the \
             tenant, or the token endpoint version is wrong: check MARKETPLACE_TOKEN_ENDPOINT"
        }
        _ => {
            "check MARKETPLACE_TENANT_ID, MARKETPLACE_CLIENT_ID and MARKETPLACE_CLIENT_SECRET \
             against the app registered in Partner Center"
        }
    };
    text.to_string()
}

fn jwks_verdict(jwks: &(Option<Url>, JwksOutcome)) -> Check {
    let (url, outcome) = jwks;
    let url = url.as_ref().map_or_else(String::new, Url::to_string);
    let fix = "check WEBHOOK_JWKS_URL (default: {ENTRA_AUTHORITY_URL}/{tenant}/discovery/v2.0/keys) \
               and that outbound HTTPS to it is allowed: without it every webhook is refused";
    match outcome {
        JwksOutcome::NotApplicable(why) => Check::skipped("webhook.jwks", why.clone()),
        JwksOutcome::Keys(0) => Check::problem(
            "webhook.jwks",
            format!("{url} holds no RS256 signing key"),
            fix,
        ),
        JwksOutcome::Keys(1) => Check::ok("webhook.jwks", format!("1 signing key at {url}")),
        JwksOutcome::Keys(n) => Check::ok("webhook.jwks", format!("{n} signing keys at {url}")),
        JwksOutcome::Status(status) => {
            Check::problem("webhook.jwks", format!("HTTP {status} from {url}"), fix)
        }
        JwksOutcome::Unreadable(why) => Check::problem(
            "webhook.jwks",
            format!("{url} is not a JWKS document: {why}"),
            fix,
        ),
        JwksOutcome::Unreachable(why) => {
            Check::problem("webhook.jwks", format!("cannot fetch {url}: {why}"), fix)
        }
    }
}

/// Microsoft's webhook tokens carry the publisher's app id as `aud` (docs/marketplace.md
/// §6.6), or its application ID URI.
fn audiences_verdict(settings: &Settings) -> Check {
    let name = "webhook.audiences";
    if settings.ingress.webhook_auth == WebhookAuth::InsecureNone {
        return Check::problem(
            name,
            "webhook authentication is off (WEBHOOK_AUTH=none): anyone who reaches /webhook can \
             forge Marketplace events",
            "unset WEBHOOK_AUTH and WEBHOOK_AUTH_ALLOW_INSECURE (local emulators only)",
        );
    }
    let audiences = &settings.ingress.webhook_audiences;
    let client_id = settings.marketplace.client_id;
    if audiences.is_empty() {
        return Check::problem(
            name,
            "no webhook audience is configured: every webhook would be refused",
            "set WEBHOOK_AUDIENCES to the publisher's application id (the default, from \
             MARKETPLACE_CLIENT_ID)",
        );
    }
    let implausible: Vec<String> = audiences
        .iter()
        .filter_map(|audience| audience_problem(audience, client_id))
        .collect();
    if implausible.is_empty() {
        Check::ok(name, format!("accepted aud: {}", audiences.join(", ")))
    } else {
        Check::problem(
            name,
            implausible.join("; "),
            "set WEBHOOK_AUDIENCES to the publisher's application (client) id, or its \
             application ID URI (api://… or https://…), comma-separated",
        )
    }
}

fn audience_problem(audience: &str, client_id: Option<Uuid>) -> Option<String> {
    if let Ok(guid) = Uuid::parse_str(audience) {
        return match client_id {
            Some(id) if id != guid => Some(format!(
                "{audience} is a GUID but not the publisher's app id ({id})"
            )),
            _ => None,
        };
    }
    let uri = Url::parse(audience).ok();
    match uri {
        Some(uri) if uri.scheme() == "api" && uri.as_str().len() > "api://".len() => None,
        Some(uri) if uri.scheme() == "https" && uri.host().is_some() => None,
        _ => Some(format!(
            "{audience:?} is neither an application id (GUID) nor an application ID URI \
             (api://…, https://…)"
        )),
    }
}

fn is_loopback(host: Option<Host<&str>>) -> bool {
    match host {
        Some(Host::Ipv4(ip)) => ip.is_loopback(),
        Some(Host::Ipv6(ip)) => ip.is_loopback(),
        Some(Host::Domain(domain)) => {
            domain.eq_ignore_ascii_case("localhost") || domain.ends_with(".localhost")
        }
        None => false,
    }
}

/// `LISTEN_ADDR` against `PUBLIC_URL`: what Partner Center must hold, and whether it can
/// reach us.
fn urls_verdict(settings: &Settings) -> Check {
    let name = "http.urls";
    let listen = settings.http.listen_addr;
    if listen.port() == 0 {
        return Check::problem(
            name,
            format!("LISTEN_ADDR {listen} picks a random port: nothing can be pointed at it"),
            "set LISTEN_ADDR to a fixed port, such as 0.0.0.0:8080",
        );
    }
    let Some(public) = &settings.http.public_url else {
        return Check::skipped(
            name,
            format!(
                "PUBLIC_URL is not set: listening on {listen}; set it to check the webhook and \
                 landing page URLs Partner Center holds"
            ),
        );
    };
    let base = crate::marketplace::client::base_with_slash(public);
    let (Ok(webhook), Ok(landing)) = (base.join("webhook"), base.join("landing")) else {
        return Check::problem(
            name,
            format!("PUBLIC_URL {public} cannot be a base URL"),
            "set PUBLIC_URL to https://HOST[/PATH]",
        );
    };
    let loopback = is_loopback(public.host());
    let mut problems = Vec::new();
    let mut fixes = Vec::new();
    if public.scheme() != "https" && !loopback {
        problems.push(format!(
            "PUBLIC_URL {public} is not HTTPS: Microsoft only calls HTTPS webhooks, and the \
             landing page carries the purchase token"
        ));
        fixes.push("serve the ingress behind TLS and set PUBLIC_URL to its https:// URL");
    }
    if public.query().is_some() || public.fragment().is_some() {
        problems.push(format!("PUBLIC_URL {public} has a query or fragment"));
        fixes.push("set PUBLIC_URL to the base URL only (scheme, host, optional path)");
    }
    let listens_on_loopback = match listen.ip() {
        IpAddr::V4(ip) => ip.is_loopback(),
        IpAddr::V6(ip) => ip.is_loopback(),
    };
    if !loopback && listens_on_loopback {
        problems.push(format!(
            "the ingress listens on {listen} (this host only) but is published at {public}"
        ));
        fixes.push(
            "set LISTEN_ADDR to 0.0.0.0:PORT, unless a proxy on this very host forwards to it",
        );
    }
    if loopback && public.port_or_known_default() != Some(listen.port()) {
        problems.push(format!(
            "PUBLIC_URL {public} is on this host but LISTEN_ADDR is {listen}: the ports differ"
        ));
        fixes.push("use the same port in PUBLIC_URL and LISTEN_ADDR");
    }
    if problems.is_empty() {
        Check::ok(
            name,
            format!("webhook {webhook}, landing page {landing} (listening on {listen})"),
        )
    } else {
        Check::problem(name, problems.join("; "), fixes.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
    const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";

    fn settings(extra: &[(&str, &str)]) -> Settings {
        let mut env: HashMap<String, String> = [
            ("MARKETPLACE_CLIENT_ID", CLIENT),
            ("MARKETPLACE_TENANT_ID", TENANT),
            ("LISTEN_ADDR", "0.0.0.0:8080"),
            ("PUBLIC_URL", "https://fulfillment.contoso.com"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            env.insert(k.to_string(), v.to_string());
        }
        Settings::from_sources(None, &env).unwrap()
    }

    fn healthy() -> Probes {
        let queues = crate::queue::Topology::new("fulfillment").all_queues();
        Probes {
            database: Ok(DatabaseFacts {
                applied: Ok(vec![1, 2, 3]),
                autovacuum: Ok(true),
            }),
            broker: Ok(TopologyInspection {
                exchanges: vec![("fulfillment.work".into(), Presence::Declared)],
                queues: queues
                    .into_iter()
                    .map(|q| (q, Presence::Declared, Some(QueueKind::Quorum)))
                    .collect(),
            }),
            token: TokenOutcome::Obtained,
            credential: Some(Ok(CredentialStatus {
                kind: crate::settings::CredentialKind::Secret,
                expires_at: None,
                description: "client secret of app x".into(),
            })),
            api: Some(ApiOutcome::Answered { subscriptions: 2 }),
            jwks: (None, JwksOutcome::Keys(2)),
        }
    }

    #[test]
    fn the_credential_check_names_the_days_left_and_fails_once_expired() {
        use crate::settings::CredentialKind;
        let now = time::macros::datetime!(2027-01-01 0:00 UTC);
        let status = |kind, days: Option<i64>| {
            Ok(CredentialStatus {
                kind,
                expires_at: days.map(|d| now + time::Duration::days(d)),
                description: "certificate CN=x".into(),
            })
        };
        let soon = credential_verdict(Some(&status(CredentialKind::Certificate, Some(12))), now);
        assert_eq!(soon.status, Status::Ok);
        assert!(
            soon.detail
                .contains("expires in 12 days (2027-01-13T00:00:00Z) — renew it soon"),
            "{}",
            soon.detail
        );
        let expired = credential_verdict(Some(&status(CredentialKind::Certificate, Some(-2))), now);
        assert_eq!(expired.status, Status::Problem);
        assert!(
            expired.detail.contains("expired 2 days ago"),
            "{}",
            expired.detail
        );
        assert!(
            expired
                .fix
                .unwrap()
                .contains("MARKETPLACE_CLIENT_CERTIFICATE_PATH")
        );
        let secret = credential_verdict(Some(&status(CredentialKind::Secret, None)), now);
        assert!(
            secret
                .detail
                .contains("MARKETPLACE_CLIENT_SECRET_EXPIRES_AT"),
            "{}",
            secret.detail
        );
        let unreadable = credential_verdict(Some(&Err("cannot read /x".into())), now);
        assert_eq!(unreadable.status, Status::Problem);
        assert_eq!(credential_verdict(None, now).status, Status::Skipped);
    }

    fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn a_healthy_deployment_passes_every_check_in_order() {
        let checks = verdicts(&settings(&[]), &[1, 2, 3], &healthy());
        let names: Vec<&str> = checks.iter().map(|c| c.name).collect();
        assert_eq!(names, CHECK_NAMES);
        assert!(checks.iter().all(|c| c.status == Status::Ok), "{checks:#?}");
        assert!(Report::new(checks).ok);
    }

    #[test]
    fn an_unreachable_database_skips_the_checks_that_need_it() {
        let mut probes = healthy();
        for (failure, fix) in [
            (
                ConnectFailure::Unreachable("refused".into()),
                "start PostgreSQL",
            ),
            (
                ConnectFailure::AuthenticationFailed("pw".into()),
                "password",
            ),
            (
                ConnectFailure::DatabaseMissing("x".into()),
                "fulfillment migrate",
            ),
        ] {
            probes.database = Err(failure);
            let checks = verdicts(&settings(&[]), &[1], &probes);
            let reachable = check(&checks, "postgres.reachable");
            assert_eq!(reachable.status, Status::Problem);
            assert!(
                reachable.fix.as_deref().unwrap().contains(fix),
                "{reachable:?}"
            );
            assert_eq!(check(&checks, "postgres.migrated").status, Status::Skipped);
            assert_eq!(
                check(&checks, "postgres.autovacuum").status,
                Status::Skipped
            );
        }
    }

    #[test]
    fn a_schema_behind_or_ahead_of_the_binary_is_a_problem() {
        let mut probes = healthy();
        let cases = [
            (vec![], "no schema", "fulfillment migrate"),
            (vec![1, 2], "missing 3", "fulfillment migrate"),
            (vec![1, 2, 3, 4], "unknown to it", "deploy the binary"),
        ];
        for (applied, detail, fix) in cases {
            probes.database = Ok(DatabaseFacts {
                applied: Ok(applied),
                autovacuum: Ok(false),
            });
            let checks = verdicts(&settings(&[]), &[1, 2, 3], &probes);
            let migrated = check(&checks, "postgres.migrated");
            assert!(migrated.detail.contains(detail), "{migrated:?}");
            assert!(migrated.fix.as_deref().unwrap().contains(fix));
            assert_eq!(
                check(&checks, "postgres.autovacuum").status,
                Status::Problem
            );
        }
    }

    #[test]
    fn missing_and_classic_queues_are_named() {
        let mut probes = healthy();
        probes.broker = Ok(TopologyInspection {
            exchanges: vec![("p.work".into(), Presence::Missing)],
            queues: vec![
                (
                    "p.inbound".into(),
                    Presence::Declared,
                    Some(QueueKind::NotQuorum),
                ),
                ("p.inbound.dlq".into(), Presence::Missing, None),
            ],
        });
        let checks = verdicts(&settings(&[]), &[1, 2, 3], &probes);
        let topology = check(&checks, "rabbitmq.topology");
        assert!(
            topology.detail.contains("p.work, p.inbound.dlq"),
            "{topology:?}"
        );
        let quorum = check(&checks, "rabbitmq.quorum");
        assert_eq!(quorum.status, Status::Problem);
        assert!(quorum.detail.contains("p.inbound"), "{quorum:?}");

        probes.broker = Err(BrokerFailure::VhostMissing("NOT_ALLOWED".into()));
        let checks = verdicts(&settings(&[]), &[1, 2, 3], &probes);
        assert!(
            check(&checks, "rabbitmq.reachable")
                .fix
                .as_deref()
                .unwrap()
                .contains("add_vhost")
        );
        assert_eq!(check(&checks, "rabbitmq.quorum").status, Status::Skipped);
    }

    #[test]
    fn entra_refusals_keep_the_aadsts_code_and_name_the_setting_to_fix() {
        let cases = [
            ("invalid_request", "AADSTS90002", "MARKETPLACE_TENANT_ID"),
            (
                "unauthorized_client",
                "AADSTS700016",
                "MARKETPLACE_CLIENT_ID",
            ),
            (
                "invalid_client",
                "AADSTS7000215",
                "MARKETPLACE_CLIENT_SECRET",
            ),
            ("invalid_client", "AADSTS7000222", "expired"),
        ];
        for (error, code, fix) in cases {
            let mut probes = healthy();
            probes.token = TokenOutcome::Refused {
                status: Some(400),
                error: Some(error.into()),
                code: Some(code.into()),
                description: Some("words".into()),
            };
            probes.api = None;
            let checks = verdicts(&settings(&[]), &[1, 2, 3], &probes);
            let token = check(&checks, "entra.token");
            assert!(token.detail.contains(code), "{token:?}");
            assert!(token.fix.as_deref().unwrap().contains(fix), "{token:?}");
            assert_eq!(check(&checks, "marketplace.api").status, Status::Skipped);
        }
        assert_eq!(
            aadsts_code("AADSTS700016: Application with identifier 'x' was not found"),
            Some("AADSTS700016".into())
        );
        assert_eq!(
            first_sentence("AADSTS90002: Tenant 'x' not found. Trace ID: 1\r\nCorrelation ID: 2"),
            "Tenant 'x' not found."
        );
    }

    #[test]
    fn a_403_from_the_api_points_at_the_offers_technical_configuration() {
        let mut probes = healthy();
        probes.api = Some(ApiOutcome::Status {
            status: 403,
            detail: "forbidden".into(),
        });
        let checks = verdicts(&settings(&[]), &[1, 2, 3], &probes);
        let api = check(&checks, "marketplace.api");
        assert!(
            api.detail
                .contains("not the one registered in the offer's technical configuration")
        );
        assert!(
            api.fix
                .as_deref()
                .unwrap()
                .contains("Microsoft Entra application ID must be 11111111")
        );
        probes.api = Some(ApiOutcome::Status {
            status: 401,
            detail: "x".into(),
        });
        let checks = verdicts(&settings(&[]), &[1, 2, 3], &probes);
        assert!(
            check(&checks, "marketplace.api")
                .fix
                .as_deref()
                .unwrap()
                .contains("tenant")
        );
    }

    #[test]
    fn audiences_must_be_the_app_id_or_an_application_id_uri() {
        let ok = [
            CLIENT,
            "api://11111111-2222-3333-4444-555555555555",
            "https://contoso.com/app",
        ];
        for audience in ok {
            let s = settings(&[("WEBHOOK_AUDIENCES", audience)]);
            assert_eq!(audiences_verdict(&s).status, Status::Ok, "{audience}");
        }
        for audience in [
            " , ",
            "contoso",
            "00000000-0000-0000-0000-000000000001",
            "http://x",
        ] {
            let s = settings(&[("WEBHOOK_AUDIENCES", audience)]);
            let verdict = audiences_verdict(&s);
            assert_eq!(verdict.status, Status::Problem, "{audience}: {verdict:?}");
        }
    }

    #[test]
    fn public_urls_need_https_off_this_host_and_a_matching_listener() {
        let cases: [(&[(&str, &str)], Status); 7] = [
            (&[], Status::Ok),
            (
                &[("PUBLIC_URL", "http://fulfillment.contoso.com")],
                Status::Problem,
            ),
            (&[("PUBLIC_URL", "http://127.0.0.1:8080")], Status::Ok),
            (&[("PUBLIC_URL", "http://localhost:9000")], Status::Problem),
            (&[("LISTEN_ADDR", "127.0.0.1:8080")], Status::Problem),
            (&[("LISTEN_ADDR", "0.0.0.0:0")], Status::Problem),
            (&[("PUBLIC_URL", "")], Status::Skipped),
        ];
        for (env, expected) in cases {
            let verdict = urls_verdict(&settings(env));
            assert_eq!(verdict.status, expected, "{env:?}: {verdict:?}");
        }
        let verdict = urls_verdict(&settings(&[(
            "PUBLIC_URL",
            "https://x.example/fulfillment",
        )]));
        assert!(
            verdict
                .detail
                .contains("https://x.example/fulfillment/webhook"),
            "{verdict:?}"
        );
    }

    /// Every line fits, but for one that holds a single word (a URL is never broken).
    fn fits_80_columns(text: &str) -> bool {
        text.lines()
            .all(|l| l.chars().count() <= 80 || !l.trim().contains(' '))
    }

    #[test]
    fn the_human_report_fits_80_columns_and_the_unparsable_one_skips_the_rest() {
        let mut probes = healthy();
        probes.database = Err(ConnectFailure::DatabaseMissing(
            "database \"fulfillment_with_a_rather_long_name_for_wrapping\" does not exist".into(),
        ));
        let report = Report::new(verdicts(&settings(&[]), &[1, 2, 3], &probes));
        let text = report.render();
        assert!(fits_80_columns(&text), "{text}");
        assert!(text.contains("fix: run `fulfillment migrate`"), "{text}");
        assert!(text.ends_with("1 problem found\n"), "{text}");

        let error = Settings::from_sources(
            None,
            &[("LISTEN_ADDR".to_string(), "nowhere".to_string())].into(),
        )
        .unwrap_err();
        let report = Report::unparsable(&error);
        assert!(!report.ok);
        assert_eq!(report.checks.len(), CHECK_NAMES.len());
        assert!(report.checks[0].detail.contains("LISTEN_ADDR"));
        assert!(
            report.checks[1..]
                .iter()
                .all(|c| c.status == Status::Skipped)
        );
    }
}
