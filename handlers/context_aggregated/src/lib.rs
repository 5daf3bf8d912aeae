//! `context_aggregated`: a context snapshot is chunked and embedded (`context.vectorized`).
//!
//! Chunks are 900 characters with 150 of overlap (characters, not bytes: the text is user-written and may be
//! any script). The event carries the real vectors, the chunks' text, the model the embedder reports and
//! `EMBEDDING_VERSION`. An embedding failure is an error — never a zero or random vector.

use async_trait::async_trait;
use aura_runtime::events::payload::{ContextSnapshot, VectorizedContext};
use aura_runtime::events::{Event, types};
use aura_runtime::{Handler, HandlerContext, HandlerError};

pub const CHUNK_CHARS: usize = 900;
pub const CHUNK_OVERLAP: usize = 150;

pub struct ContextAggregated;

#[async_trait]
impl Handler for ContextAggregated {
    fn name(&self) -> &'static str {
        "context_aggregated"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[types::CONTEXT_AGGREGATED]
    }

    async fn handle(
        &self,
        event: &Event,
        ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        // A snapshot from another producer may be any size: cut it to the limits before it is embedded and
        // forwarded (ours was cut when it was made; cutting again changes nothing).
        let mut snapshot = ContextSnapshot::from_event(event)?.bounded(&ctx.limits);
        let mut chunks = chunk(&snapshot.text_representation, CHUNK_CHARS, CHUNK_OVERLAP);
        if chunks.len() > ctx.limits.max_chunks {
            chunks.truncate(ctx.limits.max_chunks);
            snapshot.truncated = true;
            snapshot
                .source_text_chars
                .get_or_insert(snapshot.text_representation.chars().count() as u64);
        }
        let embeddings = ctx.embedder.embed(&chunks).await?;
        let dimension = ctx.embedder.dimension();
        if embeddings.vectors.len() != chunks.len()
            || embeddings.vectors.iter().any(|v| v.len() != dimension)
        {
            return Err(HandlerError::Permanent(format!(
                "embedder returned {} vectors for {} chunks (expected {dimension} dimensions each)",
                embeddings.vectors.len(),
                chunks.len()
            )));
        }
        let vectorized = VectorizedContext {
            context_data: snapshot,
            chunks,
            vectors: embeddings.vectors,
            embedding_model: embeddings.model,
            embedding_version: ctx.embedding_version.clone(),
        };
        let mut out = Event::caused_by(event, types::CONTEXT_VECTORIZED);
        vectorized.apply_to(&mut out);
        Ok(vec![out])
    }
}

/// Splits `text` into windows of `size` characters, each starting `size - overlap` after the previous one.
pub fn chunk(text: &str, size: usize, overlap: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let size = size.max(1);
    let step = size.saturating_sub(overlap).max(1);
    let mut chunks = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + size).min(chars.len());
        chunks.push(chars[start..end].iter().collect());
        if end == chars.len() {
            return chunks;
        }
        start += step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aura_runtime::testing::{TEST_DIM, embedded};
    use serde_json::json;

    fn aggregated(text: &str) -> Event {
        let mut e = Event::new(
            types::CONTEXT_AGGREGATED,
            Some("u1".into()),
            Some("t".into()),
        );
        e.set_field("context_data", json!({"user_id": "u1", "text_representation": text, "mood_summary": {"recent_score": 5}}));
        e
    }

    #[test]
    fn chunks_are_900_chars_with_150_overlap() {
        let text: String = (0..2000)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let chunks = chunk(&text, CHUNK_CHARS, CHUNK_OVERLAP);
        assert_eq!(
            chunks.iter().map(|c| c.chars().count()).collect::<Vec<_>>(),
            [900, 900, 500]
        );
        assert_eq!(&chunks[0][750..], &chunks[1][..150]);
        assert_eq!(chunk("short", 900, 150), ["short"]);
        assert_eq!(
            chunk(&"é".repeat(901), 900, 150).len(),
            2,
            "counted in characters"
        );
    }

    #[tokio::test]
    async fn context_aggregated_publishes_normalised_vectors_with_their_chunks() {
        let fixture = embedded();
        let ctx = &fixture.ctx;
        let input = aggregated(&"feeling calm and rested ".repeat(60));
        let out = ContextAggregated.handle(&input, ctx).await.unwrap();
        assert_eq!(out.len(), 1);
        let v = VectorizedContext::from_event(&out[0]).unwrap();
        assert_eq!(v.chunks.len(), 2);
        assert_eq!(v.vectors.len(), 2);
        for vector in &v.vectors {
            assert_eq!(vector.len(), TEST_DIM);
            let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5);
        }
        assert_eq!(v.embedding_model, "hash-ngram-v1");
        assert_eq!(v.embedding_version, "test-v1");
        assert_eq!(
            v.context_data.mood_summary,
            Some(json!({"recent_score": 5}))
        );
        assert_eq!(
            out[0].causation_id(),
            Some(input.event_id.to_string().as_str())
        );
    }

    #[tokio::test]
    async fn a_snapshot_without_text_is_permanent() {
        let fixture = embedded();
        let ctx = &fixture.ctx;
        let mut input = aggregated("x");
        input.set_field("context_data", json!({"user_id": "u1"}));
        assert!(matches!(
            ContextAggregated.handle(&input, ctx).await,
            Err(HandlerError::Permanent(_))
        ));
        assert!(matches!(
            ContextAggregated.handle(&aggregated("  "), ctx).await,
            Err(HandlerError::Permanent(_))
        ));
    }
}
