#!/usr/bin/env bash
# The tests' Kafka broker: Apache Kafka (KRaft, one node that is both broker and controller) on free 127.0.0.1 ports.
#
#   scripts/kafka-test-broker.sh install      fetch the broker's jars from Maven Central if missing (scripts/kafka/pom.xml,
#                                             `mvn dependency:copy-dependencies`; Maven's cache keeps them after)
#   scripts/kafka-test-broker.sh start DIR    format DIR (the first time) and start the broker with its data in DIR;
#                                             prints the bootstrap address once the broker answers (a restart in the
#                                             same DIR reuses its ports and data)
#   scripts/kafka-test-broker.sh stop DIR     stop the broker started in DIR (SIGTERM: a controlled shutdown)
#   scripts/kafka-test-broker.sh kill DIR     kill -9 it
#
# Topics are not auto-created (as with Confluent Cloud): tests create theirs. Group rebalances start at once
# (group.initial.rebalance.delay.ms=0) and sessions may be as short as a second (group.min.session.timeout.ms), so
# tests can watch a dead member expire without waiting 45 s. KAFKA_TEST_HEAP (default 768m) bounds the JVM heap.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
jars="$here/kafka/target/dependency"

java_bin() {
    if [[ -n "${JAVA_HOME:-}" && -x "$JAVA_HOME/bin/java" ]]; then echo "$JAVA_HOME/bin/java"; else command -v java; fi
}

install() {
    if compgen -G "$jars/kafka_2.13-*.jar" >/dev/null; then
        return 0
    fi
    echo "fetching Apache Kafka's jars from Maven Central (scripts/kafka/pom.xml; once)" >&2
    (cd "$here/kafka" && mvn -q -B dependency:copy-dependencies >&2)
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

write_config() {
    local dir=$1 port=$2 controller=$3
    cat >"$dir/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=false
offsets.topic.replication.factor=1
offsets.topic.num.partitions=5
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
num.network.threads=2
num.io.threads=4
log.flush.interval.messages=9223372036854775807
EOF
    cat >"$dir/log4j2.properties" <<EOF
status = error
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache
logger.apache.level = WARN
logger.coordinator.name = org.apache.kafka.coordinator.group
logger.coordinator.level = INFO
EOF
}

start() {
    local dir=$1 port controller java cluster
    install
    java=$(java_bin)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/port" ]]; then
        port=$(cat "$dir/port")
        controller=$(cat "$dir/controller-port")
    else
        port=$(free_port)
        controller=$(free_port)
        while [[ "$controller" == "$port" ]]; do controller=$(free_port); done
        echo "$port" >"$dir/port"
        echo "$controller" >"$dir/controller-port"
    fi
    write_config "$dir" "$port" "$controller"
    local jvm=(-Xms128m "-Xmx${KAFKA_TEST_HEAP:-768m}" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:TieredStopAtLevel=1
        -Djava.awt.headless=true "-Dlog4j2.configurationFile=$dir/log4j2.properties" -cp "$jars/*")
    if [[ ! -f "$dir/data/meta.properties" ]]; then
        # Kafka's own random ids never start with '-': one that did (1 in 64 of these) was read by the tool's argument
        # parser as an option ("--cluster-id: expected one argument"), and the broker never started.
        cluster=$(python3 -c 'import base64,uuid
while (c := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"): pass
print(c)')
        "$java" "${jvm[@]}" kafka.tools.StorageTool format --cluster-id="$cluster" -c "$dir/server.properties" \
            >>"$dir/format.log" 2>&1 || { cat "$dir/format.log" >&2; return 1; }
    fi
    : >"$dir/server.log"
    nohup "$java" "${jvm[@]}" kafka.Kafka "$dir/server.properties" >>"$dir/stdout.log" 2>&1 &
    echo $! >"$dir/kafka.pid"
    # Ready once the broker says so (the port opens before the broker can serve metadata).
    for _ in $(seq 1 600); do
        if grep -q "Kafka Server started" "$dir/server.log" 2>/dev/null; then
            echo "127.0.0.1:$port"
            return 0
        fi
        if ! kill -0 "$(cat "$dir/kafka.pid")" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "Apache Kafka did not start; its logs:" >&2
    tail -n 40 "$dir/stdout.log" "$dir/server.log" >&2
    return 1
}

stop() {
    local dir=$1 signal=${2:-TERM}
    if [[ -f "$dir/kafka.pid" ]]; then
        local pid
        pid=$(cat "$dir/kafka.pid")
        kill "-$signal" "$pid" 2>/dev/null || true
        # Gone before returning, so a restart in the same DIR can take the ports again.
        for _ in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/kafka.pid"
    fi
}

case "${1:-}" in
    install) install ;;
    start) start "${2:?data directory}" ;;
    stop) stop "${2:?data directory}" ;;
    kill) stop "${2:?data directory}" KILL ;;
    *) echo "usage: $0 install | start DIR | stop DIR | kill DIR" >&2; exit 2 ;;
esac
