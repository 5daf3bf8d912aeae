#!/usr/bin/env bash
# A Kafka-protocol test broker (tansu, sqlite storage) on a free 127.0.0.1 port.
#
#   scripts/kafka-test-broker.sh install      install tansu if missing (cargo install, ~8-30 min cold; cached after)
#   scripts/kafka-test-broker.sh start DIR    start it with its data in DIR; prints the bootstrap address (a restart
#                                             in the same DIR reuses its port and data)
#   scripts/kafka-test-broker.sh stop DIR     stop the broker started in DIR
#
# tansu speaks the Kafka protocol (consumer groups, commits, idempotent producers) and does not auto-create topics.
# The sqlite engine reports correct high watermarks but cannot serve snappy batches: tests use lz4.
set -euo pipefail

TANSU_VERSION=0.6.0
tansu_bin() {
    if command -v tansu >/dev/null 2>&1; then command -v tansu; else echo "${CARGO_HOME:-$HOME/.cargo}/bin/tansu"; fi
}

install() {
    local bin
    bin=$(tansu_bin)
    if [[ -x "$bin" ]] && "$bin" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
        return 0
    fi
    echo "installing tansu $TANSU_VERSION (cargo install; slow the first time)" >&2
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql >&2
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local dir=$1 bin port
    bin=$(tansu_bin)
    mkdir -p "$dir"
    if [[ -f "$dir/port" ]]; then port=$(cat "$dir/port"); else port=$(free_port); echo "$port" >"$dir/port"; fi
    # The storage URL is relative to the working directory, hence the subshell.
    (cd "$dir" && exec "$bin" broker \
        --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" \
        --storage-engine sqlite://tansu.db >>tansu.log 2>&1) &
    echo $! >"$dir/tansu.pid"
    for _ in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    echo "tansu did not start; its log:" >&2
    cat "$dir/tansu.log" >&2
    return 1
}

stop() {
    local dir=$1
    if [[ -f "$dir/tansu.pid" ]]; then
        local pid
        pid=$(cat "$dir/tansu.pid")
        kill "$pid" 2>/dev/null || true
        # Gone before returning, so a restart in the same DIR can take the port again.
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/tansu.pid"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?data directory}" ;;
    stop) stop "${2:?data directory}" ;;
    *) echo "usage: $0 install | start DIR | stop DIR" >&2; exit 2 ;;
esac
