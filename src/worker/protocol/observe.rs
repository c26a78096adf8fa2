//! Reading Microsoft's view: GET the subscription (P13, P17), and poll an operation until
//! it is final (§7.2) — ours after a 202 (`PollOperation`), one we acknowledged (the ACK's
//! own row once its PATCH is answered, [`super::acknowledge`], §7.3), or one a change
//! webhook after Unsubscribe names (`ConfirmOperation`, which older versions also queued
//! after every ACK).
//!
//! Polls honour the 202's `Retry-After` as the first delay and as a floor (§15.1); the
//! cadence grows from the configured interval to about 10 s. `NotStarted` is the normal
//! first answer (§15.1), like `InProgress`. When the cap passes, or Microsoft does not know
//! the operation (P17, P19), the subscription is read and observed instead (§7.2 "on poll
//! timeout: GET subscription, reconcile").

use std::time::Duration;

use fulfillment_state_machine::{OperationId, OperationStatus};

use super::{
    Answer, Call, Next, OPERATION_POLL_CEILING, Record, Stage, Step, Turn, elapsed, growing,
};
use crate::marketplace::OperationStatus as Wire;
use crate::worker::translate;

/// `FetchSubscription`: GET and feed `Observed`. 404: recorded, nothing fed.
pub fn fetch(turn: &Turn<'_>) -> Next {
    match turn.answer_to(|c| *c == Call::GetSubscription) {
        None => turn.call(Stage::Fresh, Call::GetSubscription),
        Some(Answer::Subscription(found)) => turn.finish(
            vec![translate::observed(found, turn.now)],
            "subscription fetched",
        ),
        Some(Answer::NotFound { detail }) => turn.finish(
            Vec::new(),
            format!("Microsoft does not know the subscription: {detail}"),
        ),
        Some(other) => turn.failed(&Call::GetSubscription, other),
    }
}

/// `PollOperation` (with the 202's location and `Retry-After`), `ConfirmOperation`, and an
/// ACK after its PATCH (no location: by id). The stages are `Polling` and `Observing`; any
/// other stage is the start.
pub fn poll(
    turn: &Turn<'_>,
    operation_id: OperationId,
    location: Option<&str>,
    retry_after: Option<Duration>,
) -> Next {
    let get = Call::GetOperation {
        operation_id,
        location: location.map(str::to_owned),
    };
    match &turn.progress.stage {
        Stage::Observing { because } => observe_instead(turn, operation_id, because),
        Stage::Polling { polls } => match turn.answer_to(|c| *c == get) {
            None => turn.call(turn.progress.stage.clone(), get),
            Some(answer) => polled(turn, &get, answer, operation_id, *polls, retry_after),
        },
        _ => {
            // §15.1: the first poll waits for the 202's Retry-After.
            let first = turn.created_at + retry_after.unwrap_or(Duration::ZERO);
            if turn.answered.is_none() && turn.now < first {
                return turn.next(Stage::Polling { polls: 0 }, Step::WaitUntil(first));
            }
            turn.call(Stage::Polling { polls: 0 }, get)
        }
    }
}

fn polled(
    turn: &Turn<'_>,
    get: &Call,
    answer: &Answer,
    operation_id: OperationId,
    polls: u32,
    retry_after: Option<Duration>,
) -> Next {
    let status = match answer {
        Answer::Operation { status, .. } => status.as_ref(),
        Answer::NotFound { .. } => {
            return observe_instead(
                turn,
                operation_id,
                "Microsoft does not know the operation (it forgets finished ones); observing the subscription",
            );
        }
        other => return turn.failed(get, other),
    };
    let last = match status {
        Some(Wire::Succeeded) => Some(OperationStatus::Succeeded),
        Some(Wire::Failed) => Some(OperationStatus::Failed),
        Some(Wire::Conflict) => Some(OperationStatus::Conflict),
        _ => None,
    };
    if let Some(status) = last {
        let error = match answer {
            Answer::Operation {
                error: Some(error), ..
            } => format!(": {error}"),
            _ => String::new(),
        };
        return turn
            .finish(
                vec![fulfillment_state_machine::Event::OperationResult {
                    operation_id,
                    status,
                }],
                format!("operation {operation_id} {status}{error}"),
            )
            .recording(Record::OperationEnded {
                operation_id,
                status,
            });
    }
    // NotStarted (the normal first answer, §15.1), InProgress, or a status we do not know.
    if elapsed(turn.created_at, turn.now) > turn.config.operation_poll_cap {
        return observe_instead(turn, operation_id, "still not final after the polling cap");
    }
    let delay = growing(
        turn.config.operation_poll_interval,
        polls,
        OPERATION_POLL_CEILING,
    )
    .max(retry_after.unwrap_or(Duration::ZERO));
    turn.next(
        Stage::Polling { polls: polls + 1 },
        Step::WaitUntil(turn.after(delay)),
    )
}

/// Polling ended without a final status: GET the subscription and observe it.
fn observe_instead(turn: &Turn<'_>, operation_id: OperationId, because: &str) -> Next {
    let stage = Stage::Observing {
        because: because.to_owned(),
    };
    match turn.answer_to(|c| *c == Call::GetSubscription) {
        None => turn.call(stage, Call::GetSubscription),
        Some(Answer::Subscription(found)) => turn.finish(
            vec![translate::observed(found, turn.now)],
            format!("operation {operation_id}: {because}; observed the subscription"),
        ),
        Some(Answer::NotFound { detail }) => turn.finish(
            Vec::new(),
            format!(
                "operation {operation_id}: {because}; Microsoft does not know the \
                 subscription either: {detail}"
            ),
        ),
        Some(other) => {
            let mut next = turn.failed(&Call::GetSubscription, other);
            next.progress.stage = stage;
            next
        }
    }
}
