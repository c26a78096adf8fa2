//! The subscription lifecycle as a statig hierarchical state machine (sync mode), and
//! `SubscriptionMachine`, the wrapper the worker loads, feeds and stores.
//!
//! Pure: events, `now` and the policy go in through the external context; a `Decision`
//! with effects comes out (style principle 1). Effects are pushed only by handlers, never
//! by entry/exit actions: statig re-runs entry actions when a stored machine is restored,
//! and a restore must not re-emit anything.
//!
//! Hierarchy: `subscribed` and `suspended` share the `live` superstate (Unsubscribe,
//! reconciliation, publisher-operation bookkeeping, Cancel). `pending_fulfillment` and
//! the terminal `unsubscribed` stand alone.

use serde::{Deserialize, Serialize};
use statig::blocking::{InitializedStateMachine, StateOrSuperstate, UninitializedStateMachine};
use statig::prelude::*;
use time::OffsetDateTime;

use crate::decision::{Decision, IgnoreReason, Outcome as Decided};
use crate::details::{Details, MarketplaceStatus, Snapshot, StateName};
use crate::effect::{AckStatus, DomainEvent, DomainEventKind, Effect};
use crate::event::{Command, Event, OperationStatus, RequestSource, Webhook, WebhookAction};
use crate::ids::{CommandId, OperationId, PlanId, Quantity, SubscriptionId};
use crate::policy::{ActivationMode, Policy, Verdict};
use crate::seen::SeenKeys;

/// Where activation stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ActivationProgress {
    /// Nobody asked to activate yet.
    NotRequested,
    /// An `Activate` effect was emitted; waiting for confirmation (P4: async).
    Requested,
    /// Activation failed; a new `ActivationRequested` (or landing-page visit) retries.
    Failed {
        /// Why.
        reason: String,
    },
    /// Microsoft reports the subscription active.
    Confirmed,
}

/// A publisher-initiated PATCH/DELETE in flight. Only one at a time: Microsoft locks the
/// subscription while an operation is pending (P11).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingOperation {
    /// Our command.
    pub command_id: CommandId,
    /// What we asked for.
    pub command: Command,
    /// When we asked (lets the worker time out stuck operations).
    #[serde(with = "time::serde::rfc3339")]
    pub requested_at: OffsetDateTime,
    /// Set once Microsoft answered 202.
    pub operation_id: Option<OperationId>,
    /// Operation-Location, set with `operation_id`.
    pub location: Option<String>,
    /// The target is already reflected locally (Partner webhook or an observation got there
    /// first), so success must not announce it again.
    pub applied: bool,
}

/// How long an acknowledged change may wait for Microsoft's confirmation before GETs are
/// believed again (the confirmation normally comes within seconds; this bounds a lost one).
pub const UNCONFIRMED_TTL: time::Duration = time::Duration::hours(1);

/// A change we acknowledged that Microsoft may not show yet: it applies a customer change
/// or a reinstatement only after our ACK (§7.3), so until the operation is final a GET can
/// still show the old plan, seats or status (P13). Observations must not undo it meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unconfirmed {
    /// The acknowledged operation.
    pub operation_id: OperationId,
    /// What it changes.
    pub change: UnconfirmedChange,
    /// When we acknowledged it.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Microsoft reported the operation `Succeeded` and no GET confirms it (a seat change:
    /// its success says the outcome). The entry still holds against GETs made before the
    /// operation ended — one already in flight can be applied after the result — until
    /// one shows the change, a later change supersedes it, or [`UNCONFIRMED_TTL`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub succeeded: bool,
}

/// What an acknowledged operation changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum UnconfirmedChange {
    /// A customer plan change we accepted.
    Plan {
        /// The new plan.
        plan_id: PlanId,
    },
    /// A customer seat change we accepted.
    Quantity {
        /// The new seats.
        quantity: Quantity,
    },
    /// A reinstatement we applied.
    Reinstatement,
}

/// Shared storage of the statig machine: what survives every state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Ledger {
    subscription_id: SubscriptionId,
    /// Newest webhook `timeStamp` applied, per aspect of the subscription (P10 ordering).
    #[serde(default)]
    newest_webhooks: Watermarks,
    /// Newest Resolve/GET observation applied.
    #[serde(default, with = "time::serde::rfc3339::option")]
    newest_observation_at: Option<OffsetDateTime>,
    /// Ring of handled event keys, oldest first, as fingerprints (P9).
    #[serde(default)]
    seen: SeenKeys,
    /// Changes we acknowledged that Microsoft has not confirmed yet (P13).
    #[serde(default)]
    unconfirmed: Vec<Unconfirmed>,
}

/// The newest webhook `timeStamp` applied for each aspect of a subscription. A webhook is
/// stale only against a newer one about the same thing: Microsoft runs one operation at a
/// time per subscription, so an older plan or seat change behind a newer one is already
/// final, but a Renew or a Suspend says nothing about a seat change the customer made
/// before it — ignoring that one would leave it unacknowledged, and Microsoft would apply
/// it 10 s later without us (P7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Watermarks {
    /// Subscribe, Suspend, Reinstate, Unsubscribe.
    #[serde(default, with = "time::serde::rfc3339::option")]
    status: Option<OffsetDateTime>,
    /// ChangePlan, ChangeQuantity (a plan change can change the seats).
    #[serde(default, with = "time::serde::rfc3339::option")]
    plan_and_seats: Option<OffsetDateTime>,
    /// Renew.
    #[serde(default, with = "time::serde::rfc3339::option")]
    term: Option<OffsetDateTime>,
}

impl Watermarks {
    /// The watermark of the aspect `action` is about; none for unknown actions.
    fn of(&mut self, action: &WebhookAction) -> Option<&mut Option<OffsetDateTime>> {
        match action {
            WebhookAction::Subscribe
            | WebhookAction::Suspend
            | WebhookAction::Reinstate
            | WebhookAction::Unsubscribe => Some(&mut self.status),
            WebhookAction::ChangePlan | WebhookAction::ChangeQuantity => {
                Some(&mut self.plan_and_seats)
            }
            WebhookAction::Renew => Some(&mut self.term),
            WebhookAction::Unknown(_) => None,
        }
    }

    fn newest(&self, action: &WebhookAction) -> Option<OffsetDateTime> {
        match action {
            WebhookAction::Subscribe
            | WebhookAction::Suspend
            | WebhookAction::Reinstate
            | WebhookAction::Unsubscribe => self.status,
            WebhookAction::ChangePlan | WebhookAction::ChangeQuantity => self.plan_and_seats,
            WebhookAction::Renew => self.term,
            WebhookAction::Unknown(_) => None,
        }
    }
}

/// External context: inputs of one `handle` call and what it produced.
#[derive(Debug)]
pub(crate) struct Ctx<'p> {
    now: OffsetDateTime,
    policy: &'p Policy,
    from: StateName,
    /// The event is the result of an operation whose webhook we handled (and ACKed).
    known_operation: bool,
    /// The ledger's unconfirmed changes, as handlers leave them (kept unless ignored).
    unconfirmed: Vec<Unconfirmed>,
    effects: Vec<Effect>,
    outcome: Option<Decided>,
}

impl<'p> Ctx<'p> {
    fn new(now: OffsetDateTime, policy: &'p Policy, from: StateName) -> Self {
        Ctx {
            now,
            policy,
            from,
            known_operation: false,
            unconfirmed: Vec::new(),
            effects: Vec::new(),
            outcome: None,
        }
    }

    fn push(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    /// Observations must not undo `change` until Microsoft confirms `operation_id`.
    fn await_confirmation(&mut self, operation_id: OperationId, change: UnconfirmedChange) {
        if !matches!(change, UnconfirmedChange::Reinstatement) {
            self.drop_succeeded();
        }
        self.unconfirmed.retain(|u| u.operation_id != operation_id);
        self.unconfirmed.push(Unconfirmed {
            operation_id,
            change,
            since: self.now,
            succeeded: false,
        });
    }

    /// Forgets the succeeded seat changes still held against older GETs: a later plan or
    /// seat change supersedes them (the GET it brings, or the entry it holds, speaks now; a
    /// plan change may drop the seats).
    fn drop_succeeded(&mut self) {
        self.unconfirmed.retain(|u| !u.succeeded);
    }

    fn publish(&mut self, kind: DomainEventKind, details: &Details, state: StateName) {
        self.publish_because(kind, details, state, None);
    }

    fn publish_because(
        &mut self,
        kind: DomainEventKind,
        details: &Details,
        state: StateName,
        reason: Option<String>,
    ) {
        self.push(Effect::PublishDomainEvent(DomainEvent {
            kind,
            plan_id: details.plan_id.clone(),
            quantity: details.quantity,
            state,
            reason,
        }));
    }

    fn applied(&mut self, reason: impl Into<String>) {
        self.outcome = Some(Decided::Applied {
            reason: reason.into(),
        });
    }

    fn rejected(&mut self, reason: impl Into<String>) {
        self.outcome = Some(Decided::Rejected {
            reason: reason.into(),
        });
    }

    /// Ignoring must leave no trace but the seen key: drop anything pushed so far.
    fn ignore(&mut self, reason: IgnoreReason) -> Outcome<State> {
        self.effects.clear();
        self.outcome = Some(Decided::Ignored { reason });
        Handled
    }

    fn not_applicable(&mut self, why: impl Into<String>) -> Outcome<State> {
        self.ignore(IgnoreReason::NotApplicable(why.into()))
    }

    /// P9: log-and-200 for unknown actions; a failure would trigger 500 retries.
    fn unknown_action(&mut self, action: &str) -> Outcome<State> {
        self.not_applicable(format!("unknown action {action}"))
    }

    /// A publisher command we refuse without calling Microsoft; the ISV still hears why.
    fn reject_command(&mut self, details: &Details, reason: String) -> Outcome<State> {
        let state = self.from;
        self.publish_because(
            DomainEventKind::ChangeRejected,
            details,
            state,
            Some(reason.clone()),
        );
        self.rejected(reason);
        Handled
    }
}

#[state_machine(
    initial = "State::pending_fulfillment(Details::default(), ActivationProgress::NotRequested)",
    state(derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)),
    superstate(derive(Debug)),
    after_dispatch = "Self::remember",
    visibility = "pub(crate)"
)]
impl Ledger {
    /// `PendingFulfillmentStart`: purchased, not yet active.
    ///
    /// - `PurchaseResolved`/`Observed` with a pending status: record details; the first
    ///   sighting publishes `Purchased`; a landing-page resolve under `Automatic` policy
    ///   emits `Activate` unless activation is already requested (P5). Otherwise stay.
    /// - `PurchaseResolved`/`Observed` with `Subscribed` → **Subscribed** (auto-activation
    ///   or "Manage account", P5: no second `Activate`); `Suspended` → **Suspended**;
    ///   `Unsubscribed` → **Unsubscribed**.
    /// - `ActivationRequested` → `Activate` (stay). `ActivationFailed` → stay, `Failed`.
    /// - `ActivationConfirmed` → **Subscribed**.
    /// - Webhook `Subscribe` (auto-activation, §5.6) → **Subscribed** + `FetchSubscription`.
    /// - Webhook `Unsubscribe` (cancelled before activation, or a purchase we never saw,
    ///   P12) → **Unsubscribed**; while our activation is pending it is also
    ///   `ActivationFailed` (§15.4: a failed activation ends in an Unsubscribe).
    /// - Webhook `ChangePlan`/`ChangeQuantity` from the customer for a resolved purchase →
    ///   **Subscribed** (`Activated`) and the change decided as there: Microsoft allows
    ///   changes only once it has the subscription Subscribed, and the ACK window runs.
    /// - Webhook `Suspend`/`Reinstate` for a resolved purchase → **Suspended** /
    ///   **Subscribed** (`Activated` first; the Reinstate ACKed best-effort): likewise news
    ///   of an activation our check had not seen yet.
    /// - Publisher commands → rejected: only Subscribed can be changed (§5.2 rules).
    #[state]
    fn pending_fulfillment(
        details: &mut Details,
        activation: &mut ActivationProgress,
        context: &mut Ctx<'_>,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::PurchaseResolved { snapshot, .. } => {
                converge_pending(details, activation, snapshot, true, context)
            }
            Event::Observed { snapshot, .. } => {
                converge_pending(details, activation, snapshot, false, context)
            }
            Event::ActivationRequested { .. } => {
                if !details.is_known() {
                    return context
                        .not_applicable("purchase not resolved yet; nothing to activate");
                }
                if matches!(
                    activation,
                    ActivationProgress::Requested | ActivationProgress::Confirmed
                ) {
                    return context.not_applicable("activation already requested");
                }
                *activation = ActivationProgress::Requested;
                context.push(activate(details));
                context.applied("activation requested");
                Handled
            }
            Event::ActivationConfirmed { term, .. } => {
                let mut details = details.clone();
                if term.is_some() {
                    details.term = term.clone();
                }
                context.publish(DomainEventKind::Activated, &details, StateName::Subscribed);
                context.applied("activation confirmed");
                Transition(State::subscribed(details, None))
            }
            Event::ActivationFailed { reason, .. } => {
                *activation = ActivationProgress::Failed {
                    reason: reason.clone(),
                };
                context.publish_because(
                    DomainEventKind::ActivationFailed,
                    details,
                    StateName::PendingFulfillment,
                    Some(reason.clone()),
                );
                context.applied(format!("activation failed: {reason}"));
                Handled
            }
            Event::Webhook(webhook) => match &webhook.action {
                WebhookAction::Subscribe => {
                    let details = with_webhook(details, webhook);
                    context.push(Effect::FetchSubscription);
                    context.publish(DomainEventKind::Activated, &details, StateName::Subscribed);
                    context.applied("activated by Microsoft at checkout (auto-activation)");
                    Transition(State::subscribed(details, None))
                }
                WebhookAction::Unsubscribe if *activation == ActivationProgress::Requested => {
                    // §15.4, P4: Activate is asynchronous and a failed activation ends in
                    // an Unsubscribe; the ISV hears why before it hears the end.
                    let details = with_webhook(details, webhook);
                    let reason = "activation failed at Microsoft: Unsubscribe while our \
                                  activation was pending"
                        .to_owned();
                    context.publish_because(
                        DomainEventKind::ActivationFailed,
                        &details,
                        StateName::Unsubscribed,
                        Some(reason.clone()),
                    );
                    context.publish(
                        DomainEventKind::Unsubscribed,
                        &details,
                        StateName::Unsubscribed,
                    );
                    context.applied(reason.clone());
                    Transition(State::unsubscribed(
                        details,
                        ActivationProgress::Failed { reason },
                    ))
                }
                WebhookAction::Unsubscribe => {
                    let details = with_webhook(details, webhook);
                    context.publish(
                        DomainEventKind::Unsubscribed,
                        &details,
                        StateName::Unsubscribed,
                    );
                    context.applied("cancelled before activation");
                    Transition(State::unsubscribed(details, activation.clone()))
                }
                WebhookAction::ChangePlan | WebhookAction::ChangeQuantity if details.is_known() => {
                    customer_change_implies_activation(details, webhook, context)
                }
                // Microsoft suspends and reinstates only what it holds as Subscribed: as for
                // a customer's change, the activation took effect before our check saw it.
                WebhookAction::Suspend if details.is_known() => {
                    context.push(Effect::FetchSubscription);
                    context.publish(DomainEventKind::Activated, details, StateName::Subscribed);
                    context.publish(DomainEventKind::Suspended, details, StateName::Suspended);
                    context.applied(
                        "activation implied: Microsoft suspends only a Subscribed subscription; \
                         suspended by Microsoft (payment failed)",
                    );
                    Transition(State::suspended(details.clone(), None))
                }
                WebhookAction::Reinstate if details.is_known() => {
                    acknowledge_reinstatement(context, webhook);
                    context.publish(DomainEventKind::Activated, details, StateName::Subscribed);
                    context.applied(
                        "activation implied: Microsoft reinstates only a subscription it \
                         activated; reinstatement acknowledged",
                    );
                    Transition(State::subscribed(details.clone(), None))
                }
                WebhookAction::Unknown(action) => context.unknown_action(action),
                other => context.not_applicable(format!(
                    "{other} does not apply to a subscription pending fulfillment"
                )),
            },
            Event::PublisherCommand { .. } => context.reject_command(
                details,
                "only a Subscribed subscription can be changed".to_owned(),
            ),
            Event::PublisherOperationAccepted { .. }
            | Event::PublisherOperationRefused { .. }
            | Event::PublisherOperationConcluded { .. }
            | Event::OperationResult { .. } => {
                context.not_applicable("no publisher operation is pending")
            }
        }
    }

    /// `Subscribed`: active.
    ///
    /// - Webhook `ChangePlan`/`ChangeQuantity` from `Azure`: same target as now → accept the
    ///   revert (P8, ACK `Success`); policy accepts → apply, ACK `Success`; policy rejects →
    ///   ACK `Failure` (within 10 s, P7). Every ACK also confirms its operation's end
    ///   (`AckOperation` follows it to `OperationResult`, whose result brings a GET, P13,
    ///   except the success of a seat change we accepted: it says the whole outcome).
    ///   No target in a minimal payload → `FetchSubscription`.
    /// - The same from `Partner` (our own PATCH): apply without ACK (P18); keep the pending
    ///   operation until its result so success is not announced twice.
    /// - Webhook `Renew` → stay, term from the snapshot. `Suspend` → **Suspended**.
    ///   `Subscribe`/`Reinstate` → no change.
    /// - Publisher `ChangePlan`/`ChangeQuantity` → `RequestPlanChange`/`RequestQuantityChange`
    ///   unless `allowedCustomerOperations` lacks `Update` (a CSP purchase: Microsoft would
    ///   answer 400, §10.2), an operation is pending (P11), the value is unchanged, or
    ///   policy refuses.
    /// - Everything else → `live`.
    #[state(superstate = "live")]
    fn subscribed(
        details: &mut Details,
        pending: &mut Option<PendingOperation>,
        context: &mut Ctx<'_>,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::Webhook(webhook) => match &webhook.action {
                WebhookAction::ChangePlan | WebhookAction::ChangeQuantity => {
                    change_webhook(details, pending, webhook, context)
                }
                WebhookAction::Renew => {
                    if let Some(term) = webhook.subscription.as_ref().and_then(|s| s.term.clone()) {
                        details.term = Some(term);
                    }
                    context.push(Effect::FetchSubscription);
                    context.publish(DomainEventKind::Renewed, details, StateName::Subscribed);
                    context.applied("term renewed");
                    Handled
                }
                WebhookAction::Suspend => {
                    context.push(Effect::FetchSubscription);
                    context.publish(DomainEventKind::Suspended, details, StateName::Suspended);
                    context.applied("suspended by Microsoft (payment failed)");
                    Transition(State::suspended(details.clone(), pending.clone()))
                }
                WebhookAction::Subscribe => context.ignore(IgnoreReason::NoChange),
                WebhookAction::Reinstate => {
                    // Already Subscribed here: the Reinstate overtook its Suspend (P10).
                    // Microsoft still holds the operation open until we answer or its window
                    // ends, and a GET meanwhile says Suspended; answering it, and keeping
                    // Subscribed against lagging GETs until it is confirmed, ends that.
                    acknowledge_reinstatement(context, webhook);
                    context.applied(
                        "reinstatement acknowledged; already Subscribed here (it overtook its Suspend)",
                    );
                    Handled
                }
                WebhookAction::Unsubscribe | WebhookAction::Unknown(_) => Super,
            },
            Event::PublisherCommand {
                command_id,
                command,
            } => match command {
                Command::ChangePlan { plan_id } => {
                    if let Some(reason) = details.forbids("Update") {
                        return context.reject_command(details, reason);
                    }
                    if let Some(reason) = pending_lock(pending) {
                        return context.reject_command(details, reason);
                    }
                    if details.plan_id.as_ref() == Some(plan_id) {
                        return context
                            .reject_command(details, format!("already on plan {plan_id}"));
                    }
                    if let Verdict::Reject { reason } = context
                        .policy
                        .decide_plan_change(details.plan_id.as_ref(), plan_id)
                    {
                        return context.reject_command(details, reason);
                    }
                    *pending = Some(PendingOperation::new(
                        *command_id,
                        command.clone(),
                        context.now,
                    ));
                    context.push(Effect::RequestPlanChange {
                        command_id: *command_id,
                        plan_id: plan_id.clone(),
                    });
                    context.applied(format!("plan change to {plan_id} requested"));
                    Handled
                }
                Command::ChangeQuantity { quantity } => {
                    if let Some(reason) = details.forbids("Update") {
                        return context.reject_command(details, reason);
                    }
                    if let Some(reason) = pending_lock(pending) {
                        return context.reject_command(details, reason);
                    }
                    if details.quantity == Some(*quantity) {
                        return context
                            .reject_command(details, format!("already at {quantity} seats"));
                    }
                    if let Verdict::Reject { reason } = context
                        .policy
                        .decide_quantity_change(details.quantity, *quantity)
                    {
                        return context.reject_command(details, reason);
                    }
                    *pending = Some(PendingOperation::new(
                        *command_id,
                        command.clone(),
                        context.now,
                    ));
                    context.push(Effect::RequestQuantityChange {
                        command_id: *command_id,
                        quantity: *quantity,
                    });
                    context.applied(format!("quantity change to {quantity} requested"));
                    Handled
                }
                Command::Cancel => Super,
            },
            _ => Super,
        }
    }

    /// `Suspended`: payment failed, 30-day grace; keep data restorable (P25).
    ///
    /// - Webhook `Reinstate` → **Subscribed**, ACK `Success` best-effort (§6.3 client policy),
    ///   which also confirms the operation's end.
    /// - Webhook `Suspend` → no change. `ChangePlan`/`ChangeQuantity`/`Renew`/`Subscribe` →
    ///   not applicable (only Subscribed can be updated or renewed, §5.2 rules).
    /// - Publisher `ChangePlan`/`ChangeQuantity` → rejected; `Cancel` is allowed (→ `live`).
    /// - Everything else → `live`.
    #[state(superstate = "live")]
    fn suspended(
        details: &mut Details,
        pending: &mut Option<PendingOperation>,
        context: &mut Ctx<'_>,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::Webhook(webhook) => match &webhook.action {
                WebhookAction::Reinstate => {
                    acknowledge_reinstatement(context, webhook);
                    context.publish(DomainEventKind::Reinstated, details, StateName::Subscribed);
                    context.applied("reinstated by Microsoft (payment fixed)");
                    Transition(State::subscribed(details.clone(), pending.clone()))
                }
                WebhookAction::Suspend => context.ignore(IgnoreReason::NoChange),
                WebhookAction::ChangePlan
                | WebhookAction::ChangeQuantity
                | WebhookAction::Renew
                | WebhookAction::Subscribe => context.not_applicable(format!(
                    "{} does not apply to a Suspended subscription",
                    webhook.action
                )),
                WebhookAction::Unsubscribe | WebhookAction::Unknown(_) => Super,
            },
            Event::PublisherCommand {
                command: Command::ChangePlan { .. } | Command::ChangeQuantity { .. },
                ..
            } => context.reject_command(
                details,
                "only a Subscribed subscription can be changed".to_owned(),
            ),
            _ => Super,
        }
    }

    /// Reactions shared by `Subscribed` and `Suspended`.
    ///
    /// - Webhook `Unsubscribe` (customer/CSP cancel, grace over, our DELETE) → **Unsubscribed**
    ///   + `FetchSubscription` (the ended subscription's final plan, seats and term).
    /// - Unknown webhook action → recorded, not applicable (P9).
    /// - `Observed`/`PurchaseResolved` → converge plan, quantity, term and status
    ///   (`Subscribed` ↔ **Suspended**, → **Unsubscribed**) without undoing a pending
    ///   publisher operation already applied, nor a change we acknowledged that Microsoft
    ///   has not confirmed yet (P13: the GET may predate it).
    /// - Publisher `Cancel` → `RequestCancel` unless `allowedCustomerOperations` lacks
    ///   `Delete` (§10.2) or an operation is pending (P11).
    /// - `PublisherOperationAccepted` → `PollOperation`; `PublisherOperationRefused` and a
    ///   failed `OperationResult` → clear the pending operation, rejected.
    /// - `OperationResult` `Succeeded` → apply the change (once) and `FetchSubscription`
    ///   (§7.2), or **Unsubscribed** for Cancel; `PublisherOperationConcluded` (our 202 was
    ///   lost, GET showed how it ended, §15.2) the same. The result of a customer operation we
    ///   ACKed (its webhook was handled) → `FetchSubscription`: now a GET shows its outcome;
    ///   not after the success of a seat change we accepted, which says it all.
    #[superstate]
    fn live(
        details: &mut Details,
        pending: &mut Option<PendingOperation>,
        context: &mut Ctx<'_>,
        event: &Event,
    ) -> Outcome<State> {
        match event {
            Event::Webhook(webhook) => match &webhook.action {
                WebhookAction::Unsubscribe => {
                    // The final details (a change Microsoft completed without our ACK, a
                    // renewal) are read once the subscription has ended.
                    context.push(Effect::FetchSubscription);
                    context.publish(
                        DomainEventKind::Unsubscribed,
                        details,
                        StateName::Unsubscribed,
                    );
                    context.applied("unsubscribed by Microsoft");
                    Transition(State::unsubscribed(
                        details.clone(),
                        ActivationProgress::Confirmed,
                    ))
                }
                WebhookAction::Unknown(action) => context.unknown_action(action),
                other => {
                    let from = context.from;
                    context
                        .not_applicable(format!("{other} does not apply to a {from} subscription"))
                }
            },
            Event::PurchaseResolved { snapshot, .. } | Event::Observed { snapshot, .. } => {
                converge_live(details, pending, snapshot, context)
            }
            Event::PublisherCommand {
                command_id,
                command: Command::Cancel,
            } => {
                if let Some(reason) = details.forbids("Delete") {
                    return context.reject_command(details, reason);
                }
                if let Some(reason) = pending_lock(pending) {
                    return context.reject_command(details, reason);
                }
                *pending = Some(PendingOperation::new(
                    *command_id,
                    Command::Cancel,
                    context.now,
                ));
                context.push(Effect::RequestCancel {
                    command_id: *command_id,
                });
                context.applied("cancellation requested");
                Handled
            }
            Event::PublisherCommand { .. } => context.reject_command(
                details,
                "only a Subscribed subscription can be changed".to_owned(),
            ),
            Event::PublisherOperationAccepted {
                command_id,
                operation_id,
                location,
                retry_after_ms,
            } => match pending {
                Some(op) if op.command_id == *command_id && op.operation_id.is_none() => {
                    op.operation_id = Some(*operation_id);
                    op.location = Some(location.clone());
                    context.push(Effect::PollOperation {
                        command_id: *command_id,
                        operation_id: *operation_id,
                        location: location.clone(),
                        retry_after_ms: *retry_after_ms,
                    });
                    context.applied(format!("operation {operation_id} accepted by Microsoft"));
                    Handled
                }
                _ => context
                    .not_applicable(format!("command {command_id} is not awaiting an answer")),
            },
            Event::PublisherOperationRefused { command_id, reason } => match pending {
                Some(op) if op.command_id == *command_id && op.operation_id.is_none() => {
                    *pending = None;
                    let state = context.from;
                    context.publish_because(
                        DomainEventKind::PublisherOperationFailed,
                        details,
                        state,
                        Some(reason.clone()),
                    );
                    context.rejected(format!("Microsoft refused command {command_id}: {reason}"));
                    Handled
                }
                _ => context
                    .not_applicable(format!("command {command_id} is not awaiting an answer")),
            },
            Event::PublisherOperationConcluded {
                command_id,
                status,
                reason,
            } => match pending.take() {
                Some(op) if op.command_id == *command_id => {
                    let what = format!("command {command_id} ({reason})");
                    conclude(details, op, &what, *status, context)
                }
                other => {
                    *pending = other;
                    context
                        .not_applicable(format!("command {command_id} is not awaiting an answer"))
                }
            },
            Event::OperationResult {
                operation_id,
                status,
            } => operation_result(details, pending, *operation_id, *status, context),
            Event::ActivationRequested { .. } | Event::ActivationFailed { .. } => {
                context.not_applicable("the subscription is already activated")
            }
            Event::ActivationConfirmed { .. } => context.ignore(IgnoreReason::NoChange),
        }
    }

    /// `Unsubscribed`: terminal. Nothing resurrects it (P10), and a new purchase gets a new
    /// subscription id (§5.2 rules). The record of what ended (plan, seats, term) still
    /// follows Microsoft, because events interleave (P10: a change's webhook can arrive
    /// after the Unsubscribe, its operation completed or auto-accepted meanwhile):
    ///
    /// - `Observed`/`PurchaseResolved` showing `Unsubscribed` → details converge to it
    ///   (no transition, no domain event; the ISV already heard `Unsubscribed`).
    /// - Webhook `ChangePlan`/`ChangeQuantity` → `ConfirmOperation` (no ACK: nothing is
    ///   decided for an ended subscription); its result then brings a GET.
    /// - Webhook `Renew` → `FetchSubscription`.
    /// - `OperationResult` → `FetchSubscription`: whatever the operation changed is final.
    /// - Everything else is ignored as terminal.
    #[state]
    fn unsubscribed(
        details: &mut Details,
        activation: &mut ActivationProgress,
        context: &mut Ctx<'_>,
        event: &Event,
    ) -> Outcome<State> {
        // `activation` is kept for the record: whether it was ever activated.
        let _ = activation;
        match event {
            Event::PurchaseResolved { snapshot, .. } | Event::Observed { snapshot, .. }
                if snapshot.status == MarketplaceStatus::Unsubscribed =>
            {
                let merged = details.merged_with(snapshot);
                if merged == *details {
                    return context.ignore(IgnoreReason::NoChange);
                }
                *details = merged;
                context.applied("the ended subscription's details converged to Microsoft's view");
                Handled
            }
            Event::Webhook(webhook) => match webhook.action {
                WebhookAction::ChangePlan | WebhookAction::ChangeQuantity => {
                    context.push(Effect::ConfirmOperation {
                        operation_id: webhook.operation_id,
                    });
                    context.applied(format!(
                        "{} after Unsubscribe (events interleave): not acknowledged, following operation {} \
                         to its end",
                        webhook.action, webhook.operation_id
                    ));
                    Handled
                }
                WebhookAction::Renew => {
                    context.push(Effect::FetchSubscription);
                    context.applied(
                        "Renew after Unsubscribe (events interleave): reading the final term",
                    );
                    Handled
                }
                _ => context.ignore(IgnoreReason::Terminal),
            },
            Event::OperationResult {
                operation_id,
                status,
            } => {
                context.push(Effect::FetchSubscription);
                context.applied(format!(
                    "operation {operation_id} ended {status} after Unsubscribe; reading the \
                     final details"
                ));
                Handled
            }
            _ => context.ignore(IgnoreReason::Terminal),
        }
    }
}

impl Ledger {
    fn new(subscription_id: SubscriptionId) -> Self {
        Ledger {
            subscription_id,
            newest_webhooks: Watermarks::default(),
            newest_observation_at: None,
            seen: SeenKeys::default(),
            unconfirmed: Vec::new(),
        }
    }

    /// Bookkeeping after dispatch (runs once per hierarchy level, so it is idempotent):
    /// remember the key (P9) and, if the event counted, advance the watermark (P10).
    /// It lives in a dispatch hook, which never runs on restore, unlike entry actions.
    ///
    /// An event counts when it was applied or rejected, and also when it was ignored as
    /// "no change": the state already reflects it, so anything older is stale. (Without
    /// that, a Reinstate that overtook its Suspend would be ignored while Subscribed, and
    /// the late Suspend would then suspend a subscription Microsoft is reinstating.)
    fn remember(
        &mut self,
        _: StateOrSuperstate<'_, State, Superstate<'_>>,
        event: &Event,
        context: &mut Ctx<'_>,
    ) {
        self.seen.remember(&event.key());
        if !matches!(context.outcome, Some(Decided::Ignored { .. }) | None) {
            self.unconfirmed = context.unconfirmed.clone();
        }
        let counted = matches!(
            context.outcome,
            Some(
                Decided::Applied { .. }
                    | Decided::Rejected { .. }
                    | Decided::Ignored {
                        reason: IgnoreReason::NoChange
                    }
            )
        );
        if !counted {
            return;
        }
        match event {
            Event::Webhook(Webhook {
                timestamp: Some(at),
                action,
                ..
            }) => {
                if let Some(mark) = self.newest_webhooks.of(action) {
                    advance(mark, *at);
                }
            }
            Event::PurchaseResolved {
                resolved_at: at, ..
            }
            | Event::Observed {
                observed_at: at, ..
            } => advance(&mut self.newest_observation_at, *at),
            _ => {}
        }
    }

    /// Whether a webhook of this operation is among the handled keys (a webhook of a
    /// known action: only those are acknowledged, so only those have results).
    fn saw_webhook_of(&self, operation_id: OperationId) -> bool {
        let key = |action: &WebhookAction| format!("webhook:{operation_id}:{action}");
        WebhookAction::KNOWN
            .iter()
            .any(|action| self.seen.contains(&key(action)))
    }

    /// Why the event must be ignored before any state sees it, if it must.
    fn gate(&self, event: &Event) -> Option<IgnoreReason> {
        if self.seen.contains(&event.key()) {
            return Some(IgnoreReason::Duplicate);
        }
        // Evidence of Unsubscribed is never stale: Microsoft never leaves that state, so
        // an old Unsubscribe is still true (P10 "never resurrect" cuts both ways).
        let stale = match event {
            Event::Webhook(webhook) if webhook.action != WebhookAction::Unsubscribe => is_older(
                webhook.timestamp,
                self.newest_webhooks.newest(&webhook.action),
            ),
            Event::PurchaseResolved {
                snapshot,
                resolved_at: at,
            }
            | Event::Observed {
                snapshot,
                observed_at: at,
            } if snapshot.status != MarketplaceStatus::Unsubscribed => {
                is_older(Some(*at), self.newest_observation_at)
            }
            _ => false,
        };
        stale.then_some(IgnoreReason::Stale)
    }
}

fn advance(mark: &mut Option<OffsetDateTime>, at: OffsetDateTime) {
    if mark.is_none_or(|newest| at > newest) {
        *mark = Some(at);
    }
}

fn is_older(at: Option<OffsetDateTime>, newest: Option<OffsetDateTime>) -> bool {
    matches!((at, newest), (Some(at), Some(newest)) if at < newest)
}

impl PendingOperation {
    fn new(command_id: CommandId, command: Command, requested_at: OffsetDateTime) -> Self {
        PendingOperation {
            command_id,
            command,
            requested_at,
            operation_id: None,
            location: None,
            applied: false,
        }
    }
}

fn pending_lock(pending: &Option<PendingOperation>) -> Option<String> {
    pending.as_ref().map(|op| {
        format!(
            "operation pending for command {} (Microsoft locks the subscription until it ends)",
            op.command_id
        )
    })
}

fn activate(details: &Details) -> Effect {
    Effect::Activate {
        plan_id: details.plan_id.clone(),
        quantity: details.quantity,
    }
}

/// Details updated from a webhook's snapshot and target fields. Only used on transitions
/// out of pending, where the webhook is all we know (P12).
fn with_webhook(details: &Details, webhook: &Webhook) -> Details {
    let mut merged = match &webhook.subscription {
        Some(snapshot) => details.merged_with(snapshot),
        None => details.clone(),
    };
    if merged.plan_id.is_none() {
        merged.plan_id = webhook.plan_id.clone();
    }
    if merged.quantity.is_none() {
        merged.quantity = webhook.quantity;
    }
    merged
}

/// Resolve/GET while pending: record what Microsoft says, activate if policy wants.
fn converge_pending(
    details: &mut Details,
    activation: &mut ActivationProgress,
    snapshot: &Snapshot,
    from_landing_page: bool,
    context: &mut Ctx<'_>,
) -> Outcome<State> {
    let Some(target) = snapshot.status.state() else {
        return context.not_applicable(format!("unknown status {}", snapshot.status));
    };
    let first_sighting = !details.is_known();
    let merged = details.merged_with(snapshot);
    if first_sighting && target != StateName::Unsubscribed {
        context.publish(DomainEventKind::Purchased, &merged, target);
    }
    match target {
        StateName::PendingFulfillment => {
            // P5: a revisit never re-activates; only a failed activation is retried.
            let activate_now = from_landing_page
                && context.policy.activation == ActivationMode::Automatic
                && merged.is_known()
                && matches!(
                    activation,
                    ActivationProgress::NotRequested | ActivationProgress::Failed { .. }
                );
            if merged == *details && !activate_now && !first_sighting {
                return context.ignore(IgnoreReason::NoChange);
            }
            *details = merged;
            if activate_now {
                *activation = ActivationProgress::Requested;
                context.push(activate(details));
            }
            context.applied(if from_landing_page {
                "purchase resolved"
            } else {
                "pending purchase observed"
            });
            Handled
        }
        StateName::Subscribed => {
            context.publish(DomainEventKind::Activated, &merged, StateName::Subscribed);
            context.applied("Microsoft reports the subscription active (no second Activate)");
            Transition(State::subscribed(merged, None))
        }
        StateName::Suspended => {
            context.publish(DomainEventKind::Activated, &merged, StateName::Suspended);
            context.publish(DomainEventKind::Suspended, &merged, StateName::Suspended);
            context.applied("Microsoft reports the subscription suspended");
            Transition(State::suspended(merged, None))
        }
        StateName::Unsubscribed => {
            context.publish(
                DomainEventKind::Unsubscribed,
                &merged,
                StateName::Unsubscribed,
            );
            context.applied("Microsoft reports the subscription unsubscribed");
            Transition(State::unsubscribed(merged, activation.clone()))
        }
    }
}

/// Resolve/GET while live: converge to Microsoft's view, announcing what changed.
fn converge_live(
    details: &mut Details,
    pending: &mut Option<PendingOperation>,
    snapshot: &Snapshot,
    context: &mut Ctx<'_>,
) -> Outcome<State> {
    let from = context.from;
    let Some(target) = snapshot.status.state() else {
        return context.not_applicable(format!("unknown status {}", snapshot.status));
    };
    match target {
        StateName::PendingFulfillment => context.not_applicable(format!(
            "Microsoft reports {} for an activated subscription",
            snapshot.status
        )),
        StateName::Unsubscribed => {
            let merged = details.merged_with(snapshot);
            context.publish(
                DomainEventKind::Unsubscribed,
                &merged,
                StateName::Unsubscribed,
            );
            context.applied("Microsoft reports the subscription unsubscribed");
            Transition(State::unsubscribed(merged, ActivationProgress::Confirmed))
        }
        StateName::Subscribed | StateName::Suspended => {
            let mut merged = details.merged_with(snapshot);
            let (target, held, confirmed) =
                hold_unconfirmed(details, snapshot, target, &mut merged, context);
            let mut next_pending = pending.clone();
            if let Some(op) = next_pending.as_mut() {
                // A snapshot taken while our operation is in flight still shows the old
                // value: never let it undo a target we already applied.
                match &op.command {
                    Command::ChangePlan { plan_id } if op.applied => {
                        merged.plan_id = details.plan_id.clone();
                    }
                    Command::ChangePlan { plan_id } => {
                        op.applied = merged.plan_id.as_ref() == Some(plan_id);
                    }
                    Command::ChangeQuantity { .. } if op.applied => {
                        merged.quantity = details.quantity;
                    }
                    Command::ChangeQuantity { quantity } => {
                        op.applied = merged.quantity == Some(*quantity);
                    }
                    Command::Cancel => {}
                }
            }
            if merged == *details && next_pending == *pending && target == from {
                if confirmed.is_empty() {
                    return context.ignore(IgnoreReason::NoChange);
                }
                context.applied(format!(
                    "Microsoft now shows what operation {} changed",
                    confirmed.join(", ")
                ));
                return Handled;
            }
            if merged.plan_id != details.plan_id {
                context.publish(DomainEventKind::PlanChanged, &merged, target);
            }
            if merged.quantity != details.quantity {
                context.publish(DomainEventKind::QuantityChanged, &merged, target);
            }
            match (from, target) {
                (StateName::Subscribed, StateName::Suspended) => {
                    context.publish(DomainEventKind::Suspended, &merged, target)
                }
                (StateName::Suspended, StateName::Subscribed) => {
                    context.publish(DomainEventKind::Reinstated, &merged, target)
                }
                _ => {}
            }
            context.applied(if held.is_empty() {
                format!("converged to Microsoft's view ({})", snapshot.status)
            } else {
                format!(
                    "converged to Microsoft's view ({}), keeping what operation {} changed \
                     until Microsoft confirms it (its GET lags the operation)",
                    snapshot.status,
                    held.join(", ")
                )
            });
            if target == from {
                *details = merged;
                *pending = next_pending;
                Handled
            } else if target == StateName::Subscribed {
                Transition(State::subscribed(merged, next_pending))
            } else {
                Transition(State::suspended(merged, next_pending))
            }
        }
    }
}

/// Keeps in `merged` (and in the returned target state) what acknowledged, unconfirmed
/// operations changed and `snapshot` does not show yet (P13). Drops entries the snapshot
/// confirms, that later events made obsolete, or that waited longer than
/// [`UNCONFIRMED_TTL`]. Returns the target state and the operations held and confirmed.
fn hold_unconfirmed(
    details: &Details,
    snapshot: &Snapshot,
    mut target: StateName,
    merged: &mut Details,
    context: &mut Ctx<'_>,
) -> (StateName, Vec<String>, Vec<String>) {
    let from = context.from;
    let now = context.now;
    let mut held = Vec::new();
    let mut confirmed = Vec::new();
    let mut unconfirmed = std::mem::take(&mut context.unconfirmed);
    unconfirmed.retain(|u| {
        // Too old, or made obsolete by a later event: forget it.
        let obsolete = now - u.since > UNCONFIRMED_TTL
            || match &u.change {
                UnconfirmedChange::Plan { plan_id } => details.plan_id.as_ref() != Some(plan_id),
                UnconfirmedChange::Quantity { quantity } => details.quantity != Some(*quantity),
                UnconfirmedChange::Reinstatement => from != StateName::Subscribed,
            };
        if obsolete {
            return false;
        }
        let shown = match &u.change {
            UnconfirmedChange::Plan { plan_id } => snapshot.plan_id.as_ref() == Some(plan_id),
            UnconfirmedChange::Quantity { quantity } => snapshot.quantity == Some(*quantity),
            UnconfirmedChange::Reinstatement => target == StateName::Subscribed,
        };
        if shown {
            confirmed.push(u.operation_id.to_string());
            return false;
        }
        // The snapshot predates the change: keep ours where it differs.
        let mut kept = false;
        match &u.change {
            UnconfirmedChange::Plan { .. } => {
                if merged.plan_id != details.plan_id || merged.quantity != details.quantity {
                    merged.plan_id = details.plan_id.clone();
                    merged.quantity = details.quantity;
                    kept = true;
                }
            }
            UnconfirmedChange::Quantity { .. } => {
                if merged.quantity != details.quantity {
                    merged.quantity = details.quantity;
                    kept = true;
                }
            }
            UnconfirmedChange::Reinstatement => {
                target = StateName::Subscribed;
                kept = true;
            }
        }
        if kept {
            held.push(u.operation_id.to_string());
        }
        true
    });
    context.unconfirmed = unconfirmed;
    (target, held, confirmed)
}

/// Who started this ChangePlan/ChangeQuantity? `Partner` means us (P18); an unknown
/// source counts as ours only if it carries our pending operation's id.
fn is_ours(webhook: &Webhook, pending: &Option<PendingOperation>) -> bool {
    match webhook.source {
        RequestSource::Partner => true,
        RequestSource::Azure => false,
        RequestSource::Unknown(_) => pending
            .as_ref()
            .is_some_and(|op| op.operation_id == Some(webhook.operation_id)),
    }
}

/// ACK the webhook's operation within the window (P7). The ACK's effect also confirms the
/// operation's final status (the PATCH's answer, or GETs of the operation after it): only
/// once Microsoft reports it final does a GET show the outcome (P13), which the result's
/// confirming fetch then reads.
fn acknowledge(context: &mut Ctx<'_>, webhook: &Webhook, status: AckStatus) {
    context.push(Effect::AckOperation {
        operation_id: webhook.operation_id,
        status,
        best_effort: false,
    });
}

/// ACK a Reinstate (best-effort: Microsoft auto-accepts it anyway; the ACK's effect then
/// confirms it), and keep Subscribed against GETs that still say Suspended until Microsoft
/// reports it final (P13).
fn acknowledge_reinstatement(context: &mut Ctx<'_>, webhook: &Webhook) {
    context.push(Effect::AckOperation {
        operation_id: webhook.operation_id,
        status: AckStatus::Success,
        best_effort: true,
    });
    context.await_confirmation(webhook.operation_id, UnconfirmedChange::Reinstatement);
}

/// A customer's ChangePlan/ChangeQuantity for a purchase we still hold as pending: Microsoft
/// lets customers change only Subscribed subscriptions, so the webhook is news that the
/// activation (ours, or Microsoft's at checkout) took effect before our own check saw it.
/// Waiting for that check would let the 10 s window pass and Microsoft auto-accept the
/// change unanswered; instead the subscription becomes **Subscribed** (`Activated`) and the
/// change is decided as in Subscribed. If that decision is to ignore it, nothing moves.
fn customer_change_implies_activation(
    details: &Details,
    webhook: &Webhook,
    context: &mut Ctx<'_>,
) -> Outcome<State> {
    let mut subscribed = details.clone();
    let mut pending = None;
    context.publish(
        DomainEventKind::Activated,
        &subscribed,
        StateName::Subscribed,
    );
    let _ = change_webhook(&mut subscribed, &mut pending, webhook, context);
    match &mut context.outcome {
        Some(Decided::Applied { reason } | Decided::Rejected { reason }) => {
            *reason = format!(
                "activation implied: Microsoft sends a customer's change only for a Subscribed \
                 subscription; {reason}"
            );
            Transition(State::subscribed(subscribed, pending))
        }
        _ => Handled,
    }
}

/// The target of a customer's ChangePlan/ChangeQuantity webhook: the one thing the two
/// decisions differ in.
#[derive(Debug, Clone, Copy)]
enum Target<'w> {
    Plan(&'w PlanId),
    Quantity(Quantity),
}

impl Target<'_> {
    /// What the webhook asks for; `None` for a minimal payload (§6.2) without it.
    fn of(webhook: &Webhook) -> Option<Target<'_>> {
        match webhook.action {
            WebhookAction::ChangePlan => webhook.plan_id.as_ref().map(Target::Plan),
            _ => webhook.quantity.map(Target::Quantity),
        }
    }

    /// "plan" or "quantity", for the decision's reason.
    fn noun(self) -> &'static str {
        match self {
            Target::Plan(_) => "plan",
            Target::Quantity(_) => "quantity",
        }
    }

    fn is_current(self, details: &Details) -> bool {
        match self {
            Target::Plan(plan_id) => details.plan_id.as_ref() == Some(plan_id),
            Target::Quantity(quantity) => details.quantity == Some(quantity),
        }
    }

    fn apply(self, details: &mut Details) {
        match self {
            Target::Plan(plan_id) => details.plan_id = Some(plan_id.clone()),
            Target::Quantity(quantity) => details.quantity = Some(quantity),
        }
    }

    /// Whether our pending command asks for this very change.
    fn is_requested_by(self, command: &Command) -> bool {
        match (self, command) {
            (Target::Plan(target), Command::ChangePlan { plan_id }) => plan_id == target,
            (Target::Quantity(target), Command::ChangeQuantity { quantity }) => *quantity == target,
            _ => false,
        }
    }

    fn decide(self, policy: &Policy, details: &Details) -> Verdict {
        match self {
            Target::Plan(plan_id) => policy.decide_plan_change(details.plan_id.as_ref(), plan_id),
            Target::Quantity(quantity) => policy.decide_quantity_change(details.quantity, quantity),
        }
    }

    fn unconfirmed(self) -> UnconfirmedChange {
        match self {
            Target::Plan(plan_id) => UnconfirmedChange::Plan {
                plan_id: plan_id.clone(),
            },
            Target::Quantity(quantity) => UnconfirmedChange::Quantity { quantity },
        }
    }

    fn changed(self) -> DomainEventKind {
        match self {
            Target::Plan(_) => DomainEventKind::PlanChanged,
            Target::Quantity(_) => DomainEventKind::QuantityChanged,
        }
    }
}

impl std::fmt::Display for Target<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Plan(plan_id) => write!(f, "{plan_id}"),
            Target::Quantity(quantity) => write!(f, "{quantity}"),
        }
    }
}

/// A ChangePlan/ChangeQuantity webhook while Subscribed: ours (P18: applied, no ACK), a
/// revert to the current value (P8: ACK Success), or the customer's change, decided by the
/// policy and acknowledged either way within the window (P7).
fn change_webhook(
    details: &mut Details,
    pending: &mut Option<PendingOperation>,
    webhook: &Webhook,
    context: &mut Ctx<'_>,
) -> Outcome<State> {
    let Some(target) = Target::of(webhook) else {
        // Minimal 2019–2021 payload (§6.2): learn the target from GET instead.
        context.push(Effect::FetchSubscription);
        context.applied(format!(
            "{} without a target; fetching the subscription",
            webhook.action
        ));
        return Handled;
    };
    let noun = target.noun();
    if is_ours(webhook, pending) {
        // P18: our own operation; it completes by itself and PATCHing it fails.
        let matching = pending
            .as_mut()
            .filter(|op| target.is_requested_by(&op.command));
        if target.is_current(details) {
            return match matching {
                Some(op) if !op.applied => {
                    op.applied = true;
                    context.applied(format!("our {noun} change to {target} is under way"));
                    Handled
                }
                _ => context.ignore(IgnoreReason::NoChange),
            };
        }
        if let Some(op) = matching {
            op.applied = true;
        }
        target.apply(details);
        context.drop_succeeded();
        context.publish(target.changed(), details, StateName::Subscribed);
        context.applied(format!(
            "{noun} changed to {target} by our request (our own change: no ACK)"
        ));
        return Handled;
    }
    if target.is_current(details) {
        acknowledge(context, webhook, AckStatus::Success);
        context.applied(format!(
            "revert to current {noun} {target} accepted (a change back to what we have)"
        ));
        return Handled;
    }
    match target.decide(context.policy, details) {
        Verdict::Accept => {
            target.apply(details);
            acknowledge(context, webhook, AckStatus::Success);
            context.await_confirmation(webhook.operation_id, target.unconfirmed());
            context.publish(target.changed(), details, StateName::Subscribed);
            context.applied(format!("{noun} change to {target} accepted"));
            Handled
        }
        Verdict::Reject { reason } => {
            acknowledge(context, webhook, AckStatus::Failure);
            context.publish_because(
                DomainEventKind::ChangeRejected,
                details,
                StateName::Subscribed,
                Some(reason.clone()),
            );
            context.rejected(reason);
            Handled
        }
    }
}

fn operation_result(
    details: &mut Details,
    pending: &mut Option<PendingOperation>,
    operation_id: OperationId,
    status: OperationStatus,
    context: &mut Ctx<'_>,
) -> Outcome<State> {
    let Some(op) = pending
        .as_ref()
        .filter(|op| op.operation_id == Some(operation_id))
        .cloned()
    else {
        if context.known_operation {
            let entry = context
                .unconfirmed
                .iter_mut()
                .find(|u| u.operation_id == operation_id && !u.succeeded);
            if let Some(entry) = entry
                && let UnconfirmedChange::Quantity { quantity } = entry.change
                && status == OperationStatus::Succeeded
                && details.quantity == Some(quantity)
            {
                // A seat change we accepted succeeded: the operation's end says the whole
                // outcome (its seats are the ones we applied; a seat change moves no plan,
                // term or status), so a GET would only repeat it. The entry stays, marked,
                // against a GET made before the end and applied after it.
                entry.succeeded = true;
                context.applied(format!(
                    "operation {operation_id} ended Succeeded: {quantity} seats, as accepted \
                     (no GET needed: a seat change's success says its whole outcome; older \
                     GETs cannot undo it)"
                ));
                return Handled;
            }
            context
                .unconfirmed
                .retain(|u| u.operation_id != operation_id);
            // Otherwise only a GET after the operation is final shows its outcome (P13,
            // §7.3): a plan change (a plan may drop the seats), a rejection Microsoft
            // ignored (acc#348), an auto-accept, a reinstatement, seats moved again since.
            context.push(Effect::FetchSubscription);
            context.applied(format!(
                "operation {operation_id} ended {status} at Microsoft; confirming with GET (its GET lags the operation)"
            ));
            return Handled;
        }
        return context.not_applicable(format!(
            "operation {operation_id} is not ours or not pending"
        ));
    };
    *pending = None;
    conclude(
        details,
        op,
        &format!("operation {operation_id}"),
        status,
        context,
    )
}

/// Ends our pending PATCH/DELETE `op` as Microsoft ended it: a failure keeps the state and
/// tells the ISV; a success applies the change once (a cancellation ends the subscription).
/// `what` names the operation, or the command when its operation id never reached us.
fn conclude(
    details: &mut Details,
    op: PendingOperation,
    what: &str,
    status: OperationStatus,
    context: &mut Ctx<'_>,
) -> Outcome<State> {
    let state = context.from;
    if status != OperationStatus::Succeeded {
        let reason = format!("{what} ended {status}");
        if op.applied {
            // A Partner webhook made us apply the target early; re-read the truth.
            context.push(Effect::FetchSubscription);
        }
        context.publish_because(
            DomainEventKind::PublisherOperationFailed,
            details,
            state,
            Some(reason.clone()),
        );
        context.rejected(reason);
        return Handled;
    }
    // Our change supersedes the succeeded seat changes held against older GETs (the GET it
    // brings speaks now; a cancellation ends the subscription, where nothing is held).
    context.drop_succeeded();
    match op.command {
        Command::Cancel => {
            context.publish(
                DomainEventKind::Unsubscribed,
                details,
                StateName::Unsubscribed,
            );
            context.applied(format!("cancellation {what} succeeded"));
            Transition(State::unsubscribed(
                details.clone(),
                ActivationProgress::Confirmed,
            ))
        }
        // §7.2 "on Succeeded: apply change locally; GET subscription to confirm": the GET
        // also brings what the change implies (a flat plan has no seats).
        Command::ChangePlan { plan_id } => {
            if !op.applied && details.plan_id.as_ref() != Some(&plan_id) {
                details.plan_id = Some(plan_id.clone());
                context.publish(DomainEventKind::PlanChanged, details, state);
            }
            context.push(Effect::FetchSubscription);
            context.applied(format!("plan change to {plan_id} succeeded"));
            Handled
        }
        Command::ChangeQuantity { quantity } => {
            if !op.applied && details.quantity != Some(quantity) {
                details.quantity = Some(quantity);
                context.publish(DomainEventKind::QuantityChanged, details, state);
            }
            context.push(Effect::FetchSubscription);
            context.applied(format!("quantity change to {quantity} succeeded"));
            Handled
        }
    }
}

/// One subscription's lifecycle: load it, `handle` events, store it (JSON, `jsonb`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionMachine {
    machine: InitializedStateMachine<Ledger>,
}

impl SubscriptionMachine {
    /// A subscription we just heard of: PendingFulfillment, nothing known.
    pub fn new(id: SubscriptionId) -> Self {
        Self::initialized(Ledger::new(id).uninitialized_state_machine())
    }

    /// statig runs entry actions on init (also after a restore). We have none, and
    /// whatever init could put into the context is thrown away with it.
    fn initialized(machine: UninitializedStateMachine<Ledger>) -> Self {
        let policy = Policy::default();
        let mut throwaway = Ctx::new(
            OffsetDateTime::UNIX_EPOCH,
            &policy,
            StateName::PendingFulfillment,
        );
        let machine = machine.init_with_context(&mut throwaway);
        SubscriptionMachine { machine }
    }

    /// Decide what `event` means now. Ignored events change nothing but the seen-key set
    /// and carry no effects.
    pub fn handle(&mut self, event: &Event, now: OffsetDateTime, policy: &Policy) -> Decision {
        let from = self.state();
        if let Some(reason) = self.machine.inner().gate(event) {
            return Decision::ignored(from, reason);
        }
        let mut context = Ctx::new(now, policy, from);
        context.unconfirmed = self.machine.inner().unconfirmed.clone();
        if let Event::OperationResult { operation_id, .. } = event {
            context.known_operation = self.machine.inner().saw_webhook_of(*operation_id);
        }
        self.machine.handle_with_context(event, &mut context);
        let outcome = context.outcome.unwrap_or_else(|| Decided::Ignored {
            reason: IgnoreReason::NotApplicable(format!(
                "{} is not handled in {from}",
                event.kind()
            )),
        });
        let effects = if outcome.is_ignored() {
            Vec::new()
        } else {
            context.effects
        };
        Decision {
            from,
            to: self.state(),
            outcome,
            effects,
        }
    }

    /// The current state.
    pub fn state(&self) -> StateName {
        match self.machine.state() {
            State::PendingFulfillment { .. } => StateName::PendingFulfillment,
            State::Subscribed { .. } => StateName::Subscribed,
            State::Suspended { .. } => StateName::Suspended,
            State::Unsubscribed { .. } => StateName::Unsubscribed,
        }
    }

    /// What we know about the subscription.
    pub fn details(&self) -> &Details {
        match self.machine.state() {
            State::PendingFulfillment { details, .. }
            | State::Subscribed { details, .. }
            | State::Suspended { details, .. }
            | State::Unsubscribed { details, .. } => details,
        }
    }

    /// The subscription id.
    pub fn subscription_id(&self) -> SubscriptionId {
        self.machine.inner().subscription_id
    }

    /// The publisher operation in flight, if any.
    pub fn pending_operation(&self) -> Option<&PendingOperation> {
        match self.machine.state() {
            State::Subscribed { pending, .. } | State::Suspended { pending, .. } => {
                pending.as_ref()
            }
            State::PendingFulfillment { .. } | State::Unsubscribed { .. } => None,
        }
    }

    /// Where activation stands.
    pub fn activation(&self) -> ActivationProgress {
        match self.machine.state() {
            State::PendingFulfillment { activation, .. }
            | State::Unsubscribed { activation, .. } => activation.clone(),
            State::Subscribed { .. } | State::Suspended { .. } => ActivationProgress::Confirmed,
        }
    }

    /// Changes we acknowledged that Microsoft has not confirmed yet (P13).
    pub fn unconfirmed(&self) -> &[Unconfirmed] {
        &self.machine.inner().unconfirmed
    }

    /// Whether `event` has been handled before (its key is still in the ring).
    pub fn has_seen(&self, event: &Event) -> bool {
        self.machine.inner().seen.contains(&event.key())
    }
}

impl Serialize for SubscriptionMachine {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.machine.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for SubscriptionMachine {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let machine = UninitializedStateMachine::<Ledger>::deserialize(deserializer)?;
        Ok(Self::initialized(machine))
    }
}
