//! The acknowledgement of a Marketplace operation: PATCH it with Success or Failure
//! (§4.11), within Microsoft's 10-second window (P7), then confirm how the operation ended
//! (§7.3), in the same outbox row.
//!
//! A 200 to `Success` already says how the operation ends: Microsoft recorded our Success
//! (§4.11), and Success is also what the window would have decided without us (§7.3: no
//! PATCH ⇒ auto-Success), so the operation is `Succeeded`: the step feeds the result at
//! once and the row is done, with no GET of the operation. Whether the result brings a GET
//! of the subscription is the machine's call (P13: only a GET after the operation is final
//! shows its outcome; the success of a seat change we accepted already says all of it).
//!
//! Every other end of the PATCH leaves the operation's end to learn, and the row goes on to
//! poll the operation as [`observe::poll`] does for any operation (same cadence, cap, and
//! observation of the subscription when Microsoft does not know the operation): a
//! `Failure` recorded (Microsoft ignored rejections, acc#348, P7: its end shows what really
//! happened), a 409 (the operation was already final: auto-accepted, superseded, failed),
//! a best-effort ACK (a Reinstate, §6.3) answered or ignored (it waits for Microsoft's own
//! final status before GETs are trusted, P13). Once the PATCH is answered the row only
//! waits for Microsoft ([`super::Progress::awaits_microsoft_only`]): it holds back no later
//! row of its subscription, and its deadline no longer ranks it among the ACKs. The first
//! poll goes at once but in an execution of its own (a wait of zero), not after the PATCH in
//! the same one: the PATCH's execution is often the consumer's fast path, whose batch of
//! ACKs (and the consumer's next window) would otherwise wait for the GET.
//!
//! An unknown operation (404, or the live service's 400, P19) will not become known by
//! asking again: the row gives up, unless the ACK is best-effort, which ignores every answer
//! that is not worth a retry.

use std::time::Duration;

use fulfillment_state_machine::{AckStatus, Event, OperationId, OperationStatus};

use super::{Answer, Call, Next, Stage, Step, Turn, observe};
use crate::marketplace::UpdateOutcome;

/// Microsoft's window for an ACK, from the webhook's receipt (P7): past it, the operation
/// is auto-accepted. An ACK row's `due_at` is the receipt plus this.
pub const ACK_WINDOW: Duration = Duration::from_secs(10);

/// The next step of an ACK row: the PATCH while it has not been answered, then the polls of
/// the operation.
pub fn step(
    turn: &Turn<'_>,
    operation_id: OperationId,
    status: AckStatus,
    best_effort: bool,
) -> Next {
    if matches!(
        turn.progress.stage,
        Stage::Polling { .. } | Stage::Observing { .. }
    ) {
        return confirm(turn, operation_id);
    }
    let call = Call::Acknowledge {
        operation_id,
        status,
    };
    let Some(answer) = turn.answer_to(|c| *c == call) else {
        return turn.call(turn.progress.stage.clone(), call);
    };
    match answer {
        Answer::Acknowledged(UpdateOutcome::Recorded)
            if status == AckStatus::Success && !best_effort =>
        {
            turn.finish(
                vec![Event::OperationResult {
                    operation_id,
                    status: OperationStatus::Succeeded,
                }],
                // Reads like every recorded ACK's note ("ACK … recorded"), which tools
                // count (`store::verify::ack_of_operation`).
                format!(
                    "ACK {status}, so operation {operation_id} Succeeded (§4.11, no GET of it \
                     needed), recorded"
                ),
            )
        }
        Answer::Acknowledged(UpdateOutcome::Recorded) => {
            confirm_after(turn, format!("ACK {status} recorded"))
        }
        Answer::Acknowledged(UpdateOutcome::AlreadyFinal) => confirm_after(
            turn,
            format!("ACK {status}: the operation was already final (409)"),
        ),
        // A fresh token first (P2), like any call.
        Answer::Unauthorized { .. } if !turn.progress.fresh_token_tried => {
            turn.failed(&call, answer)
        }
        Answer::BadRequest { detail, .. }
        | Answer::NotFound { detail }
        | Answer::Conflict { detail }
        | Answer::Unauthorized { detail, .. }
        | Answer::Unexpected { detail, .. }
            if best_effort =>
        {
            confirm_after(turn, format!("best-effort ACK {status} ignored: {detail}"))
        }
        other => turn.failed(&call, other),
    }
}

/// The PATCH is over: the operation is polled to its end ([`observe::poll`], as for any
/// operation we follow). Microsoft's window no longer paces the retries: it was the PATCH's.
fn confirm(turn: &Turn<'_>, operation_id: OperationId) -> Next {
    let polls = Turn {
        deadline: None,
        ..*turn
    };
    observe::poll(&polls, operation_id, None, None)
}

/// The PATCH was just answered (`note` says how) without telling the operation's end: the
/// row moves on to the polls, the first at once in an execution of its own, with a
/// fresh-token try of its own (P2).
fn confirm_after(turn: &Turn<'_>, note: String) -> Next {
    let mut next = turn
        .next(Stage::Polling { polls: 0 }, Step::WaitUntil(turn.now))
        .noting(note);
    next.progress.fresh_token_tried = false;
    next
}
