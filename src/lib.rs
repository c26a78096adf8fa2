//! The publisher-side fulfillment engine for Microsoft commercial marketplace SaaS offers.
//!
//! Layout: the decisions live in the pure `fulfillment-state-machine` crate; this crate holds
//! the edges around it, one module each. [`settings`] is the one typed configuration tree,
//! [`store`] is PostgreSQL (state, event log, inbox, outbox), [`marketplace`] is the client
//! of Microsoft's SaaS Fulfillment API v2 with its Entra token provider and retry policy,
//! [`simulator`] is a faithful stand-in for Microsoft's side, [`telemetry`] sets up logs and
//! traces, [`metrics`] holds the Prometheus recorder and every metric name, [`worker`] is the
//! shell around the machine — its `protocol` module holds the Microsoft side of each effect
//! as pure steps, and the effect runner only carries them out —
//! [`web`] serves the landing page and the operator console (signed in with Entra ID),
//! and [`cli`] maps the `fulfillment` subcommands onto all of them. `main.rs` only calls
//! [`cli::main`].

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
pub mod worker;
