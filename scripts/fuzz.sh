#!/usr/bin/env bash
# Property-based fuzzing of every decoder and writer that touches untrusted input (tests/properties.rs).
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]     default 60 (FUZZ_SECONDS); CI runs a short smoke, a long run is e.g. 600
#   FUZZ_TARGETS=REGEX scripts/fuzz.sh …     only the targets whose name matches (to split a long run over cores)
#
# Each target (one proptest property) runs again and again with fresh random seeds, FUZZ_BATCH cases a run (default
# 200), until its time is up. A failing case stops that target and prints proptest's minimal failing input; the
# script exits 1 if any target failed. The last lines are a table: target, cases executed, seconds, failures.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-${FUZZ_SECONDS:-60}}
batch=${FUZZ_BATCH:-200}
bin=$(cargo test --locked -p aura-integration-tests --test properties --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == "properties":
        print(m["executable"])')
# A copy: a build in the same target directory while a long run goes on must not swap the binary under it.
log=$(mktemp)
copy=$(mktemp)
trap 'rm -f "$log" "$copy"' EXIT
install -m 0755 "$bin" "$copy"
bin=$copy
# The generated properties (the corpus tests are deterministic: plain `cargo test` runs them).
mapfile -t targets < <("$bin" --list --format terse 2>/dev/null | sed -n 's/: test$//p' | grep -v corpus | grep -v '^a_long_note' |
    grep -E "${FUZZ_TARGETS:-.}")
if ((${#targets[@]} == 0)); then
    echo "fuzz: no target found in $bin" >&2
    exit 1
fi

report=()
failed=0
for target in "${targets[@]}"; do
    cases=0
    failures=0
    started=$SECONDS
    while ((SECONDS - started < seconds)); do
        if ! PROPTEST_CASES=$batch "$bin" --exact "$target" --test-threads 1 >"$log" 2>&1; then
            failures=1
            echo "FAILED: $target" >&2
            grep -E "minimal failing input|panicked|Test failed" -A12 "$log" >&2 || cat "$log" >&2
            break
        fi
        cases=$((cases + batch))
    done
    report+=("$(printf '%-78s %10d %6ds %3d' "$target" "$cases" "$((SECONDS - started))" "$failures")")
    failed=$((failed + failures))
done
printf '%-78s %10s %7s %3s\n' target cases time failures
printf '%s\n' "${report[@]}"
if ((failed > 0)); then
    echo "fuzz: $failed target(s) failed" >&2
    exit 1
fi
