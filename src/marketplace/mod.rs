//! Client of Microsoft's SaaS Fulfillment API v2 and Metering API, the only way the rest
//! of the engine talks to Microsoft (docs/marketplace.md §1–§4, §7–§9).
//!
//! - [`types`]: lenient wire DTOs (unknown fields and enum values tolerated, P15/P16).
//! - [`client`]: [`MarketplaceClient`], one method per endpoint, each returning the value
//!   with the [`CallMeta`] (request ids, correlation id, status, attempts) for the event log.
//! - [`token`]: [`TokenProvider`], cached single-flight Entra client-credentials tokens.
//! - [`retry`]: [`RetryPolicy`], data plus pure functions, applied with backon.
//! - [`error`]: [`Error`], classified per the §8.2 retry matrix.
//!
//! Every call sends `api-version=2018-08-31`, `content-type: application/json`, a bearer
//! token, a new `x-ms-requestid` per attempt and the job's `x-ms-correlationid`
//! ([`CallContext`]) on every attempt.

pub mod client;
pub mod credential;
pub mod error;
pub mod retry;
pub mod token;
pub mod types;

pub use client::{
    API_VERSION, Accepted, AllSubscriptions, CallContext, CallMeta, MAX_BATCH_USAGE_EVENTS,
    MarketplaceClient, Response, SubscriptionPages, UpdateOutcome, operation_id_from_location,
};
pub use error::{Call, Error, Failure, TransientCause};
pub use retry::RetryPolicy;
pub use token::{AccessToken, TokenProvider};
pub use types::{
    AadIdentifier, AllowedCustomerOperation, BatchUsageEventResponse, Operation, OperationAction,
    OperationStatus, Plan, ReconStatus, RequestSource, ResolvedSubscription, SandboxType,
    SessionMode, SourceOffer, Subscription, SubscriptionStatus, SubscriptionsPage, Term, TermUnit,
    UpdateOperationStatus, UsageAggregate, UsageEvent, UsageEventAdditionalInfo, UsageEventError,
    UsageEventOutcome, UsageEventResponse, UsageEventStatus, UsageEventsQuery, WebhookEnvelope,
    WebhookPayload,
};
