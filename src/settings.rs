//! One typed settings tree for every subcommand: built-in defaults, then an optional TOML
//! file, then the environment.
//!
//! The conventional variables (`DATABASE_URL`, `AMQP_URL`, `MARKETPLACE_API_URL`,
//! `ENTRA_AUTHORITY_URL`, `MARKETPLACE_TENANT_ID`, `MARKETPLACE_CLIENT_ID`,
//! `MARKETPLACE_CLIENT_SECRET`, `LISTEN_ADDR`, `LOG_FORMAT`, and the credential variables of
//! docs/credentials.md: `MARKETPLACE_CREDENTIAL`, `AZURE_*`, `IDENTITY_*`) map onto their keys; any key can
//! also be set as `FULFILLMENT__SECTION__KEY`. Values are parsed once, here: an invalid value
//! fails at startup with a message naming both the variable and the key. Secrets (the client
//! secret, passwords inside connection URLs) are redacted in `Debug` output.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use fulfillment_state_machine::{NoticePolicy, Policy};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use url::Url;
use uuid::Uuid;

/// The application id of Microsoft's marketplace SaaS and metering API: the token scope
/// (`{id}/.default`) or v1 `resource` for our calls, and the `azp`/`appid` of the webhook
/// tokens Microsoft sends us (docs/marketplace.md §2.3, §6.6).
pub const MARKETPLACE_APP_ID: &str = "20e940b3-4c77-4b0b-9a53-9e16a1b010a7";

/// Environment variables with a conventional name, and the key each one sets.
pub const ENV_KEYS: &[(&str, &str)] = &[
    ("DATABASE_URL", "database.url"),
    ("AMQP_URL", "amqp.url"),
    ("MARKETPLACE_API_URL", "marketplace.api_url"),
    ("ENTRA_AUTHORITY_URL", "marketplace.entra_authority_url"),
    ("MARKETPLACE_TENANT_ID", "marketplace.tenant_id"),
    ("MARKETPLACE_CLIENT_ID", "marketplace.client_id"),
    ("MARKETPLACE_CLIENT_SECRET", "marketplace.client_secret"),
    ("MARKETPLACE_TOKEN_ENDPOINT", "marketplace.token_endpoint"),
    ("MARKETPLACE_CREDENTIAL", "credentials.kind"),
    (
        "MARKETPLACE_CLIENT_CERTIFICATE_PATH",
        "credentials.certificate_path",
    ),
    (
        "MARKETPLACE_CLIENT_CERTIFICATE_KEY_PATH",
        "credentials.certificate_key_path",
    ),
    (
        "MARKETPLACE_CLIENT_SECRET_EXPIRES_AT",
        "credentials.secret_expires_at",
    ),
    (
        "AZURE_FEDERATED_TOKEN_FILE",
        "credentials.federated_token_file",
    ),
    ("AZURE_CLIENT_ID", "credentials.azure_client_id"),
    ("AZURE_TENANT_ID", "credentials.azure_tenant_id"),
    ("AZURE_AUTHORITY_HOST", "credentials.azure_authority_host"),
    ("IDENTITY_ENDPOINT", "credentials.identity_endpoint"),
    ("IDENTITY_HEADER", "credentials.identity_header"),
    ("MARKETPLACE_IMDS_ENDPOINT", "credentials.imds_endpoint"),
    ("LISTEN_ADDR", "http.listen_addr"),
    ("PUBLIC_URL", "http.public_url"),
    ("HTTP_MAX_CONNECTIONS", "http.max_connections"),
    ("HTTP_IDLE_TIMEOUT_SECS", "http.idle_timeout_secs"),
    ("WEBHOOK_AUTH", "ingress.webhook_auth"),
    (
        "WEBHOOK_AUTH_ALLOW_INSECURE",
        "ingress.allow_insecure_no_auth",
    ),
    ("WEBHOOK_JWKS_URL", "ingress.jwks_url"),
    ("WEBHOOK_AUDIENCES", "ingress.webhook_audiences"),
    ("WEBHOOK_BODY_LIMIT_BYTES", "ingress.body_limit_bytes"),
    ("ENTITLEMENT_API_KEY", "ingress.api_key"),
    ("ENTITLEMENT_API_KEYS", "ingress.api_keys"),
    ("ENTITLEMENT_API_KEYS_FILE", "ingress.api_keys_file"),
    ("ACTIVATION_MODE", "policy.activation"),
    ("LOG_FORMAT", "log.format"),
    ("WORKER_METRICS_ADDR", "worker.metrics_addr"),
    ("WORKER_APPLY_BATCH", "worker.apply_batch"),
    ("METERING_GRACE_SECS", "metering.grace_secs"),
    ("WEB_SESSION_KEY", "web.session_key"),
    ("WEB_CLIENT_ID", "web.client_id"),
    ("WEB_CLIENT_SECRET", "web.client_secret"),
    ("WEB_AUTHORITY_URL", "web.authority_url"),
    ("CONSOLE_TENANT_ID", "web.console_tenant_id"),
    ("CONSOLE_OPERATORS", "web.console_operators"),
    ("CONSOLE_READ_ONLY", "web.console_read_only"),
    ("LANDING_PRODUCT_NAME", "web.product_name"),
    ("LANDING_LOGO_URL", "web.logo_url"),
    ("LANDING_BRAND_COLOUR", "web.brand_colour"),
    ("LANDING_SUPPORT_CONTACT", "web.support_contact"),
    ("LANDING_PRODUCT_URL", "web.product_url"),
    ("LANDING_FIELDS", "web.onboarding_fields"),
    (
        "LANDING_ACTIVATE_AFTER_SIGN_IN",
        "web.activate_after_sign_in",
    ),
    ("ISV_WEBHOOK_RETRY_SCHEDULE", "webhooks.retry_schedule"),
];

/// The variable naming an optional settings file.
pub const CONFIG_FILE_ENV: &str = "FULFILLMENT_CONFIG";

/// Every setting, parsed.
#[derive(Clone, Debug)]
pub struct Settings {
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub marketplace: MarketplaceSettings,
    pub http: HttpSettings,
    pub ingress: IngressSettings,
    /// The ISV's rules for plan moves, seat limits and activation (the machine's policy).
    pub policy: Policy,
    pub worker: WorkerSettings,
    pub log: LogSettings,
    pub reconcile: ReconcileSettings,
    /// `[metering]`: closing usage hours (docs/metering.md).
    pub metering: crate::metering::MeteringConfig,
    /// How the Fulfillment API token is obtained (docs/credentials.md).
    pub credential: CredentialSettings,
    /// `[web]`: sign-in, sessions, the landing page's branding and the console's operators
    /// (docs/web.md).
    pub web: WebSettings,
    /// `[webhooks]`: deliveries to the ISV's endpoints (docs/webhooks.md).
    pub webhooks: WebhookSettings,
}

/// `[web]`: the pages people use (docs/web.md).
#[derive(Clone, Debug)]
pub struct WebSettings {
    /// Signs the session cookies and encrypts the pending sign-in: at least 64 bytes,
    /// base64. `None`: a random key per process (sessions end at a restart and are not
    /// shared between replicas; a warning says so).
    pub session_key: Option<SessionKey>,
    /// The Entra app customers and operators sign in with; default `marketplace.client_id`
    /// (the landing page's multi-tenant app is usually the publisher's own).
    pub client_id: Option<String>,
    /// Its secret; default `marketplace.client_secret`.
    pub client_secret: Option<SecretString>,
    /// Where sign-in goes; default `marketplace.entra_authority_url`.
    pub authority_url: Option<Url>,
    /// The ISV's tenant, whose users may use the console; default `marketplace.tenant_id`.
    pub console_tenant_id: Option<Uuid>,
    /// Who may act in the console.
    pub console_operators: Vec<OperatorRule>,
    /// Who may only look.
    pub console_read_only: Vec<OperatorRule>,
    pub branding: Branding,
    /// Questions the landing page asks before activation (`name:Label`, comma-separated).
    pub onboarding_fields: Vec<OnboardingField>,
    /// Activate as soon as the customer has signed in, without the button.
    pub activate_after_sign_in: bool,
}

/// At least 64 bytes that sign and encrypt cookies; never printed.
#[derive(Clone)]
pub struct SessionKey(Vec<u8>);

impl SessionKey {
    /// 64 random bytes (the demo and tests; production sets `WEB_SESSION_KEY`).
    pub fn generate() -> Self {
        let mut bytes = vec![0u8; 64];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random generator works");
        Self(bytes)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<redacted>)")
    }
}

/// One entry of an operator list: `group:<guid>`, an object id (a bare GUID) or an e-mail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OperatorRule {
    ObjectId(Uuid),
    Group(Uuid),
    /// Lower-cased.
    Email(String),
}

/// How the landing page looks and where it sends the customer next.
#[derive(Clone, Debug)]
pub struct Branding {
    pub product_name: String,
    pub logo_url: Option<Url>,
    /// `#rrggbb`: headings, links and buttons (text on it is white, so pick a dark one).
    pub brand_colour: String,
    /// An e-mail address or URL shown as "Need help?".
    pub support_contact: Option<String>,
    /// The product's own sign-in page ("Open <product>").
    pub product_url: Option<Url>,
}

/// A question on the landing page, stored with the subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnboardingField {
    /// The key it is stored under: letters, digits and `_`.
    pub name: String,
    pub label: String,
}

/// `[webhooks]`: signed deliveries to the ISV's endpoints (docs/webhooks.md).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Delay before each retry (Svix's schedule by default).
    pub retry_schedule: Vec<Duration>,
    /// An endpoint failing this long is disabled with an alert.
    pub disable_after: Duration,
    /// One attempt's time limit.
    pub timeout: Duration,
    /// Deliveries in flight at once, per worker process.
    pub concurrency: usize,
    /// How long a rotated-out secret keeps signing next to the new one.
    pub rotation_overlap: Duration,
}

impl WebhookSettings {
    /// The delivery runner's clocks.
    pub fn delivery_config(&self) -> crate::worker::protocol::deliver::DeliveryConfig {
        crate::worker::protocol::deliver::DeliveryConfig {
            schedule: self.retry_schedule.clone(),
            disable_after: self.disable_after,
            timeout: self.timeout,
            concurrency: self.concurrency,
            ..Default::default()
        }
    }
}

/// Which credential obtains the Fulfillment API token (`MARKETPLACE_CREDENTIAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// `client_secret` (`MARKETPLACE_CLIENT_SECRET`).
    Secret,
    /// A client assertion signed with the app's certificate key.
    Certificate,
    /// A federated token from a file (AKS workload identity, GitHub Actions, any OIDC issuer).
    WorkloadIdentity,
    /// The host's managed identity (App Service `IDENTITY_ENDPOINT` or IMDS).
    ManagedIdentity,
}

impl CredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Secret => "secret",
            CredentialKind::Certificate => "certificate",
            CredentialKind::WorkloadIdentity => "workload_identity",
            CredentialKind::ManagedIdentity => "managed_identity",
        }
    }
}

/// `[credentials]`: the settings of the four credential forms. Which one is used is
/// [`CredentialSettings::resolve`]'s answer.
#[derive(Clone, Debug)]
pub struct CredentialSettings {
    /// `MARKETPLACE_CREDENTIAL`; `None` picks from the environment.
    pub kind: Option<CredentialKind>,
    /// PEM file with the certificate (and the private key unless `certificate_key_path`).
    pub certificate_path: Option<PathBuf>,
    /// PEM file with the private key, when it is not in `certificate_path`.
    pub certificate_key_path: Option<PathBuf>,
    /// When the client secret expires (Entra shows it beside the secret).
    pub secret_expires_at: Option<time::OffsetDateTime>,
    pub federated_token_file: Option<PathBuf>,
    /// `AZURE_CLIENT_ID`: the app of a workload identity, or a user-assigned managed identity.
    pub azure_client_id: Option<Uuid>,
    pub azure_tenant_id: Option<Uuid>,
    /// `AZURE_AUTHORITY_HOST`: the authority of a workload identity (default
    /// `ENTRA_AUTHORITY_URL`).
    pub azure_authority_host: Option<Url>,
    /// App Service / Container Apps managed identity endpoint.
    pub identity_endpoint: Option<Url>,
    pub identity_header: Option<SecretString>,
    /// IMDS base URL (`http://169.254.169.254`; tests point it at the simulator).
    pub imds_endpoint: Url,
}

impl CredentialSettings {
    /// The credential in use: `MARKETPLACE_CREDENTIAL`, or the first the environment
    /// provides, in the Azure SDKs' order (secret, certificate, workload identity, managed
    /// identity endpoint). `None`: nothing is configured.
    pub fn resolve(&self, client_secret_set: bool) -> Option<CredentialKind> {
        self.kind.or_else(|| {
            if client_secret_set {
                Some(CredentialKind::Secret)
            } else if self.certificate_path.is_some() {
                Some(CredentialKind::Certificate)
            } else if self.federated_token_file.is_some() {
                Some(CredentialKind::WorkloadIdentity)
            } else if self.identity_endpoint.is_some() || self.identity_header.is_some() {
                Some(CredentialKind::ManagedIdentity)
            } else {
                None
            }
        })
    }

    /// The credential in use with the file it cannot do without, or what is missing in
    /// words that name the variables. The one owner of this rule: the start-up check
    /// ([`Settings::require_marketplace_identity`]) and the token provider both ask it.
    pub fn choose(&self, client_secret_set: bool) -> Result<ChosenCredential, &'static str> {
        match self.resolve(client_secret_set) {
            None => Err(
                "no credential for the Fulfillment API: set MARKETPLACE_CLIENT_SECRET (client \
                 secret), MARKETPLACE_CLIENT_CERTIFICATE_PATH (certificate), \
                 AZURE_FEDERATED_TOKEN_FILE (workload identity) or IDENTITY_ENDPOINT and \
                 IDENTITY_HEADER (managed identity), or choose with \
                 MARKETPLACE_CREDENTIAL=secret|certificate|workload_identity|managed_identity \
                 (managed_identity alone on an Azure VM)",
            ),
            Some(CredentialKind::Secret) if !client_secret_set => {
                Err("MARKETPLACE_CLIENT_SECRET is not set (MARKETPLACE_CREDENTIAL=secret)")
            }
            Some(CredentialKind::Secret) => Ok(ChosenCredential::Secret),
            Some(CredentialKind::Certificate) => match &self.certificate_path {
                Some(path) => Ok(ChosenCredential::Certificate(path.clone())),
                None => Err("MARKETPLACE_CLIENT_CERTIFICATE_PATH is not set \
                     (MARKETPLACE_CREDENTIAL=certificate): a PEM file with the certificate and \
                     its private key, or set MARKETPLACE_CLIENT_CERTIFICATE_KEY_PATH for the key"),
            },
            Some(CredentialKind::WorkloadIdentity) => match &self.federated_token_file {
                Some(path) => Ok(ChosenCredential::WorkloadIdentity(path.clone())),
                None => Err("AZURE_FEDERATED_TOKEN_FILE is not set \
                     (MARKETPLACE_CREDENTIAL=workload_identity): AKS sets it when the pod has the \
                     label azure.workload.identity/use: \"true\" and its service account the \
                     annotation azure.workload.identity/client-id"),
            },
            Some(CredentialKind::ManagedIdentity) => Ok(ChosenCredential::ManagedIdentity),
        }
    }
}

/// The credential [`CredentialSettings::choose`] found, with the file it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChosenCredential {
    Secret,
    /// The PEM file with the certificate.
    Certificate(PathBuf),
    /// The federated token file.
    WorkloadIdentity(PathBuf),
    ManagedIdentity,
}

/// `[reconcile]`: the periodic reconciliation `fulfillment work` runs, and what counts as
/// stuck (P27).
#[derive(Clone, Debug)]
pub struct ReconcileSettings {
    /// Between runs inside `fulfillment work`; `None` (0 s, the default) runs none.
    pub interval: Option<Duration>,
    /// A purchase PendingFulfillment for longer than this is reported as stuck.
    pub stuck_pending_after: Duration,
    /// Whether periodic runs heal (feed observations through the machine) or only report.
    pub execute: bool,
}

/// How `fulfillment work` consumes and runs effects (`[worker]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerSettings {
    /// Unacknowledged inbound deliveries RabbitMQ may push ahead to one worker.
    pub prefetch: u16,
    /// Effects executed at once; `None`: derived from `database.max_connections` (each
    /// effect in hand holds a connection).
    pub effect_concurrency: Option<usize>,
    /// Failed attempts of one effect before its outbox row is dead.
    pub max_attempts: u32,
    /// Poll of the outbox between wake-ups: the longest a row another worker process left waits.
    pub poll_interval: Duration,
    /// First retry delay of a failed effect; doubles per attempt (jittered) up to the max.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Between GETs of a publisher operation still in progress (§7.2).
    pub operation_poll_interval: Duration,
    /// Polling stops after this; the subscription is then observed (§7.2). Also how long a
    /// PATCH/DELETE whose answer was lost is followed, and a DELETE answered 409 waits for
    /// the lock (§15.2, §4.8): each as long as an operation may run.
    pub operation_poll_cap: Duration,
    /// First delay between GETs while an activation is pending (P4); grows by half per
    /// check to about 15 s (§15.4).
    pub activation_check_interval: Duration,
    /// Activation checks stop after this; the subscription is observed as it is.
    pub activation_wait_cap: Duration,
    /// How long a publisher PATCH/DELETE whose answer was lost is followed before its
    /// command is "outcome unknown", for an operator (§15.2).
    pub unknown_outcome_budget: Duration,
    /// How long a DELETE answered 409 (another operation holds the lock) waits for it.
    pub lock_wait_budget: Duration,
    /// On SIGTERM, how long the work in hand may take to finish; what is still in hand
    /// then is abandoned to the broker's redelivery and the outbox's next claim.
    pub shutdown_grace: Duration,
    /// A delivery held unacknowledged longer than this means the worker is stuck: `/readyz`
    /// answers 503 and `fulfillment_deliveries_held_too_long` counts it.
    pub stall_after: Duration,
    /// When lifecycle notices are due (`term_ending_notice_days`, `notice_day_ms`); copied
    /// into the machine's policy.
    pub notices: NoticePolicy,
    /// Where the worker serves `/metrics`, `/healthz` and `/readyz` (port 0 picks one; the
    /// bound address is logged).
    pub metrics_addr: SocketAddr,
    /// Inbound messages (of different subscriptions) applied in one transaction with one
    /// commit, a savepoint each; 1 applies each in a transaction of its own.
    pub apply_batch: usize,
}

#[derive(Clone, Debug)]
pub struct IngressSettings {
    pub webhook_auth: WebhookAuth,
    /// JWKS for webhook tokens; default `{ENTRA_AUTHORITY_URL}/{tenant}/discovery/v2.0/keys`.
    pub jwks_url: Option<Url>,
    /// Accepted `aud` values of webhook tokens; default: the publisher's client id.
    pub webhook_audiences: Vec<String>,
    /// Larger webhook bodies are refused with 413.
    pub body_limit_bytes: usize,
    /// Bearer key of the entitlement API (`/api/v1`), read-write; without any key the API
    /// refuses every call.
    pub api_key: Option<SecretString>,
    /// More keys, each with its scope (`ENTITLEMENT_API_KEYS`, `ENTITLEMENT_API_KEYS_FILE`).
    pub api_keys: Vec<ScopedApiKey>,
    /// How long the webhook handler waits for RabbitMQ's publisher confirm before a 503.
    pub publish_confirm_timeout: Duration,
}

/// What an entitlement API key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiScope {
    /// GET only.
    Read,
    /// Everything.
    Write,
}

/// One entitlement API key and its scope. `Debug` never shows the key.
#[derive(Clone, Debug)]
pub struct ScopedApiKey {
    pub scope: ApiScope,
    pub key: SecretString,
}

/// `read:KEY` / `write:KEY` entries, separated by commas or new lines (`#` starts a
/// comment line). Errors name the entry's position, never the key.
fn parse_scoped_keys(text: &str, key: &'static str) -> Result<Vec<ScopedApiKey>, SettingsError> {
    let mut keys = Vec::new();
    let entries = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .flat_map(|line| line.split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty());
    for (index, entry) in entries.enumerate() {
        let Some((scope, secret)) = entry.split_once(':') else {
            return invalid(
                key,
                format!("entry {} is not `read:KEY` or `write:KEY`", index + 1),
            );
        };
        let scope = match scope.trim() {
            "read" => ApiScope::Read,
            "write" => ApiScope::Write,
            _ => {
                return invalid(
                    key,
                    format!("entry {}: the scope must be `read` or `write`", index + 1),
                );
            }
        };
        let secret = secret.trim();
        if secret.len() < 16 {
            return invalid(
                key,
                format!("entry {}: a key has at least 16 characters", index + 1),
            );
        }
        keys.push(ScopedApiKey {
            scope,
            key: SecretString::from(secret.to_owned()),
        });
    }
    Ok(keys)
}

/// How webhook calls are authenticated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WebhookAuth {
    /// Verify Microsoft's Entra JWT (docs/marketplace.md §6.6). The only mode for production.
    Entra,
    /// No verification, for local emulators that send no token. Needs
    /// `WEBHOOK_AUTH_ALLOW_INSECURE=true` as well, and logs a warning at startup.
    InsecureNone,
}

#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// `postgres://…`; the database is created by `fulfillment migrate` when absent.
    pub url: ConnectionUrl,
    pub max_connections: u32,
    pub acquire_timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct AmqpSettings {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: ConnectionUrl,
    /// Prefix of every exchange and queue name we declare, so several installations (or
    /// tests) can share one broker.
    pub prefix: String,
}

#[derive(Clone, Debug)]
pub struct MarketplaceSettings {
    /// Base of the SaaS Fulfillment API, up to and including `/api`.
    pub api_url: Url,
    /// Entra authority (token endpoint and JWKS host).
    pub entra_authority_url: Url,
    /// The publisher's Entra tenant (Partner Center → Technical configuration).
    pub tenant_id: Option<Uuid>,
    /// The publisher's Entra application (client) id.
    pub client_id: Option<Uuid>,
    pub client_secret: Option<SecretString>,
    pub token_endpoint: TokenEndpoint,
    pub request_timeout: Duration,
}

/// Which Entra token endpoint to call (docs/marketplace.md §2.2, §2.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenEndpoint {
    /// `/{tenant}/oauth2/v2.0/token` with `scope={app}/.default`.
    V2,
    /// `/{tenant}/oauth2/token` with `resource={app}`.
    V1,
}

#[derive(Clone, Debug)]
pub struct HttpSettings {
    pub listen_addr: SocketAddr,
    /// Where Microsoft and buyers reach the ingress from outside (the base of the webhook
    /// and landing page URLs entered in Partner Center's Technical configuration). Only
    /// `fulfillment doctor` reads it; the ingress itself never needs to know.
    pub public_url: Option<Url>,
    /// Connections served at once; more wait in the kernel's accept queue
    /// ([`crate::http::listener`]).
    pub max_connections: usize,
    /// A connection that sends nothing, or takes none of our answer, for this long is
    /// closed.
    pub idle_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines, for a terminal.
    Pretty,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Clone, Debug)]
pub struct LogSettings {
    pub format: LogFormat,
}

/// A connection URL whose password never reaches `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionUrl(Url);

impl ConnectionUrl {
    /// The full URL, password included: only for handing to a driver.
    pub fn expose(&self) -> &str {
        self.0.as_str()
    }

    pub fn url(&self) -> &Url {
        &self.0
    }

    /// The same URL with another path (e.g. another database on the same server).
    pub fn with_path(&self, path: &str) -> Self {
        let mut url = self.0.clone();
        url.set_path(path);
        Self(url)
    }

    /// Renders the URL with the password replaced by `***`.
    pub fn redacted(&self) -> String {
        let mut url = self.0.clone();
        if url.password().is_some() {
            // Only fails for URLs that cannot have a password, which we just saw has one.
            let _ = url.set_password(Some("***"));
        }
        url.to_string()
    }
}

impl fmt::Debug for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("ConnectionUrl")
            .field(&self.redacted())
            .finish()
    }
}

impl fmt::Display for ConnectionUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// A setting that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("invalid setting {key}{}: {reason}", env_hint(key))]
    Invalid { key: &'static str, reason: String },
    #[error("cannot read settings: {0}")]
    Source(#[from] config::ConfigError),
    #[error("settings file {path} does not exist (named by {CONFIG_FILE_ENV} or --config)")]
    MissingFile { path: PathBuf },
    #[error("{0}")]
    Required(String),
    #[error("{} problems with the settings:{}", .0.len(), list_problems(.0))]
    Many(Vec<SettingsError>),
}

fn list_problems(problems: &[SettingsError]) -> String {
    problems
        .iter()
        .map(|problem| format!("\n  - {problem}"))
        .collect()
}

fn env_hint(key: &str) -> String {
    match ENV_KEYS.iter().find(|(_, k)| *k == key) {
        Some((var, _)) => format!(" (environment variable {var})"),
        None => format!(
            " (environment variable FULFILLMENT__{})",
            key.replace('.', "__").to_uppercase()
        ),
    }
}

/// The tree as read from the sources, before parsing. Field names are the keys.
#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSettings {
    database: RawDatabase,
    amqp: RawAmqp,
    marketplace: RawMarketplace,
    http: RawHttp,
    ingress: RawIngress,
    policy: Policy,
    worker: RawWorker,
    log: RawLog,
    reconcile: RawReconcile,
    metering: RawMetering,
    webhooks: RawWebhooks,
    /// `[credentials]` (plural: `credential.*` names domain event types).
    #[serde(rename = "credentials")]
    credential: RawCredential,
    web: RawWeb,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawWeb {
    session_key: Option<SecretString>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    authority_url: Option<String>,
    console_tenant_id: Option<String>,
    console_operators: Option<String>,
    console_read_only: Option<String>,
    product_name: String,
    logo_url: Option<String>,
    brand_colour: String,
    support_contact: Option<String>,
    product_url: Option<String>,
    onboarding_fields: Option<String>,
    activate_after_sign_in: bool,
}

impl Default for RawWeb {
    fn default() -> Self {
        Self {
            session_key: None,
            client_id: None,
            client_secret: None,
            authority_url: None,
            console_tenant_id: None,
            console_operators: None,
            console_read_only: None,
            product_name: "Our product".into(),
            logo_url: None,
            // 7.5:1 against white (WCAG AAA).
            brand_colour: "#1f4e79".into(),
            support_contact: None,
            product_url: None,
            onboarding_fields: None,
            activate_after_sign_in: false,
        }
    }
}

fn parse_web(raw: RawWeb) -> Result<WebSettings, SettingsError> {
    use base64::Engine as _;
    let text = |v: Option<String>| v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let session_key = match raw
        .session_key
        .as_ref()
        .map(|k| k.expose_secret().trim().to_owned())
        .filter(|k| !k.is_empty())
    {
        None => None,
        Some(key) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&key)
                .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&key))
                .map_err(|_| SettingsError::Invalid {
                    key: "web.session_key",
                    reason: "not base64 (generate one with `openssl rand -base64 64`)".into(),
                })?;
            if bytes.len() < 64 {
                return invalid(
                    "web.session_key",
                    format!(
                        "{} bytes is too short: at least 64 (`openssl rand -base64 64`)",
                        bytes.len()
                    ),
                );
            }
            Some(SessionKey(bytes))
        }
    };
    let brand_colour = raw.brand_colour.trim().to_ascii_lowercase();
    if !(brand_colour.len() == 7
        && brand_colour.starts_with('#')
        && brand_colour[1..].chars().all(|c| c.is_ascii_hexdigit()))
    {
        return invalid(
            "web.brand_colour",
            format!("expected a colour such as #1f4e79, got {brand_colour:?}"),
        );
    }
    let product_name = raw.product_name.trim().to_owned();
    if product_name.is_empty() || product_name.chars().count() > 80 {
        return invalid("web.product_name", "must be 1 to 80 characters");
    }
    let url = |key: &'static str, v: Option<String>| -> Result<Option<Url>, SettingsError> {
        text(v).map(|v| parse_http_url(key, &v)).transpose()
    };
    let support_contact = text(raw.support_contact);
    if let Some(contact) = &support_contact {
        let is_email = contact.contains('@') && !contact.contains([':', '/', ' ', '<', '>', '"']);
        if !is_email {
            parse_http_url("web.support_contact", contact).map_err(|_| SettingsError::Invalid {
                key: "web.support_contact",
                reason: "expected an e-mail address or an http(s) URL".into(),
            })?;
        }
    }
    Ok(WebSettings {
        session_key,
        client_id: text(raw.client_id),
        client_secret: raw
            .client_secret
            .filter(|s| !s.expose_secret().trim().is_empty()),
        authority_url: url("web.authority_url", raw.authority_url)?,
        console_tenant_id: parse_guid("web.console_tenant_id", raw.console_tenant_id)?,
        console_operators: operator_rules("web.console_operators", raw.console_operators)?,
        console_read_only: operator_rules("web.console_read_only", raw.console_read_only)?,
        branding: Branding {
            product_name,
            logo_url: url("web.logo_url", raw.logo_url)?,
            brand_colour,
            support_contact,
            product_url: url("web.product_url", raw.product_url)?,
        },
        onboarding_fields: onboarding_fields(raw.onboarding_fields)?,
        activate_after_sign_in: raw.activate_after_sign_in,
    })
}

/// `group:<guid>`, `<object id guid>` or `<e-mail>`, comma-separated.
fn operator_rules(
    key: &'static str,
    raw: Option<String>,
) -> Result<Vec<OperatorRule>, SettingsError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    raw.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            if let Some(group) = entry.strip_prefix("group:") {
                Uuid::parse_str(group.trim())
                    .map(OperatorRule::Group)
                    .map_err(|_| SettingsError::Invalid {
                        key,
                        reason: format!("{entry:?}: a group is group:<object id GUID>"),
                    })
            } else if let Ok(id) = Uuid::parse_str(entry) {
                Ok(OperatorRule::ObjectId(id))
            } else if entry.contains('@') && !entry.contains(char::is_whitespace) {
                Ok(OperatorRule::Email(entry.to_lowercase()))
            } else {
                invalid(
                    key,
                    format!("{entry:?} is neither an object id (GUID), group:<GUID> nor an e-mail"),
                )
            }
        })
        .collect()
}

/// `company:Company name,contact_email:Contact e-mail`.
fn onboarding_fields(raw: Option<String>) -> Result<Vec<OnboardingField>, SettingsError> {
    const KEY: &str = "web.onboarding_fields";
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let mut fields: Vec<OnboardingField> = Vec::new();
    for entry in raw.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let Some((name, label)) = entry.split_once(':') else {
            return invalid(KEY, format!("{entry:?}: expected name:Label"));
        };
        let (name, label) = (name.trim(), label.trim());
        if name.is_empty()
            || name.len() > 40
            || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return invalid(
                KEY,
                format!("{name:?}: a name is 1 to 40 letters, digits or '_'"),
            );
        }
        if label.is_empty() || label.chars().count() > 80 {
            return invalid(KEY, format!("{name}: the label must be 1 to 80 characters"));
        }
        if fields.iter().any(|f| f.name == name) {
            return invalid(KEY, format!("{name} appears twice"));
        }
        fields.push(OnboardingField {
            name: name.to_owned(),
            label: label.to_owned(),
        });
    }
    Ok(fields)
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMetering {
    /// An hour closes this long after its end (0 = at once).
    grace_secs: u64,
    /// Between two looks for closed hours.
    tick_ms: u64,
    /// How long a plan's dimensions from listAvailablePlans are trusted.
    dimensions_ttl_secs: u64,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawWebhooks {
    /// Comma-separated durations with a unit: `5s,5m,30m,2h,5h,10h,10h`.
    retry_schedule: String,
    disable_after_secs: u64,
    timeout_ms: u64,
    concurrency: usize,
    rotation_overlap_secs: u64,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawCredential {
    kind: Option<String>,
    certificate_path: Option<String>,
    certificate_key_path: Option<String>,
    secret_expires_at: Option<String>,
    federated_token_file: Option<String>,
    azure_client_id: Option<String>,
    azure_tenant_id: Option<String>,
    azure_authority_host: Option<String>,
    identity_endpoint: Option<String>,
    identity_header: Option<SecretString>,
    imds_endpoint: String,
}

impl Default for RawCredential {
    fn default() -> Self {
        Self {
            kind: None,
            certificate_path: None,
            certificate_key_path: None,
            secret_expires_at: None,
            federated_token_file: None,
            azure_client_id: None,
            azure_tenant_id: None,
            azure_authority_host: None,
            identity_endpoint: None,
            identity_header: None,
            imds_endpoint: "http://169.254.169.254".into(),
        }
    }
}

fn parse_credential(raw: RawCredential) -> Result<CredentialSettings, SettingsError> {
    let text = |v: Option<String>| v.map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let kind = match text(raw.kind).as_deref() {
        None => None,
        Some("secret" | "client_secret") => Some(CredentialKind::Secret),
        Some("certificate") => Some(CredentialKind::Certificate),
        Some("workload_identity") => Some(CredentialKind::WorkloadIdentity),
        Some("managed_identity") => Some(CredentialKind::ManagedIdentity),
        Some(other) => {
            return invalid(
                "credentials.kind",
                format!(
                    "expected secret, certificate, workload_identity or managed_identity, got {other:?}"
                ),
            );
        }
    };
    let secret_expires_at = match text(raw.secret_expires_at) {
        None => None,
        Some(v) => Some(
            time::OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339)
                .map_err(|_| SettingsError::Invalid {
                    key: "credentials.secret_expires_at",
                    reason: format!(
                        "expected an RFC 3339 time such as 2027-06-30T00:00:00Z, got {v:?}"
                    ),
                })?,
        ),
    };
    let url = |key: &'static str, v: Option<String>| -> Result<Option<Url>, SettingsError> {
        text(v).map(|v| parse_http_url(key, &v)).transpose()
    };
    Ok(CredentialSettings {
        kind,
        certificate_path: text(raw.certificate_path).map(PathBuf::from),
        certificate_key_path: text(raw.certificate_key_path).map(PathBuf::from),
        secret_expires_at,
        federated_token_file: text(raw.federated_token_file).map(PathBuf::from),
        azure_client_id: parse_guid("credentials.azure_client_id", raw.azure_client_id)?,
        azure_tenant_id: parse_guid("credentials.azure_tenant_id", raw.azure_tenant_id)?,
        azure_authority_host: url("credentials.azure_authority_host", raw.azure_authority_host)?,
        identity_endpoint: url("credentials.identity_endpoint", raw.identity_endpoint)?,
        identity_header: raw
            .identity_header
            .filter(|s| !s.expose_secret().trim().is_empty()),
        imds_endpoint: parse_http_url("credentials.imds_endpoint", &raw.imds_endpoint)?,
    })
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawReconcile {
    interval_secs: u64,
    stuck_pending_after_secs: u64,
    execute: bool,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawWorker {
    prefetch: u16,
    effect_concurrency: Option<usize>,
    max_attempts: u32,
    poll_interval_ms: u64,
    backoff_base_ms: u64,
    backoff_max_ms: u64,
    operation_poll_interval_ms: u64,
    operation_poll_cap_secs: u64,
    activation_check_interval_ms: u64,
    activation_wait_cap_secs: u64,
    unknown_outcome_budget_secs: u64,
    lock_wait_budget_secs: u64,
    shutdown_grace_secs: u64,
    stall_after_secs: u64,
    metrics_addr: String,
    term_ending_notice_days: String,
    notice_day_ms: u64,
    apply_batch: usize,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawIngress {
    webhook_auth: String,
    allow_insecure_no_auth: bool,
    jwks_url: Option<String>,
    webhook_audiences: Option<String>,
    body_limit_bytes: usize,
    api_key: Option<SecretString>,
    api_keys: Option<SecretString>,
    api_keys_file: Option<String>,
    publish_confirm_timeout_ms: u64,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawDatabase {
    url: String,
    max_connections: u32,
    acquire_timeout_secs: u64,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawAmqp {
    url: String,
    prefix: String,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawMarketplace {
    api_url: String,
    entra_authority_url: String,
    tenant_id: Option<String>,
    client_id: Option<String>,
    client_secret: Option<SecretString>,
    token_endpoint: String,
    request_timeout_secs: u64,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawHttp {
    listen_addr: String,
    public_url: Option<String>,
    max_connections: usize,
    idle_timeout_secs: u64,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawLog {
    format: String,
}

impl Default for RawSettings {
    fn default() -> Self {
        Self {
            credential: RawCredential::default(),
            web: RawWeb::default(),
            database: RawDatabase {
                // A server on this host: TLS over the loopback interface protects nothing
                // and cost a quarter of `bench pipeline`'s throughput (docs/benchmarks.md),
                // so the default says `sslmode=disable` instead of sqlx's `prefer`. A URL
                // of the operator's own keeps whatever `sslmode` it names (or `prefer`).
                url: "postgres://postgres@127.0.0.1:5432/fulfillment?sslmode=disable".into(),
                max_connections: 10,
                acquire_timeout_secs: 5,
            },
            amqp: RawAmqp {
                url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
                prefix: "fulfillment".into(),
            },
            marketplace: RawMarketplace {
                api_url: "https://marketplaceapi.microsoft.com/api".into(),
                entra_authority_url: "https://login.microsoftonline.com".into(),
                tenant_id: None,
                client_id: None,
                client_secret: None,
                token_endpoint: "v2".into(),
                request_timeout_secs: 30,
            },
            http: RawHttp {
                listen_addr: "127.0.0.1:8080".into(),
                public_url: None,
                max_connections: DEFAULT_MAX_CONNECTIONS,
                idle_timeout_secs: 60,
            },
            ingress: RawIngress {
                webhook_auth: "entra".into(),
                allow_insecure_no_auth: false,
                jwks_url: None,
                webhook_audiences: None,
                body_limit_bytes: 64 * 1024,
                api_key: None,
                api_keys: None,
                api_keys_file: None,
                publish_confirm_timeout_ms: 5_000,
            },
            policy: Policy::default(),
            // The worker's code defaults (`WorkerConfig`, `EffectsConfig`).
            worker: RawWorker {
                prefetch: 16,
                effect_concurrency: None,
                max_attempts: 8,
                poll_interval_ms: 500,
                backoff_base_ms: 1_000,
                backoff_max_ms: 300_000,
                operation_poll_interval_ms: 1_500,
                operation_poll_cap_secs: 30 * 60,
                activation_check_interval_ms: 2_000,
                activation_wait_cap_secs: 30 * 60,
                unknown_outcome_budget_secs: 30 * 60,
                lock_wait_budget_secs: 10 * 60,
                // Below Kubernetes' default terminationGracePeriodSeconds (30), and the 60 s
                // of deploy/kubernetes/worker-deployment.yaml.
                shutdown_grace_secs: 20,
                stall_after_secs: 60,
                metrics_addr: "127.0.0.1:9464".into(),
                term_ending_notice_days: "30,7".into(),
                notice_day_ms: 24 * 3600 * 1000,
                apply_batch: crate::worker::run::DEFAULT_APPLY_BATCH,
            },
            log: RawLog {
                format: "pretty".into(),
            },
            reconcile: RawReconcile {
                interval_secs: 0,
                stuck_pending_after_secs: 24 * 3600,
                execute: true,
            },
            metering: RawMetering {
                grace_secs: 300,
                tick_ms: 1000,
                dimensions_ttl_secs: 3600,
            },
            webhooks: RawWebhooks {
                retry_schedule: "5s,5m,30m,2h,5h,10h,10h".into(),
                disable_after_secs: 5 * 24 * 3600,
                timeout_ms: 15_000,
                concurrency: 8,
                rotation_overlap_secs: 24 * 3600,
            },
        }
    }
}

macro_rules! raw_default {
    ($($ty:ident => $field:ident),*) => {$(
        impl Default for $ty {
            fn default() -> Self {
                RawSettings::default().$field
            }
        }
    )*};
}
raw_default!(RawDatabase => database, RawAmqp => amqp, RawMarketplace => marketplace, RawHttp => http, RawIngress => ingress, RawWorker => worker, RawLog => log, RawReconcile => reconcile, RawMetering => metering, RawWebhooks => webhooks);

impl Settings {
    /// Reads the process environment and the file it names (or `file`, which wins).
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let env: HashMap<String, String> = std::env::vars().collect();
        Self::from_sources(file, &env)
    }

    /// Builds the settings from an explicit environment, so tests never touch the process's.
    pub fn from_sources(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Self, SettingsError> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get(CONFIG_FILE_ENV).map(PathBuf::from));
        let mut builder = Config::builder();
        if let Some(path) = file {
            if !path.is_file() {
                return Err(SettingsError::MissingFile { path });
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let prefixed: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("FULFILLMENT__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("FULFILLMENT")
                .prefix_separator("__")
                .separator("__")
                .source(Some(prefixed)),
        );
        for (var, key) in ENV_KEYS {
            // An empty variable counts as unset, as shells and compose files often export them.
            let value = env.get(*var).filter(|v| !v.trim().is_empty()).cloned();
            builder = builder.set_override_option(*key, value)?;
        }
        let raw: RawSettings = builder.build()?.try_deserialize()?;
        Self::parse(raw)
    }

    /// Parses every section, and reports every problem at once: a section with a problem
    /// does not hide the next one's.
    fn parse(raw: RawSettings) -> Result<Self, SettingsError> {
        let mut problems = Vec::new();
        let database = keep(&mut problems, parse_database(&raw.database));
        let amqp = keep(&mut problems, parse_amqp(&raw.amqp));
        let credential = keep(&mut problems, parse_credential(raw.credential));
        let marketplace = keep(
            &mut problems,
            parse_marketplace(&raw.marketplace, credential.as_ref()),
        );
        let ingress = keep(
            &mut problems,
            parse_ingress(raw.ingress, marketplace.as_ref().and_then(|m| m.client_id)),
        );
        let worker = keep(
            &mut problems,
            parse_worker(raw.worker, raw.database.max_connections),
        );
        let reconcile = ReconcileSettings {
            interval: (raw.reconcile.interval_secs > 0)
                .then(|| Duration::from_secs(raw.reconcile.interval_secs)),
            stuck_pending_after: Duration::from_secs(raw.reconcile.stuck_pending_after_secs),
            execute: raw.reconcile.execute,
        };
        let metering = keep(&mut problems, parse_metering(&raw.metering));
        let webhooks = keep(&mut problems, parse_webhooks(&raw.webhooks));
        let http = keep(&mut problems, parse_http(&raw.http));
        let log = keep(&mut problems, parse_log(&raw.log));
        let web = keep(&mut problems, parse_web(raw.web));
        match (
            database,
            amqp,
            credential,
            marketplace,
            ingress,
            worker,
            metering,
            http,
            log,
            web,
            webhooks,
        ) {
            (
                Some(database),
                Some(amqp),
                Some(credential),
                Some(marketplace),
                Some(ingress),
                Some(worker),
                Some(metering),
                Some(http),
                Some(log),
                Some(web),
                Some(webhooks),
            ) if problems.is_empty() => Ok(Self {
                web,
                metering,
                webhooks,
                credential,
                reconcile,
                ingress,
                // The machine decides the notices: it reads their settings in its policy.
                policy: Policy {
                    notices: worker.notices.clone(),
                    ..raw.policy
                },
                worker,
                database,
                amqp,
                marketplace,
                http,
                log,
            }),
            _ if problems.len() == 1 => Err(problems.remove(0)),
            _ => Err(SettingsError::Many(problems)),
        }
    }
}

impl Settings {
    /// What a process that calls Microsoft needs and is not set (`serve`, `work`,
    /// `reconcile`): the publisher identity and a credential, all reported at once, before
    /// any connection is opened.
    pub fn require_marketplace_identity(&self) -> Result<(), SettingsError> {
        let mut missing = Vec::new();
        if self.marketplace.tenant_id.is_none() {
            missing.push(SettingsError::Required(
                "MARKETPLACE_TENANT_ID (marketplace.tenant_id) is not set: the publisher's Entra \
                 tenant (Partner Center → Technical configuration)"
                    .into(),
            ));
        }
        if self.marketplace.client_id.is_none() {
            missing.push(SettingsError::Required(
                "MARKETPLACE_CLIENT_ID (marketplace.client_id) is not set: the publisher's Entra \
                 application (Partner Center → Technical configuration)"
                    .into(),
            ));
        }
        let required = self
            .credential
            .choose(self.marketplace.client_secret.is_some())
            .err();
        missing.extend(required.map(|what| SettingsError::Required(what.into())));
        match missing.len() {
            0 => Ok(()),
            1 => Err(missing.remove(0)),
            _ => Err(SettingsError::Many(missing)),
        }
    }
}

/// The value, or `None` with the problem kept.
fn keep<T>(problems: &mut Vec<SettingsError>, parsed: Result<T, SettingsError>) -> Option<T> {
    parsed.map_err(|problem| problems.push(problem)).ok()
}

fn parse_database(raw: &RawDatabase) -> Result<DatabaseSettings, SettingsError> {
    let url = parse_url("database.url", &raw.url)?;
    if !matches!(url.scheme(), "postgres" | "postgresql") {
        return invalid("database.url", "expected a postgres:// URL");
    }
    if url.path().trim_start_matches('/').is_empty() {
        return invalid(
            "database.url",
            "the URL names no database (add /fulfillment)",
        );
    }
    if raw.max_connections == 0 {
        return invalid("database.max_connections", "must be at least 1");
    }
    Ok(DatabaseSettings {
        url: ConnectionUrl(url),
        max_connections: raw.max_connections,
        acquire_timeout: positive_secs("database.acquire_timeout_secs", raw.acquire_timeout_secs)?,
    })
}

fn parse_amqp(raw: &RawAmqp) -> Result<AmqpSettings, SettingsError> {
    let url = parse_url("amqp.url", &raw.url)?;
    if !matches!(url.scheme(), "amqp" | "amqps") {
        return invalid("amqp.url", "expected an amqp:// or amqps:// URL");
    }
    if raw.prefix.is_empty()
        || !raw
            .prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return invalid(
            "amqp.prefix",
            "use letters, digits, '-', '_' or '.' (at least one)",
        );
    }
    Ok(AmqpSettings {
        url: ConnectionUrl(url),
        prefix: raw.prefix.clone(),
    })
}

fn parse_marketplace(
    raw: &RawMarketplace,
    credential: Option<&CredentialSettings>,
) -> Result<MarketplaceSettings, SettingsError> {
    Ok(MarketplaceSettings {
        api_url: parse_http_url("marketplace.api_url", &raw.api_url)?,
        entra_authority_url: parse_http_url(
            "marketplace.entra_authority_url",
            &raw.entra_authority_url,
        )?,
        // The variables AKS workload identity and the Azure SDKs use stand in for ours.
        tenant_id: parse_guid("marketplace.tenant_id", raw.tenant_id.clone())?
            .or(credential.and_then(|c| c.azure_tenant_id)),
        client_id: parse_guid("marketplace.client_id", raw.client_id.clone())?
            .or(credential.and_then(|c| c.azure_client_id)),
        client_secret: raw
            .client_secret
            .clone()
            .filter(|s| !s.expose_secret().is_empty()),
        token_endpoint: match raw.token_endpoint.trim() {
            "v2" | "V2" => TokenEndpoint::V2,
            "v1" | "V1" => TokenEndpoint::V1,
            other => {
                return invalid(
                    "marketplace.token_endpoint",
                    format!("expected v2 or v1, got {other:?}"),
                );
            }
        },
        request_timeout: positive_secs(
            "marketplace.request_timeout_secs",
            raw.request_timeout_secs,
        )?,
    })
}

fn parse_metering(raw: &RawMetering) -> Result<crate::metering::MeteringConfig, SettingsError> {
    if raw.grace_secs > 12 * 3600 {
        return invalid(
            "metering.grace_secs",
            "must be at most 43200 (12 h): Microsoft refuses hours older than 24 h",
        );
    }
    Ok(crate::metering::MeteringConfig {
        grace: Duration::from_secs(raw.grace_secs),
        tick: positive_millis("metering.tick_ms", raw.tick_ms)?,
        dimensions_ttl: Duration::from_secs(raw.dimensions_ttl_secs),
    })
}

fn parse_webhooks(raw: &RawWebhooks) -> Result<WebhookSettings, SettingsError> {
    let retry_schedule =
        parse_retry_schedule(&raw.retry_schedule).map_err(|reason| SettingsError::Invalid {
            key: "webhooks.retry_schedule",
            reason,
        })?;
    if raw.concurrency == 0 {
        return invalid("webhooks.concurrency", "must be at least 1");
    }
    Ok(WebhookSettings {
        retry_schedule,
        disable_after: positive_secs("webhooks.disable_after_secs", raw.disable_after_secs)?,
        timeout: positive_millis("webhooks.timeout_ms", raw.timeout_ms)?,
        concurrency: raw.concurrency,
        rotation_overlap: Duration::from_secs(raw.rotation_overlap_secs),
    })
}

/// `5s,5m,30m,2h` (units `ms`, `s`, `m`, `h`); empty means no retry.
fn parse_retry_schedule(text: &str) -> Result<Vec<Duration>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            let split = part
                .find(|c: char| !c.is_ascii_digit())
                .ok_or_else(|| format!("`{part}` has no unit (ms, s, m or h)"))?;
            let (number, unit) = part.split_at(split);
            let number: u64 = number
                .parse()
                .map_err(|_| format!("`{part}` does not start with a number"))?;
            let seconds = match unit {
                "ms" => return Ok(Duration::from_millis(number)),
                "s" => 1,
                "m" => 60,
                "h" => 3600,
                _ => return Err(format!("`{part}`: the unit must be ms, s, m or h")),
            };
            Ok(Duration::from_secs(number.saturating_mul(seconds)))
        })
        .collect()
}

/// `http.max_connections` by default. An open connection costs about 25 KiB, so the limit
/// bounds the ingress's memory: `bench burst` (5,000 webhooks at once) peaked at 40.8 MiB
/// with 256 places, 45.5–49.4 MiB with 512 and 41–116 MiB with 4,096 (however many the
/// burst happened to open). A webhook holds its place only until the broker confirms
/// (milliseconds), and while every place is taken each answer closes its connection, so
/// 256 places serve far more webhooks per second than Microsoft sends; the rest wait in
/// the accept queue, none refused.
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

fn parse_http(raw: &RawHttp) -> Result<HttpSettings, SettingsError> {
    // tokio's semaphore holds at most MAX_PERMITS places.
    let most = tokio::sync::Semaphore::MAX_PERMITS;
    if !(1..=most).contains(&raw.max_connections) {
        return invalid(
            "http.max_connections",
            format!("must be between 1 and {most}"),
        );
    }
    // Longer than any request may take (crate::http::REQUEST_TIMEOUT, 10 s), so only a
    // connection that is really idle is closed.
    if raw.idle_timeout_secs < 15 {
        return invalid(
            "http.idle_timeout_secs",
            "must be at least 15 (a request may take 10 s)",
        );
    }
    Ok(HttpSettings {
        max_connections: raw.max_connections,
        idle_timeout: Duration::from_secs(raw.idle_timeout_secs),
        listen_addr: listen_address("http.listen_addr", &raw.listen_addr, "127.0.0.1:8080")?,
        public_url: match raw.public_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => Some(parse_http_url("http.public_url", url)?),
        },
    })
}

fn parse_log(raw: &RawLog) -> Result<LogSettings, SettingsError> {
    Ok(LogSettings {
        format: match raw.format.trim() {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return invalid(
                    "log.format",
                    format!("expected pretty or json, got {other:?}"),
                );
            }
        },
    })
}

fn parse_ingress(
    raw: RawIngress,
    client_id: Option<Uuid>,
) -> Result<IngressSettings, SettingsError> {
    let webhook_auth = match raw.webhook_auth.trim() {
        "entra" => WebhookAuth::Entra,
        "none" if raw.allow_insecure_no_auth => WebhookAuth::InsecureNone,
        "none" => {
            return invalid(
                "ingress.webhook_auth",
                "`none` accepts forged webhooks; it is only for local emulators that send no \
                 token and needs WEBHOOK_AUTH_ALLOW_INSECURE=true as well",
            );
        }
        other => {
            return invalid(
                "ingress.webhook_auth",
                format!("expected entra or none, got {other:?}"),
            );
        }
    };
    let jwks_url = match raw.jwks_url.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(url) => Some(parse_http_url("ingress.jwks_url", url)?),
    };
    let webhook_audiences: Vec<String> = match raw.webhook_audiences.as_deref() {
        Some(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|a| a.trim().to_string())
            .filter(|a| !a.is_empty())
            .collect(),
        _ => client_id.map(|id| id.to_string()).into_iter().collect(),
    };
    if !(1024..=16 * 1024 * 1024).contains(&raw.body_limit_bytes) {
        return invalid(
            "ingress.body_limit_bytes",
            "must be between 1024 and 16777216",
        );
    }
    if raw.publish_confirm_timeout_ms == 0 {
        return invalid("ingress.publish_confirm_timeout_ms", "must be at least 1");
    }
    let mut api_keys = match &raw.api_keys {
        Some(list) => parse_scoped_keys(list.expose_secret(), "ingress.api_keys")?,
        None => Vec::new(),
    };
    if let Some(path) = raw
        .api_keys_file
        .as_deref()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let text = std::fs::read_to_string(path).map_err(|e| SettingsError::Invalid {
            key: "ingress.api_keys_file",
            reason: format!("cannot read {path}: {e}"),
        })?;
        api_keys.extend(parse_scoped_keys(&text, "ingress.api_keys_file")?);
    }
    Ok(IngressSettings {
        webhook_auth,
        jwks_url,
        webhook_audiences,
        body_limit_bytes: raw.body_limit_bytes,
        api_key: raw.api_key.filter(|k| !k.expose_secret().is_empty()),
        api_keys,
        publish_confirm_timeout: Duration::from_millis(raw.publish_confirm_timeout_ms),
    })
}

fn parse_worker(raw: RawWorker, max_connections: u32) -> Result<WorkerSettings, SettingsError> {
    if raw.prefetch == 0 {
        return invalid(
            "worker.prefetch",
            "must be at least 1 (0 would let RabbitMQ push unbounded deliveries)",
        );
    }
    if let Some(concurrency) = raw.effect_concurrency {
        if concurrency == 0 {
            return invalid("worker.effect_concurrency", "must be at least 1");
        }
        // Each effect in hand holds its claimed row's connection (some read through a
        // second one briefly); the consumer needs at least one more, and one stays spare.
        let needed = concurrency.saturating_add(2);
        if needed > max_connections as usize {
            return invalid(
                "worker.effect_concurrency",
                format!(
                    "{concurrency} effects at once need {needed} database connections, but \
                     database.max_connections is {max_connections}: lower this or raise that"
                ),
            );
        }
    }
    if raw.max_attempts == 0 {
        return invalid("worker.max_attempts", "must be at least 1");
    }
    if !(1..=crate::worker::run::MAX_APPLY_BATCH).contains(&raw.apply_batch) {
        return invalid(
            "worker.apply_batch",
            format!(
                "must be 1 to {} (1 applies each message in a transaction of its own; more \
                 savepoints in one transaction overflow PostgreSQL's subtransaction cache, \
                 which slows every other session's snapshots)",
                crate::worker::run::MAX_APPLY_BATCH
            ),
        );
    }
    let backoff_base = positive_millis("worker.backoff_base_ms", raw.backoff_base_ms)?;
    let backoff_max = positive_millis("worker.backoff_max_ms", raw.backoff_max_ms)?;
    if backoff_max < backoff_base {
        return invalid(
            "worker.backoff_max_ms",
            format!(
                "must not be below worker.backoff_base_ms ({} ms)",
                raw.backoff_base_ms
            ),
        );
    }
    Ok(WorkerSettings {
        prefetch: raw.prefetch,
        effect_concurrency: raw.effect_concurrency,
        max_attempts: raw.max_attempts,
        poll_interval: positive_millis("worker.poll_interval_ms", raw.poll_interval_ms)?,
        backoff_base,
        backoff_max,
        operation_poll_interval: positive_millis(
            "worker.operation_poll_interval_ms",
            raw.operation_poll_interval_ms,
        )?,
        operation_poll_cap: positive_secs(
            "worker.operation_poll_cap_secs",
            raw.operation_poll_cap_secs,
        )?,
        activation_check_interval: positive_millis(
            "worker.activation_check_interval_ms",
            raw.activation_check_interval_ms,
        )?,
        activation_wait_cap: positive_secs(
            "worker.activation_wait_cap_secs",
            raw.activation_wait_cap_secs,
        )?,
        unknown_outcome_budget: positive_secs(
            "worker.unknown_outcome_budget_secs",
            raw.unknown_outcome_budget_secs,
        )?,
        lock_wait_budget: positive_secs("worker.lock_wait_budget_secs", raw.lock_wait_budget_secs)?,
        shutdown_grace: positive_secs("worker.shutdown_grace_secs", raw.shutdown_grace_secs)?,
        stall_after: positive_secs("worker.stall_after_secs", raw.stall_after_secs)?,
        metrics_addr: listen_address("worker.metrics_addr", &raw.metrics_addr, "127.0.0.1:9464")?,
        notices: NoticePolicy {
            term_ending_days: notice_days(&raw.term_ending_notice_days)?,
            day: positive_millis("worker.notice_day_ms", raw.notice_day_ms)?,
        },
        apply_batch: raw.apply_batch,
    })
}

/// `worker.term_ending_notice_days`: days before a term's end, comma-separated ("30,7");
/// empty sends no term-ending notice.
fn notice_days(raw: &str) -> Result<Vec<u32>, SettingsError> {
    raw.split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.parse::<u32>() {
            Ok(days) if (1..=3650).contains(&days) => Ok(days),
            _ => invalid(
                "worker.term_ending_notice_days",
                format!(
                    "expected days before the term's end, comma-separated, each 1 to 3650 \
                     (e.g. \"30,7\"), got {d:?}"
                ),
            ),
        })
        .collect()
}

/// A listen address: `IP:PORT`, or `HOST:PORT` with a host name this machine resolves
/// (`localhost:8080`), taking the first address it resolves to (IPv4 first, as a browser
/// or curl on the same machine would reach it).
fn listen_address(
    key: &'static str,
    raw: &str,
    example: &str,
) -> Result<SocketAddr, SettingsError> {
    let raw = raw.trim();
    if let Ok(address) = SocketAddr::from_str(raw) {
        return Ok(address);
    }
    let fail = |reason: String| SettingsError::Invalid {
        key,
        reason: format!("{reason} (expected HOST:PORT such as {example} or localhost:8080)"),
    };
    let (host, port) = raw
        .rsplit_once(':')
        .ok_or_else(|| fail(format!("{raw:?} has no port")))?;
    port.parse::<u16>()
        .map_err(|e| fail(format!("invalid port {port:?}: {e}")))?;
    if host.is_empty() {
        return Err(fail(format!("{raw:?} has no host")));
    }
    let resolved: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(raw)
        .map_err(|e| fail(format!("cannot resolve {host:?}: {e}")))?
        .collect();
    resolved
        .iter()
        .find(|address| address.is_ipv4())
        .or_else(|| resolved.first())
        .copied()
        .ok_or_else(|| fail(format!("{host:?} resolves to no address")))
}

fn invalid<T>(key: &'static str, reason: impl Into<String>) -> Result<T, SettingsError> {
    Err(SettingsError::Invalid {
        key,
        reason: reason.into(),
    })
}

fn parse_url(key: &'static str, value: &str) -> Result<Url, SettingsError> {
    // The parse error never echoes the value, which may hold a password.
    Url::parse(value.trim()).map_err(|e| SettingsError::Invalid {
        key,
        reason: format!("not a URL: {e}"),
    })
}

fn parse_http_url(key: &'static str, value: &str) -> Result<Url, SettingsError> {
    let url = parse_url(key, value)?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return invalid(key, "expected an http:// or https:// URL with a host");
    }
    Ok(url)
}

fn parse_guid(key: &'static str, value: Option<String>) -> Result<Option<Uuid>, SettingsError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(v) => Uuid::parse_str(v)
            .map(Some)
            .map_err(|_| SettingsError::Invalid {
                key,
                reason: format!(
                    "expected a GUID such as 72f988bf-86f1-41af-91ab-2d7cd011db47, got {v:?}"
                ),
            }),
    }
}

fn positive_millis(key: &'static str, millis: u64) -> Result<Duration, SettingsError> {
    if millis == 0 {
        return invalid(key, "must be at least 1 millisecond");
    }
    Ok(Duration::from_millis(millis))
}

fn positive_secs(key: &'static str, secs: u64) -> Result<Duration, SettingsError> {
    if secs == 0 {
        return invalid(key, "must be at least 1 second");
    }
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_point_at_local_services_and_microsoft() {
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(
            s.database.url.expose(),
            "postgres://postgres@127.0.0.1:5432/fulfillment?sslmode=disable"
        );
        assert_eq!(s.amqp.url.expose(), "amqp://guest:guest@127.0.0.1:5672/%2f");
        assert_eq!(
            s.marketplace.api_url.as_str(),
            "https://marketplaceapi.microsoft.com/api"
        );
        assert_eq!(
            s.marketplace.entra_authority_url.as_str(),
            "https://login.microsoftonline.com/"
        );
        assert_eq!(s.http.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.worker.metrics_addr.to_string(), "127.0.0.1:9464");
        assert_eq!(s.marketplace.token_endpoint, TokenEndpoint::V2);
        assert!(s.marketplace.tenant_id.is_none());
    }

    #[test]
    fn conventional_variables_override_defaults() {
        let s = Settings::from_sources(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://u:pw@db:5432/other"),
                ("AMQP_URL", "amqp://a:b@mq:5672/vh"),
                ("MARKETPLACE_API_URL", "http://127.0.0.1:8090/api"),
                ("ENTRA_AUTHORITY_URL", "http://127.0.0.1:8090"),
                (
                    "MARKETPLACE_TENANT_ID",
                    " 72f988bf-86f1-41af-91ab-2d7cd011db47 ",
                ),
                (
                    "MARKETPLACE_CLIENT_ID",
                    "11111111-2222-3333-4444-555555555555",
                ),
                ("MARKETPLACE_CLIENT_SECRET", "s3cr3t-value"),
                ("LISTEN_ADDR", "0.0.0.0:9000"),
                ("PUBLIC_URL", "https://fulfillment.contoso.com"),
                ("WORKER_METRICS_ADDR", "0.0.0.0:0"),
                ("FULFILLMENT__AMQP__PREFIX", "test-1"),
            ]),
        )
        .unwrap();
        assert_eq!(s.database.url.expose(), "postgres://u:pw@db:5432/other");
        assert_eq!(s.amqp.prefix, "test-1");
        assert_eq!(s.marketplace.api_url.as_str(), "http://127.0.0.1:8090/api");
        assert_eq!(
            s.marketplace.tenant_id.unwrap().to_string(),
            "72f988bf-86f1-41af-91ab-2d7cd011db47"
        );
        assert_eq!(
            s.marketplace
                .client_secret
                .as_ref()
                .unwrap()
                .expose_secret(),
            "s3cr3t-value"
        );
        assert_eq!(s.http.listen_addr.port(), 9000);
        assert_eq!(
            s.http.public_url.as_ref().map(Url::as_str),
            Some("https://fulfillment.contoso.com/")
        );
        assert_eq!(s.worker.metrics_addr.to_string(), "0.0.0.0:0");
    }

    #[test]
    fn debug_output_hides_secrets_and_passwords() {
        let s = Settings::from_sources(
            None,
            &env(&[
                ("DATABASE_URL", "postgres://u:dbpassword@db/x"),
                ("AMQP_URL", "amqp://a:mqpassword@mq/vh"),
                ("MARKETPLACE_CLIENT_SECRET", "s3cr3t-value"),
            ]),
        )
        .unwrap();
        let debug = format!("{s:?}");
        for secret in ["dbpassword", "mqpassword", "s3cr3t-value"] {
            assert!(!debug.contains(secret), "{secret} leaked into {debug}");
        }
        assert!(debug.contains("postgres://u:***@db/x"));
    }

    #[test]
    fn web_settings_parse_and_bad_values_name_their_variable() {
        let key = "a".repeat(64);
        let key = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(key)
        };
        let settings = Settings::from_sources(
            None,
            &env(&[
                ("WEB_SESSION_KEY", &key),
                (
                    "CONSOLE_OPERATORS",
                    "group:0b5e0000-0000-4000-8000-0000000000a1, Ops@Contoso.com",
                ),
                ("CONSOLE_READ_ONLY", "0b5e0000-0000-4000-8000-0000000000b2"),
                (
                    "LANDING_FIELDS",
                    "company:Company name, contact_email:Contact e-mail",
                ),
                ("LANDING_BRAND_COLOUR", "#0A5C36"),
                ("LANDING_SUPPORT_CONTACT", "https://help.contoso.com"),
            ]),
        )
        .unwrap();
        let web = &settings.web;
        assert_eq!(web.session_key.as_ref().unwrap().expose().len(), 64);
        assert!(!format!("{web:?}").contains(&key));
        assert_eq!(
            web.console_operators,
            vec![
                OperatorRule::Group(
                    Uuid::parse_str("0b5e0000-0000-4000-8000-0000000000a1").unwrap()
                ),
                OperatorRule::Email("ops@contoso.com".into()),
            ]
        );
        assert_eq!(web.console_read_only.len(), 1);
        assert_eq!(web.onboarding_fields[1].name, "contact_email");
        assert_eq!(web.onboarding_fields[1].label, "Contact e-mail");
        assert_eq!(web.branding.brand_colour, "#0a5c36");
        let short = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode("short")
        };
        for (var, value, expected) in [
            ("WEB_SESSION_KEY", "not base64!", "WEB_SESSION_KEY"),
            ("WEB_SESSION_KEY", short.as_str(), "at least 64"),
            ("CONSOLE_OPERATORS", "bob", "CONSOLE_OPERATORS"),
            ("CONSOLE_READ_ONLY", "group:x", "CONSOLE_READ_ONLY"),
            ("LANDING_FIELDS", "company", "LANDING_FIELDS"),
            ("LANDING_FIELDS", "a b:Label", "LANDING_FIELDS"),
            ("LANDING_FIELDS", "a:A,a:B", "appears twice"),
            ("LANDING_BRAND_COLOUR", "red", "LANDING_BRAND_COLOUR"),
            (
                "LANDING_LOGO_URL",
                "javascript:alert(1)",
                "LANDING_LOGO_URL",
            ),
            (
                "LANDING_SUPPORT_CONTACT",
                "javascript:alert(1)",
                "LANDING_SUPPORT_CONTACT",
            ),
            ("LANDING_PRODUCT_URL", "not a url", "LANDING_PRODUCT_URL"),
            ("WEB_AUTHORITY_URL", "ftp://x", "WEB_AUTHORITY_URL"),
            ("CONSOLE_TENANT_ID", "contoso", "CONSOLE_TENANT_ID"),
            (
                "LANDING_ACTIVATE_AFTER_SIGN_IN",
                "maybe",
                "activate_after_sign_in",
            ),
        ] {
            let message = Settings::from_sources(None, &env(&[(var, value)]))
                .unwrap_err()
                .to_string();
            assert!(
                message.contains(expected),
                "{var}={value}: {message:?} should name {expected}"
            );
        }
    }

    #[test]
    fn invalid_values_fail_naming_the_setting() {
        let cases = [
            ("DATABASE_URL", "not a url", "DATABASE_URL"),
            ("DATABASE_URL", "mysql://x/y", "database.url"),
            ("AMQP_URL", "http://x", "AMQP_URL"),
            ("MARKETPLACE_API_URL", "ftp://x/api", "MARKETPLACE_API_URL"),
            ("MARKETPLACE_TENANT_ID", "contoso", "MARKETPLACE_TENANT_ID"),
            ("MARKETPLACE_CLIENT_ID", "42", "marketplace.client_id"),
            ("LISTEN_ADDR", "localhost", "LISTEN_ADDR"),
            ("PUBLIC_URL", "fulfillment.contoso.com", "PUBLIC_URL"),
            ("PUBLIC_URL", "ftp://contoso.com", "http.public_url"),
            ("LOG_FORMAT", "xml", "log.format"),
            ("HTTP_MAX_CONNECTIONS", "0", "http.max_connections"),
            ("HTTP_MAX_CONNECTIONS", "many", "http.max_connections"),
            ("HTTP_IDLE_TIMEOUT_SECS", "5", "http.idle_timeout_secs"),
            ("WORKER_METRICS_ADDR", "9464", "WORKER_METRICS_ADDR"),
            (
                "MARKETPLACE_TOKEN_ENDPOINT",
                "v3",
                "marketplace.token_endpoint",
            ),
            ("FULFILLMENT__AMQP__PREFIX", "a b", "amqp.prefix"),
        ];
        for (var, value, expected) in cases {
            let err = Settings::from_sources(None, &env(&[(var, value)])).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(expected),
                "{var}={value}: {message:?} should name {expected}"
            );
        }
    }

    #[test]
    fn no_auth_webhooks_need_the_explicit_insecure_switch() {
        let err = Settings::from_sources(None, &env(&[("WEBHOOK_AUTH", "none")])).unwrap_err();
        assert!(
            err.to_string().contains("WEBHOOK_AUTH_ALLOW_INSECURE"),
            "{err}"
        );
        let s = Settings::from_sources(
            None,
            &env(&[
                ("WEBHOOK_AUTH", "none"),
                ("WEBHOOK_AUTH_ALLOW_INSECURE", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(s.ingress.webhook_auth, WebhookAuth::InsecureNone);
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(s.ingress.webhook_auth, WebhookAuth::Entra);
    }

    #[test]
    fn ingress_and_policy_settings_parse() {
        let s = Settings::from_sources(
            None,
            &env(&[
                (
                    "MARKETPLACE_CLIENT_ID",
                    "11111111-2222-3333-4444-555555555555",
                ),
                ("ENTITLEMENT_API_KEY", "k3y-value"),
                ("ACTIVATION_MODE", "manual"),
                ("FULFILLMENT__POLICY__SEATS__MAX", "50"),
            ]),
        )
        .unwrap();
        assert_eq!(
            s.ingress.webhook_audiences,
            vec!["11111111-2222-3333-4444-555555555555".to_string()]
        );
        assert_eq!(s.ingress.body_limit_bytes, 64 * 1024);
        assert_eq!(
            s.policy.activation,
            fulfillment_state_machine::ActivationMode::Manual
        );
        assert_eq!(s.policy.seats.max, Some(50));
        assert!(!format!("{s:?}").contains("k3y-value"));
        let s = Settings::from_sources(None, &env(&[("WEBHOOK_AUDIENCES", "a, api://b")])).unwrap();
        assert_eq!(s.ingress.webhook_audiences, vec!["a", "api://b"]);
        let err =
            Settings::from_sources(None, &env(&[("ACTIVATION_MODE", "sometimes")])).unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
    }

    #[test]
    fn reconciliation_is_off_by_default_and_set_through_the_environment() {
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(s.reconcile.interval, None);
        assert_eq!(s.reconcile.stuck_pending_after, Duration::from_secs(86_400));
        assert!(s.reconcile.execute);
        let s = Settings::from_sources(
            None,
            &env(&[
                ("FULFILLMENT__RECONCILE__INTERVAL_SECS", "900"),
                ("FULFILLMENT__RECONCILE__STUCK_PENDING_AFTER_SECS", "3600"),
                ("FULFILLMENT__RECONCILE__EXECUTE", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(s.reconcile.interval, Some(Duration::from_secs(900)));
        assert_eq!(s.reconcile.stuck_pending_after, Duration::from_secs(3600));
        assert!(!s.reconcile.execute);
    }

    #[test]
    fn listen_addresses_take_host_names_and_refuse_what_has_no_port() {
        let s = Settings::from_sources(
            None,
            &env(&[
                ("LISTEN_ADDR", "localhost:8080"),
                ("WORKER_METRICS_ADDR", " localhost:0 "),
            ]),
        )
        .unwrap();
        assert_eq!(s.http.listen_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.worker.metrics_addr.to_string(), "127.0.0.1:0");
        for bad in [
            "localhost",
            "localhost:http",
            ":8080",
            "no-such-host.invalid:8080",
        ] {
            let message = Settings::from_sources(None, &env(&[("LISTEN_ADDR", bad)]))
                .unwrap_err()
                .to_string();
            assert!(message.contains("http.listen_addr"), "{bad}: {message}");
            assert!(message.contains("HOST:PORT"), "{bad}: {message}");
        }
    }

    #[test]
    fn worker_settings_default_to_the_code_defaults_and_take_env_overrides() {
        let s = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(s.worker.prefetch, 16);
        assert_eq!(s.worker.effect_concurrency, None);
        assert_eq!(s.worker.max_attempts, 8);
        assert_eq!(s.worker.poll_interval, Duration::from_millis(500));
        assert_eq!(s.worker.backoff_base, Duration::from_secs(1));
        assert_eq!(s.worker.backoff_max, Duration::from_secs(300));
        assert_eq!(
            s.worker.operation_poll_interval,
            Duration::from_millis(1500)
        );
        assert_eq!(s.worker.operation_poll_cap, Duration::from_secs(1800));
        assert_eq!(s.worker.activation_check_interval, Duration::from_secs(2));
        assert_eq!(s.worker.activation_wait_cap, Duration::from_secs(1800));
        assert_eq!(s.worker.unknown_outcome_budget, Duration::from_secs(1800));
        assert_eq!(s.worker.lock_wait_budget, Duration::from_secs(600));
        assert_eq!(s.worker.shutdown_grace, Duration::from_secs(20));
        assert_eq!(s.worker.stall_after, Duration::from_secs(60));

        let s = Settings::from_sources(
            None,
            &env(&[
                ("FULFILLMENT__WORKER__PREFETCH", "4"),
                ("FULFILLMENT__WORKER__EFFECT_CONCURRENCY", "2"),
                ("FULFILLMENT__WORKER__MAX_ATTEMPTS", "3"),
                ("FULFILLMENT__WORKER__BACKOFF_BASE_MS", "20"),
                ("FULFILLMENT__WORKER__BACKOFF_MAX_MS", "200"),
                ("FULFILLMENT__WORKER__POLL_INTERVAL_MS", "50"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.prefetch, 4);
        assert_eq!(s.worker.effect_concurrency, Some(2));
        assert_eq!(s.worker.max_attempts, 3);
        assert_eq!(s.worker.backoff_base, Duration::from_millis(20));
        assert_eq!(s.worker.backoff_max, Duration::from_millis(200));
        assert_eq!(s.worker.poll_interval, Duration::from_millis(50));
    }

    #[test]
    fn notice_settings_reach_the_machine_policy() {
        let defaults = Settings::from_sources(None, &env(&[])).unwrap();
        assert_eq!(defaults.policy.notices.term_ending_days, vec![30, 7]);
        assert_eq!(defaults.policy.notices.day, Duration::from_secs(86_400));
        let set = Settings::from_sources(
            None,
            &env(&[
                ("FULFILLMENT__WORKER__TERM_ENDING_NOTICE_DAYS", " 60, 14 ,3"),
                ("FULFILLMENT__WORKER__NOTICE_DAY_MS", "200"),
            ]),
        )
        .unwrap();
        assert_eq!(set.worker.notices.term_ending_days, vec![60, 14, 3]);
        assert_eq!(set.policy.notices, set.worker.notices);
        assert_eq!(set.policy.notices.day, Duration::from_millis(200));
        let none = Settings::from_sources(
            None,
            &env(&[("FULFILLMENT__WORKER__TERM_ENDING_NOTICE_DAYS", "")]),
        )
        .unwrap();
        assert!(none.policy.notices.term_ending_days.is_empty());
    }

    #[test]
    fn invalid_worker_settings_fail_naming_the_key_and_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("FULFILLMENT__WORKER__PREFETCH", "0")], "worker.prefetch"),
            (&[("WORKER_APPLY_BATCH", "0")], "worker.apply_batch"),
            (&[("WORKER_APPLY_BATCH", "65")], "subtransaction cache"),
            (
                &[("FULFILLMENT__WORKER__EFFECT_CONCURRENCY", "0")],
                "worker.effect_concurrency",
            ),
            (
                &[("FULFILLMENT__WORKER__EFFECT_CONCURRENCY", "9")],
                "database.max_connections is 10",
            ),
            (
                &[("FULFILLMENT__WORKER__MAX_ATTEMPTS", "0")],
                "worker.max_attempts",
            ),
            (
                &[("FULFILLMENT__WORKER__POLL_INTERVAL_MS", "0")],
                "worker.poll_interval_ms",
            ),
            (
                &[("FULFILLMENT__WORKER__TERM_ENDING_NOTICE_DAYS", "30,seven")],
                "worker.term_ending_notice_days",
            ),
            (
                &[("FULFILLMENT__WORKER__TERM_ENDING_NOTICE_DAYS", "0")],
                "worker.term_ending_notice_days",
            ),
            (
                &[("FULFILLMENT__WORKER__NOTICE_DAY_MS", "0")],
                "worker.notice_day_ms",
            ),
            (
                &[
                    ("FULFILLMENT__WORKER__BACKOFF_BASE_MS", "500"),
                    ("FULFILLMENT__WORKER__BACKOFF_MAX_MS", "100"),
                ],
                "worker.backoff_max_ms",
            ),
            (
                &[("FULFILLMENT__WORKER__OPERATION_POLL_CAP_SECS", "0")],
                "worker.operation_poll_cap_secs",
            ),
            (
                &[("FULFILLMENT__WORKER__SHUTDOWN_GRACE_SECS", "0")],
                "worker.shutdown_grace_secs",
            ),
            (
                &[("FULFILLMENT__WORKER__LOCK_WAIT_BUDGET_SECS", "0")],
                "worker.lock_wait_budget_secs",
            ),
            (
                &[("FULFILLMENT__WORKER__STALL_AFTER_SECS", "0")],
                "worker.stall_after_secs",
            ),
        ];
        for (vars, expected) in cases {
            let message = Settings::from_sources(None, &env(vars))
                .unwrap_err()
                .to_string();
            assert!(message.contains(expected), "{vars:?}: {message}");
        }
        let message = Settings::from_sources(None, &env(&[("FULFILLMENT__WORKER__PREFETCH", "0")]))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("FULFILLMENT__WORKER__PREFETCH"),
            "{message}"
        );
        // A larger pool makes room for more effects.
        let s = Settings::from_sources(
            None,
            &env(&[
                ("FULFILLMENT__WORKER__EFFECT_CONCURRENCY", "9"),
                ("FULFILLMENT__DATABASE__MAX_CONNECTIONS", "11"),
            ]),
        )
        .unwrap();
        assert_eq!(s.worker.effect_concurrency, Some(9));
    }

    #[test]
    fn password_in_an_invalid_url_is_not_echoed() {
        let err = Settings::from_sources(None, &env(&[("DATABASE_URL", "mysql://u:hunter2@db/x")]))
            .unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn file_layer_sits_between_defaults_and_environment() {
        let dir = std::env::temp_dir().join(format!("fulfillment-settings-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("settings.toml");
        std::fs::write(
            &path,
            "[amqp]\nprefix = \"from-file\"\n[http]\nlisten_addr = \"127.0.0.1:7000\"\n",
        )
        .unwrap();
        let s = Settings::from_sources(Some(&path), &env(&[("LISTEN_ADDR", "127.0.0.1:7001")]))
            .unwrap();
        assert_eq!(s.amqp.prefix, "from-file");
        assert_eq!(s.http.listen_addr.port(), 7001);

        std::fs::write(&path, "[amqp]\nprefixx = \"typo\"\n").unwrap();
        let err = Settings::from_sources(Some(&path), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("prefixx"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();

        let missing = Settings::from_sources(Some(&dir.join("nope.toml")), &env(&[])).unwrap_err();
        assert!(matches!(missing, SettingsError::MissingFile { .. }));
    }

    #[test]
    fn the_webhook_retry_schedule_is_svix_s_by_default_and_can_be_shrunk() {
        let defaults = Settings::from_sources(None, &env(&[])).unwrap();
        let minutes: Vec<u64> = defaults
            .webhooks
            .retry_schedule
            .iter()
            .map(|d| d.as_secs())
            .collect();
        assert_eq!(minutes, [5, 300, 1800, 7200, 18000, 36000, 36000]);
        assert_eq!(
            defaults.webhooks.disable_after,
            Duration::from_secs(5 * 24 * 3600)
        );
        let fast =
            Settings::from_sources(None, &env(&[("ISV_WEBHOOK_RETRY_SCHEDULE", "50ms, 1s,2m")]))
                .unwrap();
        assert_eq!(
            fast.webhooks.retry_schedule,
            [
                Duration::from_millis(50),
                Duration::from_secs(1),
                Duration::from_secs(120)
            ]
        );
        for bad in ["5", "5x", "s5", "5s,,x"] {
            let message =
                Settings::from_sources(None, &env(&[("ISV_WEBHOOK_RETRY_SCHEDULE", bad)]))
                    .unwrap_err()
                    .to_string();
            assert!(
                message.contains("webhooks.retry_schedule")
                    && message.contains("ISV_WEBHOOK_RETRY_SCHEDULE"),
                "{bad}: {message}"
            );
        }
    }

    #[test]
    fn scoped_api_keys_parse_and_bad_entries_are_named_without_the_key() {
        let s = Settings::from_sources(
            None,
            &env(&[(
                "ENTITLEMENT_API_KEYS",
                "read:reader-key-0123456789, write:writer-key-0123456789",
            )]),
        )
        .unwrap();
        let scopes: Vec<ApiScope> = s.ingress.api_keys.iter().map(|k| k.scope).collect();
        assert_eq!(scopes, [ApiScope::Read, ApiScope::Write]);
        assert_eq!(
            s.ingress.api_keys[0].key.expose_secret(),
            "reader-key-0123456789"
        );
        for bad in [
            "reader-key-0123456789",
            "admin:reader-key-0123456789",
            "read:short",
        ] {
            let message = Settings::from_sources(None, &env(&[("ENTITLEMENT_API_KEYS", bad)]))
                .unwrap_err()
                .to_string();
            assert!(message.contains("ENTITLEMENT_API_KEYS"), "{message}");
            assert!(!message.contains("reader-key"), "{message}");
        }
        let dir = std::env::temp_dir().join(format!("fulfillment-keys-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("keys");
        std::fs::write(&file, "# the support tool\nread:support-key-0123456789\n").unwrap();
        let s = Settings::from_sources(
            None,
            &env(&[("ENTITLEMENT_API_KEYS_FILE", file.to_str().unwrap())]),
        )
        .unwrap();
        assert_eq!(s.ingress.api_keys.len(), 1);
        assert_eq!(s.ingress.api_keys[0].scope, ApiScope::Read);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
