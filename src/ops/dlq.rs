//! `fulfillment dlq list|show|replay|purge`: the dead-letter queues, read without loss
//! (see [`crate::queue::dead_letters`]).
//!
//! A dead letter's id is its AMQP `message_id` (the webhook's operation id, the command id,
//! `resolve:<subscription>:<nanos>` for a landing-page resolution), or `sha256:<16 hex>` of
//! the body when it has none. Copies of one message (Microsoft redelivers webhooks) share
//! an id; `show` prints each, `replay --id` moves each, and the worker's inbox makes sure
//! only one is applied.
//!
//! `replay` is a dry run unless `--execute`. Executing, each batch is published to the work
//! exchange with confirms, journalled in `operator_actions` (who, when, which message, the
//! whole message), and only then removed from the dead-letter queue.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::render::{Table, or_dash, shorten, when};
use super::{UsageError, cli_actor, parse_since, rfc3339};
use crate::queue::headers;
use crate::queue::{Broker, DeadLetter, DeadLetterReader, InboundMessage, QueueError};
use crate::settings::Settings;
use crate::store::operator_actions::{self, ActionKind, NewAction};

/// Messages a read may hold beyond those it keeps on purpose.
const WINDOW: u16 = 1000;
/// Dead letters published (and journalled) per round when no `--rate` is set.
pub const DEFAULT_BATCH: usize = 500;

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// List dead letters: subscription, action, attempts, first and last failure, reason.
    /// Exit code 1 when any matches (failures found).
    List(ListArgs),
    /// Print one dead letter whole: properties, headers, the last Microsoft response and
    /// the message.
    Show(ShowArgs),
    /// Move matching dead letters back to their work queue (a dry run without --execute).
    Replay(ReplayArgs),
    /// Remove matching dead letters (a dry run without --execute); each is kept whole in
    /// the operator journal.
    Purge(PurgeArgs),
}

/// Which dead letters.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct FilterArgs {
    /// Only this dead-letter queue: `inbound` or its full name (default: all).
    #[arg(long)]
    pub queue: Option<String>,
    /// Only messages about this subscription.
    #[arg(long)]
    pub subscription: Option<Uuid>,
    /// Only this action: a webhook action (ChangePlan, Unsubscribe, …), a command
    /// (activate, change_plan, change_quantity, cancel) or purchase_resolved.
    #[arg(long)]
    pub action: Option<String>,
    /// Only messages whose last failure is at or after T: RFC 3339, or an age (30m, 2h, 7d).
    #[arg(long, value_name = "T")]
    pub since: Option<String>,
    /// Only messages whose failure reason contains TEXT (case-insensitive).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
    /// Only these dead letters (ids from `dlq list`); repeatable.
    #[arg(long = "id", value_name = "ID")]
    pub ids: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The dead letter's id (from `dlq list`).
    pub id: String,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Replay at most N messages.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// At most R messages per second.
    #[arg(long, value_name = "R")]
    pub rate: Option<f64>,
    /// Really move them; without it, print what would move and change nothing.
    #[arg(long)]
    pub execute: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct PurgeArgs {
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Purge every dead letter when no filter is given.
    #[arg(long)]
    pub all: bool,
    /// Really remove them; without it, print what would go and change nothing.
    #[arg(long)]
    pub execute: bool,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A parsed [`FilterArgs`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub queue: Option<String>,
    pub subscription: Option<Uuid>,
    pub action: Option<String>,
    pub since: Option<OffsetDateTime>,
    pub reason: Option<String>,
    pub ids: Vec<String>,
}

impl Filter {
    pub fn parse(args: &FilterArgs, now: OffsetDateTime) -> Result<Self, UsageError> {
        let since = args
            .since
            .as_deref()
            .map(|raw| parse_since(raw, now))
            .transpose()?;
        let non_empty = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        Ok(Self {
            queue: non_empty(&args.queue),
            subscription: args.subscription,
            action: non_empty(&args.action),
            since,
            reason: non_empty(&args.reason),
            ids: args
                .ids
                .iter()
                .map(|i| i.trim().to_string())
                .filter(|i| !i.is_empty())
                .collect(),
        })
    }

    /// Nothing narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.queue.is_none()
            && self.subscription.is_none()
            && self.action.is_none()
            && self.since.is_none()
            && self.reason.is_none()
            && self.ids.is_empty()
    }

    /// The dead-letter queues to read.
    pub fn queues(&self, broker: &Broker) -> Result<Vec<String>, UsageError> {
        let all = broker.dead_letter_queues();
        let Some(wanted) = &self.queue else {
            return Ok(all);
        };
        let prefix = broker.topology().prefix();
        let found: Vec<String> = all
            .iter()
            .filter(|q| {
                *q == wanted
                    || **q == format!("{prefix}.{wanted}.dlq")
                    || **q == format!("{prefix}.{wanted}")
            })
            .cloned()
            .collect();
        if found.is_empty() {
            return Err(UsageError::new(format!(
                "--queue {wanted:?} is not a dead-letter queue; known: {}",
                all.join(", ")
            )));
        }
        Ok(found)
    }

    pub fn matches(&self, letter: &DeadLetterSummary) -> bool {
        if !self.ids.is_empty() && !self.ids.contains(&letter.id) {
            return false;
        }
        if self
            .subscription
            .is_some_and(|s| letter.subscription_id != Some(s))
        {
            return false;
        }
        if let Some(action) = &self.action
            && !letter
                .action
                .as_deref()
                .is_some_and(|a| a.eq_ignore_ascii_case(action))
        {
            return false;
        }
        if let Some(since) = self.since
            && letter.last_failure.is_none_or(|at| at < since)
        {
            return false;
        }
        if let Some(reason) = &self.reason {
            let needle = reason.to_lowercase();
            if !letter
                .reason
                .as_deref()
                .is_some_and(|r| r.to_lowercase().contains(&needle))
            {
                return false;
            }
        }
        true
    }
}

/// One dead letter in a list.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterSummary {
    pub id: String,
    pub queue: String,
    /// `webhook`, `command`, `purchase_resolved`, or `unreadable`.
    pub message_type: String,
    pub subscription_id: Option<Uuid>,
    pub action: Option<String>,
    /// Failed attempts before it was dead-lettered (`x-attempt`).
    pub attempts: u32,
    /// Earlier replays from a dead-letter queue (`x-replay-count`).
    pub replays: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    pub first_failure: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_failure: Option<OffsetDateTime>,
    pub reason: Option<String>,
}

/// Everything about one dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct DeadLetterDetail {
    #[serde(flatten)]
    pub summary: DeadLetterSummary,
    pub message_id: String,
    pub correlation_id: String,
    pub content_type: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub published_at: Option<OffsetDateTime>,
    /// How often the broker delivered it (RabbitMQ's `x-delivery-count`).
    pub delivery_count: u32,
    pub headers: BTreeMap<String, String>,
    /// `x-marketplace-response`, parsed when it is JSON.
    pub last_marketplace_response: Option<Value>,
    /// The body, parsed when it is JSON (a webhook's payload parsed too).
    pub message: Value,
}

/// What one dead letter is, read from its headers and body.
pub fn summarize(letter: &DeadLetter) -> DeadLetterSummary {
    let parsed = InboundMessage::from_json(&letter.body);
    let (message_type, subscription_in_body, action) = match &parsed {
        Ok(InboundMessage::Webhook { payload, .. }) => {
            let payload: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
            (
                "webhook",
                payload["subscriptionId"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s.trim()).ok()),
                payload["action"].as_str().map(|a| a.trim().to_string()),
            )
        }
        Ok(InboundMessage::PurchaseResolved { subscription, .. }) => {
            let subscription: Value = serde_json::from_str(subscription).unwrap_or(Value::Null);
            (
                "purchase_resolved",
                subscription["id"]
                    .as_str()
                    .and_then(|s| Uuid::parse_str(s.trim()).ok()),
                Some("purchase_resolved".to_string()),
            )
        }
        Ok(InboundMessage::Command {
            subscription_id,
            command,
            ..
        }) => (
            "command",
            Some(*subscription_id),
            Some(command.name().to_string()),
        ),
        Err(_) => ("unreadable", None, None),
    };
    let h = &letter.headers;
    let death = Death::of(h);
    let at = |key: &str| {
        h.get(key)
            .and_then(|t| OffsetDateTime::parse(t.trim(), &Rfc3339).ok())
    };
    let last_failure = at(headers::DEAD_LETTERED_AT).or(death.at);
    DeadLetterSummary {
        id: letter.id.clone(),
        queue: letter.queue.clone(),
        message_type: message_type.to_string(),
        subscription_id: letter.subscription_header().or(subscription_in_body),
        action,
        attempts: h
            .get(headers::ATTEMPT)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(0),
        replays: h
            .get(headers::REPLAY_COUNT)
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(0),
        first_failure: at(headers::FIRST_FAILED_AT).or(last_failure),
        last_failure,
        reason: h
            .get(headers::FAILURE_REASON)
            .or_else(|| h.get(headers::LAST_ERROR))
            .cloned()
            .or(death.reason),
    }
}

/// Dead-lettered by RabbitMQ itself (the delivery limit): what `x-death` says.
struct Death {
    at: Option<OffsetDateTime>,
    reason: Option<String>,
}

impl Death {
    fn of(headers: &BTreeMap<String, String>) -> Self {
        let first: Value = headers
            .get("x-death")
            .and_then(|d| serde_json::from_str::<Value>(d).ok())
            .and_then(|d| d.as_array().and_then(|a| a.first().cloned()))
            .unwrap_or(Value::Null);
        Self {
            at: first["time"]
                .as_i64()
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok()),
            reason: first["reason"].as_str().map(|r| {
                format!(
                    "dead-lettered by RabbitMQ ({r}) from {}",
                    first["queue"].as_str().unwrap_or("?")
                )
            }),
        }
    }
}

fn detail(letter: &DeadLetter) -> DeadLetterDetail {
    let mut message: Value = serde_json::from_slice(&letter.body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&letter.body).into_owned()));
    // A webhook's payload travels as text: show it as the JSON it is.
    for key in ["payload", "subscription"] {
        if let Some(text) = message.get(key).and_then(Value::as_str)
            && let Ok(parsed) = serde_json::from_str::<Value>(text)
        {
            message[key] = parsed;
        }
    }
    DeadLetterDetail {
        summary: summarize(letter),
        message_id: letter.message_id.clone(),
        correlation_id: letter.correlation_id.clone(),
        content_type: letter.content_type.clone(),
        published_at: letter
            .timestamp
            .and_then(|t| OffsetDateTime::from_unix_timestamp(i64::try_from(t).ok()?).ok()),
        delivery_count: letter.delivery_count,
        headers: letter.headers.clone(),
        last_marketplace_response: letter
            .headers
            .get(headers::MARKETPLACE_RESPONSE)
            .map(|r| serde_json::from_str(r).unwrap_or_else(|_| Value::String(r.clone()))),
        message,
    }
}

/// The matching dead letters of every selected queue; nothing is changed.
pub async fn list(broker: &Broker, filter: &Filter) -> anyhow::Result<Vec<DeadLetterSummary>> {
    let mut found = Vec::new();
    for queue in filter.queues(broker)? {
        let mut reader = broker.read_dead_letters(&queue, WINDOW).await?;
        let read = async {
            while let Some(letter) = reader.next().await? {
                let summary = summarize(&letter);
                if filter.matches(&summary) {
                    found.push(summary);
                }
            }
            anyhow::Ok(())
        }
        .await;
        reader.release().await?;
        read?;
    }
    Ok(found)
}

/// Every copy of the dead letter `id`; nothing is changed.
pub async fn show(broker: &Broker, id: &str) -> anyhow::Result<Vec<DeadLetterDetail>> {
    let mut found = Vec::new();
    for queue in broker.dead_letter_queues() {
        let mut reader = broker.read_dead_letters(&queue, WINDOW).await?;
        let read = async {
            while let Some(letter) = reader.next().await? {
                if letter.id == id.trim() {
                    found.push(detail(&letter));
                }
            }
            anyhow::Ok(())
        }
        .await;
        reader.release().await?;
        read?;
    }
    Ok(found)
}

/// How to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    pub limit: Option<usize>,
    /// Messages per second at most.
    pub rate: Option<f64>,
    pub execute: bool,
    /// Who, for the journal and the `x-replayed-by` header.
    pub actor: String,
    /// Messages published (with confirms) and journalled per round.
    pub batch: usize,
}

/// A dead letter that could not be moved, and why (it stays in the queue).
#[derive(Debug, Clone, Serialize)]
pub struct NotMoved {
    pub id: String,
    pub error: String,
}

/// What `replay` or `purge` did (or, as a dry run, would do).
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    /// `replay` or `purge`.
    pub operation: &'static str,
    pub executed: bool,
    /// Dead letters read.
    pub examined: usize,
    /// The matching ones (within `--limit`).
    pub selected: Vec<DeadLetterSummary>,
    /// Replayed (published, confirmed, journalled, removed) or purged.
    pub moved: usize,
    pub not_moved: Vec<NotMoved>,
    pub elapsed_ms: u64,
    /// `moved` per second of `elapsed_ms`.
    pub per_second: f64,
}

impl MoveReport {
    fn new(operation: &'static str, executed: bool) -> Self {
        Self {
            operation,
            executed,
            examined: 0,
            selected: Vec::new(),
            moved: 0,
            not_moved: Vec::new(),
            elapsed_ms: 0,
            per_second: 0.0,
        }
    }

    fn finish(&mut self, started: Instant) {
        let elapsed = started.elapsed();
        self.elapsed_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        self.per_second = if elapsed.as_secs_f64() > 0.0 {
            self.moved as f64 / elapsed.as_secs_f64()
        } else {
            0.0
        };
    }
}

/// Spaces publishes to at most `rate` per second.
struct Pacer {
    rate: Option<f64>,
    started: tokio::time::Instant,
    sent: u64,
}

impl Pacer {
    fn new(rate: Option<f64>) -> Self {
        Self {
            rate: rate.filter(|r| *r > 0.0),
            started: tokio::time::Instant::now(),
            sent: 0,
        }
    }

    async fn wait(&mut self) {
        if let Some(rate) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        self.sent += 1;
    }

    /// A round never holds more than a tenth of a second's worth under a rate.
    fn batch(&self, batch: usize) -> usize {
        match self.rate {
            Some(rate) => ((rate / 10.0).ceil() as usize).clamp(1, batch.max(1)),
            None => batch.max(1),
        }
    }
}

/// Replays the matching dead letters (a dry run unless `options.execute`).
pub async fn replay(
    broker: &Broker,
    pool: &PgPool,
    filter: &Filter,
    options: &ReplayOptions,
    progress: &ProgressBar,
) -> anyhow::Result<MoveReport> {
    let started = Instant::now();
    let mut report = MoveReport::new("replay", options.execute);
    let mut pacer = Pacer::new(options.rate);
    for queue in filter.queues(broker)? {
        let mut reader = broker.read_dead_letters(&queue, WINDOW).await?;
        progress.inc_length(u64::from(reader.expected()));
        let result = move_matching(
            &mut reader,
            pool,
            filter,
            options,
            ActionKind::DlqReplay,
            &mut pacer,
            &mut report,
            progress,
        )
        .await;
        reader.release().await?;
        result?;
        if options.limit.is_some_and(|l| report.selected.len() >= l) {
            break;
        }
    }
    report.finish(started);
    Ok(report)
}

/// Removes the matching dead letters (a dry run unless `execute`), each journalled whole
/// first.
pub async fn purge(
    broker: &Broker,
    pool: &PgPool,
    filter: &Filter,
    execute: bool,
    actor: &str,
) -> anyhow::Result<MoveReport> {
    let started = Instant::now();
    let mut report = MoveReport::new("purge", execute);
    let options = ReplayOptions {
        limit: None,
        rate: None,
        execute,
        actor: actor.to_string(),
        batch: DEFAULT_BATCH,
    };
    let mut pacer = Pacer::new(None);
    let progress = ProgressBar::hidden();
    for queue in filter.queues(broker)? {
        let mut reader = broker.read_dead_letters(&queue, WINDOW).await?;
        let result = move_matching(
            &mut reader,
            pool,
            filter,
            &options,
            ActionKind::DlqPurge,
            &mut pacer,
            &mut report,
            &progress,
        )
        .await;
        reader.release().await?;
        result?;
    }
    report.finish(started);
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn move_matching(
    reader: &mut DeadLetterReader,
    pool: &PgPool,
    filter: &Filter,
    options: &ReplayOptions,
    kind: ActionKind,
    pacer: &mut Pacer,
    report: &mut MoveReport,
    progress: &ProgressBar,
) -> anyhow::Result<()> {
    let mut batch: Vec<DeadLetter> = Vec::new();
    while let Some(letter) = reader.next().await? {
        report.examined += 1;
        progress.inc(1);
        let summary = summarize(&letter);
        if !filter.matches(&summary) {
            continue;
        }
        if options.limit.is_some_and(|l| report.selected.len() >= l) {
            break;
        }
        report.selected.push(summary);
        if !options.execute {
            continue;
        }
        if kind == ActionKind::DlqReplay {
            pacer.wait().await;
        }
        batch.push(letter);
        if batch.len() >= pacer.batch(options.batch) {
            flush(reader, pool, &mut batch, options, kind, report).await?;
        }
    }
    flush(reader, pool, &mut batch, options, kind, report).await
}

/// Publishes (for a replay) and journals one round, then removes what succeeded.
async fn flush(
    reader: &mut DeadLetterReader,
    pool: &PgPool,
    batch: &mut Vec<DeadLetter>,
    options: &ReplayOptions,
    kind: ActionKind,
    report: &mut MoveReport,
) -> anyhow::Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let now = OffsetDateTime::now_utc();
    let letters: Vec<&DeadLetter> = batch.iter().collect();
    let mut done: Vec<&DeadLetter> = Vec::with_capacity(letters.len());
    if kind == ActionKind::DlqReplay {
        let results = reader.replay(&letters, &options.actor, &rfc3339(now)).await;
        for (letter, result) in letters.iter().zip(results) {
            match result {
                Ok(()) => done.push(letter),
                Err(error) => report.not_moved.push(NotMoved {
                    id: letter.id.clone(),
                    error: format!("not confirmed by RabbitMQ: {error}"),
                }),
            }
        }
    } else {
        done = letters;
    }
    let actions: Vec<NewAction> = done
        .iter()
        .map(|letter| journal_entry(kind, letter, &options.actor, now))
        .collect();
    operator_actions::record_all(pool, &actions).await.context(
        "cannot journal this round in operator_actions; its dead letters stay in the \
             queue (a replayed copy that was already published is deduplicated by the worker)",
    )?;
    for letter in done {
        match reader.remove(letter).await {
            Ok(()) => report.moved += 1,
            Err(error) => report.not_moved.push(NotMoved {
                id: letter.id.clone(),
                error: error.to_string(),
            }),
        }
    }
    batch.clear();
    Ok(())
}

fn journal_entry(
    kind: ActionKind,
    letter: &DeadLetter,
    actor: &str,
    at: OffsetDateTime,
) -> NewAction {
    let summary = summarize(letter);
    let body = String::from_utf8_lossy(&letter.body).into_owned();
    NewAction {
        action: kind,
        performed_by: actor.to_string(),
        performed_at: at,
        subscription_id: summary.subscription_id,
        dead_letter_id: Some(letter.id.clone()),
        queue: Some(letter.queue.clone()),
        reason: summary.reason.clone(),
        details: json!({
            "message_id": letter.message_id,
            "correlation_id": letter.correlation_id,
            "message_type": summary.message_type,
            "action": summary.action,
            "attempts": summary.attempts,
            "replays": summary.replays,
            "first_failure": summary.first_failure.map(rfc3339),
            "last_failure": summary.last_failure.map(rfc3339),
            "headers": letter.headers,
            "body": body,
        }),
    }
}

// ---- the command line ------------------------------------------------------------------

/// Runs one `dlq` subcommand against the configured RabbitMQ (and PostgreSQL for the
/// journal).
pub async fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    let broker = connect_existing(settings).await?;
    let result = run_with(&broker, settings, command, now).await;
    broker.close().await;
    result
}

/// The dead-letter queues of the configured prefix, declaring nothing: an unknown prefix is
/// refused with the prefixes this deployment's processes recorded in the database.
async fn connect_existing(settings: &Settings) -> Result<Broker, QueueError> {
    match Broker::connect_existing(&settings.amqp, "fulfillment-dlq").await {
        Err(QueueError::TopologyMissing {
            url,
            prefix,
            missing,
            ..
        }) => {
            let known = match crate::store::connect(&settings.database).await {
                Ok(pool) => {
                    let known = crate::store::prefixes::list(&pool)
                        .await
                        .unwrap_or_default();
                    pool.close().await;
                    known
                }
                Err(_) => Vec::new(),
            };
            Err(QueueError::TopologyMissing {
                url,
                prefix,
                missing,
                known,
            })
        }
        other => other,
    }
}

async fn run_with(
    broker: &Broker,
    settings: &Settings,
    command: DlqCommand,
    now: OffsetDateTime,
) -> anyhow::Result<ExitCode> {
    match command {
        DlqCommand::List(args) => {
            let filter = Filter::parse(&args.filter, now)?;
            let found = list(broker, &filter).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{}", letters_table(&found).render());
                println!("{} dead letter(s)", found.len());
            }
            Ok(exit_code(found.is_empty()))
        }
        DlqCommand::Show(args) => {
            let found = show(broker, &args.id).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else if found.is_empty() {
                println!(
                    "no dead letter {} in {}",
                    args.id,
                    broker.dead_letter_queues().join(", ")
                );
            } else {
                for detail in &found {
                    print!("{}", render_detail(detail));
                }
            }
            Ok(exit_code(!found.is_empty()))
        }
        DlqCommand::Replay(args) => {
            let filter = Filter::parse(&args.filter, now)?;
            if args.rate.is_some_and(|r| r.is_nan() || r <= 0.0) {
                return Err(UsageError::new(
                    "--rate must be a positive number of messages per second",
                )
                .into());
            }
            if args.limit == Some(0) {
                return Err(UsageError::new("--limit must be at least 1").into());
            }
            let pool = crate::store::connect(&settings.database).await?;
            let progress = progress_bar(args.execute && !args.json);
            let options = ReplayOptions {
                limit: args.limit,
                rate: args.rate,
                execute: args.execute,
                actor: cli_actor(),
                batch: DEFAULT_BATCH,
            };
            let report = replay(broker, &pool, &filter, &options, &progress).await;
            progress.finish_and_clear();
            pool.close().await;
            let report = report?;
            print_move_report(&report, args.json)?;
            Ok(exit_code(report.not_moved.is_empty()))
        }
        DlqCommand::Purge(args) => {
            let filter = Filter::parse(&args.filter, now)?;
            if filter.is_empty() && !args.all {
                return Err(UsageError::new(
                    "refusing to purge every dead letter without a filter; add a filter \
                     (--id, --subscription, --action, --since, --reason, --queue) or --all",
                )
                .into());
            }
            let pool = crate::store::connect(&settings.database).await?;
            let report = purge(broker, &pool, &filter, args.execute, &cli_actor()).await;
            pool.close().await;
            let report = report?;
            print_move_report(&report, args.json)?;
            Ok(exit_code(report.not_moved.is_empty()))
        }
    }
}

fn exit_code(fine: bool) -> ExitCode {
    if fine {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// A progress bar on stderr, drawn only when stderr is a terminal.
fn progress_bar(wanted: bool) -> ProgressBar {
    if !wanted {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {pos}/{len} examined {wide_bar} {per_sec} {eta}")
    {
        bar.set_style(style);
    }
    bar
}

fn letters_table(letters: &[DeadLetterSummary]) -> Table {
    let mut table = Table::new(
        &[
            "ID",
            "SUBSCRIPTION",
            "TYPE",
            "ACTION",
            "ATTEMPTS",
            "FIRST FAILURE",
            "LAST FAILURE",
            "REASON",
        ],
        &[40, 36, 17, 17, 8, 19, 19, 70],
    );
    for l in letters {
        let attempts = if l.replays > 0 {
            format!("{} (replayed {}×)", l.attempts, l.replays)
        } else {
            l.attempts.to_string()
        };
        table.row(vec![
            l.id.clone(),
            or_dash(l.subscription_id),
            l.message_type.clone(),
            or_dash(l.action.clone()),
            attempts,
            or_dash(l.first_failure.map(when)),
            or_dash(l.last_failure.map(when)),
            or_dash(l.reason.clone()),
        ]);
    }
    table
}

fn render_detail(d: &DeadLetterDetail) -> String {
    let s = &d.summary;
    let mut text = format!("Dead letter {} in {}\n", s.id, s.queue);
    let mut line = |key: &str, value: String| text.push_str(&format!("  {key:<16} {value}\n"));
    line("message id", d.message_id.clone());
    line(
        "correlation id",
        or_dash(Some(&d.correlation_id).filter(|c| !c.is_empty())),
    );
    line("type", s.message_type.clone());
    line("subscription", or_dash(s.subscription_id));
    line("action", or_dash(s.action.clone()));
    line(
        "attempts",
        format!(
            "{} (replayed {} times; read {} times from this queue)",
            s.attempts, s.replays, d.delivery_count
        ),
    );
    line("published", or_dash(d.published_at.map(when)));
    line("first failure", or_dash(s.first_failure.map(when)));
    line("last failure", or_dash(s.last_failure.map(when)));
    line("reason", or_dash(s.reason.clone()));
    text.push_str("Headers\n");
    for (key, value) in &d.headers {
        text.push_str(&format!("  {key}: {}\n", shorten(value, 300)));
    }
    text.push_str("Last Microsoft response\n");
    match &d.last_marketplace_response {
        None => text.push_str("  none recorded (the failure did not come from Microsoft)\n"),
        Some(response) => {
            let status = response["status"]
                .as_u64()
                .map_or("no status".to_string(), |s| format!("HTTP {s}"));
            text.push_str(&format!(
                "  {} → {status} ({}), x-ms-requestid {}, {} attempt(s)\n",
                response["call"].as_str().unwrap_or("call"),
                response["error"].as_str().unwrap_or("error"),
                response["request_id"].as_str().unwrap_or("-"),
                response["attempts"].as_u64().unwrap_or(0),
            ));
            if let Some(body) = response["body"].as_str().filter(|b| !b.is_empty()) {
                text.push_str(&format!("  body: {}\n", shorten(body, 2000)));
            }
        }
    }
    text.push_str("Message\n");
    let pretty = serde_json::to_string_pretty(&d.message).unwrap_or_default();
    for l in pretty.lines() {
        text.push_str(&format!("  {l}\n"));
    }
    text.push('\n');
    text
}

fn print_move_report(report: &MoveReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if !report.selected.is_empty() {
        print!("{}", letters_table(&report.selected).render());
    }
    let verb = if report.operation == "replay" {
        "replayed to the work queue"
    } else {
        "purged (kept whole in operator_actions)"
    };
    if report.executed {
        println!(
            "{} of {} selected dead letter(s) {verb} ({} examined) in {:.1} s, {:.0}/s",
            report.moved,
            report.selected.len(),
            report.examined,
            report.elapsed_ms as f64 / 1000.0,
            report.per_second
        );
        for failure in &report.not_moved {
            println!("  not moved: {}: {}", failure.id, failure.error);
        }
    } else {
        println!(
            "dry run: {} of {} dead letter(s) would be {verb}; nothing changed (add --execute)",
            report.selected.len(),
            report.examined
        );
    }
    Ok(())
}
