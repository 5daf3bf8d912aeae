#!/usr/bin/env bash
# The Kafka mount benchmark (BENCHMARKS.md): starts the tests' Apache Kafka on a free port, runs `cargo bench --bench kafka`, stops it.
# BENCH_MESSAGES, BENCH_E2E_EVENTS, BENCH_PACED_EVENTS, BENCH_PACED_RATE tune the sizes.
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
cargo bench --locked -p aura-cli --bench kafka "$@"
