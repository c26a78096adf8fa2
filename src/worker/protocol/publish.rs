//! A domain event for the ISV's systems: published on the domain exchange with publisher
//! confirms; an unconfirmed publish is retried (consumers dedupe on the CloudEvents id).

use uuid::Uuid;

use super::{Answer, Call, Next, Turn};

/// The CloudEvents id of a decision's domain event: the decision's event-log id, or
/// `<event id>:<n>` (n from 1, in the decision's order) when the decision publishes
/// `total` of them. Fixed when the decision queues the event, so every retry publishes the
/// same id.
pub fn cloud_event_id(event_id: Uuid, position: usize, total: usize) -> String {
    if total > 1 {
        format!("{event_id}:{position}")
    } else {
        event_id.to_string()
    }
}

pub fn step(turn: &Turn<'_>) -> Next {
    match turn.answer_to(|c| *c == Call::PublishDomainEvent) {
        None => turn.call(turn.progress.stage.clone(), Call::PublishDomainEvent),
        Some(Answer::Published) => turn.stay(super::Step::Finish { events: Vec::new() }),
        Some(other) => turn.failed(&Call::PublishDomainEvent, other),
    }
}
