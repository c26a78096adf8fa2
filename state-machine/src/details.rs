//! What we know about a subscription (`Details`), what Microsoft reports (`Snapshot`),
//! and the names of our lifecycle states (`StateName`, §5.1 of marketplace-api.md).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ids::{OfferId, PlanId, Quantity, TenantId};

/// The lifecycle states, in Marketplace words (`PendingFulfillmentStart` is shortened).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StateName {
    /// Purchased, not yet activated.
    PendingFulfillment,
    /// Active and billed.
    Subscribed,
    /// Payment failed; 30-day grace period.
    Suspended,
    /// Terminal (P10: never resurrected).
    Unsubscribed,
}

impl StateName {
    /// Every state, in lifecycle order (used by the diagram).
    pub const ALL: [StateName; 4] = [
        StateName::PendingFulfillment,
        StateName::Subscribed,
        StateName::Suspended,
        StateName::Unsubscribed,
    ];

    /// The stable name used in logs, labels and the diagram.
    pub fn as_str(self) -> &'static str {
        match self {
            StateName::PendingFulfillment => "PendingFulfillment",
            StateName::Subscribed => "Subscribed",
            StateName::Suspended => "Suspended",
            StateName::Unsubscribed => "Unsubscribed",
        }
    }
}

impl fmt::Display for StateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that names no state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownStateName(pub String);

impl fmt::Display for UnknownStateName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown subscription state {:?}", self.0)
    }
}

impl std::error::Error for UnknownStateName {}

impl FromStr for StateName {
    type Err = UnknownStateName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StateName::ALL
            .into_iter()
            .find(|state| state.as_str() == s.trim())
            .ok_or_else(|| UnknownStateName(s.to_owned()))
    }
}

/// `saasSubscriptionStatus` as Microsoft sends it; unknown values are kept, not refused (P16).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum MarketplaceStatus {
    /// Legacy value, treated like `PendingFulfillmentStart` (§3.4).
    NotStarted,
    /// Purchased, waiting for activation.
    PendingFulfillmentStart,
    /// Active.
    Subscribed,
    /// Payment failed.
    Suspended,
    /// Cancelled (terminal).
    Unsubscribed,
    /// A value this version does not know.
    Unknown(String),
}

impl MarketplaceStatus {
    /// Never fails: unknown values become `Unknown`.
    pub fn parse(raw: &str) -> Self {
        match raw.trim() {
            "NotStarted" => Self::NotStarted,
            "PendingFulfillmentStart" => Self::PendingFulfillmentStart,
            "Subscribed" => Self::Subscribed,
            "Suspended" => Self::Suspended,
            "Unsubscribed" => Self::Unsubscribed,
            other => Self::Unknown(other.to_owned()),
        }
    }

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::NotStarted => "NotStarted",
            Self::PendingFulfillmentStart => "PendingFulfillmentStart",
            Self::Subscribed => "Subscribed",
            Self::Suspended => "Suspended",
            Self::Unsubscribed => "Unsubscribed",
            Self::Unknown(other) => other,
        }
    }

    /// Our state for this status; `None` for an unknown status.
    pub fn state(&self) -> Option<StateName> {
        match self {
            Self::NotStarted | Self::PendingFulfillmentStart => Some(StateName::PendingFulfillment),
            Self::Subscribed => Some(StateName::Subscribed),
            Self::Suspended => Some(StateName::Suspended),
            Self::Unsubscribed => Some(StateName::Unsubscribed),
            Self::Unknown(_) => None,
        }
    }
}

impl From<String> for MarketplaceStatus {
    fn from(raw: String) -> Self {
        Self::parse(&raw)
    }
}

impl From<MarketplaceStatus> for String {
    fn from(status: MarketplaceStatus) -> String {
        status.as_str().to_owned()
    }
}

impl fmt::Display for MarketplaceStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The current billing term (§3.3). Every field is optional: dates are absent while
/// pending and occasionally for per-seat plans (P15).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Term {
    /// `termUnit`, e.g. `P1M`, `P1Y` (kept as text: new units appear, §3.3).
    #[serde(default)]
    pub unit: Option<String>,
    /// `startDate`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub start: Option<OffsetDateTime>,
    /// `endDate`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub end: Option<OffsetDateTime>,
}

/// What we know about the subscription. Kept as state-local data in every state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Details {
    /// Offer id.
    #[serde(default)]
    pub offer_id: Option<OfferId>,
    /// Current plan.
    #[serde(default)]
    pub plan_id: Option<PlanId>,
    /// Current seats (per-seat plans only).
    #[serde(default)]
    pub quantity: Option<Quantity>,
    /// Current term.
    #[serde(default)]
    pub term: Option<Term>,
    /// Tenant that uses the subscription.
    #[serde(default)]
    pub beneficiary_tenant: Option<TenantId>,
    /// Tenant that bought it (differs for CSP purchases).
    #[serde(default)]
    pub purchaser_tenant: Option<TenantId>,
    /// Customer-chosen name.
    #[serde(default)]
    pub name: Option<String>,
}

impl Details {
    /// Whether we have seen the purchase at all (Resolve, GET or a webhook snapshot).
    pub fn is_known(&self) -> bool {
        self.plan_id.is_some()
    }

    /// Microsoft is authoritative for what it reports; fields it left out keep our value
    /// (minimal and lagging payloads, §6.2, P13, P15). The quantity belongs to the plan: a
    /// snapshot that names the plan and no quantity describes a plan without seats (a flat
    /// plan reports `null` or `""`), so the old seat count goes.
    pub fn merged_with(&self, snapshot: &Snapshot) -> Details {
        Details {
            offer_id: snapshot.offer_id.clone().or_else(|| self.offer_id.clone()),
            plan_id: snapshot.plan_id.clone().or_else(|| self.plan_id.clone()),
            quantity: match snapshot.plan_id {
                Some(_) => snapshot.quantity,
                None => snapshot.quantity.or(self.quantity),
            },
            term: snapshot.term.clone().or_else(|| self.term.clone()),
            beneficiary_tenant: snapshot.beneficiary_tenant.or(self.beneficiary_tenant),
            purchaser_tenant: snapshot.purchaser_tenant.or(self.purchaser_tenant),
            name: snapshot.name.clone().or_else(|| self.name.clone()),
        }
    }
}

/// What Microsoft says about the subscription (Resolve, GET, List, webhook `subscription`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// `saasSubscriptionStatus`.
    pub status: MarketplaceStatus,
    /// `offerId`.
    #[serde(default)]
    pub offer_id: Option<OfferId>,
    /// `planId`.
    #[serde(default)]
    pub plan_id: Option<PlanId>,
    /// `quantity`.
    #[serde(default)]
    pub quantity: Option<Quantity>,
    /// `term`.
    #[serde(default)]
    pub term: Option<Term>,
    /// `beneficiary.tenantId`.
    #[serde(default)]
    pub beneficiary_tenant: Option<TenantId>,
    /// `purchaser.tenantId`.
    #[serde(default)]
    pub purchaser_tenant: Option<TenantId>,
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
}

impl Snapshot {
    /// A snapshot with only a status; fill the rest with struct update syntax.
    pub fn with_status(status: MarketplaceStatus) -> Self {
        Snapshot {
            status,
            offer_id: None,
            plan_id: None,
            quantity: None,
            term: None,
            beneficiary_tenant: None,
            purchaser_tenant: None,
            name: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_round_trip_through_from_str() {
        for state in StateName::ALL {
            assert_eq!(state.as_str().parse::<StateName>().unwrap(), state);
            assert_eq!(state.to_string(), state.as_str());
        }
        assert!("Active".parse::<StateName>().is_err());
    }

    #[test]
    fn not_started_is_treated_as_pending() {
        assert_eq!(
            MarketplaceStatus::parse(" NotStarted ").state(),
            Some(StateName::PendingFulfillment)
        );
        assert_eq!(MarketplaceStatus::parse("Paused").state(), None);
        assert_eq!(MarketplaceStatus::parse("Paused").as_str(), "Paused");
    }

    #[test]
    fn a_snapshot_naming_a_plan_without_seats_clears_the_old_seat_count() {
        let ours = Details {
            plan_id: Some(PlanId::parse("per-seat").unwrap()),
            quantity: Some(Quantity::new(8).unwrap()),
            ..Details::default()
        };
        let flat = Snapshot {
            plan_id: Some(PlanId::parse("gold").unwrap()),
            ..Snapshot::with_status(MarketplaceStatus::Subscribed)
        };
        assert_eq!(ours.merged_with(&flat).quantity, None);
        // A minimal payload that names no plan says nothing about seats: ours stay.
        let minimal = Snapshot::with_status(MarketplaceStatus::Subscribed);
        assert_eq!(ours.merged_with(&minimal).quantity, ours.quantity);
    }

    #[test]
    fn merging_keeps_fields_the_snapshot_left_out() {
        let ours = Details {
            plan_id: Some(PlanId::parse("gold").unwrap()),
            name: Some("ours".into()),
            ..Details::default()
        };
        let snapshot = Snapshot {
            quantity: Some(Quantity::new(3).unwrap()),
            name: Some("theirs".into()),
            ..Snapshot::with_status(MarketplaceStatus::Subscribed)
        };
        let merged = ours.merged_with(&snapshot);
        assert_eq!(merged.plan_id, ours.plan_id);
        assert_eq!(merged.quantity, Some(Quantity::new(3).unwrap()));
        assert_eq!(merged.name.as_deref(), Some("theirs"));
    }
}
