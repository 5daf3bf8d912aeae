//! A deterministic embedder built from feature hashing.
//!
//! Each text contributes its lower-cased word unigrams and bigrams and the character trigrams of every word;
//! each feature is hashed (FNV-1a, stable across platforms and releases) to a bucket and a sign. Texts that
//! share words and word fragments land close together under cosine similarity, which is enough for
//! meaningful `search` results offline. It is a fixed function of the text: the same input always gives the
//! same vector, so re-processing an event rewrites an identical point.

use async_trait::async_trait;

use crate::{EmbedError, Embedder, Embeddings, l2_normalize};

const WORD_WEIGHT: f32 = 1.0;
const BIGRAM_WEIGHT: f32 = 0.7;
const TRIGRAM_WEIGHT: f32 = 0.35;

#[derive(Clone, Debug)]
pub struct HashEmbedder {
    dimension: usize,
    model: String,
}

impl HashEmbedder {
    pub const MODEL: &'static str = "hash-ngram-v1";

    pub fn new(dimension: usize) -> Self {
        Self {
            dimension: dimension.max(1),
            model: Self::MODEL.to_owned(),
        }
    }

    /// Embeds one text synchronously (the work is a few microseconds; no need to leave the thread).
    pub fn embed_one(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let mut vector = vec![0.0f32; self.dimension];
        let lowered = text.to_lowercase();
        let words: Vec<&str> = lowered
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .collect();
        let mut add = |feature: &[&[u8]], weight: f32| {
            let hash = fnv1a(feature);
            let bucket = (hash % self.dimension as u64) as usize;
            let sign = if hash >> 63 == 0 { 1.0 } else { -1.0 };
            vector[bucket] += sign * weight;
        };
        for (i, word) in words.iter().enumerate() {
            add(&[b"w:", word.as_bytes()], WORD_WEIGHT);
            if let Some(next) = words.get(i + 1) {
                add(
                    &[b"b:", word.as_bytes(), b" ", next.as_bytes()],
                    BIGRAM_WEIGHT,
                );
            }
            let padded: Vec<char> = std::iter::once('<')
                .chain(word.chars())
                .chain(std::iter::once('>'))
                .collect();
            let mut buf = [0u8; 12];
            for window in padded.windows(3) {
                let mut len = 0;
                for c in window {
                    len += c.encode_utf8(&mut buf[len..]).len();
                }
                add(&[b"c:", &buf[..len]], TRIGRAM_WEIGHT);
            }
        }
        if words.is_empty() {
            // No letters or digits (a chunk of emoji or punctuation cut from a longer note): its symbols are its
            // features. Only a text with nothing but white space has no vector. The text itself is user data and
            // stays out of the error (it reaches logs, headers and results).
            let symbols: Vec<char> = lowered.chars().filter(|c| !c.is_whitespace()).collect();
            if symbols.is_empty() {
                return Err(EmbedError::Rejected(format!(
                    "text has nothing to embed ({} characters, all white space)",
                    text.chars().count()
                )));
            }
            let mut buf = [0u8; 12];
            for window in symbols.windows(3.min(symbols.len())) {
                let mut len = 0;
                for c in window {
                    len += c.encode_utf8(&mut buf[len..]).len();
                }
                add(&[b"s:", &buf[..len]], TRIGRAM_WEIGHT);
            }
        }
        l2_normalize(&mut vector)?;
        Ok(vector)
    }
}

fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in parts.iter().flat_map(|p| p.iter()) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[async_trait]
impl Embedder for HashEmbedder {
    fn model(&self) -> &str {
        &self.model
    }

    fn dimension(&self) -> usize {
        self.dimension
    }

    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        let vectors = texts
            .iter()
            .map(|t| self.embed_one(t))
            .collect::<Result<_, _>>()?;
        Ok(Embeddings {
            model: self.model.clone(),
            vectors,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// `text`'s 384-d vector.
    fn embed(text: &str) -> Vec<f32> {
        HashEmbedder::new(384).embed_one(text).unwrap()
    }

    #[test]
    fn same_text_same_vector_of_the_configured_size_and_unit_norm() {
        let (a, b) = (
            embed("Mood Score: 7/10 | Mood Tags: calm"),
            embed("Mood Score: 7/10 | Mood Tags: calm"),
        );
        assert_eq!(a, b);
        assert_eq!(a.len(), 384);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn related_texts_are_closer_than_unrelated_ones() {
        let anchor = embed("feeling anxious about work deadlines");
        let related = embed("anxious about deadlines at work");
        let unrelated = embed("went swimming with friends at the lake");
        assert!(cosine(&anchor, &related) > cosine(&anchor, &unrelated) + 0.3);
    }

    #[test]
    fn symbols_without_words_still_embed_and_only_white_space_is_refused_without_echoing_it() {
        let embedder = HashEmbedder::new(64);
        for text in [" | -- ", "🙂🙂🙂", "!", "…"] {
            let vector = embedder.embed_one(text).unwrap();
            assert!((cosine(&vector, &vector) - 1.0).abs() < 1e-5, "{text:?}");
        }
        let error = embedder
            .embed_one(" \n\t\u{3000} ")
            .unwrap_err()
            .to_string();
        assert!(error.contains("white space"), "{error}");
        assert!(
            !error.contains('\u{3000}') && !error.contains('\t'),
            "{error}"
        );
    }
}
