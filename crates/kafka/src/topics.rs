//! Topic names (docs/design.md §2, with `KAFKA_TOPIC_PREFIX`) and idempotent topic creation.

use std::time::Duration;

use aura_runtime::events::routing;
use aura_runtime::settings::KafkaSettings;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::types::RDKafkaErrorCode;

use crate::{ClientError, client_config};

/// The topic names of one deployment: docs/design.md §2's names behind an optional prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicNames {
    prefix: String,
}

impl TopicNames {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn from_settings(settings: &KafkaSettings) -> Self {
        Self::new(settings.topic_prefix.clone())
    }

    /// The topic an event type is published to, if any.
    pub fn for_event_type(&self, event_type: &str) -> Option<String> {
        routing::topic_for(event_type).map(|topic| self.name(topic))
    }

    /// The three source topics.
    pub fn sources(&self) -> Vec<String> {
        routing::TOPICS.iter().map(|t| self.name(t)).collect()
    }

    /// The source topics and their dead-letter topics.
    pub fn all(&self) -> Vec<String> {
        let sources = self.sources();
        let dead = sources.iter().map(|t| routing::dead_letter_topic(t));
        sources.clone().into_iter().chain(dead).collect()
    }

    fn name(&self, topic: &str) -> String {
        format!("{}{topic}", self.prefix)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TopicStatus {
    pub topic: String,
    /// `created` or `exists`.
    pub status: &'static str,
}

/// Creates `topics` with `partitions` partitions each; topics that already exist are reported, not an error.
pub async fn create_topics(
    settings: &KafkaSettings,
    topics: &[String],
    partitions: i32,
    replication: i32,
) -> Result<Vec<TopicStatus>, ClientError> {
    let admin: AdminClient<crate::logs::LogContext> = client_config(settings)?
        .create_with_context(crate::logs::LogContext)
        .map_err(ClientError::create("admin client", settings))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| {
            ClientError::kafka(
                format!("creating topics on {}", settings.bootstrap_servers),
                e,
            )
        })?;
    results
        .into_iter()
        .map(|result| match result {
            Ok(topic) => Ok(TopicStatus {
                topic,
                status: "created",
            }),
            Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => Ok(TopicStatus {
                topic,
                status: "exists",
            }),
            Err((topic, code)) => Err(ClientError::kafka(
                format!("creating topic {topic}"),
                rdkafka::error::KafkaError::AdminOp(code),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_python_services_unless_prefixed() {
        let plain = TopicNames::default();
        assert_eq!(
            plain.for_event_type("user.mood.created").as_deref(),
            Some("aura360.user.events")
        );
        assert_eq!(plain.all().len(), 6);
        assert!(
            plain
                .all()
                .contains(&"aura360.context.vectorized.dlq".to_owned())
        );
        let prefixed = TopicNames::new("t42-");
        assert_eq!(
            prefixed.for_event_type("context.aggregated").as_deref(),
            Some("t42-aura360.context.aggregated")
        );
        assert_eq!(prefixed.for_event_type("billing.invoice"), None);
    }
}
