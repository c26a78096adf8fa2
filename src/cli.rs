//! The `fulfillment` command line: one binary, one subcommand per process kind or operator
//! task. Exit codes: 0 success, 1 failure (or drift found), 2 usage or settings error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fulfillment_state_machine::diagram;

use crate::settings::Settings;
use crate::{store, telemetry};

/// Publisher-side fulfillment engine for Microsoft commercial marketplace SaaS offers.
#[derive(Debug, Parser)]
#[command(name = "fulfillment", version, about)]
pub struct Cli {
    /// Settings file (TOML); overrides the defaults, and the environment overrides it.
    #[arg(long, global = true, env = "FULFILLMENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the database if absent and apply the schema migrations (idempotent).
    Migrate,
    /// Print the subscription lifecycle diagram, derived from the state machine itself.
    StateMachine {
        #[arg(long, value_enum, default_value_t = DiagramFormat::Mermaid)]
        format: DiagramFormat,
    },
    /// Serve a simulated Microsoft marketplace (Fulfillment, Metering, Entra, webhooks).
    Simulate(crate::simulator::SimulateArgs),
    /// Serve the ingress: Marketplace webhook, landing page, entitlement API, health and
    /// metrics. Stops on ctrl-c/SIGTERM after the requests in flight finish.
    Serve,
    /// Run a worker: consume Marketplace events and publisher commands, drive each
    /// subscription through the state machine and carry out its effects. Stops on
    /// ctrl-c/SIGTERM after the message and the effects in hand.
    Work,
    /// Run the whole lifecycle in one process against the simulator and the local
    /// PostgreSQL and RabbitMQ, print the timeline, check both sides, exit.
    Demo(crate::demo::DemoArgs),
    /// Measure throughput, latency and memory against this machine's own ceilings.
    #[command(subcommand)]
    Bench(crate::bench::BenchCommand),
    /// Dead letters: list, show, replay to the work queue, purge (dry runs unless --execute).
    #[command(subcommand)]
    Dlq(crate::ops::dlq::DlqCommand),
    /// Subscriptions: list, show the timeline from the event log, publisher commands.
    #[command(subcommand)]
    Subscription(crate::ops::subscription::SubscriptionCommand),
    /// Compare Microsoft's List Subscriptions with our state; with --execute, heal the drift
    /// through the machine. Exit code 1 when drift is found (with --execute: left).
    Reconcile(crate::ops::reconcile::ReconcileArgs),
    /// Read-only preflight of a deployment: settings, PostgreSQL, RabbitMQ, Entra token,
    /// Fulfillment API, webhook JWKS and audiences, public URLs; each with a verdict and
    /// the fix. Exit code 1 when a problem is found.
    Doctor(crate::ops::doctor::DoctorArgs),
    /// Metered usage: import a CSV (dry run unless --execute), list and show hours,
    /// reconcile with Microsoft's usage records (exit code 1 on a difference).
    #[command(subcommand)]
    Usage(crate::ops::usage::UsageCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DiagramFormat {
    Mermaid,
    Dot,
}

/// Parses the command line, runs the subcommand and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that need no settings run before the settings are read.
    if let Command::StateMachine { format } = cli.command {
        print!("{}", render_diagram(format));
        return ExitCode::SUCCESS;
    }
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(settings) => settings,
        Err(e) => {
            // The preflight reports unparsable settings as its first verdict.
            if let Command::Doctor(args) = &cli.command {
                crate::ops::doctor::print_report(
                    &crate::ops::doctor::Report::unparsable(&e),
                    args.json,
                );
            } else {
                eprintln!("error: {e}");
            }
            return ExitCode::from(2);
        }
    };
    // The preflight's verdicts are its output: its logs only when RUST_LOG asks for them.
    if !matches!(cli.command, Command::Doctor(_)) || std::env::var_os("RUST_LOG").is_some() {
        telemetry::init_service(settings.log.format, service_name(&cli.command));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(run(cli.command, settings));
    drop(runtime);
    // After the runtime: exporting the last spans blocks.
    telemetry::shutdown();
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<crate::ops::UsageError>().is_some() => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The OpenTelemetry service name of each process kind (`OTEL_SERVICE_NAME` overrides it).
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Serve => "fulfillment-serve",
        Command::Work => "fulfillment-work",
        Command::Simulate(_) => "fulfillment-simulator",
        _ => "fulfillment",
    }
}

/// The diagram of the lifecycle in the given format.
pub fn render_diagram(format: DiagramFormat) -> String {
    let transitions = diagram::transitions();
    match format {
        DiagramFormat::Mermaid => diagram::render_mermaid(&transitions),
        DiagramFormat::Dot => diagram::render_dot(&transitions),
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate => {
            let report = store::migrate(&settings.database).await?;
            if report.database_created {
                println!("created database {}", settings.database.url);
            }
            if report.applied.is_empty() {
                println!("schema up to date ({})", settings.database.url);
            } else {
                for migration in &report.applied {
                    println!("applied {migration}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::StateMachine { format } => {
            print!("{}", render_diagram(format));
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate(args) => {
            crate::simulator::run_until_signalled(&settings, args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve => {
            crate::http::serve(settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Work => {
            crate::worker::run::run_until_signalled(settings).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => crate::demo::run(settings, args).await,
        Command::Bench(command) => crate::bench::run(settings, command).await,
        Command::Dlq(command) => crate::ops::dlq::run(&settings, command).await,
        Command::Subscription(command) => crate::ops::subscription::run(&settings, command).await,
        Command::Reconcile(args) => crate::ops::reconcile::run(&settings, args).await,
        Command::Doctor(args) => crate::ops::doctor::run(&settings, args).await,
        Command::Usage(command) => crate::ops::usage::run(&settings, command).await,
    }
}
