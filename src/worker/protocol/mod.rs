//! The Microsoft side of every effect, sans-IO (style principle 20): for each effect kind a
//! pure step function of (effect, typed progress, the last call's answer, `now`, config)
//! that returns the next thing to do — make this call, wait until then, finish with these
//! machine events, retry later because of this, or give up because of that. The async
//! runner ([`super::effects`]) only carries the steps out: it makes the calls through the
//! Marketplace client, turns each result into an [`Answer`], stores the [`Progress`] and
//! writes what the steps record. Nothing here touches a socket, a clock or a database, so
//! every answer class Microsoft can give is a row of a decision table
//! (`tests/effect_protocols.rs`).
//!
//! - [`activate`]: POST activate, then GET until `Subscribed` (P3–P5, §15.4).
//! - [`acknowledge`]: PATCH an operation with Success/Failure (§4.11, P7), then confirm its
//!   end (§7.3) with [`observe::poll`]'s polls unless the PATCH's answer told it.
//! - [`observe`]: GET the subscription; poll an operation to its end (§7.2, §15.1, P17).
//! - [`change`]: our PATCH/DELETE, including the one whose answer was lost (§8.2, §15.2).
//! - [`publish`]: a domain event on the broker.
//! - [`metering`]: a batch of frozen usage hours (§9.2), each item settled on its own.
//! - [`deliver`]: a signed webhook delivery to one of the ISV's endpoints (docs/webhooks.md).

use std::time::Duration;

use fulfillment_state_machine::{AckStatus, Effect, Event, OperationId, PlanId, Quantity};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::marketplace::{OperationStatus as WireOperationStatus, Subscription, UpdateOutcome};

pub mod acknowledge;
pub mod activate;
pub mod change;
pub mod deliver;
pub mod metering;
pub mod observe;
pub mod publish;

/// The clocks and budgets of the protocols. Tests shrink them to milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct ProtocolConfig {
    /// Failed attempts (retryable errors) before an effect gives up.
    pub max_attempts: u32,
    /// First retry delay; doubles per failed attempt, with jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// First delay between GETs of an operation still running; grows by half each poll up
    /// to [`OPERATION_POLL_CEILING`] (§7.2: every 2–10 s).
    pub operation_poll_interval: Duration,
    /// Polling an operation stops after this; the subscription is then observed (§7.2).
    pub operation_poll_cap: Duration,
    /// First delay between GETs while an activation is pending; grows by half each check up
    /// to [`ACTIVATION_CHECK_CEILING`] (P4: activation is asynchronous).
    pub activation_check_interval: Duration,
    /// Activation checks stop after this; the subscription is observed as it is (P27).
    pub activation_wait_cap: Duration,
    /// How long a PATCH/DELETE whose answer was lost is followed before it is handed to an
    /// operator as "outcome unknown" (§15.2).
    pub unknown_outcome_budget: Duration,
    /// How long a DELETE answered 409 (a pending operation holds the lock, §4.8) keeps
    /// waiting for the lock: a time, not a number of attempts, because the lock lasts as
    /// long as the other operation.
    pub lock_wait_budget: Duration,
}

impl Default for ProtocolConfig {
    /// Production's.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
            operation_poll_interval: Duration::from_millis(1500),
            operation_poll_cap: Duration::from_secs(30 * 60),
            activation_check_interval: Duration::from_secs(2),
            activation_wait_cap: Duration::from_secs(30 * 60),
            unknown_outcome_budget: Duration::from_secs(30 * 60),
            lock_wait_budget: Duration::from_secs(10 * 60),
        }
    }
}

impl ProtocolConfig {
    /// Millisecond clocks for tests.
    pub fn fast() -> Self {
        Self {
            max_attempts: 8,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_millis(500),
            operation_poll_interval: Duration::from_millis(100),
            operation_poll_cap: Duration::from_secs(20),
            activation_check_interval: Duration::from_millis(100),
            activation_wait_cap: Duration::from_secs(20),
            unknown_outcome_budget: Duration::from_secs(20),
            lock_wait_budget: Duration::from_secs(20),
        }
    }
}

/// The slowest cadence of activation checks (§15.4: seconds growing to about 15 s).
pub const ACTIVATION_CHECK_CEILING: Duration = Duration::from_secs(15);
/// The slowest cadence of operation polls (§7.2: every 2–10 s).
pub const OPERATION_POLL_CEILING: Duration = Duration::from_secs(10);

/// One call to make. The runner maps each to one Marketplace client method (or the
/// broker, for a domain event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// GET the subscription (§4.4).
    GetSubscription,
    /// POST activate with plan and seats (§4.2, P3).
    Activate {
        plan_id: String,
        quantity: Option<u32>,
    },
    /// PATCH the operation (§4.11).
    Acknowledge {
        operation_id: OperationId,
        status: AckStatus,
    },
    /// PATCH planId (§4.6).
    ChangePlan { plan_id: PlanId },
    /// PATCH quantity (§4.7).
    ChangeQuantity { quantity: Quantity },
    /// DELETE the subscription (§4.8).
    Cancel,
    /// GET an operation: at its Operation-Location when we have one (§7.2), else by id.
    GetOperation {
        operation_id: OperationId,
        location: Option<String>,
    },
    /// Publish the effect's domain event on the domain exchange (confirmed).
    PublishDomainEvent,
    /// POST batchUsageEvent with the hours the metering step names (§9.2).
    SubmitUsage,
}

/// What a call came back with, in classes the protocols branch on: our own enum, so the
/// steps need no HTTP client type (and a table row can name any answer).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// 200 to GET subscription.
    Subscription(Box<Subscription>),
    /// 200 to activate: received, not yet done (P4).
    Activated,
    /// 200 (recorded) or 409 (already final) to the PATCH of an operation.
    Acknowledged(UpdateOutcome),
    /// 202 to PATCH/DELETE, with its `Operation-Location` (absolute, possibly on another
    /// host, §15.1) and `Retry-After`.
    Accepted {
        operation_id: Uuid,
        location: String,
        retry_after: Option<Duration>,
    },
    /// 200 to GET operation. `None`: a body without a status.
    Operation {
        status: Option<WireOperationStatus>,
        error: Option<String>,
    },
    /// The broker confirmed the domain event.
    Published,
    /// 400. `locked`: "Subscription is locked due to pending operations" (P11, §15.2).
    BadRequest { locked: bool, detail: String },
    /// 401 or 403 (the client has dropped the token it used, P2).
    Unauthorized { status: u16, detail: String },
    /// 404, or the 400 the live service answers for an unknown operation (P19).
    NotFound { detail: String },
    /// 409 (a DELETE while an operation is pending, §4.8).
    Conflict { detail: String },
    /// 429, with `Retry-After` when given.
    Throttled {
        retry_after: Option<Duration>,
        detail: String,
    },
    /// 5xx (or 408): the request arrived; whether Microsoft acted on it is unknown.
    ServerError {
        status: u16,
        retry_after: Option<Duration>,
        detail: String,
    },
    /// No answer in time after the request left: its outcome is unknown.
    Timeout { detail: String },
    /// The connection broke after the request left: its outcome is unknown.
    ConnectionReset { detail: String },
    /// The request never left (no connection, no token): certainly not processed.
    NotSent { detail: String },
    /// Anything else: another 4xx, a 2xx we cannot read, a local refusal.
    Unexpected { status: Option<u16>, detail: String },
    /// The broker did not confirm the domain event.
    PublishFailed { detail: String },
    /// 200 to batchUsageEvent: one result per item (§9.2).
    UsageResults(Vec<crate::marketplace::UsageEventResponse>),
}

impl Answer {
    /// A one-line description for the event log and `last_error`.
    pub fn describe(&self) -> String {
        match self {
            Answer::Subscription(s) => format!(
                "subscription {}",
                s.status
                    .as_ref()
                    .map(|s| s.as_str())
                    .unwrap_or("without status")
            ),
            Answer::Activated => "activate received".to_owned(),
            Answer::Acknowledged(outcome) => format!("acknowledged ({outcome:?})"),
            Answer::Accepted { operation_id, .. } => format!("accepted as {operation_id}"),
            Answer::Operation { status, .. } => format!(
                "operation {}",
                status
                    .as_ref()
                    .map(|s| s.as_str())
                    .unwrap_or("without status")
            ),
            Answer::Published => "published".to_owned(),
            Answer::UsageResults(results) => format!("{} usage result(s)", results.len()),
            Answer::BadRequest { detail, .. }
            | Answer::Unauthorized { detail, .. }
            | Answer::NotFound { detail }
            | Answer::Conflict { detail }
            | Answer::Throttled { detail, .. }
            | Answer::ServerError { detail, .. }
            | Answer::Timeout { detail }
            | Answer::ConnectionReset { detail }
            | Answer::NotSent { detail }
            | Answer::Unexpected { detail, .. }
            | Answer::PublishFailed { detail } => detail.clone(),
        }
    }

    /// The request left and no answer says what became of it (§8.2): a 5xx, a timeout, a
    /// reset.
    pub fn outcome_is_unknown(&self) -> bool {
        matches!(
            self,
            Answer::ServerError { .. } | Answer::Timeout { .. } | Answer::ConnectionReset { .. }
        )
    }
}

/// The last call and its answer, fed to the next step.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    pub call: Call,
    pub answer: Answer,
}

/// Where an effect stands between executions: stored as tagged JSON in the outbox row's
/// `progress`, read only by the runner (and [`Progress::from_stored`] for old rows).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    #[serde(flatten)]
    pub stage: Stage,
    /// A 401/403 was answered once already; the next one gives up (P2: a fresh token is
    /// tried once, since a revoked or stale token also answers 401).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fresh_token_tried: bool,
}

/// The stage of an effect's conversation with Microsoft.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Nothing sent that counts yet.
    #[default]
    Fresh,
    /// Activate was answered (200, or a 400 that GET judges, P5); checking for `Subscribed`.
    ActivationSent {
        #[serde(with = "time::serde::rfc3339")]
        sent_at: OffsetDateTime,
        /// Microsoft's 400 to the POST, if it refused.
        refused: Option<String>,
        /// Checks made so far (they grow apart).
        checks: u32,
    },
    /// An operation is being polled.
    Polling { polls: u32 },
    /// Polling ended without a final status: the subscription is read instead (§7.2).
    Observing { because: String },
    /// Our PATCH/DELETE may or may not have been carried out: followed with GET
    /// subscription (and a repeat that only a 202 can settle) until it shows.
    Following {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        cause: FollowCause,
        /// What the last answer was.
        because: String,
        checks: u32,
    },
}

/// Why a PATCH/DELETE is being followed; decides its budget and how it ends unresolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FollowCause {
    /// A request left and its answer was lost (5xx, timeout, reset, §15.2): unresolved,
    /// it needs an operator, never "refused".
    LostAnswer,
    /// A pending operation holds the lock (DELETE 409, PATCH 400 "locked", P11) and none
    /// of our requests was lost: unresolved, it was refused.
    Locked,
}

impl Progress {
    /// Reads a stored progress. Rows written before progress was typed hold `{}` or the
    /// old keys (`activate_sent`, `maybe_sent`); they map to the stages that meant the same.
    pub fn from_stored(value: &Value, created_at: OffsetDateTime) -> Self {
        if let Ok(progress) = Progress::deserialize(value) {
            return progress;
        }
        let flag = |key: &str| value.get(key).and_then(Value::as_bool) == Some(true);
        let stage = if flag("activate_sent") {
            Stage::ActivationSent {
                sent_at: created_at,
                refused: value
                    .get("activate_refused")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                checks: 0,
            }
        } else if flag("maybe_sent") {
            Stage::Following {
                since: created_at,
                cause: FollowCause::LostAnswer,
                because: "an earlier attempt's answer was lost".to_owned(),
                checks: 0,
            }
        } else {
            Stage::Fresh
        };
        Progress {
            stage,
            fresh_token_tried: false,
        }
    }

    /// The JSON stored in the outbox row.
    pub fn to_stored(&self) -> Value {
        serde_json::to_value(self).unwrap_or_else(|_| Value::Object(Default::default()))
    }

    /// The row no longer holds back the later rows of its subscription: what it sent has
    /// left and it only waits for Microsoft to report (an activation whose POST was
    /// answered, P4; an operation being polled, e.g. after its ACK's PATCH was answered).
    /// The claim query reads this as a column the runner writes, which also drops the row's
    /// ACK deadline then (another change's ACK must not wait for, nor be ranked behind, a
    /// row that only polls).
    pub fn awaits_microsoft_only(&self) -> bool {
        matches!(
            self.stage,
            Stage::ActivationSent { .. } | Stage::Polling { .. } | Stage::Observing { .. }
        )
    }
}

/// Everything a step may look at.
#[derive(Debug, Clone, Copy)]
pub struct Turn<'a> {
    pub effect: &'a Effect,
    pub progress: &'a Progress,
    /// The answer to the call the previous step asked for, in this execution.
    pub answered: Option<&'a Answered>,
    pub now: OffsetDateTime,
    /// When the effect was queued (caps are measured from it).
    pub created_at: OffsetDateTime,
    /// Failed attempts so far.
    pub attempts: u32,
    /// When Microsoft's window for this effect closes, if it has one (an ACK row's
    /// `due_at`, P7): while it is open, retries are paced to fit in it (see
    /// [`paced_for_deadline`]).
    pub deadline: Option<OffsetDateTime>,
    /// In `0..=1`, spreads retries (the runner draws it; tables fix it).
    pub jitter: f64,
    pub config: &'a ProtocolConfig,
}

/// What to do next, and the progress to keep.
#[derive(Debug, Clone, PartialEq)]
pub struct Next {
    pub progress: Progress,
    pub step: Step,
    /// Facts to write with the row's end, whatever the step.
    pub records: Vec<Record>,
}

/// The next step of a protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Make this call and come back with its answer.
    Call(Call),
    /// Microsoft is working: look again then. Not a failure.
    WaitUntil(OffsetDateTime),
    /// Done: feed these events to the machine.
    Finish { events: Vec<Event> },
    /// A failure worth another attempt (counts against the budget).
    RetryLater { at: OffsetDateTime, because: String },
    /// The row is dead, for an operator.
    GiveUp { because: String, why: GiveUpWhy },
}

/// Why an effect gave up (the dead-letter metric's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GiveUpWhy {
    /// Microsoft answered something that will not change by asking again.
    Permanent,
    /// Every attempt of the budget failed.
    AttemptsExhausted,
    /// Our PATCH/DELETE may have been carried out and nothing showed it within the budget.
    OutcomeUnknown,
}

/// A fact a step wants written with the row's end.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// The reason of the execution's event-log row (which also lists its calls).
    Note(String),
    /// The state of our PATCH/DELETE command (`publisher_operations`).
    Command(CommandRecord),
    /// An operation we polled ended (`publisher_operations`, by operation id).
    OperationEnded {
        operation_id: OperationId,
        status: fulfillment_state_machine::OperationStatus,
    },
}

/// Where a publisher command stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRecord {
    pub status: CommandStatus,
    pub operation_id: Option<Uuid>,
    pub location: Option<String>,
    pub error: Option<String>,
}

/// The status column of `publisher_operations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandStatus {
    Requested,
    Accepted,
    Refused,
    Succeeded,
    Failed,
    Conflict,
    /// Its answer was lost and nothing showed the outcome within the budget.
    Unknown,
}

impl CommandStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandStatus::Requested => "Requested",
            CommandStatus::Accepted => "Accepted",
            CommandStatus::Refused => "Refused",
            CommandStatus::Succeeded => "Succeeded",
            CommandStatus::Failed => "Failed",
            CommandStatus::Conflict => "Conflict",
            CommandStatus::Unknown => "Unknown",
        }
    }
}

impl From<fulfillment_state_machine::OperationStatus> for CommandStatus {
    /// How a command ends when Microsoft reports its operation's end.
    fn from(status: fulfillment_state_machine::OperationStatus) -> Self {
        use fulfillment_state_machine::OperationStatus;
        match status {
            OperationStatus::Succeeded => CommandStatus::Succeeded,
            OperationStatus::Failed => CommandStatus::Failed,
            OperationStatus::Conflict => CommandStatus::Conflict,
        }
    }
}

/// The next step of `turn.effect`'s protocol.
pub fn step(turn: &Turn<'_>) -> Next {
    let mut next = step_of_effect(turn);
    // A fresh token that worked clears the mark: a 401 much later gets its own retry.
    if turn
        .answered
        .is_some_and(|a| !matches!(a.answer, Answer::Unauthorized { .. }))
    {
        next.progress.fresh_token_tried = false;
    }
    next
}

fn step_of_effect(turn: &Turn<'_>) -> Next {
    match turn.effect {
        Effect::Activate { plan_id, quantity } => activate::step(turn, plan_id.as_ref(), *quantity),
        Effect::AckOperation {
            operation_id,
            status,
            best_effort,
        } => acknowledge::step(turn, *operation_id, *status, *best_effort),
        Effect::FetchSubscription => observe::fetch(turn),
        Effect::RequestPlanChange {
            command_id,
            plan_id,
        } => change::step(turn, *command_id, &change::Target::Plan(plan_id.clone())),
        Effect::RequestQuantityChange {
            command_id,
            quantity,
        } => change::step(turn, *command_id, &change::Target::Quantity(*quantity)),
        Effect::RequestCancel { command_id } => {
            change::step(turn, *command_id, &change::Target::Cancel)
        }
        Effect::PollOperation {
            operation_id,
            location,
            retry_after_ms,
            ..
        } => observe::poll(
            turn,
            *operation_id,
            Some(location.as_str()),
            retry_after_ms.map(Duration::from_millis),
        ),
        // A change webhook after Unsubscribe; and rows older versions queued after an ACK.
        Effect::ConfirmOperation { operation_id } => observe::poll(turn, *operation_id, None, None),
        Effect::PublishDomainEvent(_) => publish::step(turn),
    }
}

// ---- shared pieces of the protocols ------------------------------------------------------

impl Turn<'_> {
    /// The answer to `call`, if that is what the previous step asked for.
    fn answer_to(&self, call: impl Fn(&Call) -> bool) -> Option<&Answer> {
        self.answered
            .filter(|answered| call(&answered.call))
            .map(|answered| &answered.answer)
    }

    fn next(&self, stage: Stage, step: Step) -> Next {
        Next {
            progress: Progress {
                stage,
                fresh_token_tried: self.progress.fresh_token_tried,
            },
            step,
            records: Vec::new(),
        }
    }

    fn stay(&self, step: Step) -> Next {
        Next {
            progress: self.progress.clone(),
            step,
            records: Vec::new(),
        }
    }

    fn call(&self, stage: Stage, call: Call) -> Next {
        self.next(stage, Step::Call(call))
    }

    fn finish(&self, events: Vec<Event>, note: impl Into<String>) -> Next {
        self.stay(Step::Finish { events }).noting(note)
    }

    fn after(&self, delay: Duration) -> OffsetDateTime {
        self.now + delay
    }

    /// A retryable failure: another attempt after the backoff (never sooner than
    /// `Retry-After`, svix-style), or the end of the budget.
    fn retry(&self, because: String, retry_after: Option<Duration>) -> Next {
        let failed = self.attempts + 1;
        if failed >= self.config.max_attempts {
            return self.stay(Step::GiveUp {
                because: format!("gave up after {failed} attempts: {because}"),
                why: GiveUpWhy::AttemptsExhausted,
            });
        }
        let delay = retry_delay(
            self.config.backoff_base,
            self.config.backoff_max,
            failed,
            retry_after,
            self.jitter,
        );
        let delay = match self.deadline {
            Some(deadline) => paced_for_deadline(
                delay,
                elapsed(self.now, deadline),
                self.config.backoff_base,
                retry_after,
            ),
            None => delay,
        };
        self.stay(Step::RetryLater {
            at: self.after(delay),
            because,
        })
    }

    fn give_up(&self, because: String) -> Next {
        self.stay(Step::GiveUp {
            because,
            why: GiveUpWhy::Permanent,
        })
    }

    /// The answers every protocol treats alike: a failure of `call` that no step has a
    /// better reading for.
    fn failed(&self, call: &Call, answer: &Answer) -> Next {
        match answer {
            // P2: the client dropped the token this call used; one more try with a fresh
            // one tells a stale or revoked token from a wrong app registration.
            Answer::Unauthorized { .. } if !self.progress.fresh_token_tried => Next {
                progress: Progress {
                    stage: self.progress.stage.clone(),
                    fresh_token_tried: true,
                },
                step: Step::Call(call.clone()),
                records: Vec::new(),
            },
            Answer::Unauthorized { detail, .. } => self.give_up(format!(
                "refused with a fresh token too (check the Entra app registered in \
                 Partner Center): {detail}"
            )),
            Answer::Throttled {
                retry_after,
                detail,
            }
            | Answer::ServerError {
                retry_after,
                detail,
                ..
            } => self.retry(detail.clone(), *retry_after),
            Answer::Timeout { detail }
            | Answer::ConnectionReset { detail }
            | Answer::NotSent { detail }
            | Answer::PublishFailed { detail } => self.retry(detail.clone(), None),
            Answer::BadRequest { detail, .. }
            | Answer::NotFound { detail }
            | Answer::Conflict { detail }
            | Answer::Unexpected { detail, .. } => self.give_up(detail.clone()),
            success => self.give_up(format!(
                "unexpected answer to {call:?}: {}",
                success.describe()
            )),
        }
    }
}

impl Next {
    fn noting(self, note: impl Into<String>) -> Self {
        self.recording(Record::Note(note.into()))
    }

    fn recording(mut self, record: Record) -> Self {
        self.records.push(record);
        self
    }
}

/// `first`, grown by half per earlier `n`, at most `ceiling` (or 8 × `first` when that is
/// lower: test clocks stay fast).
pub fn growing(first: Duration, n: u32, ceiling: Duration) -> Duration {
    let ceiling = ceiling.min(first.saturating_mul(8)).max(first);
    let factor = 1.5f64.powi(i32::try_from(n.min(64)).unwrap_or(64));
    Duration::try_from_secs_f64(first.as_secs_f64() * factor)
        .unwrap_or(ceiling)
        .min(ceiling)
}

/// The delay before retry number `failed_attempts` (1 for the first retry): `base · 2^(n-1)`
/// capped at `max`, scaled by a jitter in `[0.5, 1.0]` (`jitter` in `0..=1`), and never
/// shorter than Microsoft's `Retry-After` (itself capped at `max`).
pub fn retry_delay(
    base: Duration,
    max: Duration,
    failed_attempts: u32,
    retry_after: Option<Duration>,
    jitter: f64,
) -> Duration {
    let exponent = failed_attempts.saturating_sub(1).min(20);
    let capped = base.saturating_mul(1u32 << exponent).min(max);
    let jittered = capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
    match retry_after {
        Some(after) => jittered.max(after.min(max)),
        None => jittered,
    }
}

/// The retry delay of an effect whose window closes in `left` (an ACK, P7): the backoff's
/// `delay`, but at most half the time left (at least `base`), so a run of 5xx or 429 does
/// not back an ACK off past its window: one failure at 1 s, 2 s and 4 s of backoff left it
/// no attempt before Microsoft auto-accepted (seen in `bench chaos`). Never shorter than
/// `Retry-After` (Microsoft's explicit ask, even when it reaches past the window). Once the
/// window has closed (`left` zero) the backoff holds as it is.
pub fn paced_for_deadline(
    delay: Duration,
    left: Duration,
    base: Duration,
    retry_after: Option<Duration>,
) -> Duration {
    if left.is_zero() {
        return delay;
    }
    let pace = (left / 2).max(base).max(retry_after.unwrap_or_default());
    delay.min(pace)
}

/// Time between two instants as a `Duration` (zero when `later` is not later).
fn elapsed(earlier: OffsetDateTime, later: OffsetDateTime) -> Duration {
    Duration::try_from(later - earlier).unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_up_to_the_cap_with_jitter() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(retry_delay(base, max, 1, None, 1.0), Duration::from_secs(1));
        assert_eq!(
            retry_delay(base, max, 1, None, 0.0),
            Duration::from_millis(500)
        );
        assert_eq!(retry_delay(base, max, 4, None, 1.0), Duration::from_secs(8));
        assert_eq!(retry_delay(base, max, 30, None, 1.0), max);
        assert_eq!(retry_delay(base, max, 0, None, 1.0), base);
    }

    #[test]
    fn retry_after_is_a_floor_but_never_beyond_the_cap() {
        let base = Duration::from_secs(1);
        let max = Duration::from_secs(60);
        assert_eq!(
            retry_delay(base, max, 1, Some(Duration::from_secs(7)), 0.3),
            Duration::from_secs(7)
        );
        assert_eq!(
            retry_delay(base, max, 1, Some(Duration::from_secs(3600)), 0.3),
            max
        );
    }

    #[test]
    fn cadences_grow_by_half_to_their_ceiling() {
        let two = Duration::from_secs(2);
        assert_eq!(growing(two, 0, ACTIVATION_CHECK_CEILING), two);
        assert_eq!(
            growing(two, 1, ACTIVATION_CHECK_CEILING),
            Duration::from_secs(3)
        );
        assert_eq!(
            growing(two, 50, ACTIVATION_CHECK_CEILING),
            ACTIVATION_CHECK_CEILING
        );
        let fast = Duration::from_millis(100);
        assert_eq!(
            growing(fast, 50, ACTIVATION_CHECK_CEILING),
            Duration::from_millis(800)
        );
    }

    #[test]
    fn old_progress_keys_map_to_the_stages_they_meant() {
        let at = OffsetDateTime::UNIX_EPOCH;
        let sent = Progress::from_stored(&serde_json::json!({"activate_sent": true}), at);
        assert!(matches!(sent.stage, Stage::ActivationSent { .. }));
        assert!(sent.awaits_microsoft_only());
        let maybe = Progress::from_stored(&serde_json::json!({"maybe_sent": true}), at);
        assert!(matches!(
            maybe.stage,
            Stage::Following {
                cause: FollowCause::LostAnswer,
                ..
            }
        ));
        assert_eq!(
            Progress::from_stored(&serde_json::json!({}), at),
            Progress::default()
        );
        let typed = Progress {
            stage: Stage::Polling { polls: 3 },
            fresh_token_tried: true,
        };
        assert_eq!(Progress::from_stored(&typed.to_stored(), at), typed);
        assert_eq!(typed.to_stored()["stage"], "polling");
    }
}
