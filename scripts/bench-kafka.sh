#!/usr/bin/env bash
# The Kafka mount benchmark (BENCHMARKS.md): starts the tests' Apache Kafka on a free port, runs `cargo bench --bench kafka`, stops it.
# BENCH_MESSAGES, BENCH_E2E_EVENTS, BENCH_PACED_EVENTS, BENCH_PACED_RATE tune the sizes.
exec "$(dirname "$0")/bench-on-kafka.sh" kafka "$@"
