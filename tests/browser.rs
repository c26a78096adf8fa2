//! The landing page in a real browser: Debian's Chromium, headless, driven through
//! chromedriver with thirtyfour. A customer signs in at the simulator's Entra stand-in,
//! sees the branded page, answers the onboarding question, activates by the form's POST
//! (the answer reaches the `subscription.activated` event), and then sees every later state (active, returning, suspended, cancelled).
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them). With
//! `UPDATE_SCREENSHOTS=1` the screenshots are written to `docs/screenshots/` (the README
//! shows them); otherwise to a temporary directory.

mod stack;

use marketplace_fulfillment::world::brand_as_contoso;
use serde_json::json;
use stack::{Options, Purchase, Stack};
use thirtyfour::prelude::*;

#[path = "common/browser.rs"]
mod browser;

use browser::Browser;

#[tokio::test]
async fn a_customer_signs_in_activates_by_the_form_and_sees_every_state_in_chromium() {
    let stack = Stack::start(Options {
        settings: brand_as_contoso,
        ..Options::default()
    })
    .await;
    let Purchase { id, landing, .. } = stack.admin.buy(json!({"planId": "silver"})).await.unwrap();
    let browser = Browser::start().await;
    let driver = &browser.driver;

    // Not signed in: a sign-in, nothing about the purchase.
    driver.goto(landing.as_str()).await.unwrap();
    assert_eq!(
        browser.heading().await,
        "Sign in to set up Contoso Analytics"
    );
    assert!(!driver.source().await.unwrap().contains(&id.to_string()));
    browser.screenshot("landing-sign-in").await;

    // Sign in at the simulator's Entra stand-in as the customer.
    driver
        .find(By::LinkText("Sign in with Microsoft"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait_for_text("Sign in (simulated Entra ID)").await;
    driver
        .find(By::Id("user-customer"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    driver
        .find(By::Id("sign-in"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // The new purchase, branded, with the plan's display name and the question.
    let page = browser.wait_for_text("Welcome to Contoso Analytics").await;
    assert!(page.contains("Silver"), "{page}");
    assert!(
        page.contains("Signed in as chris@contoso.example"),
        "{page}"
    );
    assert!(
        stack.engine(id).await.unwrap().is_none(),
        "signing in recorded the purchase"
    );
    browser.screenshot("landing-new-purchase").await;
    driver
        .find(By::Id("field-company"))
        .await
        .unwrap()
        .send_keys("Contoso Ltd")
        .await
        .unwrap();
    driver
        .find(By::Id("activate"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();

    // Pending, refreshing itself until active.
    browser.wait_for_text("Activation pending").await;
    browser.screenshot("landing-activation-pending").await;
    let page = browser.wait_for_text("You are all set").await;
    assert!(page.contains("Open Contoso Analytics"), "{page}");
    browser.screenshot("landing-active").await;
    let answers: serde_json::Value =
        sqlx::query_scalar("SELECT answers FROM onboarding_answers WHERE subscription_id = $1")
            .bind(id)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(answers, json!({"company": "Contoso Ltd"}));
    // The worker's `subscription.activated` carries them to the ISV's product.
    let activated = stack
        .wait_for("subscription.activated published", || async {
            let mut events = stack.domain_events().await.into_iter();
            let activated =
                |e: &serde_json::Value| e["type"].as_str()?.ends_with(".activated").then_some(());
            events.find(|(e, _)| activated(e).is_some()).map(|(e, _)| e)
        })
        .await;
    assert_eq!(
        activated["data"]["onboarding"],
        json!({"company": "Contoso Ltd"})
    );

    // Back later ("Manage account").
    driver.goto(landing.as_str()).await.unwrap();
    assert_eq!(browser.heading().await, "Welcome back");
    browser.screenshot("landing-returning").await;

    // Suspended, then cancelled.
    stack.act(id, json!({"action": "Suspend"})).await;
    stack
        .wait_for("suspended here", || async {
            (stack.engine(id).await.unwrap()?.state == "Suspended").then_some(())
        })
        .await;
    driver.goto(landing.as_str()).await.unwrap();
    assert_eq!(browser.heading().await, "Your subscription is suspended");
    assert!(
        !driver
            .source()
            .await
            .unwrap()
            .contains("Open Contoso Analytics")
    );
    browser.screenshot("landing-suspended").await;
    stack.act(id, json!({"action": "Unsubscribe"})).await;
    stack
        .wait_for("cancelled here", || async {
            (stack.engine(id).await.unwrap()?.state == "Unsubscribed").then_some(())
        })
        .await;
    driver.goto(landing.as_str()).await.unwrap();
    assert_eq!(browser.heading().await, "This subscription has ended");
    browser.screenshot("landing-cancelled").await;

    // Signing out ends the session: the page asks for sign-in again.
    driver
        .find(By::Css("form.signout button"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    browser.wait_for_text("You are signed out").await;
    driver.goto(landing.as_str()).await.unwrap();
    assert_eq!(
        browser.heading().await,
        "Sign in to set up Contoso Analytics"
    );

    browser.quit().await;
    stack.finish().await;
}
