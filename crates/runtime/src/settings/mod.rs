//! Layered configuration (docs/design.md §6): built-in defaults < `config/default.toml` < `config/${ENV}.toml` <
//! environment variables, with a `.env` file in the working directory read first as the Python services did.
//!
//! One source of defaults: `config/default.toml`, compiled in as the first layer. The keys are read by serde into
//! one struct per component (`keys`), then validated into the typed [`Settings`] below, so a bad value fails
//! start-up with one message that names the variable, what was given and what is accepted — whichever layer it
//! came from. A key in a TOML file that no component reads, and a `CONSUMER_`/`WORKER_` variable that means
//! nothing, are errors naming them: a typo never falls back to a default silently. Secrets are wrapped in
//! [`Secret`] and URLs that may carry a password in [`SecretUrl`] (`secret`); their `Debug` never shows the secret.

mod keys;
mod secret;
#[cfg(test)]
mod tests;

pub use secret::{Secret, SecretUrl, redact_url};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};

use crate::Backend;

const BUILTIN_DEFAULTS: &str = include_str!("../../../../config/default.toml");
const ENVIRONMENTS: [&str; 3] = ["development", "staging", "production"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: String,
        value: String,
        reason: String,
    },
    #[error("{origin}: unknown key `{key}`{hint}")]
    UnknownKey {
        key: String,
        origin: String,
        /// ` (did you mean `…`?)` when a known key is close, else empty.
        hint: String,
    },
    #[error("cannot read configuration: {0}")]
    Source(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmbeddingProvider {
    /// all-MiniLM-L6-v2 in process (the default).
    Local,
    Hash,
    OpenAi,
}

impl EmbeddingProvider {
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Hash => "hash",
            Self::OpenAi => "openai",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `KAFKA_ORDERING`: what the consumer keeps in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KafkaOrdering {
    /// Events with the same record key (the user id) run one after another, in offset order; different keys of one
    /// partition run concurrently (default).
    Key,
    /// One event of a partition at a time, in offset order (the stricter, slower guarantee).
    Partition,
}

#[derive(Clone, Debug, PartialEq)]
pub struct KafkaSettings {
    pub bootstrap_servers: String,
    /// `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL`, as librdkafka spells it.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: String,
    pub api_key: Option<String>,
    pub api_secret: Option<Secret>,
    pub group_id: String,
    /// Prepended to every topic name (`KAFKA_TOPIC_PREFIX`, default empty): lets several environments or test runs
    /// share one cluster. Empty keeps the names of docs/design.md §2 that the Python services use.
    pub topic_prefix: String,
    /// `KAFKA_FETCH_WAIT_MAX_MS` (librdkafka `fetch.wait.max.ms`, default 500): how long a fetch may wait for data.
    /// Kafka answers as soon as data arrives; a broker that always holds the fetch this long adds it to every hop.
    pub fetch_wait_max_ms: u32,
    /// `KAFKA_SESSION_TIMEOUT_MS` (librdkafka `session.timeout.ms`, default 45000): how soon the group notices a
    /// member that died without leaving (kill -9) and hands its partitions on.
    pub session_timeout_ms: u32,
    /// `KAFKA_PARTITION_ASSIGNMENT_STRATEGY` (librdkafka `partition.assignment.strategy`, default
    /// `range,roundrobin`, its own default): eager (`range`, `roundrobin`: every member gives up its partitions at
    /// each rebalance) or `cooperative-sticky` (only the partitions that move are revoked). Every member of a group
    /// must share one protocol: change it with all consumers stopped (or through a group of the new kind).
    pub assignment_strategy: String,
    /// `KAFKA_DRAIN_TO_CELERY` (default true): with `MESSAGING_BACKEND=celery`, `vectordb-consumer` forwards every
    /// event on its topics beyond the group's committed offsets as a Celery task and commits — a rollback to Celery
    /// loses nothing that was still in Kafka.
    pub drain_to_celery: bool,
    /// `DEAD_LETTER_SPOOL_DIR` (default `./data/dead-letters`): where a dead letter goes when `<topic>.dlq` refuses
    /// it for good (authorization denied, over the topic's size limit), so its partition is not held forever.
    pub dead_letter_spool_dir: PathBuf,
    /// `KAFKA_MESSAGE_MAX_BYTES` (librdkafka `message.max.bytes` of our producers, default 1,000,000): the largest
    /// record they send. Raise it together with the topics' `max.message.bytes` (and `MAX_EVENT_BYTES`).
    pub message_max_bytes: usize,
    /// `KAFKA_ORDERING` (`key` | `partition`, default `key`).
    pub ordering: KafkaOrdering,
    /// `KAFKA_CONCURRENCY` (default 64): events handled at once by the whole process.
    pub concurrency: usize,
    /// `KAFKA_PIPELINE_DEPTH` (default 32): events of one key whose outputs are handed to the producer and not yet
    /// acknowledged; the key's next event starts meanwhile. 1 = each event's outputs are acknowledged before the
    /// key's next event starts.
    pub pipeline_depth: usize,
    /// `KAFKA_MAX_IN_FLIGHT_PER_PARTITION` (default 500): events of one partition received and not yet committable
    /// (running, waiting behind their key, or finished behind an unfinished one); the partition pauses at this bound.
    pub max_in_flight_per_partition: usize,
    /// `KAFKA_MAX_IN_FLIGHT` (default 10000) and `KAFKA_MAX_IN_FLIGHT_BYTES` (default 67108864): the same for the
    /// whole process, by count and by bytes of record values and keys; a partition's own byte bound is a quarter of
    /// the process's.
    pub max_in_flight: usize,
    pub max_in_flight_bytes: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CelerySettings {
    pub broker_url: SecretUrl,
    pub result_backend: SecretUrl,
    /// Queues the worker consumes (`CELERY_QUEUES`, default `vectordb`: a queue of our own, so Python workers on
    /// `celery` keep their tasks; the Python services route ours there with `task_routes`).
    pub queues: Vec<String>,
    pub concurrency: usize,
    /// `CELERY_PUBLISH_QUEUE`: where produced tasks go; unset: the first of `queues`.
    pub publish_queue: Option<String>,
    /// `CELERY_WORKER_NAME` (`name@host`); unset: `vectordb-worker@<hostname>`.
    pub worker_name: Option<String>,
    /// `CELERY_PREFETCH_MULTIPLIER` (Celery's `worker_prefetch_multiplier`, default 4).
    pub prefetch_multiplier: usize,
    /// `CELERY_VISIBILITY_TIMEOUT` seconds (kombu's `visibility_timeout`, default 3600): how long a taken message may
    /// stay unacknowledged before any worker restores it. Use the same value as the Python workers.
    pub visibility_timeout: Duration,
    /// `CELERY_TASK_EVENTS` (default true): task events for Flower (Celery's `-E`).
    pub task_events: bool,
    /// `CELERY_TRACK_STARTED` (default false): store `STARTED` before a task runs.
    pub track_started: bool,
    /// `CELERY_MAX_RETRIES` (default 3) and `CELERY_RETRY_BACKOFF_MS` (default 60000; doubles per retry up to 10x).
    pub max_retries: u32,
    pub retry_backoff: Duration,
    /// `CELERY_RESULT_EXPIRES` seconds (Celery's `result_expires`, default 86400).
    pub result_expires: Duration,
    /// `CELERY_ETA_MAX_HELD` (default 1000): scheduled tasks held in memory; more wait in `<queue>.delayed`.
    pub eta_max_held: usize,
}

impl CelerySettings {
    /// The queue produced tasks go to.
    pub fn publish_queue(&self) -> &str {
        self.publish_queue
            .as_deref()
            .or(self.queues.first().map(String::as_str))
            .unwrap_or("vectordb")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct QdrantSettings {
    /// Set: a Qdrant server (gRPC). Unset: embedded Qdrant under `path`. It may carry credentials: shown redacted.
    pub url: Option<SecretUrl>,
    pub api_key: Option<Secret>,
    pub path: PathBuf,
    pub collection: String,
    pub distance: aura_store::Distance,
    /// `QDRANT_MIN_FREE_MB` (embedded store): writes wait while its filesystem has less free.
    pub min_free_bytes: u64,
    /// `QDRANT_WAL_MAX_MB` (embedded store): its WAL is rotated once it has grown by this much.
    pub wal_max_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingSettings {
    pub provider: EmbeddingProvider,
    pub dimension: usize,
    pub version: String,
    pub model: String,
    /// May carry credentials (`https://user:pass@…`, `?api-key=`): shown redacted.
    pub url: Option<SecretUrl>,
    pub api_key: Option<Secret>,
    pub batch_size: usize,
    /// `EMBEDDING_PRECISION` (`auto` | `f32` | `bf16`, default `auto`): the local model's linear layers in bf16 on a
    /// CPU with AVX-512 BF16 (`auto`, `None`, picks it there: [`aura_embed::Precision::fastest`]), or f32.
    pub precision: Option<aura_embed::Precision>,
    pub timeout: Duration,
    /// `EMBEDDING_MODEL_DIR`: where `vectordb model install` put the local model.
    pub model_root: PathBuf,
    /// `EMBEDDING_THREADS`: the local model's inference threads (default: the CPUs this process may use).
    pub threads: usize,
    /// `EMBEDDING_CACHE_SIZE`: vectors kept in the in-process LRU (0: no cache).
    pub cache_size: usize,
    /// `EMBEDDING_CACHE_REDIS_URL`: the shared cache tier (unset: none). May carry a password: shown redacted.
    pub cache_redis_url: Option<SecretUrl>,
    /// `EMBEDDING_CACHE_TTL_S`: how long the Redis tier keeps a vector.
    pub cache_ttl: Duration,
}

impl EmbeddingSettings {
    /// The model the configured provider writes into `embedding_model`.
    pub fn model_name(&self) -> &str {
        match self.provider {
            EmbeddingProvider::Local => aura_embed::local::model::MODEL_NAME,
            EmbeddingProvider::Hash => aura_embed::HashEmbedder::MODEL,
            EmbeddingProvider::OpenAi => &self.model,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// `ENV`: which `config/${ENV}.toml` was layered in, if any.
    pub environment: Option<String>,
    /// This process's backend: its own `<PROCESS>_MESSAGING_BACKEND` when set, else `MESSAGING_BACKEND`.
    pub messaging_backend: Backend,
    /// The variable `messaging_backend` came from (`MESSAGING_BACKEND`, or a process's own override).
    pub backend_variable: &'static str,
    /// The per-process overrides that are set (`CONSUMER_MESSAGING_BACKEND`, `WORKER_MESSAGING_BACKEND`), whichever
    /// process reads the settings: `vectordb check` reports what each process will do.
    pub process_backends: Vec<(Process, Backend)>,
    /// `KAFKA_SECURITY_PROTOCOL` was unset and SASL_SSL was chosen because `KAFKA_API_KEY` and `KAFKA_API_SECRET`
    /// are both set (Confluent Cloud's `.env`): the processes say so at start.
    pub kafka_security_inferred: bool,
    pub kafka: KafkaSettings,
    pub celery: CelerySettings,
    pub qdrant: QdrantSettings,
    pub embedding: EmbeddingSettings,
    pub disabled_handlers: Vec<String>,
    pub http_addr: SocketAddr,
    pub log_format: LogFormat,
    pub fallback: FallbackSettings,
    pub ops: OpsSettings,
    /// `MAX_EVENT_BYTES`, `MAX_EMBED_CHARS`, `MAX_CHUNKS_PER_EVENT` (docs/limits.md).
    pub limits: aura_events::limits::Limits,
}

/// `MESSAGING_FALLBACK`: where `publish_event` sends an event when the primary backend fails (docs/design.md §3 extension).
#[derive(Clone, Debug, PartialEq)]
pub struct FallbackSettings {
    /// `None`: no fallback (the default, and whenever `MESSAGING_BACKEND` is not `kafka`). Only `celery` exists.
    pub backend: Option<Backend>,
    /// `MESSAGING_FALLBACK_TIMEOUT_MS`: how long a Kafka delivery may take before the event goes to the fallback.
    pub timeout: Duration,
    /// `MESSAGING_FALLBACK_FAILURES`: consecutive failures that open the circuit (Kafka skipped).
    pub failures_to_open: u32,
    /// `MESSAGING_FALLBACK_OPEN_S`: how long the circuit stays open before one event probes Kafka again.
    pub open_for: Duration,
}

/// The operations endpoints and sampler.
#[derive(Clone, Debug, PartialEq)]
pub struct OpsSettings {
    /// `HEALTH_BROKER_GRACE_S`: how long a broker may be unreachable before `/health` answers 503.
    pub broker_grace: Duration,
    /// `BACKLOG_SAMPLE_S`: how often the broker is probed and the backlog gauges refreshed.
    pub sample_every: Duration,
}

/// A long-running process that has a backend of its own (`<PROCESS>_MESSAGING_BACKEND` overrides
/// `MESSAGING_BACKEND` for it alone: one env file, one process switched or isolated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Process {
    Consumer,
    Worker,
}

impl Process {
    pub const ALL: [Process; 2] = [Process::Consumer, Process::Worker];

    /// The variable that overrides `MESSAGING_BACKEND` for this process.
    pub fn backend_variable(self) -> &'static str {
        match self {
            Process::Consumer => "CONSUMER_MESSAGING_BACKEND",
            Process::Worker => "WORKER_MESSAGING_BACKEND",
        }
    }

    pub fn binary(self) -> &'static str {
        match self {
            Process::Consumer => "vectordb-consumer",
            Process::Worker => "vectordb-worker",
        }
    }
}

impl Settings {
    /// `process`'s own `<PROCESS>_MESSAGING_BACKEND`, when set.
    pub fn backend_override(&self, process: Process) -> Option<Backend> {
        self.process_backends
            .iter()
            .find(|(p, _)| *p == process)
            .map(|(_, b)| *b)
    }

    /// The backend `process` runs with: its override when set, else `MESSAGING_BACKEND`.
    pub fn backend_of(&self, process: Process) -> Backend {
        self.backend_override(process)
            .unwrap_or(self.messaging_backend)
    }

    /// [`Settings::load`] for `process`: its `<PROCESS>_MESSAGING_BACKEND`, when set, is its backend.
    pub fn load_for(process: Process) -> Result<Self, ConfigError> {
        Self::load_env(Some(process))
    }

    /// Reads `.env` (without overriding variables already set), then the layers, from the process environment.
    /// Files come from `CONFIG_DIR` (default `./config`).
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_env(None)
    }

    fn load_env(process: Option<Process>) -> Result<Self, ConfigError> {
        match dotenvy::dotenv() {
            Ok(_) => {}
            Err(e) if e.not_found() => {}
            Err(e) => return Err(ConfigError::Source(format!(".env: {e}"))),
        }
        let env: HashMap<String, String> = std::env::vars().collect();
        let dir = env
            .get("CONFIG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("config"));
        Self::from_sources_for(&dir, &env, process)
    }

    /// Builds settings from a config directory and an explicit environment (for tests and tools).
    pub fn from_sources(
        config_dir: &Path,
        env: &HashMap<String, String>,
    ) -> Result<Self, ConfigError> {
        Self::from_sources_for(config_dir, env, None)
    }

    /// [`Settings::from_sources`] as `process` reads them.
    pub fn from_sources_for(
        config_dir: &Path,
        env: &HashMap<String, String>,
        process: Option<Process>,
    ) -> Result<Self, ConfigError> {
        refuse_unknown_process_variables(env)?;
        let mut process_backends = Vec::new();
        for p in Process::ALL {
            let var = p.backend_variable();
            if let Some(text) = env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                process_backends.push((p, keys::backend_named(var, text)?));
            }
        }
        let own = process.filter(|p| process_backends.iter().any(|(q, _)| q == p));
        let mut env = env.clone();
        if let Some(p) = own
            && let Some(text) = env.get(p.backend_variable()).cloned()
        {
            env.insert("MESSAGING_BACKEND".into(), text);
        }
        let mut settings = Self::layered(config_dir, &env)?;
        settings.backend_variable = own.map_or("MESSAGING_BACKEND", Process::backend_variable);
        settings.process_backends = process_backends;
        Ok(settings)
    }

    fn layered(config_dir: &Path, env: &HashMap<String, String>) -> Result<Self, ConfigError> {
        let environment = match env
            .get("ENV")
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
        {
            Some(name) if ENVIRONMENTS.contains(&name.as_str()) => Some(name),
            Some(name) => {
                return Err(invalid(
                    "ENV",
                    &name,
                    &format!("accepted values: {}", ENVIRONMENTS.join(", ")),
                ));
            }
            None => None,
        };
        let known = keys::known_keys();
        let mut builder =
            Config::builder().add_source(File::from_str(BUILTIN_DEFAULTS, FileFormat::Toml));
        let mut files = vec![config_dir.join("default.toml")];
        if let Some(name) = &environment {
            files.push(config_dir.join(format!("{name}.toml")));
        }
        for file in files.into_iter().filter(|f| f.exists()) {
            refuse_unknown_keys(&file, &known)?;
            builder = builder.add_source(File::from(file));
        }
        // The environment: the variables that name a key (in any case); everything else in it is not ours.
        let ours: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .filter(|(k, _)| known.binary_search(&k.as_str()).is_ok())
            .collect();
        let layered = builder
            .add_source(Environment::default().source(Some(ours)))
            .build()
            .map_err(|e| ConfigError::Source(e.to_string()))?;
        keys::Keys::read(&layered)?.validate(environment)
    }
}

/// The prefixes of the per-process variables; only `<PREFIX>MESSAGING_BACKEND` exists.
const PROCESS_PREFIXES: [&str; 2] = ["CONSUMER_", "WORKER_"];

/// A `CONSUMER_…`/`WORKER_…` variable other than the backend overrides means nothing: most likely a typo of one.
fn refuse_unknown_process_variables(env: &HashMap<String, String>) -> Result<(), ConfigError> {
    let known: Vec<&str> = Process::ALL.iter().map(|p| p.backend_variable()).collect();
    let mut unknown: Vec<&String> = env
        .keys()
        .filter(|k| PROCESS_PREFIXES.iter().any(|p| k.starts_with(p)))
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    unknown.sort();
    match unknown.first() {
        Some(key) => Err(ConfigError::UnknownKey {
            key: (*key).clone(),
            origin: "the environment".into(),
            hint: hint(key, &known),
        }),
        None => Ok(()),
    }
}

/// A key in `file` that no component reads is an error naming it (and the closest known key).
fn refuse_unknown_keys(file: &Path, known: &[&str]) -> Result<(), ConfigError> {
    let table = Config::builder()
        .add_source(File::from(file))
        .build()
        .and_then(|c| c.try_deserialize::<HashMap<String, config::Value>>())
        .map_err(|e| ConfigError::Source(format!("{}: {e}", file.display())))?;
    let mut unknown: Vec<&String> = table
        .keys()
        .filter(|k| known.binary_search(&k.as_str()).is_err())
        .collect();
    unknown.sort();
    match unknown.first() {
        Some(key) => Err(ConfigError::UnknownKey {
            key: (*key).clone(),
            origin: file.display().to_string(),
            hint: hint(key, known),
        }),
        None => Ok(()),
    }
}

/// ` (did you mean `k`?)` for the known key closest to `key`, when it is a likely typo (at most 3 edits).
fn hint(key: &str, known: &[&str]) -> String {
    let key = key.to_ascii_lowercase();
    known
        .iter()
        .map(|k| (edits(&key, &k.to_ascii_lowercase()), *k))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, k)| format!(" (did you mean `{k}`?)"))
        .unwrap_or_default()
}

/// Levenshtein distance between two short keys.
fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (diagonal + usize::from(ca != *cb))
                .min(row[j] + 1)
                .min(above + 1);
            diagonal = above;
        }
    }
    row[b.len()]
}

fn invalid(var: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}
