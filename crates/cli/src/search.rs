//! `vectordb search` as a person reads it: one line per hit with its score, date, kind and the note's text.

use std::fmt::Write as _;

use aura_runtime::store::Hit;
use serde_json::Value;

/// Characters of a hit's text shown on its line (the payload keeps up to its own bound; `--json` shows all of it).
const SHOWN_CHARS: usize = 160;

pub fn render(user: &str, query: &str, model: &str, hits: &[Hit]) -> String {
    if hits.is_empty() {
        return format!("no points for user {user}\n");
    }
    let mut out = format!(
        "{} best match{} for {user} — \"{query}\" ({model}):\n",
        hits.len(),
        if hits.len() == 1 { "" } else { "es" }
    );
    for (rank, hit) in hits.iter().enumerate() {
        let payload = &hit.payload;
        let date = payload
            .get("created_at")
            .and_then(date)
            .unwrap_or_else(|| "(no date)".to_owned());
        // What the user recorded: `user.mood.created` → mood, `user.activity.created` → activity.
        let kind = payload
            .get("source_event")
            .and_then(|s| s.get("event_type"))
            .and_then(Value::as_str)
            .map(|t| t.trim_start_matches("user.").trim_end_matches(".created"))
            .or_else(|| payload.get("snapshot_type").and_then(Value::as_str))
            .unwrap_or("-");
        let text = payload.get("text").and_then(Value::as_str).unwrap_or("");
        let _ = writeln!(
            out,
            "{:>2}. {:.3}  {date}  {kind:<8}  {}",
            rank + 1,
            hit.score,
            shown(text, user)
        );
    }
    out
}

/// `created_at` (epoch seconds, integer or float, or an ISO string) as `2025-03-01 07:29 UTC`.
fn date(value: &Value) -> Option<String> {
    let seconds = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => {
            return Some(
                chrono::DateTime::parse_from_rfc3339(s)
                    .map(|t| t.to_utc().format("%Y-%m-%d %H:%M UTC").to_string())
                    .unwrap_or_else(|_| s.clone()),
            );
        }
        _ => return None,
    };
    chrono::DateTime::from_timestamp(seconds.trunc() as i64, 0)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
}

/// The chunk's text without the `User: <id> | ` its text representation starts with (the header names the user),
/// on one line, cut at [`SHOWN_CHARS`] with `…`.
fn shown(text: &str, user: &str) -> String {
    let text = text
        .strip_prefix(&format!("User: {user} | "))
        .unwrap_or(text);
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match one_line.char_indices().nth(SHOWN_CHARS) {
        Some((cut, _)) => format!("{}…", &one_line[..cut]),
        None => one_line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hit(score: f32, payload: Value) -> Hit {
        Hit {
            id: "x".into(),
            score,
            payload: payload.as_object().unwrap().clone(),
        }
    }

    #[test]
    fn hits_show_rank_score_date_kind_and_the_text_without_the_user_prefix() {
        let hits = [
            hit(
                0.61234,
                json!({"created_at": 1_740_814_140, "snapshot_type": "incremental",
                       "source_event": {"event_type": "user.mood.created"},
                       "text": "User: user-003 | Mood Score: 4/10 | Notes: Deadline pressure at work"}),
            ),
            hit(
                0.5,
                json!({"created_at": "2025-03-02T10:00:00+01:00", "snapshot_type": "daily", "text": "x\ny"}),
            ),
            hit(0.4, json!({"text": "é".repeat(400)})),
        ];
        let out = render("user-003", "work stress", "m", &hits);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0],
            "3 best matches for user-003 — \"work stress\" (m):"
        );
        assert_eq!(
            lines[1],
            " 1. 0.612  2025-03-01 07:29 UTC  mood      Mood Score: 4/10 | Notes: Deadline pressure at work"
        );
        assert_eq!(lines[2], " 2. 0.500  2025-03-02 09:00 UTC  daily     x y");
        assert!(lines[3].contains("(no date)") && lines[3].ends_with('…'));
        assert_eq!(lines[3].chars().filter(|c| *c == 'é').count(), SHOWN_CHARS);
        assert_eq!(render("u", "q", "m", &[]), "no points for user u\n");
    }
}
