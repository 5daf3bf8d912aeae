"""Drives Celery from Python like the Django API does: send_task, AsyncResult, inspect, events.

  send    --count N [--type T] [--priority P] [--countdown S] [--time-limit F] [--expires S] [--wait S] [--json-out F]
          [--notes-size C]
          sends N events as tasks with app.send_task; with --wait, waits for every AsyncResult and reports states;
          --notes-size makes each mood's notes a journal entry of C characters
  results --ids-file F --wait S   waits for the given task ids
  foreign --count N [--queue Q]   sends N `pdf.render` tasks (the Python app's own; default route: `celery`, or
                                  MEDIA_QUEUE's named exchange)
  hostile                         sends legal-but-extreme tasks among good ones (see `hostile()`): prints
                                  {"cases": {name: {"id", "expect"}}}
  ping    --timeout S             `celery inspect ping`: prints {hostname: reply}
  inspect --method M              any inspect method (stats, active, registered, active_queues)
  events  --seconds S             app.events.Receiver for S seconds: prints a JSON list of received events
Environment: BROKER_URL, RESULT_BACKEND (see celery_app.py).
"""
import argparse
import json
import sys
import time
import uuid
from datetime import datetime, timezone

sys.path.insert(0, __import__("os").path.dirname(__file__))
from celery_app import TASKS, app  # noqa: E402


def event(kind, user, n):
    base = {
        "event_id": str(uuid.uuid4()),
        "event_type": kind,
        "timestamp": datetime.utcnow().isoformat(),
        "trace_id": str(uuid.uuid4()),
        "user_id": user,
        "metadata": {"source": "celery_client", "n": n},
    }
    if kind == "user.mood.created":
        base["data"] = {"mood_score": 1 + n % 10, "tags": ["calm", f"t{n % 7}"],
                        "notes": f"note number {n} é", "created_at": base["timestamp"]}
    elif kind == "user.activity.created":
        base["data"] = {"activity_type": "run", "duration_minutes": 10 + n % 50, "calories_burned": 100 + n}
    return base


def wait_all(ids, timeout):
    states = {}
    deadline = time.time() + timeout
    for task_id in ids:
        result = app.AsyncResult(task_id)
        try:
            value = result.get(timeout=max(0.1, deadline - time.time()), propagate=False)
            states[task_id] = {"state": result.state, "result": value if isinstance(value, (dict, list, str, int, float, type(None))) else repr(value)}
        except Exception as exc:  # timeout
            states[task_id] = {"state": "TIMEOUT", "error": repr(exc)}
    return states


def hostile():
    """Every header and body field Python can legally send, at its extremes, each with the terminal state Celery
    reports for it: SUCCESS, FAILURE (plus a dead letter on our side) or REVOKED (expired)."""
    mood = TASKS["user.mood.created"]
    cases = {}

    def send(name, expect, args=None, kwargs=None, **options):
        ev = event("user.mood.created", f"hostile-{name}", len(cases))
        res = app.send_task(mood, args=[ev] if args is None else args, kwargs=kwargs, **options)
        cases[name] = {"id": res.id, "expect": expect}

    inf, nan = float("inf"), float("nan")
    send("good-1", "SUCCESS")
    send("time-limit-1e308", "SUCCESS", time_limit=1e308)
    send("time-limit-inf", "SUCCESS", time_limit=inf)              # json.dumps writes Infinity
    send("time-limit-nan", "SUCCESS", time_limit=nan, soft_time_limit=nan)
    send("soft-time-limit-1e308", "SUCCESS", soft_time_limit=1e308)
    send("time-limit-negative", "SUCCESS", time_limit=-5)
    send("countdown-negative", "SUCCESS", countdown=-3600)
    send("countdown-fraction", "SUCCESS", countdown=0.001)
    send("eta-epoch", "SUCCESS", eta=datetime(1970, 1, 1, tzinfo=timezone.utc))
    send("expires-past", "REVOKED", expires=-10)
    send("expires-epoch", "REVOKED", expires=datetime(1970, 1, 1, tzinfo=timezone.utc))
    send("expires-far", "SUCCESS", expires=datetime(9999, 12, 31, tzinfo=timezone.utc))
    send("retries-huge", "SUCCESS", retries=2**63)
    send("retries-negative", "SUCCESS", retries=-1)
    send("priority-255", "SUCCESS", priority=255)
    send("priority-0", "SUCCESS", priority=0)
    send("args-empty", "FAILURE", args=[])
    send("args-extra", "FAILURE", args=[event("user.mood.created", "x", 1), "extra"])
    send("args-not-an-event", "FAILURE", args=[42])
    send("args-none-kwargs-event", "SUCCESS", args=[], kwargs={"event": event("user.mood.created", "kw", 2)})
    send("kwargs-unexpected", "SUCCESS", kwargs={"unexpected": [1, 2, 3]})
    ev = event("user.mood.created", "nan", 3)
    ev["data"]["mood_score"] = nan                                    # NaN inside the event: not JSON
    send("event-nan", "FAILURE", args=[ev])
    ev = event("user.mood.created", "inf", 4)
    ev["metadata"]["weight"] = -inf
    send("event-infinity", "FAILURE", args=[ev])
    send("good-2", "SUCCESS")
    return cases


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    send = sub.add_parser("send")
    send.add_argument("--count", type=int, default=1)
    send.add_argument("--type", default="user.mood.created")
    send.add_argument("--users", type=int, default=10)
    send.add_argument("--priority", type=int)
    send.add_argument("--countdown", type=float)
    send.add_argument("--time-limit", type=float)
    send.add_argument("--soft-time-limit", type=float)
    send.add_argument("--expires", type=float)
    send.add_argument("--queue", default="vectordb")
    send.add_argument("--notes-size", type=int)
    send.add_argument("--wait", type=float)
    foreign = sub.add_parser("foreign")
    foreign.add_argument("--count", type=int, default=1)
    foreign.add_argument("--queue")
    sub.add_parser("hostile")
    results = sub.add_parser("results")
    results.add_argument("--ids-file", required=True)
    results.add_argument("--wait", type=float, default=60)
    ping = sub.add_parser("ping")
    ping.add_argument("--timeout", type=float, default=2.0)
    inspect = sub.add_parser("inspect")
    inspect.add_argument("--method", required=True)
    inspect.add_argument("--timeout", type=float, default=2.0)
    events = sub.add_parser("events")
    events.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()

    if args.cmd == "send":
        options = {"queue": args.queue}
        for key in ("priority", "countdown", "time_limit", "soft_time_limit", "expires"):
            value = getattr(args, key)
            if value is not None:
                options[key] = value
        ids, events_sent = [], []
        for n in range(args.count):
            ev = event(args.type, f"user-{n % args.users}", n)
            if args.notes_size:
                sentence = "today I wrote and wrote about everything. "
                ev["data"]["notes"] = (sentence * (args.notes_size // len(sentence) + 1))[:args.notes_size]
            res = app.send_task(TASKS[args.type], args=[ev], **options)
            ids.append(res.id)
            # A journal entry is not echoed back whole: the caller needs its id, not megabytes of output.
            events_sent.append(ev if not args.notes_size else {"event_id": ev["event_id"]})
        out = {"ids": ids, "events": events_sent}
        if args.wait:
            out["states"] = wait_all(ids, args.wait)
        print(json.dumps(out))
    elif args.cmd == "foreign":
        options = {"queue": args.queue} if args.queue else {}
        ids = [app.send_task("pdf.render", args=[f"doc-{n}"], **options).id for n in range(args.count)]
        print(json.dumps({"ids": ids}))
    elif args.cmd == "hostile":
        print(json.dumps({"cases": hostile()}))
    elif args.cmd == "results":
        with open(args.ids_file) as handle:
            ids = json.load(handle)
        print(json.dumps(wait_all(ids, args.wait)))
    elif args.cmd == "ping":
        print(json.dumps(app.control.inspect(timeout=args.timeout).ping() or {}))
    elif args.cmd == "inspect":
        print(json.dumps(getattr(app.control.inspect(timeout=args.timeout), args.method)() or {}, default=repr))
    elif args.cmd == "events":
        received = []
        with app.connection() as connection:
            recv = app.events.Receiver(connection, handlers={"*": received.append})
            try:
                recv.capture(limit=None, timeout=args.seconds, wakeup=False)
            except Exception:  # socket timeout ends the capture
                pass
        print(json.dumps(received, default=repr))


if __name__ == "__main__":
    main()
