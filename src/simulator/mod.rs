//! A faithful in-memory stand-in for Microsoft's side of a transactable SaaS offer, used by
//! every test, demo and benchmark: the SaaS Fulfillment API v2 with its operations, the
//! Metering API, the Entra token endpoint with JWKS, signed webhooks with redelivery, and
//! fault injection (docs/marketplace.md §13).
//!
//! Layout: [`state`] holds the memory and the shared handle; `lifecycle` the rules of §5
//! and §7; `api` the public routes under `/api`; `metering` §9; `entra` keys and tokens;
//! [`customer`] a scripted customer's browser; [`sign_in`] the interactive sign-in (authorize form with test users, code + PKCE);
//! `webhooks` the sender; `admin` the `/simulator` control surface; `faults` the chaos
//! knobs. Every clock is a [`Timings`] field, so tests run the 10-second ACK window in
//! milliseconds.
//!
//! Its defaults follow the service as recorded in production (§15), not the kinder docs:
//! links on another host ([`SimulatorConfig::link_host`]), operations that start
//! `NotStarted` behind a `Retry-After`, pages of varying size, 400 for unknown operation
//! ids. The catalogue ([`Catalogue`]) comes from a file or the admin API.

mod admin;
mod api;
mod credentials;
pub mod customer;
mod entra;
mod error;
mod faults;
mod lifecycle;
mod metering;
pub mod sign_in;
mod state;
mod webhooks;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use rand::SeedableRng;
use rand::rngs::StdRng;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

pub use credentials::{FEDERATED_AUDIENCE, FederatedCredential};
pub use faults::{CALLS as FAULT_CALLS, Faults, JwksFault, Reorder};

use crate::settings::Settings;
use entra::KeyRing;
use state::{Shared, State};

/// The only `api-version` of Fulfillment v2 and Metering (§1.1).
pub const API_VERSION: &str = "2018-08-31";

/// Which Entra token format the webhook calls carry (§6.6, P23).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
pub enum IssuerVersion {
    /// `iss` = `https://sts.windows.net/{tid}/`, `appid` = the marketplace app.
    V1,
    /// `iss` = `{authority}/{tid}/v2.0`, `azp` = the marketplace app.
    #[default]
    V2,
}

/// Every clock of the simulated marketplace; shrink them in tests.
#[derive(Clone, Debug)]
pub struct Timings {
    /// Activate → Subscribed ("a few minutes" in production).
    pub activation_delay: Duration,
    /// Publisher PATCH/DELETE → operation Succeeded.
    pub operation_delay: Duration,
    /// Customer ChangePlan/ChangeQuantity (and Reinstate) → auto-accepted (10 s, §5.3).
    pub ack_window: Duration,
    /// Event → first webhook attempt.
    pub webhook_delay: Duration,
    /// Between webhook attempts (8 h / 500 by default, §6.4).
    pub webhook_retry_interval: Duration,
    pub webhook_max_attempts: u32,
    /// Validity of landing-page purchase tokens (24 h, §4.1).
    pub token_ttl: Duration,
    /// Publisher PATCH/DELETE: how long the operation stays `NotStarted` before it turns
    /// `InProgress` (§15.1: the first Get Operation after a PATCH answers `NotStarted`).
    pub operation_start_delay: Duration,
    /// The `Retry-After` of a 202 (10 s as recorded, §15.1), sent in whole seconds (rounded
    /// up). A poller must wait this long before its first poll.
    pub retry_after: Duration,
    /// One simulated calendar day: the clock of term ends (Renew, or Unsubscribe when
    /// `autoRenew` is off, the day after `term.endDate`, §5.5) and of the 30-day grace of
    /// a Suspended subscription (then Unsubscribe, §5.2). 24 h; compress it in tests.
    pub day: Duration,
}

/// A Suspended subscription is unsubscribed after this many days (§5.3).
pub const SUSPENSION_GRACE_DAYS: u32 = 30;

impl Default for Timings {
    fn default() -> Self {
        Self {
            activation_delay: Duration::from_secs(2),
            operation_delay: Duration::from_secs(2),
            ack_window: Duration::from_secs(10),
            webhook_delay: Duration::from_millis(200),
            webhook_retry_interval: Duration::from_secs(8 * 3600) / 500,
            webhook_max_attempts: 500,
            token_ttl: Duration::from_secs(24 * 3600),
            operation_start_delay: Duration::from_secs(1),
            retry_after: Duration::from_secs(10),
            day: Duration::from_secs(24 * 3600),
        }
    }
}

impl Timings {
    /// Millisecond clocks for tests: everything happens within a few hundred milliseconds.
    pub fn fast() -> Self {
        Self {
            activation_delay: Duration::from_millis(50),
            operation_delay: Duration::from_millis(100),
            ack_window: Duration::from_millis(400),
            webhook_delay: Duration::from_millis(10),
            webhook_retry_interval: Duration::from_millis(50),
            webhook_max_attempts: 10,
            token_ttl: Duration::from_secs(24 * 3600),
            operation_start_delay: Duration::from_millis(20),
            retry_after: Duration::ZERO,
            // Terms and grace periods keep their real length unless a test compresses them.
            day: Duration::from_secs(24 * 3600),
        }
    }
}

/// One plan of the simulated catalogue: an entry of `[[plans]]` in a `--catalogue` file
/// (camelCase keys; only `offerId` and `planId` are required).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PlanSpec {
    pub offer_id: String,
    pub plan_id: String,
    /// Defaults to the plan id, capitalised.
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub is_private: bool,
    #[serde(default)]
    pub is_price_per_seat: bool,
    /// Seat limits of a per-seat plan (§4.7).
    #[serde(default)]
    pub min_quantity: u32,
    #[serde(default)]
    pub max_quantity: u32,
    /// `P1M`, `P1Y`, … `P5Y`, `PAY` or any ISO-8601 duration such as `P18M` (§15.3).
    #[serde(default = "default_term_unit")]
    pub term_unit: String,
    /// Per term (flat) or per seat and term.
    #[serde(default)]
    pub price: f64,
    /// Custom metering dimensions (§9).
    #[serde(default)]
    pub dimensions: Vec<String>,
    /// A one-month free trial (§5.4): purchases start with `isFreeTrial: true`.
    #[serde(default)]
    pub has_free_trial: bool,
    /// Auto-activation (§5.6): purchases are Subscribed at checkout unless the purchase
    /// says otherwise.
    #[serde(default)]
    pub auto_activate: bool,
}

fn default_term_unit() -> String {
    "P1M".into()
}

impl PlanSpec {
    pub fn flat(offer_id: &str, plan_id: &str, price: f64) -> Self {
        Self {
            offer_id: offer_id.into(),
            plan_id: plan_id.into(),
            display_name: capitalise(plan_id),
            is_private: false,
            is_price_per_seat: false,
            min_quantity: 0,
            max_quantity: 0,
            term_unit: default_term_unit(),
            price,
            dimensions: Vec::new(),
            has_free_trial: false,
            auto_activate: false,
        }
    }

    pub fn per_seat(offer_id: &str, plan_id: &str, price: f64, min: u32, max: u32) -> Self {
        Self {
            is_price_per_seat: true,
            min_quantity: min,
            max_quantity: max,
            ..Self::flat(offer_id, plan_id, price)
        }
    }

    pub fn with_dimensions(mut self, dimensions: &[&str]) -> Self {
        self.dimensions = dimensions.iter().map(|d| d.to_string()).collect();
        self
    }

    /// Offer `contoso-analytics`: `silver` and `gold` (flat, metered) and `per-seat` (1–100).
    pub fn default_catalogue() -> Vec<Self> {
        const OFFER: &str = "contoso-analytics";
        vec![
            Self::flat(OFFER, "silver", 100.0).with_dimensions(&["api-calls"]),
            Self::flat(OFFER, "gold", 250.0).with_dimensions(&["api-calls", "storage-gb"]),
            Self::per_seat(OFFER, "per-seat", 12.0, 1, 100),
        ]
    }

    /// The `Plan` of listAvailablePlans (§3.6).
    fn to_wire(&self) -> Value {
        json!({
            "planId": self.plan_id,
            "displayName": self.display_name,
            "isPrivate": self.is_private,
            "description": format!("{} plan of {}", self.display_name, self.offer_id),
            "minQuantity": self.min_quantity,
            "maxQuantity": self.max_quantity,
            "hasFreeTrials": self.has_free_trial,
            "isPricePerSeat": self.is_price_per_seat,
            "isStopSell": false,
            "market": "US",
            "planComponents": {
                "recurrentBillingTerms": [{
                    "currency": "USD",
                    "price": self.price,
                    "termUnit": self.term_unit,
                    "termDescription": state::term_description(&self.term_unit),
                    "meteredQuantityIncluded": [],
                }],
                "meteringDimensions": self.dimensions.iter().map(|d| json!({
                    "id": d, "currency": "USD", "pricePerUnit": 0.01,
                    "unitOfMeasure": "unit", "displayName": d,
                })).collect::<Vec<_>>(),
            },
        })
    }
}

/// The simulated catalogue: what a `--catalogue` file (TOML or JSON) and
/// `PUT /simulator/catalogue` hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Catalogue {
    pub plans: Vec<PlanSpec>,
}

impl Default for Catalogue {
    fn default() -> Self {
        Self {
            plans: PlanSpec::default_catalogue(),
        }
    }
}

impl Catalogue {
    /// Checks what serde cannot: unique plans, sane seat limits, term units that are
    /// `PAY` or an ISO-8601 duration. Fills in default display names.
    pub fn validated(mut self) -> Result<Self, String> {
        if self.plans.is_empty() {
            return Err("the catalogue has no plans".into());
        }
        let mut seen = std::collections::HashSet::new();
        for plan in &mut self.plans {
            let name = format!("{}/{}", plan.offer_id, plan.plan_id);
            if plan.offer_id.trim().is_empty() || plan.plan_id.trim().is_empty() {
                return Err(format!(
                    "plan {name:?}: offerId and planId must not be empty"
                ));
            }
            if !seen.insert((plan.offer_id.clone(), plan.plan_id.clone())) {
                return Err(format!("plan {name} appears twice"));
            }
            if plan.is_price_per_seat
                && (plan.min_quantity == 0 || plan.min_quantity > plan.max_quantity)
            {
                return Err(format!(
                    "plan {name}: a per-seat plan needs 1 <= minQuantity <= maxQuantity, got {}..={}",
                    plan.min_quantity, plan.max_quantity
                ));
            }
            if state::term_length(&plan.term_unit).is_none() && plan.term_unit != "PAY" {
                return Err(format!(
                    "plan {name}: termUnit {:?} is neither PAY nor an ISO-8601 duration of years, months or days",
                    plan.term_unit
                ));
            }
            if plan.has_free_trial && !plan.dimensions.is_empty() {
                // §5.4: a free trial cannot be combined with metered dimensions.
                return Err(format!(
                    "plan {name}: a free trial cannot be combined with metering dimensions"
                ));
            }
            if plan.display_name.is_empty() {
                plan.display_name = capitalise(&plan.plan_id);
            }
        }
        Ok(self)
    }

    /// Reads a catalogue file: JSON when it ends in `.json`, TOML otherwise.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the catalogue {}", path.display()))?;
        let catalogue: Catalogue = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a catalogue (JSON)", path.display()))?
        } else {
            toml::from_str(&text)
                .with_context(|| format!("{} is not a catalogue (TOML)", path.display()))?
        };
        catalogue
            .validated()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    chars
        .next()
        .map(|c| c.to_uppercase().chain(chars).collect())
        .unwrap_or_default()
}

/// How to run a simulator.
#[derive(Clone, Debug)]
pub struct SimulatorConfig {
    /// The publisher's Entra tenant (the only tenant the token endpoint serves).
    pub tenant_id: Uuid,
    /// The publisher's Entra application: the only client the token endpoint and the API accept.
    pub client_id: Uuid,
    /// When set, the token endpoint checks it; otherwise any non-empty secret passes.
    pub client_secret: Option<SecretString>,
    /// The publisher's connection webhook; no webhooks are sent without it.
    pub webhook_url: Option<Url>,
    /// Landing page for purchase links; defaults to the webhook's origin + `/landing`.
    pub landing_page_url: Option<Url>,
    /// The Partner Center publisher id in every resource.
    pub publisher_id: String,
    pub issuer: IssuerVersion,
    pub timings: Timings,
    /// Load at start, save on change.
    pub state_file: Option<PathBuf>,
    /// The catalogue at start (`PUT /simulator/catalogue` replaces it while running).
    pub plans: Vec<PlanSpec>,
    /// Seeds the fault PRNG (also settable through `PUT /simulator/faults`).
    pub seed: Option<u64>,
    /// The host of `Operation-Location` and `@nextLink` (same scheme and port as the
    /// simulator). Production answers on another host than the one called (§15.1), so
    /// the default is a second loopback address the simulator does not listen on: a
    /// client that follows the link instead of replaying its path on its own base URL
    /// fails. `None` keeps the links on the simulator's own host.
    pub link_host: Option<String>,
    /// List subscriptions answers pages of a size drawn from this range (66–89 seen in
    /// production, §15.1), never a fixed 100.
    pub page_sizes: std::ops::RangeInclusive<usize>,
    /// Unknown operation (or subscription) ids on the operation endpoints answer 404 as
    /// documented, instead of the live service's 400 (§4.10, §15.2).
    pub strict_404: bool,
    /// PEM certificates registered on the app at start (`--client-certificate`); client
    /// assertions must be signed by one of them.
    pub client_certificates: Vec<String>,
    /// `IDENTITY_HEADER` the App Service managed identity endpoint expects; `None`: any.
    pub identity_header: Option<SecretString>,
}

/// The second loopback address `Operation-Location` and `@nextLink` point to by default.
pub const DEFAULT_LINK_HOST: &str = "127.0.0.2";

/// The page sizes of List subscriptions by default (§15.1).
pub const DEFAULT_PAGE_SIZES: std::ops::RangeInclusive<usize> = 66..=89;

impl SimulatorConfig {
    /// Defaults for everything but the publisher's identity.
    pub fn new(tenant_id: Uuid, client_id: Uuid) -> Self {
        Self {
            tenant_id,
            client_id,
            client_secret: None,
            webhook_url: None,
            landing_page_url: None,
            publisher_id: "contoso".into(),
            issuer: IssuerVersion::V2,
            timings: Timings::default(),
            state_file: None,
            plans: PlanSpec::default_catalogue(),
            seed: None,
            link_host: Some(DEFAULT_LINK_HOST.into()),
            page_sizes: DEFAULT_PAGE_SIZES,
            strict_404: false,
            client_certificates: Vec::new(),
            identity_header: None,
        }
    }

    /// The publisher identity the engine is configured with, so both sides agree. Without
    /// one (a bare `fulfillment simulate`), a tenant, an application and a secret are
    /// generated; [`run`] prints them for `serve` and `work`.
    pub fn from_settings(settings: &Settings, webhook_url: Option<Url>) -> Self {
        let marketplace = &settings.marketplace;
        let client_secret = marketplace.client_secret.clone().or_else(|| {
            (marketplace.tenant_id.is_none() || marketplace.client_id.is_none())
                .then(|| SecretString::from(format!("sim-{}", Uuid::new_v4().simple())))
        });
        Self {
            client_secret,
            webhook_url,
            ..Self::new(
                marketplace.tenant_id.unwrap_or_else(Uuid::new_v4),
                marketplace.client_id.unwrap_or_else(Uuid::new_v4),
            )
        }
    }
}

/// The `--state-file` contents.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    /// Base64 PKCS#8 signing keys, oldest first.
    keys: Vec<String>,
    state: State,
}

fn load_snapshot(path: &Path) -> anyhow::Result<Option<(State, KeyRing)>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let snapshot: Snapshot = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} is not a simulator state file", path.display()))?;
    let mut state = snapshot.state;
    state.rebuild_order();
    Ok(Some((state, KeyRing::restore(&snapshot.keys)?)))
}

fn save_snapshot(shared: &Shared, path: &Path) -> anyhow::Result<()> {
    shared.dirty.store(false, Ordering::Release);
    let bytes = shared.read(|state| {
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            keys: Vec<String>,
            state: &'a State,
        }
        serde_json::to_vec_pretty(&SnapshotRef {
            keys: shared.keys.export(),
            state,
        })
    })?;
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, bytes)
        .with_context(|| format!("cannot write {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

/// Starts simulators.
#[derive(Debug)]
pub struct Simulator;

impl Simulator {
    /// Serves the simulator on `listener` (port 0 works) until [`RunningSimulator::shutdown`].
    pub async fn start(
        config: SimulatorConfig,
        listener: TcpListener,
    ) -> anyhow::Result<RunningSimulator> {
        let address = listener.local_addr()?;
        let host = if address.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], address.port()))
        } else {
            address
        };
        let base_url = Url::parse(&format!("http://{host}/"))?;
        let restored = match &config.state_file {
            Some(path) => load_snapshot(path)?,
            None => None,
        };
        let (state, keys) = match restored {
            Some(restored) => restored,
            None => (State::default(), KeyRing::generate()?),
        };
        let rng = match config.seed.or(state.faults.seed) {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => rand::make_rng(),
        };
        let http = reqwest::Client::builder()
            .build()
            .context("cannot build the webhook HTTP client")?;
        let shared = Arc::new(Shared::new(config, base_url, state, keys, rng, http));
        for pem_text in &shared.config.client_certificates {
            shared
                .credentials
                .add_certificate(pem_text.as_bytes())
                .map_err(|e| anyhow::anyhow!("client certificate: {e}"))?;
        }
        lifecycle::resume_timers(&shared);

        let router = api::routes(&shared)
            .merge(entra::routes())
            .merge(credentials::routes())
            .merge(admin::routes())
            .merge(metering::admin_routes())
            .with_state(Arc::clone(&shared));
        let stop = shared.cancel.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        });
        if let Some(path) = shared.config.state_file.clone() {
            let saver = Arc::clone(&shared);
            shared.tasks.spawn(async move {
                while saver.sleep(Duration::from_millis(500)).await {
                    if saver.dirty.load(Ordering::Acquire)
                        && let Err(e) = save_snapshot(&saver, &path)
                    {
                        tracing::error!(error = %format!("{e:#}"), "cannot save the simulator state");
                    }
                }
            });
        }
        tracing::info!(url = %shared.base_url, "marketplace simulator listening");
        Ok(RunningSimulator {
            shared,
            server: Some(server),
        })
    }
}

/// An operation's status (wire name) and when it was created and finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationProgress {
    pub status: String,
    /// How it ended: "acknowledged", "auto-accepted", ...
    pub resolution: Option<String>,
    pub created: time::OffsetDateTime,
    pub finished: Option<time::OffsetDateTime>,
    /// Each webhook delivery attempt for it, in order.
    pub webhook_attempts: Vec<WebhookAttempt>,
    /// The status each Get Operation answered, in order.
    pub reads: Vec<String>,
}

/// One delivery attempt of an operation's webhook, as Microsoft's side saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    /// When it ended: the ISV's answer came, or the attempt failed (its timeout included).
    pub ended: time::OffsetDateTime,
    /// The status code answered, or the error.
    pub outcome: String,
}

/// See [`SimulatorView::outstanding`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outstanding {
    pub operations_in_progress: usize,
    pub deliveries_pending: usize,
}

/// Reads the state of a running simulator; clones share it.
#[derive(Debug, Clone)]
pub struct SimulatorView {
    shared: Arc<Shared>,
}

impl SimulatorView {
    /// An operation as Microsoft would report it, with when it started and ended.
    pub fn operation_progress(
        &self,
        subscription_id: Uuid,
        operation_id: Uuid,
    ) -> Option<OperationProgress> {
        self.shared.read(|st| {
            let sub = st.subscriptions.get(&subscription_id)?;
            let op = sub.operation(operation_id)?;
            let webhook_attempts = sub
                .deliveries
                .iter()
                .filter(|d| d.operation_id == operation_id)
                .flat_map(|d| &d.attempts)
                .map(|a| WebhookAttempt {
                    ended: a.at,
                    outcome: match (a.status_code, &a.error) {
                        (Some(code), _) => code.to_string(),
                        (None, Some(error)) => error.clone(),
                        (None, None) => "no answer".to_string(),
                    },
                })
                .collect();
            Some(OperationProgress {
                webhook_attempts,
                reads: op.reads.clone(),
                status: state::wire_name(&op.status),
                resolution: op.resolution.clone(),
                created: op.created,
                finished: op.finished,
            })
        })
    }

    /// How often the JWKS was fetched so far.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::SeqCst)
    }

    /// The payloads of the webhooks sent (or being sent) for a subscription, in order.
    pub fn webhook_payloads(&self, subscription_id: Uuid) -> Vec<Value> {
        self.shared.read(|st| {
            let sub = st.subscriptions.get(&subscription_id);
            let deliveries = sub.into_iter().flat_map(|s| &s.deliveries);
            deliveries.map(|d| d.payload.clone()).collect()
        })
    }

    /// Preloads `count` Subscribed subscriptions without tokens, operations or webhooks
    /// (see `lifecycle::preload_subscribed`); their ids in order.
    pub fn preload_subscribed(
        &self,
        offer_id: &str,
        plan_id: &str,
        quantity: Option<u32>,
        count: usize,
    ) -> anyhow::Result<Vec<Uuid>> {
        lifecycle::preload_subscribed(&self.shared, offer_id, plan_id, quantity, count)
            .map_err(|e| anyhow::anyhow!("cannot preload subscriptions: {e:?}"))
    }

    /// Waits until the operation has ended, or `timeout` passed (then it is returned as it
    /// stands). `None` when there is no such operation.
    pub async fn wait_for_operation(
        &self,
        subscription_id: Uuid,
        operation_id: Uuid,
        timeout: Duration,
    ) -> Option<OperationProgress> {
        let deadline = tokio::time::Instant::now() + timeout;
        let ended = self.shared.operation_waiters.register(operation_id);
        let progress = loop {
            let notified = ended.notified();
            let progress = self.operation_progress(subscription_id, operation_id);
            let over = progress.as_ref().is_none_or(|p| p.finished.is_some());
            if over || tokio::time::Instant::now() >= deadline {
                break progress;
            }
            // Re-check now and then too: not every way an operation ends wakes waiters.
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        };
        self.shared.operation_waiters.release(operation_id, ended);
        progress
    }

    /// What is still moving: operations in progress and webhook deliveries not yet final
    /// (delivered, rejected or given up), over every subscription.
    pub fn outstanding(&self) -> Outstanding {
        self.shared.read(|st| {
            let mut outstanding = Outstanding::default();
            for sub in st.subscriptions.values() {
                outstanding.operations_in_progress +=
                    sub.operations.iter().filter(|o| o.status.is_open()).count();
                outstanding.deliveries_pending += sub
                    .deliveries
                    .iter()
                    .filter(|d| d.outcome == state::DeliveryOutcome::Pending)
                    .count();
            }
            outstanding
        })
    }

    /// `saasSubscriptionStatus`, plan and quantity of a subscription as Microsoft has them.
    pub fn subscription_status(
        &self,
        subscription_id: Uuid,
    ) -> Option<(String, String, Option<u32>)> {
        self.shared.read(|st| {
            let sub = st.subscriptions.get(&subscription_id)?;
            Some((
                state::wire_name(&sub.status),
                sub.plan_id.clone(),
                sub.quantity,
            ))
        })
    }
}

/// A simulator serving in the background; dropping it stops it (without waiting).
#[derive(Debug)]
pub struct RunningSimulator {
    shared: Arc<Shared>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningSimulator {
    /// `http://127.0.0.1:PORT/`.
    pub fn base_url(&self) -> Url {
        self.shared.base_url.clone()
    }

    /// Where `Operation-Location` and `@nextLink` point: the base URL on the link host.
    pub fn link_base_url(&self) -> Url {
        self.shared.link_base()
    }

    /// The `MARKETPLACE_API_URL` for the engine: base + `api`.
    pub fn api_url(&self) -> Url {
        self.join("api")
    }

    /// The `ENTRA_AUTHORITY_URL` for the engine: the base URL itself.
    pub fn authority_url(&self) -> Url {
        self.base_url()
    }

    /// `{base}{tenant}/discovery/v2.0/keys`.
    pub fn jwks_url(&self) -> Url {
        self.join(&format!(
            "{}/discovery/v2.0/keys",
            self.shared.config.tenant_id
        ))
    }

    /// `{base}{tenant}/oauth2/v2.0/token`.
    pub fn token_url(&self) -> Url {
        self.join(&format!(
            "{}/oauth2/v2.0/token",
            self.shared.config.tenant_id
        ))
    }

    /// The `iss` of v2 tokens: `{base}{tenant}/v2.0`.
    pub fn v2_issuer(&self) -> String {
        format!(
            "{}{}/v2.0",
            self.shared.base_url, self.shared.config.tenant_id
        )
    }

    pub fn config(&self) -> &SimulatorConfig {
        &self.shared.config
    }

    fn join(&self, path: &str) -> Url {
        let mut url = self.shared.base_url.clone();
        url.set_path(path);
        url
    }

    /// A webhook bearer token like the ones the sender uses, with `overrides` merged into
    /// its claims (`{"aud": "other"}`; `null` removes a claim): for verification tests.
    pub fn mint_webhook_token(&self, overrides: Value) -> anyhow::Result<String> {
        self.shared.mint_webhook_token(&overrides)
    }

    /// Signs arbitrary claims with the current key (forged-but-well-signed tokens).
    pub fn sign_token(&self, claims: &Value) -> anyhow::Result<String> {
        self.shared.keys.current().sign(claims)
    }

    /// A valid access token for the public API, as the v2 token endpoint would issue it.
    pub fn issue_access_token(&self) -> anyhow::Result<String> {
        self.sign_token(&self.shared.access_token_claims(IssuerVersion::V2))
    }

    /// A cheap, cloneable read-only handle on the simulator's state (for load drivers).
    pub fn view(&self) -> SimulatorView {
        SimulatorView {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Registers a certificate (PEM) on the app: client assertions it signs are accepted.
    /// Returns its SHA-1 thumbprint.
    pub fn register_client_certificate(&self, pem_text: &str) -> anyhow::Result<String> {
        self.shared
            .credentials
            .add_certificate(pem_text.as_bytes())
            .map_err(|e| anyhow::anyhow!(e))
    }

    /// Removes a certificate (SHA-1 thumbprint) from the app.
    pub fn remove_client_certificate(&self, sha1: &str) -> bool {
        self.shared.credentials.remove_certificate(sha1)
    }

    /// Adds a federated identity credential to the app.
    pub fn register_federated_credential(&self, credential: FederatedCredential) {
        self.shared.credentials.add_federated(credential);
    }

    /// The OIDC issuer the simulator plays for workload identity: `{base}federation`.
    pub fn federation_issuer(&self) -> String {
        credentials::federation_issuer(&self.shared)
    }

    /// A federated token from [`RunningSimulator::federation_issuer`], as a projected
    /// service-account token file holds it.
    pub fn mint_federated_token(
        &self,
        subject: &str,
        audience: &str,
        lifetime: Duration,
    ) -> anyhow::Result<String> {
        credentials::mint_federated_token(
            &self.shared,
            subject,
            audience,
            i64::try_from(lifetime.as_secs()).unwrap_or(i64::MAX),
        )
    }

    /// The App Service-style `IDENTITY_ENDPOINT`: `{base}msi/token`.
    pub fn identity_endpoint(&self) -> Url {
        self.join("msi/token")
    }

    /// Adds a new current signing key; the old ones stay in the JWKS. Returns the new `kid`.
    pub fn rotate_signing_key(&self) -> anyhow::Result<String> {
        self.shared.keys.rotate()
    }

    /// Stops serving, cancels timers and redeliveries, and saves the state file.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shared.cancel.cancel();
        if let Some(server) = self.server.take() {
            server.await.context("the simulator server panicked")??;
        }
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
        if let Some(path) = &self.shared.config.state_file {
            save_snapshot(&self.shared, path)?;
        }
        Ok(())
    }
}

impl Drop for RunningSimulator {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
    }
}

/// `fulfillment simulate`: serve the simulated marketplace for a local `fulfillment serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// The publisher's connection webhook (e.g. http://127.0.0.1:8080/webhook).
    #[arg(long)]
    pub webhook_url: Option<Url>,
    /// Landing page for purchase links (default: the webhook's origin + /landing).
    #[arg(long)]
    pub landing_url: Option<Url>,
    /// JSON file to load at start and keep saved.
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Token format of webhook calls.
    #[arg(long, value_enum, default_value = "v2")]
    pub issuer: IssuerVersion,
    /// Activate → Subscribed delay.
    #[arg(long, value_name = "MS")]
    pub activation_delay_ms: Option<u64>,
    /// Publisher PATCH/DELETE → Succeeded delay.
    #[arg(long, value_name = "MS")]
    pub operation_delay_ms: Option<u64>,
    /// Auto-accept window of customer changes (default 10000).
    #[arg(long, value_name = "MS")]
    pub ack_window_ms: Option<u64>,
    /// Event → first webhook attempt.
    #[arg(long, value_name = "MS")]
    pub webhook_delay_ms: Option<u64>,
    /// Between webhook redeliveries (default 57600, i.e. 500 over 8 h).
    #[arg(long, value_name = "MS")]
    pub webhook_retry_interval_ms: Option<u64>,
    /// Webhook attempts before giving up.
    #[arg(long)]
    pub webhook_max_attempts: Option<u32>,
    /// Seed of the fault-injection PRNG.
    #[arg(long)]
    pub seed: Option<u64>,
    /// The catalogue (offers, plans, seat limits, terms, dimensions, free trials): a TOML
    /// file, or JSON when the name ends in `.json`. Default: offer `contoso-analytics`.
    #[arg(long, value_name = "FILE")]
    pub catalogue: Option<PathBuf>,
    /// Host of `Operation-Location` and `@nextLink` (production answers on another host
    /// than the one called); `same` keeps them on the simulator's own address.
    #[arg(long, default_value = DEFAULT_LINK_HOST)]
    pub link_host: String,
    /// `Retry-After` of the 202 to PATCH/DELETE, in seconds (production: 10).
    #[arg(long, value_name = "SECONDS")]
    pub retry_after_secs: Option<u64>,
    /// How long a publisher operation stays `NotStarted`.
    #[arg(long, value_name = "MS")]
    pub operation_start_delay_ms: Option<u64>,
    /// Length of a simulated day (term ends, the 30-day suspension grace); default 86400000.
    #[arg(long, value_name = "MS")]
    pub day_ms: Option<u64>,
    /// List subscriptions page sizes, `MIN..=MAX` or one number (production: 66..=89).
    #[arg(long, value_name = "MIN..=MAX", value_parser = parse_page_sizes)]
    pub page_sizes: Option<std::ops::RangeInclusive<usize>>,
    /// Answer 404 for unknown operation ids as the docs say, not 400 as the live service.
    #[arg(long)]
    pub strict_404: bool,
    /// A PEM certificate registered on the app: the token endpoint accepts client
    /// assertions it signs (`MARKETPLACE_CREDENTIAL=certificate`). Repeatable.
    #[arg(long, value_name = "FILE")]
    pub client_certificate: Vec<PathBuf>,
    /// The `IDENTITY_HEADER` the managed identity endpoint (`/msi/token`) expects
    /// (default: any non-empty value).
    #[arg(long, value_name = "VALUE")]
    pub identity_header: Option<String>,
}

/// `66..=89`, `66..89` (the same) or `10`.
fn parse_page_sizes(raw: &str) -> Result<std::ops::RangeInclusive<usize>, String> {
    let number = |s: &str| {
        s.trim()
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{s:?} is not a page size (a positive integer)"))
    };
    let (min, max) = match raw.split_once("..") {
        Some((min, max)) => (number(min)?, number(max.trim_start_matches('='))?),
        None => {
            let n = number(raw)?;
            (n, n)
        }
    };
    if min > max {
        return Err(format!("the page sizes {raw:?} are empty (min > max)"));
    }
    Ok(min..=max)
}

impl SimulateArgs {
    fn apply(self, config: &mut SimulatorConfig) {
        let ms = Duration::from_millis;
        let t = &mut config.timings;
        if let Some(v) = self.activation_delay_ms {
            t.activation_delay = ms(v);
        }
        if let Some(v) = self.operation_delay_ms {
            t.operation_delay = ms(v);
        }
        if let Some(v) = self.ack_window_ms {
            t.ack_window = ms(v);
        }
        if let Some(v) = self.webhook_delay_ms {
            t.webhook_delay = ms(v);
        }
        if let Some(v) = self.webhook_retry_interval_ms {
            t.webhook_retry_interval = ms(v);
        }
        if let Some(v) = self.webhook_max_attempts {
            t.webhook_max_attempts = v;
        }
        if let Some(v) = self.operation_start_delay_ms {
            t.operation_start_delay = ms(v);
        }
        if let Some(v) = self.retry_after_secs {
            t.retry_after = Duration::from_secs(v);
        }
        if let Some(v) = self.day_ms {
            t.day = ms(v.max(1));
        }
        if let Some(sizes) = self.page_sizes {
            config.page_sizes = sizes;
        }
        config.link_host = match self.link_host.trim() {
            "" | "same" => None,
            host => Some(host.to_owned()),
        };
        config.strict_404 = self.strict_404;
        config.identity_header = self.identity_header.map(SecretString::from);
        config.landing_page_url = self.landing_url;
        config.state_file = self.state_file;
        config.issuer = self.issuer;
        config.seed = self.seed;
    }
}

/// Runs the simulator until `shutdown` is cancelled.
pub async fn run(
    settings: &Settings,
    args: SimulateArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut config = SimulatorConfig::from_settings(settings, args.webhook_url.clone());
    if let Some(path) = &args.catalogue {
        config.plans = Catalogue::load(path)?.plans;
    }
    for path in &args.client_certificate {
        config.client_certificates.push(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read --client-certificate {}", path.display()))?,
        );
    }
    let listen = args.listen;
    args.apply(&mut config);
    let listener = crate::http::listener::listen(listen)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let tenant = config.tenant_id;
    let client = config.client_id;
    let secret = config
        .client_secret
        .as_ref()
        .map(|s| s.expose_secret().to_owned());
    let webhook = config.webhook_url.clone();
    let simulator = Simulator::start(config, listener).await?;
    println!(
        "marketplace simulator listening on {}",
        simulator.base_url()
    );
    println!("  SaaS Fulfillment + Metering API: {}", simulator.api_url());
    println!(
        "  Entra token endpoint:            {}",
        simulator.token_url()
    );
    println!(
        "  JWKS:                            {}",
        simulator.jwks_url()
    );
    println!(
        "  admin:                           {}simulator/purchases",
        simulator.base_url()
    );
    println!(
        "  managed identity (IDENTITY_ENDPOINT): {}  IMDS (MARKETPLACE_IMDS_ENDPOINT): {}",
        simulator.identity_endpoint(),
        simulator.base_url()
    );
    println!(
        "  workload identity issuer:        {}",
        simulator.federation_issuer()
    );
    match &webhook {
        Some(url) => println!("  webhooks go to                   {url}"),
        None => println!("  no --webhook-url: webhooks are not sent"),
    }
    println!("for `fulfillment serve` and `fulfillment work`:");
    println!(
        "  MARKETPLACE_API_URL={} ENTRA_AUTHORITY_URL={} MARKETPLACE_TENANT_ID={tenant} MARKETPLACE_CLIENT_ID={client}{}",
        simulator.api_url().as_str().trim_end_matches('/'),
        simulator.authority_url(),
        // Only the generated secret is printed: a configured one is the operator's already.
        match (&secret, settings.marketplace.client_secret.is_some()) {
            (Some(secret), false) => format!(" MARKETPLACE_CLIENT_SECRET={secret}"),
            _ => String::new(),
        }
    );
    shutdown.cancelled().await;
    tracing::info!("marketplace simulator stopping");
    simulator.shutdown().await
}

/// [`run`] until ctrl-c or SIGTERM.
pub async fn run_until_signalled(settings: &Settings, args: SimulateArgs) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        trigger.cancel();
    });
    run(settings, args, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
