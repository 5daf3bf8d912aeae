//! Layered configuration (docs/design.md §6): built-in defaults < `config/default.toml` < `config/${ENV}.toml` <
//! environment variables, with a `.env` file in the working directory read first as the Python services did.
//!
//! Every value is read as text and parsed here, so a bad value fails start-up with one message that names the
//! variable, what was given and what is accepted — whichever layer it came from. Secrets are wrapped in
//! [`Secret`] and URLs that may carry a password in [`SecretUrl`]; their `Debug` never shows the secret.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};

use crate::Backend;

const BUILTIN_DEFAULTS: &str = include_str!("../../../config/default.toml");
const ENVIRONMENTS: [&str; 3] = ["development", "staging", "production"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var}={value:?} is invalid: {reason}")]
    Invalid {
        var: String,
        value: String,
        reason: String,
    },
    #[error("cannot read configuration: {0}")]
    Source(String),
}

/// A secret value: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A connection URL that may carry a password (`redis://:pw@host/0`): `Debug`/`Display` mask the password.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`.
    pub fn redacted(&self) -> String {
        redact_url(&self.0)
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Query parameters whose value is a credential (`?api-key=…`, `?token=…`), compared without case, `-` or `_`.
const SECRET_QUERY_KEYS: [&str; 8] = [
    "apikey",
    "key",
    "token",
    "accesstoken",
    "password",
    "secret",
    "auth",
    "signature",
];

/// Replaces the password (or a lone user-info token) of `scheme://user:password@host`, and the value of every
/// credential-like query parameter (`api-key`, `token`, `password`, …), with `***`.
pub fn redact_url(url: &str) -> String {
    let (base, fragment) = match url.find('#') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let (base, query) = match base.find('?') {
        Some(at) => (&base[..at], Some(&base[at + 1..])),
        None => (base, None),
    };
    let mut out = redact_userinfo(base);
    if let Some(query) = query {
        out.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if is_secret_key(key) => format!("{key}=***"),
                _ => pair.to_owned(),
            })
            .collect();
        out.push_str(&pairs.join("&"));
    }
    out.push_str(fragment);
    out
}

fn is_secret_key(key: &str) -> bool {
    let normal: String = key
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .collect::<String>()
        .to_ascii_lowercase();
    SECRET_QUERY_KEYS.contains(&normal.as_str())
}

fn redact_userinfo(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let userinfo = &rest[..at];
    let masked = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{}{}", &url[..scheme_end], masked, &rest[at..])
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
    /// `KAFKA_MAX_IN_FLIGHT_PER_PARTITION` (default 1000): events of one partition received and not yet committable
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
    /// `MAX_EVENT_BYTES`, `MAX_EMBED_CHARS`, `MAX_CHUNKS_PER_EVENT` (README "Limits").
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
        let mut process_backends = Vec::new();
        for p in Process::ALL {
            let var = p.backend_variable();
            if let Some(text) = env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty()) {
                let backend = Backend::parse(text).ok_or_else(|| {
                    invalid(
                        var,
                        text,
                        &format!("accepted values: {}", Backend::CONFIGURABLE.join(", ")),
                    )
                })?;
                process_backends.push((p, backend));
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
        let mut builder = Config::builder()
            .add_source(File::from_str(BUILTIN_DEFAULTS, FileFormat::Toml))
            .add_source(File::from(config_dir.join("default.toml")).required(false));
        if let Some(name) = &environment {
            builder = builder
                .add_source(File::from(config_dir.join(format!("{name}.toml"))).required(false));
        }
        let env_lower: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        let layered = builder
            .add_source(Environment::default().source(Some(env_lower)))
            .build()
            .map_err(|e| ConfigError::Source(e.to_string()))?;
        Layers(layered).settings(environment)
    }
}

struct Layers(Config);

impl Layers {
    fn settings(&self, environment: Option<String>) -> Result<Settings, ConfigError> {
        let provider = self.choice(
            "embedding_provider",
            &[
                ("local", EmbeddingProvider::Local),
                ("hash", EmbeddingProvider::Hash),
                ("openai", EmbeddingProvider::OpenAi),
            ],
        )?;
        let threads = match self.text("embedding_threads") {
            Some(_) => self.number("embedding_threads", 1)?,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let model_root = self
            .text("embedding_model_dir")
            .map(PathBuf::from)
            .unwrap_or_else(aura_embed::local::model::default_model_root);
        let embedding = EmbeddingSettings {
            provider,
            dimension: self.number("embedding_dim", 1)?,
            version: self.required("embedding_version")?,
            model: self.required("default_embedding_model")?,
            url: self.text("embedding_url").map(SecretUrl),
            api_key: self.text("embedding_api_key").map(Secret),
            batch_size: self.number("embedding_batch_size", 1)?,
            timeout: Duration::from_secs(self.number("embedding_timeout_s", 1)?),
            model_root,
            threads,
            cache_size: self.number("embedding_cache_size", 0)?,
            cache_redis_url: self.text("embedding_cache_redis_url").map(SecretUrl),
            cache_ttl: Duration::from_secs(self.number("embedding_cache_ttl_s", 1)?),
        };
        let local_dimension = aura_embed::local::model::DIMENSION;
        if provider == EmbeddingProvider::Local && embedding.dimension != local_dimension {
            return Err(invalid(
                "EMBEDDING_DIM",
                &embedding.dimension.to_string(),
                &format!(
                    "EMBEDDING_PROVIDER=local ({}) produces {local_dimension}-dimensional vectors",
                    aura_embed::local::model::MODEL_NAME
                ),
            ));
        }
        if provider == EmbeddingProvider::OpenAi && embedding.url.is_none() {
            return Err(invalid(
                "EMBEDDING_URL",
                "",
                "required when EMBEDDING_PROVIDER=openai",
            ));
        }
        let backend_text = self.required("messaging_backend")?;
        let messaging_backend = Backend::parse(&backend_text).ok_or_else(|| {
            invalid(
                "MESSAGING_BACKEND",
                &backend_text,
                &format!("accepted values: {}", Backend::CONFIGURABLE.join(", ")),
            )
        })?;
        let distance_text = self.required("vector_distance")?;
        let distance = aura_store::Distance::parse(&distance_text).ok_or_else(|| {
            invalid(
                "VECTOR_DISTANCE",
                &distance_text,
                &format!(
                    "accepted values: {}",
                    aura_store::Distance::NAMES.join(", ")
                ),
            )
        })?;
        let http_text = self.required("http_addr")?;
        let http_addr = http_text.parse().map_err(|_| {
            invalid(
                "HTTP_ADDR",
                &http_text,
                "expected host:port, e.g. 0.0.0.0:8080",
            )
        })?;
        let fallback_text = self.text("messaging_fallback").unwrap_or_default();
        let fallback_backend = match fallback_text.to_ascii_lowercase().as_str() {
            "" | "none" => None,
            // Only a Kafka publisher falls back; left set during a rollback to Celery it simply has nothing to do
            // (refusing to start then would make the rollback itself fail).
            "celery" if messaging_backend == Backend::Kafka => Some(Backend::Celery),
            "celery" => None,
            _ => {
                return Err(invalid(
                    "MESSAGING_FALLBACK",
                    &fallback_text,
                    "accepted values: celery, or empty for none",
                ));
            }
        };
        let queues = list(&self.required("celery_queues")?);
        if queues.is_empty() {
            return Err(invalid("CELERY_QUEUES", "", "name at least one queue"));
        }
        let api_key = self.text("kafka_api_key");
        let api_secret = self.text("kafka_api_secret").map(Secret);
        // Confluent Cloud's `.env` holds a key and a secret and nothing else: that means SASL_SSL with PLAIN.
        let (security_protocol, kafka_security_inferred) =
            match self.text("kafka_security_protocol") {
                Some(_) => (
                    self.choice(
                        "kafka_security_protocol",
                        &[
                            ("PLAINTEXT", "PLAINTEXT"),
                            ("SSL", "SSL"),
                            ("SASL_PLAINTEXT", "SASL_PLAINTEXT"),
                            ("SASL_SSL", "SASL_SSL"),
                        ],
                    )?,
                    false,
                ),
                None if api_key.is_some() && api_secret.is_some() => ("SASL_SSL", true),
                None => ("PLAINTEXT", false),
            };
        Ok(Settings {
            environment,
            messaging_backend,
            backend_variable: "MESSAGING_BACKEND",
            process_backends: Vec::new(),
            kafka_security_inferred,
            kafka: KafkaSettings {
                bootstrap_servers: self.required("kafka_bootstrap_servers")?,
                security_protocol: security_protocol.to_owned(),
                sasl_mechanism: self
                    .choice(
                        "kafka_sasl_mechanism",
                        &[
                            ("PLAIN", "PLAIN"),
                            ("SCRAM-SHA-256", "SCRAM-SHA-256"),
                            ("SCRAM-SHA-512", "SCRAM-SHA-512"),
                        ],
                    )?
                    .to_owned(),
                api_key,
                api_secret,
                group_id: self.required("kafka_group_id")?,
                topic_prefix: self.text("kafka_topic_prefix").unwrap_or_default(),
                fetch_wait_max_ms: self.number("kafka_fetch_wait_max_ms", 1)?,
                session_timeout_ms: self.number("kafka_session_timeout_ms", 1)?,
                assignment_strategy: self
                    .choice(
                        "kafka_partition_assignment_strategy",
                        &[
                            ("range,roundrobin", "range,roundrobin"),
                            ("range", "range"),
                            ("roundrobin", "roundrobin"),
                            ("cooperative-sticky", "cooperative-sticky"),
                        ],
                    )?
                    .to_owned(),
                drain_to_celery: self.flag("kafka_drain_to_celery")?,
                dead_letter_spool_dir: PathBuf::from(self.required("dead_letter_spool_dir")?),
                message_max_bytes: self.number("kafka_message_max_bytes", 1000)?,
                ordering: self.choice(
                    "kafka_ordering",
                    &[
                        ("key", KafkaOrdering::Key),
                        ("partition", KafkaOrdering::Partition),
                    ],
                )?,
                concurrency: self.number("kafka_concurrency", 1)?,
                max_in_flight_per_partition: self.number("kafka_max_in_flight_per_partition", 1)?,
                max_in_flight: self.number("kafka_max_in_flight", 1)?,
                max_in_flight_bytes: self.number("kafka_max_in_flight_bytes", 65_536)?,
            },
            celery: CelerySettings {
                broker_url: SecretUrl(self.required("broker_url")?),
                result_backend: SecretUrl(self.required("result_backend")?),
                queues,
                concurrency: self.number("celery_concurrency", 1)?,
                publish_queue: self.text("celery_publish_queue"),
                worker_name: self.text("celery_worker_name"),
                prefetch_multiplier: self.number("celery_prefetch_multiplier", 1)?,
                visibility_timeout: Duration::from_secs(
                    self.number("celery_visibility_timeout", 1)?,
                ),
                task_events: self.flag("celery_task_events")?,
                track_started: self.flag("celery_track_started")?,
                max_retries: self.number("celery_max_retries", 0)?,
                retry_backoff: Duration::from_millis(self.number("celery_retry_backoff_ms", 1)?),
                result_expires: Duration::from_secs(self.number("celery_result_expires", 1)?),
                eta_max_held: self.number("celery_eta_max_held", 1)?,
            },
            qdrant: QdrantSettings {
                url: self.text("qdrant_url").map(SecretUrl),
                api_key: self.text("qdrant_api_key").map(Secret),
                path: PathBuf::from(self.required("qdrant_path")?),
                collection: self.required("qdrant_collection")?,
                distance,
                min_free_bytes: self
                    .number::<u64>("qdrant_min_free_mb", 0)?
                    .saturating_mul(1024 * 1024),
            },
            embedding,
            disabled_handlers: list(&self.text("disabled_handlers").unwrap_or_default()),
            http_addr,
            log_format: self.choice(
                "log_format",
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            fallback: FallbackSettings {
                backend: fallback_backend,
                timeout: Duration::from_millis(self.number("messaging_fallback_timeout_ms", 1)?),
                failures_to_open: self.number("messaging_fallback_failures", 1)?,
                open_for: Duration::from_secs(self.number("messaging_fallback_open_s", 1)?),
            },
            ops: OpsSettings {
                broker_grace: Duration::from_secs(self.number("health_broker_grace_s", 0)?),
                sample_every: Duration::from_secs(self.number("backlog_sample_s", 1)?),
            },
            limits: aura_events::limits::Limits {
                // Below ~1 KiB not even an ordinary event fits.
                max_event_bytes: self.number("max_event_bytes", 1024)?,
                max_embed_chars: self.number("max_embed_chars", 1)?,
                max_chunks: self.number("max_chunks_per_event", 1)?,
            },
        })
    }

    /// A value, trimmed; empty counts as unset (`QDRANT_URL=` means "no server").
    fn text(&self, key: &str) -> Option<String> {
        self.0
            .get_string(key)
            .ok()
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    fn required(&self, key: &str) -> Result<String, ConfigError> {
        self.text(key)
            .ok_or_else(|| invalid(&key.to_ascii_uppercase(), "", "must not be empty"))
    }

    fn number<T: FromStr + PartialOrd + fmt::Display>(
        &self,
        key: &str,
        min: T,
    ) -> Result<T, ConfigError> {
        let text = self.required(key)?;
        match text.parse::<T>() {
            Ok(n) if n >= min => Ok(n),
            _ => Err(invalid(
                &key.to_ascii_uppercase(),
                &text,
                &format!("expected a whole number >= {min}"),
            )),
        }
    }

    fn flag(&self, key: &str) -> Result<bool, ConfigError> {
        self.choice(
            key,
            &[
                ("true", true),
                ("false", false),
                ("1", true),
                ("0", false),
                ("yes", true),
                ("no", false),
            ],
        )
    }

    fn choice<T: Copy>(&self, key: &str, accepted: &[(&str, T)]) -> Result<T, ConfigError> {
        let text = self.required(key)?;
        accepted
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(&text))
            .map(|(_, value)| *value)
            .ok_or_else(|| {
                let names: Vec<&str> = accepted.iter().map(|(n, _)| *n).collect();
                invalid(
                    &key.to_ascii_uppercase(),
                    &text,
                    &format!("accepted values: {}", names.join(", ")),
                )
            })
    }
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn invalid(var: &str, value: &str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        var: var.to_owned(),
        value: value.to_owned(),
        reason: reason.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load(dir: &Path, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::from_sources(dir, &env(pairs))
    }

    #[test]
    fn defaults_alone_give_an_embedded_offline_setup() {
        let s = load(Path::new("/nonexistent"), &[]).unwrap();
        assert_eq!(s.messaging_backend, Backend::Kafka);
        assert_eq!(s.kafka.group_id, "vectordb-context-processor");
        assert_eq!(s.qdrant.url, None);
        assert_eq!(s.qdrant.path, PathBuf::from("./data/qdrant"));
        assert_eq!(s.qdrant.collection, "user_context");
        assert_eq!(s.embedding.provider, EmbeddingProvider::Local);
        assert_eq!(
            s.embedding.model_name(),
            "sentence-transformers/all-MiniLM-L6-v2"
        );
        assert_eq!(s.embedding.dimension, 384);
        assert_eq!(s.embedding.cache_size, 10_000);
        assert!(s.embedding.threads >= 1);
        assert_eq!(s.celery.queues, ["vectordb"]);
        assert_eq!(s.celery.publish_queue(), "vectordb");
        assert_eq!(s.celery.eta_max_held, 1000);
        assert_eq!(s.celery.visibility_timeout, Duration::from_secs(3600));
        assert_eq!(s.celery.max_retries, 3);
        assert!(s.celery.task_events && !s.celery.track_started);
        assert_eq!(s.limits, aura_events::limits::Limits::default());
        assert_eq!(s.kafka.message_max_bytes, 1_000_000);
        assert_eq!(s.qdrant.min_free_bytes, 128 * 1024 * 1024);
        assert_eq!(
            s.kafka.dead_letter_spool_dir,
            PathBuf::from("./data/dead-letters")
        );
    }

    #[test]
    fn the_local_model_fixes_the_dimension_and_its_settings_are_read() {
        let err = load(Path::new("/nonexistent"), &[("EMBEDDING_DIM", "768")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("EMBEDDING_DIM=\"768\"") && err.contains("384-dimensional"),
            "{err}"
        );
        let s = load(
            Path::new("/nonexistent"),
            &[
                ("EMBEDDING_MODEL_DIR", "/opt/models"),
                ("EMBEDDING_THREADS", "3"),
                ("EMBEDDING_CACHE_SIZE", "0"),
            ],
        )
        .unwrap();
        assert_eq!(s.embedding.model_root, PathBuf::from("/opt/models"));
        assert_eq!((s.embedding.threads, s.embedding.cache_size), (3, 0));
        assert_eq!(s.embedding.cache_redis_url, None);
        assert_eq!(s.embedding.cache_ttl, Duration::from_secs(7 * 24 * 3600));
        let s = load(
            Path::new("/nonexistent"),
            &[("EMBEDDING_PROVIDER", "hash"), ("EMBEDDING_DIM", "64")],
        )
        .unwrap();
        assert_eq!(s.embedding.model_name(), "hash-ngram-v1");
        assert!(load(Path::new("/nonexistent"), &[("EMBEDDING_THREADS", "0")]).is_err());
    }

    #[test]
    fn limits_are_settings_and_a_bad_one_names_its_variable() {
        let s = load(
            Path::new("/nonexistent"),
            &[
                ("MAX_EVENT_BYTES", "2000000"),
                ("MAX_EMBED_CHARS", "5000"),
                ("MAX_CHUNKS_PER_EVENT", "8"),
            ],
        )
        .unwrap();
        assert_eq!(
            s.limits,
            aura_events::limits::Limits {
                max_event_bytes: 2_000_000,
                max_embed_chars: 5_000,
                max_chunks: 8,
            }
        );
        for (var, value) in [
            ("MAX_EVENT_BYTES", "100"),
            ("MAX_CHUNKS_PER_EVENT", "0"),
            ("MAX_EMBED_CHARS", "lots"),
        ] {
            let err = load(Path::new("/nonexistent"), &[(var, value)]).unwrap_err();
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn env_file_and_env_vars_layer_in_order() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("default.toml"),
            "embedding_provider = \"hash\"\nembedding_dim = 768\ncelery_concurrency = 3\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("staging.toml"),
            "embedding_dim = 1024\nlog_format = \"json\"\n",
        )
        .unwrap();
        let s = load(
            dir.path(),
            &[
                ("ENV", "staging"),
                ("EMBEDDING_DIM", "512"),
                ("DISABLED_HANDLERS", "a, b,"),
            ],
        )
        .unwrap();
        assert_eq!(s.embedding.dimension, 512, "env beats files");
        assert_eq!(s.log_format, LogFormat::Json, "ENV file beats default file");
        assert_eq!(s.celery.concurrency, 3, "default file beats built-ins");
        assert_eq!(s.disabled_handlers, ["a", "b"]);
        assert_eq!(s.environment.as_deref(), Some("staging"));
    }

    #[test]
    fn a_bad_value_names_the_variable_and_the_accepted_values() {
        let dir = Path::new("/nonexistent");
        let err = load(dir, &[("MESSAGING_BACKEND", "rabbit")])
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "MESSAGING_BACKEND=\"rabbit\" is invalid: accepted values: kafka, celery, disabled"
        );
        let err = load(dir, &[("EMBEDDING_DIM", "big")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("EMBEDDING_DIM=\"big\" is invalid"), "{err}");
        let err = load(dir, &[("ENV", "prod")]).unwrap_err().to_string();
        assert!(err.contains("development, staging, production"), "{err}");
        let err = load(dir, &[("KAFKA_SECURITY_PROTOCOL", "TLS")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("SASL_SSL"), "{err}");
        let err = load(dir, &[("EMBEDDING_PROVIDER", "openai")])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("EMBEDDING_URL"), "{err}");
        assert!(load(dir, &[("EMBEDDING_DIM", "0")]).is_err());
        assert!(load(dir, &[("HTTP_ADDR", "localhost")]).is_err());
    }

    #[test]
    fn case_of_enumerated_values_does_not_matter() {
        let s = load(
            Path::new("/nonexistent"),
            &[
                ("MESSAGING_BACKEND", "Celery"),
                ("kafka_security_protocol", "sasl_ssl"),
            ],
        )
        .unwrap();
        assert_eq!(s.messaging_backend, Backend::Celery);
        assert_eq!(s.kafka.security_protocol, "SASL_SSL");
    }

    #[test]
    fn secrets_never_appear_in_debug_output() {
        let s = load(
            Path::new("/nonexistent"),
            &[
                ("KAFKA_API_SECRET", "kafka-s3cret"),
                ("QDRANT_API_KEY", "qdrant-s3cret"),
                ("EMBEDDING_API_KEY", "embed-s3cret"),
                ("BROKER_URL", "redis://:redis-s3cret@cache:6379/0"),
                (
                    "RESULT_BACKEND",
                    "rediss://default:redis-s3cret2@cache:6380/1",
                ),
            ],
        )
        .unwrap();
        let shown = format!("{s:?}");
        for secret in [
            "kafka-s3cret",
            "qdrant-s3cret",
            "embed-s3cret",
            "redis-s3cret",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
        assert!(shown.contains("redis://:***@cache:6379/0"), "{shown}");
        assert_eq!(
            s.kafka.api_secret.as_ref().map(Secret::expose),
            Some("kafka-s3cret")
        );
    }

    #[test]
    fn url_redaction_handles_user_info_forms() {
        assert_eq!(
            redact_url("redis://localhost:6379/0"),
            "redis://localhost:6379/0"
        );
        assert_eq!(redact_url("redis://:pw@h:1/0"), "redis://:***@h:1/0");
        assert_eq!(redact_url("redis://user:pw@h/0"), "redis://user:***@h/0");
        assert_eq!(redact_url("redis://token@h/0"), "redis://***@h/0");
        assert_eq!(redact_url("http://h/path@x"), "http://h/path@x");
    }

    #[test]
    fn url_redaction_masks_credential_query_parameters() {
        assert_eq!(
            redact_url("https://x.openai.azure.com/v1?api-version=2024&api-key=k1#frag"),
            "https://x.openai.azure.com/v1?api-version=2024&api-key=***#frag"
        );
        assert_eq!(
            redact_url("https://u:p@q:6334/?apiKey=k2&Token=t&x=1"),
            "https://u:***@q:6334/?apiKey=***&Token=***&x=1"
        );
        assert_eq!(redact_url("http://h/?key"), "http://h/?key");
    }

    #[test]
    fn urls_with_credentials_never_show_them_in_debug_output() {
        let env = HashMap::from([
            (
                "QDRANT_URL".to_owned(),
                "https://admin:qdrant-s3cret@q.example:6334?api-key=qdrant-key".to_owned(),
            ),
            ("EMBEDDING_PROVIDER".to_owned(), "openai".to_owned()),
            (
                "EMBEDDING_URL".to_owned(),
                "https://bob:embed-s3cret@e.example/v1?api-key=embed-key".to_owned(),
            ),
        ]);
        let s = Settings::from_sources(Path::new("/nonexistent"), &env).unwrap();
        let shown = format!("{s:?}");
        for secret in ["qdrant-s3cret", "qdrant-key", "embed-s3cret", "embed-key"] {
            assert!(!shown.contains(secret), "{secret} in {shown}");
        }
        assert_eq!(
            s.qdrant.url.as_ref().map(SecretUrl::expose),
            Some("https://admin:qdrant-s3cret@q.example:6334?api-key=qdrant-key")
        );
    }

    #[test]
    fn confluent_credentials_alone_mean_sasl_ssl_with_plain() {
        let dir = Path::new("/nonexistent");
        let s = load(
            dir,
            &[
                ("KAFKA_BOOTSTRAP_SERVERS", "pkc-1.confluent.cloud:9092"),
                ("KAFKA_API_KEY", "KEY"),
                ("KAFKA_API_SECRET", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(
            (
                s.kafka.security_protocol.as_str(),
                s.kafka.sasl_mechanism.as_str()
            ),
            ("SASL_SSL", "PLAIN")
        );
        assert!(s.kafka_security_inferred);
        // Said explicitly, the protocol is kept (a contradiction `vectordb check` reports); without both
        // credentials nothing is inferred.
        let s = load(
            dir,
            &[
                ("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"),
                ("KAFKA_API_KEY", "KEY"),
                ("KAFKA_API_SECRET", "s3cret"),
            ],
        )
        .unwrap();
        assert_eq!(s.kafka.security_protocol, "PLAINTEXT");
        assert!(!s.kafka_security_inferred);
        let s = load(dir, &[("KAFKA_API_KEY", "KEY")]).unwrap();
        assert_eq!(s.kafka.security_protocol, "PLAINTEXT");
        assert!(!s.kafka_security_inferred);
    }

    #[test]
    fn a_process_override_switches_that_process_alone() {
        let dir = Path::new("/nonexistent");
        let pairs = env(&[
            ("MESSAGING_BACKEND", "kafka"),
            ("MESSAGING_FALLBACK", "celery"),
            ("WORKER_MESSAGING_BACKEND", "celery"),
        ]);
        let worker = Settings::from_sources_for(dir, &pairs, Some(Process::Worker)).unwrap();
        assert_eq!(worker.messaging_backend, Backend::Celery);
        assert_eq!(worker.backend_variable, "WORKER_MESSAGING_BACKEND");
        assert_eq!(worker.fallback.backend, None, "no fallback behind celery");
        let consumer = Settings::from_sources_for(dir, &pairs, Some(Process::Consumer)).unwrap();
        assert_eq!(consumer.messaging_backend, Backend::Kafka);
        assert_eq!(consumer.backend_variable, "MESSAGING_BACKEND");
        assert_eq!(consumer.fallback.backend, Some(Backend::Celery));
        let cli = Settings::from_sources(dir, &pairs).unwrap();
        assert_eq!(cli.backend_of(Process::Worker), Backend::Celery);
        assert_eq!(cli.backend_of(Process::Consumer), Backend::Kafka);
        let err = Settings::from_sources_for(
            dir,
            &env(&[("CONSUMER_MESSAGING_BACKEND", "rabbit")]),
            Some(Process::Worker),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("CONSUMER_MESSAGING_BACKEND"), "{err}");
    }
}
