//! Our PATCH (plan, seats) and DELETE of a subscription (§4.6–§4.8), and what to do when
//! their answer is lost.
//!
//! A 202 feeds `PublisherOperationAccepted` with the `Operation-Location` and the
//! `Retry-After` the poll honours (§15.1). A 400, 404 or other refusal on a first request
//! feeds `PublisherOperationRefused` (P22: CSP purchases; a bad plan).
//!
//! A 5xx, a timeout or a reset after the request left leaves the outcome unknown, and a
//! PATCH/DELETE is not safe to repeat blindly (§8.2): Microsoft may have started the
//! operation, and then a repeat answers 400 "locked due to pending operations" or 409
//! (P11, §15.2). List operations never shows our own operations (§15.2), so the change is
//! *followed*: GET the subscription; when it shows the target the command succeeded
//! (`PublisherOperationConcluded`); when it does not, the request is sent again, and only a
//! 202 settles that — a 400 or 409 to it means "still unknown", never "refused". A lock met
//! by a first request (another operation is pending, or a crashed attempt of ours already
//! sent it) is followed the same way, within its own time budget. When a budget runs out,
//! a followed lost answer ends "unknown, needs an operator"; a lock that never cleared
//! ends refused.

use fulfillment_state_machine::{CommandId, Event, OperationId, OperationStatus, PlanId, Quantity};

use super::{
    Answer, Call, CommandRecord, CommandStatus, FollowCause, GiveUpWhy, Next,
    OPERATION_POLL_CEILING, Record, Stage, Step, Turn, elapsed, growing,
};
use crate::marketplace::{Subscription, SubscriptionStatus};

/// What the command asks Microsoft for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Plan(PlanId),
    Quantity(Quantity),
    Cancel,
}

impl Target {
    fn call(&self) -> Call {
        match self {
            Target::Plan(plan_id) => Call::ChangePlan {
                plan_id: plan_id.clone(),
            },
            Target::Quantity(quantity) => Call::ChangeQuantity {
                quantity: *quantity,
            },
            Target::Cancel => Call::Cancel,
        }
    }

    /// The subscription already shows what we asked for.
    fn is_shown_by(&self, subscription: &Subscription) -> bool {
        match self {
            Target::Plan(plan_id) => subscription.plan_id.as_deref() == Some(plan_id.as_str()),
            Target::Quantity(quantity) => subscription.quantity == Some(quantity.get()),
            Target::Cancel => subscription.status == Some(SubscriptionStatus::Unsubscribed),
        }
    }

    fn describe(&self) -> String {
        match self {
            Target::Plan(plan_id) => format!("plan {plan_id}"),
            Target::Quantity(quantity) => format!("{quantity} seats"),
            Target::Cancel => "Unsubscribed".to_owned(),
        }
    }
}

pub fn step(turn: &Turn<'_>, command_id: CommandId, target: &Target) -> Next {
    let send = target.call();
    match &turn.progress.stage {
        Stage::Following {
            since,
            cause,
            checks,
            ..
        } => {
            let following = Following {
                since: *since,
                cause: *cause,
                checks: *checks,
            };
            follow(turn, command_id, target, &send, following)
        }
        _ => match turn.answer_to(|c| *c == send) {
            None => turn
                .call(Stage::Fresh, send)
                .recording(command(CommandStatus::Requested, None)),
            Some(answer) => first_answer(turn, command_id, &send, answer),
        },
    }
}

/// The answer to a request sent with nothing unknown before it.
fn first_answer(turn: &Turn<'_>, command_id: CommandId, send: &Call, answer: &Answer) -> Next {
    let start = |cause: FollowCause| Following {
        since: turn.now,
        cause,
        checks: 0,
    };
    match answer {
        Answer::Accepted { .. } => accepted(turn, command_id, answer),
        // The request left and its answer did not come back (§15.2).
        unknown if unknown.outcome_is_unknown() => wait(
            turn,
            command_id,
            start(FollowCause::LostAnswer),
            unknown.describe(),
        ),
        // A 2xx we could not read (e.g. a 202 without Operation-Location): Microsoft took
        // it, so it is followed, not refused.
        Answer::Unexpected {
            status: Some(200..=299),
            detail,
        } => wait(
            turn,
            command_id,
            start(FollowCause::LostAnswer),
            detail.clone(),
        ),
        // P11: a pending operation holds the lock — another one, or ours if an attempt of
        // ours crashed after sending. Either way only time tells.
        Answer::BadRequest {
            locked: true,
            detail,
        }
        | Answer::Conflict { detail } => {
            wait(turn, command_id, start(FollowCause::Locked), detail.clone())
        }
        Answer::BadRequest { detail, .. }
        | Answer::NotFound { detail }
        | Answer::Unexpected { detail, .. } => refused(turn, command_id, detail),
        // 429, or no connection: certainly not processed, safe to send again later.
        other => turn.failed(send, other),
    }
}

#[derive(Debug, Clone, Copy)]
struct Following {
    since: time::OffsetDateTime,
    cause: FollowCause,
    checks: u32,
}

/// Following a request whose outcome is unknown, or that met a lock.
fn follow(
    turn: &Turn<'_>,
    command_id: CommandId,
    target: &Target,
    send: &Call,
    following: Following,
) -> Next {
    if let Some(answer) = turn.answer_to(|c| *c == Call::GetSubscription) {
        return match answer {
            Answer::Subscription(found) if target.is_shown_by(found) => {
                succeeded(turn, command_id, target)
            }
            // Not (yet) there: only a repeat can tell "never arrived" (202) from "still
            // running" (400 locked / 409).
            Answer::Subscription(_) => turn.call(turn.progress.stage.clone(), send.clone()),
            Answer::NotFound { detail } if following.cause == FollowCause::Locked => {
                refused(turn, command_id, detail)
            }
            Answer::NotFound { detail } => unknown(turn, command_id, following, detail),
            Answer::Unauthorized { .. } if !turn.progress.fresh_token_tried => {
                turn.failed(&Call::GetSubscription, answer)
            }
            other => wait(turn, command_id, following, other.describe()),
        };
    }
    let Some(answer) = turn.answer_to(|c| c == send) else {
        return turn.call(turn.progress.stage.clone(), Call::GetSubscription);
    };
    match answer {
        Answer::Accepted { .. } => accepted(turn, command_id, answer),
        // A lost answer to the repeat, too: whatever we followed, it is now unknown.
        unknown if unknown.outcome_is_unknown() => wait(
            turn,
            command_id,
            Following {
                cause: FollowCause::LostAnswer,
                ..following
            },
            unknown.describe(),
        ),
        Answer::Unauthorized { .. } if !turn.progress.fresh_token_tried => {
            turn.failed(send, answer)
        }
        // 400 (locked or "already so"), 409, 429, no connection: still unknown.
        other => wait(turn, command_id, following, other.describe()),
    }
}

/// Look again later, unless the budget is spent.
fn wait(turn: &Turn<'_>, command_id: CommandId, following: Following, because: String) -> Next {
    let budget = match following.cause {
        FollowCause::LostAnswer => turn.config.unknown_outcome_budget,
        FollowCause::Locked => turn.config.lock_wait_budget,
    };
    if elapsed(following.since, turn.now) > budget {
        return match following.cause {
            FollowCause::Locked => refused(
                turn,
                command_id,
                &format!(
                    "a pending operation held the lock for longer than {}s: {because}",
                    budget.as_secs()
                ),
            ),
            FollowCause::LostAnswer => unknown(turn, command_id, following, &because),
        };
    }
    let delay = growing(
        turn.config.operation_poll_interval,
        following.checks,
        OPERATION_POLL_CEILING,
    );
    let note = match following.cause {
        FollowCause::LostAnswer => format!(
            "outcome unknown ({because}); following the subscription, not sending blindly \
             again (Microsoft may be carrying it out)"
        ),
        FollowCause::Locked => {
            format!("locked by a pending operation ({because}); waiting for it to end")
        }
    };
    let next = turn.next(
        Stage::Following {
            since: following.since,
            cause: following.cause,
            because: because.clone(),
            checks: following.checks + 1,
        },
        Step::WaitUntil(turn.after(delay)),
    );
    // The first wait is worth a line in the event log and on the command; later ones not.
    if following.checks == 0 {
        next.noting(note).recording(Record::Command(CommandRecord {
            status: CommandStatus::Requested,
            operation_id: None,
            location: None,
            error: Some(because),
        }))
    } else {
        next
    }
}

fn accepted(turn: &Turn<'_>, command_id: CommandId, answer: &Answer) -> Next {
    let Answer::Accepted {
        operation_id,
        location,
        retry_after,
    } = answer
    else {
        return turn.give_up(format!("not a 202: {}", answer.describe()));
    };
    turn.next(
        Stage::Fresh,
        Step::Finish {
            events: vec![Event::PublisherOperationAccepted {
                command_id,
                operation_id: OperationId::from(*operation_id),
                location: location.clone(),
                retry_after_ms: retry_after
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }],
        },
    )
    .noting(format!("accepted as operation {operation_id}"))
    .recording(Record::Command(CommandRecord {
        status: CommandStatus::Accepted,
        operation_id: Some(*operation_id),
        location: Some(location.clone()),
        error: None,
    }))
}

fn succeeded(turn: &Turn<'_>, command_id: CommandId, target: &Target) -> Next {
    let reason = format!(
        "GET shows {}: the change whose answer was lost was carried out",
        target.describe()
    );
    turn.finish(
        vec![Event::PublisherOperationConcluded {
            command_id,
            status: OperationStatus::Succeeded,
            reason: reason.clone(),
        }],
        reason,
    )
    .recording(command(CommandStatus::Succeeded, None))
}

fn refused(turn: &Turn<'_>, command_id: CommandId, detail: &str) -> Next {
    turn.finish(
        vec![Event::PublisherOperationRefused {
            command_id,
            reason: detail.to_owned(),
        }],
        format!("Microsoft refused: {detail}"),
    )
    .recording(command(CommandStatus::Refused, Some(detail)))
}

/// The budget is spent and nothing showed the outcome: an operator decides (the command
/// stays pending in the machine; nothing is announced as failed).
fn unknown(turn: &Turn<'_>, command_id: CommandId, following: Following, detail: &str) -> Next {
    let because = format!(
        "outcome of command {command_id} unknown since {}: Microsoft may have carried it out \
         and nothing has shown it; an operator must check the subscription ({detail})",
        following.since
    );
    turn.stay(Step::GiveUp {
        because: because.clone(),
        why: GiveUpWhy::OutcomeUnknown,
    })
    .recording(command(CommandStatus::Unknown, Some(&because)))
}

fn command(status: CommandStatus, error: Option<&str>) -> Record {
    Record::Command(CommandRecord {
        status,
        operation_id: None,
        location: None,
        error: error.map(str::to_owned),
    })
}
