//! `fulfillment effects list|show|retry|abandon`: dead effects, the outbox rows the effect
//! runner gave up on (an ACK that exhausted its attempts, an activation Microsoft refused,
//! a domain event the ISV never took).
//!
//! `retry` puts each named row back to pending with a fresh attempt budget; the runners take
//! it at once and resume its protocol where it stood. `abandon` gives up on it for good
//! (with a reason). Both act only on rows that are dead, one transaction per row with its
//! journal entry in `operator_actions` (who, when, which effect, why), so the subscription's
//! timeline shows them. The console calls the same functions.

use std::process::ExitCode;

use serde::Serialize;
use serde_json::json;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::render::{Table, age, or_dash, shorten, when};
use super::{UsageError, cli_actor};
use crate::settings::Settings;
use crate::store::dead_effects::{self, DeadEffectFilter, EffectRow, EffectStatus, MAX_PAGE_SIZE};
use crate::store::operator_actions::{ActionKind, NewAction};

/// Rows per page when none is asked for.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
/// The longest reason an abandon records.
pub const MAX_REASON_CHARS: usize = 500;

#[derive(Debug, clap::Subcommand)]
pub enum EffectsCommand {
    /// List dead effects in the order they were decided, a page at a time (--after pages
    /// on). Exit code 1 when any is listed (something needs a person).
    List(ListArgs),
    /// Print one outbox row whole: the effect, its subscription, attempts, last error and
    /// the protocol's progress.
    Show(ShowArgs),
    /// Put dead effects back to pending with a fresh attempt budget (journalled).
    Retry(RetryArgs),
    /// Give up on dead effects for good, with a reason (journalled).
    Abandon(AbandonArgs),
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Only effects of this subscription.
    #[arg(long)]
    pub subscription: Option<Uuid>,
    /// Only this effect kind (ack_operation, activate, publish_domain_event, …).
    #[arg(long)]
    pub kind: Option<String>,
    /// The page after this effect id (the `next` of the previous page).
    #[arg(long, value_name = "ID")]
    pub after: Option<Uuid>,
    /// At most N rows (1 to 500).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PAGE_SIZE)]
    pub limit: i64,
    /// JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// The effect id (from `effects list`).
    pub id: Uuid,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// The dead effects' ids (from `effects list`).
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<Uuid>,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct AbandonArgs {
    /// The dead effects' ids (from `effects list`).
    #[arg(required = true, value_name = "ID")]
    pub ids: Vec<Uuid>,
    /// Why nobody will carry these out (kept in the journal).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A page of dead effects.
#[derive(Debug, Clone, Serialize)]
pub struct Page {
    pub effects: Vec<EffectRow>,
    /// The cursor of the next page (`--after`), when there is one.
    pub next: Option<Uuid>,
}

/// What retry or abandon did to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Retried,
    Abandoned,
    /// The row is not dead (already retried, abandoned, or never dead): nothing changed.
    NotDead,
    NotFound,
}

/// One row's result.
#[derive(Debug, Clone, Serialize)]
pub struct ActResult {
    pub id: Uuid,
    pub outcome: Outcome,
    /// The row's status now, when it exists.
    pub status: Option<EffectStatus>,
    pub kind: Option<String>,
    pub subscription_id: Option<Uuid>,
}

/// A checked page request.
pub fn filter(
    subscription_id: Option<Uuid>,
    kind: Option<&str>,
    after: Option<Uuid>,
    limit: i64,
) -> Result<DeadEffectFilter, UsageError> {
    if !(1..=MAX_PAGE_SIZE).contains(&limit) {
        return Err(UsageError::new(format!(
            "the page size (--limit) must be between 1 and {MAX_PAGE_SIZE}; got {limit}"
        )));
    }
    let kind = kind.map(str::trim).filter(|k| !k.is_empty());
    if let Some(kind) = kind
        && !kind.chars().all(|c| c.is_ascii_lowercase() || c == '_')
    {
        return Err(UsageError::new(format!(
            "an effect kind is snake_case (ack_operation, activate, …); got {kind:?}"
        )));
    }
    Ok(DeadEffectFilter {
        subscription_id,
        kind: kind.map(str::to_string),
        after,
        limit,
    })
}

/// A reason an abandon may record: not blank, at most [`MAX_REASON_CHARS`].
pub fn parse_reason(raw: &str) -> Result<String, UsageError> {
    let reason = raw.trim();
    if reason.is_empty() {
        return Err(UsageError::new(
            "say why the effect is abandoned (--reason): the journal keeps it",
        ));
    }
    if reason.chars().count() > MAX_REASON_CHARS {
        return Err(UsageError::new(format!(
            "the reason is longer than {MAX_REASON_CHARS} characters"
        )));
    }
    Ok(reason.to_string())
}

/// One page of dead effects.
pub async fn list(pool: &PgPool, filter: &DeadEffectFilter) -> anyhow::Result<Page> {
    let mut wanted = filter.clone();
    wanted.limit = filter.limit.clamp(1, MAX_PAGE_SIZE);
    // One more than asked: whether a next page exists.
    let mut probe = wanted.clone();
    probe.limit = wanted.limit + 1;
    let mut effects = dead_effects::list(pool, &probe).await?;
    let more = effects.len() as i64 > wanted.limit;
    effects.truncate(wanted.limit as usize);
    let next = if more {
        effects.last().map(|e| e.id)
    } else {
        None
    };
    Ok(Page { effects, next })
}

/// One outbox row, whatever its status.
pub async fn show(pool: &PgPool, id: Uuid) -> anyhow::Result<Option<EffectRow>> {
    Ok(dead_effects::get(pool, id).await?)
}

/// Puts the dead row `id` back to pending, journalled as done by `actor`.
pub async fn retry(pool: &PgPool, id: Uuid, actor: &str) -> anyhow::Result<ActResult> {
    act(pool, id, actor, None).await
}

/// Abandons the dead row `id` for `reason`, journalled as done by `actor`.
pub async fn abandon(
    pool: &PgPool,
    id: Uuid,
    actor: &str,
    reason: &str,
) -> anyhow::Result<ActResult> {
    let reason = parse_reason(reason)?;
    act(pool, id, actor, Some(reason)).await
}

/// Retry (`abandon_reason` none) or abandon one row.
async fn act(
    pool: &PgPool,
    id: Uuid,
    actor: &str,
    abandon_reason: Option<String>,
) -> anyhow::Result<ActResult> {
    let Some(current) = dead_effects::get(pool, id).await? else {
        return Ok(ActResult {
            id,
            outcome: Outcome::NotFound,
            status: None,
            kind: None,
            subscription_id: None,
        });
    };
    let now = OffsetDateTime::now_utc();
    let (changed, done) = match abandon_reason {
        None => {
            let action = journal_entry(ActionKind::EffectRetry, &current, actor, now, None);
            (
                dead_effects::retry(pool, id, &action).await?,
                Outcome::Retried,
            )
        }
        Some(reason) => {
            let action = journal_entry(
                ActionKind::EffectAbandon,
                &current,
                actor,
                now,
                Some(reason),
            );
            (
                dead_effects::abandon(pool, id, &action).await?,
                Outcome::Abandoned,
            )
        }
    };
    let outcome = if changed.is_some() {
        done
    } else {
        Outcome::NotDead
    };
    let status = dead_effects::get(pool, id).await?.map(|row| row.status);
    Ok(ActResult {
        id,
        outcome,
        status,
        kind: Some(current.kind),
        subscription_id: Some(current.subscription_id),
    })
}

/// The journal row of a retry or an abandon: the effect, its last error, and for an
/// abandon the operator's reason.
pub fn journal_entry(
    kind: ActionKind,
    row: &EffectRow,
    actor: &str,
    now: OffsetDateTime,
    abandon_reason: Option<String>,
) -> NewAction {
    NewAction {
        action: kind,
        performed_by: actor.to_string(),
        performed_at: now,
        subscription_id: Some(row.subscription_id),
        dead_letter_id: None,
        queue: None,
        reason: abandon_reason.or_else(|| row.last_error.clone()),
        details: json!({
            "effect_id": row.id,
            "kind": row.kind,
            "event_id": row.event_id,
            "attempts": row.attempts,
            "last_error": row.last_error,
            "decided_at": super::rfc3339(row.created_at),
            "died_at": super::rfc3339(row.updated_at),
            "correlation_id": row.correlation_id,
        }),
    }
}

// ---- the command line -------------------------------------------------------------------

pub async fn run(settings: &Settings, command: EffectsCommand) -> anyhow::Result<ExitCode> {
    let pool = crate::store::connect(&settings.database).await?;
    let result = run_with(&pool, command).await;
    pool.close().await;
    result
}

async fn run_with(pool: &PgPool, command: EffectsCommand) -> anyhow::Result<ExitCode> {
    match command {
        EffectsCommand::List(args) => {
            let filter = filter(
                args.subscription,
                args.kind.as_deref(),
                args.after,
                args.limit,
            )?;
            let page = list(pool, &filter).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&page)?);
            } else {
                print!("{}", render_page(&page, OffsetDateTime::now_utc()));
            }
            Ok(if page.effects.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        EffectsCommand::Show(args) => {
            let Some(row) = show(pool, args.id).await? else {
                return Err(UsageError::new(format!(
                    "no effect {} in the outbox (ids come from `fulfillment effects list`)",
                    args.id
                ))
                .into());
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&row)?);
            } else {
                print!("{}", render_detail(&row));
            }
            Ok(ExitCode::SUCCESS)
        }
        EffectsCommand::Retry(args) => {
            let actor = cli_actor();
            let mut results = Vec::with_capacity(args.ids.len());
            for id in dedup(args.ids) {
                results.push(retry(pool, id, &actor).await?);
            }
            print_results(&results, args.json)
        }
        EffectsCommand::Abandon(args) => {
            let reason = parse_reason(&args.reason)?;
            let actor = cli_actor();
            let mut results = Vec::with_capacity(args.ids.len());
            for id in dedup(args.ids) {
                results.push(abandon(pool, id, &actor, &reason).await?);
            }
            print_results(&results, args.json)
        }
    }
}

fn dedup(ids: Vec<Uuid>) -> Vec<Uuid> {
    let mut seen = std::collections::HashSet::new();
    ids.into_iter().filter(|id| seen.insert(*id)).collect()
}

/// Exit code 1 unless every row was changed.
fn print_results(results: &[ActResult], json: bool) -> anyhow::Result<ExitCode> {
    if json {
        println!("{}", serde_json::to_string_pretty(results)?);
    } else {
        print!("{}", render_results(results));
    }
    let all_done = results
        .iter()
        .all(|r| matches!(r.outcome, Outcome::Retried | Outcome::Abandoned));
    Ok(if all_done {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The list: the effect and its subscription in the first column (whole ids, for
/// `show`/`retry`), then what it is and why it died (cut; `show` has all of it).
pub fn render_page(page: &Page, now: OffsetDateTime) -> String {
    if page.effects.is_empty() {
        return "no dead effects\n".to_string();
    }
    let mut table = Table::new(&["EFFECT / SUBSCRIPTION", "WHAT AND WHY"], &[]);
    for e in &page.effects {
        table.row(vec![
            format!("{}\n{}", e.id, e.subscription_id),
            format!(
                "{}, {} attempt(s), died {} ago\n{}",
                e.kind,
                e.attempts,
                age(now - e.updated_at),
                shorten(e.last_error.as_deref().unwrap_or("no error recorded"), 160)
            ),
        ]);
    }
    let mut out = table.render();
    out.push_str(&format!("{} dead effect(s)", page.effects.len()));
    match page.next {
        Some(next) => out.push_str(&format!("; more with --after {next}\n")),
        None => out.push('\n'),
    }
    out.push_str(
        "retry:   fulfillment effects retry ID…\n\
         abandon: fulfillment effects abandon ID… --reason TEXT\n",
    );
    out
}

fn render_detail(row: &EffectRow) -> String {
    let mut text = format!("Effect {} ({})\n", row.id, row.status.as_str());
    let mut line = |key: &str, value: String| text.push_str(&format!("  {key:<14} {value}\n"));
    line("kind", row.kind.clone());
    line("subscription", row.subscription_id.to_string());
    line(
        "decided by",
        format!(
            "event {} ({})",
            row.event_id,
            or_dash(row.event_kind.clone())
        ),
    );
    line("decided at", when(row.created_at));
    line("last change", when(row.updated_at));
    line("attempts", row.attempts.to_string());
    line("last error", or_dash(row.last_error.clone()));
    line("correlation", or_dash(row.correlation_id.clone()));
    text.push_str("Effect\n");
    text.push_str(&indent(
        &serde_json::to_string_pretty(&row.effect).unwrap_or_default(),
    ));
    text.push_str("Progress\n");
    text.push_str(&indent(
        &serde_json::to_string_pretty(&row.progress).unwrap_or_default(),
    ));
    if row.status == EffectStatus::Dead {
        text.push_str(&format!(
            "Next: fulfillment effects retry {id}   or   fulfillment effects abandon {id} --reason TEXT\n\
             The timeline: fulfillment subscription show {sub}\n",
            id = row.id,
            sub = row.subscription_id
        ));
    }
    text
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

fn render_results(results: &[ActResult]) -> String {
    let mut out = String::new();
    for r in results {
        let what = match r.outcome {
            Outcome::Retried => "put back to pending; the runners take it now".to_string(),
            Outcome::Abandoned => "abandoned".to_string(),
            Outcome::NotDead => format!(
                "not dead (it is {}): nothing changed",
                r.status.map_or("gone", EffectStatus::as_str)
            ),
            Outcome::NotFound => "no such effect: nothing changed".to_string(),
        };
        out.push_str(&format!(
            "{} {}: {what}\n",
            r.id,
            r.kind.as_deref().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use time::macros::datetime;

    fn row() -> EffectRow {
        EffectRow {
            id: Uuid::nil(),
            subscription_id: Uuid::max(),
            event_id: Uuid::nil(),
            event_kind: Some("WebhookChangePlan".into()),
            kind: "ack_operation".into(),
            status: EffectStatus::Dead,
            effect: json!({"type": "ack_operation"}),
            attempts: 8,
            last_error: Some("gave up after 8 attempts: HTTP 503".into()),
            correlation_id: None,
            progress: Value::Null,
            created_at: datetime!(2026-12-06 07:00 UTC),
            updated_at: datetime!(2026-12-06 07:05 UTC),
        }
    }

    #[test]
    fn a_page_size_outside_its_bounds_or_an_odd_kind_is_refused() {
        assert!(filter(None, None, None, 0).is_err());
        assert!(filter(None, None, None, MAX_PAGE_SIZE + 1).is_err());
        assert!(filter(None, Some("ACK; drop"), None, 10).is_err());
        let f = filter(None, Some(" ack_operation "), None, 10).unwrap();
        assert_eq!(f.kind.as_deref(), Some("ack_operation"));
        assert!(filter(None, Some("  "), None, 10).unwrap().kind.is_none());
    }

    #[test]
    fn an_abandon_needs_a_reason_of_reasonable_length() {
        assert!(parse_reason("  ").is_err());
        assert!(parse_reason(&"x".repeat(MAX_REASON_CHARS + 1)).is_err());
        assert_eq!(parse_reason(" customer left ").unwrap(), "customer left");
    }

    #[test]
    fn the_journal_says_which_effect_why_and_who() {
        let now = datetime!(2026-12-06 08:00 UTC);
        let retry = journal_entry(ActionKind::EffectRetry, &row(), "cli:ann@box", now, None);
        assert_eq!(retry.performed_by, "cli:ann@box");
        assert_eq!(retry.subscription_id, Some(Uuid::max()));
        assert_eq!(
            retry.reason.as_deref(),
            Some("gave up after 8 attempts: HTTP 503")
        );
        assert_eq!(retry.details["effect_id"], json!(Uuid::nil()));
        assert_eq!(retry.details["kind"], "ack_operation");
        let abandon = journal_entry(
            ActionKind::EffectAbandon,
            &row(),
            "console:ann",
            now,
            Some("refunded".into()),
        );
        assert_eq!(abandon.reason.as_deref(), Some("refunded"));
        assert_eq!(
            abandon.details["last_error"],
            "gave up after 8 attempts: HTTP 503"
        );
    }

    #[test]
    fn the_list_names_each_effect_and_how_to_page_on() {
        let page = Page {
            effects: vec![row()],
            next: Some(Uuid::nil()),
        };
        let text = render_page(&page, datetime!(2026-12-06 07:15 UTC));
        assert!(text.contains(&Uuid::nil().to_string()), "{text}");
        assert!(text.contains(&Uuid::max().to_string()), "{text}");
        assert!(text.contains("10m ago"), "{text}");
        assert!(text.contains(&format!("--after {}", Uuid::nil())), "{text}");
        let empty = Page {
            effects: vec![],
            next: None,
        };
        assert_eq!(
            render_page(&empty, datetime!(2026-12-06 07:15 UTC)),
            "no dead effects\n"
        );
    }
}
