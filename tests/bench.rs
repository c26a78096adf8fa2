//! Smoke tests of `fulfillment bench ingress`, `pipeline`, `burst` and `scale` with tiny numbers against
//! the local PostgreSQL and RabbitMQ: each completes, exits 0 and ends with a parseable JSON
//! result line. Speed is measured by the benchmarks, never asserted here.

mod common;

use serde_json::Value;

/// Runs `fulfillment bench <args>`, asserts it exits 0 and returns its last line as JSON.
fn run_bench(args: &[&str]) -> Value {
    let (args, env) = ([&["bench"], args].concat(), [("RUST_LOG", "warn")]);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (code, stdout, stderr) = runtime.block_on(common::run_fulfillment(&args, env, false));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let last = stdout.lines().last().expect("some output");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("the last line is not JSON ({e}): {last}"))
}

#[test]
fn bench_ingress_runs_and_prints_a_json_result() {
    let result = run_bench(&[
        "ingress",
        "--requests",
        "200",
        "--concurrency",
        "8",
        "--warmup",
        "20",
        "--max-seconds",
        "60",
    ]);
    assert_eq!(result["bench"], "ingress");
    let levels = result["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 1);
    let level = &levels[0];
    assert_eq!(level["concurrency"], 8);
    assert_eq!(level["requests"], 200);
    for key in ["rps", "p50_ms", "p99_ms", "publish_ceiling_per_s", "ratio"] {
        assert!(level[key].is_number(), "{key} in {level}");
    }
    assert!(level["errors"].is_u64(), "{level}");
    assert!(
        result["peak_rss_mib"].as_f64().unwrap_or(0.0) > 0.0,
        "{result}"
    );
    assert!(
        result["machine"]["cores"].as_u64().unwrap_or(0) > 0,
        "{result}"
    );
}

#[test]
fn bench_pipeline_runs_acknowledges_every_change_and_drains_the_outbox() {
    let result = run_bench(&[
        "pipeline",
        "--events",
        "20",
        "--subscriptions",
        "4",
        "--ceiling-seconds",
        "1",
        "--max-seconds",
        "120",
    ]);
    assert_eq!(result["bench"], "pipeline");
    assert_eq!(result["acknowledged"], 20, "{result}");
    assert_eq!(result["not_acknowledged"], 0, "{result}");
    assert_eq!(result["agreeing_subscriptions"], 4, "{result}");
    // The baseline engine acknowledged the same number of changes after the worker.
    assert_eq!(result["baseline_not_acknowledged"], 0, "{result}");
    for key in [
        "events_per_s",
        "commit_ceiling_per_s",
        "ratio",
        "baseline_per_s",
        "baseline_ratio",
        "ack_p99_ms",
        "effects_drained_s",
    ] {
        assert!(result[key].is_number(), "{key} in {result}");
    }
    assert!(result["baseline_per_s"].as_f64().unwrap() > 0.0, "{result}");
    for process in ["ingress", "engine", "postgres", "ours_plus_postgres"] {
        assert!(
            result["cpu_ms_per_change"][process].is_number(),
            "cpu_ms_per_change.{process} in {result}"
        );
    }
}

#[test]
fn bench_burst_issues_changes_at_once_and_counts_the_window() {
    let result = run_bench(&["burst", "--changes", "12", "--max-seconds", "60"]);
    assert_eq!(result["bench"], "burst");
    assert_eq!(result["changes"], 12, "{result}");
    // A dozen changes on an idle engine are acknowledged in time; the exit code (0) already
    // says none was auto-accepted.
    assert_eq!(result["auto_accepted"], 0, "{result}");
    assert_eq!(result["acked_in_window"], 12, "{result}");
    assert_eq!(result["share_in_window"], 1.0, "{result}");
    assert!(result["ack_p99_ms"].as_f64().unwrap() > 0.0, "{result}");
}

#[test]
fn bench_scale_preloads_with_copy_and_reconciles_everything() {
    let result = run_bench(&[
        "scale",
        "--subscriptions",
        "300",
        "--events",
        "1500",
        "--changes",
        "8",
        "--in-flight",
        "4",
        "--max-seconds",
        "120",
    ]);
    assert_eq!(result["bench"], "scale");
    assert_eq!(result["subscriptions"], 300, "{result}");
    assert_eq!(result["events"], 1500, "{result}");
    // The history a real database keeps beside its event log went in too.
    for table in ["inbox", "outbox", "webhook_events"] {
        assert!(
            result["preloaded_rows"][table].as_u64().unwrap() > 0,
            "{table} in {result}"
        );
    }
    assert_eq!(result["not_acknowledged"], 0, "{result}");
    // The copies are coherent: Microsoft lists the preloaded subscriptions and the bench's
    // own, and reconcile finds every one here, with nothing drifted.
    assert_eq!(result["reconcile_listed"], 304, "{result}");
    assert_eq!(result["reconcile_drifts"], 0, "{result}");
    for key in ["events_per_s_empty", "events_per_s_loaded", "reconcile_s"] {
        assert!(result[key].as_f64().unwrap() > 0.0, "{key} in {result}");
    }
}
