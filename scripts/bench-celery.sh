#!/usr/bin/env bash
# The Celery mount benchmark (BENCHMARKS.md): our worker vs a Python Celery 5.7 worker on a private redis-server.
# Our worker runs with its default settings, in celery mode and in kafka mode (on the tests' Apache Kafka, started here).
# BENCH_PY_TASKS, BENCH_RUST_TASKS tune the sizes (see crates/cli/benches/celery.rs).
exec "$(dirname "$0")/bench-on-kafka.sh" celery "$@"
