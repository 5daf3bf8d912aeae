//! The whole chain — mood_created → context_aggregated → ingest_vectors — on the in-memory bus, into a real
//! embedded Qdrant collection.

use std::sync::atomic::Ordering;

use aura_cli::standard_registry;
use aura_integration_tests::{mood_event, quick_retry, run_chain, run_standard_chain, with_data};
use aura_runtime::events::limits::{Limits, POINT_PAYLOAD_BYTES, SUMMARY_STRING_CHARS};
use aura_runtime::store::{Query, VectorStore};
use aura_runtime::testing::{FlakyStore, context_with, embedded};
use handler_ingest_vectors::point_id;
use serde_json::json;

#[tokio::test]
async fn one_mood_event_becomes_exactly_the_expected_points() {
    let fixture = embedded();
    // 1 200 characters of notes: two chunks (0..900 and 750..end), so two points.
    let notes = "slept badly, worried about the quarterly review at work. ".repeat(21);
    let event = mood_event("alice", 4, notes.trim());
    let origin = event.event_id.to_string();
    let report = run_standard_chain(fixture.ctx.clone(), vec![event]).await;

    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);
    assert_eq!(report.handled_by_type.get("user.mood.created"), Some(&1));
    assert_eq!(report.handled_by_type.get("context.aggregated"), Some(&1));
    assert_eq!(report.handled_by_type.get("context.vectorized"), Some(&1));
    assert_eq!(fixture.store.count(None).await.unwrap(), 2);

    let text = format!(
        "User: alice | Mood Score: 4/10 | Mood Tags: calm, focused | Notes: {}",
        notes.trim()
    );
    let hits = nearest(
        &fixture.ctx,
        &text.chars().take(900).collect::<String>(),
        "alice",
        10,
    )
    .await;
    assert_eq!(hits.len(), 2);
    let first = &hits[0];
    assert_eq!(first.id, point_id(&origin, 0).to_string());
    assert!(
        (first.score - 1.0).abs() < 1e-4,
        "the stored vector is the embedding of chunk 0: {}",
        first.score
    );
    assert_eq!(hits[1].id, point_id(&origin, 1).to_string());

    let p = &first.payload;
    assert_eq!(p["user_id"], "alice");
    assert_eq!(p["doc_id"], origin.as_str());
    assert_eq!(p["origin_event_id"], origin.as_str());
    assert_eq!(p["chunk_index"], 0);
    assert_eq!(p["text"], text.chars().take(900).collect::<String>());
    assert_eq!(
        hits[1].payload["text"],
        text.chars().skip(750).collect::<String>()
    );
    assert_eq!(p["trace_id"], "trace-alice");
    assert_eq!(p["source_type"], "user_context");
    assert_eq!(p["snapshot_type"], "incremental");
    assert_eq!(p["timeframe"], "recent");
    assert_eq!(p["embedding_model"], "hash-ngram-v1");
    assert_eq!(p["version"], "test-v1");
    // The text is embedded whole; the summary's copy of the notes is a bounded preview.
    let preview: String = notes.trim().chars().take(SUMMARY_STRING_CHARS).collect();
    assert_eq!(
        p["mood_summary"],
        json!({"recent_score": 4.0, "tags": ["calm", "focused"], "notes": preview})
    );
    assert_eq!(p["truncated"], false);
    assert_eq!(p["summaries_truncated"], true);
    assert_eq!(p["source_event"]["event_type"], "user.mood.created");
    assert!(p["aggregated_event_id"].is_string() && p["vectorized_event_id"].is_string());
}

#[tokio::test]
async fn redelivering_the_same_events_overwrites_instead_of_duplicating() {
    let fixture = embedded();
    let events: Vec<_> = (0..20)
        .map(|i| mood_event(&format!("user-{}", i % 4), i % 10, "a short note"))
        .collect();
    run_standard_chain(fixture.ctx.clone(), events.clone()).await;
    run_standard_chain(fixture.ctx.clone(), events).await;
    assert_eq!(fixture.store.count(None).await.unwrap(), 20);
    assert_eq!(fixture.store.count(Some("user-1")).await.unwrap(), 5);
}

#[tokio::test]
async fn a_store_outage_is_retried_and_the_chain_completes() {
    let fixture = embedded();
    let flaky = FlakyStore::new(fixture.store.clone(), 2);
    let report = run_chain(
        standard_registry(),
        context_with(flaky.store.clone()),
        vec![mood_event("bob", 7, "ok")],
        quick_retry(5),
    )
    .await;
    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);
    assert_eq!(flaky.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(fixture.store.count(Some("bob")).await.unwrap(), 1);
}

#[tokio::test]
async fn a_store_that_stays_down_dead_letters_the_event_with_the_error() {
    let fixture = embedded();
    let flaky = FlakyStore::new(fixture.store.clone(), u32::MAX);
    let report = run_standard_chain(
        context_with(flaky.store.clone()),
        vec![mood_event("bob", 7, "ok")],
    )
    .await;
    assert_eq!(report.dead_letters.len(), 1);
    let letter = &report.dead_letters[0];
    assert_eq!(letter.handler.as_deref(), Some("ingest_vectors"));
    assert_eq!(letter.event_type.as_deref(), Some("context.vectorized"));
    assert!(
        letter.error.contains("transient") && letter.error.contains("connection refused"),
        "{}",
        letter.error
    );
    assert_eq!(flaky.attempts.load(Ordering::SeqCst), 3);
    assert_eq!(fixture.store.count(None).await.unwrap(), 0);
}

#[tokio::test]
async fn permanent_errors_are_dead_lettered_at_once_and_good_events_still_flow() {
    let fixture = embedded();
    let inputs = vec![
        with_data("user.mood.created", None, json!({"mood_score": 5})),
        with_data(
            "user.mood.created",
            Some("carol"),
            json!({"mood_score": [5]}),
        ),
        with_data(
            "user.activity.created",
            Some("carol"),
            json!({"activity_type": "yoga", "duration": 30}),
        ),
        mood_event("carol", 8, "fine"),
    ];
    let report = run_chain(
        standard_registry(),
        fixture.ctx.clone(),
        inputs,
        quick_retry(5),
    )
    .await;
    let permanent = |l: &&aura_runtime::DeadLetter| {
        l.handler.as_deref() == Some("mood_created") && l.error.starts_with("permanent")
    };
    assert_eq!(
        report.dead_letters.iter().filter(permanent).count(),
        2,
        "{:?}",
        report.dead_letters
    );
    assert_eq!(report.dead_letters.len(), 2);
    assert_eq!(fixture.store.count(Some("carol")).await.unwrap(), 2);
}

#[tokio::test]
async fn disabled_handlers_keep_their_events() {
    let fixture = embedded();
    let mut registry = standard_registry();
    registry.disable(&["context_aggregated"]).unwrap();
    let report = run_chain(
        registry,
        fixture.ctx.clone(),
        vec![mood_event("dave", 3, "x"), mood_event("dave", 4, "y")],
        quick_retry(3),
    )
    .await;
    assert_eq!(report.parked.len(), 2);
    assert!(
        report
            .parked
            .iter()
            .all(|e| e.event_type == "context.aggregated")
    );
    assert_eq!(fixture.store.count(None).await.unwrap(), 0);
}

#[tokio::test]
async fn a_megabyte_journal_entry_becomes_bounded_points_and_its_beginning_is_searchable() {
    let fixture = embedded();
    let limits = fixture.ctx.limits;
    // Five 1 MB notes once took 21.8 GB: each chunk's payload carried the whole note again.
    let notes = "Long day. Wrote pages about the move, the new job and my sister. ".repeat(16_000);
    let tags: Vec<String> = (0..20_000).map(|i| format!("tag-{i}")).collect();
    let mut event = mood_event("journal", 6, &notes);
    event.set_field(
        "data",
        json!({"mood_score": 6, "tags": tags, "notes": notes, "created_at": "2025-03-01T08:00:00"}),
    );
    let origin = event.event_id.to_string();
    let report = run_standard_chain(fixture.ctx.clone(), vec![event]).await;
    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);
    let points = fixture.store.count(Some("journal")).await.unwrap();
    assert_eq!(points, limits.max_chunks as u64);

    let text = "User: journal | Mood Score: 6/10 | Mood Tags: tag-0, tag-1";
    let hits = nearest(&fixture.ctx, text, "journal", 100).await;
    assert_eq!(hits.len() as u64, points);
    assert_eq!(hits[0].id, point_id(&origin, 0).to_string());
    for hit in &hits {
        let payload = serde_json::to_vec(&hit.payload).unwrap();
        assert!(
            payload.len() <= POINT_PAYLOAD_BYTES,
            "point payload is {} bytes",
            payload.len()
        );
        assert_eq!(hit.payload["truncated"], true);
        assert!(hit.payload["source_text_chars"].as_u64().unwrap() > 1_000_000);
        assert_eq!(hit.payload["summaries_truncated"], true);
        assert_eq!(
            hit.payload["mood_summary"]["notes"]
                .as_str()
                .unwrap()
                .chars()
                .count(),
            SUMMARY_STRING_CHARS
        );
        assert!(hit.payload["text"].as_str().unwrap().chars().count() <= 900);
    }
}

#[tokio::test]
async fn two_events_claiming_the_same_origin_keep_their_own_points() {
    let fixture = embedded();
    // A producer that copies metadata between events (or forges it) must not make them overwrite each other.
    let mut events = vec![
        mood_event("alice", 3, "first entry"),
        mood_event("bob", 8, "second entry"),
    ];
    for event in &mut events {
        event
            .metadata
            .insert("origin_event_id".into(), json!("same-origin"));
        event
            .metadata
            .insert("causation_id".into(), json!("forged-cause"));
    }
    let ids: Vec<String> = events.iter().map(|e| e.event_id.to_string()).collect();
    let report = run_standard_chain(fixture.ctx.clone(), events).await;
    assert!(report.dead_letters.is_empty(), "{:?}", report.dead_letters);
    assert_eq!(fixture.store.count(Some("alice")).await.unwrap(), 1);
    assert_eq!(fixture.store.count(Some("bob")).await.unwrap(), 1);
    let hits = fixture
        .store
        .search(Query::nearest(vec![1.0; aura_runtime::testing::TEST_DIM], 1).of_user("bob"))
        .await
        .unwrap();
    assert_eq!(hits[0].id, point_id(&ids[1], 0).to_string());
    assert_eq!(hits[0].payload["origin_event_id"], ids[1].as_str());
}

#[tokio::test]
async fn a_produced_event_over_max_event_bytes_is_dead_lettered_with_the_setting_named() {
    let fixture = embedded();
    let mut ctx = fixture.ctx.clone();
    // Room for the mood event, not for the 40 chunks with their vectors it leads to.
    ctx.limits = Limits {
        max_event_bytes: 60_000,
        ..Limits::default()
    };
    let notes = "a long entry about a long week ".repeat(1_000);
    let report = run_standard_chain(ctx, vec![mood_event("carol", 5, &notes)]).await;
    assert_eq!(report.dead_letters.len(), 1, "{:?}", report.dead_letters);
    let letter = &report.dead_letters[0];
    assert_eq!(letter.handler.as_deref(), Some("context_aggregated"));
    assert!(
        letter.error.contains("MAX_EVENT_BYTES=60000")
            && letter.error.contains("context.vectorized"),
        "{}",
        letter.error
    );
    assert_eq!(fixture.store.count(None).await.unwrap(), 0);
}

/// `user`'s `limit` points nearest to `text`, embedded by the context's embedder.
async fn nearest(
    ctx: &aura_runtime::HandlerContext,
    text: &str,
    user: &str,
    limit: usize,
) -> Vec<aura_runtime::store::Hit> {
    let query = ctx.embedder.embed(&[text.to_owned()]).await.unwrap();
    let vector = query.vectors[0].clone();
    ctx.store
        .search(Query::nearest(vector, limit).of_user(user))
        .await
        .unwrap()
}
