//! A Qdrant server over gRPC (`qdrant-client`), used when `QDRANT_URL` is set.
//!
//! Transport failures and the server's own trouble are [`StoreError::Unavailable`] (retry); a request the server
//! rejects as such (`InvalidArgument`, `FailedPrecondition`, a message over its size limit) is
//! [`StoreError::Invalid`] (dead letter): retrying it forever would stall its partition. A collection of the wrong
//! size is refused at open.

use async_trait::async_trait;
use qdrant_client::qdrant::{
    Condition, CountPointsBuilder, CreateCollectionBuilder, CreateFieldIndexCollectionBuilder,
    FieldType, Filter, HnswConfigDiffBuilder, PointStruct, SearchPointsBuilder,
    UpsertPointsBuilder, VectorParamsBuilder, point_id::PointIdOptions, vectors_config,
};
use qdrant_client::{Payload, Qdrant, QdrantError};
use serde_json::Value;

use crate::{
    CollectionInfo, CollectionSpec, Distance, ForeignPoints, Hit, KEYWORD_INDEXES, Point, Query,
    StoreError, VectorStore,
};

pub struct QdrantServerStore {
    spec: CollectionSpec,
    /// The URL as messages show it (credentials redacted by the caller).
    url: String,
    /// Credentials that must never appear in a message: the client's own errors quote the full URL.
    secrets: Secrets,
    client: Qdrant,
}

impl std::fmt::Debug for QdrantServerStore {
    // The client holds the API key: show only what is safe.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantServerStore")
            .field("spec", &self.spec)
            .field("url", &self.url)
            .finish()
    }
}

impl QdrantServerStore {
    /// Connects, creates the collection if missing, refuses a size or distance mismatch. `shown_url` is `url` as
    /// errors may print it (without credentials).
    pub async fn connect(
        url: &str,
        shown_url: &str,
        api_key: Option<&str>,
        spec: CollectionSpec,
    ) -> Result<Self, StoreError> {
        let client = Qdrant::from_url(url)
            .api_key(api_key.map(str::to_owned))
            .timeout(std::time::Duration::from_secs(30))
            .skip_compatibility_check()
            .build()
            .map_err(|e| classify(shown_url, &Secrets::of(url, api_key), e))?;
        let store = Self {
            spec,
            url: shown_url.to_owned(),
            secrets: Secrets::of(url, api_key),
            client,
        };
        store.ensure_collection().await?;
        Ok(store)
    }

    async fn ensure_collection(&self) -> Result<(), StoreError> {
        let name = &self.spec.name;
        let exists = self.call(self.client.collection_exists(name)).await?;
        if exists {
            let (dimension, distance) = self.vector_params().await?;
            if dimension != self.spec.dimension {
                return Err(StoreError::DimensionMismatch {
                    collection: name.clone(),
                    existing: dimension,
                    configured: self.spec.dimension,
                });
            }
            if distance != self.spec.distance {
                return Err(StoreError::DistanceMismatch {
                    collection: name.clone(),
                    existing: distance,
                    configured: self.spec.distance,
                });
            }
        } else {
            let vectors = VectorParamsBuilder::new(
                self.spec.dimension as u64,
                server_distance(self.spec.distance),
            )
            .on_disk(true);
            let create = CreateCollectionBuilder::new(name.clone())
                .vectors_config(vectors)
                .hnsw_config(
                    HnswConfigDiffBuilder::default()
                        .m(16)
                        .ef_construct(256)
                        .on_disk(true),
                )
                .on_disk_payload(true);
            if let Err(e) = self.client.create_collection(create).await {
                // Another process may have created it between our check and our create.
                if !self.client.collection_exists(name).await.unwrap_or(false) {
                    return Err(self.error(e));
                }
            }
        }
        for field in KEYWORD_INDEXES {
            // Idempotent on the server: creating an existing index is accepted.
            self.call(
                self.client.create_field_index(
                    CreateFieldIndexCollectionBuilder::new(name.clone(), field, FieldType::Keyword)
                        .wait(true),
                ),
            )
            .await?;
        }
        Ok(())
    }

    async fn vector_params(&self) -> Result<(usize, Distance), StoreError> {
        let info = self
            .call(self.client.collection_info(&self.spec.name))
            .await?;
        let config = info
            .result
            .and_then(|r| r.config)
            .and_then(|c| c.params)
            .and_then(|p| p.vectors_config)
            .and_then(|v| v.config);
        match config {
            Some(vectors_config::Config::Params(params)) => {
                Ok((params.size as usize, from_server_distance(params.distance)))
            }
            _ => Err(StoreError::Invalid(format!(
                "collection `{}` has no single unnamed dense vector (named vectors are not supported)",
                self.spec.name
            ))),
        }
    }

    fn error(&self, error: QdrantError) -> StoreError {
        classify(&self.url, &self.secrets, error)
    }

    /// Awaits one client call: its error classified, and scrubbed of secrets.
    async fn call<T>(
        &self,
        request: impl Future<Output = Result<T, QdrantError>>,
    ) -> Result<T, StoreError> {
        request.await.map_err(|e| self.error(e))
    }
}

/// The credential parts of a URL (user-info, every query value) and the API key, to scrub from messages: the client
/// prints the URL it failed to reach, normalised, so matching the URL as given would miss it.
struct Secrets(Vec<String>);

impl Secrets {
    fn of(url: &str, api_key: Option<&str>) -> Self {
        let mut secrets: Vec<String> = api_key.map(str::to_owned).into_iter().collect();
        let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if let Some((userinfo, _)) = authority.rsplit_once('@') {
            // `user:password` hides the password; a lone token is the secret itself.
            let secret = userinfo
                .split_once(':')
                .map_or(userinfo, |(_, password)| password);
            secrets.push(secret.to_owned());
        }
        if let Some((_, query)) = url.split_once('?') {
            let query = query.split('#').next().unwrap_or("");
            secrets.extend(
                query
                    .split('&')
                    .filter_map(|pair| pair.split_once('=').map(|(_, v)| v.to_owned())),
            );
        }
        // Short values (`x=1`) are not secrets, and masking them would garble every message.
        secrets.retain(|s| s.len() >= 4);
        Self(secrets)
    }

    fn scrub(&self, mut message: String) -> String {
        for secret in &self.0 {
            message = message.replace(secret.as_str(), "***");
        }
        message
    }
}

/// gRPC status codes (`tonic::Code` as i32) that reject the request itself: retrying the same request fails again.
const REQUEST_REJECTED: [i32; 4] = [
    3,  // InvalidArgument: a bad vector, payload or filter
    9,  // FailedPrecondition: e.g. writing to a collection in a state that refuses it
    11, // OutOfRange: a message over the server's (or client's) size limit
    12, // Unimplemented
];

/// Retry or dead-letter? Everything not known to be about the request (unreachable, timeouts, `Unavailable`,
/// rate limits, `Internal`, a missing collection or a refused API key, which an operator fixes for all events at
/// once) is worth retrying.
fn classify(url: &str, secrets: &Secrets, error: QdrantError) -> StoreError {
    let rejected = match &error {
        QdrantError::ResponseError { status } => {
            REQUEST_REJECTED.contains(&i32::from(status.code()))
        }
        QdrantError::ConversionError(_) | QdrantError::JsonToPayload(_) => true,
        _ => false,
    };
    let message = secrets.scrub(format!("Qdrant at {url}: {error}"));
    if rejected {
        StoreError::Invalid(message)
    } else {
        StoreError::Unavailable(message)
    }
}

fn server_distance(distance: Distance) -> qdrant_client::qdrant::Distance {
    match distance {
        Distance::Cosine => qdrant_client::qdrant::Distance::Cosine,
        Distance::Dot => qdrant_client::qdrant::Distance::Dot,
        Distance::Euclid => qdrant_client::qdrant::Distance::Euclid,
    }
}

fn from_server_distance(raw: i32) -> Distance {
    match qdrant_client::qdrant::Distance::try_from(raw) {
        Ok(qdrant_client::qdrant::Distance::Dot) => Distance::Dot,
        Ok(qdrant_client::qdrant::Distance::Euclid)
        | Ok(qdrant_client::qdrant::Distance::Manhattan) => Distance::Euclid,
        _ => Distance::Cosine,
    }
}

fn user_filter(user_id: Option<&str>) -> Option<Filter> {
    user_id.map(|user| Filter::must([Condition::matches("user_id", user.to_owned())]))
}

#[async_trait]
impl VectorStore for QdrantServerStore {
    fn collection(&self) -> &CollectionSpec {
        &self.spec
    }

    async fn write(&self, points: Vec<Point>) -> Result<(), StoreError> {
        let points: Vec<PointStruct> = points
            .into_iter()
            .map(|p| {
                let payload = Payload::from(p.payload);
                PointStruct::new(p.id.to_string(), p.vector, payload)
            })
            .collect();
        self.call(
            self.client
                .upsert_points(UpsertPointsBuilder::new(self.spec.name.clone(), points).wait(true)),
        )
        .await?;
        Ok(())
    }

    async fn search(&self, query: Query<'_>) -> Result<Vec<Hit>, StoreError> {
        let mut request =
            SearchPointsBuilder::new(self.spec.name.clone(), query.vector, query.limit as u64)
                .with_payload(true);
        if let Some(filter) = user_filter(query.user_id) {
            request = request.filter(filter);
        }
        let response = self.call(self.client.search_points(request)).await?;
        Ok(response
            .result
            .into_iter()
            .map(|p| {
                let id = match p.id.and_then(|id| id.point_id_options) {
                    Some(PointIdOptions::Uuid(u)) => u,
                    Some(PointIdOptions::Num(n)) => n.to_string(),
                    None => String::new(),
                };
                let payload = match Value::from(Payload::from(p.payload)) {
                    Value::Object(map) => map,
                    _ => Default::default(),
                };
                Hit {
                    id,
                    score: p.score,
                    payload,
                }
            })
            .collect())
    }

    async fn count(&self, user_id: Option<&str>) -> Result<u64, StoreError> {
        let mut request = CountPointsBuilder::new(self.spec.name.clone()).exact(true);
        if let Some(filter) = user_filter(user_id) {
            request = request.filter(filter);
        }
        let response = self.call(self.client.count(request)).await?;
        Ok(response.result.map(|r| r.count).unwrap_or(0))
    }

    async fn foreign_points(&self, models: &[String]) -> Result<Option<ForeignPoints>, StoreError> {
        let filter = Filter::must_not(
            models
                .iter()
                .map(|m| Condition::matches("embedding_model", m.clone())),
        );
        let response = self
            .call(
                self.client.count(
                    CountPointsBuilder::new(self.spec.name.clone())
                        .exact(true)
                        .filter(filter.clone()),
                ),
            )
            .await?;
        let points = response.result.map(|r| r.count).unwrap_or(0);
        if points == 0 {
            return Ok(None);
        }
        let sample = self
            .call(
                self.client.search_points(
                    SearchPointsBuilder::new(
                        self.spec.name.clone(),
                        crate::any_direction(self.spec.dimension),
                        1,
                    )
                    .with_payload(true)
                    .filter(filter),
                ),
            )
            .await?;
        let payload = sample.result.into_iter().next().and_then(|p| {
            match Value::from(Payload::from(p.payload)) {
                Value::Object(map) => Some(map),
                _ => None,
            }
        });
        Ok(Some(ForeignPoints::from_payload(points, payload.as_ref())))
    }

    async fn info(&self) -> Result<CollectionInfo, StoreError> {
        let (dimension, distance) = self.vector_params().await?;
        Ok(CollectionInfo {
            name: self.spec.name.clone(),
            points: self.count(None).await?,
            dimension,
            distance,
            engine: "server",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn response(code: Code) -> QdrantError {
        QdrantError::ResponseError {
            status: Status::new(code, "server said no"),
        }
    }

    #[test]
    fn a_rejected_request_is_permanent_and_a_struggling_server_is_transient() {
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::OutOfRange,
        ] {
            let error = classify("http://q:6334", &Secrets(Vec::new()), response(code));
            assert!(!error.is_transient(), "{code:?}: {error}");
        }
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
            Code::ResourceExhausted,
            Code::NotFound,
            Code::Unauthenticated,
        ] {
            let error = classify("http://q:6334", &Secrets(Vec::new()), response(code));
            assert!(error.is_transient(), "{code:?}: {error}");
        }
        let error = classify(
            "http://q:6334",
            &Secrets(Vec::new()),
            QdrantError::ConversionError("sparse".into()),
        );
        assert!(!error.is_transient());
    }

    #[test]
    fn messages_never_carry_the_urls_credentials_or_the_api_key() {
        let secrets = Secrets::of(
            "https://admin:pass-word@q:6334?api-key=query-key&x=1",
            Some("header-key"),
        );
        let status = Status::new(
            Code::Unavailable,
            "Failed to connect to https://admin:pass-word@q:6334/?api-key=query-key&x=1 (header-key)",
        );
        let error = classify(
            "https://admin:***@q:6334?api-key=***&x=1",
            &secrets,
            QdrantError::ResponseError { status },
        )
        .to_string();
        for secret in ["pass-word", "query-key", "header-key"] {
            assert!(!error.contains(secret), "{secret} in {error}");
        }
        assert!(error.contains("x=1"), "{error}");
    }
}
