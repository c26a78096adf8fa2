//! The short chaos run (issue #8): `fulfillment bench chaos` with small numbers against the
//! local PostgreSQL and RabbitMQ — workers SIGKILLed and restarted, this run's RabbitMQ
//! connections force-closed, PostgreSQL restarted, simulator faults on — must exit 0 with
//! nothing lost, nothing applied twice and both sides agreeing.
//!
//! It restarts the local PostgreSQL server, which would disturb tests running beside it;
//! cargo runs test binaries one after another, and this binary holds this one test only.

use std::process::Command;

use serde_json::Value;

#[test]
fn a_short_chaos_run_loses_nothing_repeats_nothing_and_ends_where_the_simulator_does() {
    let output = Command::new(env!("CARGO_BIN_EXE_fulfillment"))
        .args([
            "bench",
            "chaos",
            "--webhooks",
            "600",
            "--subscriptions",
            "60",
            "--seed",
            "8",
            "--worker-kills",
            "3",
            "--broker-closes",
            "1",
            "--postgres-restarts",
            "1",
            "--max-seconds",
            "420",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("run fulfillment bench chaos");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!(
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status.code()
    );
    let last = stdout.lines().last().unwrap_or_default();
    let result: Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("the last line is not JSON ({e}):\n{context}"));
    assert!(output.status.success(), "{context}");
    assert_eq!(result["bench"], "chaos", "{context}");
    assert_eq!(result["passed"], true, "{context}");
    assert_eq!(result["events_lost"], 0, "{context}");
    assert_eq!(result["duplicate_transitions"], 0, "{context}");
    assert_eq!(result["divergent_subscriptions"], 0, "{context}");
    assert_eq!(result["subscriptions"], 60, "{context}");
    // Customers only ask what the simulator allows, so (nearly) every action is a webhook.
    let sent = result["webhooks_sent"].as_u64().unwrap_or(0);
    assert!(sent >= 570, "{context}");
    assert_eq!(
        result["webhooks_accepted"].as_u64().unwrap_or(0)
            + result["webhooks_never_accepted"].as_u64().unwrap_or(0),
        sent,
        "{context}"
    );
    assert_eq!(result["worker_kills"], 3, "{context}");
    assert_eq!(result["broker_closes"], 1, "{context}");
    assert_eq!(result["postgres_restarts"], 1, "{context}");
    assert_eq!(result["unexpected_exits"], 0, "{context}");
    assert!(
        result["duplicate_deliveries"].as_u64().unwrap_or(0) > 0,
        "duplicates were injected: {context}"
    );
}
