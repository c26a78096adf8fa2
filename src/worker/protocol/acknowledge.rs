//! The acknowledgement of a Marketplace operation: PATCH it with Success or Failure
//! (§4.11), within Microsoft's 10-second window (P7).
//!
//! 200 is recorded; 409 means the operation is already final (auto-accepted, superseded):
//! done too, and the `ConfirmOperation` behind it learns how it ended. An unknown operation
//! (404, or the live service's 400, P19) will not become known by asking again. A
//! best-effort ACK (Reinstate, §6.3) ignores every answer that is not worth a retry.

use fulfillment_state_machine::{AckStatus, OperationId};

use super::{Answer, Call, Next, Turn};
use crate::marketplace::UpdateOutcome;

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
