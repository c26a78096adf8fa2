//! Value types parsed once at the edge (style principle 3: parse, don't validate).
//!
//! Every identifier the machine handles has exactly one fallible constructor, so a
//! `SubscriptionId` inside the machine is always a GUID and a `Quantity` is never 0.
//! Serde goes through the same constructor (`try_from`), so a stored machine cannot
//! smuggle in an invalid value either.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A value that failed to parse; names the field so the caller can report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId {
    /// The field that was being parsed (e.g. `subscription_id`).
    pub field: &'static str,
    /// Why it was refused.
    pub reason: String,
}

impl InvalidId {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for InvalidId {}

macro_rules! guid_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Uuid);

        impl $name {
            /// Parses a GUID, tolerating surrounding whitespace (Microsoft payloads and
            /// copy-pasted operator input both carry it).
            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                let trimmed = raw.trim();
                if trimmed.is_empty() {
                    return Err(InvalidId::new($field, "empty"));
                }
                Uuid::try_parse(trimmed)
                    .map(Self)
                    .map_err(|e| InvalidId::new($field, format!("not a GUID ({e}): {trimmed:?}")))
            }

            /// The underlying GUID.
            pub fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        /// A `Uuid` is already parsed, so this conversion cannot fail.
        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }
    };
}

guid_newtype!(
    /// The SaaS subscription id (`subscriptionId`): stable forever, the metering `resourceId`.
    SubscriptionId,
    "subscription_id"
);
guid_newtype!(
    /// A marketplace operation id (webhook `id`, Operation-Location tail).
    OperationId,
    "operation_id"
);
guid_newtype!(
    /// Our own id for a publisher command (idempotency key for ISV/operator requests).
    CommandId,
    "command_id"
);
guid_newtype!(
    /// An Entra ID tenant (beneficiary or purchaser).
    TenantId,
    "tenant_id"
);

/// Longest plan/offer id we accept; Partner Center ids are far shorter, this only
/// bounds what a hostile payload can make us store.
const MAX_NAME_LEN: usize = 256;

macro_rules! name_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Trims, then requires 1..=256 characters and no control character.
            pub fn parse(raw: &str) -> Result<Self, InvalidId> {
                let trimmed = raw.trim();
                if trimmed.is_empty() {
                    return Err(InvalidId::new($field, "empty"));
                }
                // Partner Center ids are short printable names; a NUL could not even be
                // stored (PostgreSQL text and jsonb refuse it).
                if trimmed.chars().any(char::is_control) {
                    return Err(InvalidId::new($field, "contains a control character"));
                }
                if trimmed.chars().count() > MAX_NAME_LEN {
                    return Err(InvalidId::new(
                        $field,
                        format!("longer than {MAX_NAME_LEN} characters"),
                    ));
                }
                Ok(Self(trimmed.to_owned()))
            }

            /// The id as Microsoft spells it.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

name_newtype!(
    /// A plan id (`planId`) of the offer.
    PlanId,
    "plan_id"
);
name_newtype!(
    /// An offer id (`offerId`); preview purchases carry a `-preview` suffix (P14).
    OfferId,
    "offer_id"
);

/// A seat count. Zero seats is not a subscription, so it is refused at the edge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Quantity(u32);

impl Quantity {
    /// At least 1.
    pub fn new(seats: u32) -> Result<Self, InvalidId> {
        if seats == 0 {
            return Err(InvalidId::new("quantity", "must be at least 1"));
        }
        Ok(Self(seats))
    }

    /// The number of seats.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u32> for Quantity {
    type Error = InvalidId;
    fn try_from(seats: u32) -> Result<Self, Self::Error> {
        Self::new(seats)
    }
}

impl From<Quantity> for u32 {
    fn from(q: Quantity) -> u32 {
        q.0
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUID: &str = "8a9e6c5d-4b3a-4f2e-9d1c-0b7a6e5d4c3b";

    #[test]
    fn guid_ids_accept_surrounding_whitespace() {
        let id = SubscriptionId::parse(&format!("  {GUID}\n")).unwrap();
        assert_eq!(id.to_string(), GUID);
        assert_eq!(OperationId::parse(GUID).unwrap().to_string(), GUID);
        assert_eq!(CommandId::parse(GUID).unwrap().to_string(), GUID);
        assert_eq!(TenantId::parse(GUID).unwrap().to_string(), GUID);
    }

    #[test]
    fn guid_ids_accept_uppercase_and_print_lowercase() {
        let id = TenantId::parse(&GUID.to_uppercase()).unwrap();
        assert_eq!(id.to_string(), GUID);
    }

    #[test]
    fn guid_ids_reject_empty_and_garbage_naming_the_field() {
        let empty = SubscriptionId::parse("   ").unwrap_err();
        assert_eq!(empty.field, "subscription_id");
        let garbage = OperationId::parse("not-a-guid").unwrap_err();
        assert_eq!(garbage.field, "operation_id");
        assert!(garbage.to_string().starts_with("invalid operation_id"));
        assert!(CommandId::parse("8a9e6c5d-4b3a-4f2e-9d1c").is_err());
    }

    #[test]
    fn guid_ids_serialize_as_plain_strings_and_refuse_garbage() {
        let id = SubscriptionId::parse(GUID).unwrap();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{GUID}\""));
        assert_eq!(serde_json::from_str::<SubscriptionId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<SubscriptionId>("\"nope\"").is_err());
    }

    #[test]
    fn plan_ids_are_trimmed_and_bounded() {
        assert_eq!(PlanId::parse("  gold \t").unwrap().as_str(), "gold");
        assert_eq!(PlanId::parse("").unwrap_err().field, "plan_id");
        assert_eq!(OfferId::parse("   ").unwrap_err().field, "offer_id");
        assert!(PlanId::parse(&"x".repeat(256)).is_ok());
        assert!(PlanId::parse(&"x".repeat(257)).is_err());
        assert!(serde_json::from_str::<PlanId>("\"  \"").is_err());
        assert_eq!(
            serde_json::to_string(&OfferId::parse("saas-preview").unwrap()).unwrap(),
            "\"saas-preview\""
        );
    }

    #[test]
    fn plan_and_offer_ids_refuse_control_characters() {
        assert_eq!(
            PlanId::parse("gold\u{0}").unwrap_err().reason,
            "contains a control character"
        );
        assert!(OfferId::parse("contoso\u{1b}[31m").is_err());
        assert!(serde_json::from_str::<PlanId>(r#""go\u0000ld""#).is_err());
        assert!(PlanId::parse("plan-ü_1").is_ok());
    }

    #[test]
    fn quantity_rejects_zero() {
        assert_eq!(Quantity::new(0).unwrap_err().field, "quantity");
        assert_eq!(Quantity::new(1).unwrap().get(), 1);
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert_eq!(serde_json::from_str::<Quantity>("7").unwrap().get(), 7);
        assert_eq!(
            serde_json::to_string(&Quantity::new(7).unwrap()).unwrap(),
            "7"
        );
    }
}
