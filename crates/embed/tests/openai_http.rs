//! The OpenAI-compatible embedder against a real HTTP server on 127.0.0.1 that behaves like TEI/OpenAI.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aura_embed::{EmbedError, Embedder, OpenAiConfig, OpenAiEmbedder};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{Value, json};

#[derive(Clone)]
struct Server {
    dimension: usize,
    status: StatusCode,
    requests: Arc<AtomicUsize>,
    reverse: bool,
}

async fn embeddings(
    State(server): State<Server>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    server.requests.fetch_add(1, Ordering::SeqCst);
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer test-key") {
        return (StatusCode::UNAUTHORIZED, Json(json!({"error": "bad key"})));
    }
    if server.status != StatusCode::OK {
        return (server.status, Json(json!({"error": "nope"})));
    }
    let inputs = body["input"].as_array().cloned().unwrap_or_default();
    let mut data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let len = text.as_str().unwrap_or("").len() as f32;
            let mut v = vec![0.0f32; server.dimension];
            v[0] = len;
            v[1 % server.dimension] += 1.0;
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    if server.reverse {
        data.reverse();
    }
    (
        StatusCode::OK,
        Json(json!({"object": "list", "model": "served-model-v2", "data": data})),
    )
}

async fn start(server: Server) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new()
        .route("/v1/embeddings", post(embeddings))
        .with_state(server);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn config(url: String, dimension: usize) -> OpenAiConfig {
    OpenAiConfig {
        shown_url: url.clone(),
        url,
        api_key: Some("test-key".into()),
        model: "configured-model".into(),
        dimension,
        batch_size: 2,
        timeout: Duration::from_secs(5),
    }
}

fn server(dimension: usize, status: StatusCode, reverse: bool) -> Server {
    Server {
        dimension,
        status,
        requests: Arc::new(AtomicUsize::new(0)),
        reverse,
    }
}

#[tokio::test]
async fn batches_requests_keeps_input_order_normalises_and_reports_the_served_model() {
    let srv = server(4, StatusCode::OK, true);
    let requests = srv.requests.clone();
    let embedder = OpenAiEmbedder::new(config(start(srv).await, 4)).unwrap();
    let texts: Vec<String> = ["a", "bbb", "cc", "dddddd", "e"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out = embedder.embed(&texts).await.unwrap();
    assert_eq!(
        requests.load(Ordering::SeqCst),
        3,
        "5 texts in batches of 2"
    );
    assert_eq!(out.model, "served-model-v2");
    assert_eq!(out.vectors.len(), 5);
    for (text, vector) in texts.iter().zip(&out.vectors) {
        let norm: f32 = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5);
        let expected_ratio = text.len() as f32; // v[0] / v[1] == len / 1
        assert!(
            (vector[0] / vector[1] - expected_ratio).abs() < 1e-4,
            "{text}: {vector:?}"
        );
    }
}

#[tokio::test]
async fn a_dimension_the_provider_does_not_return_is_an_error() {
    let embedder =
        OpenAiEmbedder::new(config(start(server(8, StatusCode::OK, false)).await, 4)).unwrap();
    let err = embedder.embed(&["hello".into()]).await.unwrap_err();
    assert!(
        matches!(&err, EmbedError::Rejected(m) if m.contains("8-dimensional") && m.contains("EMBEDDING_DIM is 4")),
        "{err}"
    );
}

#[tokio::test]
async fn server_errors_are_transient_and_client_errors_are_not() {
    let unavailable = OpenAiEmbedder::new(config(
        start(server(4, StatusCode::SERVICE_UNAVAILABLE, false)).await,
        4,
    ))
    .unwrap();
    assert!(
        unavailable
            .embed(&["x".into()])
            .await
            .unwrap_err()
            .is_transient()
    );

    let mut bad_key = config(start(server(4, StatusCode::OK, false)).await, 4);
    bad_key.api_key = Some("wrong".into());
    let err = OpenAiEmbedder::new(bad_key)
        .unwrap()
        .embed(&["x".into()])
        .await
        .unwrap_err();
    assert!(!err.is_transient(), "{err}");
    assert!(err.to_string().contains("401"), "{err}");
}

#[tokio::test]
async fn an_unreachable_endpoint_is_transient() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = OpenAiEmbedder::new(config(url, 4))
        .unwrap()
        .embed(&["x".into()])
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
}
