"""Prints every record of a topic (all partitions, from the start) as JSON lines: partition, offset, timestamp (ms),
key, value, headers (test helper: what landed in a dead-letter or downstream topic)."""
import json
import sys

from confluent_kafka import Consumer, TopicPartition

bootstrap, topic = sys.argv[1:]
consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "aura-test-reader", "enable.auto.commit": False})
meta = consumer.list_topics(topic, timeout=10)
ends = {}
assignment = []
for p in meta.topics[topic].partitions:
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
    if high > low:
        ends[p] = high
        assignment.append(TopicPartition(topic, p, low))
consumer.assign(assignment)
while ends:
    message = consumer.poll(10)
    if message is None:
        sys.exit(f"timed out; still waiting for partitions {sorted(ends)}")
    if message.error():
        continue
    print(json.dumps({
        "partition": message.partition(),
        "offset": message.offset(),
        "timestamp": message.timestamp()[1],
        "key": message.key().decode() if message.key() is not None else None,
        "value": message.value().decode(errors="replace") if message.value() is not None else None,
        "headers": {k: v.decode(errors="replace") for k, v in (message.headers() or [])},
    }))
    if message.offset() + 1 >= ends.get(message.partition(), 0):
        ends.pop(message.partition(), None)
consumer.close()
