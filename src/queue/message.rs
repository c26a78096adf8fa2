//! The messages on the inbound work queue: what the ingress (webhook, landing page,
//! entitlement API) and the operator CLI hand to the workers. Our own types, free of lapin,
//! so producers and consumers agree on one definition.
//!
//! A webhook travels as the exact JSON body Microsoft sent (unknown fields kept, P16); the
//! worker parses it leniently. Every message also carries [`MessageMeta`] in the AMQP
//! properties and headers.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// One unit of work for the workers.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InboundMessage {
    /// A webhook whose Entra JWT the ingress verified; `payload` is the JSON body exactly as
    /// received (kept as text: serde's tagged enums cannot carry a borrowed raw value).
    Webhook {
        #[serde(with = "time::serde::rfc3339")]
        received_at: OffsetDateTime,
        payload: String,
    },
    /// A landing-page visit whose token Microsoft resolved; `subscription` is the
    /// `subscription` object of the Resolve response, as JSON text.
    PurchaseResolved {
        #[serde(with = "time::serde::rfc3339")]
        resolved_at: OffsetDateTime,
        subscription: String,
    },
    /// A publisher command (entitlement API or `fulfillment subscription …`).
    Command {
        command_id: Uuid,
        subscription_id: Uuid,
        command: PublisherCommand,
        /// Who asked: `api` for the entitlement API, `cli:<user>` for the operator CLI.
        requested_by: String,
        #[serde(with = "time::serde::rfc3339")]
        requested_at: OffsetDateTime,
    },
}

/// What the publisher (the ISV) asks for. Goes through the same queue and machine as
/// Microsoft's events, so one subscription still sees one decision at a time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PublisherCommand {
    Activate,
    ChangePlan { plan_id: String },
    ChangeQuantity { quantity: u32 },
    Cancel,
}

impl PublisherCommand {
    /// The command's name, as its serde tag (`change_plan`, …): the API's and the
    /// command records' `command`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Activate => "activate",
            Self::ChangePlan { .. } => "change_plan",
            Self::ChangeQuantity { .. } => "change_quantity",
            Self::Cancel => "cancel",
        }
    }
}

impl InboundMessage {
    /// The value of the `x-message-type` header.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Webhook { .. } => "webhook",
            Self::PurchaseResolved { .. } => "purchase_resolved",
            Self::Command { .. } => "command",
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an InboundMessage always serializes")
    }

    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// What makes a message a redelivery: `(message id, kind)` in the worker's inbox. One
/// constructor per message type, used by the producer for the AMQP `message_id` and by the
/// worker for its inbox, so the two can never disagree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InboxKey {
    message_id: String,
    kind: String,
}

impl InboxKey {
    /// A webhook: Microsoft's operation id and the action (one operation may be announced
    /// under several actions).
    pub fn webhook(operation_id: Uuid, action: &str) -> Self {
        Self {
            message_id: operation_id.to_string(),
            kind: action.trim().to_string(),
        }
    }

    /// A landing-page resolution: the subscription and when its token was resolved (each
    /// visit is its own message; a redelivery of one is not).
    pub fn purchase_resolved(subscription_id: Uuid, resolved_at: OffsetDateTime) -> Self {
        Self {
            message_id: format!(
                "resolve:{subscription_id}:{}",
                resolved_at.unix_timestamp_nanos()
            ),
            kind: "purchase_resolved".into(),
        }
    }

    /// A publisher command: its id.
    pub fn command(command_id: Uuid) -> Self {
        Self {
            message_id: command_id.to_string(),
            kind: "command".into(),
        }
    }

    /// The AMQP `message_id` of the message (and the inbox's `message_id` column).
    pub fn message_id(&self) -> &str {
        &self.message_id
    }

    /// The AMQP `message_id`, for the [`MessageMeta`] of the message this key names.
    pub fn into_message_id(self) -> String {
        self.message_id
    }

    /// The inbox's `kind` column.
    pub fn kind(&self) -> &str {
        &self.kind
    }
}

impl std::fmt::Display for InboxKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message_id, self.kind)
    }
}

/// Properties every message carries besides its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageMeta {
    /// AMQP `message_id`: [`InboxKey::message_id`] of the message.
    pub message_id: String,
    /// AMQP `correlation_id`; also sent to Microsoft as `x-ms-correlationid`.
    pub correlation_id: String,
    /// W3C trace context of the request that produced the message (header `traceparent`).
    pub traceparent: Option<String>,
    /// Header `x-subscription-id`, when known.
    pub subscription_id: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_type_has_its_own_inbox_key() {
        let id = Uuid::from_u128(7);
        let webhook = InboxKey::webhook(id, " Renew ");
        assert_eq!(
            (webhook.message_id(), webhook.kind()),
            (id.to_string().as_str(), "Renew")
        );
        let command = InboxKey::command(id);
        assert_eq!(command.kind(), "command");
        assert_ne!(webhook, command, "one id, two message types: two keys");
        let at = OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(42);
        let resolved = InboxKey::purchase_resolved(id, at);
        assert_eq!(resolved.message_id(), format!("resolve:{id}:42"));
        assert_eq!(resolved.kind(), "purchase_resolved");
        assert_ne!(
            resolved,
            InboxKey::purchase_resolved(id, at + time::Duration::SECOND)
        );
    }

    #[test]
    fn a_webhook_keeps_its_body_byte_for_byte() {
        let body = r#"{"id":"x", "action":"Suspend","futureField":{"a":[1,2]}}"#;
        let message = InboundMessage::Webhook {
            received_at: OffsetDateTime::UNIX_EPOCH,
            payload: body.to_string(),
        };
        let back = InboundMessage::from_json(&message.to_json()).unwrap();
        match back {
            InboundMessage::Webhook { payload, .. } => assert_eq!(payload, body),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn commands_round_trip() {
        let message = InboundMessage::Command {
            command_id: Uuid::nil(),
            subscription_id: Uuid::nil(),
            command: PublisherCommand::ChangeQuantity { quantity: 7 },
            requested_by: "api".into(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
        };
        let json = String::from_utf8(message.to_json()).unwrap();
        assert!(json.contains(r#""type":"command""#), "{json}");
        assert!(
            json.contains(r#""kind":"change_quantity","quantity":7"#),
            "{json}"
        );
        assert!(matches!(
            InboundMessage::from_json(json.as_bytes()).unwrap(),
            InboundMessage::Command {
                command: PublisherCommand::ChangeQuantity { quantity: 7 },
                ..
            }
        ));
    }

    #[test]
    fn an_unknown_type_is_an_error_not_a_guess() {
        assert!(InboundMessage::from_json(br#"{"type":"mystery"}"#).is_err());
    }
}
