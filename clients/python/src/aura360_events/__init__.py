"""The AURA360 Python services' event publisher: ``publish_event(event)`` onto Kafka or Celery by ``MESSAGING_BACKEND``,
in the wire format the Rust vectordb consumer and worker read. See README.md."""

from .publisher import (
    BACKENDS,
    TASKS,
    ConfigError,
    Publisher,
    PublishError,
    RefusedEvent,
    Settings,
    UnroutableEvent,
    encode,
    normalise,
    publish_event,
    task_for,
    topic_for,
)

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "TASKS",
    "ConfigError",
    "Publisher",
    "PublishError",
    "RefusedEvent",
    "Settings",
    "UnroutableEvent",
    "__version__",
    "encode",
    "normalise",
    "publish_event",
    "task_for",
    "topic_for",
]
