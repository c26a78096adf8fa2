//! The Microsoft-side rules of §5 and §7: purchases, activation, publisher- and
//! customer-initiated changes, notify-only events, acknowledgements, and the timers that
//! complete operations (operation delay, the 10-second ACK window with auto-accept).

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use time::OffsetDateTime;
use url::Url;
use uuid::Uuid;

use super::error::ApiError;
use super::state::{
    AadIdentifier, Action, Operation, OperationStatus, PurchaseToken, RequestSource, Shared, State,
    Subscription, SubscriptionStatus, term_from, term_length, wire_name,
};
use super::webhooks;

/// A plan or seat change (§4.6, §4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Plan(String),
    Quantity(u32),
}

/// A new purchase, as the admin API describes it.
#[derive(Debug, Clone)]
pub(crate) struct Purchase {
    pub offer_id: String,
    pub plan_id: String,
    pub quantity: Option<u32>,
    pub name: Option<String>,
    pub beneficiary_tenant_id: Option<Uuid>,
    pub purchaser_tenant_id: Option<Uuid>,
    /// Default: the plan's auto-activation setting (§5.6).
    pub auto_activate: Option<bool>,
    /// A CSP purchase: `allowedCustomerOperations: ["Read"]`, `sandboxType: Csp` and a
    /// purchaser (the CSP) other than the beneficiary (§10.2).
    pub csp: bool,
    /// Default: the plan's free trial.
    pub is_free_trial: Option<bool>,
    /// Default: the plan's term unit; `PAY` or any ISO-8601 duration (§15.3).
    pub term_unit: Option<String>,
    /// Default true (§3.1).
    pub auto_renew: Option<bool>,
    /// The private offer the purchase came through (`sourceOffers[].externalId`).
    pub private_offer_id: Option<String>,
    /// `puid` and `emailId` null on both identities (§15.3).
    pub null_puid: bool,
    /// Activate is accepted, then fails at Microsoft: an Unsubscribe follows (§4.2).
    pub fail_activation: bool,
}

#[derive(Debug, Clone)]
pub(crate) struct Purchased {
    pub subscription_id: Uuid,
    pub token: String,
    pub landing_url: Url,
}

fn not_found(id: Uuid) -> ApiError {
    ApiError::not_found(format!("Subscription {id} not found"))
}

/// An operation id the operation endpoints do not know: 400 like the live service, or the
/// documented 404 with `--strict-404` (§4.10, §15.2).
pub(crate) fn unknown_operation(shared: &Shared, op_id: impl std::fmt::Display) -> ApiError {
    let message = format!("Operation {op_id} not found");
    if shared.config.strict_404 {
        ApiError::not_found(message)
    } else {
        ApiError::bad_request(message)
    }
}

/// ChangePlan/ChangeQuantity from the customer's side: the publisher may ACK or reject it
/// within the window. Reinstate may be ACKed but does not need it.
pub(crate) fn is_ackable_change(op: &Operation) -> bool {
    op.source == RequestSource::Azure
        && matches!(op.action, Action::ChangePlan | Action::ChangeQuantity)
}

fn new_operation(
    sub: &Subscription,
    action: Action,
    status: OperationStatus,
    source: RequestSource,
) -> Operation {
    Operation {
        id: Uuid::new_v4(),
        activity_id: Uuid::new_v4(),
        action,
        plan_id: sub.plan_id.clone(),
        quantity: sub.quantity,
        status,
        source,
        created: OffsetDateTime::now_utc(),
        resolution: None,
        finished: None,
        error_status_code: String::new(),
        error_message: String::new(),
        reads: Vec::new(),
        first_read_at: None,
    }
}

/// A purchase token: standard base64 with at least one `+` and `/`, so a landing page that
/// does not URL-decode exactly once breaks (P1).
fn new_purchase_token() -> String {
    loop {
        let mut bytes = [0u8; 48];
        if aws_lc_rs::rand::fill(&mut bytes).is_err() {
            bytes.copy_from_slice(
                &[
                    Uuid::new_v4().into_bytes(),
                    Uuid::new_v4().into_bytes(),
                    Uuid::new_v4().into_bytes(),
                ]
                .concat(),
            );
        }
        let token = STANDARD.encode(bytes);
        if token.contains('+') && token.contains('/') {
            return token;
        }
    }
}

/// Issues a landing-page token for `subscription_id` and the landing URL carrying it.
pub(crate) fn issue_purchase_token(
    shared: &Shared,
    st: &mut State,
    subscription_id: Uuid,
) -> (String, Url) {
    let token = new_purchase_token();
    let now = OffsetDateTime::now_utc();
    st.purchase_tokens.retain(|_, t| t.expires_at > now);
    st.purchase_tokens.insert(
        token.clone(),
        PurchaseToken {
            subscription_id,
            expires_at: now + shared.config.timings.token_ttl,
        },
    );
    let mut landing = shared.landing_base();
    landing.query_pairs_mut().append_pair("token", &token);
    (token, landing)
}

impl Shared {
    /// The landing page: configured, else the webhook's origin + `/landing`, else ours.
    fn landing_base(&self) -> Url {
        if let Some(url) = &self.config.landing_page_url {
            return url.clone();
        }
        let mut url = self
            .config
            .webhook_url
            .clone()
            .unwrap_or_else(|| self.base_url.clone());
        url.set_path("/landing");
        url.set_query(None);
        url.set_fragment(None);
        url
    }
}

fn identity(tenant: Option<Uuid>, label: &str, anonymous: bool) -> AadIdentifier {
    let tenant_id = tenant.unwrap_or_else(Uuid::new_v4);
    let short = &tenant_id.simple().to_string()[..8];
    AadIdentifier {
        email_id: (!anonymous).then(|| format!("{label}@customer-{short}.example")),
        object_id: Uuid::new_v4(),
        tenant_id,
        puid: (!anonymous).then(|| {
            format!(
                "10032000{}",
                &Uuid::new_v4().simple().to_string()[..8].to_uppercase()
            )
        }),
    }
}

pub(crate) fn purchase(shared: &Arc<Shared>, request: Purchase) -> Result<Purchased, ApiError> {
    let plan = shared
        .plan(&request.offer_id, &request.plan_id)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "offer {} has no plan {}",
                request.offer_id, request.plan_id
            ))
        })?;
    let quantity = if plan.is_price_per_seat {
        let quantity = request.quantity.unwrap_or(plan.min_quantity);
        if !(plan.min_quantity..=plan.max_quantity).contains(&quantity) {
            return Err(ApiError::bad_request(format!(
                "quantity {quantity} is outside {}..={} for plan {}",
                plan.min_quantity, plan.max_quantity, plan.plan_id
            )));
        }
        Some(quantity)
    } else {
        None
    };
    let term_unit = match request.term_unit.as_deref().map(str::trim) {
        None => plan.term_unit.clone(),
        Some(unit) if unit == "PAY" || term_length(unit).is_some() => unit.to_owned(),
        Some(unit) => {
            return Err(ApiError::bad_request(format!(
                "termUnit {unit:?} is neither PAY nor an ISO-8601 duration"
            )));
        }
    };
    let anonymous = request.null_puid;
    let beneficiary = identity(request.beneficiary_tenant_id, "admin", anonymous);
    let purchaser = match request.purchaser_tenant_id {
        Some(tenant) if tenant != beneficiary.tenant_id => {
            identity(Some(tenant), "buyer", anonymous)
        }
        // A CSP buys on behalf of its customer: the purchaser is the CSP's tenant.
        None if request.csp => identity(None, "csp", anonymous),
        _ => beneficiary.clone(),
    };
    let auto_activate = request.auto_activate.unwrap_or(plan.auto_activate);
    let now = OffsetDateTime::now_utc();
    Ok(shared.mutate(|st| {
        st.next_seq += 1;
        let id = Uuid::new_v4();
        let mut subscription = Subscription {
            id,
            seq: st.next_seq,
            name: request.name.unwrap_or_else(|| {
                format!("{} - {}", plan.display_name, &id.simple().to_string()[..6])
            }),
            offer_id: request.offer_id,
            plan_id: plan.plan_id.clone(),
            quantity,
            status: SubscriptionStatus::PendingFulfillmentStart,
            beneficiary,
            purchaser,
            charge_duration: charge_duration(&term_unit),
            term_unit,
            term_start: None,
            term_end: None,
            auto_renew: request.auto_renew.unwrap_or(true),
            is_free_trial: request.is_free_trial.unwrap_or(plan.has_free_trial),
            allowed_customer_operations: if request.csp {
                vec!["Read".into()]
            } else {
                vec!["Delete".into(), "Update".into(), "Read".into()]
            },
            csp_sandbox: request.csp,
            private_offer_id: request.private_offer_id,
            created: now,
            activation_requested: false,
            fail_activation: request.fail_activation,
            inactive_since: None,
            operations: Vec::new(),
            deliveries: Vec::new(),
        };
        let subscribe_op = if auto_activate {
            // Auto-activation (§5.6): billing starts at checkout, a Subscribe webhook follows.
            start_term(&mut subscription, now);
            subscription.status = SubscriptionStatus::Subscribed;
            let op = new_operation(
                &subscription,
                Action::Subscribe,
                OperationStatus::Succeeded,
                RequestSource::Azure,
            );
            let op_id = op.id;
            subscription.operations.push(op);
            Some(op_id)
        } else {
            None
        };
        let term_end = subscription.term_end;
        st.insert_subscription(subscription);
        if let Some(op_id) = subscribe_op {
            webhooks::notify(shared, st, id, op_id);
            if let Some(end) = term_end {
                schedule_term_end(shared, id, end);
            }
        }
        let (token, landing_url) = issue_purchase_token(shared, st, id);
        tracing::info!(subscription_id = %id, auto_activate, "purchase");
        Purchased {
            subscription_id: id,
            token,
            landing_url,
        }
    }))
}

/// `count` subscriptions of `offer_id`/`plan_id` with `quantity` seats, Subscribed with
/// their term started, as if bought and activated long ago: no purchase token left, no
/// operation, no webhook. `bench scale` preloads a million this way; returns their ids in
/// purchase order.
pub(crate) fn preload_subscribed(
    shared: &Arc<Shared>,
    offer_id: &str,
    plan_id: &str,
    quantity: Option<u32>,
    count: usize,
) -> Result<Vec<Uuid>, ApiError> {
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        let purchased = purchase(
            shared,
            Purchase {
                offer_id: offer_id.to_owned(),
                plan_id: plan_id.to_owned(),
                quantity,
                name: None,
                beneficiary_tenant_id: None,
                purchaser_tenant_id: None,
                auto_activate: Some(false),
                csp: false,
                is_free_trial: Some(false),
                term_unit: None,
                auto_renew: None,
                private_offer_id: None,
                null_puid: false,
                fail_activation: false,
            },
        )?;
        shared.mutate(|st| {
            st.purchase_tokens.remove(&purchased.token);
            if let Some(sub) = st.subscriptions.get_mut(&purchased.subscription_id) {
                start_term(sub, sub.created);
                sub.status = SubscriptionStatus::Subscribed;
                sub.activation_requested = true;
            }
        });
        ids.push(purchased.subscription_id);
    }
    Ok(ids)
}

/// `term.chargeDuration`: a multi-year term is billed yearly [INFER: the spec added the
/// field in 2025 without saying more]; other terms are billed once, `null`.
fn charge_duration(term_unit: &str) -> Option<String> {
    match term_length(term_unit) {
        Some((months, 0)) if months > 12 && months % 12 == 0 => Some("P1Y".into()),
        _ => None,
    }
}

fn start_term(sub: &mut Subscription, now: OffsetDateTime) {
    let (start, end) = term_from(now.date(), &sub.term_unit);
    sub.term_start = Some(start);
    sub.term_end = Some(end);
}

/// Activate (§4.2): 200 means "received"; the subscription becomes Subscribed after
/// `activation_delay`.
pub(crate) fn activate(shared: &Arc<Shared>, id: Uuid) -> Result<(), ApiError> {
    let schedule = shared.mutate(|st| {
        let sub = st.subscriptions.get_mut(&id).ok_or_else(|| not_found(id))?;
        match sub.status {
            SubscriptionStatus::Unsubscribed => Err(not_found(id)),
            SubscriptionStatus::Suspended => Err(ApiError::bad_request(
                "The subscription is Suspended and cannot be activated",
            )),
            SubscriptionStatus::Subscribed => Ok(false),
            SubscriptionStatus::PendingFulfillmentStart => {
                let first = !sub.activation_requested;
                sub.activation_requested = true;
                Ok(first)
            }
        }
    })?;
    if schedule {
        tracing::info!(subscription_id = %id, "activation requested");
        shared.spawn_after(shared.config.timings.activation_delay, move |shared| {
            complete_activation(shared, id);
        });
    }
    Ok(())
}

fn complete_activation(shared: &Arc<Shared>, id: Uuid) {
    let fails = shared.read(|st| {
        st.subscriptions.get(&id).is_some_and(|s| {
            s.fail_activation && s.status == SubscriptionStatus::PendingFulfillmentStart
        })
    });
    if fails {
        // "If activation fails on Microsoft's side, an Unsubscribe webhook is sent" (§4.2).
        tracing::info!(subscription_id = %id, "activation failed");
        if let Err(error) = raise(shared, id, Event::Unsubscribe) {
            tracing::warn!(subscription_id = %id, message = %error.message, "failed activation not applied");
        }
        return;
    }
    let term_end = shared.mutate(|st| {
        let sub = st
            .subscriptions
            .get_mut(&id)
            .filter(|sub| sub.status == SubscriptionStatus::PendingFulfillmentStart)?;
        start_term(sub, OffsetDateTime::now_utc());
        sub.status = SubscriptionStatus::Subscribed;
        tracing::info!(subscription_id = %id, "activated");
        sub.term_end
    });
    if let Some(end) = term_end {
        schedule_term_end(shared, id, end);
    }
}

/// `days` simulated days on the wall clock.
fn days(shared: &Shared, days: i64) -> std::time::Duration {
    let days = u32::try_from(days.max(0)).unwrap_or(u32::MAX);
    shared
        .config
        .timings
        .day
        .checked_mul(days)
        .unwrap_or(std::time::Duration::MAX)
}

/// The day after `term_end`, the term is over (§3.3, §5.5): see [`end_term`].
fn schedule_term_end(shared: &Arc<Shared>, id: Uuid, term_end: OffsetDateTime) {
    let remaining = (term_end.date() - OffsetDateTime::now_utc().date()).whole_days() + 1;
    shared.spawn_after(days(shared, remaining), move |shared| {
        end_term(shared, id, term_end);
    });
}

/// A term ended: renewed when `autoRenew` is on (Renew moves the term, §5.5), otherwise
/// the subscription ends (Unsubscribe). Nothing when the subscription moved on meanwhile
/// (renewed by hand, suspended, cancelled).
fn end_term(shared: &Arc<Shared>, id: Uuid, term_end: OffsetDateTime) {
    let auto_renew = shared.read(|st| {
        st.subscriptions
            .get(&id)
            .filter(|s| s.status == SubscriptionStatus::Subscribed && s.term_end == Some(term_end))
            .map(|s| s.auto_renew)
    });
    let event = match auto_renew {
        Some(true) => Event::Renew,
        Some(false) => Event::Unsubscribe,
        None => return,
    };
    if let Err(error) = raise(shared, id, event) {
        tracing::warn!(subscription_id = %id, ?event, message = %error.message, "term end not applied");
    }
}

/// `SUSPENSION_GRACE_DAYS` after the Suspend `suspend_op`, a subscription still Suspended
/// by it is unsubscribed (§5.2).
fn schedule_grace_end(shared: &Arc<Shared>, id: Uuid, suspend_op: Uuid, after_days: i64) {
    shared.spawn_after(days(shared, after_days), move |shared| {
        let still = shared.read(|st| {
            st.subscriptions.get(&id).is_some_and(|s| {
                s.status == SubscriptionStatus::Suspended
                    && s
                        .operations
                        .iter()
                        .rev()
                        .find(|o| o.action == Action::Suspend)
                        .is_some_and(|o| o.id == suspend_op)
            })
        });
        if still && let Err(error) = raise(shared, id, Event::Unsubscribe) {
            tracing::warn!(subscription_id = %id, message = %error.message, "grace end not applied");
        }
    });
}

fn validate_change(shared: &Shared, sub: &Subscription, change: &Change) -> Result<(), ApiError> {
    if sub.status != SubscriptionStatus::Subscribed {
        return Err(ApiError::bad_request(format!(
            "The subscription is {}; only Subscribed subscriptions can be updated",
            wire_name(&sub.status)
        )));
    }
    if sub.pending_operation().is_some() {
        return Err(ApiError::bad_request(
            "Subscription is locked due to pending operations",
        ));
    }
    match change {
        Change::Plan(plan_id) => {
            if shared.plan(&sub.offer_id, plan_id).is_none() {
                return Err(ApiError::bad_request(format!(
                    "Plan {plan_id} is not available for this subscription"
                )));
            }
            if *plan_id == sub.plan_id {
                return Err(ApiError::bad_request(format!(
                    "The subscription is already on plan {plan_id}"
                )));
            }
        }
        Change::Quantity(quantity) => {
            let plan = shared
                .plan(&sub.offer_id, &sub.plan_id)
                .filter(|p| p.is_price_per_seat)
                .ok_or_else(|| {
                    ApiError::bad_request(format!("Plan {} is not priced per seat", sub.plan_id))
                })?;
            if sub.quantity == Some(*quantity) {
                return Err(ApiError::bad_request(format!(
                    "The subscription already has quantity {quantity}"
                )));
            }
            if !(plan.min_quantity..=plan.max_quantity).contains(quantity) {
                return Err(ApiError::bad_request(format!(
                    "Quantity {quantity} is outside the plan's limits {}..={}",
                    plan.min_quantity, plan.max_quantity
                )));
            }
        }
    }
    Ok(())
}

fn require_customer_operation(sub: &Subscription, operation: &str) -> Result<(), ApiError> {
    if sub
        .allowed_customer_operations
        .iter()
        .any(|o| o == operation)
    {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{operation} is not in allowedCustomerOperations for this subscription"
        )))
    }
}

/// A plan/quantity change. `Partner`: the publisher's PATCH, completed after
/// `operation_delay`. `Azure`: the customer's, auto-accepted after the ACK window.
pub(crate) fn request_change(
    shared: &Arc<Shared>,
    id: Uuid,
    change: Change,
    source: RequestSource,
) -> Result<Uuid, ApiError> {
    let op_id = shared.mutate(|st| {
        let sub = st.subscriptions.get_mut(&id).ok_or_else(|| not_found(id))?;
        if source == RequestSource::Partner {
            require_customer_operation(sub, "Update")?;
        }
        // An Unsubscribed subscription answers 400 here, like any other not Subscribed.
        validate_change(shared, sub, &change)?;
        let action = match change {
            Change::Plan(_) => Action::ChangePlan,
            Change::Quantity(_) => Action::ChangeQuantity,
        };
        // Our own operations start NotStarted (§15.1); the customer's arrive InProgress.
        let status = match source {
            RequestSource::Partner => OperationStatus::NotStarted,
            RequestSource::Azure => OperationStatus::InProgress,
        };
        let mut op = new_operation(sub, action, status, source);
        match change {
            Change::Plan(plan_id) => op.plan_id = plan_id,
            Change::Quantity(quantity) => op.quantity = Some(quantity),
        }
        let op_id = op.id;
        sub.operations.push(op);
        webhooks::notify(shared, st, id, op_id);
        Ok(op_id)
    })?;
    match source {
        RequestSource::Partner => schedule_partner_operation(shared, id, op_id),
        RequestSource::Azure => schedule_auto_accept(shared, id, op_id),
    }
    tracing::info!(subscription_id = %id, operation_id = %op_id, ?source, "change requested");
    Ok(op_id)
}

/// The publisher's DELETE (§4.8): Unsubscribed after `operation_delay`, then a webhook.
pub(crate) fn request_cancellation(shared: &Arc<Shared>, id: Uuid) -> Result<Uuid, ApiError> {
    let op_id = shared.mutate(|st| {
        let sub = st.subscriptions.get_mut(&id).ok_or_else(|| not_found(id))?;
        if sub.status == SubscriptionStatus::Unsubscribed {
            return Err(ApiError::bad_request(
                "The subscription is already Unsubscribed",
            ));
        }
        require_customer_operation(sub, "Delete")?;
        if sub.pending_operation().is_some() {
            return Err(ApiError::conflict(
                "Subscription is locked due to pending operations",
            ));
        }
        let op = new_operation(
            sub,
            Action::Unsubscribe,
            OperationStatus::NotStarted,
            RequestSource::Partner,
        );
        let op_id = op.id;
        sub.operations.push(op);
        Ok(op_id)
    })?;
    schedule_partner_operation(shared, id, op_id);
    tracing::info!(subscription_id = %id, operation_id = %op_id, "cancellation requested");
    Ok(op_id)
}

/// A publisher operation: `NotStarted` for `operation_start_delay`, then `InProgress`, then
/// final at `operation_delay` (never before it started).
fn schedule_partner_operation(shared: &Arc<Shared>, id: Uuid, op_id: Uuid) {
    let timings = &shared.config.timings;
    shared.spawn_after(timings.operation_start_delay, move |shared| {
        shared.mutate(|st| {
            if let Some(op) = st
                .subscriptions
                .get_mut(&id)
                .and_then(|s| s.operation_mut(op_id))
                && op.status == OperationStatus::NotStarted
            {
                op.status = OperationStatus::InProgress;
            }
        });
    });
    let done = timings.operation_delay.max(timings.operation_start_delay);
    schedule_completion(shared, id, op_id, done);
}

/// A customer's operation: Microsoft accepts it itself once its ACK window, counted from the
/// webhook, is over (§5.3).
fn schedule_auto_accept(shared: &Arc<Shared>, id: Uuid, op_id: Uuid) {
    let timings = &shared.config.timings;
    schedule_completion(
        shared,
        id,
        op_id,
        timings.webhook_delay + timings.ack_window,
    );
}

fn schedule_completion(shared: &Arc<Shared>, id: Uuid, op_id: Uuid, delay: std::time::Duration) {
    shared.spawn_after(delay, move |shared| {
        shared.mutate(|st| finish(shared, st, id, op_id, Outcome::Accept("auto-accepted")));
    });
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Accept(&'static str),
    Refuse { code: u16, message: &'static str },
}

/// Ends an open operation (no-op otherwise): applies it on acceptance, keeps the old
/// values on refusal, and sends the webhooks that follow completion.
fn finish(shared: &Arc<Shared>, st: &mut State, id: Uuid, op_id: Uuid, outcome: Outcome) {
    let Some(sub) = st.subscriptions.get_mut(&id) else {
        return;
    };
    let Some(op) = sub.operation(op_id).cloned() else {
        return;
    };
    if !op.status.is_open() {
        return;
    }
    let (status, resolution, error) = match outcome {
        Outcome::Refuse { code, message } => {
            (OperationStatus::Failed, message, Some((code, message)))
        }
        Outcome::Accept(how) => match op.action {
            Action::ChangePlan | Action::ChangeQuantity
                if sub.status != SubscriptionStatus::Subscribed =>
            {
                (
                    OperationStatus::Failed,
                    "subscription no longer Subscribed",
                    Some((400, "The subscription is no longer Subscribed")),
                )
            }
            Action::ChangePlan if sub.plan_id == op.plan_id => (
                OperationStatus::Conflict,
                "target equals current plan",
                None,
            ),
            Action::ChangeQuantity if sub.quantity == op.quantity => (
                OperationStatus::Conflict,
                "target equals current quantity",
                None,
            ),
            Action::Reinstate if sub.status != SubscriptionStatus::Suspended => (
                OperationStatus::Failed,
                "subscription no longer Suspended",
                Some((400, "The subscription is no longer Suspended")),
            ),
            _ => (OperationStatus::Succeeded, how, None),
        },
    };
    if status == OperationStatus::Succeeded {
        apply(shared, sub, &op);
    }
    if let Some(stored) = sub.operation_mut(op_id) {
        stored.status = status;
        stored.resolution = Some(resolution.to_string());
        stored.finished = Some(OffsetDateTime::now_utc());
        if let Some((code, message)) = error {
            stored.error_status_code = code.to_string();
            stored.error_message = message.to_string();
        }
    }
    tracing::info!(subscription_id = %id, operation_id = %op_id, status = %wire_name(&status), resolution, "operation finished");
    shared.operation_waiters.wake(op_id);
    if status == OperationStatus::Succeeded
        && op.action == Action::Unsubscribe
        && op.source == RequestSource::Partner
    {
        webhooks::notify(shared, st, id, op_id);
    }
}

fn apply(shared: &Shared, sub: &mut Subscription, op: &Operation) {
    match op.action {
        Action::ChangePlan => {
            sub.plan_id = op.plan_id.clone();
            match shared.plan(&sub.offer_id, &sub.plan_id) {
                Some(plan) if plan.is_price_per_seat => {
                    sub.quantity = Some(
                        sub.quantity
                            .unwrap_or(plan.min_quantity)
                            .clamp(plan.min_quantity, plan.max_quantity),
                    );
                }
                _ => sub.quantity = None,
            }
        }
        Action::ChangeQuantity => sub.quantity = op.quantity,
        Action::Reinstate => {
            sub.status = SubscriptionStatus::Subscribed;
            sub.inactive_since = None;
        }
        Action::Unsubscribe | Action::Suspend => {
            if sub.status == SubscriptionStatus::Subscribed {
                sub.inactive_since = Some(OffsetDateTime::now_utc());
            }
            sub.status = if op.action == Action::Unsubscribe {
                SubscriptionStatus::Unsubscribed
            } else {
                SubscriptionStatus::Suspended
            };
        }
        Action::Renew => {
            let next = sub
                .term_end
                .and_then(|end| end.date().next_day())
                .unwrap_or_else(|| OffsetDateTime::now_utc().date());
            let (start, end) = term_from(next, &sub.term_unit);
            sub.term_start = Some(start);
            sub.term_end = Some(end);
        }
        Action::Subscribe => {}
    }
}

/// What the publisher's PATCH of an operation says (§4.11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ack {
    Success,
    Failure,
}

pub(crate) fn acknowledge(
    shared: &Arc<Shared>,
    id: Uuid,
    op_id: Uuid,
    ack: Ack,
) -> Result<(), ApiError> {
    shared.mutate(|st| {
        let sub = st
            .subscriptions
            .get(&id)
            .ok_or_else(|| unknown_operation(shared, op_id))?;
        let op = sub
            .operation(op_id)
            .ok_or_else(|| unknown_operation(shared, op_id))?;
        if op.source == RequestSource::Partner {
            // What the live service does when a publisher ACKs its own operation (§15.2).
            return Err(ApiError::internal(
                "An unexpected error has occurred (emulated behaviour of the live service: \
                 a Partner operation cannot be updated)",
            ));
        }
        if !op.status.is_open() {
            return Err(ApiError::conflict(format!(
                "Operation {op_id} is {} and can no longer be updated",
                wire_name(&op.status)
            )));
        }
        let outcome = match ack {
            Ack::Success => Outcome::Accept("acknowledged Success"),
            Ack::Failure => Outcome::Refuse {
                code: 400,
                message: "rejected by the publisher (PATCH Failure)",
            },
        };
        finish(shared, st, id, op_id, outcome);
        Ok(())
    })
}

/// A 4xx answer to a customer-side ChangePlan/ChangeQuantity webhook (§6.3).
pub(crate) fn reject_by_webhook(st: &mut State, id: Uuid, op_id: Uuid, status: u16) {
    let Some(op) = st
        .subscriptions
        .get_mut(&id)
        .and_then(|s| s.operation_mut(op_id))
    else {
        return;
    };
    if op.status == OperationStatus::InProgress && is_ackable_change(op) {
        op.status = OperationStatus::Failed;
        op.resolution = Some(format!("rejected by webhook answer {status}"));
        op.finished = Some(OffsetDateTime::now_utc());
        op.error_status_code = status.to_string();
        op.error_message = "The publisher rejected the change".into();
        tracing::info!(subscription_id = %id, operation_id = %op_id, status, "change rejected by webhook answer");
    }
}

/// Customer/Microsoft-side events of the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    Suspend,
    Reinstate,
    Unsubscribe,
    Renew,
}

pub(crate) fn raise(shared: &Arc<Shared>, id: Uuid, event: Event) -> Result<Uuid, ApiError> {
    let (op_id, needs_window) = shared.mutate(|st| {
        let sub = st.subscriptions.get_mut(&id).ok_or_else(|| not_found(id))?;
        let require = |ok: bool, what: &str| {
            if ok {
                Ok(())
            } else {
                Err(ApiError::bad_request(format!(
                    "{what} is not possible while the subscription is {}",
                    wire_name(&sub.status)
                )))
            }
        };
        let status = sub.status;
        let (action, needs_window) = match event {
            Event::Suspend => {
                require(status == SubscriptionStatus::Subscribed, "Suspend")?;
                (Action::Suspend, false)
            }
            Event::Renew => {
                require(status == SubscriptionStatus::Subscribed, "Renew")?;
                (Action::Renew, false)
            }
            Event::Unsubscribe => {
                require(status != SubscriptionStatus::Unsubscribed, "Unsubscribe")?;
                (Action::Unsubscribe, false)
            }
            Event::Reinstate => {
                require(status == SubscriptionStatus::Suspended, "Reinstate")?;
                if sub.pending_operation().is_some() {
                    return Err(ApiError::bad_request(
                        "Subscription is locked due to pending operations",
                    ));
                }
                (Action::Reinstate, true)
            }
        };
        let mut op = new_operation(
            sub,
            action,
            OperationStatus::InProgress,
            RequestSource::Azure,
        );
        if !needs_window {
            // Notify-only: already done when the webhook leaves (§6.3).
            apply(shared, sub, &op);
            op.status = OperationStatus::Succeeded;
            op.resolution = Some("notify-only".into());
            op.finished = Some(OffsetDateTime::now_utc());
        }
        let op_id = op.id;
        sub.operations.push(op);
        if event == Event::Unsubscribe {
            // Pending changes die with the subscription.
            for pending in sub.operations.iter_mut().filter(|o| o.status.is_open()) {
                pending.status = OperationStatus::Failed;
                pending.resolution = Some("subscription unsubscribed".into());
                pending.finished = Some(OffsetDateTime::now_utc());
            }
        }
        webhooks::notify(shared, st, id, op_id);
        Ok((op_id, needs_window))
    })?;
    if needs_window {
        schedule_auto_accept(shared, id, op_id);
    }
    match event {
        Event::Renew => {
            if let Some(end) = shared.read(|st| st.subscriptions.get(&id).and_then(|s| s.term_end))
            {
                schedule_term_end(shared, id, end);
            }
        }
        Event::Suspend => {
            schedule_grace_end(shared, id, op_id, i64::from(super::SUSPENSION_GRACE_DAYS));
        }
        Event::Reinstate | Event::Unsubscribe => {}
    }
    tracing::info!(subscription_id = %id, operation_id = %op_id, ?event, "marketplace event");
    Ok(op_id)
}

/// After a restart from `--state-file`: re-arms activation, operation, term-end and grace
/// timers.
pub(crate) fn resume_timers(shared: &Arc<Shared>) {
    let (activations, operations) = shared.read(|st| {
        let mut activations = Vec::new();
        let mut operations = Vec::new();
        for sub in st.subscriptions.values() {
            if sub.activation_requested && sub.status == SubscriptionStatus::PendingFulfillmentStart
            {
                activations.push(sub.id);
            }
            match (sub.status, sub.term_end) {
                (SubscriptionStatus::Subscribed, Some(end)) => {
                    schedule_term_end(shared, sub.id, end);
                }
                (SubscriptionStatus::Suspended, _) => {
                    if let Some(suspend) = sub
                        .operations
                        .iter()
                        .rev()
                        .find(|o| o.action == Action::Suspend)
                    {
                        // Whole simulated days already spent in the grace period.
                        let spent = (OffsetDateTime::now_utc() - suspend.created).as_seconds_f64()
                            / shared
                                .config
                                .timings
                                .day
                                .as_secs_f64()
                                .max(f64::MIN_POSITIVE);
                        let left = i64::from(super::SUSPENSION_GRACE_DAYS) - spent as i64;
                        schedule_grace_end(shared, sub.id, suspend.id, left);
                    }
                }
                _ => {}
            }
            for op in sub.operations.iter().filter(|o| o.status.is_open()) {
                operations.push((sub.id, op.id, op.source));
            }
        }
        (activations, operations)
    });
    let timings = &shared.config.timings;
    for id in activations {
        shared.spawn_after(timings.activation_delay, move |shared| {
            complete_activation(shared, id)
        });
    }
    for (id, op_id, source) in operations {
        match source {
            RequestSource::Partner => schedule_partner_operation(shared, id, op_id),
            RequestSource::Azure => schedule_completion(shared, id, op_id, timings.ack_window),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchase_tokens_need_url_encoding() {
        for _ in 0..20 {
            let token = new_purchase_token();
            assert!(token.contains('+') && token.contains('/'), "{token}");
            assert_eq!(STANDARD.decode(&token).unwrap().len(), 48);
        }
    }
}
