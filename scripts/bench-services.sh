# Sourced by the bench scripts that run our release binaries against real services: builds them, starts the tests'
# Apache Kafka and a private redis-server on free ports (both stopped at exit) and sets `work` (a scratch directory),
# `bootstrap` and `redis_url`.
if [[ ! -x .venv/bin/python ]]; then python3 -m venv .venv; fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt
cargo build --release --locked -p aura-cli --bins
scripts/kafka-test-broker.sh install

work=$(mktemp -d "${TMPDIR:-/tmp}/aura-bench.XXXXXX")
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
redis_url="redis://127.0.0.1:$redis_port"
