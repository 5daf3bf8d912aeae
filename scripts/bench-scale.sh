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
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --release --locked -p aura-cli --bins
scripts/kafka-test-broker.sh install

work=$(mktemp -d "${TMPDIR:-/tmp}/aura-bench-scale.XXXXXX")
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
cleanup() {
    scripts/kafka-test-broker.sh stop "$work/kafka" || true
    redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$work" --logfile "$work/redis.log"
bootstrap=$(scripts/kafka-test-broker.sh start "$work/kafka")
for _ in $(seq 50); do redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break; sleep 0.1; done

.venv/bin/python tests/python/bench_scale.py target/release "$bootstrap" "redis://127.0.0.1:$redis_port" "$@"
