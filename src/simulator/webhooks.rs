//! The webhook sender (§6): one background task per notification POSTs the §6.2 payload with
//! a fresh Entra bearer token, redelivers on any non-2xx or connection error every
//! `webhook_retry_interval` up to `webhook_max_attempts`, and reads a 4xx answer to a
//! customer-initiated ChangePlan/ChangeQuantity as a rejection (§6.3). Every attempt lands in
//! the subscription's delivery log, and every payload with it.

use std::sync::Arc;
use std::time::Duration;

use rand::RngExt;
use serde_json::{Value, json};
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use super::lifecycle;
use super::state::{
    Attempt, Delivery, DeliveryOutcome, Operation, Shared, State, Subscription, wire_name,
    wire_time,
};

/// Microsoft expects an answer within 10 s (§6.1).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Actions Microsoft has sent or may send without documenting them (§3.4, §6.4).
const UNKNOWN_ACTIONS: &[&str] = &["Transfer", "ChangeBillingFrequency", "Migrate"];

/// The §6.2 payload: the operation envelope plus a snapshot of the subscription as it is now
/// (for ChangePlan/ChangeQuantity, still the old plan/quantity).
pub(crate) fn payload(
    subscription: &Subscription,
    operation: &Operation,
    publisher_id: &str,
) -> Value {
    json!({
        "id": operation.id,
        "activityId": operation.activity_id,
        "publisherId": publisher_id,
        "offerId": subscription.offer_id,
        "planId": operation.plan_id,
        "quantity": operation.quantity,
        "subscriptionId": subscription.id,
        "timeStamp": wire_time(operation.created),
        "action": wire_name(&operation.action),
        "status": wire_name(&operation.status),
        "operationRequestSource": wire_name(&operation.source),
        "subscription": subscription.to_wire(publisher_id),
        "purchaseToken": null,
    })
}

/// Queues the webhook for `operation_id` of `subscription_id` (both must exist in `st`),
/// with the duplicate/reorder/unknown-action faults applied.
pub(crate) fn notify(
    shared: &Arc<Shared>,
    st: &mut State,
    subscription_id: Uuid,
    operation_id: Uuid,
) {
    let Some(url) = shared.config.webhook_url.clone() else {
        tracing::debug!(subscription_id = %subscription_id, "no webhook URL configured; notification dropped");
        return;
    };
    let faults = st.faults.clone();
    let Some(subscription) = st.subscriptions.get_mut(&subscription_id) else {
        return;
    };
    let Some(operation) = subscription.operation(operation_id) else {
        return;
    };
    let body = payload(subscription, operation, &shared.config.publisher_id);
    let action = wire_name(&operation.action);
    // Only a customer-side change can be refused by answering 4xx (§6.3).
    let rejectable = lifecycle::is_ackable_change(operation);

    let mut jobs = vec![(body.clone(), action.clone(), false, false)];
    if shared.roll(faults.duplicate_deliveries) {
        jobs.push((body.clone(), action.clone(), true, false));
    }
    if shared.roll(faults.unknown_actions) {
        let name = {
            let mut rng = shared.rng();
            UNKNOWN_ACTIONS[rng.random_range(0..UNKNOWN_ACTIONS.len())]
        };
        let mut odd = body;
        odd["id"] = json!(Uuid::new_v4());
        odd["action"] = json!(name);
        odd["status"] = json!("Succeeded");
        jobs.push((odd, name.to_string(), false, true));
    }

    for (body, action, duplicate, injected) in jobs {
        let delivery = Delivery {
            id: Uuid::new_v4(),
            operation_id: body["id"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .unwrap_or(operation_id),
            action,
            attempts: Vec::new(),
            outcome: DeliveryOutcome::Pending,
            duplicate,
            injected,
            payload: body.clone(),
        };
        let delay = shared.config.timings.webhook_delay + shared.jitter(faults.reorder.window());
        let job = Job {
            url: url.clone(),
            subscription_id,
            operation_id,
            delivery_id: delivery.id,
            body,
            rejectable: rejectable && !injected,
            lost: faults.lose_webhooks,
        };
        subscription.deliveries.push(delivery);
        let shared_for_task = Arc::clone(shared);
        shared.tasks.spawn(async move {
            if shared_for_task.sleep(delay).await {
                deliver(&shared_for_task, job).await;
            }
        });
    }
}

struct Job {
    url: Url,
    subscription_id: Uuid,
    operation_id: Uuid,
    delivery_id: Uuid,
    body: Value,
    rejectable: bool,
    /// The `loseWebhooks` fault: answered 200 on the way, never sent.
    lost: bool,
}

async fn deliver(shared: &Arc<Shared>, job: Job) {
    let timings = &shared.config.timings;
    let max_attempts = timings.webhook_max_attempts.max(1);
    for attempt in 1..=max_attempts {
        let sent = match shared.sender_webhook_token() {
            Ok(_) if job.lost => Ok(200),
            Ok(token) => shared
                .http
                .post(job.url.clone())
                .bearer_auth(token)
                .json(&job.body)
                .timeout(ATTEMPT_TIMEOUT)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .map_err(|e| error_chain(&e)),
            Err(e) => Err(format!("cannot sign the webhook token: {e:#}")),
        };
        match &sent {
            Ok(status) => tracing::info!(
                subscription_id = %job.subscription_id, operation_id = %job.operation_id,
                attempt, status, "webhook delivery attempt"
            ),
            Err(error) => tracing::warn!(
                subscription_id = %job.subscription_id, operation_id = %job.operation_id,
                attempt, error = %error, "webhook delivery attempt failed"
            ),
        }
        let outcome = shared.mutate(|st| {
            let outcome = match sent {
                Ok(status) if (200..300).contains(&status) => DeliveryOutcome::Delivered,
                Ok(status) if (400..500).contains(&status) && job.rejectable => {
                    lifecycle::reject_by_webhook(st, job.subscription_id, job.operation_id, status);
                    DeliveryOutcome::Rejected
                }
                _ if attempt == max_attempts => DeliveryOutcome::Exhausted,
                _ => DeliveryOutcome::Pending,
            };
            if let Some(delivery) = st
                .subscriptions
                .get_mut(&job.subscription_id)
                .and_then(|s| s.deliveries.iter_mut().find(|d| d.id == job.delivery_id))
            {
                let (status_code, error) = match &sent {
                    Ok(status) => (Some(*status), None),
                    Err(error) => (None, Some(error.clone())),
                };
                delivery.attempts.push(Attempt {
                    at: OffsetDateTime::now_utc(),
                    status_code,
                    error,
                });
                delivery.outcome = outcome;
            }
            outcome
        });
        if outcome != DeliveryOutcome::Pending
            || !shared.sleep(timings.webhook_retry_interval).await
        {
            return;
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
