#!/usr/bin/env bash
# The Celery mount benchmark (BENCHMARKS.md): our worker vs a Python Celery 5.7 worker on a private redis-server.
# BENCH_PY_TASKS, BENCH_RUST_TASKS, BENCH_RUST_CONCURRENCY tune the sizes (see crates/cli/benches/celery.rs).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
AURA_TEST_PYTHON=$(pwd)/.venv/bin/python
export AURA_TEST_PYTHON
cargo bench --locked -p aura-cli --bench celery "$@"
