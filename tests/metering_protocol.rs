//! The decision table of the metering protocol: `(batch progress, Microsoft's answer to
//! batchUsageEvent) -> (step, hours settled, hours sent)`, one named row per answer class,
//! each naming the fact of docs/marketplace.md it encodes. Pure: the clock is fixed.

use std::collections::BTreeSet;
use std::time::Duration;

use marketplace_fulfillment::marketplace::UsageEventResponse;
use marketplace_fulfillment::worker::ProtocolConfig;
use marketplace_fulfillment::worker::protocol::metering::{
    HourOutcome, MeteringProgress, MeteringTurn, UsageBatch, UsageItem, step,
};
use marketplace_fulfillment::worker::protocol::{Answer, Call, GiveUpWhy, Step};
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(1_796_083_200).unwrap() // 2026-12-01T00:00:00Z
}

const SUBSCRIPTION: Uuid = Uuid::from_u128(0x5ab);

fn hour_id(n: u128) -> Uuid {
    Uuid::from_u128(0x100 + n)
}

/// Two frozen hours, 2 h and 3 h old, and with `stale` a third one 25 h old.
fn batch(stale: bool) -> UsageBatch {
    let mut items: Vec<UsageItem> = [2i64, 3]
        .iter()
        .enumerate()
        .map(|(i, h)| UsageItem {
            hour_id: hour_id(i as u128),
            plan_id: "gold".into(),
            dimension: "api-calls".into(),
            hour: now() - time::Duration::hours(*h),
            quantity: 10.0 + i as f64,
        })
        .collect();
    if stale {
        items.push(UsageItem {
            hour_id: hour_id(9),
            plan_id: "gold".into(),
            dimension: "storage-gb".into(),
            hour: now() - time::Duration::hours(25),
            quantity: 1.0,
        });
    }
    UsageBatch {
        batch_id: Uuid::from_u128(0xba),
        subscription_id: SUBSCRIPTION,
        items,
    }
}

/// One item of a batch answer (§9.2).
fn item(batch: &UsageBatch, index: usize, status: &str, error: Option<Value>) -> Value {
    let it = &batch.items[index];
    let mut value = json!({
        "status": status,
        "resourceId": SUBSCRIPTION,
        "quantity": it.quantity,
        "dimension": it.dimension,
        "effectiveStartTime": it.hour.format(&time::format_description::well_known::Rfc3339).unwrap(),
        "planId": it.plan_id,
        "messageTime": if status == "Accepted" { "2026-12-01T00:00:01Z" } else { "0001-01-01T00:00:00" },
    });
    if status == "Accepted" {
        value["usageEventId"] = json!(format!("ev-{index}"));
    }
    if let Some(error) = error {
        value["error"] = error;
    }
    value
}

fn results(values: Vec<Value>) -> Answer {
    Answer::UsageResults(
        values
            .into_iter()
            .map(|v| serde_json::from_value::<UsageEventResponse>(v).unwrap())
            .collect(),
    )
}

fn duplicate_of(quantity: f64) -> Value {
    json!({"code": "Conflict", "message": "This usage event already exist.",
           "additionalInfo": {"acceptedMessage": {"usageEventId": "first", "status": "Duplicate",
               "quantity": quantity}}})
}

struct Row {
    name: &'static str,
    stale: bool,
    progress: MeteringProgress,
    answer: Option<Answer>,
    attempts: u32,
    /// "send", "finish", "retry", "give up".
    step: &'static str,
    settled: Vec<(u128, HourOutcome)>,
    sends: Vec<u128>,
    /// The delay of a retry, when the row checks it.
    delay: Option<Duration>,
}

fn row(name: &'static str, answer: Option<Answer>, step: &'static str) -> Row {
    Row {
        name,
        stale: false,
        progress: MeteringProgress::default(),
        answer,
        attempts: 0,
        step,
        settled: Vec::new(),
        sends: Vec::new(),
        delay: None,
    }
}

#[test]
fn each_answer_of_batch_usage_event_is_a_row() {
    let b = batch(false);
    let config = ProtocolConfig {
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(300),
        ..ProtocolConfig::default()
    };
    let lost = MeteringProgress {
        lost_answers: 1,
        ..MeteringProgress::default()
    };
    let rows = vec![
        Row {
            sends: vec![0, 1],
            ..row("§9.2: a fresh batch sends its frozen hours", None, "send")
        },
        Row {
            stale: true,
            sends: vec![0, 1],
            settled: vec![(9, HourOutcome::Expired)],
            ..row(
                "§9: an hour past the 24 h window is settled expired, never sent",
                None,
                "send",
            )
        },
        Row {
            settled: vec![(0, HourOutcome::Accepted), (1, HourOutcome::Accepted)],
            ..row(
                "§9.2: every item Accepted",
                Some(results(vec![
                    item(&b, 0, "Accepted", None),
                    item(&b, 1, "Accepted", None),
                ])),
                "finish",
            )
        },
        Row {
            settled: vec![(0, HourOutcome::Duplicate), (1, HourOutcome::Accepted)],
            ..row(
                "§8.2: Duplicate after a lost answer = billed already, success",
                Some(results(vec![
                    item(&b, 0, "Duplicate", Some(duplicate_of(10.0))),
                    item(&b, 1, "Accepted", None),
                ])),
                "finish",
            )
        },
        Row {
            settled: vec![(0, HourOutcome::Expired), (1, HourOutcome::Rejected)],
            ..row(
                "§9.2: Expired and ResourceNotActive items fail with their reason",
                Some(results(vec![
                    item(
                        &b,
                        0,
                        "Expired",
                        Some(json!({"message": "too old", "code": "Expired"})),
                    ),
                    item(
                        &b,
                        1,
                        "ResourceNotActive",
                        Some(json!({"message": "suspended", "code": "ResourceNotActive"})),
                    ),
                ])),
                "finish",
            )
        },
        Row {
            settled: vec![(0, HourOutcome::Rejected)],
            delay: Some(Duration::from_millis(500)),
            ..row(
                "§9.2: an item answered Error is sent again; the other is settled",
                Some(results(vec![
                    item(
                        &b,
                        0,
                        "InvalidDimension",
                        Some(json!({"message": "no such dimension"})),
                    ),
                    item(&b, 1, "Error", None),
                ])),
                "retry",
            )
        },
        Row {
            settled: vec![(1, HourOutcome::Accepted)],
            ..row(
                "an item missing from the answer is sent again",
                Some(results(vec![item(&b, 1, "Accepted", None)])),
                "retry",
            )
        },
        Row {
            delay: Some(Duration::from_secs(30)),
            ..row(
                "§8.1: 429 waits at least Retry-After",
                Some(Answer::Throttled {
                    retry_after: Some(Duration::from_secs(30)),
                    detail: "429".into(),
                }),
                "retry",
            )
        },
        row(
            "§8.2: 5xx: the same hours again later",
            Some(Answer::ServerError {
                status: 503,
                retry_after: None,
                detail: "503".into(),
            }),
            "retry",
        ),
        row(
            "§8.2: a timeout (lost answer): the same hours again later",
            Some(Answer::Timeout {
                detail: "timeout".into(),
            }),
            "retry",
        ),
        Row {
            attempts: 40,
            ..row(
                "the window, not an attempt count, bounds the retries",
                Some(Answer::ConnectionReset {
                    detail: "reset".into(),
                }),
                "retry",
            )
        },
        Row {
            settled: vec![(0, HourOutcome::Rejected), (1, HourOutcome::Rejected)],
            ..row(
                "§9.2: 400 to the whole batch rejects its hours",
                Some(Answer::BadRequest {
                    locked: false,
                    detail: "more than 25".into(),
                }),
                "finish",
            )
        },
        Row {
            sends: vec![0, 1],
            ..row(
                "P2: the first 403 is tried once more with a fresh token",
                Some(Answer::Unauthorized {
                    status: 403,
                    detail: "403".into(),
                }),
                "send",
            )
        },
        Row {
            progress: MeteringProgress {
                fresh_token_tried: true,
                ..MeteringProgress::default()
            },
            ..row(
                "P2: a second 403 gives up for an operator",
                Some(Answer::Unauthorized {
                    status: 403,
                    detail: "403".into(),
                }),
                "give up",
            )
        },
        Row {
            progress: MeteringProgress {
                settled: BTreeSet::from([hour_id(0)]),
                ..lost.clone()
            },
            sends: vec![1],
            ..row(
                "a batch resumes with its unsettled hours only",
                None,
                "send",
            )
        },
    ];
    for r in rows {
        let b = batch(r.stale);
        let next = step(&MeteringTurn {
            batch: &b,
            progress: &r.progress,
            answered: r.answer.as_ref(),
            now: now(),
            attempts: r.attempts,
            jitter: 1.0,
            config: &config,
        });
        let kind = match &next.step {
            Step::Call(Call::SubmitUsage) => "send",
            Step::Finish { events } if events.is_empty() => "finish",
            Step::RetryLater { .. } => "retry",
            Step::GiveUp {
                why: GiveUpWhy::Permanent,
                ..
            } => "give up",
            other => panic!("{}: unexpected step {other:?}", r.name),
        };
        assert_eq!(kind, r.step, "{}", r.name);
        let settled: Vec<(Uuid, HourOutcome)> = next
            .settled
            .iter()
            .map(|s| (s.hour_id, s.outcome))
            .collect();
        let expected: Vec<(Uuid, HourOutcome)> =
            r.settled.iter().map(|(n, o)| (hour_id(*n), *o)).collect();
        assert_eq!(settled, expected, "{}", r.name);
        let sends: Vec<Uuid> = r.sends.iter().map(|n| hour_id(*n)).collect();
        assert_eq!(next.send, sends, "{}", r.name);
        if let (Some(delay), Step::RetryLater { at, .. }) = (r.delay, &next.step) {
            assert!(
                *at - now() >= delay,
                "{}: retried after {:?}",
                r.name,
                *at - now()
            );
        }
        assert!(
            next.settled
                .iter()
                .all(|s| s.outcome == HourOutcome::Accepted
                    || s.outcome == HourOutcome::Duplicate
                    || s.reason.is_some()),
            "{}: a failed hour without its reason",
            r.name
        );
    }
}

#[test]
fn a_duplicate_with_another_quantity_is_billed_and_the_difference_noted() {
    let b = batch(false);
    let answer = results(vec![
        item(&b, 0, "Duplicate", Some(duplicate_of(7.0))),
        item(&b, 1, "Duplicate", Some(duplicate_of(11.0))),
    ]);
    let next = step(&MeteringTurn {
        batch: &b,
        progress: &MeteringProgress::default(),
        answered: Some(&answer),
        now: now(),
        attempts: 0,
        jitter: 0.5,
        config: &ProtocolConfig::default(),
    });
    assert_eq!(next.settled[0].billed_quantity, Some(7.0));
    assert!(
        next.settled[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("first write wins")
    );
    assert_eq!(next.settled[1].billed_quantity, None);
    assert_eq!(next.settled[1].reason, None);
}

#[test]
fn after_a_lost_answer_an_expired_hour_says_microsoft_may_have_it() {
    let b = batch(true);
    let lost = MeteringProgress {
        lost_answers: 2,
        ..MeteringProgress::default()
    };
    let next = step(&MeteringTurn {
        batch: &b,
        progress: &lost,
        answered: None,
        now: now(),
        attempts: 3,
        jitter: 0.5,
        config: &ProtocolConfig::default(),
    });
    let expired = &next.settled[0];
    assert_eq!(expired.outcome, HourOutcome::Expired);
    assert!(expired.reason.as_deref().unwrap().contains("reconcile"));
    // The quantities sent are the frozen ones: the step only names hours.
    assert_eq!(next.send, vec![hour_id(0), hour_id(1)]);
}
