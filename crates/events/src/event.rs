//! The event envelope and its JSON (de)serialisation.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::Timestamp;

/// One pipeline event: the typed envelope plus every other top-level field kept as raw JSON.
///
/// The per-type fields (`data`, `context_data`, `vectors`, …) and any field a newer producer adds live in
/// `fields`, in their original order, so decoding and re-encoding an event never drops anything.
///
/// Decoding reads each field once, straight into its place (see [`EventVisitor`]): a derived decoder with
/// `#[serde(flatten)]` would first copy the whole object into serde's generic buffer and then decode that again,
/// which doubles the cost of the large per-type fields (a `context.vectorized` event's vectors).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: String,
    pub timestamp: Timestamp,
    pub trace_id: Option<String>,
    pub user_id: Option<String>,
    pub metadata: Map<String, Value>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(EventVisitor)
    }
}

/// The envelope's fields; anything else is one of the event's own `fields`.
enum Key {
    EventId,
    EventType,
    Timestamp,
    TraceId,
    UserId,
    Metadata,
    Other(String),
}

impl Key {
    fn of(name: &str) -> Self {
        match name {
            "event_id" => Self::EventId,
            "event_type" => Self::EventType,
            "timestamp" => Self::Timestamp,
            "trace_id" => Self::TraceId,
            "user_id" => Self::UserId,
            "metadata" => Self::Metadata,
            other => Self::Other(other.to_owned()),
        }
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl serde::de::Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Key, E> {
                Ok(Key::of(name))
            }
            fn visit_string<E: serde::de::Error>(self, name: String) -> Result<Key, E> {
                Ok(match Key::of(&name) {
                    Key::Other(_) => Key::Other(name),
                    known => known,
                })
            }
        }
        deserializer.deserialize_identifier(KeyVisitor)
    }
}

/// `user_id` as [`lenient_user_id`] reads it.
#[derive(Deserialize)]
#[serde(transparent)]
struct UserId(#[serde(deserialize_with = "lenient_user_id")] Option<String>);

/// `metadata` as [`null_as_empty`] reads it.
#[derive(Deserialize)]
#[serde(transparent)]
struct Metadata(#[serde(deserialize_with = "null_as_empty")] Map<String, Value>);

/// Reads an event object field by field: the envelope into its fields (a repeated one is an error, a missing
/// `event_id`, `event_type` or `timestamp` too), everything else into `fields`, in order (a repeated one keeps its
/// last value).
struct EventVisitor;

impl<'de> serde::de::Visitor<'de> for EventVisitor {
    type Value = Event;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an event (a JSON object)")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Event, A::Error> {
        use serde::de::Error;
        fn once<T, E: Error>(slot: &mut Option<T>, name: &'static str, value: T) -> Result<(), E> {
            match slot.replace(value) {
                Some(_) => Err(E::duplicate_field(name)),
                None => Ok(()),
            }
        }
        let (mut event_id, mut event_type, mut timestamp) = (None, None, None);
        let (mut trace_id, mut user_id, mut metadata) = (None, None, None);
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::EventId => once(&mut event_id, "event_id", map.next_value::<Uuid>()?)?,
                Key::EventType => once(&mut event_type, "event_type", map.next_value::<String>()?)?,
                Key::Timestamp => {
                    once(&mut timestamp, "timestamp", map.next_value::<Timestamp>()?)?
                }
                Key::TraceId => once(
                    &mut trace_id,
                    "trace_id",
                    map.next_value::<Option<String>>()?,
                )?,
                Key::UserId => once(&mut user_id, "user_id", map.next_value::<UserId>()?.0)?,
                Key::Metadata => once(&mut metadata, "metadata", map.next_value::<Metadata>()?.0)?,
                Key::Other(name) => {
                    fields.insert(name, map.next_value::<Value>()?);
                }
            }
        }
        Ok(Event {
            event_id: event_id.ok_or_else(|| A::Error::missing_field("event_id"))?,
            event_type: event_type.ok_or_else(|| A::Error::missing_field("event_type"))?,
            timestamp: timestamp.ok_or_else(|| A::Error::missing_field("timestamp"))?,
            trace_id: trace_id.flatten(),
            user_id: user_id.flatten(),
            metadata: metadata.unwrap_or_default(),
            fields,
        })
    }
}

/// Why bytes could not become an [`Event`], or an event's fields do not match its type.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("undecodable event: {0}")]
    Json(#[source] serde_json::Error),
    #[error("schema violation in `{field}`: {reason}")]
    Schema { field: String, reason: String },
}

/// Characters of a schema error's field and reason: a reason may quote the offending value, which may be a user's
/// megabyte-long note, and errors travel into logs, dead-letter headers and results.
const REASON_CHARS: usize = 300;

impl EventError {
    pub fn schema(field: impl Into<String>, reason: impl Into<String>) -> Self {
        let bounded = |text: String| match crate::limits::truncate_chars(&text, REASON_CHARS) {
            (kept, true) => format!("{kept}…"),
            (_, false) => text,
        };
        Self::Schema {
            field: bounded(field.into()),
            reason: bounded(reason.into()),
        }
    }
}

impl Event {
    /// A fresh event (new id, current time) with no per-type fields yet.
    pub fn new(
        event_type: impl Into<String>,
        user_id: Option<String>,
        trace_id: Option<String>,
    ) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            timestamp: Timestamp::now(),
            trace_id,
            user_id,
            metadata: Map::new(),
            fields: Map::new(),
        }
    }

    /// The event a handler emits in reaction to `cause`: new id, same `trace_id` and `user_id`,
    /// `metadata.causation_id` = the cause, `metadata.origin_event_id` = the first event of the chain.
    pub fn caused_by(cause: &Event, event_type: impl Into<String>) -> Self {
        let mut event = Self::new(event_type, cause.user_id.clone(), cause.trace_id.clone());
        event.metadata = cause.metadata.clone();
        event.metadata.insert(
            "causation_id".into(),
            Value::String(cause.event_id.to_string()),
        );
        event.metadata.insert(
            "origin_event_id".into(),
            Value::String(cause.origin_event_id().to_string()),
        );
        event
    }

    /// The first event a handler emits for a chain that starts at `source`: like [`Event::caused_by`], but the
    /// origin is `source` itself, never a `metadata.origin_event_id` that came with it from a producer.
    pub fn started_by(source: &Event, event_type: impl Into<String>) -> Self {
        let mut event = Self::caused_by(source, event_type);
        event.metadata.insert(
            "origin_event_id".into(),
            Value::String(source.event_id.to_string()),
        );
        event
    }

    /// Decodes one event from JSON bytes. Bytes that are not JSON are [`EventError::Json`]; JSON that is not an
    /// event (missing or mistyped envelope fields) is [`EventError::Schema`].
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EventError> {
        serde_json::from_slice(bytes).map_err(classify)
    }

    pub fn from_value(value: Value) -> Result<Self, EventError> {
        serde_json::from_value(value).map_err(classify)
    }

    pub fn to_vec(&self) -> Vec<u8> {
        // An `Event` holds only strings, numbers and JSON values: serialising it cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The id of the first event of this chain. An event that a handler produced (it has a `causation_id`) carries
    /// it in `metadata.origin_event_id`; any other event starts its chain, so its origin is its own id, whatever
    /// its metadata says (a producer's value is not trusted: point ids derive from the origin).
    pub fn origin_event_id(&self) -> String {
        match (
            self.metadata.get("origin_event_id"),
            self.causation_id().filter(|c| !c.is_empty()),
        ) {
            (Some(Value::String(id)), Some(_)) if !id.is_empty() => id.clone(),
            _ => self.event_id.to_string(),
        }
    }

    pub fn causation_id(&self) -> Option<&str> {
        self.metadata.get("causation_id").and_then(Value::as_str)
    }

    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    pub fn set_field(&mut self, name: impl Into<String>, value: Value) {
        self.fields.insert(name.into(), value);
    }

    /// Decodes a required per-type field, naming it in the error.
    pub fn decode_field<T: DeserializeOwned>(&self, name: &str) -> Result<T, EventError> {
        let value = self
            .fields
            .get(name)
            .filter(|v| !v.is_null())
            .ok_or_else(|| EventError::schema(name, "missing"))?;
        T::deserialize(value).map_err(|e| EventError::schema(name, e.to_string()))
    }

    pub fn require_user_id(&self) -> Result<&str, EventError> {
        match self.user_id.as_deref() {
            Some(id) if !id.trim().is_empty() => Ok(id),
            _ => Err(EventError::schema("user_id", "missing or empty")),
        }
    }
}

fn classify(error: serde_json::Error) -> EventError {
    match error.classify() {
        serde_json::error::Category::Data => {
            let message = error.to_string();
            let field = message
                .split('`')
                .nth(1)
                .filter(|_| message.starts_with("missing field"))
                .unwrap_or("event")
                .to_owned();
            EventError::schema(field, message)
        }
        _ => EventError::Json(error),
    }
}

fn null_as_empty<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Map<String, Value>, D::Error> {
    Ok(Option::<Map<String, Value>>::deserialize(deserializer)?.unwrap_or_default())
}

/// Django primary keys are sometimes sent as numbers; the id is an opaque string to us.
fn lenient_user_id<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    match Option::<Value>::deserialize(deserializer)? {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(other) => Err(serde::de::Error::custom(format!(
            "user_id must be a string, got {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PYTHON_MOOD_EVENT: &str = r#"{"event_id":"5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10","event_type":"user.mood.created","timestamp":"2025-03-01T12:30:45.123456","trace_id":"trace-1","user_id":"user-42","metadata":{"source":"django"},"data":{"mood_score":7,"tags":["calm"],"notes":"ok","created_at":"2025-03-01T12:30:00","future_field":[1,2]},"schema_version":3}"#;

    #[test]
    fn python_event_round_trips_byte_for_byte_including_unknown_fields() {
        let event = Event::from_slice(PYTHON_MOOD_EVENT.as_bytes()).unwrap();
        assert_eq!(event.event_type, "user.mood.created");
        assert_eq!(event.field("schema_version"), Some(&json!(3)));
        assert_eq!(
            String::from_utf8(event.to_vec()).unwrap(),
            PYTHON_MOOD_EVENT
        );
    }

    #[test]
    fn caused_by_chains_trace_causation_and_origin() {
        let first = Event::from_slice(PYTHON_MOOD_EVENT.as_bytes()).unwrap();
        let second = Event::caused_by(&first, "context.aggregated");
        let third = Event::caused_by(&second, "context.vectorized");
        assert_ne!(second.event_id, first.event_id);
        assert_eq!(third.trace_id.as_deref(), Some("trace-1"));
        assert_eq!(third.user_id.as_deref(), Some("user-42"));
        assert_eq!(
            third.causation_id(),
            Some(second.event_id.to_string().as_str())
        );
        assert_eq!(third.origin_event_id(), first.event_id.to_string());
        assert_eq!(third.metadata.get("source"), Some(&json!("django")));
    }

    #[test]
    fn not_json_is_a_decode_error_and_a_missing_envelope_field_is_a_schema_error() {
        assert!(matches!(
            Event::from_slice(b"{not json"),
            Err(EventError::Json(_))
        ));
        let missing = Event::from_slice(br#"{"event_type":"x","timestamp":"2025-01-01T00:00:00"}"#)
            .unwrap_err();
        assert!(
            matches!(&missing, EventError::Schema { field, .. } if field == "event_id"),
            "{missing}"
        );
        let bad_id =
            Event::from_slice(br#"{"event_id":"nope","event_type":"x","timestamp":"2025-01-01"}"#);
        assert!(matches!(bad_id, Err(EventError::Schema { .. })));
    }

    #[test]
    fn nulls_and_numeric_user_ids_are_tolerated() {
        let event = Event::from_value(json!({
            "event_id": "5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10", "event_type": "user.mood.created",
            "timestamp": "2025-03-01T12:30:45Z", "trace_id": null, "user_id": 42, "metadata": null
        }))
        .unwrap();
        assert_eq!(event.user_id.as_deref(), Some("42"));
        assert!(event.metadata.is_empty());
        assert_eq!(
            event.origin_event_id(),
            "5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10"
        );
    }

    #[test]
    fn the_envelope_is_read_in_any_order_and_a_repeated_envelope_field_or_a_non_object_is_refused()
    {
        let reordered = br#"{"data":{"a":[1.5,2]},"user_id":"u","timestamp":"2025-03-01T12:30:45Z","x":null,"event_type":"t","event_id":"5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10"}"#;
        let event = Event::from_slice(reordered).unwrap();
        assert_eq!(event.event_type, "t");
        assert_eq!(event.user_id.as_deref(), Some("u"));
        assert_eq!(event.trace_id, None);
        assert_eq!(
            event.fields.keys().collect::<Vec<_>>(),
            ["data", "x"],
            "the event's own fields keep their order"
        );
        assert_eq!(event.field("data"), Some(&json!({"a": [1.5, 2]})));
        let twice = br#"{"event_id":"5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10","event_type":"a","event_type":"b","timestamp":"2025-01-01"}"#;
        let error = Event::from_slice(twice).unwrap_err();
        assert!(
            error.to_string().contains("duplicate field `event_type`"),
            "{error}"
        );
        assert!(matches!(
            Event::from_slice(b"[1,2]"),
            Err(EventError::Schema { .. })
        ));
        assert!(matches!(
            Event::from_slice(b"\"event\""),
            Err(EventError::Schema { .. })
        ));
        let escaped = br#"{"event\u005fid":"5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10","event_type":"t","timestamp":"2025-01-01"}"#;
        assert_eq!(
            Event::from_slice(escaped).unwrap().event_id.to_string(),
            "5f0c6f0e-8f0a-4a53-9d55-2b0d3c1f7a10",
            "an escaped key is the same key"
        );
    }

    #[test]
    fn decode_field_names_the_field_that_is_wrong() {
        let event = Event::from_slice(PYTHON_MOOD_EVENT.as_bytes()).unwrap();
        let err = event.decode_field::<Vec<String>>("data").unwrap_err();
        assert!(err.to_string().contains("`data`"), "{err}");
        let err = event.decode_field::<Value>("context_data").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
