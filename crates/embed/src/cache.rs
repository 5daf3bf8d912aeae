//! A cache of vectors keyed by (model, SHA-256 of the text), in front of any [`Embedder`]: an in-process LRU, and
//! optionally a Redis tier shared by every process and kept across restarts.
//!
//! A replay, a redelivery or a re-run of the pipeline sends texts embedded before; a local model spends milliseconds
//! of CPU on each, a hosted one money. Only a call's misses go to the inner embedder, in one batch, in order.
//! - The LRU is bounded by entry count (`EMBEDDING_CACHE_SIZE`; a 384-d entry is ~1.6 KB); `0` turns it off.
//! - The Redis tier (`EMBEDDING_CACHE_REDIS_URL`, unset = off; entries expire after `EMBEDDING_CACHE_TTL_S`) is asked
//!   for the LRU's misses with one `MGET`, and gets the fresh vectors with `SET … EX`. It is an optimisation, never a
//!   dependency: a Redis that is down, slow (2 s) or answers garbage is skipped (logged at most once a minute), and the
//!   text is embedded.
//!
//! Lookups are counted for the summary and in `aura360_embedding_cache_requests_total{result="hit|redis_hit|miss"}`.

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lru::LruCache;
use redis::aio::MultiplexedConnection;
use sha2::{Digest, Sha256};

use crate::{EmbedError, Embedder, Embeddings};

pub const CACHE_METRIC: &str = "aura360_embedding_cache_requests_total";

/// SHA-256 of (model, text) → (the model the provider reported, the vector).
type Lru = LruCache<[u8; 32], (String, Vec<f32>)>;

/// How long one Redis round trip may take before the tier is skipped for that call.
const REDIS_PATIENCE: Duration = Duration::from_secs(2);

pub struct CachedEmbedder<E: ?Sized> {
    inner: std::sync::Arc<E>,
    memory: Option<Mutex<Lru>>,
    redis: Option<RedisTier>,
    hits: AtomicU64,
    redis_hits: AtomicU64,
    misses: AtomicU64,
}

/// Lookup counts so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Answered by the in-process LRU.
    pub hits: u64,
    /// Answered by the Redis tier.
    pub redis_hits: u64,
    /// Embedded.
    pub misses: u64,
}

impl CacheStats {
    /// Hits (either tier) over lookups, or `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let total = self.hits + self.redis_hits + self.misses;
        (total > 0).then(|| (self.hits + self.redis_hits) as f64 / total as f64)
    }
}

/// The shared tier: vectors under `aura360:embedding:<sha256 hex>`, values `[model length][model][f32 LE…]`.
pub struct RedisTier {
    client: redis::Client,
    /// The URL as logs may show it (credentials redacted by the caller).
    shown_url: String,
    ttl: Duration,
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// When a failure was last logged (seconds since the epoch): one line a minute, not one per call.
    last_warning: AtomicU64,
}

impl RedisTier {
    /// `url` is only parsed here; the connection is made on first use (and again after a failure).
    pub fn new(url: &str, shown_url: String, ttl: Duration) -> Result<Self, EmbedError> {
        let client = redis::Client::open(url).map_err(|e| {
            EmbedError::Rejected(format!("EMBEDDING_CACHE_REDIS_URL {shown_url}: {e}"))
        })?;
        Ok(Self {
            client,
            shown_url,
            ttl,
            connection: tokio::sync::Mutex::new(None),
            last_warning: AtomicU64::new(0),
        })
    }

    fn key(hash: &[u8; 32]) -> String {
        let mut key = String::from("aura360:embedding:");
        for b in hash {
            key.push_str(&format!("{b:02x}"));
        }
        key
    }

    async fn connection(&self) -> Result<MultiplexedConnection, String> {
        let mut cached = self.connection.lock().await;
        if let Some(conn) = cached.as_ref() {
            return Ok(conn.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(REDIS_PATIENCE))
            .set_response_timeout(Some(REDIS_PATIENCE));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|e| e.to_string())?;
        *cached = Some(conn.clone());
        Ok(conn)
    }

    /// Logs `error` (rate-limited) and drops the connection so the next call reconnects.
    async fn failed(&self, what: &str, error: String) {
        *self.connection.lock().await = None;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 60
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                redis = %self.shown_url,
                %error,
                "embedding cache: {what} failed; embedding without the Redis tier (logged once a minute)"
            );
        }
    }

    async fn get(&self, hashes: &[[u8; 32]], dimension: usize) -> Vec<Option<(String, Vec<f32>)>> {
        let keys: Vec<String> = hashes.iter().map(Self::key).collect();
        let result = async {
            let mut conn = self.connection().await?;
            let values: Vec<Option<Vec<u8>>> = tokio::time::timeout(
                REDIS_PATIENCE,
                redis::cmd("MGET").arg(&keys).query_async(&mut conn),
            )
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            Ok::<_, String>(values)
        }
        .await;
        match result {
            Ok(values) if values.len() == hashes.len() => values
                .into_iter()
                .map(|v| v.and_then(|bytes| decode(&bytes, dimension)))
                .collect(),
            Ok(values) => {
                self.failed(
                    "MGET",
                    format!("{} values for {} keys", values.len(), keys.len()),
                )
                .await;
                vec![None; hashes.len()]
            }
            Err(error) => {
                self.failed("MGET", error).await;
                vec![None; hashes.len()]
            }
        }
    }

    async fn put(&self, entries: &[([u8; 32], &str, &[f32])]) {
        let mut pipe = redis::pipe();
        for (hash, model, vector) in entries {
            pipe.cmd("SET")
                .arg(Self::key(hash))
                .arg(encode(model, vector))
                .arg("EX")
                .arg(self.ttl.as_secs().max(1))
                .ignore();
        }
        let result = async {
            let mut conn = self.connection().await?;
            tokio::time::timeout(REDIS_PATIENCE, pipe.query_async::<()>(&mut conn))
                .await
                .map_err(|_| "timed out".to_owned())?
                .map_err(|e| e.to_string())
        }
        .await;
        if let Err(error) = result {
            self.failed("SET", error).await;
        }
    }
}

fn encode(model: &str, vector: &[f32]) -> Vec<u8> {
    let model = &model.as_bytes()[..model.len().min(255)];
    let mut bytes = Vec::with_capacity(1 + model.len() + vector.len() * 4);
    bytes.push(model.len() as u8);
    bytes.extend_from_slice(model);
    for v in vector {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    bytes
}

/// A stored entry, or `None` for anything that is not exactly one `dimension`-long finite vector.
fn decode(bytes: &[u8], dimension: usize) -> Option<(String, Vec<f32>)> {
    let (&len, rest) = bytes.split_first()?;
    let (model, floats) = rest.split_at_checked(usize::from(len))?;
    if floats.len() != dimension * 4 {
        return None;
    }
    let vector: Vec<f32> = floats
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    if vector.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some((String::from_utf8(model.to_vec()).ok()?, vector))
}

impl<E: Embedder + ?Sized> CachedEmbedder<E> {
    /// A cache of at most `capacity` vectors in memory (`0`: none), and no Redis tier.
    pub fn new(inner: std::sync::Arc<E>, capacity: usize) -> Self {
        Self {
            inner,
            memory: NonZeroUsize::new(capacity).map(|c| Mutex::new(LruCache::new(c))),
            redis: None,
            hits: AtomicU64::new(0),
            redis_hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Adds the shared Redis tier.
    pub fn with_redis(mut self, tier: RedisTier) -> Self {
        self.redis = Some(tier);
        self
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            redis_hits: self.redis_hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn key(&self, text: &str) -> [u8; 32] {
        let mut hasher = Sha256::new();
        hasher.update(self.inner.model().as_bytes());
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.finalize().into()
    }

    fn count(&self, result: &'static str, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        metrics::counter!(CACHE_METRIC, "result" => result).increment(n as u64);
    }

    fn remember(&self, key: [u8; 32], model: &str, vector: &[f32]) {
        if let Some(memory) = &self.memory {
            memory
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .put(key, (model.to_owned(), vector.to_vec()));
        }
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
        if self.memory.is_none() && self.redis.is_none() {
            return self.inner.embed(texts).await;
        }
        let keys: Vec<[u8; 32]> = texts.iter().map(|t| self.key(t)).collect();
        let mut found: Vec<Option<(String, Vec<f32>)>> = match &self.memory {
            Some(memory) => {
                let mut memory = memory.lock().unwrap_or_else(|p| p.into_inner());
                keys.iter().map(|k| memory.get(k).cloned()).collect()
            }
            None => vec![None; texts.len()],
        };
        let mut missing: Vec<usize> = (0..texts.len()).filter(|&i| found[i].is_none()).collect();
        self.count("hit", &self.hits, texts.len() - missing.len());
        if let (Some(redis), false) = (&self.redis, missing.is_empty()) {
            let wanted: Vec<[u8; 32]> = missing.iter().map(|&i| keys[i]).collect();
            let stored = redis.get(&wanted, self.inner.dimension()).await;
            let mut served = 0;
            for (&i, entry) in missing.iter().zip(stored) {
                if let Some((model, vector)) = entry {
                    self.remember(keys[i], &model, &vector);
                    found[i] = Some((model, vector));
                    served += 1;
                }
            }
            self.count("redis_hit", &self.redis_hits, served);
            missing.retain(|&i| found[i].is_none());
        }
        self.count("miss", &self.misses, missing.len());
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
            for (&i, vector) in missing.iter().zip(&fresh.vectors) {
                self.remember(keys[i], &fresh.model, vector);
            }
            if let Some(redis) = &self.redis {
                let entries: Vec<([u8; 32], &str, &[f32])> = missing
                    .iter()
                    .zip(&fresh.vectors)
                    .map(|(&i, v)| (keys[i], fresh.model.as_str(), v.as_slice()))
                    .collect();
                redis.put(&entries).await;
            }
            for (&i, vector) in missing.iter().zip(fresh.vectors) {
                found[i] = Some((fresh.model.clone(), vector));
            }
        }
        // The model of the first text: every vector of one call comes from the one configured model.
        let model = found
            .iter()
            .flatten()
            .map(|(model, _)| model.clone())
            .next()
            .unwrap_or_else(|| self.inner.model().to_owned());
        Ok(Embeddings {
            model,
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
        assert_eq!(
            cached.stats(),
            CacheStats {
                hits: 2,
                redis_hits: 0,
                misses: 3
            }
        );
        let direct = HashEmbedder::new(16).embed_one("e f").unwrap();
        assert_eq!(again.vectors[1], direct);
        let off = CachedEmbedder::new(Arc::new(HashEmbedder::new(16)), 0);
        off.embed(&texts(&["a"])).await.unwrap();
        off.embed(&texts(&["a"])).await.unwrap();
        assert_eq!(off.stats(), CacheStats::default());
    }

    #[test]
    fn a_stored_entry_is_decoded_only_when_it_is_one_finite_vector_of_the_dimension() {
        let bytes = encode("m", &[1.0, -2.5]);
        assert_eq!(decode(&bytes, 2), Some(("m".to_owned(), vec![1.0, -2.5])));
        assert_eq!(decode(&bytes, 3), None);
        assert_eq!(decode(&bytes[..bytes.len() - 1], 2), None);
        assert_eq!(decode(&[], 2), None);
        assert_eq!(decode(&[200, 1, 2], 2), None);
        assert_eq!(decode(&encode("m", &[f32::NAN, 1.0]), 2), None);
    }
}
