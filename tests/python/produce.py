"""The Python side of the Kafka tests: a confluent-kafka producer configured like the AURA360 services.

    produce.py BOOTSTRAP moods TOPIC COUNT USERS   events built the way the Python services build them
    produce.py BOOTSTRAP raw                       records from stdin, one JSON object per line:
                                                   {"topic", "key"?, "value"? (text), "headers"? {name: text}}

Idempotent, acks=all, snappy batches (the AURA360 services' producer default; PRODUCE_COMPRESSION overrides it).
Prints the number of records acknowledged; exits 1 if any delivery failed.
"""
import json
import os
import random
import sys
import uuid
from datetime import datetime

from confluent_kafka import Producer

bootstrap, mode, *rest = sys.argv[1:]
producer = Producer({
    "bootstrap.servers": bootstrap,
    "enable.idempotence": True,
    "acks": "all",
    "compression.type": os.environ.get("PRODUCE_COMPRESSION", "snappy"),
    "linger.ms": 5,
})
failures = []


def on_delivery(error, _message):
    if error is not None:
        failures.append(str(error))


def send(topic, key, value, headers):
    while True:
        try:
            producer.produce(topic, key=key, value=value, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.1)


def mood_event(user_id, rng):
    # services/api: MoodCreatedEvent(BaseEvent) serialised with model_dump_json(); naive utcnow() timestamps.
    now = datetime.utcnow().isoformat()
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "user.mood.created",
        "timestamp": now,
        "trace_id": str(uuid.uuid4()),
        "user_id": user_id,
        "metadata": {"source": "django-api"},
        "data": {
            "mood_score": rng.randint(1, 10),
            "tags": rng.sample(["work", "family", "sleep", "exercise", "stress", "friends"], 2),
            "notes": rng.choice(["long day at work", "slept well", "anxious about a deadline", "great run"]),
            "created_at": now,
        },
    }


count = 0
if mode == "moods":
    topic, total, users = rest[0], int(rest[1]), int(rest[2])
    rng = random.Random(42)
    for i in range(total):
        event = mood_event(f"user-{i % users:03d}", rng)
        headers = [
            ("event_type", event["event_type"].encode()),
            ("event_id", event["event_id"].encode()),
            ("trace_id", event["trace_id"].encode()),
        ]
        send(topic, event["user_id"].encode(), json.dumps(event).encode(), headers)
        count += 1
        producer.poll(0)
elif mode == "raw":
    for line in sys.stdin:
        if not line.strip():
            continue
        record = json.loads(line)
        value = record.get("value")
        key = record.get("key")
        headers = [(k, v.encode()) for k, v in (record.get("headers") or {}).items()]
        send(record["topic"], key.encode() if key is not None else None,
             value.encode() if value is not None else None, headers)
        count += 1
        producer.poll(0)
else:
    sys.exit(f"unknown mode {mode}")

remaining = producer.flush(60)
if failures or remaining:
    sys.exit(f"{len(failures)} deliveries failed, {remaining} not delivered: {failures[:3]}")
print(count)
