//! What we know about a subscription (`Details`), what Microsoft reports (`Snapshot`),
//! and the names of our lifecycle states (`StateName`, §5.1 of docs/marketplace.md).

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
    /// Trims and ignores ASCII case, like the client's wire enums; never fails: unknown
    /// values become `Unknown`.
    pub fn parse(raw: &str) -> Self {
        let raw = raw.trim();
        [
            Self::NotStarted,
            Self::PendingFulfillmentStart,
            Self::Subscribed,
            Self::Suspended,
            Self::Unsubscribed,
        ]
        .into_iter()
        .find(|known| known.as_str().eq_ignore_ascii_case(raw))
        .unwrap_or_else(|| Self::Unknown(raw.to_owned()))
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
    /// `termUnit`, e.g. `P1M`, `P1Y`, `PAY`, `P18M`: kept as text, because units outside
    /// the spec appear live (§15.3); [`Term::length`] reads it where it is a duration.
    #[serde(default)]
    pub unit: Option<String>,
    /// `chargeDuration`: how often a multi-year term is billed (spec 2025), kept as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub charge_duration: Option<String>,
    /// `startDate`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub start: Option<OffsetDateTime>,
    /// `endDate`.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub end: Option<OffsetDateTime>,
    /// The subscription's `autoRenew`: `Some(false)` means the term ends at `endDate`
    /// (§3.1, §5.5), which is what the `term_ending` notices announce.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_renew: Option<bool>,
}

impl Term {
    /// The term unit as an ISO-8601 duration, where it is one (`P1M`, `P5Y`, `P18M`,
    /// `P1Y6M`, `P30D`). `None` for `PAY`, an absent unit and anything else: such a unit
    /// is only shown, never refused (§15.3).
    pub fn length(&self) -> Option<TermLength> {
        self.unit.as_deref().and_then(TermLength::parse)
    }
}

/// A term unit read as an ISO-8601 duration of years, months and days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermLength {
    /// Whole months (years count 12).
    pub months: u32,
    /// Days on top.
    pub days: u32,
}

impl TermLength {
    /// `P[nY][nM][nD]`, designators in that order, at least one, ASCII case ignored.
    pub fn parse(raw: &str) -> Option<TermLength> {
        let raw = raw.trim().to_ascii_uppercase();
        let rest = raw.strip_prefix('P')?;
        let (mut months, mut days, mut last) = (0u32, 0u32, 0u8);
        let mut number = String::new();
        for c in rest.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let n: u32 = number.parse().ok()?;
            number.clear();
            let rank = match c {
                'Y' => 1,
                'M' => 2,
                'D' => 3,
                _ => return None,
            };
            if rank <= last {
                return None;
            }
            last = rank;
            match c {
                'Y' => months = months.checked_add(n.checked_mul(12)?)?,
                'M' => months = months.checked_add(n)?,
                _ => days = days.checked_add(n)?,
            }
        }
        (last > 0 && number.is_empty()).then_some(TermLength { months, days })
    }
}

/// An Entra identity of the purchase (§3.2): who uses it or who bought it. Every part may
/// be missing or `null` (`emailId` and `puid` are, for some purchases, §15.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Party {
    /// `tenantId`.
    #[serde(default)]
    pub tenant_id: Option<TenantId>,
    /// `objectId`.
    #[serde(default)]
    pub object_id: Option<uuid::Uuid>,
    /// `emailId`.
    #[serde(default)]
    pub email: Option<String>,
}

/// `allowedCustomerOperations`: what the beneficiary, and so the publisher's site, may do
/// (§3.1). CSP purchases allow only `Read`, and Microsoft answers 400 to our PATCH or
/// DELETE of them (§10.2), so such commands are refused here first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AllowedOperations(Vec<String>);

impl AllowedOperations {
    /// The list as Microsoft sent it (trimmed).
    pub fn new(operations: impl IntoIterator<Item = impl Into<String>>) -> Self {
        Self(
            operations
                .into_iter()
                .map(|o| o.into().trim().to_owned())
                .collect(),
        )
    }

    /// Whether `operation` (`Update`, `Delete`) is allowed. An empty list says nothing
    /// (a minimal payload), so it allows everything; only a list without it forbids it.
    pub fn allows(&self, operation: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|o| o.eq_ignore_ascii_case(operation))
    }

    /// The operations, as sent.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
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
    /// Who uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beneficiary: Option<Party>,
    /// Who bought it (a CSP or a multiparty private offer's partner: not the beneficiary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchaser: Option<Party>,
    /// The private offer the purchase came through (`sourceOffers[].externalId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_offer_id: Option<String>,
    /// `allowedCustomerOperations`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_operations: Option<AllowedOperations>,
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
            beneficiary: snapshot
                .beneficiary
                .clone()
                .or_else(|| self.beneficiary.clone()),
            purchaser: snapshot
                .purchaser
                .clone()
                .or_else(|| self.purchaser.clone()),
            private_offer_id: snapshot
                .private_offer_id
                .clone()
                .or_else(|| self.private_offer_id.clone()),
            allowed_operations: snapshot
                .allowed_operations
                .clone()
                .or_else(|| self.allowed_operations.clone()),
        }
    }

    /// Why Microsoft would refuse our `operation` (`Update`, `Delete`) on this subscription,
    /// if `allowedCustomerOperations` does not list it (§10.2, §15.4).
    pub fn forbids(&self, operation: &str) -> Option<String> {
        let allowed = self.allowed_operations.as_ref()?;
        (!allowed.allows(operation)).then(|| {
            format!(
                "allowedCustomerOperations is [{}]: Microsoft allows no {operation} of this \
                 subscription (a CSP purchase is changed by the CSP)",
                allowed.as_slice().join(", ")
            )
        })
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
    /// `beneficiary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beneficiary: Option<Party>,
    /// `purchaser`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purchaser: Option<Party>,
    /// `sourceOffers[].externalId` of the purchased plan, when read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_offer_id: Option<String>,
    /// `allowedCustomerOperations`, when sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_operations: Option<AllowedOperations>,
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
            beneficiary: None,
            purchaser: None,
            private_offer_id: None,
            allowed_operations: None,
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
        assert_eq!(
            MarketplaceStatus::parse("subscribed"),
            MarketplaceStatus::Subscribed
        );
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
    fn term_units_read_as_iso_durations_where_they_are_ones() {
        let length = |unit: &str| {
            Term {
                unit: Some(unit.into()),
                ..Term::default()
            }
            .length()
        };
        assert_eq!(length("P1M"), Some(TermLength { months: 1, days: 0 }));
        assert_eq!(
            length("P5Y"),
            Some(TermLength {
                months: 60,
                days: 0
            })
        );
        assert_eq!(
            length("P18M"),
            Some(TermLength {
                months: 18,
                days: 0
            })
        );
        assert_eq!(
            length("p1y6m"),
            Some(TermLength {
                months: 18,
                days: 0
            })
        );
        assert_eq!(
            length("P30D"),
            Some(TermLength {
                months: 0,
                days: 30
            })
        );
        for not_a_duration in ["PAY", "P", "P1", "P1M1Y", "P1H", "18M", ""] {
            assert_eq!(length(not_a_duration), None, "{not_a_duration}");
        }
        assert_eq!(Term::default().length(), None);
    }

    #[test]
    fn only_a_list_without_the_operation_forbids_it() {
        let csp = Details {
            allowed_operations: Some(AllowedOperations::new(["Read"])),
            ..Details::default()
        };
        assert!(csp.forbids("Update").unwrap().contains("[Read]"));
        assert!(csp.forbids("Delete").is_some());
        let direct = Details {
            allowed_operations: Some(AllowedOperations::new(["read", "update", "delete"])),
            ..Details::default()
        };
        assert_eq!(direct.forbids("Update"), None);
        assert_eq!(Details::default().forbids("Delete"), None);
        let silent = Details {
            allowed_operations: Some(AllowedOperations::new(Vec::<String>::new())),
            ..Details::default()
        };
        assert_eq!(silent.forbids("Delete"), None);
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
