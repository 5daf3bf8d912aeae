//! Switching between Kafka and Celery with an env var and a restart, and publishing through the Celery fallback while
//! Kafka is down: nothing is lost either way.
//!
//! Run through `scripts/test.sh` (the `services` feature), which starts the broker and the venv and sets
//! `AURA_TEST_KAFKA` and `AURA_TEST_PYTHON`. Every test has its own topic prefix, consumer group and store
//! directory, so they run in parallel on one broker; the harness is `common/stack.rs`.

mod common;

use serde_json::json;
use std::time::{Duration, Instant};

use common::stack::*;

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn rolling_back_to_celery_forwards_the_kafka_backlog_as_tasks_and_loses_nothing() {
    let kafka = Scenario::new("rollback");
    kafka.produce_moods(100, 5);
    // A redis-server of the test's own (never the machine's shared one).
    let own_redis = TestRedis::start();
    let redis_url = own_redis.url();
    let redis_url = redis_url.as_str();
    let mut redis = redis::Client::open(redis_url)
        .unwrap()
        .get_connection()
        .unwrap();
    let celery_env = [
        ("MESSAGING_BACKEND", "celery"),
        ("BROKER_URL", redis_url),
        ("RESULT_BACKEND", redis_url),
    ];

    let mut consumer = kafka.start_consumer(&celery_env);
    kafka.wait_for(
        "the backlog forwarded and committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0] == (100, 100),
    );
    consumer.stop();
    let queued: i64 = redis::cmd("LLEN")
        .arg("vectordb")
        .query(&mut redis)
        .unwrap();
    assert_eq!(queued, 100, "one Celery task per event left in Kafka");
    assert_eq!(
        kafka.offsets(AGGREGATED_TOPIC),
        (0, 0),
        "nothing handled on the Kafka side"
    );

    let mut worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &celery_env);
    let started = Instant::now();
    loop {
        let results: Vec<String> = redis::cmd("KEYS")
            .arg("celery-task-meta-*")
            .query(&mut redis)
            .unwrap();
        let (queued, unacked): (i64, i64) = redis::pipe()
            .cmd("LLEN")
            .arg("vectordb")
            .cmd("HLEN")
            .arg("unacked")
            .query(&mut redis)
            .unwrap();
        if results.len() == 300 && queued == 0 && unacked == 0 {
            break;
        }
        assert!(
            worker.child.try_wait().unwrap().is_none(),
            "worker exited:\n{}",
            worker.log()
        );
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "chain not done: {} results\n{}",
            results.len(),
            worker.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    worker.stop();
    assert_eq!(kafka.points(), 100);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn publishing_falls_back_to_celery_while_kafka_is_down_and_returns_to_kafka_after() {
    let broker = OwnBroker::new();
    let bootstrap = broker.run("start");
    let kafka = Scenario::on_broker("fallback", bootstrap.clone());
    let redis = TestRedis::start();
    let env = redis.env_with(&[
        ("MESSAGING_FALLBACK", "celery"),
        ("MESSAGING_FALLBACK_TIMEOUT_MS", "2000"),
        ("MESSAGING_FALLBACK_FAILURES", "2"),
        ("MESSAGING_FALLBACK_OPEN_S", "2"),
        ("HEALTH_BROKER_GRACE_S", "2"),
        ("BACKLOG_SAMPLE_S", "1"),
    ]);
    let env = pairs(&env);

    let mut consumer = kafka.start_consumer(&env);
    let addr = consumer.http_addr();
    wait_health(&addr, "ok", Duration::from_secs(60));
    let mut publisher = kafka.start_publisher(&env);
    let pace = Duration::from_millis(25);
    publisher.feed(&mood_lines(0..40), pace);
    kafka.wait_for(
        "the first 40 events on Kafka",
        Duration::from_secs(60),
        &mut consumer,
        |offsets| offsets[0].1 == 40,
    );

    // Kafka goes away mid-stream; the stream goes on.
    broker.run("stop");
    publisher.feed(&mood_lines(40..80), pace);
    let (code, body) = wait_health(&addr, "unavailable", Duration::from_secs(30));
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["brokers"][0]["reachable"], false);

    // Kafka is back (same port, same data): once the open period is over, the next event probes it.
    assert_eq!(broker.run("start"), bootstrap);
    wait_health(&addr, "ok", Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    publisher.feed(&mood_lines(80..120), Duration::from_millis(200));
    let summary = publisher.finish();
    assert_eq!(summary["published"], 120, "{summary}");
    assert_eq!(summary["failed"], json!([]), "{summary}");

    let in_kafka: std::collections::BTreeSet<String> = kafka
        .read_topic(USER_TOPIC)
        .iter()
        .map(|r| r["headers"]["event_id"].as_str().unwrap().to_owned())
        .collect();
    let in_celery: std::collections::BTreeSet<String> =
        queued_mood_ids(&redis).into_iter().collect();
    assert!(
        (40..80).any(|i| in_celery.contains(&mood_id(i))),
        "nothing went through Celery while Kafka was down"
    );
    assert!(
        (0..40).all(|i| in_kafka.contains(&mood_id(i))),
        "before the outage: Kafka"
    );
    // After the outage: the first events may still find the circuit open (or the producer reconnecting, which
    // librdkafka backs off up to 10 s), then publishing is back on Kafka for good.
    let via = |i: usize| match (
        in_kafka.contains(&mood_id(i)),
        in_celery.contains(&mood_id(i)),
    ) {
        (true, false) => 'K',
        (false, true) => 'C',
        (true, true) => 'B',
        (false, false) => '-',
    };
    let route: String = (0..120).map(via).collect();
    let back = (80..120).rev().take_while(|&i| via(i) == 'K').count();
    assert!(
        back >= 20,
        "the last 20+ events go to Kafka again; route: {route}"
    );
    assert!(
        (0..120).all(|i| in_kafka.contains(&mood_id(i)) || in_celery.contains(&mood_id(i))),
        "every event is somewhere"
    );
    // The summary says which backend took each event: the fallback took every one found in Celery (a 'B' is an
    // event Kafka delivered after its timeout had already sent it to Celery).
    let through_celery = route.chars().filter(|&c| c == 'C' || c == 'B').count();
    assert_eq!(
        summary["by_backend"]["celery"], through_celery,
        "{summary} route: {route}"
    );
    assert_eq!(
        summary["by_backend"]["kafka"],
        120 - through_celery,
        "{summary}"
    );

    // Both paths processed: the Kafka consumer, then a worker for what went to Celery. 0 lost.
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    let mut worker_env = env.clone();
    worker_env.push(("MESSAGING_BACKEND", "celery"));
    run_worker_until_idle(&kafka, &redis, &worker_env);
    assert_eq!(kafka.points(), 120);
    broker.run("stop");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn switching_kafka_to_celery_and_back_under_load_loses_nothing() {
    let kafka = Scenario::new("switch");
    let redis = TestRedis::start();
    let kafka_env = redis.env().to_vec();
    let mut celery_env = kafka_env.clone();
    celery_env.push(("MESSAGING_BACKEND", "celery".to_owned()));
    let (kafka_env, celery_env) = (pairs(&kafka_env), pairs(&celery_env));

    // A producer that stays on Kafka all along (a service nobody switched), fed from its own thread.
    let mut steady = kafka.start_publisher(&kafka_env);
    let feeder = std::thread::spawn(move || {
        steady.feed(&mood_lines(0..300), Duration::from_millis(40));
        steady.finish()
    });

    // Kafka mode, until it has handled some of the stream.
    let mut consumer = kafka.start_consumer(&kafka_env);
    kafka.wait_for(
        "some events handled on Kafka",
        Duration::from_secs(120),
        &mut consumer,
        |offsets| offsets[0].0 > 0,
    );

    // Roll back to Celery: restart both processes with the new env; the switched API publishes tasks.
    consumer.stop();
    let mut consumer = kafka.start_consumer(&celery_env);
    let worker = kafka.start(env!("CARGO_BIN_EXE_vectordb-worker"), &celery_env);
    let mut switched = kafka.start_publisher(&celery_env);
    switched.feed(&mood_lines(1000..1100), Duration::from_millis(30));
    let summary = switched.finish();
    assert_eq!(summary["published"], 100, "{summary}");
    assert_eq!(summary["backend"], "celery");
    consumer.wait_log("forwarding Kafka's backlog", Duration::from_secs(60));
    let forwarded_from = kafka.offsets(USER_TOPIC).0;
    kafka.wait_for(
        "some of the backlog forwarded",
        Duration::from_secs(120),
        &mut consumer,
        |offsets| offsets[0].0 > forwarded_from || offsets[0].0 == offsets[0].1,
    );

    // And back to Kafka. The worker stops too (in production it would keep draining its queue; here it
    // shares the embedded store with the consumer, which one process holds at a time).
    consumer.stop();
    assert!(worker.terminate().0.success());
    let mut consumer = kafka.start_consumer(&kafka_env);
    let summary = feeder.join().unwrap();
    assert_eq!(summary["published"], 300, "{summary}");
    wait_all_committed(&kafka, &mut consumer);
    consumer.stop();
    run_worker_until_idle(&kafka, &redis, &celery_env);

    assert_eq!(
        kafka.points(),
        400,
        "every event processed once switched around"
    );
    let lag = kafka.lag();
    assert_eq!(lag["kafka"]["total_lag"], 0, "{lag}");
}
