#!/usr/bin/env bash
# Runs every fuzz target (tests/fuzz.rs, one module per target, plus the state machine's own
# property tests) far longer than `cargo test` does, each bounded in cases and in time.
#
#   bash scripts/fuzz.sh                      # every target, release build
#   bash scripts/fuzz.sh jwt landing          # some targets
#   FUZZ_CASES=100000 FUZZ_SECONDS=1800 bash scripts/fuzz.sh webhook_parser
#   FUZZ_PROFILE=dev bash scripts/fuzz.sh     # no release build (slower cases, quicker start)
#
# FUZZ_CASES sets the cases of the in-process targets (default 20000); the targets that go
# through the router and the real PostgreSQL/RabbitMQ get a tenth of it (FUZZ_HTTP_CASES).
# FUZZ_SECONDS bounds each target's wall time (default 600): a target still running then is
# stopped and counted as passed so far. The HTTP targets need the services of .ci/services.
# A failure prints proptest's minimal input: fix the bug, then keep that input as a
# `regression_…` test in tests/fuzz.rs.
set -euo pipefail
cd "$(dirname "$0")/.."

cases=${FUZZ_CASES:-20000}
http_cases=${FUZZ_HTTP_CASES:-$((cases / 10))}
seconds=${FUZZ_SECONDS:-600}
profile=${FUZZ_PROFILE:-release}
profile_flag=()
[ "$profile" = release ] && profile_flag=(--release)

all_targets=(webhook_parser jwt landing entitlements webhook_ingress state_machine state_machine_properties)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")

log() { printf '[fuzz] %s\n' "$*" >&2; }

log "building the fuzz targets ($profile)"
cargo test "${profile_flag[@]}" --test fuzz --no-run
cargo test "${profile_flag[@]}" -p fulfillment-state-machine --test properties --no-run

failed=()
for target in "${targets[@]}"; do
  case $target in
    landing | entitlements | webhook_ingress) n=$http_cases ;;
    *) n=$cases ;;
  esac
  if [ "$target" = state_machine_properties ]; then
    command=(cargo test "${profile_flag[@]}" -p fulfillment-state-machine --test properties)
  elif printf '%s\n' "${all_targets[@]}" | grep -qx "$target"; then
    command=(cargo test "${profile_flag[@]}" --test fuzz -- "$target::")
  else
    log "unknown target $target (known: ${all_targets[*]})"
    exit 2
  fi
  log "$target: $n cases, at most ${seconds}s"
  started=$SECONDS
  set +e
  PROPTEST_CASES=$n timeout --signal=INT --kill-after=30 "$seconds" "${command[@]}"
  status=$?
  set -e
  elapsed=$((SECONDS - started))
  case $status in
    0) log "$target: passed in ${elapsed}s" ;;
    124) log "$target: time bound reached after ${elapsed}s with no failure so far" ;;
    *) log "$target: FAILED (exit $status) after ${elapsed}s"; failed+=("$target") ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  log "failed: ${failed[*]}"
  exit 1
fi
log "all targets passed"
