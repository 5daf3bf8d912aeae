"""publish_event: one event onto the backend MESSAGING_BACKEND names, in the wire format the Rust runtime reads.

Kafka (``MESSAGING_BACKEND=kafka``, the default)
    topic ``KAFKA_TOPIC_PREFIX`` + ``aura360.user.events`` (every ``user.*`` type), ``aura360.context.aggregated`` or
    ``aura360.context.vectorized``; key = ``user_id`` (UTF-8; none without a user); headers ``event_type``, ``event_id``,
    ``trace_id`` (empty when none); value = the event's JSON. Producer ``acks=all``, ``enable.idempotence=true``, lz4.
    ``publish_event`` returns once the broker acknowledged the record.
Celery (``MESSAGING_BACKEND=celery``)
    ``app.send_task(<task>, args=[event], queue=CELERY_PUBLISH_QUEUE)`` on ``BROKER_URL``; tasks
    ``vectosvc.worker.tasks.process_mood_created`` / ``process_activity_created`` / ``process_context_aggregated`` /
    ``ingest_vectors``. The queue defaults to the first of ``CELERY_QUEUES`` (``vectordb``), where vectordb-worker
    listens.
Disabled (``MESSAGING_BACKEND=disabled``)
    nothing is sent; the event is counted and logged.
Fallback (``MESSAGING_FALLBACK=celery``, with ``MESSAGING_BACKEND=kafka`` only)
    an event Kafka refuses or does not acknowledge within ``MESSAGING_FALLBACK_TIMEOUT_MS`` is sent as a Celery task.
    After ``MESSAGING_FALLBACK_FAILURES`` failures in a row Kafka is not tried for ``MESSAGING_FALLBACK_OPEN_S``
    seconds; then one event probes it (success closes the circuit). The same semantics as the Rust runtime's.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Mapping, Optional

log = logging.getLogger("aura360_events")

USER_EVENTS_TOPIC = "aura360.user.events"
CONTEXT_AGGREGATED_TOPIC = "aura360.context.aggregated"
CONTEXT_VECTORIZED_TOPIC = "aura360.context.vectorized"

TASKS: Dict[str, str] = {
    "user.mood.created": "vectosvc.worker.tasks.process_mood_created",
    "user.activity.created": "vectosvc.worker.tasks.process_activity_created",
    "context.aggregated": "vectosvc.worker.tasks.process_context_aggregated",
    "context.vectorized": "vectosvc.worker.tasks.ingest_vectors",
}

BACKENDS = ("kafka", "celery", "disabled")


class PublishError(Exception):
    """The backend did not take the event (down, timed out, refused). Retrying may succeed."""

    def __init__(self, backend: str, event: Mapping[str, Any], reason: str) -> None:
        super().__init__(f"publishing {event.get('event_type')} {event.get('event_id')} via {backend} failed: {reason}")
        self.backend = backend
        self.reason = reason


class RefusedEvent(PublishError):
    """Kafka refused the record itself (too large, invalid, not authorised): another attempt or another backend will
    not fix it, so the fallback is not used, as in the Rust runtime."""


class UnroutableEvent(ValueError):
    """The event cannot be published anywhere: no topic or task for its type, or no event_type at all."""


class ConfigError(ValueError):
    """A setting has a value the runtime does not accept; the message names the variable."""


# librdkafka error codes that refuse the record itself (the Rust publisher's `is_permanent`, by number).
_PERMANENT_KAFKA_CODES = frozenset({
    10,  # MSG_SIZE_TOO_LARGE
    2,  # INVALID_MSG
    4,  # INVALID_MSG_SIZE
    87,  # INVALID_RECORD
    18,  # RECORD_LIST_TOO_LARGE
    29,  # TOPIC_AUTHORIZATION_FAILED
    31,  # CLUSTER_AUTHORIZATION_FAILED
    53,  # TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    17,  # TOPIC_EXCEPTION (an invalid topic)
    44,  # POLICY_VIOLATION
})


def _kafka_failure(event: Mapping[str, Any], error: Any) -> PublishError:
    """A `PublishError`, or a `RefusedEvent` when the error refuses the record itself."""
    code = error.code() if hasattr(error, "code") else None
    if code in _PERMANENT_KAFKA_CODES:
        return RefusedEvent("kafka", event, str(error))
    return PublishError("kafka", event, str(error))


def topic_for(event_type: str, prefix: str = "") -> Optional[str]:
    """The Kafka topic of an event type (every ``user.*`` type shares the user-events topic)."""
    if event_type.startswith("user."):
        return prefix + USER_EVENTS_TOPIC
    if event_type == "context.aggregated":
        return prefix + CONTEXT_AGGREGATED_TOPIC
    if event_type == "context.vectorized":
        return prefix + CONTEXT_VECTORIZED_TOPIC
    return None


def task_for(event_type: str) -> Optional[str]:
    """The Celery task name of an event type."""
    return TASKS.get(event_type)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r}: expected a whole number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: expected a whole number >= 0")
    return value


@dataclass(frozen=True)
class Settings:
    """The environment variables the Rust runtime reads, with the same defaults."""

    backend: str = "kafka"
    fallback: Optional[str] = None
    fallback_timeout_s: float = 5.0
    fallback_failures: int = 3
    fallback_open_s: float = 30.0
    kafka_bootstrap_servers: str = "localhost:9092"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_api_key: Optional[str] = None
    kafka_api_secret: Optional[str] = field(default=None, repr=False)
    kafka_topic_prefix: str = ""
    broker_url: str = field(default="redis://localhost:6379/0", repr=False)
    celery_queue: str = "vectordb"

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Settings":
        env = os.environ if env is None else env
        backend = env.get("MESSAGING_BACKEND", "kafka").strip().lower() or "kafka"
        if backend not in BACKENDS:
            raise ConfigError(f"MESSAGING_BACKEND={backend!r}: expected one of kafka, celery, disabled")
        fallback = env.get("MESSAGING_FALLBACK", "").strip().lower() or None
        if fallback not in (None, "celery"):
            raise ConfigError(f"MESSAGING_FALLBACK={fallback!r}: expected celery or nothing")
        queues = [q.strip() for q in env.get("CELERY_QUEUES", "vectordb").split(",") if q.strip()]
        if not queues:
            raise ConfigError("CELERY_QUEUES: name at least one queue")
        protocol = env.get("KAFKA_SECURITY_PROTOCOL", "").strip().upper() or "PLAINTEXT"
        api_key = env.get("KAFKA_API_KEY") or None
        api_secret = env.get("KAFKA_API_SECRET") or None
        if protocol not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol!r}: expected PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
        return cls(
            backend=backend,
            # As in the Rust runtime: the fallback only applies behind Kafka, so a fallback left set while rolling
            # back to Celery cannot stop the rollback.
            fallback=fallback if backend == "kafka" else None,
            fallback_timeout_s=_int(env, "MESSAGING_FALLBACK_TIMEOUT_MS", 5000) / 1000.0,
            fallback_failures=max(1, _int(env, "MESSAGING_FALLBACK_FAILURES", 3)),
            fallback_open_s=float(_int(env, "MESSAGING_FALLBACK_OPEN_S", 30)),
            kafka_bootstrap_servers=env.get("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"),
            kafka_security_protocol=protocol,
            kafka_sasl_mechanism=env.get("KAFKA_SASL_MECHANISM", "PLAIN") or "PLAIN",
            kafka_api_key=api_key,
            kafka_api_secret=api_secret,
            kafka_topic_prefix=env.get("KAFKA_TOPIC_PREFIX", ""),
            broker_url=env.get("BROKER_URL", "redis://localhost:6379/0"),
            celery_queue=(env.get("CELERY_PUBLISH_QUEUE", "").strip() or queues[0]),
        )


def normalise(event: Any) -> Dict[str, Any]:
    """The event as the wire dict: a dict, or a pydantic model (v1 or v2). Missing ``event_id``, ``timestamp`` and
    ``metadata`` are filled in as the Python events' defaults would."""
    if hasattr(event, "model_dump"):
        event = event.model_dump(mode="json")
    elif hasattr(event, "dict") and not isinstance(event, dict):
        event = json.loads(event.json())
    if not isinstance(event, Mapping):
        raise UnroutableEvent(f"an event is a dict or a pydantic model, not {type(event).__name__}")
    wire: Dict[str, Any] = dict(event)
    event_type = wire.get("event_type")
    if not isinstance(event_type, str) or not event_type:
        raise UnroutableEvent("the event has no event_type")
    wire.setdefault("event_id", str(uuid.uuid4()))
    wire.setdefault("timestamp", datetime.now(timezone.utc).isoformat())
    wire.setdefault("trace_id", None)
    wire.setdefault("user_id", None)
    wire.setdefault("metadata", {})
    return wire


def encode(event: Mapping[str, Any]) -> bytes:
    """The record value: the event's JSON (UTF-8). Values JSON has no type for (datetime, UUID, Decimal) as text."""
    return json.dumps(event, ensure_ascii=False, default=str).encode("utf-8")


class _Breaker:
    """Closed (try Kafka) until ``failures`` failures in a row; open (straight to the fallback) for ``open_s``; then
    one event probes Kafka."""

    def __init__(self, failures: int, open_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.failures_to_open = failures
        self.open_s = open_s
        self.clock = clock
        self.consecutive = 0
        self.open_until: Optional[float] = None
        self.probing = False
        self.lock = threading.Lock()

    def admit(self) -> str:
        with self.lock:
            if self.open_until is None:
                return "primary"
            if self.clock() < self.open_until or self.probing:
                return "fallback"
            self.probing = True
            return "probe"

    def succeeded(self) -> None:
        with self.lock:
            if self.open_until is not None:
                log.info("Kafka takes events again: circuit closed")
            self.consecutive = 0
            self.open_until = None
            self.probing = False

    def failed(self) -> None:
        with self.lock:
            self.consecutive += 1
            self.probing = False
            if self.open_until is not None or self.consecutive >= self.failures_to_open:
                if self.open_until is None:
                    log.warning("circuit open: publishing to Celery for %.0f s", self.open_s)
                self.open_until = self.clock() + self.open_s


class Publisher:
    """Publishes events on the configured backend. Thread-safe; create one per process (``publish_event`` does)."""

    def __init__(self, settings: Optional[Settings] = None, celery_app: Any = None) -> None:
        self.settings = settings or Settings.from_env()
        self._celery_app = celery_app
        self._producer: Any = None
        self._lock = threading.Lock()
        self._breaker = _Breaker(self.settings.fallback_failures, self.settings.fallback_open_s)
        self.dropped = 0
        self.fallbacks = 0

    # -- public ----------------------------------------------------------------------------------------------------

    def publish(self, event: Any) -> str:
        """Sends one event; returns the backend that took it (``kafka``, ``celery`` or ``disabled``).

        Raises ``UnroutableEvent`` for an event no backend can carry and ``PublishError`` when the backend (and the
        fallback, if set) did not take it."""
        event = normalise(event)
        backend = self.settings.backend
        if backend == "disabled":
            self.dropped += 1
            log.info("messaging disabled: event %s (%s) not sent", event["event_id"], event["event_type"])
            return "disabled"
        if backend == "celery":
            self._send_celery(event)
            return "celery"
        if self.settings.fallback is None:
            self._send_kafka(event, timeout_s=30.0)
            return "kafka"
        return self._send_with_fallback(event)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Waits for records still queued in the Kafka producer (at shutdown)."""
        if self._producer is not None:
            self._producer.flush(timeout_s)

    # -- Kafka -------------------------------------------------------------------------------------------------------

    def _kafka(self) -> Any:
        with self._lock:
            if self._producer is None:
                from confluent_kafka import Producer

                s = self.settings
                conf: Dict[str, Any] = {
                    "bootstrap.servers": s.kafka_bootstrap_servers,
                    "security.protocol": s.kafka_security_protocol,
                    "acks": "all",
                    "enable.idempotence": True,
                    "compression.type": "lz4",
                    "linger.ms": 2,
                    "delivery.timeout.ms": 30000,
                    "reconnect.backoff.max.ms": 2000,
                }
                if s.kafka_security_protocol.startswith("SASL"):
                    conf["sasl.mechanisms"] = s.kafka_sasl_mechanism
                    conf["sasl.username"] = s.kafka_api_key or ""
                    conf["sasl.password"] = s.kafka_api_secret or ""
                self._producer = Producer(conf)
            return self._producer

    def _send_kafka(self, event: Dict[str, Any], timeout_s: float) -> None:
        topic = topic_for(event["event_type"], self.settings.kafka_topic_prefix)
        if topic is None:
            raise UnroutableEvent(f"no Kafka topic for event type {event['event_type']!r}")
        producer = self._kafka()
        outcome: Dict[str, Any] = {}
        done = threading.Event()

        def delivered(error: Any, _message: Any) -> None:
            outcome["error"] = error
            done.set()

        user = event.get("user_id")
        headers = [
            ("event_type", event["event_type"].encode()),
            ("event_id", str(event["event_id"]).encode()),
            ("trace_id", (event.get("trace_id") or "").encode()),
        ]
        try:
            producer.produce(topic, value=encode(event), key=None if user is None else str(user).encode("utf-8"),
                             headers=headers, on_delivery=delivered)
        except BufferError as error:
            raise PublishError("kafka", event, f"local queue full: {error}") from error
        except Exception as error:  # KafkaException: refused before it left (too large, …)
            raise _kafka_failure(event, error.args[0] if error.args else error) from error
        deadline = time.monotonic() + timeout_s
        while not done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                # librdkafka may still deliver it later: the event then also arrives via the fallback, which is
                # harmless (point ids derive from the event id).
                raise PublishError("kafka", event, f"no acknowledgement within {timeout_s:.1f} s")
            producer.poll(min(left, 0.05))
        if outcome.get("error") is not None:
            raise _kafka_failure(event, outcome["error"])

    def _send_with_fallback(self, event: Dict[str, Any]) -> str:
        admitted = self._breaker.admit()
        if admitted == "fallback":
            return self._to_fallback(event, "circuit_open")
        try:
            self._send_kafka(event, timeout_s=self.settings.fallback_timeout_s)
        except (UnroutableEvent, RefusedEvent):
            raise  # the event itself is refused: Celery would not fix that
        except PublishError as error:
            log.warning("Kafka publish failed (%s); publishing event %s to Celery", error.reason, event["event_id"])
            self._breaker.failed()
            return self._to_fallback(event, "error")
        self._breaker.succeeded()
        return "kafka"

    def _to_fallback(self, event: Dict[str, Any], reason: str) -> str:
        self._send_celery(event)
        self.fallbacks += 1
        log.info("event %s published to Celery (fallback: %s)", event["event_id"], reason)
        return "celery"

    # -- Celery ------------------------------------------------------------------------------------------------------

    def _celery(self) -> Any:
        with self._lock:
            if self._celery_app is None:
                from celery import Celery

                self._celery_app = Celery("aura360_events", broker=self.settings.broker_url)
            return self._celery_app

    def _send_celery(self, event: Dict[str, Any]) -> None:
        task = task_for(event["event_type"])
        if task is None:
            raise UnroutableEvent(f"no Celery task for event type {event['event_type']!r}")
        try:
            self._celery().send_task(task, args=[event], queue=self.settings.celery_queue)
        except Exception as error:  # kombu OperationalError and friends, after kombu's own retries
            raise PublishError("celery", event, f"{type(error).__name__}: {error}") from error


_default: Optional[Publisher] = None
_default_lock = threading.Lock()


def publish_event(event: Any) -> str:
    """Publishes ``event`` with a process-wide ``Publisher`` configured from the environment on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Publisher()
        publisher = _default
    return publisher.publish(event)
