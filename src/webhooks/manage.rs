//! What the entitlement API and the `fulfillment endpoint` CLI do with endpoints, in one
//! place: register (a fresh secret, shown once), change, rotate the secret, send a test
//! event, read the delivery log, replay deliveries (journalled like `dlq replay`), and the
//! JSON views both answer with.

use serde_json::{Value, json};
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use super::{EndpointUrl, Secret, TEST_TOPIC, TopicFilter};
use crate::store::StoreError;
use crate::store::deliveries::{
    self, AttemptOutcome, AttemptRow, NewAttempt, ReplayCandidate, ReplaySelection,
};
use crate::store::endpoints::{self, EndpointChanges, EndpointRow, EndpointStatus, NewEndpoint};
use crate::store::operator_actions::{self, ActionKind, NewAction};
use crate::worker::deliveries::{SendResult, http_client, parse_secrets, send};
use crate::worker::protocol::deliver::DeliveryAnswer;

/// Why a request about endpoints is refused.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// The request is wrong; the message says how (HTTP 422 / CLI usage error).
    #[error("{0}")]
    Invalid(String),
    #[error("no webhook endpoint {0}")]
    NotFound(Uuid),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A new endpoint as asked for (API body or CLI flags).
#[derive(Debug, Clone, Default)]
pub struct CreateEndpoint {
    pub url: String,
    pub description: Option<String>,
    /// Default: every topic.
    pub topics: Option<Vec<String>>,
    pub offer_id: Option<String>,
    pub insecure: bool,
}

/// Changes asked for; `None` leaves a field.
#[derive(Debug, Clone, Default)]
pub struct UpdateEndpoint {
    pub url: Option<String>,
    pub description: Option<String>,
    pub topics: Option<Vec<String>>,
    /// `Some(None)`: every offer.
    pub offer_id: Option<Option<String>>,
    pub insecure: Option<bool>,
    pub enabled: Option<bool>,
}

fn invalid(error: impl std::fmt::Display) -> ManageError {
    ManageError::Invalid(error.to_string())
}

fn offer(offer_id: Option<&str>) -> Result<Option<&str>, ManageError> {
    match offer_id.map(str::trim) {
        None => Ok(None),
        Some("") => Err(invalid(
            "`offerId` must not be empty (omit it for every offer)",
        )),
        Some(offer) if offer.len() > 256 => Err(invalid("`offerId` is longer than 256 characters")),
        Some(offer) => Ok(Some(offer)),
    }
}

/// Registers an endpoint; returns it and its secret, which is shown this once.
pub async fn create(
    pool: &PgPool,
    request: &CreateEndpoint,
) -> Result<(EndpointRow, Secret), ManageError> {
    let url = EndpointUrl::parse(&request.url, request.insecure).map_err(invalid)?;
    let topics = TopicFilter::parse(request.topics.as_deref().unwrap_or(&["*".to_owned()]))
        .map_err(invalid)?;
    let description = request.description.as_deref().unwrap_or("");
    if description.len() > 1024 {
        return Err(invalid("`description` is longer than 1024 characters"));
    }
    let secret = Secret::generate();
    let row = endpoints::insert(
        pool,
        &NewEndpoint {
            url: url.as_str(),
            description,
            topics: topics.as_slice(),
            offer_id: offer(request.offer_id.as_deref())?,
            insecure: request.insecure,
            secret: secret.expose(),
        },
    )
    .await?;
    tracing::info!(endpoint_id = %row.id, "webhook endpoint registered");
    Ok((row, secret))
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<EndpointRow, ManageError> {
    endpoints::get(pool, id)
        .await?
        .ok_or(ManageError::NotFound(id))
}

pub async fn update(
    pool: &PgPool,
    id: Uuid,
    request: &UpdateEndpoint,
) -> Result<EndpointRow, ManageError> {
    let current = get(pool, id).await?;
    let insecure = request.insecure.unwrap_or(current.insecure);
    // A URL is checked against the insecure switch it will live with.
    let url = EndpointUrl::parse(request.url.as_deref().unwrap_or(&current.url), insecure)
        .map_err(invalid)?;
    let topics = request
        .topics
        .as_deref()
        .map(TopicFilter::parse)
        .transpose()
        .map_err(invalid)?;
    let offer_id = match &request.offer_id {
        None => None,
        Some(None) => Some(None),
        Some(Some(offer_id)) => Some(offer(Some(offer_id))?),
    };
    let changes = EndpointChanges {
        url: Some(url.as_str()),
        description: request.description.as_deref(),
        topics: topics.as_ref().map(TopicFilter::as_slice),
        offer_id,
        insecure: request.insecure,
        status: request.enabled.map(|enabled| {
            if enabled {
                EndpointStatus::Enabled
            } else {
                EndpointStatus::Disabled
            }
        }),
    };
    endpoints::update(pool, id, &changes)
        .await?
        .ok_or(ManageError::NotFound(id))
}

pub async fn delete(pool: &PgPool, id: Uuid) -> Result<(), ManageError> {
    if endpoints::delete(pool, id).await? {
        tracing::info!(endpoint_id = %id, "webhook endpoint deleted");
        Ok(())
    } else {
        Err(ManageError::NotFound(id))
    }
}

/// A new secret; the old one keeps signing (a second signature) for `overlap`.
pub async fn rotate_secret(
    pool: &PgPool,
    id: Uuid,
    overlap: std::time::Duration,
) -> Result<(EndpointRow, Secret), ManageError> {
    let secret = Secret::generate();
    let until = OffsetDateTime::now_utc() + overlap;
    let row = endpoints::rotate_secret(pool, id, secret.expose(), until)
        .await?
        .ok_or(ManageError::NotFound(id))?;
    tracing::info!(endpoint_id = %id, "webhook endpoint secret rotated");
    Ok((row, secret))
}

/// Sends a signed `webhook.test` event now and logs the attempt.
pub async fn send_test(
    pool: &PgPool,
    id: Uuid,
    timeout: std::time::Duration,
) -> Result<(String, SendResult), ManageError> {
    let endpoint = get(pool, id).await?;
    let stored = endpoints::signing_secrets(pool, id)
        .await?
        .ok_or(ManageError::NotFound(id))?;
    let secrets = parse_secrets(&stored).map_err(ManageError::Invalid)?;
    let secret_refs: Vec<&Secret> = secrets.iter().collect();
    let event_id = format!("test_{}", Uuid::now_v7().simple());
    let body = test_event(&event_id, id, OffsetDateTime::now_utc());
    let bytes = serde_json::to_vec(&body).expect("JSON always serializes");
    let sent = send(
        &http_client(timeout),
        &endpoint.url,
        &secret_refs,
        &event_id,
        &bytes,
    )
    .await;
    let delivered = matches!(sent.answer, DeliveryAnswer::Status { status, .. } if (200..300).contains(&status));
    deliveries::record_attempt(
        pool,
        &NewAttempt {
            endpoint_id: id,
            event_id: &event_id,
            outbox_id: None,
            status: sent.status(),
            latency_ms: i32::try_from(sent.latency.as_millis()).unwrap_or(i32::MAX),
            response_head: &sent.head,
            outcome: if delivered {
                AttemptOutcome::Delivered
            } else {
                AttemptOutcome::Failed
            },
        },
    )
    .await?;
    Ok((event_id, sent))
}

/// The CloudEvent of a test delivery.
pub fn test_event(id: &str, endpoint_id: Uuid, time: OffsetDateTime) -> Value {
    json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("urn:fulfillment:webhook-endpoint:{endpoint_id}"),
        "type": format!("com.fulfillment.{TEST_TOPIC}"),
        "subject": endpoint_id.to_string(),
        "time": timestamp(time),
        "datacontenttype": "application/json",
        "data": { "endpointId": endpoint_id, "message": "a test event: your endpoint works" },
    })
}

/// The delivery log of an endpoint, newest first.
pub async fn attempts(
    pool: &PgPool,
    id: Uuid,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AttemptRow>, ManageError> {
    get(pool, id).await?;
    Ok(deliveries::attempts(pool, id, before, limit).await?)
}

/// What a replay did (or, dry, would do).
#[derive(Debug, Clone)]
pub struct ReplayReport {
    pub dry_run: bool,
    pub candidates: Vec<ReplayCandidate>,
    pub replayed: u64,
}

/// Replays the selected deliveries; `dry_run` only lists them. A real replay is journalled
/// in `operator_actions` (one row) by `actor`.
pub async fn replay(
    pool: &PgPool,
    selection: &ReplaySelection,
    dry_run: bool,
    actor: &str,
) -> Result<ReplayReport, ManageError> {
    let candidates = deliveries::replay_candidates(pool, selection).await?;
    if dry_run {
        return Ok(ReplayReport {
            dry_run,
            candidates,
            replayed: 0,
        });
    }
    let replayed = deliveries::replay(pool, selection).await?;
    operator_actions::record_all(
        pool,
        &[NewAction {
            action: ActionKind::WebhookReplay,
            performed_by: actor.to_owned(),
            performed_at: OffsetDateTime::now_utc(),
            subscription_id: None,
            dead_letter_id: None,
            queue: None,
            reason: Some(selection_text(selection)),
            details: json!({
                "replayed": replayed,
                "deliveries": candidates.iter().map(|c| json!({
                    "outboxId": c.outbox_id, "endpointId": c.endpoint_id, "eventId": c.event_id,
                })).collect::<Vec<_>>(),
            }),
        }],
    )
    .await
    .map_err(StoreError::from)?;
    tracing::info!(
        replayed,
        selection = selection_text(selection),
        "webhook deliveries replayed"
    );
    Ok(ReplayReport {
        dry_run,
        candidates,
        replayed,
    })
}

fn selection_text(selection: &ReplaySelection) -> String {
    match selection {
        ReplaySelection::Event {
            event_id,
            endpoint_id,
        } => match endpoint_id {
            Some(endpoint) => format!("event {event_id} to endpoint {endpoint}"),
            None => format!("event {event_id}"),
        },
        ReplaySelection::Failures { endpoint_id } => format!("failures of endpoint {endpoint_id}"),
        ReplaySelection::Since { since, endpoint_id } => match endpoint_id {
            Some(endpoint) => format!("since {} to endpoint {endpoint}", timestamp(*since)),
            None => format!("since {}", timestamp(*since)),
        },
    }
}

fn timestamp(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap_or_default()
}

/// The JSON view of an endpoint (never its secret).
pub fn endpoint_view(row: &EndpointRow) -> Value {
    json!({
        "id": row.id,
        "url": row.url,
        "description": row.description,
        "topics": row.topics,
        "offerId": row.offer_id,
        "insecure": row.insecure,
        "status": row.status,
        "disabledReason": row.disabled_reason,
        "failingSince": row.failing_since.map(timestamp),
        "previousSecretValidUntil": row.previous_secret_until
            .filter(|until| *until > OffsetDateTime::now_utc())
            .map(timestamp),
        "createdAt": timestamp(row.created_at),
        "updatedAt": timestamp(row.updated_at),
    })
}

/// The JSON view of one attempt.
pub fn attempt_view(row: &AttemptRow) -> Value {
    json!({
        "id": row.id,
        "eventId": row.event_id,
        "attemptedAt": timestamp(row.attempted_at),
        "status": row.status,
        "latencyMs": row.latency_ms,
        "response": row.response_head,
        "outcome": row.outcome,
    })
}

/// The JSON view of a test delivery's answer.
pub fn test_view(event_id: &str, sent: &SendResult) -> Value {
    json!({
        "eventId": event_id,
        "delivered": matches!(sent.answer, DeliveryAnswer::Status { status, .. } if (200..300).contains(&status)),
        "status": sent.status(),
        "latencyMs": u64::try_from(sent.latency.as_millis()).unwrap_or(u64::MAX),
        "response": sent.head,
        "answer": sent.answer.describe(),
    })
}

/// The JSON view of a replay.
pub fn replay_view(report: &ReplayReport) -> Value {
    json!({
        "dryRun": report.dry_run,
        "replayed": report.replayed,
        "deliveries": report.candidates.iter().map(|c| json!({
            "outboxId": c.outbox_id,
            "endpointId": c.endpoint_id,
            "eventId": c.event_id,
            "status": c.status,
            "queuedAt": timestamp(c.created_at),
        })).collect::<Vec<_>>(),
    })
}
