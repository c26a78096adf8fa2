//! `GET /landing?token=…`: the landing page Microsoft sends the customer to after a
//! purchase or a "Manage account" click (docs/marketplace.md §4.1, §10.1), as onboarding.
//!
//! Nothing about the purchase is shown, and nothing is resolved or queued, before the
//! customer has signed in with Entra ID (any tenant): an unsigned visit — a link-preview
//! bot, `curl -I` — only sees a sign-in. After sign-in the token is resolved with
//! Microsoft and the page says where the purchase stands ([`LandingState`]), branded from
//! the `[web]` settings with the plan's display name from listAvailablePlans. A new
//! purchase is recorded and activated only by the deliberate `POST /landing/activate` (with
//! the ISV's onboarding questions), or right after sign-in when
//! `LANDING_ACTIVATE_AFTER_SIGN_IN` says so; never by a GET or HEAD of its own. Every
//! failure is a readable page that says what to do next.

use std::collections::HashMap;

use axum::Form;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::RETRY_AFTER;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use fulfillment_state_machine::{ActivationMode, StateName};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tracing::Instrument;

use super::auth::{MaybeCustomer, SignedInCustomer, Surface, sign_in_url};
use super::{Layout, MessagePage, SignedInAs};
use crate::http::AppState;
use crate::http::webhook::traceparent_or_new;
use crate::marketplace::{
    AadIdentifier, CallContext, Error as MarketplaceError, ResolvedSubscription, SubscriptionStatus,
};
use crate::queue::{InboundMessage, InboxKey, MessageMeta};
use crate::settings::OnboardingField;
use crate::store::{onboarding, subscriptions};

/// Longest wait for Microsoft's Resolve (with the client's retries); leaves room for the
/// publish under the router's [`crate::http::REQUEST_TIMEOUT`].
const RESOLVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(4);

/// Longest answer to one onboarding question.
pub const MAX_ANSWER_CHARS: usize = 200;

const REOPEN_HINT: &str = "Please reopen the subscription from the Azure portal or Microsoft 365 \
     admin center and click Configure account: that gives this page a fresh link.";

#[derive(Debug, Deserialize)]
pub struct LandingQuery {
    token: Option<String>,
    /// `activating` after the activation form was posted.
    step: Option<String>,
}

/// What the page says, decided from our record and Microsoft's status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LandingState {
    /// Bought, not yet recorded here: the activation form.
    NewPurchase,
    /// Recorded, waiting for activation (the page refreshes itself).
    ActivationPending,
    /// Active right after this customer activated it.
    Active,
    /// Active, and the customer came back ("Manage account").
    Returning,
    Suspended,
    Cancelled,
    /// Microsoft reported a status we do not know.
    Unknown,
}

/// The page's state: our record wins over Microsoft's status, which is all there is
/// before the purchase is recorded. `activating`: the customer just posted the form.
pub fn landing_state(
    ours: Option<StateName>,
    microsoft: Option<&SubscriptionStatus>,
    activating: bool,
) -> LandingState {
    match ours {
        Some(StateName::PendingFulfillment) => LandingState::ActivationPending,
        Some(StateName::Subscribed) if activating => LandingState::Active,
        Some(StateName::Subscribed) => LandingState::Returning,
        Some(StateName::Suspended) => LandingState::Suspended,
        Some(StateName::Unsubscribed) => LandingState::Cancelled,
        None => match microsoft {
            Some(SubscriptionStatus::NotStarted | SubscriptionStatus::PendingFulfillmentStart) => {
                if activating {
                    LandingState::ActivationPending
                } else {
                    LandingState::NewPurchase
                }
            }
            Some(SubscriptionStatus::Subscribed) if activating => LandingState::Active,
            Some(SubscriptionStatus::Subscribed) => LandingState::Returning,
            Some(SubscriptionStatus::Suspended) => LandingState::Suspended,
            Some(SubscriptionStatus::Unsubscribed) => LandingState::Cancelled,
            Some(SubscriptionStatus::Unknown(_)) | None => LandingState::Unknown,
        },
    }
}

/// The activation form.
#[derive(Debug)]
pub struct ActivateForm {
    pub token: String,
    pub fields: Vec<OnboardingField>,
    pub button: &'static str,
}

#[derive(Debug, askama::Template, askama_web::WebTemplate)]
#[template(path = "landing.html")]
pub struct LandingPage {
    pub layout: Layout,
    pub heading: String,
    pub status_label: &'static str,
    pub status_class: &'static str,
    pub message: Vec<String>,
    pub refresh: bool,
    pub open_product: Option<(String, String)>,
    pub activate: Option<ActivateForm>,
    pub facts: Vec<(&'static str, String)>,
}

fn layout_for(state: &AppState, customer: Option<&SignedInCustomer>) -> Layout {
    state.web.layout(
        "",
        customer.map(|c| SignedInAs {
            surface: Surface::Customer,
            name: c.email.clone().unwrap_or_else(|| c.name.clone()),
            csrf: c.csrf.clone(),
        }),
    )
}

fn message_page(
    state: &AppState,
    customer: Option<&SignedInCustomer>,
    status: StatusCode,
    title: &str,
    paragraphs: Vec<String>,
    link: Option<(String, String)>,
) -> Response {
    MessagePage {
        layout: layout_for(state, customer),
        title: title.to_owned(),
        paragraphs,
        link,
    }
    .with_status(status)
}

/// `/landing?token=…` for a token (encoded once).
fn landing_path(token: &str, step: Option<&str>) -> String {
    let mut query = url::form_urlencoded::Serializer::new(String::new());
    query.append_pair("token", token);
    if let Some(step) = step {
        query.append_pair("step", step);
    }
    format!("/landing?{}", query.finish())
}

/// `GET /landing` (and HEAD, which axum answers with the same handler, body dropped).
pub async fn landing(
    State(state): State<AppState>,
    method: Method,
    headers: HeaderMap,
    MaybeCustomer(customer): MaybeCustomer,
    query: Result<Query<LandingQuery>, QueryRejection>,
) -> Response {
    let (token, step) = match query {
        Ok(Query(LandingQuery { token, step })) => (token, step),
        Err(_) => (None, None),
    };
    let Some(token) = token.as_deref().and_then(purchase_token) else {
        return message_page(
            &state,
            customer.as_ref(),
            StatusCode::BAD_REQUEST,
            "This link is missing its purchase token",
            vec![
                "This page is opened by Microsoft with a purchase token in the link, and this \
                 link has none."
                    .into(),
                REOPEN_HINT.into(),
            ],
            None,
        );
    };
    let Some(customer) = customer else {
        // Not signed in: nothing is resolved, queued or shown.
        let product = &state.web.branding.product_name;
        return message_page(
            &state,
            None,
            StatusCode::OK,
            &format!("Sign in to set up {product}"),
            vec![
                format!(
                    "Thank you for choosing {product}. Please sign in with your work or school \
                     Microsoft account to see your purchase and activate it."
                ),
                "Nothing is activated until you confirm it after signing in.".into(),
            ],
            Some((
                sign_in_url(Surface::Customer, &landing_path(&token, None)),
                "Sign in with Microsoft".into(),
            )),
        );
    };
    let activating = step.as_deref() == Some("activating");
    let ctx = CallContext::random();
    let span = tracing::info_span!(
        "landing",
        correlation_id = %ctx.correlation_id,
        subscription_id = tracing::field::Empty,
    );
    async move {
        let resolved = match resolve(&state, &ctx, &token).await {
            Ok(resolved) => resolved,
            Err(failure) => return failure.page(&state, Some(&customer)),
        };
        let (resolved, plan_name) = with_plan_details(&state, &ctx, resolved).await;
        let known = match subscriptions::find(&state.pool, resolved.id).await {
            Ok(record) => record.and_then(|r| r.state_name()),
            Err(error) => {
                tracing::warn!(error = %error, "cannot read the subscription's state");
                None
            }
        };
        let microsoft = resolved
            .subscription
            .as_ref()
            .and_then(|s| s.status.as_ref());
        let mut view = landing_state(known, microsoft, activating);
        // Record what is already live at Microsoft (nothing to activate, nothing billed
        // anew); a new purchase waits for the form, or for sign-in when so configured.
        let queue = match view {
            LandingState::NewPurchase => state.web.activate_after_sign_in && method == Method::GET,
            _ => known.is_none() && !activating,
        };
        if queue {
            if let Err(page) = queue_resolution(&state, &resolved, &ctx, &headers).await {
                return page(&state, Some(&customer));
            }
            if view == LandingState::NewPurchase {
                tracing::info!("activation requested by sign-in (LANDING_ACTIVATE_AFTER_SIGN_IN)");
                view = LandingState::ActivationPending;
            }
        }
        tracing::info!(state = ?view, "landing page shown to a signed-in customer");
        render(&state, &customer, &resolved, plan_name, view, &token).into_response()
    }
    .instrument(span)
    .await
}

#[derive(Debug, Deserialize)]
pub struct ActivateFormBody {
    token: Option<String>,
    #[serde(flatten)]
    rest: HashMap<String, String>,
}

/// `POST /landing/activate`: the customer confirms; the purchase is queued for the workers
/// (who record it and, unless activation is manual, activate it) with the answers to the
/// onboarding questions. CSRF-checked by [`super::auth::verify_csrf`].
pub async fn activate(
    State(state): State<AppState>,
    headers: HeaderMap,
    customer: SignedInCustomer,
    Form(form): Form<ActivateFormBody>,
) -> Response {
    let Some(token) = form.token.as_deref().and_then(purchase_token) else {
        return message_page(
            &state,
            Some(&customer),
            StatusCode::BAD_REQUEST,
            "This form is missing its purchase token",
            vec![REOPEN_HINT.into()],
            None,
        );
    };
    let answers = match onboarding_answers(&state.web.onboarding_fields, &form.rest) {
        Ok(answers) => answers,
        Err(problem) => {
            return message_page(
                &state,
                Some(&customer),
                StatusCode::UNPROCESSABLE_ENTITY,
                "Please check your answers",
                vec![problem],
                Some((landing_path(&token, None), "Back to the form".into())),
            );
        }
    };
    let ctx = CallContext::random();
    let span = tracing::info_span!(
        "landing_activate",
        correlation_id = %ctx.correlation_id,
        subscription_id = tracing::field::Empty,
    );
    async move {
        let resolved = match resolve(&state, &ctx, &token).await {
            Ok(resolved) => resolved,
            Err(failure) => return failure.page(&state, Some(&customer)),
        };
        let answers = Value::Object(answers);
        if let Err(error) = onboarding::record(
            &state.pool,
            &onboarding::NewAnswers {
                subscription_id: resolved.id,
                answers: &answers,
                object_id: &customer.object_id,
                tenant_id: &customer.tenant_id,
                email: customer.email.as_deref(),
            },
        )
        .await
        {
            tracing::error!(error = %error, "cannot store the onboarding answers");
            return unavailable(&state, Some(&customer));
        }
        let (resolved, _) = with_plan_details(&state, &ctx, resolved).await;
        if let Err(page) = queue_resolution(&state, &resolved, &ctx, &headers).await {
            return page(&state, Some(&customer));
        }
        tracing::info!(object_id = %customer.object_id, "customer asked to activate");
        Redirect::to(&landing_path(&token, Some("activating"))).into_response()
    }
    .instrument(span)
    .await
}

/// The answers to the configured questions (`field_<name>` in the form), trimmed; unknown
/// fields are ignored, over-long answers refused.
pub fn onboarding_answers(
    fields: &[OnboardingField],
    posted: &HashMap<String, String>,
) -> Result<serde_json::Map<String, Value>, String> {
    let mut answers = serde_json::Map::new();
    for field in fields {
        let value = posted
            .get(&format!("field_{}", field.name))
            .map(|v| v.trim())
            .unwrap_or("");
        if value.chars().count() > MAX_ANSWER_CHARS {
            return Err(format!(
                "\"{}\" is too long: at most {MAX_ANSWER_CHARS} characters.",
                field.label
            ));
        }
        if !value.is_empty() {
            answers.insert(field.name.clone(), json!(value));
        }
    }
    Ok(answers)
}

/// A page builder for a failure (it needs the customer for the header).
type FailurePage = fn(&AppState, Option<&SignedInCustomer>) -> Response;

/// Microsoft's Resolve of the purchase token; the subscription it names is recorded on the
/// current span.
async fn resolve(
    state: &AppState,
    ctx: &CallContext,
    token: &str,
) -> Result<ResolvedSubscription, ResolveFailure> {
    // Inside the router's 10 s timeout, so the customer gets a page, not a bare 503.
    let resolve = state.marketplace.resolve(ctx, token);
    match tokio::time::timeout(RESOLVE_DEADLINE, resolve).await {
        Ok(Ok(response)) => {
            let resolved = response.into_value();
            // The caller's span (`landing`, `landing_activate`) is about this subscription.
            tracing::Span::current()
                .record("subscription_id", tracing::field::display(resolved.id));
            Ok(resolved)
        }
        Ok(Err(error)) => Err(resolve_failure(&error)),
        Err(_) => {
            tracing::warn!(deadline = ?RESOLVE_DEADLINE, "Resolve took too long");
            Err(ResolveFailure::Unavailable)
        }
    }
}

/// Why Resolve failed, as the customer needs to know it.
enum ResolveFailure {
    InvalidToken(Option<String>),
    Unavailable,
}

impl ResolveFailure {
    fn page(self, state: &AppState, customer: Option<&SignedInCustomer>) -> Response {
        match self {
            ResolveFailure::Unavailable => unavailable(state, customer),
            ResolveFailure::InvalidToken(reason) => {
                let mut paragraphs = vec![
                    "We could not confirm your purchase with this link: its purchase token is \
                     invalid or has expired (Microsoft's tokens are valid for 24 hours)."
                        .to_string(),
                ];
                if let Some(reason) = reason {
                    paragraphs.push(format!("Microsoft said: \u{201c}{reason}\u{201d}"));
                }
                paragraphs.push(REOPEN_HINT.into());
                message_page(
                    state,
                    customer,
                    StatusCode::BAD_REQUEST,
                    "This link has expired or is not valid",
                    paragraphs,
                    None,
                )
            }
        }
    }
}

fn resolve_failure(error: &MarketplaceError) -> ResolveFailure {
    match error {
        // 400: token malformed, invalid or expired (§4.1); 404 is the spec's variant.
        MarketplaceError::Permanent { .. } if error.status() == Some(400) => {
            tracing::info!(error = %error, "purchase token refused by Microsoft");
            ResolveFailure::InvalidToken(microsoft_message(error.body()))
        }
        MarketplaceError::NotFound { .. } | MarketplaceError::InvalidInput { .. } => {
            tracing::info!(error = %error, "purchase token refused");
            ResolveFailure::InvalidToken(microsoft_message(error.body()))
        }
        MarketplaceError::Transient { .. } | MarketplaceError::Throttled { .. } => {
            tracing::warn!(error = %error, "cannot resolve the purchase token");
            ResolveFailure::Unavailable
        }
        _ => {
            // Our credentials or configuration: the customer can only retry later.
            tracing::error!(error = %error, "cannot resolve the purchase token");
            ResolveFailure::Unavailable
        }
    }
}

fn unavailable(state: &AppState, customer: Option<&SignedInCustomer>) -> Response {
    let mut response = message_page(
        state,
        customer,
        StatusCode::SERVICE_UNAVAILABLE,
        "We could not confirm your purchase just now",
        vec![
            "Microsoft's marketplace or our service is briefly unavailable. Your purchase is \
             safe. Please retry in a minute by reloading this page."
                .into(),
        ],
        None,
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("60"));
    response
}

/// Microsoft's own explanation, when its error body carries one.
fn microsoft_message(body: Option<&str>) -> Option<String> {
    let value: Value = serde_json::from_str(body?).ok()?;
    let message = value
        .get("message")
        .or_else(|| value.get("error").and_then(|e| e.get("message")))
        .and_then(Value::as_str)?
        .trim();
    (!message.is_empty()).then(|| message.chars().take(300).collect())
}

/// Longest wait for the purchased plan's details: the page must not wait on them.
const PLAN_DETAILS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The resolved subscription with the private offer it came through, and the plan's
/// display name, both of which Microsoft reports only on the purchased plan
/// (`listAvailablePlans?planId=`, §4.5, §10.3). Best effort: without an answer the page
/// shows the plan id and the purchase is queued with the offer unknown.
async fn with_plan_details(
    state: &AppState,
    ctx: &CallContext,
    mut resolved: ResolvedSubscription,
) -> (ResolvedSubscription, Option<String>) {
    let plan_id = resolved
        .subscription
        .as_ref()
        .and_then(|s| s.plan_id.clone())
        .or_else(|| resolved.plan_id.clone());
    let Some(plan_id) = plan_id else {
        return (resolved, None);
    };
    let lookup = state
        .marketplace
        .list_available_plans(ctx, resolved.id, Some(&plan_id));
    let mut display_name = None;
    match tokio::time::timeout(PLAN_DETAILS_DEADLINE, lookup).await {
        Ok(Ok(plans)) => {
            let plans: Vec<_> = plans
                .into_value()
                .into_iter()
                .filter(|plan| plan.plan_id.as_deref() == Some(plan_id.as_str()))
                .collect();
            display_name = plans
                .iter()
                .find_map(|p| p.display_name.clone())
                .filter(|n| !n.trim().is_empty());
            if let Some(subscription) = resolved.subscription.as_mut() {
                subscription.source_offers = plans
                    .into_iter()
                    .flat_map(|plan| plan.source_offers)
                    .collect();
            }
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the purchased plan's details");
        }
        Err(_) => tracing::warn!("the purchased plan's details took too long"),
    }
    (resolved, display_name)
}

/// Queues the resolution for the workers; a failure is the "retry in a minute" page, since
/// the purchase must not be shown as received when nobody will act on it.
async fn queue_resolution(
    state: &AppState,
    resolved: &ResolvedSubscription,
    ctx: &CallContext,
    headers: &HeaderMap,
) -> Result<(), FailurePage> {
    let subscription = match &resolved.subscription {
        Some(subscription) => serde_json::to_string(subscription),
        // Resolve without the nested object: hand over what it did say.
        None => serde_json::to_string(&json!({
            "id": resolved.id,
            "name": resolved.subscription_name,
            "offerId": resolved.offer_id,
            "planId": resolved.plan_id,
            "quantity": resolved.quantity,
        })),
    }
    .map_err(|e| {
        tracing::error!(error = %e, "cannot serialize the resolved subscription");
        unavailable as FailurePage
    })?;
    let now = OffsetDateTime::now_utc();
    let message = InboundMessage::PurchaseResolved {
        resolved_at: now,
        subscription,
    };
    let meta = MessageMeta {
        message_id: InboxKey::purchase_resolved(resolved.id, now).into_message_id(),
        correlation_id: ctx.correlation_id.to_string(),
        traceparent: Some(traceparent_or_new(headers)),
        subscription_id: Some(resolved.id),
    };
    state.publish(&message, &meta).await.map_err(|error| {
        tracing::warn!(error = %error, "purchase resolution not queued; answering 503");
        unavailable as FailurePage
    })
}

fn render(
    state: &AppState,
    customer: &SignedInCustomer,
    resolved: &ResolvedSubscription,
    plan_name: Option<String>,
    view: LandingState,
    token: &str,
) -> LandingPage {
    let branding = &state.web.branding;
    let product = branding.product_name.as_str();
    let manual = state.config.activation == ActivationMode::Manual;
    let subscription = resolved.subscription.as_ref();
    let plan_id = resolved
        .plan_id
        .as_deref()
        .or_else(|| subscription.and_then(|s| s.plan_id.as_deref()));
    let plan = match (&plan_name, plan_id) {
        (Some(name), _) => name.clone(),
        (None, Some(id)) => id.to_owned(),
        (None, None) => "your plan".to_owned(),
    };
    let open_product = branding
        .product_url
        .as_ref()
        .map(|url| (url.to_string(), format!("Open {product}")));
    let (heading, status_label, status_class, message, refresh, open, form) = match view {
        LandingState::NewPurchase => (
            format!("Welcome to {product}"),
            "Not active yet",
            "pending",
            vec![
                format!("Thank you for buying {product} ({plan})."),
                if manual {
                    "Confirm below and we will set up your account; you will hear from us, and \
                     billing starts only once your subscription is active."
                        .to_string()
                } else {
                    "Confirm below to activate your subscription. Billing starts once it is \
                     active."
                        .to_string()
                },
            ],
            false,
            None,
            Some(ActivateForm {
                token: token.to_owned(),
                fields: state.web.onboarding_fields.clone(),
                button: if manual {
                    "Confirm my purchase"
                } else {
                    "Activate my subscription"
                },
            }),
        ),
        LandingState::ActivationPending => (
            if manual {
                "Your purchase is confirmed".to_string()
            } else {
                "We are activating your subscription".to_string()
            },
            "Activation pending",
            "pending",
            vec![if manual {
                format!(
                    "We are setting up your {product} account and will contact you when it is \
                     ready. Billing starts only then."
                )
            } else {
                "This usually takes less than a minute. Billing starts once it is active."
                    .to_string()
            }],
            true,
            None,
            None,
        ),
        LandingState::Active => (
            "You are all set".to_string(),
            "Active",
            "active",
            vec![format!(
                "Your subscription to {product} ({plan}) is active."
            )],
            false,
            open_product,
            None,
        ),
        LandingState::Returning => (
            "Welcome back".to_string(),
            "Active",
            "active",
            vec![
                format!("Your subscription to {product} ({plan}) is active."),
                "To change the plan or the number of seats, or to cancel, use the Azure portal \
                 or the Microsoft 365 admin center."
                    .to_string(),
            ],
            false,
            open_product,
            None,
        ),
        LandingState::Suspended => (
            "Your subscription is suspended".to_string(),
            "Suspended",
            "suspended",
            vec![
                format!(
                    "Your subscription to {product} is suspended, usually because a payment \
                     failed."
                ),
                "Update your payment method in the Azure portal or the Microsoft 365 admin \
                 center to restore it."
                    .to_string(),
            ],
            false,
            None,
            None,
        ),
        LandingState::Cancelled => (
            "This subscription has ended".to_string(),
            "Cancelled",
            "ended",
            vec![format!(
                "Your subscription to {product} was cancelled. To use {product} again, buy it \
                 again from the marketplace."
            )],
            false,
            None,
            None,
        ),
        LandingState::Unknown => (
            "We are confirming your purchase".to_string(),
            "Being confirmed",
            "pending",
            vec![
                "We have received your purchase and are confirming its status with Microsoft."
                    .to_string(),
            ],
            true,
            None,
            None,
        ),
    };
    LandingPage {
        layout: layout_for(state, Some(customer)),
        heading,
        status_label,
        status_class,
        message,
        refresh,
        open_product: open,
        activate: form,
        facts: facts(resolved, plan_name),
    }
}

/// The purchase as the signed-in customer sees it.
fn facts(
    resolved: &ResolvedSubscription,
    plan_name: Option<String>,
) -> Vec<(&'static str, String)> {
    let subscription = resolved.subscription.as_ref();
    let mut facts = Vec::new();
    if let Some(name) = resolved
        .subscription_name
        .as_deref()
        .or_else(|| subscription.and_then(|s| s.name.as_deref()))
    {
        facts.push(("Subscription", name.to_owned()));
    }
    let plan_id = resolved
        .plan_id
        .as_deref()
        .or_else(|| subscription.and_then(|s| s.plan_id.as_deref()));
    match (plan_name, plan_id) {
        (Some(name), _) => facts.push(("Plan", name)),
        (None, Some(id)) => facts.push(("Plan", id.to_owned())),
        _ => {}
    }
    if let Some(quantity) = resolved
        .quantity
        .or_else(|| subscription.and_then(|s| s.quantity))
    {
        facts.push(("Seats", quantity.to_string()));
    }
    if let Some(purchaser) = identity(subscription.and_then(|s| s.purchaser.as_ref())) {
        facts.push(("Purchased by", purchaser));
    }
    // The private offer the purchase came through (`sourceOffers[].externalId`, §15.3).
    if let Some(private_offer) = subscription
        .into_iter()
        .flat_map(|s| s.source_offers.iter())
        .find_map(|o| o.external_id.as_deref().filter(|id| !id.trim().is_empty()))
    {
        facts.push(("Private offer", private_offer.to_owned()));
    }
    facts.push(("Subscription id", resolved.id.to_string()));
    facts
}

fn identity(identity: Option<&AadIdentifier>) -> Option<String> {
    identity?
        .email_id
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
}

/// The purchase token from the decoded query value. `Query` has percent-decoded it exactly
/// once (P1). A purchase token never holds a space, so a space can only be a literal `+`
/// that arrived unencoded and was read as form-encoding's space: it is put back before
/// surrounding whitespace is trimmed (a token may begin or end with `+`), and nothing is
/// decoded again.
fn purchase_token(decoded: &str) -> Option<String> {
    let token = decoded.replace(' ', "+");
    let token = token.trim();
    (!token.is_empty()).then(|| token.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_plus_is_restored_even_at_the_ends_of_the_token() {
        assert_eq!(purchase_token(" ab cd/ef ").as_deref(), Some("+ab+cd/ef+"));
        assert_eq!(purchase_token("ab+cd/ef=").as_deref(), Some("ab+cd/ef="));
        assert_eq!(purchase_token("\tab\n").as_deref(), Some("ab"));
        assert_eq!(purchase_token(""), None);
    }

    #[test]
    fn the_landing_link_encodes_the_token_once() {
        assert_eq!(landing_path("a+b/c=", None), "/landing?token=a%2Bb%2Fc%3D");
        assert_eq!(
            landing_path("t", Some("activating")),
            "/landing?token=t&step=activating"
        );
    }

    #[test]
    fn microsoft_messages_are_extracted_from_error_bodies() {
        assert_eq!(
            microsoft_message(Some(r#"{"message":"The marketplace token has expired"}"#))
                .as_deref(),
            Some("The marketplace token has expired")
        );
        assert_eq!(
            microsoft_message(Some(r#"{"error":{"message":"bad"}}"#)).as_deref(),
            Some("bad")
        );
        assert_eq!(microsoft_message(Some("<html>")), None);
        assert_eq!(microsoft_message(None), None);
    }

    #[test]
    fn the_page_state_prefers_our_record_and_knows_a_fresh_activation() {
        use LandingState::*;
        use SubscriptionStatus as Ms;
        let pending = Ms::PendingFulfillmentStart;
        assert_eq!(landing_state(None, Some(&pending), false), NewPurchase);
        assert_eq!(landing_state(None, Some(&pending), true), ActivationPending);
        assert_eq!(
            landing_state(
                Some(StateName::PendingFulfillment),
                Some(&Ms::Subscribed),
                false
            ),
            ActivationPending
        );
        assert_eq!(
            landing_state(Some(StateName::Subscribed), None, true),
            Active
        );
        assert_eq!(
            landing_state(Some(StateName::Subscribed), None, false),
            Returning
        );
        assert_eq!(landing_state(None, Some(&Ms::Subscribed), false), Returning);
        assert_eq!(
            landing_state(Some(StateName::Suspended), Some(&Ms::Subscribed), false),
            Suspended
        );
        assert_eq!(
            landing_state(None, Some(&Ms::Unsubscribed), false),
            Cancelled
        );
        assert_eq!(
            landing_state(None, Some(&Ms::Unknown("x".into())), false),
            Unknown
        );
        assert_eq!(landing_state(None, None, false), Unknown);
    }

    #[test]
    fn onboarding_answers_keep_configured_fields_only_and_refuse_long_ones() {
        let fields = vec![
            OnboardingField {
                name: "company".into(),
                label: "Company".into(),
            },
            OnboardingField {
                name: "contact".into(),
                label: "Contact e-mail".into(),
            },
        ];
        let posted: HashMap<String, String> = [
            ("field_company".to_string(), "  Contoso ".to_string()),
            ("field_other".to_string(), "x".to_string()),
            ("csrf".to_string(), "t".to_string()),
        ]
        .into();
        let answers = onboarding_answers(&fields, &posted).unwrap();
        assert_eq!(Value::Object(answers), json!({"company": "Contoso"}));
        let long: HashMap<String, String> = [(
            "field_contact".to_string(),
            "x".repeat(MAX_ANSWER_CHARS + 1),
        )]
        .into();
        assert!(
            onboarding_answers(&fields, &long)
                .unwrap_err()
                .contains("Contact e-mail")
        );
    }
}
