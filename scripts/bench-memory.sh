#!/usr/bin/env bash
# The memory benchmark (BENCHMARKS.md, "Memory"): peak RSS of vectordb-consumer and vectordb-worker working off a
# backlog of ordinary events, and one with journal-sized (50-900 KB) entries mixed in.
#
#   scripts/bench-memory.sh [--events N] [--mixed-events M] [--journal-every K]
#
# Builds the release binaries, starts the tests' Apache Kafka and a private redis-server on free ports, runs
# tests/python/bench_memory.py, stops both. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --release --locked -p aura-cli --bins
scripts/kafka-test-broker.sh install

work=$(mktemp -d "${TMPDIR:-/tmp}/aura-bench-memory.XXXXXX")
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

.venv/bin/python tests/python/bench_memory.py target/release "$bootstrap" "redis://127.0.0.1:$redis_port" "$@"
