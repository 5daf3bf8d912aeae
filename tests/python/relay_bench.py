"""Reference for the Kafka benchmark: a naive Python relay doing the pipeline's two hops with confluent-kafka.

    relay_bench.py BOOTSTRAP GROUP N MOOD_TOPIC AGGREGATED_TOPIC VECTORIZED_TOPIC

It reads both source topics; for each mood event it produces a `context.aggregated` event to AGGREGATED_TOPIC, and for
each aggregated event a `context.vectorized` event to VECTORIZED_TOPIC (same key, the event's JSON rebuilt; no
embedding, no store). The producer is the services' (idempotent, acks=all, lz4); every 100 messages it flushes and
commits synchronously, so nothing is committed before its output is acknowledged. Prints events/s from the first
message to the N-th relayed `context.vectorized` event.
"""
import json
import sys
import time
import uuid

from confluent_kafka import Consumer, Producer

bootstrap, group, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mood_topic, aggregated_topic, vectorized_topic = sys.argv[4:7]

consumer = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "enable.auto.commit": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 20,  # as the Rust consumers in the benchmark
})
producer = Producer({
    "bootstrap.servers": bootstrap,
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": "lz4",
    "linger.ms": 2,
})
consumer.subscribe([mood_topic, aggregated_topic])


def follow_up(event, event_type):
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": event_type,
        "user_id": event.get("user_id"),
        "trace_id": event.get("trace_id"),
        "timestamp": event.get("timestamp"),
        "metadata": {"causation_id": event.get("event_id")},
        "data": event.get("data"),
    }


relayed = 0
uncommitted = 0
started = None
while relayed < n:
    message = consumer.poll(1.0)
    if message is None or message.error():
        continue
    if started is None:
        started = time.perf_counter()
    event = json.loads(message.value())
    if message.topic() == mood_topic:
        out_topic, out_type = aggregated_topic, "context.aggregated"
    else:
        out_topic, out_type = vectorized_topic, "context.vectorized"
        relayed += 1
    producer.produce(out_topic, json.dumps(follow_up(event, out_type)).encode(), key=message.key(),
                     headers={"event_type": out_type})
    producer.poll(0)
    uncommitted += 1
    if uncommitted >= 100 or relayed >= n:
        producer.flush()
        consumer.commit(asynchronous=False)
        uncommitted = 0
elapsed = time.perf_counter() - started
consumer.close()
print(f"{n / elapsed:.0f}")
