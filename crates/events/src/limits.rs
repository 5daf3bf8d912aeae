//! Size limits: what keeps memory, events and point payloads bounded by configuration instead of by input.
//!
//! Three limits are settings ([`Limits`], docs/limits.md); the rest are fixed bounds of the point payload schema
//! (docs/limits.md, "Point payload"). Each limit has one outcome, chosen so that a user's long journal entry still becomes
//! searchable:
//! - an input event over `MAX_EVENT_BYTES` is dead-lettered with its size (nothing of it can be trusted to fit
//!   anywhere downstream), and so is a produced event over it (a permanent error that names the setting);
//! - text beyond `MAX_EMBED_CHARS`, and chunks beyond `MAX_CHUNKS_PER_EVENT`, are cut: the beginning of the text is
//!   embedded and the snapshot and every point say `truncated: true` with the original length;
//! - summaries (`mood_summary`, `activity_summary`, `ikigai_summary`, …) are cut to a byte budget by
//!   [`bound_json`]: long strings shortened, long lists and deep nesting cut, the point marked `truncated`.

use serde_json::{Map, Value};

/// The configurable limits (`MAX_EVENT_BYTES`, `MAX_EMBED_CHARS`, `MAX_CHUNKS_PER_EVENT`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest event, in JSON bytes, taken in or produced. Kafka's default record limit is 1,000,000 bytes
    /// (librdkafka's `message.max.bytes`), so the default keeps every produced event publishable there.
    pub max_event_bytes: usize,
    /// Characters of an event's text that are chunked and embedded; the rest is cut and marked.
    pub max_embed_chars: usize,
    /// Chunks (and so points) per event.
    pub max_chunks: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_event_bytes: 1_000_000,
            max_embed_chars: 30_000,
            max_chunks: 40,
        }
    }
}

/// Characters of one string inside a bounded summary (a mood's `notes` in a point's `mood_summary`).
pub const SUMMARY_STRING_CHARS: usize = 1_000;
/// Items of one list inside a bounded summary (a mood's `tags`).
pub const SUMMARY_LIST_ITEMS: usize = 50;
/// Nesting kept inside a summary; deeper values become `null`.
pub const SUMMARY_DEPTH: usize = 6;
/// JSON bytes all summaries of one snapshot may take together, in the point payload and in produced events.
pub const SUMMARIES_BYTES: usize = 8 * 1024;
/// Characters of a short identifier-like field copied into a payload (`trace_id`, `event_type`, `snapshot_type`).
pub const LABEL_CHARS: usize = 256;
/// Characters of one point's `text`: a chunk is 900; a foreign `context.vectorized` event may carry anything.
pub const POINT_TEXT_CHARS: usize = 1_000;
/// What one point's payload can take, serialised, whatever the input (asserted by property tests): about ten
/// labels of [`LABEL_CHARS`], the text, and [`SUMMARIES_BYTES`], each at JSON's worst escaping. Ordinary points
/// take 1–4 KiB.
pub const POINT_PAYLOAD_BYTES: usize = 32 * 1024;

/// The first `max` characters of `text`, and whether anything was cut. Never splits a character.
pub fn truncate_chars(text: &str, max: usize) -> (&str, bool) {
    match text.char_indices().nth(max) {
        Some((at, _)) => (&text[..at], true),
        None => (text, false),
    }
}

/// A copy of `value` that serialises to at most `budget` bytes (plus a few bytes of brackets), and whether
/// anything was cut. Strings keep their first [`SUMMARY_STRING_CHARS`] characters, lists their first
/// [`SUMMARY_LIST_ITEMS`] items, objects their first keys in order; nesting deeper than [`SUMMARY_DEPTH`] becomes
/// `null`. Whatever is left when the budget runs out is dropped.
pub fn bound_json(value: &Value, budget: usize) -> (Value, bool) {
    let mut bounder = Bounder {
        left: budget,
        cut: false,
    };
    let bounded = bounder.value(value, 0).unwrap_or(Value::Null);
    (bounded, bounder.cut)
}

struct Bounder {
    left: usize,
    cut: bool,
}

impl Bounder {
    /// The bounded value, or `None` when not even its smallest form fits.
    fn value(&mut self, value: &Value, depth: usize) -> Option<Value> {
        if depth > SUMMARY_DEPTH && matches!(value, Value::Array(_) | Value::Object(_)) {
            self.cut = true;
            return self.take(4).then_some(Value::Null);
        }
        match value {
            Value::Null => self.take(4).then_some(Value::Null),
            Value::Bool(b) => self.take(5).then_some(Value::Bool(*b)),
            Value::Number(n) => self.take(n.to_string().len()).then(|| value.clone()),
            Value::String(s) => self.string(s).map(Value::String),
            Value::Array(items) => {
                if !self.take(2) {
                    return None;
                }
                let mut out = Vec::new();
                for (index, item) in items.iter().enumerate() {
                    if index == SUMMARY_LIST_ITEMS || !self.take(1) {
                        self.cut = true;
                        break;
                    }
                    match self.value(item, depth + 1) {
                        Some(v) => out.push(v),
                        None => {
                            self.cut = true;
                            break;
                        }
                    }
                }
                Some(Value::Array(out))
            }
            Value::Object(map) => {
                if !self.take(2) {
                    return None;
                }
                let mut out = Map::new();
                for (key, item) in map {
                    let Some(key) = self.string(key) else {
                        self.cut = true;
                        break;
                    };
                    if !self.take(2) {
                        self.cut = true;
                        break;
                    }
                    match self.value(item, depth + 1) {
                        Some(v) => {
                            out.insert(key, v);
                        }
                        None => {
                            self.cut = true;
                            break;
                        }
                    }
                }
                Some(Value::Object(out))
            }
        }
    }

    /// The longest prefix (at most [`SUMMARY_STRING_CHARS`] characters) whose JSON form fits what is left.
    fn string(&mut self, s: &str) -> Option<String> {
        if !self.take(2) {
            return None;
        }
        let mut end = 0;
        for (count, (at, c)) in s.char_indices().enumerate() {
            let cost = escaped_len(c);
            if count == SUMMARY_STRING_CHARS || cost > self.left {
                self.cut = true;
                break;
            }
            self.left -= cost;
            end = at + c.len_utf8();
        }
        Some(s[..end].to_owned())
    }

    fn take(&mut self, bytes: usize) -> bool {
        if bytes > self.left {
            self.cut = true;
            return false;
        }
        self.left -= bytes;
        true
    }
}

/// Bytes `c` takes inside a JSON string as serde_json writes it.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn size(value: &Value) -> usize {
        serde_json::to_string(value).unwrap().len()
    }

    #[test]
    fn truncation_counts_characters_and_never_splits_one() {
        assert_eq!(truncate_chars("héllo", 2), ("hé", true));
        assert_eq!(truncate_chars("héllo", 5), ("héllo", false));
        assert_eq!(truncate_chars("", 0), ("", false));
        assert_eq!(truncate_chars("🙂🙂", 1), ("🙂", true));
    }

    #[test]
    fn a_small_summary_is_kept_as_it_is() {
        let summary = json!({"recent_score": 7.5, "tags": ["calm", "rested"], "notes": "good \"day\"\n", "x": null, "ok": true});
        assert_eq!(bound_json(&summary, 1024), (summary, false));
    }

    #[test]
    fn long_notes_many_tags_and_deep_nesting_are_cut_and_reported() {
        let mut deep = json!("bottom");
        for _ in 0..50 {
            deep = json!([deep]);
        }
        let tags: Vec<String> = (0..20_000).map(|i| format!("tag-{i}")).collect();
        let summary = json!({"notes": "x".repeat(1_000_000), "tags": tags, "deep": deep});
        let (bounded, cut) = bound_json(&summary, SUMMARIES_BYTES);
        assert!(cut);
        assert!(size(&bounded) <= SUMMARIES_BYTES, "{}", size(&bounded));
        assert_eq!(
            bounded["notes"].as_str().unwrap().len(),
            SUMMARY_STRING_CHARS
        );
        assert_eq!(
            bounded["tags"].as_array().unwrap().len(),
            SUMMARY_LIST_ITEMS
        );
        assert!(bounded["deep"].to_string().contains("null"));
    }

    #[test]
    fn the_budget_holds_for_escapes_and_multibyte_text() {
        for text in ["\u{1}".repeat(5000), "🙂".repeat(5000), "\"".repeat(5000)] {
            let value = json!({"a": text, "b": [text, text], "c": {"d": text}});
            for budget in [0, 1, 7, 64, 1000, 4096] {
                let (bounded, cut) = bound_json(&value, budget);
                assert!(cut);
                assert!(
                    size(&bounded) <= budget.max(4),
                    "{budget}: {}",
                    size(&bounded)
                );
            }
        }
    }
}
