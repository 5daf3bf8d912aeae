"""A Python Celery 5 app with the vectordb task names: the foreign peer of the Rust worker in tests and benchmarks.

Configured by environment variables (so one module serves every test):
  BROKER_URL, RESULT_BACKEND   as the services use them
  VISIBILITY_TIMEOUT           kombu's visibility_timeout in seconds (default 3600)
  RECORD_KEY                   if set, each task RPUSHes {task, id, args, kwargs, parent_id, root_id, hostname} there
  TASK_MODE                    "record" (default): return {"ok": True, "event_id": ...};
                               "forward": like "record", and user.* tasks send the next task (context.aggregated)
                               — the benchmark's task semantics, mirrored by the Rust side.
  SLOW_TASK_SECONDS            sleep this long in every task (to kill a worker mid-task)
  MEDIA_QUEUE                  if set, declares that queue bound to the direct exchange `media` with routing key
                               `media.pdf`, and routes the app's own `pdf.render` task there (a named exchange, as
                               the Python services' batch jobs use)

Besides the vectordb task names (routed to the `vectordb` queue), the app has a task of its own, `pdf.render` —
foreign to the Rust worker — on the default `celery` queue (or MEDIA_QUEUE).
"""
import json
import os
import time
import uuid
from datetime import datetime, timezone

import redis
from celery import Celery
from kombu import Exchange, Queue

BROKER_URL = os.environ.get("BROKER_URL", "redis://127.0.0.1:6379/0")
RESULT_BACKEND = os.environ.get("RESULT_BACKEND", BROKER_URL)

app = Celery("aura360_vectordb", broker=BROKER_URL, backend=RESULT_BACKEND)
app.conf.update(
    task_acks_late=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": int(os.environ.get("VISIBILITY_TIMEOUT", "3600"))},
    worker_prefetch_multiplier=int(os.environ.get("PREFETCH_MULTIPLIER", "4")),
    worker_hijack_root_logger=False,
    # The vectordb tasks have a queue of their own (docs/celery.md, "Celery queues"), as in the Python services.
    task_routes={"vectosvc.worker.tasks.*": {"queue": "vectordb"}},
)
MEDIA_QUEUE = os.environ.get("MEDIA_QUEUE")
if MEDIA_QUEUE:
    app.conf.task_queues = [
        Queue("celery"),
        Queue("vectordb"),
        Queue(MEDIA_QUEUE, Exchange("media", type="direct"), routing_key="media.pdf"),
    ]
    app.conf.task_routes = {
        "vectosvc.worker.tasks.*": {"queue": "vectordb"},
        # Through the named exchange (Celery publishes a plain `queue` route of a direct exchange to the default
        # exchange instead).
        "pdf.*": {"queue": MEDIA_QUEUE, "exchange": "media", "routing_key": "media.pdf"},
    }

RECORD_KEY = os.environ.get("RECORD_KEY")
TASK_MODE = os.environ.get("TASK_MODE", "record")
SLOW = float(os.environ.get("SLOW_TASK_SECONDS", "0"))
_redis = None

TASKS = {
    "user.mood.created": "vectosvc.worker.tasks.process_mood_created",
    "user.activity.created": "vectosvc.worker.tasks.process_activity_created",
    "context.aggregated": "vectosvc.worker.tasks.process_context_aggregated",
    "context.vectorized": "vectosvc.worker.tasks.ingest_vectors",
}


def _record(task, args, kwargs):
    global _redis
    if not RECORD_KEY:
        return
    if _redis is None:
        _redis = redis.Redis.from_url(BROKER_URL)
    request = task.request
    _redis.rpush(RECORD_KEY, json.dumps({
        "task": task.name, "id": request.id, "args": list(args), "kwargs": kwargs,
        "parent_id": request.parent_id, "root_id": request.root_id, "hostname": request.hostname,
        "retries": request.retries,
    }))


def _forward(event):
    """The benchmark's one hop: a user event becomes a context.aggregated event, sent as its task."""
    if not str(event.get("event_type", "")).startswith("user."):
        return
    metadata = dict(event.get("metadata") or {})
    metadata["causation_id"] = event["event_id"]
    nxt = {
        "event_id": str(uuid.uuid4()),
        "event_type": "context.aggregated",
        "timestamp": datetime.now(timezone.utc).isoformat(),
        "trace_id": event.get("trace_id"),
        "user_id": event.get("user_id"),
        "metadata": metadata,
        "context_data": {"mood_summary": event.get("data")},
    }
    app.send_task(TASKS["context.aggregated"], args=[nxt])


def _make(name):
    @app.task(name=name, bind=True)
    def run(self, *args, **kwargs):
        if SLOW:
            time.sleep(SLOW)
        _record(self, args, kwargs)
        event = args[0] if args and isinstance(args[0], dict) else {}
        if TASK_MODE == "forward":
            _forward(event)
        return {"ok": True, "event_id": event.get("event_id")}
    return run


for _task_name in TASKS.values():
    _make(_task_name)


@app.task(name="pdf.render", bind=True)
def pdf_render(self, document_id):
    """One of the Python services' own batch jobs: no Rust worker knows it."""
    if SLOW:
        time.sleep(SLOW)
    _record(self, (document_id,), {})
    return {"rendered": document_id}
