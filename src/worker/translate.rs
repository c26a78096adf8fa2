//! Queue messages and Microsoft's wire types → machine events (parse, don't validate). A
//! message that cannot become an event is an error the worker dead-letters, never a guess.

use fulfillment_state_machine::{
    AllowedOperations, Command, CommandId, Event, MarketplaceStatus, OfferId, OperationId, Party,
    PlanId, Quantity, RequestSource, Snapshot, SubscriptionId, TenantId, Term, Webhook,
    WebhookAction,
};
use time::OffsetDateTime;

use crate::marketplace::{self, Subscription, WebhookPayload};
use crate::queue::{InboundMessage, InboxKey, PublisherCommand};

/// One message as the machine sees it.
#[derive(Debug, Clone)]
pub struct Translated {
    pub subscription_id: SubscriptionId,
    pub event: Event,
    /// What makes a redelivery a no-op.
    pub inbox_key: InboxKey,
}

/// Why a message cannot become an event.
#[derive(Debug, thiserror::Error)]
pub enum TranslateError {
    #[error("the webhook body is not a valid Marketplace webhook: {0}")]
    Webhook(#[source] serde_json::Error),
    #[error("the resolved subscription is not valid: {0}")]
    Subscription(#[source] serde_json::Error),
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Translates a message from the inbound queue.
pub fn translate(message: &InboundMessage) -> Result<Translated, TranslateError> {
    match message {
        InboundMessage::Webhook { payload, .. } => {
            let payload =
                WebhookPayload::parse(payload.as_bytes()).map_err(TranslateError::Webhook)?;
            let inbox_key = InboxKey::webhook(payload.id, &payload.action);
            Ok(Translated {
                subscription_id: SubscriptionId::from(payload.subscription_id),
                event: Event::Webhook(webhook(&payload)),
                inbox_key,
            })
        }
        InboundMessage::PurchaseResolved {
            resolved_at,
            subscription,
        } => {
            let subscription: Subscription =
                serde_json::from_str(subscription).map_err(TranslateError::Subscription)?;
            Ok(Translated {
                subscription_id: SubscriptionId::from(subscription.id),
                inbox_key: InboxKey::purchase_resolved(subscription.id, *resolved_at),
                event: Event::PurchaseResolved {
                    snapshot: snapshot(&subscription),
                    resolved_at: *resolved_at,
                },
            })
        }
        InboundMessage::Command {
            command_id,
            subscription_id,
            command,
            ..
        } => {
            let command_id = CommandId::from(*command_id);
            let event = match command {
                PublisherCommand::Activate => Event::ActivationRequested { command_id },
                PublisherCommand::ChangePlan { plan_id } => Event::PublisherCommand {
                    command_id,
                    command: Command::ChangePlan {
                        plan_id: PlanId::parse(plan_id).map_err(|e| invalid("planId", e))?,
                    },
                },
                PublisherCommand::ChangeQuantity { quantity } => Event::PublisherCommand {
                    command_id,
                    command: Command::ChangeQuantity {
                        quantity: Quantity::new(*quantity).map_err(|e| invalid("quantity", e))?,
                    },
                },
                PublisherCommand::Cancel => Event::PublisherCommand {
                    command_id,
                    command: Command::Cancel,
                },
            };
            Ok(Translated {
                subscription_id: SubscriptionId::from(*subscription_id),
                event,
                inbox_key: InboxKey::command(command_id.as_uuid()),
            })
        }
    }
}

/// A GET subscription / List result as an observation.
pub fn observed(subscription: &Subscription, observed_at: OffsetDateTime) -> Event {
    Event::Observed {
        snapshot: snapshot(subscription),
        observed_at,
    }
}

/// What Microsoft says about a subscription, in the machine's types. Values that do not
/// parse (an empty plan id, a zero quantity) are left out rather than invented.
pub fn snapshot(subscription: &Subscription) -> Snapshot {
    Snapshot {
        status: subscription
            .status
            .as_ref()
            .map(|s| MarketplaceStatus::parse(s.as_str()))
            .unwrap_or(MarketplaceStatus::Unknown(String::new())),
        offer_id: subscription
            .offer_id
            .as_deref()
            .and_then(|o| OfferId::parse(o).ok()),
        plan_id: subscription
            .plan_id
            .as_deref()
            .and_then(|p| PlanId::parse(p).ok()),
        quantity: subscription.quantity.and_then(|q| Quantity::new(q).ok()),
        term: subscription
            .term
            .as_ref()
            .map(|t| term(t, subscription.auto_renew)),
        beneficiary_tenant: tenant(subscription.beneficiary.as_ref()),
        purchaser_tenant: tenant(subscription.purchaser.as_ref()),
        name: subscription.name.clone(),
        beneficiary: subscription.beneficiary.as_ref().map(party),
        purchaser: subscription.purchaser.as_ref().map(party),
        private_offer_id: subscription
            .source_offers
            .iter()
            .find_map(|o| o.external_id.clone())
            .filter(|id| !id.trim().is_empty()),
        // An absent list says nothing; it must not read as "nothing allowed".
        allowed_operations: (!subscription.allowed_customer_operations.is_empty()).then(|| {
            AllowedOperations::new(
                subscription
                    .allowed_customer_operations
                    .iter()
                    .map(|o| o.as_str().to_owned()),
            )
        }),
    }
}

fn party(identity: &marketplace::AadIdentifier) -> Party {
    Party {
        tenant_id: identity.tenant_id.map(TenantId::from),
        object_id: identity.object_id,
        email: identity.email_id.clone().filter(|e| !e.trim().is_empty()),
    }
}

fn webhook(payload: &WebhookPayload) -> Webhook {
    Webhook {
        operation_id: OperationId::from(payload.id),
        action: WebhookAction::parse(&payload.action),
        source: payload
            .request_source()
            .map(|s| RequestSource::parse(s.as_str()))
            .unwrap_or(RequestSource::Unknown(String::new())),
        timestamp: payload.time_stamp,
        plan_id: payload
            .plan_id
            .as_deref()
            .and_then(|p| PlanId::parse(p).ok()),
        quantity: payload.quantity.and_then(|q| Quantity::new(q).ok()),
        subscription: payload.subscription.as_ref().map(snapshot),
    }
}

fn term(term: &marketplace::Term, auto_renew: Option<bool>) -> Term {
    Term {
        unit: term.term_unit.as_ref().map(|u| u.as_str().to_string()),
        charge_duration: term.charge_duration.clone(),
        start: term.start_date,
        end: term.end_date,
        auto_renew,
    }
}

fn tenant(identity: Option<&marketplace::AadIdentifier>) -> Option<TenantId> {
    identity.and_then(|i| i.tenant_id).map(TenantId::from)
}

fn invalid(field: &'static str, error: impl std::fmt::Display) -> TranslateError {
    TranslateError::Invalid {
        field,
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use fulfillment_state_machine::StateName;
    use uuid::Uuid;

    use super::*;

    const CHANGE_PLAN: &str = r#"{
      "id": "7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01",
      "activityId": "0b5f2c77-2222-4e2a-8d4b-6a1c9e3f7b02",
      "publisherId": "contoso", "offerId": "contoso-analytics", "planId": "gold",
      "quantity": null,
      "subscriptionId": "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03",
      "timeStamp": "2025-03-10T16:34:41.1370170Z",
      "action": "ChangePlan", "status": "InProgress", "operationRequestSource": "Azure",
      "subscription": {
        "id": "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03", "planId": "silver", "quantity": "",
        "offerId": "contoso-analytics", "saasSubscriptionStatus": " Subscribed ",
        "beneficiary": {"tenantId": "b2c3d4e5-5555-4f00-8000-00000000bb02"},
        "term": {"startDate": "2025-03-01T00:00:00", "endDate": "2025-03-31", "termUnit": "P1M"},
        "somethingNew": [1, 2, 3]
      },
      "purchaseToken": null
    }"#;

    fn webhook_message(body: &str) -> InboundMessage {
        InboundMessage::Webhook {
            received_at: OffsetDateTime::UNIX_EPOCH,
            payload: body.to_string(),
        }
    }

    #[test]
    fn a_documented_change_plan_webhook_becomes_a_machine_event() {
        let t = translate(&webhook_message(CHANGE_PLAN)).unwrap();
        assert_eq!(
            t.subscription_id.to_string(),
            "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03"
        );
        assert_eq!(
            t.inbox_key.message_id(),
            "7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01"
        );
        assert_eq!(t.inbox_key.kind(), "ChangePlan");
        let Event::Webhook(w) = t.event else { panic!() };
        assert_eq!(w.action, WebhookAction::ChangePlan);
        assert_eq!(w.source, RequestSource::Azure);
        assert_eq!(w.plan_id.unwrap().as_str(), "gold");
        assert!(w.timestamp.is_some());
        let snapshot = w.subscription.unwrap();
        assert_eq!(snapshot.status.state(), Some(StateName::Subscribed));
        assert_eq!(snapshot.plan_id.unwrap().as_str(), "silver");
        assert_eq!(snapshot.quantity, None);
        assert!(snapshot.beneficiary_tenant.is_some());
        assert!(snapshot.term.unwrap().end.is_some());
    }

    #[test]
    fn a_minimal_legacy_payload_and_an_unknown_action_are_accepted() {
        let body = r#"{"id":"7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01",
            "subscriptionId":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","action":"Transfer"}"#;
        let t = translate(&webhook_message(body)).unwrap();
        let Event::Webhook(w) = t.event else { panic!() };
        assert_eq!(w.action, WebhookAction::Unknown("Transfer".into()));
        assert!(w.subscription.is_none());
    }

    #[test]
    fn a_body_without_the_required_fields_is_refused_with_the_reason() {
        for (body, needle) in [
            (
                r#"{"id":"7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01","action":"Suspend"}"#,
                "subscriptionId",
            ),
            (
                r#"{"id":"nope","subscriptionId":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","action":"Suspend"}"#,
                "UUID",
            ),
            ("not json", "expected"),
            ("", "empty"),
        ] {
            let err = translate(&webhook_message(body)).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
    }

    #[test]
    fn commands_become_publisher_events_and_bad_values_are_refused() {
        let command = |command| InboundMessage::Command {
            command_id: Uuid::new_v4(),
            subscription_id: Uuid::new_v4(),
            command,
            requested_by: "api".into(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
        };
        let t = translate(&command(PublisherCommand::Activate)).unwrap();
        assert!(matches!(t.event, Event::ActivationRequested { .. }));
        assert_eq!(t.inbox_key.kind(), "command");
        let t = translate(&command(PublisherCommand::ChangeQuantity { quantity: 5 })).unwrap();
        assert!(matches!(
            t.event,
            Event::PublisherCommand {
                command: Command::ChangeQuantity { .. },
                ..
            }
        ));
        let err =
            translate(&command(PublisherCommand::ChangeQuantity { quantity: 0 })).unwrap_err();
        assert!(err.to_string().contains("quantity"), "{err}");
        let err = translate(&command(PublisherCommand::ChangePlan {
            plan_id: " ".into(),
        }))
        .unwrap_err();
        assert!(err.to_string().contains("planId"), "{err}");
    }

    #[test]
    fn a_resolved_purchase_becomes_an_event_keyed_by_the_visit() {
        let message = InboundMessage::PurchaseResolved {
            resolved_at: OffsetDateTime::UNIX_EPOCH,
            subscription: r#"{"id":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","planId":"silver",
                "offerId":"contoso-analytics","saasSubscriptionStatus":"PendingFulfillmentStart"}"#
                .into(),
        };
        let t = translate(&message).unwrap();
        let Event::PurchaseResolved { snapshot, .. } = t.event else {
            panic!()
        };
        assert_eq!(snapshot.status.state(), Some(StateName::PendingFulfillment));
        assert!(t.inbox_key.message_id().starts_with("resolve:3f9c6b1e"));
    }
}
