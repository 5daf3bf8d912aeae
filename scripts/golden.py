#!/usr/bin/env python3
"""Golden values from independent implementations: tests/fixtures/golden.json.

    .venv/bin/python scripts/golden.py            # rewrite the fixture (needs redis-server on PATH)
    .venv/bin/python scripts/golden.py --check    # exit 1 if the fixture differs from what this computes now

Nothing here calls the Rust code. The Rust tests (tests/golden.rs) compare their own output with these literals, so a
change of the point-id namespace, of the text format or of the envelope serialisation fails a test instead of
silently re-keying every point (duplicates after an upgrade) or writing messages Python reads differently.

- point ids and derived event ids: Python's uuid.uuid5;
- text_representation: the Python original's format (services/vectordb: f-strings joined with " | "), re-typed
  here from the seed's description, with Python's own int/float printing;
- the Celery envelope: real Celery 5.7 `app.send_task(...)` onto a private redis-server, read back with LRANGE.
  Its random parts (delivery_tag, reply_to, origin) are recorded so the Rust side can use the same values.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "golden.json"

# --- point ids ------------------------------------------------------------------------------------------------------

POINT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "aura360:vectordb:user_context")


def point_id(origin_event_id: str, chunk_index: int) -> str:
    return str(uuid.uuid5(POINT_NAMESPACE, f"{origin_event_id}:{chunk_index}"))


def derived_event_id(cause_event_id: str, event_type: str, index: int) -> str:
    return str(uuid.uuid5(uuid.UUID(cause_event_id), f"{event_type}/{index}"))


# --- text_representation ----------------------------------------------------------------------------------------------


def text_representation(event: dict) -> str:
    """The Python original's snapshot text: f-strings of the values as the producer sent them, joined by " | "."""
    data = event.get("data") or {}
    parts = [f"User: {event['user_id']}"]
    if event["event_type"] == "user.mood.created":
        score = data.get("mood_score")
        if score is None:
            score = data.get("level")  # Django's shape
        parts.append(f"Mood Score: {score}/10")
        tags = data.get("tags") or []
        if tags:
            parts.append(f"Mood Tags: {', '.join(tags)}")
        notes = data.get("notes")
        if notes is None:
            notes = data.get("note")
        if notes and notes.strip():
            parts.append(f"Notes: {notes.strip()}")
    else:
        parts.append(f"Activity: {data.get('activity_type') or data.get('type')}")
        duration = data.get("duration", data.get("duration_minutes"))
        if duration is not None:
            parts.append(f"Duration: {duration} minutes")
        calories = data.get("calories", data.get("calories_burned"))
        if calories is not None:
            parts.append(f"Calories: {calories}")
    return " | ".join(parts)


def event(event_id, event_type, user, data, trace="trace-golden"):
    return {
        "event_id": event_id,
        "event_type": event_type,
        "timestamp": "2025-03-01T08:00:00",
        "trace_id": trace,
        "user_id": user,
        "metadata": {},
        "data": data,
    }


TEXT_EVENTS = [
    event("6513270e-269e-4d37-b2a7-4de452e6b438", "user.mood.created", "user-7",
          {"mood_score": 7, "tags": ["calm", "focused"], "notes": "slept well", "created_at": "2025-03-01T08:00:00"}),
    event("0225c3ab-b554-4264-908a-cbed3a5fcde9", "user.mood.created", "user-7",
          {"mood_score": 7.0, "tags": [], "notes": "  a float score, padded notes  "}),
    event("d23f0824-128b-4f33-8c5c-7fd0a6a3a450", "user.mood.created", "user-8",
          {"mood_score": 6.5, "tags": ["ánimo", "日本"], "notes": "señal — “quotes” 😀"}),
    event("7f9c1c52-3a9d-4a83-9d4c-1b2f0a3e5d61", "user.mood.created", "django-user-1",
          {"mood_id": 42, "level": 3, "recorded_at": "2025-03-01T21:15:00+01:00", "note": "tired after the night shift",
           "tags": ["tired"]}),
    event("a1b2c3d4-0000-4000-8000-000000000001", "user.mood.created", "user-9",
          {"mood_score": 2, "tags": ["sad"], "notes": "   "}),
    event("a1b2c3d4-0000-4000-8000-000000000002", "user.activity.created", "user-9",
          {"activity_type": "yoga", "duration": 30, "calories": 120}),
    event("a1b2c3d4-0000-4000-8000-000000000003", "user.activity.created", "user-9",
          {"activity_type": "run", "duration": 42.5, "calories": 310.0}),
    event("a1b2c3d4-0000-4000-8000-000000000004", "user.activity.created", "user-9",
          {"activity_type": "walk"}),
]

# --- the Celery envelope ----------------------------------------------------------------------------------------------

ENVELOPE_EVENT = event(
    "6513270e-269e-4d37-b2a7-4de452e6b438", "user.mood.created", "user-0",
    {"mood_score": 9.5, "tags": ["anxious", "stressed"], "notes": "felt sore after work — “ok” 😀 \\ \"q\"",
     "created_at": "2026-11-01T08:00:00", "nested": {"a": [1, 2.25, None, True], "b": {}}},
    trace="d23f0824-128b-4f33-8c5c-7fd0a6a3a450",
)
ENVELOPE_TASK_ID = "0225c3ab-b554-4264-908a-cbed3a5fcde9"

# Celery's saferepr quotes strings its own way (not Python's repr); a note with quotes, a newline and a tab shows it,
# and a long one shows where argsrepr is cut.
ENVELOPES = [
    ("mixed_json", ENVELOPE_EVENT, ENVELOPE_TASK_ID),
    ("quotes_and_newlines",
     event("3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b", "user.activity.created", "o'brien",
           {"activity_type": "it's a \"run\"", "duration": 30.0, "calories": 250, "notes": "line 1\nline 2\tend"},
           trace=None),
     "9e8d7c6b-5a49-4837-a261-5f4e3d2c1b0a"),
    ("long_notes",
     event("0f0e0d0c-0b0a-4909-8807-060504030201", "user.mood.created", "user-long",
           {"mood_score": 4, "tags": ["a", "b", "c"], "notes": "word " * 400}),
     "1a2b3c4d-5e6f-4a0b-8c1d-2e3f4a5b6c7d"),
]


TASK_NAMES = {
    "user.mood.created": "vectosvc.worker.tasks.process_mood_created",
    "user.activity.created": "vectosvc.worker.tasks.process_activity_created",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def celery_envelopes() -> list:
    from celery import Celery
    import redis

    port = free_port()
    workdir = tempfile.mkdtemp(prefix="golden-redis-")
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        app = Celery("golden", broker=f"redis://127.0.0.1:{port}/0")
        envelopes = []
        for name, sent, task_id in ENVELOPES:
            task = TASK_NAMES[sent["event_type"]]
            app.send_task(task, args=[sent], task_id=task_id, queue="vectordb")
            raw = client.rpop("vectordb")
            assert raw is not None and client.llen("vectordb") == 0
            raw = raw.decode("utf-8")
            envelope = json.loads(raw)
            envelopes.append({
                "name": name,
                "task": task,
                "queue": "vectordb",
                "args": [sent],
                "task_id": task_id,
                # Random per process or message in Celery: the Rust side is given the same values.
                "origin": envelope["headers"]["origin"],
                "reply_to": envelope["properties"]["reply_to"],
                "delivery_tag": envelope["properties"]["delivery_tag"],
                "raw": raw,
            })
        return envelopes
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def compute() -> dict:
    import celery
    origins = ["6513270e-269e-4d37-b2a7-4de452e6b438", "origin-1", "ñ-unicode-origin"]
    return {
        "generator": "scripts/golden.py",
        "celery_version": celery.__version__,
        "point_namespace": str(POINT_NAMESPACE),
        "point_ids": [
            {"origin": o, "chunk": c, "id": point_id(o, c)} for o in origins for c in (0, 1, 39)
        ],
        "derived_event_ids": [
            {"cause": o, "event_type": t, "index": i, "id": derived_event_id(o, t, i)}
            for o in origins[:1] for t in ("context.aggregated", "context.vectorized") for i in (0, 1)
        ],
        "texts": [{"event": e, "text": text_representation(e)} for e in TEXT_EVENTS],
        "envelopes": celery_envelopes(),
    }


def stable(golden: dict) -> dict:
    """What --check compares: everything but the envelope's per-run random parts (they are inputs, not outputs)."""
    golden = json.loads(json.dumps(golden))
    for env in golden["envelopes"]:
        raw = json.loads(env.pop("raw"))
        raw["headers"].pop("origin")
        raw["properties"].pop("reply_to")
        raw["properties"].pop("delivery_tag")
        env["raw_without_random_parts"] = raw
        for key in ("origin", "reply_to", "delivery_tag"):
            env.pop(key)
    return golden


def main() -> int:
    golden = compute()
    if "--check" in sys.argv:
        current = json.loads(FIXTURE.read_text(encoding="utf-8"))
        if stable(current) != stable(golden):
            print(f"{FIXTURE} differs from what scripts/golden.py computes now", file=sys.stderr)
            return 1
        print("golden values unchanged")
        return 0
    FIXTURE.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
