//! The rebalance callbacks: what the group assigns and revokes, and what a lost assignment stops.

use super::*;

pub(super) struct MountContext {
    pub(super) shared: Arc<Shared>,
}

impl ClientContext for MountContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::logs::log(level, fac, log_message);
    }

    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        crate::logs::error(&error, reason);
    }
}

impl ConsumerContext for MountContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            self.shared.revoke(consumer, partitions);
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => {
                self.shared.paused.assigned();
                let protocol = match consumer.rebalance_protocol() {
                    rdkafka::consumer::RebalanceProtocol::Cooperative => "cooperative",
                    rdkafka::consumer::RebalanceProtocol::Eager => "eager",
                    rdkafka::consumer::RebalanceProtocol::None => "none",
                };
                tracing::info!(partitions = %describe(partitions), protocol, "partitions assigned");
                // A partition paused under a previous assignment starts afresh.
                if let Err(error) = consumer.resume(partitions) {
                    tracing::debug!(%error, "resume after assignment");
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(offsets = %describe(offsets), "committed"),
            Err(rdkafka::error::KafkaError::ConsumerCommit(
                rdkafka::types::RDKafkaErrorCode::NoOffset,
            )) => {}
            Err(error) => {
                tracing::warn!(%error, "offset commit failed; will retry on the next commit")
            }
        }
    }
}

pub(super) fn describe(partitions: &TopicPartitionList) -> String {
    partitions
        .elements()
        .iter()
        .map(|p| match p.offset() {
            Offset::Offset(offset) => format!("{}/{}@{offset}", p.topic(), p.partition()),
            _ => format!("{}/{}", p.topic(), p.partition()),
        })
        .collect::<Vec<_>>()
        .join(",")
}
