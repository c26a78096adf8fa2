//! The decision tables of the effect protocols: `(effect kind, progress, Microsoft's answer)
//! -> step`, one named row per answer class, each naming the fact of docs/marketplace.md it
//! encodes (§ or P number). Pure: no PostgreSQL, RabbitMQ or HTTP; the clock is fixed.

use std::time::Duration;

use fulfillment_state_machine::{
    AckStatus, CommandId, DomainEvent, DomainEventKind, Effect, EventKind, OperationId, PlanId,
    Quantity, StateName,
};
use marketplace_fulfillment::marketplace::{OperationStatus, Subscription, UpdateOutcome};
use marketplace_fulfillment::worker::ProtocolConfig;
use marketplace_fulfillment::worker::protocol::{
    self, Answer, Answered, Call, CommandStatus, FollowCause, GiveUpWhy, Progress, Record, Stage,
    Step, Turn,
};
use serde_json::json;
use time::OffsetDateTime;
use uuid::Uuid;

// ---- the world of a row ---------------------------------------------------------------

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_796_083_200).unwrap() // 2026-12-01T00:00:00Z
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const SUBSCRIPTION: Uuid = Uuid::from_u128(0x5ab);
const COMMAND: u128 = 0xc0;
const OPERATION: u128 = 0x0b;

fn op_id() -> OperationId {
    OperationId::from(Uuid::from_u128(OPERATION))
}

fn plan(name: &str) -> PlanId {
    PlanId::parse(name).unwrap()
}

fn seats(n: u32) -> Quantity {
    Quantity::new(n).unwrap()
}

// Effects.
fn activate() -> Effect {
    Effect::Activate {
        plan_id: Some(plan("silver")),
        quantity: Some(seats(5)),
    }
}

fn activate_unknown_plan() -> Effect {
    Effect::Activate {
        plan_id: None,
        quantity: None,
    }
}

fn ack(best_effort: bool) -> Effect {
    Effect::AckOperation {
        operation_id: op_id(),
        status: AckStatus::Success,
        best_effort,
    }
}

fn ack_failure() -> Effect {
    Effect::AckOperation {
        operation_id: op_id(),
        status: AckStatus::Failure,
        best_effort: false,
    }
}

fn ack_failure_call() -> Call {
    Call::Acknowledge {
        operation_id: op_id(),
        status: AckStatus::Failure,
    }
}

fn fetch() -> Effect {
    Effect::FetchSubscription
}

fn change_plan() -> Effect {
    Effect::RequestPlanChange {
        command_id: CommandId::from(Uuid::from_u128(COMMAND)),
        plan_id: plan("gold"),
    }
}

fn change_quantity() -> Effect {
    Effect::RequestQuantityChange {
        command_id: CommandId::from(Uuid::from_u128(COMMAND)),
        quantity: seats(9),
    }
}

fn cancel() -> Effect {
    Effect::RequestCancel {
        command_id: CommandId::from(Uuid::from_u128(COMMAND)),
    }
}

fn poll(retry_after: Option<Duration>) -> Effect {
    Effect::PollOperation {
        command_id: CommandId::from(Uuid::from_u128(COMMAND)),
        operation_id: op_id(),
        location: LOCATION.to_owned(),
        retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
    }
}

fn confirm() -> Effect {
    Effect::ConfirmOperation {
        operation_id: op_id(),
    }
}

fn publish() -> Effect {
    Effect::PublishDomainEvent(DomainEvent {
        kind: DomainEventKind::Activated,
        plan_id: Some(plan("silver")),
        quantity: None,
        state: StateName::Subscribed,
        reason: None,
    })
}

/// An Operation-Location as production sends it: absolute, on another host (§15.1).
const LOCATION: &str = "https://main.prod.marketplaceapi.azure.com/api/saas/subscriptions/\
    00000000-0000-0000-0000-0000000005ab/operations/00000000-0000-0000-0000-00000000000b\
    ?api-version=2018-08-31";

// Calls.
fn activate_call() -> Call {
    Call::Activate {
        plan_id: "silver".into(),
        quantity: Some(5),
    }
}

fn ack_call() -> Call {
    Call::Acknowledge {
        operation_id: op_id(),
        status: AckStatus::Success,
    }
}

fn get_operation(location: bool) -> Call {
    Call::GetOperation {
        operation_id: op_id(),
        location: location.then(|| LOCATION.to_owned()),
    }
}

fn patch_plan() -> Call {
    Call::ChangePlan {
        plan_id: plan("gold"),
    }
}

fn patch_quantity() -> Call {
    Call::ChangeQuantity { quantity: seats(9) }
}

// Progress.
fn fresh() -> Progress {
    Progress::default()
}

fn at(stage: Stage) -> Progress {
    Progress {
        stage,
        fresh_token_tried: false,
    }
}

fn token_tried(progress: Progress) -> Progress {
    Progress {
        fresh_token_tried: true,
        ..progress
    }
}

fn sent(checks: u32, refused: Option<&str>) -> Progress {
    at(Stage::ActivationSent {
        sent_at: now() - secs(3),
        refused: refused.map(str::to_owned),
        checks,
    })
}

fn polling(polls: u32) -> Progress {
    at(Stage::Polling { polls })
}

fn observing() -> Progress {
    at(Stage::Observing {
        because: "Microsoft does not know the operation (it forgets finished ones); observing the subscription".into(),
    })
}

fn following(cause: FollowCause, since_ago: Duration, checks: u32) -> Progress {
    at(Stage::Following {
        since: now() - since_ago,
        cause,
        because: "timed out".into(),
        checks,
    })
}

fn lost(checks: u32) -> Progress {
    following(FollowCause::LostAnswer, secs(5), checks)
}

fn locked_since(ago: Duration) -> Progress {
    following(FollowCause::Locked, ago, 1)
}

// Answers.
fn subscription(status: &str, plan: &str, quantity: u32) -> Answer {
    let found: Subscription = serde_json::from_value(json!({
        "id": SUBSCRIPTION,
        "offerId": "contoso-analytics",
        "planId": plan,
        "quantity": quantity,
        "saasSubscriptionStatus": status,
        "term": {"termUnit": "P1M", "startDate": "2026-12-01", "endDate": "2026-12-31"},
    }))
    .unwrap();
    Answer::Subscription(Box::new(found))
}

fn accepted(retry_after: Option<Duration>) -> Answer {
    Answer::Accepted {
        operation_id: Uuid::from_u128(OPERATION),
        location: LOCATION.to_owned(),
        retry_after,
    }
}

fn operation(status: &str) -> Answer {
    Answer::Operation {
        status: Some(OperationStatus::parse(status)),
        error: None,
    }
}

fn bad_request() -> Answer {
    Answer::BadRequest {
        locked: false,
        detail: "HTTP 400: the plan cannot be purchased by a CSP customer".into(),
    }
}

fn locked() -> Answer {
    Answer::BadRequest {
        locked: true,
        detail: "HTTP 400: Subscription is locked due to pending operations".into(),
    }
}

fn unauthorized(status: u16) -> Answer {
    Answer::Unauthorized {
        status,
        detail: format!("HTTP {status}"),
    }
}

fn not_found() -> Answer {
    Answer::NotFound {
        detail: "HTTP 404".into(),
    }
}

fn conflict() -> Answer {
    Answer::Conflict {
        detail: "HTTP 409".into(),
    }
}

fn throttled(retry_after: Duration) -> Answer {
    Answer::Throttled {
        retry_after: Some(retry_after),
        detail: "HTTP 429".into(),
    }
}

fn server_error() -> Answer {
    Answer::ServerError {
        status: 500,
        retry_after: None,
        detail: "HTTP 500".into(),
    }
}

fn timeout() -> Answer {
    Answer::Timeout {
        detail: "timed out".into(),
    }
}

fn reset() -> Answer {
    Answer::ConnectionReset {
        detail: "connection reset after the request was sent".into(),
    }
}

fn not_sent() -> Answer {
    Answer::NotSent {
        detail: "could not connect".into(),
    }
}

// ---- the table ------------------------------------------------------------------------

/// What the step must be.
#[derive(Debug, Clone, PartialEq)]
enum Want {
    Make(Call),
    /// `WaitUntil(now + d)`.
    Wait(Duration),
    /// `Finish` feeding events of these kinds, in order.
    Finish(Vec<EventKind>),
    /// `RetryLater { at: now + d }`.
    Retry(Duration),
    GiveUp(GiveUpWhy),
}

struct Row {
    fact: &'static str,
    name: &'static str,
    effect: Effect,
    progress: Progress,
    answered: Option<Answered>,
    want: Want,
    attempts: u32,
    created_ago: Duration,
    /// How long Microsoft's window has left (an ACK's `due_at` − now); `None`: no window.
    window_left: Option<Duration>,
    /// The stage stored afterwards, by tag.
    stage: Option<&'static str>,
    /// The publisher command status recorded, if the row is about one.
    command: Option<CommandStatus>,
    fresh_token_tried: bool,
    /// Whether the progress afterwards only waits for Microsoft (the runner's
    /// `awaits_microsoft` column: the row holds back nothing and keeps no ACK deadline).
    awaits: Option<bool>,
    /// The note the step records for the event log.
    note: Option<&'static str>,
}

fn row(
    fact: &'static str,
    name: &'static str,
    effect: Effect,
    progress: Progress,
    answered: Option<(Call, Answer)>,
    want: Want,
) -> Row {
    let fresh_token_tried = progress.fresh_token_tried;
    Row {
        fact,
        name,
        effect,
        progress,
        answered: answered.map(|(call, answer)| Answered { call, answer }),
        want,
        attempts: 0,
        created_ago: secs(1),
        window_left: None,
        stage: None,
        command: None,
        fresh_token_tried,
        awaits: None,
        note: None,
    }
}

impl Row {
    fn stage(self, tag: &'static str) -> Self {
        Row {
            stage: Some(tag),
            ..self
        }
    }

    fn command(self, status: CommandStatus) -> Self {
        Row {
            command: Some(status),
            ..self
        }
    }

    fn attempts(self, attempts: u32) -> Self {
        Row { attempts, ..self }
    }

    fn window_left(self, left: Duration) -> Self {
        Row {
            window_left: Some(left),
            ..self
        }
    }

    fn created_ago(self, created_ago: Duration) -> Self {
        Row {
            created_ago,
            ..self
        }
    }

    /// Whether the row only waits for Microsoft afterwards.
    fn awaits(self, awaits: bool) -> Self {
        Row {
            awaits: Some(awaits),
            ..self
        }
    }

    /// The note the step records.
    fn note(self, note: &'static str) -> Self {
        Row {
            note: Some(note),
            ..self
        }
    }

    /// Whether the progress afterwards marks a fresh token as tried (P2).
    fn fresh_token(self, fresh_token_tried: bool) -> Self {
        Row {
            fresh_token_tried,
            ..self
        }
    }
}

// One row per line group, as a table reads; rustfmt would spread each over a dozen lines.
#[rustfmt::skip]
fn rows() -> Vec<Row> {
    use CommandStatus as C;
    use EventKind as E;
    use FollowCause::LostAnswer;
    use Want::*;
    vec![
        // ── Activate and its confirmation ───────────────────────────────────────
        row("§4.2 P3", "activate sends plan and seats", activate(), fresh(), None,
            Make(activate_call())),
        row("P3", "activate without a known plan reads it first", activate_unknown_plan(),
            fresh(), None, Make(Call::GetSubscription)),
        row("P5", "activate of a subscription GET shows Subscribed confirms without POST",
            activate_unknown_plan(), fresh(),
            Some((Call::GetSubscription, subscription("Subscribed", "silver", 5))),
            Finish(vec![E::ActivationConfirmed])),
        row("P3", "activate sends the plan GET reported", activate_unknown_plan(), fresh(),
            Some((Call::GetSubscription, subscription("PendingFulfillmentStart", "silver", 5))),
            Make(Call::Activate { plan_id: "silver".into(), quantity: None })),
        row("P4", "activate 200 is only received: GET follows", activate(), fresh(),
            Some((activate_call(), Answer::Activated)), Make(Call::GetSubscription))
            .stage("activation_sent"),
        row("P5 §8.2", "activate 400 is judged by GET", activate(), fresh(),
            Some((activate_call(), bad_request())), Make(Call::GetSubscription))
            .stage("activation_sent"),
        row("§8.2", "activate 404 is activation failed", activate(), fresh(),
            Some((activate_call(), not_found())), Finish(vec![E::ActivationFailed])),
        row("§8.2", "activate 5xx is retried", activate(), fresh(),
            Some((activate_call(), server_error())), Retry(secs(1))),
        row("§8.1", "activate 429 waits at least Retry-After", activate(), fresh(),
            Some((activate_call(), throttled(secs(7)))), Retry(secs(7))),
        row("§8.2", "activate timeout is retried (safe to repeat)", activate(), fresh(),
            Some((activate_call(), timeout())), Retry(secs(1))),
        row("§8.2", "activate retries back off exponentially", activate(), fresh(),
            Some((activate_call(), server_error())), Retry(secs(8))).attempts(3),
        row("§8.2", "activate gives up when the attempts are spent", activate(), fresh(),
            Some((activate_call(), server_error())), GiveUp(GiveUpWhy::AttemptsExhausted))
            .attempts(7),
        row("P2", "activate 401 is tried once more with a fresh token", activate(), fresh(),
            Some((activate_call(), unauthorized(401))), Make(activate_call()))
            .fresh_token(true),
        row("P2", "activate 403 with a fresh token too gives up", activate(),
            token_tried(fresh()), Some((activate_call(), unauthorized(403))),
            GiveUp(GiveUpWhy::Permanent)),
        row("P4", "a later execution of a sent activation checks with GET", activate(),
            sent(2, None), None, Make(Call::GetSubscription)),
        row("P4", "GET Subscribed confirms the activation", activate(), sent(0, None),
            Some((Call::GetSubscription, subscription("Subscribed", "silver", 5))),
            Finish(vec![E::ActivationConfirmed])),
        row("§15.4", "GET still pending checks again after 2 s", activate(), sent(0, None),
            Some((Call::GetSubscription, subscription("PendingFulfillmentStart", "silver", 5))),
            Wait(secs(2))).stage("activation_sent"),
        row("§15.4", "activation checks grow apart by half", activate(), sent(3, None),
            Some((Call::GetSubscription, subscription("PendingFulfillmentStart", "silver", 5))),
            Wait(ms(6750))),
        row("§15.4", "activation checks grow to about 15 s, not every 2 s", activate(),
            sent(20, None),
            Some((Call::GetSubscription, subscription("PendingFulfillmentStart", "silver", 5))),
            Wait(secs(15))),
        row("§15.4", "GET Unsubscribed after activate is activation failed at Microsoft",
            activate(), sent(1, None),
            Some((Call::GetSubscription, subscription("Unsubscribed", "silver", 5))),
            Finish(vec![E::ActivationFailed])),
        row("§8.2", "GET Suspended after activate is activation failed", activate(),
            sent(1, None), Some((Call::GetSubscription, subscription("Suspended", "silver", 5))),
            Finish(vec![E::ActivationFailed])),
        row("P5", "activate 400 on a subscription GET shows Subscribed is success", activate(),
            sent(0, Some("HTTP 400")),
            Some((Call::GetSubscription, subscription("Subscribed", "silver", 5))),
            Finish(vec![E::ActivationConfirmed])),
        row("P5 §8.2", "activate 400 on a subscription still pending is failure", activate(),
            sent(0, Some("HTTP 400")),
            Some((Call::GetSubscription, subscription("PendingFulfillmentStart", "silver", 5))),
            Finish(vec![E::ActivationFailed])),
        row("P27", "past the wait cap the pending subscription is observed as it is",
            activate(), sent(40, None),
            Some((Call::GetSubscription, subscription("PendingFulfillmentStart", "silver", 5))),
            Finish(vec![E::Observed])).created_ago(secs(31 * 60)),
        row("§8.2", "a failed activation check is retried, the POST is not repeated",
            activate(), sent(1, None), Some((Call::GetSubscription, server_error())),
            Retry(secs(1))).stage("activation_sent"),
        row("P19", "GET 404 after activate is activation failed", activate(), sent(1, None),
            Some((Call::GetSubscription, not_found())), Finish(vec![E::ActivationFailed])),
        // ── ACK of a Marketplace operation ─────────────────────────────────────
        row("§4.11 P7", "an ACK PATCHes the operation", ack(false), fresh(), None,
            Make(ack_call())).awaits(false),
        row("§4.11 §7.3", "ACK Success 200: the operation Succeeded, no GET of it confirms",
            ack(false), fresh(),
            Some((ack_call(), Answer::Acknowledged(UpdateOutcome::Recorded))),
            Finish(vec![E::OperationResult])),
        row("P7 §7.3", "ACK Failure 200: the same row polls the operation at once (rejections were ignored, acc#348)",
            ack_failure(), fresh(),
            Some((ack_failure_call(), Answer::Acknowledged(UpdateOutcome::Recorded))),
            Wait(Duration::ZERO)).stage("polling").awaits(true).note("ACK Failure recorded"),
        row("§6.3 P13", "a best-effort ACK 200 polls its operation in the same row (Reinstate)",
            ack(true), fresh(), Some((ack_call(), Answer::Acknowledged(UpdateOutcome::Recorded))),
            Wait(Duration::ZERO)).stage("polling").awaits(true),
        row("§8.2 P7", "ACK 409 means already final: the same row polls how it ended", ack(false),
            fresh(), Some((ack_call(), Answer::Acknowledged(UpdateOutcome::AlreadyFinal))),
            Wait(Duration::ZERO)).stage("polling").awaits(true)
            .note("ACK Success: the operation was already final (409)"),
        row("P19", "ACK of an unknown operation (400/404) gives up", ack(false), fresh(),
            Some((ack_call(), not_found())), GiveUp(GiveUpWhy::Permanent)),
        row("§8.2", "ACK 5xx is retried (safe to repeat)", ack(false), fresh(),
            Some((ack_call(), server_error())), Retry(secs(1))).awaits(false),
        row("§8.2", "ACK timeout is retried", ack(false), fresh(),
            Some((ack_call(), timeout())), Retry(secs(1))),
        row("§8.1", "ACK 429 waits at least Retry-After", ack(false), fresh(),
            Some((ack_call(), throttled(secs(3)))), Retry(secs(3))),
        row("P7", "an ACK's third 5xx retries within its window: half the 6 s left, not the 4 s backoff", ack(false), fresh(),
            Some((ack_call(), server_error())), Retry(secs(3))).attempts(2).window_left(secs(6)),
        row("P7", "an ACK's retry near the end of its window waits at least the backoff base", ack(false), fresh(),
            Some((ack_call(), server_error())), Retry(secs(1))).attempts(3).window_left(Duration::from_millis(800)),
        row("P7", "an ACK's 429 waits its Retry-After even past the window", ack(false), fresh(),
            Some((ack_call(), throttled(secs(3)))), Retry(secs(3))).attempts(2).window_left(secs(2)),
        row("P7", "an ACK whose window has closed backs off as before", ack(false), fresh(),
            Some((ack_call(), server_error())), Retry(secs(4))).attempts(2).window_left(Duration::ZERO),
        row("§6.3 P17", "a best-effort ACK ignores an unknown operation, then polls it", ack(true),
            fresh(), Some((ack_call(), not_found())), Wait(Duration::ZERO)).stage("polling")
            .awaits(true),
        row("§6.3", "a best-effort ACK still retries a 5xx", ack(true), fresh(),
            Some((ack_call(), server_error())), Retry(secs(1))),
        row("P2", "ACK 401 is tried once more with a fresh token", ack(false), fresh(),
            Some((ack_call(), unauthorized(401))), Make(ack_call())).fresh_token(true),
        row("P2", "ACK 401 with a fresh token too gives up", ack(false), token_tried(fresh()),
            Some((ack_call(), unauthorized(401))), GiveUp(GiveUpWhy::Permanent)),
        row("§6.3 P2", "a best-effort ACK refused with a fresh token too is ignored", ack(true),
            token_tried(fresh()), Some((ack_call(), unauthorized(403))),
            Wait(Duration::ZERO)).stage("polling").fresh_token(false),
        // ── the ACK's row after its PATCH: the operation polled to its end ─────
        row("§7.3", "the next execution of an acknowledged operation polls it, no second PATCH",
            ack_failure(), polling(0), None, Make(get_operation(false))),
        row("§7.1", "an acknowledged operation reported Failed ends the ACK's row",
            ack_failure(), polling(0), Some((get_operation(false), operation("Failed"))),
            Finish(vec![E::OperationResult])),
        row("§7.1 P13", "a Reinstate's operation reported Succeeded ends its best-effort ACK",
            ack(true), polling(0), Some((get_operation(false), operation("Succeeded"))),
            Finish(vec![E::OperationResult])),
        row("§7.1 P11", "an acknowledged operation reported Conflict ends the ACK's row",
            ack(false), polling(0), Some((get_operation(false), operation("Conflict"))),
            Finish(vec![E::OperationResult])),
        row("§7.2", "an acknowledged operation InProgress is polled again, waiting for Microsoft only",
            ack_failure(), polling(0), Some((get_operation(false), operation("InProgress"))),
            Wait(ms(1500))).stage("polling").awaits(true),
        row("§7.2", "an acknowledged operation's polls grow apart up to 10 s", ack_failure(),
            polling(12), Some((get_operation(false), operation("InProgress"))), Wait(secs(10))),
        row("§7.2", "past the polling cap an acknowledged operation's subscription is observed",
            ack_failure(), polling(300), Some((get_operation(false), operation("InProgress"))),
            Make(Call::GetSubscription)).created_ago(secs(31 * 60)).stage("observing")
            .awaits(true),
        row("P17 P19", "an acknowledged operation Microsoft does not know: observe the subscription",
            ack(true), polling(1), Some((get_operation(false), not_found())),
            Make(Call::GetSubscription)).stage("observing"),
        row("§7.2 P13", "the observation after an ACK's polls is fed back", ack_failure(),
            observing(), Some((Call::GetSubscription, subscription("Subscribed", "gold", 5))),
            Finish(vec![E::Observed])),
        row("§8.2 P7", "a poll after the PATCH answered 5xx backs off as usual: the window was the PATCH's",
            ack_failure(), polling(1), Some((get_operation(false), server_error())),
            Retry(secs(4))).attempts(2).window_left(secs(6)).stage("polling").awaits(true),
        row("P2", "a poll after the PATCH answered 401 is tried once more with a fresh token",
            ack_failure(), polling(1), Some((get_operation(false), unauthorized(401))),
            Make(get_operation(false))).fresh_token(true),
        // ── Fetch subscription ─────────────────────────────────────────────────
        row("P13", "a fetch GETs the subscription", fetch(), fresh(), None,
            Make(Call::GetSubscription)),
        row("P13 §4.4", "GET 200 is observed", fetch(), fresh(),
            Some((Call::GetSubscription, subscription("Subscribed", "gold", 5))),
            Finish(vec![E::Observed])),
        row("P12 P19", "GET 404 is recorded, nothing observed", fetch(), fresh(),
            Some((Call::GetSubscription, not_found())), Finish(vec![])),
        row("§8.2", "GET 5xx is retried", fetch(), fresh(),
            Some((Call::GetSubscription, server_error())), Retry(secs(1))),
        row("§8.2", "GET reset is retried", fetch(), fresh(),
            Some((Call::GetSubscription, reset())), Retry(secs(1))),
        row("§8.1", "GET 429 waits at least Retry-After", fetch(), fresh(),
            Some((Call::GetSubscription, throttled(secs(30)))), Retry(secs(30))),
        row("P2", "a success with the fresh token clears the mark for later 401s", fetch(),
            token_tried(fresh()),
            Some((Call::GetSubscription, subscription("Subscribed", "gold", 5))),
            Finish(vec![E::Observed])).fresh_token(false),
        row("P2", "GET 403 is tried once more with a fresh token", fetch(), fresh(),
            Some((Call::GetSubscription, unauthorized(403))), Make(Call::GetSubscription))
            .fresh_token(true),
        // ── Poll our operation / confirm one (ConfirmOperation: a change after
        //    Unsubscribe, or a row an older version queued after its ACK) ─────────
        row("§15.1", "the first poll waits for the 202's Retry-After", poll(Some(secs(10))),
            fresh(), None, Wait(secs(9))).stage("polling"),
        row("§15.1", "once Retry-After has passed the operation is polled at its location",
            poll(Some(secs(10))), fresh(), None, Make(get_operation(true)))
            .created_ago(secs(11)),
        row("§15.1", "NotStarted is normal; Retry-After is the floor between polls",
            poll(Some(secs(10))), polling(0),
            Some((get_operation(true), operation("NotStarted"))), Wait(secs(10)))
            .created_ago(secs(11)),
        row("§7.2", "InProgress polls again after the interval", confirm(), polling(0),
            Some((get_operation(false), operation("InProgress"))), Wait(ms(1500))),
        row("§7.2", "polls grow apart up to 10 s", confirm(), polling(12),
            Some((get_operation(false), operation("InProgress"))), Wait(secs(10))),
        row("§3.5 P16", "an operation status we do not know is not final", confirm(),
            polling(0), Some((get_operation(false), operation("Queued"))), Wait(ms(1500))),
        row("§7.1", "Succeeded ends the operation", poll(None), polling(2),
            Some((get_operation(true), operation("Succeeded"))),
            Finish(vec![E::OperationResult])),
        row("§7.1", "Failed ends the operation", poll(None), polling(2),
            Some((get_operation(true), operation("Failed"))), Finish(vec![E::OperationResult])),
        row("§7.1 P11", "Conflict ends the operation", poll(None), polling(2),
            Some((get_operation(true), operation("Conflict"))),
            Finish(vec![E::OperationResult])),
        row("§7.3", "a confirmation polls the operation by id", confirm(), fresh(), None,
            Make(get_operation(false))),
        row("§7.2", "past the polling cap the subscription is observed instead", poll(None),
            polling(300), Some((get_operation(true), operation("InProgress"))),
            Make(Call::GetSubscription)).created_ago(secs(31 * 60)).stage("observing"),
        row("P17 P19", "an operation Microsoft does not know: observe the subscription",
            confirm(), polling(1), Some((get_operation(false), not_found())),
            Make(Call::GetSubscription)).stage("observing"),
        row("§7.2", "the observation after polling is fed back", confirm(), observing(),
            Some((Call::GetSubscription, subscription("Subscribed", "gold", 5))),
            Finish(vec![E::Observed])),
        row("§8.2", "a failed observation after polling is retried as an observation",
            confirm(), observing(), Some((Call::GetSubscription, server_error())),
            Retry(secs(1))).stage("observing"),
        row("§8.2", "a poll answered 5xx is retried", poll(None), polling(1),
            Some((get_operation(true), server_error())), Retry(secs(1))),
        row("§8.1", "a poll answered 429 waits at least Retry-After", poll(None), polling(1),
            Some((get_operation(true), throttled(secs(5)))), Retry(secs(5))),
        row("P2", "a poll answered 401 is tried once more with a fresh token", poll(None),
            polling(1), Some((get_operation(true), unauthorized(401))),
            Make(get_operation(true))).fresh_token(true),
        // ── Publisher plan change (PATCH) ───────────────────────────────────────
        row("§4.6", "a plan change PATCHes planId", change_plan(), fresh(), None,
            Make(patch_plan())).command(C::Requested),
        row("§15.1", "202 starts polling with its location and Retry-After", change_plan(),
            fresh(), Some((patch_plan(), accepted(Some(secs(10))))),
            Finish(vec![E::PublisherOperationAccepted])).command(C::Accepted),
        row("P22 §15.4", "a first PATCH answered 400 is refused", change_plan(), fresh(),
            Some((patch_plan(), bad_request())),
            Finish(vec![E::PublisherOperationRefused])).command(C::Refused),
        row("§4.6", "a first PATCH answered 404 is refused", change_plan(), fresh(),
            Some((patch_plan(), not_found())), Finish(vec![E::PublisherOperationRefused]))
            .command(C::Refused),
        row("§15.2", "a PATCH that timed out is followed, not refused", change_plan(), fresh(),
            Some((patch_plan(), timeout())), Wait(ms(1500)))
            .stage("following").command(C::Requested),
        row("§15.2", "a PATCH whose connection reset after sending is followed",
            change_plan(), fresh(), Some((patch_plan(), reset())), Wait(ms(1500)))
            .stage("following").command(C::Requested),
        row("§15.2 §8.2", "a PATCH answered 5xx is followed, not sent again blindly",
            change_plan(), fresh(), Some((patch_plan(), server_error())), Wait(ms(1500)))
            .stage("following").command(C::Requested),
        row("§15.1 P28", "a 202 we cannot read (no Operation-Location) is followed",
            change_plan(), fresh(),
            Some((patch_plan(), Answer::Unexpected {
                status: Some(202),
                detail: "HTTP 202 without Operation-Location".into(),
            })),
            Wait(ms(1500))).stage("following"),
        row("§8.2", "a PATCH answered 429 was not processed: retried", change_plan(), fresh(),
            Some((patch_plan(), throttled(secs(4)))), Retry(secs(4))),
        row("§8.2", "a PATCH that never left is retried", change_plan(), fresh(),
            Some((patch_plan(), not_sent())), Retry(secs(1))),
        row("P11", "a first PATCH answered 400 locked waits for the lock, not refused",
            change_plan(), fresh(), Some((patch_plan(), locked())), Wait(ms(1500)))
            .stage("following").command(C::Requested),
        row("P2", "a PATCH answered 401 is tried once more with a fresh token",
            change_plan(), fresh(), Some((patch_plan(), unauthorized(401))),
            Make(patch_plan())).fresh_token(true),
        row("§15.2", "a followed PATCH is first looked for with GET subscription",
            change_plan(), lost(1), None, Make(Call::GetSubscription)),
        row("§15.2 §7.2", "GET shows the target plan: the lost PATCH succeeded",
            change_plan(), lost(1),
            Some((Call::GetSubscription, subscription("Subscribed", "gold", 5))),
            Finish(vec![E::PublisherOperationConcluded])).command(C::Succeeded),
        row("§8.2 §15.2", "GET shows the old plan: only a repeat can tell, so it is sent",
            change_plan(), lost(1),
            Some((Call::GetSubscription, subscription("Subscribed", "silver", 5))),
            Make(patch_plan())).stage("following"),
        row("§15.2 P11", "the repeat answered 400 locked is still unknown, never refused",
            change_plan(), lost(1), Some((patch_plan(), locked())), Wait(ms(2250)))
            .stage("following"),
        row("§15.2", "the repeat answered another 400 (same plan) is still unknown",
            change_plan(), lost(1), Some((patch_plan(), bad_request())), Wait(ms(2250)))
            .stage("following"),
        row("§15.2", "the repeat answered 409 is still unknown", change_plan(), lost(1),
            Some((patch_plan(), conflict())), Wait(ms(2250))).stage("following"),
        row("§15.2", "the repeat answered 202: the first never arrived, poll this one",
            change_plan(), lost(1), Some((patch_plan(), accepted(Some(secs(10))))),
            Finish(vec![E::PublisherOperationAccepted])).command(C::Accepted),
        row("§15.2", "the repeat timed out too: still unknown", change_plan(), lost(1),
            Some((patch_plan(), timeout())), Wait(ms(2250))).stage("following"),
        row("§15.2", "a GET failing while following waits within the budget", change_plan(),
            lost(1), Some((Call::GetSubscription, server_error())), Wait(ms(2250))),
        row("§15.2", "a lost answer nothing showed within the budget needs an operator",
            change_plan(), following(LostAnswer, secs(31 * 60), 40),
            Some((patch_plan(), locked())), GiveUp(GiveUpWhy::OutcomeUnknown))
            .command(C::Unknown),
        row("P11", "a lock that never cleared within the budget is refused", change_plan(),
            locked_since(secs(31 * 60)), Some((patch_plan(), locked())),
            Finish(vec![E::PublisherOperationRefused])).command(C::Refused),
        row("§15.2", "a lost repeat while waiting for a lock makes the outcome unknown",
            change_plan(), locked_since(secs(60)), Some((patch_plan(), server_error())),
            Wait(ms(2250))).stage("following"),
        // ── Publisher quantity change (PATCH) ───────────────────────────────────
        row("§4.7", "a quantity change PATCHes quantity", change_quantity(), fresh(), None,
            Make(patch_quantity())).command(C::Requested),
        row("§4.7 §15.1", "202 to a quantity change starts polling", change_quantity(),
            fresh(), Some((patch_quantity(), accepted(None))),
            Finish(vec![E::PublisherOperationAccepted])),
        row("§15.2", "GET shows the target seats: the lost PATCH succeeded",
            change_quantity(), lost(2),
            Some((Call::GetSubscription, subscription("Subscribed", "silver", 9))),
            Finish(vec![E::PublisherOperationConcluded])).command(C::Succeeded),
        row("§15.2", "a quantity PATCH answered 5xx is followed", change_quantity(), fresh(),
            Some((patch_quantity(), server_error())), Wait(ms(1500))).stage("following"),
        // ── Publisher cancellation (DELETE) ─────────────────────────────────────
        row("§4.8", "a cancellation DELETEs the subscription", cancel(), fresh(), None,
            Make(Call::Cancel)).command(C::Requested),
        row("§4.8 §15.1", "202 to DELETE starts polling", cancel(), fresh(),
            Some((Call::Cancel, accepted(Some(secs(10))))),
            Finish(vec![E::PublisherOperationAccepted])).command(C::Accepted),
        row("§4.8 P11", "DELETE 409 waits for the pending operation", cancel(), fresh(),
            Some((Call::Cancel, conflict())), Wait(ms(1500))).stage("following"),
        row("§4.8", "while locked, GET still Subscribed: DELETE again", cancel(),
            locked_since(secs(60)),
            Some((Call::GetSubscription, subscription("Subscribed", "silver", 5))),
            Make(Call::Cancel)),
        row("§4.8", "DELETE 409 waits on a time budget, not a number of attempts", cancel(),
            locked_since(secs(60)), Some((Call::Cancel, conflict())), Wait(ms(2250)))
            .attempts(20),
        row("§4.8", "DELETE 409 past the budget (minutes) is refused", cancel(),
            locked_since(secs(31 * 60)), Some((Call::Cancel, conflict())),
            Finish(vec![E::PublisherOperationRefused])).command(C::Refused),
        row("§15.2", "a DELETE that timed out is followed, not refused", cancel(), fresh(),
            Some((Call::Cancel, timeout())), Wait(ms(1500))).stage("following"),
        row("§15.2", "GET shows Unsubscribed: the lost DELETE succeeded", cancel(), lost(1),
            Some((Call::GetSubscription, subscription("Unsubscribed", "silver", 5))),
            Finish(vec![E::PublisherOperationConcluded])).command(C::Succeeded),
        row("§15.2", "a repeated DELETE answered 409 after a lost answer is still unknown",
            cancel(), lost(1), Some((Call::Cancel, conflict())), Wait(ms(2250))),
        row("P22 §15.4", "a first DELETE answered 400 (CSP purchase) is refused", cancel(),
            fresh(), Some((Call::Cancel, bad_request())),
            Finish(vec![E::PublisherOperationRefused])).command(C::Refused),
        // ── Domain events ──────────────────────────────────────────────────────
        row("§6.5", "a domain event is published", publish(), fresh(), None,
            Make(Call::PublishDomainEvent)),
        row("§6.5", "a confirmed domain event is done", publish(), fresh(),
            Some((Call::PublishDomainEvent, Answer::Published)), Finish(vec![])),
        row("§6.5", "an unconfirmed domain event is retried", publish(), fresh(),
            Some((Call::PublishDomainEvent, Answer::PublishFailed {
                detail: "broker unreachable".into(),
            })),
            Retry(secs(1))),
        row("§6.5", "an unconfirmed domain event gives up when the attempts are spent",
            publish(), fresh(),
            Some((Call::PublishDomainEvent, Answer::PublishFailed {
                detail: "broker unreachable".into(),
            })),
            GiveUp(GiveUpWhy::AttemptsExhausted)).attempts(7),
    ]
}

fn stage_tag(progress: &Progress) -> String {
    progress.to_stored()["stage"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn command_status(records: &[Record]) -> Option<CommandStatus> {
    records.iter().rev().find_map(|record| match record {
        Record::Command(command) => Some(command.status),
        _ => None,
    })
}

#[test]
fn every_row_of_the_effect_protocols_holds() {
    let config = ProtocolConfig::default();
    let rows = rows();
    let mut failures = Vec::new();
    for row in &rows {
        let next = protocol::step(&Turn {
            effect: &row.effect,
            progress: &row.progress,
            answered: row.answered.as_ref(),
            now: now(),
            created_at: now() - row.created_ago,
            attempts: row.attempts,
            deadline: row.window_left.map(|left| now() + left),
            jitter: 1.0,
            config: &config,
        });
        let got = match &next.step {
            Step::Call(call) => Want::Make(call.clone()),
            Step::WaitUntil(at) => Want::Wait(Duration::try_from(*at - now()).unwrap()),
            Step::Finish { events } => Want::Finish(events.iter().map(|e| e.kind()).collect()),
            Step::RetryLater { at, .. } => Want::Retry(Duration::try_from(*at - now()).unwrap()),
            Step::GiveUp { why, .. } => Want::GiveUp(*why),
        };
        let mut wrong = Vec::new();
        if got != row.want {
            wrong.push(format!("step {:?}, wanted {:?}", next.step, row.want));
        }
        if let Some(tag) = row.stage
            && stage_tag(&next.progress) != tag
        {
            wrong.push(format!("stage {:?}, wanted {tag}", next.progress.stage));
        }
        if let Some(status) = row.command
            && command_status(&next.records) != Some(status)
        {
            wrong.push(format!("records {:?}, wanted {status:?}", next.records));
        }
        if let Some(awaits) = row.awaits
            && next.progress.awaits_microsoft_only() != awaits
        {
            wrong.push(format!(
                "progress {:?} awaits Microsoft only: {}, wanted {awaits}",
                next.progress,
                next.progress.awaits_microsoft_only()
            ));
        }
        if let Some(note) = row.note
            && !next
                .records
                .iter()
                .any(|record| *record == Record::Note(note.to_owned()))
        {
            wrong.push(format!(
                "records {:?}, wanted the note {note:?}",
                next.records
            ));
        }
        if next.progress.fresh_token_tried != row.fresh_token_tried {
            wrong.push(format!(
                "fresh_token_tried {}, wanted {}",
                next.progress.fresh_token_tried, row.fresh_token_tried
            ));
        }
        if !wrong.is_empty() {
            failures.push(format!("[{}] {}: {}", row.fact, row.name, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows fail:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

#[test]
fn the_table_has_a_row_per_answer_class_and_names_its_facts() {
    let rows = rows();
    assert!(rows.len() >= 60, "{} rows", rows.len());
    for row in &rows {
        assert!(
            row.fact.starts_with('§') || row.fact.starts_with('P'),
            "{}: {}",
            row.name,
            row.fact
        );
    }
    let mut names: Vec<_> = rows.iter().map(|r| r.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), rows.len(), "row names are unique");
}

/// No PATCH/DELETE whose answer was lost ends refused, whatever Microsoft answers next
/// (§15.2): every answer class, after a lost answer, within the budget.
#[test]
fn after_a_lost_answer_no_answer_makes_a_change_refused() {
    let config = ProtocolConfig::default();
    let answers = [
        accepted(Some(secs(10))),
        bad_request(),
        locked(),
        unauthorized(401),
        unauthorized(403),
        not_found(),
        conflict(),
        throttled(secs(2)),
        server_error(),
        timeout(),
        reset(),
        not_sent(),
        subscription("Subscribed", "silver", 5),
        subscription("Subscribed", "gold", 9),
        subscription("Unsubscribed", "silver", 5),
    ];
    for effect in [change_plan(), change_quantity(), cancel()] {
        let send = match &effect {
            Effect::RequestPlanChange { .. } => patch_plan(),
            Effect::RequestQuantityChange { .. } => patch_quantity(),
            _ => Call::Cancel,
        };
        for call in [send, Call::GetSubscription] {
            for answer in &answers {
                for progress in [lost(3), token_tried(lost(3))] {
                    let answered = Answered {
                        call: call.clone(),
                        answer: answer.clone(),
                    };
                    let next = protocol::step(&Turn {
                        effect: &effect,
                        progress: &progress,
                        answered: Some(&answered),
                        now: now(),
                        created_at: now() - secs(60),
                        attempts: 0,
                        deadline: None,
                        jitter: 1.0,
                        config: &config,
                    });
                    let refused = matches!(
                        &next.step,
                        Step::Finish { events }
                            if events.iter().any(|e| e.kind() == EventKind::PublisherOperationRefused)
                    );
                    assert!(
                        !refused && command_status(&next.records) != Some(CommandStatus::Refused),
                        "{effect:?} after a lost answer, {call:?} answered {answer:?}: {next:?}"
                    );
                }
            }
        }
    }
}
