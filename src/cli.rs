//! The `fulfillment` command line: one binary, one subcommand per process kind or operator
//! task. Exit codes ([`exit`], the table in `docs/operations.md`): 0 all fine, 1 problems
//! found, 2 usage or configuration error, 3 could not check (a dependency unreachable).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
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
        /// `mermaid` (renders on GitHub) or `dot` (Graphviz).
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
    /// Dead effects (work the runner gave up on): list, show, retry, abandon (journalled).
    #[command(subcommand)]
    Effects(crate::ops::effects::EffectsCommand),
    /// What needs a person now (dead letters, dead effects, refused commands, stuck
    /// purchases), each with the command to run. Exit code 1 when anything does.
    Status(crate::ops::status::StatusArgs),
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
    /// The ISV's webhook endpoints: add, list, show, rotate-secret, disable, enable, test,
    /// deliveries, replay (dry run unless --execute). docs/webhooks.md.
    #[command(subcommand)]
    Endpoint(crate::ops::endpoint::EndpointCommand),
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DiagramFormat {
    Mermaid,
    Dot,
}

/// Parses the command line, runs the subcommand and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = match command().try_get_matches() {
        Ok(matches) => match Cli::from_arg_matches(&matches) {
            Ok(cli) => cli,
            Err(error) => error.exit(),
        },
        Err(error) => error.exit(),
    };
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
            return ExitCode::from(exit::USAGE);
        }
    };
    // Processes that call Microsoft say everything they miss before connecting anywhere.
    if matches!(
        cli.command,
        Command::Serve | Command::Work | Command::Reconcile(_)
    ) && let Err(e) = settings.require_marketplace_identity()
    {
        eprintln!("error: {e}");
        return ExitCode::from(exit::USAGE);
    }
    // The preflight's verdicts are its output: its logs only when RUST_LOG asks for them.
    if !matches!(cli.command, Command::Doctor(_)) || std::env::var_os("RUST_LOG").is_some() {
        telemetry::init_service(
            settings.log.format,
            service_name(&cli.command),
            default_log_filter(&cli.command),
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::PROBLEMS);
        }
    };
    let result = runtime.block_on(run(cli.command, settings));
    drop(runtime);
    // After the runtime: exporting the last spans blocks.
    telemetry::shutdown();
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", render_error(&error));
            ExitCode::from(exit_code_of(&error))
        }
    }
}

/// The exit codes of every command, one contract for alerts and scripts.
pub mod exit {
    /// All fine.
    pub const OK: u8 = 0;
    /// The command ran and found problems (drift, dead letters, refusals, a failed check),
    /// or could not do what was asked.
    pub const PROBLEMS: u8 = 1;
    /// A usage or configuration error: the command line, a setting, or a deployment not
    /// prepared (database missing, schema behind, a login refused, an unknown prefix).
    pub const USAGE: u8 = 2;
    /// Could not check: a dependency (PostgreSQL, RabbitMQ, Microsoft) did not answer.
    pub const UNCHECKED: u8 = 3;
}

/// The exit code an error means: the first cause in its chain that says.
pub fn exit_code_of(error: &anyhow::Error) -> u8 {
    use crate::marketplace::Error as ApiError;
    use crate::queue::QueueError;
    use crate::store::StoreError;
    for cause in error.chain() {
        if cause.is::<crate::ops::UsageError>() || cause.is::<crate::settings::SettingsError>() {
            return exit::USAGE;
        }
        if let Some(store) = cause.downcast_ref::<StoreError>() {
            return match store {
                _ if store.is_unavailable() => exit::UNCHECKED,
                StoreError::AuthenticationFailed { .. }
                | StoreError::DatabaseMissing { .. }
                | StoreError::SchemaBehind { .. }
                | StoreError::SchemaMissing { .. } => exit::USAGE,
                _ => exit::PROBLEMS,
            };
        }
        if let Some(queue) = cause.downcast_ref::<QueueError>() {
            return match queue {
                QueueError::Connect { .. } => exit::UNCHECKED,
                QueueError::TopologyMissing { .. }
                | QueueError::AuthenticationFailed { .. }
                | QueueError::VhostMissing { .. } => exit::USAGE,
                _ => exit::PROBLEMS,
            };
        }
        if let Some(api) = cause.downcast_ref::<ApiError>() {
            return match api {
                ApiError::Transient { .. } | ApiError::Throttled { .. } => exit::UNCHECKED,
                ApiError::Unauthorized { .. } | ApiError::Configuration { .. } => exit::USAGE,
                _ => exit::PROBLEMS,
            };
        }
    }
    exit::PROBLEMS
}

/// An error and its causes on one line, each said once: a cause whose text its parent
/// already quotes is left out (our errors often name their source in their own message).
pub fn render_error(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let said = cause.to_string();
        if said.is_empty() || text.contains(&said) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&said);
    }
    text
}

/// The settings sections each subcommand reads (the rest of the tree is parsed, and
/// validated, but not used by it).
const READS: &[(&str, &[&str])] = &[
    ("migrate", &["database", "log"]),
    ("simulate", &["http", "log"]),
    (
        "serve",
        &[
            "database",
            "amqp",
            "marketplace",
            "http",
            "ingress",
            "policy",
            "reconcile",
            "log",
        ],
    ),
    (
        "work",
        &[
            "database",
            "amqp",
            "marketplace",
            "policy",
            "worker",
            "reconcile",
            "log",
        ],
    ),
    ("demo", &["database", "amqp", "log"]),
    ("bench", &["database", "amqp", "log"]),
    ("dlq", &["amqp", "database", "log"]),
    ("subscription", &["database", "amqp", "log"]),
    ("endpoint", &["database", "webhooks", "log"]),
    ("effects", &["database", "log"]),
    ("status", &["database", "amqp", "reconcile", "log"]),
    (
        "reconcile",
        &["database", "marketplace", "policy", "reconcile", "log"],
    ),
    (
        "doctor",
        &["database", "amqp", "marketplace", "http", "ingress", "log"],
    ),
];

/// The command line with, under each subcommand's `--help`, the environment variables and
/// settings it reads.
pub fn command() -> clap::Command {
    let mut command = Cli::command();
    for (name, sections) in READS {
        let help = settings_help(sections);
        command = command.mut_subcommand(*name, |sub| {
            let nested = help.clone();
            sub.after_long_help(help)
                .mut_subcommands(move |leaf| leaf.after_long_help(nested.clone()))
        });
    }
    command
}

/// "Reads: …" for `--help`: the conventional variables of `sections`, then the rule for
/// every other key.
fn settings_help(sections: &[&str]) -> String {
    let mut help = String::from("Settings read (environment variable = settings key):\n");
    for (variable, key) in crate::settings::ENV_KEYS {
        if sections
            .iter()
            .any(|section| key.split('.').next() == Some(section))
        {
            help.push_str(&format!("  {variable:<28} {key}\n"));
        }
    }
    help.push_str(&format!(
        "  and every key of the sections {} as FULFILLMENT__SECTION__KEY or in the \
         --config file (FULFILLMENT_CONFIG); RUST_LOG filters the logs.\n\
         docs/configuration.md lists every setting with its default.\n\
         Exit codes: 0 all fine, 1 problems found, 2 usage or configuration error, 3 could \
         not check (a dependency unreachable).",
        sections.join(", ")
    ));
    help
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

/// The log filter when `RUST_LOG` is not set. A benchmark runs the simulator in its own
/// process, which logs every call at INFO (thousands of lines per run): in a benchmark's
/// output only its warnings and errors appear.
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Bench(_) => "info,marketplace_fulfillment::simulator=warn",
        _ => telemetry::DEFAULT_FILTER,
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
        Command::Effects(command) => crate::ops::effects::run(&settings, command).await,
        Command::Status(args) => crate::ops::status::run(&settings, args).await,
        Command::Reconcile(args) => crate::ops::reconcile::run(&settings, args).await,
        Command::Doctor(args) => crate::ops::doctor::run(&settings, args).await,
        Command::Usage(command) => crate::ops::usage::run(&settings, command).await,
        Command::Endpoint(command) => crate::ops::endpoint::run(&settings, command).await,
    }
}
