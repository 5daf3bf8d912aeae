//! The protocol against envelopes real Celery wrote, and round trips.

use super::*;

const FIXTURES: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/send_task_envelopes.json"
));

fn fixtures() -> Vec<(String, String, String)> {
    let all: Map<String, Value> = serde_json::from_str(FIXTURES).unwrap();
    all.into_iter()
        .map(|(name, v)| {
            (
                name,
                v["redis_list_key"].as_str().unwrap().to_owned(),
                v["raw"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn every_captured_envelope_round_trips_byte_for_byte() {
    let all = fixtures();
    assert_eq!(all.len(), 6);
    for (name, _, raw) in all {
        let message =
            TaskMessage::parse(raw.as_bytes()).unwrap_or_else(|(_, e)| panic!("{name}: {e}"));
        assert_eq!(
            String::from_utf8(message.envelope.to_vec()).unwrap(),
            raw,
            "{name}"
        );
        let body = message.envelope.body_bytes().unwrap();
        let value: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(pyjson::to_vec(&value), body, "{name}: body");
        assert_eq!(message.task, "vectosvc.worker.tasks.process_mood_created");
        assert_eq!(message.body.args.len(), 1, "{name}");
        assert_eq!(
            message.body.args[0]["event_type"], "user.mood.created",
            "{name}"
        );
    }
}

#[test]
fn captured_options_are_read() {
    let all = fixtures();
    let get = |wanted: &str| {
        let (_, key, raw) = all.iter().find(|(n, _, _)| n == wanted).unwrap();
        (key.clone(), TaskMessage::parse(raw.as_bytes()).unwrap())
    };
    let (key, priority) = get("priority_5");
    assert_eq!(key, "celery\x06\x163");
    assert_eq!(priority.envelope.priority(), 5);
    let (_, countdown) = get("countdown_3");
    assert!(countdown.eta.is_some());
    let (_, limits) = get("time_limit_float");
    assert_eq!(
        (limits.time_limit, limits.soft_time_limit),
        (Some(2.5), Some(2.0))
    );
    let (_, expires) = get("expires");
    assert!(expires.expires.is_some());
    let (_, link) = get("link_callback");
    assert_eq!(
        link.body.embed["callbacks"][0]["task"],
        "vectosvc.worker.tasks.process_context_aggregated"
    );
    let (_, plain) = get("plain");
    assert_eq!(plain.root_id.as_deref(), Some(plain.id.as_str()));
    assert_eq!(
        plain.envelope.delivery_info(),
        ("".into(), Some("celery".into()))
    );
}

#[test]
fn built_tasks_match_what_send_task_writes() {
    let (_, _, raw) = fixtures()
        .into_iter()
        .find(|(n, _, _)| n == "plain")
        .unwrap();
    let python = TaskMessage::parse(raw.as_bytes()).unwrap();
    let options = TaskOptions {
        id: Some(python.id.clone()),
        queue: "celery".into(),
        origin: python.envelope.header_str("origin").unwrap().into(),
        reply_to: python.envelope.property_str("reply_to").unwrap().into(),
        ..TaskOptions::default()
    };
    let mut ours = build_task(&python.task, &python.body.args, &Map::new(), &options);
    ours.envelope.properties.insert(
        "delivery_tag".into(),
        json!(python.envelope.delivery_tag().unwrap()),
    );
    assert_eq!(String::from_utf8(ours.envelope.to_vec()).unwrap(), raw);
}

#[test]
fn lenient_reading_of_numbers_nulls_and_shapes() {
    let body = BASE64.encode(br#"[[1], null, null]"#);
    let raw = json!({"body": body, "headers": {"task": "t", "id": "i", "retries": 2.0,
        "timelimit": [null, "3"], "eta": null, "unknown": {"x": 1}},
        "properties": {"body_encoding": "base64", "priority": 6.0}});
    let message = TaskMessage::parse(raw.to_string().as_bytes()).unwrap();
    assert_eq!(message.retries, 2);
    assert_eq!(message.soft_time_limit, Some(3.0));
    assert_eq!(message.envelope.priority(), 6);
    assert!(message.body.kwargs.is_empty());
    assert_eq!(message.envelope.headers["unknown"]["x"], 1);
}

#[test]
fn malformed_messages_say_what_is_wrong() {
    let envelope = |body: &str, headers: Value| {
        json!({"body": body, "content-type": "application/json", "headers": headers,
            "properties": {"body_encoding": "base64", "delivery_tag": "t1"}})
        .to_string()
    };
    let task = json!({"task": "x", "id": "1"});
    let cases = [
        ("{not json".to_owned(), "not JSON"),
        (envelope("!!!", task.clone()), "base64"),
        (
            envelope(&BASE64.encode("{\"a\": 1}"), task.clone()),
            "expected a JSON array",
        ),
        (
            envelope(&BASE64.encode("[1, {}, {}]"), task.clone()),
            "args must be an array",
        ),
        (
            envelope(&BASE64.encode("[[], {}, {}]"), json!({"id": "1"})),
            "no `task` header",
        ),
    ];
    for (raw, expected) in cases {
        let error = TaskMessage::parse(raw.as_bytes()).unwrap_err().1;
        assert!(error.to_string().contains(expected), "{error} / {expected}");
    }
    let pickled = json!({"body": "gAR9", "content-type": "application/x-python-serialize",
        "headers": task, "properties": {"body_encoding": "base64"}});
    let (envelope, error) = TaskMessage::parse(pickled.to_string().as_bytes()).unwrap_err();
    assert!(envelope.is_some());
    assert!(matches!(error, MessageError::UnsupportedContentType(_)));
}

#[test]
fn saferepr_reads_like_celerys() {
    // Celery 5.7's own output for the same values (celery.utils.saferepr.saferepr).
    let value = json!([{"a": "it's", "n": null, "d": {"x": [1, 2], "y": {}}}]);
    assert_eq!(
        saferepr(&value, 1024),
        r#"[{'a': 'it\'s', 'n': None, 'd': {'x': [...], 'y': {...}}}]"#
    );
    assert!(saferepr(&json!(["x".repeat(2000)]), 1024).ends_with("xxx...']"));
    assert_eq!(
        saferepr(&json!([1, 2, {"k": "v".repeat(50)}]), 20),
        "[1, 2, {'k': 'vvvvvvv...'}]"
    );
}

#[test]
fn link_callbacks_and_chains_get_the_result_and_the_parent() {
    let (_, _, raw) = fixtures()
        .into_iter()
        .find(|(n, _, _)| n == "link_callback")
        .unwrap();
    let mut message = TaskMessage::parse(raw.as_bytes()).unwrap();
    message.body.embed.insert(
        "chain".into(),
        json!([{"task": "last", "args": [], "kwargs": {}, "options": {}, "immutable": false},
               {"task": "next", "args": [7], "kwargs": {"k": 1}, "options": {"queue": "q2"}, "immutable": false}]),
    );
    let result = json!({"ok": true});
    let sent = follow_ups(&message, &result, "celery", "w@h");
    assert_eq!(sent.len(), 2);
    let callback = TaskMessage::parse(&sent[0].envelope.to_vec()).unwrap();
    assert_eq!(
        callback.task,
        "vectosvc.worker.tasks.process_context_aggregated"
    );
    assert_eq!(callback.body.args, vec![result.clone()]);
    assert_eq!(callback.parent_id.as_deref(), Some(message.id.as_str()));
    let next = TaskMessage::parse(&sent[1].envelope.to_vec()).unwrap();
    assert_eq!((next.task.as_str(), sent[1].queue.as_str()), ("next", "q2"));
    assert_eq!(next.body.args, vec![result, json!(7)]);
    assert_eq!(next.body.embed["chain"][0]["task"], "last");
}

#[test]
fn a_retry_keeps_the_id_and_counts_up() {
    let (_, _, raw) = fixtures()
        .into_iter()
        .find(|(n, _, _)| n == "plain")
        .unwrap();
    let message = TaskMessage::parse(raw.as_bytes()).unwrap();
    let eta = Utc::now();
    let retried = TaskMessage::parse(&message.retry_envelope(eta).to_vec()).unwrap();
    assert_eq!(retried.id, message.id);
    assert_eq!(retried.retries, 1);
    assert_eq!(
        retried.eta.map(|t| t.timestamp_micros()),
        Some(eta.timestamp_micros())
    );
    assert_ne!(
        retried.envelope.delivery_tag(),
        message.envelope.delivery_tag()
    );
    assert_eq!(retried.body, message.body);
}
