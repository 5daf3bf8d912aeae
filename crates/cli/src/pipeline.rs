//! `vectordb pipeline`: JSONL events through the whole chain, in-process, into the configured store.
//!
//! Lines are read in batches of at most `batch_lines` lines and `batch_bytes` bytes; each batch is pushed onto the
//! in-memory bus and run to completion (the chain's produced events included) before the next is read, so memory is
//! bounded by those settings, whatever the file holds. A line over `MAX_EVENT_BYTES` is never held whole: its first
//! bytes are kept, the rest skipped, and it is dead-lettered with its size. A line that is not an event is reported
//! as a dead letter with its line number; the run goes on. The store is flushed after every batch,
//! so a crash loses at most the batch in progress — and re-running the file rewrites the same point ids.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aura_runtime::embed::CacheStats;
use aura_runtime::events::Event;
use aura_runtime::store::InterceptedStore;
use aura_runtime::{DeadLetter, Dispatcher, HandlerContext, InMemoryBus, Registry, RetryPolicy};
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Events in flight at once.
    pub concurrency: usize,
    /// Lines read per batch.
    pub batch_lines: usize,
    /// Bytes of input lines per batch (a batch also ends at `batch_lines`).
    pub batch_bytes: usize,
    pub retry: RetryPolicy,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            batch_lines: 4096,
            batch_bytes: 16 * 1024 * 1024,
            retry: RetryPolicy::in_process(),
        }
    }
}

/// One dead letter as reported: where, which handler, why.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetterReport {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PipelineSummary {
    /// Non-empty input lines.
    pub events_in: u64,
    /// Events handled successfully, by type: the inputs and what the chain produced from them.
    pub events_by_type: BTreeMap<String, u64>,
    /// Points upserted (an overwrite of an existing id counts: it was written).
    pub points_written: u64,
    /// Points in the collection after the run.
    pub collection_points: u64,
    /// Events with no handler for their type.
    pub skipped: u64,
    /// Events whose handler is disabled (`DISABLED_HANDLERS`); not processed, not lost — reported here.
    pub parked: u64,
    pub dead_letter_count: u64,
    /// The first [`LISTED_DEAD_LETTERS`] of them.
    pub dead_letters: Vec<DeadLetterReport>,
    pub elapsed_s: f64,
    pub events_per_s: f64,
    /// Which embedder ran and how often its cache answered (filled by the caller that owns the embedder).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding: Option<EmbeddingReport>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct EmbeddingReport {
    /// `EMBEDDING_PROVIDER`: local | hash | openai.
    pub provider: String,
    /// What the points' `embedding_model` says.
    pub model: String,
    /// Answered by the in-process LRU.
    pub cache_hits: u64,
    /// Answered by the Redis tier (`EMBEDDING_CACHE_REDIS_URL`).
    pub cache_redis_hits: u64,
    /// Embedded.
    pub cache_misses: u64,
    /// Hits over lookups (`null` when nothing was embedded).
    pub cache_hit_rate: Option<f64>,
}

impl EmbeddingReport {
    pub fn new(settings: &aura_runtime::Settings, cache: CacheStats) -> Self {
        Self {
            provider: settings.embedding.provider.name().to_owned(),
            model: settings.embedding.model_name().to_owned(),
            cache_hits: cache.hits,
            cache_redis_hits: cache.redis_hits,
            cache_misses: cache.misses,
            cache_hit_rate: cache.hit_rate(),
        }
    }
}

/// Dead letters listed one by one in a summary; the rest are counted (a file of garbage must not fill memory with
/// its reports).
pub const LISTED_DEAD_LETTERS: usize = 1_000;

impl PipelineSummary {
    /// Adds what one run of the bus did.
    fn absorb(&mut self, report: aura_runtime::BusReport) {
        for (event_type, n) in report.handled_by_type {
            *self.events_by_type.entry(event_type).or_default() += n;
        }
        self.skipped += report.unhandled;
        self.parked += report.parked.len() as u64;
        for letter in report.dead_letters {
            self.report_dead_letter(letter.into());
        }
    }

    fn report_dead_letter(&mut self, letter: DeadLetterReport) {
        self.dead_letter_count += 1;
        if self.dead_letters.len() < LISTED_DEAD_LETTERS {
            self.dead_letters.push(letter);
        }
    }

    /// True when there was input and none of it could be processed.
    pub fn processed_nothing(&self) -> bool {
        self.events_by_type.values().sum::<u64>() == 0 && self.skipped == 0 && self.parked == 0
    }
}

/// Runs every event of `input` through the chain into `ctx.store`. `progress` is called after each batch.
pub async fn run(
    mut input: impl BufRead,
    registry: Registry,
    ctx: HandlerContext,
    options: &PipelineOptions,
    mut progress: impl FnMut(&PipelineSummary),
) -> anyhow::Result<PipelineSummary> {
    let started = Instant::now();
    let counting = Arc::new(InterceptedStore::counting(ctx.store.clone()));
    let ctx = HandlerContext {
        store: counting.clone(),
        ..ctx
    };
    let bus = Arc::new(InMemoryBus::new());
    let dispatcher = Dispatcher::new(Arc::new(registry), ctx.clone(), bus.clone());
    let mut summary = PipelineSummary::default();

    // Lines as bytes: one line of invalid UTF-8 is that line's dead letter, not the end of the run.
    let max_event_bytes = ctx.limits.max_event_bytes;
    let mut line = Vec::new();
    let mut line_number = 0u64;
    let mut at_end = false;
    loop {
        let (mut batch, mut batch_bytes) = (0, 0);
        while batch < options.batch_lines && batch_bytes < options.batch_bytes {
            let Some(length) = read_bounded_line(&mut input, &mut line, max_event_bytes)
                .map_err(|e| anyhow::anyhow!("reading input line {}: {e}", line_number + 1))?
            else {
                at_end = true;
                break;
            };
            line_number += 1;
            if line.trim_ascii().is_empty() && length == line.len() {
                continue;
            }
            summary.events_in += 1;
            match decode_line(&line, length, max_event_bytes) {
                Ok(event) => bus.push(event),
                Err(reason) => summary.report_dead_letter(DeadLetterReport {
                    source: format!("line {line_number}"),
                    event_id: None,
                    handler: None,
                    reason,
                }),
            }
            batch += 1;
            batch_bytes += line.len();
        }
        if batch == 0 && at_end {
            break;
        }
        let report = bus
            .run(&dispatcher, &options.retry, options.concurrency)
            .await;
        // Whatever the store's durability mode, a batch is on disk before the next one is read.
        ctx.store.flush().await?;
        summary.absorb(report);
        summary.points_written = counting.points_written();
        progress(&summary);
    }

    summary.points_written = counting.points_written();
    summary.collection_points = ctx.store.count(None).await?;
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    summary.elapsed_s = elapsed.as_secs_f64();
    summary.events_per_s = summary.events_in as f64 / summary.elapsed_s;
    Ok(summary)
}

/// One input line as an event, or why it is a dead letter (over `max` bytes, or not an event).
fn decode_line(line: &[u8], length: usize, max: usize) -> Result<Event, String> {
    if length > max {
        return Err(format!(
            "event is {length} bytes, over MAX_EVENT_BYTES={max}"
        ));
    }
    Event::from_slice(line.trim_ascii_end()).map_err(|e| e.to_string())
}

/// Reads the next line (without its `\n`) into `line`, keeping at most `max + 1` of its bytes and skipping the
/// rest; returns the line's whole length, or `None` at the end of the input.
fn read_bounded_line(
    input: &mut impl BufRead,
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<usize>> {
    line.clear();
    let (mut length, mut read_any) = (0, false);
    loop {
        let buffer = match input.fill_buf() {
            Ok(buffer) => buffer,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        };
        if buffer.is_empty() {
            return Ok(read_any.then_some(length));
        }
        read_any = true;
        let newline = buffer.iter().position(|&b| b == b'\n');
        let part = &buffer[..newline.unwrap_or(buffer.len())];
        let room = (max + 1).saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        length += part.len();
        let consumed = part.len() + usize::from(newline.is_some());
        input.consume(consumed);
        if newline.is_some() {
            return Ok(Some(length));
        }
    }
}

impl From<DeadLetter> for DeadLetterReport {
    fn from(letter: DeadLetter) -> Self {
        Self {
            source: letter.source,
            event_id: letter.event_id,
            handler: letter.handler,
            reason: letter.error,
        }
    }
}

/// Human-readable summary, as printed without `--json`.
pub fn render(summary: &PipelineSummary) -> String {
    let mut out = String::new();
    let by_type: Vec<String> = summary
        .events_by_type
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    out.push_str(&format!("events in:        {}\n", summary.events_in));
    out.push_str(&format!(
        "handled by type:  {}\n",
        if by_type.is_empty() {
            "-".into()
        } else {
            by_type.join(", ")
        }
    ));
    out.push_str(&format!(
        "points written:   {} (collection now holds {})\n",
        summary.points_written, summary.collection_points
    ));
    if summary.skipped > 0 {
        out.push_str(&format!(
            "skipped:          {} (no handler for their event type)\n",
            summary.skipped
        ));
    }
    if summary.parked > 0 {
        out.push_str(&format!(
            "parked:           {} (handler disabled by DISABLED_HANDLERS)\n",
            summary.parked
        ));
    }
    if let Some(embedding) = &summary.embedding {
        out.push_str(&format!(
            "embedding:        {} ({}); cache {} hits, {} from Redis, {} embedded{}\n",
            embedding.model,
            embedding.provider,
            embedding.cache_hits,
            embedding.cache_redis_hits,
            embedding.cache_misses,
            embedding
                .cache_hit_rate
                .map(|r| format!(" ({:.1}% hit rate)", r * 100.0))
                .unwrap_or_default()
        ));
    }
    out.push_str(&format!(
        "dead letters:     {}\n",
        summary.dead_letter_count
    ));
    for letter in &summary.dead_letters {
        let handler = letter
            .handler
            .as_deref()
            .map(|h| format!(" [{h}]"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  - {}{handler}: {}\n",
            letter.source, letter.reason
        ));
    }
    out.push_str(&format!(
        "elapsed:          {:.3} s ({:.0} events/s)\n",
        summary.elapsed_s, summary.events_per_s
    ));
    out
}
