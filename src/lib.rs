//! The publisher-side fulfillment engine for Microsoft commercial marketplace SaaS offers.
//!
//! Layout: the decisions live in the pure `fulfillment-state-machine` crate; this crate holds
//! the edges around it, one module each. One webhook's walk is a short spine:
//! [`http`] (the ingress verifies it, publishes it and answers after the broker's confirm)
//! → [`queue`] (RabbitMQ; a lane per `x-subscription-id`) → `worker::apply` (one
//! transaction: inbox, row lock, the machine decides, event-log row, outbox rows) →
//! `store::outbox` (claimed in the machine's order, by `EffectKind`) → `worker::protocol` (a
//! pure step says which call comes next) → [`marketplace`] (the client makes it; the answer
//! goes back to the step, its events back through apply). Around it: [`settings`] is the one
//! typed configuration tree, [`store`] is PostgreSQL as per-table SQL with typed rows and no
//! decisions, [`simulator`] is a faithful stand-in for Microsoft's side, [`telemetry`] sets
//! up logs and traces, [`metrics`] holds the Prometheus recorder and every metric name,
//! [`worker`] is the shell around the machine (consumer, apply, effect runner, notices),
//! [`web`] serves the landing page and the operator console (signed in with Entra ID),
//! [`ops`] the operator tools, [`world`] starts all of it against a scratch database for
//! `demo`, the benchmarks and the system tests, and [`cli`] maps the `fulfillment`
//! subcommands onto all of them. `main.rs` only calls [`cli::main`].

pub mod bench;
pub mod cli;
pub mod commands;
pub mod demo;
pub mod http;
pub mod marketplace;
pub mod metering;
pub mod metrics;
pub mod ops;
pub mod queue;
pub mod settings;
pub mod simulator;
pub mod store;
pub mod telemetry;
pub mod web;
pub mod webhooks;
pub mod worker;
pub mod world;
