//! Typed views of the per-type event fields.
//!
//! Producers in the wild disagree on shapes (the Python service's `{mood_score, tags, notes, created_at}` and
//! Django's `{mood_id, level, recorded_at, note, tags}`), so decoding normalises them into one struct and names
//! the offending field when neither shape fits. Writing goes the other way: handlers build these structs and
//! [`ContextSnapshot::to_value`] / [`VectorizedContext::apply_to`] put them on an [`Event`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::limits::{LABEL_CHARS, Limits, SUMMARIES_BYTES, bound_json, truncate_chars};
use crate::{Event, EventError};

/// A mood entry, whichever shape it arrived in.
#[derive(Clone, Debug, PartialEq)]
pub struct MoodEntry {
    pub score: f64,
    pub tags: Vec<String>,
    pub notes: Option<String>,
    pub recorded_at: Option<String>,
}

impl MoodEntry {
    /// Reads `data` of a `user.mood.created` event.
    pub fn from_event(event: &Event) -> Result<Self, EventError> {
        let data = object_field(event, "data")?;
        let score = match (data.get("mood_score"), data.get("level")) {
            (Some(v), _) if !v.is_null() => number(v, "data.mood_score")?,
            (_, Some(v)) if !v.is_null() => number(v, "data.level")?,
            _ => {
                return Err(EventError::schema(
                    "data.mood_score",
                    "missing (neither `mood_score` nor `level`)",
                ));
            }
        };
        Ok(Self {
            score,
            tags: string_list(data.get("tags"), "data.tags")?,
            notes: first_text(data, &["notes", "note"], "data.notes")?,
            recorded_at: first_text(data, &["created_at", "recorded_at"], "data.created_at")?,
        })
    }
}

/// An activity entry from `data` of a `user.activity.created` event.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivityEntry {
    pub activity_type: String,
    pub duration_minutes: Option<f64>,
    pub calories: Option<f64>,
}

impl ActivityEntry {
    pub fn from_event(event: &Event) -> Result<Self, EventError> {
        let data = object_field(event, "data")?;
        let activity_type = first_text(data, &["activity_type", "type"], "data.activity_type")?
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| EventError::schema("data.activity_type", "missing"))?;
        let optional_number = |keys: &[&str], field: &str| -> Result<Option<f64>, EventError> {
            match keys
                .iter()
                .find_map(|k| data.get(*k).filter(|v| !v.is_null()))
            {
                Some(v) => number(v, field).map(Some),
                None => Ok(None),
            }
        };
        Ok(Self {
            activity_type,
            duration_minutes: optional_number(&["duration", "duration_minutes"], "data.duration")?,
            calories: optional_number(&["calories", "calories_burned"], "data.calories")?,
        })
    }
}

/// `context_data` of a `context.aggregated` event: the snapshot the aggregation produced.
///
/// Summaries other than mood/activity (`ikigai_summary`, `psychosocial_factors`, …) are kept in `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextSnapshot {
    pub user_id: String,
    #[serde(default = "default_snapshot_type")]
    pub snapshot_type: String,
    #[serde(default = "default_timeframe")]
    pub timeframe: String,
    #[serde(default)]
    pub timestamp: Option<String>,
    #[serde(default)]
    pub source_event: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mood_summary: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activity_summary: Option<Value>,
    pub text_representation: String,
    /// The text was cut to fit the limits ([`crate::limits`]): only its beginning is embedded and searchable.
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
    /// Characters of the text before it was cut (set only when it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_text_chars: Option<u64>,
    /// A summary or label was cut to its bound (the text itself may be whole).
    #[serde(default, skip_serializing_if = "is_false")]
    pub summaries_truncated: bool,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn default_snapshot_type() -> String {
    "incremental".into()
}

fn default_timeframe() -> String {
    "recent".into()
}

impl ContextSnapshot {
    pub fn from_event(event: &Event) -> Result<Self, EventError> {
        let snapshot: Self = event.decode_field("context_data")?;
        if snapshot.text_representation.trim().is_empty() {
            return Err(EventError::schema(
                "context_data.text_representation",
                "empty",
            ));
        }
        Ok(snapshot)
    }

    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// This snapshot within the limits: the text cut to `max_embed_chars` characters (`truncated`, with its
    /// original length), labels to [`LABEL_CHARS`] and all summaries together (`source_event`, `mood_summary`,
    /// `activity_summary`, then the others in their order) to [`SUMMARIES_BYTES`] (`summaries_truncated`).
    /// Bounding a bounded snapshot changes nothing.
    pub fn bounded(mut self, limits: &Limits) -> Self {
        let (text, cut) = truncate_chars(&self.text_representation, limits.max_embed_chars);
        if cut {
            self.source_text_chars
                .get_or_insert(self.text_representation.chars().count() as u64);
            self.text_representation = text.to_owned();
            self.truncated = true;
        }
        let mut cut = false;
        for label in [
            &mut self.user_id,
            &mut self.snapshot_type,
            &mut self.timeframe,
        ] {
            cut |= truncate_label(label);
        }
        if let Some(timestamp) = &mut self.timestamp {
            cut |= truncate_label(timestamp);
        }
        let mut budget = SUMMARIES_BYTES;
        let mut bound = |value: &mut Value| {
            let (bounded, was_cut) = bound_json(value, budget);
            budget = budget.saturating_sub(bounded.to_string().len());
            *value = bounded;
            was_cut
        };
        for summary in [
            &mut self.source_event,
            &mut self.mood_summary,
            &mut self.activity_summary,
        ]
        .into_iter()
        .flatten()
        {
            cut |= bound(summary);
        }
        if !self.extra.is_empty() {
            // The other summaries as one object: their keys count against the budget too.
            let mut extra = Value::Object(std::mem::take(&mut self.extra));
            cut |= bound(&mut extra);
            if let Value::Object(extra) = extra {
                self.extra = extra;
            }
        }
        self.summaries_truncated |= cut;
        self
    }
}

/// Cuts a label to [`LABEL_CHARS`]; true when it was cut.
fn truncate_label(label: &mut String) -> bool {
    let (kept, cut) = truncate_chars(label, LABEL_CHARS);
    if cut {
        *label = kept.to_owned();
    }
    cut
}

/// The fields a `context.vectorized` event adds: the chunks, their vectors and the model that made them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VectorizedContext {
    pub context_data: ContextSnapshot,
    pub chunks: Vec<String>,
    pub vectors: Vec<Vec<f32>>,
    pub embedding_model: String,
    pub embedding_version: String,
}

impl VectorizedContext {
    pub fn from_event(event: &Event) -> Result<Self, EventError> {
        let context_data: ContextSnapshot = event.decode_field("context_data")?;
        let vectors: Vec<Vec<f32>> = event.decode_field("vectors")?;
        let chunks: Vec<String> = event.decode_field("chunks")?;
        if vectors.is_empty() {
            return Err(EventError::schema("vectors", "empty"));
        }
        if chunks.len() != vectors.len() {
            return Err(EventError::schema(
                "chunks",
                format!("{} chunks for {} vectors", chunks.len(), vectors.len()),
            ));
        }
        Ok(Self {
            context_data,
            chunks,
            vectors,
            embedding_model: event.decode_field("embedding_model")?,
            embedding_version: event.decode_field("embedding_version")?,
        })
    }

    pub fn apply_to(&self, event: &mut Event) {
        event.set_field("context_data", self.context_data.to_value());
        event.set_field("chunks", serde_json::json!(self.chunks));
        event.set_field("vectors", serde_json::json!(self.vectors));
        event.set_field(
            "embedding_model",
            Value::String(self.embedding_model.clone()),
        );
        event.set_field(
            "embedding_version",
            Value::String(self.embedding_version.clone()),
        );
    }
}

fn object_field<'a>(event: &'a Event, name: &str) -> Result<&'a Map<String, Value>, EventError> {
    match event.field(name) {
        Some(Value::Object(map)) => Ok(map),
        Some(other) => Err(EventError::schema(
            name,
            format!("expected an object, got {}", json_kind(other)),
        )),
        None => Err(EventError::schema(name, "missing")),
    }
}

/// Accepts JSON numbers and numeric strings (form posts often stringify numbers).
fn number(value: &Value, field: &str) -> Result<f64, EventError> {
    let parsed = match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    parsed
        .filter(|n| n.is_finite())
        .ok_or_else(|| EventError::schema(field, format!("expected a number, got {value}")))
}

fn string_list(value: Option<&Value>, field: &str) -> Result<Vec<String>, EventError> {
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => Err(EventError::schema(
                    field,
                    format!("expected strings, got {other}"),
                )),
            })
            .collect(),
        Some(other) => Err(EventError::schema(
            field,
            format!("expected a list of strings, got {}", json_kind(other)),
        )),
    }
}

fn first_text(
    data: &Map<String, Value>,
    keys: &[&str],
    field: &str,
) -> Result<Option<String>, EventError> {
    match keys
        .iter()
        .find_map(|k| data.get(*k).filter(|v| !v.is_null()))
    {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(EventError::schema(
            field,
            format!("expected a string, got {}", json_kind(other)),
        )),
    }
}

/// What a JSON value is, as an error message says it ("a string", "a list", …).
pub fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event_type: &str, data: Value) -> Event {
        let mut event = Event::new(event_type, Some("u1".into()), None);
        event.set_field("data", data);
        event
    }

    #[test]
    fn python_mood_shape_is_read() {
        let e = event(
            "user.mood.created",
            json!({"mood_score": 7, "tags": ["calm", "rested"], "notes": "good day", "created_at": "2025-03-01T10:00:00"}),
        );
        let mood = MoodEntry::from_event(&e).unwrap();
        assert_eq!(mood.score, 7.0);
        assert_eq!(mood.tags, ["calm", "rested"]);
        assert_eq!(mood.notes.as_deref(), Some("good day"));
        assert_eq!(mood.recorded_at.as_deref(), Some("2025-03-01T10:00:00"));
    }

    #[test]
    fn django_mood_shape_is_read() {
        let e = event(
            "user.mood.created",
            json!({"mood_id": 9, "level": "4", "recorded_at": "2025-03-01T10:00:00Z", "note": "tired", "tags": null}),
        );
        let mood = MoodEntry::from_event(&e).unwrap();
        assert_eq!(mood.score, 4.0);
        assert!(mood.tags.is_empty());
        assert_eq!(mood.notes.as_deref(), Some("tired"));
        assert_eq!(mood.recorded_at.as_deref(), Some("2025-03-01T10:00:00Z"));
    }

    #[test]
    fn wrong_types_name_the_field() {
        let cases = [
            (json!({"mood_score": "high"}), "data.mood_score"),
            (json!({"mood_score": 5, "tags": "calm"}), "data.tags"),
            (json!({"mood_score": 5, "tags": [1]}), "data.tags"),
            (json!({"mood_score": 5, "notes": 3}), "data.notes"),
            (json!({"tags": []}), "data.mood_score"),
            (json!([1, 2]), "data"),
        ];
        for (data, field) in cases {
            let err = MoodEntry::from_event(&event("user.mood.created", data.clone())).unwrap_err();
            assert!(
                matches!(&err, EventError::Schema { field: f, .. } if f == field),
                "{data} -> {err}"
            );
        }
    }

    #[test]
    fn activity_accepts_aliases_and_requires_a_type() {
        let a = ActivityEntry::from_event(&event(
            "user.activity.created",
            json!({"activity_type": "running", "duration_minutes": 30, "calories_burned": "250.5"}),
        ))
        .unwrap();
        assert_eq!(
            a,
            ActivityEntry {
                activity_type: "running".into(),
                duration_minutes: Some(30.0),
                calories: Some(250.5)
            }
        );
        assert!(
            ActivityEntry::from_event(&event("user.activity.created", json!({"duration": 3})))
                .is_err()
        );
    }

    #[test]
    fn context_snapshot_keeps_unknown_summaries() {
        let mut e = Event::new("context.aggregated", Some("u1".into()), None);
        e.set_field("context_data", json!({"user_id": "u1", "text_representation": "User: u1", "ikigai_summary": {"purpose": "x"}}));
        let snapshot = ContextSnapshot::from_event(&e).unwrap();
        assert_eq!(snapshot.snapshot_type, "incremental");
        assert_eq!(
            snapshot.to_value()["ikigai_summary"],
            json!({"purpose": "x"})
        );
    }

    #[test]
    fn vectorized_context_requires_one_chunk_per_vector() {
        let mut e = Event::new("context.vectorized", Some("u1".into()), None);
        let ctx = VectorizedContext {
            context_data: serde_json::from_value(
                json!({"user_id": "u1", "text_representation": "t"}),
            )
            .unwrap(),
            chunks: vec!["t".into()],
            vectors: vec![vec![1.0, 0.0]],
            embedding_model: "hash".into(),
            embedding_version: "v1".into(),
        };
        ctx.apply_to(&mut e);
        assert_eq!(VectorizedContext::from_event(&e).unwrap(), ctx);
        e.set_field("chunks", json!(["a", "b"]));
        assert!(
            VectorizedContext::from_event(&e)
                .unwrap_err()
                .to_string()
                .contains("2 chunks for 1 vectors")
        );
    }
}
