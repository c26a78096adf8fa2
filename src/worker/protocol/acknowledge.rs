//! The acknowledgement of a Marketplace operation: PATCH it with Success or Failure
//! (§4.11), within Microsoft's 10-second window (P7).
//!
//! 200 is recorded; 409 means the operation is already final (auto-accepted, superseded):
//! done too, and the `ConfirmOperation` behind it learns how it ended. An unknown operation
//! (404, or the live service's 400, P19) will not become known by asking again. A
//! best-effort ACK (Reinstate, §6.3) ignores every answer that is not worth a retry.
//!
//! A 200 to `Success` already says how the operation ends: Microsoft recorded our Success
//! (§4.11), and Success is also what the window would have decided without us (§7.3: no
//! PATCH ⇒ auto-Success), so the operation is `Succeeded` and the confirming GET of the
//! operation (`ConfirmOperation`) has nothing left to learn: the step feeds the result at
//! once and records that the confirmation is known ([`Record::ConfirmationKnown`]). The GET
//! of the subscription the result brings stays (P13: only a GET after the operation is
//! final shows its outcome). Not collapsed: a `Failure` (Microsoft ignored rejections,
//! acc#348, P7: its confirmation shows what really happened), a 409 (the operation ended
//! some other way: superseded, failed), a best-effort ACK (a Reinstate waits for
//! Microsoft's own final status before GETs are trusted, P13).

use std::time::Duration;

use fulfillment_state_machine::{AckStatus, Event, OperationId, OperationStatus};

use super::{Answer, Call, Next, Record, Turn};
use crate::marketplace::UpdateOutcome;

/// Microsoft's window for an ACK, from the webhook's receipt (P7): past it, the operation
/// is auto-accepted. An ACK row's `due_at` is the receipt plus this.
pub const ACK_WINDOW: Duration = Duration::from_secs(10);

pub fn step(
    turn: &Turn<'_>,
    operation_id: OperationId,
    status: AckStatus,
    best_effort: bool,
) -> Next {
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
            .recording(Record::ConfirmationKnown { operation_id })
        }
        Answer::Acknowledged(UpdateOutcome::Recorded) => {
            turn.finish(Vec::new(), format!("ACK {status} recorded"))
        }
        Answer::Acknowledged(UpdateOutcome::AlreadyFinal) => turn.finish(
            Vec::new(),
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
            turn.finish(
                Vec::new(),
                format!("best-effort ACK {status} ignored: {detail}"),
            )
        }
        other => turn.failed(&call, other),
    }
}
