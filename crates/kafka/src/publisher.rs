//! `publish_event` onto Kafka: the Python producer's record shape, acknowledged by the broker before returning.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use aura_runtime::events::Event;
use aura_runtime::settings::KafkaSettings;
use aura_runtime::{Acknowledgement, Backend, PublishError, Publisher};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;

use crate::{ClientError, TopicNames, client_config};

/// How long librdkafka keeps trying to deliver one record before reporting failure (`delivery.timeout.ms`).
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// One record to send as it is: used for dead letters, replays and benchmarks.
pub struct OutgoingRecord<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    /// `None` sends a record without a value (what a tombstone was).
    pub payload: Option<&'a [u8]>,
    pub headers: Vec<(&'a str, &'a [u8])>,
}

/// Where an acknowledged record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub partition: i32,
    pub offset: i64,
}

/// The idempotent producer (`acks=all`, `enable.idempotence=true`, lz4 batches).
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer<crate::logs::LogContext>,
    topics: TopicNames,
    message_max_bytes: usize,
}

impl KafkaPublisher {
    pub fn new(settings: &KafkaSettings) -> Result<Self, ClientError> {
        let producer = client_config(settings)?
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", "lz4")
            .set("linger.ms", "2")
            .set("message.max.bytes", settings.message_max_bytes.to_string())
            // Notice a broker that is back within ~2 s (librdkafka's default backs off to 10 s): the publish
            // fallback's probe finds Kafka again as soon as it returns.
            .set("reconnect.backoff.max.ms", "2000")
            .set(
                "delivery.timeout.ms",
                DELIVERY_TIMEOUT.as_millis().to_string(),
            )
            .create_with_context(crate::logs::LogContext)
            .map_err(ClientError::create("producer", settings))?;
        Ok(Self {
            producer,
            topics: TopicNames::from_settings(settings),
            message_max_bytes: settings.message_max_bytes,
        })
    }

    /// The largest record this producer sends (`KAFKA_MESSAGE_MAX_BYTES`).
    pub fn message_max_bytes(&self) -> usize {
        self.message_max_bytes
    }

    pub fn topics(&self) -> &TopicNames {
        &self.topics
    }

    /// Sends one record and waits for the broker's acknowledgement.
    pub async fn send(&self, record: OutgoingRecord<'_>) -> Result<Delivered, KafkaError> {
        self.queue(record).await?.await
    }

    /// Queues one record in the producer, behind every record queued before it, and returns its acknowledgement.
    /// While librdkafka's local queue is full it waits for room (at most [`DELIVERY_TIMEOUT`]); delivery itself is
    /// bounded by `delivery.timeout.ms`.
    pub async fn queue(
        &self,
        record: OutgoingRecord<'_>,
    ) -> Result<impl Future<Output = Result<Delivered, KafkaError>> + Send + 'static, KafkaError>
    {
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in &record.headers {
            headers = headers.insert(Header {
                key,
                value: Some(*value),
            });
        }
        let mut future = FutureRecord::<[u8], [u8]>::to(record.topic).headers(headers);
        if let Some(key) = record.key {
            future = future.key(key);
        }
        if let Some(payload) = record.payload {
            future = future.payload(payload);
        }
        let started = std::time::Instant::now();
        let delivery = loop {
            match self.producer.send_result(future) {
                Ok(delivery) => break delivery,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                    if started.elapsed() < DELIVERY_TIMEOUT =>
                {
                    future = back;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err((error, _)) => return Err(error),
            }
        };
        Ok(async move {
            match delivery.await {
                Ok(Ok(delivery)) => Ok(Delivered {
                    partition: delivery.partition,
                    offset: delivery.offset,
                }),
                Ok(Err((error, _))) => Err(error),
                // The producer lives as long as a clone of this publisher; it is dropped only at exit.
                Err(_canceled) => Err(KafkaError::Canceled),
            }
        })
    }

    /// Waits for every queued record (shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    fn backend(&self) -> Backend {
        Backend::Kafka
    }

    async fn publish(&self, event: &Event) -> Result<(), PublishError> {
        self.publish_encoded(event, &event.to_vec()).await.map(drop)
    }

    async fn publish_encoded(&self, event: &Event, json: &[u8]) -> Result<Backend, PublishError> {
        self.hand_over(event, json).await?.await
    }

    async fn hand_over(&self, event: &Event, json: &[u8]) -> Result<Acknowledgement, PublishError> {
        let Some(topic) = self.topics.for_event_type(&event.event_type) else {
            return Err(PublishError::Unroutable {
                event_type: event.event_type.clone(),
                event_id: event.event_id.to_string(),
                reason: "no Kafka topic for this event type".into(),
            });
        };
        let event_id = event.event_id.to_string();
        let record = OutgoingRecord {
            topic: &topic,
            key: event.user_id.as_deref().map(str::as_bytes),
            payload: Some(json),
            headers: vec![
                ("event_type", event.event_type.as_bytes()),
                ("event_id", event_id.as_bytes()),
                (
                    "trace_id",
                    event.trace_id.as_deref().unwrap_or("").as_bytes(),
                ),
            ],
        };
        let queued = self.queue(record).await;
        // The names move into the acknowledgement (the record only borrowed them): an error can still say which
        // event failed, without copying them for every record that does not.
        let event_type = event.event_type.clone();
        match queued {
            Ok(delivery) => Ok(Box::pin(async move {
                delivery
                    .await
                    .map(|_| Backend::Kafka)
                    .map_err(|error| publish_error(event_type, event_id, &topic, &error))
            })),
            Err(error) => Err(publish_error(event_type, event_id, &topic, &error)),
        }
    }
}

/// A record the producer did not deliver: permanent when no retry can fix it ([`is_permanent`]).
fn publish_error(
    event_type: String,
    event_id: String,
    topic: &str,
    error: &KafkaError,
) -> PublishError {
    let reason = format!("{topic}: {error}");
    if is_permanent(error) {
        PublishError::Unroutable {
            event_type,
            event_id,
            reason,
        }
    } else {
        PublishError::Unavailable {
            backend: "kafka",
            event_type,
            event_id,
            reason,
        }
    }
}

/// Errors no retry can fix: the record itself is refused (too large, invalid) or this client may not write it
/// (authorization). Everything else (broker down, timeouts, leader changes, a topic not created yet) is worth
/// retrying.
pub(crate) fn is_permanent(error: &KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as Code;
    matches!(
        error.rdkafka_error_code(),
        Some(
            Code::MessageSizeTooLarge
                | Code::InvalidMessage
                | Code::InvalidMessageSize
                | Code::InvalidRecord
                | Code::MessageBatchTooLarge
                | Code::TopicAuthorizationFailed
                | Code::ClusterAuthorizationFailed
                | Code::TransactionalIdAuthorizationFailed
                | Code::InvalidTopic
                | Code::PolicyViolation
        )
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::types::RDKafkaErrorCode as Code;

    #[test]
    fn refused_records_and_missing_rights_are_permanent_and_broker_trouble_is_transient() {
        for code in [
            Code::MessageSizeTooLarge,
            Code::TopicAuthorizationFailed,
            Code::ClusterAuthorizationFailed,
            Code::InvalidRecord,
            Code::PolicyViolation,
        ] {
            assert!(
                is_permanent(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
        for code in [
            Code::AllBrokersDown,
            Code::MessageTimedOut,
            Code::NotLeaderForPartition,
            Code::UnknownTopicOrPartition,
            Code::RequestTimedOut,
        ] {
            assert!(
                !is_permanent(&KafkaError::MessageProduction(code)),
                "{code:?}"
            );
        }
    }
}
