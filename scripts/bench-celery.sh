#!/usr/bin/env bash
# The Celery mount benchmark (BENCHMARKS.md): our worker vs a Python Celery 5.7 worker on a private redis-server.
# Our worker runs with its default settings, in celery mode and in kafka mode (on the tests' Apache Kafka, started here).
# BENCH_PY_TASKS, BENCH_RUST_TASKS tune the sizes (see crates/cli/benches/celery.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
scripts/kafka-test-broker.sh install
broker_dir=$(mktemp -d "${TMPDIR:-/tmp}/aura-kafka-bench.XXXXXX")
trap 'scripts/kafka-test-broker.sh stop "$broker_dir"; rm -rf "$broker_dir"' EXIT
AURA_TEST_KAFKA=$(scripts/kafka-test-broker.sh start "$broker_dir")
AURA_TEST_PYTHON=$(pwd)/.venv/bin/python
export AURA_TEST_KAFKA AURA_TEST_PYTHON
cargo bench --locked -p aura-cli --bench celery "$@"
