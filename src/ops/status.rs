//! `fulfillment status`: what needs a person now, each with the command to run.
//!
//! Four sources: dead letters (per dead-letter queue), dead effects (per kind), publisher
//! commands that did not succeed, and purchases pending longer than
//! `reconcile.stuck_pending_after`. [`gather`] reads them, [`attention`] (pure) turns them
//! into the list; the console's overview shows the same list.
//!
//! A command refused by our policy or by Microsoft, or whose operation ended `Failed` or
//! `Conflict`, is an answer, and whoever asked already has it (the CLI's exit code, the
//! API's status, the ISV's domain event): it is listed only while it is news
//! ([`ANSWERS_LISTED_FOR`], `--answers-within`). A command with an unknown outcome is an
//! open question only a person can close (`fulfillment reconcile`): it stays listed for
//! the whole `--since` window.
//!
//! Exit code 1 when something needs a person, 3 when a source could not be read (and
//! nothing else needs a person), 0 otherwise.

use std::process::ExitCode;
use std::time::Duration;

use fulfillment_state_machine::StateName;
use serde::Serialize;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::render::{Table, age, output_width};
use super::{UsageError, parse_since, rfc3339};
use crate::cli::exit;
use crate::queue::Broker;
use crate::settings::Settings;
use crate::store::commands::{self, Unsuccessful, UnsuccessfulCommand};
use crate::store::dead_effects;

/// Unsuccessful commands listed at most (the newest).
pub const MAX_COMMANDS: i64 = 50;

/// How long a command that ended with an answer (refused, failed) stays listed by default.
pub const ANSWERS_LISTED_FOR: Duration = Duration::from_secs(3600);

/// The ends that are answers; the rest ([`Unsuccessful::Unknown`]) are open questions.
const ANSWERS: &[Unsuccessful] = &[
    Unsuccessful::Rejected,
    Unsuccessful::Refused,
    Unsuccessful::Failed,
    Unsuccessful::Conflict,
];

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// How far back to look for commands whose outcome is unknown: RFC 3339, or an age
    /// (30m, 2h, 7d).
    #[arg(long, value_name = "T", default_value = "7d")]
    pub since: String,
    /// How long a command refused (by our policy or by Microsoft) or failed at Microsoft
    /// stays listed: an age (30m, 2h, 7d). It is an answer the requester already got, news
    /// for a while, not an action item; never longer than --since.
    #[arg(long, value_name = "AGE", default_value = "1h")]
    pub answers_within: String,
    /// JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Dead letters in one queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueCount {
    pub queue: String,
    pub messages: u32,
}

/// A purchase still pending.
#[derive(Debug, Clone, Serialize)]
pub struct PendingPurchase {
    pub subscription_id: Uuid,
    pub plan_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// What the sources said.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Facts {
    pub dead_letters: Vec<QueueCount>,
    /// Dead effects per kind: kind, how many, when the oldest died.
    pub dead_effects: Vec<(String, i64, OffsetDateTime)>,
    pub unsuccessful_commands: Vec<UnsuccessfulCommand>,
    pub pending_purchases: Vec<PendingPurchase>,
    /// Sources that could not be read, and why.
    pub unchecked: Vec<String>,
}

/// What needs a person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Need {
    DeadLetters,
    DeadEffects,
    RefusedCommand,
    StuckPurchase,
}

/// One thing that needs a person.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub need: Need,
    /// What it is, in words.
    pub what: String,
    /// The subscription, when it concerns one.
    pub subscription_id: Option<Uuid>,
    /// How many (messages, effects), 1 for a single command or purchase.
    pub count: i64,
    /// Since when (the oldest).
    #[serde(with = "time::serde::rfc3339::option")]
    pub since: Option<OffsetDateTime>,
    /// The command that shows it or fixes it.
    pub command: String,
}

/// The list.
#[derive(Debug, Clone, Serialize)]
pub struct Attention {
    #[serde(with = "time::serde::rfc3339")]
    pub checked_at: OffsetDateTime,
    pub items: Vec<Item>,
    pub unchecked: Vec<String>,
}

impl Attention {
    pub fn exit_code(&self) -> u8 {
        if !self.items.is_empty() {
            exit::PROBLEMS
        } else if !self.unchecked.is_empty() {
            exit::UNCHECKED
        } else {
            exit::OK
        }
    }
}

/// How long things wait before they are listed, or stay listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Windows {
    /// A purchase pending for less is a customer on the way.
    pub stuck_after: Duration,
    /// A command that ended with an answer longer ago is no longer news.
    pub answers_for: Duration,
}

/// What needs a person, most urgent kinds first: dead letters and dead effects (work that
/// stopped), then commands that did not succeed, then stuck purchases. Purchases pending
/// for less than `stuck_after` are on their way; commands that ended with an answer more
/// than `answers_for` ago are old news; neither is listed.
pub fn attention(facts: &Facts, now: OffsetDateTime, windows: Windows) -> Attention {
    let mut items = Vec::new();
    for q in facts.dead_letters.iter().filter(|q| q.messages > 0) {
        items.push(Item {
            need: Need::DeadLetters,
            what: format!("{} dead letter(s) in {}", q.messages, q.queue),
            subscription_id: None,
            count: i64::from(q.messages),
            since: None,
            command: format!("fulfillment dlq list --queue {}", q.queue),
        });
    }
    for (kind, count, oldest) in facts.dead_effects.iter().filter(|(_, n, _)| *n > 0) {
        items.push(Item {
            need: Need::DeadEffects,
            what: format!(
                "{count} dead effect(s) {kind}, the oldest died {} ago",
                age(now - *oldest)
            ),
            subscription_id: None,
            count: *count,
            since: Some(*oldest),
            command: format!("fulfillment effects list --kind {kind}"),
        });
    }
    let answers_for = time::Duration::try_from(windows.answers_for).unwrap_or(time::Duration::MAX);
    for c in &facts.unsuccessful_commands {
        if ANSWERS.contains(&c.status) && now - c.requested_at > answers_for {
            continue;
        }
        let outcome = match c.status {
            Unsuccessful::Rejected => "refused by our policy".to_string(),
            Unsuccessful::Refused => "refused by Microsoft".to_string(),
            Unsuccessful::Unknown => "outcome unknown".to_string(),
            Unsuccessful::Failed | Unsuccessful::Conflict => format!(
                "ended {} at Microsoft",
                crate::store::text::TextValue::as_str(c.status)
            ),
        };
        let reason = c
            .reason
            .as_deref()
            .map(|r| format!(": {}", super::render::shorten(r, 120)))
            .unwrap_or_default();
        items.push(Item {
            need: Need::RefusedCommand,
            what: format!(
                "{} by {} {} ago {outcome}{reason}",
                c.kind,
                c.requested_by,
                age(now - c.requested_at)
            ),
            subscription_id: Some(c.subscription_id),
            count: 1,
            since: Some(c.requested_at),
            command: if c.status == Unsuccessful::Unknown {
                "fulfillment reconcile".to_string()
            } else {
                format!("fulfillment subscription show {}", c.subscription_id)
            },
        });
    }
    let stuck_after = time::Duration::try_from(windows.stuck_after).unwrap_or(time::Duration::MAX);
    for p in &facts.pending_purchases {
        let pending_for = now - p.created_at;
        if pending_for < stuck_after {
            continue;
        }
        items.push(Item {
            need: Need::StuckPurchase,
            what: format!(
                "purchase of {} pending for {} (stuck after {})",
                p.plan_id.as_deref().unwrap_or("an unknown plan"),
                age(pending_for),
                age(stuck_after)
            ),
            subscription_id: Some(p.subscription_id),
            count: 1,
            since: Some(p.created_at),
            command: format!("fulfillment subscription show {}", p.subscription_id),
        });
    }
    Attention {
        checked_at: now,
        items,
        unchecked: facts.unchecked.clone(),
    }
}

/// Reads the sources: commands with an unknown outcome requested since `commands_since`,
/// those that ended with an answer since `answers_since` (the later of the two counts).
/// `broker` absent: dead letters are reported unchecked with `why`.
pub async fn gather(
    pool: &PgPool,
    broker: Result<&Broker, String>,
    commands_since: OffsetDateTime,
    answers_since: OffsetDateTime,
) -> anyhow::Result<Facts> {
    let mut facts = Facts::default();
    match broker {
        Ok(broker) => {
            for queue in broker.dead_letter_queues() {
                match broker.ready_messages(&queue).await {
                    Ok(messages) => facts.dead_letters.push(QueueCount { queue, messages }),
                    Err(error) => facts
                        .unchecked
                        .push(format!("dead letters in {queue}: {error}")),
                }
            }
        }
        Err(why) => facts.unchecked.push(format!("dead letters: {why}")),
    }
    facts.dead_effects = dead_effects::count_by_kind(pool).await?;
    // Two reads, so that a burst of fresh refusals cannot push an open question out of the
    // newest MAX_COMMANDS.
    let mut unsuccessful =
        commands::unsuccessful_since(pool, commands_since, &[Unsuccessful::Unknown], MAX_COMMANDS)
            .await?;
    unsuccessful.extend(
        commands::unsuccessful_since(
            pool,
            answers_since.max(commands_since),
            ANSWERS,
            MAX_COMMANDS,
        )
        .await?,
    );
    unsuccessful.sort_by_key(|c| std::cmp::Reverse(c.requested_at));
    facts.unsuccessful_commands = unsuccessful;
    facts.pending_purchases =
        super::subscription::list(pool, Some(StateName::PendingFulfillment), None, None)
            .await?
            .into_iter()
            .map(|r| PendingPurchase {
                subscription_id: r.id,
                plan_id: r.plan_id,
                created_at: r.created_at,
            })
            .collect();
    Ok(facts)
}

pub async fn run(settings: &Settings, args: StatusArgs) -> anyhow::Result<ExitCode> {
    let now = OffsetDateTime::now_utc();
    let since = parse_since(&args.since, now)?;
    if since > now {
        return Err(UsageError::new("--since is in the future").into());
    }
    let answers_for = super::parse_age(&args.answers_within).ok_or_else(|| {
        UsageError::new(format!(
            "--answers-within takes an age such as 30m, 2h, 7d; got {:?}",
            args.answers_within
        ))
    })?;
    let answers_since = time::Duration::try_from(answers_for)
        .ok()
        .and_then(|age| now.checked_sub(age))
        .unwrap_or(since);
    let pool = crate::store::connect(&settings.database).await?;
    let broker = Broker::connect_existing(&settings.amqp, "fulfillment-status").await;
    let facts = gather(
        &pool,
        broker.as_ref().map_err(|e| e.to_string()),
        since,
        answers_since,
    )
    .await;
    if let Ok(broker) = &broker {
        broker.close().await;
    }
    pool.close().await;
    let windows = Windows {
        stuck_after: settings.reconcile.stuck_pending_after,
        answers_for,
    };
    let report = attention(&facts?, now, windows);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(ExitCode::from(report.exit_code()))
}

/// The list as text, wrapped to the output's width: a section per need, each entry with
/// the command to run under it.
pub fn render(report: &Attention) -> String {
    render_width(report, output_width())
}

/// [`render`] wrapped to `width` columns (`None`: not wrapped).
pub fn render_width(report: &Attention, width: Option<u16>) -> String {
    let mut out = if report.items.is_empty() {
        format!("Nothing needs a person ({}).\n", rfc3339(report.checked_at))
    } else {
        format!(
            "{} thing(s) need a person ({}):\n",
            report.items.len(),
            rfc3339(report.checked_at)
        )
    };
    for need in [
        Need::DeadLetters,
        Need::DeadEffects,
        Need::RefusedCommand,
        Need::StuckPurchase,
    ] {
        let mut section = Table::new(
            &[match need {
                Need::DeadLetters => "DEAD LETTERS",
                Need::DeadEffects => "DEAD EFFECTS",
                Need::RefusedCommand => "COMMANDS THAT DID NOT SUCCEED",
                Need::StuckPurchase => "PURCHASES STUCK IN PendingFulfillment",
            }],
            &[],
        );
        for item in report.items.iter().filter(|i| i.need == need) {
            let about = match item.subscription_id {
                Some(id) if !item.command.contains(&id.to_string()) => {
                    format!(" (subscription {id})")
                }
                _ => String::new(),
            };
            section.row(vec![format!("{}{about}\n$ {}", item.what, item.command)]);
        }
        if !section.is_empty() {
            out.push('\n');
            out.push_str(&section.render_width(width));
        }
    }
    for why in &report.unchecked {
        out.push_str(&format!("Could not check {why}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn windows(stuck_after_secs: u64) -> Windows {
        Windows {
            stuck_after: Duration::from_secs(stuck_after_secs),
            answers_for: Duration::from_secs(3 * 3600),
        }
    }

    fn facts(now: OffsetDateTime) -> Facts {
        Facts {
            dead_letters: vec![
                QueueCount {
                    queue: "fulfillment.inbound.dlq".into(),
                    messages: 3,
                },
                QueueCount {
                    queue: "fulfillment.other.dlq".into(),
                    messages: 0,
                },
            ],
            dead_effects: vec![("ack_operation".into(), 2, now - time::Duration::minutes(5))],
            unsuccessful_commands: vec![UnsuccessfulCommand {
                command_id: Uuid::nil(),
                subscription_id: Uuid::from_u128(1),
                kind: "change_quantity".into(),
                requested_by: "cli:ann@box".into(),
                requested_at: now - time::Duration::hours(2),
                status: Unsuccessful::Rejected,
                reason: Some("400 seats above the plan".into()),
            }],
            pending_purchases: vec![
                PendingPurchase {
                    subscription_id: Uuid::from_u128(2),
                    plan_id: Some("silver".into()),
                    created_at: now - time::Duration::days(2),
                },
                PendingPurchase {
                    subscription_id: Uuid::from_u128(3),
                    plan_id: Some("gold".into()),
                    created_at: now - time::Duration::seconds(5),
                },
            ],
            unchecked: vec![],
        }
    }

    #[test]
    fn each_thing_that_needs_a_person_comes_with_its_command() {
        let now = datetime!(2026-12-06 08:00 UTC);
        let report = attention(&facts(now), now, windows(86_400));
        let needs: Vec<Need> = report.items.iter().map(|i| i.need).collect();
        assert_eq!(
            needs,
            [
                Need::DeadLetters,
                Need::DeadEffects,
                Need::RefusedCommand,
                Need::StuckPurchase
            ]
        );
        let commands: Vec<&str> = report.items.iter().map(|i| i.command.as_str()).collect();
        assert_eq!(
            commands[0],
            "fulfillment dlq list --queue fulfillment.inbound.dlq"
        );
        assert_eq!(commands[1], "fulfillment effects list --kind ack_operation");
        assert_eq!(
            commands[2],
            format!("fulfillment subscription show {}", Uuid::from_u128(1))
        );
        assert_eq!(
            commands[3],
            format!("fulfillment subscription show {}", Uuid::from_u128(2))
        );
        assert!(report.items[2].what.contains("refused by our policy"));
        assert_eq!(report.exit_code(), exit::PROBLEMS);
    }

    #[test]
    fn a_purchase_seconds_old_is_not_stuck() {
        let now = datetime!(2026-12-06 08:00 UTC);
        let report = attention(&facts(now), now, windows(86_400));
        assert!(
            !report
                .items
                .iter()
                .any(|i| i.subscription_id == Some(Uuid::from_u128(3)))
        );
    }

    #[test]
    fn nothing_to_do_exits_zero_and_an_unread_source_exits_three() {
        let now = datetime!(2026-12-06 08:00 UTC);
        let calm = attention(&Facts::default(), now, windows(60));
        assert_eq!(calm.exit_code(), exit::OK);
        assert!(render(&calm).starts_with("Nothing needs a person"));
        let blind = attention(
            &Facts {
                unchecked: vec!["dead letters: RabbitMQ unreachable".into()],
                ..Facts::default()
            },
            now,
            windows(60),
        );
        assert_eq!(blind.exit_code(), exit::UNCHECKED);
        assert!(render(&blind).contains("Could not check dead letters"));
    }

    #[test]
    fn an_answer_is_listed_while_recent_and_an_unknown_outcome_until_resolved() {
        let now = datetime!(2026-12-06 08:00 UTC);
        let command = |status, hours_ago| UnsuccessfulCommand {
            command_id: Uuid::from_u128(hours_ago),
            subscription_id: Uuid::from_u128(10 + hours_ago),
            kind: "change_plan".into(),
            requested_by: "api".into(),
            requested_at: now - time::Duration::hours(hours_ago as i64),
            status,
            reason: None,
        };
        let facts = Facts {
            unsuccessful_commands: vec![
                command(Unsuccessful::Refused, 1),
                command(Unsuccessful::Rejected, 2),
                command(Unsuccessful::Failed, 4),
                command(Unsuccessful::Refused, 5),
                command(Unsuccessful::Conflict, 6),
                command(Unsuccessful::Unknown, 48),
            ],
            ..Facts::default()
        };
        let report = attention(&facts, now, windows(60));
        let listed: Vec<(Uuid, &str)> = report
            .items
            .iter()
            .map(|i| (i.subscription_id.unwrap(), i.command.as_str()))
            .collect();
        let unknown = Uuid::from_u128(58);
        assert_eq!(
            listed,
            [
                (
                    Uuid::from_u128(11),
                    format!("fulfillment subscription show {}", Uuid::from_u128(11)).as_str()
                ),
                (
                    Uuid::from_u128(12),
                    format!("fulfillment subscription show {}", Uuid::from_u128(12)).as_str()
                ),
                (unknown, "fulfillment reconcile"),
            ]
        );
        assert!(report.items[0].what.contains("refused by Microsoft"));
        assert!(report.items[2].what.contains("outcome unknown"));

        let old_answers_only = Facts {
            unsuccessful_commands: facts.unsuccessful_commands[2..5].to_vec(),
            ..Facts::default()
        };
        let calm = attention(&old_answers_only, now, windows(60));
        assert!(calm.items.is_empty(), "{calm:?}");
        assert_eq!(calm.exit_code(), exit::OK);
    }

    #[test]
    fn the_text_fits_eighty_columns() {
        let now = datetime!(2026-12-06 08:00 UTC);
        let mut facts = facts(now);
        facts.unsuccessful_commands[0].reason = Some("x ".repeat(100));
        let report = attention(&facts, now, windows(86_400));
        let text = render_width(&report, Some(80));
        assert!(
            text.contains("$ fulfillment effects list --kind ack_operation"),
            "{text}"
        );
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{line}");
        }
    }
}
