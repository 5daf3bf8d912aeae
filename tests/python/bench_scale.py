"""Throughput as processes are added (BENCHMARKS.md, "Scale-out"): one backlog worked off by 1, 2 and 3
vectordb-consumers in one consumer group, and by 1 and 2 vectordb-workers on one Redis.

    bench_scale.py BIN_DIR BOOTSTRAP REDIS_URL [--events N] [--consumers 1,2,3] [--workers 1,2]

The hash embedder (EMBEDDING_PROVIDER=hash): the broker and the runtime are measured, not the model. Each process
has its own embedded store (embedded Qdrant is one process's). For each count, a fresh backlog of N mood events is
written first (Kafka: a confluent-kafka producer into new topics of 3 partitions; Celery: `vectordb publish` into a
fresh database), then the processes start together; the time runs from their start until the whole chain is done
(Kafka: every topic committed to its end; Celery: 3N results stored, the queue and `unacked` empty). Also counted:
assignments logged by the consumers (a rebalance storm would show here). Prints a Markdown table.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid


sys.path.insert(0, os.path.dirname(__file__))
from bench_memory import (  # noqa: E402
    TOPICS, backlog, bench_arguments, celery_backlog, chain_drained, produce_backlog, store_dir)


def start(command, env, count, name):
    processes = []
    for i in range(count):
        log = tempfile.NamedTemporaryFile(prefix=f"bench-scale-{name}-{i}-", suffix=".log", delete=False)
        member_env = dict(env, QDRANT_PATH=store_dir("bench-scale-qdrant-"),
                          CELERY_WORKER_NAME=f"{name}-{i}@bench")
        processes.append((subprocess.Popen(command, env=member_env, stdout=subprocess.DEVNULL, stderr=log), log))
    return processes


def stop(processes):
    for process, _ in processes:
        process.send_signal(signal.SIGTERM)
    for process, _ in processes:
        process.wait(timeout=60)


def wait(processes, done, limit=1800):
    started = time.time()
    while not done():
        for process, log in processes:
            if process.poll() is not None:
                sys.exit(f"a process exited {process.returncode}: {open(log.name).read()[-3000:]}")
        if time.time() - started > limit:
            sys.exit(f"not done after {limit} s")
        time.sleep(0.25)


def kafka_run(args, count, events):
    prefix = f"bench-scale-{count}-{uuid.uuid4().hex[:8]}."
    group = prefix + "group"
    env = dict(os.environ, KAFKA_BOOTSTRAP_SERVERS=args.bootstrap, KAFKA_TOPIC_PREFIX=prefix, KAFKA_GROUP_ID=group,
               MESSAGING_BACKEND="kafka", HTTP_ADDR="127.0.0.1:0", EMBEDDING_PROVIDER="hash", RUST_LOG="info")
    subprocess.run([os.path.join(args.bin_dir, "vectordb"), "topics", "create", "--json"], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    produce_backlog(args.bootstrap, prefix + TOPICS[0], events, compression="snappy")
    done, watcher = chain_drained(args.bootstrap, group, prefix, len(events))

    started = time.time()
    processes = start([os.path.join(args.bin_dir, "vectordb-consumer")], env, count, "consumer")
    wait(processes, done)
    elapsed = time.time() - started
    stop(processes)
    watcher.close()
    assignments = sum(open(log.name).read().count("partitions assigned") for _, log in processes)
    return elapsed, assignments


def celery_run(args, count, events):
    client, env = celery_backlog(args, events, EMBEDDING_PROVIDER="hash")

    def done():
        if client.hlen("unacked") or any(client.llen(k) for k in client.scan_iter(b"vectordb*")
                                         if client.type(k) == b"list" and not k.endswith(b".dlq")):
            return False
        return sum(1 for _ in client.scan_iter(b"celery-task-meta-*", count=10_000)) >= 3 * len(events)

    started = time.time()
    processes = start([os.path.join(args.bin_dir, "vectordb-worker")], env, count, "worker")
    wait(processes, done)
    elapsed = time.time() - started
    stop(processes)
    return elapsed, 0


def main():
    args = bench_arguments(6_000, consumers="1,2,3", workers="1,2")
    rows = []
    for mount, run, counts in (("vectordb-consumer (Kafka)", kafka_run, args.consumers),
                               ("vectordb-worker (Celery)", celery_run, args.workers)):
        for count in (int(c) for c in counts.split(",") if c):
            events = backlog(args.events, 0, count)
            elapsed, assignments = run(args, count, events)
            rows.append((mount, count, len(events), elapsed, assignments))
            print(f"{mount} x{count}: {len(events) / elapsed:.0f} events/s ({elapsed:.1f} s)", file=sys.stderr,
                  flush=True)
    print(f"Backlog: {args.events} mood events through all three hops (hash embedder, 3 partitions per topic).\n")
    print("| processes | count | events/s | time to drain | assignments logged |")
    print("|---|---:|---:|---:|---:|")
    for mount, count, total, elapsed, assignments in rows:
        shown = str(assignments) if mount.startswith("vectordb-consumer") else "-"
        print(f"| {mount} | {count} | {total / elapsed:.0f} | {elapsed:.1f} s | {shown} |")


if __name__ == "__main__":
    main()
