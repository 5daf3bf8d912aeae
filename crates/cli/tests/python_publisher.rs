//! The Python services' publisher package (`clients/python`) against our consumer and worker, on every backend and
//! through its fallback.
//!
//! Run through `scripts/test.sh` (the `services` feature), which starts the broker and the venv and sets
//! `AURA_TEST_KAFKA` and `AURA_TEST_PYTHON`. Every test has its own topic prefix, consumer group and store
//! directory, so they run in parallel on one broker; the harness is `common/stack.rs`.

mod common;

use serde_json::{Value, json};

use common::stack::*;

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn the_python_publisher_feeds_the_consumer_and_the_worker_on_every_backend() {
    let kafka = Scenario::new("pyclient");
    let redis = TestRedis::start();
    let celery = redis.env().to_vec();
    let celery = pairs(&celery);

    // MESSAGING_BACKEND=kafka: the record shape the consumer reads.
    let mut to_kafka = mood_lines(0..20);
    to_kafka.extend(activity_lines(20..30));
    let summary = kafka.python_publish(&to_kafka, &[("MESSAGING_BACKEND", "kafka")]);
    assert_eq!(summary["by_backend"], json!({"kafka": 30}), "{summary}");
    let records = kafka.read_topic(USER_TOPIC);
    assert_eq!(records.len(), 30);
    for record in &records {
        let value: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        assert_eq!(record["key"], value["user_id"], "{record}");
        assert_eq!(record["headers"]["event_id"], value["event_id"], "{record}");
        assert_eq!(
            record["headers"]["event_type"], value["event_type"],
            "{record}"
        );
        assert_eq!(record["headers"]["trace_id"], value["trace_id"], "{record}");
    }

    // MESSAGING_BACKEND=celery: `send_task` onto the worker's queue.
    let mut env = celery.clone();
    env.push(("MESSAGING_BACKEND", "celery"));
    let summary = kafka.python_publish(&mood_lines(30..50), &env);
    assert_eq!(summary["by_backend"], json!({"celery": 20}), "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 20);

    // MESSAGING_BACKEND=disabled: counted, sent nowhere.
    let mut env = celery.clone();
    env.push(("MESSAGING_BACKEND", "disabled"));
    let summary = kafka.python_publish(&mood_lines(50..60), &env);
    assert_eq!(summary["by_backend"], json!({"disabled": 10}), "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 20);
    assert_eq!(kafka.offsets(USER_TOPIC).1, 30);

    // Both become points: 30 through the consumer, 20 through the worker.
    let mut consumer = kafka.start_consumer(&celery);
    kafka.wait_drained(&mut consumer, 30);
    consumer.stop();
    assert_eq!(kafka.points(), 30);
    let mut env = celery.clone();
    env.push(("MESSAGING_BACKEND", "celery"));
    run_worker_until_idle(&kafka, &redis, &env);
    assert_eq!(kafka.points(), 50);
    let ids = kafka.point_ids("user-1", &[]);
    // user-1 has i = 1, 5, 9, … below 50: 13 events, one point each.
    assert_eq!(ids.len(), 13, "{ids:?}");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn the_python_publisher_falls_back_to_celery_while_the_broker_is_stopped() {
    let broker = OwnBroker::new();
    let bootstrap = broker.run("start");
    let kafka = Scenario::on_broker("pyfallback", bootstrap.clone());
    let redis = TestRedis::start();
    let env = redis.env_with(&[
        ("MESSAGING_BACKEND", "kafka"),
        ("MESSAGING_FALLBACK", "celery"),
        ("MESSAGING_FALLBACK_TIMEOUT_MS", "1500"),
        ("MESSAGING_FALLBACK_FAILURES", "2"),
        ("MESSAGING_FALLBACK_OPEN_S", "60"),
    ]);
    let env = pairs(&env);

    broker.run("stop");
    let summary = kafka.python_publish(&mood_lines(0..10), &env);
    assert_eq!(summary["by_backend"], json!({"celery": 10}), "{summary}");
    assert_eq!(redis.int(&["LLEN", "vectordb"]), 10);

    assert_eq!(broker.run("start"), bootstrap);
    let summary = kafka.python_publish(&mood_lines(10..20), &env);
    assert_eq!(summary["by_backend"], json!({"kafka": 10}), "{summary}");

    let mut consumer = kafka.start_consumer(&[]);
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    let mut worker_env = env.clone();
    worker_env.retain(|(k, _)| *k != "MESSAGING_BACKEND");
    worker_env.push(("MESSAGING_BACKEND", "celery"));
    run_worker_until_idle(&kafka, &redis, &worker_env);
    assert_eq!(
        kafka.points(),
        20,
        "every event became its point, 10 per path"
    );
    broker.run("stop");
}
