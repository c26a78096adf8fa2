//! `fulfillment endpoint …`: the ISV's webhook endpoints from the command line (the same
//! work as `/api/v1/webhook-endpoints`, [`crate::webhooks::manage`]): add (the secret is
//! printed once), list, show, rotate-secret, disable, enable, test, deliveries, and replay
//! (a dry run unless `--execute`, journalled like `dlq replay`).

use std::process::ExitCode;

use serde_json::json;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::render::{Table, or_dash, shorten, when};
use super::{UsageError, cli_actor, parse_since};
use crate::settings::Settings;
use crate::store::deliveries::ReplaySelection;
use crate::webhooks::manage::{
    self, CreateEndpoint, ManageError, UpdateEndpoint, attempt_view, endpoint_view, replay_view,
    test_view,
};

#[derive(Debug, clap::Subcommand)]
pub enum EndpointCommand {
    /// Register an endpoint; prints its signing secret once.
    Add(AddArgs),
    /// Every endpoint.
    List(JsonArg),
    /// One endpoint.
    Show(IdArgs),
    /// A new signing secret (printed once); the old one keeps signing during the overlap
    /// (`webhooks.rotation_overlap_secs`).
    RotateSecret(IdArgs),
    /// Stop deliveries to an endpoint (they give up and can be replayed later).
    Disable(IdArgs),
    /// Resume deliveries to an endpoint.
    Enable(IdArgs),
    /// Send a signed `webhook.test` event now and print the answer (exit 1 unless 2xx).
    Test(IdArgs),
    /// The delivery log: every attempt, newest first.
    Deliveries(DeliveriesArgs),
    /// Queue deliveries again: one event, an endpoint's failures, or everything since T.
    /// A dry run unless --execute.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
pub struct JsonArg {
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct IdArgs {
    /// The endpoint id.
    pub id: Uuid,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AddArgs {
    /// https://… (plain http:// only on loopback, or with --insecure).
    pub url: String,
    /// Topics: `*`, `subscription.*` or routing keys (repeat or comma-separate).
    #[arg(long = "topic", value_delimiter = ',', default_value = "*")]
    pub topics: Vec<String>,
    /// Only events of this offer's subscriptions.
    #[arg(long)]
    pub offer: Option<String>,
    /// Free text (what the endpoint is for).
    #[arg(long)]
    pub description: Option<String>,
    /// Allow plain http:// to a non-loopback host.
    #[arg(long)]
    pub insecure: bool,
    /// JSON (with the secret) instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct DeliveriesArgs {
    /// The endpoint id.
    pub id: Uuid,
    /// At most this many attempts (1 to 1000).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    /// The endpoint (required with --failures; limits --event and --since to it).
    #[arg(long)]
    pub endpoint: Option<Uuid>,
    /// One event (its CloudEvents id).
    #[arg(long)]
    pub event: Option<String>,
    /// The endpoint's deliveries that gave up.
    #[arg(long)]
    pub failures: bool,
    /// Every delivery queued since then: RFC 3339 or an age (30m, 2h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Queue them (otherwise only list them).
    #[arg(long)]
    pub execute: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(settings: &Settings, command: EndpointCommand) -> anyhow::Result<ExitCode> {
    let pool = crate::store::connect(&settings.database).await?;
    let result = run_with(settings, &pool, command).await;
    pool.close().await;
    result
}

/// Usage errors (exit 2) for what the request got wrong.
fn usage(error: ManageError) -> anyhow::Error {
    match error {
        ManageError::Invalid(message) => UsageError::new(message).into(),
        ManageError::NotFound(id) => UsageError::new(format!("no webhook endpoint {id}")).into(),
        ManageError::Store(error) => error.into(),
    }
}

fn print_json(value: &serde_json::Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON serializes")
    );
}

async fn run_with(
    settings: &Settings,
    pool: &PgPool,
    command: EndpointCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        EndpointCommand::Add(args) => {
            let (row, secret) = manage::create(
                pool,
                &CreateEndpoint {
                    url: args.url,
                    description: args.description,
                    topics: Some(args.topics),
                    offer_id: args.offer,
                    insecure: args.insecure,
                },
            )
            .await
            .map_err(usage)?;
            if args.json {
                print_json(&view_with_secret(&row, &secret));
            } else {
                println!("registered endpoint {} → {}", row.id, row.url);
                println!("topics: {}", row.topics.join(", "));
                println!("signing secret (shown once; keep it): {}", secret.expose());
            }
        }
        EndpointCommand::List(args) => {
            let rows = crate::store::endpoints::list(pool).await?;
            if args.json {
                print_json(&json!(rows.iter().map(endpoint_view).collect::<Vec<_>>()));
            } else {
                let mut table = Table::new(
                    &["ID", "URL", "TOPICS", "OFFER", "STATUS", "FAILING SINCE"],
                    &[36, 60, 40, 24, 8, 20],
                );
                for row in &rows {
                    table.row(vec![
                        row.id.to_string(),
                        row.url.clone(),
                        row.topics.join(","),
                        or_dash(row.offer_id.as_deref()),
                        format!("{:?}", row.status).to_lowercase(),
                        or_dash(row.failing_since.map(when)),
                    ]);
                }
                print!("{}", table.render());
            }
        }
        EndpointCommand::Show(args) => {
            let row = manage::get(pool, args.id).await.map_err(usage)?;
            print_endpoint(&endpoint_view(&row), args.json);
        }
        EndpointCommand::RotateSecret(args) => {
            let (row, secret) =
                manage::rotate_secret(pool, args.id, settings.webhooks.rotation_overlap)
                    .await
                    .map_err(usage)?;
            if args.json {
                print_json(&view_with_secret(&row, &secret));
            } else {
                println!(
                    "new signing secret (shown once; keep it): {}",
                    secret.expose()
                );
                println!(
                    "the previous secret keeps signing until {}",
                    or_dash(row.previous_secret_until.map(when))
                );
            }
        }
        EndpointCommand::Disable(args) => {
            let row = set_enabled(pool, args.id, false).await?;
            print_endpoint(&endpoint_view(&row), args.json);
        }
        EndpointCommand::Enable(args) => {
            let row = set_enabled(pool, args.id, true).await?;
            print_endpoint(&endpoint_view(&row), args.json);
        }
        EndpointCommand::Test(args) => {
            let (event_id, sent) = manage::send_test(pool, args.id, settings.webhooks.timeout)
                .await
                .map_err(usage)?;
            let view = test_view(&event_id, &sent);
            if args.json {
                print_json(&view);
            } else {
                println!(
                    "test event {event_id}: {} in {} ms",
                    sent.answer.describe(),
                    sent.latency.as_millis()
                );
                if !sent.head.is_empty() {
                    println!("answer: {}", shorten(&sent.head, 200));
                }
            }
            if view["delivered"] != true {
                return Ok(ExitCode::from(crate::cli::exit::PROBLEMS));
            }
        }
        EndpointCommand::Deliveries(args) => {
            if !(1..=1000).contains(&args.limit) {
                return Err(UsageError::new("--limit takes 1 to 1000").into());
            }
            let rows = manage::attempts(pool, args.id, None, args.limit)
                .await
                .map_err(usage)?;
            if args.json {
                print_json(&json!(rows.iter().map(attempt_view).collect::<Vec<_>>()));
            } else {
                let mut table = Table::new(
                    &["WHEN", "EVENT", "STATUS", "MS", "OUTCOME", "ANSWER"],
                    &[20, 40, 6, 6, 9, 60],
                );
                for row in &rows {
                    table.row(vec![
                        when(row.attempted_at),
                        row.event_id.clone(),
                        or_dash(row.status),
                        row.latency_ms.to_string(),
                        format!("{:?}", row.outcome).to_lowercase(),
                        row.response_head.clone(),
                    ]);
                }
                print!("{}", table.render());
            }
        }
        EndpointCommand::Replay(args) => return replay(pool, args).await,
    }
    Ok(ExitCode::SUCCESS)
}

/// The endpoint with its new signing secret: shown once, when it is made.
fn view_with_secret(
    row: &crate::store::endpoints::EndpointRow,
    secret: &crate::webhooks::signature::Secret,
) -> serde_json::Value {
    let mut view = endpoint_view(row);
    view["secret"] = json!(secret.expose());
    view
}

async fn set_enabled(
    pool: &PgPool,
    id: Uuid,
    enabled: bool,
) -> anyhow::Result<crate::store::endpoints::EndpointRow> {
    manage::update(
        pool,
        id,
        &UpdateEndpoint {
            enabled: Some(enabled),
            ..UpdateEndpoint::default()
        },
    )
    .await
    .map_err(usage)
}

fn print_endpoint(view: &serde_json::Value, json: bool) {
    if json {
        print_json(view);
        return;
    }
    for key in [
        "id",
        "url",
        "description",
        "topics",
        "offerId",
        "status",
        "disabledReason",
        "failingSince",
        "previousSecretValidUntil",
        "createdAt",
    ] {
        let value = &view[key];
        let text = match value {
            serde_json::Value::Null => "-".to_owned(),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{key:<26}{text}");
    }
}

async fn replay(pool: &PgPool, args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let selection = match (args.event, args.failures, args.since) {
        (Some(event_id), false, None) => ReplaySelection::Event {
            event_id,
            endpoint_id: args.endpoint,
        },
        (None, true, None) => ReplaySelection::Failures {
            endpoint_id: args.endpoint.ok_or_else(|| {
                UsageError::new("--failures needs --endpoint ID (whose failures?)")
            })?,
        },
        (None, false, Some(since)) => ReplaySelection::Since {
            since: parse_since(&since, OffsetDateTime::now_utc())?,
            endpoint_id: args.endpoint,
        },
        _ => {
            return Err(
                UsageError::new("name exactly one of --event ID, --failures or --since T").into(),
            );
        }
    };
    let report = manage::replay(pool, &selection, !args.execute, &cli_actor())
        .await
        .map_err(usage)?;
    if args.json {
        print_json(&replay_view(&report));
    } else {
        let mut table = Table::new(&["EVENT", "ENDPOINT", "WAS", "QUEUED"], &[40, 36, 8, 20]);
        for candidate in &report.candidates {
            table.row(vec![
                candidate.event_id.clone(),
                candidate.endpoint_id.to_string(),
                candidate.status.as_str().to_string(),
                when(candidate.created_at),
            ]);
        }
        print!("{}", table.render());
        if report.dry_run {
            println!(
                "dry run: {} deliveries would be sent again; add --execute",
                report.candidates.len()
            );
        } else {
            println!("{} deliveries queued again (journalled)", report.replayed);
        }
    }
    Ok(ExitCode::SUCCESS)
}
