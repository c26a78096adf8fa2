//! `fulfillment reconcile`.
use std::process::ExitCode;
use crate::settings::Settings;

#[derive(Debug, clap::Args)]
pub struct ReconcileArgs {
    #[arg(long)]
    pub execute: bool,
    #[arg(long)]
    pub json: bool,
}

pub async fn run(_settings: &Settings, _args: ReconcileArgs) -> anyhow::Result<ExitCode> {
    Ok(ExitCode::SUCCESS)
}
