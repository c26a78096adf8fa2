//! Inputs of the machine: everything that can happen to a subscription, already parsed
//! into domain types (wire DTOs become `Event`s at the edge, style principle 3).
//!
//! Each event carries the ids needed for its idempotency key (`Event::key`), because
//! Microsoft retries webhooks up to 500 times (P9) and our own queue is at-least-once.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::details::{Snapshot, Term};
use crate::ids::{CommandId, OperationId, PlanId, Quantity};

/// Something that happened to the subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// A verified webhook call from Microsoft (§6).
    Webhook(Webhook),
    /// The landing page resolved a purchase token (§4.1).
    PurchaseResolved {
        /// What Resolve returned.
        snapshot: Snapshot,
        /// When we resolved it (our clock; orders observations).
        #[serde(with = "time::serde::rfc3339")]
        resolved_at: OffsetDateTime,
    },
    /// The ISV/operator asks to activate (manual mode, or a retry after a failure).
    ActivationRequested {
        /// Idempotency key of the request.
        command_id: CommandId,
    },
    /// Activate returned 200 and GET shows `Subscribed` (P4: 200 alone is not enough).
    ActivationConfirmed {
        /// The term GET reported, if any.
        #[serde(default)]
        term: Option<Term>,
        /// When the confirmation was observed.
        #[serde(with = "time::serde::rfc3339")]
        confirmed_at: OffsetDateTime,
    },
    /// Activate failed permanently.
    ActivationFailed {
        /// What went wrong.
        reason: String,
        /// When.
        #[serde(with = "time::serde::rfc3339")]
        failed_at: OffsetDateTime,
    },
    /// The ISV/operator asks us to change the subscription at Microsoft.
    PublisherCommand {
        /// Idempotency key of the request.
        command_id: CommandId,
        /// What to do.
        command: Command,
    },
    /// Microsoft answered 202 + Operation-Location to our PATCH/DELETE (§7.2).
    PublisherOperationAccepted {
        /// The command this answers.
        command_id: CommandId,
        /// The operation Microsoft created.
        operation_id: OperationId,
        /// The Operation-Location URL to poll.
        location: String,
        /// The 202's `Retry-After`: the first poll waits this long, and no poll comes
        /// sooner than this after the last (§15.1).
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// Microsoft answered 4xx to our PATCH/DELETE (e.g. P11 lock, P22 CSP).
    PublisherOperationRefused {
        /// The command this answers.
        command_id: CommandId,
        /// Microsoft's error.
        reason: String,
    },
    /// How our PATCH/DELETE ended when its 202 never reached us (a timeout, a reset or a
    /// 5xx after the request left): learned by following the subscription with GET, since
    /// List operations never lists our own operations (§15.2). The operation id is unknown.
    PublisherOperationConcluded {
        /// The command this answers.
        command_id: CommandId,
        /// How it ended at Microsoft.
        status: OperationStatus,
        /// What showed it.
        reason: String,
    },
    /// The final status of a polled publisher operation.
    OperationResult {
        /// The operation.
        operation_id: OperationId,
        /// Its final status.
        status: OperationStatus,
    },
    /// A GET subscription / List result (confirmation and reconciliation).
    Observed {
        /// What Microsoft reported.
        snapshot: Snapshot,
        /// When we read it (our clock; orders observations).
        #[serde(with = "time::serde::rfc3339")]
        observed_at: OffsetDateTime,
    },
}

/// A webhook call (§6.2). Only `id` and `action` are guaranteed; the rest is optional
/// because minimal 2019–2021 payloads still arrive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Webhook {
    /// `id`: the operation id, half of the dedupe key.
    pub operation_id: OperationId,
    /// `action`.
    pub action: WebhookAction,
    /// `operationRequestSource`.
    pub source: RequestSource,
    /// `timeStamp`: orders webhooks (P10).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub timestamp: Option<OffsetDateTime>,
    /// `planId`: the **target** plan for ChangePlan.
    #[serde(default)]
    pub plan_id: Option<PlanId>,
    /// `quantity`: the **target** quantity for ChangeQuantity.
    #[serde(default)]
    pub quantity: Option<Quantity>,
    /// `subscription`: may lag behind the action (P13).
    #[serde(default)]
    pub subscription: Option<Snapshot>,
}

/// The webhook `action`. Unknown values are kept (P9: never fail on them).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum WebhookAction {
    /// Auto-activation at checkout (2026).
    Subscribe,
    /// Plan change (target in `planId`).
    ChangePlan,
    /// Seat change (target in `quantity`).
    ChangeQuantity,
    /// Term rolled over.
    Renew,
    /// Payment failed.
    Suspend,
    /// Payment fixed within the grace period.
    Reinstate,
    /// Cancelled.
    Unsubscribe,
    /// Anything else (`Transfer`, future actions).
    Unknown(String),
}

impl WebhookAction {
    /// Every action but [`Self::Unknown`].
    pub const KNOWN: [WebhookAction; 7] = [
        Self::Subscribe,
        Self::ChangePlan,
        Self::ChangeQuantity,
        Self::Renew,
        Self::Suspend,
        Self::Reinstate,
        Self::Unsubscribe,
    ];

    /// Trims and ignores ASCII case, like the client's wire enums; never fails.
    pub fn parse(raw: &str) -> Self {
        let raw = raw.trim();
        Self::KNOWN
            .into_iter()
            .find(|known| known.as_str().eq_ignore_ascii_case(raw))
            .unwrap_or_else(|| Self::Unknown(raw.to_owned()))
    }

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Subscribe => "Subscribe",
            Self::ChangePlan => "ChangePlan",
            Self::ChangeQuantity => "ChangeQuantity",
            Self::Renew => "Renew",
            Self::Suspend => "Suspend",
            Self::Reinstate => "Reinstate",
            Self::Unsubscribe => "Unsubscribe",
            Self::Unknown(other) => other,
        }
    }
}

impl From<String> for WebhookAction {
    fn from(raw: String) -> Self {
        Self::parse(&raw)
    }
}

impl From<WebhookAction> for String {
    fn from(action: WebhookAction) -> String {
        action.as_str().to_owned()
    }
}

impl fmt::Display for WebhookAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `operationRequestSource`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum RequestSource {
    /// Initiated on the Microsoft side (customer, CSP, billing).
    Azure,
    /// Initiated by us through the API (P18: never ACK these).
    Partner,
    /// Absent or unrecognised.
    Unknown(String),
}

impl RequestSource {
    /// Trims and ignores ASCII case, like the client's wire enums; never fails.
    pub fn parse(raw: &str) -> Self {
        let raw = raw.trim();
        [Self::Azure, Self::Partner]
            .into_iter()
            .find(|known| known.as_str().eq_ignore_ascii_case(raw))
            .unwrap_or_else(|| Self::Unknown(raw.to_owned()))
    }

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Azure => "Azure",
            Self::Partner => "Partner",
            Self::Unknown(other) => other,
        }
    }
}

impl From<String> for RequestSource {
    fn from(raw: String) -> Self {
        Self::parse(&raw)
    }
}

impl From<RequestSource> for String {
    fn from(source: RequestSource) -> String {
        source.as_str().to_owned()
    }
}

impl fmt::Display for RequestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A change the ISV/operator wants Microsoft to make (§4.6–4.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// PATCH planId.
    ChangePlan {
        /// Target plan.
        plan_id: PlanId,
    },
    /// PATCH quantity.
    ChangeQuantity {
        /// Target seats.
        quantity: Quantity,
    },
    /// DELETE the subscription.
    Cancel,
}

/// Final status of a polled operation (§7.1); `NotStarted`/`InProgress` are not final
/// and never become events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OperationStatus {
    /// Done.
    Succeeded,
    /// Failed at Microsoft.
    Failed,
    /// Conflicted with another operation (P11).
    Conflict,
}

impl OperationStatus {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Conflict => "Conflict",
        }
    }
}

impl fmt::Display for OperationStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of an event without its data: diagram edge labels and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum EventKind {
    /// Webhook `Subscribe`.
    WebhookSubscribe,
    /// Webhook `ChangePlan`.
    WebhookChangePlan,
    /// Webhook `ChangeQuantity`.
    WebhookChangeQuantity,
    /// Webhook `Renew`.
    WebhookRenew,
    /// Webhook `Suspend`.
    WebhookSuspend,
    /// Webhook `Reinstate`.
    WebhookReinstate,
    /// Webhook `Unsubscribe`.
    WebhookUnsubscribe,
    /// Webhook with an unknown action.
    WebhookUnknown,
    /// [`Event::PurchaseResolved`].
    PurchaseResolved,
    /// [`Event::ActivationRequested`].
    ActivationRequested,
    /// [`Event::ActivationConfirmed`].
    ActivationConfirmed,
    /// [`Event::ActivationFailed`].
    ActivationFailed,
    /// [`Event::PublisherCommand`] with [`Command::ChangePlan`].
    PublisherChangePlan,
    /// [`Event::PublisherCommand`] with [`Command::ChangeQuantity`].
    PublisherChangeQuantity,
    /// [`Event::PublisherCommand`] with [`Command::Cancel`].
    PublisherCancel,
    /// [`Event::PublisherOperationAccepted`].
    PublisherOperationAccepted,
    /// [`Event::PublisherOperationRefused`].
    PublisherOperationRefused,
    /// [`Event::PublisherOperationConcluded`].
    PublisherOperationConcluded,
    /// [`Event::OperationResult`].
    OperationResult,
    /// [`Event::Observed`].
    Observed,
}

impl EventKind {
    /// Every kind, in a stable order (diagram labels follow it).
    pub const ALL: [EventKind; 20] = [
        EventKind::WebhookSubscribe,
        EventKind::WebhookChangePlan,
        EventKind::WebhookChangeQuantity,
        EventKind::WebhookRenew,
        EventKind::WebhookSuspend,
        EventKind::WebhookReinstate,
        EventKind::WebhookUnsubscribe,
        EventKind::WebhookUnknown,
        EventKind::PurchaseResolved,
        EventKind::ActivationRequested,
        EventKind::ActivationConfirmed,
        EventKind::ActivationFailed,
        EventKind::PublisherChangePlan,
        EventKind::PublisherChangeQuantity,
        EventKind::PublisherCancel,
        EventKind::PublisherOperationAccepted,
        EventKind::PublisherOperationRefused,
        EventKind::PublisherOperationConcluded,
        EventKind::OperationResult,
        EventKind::Observed,
    ];

    /// The stable label.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::WebhookSubscribe => "WebhookSubscribe",
            EventKind::WebhookChangePlan => "WebhookChangePlan",
            EventKind::WebhookChangeQuantity => "WebhookChangeQuantity",
            EventKind::WebhookRenew => "WebhookRenew",
            EventKind::WebhookSuspend => "WebhookSuspend",
            EventKind::WebhookReinstate => "WebhookReinstate",
            EventKind::WebhookUnsubscribe => "WebhookUnsubscribe",
            EventKind::WebhookUnknown => "WebhookUnknown",
            EventKind::PurchaseResolved => "PurchaseResolved",
            EventKind::ActivationRequested => "ActivationRequested",
            EventKind::ActivationConfirmed => "ActivationConfirmed",
            EventKind::ActivationFailed => "ActivationFailed",
            EventKind::PublisherChangePlan => "PublisherChangePlan",
            EventKind::PublisherChangeQuantity => "PublisherChangeQuantity",
            EventKind::PublisherCancel => "PublisherCancel",
            EventKind::PublisherOperationAccepted => "PublisherOperationAccepted",
            EventKind::PublisherOperationRefused => "PublisherOperationRefused",
            EventKind::PublisherOperationConcluded => "PublisherOperationConcluded",
            EventKind::OperationResult => "OperationResult",
            EventKind::Observed => "Observed",
        }
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Event {
    /// The idempotency key: the same key twice is the same event (P9). Webhooks dedupe
    /// on (`id`, `action`) as §6.5 says; our own events on their command/operation ids or
    /// on the instant of the observation.
    pub fn key(&self) -> String {
        match self {
            Event::Webhook(w) => format!("webhook:{}:{}", w.operation_id, w.action),
            Event::PurchaseResolved { resolved_at, .. } => {
                format!("purchase-resolved:{}", resolved_at.unix_timestamp_nanos())
            }
            Event::ActivationRequested { command_id } => {
                format!("activation-requested:{command_id}")
            }
            Event::ActivationConfirmed { confirmed_at, .. } => {
                format!(
                    "activation-confirmed:{}",
                    confirmed_at.unix_timestamp_nanos()
                )
            }
            Event::ActivationFailed { failed_at, .. } => {
                format!("activation-failed:{}", failed_at.unix_timestamp_nanos())
            }
            Event::PublisherCommand { command_id, .. } => format!("command:{command_id}"),
            Event::PublisherOperationAccepted {
                command_id,
                operation_id,
                ..
            } => format!("command-accepted:{command_id}:{operation_id}"),
            Event::PublisherOperationRefused { command_id, .. } => {
                format!("command-refused:{command_id}")
            }
            Event::PublisherOperationConcluded {
                command_id, status, ..
            } => format!("command-concluded:{command_id}:{status}"),
            Event::OperationResult {
                operation_id,
                status,
            } => format!("operation-result:{operation_id}:{status}"),
            Event::Observed { observed_at, .. } => {
                format!("observed:{}", observed_at.unix_timestamp_nanos())
            }
        }
    }

    /// The kind, for labels and the diagram.
    pub fn kind(&self) -> EventKind {
        match self {
            Event::Webhook(w) => match w.action {
                WebhookAction::Subscribe => EventKind::WebhookSubscribe,
                WebhookAction::ChangePlan => EventKind::WebhookChangePlan,
                WebhookAction::ChangeQuantity => EventKind::WebhookChangeQuantity,
                WebhookAction::Renew => EventKind::WebhookRenew,
                WebhookAction::Suspend => EventKind::WebhookSuspend,
                WebhookAction::Reinstate => EventKind::WebhookReinstate,
                WebhookAction::Unsubscribe => EventKind::WebhookUnsubscribe,
                WebhookAction::Unknown(_) => EventKind::WebhookUnknown,
            },
            Event::PurchaseResolved { .. } => EventKind::PurchaseResolved,
            Event::ActivationRequested { .. } => EventKind::ActivationRequested,
            Event::ActivationConfirmed { .. } => EventKind::ActivationConfirmed,
            Event::ActivationFailed { .. } => EventKind::ActivationFailed,
            Event::PublisherCommand { command, .. } => match command {
                Command::ChangePlan { .. } => EventKind::PublisherChangePlan,
                Command::ChangeQuantity { .. } => EventKind::PublisherChangeQuantity,
                Command::Cancel => EventKind::PublisherCancel,
            },
            Event::PublisherOperationAccepted { .. } => EventKind::PublisherOperationAccepted,
            Event::PublisherOperationRefused { .. } => EventKind::PublisherOperationRefused,
            Event::PublisherOperationConcluded { .. } => EventKind::PublisherOperationConcluded,
            Event::OperationResult { .. } => EventKind::OperationResult,
            Event::Observed { .. } => EventKind::Observed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webhook_actions_parse_leniently() {
        assert_eq!(
            WebhookAction::parse(" ChangePlan "),
            WebhookAction::ChangePlan
        );
        assert_eq!(
            WebhookAction::parse("Transfer"),
            WebhookAction::Unknown("Transfer".into())
        );
        assert_eq!(WebhookAction::parse("Transfer").as_str(), "Transfer");
        assert_eq!(RequestSource::parse("Partner"), RequestSource::Partner);
        // Case as the client's parsers: Microsoft's casing has not always been stable.
        assert_eq!(WebhookAction::parse("subscribe"), WebhookAction::Subscribe);
        assert_eq!(
            WebhookAction::parse(" CHANGEQUANTITY"),
            WebhookAction::ChangeQuantity
        );
        assert_eq!(RequestSource::parse("azure "), RequestSource::Azure);
        assert_eq!(
            WebhookAction::parse("transfer").as_str(),
            "transfer",
            "unknown actions are kept as sent"
        );
        assert_eq!(
            RequestSource::parse(""),
            RequestSource::Unknown(String::new())
        );
    }

    #[test]
    fn webhook_key_is_operation_id_and_action() {
        let op = OperationId::parse("11111111-2222-3333-4444-555555555555").unwrap();
        let event = Event::Webhook(Webhook {
            operation_id: op,
            action: WebhookAction::Suspend,
            source: RequestSource::Azure,
            timestamp: None,
            plan_id: None,
            quantity: None,
            subscription: None,
        });
        assert_eq!(
            event.key(),
            "webhook:11111111-2222-3333-4444-555555555555:Suspend"
        );
        assert_eq!(event.kind(), EventKind::WebhookSuspend);
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
    }

    #[test]
    fn event_kind_labels_are_unique() {
        let mut labels: Vec<_> = EventKind::ALL.iter().map(|k| k.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), EventKind::ALL.len());
    }
}
