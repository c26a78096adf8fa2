//! The `fulfillment` binary: every subcommand lives in the library (`cli`).

fn main() -> std::process::ExitCode {
    marketplace_fulfillment::cli::main()
}
