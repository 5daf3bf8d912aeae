//! Celery message protocol v2 as it travels through kombu's Redis transport.
//!
//! A Redis list element is a JSON *envelope* (`body`, `content-encoding`, `content-type`, `headers`,
//! `properties`); its `body` is base64 of the JSON *body* `[args, kwargs, {callbacks, errbacks, chain, chord}]`.
//! Headers and properties stay JSON maps in their original key order: a message we requeue, retry or restore is
//! re-serialised with only the fields Celery itself changes, and everything we do not know about (stamps, custom
//! headers, newer protocol fields) survives. Typed views ([`TaskMessage`]) are read leniently — floats where ints
//! are expected, nulls anywhere — because Python producers write both.
//!
//! [`TaskBuilder`] writes messages the way `app.send_task(...)` does (same keys, same order, same separators), so
//! a Python worker cannot tell our messages from its own.

use aura_runtime::events::payload::json_kind;
use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use uuid::Uuid;

use crate::pyjson;

/// kombu's base64: standard alphabet; padding accepted whether present or not.
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// How long `argsrepr` may grow (Celery's `argsrepr_maxsize`).
const ARGSREPR_MAX: usize = 1024;
/// Nesting depth `saferepr` prints before writing `[...]` / `{...}` (Celery's `maxlevels`).
const REPR_MAX_LEVELS: usize = 3;

/// Why a message cannot be run. Each is permanent: the message is dead-lettered with this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MessageError {
    #[error("message is not JSON: {0}")]
    NotJson(String),
    #[error("message is not a kombu envelope: {0}")]
    BadEnvelope(String),
    #[error("message body is not valid base64: {0}")]
    BadBase64(String),
    #[error("content type {0:?} is not supported (only application/json)")]
    UnsupportedContentType(String),
    #[error("message body is not JSON: {0}")]
    BodyNotJson(String),
    #[error("message body is not [args, kwargs, embed]: {0}")]
    BadBody(String),
    #[error("message has no `{0}` header (Celery message protocol v2 required)")]
    MissingHeader(&'static str),
    #[error(
        "message is {bytes} bytes, over the {limit} bytes MAX_EVENT_BYTES allows (the event's JSON in base64 plus \
         64 KiB of envelope)"
    )]
    TooLarge { bytes: usize, limit: usize },
}

/// The kombu envelope: the Redis list element.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub body: String,
    #[serde(rename = "content-encoding", default = "utf8")]
    pub content_encoding: String,
    #[serde(rename = "content-type", default = "application_json")]
    pub content_type: String,
    #[serde(default)]
    pub headers: Map<String, Value>,
    #[serde(default)]
    pub properties: Map<String, Value>,
}

fn utf8() -> String {
    "utf-8".into()
}

fn application_json() -> String {
    "application/json".into()
}

impl Envelope {
    /// Reads an envelope; Python's `NaN`/`Infinity` (a `timelimit` of `float('inf')`) read as `null`.
    pub fn from_slice(raw: &[u8]) -> Result<Self, MessageError> {
        pyjson::from_slice_lenient(raw).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => MessageError::BadEnvelope(e.to_string()),
            _ => MessageError::NotJson(e.to_string()),
        })
    }

    /// The envelope as Python's `json.dumps` writes it.
    pub fn to_vec(&self) -> Vec<u8> {
        pyjson::to_vec(self)
    }

    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.headers.get(key).and_then(Value::as_str)
    }

    pub fn property_str(&self, key: &str) -> Option<&str> {
        self.properties.get(key).and_then(Value::as_str)
    }

    pub fn delivery_tag(&self) -> Option<&str> {
        self.property_str("delivery_tag")
    }

    /// `properties.delivery_info.{exchange, routing_key}`.
    pub fn delivery_info(&self) -> (String, Option<String>) {
        let info = self.properties.get("delivery_info");
        let field = |key| {
            info.and_then(|i| i.get(key))
                .and_then(Value::as_str)
                .map(str::to_owned)
        };
        (field("exchange").unwrap_or_default(), field("routing_key"))
    }

    /// `properties.priority`, clamped to 0..=255 (kombu's Redis transport then maps it to 0, 3, 6 or 9).
    pub fn priority(&self) -> u8 {
        self.properties
            .get("priority")
            .and_then(lenient_f64)
            .map(|p| p.clamp(0.0, 255.0) as u8)
            .unwrap_or(0)
    }

    /// The decoded body bytes (`properties.body_encoding`: `base64` or absent).
    pub fn body_bytes(&self) -> Result<Vec<u8>, MessageError> {
        match self.property_str("body_encoding") {
            Some("base64") => BASE64
                .decode(self.body.trim())
                .map_err(|e| MessageError::BadBase64(e.to_string())),
            _ => Ok(self.body.clone().into_bytes()),
        }
    }

    /// Marks the envelope the way kombu's restore does before putting it back on its queue.
    pub fn mark_redelivered(&mut self) {
        self.headers.insert("redelivered".into(), Value::Bool(true));
        if let Some(Value::Object(info)) = self.properties.get_mut("delivery_info") {
            info.insert("redelivered".into(), Value::Bool(true));
        }
    }
}

/// A task message, read: the envelope plus the typed fields the worker acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMessage {
    pub envelope: Envelope,
    pub task: String,
    pub id: String,
    pub retries: u32,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// `timelimit = [hard, soft]` in seconds; either may be null.
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub body: TaskBody,
}

/// `[args, kwargs, embed]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskBody {
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// `callbacks`, `errbacks`, `chain`, `chord`: signature dicts or null, kept as sent.
    pub embed: Map<String, Value>,
}

impl TaskBody {
    pub fn parse(bytes: &[u8]) -> Result<Self, MessageError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            let hint = if pyjson::python_constants_to_null(bytes).is_some() {
                " (NaN and Infinity, which Python's json writes, are not JSON: the event must not carry them)"
            } else {
                ""
            };
            MessageError::BodyNotJson(format!("{e}{hint}"))
        })?;
        let Value::Array(mut parts) = value else {
            return Err(MessageError::BadBody(format!(
                "expected a JSON array, got {}",
                json_kind(&value)
            )));
        };
        if parts.is_empty() || parts.len() > 3 {
            return Err(MessageError::BadBody(format!(
                "expected 1 to 3 elements, got {}",
                parts.len()
            )));
        }
        let embed = object_or_empty("embed", parts.get_mut(2).map(Value::take))?;
        let kwargs = object_or_empty("kwargs", parts.get_mut(1).map(Value::take))?;
        let args = match parts[0].take() {
            Value::Array(args) => args,
            Value::Null => Vec::new(),
            other => {
                return Err(MessageError::BadBody(format!(
                    "args must be an array, got {}",
                    json_kind(&other)
                )));
            }
        };
        Ok(Self {
            args,
            kwargs,
            embed,
        })
    }
}

impl TaskMessage {
    /// Reads a Redis list element. The envelope is returned with the error when it could be read, so the caller
    /// can still acknowledge and dead-letter by its delivery tag.
    pub fn parse(raw: &[u8]) -> Result<Self, (Option<Box<Envelope>>, MessageError)> {
        let envelope = Envelope::from_slice(raw).map_err(|e| (None, e))?;
        Self::from_envelope(envelope).map_err(|(envelope, e)| (Some(envelope), e))
    }

    fn from_envelope(envelope: Envelope) -> Result<Self, (Box<Envelope>, MessageError)> {
        match Self::read_fields(&envelope) {
            Ok(fields) => Ok(Self { envelope, ..fields }),
            Err(error) => Err((Box::new(envelope), error)),
        }
    }

    /// Every field but the envelope itself (left empty).
    fn read_fields(envelope: &Envelope) -> Result<Self, MessageError> {
        let headers = &envelope.headers;
        let task = envelope
            .header_str("task")
            .ok_or(MessageError::MissingHeader("task"))?
            .to_owned();
        let id = envelope
            .header_str("id")
            .or_else(|| envelope.property_str("correlation_id"))
            .ok_or(MessageError::MissingHeader("id"))?
            .to_owned();
        let content_type = envelope.content_type.trim().to_ascii_lowercase();
        if content_type != "application/json" && content_type != "application/x-json" {
            return Err(MessageError::UnsupportedContentType(
                envelope.content_type.clone(),
            ));
        }
        let body = TaskBody::parse(&envelope.body_bytes()?)?;
        let (time_limit, soft_time_limit) = match headers.get("timelimit") {
            Some(Value::Array(limits)) => (
                limits.first().and_then(lenient_f64),
                limits.get(1).and_then(lenient_f64),
            ),
            _ => (None, None),
        };
        Ok(Self {
            envelope: Envelope {
                body: String::new(),
                content_encoding: String::new(),
                content_type: String::new(),
                headers: Map::new(),
                properties: Map::new(),
            },
            task,
            id,
            retries: headers
                .get("retries")
                .and_then(lenient_f64)
                .map(|r| r.max(0.0) as u32)
                .unwrap_or(0),
            eta: headers.get("eta").and_then(lenient_time),
            expires: headers.get("expires").and_then(lenient_time),
            time_limit: time_limit.filter(|l| *l > 0.0),
            soft_time_limit: soft_time_limit.filter(|l| *l > 0.0),
            root_id: envelope.header_str("root_id").map(str::to_owned),
            parent_id: envelope.header_str("parent_id").map(str::to_owned),
            body,
        })
    }

    /// The message Celery's `Task.retry` sends: same id and body, `retries + 1`, a new `eta`, a new delivery tag.
    pub fn retry_envelope(&self, eta: DateTime<Utc>) -> Envelope {
        let mut envelope = self.envelope.clone();
        envelope
            .headers
            .insert("retries".into(), json!(self.retries.saturating_add(1)));
        envelope.headers.insert("eta".into(), json!(iso(eta)));
        envelope.headers.remove("redelivered");
        envelope
            .properties
            .insert("delivery_tag".into(), json!(Uuid::new_v4().to_string()));
        if let Some(Value::Object(info)) = envelope.properties.get_mut("delivery_info") {
            info.remove("redelivered");
        }
        envelope
    }
}

/// A number, or a string holding one (Python producers write `2`, `2.0` and occasionally `"2"`).
pub fn lenient_f64(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// An ISO-8601 time (offset or naive = UTC), or epoch seconds.
pub fn lenient_time(value: &Value) -> Option<DateTime<Utc>> {
    match value {
        Value::String(text) => {
            let text = text.trim();
            DateTime::parse_from_rfc3339(text)
                .map(|t| t.with_timezone(&Utc))
                .ok()
                .or_else(|| {
                    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f")
                        .ok()
                        .map(|t| t.and_utc())
                })
        }
        Value::Number(n) => n
            .as_f64()
            .and_then(|s| DateTime::from_timestamp_micros((s * 1e6) as i64)),
        _ => None,
    }
}

/// A time as Celery writes it: `2026-11-28T09:31:06.988132+00:00`.
pub fn iso(time: DateTime<Utc>) -> String {
    time.to_rfc3339_opts(SecondsFormat::Micros, false)
}

/// What `send_task` needs besides the task name and arguments.
#[derive(Debug, Clone, Default)]
pub struct TaskOptions {
    pub id: Option<String>,
    pub queue: String,
    pub priority: Option<u8>,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    /// `[hard, soft]` seconds.
    pub time_limit: (Option<f64>, Option<f64>),
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    /// `origin` header: `gen<pid>@<host>` in Python.
    pub origin: String,
    /// `reply_to`: the producing app's id (a uuid per process in Python).
    pub reply_to: String,
    /// The rest of a `chain` (the body's `embed.chain`), passed on to the next task.
    pub chain: Option<Value>,
}

/// A task message ready to push: its id, the list it goes to, and the envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct OutgoingTask {
    pub id: String,
    pub queue: String,
    pub priority: u8,
    pub envelope: Envelope,
}

/// Writes task messages as `app.send_task(name, args=args, kwargs=kwargs, **options)` does.
pub fn build_task<A: Serialize>(
    name: &str,
    args: &[A],
    kwargs: &Map<String, Value>,
    options: &TaskOptions,
) -> OutgoingTask {
    let id = options
        .id
        .clone()
        .unwrap_or_else(|| Uuid::new_v4().to_string());
    let embed = json!({"callbacks": null, "errbacks": null, "chain": options.chain, "chord": null});
    let args_value = serde_json::to_value(args).unwrap_or(Value::Null);
    let body = pyjson::to_vec(&(&args_value, kwargs, &embed));
    let headers = json!({
        "lang": "py",
        "task": name,
        "id": id,
        "shadow": null,
        "eta": options.eta.map(iso),
        "expires": options.expires.map(iso),
        "group": null,
        "group_index": null,
        "retries": 0,
        "timelimit": [options.time_limit.0, options.time_limit.1],
        "root_id": options.root_id.clone().unwrap_or_else(|| id.clone()),
        "parent_id": options.parent_id,
        "argsrepr": saferepr(&args_value, ARGSREPR_MAX),
        "kwargsrepr": saferepr(&Value::Object(kwargs.clone()), ARGSREPR_MAX),
        "origin": options.origin,
        "ignore_result": null,
        "replaced_task_nesting": 0,
        "stamped_headers": null,
        "stamps": {},
    });
    let priority = options.priority.unwrap_or(0);
    let mut properties = Map::new();
    properties.insert("correlation_id".into(), json!(id));
    properties.insert("reply_to".into(), json!(options.reply_to));
    properties.insert("delivery_mode".into(), json!(2));
    if let Some(expires) = options.expires {
        // kombu turns `expires` into a per-message TTL in milliseconds, as a string.
        let ms = (expires - Utc::now()).num_milliseconds().max(0);
        properties.insert("expiration".into(), json!(ms.to_string()));
    }
    properties.insert(
        "delivery_info".into(),
        json!({"exchange": "", "routing_key": options.queue}),
    );
    properties.insert("priority".into(), json!(priority));
    properties.insert("body_encoding".into(), json!("base64"));
    properties.insert("delivery_tag".into(), json!(Uuid::new_v4().to_string()));
    OutgoingTask {
        id,
        queue: options.queue.clone(),
        priority,
        envelope: Envelope {
            body: BASE64.encode(body),
            content_encoding: utf8(),
            content_type: application_json(),
            headers: match headers {
                Value::Object(map) => map,
                _ => Map::new(),
            },
            properties,
        },
    }
}

/// The tasks Celery sends after a task succeeded: each `link` callback, and the next task of a `chain`, with the
/// result prepended to their arguments (unless the signature is immutable), chained to the finished task.
pub fn follow_ups(
    finished: &TaskMessage,
    result: &Value,
    default_queue: &str,
    origin: &str,
) -> Vec<OutgoingTask> {
    let mut signatures: Vec<(Value, Option<Value>)> = Vec::new();
    if let Some(Value::Array(callbacks)) = finished.body.embed.get("callbacks") {
        signatures.extend(callbacks.iter().map(|s| (s.clone(), None)));
    }
    if let Some(Value::Array(chain)) = finished.body.embed.get("chain")
        && let Some((next, rest)) = chain.split_last()
    {
        let rest = (!rest.is_empty()).then(|| Value::Array(rest.to_vec()));
        signatures.push((next.clone(), rest));
    }
    signatures
        .into_iter()
        .filter_map(|(signature, chain)| {
            let name = signature.get("task")?.as_str()?;
            let options = signature.get("options").cloned().unwrap_or(Value::Null);
            let mut args = Vec::new();
            if !signature
                .get("immutable")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                args.push(result.clone());
            }
            if let Some(Value::Array(extra)) = signature.get("args") {
                args.extend(extra.iter().cloned());
            }
            let kwargs = match signature.get("kwargs") {
                Some(Value::Object(kwargs)) => kwargs.clone(),
                _ => Map::new(),
            };
            let task_options = TaskOptions {
                id: options
                    .get("task_id")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                queue: options
                    .get("queue")
                    .and_then(Value::as_str)
                    .unwrap_or(default_queue)
                    .to_owned(),
                priority: options
                    .get("priority")
                    .and_then(lenient_f64)
                    .map(|p| p.clamp(0.0, 255.0) as u8),
                root_id: Some(
                    finished
                        .root_id
                        .clone()
                        .unwrap_or_else(|| finished.id.clone()),
                ),
                parent_id: Some(finished.id.clone()),
                origin: origin.to_owned(),
                chain,
                ..TaskOptions::default()
            };
            Some(build_task(name, &args, &kwargs, &task_options))
        })
        .collect()
}

/// Celery's `saferepr` (`celery.utils.saferepr`) of JSON data, token for token: containers past three levels as
/// `[...]`/`{...}`, strings in Celery's quoting ([`format_chars`]), and a budget of `max_len` characters that each
/// token cuts the next one against (`truncate`), then `, ...` and the closing brackets of the containers still open.
/// Shown by Flower and in logs, never parsed; pinned by `tests/golden.rs` against Celery 5.7's `send_task` output.
pub fn saferepr(value: &Value, max_len: usize) -> String {
    let mut tokens = Vec::new();
    repr_tokens(value, 0, &mut tokens);
    let mut out = String::new();
    let mut budget = max_len as i64;
    let mut rest = tokens.len();
    for (i, token) in tokens.iter().enumerate() {
        if budget <= 0 {
            if let Token::Literal {
                text, direction, ..
            } = token
                && *direction < 0
            {
                // The cut value was the last of its container: nothing is left out, just close it.
                out.push_str(text);
                continue;
            }
            out.push_str(", ...");
            rest = i;
            break;
        }
        let text = match token {
            Token::Literal { text, .. } => (*text).to_owned(),
            Token::Quoted(text) => format_chars(text, budget),
            Token::Other(text) => truncate(text, budget),
        };
        budget -= text.chars().count() as i64;
        out.push_str(&text);
    }
    // The brackets of containers opened before the cut; one opened after it is not shown, nor its closing bracket.
    let mut depth = 0i32;
    for token in &tokens[rest.min(tokens.len())..] {
        if let Token::Literal {
            text,
            truncate: false,
            direction,
        } = token
        {
            depth += direction;
            if depth < 0 {
                depth = 0;
                out.push_str(text);
            }
        }
    }
    out
}

/// One token of Celery's `reprstream`.
enum Token<'a> {
    /// Brackets and separators (`truncate`: a separator, dropped after the cut; `direction`: +1 opens, -1 closes).
    Literal {
        text: &'static str,
        truncate: bool,
        direction: i32,
    },
    /// A string (a value or a key).
    Quoted(&'a str),
    /// A number, `True`/`False`/`None`.
    Other(String),
}

const LIST_SEP: Token<'static> = Token::Literal {
    text: ", ",
    truncate: true,
    direction: 0,
};

fn repr_tokens<'a>(value: &'a Value, level: usize, out: &mut Vec<Token<'a>>) {
    let literal = |text, direction| Token::Literal {
        text,
        truncate: false,
        direction,
    };
    match value {
        Value::Null => out.push(Token::Other("None".into())),
        Value::Bool(b) => out.push(Token::Other(if *b { "True" } else { "False" }.into())),
        Value::Number(n) => out.push(Token::Other(match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (None, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => aura_runtime::events::pyfmt::float_str(f),
            _ => n.to_string(),
        })),
        Value::String(text) => out.push(Token::Quoted(text)),
        Value::Array(_) if level >= REPR_MAX_LEVELS => out.push(literal("[...]", 0)),
        Value::Object(_) if level >= REPR_MAX_LEVELS => out.push(literal("{...}", 0)),
        Value::Array(items) => {
            out.push(literal("[", 1));
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(LIST_SEP);
                }
                repr_tokens(item, level + 1, out);
            }
            out.push(literal("]", -1));
        }
        Value::Object(map) => {
            out.push(literal("{", 1));
            for (i, (key, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(LIST_SEP);
                }
                out.push(Token::Quoted(key));
                out.push(Token::Literal {
                    text: ": ",
                    truncate: true,
                    direction: 0,
                });
                repr_tokens(item, level + 1, out);
            }
            out.push(literal("}", -1));
        }
    }
}

/// Celery's `truncate`: text of `max_len` characters or more is cut there, back to its last space, plus `...`.
fn truncate(text: &str, max_len: i64) -> String {
    let max_len = max_len.max(0) as usize;
    if max_len == 0 || text.chars().count() < max_len {
        return text.to_owned();
    }
    let head: String = text.chars().take(max_len).collect();
    let kept = head
        .rsplit_once(' ')
        .map_or(head.as_str(), |(before, _)| before);
    format!("{kept}...")
}

/// A string as Celery's `saferepr` writes it (`_format_chars`), which is not Python's `repr`: always single quotes,
/// `'` written `\'`, nothing else escaped (a backslash, a newline or a `"` stay as they are); cut by [`truncate`].
fn format_chars(text: &str, max_len: i64) -> String {
    format!("'{}'", truncate(text, max_len).replace('\'', "\\'"))
}

/// A body part that must be an object when present (`null` or missing: empty).
fn object_or_empty(part: &str, value: Option<Value>) -> Result<Map<String, Value>, MessageError> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(map)) => Ok(map),
        Some(other) => Err(MessageError::BadBody(format!(
            "{part} must be an object, got {}",
            json_kind(&other)
        ))),
    }
}

#[cfg(test)]
mod tests;
