//! Where each event type travels: its Kafka topic and its Celery task name (docs/design.md §2).
//!
//! Both maps are fixed by the Python services that already publish and consume them.

use crate::types;

pub const USER_EVENTS_TOPIC: &str = "aura360.user.events";
pub const CONTEXT_AGGREGATED_TOPIC: &str = "aura360.context.aggregated";
pub const CONTEXT_VECTORIZED_TOPIC: &str = "aura360.context.vectorized";

/// The topics the consumer subscribes to.
pub const TOPICS: [&str; 3] = [
    USER_EVENTS_TOPIC,
    CONTEXT_AGGREGATED_TOPIC,
    CONTEXT_VECTORIZED_TOPIC,
];

/// The dead-letter topic of a source topic.
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Kafka topic for an event type: every `user.*` event shares the user-events topic.
pub fn topic_for(event_type: &str) -> Option<&'static str> {
    match event_type {
        t if t.starts_with("user.") => Some(USER_EVENTS_TOPIC),
        types::CONTEXT_AGGREGATED => Some(CONTEXT_AGGREGATED_TOPIC),
        types::CONTEXT_VECTORIZED => Some(CONTEXT_VECTORIZED_TOPIC),
        _ => None,
    }
}

const TASKS: [(&str, &str); 4] = [
    (
        types::MOOD_CREATED,
        "vectosvc.worker.tasks.process_mood_created",
    ),
    (
        types::ACTIVITY_CREATED,
        "vectosvc.worker.tasks.process_activity_created",
    ),
    (
        types::CONTEXT_AGGREGATED,
        "vectosvc.worker.tasks.process_context_aggregated",
    ),
    (
        types::CONTEXT_VECTORIZED,
        "vectosvc.worker.tasks.ingest_vectors",
    ),
];

/// Celery task name for an event type.
pub fn task_for(event_type: &str) -> Option<&'static str> {
    TASKS
        .iter()
        .find(|(t, _)| *t == event_type)
        .map(|(_, task)| *task)
}

/// The Celery task names of the vectordb pipeline: `vectosvc.worker.tasks.*`. A task in this namespace that no
/// handler knows is ours and unknown (`NotRegistered`, as Celery reports it); any other name belongs to another app
/// sharing the broker, and is never failed on its behalf.
pub const TASK_NAMESPACE: &str = "vectosvc.worker.tasks.";

/// Whether `task` is one of the pipeline's task names, known or not.
pub fn is_pipeline_task(task: &str) -> bool {
    task.starts_with(TASK_NAMESPACE)
}

/// Event type carried by a Celery task name.
pub fn event_type_for_task(task: &str) -> Option<&'static str> {
    TASKS
        .iter()
        .find(|(_, name)| *name == task)
        .map(|(t, _)| *t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_event_goes_to_the_user_topic() {
        assert_eq!(topic_for("user.mood.created"), Some(USER_EVENTS_TOPIC));
        assert_eq!(topic_for("user.profile.updated"), Some(USER_EVENTS_TOPIC));
        assert_eq!(
            topic_for("context.vectorized"),
            Some(CONTEXT_VECTORIZED_TOPIC)
        );
        assert_eq!(topic_for("billing.invoice"), None);
        assert_eq!(
            dead_letter_topic(USER_EVENTS_TOPIC),
            "aura360.user.events.dlq"
        );
    }

    #[test]
    fn task_names_map_both_ways() {
        for (event_type, task) in TASKS {
            assert_eq!(task_for(event_type), Some(task));
            assert_eq!(event_type_for_task(task), Some(event_type));
        }
        assert_eq!(task_for("user.profile.updated"), None);
    }
}
