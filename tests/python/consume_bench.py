"""Reference for the Kafka benchmark: the plain confluent-kafka poll loop (what a Python consumer does before any
handler work), storing each offset. Prints messages/s from the first message to the n-th."""
import sys
import time

from confluent_kafka import Consumer

bootstrap, topic, n, group = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
consumer = Consumer({
    "bootstrap.servers": bootstrap,
    "group.id": group,
    "enable.auto.commit": True,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
    "fetch.wait.max.ms": 20,  # as the Rust loops in the benchmark
})
consumer.subscribe([topic])
seen = 0
started = None
while seen < n:
    message = consumer.poll(1.0)
    if message is None or message.error():
        continue
    if started is None:
        started = time.perf_counter()
    message.value()
    consumer.store_offsets(message)
    seen += 1
elapsed = time.perf_counter() - started
consumer.close()
print(f"{(n - 1) / elapsed:.0f}")
