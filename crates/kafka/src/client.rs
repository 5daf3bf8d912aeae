//! librdkafka client settings from `KAFKA_*` (docs/design.md §6), shared by producer, consumer and admin client.

use aura_runtime::settings::KafkaSettings;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("KAFKA_SECURITY_PROTOCOL={protocol} needs KAFKA_API_KEY and KAFKA_API_SECRET")]
    MissingCredentials { protocol: String },
    #[error("creating the Kafka {role} for {bootstrap}: {source}")]
    Create {
        role: &'static str,
        bootstrap: String,
        source: KafkaError,
    },
    #[error("{action}: {source}")]
    Kafka { action: String, source: KafkaError },
}

impl ClientError {
    /// For `map_err` on `create_with_context`: the Kafka `role` (producer, consumer, …) for `settings`'s cluster.
    pub(crate) fn create(
        role: &'static str,
        settings: &KafkaSettings,
    ) -> impl FnOnce(KafkaError) -> Self {
        let bootstrap = settings.bootstrap_servers.clone();
        move |source| Self::Create {
            role,
            bootstrap,
            source,
        }
    }

    pub(crate) fn kafka(action: impl Into<String>, source: KafkaError) -> Self {
        Self::Kafka {
            action: action.into(),
            source,
        }
    }
}

/// The connection part of every client's configuration. SASL credentials go into librdkafka only: the returned
/// `ClientConfig` must never be printed (its `Debug` shows values), and nothing here logs it.
pub fn client_config(settings: &KafkaSettings) -> Result<ClientConfig, ClientError> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", &settings.bootstrap_servers)
        .set("security.protocol", &settings.security_protocol)
        .set("client.id", "aura360-vectordb");
    if settings.security_protocol.starts_with("SASL") {
        let (Some(key), Some(secret)) = (&settings.api_key, &settings.api_secret) else {
            return Err(ClientError::MissingCredentials {
                protocol: settings.security_protocol.clone(),
            });
        };
        config
            .set("sasl.mechanism", &settings.sasl_mechanism)
            .set("sasl.username", key)
            .set("sasl.password", secret.expose());
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aura_runtime::settings::Secret;

    fn settings(protocol: &str) -> KafkaSettings {
        KafkaSettings {
            bootstrap_servers: "pkc-123.confluent.cloud:9092".into(),
            security_protocol: protocol.into(),
            sasl_mechanism: "PLAIN".into(),
            api_key: Some("KEY123".into()),
            api_secret: Some(Secret::new("s3cr3t-value")),
            group_id: "g".into(),
            topic_prefix: String::new(),
            fetch_wait_max_ms: 500,
            session_timeout_ms: 45_000,
            assignment_strategy: "range,roundrobin".into(),
            drain_to_celery: true,
            dead_letter_spool_dir: "data/dead-letters".into(),
            message_max_bytes: 1_000_000,
            ordering: aura_runtime::settings::KafkaOrdering::Key,
            concurrency: 64,
            pipeline_depth: 32,
            max_in_flight_per_partition: 1000,
            max_in_flight: 10_000,
            max_in_flight_bytes: 64 << 20,
        }
    }

    #[test]
    fn confluent_cloud_uses_sasl_ssl_plain_with_the_api_key() {
        let config = client_config(&settings("SASL_SSL")).unwrap();
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(config.get("sasl.username"), Some("KEY123"));
        assert_eq!(config.get("sasl.password"), Some("s3cr3t-value"));
        // The settings themselves never show the secret.
        assert!(!format!("{:?}", settings("SASL_SSL")).contains("s3cr3t"));
    }

    #[test]
    fn plaintext_sends_no_credentials_and_sasl_requires_them() {
        let config = client_config(&settings("PLAINTEXT")).unwrap();
        assert_eq!(config.get("sasl.password"), None);
        let mut missing = settings("SASL_SSL");
        missing.api_secret = None;
        let error = client_config(&missing).unwrap_err().to_string();
        assert!(error.contains("KAFKA_API_SECRET"), "{error}");
    }

    #[test]
    fn confluent_credentials_alone_reach_librdkafka_as_sasl_ssl_plain() {
        let env = std::collections::HashMap::from([
            ("KAFKA_API_KEY".to_owned(), "CFLTKEY".to_owned()),
            ("KAFKA_API_SECRET".to_owned(), "cflt-secret".to_owned()),
        ]);
        let settings =
            aura_runtime::Settings::from_sources(std::path::Path::new("/nonexistent"), &env)
                .unwrap();
        let config = client_config(&settings.kafka).unwrap();
        assert_eq!(config.get("security.protocol"), Some("SASL_SSL"));
        assert_eq!(config.get("sasl.mechanism"), Some("PLAIN"));
        assert_eq!(config.get("sasl.username"), Some("CFLTKEY"));
        assert_eq!(config.get("sasl.password"), Some("cflt-secret"));
    }
}
