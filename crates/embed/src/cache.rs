//! An in-process LRU of vectors keyed by (model, SHA-256 of the text), in front of any [`Embedder`].
//!
//! A replay, a redelivery or a re-run of the pipeline sends texts the process has embedded before; a local model
//! spends milliseconds of CPU on each, a hosted one money. Only the misses of a call go to the inner embedder,
//! in one batch, in order. The cache is bounded by entry count (`EMBEDDING_CACHE_SIZE`; a 384-d entry is ~1.6 KB),
//! and `0` turns it off. Hits and misses are counted for the summary and in
//! `aura360_embedding_cache_requests_total{result}`.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use lru::LruCache;
use sha2::{Digest, Sha256};

use crate::{EmbedError, Embedder, Embeddings};

pub const CACHE_METRIC: &str = "aura360_embedding_cache_requests_total";

/// SHA-256 of (model, text) → (the model the provider reported, the vector).
type Lru = LruCache<[u8; 32], (String, Vec<f32>)>;

pub struct CachedEmbedder<E: ?Sized> {
    inner: std::sync::Arc<E>,
    cache: Option<Mutex<Lru>>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Hit and miss counts so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
}

impl CacheStats {
    /// Hits over lookups, or `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.misses;
        (total > 0).then(|| self.hits as f64 / total as f64)
    }
}

impl<E: Embedder + ?Sized> CachedEmbedder<E> {
    /// A cache of at most `capacity` vectors (`0`: no cache, every call goes through).
    pub fn new(inner: std::sync::Arc<E>, capacity: usize) -> Self {
        Self {
            inner,
            cache: NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c))),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    pub fn inner(&self) -> &E {
        &self.inner
    }

    fn key(&self, text: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.inner.model().as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.finalize().into()
    }

    fn count(&self, hits: u64, misses: u64) {
        self.hits.fetch_add(hits, Ordering::Relaxed);
        self.misses.fetch_add(misses, Ordering::Relaxed);
        metrics::counter!(CACHE_METRIC, "result" => "hit").increment(hits);
        metrics::counter!(CACHE_METRIC, "result" => "miss").increment(misses);
    }
}

#[async_trait]
impl<E: Embedder + ?Sized> Embedder for CachedEmbedder<E> {
    fn model(&self) -> &str {
        self.inner.model()
    }

    fn dimension(&self) -> usize {
        self.inner.dimension()
    }

    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        let Some(cache) = &self.cache else {
            return self.inner.embed(texts).await;
        };
        let keys: Vec<[u8; 32]> = texts.iter().map(|t| self.key(t)).collect();
        let mut found: Vec<Option<(String, Vec<f32>)>> = {
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            keys.iter().map(|k| cache.get(k).cloned()).collect()
        };
        let missing: Vec<usize> = (0..texts.len()).filter(|&i| found[i].is_none()).collect();
        self.count((texts.len() - missing.len()) as u64, missing.len() as u64);
        let mut model = found
            .iter()
            .flatten()
            .map(|(model, _)| model.clone())
            .next();
        if !missing.is_empty() {
            let wanted: Vec<String> = missing.iter().map(|&i| texts[i].clone()).collect();
            let fresh = self.inner.embed(&wanted).await?;
            if fresh.vectors.len() != wanted.len() {
                return Err(EmbedError::Rejected(format!(
                    "embedder returned {} vectors for {} texts",
                    fresh.vectors.len(),
                    wanted.len()
                )));
            }
            let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
            for (&i, vector) in missing.iter().zip(fresh.vectors) {
                cache.put(keys[i], (fresh.model.clone(), vector.clone()));
                found[i] = Some((fresh.model.clone(), vector));
            }
            model = Some(fresh.model);
        }
        Ok(Embeddings {
            model: model.unwrap_or_else(|| self.inner.model().to_owned()),
            vectors: found.into_iter().flatten().map(|(_, v)| v).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HashEmbedder;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_repeated_text_is_served_from_the_cache_and_vectors_keep_their_order() {
        let cached = CachedEmbedder::new(Arc::new(HashEmbedder::new(16)), 2);
        let texts = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let first = cached.embed(&texts(&["a b", "c d"])).await.unwrap();
        let again = cached.embed(&texts(&["c d", "e f", "a b"])).await.unwrap();
        assert_eq!(again.vectors[0], first.vectors[1]);
        assert_eq!(again.vectors[2], first.vectors[0]);
        assert_eq!(again.model, HashEmbedder::MODEL);
        // The capacity is 2: "e f" pushed out the least recently used entry.
        assert_eq!(cached.stats(), CacheStats { hits: 2, misses: 3 });
        let direct = HashEmbedder::new(16).embed_one("e f").unwrap();
        assert_eq!(again.vectors[1], direct);
        let off = CachedEmbedder::new(Arc::new(HashEmbedder::new(16)), 0);
        off.embed(&texts(&["a"])).await.unwrap();
        off.embed(&texts(&["a"])).await.unwrap();
        assert_eq!(off.stats(), CacheStats::default());
    }
}
