//! State diagrams derived from the code, never from a hand-kept table: every
//! representative machine (one or more per state, reached by feeding events from
//! `SubscriptionMachine::new`) is fed every representative event of every `EventKind`,
//! and each decision that is not `Ignored` becomes an edge.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use crate::details::{MarketplaceStatus, Snapshot, StateName};
use crate::event::{
    Command, Event, EventKind, OperationStatus, RequestSource, Webhook, WebhookAction,
};
use crate::ids::{CommandId, OperationId, PlanId, Quantity, SubscriptionId};
use crate::machine::SubscriptionMachine;
use crate::policy::Policy;

/// One edge of the diagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Transition {
    /// Source state.
    pub from: StateName,
    /// The kind of event that moves it.
    pub event: EventKind,
    /// Target state (may equal `from`: a self-loop that still did something).
    pub to: StateName,
}

// Fixed ids so representative events line up with the scenario machines (the same
// command/operation ids) while keeping distinct idempotency keys.
const SCENARIO_COMMAND: u128 = 0xC0;
const SCENARIO_OPERATION: u128 = 0x0B;
const REPRESENTATIVE_COMMAND: u128 = 0xC1;

fn at(minutes: i64) -> OffsetDateTime {
    // 2026-01-01T00:00:00Z; any fixed instant works, scenarios use early minutes and
    // representatives a later one so they are never stale.
    OffsetDateTime::from_unix_timestamp(1_767_225_600).expect("valid instant")
        + Duration::minutes(minutes)
}

fn plan(name: &str) -> PlanId {
    PlanId::parse(name).expect("literal plan id")
}

fn seats(n: u32) -> Quantity {
    Quantity::new(n).expect("literal quantity")
}

fn snapshot(status: MarketplaceStatus) -> Snapshot {
    Snapshot {
        plan_id: Some(plan("basic")),
        quantity: Some(seats(1)),
        ..Snapshot::with_status(status)
    }
}

fn webhook(id: u128, action: WebhookAction, source: RequestSource, minute: i64) -> Event {
    Event::Webhook(Webhook {
        operation_id: OperationId::from(Uuid::from_u128(id)),
        plan_id: (action == WebhookAction::ChangePlan).then(|| plan("target")),
        quantity: (action == WebhookAction::ChangeQuantity).then(|| seats(7)),
        action,
        source,
        timestamp: Some(at(minute)),
        subscription: None,
    })
}

fn command(id: u128, command: Command) -> Event {
    Event::PublisherCommand {
        command_id: CommandId::from(Uuid::from_u128(id)),
        command,
    }
}

fn accepted() -> Event {
    Event::PublisherOperationAccepted {
        command_id: CommandId::from(Uuid::from_u128(SCENARIO_COMMAND)),
        operation_id: OperationId::from(Uuid::from_u128(SCENARIO_OPERATION)),
        location: "https://marketplaceapi.microsoft.com/operations/0b".to_owned(),
        retry_after_secs: None,
    }
}

impl EventKind {
    /// Sample events of this kind, used to derive the diagram. Several samples where the
    /// data decides the target (e.g. the observed status).
    pub fn representatives(self) -> Vec<Event> {
        let id = 0x1000 + self as u128 * 0x10;
        let hook = |action: WebhookAction| {
            vec![
                webhook(id, action.clone(), RequestSource::Azure, 100),
                webhook(id + 1, action, RequestSource::Partner, 100),
            ]
        };
        let observed = |minute: i64| {
            [
                MarketplaceStatus::PendingFulfillmentStart,
                MarketplaceStatus::Subscribed,
                MarketplaceStatus::Suspended,
                MarketplaceStatus::Unsubscribed,
            ]
            .into_iter()
            .enumerate()
            .map(move |(i, status)| (snapshot(status), at(minute) + Duration::seconds(i as i64)))
        };
        match self {
            EventKind::WebhookSubscribe => hook(WebhookAction::Subscribe),
            EventKind::WebhookChangePlan => hook(WebhookAction::ChangePlan),
            EventKind::WebhookChangeQuantity => hook(WebhookAction::ChangeQuantity),
            EventKind::WebhookRenew => hook(WebhookAction::Renew),
            EventKind::WebhookSuspend => hook(WebhookAction::Suspend),
            EventKind::WebhookReinstate => hook(WebhookAction::Reinstate),
            EventKind::WebhookUnsubscribe => hook(WebhookAction::Unsubscribe),
            EventKind::WebhookUnknown => hook(WebhookAction::Unknown("Transfer".to_owned())),
            EventKind::PurchaseResolved => observed(100)
                .map(|(snapshot, resolved_at)| Event::PurchaseResolved {
                    snapshot,
                    resolved_at,
                })
                .collect(),
            EventKind::Observed => observed(100)
                .map(|(snapshot, observed_at)| Event::Observed {
                    snapshot,
                    observed_at,
                })
                .collect(),
            EventKind::ActivationRequested => vec![Event::ActivationRequested {
                command_id: CommandId::from(Uuid::from_u128(REPRESENTATIVE_COMMAND)),
            }],
            EventKind::ActivationConfirmed => vec![Event::ActivationConfirmed {
                term: None,
                confirmed_at: at(100),
            }],
            EventKind::ActivationFailed => vec![Event::ActivationFailed {
                reason: "representative failure".to_owned(),
                failed_at: at(100),
            }],
            EventKind::PublisherChangePlan => vec![command(
                REPRESENTATIVE_COMMAND,
                Command::ChangePlan {
                    plan_id: plan("target"),
                },
            )],
            EventKind::PublisherChangeQuantity => vec![command(
                REPRESENTATIVE_COMMAND,
                Command::ChangeQuantity { quantity: seats(7) },
            )],
            EventKind::PublisherCancel => vec![command(REPRESENTATIVE_COMMAND, Command::Cancel)],
            EventKind::PublisherOperationAccepted => vec![accepted()],
            EventKind::PublisherOperationRefused => vec![Event::PublisherOperationRefused {
                command_id: CommandId::from(Uuid::from_u128(SCENARIO_COMMAND)),
                reason: "400 locked".to_owned(),
            }],
            EventKind::OperationResult => [
                OperationStatus::Succeeded,
                OperationStatus::Failed,
                OperationStatus::Conflict,
            ]
            .into_iter()
            .map(|status| Event::OperationResult {
                operation_id: OperationId::from(Uuid::from_u128(SCENARIO_OPERATION)),
                status,
            })
            .collect(),
        }
    }
}

/// Event sequences (from `new`) that reach every state, with and without a publisher
/// operation in flight, so that every reaction has a chance to show.
fn scenarios() -> Vec<Vec<Event>> {
    let resolved = Event::PurchaseResolved {
        snapshot: snapshot(MarketplaceStatus::PendingFulfillmentStart),
        resolved_at: at(1),
    };
    let confirmed = Event::ActivationConfirmed {
        term: None,
        confirmed_at: at(2),
    };
    let subscribed = vec![resolved.clone(), confirmed];
    let with = |base: &[Event], more: &[Event]| [base, more].concat();
    let change = command(
        SCENARIO_COMMAND,
        Command::ChangePlan {
            plan_id: plan("premium"),
        },
    );
    let cancel = command(SCENARIO_COMMAND, Command::Cancel);
    let suspended = with(
        &subscribed,
        &[webhook(
            0x51,
            WebhookAction::Suspend,
            RequestSource::Azure,
            3,
        )],
    );
    let failed = Event::ActivationFailed {
        reason: "scenario failure".to_owned(),
        failed_at: at(2),
    };
    vec![
        vec![],
        vec![resolved.clone()],
        vec![resolved, failed],
        subscribed.clone(),
        with(&subscribed, std::slice::from_ref(&change)),
        with(&subscribed, &[change, accepted()]),
        with(&subscribed, &[cancel.clone(), accepted()]),
        suspended.clone(),
        with(&suspended, std::slice::from_ref(&cancel)),
        with(&suspended, &[cancel, accepted()]),
        with(
            &subscribed,
            &[webhook(
                0x52,
                WebhookAction::Unsubscribe,
                RequestSource::Azure,
                3,
            )],
        ),
    ]
}

fn subject() -> SubscriptionId {
    SubscriptionId::from(Uuid::from_u128(0x5AA5))
}

/// All edges, derived by driving the machine; sorted and deduplicated.
pub fn transitions() -> Vec<Transition> {
    let policy = Policy::default();
    let mut edges = Vec::new();
    for events in scenarios() {
        let mut machine = SubscriptionMachine::new(subject());
        for event in &events {
            machine.handle(event, at(0), &policy);
        }
        for kind in EventKind::ALL {
            for event in kind.representatives() {
                let mut probe = machine.clone();
                let decision = probe.handle(&event, at(100), &policy);
                if !decision.outcome.is_ignored() {
                    edges.push(Transition {
                        from: decision.from,
                        event: kind,
                        to: decision.to,
                    });
                }
            }
        }
    }
    edges.sort_unstable();
    edges.dedup();
    edges
}

/// Edges grouped by (from, to), labels in `EventKind::ALL` order.
fn grouped(edges: &[Transition]) -> BTreeMap<(StateName, StateName), Vec<EventKind>> {
    let mut groups: BTreeMap<(StateName, StateName), Vec<EventKind>> = BTreeMap::new();
    for edge in edges {
        groups
            .entry((edge.from, edge.to))
            .or_default()
            .push(edge.event);
    }
    for kinds in groups.values_mut() {
        kinds.sort_unstable();
        kinds.dedup();
    }
    groups
}

fn label(kinds: &[EventKind]) -> String {
    kinds
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A Mermaid `stateDiagram-v2`.
pub fn render_mermaid(edges: &[Transition]) -> String {
    let mut out = String::from("stateDiagram-v2\n");
    for state in StateName::ALL {
        let _ = writeln!(out, "    {state}");
    }
    let _ = writeln!(out, "    [*] --> {}", StateName::PendingFulfillment);
    for ((from, to), kinds) in grouped(edges) {
        let _ = writeln!(out, "    {from} --> {to}: {}", label(&kinds));
    }
    let _ = writeln!(out, "    {} --> [*]", StateName::Unsubscribed);
    out
}

/// A Graphviz digraph.
pub fn render_dot(edges: &[Transition]) -> String {
    let mut out = String::from("digraph subscription {\n");
    out.push_str("    rankdir=LR;\n");
    out.push_str("    node [shape=box, style=rounded];\n");
    out.push_str("    start [shape=point];\n");
    out.push_str("    end [shape=doublecircle, label=\"\"];\n");
    for state in StateName::ALL {
        let _ = writeln!(out, "    {state};");
    }
    let _ = writeln!(out, "    start -> {};", StateName::PendingFulfillment);
    for ((from, to), kinds) in grouped(edges) {
        let _ = writeln!(out, "    {from} -> {to} [label=\"{}\"];", label(&kinds));
    }
    let _ = writeln!(out, "    {} -> end;", StateName::Unsubscribed);
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_reach_every_state() {
        let policy = Policy::default();
        let mut reached: Vec<StateName> = scenarios()
            .into_iter()
            .map(|events| {
                let mut machine = SubscriptionMachine::new(subject());
                for event in &events {
                    let decision = machine.handle(event, at(0), &policy);
                    assert!(
                        !decision.outcome.is_ignored(),
                        "scenario step {event:?} was ignored: {decision:?}"
                    );
                }
                machine.state()
            })
            .collect();
        reached.sort_unstable();
        reached.dedup();
        assert_eq!(reached, StateName::ALL.to_vec());
    }

    #[test]
    fn every_kind_has_a_representative_of_that_kind() {
        for kind in EventKind::ALL {
            let samples = kind.representatives();
            assert!(!samples.is_empty(), "{kind}");
            assert!(samples.iter().all(|e| e.kind() == kind), "{kind}");
        }
    }
}
