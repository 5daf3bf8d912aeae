//! The configuration keys as serde reads them, one struct per component, and their validation into [`Settings`].
//!
//! A key is the environment variable's name in lower case (`kafka_group_id` is `KAFKA_GROUP_ID`): one name in
//! every layer, so an operator moves a setting from a TOML file to the environment without renaming it. Defaults
//! live in `config/default.toml` alone (compiled in as the first layer), so no field here has a default of its
//! own; a key that is optional is an `Option`. [`known_keys`] is read from these structs: a key in a TOML file
//! that none of them has is an error naming it (see `super::layered`).
//!
//! serde converts the types (a number from an environment string included); [`Keys::validate`] checks ranges,
//! choices and the rules between keys, and builds the typed [`Settings`] the processes use.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{
    CelerySettings, ConfigError, EmbeddingProvider, EmbeddingSettings, FallbackSettings,
    KafkaOrdering, KafkaSettings, LogFormat, OpsSettings, QdrantSettings, Secret, SecretUrl,
    Settings, invalid,
};
use crate::Backend;

/// `MESSAGING_BACKEND` and what every process shares: the fallback, the handlers, the operations endpoint, logs.
#[derive(Deserialize)]
struct ProcessKeys {
    messaging_backend: String,
    messaging_fallback: Option<String>,
    messaging_fallback_timeout_ms: u64,
    messaging_fallback_failures: u32,
    messaging_fallback_open_s: u64,
    disabled_handlers: Option<String>,
    http_addr: String,
    health_broker_grace_s: u64,
    backlog_sample_s: u64,
    log_format: String,
}

#[derive(Deserialize)]
struct KafkaKeys {
    kafka_bootstrap_servers: String,
    kafka_security_protocol: Option<String>,
    kafka_sasl_mechanism: String,
    kafka_api_key: Option<String>,
    kafka_api_secret: Option<String>,
    kafka_group_id: String,
    kafka_topic_prefix: Option<String>,
    kafka_fetch_wait_max_ms: u32,
    kafka_session_timeout_ms: u32,
    kafka_partition_assignment_strategy: String,
    kafka_drain_to_celery: bool,
    dead_letter_spool_dir: String,
    kafka_message_max_bytes: usize,
    kafka_ordering: String,
    kafka_concurrency: usize,
    kafka_pipeline_depth: usize,
    kafka_max_in_flight_per_partition: usize,
    kafka_max_in_flight: usize,
    kafka_max_in_flight_bytes: usize,
}

#[derive(Deserialize)]
struct CeleryKeys {
    broker_url: String,
    result_backend: String,
    celery_queues: String,
    celery_concurrency: usize,
    celery_publish_queue: Option<String>,
    celery_worker_name: Option<String>,
    celery_prefetch_multiplier: usize,
    celery_visibility_timeout: u64,
    celery_task_events: bool,
    celery_track_started: bool,
    celery_max_retries: u32,
    celery_retry_backoff_ms: u64,
    celery_result_expires: u64,
    celery_eta_max_held: usize,
}

#[derive(Deserialize)]
struct QdrantKeys {
    qdrant_url: Option<String>,
    qdrant_api_key: Option<String>,
    qdrant_path: String,
    qdrant_collection: String,
    qdrant_min_free_mb: u64,
    qdrant_wal_max_mb: u64,
    vector_distance: String,
}

#[derive(Deserialize)]
struct EmbeddingKeys {
    embedding_provider: String,
    embedding_dim: usize,
    embedding_version: String,
    default_embedding_model: String,
    embedding_url: Option<String>,
    embedding_api_key: Option<String>,
    embedding_batch_size: usize,
    embedding_precision: String,
    embedding_timeout_s: u64,
    embedding_model_dir: Option<String>,
    /// Text, not a number: empty means "the CPUs this process may use".
    embedding_threads: Option<String>,
    embedding_cache_size: usize,
    embedding_cache_redis_url: Option<String>,
    embedding_cache_ttl_s: u64,
}

/// `MAX_EVENT_BYTES`, `MAX_EMBED_CHARS`, `MAX_CHUNKS_PER_EVENT` (docs/configuration.md, "Limits").
#[derive(Deserialize)]
struct LimitKeys {
    max_event_bytes: usize,
    max_embed_chars: usize,
    max_chunks_per_event: usize,
}

/// Every component's keys, read from one layered configuration.
pub(super) struct Keys {
    process: ProcessKeys,
    kafka: KafkaKeys,
    celery: CeleryKeys,
    qdrant: QdrantKeys,
    embedding: EmbeddingKeys,
    limits: LimitKeys,
}

/// Every key any component reads, sorted.
pub(super) fn known_keys() -> Vec<&'static str> {
    let mut keys: Vec<&'static str> = [
        field_names::<ProcessKeys>(),
        field_names::<KafkaKeys>(),
        field_names::<CeleryKeys>(),
        field_names::<QdrantKeys>(),
        field_names::<EmbeddingKeys>(),
        field_names::<LimitKeys>(),
    ]
    .concat();
    keys.sort_unstable();
    keys
}

impl Keys {
    pub(super) fn read(layered: &config::Config) -> Result<Self, ConfigError> {
        Ok(Self {
            process: component(layered)?,
            kafka: component(layered)?,
            celery: component(layered)?,
            qdrant: component(layered)?,
            embedding: component(layered)?,
            limits: component(layered)?,
        })
    }

    pub(super) fn validate(self, environment: Option<String>) -> Result<Settings, ConfigError> {
        let messaging_backend = backend(&self.process.messaging_backend)?;
        Ok(Settings {
            environment,
            messaging_backend,
            backend_variable: "MESSAGING_BACKEND",
            process_backends: Vec::new(),
            kafka_security_inferred: self.kafka.security_inferred(),
            kafka: self.kafka.validate()?,
            celery: self.celery.validate()?,
            qdrant: self.qdrant.validate()?,
            embedding: self.embedding.validate()?,
            disabled_handlers: list(self.process.disabled_handlers.as_deref().unwrap_or("")),
            http_addr: self.process.http_addr.trim().parse().map_err(|_| {
                invalid(
                    "HTTP_ADDR",
                    &self.process.http_addr,
                    "expected host:port, e.g. 0.0.0.0:8080",
                )
            })?,
            log_format: choice(
                "log_format",
                &self.process.log_format,
                &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            )?,
            fallback: self.process.fallback(messaging_backend)?,
            ops: self.process.ops()?,
            limits: self.limits.validate()?,
        })
    }
}

/// `MESSAGING_BACKEND` (or a process's own override) as a backend.
pub(super) fn backend_named(var: &str, text: &str) -> Result<Backend, ConfigError> {
    Backend::parse(text.trim()).ok_or_else(|| {
        invalid(
            var,
            text,
            &format!("accepted values: {}", Backend::CONFIGURABLE.join(", ")),
        )
    })
}

fn backend(text: &str) -> Result<Backend, ConfigError> {
    backend_named("MESSAGING_BACKEND", text)
}

impl ProcessKeys {
    fn ops(&self) -> Result<OpsSettings, ConfigError> {
        Ok(OpsSettings {
            broker_grace: Duration::from_secs(self.health_broker_grace_s),
            sample_every: Duration::from_secs(at_least(
                "backlog_sample_s",
                self.backlog_sample_s,
                1,
            )?),
        })
    }

    fn fallback(&self, messaging_backend: Backend) -> Result<FallbackSettings, ConfigError> {
        let text = nonempty(&self.messaging_fallback).unwrap_or_default();
        let backend = match text.to_ascii_lowercase().as_str() {
            "" | "none" => None,
            // Only a Kafka publisher falls back; left set during a rollback to Celery it simply has nothing to do
            // (refusing to start then would make the rollback itself fail).
            "celery" if messaging_backend == Backend::Kafka => Some(Backend::Celery),
            "celery" => None,
            _ => {
                return Err(invalid(
                    "MESSAGING_FALLBACK",
                    &text,
                    "accepted values: celery, or empty for none",
                ));
            }
        };
        Ok(FallbackSettings {
            backend,
            timeout: Duration::from_millis(at_least(
                "messaging_fallback_timeout_ms",
                self.messaging_fallback_timeout_ms,
                1,
            )?),
            failures_to_open: at_least(
                "messaging_fallback_failures",
                self.messaging_fallback_failures,
                1,
            )?,
            open_for: Duration::from_secs(at_least(
                "messaging_fallback_open_s",
                self.messaging_fallback_open_s,
                1,
            )?),
        })
    }
}

impl LimitKeys {
    fn validate(self) -> Result<aura_events::limits::Limits, ConfigError> {
        Ok(aura_events::limits::Limits {
            // Below ~1 KiB not even an ordinary event fits.
            max_event_bytes: at_least("max_event_bytes", self.max_event_bytes, 1024)?,
            max_embed_chars: at_least("max_embed_chars", self.max_embed_chars, 1)?,
            max_chunks: at_least("max_chunks_per_event", self.max_chunks_per_event, 1)?,
        })
    }
}

impl KafkaKeys {
    /// Confluent Cloud's `.env` holds a key and a secret and nothing else: that means SASL_SSL with PLAIN.
    fn security_inferred(&self) -> bool {
        nonempty(&self.kafka_security_protocol).is_none()
            && nonempty(&self.kafka_api_key).is_some()
            && nonempty(&self.kafka_api_secret).is_some()
    }

    /// `KAFKA_SECURITY_PROTOCOL`, or what the credentials imply when it is unset.
    fn security_protocol(&self) -> Result<&'static str, ConfigError> {
        Ok(match nonempty(&self.kafka_security_protocol) {
            Some(text) => choice(
                "kafka_security_protocol",
                &text,
                &[
                    ("PLAINTEXT", "PLAINTEXT"),
                    ("SSL", "SSL"),
                    ("SASL_PLAINTEXT", "SASL_PLAINTEXT"),
                    ("SASL_SSL", "SASL_SSL"),
                ],
            )?,
            None if self.security_inferred() => "SASL_SSL",
            None => "PLAINTEXT",
        })
    }

    fn validate(self) -> Result<KafkaSettings, ConfigError> {
        let security_protocol = self.security_protocol()?;
        Ok(KafkaSettings {
            bootstrap_servers: required("kafka_bootstrap_servers", &self.kafka_bootstrap_servers)?,
            security_protocol: security_protocol.to_owned(),
            sasl_mechanism: choice(
                "kafka_sasl_mechanism",
                &self.kafka_sasl_mechanism,
                &[
                    ("PLAIN", "PLAIN"),
                    ("SCRAM-SHA-256", "SCRAM-SHA-256"),
                    ("SCRAM-SHA-512", "SCRAM-SHA-512"),
                ],
            )?
            .to_owned(),
            api_key: nonempty(&self.kafka_api_key),
            api_secret: nonempty(&self.kafka_api_secret).map(Secret::new),
            group_id: required("kafka_group_id", &self.kafka_group_id)?,
            topic_prefix: nonempty(&self.kafka_topic_prefix).unwrap_or_default(),
            fetch_wait_max_ms: at_least(
                "kafka_fetch_wait_max_ms",
                self.kafka_fetch_wait_max_ms,
                1,
            )?,
            session_timeout_ms: at_least(
                "kafka_session_timeout_ms",
                self.kafka_session_timeout_ms,
                1,
            )?,
            assignment_strategy: choice(
                "kafka_partition_assignment_strategy",
                &self.kafka_partition_assignment_strategy,
                &[
                    ("range,roundrobin", "range,roundrobin"),
                    ("range", "range"),
                    ("roundrobin", "roundrobin"),
                    ("cooperative-sticky", "cooperative-sticky"),
                ],
            )?
            .to_owned(),
            drain_to_celery: self.kafka_drain_to_celery,
            dead_letter_spool_dir: PathBuf::from(required(
                "dead_letter_spool_dir",
                &self.dead_letter_spool_dir,
            )?),
            message_max_bytes: at_least(
                "kafka_message_max_bytes",
                self.kafka_message_max_bytes,
                1000,
            )?,
            ordering: choice(
                "kafka_ordering",
                &self.kafka_ordering,
                &[
                    ("key", KafkaOrdering::Key),
                    ("partition", KafkaOrdering::Partition),
                ],
            )?,
            concurrency: at_least("kafka_concurrency", self.kafka_concurrency, 1)?,
            pipeline_depth: at_least("kafka_pipeline_depth", self.kafka_pipeline_depth, 1)?,
            max_in_flight_per_partition: at_least(
                "kafka_max_in_flight_per_partition",
                self.kafka_max_in_flight_per_partition,
                1,
            )?,
            max_in_flight: at_least("kafka_max_in_flight", self.kafka_max_in_flight, 1)?,
            max_in_flight_bytes: at_least(
                "kafka_max_in_flight_bytes",
                self.kafka_max_in_flight_bytes,
                65_536,
            )?,
        })
    }
}

impl CeleryKeys {
    fn validate(self) -> Result<CelerySettings, ConfigError> {
        let queues = list(&self.celery_queues);
        if queues.is_empty() {
            return Err(invalid("CELERY_QUEUES", "", "name at least one queue"));
        }
        Ok(CelerySettings {
            broker_url: SecretUrl::new(required("broker_url", &self.broker_url)?),
            result_backend: SecretUrl::new(required("result_backend", &self.result_backend)?),
            queues,
            concurrency: at_least("celery_concurrency", self.celery_concurrency, 1)?,
            publish_queue: nonempty(&self.celery_publish_queue),
            worker_name: nonempty(&self.celery_worker_name),
            prefetch_multiplier: at_least(
                "celery_prefetch_multiplier",
                self.celery_prefetch_multiplier,
                1,
            )?,
            visibility_timeout: Duration::from_secs(at_least(
                "celery_visibility_timeout",
                self.celery_visibility_timeout,
                1,
            )?),
            task_events: self.celery_task_events,
            track_started: self.celery_track_started,
            max_retries: self.celery_max_retries,
            retry_backoff: Duration::from_millis(at_least(
                "celery_retry_backoff_ms",
                self.celery_retry_backoff_ms,
                1,
            )?),
            result_expires: Duration::from_secs(at_least(
                "celery_result_expires",
                self.celery_result_expires,
                1,
            )?),
            eta_max_held: at_least("celery_eta_max_held", self.celery_eta_max_held, 1)?,
        })
    }
}

impl QdrantKeys {
    fn validate(self) -> Result<QdrantSettings, ConfigError> {
        let distance =
            aura_store::Distance::parse(self.vector_distance.trim()).ok_or_else(|| {
                invalid(
                    "VECTOR_DISTANCE",
                    &self.vector_distance,
                    &format!(
                        "accepted values: {}",
                        aura_store::Distance::NAMES.join(", ")
                    ),
                )
            })?;
        Ok(QdrantSettings {
            url: nonempty(&self.qdrant_url).map(SecretUrl::new),
            api_key: nonempty(&self.qdrant_api_key).map(Secret::new),
            path: PathBuf::from(required("qdrant_path", &self.qdrant_path)?),
            collection: required("qdrant_collection", &self.qdrant_collection)?,
            distance,
            min_free_bytes: self.qdrant_min_free_mb.saturating_mul(1024 * 1024),
            wal_max_bytes: self.qdrant_wal_max_mb.max(1).saturating_mul(1024 * 1024),
        })
    }
}

impl EmbeddingKeys {
    fn validate(self) -> Result<EmbeddingSettings, ConfigError> {
        let provider = choice(
            "embedding_provider",
            &self.embedding_provider,
            &[
                ("local", EmbeddingProvider::Local),
                ("hash", EmbeddingProvider::Hash),
                ("openai", EmbeddingProvider::OpenAi),
            ],
        )?;
        let threads = match nonempty(&self.embedding_threads) {
            Some(text) => match text.parse::<usize>() {
                Ok(n) if n >= 1 => n,
                _ => {
                    return Err(invalid(
                        "EMBEDDING_THREADS",
                        &text,
                        "expected a whole number >= 1",
                    ));
                }
            },
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let embedding = EmbeddingSettings {
            provider,
            dimension: at_least("embedding_dim", self.embedding_dim, 1)?,
            version: required("embedding_version", &self.embedding_version)?,
            model: required("default_embedding_model", &self.default_embedding_model)?,
            url: nonempty(&self.embedding_url).map(SecretUrl::new),
            api_key: nonempty(&self.embedding_api_key).map(Secret::new),
            batch_size: at_least("embedding_batch_size", self.embedding_batch_size, 1)?,
            precision: choice(
                "embedding_precision",
                &self.embedding_precision,
                &[
                    ("auto", None),
                    ("f32", Some(aura_embed::Precision::F32)),
                    ("bf16", Some(aura_embed::Precision::Bf16)),
                ],
            )?,
            timeout: Duration::from_secs(at_least(
                "embedding_timeout_s",
                self.embedding_timeout_s,
                1,
            )?),
            model_root: nonempty(&self.embedding_model_dir)
                .map(PathBuf::from)
                .unwrap_or_else(aura_embed::local::model::default_model_root),
            threads,
            cache_size: self.embedding_cache_size,
            cache_redis_url: nonempty(&self.embedding_cache_redis_url).map(SecretUrl::new),
            cache_ttl: Duration::from_secs(at_least(
                "embedding_cache_ttl_s",
                self.embedding_cache_ttl_s,
                1,
            )?),
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
        Ok(embedding)
    }
}

/// One component's keys from the layered configuration; a value of the wrong type names its variable.
fn component<T: serde::de::DeserializeOwned>(layered: &config::Config) -> Result<T, ConfigError> {
    layered.clone().try_deserialize().map_err(from_config)
}

/// A `config` error as ours: the variable, the value given and what was expected.
fn from_config(error: config::ConfigError) -> ConfigError {
    match &error {
        config::ConfigError::Type {
            unexpected,
            expected,
            key: Some(key),
            ..
        } => {
            let shown = unexpected.to_string();
            // `string "big"` → `big`; other kinds keep their description.
            let value = shown
                .strip_prefix("string ")
                .and_then(|s| s.strip_prefix('"'))
                .and_then(|s| s.strip_suffix('"'))
                .map_or(shown.clone(), str::to_owned);
            invalid(
                &key.to_ascii_uppercase(),
                &value,
                &format!("expected {expected}"),
            )
        }
        config::ConfigError::NotFound(key) => invalid(&key.to_ascii_uppercase(), "", "must be set"),
        _ => ConfigError::Source(error.to_string()),
    }
}

/// A value that may be empty: empty counts as unset (`QDRANT_URL=` means "no server").
fn nonempty(value: &Option<String>) -> Option<String> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

fn required(key: &str, value: &str) -> Result<String, ConfigError> {
    let value = value.trim();
    if value.is_empty() {
        return Err(invalid(&key.to_ascii_uppercase(), "", "must not be empty"));
    }
    Ok(value.to_owned())
}

fn at_least<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
) -> Result<T, ConfigError> {
    if value >= min {
        return Ok(value);
    }
    Err(invalid(
        &key.to_ascii_uppercase(),
        &value.to_string(),
        &format!("expected a whole number >= {min}"),
    ))
}

/// One of `accepted`, whatever the case.
fn choice<T: Copy>(key: &str, text: &str, accepted: &[(&str, T)]) -> Result<T, ConfigError> {
    let text = text.trim();
    accepted
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(text))
        .map(|(_, value)| *value)
        .ok_or_else(|| {
            let names: Vec<&str> = accepted.iter().map(|(n, _)| *n).collect();
            invalid(
                &key.to_ascii_uppercase(),
                text,
                &format!("accepted values: {}", names.join(", ")),
            )
        })
}

fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The field names of a struct that derives `Deserialize`, as serde reports them (no instance needed).
fn field_names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    struct Fields(Option<&'static [&'static str]>);
    #[derive(Debug)]
    struct Done;
    impl std::fmt::Display for Done {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names read")
        }
    }
    impl std::error::Error for Done {}
    impl serde::de::Error for Done {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Done
        }
    }
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = Done;
        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Done> {
            Err(Done)
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Done> {
            self.0 = Some(fields);
            Err(Done)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 u8 u16 u32 u64 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Fields(None);
    let _ = T::deserialize(&mut fields);
    fields.0.unwrap_or(&[])
}
