//! Property tests: every decoder and writer that touches untrusted input, fed generated and hostile input.
//!
//! They run in `cargo test` (a bounded number of cases each; `PROPTEST_CASES=N` for a longer run) and cover the event
//! decoder and timestamp parser, the limits (summaries, snapshots, point payloads), chunking at arbitrary Unicode
//! boundaries, the Celery envelope/body parser and the Python-exact JSON writer, and Kafka record decoding. Each
//! property states what must hold: no panic, a bound kept, a round trip exact. The corpus in `tests/corpus/` holds
//! the shapes seen in the wild (both mood shapes, Django's, Python's `NaN`/`Infinity`, lone surrogates, deep
//! nesting, a line cut short, invalid UTF-8); the megabyte-sized cases are generated here.

use std::path::Path;

use aura_celery::protocol::TaskMessage;
use aura_celery::pyjson;
use aura_kafka::consumer::{Decoded, decode};
use aura_runtime::Registry;
use aura_runtime::events::limits::{
    LABEL_CHARS, Limits, POINT_PAYLOAD_BYTES, SUMMARIES_BYTES, bound_json, truncate_chars,
};
use aura_runtime::events::payload::ContextSnapshot;
use aura_runtime::events::{Event, Timestamp};
use handler_context_aggregated::{ContextAggregated, chunk};
use handler_ingest_vectors::{IngestVectors, points};
use handler_mood_created::{MoodCreated, aggregate};
use proptest::prelude::*;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use serde_json::{Map, Value, json};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        any::<String>().prop_map(Value::String),
        // Long strings: the size limits must hold for them.
        (any::<char>(), 0usize..20_000).prop_map(|(c, n)| Value::String(c.to_string().repeat(n))),
    ];
    leaf.prop_recursive(8, 256, 10, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..10).prop_map(Value::Array),
            prop::collection::vec((any::<String>(), inner), 0..10)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect())),
        ]
    })
}

/// An event envelope around arbitrary per-type fields.
fn event_json() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("user.mood.created"),
            Just("user.activity.created"),
            Just("context.aggregated"),
            Just("context.vectorized"),
            Just("something.else"),
        ],
        prop_oneof![
            Just(Value::Null),
            any::<String>().prop_map(Value::String),
            any::<i64>().prop_map(Value::from)
        ],
        json_value(),
        json_value(),
    )
        .prop_map(|(event_type, user_id, data, metadata)| {
            json!({
                "event_id": "5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10",
                "event_type": event_type,
                "timestamp": "2025-03-01T12:30:45",
                "user_id": user_id,
                "metadata": metadata,
                "data": data,
                "context_data": {"user_id": "u", "text_representation": "t", "mood_summary": data},
            })
        })
}

fn mood_with(notes: String, tags: Vec<String>, score: Value) -> Event {
    let mut event = Event::new("user.mood.created", Some("u1".into()), Some("t".into()));
    event.set_field(
        "data",
        json!({"mood_score": score, "tags": tags, "notes": notes}),
    );
    event
}

fn size(value: &impl serde::Serialize) -> usize {
    serde_json::to_vec(value).map(|v| v.len()).unwrap_or(0)
}

proptest! {
    // 256 cases each by default; `PROPTEST_CASES=N` for a longer run. Failures are printed, not written to files.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_event_decoder_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Event::from_slice(&bytes);
    }

    #[test]
    fn a_decoded_event_re_encodes_to_itself(value in event_json()) {
        if let Ok(event) = Event::from_value(value) {
            let again = Event::from_slice(&event.to_vec()).expect("our own output decodes");
            prop_assert_eq!(again, event);
        }
    }

    #[test]
    fn timestamps_parse_or_are_refused_and_a_parsed_one_round_trips(text in any::<String>()) {
        if let Ok(timestamp) = Timestamp::parse(&text) {
            let again = Timestamp::parse(timestamp.as_str()).expect("a parsed timestamp parses again");
            prop_assert_eq!(again.epoch_seconds(), timestamp.epoch_seconds());
        }
    }

    #[test]
    fn timestamps_shaped_like_iso_never_panic(
        y in 0i32..300_000, mo in 0u32..14, d in 0u32..33, h in 0u32..26, mi in 0u32..62, s in 0u32..62,
        frac in prop::option::of("[0-9]{1,12}"), zone in prop_oneof![Just(String::new()), Just("Z".to_owned()), "[+-][0-9]{2}:[0-9]{2}"],
    ) {
        let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
        let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{frac}{zone}");
        if let Ok(timestamp) = Timestamp::parse(&text) {
            let _ = timestamp.epoch_seconds();
        }
    }

    #[test]
    fn chunks_cover_the_text_at_any_unicode_boundary(
        text in any::<String>(), repeat in 1usize..200, size in 1usize..1000, overlap in 0usize..1000,
    ) {
        let text = text.repeat(repeat);
        let chunks = chunk(&text, size, overlap);
        let step = size.saturating_sub(overlap).max(1);
        prop_assert!(!chunks.is_empty());
        prop_assert!(chunks.iter().all(|c| c.chars().count() <= size));
        // Every chunk is the text's window at its start, so the chunks put back together are the text.
        let chars: Vec<char> = text.chars().collect();
        for (i, c) in chunks.iter().enumerate() {
            let start = i * step;
            let expected: String = chars[start..(start + size).min(chars.len())].iter().collect();
            prop_assert_eq!(c, &expected);
        }
        let last_start = (chunks.len() - 1) * step;
        prop_assert_eq!(last_start + chunks.last().map_or(0, |c| c.chars().count()), chars.len());
    }

    #[test]
    fn a_bounded_summary_fits_its_budget(value in json_value(), budget in 0usize..20_000) {
        let (bounded, cut) = bound_json(&value, budget);
        prop_assert!(size(&bounded) <= budget.max(4), "{} > {budget}", size(&bounded));
        if !cut {
            prop_assert_eq!(bounded, value);
        }
    }

    #[test]
    fn a_mood_snapshot_is_bounded_whatever_its_notes_and_tags(
        notes in any::<String>(), notes_repeat in 0usize..3000, tags in prop::collection::vec(any::<String>(), 0..300),
        tag_repeat in 0usize..100, score in prop_oneof![Just(json!(7)), Just(json!("4.5")), Just(json!(null)), Just(json!("x"))],
    ) {
        let limits = Limits { max_embed_chars: 2_000, ..Limits::default() };
        let tags: Vec<String> = tags.iter().cycle().take(tags.len() * tag_repeat).cloned().collect();
        let event = mood_with(notes.repeat(notes_repeat), tags, score);
        if let Ok(snapshot) = aggregate(&event) {
            let original = snapshot.text_representation.chars().count();
            let bounded = snapshot.bounded(&limits);
            prop_assert!(bounded.text_representation.chars().count() <= limits.max_embed_chars);
            prop_assert_eq!(bounded.truncated || original <= limits.max_embed_chars, true);
            prop_assert!(size(&bounded.to_value()) <= 6 * limits.max_embed_chars + SUMMARIES_BYTES + 8 * 6 * LABEL_CHARS);
            let again = bounded.clone().bounded(&limits);
            prop_assert_eq!(again, bounded, "bounding twice changes nothing");
        }
    }

    #[test]
    fn every_point_payload_stays_under_its_bound(
        context in json_value(), text in any::<String>(), repeat in 0usize..400,
        chunks in 1usize..60, trace in any::<String>(), trace_repeat in 0usize..200,
    ) {
        let mut context_data = match context {
            Value::Object(map) => map,
            other => Map::from_iter([("ikigai_summary".to_owned(), other)]),
        };
        context_data.insert("user_id".into(), json!("u1"));
        context_data.insert("text_representation".into(), json!(text.repeat(repeat.max(1))));
        let mut event = Event::new("context.vectorized", Some("u1".into()), Some(trace.repeat(trace_repeat)));
        event.metadata.insert("causation_id".into(), json!("agg"));
        event.metadata.insert("origin_event_id".into(), json!(text.repeat(repeat)));
        event.set_field("context_data", Value::Object(context_data));
        event.set_field("chunks", json!(vec![text.repeat(repeat); chunks]));
        event.set_field("vectors", json!(vec![vec![0.5f32; 4]; chunks]));
        event.set_field("embedding_model", json!(text.repeat(repeat)));
        event.set_field("embedding_version", json!("v1"));
        let limits = Limits::default();
        if let Ok(points) = points(&event, &limits) {
            prop_assert!(points.len() <= limits.max_chunks);
            for point in &points {
                let bytes = size(&point.payload);
                prop_assert!(bytes <= POINT_PAYLOAD_BYTES, "payload of {bytes} bytes");
            }
        }
    }

    #[test]
    fn the_celery_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = TaskMessage::parse(&bytes);
    }

    #[test]
    fn the_celery_parser_never_panics_on_any_header_or_body_values(
        headers in prop::collection::vec((prop_oneof![
            Just("timelimit"), Just("soft_time_limit"), Just("eta"), Just("countdown"), Just("expires"),
            Just("retries"), Just("priority"), Just("id"), Just("task"), Just("root_id"), Just("parent_id"),
        ], json_value()), 0..6),
        body in json_value(),
    ) {
        use base64::Engine as _;
        let mut envelope: Value = serde_json::from_str(&celery_fixture()).expect("fixture is JSON");
        for (key, value) in headers {
            envelope["headers"][key] = value;
        }
        envelope["body"] = json!(base64::engine::general_purpose::STANDARD.encode(body.to_string()));
        let _ = TaskMessage::parse(envelope.to_string().as_bytes());
    }

    #[test]
    fn python_exact_json_reads_back_as_the_same_value(value in json_value()) {
        let written = pyjson::to_vec(&value);
        let read: Value = serde_json::from_slice(&written).expect("pyjson output is JSON");
        prop_assert_eq!(read, value);
    }

    #[test]
    fn kafka_records_of_any_bytes_and_headers_decode_or_are_dead_lettered(
        payload in prop::option::of(prop::collection::vec(any::<u8>(), 0..2048)),
        header in prop::option::of(prop::collection::vec(any::<u8>(), 0..64)),
        limit in 1usize..4096,
    ) {
        let headers = header.as_ref().map(|value| {
            OwnedHeaders::new().insert(Header { key: "event_type", value: Some(value.as_slice()) })
        });
        let message = OwnedMessage::new(
            payload.clone(), Some(b"u1".to_vec()), "aura360.user.events".into(),
            rdkafka::Timestamp::NotAvailable, 0, 7, headers,
        );
        match decode(&message, &registry(), limit) {
            Ok(Decoded::Event(_)) => prop_assert!(payload.is_some_and(|p| p.len() <= limit)),
            Ok(Decoded::Foreign(_)) | Err(_) => {}
        }
    }
}

fn registry() -> Registry {
    Registry::new()
        .with(MoodCreated)
        .with(ContextAggregated)
        .with(IngestVectors)
}

fn celery_fixture() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../crates/celery/tests/fixtures/send_task_envelopes.json");
    let all: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fixture"))
        .expect("fixture JSON");
    all["plain"]["raw"]
        .as_str()
        .expect("raw envelope")
        .to_owned()
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/events");
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("corpus dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).expect("corpus file"),
            )
        })
        .collect();
    files.sort();
    // Generated: too large to keep as files.
    let mut deep = "[".repeat(100_000);
    deep.push_str(&"]".repeat(100_000));
    files.push((
        "deep_nesting".into(),
        format!(r#"{{"event_id":"5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10","event_type":"user.mood.created","timestamp":"2025-03-01","user_id":"u","metadata":{deep},"data":{{"mood_score":1}}}}"#).into_bytes(),
    ));
    files.push((
        "one_megabyte_note".into(),
        mood_with("é".repeat(500_000), vec!["t".into(); 20_000], json!(3)).to_vec(),
    ));
    files
}

#[test]
fn the_corpus_decodes_or_is_refused_with_a_reason_and_never_panics() {
    let limits = Limits::default();
    let mut decoded = Vec::new();
    for (name, bytes) in corpus() {
        match Event::from_slice(bytes.trim_ascii_end()) {
            Ok(event) => {
                if let Ok(snapshot) = aggregate(&event) {
                    let bounded = snapshot.bounded(&limits);
                    assert!(
                        bounded.text_representation.chars().count() <= limits.max_embed_chars,
                        "{name}"
                    );
                }
                decoded.push(name);
            }
            Err(error) => assert!(!error.to_string().is_empty(), "{name}"),
        }
    }
    // The shapes real producers send decode; the broken ones do not.
    for name in [
        "python_mood.json",
        "django_mood.json",
        "activity.json",
        "surrogate_pair.json",
        "nested_metadata.json",
        "one_megabyte_note",
    ] {
        assert!(decoded.iter().any(|d| d == name), "{name} should decode");
    }
    for name in [
        "truncated_line.json",
        "invalid_utf8.json",
        "deep_nesting",
        "python_nan_infinity.json",
        "lone_surrogate.json",
    ] {
        assert!(
            !decoded.iter().any(|d| d == name),
            "{name} should be refused"
        );
    }
}

#[test]
fn the_corpus_timestamps_parse_or_are_refused() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/events/timestamps.txt"),
    )
    .expect("timestamps corpus");
    let parsed = text
        .lines()
        .filter(|line| Timestamp::parse(line).is_ok())
        .count();
    assert!(parsed >= 6, "the ordinary forms parse ({parsed})");
    assert!(Timestamp::parse("2025-13-45T99:99:99").is_err());
}

#[test]
fn a_long_note_is_cut_to_the_limit_and_says_so() {
    let limits = Limits::default();
    let snapshot = aggregate(&mood_with("word ".repeat(200_000), Vec::new(), json!(5)))
        .expect("a long note is a valid mood")
        .bounded(&limits);
    assert!(snapshot.truncated);
    assert_eq!(
        snapshot.text_representation.chars().count(),
        limits.max_embed_chars
    );
    assert!(snapshot.source_text_chars.unwrap_or(0) > 1_000_000);
    let (kept, cut) = truncate_chars(&snapshot.text_representation, limits.max_embed_chars);
    assert!(!cut && kept.starts_with("User: u1 | Mood Score: 5/10 | Notes: word word"));
    let snapshot_json = ContextSnapshot::bounded(snapshot.clone(), &limits).to_value();
    assert_eq!(snapshot_json["truncated"], true);
}
