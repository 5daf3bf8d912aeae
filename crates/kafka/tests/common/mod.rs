//! What the consumer's tests share: settings, a backlog of numbered events, options with a short backoff, and
//! reading back committed offsets and topics.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use aura_kafka::{ConsumerOptions, KafkaPublisher, create_topics};
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::{RetryPolicy, publish_event};

pub const EVENT_TYPE: &str = "user.test.recorded";

pub fn settings(name: &str) -> KafkaSettings {
    aura_runtime::testing::kafka_settings(name)
}

/// `per_user` events for each of `users` users, interleaved (seq 0 of every user, then seq 1, …), on topics of
/// `partitions` partitions.
pub async fn produce_on(
    settings: &KafkaSettings,
    partitions: i32,
    users: usize,
    per_user: u64,
) -> usize {
    let topics = aura_kafka::TopicNames::from_settings(settings).all();
    create_topics(settings, &topics, partitions, 1)
        .await
        .unwrap();
    let publisher = KafkaPublisher::new(settings).unwrap();
    let mut sent = 0;
    for seq in 0..per_user {
        for user in 0..users {
            let mut event = Event::new(EVENT_TYPE, Some(format!("user-{user}")), None);
            event.set_field("seq", seq.into());
            publish_event(&publisher, &event).await.unwrap();
            sent += 1;
        }
    }
    sent
}

pub fn options() -> ConsumerOptions {
    ConsumerOptions {
        dead_letter_spool: std::env::temp_dir()
            .join(format!("aura-spool-{}", uuid::Uuid::new_v4().simple())),
        retry: RetryPolicy {
            max_attempts: None,
            base: Duration::from_millis(50),
            cap: Duration::from_millis(200),
            jitter: 0.0,
        },
        ..ConsumerOptions::default()
    }
}

/// The offset `settings`' group committed for `topic`/`partition`.
pub fn committed(settings: &KafkaSettings, topic: &str, partition: i32) -> Option<i64> {
    use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
    use aura_kafka::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = aura_kafka::client_config(settings)
        .unwrap()
        .set("group.id", &settings.group_id)
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition(topic, partition);
    let committed = consumer
        .committed_offsets(list, Duration::from_secs(10))
        .unwrap();
    match committed.elements()[0].offset() {
        Offset::Offset(offset) => Some(offset),
        _ => None,
    }
}

/// Every record of `topic` (partition 0) from the start.
pub fn read_all(
    settings: &KafkaSettings,
    topic: &str,
) -> Vec<aura_kafka::rdkafka::message::OwnedMessage> {
    use aura_kafka::rdkafka::consumer::{BaseConsumer, Consumer as _};
    use aura_kafka::rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = aura_kafka::client_config(settings)
        .unwrap()
        .set("group.id", format!("{}-reader", settings.group_id))
        .set("fetch.message.max.bytes", "10000000")
        .create()
        .unwrap();
    let mut list = TopicPartitionList::new();
    list.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&list).unwrap();
    let (_, end) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut records = Vec::new();
    let started = Instant::now();
    while (records.len() as i64) < end && started.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) {
            records.push(message.detach());
        }
    }
    records
}
