#!/usr/bin/env bash
# `scripts/bench-on-kafka.sh <bench> [args]`: runs `cargo bench --bench <bench>` with the tests' venv and the tests'
# Apache Kafka, started here on a free port (AURA_TEST_KAFKA) and stopped at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bench=$1
shift
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
scripts/kafka-test-broker.sh install
broker_dir=$(mktemp -d "${TMPDIR:-/tmp}/aura-kafka-bench.XXXXXX")
trap 'scripts/kafka-test-broker.sh stop "$broker_dir"; rm -rf "$broker_dir"' EXIT
AURA_TEST_KAFKA=$(scripts/kafka-test-broker.sh start "$broker_dir")
AURA_TEST_PYTHON=$(pwd)/.venv/bin/python
export AURA_TEST_KAFKA AURA_TEST_PYTHON
cargo bench --locked -p aura-cli --bench "$bench" "$@"
