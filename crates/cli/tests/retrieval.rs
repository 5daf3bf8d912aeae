//! Retrieval quality: does `search` find a note from a query that shares none of its content words?
//!
//! One user records 16 notes on distinct topics through the whole chain (mood event → aggregation → embedding →
//! point). Each query paraphrases one note with no content word in common (stop words like "a", "my", "the" may
//! repeat). Top-1 must be the paraphrased note for at least 75% of queries with `local`; the same set with `hash`
//! (lexical n-grams) lands near chance (1/16), which shows the set really has no lexical shortcut.
//! The accuracies are printed (`cargo test -p aura-cli --test retrieval -- --nocapture`) and quoted in docs/embeddings.md.

use std::collections::HashMap;
use std::path::Path;

use aura_cli::pipeline::{self, PipelineOptions};
use aura_cli::{ModelCheck, configured_registry, wired};
use aura_runtime::Settings;
use aura_runtime::store::{Durability, Query};

const USER: &str = "user-quality";

/// (note, query): the query paraphrases its note.
const CASES: [(&str, &str); 16] = [
    (
        "Deadline pressure at work, the report is due tomorrow",
        "stressed about finishing a project for my boss on time",
    ),
    (
        "Argued with my sister over dinner",
        "family fight during an evening meal",
    ),
    (
        "Ran ten kilometers before breakfast",
        "long jog early in the morning",
    ),
    (
        "Could not fall asleep until 3am",
        "insomnia kept me up most of the night",
    ),
    ("Adopted a puppy from the shelter", "brought home a new dog"),
    (
        "Lost my wallet on the bus",
        "misplaced purse during commute",
    ),
    (
        "Got promoted to team lead today",
        "career advancement, new managerial role",
    ),
    (
        "Headache and fever all afternoon",
        "feeling sick with a high temperature",
    ),
    (
        "Cooked lasagna for friends",
        "made Italian pasta as dinner for guests",
    ),
    (
        "Paid off my credit card debt",
        "finally free of money owed to the bank",
    ),
    (
        "Missing my grandmother who passed away last year",
        "grieving a relative's death",
    ),
    (
        "Rainy day, stayed inside reading a novel",
        "wet weather so I spent hours with a book indoors",
    ),
    (
        "Flight delayed six hours at the airport",
        "travel plans ruined by a late plane",
    ),
    (
        "Meditated for twenty minutes, felt calm",
        "mindfulness session left me peaceful",
    ),
    (
        "Failed my driving test again",
        "did not pass the road exam to get a license",
    ),
    (
        "Planted tomatoes and basil in the garden",
        "growing vegetables and herbs in the backyard",
    ),
];

/// Words a paraphrase may share with its note: they carry no topic.
const STOP_WORDS: [&str; 16] = [
    "a", "an", "and", "the", "my", "me", "i", "in", "on", "for", "to", "of", "at", "with", "so",
    "as",
];

fn words(text: &str) -> Vec<String> {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty() && !STOP_WORDS.contains(w))
        .map(str::to_owned)
        .collect()
}

fn events() -> String {
    CASES
        .iter()
        .enumerate()
        .map(|(i, (note, _))| {
            format!(
                r#"{{"event_id":"00000000-0000-4000-8000-{i:012}","event_type":"user.mood.created","timestamp":"2025-03-{day:02}T10:00:00","user_id":"{USER}","metadata":{{}},"data":{{"mood_score":5,"tags":[],"notes":"{note}"}}}}"#,
                day = i + 1
            ) + "\n"
        })
        .collect()
}

fn settings(dir: &Path, provider: &str, precision: &str) -> Settings {
    let mut env: HashMap<String, String> = [
        ("EMBEDDING_PROVIDER", provider),
        ("EMBEDDING_PRECISION", precision),
        ("QDRANT_PATH", dir.join("qdrant").to_str().unwrap()),
        ("EMBEDDING_THREADS", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    if let Some(root) = std::env::var_os("EMBEDDING_MODEL_DIR") {
        env.insert(
            "EMBEDDING_MODEL_DIR".into(),
            root.to_string_lossy().into_owned(),
        );
    }
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    Settings::from_sources(&config, &env).unwrap()
}

/// Top-1 accuracy of `provider` (the local model in `precision`) on [`CASES`], through the pipeline and the store's
/// search.
async fn top1_accuracy(provider: &str, precision: &str) -> (f64, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), provider, precision);
    let wired = wired(&settings, Durability::OnFlush, ModelCheck::Refuse)
        .await
        .unwrap();
    let ctx = wired.context;
    let summary = pipeline::run(
        std::io::Cursor::new(events()),
        configured_registry(&settings).unwrap(),
        ctx.clone(),
        &PipelineOptions::default(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(summary.points_written, CASES.len() as u64, "{summary:?}");
    let mut right = 0;
    let mut misses = Vec::new();
    for (note, query) in CASES {
        let vector = ctx
            .embedder
            .embed(&[query.to_owned()])
            .await
            .unwrap()
            .vectors
            .remove(0);
        let hits = ctx
            .store
            .search(Query::nearest(vector, 1).of_user(USER))
            .await
            .unwrap();
        let top = hits[0].payload["text"].as_str().unwrap().to_owned();
        if top.ends_with(&format!("Notes: {note}")) {
            right += 1;
        } else {
            misses.push(format!("{query:?} → {top:?}"));
        }
    }
    (right as f64 / CASES.len() as f64, misses)
}

#[test]
fn every_query_shares_no_content_word_with_its_note() {
    for (note, query) in CASES {
        let note_words = words(note);
        let shared: Vec<String> = words(query)
            .into_iter()
            .filter(|w| note_words.contains(w))
            .collect();
        assert!(
            shared.is_empty(),
            "{query:?} shares {shared:?} with {note:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
async fn the_local_model_finds_paraphrased_notes_and_hashing_does_not() {
    let (local, local_misses) = top1_accuracy("local", "auto").await;
    let (hash, _) = top1_accuracy("hash", "auto").await;
    eprintln!(
        "retrieval top-1 over {} paraphrased queries: local {:.0}%, hash {:.0}% (chance {:.0}%)",
        CASES.len(),
        local * 100.0,
        hash * 100.0,
        100.0 / CASES.len() as f64
    );
    for miss in &local_misses {
        eprintln!("  local miss: {miss}");
    }
    assert!(local >= 0.75, "local top-1 {local}: {local_misses:#?}");
    // Chance is 1/16; allow two lucky hits of stop-word overlap.
    assert!(
        hash <= 3.0 / 16.0,
        "hash top-1 {hash}: the set has a lexical shortcut"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
async fn the_bf16_model_retrieves_exactly_what_the_f32_model_retrieves() {
    if !aura_runtime::embed::Precision::fastest().eq(&aura_runtime::embed::Precision::Bf16) {
        eprintln!(
            "this CPU has no AVX-512 BF16: EMBEDDING_PRECISION=auto is f32 here, nothing to compare"
        );
        return;
    }
    let (f32_top1, f32_misses) = top1_accuracy("local", "f32").await;
    let (bf16_top1, bf16_misses) = top1_accuracy("local", "bf16").await;
    eprintln!(
        "retrieval top-1: f32 {:.0}%, bf16 {:.0}%",
        f32_top1 * 100.0,
        bf16_top1 * 100.0
    );
    assert_eq!(
        bf16_misses, f32_misses,
        "the same queries miss, with the same wrong answers"
    );
    assert_eq!(bf16_top1, f32_top1);
}
