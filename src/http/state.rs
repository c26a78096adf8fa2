//! What every handler shares: the pool, the broker, the webhook verifier, the Marketplace
//! client and the few settings the handlers read. Cheap to clone (everything is an `Arc`
//! or a pool handle).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fulfillment_state_machine::ActivationMode;
use metrics_exporter_prometheus::PrometheusHandle;
use secrecy::{ExposeSecret, SecretString};
use sqlx::postgres::PgPool;

use super::auth::{WebhookAuthConfig, WebhookVerifier};
use super::metrics;
use crate::marketplace::{MarketplaceClient, TokenProvider};
use crate::queue::{Broker, InboundMessage, MessageMeta, PublishError};
use crate::settings::{Settings, WebhookAuth};
use crate::store;

/// The shared state of the ingress router.
#[derive(Clone, Debug)]
pub struct AppState {
    pub pool: PgPool,
    pub broker: Broker,
    /// `None` only in the explicitly insecure `WEBHOOK_AUTH=none` mode.
    pub verifier: Option<WebhookVerifier>,
    pub marketplace: MarketplaceClient,
    pub metrics: PrometheusHandle,
    pub config: Arc<IngressConfig>,
    /// The landing page's and the console's settings and session key.
    pub web: Arc<crate::web::WebConfig>,
}

/// The settings the handlers read, parsed once.
pub struct IngressConfig {
    pub body_limit_bytes: usize,
    /// The entitlement API key as a SHA-256 digest: compared in constant time without
    /// leaking its length, and the key itself is not kept around.
    pub api_key_digest: Option<[u8; 32]>,
    /// The scoped keys (`ENTITLEMENT_API_KEYS`, its file), as digests with their scope.
    pub scoped_key_digests: Vec<([u8; 32], crate::settings::ApiScope)>,
    pub publish_confirm_timeout: Duration,
    pub activation: ActivationMode,
    /// Metering (the dimensions' time to live).
    pub metering: crate::metering::MeteringConfig,
    /// Webhook endpoints: the rotation overlap and the test event's timeout.
    pub webhooks: crate::settings::WebhookSettings,
    /// The machine's policy: a command the machine would refuse now is refused at once.
    pub policy: fulfillment_state_machine::Policy,
    /// When the console calls a pending purchase stuck (`reconcile.stuck_pending_after`).
    pub stuck_pending_after: Duration,
}

impl std::fmt::Debug for IngressConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not even the key's digest reaches logs: a weak key could be brute-forced from it.
        f.debug_struct("IngressConfig")
            .field("body_limit_bytes", &self.body_limit_bytes)
            .field(
                "api_key",
                &self
                    .api_key_digest
                    .map(|_| "<configured>")
                    .unwrap_or("<none>"),
            )
            .field("scoped_api_keys", &self.scoped_key_digests.len())
            .field("publish_confirm_timeout", &self.publish_confirm_timeout)
            .field("activation", &self.activation)
            .finish()
    }
}

impl IngressConfig {
    pub fn from_settings(settings: &Settings) -> Self {
        Self {
            body_limit_bytes: settings.ingress.body_limit_bytes,
            api_key_digest: settings.ingress.api_key.as_ref().map(digest_key),
            scoped_key_digests: settings
                .ingress
                .api_keys
                .iter()
                .map(|k| (digest_key(&k.key), k.scope))
                .collect(),
            publish_confirm_timeout: settings.ingress.publish_confirm_timeout,
            activation: settings.policy.activation,
            metering: settings.metering.clone(),
            webhooks: settings.webhooks.clone(),
            policy: settings.policy.clone(),
            stuck_pending_after: settings.reconcile.stuck_pending_after,
        }
    }
}

/// SHA-256 of an API key.
pub fn digest_key(key: &SecretString) -> [u8; 32] {
    digest_bytes(key.expose_secret().as_bytes())
}

pub(crate) fn digest_bytes(bytes: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

impl AppState {
    /// Connects PostgreSQL and RabbitMQ and builds the verifier and the Marketplace client.
    /// Each failure names what is unreachable or missing.
    pub async fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let pool = store::connect(&settings.database).await?;
        let broker = Broker::connect(&settings.amqp, "fulfillment-serve").await?;
        store::prefixes::record(&pool, &settings.amqp.prefix, "serve").await?;
        let verifier = build_verifier(settings)?;
        let tokens = TokenProvider::for_settings(settings)
            .context("cannot set up the Marketplace API client (needed by the landing page)")?;
        let marketplace = MarketplaceClient::new(&settings.marketplace, tokens)
            .context("cannot set up the Marketplace API client (needed by the landing page)")?;
        Ok(Self {
            pool,
            broker,
            verifier,
            marketplace,
            metrics: metrics::prometheus_handle(),
            config: Arc::new(IngressConfig::from_settings(settings)),
            web: crate::web::config(settings)?,
        })
    }

    /// Publishes one message for the workers and waits for RabbitMQ's confirm, within the
    /// configured timeout. `Ok` means the broker took responsibility for it.
    pub async fn publish(
        &self,
        message: &InboundMessage,
        meta: &MessageMeta,
    ) -> Result<(), PublishError> {
        let started = Instant::now();
        let timeout = self.config.publish_confirm_timeout;
        let attempt = async {
            // `publisher()` is cached by the broker and reopens its channel after a
            // reconnect, so asking each time keeps working across broker restarts.
            let publisher = self
                .broker
                .publisher()
                .await
                .map_err(|e| PublishError::Unavailable(e.to_string()))?
                .with_confirm_timeout(timeout)
                .with_recovery_timeout(timeout);
            publisher.publish_inbound(message, meta).await
        };
        // Belt and braces: never let one publish hold a webhook call open much longer than
        // the confirm timeout (Microsoft expects a fast answer, the router stops at 10 s).
        let result = match tokio::time::timeout(timeout + Duration::from_millis(500), attempt).await
        {
            Ok(result) => result,
            Err(_) => Err(PublishError::Timeout),
        };
        let outcome = match &result {
            Ok(()) => "confirmed",
            Err(PublishError::Unavailable(_)) => "unavailable",
            Err(PublishError::Nacked) => "nacked",
            Err(PublishError::Timeout) => "timeout",
            Err(PublishError::Unroutable) => "unroutable",
        };
        metrics::record_publish_confirm(started.elapsed(), outcome);
        result
    }
}

fn build_verifier(settings: &Settings) -> anyhow::Result<Option<WebhookVerifier>> {
    match settings.ingress.webhook_auth {
        WebhookAuth::InsecureNone => {
            tracing::warn!(
                "WEBHOOK AUTHENTICATION IS OFF (WEBHOOK_AUTH=none): anyone who can reach \
                 POST /webhook can forge Marketplace events. Use this only with a local \
                 emulator, never in production"
            );
            Ok(None)
        }
        WebhookAuth::Entra => {
            let mut config = WebhookAuthConfig::from_settings(
                &settings.marketplace,
                settings.ingress.jwks_url.clone(),
            )
            .context("cannot set up webhook authentication")?;
            for audience in &settings.ingress.webhook_audiences {
                if !config.audiences.contains(audience) {
                    config.audiences.push(audience.clone());
                }
            }
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .context("cannot build the HTTP client for the JWKS")?;
            Ok(Some(WebhookVerifier::new(config, http)))
        }
    }
}
