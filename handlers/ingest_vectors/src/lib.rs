//! `ingest_vectors`: the vectors of a `context.vectorized` event become points in the `user_context` collection.
//!
//! Point ids are UUIDv5 of the chain's origin event id and the chunk index, so a redelivered event, a replay or a
//! re-run of the whole chain (which mints new intermediate event ids) overwrites the same points instead of adding
//! new ones. The points are durable before the runtime acknowledges the input ([`HandlerContext::write_points`]).

use async_trait::async_trait;
use aura_runtime::events::limits::{LABEL_CHARS, Limits, POINT_TEXT_CHARS, truncate_chars};
use aura_runtime::events::payload::{ContextSnapshot, VectorizedContext};
use aura_runtime::events::{Event, EventError, Timestamp, types};
use aura_runtime::store::Point;
use aura_runtime::{Handler, HandlerContext, HandlerError};
use serde_json::{Map, Value, json};
use uuid::Uuid;

/// Namespace of point ids: `uuid5(NAMESPACE_URL, "aura360:vectordb:user_context")`.
pub fn point_namespace() -> Uuid {
    Uuid::new_v5(&Uuid::NAMESPACE_URL, b"aura360:vectordb:user_context")
}

/// The point id of chunk `chunk_index` of the chain started by `origin_event_id`.
pub fn point_id(origin_event_id: &str, chunk_index: usize) -> Uuid {
    Uuid::new_v5(
        &point_namespace(),
        format!("{origin_event_id}:{chunk_index}").as_bytes(),
    )
}

pub struct IngestVectors;

#[async_trait]
impl Handler for IngestVectors {
    fn name(&self) -> &'static str {
        "ingest_vectors"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[types::CONTEXT_VECTORIZED]
    }

    async fn handle(
        &self,
        event: &Event,
        ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        let points = points(event, &ctx.limits)?;
        ctx.write_points(points).await?;
        Ok(Vec::new())
    }
}

/// The user the points belong to: the event's, else the snapshot's; an id too long to keep whole is refused
/// (cutting it would merge users).
fn user_of(event: &Event, snapshot_user: &str) -> Result<String, EventError> {
    let user_id = match event.user_id.as_deref().filter(|u| !u.trim().is_empty()) {
        Some(user) => user.to_owned(),
        None if !snapshot_user.trim().is_empty() => snapshot_user.to_owned(),
        None => return Err(EventError::schema("user_id", "missing or empty")),
    };
    if user_id.chars().count() > LABEL_CHARS {
        return Err(EventError::schema(
            "user_id",
            format!("longer than {LABEL_CHARS} characters"),
        ));
    }
    Ok(user_id)
}

/// The snapshot's source event, summaries and other bounded fields, into the payload every point shares.
fn insert_summaries(shared: &mut Map<String, Value>, snapshot: &ContextSnapshot) {
    if let Some(source) = &snapshot.source_event {
        shared.insert("source_event".into(), source.clone());
    }
    for (key, summary) in [
        ("mood_summary", &snapshot.mood_summary),
        ("activity_summary", &snapshot.activity_summary),
    ] {
        if let Some(summary) = summary {
            shared.insert(key.into(), summary.clone());
        }
    }
    // Other summaries of the snapshot (ikigai_summary, psychosocial_factors, …) travel along, bounded.
    for (key, value) in &snapshot.extra {
        shared.entry(key.clone()).or_insert_with(|| value.clone());
    }
    if let Some(chars) = snapshot.source_text_chars {
        shared.insert("source_text_chars".into(), json!(chars));
    }
}

/// The points for one `context.vectorized` event: the payload schema of docs/limits.md, "Point payload". Every field is
/// bounded ([`aura_runtime::events::limits`]), so one point's payload stays under `POINT_PAYLOAD_BYTES` whatever
/// the event carried: a point holds its own chunk and bounded summaries, never the whole source again.
pub fn points(event: &Event, limits: &Limits) -> Result<Vec<Point>, EventError> {
    let VectorizedContext {
        context_data,
        mut chunks,
        mut vectors,
        embedding_model,
        embedding_version,
    } = VectorizedContext::from_event(event)?;
    let user_id = user_of(event, &context_data.user_id)?;
    let snapshot = context_data.bounded(limits);
    let mut truncated = snapshot.truncated;
    if chunks.len() > limits.max_chunks {
        chunks.truncate(limits.max_chunks);
        vectors.truncate(limits.max_chunks);
        truncated = true;
    }
    // The id hashes the whole origin; the payload carries a bounded copy.
    let origin = event.origin_event_id();
    let origin_label = truncate_chars(&origin, LABEL_CHARS).0;
    let created_at = snapshot
        .timestamp
        .as_deref()
        .and_then(|t| Timestamp::parse(t).ok())
        .unwrap_or_else(|| event.timestamp.clone())
        .epoch_seconds();
    let label = |text: &str| truncate_chars(text, LABEL_CHARS).0.to_owned();

    let mut shared = Map::new();
    shared.insert("user_id".into(), json!(user_id));
    shared.insert("doc_id".into(), json!(origin_label));
    shared.insert("source_type".into(), json!("user_context"));
    shared.insert("category".into(), json!("user_context"));
    shared.insert("snapshot_type".into(), json!(snapshot.snapshot_type));
    shared.insert("timeframe".into(), json!(snapshot.timeframe));
    shared.insert("created_at".into(), json!(created_at));
    shared.insert("embedding_model".into(), json!(label(&embedding_model)));
    shared.insert("version".into(), json!(label(&embedding_version)));
    shared.insert(
        "trace_id".into(),
        json!(event.trace_id.as_deref().map(label)),
    );
    shared.insert("origin_event_id".into(), json!(origin_label));
    shared.insert(
        "aggregated_event_id".into(),
        json!(event.causation_id().map(label)),
    );
    shared.insert(
        "vectorized_event_id".into(),
        json!(event.event_id.to_string()),
    );
    insert_summaries(&mut shared, &snapshot);
    shared.insert(
        "summaries_truncated".into(),
        json!(snapshot.summaries_truncated),
    );

    Ok(chunks
        .iter()
        .zip(vectors)
        .enumerate()
        .map(|(index, (text, vector))| {
            let mut payload = shared.clone();
            let (text, cut) = truncate_chars(text, POINT_TEXT_CHARS);
            payload.insert("chunk_index".into(), json!(index));
            payload.insert("text".into(), Value::String(text.to_owned()));
            payload.insert("truncated".into(), json!(truncated || cut));
            Point {
                id: point_id(&origin, index),
                vector,
                payload,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aura_runtime::store::{Query, VectorStore};
    use aura_runtime::testing::{FlakyStore, TEST_DIM, context_with, embedded};
    use std::sync::atomic::Ordering;

    fn vectorized(chunks: usize) -> Event {
        let mut e = Event::new(
            types::CONTEXT_VECTORIZED,
            Some("u9".into()),
            Some("trace-9".into()),
        );
        e.metadata
            .insert("origin_event_id".into(), json!("origin-1"));
        e.metadata.insert("causation_id".into(), json!("agg-1"));
        let vectorized = VectorizedContext {
            context_data: serde_json::from_value(json!({
                "user_id": "u9", "timestamp": "2025-03-01T00:00:00", "text_representation": "t",
                "mood_summary": {"recent_score": 3}, "ikigai_summary": {"purpose": "care"}
            }))
            .unwrap(),
            chunks: (0..chunks).map(|i| format!("chunk {i}")).collect(),
            vectors: (0..chunks)
                .map(|i| {
                    (0..TEST_DIM)
                        .map(|d| if d == i { 1.0 } else { 0.0 })
                        .collect()
                })
                .collect(),
            embedding_model: "hash-ngram-v1".into(),
            embedding_version: "test-v1".into(),
        };
        vectorized.apply_to(&mut e);
        e
    }

    #[test]
    fn point_ids_are_deterministic_per_origin_and_chunk() {
        assert_eq!(point_id("origin-1", 0), point_id("origin-1", 0));
        assert_ne!(point_id("origin-1", 0), point_id("origin-1", 1));
        assert_ne!(point_id("origin-1", 0), point_id("origin-2", 0));
        assert_eq!(point_id("origin-1", 0).get_version_num(), 5);
    }

    #[tokio::test]
    async fn ingest_writes_one_point_per_chunk_with_the_full_payload() {
        let fixture = embedded();
        let (ctx, store) = (&fixture.ctx, &fixture.store);
        let event = vectorized(2);
        assert!(IngestVectors.handle(&event, ctx).await.unwrap().is_empty());
        assert_eq!(store.count(Some("u9")).await.unwrap(), 2);

        let vector = points(&event, &Limits::default()).unwrap()[1]
            .vector
            .clone();
        let hits = store
            .search(Query::nearest(vector, 1).of_user("u9"))
            .await
            .unwrap();
        assert_eq!(hits[0].id, point_id("origin-1", 1).to_string());
        let p = &hits[0].payload;
        assert_eq!(p["chunk_index"], 1);
        assert_eq!(p["text"], "chunk 1");
        assert_eq!(p["doc_id"], "origin-1");
        assert_eq!(p["source_type"], "user_context");
        assert_eq!(p["category"], "user_context");
        assert_eq!(p["created_at"], 1_740_787_200);
        assert_eq!(p["version"], "test-v1");
        assert_eq!(p["embedding_model"], "hash-ngram-v1");
        assert_eq!(p["trace_id"], "trace-9");
        assert_eq!(p["aggregated_event_id"], "agg-1");
        assert_eq!(p["mood_summary"], json!({"recent_score": 3}));
        assert_eq!(p["ikigai_summary"], json!({"purpose": "care"}));

        // Redelivery overwrites.
        IngestVectors.handle(&event, ctx).await.unwrap();
        assert_eq!(store.count(None).await.unwrap(), 2);
    }

    #[tokio::test]
    async fn a_store_that_is_down_is_a_transient_error() {
        let fixture = embedded();
        let store = &fixture.store;
        let flaky = FlakyStore::new(store.clone(), 1);
        let ctx = context_with(flaky.store.clone());
        let err = IngestVectors
            .handle(&vectorized(1), &ctx)
            .await
            .unwrap_err();
        assert!(matches!(err, HandlerError::Transient(_)), "{err}");
        IngestVectors.handle(&vectorized(1), &ctx).await.unwrap();
        assert_eq!(flaky.attempts.load(Ordering::SeqCst), 2);
        assert_eq!(store.count(None).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn vectors_of_the_wrong_size_or_a_missing_user_are_permanent() {
        let fixture = embedded();
        let ctx = &fixture.ctx;
        let mut wrong_size = vectorized(1);
        wrong_size.set_field("vectors", json!([[1.0, 0.0]]));
        assert!(matches!(
            IngestVectors.handle(&wrong_size, ctx).await,
            Err(HandlerError::Permanent(_))
        ));

        let mut no_user = vectorized(1);
        no_user.user_id = None;
        no_user.set_field(
            "context_data",
            json!({"user_id": "", "text_representation": "t"}),
        );
        assert!(matches!(
            IngestVectors.handle(&no_user, ctx).await,
            Err(HandlerError::Permanent(_))
        ));

        let mut no_vectors = vectorized(1);
        no_vectors.fields.remove("vectors");
        assert!(matches!(
            IngestVectors.handle(&no_vectors, ctx).await,
            Err(HandlerError::Permanent(_))
        ));
    }
}
