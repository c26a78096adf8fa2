//! Builders shared by the integration tests: fixed ids, instants and event shorthands.
#![allow(dead_code)]

use fulfillment_state_machine::*;
use time::{Duration, OffsetDateTime};
use uuid::Uuid;

pub fn sub() -> SubscriptionId {
    SubscriptionId::from(Uuid::from_u128(0xABCD))
}

pub fn op(n: u128) -> OperationId {
    OperationId::from(Uuid::from_u128(0x0900 + n))
}

pub fn cmd(n: u128) -> CommandId {
    CommandId::from(Uuid::from_u128(0x0C00 + n))
}

/// Minute `m` after a fixed instant (2026-01-01T00:00Z).
pub fn t(m: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_767_225_600).unwrap() + Duration::minutes(m)
}

pub fn plan(s: &str) -> PlanId {
    PlanId::parse(s).unwrap()
}

pub fn qty(n: u32) -> Quantity {
    Quantity::new(n).unwrap()
}

pub fn snap(status: MarketplaceStatus, plan_id: &str, seats: u32) -> Snapshot {
    Snapshot {
        plan_id: Some(plan(plan_id)),
        quantity: Some(qty(seats)),
        ..Snapshot::with_status(status)
    }
}

pub fn hook(n: u128, action: WebhookAction, source: RequestSource, minute: i64) -> Webhook {
    Webhook {
        operation_id: op(n),
        action,
        source,
        timestamp: Some(t(minute)),
        plan_id: None,
        quantity: None,
        subscription: None,
    }
}

pub fn azure(n: u128, action: WebhookAction, minute: i64) -> Event {
    Event::Webhook(hook(n, action, RequestSource::Azure, minute))
}

pub fn change_plan(n: u128, source: RequestSource, target: &str, minute: i64) -> Event {
    Event::Webhook(Webhook {
        plan_id: Some(plan(target)),
        ..hook(n, WebhookAction::ChangePlan, source, minute)
    })
}

pub fn change_quantity(n: u128, source: RequestSource, target: u32, minute: i64) -> Event {
    Event::Webhook(Webhook {
        quantity: Some(qty(target)),
        ..hook(n, WebhookAction::ChangeQuantity, source, minute)
    })
}

pub fn resolved(status: MarketplaceStatus, minute: i64) -> Event {
    Event::PurchaseResolved {
        snapshot: snap(status, "gold", 10),
        resolved_at: t(minute),
    }
}

pub fn observed(status: MarketplaceStatus, plan_id: &str, seats: u32, minute: i64) -> Event {
    Event::Observed {
        snapshot: snap(status, plan_id, seats),
        observed_at: t(minute),
    }
}

pub fn confirmed(minute: i64) -> Event {
    Event::ActivationConfirmed {
        term: None,
        confirmed_at: t(minute),
    }
}

pub fn command(n: u128, command: Command) -> Event {
    Event::PublisherCommand {
        command_id: cmd(n),
        command,
    }
}

pub fn accepted(n: u128, op_n: u128) -> Event {
    Event::PublisherOperationAccepted {
        command_id: cmd(n),
        operation_id: op(op_n),
        location: format!("https://example.test/operations/{op_n}"),
        retry_after_secs: None,
    }
}

pub fn result(op_n: u128, status: OperationStatus) -> Event {
    Event::OperationResult {
        operation_id: op(op_n),
        status,
    }
}

/// PendingFulfillment with gold/10 resolved (activation requested under Automatic).
pub fn pending_resolved() -> Vec<Event> {
    vec![resolved(MarketplaceStatus::PendingFulfillmentStart, 1)]
}

/// Subscribed on gold/10.
pub fn subscribed() -> Vec<Event> {
    vec![
        resolved(MarketplaceStatus::PendingFulfillmentStart, 1),
        confirmed(2),
    ]
}

/// Subscribed with our plan change to platinum accepted by Microsoft as operation 50.
pub fn subscribed_changing_plan() -> Vec<Event> {
    let mut events = subscribed();
    events.push(command(
        1,
        Command::ChangePlan {
            plan_id: plan("platinum"),
        },
    ));
    events.push(accepted(1, 50));
    events
}

/// Subscribed with our cancellation accepted as operation 60.
pub fn subscribed_cancelling() -> Vec<Event> {
    let mut events = subscribed();
    events.push(command(1, Command::Cancel));
    events.push(accepted(1, 60));
    events
}

/// Suspended on gold/10.
pub fn suspended() -> Vec<Event> {
    let mut events = subscribed();
    events.push(azure(3, WebhookAction::Suspend, 3));
    events
}

/// Unsubscribed.
pub fn unsubscribed() -> Vec<Event> {
    let mut events = subscribed();
    events.push(azure(4, WebhookAction::Unsubscribe, 3));
    events
}

/// Feeds `events` from `new`, panicking if a setup step is ignored (a broken fixture).
pub fn machine_after(events: &[Event], policy: &Policy) -> SubscriptionMachine {
    let mut machine = SubscriptionMachine::new(sub());
    for event in events {
        let decision = machine.handle(event, t(0), policy);
        assert!(
            !decision.outcome.is_ignored(),
            "setup event {event:?} was ignored: {decision:?}"
        );
    }
    machine
}

pub fn domain(
    kind: DomainEventKind,
    plan_id: Option<&str>,
    seats: Option<u32>,
    state: StateName,
    reason: Option<&str>,
) -> Effect {
    Effect::PublishDomainEvent(DomainEvent {
        kind,
        plan_id: plan_id.map(plan),
        quantity: seats.map(qty),
        state,
        reason: reason.map(str::to_owned),
    })
}
