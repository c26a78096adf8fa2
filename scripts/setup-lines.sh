#!/usr/bin/env bash
# Measures the test set-up code under tests/ (issue 15, "one test world"): the lines that
# build databases, brokers, simulators, settings, ingress or worker processes, or that
# wait and poll, as opposed to the lines that state what a test does and checks.
#
# What counts, per file:
#   * a harness module (any file in a subdirectory of tests/, e.g. tests/stack/mod.rs):
#     every line;
#   * a tests/*.rs file: every fn that is not itself a test (#[test], #[tokio::test]) and
#     whose text names one of the set-up words below, with its doc comments and attributes;
#     and every struct that holds one of the set-up types (a per-file harness struct).
#     Helpers nested inside a test fn belong to the test and are not counted.
#
# Usage: scripts/setup-lines.sh [DIR]   (DIR defaults to tests/ of this repository)
# Prints "lines  file" per file with set-up code, then "total"; VERBOSE=1 also lists
# every counted fn and struct (on stderr, before its file's line).
set -euo pipefail
dir=${1:-"$(cd "$(dirname "$0")/.." && pwd)/tests"}

# Words that mark a helper as set-up code.
setup_words='TestDatabase|test_settings|PgPool|PgPoolOptions|store::(migrate|connect)|Broker::connect|Connection::connect|Simulator::start|SimulatorConfig|Settings::from_sources|Settings *[{]|Application::build|Worker::spawn|WorkerParts|WorkerConfig|MarketplaceClient::new|TokenProvider::new|CARGO_BIN_EXE|Command::new|TcpListener::bind|sleep[(]|Instant::now|deadline|wait_for|wait_until|_until_idle|Stack::start|World::start|Harness'
# Types whose presence in a struct makes it a harness.
harness_types='PgPool|Broker|RunningSimulator|Settings|TestDatabase|Child|JoinHandle|CancellationToken|Worker[^A-Za-z]|Application|Stack|World'

total=0
report() { printf '%6d  %s\n' "$1" "$2"; total=$((total + $1)); }

shopt -s nullglob
for file in "$dir"/*/*.rs; do
    report "$(wc -l <"$file")" "${file#"$dir"/}"
done

for file in "$dir"/*.rs; do
    lines=$(awk -v verbose="${VERBOSE:-0}" -v words="$setup_words" -v types="$harness_types" '
        # Text of a line without string and char literals and line comments, for brace counting.
        function code(line,    s) {
            s = line
            gsub(/\\\\/, "", s)
            gsub(/\\"/, "", s)
            gsub(/"[^"]*"/, "\"\"", s)
            gsub(/'"'"'.'"'"'/, "", s)
            sub(/\/\/.*/, "", s)
            return s
        }
        function opens(s) { return gsub(/\{/, "{", s) }
        function closes(s) { return gsub(/\}/, "}", s) }
        function settle(    name) {
            if ((item == "fn" && !is_test && text ~ words) || (item == "struct" && text ~ types)) {
                counted += span
                if (verbose) {
                    name = text; sub(/^[^\n]*(fn|struct) +/, "", name); sub(/[^A-Za-z_0-9].*/, "", name)
                    printf "    %4d  %s %s\n", span, item, name > "/dev/stderr"
                }
            }
        }
        BEGIN { depth = 0; item = ""; lead = 0; is_test = 0 }
        {
            line = $0; c = code(line)
            if (item != "") {
                text = text "\n" line; span++
                depth += opens(c) - closes(c)
                if (opened == 0 && opens(c) > 0) opened = 1
                if ((opened && depth <= start) || (!opened && c ~ /;[ \t]*$/)) {
                    settle()
                    item = ""; lead = 0; is_test = 0
                }
                next
            }
            if (line ~ /^[ \t]*(\/\/\/|#\[|#!\[)/ || (lead > 0 && line ~ /^[ \t]*(\/\/|\]|[a-z_]+ *=|\))/)) {
                if (line ~ /#\[(tokio::)?test/) is_test = 1
                if (line !~ /#!\[/) lead++
                depth += opens(c) - closes(c)
                next
            }
            if (c ~ /^[ \t]*(pub(\([a-z]+\))? +)?(const +)?(async +)?(unsafe +)?fn +[A-Za-z_0-9]+/) item = "fn"
            else if (c ~ /^[ \t]*(pub(\([a-z]+\))? +)?struct +[A-Za-z_0-9]+/) item = "struct"
            if (item != "") {
                start = depth; text = line; span = lead + 1; opened = 0
                depth += opens(c) - closes(c)
                if (opens(c) > 0) opened = 1
                if ((opened && depth <= start) || (!opened && c ~ /;[ \t]*$/)) {
                    settle()
                    item = ""; lead = 0; is_test = 0
                }
                next
            }
            lead = 0; is_test = 0
            depth += opens(c) - closes(c)
        }
        END { print counted + 0 }
    ' "$file")
    if [ "$lines" -gt 0 ]; then
        report "$lines" "${file#"$dir"/}"
    fi
done
printf '%6d  total\n' "$total"
