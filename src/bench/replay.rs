//! `fulfillment bench replay`: how fast `fulfillment dlq replay --execute` moves dead letters
//! back to the work queue — each one published with a confirm, journalled in
//! `operator_actions` and only then acked off the dead-letter queue — against this
//! machine's confirmed-publish ceiling measured in the same run with the same messages and
//! the same number in flight (one replay round).
//!
//! Everything is throwaway: a fresh database on `DATABASE_URL`'s server and a
//! `<prefix>-bench-<id>` RabbitMQ topology, both removed at the end.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::measure::{self, round};
use crate::ops::dlq::{self, Filter, ReplayOptions};
use crate::queue::{Broker, InboundMessage, MessageMeta, PublisherCommand, Topology};
use crate::settings::Settings;

#[derive(Debug, Clone, clap::Args)]
pub struct ReplayBenchArgs {
    /// Dead letters to replay (and confirmed publishes for the ceiling).
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Messages per replay round, which is also how many are in flight (the ceiling is
    /// measured with as many in flight).
    #[arg(long, default_value_t = dlq::DEFAULT_BATCH)]
    pub batch: usize,
    /// Deadline of each phase in seconds.
    #[arg(long, default_value_t = 300)]
    pub max_seconds: u64,
}

pub async fn run(settings: Settings, args: ReplayBenchArgs) -> anyhow::Result<ExitCode> {
    if args.messages == 0 || args.batch == 0 {
        bail!("--messages and --batch must be at least 1");
    }
    let id = Uuid::new_v4().simple().to_string()[..12].to_string();
    let mut bench = settings.clone();
    let base_name = settings.database.url.url().path().trim_start_matches('/');
    bench.database.url = settings
        .database
        .url
        .with_path(&format!("/{base_name}_bench_{id}"));
    bench.amqp.prefix = format!("{}-bench-{id}", settings.amqp.prefix);
    crate::store::migrate(&bench.database)
        .await
        .context("cannot create the benchmark database")?;
    let result = async {
        let pool = crate::store::connect(&bench.database).await?;
        let broker = Broker::connect_with_topology(
            &bench.amqp,
            "fulfillment-bench-replay",
            Topology::new(&bench.amqp.prefix),
        )
        .await?;
        let measured = measure_replay(&broker, &pool, &args).await;
        let deleted = broker.delete_topology().await;
        broker.close().await;
        pool.close().await;
        let report = measured?;
        deleted?;
        anyhow::Ok(report)
    }
    .await;
    crate::bench::harness::drop_database(&bench).await;
    let report = result?;
    print(&report, &args);
    Ok(ExitCode::SUCCESS)
}

struct Report {
    ceiling_per_s: f64,
    ceiling_errors: usize,
    replay_per_s: f64,
    replay_elapsed: Duration,
    moved: usize,
    not_moved: usize,
    dlq_left: u32,
    journalled: i64,
}

/// The dead letters: publisher `Activate` commands, as the entitlement API queues them.
fn message(i: usize) -> (MessageMeta, Vec<u8>) {
    let command_id = Uuid::new_v4();
    let subscription =
        Uuid::from_u128(0xbe9c_0000_0000_4000_8000_0000_0000_0000 + (i % 1024) as u128);
    let body = InboundMessage::Command {
        command_id,
        subscription_id: subscription,
        command: PublisherCommand::Activate,
        requested_by: "bench".into(),
        requested_at: OffsetDateTime::now_utc(),
    }
    .to_json();
    let meta = MessageMeta {
        message_id: command_id.to_string(),
        correlation_id: command_id.to_string(),
        traceparent: None,
        subscription_id: Some(subscription),
    };
    (meta, body)
}

async fn measure_replay(
    broker: &Broker,
    pool: &PgPool,
    args: &ReplayBenchArgs,
) -> anyhow::Result<Report> {
    let deadline = Duration::from_secs(args.max_seconds);
    let publisher = broker.publisher().await?;
    let topology = broker.topology().clone();

    // The ceiling: the same messages, confirmed, with a round's worth in flight.
    let ceiling = {
        let publisher = publisher.clone();
        measure::drive(args.batch, args.messages, deadline, move |i| {
            let publisher = publisher.clone();
            async move {
                let (meta, body) = message(i);
                let message = InboundMessage::from_json(&body).expect("a message");
                publisher.publish_inbound(&message, &meta).await.is_ok()
            }
        })
        .await
    };
    purge(broker, &topology.inbound_queue()).await?;

    // The dead letters, as the worker leaves them.
    let filled = {
        let publisher = publisher.clone();
        measure::drive(args.batch, args.messages, deadline, move |i| {
            let publisher = publisher.clone();
            async move {
                let (meta, body) = message(i);
                let reason = "bench: retries exhausted";
                let published = publisher.publish_dead_letter(&body, &meta, 4, reason);
                published.await.is_ok()
            }
        })
        .await
    };
    if filled.errors > 0 || filled.truncated {
        bail!(
            "could not fill the dead-letter queue ({} of {} confirmed)",
            filled.completed - filled.errors,
            args.messages
        );
    }

    // The replay, as `dlq replay --execute` runs it.
    let options = ReplayOptions {
        limit: None,
        rate: None,
        execute: true,
        actor: "bench:replay".into(),
        batch: args.batch,
    };
    let started = Instant::now();
    let report = dlq::replay(
        broker,
        pool,
        &Filter::default(),
        &options,
        &indicatif::ProgressBar::hidden(),
    )
    .await?;
    let replay_elapsed = started.elapsed();
    let dlq_left = ready(broker, &topology.dead_letter_queue()).await?;
    let journalled: i64 = crate::store::verify::journalled(pool, "dlq_replay").await?;
    purge(broker, &topology.inbound_queue()).await?;
    Ok(Report {
        ceiling_per_s: ceiling.ok_per_second(),
        ceiling_errors: ceiling.errors,
        replay_per_s: report.moved as f64 / replay_elapsed.as_secs_f64().max(f64::EPSILON),
        replay_elapsed,
        moved: report.moved,
        not_moved: report.not_moved.len(),
        dlq_left,
        journalled,
    })
}

async fn purge(broker: &Broker, queue: &str) -> anyhow::Result<()> {
    broker
        .purge_queue(queue)
        .await
        .with_context(|| format!("cannot purge {queue}"))?;
    Ok(())
}

async fn ready(broker: &Broker, queue: &str) -> anyhow::Result<u32> {
    Ok(broker.ready_messages(queue).await?)
}

fn print(report: &Report, args: &ReplayBenchArgs) {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let ratio = if report.ceiling_per_s > 0.0 {
        report.replay_per_s / report.ceiling_per_s
    } else {
        0.0
    };
    println!(
        "dlq replay --execute: {} dead letters in {:.2} s = {:.0}/s ({} not moved, {} left in the DLQ, {} journalled)",
        report.moved,
        report.replay_elapsed.as_secs_f64(),
        report.replay_per_s,
        report.not_moved,
        report.dlq_left,
        report.journalled
    );
    println!(
        "confirmed-publish ceiling, {} in flight: {:.0}/s ({} errors); ratio {:.2}",
        args.batch, report.ceiling_per_s, report.ceiling_errors, ratio
    );
    println!(
        "{}",
        json!({
            "bench": "replay",
            "messages": args.messages,
            "batch": args.batch,
            "replay_per_s": round(report.replay_per_s, 0),
            "replay_elapsed_ms": report.replay_elapsed.as_millis() as u64,
            "publish_ceiling_per_s": round(report.ceiling_per_s, 0),
            "ratio": round(ratio, 2),
            "moved": report.moved,
            "not_moved": report.not_moved,
            "dlq_left": report.dlq_left,
            "journalled": report.journalled,
            "machine": { "cores": cores },
        })
    );
}
