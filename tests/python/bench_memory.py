"""Peak memory of vectordb-consumer and vectordb-worker working off a backlog (BENCHMARKS.md, "Memory").

    bench_memory.py BIN_DIR BOOTSTRAP REDIS_URL [--events N] [--mixed-events M] [--journal-every K]

For each mount, two backlogs: N ordinary mood events (the Python services' shape), then M events of which every
K-th is a journal entry of 50 KB to 900 KB (same users, so journals sit among ordinary events of the same key).
The backlog is written first (Kafka: a confluent-kafka producer; Celery: `vectordb publish`, which writes what
`send_task` writes), then the process starts on it with an empty embedded store and runs until everything is done
(Kafka: every topic committed to its end; Celery: queue and `unacked` empty). Peak RSS is the kernel's high-water
mark (`VmHWM`), read while the process runs. Prints a Markdown table.
"""
import argparse
import atexit
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime

import redis
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

TOPICS = ["aura360.user.events", "aura360.context.aggregated", "aura360.context.vectorized"]


def mood(i, rng, journal):
    now = datetime.utcnow().isoformat()
    notes = rng.choice(["long day at work", "slept well", "anxious about a deadline", "great run"])
    if journal:
        sentence = "Today I wrote about the move, the new job and my sister. "
        size = rng.randint(50_000, 900_000)
        notes = (sentence * (size // len(sentence) + 1))[:size]
    return {
        "event_id": str(uuid.uuid4()), "event_type": "user.mood.created", "timestamp": now,
        "trace_id": str(uuid.uuid4()), "user_id": f"user-{i % 50}", "metadata": {"source": "django-api"},
        "data": {"mood_score": rng.randint(1, 10), "tags": ["work", "sleep"], "notes": notes, "created_at": now},
    }


def backlog(count, journal_every, seed):
    rng = random.Random(seed)
    return [mood(i, rng, journal_every > 0 and i % journal_every == 0) for i in range(count)]


def memory_kb(pid):
    """`VmHWM` (peak RSS), `RssAnon` and `RssFile` (now) of `pid`, in KB."""
    fields = {"VmHWM:": 0, "RssAnon:": 0, "RssFile:": 0}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                name = line.split(":")[0] + ":"
                if name in fields:
                    fields[name] = int(line.split()[1])
    except OSError:
        pass
    return fields["VmHWM:"], fields["RssAnon:"], fields["RssFile:"]


def run(command, env, done, limit=1800):
    """Runs `command` until `done()` holds; returns ((peak RSS, most anonymous RSS, most file-backed RSS seen) in MB,
    seconds). The last two are sampled every 50 ms: file-backed pages are the embedded store's memory-mapped files."""
    started = time.time()
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    peak, anon, mapped, last_check = 0, 0, 0, 0.0
    try:
        while True:
            hwm, now_anon, now_file = memory_kb(process.pid)
            peak, anon, mapped = max(peak, hwm), max(anon, now_anon), max(mapped, now_file)
            if process.poll() is not None:
                log.seek(0)
                sys.exit(f"{command[0]} exited {process.returncode}:\n{log.read().decode()[-4000:]}")
            if time.time() - last_check > 1.0:
                last_check = time.time()
                if done():
                    break
            if time.time() - started > limit:
                sys.exit(f"{command[0]}: not done after {limit} s")
            time.sleep(0.05)
        elapsed = time.time() - started
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    return (peak / 1024, anon / 1024, mapped / 1024), elapsed


def produce_backlog(bootstrap, topic, events, compression="lz4"):
    """The backlog on `topic`, as the services' confluent-kafka producer sends it."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "compression.type": compression, "linger.ms": 5})
    for event in events:
        while True:
            try:
                producer.produce(topic, key=event["user_id"], value=json.dumps(event),
                                 headers={"event_type": event["event_type"], "event_id": event["event_id"]})
                break
            except BufferError:
                producer.poll(0.1)
    producer.flush(120)


def chain_drained(bootstrap, group, prefix, count):
    """A check (and the consumer it asks with): the whole chain of `count` events committed to its end."""
    watcher = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})

    def done():
        ends = committed = 0
        try:
            for topic in TOPICS:
                parts = [TopicPartition(prefix + topic, p) for p in range(3)]
                for tp in watcher.committed(parts, timeout=30):
                    committed += max(tp.offset, 0)
                for p in range(3):
                    ends += watcher.get_watermark_offsets(TopicPartition(prefix + topic, p), timeout=30)[1]
        except KafkaException:  # a busy broker: ask again next time
            return False
        return committed == ends and ends >= 3 * count

    return done, watcher


def store_dir(prefix):
    """A fresh folder for a process's embedded store, removed when the bench exits (a run writes 60-100 MB each)."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def publish_tasks(bin_dir, env, events):
    """The backlog as Celery tasks (`vectordb publish` writes what `send_task` writes)."""
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as handle:
        for event in events:
            handle.write(json.dumps(event) + "\n")
    subprocess.run([os.path.join(bin_dir, "vectordb"), "publish", "--events", handle.name, "--json"], env=env,
                   check=True, stdout=subprocess.DEVNULL)
    os.unlink(handle.name)


def kafka_case(args, name, events):
    prefix = f"bench-mem-{name}-{uuid.uuid4().hex[:8]}."
    group = prefix + "group"
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=args.bootstrap, KAFKA_TOPIC_PREFIX=prefix, KAFKA_GROUP_ID=group,
               KAFKA_FETCH_WAIT_MAX_MS="20", MESSAGING_BACKEND="kafka", HTTP_ADDR="127.0.0.1:0",
               QDRANT_PATH=store_dir("bench-mem-qdrant-"), RUST_LOG="warn")
    subprocess.run([os.path.join(args.bin_dir, "vectordb"), "topics", "create", "--json"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    produce_backlog(args.bootstrap, prefix + TOPICS[0], events)
    done, watcher = chain_drained(args.bootstrap, group, prefix, len(events))
    peak, seconds = run([os.path.join(args.bin_dir, "vectordb-consumer")], env, done)
    watcher.close()
    return peak, seconds


def celery_backlog(args, events, **settings):
    """A fresh database of the benchmark's own redis-server (never a shared one) holding `events` as tasks, and
    the worker's environment on it: (redis client, env)."""
    url = f"{args.redis}/{args.redis_db}"
    args.redis_db += 1
    client = redis.Redis.from_url(url)
    client.flushdb()
    env = dict(os.environ, BROKER_URL=url, RESULT_BACKEND=url, MESSAGING_BACKEND="celery", HTTP_ADDR="127.0.0.1:0",
               RUST_LOG="warn", CELERY_TASK_EVENTS="false", **settings)
    publish_tasks(args.bin_dir, env, events)
    return client, env


def celery_case(args, name, events):
    client, env = celery_backlog(args, events, QDRANT_PATH=store_dir("bench-mem-qdrant-"))
    idle_since = [None]

    def done():
        idle = client.llen("vectordb") == 0 and client.hlen("unacked") == 0
        if not idle:
            idle_since[0] = None
            return False
        idle_since[0] = idle_since[0] or time.time()
        return time.time() - idle_since[0] > 2

    return run([os.path.join(args.bin_dir, "vectordb-worker")], env, done)


def bench_arguments(events, **options):
    """The arguments every bench script takes (the binaries' folder, Kafka's bootstrap, a redis-server of the
    bench's own, --events) and `options` (name: default), parsed."""
    parser = argparse.ArgumentParser()
    for positional in ("bin_dir", "bootstrap", "redis"):
        parser.add_argument(positional)
    parser.add_argument("--events", type=int, default=events)
    for name, default in options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = parser.parse_args()
    args.redis_db = 0
    return args


def main():
    args = bench_arguments(20_000, mixed_events=5_000, journal_every=50, mounts="kafka,celery")
    ordinary = backlog(args.events, 0, 1)
    mixed = backlog(args.mixed_events, args.journal_every, 2)
    journal_mb = sum(len(e["data"]["notes"]) for e in mixed if len(e["data"]["notes"]) > 1000) / 1e6
    rows = []
    cases = (("kafka", "vectordb-consumer (Kafka)", kafka_case), ("celery", "vectordb-worker (Celery, Redis)", celery_case))
    for key, mount, case in cases:
        if key not in args.mounts.split(","):
            continue
        for label, events in (("ordinary", ordinary), ("mixed", mixed)):
            peak, seconds = case(args, label, events)
            rows.append((mount, label, len(events), peak, seconds))
            print(f"{mount} {label}: {peak[0]:.0f} MB peak RSS, {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"Backlogs: ordinary = {args.events} mood events; mixed = {args.mixed_events} events, every "
          f"{args.journal_every}th a journal entry of 50-900 KB ({journal_mb:.0f} MB of journal text).\n")
    print("| process | backlog | events | peak RSS | most anonymous / file-backed RSS | time to drain |")
    print("|---|---|---:|---:|---:|---:|")
    for mount, label, count, (peak, anon, mapped), seconds in rows:
        print(f"| {mount} | {label} | {count} | {peak:.0f} MB | {anon:.0f} / {mapped:.0f} MB | {seconds:.0f} s |")


if __name__ == "__main__":
    main()
