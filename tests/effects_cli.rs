//! `fulfillment effects …` and `fulfillment status`, run as the real binary against the
//! whole stack: effects that really died (Microsoft answering 503 to everything) are listed
//! page by page, shown, retried (the worker then carries them out) and abandoned, each
//! change journalled with who did it and shown on the subscription's timeline; `status`
//! lists them with the command to run; tables fit 80 columns; bad arguments exit 2.

mod stack;

use marketplace_fulfillment::store::dead_effects::{self, DeadEffectFilter};
use marketplace_fulfillment::store::timeline;
use marketplace_fulfillment::worker::protocol::CommandStatus;
use serde_json::{Value, json};
use stack::{Options, Stack};
use uuid::Uuid;

/// `fulfillment ARGS` against the stack as the operator `effects-tester`.
async fn cli(stack: &Stack, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let operator = [("FULFILLMENT_OPERATOR", "effects-tester")];
    stack.cli(args, &[env, &operator].concat()).await
}

fn json_of(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The first dead outbox row of `id`, as `fulfillment effects list` finds it:
/// `(effect id, kind)`.
async fn dead_effect_of(stack: &Stack, id: Uuid) -> (Uuid, String) {
    let subscription_id = Some(id);
    let filter = DeadEffectFilter {
        subscription_id,
        limit: 1,
        ..Default::default()
    };
    stack
        .wait_for(&format!("a dead effect of {id}"), || async {
            let first = dead_effects::list(&stack.pool, &filter)
                .await
                .unwrap()
                .pop()?;
            Some((first.id, first.kind))
        })
        .await
}

async fn status_of(stack: &Stack, effect: Uuid) -> String {
    sqlx::query_scalar("SELECT status FROM outbox WHERE id = $1")
        .bind(effect)
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn dead_effects_are_listed_shown_retried_and_abandoned_and_each_change_is_journalled() {
    let stack = Stack::start(Options::default()).await;
    let first = stack.subscribed("silver", None).await;
    let second = stack.subscribed("silver", None).await;

    // Nothing needs a person yet.
    let (code, out, err) = cli(&stack, &["status"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("Nothing needs a person"), "{out}");
    let (code, out, err) = cli(&stack, &["effects", "list"], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "no dead effects\n");

    // Microsoft fails every call while both customers change plan: the ACKs die.
    stack
        .admin
        .set_faults(json!({"share5xx": 1.0}))
        .await
        .unwrap();
    stack
        .act(first, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    stack
        .act(second, json!({"action": "ChangePlan", "planId": "gold"}))
        .await;
    let (dead_first, kind) = dead_effect_of(&stack, first).await;
    let (dead_second, _) = dead_effect_of(&stack, second).await;
    stack.admin.set_faults(json!({})).await.unwrap();

    // Listed a page at a time, in id order.
    let (code, out, err) = cli(&stack, &["effects", "list", "--limit", "1", "--json"], &[]).await;
    assert_eq!(code, 1, "dead effects need a person: {out}{err}");
    let page = json_of(&out);
    let mut seen = vec![page["effects"][0]["id"].as_str().unwrap().to_string()];
    let next = page["next"].as_str().expect("a next page").to_string();
    let (_, out, _) = cli(
        &stack,
        &[
            "effects", "list", "--limit", "1", "--after", &next, "--json",
        ],
        &[],
    )
    .await;
    let page = json_of(&out);
    seen.push(page["effects"][0]["id"].as_str().unwrap().to_string());
    let mut expected = vec![dead_first.to_string(), dead_second.to_string()];
    expected.sort();
    let all = json_of(&cli(&stack, &["effects", "list", "--json"], &[]).await.1);
    let every: Vec<&str> = all["effects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert!(every.contains(&seen[0].as_str()) && every.contains(&seen[1].as_str()));
    assert_ne!(seen[0], seen[1], "the second page starts after the first");
    for id in &expected {
        assert!(every.contains(&id.as_str()), "{id} listed: {all}");
    }
    let (_, only, _) = cli(
        &stack,
        &[
            "effects",
            "list",
            "--subscription",
            &second.to_string(),
            "--json",
        ],
        &[],
    )
    .await;
    assert!(
        json_of(&only)["effects"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["subscription_id"] == second.to_string()),
        "{only}"
    );

    // The table fits 80 columns and keeps the ids whole.
    let (_, table, _) = cli(&stack, &["effects", "list"], &[("COLUMNS", "80")]).await;
    for line in table.lines() {
        assert!(line.chars().count() <= 80, "wider than 80: {line}\n{table}");
    }
    assert!(table.contains(&dead_first.to_string()), "{table}");
    assert!(table.contains(&first.to_string()), "{table}");

    // Shown whole, with what to do next.
    let (code, out, err) = cli(&stack, &["effects", "show", &dead_first.to_string()], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("Effect {dead_first} (dead)")),
        "{out}"
    );
    assert!(out.contains(&kind), "{out}");
    assert!(
        out.contains(&format!("fulfillment effects retry {dead_first}")),
        "{out}"
    );

    // `status` names them, with the command.
    let (code, out, err) = cli(&stack, &["status"], &[("COLUMNS", "80")]).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!("$ fulfillment effects list --kind {kind}")),
        "{out}"
    );
    for line in out.lines() {
        assert!(line.chars().count() <= 80, "wider than 80: {line}\n{out}");
    }
    let report = json_of(&cli(&stack, &["status", "--json"], &[]).await.1);
    assert!(
        report["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["need"] == "dead_effects"),
        "{report}"
    );

    // The console's overview reads the same.
    let overview = marketplace_fulfillment::ops::overview::read(
        &stack.pool,
        Ok(&stack.broker),
        std::time::Duration::from_secs(86_400),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    assert!(overview.dead_effects() >= 2, "{overview:?}");
    assert_eq!(overview.dead_letters(), 0, "{overview:?}");
    assert!(
        overview
            .subscriptions_by_state
            .contains(&("Subscribed".to_string(), 2)),
        "{overview:?}"
    );

    // Retried: back to pending, carried out by the worker, journalled with the operator.
    let (code, out, err) = cli(&stack, &["effects", "retry", &dead_first.to_string()], &[]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("put back to pending"), "{out}");
    stack
        .wait_for("the retried effect carried out", || async {
            (status_of(&stack, dead_first).await == "done").then_some(())
        })
        .await;
    let (performed_by, details): (String, Value) = sqlx::query_as(
        "SELECT performed_by, details FROM operator_actions \
         WHERE action = 'effect_retry' AND subscription_id = $1",
    )
    .bind(first)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert!(
        performed_by.starts_with("cli:effects-tester@"),
        "{performed_by}"
    );
    assert_eq!(details["effect_id"], dead_first.to_string());
    let (_, timeline, _) = cli(&stack, &["subscription", "show", &first.to_string()], &[]).await;
    assert!(timeline.contains("put back to pending"), "{timeline}");
    assert!(timeline.contains("cli:effects-tester@"), "{timeline}");
    // Not dead any more: a second retry changes nothing and says so.
    let (code, out, _) = cli(&stack, &["effects", "retry", &dead_first.to_string()], &[]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("not dead (it is done)"), "{out}");

    // Abandoned, with a reason: gone from the list, kept in the journal.
    let (code, out, err) = cli(
        &stack,
        &["effects", "abandon", &dead_second.to_string()],
        &[],
    )
    .await;
    assert_eq!(code, 2, "a reason is required: {out}{err}");
    let (code, out, err) = cli(
        &stack,
        &[
            "effects",
            "abandon",
            &dead_second.to_string(),
            "--reason",
            "   ",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "a blank reason is refused: {out}{err}");
    let (code, out, err) = cli(
        &stack,
        &[
            "effects",
            "abandon",
            &dead_second.to_string(),
            "--reason",
            "settled with the customer by phone",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(status_of(&stack, dead_second).await, "abandoned");
    let reason: Option<String> = sqlx::query_scalar(
        "SELECT reason FROM operator_actions WHERE action = 'effect_abandon' \
         AND subscription_id = $1",
    )
    .bind(second)
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!(
        reason.as_deref(),
        Some("settled with the customer by phone")
    );
    let left = json_of(&cli(&stack, &["effects", "list", "--json"], &[]).await.1);
    assert!(
        !left.to_string().contains(&dead_second.to_string()),
        "{left}"
    );

    // Bad arguments: exit 2 with a message.
    for args in [
        vec!["effects", "list", "--limit", "0"],
        vec!["effects", "list", "--kind", "ACK;"],
        vec!["effects", "show", "not-an-id"],
        vec!["effects", "retry"],
        vec!["status", "--since", "yesterday"],
    ] {
        let (code, out, err) = cli(&stack, &args, &[]).await;
        assert_eq!(code, 2, "{args:?}: {out}{err}");
        assert!(!err.trim().is_empty(), "{args:?} says why");
    }
    let (code, _, err) = cli(
        &stack,
        &["effects", "show", &Uuid::new_v4().to_string()],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no effect"), "{err}");
    stack.finish().await;
}

/// The items `status --json` lists about `id`: `(need, command)`.
async fn status_items_of(stack: &Stack, args: &[&str], id: Uuid) -> (i32, Vec<(String, String)>) {
    let (code, out, err) = cli(stack, args, &[]).await;
    assert!(matches!(code, 0 | 1), "{args:?}: {out}{err}");
    let items = json_of(&out)["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["subscription_id"] == id.to_string())
        .map(|i| {
            (
                i["need"].as_str().unwrap().to_string(),
                i["command"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    (code, items)
}

#[tokio::test]
async fn status_lists_a_refused_command_while_recent_and_an_unknown_outcome_until_reconciled() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("silver", None).await;
    let sid = id.to_string();
    let show = format!("fulfillment subscription show {sid}");

    // Microsoft refuses a plan change: the requester hears it (exit 1), and for a while
    // `status` lists it as news.
    stack
        .admin
        .set_faults(json!({"failCalls": {"updateSubscription": 400}}))
        .await
        .unwrap();
    let (code, out, err) = cli(
        &stack,
        &["subscription", "change-plan", &sid, "gold", "--wait"],
        &[],
    )
    .await;
    assert_eq!(code, 1, "refused: {out}{err}");
    stack.admin.set_faults(json!({})).await.unwrap();
    let command = timeline::publisher_operations(&stack.pool, id)
        .await
        .unwrap()
        .into_iter()
        .find(|op| op.status == CommandStatus::Refused)
        .expect("the refused operation recorded")
        .command_id;
    let (code, items) = status_items_of(&stack, &["status", "--json"], id).await;
    assert_eq!(code, 1);
    assert_eq!(items, [("refused_command".to_string(), show.clone())]);
    let (_, text, _) = cli(&stack, &["status"], &[]).await;
    assert!(text.contains("refused by Microsoft"), "{text}");

    // Requested `age` ago (a PostgreSQL interval).
    let requested_ago = |age: &'static str| {
        sqlx::query("UPDATE commands SET requested_at = now() - $2::interval WHERE command_id = $1")
            .bind(command)
            .bind(age)
            .execute(&stack.pool)
    };

    // Two hours later it is an answer given, not an action item, unless asked for.
    requested_ago("2 hours").await.unwrap();
    let (code, items) = status_items_of(&stack, &["status", "--json"], id).await;
    assert_eq!(items, []);
    assert_eq!(code, 0, "nothing else needs a person");
    let (_, items) =
        status_items_of(&stack, &["status", "--answers-within", "3h", "--json"], id).await;
    assert_eq!(items, [("refused_command".to_string(), show)]);

    // An unknown outcome two days old is still an open question.
    requested_ago("2 days").await.unwrap();
    sqlx::query("UPDATE publisher_operations SET status = 'Unknown' WHERE command_id = $1")
        .bind(command)
        .execute(&stack.pool)
        .await
        .unwrap();
    let (code, items) = status_items_of(&stack, &["status", "--json"], id).await;
    assert_eq!(code, 1);
    assert_eq!(
        items,
        [(
            "refused_command".to_string(),
            "fulfillment reconcile".to_string()
        )]
    );
    let (_, items) = status_items_of(&stack, &["status", "--since", "1d", "--json"], id).await;
    assert_eq!(items, [], "older than --since");

    let (code, _, err) = cli(&stack, &["status", "--answers-within", "soon"], &[]).await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--answers-within"), "{err}");
    stack.finish().await;
}
