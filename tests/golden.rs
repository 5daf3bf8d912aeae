//! Golden values: our point ids, derived event ids, text representations and Celery envelope against literals an
//! independent implementation computed (`scripts/golden.py`: Python's `uuid.uuid5`, the Python original's text
//! format, real Celery 5.7's `send_task` on Redis), stored in `tests/fixtures/golden.json`.
//!
//! A change to the point-id namespace re-keys every point (each event stored twice after an upgrade); a change to the
//! text changes every vector; a change to the envelope changes what Python workers read. Each must fail here first.

use aura_runtime::events::Event;
use aura_runtime::{derived_event_id, events::Timestamp};
use handler_ingest_vectors::{point_id, point_namespace};
use handler_mood_created::aggregate;
use serde_json::{Map, Value};

fn golden() -> Value {
    let text = include_str!("fixtures/golden.json");
    serde_json::from_str(text).unwrap()
}

#[test]
fn point_ids_are_python_uuid5_of_the_namespace_origin_and_chunk() {
    let golden = golden();
    assert_eq!(
        point_namespace().to_string(),
        golden["point_namespace"].as_str().unwrap()
    );
    let cases = golden["point_ids"].as_array().unwrap();
    assert!(cases.len() >= 9);
    for case in cases {
        let origin = case["origin"].as_str().unwrap();
        let chunk = case["chunk"].as_u64().unwrap() as usize;
        assert_eq!(
            point_id(origin, chunk).to_string(),
            case["id"].as_str().unwrap(),
            "point id of {origin}:{chunk}"
        );
    }
}

#[test]
fn derived_event_ids_are_python_uuid5_in_the_cause_namespace() {
    for case in golden()["derived_event_ids"].as_array().unwrap() {
        let mut cause = Event::new("user.mood.created", Some("u".into()), None);
        cause.event_id = case["cause"].as_str().unwrap().parse().unwrap();
        cause.timestamp = Timestamp::parse("2025-03-01T08:00:00").unwrap();
        let id = derived_event_id(
            &cause,
            case["event_type"].as_str().unwrap(),
            case["index"].as_u64().unwrap() as usize,
        );
        assert_eq!(id.to_string(), case["id"].as_str().unwrap(), "{case}");
    }
}

#[test]
fn text_representations_are_the_python_originals() {
    let cases = golden()["texts"].as_array().unwrap().clone();
    assert!(cases.len() >= 8);
    for case in cases {
        let event = Event::from_value(case["event"].clone()).unwrap();
        assert_eq!(
            aggregate(&event).unwrap().text_representation,
            case["text"].as_str().unwrap(),
            "text of {}",
            case["event"]
        );
    }
}

#[test]
fn task_envelopes_are_byte_for_byte_what_celery_send_task_writes() {
    let cases = golden()["envelopes"].as_array().unwrap().clone();
    assert!(cases.len() >= 3);
    for golden in cases {
        envelope_matches(&golden);
    }
}

fn envelope_matches(golden: &Value) {
    let name = golden["name"].as_str().unwrap();
    let args = golden["args"].as_array().unwrap();
    let event = Event::from_value(args[0].clone()).unwrap();
    let options = aura_celery::protocol::TaskOptions {
        id: Some(golden["task_id"].as_str().unwrap().to_owned()),
        queue: golden["queue"].as_str().unwrap().to_owned(),
        origin: golden["origin"].as_str().unwrap().to_owned(),
        reply_to: golden["reply_to"].as_str().unwrap().to_owned(),
        ..Default::default()
    };
    let mut task = aura_celery::protocol::build_task(
        golden["task"].as_str().unwrap(),
        std::slice::from_ref(&event),
        &Map::new(),
        &options,
    );
    // The one value Celery draws per message.
    task.envelope
        .properties
        .insert("delivery_tag".into(), golden["delivery_tag"].clone());
    let ours = String::from_utf8(task.envelope.to_vec()).unwrap();
    let theirs = golden["raw"].as_str().unwrap();
    if ours != theirs {
        // Name the first difference before failing on the whole.
        let ours_v: Value = serde_json::from_str(&ours).unwrap();
        let theirs_v: Value = serde_json::from_str(theirs).unwrap();
        for key in ["headers", "properties"] {
            assert_eq!(ours_v[key], theirs_v[key], "{name}: {key}");
        }
        use base64::Engine as _;
        let body = |v: &Value| {
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(v["body"].as_str().unwrap())
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(body(&ours_v), body(&theirs_v), "{name}: body");
    }
    assert_eq!(ours, theirs, "{name}");
    assert!(
        golden["task"]
            .as_str()
            .unwrap()
            .starts_with("vectosvc.worker.tasks.")
    );
}
