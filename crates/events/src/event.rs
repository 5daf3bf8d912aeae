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
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub event_id: Uuid,
    pub event_type: String,
    pub timestamp: Timestamp,
    #[serde(default)]
    pub trace_id: Option<String>,
    #[serde(default, deserialize_with = "lenient_user_id")]
    pub user_id: Option<String>,
    #[serde(default, deserialize_with = "null_as_empty")]
    pub metadata: Map<String, Value>,
    #[serde(flatten)]
    pub fields: Map<String, Value>,
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
    fn decode_field_names_the_field_that_is_wrong() {
        let event = Event::from_slice(PYTHON_MOOD_EVENT.as_bytes()).unwrap();
        let err = event.decode_field::<Vec<String>>("data").unwrap_err();
        assert!(err.to_string().contains("`data`"), "{err}");
        let err = event.decode_field::<Value>("context_data").unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
