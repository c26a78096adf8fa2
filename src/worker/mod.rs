//! The shell around the state machine: turns queue messages into machine events, applies
//! them through the store's one transaction, and runs the effects the machine decided.
//!
//! - [`translate`]: queue messages and Microsoft's wire types → machine events.
//! - [`apply`]: the one apply path (inbox, row lock, machine, event log, outbox) for the
//!   consumer, the effect runner and the reconciler alike.
//! - [`consume`]: the consumer loop (inbound queue → [`apply`] → ack).
//! - [`protocol`]: the Microsoft protocol of each effect as pure steps (sans-IO): which
//!   call next, how long to wait, which events an answer means.
//! - [`effects`]: the outbox runner: claims effects, carries out their protocols' steps
//!   (Microsoft calls, domain events) and feeds the results back as machine events.
//! - [`deliveries`]: signed webhook deliveries to the ISV's endpoints (their own runner).
//! - [`notices`]: emits the lifecycle notices whose time has come.
//! - [`run`]: `fulfillment work`: wiring, the [`Worker`] handle, graceful shutdown.
//! - [`listener`]: the worker's `/metrics`, `/healthz` and `/readyz`.

pub mod apply;
pub mod consume;
pub mod credential_health;
pub mod deliveries;
pub mod effects;
pub mod listener;
pub mod notices;
pub mod protocol;
pub mod run;
pub mod translate;

pub use consume::{Handled, MessageHandler};
pub use effects::{EffectRunner, EffectsConfig};
pub use listener::MetricsListener;
pub use protocol::ProtocolConfig;
pub use run::{Worker, WorkerConfig, WorkerParts, run_worker};
