//! The operator console in a real browser (Debian's Chromium, headless, through
//! chromedriver with thirtyfour): an operator signs in at the simulator's Entra stand-in,
//! finds a subscription, reads its timeline, replays a dead letter (dry run, then confirm),
//! retries a dead effect, and finds both actions in the journal under their name.
//!
//! Needs `chromium` and `chromium-driver` (`.ci/run` installs them). With
//! `UPDATE_SCREENSHOTS=1` the screenshots are written to `docs/screenshots/` (the README
//! shows them). The browser is `tests/common/browser.rs`, shared with `tests/browser.rs`.

mod stack;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use marketplace_fulfillment::http::Application;
use marketplace_fulfillment::settings::{OperatorRule, SessionKey};
use marketplace_fulfillment::simulator::sign_in::OPERATORS_GROUP_ID;
use serde_json::json;
use stack::{Options, Stack};
use thirtyfour::prelude::*;
use tokio_util::sync::CancellationToken;
use url::Url;
use uuid::Uuid;

#[path = "common/browser.rs"]
mod browser;

use browser::Browser;

async fn click(driver: &WebDriver, by: By) {
    driver.find(by).await.unwrap().click().await.unwrap();
}

#[tokio::test]
async fn an_operator_finds_a_subscription_replays_a_dead_letter_and_retries_a_dead_effect_in_chromium()
 {
    let stack = Stack::start(Options::default()).await;
    let mut settings = stack.settings.clone();
    settings.http.listen_addr = "127.0.0.1:0".parse().unwrap();
    settings.web.session_key = Some(SessionKey::generate());
    settings.web.branding.product_name = "Contoso Analytics".into();
    settings.web.console_operators = vec![OperatorRule::Group(OPERATORS_GROUP_ID)];
    let application = Application::build(settings).await.unwrap();
    let base = Url::parse(&format!("http://{}/", application.local_addr())).unwrap();
    let stop = CancellationToken::new();
    let server = tokio::spawn(application.run_until_stopped(stop.clone()));

    // A subscription with a dead effect (Microsoft failing every call during a plan change)
    // and a dead letter (a message no worker can read).
    let id = stack.subscribed("silver", None).await;
    stack
        .admin
        .set_faults(json!({"share5xx": 1.0}))
        .await
        .unwrap();
    stack
        .act(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let effect: Uuid = stack
        .wait_for("a dead effect", || async {
            sqlx::query_scalar(
                "SELECT id FROM outbox WHERE subscription_id = $1 AND status = 'dead' \
                 ORDER BY id LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&stack.pool)
            .await
            .unwrap()
        })
        .await;
    stack.admin.set_faults(json!({})).await.unwrap();
    let letter = format!("browser-test-{}", Uuid::new_v4());
    let connection = Connection::connect(
        stack.settings.amqp.url.expose(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .basic_publish(
            "".into(),
            stack.broker.topology().inbound_queue().as_str().into(),
            BasicPublishOptions::default(),
            b"{\"not\": \"one of our messages\"}",
            BasicProperties::default().with_message_id(letter.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "published".into()).await;
    let dlq = stack.broker.topology().dead_letter_queue();
    stack
        .wait_for("the message dead-lettered", || async {
            (stack.broker.ready_messages(&dlq).await.unwrap() == 1).then_some(())
        })
        .await;

    let browser = Browser::start().await;
    let driver = &browser.driver;

    // Sign in as the operator.
    driver
        .goto(base.join("/console").unwrap().as_str())
        .await
        .unwrap();
    browser.wait_for_text("Sign in (simulated Entra ID)").await;
    click(driver, By::Id("user-operator")).await;
    click(driver, By::Id("sign-in")).await;
    let page = browser.wait_for_text("Needs a person").await;
    assert!(page.contains("Avery Operator"), "{page}");
    assert!(page.contains("dead effect(s)"), "{page}");
    browser.screenshot("console-overview").await;

    // Find the subscription and read its timeline.
    click(driver, By::LinkText("Subscriptions")).await;
    browser.wait_for_text("id=\"search\"").await;
    driver
        .find(By::Id("q"))
        .await
        .unwrap()
        .send_keys(id.to_string())
        .await
        .unwrap();
    click(driver, By::Id("search-button")).await;
    let page = browser.wait_for_text("id=\"timeline\"").await;
    assert!(page.contains("WebhookChangePlan"), "{page}");
    assert!(page.contains("x-ms-requestid"), "{page}");
    browser.screenshot("console-subscription").await;

    // Replay the dead letter: a dry run, then the confirmation.
    click(driver, By::LinkText("Dead letters")).await;
    browser.wait_for_text(&letter).await;
    browser.screenshot("console-dead-letters").await;
    click(driver, By::LinkText(&letter)).await;
    browser.wait_for_text("Replay (dry run first)").await;
    click(driver, By::Id("replay")).await;
    let page = browser.wait_for_text("Dry run").await;
    assert!(page.contains(&letter), "{page}");
    browser.screenshot("console-replay-confirm").await;
    click(driver, By::Id("confirm")).await;
    browser.wait_for_text("Dead letter replayed").await;

    // Retry the dead effect from the subscription's page.
    driver
        .goto(
            base.join(&format!("/console/subscriptions/{id}"))
                .unwrap()
                .as_str(),
        )
        .await
        .unwrap();
    click(driver, By::Id(format!("retry-{effect}"))).await;
    browser.wait_for_text("Confirm: retry").await;
    click(driver, By::Id("confirm")).await;
    browser.wait_for_text("Effect retried").await;
    stack
        .wait_for("the retried effect carried out", || async {
            let status: String = sqlx::query_scalar("SELECT status FROM outbox WHERE id = $1")
                .bind(effect)
                .fetch_one(&stack.pool)
                .await
                .unwrap();
            (status == "done").then_some(())
        })
        .await;

    // The journal names the operator for both.
    driver
        .goto(base.join("/console/journal").unwrap().as_str())
        .await
        .unwrap();
    let page = browser.wait_for_text("effect_retry").await;
    assert!(page.contains("dlq_replay"), "{page}");
    assert!(
        page.contains("console:Avery Operator &lt;avery@publisher.example&gt;")
            || page.contains("console:Avery Operator &#60;avery@publisher.example&#62;"),
        "{page}"
    );
    browser.screenshot("console-journal").await;

    browser.quit().await;
    stop.cancel();
    server.await.unwrap().unwrap();
    stack.finish().await;
}
