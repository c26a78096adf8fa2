//! The decision table of a webhook delivery (`worker::protocol::deliver`): one row per
//! endpoint state and answer class, the step it leads to. No IO, no clock.

use std::time::Duration;

use marketplace_fulfillment::worker::protocol::deliver::{
    DeliveryAnswer, DeliveryConfig, DeliveryStep, DeliveryTurn, EndpointState, step,
};
use time::OffsetDateTime;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-12-06 08:00 UTC);

fn enabled() -> EndpointState {
    EndpointState::Enabled {
        failing_since: None,
    }
}

fn status(status: u16) -> DeliveryAnswer {
    DeliveryAnswer::Status {
        status,
        retry_after: None,
    }
}

fn retry_in(seconds: i64, because: &str) -> DeliveryStep {
    DeliveryStep::RetryAt {
        at: NOW + time::Duration::seconds(seconds),
        because: because.into(),
    }
}

struct Row {
    name: &'static str,
    endpoint: EndpointState,
    answer: Option<DeliveryAnswer>,
    failed_attempts: u32,
    expected: DeliveryStep,
}

#[test]
fn each_endpoint_state_and_answer_is_a_row() {
    let config = DeliveryConfig::default();
    let rows = [
        Row {
            name: "first execution: send",
            endpoint: enabled(),
            answer: None,
            failed_attempts: 0,
            expected: DeliveryStep::Send,
        },
        Row {
            name: "a retry sends again",
            endpoint: enabled(),
            answer: None,
            failed_attempts: 3,
            expected: DeliveryStep::Send,
        },
        Row {
            name: "deleted endpoint: nothing to send",
            endpoint: EndpointState::Deleted,
            answer: None,
            failed_attempts: 0,
            expected: DeliveryStep::Drop,
        },
        Row {
            name: "disabled endpoint: give up, replayable",
            endpoint: EndpointState::Disabled,
            answer: None,
            failed_attempts: 0,
            expected: DeliveryStep::GiveUp {
                because: "the endpoint is disabled".into(),
            },
        },
        Row {
            name: "200: delivered",
            endpoint: enabled(),
            answer: Some(status(200)),
            failed_attempts: 0,
            expected: DeliveryStep::Delivered,
        },
        Row {
            name: "204: delivered",
            endpoint: enabled(),
            answer: Some(status(204)),
            failed_attempts: 2,
            expected: DeliveryStep::Delivered,
        },
        Row {
            name: "410: the endpoint is disabled",
            endpoint: enabled(),
            answer: Some(status(410)),
            failed_attempts: 0,
            expected: DeliveryStep::DisableEndpoint {
                because: "the endpoint answered 410 Gone".into(),
                alert: false,
            },
        },
        Row {
            name: "500 on the first attempt: retry in 5 s",
            endpoint: enabled(),
            answer: Some(status(500)),
            failed_attempts: 0,
            expected: retry_in(5, "HTTP 500"),
        },
        Row {
            name: "500 on the second attempt: retry in 5 min",
            endpoint: enabled(),
            answer: Some(status(500)),
            failed_attempts: 1,
            expected: retry_in(300, "HTTP 500"),
        },
        Row {
            name: "302: not followed, retried",
            endpoint: enabled(),
            answer: Some(status(302)),
            failed_attempts: 2,
            expected: retry_in(1800, "HTTP 302"),
        },
        Row {
            name: "400: retried (the ISV may fix its endpoint)",
            endpoint: enabled(),
            answer: Some(status(400)),
            failed_attempts: 3,
            expected: retry_in(7200, "HTTP 400"),
        },
        Row {
            name: "429 with Retry-After longer than the schedule's step: waits as asked",
            endpoint: enabled(),
            answer: Some(DeliveryAnswer::Status {
                status: 429,
                retry_after: Some(Duration::from_secs(120)),
            }),
            failed_attempts: 0,
            expected: retry_in(120, "HTTP 429"),
        },
        Row {
            name: "503 with Retry-After shorter than the step: the step",
            endpoint: enabled(),
            answer: Some(DeliveryAnswer::Status {
                status: 503,
                retry_after: Some(Duration::from_secs(1)),
            }),
            failed_attempts: 1,
            expected: retry_in(300, "HTTP 503"),
        },
        Row {
            name: "Retry-After of a week: capped at the schedule's longest wait (10 h)",
            endpoint: enabled(),
            answer: Some(DeliveryAnswer::Status {
                status: 503,
                retry_after: Some(Duration::from_secs(7 * 24 * 3600)),
            }),
            failed_attempts: 0,
            expected: retry_in(36_000, "HTTP 503"),
        },
        Row {
            name: "timeout: retried",
            endpoint: enabled(),
            answer: Some(DeliveryAnswer::Timeout),
            failed_attempts: 4,
            expected: retry_in(18_000, "no answer in time"),
        },
        Row {
            name: "connection refused: retried",
            endpoint: enabled(),
            answer: Some(DeliveryAnswer::Unreachable {
                detail: "connection refused".into(),
            }),
            failed_attempts: 6,
            expected: retry_in(36_000, "unreachable: connection refused"),
        },
        Row {
            name: "failing after the last retry: give up",
            endpoint: enabled(),
            answer: Some(status(500)),
            failed_attempts: 7,
            expected: DeliveryStep::GiveUp {
                because: "gave up after 8 attempts: HTTP 500".into(),
            },
        },
        Row {
            name: "failing for 4 days: still retried",
            endpoint: EndpointState::Enabled {
                failing_since: Some(NOW - time::Duration::days(4)),
            },
            answer: Some(status(500)),
            failed_attempts: 1,
            expected: retry_in(300, "HTTP 500"),
        },
        Row {
            name: "failing for 5 days: disabled with an alert",
            endpoint: EndpointState::Enabled {
                failing_since: Some(NOW - time::Duration::days(5)),
            },
            answer: Some(DeliveryAnswer::Timeout),
            failed_attempts: 1,
            expected: DeliveryStep::DisableEndpoint {
                because: "the endpoint has failed for 120 h (no answer in time)".into(),
                alert: true,
            },
        },
        Row {
            name: "a success after 5 days of failures is still a success",
            endpoint: EndpointState::Enabled {
                failing_since: Some(NOW - time::Duration::days(6)),
            },
            answer: Some(status(200)),
            failed_attempts: 5,
            expected: DeliveryStep::Delivered,
        },
    ];
    let mut failures = Vec::new();
    for row in &rows {
        let got = step(&DeliveryTurn {
            endpoint: row.endpoint,
            answer: row.answer.as_ref(),
            failed_attempts: row.failed_attempts,
            now: NOW,
            config: &config,
        });
        if got != row.expected {
            failures.push(format!(
                "{}: expected {:?}, got {got:?}",
                row.name, row.expected
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_shrunk_schedule_bounds_the_attempts() {
    let config = DeliveryConfig {
        schedule: vec![Duration::from_millis(50); 2],
        ..DeliveryConfig::fast()
    };
    let turn = |failed_attempts| DeliveryTurn {
        endpoint: EndpointState::Enabled {
            failing_since: None,
        },
        answer: Some(&DeliveryAnswer::Timeout),
        failed_attempts,
        now: NOW,
        config: &config,
    };
    assert!(matches!(step(&turn(1)), DeliveryStep::RetryAt { .. }));
    assert!(matches!(step(&turn(2)), DeliveryStep::GiveUp { .. }));
}
