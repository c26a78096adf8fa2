//! The baseline engine of `bench pipeline`: the least work that acknowledges a customer's
//! change — consume the webhook from the ingress's queue, GET the operation, record one row
//! per change in batched commits, PATCH the ACK, ack the message. No state machine, no
//! outbox, no event log, no confirmation, no domain event, no per-subscription order.
//!
//! It runs as a child process (`fulfillment bench baseline-engine`, hidden) over the same
//! simulator, ingress, RabbitMQ and PostgreSQL as the real worker, so its rate is this
//! machine's limit for this work and the real pipeline's rate is reported as a ratio to it.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::marketplace::{CallContext, MarketplaceClient, TokenProvider, UpdateOperationStatus};
use crate::queue::{Broker, InboundDelivery, InboundMessage, connection_name_for};
use crate::settings::Settings;
use crate::store::baseline::{self, ChangeRow};

/// Unacknowledged deliveries the engine holds, i.e. changes in flight.
const PREFETCH: u16 = 256;
/// The most rows one commit records.
const BATCH: usize = 256;

#[derive(Debug, Clone, clap::Args)]
pub struct BaselineEngineArgs {
    /// Where `GET /readyz` answers once the engine consumes.
    #[arg(long)]
    pub listen: SocketAddr,
}

/// `fulfillment bench baseline-engine`: runs until SIGTERM.
pub async fn serve(settings: Settings, args: BaselineEngineArgs) -> anyhow::Result<ExitCode> {
    let pool = crate::store::connect(&settings.database).await?;
    baseline::create(&pool).await?;
    let tokens = TokenProvider::for_settings(&settings)?;
    let client = Arc::new(MarketplaceClient::new(&settings.marketplace, tokens)?);
    let broker = Broker::connect_existing(
        &settings.amqp,
        &connection_name_for("bench-baseline", &settings.amqp.prefix),
    )
    .await?;
    let mut consumer = broker.consume_inbound(PREFETCH, "").await?;
    let (rows, batches) = mpsc::channel::<(ChangeRow, oneshot::Sender<bool>)>(BATCH * 4);
    let writer = tokio::spawn(write_batches(pool.clone(), batches));

    let stop = CancellationToken::new();
    let listener = crate::http::listener::listen(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let router = Router::new().route("/readyz", get(|| async { "ok" }));
    let http_stop = stop.clone();
    let http = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(http_stop.cancelled_owned())
            .await
    });

    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let delivery = tokio::select! {
            () = crate::http::shutdown_signal() => break,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "baseline engine: consume failed");
                    continue;
                }
                None => break,
            },
        };
        let client = Arc::clone(&client);
        let rows = rows.clone();
        tasks.spawn(async move { handle(&client, &rows, delivery).await });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    consumer.cancel().await;
    drop(rows);
    writer.await.context("the batch writer panicked")??;
    stop.cancel();
    http.await.context("the readiness server panicked")??;
    broker.close().await;
    pool.close().await;
    Ok(ExitCode::SUCCESS)
}

/// One change: GET the operation, record it (batched), PATCH `Success`, ack the message.
/// Anything unexpected is retried later by RabbitMQ (the delivery is requeued through the
/// retry tier); the benchmark counts what was not acknowledged.
async fn handle(
    client: &MarketplaceClient,
    rows: &mpsc::Sender<(ChangeRow, oneshot::Sender<bool>)>,
    delivery: InboundDelivery,
) {
    let outcome: anyhow::Result<()> = async {
        let (subscription, operation, received_at) = webhook_of(&delivery)?;
        let ctx = CallContext::new(operation);
        let found = client
            .get_operation(&ctx, subscription, operation)
            .await?
            .into_value();
        let (done, recorded) = oneshot::channel();
        let row = ChangeRow {
            subscription,
            operation,
            quantity: found.quantity.map(i64::from),
            received_at,
        };
        rows.send((row, done))
            .await
            .map_err(|_| anyhow::anyhow!("the batch writer stopped"))?;
        if !recorded.await.unwrap_or(false) {
            anyhow::bail!("the batch holding operation {operation} did not commit");
        }
        client
            .update_operation(
                &ctx,
                subscription,
                operation,
                UpdateOperationStatus::Success,
            )
            .await?;
        Ok(())
    }
    .await;
    let ended = match outcome {
        Ok(()) => delivery.ack().await.map(drop),
        Err(e) => delivery.retry_later(&e.to_string()).await.map(drop),
    };
    if let Err(e) = ended {
        tracing::warn!(error = %e, "baseline engine: cannot settle a delivery");
    }
}

/// The subscription, operation and receipt time of a webhook message.
fn webhook_of(delivery: &InboundDelivery) -> anyhow::Result<(Uuid, Uuid, time::OffsetDateTime)> {
    let message = delivery
        .message
        .as_ref()
        .map_err(|e| anyhow::anyhow!("not a message: {e}"))?;
    let InboundMessage::Webhook {
        received_at,
        payload,
    } = message
    else {
        anyhow::bail!("the baseline engine handles webhooks only");
    };
    let body: serde_json::Value = serde_json::from_str(payload)?;
    let id = |key: &str| -> anyhow::Result<Uuid> {
        body.get(key)
            .and_then(serde_json::Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok())
            .with_context(|| format!("the webhook has no {key}"))
    };
    Ok((id("subscriptionId")?, id("id")?, *received_at))
}

/// Commits what arrived together: one transaction per batch of up to [`BATCH`] rows.
async fn write_batches(
    pool: sqlx::PgPool,
    mut batches: mpsc::Receiver<(ChangeRow, oneshot::Sender<bool>)>,
) -> anyhow::Result<()> {
    let mut batch = Vec::with_capacity(BATCH);
    while let Some(first) = batches.recv().await {
        batch.push(first);
        while batch.len() < BATCH {
            match batches.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let rows: Vec<&ChangeRow> = batch.iter().map(|(row, _)| row).collect();
        let committed = baseline::insert_batch(&pool, &rows).await;
        if let Err(e) = &committed {
            tracing::warn!(error = %e, rows = rows.len(), "baseline engine: batch failed");
        }
        for (_, done) in batch.drain(..) {
            let _ = done.send(committed.is_ok());
        }
    }
    Ok(())
}
