//! Metered billing through the whole stack: usage in through the entitlement API, hourly
//! totals in PostgreSQL, batches submitted by the worker's outbox to the simulator's
//! Metering API, reconciliation against its `GET /usageEvents`.

mod stack;

use std::collections::HashMap;
use std::time::Duration;

use marketplace_fulfillment::marketplace::{MarketplaceClient, TokenProvider};
use marketplace_fulfillment::metering::{MeteringConfig, hour_of, submit};
use marketplace_fulfillment::ops::usage::reconcile;
use marketplace_fulfillment::store::verify;
use reqwest::Method;
use serde_json::{Value, json};
use stack::{Options, Stack};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

fn rfc(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).unwrap()
}

/// The start of the current clock hour.
fn this_hour() -> OffsetDateTime {
    hour_of(OffsetDateTime::now_utc())
}

/// The start of the hour `back` hours before the current one, for usage a test waits to see
/// settled. The previous hour (`back` 1) closes only 5 minutes (the default grace) after it
/// ends, so a test run in an hour's first 5 minutes would wait for it in vain: `back` is at
/// least 2.
fn closed_hour(back: i64) -> OffsetDateTime {
    assert!(
        back >= 2,
        "hour {back} back may still be in its grace period"
    );
    this_hour() - time::Duration::hours(back)
}

fn event(id: Uuid, dimension: &str, quantity: f64, at: OffsetDateTime, key: &str) -> Value {
    json!({"subscriptionId": id, "dimension": dimension, "quantity": quantity,
           "effectiveAt": rfc(at), "idempotencyKey": key})
}

async fn report(stack: &Stack, body: Value) -> (u16, Value) {
    stack
        .entitlement(Method::POST, "/api/v1/usage", Some(body))
        .await
}

/// Waits until every usage hour is settled; returns `(status, count)`.
async fn settled(stack: &Stack) -> HashMap<String, i64> {
    stack
        .wait_for("every usage hour settled", || async {
            // Counted first: a settled hour stays settled, so statuses read after a count
            // of none unsettled are final (read before it, they could still show hours
            // the runner settled in between as `submitting`).
            let unsettled = verify::unsettled_usage_hours(&stack.pool).await.unwrap();
            let mut statuses = HashMap::new();
            for (.., status, _) in verify::usage_hours(&stack.pool).await.unwrap() {
                *statuses.entry(status).or_insert(0) += 1;
            }
            (unsettled == 0 && !statuses.is_empty()).then_some(statuses)
        })
        .await
}

/// Microsoft's accepted usage: `(resource, dimension, hour start) -> (quantity, repeats)`.
async fn billed(stack: &Stack) -> HashMap<(Uuid, String, OffsetDateTime), (f64, u64)> {
    let all = stack
        .admin
        .call(Method::GET, "simulator/usage", Value::Null)
        .await
        .unwrap();
    all.as_array()
        .unwrap()
        .iter()
        .map(|u| {
            let at =
                OffsetDateTime::parse(u["effectiveStartTime"].as_str().unwrap(), &Rfc3339).unwrap();
            (
                (
                    u["resourceId"].as_str().unwrap().parse().unwrap(),
                    u["dimension"].as_str().unwrap().to_owned(),
                    hour_of(at),
                ),
                (
                    u["quantity"].as_f64().unwrap(),
                    u["duplicatesRefused"].as_u64().unwrap(),
                ),
            )
        })
        .collect()
}

async fn stored_events(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM usage_events")
        .fetch_one(&stack.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn every_hour_is_billed_with_its_exact_total() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("gold", None).await;
    let h = this_hour();
    let hours = [
        h - time::Duration::hours(5),
        h - time::Duration::hours(3),
        h - time::Duration::hours(2),
    ];
    let mut events = Vec::new();
    let mut expected: HashMap<(String, OffsetDateTime), f64> = HashMap::new();
    for (i, hour) in hours.iter().enumerate() {
        for (j, dimension) in ["api-calls", "storage-gb"].iter().enumerate() {
            for k in 0..4 {
                let quantity = 0.5 + (i * 7 + j * 3 + k) as f64;
                let at = *hour + time::Duration::minutes(k as i64 * 14 + 1);
                events.push(event(
                    id,
                    dimension,
                    quantity,
                    at,
                    &format!("e-{i}-{j}-{k}"),
                ));
                *expected.entry((dimension.to_string(), *hour)).or_default() += quantity;
            }
        }
    }
    let (status, answer) = report(&stack, json!({"events": events})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["counted"], 24);

    let statuses = settled(&stack).await;
    assert_eq!(statuses.get("accepted"), Some(&6), "{statuses:?}");
    let at_microsoft = billed(&stack).await;
    assert_eq!(at_microsoft.len(), 6);
    for ((dimension, hour), quantity) in &expected {
        let (billed, _) = at_microsoft[&(id, dimension.clone(), *hour)];
        assert!(
            (billed - quantity).abs() < 1e-9,
            "{dimension} {hour}: {billed} != {quantity}"
        );
    }
    stack.finish().await;
}

#[tokio::test]
async fn the_same_idempotency_key_counts_once() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("silver", None).await;
    let at = closed_hour(2) + time::Duration::minutes(10);
    let first = event(id, "api-calls", 5.0, at, "once");
    let (status, answer) = report(&stack, first.clone()).await;
    assert_eq!(
        (status, answer["counted"].clone()),
        (200, json!(1)),
        "{answer}"
    );
    // Again, alone and inside a batch with a new one (and twice in that batch).
    let (status, answer) = report(&stack, first.clone()).await;
    assert_eq!(status, 200);
    assert_eq!(answer["events"][0]["status"], "repeat");
    let second = event(id, "api-calls", 2.0, at, "twice");
    let (status, answer) = report(&stack, json!([first, second.clone(), second])).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["counted"].clone(), answer["repeats"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(stored_events(&stack).await, 2);

    settled(&stack).await;
    let at_microsoft = billed(&stack).await;
    assert_eq!(at_microsoft[&(id, "api-calls".into(), hour_of(at))].0, 7.0);
    stack.finish().await;
}

#[tokio::test]
async fn lost_answers_never_bill_an_hour_twice() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("gold", None).await;
    // The first two sends are recorded but their answers lost (504).
    stack
        .admin
        .set_faults(json!({"loseResponses": {"batchUsageEvent": 2}}))
        .await
        .unwrap();
    // Computed once: the test may cross an hour's start.
    let hours: Vec<OffsetDateTime> = (1..=4).map(|n| closed_hour(n + 1)).collect();
    let events: Vec<Value> = (1..=4)
        .map(|n| event(id, "api-calls", n as f64, hours[n - 1], &format!("k{n}")))
        .collect();
    let (status, answer) = report(&stack, Value::Array(events)).await;
    assert_eq!(status, 200, "{answer}");
    let statuses = settled(&stack).await;
    // Recorded on the first send: each repeat came back Duplicate = billed already.
    assert_eq!(statuses.get("duplicate"), Some(&4), "{statuses:?}");
    let at_microsoft = billed(&stack).await;
    assert_eq!(at_microsoft.len(), 4);
    for n in 1..=4 {
        let (quantity, repeats) = at_microsoft[&(id, "api-calls".into(), hours[n - 1])];
        assert_eq!(quantity, n as f64);
        assert!(
            repeats >= 1,
            "hour {n} was not sent again after its answer was lost"
        );
    }
    let sends: i64 = sqlx::query_scalar("SELECT min(sends)::int8 FROM usage_hours")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert!(sends >= 2);
    stack.finish().await;
}

#[tokio::test]
async fn usage_outside_the_24_hour_window_is_refused_and_open_hours_past_it_expire() {
    let mut stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("gold", None).await;
    stack.stop_workers().await.unwrap();
    let h = this_hour();
    // Its hour started more than 24 h ago: Microsoft would answer Expired.
    let (status, answer) = report(
        &stack,
        event(
            id,
            "api-calls",
            1.0,
            h - time::Duration::hours(24) + time::Duration::minutes(30),
            "old",
        ),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("24-hour window")
    );
    // Its hour started 23 h ago: accepted.
    let edge = h - time::Duration::hours(23);
    let (status, answer) = report(&stack, event(id, "api-calls", 3.0, edge, "edge")).await;
    assert_eq!(status, 200, "{answer}");
    let later = h - time::Duration::hours(1);
    let (status, _) = report(&stack, event(id, "api-calls", 4.0, later, "later")).await;
    assert_eq!(status, 200);
    // Nobody closed it in time (the worker was down for 2 h): past the window it expires
    // and is reported; the younger hour is still submitted.
    let closed = submit::close_due_hours(
        &stack.pool,
        &MeteringConfig::default(),
        OffsetDateTime::now_utc() + time::Duration::hours(2),
    )
    .await
    .unwrap();
    assert_eq!((closed.expired, closed.hours), (1, 1));
    let (status, reason): (String, String) =
        sqlx::query_as("SELECT status, reason FROM usage_hours WHERE hour = $1")
            .bind(edge)
            .fetch_one(&stack.pool)
            .await
            .unwrap();
    assert_eq!(status, "expired");
    assert!(reason.contains("24-hour window"));
    stack.start_worker().await;
    let statuses = settled(&stack).await;
    assert_eq!(
        (statuses.get("accepted"), statuses.get("expired")),
        (Some(&1), Some(&1))
    );
    let at_microsoft = billed(&stack).await;
    assert_eq!(at_microsoft.len(), 1);
    assert_eq!(at_microsoft[&(id, "api-calls".into(), later)].0, 4.0);
    stack.finish().await;
}

#[tokio::test]
async fn usage_for_an_hour_already_submitted_is_reported_as_late_never_sent_again() {
    let mut stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("silver", None).await;
    stack.stop_workers().await.unwrap();
    let hour = closed_hour(2);
    let (status, _) = report(&stack, event(id, "api-calls", 10.0, hour, "first")).await;
    assert_eq!(status, 200);
    let closed = submit::close_due_hours(
        &stack.pool,
        &MeteringConfig::default(),
        OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    assert_eq!(closed.hours, 1);
    let (status, answer) = report(
        &stack,
        event(
            id,
            "api-calls",
            5.0,
            hour + time::Duration::minutes(59),
            "late",
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["events"][0]["status"], "late");
    stack.start_worker().await;
    settled(&stack).await;
    assert_eq!(
        billed(&stack).await[&(id, "api-calls".into(), hour)].0,
        10.0
    );
    let (late, quantity): (String, f64) = sqlx::query_as(
        "SELECT status, (SELECT submitted_quantity FROM usage_hours) FROM usage_events \
         WHERE idempotency_key = 'late'",
    )
    .fetch_one(&stack.pool)
    .await
    .unwrap();
    assert_eq!((late.as_str(), quantity), ("late", 10.0));
    stack.finish().await;
}

#[tokio::test]
async fn the_hours_before_an_unsubscribe_are_flushed_and_billed() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("gold", None).await;
    // The current hour: it would wait for its end and the grace period…
    let now = OffsetDateTime::now_utc();
    let (status, answer) = report(
        &stack,
        event(
            id,
            "storage-gb",
            12.5,
            now - time::Duration::seconds(1),
            "now",
        ),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_hours WHERE status = 'open'")
        .fetch_one(&stack.pool)
        .await
        .unwrap();
    assert_eq!(open, 1, "the current hour closed early");
    // …but the customer cancels: it is submitted at once, and Microsoft accepts it.
    stack.act(id, json!({"action": "Unsubscribe"})).await;
    stack
        .wait_for("Unsubscribed here", || async {
            (stack.engine(id).await.unwrap()?.state == "Unsubscribed").then_some(())
        })
        .await;
    let statuses = settled(&stack).await;
    assert_eq!(statuses.get("accepted"), Some(&1), "{statuses:?}");
    assert_eq!(
        billed(&stack).await[&(id, "storage-gb".into(), hour_of(now))].0,
        12.5
    );
    // Usage from after the cancellation is refused.
    let (status, answer) = report(
        &stack,
        event(id, "storage-gb", 1.0, OffsetDateTime::now_utc(), "after"),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["refused"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("Unsubscribed")
    );
    stack.finish().await;
}

#[tokio::test]
async fn a_dimension_not_in_the_plan_is_refused_and_nothing_is_stored() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("silver", None).await;
    let at = this_hour() - time::Duration::hours(1);
    let (status, answer) = report(
        &stack,
        json!([
            event(id, "api-calls", 1.0, at, "good"),
            event(id, "storage-gb", 1.0, at, "bad"),
            event(id, "api-calls", 0.0, at, "zero"),
            event(Uuid::new_v4(), "api-calls", 1.0, at, "stranger"),
        ]),
    )
    .await;
    assert_eq!(status, 422, "{answer}");
    let reasons: Vec<(String, String)> = answer["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["idempotencyKey"].as_str().unwrap().to_owned(),
                r["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert_eq!(reasons[0].0, "bad");
    assert!(
        reasons[0]
            .1
            .contains("not one of plan silver's metering dimensions (api-calls)")
    );
    assert!(reasons[1].1.contains("greater than 0"));
    assert!(reasons[2].1.contains("unknown"));
    assert_eq!(stored_events(&stack).await, 0);
    // Not JSON, not a usage: 400.
    let (status, _) = report(&stack, json!("nope")).await;
    assert_eq!(status, 400);
    stack.finish().await;
}

#[tokio::test]
async fn reconciliation_reports_a_difference_microsoft_shows() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("gold", None).await;
    let at = closed_hour(2);
    let (status, _) = report(
        &stack,
        json!([
            event(id, "api-calls", 8.0, at, "a"),
            event(id, "storage-gb", 2.0, at, "b")
        ]),
    )
    .await;
    assert_eq!(status, 200);
    settled(&stack).await;
    let tokens = TokenProvider::new(&stack.settings.marketplace).unwrap();
    let client = MarketplaceClient::new(&stack.settings.marketplace, tokens).unwrap();
    let clean = reconcile(&stack.pool, &client, 2).await.unwrap();
    assert_eq!(clean.compared, 2);
    assert!(clean.differences.is_empty(), "{:?}", clean.differences);
    // Partner Center processed less than was submitted for one dimension.
    stack
        .admin
        .call(
            Method::PATCH,
            "simulator/usage",
            json!({"resourceId": id, "dimension": "api-calls", "effectiveStartTime": rfc(at),
                   "processedQuantity": 6.0}),
        )
        .await
        .unwrap();
    let report = reconcile(&stack.pool, &client, 2).await.unwrap();
    assert_eq!(report.differences.len(), 1, "{:?}", report.differences);
    let difference = &report.differences[0];
    assert_eq!(
        (
            difference.kind,
            difference.dimension.as_str(),
            difference.ours,
            difference.processed
        ),
        ("mismatch", "api-calls", 8.0, Some(6.0))
    );
    assert_eq!(difference.recon_status.as_deref(), Some("Mismatch"));
    stack.finish().await;
}

/// Runs `fulfillment ARGS` against the stack: `(exit code, stdout and stderr)`. Async: the
/// simulator runs on this test's runtime.
async fn cli(stack: &Stack, args: &[&str]) -> (i32, String) {
    let (code, stdout, stderr) = stack.cli(args, &[]).await;
    (code, stdout + &stderr)
}

#[tokio::test]
async fn the_cli_imports_a_csv_after_a_dry_run_and_lists_and_reconciles_the_hours() {
    let stack = Stack::start(Options::default()).await;
    let id = stack.subscribed("gold", None).await;
    let hour = closed_hour(3);
    let dir = std::env::temp_dir().join(format!("metering-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("usage.csv");
    let csv = format!(
        "# exported by the product\nidempotencyKey,subscriptionId,dimension,quantity,effectiveAt\n\
         c1,{id},api-calls,4,{}\nc2,{id},api-calls,1.5,{}\nc3,{id},storage-gb,9,{}\n",
        rfc(hour + time::Duration::minutes(1)),
        rfc(hour + time::Duration::minutes(59)),
        rfc(hour),
    );
    std::fs::write(&file, &csv).unwrap();
    let path = file.to_str().unwrap();

    let (code, out) = cli(&stack, &["usage", "import", path]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("dry run: 3 usage event(s) valid"), "{out}");
    assert_eq!(stored_events(&stack).await, 0, "a dry run stored usage");

    let bad = dir.join("bad.csv");
    std::fs::write(&bad, csv.replace("storage-gb", "tokens")).unwrap();
    let (code, out) = cli(
        &stack,
        &["usage", "import", bad.to_str().unwrap(), "--execute"],
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("not one of plan gold's metering dimensions"),
        "{out}"
    );
    assert!(out.contains("5"), "the refused line's number: {out}");
    assert_eq!(stored_events(&stack).await, 0);

    let (code, out) = cli(&stack, &["usage", "import", path, "--execute"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("stored 3 usage event(s): 3 counted"), "{out}");
    settled(&stack).await;

    let (code, out) = cli(&stack, &["usage", "list", "--json"]).await;
    assert_eq!(code, 0, "{out}");
    let hours: Vec<Value> = serde_json::from_str(&out).unwrap();
    let totals: HashMap<String, (f64, String)> = hours
        .iter()
        .map(|h| {
            (
                h["dimension"].as_str().unwrap().to_owned(),
                (
                    h["submitted_quantity"].as_f64().unwrap(),
                    h["status"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    assert_eq!(totals["api-calls"], (5.5, "accepted".to_owned()));
    assert_eq!(totals["storage-gb"], (9.0, "accepted".to_owned()));
    let hour_id = hours[0]["id"].as_str().unwrap();
    let (code, out) = cli(&stack, &["usage", "show", hour_id]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("csv"), "{out}");

    let (code, out) = cli(&stack, &["usage", "reconcile"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("no differences"), "{out}");
    std::fs::remove_dir_all(&dir).ok();
    stack.finish().await;
}
