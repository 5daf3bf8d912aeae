//! `vectordb-consumer` against a real Apache Kafka broker with a real Python confluent-kafka producer (snappy
//! batches, as the services send them): the chain, poison input, disabled handlers, SIGTERM, outages of the broker,
//! the embedder and the disk.
//!
//! Run through `scripts/test.sh` (the `services` feature), which starts the broker and the venv and sets
//! `AURA_TEST_KAFKA` and `AURA_TEST_PYTHON`. Every test has its own topic prefix, consumer group and store
//! directory, so they run in parallel on one broker; the harness is `common/stack.rs`.

mod common;

use aura_testkit::EmbeddingServer;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

use common::stack::*;

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn python_produced_events_flow_through_all_three_handlers_into_the_store() {
    let kafka = Scenario::new("flow");
    kafka.moods_through_a_consumer(300, 12);

    assert_eq!(kafka.points(), 300);
    // What our publisher produced looks like what the Python services produce: key = user_id, the three headers.
    let aggregated = kafka.read_topic(AGGREGATED_TOPIC);
    assert_eq!(aggregated.len(), 300);
    for record in &aggregated {
        let event: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        assert_eq!(record["key"], event["user_id"]);
        assert_eq!(record["headers"]["event_type"], "context.aggregated");
        assert_eq!(record["headers"]["event_id"], event["event_id"]);
        assert_eq!(record["headers"]["trace_id"], event["trace_id"]);
        assert!(event["metadata"]["causation_id"].is_string(), "{event}");
        assert_eq!(event["metadata"]["source"], "django-api");
    }
    assert!(kafka.read_topic(&format!("{USER_TOPIC}.dlq")).is_empty());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn a_consumer_killed_mid_stream_resumes_and_every_event_becomes_exactly_its_points() {
    let kafka = Scenario::new("kill9");
    // Embeddings answered after 0–400 ms, varying per text: concurrent keys finish out of offset order, and the
    // backlog lasts long enough to be killed in the middle of it.
    let embedder = EmbeddingServer::start_delayed(&kafka.python, kafka.dir.path(), 0, 400);
    let url = embedder.url();
    let env = [
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", url.as_str()),
        ("EMBEDDING_TIMEOUT_S", "10"),
    ];
    kafka.produce_moods(2_000, 40);
    let mut consumer = kafka.start_consumer(&env);
    let addr = consumer.http_addr();
    // Killed while events that finished after an unfinished one sit in a window (committed only up to the gap).
    // The second hop (the one that embeds) is where events are slow and finish out of order.
    let out_of_order = || {
        let ahead = gauge(&addr, "aura360_kafka_finished_ahead_events");
        (ahead > 0.0 && kafka.offsets(AGGREGATED_TOPIC).0 >= 300).then_some(())
    };
    let what = "out-of-order completions in flight past 300 committed";
    consumer.wait_every(
        Duration::from_millis(20),
        what,
        Duration::from_secs(300),
        out_of_order,
    );
    consumer.kill_9();
    let offsets: Vec<(i64, i64)> = ALL_TOPICS.iter().map(|t| kafka.offsets(t)).collect();
    assert!(
        offsets.iter().any(|(committed, end)| committed < end) || offsets[2].1 < 2_000,
        "killed too late to prove anything: {offsets:?}"
    );
    let mut consumer = kafka.start_consumer_assigned(&env);
    kafka.wait_drained(&mut consumer, 2_000);
    consumer.stop();
    assert_eq!(kafka.points(), 2_000);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn poison_messages_are_dead_lettered_with_their_reason_and_good_ones_processed() {
    let kafka = Scenario::new("poison");
    let topic = kafka.topic(USER_TOPIC);
    let mut records = Vec::new();
    let poison = [
        json!({"topic": topic, "key": "u-bad", "value": "{not json"}),
        json!({"topic": topic, "key": "u-bad", "value": "{\"event_type\": \"user.mood.created\"}"}),
        json!({"topic": topic, "key": "u-bad", "headers": {"event_type": "user.mood.created"}}),
        json!({"topic": topic, "key": "u-bad", "value": json!({
            "event_id": "00000000-0000-4000-8000-bad000000001", "event_type": "user.mood.created",
            "timestamp": "2026-11-28T10:00:00", "user_id": "u-bad", "metadata": {},
            "data": {"mood_score": "very sad", "tags": ["x"]}}).to_string()}),
        json!({"topic": topic, "value": json!({
            "event_id": "00000000-0000-4000-8000-bad000000002", "event_type": "user.mood.created",
            "timestamp": "2026-11-28T10:00:00", "user_id": null, "metadata": {},
            "data": {"mood_score": 5, "tags": []}}).to_string()}),
    ];
    for index in 0..60 {
        records.push(mood_record(&topic, &format!("u{}", index % 6), index));
        if index % 12 == 5 {
            records.push(poison[index / 12].clone());
        }
    }
    // A type nobody here handles: skipped and committed, not dead-lettered.
    records.push(json!({"topic": topic, "key": "u1", "value": json!({
        "event_id": "00000000-0000-4000-8000-0000000000ff", "event_type": "user.profile.updated",
        "timestamp": "2026-11-28T10:00:00", "user_id": "u1", "metadata": {}}).to_string(),
        "headers": {"event_type": "user.profile.updated"}}));
    kafka.produce_raw(&records);

    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_for(
        "the user topic committed to its end",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| {
            offsets[0].1 == 66
                && offsets[2].1 >= 60
                && offsets.iter().all(|(committed, end)| committed == end)
        },
    );
    assert!(
        consumer.child.try_wait().unwrap().is_none(),
        "consumer died"
    );
    consumer.stop();

    assert_eq!(kafka.points(), 60);
    let dead = kafka.read_topic(&format!("{USER_TOPIC}.dlq"));
    assert_eq!(dead.len(), 5, "{dead:#?}");
    for letter in &dead {
        let headers = &letter["headers"];
        assert_eq!(headers["source_topic"], topic.as_str());
        let offset: i64 = headers["source_offset"].as_str().unwrap().parse().unwrap();
        assert!((0..66).contains(&offset));
        assert!(
            headers["source_partition"]
                .as_str()
                .unwrap()
                .parse::<i32>()
                .is_ok()
        );
        assert!(!headers["error"].as_str().unwrap().is_empty());
        assert!(headers["handler"].is_string());
        // The original bytes, unchanged.
        assert!(
            poison.iter().any(|p| p["value"] == letter["value"]),
            "{letter}"
        );
    }
    let reasons: Vec<&str> = dead
        .iter()
        .map(|l| l["headers"]["error"].as_str().unwrap())
        .collect();
    assert!(
        reasons.iter().any(|r| r.contains("undecodable event")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("empty message")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("mood_score")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("user_id")), "{reasons:?}");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn a_disabled_consumer_or_handler_commits_nothing_and_the_backlog_is_processed_when_re_enabled() {
    let kafka = Scenario::new("disabled");
    kafka.produce_moods(100, 5);

    let mut consumer = kafka.start_consumer(&[("MESSAGING_BACKEND", "disabled")]);
    // Observed, not slept on: the process is up and has decided to take nothing.
    consumer.wait_log(
        "consuming nothing, committing nothing",
        Duration::from_secs(60),
    );
    assert!(consumer.child.try_wait().unwrap().is_none());
    assert_eq!(kafka.offsets(USER_TOPIC), (0, 100));
    consumer.stop();

    // One handler isolated: the user topic is processed, the aggregated topic is left alone.
    let mut consumer = kafka.start_consumer(&[("DISABLED_HANDLERS", "context_aggregated")]);
    kafka.wait_for(
        "mood events handled",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0] == (100, 100) && offsets[1].1 == 100,
    );
    // The member was assigned the user topic only: the aggregated topic is not one it could commit.
    let log = strip_ansi(&consumer.log());
    let assigned = log
        .lines()
        .find(|l| l.contains("partitions assigned"))
        .unwrap_or_else(|| panic!("no assignment logged:\n{log}"));
    assert!(assigned.contains(&kafka.topic(USER_TOPIC)), "{assigned}");
    assert!(
        !assigned.contains(&kafka.topic(AGGREGATED_TOPIC)),
        "{assigned}"
    );
    assert_eq!(kafka.offsets(AGGREGATED_TOPIC), (0, 100));
    consumer.stop();
    assert_eq!(kafka.points(), 0);

    kafka.drain_with_a_consumer(100);
    assert_eq!(kafka.points(), 100);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn sigterm_under_load_exits_zero_within_ten_seconds_and_loses_nothing() {
    let kafka = Scenario::new("sigterm");
    // Embeddings answered after 0–300 ms: events are in flight when SIGTERM comes.
    let embedder = EmbeddingServer::start_delayed(&kafka.python, kafka.dir.path(), 0, 300);
    let url = embedder.url();
    let env = [
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", url.as_str()),
        ("EMBEDDING_TIMEOUT_S", "10"),
    ];
    kafka.produce_moods(1_500, 30);
    let mut consumer = kafka.start_consumer(&env);
    kafka.wait_for(
        "some events committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0].0 >= 200,
    );
    let (status, took, log) = consumer.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    // The first hop is instant (no embedding): the chain as a whole must be unfinished.
    let offsets: Vec<(i64, i64)> = ALL_TOPICS.iter().map(|t| kafka.offsets(t)).collect();
    assert!(
        offsets.iter().any(|(committed, end)| committed < end) || offsets[2].1 < 1_500,
        "stopped too late to prove anything: {offsets:?}"
    );

    let mut consumer = kafka.start_consumer(&env);
    kafka.wait_drained(&mut consumer, 1_500);
    consumer.stop();
    assert_eq!(kafka.points(), 1_500);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn topics_create_is_idempotent_and_publish_sends_the_python_record_shape() {
    let kafka = Scenario::new("publish");
    let again: Vec<Value> =
        serde_json::from_str(&kafka.vectordb(&["topics", "create", "--json"])).unwrap();
    assert_eq!(again.len(), 6);
    assert!(again.iter().all(|t| t["status"] == "exists"), "{again:?}");

    let lines: Vec<&str> = include_str!("../../../examples/mood_events.jsonl")
        .lines()
        .take(5)
        .collect();
    let file = kafka.dir.path().join("five.jsonl");
    std::fs::write(&file, lines.join("\n")).unwrap();
    let summary: Value = serde_json::from_str(&kafka.vectordb(&[
        "publish",
        "--events",
        file.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(summary["published"], 5, "{summary}");
    assert_eq!(summary["backend"], "kafka");
    let one: Value = serde_json::from_str(&kafka.vectordb(&[
        "publish",
        "--type",
        "context.aggregated",
        "--user",
        "user-9",
        "--data",
        r#"{"text_representation": "User: user-9"}"#,
        "--json",
    ]))
    .unwrap();
    assert_eq!(one["published"], 1, "{one}");

    let records = kafka.read_topic(USER_TOPIC);
    assert_eq!(records.len(), 5);
    for record in &records {
        let value: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
        let sent: Value = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|e| e["event_id"] == value["event_id"])
            .expect("a published event");
        assert_eq!(value, sent, "the event travels unchanged");
        assert_eq!(record["key"], sent["user_id"]);
        assert_eq!(record["headers"]["event_type"], sent["event_type"]);
        assert_eq!(record["headers"]["event_id"], sent["event_id"]);
    }
    let aggregated = kafka.read_topic(AGGREGATED_TOPIC);
    assert_eq!(aggregated.len(), 1);
    let value: Value = serde_json::from_str(aggregated[0]["value"].as_str().unwrap()).unwrap();
    assert_eq!(value["context_data"]["text_representation"], "User: user-9");
    assert_eq!(aggregated[0]["key"], "user-9");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn journal_sized_entries_among_ordinary_events_of_the_same_user_neither_stall_nor_bloat_the_consumer()
 {
    let kafka = Scenario::new("journal");
    let topic = kafka.topic(USER_TOPIC);
    let mut records = Vec::new();
    let mut journals = 0;
    for index in 0..300 {
        // Two users; every 25th event of "writer" is a journal entry of 50 KB to 900 KB.
        let user = if index % 2 == 0 { "writer" } else { "reader" };
        let mut record = mood_record(&topic, user, index);
        if user == "writer" && index % 25 == 0 {
            let size = 50_000 + (index * 7_919 % 850_000);
            let mut event: Value = serde_json::from_str(record["value"].as_str().unwrap()).unwrap();
            event["data"]["notes"] =
                json!("today I wrote and wrote about it all. ".repeat(size / 38));
            record["value"] = json!(event.to_string());
            journals += 1;
        }
        records.push(record);
    }
    kafka.produce_raw(&records);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_drained(&mut consumer, 300);
    let peak = consumer.peak_rss();
    consumer.stop();

    assert!(
        kafka.read_topic(&format!("{USER_TOPIC}.dlq")).is_empty(),
        "a journal entry was dead-lettered"
    );
    assert!(
        kafka
            .read_topic(&format!("{AGGREGATED_TOPIC}.dlq"))
            .is_empty()
    );
    // Each ordinary event is one point; each journal entry is cut to MAX_EMBED_CHARS: MAX_CHUNKS_PER_EVENT points.
    assert_eq!(kafka.points(), (300 - journals) + journals * 40);
    let what = format!("the consumer, with {journals} journal entries");
    aura_testkit::process::assert_peak_within(&what, peak, 500);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn an_embedding_outage_under_the_kafka_consumer_is_retried_reported_and_loses_nothing() {
    let kafka = Scenario::new("outage-kafka");
    let embedder = EmbeddingServer::start(&kafka.python, kafka.dir.path(), 30);
    kafka.produce_moods(100, 10);
    let url = embedder.url();
    let mut consumer = kafka.start_consumer(&[
        ("EMBEDDING_PROVIDER", "openai"),
        ("EMBEDDING_URL", &url),
        ("EMBEDDING_TIMEOUT_S", "5"),
    ]);
    let addr = consumer.http_addr();
    let (code, body) = wait_health(&addr, "degraded", Duration::from_secs(60));
    assert_eq!(code, 200, "degraded is alive and retrying: {body}");
    assert!(embedder_down(&body), "{body}");
    assert!(body["dependencies"].to_string().contains("503"), "{body}");

    kafka.wait_drained(&mut consumer, 100);
    let (_, body) = wait_health(&addr, "ok", Duration::from_secs(30));
    assert!(!embedder_down(&body), "{body}");
    consumer.stop();

    assert_eq!(kafka.points(), 100);
    for topic in ALL_TOPICS {
        assert!(
            kafka.read_topic(&format!("{topic}.dlq")).is_empty(),
            "{topic}.dlq"
        );
    }
    // Backoff, not a hot loop: ten users' keys retrying for 30 s (~8 attempts each with a doubling backoff).
    let (refused, served) = embedder.requests();
    assert!((3..=200).contains(&refused), "{refused} requests refused");
    assert!(served >= 100, "{served}");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn a_full_disk_under_the_embedded_store_is_retried_reported_and_loses_nothing() {
    let kafka = Scenario::new("disk-full");
    let fs = SmallFilesystem::mount(kafka.dir.path().join("store-fs"), 96);
    let store = fs.path.join("qdrant");
    let store_env = store.to_str().unwrap().to_owned();
    // 96 MB of which the store needs a few; writes wait below 32 MB free.
    let env = [
        ("QDRANT_PATH", store_env.as_str()),
        ("QDRANT_MIN_FREE_MB", "32"),
    ];
    kafka.produce_moods(50, 5);
    let mut consumer = kafka.start_consumer(&env);
    let addr = consumer.http_addr();
    kafka.wait_drained(&mut consumer, 50);

    fs.fill();
    kafka.produce_moods(50, 5);
    // The refused write is retried (not a crash): wait for the third attempt, then ask /health.
    consumer.wait_log("MiB free", Duration::from_secs(60));
    consumer.wait_log("attempt=3", Duration::from_secs(60));
    let (code, body) = wait_health(&addr, "degraded", Duration::from_secs(60));
    assert_eq!(code, 200, "{body}");
    assert!(
        body["dependencies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "vector_store" && d["ok"] == false),
        "{body}"
    );
    assert!(
        consumer.child.try_wait().unwrap().is_none(),
        "the consumer died:\n{}",
        consumer.log()
    );

    fs.free();
    kafka.wait_drained(&mut consumer, 100);
    wait_health(&addr, "ok", Duration::from_secs(60));
    consumer.stop();
    for topic in ALL_TOPICS {
        assert!(
            kafka.read_topic(&format!("{topic}.dlq")).is_empty(),
            "{topic}.dlq"
        );
    }
    let stats: Value =
        serde_json::from_str(&kafka.vectordb_with(&env, &["stats", "--json"])).unwrap();
    assert_eq!(stats["points"], 100);
}

/// With Kafka unreachable, librdkafka reports the same failure from every client and broker thread, many times a
/// millisecond, and the sampler opens a new client every BACKLOG_SAMPLE_S: a consumer left running against a closed
/// port for several samples logs each distinct problem once (repeats are counted, not printed).
#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn an_unreachable_kafka_is_one_line_per_problem_not_a_flood() {
    let kafka = Scenario::new("flood");
    let mut consumer = kafka.start_consumer(&[
        ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9"),
        ("BACKLOG_SAMPLE_S", "1"),
        ("RUST_LOG", "info"),
    ]);
    let addr = consumer.http_addr();
    // Observed, not slept on: the sampler has found Kafka unreachable for 4 s (4 or more probes, each a new client).
    let started = Instant::now();
    loop {
        let (_, body) = health(&addr);
        if body["brokers"][0]["unreachable_for_seconds"]
            .as_f64()
            .unwrap_or(0.0)
            >= 4.0
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = strip_ansi(&consumer.stop());
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("librdkafka")).collect();
    assert!(!lines.is_empty(), "the outage is reported:\n{log}");
    let mut seen = std::collections::HashSet::new();
    for line in &lines {
        // The message, without its time stamp, numbers and librdkafka's "(after …ms …)" tail.
        let message: String = line
            .split_once("librdkafka")
            .map_or(*line, |(_, m)| m)
            .split(" (")
            .next()
            .unwrap()
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .collect();
        assert!(seen.insert(message), "repeated: {line}\n{log}");
    }
    assert!(lines.len() <= 6, "{} librdkafka lines:\n{log}", lines.len());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs Kafka, Redis, Prometheus, Python: test.sh")]
fn sigterm_while_kafka_is_down_exits_within_ten_seconds_and_loses_nothing() {
    let broker = OwnBroker::new();
    let kafka = Scenario::on_broker("outage-stop", broker.run("start"));
    kafka.produce_moods(300, 20);
    let mut consumer = kafka.start_consumer(&[]);
    kafka.wait_for(
        "some events committed",
        Duration::from_secs(300),
        &mut consumer,
        |offsets| offsets[0].0 >= 50,
    );
    // librdkafka's close waits for the group coordinator: without a bound this exit would wait for Kafka.
    broker.run("stop");
    let (status, took, log) = consumer.terminate();
    assert!(status.success(), "exit {status}:\n{log}");
    assert!(took < Duration::from_secs(10), "took {took:?}:\n{log}");

    // Kafka back: a new consumer finishes the job from the committed offsets (once the member that could not leave
    // has expired: `start_consumer_assigned`).
    broker.run("start");
    let mut consumer = kafka.start_consumer_assigned(&[]);
    kafka.wait_drained(&mut consumer, 300);
    consumer.stop();
    assert_eq!(kafka.points(), 300);
}
