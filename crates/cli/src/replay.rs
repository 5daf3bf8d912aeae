//! `vectordb export` and `vectordb replay`: a topic range to JSONL and back, into the handlers, Kafka or Celery;
//! dead letters back to where they came from.
//!
//! Replays are safe to repeat: point ids derive from the origin event id (docs/design.md §4), so an event processed twice
//! overwrites its points instead of adding any; a replayed Kafka record or Celery task is just a redelivery.

use std::io::{BufRead, Write};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use aura_celery::CeleryPublisher;
use aura_kafka::offsets::{ExportedRecord, Range, range_size, read_range};
use aura_kafka::{DEAD_LETTER_HEADERS, KafkaPublisher, OutgoingRecord};
use aura_runtime::events::Event;
use aura_runtime::store::Durability;
use aura_runtime::{Settings, publish_event};
use serde::Serialize;

use crate::pipeline::{self, PipelineOptions};

/// How long a topic read may see nothing before it gives up.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// Run the chain in-process into the configured store (no broker).
    Handlers,
    /// Back onto Kafka: a record keeps its key, headers and bytes; a dead letter goes to its source topic.
    Kafka,
    /// As Celery tasks on CELERY_PUBLISH_QUEUE (the event's task, `send_task` format).
    Celery,
}

/// Where replayed records come from.
pub enum Source {
    /// An export (or any JSONL of records or plain events).
    File(Box<dyn BufRead + Send>),
    Topic(Range),
}

#[derive(Debug, Default, Serialize)]
pub struct ExportSummary {
    pub topic: String,
    pub records: u64,
}

/// How many records `range` holds now, for a progress bar (`None` if the broker does not say).
pub async fn records_in(settings: &Settings, range: &Range) -> Option<u64> {
    let (kafka, range) = (settings.kafka.clone(), range.clone());
    tokio::task::spawn_blocking(move || range_size(&kafka, &range, READ_TIMEOUT).ok())
        .await
        .ok()
        .flatten()
}

/// How many non-blank lines a file has, for a progress bar (`None` if it cannot be read).
pub fn lines_in(path: &std::path::Path) -> Option<u64> {
    let file = std::fs::File::open(path).ok()?;
    let mut count = 0;
    for line in std::io::BufReader::new(file).split(b'\n') {
        if !line.ok()?.trim_ascii().is_empty() {
            count += 1;
        }
    }
    Some(count)
}

/// Writes `range` as JSONL (one [`ExportedRecord`] per line) to `out`.
pub async fn export(
    settings: &Settings,
    range: Range,
    out: Box<dyn Write + Send>,
    progress: impl FnMut(u64) + Send + 'static,
) -> anyhow::Result<ExportSummary> {
    let kafka = settings.kafka.clone();
    let topic = range.topic.clone();
    let records = tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
        let mut out = std::io::BufWriter::new(out);
        let mut progress = progress;
        let mut written = 0u64;
        read_range(&kafka, &range, READ_TIMEOUT, |record| {
            serde_json::to_writer(&mut out, &record).map_err(|e| e.to_string())?;
            out.write_all(b"\n").map_err(|e| e.to_string())?;
            written += 1;
            progress(written);
            Ok(())
        })?;
        out.flush().context("writing the export")?;
        Ok(written)
    })
    .await
    .context("export task")??;
    Ok(ExportSummary { topic, records })
}

#[derive(Debug, Default, Serialize)]
pub struct ReplaySummary {
    pub to: Option<Target>,
    pub read: u64,
    pub replayed: u64,
    /// Records that could not be replayed: `where: why`.
    pub failed: Vec<String>,
    /// `--to handlers`: points in the collection afterwards.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub collection_points: Option<u64>,
}

impl ReplaySummary {
    /// Counts one record's outcome.
    fn tally(&mut self, place: &str, result: Result<(), String>, progress: &mut impl FnMut(u64)) {
        match result {
            Ok(()) => {
                self.replayed += 1;
                progress(self.replayed);
            }
            Err(error) => self.failed.push(format!("{place}: {error}")),
        }
    }
}

/// One line of a replay input: an exported record, or a bare event.
fn parse_line(line: &[u8]) -> Result<ExportedRecord, String> {
    let value: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("topic").is_some() && value.get("offset").is_some() {
        return serde_json::from_value(value).map_err(|e| format!("not an exported record: {e}"));
    }
    // A bare event: no coordinates, routed by its type.
    Ok(ExportedRecord {
        topic: String::new(),
        partition: -1,
        offset: -1,
        timestamp_ms: None,
        key: None,
        headers: Default::default(),
        value: Some(String::from_utf8_lossy(line).into_owned()),
        value_base64: None,
    })
}

/// Reads the source's records into a channel (a topic is read on a blocking thread).
fn records(
    source: Source,
    settings: &Settings,
) -> tokio::sync::mpsc::Receiver<(String, Result<ExportedRecord, String>)> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let kafka = settings.kafka.clone();
    tokio::task::spawn_blocking(move || match source {
        Source::File(input) => {
            for (index, line) in input.split(b'\n').enumerate() {
                let place = format!("line {}", index + 1);
                let item = match line {
                    Ok(line) if line.trim_ascii().is_empty() => continue,
                    Ok(line) => parse_line(line.trim_ascii()),
                    Err(error) => Err(format!("reading: {error}")),
                };
                if tx.blocking_send((place, item)).is_err() {
                    return;
                }
            }
        }
        Source::Topic(range) => {
            let topic = range.topic.clone();
            let result = read_range(&kafka, &range, READ_TIMEOUT, |record| {
                let place = format!("{}[{}]@{}", record.topic, record.partition, record.offset);
                tx.blocking_send((place, Ok(record)))
                    .map_err(|_| "replay stopped".to_owned())
            });
            if let Err(error) = result {
                let _ = tx.blocking_send((topic, Err(error.to_string())));
            }
        }
    });
    rx
}

/// Replays `source` into `to`.
pub async fn replay(
    settings: &Settings,
    source: Source,
    to: Target,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<ReplaySummary> {
    let mut summary = ReplaySummary {
        to: Some(to),
        ..ReplaySummary::default()
    };
    let mut rx = records(source, settings);
    match to {
        Target::Handlers => {
            // The chain runs in-process on the events, like `vectordb pipeline`.
            let mut lines = Vec::new();
            while let Some((place, item)) = rx.recv().await {
                summary.read += 1;
                match item.and_then(|record| event_of(&record)) {
                    Ok(event) => {
                        lines.extend_from_slice(&event.to_vec());
                        lines.push(b'\n');
                    }
                    Err(error) => summary.failed.push(format!("{place}: {error}")),
                }
            }
            let registry = crate::configured_registry(settings)?;
            let context = crate::handler_context(settings, Durability::OnFlush).await?;
            let result = pipeline::run(
                std::io::Cursor::new(lines),
                registry,
                context,
                &PipelineOptions::default(),
                |s| progress(s.events_in),
            )
            .await?;
            summary.replayed = result.events_in - result.dead_letter_count.min(result.events_in);
            summary.failed.extend(
                result
                    .dead_letters
                    .iter()
                    .map(|d| format!("{}: {}", d.source, d.reason)),
            );
            summary.collection_points = Some(result.collection_points);
        }
        Target::Kafka => {
            let kafka =
                KafkaPublisher::new(&settings.kafka).context("creating the Kafka producer")?;
            while let Some((place, item)) = rx.recv().await {
                summary.read += 1;
                let result = match item {
                    Ok(record) => to_kafka(&kafka, &record).await,
                    Err(error) => Err(error),
                };
                summary.tally(&place, result, &mut progress);
            }
            if let Err(error) = kafka.flush(Duration::from_secs(10)) {
                summary
                    .failed
                    .push(format!("flushing the producer: {error}"));
            }
        }
        Target::Celery => {
            let broker = Arc::new(crate::clients::celery_broker(settings)?);
            let celery = CeleryPublisher::new(broker, settings.celery.publish_queue());
            while let Some((place, item)) = rx.recv().await {
                summary.read += 1;
                let result = match item.and_then(|record| event_of(&record)) {
                    Ok(event) => publish_event(&celery, &event)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(error) => Err(error),
                };
                summary.tally(&place, result, &mut progress);
            }
        }
    }
    Ok(summary)
}

fn event_of(record: &ExportedRecord) -> Result<Event, String> {
    let bytes = record
        .value_bytes()
        .ok_or_else(|| "the record has no value".to_owned())?;
    Event::from_slice(&bytes).map_err(|e| e.to_string())
}

/// A record back onto Kafka as it was; a dead letter (from `<topic>.dlq`) to its source topic without the
/// dead-letter headers; a bare event to its type's topic.
async fn to_kafka(kafka: &KafkaPublisher, record: &ExportedRecord) -> Result<(), String> {
    if record.topic.is_empty() {
        let event = event_of(record)?;
        return publish_event(kafka, &event)
            .await
            .map_err(|e| e.to_string());
    }
    let topic = match record.headers.get("source_topic") {
        Some(source) if !source.is_empty() => source.clone(),
        _ => record
            .topic
            .strip_suffix(".dlq")
            .unwrap_or(&record.topic)
            .to_owned(),
    };
    let payload = record.value_bytes();
    let headers: Vec<(&str, &[u8])> = record
        .headers
        .iter()
        .filter(|(key, _)| !DEAD_LETTER_HEADERS.contains(&key.as_str()))
        .map(|(key, value)| (key.as_str(), value.as_bytes()))
        .collect();
    kafka
        .send(OutgoingRecord {
            topic: &topic,
            key: record.key.as_deref().map(str::as_bytes),
            payload: payload.as_deref(),
            headers,
        })
        .await
        .map(|_| ())
        .map_err(|e| format!("sending to {topic}: {e}"))
}

/// `vectordb replay --celery-dlq QUEUE`: every dead letter on `<queue>.dlq` back onto its queue.
pub async fn replay_celery_dead_letters(
    settings: &Settings,
    queue: &str,
    progress: impl FnMut(usize),
) -> anyhow::Result<ReplaySummary> {
    let broker = crate::clients::celery_broker(settings)?;
    let depth = broker
        .depth(
            queue,
            &[],
            aura_celery::Patience::Until(Duration::from_secs(10)),
        )
        .await
        .with_context(|| format!("reading {queue}.dlq"))?;
    let (moved, unreadable) = broker
        .replay_dead_letters(queue, depth.dead_letters as usize, progress)
        .await
        .with_context(|| format!("replaying {queue}.dlq"))?;
    Ok(ReplaySummary {
        to: Some(Target::Celery),
        read: depth.dead_letters,
        replayed: moved as u64,
        failed: unreadable
            .into_iter()
            .map(|entry| format!("{queue}.dlq entry without a message (left in place): {entry}"))
            .collect(),
        collection_points: None,
    })
}
