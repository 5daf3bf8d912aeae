//! `mood_created`: a mood (or activity) event becomes a context snapshot (`context.aggregated`).
//!
//! A pure transform: no store, no embedder. Both mood shapes seen in the wild are accepted (see
//! [`MoodEntry`]); the snapshot's `text_representation` is what the next handler embeds.

use async_trait::async_trait;
use aura_runtime::events::payload::{ActivityEntry, ContextSnapshot, MoodEntry};
use aura_runtime::events::{Event, EventError, types};
use aura_runtime::{Handler, HandlerContext, HandlerError};
use serde_json::{Map, Value, json};

pub struct MoodCreated;

#[async_trait]
impl Handler for MoodCreated {
    fn name(&self) -> &'static str {
        "mood_created"
    }

    fn event_types(&self) -> &'static [&'static str] {
        &[types::MOOD_CREATED, types::ACTIVITY_CREATED]
    }

    async fn handle(
        &self,
        event: &Event,
        ctx: &HandlerContext,
    ) -> Result<Vec<Event>, HandlerError> {
        let snapshot = aggregate(event)?.bounded(&ctx.limits);
        // The chain starts here: its origin is this event, whatever `metadata.origin_event_id` a producer sent.
        // Point ids derive from it, so trusting the producer's value would let two distinct events overwrite
        // each other's points.
        let mut aggregated = Event::started_by(event, types::CONTEXT_AGGREGATED);
        aggregated.set_field("context_data", snapshot.to_value());
        Ok(vec![aggregated])
    }
}

/// The snapshot for one mood or activity event, before the limits are applied ([`ContextSnapshot::bounded`]).
pub fn aggregate(event: &Event) -> Result<ContextSnapshot, EventError> {
    let user_id = event.require_user_id()?.to_owned();
    let mut parts = vec![format!("User: {user_id}")];
    let (mood_summary, activity_summary) = match event.event_type.as_str() {
        types::MOOD_CREATED => {
            let mood = MoodEntry::from_event(event)?;
            let raw = data_field(event, &["mood_score", "level"]);
            parts.push(format!("Mood Score: {}/10", python_str(raw, mood.score)));
            if !mood.tags.is_empty() {
                parts.push(format!("Mood Tags: {}", mood.tags.join(", ")));
            }
            if let Some(notes) = mood
                .notes
                .as_deref()
                .map(str::trim)
                .filter(|n| !n.is_empty())
            {
                parts.push(format!("Notes: {notes}"));
            }
            (
                Some(json!({"recent_score": mood.score, "tags": mood.tags, "notes": mood.notes})),
                None,
            )
        }
        types::ACTIVITY_CREATED => {
            let activity = ActivityEntry::from_event(event)?;
            parts.push(format!("Activity: {}", activity.activity_type));
            if let Some(minutes) = activity.duration_minutes {
                let raw = data_field(event, &["duration", "duration_minutes"]);
                parts.push(format!("Duration: {} minutes", python_str(raw, minutes)));
            }
            if let Some(calories) = activity.calories {
                let raw = data_field(event, &["calories", "calories_burned"]);
                parts.push(format!("Calories: {}", python_str(raw, calories)));
            }
            let summary = json!({
                "activity_type": activity.activity_type,
                "duration": activity.duration_minutes,
                "calories": activity.calories,
            });
            (None, Some(summary))
        }
        other => {
            return Err(EventError::schema(
                "event_type",
                format!("mood_created cannot aggregate `{other}`"),
            ));
        }
    };
    Ok(ContextSnapshot {
        user_id,
        snapshot_type: "incremental".into(),
        timeframe: "recent".into(),
        timestamp: Some(event.timestamp.as_str().to_owned()),
        source_event: Some(
            json!({"event_id": event.event_id.to_string(), "event_type": event.event_type}),
        ),
        mood_summary,
        activity_summary,
        text_representation: parts.join(" | "),
        truncated: false,
        source_text_chars: None,
        summaries_truncated: false,
        extra: Map::new(),
    })
}

/// The first of `keys` in the event's `data` that is not null, as the producer sent it.
fn data_field<'a>(event: &'a Event, keys: &[&str]) -> Option<&'a Value> {
    let data = event.field("data")?;
    keys.iter()
        .find_map(|k| data.get(*k).filter(|v| !v.is_null()))
}

/// A number as the Python original's f-string prints what `json.loads` made of it: a JSON integer as an int (`7`),
/// anything else as a float's `repr` (`7.0`, `6.5`, `1e+16`), a numeric string as it was. `parsed` is the value
/// already read from `raw`, used when `raw` is absent.
fn python_str(raw: Option<&Value>, parsed: f64) -> String {
    match raw {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => aura_runtime::events::pyfmt::float_str(parsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aura_runtime::testing::embedded;

    #[test]
    fn numbers_print_as_the_python_original_prints_what_it_was_sent() {
        assert_eq!(python_str(Some(&json!(7)), 7.0), "7");
        assert_eq!(python_str(Some(&json!(7.0)), 7.0), "7.0");
        assert_eq!(python_str(Some(&json!("7")), 7.0), "7");
    }

    fn event(event_type: &str, user: Option<&str>, data: Value) -> Event {
        let mut e = Event::new(event_type, user.map(str::to_owned), Some("trace-7".into()));
        e.set_field("data", data);
        e
    }

    #[tokio::test]
    async fn mood_created_publishes_one_context_aggregated_event() {
        let fixture = embedded();
        let ctx = &fixture.ctx;
        let input = event(
            types::MOOD_CREATED,
            Some("user-1"),
            json!({"mood_score": 7, "tags": ["calm", "focused"], "notes": "Good sleep", "created_at": "2025-03-01T08:00:00"}),
        );
        let out = MoodCreated.handle(&input, ctx).await.unwrap();
        assert_eq!(out.len(), 1);
        let aggregated = &out[0];
        assert_eq!(aggregated.event_type, types::CONTEXT_AGGREGATED);
        assert_eq!(aggregated.trace_id.as_deref(), Some("trace-7"));
        assert_eq!(
            aggregated.causation_id(),
            Some(input.event_id.to_string().as_str())
        );
        assert_eq!(aggregated.origin_event_id(), input.event_id.to_string());
        let data = aggregated.field("context_data").unwrap();
        assert_eq!(
            data["text_representation"],
            "User: user-1 | Mood Score: 7/10 | Mood Tags: calm, focused | Notes: Good sleep"
        );
        assert_eq!(
            data["mood_summary"],
            json!({"recent_score": 7.0, "tags": ["calm", "focused"], "notes": "Good sleep"})
        );
        assert_eq!(data["snapshot_type"], "incremental");
        assert_eq!(data["timeframe"], "recent");
        assert_eq!(data["user_id"], "user-1");
        assert_eq!(data["timestamp"], input.timestamp.as_str());
    }

    #[test]
    fn django_shape_gives_the_same_text() {
        let e = event(
            types::MOOD_CREATED,
            Some("7"),
            json!({"mood_id": 3, "level": 4.5, "recorded_at": "2025-03-01", "note": "tired", "tags": []}),
        );
        assert_eq!(
            aggregate(&e).unwrap().text_representation,
            "User: 7 | Mood Score: 4.5/10 | Notes: tired"
        );
    }

    #[test]
    fn activity_becomes_an_activity_summary() {
        let e = event(
            types::ACTIVITY_CREATED,
            Some("u2"),
            json!({"activity_type": "running", "duration": 30, "calories": 250}),
        );
        let snapshot = aggregate(&e).unwrap();
        assert_eq!(
            snapshot.text_representation,
            "User: u2 | Activity: running | Duration: 30 minutes | Calories: 250"
        );
        assert_eq!(
            snapshot.activity_summary,
            Some(json!({"activity_type": "running", "duration": 30.0, "calories": 250.0}))
        );
        assert_eq!(snapshot.mood_summary, None);
    }

    #[tokio::test]
    async fn missing_user_or_wrong_types_are_permanent_errors() {
        let fixture = embedded();
        let ctx = &fixture.ctx;
        let cases = [
            event(types::MOOD_CREATED, None, json!({"mood_score": 5})),
            event(types::MOOD_CREATED, Some("  "), json!({"mood_score": 5})),
            event(
                types::MOOD_CREATED,
                Some("u"),
                json!({"mood_score": "five"}),
            ),
            event(
                types::MOOD_CREATED,
                Some("u"),
                json!({"mood_score": 5, "tags": "calm"}),
            ),
            event(types::MOOD_CREATED, Some("u"), json!("not an object")),
            event(types::ACTIVITY_CREATED, Some("u"), json!({"duration": 10})),
        ];
        for input in cases {
            let err = MoodCreated.handle(&input, ctx).await.unwrap_err();
            assert!(
                matches!(err, HandlerError::Permanent(_)),
                "{input:?} -> {err}"
            );
        }
    }
}
