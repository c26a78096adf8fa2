//! A domain event for the ISV's systems: published on the domain exchange with publisher
//! confirms; an unconfirmed publish is retried (consumers dedupe on the CloudEvents id).

use super::{Answer, Call, Next, Turn};

pub fn step(turn: &Turn<'_>) -> Next {
    match turn.answer_to(|c| *c == Call::PublishDomainEvent) {
        None => turn.call(turn.progress.stage.clone(), Call::PublishDomainEvent),
        Some(Answer::Published) => turn.stay(super::Step::Finish { events: Vec::new() }),
        Some(other) => turn.failed(&Call::PublishDomainEvent, other),
    }
}
