//! `fulfillment bench …`: benchmarks that measure this machine's ceilings in the same run
//! and report ratios, so the figures mean something on any machine.
//!
//! - [`ingress`]: signed webhooks through `fulfillment serve` (a child process) against
//!   RabbitMQ's confirmed-publish ceiling and a bare axum endpoint.
//! - [`burst`]: N customer changes on as many subscriptions issued at once; every one must
//!   be acknowledged within Microsoft's 10-second window (exit 1 when one is auto-accepted).
//! - [`scale`]: the pipeline and `reconcile` on an empty database and after preloading a
//!   million subscriptions and ten million event-log rows (`COPY`), side by side.
//! - [`chaos`]: webhooks through ingress, RabbitMQ, two workers and PostgreSQL while
//!   workers are killed, broker connections closed and PostgreSQL restarted; checks that
//!   nothing was lost, done twice or left different from the simulator (exit 1 otherwise).
//! - [`replay`]: `dlq replay --execute` of N dead letters against RabbitMQ's
//!   confirmed-publish ceiling with as many in flight.
//! - [`metering`]: usage through the API and the worker to the Metering API under 5xx,
//!   429, lost answers and an outage; checks every hour is billed once with its total.
//! - [`baseline`]: the minimal engine `pipeline` runs beside the real worker as this
//!   machine's limit for the same work.
//! - [`measure`]: the load driver, percentiles and `/proc` readings.
//!
//! Exit codes: 0 when the run completed (whether or not a target was met), 1 on failure;
//! `chaos` also exits 1 when its checks fail (something lost, applied twice or divergent),
//! `burst` when a change was auto-accepted.

pub mod baseline;
pub mod burst;
pub mod chaos;
pub mod harness;
pub mod ingress;
pub mod measure;
pub mod metering;
pub mod pipeline;
pub mod replay;
pub mod scale;

use std::process::ExitCode;

use crate::settings::Settings;

pub use ingress::IngressBenchArgs;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Signed webhooks through the ingress, against RabbitMQ's confirmed-publish ceiling.
    Ingress(IngressBenchArgs),
    /// Customer seat changes through simulator, ingress, RabbitMQ, worker and PostgreSQL,
    /// against PostgreSQL's single-row commit ceiling.
    Pipeline(pipeline::PipelineBenchArgs),
    /// Customer seat changes on as many subscriptions issued at once at the simulator; exit
    /// 0 only when every one was acknowledged within Microsoft's 10-second window.
    Burst(burst::BurstBenchArgs),
    /// The pipeline and a reconcile on an empty database, then again after preloading N
    /// subscriptions and M event-log rows with COPY; both side by side.
    Scale(scale::ScaleBenchArgs),
    /// Webhooks through ingress, RabbitMQ, two workers and PostgreSQL while workers are
    /// SIGKILLed, RabbitMQ connections force-closed and PostgreSQL restarted; exit 0 only
    /// when nothing was lost, nothing applied twice and both sides agree.
    Chaos(chaos::ChaosBenchArgs),
    /// Dead letters replayed to the work queue (confirm, journal, ack), against RabbitMQ's
    /// confirmed-publish ceiling.
    Replay(replay::ReplayBenchArgs),
    /// Usage events through the API to the simulated Metering API under 5xx, 429, lost
    /// answers and a compressed outage; exit 0 only when every hour's total at Microsoft
    /// equals what was accepted (nothing lost, nothing billed twice).
    Metering(metering::MeteringBenchArgs),
    /// Internal: a bare axum `POST /webhook` that answers 200 without doing anything, run as
    /// a child of `bench ingress` to measure the HTTP ceiling of this machine.
    #[command(hide = true)]
    BareHttp(ingress::BareHttpArgs),
    /// Internal: the minimal engine `bench pipeline` measures beside the real worker
    /// (consume, GET the operation, batched INSERT, PATCH the ACK), run as its child.
    #[command(hide = true)]
    BaselineEngine(baseline::BaselineEngineArgs),
}

pub async fn run(settings: Settings, command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Ingress(args) => ingress::run(settings, args).await,
        BenchCommand::Pipeline(args) => pipeline::run(settings, args).await,
        BenchCommand::Burst(args) => burst::run(settings, args).await,
        BenchCommand::Scale(args) => scale::run(settings, args).await,
        BenchCommand::BareHttp(args) => ingress::serve_bare_http(args).await,
        BenchCommand::BaselineEngine(args) => baseline::serve(settings, args).await,
        BenchCommand::Replay(args) => replay::run(settings, args).await,
        BenchCommand::Chaos(args) => chaos::run(settings, args).await,
        BenchCommand::Metering(args) => metering::run(settings, args).await,
    }
}
