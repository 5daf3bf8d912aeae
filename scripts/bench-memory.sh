#!/usr/bin/env bash
# The memory benchmark (BENCHMARKS.md, "Memory"): peak RSS of vectordb-consumer and vectordb-worker working off a
# backlog of ordinary events, and one with journal-sized (50-900 KB) entries mixed in.
#
#   scripts/bench-memory.sh [--events N] [--mixed-events M] [--journal-every K] [--mounts kafka,celery]
#
# Builds the release binaries, starts the tests' Apache Kafka and a private redis-server on free ports, runs
# tests/python/bench_memory.py, stops both. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/bench-services.sh
source scripts/bench-services.sh

.venv/bin/python tests/python/bench_memory.py target/release "$bootstrap" "$redis_url" "$@"
