//! What became of a publisher command (activate, change plan, change seats, cancel), as the
//! ISV's product and the CLI see it: `queued` until the machine decides, `requested` while
//! Microsoft works on it (with its operation id), then `succeeded`, `failed` (with the reason:
//! refused by our policy, refused by Microsoft with its answer, Microsoft's operation failed)
//! or `unknown` (the answer was lost and nothing showed the outcome in time: an operator
//! reconciles). [`decide`] is pure; [`outcome_of`] reads the records it needs.

use serde::Serialize;
use sqlx::postgres::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::store::commands::{self, CommandRow};
use crate::store::ledger::LogOutcome;
use crate::store::text::TextValue;
use crate::store::timeline::{self, EventRow, PublisherOperationRow};
use crate::store::{StoreError, verify};
use crate::worker::protocol::CommandStatus;

/// Where a command stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    Requested,
    Succeeded,
    Failed,
    Unknown,
}

impl Status {
    /// Nothing will change it any more (but an operator's reconciliation for `Unknown`).
    pub fn is_final(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Unknown)
    }
}

/// A command's outcome, as `GET /api/v1/commands/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    pub command_id: Uuid,
    pub subscription_id: Uuid,
    pub command: String,
    pub status: Status,
    /// Microsoft's operation id, once it gave one.
    pub operation_id: Option<Uuid>,
    /// Why it failed, or what it waits for.
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub decided_at: Option<OffsetDateTime>,
}

/// The outcome from the records: the command, the machine's decision on it (its event-log
/// row), the publisher operation the worker tracks for it, the subscription's events after
/// the decision and its state now.
pub fn decide(
    command: &CommandRow,
    decision: Option<&EventRow>,
    operation: Option<&PublisherOperationRow>,
    later: &[EventRow],
    state: Option<&str>,
) -> Outcome {
    let mut outcome = Outcome {
        command_id: command.command_id,
        subscription_id: command.subscription_id,
        command: command.kind.clone(),
        status: Status::Queued,
        operation_id: operation.and_then(|op| op.operation_id),
        reason: None,
        requested_at: command.requested_at,
        decided_at: decision.map(|row| row.recorded_at),
    };
    let Some(decision) = decision else {
        return outcome;
    };
    let why = decision.reason.clone().unwrap_or_default();
    match decision.outcome {
        LogOutcome::Applied => {}
        LogOutcome::Rejected => {
            outcome.status = Status::Failed;
            outcome.reason = Some(format!("refused by our policy: {why}"));
            return outcome;
        }
        other @ (LogOutcome::Ignored | LogOutcome::Recorded) => {
            outcome.status = Status::Failed;
            outcome.reason = Some(format!("not applied ({}): {why}", other.as_str()));
            return outcome;
        }
    }
    if command.kind == "activate" {
        if let Some(failed) = later
            .iter()
            .find(|row| row.event_kind == "ActivationFailed")
        {
            outcome.status = Status::Failed;
            outcome.reason = Some(format!(
                "the activation failed at Microsoft: {}",
                failed.reason.clone().unwrap_or_default()
            ));
        } else if state == Some("Subscribed") {
            outcome.status = Status::Succeeded;
        } else {
            outcome.status = Status::Requested;
            outcome.reason = Some("waiting for Microsoft to show the subscription active".into());
        }
        return outcome;
    }
    let Some(operation) = operation else {
        // Decided, and nothing to ask Microsoft (already so), or the call not made yet.
        let nothing_to_do = decision.effects.as_array().is_some_and(|e| e.is_empty());
        outcome.status = if nothing_to_do {
            Status::Succeeded
        } else {
            Status::Requested
        };
        return outcome;
    };
    let answer = operation.last_error.clone().unwrap_or_default();
    (outcome.status, outcome.reason) = match operation.status {
        CommandStatus::Succeeded => (Status::Succeeded, None),
        CommandStatus::Refused => (
            Status::Failed,
            Some(format!("refused by Microsoft: {answer}")),
        ),
        CommandStatus::Failed | CommandStatus::Conflict => (
            Status::Failed,
            Some(format!(
                "Microsoft's operation ended {}: {answer}",
                operation.status.as_str()
            )),
        ),
        CommandStatus::Unknown => (
            Status::Unknown,
            Some(
                "Microsoft's answer was lost and its state did not show the outcome in time; \
                 run `fulfillment reconcile`"
                    .into(),
            ),
        ),
        CommandStatus::Requested | CommandStatus::Accepted => (
            Status::Requested,
            Some("waiting for Microsoft's operation to end".into()),
        ),
    };
    outcome
}

/// The outcome of `command_id`, or `None` when no such command was accepted.
pub async fn outcome_of(pool: &PgPool, command_id: Uuid) -> Result<Option<Outcome>, StoreError> {
    let Some(command) = commands::get(pool, command_id).await? else {
        return Ok(None);
    };
    let rows = timeline::events_of_message(pool, &command_id.to_string()).await?;
    let decision = rows.iter().find(|row| row.outcome != LogOutcome::Recorded);
    let operation = commands::operation(pool, command_id).await?;
    let later: Vec<EventRow> = match (decision, command.kind.as_str()) {
        (Some(decision), "activate") => timeline::events(pool, command.subscription_id)
            .await?
            .into_iter()
            .filter(|row| row.sequence > decision.sequence)
            .collect(),
        _ => Vec::new(),
    };
    let state = verify::subscription_state(pool, command.subscription_id)
        .await?
        .map(|(state, _, _)| state);
    Ok(Some(decide(
        &command,
        decision,
        operation.as_ref(),
        &later,
        state.as_deref(),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn command(kind: &str) -> CommandRow {
        CommandRow {
            command_id: Uuid::nil(),
            subscription_id: Uuid::nil(),
            kind: kind.into(),
            requested_by: "test".into(),
            requested_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    fn row(kind: &str, outcome: LogOutcome, reason: &str, effects: serde_json::Value) -> EventRow {
        EventRow {
            id: Uuid::nil(),
            sequence: 3,
            recorded_at: OffsetDateTime::UNIX_EPOCH,
            received_at: None,
            message_id: None,
            event_kind: kind.into(),
            event: json!({}),
            from_state: "Subscribed".into(),
            to_state: "Subscribed".into(),
            outcome,
            reason: Some(reason.into()),
            effects,
            correlation_id: None,
            request_id: None,
            execution: None,
        }
    }

    fn operation(status: CommandStatus, error: Option<&str>) -> PublisherOperationRow {
        PublisherOperationRow {
            command_id: Uuid::nil(),
            kind: "ChangeQuantity".into(),
            target_plan_id: None,
            target_quantity: Some(9),
            operation_id: Some(Uuid::from_u128(7)),
            status,
            last_error: error.map(Into::into),
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn each_record_gives_its_status() {
        let change = command("change_quantity");
        let applied = row(
            "PublisherChangeQuantity",
            LogOutcome::Applied,
            "",
            json!(["patch_subscription"]),
        );
        let cases: Vec<(
            Option<&EventRow>,
            Option<PublisherOperationRow>,
            Status,
            &str,
        )> = vec![
            (None, None, Status::Queued, ""),
            (Some(&applied), None, Status::Requested, ""),
            (
                Some(&applied),
                Some(operation(CommandStatus::Accepted, None)),
                Status::Requested,
                "waiting",
            ),
            (
                Some(&applied),
                Some(operation(CommandStatus::Succeeded, None)),
                Status::Succeeded,
                "",
            ),
            (
                Some(&applied),
                Some(operation(
                    CommandStatus::Refused,
                    Some("400 seats above the plan"),
                )),
                Status::Failed,
                "refused by Microsoft: 400 seats above the plan",
            ),
            (
                Some(&applied),
                Some(operation(CommandStatus::Failed, Some("x"))),
                Status::Failed,
                "ended Failed",
            ),
            (
                Some(&applied),
                Some(operation(CommandStatus::Unknown, None)),
                Status::Unknown,
                "reconcile",
            ),
        ];
        for (decision, op, status, reason) in cases {
            let outcome = decide(&change, decision, op.as_ref(), &[], Some("Subscribed"));
            assert_eq!(outcome.status, status, "{op:?}");
            assert!(
                outcome.reason.clone().unwrap_or_default().contains(reason),
                "{outcome:?}"
            );
        }
    }

    #[test]
    fn a_policy_refusal_fails_at_once_and_a_change_with_nothing_to_do_succeeds() {
        let refused = row(
            "PublisherChangeQuantity",
            LogOutcome::Rejected,
            "seats 500 above the policy's 100",
            json!([]),
        );
        let outcome = decide(&command("change_quantity"), Some(&refused), None, &[], None);
        assert_eq!(outcome.status, Status::Failed);
        assert_eq!(
            outcome.reason.as_deref(),
            Some("refused by our policy: seats 500 above the policy's 100")
        );
        let noop = row(
            "PublisherChangePlan",
            LogOutcome::Applied,
            "already on it",
            json!([]),
        );
        let outcome = decide(&command("change_plan"), Some(&noop), None, &[], None);
        assert_eq!(outcome.status, Status::Succeeded);
    }

    #[test]
    fn an_activation_succeeds_when_active_and_fails_when_microsoft_says_so() {
        let applied = row(
            "ActivationRequested",
            LogOutcome::Applied,
            "",
            json!(["activate"]),
        );
        let activate = command("activate");
        let pending = decide(
            &activate,
            Some(&applied),
            None,
            &[],
            Some("PendingFulfillment"),
        );
        assert_eq!(pending.status, Status::Requested);
        let done = decide(&activate, Some(&applied), None, &[], Some("Subscribed"));
        assert_eq!(done.status, Status::Succeeded);
        let failed = row(
            "ActivationFailed",
            LogOutcome::Applied,
            "400 from Activate",
            json!([]),
        );
        let outcome = decide(
            &activate,
            Some(&applied),
            None,
            &[failed],
            Some("PendingFulfillment"),
        );
        assert_eq!(outcome.status, Status::Failed);
    }
}
