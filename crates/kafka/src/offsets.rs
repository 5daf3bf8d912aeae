//! Offsets from outside the group: lag per partition (`vectordb lag`, the backlog gauges) and reading a range of a
//! topic back (`vectordb export`, `vectordb replay`).

use std::collections::BTreeMap;
use std::time::Duration;

use aura_runtime::settings::KafkaSettings;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::{ClientError, client_config};

/// One partition of a group's topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartitionLag {
    pub group: String,
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (`null`: the group never committed here).
    pub committed: Option<i64>,
    /// The first offset still on the broker.
    pub start: i64,
    /// The high watermark: the offset the next record will get.
    pub end: i64,
    /// Records beyond the committed offset (from `start` when nothing is committed).
    pub lag: u64,
}

/// The group's position on `topics`, from a client that does not join the group (safe while it runs). Topics that
/// do not exist are returned in the second list.
pub async fn group_lag(
    settings: &KafkaSettings,
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<(Vec<PartitionLag>, Vec<String>), ClientError> {
    let consumer = offsets_client(settings, group)?;
    let group = group.to_owned();
    let topics = topics.to_vec();
    run_blocking(move || {
        let mut missing = Vec::new();
        let mut wanted = TopicPartitionList::new();
        for topic in &topics {
            match partitions_of(&consumer, topic, timeout)? {
                Some(partitions) => {
                    for partition in partitions {
                        wanted.add_partition(topic, partition);
                    }
                }
                None => missing.push(topic.clone()),
            }
        }
        let committed = if wanted.count() == 0 {
            TopicPartitionList::new()
        } else {
            consumer
                .committed_offsets(wanted.clone(), timeout)
                .map_err(|e| ClientError::kafka(format!("reading group {group}'s offsets"), e))?
        };
        let mut lags = Vec::new();
        for element in wanted.elements() {
            let (topic, partition) = (element.topic(), element.partition());
            let (start, end) = consumer
                .fetch_watermarks(topic, partition, timeout)
                .map_err(|e| {
                    ClientError::kafka(format!("reading {topic}[{partition}]'s end offset"), e)
                })?;
            let committed =
                committed
                    .find_partition(topic, partition)
                    .and_then(|p| match p.offset() {
                        Offset::Offset(offset) => Some(offset),
                        _ => None,
                    });
            let from = committed.unwrap_or(start).max(start);
            lags.push(PartitionLag {
                group: group.clone(),
                topic: topic.to_owned(),
                partition,
                committed,
                start,
                end,
                lag: (end - from).max(0) as u64,
            });
        }
        Ok((lags, missing))
    })
    .await
}

/// A record as `vectordb export` writes it, one JSON object per line: the Kafka coordinates are kept, the value's
/// bytes exactly (as text when UTF-8, else base64).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportedRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp_ms: Option<i64>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The value as UTF-8 text (`null`: no value, or see `value_base64`).
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
}

/// Which records of a topic to read.
#[derive(Clone, Debug, Default)]
pub struct Range {
    pub topic: String,
    /// `None`: every partition.
    pub partition: Option<i32>,
    /// First offset (inclusive); `None`: the start (or the group's committed offset with `from_group`).
    pub from: Option<i64>,
    /// Last offset (exclusive); `None`: the end offset when reading starts (so a read always finishes).
    pub to: Option<i64>,
    /// Start at this group's committed offsets (what the group has not processed yet).
    pub from_group: Option<String>,
    /// Stop after this many records (all partitions together), like the console consumer's `--max-messages`.
    pub max_records: Option<u64>,
}

/// How many records `read_range` would read now (the sum of its partitions' offset spans: an upper bound on a
/// compacted topic). For progress reporting.
pub fn range_size(
    settings: &KafkaSettings,
    range: &Range,
    timeout: Duration,
) -> Result<u64, ClientError> {
    let consumer = offsets_client(settings, &reader_group())?;
    let plan = plan_range(settings, &consumer, range, timeout)?;
    let span: u64 = plan
        .values()
        .map(|(from, to)| (to - from).max(0) as u64)
        .sum();
    Ok(range.max_records.map_or(span, |max| span.min(max)))
}

/// A throwaway group id: reading never commits anything anywhere.
fn reader_group() -> String {
    format!("aura360-vectordb-reader-{}", std::process::id())
}

/// Per partition of `range`: the offsets to read, `[from, to)`, resolved against the broker (and the group).
fn plan_range(
    settings: &KafkaSettings,
    consumer: &BaseConsumer<crate::logs::LogContext>,
    range: &Range,
    timeout: Duration,
) -> Result<BTreeMap<i32, (i64, i64)>, ClientError> {
    let partitions = match range.partition {
        Some(partition) => vec![partition],
        None => partitions_of(consumer, &range.topic, timeout)?.ok_or_else(|| {
            ClientError::kafka(
                format!("topic {} does not exist", range.topic),
                rdkafka::error::KafkaError::MetadataFetch(
                    rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
                ),
            )
        })?,
    };
    let committed = match &range.from_group {
        Some(group) => {
            let group_client = offsets_client(settings, group)?;
            let mut wanted = TopicPartitionList::new();
            for &partition in &partitions {
                wanted.add_partition(&range.topic, partition);
            }
            Some(
                group_client
                    .committed_offsets(wanted, timeout)
                    .map_err(|e| {
                        ClientError::kafka(format!("reading group {group}'s offsets"), e)
                    })?,
            )
        }
        None => None,
    };
    let mut plan = BTreeMap::new();
    for &partition in &partitions {
        let (low, high) = consumer
            .fetch_watermarks(&range.topic, partition, timeout)
            .map_err(|e| {
                ClientError::kafka(format!("reading {}[{partition}]'s offsets", range.topic), e)
            })?;
        let group_offset = committed.as_ref().and_then(|c| {
            c.find_partition(&range.topic, partition)
                .and_then(|p| match p.offset() {
                    Offset::Offset(offset) => Some(offset),
                    _ => None,
                })
        });
        let from = range.from.or(group_offset).unwrap_or(low).max(low);
        let to = range.to.unwrap_or(high).min(high);
        if from < to {
            plan.insert(partition, (from, to));
        }
    }
    Ok(plan)
}

/// Reads `range` and hands each record to `sink` in offset order per partition (a blocking callback: call from
/// `spawn_blocking` or a thread). Returns how many records were read.
pub fn read_range(
    settings: &KafkaSettings,
    range: &Range,
    timeout: Duration,
    mut sink: impl FnMut(ExportedRecord) -> Result<(), String>,
) -> Result<u64, ClientError> {
    let consumer = offsets_client(settings, &reader_group())?;
    let plan = plan_range(settings, &consumer, range, timeout)?;
    let mut assignment = TopicPartitionList::new();
    let mut stop = BTreeMap::new();
    for (&partition, &(from, to)) in &plan {
        assignment
            .add_partition_offset(&range.topic, partition, Offset::Offset(from))
            .map_err(|e| ClientError::kafka("building the assignment", e))?;
        stop.insert(partition, to);
    }
    if stop.is_empty() {
        return Ok(0);
    }
    consumer
        .assign(&assignment)
        .map_err(|e| ClientError::kafka(format!("reading {}", range.topic), e))?;
    let mut read = 0u64;
    let mut idle = Duration::ZERO;
    let max = range.max_records.unwrap_or(u64::MAX);
    while !stop.is_empty() && read < max {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            idle += Duration::from_millis(200);
            if idle > timeout {
                return Err(ClientError::kafka(
                    format!(
                        "reading {}: no records for {} s",
                        range.topic,
                        timeout.as_secs()
                    ),
                    rdkafka::error::KafkaError::NoMessageReceived,
                ));
            }
            continue;
        };
        idle = Duration::ZERO;
        let message =
            result.map_err(|e| ClientError::kafka(format!("reading {}", range.topic), e))?;
        let partition = message.partition();
        let Some(&end) = stop.get(&partition) else {
            continue;
        };
        if message.offset() < end {
            let record = exported(&message);
            sink(record).map_err(|reason| {
                ClientError::kafka(reason, rdkafka::error::KafkaError::Canceled)
            })?;
            read += 1;
        }
        if message.offset() + 1 >= end {
            stop.remove(&partition);
        }
    }
    Ok(read)
}

/// `message` as `vectordb export` writes it (dead letters spooled to disk use the same form, so `vectordb replay
/// --file` takes them back).
pub fn exported(message: &impl Message) -> ExportedRecord {
    let headers = message
        .headers()
        .map(|headers| {
            headers
                .iter()
                .map(|h| {
                    let value = h.value.map(String::from_utf8_lossy).unwrap_or_default();
                    (h.key.to_owned(), value.into_owned())
                })
                .collect()
        })
        .unwrap_or_default();
    let (value, value_base64) = match message.payload() {
        None => (None, None),
        Some(bytes) => aura_runtime::exact::split(bytes),
    };
    ExportedRecord {
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        timestamp_ms: message.timestamp().to_millis(),
        key: message
            .key()
            .map(|k| String::from_utf8_lossy(k).into_owned()),
        headers,
        value,
        value_base64,
    }
}

impl ExportedRecord {
    /// The value's bytes, as they were on the topic.
    pub fn value_bytes(&self) -> Option<Vec<u8>> {
        aura_runtime::exact::join(self.value.as_deref(), self.value_base64.as_deref())
    }
}

fn offsets_client(
    settings: &KafkaSettings,
    group: &str,
) -> Result<BaseConsumer<crate::logs::LogContext>, ClientError> {
    client_config(settings)?
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .create_with_context(crate::logs::LogContext)
        .map_err(ClientError::create("offsets reader", settings))
}

/// The partitions of `topic`, or `None` when it does not exist.
fn partitions_of(
    consumer: &BaseConsumer<crate::logs::LogContext>,
    topic: &str,
    timeout: Duration,
) -> Result<Option<Vec<i32>>, ClientError> {
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|e| ClientError::kafka(format!("reading {topic}'s metadata"), e))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if found.error().is_some() || found.partitions().is_empty() {
        return Ok(None);
    }
    Ok(Some(found.partitions().iter().map(|p| p.id()).collect()))
}

async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ClientError> + Send + 'static,
) -> Result<T, ClientError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        ClientError::kafka(
            format!("offsets task failed: {e}"),
            rdkafka::error::KafkaError::Canceled,
        )
    })?
}
