//! `vectordb pipeline`: JSONL events through the whole chain, in-process, into the configured store.
//!
//! Lines are read in batches; each batch is pushed onto the in-memory bus and run to completion (the chain's
//! produced events included) before the next is read, so memory stays bounded on large files. A line that is not an
//! event is reported as a dead letter with its line number; the run goes on. The store is flushed after every batch,
//! so a crash loses at most the batch in progress — and re-running the file rewrites the same point ids.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    pub retry: RetryPolicy,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            concurrency: 256,
            batch_lines: 4096,
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
    pub dead_letters: Vec<DeadLetterReport>,
    pub elapsed_s: f64,
    pub events_per_s: f64,
}

impl PipelineSummary {
    /// True when there was input and none of it could be processed.
    pub fn processed_nothing(&self) -> bool {
        self.events_by_type.values().sum::<u64>() == 0 && self.skipped == 0 && self.parked == 0
    }
}

/// Runs every event of `input` through the chain into `ctx.store`. `progress` is called after each batch.
pub async fn run(
    input: impl BufRead,
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
    let mut lines = input.split(b'\n').enumerate();
    loop {
        let mut batch = 0;
        for (index, line) in lines.by_ref() {
            let line =
                line.map_err(|e| anyhow::anyhow!("reading input line {}: {e}", index + 1))?;
            if line.trim_ascii().is_empty() {
                continue;
            }
            summary.events_in += 1;
            match Event::from_slice(line.trim_ascii_end()) {
                Ok(event) => bus.push(event),
                Err(error) => summary.dead_letters.push(DeadLetterReport {
                    source: format!("line {}", index + 1),
                    event_id: None,
                    handler: None,
                    reason: error.to_string(),
                }),
            }
            batch += 1;
            if batch == options.batch_lines {
                break;
            }
        }
        if batch == 0 {
            break;
        }
        let report = bus
            .run(&dispatcher, &options.retry, options.concurrency)
            .await;
        // Whatever the store's durability mode, a batch is on disk before the next one is read.
        ctx.store.flush().await?;
        for (event_type, n) in report.handled_by_type {
            *summary.events_by_type.entry(event_type).or_default() += n;
        }
        summary.skipped += report.unhandled;
        summary.parked += report.parked.len() as u64;
        summary
            .dead_letters
            .extend(report.dead_letters.into_iter().map(DeadLetterReport::from));
        summary.points_written = counting.points_written();
        summary.dead_letter_count = summary.dead_letters.len() as u64;
        progress(&summary);
    }

    summary.points_written = counting.points_written();
    summary.collection_points = ctx.store.count(None).await?;
    summary.dead_letter_count = summary.dead_letters.len() as u64;
    let elapsed = started.elapsed().max(Duration::from_micros(1));
    summary.elapsed_s = elapsed.as_secs_f64();
    summary.events_per_s = summary.events_in as f64 / summary.elapsed_s;
    Ok(summary)
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
