//! Activate and its confirmation (§4.2, P3–P5, P27, §15.4).
//!
//! POST activate once with plan and seats (P3; a missing plan is read with GET first), then
//! GET at a growing cadence until Microsoft reports `Subscribed`: 200 only means the request
//! was received (P4). A 400 to the POST is judged by GET (P5: already `Subscribed` is
//! success). `Unsubscribed` or `Suspended`, a 404, or a 400 on a subscription that never
//! became `Subscribed` are "activation failed". Past the wait cap the subscription is
//! observed as it is (P27: it shows on the operator's list of stragglers).

use fulfillment_state_machine::{Event, PlanId, Quantity};
use time::OffsetDateTime;

use super::{ACTIVATION_CHECK_CEILING, Answer, Call, Next, Stage, Step, Turn, elapsed, growing};
use crate::marketplace::{Subscription, SubscriptionStatus};
use crate::worker::translate;

pub fn step(turn: &Turn<'_>, plan_id: Option<&PlanId>, quantity: Option<Quantity>) -> Next {
    let activate = |plan: String| Call::Activate {
        plan_id: plan,
        quantity: quantity.map(Quantity::get),
    };
    match &turn.progress.stage {
        Stage::ActivationSent {
            sent_at,
            refused,
            checks,
        } => match turn.answer_to(|c| *c == Call::GetSubscription) {
            None => turn.call(turn.progress.stage.clone(), Call::GetSubscription),
            Some(Answer::Subscription(found)) => {
                judge(turn, found, *sent_at, refused.as_deref(), *checks)
            }
            Some(Answer::NotFound { detail }) => failed(turn, unknown_subscription(detail)),
            Some(other) => turn.failed(&Call::GetSubscription, other),
        },
        // Nothing answered yet (also a stage left over from another effect kind).
        _ => {
            if let Some(answered) = turn
                .answered
                .filter(|a| matches!(a.call, Call::Activate { .. }))
            {
                return answered_post(turn, &answered.call, &answered.answer);
            }
            match (plan_id, turn.answer_to(|c| *c == Call::GetSubscription)) {
                (Some(plan), _) => turn.call(Stage::Fresh, activate(plan.as_str().to_owned())),
                (None, None) => turn.call(Stage::Fresh, Call::GetSubscription),
                (None, Some(Answer::Subscription(found))) => match found.status {
                    // P5: nothing to activate; the GET already confirms it.
                    Some(SubscriptionStatus::Subscribed) => confirmed(turn, found),
                    _ => turn.call(
                        Stage::Fresh,
                        activate(found.plan_id.clone().unwrap_or_default()),
                    ),
                },
                (None, Some(Answer::NotFound { detail })) => {
                    failed(turn, unknown_subscription(detail))
                }
                (None, Some(other)) => turn.failed(&Call::GetSubscription, other),
            }
        }
    }
}

/// The answer to the POST.
fn answered_post(turn: &Turn<'_>, call: &Call, answer: &Answer) -> Next {
    let sent = |refused: Option<String>| Stage::ActivationSent {
        sent_at: turn.now,
        refused,
        checks: 0,
    };
    match answer {
        Answer::Activated => turn
            .call(sent(None), Call::GetSubscription)
            .noting("activation requested; waiting for Subscribed"),
        // P5, §8.2: maybe Subscribed already; GET decides.
        Answer::BadRequest { detail, .. } => turn
            .call(sent(Some(detail.clone())), Call::GetSubscription)
            .noting(format!(
                "activate answered 400, which also means already active; GET decides: {detail}"
            )),
        Answer::NotFound { detail } => failed(turn, unknown_subscription(detail)),
        other => turn.failed(call, other),
    }
}

/// A GET after the POST.
fn judge(
    turn: &Turn<'_>,
    found: &Subscription,
    sent_at: OffsetDateTime,
    refused: Option<&str>,
    checks: u32,
) -> Next {
    match &found.status {
        Some(SubscriptionStatus::Subscribed) => confirmed(turn, found),
        Some(status @ (SubscriptionStatus::Unsubscribed | SubscriptionStatus::Suspended)) => {
            let why = refused.map(|r| format!(" ({r})")).unwrap_or_default();
            failed(
                turn,
                format!("Microsoft reports the subscription {status}{why}"),
            )
        }
        _ if refused.is_some() => failed(
            turn,
            format!("activate refused: {}", refused.unwrap_or_default()),
        ),
        _ if elapsed(turn.created_at, turn.now) > turn.config.activation_wait_cap => turn.finish(
            vec![translate::observed(found, turn.now)],
            "activation still pending after the wait cap; observed as is (Microsoft cancels a purchase left pending for 30 days)",
        ),
        _ => {
            let delay = growing(
                turn.config.activation_check_interval,
                checks,
                ACTIVATION_CHECK_CEILING,
            );
            turn.next(
                Stage::ActivationSent {
                    sent_at,
                    refused: None,
                    checks: checks + 1,
                },
                Step::WaitUntil(turn.after(delay)),
            )
        }
    }
}

fn confirmed(turn: &Turn<'_>, found: &Subscription) -> Next {
    turn.finish(
        vec![Event::ActivationConfirmed {
            term: translate::snapshot(found).term,
            confirmed_at: turn.now,
        }],
        "activation confirmed: Subscribed",
    )
}

fn failed(turn: &Turn<'_>, reason: String) -> Next {
    turn.finish(
        vec![Event::ActivationFailed {
            reason: reason.clone(),
            failed_at: turn.now,
        }],
        reason,
    )
}

fn unknown_subscription(detail: &str) -> String {
    format!("Microsoft does not know the subscription: {detail}")
}
