"""A minimal reproduction of a broker's group coordinator losing partitions under membership churn, with plain
Python confluent-kafka consumers (nothing of ours): three members of one group commit after each message; one is
killed (`kill -9`), another leaves cleanly (`close()`), a fourth joins. On a correct broker every partition is
assigned again and the lag drains to 0; tansu 0.6 (sqlite engine) leaves one partition of the topic with no owner
and the lag stays where it was while every member polls.

    .venv/bin/python scripts/group-churn-repro.py BOOTSTRAP [--messages N] [--watch SECONDS]

Prints what happens, one line per step, then `REPRODUCED: ...` (exit 1) when the lag is still above 0 after
`--watch` seconds with members polling, or `not reproduced: lag 0 ...` (exit 0). The tests' broker
(`scripts/kafka-test-broker.sh start DIR`) is the control: it prints `not reproduced`.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

SESSION_MS = 6000


def member(bootstrap, topic, group, name):
    """One group member: commits after each message, reports its assignment as JSON lines on stdout."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))

    def report(kind, partitions):
        print(json.dumps({"member": name, "event": kind, "partitions": sorted(p.partition for p in partitions)}),
              flush=True)

    consumer = Consumer({
        "bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False,
        "auto.offset.reset": "earliest", "session.timeout.ms": SESSION_MS,
    })
    consumer.subscribe([topic], on_assign=lambda c, ps: report("assigned", ps),
                       on_revoke=lambda c, ps: report("revoked", ps))
    while not stopping:
        message = consumer.poll(0.2)
        if message is None or message.error():
            continue
        time.sleep(0.02)  # a little work per message, so the churn lands mid-stream
        consumer.commit(message=message, asynchronous=False)
    consumer.close()
    report("closed", [])


def lag(bootstrap, topic, group, partitions):
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    committed = probe.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    total = 0
    for tp in committed:
        _, high = probe.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
        total += high - max(tp.offset, 0)
    probe.close()
    return total


def produce(bootstrap, topic, count):
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "compression.type": "lz4"})
    for i in range(count):
        producer.produce(topic, key=f"user-{i % 30}", value=json.dumps({"n": i}))
        producer.poll(0)
    producer.flush(30)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "member":
        member(*sys.argv[2:6])
        return 0
    parser = argparse.ArgumentParser()
    parser.add_argument("bootstrap")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--watch", type=float, default=45)
    args = parser.parse_args()
    run = uuid.uuid4().hex[:8]
    topic, group, partitions = f"churn-{run}", f"churn-{run}", 3
    admin = AdminClient({"bootstrap.servers": args.bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)
    produce(args.bootstrap, topic, args.messages)
    print(f"topic {topic}: {partitions} partitions, {args.messages} messages; group {group}", flush=True)

    log = open(f"/tmp/{group}.members.jsonl", "w")
    members = {}

    def start(name):
        members[name] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "member", args.bootstrap, topic, group, name],
            stdout=log, stderr=subprocess.DEVNULL)

    for name in ("m1", "m2", "m3"):
        start(name)
    while lag(args.bootstrap, topic, group, partitions) > args.messages * 0.8:
        time.sleep(0.2)
    os.kill(members["m1"].pid, signal.SIGKILL)
    print("kill -9 m1", flush=True)
    produce(args.bootstrap, topic, 100)
    members["m2"].send_signal(signal.SIGTERM)
    members["m2"].wait(30)
    print("m2 closed", flush=True)
    start("m4")
    print("m4 joined; watching the lag", flush=True)
    deadline = time.time() + args.watch
    current = None
    while time.time() < deadline:
        current = lag(args.bootstrap, topic, group, partitions)
        if current == 0:
            break
        time.sleep(2)
    for name, process in members.items():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in members.values():
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
    log.close()
    owners = {}
    with open(f"/tmp/{group}.members.jsonl") as handle:
        for line in handle:
            event = json.loads(line)
            if event["event"] == "assigned":
                for p in event["partitions"]:
                    owners[p] = event["member"]
    if current:
        print(f"REPRODUCED: lag {current} after {args.watch:.0f} s with m3 and m4 polling; last owner per partition "
              f"{owners} (member events in /tmp/{group}.members.jsonl)")
        return 1
    print(f"not reproduced: lag 0; last owner per partition {owners}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
