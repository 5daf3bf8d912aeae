//! Dead letters: the record on `<topic>.dlq` (original bytes, the reason in headers) and the spool file when the
//! topic refuses it for good.

use super::*;

pub(super) fn append_synced(path: &std::path::Path, line: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(line)?;
    file.sync_data()
}

/// What a dead letter carries beyond the original record: where it goes and the headers it adds.
pub(super) struct DeadLetterRecord {
    pub(super) topic: String,
    pub(super) headers: Vec<(&'static str, String)>,
    /// Bytes of the value to send: all of it, or the start of one that would not fit.
    pub(super) value_len: Option<usize>,
}

/// Characters of the `error` header (a reason may quote a long schema error).
pub(super) const ERROR_HEADER_CHARS: usize = 2_000;
/// Headers a cut dead letter adds.
pub(super) const TRUNCATION_HEADERS: [&str; 3] =
    ["original_size", "original_sha256", "payload_truncated"];

impl DeadLetterRecord {
    /// `max_record` is the producer's `message.max.bytes`; a record is kept 4% under it for librdkafka's framing.
    pub(super) fn new(
        message: &OwnedMessage,
        handler: &str,
        reason: &str,
        max_record: usize,
    ) -> Self {
        let (reason, _) = aura_runtime::events::limits::truncate_chars(reason, ERROR_HEADER_CHARS);
        let mut headers = vec![
            ("error", reason.to_owned()),
            ("source_topic", message.topic().to_owned()),
            ("source_partition", message.partition().to_string()),
            ("source_offset", message.offset().to_string()),
            ("handler", handler.to_owned()),
        ];
        let kept_headers: usize = message.headers().map_or(0, |h| {
            h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        });
        let overhead = kept_headers
            + message.key().map_or(0, <[u8]>::len)
            + headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 256;
        let value_len = message.payload().map(|payload| {
            let room = (max_record / 100 * 96).saturating_sub(overhead);
            if payload.len() <= room {
                return payload.len();
            }
            headers.push((TRUNCATION_HEADERS[0], payload.len().to_string()));
            headers.push((TRUNCATION_HEADERS[1], sha256_hex(payload)));
            headers.push((TRUNCATION_HEADERS[2], "true".to_owned()));
            room.saturating_sub(200)
        });
        Self {
            topic: aura_runtime::events::routing::dead_letter_topic(message.topic()),
            headers,
            value_len,
        }
    }

    pub(super) fn record<'a>(&'a self, message: &'a OwnedMessage) -> OutgoingRecord<'a> {
        let mut headers: Vec<(&str, &[u8])> = message
            .headers()
            .map(|h| {
                h.iter()
                    .filter(|h| {
                        !DEAD_LETTER_HEADERS.contains(&h.key)
                            && !TRUNCATION_HEADERS.contains(&h.key)
                    })
                    .map(|h| (h.key, h.value.unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        headers.extend(self.headers.iter().map(|(k, v)| (*k, v.as_bytes())));
        OutgoingRecord {
            topic: &self.topic,
            key: message.key(),
            payload: message
                .payload()
                .zip(self.value_len)
                .map(|(payload, len)| &payload[..len]),
            headers,
        }
    }
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The headers a dead letter adds to the original record's (a replay to the source strips them).
pub const DEAD_LETTER_HEADERS: [&str; 5] = [
    "error",
    "source_topic",
    "source_partition",
    "source_offset",
    "handler",
];
