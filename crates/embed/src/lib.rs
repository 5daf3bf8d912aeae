//! Text → vector, behind one trait.
//!
//! Three providers: [`LocalEmbedder`], a real sentence-embedding transformer (all-MiniLM-L6-v2) run in process on
//! the CPU from weights installed once (the default: semantic vectors with no service and no network at run
//! time); [`HashEmbedder`], a deterministic feature-hashing embedder that needs no model at all (for benchmarks and
//! tests that measure the runtime, not the model); and [`OpenAiEmbedder`], which speaks the OpenAI
//! `/v1/embeddings` API that OpenAI, TEI, Ollama and vLLM all serve. All return L2-normalised vectors of exactly
//! the configured dimension; anything else is an error, never a padded, trimmed or made-up vector.
//! [`CachedEmbedder`] puts an LRU keyed by (model, text hash) in front of any of them.

mod cache;
mod hash;
mod layer;
pub mod local;
mod openai;

use async_trait::async_trait;

pub use cache::{CACHE_METRIC, CacheStats, CachedEmbedder, RedisTier};
pub use hash::HashEmbedder;
pub use layer::{EmbedderLayer, LayeredEmbedder};
pub use local::{LocalConfig, LocalEmbedder, Precision};
pub use openai::{OpenAiConfig, OpenAiEmbedder};

/// Vectors for a batch of texts, one per text in order, and the model that actually produced them.
#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub model: String,
    pub vectors: Vec<Vec<f32>>,
}

#[async_trait]
pub trait Embedder: Send + Sync {
    /// The configured model name (the provider may report a more specific one in [`Embeddings::model`]).
    fn model(&self) -> &str;
    fn dimension(&self) -> usize;
    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError>;
}

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Worth retrying: the endpoint is unreachable, timed out, overloaded or failing on its side.
    #[error("embedding endpoint unavailable: {0}")]
    Unavailable(String),
    /// Retrying the same input will fail again: a rejected request, a wrong dimension, text with no content.
    #[error("embedding rejected: {0}")]
    Rejected(String),
}

impl EmbedError {
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unavailable(_))
    }
}

/// Scales `vector` to unit length for cosine similarity. A zero vector has no direction: that is an error.
pub fn l2_normalize(vector: &mut [f32]) -> Result<(), EmbedError> {
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !norm.is_finite() || norm == 0.0 {
        return Err(EmbedError::Rejected(format!(
            "vector has norm {norm}; cannot normalise"
        )));
    }
    vector.iter_mut().for_each(|x| *x /= norm);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_vectors_have_unit_length_and_zero_vectors_are_refused() {
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v).unwrap();
        assert_eq!(v, [0.6, 0.8]);
        assert!(l2_normalize(&mut [0.0, 0.0]).is_err());
    }
}
