//! Bytes kept exactly inside JSON: as text when they are UTF-8 (readable, greppable), else as base64 in a field of
//! their own. Dead letters and `vectordb export` records carry their original bytes this way.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// `(text, base64)` for `bytes`: the text when they are UTF-8, else the base64.
pub fn split(bytes: &[u8]) -> (Option<String>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text.to_owned()), None),
        Err(_) => (None, Some(STANDARD.encode(bytes))),
    }
}

/// The bytes [`split`] kept; `None` when neither field is set or the base64 is broken.
pub fn join(text: Option<&str>, base64: Option<&str>) -> Option<Vec<u8>> {
    match (text, base64) {
        (Some(text), _) => Some(text.as_bytes().to_vec()),
        (None, Some(encoded)) => STANDARD.decode(encoded).ok(),
        (None, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_stays_text_and_other_bytes_come_back_exactly() {
        assert_eq!(split(b"{\"a\": 1}"), (Some("{\"a\": 1}".to_owned()), None));
        let binary = [0xff, 0xfe, 0x00, b'x'];
        let (text, encoded) = split(&binary);
        assert_eq!(text, None);
        assert_eq!(join(None, encoded.as_deref()), Some(binary.to_vec()));
        assert_eq!(join(None, Some("not base64!")), None);
        assert_eq!(join(None, None), None);
    }
}
