#!/usr/bin/env bash
# Dependency audit: `cargo deny check` (advisories, licenses, bans, sources; see deny.toml).
# Where a snapshot of the RustSec advisory DB exists as ../shared/tools/rustsec-advisory-db.tar.gz
# (beside the project's clone: these machines cannot clone it from GitHub) it runs fully
# offline on it, unpacked under target/; anywhere else cargo-deny fetches the database. Extra arguments go
# to `cargo deny check` (e.g. `bash scripts/deny.sh advisories`).
#
# RUSTSEC_DB_TARBALL overrides the snapshot's path. The duplicate-version warnings are shown
# without their inclusion graphs (1,400 lines otherwise); DENY_GRAPHS=1 shows them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

log() { printf '[deny] %s\n' "$*" >&2; }
graphs=(--hide-inclusion-graph)
if [ "${DENY_GRAPHS:-0}" = 1 ]; then graphs=(); fi

CARGO_DENY_VERSION=0.20.2
if ! cargo deny --version >/dev/null 2>&1; then
  log "installing cargo-deny $CARGO_DENY_VERSION from crates.io (a few minutes)"
  cargo install --locked cargo-deny --version "$CARGO_DENY_VERSION"
fi

# The snapshot lives in ../shared/tools beside the project. A clone made elsewhere (e.g. a
# CI check in /tmp) finds it beside the local repository it was cloned from.
snapshot=shared/tools/rustsec-advisory-db.tar.gz
tarball=${RUSTSEC_DB_TARBALL:-$root/../$snapshot}
origin=$(git -C "$root" config --get remote.origin.url 2>/dev/null || true)
if [ -z "${RUSTSEC_DB_TARBALL:-}" ] && [ ! -f "$tarball" ] && [ -d "$origin" ]; then
  tarball=$origin/../$snapshot
fi
if [ ! -f "$tarball" ]; then
  # Anywhere else (a fork, a laptop, a CI runner with network access): cargo-deny fetches
  # the advisory database itself into its default location.
  log "no advisory DB snapshot at $root/../$snapshot${origin:+ or beside $origin}; letting cargo-deny fetch the RustSec database (set RUSTSEC_DB_TARBALL to use a snapshot)"
  exec cargo deny --workspace check --show-stats "${graphs[@]}" "$@"
fi

# cargo-deny looks for <db-path>/advisory-db-3157b0e258782691 (named after the default URL),
# which is the directory inside the tarball. Unpacked again whenever the snapshot changes.
db_path=${CARGO_TARGET_DIR:-$root/target}/advisory-dbs
stamp=$db_path/.snapshot
if [ ! -f "$stamp" ] || [ "$tarball" -nt "$stamp" ]; then
  log "unpacking $(basename "$tarball") into $db_path"
  rm -rf "$db_path"
  mkdir -p "$db_path"
  tar -xzf "$tarball" -C "$db_path"
  touch "$stamp"
fi
snapshot_date=$(git -C "$db_path/advisory-db-3157b0e258782691" log -1 --format=%cs 2>/dev/null || echo unknown)
log "cargo-deny $(cargo deny --version | awk '{print $2}'), RustSec snapshot of $snapshot_date"

# `--offline` also keeps `cargo metadata` offline, and metadata covers every platform's
# dependencies (Windows-only crates too), which a Linux build never downloads: fetch them
# from the registry first (the advisory database itself stays the offline snapshot).
log "fetching the sources of every platform's dependencies (cargo fetch --locked)"
cargo fetch --locked --quiet

export FULFILLMENT_ADVISORY_DBS=$db_path
exec cargo deny --offline --workspace check --show-stats "${graphs[@]}" "$@"
