#!/usr/bin/env bash
# The scale-out benchmark (BENCHMARKS.md, "Scale-out"): events/s of one backlog worked off by 1, 2 and 3
# vectordb-consumers in one group on the tests' Apache Kafka, and by 1 and 2 vectordb-workers on one redis-server.
#
#   scripts/bench-scale.sh [--events N] [--consumers 1,2,3] [--workers 1,2]
#
# Builds the release binaries, starts the broker and a private redis-server on free ports, runs
# tests/python/bench_scale.py, stops both. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-services.sh
source scripts/bench-services.sh

.venv/bin/python tests/python/bench_scale.py target/release "$bootstrap" "$redis_url" "$@"
