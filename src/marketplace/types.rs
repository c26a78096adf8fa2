//! Wire DTOs of the SaaS Fulfillment API v2 and the Metering API, parsed leniently
//! (docs/marketplace.md §1.5, pitfalls P15/P16).
//!
//! These types describe what Microsoft sends, not what we believe: unknown fields are
//! ignored, unknown enum values land in `Unknown(String)`, enum strings are trimmed,
//! `quantity` accepts a number, a numeric string, `""` or null, and an unparseable timestamp
//! becomes `None` instead of failing the response. Domain types are built from these with
//! `TryFrom` elsewhere; only the subscription and operation `id`s are required here, because
//! nothing can be done with a record that has none.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

/// Declares a wire enum with a trimmed, case-insensitive parser and an `Unknown` catch-all.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($(#[$vmeta:meta])* $variant:ident => $wire:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
            /// A value this client does not know (trimmed), kept so it can be logged.
            Unknown(String),
        }

        impl $name {
            /// Parses a wire value: surrounding whitespace and ASCII case are ignored.
            pub fn parse(value: &str) -> Self {
                let value = value.trim();
                $(if value.eq_ignore_ascii_case($wire) {
                    return Self::$variant;
                })+
                Self::Unknown(value.to_owned())
            }

            /// The wire spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)+
                    Self::Unknown(other) => other,
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl From<&str> for $name {
            fn from(value: &str) -> Self {
                Self::parse(value)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                Ok(match Value::deserialize(deserializer)? {
                    Value::String(s) => Self::parse(&s),
                    other => Self::Unknown(other.to_string()),
                })
            }
        }
    };
}

wire_enum! {
    /// `saasSubscriptionStatus` (§3.4).
    SubscriptionStatus {
        /// In the spec and 2019 docs only; treat like `PendingFulfillmentStart`.
        NotStarted => "NotStarted",
        PendingFulfillmentStart => "PendingFulfillmentStart",
        Subscribed => "Subscribed",
        Suspended => "Suspended",
        /// Terminal: never resurrect (P10).
        Unsubscribed => "Unsubscribed",
    }
}

wire_enum! {
    /// Operation `status` (§7.1). The acknowledgement body uses other words, see
    /// [`UpdateOperationStatus`] (P6).
    OperationStatus {
        NotStarted => "NotStarted",
        InProgress => "InProgress",
        Succeeded => "Succeeded",
        Failed => "Failed",
        /// The requested plan/quantity equals the current one, or was superseded.
        Conflict => "Conflict",
    }
}

impl OperationStatus {
    /// `Succeeded`, `Failed` and `Conflict` end an operation; polling can stop.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Conflict)
    }
}

wire_enum! {
    /// Operation / webhook `action` (§3.4).
    OperationAction {
        ChangePlan => "ChangePlan",
        ChangeQuantity => "ChangeQuantity",
        Reinstate => "Reinstate",
        Renew => "Renew",
        Suspend => "Suspend",
        Unsubscribe => "Unsubscribe",
        /// Auto-activation (2026) and some legacy renewal traffic.
        Subscribe => "Subscribe",
        /// 2019 docs and some SDK enums; never documented further.
        Transfer => "Transfer",
    }
}

wire_enum! {
    /// `term.termUnit` (§3.3).
    TermUnit {
        P1M => "P1M",
        P1Y => "P1Y",
        P2Y => "P2Y",
        P3Y => "P3Y",
        P4Y => "P4Y",
        P5Y => "P5Y",
    }
}

wire_enum! {
    /// `operationRequestSource`: who initiated an operation (§3.4).
    RequestSource {
        /// The Microsoft side: customer, CSP or billing.
        Azure => "Azure",
        /// Us, through this API.
        Partner => "Partner",
    }
}

wire_enum! {
    /// What the beneficiary may do; CSP purchases only get `Read` (P22).
    AllowedCustomerOperation {
        Read => "Read",
        Update => "Update",
        Delete => "Delete",
    }
}

wire_enum! {
    /// `sandboxType` (§3.1).
    SandboxType {
        None => "None",
        Csp => "Csp",
    }
}

wire_enum! {
    /// `sessionMode` (§3.1).
    SessionMode {
        None => "None",
        DryRun => "DryRun",
    }
}

wire_enum! {
    /// Status of one metering event (§9.1, §9.2).
    UsageEventStatus {
        Accepted => "Accepted",
        Expired => "Expired",
        Duplicate => "Duplicate",
        Error => "Error",
        ResourceNotFound => "ResourceNotFound",
        ResourceNotAuthorized => "ResourceNotAuthorized",
        /// Suspended or never activated (P26).
        ResourceNotActive => "ResourceNotActive",
        InvalidDimension => "InvalidDimension",
        InvalidQuantity => "InvalidQuantity",
        BadArgument => "BadArgument",
    }
}

wire_enum! {
    /// `reconStatus` of an aggregated usage record (§9.3).
    ReconStatus {
        Submitted => "Submitted",
        Accepted => "Accepted",
        Rejected => "Rejected",
        Mismatch => "Mismatch",
        TestHeaders => "TestHeaders",
        DryRun => "DryRun",
    }
}

/// The body of an operation acknowledgement (§4.11): `Success`/`Failure`, not the
/// `Succeeded`/`Failed` of [`OperationStatus`] (P6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UpdateOperationStatus {
    Success,
    Failure,
}

/// An Entra identity: `beneficiary` or `purchaser` (§3.2).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AadIdentifier {
    /// Can be masked or empty.
    #[serde(default, deserialize_with = "lenient::string")]
    pub email_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::uuid")]
    pub object_id: Option<Uuid>,
    /// `9188040d-6c67-4c5b-b112-36a304b66dad` for personal Microsoft accounts.
    #[serde(default, deserialize_with = "lenient::uuid")]
    pub tenant_id: Option<Uuid>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub puid: Option<String>,
}

/// The current billing term (§3.3). Dates are absent while the subscription is pending.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Term {
    #[serde(default)]
    pub term_unit: Option<TermUnit>,
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub start_date: Option<OffsetDateTime>,
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub end_date: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub charge_duration: Option<String>,
}

/// A SaaS subscription as Get/List/Resolve return it (§3.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Subscription {
    /// The SaaS subscription id; also the `resourceId` for metering.
    pub id: Uuid,
    #[serde(default, deserialize_with = "lenient::string")]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub publisher_id: Option<String>,
    /// Carries a `-preview` suffix for preview-audience purchases (P14).
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub quantity: Option<u32>,
    #[serde(rename = "saasSubscriptionStatus", default)]
    pub status: Option<SubscriptionStatus>,
    #[serde(default, deserialize_with = "lenient::object")]
    pub beneficiary: Option<AadIdentifier>,
    #[serde(default, deserialize_with = "lenient::object")]
    pub purchaser: Option<AadIdentifier>,
    #[serde(default, deserialize_with = "lenient::object")]
    pub term: Option<Term>,
    #[serde(default, deserialize_with = "lenient::boolean")]
    pub auto_renew: Option<bool>,
    #[serde(default, deserialize_with = "lenient::flag")]
    pub is_test: bool,
    /// Absent means false.
    #[serde(default, deserialize_with = "lenient::flag")]
    pub is_free_trial: bool,
    #[serde(default, deserialize_with = "lenient::list")]
    pub allowed_customer_operations: Vec<AllowedCustomerOperation>,
    #[serde(default)]
    pub sandbox_type: Option<SandboxType>,
    #[serde(default)]
    pub session_mode: Option<SessionMode>,
    /// Purchase time; the 72-hour refund window counts from here (P20).
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub created: Option<OffsetDateTime>,
    /// Deprecated by Microsoft (often the `0001-01-01T00:00:00` placeholder, read as `None`).
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub last_modified: Option<OffsetDateTime>,
    /// The private offer(s) the purchase came through. Microsoft reports them on the
    /// purchased plan (`listAvailablePlans?planId=`, §4.5), not here: the landing page adds
    /// them before it hands the subscription to the workers; read here too in case Microsoft
    /// ever sends them with the subscription.
    #[serde(
        default,
        deserialize_with = "lenient::list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub source_offers: Vec<SourceOffer>,
}

/// The answer to Resolve (§4.1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedSubscription {
    /// The SaaS subscription id.
    pub id: Uuid,
    #[serde(default, deserialize_with = "lenient::string")]
    pub subscription_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub quantity: Option<u32>,
    #[serde(default, deserialize_with = "lenient::object")]
    pub subscription: Option<Subscription>,
}

/// One page of List subscriptions (§4.3).
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionsPage {
    pub subscriptions: Vec<Subscription>,
    /// The ready-made URL of the next page, to be followed as-is (P28); `None` on the last.
    pub next_link: Option<url::Url>,
}

/// The List subscriptions body as sent; the client resolves the link into a [`url::Url`].
#[derive(Debug, Default, Deserialize)]
pub(crate) struct SubscriptionsPageWire {
    #[serde(default, deserialize_with = "lenient::list")]
    pub subscriptions: Vec<Subscription>,
    #[serde(rename = "@nextLink", default, deserialize_with = "lenient::string")]
    pub next_link: Option<String>,
    /// The 2019 shape put the token in the body instead of `@nextLink`.
    #[serde(
        rename = "continuationToken",
        default,
        deserialize_with = "lenient::string"
    )]
    pub continuation_token: Option<String>,
}

/// A plan the subscription could switch to (§3.6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub display_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::boolean")]
    pub is_private: Option<bool>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub description: Option<String>,
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub min_quantity: Option<u32>,
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub max_quantity: Option<u32>,
    #[serde(default, deserialize_with = "lenient::boolean")]
    pub has_free_trials: Option<bool>,
    #[serde(default, deserialize_with = "lenient::boolean")]
    pub is_price_per_seat: Option<bool>,
    #[serde(default, deserialize_with = "lenient::boolean")]
    pub is_stop_sell: Option<bool>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub market: Option<String>,
    /// Prices and metering dimensions, kept raw: we only display and log them.
    #[serde(default)]
    pub plan_components: Option<Value>,
    /// Present only with the `planId` filter: the private offer(s) the purchase came from.
    #[serde(default, deserialize_with = "lenient::list")]
    pub source_offers: Vec<SourceOffer>,
}

/// `sourceOffers[]` of a plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceOffer {
    #[serde(default, deserialize_with = "lenient::string")]
    pub external_id: Option<String>,
}

/// `{"plans": [...]}`, or the bare array Microsoft's emulator sends for an unknown
/// subscription.
#[derive(Debug, Default)]
pub(crate) struct PlansWire {
    pub plans: Vec<Plan>,
}

impl<'de> Deserialize<'de> for PlansWire {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self {
            plans: lenient::list_or_field(Value::deserialize(d)?, "plans"),
        })
    }
}

/// An asynchronous operation (§3.5).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    pub id: Uuid,
    #[serde(default, deserialize_with = "lenient::uuid")]
    pub activity_id: Option<Uuid>,
    #[serde(default, deserialize_with = "lenient::uuid")]
    pub subscription_id: Option<Uuid>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub publisher_id: Option<String>,
    /// For `ChangePlan`, the **target** plan.
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    /// For `ChangeQuantity`, the **target** quantity.
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub quantity: Option<u32>,
    #[serde(default)]
    pub action: Option<OperationAction>,
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub time_stamp: Option<OffsetDateTime>,
    #[serde(default)]
    pub status: Option<OperationStatus>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub error_status_code: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub error_message: Option<String>,
    /// Read it through [`Operation::request_source`], which also knows the emulator's
    /// spelling.
    #[serde(default)]
    pub operation_request_source: Option<RequestSource>,
    /// Microsoft's emulator spells the field `operationRequestedSource` (a separate field,
    /// not an alias: a body with both must not fail as a duplicate).
    #[serde(
        default,
        rename = "operationRequestedSource",
        skip_serializing_if = "Option::is_none"
    )]
    pub operation_requested_source: Option<RequestSource>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub resource_location: Option<String>,
}

impl Operation {
    /// Who initiated the operation, under either spelling of the field.
    pub fn request_source(&self) -> Option<&RequestSource> {
        self.operation_request_source
            .as_ref()
            .or(self.operation_requested_source.as_ref())
    }
}

/// The body of List operations: `{"operations":[…]}` or `{}` as documented, or the bare
/// array Microsoft's emulator answers (§15.2).
#[derive(Debug, Default)]
pub(crate) struct OperationsWire(Vec<Operation>);

impl<'de> Deserialize<'de> for OperationsWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let list = match Value::deserialize(deserializer)? {
            bare @ Value::Array(_) => bare,
            Value::Object(mut fields) => fields.remove("operations").unwrap_or(Value::Null),
            _ => Value::Null,
        };
        lenient::list(list)
            .map(OperationsWire)
            .map_err(serde::de::Error::custom)
    }
}

impl OperationsWire {
    pub(crate) fn into_operations(self) -> Vec<Operation> {
        self.0
    }
}

/// One metered usage event to post (§9.1). Send only usage above what the plan includes,
/// at most one per (subscription, dimension, clock hour).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageEvent {
    /// The SaaS subscription id.
    pub resource_id: Uuid,
    /// Must be > 0.
    pub quantity: f64,
    pub dimension: String,
    /// At most 24 hours in the past; sent in UTC.
    #[serde(
        serialize_with = "lenient::serialize_utc",
        deserialize_with = "lenient::required_timestamp"
    )]
    pub effective_start_time: OffsetDateTime,
    pub plan_id: String,
}

/// Microsoft's answer for one usage event: the 200 body of `/usageEvent`, an item of the
/// batch `result`, or the `acceptedMessage` of a duplicate (§9).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageEventResponse {
    #[serde(default, deserialize_with = "lenient::string")]
    pub usage_event_id: Option<String>,
    #[serde(default)]
    pub status: Option<UsageEventStatus>,
    /// `0001-01-01T00:00:00` (read as `None`) on failed batch items.
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub message_time: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "lenient::uuid")]
    pub resource_id: Option<Uuid>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub resource_uri: Option<String>,
    #[serde(default, deserialize_with = "lenient::number")]
    pub quantity: Option<f64>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub dimension: Option<String>,
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub effective_start_time: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    /// Why a batch item failed.
    #[serde(default, deserialize_with = "lenient::object")]
    pub error: Option<UsageEventError>,
}

/// A metering error: the 409 body of `/usageEvent`, or a failed batch item's `error`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageEventError {
    #[serde(default, deserialize_with = "lenient::string")]
    pub code: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub message: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub target: Option<String>,
    #[serde(default)]
    pub details: Option<Value>,
    #[serde(default, deserialize_with = "lenient::object")]
    pub additional_info: Option<UsageEventAdditionalInfo>,
}

impl UsageEventError {
    /// For a duplicate: the event Microsoft accepted earlier for the same hour.
    pub fn accepted_message(&self) -> Option<&UsageEventResponse> {
        self.additional_info
            .as_ref()
            .and_then(|info| info.accepted_message.as_deref())
    }
}

/// `additionalInfo` of a metering error.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageEventAdditionalInfo {
    #[serde(default, deserialize_with = "lenient::object")]
    pub accepted_message: Option<Box<UsageEventResponse>>,
}

/// The outcome of posting one usage event.
#[derive(Clone, Debug, PartialEq)]
pub enum UsageEventOutcome {
    /// 200: recorded.
    Accepted(UsageEventResponse),
    /// 409: an event for this subscription, dimension and hour was already accepted. A
    /// success if [`UsageEventError::accepted_message`] has the same quantity (§12).
    Duplicate(UsageEventError),
}

/// The 200 body of `/batchUsageEvent`: check every item (§9.2).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BatchUsageEventResponse {
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub count: Option<u32>,
    #[serde(default, deserialize_with = "lenient::list")]
    pub result: Vec<UsageEventResponse>,
}

/// Filters of `GET /usageEvents` (§9.3).
#[derive(Clone, Debug, PartialEq)]
pub struct UsageEventsQuery {
    pub usage_start_date: OffsetDateTime,
    /// Defaults to now on Microsoft's side.
    pub usage_end_date: Option<OffsetDateTime>,
    pub offer_id: Option<String>,
    pub plan_id: Option<String>,
    pub dimension: Option<String>,
    pub azure_subscription_id: Option<String>,
    pub recon_status: Option<ReconStatus>,
}

impl UsageEventsQuery {
    /// Everything from `usage_start_date` until now.
    pub fn since(usage_start_date: OffsetDateTime) -> Self {
        Self {
            usage_start_date,
            usage_end_date: None,
            offer_id: None,
            plan_id: None,
            dimension: None,
            azure_subscription_id: None,
            recon_status: None,
        }
    }

    /// The query parameters, spelled as documented (note `UsageEndDate`).
    pub(crate) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![("usageStartDate", lenient::format_utc(self.usage_start_date))];
        if let Some(end) = self.usage_end_date {
            pairs.push(("UsageEndDate", lenient::format_utc(end)));
        }
        let optional = [
            ("offerId", self.offer_id.clone()),
            ("planId", self.plan_id.clone()),
            ("dimension", self.dimension.clone()),
            ("azureSubscriptionId", self.azure_subscription_id.clone()),
            (
                "reconStatus",
                self.recon_status.as_ref().map(|s| s.as_str().to_owned()),
            ),
        ];
        pairs.extend(
            optional
                .into_iter()
                .filter_map(|(key, value)| value.map(|v| (key, v))),
        );
        pairs
    }
}

/// One aggregated usage record from `GET /usageEvents` (§9.3).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageAggregate {
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub usage_date: Option<OffsetDateTime>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub usage_resource_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub dimension: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_name: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_type: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub azure_subscription_id: Option<String>,
    #[serde(default)]
    pub recon_status: Option<ReconStatus>,
    #[serde(default, deserialize_with = "lenient::number")]
    pub submitted_quantity: Option<f64>,
    #[serde(default, deserialize_with = "lenient::number")]
    pub processed_quantity: Option<f64>,
    #[serde(default, deserialize_with = "lenient::number")]
    pub submitted_count: Option<f64>,
}

/// A webhook call's body (§6.2). Only `id`, `subscriptionId` and `action` are required:
/// minimal 2019–2021 payloads still arrive, and Microsoft may add fields (P16).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookPayload {
    /// The operation id; with `action`, the dedupe key.
    pub id: Uuid,
    pub subscription_id: Uuid,
    /// Kept as sent: unknown actions are accepted and recorded (P9).
    pub action: String,
    #[serde(default, deserialize_with = "lenient::uuid")]
    pub activity_id: Option<Uuid>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub publisher_id: Option<String>,
    #[serde(default, deserialize_with = "lenient::string")]
    pub offer_id: Option<String>,
    /// ChangePlan: the target plan; otherwise the current one.
    #[serde(default, deserialize_with = "lenient::string")]
    pub plan_id: Option<String>,
    /// ChangeQuantity: the target quantity; otherwise the current one.
    #[serde(default, deserialize_with = "lenient::quantity")]
    pub quantity: Option<u32>,
    #[serde(
        default,
        deserialize_with = "lenient::timestamp",
        serialize_with = "lenient::serialize_timestamp"
    )]
    pub time_stamp: Option<OffsetDateTime>,
    #[serde(default)]
    pub status: Option<OperationStatus>,
    /// Read it through [`WebhookPayload::request_source`].
    #[serde(default)]
    pub operation_request_source: Option<RequestSource>,
    /// The emulator's spelling (see [`Operation::operation_requested_source`]).
    #[serde(
        default,
        rename = "operationRequestedSource",
        skip_serializing_if = "Option::is_none"
    )]
    pub operation_requested_source: Option<RequestSource>,
    /// A snapshot that may lag behind the action (P13).
    #[serde(default, deserialize_with = "lenient::object")]
    pub subscription: Option<Subscription>,
}

impl WebhookPayload {
    /// Who initiated the operation, under either spelling of the field.
    pub fn request_source(&self) -> Option<&RequestSource> {
        self.operation_request_source
            .as_ref()
            .or(self.operation_requested_source.as_ref())
    }

    /// Parses a webhook body with the same leniency as API responses (trimmed keys,
    /// trailing commas). The error says which required field is missing or malformed.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        match parse_body::<Self>(body)? {
            Some(payload) if !payload.action.trim().is_empty() => Ok(payload),
            Some(_) => Err(serde::de::Error::custom("`action` is empty")),
            None => Err(serde::de::Error::custom("the body is empty")),
        }
    }
}

/// The fields of a webhook body that route and dedupe it: what the ingress reads before it
/// queues the body as received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookEnvelope {
    pub id: Uuid,
    pub subscription_id: Uuid,
    /// Trimmed; never empty.
    pub action: String,
    pub activity_id: Option<Uuid>,
}

impl WebhookEnvelope {
    /// Accepts exactly the bodies [`WebhookPayload::parse`] accepts, with the same values:
    /// a direct, borrowing parse of the four fields (everything else is skipped unread), and,
    /// when that fails (padded keys, trailing commas, a duplicate key, a wrong type), the full
    /// lenient parse, which also names the problem. Exact keys win over padded ones in both.
    pub fn parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Direct<'a> {
            id: Uuid,
            subscription_id: Uuid,
            #[serde(borrow)]
            action: std::borrow::Cow<'a, str>,
            #[serde(default, deserialize_with = "lenient::uuid")]
            activity_id: Option<Uuid>,
        }
        if may_have_padded_key(body) || nested_deeper_than(body, DIRECT_PARSE_MAX_DEPTH) {
            return Self::from_full_parse(body);
        }
        if let Ok(direct) = serde_json::from_slice::<Direct<'_>>(body) {
            let action = direct.action.trim();
            if !action.is_empty() {
                return Ok(Self {
                    id: direct.id,
                    subscription_id: direct.subscription_id,
                    action: action.to_owned(),
                    activity_id: direct.activity_id,
                });
            }
        }
        Self::from_full_parse(body)
    }

    fn from_full_parse(body: &[u8]) -> Result<Self, serde_json::Error> {
        let payload = WebhookPayload::parse(body)?;
        Ok(Self {
            id: payload.id,
            subscription_id: payload.subscription_id,
            action: payload.action.trim().to_owned(),
            activity_id: payload.activity_id,
        })
    }
}

/// Nesting beyond which the direct parse defers to the full one. The direct parse skips the
/// fields it does not read without serde_json's recursion limit (128 levels), so alone it
/// would accept a body nested too deep for the worker's parse: a 200, then a dead letter.
/// Real webhooks nest four levels; anything deeper than this is left to the full parse,
/// which decides exactly as the worker will.
const DIRECT_PARSE_MAX_DEPTH: usize = 32;

/// Whether arrays and objects in `body` nest deeper than `limit` (brackets inside strings
/// do not count). Malformed input gives some answer; the parse that follows judges it.
fn nested_deeper_than(body: &[u8], limit: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// True when some object key in `body` might have surrounding whitespace (which the full
/// parse trims, so `"activityId "` counts there): a quote that opens a key (after `{` or
/// `,`) followed by whitespace, or a quote that closes a key (before `:`) preceded by it.
/// Non-ASCII bytes count as whitespace and any backslash escape counts as suspicious, since
/// `trim` also removes Unicode spaces, written raw or as `\u00a0`. False positives only
/// cost the slower parse.
fn may_have_padded_key(body: &[u8]) -> bool {
    if body.contains(&b'\\') {
        return true;
    }
    let space = |b: u8| b.is_ascii_whitespace() || !b.is_ascii();
    let before = |i: usize| {
        body[..i]
            .iter()
            .rev()
            .copied()
            .find(|b| !b.is_ascii_whitespace())
    };
    let after = |i: usize| {
        body.get(i..)
            .and_then(|rest| rest.iter().copied().find(|b| !b.is_ascii_whitespace()))
    };
    body.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'"')
        .any(|(i, _)| {
            let next = body.get(i + 1).copied();
            let prev = i.checked_sub(1).map(|j| body[j]);
            (next.is_some_and(space) && matches!(before(i), Some(b'{' | b',')))
                || (prev.is_some_and(space) && after(i + 1) == Some(b':'))
        })
}

/// Parses a response body leniently: an empty body is `None`; keys are trimmed (the doc
/// samples have `"id  "`); trailing commas (also in doc samples) are tolerated.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
) -> Result<Option<T>, serde_json::Error> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let value = match serde_json::from_slice::<Value>(body) {
        Ok(value) => value,
        Err(first) => match lenient::strip_trailing_commas(body) {
            Some(fixed) => serde_json::from_slice::<Value>(&fixed).map_err(|_| first)?,
            None => return Err(first),
        },
    };
    if value.is_null() {
        return Ok(None);
    }
    T::deserialize(lenient::trim_keys(value)).map(Some)
}

/// The custom (de)serializers behind the lenient rules.
pub(crate) mod lenient {
    use serde::de::DeserializeOwned;
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_json::Value;
    use time::format_description::well_known::{Iso8601, Rfc3339};
    use time::{Date, OffsetDateTime, UtcOffset};
    use uuid::Uuid;

    /// number | numeric string | `""` | null | anything else → `Option<u32>`.
    pub fn quantity<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        Ok(quantity_of(&Value::deserialize(d)?))
    }

    pub(crate) fn quantity_of(value: &Value) -> Option<u32> {
        match value {
            Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .or_else(|| n.as_f64().and_then(whole_u32)),
            Value::String(s) => {
                let s = s.trim();
                s.parse::<u32>()
                    .ok()
                    .or_else(|| s.parse::<f64>().ok().and_then(whole_u32))
            }
            _ => None,
        }
    }

    fn whole_u32(f: f64) -> Option<u32> {
        (f.fract() == 0.0 && (0.0..=f64::from(u32::MAX)).contains(&f)).then_some(f as u32)
    }

    /// A number or a numeric string.
    pub fn number<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
    }

    /// A string (numbers are rendered); null and other shapes → `None`.
    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Some(s),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        })
    }

    /// A GUID; empty or malformed → `None`.
    pub fn uuid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Uuid>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => Uuid::parse_str(s.trim()).ok(),
            _ => None,
        })
    }

    /// `true`/`false`, also as strings.
    pub fn boolean<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Bool(b) => Some(b),
            Value::String(s) => match s.trim() {
                t if t.eq_ignore_ascii_case("true") => Some(true),
                t if t.eq_ignore_ascii_case("false") => Some(false),
                _ => None,
            },
            _ => None,
        })
    }

    /// Like [`boolean`], absent or unreadable meaning `false`.
    pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(boolean(d)?.unwrap_or(false))
    }

    /// A nested object; a value of another shape (or one that fails to parse) → `None`.
    pub fn object<'de, D: Deserializer<'de>, T: DeserializeOwned>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Ok(match Value::deserialize(d)? {
            value @ Value::Object(_) => match T::deserialize(value) {
                Ok(t) => Some(t),
                Err(error) => {
                    tracing::warn!(%error, "ignoring an unreadable nested object in a Marketplace response");
                    None
                }
            },
            _ => None,
        })
    }

    /// An array; null/absent → empty; unreadable items are skipped with a warning so one
    /// odd record cannot hide all the others from the reconciler.
    /// The list under `field` of an object, or the value itself when it is a bare array;
    /// unreadable items are skipped as by [`list`].
    pub(crate) fn list_or_field<T: DeserializeOwned>(value: Value, field: &str) -> Vec<T> {
        let items = match value {
            Value::Object(mut map) => map.remove(field).unwrap_or(Value::Null),
            other => other,
        };
        list(items).unwrap_or_default()
    }

    pub fn list<'de, D: Deserializer<'de>, T: DeserializeOwned>(d: D) -> Result<Vec<T>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|item| match T::deserialize(item) {
                    Ok(t) => Some(t),
                    Err(error) => {
                        tracing::warn!(%error, "skipping an unreadable item in a Marketplace list");
                        None
                    }
                })
                .collect(),
            _ => Vec::new(),
        })
    }

    pub fn timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<OffsetDateTime>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::String(s) => parse_timestamp(&s),
            _ => None,
        })
    }

    pub fn required_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = String::deserialize(d)?;
        parse_timestamp(&s).ok_or_else(|| serde::de::Error::custom("invalid timestamp"))
    }

    /// Accepts RFC 3339 (`Z` or an offset, any number of fractional digits), the same
    /// without an offset (UTC), with a space instead of `T`, and a bare date (midnight UTC).
    /// Year 1 is Microsoft's "no value" placeholder (`0001-01-01T00:00:00`).
    pub fn parse_timestamp(raw: &str) -> Option<OffsetDateTime> {
        let s = raw.trim();
        if s.len() < 10 || !s.is_char_boundary(10) {
            return None;
        }
        let parsed = if s.len() == 10 {
            Date::parse(s, &Iso8601::DATE)
                .ok()
                .map(|d| d.midnight().assume_utc())
        } else {
            let mut owned = s.to_owned();
            if owned.as_bytes()[10] == b' ' {
                owned.replace_range(10..11, "T");
            }
            let tail = &owned[10..];
            let has_offset = tail.ends_with(['Z', 'z']) || tail.contains(['+', '-']);
            if !has_offset {
                owned.push('Z');
            }
            OffsetDateTime::parse(&owned, &Rfc3339)
                .or_else(|_| OffsetDateTime::parse(&owned, &Iso8601::DEFAULT))
                .ok()
        };
        // `to_offset` panics when UTC falls outside years 0..=9999 (`9999-12-31T23:00-01:00`);
        // such an instant is as unusable as an unparsable one.
        parsed
            .and_then(|t| t.checked_to_offset(UtcOffset::UTC))
            .filter(|t| t.year() > 1)
    }

    pub(crate) fn format_utc(t: OffsetDateTime) -> String {
        // Formatting RFC 3339 only fails for years outside 0..=9999.
        t.checked_to_offset(UtcOffset::UTC)
            .and_then(|t| t.format(&Rfc3339).ok())
            .unwrap_or_default()
    }

    pub fn serialize_timestamp<S: Serializer>(
        t: &Option<OffsetDateTime>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => serialize_utc(t, s),
            None => s.serialize_none(),
        }
    }

    pub fn serialize_utc<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_utc(*t))
    }

    /// Renames `"id  "` to `"id"` (doc samples), unless the trimmed key also exists.
    pub(crate) fn trim_keys(value: Value) -> Value {
        match value {
            Value::Object(map) => {
                let mut out = serde_json::Map::with_capacity(map.len());
                let (exact, padded): (Vec<_>, Vec<_>) =
                    map.into_iter().partition(|(k, _)| k.trim() == k);
                for (k, v) in exact {
                    out.insert(k, trim_keys(v));
                }
                for (k, v) in padded {
                    out.entry(k.trim().to_owned())
                        .or_insert_with(|| trim_keys(v));
                }
                Value::Object(out)
            }
            Value::Array(items) => Value::Array(items.into_iter().map(trim_keys).collect()),
            other => other,
        }
    }

    /// Drops commas that directly precede `}` or `]` outside strings; `None` if there are none.
    pub(crate) fn strip_trailing_commas(body: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(body.len());
        let (mut in_string, mut escaped, mut changed) = (false, false, false);
        for (i, &b) in body.iter().enumerate() {
            if in_string {
                match (escaped, b) {
                    (true, _) => escaped = false,
                    (false, b'\\') => escaped = true,
                    (false, b'"') => in_string = false,
                    _ => {}
                }
            } else if b == b'"' {
                in_string = true;
            } else if b == b',' {
                let next = body[i + 1..].iter().find(|c| !c.is_ascii_whitespace());
                if matches!(next, Some(b'}') | Some(b']')) {
                    changed = true;
                    continue;
                }
            }
            out.push(b);
        }
        changed.then_some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn parse<T: serde::de::DeserializeOwned>(json: &str) -> T {
        parse_body::<T>(json.as_bytes()).unwrap().unwrap()
    }

    /// The Get subscription sample of the docs, typos included: a padded `"id  "` key,
    /// a padded status, a string quantity, offset-less and placeholder dates, trailing commas
    /// and fields we do not model.
    const DOC_SUBSCRIPTION: &str = r#"{
        "id  ": "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03",
        "name": "Contoso Cloud Solution",
        "publisherId": "contoso",
        "offerId": "offer1",
        "planId": "silver",
        "quantity": "20",
        "beneficiary": {
            "emailId": "test@test.com",
            "objectId": "a1b2c3d4-4444-4f00-8000-00000000aa01",
            "tenantId": "b2c3d4e5-5555-4f00-8000-00000000bb02",
            "puid": null
        },
        "purchaser": { "emailId": "", "objectId": "", "tenantId": "b2c3d4e5-5555-4f00-8000-00000000bb02" },
        "allowedCustomerOperations": ["Delete", " Update ", "Read", "Transfer"],
        "sessionMode": "None",
        "isFreeTrial": "true",
        "isTest": false,
        "sandboxType": "Csp",
        "saasSubscriptionStatus": " Subscribed ",
        "term": {
            "startDate": "2019-05-31",
            "endDate": "2019-06-29T00:00:00",
            "termUnit": "P1M",
            "chargeDuration": null,
        },
        "autoRenew": true,
        "created": "2022-02-14T20:26:05.1419317Z",
        "lastModified": "0001-01-01T00:00:00",
        "someFutureField": { "nested": [1, 2, 3] },
    }"#;

    #[test]
    fn the_documented_subscription_sample_parses_despite_its_typos() {
        let s: Subscription = parse(DOC_SUBSCRIPTION);
        assert_eq!(
            s.id,
            Uuid::parse_str("3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03").unwrap()
        );
        assert_eq!(s.quantity, Some(20));
        assert_eq!(s.status, Some(SubscriptionStatus::Subscribed));
        assert_eq!(s.plan_id.as_deref(), Some("silver"));
        assert!(s.is_free_trial);
        assert_eq!(s.sandbox_type, Some(SandboxType::Csp));
        assert_eq!(
            s.allowed_customer_operations,
            vec![
                AllowedCustomerOperation::Delete,
                AllowedCustomerOperation::Update,
                AllowedCustomerOperation::Read,
                AllowedCustomerOperation::Unknown("Transfer".into()),
            ]
        );
        let term = s.term.unwrap();
        assert_eq!(term.term_unit, Some(TermUnit::P1M));
        assert_eq!(term.start_date, Some(datetime!(2019-05-31 00:00 UTC)));
        assert_eq!(term.end_date, Some(datetime!(2019-06-29 00:00 UTC)));
        assert_eq!(s.created, Some(datetime!(2022-02-14 20:26:05.1419317 UTC)));
        assert_eq!(
            s.last_modified, None,
            "the 0001-01-01 placeholder means no value"
        );
        let purchaser = s.purchaser.unwrap();
        assert_eq!(purchaser.object_id, None);
        assert_eq!(purchaser.email_id.as_deref(), Some(""));
        assert_eq!(s.beneficiary.unwrap().puid, None);
    }

    #[test]
    fn quantity_accepts_every_observed_shape() {
        for (json, expected) in [
            (r#"{"quantity": 20}"#, Some(20)),
            (r#"{"quantity": "20"}"#, Some(20)),
            (r#"{"quantity": " 7 "}"#, Some(7)),
            (r#"{"quantity": 5.0}"#, Some(5)),
            (r#"{"quantity": ""}"#, None),
            (r#"{"quantity": null}"#, None),
            (r#"{}"#, None),
            (r#"{"quantity": -3}"#, None),
            (r#"{"quantity": "many"}"#, None),
            (r#"{"quantity": 1.5}"#, None),
        ] {
            let body = format!(
                r#"{{"id":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03",{}"#,
                json.trim_start_matches('{')
            );
            let body = body.replace(",}", "}");
            let s: Subscription = parse(&body);
            assert_eq!(s.quantity, expected, "{json}");
        }
    }

    #[test]
    fn timestamps_are_lenient() {
        use lenient::parse_timestamp as p;
        assert_eq!(
            p("2022-02-14T20:26:05.1419317Z"),
            Some(datetime!(2022-02-14 20:26:05.1419317 UTC))
        );
        assert_eq!(
            p("2025-03-10T18:34:41+02:00"),
            Some(datetime!(2025-03-10 16:34:41 UTC))
        );
        assert_eq!(
            p("2018-12-01T00:00:00"),
            Some(datetime!(2018-12-01 0:00 UTC))
        );
        assert_eq!(
            p("2018-12-01T10:11:12.5"),
            Some(datetime!(2018-12-01 10:11:12.5 UTC))
        );
        assert_eq!(
            p("2018-12-01 10:11:12"),
            Some(datetime!(2018-12-01 10:11:12 UTC))
        );
        assert_eq!(p("2019-05-31"), Some(datetime!(2019-05-31 0:00 UTC)));
        assert_eq!(p(" 2019-05-31 "), Some(datetime!(2019-05-31 0:00 UTC)));
        assert_eq!(p("0001-01-01T00:00:00"), None);
        assert_eq!(p("0001-01-01T00:00:00Z"), None);
        for junk in [
            "",
            "yesterday",
            "2019-13-45",
            "2019-05-31T25:00:00",
            "ÄÖÜÄÖÜÄÖÜÄÖÜ",
        ] {
            assert_eq!(p(junk), None, "{junk}");
        }
    }

    #[test]
    fn an_unparseable_timestamp_does_not_fail_the_record() {
        let op: Operation = parse(
            r#"{"id":"c0ffee00-6666-4a1b-9c2d-3e4f5a6b7c08","timeStamp":"soon","status":"Succeeded"}"#,
        );
        assert_eq!(op.time_stamp, None);
        assert_eq!(op.status, Some(OperationStatus::Succeeded));
    }

    #[test]
    fn unknown_enum_values_are_kept() {
        assert_eq!(OperationAction::parse(" Renew "), OperationAction::Renew);
        assert_eq!(
            OperationAction::parse("subscribe"),
            OperationAction::Subscribe
        );
        assert_eq!(
            OperationAction::parse("Migrate"),
            OperationAction::Unknown("Migrate".into())
        );
        assert_eq!(OperationStatus::parse("Succeeded").as_str(), "Succeeded");
        assert!(OperationStatus::Conflict.is_terminal());
        assert!(!OperationStatus::InProgress.is_terminal());
        assert_eq!(TermUnit::parse("P5Y"), TermUnit::P5Y);
        assert_eq!(TermUnit::parse("P10Y"), TermUnit::Unknown("P10Y".into()));
        let op: Operation = parse(
            r#"{"id":"c0ffee00-6666-4a1b-9c2d-3e4f5a6b7c08","action":42,"status":"Pending",
                "operationRequestSource":"Partner"}"#,
        );
        assert_eq!(op.action, Some(OperationAction::Unknown("42".into())));
        assert_eq!(op.status, Some(OperationStatus::Unknown("Pending".into())));
        assert_eq!(op.operation_request_source, Some(RequestSource::Partner));
    }

    #[test]
    fn the_documented_operation_sample_parses() {
        let op: Operation = parse(
            r#"{
              "id": "7d3e9a41-1111-4c6e-9a0b-2f5d0c7e1a01", "activityId": "0b5f2c77-2222-4e2a-8d4b-6a1c9e3f7b02",
              "subscriptionId": "3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03",
              "offerId": "offer1", "publisherId": "contoso", "planId": "silver", "quantity": 20,
              "action": "ChangePlan", "timeStamp": "2018-12-01T00:00:00",
              "status": "InProgress", "errorStatusCode": "", "errorMessage": ""
            }"#,
        );
        assert_eq!(op.action, Some(OperationAction::ChangePlan));
        assert_eq!(op.status, Some(OperationStatus::InProgress));
        assert_eq!(op.time_stamp, Some(datetime!(2018-12-01 0:00 UTC)));
        assert_eq!(op.quantity, Some(20));
        assert_eq!(op.error_status_code.as_deref(), Some(""));
        assert!(op.activity_id.is_some());
    }

    #[test]
    fn resolve_sample_parses_with_nested_subscription() {
        let body = format!(
            r#"{{"id":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","subscriptionName":"Contoso Cloud Solution",
                "offerId":"offer1","planId":"silver","quantity":"","subscription":{DOC_SUBSCRIPTION}}}"#
        );
        let r: ResolvedSubscription = parse(&body);
        assert_eq!(r.quantity, None);
        assert_eq!(r.subscription.unwrap().quantity, Some(20));
        assert_eq!(
            r.subscription_name.as_deref(),
            Some("Contoso Cloud Solution")
        );
    }

    #[test]
    fn empty_bodies_and_empty_lists_are_not_errors() {
        assert!(parse_body::<OperationsWire>(b"").unwrap().is_none());
        assert!(parse_body::<OperationsWire>(b"  \n").unwrap().is_none());
        assert!(parse_body::<OperationsWire>(b"null").unwrap().is_none());
        assert!(parse::<OperationsWire>("{}").into_operations().is_empty());
        assert!(
            parse::<OperationsWire>(r#"{"operations":[]}"#)
                .into_operations()
                .is_empty()
        );
        assert!(
            parse::<OperationsWire>(r#"{"operations":null}"#)
                .into_operations()
                .is_empty()
        );
        assert!(parse::<OperationsWire>("[]").into_operations().is_empty());
    }

    #[test]
    fn list_operations_reads_the_documented_object_and_the_emulators_bare_array() {
        let op = r#"{"id":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","action":"Reinstate","status":"InProgress"}"#;
        let wrapped = parse::<OperationsWire>(&format!(r#"{{"operations":[{op}]}}"#));
        let bare = parse::<OperationsWire>(&format!("[{op}]"));
        assert_eq!(wrapped.into_operations().len(), 1);
        assert_eq!(bare.into_operations().len(), 1);
        assert!(parse::<PlansWire>(r#"{"plans":[]}"#).plans.is_empty());
        assert!(parse::<PlansWire>("[]").plans.is_empty());
        assert!(
            parse::<OperationsWire>(r#"{"operations":"none"}"#)
                .into_operations()
                .is_empty()
        );
    }

    #[test]
    fn an_unreadable_list_item_is_skipped_not_fatal() {
        let page: SubscriptionsPageWire = parse(
            r#"{"subscriptions":[{"id":"not-a-guid"},{"id":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03"}],
                "@nextLink":""}"#,
        );
        assert_eq!(page.subscriptions.len(), 1);
        assert_eq!(page.next_link.as_deref(), Some(""));
    }

    #[test]
    fn plans_keep_their_components_raw() {
        let plans: PlansWire = parse(
            r#"{"plans":[{"planId":"gold","displayName":"Gold","isPrivate":false,"minQuantity":"1",
                "maxQuantity":100,"isPricePerSeat":true,"market":"US","unknown":1,
                "planComponents":{"recurrentBillingTerms":[{"currency":"USD","price":10.5,"termUnit":"P1M"}],
                                  "meteringDimensions":[]},
                "sourceOffers":[{"externalId":"11111111-2222-3333-4444-555555555555"}]}]}"#,
        );
        let plan = &plans.plans[0];
        assert_eq!(plan.plan_id.as_deref(), Some("gold"));
        assert_eq!(plan.min_quantity, Some(1));
        assert_eq!(plan.max_quantity, Some(100));
        assert_eq!(plan.is_price_per_seat, Some(true));
        assert_eq!(
            plan.plan_components.as_ref().unwrap()["recurrentBillingTerms"][0]["price"],
            10.5
        );
        assert_eq!(plan.source_offers.len(), 1);
    }

    #[test]
    fn metering_bodies_parse() {
        let conflict: UsageEventError = parse(
            r#"{"additionalInfo":{"acceptedMessage":{"usageEventId":"0f8e7d6c-0000-4000-8000-000000000001",
                "status":"Duplicate","messageTime":"2025-06-02T08:35:01.12345Z",
                "resourceId":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","quantity":5.0,"dimension":"dim1",
                "effectiveStartTime":"2025-06-02T08:30:14Z","planId":"plan1"}},
                "message":"This usage event already exist.","code":"Conflict"}"#,
        );
        let accepted = conflict.accepted_message().unwrap();
        assert_eq!(accepted.status, Some(UsageEventStatus::Duplicate));
        assert_eq!(accepted.quantity, Some(5.0));

        let batch: BatchUsageEventResponse = parse(
            r#"{"count":2,"result":[
                {"usageEventId":"a","status":"Accepted","messageTime":"2025-06-02T08:35:01Z","quantity":"5",
                 "resourceId":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","dimension":"d","planId":"p",
                 "effectiveStartTime":"2025-06-02T08:00:00Z"},
                {"status":"ResourceNotActive","messageTime":"0001-01-01T00:00:00","quantity":1,
                 "error":{"code":"BadArgument","message":"not active"}}]}"#,
        );
        assert_eq!(batch.count, Some(2));
        assert_eq!(batch.result[0].quantity, Some(5.0));
        assert_eq!(
            batch.result[1].status,
            Some(UsageEventStatus::ResourceNotActive)
        );
        assert_eq!(batch.result[1].message_time, None);
        assert_eq!(
            batch.result[1].error.as_ref().unwrap().code.as_deref(),
            Some("BadArgument")
        );

        let aggregates: Vec<UsageAggregate> = parse(
            r#"[{"usageDate":"2025-06-01T00:00:00","usageResourceId":"x","dimension":"d",
                 "reconStatus":"Mismatch","submittedQuantity":3,"processedQuantity":"2","submittedCount":1}]"#,
        );
        assert_eq!(aggregates[0].recon_status, Some(ReconStatus::Mismatch));
        assert_eq!(aggregates[0].processed_quantity, Some(2.0));
    }

    #[test]
    fn usage_events_serialize_in_utc() {
        let event = UsageEvent {
            resource_id: Uuid::parse_str("3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03").unwrap(),
            quantity: 5.0,
            dimension: "dim1".into(),
            effective_start_time: datetime!(2025-06-02 10:30:14 +02:00),
            plan_id: "plan1".into(),
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"resourceId":"3f9c6b1e-3333-4d8e-b7a2-5c4e1d2f9a03","quantity":5.0,
                "dimension":"dim1","effectiveStartTime":"2025-06-02T08:30:14Z","planId":"plan1"})
        );
        let query = UsageEventsQuery {
            usage_end_date: Some(datetime!(2025-06-03 00:00 UTC)),
            recon_status: Some(ReconStatus::Accepted),
            ..UsageEventsQuery::since(datetime!(2025-06-01 00:00 UTC))
        };
        assert_eq!(
            query.pairs(),
            vec![
                ("usageStartDate", "2025-06-01T00:00:00Z".to_owned()),
                ("UsageEndDate", "2025-06-03T00:00:00Z".to_owned()),
                ("reconStatus", "Accepted".to_owned()),
            ]
        );
    }

    #[test]
    fn trailing_commas_inside_strings_are_left_alone() {
        let fixed = lenient::strip_trailing_commas(br#"{"a":"x,}","b":[1,2,],}"#).unwrap();
        assert_eq!(fixed, br#"{"a":"x,}","b":[1,2]}"#);
        assert!(lenient::strip_trailing_commas(br#"{"a":1}"#).is_none());
    }

    #[test]
    fn serialized_subscriptions_round_trip() {
        let s: Subscription = parse(DOC_SUBSCRIPTION);
        let again: Subscription =
            serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(s, again);
    }
}

#[cfg(test)]
mod envelope_tests {
    use super::{WebhookEnvelope, WebhookPayload};
    use proptest::prelude::*;

    const ID: &str = "8c8a4f6e-6b5e-4e38-9f6b-0a1c2d3e4f50";
    const SUB: &str = "37f9dea2-4345-438f-b0bd-03d40d28c7e0";

    /// Keys as Microsoft writes them, padded (doc samples), and unrelated ones.
    fn key() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "id",
            "id  ",
            " subscriptionId",
            "subscriptionId",
            "action",
            "action ",
            "activityId",
            "activityId ",
            "activityId\u{a0}",
            "\\u00a0activityId",
            "planId",
            "quantity",
            "subscription",
            "status",
        ])
    }

    fn value() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            format!("\"{ID}\""),
            format!("\"{SUB}\""),
            format!("\" {SUB} \""),
            "\"ChangePlan\"".to_owned(),
            "\" Suspend \"".to_owned(),
            "\"\"".to_owned(),
            "\"   \"".to_owned(),
            "null".to_owned(),
            "42".to_owned(),
            "{\"id\": 1, \"nested\": [1, 2, {}]}".to_owned(),
            "[]".to_owned(),
            "\"not-a-guid\"".to_owned(),
        ])
    }

    fn body() -> impl Strategy<Value = String> {
        // Half the bodies start valid, so acceptance is exercised as much as refusal.
        (
            any::<bool>(),
            prop::collection::vec((key(), value()), 0..10),
            any::<bool>(),
        )
            .prop_map(|(valid_start, mut fields, trailing_comma)| {
                if valid_start {
                    let valid = [
                        ("id", format!("\"{ID}\"")),
                        ("subscriptionId", format!("\"{SUB}\"")),
                        ("action", "\"Unsubscribe\"".to_owned()),
                    ];
                    fields.splice(0..0, valid);
                }
                let mut out = String::from("{");
                for (i, (k, v)) in fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&format!("\"{k}\": {v}"));
                }
                if trailing_comma && !fields.is_empty() {
                    out.push(',');
                }
                out.push('}');
                out
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The ingress's fast path accepts exactly what the worker's parser accepts, and reads
        /// the same values from it.
        #[test]
        fn envelope_agrees_with_the_full_parse(body in body()) {
            let full = WebhookPayload::parse(body.as_bytes());
            let envelope = WebhookEnvelope::parse(body.as_bytes());
            match (full, envelope) {
                (Ok(full), Ok(envelope)) => {
                    prop_assert_eq!(envelope.id, full.id);
                    prop_assert_eq!(envelope.subscription_id, full.subscription_id);
                    prop_assert_eq!(envelope.action.as_str(), full.action.trim());
                    prop_assert_eq!(envelope.activity_id, full.activity_id);
                }
                (Err(_), Err(_)) => {}
                (full, envelope) => prop_assert!(
                    false,
                    "disagree on {}: full {:?}, envelope {:?}",
                    body,
                    full.map(|p| p.id),
                    envelope.map(|e| e.id)
                ),
            }
        }
    }

    #[test]
    fn a_minimal_body_parses_directly() {
        let body = format!(
            r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":" Reinstate ","x":{{"y":[1]}}}}"#
        );
        let envelope = WebhookEnvelope::parse(body.as_bytes()).unwrap();
        assert_eq!(envelope.action, "Reinstate");
        assert_eq!(envelope.activity_id, None);
    }

    /// Found by issue 16: a body nested 127+ levels in a field nobody reads passed the
    /// envelope (which skips such fields without serde_json's recursion limit), got a 200,
    /// and was dead-lettered by the worker's full parse ("recursion limit exceeded").
    #[test]
    fn regression_the_envelope_refuses_what_is_nested_too_deep_for_the_worker() {
        for depth in [1, 31, 32, 33, 100, 126, 127, 128, 500, 20_000] {
            for (open, close) in [("[", "]"), ("{\"a\":", "}")] {
                let body = format!(
                    r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":"Renew","x":{}1{}}}"#,
                    open.repeat(depth),
                    close.repeat(depth)
                );
                let worker = WebhookPayload::parse(body.as_bytes()).is_ok();
                let ingress = WebhookEnvelope::parse(body.as_bytes()).is_ok();
                assert_eq!(ingress, worker, "depth {depth} with {open}");
            }
        }
        // Brackets inside strings are text, not nesting.
        let brackets = "[".repeat(300);
        let body = format!(
            r#"{{"id":"{ID}","subscriptionId":"{SUB}","action":"Renew","x":"{brackets}"}}"#
        );
        assert!(WebhookEnvelope::parse(body.as_bytes()).is_ok());
        assert!(!crate::marketplace::types::nested_deeper_than(
            body.as_bytes(),
            2
        ));
    }
}
