//! JSON written byte for byte the way Python's `json.dumps` writes it (kombu and Celery use its defaults).
//!
//! Separators `", "` and `": "`, `ensure_ascii=True` (every non-ASCII character and DEL as `\uXXXX`, astral
//! characters as surrogate pairs) and floats as Python's `repr` prints them (`1e-05`, `1e+16`, `2.0`). Writing the
//! same bytes as Python matters where bytes are compared or copied: the `unacked` hash entries kombu restores, the
//! envelopes a Python worker logs, and the round-trip tests against captured traffic.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{CharEscape, Formatter, Serializer};

/// `json.dumps(value)` as Python writes it.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    let mut serializer = Serializer::with_formatter(&mut out, PythonFormatter);
    // Values here are JSON trees and plain structs: serialising them into a Vec cannot fail.
    if value.serialize(&mut serializer).is_err() {
        out.clear();
    }
    out
}

/// `to_vec` as a `String` (the output is ASCII).
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    String::from_utf8(to_vec(value)).unwrap_or_default()
}

struct PythonFormatter;

/// Python's `json.dumps` puts `", "` between items (of a list or an object), serde_json `","`.
fn separate<W: ?Sized + Write>(writer: &mut W, first: bool) -> io::Result<()> {
    if first {
        Ok(())
    } else {
        writer.write_all(b", ")
    }
}

impl Formatter for PythonFormatter {
    fn begin_array_value<W: ?Sized + Write>(&mut self, out: &mut W, first: bool) -> io::Result<()> {
        separate(out, first)
    }

    fn begin_object_key<W: ?Sized + Write>(&mut self, out: &mut W, first: bool) -> io::Result<()> {
        separate(out, first)
    }

    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        let mut start = 0;
        for (index, ch) in fragment.char_indices() {
            if ch.is_ascii() && ch != '\x7f' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..index])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            start = index + ch.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }

    fn write_char_escape<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        // Python writes the same short escapes as serde_json, and `\u00XX` for other control characters.
        let text: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return write!(writer, "\\u{:04x}", byte),
        };
        writer.write_all(text)
    }

    fn write_f64<W: ?Sized + Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        writer.write_all(python_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        writer.write_all(python_float_repr(f64::from(value)).as_bytes())
    }
}

/// `json.dumps` of a float: `repr(float)` ([`aura_runtime::events::pyfmt::float_repr`]), and Python's `NaN`,
/// `Infinity`, `-Infinity` for what JSON has no number for.
pub fn python_float_repr(value: f64) -> String {
    if !value.is_finite() {
        return if value.is_nan() {
            "NaN".into()
        } else if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    aura_runtime::events::pyfmt::float_repr(value)
}

/// Python's `json.dumps` writes `NaN`, `Infinity` and `-Infinity` (its default `allow_nan=True`), which are not JSON.
/// Returns `raw` with each such token outside strings replaced by `null`, or `None` when there is none. Used on
/// envelopes and `unacked` entries only, where such a number can sit in a header (`timelimit`) and must not make the
/// whole message unreadable; task bodies stay strict (an event is JSON).
pub fn python_constants_to_null(raw: &[u8]) -> Option<Vec<u8>> {
    const TOKENS: [&[u8]; 3] = [b"-Infinity", b"Infinity", b"NaN"];
    let mut out: Option<Vec<u8>> = None;
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    let mut copied = 0;
    while i < raw.len() {
        let byte = raw[i];
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
            continue;
        }
        if byte == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if let Some(token) = TOKENS.iter().find(|t| raw[i..].starts_with(t)) {
            let buffer = out.get_or_insert_with(|| Vec::with_capacity(raw.len()));
            buffer.extend_from_slice(&raw[copied..i]);
            buffer.extend_from_slice(b"null");
            i += token.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    let mut buffer = out?;
    buffer.extend_from_slice(&raw[copied..]);
    Some(buffer)
}

/// `serde_json::from_slice`, accepting Python's `NaN`/`Infinity` as `null` when the strict parse fails.
pub fn from_slice_lenient<T: serde::de::DeserializeOwned>(raw: &[u8]) -> serde_json::Result<T> {
    match serde_json::from_slice(raw) {
        Ok(value) => Ok(value),
        Err(error) => match python_constants_to_null(raw) {
            Some(cleaned) => serde_json::from_slice(&cleaned),
            None => Err(error),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn writes_pythons_separators_and_escapes() {
        let value = json!({"a": [1, 2.5, null, true], "b": "é ☃ 😀 \u{7f} \n \"q\" /", "c": {}});
        assert_eq!(
            to_string(&value),
            r#"{"a": [1, 2.5, null, true], "b": "\u00e9 \u2603 \ud83d\ude00 \u007f \n \"q\" /", "c": {}}"#
        );
    }

    #[test]
    fn floats_read_like_python_repr() {
        let cases = [
            (2.5, "2.5"),
            (2.0, "2.0"),
            (0.0, "0.0"),
            (-0.5, "-0.5"),
            (1e-4, "0.0001"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (1795858277.9550505, "1795858277.9550505"),
            (0.002828841000336979, "0.002828841000336979"),
            (123.456, "123.456"),
        ];
        for (value, text) in cases {
            assert_eq!(python_float_repr(value), text, "{value}");
        }
    }

    #[test]
    fn pythons_non_finite_numbers_become_null_outside_strings_only() {
        let raw =
            br#"{"timelimit": [Infinity, -Infinity], "x": NaN, "s": "NaN \" Infinity", "n": 1}"#;
        let cleaned = super::python_constants_to_null(raw).unwrap();
        assert_eq!(
            String::from_utf8(cleaned).unwrap(),
            r#"{"timelimit": [null, null], "x": null, "s": "NaN \" Infinity", "n": 1}"#
        );
        assert!(super::python_constants_to_null(br#"{"s": "NaN"}"#).is_none());
        let value: serde_json::Value = super::from_slice_lenient(raw).unwrap();
        assert_eq!(value["timelimit"], serde_json::json!([null, null]));
    }
}
