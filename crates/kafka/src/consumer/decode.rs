//! Reading a record: its type from the header or the JSON, the event within the size limit.

use super::*;

/// What a record holds for the mount.
#[derive(Debug)]
pub enum Decoded {
    Event(Box<Event>),
    /// A type announced by the `event_type` header that no handler here knows: skipped without decoding.
    Foreign(String),
}

/// The `event_type` header's value, when it is text.
pub(super) fn header_type<M: Message>(message: &M) -> Option<&str> {
    message.headers().and_then(|headers| {
        headers
            .iter()
            .find(|h| h.key == "event_type")
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    })
}

/// The type of a record whose `event_type` header names a type no handler here knows: it is skipped unread.
pub(super) fn foreign_type<'m, M: Message>(message: &'m M, registry: &Registry) -> Option<&'m str> {
    header_type(message).filter(|t| matches!(registry.route(t), Route::Unhandled))
}

/// The event of a message, routed by its `event_type` header when present (else the JSON body's). `Err` is the
/// reason it is dead-lettered.
pub fn decode<M: Message>(
    message: &M,
    registry: &Registry,
    max_event_bytes: usize,
) -> Result<Decoded, String> {
    match foreign_type(message, registry) {
        Some(event_type) => Ok(Decoded::Foreign(event_type.to_owned())),
        None => decode_event(message, max_event_bytes).map(Decoded::Event),
    }
}

/// The event of a message whose type is not known to be foreign, routed by its `event_type` header when present
/// (else the JSON body's). `Err` is the reason it is dead-lettered.
pub(super) fn decode_event<M: Message>(
    message: &M,
    max_event_bytes: usize,
) -> Result<Box<Event>, String> {
    let header_type = header_type(message);
    let payload = message
        .payload()
        .ok_or_else(|| "empty message (no value)".to_owned())?;
    if payload.len() > max_event_bytes {
        return Err(format!(
            "event is {} bytes, over MAX_EVENT_BYTES={max_event_bytes}",
            payload.len()
        ));
    }
    let mut event = Event::from_slice(payload).map_err(|e| e.to_string())?;
    if let Some(event_type) = header_type
        && event_type != event.event_type
    {
        tracing::warn!(header = %event_type, body = %event.event_type, offset = message.offset(),
            "event_type header and body disagree; routing by the header");
        event.event_type = event_type.to_owned();
    }
    Ok(Box::new(event))
}
