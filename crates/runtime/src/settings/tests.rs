//! The settings model: layering, defaults, validation messages, secrets.

use super::*;
use std::path::PathBuf;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(dir: &Path, pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::from_sources(dir, &env(pairs))
}

/// Why the settings from `dir` and `pairs` are refused.
fn refusal(dir: &Path, pairs: &[(&str, &str)]) -> String {
    load(dir, pairs).unwrap_err().to_string()
}

/// The settings from the defaults and `pairs` (no config directory).
fn from_env(pairs: &[(&str, &str)]) -> Settings {
    load(Path::new("/nonexistent"), pairs).unwrap()
}

/// Writes `text` to `name` in `dir`.
fn write_file(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

#[test]
fn defaults_alone_give_an_embedded_offline_setup() {
    let s = from_env(&[]);
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
    assert_eq!(s.qdrant.wal_max_bytes, 32 * 1024 * 1024);
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
    let s = from_env(&[
        ("EMBEDDING_MODEL_DIR", "/opt/models"),
        ("EMBEDDING_THREADS", "3"),
        ("EMBEDDING_CACHE_SIZE", "0"),
    ]);
    assert_eq!(s.embedding.model_root, PathBuf::from("/opt/models"));
    assert_eq!((s.embedding.threads, s.embedding.cache_size), (3, 0));
    assert_eq!(s.embedding.cache_redis_url, None);
    assert_eq!(s.embedding.cache_ttl, Duration::from_secs(7 * 24 * 3600));
    let s = from_env(&[("EMBEDDING_PROVIDER", "hash"), ("EMBEDDING_DIM", "64")]);
    assert_eq!(s.embedding.model_name(), "hash-ngram-v1");
    assert!(load(Path::new("/nonexistent"), &[("EMBEDDING_THREADS", "0")]).is_err());
}

#[test]
fn limits_are_settings_and_a_bad_one_names_its_variable() {
    let s = from_env(&[
        ("MAX_EVENT_BYTES", "2000000"),
        ("MAX_EMBED_CHARS", "5000"),
        ("MAX_CHUNKS_PER_EVENT", "8"),
    ]);
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
    write_file(
        dir.path(),
        "default.toml",
        "embedding_provider = \"hash\"\nembedding_dim = 768\ncelery_concurrency = 3\n",
    );
    write_file(
        dir.path(),
        "staging.toml",
        "embedding_dim = 1024\nlog_format = \"json\"\n",
    );
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
    let err = refusal(dir, &[("MESSAGING_BACKEND", "rabbit")]);
    assert_eq!(
        err,
        "MESSAGING_BACKEND=\"rabbit\" is invalid: accepted values: kafka, celery, disabled"
    );
    let err = refusal(dir, &[("EMBEDDING_DIM", "big")]);
    assert!(err.starts_with("EMBEDDING_DIM=\"big\" is invalid"), "{err}");
    let err = refusal(dir, &[("ENV", "prod")]);
    assert!(err.contains("development, staging, production"), "{err}");
    let err = refusal(dir, &[("KAFKA_SECURITY_PROTOCOL", "TLS")]);
    assert!(err.contains("SASL_SSL"), "{err}");
    let err = refusal(dir, &[("EMBEDDING_PROVIDER", "openai")]);
    assert!(err.starts_with("EMBEDDING_URL"), "{err}");
    assert!(load(dir, &[("EMBEDDING_DIM", "0")]).is_err());
    assert!(load(dir, &[("HTTP_ADDR", "localhost")]).is_err());
}

#[test]
fn case_of_enumerated_values_does_not_matter() {
    let s = from_env(&[
        ("MESSAGING_BACKEND", "Celery"),
        ("kafka_security_protocol", "sasl_ssl"),
    ]);
    assert_eq!(s.messaging_backend, Backend::Celery);
    assert_eq!(s.kafka.security_protocol, "SASL_SSL");
}

#[test]
fn secrets_never_appear_in_debug_output() {
    let s = from_env(&[
        ("KAFKA_API_SECRET", "kafka-s3cret"),
        ("QDRANT_API_KEY", "qdrant-s3cret"),
        ("EMBEDDING_API_KEY", "embed-s3cret"),
        ("BROKER_URL", "redis://:redis-s3cret@cache:6379/0"),
        (
            "RESULT_BACKEND",
            "rediss://default:redis-s3cret2@cache:6380/1",
        ),
    ]);
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

#[test]
fn a_misspelt_key_in_a_toml_file_is_refused_naming_it_and_the_key_meant() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "production.toml",
        "log_format = \"json\"\nkafka_grop_id = \"mine\"\n",
    );
    let err = refusal(dir.path(), &[("ENV", "production")]);
    assert!(
        err.contains(
            "production.toml: unknown key `kafka_grop_id` (did you mean `kafka_group_id`?)"
        ),
        "{err}"
    );
    // The same key spelt right is read.
    write_file(dir.path(), "production.toml", "kafka_group_id = \"mine\"\n");
    let s = load(dir.path(), &[("ENV", "production")]).unwrap();
    assert_eq!(s.kafka.group_id, "mine");
}

#[test]
fn a_per_process_variable_that_means_nothing_is_refused_naming_it() {
    let dir = Path::new("/nonexistent");
    let err = refusal(dir, &[("WORKER_MESSAGING_BACKEND", "kafak")]);
    assert_eq!(
        err,
        "WORKER_MESSAGING_BACKEND=\"kafak\" is invalid: accepted values: kafka, celery, disabled"
    );
    let err = refusal(dir, &[("CONSUMER_MESAGING_BACKEND", "celery")]);
    assert!(
        err.contains(
            "unknown key `CONSUMER_MESAGING_BACKEND` (did you mean `CONSUMER_MESSAGING_BACKEND`?)"
        ),
        "{err}"
    );
    // Variables that are not ours are none of our business.
    assert!(load(dir, &[("PATH", "/usr/bin"), ("CELERY_BROKER_URL", "x")]).is_ok());
}

#[test]
fn a_value_of_the_wrong_type_in_a_file_names_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    write_file(dir.path(), "default.toml", "kafka_concurrency = \"many\"\n");
    let err = refusal(dir.path(), &[]);
    assert!(
        err.starts_with("KAFKA_CONCURRENCY=\"many\" is invalid"),
        "{err}"
    );
}

#[test]
fn every_key_is_documented_in_the_default_file() {
    // config/default.toml is the one source of defaults: each key is set there, or shown commented out when it
    // has no default (a secret, a server's URL).
    for key in keys::known_keys() {
        let set = BUILTIN_DEFAULTS
            .lines()
            .any(|l| l.starts_with(&format!("{key} =")) || l.starts_with(&format!("# {key} =")));
        assert!(set, "config/default.toml does not mention `{key}`");
    }
}
