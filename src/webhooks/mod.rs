//! The ISV's side of our events: signed webhooks to its product and the pull feed
//! (docs/webhooks.md). [`endpoint`] parses what an endpoint is registered with and
//! [`signature`] is the Standard Webhooks signature (both pure); [`manage`] is what the
//! entitlement API and the `fulfillment endpoint` CLI do with endpoints; [`receiver`] is a
//! verifying endpoint for the demo. The delivery
//! decision is a protocol step (`worker::protocol::deliver`), its IO the delivery runner
//! (`worker::deliveries`); the tables are `store::endpoints` and `store::deliveries`.

pub mod endpoint;
pub mod manage;
pub mod receiver;
pub mod signature;

pub use endpoint::{EndpointUrl, EndpointUrlError, TopicFilter, TopicFilterError};
pub use signature::{Secret, SecretError, sign, verify};

/// The topic of the test event (`POST /api/v1/webhook-endpoints/{id}/test`).
pub const TEST_TOPIC: &str = "webhook.test";
