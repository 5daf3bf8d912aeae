//! What operators run and watch: `/health` and `/metrics` of both processes, counters from start, a real Prometheus
//! and its lag alert, `vectordb export`/`replay` and dead-letter replay, an embedding outage under the worker.
//!
//! Run through `scripts/test.sh` (the `services` feature), which starts the broker and the venv and sets
//! `AURA_TEST_KAFKA` and `AURA_TEST_PYTHON`. Every test has its own topic prefix, consumer group and store
//! directory, so they run in parallel on one broker; the harness is `common/stack.rs`.

mod common;

use aura_testkit::EmbeddingServer;
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};

use common::stack::*;

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn health_and_metrics_report_backend_readiness_and_backlog() {
    let kafka = Scenario::new("ops");

    // A broker that does not answer: not ready, and /health says why.
    let mut lost = kafka.start_consumer(&[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")]);
    let addr = lost.http_addr();
    let (code, body) = health(&addr);
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["status"], "starting");
    lost.kill_9();

    kafka.produce_moods(20, 2);
    let mut consumer =
        kafka.start_consumer(&[("BACKLOG_SAMPLE_S", "1"), ("DISABLED_HANDLERS", "")]);
    let addr = consumer.http_addr();
    kafka.wait_drained(&mut consumer, 20);
    let (code, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert_eq!(code, 200);
    assert_eq!(body["messaging_backend"], "kafka");
    assert_eq!(body["process"], "vectordb-consumer");
    assert_eq!(
        body["handlers"]["enabled"],
        json!(["mood_created", "context_aggregated", "ingest_vectors"])
    );
    assert_eq!(body["brokers"][0]["name"], "kafka");
    assert_eq!(body["brokers"][0]["reachable"], true);
    assert_eq!(
        body["embedder"],
        json!({"provider": "hash", "model": "hash-ngram-v1"})
    );

    // Once the sampler has seen the drained topics, the backlog is 0 on each.
    let user_topic = kafka.topic(USER_TOPIC);
    let started = Instant::now();
    let samples = loop {
        let samples = kafka.metrics(&addr);
        let backlog = sample(
            &samples,
            "aura360_backlog",
            &[("backend", "kafka"), ("queue_or_topic", &user_topic)],
        );
        if backlog == Some(0.0) {
            break samples;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "backlog {backlog:?}"
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        sample(&samples, "aura360_messaging_backend", &[]),
        Some(1.0)
    );
    for handler in ["mood_created", "context_aggregated", "ingest_vectors"] {
        assert_eq!(
            sample(
                &samples,
                "aura360_events_processed_total",
                &[("handler", handler), ("outcome", "success")]
            ),
            Some(20.0),
            "{handler}"
        );
        assert_eq!(
            sample(
                &samples,
                "aura360_handler_duration_seconds_count",
                &[("handler", handler)]
            ),
            Some(20.0)
        );
    }
    assert!(
        samples
            .iter()
            .any(|s| s["family"] == "aura360_handler_duration_seconds" && s["type"] == "histogram")
    );
    assert_eq!(
        sample(
            &samples,
            "aura360_events_published_total",
            &[("backend", "kafka"), ("event_type", "context.aggregated")]
        ),
        Some(20.0)
    );
    assert_eq!(
        sample(
            &samples,
            "aura360_consumer_lag",
            &[("topic", &user_topic), ("partition", "0")]
        ),
        Some(0.0)
    );
    consumer.stop();

    // `vectordb lag` agrees: everything committed.
    let lag = kafka.lag();
    assert_eq!(lag["kafka"]["total_lag"], 0, "{lag}");
    let user_partitions: Vec<&Value> = lag["kafka"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["topic"] == user_topic.as_str())
        .collect();
    assert_eq!(user_partitions.len(), 3);
    let committed: i64 = user_partitions
        .iter()
        .map(|p| p["committed"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(committed, 20);

    // Disabled: healthy by design, consuming nothing.
    let mut disabled = kafka.start_consumer(&[("MESSAGING_BACKEND", "disabled")]);
    let addr = disabled.http_addr();
    let (code, body) = wait_health(&addr, "disabled", Duration::from_secs(30));
    assert_eq!(code, 200);
    assert_eq!(body["messaging_backend"], "disabled");
    let samples = kafka.metrics(&addr);
    assert_eq!(
        sample(&samples, "aura360_messaging_backend", &[]),
        Some(0.0)
    );
    disabled.stop();

    // A Celery worker: its queue depth in the same metric, its disabled handler on /health.
    let redis = TestRedis::start();
    let env = redis.env_with(&[
        ("MESSAGING_BACKEND", "celery"),
        ("DISABLED_HANDLERS", "ingest_vectors"),
        ("BACKLOG_SAMPLE_S", "1"),
    ]);
    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &pairs(&env));
    let addr = worker.http_addr();
    let (code, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert_eq!(code, 200);
    assert_eq!(body["messaging_backend"], "celery");
    assert_eq!(body["handlers"]["disabled"], json!(["ingest_vectors"]));
    assert_eq!(body["brokers"][0]["name"], "redis");
    let samples = kafka.metrics(&addr);
    assert_eq!(
        sample(&samples, "aura360_messaging_backend", &[]),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &samples,
            "aura360_backlog",
            &[("backend", "celery"), ("queue_or_topic", "vectordb")]
        ),
        Some(0.0)
    );
    worker.stop();
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn export_then_replay_reproduces_the_same_points_and_is_safe_to_repeat() {
    let kafka = Scenario::new("export");
    kafka.moods_through_a_consumer(30, 3);
    assert_eq!(kafka.points(), 30);
    let users = ["user-000", "user-001", "user-002"];
    let original: Vec<Vec<String>> = users.iter().map(|u| kafka.point_ids(u, &[])).collect();
    assert_eq!(original.iter().map(Vec::len).sum::<usize>(), 30);

    // Export the user topic: every record with its coordinates, key, headers and bytes.
    let export = kafka.dir.path().join("moods.jsonl");
    let topic = kafka.topic(USER_TOPIC);
    let summary = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--out",
            export.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(summary["records"], 30, "{summary}");
    let lines: Vec<Value> = std::fs::read_to_string(&export)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 30);
    let on_topic = kafka.read_topic(USER_TOPIC);
    for record in &on_topic {
        let exported = lines
            .iter()
            .find(|l| l["partition"] == record["partition"] && l["offset"] == record["offset"])
            .expect("every record exported");
        assert_eq!(exported["topic"], topic.as_str());
        assert_eq!(exported["value"], record["value"], "the bytes, unchanged");
        assert_eq!(exported["key"], record["key"]);
        assert_eq!(
            exported["headers"]["event_id"],
            record["headers"]["event_id"]
        );
    }
    // A range: one partition, offsets [1, 3).
    let partition = lines
        .iter()
        .map(|l| l["partition"].as_i64().unwrap())
        .find(|p| lines.iter().filter(|l| l["partition"] == *p).count() >= 3)
        .unwrap();
    let range_file = kafka.dir.path().join("range.jsonl");
    let summary = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--partition",
            &partition.to_string(),
            "--from-offset",
            "1",
            "--to-offset",
            "3",
            "--out",
            range_file.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(summary["records"], 2, "{summary}");

    // Replay the export into the handlers, on an empty store: the same point ids.
    let fresh = kafka.dir.path().join("replayed");
    let fresh_env = [("QDRANT_PATH", fresh.to_str().unwrap())];
    let summary = kafka.vectordb_json(
        &fresh_env,
        &[
            "replay",
            "--file",
            export.to_str().unwrap(),
            "--to",
            "handlers",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 30, "{summary}");
    assert_eq!(summary["collection_points"], 30, "{summary}");
    let replayed: Vec<Vec<String>> = users
        .iter()
        .map(|u| kafka.point_ids(u, &fresh_env))
        .collect();
    assert_eq!(replayed, original);

    // Into Celery tasks, on another empty store, run by the worker: the same point ids again.
    let redis = TestRedis::start();
    let celery_store = kafka.dir.path().join("via-celery");
    let mut env = redis.env().to_vec();
    env.push(("QDRANT_PATH", celery_store.to_str().unwrap().to_owned()));
    env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    let env = pairs(&env);
    let summary = kafka.vectordb_json(
        &env,
        &[
            "replay",
            "--file",
            export.to_str().unwrap(),
            "--to",
            "celery",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 30, "{summary}");
    assert_eq!(queued_mood_ids(&redis).len(), 30);
    run_worker_until_idle(&kafka, &redis, &env);
    let via_celery: Vec<Vec<String>> = users.iter().map(|u| kafka.point_ids(u, &env)).collect();
    assert_eq!(via_celery, original);

    // Into Kafka, twice over what was already processed: duplicates overwrite, nothing is added.
    let summary = kafka.vectordb_json(
        &[],
        &[
            "replay",
            "--file",
            export.to_str().unwrap(),
            "--to",
            "kafka",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 30, "{summary}");
    assert_eq!(kafka.offsets(USER_TOPIC).1, 60);
    let mut consumer = kafka.start_consumer(&[]);
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    assert_eq!(kafka.points(), 30);
    let after: Vec<Vec<String>> = users.iter().map(|u| kafka.point_ids(u, &[])).collect();
    assert_eq!(after, original);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn dead_letters_are_replayed_to_their_source_after_the_fix() {
    let kafka = Scenario::new("dlqreplay");
    let broken_url = refusing_embedder();
    let broken = [
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", broken_url.as_str()),
    ];

    // Kafka: the embedder refuses, so every context.aggregated event is dead-lettered.
    kafka.produce_moods(10, 2);
    let mut consumer = kafka.start_consumer(&broken);
    let dlq = format!("{AGGREGATED_TOPIC}.dlq");
    let dead_lettered = || {
        (kafka.offsets(&dlq).1 >= 10 && kafka.offsets(AGGREGATED_TOPIC) == (10, 10)).then_some(())
    };
    let (every, limit) = (Duration::from_millis(300), Duration::from_secs(300));
    consumer.wait_every(every, "10 dead letters", limit, dead_lettered);
    consumer.stop();
    assert_eq!(kafka.points(), 0);
    let letters = kafka.read_topic(&dlq);
    assert_eq!(letters.len(), 10);
    assert!(
        letters[0]["headers"]["error"]
            .as_str()
            .unwrap()
            .contains("401"),
        "{}",
        letters[0]
    );

    // The fix (a working embedder), then the dead letters back to their source topic.
    let summary = kafka.vectordb_json(
        &[],
        &[
            "replay",
            "--topic",
            &kafka.topic(&dlq),
            "--to",
            "kafka",
            "--json",
        ],
    );
    assert_eq!(summary["replayed"], 10, "{summary}");
    let replayed = kafka.read_topic(AGGREGATED_TOPIC);
    assert_eq!(replayed.len(), 20);
    assert!(
        replayed[10..]
            .iter()
            .all(|r| r["headers"].get("error").is_none()),
        "dead-letter headers stripped"
    );
    let mut consumer = kafka.start_consumer(&[]);
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    assert_eq!(kafka.points(), 10);

    // Celery: same failure, no retries → `vectordb.dlq`; the fix; `--celery-dlq` puts them back; the worker runs them.
    let redis = TestRedis::start();
    let mut env = redis.env().to_vec();
    env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    env.push(("CELERY_MAX_RETRIES", "0".to_owned()));
    let fixed_env = pairs(&env);
    let mut broken_env = fixed_env.clone();
    broken_env.extend(broken);
    let mut publisher = kafka.start_publisher(&fixed_env);
    publisher.feed(&mood_lines(2000..2010), Duration::ZERO);
    assert_eq!(publisher.finish()["published"], 10);
    run_worker_until_idle(&kafka, &redis, &broken_env);
    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 10);
    assert_eq!(kafka.points(), 10);
    let summary = kafka.vectordb_json(
        &fixed_env,
        &["replay", "--celery-dlq", "vectordb", "--json"],
    );
    assert_eq!(summary["replayed"], 10, "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 0);
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 10);
    run_worker_until_idle(&kafka, &redis, &fixed_env);
    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 0);
    assert_eq!(kafka.points(), 20);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn a_fresh_consumer_and_worker_export_their_counters_at_zero_in_every_mode() {
    let kafka = Scenario::new("zeros");
    let redis = TestRedis::start();
    for mode in ["kafka", "celery", "disabled"] {
        for binary in [
            env!("CARGO_BIN_EXE_vectordb-consumer"),
            env!("CARGO_BIN_EXE_vectordb-worker"),
        ] {
            let worker = binary.ends_with("vectordb-worker");
            let mut env = redis.env().to_vec();
            env.push(("MESSAGING_BACKEND", mode.to_owned()));
            // No traffic at all: a consumer in celery mode drains nothing (the topics are empty).
            let mut process = kafka.start(binary, &pairs(&env));
            let addr = process.http_addr();
            let samples = kafka.metrics(&addr);
            let at = |name: &str, labels: &[(&str, &str)]| {
                sample(&samples, name, labels).unwrap_or_else(|| {
                    panic!(
                        "{binary} ({mode}): no {name}{labels:?} before any traffic:\n{samples:#?}"
                    )
                })
            };
            let gauge = match mode {
                "kafka" => 1.0,
                "celery" => 2.0,
                _ => 0.0,
            };
            assert_eq!(at("aura360_messaging_backend", &[]), gauge);
            for event_type in [
                "user.mood.created",
                "context.aggregated",
                "context.vectorized",
            ] {
                let labels = [("backend", mode), ("event_type", event_type)];
                assert_eq!(at("aura360_events_published_total", &labels), 0.0);
            }
            for handler in ["mood_created", "context_aggregated", "ingest_vectors"] {
                for outcome in ["success", "transient_error", "permanent_error"] {
                    let labels = [("handler", handler), ("outcome", outcome)];
                    assert_eq!(at("aura360_events_processed_total", &labels), 0.0);
                }
                let mount = if worker { "celery" } else { "kafka" };
                let labels = [("backend", mount), ("handler", handler)];
                assert_eq!(at("aura360_dead_letters_total", &labels), 0.0);
            }
            let skipped = [("handler", "none"), ("outcome", "skipped")];
            assert_eq!(at("aura360_events_processed_total", &skipped), 0.0);
            // /health's status as a gauge: exactly one status is 1.
            let statuses: f64 = ["ok", "starting", "unavailable", "degraded", "disabled"]
                .iter()
                .map(|s| at("aura360_health_status", &[("status", s)]))
                .sum();
            assert_eq!(statuses, 1.0);
            process.stop();
        }
    }
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn a_real_prometheus_scrapes_both_processes_and_the_lag_alert_goes_pending() {
    let kafka = Scenario::new("prom");
    let redis = TestRedis::start();
    // 1,200 mood events wait behind a disabled handler: the group's lag stays above the alert's 1,000.
    kafka.produce_moods(1_200, 5);
    let env = redis.env_with(&[
        ("BACKLOG_SAMPLE_S", "1"),
        ("DISABLED_HANDLERS", "mood_created"),
    ]);
    let mut consumer = kafka.start_consumer(&pairs(&env));
    let mut worker_env = env.clone();
    worker_env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    // Embedded Qdrant is one process's: the worker has a store of its own.
    let worker_store = kafka.dir.path().join("qdrant-worker");
    worker_env.push(("QDRANT_PATH", worker_store.display().to_string()));
    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &pairs(&worker_env));
    let (consumer_addr, worker_addr) = (consumer.http_addr(), worker.http_addr());
    let prometheus = Prometheus::start(
        kafka.dir.path(),
        &[
            ("vectordb-consumer", consumer_addr.as_str()),
            ("vectordb-worker", worker_addr.as_str()),
        ],
    );

    // The backend of each process, labelled by the scrape.
    let backends =
        prometheus.wait_query("aura360_messaging_backend", Duration::from_secs(60), |r| {
            r.len() == 2
        });
    let by_job: std::collections::BTreeMap<String, String> = backends
        .iter()
        .map(|s| {
            (
                s["metric"]["job"].as_str().unwrap().to_owned(),
                s["value"][1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(by_job["vectordb-consumer"], "1", "kafka: {backends:?}");
    assert_eq!(by_job["vectordb-worker"], "2", "celery: {backends:?}");
    assert!(backends.iter().all(|s| s["metric"]["instance"].is_string()));

    // The backlog: Kafka lag of the user topic (1,200, the disabled handler's input), the worker's Celery queue (0).
    let user_topic = kafka.topic(USER_TOPIC);
    let backlog = prometheus.wait_query("aura360_backlog", Duration::from_secs(60), |r| {
        r.iter().any(|s| {
            s["metric"]["queue_or_topic"] == user_topic.as_str() && s["value"][1] == "1200"
        }) && r.iter().any(|s| s["metric"]["backend"] == "celery")
    });
    let celery = backlog
        .iter()
        .find(|s| s["metric"]["backend"] == "celery")
        .unwrap();
    assert_eq!(celery["metric"]["queue_or_topic"], "vectordb", "{celery}");
    assert_eq!(celery["metric"]["job"], "vectordb-worker", "{celery}");
    let kafka_lag = backlog
        .iter()
        .find(|s| s["metric"]["queue_or_topic"] == user_topic.as_str())
        .unwrap();
    assert_eq!(kafka_lag["metric"]["backend"], "kafka");
    assert_eq!(kafka_lag["metric"]["job"], "vectordb-consumer");

    // The plan's lag alert: pending (its `for` is 5 minutes), with its severity and runbook link.
    let started = Instant::now();
    let alert = loop {
        let alerts = prometheus.api("alerts")["alerts"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if let Some(alert) = alerts
            .iter()
            .find(|a| a["labels"]["alertname"] == "AURA360ConsumerLagHigh")
        {
            break alert.clone();
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the lag alert never became active: {alerts:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert_eq!(alert["state"], "pending", "{alert}");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(
        alert["annotations"]["runbook"],
        "RUNBOOK.md#aura360consumerlaghigh"
    );
    // Healthy processes fire nothing else: no backend down, no heartbeat missing.
    let alerts = prometheus.api("alerts")["alerts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for quiet in [
        "AURA360BackendDown",
        "AURA360WorkerHeartbeatMissing",
        "AURA360ErrorRateHigh",
    ] {
        assert!(
            alerts.iter().all(|a| a["labels"]["alertname"] != quiet),
            "{quiet}: {alerts:?}"
        );
    }
    let heartbeat = prometheus.wait_query(
        "aura360_celery_heartbeat_timestamp_seconds",
        Duration::from_secs(30),
        |r| r.len() == 1,
    );
    assert_eq!(heartbeat[0]["metric"]["job"], "vectordb-worker");
    assert_eq!(kafka.offsets(USER_TOPIC), (0, 1_200), "nothing handled");
    consumer.stop();
    worker.stop();
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn export_takes_the_console_consumers_max_messages_and_from_beginning() {
    let kafka = Scenario::new("exportmax");
    kafka.produce_moods(30, 3);
    let topic = kafka.topic(USER_TOPIC);
    let out = kafka.dir.path().join("first.jsonl");
    let summary = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--from-beginning",
            "--max-messages",
            "7",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    );
    assert_eq!(summary["records"], 7, "{summary}");
    let lines = std::fs::read_to_string(&out).unwrap();
    assert_eq!(lines.lines().count(), 7);
    // From the beginning: each partition's records start at offset 0.
    let first: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let min_offset = first.iter().map(|r| r["offset"].as_i64().unwrap()).min();
    assert_eq!(min_offset, Some(0));
    // Without a limit, everything; --from-beginning and --from-offset contradict each other.
    let all = kafka.vectordb_json(
        &[],
        &[
            "export",
            "--topic",
            &topic,
            "--from-beginning",
            "--out",
            "/dev/null",
            "--json",
        ],
    );
    assert_eq!(all["records"], 30, "{all}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
    kafka.configure(&mut command);
    let refused = command
        .args([
            "export",
            "--topic",
            &topic,
            "--from-beginning",
            "--from-offset",
            "3",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("cannot be used with"));
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn an_embedding_outage_under_the_celery_worker_is_retried_reported_and_loses_nothing() {
    let kafka = Scenario::new("outage-celery");
    let redis = TestRedis::start();
    let embedder = EmbeddingServer::start(&kafka.python, kafka.dir.path(), 30);
    let env = redis.env_with(&[
        ("MESSAGING_BACKEND", "celery"),
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", &embedder.url()),
        ("EMBEDDING_TIMEOUT_S", "5"),
        // Celery-style retries (a retried task goes back with an eta): 5 s, 10 s, 20 s, 40 s… outlast the outage.
        ("CELERY_RETRY_BACKOFF_MS", "5000"),
        ("CELERY_MAX_RETRIES", "6"),
    ]);
    let env = pairs(&env);
    let mut publisher = kafka.start_publisher(&env);
    publisher.feed(&mood_lines(0..60), Duration::ZERO);
    assert_eq!(publisher.finish()["published"], 60);

    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &env);
    let addr = worker.http_addr();
    let (code, body) = wait_health(&addr, "degraded", Duration::from_secs(60));
    assert_eq!(code, 200, "{body}");
    assert!(embedder_down(&body), "{body}");
    let started = Instant::now();
    let mut idle_since: Option<Instant> = None;
    loop {
        if redis.idle() && embedder.requests().1 > 0 {
            let since = *idle_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(1) {
                break;
            }
        } else {
            idle_since = None;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "Celery queue not drained:\n{}",
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert!(!embedder_down(&body), "{body}");
    worker.stop();

    assert_eq!(redis.int(&["LLEN", "vectordb.dlq"]), 0);
    assert_eq!(kafka.points(), 60);
    let (refused, _) = embedder.requests();
    assert!(refused >= 1, "the outage was seen");
}
