//! `GET /landing?token=…`: the landing page Microsoft sends the customer to after a
//! purchase or a "Manage account" click (docs/marketplace.md §4.1, §10.1).
//!
//! The token is resolved with Microsoft, the resolution is queued for the workers (who
//! record the purchase and, unless activation is manual, activate it), and the customer
//! sees what they bought and where it stands. Every failure is a readable page that says
//! what to do next; nothing raw ever reaches the customer. All text is HTML-escaped.

use std::fmt::Write as _;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header::{CACHE_CONTROL, REFERRER_POLICY, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use fulfillment_state_machine::{ActivationMode, StateName};
use serde::Deserialize;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tracing::Instrument;
use uuid::Uuid;

use super::state::AppState;
use super::webhook::traceparent_or_new;
use crate::marketplace::{
    AadIdentifier, CallContext, Error as MarketplaceError, ResolvedSubscription, SubscriptionStatus,
};
use crate::queue::{InboundMessage, InboxKey, MessageMeta};
use crate::store::subscriptions;

/// Longest wait for Microsoft's Resolve (with the client's retries); leaves room for the
/// publish under the router's [`super::REQUEST_TIMEOUT`].
const RESOLVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(4);

const REOPEN_HINT: &str = "Please reopen the subscription from the Azure portal or Microsoft 365 \
     admin center and click Configure account: that gives this page a fresh link.";

#[derive(Debug, Deserialize)]
pub struct LandingQuery {
    token: Option<String>,
}

/// `GET /landing`.
pub async fn landing(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<LandingQuery>, QueryRejection>,
) -> Response {
    let token = match query {
        Ok(Query(LandingQuery { token })) => token,
        Err(_) => None,
    };
    let token = token.as_deref().and_then(purchase_token);
    let Some(token) = token else {
        return page(
            StatusCode::BAD_REQUEST,
            "This link is missing its purchase token",
            &format!(
                "<p>This page is opened by Microsoft with a purchase token in the link, and \
                 this link has none.</p><p>{}</p>",
                escape(REOPEN_HINT)
            ),
        );
    };
    let ctx = CallContext::random();
    let span = tracing::info_span!(
        "landing",
        correlation_id = %ctx.correlation_id,
        subscription_id = tracing::field::Empty,
    );
    async move {
        // Inside the router's 10 s timeout, so the customer gets this page, not a bare 503.
        let resolve = state.marketplace.resolve(&ctx, &token);
        let resolved = match tokio::time::timeout(RESOLVE_DEADLINE, resolve).await {
            Ok(Ok(response)) => response.into_value(),
            Ok(Err(error)) => return resolve_failure_page(&error),
            Err(_) => {
                tracing::warn!(deadline = ?RESOLVE_DEADLINE, "Resolve took too long");
                return unavailable_page();
            }
        };
        let subscription_id = resolved.id;
        tracing::Span::current()
            .record("subscription_id", tracing::field::display(subscription_id));
        let resolved = with_source_offers(&state, &ctx, resolved).await;
        if let Err(page) = queue_resolution(&state, &resolved, &ctx, &headers).await {
            return page;
        }
        let known_state = match subscriptions::find(&state.pool, subscription_id).await {
            Ok(record) => record.and_then(|r| r.state_name()),
            Err(error) => {
                // The page can still tell what Microsoft says; the purchase is queued.
                tracing::warn!(error = %error, "cannot read the subscription's state");
                None
            }
        };
        tracing::info!(%subscription_id, "landing page resolved a purchase");
        subscription_page(&resolved, known_state, state.config.activation)
    }
    .instrument(span)
    .await
}

/// Longest wait for the purchased plan's `sourceOffers`: the page must not wait on it.
const SOURCE_OFFERS_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// The resolved subscription with the private offer it came through, which Microsoft
/// reports only on the purchased plan (`listAvailablePlans?planId=`, §4.5, §10.3). Best
/// effort: without an answer the purchase is queued as resolved, the offer unknown.
async fn with_source_offers(
    state: &AppState,
    ctx: &CallContext,
    mut resolved: ResolvedSubscription,
) -> ResolvedSubscription {
    let Some(subscription) = resolved.subscription.as_mut() else {
        return resolved;
    };
    let Some(plan_id) = subscription.plan_id.clone() else {
        return resolved;
    };
    let lookup = state
        .marketplace
        .list_available_plans(ctx, resolved.id, Some(&plan_id));
    match tokio::time::timeout(SOURCE_OFFERS_DEADLINE, lookup).await {
        Ok(Ok(plans)) => {
            subscription.source_offers = plans
                .into_value()
                .into_iter()
                .filter(|plan| plan.plan_id.as_deref() == Some(plan_id.as_str()))
                .flat_map(|plan| plan.source_offers)
                .collect();
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "cannot read the purchased plan's private offer");
        }
        Err(_) => tracing::warn!("the purchased plan's private offer took too long"),
    }
    resolved
}

/// Queues the resolution for the workers; a failure is the "retry in a minute" page, since
/// the purchase must not be shown as received when nobody will act on it.
async fn queue_resolution(
    state: &AppState,
    resolved: &ResolvedSubscription,
    ctx: &CallContext,
    headers: &HeaderMap,
) -> Result<(), Response> {
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
        unavailable_page()
    })?;
    let now = OffsetDateTime::now_utc();
    let message = InboundMessage::PurchaseResolved {
        resolved_at: now,
        subscription,
    };
    let meta = MessageMeta {
        message_id: InboxKey::purchase_resolved(resolved.id, now)
            .message_id()
            .to_owned(),
        correlation_id: ctx.correlation_id.to_string(),
        traceparent: Some(traceparent_or_new(headers)),
        subscription_id: Some(resolved.id),
    };
    state.publish(&message, &meta).await.map_err(|error| {
        tracing::warn!(error = %error, "purchase resolution not queued; answering 503");
        unavailable_page()
    })
}

fn resolve_failure_page(error: &MarketplaceError) -> Response {
    match error {
        // 400: token malformed, invalid or expired (§4.1); 404 is the spec's variant.
        MarketplaceError::Permanent { .. } if error.status() == Some(400) => {
            tracing::info!(error = %error, "purchase token refused by Microsoft");
            invalid_token_page(microsoft_message(error.body()))
        }
        MarketplaceError::NotFound { .. } | MarketplaceError::InvalidInput { .. } => {
            tracing::info!(error = %error, "purchase token refused");
            invalid_token_page(microsoft_message(error.body()))
        }
        MarketplaceError::Transient { .. } | MarketplaceError::Throttled { .. } => {
            tracing::warn!(error = %error, "cannot resolve the purchase token");
            unavailable_page()
        }
        _ => {
            // Our credentials or configuration: the customer can only retry later.
            tracing::error!(error = %error, "cannot resolve the purchase token");
            unavailable_page()
        }
    }
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

fn invalid_token_page(reason: Option<String>) -> Response {
    let reason = reason
        .map(|r| format!("<p>Microsoft said: <q>{}</q></p>", escape(&r)))
        .unwrap_or_default();
    page(
        StatusCode::BAD_REQUEST,
        "This link has expired or is not valid",
        &format!(
            "<p>We could not confirm your purchase with this link: its purchase token is \
             invalid or has expired (Microsoft's tokens are valid for 24 hours).</p>{reason}\
             <p>{}</p>",
            escape(REOPEN_HINT)
        ),
    )
}

fn unavailable_page() -> Response {
    let mut response = page(
        StatusCode::SERVICE_UNAVAILABLE,
        "We could not confirm your purchase just now",
        "<p>Microsoft's marketplace or our service is briefly unavailable. Your purchase is \
         safe. Please retry in a minute by reloading this page.</p>",
    );
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("60"));
    response
}

/// How the page names a state, and what it tells the customer about it.
fn describe(state: StateName, activation: ActivationMode) -> (&'static str, &'static str) {
    match (state, activation) {
        (StateName::PendingFulfillment, ActivationMode::Automatic) => (
            "activation pending",
            "We have received your purchase and are activating it now; this usually takes \
             less than a minute. Billing starts once it is active.",
        ),
        (StateName::PendingFulfillment, ActivationMode::Manual) => (
            "activation pending",
            "We have received your purchase. Activation waits for the publisher to finish \
             setting up your account; you will hear from them, and billing starts only then.",
        ),
        (StateName::Subscribed, _) => (
            "active",
            "Your subscription is active. You can manage it from the Azure portal or \
             Microsoft 365 admin center.",
        ),
        (StateName::Suspended, _) => (
            "suspended",
            "Your subscription is suspended, usually because a payment failed. Update your \
             payment method in the Azure portal or Microsoft 365 admin center to restore it.",
        ),
        (StateName::Unsubscribed, _) => (
            "ended",
            "This subscription has ended. Buy it again from the marketplace to start a new one.",
        ),
    }
}

fn subscription_page(
    resolved: &ResolvedSubscription,
    known_state: Option<StateName>,
    activation: ActivationMode,
) -> Response {
    let subscription = resolved.subscription.as_ref();
    let microsoft_status = subscription.and_then(|s| s.status.as_ref());
    let state = known_state.or_else(|| {
        microsoft_status.and_then(|status| match status {
            SubscriptionStatus::NotStarted | SubscriptionStatus::PendingFulfillmentStart => {
                Some(StateName::PendingFulfillment)
            }
            SubscriptionStatus::Subscribed => Some(StateName::Subscribed),
            SubscriptionStatus::Suspended => Some(StateName::Suspended),
            SubscriptionStatus::Unsubscribed => Some(StateName::Unsubscribed),
            SubscriptionStatus::Unknown(_) => None,
        })
    });
    let (state_label, state_text) = match state {
        Some(state) => describe(state, activation),
        None => (
            "being confirmed",
            "We have received your purchase and are confirming its status with Microsoft.",
        ),
    };
    let offer = resolved
        .offer_id
        .as_deref()
        .or_else(|| subscription.and_then(|s| s.offer_id.as_deref()));
    let plan = resolved
        .plan_id
        .as_deref()
        .or_else(|| subscription.and_then(|s| s.plan_id.as_deref()));
    let quantity = resolved
        .quantity
        .or_else(|| subscription.and_then(|s| s.quantity));
    let name = resolved
        .subscription_name
        .as_deref()
        .or_else(|| subscription.and_then(|s| s.name.as_deref()));

    let mut rows = String::new();
    let mut row = |label: &str, value: &str| {
        let _ = write!(
            rows,
            "<tr><th scope=\"row\">{}</th><td>{}</td></tr>",
            escape(label),
            escape(value)
        );
    };
    row("Subscription", name.unwrap_or("(unnamed)"));
    row("Subscription id", &resolved.id.to_string());
    row("Offer", offer.unwrap_or("(unknown)"));
    row("Plan", plan.unwrap_or("(unknown)"));
    if let Some(quantity) = quantity {
        row("Quantity", &quantity.to_string());
    }
    row(
        "Purchaser",
        &identity(subscription.and_then(|s| s.purchaser.as_ref())),
    );
    row(
        "Beneficiary",
        &identity(subscription.and_then(|s| s.beneficiary.as_ref())),
    );
    // The private offer the purchase came through (`sourceOffers[].externalId`, §15.3).
    if let Some(private_offer) = subscription
        .into_iter()
        .flat_map(|s| s.source_offers.iter())
        .find_map(|o| o.external_id.as_deref().filter(|id| !id.trim().is_empty()))
    {
        row("Private offer", private_offer);
    }
    row("Status", state_label);
    let body = format!(
        "<table>{rows}</table><p class=\"state\">{}</p>",
        escape(state_text)
    );
    page(StatusCode::OK, "Thank you for your purchase", &body)
}

fn identity(identity: Option<&AadIdentifier>) -> String {
    let Some(identity) = identity else {
        return "(not provided)".into();
    };
    let email = identity
        .email_id
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    let tenant = identity.tenant_id.map(|t: Uuid| t.to_string());
    match (email, tenant) {
        (Some(email), Some(tenant)) => format!("{email} (tenant {tenant})"),
        (Some(email), None) => email.to_owned(),
        (None, Some(tenant)) => format!("tenant {tenant}"),
        (None, None) => "(not provided)".into(),
    }
}

/// A complete page. `body_html` must already be escaped; the title is escaped here.
fn page(status: StatusCode, title: &str, body_html: &str) -> Response {
    let title = escape(title);
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title>\
         <style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;\
         padding:0 1rem;line-height:1.5;color:#222}}th{{text-align:left;padding-right:1.5rem;\
         font-weight:600}}td,th{{padding-top:.3rem;vertical-align:top}}\
         .state{{margin-top:1.5rem;padding:1rem;background:#f3f6fa;border-radius:.4rem}}</style>\
         </head><body><h1>{title}</h1>{body_html}</body></html>\n"
    );
    let mut response = (status, Html(html)).into_response();
    let headers = response.headers_mut();
    // The URL holds a purchase token: keep it out of caches and other sites' logs.
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#x27;"),
            c => out.push(c),
        }
    }
    out
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
    fn escape_neutralises_markup() {
        assert_eq!(
            escape(r#"<script>alert('x')</script> & "q""#),
            "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;q&quot;"
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
    fn manual_activation_says_it_waits_for_the_publisher() {
        let (label, text) = describe(StateName::PendingFulfillment, ActivationMode::Manual);
        assert_eq!(label, "activation pending");
        assert!(text.contains("waits for the publisher"));
    }
}
