//! The operator console over HTTP, signed in through the simulator's Entra login form: an
//! operator finds a subscription, reads its timeline, replays a dead letter (a dry run,
//! then the confirmation) and retries a dead effect, and the journal names them; a
//! read-only operator reads everything and is refused every action; without a session the
//! console sends the browser to sign in; bad input gets a clear 400.

mod stack;

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use marketplace_fulfillment::settings::{OperatorRule, SessionKey, Settings};
use marketplace_fulfillment::simulator::customer::{Page, ScriptedCustomer, input_value};
use marketplace_fulfillment::simulator::sign_in::{OPERATORS_GROUP_ID, READER_OBJECT_ID};
use marketplace_fulfillment::world::wait_until;
use serde_json::json;
use stack::{Options, Stack};
use url::Url;
use uuid::Uuid;

/// The console's sign-in rules on the stack's own ingress: the simulator's operators'
/// group may act, its `reader` may only look.
fn console_rules(settings: &mut Settings) {
    settings.web.session_key = Some(SessionKey::generate());
    settings.web.console_operators = vec![OperatorRule::Group(OPERATORS_GROUP_ID)];
    settings.web.console_read_only = vec![OperatorRule::ObjectId(READER_OBJECT_ID)];
}

/// The console of the stack's ingress.
struct Console {
    base: Url,
}

impl Console {
    fn url(&self, path: &str) -> Url {
        self.base.join(path).unwrap()
    }

    async fn signed_in(&self, user: &str) -> ScriptedCustomer {
        let browser = ScriptedCustomer::new(user).unwrap();
        let back = browser
            .sign_in(&self.url("/auth/console/sign-in?return=%2Fconsole"))
            .await
            .unwrap();
        assert_eq!(back.path(), "/console");
        browser
    }
}

async fn get(browser: &ScriptedCustomer, url: Url) -> Page {
    browser.open(&url).await.unwrap()
}

/// Posts `fields` with the page's CSRF token.
async fn post(browser: &ScriptedCustomer, from: &Page, url: Url, fields: &[(&str, &str)]) -> Page {
    let csrf = input_value(&from.html, "csrf").expect("a CSRF token on the page");
    let mut form = vec![("csrf".to_string(), csrf)];
    form.extend(fields.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    browser.post(&url, &form).await.unwrap()
}

async fn dead_letters_waiting(stack: &Stack) -> u32 {
    stack
        .broker
        .ready_messages(&stack.broker.topology().dead_letter_queue())
        .await
        .unwrap()
}

#[tokio::test]
async fn an_operator_finds_a_subscription_replays_a_dead_letter_and_retries_a_dead_effect() {
    let stack = Stack::start(Options {
        settings: console_rules,
        ..Options::default()
    })
    .await;
    let console = Console {
        base: stack.url("/").parse().unwrap(),
    };
    let id = stack.subscribed("silver", None).await;

    // A dead effect: Microsoft answers 503 to everything while the customer changes plan.
    stack
        .admin
        .set_faults(json!({"share5xx": 1.0}))
        .await
        .unwrap();
    stack
        .act(id, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let (effect, kind): (Uuid, String) = stack
        .wait_for("a dead effect", || async {
            sqlx::query_as(
                "SELECT id, kind FROM outbox WHERE subscription_id = $1 AND status = 'dead' \
                 ORDER BY id LIMIT 1",
            )
            .bind(id)
            .fetch_optional(&stack.pool)
            .await
            .unwrap()
        })
        .await;
    stack.admin.set_faults(json!({})).await.unwrap();

    // A dead letter: a message no worker can read.
    let letter_id = format!("console-test-{}", Uuid::new_v4());
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
            BasicProperties::default().with_message_id(letter_id.as_str().into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let _ = connection.close(200, "published".into()).await;
    stack
        .wait_for("the message dead-lettered", || async {
            (dead_letters_waiting(&stack).await == 1).then_some(())
        })
        .await;

    // Without a session the console sends the browser to sign in.
    let anonymous = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = anonymous.get(console.url("/console")).send().await.unwrap();
    assert!(response.status().is_redirection(), "{}", response.status());
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        location, "/auth/console/sign-in?return=%2Fconsole",
        "{location}"
    );
    let response = anonymous
        .get(console.url("/console/effects?kind=ack_operation"))
        .send()
        .await
        .unwrap();
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(
        location, "/auth/console/sign-in?return=%2Fconsole%2Feffects%3Fkind%3Dack_operation",
        "the sign-in comes back to the page asked for"
    );

    let operator = console.signed_in("operator").await;
    // The overview names what needs a person.
    let overview = get(&operator, console.url("/console")).await;
    assert_eq!(overview.status, 200, "{}", overview.html);
    assert!(
        overview.html.contains("Needs a person"),
        "{}",
        overview.html
    );
    assert!(
        overview.html.contains("dead effect(s)"),
        "{}",
        overview.html
    );
    assert!(
        overview.html.contains("Webhook to ACK"),
        "{}",
        overview.html
    );
    assert!(overview.html.contains("Subscribed"), "{}", overview.html);

    // Find the subscription by its id and read its timeline.
    let found = get(
        &operator,
        console.url(&format!("/console/subscriptions?q={id}")),
    )
    .await;
    assert_eq!(found.status, 200);
    assert_eq!(found.url.path(), format!("/console/subscriptions/{id}"));
    assert!(found.html.contains("id=\"timeline\""), "{}", found.html);
    assert!(found.html.contains("WebhookChangePlan"), "{}", found.html);
    assert!(found.html.contains("x-ms-requestid"), "{}", found.html);
    assert!(
        found.html.contains(&format!("retry-{effect}")),
        "the dead effect is on the page with its retry button: {}",
        found.html
    );
    let listed = get(
        &operator,
        console.url("/console/subscriptions?state=Subscribed"),
    )
    .await;
    assert!(listed.html.contains(&id.to_string()), "{}", listed.html);

    // Replay the dead letter: a dry run first, then the confirmation.
    let letters = get(&operator, console.url("/console/dead-letters")).await;
    assert!(letters.html.contains(&letter_id), "{}", letters.html);
    let letter = get(
        &operator,
        console.url(&format!("/console/dead-letters/{letter_id}")),
    )
    .await;
    assert_eq!(letter.status, 200, "{}", letter.html);
    let replay = console.url(&format!("/console/dead-letters/{letter_id}/replay"));
    let dry = post(&operator, &letter, replay.clone(), &[]).await;
    assert_eq!(dry.status, 200, "{}", dry.html);
    assert!(dry.html.contains("Dry run"), "{}", dry.html);
    // A dry run moves nothing: the letter it read is back in the dead-letter queue (RabbitMQ
    // counts a message given back as ready a moment after the read ends).
    wait_until(
        "the dry run to leave the dead letter where it was",
        Duration::from_secs(5),
        || async { (dead_letters_waiting(&stack).await == 1).then_some(()) },
    )
    .await
    .unwrap();
    let done = post(&operator, &dry, replay, &[("confirm", "yes")]).await;
    assert_eq!(done.status, 200, "{}", done.html);
    assert!(done.html.contains("Dead letter replayed"), "{}", done.html);

    // Retry the dead effect (confirmed): the worker carries it out.
    let page = get(
        &operator,
        console.url(&format!("/console/subscriptions/{id}")),
    )
    .await;
    let retry = console.url(&format!("/console/effects/{effect}/retry"));
    let confirm = post(&operator, &page, retry.clone(), &[]).await;
    assert!(confirm.html.contains("Confirm: retry"), "{}", confirm.html);
    let retried = post(&operator, &confirm, retry, &[("confirm", "yes")]).await;
    assert_eq!(retried.status, 200, "{}", retried.html);
    assert!(retried.html.contains("Effect retried"), "{}", retried.html);
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

    // Abandoning needs a reason, and only a dead effect changes.
    let abandon = console.url(&format!("/console/effects/{effect}/abandon"));
    let page = get(
        &operator,
        console.url(&format!("/console/subscriptions/{id}")),
    )
    .await;
    let blank = post(&operator, &page, abandon.clone(), &[("reason", "  ")]).await;
    assert_eq!(blank.status, 400, "{}", blank.html);
    let late = post(
        &operator,
        &page,
        abandon,
        &[("reason", "changed my mind"), ("confirm", "yes")],
    )
    .await;
    assert_eq!(late.status, 409, "{}", late.html);
    assert!(late.html.contains("not dead any more"), "{}", late.html);

    // Both actions are journalled with the operator's identity, and the journal shows them.
    let journal: Vec<(String, String)> = sqlx::query_as(
        "SELECT action, performed_by FROM operator_actions \
         WHERE action IN ('dlq_replay', 'effect_retry') ORDER BY performed_at",
    )
    .fetch_all(&stack.pool)
    .await
    .unwrap();
    assert_eq!(journal.len(), 2, "{journal:?}");
    for (action, by) in &journal {
        assert!(
            by.starts_with("console:Avery Operator <avery@publisher.example>"),
            "{action} by {by}"
        );
    }
    let page = get(&operator, console.url("/console/journal")).await;
    assert!(page.html.contains("effect_retry"), "{}", page.html);
    assert!(page.html.contains("dlq_replay"), "{}", page.html);
    assert!(page.html.contains("Avery Operator"), "{}", page.html);
    let page = get(
        &operator,
        console.url(&format!("/console/subscriptions/{id}")),
    )
    .await;
    assert!(page.html.contains("put back to pending"), "{}", page.html);
    assert!(page.html.contains(&kind), "{}", page.html);

    // A publisher command: confirmed, then its outcome.
    let commands = console.url(&format!("/console/subscriptions/{id}/commands"));
    let confirm = post(
        &operator,
        &page,
        commands.clone(),
        &[("command", "change_quantity"), ("quantity", "0")],
    )
    .await;
    assert_eq!(confirm.status, 400, "0 seats is refused: {}", confirm.html);
    let confirm = post(
        &operator,
        &page,
        commands.clone(),
        &[("command", "change_plan"), ("plan", "silver")],
    )
    .await;
    assert!(
        confirm.html.contains("Confirm the command"),
        "{}",
        confirm.html
    );
    let sent = post(
        &operator,
        &confirm,
        commands,
        &[
            ("command", "change_plan"),
            ("plan", "silver"),
            ("confirm", "yes"),
        ],
    )
    .await;
    assert_eq!(sent.status, 200, "{}", sent.html);
    assert!(sent.html.contains("Command sent"), "{}", sent.html);

    // A read-only operator reads every page and may not act.
    let reader = console.signed_in("reader").await;
    let page = get(
        &reader,
        console.url(&format!("/console/subscriptions/{id}")),
    )
    .await;
    assert_eq!(page.status, 200);
    assert!(page.html.contains("Read-only access"), "{}", page.html);
    let refused = post(
        &reader,
        &page,
        console.url(&format!("/console/effects/{effect}/retry")),
        &[("confirm", "yes")],
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.html);

    // Bad input: said plainly.
    for path in [
        "/console/subscriptions/not-an-id".to_string(),
        "/console/subscriptions?state=Bogus".to_string(),
        "/console/effects?kind=DROP%20TABLE".to_string(),
        format!("/console/subscriptions?after=zzz&q={id}x"),
    ] {
        let page = get(&operator, console.url(&path)).await;
        assert_eq!(page.status, 400, "{path}: {}", page.html);
    }
    let page = get(
        &operator,
        console.url(&format!("/console/subscriptions/{}", Uuid::new_v4())),
    )
    .await;
    assert_eq!(page.status, 404);

    tokio::time::sleep(Duration::from_millis(10)).await;
    stack.finish().await;
}
