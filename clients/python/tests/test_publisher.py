"""Unit tests of aura360_events without a broker: settings, routing, the event's normal form, the breaker and the
disabled backend. The package against our consumer and worker (every backend, the fallback with Kafka stopped) is
tested from crates/cli/tests/kafka.rs; run these with `python -m unittest discover clients/python/tests`."""

import json
import sys
import unittest
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from aura360_events import (  # noqa: E402
    ConfigError, Publisher, PublishError, RefusedEvent, Settings, UnroutableEvent, __version__, encode, normalise,
    task_for, topic_for,
)
from aura360_events.publisher import _Breaker  # noqa: E402


class SettingsTest(unittest.TestCase):
    def test_defaults_are_the_runtimes(self):
        s = Settings.from_env({})
        self.assertEqual(s.backend, "kafka")
        self.assertIsNone(s.fallback)
        self.assertEqual(s.kafka_bootstrap_servers, "localhost:9092")
        self.assertEqual(s.kafka_security_protocol, "PLAINTEXT")
        self.assertEqual(s.broker_url, "redis://localhost:6379/0")
        self.assertEqual(s.celery_queue, "vectordb")
        self.assertEqual((s.fallback_timeout_s, s.fallback_failures, s.fallback_open_s), (5.0, 3, 30.0))

    def test_values_are_read_and_checked(self):
        s = Settings.from_env({"MESSAGING_BACKEND": "Celery", "CELERY_QUEUES": "a, b", "KAFKA_TOPIC_PREFIX": "t."})
        self.assertEqual((s.backend, s.celery_queue, s.kafka_topic_prefix), ("celery", "a", "t."))
        s = Settings.from_env({"CELERY_QUEUES": "a", "CELERY_PUBLISH_QUEUE": "b"})
        self.assertEqual(s.celery_queue, "b")
        for env in ({"MESSAGING_BACKEND": "rabbit"}, {"MESSAGING_FALLBACK": "kafka"},
                    {"MESSAGING_FALLBACK_TIMEOUT_MS": "soon"}, {"CELERY_QUEUES": " , "},
                    {"KAFKA_SECURITY_PROTOCOL": "TLS"}):
            with self.assertRaises(ConfigError, msg=env) as raised:
                Settings.from_env(env)
            self.assertIn(next(iter(env)), str(raised.exception))

    def test_the_fallback_applies_behind_kafka_only(self):
        self.assertEqual(Settings.from_env({"MESSAGING_FALLBACK": "celery"}).fallback, "celery")
        self.assertIsNone(Settings.from_env({"MESSAGING_BACKEND": "celery", "MESSAGING_FALLBACK": "celery"}).fallback)

    def test_secrets_are_not_in_the_repr(self):
        s = Settings.from_env({"KAFKA_API_SECRET": "s3cret", "BROKER_URL": "redis://:pw@h:6379/0"})
        self.assertNotIn("s3cret", repr(s))
        self.assertNotIn("pw", repr(s))


class RoutingTest(unittest.TestCase):
    def test_topics_and_tasks_are_the_runtimes(self):
        self.assertEqual(topic_for("user.mood.created"), "aura360.user.events")
        self.assertEqual(topic_for("user.profile.updated", "p."), "p.aura360.user.events")
        self.assertEqual(topic_for("context.aggregated"), "aura360.context.aggregated")
        self.assertEqual(topic_for("context.vectorized"), "aura360.context.vectorized")
        self.assertIsNone(topic_for("billing.paid"))
        self.assertEqual(task_for("user.mood.created"), "vectosvc.worker.tasks.process_mood_created")
        self.assertEqual(task_for("user.activity.created"), "vectosvc.worker.tasks.process_activity_created")
        self.assertEqual(task_for("context.aggregated"), "vectosvc.worker.tasks.process_context_aggregated")
        self.assertEqual(task_for("context.vectorized"), "vectosvc.worker.tasks.ingest_vectors")
        self.assertIsNone(task_for("user.profile.updated"))


class EventTest(unittest.TestCase):
    def test_missing_envelope_fields_are_filled_and_given_ones_kept(self):
        event = normalise({"event_type": "user.mood.created", "user_id": "u", "data": {"mood_score": 5}})
        self.assertEqual(len(event["event_id"]), 36)
        self.assertIn("T", event["timestamp"])
        self.assertEqual((event["trace_id"], event["metadata"]), (None, {}))
        kept = normalise({"event_type": "x.y", "event_id": "e", "timestamp": "t", "metadata": {"a": 1}})
        self.assertEqual((kept["event_id"], kept["timestamp"], kept["metadata"]), ("e", "t", {"a": 1}))

    def test_an_event_without_a_type_is_refused(self):
        for bad in ({}, {"event_type": ""}, ["not", "a", "dict"]):
            with self.assertRaises(UnroutableEvent):
                normalise(bad)

    def test_the_value_is_utf8_json(self):
        value = encode({"event_type": "user.mood.created", "data": {"notes": "señal 😀"}})
        self.assertEqual(json.loads(value.decode("utf-8"))["data"]["notes"], "señal 😀")


class BreakerTest(unittest.TestCase):
    def test_opens_after_failures_then_one_event_probes(self):
        now = [0.0]
        breaker = _Breaker(failures=2, open_s=30, clock=lambda: now[0])
        self.assertEqual(breaker.admit(), "primary")
        breaker.failed()
        self.assertEqual(breaker.admit(), "primary")
        breaker.failed()
        self.assertEqual(breaker.admit(), "fallback")
        now[0] = 31
        self.assertEqual(breaker.admit(), "probe")
        self.assertEqual(breaker.admit(), "fallback", "one probe at a time")
        breaker.failed()
        self.assertEqual(breaker.admit(), "fallback", "a failed probe opens it again")
        now[0] = 62
        self.assertEqual(breaker.admit(), "probe")
        breaker.succeeded()
        self.assertEqual(breaker.admit(), "primary")


class DisabledTest(unittest.TestCase):
    def test_disabled_sends_nothing_and_counts(self):
        publisher = Publisher(Settings.from_env({"MESSAGING_BACKEND": "disabled"}))
        self.assertEqual(publisher.publish({"event_type": "user.mood.created", "user_id": "u"}), "disabled")
        self.assertEqual(publisher.dropped, 1)

    def test_an_unroutable_type_is_refused_before_any_broker(self):
        publisher = Publisher(Settings.from_env({"MESSAGING_BACKEND": "celery"}))
        with self.assertRaises(UnroutableEvent):
            publisher.publish({"event_type": "billing.paid"})

    def test_publish_error_names_the_event(self):
        error = PublishError("kafka", {"event_type": "user.mood.created", "event_id": "e1"}, "timeout")
        self.assertIn("e1", str(error))
        self.assertEqual(__version__, "0.1.0")


class RefusedTest(unittest.TestCase):
    def test_a_record_kafka_refuses_is_not_sent_to_the_fallback(self):
        """A 2 MB note exceeds the producer's message.max.bytes: refused before it leaves, as the Rust publisher
        classifies it. The fallback is not used (Celery would take it, and Kafka would refuse it again later)."""
        try:
            import confluent_kafka  # noqa: F401
        except ImportError:
            self.skipTest("confluent-kafka is not installed")
        sent = []

        class Recorder:
            def send_task(self, *args, **kwargs):
                sent.append((args, kwargs))

        settings = Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "MESSAGING_FALLBACK": "celery"})
        publisher = Publisher(settings, celery_app=Recorder())
        huge = {"event_type": "user.mood.created", "user_id": "u", "data": {"notes": "x" * 2_000_000}}
        with self.assertRaises(RefusedEvent) as refused:
            publisher.publish(huge)
        self.assertIn("MSG_SIZE_TOO_LARGE", str(refused.exception))
        self.assertEqual((sent, publisher.fallbacks), ([], 0))
        # An ordinary event on the same (unreachable) broker does go to the fallback after the timeout.
        fast = Publisher(Settings.from_env({"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "MESSAGING_FALLBACK": "celery",
                                            "MESSAGING_FALLBACK_TIMEOUT_MS": "200"}), celery_app=Recorder())
        self.assertEqual(fast.publish({"event_type": "user.mood.created", "user_id": "u"}), "celery")
        self.assertEqual(len(sent), 1)
        self.assertEqual(sent[0][0][0], "vectosvc.worker.tasks.process_mood_created")


if __name__ == "__main__":
    unittest.main()
