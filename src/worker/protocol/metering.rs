//! A metering batch (§9.2, §8.2), sans-IO: `batchUsageEvent` with the batch's frozen hours,
//! each item's answer settled on its own.
//!
//! | answer | hours |
//! |---|---|
//! | item `Accepted` | accepted (billed) |
//! | item `Duplicate` | duplicate = billed already (a lost answer's repeat); Microsoft's quantity noted when it differs |
//! | item `Expired` | expired, with Microsoft's reason |
//! | item `ResourceNotActive`, `InvalidDimension`, `InvalidQuantity`, `BadArgument`, `ResourceNotFound`, `ResourceNotAuthorized` | rejected, with the reason |
//! | item `Error`, an item missing from the answer | sent again later |
//! | 429 (honouring `Retry-After`), 5xx, timeout, reset, not sent | the unsettled hours sent again later, same quantities |
//! | 400 to the whole batch | every unsettled hour rejected |
//! | 401/403 | once more with a fresh token, then the row is dead (P2) |
//! | anything else | the row is dead, hours stay `submitting` for an operator |
//!
//! Retries are bounded by Microsoft's 24-hour window, not by a number of attempts: before
//! each send, an hour whose window has passed is settled `expired` (with "may be billed"
//! when an earlier answer was lost). The quantity is the one frozen when the hour closed;
//! nothing here can change it, so a repeat is at worst a `Duplicate`.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{Answer, ProtocolConfig, Step, retry_delay};
use crate::marketplace::{UsageEventResponse, UsageEventStatus};
use crate::metering::WINDOW;

/// The effect stored in a `submit_usage` outbox row: the frozen hours of one batch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageBatch {
    pub batch_id: Uuid,
    pub subscription_id: Uuid,
    pub items: Vec<UsageItem>,
}

/// One frozen hour.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageItem {
    pub hour_id: Uuid,
    pub plan_id: String,
    pub dimension: String,
    /// The hour's start: the `effectiveStartTime` sent.
    #[serde(with = "time::serde::rfc3339")]
    pub hour: OffsetDateTime,
    pub quantity: f64,
}

impl UsageBatch {
    pub fn to_stored(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Where a batch stands between executions (the outbox row's `progress`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeteringProgress {
    /// Hours settled by an earlier execution.
    #[serde(default)]
    pub settled: BTreeSet<Uuid>,
    /// Sends whose answer was lost (5xx, timeout, reset): Microsoft may hold those hours.
    #[serde(default)]
    pub lost_answers: u32,
    #[serde(default)]
    pub fresh_token_tried: bool,
}

impl MeteringProgress {
    pub fn from_stored(value: &Value) -> Self {
        serde_json::from_value(value.clone()).unwrap_or_default()
    }

    pub fn to_stored(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

/// Everything the step may look at.
#[derive(Debug, Clone, Copy)]
pub struct MeteringTurn<'a> {
    pub batch: &'a UsageBatch,
    pub progress: &'a MeteringProgress,
    /// The answer to the send the previous step asked for, in this execution.
    pub answered: Option<&'a Answer>,
    pub now: OffsetDateTime,
    /// Failed attempts so far (only spaces the retries).
    pub attempts: u32,
    pub jitter: f64,
    pub config: &'a ProtocolConfig,
}

/// How an hour ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HourOutcome {
    Accepted,
    /// Billed already (the first write won, §9).
    Duplicate,
    Expired,
    Rejected,
}

impl HourOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HourOutcome::Accepted => "accepted",
            HourOutcome::Duplicate => "duplicate",
            HourOutcome::Expired => "expired",
            HourOutcome::Rejected => "rejected",
        }
    }
}

/// One settled hour.
#[derive(Debug, Clone, PartialEq)]
pub struct Settlement {
    pub hour_id: Uuid,
    pub outcome: HourOutcome,
    pub usage_event_id: Option<String>,
    /// Microsoft's quantity, for a duplicate whose quantity is not ours.
    pub billed_quantity: Option<f64>,
    pub reason: Option<String>,
}

/// The next step, the progress to keep and the hours settled now.
#[derive(Debug, Clone, PartialEq)]
pub struct MeteringNext {
    pub progress: MeteringProgress,
    /// `Step::Call(Call::SubmitUsage{..})`, `Finish`, `RetryLater` or `GiveUp`.
    pub step: Step,
    /// The hours to send when the step is a call.
    pub send: Vec<Uuid>,
    pub settled: Vec<Settlement>,
}

/// The next step of a batch.
pub fn step(turn: &MeteringTurn<'_>) -> MeteringNext {
    let mut progress = turn.progress.clone();
    let mut settled = Vec::new();
    match turn.answered {
        None => {}
        Some(Answer::UsageResults(results)) => {
            progress.fresh_token_tried = false;
            let sent = unsettled(turn.batch, &progress);
            for item in sent {
                if let Some(settlement) = settle_item(item, results) {
                    progress.settled.insert(item.hour_id);
                    settled.push(settlement);
                }
            }
            let left = unsettled(turn.batch, &progress).len();
            if left > 0 {
                let next = retry(
                    turn,
                    progress,
                    format!("{left} item(s) answered Error or not at all"),
                    None,
                );
                return MeteringNext { settled, ..next };
            }
            return finish(progress, settled);
        }
        Some(Answer::Throttled {
            retry_after,
            detail,
        }) => {
            return retry(turn, progress, detail.clone(), *retry_after);
        }
        Some(
            answer @ (Answer::ServerError { .. }
            | Answer::Timeout { .. }
            | Answer::ConnectionReset { .. }),
        ) => {
            // Microsoft may have recorded the batch: the same quantities go again and a
            // recorded hour comes back Duplicate (§8.2).
            progress.lost_answers += 1;
            let retry_after = match answer {
                Answer::ServerError { retry_after, .. } => *retry_after,
                _ => None,
            };
            return retry(turn, progress, answer.describe(), retry_after);
        }
        Some(Answer::NotSent { detail }) => return retry(turn, progress, detail.clone(), None),
        Some(Answer::Unauthorized { detail, .. }) if !progress.fresh_token_tried => {
            progress.fresh_token_tried = true;
            let _ = detail;
        }
        Some(Answer::Unauthorized { detail, .. }) => {
            return give_up(
                progress,
                format!(
                    "refused with a fresh token too (P2: check the Entra app registered in \
                     Partner Center): {detail}"
                ),
            );
        }
        Some(Answer::BadRequest { detail, .. }) => {
            for item in unsettled(turn.batch, &progress) {
                settled.push(Settlement {
                    hour_id: item.hour_id,
                    outcome: HourOutcome::Rejected,
                    usage_event_id: None,
                    billed_quantity: None,
                    reason: Some(format!("the batch was refused (400): {detail}")),
                });
            }
            progress.settled.extend(settled.iter().map(|s| s.hour_id));
            return finish(progress, settled);
        }
        Some(other) => {
            return give_up(
                progress,
                format!("unexpected answer to batchUsageEvent: {}", other.describe()),
            );
        }
    }
    // Before a send: hours past Microsoft's window end here.
    let cutoff = turn.now - WINDOW;
    for item in unsettled(turn.batch, &progress) {
        if item.hour < cutoff {
            let reason = if progress.lost_answers > 0 {
                "the 24-hour window passed before Microsoft answered; an earlier answer was \
                 lost, so Microsoft may have it: see `fulfillment usage reconcile`"
            } else {
                "the 24-hour window passed before Microsoft could be reached"
            };
            settled.push(Settlement {
                hour_id: item.hour_id,
                outcome: HourOutcome::Expired,
                usage_event_id: None,
                billed_quantity: None,
                reason: Some(reason.to_owned()),
            });
        }
    }
    progress.settled.extend(settled.iter().map(|s| s.hour_id));
    let send: Vec<Uuid> = unsettled(turn.batch, &progress)
        .iter()
        .map(|i| i.hour_id)
        .collect();
    if send.is_empty() {
        return finish(progress, settled);
    }
    MeteringNext {
        progress,
        step: Step::Call(super::Call::SubmitUsage),
        send,
        settled,
    }
}

fn unsettled<'a>(batch: &'a UsageBatch, progress: &MeteringProgress) -> Vec<&'a UsageItem> {
    batch
        .items
        .iter()
        .filter(|i| !progress.settled.contains(&i.hour_id))
        .collect()
}

/// The answer item for `item`: same dimension and hour (the batch has one subscription).
fn answer_for<'a>(
    item: &UsageItem,
    results: &'a [UsageEventResponse],
) -> Option<&'a UsageEventResponse> {
    results.iter().find(|r| {
        r.dimension.as_deref() == Some(item.dimension.as_str())
            && r.effective_start_time
                .is_some_and(|t| crate::metering::hour_of(t) == item.hour)
    })
}

fn settle_item(item: &UsageItem, results: &[UsageEventResponse]) -> Option<Settlement> {
    let result = answer_for(item, results)?;
    let reason = || {
        result
            .error
            .as_ref()
            .and_then(|e| e.message.clone())
            .unwrap_or_default()
    };
    let settlement = |outcome, reason: Option<String>| Settlement {
        hour_id: item.hour_id,
        outcome,
        usage_event_id: None,
        billed_quantity: None,
        reason,
    };
    Some(match result.status.as_ref()? {
        UsageEventStatus::Accepted => Settlement {
            usage_event_id: result.usage_event_id.clone(),
            ..settlement(HourOutcome::Accepted, None)
        },
        UsageEventStatus::Duplicate => {
            let accepted = result.error.as_ref().and_then(|e| e.accepted_message());
            let theirs = accepted.and_then(|a| a.quantity);
            let differs = theirs.is_some_and(|q| (q - item.quantity).abs() > 1e-9);
            Settlement {
                usage_event_id: accepted.and_then(|a| a.usage_event_id.clone()),
                billed_quantity: theirs.filter(|_| differs),
                ..settlement(
                    HourOutcome::Duplicate,
                    differs.then(|| {
                        format!(
                            "Microsoft already holds {} for this hour (first write wins), not {}",
                            theirs.unwrap_or_default(),
                            item.quantity
                        )
                    }),
                )
            }
        }
        UsageEventStatus::Expired => {
            settlement(HourOutcome::Expired, Some(format!("Expired: {}", reason())))
        }
        UsageEventStatus::Error => return None,
        other => settlement(
            HourOutcome::Rejected,
            Some(format!("{}: {}", other.as_str(), reason())),
        ),
    })
}

fn finish(progress: MeteringProgress, settled: Vec<Settlement>) -> MeteringNext {
    MeteringNext {
        progress,
        step: Step::Finish { events: Vec::new() },
        send: Vec::new(),
        settled,
    }
}

fn give_up(progress: MeteringProgress, because: String) -> MeteringNext {
    MeteringNext {
        progress,
        step: Step::GiveUp {
            because,
            why: super::GiveUpWhy::Permanent,
        },
        send: Vec::new(),
        settled: Vec::new(),
    }
}

/// Sends again after the backoff (never sooner than `Retry-After`); the window, checked
/// before each send, is the only budget.
fn retry(
    turn: &MeteringTurn<'_>,
    progress: MeteringProgress,
    because: String,
    retry_after: Option<Duration>,
) -> MeteringNext {
    let delay = retry_delay(
        turn.config.backoff_base,
        turn.config.backoff_max,
        turn.attempts + 1,
        retry_after,
        turn.jitter,
    );
    MeteringNext {
        progress,
        step: Step::RetryLater {
            at: turn.now + delay,
            because,
        },
        send: Vec::new(),
        settled: Vec::new(),
    }
}
