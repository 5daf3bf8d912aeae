//! `vectordb check`: the configuration as the processes would read it, and every dependency it names, reached.

use std::time::Duration;

use aura_celery::Patience;
use aura_kafka::TopicNames;
use aura_kafka::offsets::group_lag;
use std::sync::Arc;

use aura_runtime::embed::Embedder;
use aura_runtime::settings::{EmbeddingProvider, Process};
use aura_runtime::store::Durability;
use aura_runtime::{Backend, Settings};

use crate::mode::{WorkerMode, consumer_mode, worker_mode};
use serde::Serialize;

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What was found (or the error).
    pub detail: String,
    /// How to fix a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub messaging_backend: &'static str,
    /// Each process's backend (its own `<PROCESS>_MESSAGING_BACKEND`, else `MESSAGING_BACKEND`).
    pub process_backends: std::collections::BTreeMap<&'static str, &'static str>,
    pub kafka_security: KafkaSecurity,
    pub fallback: Option<&'static str>,
    pub enabled_handlers: Vec<&'static str>,
    pub disabled_handlers: Vec<&'static str>,
    /// What each process would do with this configuration.
    pub plan: Vec<String>,
    pub checks: Vec<Check>,
}

/// How the Kafka clients authenticate (never the secret).
#[derive(Debug, Serialize)]
pub struct KafkaSecurity {
    pub security_protocol: String,
    pub sasl_mechanism: Option<String>,
    /// SASL_SSL chosen because credentials are set and the protocol is not.
    pub inferred: bool,
    pub api_key_set: bool,
    pub api_secret_set: bool,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

fn passed(name: &str, detail: String) -> Check {
    Check {
        name: name.to_owned(),
        ok: true,
        detail,
        fix: None,
    }
}

fn failed(name: &str, detail: String, fix: &str) -> Check {
    Check {
        name: name.to_owned(),
        ok: false,
        detail,
        fix: Some(fix.to_owned()),
    }
}

/// Reaches what `settings` names. The settings themselves were already validated by loading them.
pub async fn check(settings: &Settings) -> anyhow::Result<CheckReport> {
    let registry = crate::configured_registry(settings)?;
    let backend = settings.messaging_backend;
    let fallback = settings.fallback.backend.map(Backend::as_str);
    // What any of the processes needs, each with its own backend.
    let backends = Process::ALL.map(|p| settings.backend_of(p));
    let uses_kafka = consumer_mode(settings).uses_kafka()
        || worker_mode(settings)
            == (WorkerMode::Consume {
                publishes: Backend::Kafka,
            });
    let uses_redis = backends.contains(&Backend::Celery) || fallback.is_some();
    let plan = plan(settings, &registry.enabled());
    let mut checks = vec![passed(
        "config",
        format!(
            "ENV={}, MESSAGING_BACKEND={}, HTTP_ADDR={}",
            settings.environment.as_deref().unwrap_or("(none)"),
            backend.as_str(),
            settings.http_addr
        ),
    )];
    if uses_kafka {
        checks.push(check_kafka_security(settings));
        checks.push(check_kafka(settings).await);
    }
    if uses_redis || backends.contains(&Backend::Kafka) {
        // The worker consumes Celery queues in kafka mode too.
        checks.push(check_redis("broker", settings).await);
        checks.push(check_results(settings).await);
    }
    if backends.iter().any(|b| *b != Backend::Disabled) {
        let (check, embedder) = check_embedder(settings).await;
        checks.push(check_store(settings, embedder.as_deref()).await);
        checks.push(check);
    }
    let kafka = &settings.kafka;
    Ok(CheckReport {
        messaging_backend: backend.as_str(),
        process_backends: Process::ALL
            .iter()
            .map(|p| (p.binary(), settings.backend_of(*p).as_str()))
            .collect(),
        kafka_security: KafkaSecurity {
            security_protocol: kafka.security_protocol.clone(),
            sasl_mechanism: kafka
                .security_protocol
                .starts_with("SASL")
                .then(|| kafka.sasl_mechanism.clone()),
            inferred: settings.kafka_security_inferred,
            api_key_set: kafka.api_key.is_some(),
            api_secret_set: kafka.api_secret.is_some(),
        },
        fallback,
        enabled_handlers: registry.enabled(),
        disabled_handlers: registry.disabled(),
        plan,
        checks,
    })
}

fn plan(settings: &Settings, enabled: &[&str]) -> Vec<String> {
    let handlers = enabled.join(", ");
    let source = |process: Process| match settings.backend_override(process) {
        Some(_) => format!(" ({})", process.backend_variable()),
        None => String::new(),
    };
    let consumer = consumer_mode(settings).describe(settings, &handlers);
    let worker = worker_mode(settings).describe(settings, &handlers);
    let mut plan = vec![
        consumer + &source(Process::Consumer),
        worker + &source(Process::Worker),
    ];
    if settings.fallback.backend.is_some() {
        plan.push(format!(
            "publish_event: Kafka first; after {} ms or an error, the event goes to Celery queue {} (circuit opens after {} failures for {} s)",
            settings.fallback.timeout.as_millis(),
            settings.celery.publish_queue(),
            settings.fallback.failures_to_open,
            settings.fallback.open_for.as_secs()
        ));
    }
    plan
}

/// The security settings against the credentials: a key and secret that would be ignored, or a SASL protocol
/// without them, is a configuration that cannot be what was meant.
fn check_kafka_security(settings: &Settings) -> Check {
    let kafka = &settings.kafka;
    let protocol = kafka.security_protocol.as_str();
    let sasl = protocol.starts_with("SASL");
    let detail = if sasl {
        format!("{protocol} with {}", kafka.sasl_mechanism)
    } else {
        protocol.to_owned()
    };
    match (kafka.api_key.is_some(), kafka.api_secret.is_some()) {
        (true, false) | (false, true) => failed(
            "kafka_security",
            format!("{detail}: only one of KAFKA_API_KEY and KAFKA_API_SECRET is set"),
            "set both (Confluent Cloud: the API key and its secret), or neither",
        ),
        (true, true) if !sasl => failed(
            "kafka_security",
            format!(
                "KAFKA_SECURITY_PROTOCOL={protocol} but KAFKA_API_KEY and KAFKA_API_SECRET are set: the credentials \
                 would be ignored"
            ),
            "unset KAFKA_SECURITY_PROTOCOL (SASL_SSL is then used, as Confluent Cloud needs) or set it to SASL_SSL",
        ),
        (false, false) if sasl => failed(
            "kafka_security",
            format!("KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_API_KEY and KAFKA_API_SECRET"),
            "set both, or KAFKA_SECURITY_PROTOCOL=PLAINTEXT for a broker without authentication",
        ),
        _ if settings.kafka_security_inferred => passed(
            "kafka_security",
            format!(
                "{detail}, inferred: KAFKA_API_KEY and KAFKA_API_SECRET are set and KAFKA_SECURITY_PROTOCOL is not"
            ),
        ),
        _ => passed("kafka_security", detail),
    }
}

async fn check_kafka(settings: &Settings) -> Check {
    let topics = TopicNames::from_settings(&settings.kafka).all();
    let target = &settings.kafka.bootstrap_servers;
    match group_lag(
        &settings.kafka,
        &settings.kafka.group_id,
        &topics,
        Duration::from_secs(5),
    )
    .await
    {
        Ok((lags, missing)) if missing.is_empty() => {
            let lag: u64 = lags.iter().map(|l| l.lag).sum();
            passed(
                "kafka",
                format!(
                    "{target}: {} topics, {} partitions, group {} lag {lag}",
                    topics.len(),
                    lags.len(),
                    settings.kafka.group_id
                ),
            )
        }
        Ok((_, missing)) => failed(
            "kafka",
            format!("{target}: missing topics: {}", missing.join(", ")),
            "create them: `vectordb topics create` (the broker may not auto-create topics)",
        ),
        Err(error) => failed(
            "kafka",
            format!("{target}: {error}"),
            "check KAFKA_BOOTSTRAP_SERVERS and that the broker is up; for Confluent Cloud set \
             KAFKA_SECURITY_PROTOCOL=SASL_SSL, KAFKA_SASL_MECHANISM=PLAIN, KAFKA_API_KEY, KAFKA_API_SECRET",
        ),
    }
}

async fn check_redis(name: &str, settings: &Settings) -> Check {
    let target = settings.celery.broker_url.redacted();
    let broker = match crate::clients::celery_broker(settings) {
        Ok(broker) => broker,
        Err(error) => {
            return failed(
                name,
                format!("{error:#}"),
                "BROKER_URL: redis://[:password@]host:port/db or rediss://…",
            );
        }
    };
    match broker.ping(Patience::Until(Duration::from_secs(3))).await {
        Ok(()) => {
            let mut depths = Vec::new();
            for queue in &settings.celery.queues {
                if let Ok(depth) = broker
                    .depth(queue, &[], Patience::Until(Duration::from_secs(3)))
                    .await
                {
                    depths.push(format!(
                        "{queue}: {} waiting, {} dead letters",
                        depth.waiting, depth.dead_letters
                    ));
                }
            }
            passed(name, format!("{target}: PONG; {}", depths.join("; ")))
        }
        Err(error) => failed(
            name,
            format!("{target}: {error}"),
            "check BROKER_URL (host, port, password, db) and that Redis is up",
        ),
    }
}

async fn check_results(settings: &Settings) -> Check {
    let url = &settings.celery.result_backend;
    let result = match crate::clients::result_backend(settings) {
        Ok(results) => results
            .get("aura360-check-no-such-task")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    match result {
        Ok(()) => passed("result_backend", format!("{url}: reachable")),
        Err(error) => failed(
            "result_backend",
            format!("{url}: {error}"),
            "check RESULT_BACKEND (redis://host:port/db) and that Redis is up",
        ),
    }
}

/// The store, and (given the embedder) whether another embedding model wrote its collection.
async fn check_store(settings: &Settings, embedder: Option<&dyn Embedder>) -> Check {
    let location = match &settings.qdrant.url {
        Some(url) => format!("Qdrant at {url}"),
        None => format!("embedded Qdrant under {}", settings.qdrant.path.display()),
    };
    match aura_runtime::build_store(settings, Durability::EveryWrite).await {
        Ok(store) => match store.info().await {
            Ok(info) => {
                let detail = format!(
                    "{location}: collection {} ({} points, size {}, {:?})",
                    info.name, info.points, info.dimension, info.distance
                );
                let models = match embedder {
                    Some(embedder) => aura_runtime::accepted_models(settings, embedder).await,
                    None => None,
                };
                let foreign = match &models {
                    Some(models) => store.foreign_points(models).await,
                    None => Ok(None),
                };
                match (foreign, models) {
                    (Ok(Some(foreign)), Some(models)) => failed(
                        "qdrant",
                        format!(
                            "{detail}; {} point(s) were embedded by {} (version {}), not by `{}`",
                            foreign.points,
                            foreign.model.as_deref().unwrap_or("(no embedding_model)"),
                            foreign.version.as_deref().unwrap_or("?"),
                            models[0]
                        ),
                        "the processes refuse to start on this collection: use another QDRANT_COLLECTION for this \
                         model and re-embed into it (docs/embeddings.md, \"Changing the embedding model\"), or set \
                         EMBEDDING_PROVIDER to the model that wrote it",
                    ),
                    (Err(error), _) => failed(
                        "qdrant",
                        format!("{detail}; reading the points' embedding_model failed: {error}"),
                        "check QDRANT_URL / QDRANT_API_KEY",
                    ),
                    _ => passed("qdrant", detail),
                }
            }
            Err(error) => failed(
                "qdrant",
                format!("{location}: {error}"),
                "check QDRANT_URL / QDRANT_API_KEY",
            ),
        },
        Err(error) => failed(
            "qdrant",
            format!("{location}: {error}"),
            if settings.qdrant.url.is_some() {
                "check QDRANT_URL (gRPC port, usually 6334), QDRANT_API_KEY, and that EMBEDDING_DIM matches the collection"
            } else {
                "an embedded store is used by one process at a time (stop the one holding it, or give this one its own \
                 QDRANT_PATH); EMBEDDING_DIM must match the collection"
            },
        ),
    }
}

/// The configured embedder, built and asked for one vector; the embedder too when that worked.
async fn check_embedder(settings: &Settings) -> (Check, Option<Arc<dyn Embedder>>) {
    let embedding = &settings.embedding;
    let provider = embedding.provider.name();
    let embedder: Arc<dyn Embedder> = match aura_runtime::build_embedder(settings) {
        Ok(embedder) => embedder,
        Err(error) => {
            let fix = match embedding.provider {
                EmbeddingProvider::Local => {
                    "run `vectordb model install` once (or set EMBEDDING_MODEL_DIR to where the model is), or choose \
                     EMBEDDING_PROVIDER=hash|openai"
                }
                _ => "check EMBEDDING_PROVIDER, EMBEDDING_URL",
            };
            return (
                failed("embedding", format!("provider {provider}: {error}"), fix),
                None,
            );
        }
    };
    let source = match embedding.provider {
        EmbeddingProvider::Local => format!(
            ", from {}, {} thread(s), batches of {}",
            aura_runtime::embed::local::model::model_dir(&embedding.model_root).display(),
            embedding.threads,
            embedding.batch_size
        ),
        EmbeddingProvider::Hash => " (lexical n-gram hashing, not semantic)".to_owned(),
        EmbeddingProvider::OpenAi => embedding
            .url
            .as_ref()
            .map(|u| format!(", at {}", u.redacted()))
            .unwrap_or_default(),
    };
    let check = match embedder.embed(&["aura360 check".to_owned()]).await {
        Ok(embeddings) => passed(
            "embedding",
            format!(
                "provider {provider}: model {}, {} dimensions{source}",
                embeddings.model,
                embeddings.vectors.first().map_or(0, Vec::len)
            ),
        ),
        Err(error) => failed(
            "embedding",
            format!("provider {provider}: {error}"),
            "check EMBEDDING_URL, EMBEDDING_API_KEY, DEFAULT_EMBEDDING_MODEL, and that the model returns EMBEDDING_DIM dimensions",
        ),
    };
    (check, Some(embedder))
}

/// `vectordb check` as text.
pub fn render(report: &CheckReport) -> String {
    let mut out = format!(
        "messaging backend: {}{}\nhandlers enabled:  {}\nhandlers disabled: {}\n",
        report.messaging_backend,
        report
            .fallback
            .map(|f| format!(" (fallback: {f})"))
            .unwrap_or_default(),
        report.enabled_handlers.join(", "),
        if report.disabled_handlers.is_empty() {
            "(none)".to_owned()
        } else {
            report.disabled_handlers.join(", ")
        }
    );
    for line in &report.plan {
        out.push_str(&format!("  {line}\n"));
    }
    for check in &report.checks {
        out.push_str(&format!(
            "[{}] {:<15} {}\n",
            if check.ok { " ok " } else { "FAIL" },
            check.name,
            check.detail
        ));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("       fix: {fix}\n"));
        }
    }
    out
}
