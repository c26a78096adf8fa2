//! Outputs of the machine: work the worker must do, as data (style principle 1, like
//! raft-rs `Ready`). The worker persists effects with the new state, then executes them.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::details::StateName;
use crate::ids::{CommandId, OperationId, PlanId, Quantity};

/// One piece of work for the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Effect {
    /// POST activate (§4.2; P3: send plan and quantity).
    Activate {
        /// Plan to activate.
        plan_id: Option<PlanId>,
        /// Seats to activate.
        quantity: Option<Quantity>,
    },
    /// PATCH the operation with Success/Failure (§4.11, within 10 s: P7), then confirm the
    /// operation's end and feed `Event::OperationResult`: a 200 to a `Success` is that end
    /// (§4.11, §7.3); otherwise GET the operation until Microsoft reports it final, in the
    /// same effect (as `ConfirmOperation` does).
    AckOperation {
        /// The webhook's operation.
        operation_id: OperationId,
        /// Accept or reject.
        status: AckStatus,
        /// Errors are to be ignored (Reinstate ACK, §6.3 client policy).
        best_effort: bool,
    },
    /// GET the subscription and feed the result back as `Event::Observed` (P13, P17).
    FetchSubscription,
    /// PATCH planId (§4.6).
    RequestPlanChange {
        /// Our command.
        command_id: CommandId,
        /// Target plan.
        plan_id: PlanId,
    },
    /// PATCH quantity (§4.7).
    RequestQuantityChange {
        /// Our command.
        command_id: CommandId,
        /// Target seats.
        quantity: Quantity,
    },
    /// DELETE the subscription (§4.8).
    RequestCancel {
        /// Our command.
        command_id: CommandId,
    },
    /// Poll Operation-Location until a final status, then feed `Event::OperationResult`.
    PollOperation {
        /// Our command.
        command_id: CommandId,
        /// The operation.
        operation_id: OperationId,
        /// Operation-Location.
        location: String,
        /// The 202's `Retry-After`: first poll delay and floor between polls (§15.1).
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// GET the operation until Microsoft reports it final, then feed
    /// `Event::OperationResult`: a change webhook after Unsubscribe (no ACK, P10). Microsoft
    /// applies a change only after the ACK or the window (§7.3), so until then a GET of the
    /// subscription may still show the old values (P13). An ACK confirms its own operation
    /// (`AckOperation`); versions before that queued this effect after every ACK, and such
    /// rows still queued run as before (rolling upgrade).
    ConfirmOperation {
        /// The operation to follow.
        operation_id: OperationId,
    },
    /// Tell the ISV's systems (outbox → broker).
    PublishDomainEvent(DomainEvent),
}

impl Effect {
    /// A stable snake_case label (logs, metrics, outbox type column).
    pub fn kind_str(&self) -> &'static str {
        match self {
            Effect::Activate { .. } => "activate",
            Effect::AckOperation { .. } => "ack_operation",
            Effect::FetchSubscription => "fetch_subscription",
            Effect::RequestPlanChange { .. } => "request_plan_change",
            Effect::RequestQuantityChange { .. } => "request_quantity_change",
            Effect::RequestCancel { .. } => "request_cancel",
            Effect::PollOperation { .. } => "poll_operation",
            Effect::ConfirmOperation { .. } => "confirm_operation",
            Effect::PublishDomainEvent(_) => "publish_domain_event",
        }
    }

    /// A read of Microsoft's view (GET subscription or operation): it changes nothing at
    /// Microsoft and tells the ISV nothing. The only effects an Unsubscribed subscription
    /// still has.
    pub fn is_read(&self) -> bool {
        matches!(
            self,
            Effect::FetchSubscription
                | Effect::PollOperation { .. }
                | Effect::ConfirmOperation { .. }
        )
    }
}

/// The PATCH body status; different words from the operation status (P6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AckStatus {
    /// Accept the change.
    Success,
    /// Reject the change.
    Failure,
}

impl AckStatus {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Success => "Success",
            AckStatus::Failure => "Failure",
        }
    }
}

impl fmt::Display for AckStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fact the ISV's systems care about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainEvent {
    /// What happened.
    pub kind: DomainEventKind,
    /// The plan after the event.
    pub plan_id: Option<PlanId>,
    /// The seats after the event.
    pub quantity: Option<Quantity>,
    /// Our state after the event.
    pub state: StateName,
    /// Why (rejections and failures).
    pub reason: Option<String>,
}

/// What kind of fact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DomainEventKind {
    /// A purchase became known.
    Purchased,
    /// The subscription is active: provision.
    Activated,
    /// Activate failed.
    ActivationFailed,
    /// The plan changed.
    PlanChanged,
    /// The seat count changed.
    QuantityChanged,
    /// A change was refused (by policy or because of the state).
    ChangeRejected,
    /// The term rolled over (reset included usage).
    Renewed,
    /// Payment failed: restrict, keep data (P25).
    Suspended,
    /// Payment fixed: restore.
    Reinstated,
    /// Cancelled: deprovision after retention (P25).
    Unsubscribed,
    /// Our PATCH/DELETE was refused or failed at Microsoft.
    PublisherOperationFailed,
    /// Notice: a term without `autoRenew` ends in N days ([`crate::notice`]).
    TermEnding,
    /// Notice: a Suspended subscription's 30-day grace ends in 7 days.
    GraceEnding,
    /// Notice: 5 days are left to activate a purchase before Microsoft cancels it.
    ActivationWindowClosing,
    /// Notice: 7 days after the Unsubscribe, the retention of the customer's data ends.
    DataRetentionEnds,
}

impl DomainEventKind {
    /// Every kind. The contract of each (`docs/events/<routing key>.schema.json`) is checked
    /// against this list, so a new kind must be added here; the test below fails to compile
    /// until it is.
    pub const ALL: [DomainEventKind; 15] = [
        DomainEventKind::Purchased,
        DomainEventKind::Activated,
        DomainEventKind::ActivationFailed,
        DomainEventKind::PlanChanged,
        DomainEventKind::QuantityChanged,
        DomainEventKind::ChangeRejected,
        DomainEventKind::Renewed,
        DomainEventKind::Suspended,
        DomainEventKind::Reinstated,
        DomainEventKind::Unsubscribed,
        DomainEventKind::PublisherOperationFailed,
        DomainEventKind::TermEnding,
        DomainEventKind::GraceEnding,
        DomainEventKind::ActivationWindowClosing,
        DomainEventKind::DataRetentionEnds,
    ];

    /// The broker routing key.
    pub fn routing_key(self) -> &'static str {
        match self {
            DomainEventKind::Purchased => "subscription.purchased",
            DomainEventKind::Activated => "subscription.activated",
            DomainEventKind::ActivationFailed => "subscription.activation_failed",
            DomainEventKind::PlanChanged => "subscription.plan_changed",
            DomainEventKind::QuantityChanged => "subscription.quantity_changed",
            DomainEventKind::ChangeRejected => "subscription.change_rejected",
            DomainEventKind::Renewed => "subscription.renewed",
            DomainEventKind::Suspended => "subscription.suspended",
            DomainEventKind::Reinstated => "subscription.reinstated",
            DomainEventKind::Unsubscribed => "subscription.unsubscribed",
            DomainEventKind::PublisherOperationFailed => "subscription.publisher_operation_failed",
            DomainEventKind::TermEnding => "subscription.term_ending",
            DomainEventKind::GraceEnding => "subscription.grace_ending",
            DomainEventKind::ActivationWindowClosing => "subscription.activation_window_closing",
            DomainEventKind::DataRetentionEnds => "subscription.data_retention_ends",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_are_snake_case_under_subscription() {
        assert_eq!(
            DomainEventKind::PlanChanged.routing_key(),
            "subscription.plan_changed"
        );
        assert_eq!(
            DomainEventKind::PublisherOperationFailed.routing_key(),
            "subscription.publisher_operation_failed"
        );
    }

    #[test]
    fn all_lists_every_domain_event_kind_once() {
        // Adding a kind breaks this match: add it to `ALL` (and give it a schema in
        // docs/events/) before extending the match.
        let position = |kind: DomainEventKind| match kind {
            DomainEventKind::Purchased => 0,
            DomainEventKind::Activated => 1,
            DomainEventKind::ActivationFailed => 2,
            DomainEventKind::PlanChanged => 3,
            DomainEventKind::QuantityChanged => 4,
            DomainEventKind::ChangeRejected => 5,
            DomainEventKind::Renewed => 6,
            DomainEventKind::Suspended => 7,
            DomainEventKind::Reinstated => 8,
            DomainEventKind::Unsubscribed => 9,
            DomainEventKind::PublisherOperationFailed => 10,
            DomainEventKind::TermEnding => 11,
            DomainEventKind::GraceEnding => 12,
            DomainEventKind::ActivationWindowClosing => 13,
            DomainEventKind::DataRetentionEnds => 14,
        };
        for (index, kind) in DomainEventKind::ALL.into_iter().enumerate() {
            assert_eq!(position(kind), index, "{kind:?}");
        }
    }

    #[test]
    fn effects_serialize_with_a_type_tag() {
        let json = serde_json::to_value(Effect::FetchSubscription).unwrap();
        assert_eq!(json, serde_json::json!({"type": "fetch_subscription"}));
        assert_eq!(Effect::FetchSubscription.kind_str(), "fetch_subscription");
    }
}
