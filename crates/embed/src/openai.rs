//! An OpenAI-compatible `/v1/embeddings` client (OpenAI, TEI, Ollama, vLLM).
//!
//! Texts are sent in batches of `batch_size` per request; vectors are put back in input order by the
//! response's `index` (servers may reorder). A response whose vectors are not exactly `dimension` long is
//! rejected: silently padding or trimming would poison the collection with vectors of another model.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::{EmbedError, Embedder, Embeddings, l2_normalize};

#[derive(Clone)]
pub struct OpenAiConfig {
    /// Base URL (`http://tei:8080`, `https://api.openai.com/v1`) or the full `/embeddings` URL.
    pub url: String,
    /// `url` as logs and errors may show it (credentials in it redacted by the caller).
    pub shown_url: String,
    pub api_key: Option<String>,
    pub model: String,
    pub dimension: usize,
    pub batch_size: usize,
    pub timeout: Duration,
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("url", &self.shown_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .field("dimension", &self.dimension)
            .field("batch_size", &self.batch_size)
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[derive(Debug)]
pub struct OpenAiEmbedder {
    config: OpenAiConfig,
    endpoint: String,
    /// `endpoint` for messages: built from the redacted URL.
    shown_endpoint: String,
    client: reqwest::Client,
}

#[derive(Serialize)]
struct Request<'a> {
    model: &'a str,
    input: &'a [String],
}

#[derive(Deserialize)]
struct Response {
    data: Vec<Item>,
    #[serde(default)]
    model: Option<String>,
}

#[derive(Deserialize)]
struct Item {
    embedding: Vec<f32>,
    #[serde(default)]
    index: Option<usize>,
}

impl OpenAiEmbedder {
    pub fn new(config: OpenAiConfig) -> Result<Self, EmbedError> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| EmbedError::Rejected(format!("cannot build HTTP client: {e}")))?;
        Ok(Self {
            endpoint: endpoint(&config.url),
            shown_endpoint: endpoint(&config.shown_url),
            config,
            client,
        })
    }

    async fn embed_batch(
        &self,
        texts: &[String],
    ) -> Result<(Option<String>, Vec<Vec<f32>>), EmbedError> {
        let mut request = self.client.post(&self.endpoint).json(&Request {
            model: &self.config.model,
            input: texts,
        });
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.map_err(|e| {
            EmbedError::Unavailable(format!("POST {}: {}", self.shown_endpoint, without_url(e)))
        })?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let message = format!(
                "POST {} returned {status}: {}",
                self.shown_endpoint,
                truncate(&body, 300)
            );
            return Err(
                if status.is_server_error() || status.as_u16() == 429 || status.as_u16() == 408 {
                    EmbedError::Unavailable(message)
                } else {
                    EmbedError::Rejected(message)
                },
            );
        }
        let parsed: Response = response.json().await.map_err(|e| {
            EmbedError::Rejected(format!(
                "POST {}: unreadable response: {}",
                self.shown_endpoint,
                without_url(e)
            ))
        })?;
        if parsed.data.len() != texts.len() {
            return Err(EmbedError::Rejected(format!(
                "asked for {} embeddings, got {}",
                texts.len(),
                parsed.data.len()
            )));
        }
        let mut ordered: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        for (position, item) in parsed.data.into_iter().enumerate() {
            let index = item.index.unwrap_or(position);
            let slot = ordered.get_mut(index).ok_or_else(|| {
                EmbedError::Rejected(format!("response index {index} out of range"))
            })?;
            if item.embedding.len() != self.config.dimension {
                return Err(EmbedError::Rejected(format!(
                    "model `{}` returned {}-dimensional vectors but EMBEDDING_DIM is {}",
                    parsed.model.as_deref().unwrap_or(&self.config.model),
                    item.embedding.len(),
                    self.config.dimension
                )));
            }
            let mut vector = item.embedding;
            l2_normalize(&mut vector)?;
            *slot = Some(vector);
        }
        let vectors = ordered
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                EmbedError::Rejected("response repeats an index and misses another".into())
            })?;
        Ok((parsed.model, vectors))
    }
}

#[async_trait]
impl Embedder for OpenAiEmbedder {
    fn model(&self) -> &str {
        &self.config.model
    }

    fn dimension(&self) -> usize {
        self.config.dimension
    }

    async fn embed(&self, texts: &[String]) -> Result<Embeddings, EmbedError> {
        let mut vectors = Vec::with_capacity(texts.len());
        let mut model = None;
        for batch in texts.chunks(self.config.batch_size.max(1)) {
            let (reported, batch_vectors) = self.embed_batch(batch).await?;
            model = model.or(reported);
            vectors.extend(batch_vectors);
        }
        Ok(Embeddings {
            model: model.unwrap_or_else(|| self.config.model.clone()),
            vectors,
        })
    }
}

/// The `/v1/embeddings` URL of a base URL; a query string (`?api-version=…`) stays at the end.
fn endpoint(url: &str) -> String {
    let (path, query) = match url.find('?') {
        Some(at) => url.split_at(at),
        None => (url, ""),
    };
    let base = path.trim_end_matches('/');
    let path = if base.ends_with("/embeddings") {
        base.to_owned()
    } else if base.ends_with("/v1") {
        format!("{base}/embeddings")
    } else {
        format!("{base}/v1/embeddings")
    };
    format!("{path}{query}")
}

/// The error and its causes, without the URL reqwest would print (it may carry credentials).
fn without_url(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((cut, _)) => &text[..cut],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_accepts_base_v1_and_full_urls() {
        assert_eq!(endpoint("http://tei:8080"), "http://tei:8080/v1/embeddings");
        assert_eq!(
            endpoint("https://api.openai.com/v1/"),
            "https://api.openai.com/v1/embeddings"
        );
        assert_eq!(endpoint("http://x/v1/embeddings"), "http://x/v1/embeddings");
        assert_eq!(
            endpoint("https://x/v1?api-key=k"),
            "https://x/v1/embeddings?api-key=k"
        );
    }

    #[test]
    fn debug_output_never_shows_the_api_key() {
        let config = OpenAiConfig {
            url: "http://x".into(),
            shown_url: "http://x".into(),
            api_key: Some("sk-very-secret".into()),
            model: "m".into(),
            dimension: 3,
            batch_size: 2,
            timeout: Duration::from_secs(1),
        };
        let shown = format!(
            "{config:?} {:?}",
            OpenAiEmbedder::new(config.clone()).unwrap()
        );
        assert!(!shown.contains("sk-very-secret"), "{shown}");
    }
}
