//! The ISV's side of our events: signed webhooks to its product and the pull feed
//! (docs/webhooks.md). Pure pieces only — the endpoint's parsed settings ([`endpoint`]) and
//! the Standard Webhooks signature ([`signature`]); the delivery decision is a protocol step
//! (`worker::protocol::deliver`), its IO the delivery runner (`worker::deliveries`), the
//! tables `store::endpoints` and `store::deliveries`.

pub mod endpoint;
pub mod signature;

pub use endpoint::{EndpointUrl, EndpointUrlError, TopicFilter, TopicFilterError};
pub use signature::{Secret, SecretError, sign};

/// The topic of the test event (`POST /api/v1/webhook-endpoints/{id}/test`).
pub const TEST_TOPIC: &str = "webhook.test";
