//! `fulfillment usage import|list|show|reconcile`: metered usage for operators.
//!
//! - `import FILE`: a CSV of usage (docs/metering.md), checked like `POST /api/v1/usage`;
//!   a dry run unless `--execute`.
//! - `list`: hours with their totals and status (open, submitting, accepted, duplicate,
//!   expired, rejected) and the late usage reported against them.
//! - `show HOUR_ID`: one hour with its usage events.
//! - `reconcile`: compares our billed hours with Microsoft's `GET /usageEvents` per day,
//!   subscription, dimension and plan (§9.3) and reports every difference. Exit code 1
//!   when there is one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use serde::Serialize;
use sqlx::postgres::PgPool;
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use super::UsageError;
use super::render::{Table, or_dash, when};
use crate::marketplace::{
    CallContext, MarketplaceClient, ReconStatus, TokenProvider, UsageAggregate, UsageEventsQuery,
};
use crate::metering::ingest::{IngestError, ingest};
use crate::settings::Settings;
use crate::store::usage::{self, HourFilter, HourRow, Stored, UsageRow};

#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Check a CSV file of usage (header: subscriptionId,dimension,quantity,effectiveAt,
    /// idempotencyKey) like the API does; store it only with --execute.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Store the usage (default: a dry run that only validates).
        #[arg(long)]
        execute: bool,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Usage hours with their totals and status.
    List {
        /// Only the hours of this subscription.
        #[arg(long)]
        subscription: Option<Uuid>,
        /// open, submitting, accepted, duplicate, expired or rejected.
        #[arg(long)]
        status: Option<String>,
        /// Hours from: an RFC 3339 instant or an age such as 6h, 2d.
        #[arg(long)]
        since: Option<String>,
        /// At most this many hours, newest first.
        #[arg(long, default_value_t = 200)]
        limit: i64,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One hour and its usage events.
    Show {
        /// The hour's id (from `usage list`).
        hour_id: Uuid,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare our billed hours with Microsoft's usage records (GET /usageEvents).
    Reconcile {
        /// Days back, today included.
        #[arg(long, default_value_t = 2)]
        days: u32,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(settings: &Settings, command: UsageCommand) -> anyhow::Result<ExitCode> {
    let pool = crate::store::connect(&settings.database).await?;
    let result = run_with(settings, &pool, command).await;
    pool.close().await;
    result
}

fn client(settings: &Settings) -> anyhow::Result<MarketplaceClient> {
    let tokens = TokenProvider::new(&settings.marketplace)
        .context("cannot set up the Entra token provider")?;
    MarketplaceClient::new(&settings.marketplace, tokens)
        .context("cannot build the Marketplace client")
}

async fn run_with(
    settings: &Settings,
    pool: &PgPool,
    command: UsageCommand,
) -> anyhow::Result<ExitCode> {
    match command {
        UsageCommand::Import {
            file,
            execute,
            json,
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let reports = crate::metering::reports_of_csv(&text).map_err(UsageError::new)?;
            let result = ingest(
                pool,
                &client(settings)?,
                &settings.metering,
                &reports,
                "csv",
                !execute,
                OffsetDateTime::now_utc(),
            )
            .await;
            match result {
                Ok(ingested) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::json!({"executed": execute, "events": ingested})
                        );
                    } else {
                        let count = |s| ingested.iter().filter(|i| i.status == s).count();
                        if execute {
                            println!(
                                "stored {} usage event(s): {} counted, {} late (hour already \
                                 submitted: reported, not billed), {} repeat(s)",
                                ingested.len(),
                                count(Stored::Counted),
                                count(Stored::Late),
                                count(Stored::Repeat)
                            );
                        } else {
                            println!(
                                "dry run: {} usage event(s) valid; run again with --execute \
                                 to store them",
                                ingested.len()
                            );
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(IngestError::Refused(refused)) => {
                    if json {
                        println!("{}", serde_json::json!({"refused": refused}));
                    } else {
                        let mut table = Table::new(&["LINE", "KEY", "REASON"], &[0, 24, 0]);
                        for r in &refused {
                            table.row(vec![
                                r.index.to_string(),
                                or_dash(r.idempotency_key.clone()),
                                r.reason.clone(),
                            ]);
                        }
                        print!("{}", table.render());
                        println!(
                            "{} line(s) refused; nothing stored: fix them and import again",
                            refused.len()
                        );
                    }
                    Ok(ExitCode::FAILURE)
                }
                Err(other) => Err(other.into()),
            }
        }
        UsageCommand::List {
            subscription,
            status,
            since,
            limit,
            json,
        } => {
            let now = OffsetDateTime::now_utc();
            let since = since.map(|s| super::parse_since(&s, now)).transpose()?;
            let hours = usage::list_hours(
                pool,
                &HourFilter {
                    subscription_id: subscription,
                    status,
                    since,
                    limit: limit.clamp(1, 10_000),
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&hours)?);
            } else {
                print!("{}", render_hours(&hours));
            }
            Ok(ExitCode::SUCCESS)
        }
        UsageCommand::Show { hour_id, json } => {
            let hour = usage::hour(pool, hour_id)
                .await?
                .ok_or_else(|| UsageError::new(format!("no usage hour {hour_id}")))?;
            let events = usage::usage_of_hour(pool, &hour).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "hour": hour, "events": events
                    }))?
                );
            } else {
                print!("{}", render_hours(std::slice::from_ref(&hour)));
                print!("{}", render_events(&events));
            }
            Ok(ExitCode::SUCCESS)
        }
        UsageCommand::Reconcile { days, json } => {
            let report = reconcile(pool, &client(settings)?, days).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", render_reconciliation(&report));
            }
            Ok(if report.differences.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

fn render_hours(hours: &[HourRow]) -> String {
    let mut table = Table::new(
        &[
            "HOUR",
            "SUBSCRIPTION",
            "PLAN",
            "DIMENSION",
            "QUANTITY",
            "SENT",
            "STATUS",
            "LATE",
            "REASON",
            "ID",
        ],
        &[0, 36, 16, 16, 0, 0, 0, 0, 48, 36],
    );
    for h in hours {
        table.row(vec![
            when(h.hour),
            h.subscription_id.to_string(),
            h.plan_id.clone(),
            h.dimension.clone(),
            h.quantity.to_string(),
            or_dash(h.submitted_quantity),
            h.status.clone(),
            if h.late_events > 0 {
                format!("{} ({})", h.late_events, h.late_quantity)
            } else {
                "-".into()
            },
            or_dash(h.reason.clone()),
            h.id.to_string(),
        ]);
    }
    if table.is_empty() {
        return "no usage hours\n".into();
    }
    table.render()
}

fn render_events(events: &[UsageRow]) -> String {
    let mut table = Table::new(
        &[
            "RECEIVED",
            "EFFECTIVE",
            "QUANTITY",
            "STATUS",
            "SOURCE",
            "KEY",
        ],
        &[0, 0, 0, 0, 0, 40],
    );
    for e in events {
        table.row(vec![
            when(e.received_at),
            when(e.effective_at),
            e.quantity.to_string(),
            e.status.clone(),
            e.source.clone(),
            e.idempotency_key.clone(),
        ]);
    }
    table.render()
}

/// The key of a reconciliation row: (day, subscription, dimension, plan).
type DayKey = (Date, Uuid, String, String);

/// One day of one subscription's dimension where the two sides differ.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    pub day: String,
    pub subscription_id: Uuid,
    pub dimension: String,
    pub plan_id: String,
    /// What we count as billed (accepted and duplicate hours).
    pub ours: f64,
    pub submitted: Option<f64>,
    pub processed: Option<f64>,
    pub recon_status: Option<String>,
    /// `missing_at_microsoft`, `unknown_to_us`, `quantity_differs`, `mismatch`,
    /// `rejected`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reconciliation {
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    pub compared: usize,
    pub differences: Vec<Difference>,
}

/// Compares our billed hours since the start of the day `days - 1` days ago with
/// Microsoft's records.
pub async fn reconcile(
    pool: &PgPool,
    client: &MarketplaceClient,
    days: u32,
) -> anyhow::Result<Reconciliation> {
    let today = OffsetDateTime::now_utc().date().midnight().assume_utc();
    let since = today - time::Duration::days(i64::from(days.max(1)) - 1);
    let ours = usage::billed_hours_since(pool, since).await?;
    let theirs = client
        .get_usage_events(&CallContext::random(), &UsageEventsQuery::since(since))
        .await
        .context("cannot read Microsoft's usage records (GET /usageEvents)")?
        .into_value();
    Ok(compare(since, &ours, &theirs))
}

/// The pure comparison behind [`reconcile`].
pub fn compare(
    since: OffsetDateTime,
    ours: &[HourRow],
    theirs: &[UsageAggregate],
) -> Reconciliation {
    let mut our_days: BTreeMap<DayKey, f64> = BTreeMap::new();
    for hour in ours {
        let quantity = hour
            .billed_quantity
            .or(hour.submitted_quantity)
            .unwrap_or(hour.quantity);
        *our_days
            .entry((
                hour.hour.date(),
                hour.subscription_id,
                hour.dimension.clone(),
                hour.plan_id.clone(),
            ))
            .or_default() += quantity;
    }
    let mut their_days: BTreeMap<DayKey, &UsageAggregate> = BTreeMap::new();
    for record in theirs {
        let (Some(date), Some(resource), Some(dimension), Some(plan)) = (
            record.usage_date,
            record
                .usage_resource_id
                .as_deref()
                .and_then(|r| Uuid::parse_str(r).ok()),
            record.dimension.clone(),
            record.plan_id.clone(),
        ) else {
            continue;
        };
        their_days.insert((date.date(), resource, dimension, plan), record);
    }
    let mut keys: Vec<&DayKey> = our_days.keys().chain(their_days.keys()).collect();
    keys.sort();
    keys.dedup();
    let compared = keys.len();
    let mut differences = Vec::new();
    for key in keys {
        let ours = our_days.get(key).copied();
        let theirs = their_days.get(key);
        let kind = match (ours, theirs) {
            (Some(_), None) => Some("missing_at_microsoft"),
            (None, Some(_)) => Some("unknown_to_us"),
            (Some(ours), Some(record)) => match record.recon_status {
                Some(ReconStatus::Rejected) => Some("rejected"),
                Some(ReconStatus::Mismatch) => Some("mismatch"),
                _ if record
                    .submitted_quantity
                    .is_none_or(|q| (q - ours).abs() > 1e-6) =>
                {
                    Some("quantity_differs")
                }
                _ => None,
            },
            (None, None) => None,
        };
        if let Some(kind) = kind {
            differences.push(Difference {
                day: key.0.to_string(),
                subscription_id: key.1,
                dimension: key.2.clone(),
                plan_id: key.3.clone(),
                ours: ours.unwrap_or(0.0),
                submitted: theirs.and_then(|r| r.submitted_quantity),
                processed: theirs.and_then(|r| r.processed_quantity),
                recon_status: theirs
                    .and_then(|r| r.recon_status.as_ref())
                    .map(|s| s.as_str().to_owned()),
                kind,
            });
        }
    }
    Reconciliation {
        since,
        compared,
        differences,
    }
}

fn render_reconciliation(report: &Reconciliation) -> String {
    let mut out = format!(
        "compared {} (day, subscription, dimension, plan) since {}\n",
        report.compared,
        when(report.since)
    );
    if report.differences.is_empty() {
        out.push_str("no differences\n");
        return out;
    }
    let mut table = Table::new(
        &[
            "DAY",
            "SUBSCRIPTION",
            "DIMENSION",
            "PLAN",
            "OURS",
            "SUBMITTED",
            "PROCESSED",
            "RECON",
            "DIFFERENCE",
        ],
        &[0, 36, 16, 16, 0, 0, 0, 0, 0],
    );
    for d in &report.differences {
        table.row(vec![
            d.day.clone(),
            d.subscription_id.to_string(),
            d.dimension.clone(),
            d.plan_id.clone(),
            d.ours.to_string(),
            or_dash(d.submitted),
            or_dash(d.processed),
            or_dash(d.recon_status.clone()),
            d.kind.to_string(),
        ]);
    }
    out.push_str(&table.render());
    out
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    fn hour(sub: Uuid, at: OffsetDateTime, quantity: f64) -> HourRow {
        HourRow {
            id: Uuid::new_v4(),
            subscription_id: sub,
            plan_id: "gold".into(),
            dimension: "api-calls".into(),
            hour: at,
            quantity,
            status: "accepted".into(),
            submitted_quantity: Some(quantity),
            batch_id: None,
            usage_event_id: None,
            billed_quantity: None,
            reason: None,
            sends: 1,
            late_events: 0,
            late_quantity: 0.0,
        }
    }

    fn record(sub: Uuid, submitted: f64, processed: f64, status: &str) -> UsageAggregate {
        serde_json::from_value(serde_json::json!({
            "usageDate": "2026-12-06T00:00:00", "usageResourceId": sub.to_string(),
            "dimension": "api-calls", "planId": "gold", "reconStatus": status,
            "submittedQuantity": submitted, "processedQuantity": processed, "submittedCount": 2
        }))
        .unwrap()
    }

    #[test]
    fn days_are_compared_per_subscription_dimension_and_plan() {
        let a = Uuid::from_u128(1);
        let b = Uuid::from_u128(2);
        let c = Uuid::from_u128(3);
        let since = datetime!(2026-12-06 00:00 UTC);
        let ours = vec![
            hour(a, datetime!(2026-12-06 01:00 UTC), 2.0),
            hour(a, datetime!(2026-12-06 02:00 UTC), 3.0),
            hour(b, datetime!(2026-12-06 01:00 UTC), 1.0),
        ];
        let theirs = vec![
            record(a, 5.0, 5.0, "Accepted"),
            record(b, 1.0, 0.5, "Mismatch"),
            record(c, 4.0, 4.0, "Accepted"),
        ];
        let report = compare(since, &ours, &theirs);
        assert_eq!(report.compared, 3);
        let kinds: Vec<_> = report
            .differences
            .iter()
            .map(|d| (d.subscription_id, d.kind))
            .collect();
        assert_eq!(kinds, vec![(b, "mismatch"), (c, "unknown_to_us")]);
        let report = compare(since, &ours[..2], &[record(a, 4.0, 4.0, "Accepted")]);
        assert_eq!(report.differences[0].kind, "quantity_differs");
        let report = compare(since, &ours[..2], &[]);
        assert_eq!(report.differences[0].kind, "missing_at_microsoft");
    }
}
